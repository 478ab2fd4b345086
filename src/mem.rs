//! Lent memory: how the crate gets table memory from its user.
//!
//! The crate never allocates on its own. Page tables, stream tables, context
//! tables and queues all come from a [`TableMemory`] the user implements; the
//! crate never assumes an identity map either: every access to table memory
//! goes through [`TableMemory::phys_to_virt`].

use crate::addr::PhysAddr;

/// Memory lent to the crate for IOMMU tables and queues.
///
/// # Safety
///
/// An implementation must hand out memory that nothing else uses until it is
/// given back with [`free`](TableMemory::free), that is zeroed, and that is
/// aligned as documented on [`alloc_zeroed`](TableMemory::alloc_zeroed);
/// `phys_to_virt` must return a pointer valid for reads and writes of every
/// byte of every block handed out and not yet freed (the crate may keep a
/// pointer it got for a block and use it until it frees the block).
///
/// # Example
///
/// A lender over a fixed pool of pages, as a bare-metal user without an
/// allocator would write it (physical address = pointer value: an identity
/// map). It hands out single pages only, which is all a [`Domain`]'s page
/// tables need; the drivers' queues and stream tables ask for larger blocks.
///
/// [`Domain`]: crate::Domain
///
/// ```
/// use core::cell::{Cell, UnsafeCell};
/// use bare_iommu::pgtable::arm::ArmStage2;
/// use bare_iommu::testing::RecordingBackend;
/// use bare_iommu::{DmaDirection, Domain, DomainConfig, MapAttrs, PhysAddr, TableMemory};
///
/// #[repr(C, align(4096))]
/// struct Page(UnsafeCell<[u8; 4096]>);
///
/// struct Pool {
///     pages: [Page; 8],
///     used: Cell<u8>, // one bit per page
/// }
///
/// impl Pool {
///     fn new() -> Self {
///         Pool { pages: core::array::from_fn(|_| Page(UnsafeCell::new([0; 4096]))), used: Cell::new(0) }
///     }
///     fn index(&self, pa: PhysAddr) -> Option<usize> {
///         let base = self.pages.as_ptr() as u64;
///         let i = usize::try_from(pa.0.checked_sub(base)? / 4096).ok()?;
///         (i < self.pages.len()).then_some(i)
///     }
/// }
///
/// // SAFETY: each page is lent to one owner until freed, zeroed when lent,
/// // 4 KiB aligned (only single pages are lent), and `phys_to_virt` returns
/// // a pointer into the pool, valid while the pool lives.
/// unsafe impl TableMemory for Pool {
///     fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
///         if pages != 1 {
///             return None; // no contiguous blocks in this pool
///         }
///         let i = (0..self.pages.len()).find(|i| self.used.get() & (1 << i) == 0)?;
///         self.used.set(self.used.get() | 1 << i);
///         let p = self.pages[i].0.get();
///         // SAFETY: the page is free, so nothing else refers to it.
///         unsafe { p.write_bytes(0, 1) };
///         Some(PhysAddr(p as u64))
///     }
///     unsafe fn free(&self, pa: PhysAddr, _pages: usize) {
///         if let Some(i) = self.index(pa) {
///             self.used.set(self.used.get() & !(1 << i));
///         }
///     }
///     fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
///         pa.0 as *mut u8
///     }
/// }
///
/// # fn main() -> Result<(), bare_iommu::DmaError> {
/// let pool = Pool::new();
/// let mut iommu = RecordingBackend::new();
/// let cfg = DomainConfig { id: 7, levels: 3, aperture_start: 0, aperture_end: 1 << 30, coherent_walk: true };
/// // Lend by reference: `&Pool` is a `TableMemory` too.
/// let mut dom = Domain::new(ArmStage2, &pool, cfg)?;
/// let mut tx = dom.try_alloc(4096, u64::MAX)?.into_iova().unwrap();
/// dom.link(&mut tx, PhysAddr(0x4000_0000), 0, 4096, DmaDirection::ToDevice, MapAttrs::empty())?;
/// // Root, one level-2 and one leaf table: nothing else (the valid-entry
/// // counts live in bits of the table pointers the IOMMU ignores).
/// assert_eq!(pool.used.get().count_ones(), 3);
/// dom.destroy(tx, &mut iommu)?;
/// // Devices detached: the whole domain goes back to the pool.
/// dom.teardown(&mut iommu).map_err(|(_, e)| e)?;
/// assert_eq!(pool.used.get(), 0);
/// # Ok(()) }
/// ```
pub unsafe trait TableMemory {
    /// A zeroed, physically contiguous block of `pages` 4 KiB pages, aligned to
    /// its size rounded up to a power of two (so one page is 4 KiB aligned, a
    /// 4-page queue 16 KiB aligned). `None` when the lender has no memory left.
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr>;

    /// Gives back a block from [`alloc_zeroed`](TableMemory::alloc_zeroed).
    ///
    /// # Safety
    ///
    /// `pa` and `pages` must be exactly those of one earlier allocation, and the
    /// IOMMU must no longer be able to read the block.
    unsafe fn free(&self, pa: PhysAddr, pages: usize);

    /// A CPU pointer to physical address `pa` inside a block handed out.
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8;

    /// Makes CPU writes to `[pa, pa + len)` visible to a table walker that does
    /// not snoop CPU caches (SMMU `IDR0.COHACC == 0`, VT-d `ECAP.C == 0`).
    /// The default does nothing, which is right for coherent walkers.
    fn clean(&self, pa: PhysAddr, len: usize) {
        let _ = (pa, len);
    }

    /// Drops CPU cache lines of `[pa, pa + len)` so the CPU reads what a
    /// non-coherent IOMMU wrote there (event queue records, fault records,
    /// completion status). The default does nothing, right for coherent IOMMUs.
    fn invalidate(&self, pa: PhysAddr, len: usize) {
        let _ = (pa, len);
    }

    /// Whether [`clean`](TableMemory::clean) really writes CPU cache lines back
    /// to the point of coherency. The drivers refuse, with
    /// [`BackendError::LenderCannotClean`](crate::error::BackendError::LenderCannotClean),
    /// to run a non-coherent table walker over a lender that cannot: the
    /// hardware would read stale tables. The default is `false`, right for a
    /// lender that only serves coherent walkers.
    fn can_clean(&self) -> bool {
        false
    }

    /// Hook for ordering recorders in tests: the crate calls it right after
    /// each write barrier it issues to order table or queue writes made through
    /// this lender before later writes. Real lenders keep the default (nothing).
    #[doc(hidden)]
    fn observe_barrier(&self) {}
}

// SAFETY: forwards every call to `T`, which upholds the contract.
unsafe impl<T: TableMemory + ?Sized> TableMemory for &T {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        (**self).alloc_zeroed(pages)
    }
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        // SAFETY: the caller's obligations are passed on unchanged.
        unsafe { (**self).free(pa, pages) }
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        (**self).phys_to_virt(pa)
    }
    fn clean(&self, pa: PhysAddr, len: usize) {
        (**self).clean(pa, len)
    }
    fn invalidate(&self, pa: PhysAddr, len: usize) {
        (**self).invalidate(pa, len)
    }
    fn can_clean(&self) -> bool {
        (**self).can_clean()
    }
    fn observe_barrier(&self) {
        (**self).observe_barrier()
    }
}

/// A [`TableMemory`] over the global allocator, for hosts that have one and
/// identity-map physical memory (physical address = pointer value), such as
/// a hypervisor running with the MMU off or with a 1:1 map.
#[cfg(feature = "alloc")]
#[cfg_attr(docsrs, doc(cfg(feature = "alloc")))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GlobalAllocMemory;

#[cfg(feature = "alloc")]
impl GlobalAllocMemory {
    fn layout(pages: usize) -> Option<core::alloc::Layout> {
        let size = pages.checked_mul(crate::addr::PAGE_SIZE as usize)?;
        let align = pages
            .checked_next_power_of_two()?
            .checked_mul(crate::addr::PAGE_SIZE as usize)?;
        core::alloc::Layout::from_size_align(size, align).ok()
    }
}

// SAFETY: blocks come zeroed from the global allocator with the documented
// alignment and stay valid until `free`; the identity map is the documented
// requirement for using this lender.
#[cfg(feature = "alloc")]
unsafe impl TableMemory for GlobalAllocMemory {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if pages == 0 {
            return None;
        }
        let layout = Self::layout(pages)?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!p.is_null()).then_some(PhysAddr(p as u64))
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        if let Some(layout) = Self::layout(pages) {
            // SAFETY: the caller hands back a block from `alloc_zeroed(pages)`,
            // which used this same layout.
            unsafe { alloc::alloc::dealloc(pa.0 as *mut u8, layout) }
        }
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as *mut u8
    }

    /// Writes the lines of `[pa, pa + len)` back to the point of coherency
    /// (Arm `DC CVAC` per line, then `DSB SY`; x86-64 `CLFLUSH` per line,
    /// then `MFENCE`), so a walker that does not snoop reads what the CPU
    /// wrote. Nothing on other architectures ([`can_clean`](Self::can_clean)
    /// says so).
    fn clean(&self, pa: PhysAddr, len: usize) {
        if len == 0 {
            return;
        }
        let end = pa.0.saturating_add(len as u64);
        #[cfg(target_arch = "aarch64")]
        {
            let ctr: u64;
            // SAFETY: CTR_EL0 is readable at EL0 and above (SCTLR_EL1.UCT
            // aside, which only concerns EL0 and traps rather than misbehaves)
            // and reading it has no side effect.
            unsafe {
                core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags));
            }
            // DminLine, bits [19:16]: log2 of the smallest data line in words.
            let line = 4u64 << ((ctr >> 16) & 0xf);
            let mut a = pa.0 & !(line - 1);
            while a < end {
                // SAFETY: `a` lies in a block this lender handed out (the
                // identity map makes it a valid virtual address); a clean
                // only writes a dirty line back, it changes no data.
                unsafe {
                    core::arch::asm!("dc cvac, {}", in(reg) a, options(nostack, preserves_flags));
                }
                a += line;
            }
            // SAFETY: waits for the cleans above to complete; touches nothing.
            unsafe {
                core::arch::asm!("dsb sy", options(nostack, preserves_flags));
            }
        }
        #[cfg(target_arch = "x86_64")]
        {
            // CLFLUSH flushes at least 64 bytes on every x86-64 CPU
            // (CPUID.1:EBX[15:8] × 8 is 64 on all of them in practice).
            const LINE: u64 = 64;
            let mut a = pa.0 & !(LINE - 1);
            while a < end {
                // SAFETY: `a` lies in a block this lender handed out (the
                // identity map makes it a valid pointer); CLFLUSH writes the
                // line back and drops it, the data is unchanged.
                unsafe {
                    core::arch::asm!("clflush [{}]", in(reg) a, options(nostack, preserves_flags));
                }
                a += LINE;
            }
            // SAFETY: orders the flushes before later stores (the doorbell).
            unsafe {
                core::arch::asm!("mfence", options(nostack, preserves_flags));
            }
        }
        #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
        let _ = end;
    }

    fn can_clean(&self) -> bool {
        cfg!(any(target_arch = "aarch64", target_arch = "x86_64"))
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;

    #[test]
    fn global_alloc_memory_is_zeroed_and_size_aligned() {
        let m = GlobalAllocMemory;
        let pa = m.alloc_zeroed(3).unwrap();
        assert_eq!(pa.0 % (4 * crate::addr::PAGE_SIZE), 0);
        // SAFETY: three pages were just lent to us.
        let bytes = unsafe { core::slice::from_raw_parts(m.phys_to_virt(pa), 3 * 4096) };
        assert!(bytes.iter().all(|&b| b == 0));
        // SAFETY: the block from above, never given to hardware.
        unsafe { m.free(pa, 3) };
    }

    #[test]
    fn global_alloc_memory_cleans_without_changing_data() {
        let m = GlobalAllocMemory;
        let pa = m.alloc_zeroed(1).unwrap();
        // SAFETY: one page was just lent to us.
        unsafe { m.phys_to_virt(pa).add(100).write(0xab) };
        m.clean(pa, crate::addr::PAGE_SIZE as usize);
        m.clean(PhysAddr(pa.0 + 63), 2);
        // SAFETY: as above.
        assert_eq!(unsafe { m.phys_to_virt(pa).add(100).read() }, 0xab);
        assert!(m.can_clean());
        // SAFETY: the block from above, never given to hardware.
        unsafe { m.free(pa, 1) };
    }
}
