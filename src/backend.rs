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
///
/// [`smmuv3::Smmu`](crate::smmuv3::Smmu) and [`vtd::Vtd`](crate::vtd::Vtd)
/// implement it; [`RecordingBackend`](crate::testing::RecordingBackend)
/// records the calls for host tests. A [`Domain`](crate::Domain) calls
/// `invalidate` / `invalidate_domain` and then one `sync` per
/// [`Domain::sync`](crate::Domain::sync).
///
/// # Example
///
/// A wrapper that counts completion waits and forwards everything to the
/// driver it wraps, and what the core asks of it for a link and an unlink:
///
/// ```
/// # struct Heap;
/// # // SAFETY: zeroed, size-aligned blocks, valid until freed; physical = virtual.
/// # unsafe impl bare_iommu::TableMemory for Heap {
/// #     fn alloc_zeroed(&self, pages: usize) -> Option<bare_iommu::PhysAddr> {
/// #         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).ok()?;
/// #         if pages == 0 { return None; }
/// #         // SAFETY: non-zero size.
/// #         let p = unsafe { std::alloc::alloc_zeroed(l) };
/// #         (!p.is_null()).then(|| bare_iommu::PhysAddr(p as u64))
/// #     }
/// #     unsafe fn free(&self, pa: bare_iommu::PhysAddr, pages: usize) {
/// #         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).unwrap();
/// #         // SAFETY: allocated above with this layout.
/// #         unsafe { std::alloc::dealloc(pa.0 as *mut u8, l) }
/// #     }
/// #     fn phys_to_virt(&self, pa: bare_iommu::PhysAddr) -> *mut u8 { pa.0 as *mut u8 }
/// # }
/// use bare_iommu::pgtable::arm::ArmStage1;
/// use bare_iommu::testing::{Call, RecordingBackend};
/// use bare_iommu::{Attachment, BackendError, DeviceId, DmaAddr, DmaDirection, DomainInfo};
/// use bare_iommu::{Domain, DomainConfig, IommuBackend, MapAttrs, PhysAddr};
///
/// struct Counted<B> {
///     inner: B,
///     waits: u32,
/// }
///
/// impl<B: IommuBackend> IommuBackend for Counted<B> {
///     fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
///         self.inner.attach(dev, how)
///     }
///     fn invalidate(&mut self, d: &DomainInfo, iova: DmaAddr, len: u64, leaf_only: bool) -> Result<(), BackendError> {
///         self.inner.invalidate(d, iova, len, leaf_only)
///     }
///     fn invalidate_domain(&mut self, d: &DomainInfo) -> Result<(), BackendError> {
///         self.inner.invalidate_domain(d)
///     }
///     fn sync(&mut self) -> Result<(), BackendError> {
///         self.waits += 1;
///         self.inner.sync()
///     }
///     // Forward the defaults too: they change what the core asks for.
///     fn publish(&mut self) -> Result<(), BackendError> {
///         self.inner.publish()
///     }
///     fn needs_map_invalidation(&self) -> bool {
///         self.inner.needs_map_invalidation()
///     }
///     fn coherent_walk(&self) -> bool {
///         self.inner.coherent_walk()
///     }
/// }
///
/// # fn main() -> Result<(), bare_iommu::DmaError> {
/// let mut iommu = Counted { inner: RecordingBackend::new(), waits: 0 };
/// let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 1 << 20, aperture_end: 1 << 32, coherent_walk: true };
/// let mut dom = Domain::new(ArmStage1, Heap, cfg)?;
/// let mut tx = dom.try_alloc(4 * 4096, u64::MAX)?.into_iova().unwrap();
/// for i in 0..4 {
///     let pa = PhysAddr(0x9000_0000 + i * 0x10_0000);
///     dom.link(&mut tx, pa, i * 4096, 4096, DmaDirection::Bidirectional, MapAttrs::empty())?;
/// }
/// dom.sync(&mut iommu)?; // new entries: published, no command, no wait (no caching mode)
/// dom.unlink(&mut tx, 0, 4 * 4096)?;
/// dom.sync(&mut iommu)?; // one range invalidation, one wait
/// assert_eq!(iommu.waits, 1);
/// let calls: Vec<Call> = iommu.inner.log.iter().copied().collect();
/// assert!(matches!(
///     calls[..],
///     [Call::Publish, Call::Invalidate { len: 0x4000, .. }, Call::Sync]
/// ));
/// # dom.free(tx).map_err(|(_, e)| e)?;
/// # Ok(()) }
/// ```
pub trait IommuBackend {
    /// Points the hardware at `how` for `dev`'s DMA (and makes it take effect,
    /// including its own sync): after it returns, the device translates through
    /// the domain, bypasses, or is blocked.
    ///
    /// # Errors
    ///
    /// - [`BackendError::UnknownDevice`]: `dev` is outside what this IOMMU
    ///   translates (stream ID / bus beyond its tables, another segment).
    /// - [`BackendError::Unsupported`]: the hardware cannot do `how` (the
    ///   domain's format, levels or tag width, or bypass).
    /// - [`BackendError::OutOfMemory`]: the lender refused a table page the
    ///   entry needs (e.g. a second-level stream table or context table).
    /// - [`BackendError::Unsupported`] also when the driver was not
    ///   initialised.
    /// - [`BackendError::Timeout`], [`BackendError::QueueError`]: the
    ///   invalidation that makes the change take effect did not complete; the
    ///   entry may already be written.
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError>;

    /// Returns `dev` to blocked and invalidates what the hardware cached for it.
    ///
    /// # Errors
    ///
    /// As [`attach`](Self::attach) with [`Attachment::Blocked`] (the default
    /// implementation is exactly that call).
    fn detach(&mut self, dev: DeviceId) -> Result<(), BackendError> {
        self.attach(dev, Attachment::Blocked)
    }

    /// Queues invalidation of cached translations of `[iova, iova + len)` in
    /// `domain`; `leaf_only` is false when table pages were freed or replaced
    /// (walk caches must go too). Does not wait: the next [`sync`](Self::sync)
    /// completes it.
    ///
    /// # Errors
    ///
    /// - [`BackendError::Unsupported`]: `domain` has a format this IOMMU
    ///   does not walk.
    /// - [`BackendError::Timeout`], [`BackendError::QueueError`]: the queue
    ///   was full and draining it failed, or (register-based invalidation)
    ///   the invalidation itself did.
    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError>;

    /// Queues invalidation of everything cached for `domain`.
    ///
    /// # Errors
    ///
    /// As [`invalidate`](Self::invalidate).
    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError>;

    /// Submits one completion for everything queued since the last sync and
    /// waits for it, bounded: a timeout is an error, never a hang. The core
    /// calls it after writing tables with ordinary stores; the backend orders
    /// them before its doorbell write (e.g. `dsb` on Arm). With nothing
    /// queued the core calls [`publish`](Self::publish) instead.
    ///
    /// # Errors
    ///
    /// - [`BackendError::Timeout`]: the completion did not arrive within the
    ///   driver's poll budget.
    /// - [`BackendError::QueueError`]: the queue stopped on a bad command
    ///   (the drivers report the slot and recover the queue).
    ///
    /// After an error, treat every invalidation queued since the last good
    /// sync as not done.
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
    ///
    /// # Errors
    ///
    /// [`BackendError::Timeout`] when a flush the hardware must acknowledge
    /// (VT-d GSTS.WBFS) does not complete within the poll budget.
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
