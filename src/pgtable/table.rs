//! The generic radix walker: one I/O page table over a [`PteFormat`].

use super::counts::TableCounts;
use super::{MapAttrs, Pte, PteFormat};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::barrier::wmb_on;
use crate::error::PageTableError;
use crate::mem::TableMemory;

/// Entries per 4 KiB table.
const ENTRIES: usize = 512;
/// Bits of input address resolved per level.
const BITS_PER_LEVEL: u32 = 9;
/// Retired table pages waiting for the next invalidation are kept in a list
/// threaded through the pages themselves, so there is no limit: this is kept
/// for source compatibility and is `usize::MAX`.
pub const RETIRE_CAPACITY: usize = usize::MAX;

/// Table pages detached and waiting for an invalidation and its completion,
/// as a list threaded through the pages: entry 0 of each holds the address of
/// the next one (0 ends the list).
///
/// A retired page's entries are all not-present, and a walker that cached the
/// path to it may still read it until the sync. The link keeps it so: a 4 KiB
/// aligned address has bits 11:0 clear, and every format here reads such an
/// entry as not present (Arm VMSAv8-64: bit 0, valid, clear; VT-d
/// second level: R, W and X, bits 2:0, clear; VT-d first level and x86: P,
/// bit 0, clear). The link goes back to the lender with the page (nothing
/// is stored after the invalidation that lets the page go:
/// [`TableMemory::alloc_zeroed`] zeroes what it hands out).
/// No bookkeeping array, so no capacity: a failed or large unlink never has
/// to leave an empty table attached for lack of room.
struct RetireList {
    head: Option<PhysAddr>,
    len: usize,
}

impl RetireList {
    const fn new() -> Self {
        Self { head: None, len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Adds `pa` (a detached, all-not-present table page lent by `mem`).
    /// Never fails; returns `Result` so the call sites read as before.
    #[allow(clippy::unnecessary_wraps)]
    fn push<M: TableMemory>(&mut self, mem: &M, pa: PhysAddr) -> Result<(), ()> {
        let next = self.head.map_or(0, |h| h.0);
        // SAFETY: `pa` is a whole table page this table lent and just
        // detached; entry 0 is inside it and aligned for a u64.
        unsafe { mem.phys_to_virt(pa).cast::<u64>().write_volatile(next) };
        self.head = Some(pa);
        self.len += 1;
        Ok(())
    }

    /// Cuts the list after its first `keep` pages (`keep >= 1`) and
    /// returns the head of the rest (the older pages), now off the list.
    fn split_after<M: TableMemory>(&mut self, mem: &M, keep: usize) -> Option<PhysAddr> {
        if keep >= self.len {
            return None;
        }
        let mut last = self.head?;
        for _ in 1..keep {
            // SAFETY: as in `pop`: `last` is a retired page still lent to us.
            let next = unsafe { mem.phys_to_virt(last).cast::<u64>().read_volatile() };
            last = PhysAddr(next);
        }
        let p = mem.phys_to_virt(last).cast::<u64>();
        // SAFETY: as in `push`: entry 0 of a retired page holds the link.
        let older = unsafe { p.read_volatile() };
        // SAFETY: as above; the page stays retired, its link now ends the list.
        unsafe { p.write_volatile(0) };
        self.len = keep;
        (older != 0).then_some(PhysAddr(older))
    }

    /// Takes one page off the list (reads only: see the type's docs).
    fn pop<M: TableMemory>(&mut self, mem: &M) -> Option<PhysAddr> {
        let pa = self.head?;
        let p = mem.phys_to_virt(pa).cast::<u64>();
        // SAFETY: as in `push`: `pa` is a retired page still lent to us.
        let next = unsafe { p.read_volatile() };
        self.head = (next != 0).then_some(PhysAddr(next));
        self.len -= 1;
        Some(pa)
    }
}
/// Input address bits one leaf (height-0) table covers: 2 MiB.
const LEAF_TABLE_SHIFT: u32 = 12 + BITS_PER_LEVEL;
/// `leaf_cache` region meaning "nothing cached".
const NO_REGION: u64 = u64::MAX;

/// What an unmap did, so the caller can invalidate precisely.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UnmapOutcome {
    /// Bytes that were mapped and now are not.
    pub bytes: u64,
    /// Table pages were detached (walk caches must be invalidated too).
    pub freed_tables: bool,
}

/// A radix I/O page table with a 4 KiB granule and `levels` levels, whose
/// memory comes from a [`TableMemory`].
///
/// Maps are all-or-nothing: a map that finds a present entry or runs out of
/// table memory leaves the translations as they were. Table pages that become
/// empty on unmap (or that a failed map created) are detached and *retired*:
/// they are handed back to the lender only by
/// [`free_retired`](Self::free_retired), which the caller runs after the
/// IOMMU's caches were invalidated, so a walker can never read a reused page.
///
/// Dropping the table hands nothing back: the IOMMU may still walk it. The
/// pages go back through [`free_all`](Self::free_all) once the caller has
/// invalidated and completed every walk (see `Domain::teardown`).
///
/// Ordering (IHI 0070 §3.21, Linux `arm_lpae_install_table`): a new table is
/// zeroed, cleaned when the walk is not coherent, and ordered by a barrier
/// before the descriptor pointing to it is stored. A valid descriptor is
/// never replaced by another valid one: unmapping part of a block is refused
/// with [`PageTableError::PartialBlock`] instead of splitting it under a
/// live walker (Linux's io-pgtable-arm no longer splits either).
pub struct IoPageTable<F: PteFormat, M: TableMemory> {
    fmt: F,
    mem: M,
    root: PhysAddr,
    levels: u8,
    coherent: bool,
    table_pages: usize,
    retired: RetireList,
    /// Empty tables were left attached because `retired` was full: the next
    /// [`prune_empty`](Self::prune_empty) detaches them.
    stranded: bool,
    /// The last leaf table walked to: (`iova >> LEAF_TABLE_SHIFT`, table).
    /// Lets runs of small maps and unmaps in one 2 MiB region skip the walk
    /// from the root. Forgotten whenever a table page is detached or an
    /// entry above the leaf level is overwritten with a block.
    leaf_cache: (u64, PhysAddr),
    /// Valid entries of upper tables, so unmap needs no scan to find one
    /// empty (see `counts.rs`).
    counts: TableCounts,
}

#[inline]
const fn entry_size(height: u32) -> u64 {
    1u64 << (12 + BITS_PER_LEVEL * height)
}

#[inline]
const fn index(addr: u64, height: u32) -> usize {
    ((addr >> (12 + BITS_PER_LEVEL * height)) & (ENTRIES as u64 - 1)) as usize
}

/// One zeroed table page from the lender, refused when the format could not
/// point at it (above its output size), cleaned for a non-coherent walker.
fn lend_table_page<F: PteFormat, M: TableMemory>(
    fmt: &F,
    mem: &M,
    coherent: bool,
) -> Result<PhysAddr, PageTableError> {
    let t = mem.alloc_zeroed(1).ok_or(PageTableError::OutOfMemory)?;
    if t.0 >> fmt.oa_bits() != 0 {
        // SAFETY: just allocated, never published to hardware.
        unsafe { mem.free(t, 1) };
        return Err(PageTableError::PhysTooLarge { phys: t });
    }
    if !coherent {
        mem.clean(t, PAGE_SIZE as usize);
    }
    Ok(t)
}

/// Shows the format, root, levels and page counts; neither the lender nor
/// the entries (walk them with [`IoPageTable::translate`]).
impl<F: PteFormat, M: TableMemory> core::fmt::Debug for IoPageTable<F, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IoPageTable")
            .field("format", &F::KIND)
            .field("root", &self.root)
            .field("levels", &self.levels)
            .field("coherent", &self.coherent)
            .field("table_pages", &self.table_pages)
            .field("retired_pages", &self.retired.len())
            .field("stranded", &self.stranded)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "defmt")]
impl<F: PteFormat, M: TableMemory> defmt::Format for IoPageTable<F, M> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "IoPageTable {{ format: {}, root: {}, levels: {=u8}, coherent: {=bool}, table_pages: {=usize}, retired_pages: {=usize}, stranded: {=bool} }}",
            F::KIND,
            self.root,
            self.levels,
            self.coherent,
            self.table_pages,
            self.retired.len(),
            self.stranded
        )
    }
}

impl<F: PteFormat, M: TableMemory> IoPageTable<F, M> {
    /// A new, empty table with `levels` levels (2 to 5). `coherent` says
    /// whether the IOMMU's walker snoops CPU caches; when it does not, every
    /// written entry is cleaned through [`TableMemory::clean`].
    ///
    /// # Errors
    ///
    /// - [`PageTableError::BadLevels`]: `levels` is not 2 to 5.
    /// - [`PageTableError::OutOfMemory`]: the lender refused the root page.
    /// - [`PageTableError::PhysTooLarge`]: the lender's page lies above the
    ///   format's output address size (it is given back).
    pub fn new(fmt: F, mem: M, levels: u8, coherent: bool) -> Result<Self, PageTableError> {
        if !(2..=5).contains(&levels) {
            return Err(PageTableError::BadLevels { levels });
        }
        let root = lend_table_page(&fmt, &mem, coherent)?;
        // The zeroed root is visible before its address is handed out (to
        // an STE, a context descriptor or a context entry).
        wmb_on(&mem);
        Ok(Self {
            fmt,
            mem,
            root,
            levels,
            coherent,
            table_pages: 1,
            retired: RetireList::new(),
            stranded: false,
            leaf_cache: (NO_REGION, PhysAddr(0)),
            counts: TableCounts::new(),
        })
    }

    /// Physical address of the root table.
    pub fn root(&self) -> PhysAddr {
        self.root
    }

    /// Number of levels.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Input address bits the table translates: `12 + 9 * levels`.
    pub fn ias_bits(&self) -> u32 {
        12 + BITS_PER_LEVEL * u32::from(self.levels)
    }

    /// The descriptor format.
    pub fn format(&self) -> &F {
        &self.fmt
    }

    /// The lender.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Table pages currently attached (root included).
    pub fn table_pages(&self) -> usize {
        self.table_pages
    }

    /// Table pages detached and waiting for [`free_retired`](Self::free_retired).
    pub fn retired_pages(&self) -> usize {
        self.retired.len()
    }

    fn top_height(&self) -> u32 {
        u32::from(self.levels) - 1
    }

    #[inline]
    fn entry(&self, table: PhysAddr, idx: usize) -> *mut u64 {
        // `idx < 512`, so the offset stays inside the 4 KiB table page.
        self.mem.phys_to_virt(table).cast::<u64>().wrapping_add(idx)
    }

    #[inline]
    fn read(&self, table: PhysAddr, idx: usize) -> u64 {
        // SAFETY: `table` is a table page this walker allocated from the lender
        // and still owns; `idx < 512` keeps the access inside it. Volatile
        // because the IOMMU reads (and may update) the same memory.
        unsafe { self.entry(table, idx).read_volatile() }
    }

    #[inline]
    fn write(&self, table: PhysAddr, idx: usize, val: u64) {
        // SAFETY: as in `read`; a single aligned 64-bit store, so the walker
        // sees the old or the new descriptor, never a mix.
        unsafe { self.entry(table, idx).write_volatile(val) }
    }

    fn clean_entries(&self, table: PhysAddr, lo: usize, hi: usize) {
        if !self.coherent && hi > lo {
            self.mem
                .clean(PhysAddr(table.0 + lo as u64 * 8), (hi - lo) * 8);
        }
    }

    fn alloc_table(&mut self) -> Result<PhysAddr, PageTableError> {
        let t = lend_table_page(&self.fmt, &self.mem, self.coherent)?;
        self.table_pages += 1;
        Ok(t)
    }

    /// Stores in `table[idx]` the pointer to the new table `child`. The
    /// child's zeroed (and cleaned) contents are ordered before the pointer
    /// by a barrier: a walker that follows the pointer must never see the
    /// page's old contents (io-pgtable-arm `arm_lpae_install_table`).
    #[inline]
    fn install_table(&self, table: PhysAddr, idx: usize, child: PhysAddr) {
        wmb_on(&self.mem);
        self.write(table, idx, self.fmt.table(child));
    }

    /// Entry bookkeeping: one entry of `table` (at height `h`) became valid.
    /// Only upper tables are counted; the root never needs to be.
    #[inline]
    fn entry_became_valid(&mut self, table: PhysAddr, h: u32) {
        if h > 0 && table != self.root {
            self.counts.add(table);
        }
    }

    /// One entry of `table` (at height `h`) stopped being valid.
    #[inline]
    fn entry_became_invalid(&mut self, table: PhysAddr, h: u32) {
        if h > 0 && table != self.root {
            self.counts.sub(table);
        }
    }

    /// A table page `t` of height `h` was just attached (empty).
    #[inline]
    fn table_attached(&mut self, t: PhysAddr, h: u32) {
        if h > 0 {
            self.counts.track(t);
        }
    }

    /// Whether `table` (height `h`, not the root) has no valid entry, given
    /// that only entries in `lo..hi` changed since it last had one: at once
    /// from its count when it is counted, else by a scan that looks at the
    /// neighbours of `lo..hi` first.
    #[inline]
    fn became_empty(&self, table: PhysAddr, h: u32, lo: usize, hi: usize) -> bool {
        if h > 0 {
            if let Some(n) = self.counts.get(table) {
                debug_assert_eq!(
                    usize::from(n),
                    self.valid_entries(table, h),
                    "valid-entry count of table {table:?} at height {h} is wrong"
                );
                return n == 0;
            }
        }
        !(self.any_present(table, h, hi, ENTRIES) || self.any_present(table, h, 0, lo.min(hi)))
    }

    /// Valid entries of `table`, by a scan (the debug builds' check of the
    /// counts; one lookup of the page, so tests can count the lookups an
    /// operation makes).
    fn valid_entries(&self, table: PhysAddr, h: u32) -> usize {
        let base = self.mem.phys_to_virt(table).cast::<u64>();
        (0..ENTRIES)
            .filter(|&i| {
                // SAFETY: as in `read`: `i < 512` stays inside the table page.
                let v = unsafe { base.wrapping_add(i).read_volatile() };
                self.present(v, h)
            })
            .count()
    }

    #[inline]
    fn check_range(&self, iova: DmaAddr, len: u64) -> Result<u64, PageTableError> {
        if len == 0 {
            return Err(PageTableError::ZeroLength);
        }
        if !iova.is_page_aligned() {
            return Err(PageTableError::Unaligned { value: iova.0 });
        }
        if len % PAGE_SIZE != 0 {
            return Err(PageTableError::Unaligned { value: len });
        }
        let limit = 1u64 << self.ias_bits();
        match iova.0.checked_add(len) {
            Some(end) if end <= limit => Ok(end),
            _ => Err(PageTableError::OutOfRange { iova, len, limit }),
        }
    }

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` with the largest leaves
    /// the alignment of both and the format allow. All or nothing.
    ///
    /// # Errors
    ///
    /// - [`PageTableError::ZeroLength`]: `len` is 0.
    /// - [`PageTableError::Unaligned`]: `iova` or `len` is not 4 KiB aligned.
    /// - [`PageTableError::OutOfRange`]: `iova + len` overflows or passes
    ///   `1 << ias_bits()`, the end of what the table translates.
    /// - [`PageTableError::Unaligned`] also when `pa` is not 4 KiB aligned.
    /// - [`PageTableError::PhysTooLarge`]: `pa + len` overflows or passes
    ///   the format's output address size.
    /// - [`PageTableError::NoAccess`]: `attrs` grants neither read nor write.
    /// - [`PageTableError::AlreadyMapped`]: a page of the range is mapped
    ///   (the first one found is named).
    /// - [`PageTableError::OutOfMemory`]: the lender refused a table page;
    ///   what was written is taken back.
    ///
    /// On every error the table is as it was.
    #[inline]
    pub fn map(
        &mut self,
        iova: DmaAddr,
        pa: PhysAddr,
        len: u64,
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        let end = self.check_range(iova, len)?;
        if !pa.is_page_aligned() {
            return Err(PageTableError::Unaligned { value: pa.0 });
        }
        if pa.0.checked_add(len).is_none() {
            return Err(PageTableError::PhysTooLarge { phys: pa });
        }
        if !attrs.intersects(MapAttrs::READ | MapAttrs::WRITE) {
            return Err(PageTableError::NoAccess);
        }
        self.map_prechecked(iova.0, pa.0, end, attrs)
    }

    /// Maps `pages.len()` separate 4 KiB physical pages at consecutive
    /// IOVAs from `iova` (a scatter list). All or nothing, like
    /// [`map`](Self::map); one walk per 2 MiB of IOVA, not per page.
    ///
    /// # Errors
    ///
    /// - [`PageTableError::ZeroLength`]: `pages` is empty.
    /// - [`PageTableError::Unaligned`]: `iova` or one of the pages is not
    ///   4 KiB aligned.
    /// - [`PageTableError::OutOfRange`]: the range overflows or passes
    ///   `1 << ias_bits()`, the end of what the table translates.
    /// - [`PageTableError::PhysTooLarge`]: a page lies past the format's
    ///   output address size.
    /// - [`PageTableError::NoAccess`], [`PageTableError::AlreadyMapped`],
    ///   [`PageTableError::OutOfMemory`]: as for [`map`](Self::map).
    ///
    /// On every error the table is as it was.
    pub fn map_pages(
        &mut self,
        iova: DmaAddr,
        pages: &[PhysAddr],
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        let len =
            (pages.len() as u64)
                .checked_mul(PAGE_SIZE)
                .ok_or(PageTableError::OutOfRange {
                    iova,
                    len: u64::MAX,
                    limit: 1u64 << self.ias_bits(),
                })?;
        let end = self.check_range(iova, len)?;
        if !attrs.intersects(MapAttrs::READ | MapAttrs::WRITE) {
            return Err(PageTableError::NoAccess);
        }
        let last_page = (1u64 << self.fmt.oa_bits()) - PAGE_SIZE;
        for p in pages {
            if !p.is_page_aligned() {
                return Err(PageTableError::Unaligned { value: p.0 });
            }
            if p.0 > last_page {
                return Err(PageTableError::PhysTooLarge { phys: *p });
            }
        }
        if let Some(at) = self.first_present(self.root, self.top_height(), iova.0, end) {
            return Err(PageTableError::AlreadyMapped { iova: DmaAddr(at) });
        }
        let bits = self.fmt.leaf(PhysAddr(0), 0, attrs);
        let mut cur = iova.0;
        let mut rest = pages;
        while !rest.is_empty() {
            let table = match self.leaf_table_for_map(cur) {
                Ok((t, _)) => t,
                Err(e) => {
                    self.take_back(iova.0, end);
                    return Err(e);
                }
            };
            let i0 = index(cur, 0);
            let n = (ENTRIES - i0).min(rest.len());
            let (now, later) = rest.split_at(n);
            for (k, p) in now.iter().enumerate() {
                // Every format's page descriptor is its (checked, in-range)
                // output address ORed with attribute bits.
                debug_assert_eq!(self.fmt.leaf(*p, 0, attrs), p.0 | bits);
                self.write(table, i0 + k, p.0 | bits);
            }
            self.clean_entries(table, i0, i0 + n);
            rest = later;
            cur += n as u64 * PAGE_SIZE;
        }
        Ok(())
    }

    /// [`map`](Self::map) for a caller that has already checked that
    /// `[iova, end)` is a non-empty, page-aligned range inside the table's
    /// input range, that `pa` is page aligned with `pa + (end - iova)` not
    /// overflowing, and that `attrs` grants read or write. Only the output
    /// size is checked here. (Debug builds check the rest too.)
    #[inline]
    pub(crate) fn map_prechecked(
        &mut self,
        iova: u64,
        pa: u64,
        end: u64,
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        debug_assert!(self.check_range(DmaAddr(iova), end - iova) == Ok(end));
        debug_assert!(pa % PAGE_SIZE == 0);
        debug_assert!(attrs.intersects(MapAttrs::READ | MapAttrs::WRITE));
        let oa_limit = 1u64 << self.fmt.oa_bits();
        if pa.checked_add(end - iova).is_none_or(|e| e > oa_limit) {
            return Err(PageTableError::PhysTooLarge { phys: PhysAddr(pa) });
        }
        if let Some(done) = self.map_in_leaf_table(iova, pa, end, attrs) {
            return done;
        }
        self.map_general(iova, pa, end, attrs)
    }

    /// [`map`](Self::map) of any shape, arguments checked.
    #[inline(never)]
    fn map_general(
        &mut self,
        iova: u64,
        pa: u64,
        end: u64,
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        if let Some(at) = self.first_present(self.root, self.top_height(), iova, end) {
            return Err(PageTableError::AlreadyMapped { iova: DmaAddr(at) });
        }
        match self.map_rec(self.root, self.top_height(), iova, pa, end, attrs) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Only table memory can run out here (the range was checked
                // empty): take back what was written, including empty tables.
                self.take_back(iova, end);
                Err(e)
            }
        }
    }

    /// Removes what a failed map wrote in `[iova, end)`, empty tables
    /// included. The tables it detaches were briefly reachable, so they are
    /// retired like any other (the caller queues a non-leaf invalidation of
    /// the range): nothing goes back to the lender before the next sync.
    #[cold]
    fn take_back(&mut self, iova: u64, end: u64) {
        let mut out = UnmapOutcome::default();
        self.clear_rec(self.root, self.top_height(), iova, end, true, &mut out);
    }

    /// Whether a descriptor read at `height` is present. Zero is
    /// not-present in every format, which spares the decode on the common
    /// empty entry.
    #[inline]
    fn present(&self, pte: u64, height: u32) -> bool {
        pte != 0 && self.fmt.decode(pte, height) != Pte::Invalid
    }

    /// Whether any entry `lo..hi` of `table` (at height `h`) is present.
    /// Past the first entry, scans four entries per test: most tables being
    /// checked for emptiness are all zeros, and only a non-zero group needs
    /// decoding.
    #[inline]
    fn any_present(&self, table: PhysAddr, h: u32, lo: usize, hi: usize) -> bool {
        // The first entry alone: in a sequential unmap it is the next page.
        if lo >= hi {
            return false;
        }
        if self.present(self.read(table, lo), h) {
            return true;
        }
        let mut i = lo + 1;
        while i + 4 <= hi {
            let any = self.read(table, i)
                | self.read(table, i + 1)
                | self.read(table, i + 2)
                | self.read(table, i + 3);
            if any != 0 && (i..i + 4).any(|j| self.present(self.read(table, j), h)) {
                return true;
            }
            i += 4;
        }
        (i..hi).any(|j| self.present(self.read(table, j), h))
    }

    /// The leaf table covering `iova`, from the cache or by a walk that
    /// creates missing tables; also whether any table was created (then the
    /// leaf table is empty). `AlreadyMapped` when a block covers `iova`
    /// (nothing was created then); `OutOfMemory` may leave fresh, empty
    /// tables attached for the caller to prune.
    #[inline]
    fn leaf_table_for_map(&mut self, iova: u64) -> Result<(PhysAddr, bool), PageTableError> {
        if self.leaf_cache.0 == iova >> LEAF_TABLE_SHIFT {
            return Ok((self.leaf_cache.1, false));
        }
        self.walk_for_map(iova)
    }

    #[inline(never)]
    fn walk_for_map(&mut self, iova: u64) -> Result<(PhysAddr, bool), PageTableError> {
        let region = iova >> LEAF_TABLE_SHIFT;
        let mut table = self.root;
        let mut created = false;
        for h in (1..=self.top_height()).rev() {
            let idx = index(iova, h);
            let pte = self.read(table, idx);
            let pte = if pte == 0 {
                Pte::Invalid
            } else {
                self.fmt.decode(pte, h)
            };
            table = match pte {
                Pte::Table(t) => t,
                Pte::Invalid => {
                    let t = self.alloc_table()?;
                    self.install_table(table, idx, t);
                    self.clean_entries(table, idx, idx + 1);
                    self.entry_became_valid(table, h);
                    self.table_attached(t, h - 1);
                    created = true;
                    t
                }
                Pte::Leaf { .. } => {
                    return Err(PageTableError::AlreadyMapped {
                        iova: DmaAddr(iova),
                    });
                }
            };
        }
        self.leaf_cache = (region, table);
        Ok((table, created))
    }

    /// The existing leaf table covering `iova`, from the cache or by a walk
    /// that changes nothing; `None` when the walk meets anything but tables.
    #[inline]
    fn leaf_table_present(&mut self, iova: u64) -> Option<PhysAddr> {
        if self.leaf_cache.0 == iova >> LEAF_TABLE_SHIFT {
            return Some(self.leaf_cache.1);
        }
        self.walk_present(iova)
    }

    #[inline(never)]
    fn walk_present(&mut self, iova: u64) -> Option<PhysAddr> {
        let region = iova >> LEAF_TABLE_SHIFT;
        let mut table = self.root;
        for h in (1..=self.top_height()).rev() {
            match self.fmt.decode(self.read(table, index(iova, h)), h) {
                Pte::Table(t) => table = t,
                _ => return None,
            }
        }
        self.leaf_cache = (region, table);
        Some(table)
    }

    /// Fast path of [`map`](Self::map) for a range inside one leaf table
    /// that takes only page descriptors (the common small link): one walk
    /// (usually none, thanks to the cache) instead of a check walk and a map
    /// walk. `None` when the range is not of that shape. Same contract as
    /// `map`: all or nothing.
    #[inline]
    fn map_in_leaf_table(
        &mut self,
        iova: u64,
        pa: u64,
        end: u64,
        attrs: MapAttrs,
    ) -> Option<Result<(), PageTableError>> {
        if iova >> LEAF_TABLE_SHIFT != (end - 1) >> LEAF_TABLE_SHIFT {
            return None;
        }
        let block = entry_size(1);
        if end - iova == block && pa & (block - 1) == 0 && self.fmt.leaf_allowed(1) {
            return None;
        }
        let (leaf, created) = match self.leaf_table_for_map(iova) {
            Ok(t) => t,
            Err(e @ (PageTableError::OutOfMemory | PageTableError::PhysTooLarge { .. })) => {
                // The walk may have attached tables before the lender failed
                // (or lent a page the format cannot point at): take them back.
                self.take_back(iova, end);
                return Some(Err(e));
            }
            Err(e) => return Some(Err(e)),
        };
        let i0 = index(iova, 0);
        let i1 = i0 + ((end - iova) / PAGE_SIZE) as usize;
        if !created {
            let base = iova & !(block - 1);
            for i in i0..i1 {
                if self.present(self.read(leaf, i), 0) {
                    return Some(Err(PageTableError::AlreadyMapped {
                        iova: DmaAddr(base + i as u64 * PAGE_SIZE),
                    }));
                }
            }
        }
        let mut p = pa;
        for i in i0..i1 {
            self.write(leaf, i, self.fmt.leaf(PhysAddr(p), 0, attrs));
            p += PAGE_SIZE;
        }
        self.clean_entries(leaf, i0, i1);
        Some(Ok(()))
    }

    /// Fast path of [`unmap`](Self::unmap) for a range inside one leaf table
    /// that is wholly mapped by pages: clears the entries (nothing to split)
    /// and, if that empties the table, detaches it and the tables above it
    /// that become empty, as the general path would. `None` (nothing
    /// changed) for every other shape, which the general path handles.
    #[inline]
    fn unmap_in_leaf_table(&mut self, iova: u64, end: u64) -> Option<UnmapOutcome> {
        if iova >> LEAF_TABLE_SHIFT != (end - 1) >> LEAF_TABLE_SHIFT {
            return None;
        }
        let leaf = self.leaf_table_present(iova)?;
        let i0 = index(iova, 0);
        let i1 = i0 + ((end - iova) / PAGE_SIZE) as usize;
        for i in i0..i1 {
            if !matches!(self.fmt.decode(self.read(leaf, i), 0), Pte::Leaf { .. }) {
                return None;
            }
        }
        // Neighbours first: in a sequential unmap the next page is present.
        let empties = !(self.any_present(leaf, 0, i1, ENTRIES) || self.any_present(leaf, 0, 0, i0));
        for i in i0..i1 {
            self.write(leaf, i, 0);
        }
        self.clean_entries(leaf, i0, i1);
        let freed_tables = empties && self.detach_empty_leaf_table(iova);
        Some(UnmapOutcome {
            bytes: end - iova,
            freed_tables,
        })
    }

    /// Detaches the leaf table covering `iova`, which has just become empty,
    /// and then each table above it that becomes empty in turn (never the
    /// root), retiring them as [`clear_rec`](Self::clear_rec) does; stops
    /// where retiring fails (the table stays attached). Returns whether any
    /// table was detached.
    #[inline(never)]
    fn detach_empty_leaf_table(&mut self, iova: u64) -> bool {
        // (table, index) of the entry leading down, by height.
        let mut path = [(PhysAddr(0), 0usize); 5];
        let mut table = self.root;
        for h in (1..=self.top_height()).rev() {
            let idx = index(iova, h);
            let Some(slot) = path.get_mut(h as usize) else {
                return false;
            };
            *slot = (table, idx);
            match self.fmt.decode(self.read(table, idx), h) {
                Pte::Table(t) => table = t,
                _ => return false,
            }
        }
        let mut child = table;
        let mut freed = false;
        for h in 1..=self.top_height() {
            let Some(&(parent, idx)) = path.get(h as usize) else {
                break;
            };
            if self.retired.push(&self.mem, child).is_err() {
                self.stranded = true;
                break;
            }
            self.write(parent, idx, 0);
            self.clean_entries(parent, idx, idx + 1);
            self.entry_became_invalid(parent, h);
            self.counts.forget(child);
            self.table_pages -= 1;
            self.leaf_cache.0 = NO_REGION;
            freed = true;
            if parent == self.root {
                break;
            }
            if !self.became_empty(parent, h, idx, idx + 1) {
                break;
            }
            child = parent;
        }
        freed
    }

    fn map_rec(
        &mut self,
        table: PhysAddr,
        h: u32,
        iova: u64,
        pa: u64,
        end: u64,
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        if h == 0 {
            // A leaf table: `[iova, end)` lies inside it (the caller split the
            // range at this table's bounds). One tight loop of page entries.
            let i0 = index(iova, 0);
            let i1 = (i0 + ((end - iova) / PAGE_SIZE) as usize).min(ENTRIES);
            let mut p = pa;
            for i in i0..i1 {
                self.write(table, i, self.fmt.leaf(PhysAddr(p), 0, attrs));
                p += PAGE_SIZE;
            }
            self.clean_entries(table, i0, i1);
            return Ok(());
        }
        let esize = entry_size(h);
        let mut cur = iova;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        let mut result = Ok(());
        while cur < end {
            let idx = index(cur, h);
            let next = end.min((cur & !(esize - 1)) + esize);
            let p = pa + (cur - iova);
            let block =
                h > 0 && next - cur == esize && p & (esize - 1) == 0 && self.fmt.leaf_allowed(h);
            // An empty table left attached (its retirement did not fit) is
            // filled below rather than overwritten by a block: overwriting
            // would leak its page and need a walk-cache invalidation.
            let table_here =
                block && matches!(self.fmt.decode(self.read(table, idx), h), Pte::Table(_));
            if h == 0 || (block && !table_here) {
                if h > 0 {
                    self.leaf_cache.0 = NO_REGION;
                }
                // The range was checked empty: this entry was not valid.
                self.write(table, idx, self.fmt.leaf(PhysAddr(p), h, attrs));
                self.entry_became_valid(table, h);
                lo = lo.min(idx);
                hi = idx + 1;
            } else {
                let child = match self.fmt.decode(self.read(table, idx), h) {
                    Pte::Table(t) => t,
                    Pte::Invalid => match self.alloc_table() {
                        Ok(t) => {
                            self.install_table(table, idx, t);
                            self.entry_became_valid(table, h);
                            self.table_attached(t, h - 1);
                            lo = lo.min(idx);
                            hi = idx + 1;
                            t
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    },
                    Pte::Leaf { .. } => {
                        result = Err(PageTableError::AlreadyMapped { iova: DmaAddr(cur) });
                        break;
                    }
                };
                if let Err(e) = self.map_rec(child, h - 1, cur, p, next, attrs) {
                    result = Err(e);
                    break;
                }
            }
            cur = next;
        }
        self.clean_entries(table, lo, hi);
        result
    }

    /// First address in `[iova, end)` that is mapped (`mapped == true`) or
    /// not mapped (`mapped == false`), if any.
    fn first_where(
        &self,
        table: PhysAddr,
        h: u32,
        iova: u64,
        end: u64,
        mapped: bool,
    ) -> Option<u64> {
        let esize = entry_size(h);
        let mut cur = iova;
        while cur < end {
            let idx = index(cur, h);
            let next = end.min((cur & !(esize - 1)) + esize);
            match self.fmt.decode(self.read(table, idx), h) {
                Pte::Invalid if !mapped => return Some(cur),
                Pte::Leaf { .. } if mapped => return Some(cur),
                Pte::Invalid | Pte::Leaf { .. } => {}
                Pte::Table(t) if h > 0 => {
                    if let Some(a) = self.first_where(t, h - 1, cur, next, mapped) {
                        return Some(a);
                    }
                }
                // A table pointer at the leaf level is malformed: neither usable nor empty.
                Pte::Table(_) => return Some(cur),
            }
            cur = next;
        }
        None
    }

    fn first_present(&self, table: PhysAddr, h: u32, iova: u64, end: u64) -> Option<u64> {
        self.first_where(table, h, iova, end, true)
    }

    fn first_absent(&self, table: PhysAddr, h: u32, iova: u64, end: u64) -> Option<u64> {
        self.first_where(table, h, iova, end, false)
    }

    /// Whether every page of `[iova, iova + len)` is mapped; `Err` names the
    /// first one that is not.
    ///
    /// # Errors
    ///
    /// - [`PageTableError::ZeroLength`]: `len` is 0.
    /// - [`PageTableError::Unaligned`]: `iova` or `len` is not 4 KiB aligned.
    /// - [`PageTableError::OutOfRange`]: `iova + len` overflows or passes
    ///   `1 << ias_bits()`, the end of what the table translates.
    /// - [`PageTableError::NotMapped`]: the first page that is not mapped.
    pub fn check_mapped(&self, iova: DmaAddr, len: u64) -> Result<(), PageTableError> {
        let end = self.check_range(iova, len)?;
        match self.first_absent(self.root, self.top_height(), iova.0, end) {
            None => Ok(()),
            Some(a) => Err(PageTableError::NotMapped { iova: DmaAddr(a) }),
        }
    }

    /// Whether no page of `[iova, iova + len)` is mapped; `Err` names the
    /// first one that is.
    ///
    /// # Errors
    ///
    /// - [`PageTableError::ZeroLength`]: `len` is 0.
    /// - [`PageTableError::Unaligned`]: `iova` or `len` is not 4 KiB aligned.
    /// - [`PageTableError::OutOfRange`]: `iova + len` overflows or passes
    ///   `1 << ias_bits()`, the end of what the table translates.
    /// - [`PageTableError::AlreadyMapped`]: the first page that is mapped.
    pub fn check_unmapped(&self, iova: DmaAddr, len: u64) -> Result<(), PageTableError> {
        let end = self.check_range(iova, len)?;
        match self.first_present(self.root, self.top_height(), iova.0, end) {
            None => Ok(()),
            Some(a) => Err(PageTableError::AlreadyMapped { iova: DmaAddr(a) }),
        }
    }

    /// Unmaps `[iova, iova + len)`, which must be entirely mapped (else
    /// `NotMapped` and nothing changes). A block (2 MiB / 1 GiB leaf) that
    /// straddles either end is not split: splitting would replace a live
    /// block with a table in one store, which break-before-make forbids
    /// (IHI 0070 §3.21.1; Linux's io-pgtable-arm refuses partial unmaps of
    /// blocks too). The unmap is refused with
    /// [`PartialBlock`](PageTableError::PartialBlock) and nothing changes.
    /// Returns exactly what was done.
    ///
    /// # Errors
    ///
    /// - [`PageTableError::ZeroLength`]: `len` is 0.
    /// - [`PageTableError::Unaligned`]: `iova` or `len` is not 4 KiB aligned.
    /// - [`PageTableError::OutOfRange`]: `iova + len` overflows or passes
    ///   `1 << ias_bits()`, the end of what the table translates.
    /// - [`PageTableError::NotMapped`]: a page of the range is not mapped.
    /// - [`PageTableError::PartialBlock`]: a block straddles either end.
    ///
    /// On every error the table is as it was.
    #[inline]
    pub fn unmap(&mut self, iova: DmaAddr, len: u64) -> Result<UnmapOutcome, PageTableError> {
        let end = self.check_range(iova, len)?;
        if let Some(out) = self.unmap_in_leaf_table(iova.0, end) {
            return Ok(out);
        }
        self.unmap_general(iova, len, end)
    }

    /// [`unmap`](Self::unmap) for a caller that has already checked that
    /// `[iova, end)` is a non-empty, page-aligned range inside the table's
    /// input range (debug builds check it again).
    #[inline]
    pub(crate) fn unmap_prechecked(
        &mut self,
        iova: u64,
        end: u64,
    ) -> Result<UnmapOutcome, PageTableError> {
        debug_assert!(self.check_range(DmaAddr(iova), end - iova) == Ok(end));
        if let Some(out) = self.unmap_in_leaf_table(iova, end) {
            return Ok(out);
        }
        self.unmap_general(DmaAddr(iova), end - iova, end)
    }

    /// [`unmap`](Self::unmap) of any shape, range checked.
    #[inline(never)]
    fn unmap_general(
        &mut self,
        iova: DmaAddr,
        len: u64,
        end: u64,
    ) -> Result<UnmapOutcome, PageTableError> {
        self.check_mapped(iova, len)?;
        self.check_block_edge(iova.0)?;
        if end < 1u64 << self.ias_bits() {
            self.check_block_edge(end)?;
        }
        let mut out = UnmapOutcome::default();
        self.clear_rec(self.root, self.top_height(), iova.0, end, false, &mut out);
        Ok(out)
    }

    /// Unmaps whatever is mapped in `[iova, iova + len)`, skipping holes.
    /// Leaves straddling either end are left alone (never split), so this
    /// cannot fail on memory; use it to tear down a whole transaction.
    ///
    /// # Errors
    ///
    /// Only for a bad range, and then nothing changes:
    /// - [`PageTableError::ZeroLength`]: `len` is 0.
    /// - [`PageTableError::Unaligned`]: `iova` or `len` is not 4 KiB aligned.
    /// - [`PageTableError::OutOfRange`]: `iova + len` overflows or passes
    ///   `1 << ias_bits()`, the end of what the table translates.
    pub fn unmap_present(
        &mut self,
        iova: DmaAddr,
        len: u64,
    ) -> Result<UnmapOutcome, PageTableError> {
        let end = self.check_range(iova, len)?;
        let mut out = UnmapOutcome::default();
        self.clear_rec(self.root, self.top_height(), iova.0, end, false, &mut out);
        Ok(out)
    }

    /// `PartialBlock` when `addr` falls inside (not at the start of) a block.
    fn check_block_edge(&self, addr: u64) -> Result<(), PageTableError> {
        let mut table = self.root;
        let mut h = self.top_height();
        loop {
            let esize = entry_size(h);
            match self.fmt.decode(self.read(table, index(addr, h)), h) {
                Pte::Table(t) if h > 0 => {
                    table = t;
                    h -= 1;
                }
                Pte::Leaf { .. } if h > 0 && addr & (esize - 1) != 0 => {
                    return Err(PageTableError::PartialBlock {
                        iova: DmaAddr(addr & !(esize - 1)),
                        size: esize,
                    });
                }
                _ => return Ok(()),
            }
        }
    }

    /// Clears every leaf wholly inside `[iova, end)`, detaches child tables
    /// that become empty. Returns whether `table` is now empty.
    fn clear_rec(
        &mut self,
        table: PhysAddr,
        h: u32,
        iova: u64,
        end: u64,
        prune: bool,
        out: &mut UnmapOutcome,
    ) -> bool {
        let esize = entry_size(h);
        let mut cur = iova;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        while cur < end {
            let idx = index(cur, h);
            let base = cur & !(esize - 1);
            let next = end.min(base + esize);
            match self.fmt.decode(self.read(table, idx), h) {
                Pte::Invalid => {}
                Pte::Leaf { .. } => {
                    if cur == base && next == base + esize {
                        self.write(table, idx, 0);
                        self.entry_became_invalid(table, h);
                        out.bytes += esize;
                        lo = lo.min(idx);
                        hi = idx + 1;
                    }
                }
                Pte::Table(child) if h > 0 => {
                    if !self.clear_rec(child, h - 1, cur, next, prune, out) {
                        // Not empty, or not detachable.
                    } else if self.retired.push(&self.mem, child).is_err() {
                        // Stays attached, empty, until `prune_empty`.
                        self.stranded = true;
                    } else {
                        self.leaf_cache.0 = NO_REGION;
                        self.write(table, idx, 0);
                        self.entry_became_invalid(table, h);
                        self.counts.forget(child);
                        self.table_pages -= 1;
                        out.freed_tables = true;
                        lo = lo.min(idx);
                        hi = idx + 1;
                    }
                }
                Pte::Table(_) => {}
            }
            cur = next;
        }
        self.clean_entries(table, lo, hi);
        if hi == 0 && !prune {
            // Nothing changed here: a table is never left empty by this walker
            // unless retiring it failed, and then it stays attached anyway.
            // (`prune` is set when rolling back a map, whose fresh tables may
            // be empty.)
            return false;
        }
        if table == self.root {
            // The root is never detached: whether it is empty does not matter.
            return false;
        }
        // An upper table's count decides at once; a leaf table is scanned
        // next to what was cleared first: neighbours are the likeliest to
        // still be present, which keeps sequential unmaps O(1) per page.
        self.became_empty(table, h, lo, hi)
    }

    /// Hands retired table pages back to the lender. Call only after the
    /// IOMMU's caches were invalidated for the ranges they covered.
    pub fn free_retired(&mut self) {
        while let Some(t) = self.retired.pop(&self.mem) {
            // SAFETY: `t` came from `alloc_zeroed(1)` and was detached from the
            // table; the caller guarantees the IOMMU no longer walks it.
            unsafe { self.mem.free(t, 1) };
        }
    }

    /// Hands back the retired table pages except the `keep` most recently
    /// retired (the list is last-in first-out): what a sync shared by
    /// several CPUs may free when other CPUs retired pages while it waited
    /// (`crate::shared::SharedDomain`). Returns how many went back. Call
    /// only after the IOMMU's caches were invalidated for the ranges the
    /// older pages covered.
    pub fn free_retired_older(&mut self, keep: usize) -> usize {
        if keep == 0 {
            let n = self.retired.len();
            self.free_retired();
            return n;
        }
        let Some(older) = self.retired.split_after(&self.mem, keep) else {
            return 0;
        };
        let mut n = 0;
        let mut next = Some(older);
        while let Some(t) = next {
            // SAFETY: as in `RetireList::pop`: a retired page still lent to us.
            let link = unsafe { self.mem.phys_to_virt(t).cast::<u64>().read_volatile() };
            next = (link != 0).then_some(PhysAddr(link));
            // SAFETY: as in `free_retired`: detached, and the caller
            // guarantees the IOMMU no longer walks it.
            unsafe { self.mem.free(t, 1) };
            n += 1;
        }
        n
    }

    /// Whether empty tables stay attached because the retired list was full
    /// when they emptied: after the next [`free_retired`](Self::free_retired),
    /// [`prune_empty`](Self::prune_empty) detaches them.
    pub fn has_stranded(&self) -> bool {
        self.stranded
    }

    /// Detaches and retires empty tables left attached (see
    /// [`has_stranded`](Self::has_stranded)), as many as the retired list
    /// takes. Returns whether any was detached: then the caller must
    /// invalidate the walk caches (the whole domain: their ranges are not
    /// recorded) before [`free_retired`](Self::free_retired).
    pub fn prune_empty(&mut self) -> bool {
        if !self.stranded {
            return false;
        }
        self.stranded = false;
        let before = self.retired.len();
        self.prune_rec(self.root, self.top_height());
        self.retired.len() != before
    }

    /// Detaches the empty tables below `table`; whether `table` is now empty.
    fn prune_rec(&mut self, table: PhysAddr, h: u32) -> bool {
        if h == 0 {
            return !self.any_present(table, 0, 0, ENTRIES);
        }
        let mut empty = true;
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for i in 0..ENTRIES {
            let pte = self.read(table, i);
            if pte == 0 {
                continue;
            }
            match self.fmt.decode(pte, h) {
                Pte::Invalid => {}
                Pte::Leaf { .. } => empty = false,
                Pte::Table(child) => {
                    if self.prune_rec(child, h - 1) && self.retired.push(&self.mem, child).is_ok() {
                        self.write(table, i, 0);
                        self.entry_became_invalid(table, h);
                        self.counts.forget(child);
                        self.table_pages -= 1;
                        self.leaf_cache.0 = NO_REGION;
                        lo = lo.min(i);
                        hi = i + 1;
                    } else {
                        empty = false;
                    }
                }
            }
        }
        self.clean_entries(table, lo, hi);
        empty
    }

    /// Hands every table page back to the lender, the root included, and
    /// consumes the table.
    ///
    /// # Safety
    ///
    /// The IOMMU must no longer be able to walk any of the pages: no device
    /// is attached to the table (or it was detached and that took effect),
    /// and every cached walk of it was invalidated and that invalidation
    /// completed (a whole-domain invalidation followed by a sync).
    pub unsafe fn free_all(mut self) {
        self.counts.clear();
        self.free_retired();
        self.free_tree(self.root, self.top_height());
    }

    /// Software walk: the output address, attributes and leaf height that
    /// `iova` translates to, or `None` when it is not mapped.
    pub fn translate(&self, iova: DmaAddr) -> Option<(PhysAddr, MapAttrs, u32)> {
        if iova.0 >> self.ias_bits() != 0 {
            return None;
        }
        let mut table = self.root;
        let mut h = self.top_height();
        loop {
            match self.fmt.decode(self.read(table, index(iova.0, h)), h) {
                Pte::Invalid => return None,
                Pte::Leaf { pa, attrs } => {
                    let off = iova.0 & (entry_size(h) - 1);
                    return Some((PhysAddr(pa.0 + off), attrs, h));
                }
                Pte::Table(t) => {
                    if h == 0 {
                        return None;
                    }
                    table = t;
                    h -= 1;
                }
            }
        }
    }

    fn free_tree(&mut self, table: PhysAddr, h: u32) {
        if h > 0 {
            for i in 0..ENTRIES {
                if let Pte::Table(t) = self.fmt.decode(self.read(table, i), h) {
                    self.free_tree(t, h - 1);
                }
            }
        }
        // SAFETY: every table page reached from the root came from
        // `alloc_zeroed(1)`; `free_all`'s caller guarantees the IOMMU no
        // longer walks any of them.
        unsafe { self.mem.free(table, 1) };
    }
}
