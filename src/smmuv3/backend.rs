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
