//! Scalable-mode translation structures (VT-d 9.2, 9.4, 9.5, 9.6): root
//! entry with lower/upper context tables, 256-bit context entry pointing at a
//! PASID directory, PASID directory entry, 512-bit PASID table entry.
//!
//! Requests without PASID use the context entry's RID_PASID, which the
//! driver leaves at 0: PASID 0 (directory entry 0, table entry 0) carries the
//! device's second-level table or pass-through.

use crate::addr::PhysAddr;

/// Scalable-mode root entry (VT-d 9.2): lower half for devfn 0–127, upper
/// half for devfn 128–255.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ScalableRootEntry {
    lo: u64,
    hi: u64,
}

super::raw128!(ScalableRootEntry);

impl ScalableRootEntry {
    const P: u64 = 1;
    const CTP: u64 = !0xfff;

    /// The context table for `devfn`, if its half is present.
    pub const fn context_table(self, devfn: u8) -> Option<PhysAddr> {
        let half = if devfn >= 128 { self.hi } else { self.lo };
        if half & Self::P != 0 {
            Some(PhysAddr(half & Self::CTP))
        } else {
            None
        }
    }

    /// The same entry with the half serving `devfn` pointing at `table`.
    pub const fn with_context_table(mut self, devfn: u8, table: PhysAddr) -> Self {
        let v = (table.0 & Self::CTP) | Self::P;
        if devfn >= 128 {
            self.hi = v;
        } else {
            self.lo = v;
        }
        self
    }
}

/// Scalable-mode context entry, 256 bits (VT-d 9.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ScalableContextEntry {
    val: [u64; 4],
}

impl ScalableContextEntry {
    const P: u64 = 1;
    const PDTS_SHIFT: u32 = 9;
    const DIR: u64 = !0xfff;

    /// PDTS for a one-page PASID directory: 2^(PDTS + 7) = 512 entries.
    pub const PDTS_ONE_PAGE: u8 = 2;

    /// A present entry using the PASID directory at `dir` with 2^(pdts + 7)
    /// entries, RID_PASID 0, no device-TLB, no PASID-tagged requests.
    pub const fn present(dir: PhysAddr, pdts: u8) -> Self {
        Self {
            val: [
                (dir.0 & Self::DIR) | (((pdts & 7) as u64) << Self::PDTS_SHIFT) | Self::P,
                0,
                0,
                0,
            ],
        }
    }

    /// The same entry with P cleared; the directory pointer stays for reuse.
    pub const fn without_present(mut self) -> Self {
        self.val[0] &= !Self::P;
        self
    }

    /// An entry from its raw words.
    pub const fn from_raw(val: [u64; 4]) -> Self {
        Self { val }
    }

    /// The raw words, lowest first.
    pub const fn raw(self) -> [u64; 4] {
        self.val
    }

    /// P bit.
    pub const fn is_present(self) -> bool {
        self.val[0] & Self::P != 0
    }

    /// PASID directory pointer (kept even when not present), or `None` if 0.
    pub const fn pasid_dir(self) -> Option<PhysAddr> {
        let d = self.val[0] & Self::DIR;
        if d == 0 { None } else { Some(PhysAddr(d)) }
    }
}

/// PASID directory entry, 64 bits (VT-d 9.5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PasidDirEntry(pub u64);

impl PasidDirEntry {
    /// A present entry pointing at the PASID table `table`.
    pub const fn present(table: PhysAddr) -> Self {
        Self((table.0 & !0xfff) | 1)
    }

    /// P bit.
    pub const fn is_present(self) -> bool {
        self.0 & 1 != 0
    }

    /// The PASID table pointer.
    pub const fn table(self) -> PhysAddr {
        PhysAddr(self.0 & !0xfff)
    }
}

/// PASID-granular translation type (PGTT, VT-d 9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Pgtt {
    /// 001b: first-level only.
    FirstLevel = 1,
    /// 010b: second-level only.
    SecondLevel = 2,
    /// 011b: nested.
    Nested = 3,
    /// 100b: pass-through.
    PassThrough = 4,
}

/// Scalable-mode PASID table entry, 512 bits (VT-d 9.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PasidEntry {
    val: [u64; 8],
}

impl PasidEntry {
    const P: u64 = 1;
    const AW_SHIFT: u32 = 2;
    const PGTT_SHIFT: u32 = 6;
    /// PWSNP: bit 87, bit 23 of word 1.
    const PWSNP: u64 = 1 << 23;

    /// Second-level-only translation through the table at `slptptr` with
    /// `levels` levels (AW = levels − 2) in domain `did`. `None` for a level
    /// count outside 3–5.
    pub const fn second_level(slptptr: PhysAddr, levels: u8, did: u16) -> Option<Self> {
        if levels < 3 || levels > 5 {
            return None;
        }
        let mut val = [0u64; 8];
        val[0] = (slptptr.0 & !0xfff)
            | ((Pgtt::SecondLevel as u64) << Self::PGTT_SHIFT)
            | (((levels - 2) as u64) << Self::AW_SHIFT)
            | Self::P;
        val[1] = did as u64;
        Some(Self { val })
    }

    /// First-level-only translation (PGTT = 001b) through the 4-level
    /// x86-64 table at `flptptr` (FLPM = 00b) in domain `did`; AW = 2
    /// (48-bit) sets the canonical-address limit.
    pub const fn first_level(flptptr: PhysAddr, did: u16) -> Self {
        let mut val = [0u64; 8];
        val[0] = ((Pgtt::FirstLevel as u64) << Self::PGTT_SHIFT) | (2 << Self::AW_SHIFT) | Self::P;
        val[1] = did as u64;
        val[2] = flptptr.0 & !0xfff;
        Self { val }
    }

    /// The same entry with PWSNP (bit 87) set or cleared: the unit snoops
    /// CPU caches when it walks the paging structures. Only with ECAP.SMPWC.
    pub const fn with_page_walk_snoop(mut self, on: bool) -> Self {
        if on {
            self.val[1] |= Self::PWSNP;
        } else {
            self.val[1] &= !Self::PWSNP;
        }
        self
    }

    /// PWSNP bit.
    pub const fn page_walk_snoop(self) -> bool {
        self.val[1] & Self::PWSNP != 0
    }

    /// First-level table pointer (FLPTPTR, bits 191:140).
    pub const fn flptptr(self) -> PhysAddr {
        PhysAddr(self.val[2] & !0xfff)
    }

    /// Pass-through (PGTT = 100b) in domain `did`; `levels` sets AW.
    pub const fn pass_through(levels: u8, did: u16) -> Option<Self> {
        if levels < 3 || levels > 5 {
            return None;
        }
        let mut val = [0u64; 8];
        val[0] = ((Pgtt::PassThrough as u64) << Self::PGTT_SHIFT)
            | (((levels - 2) as u64) << Self::AW_SHIFT)
            | Self::P;
        val[1] = did as u64;
        Some(Self { val })
    }

    /// An entry from its raw words.
    pub const fn from_raw(val: [u64; 8]) -> Self {
        Self { val }
    }

    /// The raw words, lowest first.
    pub const fn raw(self) -> [u64; 8] {
        self.val
    }

    /// P bit.
    pub const fn is_present(self) -> bool {
        self.val[0] & Self::P != 0
    }

    /// PGTT field (raw).
    pub const fn pgtt(self) -> u8 {
        ((self.val[0] >> Self::PGTT_SHIFT) & 7) as u8
    }

    /// Domain-id.
    pub const fn did(self) -> u16 {
        self.val[1] as u16
    }

    /// Second-level table pointer.
    pub const fn slptptr(self) -> PhysAddr {
        PhysAddr(self.val[0] & !0xfff)
    }

    /// AW field.
    pub const fn aw(self) -> u8 {
        ((self.val[0] >> Self::AW_SHIFT) & 7) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalable_root_entry_splits_devfn_halves() {
        // 9.2: LP bit 0 + LCTP 63:12 (devfn 0-127); UP bit 64 + UCTP 127:76.
        let e = ScalableRootEntry::default()
            .with_context_table(0x18, PhysAddr(0x1000))
            .with_context_table(0x80, PhysAddr(0x2000));
        assert_eq!(e.raw(), [0x1001, 0x2001]);
        assert_eq!(e.context_table(0x7f), Some(PhysAddr(0x1000)));
        assert_eq!(e.context_table(0xff), Some(PhysAddr(0x2000)));
        assert_eq!(ScalableRootEntry::default().context_table(3), None);
    }

    #[test]
    fn scalable_context_entry_points_at_pasid_directory() {
        // 9.4: P bit 0, PDTS 11:9 = 2 (512 entries), PASIDDIRPTR 63:12; RID_PASID 0.
        let e = ScalableContextEntry::present(PhysAddr(0x5_3000), 2);
        assert_eq!(e.raw(), [0x5_3401, 0, 0, 0]);
        assert!(e.is_present());
        let off = e.without_present();
        assert_eq!(off.raw(), [0x5_3400, 0, 0, 0]);
        assert_eq!(off.pasid_dir(), Some(PhysAddr(0x5_3000)));
    }

    #[test]
    fn pasid_entries_match_hand_worked_layout() {
        // 9.6: P 0, AW 4:2, PGTT 8:6, SLPTPTR 63:12; DID 79:64.
        // Second level, 4 levels: AW=2 → 0x8, PGTT=010 → 0x80, P → 0x1.
        let e = PasidEntry::second_level(PhysAddr(0x77_7000), 4, 0x42).unwrap();
        assert_eq!(e.raw()[0], 0x77_7089);
        assert_eq!(e.raw()[1], 0x42);
        assert!(e.raw()[2..].iter().all(|&w| w == 0));
        assert_eq!((e.pgtt(), e.aw(), e.did()), (2, 2, 0x42));
        // Pass-through, 3 levels: PGTT=100 → 0x100, AW=1 → 0x4, P.
        let p = PasidEntry::pass_through(3, 9).unwrap();
        assert_eq!(p.raw()[0], 0x105);
        assert_eq!(p.did(), 9);
        assert!(PasidEntry::second_level(PhysAddr(0), 2, 1).is_none());
        // First level: PGTT=001 → 0x40, AW=2 → 0x8, P; FLPTPTR in word 2, FLPM 0.
        let f = PasidEntry::first_level(PhysAddr(0x3_4000), 5);
        assert_eq!(f.raw()[..3], [0x49, 5, 0x3_4000]);
        assert_eq!(f.flptptr(), PhysAddr(0x3_4000));
        // 9.5: directory entry P bit 0, table pointer 63:12.
        assert_eq!(PasidDirEntry::present(PhysAddr(0x9000)).0, 0x9001);
    }
}
