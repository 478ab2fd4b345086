//! A real storage device's DMA through VT-d: QEMU's virtio-blk (virtio 1.x
//! PCI, `iommu_platform=on`) at 00:08.0, source-id 0x40, reads and writes
//! sectors of the xtask's disk image through one transaction of a
//! translated domain.
//!
//! The flow is `board_common::virtio_dma`'s; here VT-d's side of it: a
//! blocked DMA leaves a fault record with the source-id, the page and a
//! write. QEMU's device retries a refused buffer through a bounce buffer
//! whose write-back faults again; QEMU's VT-d records the first fault (one
//! fault recording register, NFR=1) and drops the repeats while that record
//! is pending ("compression of faults"), so one record is expected, and any
//! further one must say the same.

use bare_iommu::vtd::{Access, FaultReason};
use bare_iommu::{DeviceId, IommuBackend, PAGE_SIZE, PhysAddr};
use board_common::edu::DmaBudget;
use board_common::p2p::Reported;
use board_common::virtio_dma::{self, DATA_PAGES, FaultChecks, Pages, VirtioTest};

use super::vtd::{
    APERTURE_A, BoardFormat, Unit, end_domain, faults, first_level, free_pages, new_domain,
    no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail, Virtio, fail_msg};

/// Polls of the used ring before a request counts as lost. QEMU completes a
/// request from its block layer in real time, not virtual time.
const POLLS: u32 = 20_000_000;

/// VT-d's side of the virtio tests.
pub(super) struct VtdChecks {
    /// The fault reason of a write to an unmapped page in this run's format.
    pub(super) unmapped_write: FaultReason,
}

impl FaultChecks<Unit> for VtdChecks {
    fn before_dma(&mut self, vtd: &mut Unit) {
        vtd.poll_faults(|_| {});
    }

    fn no_faults(&mut self, vtd: &mut Unit) -> Result<(), Fail> {
        no_faults(vtd)
    }

    /// Every record names `dev`, a page of `[iova, iova + len)`, a write and
    /// the not-present reason; at least one was recorded (later ones may
    /// only show as the overflow bit).
    fn blocked_write(
        &mut self,
        vtd: &mut Unit,
        dev: DeviceId,
        iova: u64,
        len: u32,
    ) -> Result<Reported, Fail> {
        let (recs, st) = faults(vtd);
        let first = *recs
            .first()
            .or_fail("no fault record for the blocked DMA")?;
        let (lo, hi) = (iova & !(PAGE_SIZE - 1), iova + u64::from(len));
        for r in &recs {
            check_eq!(r.source_id, dev.source_id(), "fault source-id");
            check!(
                (lo..hi).contains(&r.address.0),
                "fault address {} outside [{lo:#x}, {hi:#x})",
                r.address
            );
            check_eq!(r.access, Access::Write, "fault access");
            check!(
                r.reason == self.unmapped_write,
                "fault reason {:?} ({:#x}), expected {:?}",
                r.reason,
                r.code,
                self.unmapped_write
            );
        }
        narrate!(
            "{} fault record(s){}",
            recs.len(),
            if st.overflow {
                ", primary fault overflow (the bounce write-back's faults)"
            } else {
                ""
            }
        );
        Ok(Reported {
            records: recs.len() as u32,
            first: fail_msg(format_args!("{first}")),
        })
    }
}

per_format!(
    /// virtio-blk attached to a translated domain (VT-d: source-id of
    /// 00:08.0); one transaction holds the virtqueue page, the header page
    /// and four scattered data pages (link / link_pages, one sync). Sectors
    /// read land in the right pages with exactly the image's bytes; a
    /// written sector reads back with its new bytes, its neighbours and the
    /// other pages intact.
    virtio_blk_reads_and_writes_through_iommu_tables => reads_and_writes
);

fn reads_and_writes<F: BoardFormat>(ctx: &mut Ctx) -> Result<(), Fail> {
    run::<F>(ctx, 30, false)
}

per_format!(
    /// After unlinking a data page (and syncing), a read into it is blocked:
    /// the page keeps its bytes and the fault record names the function's
    /// source-id, the page, a write and the not-present reason. QEMU's
    /// device still completes the request with VIRTIO_BLK_S_OK (its bounce
    /// buffer swallows the refused write), which the test asserts: only
    /// VT-d tells.
    virtio_blk_dma_to_an_unlinked_buffer_faults => unlinked_faults
);

fn unlinked_faults<F: BoardFormat>(ctx: &mut Ctx) -> Result<(), Fail> {
    run::<F>(ctx, 31, true)
}

/// Runs a virtio test body in a domain (ID `id`) the virtio function is
/// attached to; detaches it and frees the pages after, whatever happened.
fn run<F: BoardFormat>(ctx: &Ctx, id: u16, fault: bool) -> Result<(), Fail> {
    let virtio = ctx.virtio.clone()?;
    // Separate pages, not neighbours and out of order: consecutive IOVAs
    // scattered over physical memory.
    let mut all = [PhysAddr(0); 2 + 2 * DATA_PAGES];
    for p in all.iter_mut() {
        *p = ctx.mem.dma_pages(1).or_fail("page")?;
    }
    let pages = Pages {
        ring: all[0],
        header: all[1],
        data: [all[7], all[3], all[9], all[5]],
    };
    let r = with_unit(ctx, |vtd| {
        let r = in_domain::<F>(ctx, vtd, id, virtio, pages, fault);
        let detached = vtd.detach(virtio.id).or_fail("detach virtio");
        r.and(detached)
    });
    for p in all {
        free_pages(ctx, p, 1)?;
    }
    r
}

fn in_domain<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
    id: u16,
    virtio: Virtio,
    pages: Pages,
    fault: bool,
) -> Result<(), Fail> {
    let mut dom = new_domain::<F>(vtd, ctx, id, APERTURE_A)?;
    vtd.attach(virtio.id, dom.attachment())
        .or_fail("attach virtio")?;
    let mut checks = VtdChecks {
        unmapped_write: F::unmapped(Access::Write),
    };
    let test = VirtioTest {
        iommu: &mut *vtd,
        dom: &mut dom,
        dev: virtio.id,
        pci: virtio.pci,
        budget: DmaBudget::Polls(POLLS),
        pages,
    };
    let r = if fault {
        virtio_dma::unlinked_buffer_faults(test, &mut checks)
    } else {
        virtio_dma::reads_and_writes(test, &mut checks)
    };
    // Detached before the domain's tables go.
    let detached = vtd.detach(virtio.id).or_fail("detach virtio");
    r.and(detached)?;
    end_domain(vtd, dom)
}
