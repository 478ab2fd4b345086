//! [`AnyDomain`]: a domain whose descriptor format is chosen at run time.
//!
//! [`Domain<F, M>`](Domain) fixes the format at compile time, which is what a
//! driver for one IOMMU wants. Code that learns the format only at run time —
//! an adapter behind a consumer trait, a hypervisor that picks stage 1 or
//! stage 2 from the SMMU's `IDR0`, a board that runs on SMMUv3 or VT-d — holds
//! an [`AnyDomain`] instead: an enum over the four formats with the same
//! two-step API (`try_alloc → link → sync → unlink → free`), each call
//! forwarded to the [`Domain`] inside.
//!
//! ```
//! # use bare_iommu::{AnyDomain, AnyFormat, DmaDirection, DomainConfig, MapAttrs, PhysAddr, TableFormat};
//! # use bare_iommu::testing::RecordingBackend;
//! # fn demo<M: bare_iommu::TableMemory>(lender: M) -> Result<(), bare_iommu::DmaError> {
//! # let smmu_has_stage1 = true;
//! let format = if smmu_has_stage1 { AnyFormat::ArmStage1 } else { AnyFormat::ArmStage2 };
//! let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 1 << 20, aperture_end: 1 << 32, coherent_walk: true };
//! let mut dom = AnyDomain::new(format, lender, cfg)?;
//! assert_eq!(dom.info().unwrap().format, TableFormat::ArmStage1);
//! let mut tx = dom.try_alloc(4096, u64::MAX)?.into_iova().unwrap();
//! dom.link(&mut tx, PhysAddr(0x8000_0000), 0, 4096, DmaDirection::ToDevice, MapAttrs::empty())?;
//! let mut iommu = RecordingBackend::new();
//! dom.sync(&mut iommu)?;
//! dom.destroy(tx, &mut iommu)?;
//! # Ok(()) }
//! ```

use crate::addr::{DmaAddr, PhysAddr};
use crate::backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
use crate::device::DeviceId;
use crate::error::DmaError;
use crate::firmware::ReservedRegion;
use crate::iova::FixedRange;
use crate::mem::TableMemory;
use crate::p2p::P2pRegistry;
use crate::pgtable::arm::{ArmStage1, ArmStage2};
use crate::pgtable::vtd::VtdSecondLevel;
use crate::pgtable::{DmaDirection, MapAttrs, TableReclaim};
use crate::state::{DmaPath, Domain, DomainConfig, IovaState, Mapping};
use crate::vtd::VtdFirstLevel;

/// The descriptor format of an [`AnyDomain`], with the settings a format
/// takes from its IOMMU's capabilities. The number of levels is
/// [`DomainConfig::levels`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyFormat {
    /// Arm VMSAv8-64 stage 1 (SMMUv3 context descriptor).
    ArmStage1,
    /// Arm VMSAv8-64 stage 2 (SMMUv3 STE S2TTB).
    ArmStage2,
    /// VT-d second level (legacy context entry, scalable PGTT = 010b).
    VtdSecondLevel(VtdSecondLevel),
    /// VT-d first level (scalable PGTT = 001b).
    VtdFirstLevel(VtdFirstLevel),
}

impl AnyFormat {
    /// The format tag backends see.
    pub const fn table_format(&self) -> TableFormat {
        match self {
            AnyFormat::ArmStage1 => TableFormat::ArmStage1,
            AnyFormat::ArmStage2 => TableFormat::ArmStage2,
            AnyFormat::VtdSecondLevel(_) => TableFormat::VtdSecondLevel,
            AnyFormat::VtdFirstLevel(_) => TableFormat::VtdFirstLevel,
        }
    }
}

/// A [`Domain`] of any of the four formats, chosen at run time. Every method
/// is [`Domain`]'s, with the same contract and errors.
pub enum AnyDomain<M: TableMemory> {
    /// Arm stage 1.
    ArmStage1(Domain<ArmStage1, M>),
    /// Arm stage 2.
    ArmStage2(Domain<ArmStage2, M>),
    /// VT-d second level.
    VtdSecondLevel(Domain<VtdSecondLevel, M>),
    /// VT-d first level.
    VtdFirstLevel(Domain<VtdFirstLevel, M>),
}

macro_rules! each {
    ($self:expr, $d:ident => $e:expr) => {
        match $self {
            AnyDomain::ArmStage1($d) => $e,
            AnyDomain::ArmStage2($d) => $e,
            AnyDomain::VtdSecondLevel($d) => $e,
            AnyDomain::VtdFirstLevel($d) => $e,
        }
    };
}

impl<M: TableMemory> AnyDomain<M> {
    /// A translated domain of `format` with an empty page table from `mem`.
    ///
    /// # Errors
    ///
    /// As [`Domain::new`]: [`DmaError::BadConfig`] for levels or an aperture
    /// the format cannot cover, [`DmaError::OutOfMemory`] when the lender
    /// refuses the root table.
    pub fn new(format: AnyFormat, mem: M, config: DomainConfig) -> Result<Self, DmaError> {
        Ok(match format {
            AnyFormat::ArmStage1 => AnyDomain::ArmStage1(Domain::new(ArmStage1, mem, config)?),
            AnyFormat::ArmStage2 => AnyDomain::ArmStage2(Domain::new(ArmStage2, mem, config)?),
            AnyFormat::VtdSecondLevel(f) => AnyDomain::VtdSecondLevel(Domain::new(f, mem, config)?),
            AnyFormat::VtdFirstLevel(f) => AnyDomain::VtdFirstLevel(Domain::new(f, mem, config)?),
        })
    }

    /// The format tag of the tables.
    pub fn format(&self) -> TableFormat {
        match self {
            AnyDomain::ArmStage1(_) => TableFormat::ArmStage1,
            AnyDomain::ArmStage2(_) => TableFormat::ArmStage2,
            AnyDomain::VtdSecondLevel(_) => TableFormat::VtdSecondLevel,
            AnyDomain::VtdFirstLevel(_) => TableFormat::VtdFirstLevel,
        }
    }

    /// [`Domain::id`].
    pub fn id(&self) -> u16 {
        each!(self, d => d.id())
    }

    /// [`Domain::info`].
    pub fn info(&self) -> Option<DomainInfo> {
        each!(self, d => d.info())
    }

    /// [`Domain::attachment`].
    pub fn attachment(&self) -> Attachment {
        each!(self, d => d.attachment())
    }

    /// [`Domain::translate`].
    pub fn translate(&self, iova: DmaAddr) -> Option<(PhysAddr, MapAttrs)> {
        each!(self, d => d.translate(iova))
    }

    /// [`Domain::has_pending`].
    pub fn has_pending(&self) -> bool {
        each!(self, d => d.has_pending())
    }

    /// The lender the page table was built from, if the domain is translated.
    pub fn memory(&self) -> Option<&M> {
        each!(self, d => d.page_table().map(|pt| pt.memory()))
    }

    /// [`Domain::try_alloc`].
    ///
    /// # Errors
    ///
    /// As [`Domain::try_alloc`].
    pub fn try_alloc(&mut self, size: u64, dma_mask: u64) -> Result<DmaPath, DmaError> {
        each!(self, d => d.try_alloc(size, dma_mask))
    }

    /// [`Domain::try_alloc_at`]: a transaction for exactly
    /// `[iova, iova + size)`.
    ///
    /// # Errors
    ///
    /// As [`Domain::try_alloc_at`].
    pub fn try_alloc_at(&mut self, iova: DmaAddr, size: u64) -> Result<IovaState, DmaError> {
        each!(self, d => d.try_alloc_at(iova, size))
    }

    /// [`Domain::reserve`]: no IOVA in `[iova, iova + size)` is ever handed
    /// out or linked at.
    ///
    /// # Errors
    ///
    /// As [`Domain::reserve`].
    pub fn reserve(&mut self, iova: DmaAddr, size: u64) -> Result<(), DmaError> {
        each!(self, d => d.reserve(iova, size))
    }

    /// [`Domain::fixed_ranges`]: reserved ranges, fixed-IOVA transactions
    /// and identity regions, sorted by address.
    pub fn fixed_ranges(&self) -> &[FixedRange] {
        each!(self, d => d.fixed_ranges())
    }

    /// [`Domain::install_identity_regions`]: firmware's reserved regions
    /// identity-mapped and kept by the domain, then one sync.
    ///
    /// # Errors
    ///
    /// As [`Domain::install_identity_regions`].
    pub fn install_identity_regions<B: IommuBackend + ?Sized>(
        &mut self,
        regions: &[ReservedRegion],
        backend: &mut B,
    ) -> Result<(), DmaError> {
        each!(self, d => d.install_identity_regions(regions, backend))
    }

    /// [`Domain::link`].
    ///
    /// # Errors
    ///
    /// As [`Domain::link`]; nothing changes on any error.
    pub fn link(
        &mut self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        each!(self, d => d.link(tx, phys, offset, len, dir, attrs))
    }

    /// [`Domain::link_pages`].
    ///
    /// # Errors
    ///
    /// As [`Domain::link_pages`]; nothing changes on any error.
    pub fn link_pages(
        &mut self,
        tx: &mut IovaState,
        pages: &[PhysAddr],
        offset: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        each!(self, d => d.link_pages(tx, pages, offset, dir, attrs))
    }

    /// [`Domain::link_bytes`]: a range that need not be page-aligned; the
    /// rest of each touched page is exposed to the device.
    ///
    /// # Errors
    ///
    /// As [`Domain::link_bytes`]; nothing changes on any error.
    pub fn link_bytes(
        &mut self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        each!(self, d => d.link_bytes(tx, phys, offset, len, dir, attrs))
    }

    /// [`Domain::link_p2p`].
    ///
    /// # Errors
    ///
    /// As [`Domain::link_p2p`]; nothing changes on any error.
    #[allow(clippy::too_many_arguments)]
    pub fn link_p2p(
        &mut self,
        tx: &mut IovaState,
        p2p: &mut P2pRegistry,
        client: DeviceId,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        each!(self, d => d.link_p2p(tx, p2p, client, phys, offset, len, dir))
    }

    /// [`Domain::sync`].
    ///
    /// # Errors
    ///
    /// [`DmaError::Backend`] when the backend fails to invalidate or wait.
    pub fn sync<B: IommuBackend + ?Sized>(&mut self, backend: &mut B) -> Result<(), DmaError> {
        each!(self, d => d.sync(backend))
    }

    /// [`Domain::set_table_reclaim`].
    pub fn set_table_reclaim(&mut self, policy: TableReclaim) {
        each!(self, d => d.set_table_reclaim(policy))
    }

    /// [`Domain::table_reclaim`].
    pub fn table_reclaim(&self) -> TableReclaim {
        each!(self, d => d.table_reclaim())
    }

    /// [`Domain::reclaim_empty_tables`].
    ///
    /// # Errors
    ///
    /// As [`Domain::reclaim_empty_tables`]: [`DmaError::Backend`], and then
    /// nothing is handed back until a later `sync` succeeds.
    pub fn reclaim_empty_tables<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
    ) -> Result<usize, DmaError> {
        each!(self, d => d.reclaim_empty_tables(backend))
    }

    /// [`Domain::unlink`].
    ///
    /// # Errors
    ///
    /// As [`Domain::unlink`]; nothing changes on any error.
    pub fn unlink(&mut self, tx: &mut IovaState, offset: u64, len: u64) -> Result<u64, DmaError> {
        each!(self, d => d.unlink(tx, offset, len))
    }

    /// [`Domain::unlink_bytes`].
    ///
    /// # Errors
    ///
    /// As [`Domain::unlink_bytes`]; nothing changes on any error.
    pub fn unlink_bytes(
        &mut self,
        tx: &mut IovaState,
        dma: DmaAddr,
        len: u64,
    ) -> Result<u64, DmaError> {
        each!(self, d => d.unlink_bytes(tx, dma, len))
    }

    /// [`Domain::free`].
    ///
    /// # Errors
    ///
    /// As [`Domain::free`]: the state comes back with the error.
    pub fn free(&mut self, tx: IovaState) -> Result<(), (IovaState, DmaError)> {
        each!(self, d => d.free(tx))
    }

    /// [`Domain::destroy`].
    ///
    /// # Errors
    ///
    /// As [`Domain::destroy`].
    pub fn destroy<B: IommuBackend + ?Sized>(
        &mut self,
        tx: IovaState,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        each!(self, d => d.destroy(tx, backend))
    }

    /// [`Domain::teardown`]: invalidates the whole domain, waits, then gives
    /// every table page back. Detach the domain's devices first.
    ///
    /// # Errors
    ///
    /// As [`Domain::teardown`]: the domain comes back whole with the error
    /// and nothing was freed.
    #[allow(
        clippy::result_large_err,
        reason = "the domain is handed back whole on failure, as Domain::teardown does"
    )]
    pub fn teardown<B: IommuBackend + ?Sized>(
        self,
        backend: &mut B,
    ) -> Result<(), (Self, DmaError)> {
        each!(self, d => d.teardown(backend).map_err(|(d, e)| (d.into(), e)))
    }

    /// [`Domain::map`].
    ///
    /// # Errors
    ///
    /// As [`Domain::map`].
    pub fn map<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        phys: PhysAddr,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
        dma_mask: u64,
    ) -> Result<Mapping, DmaError> {
        each!(self, d => d.map(backend, phys, len, dir, attrs, dma_mask))
    }

    /// [`Domain::unmap`].
    ///
    /// # Errors
    ///
    /// As [`Domain::unmap`].
    pub fn unmap<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        m: Mapping,
    ) -> Result<(), DmaError> {
        each!(self, d => d.unmap(backend, m))
    }
}

macro_rules! from_domain {
    ($($fmt:ty => $variant:ident),*) => {$(
        impl<M: TableMemory> From<Domain<$fmt, M>> for AnyDomain<M> {
            /// Wraps a domain built with a compile-time format.
            fn from(d: Domain<$fmt, M>) -> Self {
                AnyDomain::$variant(d)
            }
        }
    )*};
}

from_domain!(
    ArmStage1 => ArmStage1,
    ArmStage2 => ArmStage2,
    VtdSecondLevel => VtdSecondLevel,
    VtdFirstLevel => VtdFirstLevel
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::S1Bits;
    use crate::testing::RecordingBackend;
    use crate::testing::heap::HostMemory;

    fn cfg(levels: u8) -> DomainConfig {
        DomainConfig {
            id: 9,
            levels,
            aperture_start: 1 << 20,
            aperture_end: 1 << 30,
            coherent_walk: true,
        }
    }

    /// The raw leaf descriptor the domain wrote for `iova`.
    fn leaf<M: TableMemory>(dom: &AnyDomain<M>, iova: DmaAddr) -> u64 {
        let (pa, _) = dom.translate(iova).unwrap();
        let _ = pa;
        each!(dom, d => {
            let pt = d.page_table().unwrap();
            // Walk down from the root with the format's own decoder.
            let mut table = pt.root();
            let mut v = 0;
            for level in 0..pt.levels() {
                let shift = 12 + 9 * u32::from(pt.levels() - 1 - level);
                let idx = (iova.0 >> shift) & 0x1ff;
                // SAFETY: table pages come from the heap lender (identity).
                v = unsafe { pt.memory().phys_to_virt(table).cast::<u64>().add(idx as usize).read() };
                table = PhysAddr(v & 0x000f_ffff_ffff_f000);
            }
            v
        })
    }

    #[test]
    fn each_runtime_format_writes_its_own_descriptor_bits() {
        let formats = [
            AnyFormat::ArmStage1,
            AnyFormat::ArmStage2,
            AnyFormat::VtdSecondLevel(VtdSecondLevel::default()),
            AnyFormat::VtdFirstLevel(VtdFirstLevel {
                fl1gp: true,
                haw: 48,
            }),
        ];
        for (format, levels) in formats.into_iter().zip([4, 3, 4, 4]) {
            let mut dom = AnyDomain::new(format, HostMemory::default(), cfg(levels)).unwrap();
            assert_eq!(dom.format(), format.table_format());
            let info = dom.info().unwrap();
            assert_eq!(
                (info.format, info.levels, info.id),
                (format.table_format(), levels, 9)
            );
            assert_eq!(dom.attachment(), Attachment::Translated(info));
            let mut tx = dom.try_alloc(4096, u64::MAX).unwrap().into_iova().unwrap();
            let phys = PhysAddr(0x1234_5000);
            dom.link(
                &mut tx,
                phys,
                0,
                4096,
                DmaDirection::ToDevice,
                MapAttrs::empty(),
            )
            .unwrap();
            assert!(dom.has_pending());
            let pte = leaf(&dom, tx.iova());
            assert_eq!(pte & 0x000f_ffff_ffff_f000, phys.0, "{format:?}");
            // Device-readable only: each format says "read-only" its own way.
            match format {
                // AP[2] = 1 (read-only), AF set.
                AnyFormat::ArmStage1 => {
                    assert_ne!(pte & S1Bits::AP_RDONLY.bits(), 0);
                    assert_ne!(pte & S1Bits::AF.bits(), 0);
                }
                // S2AP = 01 (read only).
                AnyFormat::ArmStage2 => assert_eq!((pte >> 6) & 0b11, 0b01),
                // R (bit 0) set, W (bit 1) clear.
                AnyFormat::VtdSecondLevel(_) => assert_eq!(pte & 0b11, 0b01),
                // P set, R/W clear, U/S set.
                AnyFormat::VtdFirstLevel(_) => assert_eq!(pte & 0b111, 0b101),
            }
            let mut iommu = RecordingBackend::new();
            dom.sync(&mut iommu).unwrap();
            assert_eq!(dom.unlink(&mut tx, 0, 4096), Ok(4096));
            dom.destroy(tx, &mut iommu).unwrap();
            // The sync after the link only publishes; the unlink waits once.
            assert_eq!((iommu.syncs, iommu.publishes), (1, 1));
            assert!(dom.translate(DmaAddr(0x10_0000)).is_none());
        }
    }

    #[test]
    fn the_table_reclaim_policy_reaches_every_runtime_format() {
        for format in [
            AnyFormat::ArmStage1,
            AnyFormat::VtdSecondLevel(VtdSecondLevel::default()),
        ] {
            let mem = HostMemory::default();
            let mut dom = AnyDomain::new(format, &mem, cfg(4)).unwrap();
            assert_eq!(dom.table_reclaim(), TableReclaim::Eager);
            dom.set_table_reclaim(TableReclaim::Keep);
            assert_eq!(dom.table_reclaim(), TableReclaim::Keep);
            let mut iommu = RecordingBackend::new();
            let mut tx = dom.try_alloc(4096, u64::MAX).unwrap().into_iova().unwrap();
            dom.link(
                &mut tx,
                PhysAddr(0x1234_5000),
                0,
                4096,
                DmaDirection::ToDevice,
                MapAttrs::empty(),
            )
            .unwrap();
            dom.sync(&mut iommu).unwrap();
            let lent = mem.blocks_out();
            dom.unlink(&mut tx, 0, 4096).unwrap();
            dom.sync(&mut iommu).unwrap();
            assert_eq!(mem.blocks_out(), lent, "{format:?}: kept");
            // The leaf table and its level-1 parent.
            assert_eq!(dom.reclaim_empty_tables(&mut iommu), Ok(2));
            assert_eq!(mem.blocks_out(), lent - 2, "{format:?}: reclaimed");
            dom.destroy(tx, &mut iommu).unwrap();
        }
    }

    #[test]
    fn a_bad_runtime_config_is_refused_like_the_generic_domain() {
        assert!(matches!(
            AnyDomain::new(AnyFormat::ArmStage1, HostMemory::default(), cfg(7)),
            Err(DmaError::BadConfig { what: "levels", .. })
        ));
        let mut big = cfg(3);
        big.aperture_end = 1 << 40;
        assert!(matches!(
            AnyDomain::new(AnyFormat::ArmStage2, HostMemory::default(), big),
            Err(DmaError::BadConfig {
                what: "aperture_end",
                ..
            })
        ));
    }
}
