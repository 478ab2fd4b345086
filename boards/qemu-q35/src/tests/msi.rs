//! MSI behind VT-d (issue 12 item 4, the x86 half): on x86 a DMA write to
//! 0xFEE0_0000–0xFEEF_FFFF is an interrupt message, which the unit handles
//! as an interrupt request, never through the device's DMA tables (VT-d
//! 3.14: requests to the interrupt address range are not subject to DMA
//! remapping). A VT-d domain keeps that window out of every IOVA range it
//! hands out, so a device keeps its MSIs while its DMA is translated.

use bare_iommu::DmaAddr;
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::vtd::{MsiMessage, VtdFirstLevel};

use super::ir::{arrived, disable_msi, program_msi, raise};
use super::vtd::{
    BoardFormat, Unit, destroy_and_detach, expect_write_lands, first_level, free_pages,
    load_buffer, no_faults, one_page, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail};
use crate::irq::{self, COUNT_VECTORS};

/// edu 0 is attached to a translated domain whose aperture spans the
/// interrupt window (0x10_0000..4 GiB) and DMAs through it; then its MSI
/// (compatibility format, interrupt remapping off) reaches this CPU's
/// vector A, with no fault; the window itself was never handed out (a
/// fixed IOVA there is refused).
pub fn msi_arrives_while_the_device_is_translated(ctx: &mut Ctx) -> Result<(), Fail> {
    let apic = irq::init().or_fail("interrupt setup")?;
    with_unit(ctx, |vtd| {
        if first_level(ctx) {
            msi_with::<VtdFirstLevel>(ctx, vtd, apic)
        } else {
            msi_with::<VtdSecondLevel>(ctx, vtd, apic)
        }
    })
}

fn msi_with<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit, apic: u32) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let [a, _] = COUNT_VECTORS;
    check!(
        !vtd.interrupt_remapping_enabled(),
        "interrupt remapping left on by an earlier test"
    );
    let mut p = one_page::<F>(vtd, ctx, edu, 1, (0x10_0000, 1 << 32))?;
    load_buffer(ctx, edu, p.pa, p.iova, 0x5a)?;
    expect_write_lands(ctx, edu, p.iova, p.pa, 0x5a, "DMA through the domain")?;
    let r = p.dom.try_alloc_at(DmaAddr(0xfee0_0000), 4096);
    check!(r.is_err(), "a fixed IOVA in the interrupt window: {r:?}");

    let (address, data) = irq::msi_for(apic, a);
    program_msi(ctx, edu.id, MsiMessage { address, data })?;
    raise(ctx, 0)?;
    let got = arrived();
    disable_msi(ctx, edu.id)?;
    narrate!(
        "edu 0 translated (IOVA {:#x}); its MSI reached {got:x?}",
        p.iova
    );
    check_eq!(got?, Some(a), "vector the MSI reached while translated");
    no_faults(vtd)?;
    let pa = p.pa;
    destroy_and_detach(vtd, p.dom, p.tx, edu)?;
    free_pages(ctx, pa, 1)
}
