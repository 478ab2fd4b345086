//! [`SharedDomain`]: one domain used from several CPUs.

use super::SplitSync;
use crate::addr::{DmaAddr, PhysAddr};
use crate::error::DmaError;
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, MapAttrs, PteFormat};
use crate::state::{DmaPath, Domain, IovaState};

struct Guarded<F: PteFormat, M: TableMemory> {
    dom: Domain<F, M>,
    /// Table pages `sync_finish` handed back so far.
    popped: u64,
}

/// A [`Domain`] several CPUs use at once: each call takes a short spin
/// lock (`spin::Mutex`), and [`sync`](Self::sync) waits for the IOMMU
/// **outside** it, so one CPU's completion wait never blocks another CPU's
/// link, unlink or alloc.
///
/// The guarantees of [`Domain`] hold: a failed link changes nothing; a
/// table page freed by an unlink goes back to the lender only after a
/// completion that covers its invalidation (pages another CPU retired
/// while this sync waited stay for a later sync; the older ones go). A failed sync
/// hands nothing back and makes the next one invalidate the whole domain.
///
/// Use it with a backend that splits its sync ([`SplitSync`]): a CPU's
/// [`IommuCpu`](super::IommuCpu) handle on a
/// [`SharedIommu`](super::SharedIommu), or a driver owned by one CPU.
/// Not for interrupt context (it spins on its lock).
pub struct SharedDomain<F: PteFormat, M: TableMemory> {
    inner: spin::Mutex<Guarded<F, M>>,
}

impl<F: PteFormat, M: TableMemory> SharedDomain<F, M> {
    /// Shares `dom`.
    pub fn new(dom: Domain<F, M>) -> Self {
        Self {
            inner: spin::Mutex::new(Guarded { dom, popped: 0 }),
        }
    }

    /// The domain back (e.g. for [`Domain::teardown`]).
    pub fn into_inner(self) -> Domain<F, M> {
        self.inner.into_inner().dom
    }

    /// Runs `f` on the domain under the lock, for what has no method here
    /// (`reserve`, `try_alloc_at`, `link_p2p`, `translate`, …). Do not call
    /// [`Domain::sync`], `destroy`, `map` or `teardown` inside: they wait
    /// under the lock and bypass this wrapper's bookkeeping of freed
    /// pages; use [`sync`](Self::sync) / [`destroy`](Self::destroy).
    pub fn with<R>(&self, f: impl FnOnce(&mut Domain<F, M>) -> R) -> R {
        f(&mut self.inner.lock().dom)
    }

    /// [`Domain::try_alloc`] under the lock.
    ///
    /// # Errors
    ///
    /// As [`Domain::try_alloc`].
    pub fn try_alloc(&self, size: u64, dma_mask: u64) -> Result<DmaPath, DmaError> {
        self.inner.lock().dom.try_alloc(size, dma_mask)
    }

    /// [`Domain::link`] under the lock.
    ///
    /// # Errors
    ///
    /// As [`Domain::link`].
    pub fn link(
        &self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        self.inner
            .lock()
            .dom
            .link(tx, phys, offset, len, dir, attrs)
    }

    /// [`Domain::link_pages`] under the lock.
    ///
    /// # Errors
    ///
    /// As [`Domain::link_pages`].
    pub fn link_pages(
        &self,
        tx: &mut IovaState,
        pages: &[PhysAddr],
        offset: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        self.inner
            .lock()
            .dom
            .link_pages(tx, pages, offset, dir, attrs)
    }

    /// [`Domain::unlink`] under the lock.
    ///
    /// # Errors
    ///
    /// As [`Domain::unlink`].
    pub fn unlink(&self, tx: &mut IovaState, offset: u64, len: u64) -> Result<u64, DmaError> {
        self.inner.lock().dom.unlink(tx, offset, len)
    }

    /// [`Domain::free`] under the lock.
    ///
    /// # Errors
    ///
    /// As [`Domain::free`].
    #[allow(
        clippy::result_large_err,
        reason = "the state is handed back on failure, as Domain::free does"
    )]
    pub fn free(&self, tx: IovaState) -> Result<(), (IovaState, DmaError)> {
        self.inner.lock().dom.free(tx)
    }

    /// Whether unlinks or retired tables wait for a sync.
    pub fn has_pending(&self) -> bool {
        self.inner.lock().dom.has_pending()
    }

    /// [`Domain::sync`], with the completion wait outside the lock:
    /// invalidations and one completion are queued under it, the wait runs
    /// without it, and the lock is taken again only to hand back the table
    /// pages the completion covers.
    ///
    /// # Errors
    ///
    /// As [`Domain::sync`]. After an error nothing is handed back and the
    /// next sync invalidates the whole domain.
    pub fn sync<B: SplitSync + ?Sized>(&self, backend: &mut B) -> Result<(), DmaError> {
        let begun = {
            let mut g = self.inner.lock();
            let popped = g.popped;
            g.dom.sync_begin(backend, popped)?
        };
        let Some(begun) = begun else {
            return Ok(());
        };
        // No lock held: other CPUs link, unlink and sync meanwhile.
        let waited = backend.wait(begun.ticket);
        let mut g = self.inner.lock();
        if let Err(e) = waited {
            g.dom.sync_failed();
            return Err(e.into());
        }
        let popped = g.popped;
        let freed = g.dom.sync_finish(begun, popped);
        g.popped += freed as u64;
        Ok(())
    }

    /// [`free`](Self::free) then [`sync`](Self::sync), as
    /// [`Domain::destroy`].
    ///
    /// # Errors
    ///
    /// As [`Domain::destroy`].
    pub fn destroy<B: SplitSync + ?Sized>(
        &self,
        tx: IovaState,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        self.free(tx).map_err(|(_, e)| e)?;
        self.sync(backend)
    }
}
