//! The generic radix walker: one I/O page table over a [`PteFormat`].

use super::counts;
use super::{MapAttrs, Pte, PteFormat, TableReclaim};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::barrier::wmb_on;
use crate::error::PageTableError;
use crate::mem::TableMemory;

mod concurrent;

#[cfg(loom)]
pub use concurrent::LoomLeafHint;
pub(crate) use concurrent::{LeafHint, SharedMapError};

/// Entries per 4 KiB table.
const ENTRIES: usize = 512;
/// Bits of input address resolved per level.
const BITS_PER_LEVEL: u32 = 9;
/// Table pages detached and waiting for an invalidation and its completion,
/// kept in the pages themselves as a chain of *batches*: a batch page holds
/// in entry 0 the address of the next (older) batch page (0 ends the chain)
/// and in entries `1..=n` the addresses of `n <= 511` other retired pages,
/// retired after it (so a batch page is older than its entries). The head
/// batch's `n` is in [`RetireList::fill`]; every other batch keeps its own
/// in bits 11:3 of its entry 0 (written when it stopped being the head).
/// Handing pages back reads the batch entries in order and follows one
/// link per batch (a chain through every page cost one dependent cache
/// miss per page: a scattered unlink of 32768 pages spent most of its time
/// there).
///
/// A retired page's entries are all not-present, and a walker that cached the
/// path to it may still read it until the sync. What is stored keeps it so:
/// a 4 KiB aligned address, with a count in bits 11:3 at most, has bits 2:0
/// clear, and every format here reads such an entry as not present (Arm
/// VMSAv8-64: bit 0, valid, clear; VT-d second level: R, W and X, bits 2:0,
/// clear; VT-d first level and x86: P, bit 0, clear). It goes back to the
/// lender with the page (nothing is stored after the invalidation that lets
/// the page go: [`TableMemory::alloc_zeroed`] zeroes what it hands out).
/// No bookkeeping array, so no capacity: a failed or large unlink never has
/// to leave an empty table attached for lack of room.
struct RetireList {
    /// The newest batch page.
    head: Option<PhysAddr>,
    /// Entries of the head batch in use (`1..=fill`).
    fill: usize,
    /// Pages on the list, batch pages included.
    len: usize,
}

/// Retired pages a batch page holds besides itself.
const BATCH: usize = ENTRIES - 1;
/// Where a batch that is not the head keeps its count in its entry 0.
const BATCH_FILL_SHIFT: u32 = 3;

/// The link (next, older batch page) in entry 0 of a batch page.
#[inline(always)]
const fn batch_link(word: u64) -> u64 {
    word & !0xfff
}

/// The count in entry 0 of a batch page that is not the head.
#[inline(always)]
const fn batch_fill(word: u64) -> usize {
    ((word >> BATCH_FILL_SHIFT) & BATCH as u64) as usize
}

impl RetireList {
    const fn new() -> Self {
        Self {
            head: None,
            fill: 0,
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Entry `i` of the retired page `pa` (only formed: each use says why
    /// it may be read or written).
    fn slot<M: TableMemory>(mem: &M, pa: PhysAddr, i: usize) -> *mut u64 {
        mem.phys_to_virt(pa).cast::<u64>().wrapping_add(i)
    }

    /// Adds `pa` (a detached, all-not-present table page lent by `mem`):
    /// into the head batch while it has room, else as the new head.
    fn push<M: TableMemory>(&mut self, mem: &M, pa: PhysAddr) {
        match self.head {
            Some(h) if self.fill < BATCH => {
                self.fill += 1;
                // SAFETY: `h` is the head batch page, a retired page lent to
                // us; `fill <= 511` is an entry inside it.
                unsafe { Self::slot(mem, h, self.fill).write_volatile(pa.0) };
            }
            head => {
                if let Some(h) = head {
                    let link = Self::slot(mem, h, 0);
                    // SAFETY: entry 0 of the head batch page (retired, lent
                    // to us): it stops being the head and keeps its count.
                    unsafe {
                        link.write_volatile(
                            batch_link(link.read_volatile())
                                | (self.fill as u64) << BATCH_FILL_SHIFT,
                        );
                    }
                }
                // SAFETY: `pa` is a whole table page this table lent and
                // just detached; entry 0 is inside it.
                unsafe { Self::slot(mem, pa, 0).write_volatile(head.map_or(0, |h| h.0)) };
                self.head = Some(pa);
                self.fill = 0;
            }
        }
        self.len += 1;
    }

    /// Cuts the list after its `keep` newest pages (`keep >= 1`) and
    /// returns the rest (the older pages), now a list of its own. A cut
    /// inside a batch moves the kept part of it to a batch page of its own
    /// (the oldest page kept), since a batch page is older than its
    /// entries.
    fn split_after<M: TableMemory>(&mut self, mem: &M, keep: usize) -> Option<Self> {
        if keep >= self.len {
            return None;
        }
        let total = self.len;
        // `newer`: the batch before `cur` (None: `cur` is the head).
        let mut newer: Option<PhysAddr> = None;
        let mut cur = self.head?;
        let mut cur_fill = self.fill;
        let mut left = keep;
        loop {
            let link = Self::slot(mem, cur, 0);
            // SAFETY: `cur` is a batch page on the list: entry 0 its link.
            let word = unsafe { link.read_volatile() };
            if left > cur_fill {
                // All of `cur` kept (its entries and itself).
                left -= cur_fill + 1;
                let older = batch_link(word);
                if older == 0 {
                    // `keep < len` leaves pages past `cur`: not reached.
                    debug_assert!(false, "retire list shorter than its count");
                    return None;
                }
                if left == 0 {
                    // The cut falls right after `cur`: it ends the list (a
                    // head keeps no count in entry 0, any other its own).
                    let bits = if newer.is_some() { word & 0xff8 } else { 0 };
                    // SAFETY: as above; `cur` stays on the list.
                    unsafe { link.write_volatile(bits) };
                    self.len = keep;
                    let older = PhysAddr(older);
                    // SAFETY: `older` is a batch page (not the head).
                    let fill = batch_fill(unsafe { Self::slot(mem, older, 0).read_volatile() });
                    return Some(Self {
                        head: Some(older),
                        fill,
                        len: total - keep,
                    });
                }
                newer = Some(cur);
                cur = PhysAddr(older);
                // SAFETY: `cur` is a batch page on the list (not the head).
                cur_fill = batch_fill(unsafe { Self::slot(mem, cur, 0).read_volatile() });
                continue;
            }
            // The cut falls inside `cur`: its `left` newest entries are
            // kept, in a batch of their own headed by the oldest of them.
            let first = cur_fill - left + 1;
            // SAFETY: entry `first` of `cur` (`1 <= first <= cur_fill`)
            // holds a retired page.
            let k = PhysAddr(unsafe { Self::slot(mem, cur, first).read_volatile() });
            let moved = left - 1;
            for i in 1..=moved {
                // SAFETY: entries of `cur` past `first` hold retired pages;
                // `k` is a retired page lent to us, its entries not-present,
                // `i <= 510` inside it.
                unsafe {
                    let pa = Self::slot(mem, cur, first + i).read_volatile();
                    Self::slot(mem, k, i).write_volatile(pa);
                }
            }
            let fill_bits = if newer.is_some() {
                (moved as u64) << BATCH_FILL_SHIFT
            } else {
                0
            };
            // SAFETY: entry 0 of `k`: it ends the kept list.
            unsafe { Self::slot(mem, k, 0).write_volatile(fill_bits) };
            match newer {
                None => {
                    self.head = Some(k);
                    self.fill = moved;
                }
                Some(n) => {
                    let l = Self::slot(mem, n, 0);
                    // SAFETY: entry 0 of the batch before `cur`: it now
                    // links `k`, keeping its own count.
                    unsafe { l.write_volatile(k.0 | (l.read_volatile() & 0xff8)) };
                }
            }
            // `cur` heads the rest, with its older entries; as a head its
            // entry 0 holds the link alone.
            // SAFETY: entry 0 of `cur`, on the rest's list now.
            unsafe { link.write_volatile(batch_link(word)) };
            self.len = keep;
            return Some(Self {
                head: Some(cur),
                fill: first - 1,
                len: total - keep,
            });
        }
    }

    /// Takes the newest page off the list (reads only: see the type's
    /// docs).
    fn pop<M: TableMemory>(&mut self, mem: &M) -> Option<PhysAddr> {
        let h = self.head?;
        self.len -= 1;
        if self.fill > 0 {
            // SAFETY: entry `fill` of the head batch holds a retired page.
            let pa = unsafe { Self::slot(mem, h, self.fill).read_volatile() };
            self.fill -= 1;
            return Some(PhysAddr(pa));
        }
        // SAFETY: entry 0 of a batch page is its link.
        let next = batch_link(unsafe { Self::slot(mem, h, 0).read_volatile() });
        self.head = (next != 0).then_some(PhysAddr(next));
        self.fill = if next != 0 {
            // SAFETY: `next` is a batch page that was not the head: its
            // entry 0 holds its count.
            batch_fill(unsafe { Self::slot(mem, PhysAddr(next), 0).read_volatile() })
        } else {
            0
        };
        Some(h)
    }
}
/// Input address bits one leaf (height-0) table covers: 2 MiB.
const LEAF_TABLE_SHIFT: u32 = 12 + BITS_PER_LEVEL;
/// `leaf_cache` region meaning "nothing cached".
const NO_REGION: u64 = u64::MAX;
/// Read and write.
const RW: MapAttrs = MapAttrs::READ.union(MapAttrs::WRITE);

/// CPU pointers to a leaf table's first entry and to its count word (its
/// parent's entry pointing to it), from [`TableMemory::phys_to_virt`]: the
/// lender's pointer stays valid while the block is handed out, and the
/// walker forgets these (with `leaf_cache`) before it detaches the table.
#[derive(Clone, Copy)]
struct LeafPtrs {
    entries: *mut u64,
    count: *mut u64,
}

impl LeafPtrs {
    /// Nothing cached (never dereferenced: `leaf_cache` says so first).
    const NONE: Self = Self {
        entries: core::ptr::null_mut(),
        count: core::ptr::null_mut(),
    };
}

// SAFETY: the pointers lead into pages the walker owns, like the physical
// addresses it keeps beside them; only the walker dereferences them, under
// `&mut self` for stores, so sending or sharing the walker shares nothing
// the table pages themselves do not.
unsafe impl Send for LeafPtrs {}
// SAFETY: as for `Send`.
unsafe impl Sync for LeafPtrs {}

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
/// empty on unmap (unless [`TableReclaim::Keep`] leaves them attached, see
/// [`set_table_reclaim`](Self::set_table_reclaim)), or that a failed map
/// created, are detached and *retired*:
/// they are handed back to the lender only by
/// [`free_retired`](Self::free_retired), which the caller runs after the
/// IOMMU's caches were invalidated, so a walker can never read a reused page.
/// The root's children stay attached when the root cannot hold a block
/// ([`kept_height`](Self::kept_height)): at most one per root entry.
///
/// Every table but the root has its valid-entry count in the descriptor
/// pointing to it, in bits the IOMMU ignores (see
/// [`PteFormat::COUNT_SHIFT`]), so an unmap knows at once whether a table
/// became empty: one page per table, nothing beside it.
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
    /// The last leaf table walked to: (`iova >> LEAF_TABLE_SHIFT`, table,
    /// its count slot). Lets runs of small maps and unmaps in one 2 MiB
    /// region skip the walk from the root. Forgotten whenever a table page
    /// is detached or an entry above the leaf level is overwritten with a
    /// block.
    leaf_cache: (u64, PhysAddr, u64),
    /// The cached leaf table's parent: its page and count slot (the leaf's
    /// index in it is the leaf's slot's offset in that page). Valid while
    /// `leaf_cache` is: an unmap that empties the leaf table detaches it
    /// from there without a second walk.
    leaf_parent: (PhysAddr, u64),
    /// Bumped whenever a table page is detached (`detach_child`, the only
    /// place one leaves the tables): a [`concurrent::LeafHint`] filled
    /// under an older value may name a table no longer attached.
    detach_gen: u64,
    /// CPU pointers to the cached leaf table's entries and to its count
    /// word, valid while `leaf_cache` is: the one-page paths use them
    /// without asking the lender again.
    leaf_ptrs: LeafPtrs,
    /// `1 << ias_bits()`, the end of the input range (precomputed for the
    /// one-page paths).
    ias_limit: u64,
    /// `1 << fmt.oa_bits()`, the end of the output range.
    oa_limit: u64,
    /// The attributes of the last successful map (which grant read or
    /// write: they passed every check) and the bits of their page
    /// descriptor at address 0, so a one-page map with the same attributes
    /// only ORs in the address (the `PteFormat::leaf` contract).
    page_bits: (MapAttrs, u64),
    /// The page descriptor bits at address 0 of each plain direction,
    /// indexed by the attributes' bits (READ 1, WRITE 2, both 3; 0
    /// unused): a one-way buffer after a read-write one, or pages of both
    /// kinds in turn, OR in the address too instead of encoding.
    dir_bits: [u64; 4],
    /// The same for blocks: the attributes of the last block map and the
    /// bits of their 2 MiB and 1 GiB descriptors at address 0 (the
    /// `PteFormat::leaf` contract again), so a block map with the same
    /// attributes only ORs in the address.
    block_bits: (MapAttrs, [u64; 2]),
    /// See [`kept_height`](Self::kept_height); `u32::MAX` for none.
    kept_height: u32,
    /// Table pages attached by the shared-access path (`concurrent.rs`),
    /// not yet folded into `table_pages`.
    shared_lent: concurrent::SharedLent,
    /// [`TableReclaim::Keep`]: unmaps leave emptied tables attached.
    keep_empty: bool,
}

#[inline]
const fn entry_size(height: u32) -> u64 {
    1u64 << (12 + BITS_PER_LEVEL * height)
}

/// The height of a block of `len` bytes (1: 2 MiB, 2: 1 GiB); `None` for
/// any other length.
#[inline(always)]
const fn block_height(len: u64) -> Option<u32> {
    match len {
        0x20_0000 => Some(1),
        0x4000_0000 => Some(2),
        _ => None,
    }
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
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "defmt")]
impl<F: PteFormat, M: TableMemory> defmt::Format for IoPageTable<F, M> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "IoPageTable {{ format: {}, root: {}, levels: {=u8}, coherent: {=bool}, table_pages: {=usize}, retired_pages: {=usize} }}",
            F::KIND,
            self.root,
            self.levels,
            self.coherent,
            self.table_pages,
            self.retired.len()
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
            mem,
            root,
            levels,
            coherent,
            table_pages: 1,
            retired: RetireList::new(),
            leaf_cache: (NO_REGION, PhysAddr(0), 0),
            leaf_parent: (PhysAddr(0), 0),
            detach_gen: 0,
            leaf_ptrs: LeafPtrs::NONE,
            ias_limit: 1u64 << (12 + BITS_PER_LEVEL * u32::from(levels)),
            oa_limit: 1u64 << fmt.oa_bits(),
            page_bits: (RW, fmt.leaf(PhysAddr(0), 0, RW)),
            dir_bits: [
                0,
                fmt.leaf(PhysAddr(0), 0, MapAttrs::READ),
                fmt.leaf(PhysAddr(0), 0, MapAttrs::WRITE),
                fmt.leaf(PhysAddr(0), 0, RW),
            ],
            block_bits: (
                RW,
                [fmt.leaf(PhysAddr(0), 1, RW), fmt.leaf(PhysAddr(0), 2, RW)],
            ),
            kept_height: if fmt.leaf_allowed(u32::from(levels) - 1) {
                u32::MAX
            } else {
                u32::from(levels) - 2
            },
            shared_lent: concurrent::SharedLent::new(),
            keep_empty: false,
            fmt,
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

    /// Table pages currently attached (root included). Lent pages in all:
    /// `table_pages() + retired_pages()` (the valid-entry counts need no
    /// page of their own).
    pub fn table_pages(&self) -> usize {
        self.table_pages + self.shared_lent.tables()
    }

    /// The height (0 = leaf tables) of the tables kept attached when they
    /// empty, if any: the root's children when the root cannot hold a
    /// block (4 and 5 levels, or a format without root-level blocks).
    /// Such a table costs one page per root entry used, and spares every
    /// unlink that empties it a detach, a retirement and a walk-cache
    /// invalidation. Every lower table goes back to the lender
    /// (after the next invalidation) when it empties.
    pub fn kept_height(&self) -> Option<u32> {
        (self.kept_height != u32::MAX).then_some(self.kept_height)
    }

    /// Table pages detached and waiting for [`free_retired`](Self::free_retired).
    pub fn retired_pages(&self) -> usize {
        self.retired.len()
    }

    /// What unmaps do with the tables they empty (see [`TableReclaim`]).
    /// Switching to [`TableReclaim::Eager`] detaches nothing by itself:
    /// tables already left empty stay until
    /// [`reclaim_empty_tables`](Self::reclaim_empty_tables).
    pub fn set_table_reclaim(&mut self, policy: TableReclaim) {
        self.keep_empty = policy == TableReclaim::Keep;
    }

    /// The policy [`set_table_reclaim`](Self::set_table_reclaim) chose.
    pub fn table_reclaim(&self) -> TableReclaim {
        if self.keep_empty {
            TableReclaim::Keep
        } else {
            TableReclaim::Eager
        }
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

    #[inline(always)]
    fn clean_entries(&self, table: PhysAddr, lo: usize, hi: usize) {
        if !self.coherent && hi > lo {
            self.mem
                .clean(PhysAddr(table.0 + lo as u64 * 8), (hi - lo) * 8);
        }
    }

    /// A new, zeroed table page (cleaned for a non-coherent walker).
    #[inline]
    fn alloc_table(&mut self) -> Result<PhysAddr, PageTableError> {
        let t = lend_table_page(&self.fmt, &self.mem, self.coherent)?;
        self.table_pages += 1;
        Ok(t)
    }

    /// The count kept at `slot` (the entry pointing to the table).
    #[inline(always)]
    fn count_at(&self, slot: u64) -> u64 {
        // SAFETY: a non-zero slot is the address of an entry of a table
        // page this walker owns (`counts::slot`); callers pass 0 only for
        // the root, which they never ask about. Volatile: the IOMMU reads
        // the same word.
        let w = unsafe {
            self.mem
                .phys_to_virt(PhysAddr(slot))
                .cast::<u64>()
                .read_volatile()
        };
        counts::count(w, F::COUNT_SHIFT)
    }

    /// Adds `n` to the count at `slot` (nothing for the root's slot, 0).
    /// The count stays in `0..=512`, inside its ten bits, so adding to the
    /// whole descriptor never touches the pointer or its other bits; one
    /// aligned store, of bits the walker ignores (no clean, no barrier).
    #[inline(always)]
    fn count_add(&self, slot: u64, n: u64) {
        if slot != 0 {
            let p = self.mem.phys_to_virt(PhysAddr(slot)).cast::<u64>();
            // SAFETY: as in `count_at`.
            unsafe { p.write_volatile(p.read_volatile() + (n << F::COUNT_SHIFT)) };
            debug_assert!(self.count_at(slot) <= ENTRIES as u64);
        }
    }

    /// Subtracts `n` from the count at `slot` (see `count_add`).
    #[inline(always)]
    fn count_sub(&self, slot: u64, n: u64) {
        if slot != 0 {
            debug_assert!(self.count_at(slot) >= n, "valid-entry count underflow");
            let p = self.mem.phys_to_virt(PhysAddr(slot)).cast::<u64>();
            // SAFETY: as in `count_at`.
            unsafe { p.write_volatile(p.read_volatile() - (n << F::COUNT_SHIFT)) };
        }
    }

    /// Whether the table whose count is at `slot` is empty; debug builds
    /// check an empty count against a scan of the table.
    #[inline(always)]
    fn is_empty_at(&self, slot: u64, table: PhysAddr, h: u32) -> bool {
        let empty = self.count_at(slot) == 0;
        debug_assert!(
            !empty || self.valid_entries(table, h) == 0,
            "table {table:?} at height {h} counted empty but is not"
        );
        empty
    }

    /// Stores in `table[idx]` (count at `slot`) the pointer to the new,
    /// empty table `child` (count 0).
    /// The child's zeroed (and cleaned) contents are ordered before the
    /// pointer by a barrier: a walker that follows the pointer must never
    /// see the page's old contents (io-pgtable-arm `arm_lpae_install_table`).
    #[inline]
    fn install_table(&self, (table, slot): (PhysAddr, u64), idx: usize, child: PhysAddr) {
        wmb_on(&self.mem);
        self.write(table, idx, self.fmt.table(child));
        self.count_add(slot, 1);
    }

    /// Detaches the child table at `table[idx]` (count at `slot`), which is
    /// empty: retires its page until the next invalidation, clears the
    /// entry, its count with it (the caller cleans it). The retired list
    /// has no capacity, so this always succeeds. Written into
    /// its one hot caller, the per-page unlink that empties a leaf table
    /// (`detach_empty_leaf_table`, itself out of line): no call there.
    #[inline(always)]
    fn detach_child(&mut self, (table, slot): (PhysAddr, u64), idx: usize, child: PhysAddr) {
        self.retired.push(&self.mem, child);
        self.write(table, idx, 0);
        self.count_sub(slot, 1);
        self.table_pages -= 1;
        self.leaf_cache.0 = NO_REGION;
        self.detach_gen = self.detach_gen.wrapping_add(1);
    }

    /// Valid entries of `table`, by a scan (the debug builds' check of the
    /// counts, and [`check_counts`](Self::check_counts)).
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

    /// Test support: compares every table's valid-entry count with a scan
    /// of the table; `Err((table, height, counted, scanned))` names the
    /// first that differs.
    #[doc(hidden)]
    pub fn check_counts(&self) -> Result<(), (PhysAddr, u32, usize, usize)> {
        self.check_counts_rec(self.root, self.top_height())
    }

    fn check_counts_rec(
        &self,
        table: PhysAddr,
        h: u32,
    ) -> Result<(), (PhysAddr, u32, usize, usize)> {
        for i in 0..ENTRIES {
            let w = self.read(table, i);
            if let Pte::Table(child) = self.fmt.decode(w, h) {
                if h == 0 {
                    continue;
                }
                let counted = counts::count(w, F::COUNT_SHIFT) as usize;
                let scanned = self.valid_entries(child, h - 1);
                if counted != scanned {
                    return Err((child, h - 1, counted, scanned));
                }
                if h - 1 > 0 {
                    self.check_counts_rec(child, h - 1)?;
                }
            }
        }
        Ok(())
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
        if len == PAGE_SIZE {
            if let Some(r) = self.map_page_fast(iova.0, pa.0, attrs) {
                return r;
            }
        }
        self.map_other(iova, pa, len, attrs)
    }

    /// [`map`](Self::map) of anything but one page: a whole block by its
    /// one walk, else the checked path. Out of line (and small), so that
    /// `map` stays the one-page path and a call.
    #[inline(never)]
    fn map_other(
        &mut self,
        iova: DmaAddr,
        pa: PhysAddr,
        len: u64,
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        if let Some(r) = self.map_block_fast(iova.0, pa.0, len, attrs) {
            return r;
        }
        self.map_checked(iova, pa, len, attrs)
    }

    /// [`map`](Self::map) of any shape, every argument checked.
    #[inline(never)]
    fn map_checked(
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
        self.check_pages(pages)?;
        if let Some(at) = self.first_present(self.root, self.top_height(), iova.0, end) {
            return Err(PageTableError::AlreadyMapped { iova: DmaAddr(at) });
        }
        let bits = self.fmt.leaf(PhysAddr(0), 0, attrs);
        let mut cur = iova.0;
        let mut rest = pages;
        while !rest.is_empty() {
            let (table, slot) = match self.leaf_table_for_map(cur) {
                Ok((t, slot, _)) => (t, slot),
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
            self.count_add(slot, n as u64);
            rest = later;
            cur += n as u64 * PAGE_SIZE;
        }
        Ok(())
    }

    /// Every page of a list page aligned and inside the output range; the
    /// error names the first that is not.
    pub(crate) fn check_pages(&self, pages: &[PhysAddr]) -> Result<(), PageTableError> {
        let last_page = self.oa_limit - PAGE_SIZE;
        for p in pages {
            if !p.is_page_aligned() {
                return Err(PageTableError::Unaligned { value: p.0 });
            }
            if p.0 > last_page {
                return Err(PageTableError::PhysTooLarge { phys: *p });
            }
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
        if end - iova == PAGE_SIZE {
            if let Some(r) = self.map_page_fast(iova, pa, attrs) {
                return r;
            }
        }
        let r = match self.map_in_leaf_table(iova, pa, end, attrs) {
            Some(r) => r,
            None => self.map_general(iova, pa, end, attrs),
        };
        if r.is_ok() && self.page_bits.0 != attrs {
            self.page_bits = (attrs, self.fmt.leaf(PhysAddr(0), 0, attrs));
        }
        r
    }

    /// The bits (at address 0) of a page descriptor with `attrs`, when
    /// known without encoding: the last map's (one compare, the per-page
    /// paths' common case), or a plain direction's.
    #[inline(always)]
    pub(crate) fn known_page_bits(&self, attrs: MapAttrs) -> Option<u64> {
        if attrs == self.page_bits.0 {
            Some(self.page_bits.1)
        } else {
            self.direction_bits(attrs)
        }
    }

    /// A plain direction's page descriptor bits (`known_page_bits` when the
    /// attributes changed), out of the common path.
    #[cold]
    #[inline(never)]
    fn direction_bits(&self, attrs: MapAttrs) -> Option<u64> {
        let b = attrs.bits();
        (b != 0 && b & !RW.bits() == 0).then(|| self.dir_bits[b as usize & 3])
    }

    /// Makes a plain direction's bits the cached page bits (`page_bits`
    /// is a cache of the encoding, right whatever the map then does);
    /// whether `attrs` was one.
    #[cold]
    #[inline(never)]
    fn adopt_direction(&mut self, attrs: MapAttrs) -> bool {
        match self.direction_bits(attrs) {
            Some(bits) => {
                self.page_bits = (attrs, bits);
                true
            }
            None => false,
        }
    }

    /// One page at `iova` → `pa`, when `attrs` are those of the last
    /// successful map (so they grant access; their descriptor bits are
    /// known) and both addresses are page aligned and in range (the leaf
    /// table comes from the cache, or from a walk that makes missing
    /// tables and takes them back if the lender fails). Every check of
    /// [`map`](Self::map) holds for such a call, with one combined test;
    /// `None` (nothing done) sends any other call down the full path, which
    /// finds the precise error.
    #[inline(always)]
    pub(crate) fn map_page_fast(
        &mut self,
        iova: u64,
        pa: u64,
        attrs: MapAttrs,
    ) -> Option<Result<(), PageTableError>> {
        // Page aligned, below the input limit (a multiple of 4 KiB, so the
        // page's end is below it too).
        if iova & (PAGE_SIZE - 1) != 0 || iova >= self.ias_limit {
            return None;
        }
        self.map_page_in_range(iova, pa, attrs)
    }

    /// [`map_page_fast`](Self::map_page_fast) for an `iova` the caller
    /// proved page aligned and below `1 << ias_bits()` (a page of a
    /// transaction, which lies inside the aperture, which lies inside the
    /// input range): the rest of its checks, one test each.
    #[inline(always)]
    pub(crate) fn map_page_in_range(
        &mut self,
        iova: u64,
        pa: u64,
        attrs: MapAttrs,
    ) -> Option<Result<(), PageTableError>> {
        debug_assert!(iova % PAGE_SIZE == 0 && iova < self.ias_limit);
        // Page aligned, below the output limit (a multiple of 4 KiB, so the
        // page's end is below it too).
        if pa & (PAGE_SIZE - 1) != 0
            || pa >= self.oa_limit
            || (attrs != self.page_bits.0 && !self.adopt_direction(attrs))
        {
            return None;
        }
        let created = if self.leaf_cache.0 == iova >> LEAF_TABLE_SHIFT {
            false
        } else {
            match self.walk_for_map(iova) {
                Ok((_, _, created)) => created,
                Err(e) => return Some(Err(self.map_walk_failed(iova, e))),
            }
        };
        // The cached leaf table's pointers (set by the walk on a miss): no
        // lender call, no test of the count slot (a leaf table's is never
        // the root's 0).
        let LeafPtrs { entries, count } = self.leaf_ptrs;
        let i = index(iova, 0);
        let entry = entries.wrapping_add(i);
        // SAFETY: `entries` points to the cached leaf table, a page this
        // walker owns (see `LeafPtrs`); `i < 512` stays inside it. Volatile
        // as in `read`.
        if !created && self.present(unsafe { entry.read_volatile() }, 0) {
            return Some(Err(PageTableError::AlreadyMapped {
                iova: DmaAddr(iova),
            }));
        }
        debug_assert_eq!(self.fmt.leaf(PhysAddr(pa), 0, attrs), pa | self.page_bits.1);
        // SAFETY: as above; one aligned 64-bit store (see `write`).
        unsafe { entry.write_volatile(pa | self.page_bits.1) };
        self.clean_entries(self.leaf_cache.1, i, i + 1);
        // SAFETY: `count` points to the leaf table's count word, its
        // parent's entry, in a page this walker owns (see `LeafPtrs`,
        // `count_add`); volatile and one store, as there.
        unsafe { count.write_volatile(count.read_volatile() + (1 << F::COUNT_SHIFT)) };
        debug_assert!(self.count_at(self.leaf_cache.2) <= ENTRIES as u64);
        Some(Ok(()))
    }

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` as one block (a 2 MiB
    /// or 1 GiB leaf) when that is the whole call: `len` one of those sizes,
    /// a leaf allowed at its height below the root, `iova` and `pa` aligned
    /// to `len`, the block inside the input and output ranges, `attrs`
    /// granting read or write, and the entry for it empty. One walk down,
    /// making missing tables as every map does (cleans, the
    /// barrier before each pointer), which is also the whole check: an
    /// empty entry has nothing mapped below it.
    ///
    /// `None`, nothing changed, for any other call, which the full path
    /// handles and names the error of: a present leaf on the way or at the
    /// entry (`AlreadyMapped`), or a table there (one kept empty by
    /// [`TableReclaim::Keep`] is filled with smaller blocks, never
    /// overwritten). `Some(Err)` only when the lender failed
    /// ([`PageTableError::OutOfMemory`], or a page above the output size:
    /// [`PageTableError::PhysTooLarge`]); the tables this call attached
    /// are taken back (retired, like a failed [`map`](Self::map)'s).
    ///
    /// The cost of a 1 GiB link (issue 11): the general path's check walk
    /// and its recursive map become one walk and one store.
    #[inline]
    pub(crate) fn map_block_fast(
        &mut self,
        iova: u64,
        pa: u64,
        len: u64,
        attrs: MapAttrs,
    ) -> Option<Result<(), PageTableError>> {
        let h = block_height(len)?;
        let top = self.top_height();
        // `iova` aligned to `len` and below the input range's end, itself a
        // multiple of `len` (`h < top_height()`): the whole block is inside.
        // `pa` aligned to `len` with its last byte, `pa | (len - 1)`, below
        // the output range's end: no overflow either.
        if (iova | pa) & (len - 1) != 0
            || iova >= self.ias_limit
            || pa | (len - 1) >= self.oa_limit
            || h >= top
            || !self.fmt.leaf_allowed(h)
            || !attrs.intersects(RW)
        {
            return None;
        }
        let mut node = (self.root, 0u64);
        let mut created = false;
        let mut level = top;
        while level > h {
            node = match self.map_step(node, level, iova, &mut created) {
                Ok(n) => n,
                // A block above: nothing was made (every entry above it was
                // a table already).
                Err(PageTableError::AlreadyMapped { .. }) => return None,
                Err(e) => return Some(Err(self.map_block_walk_failed(iova, len, e))),
            };
            level -= 1;
        }
        let (table, slot) = node;
        let idx = index(iova, h);
        // Anything but an empty entry (a fresh table has only those) goes
        // to the full path, which made nothing either: `created` is false.
        if self.read(table, idx) != 0 {
            debug_assert!(!created);
            return None;
        }
        // The entry was empty, so no leaf table lies under the block and
        // `leaf_cache` (which only names attached tables) stays right.
        debug_assert!(
            self.leaf_cache.0 == NO_REGION
                || (self.leaf_cache.0 << LEAF_TABLE_SHIFT) & !(len - 1) != iova
        );
        if self.block_bits.0 != attrs {
            let leaf = |h| self.fmt.leaf(PhysAddr(0), h, attrs);
            self.block_bits = (attrs, [leaf(1), leaf(2)]);
        }
        // `h` is 1 or 2. `pa` is aligned and in range: its descriptor is
        // its address ORed with the bits (the `PteFormat::leaf` contract).
        let bits = self.block_bits.1[(h - 1) as usize & 1];
        debug_assert_eq!(self.fmt.leaf(PhysAddr(pa), h, attrs), pa | bits);
        self.write(table, idx, pa | bits);
        self.clean_entries(table, idx, idx + 1);
        self.count_add(slot, 1);
        Some(Ok(()))
    }

    /// The walk of [`map_block_fast`](Self::map_block_fast) failed with
    /// `e` (the lender): takes back the tables it attached. Returns `e`.
    #[cold]
    #[inline(never)]
    fn map_block_walk_failed(&mut self, iova: u64, len: u64, e: PageTableError) -> PageTableError {
        self.take_back(iova, iova + len);
        e
    }

    /// A walk for a map of `[iova, iova + 4 KiB)` failed with `e`: takes
    /// back the tables it attached before the lender failed (or lent a page
    /// the format cannot point at). Returns `e`.
    #[cold]
    #[inline(never)]
    fn map_walk_failed(&mut self, iova: u64, e: PageTableError) -> PageTableError {
        if matches!(
            e,
            PageTableError::OutOfMemory | PageTableError::PhysTooLarge { .. }
        ) {
            self.take_back(iova, iova + PAGE_SIZE);
        }
        e
    }

    /// One mapped page at `iova` unmapped, when its leaf table is cached or
    /// found by a walk and the entry is a page: the shape of a per-page
    /// unlink. `None` (nothing done) for anything else, which the full path
    /// handles (and names the error of).
    #[inline(always)]
    pub(crate) fn unmap_page_fast(&mut self, iova: u64) -> Option<UnmapOutcome> {
        if iova & (PAGE_SIZE - 1) != 0 || iova >= self.ias_limit {
            return None;
        }
        self.unmap_page_in_range(iova)
    }

    /// [`unmap_page_fast`](Self::unmap_page_fast) for an `iova` the caller
    /// proved page aligned and below `1 << ias_bits()`.
    #[inline(always)]
    pub(crate) fn unmap_page_in_range(&mut self, iova: u64) -> Option<UnmapOutcome> {
        debug_assert!(iova % PAGE_SIZE == 0 && iova < self.ias_limit);
        if self.leaf_cache.0 != iova >> LEAF_TABLE_SHIFT {
            self.walk_present(iova)?;
        }
        // The cached leaf table's pointers, as in `map_page_in_range`.
        let LeafPtrs { entries, count } = self.leaf_ptrs;
        let i = index(iova, 0);
        let entry = entries.wrapping_add(i);
        // SAFETY: as in `map_page_in_range`.
        if !self.present(unsafe { entry.read_volatile() }, 0) {
            return None;
        }
        // SAFETY: as in `map_page_in_range`.
        unsafe { entry.write_volatile(0) };
        let leaf = self.leaf_cache.1;
        self.clean_entries(leaf, i, i + 1);
        // SAFETY: as in `map_page_in_range`. The entry was valid, so the
        // count is at least 1.
        let left = unsafe { count.read_volatile() } - (1 << F::COUNT_SHIFT);
        // SAFETY: as above.
        unsafe { count.write_volatile(left) };
        let empty = counts::count(left, F::COUNT_SHIFT) == 0;
        debug_assert!(!empty || self.valid_entries(leaf, 0) == 0);
        let freed_tables = empty && !self.keep_empty && self.detach_empty_leaf_table(iova);
        Some(UnmapOutcome {
            bytes: PAGE_SIZE,
            freed_tables,
        })
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
        let root = (self.root, 0);
        match self.map_rec(root, self.top_height(), iova, pa, end, attrs) {
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
        let root = (self.root, 0);
        self.clear_rec(root, self.top_height(), iova, end, true, &mut out);
    }

    /// Whether a descriptor read at `height` is present. Zero is
    /// not-present in every format, which spares the decode on the common
    /// empty entry.
    #[inline]
    fn present(&self, pte: u64, height: u32) -> bool {
        pte != 0 && self.fmt.decode(pte, height) != Pte::Invalid
    }

    /// The leaf table covering `iova` and its count slot, from the cache or
    /// by a walk that creates missing tables; also whether any table was
    /// created (then the leaf table is empty). `AlreadyMapped` when a block
    /// covers `iova` (nothing was created then); `OutOfMemory` may leave
    /// fresh, empty tables attached for the caller to take back.
    #[inline]
    fn leaf_table_for_map(&mut self, iova: u64) -> Result<(PhysAddr, u64, bool), PageTableError> {
        if self.leaf_cache.0 == iova >> LEAF_TABLE_SHIFT {
            return Ok((self.leaf_cache.1, self.leaf_cache.2, false));
        }
        self.walk_for_map(iova)
    }

    #[inline(never)]
    fn walk_for_map(&mut self, iova: u64) -> Result<(PhysAddr, u64, bool), PageTableError> {
        let region = iova >> LEAF_TABLE_SHIFT;
        let mut node = (self.root, 0u64);
        let mut created = false;
        // A plain countdown to the leaf table's parent (`levels >= 2`),
        // then the last step, which also names the parent for the cache.
        let mut h = self.top_height();
        while h > 1 {
            node = self.map_step(node, h, iova, &mut created)?;
            h -= 1;
        }
        let parent = node;
        let (leaf, slot) = self.map_step(node, 1, iova, &mut created)?;
        self.cache_leaf(region, leaf, slot, parent);
        Ok((leaf, slot, created))
    }

    /// One step of [`walk_for_map`](Self::walk_for_map) down from `node`
    /// (table, count slot) at height `h`: the child table and its slot,
    /// the child made (and `created` set) when the entry was empty.
    #[inline(always)]
    fn map_step(
        &mut self,
        node: (PhysAddr, u64),
        h: u32,
        iova: u64,
        created: &mut bool,
    ) -> Result<(PhysAddr, u64), PageTableError> {
        let (table, _) = node;
        let idx = index(iova, h);
        let pte = self.read(table, idx);
        let pte = if pte == 0 {
            Pte::Invalid
        } else {
            self.fmt.decode(pte, h)
        };
        let child = match pte {
            Pte::Table(t) => t,
            Pte::Invalid => {
                let t = self.alloc_table()?;
                self.install_table(node, idx, t);
                self.clean_entries(table, idx, idx + 1);
                *created = true;
                t
            }
            Pte::Leaf { .. } => {
                return Err(PageTableError::AlreadyMapped {
                    iova: DmaAddr(iova),
                });
            }
        };
        Ok((child, counts::slot(table, idx)))
    }

    /// Caches the leaf table `leaf` (count at `slot`) of 2 MiB region
    /// `region`, whose parent is `parent` (table, count slot).
    #[inline(always)]
    fn cache_leaf(&mut self, region: u64, leaf: PhysAddr, slot: u64, parent: (PhysAddr, u64)) {
        self.leaf_cache = (region, leaf, slot);
        self.leaf_parent = parent;
        self.leaf_ptrs = LeafPtrs {
            entries: self.mem.phys_to_virt(leaf).cast(),
            count: self.mem.phys_to_virt(PhysAddr(slot)).cast(),
        };
    }

    /// The existing leaf table covering `iova` and its count slot, from the
    /// cache or by a walk that changes nothing; `None` when the walk meets
    /// anything but tables.
    #[inline]
    fn leaf_table_present(&mut self, iova: u64) -> Option<(PhysAddr, u64)> {
        if self.leaf_cache.0 == iova >> LEAF_TABLE_SHIFT {
            return Some((self.leaf_cache.1, self.leaf_cache.2));
        }
        self.walk_present(iova)
    }

    #[inline(never)]
    fn walk_present(&mut self, iova: u64) -> Option<(PhysAddr, u64)> {
        let region = iova >> LEAF_TABLE_SHIFT;
        // One step down from `table` at height `h`: the child table and
        // its count slot.
        let step = |table: PhysAddr, h: u32| {
            let idx = index(iova, h);
            let Pte::Table(t) = self.fmt.decode(self.read(table, idx), h) else {
                return None;
            };
            Some((t, counts::slot(table, idx)))
        };
        let (mut table, mut slot) = (self.root, 0u64);
        // A plain countdown to the leaf table's parent (`levels >= 2`),
        // then the last step, which also names the parent for the cache.
        let mut h = self.top_height();
        while h > 1 {
            (table, slot) = step(table, h)?;
            h -= 1;
        }
        let parent = (table, slot);
        let (leaf, leaf_slot) = step(table, 1)?;
        self.cache_leaf(region, leaf, leaf_slot, parent);
        Some((leaf, leaf_slot))
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
        let (leaf, slot, created) = match self.leaf_table_for_map(iova) {
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
        let n = ((end - iova) / PAGE_SIZE) as usize;
        if n == 1 {
            // One page (the per-page link): no loops.
            if !created && self.present(self.read(leaf, i0), 0) {
                return Some(Err(PageTableError::AlreadyMapped {
                    iova: DmaAddr(iova),
                }));
            }
            self.write(leaf, i0, self.fmt.leaf(PhysAddr(pa), 0, attrs));
            self.clean_entries(leaf, i0, i0 + 1);
            self.count_add(slot, 1);
            return Some(Ok(()));
        }
        let i1 = i0 + n;
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
        self.count_add(slot, n as u64);
        Some(Ok(()))
    }

    /// Fast path of [`unmap`](Self::unmap) for a range inside one leaf table
    /// that is wholly mapped by pages: clears the entries (nothing to split)
    /// and, if that empties the table (its count says so at once), detaches
    /// it and the tables above it that become empty, as the general path
    /// would. `None` (nothing changed) for every other shape, which the
    /// general path handles.
    #[inline]
    fn unmap_in_leaf_table(&mut self, iova: u64, end: u64) -> Option<UnmapOutcome> {
        if iova >> LEAF_TABLE_SHIFT != (end - 1) >> LEAF_TABLE_SHIFT {
            return None;
        }
        let (leaf, slot) = self.leaf_table_present(iova)?;
        let i0 = index(iova, 0);
        let n = ((end - iova) / PAGE_SIZE) as usize;
        let i1 = i0 + n;
        for i in i0..i1 {
            if !matches!(self.fmt.decode(self.read(leaf, i), 0), Pte::Leaf { .. }) {
                return None;
            }
        }
        for i in i0..i1 {
            self.write(leaf, i, 0);
        }
        self.clean_entries(leaf, i0, i1);
        self.count_sub(slot, n as u64);
        let freed_tables = self.is_empty_at(slot, leaf, 0)
            && !self.keep_empty
            && self.detach_empty_leaf_table(iova);
        Some(UnmapOutcome {
            bytes: end - iova,
            freed_tables,
        })
    }

    /// Detaches the table at height `from` covering `iova`, which has just
    /// become empty, and then each table above it that becomes empty in
    /// turn (never the root nor a kept table, see `kept_height`), retiring
    /// them as [`clear_rec`](Self::clear_rec) does. Returns whether any
    /// table was detached.
    ///
    /// The leaf table is the cached one (`leaf_cache`, set by the lookup
    /// that found it), so its parent is known without a walk; only when the
    /// parent empties too is the path walked again.
    #[inline(never)]
    fn detach_empty_leaf_table(&mut self, iova: u64) -> bool {
        debug_assert_eq!(self.leaf_cache.0, iova >> LEAF_TABLE_SHIFT);
        if self.kept_height == 0 {
            // Two levels with a root that cannot hold a block: leaf tables
            // are the root's children, kept.
            return false;
        }
        let (leaf, slot) = (self.leaf_cache.1, self.leaf_cache.2);
        let (ptable, pslot) = self.leaf_parent;
        // The leaf's slot is entry `idx` of its parent.
        let idx = ((slot & (PAGE_SIZE - 1)) / 8) as usize;
        debug_assert_eq!(idx, index(iova, 1));
        debug_assert_eq!(slot, counts::slot(ptable, idx));
        self.detach_child((ptable, pslot), idx, leaf);
        self.clean_entries(ptable, idx, idx + 1);
        if ptable != self.root && self.is_empty_at(pslot, ptable, 1) {
            // Rare: the parent's last child went; it and any emptied table
            // above it go too (by a walk, as a block's unmap does).
            self.detach_empty_tables_from(iova, 1);
        }
        true
    }

    /// [`detach_empty_tables`](Self::detach_empty_tables) above a block's
    /// table at height `from`.
    #[inline(never)]
    fn detach_empty_tables_from(&mut self, iova: u64, from: u32) -> bool {
        self.detach_empty_tables(iova, from)
    }

    #[inline(always)]
    fn detach_empty_tables(&mut self, iova: u64, from: u32) -> bool {
        // The node (table, count slot) holding the entry that leads down,
        // and that entry's index, by height.
        let mut path = [((PhysAddr(0), 0u64), 0usize); 5];
        let mut node = (self.root, 0u64);
        for h in (from + 1..=self.top_height()).rev() {
            let idx = index(iova, h);
            let Some(p) = path.get_mut(h as usize) else {
                return false;
            };
            *p = (node, idx);
            match self.fmt.decode(self.read(node.0, idx), h) {
                Pte::Table(t) => node = (t, counts::slot(node.0, idx)),
                _ => return false,
            }
        }
        let mut child = node.0;
        let mut freed = false;
        for h in from + 1..=self.top_height() {
            let Some(&(parent, idx)) = path.get(h as usize) else {
                break;
            };
            if h - 1 == self.kept_height {
                break;
            }
            self.detach_child(parent, idx, child);
            self.clean_entries(parent.0, idx, idx + 1);
            freed = true;
            if parent.0 == self.root || !self.is_empty_at(parent.1, parent.0, h) {
                break;
            }
            child = parent.0;
        }
        freed
    }

    /// Maps `[iova, end)` to `pa` below `node` (table, count slot) at
    /// height `h`.
    fn map_rec(
        &mut self,
        node: (PhysAddr, u64),
        h: u32,
        iova: u64,
        pa: u64,
        end: u64,
        attrs: MapAttrs,
    ) -> Result<(), PageTableError> {
        let (table, slot) = node;
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
            self.count_add(slot, (i1 - i0) as u64);
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
            let block = next - cur == esize && p & (esize - 1) == 0 && self.fmt.leaf_allowed(h);
            // An empty table left attached (its retirement did not fit) is
            // filled below rather than overwritten by a block: overwriting
            // would leak its page and need a walk-cache invalidation.
            let table_here =
                block && matches!(self.fmt.decode(self.read(table, idx), h), Pte::Table(_));
            if block && !table_here {
                self.leaf_cache.0 = NO_REGION;
                // The range was checked empty: this entry was not valid.
                self.write(table, idx, self.fmt.leaf(PhysAddr(p), h, attrs));
                self.count_add(slot, 1);
                lo = lo.min(idx);
                hi = idx + 1;
            } else {
                let child = match self.fmt.decode(self.read(table, idx), h) {
                    Pte::Table(t) => t,
                    Pte::Invalid => match self.alloc_table() {
                        Ok(t) => {
                            self.install_table(node, idx, t);
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
                let child = (child, counts::slot(table, idx));
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
    ///
    /// Always inlined: the one-page and one-block paths are a few
    /// instructions each, and a call with its spills was a third of a
    /// 1 GiB unmap when the compiler chose not to inline it.
    #[inline(always)]
    pub fn unmap(&mut self, iova: DmaAddr, len: u64) -> Result<UnmapOutcome, PageTableError> {
        if len == PAGE_SIZE {
            if let Some(out) = self.unmap_page_fast(iova.0) {
                return Ok(out);
            }
        } else if let Some(out) = self.unmap_block_fast(iova.0, len) {
            // Inline: small, unlike `map_block_fast` (which makes tables),
            // and the one-page path keeps its cost beside it.
            return Ok(out);
        }
        self.unmap_checked(iova, len)
    }

    /// [`unmap`](Self::unmap) of any shape, every argument checked.
    #[inline(never)]
    fn unmap_checked(&mut self, iova: DmaAddr, len: u64) -> Result<UnmapOutcome, PageTableError> {
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
        if let Some(out) = self.unmap_block_fast(iova, end - iova) {
            return Ok(out);
        }
        if let Some(out) = self.unmap_in_leaf_table(iova, end) {
            return Ok(out);
        }
        self.unmap_general(DmaAddr(iova), end - iova, end)
    }

    /// Unmaps `[iova, iova + len)` when it is exactly one block (a 2 MiB or
    /// 1 GiB leaf) inside the input range: one walk down to it, which is
    /// also the whole check (a range that is exactly one present leaf is
    /// mapped and cuts no block), then the emptied tables above it detached
    /// by their counts. `None` (nothing changed) for any other shape or
    /// argument, which the full path handles and names the error of.
    ///
    /// The cost of a 1 GiB unlink (issue 11): the block's table is a kept
    /// root child (`kept_height`) wherever the root cannot hold a block, so
    /// the common case is one step down, one store, one count update.
    #[inline]
    pub(crate) fn unmap_block_fast(&mut self, iova: u64, len: u64) -> Option<UnmapOutcome> {
        let h = block_height(len)?;
        if iova & (len - 1) != 0 || iova >= self.ias_limit {
            return None;
        }
        self.unmap_block_at(iova, h)
    }

    /// [`unmap_block_fast`](Self::unmap_block_fast) for an `iova` the
    /// caller proved aligned to `len` and below `1 << ias_bits()` (a
    /// naturally aligned block of a transaction, which lies inside the
    /// aperture, which lies inside the input range). Inlined into
    /// `Domain::unlink`: no call, no registers saved.
    #[inline(always)]
    pub(crate) fn unmap_block_in_range(&mut self, iova: u64, len: u64) -> Option<UnmapOutcome> {
        let h = block_height(len)?;
        debug_assert!(iova % len == 0 && iova < self.ias_limit);
        self.unmap_block_at(iova, h)
    }

    /// The block unmap at height `h` (1 or 2) of an `iova` aligned to the
    /// block and inside the input range.
    #[inline(always)]
    fn unmap_block_at(&mut self, iova: u64, h: u32) -> Option<UnmapOutcome> {
        // The input range's end is a multiple of the block when the block
        // lies below the root (`h < top_height()`): the whole block is
        // inside.
        let top = self.top_height();
        if h >= top {
            return None;
        }
        let len = entry_size(h);
        // Down to the table holding the block: its page and count slot.
        let (mut table, mut slot) = (self.root, 0u64);
        let mut level = top;
        while level > h {
            let idx = index(iova, level);
            let Pte::Table(t) = self.fmt.decode(self.read(table, idx), level) else {
                return None;
            };
            slot = counts::slot(table, idx);
            table = t;
            level -= 1;
        }
        let idx = index(iova, h);
        if !self.fmt.is_leaf(self.read(table, idx), h) {
            return None;
        }
        // No leaf table lies under a block: `leaf_cache` stays right (a
        // detach below forgets it).
        self.write(table, idx, 0);
        self.clean_entries(table, idx, idx + 1);
        self.count_sub(slot, 1);
        // The count decides at once; detaching (rare: the block was the
        // last entry of a table that is neither kept nor the root) walks
        // down again.
        let freed_tables = h != self.kept_height
            && table != self.root
            && self.is_empty_at(slot, table, h)
            && !self.keep_empty
            && self.detach_empty_tables_from(iova, h);
        Some(UnmapOutcome {
            bytes: len,
            freed_tables,
        })
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
        let root = (self.root, 0);
        self.clear_rec(root, self.top_height(), iova.0, end, false, &mut out);
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
        let root = (self.root, 0);
        self.clear_rec(root, self.top_height(), iova.0, end, false, &mut out);
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

    /// Clears every leaf wholly inside `[iova, end)` below `node` (table,
    /// count slot) at height `h`, detaches child tables that
    /// become empty. Returns whether the table is now empty (never for the
    /// root, which is never detached).
    fn clear_rec(
        &mut self,
        node: (PhysAddr, u64),
        h: u32,
        iova: u64,
        end: u64,
        prune: bool,
        out: &mut UnmapOutcome,
    ) -> bool {
        let (table, slot) = node;
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
                        self.count_sub(slot, 1);
                        out.bytes += esize;
                        lo = lo.min(idx);
                        hi = idx + 1;
                    }
                }
                Pte::Table(child) if h > 0 => {
                    let child_node = (child, counts::slot(table, idx));
                    // A rolled-back map (`prune`) takes its fresh tables
                    // back whatever the reclaim policy.
                    if self.clear_rec(child_node, h - 1, cur, next, prune, out)
                        && (prune || !self.keep_empty)
                    {
                        self.detach_child(node, idx, child);
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
            // Nothing changed here: no entry of this table was cleared, so
            // its count did not move. (`prune` is set when rolling back a
            // map, whose fresh tables may be empty.)
            return false;
        }
        if table == self.root || h == self.kept_height {
            // The root is never detached, nor a kept table (`kept_height`):
            // whether they are empty does not matter.
            return false;
        }
        // The count decides at once: no scan.
        self.is_empty_at(slot, table, h)
    }

    /// Detaches every empty table (one with no valid entry, left attached by
    /// [`TableReclaim::Keep`] or by the shared path), children before their
    /// parents, so a table whose children all went goes too (never the root
    /// nor a kept table, see [`kept_height`](Self::kept_height)). Each
    /// detached table is retired as an unmap's would be: it goes back to
    /// the lender only through [`free_retired`](Self::free_retired), after
    /// the caller invalidated the ranges `on_detached(start, len)` named
    /// (walk caches included) and that completed. Returns the number of
    /// table pages detached.
    ///
    /// Reads every entry of the upper tables on the way (not of the leaf
    /// tables: their counts decide), so it costs a walk of the tree.
    pub fn reclaim_empty_tables(&mut self, mut on_detached: impl FnMut(u64, u64)) -> usize {
        let mut n = 0;
        let root = (self.root, 0);
        self.reclaim_rec(root, self.top_height(), 0, &mut n, &mut on_detached);
        n
    }

    /// [`reclaim_empty_tables`](Self::reclaim_empty_tables) below the upper
    /// table `node` (table, count slot) at height `h`, which
    /// covers the input range from `base`.
    fn reclaim_rec(
        &mut self,
        node: (PhysAddr, u64),
        h: u32,
        base: u64,
        n: &mut usize,
        on_detached: &mut impl FnMut(u64, u64),
    ) {
        let (table, _) = node;
        let esize = entry_size(h);
        let (mut lo, mut hi) = (usize::MAX, 0usize);
        for idx in 0..ENTRIES {
            let pte = self.read(table, idx);
            if pte == 0 {
                continue;
            }
            let Pte::Table(child) = self.fmt.decode(pte, h) else {
                continue;
            };
            let child_node = (child, counts::slot(table, idx));
            let start = base + idx as u64 * esize;
            if h > 1 {
                self.reclaim_rec(child_node, h - 1, start, n, on_detached);
            }
            if h - 1 != self.kept_height && self.is_empty_at(child_node.1, child, h - 1) {
                self.detach_child(node, idx, child);
                *n += 1;
                lo = lo.min(idx);
                hi = idx + 1;
                on_detached(start, esize);
            }
        }
        self.clean_entries(table, lo, hi);
    }

    /// Hands retired table pages back to the lender. Call only after the
    /// IOMMU's caches were invalidated for the ranges they covered.
    #[inline]
    pub fn free_retired(&mut self) {
        // Most syncs retired nothing: one test, no call.
        if self.retired.len() != 0 {
            self.free_retired_all();
        }
    }

    /// [`free_retired`](Self::free_retired) with pages to hand back.
    #[inline(never)]
    fn free_retired_all(&mut self) {
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
        let Some(mut older) = self.retired.split_after(&self.mem, keep) else {
            return 0;
        };
        let n = older.len();
        while let Some(t) = older.pop(&self.mem) {
            // SAFETY: as in `free_retired`: detached, and the caller
            // guarantees the IOMMU no longer walks it.
            unsafe { self.mem.free(t, 1) };
        }
        n
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

    /// The raw descriptor at `height` on the walk to `iova`, as the IOMMU
    /// reads it (a table pointer with its count bits, see
    /// [`PteFormat::COUNT_SHIFT`]); `None` when `iova` is outside the input
    /// range, `height` above the root, or the walk ends above `height` (an
    /// entry that is not a table pointer).
    pub fn descriptor_at(&self, iova: DmaAddr, height: u32) -> Option<u64> {
        if iova.0 >> self.ias_bits() != 0 || height > self.top_height() {
            return None;
        }
        let mut table = self.root;
        let mut h = self.top_height();
        loop {
            let e = self.read(table, index(iova.0, h));
            if h == height {
                return Some(e);
            }
            match self.fmt.decode(e, h) {
                Pte::Table(t) if h > 0 => {
                    table = t;
                    h -= 1;
                }
                _ => return None,
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

#[cfg(test)]
mod retire_tests {
    extern crate std;
    use std::collections::VecDeque;
    use std::vec::Vec;

    use super::{RetireList, TableMemory};
    use crate::addr::PhysAddr;
    use crate::testing::heap::HostMemory;

    /// A zeroed page from `mem` (an empty retired table).
    fn page(mem: &HostMemory) -> PhysAddr {
        mem.alloc_zeroed(1).unwrap()
    }

    /// Pops everything: the pages in pop order.
    fn drain(l: &mut RetireList, mem: &HostMemory) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(p) = l.pop(mem) {
            out.push(p.0);
        }
        assert_eq!(l.len(), 0);
        out
    }

    /// Pushes, pops and splits at every kind of place (inside the head
    /// batch, at a batch's end, inside an older batch) against a model:
    /// pop hands back the newest page, a split keeps exactly the newest
    /// `keep` and returns exactly the older ones, every page once.
    #[test]
    fn batches_keep_the_order_and_split_exactly() {
        let mem = HostMemory::default();
        let all: &[(usize, usize, usize)] = &[
            (1usize, 1usize, 0usize),
            (5, 2, 1),
            (512, 1, 0),
            (512, 511, 3),
            (513, 1, 0),
            (513, 2, 0),
            (1024, 512, 0),
            (1024, 513, 7),
            (1536, 700, 0),
            (1536, 1024, 1),
            (1600, 3, 600),
            (1600, 1599, 0),
        ];
        // Under Miri (every word of every page is interpreted): two
        // splits across batches.
        let cases = if cfg!(miri) { &all[5..8] } else { all };
        let most = cases.iter().map(|c| c.0).max().unwrap_or(0) + 9;
        let pages: Vec<PhysAddr> = (0..most).map(|_| page(&mem)).collect();
        for &(n, keep, pops) in cases {
            let mut l = RetireList::new();
            let mut model: VecDeque<u64> = VecDeque::new();
            for p in &pages[..n] {
                l.push(&mem, *p);
                model.push_front(p.0);
            }
            for _ in 0..pops {
                assert_eq!(l.pop(&mem).map(|p| p.0), model.pop_front());
            }
            // A few more after popping (a partly emptied head refills).
            for p in &pages[n..(n + 9).min(pages.len())] {
                l.push(&mem, *p);
                model.push_front(p.0);
            }
            assert_eq!(l.len(), model.len());
            let keep = keep.min(model.len());
            match l.split_after(&mem, keep) {
                None => assert_eq!(keep, model.len(), "{n}/{keep}/{pops}"),
                Some(mut older) => {
                    assert_eq!(l.len(), keep);
                    let want_older: Vec<u64> = model.iter().skip(keep).copied().collect();
                    assert_eq!(drain(&mut older, &mem), want_older, "{n}/{keep}/{pops}");
                }
            }
            let want_kept: Vec<u64> = model.iter().take(keep).copied().collect();
            // The kept list still takes pushes after the split.
            l.push(&mem, pages[0]);
            let mut kept = drain(&mut l, &mem);
            assert_eq!(kept.remove(0), pages[0].0);
            assert_eq!(kept, want_kept, "{n}/{keep}/{pops}");
        }
        for p in pages {
            // SAFETY: allocated above, on no list any more.
            unsafe { mem.free(p, 1) };
        }
    }

    /// What a retired page holds while on the list reads as not present in
    /// every format (bits 2:0 clear: Arm valid, VT-d R/W/X, x86 P).
    #[test]
    fn batch_words_never_read_as_present() {
        let mem = HostMemory::default();
        let mut l = RetireList::new();
        let pages: Vec<PhysAddr> = (0..1100).map(|_| page(&mem)).collect();
        for p in &pages {
            l.push(&mem, *p);
        }
        // Every page (under Miri the batch pages only: pages 0, 512 and
        // 1024, the only ones the list writes).
        for p in pages.iter().step_by(if cfg!(miri) { 512 } else { 1 }) {
            let words = mem.phys_to_virt(*p).cast::<u64>();
            for i in 0..512 {
                // SAFETY: a page this test allocated, still lent.
                let w = unsafe { words.add(i).read() };
                assert_eq!(w & 7, 0, "page {:#x} entry {i}: {w:#x}", p.0);
            }
        }
        drain(&mut l, &mem);
        for p in pages {
            // SAFETY: allocated above, no longer on a list.
            unsafe { mem.free(p, 1) };
        }
    }
}
