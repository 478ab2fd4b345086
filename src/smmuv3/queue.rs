//! Queue index arithmetic shared by the command and event queues (IHI 0070, §3.5).
//!
//! A queue of `2^log2` entries is indexed by a value whose low `log2` bits are
//! the slot and whose next bit is the wrap flag: equal indexes mean empty,
//! equal slots with different wrap flags mean full.

use tock_registers::fields::FieldValue;

use super::error::SmmuError;
use super::regs::Q_BASE;
use crate::addr::PhysAddr;
use crate::mem::TableMemory;

/// A producer or consumer index of a `2^log2`-entry queue, wrap bit included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueIndex {
    log2: u8,
    value: u32,
}

impl QueueIndex {
    /// Index 0 of a queue of `2^log2` entries (`log2 <= 19`).
    pub const fn new(log2: u8) -> Self {
        Self { log2, value: 0 }
    }

    /// The index from a PROD/CONS register's WR/RD field.
    pub const fn from_raw(log2: u8, raw: u32) -> Self {
        Self {
            log2,
            value: raw & Self::mask_with_wrap(log2),
        }
    }

    const fn mask_with_wrap(log2: u8) -> u32 {
        (2u32 << log2) - 1
    }

    /// Register value: slot and wrap bit.
    pub const fn raw(&self) -> u32 {
        self.value
    }

    /// Slot within the queue.
    pub const fn slot(&self) -> u32 {
        self.value & ((1u32 << self.log2) - 1)
    }

    /// Wrap flag.
    pub const fn wrap(&self) -> bool {
        self.value & (1u32 << self.log2) != 0
    }

    /// The next index, toggling the wrap flag past the last slot.
    pub const fn next(&self) -> Self {
        Self {
            log2: self.log2,
            value: (self.value + 1) & Self::mask_with_wrap(self.log2),
        }
    }

    /// Entries between consumer `cons` and producer `self`.
    pub const fn used_since(&self, cons: Self) -> u32 {
        self.value.wrapping_sub(cons.value) & Self::mask_with_wrap(self.log2)
    }

    /// Whether a queue with producer `self` and consumer `cons` is full.
    pub const fn is_full(&self, cons: Self) -> bool {
        self.slot() == cons.slot() && self.wrap() != cons.wrap()
    }

    /// Whether a queue with producer `self` and consumer `cons` is empty.
    pub const fn is_empty(&self, cons: Self) -> bool {
        self.value == cons.value
    }

    /// Whether the consumer `self` has moved past the entry at `index`,
    /// given that the producer is at `prod` (so `index` is in `[cons, prod)`
    /// while it is still pending).
    pub const fn has_consumed(&self, index: Self, prod: Self) -> bool {
        // Pending entries are those `prod.used_since(cons)` before prod.
        let pending = prod.used_since(*self);
        let index_age = prod.used_since(index); // entries from index to prod
        index_age > pending
    }
}

/// The memory of a queue of `2^log2` entries of `ENTRY` bytes, lent by a
/// [`TableMemory`] (at least one page).
pub(super) struct QueueMemory<const ENTRY: usize> {
    base: PhysAddr,
    log2: u8,
    pages: usize,
}

impl<const ENTRY: usize> QueueMemory<ENTRY> {
    /// Allocates zeroed memory for `2^log2` entries (`log2 <= 19`, the
    /// largest IDR1.CMDQS/EVENTQS). For a non-`coherent` SMMU the zeroed
    /// lines are cleaned, so no dirty line of the CPU's can later be written
    /// back over what the SMMU wrote (event records) and the SMMU never
    /// reads stale bytes.
    pub(super) fn new<M: TableMemory>(
        mem: &M,
        log2: u8,
        coherent: bool,
    ) -> Result<Self, SmmuError> {
        let log2 = log2.min(19);
        let bytes = (ENTRY << log2).max(4096);
        let pages = bytes / 4096;
        let base = mem.alloc_zeroed(pages).ok_or(SmmuError::OutOfMemory)?;
        if !coherent {
            mem.clean(base, bytes);
        }
        Ok(Self { base, log2, pages })
    }

    /// log2 of the number of entries.
    pub(super) const fn log2(&self) -> u8 {
        self.log2
    }

    /// The CMDQ_BASE / EVENTQ_BASE value pointing at this memory.
    pub(super) fn base_register(&self) -> FieldValue<u64, Q_BASE::Register> {
        Q_BASE::ALLOC::SET
            + Q_BASE::ADDR.val(self.base.0 >> 5)
            + Q_BASE::LOG2SIZE.val(self.log2 as u64)
    }

    /// Physical address of entry `slot` (`slot < 2^log2`).
    pub(super) const fn slot_pa(&self, slot: u32) -> PhysAddr {
        PhysAddr(self.base.0 + slot as u64 * ENTRY as u64)
    }

    /// Gives the memory back.
    ///
    /// # Safety
    ///
    /// The SMMU must no longer access the queue.
    pub(super) unsafe fn free<M: TableMemory>(self, mem: &M) {
        // SAFETY: allocated in `new` with these pages; the caller guarantees
        // the SMMU no longer accesses it.
        unsafe { mem.free(self.base, self.pages) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_bit_toggles_after_the_last_slot() {
        let mut i = QueueIndex::new(2);
        for _ in 0..4 {
            i = i.next();
        }
        assert_eq!((i.slot(), i.wrap(), i.raw()), (0, true, 0b100));
        for _ in 0..4 {
            i = i.next();
        }
        assert_eq!(i.raw(), 0);
    }

    #[test]
    fn full_and_empty_differ_only_by_the_wrap_bit() {
        let cons = QueueIndex::from_raw(2, 0b001);
        assert!(QueueIndex::from_raw(2, 0b001).is_empty(cons));
        assert!(QueueIndex::from_raw(2, 0b101).is_full(cons));
        assert_eq!(QueueIndex::from_raw(2, 0b101).used_since(cons), 4);
        assert_eq!(QueueIndex::from_raw(2, 0b100).used_since(cons), 3);
        // Bits above the wrap bit (e.g. CMDQ_CONS.ERR, OVFLG) are ignored.
        assert_eq!(QueueIndex::from_raw(2, 0x8100_0005).raw(), 0b101);
    }

    #[test]
    fn consumption_is_judged_across_the_wrap() {
        // 4-entry queue: a sync at slot 3 (wrap 0), producer at slot 0 (wrap 1).
        let sync = QueueIndex::from_raw(2, 0b011);
        let prod = QueueIndex::from_raw(2, 0b100);
        assert!(!QueueIndex::from_raw(2, 0b010).has_consumed(sync, prod));
        assert!(!QueueIndex::from_raw(2, 0b011).has_consumed(sync, prod));
        assert!(QueueIndex::from_raw(2, 0b100).has_consumed(sync, prod));
    }
}
