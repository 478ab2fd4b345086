//! Memory the board lends: IOMMU table pages ([`BoardMemory`] implements
//! [`TableMemory`]), DMA buffer pages for tests, and a 2 MiB-aligned 4 MiB
//! region for superpage tests. Physical = virtual (the boot identity map).
//!
//! The pools live in `.bss.pools`, which boot does not zero: every block is
//! zeroed when it is handed out.

use bare_iommu::{PAGE_SIZE, PhysAddr, TableMemory};
pub use board_common::pattern::{Mismatch, pattern};
use board_common::pattern::{check_with, fill_with};
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;

const PAGE: usize = PAGE_SIZE as usize;
/// Table pool: 8 MiB.
const TABLE_PAGES: usize = 2048;
/// DMA buffer pool: 4 MiB.
const DMA_PAGES: usize = 1024;
/// Length of the superpage region.
pub const SUPERPAGE_REGION_LEN: usize = 4 << 20;
const SIZE_2M: usize = 2 << 20;

/// Backing store of a pool, 2 MiB aligned so blocks up to 2 MiB are naturally aligned.
#[repr(C, align(0x200000))]
struct Area<const BYTES: usize>(UnsafeCell<[u8; BYTES]>);

// SAFETY: the bytes are only reached through raw pointers handed out by the
// pool allocators, which give each block to one owner at a time.
unsafe impl<const BYTES: usize> Sync for Area<BYTES> {}

impl<const BYTES: usize> Area<BYTES> {
    const fn new() -> Self {
        Self(UnsafeCell::new([0; BYTES]))
    }
    fn base(&self) -> usize {
        self.0.get() as usize
    }
}

#[unsafe(link_section = ".bss.pools")]
static TABLE_AREA: Area<{ TABLE_PAGES * PAGE }> = Area::new();
#[unsafe(link_section = ".bss.pools")]
static DMA_AREA: Area<{ DMA_PAGES * PAGE }> = Area::new();
#[unsafe(link_section = ".bss.pools")]
static SUPERPAGE_AREA: Area<SUPERPAGE_REGION_LEN> = Area::new();

/// First-fit page allocator over `PAGES` pages with a used-bitmap; a block of
/// `n` pages is aligned (physically) to `n` rounded up to a power of two.
struct PagePool<const PAGES: usize, const WORDS: usize> {
    used: [u64; WORDS],
    /// Length in pages of the block starting at each page (0: no block starts here).
    block_len: [u16; PAGES],
    in_use: usize,
    bad_frees: usize,
}

impl<const PAGES: usize, const WORDS: usize> PagePool<PAGES, WORDS> {
    const fn new() -> Self {
        Self {
            used: [0; WORDS],
            block_len: [0; PAGES],
            in_use: 0,
            bad_frees: 0,
        }
    }

    fn is_used(&self, i: usize) -> bool {
        self.used
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: usize, on: bool) {
        if let Some(w) = self.used.get_mut(i / 64) {
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    /// Index of the first page of a free block of `n` pages whose address
    /// (`base + index * PAGE`) is aligned to `n.next_power_of_two()` pages.
    fn alloc(&mut self, base: usize, n: usize) -> Option<usize> {
        if n == 0 || n > PAGES || n > usize::from(u16::MAX) {
            return None;
        }
        let align = n.next_power_of_two() * PAGE;
        let first = base.next_multiple_of(align);
        let mut start = (first - base) / PAGE;
        while start + n <= PAGES {
            if let Some(busy) = (start..start + n).find(|&i| self.is_used(i)) {
                // Skip past the busy page to the next aligned start.
                let next = base + (busy + 1) * PAGE;
                start = (next.next_multiple_of(align) - base) / PAGE;
                continue;
            }
            for i in start..start + n {
                self.set(i, true);
            }
            self.block_len[start] = n as u16;
            self.in_use += n;
            return Some(start);
        }
        None
    }

    /// Gives back block `start` of `n` pages; counts a bad free (and changes
    /// nothing) unless exactly that block is allocated.
    fn free(&mut self, start: usize, n: usize) -> bool {
        let ok = start < PAGES
            && n != 0
            && usize::from(self.block_len[start]) == n
            && (start..start + n).all(|i| self.is_used(i));
        if !ok {
            self.bad_frees += 1;
            return false;
        }
        for i in start..start + n {
            self.set(i, false);
        }
        self.block_len[start] = 0;
        self.in_use -= n;
        true
    }
}

/// The board's lent memory. One static instance: [`MEMORY`].
pub struct BoardMemory {
    tables: Mutex<PagePool<TABLE_PAGES, { TABLE_PAGES / 64 }>>,
    dma: Mutex<PagePool<DMA_PAGES, { DMA_PAGES / 64 }>>,
}

/// The board's lent memory.
pub static MEMORY: BoardMemory = BoardMemory {
    tables: Mutex::new(PagePool::new()),
    dma: Mutex::new(PagePool::new()),
};

impl BoardMemory {
    fn table_base(&self) -> usize {
        TABLE_AREA.base()
    }

    fn dma_base(&self) -> usize {
        DMA_AREA.base()
    }

    /// Table pages currently lent out.
    pub fn table_pages_in_use(&self) -> usize {
        self.tables.lock().in_use
    }

    /// Frees of table pages that did not match an allocation, since the last call.
    pub fn take_bad_frees(&self) -> usize {
        core::mem::take(&mut self.tables.lock().bad_frees)
    }

    /// Physical range `[start, end)` of the table pool.
    pub fn table_pool_range(&self) -> (u64, u64) {
        let b = self.table_base() as u64;
        (b, b + (TABLE_PAGES * PAGE) as u64)
    }

    /// `n` zeroed, contiguous DMA buffer pages, aligned like table blocks.
    pub fn dma_pages(&self, n: usize) -> Option<PhysAddr> {
        let base = self.dma_base();
        let start = self.dma.lock().alloc(base, n)?;
        let pa = base + start * PAGE;
        // SAFETY: the block was just handed to us alone, inside DMA_AREA.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, n * PAGE) };
        Some(PhysAddr(pa as u64))
    }

    /// Gives back `n` DMA pages from [`dma_pages`](Self::dma_pages); `false`
    /// (and nothing freed) if they are not exactly one allocation.
    pub fn free_dma_pages(&self, pa: PhysAddr, n: usize) -> bool {
        let base = self.dma_base() as u64;
        let Some(off) = pa.0.checked_sub(base) else {
            return false;
        };
        if off % PAGE_SIZE != 0 {
            return false;
        }
        self.dma.lock().free((off / PAGE_SIZE) as usize, n)
    }

    /// DMA pages currently handed out.
    pub fn dma_pages_in_use(&self) -> usize {
        self.dma.lock().in_use
    }

    /// The 4 MiB, 2 MiB-aligned region for superpage tests (one user at a time).
    pub fn superpage_region(&self) -> PhysAddr {
        let pa = SUPERPAGE_AREA.base();
        debug_assert!(pa.is_multiple_of(SIZE_2M));
        PhysAddr(pa as u64)
    }

    /// Pointer to `[pa, pa + len)` if the range lies inside one board-owned
    /// pool (table, DMA or superpage); `None` otherwise.
    fn owned(&self, pa: PhysAddr, len: usize) -> Option<*mut u8> {
        let start = usize::try_from(pa.0).ok()?;
        let end = start.checked_add(len)?;
        let areas = [
            (TABLE_AREA.base(), TABLE_PAGES * PAGE),
            (DMA_AREA.base(), DMA_PAGES * PAGE),
            (SUPERPAGE_AREA.base(), SUPERPAGE_REGION_LEN),
        ];
        areas
            .iter()
            .any(|&(b, l)| start >= b && end <= b + l)
            .then_some(start as *mut u8)
    }

    /// Writes `data` at physical `pa` (board-owned memory only).
    pub fn write(&self, pa: PhysAddr, data: &[u8]) -> Result<(), Mismatch> {
        let p = self.owned(pa, data.len()).ok_or(outside(pa))?;
        for (i, &b) in data.iter().enumerate() {
            // SAFETY: `owned` checked the range lies in a pool of this board.
            unsafe { write_volatile(p.add(i), b) };
        }
        Ok(())
    }

    /// Reads `out.len()` bytes at physical `pa` (board-owned memory only).
    pub fn read(&self, pa: PhysAddr, out: &mut [u8]) -> Result<(), Mismatch> {
        let p = self.owned(pa, out.len()).ok_or(outside(pa))?;
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: as in `write`; volatile because devices write behind our back.
            *b = unsafe { read_volatile(p.add(i)) };
        }
        Ok(())
    }

    /// Fills `[pa, pa + len)` with [`pattern`]`(seed, i)`.
    pub fn fill_pattern(&self, pa: PhysAddr, len: usize, seed: u8) -> Result<(), Mismatch> {
        let p = self.owned(pa, len).ok_or(outside(pa))?;
        // SAFETY: as in `write`.
        unsafe { fill_with(p, len, |i| pattern(seed, i)) };
        Ok(())
    }

    /// Fills `[pa, pa + len)` with `byte`.
    pub fn fill(&self, pa: PhysAddr, len: usize, byte: u8) -> Result<(), Mismatch> {
        let p = self.owned(pa, len).ok_or(outside(pa))?;
        // SAFETY: as in `write`.
        unsafe { fill_with(p, len, |_| byte) };
        Ok(())
    }

    /// Checks `[pa, pa + len)` holds [`pattern`]`(seed, i)`; the first
    /// difference otherwise.
    pub fn check_pattern(&self, pa: PhysAddr, len: usize, seed: u8) -> Result<(), Mismatch> {
        let p = self.owned(pa, len).ok_or(outside(pa))?;
        // SAFETY: as in `read`.
        unsafe { check_with(p, pa, len, |i| pattern(seed, i)) }
    }

    /// Checks every byte of `[pa, pa + len)` is `byte`.
    pub fn check_fill(&self, pa: PhysAddr, len: usize, byte: u8) -> Result<(), Mismatch> {
        let p = self.owned(pa, len).ok_or(outside(pa))?;
        // SAFETY: as in `read`.
        unsafe { check_with(p, pa, len, |_| byte) }
    }

    /// Checks `[a, a + len)` and `[b, b + len)` hold the same bytes; the first
    /// difference (address in `b`, expected from `a`) otherwise.
    pub fn compare(&self, a: PhysAddr, b: PhysAddr, len: usize) -> Result<(), Mismatch> {
        let pa = self.owned(a, len).ok_or(outside(a))?;
        let pb = self.owned(b, len).ok_or(outside(b))?;
        // SAFETY: as in `read`, for both ranges.
        unsafe { check_with(pb, b, len, |i| read_volatile(pa.add(i))) }
    }
}

/// The error for a range outside the board's pools (`at` = its start).
fn outside(pa: PhysAddr) -> Mismatch {
    Mismatch {
        at: pa,
        expected: 0,
        got: 0,
    }
}

// SAFETY: blocks come from TABLE_AREA, which nothing else uses; the pool hands
// each page to one allocation at a time, zeroes it, and aligns a block of n
// pages to n rounded up to a power of two (≤ 2 MiB given the area's alignment,
// larger blocks are aligned by the search itself). Identity map: pa is the pointer.
unsafe impl TableMemory for BoardMemory {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let base = self.table_base();
        let start = self.tables.lock().alloc(base, pages)?;
        let pa = base + start * PAGE;
        // SAFETY: the block was just handed to us alone, inside TABLE_AREA.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, pages * PAGE) };
        Some(PhysAddr(pa as u64))
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        let base = self.table_base() as u64;
        let mut pool = self.tables.lock();
        match pa.0.checked_sub(base) {
            Some(off) if off % PAGE_SIZE == 0 => {
                pool.free((off / PAGE_SIZE) as usize, pages);
            }
            _ => pool.bad_frees += 1,
        }
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as usize as *mut u8
    }

    /// QEMU's intel-iommu has ECAP.C = 0: the driver refuses a lender that
    /// cannot clean. `clean` below writes every line back with CLFLUSH.
    fn can_clean(&self) -> bool {
        true
    }

    fn clean(&self, pa: PhysAddr, len: usize) {
        let start = pa.0 as usize & !63;
        let end = (pa.0 as usize).saturating_add(len);
        let mut line = start;
        while line < end {
            // SAFETY: `line` lies in a block this lender handed out, which the
            // identity map makes a valid address; CLFLUSH writes the 64-byte
            // line back to memory and evicts it, changing no memory contents.
            unsafe {
                core::arch::asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags))
            };
            line += 64;
        }
        // SAFETY: MFENCE only orders: the flushes complete before later
        // stores (the doorbell that lets the unit read the cleaned lines).
        unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    }
}

/// The lender of the VT-d unit's own structures (root, context and PASID
/// tables, the invalidation queue): the same table pool as [`MEMORY`], with
/// its own count, so the runner can tell the pages a test must give back
/// (its domains') from those the unit keeps for the whole boot.
pub struct DriverMemory {
    held: AtomicUsize,
}

/// The unit's lender (see [`DriverMemory`]).
pub static DRIVER_MEMORY: DriverMemory = DriverMemory {
    held: AtomicUsize::new(0),
};

impl DriverMemory {
    /// Table pages the unit holds.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

// SAFETY: forwards to `MEMORY`, which upholds the contract; only counts.
unsafe impl TableMemory for DriverMemory {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let pa = MEMORY.alloc_zeroed(pages)?;
        self.held.fetch_add(pages, Ordering::Relaxed);
        Some(pa)
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        // SAFETY: the caller's obligations are passed on unchanged.
        unsafe { MEMORY.free(pa, pages) };
        // A bad free is counted (and reported) by `MEMORY`; here it only
        // must not wrap the count.
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(pages))
            });
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        MEMORY.phys_to_virt(pa)
    }

    fn can_clean(&self) -> bool {
        MEMORY.can_clean()
    }

    fn clean(&self, pa: PhysAddr, len: usize) {
        MEMORY.clean(pa, len)
    }
}
