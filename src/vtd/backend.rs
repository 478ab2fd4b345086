//! The [`IommuBackend`] contract for a VT-d unit: each method hands over to
//! the file that does the work (`attach`/`scalable`, `invalidate`).

use super::Vtd;
use crate::addr::DmaAddr;
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;

impl<M: TableMemory> IommuBackend for Vtd<M> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        if self.scalable {
            return self.attach_scalable(dev, how);
        }
        self.attach_legacy(dev, how)
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.invalidate_range(domain, iova, len, leaf_only)
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        self.invalidate_all_in_domain(domain)
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        self.sync_invalidations()
    }

    fn publish(&mut self) -> Result<(), BackendError> {
        self.publish_tables()
    }

    fn needs_map_invalidation(&self) -> bool {
        self.features.caching_mode
    }

    fn coherent_walk(&self) -> bool {
        self.walk_coherent(self.scalable)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testmem::{HostMem, qemu_like};
    use super::*;

    #[test]
    fn caching_mode_reserves_domain_zero_and_asks_for_map_invalidation() {
        let r = qemu_like();
        r.set_u64(0x08, 0x00d2_008c_222f_0686);
        // SAFETY: `r` is a register block in memory that outlives `vtd`.
        let vtd = unsafe { Vtd::new(r.base(), super::super::REGISTER_BLOCK_LEN, HostMem::new(4)) }
            .unwrap();
        assert!(vtd.needs_map_invalidation());
        assert!(vtd.check_did(0).is_err());
        assert!(vtd.check_did(1).is_ok());
    }
}
