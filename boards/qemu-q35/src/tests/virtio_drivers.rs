//! virtio-drivers' own `VirtIOBlk` through bare-iommu's virtio-drivers
//! adapter (`IommuHal` + `AccessPlatform`) on VT-d: the same virtio-blk at
//! 00:08.0 (source-id 0x40), attached to an `AnyDomain` of this run's format
//! (second level, or first level in scalable mode with `fl`). The test
//! bodies are `board_common::virtio_drivers_dma`'s.

use bare_iommu::vtd::Access;
use bare_iommu::{AnyDomain, Domain, IommuBackend};
use board_common::virtio_drivers_dma::{self, DriversTest};

use super::virtio::VtdChecks;
use super::vtd::{APERTURE_A, BoardFormat, Unit, first_level, new_domain, per_format, with_unit};
use crate::harness::{Ctx, Fail, OrFail};
use crate::memory::BoardMemory;

type Mem = &'static BoardMemory;

per_format!(
    /// `VirtIOBlk::new` over `AccessPlatform<PciTransport>` keeps FEATURES_OK
    /// with ACCESS_PLATFORM; sectors read into and written from (unaligned)
    /// stack buffers through `IommuHal` carry exactly the image's / the new
    /// bytes; no fault record; no transaction left live.
    virtio_drivers_blk_reads_and_writes_through_iommu_hal => with_unit reads_and_writes
);

fn reads_and_writes<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail>
where
    AnyDomain<Mem>: From<Domain<F, Mem>>,
{
    in_domain::<F>(ctx, vtd, 32, false)
}

per_format!(
    /// A read whose data buffer was unshared before the device used it (its
    /// DMA address kept anyway) is blocked: the buffer keeps its bytes and
    /// the fault record names the source-id, that address, a write and the
    /// not-present reason.
    virtio_drivers_unshared_buffer_faults => with_unit unshared_faults
);

fn unshared_faults<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail>
where
    AnyDomain<Mem>: From<Domain<F, Mem>>,
{
    in_domain::<F>(ctx, vtd, 33, true)
}

fn in_domain<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit, id: u16, fault: bool) -> Result<(), Fail>
where
    AnyDomain<Mem>: From<Domain<F, Mem>>,
{
    let virtio = ctx.virtio.clone()?;
    let mut dom = AnyDomain::from(new_domain::<F>(vtd, ctx, id, APERTURE_A)?);
    vtd.attach(virtio.id, dom.attachment())
        .or_fail("attach virtio")?;
    let mut checks = VtdChecks {
        unmapped_write: F::unmapped(Access::Write),
    };
    let t = DriversTest {
        iommu: &mut *vtd,
        dom: &mut dom,
        lender: ctx.mem,
        dev: virtio,
    };
    let r = if fault {
        virtio_drivers_dma::unshared_buffer_faults(t, &mut checks)
    } else {
        virtio_drivers_dma::reads_and_writes(t, &mut checks)
    };
    // Detached before the domain's tables go.
    let detached = vtd.detach(virtio.id).or_fail("detach virtio");
    let ended = dom
        .teardown(&mut *vtd)
        .map_err(|(_, e)| e)
        .or_fail("domain teardown");
    r.and(detached).and(ended)
}
