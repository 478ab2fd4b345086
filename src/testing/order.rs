//! The memory-order half of the strict model: a lender that records, in
//! order, every barrier, cache clean, backend call and page handed back, and
//! checks the rules real IOMMUs need and QEMU forgives (issue 9 §1).
//!
//! Descriptor stores are seen by comparing each lent page with a shadow copy
//! at every recorded event: the stores between two events form one *epoch*
//! and are unordered among themselves, which is the granularity the rules
//! below need. A stored value whose address bits (12..48) name a page this
//! lender lent, with bit 0 or 1 set, is taken for a table pointer; tests map
//! physical addresses outside the arena, so a leaf never looks like one.
//!
//! Rules (each violation is recorded as a [`Violation`]):
//! 1. **Publish**: when a pointer to a page is stored, every earlier store to
//!    that page (the lender's zeroing included) is ordered before it by a
//!    barrier, and, when the walker is not coherent, cleaned before that
//!    barrier (io-pgtable-arm `arm_lpae_install_table`).
//! 2. **Break-before-make**: a valid descriptor is never replaced by a
//!    different valid one, nor re-filled while the invalidation of its
//!    clearing has not completed (Arm ARM "break-before-make"; IHI 0070 §3.21).
//! 3. **Unlink coverage**: every descriptor cleared is covered by an
//!    invalidation (non-leaf when a table pointer was cleared) queued after
//!    the clear and completed by a successful sync; checked at every
//!    successful sync for the clears made before that sync's batch began.
//! 4. **Hand-back**: a page goes back to the lender only once no walk can
//!    reach it: detached and its detaching invalidated and completed, or —
//!    for a page still in the tree — after a completed whole-domain
//!    invalidation, with no device attached to the domain.
//! 5. **Doorbell**: when the backend is called, every table store is ordered
//!    by a barrier before it, and cleaned when the walker is not coherent.

use core::cell::RefCell;
use core::marker::PhantomData;
use core::ptr::NonNull;

use crate::addr::{DmaAddr, PhysAddr};
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// One 4 KiB page of a recorder's arena.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
pub struct Page(pub [u8; 4096]);

impl Page {
    /// A zeroed page.
    pub const ZERO: Page = Page([0; 4096]);
}

/// Most pages one [`OrderLender`] lends.
pub const MAX_PAGES: usize = 256;
const PENDING: usize = 1024;
const QUEUED: usize = 256;
/// Violations an [`OrderLender`] keeps (it counts them all).
pub const VIOLATIONS: usize = 32;
const WORDS: usize = 512;
const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

/// A broken rule, with the event number (1-based) at which it was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Violation {
    /// Rule 1: a pointer to `table` was stored before the table's contents
    /// were ordered (and, non-coherent, cleaned) before it.
    PublishedBeforeVisible {
        /// Event.
        at: u32,
        /// The table pointed to.
        table: PhysAddr,
        /// Whether lines of it were still not cleaned.
        unclean: bool,
    },
    /// Rule 2: a valid descriptor replaced by another valid one, or re-filled
    /// before the invalidation of its clearing completed.
    BreakBeforeMake {
        /// Event.
        at: u32,
        /// Table page of the descriptor.
        table: PhysAddr,
        /// Index in the table.
        index: usize,
        /// Old value.
        old: u64,
        /// New value.
        new: u64,
    },
    /// Rule 3: a cleared descriptor was not covered by a completed
    /// invalidation when a later sync returned.
    NotInvalidated {
        /// Event.
        at: u32,
        /// IOVA the descriptor translated (0 when its place is unknown).
        iova: u64,
        /// Bytes it covered.
        len: u64,
        /// It pointed to a table (a non-leaf invalidation was needed).
        table: bool,
    },
    /// Rule 4: a page handed back while a walk could still reach it.
    FreedWhileReachable {
        /// Event.
        at: u32,
        /// The page.
        page: PhysAddr,
    },
    /// Rule 5: the backend was called while table stores were not yet
    /// ordered (or cleaned) before it.
    DoorbellBeforeStores {
        /// Event.
        at: u32,
        /// A page with such stores.
        page: PhysAddr,
        /// Whether lines were still not cleaned (else: no barrier).
        unclean: bool,
    },
    /// The lender was asked to free a block it never lent, or with a wrong size.
    BadFree {
        /// Event.
        at: u32,
        /// The address given.
        page: PhysAddr,
    },
}

/// What the recorder saw, in order (the most recent [`LOG`] events are kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Event {
    /// A write barrier ([`crate::barrier::wmb_on`]).
    Barrier,
    /// `clean(pa, len)`.
    Clean(PhysAddr, usize),
    /// A page lent.
    Alloc(PhysAddr),
    /// A page handed back.
    Free(PhysAddr),
    /// `invalidate(iova, len, leaf_only)`.
    Invalidate(u64, u64, bool),
    /// `invalidate_domain`.
    InvalidateDomain,
    /// `sync()` and whether it succeeded.
    Sync(bool),
    /// `publish()`: no command, no completion; the stores before it must be
    /// ordered (and cleaned) as before any doorbell.
    Publish,
    /// `attach(dev, how)` (detach is an attach to blocked); whether it
    /// attaches the watched root.
    Attach(DeviceId, bool),
    /// An explicit [`OrderLender::check`].
    Check,
}

/// Events kept for inspection.
pub const LOG: usize = 128;

#[derive(Clone, Copy, Default)]
struct PageInfo {
    lent: bool,
    /// Event closing the epoch of the latest store (or zeroing) of the page.
    ready_at: u32,
    /// 64-byte lines stored since their last clean (non-coherent only).
    dirty: u64,
    /// Height in the watched tree, if known.
    height: Option<u8>,
    /// First IOVA the page translates, valid when `height` is.
    base: u64,
    /// A descriptor in the tree points to it (or it is the root).
    reachable: bool,
    /// Its pointer was cleared and that clear is not yet invalidated.
    detach_pending: bool,
}

#[derive(Clone, Copy)]
struct Clear {
    page: usize,
    index: usize,
    since: u32,
    iova: Option<(u64, u64)>,
    table: Option<usize>,
    old: u64,
}

#[derive(Clone, Copy)]
enum Inval {
    Range {
        at: u32,
        start: u64,
        end: u64,
        leaf_only: bool,
    },
    Domain {
        at: u32,
    },
}

struct State<'a> {
    shadow: &'a mut [Page],
    info: [PageInfo; MAX_PAGES],
    coherent: bool,
    budget: Option<usize>,
    event: u32,
    last_barrier: u32,
    last_store: u32,
    domain_flushed: u32,
    /// First backend call since the last sync (start of the current batch).
    batch_start: Option<u32>,
    root: Option<usize>,
    /// The bits of a table pointer the walker ignores and the crate keeps
    /// its valid-entry counts in (`PteFormat::COUNT_MASK`; 0: none known).
    count_bits: u64,
    attached: heapless::Vec<DeviceId, 16>,
    pending: heapless::Vec<Clear, PENDING>,
    queued: heapless::Vec<Inval, QUEUED>,
    violations: heapless::Vec<Violation, VIOLATIONS>,
    violation_count: usize,
    log: heapless::Deque<Event, LOG>,
    frees: usize,
}

/// A [`TableMemory`] over a caller's arena that checks the ordering rules of
/// the module documentation. Pair it with an [`OrderBackend`] so the backend
/// calls land in the same log, and call [`watch_root`](Self::watch_root) with
/// the domain's root so cleared descriptors get their IOVA.
///
/// Physical address = pointer value (the arena is identity-mapped).
pub struct OrderLender<'a> {
    base: NonNull<Page>,
    pages: usize,
    st: RefCell<State<'a>>,
    _arena: PhantomData<&'a mut [Page]>,
}

impl<'a> OrderLender<'a> {
    /// A recorder lending the first half of `arena` (at most [`MAX_PAGES`]
    /// pages) and keeping its shadow copies in the second half. `coherent`
    /// says whether the walker snoops caches (if not, rule 1 and 5 demand
    /// cleans and [`can_clean`](TableMemory::can_clean) answers true).
    pub fn new(arena: &'a mut [Page], coherent: bool) -> Self {
        let half = (arena.len() / 2).min(MAX_PAGES);
        let (lent, rest) = arena.split_at_mut(half);
        let shadow = &mut rest[..half];
        Self {
            base: NonNull::new(lent.as_mut_ptr()).unwrap_or(NonNull::dangling()),
            pages: half,
            st: RefCell::new(State {
                shadow,
                info: [PageInfo::default(); MAX_PAGES],
                coherent,
                budget: None,
                event: 0,
                last_barrier: 0,
                last_store: 0,
                domain_flushed: 0,
                batch_start: None,
                root: None,
                count_bits: 0,
                attached: heapless::Vec::new(),
                pending: heapless::Vec::new(),
                queued: heapless::Vec::new(),
                violations: heapless::Vec::new(),
                violation_count: 0,
                log: heapless::Deque::new(),
                frees: 0,
            }),
            _arena: PhantomData,
        }
    }

    /// Refuse allocations once `pages` more pages were lent (`None`: no limit).
    pub fn set_budget(&self, pages: Option<usize>) {
        self.st.borrow_mut().budget = pages;
    }

    /// Tells the recorder which lent page is the root of the tree and how
    /// many levels it has, so cleared descriptors get their IOVA, and where
    /// the format keeps a table's count in the pointer to it
    /// (`PteFormat::COUNT_MASK`): a store that changes only those bits of
    /// a pointer to a lent page is no store for the rules (the walker
    /// ignores them: no clean, barrier or break-before-make is owed), any
    /// other change of a valid descriptor still is.
    pub fn watch_root(&self, root: PhysAddr, levels: u8, count_mask: u64) {
        let mut st = self.st.borrow_mut();
        st.count_bits = count_mask;
        let Some(i) = self.index_of(root) else {
            return;
        };
        st.root = Some(i);
        st.info[i].height = Some(levels.saturating_sub(1));
        st.info[i].base = 0;
        st.info[i].reachable = true;
    }

    /// Compares the arena with its shadow now (an explicit epoch end) and
    /// returns the violations recorded so far.
    pub fn check(&self) -> heapless::Vec<Violation, VIOLATIONS> {
        self.event(Event::Check);
        self.violations()
    }

    /// The violations recorded so far (the first [`VIOLATIONS`] of them).
    pub fn violations(&self) -> heapless::Vec<Violation, VIOLATIONS> {
        self.st.borrow().violations.clone()
    }

    /// How many violations were recorded in all.
    pub fn violation_count(&self) -> usize {
        self.st.borrow().violation_count
    }

    /// Pages lent and not handed back.
    pub fn lent_pages(&self) -> usize {
        let st = self.st.borrow();
        st.info[..self.pages].iter().filter(|p| p.lent).count()
    }

    /// Pages handed back so far.
    pub fn frees(&self) -> usize {
        self.st.borrow().frees
    }

    /// The most recent events, oldest first.
    pub fn events(&self) -> heapless::Vec<Event, LOG> {
        self.st.borrow().log.iter().copied().collect()
    }

    /// Counts of barriers and cleans among the kept events.
    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.st.borrow().log.iter().filter(|e| pred(e)).count()
    }

    fn index_of(&self, pa: PhysAddr) -> Option<usize> {
        let base = self.base.as_ptr() as u64;
        let off = pa.0.checked_sub(base)?;
        let i = (off / 4096) as usize;
        (i < self.pages).then_some(i)
    }

    fn pa_of(&self, i: usize) -> PhysAddr {
        PhysAddr(self.base.as_ptr() as u64 + i as u64 * 4096)
    }

    fn word(&self, i: usize, w: usize) -> u64 {
        // SAFETY: `i < pages` and `w < 512` keep the read inside the arena,
        // which this lender borrows mutably for `'a`; volatile because the
        // crate writes it through pointers handed out by `phys_to_virt`.
        unsafe {
            self.base
                .as_ptr()
                .add(i)
                .cast::<u64>()
                .add(w)
                .read_volatile()
        }
    }

    /// Target page of `v` if it is a valid pointer to a lent page.
    fn target(&self, st: &State<'_>, v: u64) -> Option<usize> {
        if !valid(v) {
            return None;
        }
        let i = self.index_of(PhysAddr(v & ADDR_MASK))?;
        st.info[i].lent.then_some(i)
    }

    /// Whether `old` → `new` changes only the count bits of a pointer to a
    /// lent page (see [`watch_root`](Self::watch_root)).
    fn count_only(&self, st: &State<'_>, old: u64, new: u64) -> bool {
        st.count_bits != 0 && (old ^ new) & !st.count_bits == 0 && self.target(st, old).is_some()
    }

    fn violate(st: &mut State<'_>, v: Violation) {
        st.violation_count += 1;
        let _ = st.violations.push(v);
    }

    /// Ends the current epoch with `e`: diffs the arena, applies the rules.
    fn event(&self, e: Event) {
        let mut st = self.st.borrow_mut();
        st.event += 1;
        let k = st.event;
        if st.log.is_full() {
            st.log.pop_front();
        }
        let _ = st.log.push_back(e);
        self.diff(&mut st, k);
        match e {
            Event::Barrier => st.last_barrier = k,
            Event::Clean(pa, len) => self.clean(&mut st, pa, len),
            Event::Alloc(pa) => {
                if let Some(i) = self.index_of(pa) {
                    let coherent = st.coherent;
                    st.info[i] = PageInfo {
                        lent: true,
                        ready_at: k,
                        dirty: if coherent { 0 } else { u64::MAX },
                        ..PageInfo::default()
                    };
                }
            }
            Event::Free(pa) => self.free_rules(&mut st, k, pa),
            Event::Invalidate(start, len, leaf_only) => {
                self.doorbell(&mut st, k);
                let _ = st.queued.push(Inval::Range {
                    at: k,
                    start,
                    end: start.saturating_add(len),
                    leaf_only,
                });
            }
            Event::InvalidateDomain => {
                self.doorbell(&mut st, k);
                let _ = st.queued.push(Inval::Domain { at: k });
            }
            Event::Publish => {
                // Rule 5 without a batch: nothing is queued or completed.
                let batch = st.batch_start;
                self.doorbell(&mut st, k);
                st.batch_start = batch;
            }
            Event::Sync(ok) => {
                self.doorbell(&mut st, k);
                if ok {
                    self.complete(&mut st, k);
                }
                st.queued.clear();
                st.batch_start = None;
            }
            Event::Attach(_, ours) => {
                // The root's contents are visible before an STE / context
                // entry may point at it (rule 1 for the root).
                if let Some(r) = st.root.filter(|_| ours) {
                    let p = st.info[r];
                    let unclean = !st.coherent && p.dirty != 0;
                    if p.ready_at > st.last_barrier || unclean {
                        let table = self.pa_of(r);
                        Self::violate(
                            &mut st,
                            Violation::PublishedBeforeVisible {
                                at: k,
                                table,
                                unclean,
                            },
                        );
                    }
                }
            }
            Event::Check => {}
        }
    }

    fn clean(&self, st: &mut State<'_>, pa: PhysAddr, len: usize) {
        let end = pa.0.saturating_add(len as u64);
        let mut line = pa.0 & !63;
        while line < end {
            if let Some(i) = self.index_of(PhysAddr(line)) {
                let l = (line % 4096) / 64;
                st.info[i].dirty &= !(1u64 << l);
            }
            line += 64;
        }
    }

    /// Rule 5, and the start of a batch.
    fn doorbell(&self, st: &mut State<'_>, k: u32) {
        if st.batch_start.is_none() {
            st.batch_start = Some(k);
        }
        for i in 0..self.pages {
            let p = st.info[i];
            if !p.lent || !p.reachable {
                continue;
            }
            let unclean = !st.coherent && p.dirty != 0;
            if p.ready_at > st.last_barrier || unclean {
                let page = self.pa_of(i);
                Self::violate(
                    st,
                    Violation::DoorbellBeforeStores {
                        at: k,
                        page,
                        unclean,
                    },
                );
            }
        }
    }

    /// A successful sync at `k`: resolves the clears its batch covered
    /// (rule 3), and checks that every clear made before the batch is.
    fn complete(&self, st: &mut State<'_>, k: u32) {
        let batch = st.batch_start.unwrap_or(k);
        if st.queued.iter().any(|q| matches!(q, Inval::Domain { .. })) {
            st.domain_flushed = k;
        }
        let mut i = 0;
        while i < st.pending.len() {
            let c = st.pending[i];
            let covered = st.queued.iter().any(|q| match *q {
                Inval::Domain { at } => at > c.since,
                Inval::Range {
                    at,
                    start,
                    end,
                    leaf_only,
                } => {
                    // A leaf's whole range must be invalidated; a detached
                    // table needs a non-leaf invalidation of any address it
                    // translated (a walk-cache entry is found by address:
                    // IHI 0070 §4.4.1, Linux `tlb_flush_walk` passes the
                    // unmapped range, not the table's span).
                    at > c.since
                        && match (c.table, c.iova) {
                            (Some(_), Some((s, l))) => !leaf_only && start < s + l && s < end,
                            (None, Some((s, l))) => start <= s && s + l <= end,
                            (_, None) => false,
                        }
                }
            });
            if covered {
                if let Some(t) = c.table {
                    st.info[t].detach_pending = false;
                }
                st.pending.swap_remove(i);
            } else {
                if c.since < batch {
                    let (iova, len) = c.iova.unwrap_or((0, 0));
                    Self::violate(
                        st,
                        Violation::NotInvalidated {
                            at: k,
                            iova,
                            len,
                            table: c.table.is_some(),
                        },
                    );
                    // Reported once.
                    st.pending.swap_remove(i);
                    continue;
                }
                i += 1;
            }
        }
    }

    /// Rule 4.
    fn free_rules(&self, st: &mut State<'_>, k: u32, pa: PhysAddr) {
        st.frees += 1;
        let Some(i) = self.index_of(pa).filter(|&i| st.info[i].lent) else {
            Self::violate(st, Violation::BadFree { at: k, page: pa });
            return;
        };
        let p = st.info[i];
        let reachable_bad =
            p.reachable && (st.domain_flushed <= st.last_store.max(1) || !st.attached.is_empty());
        if p.detach_pending || reachable_bad {
            Self::violate(st, Violation::FreedWhileReachable { at: k, page: pa });
        }
        st.info[i] = PageInfo::default();
        if st.root == Some(i) {
            st.root = None;
        }
        // Forget clears inside the page: they died with it (its own
        // detaching clear, if any, was checked above).
        st.pending.retain(|c| c.page != i && c.table != Some(i));
    }

    fn diff(&self, st: &mut State<'_>, k: u32) {
        // Pass 1: which pages changed, so rule 1 sees this epoch's stores
        // to a child wherever the child lies in the arena.
        // A pointer stored in this epoch is checked against its table as it
        // was before the epoch: stores to the table in the same epoch are
        // not ordered before the pointer, so they count as made after it
        // (ordinary stores into a live table, ordered by the doorbell rule).
        let mut changed = [false; MAX_PAGES];
        let mut before = [(0u32, 0u64, false); MAX_PAGES];
        for (i, ch) in changed.iter_mut().enumerate().take(self.pages) {
            if !st.info[i].lent {
                continue;
            }
            before[i] = (st.info[i].ready_at, st.info[i].dirty, st.info[i].reachable);
            for w in 0..WORDS {
                let old = u64::from_ne_bytes(word_bytes(&st.shadow[i], w));
                let new = self.word(i, w);
                if old == new {
                    continue;
                }
                if self.count_only(st, old, new) {
                    // Taken as it is now, while the page it points to is
                    // still known to be lent.
                    st.shadow[i].0[w * 8..w * 8 + 8].copy_from_slice(&new.to_ne_bytes());
                    continue;
                }
                *ch = true;
                st.info[i].ready_at = k;
                if !st.coherent {
                    st.info[i].dirty |= 1u64 << (w / 8);
                }
            }
            if *ch {
                st.last_store = k;
            }
        }
        // Pass 2: the rules on every changed descriptor.
        for (i, &ch) in changed.iter().enumerate().take(self.pages) {
            if !ch {
                continue;
            }
            for w in 0..WORDS {
                let old = u64::from_ne_bytes(word_bytes(&st.shadow[i], w));
                let new = self.word(i, w);
                if old == new {
                    continue;
                }
                self.store(st, k, i, w, old, new, &before);
                st.shadow[i].0[w * 8..w * 8 + 8].copy_from_slice(&new.to_ne_bytes());
            }
        }
    }

    fn place(st: &State<'_>, i: usize, w: usize) -> Option<(u64, u64)> {
        let p = st.info[i];
        let h = p.height?;
        let size = 1u64 << (12 + 9 * u32::from(h));
        Some((p.base + w as u64 * size, size))
    }

    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        st: &mut State<'_>,
        k: u32,
        i: usize,
        w: usize,
        old: u64,
        new: u64,
        before: &[(u32, u64, bool); MAX_PAGES],
    ) {
        let page = self.pa_of(i);
        // Rule 2.
        let swapped = valid(old) && valid(new);
        let refilled = valid(new)
            && st.info[i].reachable
            && st
                .pending
                .iter()
                .any(|c| c.page == i && c.index == w && c.old != new);
        if swapped || refilled {
            Self::violate(
                st,
                Violation::BreakBeforeMake {
                    at: k,
                    table: page,
                    index: w,
                    old,
                    new,
                },
            );
        }
        // A cleared (or replaced) descriptor of a table reachable before
        // this epoch (a chain of tables detached bottom-up in one epoch
        // records every link): rule 3.
        if valid(old) && (before[i].2 || st.info[i].reachable) {
            let table = self.target(st, old);
            if let Some(t) = table {
                st.info[t].reachable = false;
                st.info[t].detach_pending = true;
            }
            let c = Clear {
                page: i,
                index: w,
                since: k,
                iova: Self::place(st, i, w),
                table,
                old,
            };
            if st.pending.push(c).is_err() {
                // Too many to track: demand a whole-domain invalidation.
                if let Some(last) = st.pending.last_mut() {
                    last.iova = None;
                }
            }
        }
        // Rule 1: a pointer stored.
        if let Some(t) = self.target(st, new) {
            let (ready_at, dirty, _) = before[t];
            let unclean = !st.coherent && dirty != 0;
            if ready_at > st.last_barrier || unclean {
                let table = self.pa_of(t);
                Self::violate(
                    st,
                    Violation::PublishedBeforeVisible {
                        at: k,
                        table,
                        unclean,
                    },
                );
            }
            let parent = st.info[i];
            let reachable = parent.reachable;
            let (height, base) = match (parent.height, Self::place(st, i, w)) {
                (Some(h), Some((b, _))) if h > 0 => (Some(h - 1), b),
                _ => (None, 0),
            };
            let child = &mut st.info[t];
            child.height = height;
            child.base = base;
            child.reachable = reachable;
            if reachable {
                self.mark_subtree(st, t);
            }
        }
    }

    /// A table just became reachable: so do the tables it already points to
    /// (a filled table published at once, as a split would).
    fn mark_subtree(&self, st: &mut State<'_>, t: usize) {
        for w in 0..WORDS {
            let v = self.word(t, w);
            if let Some(c) = self.target(st, v) {
                if c != t && !st.info[c].reachable {
                    let (height, base) = match (st.info[t].height, Self::place(st, t, w)) {
                        (Some(h), Some((b, _))) if h > 0 => (Some(h - 1), b),
                        _ => (None, 0),
                    };
                    st.info[c].reachable = true;
                    st.info[c].height = height;
                    st.info[c].base = base;
                    self.mark_subtree(st, c);
                }
            }
        }
    }
}

fn valid(v: u64) -> bool {
    v & 3 != 0
}

fn word_bytes(p: &Page, w: usize) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p.0[w * 8..w * 8 + 8]);
    b
}

// SAFETY: pages are handed out once until freed, zeroed (shadow and page
// alike), 4 KiB aligned (`Page` is), and `phys_to_virt` returns the page's
// own address inside the arena this lender borrows for `'a`.
unsafe impl TableMemory for OrderLender<'_> {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if pages != 1 {
            return None;
        }
        let i = {
            let mut st = self.st.borrow_mut();
            if let Some(b) = st.budget {
                if b == 0 {
                    return None;
                }
                st.budget = Some(b - 1);
            }
            let i = (0..self.pages).find(|&i| !st.info[i].lent)?;
            // SAFETY: page `i` of the arena is not lent, so nothing else
            // reads or writes it.
            unsafe { self.base.as_ptr().add(i).write_bytes(0, 1) };
            st.shadow[i] = Page::ZERO;
            i
        };
        let pa = self.pa_of(i);
        self.event(Event::Alloc(pa));
        Some(pa)
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        if pages != 1 {
            let mut st = self.st.borrow_mut();
            st.event += 1;
            let at = st.event;
            Self::violate(&mut st, Violation::BadFree { at, page: pa });
            return;
        }
        self.event(Event::Free(pa));
        if let Some(b) = self.st.borrow_mut().budget.as_mut() {
            *b += 1;
        }
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        match self.index_of(pa) {
            // SAFETY: `i < pages` keeps the pointer inside the arena.
            Some(i) => unsafe {
                self.base
                    .as_ptr()
                    .cast::<u8>()
                    .add(i * 4096 + (pa.0 % 4096) as usize)
            },
            None => core::ptr::null_mut(),
        }
    }

    fn clean(&self, pa: PhysAddr, len: usize) {
        self.event(Event::Clean(pa, len));
    }

    fn can_clean(&self) -> bool {
        true
    }

    fn observe_barrier(&self) {
        self.event(Event::Barrier);
    }
}

/// A backend wrapper that writes every call into an [`OrderLender`]'s log
/// (a sync after the inner backend's completion returned) and forwards it.
pub struct OrderBackend<'l, 'a, B> {
    /// The backend doing the work (e.g. a [`super::RecordingBackend`]).
    pub inner: B,
    lender: &'l OrderLender<'a>,
}

impl<'l, 'a, B: IommuBackend> OrderBackend<'l, 'a, B> {
    /// Wraps `inner`, logging into `lender`.
    pub fn new(inner: B, lender: &'l OrderLender<'a>) -> Self {
        Self { inner, lender }
    }
}

/// A split-completion backend under the recorder (a
/// [`SharedDomain`](crate::shared::SharedDomain) syncs through it): a
/// completion seen done is recorded as a sync that succeeded — every
/// invalidation queued before it is complete — and a queue error met
/// while looking as one that failed.
impl<B: crate::shared::SplitCompletion> crate::shared::SplitCompletion for OrderBackend<'_, '_, B> {
    fn queued(&self) -> u64 {
        self.inner.queued()
    }

    fn submit_completion(&mut self) -> Result<u64, BackendError> {
        self.inner.submit_completion()
    }

    fn completion_done(&mut self, ticket: u64) -> Result<bool, BackendError> {
        let r = self.inner.completion_done(ticket);
        match r {
            Ok(true) => self.lender.event(Event::Sync(true)),
            Err(_) => self.lender.event(Event::Sync(false)),
            Ok(false) => {}
        }
        r
    }

    fn completion_budget(&self) -> u32 {
        self.inner.completion_budget()
    }

    fn publish_needed(&self) -> bool {
        self.inner.publish_needed()
    }
}

impl<B: IommuBackend> IommuBackend for OrderBackend<'_, '_, B> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        let ours = match how {
            Attachment::Translated(info) => {
                let st = self.lender.st.borrow();
                st.root.map(|i| self.lender.pa_of(i)) == Some(info.root)
            }
            _ => false,
        };
        self.lender.event(Event::Attach(dev, ours));
        let r = self.inner.attach(dev, how);
        if r.is_ok() {
            let mut st = self.lender.st.borrow_mut();
            st.attached.retain(|d| *d != dev);
            if let Attachment::Translated(info) = how {
                let ours = st.root.map(|i| self.lender.pa_of(i)) == Some(info.root);
                if ours {
                    let _ = st.attached.push(dev);
                }
            }
        }
        r
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.lender.event(Event::Invalidate(iova.0, len, leaf_only));
        self.inner.invalidate(domain, iova, len, leaf_only)
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        self.lender.event(Event::InvalidateDomain);
        self.inner.invalidate_domain(domain)
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        let r = self.inner.sync();
        self.lender.event(Event::Sync(r.is_ok()));
        r
    }

    fn publish(&mut self) -> Result<(), BackendError> {
        self.lender.event(Event::Publish);
        self.inner.publish()
    }

    fn needs_map_invalidation(&self) -> bool {
        self.inner.needs_map_invalidation()
    }

    fn coherent_walk(&self) -> bool {
        self.lender.st.borrow().coherent
    }
}
