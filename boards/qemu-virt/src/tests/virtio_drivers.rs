//! virtio-drivers' own `VirtIOBlk` through bare-iommu's virtio-drivers
//! adapter (`IommuHal` + `AccessPlatform`) on the SMMU: the same virtio-blk
//! at 00:08.0 (StreamID 0x40), attached to an `AnyDomain` of the SMMU's
//! preferred stage. The test bodies are `board_common::virtio_drivers_dma`'s.

use bare_iommu::pgtable::PteFormat;
use bare_iommu::smmuv3::{Smmu, SmmuConfig};
use bare_iommu::{AnyDomain, Domain, IommuBackend};
use board_common::virtio_drivers_dma::{self, DriversTest};

use super::smmu::{Mem, bring_up, domain, fault_stage, teardown, with_preferred_stage};
use super::virtio::SmmuChecks;
use crate::harness::{Ctx, Fail, OrFail, Virtio};

/// Event queue of 512 records: a blocked one-sector read makes 129 events.
const EVTQ_LOG2: u8 = 9;

/// `VirtIOBlk::new` over `AccessPlatform<PciTransport>` keeps FEATURES_OK
/// with ACCESS_PLATFORM; sectors read into and written from (unaligned)
/// stack buffers through `IommuHal` carry exactly the image's / the new
/// bytes; no SMMU event; no transaction left live.
pub fn virtio_drivers_blk_reads_and_writes_through_iommu_hal(ctx: &mut Ctx) -> Result<(), Fail> {
    run(ctx, 32, false)
}

/// A read whose data buffer was unshared before the device used it (its DMA
/// address kept anyway) is blocked: the buffer keeps its bytes and the SMMU
/// reports F_TRANSLATION with the StreamID at that address.
pub fn virtio_drivers_unshared_buffer_faults(ctx: &mut Ctx) -> Result<(), Fail> {
    run(ctx, 33, true)
}

fn run(ctx: &Ctx, id: u16, fault: bool) -> Result<(), Fail> {
    let virtio = ctx.virtio.clone()?;
    let config = SmmuConfig {
        evtq_log2: EVTQ_LOG2,
        ..SmmuConfig::default()
    };
    let mut smmu = bring_up(ctx, config)?;
    let r = (|| {
        with_preferred_stage!(smmu, |fmt| {
            in_domain(ctx, &mut smmu, fmt, id, virtio, fault)?;
        });
        Ok(())
    })();
    let detached = smmu.detach(virtio.id).or_fail("detach virtio");
    let down = teardown(&mut smmu, ctx);
    r?;
    detached?;
    down
}

fn in_domain<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    fmt: F,
    id: u16,
    virtio: Virtio,
    fault: bool,
) -> Result<(), Fail>
where
    AnyDomain<Mem>: From<Domain<F, Mem>>,
{
    let mut dom = AnyDomain::from(domain(smmu, ctx, fmt, id)?);
    smmu.attach(virtio.id, dom.attachment())
        .or_fail("attach virtio")?;
    let mut checks = SmmuChecks {
        stage: fault_stage(dom.format()),
    };
    let t = DriversTest {
        iommu: &mut *smmu,
        dom: &mut dom,
        lender: ctx.mem,
        dev: virtio,
    };
    let r = if fault {
        virtio_drivers_dma::unshared_buffer_faults(t, &mut checks)
    } else {
        virtio_drivers_dma::reads_and_writes(t, &mut checks)
    };
    let detached = smmu.detach(virtio.id).or_fail("detach virtio");
    let ended = dom
        .teardown(&mut *smmu)
        .map_err(|(_, e)| e)
        .or_fail("domain teardown");
    r.and(detached).and(ended)
}
