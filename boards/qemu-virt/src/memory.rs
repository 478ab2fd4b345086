//! Memory the board lends: a [`TableMemory`] pool for the IOMMU's tables and
//! queues, a pool of DMA buffer pages for tests, and a 2 MiB-aligned 4 MiB
//! region for block-mapping tests. All three lie in RAM past the image
//! (`link.ld`), are never loaded, and are zeroed when handed out.
//!
//! The MMU is off, so a physical address is its own pointer.

use bare_iommu::addr::PAGE_SIZE;
use bare_iommu::{PhysAddr, TableMemory};
pub use board_common::pattern::{Mismatch, pattern};
use board_common::pattern::{check_with, fill_with};
use spin::Mutex;

/// Bitmap words of the table pool: 32 × 64 pages = 8 MiB.
const TABLE_POOL_WORDS: usize = 32;
/// Bitmap words of the DMA buffer pool: 16 × 64 pages = 4 MiB.
const DMA_POOL_WORDS: usize = 16;
/// Size of the block-mapping region.
pub const BLOCK_REGION_SIZE: u64 = 4 << 20;

unsafe extern "C" {
    static __block_region_start: u8;
    static __table_pool_start: u8;
    static __dma_pool_start: u8;
    static __pools_end: u8;
}

fn block_region_base() -> u64 {
    (&raw const __block_region_start) as u64
}

fn table_pool_base() -> u64 {
    (&raw const __table_pool_start) as u64
}

fn dma_pool_base() -> u64 {
    (&raw const __dma_pool_start) as u64
}

fn pools_end() -> u64 {
    (&raw const __pools_end) as u64
}

/// A run of `WORDS * 64` pages handed out in blocks whose physical address is
/// aligned to their size rounded up to a power of two, tracked by a bitmap
/// (one bit per page).
struct PagePool<const WORDS: usize> {
    name: &'static str,
    base: fn() -> u64,
    used: Mutex<[u64; WORDS]>,
}

impl<const WORDS: usize> PagePool<WORDS> {
    const PAGES: usize = WORDS * 64;

    const fn new(name: &'static str, base: fn() -> u64) -> Self {
        Self {
            name,
            base,
            used: Mutex::new([0; WORDS]),
        }
    }

    fn size(&self) -> u64 {
        Self::PAGES as u64 * PAGE_SIZE
    }

    fn contains(&self, pa: u64, len: u64) -> bool {
        let base = (self.base)();
        pa >= base
            && pa
                .checked_add(len)
                .is_some_and(|end| end <= base + self.size())
    }

    fn bit(map: &[u64; WORDS], page: usize) -> bool {
        map[page / 64] & (1 << (page % 64)) != 0
    }

    fn set(map: &mut [u64; WORDS], first: usize, n: usize, on: bool) {
        for page in first..first + n {
            if on {
                map[page / 64] |= 1 << (page % 64);
            } else {
                map[page / 64] &= !(1 << (page % 64));
            }
        }
    }

    fn alloc(&self, pages: usize) -> Option<PhysAddr> {
        if pages == 0 || pages > Self::PAGES {
            return None;
        }
        // Alignment is of the physical address, not of the index in the pool.
        let align = pages.next_power_of_two();
        let align_bytes = align as u64 * PAGE_SIZE;
        let base = (self.base)();
        let skip = (base.next_multiple_of(align_bytes) - base) / PAGE_SIZE;
        let mut map = self.used.lock();
        let first = (skip as usize..Self::PAGES).step_by(align).find(|&start| {
            start + pages <= Self::PAGES && !(start..start + pages).any(|p| Self::bit(&map, p))
        })?;
        Self::set(&mut map, first, pages, true);
        drop(map);
        let pa = base + first as u64 * PAGE_SIZE;
        // SAFETY: the pages lie in this pool's RAM (reserved by link.ld, used by
        // nothing else) and were just marked used, so nobody else holds them.
        unsafe { core::ptr::write_bytes(pa as usize as *mut u8, 0, pages * PAGE_SIZE as usize) };
        Some(PhysAddr(pa))
    }

    /// Gives back `pages` pages at `pa`; panics on a block that was not handed
    /// out (a board test should fail loudly on a bad free).
    fn free(&self, pa: PhysAddr, pages: usize) {
        let base = (self.base)();
        let len = pages as u64 * PAGE_SIZE;
        assert!(
            pages > 0 && pa.is_page_aligned() && self.contains(pa.get(), len),
            "{} pool: free of {pages} pages at {pa} outside the pool",
            self.name
        );
        let first = ((pa.get() - base) / PAGE_SIZE) as usize;
        let mut map = self.used.lock();
        assert!(
            (first..first + pages).all(|p| Self::bit(&map, p)),
            "{} pool: free of {pages} pages at {pa} that are not all allocated",
            self.name
        );
        Self::set(&mut map, first, pages, false);
    }

    fn in_use(&self) -> usize {
        self.used
            .lock()
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    fn reset(&self) {
        *self.used.lock() = [0; WORDS];
    }
}

/// The board's memory: see the module docs.
pub struct BoardMemory {
    tables: PagePool<TABLE_POOL_WORDS>,
    dma: PagePool<DMA_POOL_WORDS>,
}

/// The one instance.
pub static MEMORY: BoardMemory = BoardMemory {
    tables: PagePool::new("table", table_pool_base),
    dma: PagePool::new("DMA", dma_pool_base),
};

impl BoardMemory {
    /// Checks that link.ld reserved what this module hands out.
    pub fn check_layout(&self) {
        let tables = table_pool_base();
        assert!(
            tables.is_multiple_of(self.tables.size())
                && block_region_base() == tables + self.tables.size()
                && block_region_base().is_multiple_of(2 << 20)
                && dma_pool_base() == block_region_base() + BLOCK_REGION_SIZE
                && pools_end() == dma_pool_base() + self.dma.size(),
            "link.ld and memory.rs disagree on the pool layout"
        );
    }

    /// Size of the table pool in pages.
    pub fn table_pool_pages(&self) -> usize {
        PagePool::<TABLE_POOL_WORDS>::PAGES
    }

    /// Table pages handed out and not yet freed (to spot leaks).
    pub fn table_pages_in_use(&self) -> usize {
        self.tables.in_use()
    }

    /// `n` zeroed, contiguous DMA buffer pages (aligned to `n` rounded up to a
    /// power of two), or `None` when the pool is exhausted. The runner takes
    /// all of them back after each test; [`free_dma_pages`](Self::free_dma_pages)
    /// gives them back earlier.
    pub fn dma_pages(&self, n: usize) -> Option<PhysAddr> {
        self.dma.alloc(n)
    }

    /// Gives back `n` pages from [`dma_pages`](Self::dma_pages). Panics if
    /// they were not handed out.
    pub fn free_dma_pages(&self, pa: PhysAddr, n: usize) {
        self.dma.free(pa, n)
    }

    /// DMA buffer pages handed out and not yet given back.
    pub fn dma_pages_in_use(&self) -> usize {
        self.dma.in_use()
    }

    /// Takes back every DMA buffer page (between tests).
    pub fn reset_dma_pages(&self) {
        self.dma.reset()
    }

    /// The 4 MiB, 2 MiB-aligned region for block-mapping tests (not zeroed;
    /// one test at a time uses it).
    pub fn block_region(&self) -> (PhysAddr, u64) {
        (PhysAddr(block_region_base()), BLOCK_REGION_SIZE)
    }

    fn check_range(&self, pa: PhysAddr, len: usize) -> *mut u8 {
        let (p, l) = (pa.get(), len as u64);
        let in_block = p >= block_region_base()
            && p.checked_add(l)
                .is_some_and(|e| e <= block_region_base() + BLOCK_REGION_SIZE);
        assert!(
            in_block || self.dma.contains(p, l) || self.tables.contains(p, l),
            "access to {pa}+{len:#x} outside the board's memory"
        );
        p as usize as *mut u8
    }

    /// Fills `[pa, pa + len)` with `byte`. Panics outside the board's memory.
    pub fn fill(&self, pa: PhysAddr, len: usize, byte: u8) {
        let p = self.check_range(pa, len);
        // SAFETY: the range lies in memory the board reserved for tests.
        unsafe { core::ptr::write_bytes(p, byte, len) };
    }

    /// Writes `data` at `pa`. Panics outside the board's memory.
    pub fn write(&self, pa: PhysAddr, data: &[u8]) {
        let p = self.check_range(pa, data.len());
        // SAFETY: the range lies in memory the board reserved for tests and
        // cannot overlap `data`, which lives in the image or on the stack.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// Reads `out.len()` bytes at `pa`. Panics outside the board's memory.
    pub fn read(&self, pa: PhysAddr, out: &mut [u8]) {
        let p = self.check_range(pa, out.len());
        // SAFETY: as for `write`.
        unsafe { core::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
    }

    /// One byte at `pa`. Panics outside the board's memory.
    pub fn byte(&self, pa: PhysAddr) -> u8 {
        let p = self.check_range(pa, 1);
        // SAFETY: as for `write`.
        unsafe { p.read_volatile() }
    }

    /// Fills `[pa, pa + len)` with the pattern of `seed` (see [`pattern`]).
    /// Panics outside the board's memory.
    pub fn fill_pattern(&self, pa: PhysAddr, len: usize, seed: u8) {
        let p = self.check_range(pa, len);
        // SAFETY: the range lies in memory the board reserved for tests.
        unsafe { fill_with(p, len, |i| pattern(seed, i)) }
    }

    /// Checks `[pa, pa + len)` against the pattern of `seed`; the first byte
    /// that differs on failure. Panics outside the board's memory.
    pub fn check_pattern(&self, pa: PhysAddr, len: usize, seed: u8) -> Result<(), Mismatch> {
        let p = self.check_range(pa, len);
        // SAFETY: as for `fill_pattern`.
        unsafe { check_with(p, pa, len, |i| pattern(seed, i)) }
    }

    /// Checks that every byte of `[pa, pa + len)` is `byte`. Panics outside
    /// the board's memory.
    pub fn check_filled(&self, pa: PhysAddr, len: usize, byte: u8) -> Result<(), Mismatch> {
        let p = self.check_range(pa, len);
        // SAFETY: as for `fill_pattern`.
        unsafe { check_with(p, pa, len, |_| byte) }
    }
}

// SAFETY: table blocks come from a pool reserved in link.ld for nothing else,
// are zeroed on allocation, have physical addresses aligned to their size
// rounded up to a power of two (`PagePool::alloc`), and stay reserved until `free`; with the MMU off, `phys_to_virt` is
// the identity and valid for every byte of RAM.
unsafe impl TableMemory for BoardMemory {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        self.tables.alloc(pages)
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        self.tables.free(pa, pages)
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.get() as usize as *mut u8
    }
}
