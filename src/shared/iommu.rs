//! [`SharedIommu`]: one driver, many CPUs; [`IommuCpu`]: one CPU's handle.

use super::lock::{IrqLock, Padded};
use super::sync::{AtomicU64, Ordering, spin_hint};
use super::{SplitCompletion, SplitSync};
use crate::addr::DmaAddr;
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;

/// The driver and what the CPUs sharing it agree on, under the lock.
struct Inner<B> {
    backend: B,
    /// The newest completion submitted (0: none).
    ticket: u64,
    /// [`SplitCompletion::queued`] when it was submitted: every command up
    /// to this one completes with it.
    covers: u64,
    /// The newest queue error met by anyone.
    last_error: Option<BackendError>,
    /// What an interrupt that found the lock taken wants done.
    deferred: fn(&mut B),
}

/// One IOMMU driver (an initialised [`Smmu`](crate::smmuv3::Smmu) or
/// [`Vtd`](crate::vtd::Vtd)) shared by several CPUs.
///
/// Each CPU takes its own handle with [`cpu`](Self::cpu) and uses it as
/// the [`IommuBackend`] of its domains. The driver sits behind one short
/// spin lock, held while commands are copied into the queue and the
/// producer index is written, and for one look at the completion — never
/// across a completion wait (attach and detach excepted, which wait for
/// their own invalidation under it). Completions are waited for by ticket:
/// a sync whose commands an already-submitted completion covers (another
/// CPU's CMD_SYNC / wait descriptor queued after them) submits nothing and
/// waits for that one, so one completion serves several CPUs' batches.
///
/// A queue error (SMMU `CMDQ_ERR`, VT-d IQE/ITE/ICE) is recorded when any
/// CPU meets it and returned by the sync of **every** handle whose window
/// (from the end of its previous sync to the end of this one) saw it:
/// errors may be reported to a CPU whose own commands were fine, never
/// lost. A sync that returns an error means what
/// [`IommuBackend::sync`] says: treat that batch as not done.
///
/// Interrupts: call [`handle_irq`](Self::handle_irq) from the IOMMU's
/// interrupt. It never spins on the lock: when the lock is taken (by
/// another CPU or by the code the interrupt preempted), it returns `None`
/// and the holder runs the `deferred_irq` handler given to
/// [`new`](Self::new) as it releases the lock, so nothing the interrupt
/// meant to drain stays behind.
pub struct SharedIommu<B> {
    /// Each on lines of its own: the lock (written by every CPU's queueing),
    /// `completed` (written under the lock as completions are seen, read by
    /// every waiter) and the rest (read on every call, written only on an
    /// error).
    lock: Padded<IrqLock<Inner<B>>>,
    /// Every ticket up to this one has completed.
    completed: Padded<AtomicU64>,
    /// Queue errors recorded so far.
    errors: AtomicU64,
    budget: u32,
    needs_map_invalidation: bool,
    coherent_walk: bool,
    /// [`SplitCompletion::publish_needed`].
    publish_needed: bool,
}

impl<B: SplitCompletion> SharedIommu<B> {
    /// Shares `backend` (initialised). `deferred_irq` is what an interrupt
    /// that found the lock taken wants done; it runs under the lock on the
    /// CPU that releases it — e.g. drain the event queue or the fault
    /// records into a buffer the interrupt's owner reads later. It must not
    /// use this `SharedIommu`.
    pub fn new(backend: B, deferred_irq: fn(&mut B)) -> Self {
        let budget = backend.completion_budget();
        let needs_map_invalidation = backend.needs_map_invalidation();
        let coherent_walk = backend.coherent_walk();
        let publish_needed = backend.publish_needed();
        Self {
            lock: Padded(IrqLock::new(
                Inner {
                    backend,
                    ticket: 0,
                    covers: 0,
                    last_error: None,
                    deferred: deferred_irq,
                },
                |i: &mut Inner<B>| (i.deferred)(&mut i.backend),
            )),
            completed: Padded(AtomicU64::new(0)),
            errors: AtomicU64::new(0),
            budget,
            needs_map_invalidation,
            coherent_walk,
            publish_needed,
        }
    }

    /// Gives the driver back (e.g. to shut it down); the handles are gone
    /// by then (they borrow `self`).
    pub fn into_inner(self) -> B {
        self.lock.0.into_inner().backend
    }

    /// A handle for one CPU (or one thread): its own `&mut` backend.
    pub fn cpu(&self) -> IommuCpu<'_, B> {
        IommuCpu {
            shared: self,
            last_queued: 0,
            errors_seen: self.errors.load(Ordering::Acquire),
        }
    }

    /// Runs `f` on the driver under the lock (statistics, configuration,
    /// polling events outside interrupt context). Spins while another CPU
    /// holds the lock; not for interrupt context. `f` must not use this
    /// `SharedIommu`, nor re-`init` or shut the driver down (the tickets
    /// of the queue it programs would start again below those already
    /// seen): take it back with [`into_inner`](Self::into_inner) for that.
    pub fn with<R>(&self, f: impl FnOnce(&mut B) -> R) -> R {
        self.lock.with(|i| f(&mut i.backend))
    }

    /// For the IOMMU's interrupt: runs `f` (e.g. `|s| s.handle_irq(..)`)
    /// now if the lock is free, else returns `None` without waiting and the
    /// lock's holder runs the `deferred_irq` handler when it releases.
    pub fn handle_irq<R>(&self, f: impl FnOnce(&mut B) -> R) -> Option<R> {
        self.lock.try_with_or_defer(|i| f(&mut i.backend))
    }

    /// Records a queue error for every window that saw it. `seen` is the
    /// count of errors already reported to the caller, which gets this one
    /// now: it moves past it, so the caller's next wait does not report it
    /// again (errors other CPUs record later still reach that wait).
    fn record<T>(
        &self,
        inner: &mut Inner<B>,
        r: Result<T, BackendError>,
        seen: &mut u64,
    ) -> Result<T, BackendError> {
        if let Err(e @ (BackendError::QueueError { .. } | BackendError::HardwareError { .. })) = r {
            inner.last_error = Some(e);
            *seen = self.errors.fetch_add(1, Ordering::Release) + 1;
        }
        r
    }

    /// The ticket of a completion that covers every command up to
    /// `last_queued`: the newest one when it does, else a new one.
    fn submit(&self, last_queued: u64, seen: &mut u64) -> Result<u64, BackendError> {
        self.lock.with(|i| self.submit_locked(i, last_queued, seen))
    }

    /// [`submit`](Self::submit) with the lock held: the newest completion
    /// when it already covers `last_queued`, else a new one, with one look
    /// at it in the same hold: the waiter's first look, which would take
    /// the lock again (an emulator completes at once, silicon usually not
    /// yet; either way the look is the same read of the hardware).
    fn submit_locked(
        &self,
        i: &mut Inner<B>,
        last_queued: u64,
        seen: &mut u64,
    ) -> Result<u64, BackendError> {
        if i.ticket != 0 && last_queued != 0 && i.covers >= last_queued {
            return Ok(i.ticket);
        }
        let r = i.backend.submit_completion();
        let t = self.record(i, r, seen)?;
        if t != 0 {
            i.ticket = t;
            i.covers = i.backend.queued();
            self.look(i, t);
        }
        Ok(t)
    }

    /// One look, with the lock held, at whether `ticket` completed; notes
    /// it in `completed` when it did. An error met is recorded for every
    /// window, the looking CPU's included (its wait reports it).
    fn look(&self, i: &mut Inner<B>, ticket: u64) -> bool {
        let r = i.backend.completion_done(ticket);
        match self.record(i, r, &mut 0) {
            Ok(true) => {
                // Only the lock's holder writes it: a store, no locked
                // instruction (the ticket looked at may be older than the
                // newest one seen done).
                if self.completed.load(Ordering::Relaxed) < ticket {
                    self.completed.store(ticket, Ordering::Release);
                }
                true
            }
            _ => false,
        }
    }

    /// Waits, bounded, until `ticket` completed; `errors_seen` is the
    /// caller's count of the errors already reported to it.
    fn wait(&self, ticket: u64, errors_seen: &mut u64) -> Result<(), BackendError> {
        let mut done = false;
        for _ in 0..self.budget.max(1) {
            if self.completed.load(Ordering::Acquire) >= ticket {
                done = true;
                break;
            }
            // One look at the hardware by whichever waiter gets the lock;
            // the others watch `completed`.
            let looked = self.lock.try_with(|i| self.look(i, ticket));
            if looked == Some(true) {
                done = true;
                break;
            }
            spin_hint();
        }
        let errors = self.errors.load(Ordering::Acquire);
        if errors != *errors_seen {
            *errors_seen = errors;
            let e = self.lock.with(|i| i.last_error);
            return Err(e.unwrap_or(BackendError::HardwareError { status: 0 }));
        }
        if done {
            Ok(())
        } else {
            Err(BackendError::Timeout {
                what: "shared completion",
                polls: self.budget.max(1),
            })
        }
    }
}

/// One CPU's handle on a [`SharedIommu`]: an [`IommuBackend`] (and
/// [`SplitSync`]) whose calls take the shared lock briefly.
pub struct IommuCpu<'a, B> {
    shared: &'a SharedIommu<B>,
    /// The driver's queued count after this handle's last command.
    last_queued: u64,
    errors_seen: u64,
}

impl<B: SplitCompletion> IommuCpu<'_, B> {
    fn queue(
        &mut self,
        f: impl FnOnce(&mut B) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let s = self.shared;
        let seen = &mut self.errors_seen;
        let (r, q) = s.lock.with(|i| {
            let r = f(&mut i.backend);
            let q = i.backend.queued();
            (s.record(i, r, seen), q)
        });
        self.last_queued = q;
        r
    }
}

impl<B: SplitCompletion> IommuBackend for IommuCpu<'_, B> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        self.queue(|b| b.attach(dev, how))
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.queue(|b| b.invalidate(domain, iova, len, leaf_only))
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        self.queue(|b| b.invalidate_domain(domain))
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        let t = SplitSync::submit(self)?;
        SplitSync::wait(self, t)
    }

    fn publish(&mut self) -> Result<(), BackendError> {
        let s = self.shared;
        if !s.publish_needed {
            // Nothing for the hardware: the caller's barrier ordered the
            // table stores, and the lock every CPU contends for stays free.
            return Ok(());
        }
        let seen = &mut self.errors_seen;
        s.lock.with(|i| {
            let r = i.backend.publish();
            s.record(i, r, seen)
        })
    }

    fn needs_map_invalidation(&self) -> bool {
        self.shared.needs_map_invalidation
    }

    fn coherent_walk(&self) -> bool {
        self.shared.coherent_walk
    }
}

impl<B: SplitCompletion> SplitSync for IommuCpu<'_, B> {
    fn submit(&mut self) -> Result<u64, BackendError> {
        self.shared.submit(self.last_queued, &mut self.errors_seen)
    }

    fn wait(&mut self, ticket: u64) -> Result<(), BackendError> {
        self.shared.wait(ticket, &mut self.errors_seen)
    }

    fn queue_and_submit(
        &mut self,
        queue: &mut dyn FnMut(&mut dyn IommuBackend) -> Result<bool, BackendError>,
    ) -> Result<Option<u64>, BackendError> {
        let s = self.shared;
        let seen = &mut self.errors_seen;
        let (r, q) = s.lock.with(|i| {
            let r = queue(&mut i.backend);
            let queued = i.backend.queued();
            let r = match s.record(i, r, seen) {
                Ok(true) => s.submit_locked(i, queued, seen).map(Some),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            };
            (r, queued)
        });
        self.last_queued = q;
        r
    }
}
