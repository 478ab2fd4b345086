//! Valid-entry counts of every table but the root, so an unmap knows at
//! once whether a table became empty instead of scanning its 512 entries
//! (issue 11 §3: unlinking a scattered page used to read the other 511
//! entries of its leaf table, a 1 GiB block the other 511 of its table).
//!
//! No heap and no limit: every upper table (height 1 and above, the root
//! included) has a *side page*, one more page from the lender that the
//! IOMMU never reads. Word `i` of a table's side page describes entry `i`
//! of the table: when that entry points to a child table, the word holds
//! the child's valid-entry count in bits 11:2 (at most 512) and, for
//! a child that is itself an upper table, the physical address of the
//! child's side page in the rest (page aligned, so the two never overlap);
//! otherwise the word is 0. Bits 1:0 stay clear, so a side word never
//! reads as a valid descriptor or a table pointer (Arm: bit 0; VT-d second
//! level: R and W, bits 1:0; first level and x86: P, bit 0), should a side
//! page ever be mistaken for a table (the strict model's recorder, which
//! sees every lent page, takes a word with bit 0 or 1 set for a pointer).
//! A walk from the root therefore finds every
//! count on its way down, one extra load per level, and a table's count
//! lives in its parent's side page: its *slot*.
//!
//! Every store that makes an entry valid or not valid updates the slot of
//! its table (link, unlink, the rollback of a failed map, pruning). A side
//! page is zero whenever its table is empty; it is retired with its table
//! when that is detached and goes back to the lender with it, after the
//! invalidation (the IOMMU never reads it, but one rule for every page a
//! table lends keeps the hand-back checks of the test lenders simple).

use crate::addr::PhysAddr;

/// Bits of a side word holding the valid-entry count of the child table.
pub(super) const COUNT_MASK: u64 = 0xffc;
/// Where the count starts in a side word.
pub(super) const COUNT_SHIFT: u32 = 2;

/// The side page a side word names (0 for a leaf table's: it has none).
#[inline(always)]
pub(super) const fn side_page(word: u64) -> PhysAddr {
    PhysAddr(word & !0xfff)
}

/// The valid-entry count a side word holds.
#[inline(always)]
pub(super) const fn count(word: u64) -> u64 {
    (word & COUNT_MASK) >> COUNT_SHIFT
}

/// Physical address of the slot of entry `idx` of a table whose side page
/// is `side` (`idx < 512`, so the slot stays in the side page).
#[inline(always)]
pub(super) const fn slot(side: PhysAddr, idx: usize) -> u64 {
    side.0 + idx as u64 * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_words_keep_count_and_page_apart() {
        let w = 0x1234_5000 | 512 << COUNT_SHIFT;
        assert_eq!(side_page(w), PhysAddr(0x1234_5000));
        assert_eq!(count(w), 512);
        assert_eq!(count(w - (512 << COUNT_SHIFT)), 0);
        assert_eq!(w & 3, 0, "never reads as a valid descriptor");
        assert_eq!(slot(PhysAddr(0x8000), 511), 0x8000 + 511 * 8);
    }
}
