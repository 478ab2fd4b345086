//! A device behind a PCI bridge (issue 12 item 2): the edu at 01:00.0 on
//! the secondary bus of the PCIe root port at 00:06.0, requester ID 0x100
//! (its devfn alone would say 0x00).

use bare_iommu::firmware::dmar::Dmar;
use bare_iommu::pgtable::{DmaDirection, MapAttrs};
use bare_iommu::vtd::Access;
use bare_iommu::{DmaAddr, IommuBackend, PAGE_SIZE, PhysAddr};

use super::vtd::{
    APERTURE_A, BoardFormat, PAGE, PAGE_U32, Unit, alloc_tx, attached_domain, end_domain,
    expect_write_blocked, first_level, free_pages, no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};

per_format!(
    /// The DMAR scope of the bridged edu (through the root port's bus
    /// numbers, read from config space) names the unit; a domain attached
    /// by its requester ID carries its DMA to the linked pages; an unlinked
    /// page is blocked and the fault record's source-id is 0x100 (bus 1).
    bridged_device_dma_translated_and_fault_names_its_requester_id => with_unit bridged
);

fn bridged<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail> {
    let edu = match &ctx.bridged {
        Ok(e) => e,
        Err(e) => return Err(e.clone()),
    };
    check_eq!(edu.id.source_id(), 0x100, "requester ID of 01:00.0");
    let dmar = Dmar::new(ctx.dmar).map_err(|e| fail_msg(format_args!("DMAR: {e}")))?;
    let unit = dmar
        .unit_for(edu.id, &|_seg, bus, devfn| {
            ctx.ecam.bridge_buses(bus, devfn)
        })
        .map_err(|e| fail_msg(format_args!("scope of {}: {e}", edu.id)))?;
    check_eq!(
        unit.map(|u| u.register_base),
        Some(ctx.vtd_base as u64),
        "DRHD owning {}",
        edu.id
    );

    let mut dom = attached_domain::<F>(vtd, ctx, edu, 52, APERTURE_A)?;
    let pa = ctx.mem.dma_pages(2).or_fail("2 pages")?;
    let (src, dst) = (pa, PhysAddr(pa.0 + PAGE_SIZE));
    let mut tx = alloc_tx(&mut dom, 2 * PAGE_SIZE)?;
    let iova = dom
        .link(
            &mut tx,
            pa,
            0,
            2 * PAGE_SIZE,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
        )
        .or_fail("link")?
        .0;
    dom.sync(vtd).or_fail("sync")?;
    ctx.mem.fill_pattern(src, PAGE, 0x5c).or_fail("pattern")?;
    ctx.mem.fill(dst, PAGE, 0).or_fail("clear")?;
    edu.dma_from_ram(iova, 0, PAGE_U32).or_fail("RAM -> edu")?;
    edu.dma_to_ram(iova + PAGE_SIZE, 0, PAGE_U32)
        .or_fail("edu -> RAM")?;
    check_ok!(
        ctx.mem.check_pattern(dst, PAGE, 0x5c),
        "the bridged device's copy"
    );
    no_faults(vtd)?;
    narrate!(
        "{} (behind 00:06.0, source-id {:#06x}) copied IOVA {iova:#x} -> {:#x} through the unit",
        edu.id,
        edu.id.source_id(),
        iova + PAGE_SIZE
    );

    dom.unlink(&mut tx, PAGE_SIZE, PAGE_SIZE)
        .or_fail("unlink")?;
    dom.sync(vtd).or_fail("sync")?;
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        iova + PAGE_SIZE,
        dst,
        &[F::unmapped(Access::Write)],
        "write to the unlinked page",
    )?;
    check!(
        dom.translate(DmaAddr(iova)).is_some(),
        "the page still linked stopped translating"
    );
    dom.destroy(tx, vtd).or_fail("destroy")?;
    vtd.detach(edu.id).or_fail("detach")?;
    end_domain(vtd, dom)?;
    free_pages(ctx, pa, 2)
}
