//! Context descriptors (IHI 0070, §5.4): a stage-1 translation context.

use crate::addr::PhysAddr;

// Dword 0.
const T0SZ_MASK: u64 = 0x3f;
/// TG0 = 0b00: 4 KiB granule (bits \[7:6\]).
const TG0_4K: u64 = 0 << 6;
/// IRGN0 = 0b01: inner write-back read/write-allocate (bits \[9:8\]).
const IRGN0_WBWA: u64 = 1 << 8;
/// ORGN0 = 0b01 (bits \[11:10\]).
const ORGN0_WBWA: u64 = 1 << 10;
/// SH0 = 0b11: inner shareable (bits \[13:12\]).
const SH0_ISH: u64 = 3 << 12;
/// SH0 = 0b10: outer shareable.
const SH0_OSH: u64 = 2 << 12;
/// EPD1: no TTB1 walks (bit 30).
const EPD1: u64 = 1 << 30;
/// V (bit 31).
const V: u64 = 1 << 31;
const IPS_SHIFT: u32 = 32;
/// AA64: AArch64 tables (bit 41).
const AA64: u64 = 1 << 41;
/// R: record faults (bit 45).
const R: u64 = 1 << 45;
/// A: abort (not stall) on terminated transactions (bit 46).
const A: u64 = 1 << 46;
/// ASET: the ASID is not shared with a PE, so broadcast TLBIs leave it alone (bit 47).
const ASET: u64 = 1 << 47;
const ASID_SHIFT: u32 = 48;
/// TTB0: bits \[51:4\] of dword 1.
const TTB_MASK: u64 = 0x000f_ffff_ffff_fff0;

/// A 64-byte context descriptor (§5.4) for one TTB0 walk with a 4 KiB
/// granule; TTB1 disabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ContextDescriptor(pub [u64; 8]);

impl ContextDescriptor {
    /// Size of a CD in bytes.
    pub const SIZE: usize = 64;

    /// A valid CD: `asid`, tables at `ttb0` covering `64 - t0sz` input bits,
    /// output size encoding `ips` (as IDR5.OAS), attribute indexes resolved
    /// through `mair`. Write-back cacheable inner-shareable walks, A = 1,
    /// R = 1, AA64 = 1, S = 0 (no stalls).
    pub const fn new(asid: u16, ttb0: PhysAddr, t0sz: u8, ips: u8, mair: u64) -> Self {
        Self::with_walk(asid, ttb0, t0sz, ips, mair, true)
    }

    /// [`ContextDescriptor::new`] for an SMMU that snoops CPU caches or not:
    /// when not `coherent` the TTB0 walk is non-cacheable outer shareable
    /// (IRGN0 = ORGN0 = 0b00, SH0 = 0b10), agreeing with SMMU_CR1 and with
    /// the cleaning the core does (Linux io-pgtable-arm's TCR for a
    /// non-coherent walk).
    pub const fn with_walk(
        asid: u16,
        ttb0: PhysAddr,
        t0sz: u8,
        ips: u8,
        mair: u64,
        coherent: bool,
    ) -> Self {
        let walk = if coherent {
            IRGN0_WBWA | ORGN0_WBWA | SH0_ISH
        } else {
            SH0_OSH
        };
        // DS (52-bit descriptors, FEAT_LPA2) and HA/HD stay 0: the walker
        // keeps each table's valid-entry count in bits 11:2 of the table
        // descriptor pointing to it (`pgtable::counts`), IGNORED only
        // without DS and without the table Access flag.
        let d0 = (t0sz as u64 & T0SZ_MASK)
            | TG0_4K
            | walk
            | EPD1
            | V
            | ((ips as u64 & 0b111) << IPS_SHIFT)
            | AA64
            | R
            | A
            | ASET
            | ((asid as u64) << ASID_SHIFT);
        Self([d0, ttb0.0 & TTB_MASK, 0, mair, 0, 0, 0, 0])
    }

    /// The ASID.
    pub const fn asid(&self) -> u16 {
        (self.0[0] >> ASID_SHIFT) as u16
    }

    /// Whether V is set.
    pub const fn valid(&self) -> bool {
        self.0[0] & V != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cd_for_a_39_bit_space_matches_the_spec_layout() {
        let cd = ContextDescriptor::new(0x5, PhysAddr(0x4400_0000), 25, 4, 0x0044_04ff);
        // T0SZ 25 = 0x19, IRGN0 0x100, ORGN0 0x400, SH0 0x3000, EPD1 bit 30,
        // V bit 31: low word 0xc000_3519. IPS 4 << 32, AA64 bit 41, R bit 45,
        // A bit 46, ASET bit 47, ASID 5 << 48: high word 0x0005_e204.
        assert_eq!(cd.0[0], 0x0005_e204_c000_3519);
        assert_eq!(cd.0[1], 0x4400_0000);
        assert_eq!(cd.0[2], 0);
        assert_eq!(cd.0[3], 0x0044_04ff);
        assert_eq!(cd.asid(), 5);
        assert!(cd.valid());
    }
}
