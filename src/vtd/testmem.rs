//! Host-test doubles: a memory lender backed by the heap and a register
//! block in ordinary memory.

extern crate std;

use core::cell::Cell;
use std::alloc::{Layout, alloc_zeroed, dealloc};

use super::regs::VtdRegs;
use crate::addr::PhysAddr;
use crate::mem::TableMemory;

/// Fake physical address of the arena's first byte.
const ARENA_PHYS: u64 = 0x10_0000;

/// A bump lender over a heap arena; fake physical addresses start at 1 MiB.
pub struct HostMem {
    ptr: *mut u8,
    layout: Layout,
    next: Cell<usize>,
}

impl HostMem {
    /// An arena of `pages` pages.
    pub fn new(pages: usize) -> Self {
        let layout = Layout::from_size_align(pages * 4096, 1 << 16).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self {
            ptr,
            layout,
            next: Cell::new(0),
        }
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: hands out disjoint, zeroed, size-aligned blocks of the arena.
unsafe impl TableMemory for HostMem {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let size = pages.next_power_of_two() * 4096;
        let start = self.next.get().next_multiple_of(size);
        if start + pages * 4096 > self.layout.size() {
            return None;
        }
        self.next.set(start + pages * 4096);
        Some(PhysAddr(ARENA_PHYS + start as u64))
    }
    unsafe fn free(&self, _pa: PhysAddr, _pages: usize) {}
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.ptr.wrapping_add((pa.0 - ARENA_PHYS) as usize)
    }
    /// Nothing reads this memory but the tests, through the CPU's view.
    fn can_clean(&self) -> bool {
        true
    }
}

/// A VT-d register block in memory: reads return what was last written.
pub struct FakeRegs {
    ptr: *mut u8,
}

impl FakeRegs {
    const LAYOUT: Layout = match Layout::from_size_align(4096, 4096) {
        Ok(l) => l,
        Err(_) => panic!(),
    };

    /// A zeroed block.
    pub fn new() -> Self {
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(Self::LAYOUT) };
        assert!(!ptr.is_null());
        Self { ptr }
    }

    /// The block as the driver sees it.
    pub fn get(&self) -> &VtdRegs {
        // SAFETY: 4 KiB, aligned, zero-initialised; every field is a plain integer.
        unsafe { &*self.ptr.cast::<VtdRegs>() }
    }

    /// Base address, for `Vtd::new`.
    pub fn base(&self) -> usize {
        self.ptr as usize
    }

    /// Plays the hardware: sets a 32-bit register.
    pub fn set_u32(&self, off: usize, v: u32) {
        // SAFETY: inside the block, aligned.
        unsafe { self.ptr.add(off).cast::<u32>().write_volatile(v) }
    }

    /// Plays the hardware: sets a 64-bit register.
    pub fn set_u64(&self, off: usize, v: u64) {
        // SAFETY: inside the block, aligned.
        unsafe { self.ptr.add(off).cast::<u64>().write_volatile(v) }
    }

    /// Reads a 32-bit register.
    pub fn get_u32(&self, off: usize) -> u32 {
        // SAFETY: inside the block, aligned.
        unsafe { self.ptr.add(off).cast::<u32>().read_volatile() }
    }
}

/// A register block with what QEMU's intel-iommu advertises: VER 1.0 and
/// its CAP / ECAP values.
pub fn qemu_like() -> FakeRegs {
    let r = FakeRegs::new();
    r.set_u32(0x00, 0x10);
    r.set_u64(0x08, 0x00d2_008c_222f_0606);
    r.set_u64(0x10, 0xf0_0f4a);
    r
}

impl Drop for FakeRegs {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, Self::LAYOUT) };
    }
}
