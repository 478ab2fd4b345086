//! A device behind a PCI bridge (issue 12 item 2): the edu at 01:00.0 on
//! the secondary bus of the PCIe root port at 00:09.0, requester ID and
//! StreamID 0x100 (its devfn alone would say 0x00).

use bare_iommu::pgtable::{DmaDirection, MapAttrs};
use bare_iommu::smmuv3::SmmuConfig;
use bare_iommu::{DmaAddr, PAGE_SIZE};

use super::smmu::{
    PAGE, alloc, bring_up, domain, drain, end_domain, expect_blocked_write, fault_stage, pages,
    teardown, with_preferred_stage,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};

/// A domain attached by the bridged edu's StreamID (from the devicetree's
/// `iommu-map`, through `Smmu::attach_stream`) carries its DMA to the
/// linked pages; an unlinked page is blocked and the event names StreamID
/// 0x100 (bus 1) and the address.
pub fn bridged_device_dma_translated_and_fault_names_its_stream_id(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let edu = match &ctx.bridged {
        Ok(e) => e,
        Err(e) => return Err(e.clone()),
    };
    // The StreamID as the firmware says it (the devicetree's iommu-map),
    // not assumed from the requester ID.
    let (map, phandle) = super::basic::dt_iommu_map()?;
    let target = map
        .map(u32::from(edu.id.rid()))
        .map_err(|e| fail_msg(format_args!("iommu-map: {e}")))?
        .or_fail("iommu-map covers 01:00.0")?;
    check_eq!(target.phandle, phandle, "IOMMU of 01:00.0");
    let sid = target.id;
    check_eq!(sid, 0x100, "StreamID of 01:00.0 (bus 1)");
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        let mut dom = domain(&smmu, ctx, fmt, 53)?;
        let stage = fault_stage(dom.info().or_fail("info")?.format);
        smmu.attach_stream(sid, dom.attachment())
            .or_fail("attach by StreamID")?;
        let [src, dst] = pages::<2>(ctx)?;
        let mut tx = alloc(&mut dom, 2 * PAGE_SIZE)?;
        let iova = dom
            .link(
                &mut tx,
                src,
                0,
                PAGE_SIZE,
                DmaDirection::Bidirectional,
                MapAttrs::empty(),
            )
            .or_fail("link src")?
            .0;
        dom.link(
            &mut tx,
            dst,
            PAGE_SIZE,
            PAGE_SIZE,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
        )
        .or_fail("link dst")?;
        dom.sync(&mut smmu).or_fail("sync")?;
        ctx.mem.fill_pattern(src, PAGE, 0x5d);
        ctx.mem.fill(dst, PAGE, 0);
        edu.dma_from_ram(iova, 0, PAGE as u32)
            .or_fail("RAM -> edu")?;
        edu.dma_to_ram(iova + PAGE_SIZE, 0, PAGE as u32)
            .or_fail("edu -> RAM")?;
        check_ok!(
            ctx.mem.check_pattern(dst, PAGE, 0x5d),
            "the bridged device's copy"
        );
        check_eq!(drain(&mut smmu).report.events, 0, "events during the copy");
        narrate!(
            "{} (behind 00:09.0, StreamID {:#x}) copied IOVA {iova:#x} -> {:#x} through the SMMU",
            edu.id,
            edu.id.stream_id(),
            iova + PAGE_SIZE
        );

        dom.unlink(&mut tx, PAGE_SIZE, PAGE_SIZE)
            .or_fail("unlink")?;
        dom.sync(&mut smmu).or_fail("sync")?;
        expect_blocked_write(
            ctx,
            &mut smmu,
            edu,
            iova + PAGE_SIZE,
            PAGE as u32,
            (dst, 0x66),
            stage,
            "write to the unlinked page",
        )?;
        check!(
            dom.translate(DmaAddr(iova)).is_some(),
            "the page still linked stopped translating"
        );
        dom.destroy(tx, &mut smmu).or_fail("destroy")?;
        smmu.attach_stream(sid, bare_iommu::Attachment::Blocked)
            .or_fail("detach")?;
        end_domain(&mut smmu, dom)?;
    });
    teardown(&mut smmu, ctx)
}
