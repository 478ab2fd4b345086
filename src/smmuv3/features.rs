//! What an SMMU supports, decoded from SMMU_IDR0–5, IIDR and AIDR (IHI 0070, §6.3.1–§6.3.8).

use core::fmt;

use tock_registers::LocalRegisterCopy;

use super::regs::{AIDR, IDR0, IDR1, IDR3, IDR5};

/// The raw identification registers, as read from register page 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IdRegs {
    /// SMMU_IDR0..SMMU_IDR5.
    pub idr: [u32; 6],
    /// SMMU_IIDR.
    pub iidr: u32,
    /// SMMU_AIDR.
    pub aidr: u32,
}

/// The SMMU's features (§6.3.1–§6.3.8), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Features {
    /// The registers they were decoded from.
    pub raw: IdRegs,
    /// Stage 1 translation (IDR0.S1P).
    pub stage1: bool,
    /// Stage 2 translation (IDR0.S2P).
    pub stage2: bool,
    /// AArch64 translation tables (IDR0.TTF bit 1).
    pub aarch64_tables: bool,
    /// 2-level stream table supported (IDR0.ST_LEVEL == 1).
    pub two_level_strtab: bool,
    /// 2-level context descriptor tables (IDR0.CD2L).
    pub two_level_cd: bool,
    /// StreamID bits (IDR1.SIDSIZE).
    pub sid_bits: u8,
    /// SubstreamID bits (IDR1.SSIDSIZE).
    pub ssid_bits: u8,
    /// Output address size in bits (IDR5.OAS).
    pub oas_bits: u8,
    /// The raw IDR5.OAS encoding (also the CD.IPS / STE.S2PS encoding).
    pub oas_encoding: u8,
    /// 4 KiB translation granule.
    pub gran_4k: bool,
    /// 16 KiB translation granule.
    pub gran_16k: bool,
    /// 64 KiB translation granule.
    pub gran_64k: bool,
    /// log2 of the largest command queue (IDR1.CMDQS).
    pub cmdq_log2_max: u8,
    /// log2 of the largest event queue (IDR1.EVENTQS).
    pub evtq_log2_max: u8,
    /// log2 of the largest PRI queue (IDR1.PRIQS).
    pub priq_log2_max: u8,
    /// Table walks and queue accesses snoop CPU caches (IDR0.COHACC).
    pub coherent: bool,
    /// ASID width in bits: 16 with IDR0.ASID16, else 8.
    pub asid_bits: u8,
    /// VMID width in bits: 16 with IDR0.VMID16, else 8.
    pub vmid_bits: u8,
    /// Range invalidation (IDR3.RIL).
    pub range_invalidation: bool,
    /// Broadcast TLB maintenance (IDR0.BTM).
    pub btm: bool,
    /// PCIe ATS (IDR0.ATS).
    pub ats: bool,
    /// PCIe PRI (IDR0.PRI).
    pub pri: bool,
    /// MSIs (IDR0.MSI).
    pub msi: bool,
    /// Hypervisor (EL2) stage-1 contexts (IDR0.HYP).
    pub hyp: bool,
    /// Architecture revision: SMMUv3.`minor` (AIDR).
    pub arch_minor: u8,
    /// How the SMMU treats faulting transactions (IDR0.STALL_MODEL).
    pub stall_model: StallModel,
}

/// IDR0.STALL_MODEL (§6.3.1): whether faulting transactions may stall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StallModel {
    /// 0b00: stalls supported; software chooses per stream (STE.S1STALLD,
    /// CD.S, STE.S2S). The driver disables them: it never resumes a stall.
    Stall,
    /// 0b01: no stalls; faulting transactions are terminated.
    Terminate,
    /// 0b10: stalls forced; a fault stalls the transaction until software
    /// resumes or terminates it (CMD_RESUME). The driver refuses such an SMMU.
    Forced,
    /// 0b11: reserved.
    Reserved,
}

/// Bits of an IDR5.OAS / CD.IPS / STE.S2PS encoding (§6.3.6).
pub const fn oas_bits(encoding: u8) -> Option<u8> {
    match encoding {
        0 => Some(32),
        1 => Some(36),
        2 => Some(40),
        3 => Some(42),
        4 => Some(44),
        5 => Some(48),
        6 => Some(52),
        _ => None,
    }
}

impl Features {
    /// The output size the driver programs (CD.IPS, STE.S2PS) and checks
    /// table addresses against, as (bits, encoding), so the two always
    /// agree: IDR5.OAS capped at 48 bits (52 needs the 64 KiB granule's
    /// LPA descriptors, which the driver does not write), and a reserved
    /// encoding taken as the architecture's minimum, 32 bits, encoding 0
    /// (Linux `arm_smmu_device_hw_probe` takes 48 instead; the smaller
    /// is safe on any SMMU).
    pub fn output_size(&self) -> (u8, u8) {
        match oas_bits(self.oas_encoding) {
            Some(_) => {
                let e = self.oas_encoding.min(5);
                (oas_bits(e).unwrap_or(48), e)
            }
            None => (32, 0),
        }
    }

    /// Decodes the identification registers.
    pub fn decode(raw: IdRegs) -> Self {
        let idr0 = LocalRegisterCopy::<u32, IDR0::Register>::new(raw.idr[0]);
        let idr1 = LocalRegisterCopy::<u32, IDR1::Register>::new(raw.idr[1]);
        let idr3 = LocalRegisterCopy::<u32, IDR3::Register>::new(raw.idr[3]);
        let idr5 = LocalRegisterCopy::<u32, IDR5::Register>::new(raw.idr[5]);
        let aidr = LocalRegisterCopy::<u32, AIDR::Register>::new(raw.aidr);
        let oas_encoding = idr5.read(IDR5::OAS) as u8;
        Self {
            raw,
            stage1: idr0.is_set(IDR0::S1P),
            stage2: idr0.is_set(IDR0::S2P),
            aarch64_tables: idr0.read(IDR0::TTF) & 0b10 != 0,
            two_level_strtab: idr0.read(IDR0::ST_LEVEL) == 1,
            two_level_cd: idr0.is_set(IDR0::CD2L),
            sid_bits: idr1.read(IDR1::SIDSIZE) as u8,
            ssid_bits: idr1.read(IDR1::SSIDSIZE) as u8,
            // Reserved encodings: treat as the architecture's minimum.
            oas_bits: oas_bits(oas_encoding).unwrap_or(32),
            oas_encoding,
            gran_4k: idr5.is_set(IDR5::GRAN4K),
            gran_16k: idr5.is_set(IDR5::GRAN16K),
            gran_64k: idr5.is_set(IDR5::GRAN64K),
            cmdq_log2_max: idr1.read(IDR1::CMDQS) as u8,
            evtq_log2_max: idr1.read(IDR1::EVENTQS) as u8,
            priq_log2_max: idr1.read(IDR1::PRIQS) as u8,
            coherent: idr0.is_set(IDR0::COHACC),
            asid_bits: if idr0.is_set(IDR0::ASID16) { 16 } else { 8 },
            vmid_bits: if idr0.is_set(IDR0::VMID16) { 16 } else { 8 },
            range_invalidation: idr3.is_set(IDR3::RIL),
            btm: idr0.is_set(IDR0::BTM),
            ats: idr0.is_set(IDR0::ATS),
            pri: idr0.is_set(IDR0::PRI),
            msi: idr0.is_set(IDR0::MSI),
            hyp: idr0.is_set(IDR0::HYP),
            arch_minor: aidr.read(AIDR::ARCH_MINOR_REV) as u8,
            stall_model: match idr0.read(IDR0::STALL_MODEL) {
                0 => StallModel::Stall,
                1 => StallModel::Terminate,
                2 => StallModel::Forced,
                _ => StallModel::Reserved,
            },
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stages = match (self.stage1, self.stage2) {
            (true, true) => "1+2",
            (true, false) => "1",
            (false, true) => "2",
            (false, false) => "none",
        };
        write!(
            f,
            "SMMUv3.{} stages={} strtab={} SIDSIZE={} SSIDSIZE={} OAS={} granules={}{}{} \
             CMDQS={} EVENTQS={} COHACC={} ASID={}b VMID={}b RIL={} BTM={} ATS={} PRI={} MSI={} HYP={} \
             stall={:?}",
            self.arch_minor,
            stages,
            if self.two_level_strtab {
                "linear+2lvl"
            } else {
                "linear"
            },
            self.sid_bits,
            self.ssid_bits,
            self.oas_bits,
            if self.gran_4k { "4K" } else { "" },
            if self.gran_16k { ",16K" } else { "" },
            if self.gran_64k { ",64K" } else { "" },
            self.cmdq_log2_max,
            self.evtq_log2_max,
            yes(self.coherent),
            self.asid_bits,
            self.vmid_bits,
            yes(self.range_invalidation),
            yes(self.btm),
            yes(self.ats),
            yes(self.pri),
            yes(self.msi),
            yes(self.hyp),
            self.stall_model,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 10 `virt` (nested-capable): values from QEMU.md, fields worked out
    /// by hand from §6.3.1–§6.3.6.
    #[test]
    fn qemu_virt_idrs_decode_to_nested_smmu() {
        let f = Features::decode(IdRegs {
            idr: [0x0d44_101b, 0x0273_0010, 0, 0x1414, 0, 0x74],
            iidr: 0,
            aidr: 1,
        });
        assert!(f.stage1 && f.stage2 && f.aarch64_tables);
        assert!(f.two_level_strtab);
        assert_eq!((f.sid_bits, f.ssid_bits), (16, 0));
        assert_eq!((f.cmdq_log2_max, f.evtq_log2_max), (19, 19));
        assert_eq!((f.oas_bits, f.oas_encoding), (44, 4));
        assert!(f.gran_4k && f.gran_16k && f.gran_64k);
        assert!(f.coherent && f.range_invalidation);
        assert_eq!((f.asid_bits, f.vmid_bits), (16, 16));
        assert!(!f.btm && !f.ats && !f.pri && !f.msi && !f.hyp);
        assert_eq!(f.arch_minor, 1);
        assert_eq!(f.stall_model, StallModel::Terminate);
    }

    #[test]
    fn stage_only_idr0_values_decode_to_one_stage() {
        let s1 = Features::decode(IdRegs {
            idr: [0x0d44_101a, 0, 0, 0, 0, 0],
            ..IdRegs::default()
        });
        assert!(s1.stage1 && !s1.stage2);
        let s2 = Features::decode(IdRegs {
            idr: [0x0d44_1019, 0, 0, 0, 0, 0],
            ..IdRegs::default()
        });
        assert!(!s2.stage1 && s2.stage2);
        assert!(!s2.range_invalidation);
        assert_eq!(s2.oas_bits, 32);
    }

    #[test]
    fn output_size_programmed_agrees_with_the_one_checked() {
        let with_oas = |oas: u32| {
            Features::decode(IdRegs {
                idr: [0, 0, 0, 0, 0, oas],
                iidr: 0,
                aidr: 0,
            })
            .output_size()
        };
        assert_eq!(with_oas(2), (40, 2));
        assert_eq!(with_oas(5), (48, 5));
        // 52 bits is capped at 48 for the field and the check alike.
        assert_eq!(with_oas(6), (48, 5));
        // Reserved: the architecture's minimum, both ways.
        assert_eq!(with_oas(7), (32, 0));
    }

    #[test]
    fn oas_encodings_follow_idr5() {
        assert_eq!(oas_bits(0), Some(32));
        assert_eq!(oas_bits(5), Some(48));
        assert_eq!(oas_bits(6), Some(52));
        assert_eq!(oas_bits(7), None);
    }
}
