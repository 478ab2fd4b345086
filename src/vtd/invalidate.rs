//! Invalidation dispatch (VT-d 6.5): each context-cache, PASID-cache and
//! IOTLB invalidation goes to the invalidation queue (`qi`) when queued
//! invalidation is on, else to the CCMD/IOTLB registers (`reginv`); a range
//! becomes page-selective blocks or one domain-selective invalidation; sync
//! waits until the hardware has done them all.

use tock_registers::interfaces::Readable;

use super::{
    ContextGranularity, InvDesc, IotlbGranularity, PasidGranularity, PasidIotlbGranularity, Vtd,
    inv, reginv,
};
use crate::addr::DmaAddr;
use crate::backend::{DomainInfo, IommuBackend, TableFormat};
use crate::barrier::wmb_on;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// Past this many page-selective blocks, one range is invalidated
/// domain-selectively instead.
pub const PSI_MAX_BLOCKS: usize = 16;

impl<M: TableMemory> Vtd<M> {
    /// Whether queued invalidation is in use.
    pub fn uses_queued_invalidation(&self) -> bool {
        self.queue.is_some()
    }

    /// IQT as a descriptor slot index (IQT / descriptor size), for tests
    /// counting descriptors; 0 when queued invalidation is off.
    pub fn queue_tail(&self) -> u32 {
        let size = if self.scalable { 32 } else { 16 };
        ((self.regs().iqt.get() & 0x7_fff0) / size) as u32
    }

    /// Descriptor slots in the invalidation queue (256, or 128 with the
    /// 256-bit descriptors of scalable mode); 0 without a queue.
    pub fn queue_entries(&self) -> u32 {
        self.queue.as_ref().map_or(0, |q| q.entries())
    }

    pub(super) fn context_invalidate(&mut self, g: ContextGranularity) -> Result<(), BackendError> {
        self.stats.context_invalidations += 1;
        if let Some(pushed) = self.queue_push(InvDesc::context(g)) {
            return pushed;
        }
        self.stats.register_invalidations += 1;
        wmb_on(&self.mem);
        reginv::invalidate_context(self.regs(), g, self.budget)
    }

    pub(super) fn pasid_cache_invalidate(
        &mut self,
        g: PasidGranularity,
    ) -> Result<(), BackendError> {
        self.queue_push(InvDesc::pasid_cache(g))
            .unwrap_or(Err(BackendError::Unsupported(
                "PASID-cache invalidation needs queued invalidation",
            )))
    }

    /// PASID-based IOTLB invalidation (first-level domains, scalable mode).
    pub(super) fn pasid_iotlb_invalidate(
        &mut self,
        g: PasidIotlbGranularity,
    ) -> Result<(), BackendError> {
        match g {
            PasidIotlbGranularity::AllInPasid { .. } => self.stats.iotlb_dsi += 1,
            PasidIotlbGranularity::Page { .. } => self.stats.iotlb_psi += 1,
        }
        self.queue_push(InvDesc::pasid_iotlb(g))
            .unwrap_or(Err(BackendError::Unsupported(
                "PASID-based IOTLB invalidation needs queued invalidation",
            )))
    }

    pub(super) fn iotlb_invalidate(&mut self, g: IotlbGranularity) -> Result<(), BackendError> {
        match g {
            IotlbGranularity::Global => self.stats.iotlb_global += 1,
            IotlbGranularity::Domain(_) => self.stats.iotlb_dsi += 1,
            IotlbGranularity::Page { .. } => self.stats.iotlb_psi += 1,
        }
        let (dr, dw) = (self.features.drain_reads, self.features.drain_writes);
        if let Some(pushed) = self.queue_push(InvDesc::iotlb(g, dr, dw)) {
            return pushed;
        }
        self.stats.register_invalidations += 1;
        wmb_on(&self.mem);
        reginv::invalidate_iotlb(self.iotlb_regs(), g, dr, dw, self.budget)
    }

    /// Submits a raw descriptor to the invalidation queue (diagnostics and
    /// tests: a malformed one makes the next sync report the queue error).
    ///
    /// # Errors
    ///
    /// - [`BackendError::Unsupported`]: queued invalidation is not on.
    /// - [`BackendError::Timeout`], [`BackendError::QueueError`]: as for
    ///   [`InvQueue::push`](super::qi::InvQueue::push).
    pub fn submit_raw(&mut self, desc: InvDesc) -> Result<(), BackendError> {
        self.queue_push(desc)
            .unwrap_or(Err(BackendError::Unsupported(
                "queued invalidation not enabled",
            )))
    }

    /// Pushes `desc` to the invalidation queue; `None` when queued
    /// invalidation is off (the caller falls back or refuses).
    pub(super) fn queue_push(&mut self, desc: InvDesc) -> Option<Result<(), BackendError>> {
        let q = self.queue.as_mut()?;
        // SAFETY: see `regs()`; borrowed through the pointer so that `queue`
        // can be borrowed mutably at the same time.
        let regs = unsafe { self.regs.as_ref() };
        Some(q.push(regs, &self.mem, desc))
    }

    /// Invalidates `len` bytes at `iova` in `domain`: page-selectively when
    /// the range fits in [`PSI_MAX_BLOCKS`] blocks, else the whole domain
    /// ([`IommuBackend::invalidate`](crate::IommuBackend::invalidate)).
    pub(super) fn invalidate_range(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.check_did(domain.id)?;
        if len == 0 {
            return Ok(());
        }
        self.flush_before_invalidation()?;
        let did = domain.id;
        // IH = 1 lets the unit keep its paging-structure caches. The core
        // says `leaf_only` for links, but under caching mode a link that
        // added tables replaced cached not-present non-leaf entries: those
        // must go too, so IH = 0 there (Linux `cache_tag_flush_range_np`
        // flushes with ih = 0). The core does not tell which links added
        // tables, so every caching-mode invalidation drops them.
        let ih = leaf_only && !self.features.caching_mode;
        // First-level translations are tagged with the PASID (0 = RID_PASID):
        // invalidate them per PASID, page-selectively (VT-d 6.5.2.4).
        let first_level = domain.format == TableFormat::VtdFirstLevel;
        if self.features.psi || first_level {
            if let Some(blocks) = inv::psi_range(iova, len, self.features.mamv, PSI_MAX_BLOCKS) {
                for (addr, am) in blocks {
                    if first_level {
                        self.pasid_iotlb_invalidate(PasidIotlbGranularity::Page {
                            did,
                            pasid: 0,
                            addr,
                            am,
                            ih,
                        })?;
                    } else {
                        self.iotlb_invalidate(IotlbGranularity::Page { did, addr, am, ih })?;
                    }
                }
                return Ok(());
            }
        }
        self.invalidate_domain(domain)
    }

    /// Invalidates every IOTLB entry of `domain`
    /// ([`IommuBackend::invalidate_domain`](crate::IommuBackend::invalidate_domain)).
    pub(super) fn invalidate_all_in_domain(
        &mut self,
        domain: &DomainInfo,
    ) -> Result<(), BackendError> {
        self.check_did(domain.id)?;
        self.flush_before_invalidation()?;
        if domain.format == TableFormat::VtdFirstLevel {
            self.pasid_iotlb_invalidate(PasidIotlbGranularity::AllInPasid {
                did: domain.id,
                pasid: 0,
            })
        } else {
            self.iotlb_invalidate(IotlbGranularity::Domain(domain.id))
        }
    }

    /// Makes table writes visible without a completion
    /// ([`IommuBackend::publish`](crate::IommuBackend::publish)): only the
    /// write-buffer flush when CAP.RWBF (VT-d §6.8). Outside caching mode a
    /// link needs no invalidation (Linux `cache_tag_flush_range_np` flushes
    /// only the write buffer then), so nothing is queued and nothing waited for.
    pub(super) fn publish_tables(&mut self) -> Result<(), BackendError> {
        self.flush_write_buffer()
    }

    /// Waits until every invalidation issued so far is done
    /// ([`IommuBackend::sync`](crate::IommuBackend::sync)).
    pub(super) fn sync_invalidations(&mut self) -> Result<(), BackendError> {
        wmb_on(&self.mem);
        // Table writes made since the last sync reach memory first, with
        // or without queued invalidation (CAP.RWBF, VT-d 6.8).
        self.flush_before_invalidation()?;
        if let Some(q) = self.queue.as_mut() {
            // SAFETY: see `regs()`.
            let regs = unsafe { self.regs.as_ref() };
            q.sync(regs, &self.mem)?;
        }
        // Register-based invalidations completed when issued.
        self.wb_flushed = false;
        self.stats.syncs += 1;
        Ok(())
    }
}

/// The sync split for [`SharedIommu`](crate::shared::SharedIommu): the
/// invalidation-wait descriptor queued by one call, its status write looked
/// at by another; a later wait's status also completes the earlier ones
/// (the unit runs the queue in order, VT-d 6.5.2.8).
#[cfg(target_has_atomic = "64")]
impl<M: TableMemory> crate::shared::SplitCompletion for Vtd<M> {
    /// Only a unit with `CAP.RWBF` has something to do (the write-buffer
    /// flush, a register write acknowledged in GSTS).
    fn publish_needed(&self) -> bool {
        self.features.rwbf
    }

    fn queued(&self) -> u64 {
        self.queue.as_ref().map_or(0, |q| q.submitted())
    }

    fn submit_completion(&mut self) -> Result<u64, BackendError> {
        wmb_on(&self.mem);
        // As `sync_invalidations`: table writes reach memory first (CAP.RWBF).
        self.flush_before_invalidation()?;
        let ticket = match self.queue.as_mut() {
            Some(q) => {
                // SAFETY: see `regs()`.
                let regs = unsafe { self.regs.as_ref() };
                q.submit_wait(regs, &self.mem)?
            }
            // Register-based invalidations completed when issued.
            None => 0,
        };
        self.wb_flushed = false;
        self.stats.syncs += 1;
        Ok(ticket)
    }

    fn completion_done(&mut self, ticket: u64) -> Result<bool, BackendError> {
        match self.queue.as_mut() {
            Some(q) if ticket != 0 => {
                // SAFETY: see `regs()`.
                let regs = unsafe { self.regs.as_ref() };
                q.look(regs, &self.mem, ticket)
            }
            _ => Ok(true),
        }
    }

    fn completion_budget(&self) -> u32 {
        self.budget
    }
}
