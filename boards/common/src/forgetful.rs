//! A backend wrapper that drops every invalidation: with it a test proves
//! that it would catch a driver that skips TLB / IOTLB invalidation (QEMU
//! caches translations, so the stale entry stays usable).

use bare_iommu::{Attachment, BackendError, DeviceId, DmaAddr, DomainInfo, IommuBackend};

/// Forwards everything to the wrapped backend except `invalidate` and
/// `invalidate_domain`, which it swallows.
pub struct ForgetsInvalidation<'a, B: IommuBackend>(pub &'a mut B);

impl<B: IommuBackend> IommuBackend for ForgetsInvalidation<'_, B> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        self.0.attach(dev, how)
    }
    fn invalidate(
        &mut self,
        _: &DomainInfo,
        _: DmaAddr,
        _: u64,
        _: bool,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn invalidate_domain(&mut self, _: &DomainInfo) -> Result<(), BackendError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        self.0.sync()
    }
    fn publish(&mut self) -> Result<(), BackendError> {
        self.0.publish()
    }
    fn needs_map_invalidation(&self) -> bool {
        self.0.needs_map_invalidation()
    }
    fn coherent_walk(&self) -> bool {
        self.0.coherent_walk()
    }
}
