//! [`SharedDomain`]: one domain used from several CPUs.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64 as StatU64, AtomicUsize};

use super::SplitSync;
use super::lock::{Padded, SLOTS, ShardedRwLock, SpinLock};
use super::sync::{AtomicU64, Ordering};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::error::DmaError;
use crate::iova::IovaAllocator;
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, LeafHint, MapAttrs, PteFormat, SharedMapError};
use crate::state::{DirectState, DmaPath, Domain, IovaState, SharedEffect, SharedPending};

/// IOVA shards: one per reader slot of the domain lock.
const SHARDS: usize = SLOTS;
/// Leaf tables left empty a shard remembers for reclaiming.
const EMPTIES: usize = 8;
/// Largest IOVA chunk a shard takes from the domain's allocator.
const MAX_CHUNK: u64 = 1 << 30;
/// Smallest: one leaf table's span, so two shards never share a leaf table.
const MIN_CHUNK: u64 = 1 << 21;
/// Looks at a side's `done_ticket` before a sync with nothing of its own
/// asks the IOMMU whether another CPU's completion arrived.
const DONE_LOOKS: u32 = 64;

struct Guarded<F: PteFormat, M: TableMemory> {
    dom: Domain<F, M>,
    /// Table pages `sync_finish` handed back so far.
    popped: u64,
}

/// What a shard (or the domain-wide side) keeps under its short lock.
struct Side {
    /// Ranges changed since the last sync.
    pending: SharedPending,
    /// 2 MiB regions whose leaf table a shared unlink left empty.
    empties: heapless::Vec<u64, EMPTIES>,
}

impl Side {
    const fn new() -> Self {
        Self {
            pending: SharedPending::new(),
            empties: heapless::Vec::new(),
        }
    }
}

struct Shard {
    /// The shard's chunk of IOVA space, once granted (else unset).
    alloc: IovaAllocator,
    side: Side,
}

/// A [`Domain`] several CPUs use at once.
///
/// **Link and unlink run in parallel** on disjoint transactions: they take
/// the read side of a reader-writer lock whose readers enter per-shard
/// slots (no shared cache line is written to enter), and change
/// the tables through the shared-access path of the page table (tables
/// installed by compare-and-swap, counts changed atomically; see the
/// [module docs](super)). What that path does not take (bus-address P2P,
/// an error to name) runs on the write side, as the plain `Domain` methods.
///
/// **IOVAs** come from four shards, each a chunk of the aperture taken
/// from the domain's allocator and handed out under its own short spin
/// lock; a CPU keeps to its own shard (by a hint, see `home`), and frees go
/// back to the shard that holds the range. A request a shard cannot serve
/// (larger than a chunk, below a narrow DMA mask, a full chunk) goes to the
/// domain's allocator, with its errors.
///
/// **Sync** waits for the IOMMU outside every lock: the pending ranges of
/// the sides it covers and one completion are queued while it holds those
/// sides' sync words, and the wait runs without them. Each side (a shard's,
/// and the domain-wide one) has its own sync word on a line of its own.
/// [`sync_for`](Self::sync_for) and [`destroy`](Self::destroy) cover one
/// transaction: every unlink of it that returned before they began, on any
/// CPU (its ranges are kept in its shard's side, or the domain-wide one),
/// reading and writing only those two words, so CPUs syncing their own
/// transactions share no line there. [`sync`](Self::sync) covers every
/// unlink that returned before it began, on any CPU: it reads every word
/// and drains every side with pending ranges, so syncs of several CPUs at
/// once slow each other down (use `sync_for` on several CPUs). When another
/// CPU's sync took the ranges, either waits for that completion too.
///
/// The guarantees of [`Domain`] hold: a failed link changes no translation;
/// a table page leaves the tables only on the write side, and goes back to
/// the lender only after a completion that covers its invalidation. A
/// failed sync hands nothing back and makes the next one invalidate the
/// whole domain.
///
/// Use it with a backend that splits its sync ([`SplitSync`]): a CPU's
/// [`IommuCpu`](super::IommuCpu) handle on a
/// [`SharedIommu`](super::SharedIommu), or a driver owned by one CPU; all
/// syncs of one shared domain go through one IOMMU. Not for interrupt
/// context (it spins on its locks).
///
/// Size: about 31 KiB inline on 64-bit targets (four IOVA shards of
/// [`MAX_RANGES`](crate::iova::MAX_RANGES) ranges each, every lock on its
/// own cache lines): build it where the stack has room, or in a static.
pub struct SharedDomain<F: PteFormat, M: TableMemory> {
    dom: ShardedRwLock<Guarded<F, M>>,
    shards: [Padded<SpinLock<Shard>>; SHARDS],
    /// Each shard's last leaf table, for the one-page link and unlink
    /// (see [`LeafHint`] for why following one is safe, with several CPUs
    /// on one shard too).
    hints: [Padded<LeafHint>; SHARDS],
    /// Pending ranges of what no shard holds (the write side's work,
    /// transactions from the domain's allocator).
    global: Padded<SpinLock<Side>>,
    /// Each shard's chunk `[start, end)` once granted (never changes after).
    bounds: [(StatU64, StatU64); SHARDS],
    /// Each shard's chunk start `>> chunk_shift` once granted (chunks are
    /// aligned to their size), `u64::MAX` before: one compare tells
    /// whether a page is in the shard.
    chunk_no: [StatU64; SHARDS],
    /// log2 of `chunk` (63 when the domain is not sharded).
    chunk_shift: u32,
    /// Which stack region claimed each shard (`home`).
    owners: [AtomicUsize; SHARDS],
    /// The calling CPU's index, when the user gave a way to read it.
    cpu: Option<fn() -> usize>,
    /// Chunk size, 0 when the aperture is too small to shard.
    chunk: u64,
    translated: bool,
    id: u16,
    /// The domain's token (`Domain::owns` without the domain).
    token: u32,
    st: Padded<ReadMostly>,
    /// One per side (the shards', then the domain-wide one), each on a
    /// line of its own: CPUs on different shards write no common line to
    /// link, unlink or sync.
    words: [Padded<SyncWord>; SHARDS + 1],
}

/// What every link, unlink and sync reads and only the write side (or a
/// change of backend) writes.
struct ReadMostly {
    /// Table pages retired and not handed back, as the write side last
    /// left it (retiring happens only there).
    retired: AtomicUsize,
    /// Whether linked ranges need invalidating: 0 not known yet, 1 no, 2 yes.
    maps: AtomicU8,
    /// A shard's list of empty leaf tables is full: reclaim at a sync.
    reclaim_wanted: AtomicBool,
    /// A full list dropped a hint: the next reclaim sweeps the whole table
    /// (`Domain::reclaim_empty_tables`' walk) instead of following hints.
    sweep_wanted: AtomicBool,
}

/// Bit of [`SyncWord::state`]: the side's pending ranges went from empty
/// to not empty since a sync last took the word.
const PENDING: u64 = 1;
/// A sync holds the word: it is between taking it and publishing its
/// ticket (the side's sync lock, in the same cache line as what it
/// guards).
const TAKING: u64 = 2;
/// Every side's word: what [`SharedDomain::sync`] covers.
const ALL_WORDS: u32 = (1 << (SHARDS + 1)) - 1;

/// What the unlinks and syncs of one side write. A sync waits, holding no
/// word, until no other sync holds one it covers, then takes those with
/// pending ranges (should another sync take one first, it lets go of all
/// and takes them in index order, waiting for each: every sync that waits
/// while holding words does so in that order, so there is no cycle),
/// queues their ranges and one completion, publishes its ticket in each
/// and releases them.
struct SyncWord {
    /// [`PENDING`] and [`TAKING`]. Zero means: every range an unlink left
    /// in the side was taken by a sync that has published its ticket in
    /// `last_ticket`.
    state: AtomicU64,
    /// Newest completion ticket a sync that took this word submitted.
    last_ticket: AtomicU64,
    /// Newest ticket a sync that took this word (or waited for its
    /// `last_ticket`) saw done.
    done_ticket: AtomicU64,
}

impl SyncWord {
    fn new() -> Self {
        Self {
            state: AtomicU64::new(0),
            last_ticket: AtomicU64::new(0),
            done_ticket: AtomicU64::new(0),
        }
    }

    /// The word's ticket when a sync still has to see it done.
    #[inline]
    fn unseen_ticket(&self) -> Option<u64> {
        let last = self.last_ticket.load(Ordering::Acquire);
        (last > self.done_ticket.load(Ordering::Acquire)).then_some(last)
    }

    /// Notes that `ticket` was seen done.
    #[inline]
    fn seen(&self, ticket: u64) {
        if ticket > self.done_ticket.load(Ordering::Relaxed) {
            self.done_ticket.fetch_max(ticket, Ordering::AcqRel);
        }
    }
}

impl<F: PteFormat, M: TableMemory> SharedDomain<F, M> {
    /// Shares `dom`. Each CPU's shard (its IOVA chunk, reader slot and
    /// leaf-table hint) is found from its stack: the first call from a
    /// region of 16 KiB claims a free shard for it. That needs no help from
    /// the user but can go wrong: a CPU whose calls run on both sides of a
    /// region's edge (a stack larger than 16 KiB) claims two shards, and
    /// once the four are claimed CPUs share one (correct, slower). Where the
    /// CPU's index is at hand, use [`with_cpu_index`](Self::with_cpu_index).
    pub fn new(dom: Domain<F, M>) -> Self {
        Self::build(dom, None)
    }

    /// Shares `dom`, with `cpu` telling which CPU calls: a cheap read of
    /// the caller's index (a per-CPU variable, `MPIDR_EL1`'s affinity, the
    /// local APIC ID — any number, called on every call of this domain,
    /// also on the read side: it must not take locks or fault). CPUs whose
    /// indices differ modulo four get shards of their own; equal ones
    /// share (correct, slower). A wrong or changing answer costs speed,
    /// never correctness: every shard serves any CPU.
    pub fn with_cpu_index(dom: Domain<F, M>, cpu: fn() -> usize) -> Self {
        Self::build(dom, Some(cpu))
    }

    fn build(dom: Domain<F, M>, cpu: Option<fn() -> usize>) -> Self {
        let translated = dom.aperture().is_some();
        let chunk = dom.aperture().map_or(0, |(s, e)| {
            let c = ((e - s) / (2 * SHARDS as u64)).min(MAX_CHUNK);
            if c < MIN_CHUNK {
                0
            } else {
                1u64 << (63 - c.leading_zeros())
            }
        });
        let id = dom.id();
        let token = dom.token();
        Self {
            dom: ShardedRwLock::new(Guarded { dom, popped: 0 }),
            shards: core::array::from_fn(|_| {
                Padded(SpinLock::new(Shard {
                    alloc: IovaAllocator::unset(),
                    side: Side::new(),
                }))
            }),
            hints: core::array::from_fn(|_| Padded(LeafHint::new())),
            global: Padded(SpinLock::new(Side::new())),
            bounds: core::array::from_fn(|_| (StatU64::new(0), StatU64::new(0))),
            chunk_no: core::array::from_fn(|_| StatU64::new(u64::MAX)),
            chunk_shift: if chunk == 0 {
                63
            } else {
                chunk.trailing_zeros()
            },
            owners: core::array::from_fn(|_| AtomicUsize::new(0)),
            cpu,
            chunk,
            translated,
            id,
            token,
            st: Padded(ReadMostly {
                retired: AtomicUsize::new(0),
                maps: AtomicU8::new(0),
                reclaim_wanted: AtomicBool::new(false),
                sweep_wanted: AtomicBool::new(false),
            }),
            words: core::array::from_fn(|_| Padded(SyncWord::new())),
        }
    }

    /// The domain back (e.g. for [`Domain::teardown`]). Pending ranges go
    /// into its own (its next sync covers them); a shard's chunk goes back
    /// to its allocator when no transaction of it is open (transactions
    /// still open in a shard cannot be freed on the plain domain: free
    /// them first).
    pub fn into_inner(self) -> Domain<F, M> {
        let mut g = self.dom.into_inner();
        let mut all = SharedPending::new();
        for Padded(s) in self.shards {
            let mut s = s.into_inner();
            s.side.pending.drain_into(&mut all);
            if s.alloc.is_set() && s.alloc.ranges() == 0 {
                g.dom.return_chunk(s.alloc.aperture());
            }
        }
        self.global.0.into_inner().pending.drain_into(&mut all);
        g.dom.exclusive_done(&mut SharedPending::new());
        g.dom.absorb_pending(all);
        g.dom
    }

    /// This CPU's shard (and reader slot): a hint only, any answer is
    /// correct. The user's CPU index when given, else the region of the
    /// caller's stack (each CPU or thread runs on its own): the first call
    /// from a region claims a free shard for it.
    #[inline(always)]
    fn home(&self) -> usize {
        if let Some(cpu) = self.cpu {
            return cpu() % SHARDS;
        }
        let key = Self::stack_key();
        let start = (key.wrapping_mul(0x9E37_79B9) >> 7) % SHARDS;
        for i in 0..SHARDS {
            let j = (start + i) % SHARDS;
            let o = self.owners[j].load(core::sync::atomic::Ordering::Relaxed);
            if o == key {
                return j;
            }
            if o == 0
                && self.owners[j]
                    .compare_exchange(
                        0,
                        key,
                        core::sync::atomic::Ordering::Relaxed,
                        core::sync::atomic::Ordering::Relaxed,
                    )
                    .is_ok()
            {
                return j;
            }
        }
        start
    }

    /// The caller's stack region (never 0).
    #[cfg(not(any(loom, shuttle)))]
    #[inline(always)]
    fn stack_key() -> usize {
        let probe = 0u8;
        ((&raw const probe as usize) >> 14) | 1
    }

    /// Under loom: the model thread (stack addresses differ between runs,
    /// and a model must run the same way each time).
    #[cfg(loom)]
    fn stack_key() -> usize {
        extern crate std;
        use core::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        // Its printed form: loom's `ThreadId` also hashes something that
        // differs between the executions of one model (seen: one thread
        // got two keys), which made a sharded domain's model
        // nondeterministic; the printed index is the same in each.
        std::format!("{:?}", loom::thread::current().id()).hash(&mut h);
        (h.finish() as usize) | 1
    }

    /// Under shuttle: the test thread (a schedule must replay the same way
    /// from its seed).
    #[cfg(all(shuttle, not(loom)))]
    fn stack_key() -> usize {
        extern crate std;
        use core::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        shuttle::thread::current().id().hash(&mut h);
        (h.finish() as usize) | 1
    }

    /// The shard whose chunk holds `addr`.
    #[inline]
    fn shard_of(&self, addr: u64) -> Option<usize> {
        self.bounds.iter().position(|(s, e)| {
            let end = e.load(core::sync::atomic::Ordering::Acquire);
            addr < end && addr >= s.load(core::sync::atomic::Ordering::Relaxed)
        })
    }

    /// Runs `f` on the side (pending ranges, empty tables) of the shard
    /// holding `addr`, or the domain-wide one.
    #[inline]
    fn side<R>(&self, addr: u64, f: impl FnOnce(&mut Side) -> R) -> R {
        match self.shard_of(addr) {
            Some(k) => self.shards[k].with(|s| self.marked(&mut s.side, k, f)),
            None => self.global.with(|s| self.marked(s, SHARDS, f)),
        }
    }

    /// Runs `f` on side `k` (its lock held) and marks side `k`'s sync word
    /// [`PENDING`] when its pending ranges went from empty to not empty.
    #[inline]
    fn marked<R>(&self, side: &mut Side, k: usize, f: impl FnOnce(&mut Side) -> R) -> R {
        let was_empty = side.pending.is_empty(true);
        let r = f(side);
        if was_empty && !side.pending.is_empty(true) {
            self.words[k].state.fetch_or(PENDING, Ordering::AcqRel);
        }
        r
    }

    /// Runs `f` on the write side; the domain's own pending ranges move to
    /// the domain-wide list before the write side is left (so a sync that
    /// sees a table retired there also sees its range).
    fn exclusive<R>(&self, f: impl FnOnce(&mut Domain<F, M>) -> R) -> R {
        self.dom.write(|g| {
            g.dom.fold_shared();
            let r = f(&mut g.dom);
            let mut moved = SharedPending::new();
            g.dom.exclusive_done(&mut moved);
            if !moved.is_empty(true) {
                self.global
                    .with(|s| self.marked(s, SHARDS, |s| moved.drain_into(&mut s.pending)));
            }
            self.st
                .retired
                .store(g.dom.retired_pages(), core::sync::atomic::Ordering::Release);
            r
        })
    }

    /// Notes a leaf table left empty at `addr`, for a later reclaim.
    fn note_empty(&self, addr: u64) {
        let region = addr & !(MIN_CHUNK - 1);
        let (full, dropped) = self.side(addr, |s| {
            // A full list drops the hint; the reclaim then sweeps.
            let dropped = !s.empties.contains(&region) && s.empties.push(region).is_err();
            (s.empties.is_full(), dropped)
        });
        if dropped {
            self.st
                .sweep_wanted
                .store(true, core::sync::atomic::Ordering::Relaxed);
        }
        if full {
            self.st
                .reclaim_wanted
                .store(true, core::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether linked ranges must be recorded (until a sync said no).
    #[inline]
    fn maps_needed(&self) -> bool {
        self.st.maps.load(core::sync::atomic::Ordering::Relaxed) != 1
    }

    /// Runs `f` on the domain on the write side, for what has no method
    /// here (`reserve`, `try_alloc_at`, `link_p2p`, `translate`, …). Do not
    /// call [`Domain::sync`], `destroy`, `map` or `teardown` inside: they
    /// wait under the lock and bypass this wrapper's bookkeeping; use
    /// [`sync`](Self::sync) / [`destroy`](Self::destroy). A transaction
    /// from [`try_alloc`](Self::try_alloc) is freed with
    /// [`free`](Self::free) (its range may belong to a shard, which the
    /// plain [`Domain::free`] does not know).
    pub fn with<R>(&self, f: impl FnOnce(&mut Domain<F, M>) -> R) -> R {
        self.exclusive(|d| {
            let r = f(d);
            // `f` may have put another domain (another table, whose detach
            // generation may equal the hints') in place: no hint survives
            // it. (The write side: no CPU uses a hint meanwhile.)
            for h in &self.hints {
                h.forget();
            }
            r
        })
    }

    /// [`Domain::try_alloc`], from this CPU's shard when it can serve the
    /// request, else from the domain's allocator.
    ///
    /// # Errors
    ///
    /// As [`Domain::try_alloc`].
    pub fn try_alloc(&self, size: u64, dma_mask: u64) -> Result<DmaPath, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroLength);
        }
        if !self.translated {
            return Ok(DmaPath::Direct(DirectState::new(size, dma_mask)?));
        }
        let rounded = crate::addr::page_round_up(size).ok_or(DmaError::Overflow {
            a: size,
            b: PAGE_SIZE,
        })?;
        if self.chunk != 0 && rounded <= self.chunk {
            let k = self.home();
            for _ in 0..2 {
                match self.shards[k]
                    .with(|s| s.alloc.is_set().then(|| s.alloc.alloc(rounded, dma_mask)))
                {
                    Some(Ok(r)) => {
                        let st = self.dom.read(k, |g| g.dom.shared_state(r));
                        return Ok(DmaPath::Iova(st));
                    }
                    Some(Err(_)) => break,
                    None => self.grant(k),
                }
            }
        }
        self.exclusive(|d| d.try_alloc(size, dma_mask))
    }

    /// Gives shard `k` its chunk (no lock held on entry; the shard lock is
    /// never held while the write side is taken).
    #[cold]
    fn grant(&self, k: usize) {
        let Some(r) = self.exclusive(|d| d.grant_chunk(self.chunk)) else {
            return;
        };
        let (start, end) = (r.start, r.start + r.size);
        let left = self.shards[k].with(|s| {
            // Set in place: its range table (4 KiB) is never copied.
            if s.alloc.is_set() || s.alloc.reset(start, end).is_err() {
                return true;
            }
            self.bounds[k]
                .0
                .store(start, core::sync::atomic::Ordering::Relaxed);
            self.bounds[k]
                .1
                .store(end, core::sync::atomic::Ordering::Release);
            // Only an aligned chunk of the expected size gets the one-compare
            // test (`note_page`); any other is found by `shard_of`.
            if self.chunk != 0 && start % self.chunk == 0 && end - start == self.chunk {
                self.chunk_no[k].store(
                    start >> self.chunk_shift,
                    core::sync::atomic::Ordering::Relaxed,
                );
            }
            false
        });
        if left {
            // Another CPU granted it meanwhile.
            self.exclusive(|d| d.return_chunk((start, end)));
        }
    }

    /// [`Domain::link`] on the read side (in parallel with other CPUs'
    /// links and unlinks): pages, and blocks where the exclusive path would
    /// put them.
    ///
    /// # Errors
    ///
    /// As [`Domain::link`].
    #[inline(always)]
    pub fn link(
        &self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let k = self.home();
        // The per-page link (the shape of `Domain::link`'s own fast path),
        // its leaf table from this shard's hint.
        if len == PAGE_SIZE {
            let hint = &self.hints[k];
            let r = self.dom.read(
                k,
                #[inline(always)]
                |g| g.dom.link_page_shared(hint, tx, phys, offset, dir, attrs),
            );
            match r {
                Some(Ok(iova)) => {
                    if self.maps_needed() {
                        self.note_page(k, iova, false);
                    }
                    return Ok(DmaAddr(iova));
                }
                Some(Err(e)) => return Err(self.link_page_failed(offset, tx, e)),
                None => {}
            }
        }
        self.link_any(k, tx, phys, offset, len, dir, attrs)
    }

    /// [`link`](Self::link) of any shape (from shard `k`).
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn link_any(
        &self,
        k: usize,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let hint = &self.hints[k];
        let (r, eff) = self.dom.read(k, |g| {
            g.dom.link_shared(hint, tx, phys, offset, len, dir, attrs)
        });
        self.linked(r.is_ok(), eff);
        r
    }

    /// The bookkeeping after a shared link: the range linked noted when
    /// links need invalidating, or the range written and taken back noted
    /// for invalidation (walk caches included, as `Domain::link` does: a
    /// walker may have cached the entries); the leaf-table regions where
    /// tables may have been left empty noted for a reclaim.
    fn linked(&self, ok: bool, eff: SharedEffect) {
        let (s, l) = eff.range;
        if l != 0 {
            if !ok {
                self.side(s, |side| side.pending.unmapped(s, l, false));
            } else if self.maps_needed() {
                self.side(s, |side| side.pending.mapped(s, l));
            }
        }
        let (mut at, l) = eff.empty_in;
        let end = at + l;
        while at < end {
            self.note_empty(at);
            at = (at | (MIN_CHUNK - 1)) + 1;
        }
    }

    /// The per-page link at `offset` of `tx` failed with `e` (nothing
    /// changed but, maybe, empty tables attached): notes them for a
    /// reclaim, as `link_shared`'s callers do.
    #[cold]
    #[inline(never)]
    fn link_page_failed(&self, offset: u64, tx: &IovaState, e: SharedMapError) -> DmaError {
        if e.left_empty {
            self.note_empty(tx.iova().0 + offset);
        }
        e.error.into()
    }

    /// Notes the page at `iova` (unlinked, or linked when `!unlinked`) in
    /// the pending ranges of the side holding it (`k`, the caller's shard,
    /// is tried first). The next page of a run only grows the last range,
    /// which was not empty: its word is marked already (or a sync that
    /// took the word has not drained the side yet, and will take the
    /// page).
    #[inline(always)]
    fn note_page(&self, k: usize, iova: u64, unlinked: bool) {
        // The side of the shard holding the page (the caller's own, unless
        // the transaction came from another CPU's shard or from the
        // domain's allocator): a transaction's ranges are all in its
        // shard's side or the domain-wide one, which `sync_for` covers.
        // The transaction was allocated in shard `k` after its chunk was
        // granted (or handed over from the CPU that did): the grant's
        // stores are visible.
        let at = if iova >> self.chunk_shift
            == self.chunk_no[k].load(core::sync::atomic::Ordering::Relaxed)
        {
            Some(k)
        } else {
            self.shard_of(iova)
        };
        match at {
            Some(j) => self.shards[j].with(
                #[inline(always)]
                |s| self.note_in(&mut s.side, j, iova, unlinked),
            ),
            None => self.note_global(iova, unlinked),
        }
    }

    /// [`note_page`](Self::note_page) of a page no shard holds.
    #[cold]
    #[inline(never)]
    fn note_global(&self, iova: u64, unlinked: bool) {
        self.global
            .with(|s| self.note_in(s, SHARDS, iova, unlinked));
    }

    /// Adds one page's range to side `k`'s pending ranges (its lock held).
    #[inline(always)]
    fn note_in(&self, side: &mut Side, k: usize, iova: u64, unlinked: bool) {
        let p = &mut side.pending;
        let grown = if unlinked {
            p.extend_unmapped_page(iova)
        } else {
            p.extend_mapped_page(iova)
        };
        if !grown {
            self.marked(side, k, |side| {
                if unlinked {
                    side.pending.unmapped(iova, PAGE_SIZE, true);
                } else {
                    side.pending.mapped(iova, PAGE_SIZE);
                }
            });
        }
    }

    /// [`Domain::link_pages`] on the read side (in parallel with other
    /// CPUs' links and unlinks): one entry into the domain lock for the
    /// whole list, each leaf table found once (this shard's hint, else a
    /// walk installing missing tables by compare-and-swap) and its count
    /// changed once, the range noted once. The cheap way to link many pages
    /// from several CPUs: the per-call costs of [`link`](Self::link) (the
    /// lock's entry and exit, a count change, a pending-range note) are
    /// paid once per list, not per page.
    ///
    /// # Errors
    ///
    /// As [`Domain::link_pages`]; nothing changes on an error (tables
    /// attached on the way may stay, empty, until a reclaim).
    pub fn link_pages(
        &self,
        tx: &mut IovaState,
        pages: &[PhysAddr],
        offset: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let k = self.home();
        let hint = &self.hints[k];
        let (r, eff) = self.dom.read(k, |g| {
            g.dom.link_pages_shared(hint, tx, pages, offset, dir, attrs)
        });
        self.linked(r.is_ok(), eff);
        r
    }

    /// [`Domain::unlink`], on the read side when the range is wholly linked
    /// by pages and whole blocks (a table stays attached even when emptied,
    /// noted for a reclaim), else on the write side (which names the
    /// error).
    ///
    /// # Errors
    ///
    /// As [`Domain::unlink`].
    #[inline(always)]
    pub fn unlink(&self, tx: &mut IovaState, offset: u64, len: u64) -> Result<u64, DmaError> {
        let k = self.home();
        // The per-page unlink (the shape of `Domain::unlink`'s own fast
        // path), its leaf table from this shard's hint.
        if len == PAGE_SIZE {
            let hint = &self.hints[k];
            if let Some((iova, emptied)) = self.dom.read(
                k,
                #[inline(always)]
                |g| g.dom.unlink_page_shared(hint, tx, offset),
            ) {
                self.note_page(k, iova, true);
                if emptied {
                    self.note_empty(iova);
                }
                return Ok(PAGE_SIZE);
            }
        }
        self.unlink_any(k, tx, offset, len)
    }

    /// [`unlink`](Self::unlink) of any shape (from shard `k`).
    #[inline(never)]
    fn unlink_any(
        &self,
        k: usize,
        tx: &mut IovaState,
        offset: u64,
        len: u64,
    ) -> Result<u64, DmaError> {
        let hint = &self.hints[k];
        let r = self.dom.read(k, |g| {
            g.dom
                .unlink_shared(hint, tx, offset, len, &mut |a| self.note_empty(a))
        });
        match r {
            Some(Ok((bytes, iova))) => {
                self.side(iova, |side| side.pending.unmapped(iova, len, true));
                Ok(bytes)
            }
            Some(Err(e)) => Err(e),
            None => self.exclusive(|d| d.unlink(tx, offset, len)),
        }
    }

    /// [`Domain::free`]: unlinks what is left (on the read side when the
    /// transaction holds pages only) and gives the range back to its shard
    /// (or to the domain's allocator).
    ///
    /// # Errors
    ///
    /// As [`Domain::free`].
    #[allow(
        clippy::result_large_err,
        reason = "the state is handed back on failure, as Domain::free does"
    )]
    pub fn free(&self, tx: IovaState) -> Result<(), (IovaState, DmaError)> {
        let (range, fixed) = Domain::<F, M>::tx_range(&tx);
        let k = match (fixed, self.shard_of(range.start)) {
            (false, Some(k)) => k,
            _ => return self.exclusive(|d| d.free(tx)),
        };
        if tx.domain_id() != self.id || !self.dom.read(k, |g| g.dom.owns(&tx)) {
            let e = DmaError::WrongDomain {
                expected: tx.domain_id(),
                found: self.id,
            };
            return Err((tx, e));
        }
        // Whether the shard handed the range out. `shard_of` found the
        // shard's chunk, so its allocator is set (the grant publishes the
        // bounds after setting it, under the same lock).
        if let Err(e) = self.shards[k].with(|s| s.alloc.find(range)) {
            return Err((tx, e));
        }
        let mut empties = heapless::Vec::<u64, EMPTIES>::new();
        let mut dropped = false;
        let mut leaf_only = true;
        if let Some((start, size)) = Domain::<F, M>::tx_linked_range(&tx) {
            let r = self.dom.read(k, |g| {
                g.dom.unmap_present_shared(start, size, &mut |a| {
                    dropped |= empties.push(a).is_err();
                })
            });
            if r.is_err() {
                // A block across the range's edge (not made by this
                // transaction's links): the write side unmaps the rest.
                self.exclusive(|d| d.unmap_present_exclusive(start, size));
                leaf_only = false;
            }
        }
        let full = self.shards[k].with(|s| {
            if let Some((start, size)) = Domain::<F, M>::tx_linked_range(&tx) {
                self.marked(&mut s.side, k, |side| {
                    side.pending.unmapped(start, size, leaf_only);
                });
            }
            for a in &empties {
                let region = a & !(MIN_CHUNK - 1);
                if !s.side.empties.contains(&region) {
                    dropped |= s.side.empties.push(region).is_err();
                }
            }
            if let Ok(i) = s.alloc.find(range) {
                s.alloc.release(i);
            }
            s.side.empties.is_full()
        });
        if dropped {
            // Hints were lost: the reclaim sweeps (and must run).
            self.st
                .sweep_wanted
                .store(true, core::sync::atomic::Ordering::Relaxed);
        }
        if full || dropped {
            self.st
                .reclaim_wanted
                .store(true, core::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`Domain::translate`] on the read side (in parallel with other
    /// CPUs' links and unlinks). A translation in a range another CPU is
    /// changing meanwhile is its old or its new value.
    pub fn translate(&self, iova: DmaAddr) -> Option<(PhysAddr, MapAttrs)> {
        self.dom.read(self.home(), |g| g.dom.translate_shared(iova))
    }

    /// Whether unlinks or retired tables wait for a sync.
    pub fn has_pending(&self) -> bool {
        let maps = self.maps_needed();
        self.shards
            .iter()
            .any(|s| s.with(|s| !s.side.pending.is_empty(maps)))
            || self.global.with(|s| !s.pending.is_empty(maps))
            || self.st.retired.load(core::sync::atomic::Ordering::Acquire) != 0
    }

    /// Reclaims the empty leaf tables the shards noted (and the tables
    /// above them that become empty), when a list filled up and nobody is
    /// on the read side now: detached and retired on the write side, their
    /// invalidation queued for this sync.
    fn maybe_reclaim(&self) {
        if !self
            .st
            .reclaim_wanted
            .load(core::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let _ = self.dom.try_write(|g| {
            self.st
                .reclaim_wanted
                .store(false, core::sync::atomic::Ordering::Relaxed);
            let mut into = SharedPending::new();
            // Hints dropped by a full list: one walk of the whole table finds
            // every empty one (the walk `Domain::reclaim_empty_tables` does),
            // the hints are then moot. Else each hinted path.
            let sweep = self
                .st
                .sweep_wanted
                .swap(false, core::sync::atomic::Ordering::Relaxed);
            for s in self.shards.iter() {
                let list = s.with(|s| core::mem::take(&mut s.side.empties));
                for a in list.iter().filter(|_| !sweep) {
                    g.dom.reclaim_empty(*a, &mut into);
                }
            }
            let list = self.global.with(|s| core::mem::take(&mut s.empties));
            for a in list.iter().filter(|_| !sweep) {
                g.dom.reclaim_empty(*a, &mut into);
            }
            if sweep {
                g.dom.reclaim_all_empty(&mut into);
            }
            g.dom.exclusive_done(&mut into);
            self.global
                .with(|s| self.marked(s, SHARDS, |s| into.drain_into(&mut s.pending)));
            self.st
                .retired
                .store(g.dom.retired_pages(), core::sync::atomic::Ordering::Release);
        });
    }

    /// Test support: reclaims every empty leaf table noted so far if no
    /// CPU is on the read side now (else nothing); whether it ran.
    #[doc(hidden)]
    pub fn try_reclaim_now(&self) -> bool {
        self.st
            .reclaim_wanted
            .store(true, core::sync::atomic::Ordering::Relaxed);
        self.maybe_reclaim();
        !self
            .st
            .reclaim_wanted
            .load(core::sync::atomic::Ordering::Relaxed)
    }

    /// Test support: reclaims every empty leaf table noted so far now
    /// (waiting for the write side), as a sync does once a list fills up.
    #[doc(hidden)]
    pub fn reclaim_now(&self) {
        self.st
            .reclaim_wanted
            .store(true, core::sync::atomic::Ordering::Relaxed);
        while self
            .st
            .reclaim_wanted
            .load(core::sync::atomic::Ordering::Relaxed)
        {
            self.maybe_reclaim();
            super::sync::spin_hint();
        }
    }

    /// [`Domain::sync`], with the completion wait outside every lock: the
    /// pending ranges of every side and one completion are queued while
    /// this sync holds those sides' sync words (and the read side), the
    /// wait runs without them, and the write side is taken only to hand
    /// back table pages the completion covers. It covers every unlink that
    /// returned before it began, on any CPU, so it reads every side's word
    /// and drains every side with pending ranges: several CPUs syncing at
    /// once this way slow each other down (the README's bench line: a
    /// ratio near 1 for two CPUs); to sync a transaction, use
    /// [`sync_for`](Self::sync_for) or [`destroy`](Self::destroy).
    ///
    /// # Errors
    ///
    /// As [`Domain::sync`]. After an error nothing is handed back and the
    /// next sync invalidates the whole domain.
    pub fn sync<B: SplitSync + ?Sized>(&self, backend: &mut B) -> Result<(), DmaError> {
        self.sync_words(backend, ALL_WORDS)
    }

    /// [`sync`](Self::sync) for one transaction (Linux's
    /// `dma_iova_sync(state)`): covers every unlink of `tx` (and of the
    /// other transactions of its IOVA shard, and every range the write
    /// side queued) that returned before it began, on any CPU, and hands
    /// back the table pages waiting for a completion. It reads and writes
    /// only the sync words of `tx`'s shard and of the domain-wide side
    /// (written only by the write side's work and by syncs that find it
    /// pending): CPUs syncing transactions of different shards write no
    /// common line (a transaction is in the shard of the CPU that
    /// allocated it), where
    /// [`sync`](Self::sync) reads every shard's word and takes the ones
    /// with pending ranges.
    ///
    /// # Errors
    ///
    /// [`DmaError::WrongDomain`]: `tx` was made by another domain. Else as
    /// [`sync`](Self::sync).
    pub fn sync_for<B: SplitSync + ?Sized>(
        &self,
        tx: &IovaState,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        // The token is the domain's for good: no lock to compare it (an
        // identity domain has nothing to sync).
        if tx.domain_id() != self.id || Domain::<F, M>::tx_token(tx) != self.token {
            return Err(DmaError::WrongDomain {
                expected: tx.domain_id(),
                found: self.id,
            });
        }
        self.sync_words(backend, self.words_of(tx))
    }

    /// The sync words whose sides hold `tx`'s pending ranges: its shard's
    /// and the domain-wide one, or every word for a range not inside one
    /// shard's chunk (a fixed range across chunks).
    fn words_of(&self, tx: &IovaState) -> u32 {
        let (range, _) = Domain::<F, M>::tx_range(tx);
        let last = range.start + range.size.saturating_sub(1);
        match (self.shard_of(range.start), self.shard_of(last)) {
            (Some(a), Some(b)) if a == b => (1 << SHARDS) | (1 << a),
            _ => ALL_WORDS,
        }
    }

    /// A sync of the sides whose words are in `mask` (bit `j`: side `j`,
    /// bit [`SHARDS`]: the domain-wide one, always included).
    fn sync_words<B: SplitSync + ?Sized>(
        &self,
        backend: &mut B,
        mask: u32,
    ) -> Result<(), DmaError> {
        if !self.translated {
            return Ok(());
        }
        let maps = if backend.needs_map_invalidation() {
            2
        } else {
            1
        };
        if self.st.maps.load(core::sync::atomic::Ordering::Relaxed) != maps {
            self.st
                .maps
                .store(maps, core::sync::atomic::Ordering::Relaxed);
        }
        self.maybe_reclaim();
        let retired = self.st.retired.load(core::sync::atomic::Ordering::Acquire) != 0;
        // Fast path: no side has pending ranges, no table waits, no other
        // sync is between taking a side's ranges and publishing their
        // ticket. (An unlink that returned before this sync began marked
        // its side's word before returning, unless a sync had not yet
        // taken its side's earlier ranges; a sync that took a word set
        // TAKING in the same step and published `last_ticket` before
        // releasing it.)
        if !retired
            && self
                .words
                .iter()
                .enumerate()
                .all(|(j, w)| mask & (1 << j) == 0 || w.state.load(Ordering::Acquire) == 0)
        {
            return self.publish_and_wait(backend, mask);
        }
        // Take the word of every side in `mask` with pending ranges (the
        // domain-wide one also when tables wait: their hand-back needs a
        // completion), all in one go once no other sync holds any of them:
        // one completion then serves them all, and a sync never holds a
        // word while it waits for another (no sync queues behind a holder
        // that itself waits).
        let held = self.take_words(mask, retired);
        if held.mask == 0 {
            // What the fast path does, found after waiting for holders.
            drop(held);
            return self.publish_and_wait(backend, mask);
        }
        self.sync_held(backend, held)?;
        // Another CPU's sync may have taken ranges of unlinks that returned
        // before this sync began and not seen its completion yet: wait for
        // every such ticket.
        self.wait_unseen(backend, mask)
    }

    /// Takes every word in `mask` with pending ranges (and the domain-wide
    /// one when `retired`): first waits, holding nothing, until no other
    /// sync holds one of them, then takes them in index order without
    /// waiting; should another sync take one meanwhile, lets go of what it
    /// took and takes them in index order, waiting for each.
    fn take_words(&self, mask: u32, retired: bool) -> Release<'_> {
        for (j, w) in self.words.iter().enumerate() {
            if mask & (1 << j) != 0 {
                wait_free(w);
            }
        }
        let mut held = Release {
            words: &self.words,
            mask: 0,
        };
        let mut lost = false;
        for (j, w) in self.words.iter().enumerate() {
            if mask & (1 << j) != 0 {
                match take_word(w, retired && j == SHARDS) {
                    Take::Taken => held.mask |= 1 << j,
                    Take::Busy => {
                        lost = true;
                        break;
                    }
                    Take::Nothing => {}
                }
            }
        }
        if !lost {
            return held;
        }
        // Their ranges were not drained: marked pending again before they
        // are let go (a taken word lost its PENDING bit).
        for (j, w) in self.words.iter().enumerate() {
            if held.mask & (1 << j) != 0 {
                w.state.fetch_or(PENDING, Ordering::AcqRel);
            }
        }
        drop(held);
        // Another sync took one between the wait and the take: now in index
        // order, waiting for each while holding the lower ones. Every sync
        // that waits while holding does so in this order and the first try
        // never waits while holding, so there is no cycle and this sync
        // gets through (trying again the first way could go on for ever
        // against syncs that keep colliding with it).
        let mut held = Release {
            words: &self.words,
            mask: 0,
        };
        for (j, w) in self.words.iter().enumerate() {
            if mask & (1 << j) != 0 {
                loop {
                    wait_free(w);
                    match take_word(w, retired && j == SHARDS) {
                        Take::Taken => {
                            held.mask |= 1 << j;
                            break;
                        }
                        Take::Nothing => break,
                        Take::Busy => {}
                    }
                }
            }
        }
        held
    }

    /// Queues the pending ranges of the sides whose words `held` holds and
    /// one completion, publishes its ticket in those words, releases them,
    /// waits for the completion and hands back the table pages it covers.
    fn sync_held<B: SplitSync + ?Sized>(
        &self,
        backend: &mut B,
        held: Release<'_>,
    ) -> Result<(), DmaError> {
        let k = self.home();
        let begun = self.dom.read(k, |g| {
            // Then the ranges: a range added after its side was drained
            // marks the word again.
            let mut all = SharedPending::new();
            for (i, s) in self.shards.iter().enumerate() {
                if held.mask & (1 << i) != 0 {
                    s.with(|s| s.side.pending.drain_into(&mut all));
                }
            }
            if held.mask & (1 << SHARDS) != 0 {
                self.global.with(|s| s.pending.drain_into(&mut all));
            }
            // The invalidations and their completion under one hold of the
            // IOMMU's lock (see `SplitSync::queue_and_submit`).
            match backend.queue_and_submit(&mut |b| g.dom.queue_shared(&all, b)) {
                Err(e) => {
                    self.global
                        .with(|s| self.marked(s, SHARDS, |s| all.drain_into(&mut s.pending)));
                    Err(DmaError::from(e))
                }
                // Nothing here; earlier syncs' tickets are waited for by
                // the caller.
                Ok(None) => Ok(None),
                Ok(Some(ticket)) => {
                    // Before the words are released (Release there).
                    for (j, w) in self.words.iter().enumerate() {
                        if held.mask & (1 << j) != 0 {
                            w.last_ticket.store(ticket, Ordering::Release);
                        }
                    }
                    Ok(Some((
                        g.dom.shared_begun(ticket, g.popped),
                        g.dom.retired_pages(),
                    )))
                }
            }
        });
        let mask = held.mask;
        drop(held);
        let Some((begun, retired)) = begun? else {
            return Ok(());
        };
        // No lock held: other CPUs link, unlink and sync meanwhile. The
        // ticket is newer than every one published before it (completions
        // arrive in order): it covers theirs too.
        self.wait_for(backend, begun.ticket, mask)?;
        if retired != 0 {
            self.dom.write(|g| {
                let popped = g.popped;
                let freed = g.dom.sync_finish(begun, popped);
                g.popped += freed as u64;
                self.st
                    .retired
                    .store(g.dom.retired_pages(), core::sync::atomic::Ordering::Release);
            });
        }
        Ok(())
    }

    /// A sync that found nothing pending: the table stores made visible
    /// (the backend's publish), then the wait for every side's newest
    /// ticket not yet seen done.
    fn publish_and_wait<B: SplitSync + ?Sized>(
        &self,
        backend: &mut B,
        mask: u32,
    ) -> Result<(), DmaError> {
        self.dom.read(self.home(), |g| g.dom.publish(backend))?;
        self.wait_unseen(backend, mask)
    }

    /// Waits for the newest ticket of every side in `mask` not yet seen
    /// done (read after the side's word showed nothing pending, or was
    /// released).
    fn wait_unseen<B: SplitSync + ?Sized>(
        &self,
        backend: &mut B,
        mask: u32,
    ) -> Result<(), DmaError> {
        let mut newest = 0;
        let mut unseen = 0u32;
        for (j, w) in self.words.iter().enumerate() {
            if mask & (1 << j) == 0 {
                continue;
            }
            if let Some(t) = w.unseen_ticket() {
                newest = newest.max(t);
                unseen |= 1 << j;
            }
        }
        if unseen == 0 || self.seen_done(newest) {
            return Ok(());
        }
        self.wait_for(backend, newest, unseen)
    }

    /// Whether `ticket` is known done: the CPU that submitted it is
    /// usually waiting for it and says so in the `done_ticket` of the words
    /// it took within a few loads (a ticket done means every older one is:
    /// completions arrive in order); a bounded look there spares a look at
    /// the IOMMU (its lock is shared by every CPU). `false` sends the
    /// caller to the IOMMU.
    fn seen_done(&self, ticket: u64) -> bool {
        for _ in 0..DONE_LOOKS {
            if self
                .words
                .iter()
                .any(|w| w.done_ticket.load(Ordering::Acquire) >= ticket)
            {
                return true;
            }
            super::sync::spin_hint();
        }
        false
    }

    /// Waits for `ticket` and notes it done in `words`; a failure makes
    /// the next sync invalidate the whole domain (the ranges the
    /// completion covered were taken).
    fn wait_for<B: SplitSync + ?Sized>(
        &self,
        backend: &mut B,
        ticket: u64,
        words: u32,
    ) -> Result<(), DmaError> {
        if let Err(e) = backend.wait(ticket) {
            self.global.with(|s| {
                self.marked(s, SHARDS, |s| s.pending.set_overflow());
            });
            return Err(e.into());
        }
        for (j, w) in self.words.iter().enumerate() {
            if words & (1 << j) != 0 {
                w.seen(ticket);
            }
        }
        Ok(())
    }

    /// [`free`](Self::free) then a sync of the transaction's shard, as
    /// [`Domain::destroy`]: it covers every unlink of `tx` (those `free`
    /// made included), as [`sync_for`](Self::sync_for) would.
    ///
    /// # Errors
    ///
    /// As [`Domain::destroy`].
    pub fn destroy<B: SplitSync + ?Sized>(
        &self,
        tx: IovaState,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        let words = self.words_of(&tx);
        self.free(tx).map_err(|(_, e)| e)?;
        self.sync_words(backend, words)
    }
}

/// Releases [`TAKING`] of the words in `mask` when dropped (also on
/// unwinding, in host tests).
struct Release<'a> {
    words: &'a [Padded<SyncWord>; SHARDS + 1],
    mask: u32,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        for (j, w) in self.words.iter().enumerate() {
            if self.mask & (1 << j) != 0 {
                w.state.fetch_and(!TAKING, Ordering::Release);
            }
        }
    }
}

/// What [`take_word`] did.
enum Take {
    /// The word is this sync's ([`PENDING`] cleared, [`TAKING`] set).
    Taken,
    /// Another sync holds it.
    Busy,
    /// Nothing pending and no other sync holding it (not taken).
    Nothing,
}

/// Takes `w` (clears [`PENDING`], sets [`TAKING`]) when it has pending
/// ranges or `must` is set; [`Take::Busy`] when another sync holds it.
fn take_word(w: &SyncWord, must: bool) -> Take {
    let state = &w.state;
    let mut cur = state.load(Ordering::Acquire);
    loop {
        if cur & TAKING != 0 {
            return Take::Busy;
        }
        if cur == 0 && !must {
            return Take::Nothing;
        }
        match state.compare_exchange_weak(cur, TAKING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Take::Taken,
            Err(now) => cur = now,
        }
    }
}

/// Spins (backing off) while another sync holds `w`.
fn wait_free(w: &SyncWord) {
    let mut pause = 1u32;
    // A load, not a read-modify-write: the line stays shared while the
    // holder works, its release takes it back once.
    while w.state.load(Ordering::Acquire) & TAKING != 0 {
        // Back off: the holder's release and ticket store need the line
        // more than this CPU's looks do.
        for _ in 0..pause {
            super::sync::spin_hint();
        }
        pause = (pause * 2).min(64);
    }
}
