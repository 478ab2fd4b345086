//! Valid-entry counts of the upper (non-leaf, non-root) tables, so an unmap
//! knows at once whether such a table became empty instead of scanning its
//! 512 entries (issue 11 §3: unlinking a 1 GiB block used to read the other
//! 511 entries of its table).
//!
//! No heap: a small fixed set of slots. A table without a slot (more upper
//! tables than slots) is decided by a scan, as before; a table with one is
//! counted exactly, by every store that makes one of its entries valid or
//! not valid. Leaf tables are not counted: the unmap looks at the
//! neighbours of what it cleared first, which keeps runs O(1) per page.

use crate::addr::PhysAddr;

/// Upper tables counted at once (a 48-bit domain using up to this many GiB
/// regions' worth of upper tables decides every emptiness at once).
pub(super) const SLOTS: usize = 16;

/// `(table, valid entries)`; a table address of 0 marks a free slot (no
/// table page is at physical address 0: the walker never counts the root,
/// and a lent page at 0 would only fall back to scanning).
#[derive(Clone, Copy)]
pub(super) struct TableCounts {
    slots: [(u64, u16); SLOTS],
}

impl TableCounts {
    pub(super) const fn new() -> Self {
        Self {
            slots: [(0, 0); SLOTS],
        }
    }

    #[inline]
    fn find(&self, table: PhysAddr) -> Option<usize> {
        if table.0 == 0 {
            return None;
        }
        self.slots.iter().position(|s| s.0 == table.0)
    }

    /// Starts counting a new, empty table, if a slot is free.
    #[inline]
    pub(super) fn track(&mut self, table: PhysAddr) {
        if table.0 == 0 {
            return;
        }
        if let Some(s) = self.slots.iter_mut().find(|s| s.0 == 0) {
            *s = (table.0, 0);
        }
    }

    /// Stops counting `table` (detached, or handed back).
    #[inline]
    pub(super) fn forget(&mut self, table: PhysAddr) {
        if let Some(i) = self.find(table) {
            self.slots[i] = (0, 0);
        }
    }

    /// One entry of `table` became valid.
    #[inline]
    pub(super) fn add(&mut self, table: PhysAddr) {
        if let Some(i) = self.find(table) {
            self.slots[i].1 += 1;
        }
    }

    /// One entry of `table` stopped being valid.
    #[inline]
    pub(super) fn sub(&mut self, table: PhysAddr) {
        if let Some(i) = self.find(table) {
            self.slots[i].1 = self.slots[i].1.saturating_sub(1);
        }
    }

    /// Valid entries of `table`, if it is counted.
    #[inline]
    pub(super) fn get(&self, table: PhysAddr) -> Option<u16> {
        self.find(table).map(|i| self.slots[i].1)
    }

    /// Forgets every table.
    pub(super) fn clear(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_tracked_tables_and_frees_slots() {
        let mut c = TableCounts::new();
        for i in 1..=SLOTS as u64 + 1 {
            c.track(PhysAddr(i << 12));
        }
        // The slot set is full: the last table is not counted.
        assert_eq!(c.get(PhysAddr((SLOTS as u64 + 1) << 12)), None);
        c.add(PhysAddr(1 << 12));
        c.add(PhysAddr(1 << 12));
        c.sub(PhysAddr(1 << 12));
        assert_eq!(c.get(PhysAddr(1 << 12)), Some(1));
        c.forget(PhysAddr(1 << 12));
        assert_eq!(c.get(PhysAddr(1 << 12)), None);
        c.track(PhysAddr(0x99 << 12));
        assert_eq!(c.get(PhysAddr(0x99 << 12)), Some(0));
    }
}
