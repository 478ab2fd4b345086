//! VT-d remapping-hardware registers (VT-d spec, chapter 11), declared once.
//!
//! Three blocks: the main block at the register base, the IOTLB registers at
//! `ECAP.IRO × 16` and the fault-recording registers at `CAP.FRO × 16`. The
//! two movable blocks are located by [`iotlb_offset`] and [`frcd_offset`];
//! nothing else in the driver computes register offsets.
//!
//! The tock-registers macros generate items (field value enums, struct
//! fields) that cannot carry rustdoc; each register and field is documented
//! at its declaration below, with its spec section.
#![allow(missing_docs)]

use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

register_bitfields! [u32,
    /// Version register (11.4.1).
    pub VER [
        /// Minor version.
        MIN OFFSET(0) NUMBITS(4) [],
        /// Major version.
        MAX OFFSET(4) NUMBITS(4) []
    ],
    /// Global command (11.4.4) and global status (11.4.5): same bit positions.
    pub GCMD [
        /// Compatibility-format interrupts (CFI / CFIS).
        CFI OFFSET(23) NUMBITS(1) [],
        /// Set interrupt-remap table pointer (SIRTP / IRTPS), one-shot.
        SIRTP OFFSET(24) NUMBITS(1) [],
        /// Interrupt remapping enable (IRE / IRES).
        IRE OFFSET(25) NUMBITS(1) [],
        /// Queued invalidation enable (QIE / QIES).
        QIE OFFSET(26) NUMBITS(1) [],
        /// Write-buffer flush (WBF / WBFS), one-shot.
        WBF OFFSET(27) NUMBITS(1) [],
        /// Enable advanced fault logging (EAFL / AFLS).
        EAFL OFFSET(28) NUMBITS(1) [],
        /// Set fault log (SFL / FLS), one-shot.
        SFL OFFSET(29) NUMBITS(1) [],
        /// Set root-table pointer (SRTP / RTPS), one-shot.
        SRTP OFFSET(30) NUMBITS(1) [],
        /// Translation enable (TE / TES).
        TE OFFSET(31) NUMBITS(1) []
    ],
    /// Fault status register (11.4.9.1).
    pub FSTS [
        /// Primary fault overflow (RW1C).
        PFO OFFSET(0) NUMBITS(1) [],
        /// Primary pending fault (RO: some fault record has F set).
        PPF OFFSET(1) NUMBITS(1) [],
        /// Advanced fault overflow (RW1C).
        AFO OFFSET(2) NUMBITS(1) [],
        /// Advanced pending fault.
        APF OFFSET(3) NUMBITS(1) [],
        /// Invalidation queue error (RW1C).
        IQE OFFSET(4) NUMBITS(1) [],
        /// Invalidation completion error (RW1C).
        ICE OFFSET(5) NUMBITS(1) [],
        /// Invalidation time-out error (RW1C).
        ITE OFFSET(6) NUMBITS(1) [],
        /// Fault record index: first record with F set.
        FRI OFFSET(8) NUMBITS(8) []
    ],
    /// Fault event control register (11.4.9.2).
    pub FECTL [
        /// Interrupt pending.
        IP OFFSET(30) NUMBITS(1) [],
        /// Interrupt mask.
        IM OFFSET(31) NUMBITS(1) []
    ],
    /// Protected memory enable register (11.4.10).
    pub PMEN [
        /// Protected region status.
        PRS OFFSET(0) NUMBITS(1) [],
        /// Enable protected memory.
        EPM OFFSET(31) NUMBITS(1) []
    ],
    /// Invalidation completion status register (11.4.9.5).
    pub ICS [
        /// Invalidation wait descriptor complete (RW1C).
        IWC OFFSET(0) NUMBITS(1) []
    ],
    /// Second dword of a fault recording register: bits 95:64 (11.4.14).
    pub FRCD2 [
        /// Source identifier of the faulting request.
        SID OFFSET(0) NUMBITS(16) [],
        /// Privilege-mode requested.
        PRIV OFFSET(29) NUMBITS(1) [],
        /// Execute permission requested.
        EXE OFFSET(30) NUMBITS(1) [],
        /// PASID present.
        PP OFFSET(31) NUMBITS(1) []
    ],
    /// Last dword of a fault recording register: bits 127:96 (11.4.14).
    pub FRCD3 [
        /// Fault reason.
        FR OFFSET(0) NUMBITS(8) [],
        /// PASID value.
        PV OFFSET(8) NUMBITS(20) [],
        /// Address type.
        AT OFFSET(28) NUMBITS(2) [],
        /// Type: 0 write, 1 read.
        T OFFSET(30) NUMBITS(1) [],
        /// Fault (RW1C): the record holds a fault.
        F OFFSET(31) NUMBITS(1) []
    ]
];

register_bitfields! [u64,
    /// Capability register (11.4.2).
    pub CAP [
        /// Number of domains supported: 2^(4 + 2·ND).
        ND OFFSET(0) NUMBITS(3) [],
        /// Advanced fault logging.
        AFL OFFSET(3) NUMBITS(1) [],
        /// Required write-buffer flushing.
        RWBF OFFSET(4) NUMBITS(1) [],
        /// Protected low-memory region.
        PLMR OFFSET(5) NUMBITS(1) [],
        /// Protected high-memory region.
        PHMR OFFSET(6) NUMBITS(1) [],
        /// Caching mode: not-present entries may be cached.
        CM OFFSET(7) NUMBITS(1) [],
        /// Supported adjusted guest address widths (bit 1: 39-bit, bit 2: 48-bit, bit 3: 57-bit).
        SAGAW OFFSET(8) NUMBITS(5) [],
        /// Maximum guest address width minus one.
        MGAW OFFSET(16) NUMBITS(6) [],
        /// Zero-length read.
        ZLR OFFSET(22) NUMBITS(1) [],
        /// Fault-recording register offset, in 16-byte units.
        FRO OFFSET(24) NUMBITS(10) [],
        /// Second-level large page support (bit 0: 2 MiB, bit 1: 1 GiB).
        SLLPS OFFSET(34) NUMBITS(4) [],
        /// Page-selective invalidation.
        PSI OFFSET(39) NUMBITS(1) [],
        /// Number of fault-recording registers minus one.
        NFR OFFSET(40) NUMBITS(8) [],
        /// Maximum address mask value for page-selective invalidation.
        MAMV OFFSET(48) NUMBITS(6) [],
        /// Write draining.
        DWD OFFSET(54) NUMBITS(1) [],
        /// Read draining.
        DRD OFFSET(55) NUMBITS(1) [],
        /// First-level 1 GiB pages.
        FL1GP OFFSET(56) NUMBITS(1) [],
        /// Posted interrupts.
        PI OFFSET(59) NUMBITS(1) [],
        /// First-level 5-level paging.
        FL5LP OFFSET(60) NUMBITS(1) []
    ],
    /// Extended capability register (11.4.3).
    pub ECAP [
        /// Page-walk coherency.
        C OFFSET(0) NUMBITS(1) [],
        /// Queued invalidation.
        QI OFFSET(1) NUMBITS(1) [],
        /// Device-TLB.
        DT OFFSET(2) NUMBITS(1) [],
        /// Interrupt remapping.
        IR OFFSET(3) NUMBITS(1) [],
        /// Extended interrupt mode (x2APIC).
        EIM OFFSET(4) NUMBITS(1) [],
        /// Pass-through.
        PT OFFSET(6) NUMBITS(1) [],
        /// Snoop control.
        SC OFFSET(7) NUMBITS(1) [],
        /// IOTLB register offset, in 16-byte units.
        IRO OFFSET(8) NUMBITS(10) [],
        /// Maximum handle mask value.
        MHMV OFFSET(20) NUMBITS(4) [],
        /// Nested translation.
        NEST OFFSET(26) NUMBITS(1) [],
        /// Page requests.
        PRS OFFSET(29) NUMBITS(1) [],
        /// PASID size supported minus one.
        PSS OFFSET(35) NUMBITS(5) [],
        /// PASID support.
        PASID OFFSET(40) NUMBITS(1) [],
        /// Scalable-mode translation.
        SMTS OFFSET(43) NUMBITS(1) [],
        /// Second-level translation (scalable mode).
        SLTS OFFSET(46) NUMBITS(1) [],
        /// First-level translation (scalable mode).
        FLTS OFFSET(47) NUMBITS(1) [],
        /// Scalable-mode page-walk coherency: walks snoop when the PASID
        /// entry's PWSNP is set.
        SMPWC OFFSET(48) NUMBITS(1) []
    ],
    /// Root table address register (11.4.6).
    pub RTADDR [
        /// Translation table mode: 00 legacy, 01 scalable.
        TTM OFFSET(10) NUMBITS(2) [
            Legacy = 0,
            Scalable = 1
        ],
        /// Root table address, bits 63:12.
        RTA OFFSET(12) NUMBITS(52) []
    ],
    /// Context command register (11.4.7).
    pub CCMD [
        /// Domain-id.
        DID OFFSET(0) NUMBITS(16) [],
        /// Source-id.
        SID OFFSET(16) NUMBITS(16) [],
        /// Function mask.
        FM OFFSET(32) NUMBITS(2) [],
        /// Actual invalidation granularity.
        CAIG OFFSET(59) NUMBITS(2) [],
        /// Requested invalidation granularity.
        CIRG OFFSET(61) NUMBITS(2) [
            Global = 1,
            Domain = 2,
            Device = 3
        ],
        /// Invalidate context-cache: set to start, cleared by hardware when done.
        ICC OFFSET(63) NUMBITS(1) []
    ],
    /// Invalidate address register (11.4.8.2).
    pub IVA [
        /// Address mask: invalidate 2^AM pages.
        AM OFFSET(0) NUMBITS(6) [],
        /// Invalidation hint: only leaf entries changed.
        IH OFFSET(6) NUMBITS(1) [],
        /// Page address, bits 63:12.
        ADDR OFFSET(12) NUMBITS(52) []
    ],
    /// IOTLB invalidate register (11.4.8.1).
    pub IOTLB [
        /// Domain-id.
        DID OFFSET(32) NUMBITS(16) [],
        /// Drain writes.
        DW OFFSET(48) NUMBITS(1) [],
        /// Drain reads.
        DR OFFSET(49) NUMBITS(1) [],
        /// Actual invalidation granularity.
        IAIG OFFSET(57) NUMBITS(2) [],
        /// Requested invalidation granularity.
        IIRG OFFSET(60) NUMBITS(2) [
            Global = 1,
            Domain = 2,
            Page = 3
        ],
        /// Invalidate IOTLB: set to start, cleared by hardware when done.
        IVT OFFSET(63) NUMBITS(1) []
    ],
    /// Invalidation queue head / tail registers (11.4.9.2, 11.4.9.3).
    pub IQ [
        /// Queue index in 128-bit descriptor units.
        QI OFFSET(4) NUMBITS(15) []
    ],
    /// Invalidation queue address register (11.4.9.4).
    pub IQA [
        /// Queue size: 2^QS pages.
        QS OFFSET(0) NUMBITS(3) [],
        /// Descriptor width: 0 = 128-bit, 1 = 256-bit.
        DW OFFSET(11) NUMBITS(1) [],
        /// Queue base address, bits 63:12.
        IQA OFFSET(12) NUMBITS(52) []
    ],
    /// Invalidation queue error record register (11.4.9.9).
    pub IQERCD [
        /// Invalidation queue error info.
        IQEI OFFSET(0) NUMBITS(4) [],
        /// Invalidation completion error source-id.
        ICESID OFFSET(32) NUMBITS(16) [],
        /// Invalidation time-out error source-id.
        ITESID OFFSET(48) NUMBITS(16) []
    ],
    /// Interrupt remapping table address register (11.4.10.1).
    pub IRTA [
        /// Table size: 2^(S + 1) entries.
        S OFFSET(0) NUMBITS(4) [],
        /// Extended interrupt mode enable (x2APIC: 32-bit destination IDs).
        EIME OFFSET(11) NUMBITS(1) [],
        /// Table base, 4 KiB aligned (bits 63:12).
        IRTA OFFSET(12) NUMBITS(52) []
    ]
];

register_structs! {
    /// The main remapping-hardware register block (11.4).
    pub VtdRegs {
        (0x00 => pub ver: ReadOnly<u32, VER::Register>),
        (0x04 => _reserved0),
        (0x08 => pub cap: ReadOnly<u64, CAP::Register>),
        (0x10 => pub ecap: ReadOnly<u64, ECAP::Register>),
        (0x18 => pub gcmd: WriteOnly<u32, GCMD::Register>),
        (0x1c => pub gsts: ReadOnly<u32, GCMD::Register>),
        (0x20 => pub rtaddr: ReadWrite<u64, RTADDR::Register>),
        (0x28 => pub ccmd: ReadWrite<u64, CCMD::Register>),
        (0x30 => _reserved1),
        (0x34 => pub fsts: ReadWrite<u32, FSTS::Register>),
        (0x38 => pub fectl: ReadWrite<u32, FECTL::Register>),
        (0x3c => pub fedata: ReadWrite<u32>),
        (0x40 => pub feaddr: ReadWrite<u32>),
        (0x44 => pub feuaddr: ReadWrite<u32>),
        (0x48 => _reserved2),
        (0x58 => pub aflog: ReadWrite<u64>),
        (0x60 => _reserved3),
        (0x64 => pub pmen: ReadWrite<u32, PMEN::Register>),
        (0x68 => pub plmbase: ReadWrite<u32>),
        (0x6c => pub plmlimit: ReadWrite<u32>),
        (0x70 => pub phmbase: ReadWrite<u64>),
        (0x78 => pub phmlimit: ReadWrite<u64>),
        (0x80 => pub iqh: ReadOnly<u64, IQ::Register>),
        (0x88 => pub iqt: ReadWrite<u64, IQ::Register>),
        (0x90 => pub iqa: ReadWrite<u64, IQA::Register>),
        (0x98 => _reserved4),
        (0x9c => pub ics: ReadWrite<u32, ICS::Register>),
        (0xa0 => pub iectl: ReadWrite<u32>),
        (0xa4 => pub iedata: ReadWrite<u32>),
        (0xa8 => pub ieaddr: ReadWrite<u32>),
        (0xac => pub ieuaddr: ReadWrite<u32>),
        (0xb0 => pub iqercd: ReadOnly<u64, IQERCD::Register>),
        (0xb8 => pub irta: ReadWrite<u64, IRTA::Register>),
        (0xc0 => @END),
    }
}

register_structs! {
    /// IOTLB registers at `ECAP.IRO × 16` (11.4.8).
    pub IotlbRegs {
        (0x00 => pub iva: ReadWrite<u64, IVA::Register>),
        (0x08 => pub iotlb: ReadWrite<u64, IOTLB::Register>),
        (0x10 => @END),
    }
}

register_structs! {
    /// One fault-recording register, 128 bits, at `CAP.FRO × 16 + 16·i` (11.4.14).
    pub FrcdRegs {
        (0x00 => pub fi: ReadOnly<u64>),
        (0x08 => pub sid: ReadOnly<u32, FRCD2::Register>),
        (0x0c => pub status: ReadWrite<u32, FRCD3::Register>),
        (0x10 => @END),
    }
}

/// Byte offset of the IOTLB registers from the register base (`ECAP.IRO × 16`).
pub const fn iotlb_offset(ecap: u64) -> usize {
    (((ecap >> 8) & 0x3ff) as usize) * 16
}

/// Byte offset of fault-recording register `index` (`CAP.FRO × 16 + 16·index`).
pub const fn frcd_offset(cap: u64, index: usize) -> usize {
    (((cap >> 24) & 0x3ff) as usize) * 16 + index * 16
}

/// GSTS bits that reflect a persistent enable and must be repeated in every
/// GCMD write (TE, EAFL, QIE, IRE, CFI); the one-shot status bits (RTPS, FLS,
/// WBFS, IRTPS) must not be (VT-d 11.4.4).
pub const GCMD_PERSISTENT: u32 = (1 << 31) | (1 << 28) | (1 << 26) | (1 << 25) | (1 << 23);

/// The value to write to GCMD to change one command bit: the persistent bits
/// now set in `gsts`, with `bit` set (`on`) or cleared (VT-d 11.4.4).
pub const fn gcmd_value(gsts: u32, bit: u32, on: bool) -> u32 {
    let base = gsts & GCMD_PERSISTENT;
    if on { base | bit } else { base & !bit }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn blocks_have_the_spec_sizes() {
        assert_eq!(size_of::<VtdRegs>(), 0xc0);
        assert_eq!(size_of::<IotlbRegs>(), 16);
        assert_eq!(size_of::<FrcdRegs>(), 16);
    }

    #[test]
    fn movable_blocks_sit_where_qemu_puts_them() {
        // QEMU q35 defaults: CAP=0x00d2008c222f0606 (FRO 0x22), ECAP=0xf00f4a (IRO 0xf).
        assert_eq!(iotlb_offset(0xf0_0f4a), 0xf0);
        assert_eq!(frcd_offset(0x00d2_008c_222f_0606, 0), 0x220);
        assert_eq!(frcd_offset(0x00d2_008c_222f_0606, 1), 0x230);
    }

    #[test]
    fn gcmd_write_repeats_enables_and_drops_one_shot_bits() {
        // GSTS = TES | RTPS | QIES: enabling IRE must keep TE and QIE, not re-fire SRTP.
        let gsts = (1 << 31) | (1 << 30) | (1 << 26);
        assert_eq!(gcmd_value(gsts, 1 << 25, true), 0x8600_0000);
        // Disabling QIE keeps TE only.
        assert_eq!(gcmd_value(gsts, 1 << 26, false), 0x8000_0000);
        // SRTP is one-shot: the write is TE | QIE | SRTP, RTPS is not echoed back.
        assert_eq!(gcmd_value(gsts, 1 << 30, true), 0xc400_0000);
        assert_eq!(gcmd_value(gsts, 1 << 25, false), 0x8400_0000);
    }
}
