//! The contract between the generic core and an IOMMU driver.
//!
//! The core writes page tables; a backend makes the hardware use them. The
//! two-step API calls [`IommuBackend::invalidate`] for every range whose
//! translations changed and then [`IommuBackend::sync`] exactly once per
//! `sync`, which is the only call that waits on hardware; a `sync` with
//! nothing to invalidate calls [`IommuBackend::publish`] instead, which
//! waits for nothing.

use crate::addr::{DmaAddr, PhysAddr};
use crate::device::DeviceId;
use crate::error::BackendError;

/// Which descriptor format a domain's I/O page table uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TableFormat {
    /// Arm VMSAv8-64 stage 1, 4 KiB granule (SMMUv3 context descriptor, TTB0).
    /// Attribute indexes refer to `pgtable::arm::MAIR`.
    ArmStage1,
    /// Arm VMSAv8-64 stage 2, 4 KiB granule (SMMUv3 STE S2TTB).
    ArmStage2,
    /// Intel VT-d second-level (legacy context entry SLPTPTR).
    VtdSecondLevel,
    /// Intel VT-d first-level (x86-64 4-level paging; scalable-mode PASID
    /// entry FLPTPTR). The format lives in `vtd::first_level`.
    VtdFirstLevel,
}

/// What a backend needs to know about a translated domain to attach devices
/// to it and to invalidate its translations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DomainInfo {
    /// Hardware tag of the domain: SMMU ASID (stage 1) or VMID (stage 2), VT-d domain-id.
    pub id: u16,
    /// Physical address of the root table.
    pub root: PhysAddr,
    /// Descriptor format of the tables.
    pub format: TableFormat,
    /// Number of table levels (3 or 4; 4 KiB granule, 9 bits per level).
    pub levels: u8,
    /// Input address bits the tables cover: `12 + 9 * levels`.
    pub ias_bits: u8,
}

/// How a device's DMA is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Attachment {
    /// Translated through the domain's tables.
    Translated(DomainInfo),
    /// Not translated: DMA addresses are physical addresses (SMMU STE bypass,
    /// VT-d pass-through).
    Bypass,
    /// All DMA aborted/blocked (the state after detach).
    Blocked,
}

/// One IOMMU's driver, as the generic core sees it.
pub trait IommuBackend {
    /// Points the hardware at `how` for `dev`'s DMA (and makes it take effect,
    /// including its own sync): after it returns, the device translates through
    /// the domain, bypasses, or is blocked.
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError>;

    /// Returns `dev` to blocked and invalidates what the hardware cached for it.
    fn detach(&mut self, dev: DeviceId) -> Result<(), BackendError> {
        self.attach(dev, Attachment::Blocked)
    }

    /// Queues invalidation of cached translations of `[iova, iova + len)` in
    /// `domain`; `leaf_only` is false when table pages were freed or replaced
    /// (walk caches must go too). Does not wait: the next [`sync`](Self::sync)
    /// completes it.
    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError>;

    /// Queues invalidation of everything cached for `domain`.
    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError>;

    /// Submits one completion for everything queued since the last sync and
    /// waits for it, bounded: a timeout is an error, never a hang. The core
    /// calls it after writing tables with ordinary stores; the backend orders
    /// them before its doorbell write (e.g. `dsb` on Arm). With nothing
    /// queued the core calls [`publish`](Self::publish) instead.
    fn sync(&mut self) -> Result<(), BackendError>;

    /// Makes table writes visible to the walker when nothing needs
    /// invalidating (a sync after links only, a one-step map): no command
    /// and no completion wait. The core calls it after ordering its table
    /// stores with a barrier (and cleaning them when the walker is not
    /// coherent), instead of [`sync`](Self::sync).
    ///
    /// The default does nothing more, which is right where a not-present
    /// entry is never cached: an Arm TLB or walk cache holds only valid
    /// descriptors, so a new one needs no invalidation (Linux's
    /// arm-smmu-v3 has no `iotlb_sync_map`). VT-d flushes the write buffer
    /// when `CAP.RWBF` (VT-d §6.8; Linux `cache_tag_flush_range_np` does
    /// only that outside caching mode).
    fn publish(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether the hardware caches not-present entries (VT-d `CAP.CM`, caching
    /// mode), so that newly linked ranges must be invalidated too.
    fn needs_map_invalidation(&self) -> bool {
        false
    }

    /// Whether the hardware table walker snoops CPU caches. When false, the
    /// core asks the lender to clean every table line it writes.
    fn coherent_walk(&self) -> bool {
        true
    }
}
