//! The core's [`IommuBackend`] contract, implemented by [`Smmu`].

use super::{Smmu, SmmuError};
use crate::addr::DmaAddr;
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;

impl<M: TableMemory> IommuBackend for Smmu<M> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        self.attach_stream(dev.stream_id(), how)
            .map_err(|e| match e {
                SmmuError::StreamIdOutOfRange { .. } => BackendError::UnknownDevice(dev),
                other => other.into(),
            })
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        Ok(self.invalidate_range(domain, iova, len, leaf_only)?)
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        Ok(self.invalidate_all_of(domain)?)
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        self.counters.sync_calls += 1;
        Ok(self.sync_commands()?)
    }

    fn coherent_walk(&self) -> bool {
        self.features.coherent
    }
}

/// The sync split for [`SharedIommu`](crate::shared::SharedIommu): CMD_SYNC
/// queued and published by one call, its consumption looked at by another
/// (Linux `arm_smmu_cmdq_issue_cmdlist` likewise lets one CPU's CMD_SYNC
/// complete the commands other CPUs queued before it).
#[cfg(target_has_atomic = "64")]
impl<M: TableMemory> crate::shared::SplitCompletion for Smmu<M> {
    /// Publishing is the core's barrier alone (`IommuBackend::publish` is
    /// the default here: an SMMU caches no invalid descriptor).
    fn publish_needed(&self) -> bool {
        false
    }

    fn queued(&self) -> u64 {
        self.run.as_ref().map_or(0, |r| r.cmdq.queued())
    }

    fn submit_completion(&mut self) -> Result<u64, BackendError> {
        if self.service_failure {
            return Err(SmmuError::ServiceFailure.into());
        }
        self.counters.sync_calls += 1;
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        let r = run
            .cmdq
            .submit_sync(p0, &self.mem, coherent, run.config.poll_budget);
        Ok(self.check_service_failure(r)?)
    }

    fn completion_done(&mut self, ticket: u64) -> Result<bool, BackendError> {
        if self.service_failure {
            return Err(SmmuError::ServiceFailure.into());
        }
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        let r = run.cmdq.sync_done(p0, &self.mem, coherent, ticket);
        // As `sync_commands`: a completed sync does not prove the SMMU is
        // healthy, so GERROR.SFM_ERR is read once it completed too.
        let check = !matches!(r, Ok(false));
        Ok(self.check_service_failure_if(check, r)?)
    }

    fn completion_budget(&self) -> u32 {
        self.budget()
    }
}
