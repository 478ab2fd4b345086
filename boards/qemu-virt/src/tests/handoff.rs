//! DMA protection across a hand-off between two boot stages in one image
//! (issue 12 item 5): stage 1 hands the SMMU off blocking every stream
//! (`Smmu::hand_off`: GBPA.ABORT through the GBPA.UPDATE handshake, then
//! SMMUEN = 0), a device DMA started in the window lands nowhere, and stage
//! 2 takes the SMMU over with `init`, which keeps GBPA.ABORT until its own
//! tables are live.
//!
//! No record of the window's DMA exists: QEMU's `smmuv3_translate` returns
//! `SMMU_TRANS_ABORT` for a disabled SMMU with GBPA.ABORT and records no
//! event for it (only the trace event `smmuv3_translate_abort`), and in the
//! hand-off state the event queue is off (CR0 = 0) in any case. The test
//! checks that stage 2 finds its event queue empty.

use bare_iommu::smmuv3::SmmuConfig;
use bare_iommu::{Attachment, IommuBackend};

use super::smmu::{
    PAGE, attached_domain, bring_up, destroy_and_detach, drain, map_pages, pages, teardown,
    with_preferred_stage,
};
use crate::harness::{Ctx, Fail, OrFail};

const CR0: usize = 0x20;
const GBPA: usize = 0x44;
const GBPA_ABORT: u32 = 1 << 20;
const GBPA_UPDATE: u32 = 1 << 31;

fn reg(ctx: &Ctx, off: usize) -> u32 {
    // SAFETY: `smmu_base` maps the SMMU's register page 0 (MMU off: device
    // memory); CR0 and GBPA are 32-bit registers readable at any time.
    unsafe { core::ptr::read_volatile((ctx.smmu_base + off) as *const u32) }
}

fn set_reg(ctx: &Ctx, off: usize, v: u32) {
    // SAFETY: as in `reg`; only GBPA is written, while SMMUEN = 1 (where it
    // has no effect on any stream).
    unsafe { core::ptr::write_volatile((ctx.smmu_base + off) as *mut u32, v) }
}

/// Stage 1 lets edu 0 bypass (its DMA reaches physical addresses), loads
/// edu's buffer through it, and hands off. In the window edu writes a page
/// at its physical address: the page keeps its bytes (GBPA aborts it; with
/// GBPA at bypass it would land). Stage 2 (`init`) finds no event, then its
/// own domain carries edu's DMA to the same page.
pub fn smmu_handoff_window_dma_lands_nowhere(ctx: &mut Ctx) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let [p] = pages(ctx)?;
    let mut stage1 = bring_up(ctx, SmmuConfig::default())?;
    stage1
        .attach(edu.id, Attachment::Bypass)
        .or_fail("bypass")?;
    ctx.mem.fill_pattern(p, PAGE, 0x2d);
    edu.dma_from_ram(p.get(), 0, 64)
        .or_fail("stage 1 bypass read")?;
    // GBPA counts only while SMMUEN = 0, so a stage-1 owner may run with it
    // at its reset value, bypass (QEMU's 0x1000): put it there, through the
    // GBPA.UPDATE handshake, so that only `hand_off` can make it abort.
    set_reg(ctx, GBPA, 0x1000 | GBPA_UPDATE);
    check!(reg(ctx, GBPA) == 0x1000, "GBPA {:#x}", reg(ctx, GBPA));
    stage1.hand_off().or_fail("hand_off")?;
    end_stage(stage1);
    let (cr0, gbpa) = (reg(ctx, CR0), reg(ctx, GBPA));
    narrate!("stage 1 handed off: CR0={cr0:#x} GBPA={gbpa:#x}");
    check!(cr0 == 0, "CR0 {cr0:#x} after hand-off");
    check!(gbpa & GBPA_ABORT != 0, "GBPA {gbpa:#x}: streams bypass");

    // The window: edu writes its (patterned) buffer to the page's physical
    // address, as a device left running would.
    ctx.mem.fill(p, PAGE, 0);
    edu.dma_to_ram(p.get(), 0, 64)
        .or_fail("edu -> RAM in the window")?;
    check_ok!(
        ctx.mem.check_filled(p, PAGE, 0),
        "the DMA in the hand-off window reached memory"
    );

    let mut stage2 = bring_up(ctx, SmmuConfig::default())?;
    let d = drain(&mut stage2);
    check!(
        d.report.events == 0 && !d.report.overflow,
        "stage 2 found {} events of the window (QEMU records none for a GBPA abort)",
        d.report.events
    );
    with_preferred_stage!(stage2, |fmt| {
        let mut dom = attached_domain(&mut stage2, ctx, fmt, 21, edu)?;
        let tx = map_pages(&mut stage2, &mut dom, &[p])?;
        edu.dma_to_ram(tx.iova().get(), 0, 64)
            .or_fail("stage 2 DMA")?;
        check_ok!(ctx.mem.check_pattern(p, 64, 0x2d), "stage 2 DMA");
        destroy_and_detach(&mut stage2, ctx, dom, tx)?;
    });
    teardown(&mut stage2, ctx)?;
    ctx.mem.free_dma_pages(p, 1);
    Ok(())
}

/// A stage's driver value goes out of scope (an `Smmu` has no `Drop`:
/// ending it touches no register).
fn end_stage<T>(_: T) {}
