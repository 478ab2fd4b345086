//! Host lender for tests: table pages from the std allocator, physical
//! address = pointer value, with an optional page budget to test refusals.

#![allow(dead_code)]

use bare_iommu::{PhysAddr, TableMemory};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

pub struct HostMemory {
    live: RefCell<HashMap<u64, Layout>>,
    budget: Cell<Option<usize>>,
    pub allocs: Cell<usize>,
    /// `phys_to_virt` calls: the walker looks a table page up for every
    /// entry it reads, so this counts the entries an operation reads.
    pub lookups: Cell<usize>,
}

impl HostMemory {
    pub fn new() -> Self {
        Self {
            live: RefCell::new(HashMap::new()),
            budget: Cell::new(None),
            allocs: Cell::new(0),
            lookups: Cell::new(0),
        }
    }

    /// Refuse allocations once `pages` more pages were handed out.
    pub fn set_budget(&self, pages: Option<usize>) {
        self.budget.set(pages);
    }

    /// Pages currently lent.
    pub fn live_pages(&self) -> usize {
        self.live.borrow().values().map(|l| l.size() / 4096).sum()
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        for (pa, l) in self.live.borrow_mut().drain() {
            // SAFETY: allocated with this layout in alloc_zeroed.
            unsafe { dealloc(pa as *mut u8, l) };
        }
    }
}

// SAFETY: blocks are zeroed, aligned to their power-of-two size, exclusively
// lent until freed, and phys_to_virt is the identity on these pointers.
unsafe impl TableMemory for HostMemory {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if let Some(b) = self.budget.get() {
            if b < pages {
                return None;
            }
            self.budget.set(Some(b - pages));
        }
        let size = pages.checked_next_power_of_two()? * 4096;
        let layout = Layout::from_size_align(pages * 4096, size).ok()?;
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        self.allocs.set(self.allocs.get() + 1);
        self.live.borrow_mut().insert(p as u64, layout);
        Some(PhysAddr(p as u64))
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        let l = self
            .live
            .borrow_mut()
            .remove(&pa.0)
            .expect("free of a block never lent");
        assert_eq!(l.size(), pages * 4096, "free with the wrong size");
        if let Some(b) = self.budget.get() {
            self.budget.set(Some(b + pages));
        }
        // SAFETY: allocated with this layout.
        unsafe { dealloc(pa.0 as *mut u8, l) };
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.lookups.set(self.lookups.get() + 1);
        pa.0 as *mut u8
    }
}

/// A 3-level stage-1 `SharedDomain` on `mem` whose aperture (1 MiB to
/// 2 MiB) is too small to shard: every transaction comes from the
/// domain's allocator, side by side in one leaf table (the concurrency
/// models' domain, `tests/loom.rs` and `tests/shuttle.rs`).
pub fn one_leaf_table_domain<M: TableMemory>(
    mem: M,
) -> bare_iommu::shared::SharedDomain<bare_iommu::pgtable::arm::ArmStage1, M> {
    shared_domain(mem, 2 << 20)
}

/// A 3-level stage-1 `SharedDomain` on `mem` with the aperture 1 MiB to
/// `end` (64 MiB and more: every CPU gets an IOVA shard of its own).
pub fn shared_domain<M: TableMemory>(
    mem: M,
    end: u64,
) -> bare_iommu::shared::SharedDomain<bare_iommu::pgtable::arm::ArmStage1, M> {
    let cfg = bare_iommu::DomainConfig {
        id: 1,
        levels: 3,
        aperture_start: 1 << 20,
        aperture_end: end,
        coherent_walk: true,
    };
    let dom = bare_iommu::Domain::new(bare_iommu::pgtable::arm::ArmStage1, mem, cfg).unwrap();
    bare_iommu::shared::SharedDomain::new(dom)
}
