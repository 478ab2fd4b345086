//! Legacy-mode context entry (VT-d 9.3).

use crate::addr::PhysAddr;

/// Translation type of a legacy context entry (VT-d 9.3, TT field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TranslationType {
    /// 00b: untranslated requests go through the second-level tables.
    Untranslated = 0,
    /// 01b: all requests, device-TLB allowed.
    All = 1,
    /// 10b: pass-through, untranslated requests use their address as is.
    PassThrough = 2,
}

/// One 128-bit legacy context entry (VT-d 9.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ContextEntry {
    lo: u64,
    hi: u64,
}

super::raw128!(ContextEntry);

impl ContextEntry {
    const P: u64 = 1;
    const FPD: u64 = 1 << 1;
    const TT_SHIFT: u32 = 2;
    const TT_MASK: u64 = 3 << 2;
    const SLPTPTR_MASK: u64 = !0xfff;
    const AW_MASK: u64 = 7;
    const DID_SHIFT: u32 = 8;
    const DID_MASK: u64 = 0xffff << 8;

    /// The not-present entry: every DMA of the device is blocked.
    pub const fn blocked() -> Self {
        Self { lo: 0, hi: 0 }
    }

    /// A present entry translating untranslated requests through the
    /// second-level table at `slptptr` with `levels` levels (3, 4 or 5; AW =
    /// levels − 2) and domain-id `did`. `None` for another level count.
    pub const fn translated(slptptr: PhysAddr, levels: u8, did: u16) -> Option<Self> {
        let Some(aw) = Self::aw_for_levels(levels) else {
            return None;
        };
        Some(Self {
            lo: (slptptr.0 & Self::SLPTPTR_MASK)
                | ((TranslationType::Untranslated as u64) << Self::TT_SHIFT)
                | Self::P,
            hi: ((did as u64) << Self::DID_SHIFT) | aw,
        })
    }

    /// A present pass-through entry (TT = 10b) with domain-id `did`; `levels`
    /// sets AW, which must still name a supported width.
    pub const fn pass_through(levels: u8, did: u16) -> Option<Self> {
        let Some(aw) = Self::aw_for_levels(levels) else {
            return None;
        };
        Some(Self {
            lo: ((TranslationType::PassThrough as u64) << Self::TT_SHIFT) | Self::P,
            hi: ((did as u64) << Self::DID_SHIFT) | aw,
        })
    }

    /// The AW field value for a table with `levels` levels.
    pub const fn aw_for_levels(levels: u8) -> Option<u64> {
        match levels {
            3..=5 => Some(levels as u64 - 2),
            _ => None,
        }
    }

    /// The same entry with fault processing disabled (FPD) set or cleared.
    pub const fn with_fpd(mut self, fpd: bool) -> Self {
        if fpd {
            self.lo |= Self::FPD;
        } else {
            self.lo &= !Self::FPD;
        }
        self
    }

    /// P bit.
    pub const fn is_present(self) -> bool {
        self.lo & Self::P != 0
    }

    /// FPD bit.
    pub const fn fpd(self) -> bool {
        self.lo & Self::FPD != 0
    }

    /// TT field (raw, 0–3).
    pub const fn tt(self) -> u8 {
        ((self.lo & Self::TT_MASK) >> Self::TT_SHIFT) as u8
    }

    /// Second-level page-table pointer.
    pub const fn slptptr(self) -> PhysAddr {
        PhysAddr(self.lo & Self::SLPTPTR_MASK)
    }

    /// AW field.
    pub const fn aw(self) -> u8 {
        (self.hi & Self::AW_MASK) as u8
    }

    /// Domain identifier.
    pub const fn did(self) -> u16 {
        ((self.hi & Self::DID_MASK) >> Self::DID_SHIFT) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translated_entry_matches_hand_worked_layout() {
        // VT-d 9.3: lo = SLPTPTR(63:12) | TT(3:2)=00 | FPD(1)=0 | P(0)=1;
        // hi = DID(87:72 → 23:8) | AW(66:64 → 2:0); 4 levels → AW=010b.
        let e = ContextEntry::translated(PhysAddr(0x7654_3000), 4, 0x42).unwrap();
        assert_eq!(e.raw(), [0x7654_3001, 0x4202]);
        assert!(e.is_present());
        assert_eq!((e.tt(), e.aw(), e.did()), (0, 2, 0x42));
        assert_eq!(e.slptptr(), PhysAddr(0x7654_3000));
        // 3 levels → AW=001b; domain-id 0xffff fills bits 23:8.
        let e = ContextEntry::translated(PhysAddr(0x1000), 3, 0xffff).unwrap();
        assert_eq!(e.raw(), [0x1001, 0xff_ff01]);
        assert!(ContextEntry::translated(PhysAddr(0x1000), 2, 1).is_none());
    }

    #[test]
    fn pass_through_entry_has_tt_10_and_no_table() {
        // TT=10b → lo bits 3:2 = 10 → 0x8, plus P.
        let e = ContextEntry::pass_through(4, 7).unwrap();
        assert_eq!(e.raw(), [0x9, 0x702]);
        assert_eq!(e.tt(), TranslationType::PassThrough as u8);
        assert_eq!(e.with_fpd(true).raw(), [0xb, 0x702]);
    }

    #[test]
    fn blocked_entry_is_not_present() {
        assert_eq!(ContextEntry::blocked().raw(), [0, 0]);
        assert!(!ContextEntry::blocked().is_present());
    }
}
