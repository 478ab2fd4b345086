//! A real storage device's DMA through the SMMU: QEMU's virtio-blk (virtio
//! 1.x PCI, `iommu_platform=on`) at 00:08.0, StreamID 0x40, reads and writes
//! sectors of the xtask's disk image through one transaction of a
//! translated domain.
//!
//! The flow is `board_common::virtio_dma`'s; here the SMMU's side of it: a
//! blocked DMA is an F_TRANSLATION event with the StreamID and the IOVA.

use bare_iommu::pgtable::PteFormat;
use bare_iommu::smmuv3::{Smmu, SmmuConfig, Stage};
use bare_iommu::{DeviceId, IommuBackend};
use board_common::edu::DmaBudget;
use board_common::p2p::Reported;
use board_common::virtio_dma::{self, DATA_PAGES, FaultChecks, Pages, VirtioTest};

use super::smmu::{
    Mem, bring_up, domain, drain, end_domain, expect_translation_fault, fault_stage, pages,
    teardown, with_preferred_stage,
};
use crate::harness::{Ctx, Fail, OrFail, Virtio, fail_msg};

/// Polls of the used ring before a request counts as lost. QEMU completes a
/// request from its block layer in real time, not virtual time, so the
/// budget is polls rather than generic-timer ticks.
const POLLS: u32 = 20_000_000;
/// Event queue of 512 records.
const EVTQ_LOG2: u8 = 9;

/// The SMMU's side: faults are F_TRANSLATION events of the domain's stage.
pub(super) struct SmmuChecks {
    pub(super) stage: Stage,
}

impl FaultChecks<Smmu<Mem>> for SmmuChecks {
    fn before_dma(&mut self, smmu: &mut Smmu<Mem>) {
        let _ = drain(smmu);
    }

    fn no_faults(&mut self, smmu: &mut Smmu<Mem>) -> Result<(), Fail> {
        let d = drain(smmu);
        if let Some(e) = d.events.first() {
            fail!("{} event(s) during virtio DMA, first {e}", d.report.events);
        }
        Ok(())
    }

    fn blocked_write(
        &mut self,
        smmu: &mut Smmu<Mem>,
        dev: DeviceId,
        iova: u64,
        len: u32,
    ) -> Result<Reported, Fail> {
        let d = drain(smmu);
        check!(!d.report.overflow, "event queue overflowed");
        expect_translation_fault(&d, dev.stream_id(), iova, iova + u64::from(len), self.stage)?;
        let first = d.events.first().or_fail("first event")?;
        Ok(Reported {
            records: d.report.events,
            first: fail_msg(format_args!("{first}")),
        })
    }
}

/// Which test body to run.
#[derive(Clone, Copy)]
enum Body {
    ReadsAndWrites,
    UnlinkedFaults,
}

/// virtio-blk attached to a translated domain (SMMU: StreamID of 00:08.0);
/// one transaction holds the virtqueue page, the header page and four
/// separate data pages (link / link_pages, one sync). Sectors read land in
/// the right pages with exactly the image's bytes; a written sector reads
/// back with its new bytes, its neighbours and the other pages intact.
pub fn virtio_blk_reads_and_writes_through_iommu_tables(ctx: &mut Ctx) -> Result<(), Fail> {
    run(ctx, 30, Body::ReadsAndWrites)
}

/// After unlinking a data page (and syncing), a read into it is blocked:
/// the page keeps its bytes and the SMMU reports F_TRANSLATION with the
/// function's StreamID inside the buffer's IOVA range. QEMU's device still
/// completes the request with VIRTIO_BLK_S_OK (its bounce buffer swallows
/// the refused write), which the test asserts: only the SMMU tells.
pub fn virtio_blk_dma_to_an_unlinked_buffer_faults(ctx: &mut Ctx) -> Result<(), Fail> {
    run(ctx, 31, Body::UnlinkedFaults)
}

fn run(ctx: &Ctx, id: u16, body: Body) -> Result<(), Fail> {
    let virtio = ctx.virtio.clone()?;
    // A blocked one-sector read makes 129 events (one for the map, one per
    // 4 bytes of QEMU's bounce-buffer write-back): room for all of them.
    let config = SmmuConfig {
        evtq_log2: EVTQ_LOG2,
        ..SmmuConfig::default()
    };
    let mut smmu = bring_up(ctx, config)?;
    let r = (|| {
        with_preferred_stage!(smmu, |fmt| {
            in_domain(ctx, &mut smmu, fmt, id, virtio, body)?;
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
    body: Body,
) -> Result<(), Fail> {
    let mut dom = domain(smmu, ctx, fmt, id)?;
    smmu.attach(virtio.id, dom.attachment())
        .or_fail("attach virtio")?;
    let format = dom.info().or_fail("info")?.format;
    let [ring, header] = pages(ctx)?;
    // Separate pages, not neighbours and out of order: consecutive IOVAs
    // scattered over physical memory.
    let spread: [_; 2 * DATA_PAGES] = pages(ctx)?;
    let data = [spread[5], spread[1], spread[7], spread[3]];
    let mut checks = SmmuChecks {
        stage: fault_stage(format),
    };
    let test = VirtioTest {
        iommu: smmu,
        dom: &mut dom,
        dev: virtio.id,
        pci: virtio.pci,
        budget: DmaBudget::Polls(POLLS),
        pages: Pages { ring, header, data },
    };
    let r = match body {
        Body::ReadsAndWrites => virtio_dma::reads_and_writes(test, &mut checks),
        Body::UnlinkedFaults => virtio_dma::unlinked_buffer_faults(test, &mut checks),
    };
    smmu.detach(virtio.id).or_fail("detach virtio")?;
    r?;
    end_domain(smmu, dom)
}
