//! Several CPUs: the concurrency model, and the wrappers that share a
//! driver ([`SharedIommu`]) and a domain ([`SharedDomain`]).
//!
//! # The model
//!
//! Every type in the crate is used through `&mut` for what changes it, and
//! none synchronises on its own; sharing is explicit, through this module.
//!
//! | type | `Send` | `Sync` | to use from several CPUs |
//! |---|---|---|---|
//! | [`Domain<F, M>`](crate::Domain), [`AnyDomain<M>`](crate::AnyDomain) | when `M` is | when `M` is (only `&self` readers: `translate`, `info`) | [`SharedDomain`] (or your own lock around it) |
//! | [`Smmu<M>`](crate::smmuv3::Smmu), [`Vtd<M>`](crate::vtd::Vtd) | when `M` is | no | [`SharedIommu`], one [`IommuCpu`] handle per CPU |
//! | [`IovaState`](crate::IovaState), [`DirectState`](crate::DirectState), [`Mapping`](crate::Mapping) | yes | yes | owned by the CPU running the transaction; move it freely |
//! | [`SharedIommu<B>`] | when `B` is `Send` | when `B` is `Send` | `&` from every CPU |
//! | [`SharedDomain<F, M>`] | when `M` is `Send + Sync` | when `M` is `Send + Sync` (several CPUs walk and lend at once) | `&` from every CPU |
//! | [`IommuCpu<'_, B>`] | when `B` is `Send` | when `B` is `Send` | one per CPU (`&mut`) |
//! | adapters ([`adapters::session`](crate::adapters::session)'s sessions) | when their domain and backend are | as their domain | one session per device, behind the consumer's own lock |
//!
//! The claims above are checked at compile time (the assertions at the
//! bottom of this module's source); a lender `M` shared by several CPUs
//! must itself be `Send + Sync` (its `alloc_zeroed` / `free` are called
//! from each).
//!
//! **What a user must hold.** Without this module: one lock around each
//! `Domain` and each driver, and never hold the driver's lock in an
//! interrupt handler that may preempt its holder. With it: nothing —
//! [`SharedDomain`] and [`SharedIommu`] take their own short spin locks;
//! the caller owns its [`IovaState`](crate::IovaState) exclusively, as the
//! type already requires.
//!
//! **Locks and waits.** No lock is held across a completion wait: a
//! [`SharedDomain::sync`] queues its invalidations and one completion under
//! the domain lock and the driver lock, releases both, waits by ticket, and
//! takes the domain lock again only to hand freed table pages back. The
//! driver lock is held while commands are copied into the queue and the
//! producer index written, and for one look at the completion; a full
//! queue is drained under it (bounded by the poll budget), and `attach` /
//! `detach` wait for their own invalidation under it.
//!
//! **Interrupt context.** Only [`SharedIommu::handle_irq`] may run in an
//! interrupt handler: it never spins on a lock (see [`SharedIommu`]). Every
//! other call spins on a lock whose holder may be the code the interrupt
//! preempted, so it must not run in interrupt context; the unshared
//! [`Smmu::handle_irq`](crate::smmuv3::Smmu::handle_irq) /
//! [`Vtd::handle_irq`](crate::vtd::Vtd::handle_irq) need `&mut`, i.e. the
//! user's lock, with the same rule.
//!
//! **Errors.** A queue error met by any CPU is returned by the sync of every
//! handle whose window saw it ([`SharedIommu`]); a failed shared sync makes
//! the domain's next sync invalidate the whole domain, and hands no table
//! page back.
//!
//! **Link and unlink in parallel** ([`SharedDomain`]). Transactions own
//! disjoint IOVA ranges (the allocator hands each its own), so the leaf
//! entries and blocks of one transaction are written by one CPU only.
//! What CPUs share is the upper tables and the valid-entry counts kept in
//! their entries' ignored bits. `link` / `unlink` therefore run on the *read side* of a
//! reader-writer lock whose readers enter per-shard slots (no cache line
//! common to all CPUs is written to enter), through the
//! page table's shared-access path: an empty upper entry gets its table by
//! compare-and-swap, and the CPU that loses the race hands its page back
//! to the lender at once — nothing ever saw it (Linux
//! `arm_lpae_install_table`); counts change by atomic add and subtract.
//! No lock is held across a table walk but that read side, which only the
//! rare write side waits for.
//!
//! The shared path never detaches a table: an unlink that empties one
//! leaves it attached with count 0 (as Linux's io-pgtable, which never
//! frees a table on a 4 KiB unmap), and notes it. Emptied tables are
//! reclaimed — detached, retired, handed back after a covering completion,
//! as an unmap on one CPU does — only on the *write side*: a sync that
//! finds a shard's list of noted tables full tries the write side
//! (`try_write`, skipped while any CPU is on the read side) and reclaims
//! them, queueing their invalidation (walk caches included) in that sync.
//! A note that finds the list full is dropped, and the reclaim then walks
//! the whole table for empty ones instead (the walk of
//! `Domain::reclaim_empty_tables`, which a `Domain` kept with
//! `TableReclaim::Keep` uses too): no emptied table outlives a reclaim.
//! The shared path takes every host-memory link and unlink, over any
//! number of tables: one page, a contiguous run (with the exclusive path's
//! shapes: a 2 MiB / 1 GiB block where one fits over a not-valid entry,
//! pages elsewhere), a `link_pages` list (first a look that nothing in the
//! range is mapped, then a table at a time, each count changed once), and
//! unlinks of pages and whole blocks. The write side runs the rest:
//! bus-address P2P, a range not wholly linked or cutting a block (to name
//! the error), a transaction from the domain's own allocator being freed.
//! All or nothing holds on both sides (a failed shared link changes no
//! translation: entries it wrote before a table could not be lent are
//! cleared again and their range invalidated at the next sync; tables it
//! attached stay, empty, for a reclaim).
//!
//! **Per-call cost.** Each shared call enters and leaves the read side
//! (a compare-and-swap on the slot's solo word, and a plain store to leave;
//! a second reader of the slot counts itself in and out), changes a table's
//! count atomically, and an unlink notes its range under the side's spin
//! lock: on one CPU a per-page `link` costs about 5×, a per-page `unlink`
//! about 9× what `Domain`'s does in time (the locked instructions; 118 /
//! 120 instructions against 62 / 51). A list of pages through
//! [`SharedDomain::link_pages`] pays them once per list: about 1.2× the cost of
//! `Domain::link_pages` per page. Link many pages in one call where the
//! device's buffer allows.
//!
//! **IOVAs.** [`SharedDomain::try_alloc`] serves a request from the
//! calling CPU's shard: a chunk of the aperture (up to 1 GiB, at least a
//! leaf table's 2 MiB, so no two shards share a leaf table) taken once
//! from the domain's allocator and handed out under the shard's own short
//! spin lock; frees go back to the shard whose chunk holds the range.
//! What a shard cannot serve (larger than a chunk, a narrow DMA mask, a
//! full chunk) goes to the domain's allocator on the write side, with its
//! typed errors. The CPU's shard is a hint: its index modulo four when
//! the user gives a way to read it ([`SharedDomain::with_cpu_index`]),
//! else the region of its stack, which claims a free shard on first use
//! ([`SharedDomain::new`]; there is no portable CPU number).
//!
//! **Pending invalidations** are kept per side under the shard's lock
//! (never across a walk): a transaction's in its shard's side (whichever
//! CPU unlinks), or the domain-wide one (transactions from the domain's
//! allocator, the write side's work). Each side has a sync word of its own
//! (a "pending" bit, a taking bit, the newest ticket published and the
//! newest seen done, on one line). A sync waits, holding nothing, until no
//! other sync holds one of the words it covers, takes those with pending
//! ranges (one compare-and-swap each, in index order), drains their sides
//! and queues their invalidations and one completion under one hold of the
//! IOMMU's lock ([`SplitSync::queue_and_submit`]), publishes its ticket in
//! each and releases them; a sync with nothing pending reads the words and
//! waits for every ticket not yet seen done (another CPU's sync that took
//! the ranges of an unlink that returned before it began).
//! [`SharedDomain::sync_for`] and [`SharedDomain::destroy`] cover one
//! transaction's side and the domain-wide one; [`SharedDomain::sync`]
//! covers every side.
//!
//! **Cost** (measured on this crate's bench, callgrind, one CPU,
//! instructions per 4 KiB call including one sync per 32768 calls; the
//! `s1/shared` contender of `cargo xtask bench --instructions`,
//! 2026-11-30): `link` of sequential pages 109 for `SharedDomain` against
//! 62 for `Domain`, `unlink` 121 against 48 (before the per-shard
//! leaf-table hint, `crate::pgtable::LeafHint`, they were 471 and 378: a
//! walk from the root at every call). What is left per call: the read
//! side's compare-and-swap and release, the hint's seqlock and generation
//! check, an atomic count, and for an unlink (or a link before the first
//! sync tells it the IOMMU does not cache not-present entries) the short
//! lock of the transaction's side over its pending ranges (found with one
//! compare of the page's chunk number). Scattered pages: `link` 326 against
//! 223 (a walk each, as `Domain`'s). A one-way page's descriptor comes
//! from precomputed bits, as a read-write one's.
//! Two threads on disjoint transactions of one `SharedDomain`
//! (`bench: shared threads`, 16 one-page one-way links, `sync_for`,
//! unlink, `destroy` per transaction): ratio 1.53–1.76 over about 20 runs,
//! 1.7 or more in most: what
//! two domains sharing one [`SharedIommu`] give in the same runs (the
//! machine itself 1.7–2.0: two threads on separate domains and queues).
//! With the domain-wide [`SharedDomain::sync`] in their place the ratio is
//! 0.8–1.05: each sync reads the other CPU's word and drains its side
//! whenever an unlink of it is pending (when all sides shared one word,
//! 1.5–1.6: syncs queued behind one another and rarely overlapped).

mod domain;
mod iommu;
mod lock;
pub(crate) mod sync;
#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(loom)]
pub use crate::pgtable::LoomLeafHint;
pub use domain::SharedDomain;
pub use iommu::{IommuCpu, SharedIommu};
#[cfg(loom)]
pub use lock::LoomRwCell;
#[cfg(loom)]
pub use sync::{loom_page, loom_reset};

use crate::backend::IommuBackend;
use crate::error::BackendError;

/// A driver whose completion wait splits into "queue one completion" and
/// "look whether it completed", so that several CPUs can share it
/// ([`SharedIommu`]). [`Smmu`](crate::smmuv3::Smmu) (CMD_SYNC) and
/// [`Vtd`](crate::vtd::Vtd) (invalidation-wait descriptor) implement it.
pub trait SplitCompletion: IommuBackend {
    /// How many commands / descriptors were queued so far (completions
    /// included); grows by one for each.
    fn queued(&self) -> u64;

    /// Queues one completion behind everything queued so far, makes the
    /// queue visible to the hardware, and returns its ticket, without
    /// waiting. Tickets grow; when one completes, every command queued
    /// before it and every earlier ticket have completed. Ticket 0 means
    /// "nothing to wait for" (e.g. register-based invalidation).
    ///
    /// # Errors
    ///
    /// As [`IommuBackend::sync`], for the parts that do not wait (a full
    /// queue drained, a stopped queue found).
    fn submit_completion(&mut self) -> Result<u64, BackendError>;

    /// One look, no wait: whether `ticket` completed. A queue stopped on a
    /// bad command is restarted first.
    ///
    /// # Errors
    ///
    /// The queue error met (once; the queue runs on, look again), or a
    /// hardware failure that stops the driver.
    fn completion_done(&mut self, ticket: u64) -> Result<bool, BackendError>;

    /// How many looks a waiter spends on one completion.
    fn completion_budget(&self) -> u32;

    /// Whether [`IommuBackend::publish`] touches the hardware (a register
    /// write, a flush to wait for). When `false`, [`IommuCpu`] publishes
    /// without taking the driver's lock: the caller's barrier already
    /// ordered the table stores. The default, `true`, is always safe.
    fn publish_needed(&self) -> bool {
        true
    }
}

/// A backend whose sync a [`SharedDomain`] can split around its lock:
/// queue one completion under it, wait outside it.
pub trait SplitSync: IommuBackend {
    /// Queues (or finds) one completion covering every command this
    /// backend queued so far; returns its ticket. No wait.
    ///
    /// # Errors
    ///
    /// As [`IommuBackend::sync`], for the parts that do not wait.
    fn submit(&mut self) -> Result<u64, BackendError>;

    /// Waits, bounded, until `ticket` completed.
    ///
    /// # Errors
    ///
    /// As [`IommuBackend::sync`].
    fn wait(&mut self, ticket: u64) -> Result<(), BackendError>;

    /// Runs `queue` on the driver, then, when it says it queued something
    /// (`Ok(true)`), queues one completion behind it and returns its
    /// ticket; `None` when nothing was queued. A shared driver
    /// ([`IommuCpu`]) does both under one hold of its lock, so that a sync
    /// takes the lock every CPU contends for once, not once per command.
    ///
    /// # Errors
    ///
    /// `queue`'s error, or [`submit`](Self::submit)'s.
    fn queue_and_submit(
        &mut self,
        queue: &mut dyn FnMut(&mut dyn IommuBackend) -> Result<bool, BackendError>,
    ) -> Result<Option<u64>, BackendError>;
}

/// A driver used by one CPU splits its sync the same way.
impl<T: SplitCompletion> SplitSync for T {
    fn submit(&mut self) -> Result<u64, BackendError> {
        self.submit_completion()
    }

    fn queue_and_submit(
        &mut self,
        queue: &mut dyn FnMut(&mut dyn IommuBackend) -> Result<bool, BackendError>,
    ) -> Result<Option<u64>, BackendError> {
        if queue(self)? {
            Ok(Some(self.submit_completion()?))
        } else {
            Ok(None)
        }
    }

    fn wait(&mut self, ticket: u64) -> Result<(), BackendError> {
        let budget = self.completion_budget().max(1);
        let mut first_error = None;
        for _ in 0..budget {
            match self.completion_done(ticket) {
                Ok(true) => return first_error.map_or(Ok(()), Err),
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            sync::spin_hint();
        }
        Err(first_error.unwrap_or(BackendError::Timeout {
            what: "completion",
            polls: budget,
        }))
    }
}

/// Compile-time checks of the table in the module documentation.
#[allow(dead_code, reason = "only compiled, never called")]
mod assertions {
    use super::{IommuCpu, SharedDomain, SharedIommu};
    use crate::adapters::session::DomainSession;
    use crate::mem::TableMemory;
    use crate::pgtable::arm::ArmStage1;
    use crate::smmuv3::Smmu;
    use crate::vtd::Vtd;
    use crate::{AnyDomain, DirectState, Domain, IovaState, Mapping};

    fn send<T: Send>() {}
    fn sync<T: Sync>() {}

    fn plain_values() {
        send::<IovaState>();
        sync::<IovaState>();
        send::<DirectState>();
        sync::<DirectState>();
        send::<Mapping>();
        sync::<Mapping>();
    }

    fn domains<M: TableMemory + Send + Sync>() {
        send::<Domain<ArmStage1, M>>();
        sync::<Domain<ArmStage1, M>>();
        send::<AnyDomain<M>>();
        sync::<AnyDomain<M>>();
        send::<SharedDomain<ArmStage1, M>>();
        sync::<SharedDomain<ArmStage1, M>>();
    }

    fn shared_domain_needs_a_sync_lender<M: TableMemory + Send + Sync>() {
        sync::<SharedDomain<ArmStage1, M>>();
        send::<SharedDomain<ArmStage1, M>>();
    }

    fn drivers<M: TableMemory + Send + 'static>() {
        send::<Smmu<M>>();
        send::<Vtd<M>>();
        sync::<SharedIommu<Smmu<M>>>();
        sync::<SharedIommu<Vtd<M>>>();
        send::<SharedIommu<Vtd<M>>>();
        send::<IommuCpu<'static, Smmu<M>>>();
        send::<IommuCpu<'static, Vtd<M>>>();
    }

    fn sessions<M: TableMemory + Send + Sync + 'static>() {
        send::<DomainSession<'static, M, IommuCpu<'static, Smmu<M>>, M, 8>>();
        send::<DomainSession<'static, M, Vtd<M>, M, 8>>();
    }

    #[cfg(feature = "virtio-drivers")]
    fn virtio_hal() {
        send::<crate::adapters::virtio_drivers::IommuHal>();
        sync::<crate::adapters::virtio_drivers::IommuHal>();
    }

    #[cfg(feature = "dma-api")]
    fn dma_api_op() {
        send::<crate::adapters::dma_api::IommuDmaOp>();
        sync::<crate::adapters::dma_api::IommuDmaOp>();
    }
}
