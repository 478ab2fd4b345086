//! The one lent-memory scheme every contender gets: a pre-allocated arena of
//! 4 KiB pages with a fixed "physical" base, an offset mapping between
//! physical and virtual addresses, a bump pointer and a free stack.
//!
//! Handing out a page costs a few instructions (a pop or a bump), so table
//! allocation does not dominate any measurement. Pages are zero when handed
//! out: the bump region is zeroed by [`Arena::reset`] outside the timed
//! region, and a page taken from the free stack is zeroed when reused (as a
//! real lender would).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, Ordering};

use bare_iommu::{PhysAddr, TableMemory};

/// Physical address of the arena's first page (what the contenders see):
/// low enough that `virtual - physical` never wraps, wherever the host
/// (or valgrind) places the arena.
pub const PHYS_BASE: u64 = 0x10_0000;
const PAGE: usize = 4096;

/// A fixed pool of zeroed 4 KiB pages.
pub struct Arena {
    base: *mut u8,
    pages: usize,
    next: Cell<usize>,
    high: Cell<usize>,
    free: RefCell<Vec<u32>>,
    live: Cell<usize>,
}

impl Arena {
    /// An arena of `pages` pages.
    pub fn new(pages: usize) -> Self {
        let layout = Layout::from_size_align(pages * PAGE, PAGE).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(layout) };
        assert!(!base.is_null() && base as u64 >= PHYS_BASE);
        Self {
            base,
            pages,
            next: Cell::new(0),
            high: Cell::new(0),
            // Reserved up front: pushing a freed page never allocates.
            free: RefCell::new(Vec::with_capacity(pages)),
            live: Cell::new(0),
        }
    }

    /// Forgets every page handed out and zeroes what was used: call it only
    /// when nothing refers to the arena's pages any more.
    pub fn reset(&self) {
        // SAFETY: `[base, base + high pages)` lies inside the arena.
        unsafe { self.base.write_bytes(0, self.high.get() * PAGE) };
        self.next.set(0);
        self.high.set(0);
        self.free.borrow_mut().clear();
        self.live.set(0);
    }

    /// Pages currently handed out.
    pub fn live(&self) -> usize {
        self.live.get()
    }

    /// One zeroed page: its physical address.
    #[inline]
    pub fn alloc_page(&self) -> Option<u64> {
        let idx = match self.free.borrow_mut().pop() {
            Some(i) => {
                let i = i as usize;
                // SAFETY: page `i` is inside the arena and no longer lent.
                unsafe { self.base.add(i * PAGE).write_bytes(0, PAGE) };
                i
            }
            None => {
                let i = self.next.get();
                if i == self.pages {
                    return None;
                }
                self.next.set(i + 1);
                self.high.set(self.high.get().max(i + 1));
                i
            }
        };
        self.live.set(self.live.get() + 1);
        Some(PHYS_BASE + (idx * PAGE) as u64)
    }

    /// Takes back the page at `pa`.
    #[inline]
    pub fn free_page(&self, pa: u64) {
        let idx = ((pa - PHYS_BASE) as usize) / PAGE;
        debug_assert!(idx < self.pages);
        self.free.borrow_mut().push(idx as u32);
        self.live.set(self.live.get() - 1);
    }

    /// The CPU address of physical address `pa`.
    #[inline]
    pub fn virt(&self, pa: u64) -> *mut u8 {
        self.base.wrapping_add((pa - PHYS_BASE) as usize)
    }

    /// The offset virtual = physical + offset.
    pub fn offset(&self) -> u64 {
        (self.base as u64).wrapping_sub(PHYS_BASE)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.pages * PAGE, PAGE).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.base, layout) };
    }
}

// SAFETY: pages are zeroed when handed out, 4 KiB aligned, lent until freed,
// and `phys_to_virt` maps every lent page to its arena memory. Only
// single-page blocks are lent (all the page table asks for).
unsafe impl TableMemory for Arena {
    #[inline]
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if pages != 1 {
            return None;
        }
        self.alloc_page().map(PhysAddr)
    }

    #[inline]
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        debug_assert_eq!(pages, 1);
        self.free_page(pa.0)
    }

    #[inline]
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.virt(pa.0)
    }
}

/// The same arena behind the `&mut self` allocator traits of the peers.
pub struct ArenaRef<'a>(pub &'a Arena);

impl<A: aarch64_paging::descriptor::PagingAttributes> aarch64_paging::paging::Translation<A>
    for ArenaRef<'_>
{
    #[inline]
    fn allocate_table(
        &mut self,
    ) -> (
        NonNull<aarch64_paging::paging::PageTable<A>>,
        aarch64_paging::descriptor::PhysicalAddress,
    ) {
        let pa = self.0.alloc_page().expect("bench arena exhausted");
        (
            self.physical_to_virtual(aarch64_paging::descriptor::PhysicalAddress(pa as usize)),
            aarch64_paging::descriptor::PhysicalAddress(pa as usize),
        )
    }

    #[inline]
    unsafe fn deallocate_table(
        &mut self,
        page_table: NonNull<aarch64_paging::paging::PageTable<A>>,
    ) {
        let pa = (page_table.as_ptr() as u64).wrapping_sub(self.0.offset());
        self.0.free_page(pa)
    }

    #[inline]
    fn physical_to_virtual(
        &self,
        pa: aarch64_paging::descriptor::PhysicalAddress,
    ) -> NonNull<aarch64_paging::paging::PageTable<A>> {
        NonNull::new(self.0.virt(pa.0 as u64).cast()).unwrap()
    }
}

// SAFETY: every frame handed out is an unused arena page.
unsafe impl x86_64::structures::paging::FrameAllocator<x86_64::structures::paging::Size4KiB>
    for ArenaRef<'_>
{
    #[inline]
    fn allocate_frame(
        &mut self,
    ) -> Option<x86_64::structures::paging::PhysFrame<x86_64::structures::paging::Size4KiB>> {
        let pa = self.0.alloc_page()?;
        Some(x86_64::structures::paging::PhysFrame::containing_address(
            x86_64::PhysAddr::new(pa),
        ))
    }
}

/// The arena as a lender that zeroes every page it lends, inside the timed
/// region (as `x86_64` and `page_table_multiarch` zero their new tables):
/// ours measured with the same zeroing work as those peers.
pub struct Zeroing<'a>(pub &'a Arena);

// SAFETY: as for `Arena`; the page is zeroed again before it is lent.
unsafe impl TableMemory for Zeroing<'_> {
    #[inline]
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if pages != 1 {
            return None;
        }
        let pa = self.0.alloc_page()?;
        // SAFETY: a whole arena page, lent to nobody else.
        unsafe { self.0.virt(pa).write_bytes(0, PAGE) };
        Some(PhysAddr(pa))
    }

    #[inline]
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        debug_assert_eq!(pages, 1);
        self.0.free_page(pa.0)
    }

    #[inline]
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.0.virt(pa.0)
    }
}

/// The arena behind `page_table_multiarch`'s `PagingHandler`, whose methods
/// take no `self`: the arena is lent through a process-wide pointer (the
/// bench is single-threaded), one relaxed load per call.
pub struct ArenaHandler;

static LENT: AtomicPtr<Arena> = AtomicPtr::new(std::ptr::null_mut());

impl ArenaHandler {
    /// Makes `arena` the one the handler lends from.
    pub fn lend(arena: &Arena) {
        LENT.store(arena as *const Arena as *mut Arena, Ordering::Relaxed);
    }

    #[inline]
    fn arena() -> &'static Arena {
        // SAFETY: set by `lend` to the arena that outlives every table made
        // from it (the bench's one arena lives for the whole process).
        unsafe { &*LENT.load(Ordering::Relaxed) }
    }
}

impl page_table_multiarch::PagingHandler for ArenaHandler {
    #[inline]
    fn alloc_frames(num: usize, _align: usize) -> Option<memory_addr::PhysAddr> {
        if num != 1 {
            return None;
        }
        Self::arena()
            .alloc_page()
            .map(|pa| memory_addr::PhysAddr::from(pa as usize))
    }

    #[inline]
    fn dealloc_frames(paddr: memory_addr::PhysAddr, _num: usize) {
        Self::arena().free_page(paddr.as_usize() as u64)
    }

    #[inline]
    fn phys_to_virt(paddr: memory_addr::PhysAddr) -> memory_addr::VirtAddr {
        memory_addr::VirtAddr::from(Self::arena().virt(paddr.as_usize() as u64) as usize)
    }
}
