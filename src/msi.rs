//! MSI doorbells behind the IOMMU.
//!
//! On Arm an MSI is a DMA write of the event number to the interrupt
//! controller's doorbell (GICv3 ITS: `GITS_TRANSLATER`, frame offset
//! 0x10040), and the SMMU translates it like any other write of the device:
//! in a translated domain the doorbell must be mapped, or the interrupt is
//! a translation fault. [`Domain::map_msi_doorbell`] links the doorbell's
//! page at a fixed IOVA, write-only, with device-memory attributes, and
//! gives the address to program into the device's MSI capability. Linux
//! reserves `[0x800_0000, 0x810_0000)` of every domain for this
//! ([`MSI_IOVA_BASE`], arm-smmu-v3's software MSI region); any free IOVA
//! outside the domain's other ranges works.
//!
//! On x86 the interrupt window 0xFEE0_0000–0xFEEF_FFFF is never translated
//! by VT-d (interrupt messages are decoded before translation) and VT-d
//! domains reserve it themselves: there is nothing to map.

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::backend::IommuBackend;
use crate::error::DmaError;
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, MapAttrs, PteFormat};
use crate::state::{Domain, IovaState};

/// The IOVA Linux gives MSI doorbells in every Arm domain (`MSI_IOVA_BASE`).
pub const MSI_IOVA_BASE: u64 = 0x800_0000;

/// A mapped doorbell: the fixed-IOVA transaction and the address the
/// device writes its MSIs to.
#[must_use = "a doorbell holds an IOVA page: give it back with Domain::unmap_msi_doorbell"]
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MsiDoorbell {
    tx: IovaState,
    addr: DmaAddr,
}

impl MsiDoorbell {
    /// The MSI address to program into the device (the doorbell's offset in
    /// its page kept).
    pub fn msi_address(&self) -> DmaAddr {
        self.addr
    }
}

impl<F: PteFormat, M: TableMemory> Domain<F, M> {
    /// Maps the 4 KiB page holding the doorbell register at `doorbell` (e.g.
    /// the ITS frame base + 0x10040) at the fixed IOVA page `iova`,
    /// writable by the device (write-only where the format can say so:
    /// stage 2 and VT-d; a stage-1 page is always readable), with
    /// device-memory attributes, and syncs. The device's
    /// MSI address is [`MsiDoorbell::msi_address`].
    ///
    /// # Errors
    ///
    /// What [`try_alloc_at`](Self::try_alloc_at) and [`link`](Self::link)
    /// refuse (unaligned `iova`, outside the aperture, over a reserved or
    /// live range, an identity domain, no table memory), or the sync's
    /// error (then the doorbell is unlinked again and its range released).
    pub fn map_msi_doorbell<B: IommuBackend + ?Sized>(
        &mut self,
        iova: DmaAddr,
        doorbell: PhysAddr,
        backend: &mut B,
    ) -> Result<MsiDoorbell, DmaError> {
        let page = doorbell.page_base();
        let offset = doorbell.0 - page.0;
        let mut tx = self.try_alloc_at(iova, PAGE_SIZE)?;
        let linked = self
            .link(
                &mut tx,
                page,
                0,
                PAGE_SIZE,
                DmaDirection::FromDevice,
                MapAttrs::MMIO,
            )
            .and_then(|a| self.sync(backend).map(|()| a));
        match linked {
            Ok(a) => Ok(MsiDoorbell {
                tx,
                addr: DmaAddr(a.0 + offset),
            }),
            Err(e) => {
                // Give everything back; the first error is the one to report.
                let _ = self.destroy(tx, backend);
                Err(e)
            }
        }
    }

    /// Unmaps a doorbell [`map_msi_doorbell`](Self::map_msi_doorbell) mapped:
    /// unlinked, synced, its IOVA released. The device's next MSI is a
    /// translation fault.
    ///
    /// # Errors
    ///
    /// As [`destroy`](Self::destroy).
    pub fn unmap_msi_doorbell<B: IommuBackend + ?Sized>(
        &mut self,
        db: MsiDoorbell,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        self.destroy(db.tx, backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::ArmStage1;
    use crate::state::DomainConfig;
    use crate::testing::RecordingBackend;
    use crate::testing::heap::HostMemory;

    fn domain(mem: &HostMemory) -> Domain<ArmStage1, &HostMemory> {
        let config = DomainConfig {
            id: 4,
            levels: 3,
            aperture_start: 0x10_0000,
            aperture_end: 1 << 39,
            coherent_walk: true,
        };
        Domain::new(ArmStage1, mem, config).unwrap()
    }

    #[test]
    fn doorbell_is_mapped_write_only_as_device_memory_at_its_offset() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut d = domain(&mem);
        let its = PhysAddr(0x0808_0000);
        let db = d
            .map_msi_doorbell(DmaAddr(MSI_IOVA_BASE), PhysAddr(its.0 + 0x1_0040), &mut be)
            .unwrap();
        assert_eq!(db.msi_address(), DmaAddr(MSI_IOVA_BASE + 0x40));
        let (pa, attrs) = d.translate(DmaAddr(MSI_IOVA_BASE + 0x40)).unwrap();
        assert_eq!(pa, PhysAddr(its.0 + 0x1_0040));
        // Stage 1 has no write-only permission (AP: read-only or
        // read-write); stage 2 and VT-d keep the page write-only.
        assert!(
            attrs.contains(MapAttrs::WRITE | MapAttrs::MMIO),
            "{attrs:?}"
        );
        // The page is taken: a second doorbell there is refused.
        assert!(matches!(
            d.map_msi_doorbell(DmaAddr(MSI_IOVA_BASE), its, &mut be),
            Err(DmaError::IovaInUse { .. })
        ));
        d.unmap_msi_doorbell(db, &mut be).unwrap();
        assert_eq!(d.translate(DmaAddr(MSI_IOVA_BASE)), None);
        assert!(be.covered_since_last_sync(4, MSI_IOVA_BASE, PAGE_SIZE));
        d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn failed_sync_gives_the_doorbell_page_back() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut d = domain(&mem);
        be.fail_next_sync = Some(crate::error::BackendError::Timeout {
            what: "test",
            polls: 1,
        });
        // A link only publishes (no completion) unless the backend asks for
        // map invalidation: make the sync a real one.
        be.caching_mode = true;
        let r = d.map_msi_doorbell(DmaAddr(MSI_IOVA_BASE), PhysAddr(0x0809_0040), &mut be);
        assert!(matches!(r, Err(DmaError::Backend(_))), "{r:?}");
        assert_eq!(d.translate(DmaAddr(MSI_IOVA_BASE)), None);
        // The range is free again.
        let db = d
            .map_msi_doorbell(DmaAddr(MSI_IOVA_BASE), PhysAddr(0x0809_0040), &mut be)
            .unwrap();
        d.unmap_msi_doorbell(db, &mut be).unwrap();
        d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }

    #[test]
    fn doorbell_outside_the_aperture_or_unaligned_is_refused() {
        let mem = HostMemory::default();
        let mut be = RecordingBackend::default();
        let mut d = domain(&mem);
        assert!(matches!(
            d.map_msi_doorbell(DmaAddr(0x1000), PhysAddr(0x0808_0000), &mut be),
            Err(DmaError::OutsideAperture { .. })
        ));
        assert!(matches!(
            d.map_msi_doorbell(DmaAddr(MSI_IOVA_BASE + 8), PhysAddr(0x0808_0000), &mut be),
            Err(DmaError::Unaligned { .. })
        ));
        d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    }
}
