//! The parts of [`Domain`] that [`SharedDomain`](crate::shared::SharedDomain)
//! runs through `&self` on its read side (several CPUs at once, disjoint
//! transactions), and the small exclusive steps it runs on its write side.

use super::{
    DIRS_SHIFT, DmaKind, Domain, HAS_PROVIDER, IovaState, KIND_SHIFT, KIND_TRANSLATED, PendingList,
    SyncBegun, Translated, link_attrs, queue_ranges,
};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::backend::IommuBackend;
use crate::barrier::wmb_on;
use crate::error::{BackendError, DmaError, PageTableError};
use crate::iova::IovaRange;
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, LeafHint, MapAttrs, PteFormat, SharedMapError};

/// Ranges whose translations changed, kept outside the domain by a
/// [`SharedDomain`](crate::shared::SharedDomain) (one set per shard, each
/// under its own short lock).
pub(crate) struct SharedPending {
    unmapped: PendingList,
    mapped: PendingList,
}

impl SharedPending {
    pub(crate) const fn new() -> Self {
        Self {
            unmapped: PendingList::new(),
            mapped: PendingList::new(),
        }
    }

    /// An unlinked range (`leaf_only`: no table was detached).
    #[inline]
    pub(crate) fn unmapped(&mut self, start: u64, len: u64, leaf_only: bool) {
        self.unmapped.add(start, len, leaf_only);
    }

    /// A linked range (invalidated only for a backend caching not-present
    /// entries).
    #[inline]
    pub(crate) fn mapped(&mut self, start: u64, len: u64) {
        self.mapped.add(start, len, true);
    }

    /// The next sync must invalidate the whole domain.
    pub(crate) fn set_overflow(&mut self) {
        self.unmapped.overflow = true;
    }

    /// Grows the last unlinked range by the page at `start` when it ends
    /// there (the next page of a run); `false` (nothing done) otherwise.
    /// Never makes an empty list non-empty.
    #[inline(always)]
    pub(crate) fn extend_unmapped_page(&mut self, start: u64) -> bool {
        let last = &mut self.unmapped.last;
        if start == last.end && last.start != last.end {
            last.end = start + PAGE_SIZE;
            return true;
        }
        false
    }

    /// As [`extend_unmapped_page`](Self::extend_unmapped_page), for a
    /// linked page.
    #[inline(always)]
    pub(crate) fn extend_mapped_page(&mut self, start: u64) -> bool {
        let last = &mut self.mapped.last;
        if start == last.end && last.start != last.end {
            last.end = start + PAGE_SIZE;
            return true;
        }
        false
    }

    /// Whether nothing waits (maps counted only when `with_maps`).
    pub(crate) fn is_empty(&self, with_maps: bool) -> bool {
        self.unmapped.is_empty() && (!with_maps || self.mapped.is_empty())
    }

    /// Moves every range of `self` into `into`, leaving `self` empty.
    pub(crate) fn drain_into(&mut self, into: &mut SharedPending) {
        fn mv(from: &mut PendingList, to: &mut PendingList) {
            let _ = from.for_each(|r| {
                to.add(r.start, r.end - r.start, r.leaf_only);
                Ok::<(), core::convert::Infallible>(())
            });
            to.overflow |= from.overflow;
            from.clear();
        }
        mv(&mut self.unmapped, &mut into.unmapped);
        mv(&mut self.mapped, &mut into.mapped);
    }
}

/// What a shared link left behind for the caller's bookkeeping.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SharedEffect {
    /// `(iova, len)`: on success the range linked; on an error the range
    /// whose entries were written and taken back again (to invalidate,
    /// walk caches included: a walker may have cached them), else empty.
    pub(crate) range: (u64, u64),
    /// Tables may have been attached and left empty under the leaf-table
    /// regions of this range (reclaim them later); empty when none.
    pub(crate) empty_in: (u64, u64),
}

impl SharedEffect {
    /// The effect of a shared map of `[iova, iova + len)` that returned
    /// `r`.
    fn of(iova: u64, len: u64, r: &Result<(), SharedMapError>) -> Self {
        match r {
            Ok(()) => Self {
                range: (iova, len),
                empty_in: (0, 0),
            },
            Err(e) => Self {
                range: if matches!(e.error, PageTableError::OutOfMemory) {
                    (iova, len)
                } else {
                    (0, 0)
                },
                empty_in: if e.left_empty { (iova, len) } else { (0, 0) },
            },
        }
    }
}

impl<F: PteFormat, M: TableMemory> Domain<F, M> {
    /// Whether `tx` was made by this domain.
    #[inline(always)]
    pub(crate) fn owns(&self, tx: &IovaState) -> bool {
        tx.token() == self.token && self.inner.is_some()
    }

    /// The domain's unique token (never changes): what [`owns`](Self::owns)
    /// compares, for a wrapper that checks ownership without the domain.
    pub(crate) fn token(&self) -> u32 {
        self.token
    }

    /// The token of the domain that made `tx`.
    pub(crate) fn tx_token(tx: &IovaState) -> u32 {
        tx.token()
    }

    #[inline(always)]
    fn shared_translated(&self, tx: &IovaState) -> Result<&Translated<F, M>, DmaError> {
        if tx.token() != self.token {
            return Err(DmaError::WrongDomain {
                expected: tx.domain_id(),
                found: self.id,
            });
        }
        self.inner.as_ref().ok_or(DmaError::IdentityDomain)
    }

    /// [`link`](Self::link) through `&self`, for a host-memory or
    /// host-bridge link (see `IoPageTable::map_shared`: pages and blocks,
    /// over any number of tables), leaf tables from `hint` or walks. Same
    /// checks, same errors, all or nothing on the translations and on `tx`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn link_shared(
        &self,
        hint: &LeafHint,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> (Result<DmaAddr, DmaError>, SharedEffect) {
        let checked = (|| {
            if tx.linked != 0 && tx.dirs() & HAS_PROVIDER != 0 {
                return Err(DmaError::MixedP2p);
            }
            let (iova, kind) = Self::check_link(tx, phys, offset, len, attrs)?;
            Ok((iova, kind, self.shared_translated(tx)?))
        })();
        let (iova, kind, t) = match checked {
            Ok(v) => v,
            Err(e) => return (Err(e), SharedEffect::default()),
        };
        let r =
            t.pt.map_shared(hint, iova, phys.0, iova + len, link_attrs(attrs, dir));
        Self::linked_shared(tx, iova, len, kind, dir, r)
    }

    /// What a shared map of `[iova, iova + len)` for `tx` that returned `r`
    /// means for `tx` and the caller.
    fn linked_shared(
        tx: &mut IovaState,
        iova: u64,
        len: u64,
        kind: DmaKind,
        dir: DmaDirection,
        r: Result<(), SharedMapError>,
    ) -> (Result<DmaAddr, DmaError>, SharedEffect) {
        let eff = SharedEffect::of(iova, len, &r);
        match r {
            Ok(()) => {
                tx.linked += len;
                tx.record_links(kind, tx.dirs() | dir as u8);
                (Ok(DmaAddr(iova)), eff)
            }
            Err(e) => (Err(e.error.into()), eff),
        }
    }

    /// The per-page [`link`](Self::link) of host memory through `&self`,
    /// the shape of [`Domain::link`]'s own per-page path (one combined test
    /// of the offset, the transaction's domain and kind), its leaf table
    /// from `hint` (see [`LeafHint`]). `None` (nothing done) for any other
    /// call: use [`link_shared`](Self::link_shared). The errors (no
    /// translation changed) are those of the table's one-page path.
    #[inline(always)]
    pub(crate) fn link_page_shared(
        &self,
        hint: &LeafHint,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Option<Result<u64, SharedMapError>> {
        if !tx.takes_host_page(offset, self.token, attrs) {
            return None;
        }
        let t = self.inner.as_ref()?;
        // Page aligned and inside the aperture, which lies inside the
        // table's input range (see `Domain::link`).
        let iova = tx.base() + offset;
        match t
            .pt
            .map_page_shared(hint, iova, phys.0, link_attrs(attrs, dir))?
        {
            Ok(()) => {
                tx.linked += PAGE_SIZE;
                // The kind was nothing or host memory (`takes_host_page`):
                // host memory now.
                tx.owner |= (KIND_TRANSLATED << KIND_SHIFT) | (u64::from(dir as u8) << DIRS_SHIFT);
                Some(Ok(iova))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// [`link_pages`](Self::link_pages) through `&self`, for host memory
    /// (see `IoPageTable::map_pages_shared`): any number of leaf tables,
    /// each found once (from `hint` or a walk) and its count changed once.
    /// Same checks, same errors, all or nothing on the translations and on
    /// `tx`.
    #[inline]
    pub(crate) fn link_pages_shared(
        &self,
        hint: &LeafHint,
        tx: &mut IovaState,
        pages: &[PhysAddr],
        offset: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> (Result<DmaAddr, DmaError>, SharedEffect) {
        let none = SharedEffect::default();
        let checked = Self::check_link_pages(tx, pages, offset, attrs)
            .and_then(|(iova, len, kind)| Ok((iova, len, kind, self.shared_translated(tx)?)));
        let (iova, len, kind, t) = match checked {
            Ok(v) => v,
            Err(e) => return (Err(e), none),
        };
        let attrs = link_attrs(attrs, dir);
        if !attrs.intersects(MapAttrs::READ | MapAttrs::WRITE) {
            return (Err(PageTableError::NoAccess.into()), none);
        }
        let r = t.pt.map_pages_shared(hint, iova, pages, attrs);
        Self::linked_shared(tx, iova, len, kind, dir, r)
    }

    /// The per-page [`unlink`](Self::unlink) of a linked page of a
    /// translated transaction of this domain through `&self` (the shape of
    /// [`Domain::unlink`]'s own per-page path), its leaf table from `hint`:
    /// the page's IOVA and whether its leaf table is now empty. `None`
    /// (nothing changed) for any other call: use
    /// [`unlink_shared`](Self::unlink_shared).
    #[inline(always)]
    pub(crate) fn unlink_page_shared(
        &self,
        hint: &LeafHint,
        tx: &mut IovaState,
        offset: u64,
    ) -> Option<(u64, bool)> {
        if !(tx.holds_page(offset) && tx.token() == self.token && !tx.is_bus_addr()) {
            return None;
        }
        let t = self.inner.as_ref()?;
        let iova = tx.base() + offset;
        let emptied = t.pt.unmap_page_shared(hint, iova)?;
        tx.linked = tx.linked.saturating_sub(PAGE_SIZE);
        if tx.linked == 0 {
            tx.forget_links();
        }
        Some((iova, emptied))
    }

    /// [`unlink`](Self::unlink) through `&self`, for pages of a translated
    /// transaction (see `IoPageTable::unmap_shared`: any number of leaf
    /// tables, none detached; `on_empty` gets each one left empty), leaf
    /// tables from `hint` or walks: the bytes unlinked and the IOVA range.
    /// `None` (nothing changed) for any other shape or error but the
    /// argument checks: use the exclusive path.
    #[inline]
    pub(crate) fn unlink_shared(
        &self,
        hint: &LeafHint,
        tx: &mut IovaState,
        offset: u64,
        len: u64,
        on_empty: &mut impl FnMut(u64),
    ) -> Option<Result<(u64, u64), DmaError>> {
        let iova = match Self::check_window(tx, offset, len) {
            Ok(i) => i,
            Err(e) => return Some(Err(e)),
        };
        let t = match self.shared_translated(tx) {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        if tx.is_bus_addr() {
            return None;
        }
        let bytes = t.pt.unmap_shared(hint, iova, iova + len, on_empty)?;
        tx.linked = tx.linked.saturating_sub(bytes);
        if tx.linked == 0 {
            tx.forget_links();
        }
        Some(Ok((bytes, iova)))
    }

    /// The translated range of `tx` still to unmap when it is freed
    /// (`None`: nothing linked, or bus-address P2P links only).
    pub(crate) fn tx_linked_range(tx: &IovaState) -> Option<(u64, u64)> {
        (tx.linked != 0 && !tx.is_bus_addr()).then(|| (tx.base(), tx.size()))
    }

    /// The IOVA range of `tx`, and whether it is a fixed one.
    pub(crate) fn tx_range(tx: &IovaState) -> (IovaRange, bool) {
        (
            IovaRange {
                start: tx.base(),
                size: tx.size(),
            },
            tx.is_fixed(),
        )
    }

    /// Unmaps the pages of `[start, start + size)` through `&self`
    /// (`IoPageTable::unmap_present_shared`); `Err` when the exclusive
    /// path must finish (a block).
    pub(crate) fn unmap_present_shared(
        &self,
        start: u64,
        size: u64,
        on_empty: &mut impl FnMut(u64),
    ) -> Result<u64, u64> {
        match self.inner.as_ref() {
            Some(t) => t.pt.unmap_present_shared(start, start + size, on_empty),
            None => Ok(0),
        }
    }

    /// Exclusive: unmaps whatever is mapped in `[start, start + size)` (a
    /// freed transaction's range), queueing the invalidation in the
    /// domain's own pending ranges.
    pub(crate) fn unmap_present_exclusive(&mut self, start: u64, size: u64) {
        if let Some(t) = self.inner.as_mut() {
            t.pt.fold_shared();
            if let Ok(out) = t.pt.unmap_present(DmaAddr(start), size) {
                t.unmapped.add(start, size, !out.freed_tables);
            }
        }
    }

    /// A state for `range`, handed out by a shard of a shared domain.
    pub(crate) fn shared_state(&self, range: IovaRange) -> IovaState {
        IovaState::new(
            range.start | u64::from(range.size.trailing_zeros()),
            self.token,
            self.id,
            0,
        )
    }

    /// The IOVA aperture, for a translated domain.
    pub(crate) fn aperture(&self) -> Option<(u64, u64)> {
        self.inner.as_ref().map(|t| t.iova.aperture())
    }

    /// Exclusive: a naturally aligned range of `size` bytes from the
    /// domain's allocator, for a shard to hand out from (the shard builds
    /// its allocator over it in place, outside the write side).
    pub(crate) fn grant_chunk(&mut self, size: u64) -> Option<IovaRange> {
        let t = self.inner.as_mut()?;
        t.iova.alloc(size, u64::MAX).ok()
    }

    /// Exclusive: gives a shard's chunk `[start, end)` back to the domain's
    /// allocator.
    pub(crate) fn return_chunk(&mut self, (start, end): (u64, u64)) {
        if let Some(t) = self.inner.as_mut() {
            let _ = t.iova.free(IovaRange {
                start,
                size: end - start,
            });
        }
    }

    /// Exclusive, first thing on the write side: counts the pages the
    /// shared path attached in the table's own counters, before anything
    /// there may detach them.
    pub(crate) fn fold_shared(&mut self) {
        if let Some(t) = self.inner.as_mut() {
            t.pt.fold_shared();
        }
    }

    /// Exclusive: folds the shared path's page statistics into the table,
    /// and moves the domain's own pending ranges into `into`.
    pub(crate) fn exclusive_done(&mut self, into: &mut SharedPending) {
        if let Some(t) = self.inner.as_mut() {
            t.pt.fold_shared();
            let mut own = SharedPending {
                unmapped: core::mem::replace(&mut t.unmapped, PendingList::new()),
                mapped: core::mem::replace(&mut t.mapped, PendingList::new()),
            };
            own.drain_into(into);
        }
    }

    /// Exclusive: detaches the empty tables on the path to `iova` (see
    /// `IoPageTable::reclaim_empty`) and queues their invalidation, walk
    /// caches included, in `into`.
    pub(crate) fn reclaim_empty(&mut self, iova: u64, into: &mut SharedPending) {
        if let Some(t) = self.inner.as_mut() {
            if let Some((start, len)) = t.pt.reclaim_empty(iova) {
                into.unmapped(start, len, false);
            }
        }
    }

    /// Exclusive: detaches every empty table of the domain, wherever it is
    /// (the walk of [`reclaim_empty_tables`](Self::reclaim_empty_tables)),
    /// and queues their invalidation, walk caches included, in `into`: a
    /// reclaim whose hints were dropped.
    pub(crate) fn reclaim_all_empty(&mut self, into: &mut SharedPending) {
        if let Some(t) = self.inner.as_mut() {
            t.pt.fold_shared();
            t.pt.reclaim_empty_tables(|start, len| into.unmapped(start, len, false));
        }
    }

    /// [`translate`](Self::translate) while shared calls run.
    pub(crate) fn translate_shared(&self, iova: DmaAddr) -> Option<(PhysAddr, MapAttrs)> {
        self.inner
            .as_ref()?
            .pt
            .translate_shared(iova)
            .map(|(pa, a, _)| (pa, a))
    }

    /// Table pages retired and not yet handed back.
    pub(crate) fn retired_pages(&self) -> usize {
        self.inner.as_ref().map_or(0, |t| t.pt.retired_pages())
    }

    /// What a sync of `p` queues before its completion (see `Domain::sync`
    /// and `Translated::invalidate_and_wait`): `false` when there is
    /// nothing to invalidate (published, no completion needed).
    pub(crate) fn queue_shared<B: IommuBackend + ?Sized>(
        &self,
        p: &SharedPending,
        backend: &mut B,
    ) -> Result<bool, BackendError> {
        let Some(t) = self.inner.as_ref() else {
            return Ok(false);
        };
        let with_maps = backend.needs_map_invalidation();
        if p.is_empty(with_maps) && t.pt.retired_pages() == 0 {
            wmb_on(t.pt.memory());
            backend.publish()?;
            return Ok(false);
        }
        let info = t.info(self.id);
        // Table stores (this CPU's, and those of the CPUs whose ranges the
        // lock hand-off made visible here: the barrier is cumulative)
        // before the doorbell.
        wmb_on(t.pt.memory());
        queue_ranges(backend, &info, &p.unmapped, &p.mapped, with_maps)?;
        Ok(true)
    }

    /// Moves `p` into the domain's own pending ranges (the shared domain
    /// is taken apart: its next [`sync`](Self::sync) covers them).
    pub(crate) fn absorb_pending(&mut self, mut p: SharedPending) {
        if let Some(t) = self.inner.as_mut() {
            let mut own = SharedPending {
                unmapped: core::mem::replace(&mut t.unmapped, PendingList::new()),
                mapped: core::mem::replace(&mut t.mapped, PendingList::new()),
            };
            p.drain_into(&mut own);
            t.unmapped = own.unmapped;
            t.mapped = own.mapped;
        }
    }

    /// What a sync with nothing to invalidate does: the table stores
    /// before the walker may see them, then the backend's publish.
    pub(crate) fn publish<B: IommuBackend + ?Sized>(
        &self,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        if let Some(t) = self.inner.as_ref() {
            wmb_on(t.pt.memory());
            backend.publish()?;
        }
        Ok(())
    }

    /// A [`SyncBegun`] for a shared sync whose completion is `ticket`.
    pub(crate) fn shared_begun(&self, ticket: u64, popped: u64) -> SyncBegun {
        SyncBegun {
            ticket,
            retired: self.retired_pages(),
            popped,
        }
    }
}
