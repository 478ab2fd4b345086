//! CAP / ECAP decoded into a feature set (VT-d 11.4.2, 11.4.3).

use core::fmt;

use tock_registers::LocalRegisterCopy;

use super::regs::{CAP, ECAP};

/// What one remapping unit supports, decoded from VER, CAP and ECAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Features {
    /// Architecture version (major, minor) from VER.
    pub version: (u8, u8),
    /// Raw CAP value.
    pub cap: u64,
    /// Raw ECAP value.
    pub ecap: u64,
    /// CAP.ND decoded: number of domain-ids, 2^(4 + 2·ND).
    pub domains: u32,
    /// CAP.SAGAW: bit 1 = 39-bit (3-level), bit 2 = 48-bit (4-level), bit 3 = 57-bit (5-level).
    pub sagaw: u8,
    /// CAP.MGAW + 1: maximum guest address width in bits.
    pub mgaw: u8,
    /// CAP.NFR + 1: number of fault-recording registers.
    pub fault_records: u16,
    /// CAP.FRO × 16: byte offset of the first fault-recording register.
    pub fault_record_offset: usize,
    /// ECAP.IRO × 16: byte offset of the IOTLB registers.
    pub iotlb_offset: usize,
    /// CAP.CM: caching mode, not-present entries may be cached.
    pub caching_mode: bool,
    /// CAP.RWBF: write-buffer flush required.
    pub rwbf: bool,
    /// CAP.PSI: page-selective IOTLB invalidation.
    pub psi: bool,
    /// CAP.MAMV: largest address mask for page-selective invalidation.
    pub mamv: u8,
    /// CAP.SLLPS: bit 0 = 2 MiB, bit 1 = 1 GiB second-level superpages.
    pub sllps: u8,
    /// CAP.DRD: read draining.
    pub drain_reads: bool,
    /// CAP.DWD: write draining.
    pub drain_writes: bool,
    /// CAP.FL1GP: first-level 1 GiB pages.
    pub fl1gp: bool,
    /// ECAP.C: the table walker snoops CPU caches.
    pub coherent: bool,
    /// ECAP.QI: queued invalidation.
    pub qi: bool,
    /// ECAP.DT: device-TLB.
    pub device_tlb: bool,
    /// ECAP.IR: interrupt remapping.
    pub ir: bool,
    /// ECAP.EIM: extended interrupt mode.
    pub eim: bool,
    /// ECAP.PT: pass-through context entries.
    pub pt: bool,
    /// ECAP.SC: snoop control.
    pub sc: bool,
    /// ECAP.NEST: nested translation.
    pub nest: bool,
    /// ECAP.PASID: PASID support.
    pub pasid: bool,
    /// ECAP.SMTS: scalable-mode translation.
    pub smts: bool,
    /// ECAP.SLTS: second-level translation in scalable mode.
    pub slts: bool,
    /// ECAP.FLTS: first-level translation in scalable mode.
    pub flts: bool,
    /// ECAP.SMPWC: scalable-mode page walks can snoop CPU caches (with the
    /// PASID entry's PWSNP set).
    pub smpwc: bool,
}

impl Features {
    /// Decodes VER, CAP and ECAP register values.
    pub fn decode(ver: u32, cap: u64, ecap: u64) -> Self {
        let c: LocalRegisterCopy<u64, CAP::Register> = LocalRegisterCopy::new(cap);
        let e: LocalRegisterCopy<u64, ECAP::Register> = LocalRegisterCopy::new(ecap);
        let nd = c.read(CAP::ND) as u32;
        Self {
            version: (((ver >> 4) & 0xf) as u8, (ver & 0xf) as u8),
            cap,
            ecap,
            // ND is 3 bits: 2^(4 + 2·7) = 2^18 still fits.
            domains: 1u32 << (4 + 2 * nd),
            sagaw: c.read(CAP::SAGAW) as u8,
            mgaw: c.read(CAP::MGAW) as u8 + 1,
            fault_records: c.read(CAP::NFR) as u16 + 1,
            fault_record_offset: c.read(CAP::FRO) as usize * 16,
            iotlb_offset: e.read(ECAP::IRO) as usize * 16,
            caching_mode: c.is_set(CAP::CM),
            rwbf: c.is_set(CAP::RWBF),
            psi: c.is_set(CAP::PSI),
            mamv: c.read(CAP::MAMV) as u8,
            sllps: c.read(CAP::SLLPS) as u8,
            drain_reads: c.is_set(CAP::DRD),
            drain_writes: c.is_set(CAP::DWD),
            fl1gp: c.is_set(CAP::FL1GP),
            coherent: e.is_set(ECAP::C),
            qi: e.is_set(ECAP::QI),
            device_tlb: e.is_set(ECAP::DT),
            ir: e.is_set(ECAP::IR),
            eim: e.is_set(ECAP::EIM),
            pt: e.is_set(ECAP::PT),
            sc: e.is_set(ECAP::SC),
            nest: e.is_set(ECAP::NEST),
            pasid: e.is_set(ECAP::PASID),
            smts: e.is_set(ECAP::SMTS),
            slts: e.is_set(ECAP::SLTS),
            flts: e.is_set(ECAP::FLTS),
            smpwc: e.is_set(ECAP::SMPWC),
        }
    }

    /// Whether second-level tables of `levels` levels (3 → 39-bit, 4 → 48-bit,
    /// 5 → 57-bit) are supported (CAP.SAGAW).
    pub fn supports_levels(&self, levels: u8) -> bool {
        match levels {
            3..=5 => self.sagaw & (1 << (levels - 2)) != 0,
            _ => false,
        }
    }

    /// The most table levels SAGAW allows among 3 and 4 (what the core's
    /// second-level format handles), or `None` if neither.
    pub fn max_levels(&self) -> Option<u8> {
        [4u8, 3].into_iter().find(|&l| self.supports_levels(l))
    }

    /// Table levels of the largest AGAW SAGAW offers (3, 4 or 5): what
    /// pass-through entries must carry in AW (VT-d 9.3: with TT = 10b, AW
    /// names the largest AGAW the unit supports; Linux
    /// `domain_context_mapping_one` writes `iommu->msagaw`).
    pub fn largest_levels(&self) -> Option<u8> {
        [5u8, 4, 3].into_iter().find(|&l| self.supports_levels(l))
    }

    /// Whether 2 MiB second-level superpages are supported (CAP.SLLPS bit 0).
    pub fn superpage_2m(&self) -> bool {
        self.sllps & 1 != 0
    }

    /// Whether 1 GiB second-level superpages are supported (CAP.SLLPS bit 1).
    pub fn superpage_1g(&self) -> bool {
        self.sllps & 2 != 0
    }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VT-d {}.{} CAP={:#018x} ECAP={:#018x}: {} domains, SAGAW={:#x} (",
            self.version.0, self.version.1, self.cap, self.ecap, self.domains, self.sagaw
        )?;
        let mut first = true;
        for (bit, name) in [(1u8, "39-bit"), (2, "48-bit"), (3, "57-bit")] {
            if self.sagaw & (1 << bit) != 0 {
                f.write_str(if first { "" } else { " " })?;
                f.write_str(name)?;
                first = false;
            }
        }
        write!(
            f,
            "), MGAW={}, NFR={} at {:#x}, IOTLB at {:#x}, MAMV={}, SLLPS={}{}",
            self.mgaw,
            self.fault_records,
            self.fault_record_offset,
            self.iotlb_offset,
            self.mamv,
            if self.superpage_2m() { "2M" } else { "-" },
            if self.superpage_1g() { "+1G" } else { "" },
        )?;
        let flags = [
            (self.caching_mode, "CM"),
            (self.rwbf, "RWBF"),
            (self.psi, "PSI"),
            (self.drain_reads, "DRD"),
            (self.drain_writes, "DWD"),
            (self.fl1gp, "FL1GP"),
            (self.coherent, "C"),
            (self.qi, "QI"),
            (self.device_tlb, "DT"),
            (self.ir, "IR"),
            (self.eim, "EIM"),
            (self.pt, "PT"),
            (self.sc, "SC"),
            (self.nest, "NEST"),
            (self.pasid, "PASID"),
            (self.smts, "SMTS"),
            (self.slts, "SLTS"),
            (self.flts, "FLTS"),
            (self.smpwc, "SMPWC"),
        ];
        for (on, name) in flags {
            if on {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    /// QEMU 10 q35 intel-iommu defaults (see shared/QEMU.md).
    const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
    const QEMU_ECAP: u64 = 0xf0_0f4a;

    #[test]
    fn qemu_default_capabilities_decode_to_the_documented_features() {
        let f = Features::decode(0x10, QEMU_CAP, QEMU_ECAP);
        assert_eq!(f.version, (1, 0));
        assert_eq!(f.domains, 65536);
        assert_eq!(f.sagaw, 0b0110);
        assert!(f.supports_levels(3) && f.supports_levels(4) && !f.supports_levels(5));
        assert_eq!(f.max_levels(), Some(4));
        assert_eq!(f.mgaw, 48);
        assert_eq!(f.fault_records, 1);
        assert_eq!(f.fault_record_offset, 0x220);
        assert_eq!(f.iotlb_offset, 0xf0);
        assert!(f.psi && !f.caching_mode && !f.rwbf);
        assert_eq!(f.mamv, 18);
        assert_eq!(f.sllps, 0b11);
        assert!(f.drain_reads && f.drain_writes);
        assert!(f.qi && f.ir && f.pt && !f.coherent && !f.sc && !f.smts);
    }

    #[test]
    fn caching_mode_and_39_bit_only_variants_decode() {
        // caching-mode=on sets CAP bit 7; aw-bits=39 leaves SAGAW bit 1 and MGAW 38.
        let cap = (QEMU_CAP | (1 << 7)) & !(0x1f << 8 | 0x3f << 16) | (0b10 << 8) | (38 << 16);
        let f = Features::decode(0x10, cap, QEMU_ECAP);
        assert!(f.caching_mode);
        assert_eq!(f.max_levels(), Some(3));
        assert!(!f.supports_levels(4));
        assert_eq!(f.mgaw, 39);
    }

    #[test]
    fn display_names_every_set_feature() {
        let s = format!("{}", Features::decode(0x10, QEMU_CAP, QEMU_ECAP));
        assert!(s.contains("65536 domains"), "{s}");
        assert!(s.contains("39-bit 48-bit"), "{s}");
        assert!(s.contains("SLLPS=2M+1G"), "{s}");
        assert!(
            s.contains(" PSI") && s.contains(" QI") && s.contains(" PT"),
            "{s}"
        );
        assert!(!s.contains(" CM"), "{s}");
    }
}
