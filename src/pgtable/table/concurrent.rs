//! The shared-access path of [`IoPageTable`]: maps and unmaps through
//! `&self`, so that several CPUs change disjoint ranges of one table at
//! once (`crate::shared::SharedDomain`), without a lock across the walk.
//!
//! # Who touches what
//!
//! The callers guarantee that concurrent calls cover disjoint ranges (each
//! transaction owns its IOVA range). So a leaf entry, and a block that a
//! range covers wholly, is written by one CPU only: plain (volatile) stores,
//! as on the exclusive path. Shared between CPUs are
//!
//! - upper entries: an empty one gets its table by compare-and-swap
//!   (Linux `arm_lpae_install_table`); the CPU that loses the race hands
//!   its page back to the lender at once — nothing ever saw it — and walks
//!   on through the winner's table;
//! - counts (`counts.rs`), in the ignored bits of those same upper entries:
//!   every count changes by an atomic add or subtract on the entry, which
//!   leaves its pointer as it is (an install's compare-and-swap only ever
//!   replaces an entry that is not valid, so it never meets a count).
//!
//! This path never detaches a table: an unmap that empties one leaves it
//! attached with count 0 (Linux's io-pgtable never frees a table on a 4 KiB
//! unmap either). Empty tables go back through
//! [`reclaim_empty`](IoPageTable::reclaim_empty) on the exclusive side,
//! which no shared call overlaps (the caller's lock), and retire as any
//! detached table does.
//!
//! Ordering. A new table is zeroed (and cleaned) and ordered by a barrier
//! before the compare-and-swap that publishes it (Release for the CPUs that
//! follow it, the barrier for the walker, as `install_table`). A CPU that
//! follows a table pointer loads it with Acquire. Counts are Relaxed: only the
//! exclusive side reads them to decide, after taking its lock (Acquire)
//! behind every shared call's release of it.

use core::sync::atomic::{AtomicUsize, Ordering as StatOrdering};

use super::{BITS_PER_LEVEL, ENTRIES, IoPageTable, LEAF_TABLE_SHIFT, index, lend_table_page};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::barrier::wmb_on;
use crate::error::PageTableError;
use crate::mem::TableMemory;
use crate::pgtable::{MapAttrs, Pte, PteFormat, counts};
use crate::shared::sync::{AtomicU64, Ordering, Word};

/// Pages the shared path attached (statistics; folded into the table's
/// own counters on the exclusive side).
#[derive(Debug, Default)]
pub(super) struct SharedLent {
    tables: AtomicUsize,
}

impl SharedLent {
    pub(super) const fn new() -> Self {
        Self {
            tables: AtomicUsize::new(0),
        }
    }

    pub(super) fn tables(&self) -> usize {
        self.tables.load(StatOrdering::Relaxed)
    }
}

/// One leaf table the shared path walked to, remembered so that the next
/// one-page call in the same 2 MiB region skips the walk from the root (the
/// shared counterpart of the exclusive path's `leaf_cache`).
///
/// # Why a hint is safe to follow
///
/// An entry is `(region, generation, leaf table, its count slot)`. It is
/// filled and used only on the read side of the domain lock, and the
/// generation is the table's `detach_gen` read in the same read section.
/// A table leaves the tables only in `detach_child`, on the write side,
/// which bumps `detach_gen`; the write side never overlaps a read section.
/// So when a reader finds an entry whose generation equals the `detach_gen`
/// it reads now, no table was detached since a reader walked to that leaf
/// table: it is still attached at that region, with that count slot (a
/// table is never moved, and the shared path never detaches), and it stays
/// so until this read section ends. An entry of an older generation is a
/// miss (a walk). Generations are 64-bit: they do not wrap.
///
/// Several CPUs may use one hint at once (the shard is a hint too), so the
/// four words are guarded by a sequence count, as a seqlock: a writer takes
/// an even count to odd by compare-and-swap (a writer that loses, or finds
/// it odd, just does not fill the hint; Acquire: the previous fill's words
/// come before this one's in each word's order, else a reader could take
/// this fill's count with the previous fill's region — the loom model
/// found that), stores the words with Release, and
/// makes the count even again with Release; a reader loads the count, the
/// words with Acquire, the count again, and takes the entry only when the
/// count was even and unchanged. A word read from a writer carries that
/// writer's odd count (stored before it), so a reader that read any word of
/// a fill that began after its first look sees a changed count at its
/// second: it never takes words of two fills. (Release and Acquire on each
/// word rather than fences: free on x86, and modelled exactly by loom.) A
/// reader that takes an entry has synchronised with its writer, which
/// loaded the table pointers with Acquire on its walk: the installer's
/// zeroed table is visible to the reader as to a walker.
pub(crate) struct LeafHint {
    seq: AtomicU64,
    region: AtomicU64,
    generation: AtomicU64,
    leaf: AtomicU64,
    slot: AtomicU64,
}

impl Default for LeafHint {
    fn default() -> Self {
        Self::new()
    }
}

impl LeafHint {
    /// An empty hint.
    pub(crate) fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            // No 2 MiB region has this number (`iova >> 21 < 2^43`).
            region: AtomicU64::new(u64::MAX),
            generation: AtomicU64::new(0),
            leaf: AtomicU64::new(0),
            slot: AtomicU64::new(0),
        }
    }

    /// The leaf table of `region` and its count slot, when the hint holds
    /// them for generation `generation` (see the type docs).
    #[inline(always)]
    fn get(&self, region: u64, generation: u64) -> Option<(PhysAddr, u64)> {
        let s1 = self.seq.load(Ordering::Acquire);
        let r = self.region.load(Ordering::Acquire);
        let g = self.generation.load(Ordering::Acquire);
        let leaf = self.leaf.load(Ordering::Acquire);
        let slot = self.slot.load(Ordering::Acquire);
        let s2 = self.seq.load(Ordering::Relaxed);
        #[cfg(not(broken_leaf_hint))]
        let valid = g == generation;
        // The deliberately broken variant (`--cfg broken_leaf_hint`): the
        // generation is not checked, so a hint outlives a reclaim.
        #[cfg(broken_leaf_hint)]
        let valid = {
            let _ = (g, generation);
            true
        };
        (s1 & 1 == 0 && s1 == s2 && r == region && valid).then_some((PhysAddr(leaf), slot))
    }

    /// Empties the hint (for a caller that replaced the table under it).
    pub(crate) fn forget(&self) {
        self.put(u64::MAX, 0, (PhysAddr(0), 0));
    }

    /// Remembers `(leaf, slot)` for `region` at generation `generation`;
    /// does nothing while another CPU fills the hint.
    #[inline]
    fn put(&self, region: u64, generation: u64, (leaf, slot): (PhysAddr, u64)) {
        let s = self.seq.load(Ordering::Relaxed);
        if s & 1 != 0
            || self
                .seq
                .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Release: a reader that reads any of these words sees the odd
        // count (or a later one) at its second look.
        self.region.store(region, Ordering::Release);
        self.generation.store(generation, Ordering::Release);
        self.leaf.store(leaf.0, Ordering::Release);
        self.slot.store(slot, Ordering::Release);
        self.seq.store(s + 2, Ordering::Release);
    }
}

/// Model-test access to a [`LeafHint`] (`tests/loom.rs`).
#[cfg(loom)]
#[doc(hidden)]
pub struct LoomLeafHint(LeafHint);

#[cfg(loom)]
impl Default for LoomLeafHint {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(loom)]
impl LoomLeafHint {
    /// An empty hint.
    pub fn new() -> Self {
        Self(LeafHint::new())
    }

    /// Fills the hint (or not, while another CPU fills it).
    pub fn put(&self, region: u64, generation: u64, leaf: u64, slot: u64) {
        self.0.put(region, generation, (PhysAddr(leaf), slot));
    }

    /// `(leaf, slot)` if the hint holds `region` at `generation`.
    pub fn get(&self, region: u64, generation: u64) -> Option<(u64, u64)> {
        self.0.get(region, generation).map(|(l, s)| (l.0, s))
    }
}

/// What a walk that changes nothing finds on the way to an IOVA.
enum Probe {
    /// The leaf table covering it, and its count slot.
    Leaf(PhysAddr, u64),
    /// A not-valid entry at this height: nothing is mapped in its span.
    Hole(u32),
    /// A block at height `h`: entry `idx` of `table`, whose count is at
    /// `slot`.
    Block {
        h: u32,
        table: PhysAddr,
        idx: usize,
        slot: u64,
    },
}

/// The end of the span of the height-`h` entry holding `cur`, or `end`
/// when that comes first.
#[inline(always)]
fn span_end(cur: u64, h: u32, end: u64) -> u64 {
    end.min((cur | ((1u64 << (12 + BITS_PER_LEVEL * h)) - 1)) + 1)
}

/// What [`IoPageTable::map_shared`] did when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SharedMapError {
    /// The error (no translation changed).
    pub(crate) error: PageTableError,
    /// Tables were attached on the way and are left empty (the caller has
    /// them reclaimed later).
    pub(crate) left_empty: bool,
}

impl<F: PteFormat, M: TableMemory> IoPageTable<F, M> {
    /// The entry of `table` at index `idx`, used atomically.
    #[inline(always)]
    fn word(&self, page: PhysAddr, idx: usize) -> Word {
        // SAFETY: `page` is a table page this walker lent and keeps
        // attached while shared calls run (nothing is detached meanwhile);
        // `idx < 512` keeps the word inside it; every CPU reaches the shared
        // words of a page (upper entries and their counts) through `Word`.
        unsafe { Word::at(self.mem.phys_to_virt(page).cast::<u64>().wrapping_add(idx)) }
    }

    /// Adds `n` to the count at `slot` (0: the root's, which has none).
    #[inline(always)]
    fn count_add_shared(&self, slot: u64, n: u64) {
        if slot != 0 {
            // SAFETY: a slot is an upper entry of a table page this walker
            // lent (as in `count_at`); counts change only atomically while
            // shared, and the add stays in the count's bits.
            unsafe { Word::at(self.mem.phys_to_virt(PhysAddr(slot)).cast::<u64>()) }
                .fetch_add(n << F::COUNT_SHIFT, Ordering::Relaxed);
        }
    }

    /// Subtracts `n` from the count at `slot`; returns the count left.
    #[inline(always)]
    fn count_sub_shared(&self, slot: u64, n: u64) -> u64 {
        if slot == 0 {
            return 1;
        }
        // SAFETY: as in `count_add_shared`.
        let old = unsafe { Word::at(self.mem.phys_to_virt(PhysAddr(slot)).cast::<u64>()) }
            .fetch_sub(n << F::COUNT_SHIFT, Ordering::Relaxed);
        let old = counts::count(old, F::COUNT_SHIFT);
        debug_assert!(old >= n, "valid-entry count underflow");
        old - n
    }

    /// Walks to the table holding the entries of height `to` on the way to
    /// `iova` (0: the leaf table), installing missing tables by
    /// compare-and-swap: `(table, its count slot)`. `Err` with whether
    /// tables were attached on the way (left empty).
    fn walk_shared(&self, iova: u64, to: u32) -> Result<(PhysAddr, u64), SharedMapError> {
        let (mut table, mut slot) = (self.root, 0u64);
        let mut left_empty = false;
        let fail = |error, left_empty| SharedMapError { error, left_empty };
        for h in (to + 1..=self.top_height()).rev() {
            let idx = index(iova, h);
            let e = self.word(table, idx);
            let mut v = e.load(Ordering::Acquire);
            let child = loop {
                match self.fmt.decode(v, h) {
                    Pte::Table(t) => break t,
                    Pte::Leaf { .. } => {
                        return Err(fail(
                            PageTableError::AlreadyMapped {
                                iova: DmaAddr(iova),
                            },
                            left_empty,
                        ));
                    }
                    Pte::Invalid => {}
                }
                // Counted in the shared statistics only once installed.
                let t = lend_table_page(&self.fmt, &self.mem, self.coherent)
                    .map_err(|err| fail(err, left_empty))?;
                // The zeroed (cleaned) page before the pointer, for the
                // walker (IHI 0070 §3.21.1; Linux `arm_lpae_install_table`).
                wmb_on(&self.mem);
                #[cfg(not(loom_broken_install))]
                let installed =
                    e.compare_exchange(v, self.fmt.table(t), Ordering::AcqRel, Ordering::Acquire);
                // The deliberately broken variant the loom model must catch
                // (`RUSTFLAGS="--cfg loom --cfg loom_broken_install"`): a
                // plain store, as if nobody else could install here.
                #[cfg(loom_broken_install)]
                let installed = {
                    e.fetch_and(0, Ordering::AcqRel);
                    e.fetch_or(self.fmt.table(t), Ordering::AcqRel);
                    Ok::<u64, u64>(v)
                };
                match installed {
                    Ok(_) => {
                        self.clean_entries(table, idx, idx + 1);
                        self.shared_lent.tables.fetch_add(1, StatOrdering::Relaxed);
                        self.count_add_shared(slot, 1);
                        left_empty = true;
                        break t;
                    }
                    Err(cur) => {
                        // Lost the race: our page was never visible.
                        // SAFETY: lent just above, never published.
                        unsafe { self.mem.free(t, 1) };
                        v = cur;
                    }
                }
            };
            slot = counts::slot(table, idx);
            table = child;
        }
        Ok((table, slot))
    }

    /// [`map`](Self::map) through `&self` of a physically contiguous range,
    /// across as many tables as it spans, in the shapes the exclusive path
    /// gives it: a block (2 MiB, 1 GiB where the format allows) wherever
    /// the range covers one aligned in IOVA and PA and the entry is not
    /// valid, pages elsewhere (also in an empty table left attached where
    /// a block could go, as `map_rec` does). See
    /// [`map_pages_shared`](Self::map_pages_shared) for the order of the
    /// work. The caller checked what `map_prechecked` requires, and that
    /// no other call changes `[iova, end)` meanwhile (only disjoint ranges
    /// run at once). All or nothing for translations, as `map_pages_shared`.
    pub(crate) fn map_shared(
        &self,
        hint: &LeafHint,
        iova: u64,
        pa: u64,
        end: u64,
        attrs: MapAttrs,
    ) -> Result<(), SharedMapError> {
        debug_assert!(self.check_range(DmaAddr(iova), end - iova) == Ok(end));
        if pa.checked_add(end - iova).is_none_or(|e| e > self.oa_limit) {
            return Err(SharedMapError {
                error: PageTableError::PhysTooLarge { phys: PhysAddr(pa) },
                left_empty: false,
            });
        }
        self.map_run_shared(hint, iova, end, |off| pa + off, true, attrs)
    }

    /// The leaf table of `region` (an IOVA's bits above the leaf table's
    /// span) for a map: from `hint`, else by a walk that installs missing
    /// tables (and fills `hint`).
    #[inline(always)]
    fn leaf_for_map(&self, hint: &LeafHint, iova: u64) -> Result<(PhysAddr, u64), SharedMapError> {
        let region = iova >> LEAF_TABLE_SHIFT;
        if let Some(t) = hint.get(region, self.generation()) {
            return Ok(t);
        }
        let t = self.walk_shared(iova, 0)?;
        hint.put(region, self.generation(), t);
        Ok(t)
    }

    /// [`map_pages`](Self::map_pages) through `&self`: one 4 KiB page of
    /// `pages` after another from `iova`, across as many leaf tables as
    /// they span, each table's entries written in one pass and its count
    /// changed once. The caller checked that `[iova, iova + 4 KiB ×
    /// pages.len())` is a non-empty page-aligned range inside the input
    /// range, that `attrs` grant read or write, and that no other call
    /// changes the range meanwhile (only disjoint ranges run at once).
    ///
    /// All or nothing for translations: the pages and the range are
    /// checked first (no entry written on [`PageTableError::Unaligned`],
    /// [`PageTableError::PhysTooLarge`] or
    /// [`PageTableError::AlreadyMapped`]); when a table cannot be lent
    /// ([`PageTableError::OutOfMemory`]) the entries written so far are
    /// cleared again, and the caller queues the range's invalidation (a
    /// walker may have cached them). Tables attached on the way may stay,
    /// empty ([`SharedMapError::left_empty`]).
    pub(crate) fn map_pages_shared(
        &self,
        hint: &LeafHint,
        iova: u64,
        pages: &[PhysAddr],
        attrs: MapAttrs,
    ) -> Result<(), SharedMapError> {
        let end = iova + pages.len() as u64 * PAGE_SIZE;
        debug_assert!(self.check_range(DmaAddr(iova), end - iova) == Ok(end));
        self.check_pages(pages).map_err(|error| SharedMapError {
            error,
            left_empty: false,
        })?;
        self.map_run_shared(
            hint,
            iova,
            end,
            |off| pages[(off / PAGE_SIZE) as usize].0,
            false,
            attrs,
        )
    }

    /// Maps `[iova, end)`, the page at offset `off` of it to `pa_of(off)`
    /// (checked: aligned, inside the output range), with `attrs`; with
    /// `blocks`, `pa_of` is linear and blocks go where they fit. First a
    /// look that nothing is mapped in the range, then the entries, a table
    /// at a time (see [`map_pages_shared`](Self::map_pages_shared)).
    #[inline]
    fn map_run_shared(
        &self,
        hint: &LeafHint,
        iova: u64,
        end: u64,
        pa_of: impl Fn(u64) -> u64,
        blocks: bool,
        attrs: MapAttrs,
    ) -> Result<(), SharedMapError> {
        // Every format's page descriptor is its output address ORed with
        // attribute bits.
        let bits = match self.known_page_bits(attrs) {
            Some(b) => b,
            None => self.fmt.leaf(PhysAddr(0), 0, attrs),
        };
        if let Some(at) = self.first_mapped_shared(hint, iova, end) {
            return Err(SharedMapError {
                error: PageTableError::AlreadyMapped { iova: DmaAddr(at) },
                left_empty: false,
            });
        }
        let mut cur = iova;
        while cur < end {
            let step = if blocks {
                self.block_shared(cur, end, pa_of(cur - iova), attrs)
            } else {
                Ok(None)
            };
            let step = match step {
                Ok(Some(span)) => Ok(span),
                Ok(None) => self.leaf_for_map(hint, cur).map(|(leaf, slot)| {
                    let i0 = index(cur, 0);
                    let here = (ENTRIES - i0).min(((end - cur) / PAGE_SIZE) as usize);
                    for k in 0..here {
                        let pa = pa_of(cur - iova + k as u64 * PAGE_SIZE);
                        debug_assert_eq!(self.fmt.leaf(PhysAddr(pa), 0, attrs), pa | bits);
                        // Only this CPU writes these entries (disjoint ranges).
                        self.write(leaf, i0 + k, pa | bits);
                    }
                    self.clean_entries(leaf, i0, i0 + here);
                    self.count_add_shared(slot, here as u64);
                    here as u64 * PAGE_SIZE
                }),
                Err(e) => Err(e),
            };
            match step {
                Ok(span) => cur += span,
                Err(e) => {
                    // Take back what this call wrote: only its own range,
                    // checked empty above.
                    let mut left_empty = e.left_empty;
                    let _ = self.unmap_present_shared(iova, cur, &mut |_| left_empty = true);
                    return Err(SharedMapError {
                        error: e.error,
                        left_empty,
                    });
                }
            }
        }
        Ok(())
    }

    /// A block for the linear range `[cur, end)` from `pa` at `cur`: the
    /// highest the format allows that fits, aligned in IOVA and PA, whose
    /// entry is not valid — written, its span returned. `Ok(None)` when no
    /// block fits (or a table is there: pages go into it).
    fn block_shared(
        &self,
        cur: u64,
        end: u64,
        pa: u64,
        attrs: MapAttrs,
    ) -> Result<Option<u64>, SharedMapError> {
        for h in (1..self.top_height()).rev() {
            let span = 1u64 << (12 + BITS_PER_LEVEL * h);
            if cur & (span - 1) != 0
                || pa & (span - 1) != 0
                || end - cur < span
                || !self.fmt.leaf_allowed(h)
            {
                continue;
            }
            let (table, slot) = self.walk_shared(cur, h)?;
            let idx = index(cur, h);
            let e = self.word(table, idx);
            if let Pte::Invalid = self.fmt.decode(e.load(Ordering::Acquire), h) {
                // Only this CPU writes this entry (disjoint ranges); others
                // reach it only to translate, atomically.
                e.store(self.fmt.leaf(PhysAddr(pa), h, attrs), Ordering::Release);
                self.clean_entries(table, idx, idx + 1);
                self.count_add_shared(slot, 1);
                return Ok(Some(span));
            }
        }
        Ok(None)
    }

    /// What a walk that changes nothing finds on the way to `iova`.
    #[inline]
    fn probe_shared(&self, iova: u64) -> Probe {
        let (mut table, mut slot) = (self.root, 0u64);
        for h in (1..=self.top_height()).rev() {
            let idx = index(iova, h);
            match self
                .fmt
                .decode(self.word(table, idx).load(Ordering::Acquire), h)
            {
                Pte::Table(t) => {
                    slot = counts::slot(table, idx);
                    table = t;
                }
                Pte::Invalid => return Probe::Hole(h),
                Pte::Leaf { .. } => {
                    return Probe::Block {
                        h,
                        table,
                        idx,
                        slot,
                    };
                }
            }
        }
        Probe::Leaf(table, slot)
    }

    /// [`probe_shared`](Self::probe_shared), the leaf table taken from
    /// `hint` when it holds the region (the hint is not filled).
    #[inline(always)]
    fn probe_hinted(&self, hint: &LeafHint, iova: u64) -> Probe {
        match hint.get(iova >> LEAF_TABLE_SHIFT, self.generation()) {
            Some((leaf, slot)) => Probe::Leaf(leaf, slot),
            None => self.probe_shared(iova),
        }
    }

    /// The first address of `[iova, end)` something maps, by walks that
    /// change nothing (leaf tables from `hint` where it holds them).
    fn first_mapped_shared(&self, hint: &LeafHint, iova: u64, end: u64) -> Option<u64> {
        let mut cur = iova;
        while cur < end {
            match self.probe_hinted(hint, cur) {
                Probe::Hole(h) => cur = span_end(cur, h, end),
                Probe::Block { .. } => return Some(cur),
                Probe::Leaf(leaf, _) => {
                    let next = span_end(cur, 1, end);
                    let i0 = index(cur, 0);
                    let i1 = i0 + ((next - cur) / PAGE_SIZE) as usize;
                    if let Some(i) = (i0..i1).find(|&i| self.present(self.read(leaf, i), 0)) {
                        return Some(cur + (i - i0) as u64 * PAGE_SIZE);
                    }
                    cur = next;
                }
            }
        }
        None
    }

    /// The table's detach generation (see [`LeafHint`]).
    #[inline(always)]
    fn generation(&self) -> u64 {
        self.detach_gen
    }

    /// The one-page [`map_shared`](Self::map_shared), for an `iova` the
    /// caller proved page aligned and inside the input range (a page of a
    /// transaction), when `attrs` are those of the last exclusive map (their
    /// descriptor bits are known, as on `map_page_in_range`): the leaf table
    /// from `hint` or a walk (which fills `hint`). `None` (nothing done) for
    /// any other call. On an error no translation changed; tables the walk
    /// attached may stay, empty ([`SharedMapError::left_empty`]).
    #[inline(always)]
    pub(crate) fn map_page_shared(
        &self,
        hint: &LeafHint,
        iova: u64,
        pa: u64,
        attrs: MapAttrs,
    ) -> Option<Result<(), SharedMapError>> {
        debug_assert!(iova % PAGE_SIZE == 0 && iova < self.ias_limit);
        if pa & (PAGE_SIZE - 1) != 0 || pa >= self.oa_limit {
            return None;
        }
        // The descriptor: the exclusive path's cached bits when the
        // attributes are the same (read-write, by default), or a plain
        // direction's precomputed bits (a one-way DMA buffer), else
        // encoded here (this path cannot update the cache). Attributes
        // granting no access go to the slow path, for its error.
        let desc = if let Some(bits) = self.known_page_bits(attrs) {
            pa | bits
        } else if attrs.intersects(MapAttrs::READ | MapAttrs::WRITE) {
            self.fmt.leaf(PhysAddr(pa), 0, attrs)
        } else {
            return None;
        };
        let (leaf, slot) = match self.leaf_for_map(hint, iova) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let i = index(iova, 0);
        if self.present(self.read(leaf, i), 0) {
            return Some(Err(SharedMapError {
                error: PageTableError::AlreadyMapped {
                    iova: DmaAddr(iova),
                },
                left_empty: false,
            }));
        }
        debug_assert_eq!(self.fmt.leaf(PhysAddr(pa), 0, attrs), desc);
        // Only this CPU writes this entry (disjoint ranges).
        self.write(leaf, i, desc);
        self.clean_entries(leaf, i, i + 1);
        self.count_add_shared(slot, 1);
        Some(Ok(()))
    }

    /// The one-page [`unmap_shared`](Self::unmap_shared) for an `iova` the
    /// caller proved page aligned and inside the input range: whether the
    /// leaf table is now empty. The leaf table from `hint` or a walk (which
    /// fills `hint`). `None` (nothing changed) when the page is not mapped
    /// by a page descriptor.
    #[inline(always)]
    pub(crate) fn unmap_page_shared(&self, hint: &LeafHint, iova: u64) -> Option<bool> {
        debug_assert!(iova % PAGE_SIZE == 0 && iova < self.ias_limit);
        let region = iova >> LEAF_TABLE_SHIFT;
        let (leaf, slot) = match hint.get(region, self.generation()) {
            Some(t) => t,
            None => {
                let Probe::Leaf(leaf, slot) = self.probe_shared(iova) else {
                    return None;
                };
                hint.put(region, self.generation(), (leaf, slot));
                (leaf, slot)
            }
        };
        let i = index(iova, 0);
        if !self.present(self.read(leaf, i), 0) {
            return None;
        }
        self.write(leaf, i, 0);
        self.clean_entries(leaf, i, i + 1);
        Some(self.count_sub_shared(slot, 1) == 0)
    }

    /// [`unmap`](Self::unmap) through `&self` of a range wholly mapped by
    /// pages and whole blocks, across as many tables as it spans (leaf
    /// tables from `hint` or walks that change nothing): the bytes
    /// unmapped; `on_empty` gets an address in each table left empty.
    /// Never detaches a table. `None` (nothing changed) when a page of the
    /// range is not mapped or a block lies across its edge, which the
    /// exclusive path handles (and names the error of). The caller makes
    /// sure no other call changes the range meanwhile (only disjoint ranges
    /// run at once).
    pub(crate) fn unmap_shared(
        &self,
        hint: &LeafHint,
        iova: u64,
        end: u64,
        on_empty: &mut impl FnMut(u64),
    ) -> Option<u64> {
        debug_assert!(self.check_range(DmaAddr(iova), end - iova) == Ok(end));
        // Every page of the range mapped, by pages or whole blocks, first.
        let mut cur = iova;
        while cur < end {
            match self.probe_hinted(hint, cur) {
                Probe::Hole(_) => return None,
                Probe::Block { h, .. } => {
                    let span = 1u64 << (12 + BITS_PER_LEVEL * h);
                    if cur & (span - 1) != 0 || end - cur < span {
                        return None;
                    }
                    cur += span;
                }
                Probe::Leaf(leaf, _) => {
                    let next = span_end(cur, 1, end);
                    let i0 = index(cur, 0);
                    let i1 = i0 + ((next - cur) / PAGE_SIZE) as usize;
                    for i in i0..i1 {
                        if !matches!(self.fmt.decode(self.read(leaf, i), 0), Pte::Leaf { .. }) {
                            return None;
                        }
                    }
                    cur = next;
                }
            }
        }
        self.unmap_present_shared(iova, end, on_empty).ok()
    }

    /// [`unmap_present`](Self::unmap_present) through `&self`: clears every
    /// page and every whole block mapped in `[iova, end)`, skipping holes;
    /// `on_empty` gets an address in each table left empty. `Err(bytes so
    /// far)` when it meets a block across the range's edge: the rest is
    /// the exclusive path's (calling its `unmap_present` on the whole range
    /// is right: what was cleared here is a hole for it).
    pub(crate) fn unmap_present_shared(
        &self,
        iova: u64,
        end: u64,
        on_empty: &mut impl FnMut(u64),
    ) -> Result<u64, u64> {
        let mut bytes = 0;
        let mut cur = iova;
        while cur < end {
            match self.probe_shared(cur) {
                Probe::Hole(h) => cur = span_end(cur, h, end),
                Probe::Block {
                    h,
                    table,
                    idx,
                    slot,
                } => {
                    let span = 1u64 << (12 + BITS_PER_LEVEL * h);
                    if cur & (span - 1) != 0 || end - cur < span {
                        return Err(bytes);
                    }
                    self.word(table, idx).store(0, Ordering::Release);
                    self.clean_entries(table, idx, idx + 1);
                    bytes += span;
                    if self.count_sub_shared(slot, 1) == 0 {
                        on_empty(cur);
                    }
                    cur += span;
                }
                Probe::Leaf(leaf, slot) => {
                    let next = span_end(cur, 1, end);
                    let i0 = index(cur, 0);
                    let i1 = i0 + ((next - cur) / PAGE_SIZE) as usize;
                    let mut n = 0u64;
                    for i in i0..i1 {
                        if self.present(self.read(leaf, i), 0) {
                            self.write(leaf, i, 0);
                            n += 1;
                        }
                    }
                    if n > 0 {
                        self.clean_entries(leaf, i0, i1);
                        bytes += n * PAGE_SIZE;
                        if self.count_sub_shared(slot, n) == 0 {
                            on_empty(cur);
                        }
                    }
                    cur = next;
                }
            }
        }
        Ok(bytes)
    }

    /// [`translate`](Self::translate) through `&self` while shared calls
    /// run (the upper entries read atomically).
    pub(crate) fn translate_shared(&self, iova: DmaAddr) -> Option<(PhysAddr, MapAttrs, u32)> {
        if iova.0 >> self.ias_bits() != 0 {
            return None;
        }
        let mut table = self.root;
        let mut h = self.top_height();
        loop {
            let v = if h > 0 {
                self.word(table, index(iova.0, h)).load(Ordering::Acquire)
            } else {
                // A leaf entry of a range some CPU owns: read as the
                // exclusive path does (the owner is the caller, or the
                // entry is another CPU's and only its value is racy).
                self.read(table, index(iova.0, 0))
            };
            match self.fmt.decode(v, h) {
                Pte::Invalid => return None,
                Pte::Leaf { pa, attrs } => {
                    let off = iova.0 & ((1u64 << (12 + BITS_PER_LEVEL * h)) - 1);
                    return Some((PhysAddr(pa.0 + off), attrs, h));
                }
                Pte::Table(t) if h > 0 => {
                    table = t;
                    h -= 1;
                }
                Pte::Table(_) => return None,
            }
        }
    }

    /// Exclusive side: folds the pages the shared path attached into the
    /// table's own counters (before anything detaches them).
    pub(crate) fn fold_shared(&mut self) {
        self.table_pages += core::mem::take(self.shared_lent.tables.get_mut());
    }

    /// Exclusive side: detaches the empty tables on the path to `iova`,
    /// from the deepest up, stopping at the first that is not empty (never
    /// the root nor a kept table), and retires them as an unmap does. Returns the range the
    /// highest detached table covered (`(start, len)`, to invalidate with
    /// the walk caches), or `None` when nothing was detached.
    pub(crate) fn reclaim_empty(&mut self, iova: u64) -> Option<(u64, u64)> {
        self.fold_shared();
        if iova >> self.ias_bits() != 0 {
            return None;
        }
        let mut path = [((PhysAddr(0), 0u64), 0usize); 5];
        let mut node = (self.root, 0u64);
        let mut depth = 0usize;
        for h in (1..=self.top_height()).rev() {
            let idx = index(iova, h);
            let Pte::Table(t) = self.fmt.decode(self.read(node.0, idx), h) else {
                break;
            };
            *path.get_mut(depth)? = (node, idx);
            depth += 1;
            node = (t, counts::slot(node.0, idx));
        }
        let mut range = None;
        // `node` is the deepest table on the path; `path[depth - 1]` holds
        // the entry pointing at it.
        while depth > 0 && node.0 != self.root {
            let h = self.top_height() + 1 - depth as u32;
            // A kept table (`kept_height`) stays, as on the exclusive path.
            if h - 1 == self.kept_height || !self.is_empty_at(node.1, node.0, h - 1) {
                break;
            }
            let (parent, idx) = path[depth - 1];
            self.detach_child(parent, idx, node.0);
            self.clean_entries(parent.0, idx, idx + 1);
            let span = 1u64 << (12 + BITS_PER_LEVEL * h);
            range = Some((iova & !(span - 1), span));
            node = parent;
            depth -= 1;
        }
        range
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    extern crate std;

    use super::*;
    use crate::pgtable::arm::ArmStage1;
    use crate::testing::heap::HostMemory;

    const RW: MapAttrs = MapAttrs::READ.union(MapAttrs::WRITE);

    /// Where the table maps `iova` (a software walk).
    fn pa_at<M: TableMemory>(pt: &IoPageTable<ArmStage1, M>, iova: u64) -> Option<PhysAddr> {
        pt.translate(DmaAddr(iova)).map(|t| t.0)
    }

    #[test]
    fn shared_maps_and_unmaps_keep_counts_and_reclaim_empties_the_path() {
        let mem = HostMemory::default();
        let mut pt = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
        let h = LeafHint::new();
        let iova = 0x4020_0000u64;
        assert_eq!(
            pt.map_shared(&h, iova, 0x9000_0000, iova + 0x3000, RW),
            Ok(())
        );
        assert_eq!(pt.table_pages(), 4);
        pt.check_counts().unwrap();
        let again = pt.map_shared(&h, iova + 0x2000, 0x9000_0000, iova + 0x3000, RW);
        assert!(matches!(
            again,
            Err(SharedMapError { error: PageTableError::AlreadyMapped { iova: DmaAddr(a) }, left_empty: false }) if a == iova + 0x2000
        ));
        let mut emptied = std::vec::Vec::new();
        let mut on_empty = |a| emptied.push(a);
        assert_eq!(
            pt.unmap_shared(&h, iova, iova + 0x1000, &mut on_empty),
            Some(0x1000)
        );
        assert_eq!(
            pt.unmap_shared(&h, iova, iova + 0x1000, &mut on_empty),
            None,
            "not mapped"
        );
        assert_eq!(
            pt.unmap_shared(&h, iova + 0x1000, iova + 0x3000, &mut on_empty),
            Some(0x2000)
        );
        assert_eq!(emptied, [iova + 0x1000], "emptied by the last unmap");
        pt.check_counts().unwrap();
        assert_eq!(pt.table_pages(), 4, "the shared path never detaches");
        // Up to the root's child, which stays (`kept_height`).
        assert_eq!(pt.reclaim_empty(iova), Some((1 << 30, 1 << 30)));
        assert_eq!(pt.table_pages(), 2);
        assert_eq!(pt.retired_pages(), 2, "the leaf table and its parent");
        pt.free_retired();
        pt.check_counts().unwrap();
    }

    /// A contiguous range across a leaf table's edge is mapped and unmapped
    /// on the shared path, each table counted.
    #[test]
    fn shared_maps_and_unmaps_cross_leaf_tables() {
        let mem = HostMemory::default();
        let pt = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
        let h = LeafHint::new();
        let edge = 0x4040_0000u64;
        let (iova, end) = (edge - 0x2000, edge + 0x3000);
        assert_eq!(pt.map_shared(&h, iova, 0x9000_0000, end, RW), Ok(()));
        for k in 0..5u64 {
            assert_eq!(
                pa_at(&pt, iova + k * 0x1000),
                Some(PhysAddr(0x9000_0000 + k * 0x1000))
            );
        }
        pt.check_counts().unwrap();
        // A page of the second table missing: nothing changes.
        let mut emptied = std::vec::Vec::new();
        let mut on_empty = |a| emptied.push(a);
        assert_eq!(pt.unmap_shared(&h, iova, end + 0x1000, &mut on_empty), None);
        assert_eq!(pa_at(&pt, iova), Some(PhysAddr(0x9000_0000)));
        assert_eq!(pt.unmap_shared(&h, iova, end, &mut on_empty), Some(0x5000));
        assert_eq!(emptied, [iova, edge]);
        pt.check_counts().unwrap();
        // Where a block could go but an empty table is left attached:
        // pages into it, as the exclusive path does.
        assert_eq!(
            pt.map_shared(&h, edge, 0x8000_0000, edge + (2 << 20), RW),
            Ok(())
        );
        let d = pt.descriptor_at(DmaAddr(edge), 1).unwrap();
        assert!(matches!(ArmStage1.decode(d, 1), Pte::Table(_)));
        pt.check_counts().unwrap();
    }

    /// A contiguous range holding a whole 2 MiB aligned alike in IOVA and
    /// PA is mapped as the exclusive path maps it — a block in the middle,
    /// pages on both sides — and unmapped whole on the shared path; an
    /// unmap cutting the block changes nothing.
    #[test]
    fn shared_maps_and_unmaps_blocks() {
        let mem = HostMemory::default();
        let pt = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
        let h = LeafHint::new();
        let edge = 0x8000_0000u64;
        let (a, end, pa) = (
            edge - (1 << 20),
            edge + (3 << 20),
            0x1_0000_0000 - (1 << 20),
        );
        for round in 0..2 {
            assert_eq!(pt.map_shared(&h, a, pa, end, RW), Ok(()), "round {round}");
            let d = pt.descriptor_at(DmaAddr(edge), 1).unwrap();
            assert!(
                matches!(ArmStage1.decode(d, 1), Pte::Leaf { .. }),
                "a block"
            );
            for off in [0, 0xff000, 0x10_0000, 0x12_3000, 0x2f_f000, 0x3f_f000] {
                assert_eq!(
                    pa_at(&pt, a + off),
                    Some(PhysAddr(pa + off)),
                    "offset {off:#x}"
                );
            }
            pt.check_counts().unwrap();
            let mut emptied = std::vec::Vec::new();
            let mut on_empty = |x| emptied.push(x);
            assert_eq!(
                pt.unmap_shared(&h, edge + 0x1000, edge + 0x2000, &mut on_empty),
                None
            );
            assert_eq!(pa_at(&pt, edge + 0x1000), Some(PhysAddr(pa + 0x10_1000)));
            assert_eq!(pt.unmap_shared(&h, a, end, &mut on_empty), Some(end - a));
            assert_eq!(emptied, [a, edge + (2 << 20)], "the two leaf tables");
            assert_eq!(pt.translate(DmaAddr(edge)), None);
            pt.check_counts().unwrap();
        }
    }

    #[test]
    fn reclaim_stops_at_a_table_still_in_use() {
        let mem = HostMemory::default();
        let mut pt = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
        let a = 0x4020_0000u64;
        let b = a + (1 << 21);
        let h = LeafHint::new();
        pt.map_shared(&h, a, 0x9000_0000, a + 0x1000, RW).unwrap();
        pt.map_shared(&h, b, 0x9000_0000, b + 0x1000, RW).unwrap();
        pt.unmap_shared(&h, a, a + 0x1000, &mut |_| {}).unwrap();
        assert_eq!(pt.reclaim_empty(a), Some((a, 1 << 21)));
        assert_eq!(pt.reclaim_empty(b), None, "b's leaf table holds a page");
        assert_eq!(pa_at(&pt, b), Some(PhysAddr(0x9000_0000)));
        pt.check_counts().unwrap();
    }
}
