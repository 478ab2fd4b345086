//! Legacy-mode root entry (VT-d 9.1).

use crate::addr::PhysAddr;

/// One 128-bit root entry: points at the context table of one bus (VT-d 9.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RootEntry {
    lo: u64,
    hi: u64,
}

super::raw128!(RootEntry);

impl RootEntry {
    /// Present bit (bit 0).
    const P: u64 = 1;
    /// Context-table pointer, bits 63:12.
    const CTP_MASK: u64 = !0xfff;

    /// A present entry pointing at the 4 KiB-aligned context table `ctp`.
    /// Low bits of `ctp` below 4 KiB are dropped.
    pub const fn present(ctp: PhysAddr) -> Self {
        Self {
            lo: (ctp.0 & Self::CTP_MASK) | Self::P,
            hi: 0,
        }
    }

    /// Whether the P bit is set.
    pub const fn is_present(self) -> bool {
        self.lo & Self::P != 0
    }

    /// The context-table pointer.
    pub const fn context_table(self) -> PhysAddr {
        PhysAddr(self.lo & Self::CTP_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_root_entry_has_p_and_context_table_pointer() {
        // VT-d 9.1: bit 0 P, bits 63:12 CTP, upper 64 bits reserved.
        let e = RootEntry::present(PhysAddr(0x1_2345_6000));
        assert_eq!(e.raw(), [0x1_2345_6001, 0]);
        assert!(e.is_present());
        assert_eq!(e.context_table(), PhysAddr(0x1_2345_6000));
        assert!(!RootEntry::default().is_present());
    }
}
