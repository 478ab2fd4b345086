//! Device assignment: a device's DMA confined to a guest's memory.
//!
//! A hypervisor that gives a guest a device translates the device's DMA
//! addresses — the guest's physical addresses (GPAs) — to the host-physical
//! pages that back the guest, and nothing else. Two ways to get there:
//!
//! - [`GuestDomain`]: the crate builds the tables from the guest's memory map
//!   ([`GuestRegion`]s), each region a fixed-IOVA transaction at IOVA = GPA
//!   (2 MiB / 1 GiB blocks wherever GPA and host address are aligned alike).
//!   A DMA outside the map faults, and the fault record carries the GPA.
//!   Regions can be added and removed while the device runs; a removal is
//!   unlinked and synced before it returns.
//! - [`ForeignTables`]: the hypervisor already owns tables of a format the
//!   IOMMU walks (its CPU stage 2 on Arm, an EPT-compatible VT-d second
//!   level), as hvisor shares its stage 2. The crate writes no entry of them:
//!   it attaches devices to the root and invalidates by VMID / domain-id
//!   when the owner says it changed them.
//!
//! Use the stage-2 format on SMMUv3 ([`ArmStage2`](crate::pgtable::arm::ArmStage2):
//! the domain id is the VMID) and the second-level format on VT-d.
//!
//! ```
//! # #[cfg(feature = "alloc")]
//! # fn main() -> Result<(), Box<dyn core::error::Error>> {
//! use bare_iommu::guest::{GuestDomain, GuestRegion};
//! use bare_iommu::mem::GlobalAllocMemory;
//! use bare_iommu::pgtable::arm::ArmStage2;
//! use bare_iommu::testing::RecordingBackend;
//! use bare_iommu::{DmaAddr, DmaDirection, Domain, DomainConfig, MapAttrs, PhysAddr};
//!
//! let mem = GlobalAllocMemory;
//! let config = DomainConfig { id: 7, levels: 3, aperture_start: 0, aperture_end: 1 << 39, coherent_walk: true };
//! let mut iommu = RecordingBackend::default();
//! let mut guest: GuestDomain<_, _, 4> = GuestDomain::new(Domain::new(ArmStage2, &mem, config)?);
//! // Guest RAM: 8 MiB at GPA 0x4000_0000, backed by host memory at 0x8_0000_0000.
//! guest.add(GuestRegion {
//!     gpa: 0x4000_0000,
//!     hpa: PhysAddr(0x8_0000_0000),
//!     len: 8 << 20,
//!     dir: DmaDirection::Bidirectional,
//!     attrs: MapAttrs::empty(),
//! })?;
//! guest.sync(&mut iommu)?;
//! assert_eq!(guest.translate(DmaAddr(0x4010_0000)), Some(PhysAddr(0x8_0010_0000)));
//! assert_eq!(guest.translate(DmaAddr(0x3fff_f000)), None);
//! // iommu.attach(dev, guest.attachment())?;
//! guest.remove(0x4000_0000, &mut iommu)?;
//! assert_eq!(guest.translate(DmaAddr(0x4010_0000)), None);
//! # guest.teardown(&mut iommu).map_err(|(_, e)| e)?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "alloc"))]
//! # fn main() {}
//! ```

use core::fmt;

use crate::addr::{DmaAddr, PhysAddr};
use crate::backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
use crate::error::{BackendError, DmaError};
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, MapAttrs, PteFormat};
use crate::state::{Domain, IovaState};

/// One range of guest-physical memory and the host memory behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GuestRegion {
    /// Guest-physical start (the device's DMA address); page aligned.
    pub gpa: u64,
    /// Host-physical start; page aligned.
    pub hpa: PhysAddr,
    /// Length in bytes; a non-zero multiple of 4 KiB.
    pub len: u64,
    /// What the device may do there.
    pub dir: DmaDirection,
    /// Memory attributes (e.g. device memory for an emulated MMIO window).
    pub attrs: MapAttrs,
}

impl GuestRegion {
    /// Whether `gpa` lies in this region.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }
}

/// Why a guest memory map was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum GuestError {
    /// The domain refused the region: unaligned or empty, outside its
    /// aperture, overlapping another region or a reserved range
    /// ([`DmaError::IovaInUse`], [`DmaError::IovaReserved`]), a host address
    /// past the output size, no table memory, or the sync failed.
    Dma(DmaError),
    /// The map already holds as many regions as the domain was made for.
    TooManyRegions {
        /// The capacity.
        capacity: usize,
    },
    /// No region starts at this guest-physical address.
    NoRegion {
        /// The address asked for.
        gpa: u64,
    },
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dma(e) => write!(f, "guest memory map: {e}"),
            Self::TooManyRegions { capacity } => {
                write!(f, "guest memory map: more than {capacity} regions")
            }
            Self::NoRegion { gpa } => write!(f, "no guest region starts at GPA {gpa:#x}"),
        }
    }
}

impl core::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Dma(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DmaError> for GuestError {
    fn from(e: DmaError) -> Self {
        Self::Dma(e)
    }
}

/// A translated domain whose IOVAs are a guest's physical addresses: up to
/// `N` regions of a memory map, each linked at IOVA = GPA.
pub struct GuestDomain<F: PteFormat, M: TableMemory, const N: usize> {
    domain: Domain<F, M>,
    regions: heapless::Vec<(GuestRegion, IovaState), N>,
}

impl<F: PteFormat, M: TableMemory, const N: usize> fmt::Debug for GuestDomain<F, M, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestDomain")
            .field("id", &self.domain.id())
            .field("regions", &self.regions.len())
            .finish()
    }
}

#[cfg(feature = "defmt")]
impl<F: PteFormat, M: TableMemory, const N: usize> defmt::Format for GuestDomain<F, M, N> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "GuestDomain {{ id: {=u16}, regions: {=usize} }}",
            self.domain.id(),
            self.regions.len()
        );
    }
}

impl<F: PteFormat, M: TableMemory, const N: usize> GuestDomain<F, M, N> {
    /// Wraps an empty translated domain. Its aperture must cover the
    /// guest-physical addresses of every region added later.
    pub fn new(domain: Domain<F, M>) -> Self {
        Self {
            domain,
            regions: heapless::Vec::new(),
        }
    }

    /// Links `region` at IOVA = `region.gpa` (not yet synced: call
    /// [`sync`](Self::sync) before the device uses it). All or nothing.
    ///
    /// # Errors
    ///
    /// - [`GuestError::TooManyRegions`]: `N` regions already.
    /// - [`GuestError::Dma`]: what [`Domain::try_alloc_at`] or
    ///   [`Domain::link`] refused (unaligned, empty, outside the aperture,
    ///   overlapping another region or a reserved range, no table memory).
    ///
    /// Nothing changes on an error.
    pub fn add(&mut self, region: GuestRegion) -> Result<(), GuestError> {
        if self.regions.is_full() {
            return Err(GuestError::TooManyRegions { capacity: N });
        }
        let mut tx = self.domain.try_alloc_at(DmaAddr(region.gpa), region.len)?;
        if let Err(e) =
            self.domain
                .link(&mut tx, region.hpa, 0, region.len, region.dir, region.attrs)
        {
            // Nothing linked (link is all or nothing): the range goes back.
            if let Err((_, fe)) = self.domain.free(tx) {
                return Err(fe.into());
            }
            return Err(e.into());
        }
        if let Err((r, tx)) = self.regions.push((region, tx)) {
            // Checked above; unreachable, but never leave a linked range
            // nobody holds.
            let _ = (r, tx);
            return Err(GuestError::TooManyRegions { capacity: N });
        }
        Ok(())
    }

    /// Builds the whole memory map and syncs once.
    ///
    /// # Errors
    ///
    /// As [`add`](Self::add) for the first region refused, or the sync's
    /// error. Regions added before the failure stay (remove them or tear the
    /// domain down).
    pub fn add_all<B: IommuBackend + ?Sized>(
        &mut self,
        regions: &[GuestRegion],
        backend: &mut B,
    ) -> Result<(), GuestError> {
        for r in regions {
            self.add(*r)?;
        }
        self.sync(backend)
    }

    /// Makes added regions visible to the IOMMU and completes invalidations
    /// of removed ones ([`Domain::sync`]).
    ///
    /// # Errors
    ///
    /// [`GuestError::Dma`] with the backend's error.
    pub fn sync<B: IommuBackend + ?Sized>(&mut self, backend: &mut B) -> Result<(), GuestError> {
        Ok(self.domain.sync(backend)?)
    }

    /// Removes the region that starts at `gpa`: unlinked, invalidated and
    /// the invalidation completed before it returns, so the device can no
    /// longer reach its host memory.
    ///
    /// # Errors
    ///
    /// [`GuestError::NoRegion`] when no region starts at `gpa`;
    /// [`GuestError::Dma`] when the invalidation did not complete (the
    /// region is gone from the map and its entries are cleared, but the
    /// IOMMU may still hold them: sync again before reusing the memory).
    pub fn remove<B: IommuBackend + ?Sized>(
        &mut self,
        gpa: u64,
        backend: &mut B,
    ) -> Result<GuestRegion, GuestError> {
        let i = self
            .regions
            .iter()
            .position(|(r, _)| r.gpa == gpa)
            .ok_or(GuestError::NoRegion { gpa })?;
        let (region, tx) = self.regions.swap_remove(i);
        self.domain.destroy(tx, backend)?;
        Ok(region)
    }

    /// The region holding `gpa`, if any: for a fault record's address, tells
    /// whether the device reached outside its guest's memory.
    pub fn region_of(&self, gpa: u64) -> Option<&GuestRegion> {
        self.regions
            .iter()
            .map(|(r, _)| r)
            .find(|r| r.contains(gpa))
    }

    /// The regions, in no particular order.
    pub fn regions(&self) -> impl Iterator<Item = &GuestRegion> {
        self.regions.iter().map(|(r, _)| r)
    }

    /// The host address the tables give `gpa` (page granular).
    pub fn translate(&self, gpa: DmaAddr) -> Option<PhysAddr> {
        self.domain.translate(gpa).map(|(pa, _)| pa)
    }

    /// What to hand [`IommuBackend::attach`] for the guest's devices.
    pub fn attachment(&self) -> Attachment {
        self.domain.attachment()
    }

    /// The underlying domain.
    pub fn domain(&self) -> &Domain<F, M> {
        &self.domain
    }

    /// Ends the guest's domain ([`Domain::teardown`]): detach its devices
    /// first.
    ///
    /// # Errors
    ///
    /// `(self, error)` when the domain-wide invalidation failed; nothing was
    /// freed.
    #[allow(
        clippy::result_large_err,
        reason = "the guest domain is handed back whole on failure, as Domain::teardown does"
    )]
    pub fn teardown<B: IommuBackend + ?Sized>(
        self,
        backend: &mut B,
    ) -> Result<(), (Self, DmaError)> {
        let Self { domain, regions } = self;
        domain
            .teardown(backend)
            .map_err(|(domain, e)| (Self { domain, regions }, e))
    }
}

/// Page tables the hypervisor owns (its CPU stage 2 / EPT when the IOMMU
/// walks the same format), adopted as a device's translation without the
/// crate writing any entry.
///
/// The owner keeps every rule a [`Domain`] keeps for its own tables: table
/// pages stay allocated while a device is attached, an entry is cleared
/// (and [`changed`](Self::changed) called) before its memory is reused, and
/// a valid entry is not replaced by a different valid one without that
/// step in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ForeignTables {
    info: DomainInfo,
}

impl ForeignTables {
    /// Adopts the tables at `root` (`levels` levels of `format`) under the
    /// hardware tag `id` (SMMU VMID / ASID, VT-d domain-id).
    ///
    /// # Errors
    ///
    /// [`DmaError::BadConfig`] for levels other than 3 or 4 or a root that
    /// is not page aligned.
    ///
    /// # Safety
    ///
    /// `root` is a valid root table of `format` with `levels` levels, whose
    /// tables and the memory they map stay valid (and are changed only as
    /// described on [`ForeignTables`]) as long as a device is attached.
    pub unsafe fn new(
        format: TableFormat,
        root: PhysAddr,
        levels: u8,
        id: u16,
    ) -> Result<Self, DmaError> {
        if !(3..=4).contains(&levels) {
            return Err(DmaError::BadConfig {
                what: "adopted tables' levels (3 or 4)",
                value: u64::from(levels),
            });
        }
        if !root.is_page_aligned() {
            return Err(DmaError::BadConfig {
                what: "adopted root (not page aligned)",
                value: root.0,
            });
        }
        Ok(Self {
            info: DomainInfo {
                id,
                root,
                format,
                levels,
                ias_bits: 12 + 9 * levels,
            },
        })
    }

    /// What the backend needs about the tables.
    pub fn info(&self) -> DomainInfo {
        self.info
    }

    /// What to hand [`IommuBackend::attach`].
    pub fn attachment(&self) -> Attachment {
        Attachment::Translated(self.info)
    }

    /// The owner changed the entries of `[gpa, gpa + len)` (cleared,
    /// changed permissions, or remapped after clearing): makes its stores
    /// visible, invalidates what the IOMMU cached for the range under this
    /// tag (walk caches too), and waits for completion.
    ///
    /// The owner cleans the lines it wrote first when the IOMMU's walk is
    /// not coherent.
    ///
    /// # Errors
    ///
    /// The backend's error; the IOMMU may still hold the old entries.
    pub fn changed<B: IommuBackend + ?Sized>(
        &self,
        backend: &mut B,
        gpa: DmaAddr,
        len: u64,
    ) -> Result<(), BackendError> {
        crate::barrier::wmb();
        backend.invalidate(&self.info, gpa, len, false)?;
        backend.sync()
    }

    /// As [`changed`](Self::changed) for everything under this tag.
    ///
    /// # Errors
    ///
    /// The backend's error.
    pub fn changed_all<B: IommuBackend + ?Sized>(
        &self,
        backend: &mut B,
    ) -> Result<(), BackendError> {
        crate::barrier::wmb();
        backend.invalidate_domain(&self.info)?;
        backend.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::ArmStage2;
    use crate::state::DomainConfig;
    use crate::testing::RecordingBackend;
    use crate::testing::heap::HostMemory;

    const MB: u64 = 1 << 20;

    fn region(gpa: u64, hpa: u64, len: u64) -> GuestRegion {
        GuestRegion {
            gpa,
            hpa: PhysAddr(hpa),
            len,
            dir: DmaDirection::Bidirectional,
            attrs: MapAttrs::empty(),
        }
    }

    fn guest(mem: &HostMemory) -> GuestDomain<ArmStage2, &HostMemory, 3> {
        let config = DomainConfig {
            id: 3,
            levels: 3,
            aperture_start: 0,
            aperture_end: 1 << 39,
            coherent_walk: true,
        };
        GuestDomain::new(Domain::new(ArmStage2, mem, config).unwrap())
    }

    #[test]
    fn regions_translate_gpa_to_their_host_pages_and_nothing_else() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut g = guest(&mem);
        g.add_all(
            &[
                region(0x4000_0000, 0x8000_0000, 4 * MB),
                region(0x1000, 0x9000_3000, 0x2000),
            ],
            &mut be,
        )
        .unwrap();
        assert_eq!(
            g.translate(DmaAddr(0x4020_0000)),
            Some(PhysAddr(0x8020_0000))
        );
        assert_eq!(g.translate(DmaAddr(0x2000)), Some(PhysAddr(0x9000_4000)));
        assert_eq!(g.translate(DmaAddr(0x3000)), None);
        assert_eq!(g.translate(DmaAddr(0x4040_0000)), None);
        assert_eq!(g.region_of(0x403f_ffff).map(|r| r.gpa), Some(0x4000_0000));
        assert_eq!(g.region_of(0x4040_0000), None);
        g.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn aligned_regions_are_linked_with_blocks() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut g = guest(&mem);
        // 2 MiB aligned alike: blocks; 4 KiB offset from alignment: pages.
        g.add_all(
            &[
                region(0x4000_0000, 0x8000_0000, 4 * MB),
                region(0x5000_1000, 0x9000_1000, 2 * MB),
            ],
            &mut be,
        )
        .unwrap();
        let pt = g.domain().page_table().unwrap();
        let (pa, _, height) = pt.translate(DmaAddr(0x4020_1234)).unwrap();
        assert_eq!((pa, height), (PhysAddr(0x8020_1234), 1));
        let (pa, _, height) = pt.translate(DmaAddr(0x5010_1234)).unwrap();
        assert_eq!((pa, height), (PhysAddr(0x9010_1234), 0));
        g.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn overlapping_and_excess_regions_are_refused_and_change_nothing() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut g = guest(&mem);
        g.add(region(0x10_0000, 0x20_0000, MB)).unwrap();
        let e = g.add(region(0x18_0000, 0x80_0000, MB)).unwrap_err();
        assert!(
            matches!(e, GuestError::Dma(DmaError::IovaInUse { .. })),
            "{e:?}"
        );
        assert_eq!(g.translate(DmaAddr(0x18_0000)), Some(PhysAddr(0x28_0000)));
        assert!(matches!(
            g.add(region(0x30_0000, 0x1001, 0x1000)),
            Err(GuestError::Dma(DmaError::Unaligned { .. }))
        ));
        // The failed link gave its range back: the same GPA works afterwards.
        g.add(region(0x30_0000, 0x1000, 0x1000)).unwrap();
        g.add(region(0x40_0000, 0x1000, 0x1000)).unwrap();
        assert_eq!(
            g.add(region(0x50_0000, 0x1000, 0x1000)),
            Err(GuestError::TooManyRegions { capacity: 3 })
        );
        assert_eq!(g.regions().count(), 3);
        g.sync(&mut be).unwrap();
        g.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn removing_a_region_invalidates_it_before_returning() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut g = guest(&mem);
        g.add_all(&[region(0x4000_0000, 0x8000_0000, 2 * MB)], &mut be)
            .unwrap();
        assert_eq!(
            g.remove(0x4000_1000, &mut be),
            Err(GuestError::NoRegion { gpa: 0x4000_1000 })
        );
        let r = g.remove(0x4000_0000, &mut be).unwrap();
        assert_eq!(r.len, 2 * MB);
        assert_eq!(g.translate(DmaAddr(0x4000_0000)), None);
        assert_eq!(be.log.back(), Some(&crate::testing::Call::Sync));
        assert!(
            be.covered_since_last_sync(3, 0x4000_0000, 2 * MB),
            "{:?}",
            be.log
        );
        g.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn foreign_tables_are_attached_as_they_are_and_changes_invalidate_by_tag() {
        let mut be = RecordingBackend::default();
        // SAFETY: never attached to hardware: only the commands are checked.
        let bad = unsafe { ForeignTables::new(TableFormat::ArmStage2, PhysAddr(0x1000), 5, 9) };
        assert!(matches!(bad, Err(DmaError::BadConfig { .. })));
        // SAFETY: as above.
        let bad = unsafe { ForeignTables::new(TableFormat::ArmStage2, PhysAddr(0x1800), 4, 9) };
        assert!(matches!(bad, Err(DmaError::BadConfig { .. })));
        // SAFETY: as above.
        let t =
            unsafe { ForeignTables::new(TableFormat::ArmStage2, PhysAddr(0x5000), 3, 9) }.unwrap();
        let Attachment::Translated(info) = t.attachment() else {
            panic!("not translated");
        };
        assert_eq!((info.root, info.levels, info.id), (PhysAddr(0x5000), 3, 9));
        assert_eq!(info.ias_bits, 39);
        t.changed(&mut be, DmaAddr(0x20_0000), 0x3000).unwrap();
        assert_eq!(be.log.back(), Some(&crate::testing::Call::Sync));
        assert!(
            be.covered_since_last_sync(9, 0x20_0000, 0x3000),
            "{:?}",
            be.log
        );
        let syncs = be.syncs;
        t.changed_all(&mut be).unwrap();
        assert_eq!(be.syncs, syncs + 1);
        assert!(be.covered_since_last_sync(9, 0, 1 << 39), "{:?}", be.log);
    }
}
