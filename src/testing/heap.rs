//! A host-test lender over the process heap (physical address = pointer),
//! with a count of the blocks it has out, so tests can see leaks.

extern crate std;

use core::cell::Cell;
use std::alloc::{Layout, alloc_zeroed, dealloc};

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::mem::TableMemory;

/// Heap-backed [`TableMemory`] for host tests: identity "physical" addresses.
#[derive(Debug, Default)]
pub struct HostMemory {
    out: Cell<usize>,
}

impl HostMemory {
    fn layout(pages: usize) -> Option<Layout> {
        let size = pages.checked_mul(PAGE_SIZE as usize)?;
        let align = pages.checked_next_power_of_two()? * PAGE_SIZE as usize;
        Layout::from_size_align(size, align).ok()
    }

    /// Blocks handed out and not yet freed.
    pub fn blocks_out(&self) -> usize {
        self.out.get()
    }
}

// SAFETY: zeroed, size-aligned heap blocks, valid until freed; the pointer is
// the physical address.
unsafe impl TableMemory for HostMemory {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if pages == 0 {
            return None;
        }
        let l = Self::layout(pages)?;
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(l) };
        if p.is_null() {
            return None;
        }
        self.out.set(self.out.get() + 1);
        Some(PhysAddr(p as u64))
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        if let Some(l) = Self::layout(pages) {
            self.out.set(self.out.get().saturating_sub(1));
            // SAFETY: the caller hands back a block of `alloc_zeroed(pages)`.
            unsafe { dealloc(pa.0 as *mut u8, l) }
        }
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as *mut u8
    }
}
