//! Counters of what the driver asked the hardware to do.

use super::Vtd;
use crate::mem::TableMemory;

/// Counters of what the driver asked the hardware to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdStats {
    /// Completed [`IommuBackend::sync`](crate::IommuBackend::sync) calls.
    pub syncs: u64,
    /// Invalidation-wait descriptors submitted.
    pub wait_descriptors: u64,
    /// Descriptors submitted to the invalidation queue (waits included).
    pub queued_descriptors: u64,
    /// Page-selective IOTLB invalidations (queued or by register; PASID-based
    /// page-selective ones for first-level domains included).
    pub iotlb_psi: u64,
    /// Domain-selective IOTLB invalidations (PASID-based all-in-PASID ones
    /// for first-level domains included).
    pub iotlb_dsi: u64,
    /// Global IOTLB invalidations.
    pub iotlb_global: u64,
    /// Context-cache invalidations.
    pub context_invalidations: u64,
    /// Invalidations done through CCMD / IOTLB registers.
    pub register_invalidations: u64,
    /// Write-buffer flushes (CAP.RWBF).
    pub write_buffer_flushes: u64,
}

impl<M: TableMemory> Vtd<M> {
    /// Counters since probe.
    pub fn stats(&self) -> VtdStats {
        let mut s = self.stats;
        for q in [&self.queue, &self.parked].into_iter().flatten() {
            s.wait_descriptors += q.waits();
            s.queued_descriptors += q.submitted();
        }
        s
    }
}
