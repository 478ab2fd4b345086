//! Valid-entry counts of every table but the root, so an unmap knows at
//! once whether a table became empty instead of scanning its 512 entries
//! (issue 11 §3: unlinking a scattered page used to read the other 511
//! entries of its leaf table, a 1 GiB block the other 511 of its table).
//!
//! No heap, no limit and no extra page: a table's count sits in the
//! descriptor that points to it (its parent's entry, the table's *slot*),
//! in ten bits the IOMMU ignores in a table descriptor, from
//! [`PteFormat::COUNT_SHIFT`](super::PteFormat::COUNT_SHIFT):
//!
//! - Arm VMSAv8-64 (stage 1 and stage 2, 4 KiB granule): bits 11:2, IGNORED
//!   in a table descriptor unless FEAT_LPA2's 52-bit descriptors (CD.DS /
//!   STE.S2DS, bits 9:8 then hold output address bits) or FEAT_HAFT's
//!   table Access flag (bit 10) are enabled; this crate enables neither.
//! - VT-d second level and first level: bits 61:52, ignored in non-leaf
//!   entries of both (QEMU's reserved-bit checks agree: `VTD_SL_IGN_COM`,
//!   `VTD_FS_UPPER_IGNORED`).
//!
//! A walk from the root reads each count with the pointer it follows: no
//! extra load, no extra cache line, and one page per table (the peers'
//! 515 pages per GiB of 4 KiB pages, not twice that). Every store that
//! makes an entry valid or not valid updates the slot of its table (link,
//! unlink, the rollback of a failed map, pruning); a detach clears the
//! slot with the pointer.
//!
//! Changing ignored bits of a live table descriptor needs no
//! break-before-make, no clean and no invalidation: the walker ignores
//! them, so a non-coherent walker reading a stale count reads the same
//! table address (the strict model's recorder, `testing::order`, is told
//! the count bits and skips such stores). Hardware that sets an Accessed
//! flag in non-leaf entries does so atomically and in other bits (VT-d
//! first level: bit 5); the exclusive path's plain read-add-store of a
//! count may drop such a flag set in between (never a count, never an
//! address): the crate never reads it. The shared path adds atomically.

use crate::addr::PhysAddr;

/// The widest count a slot holds (ten bits; a table has at most 512
/// entries).
pub(super) const COUNT_BITS: u64 = 0x3ff;

/// The valid-entry count in a table descriptor whose count starts at bit
/// `shift`.
#[inline(always)]
pub(super) const fn count(word: u64, shift: u32) -> u64 {
    (word >> shift) & COUNT_BITS
}

/// Physical address of entry `idx` of `table` (`idx < 512`, so the slot
/// stays in the table page): the slot of the child table it points to.
#[inline(always)]
pub(super) const fn slot(table: PhysAddr, idx: usize) -> u64 {
    table.0 + idx as u64 * 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::{ArmStage1, ArmStage2};
    use crate::pgtable::vtd::VtdSecondLevel;
    use crate::pgtable::{Pte, PteFormat};
    use crate::vtd::VtdFirstLevel;

    /// A count anywhere in its range leaves a table descriptor pointing at
    /// the same table in every format, and reads back.
    fn keeps_the_pointer<F: PteFormat>(f: F) {
        let pa = PhysAddr(0xabc_d000);
        let t = f.table(pa);
        for n in [0u64, 1, 255, 511, 512] {
            let w = t + (n << F::COUNT_SHIFT);
            assert_eq!(count(w, F::COUNT_SHIFT), n);
            for h in 1..4 {
                assert_eq!(f.decode(w, h), Pte::Table(pa));
            }
        }
        assert_eq!(count(t, F::COUNT_SHIFT), 0);
    }

    /// Each format's count bits lie where its specification says a table
    /// descriptor's bits are ignored: Arm VMSAv8-64, 4 KiB granule, no
    /// `DS`, no HAFT (stage 1 and 2): bits 11:2 and 58:51; VT-d second
    /// level non-leaf: 63 and 61:52 (QEMU `VTD_SL_IGN_COM`); first level
    /// non-leaf: 62:52.
    #[test]
    fn count_bits_are_bits_the_walker_ignores() {
        const ARM: u64 = 0x3ff << 2 | 0xff << 51;
        const VTD_SL: u64 = 1 << 63 | 0x3ff << 52;
        const VTD_FL: u64 = 0x7ff << 52;
        for (mask, ignored) in [
            (ArmStage1::COUNT_MASK, ARM),
            (ArmStage2::COUNT_MASK, ARM),
            (VtdSecondLevel::COUNT_MASK, VTD_SL),
            (VtdFirstLevel::COUNT_MASK, VTD_FL),
        ] {
            assert_eq!(mask.count_ones(), 10);
            assert_eq!(mask & !ignored, 0, "{mask:#x} outside {ignored:#x}");
        }
    }

    #[test]
    fn counts_live_in_ignored_bits_of_table_descriptors() {
        keeps_the_pointer(ArmStage1);
        keeps_the_pointer(ArmStage2);
        keeps_the_pointer(VtdSecondLevel {
            haw: 52,
            ..VtdSecondLevel::default()
        });
        keeps_the_pointer(VtdFirstLevel {
            fl1gp: true,
            haw: 52,
        });
        assert_eq!(slot(PhysAddr(0x8000), 511), 0x8000 + 511 * 8);
    }
}
