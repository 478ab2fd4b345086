//! DMA protection across a hand-off between two boot stages in one image
//! (issue 12 item 5): stage 1 hands the unit off blocking every device
//! (`Vtd::hand_off`: translation on through an empty root table), a device
//! DMA started in the window lands nowhere, and stage 2 takes the unit over
//! with translation never off (`Vtd::adopt`), finds the window's fault
//! record and translates its own domain.

use bare_iommu::TableMemory;
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::vtd::{Access, FaultReason, VtdFirstLevel};

use super::vtd::{
    APERTURE_A, BoardFormat, PAGE, PAGE_U32, Unit, config, destroy_and_detach, expect_one_fault,
    expect_write_lands, first_level, free_pages, load_buffer, one_page, probe, with_unit_owned,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::memory::DRIVER_MEMORY;

const TES: u32 = 1 << 31;

/// Stage 1 (the unit every earlier test used) hands off; edu 0 writes a
/// page at its physical address in the window (it would land there were
/// translation off); stage 2 adopts. The page keeps its bytes, GSTS.TES was
/// set at both ends of the window, and stage 2 reads one fault record naming
/// edu 0, the page and a write (root entry not present), then its own
/// domain's DMA lands.
pub fn handoff_window_dma_lands_nowhere_and_next_stage_sees_the_fault(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    with_unit_owned(ctx, |stage1| {
        if first_level(ctx) {
            handoff_with::<VtdFirstLevel>(ctx, stage1)
        } else {
            handoff_with::<VtdSecondLevel>(ctx, stage1)
        }
    })
}

fn handoff_with<F: BoardFormat>(ctx: &Ctx, mut stage1: Unit) -> (Option<Unit>, Result<(), Fail>) {
    let edu = &ctx.edu[0];
    // Stage 1's last act: interrupt remapping off (its table dies with the
    // stage), then every device blocked.
    if stage1.interrupt_remapping_enabled()
        && let Err(e) = stage1.disable_interrupt_remapping()
    {
        return (Some(stage1), Err(fail_msg(format_args!("IR off: {e}"))));
    }
    let handoff = match stage1.hand_off() {
        Ok(h) => h,
        Err(e) => return (Some(stage1), Err(fail_msg(format_args!("hand_off: {e}")))),
    };
    let gsts = stage1.global_status();
    // Stage 1 ends: stage 2 knows the registers and `handoff`, nothing else
    // (a `Vtd` has no `Drop`: ending it touches no register).
    end_stage(stage1);
    narrate!(
        "stage 1 handed off: GSTS={gsts:#x}, blocking root at {}",
        handoff.root
    );

    // The window: a DMA to a physical address, as a device left running
    // (or a malicious one) would do.
    let window = (|| -> Result<_, Fail> {
        check!(gsts & TES != 0, "translation off at hand-off ({gsts:#x})");
        let target = ctx.mem.dma_pages(1).or_fail("page")?;
        ctx.mem.fill(target, PAGE, 0x66).or_fail("fill")?;
        edu.dma_to_ram(target.0, 0, PAGE_U32)
            .or_fail("edu -> RAM in the window")?;
        check_ok!(
            ctx.mem.check_fill(target, PAGE, 0x66),
            "the DMA in the hand-off window reached memory"
        );
        Ok(target)
    })();

    let mut stage2 = match probe(ctx) {
        Ok(v) => v,
        Err(e) => return (None, Err(e)),
    };
    if let Err(e) = stage2.adopt(config(ctx)) {
        return (None, Err(fail_msg(format_args!("adopt: {e}"))));
    }
    // SAFETY: `adopt` latched stage 2's root and invalidated the context
    // cache and IOTLB globally: the unit no longer reads the blocking root,
    // a page `hand_off` took from this same lender.
    unsafe { DRIVER_MEMORY.free(handoff.root, 1) };

    let r = window.and_then(|target| {
        let gsts = stage2.global_status();
        check!(gsts & TES != 0, "translation off after adopt ({gsts:#x})");
        expect_one_fault(
            &mut stage2,
            edu.id,
            target.0,
            &[
                FaultReason::RootEntryNotPresent,
                FaultReason::ContextEntryNotPresent,
            ],
            Access::Write,
        )?;
        free_pages(ctx, target, 1)?;
        // Stage 2 translates: a domain of its own carries edu 0's DMA.
        let p = one_page::<F>(&mut stage2, ctx, edu, 1, APERTURE_A)?;
        load_buffer(ctx, edu, p.pa, p.iova, 0x3c)?;
        expect_write_lands(ctx, edu, p.iova, p.pa, 0x3c, "stage 2 DMA")?;
        let pa = p.pa;
        destroy_and_detach(&mut stage2, p.dom, p.tx, edu)?;
        free_pages(ctx, pa, 1)
    });
    (Some(stage2), r)
}

/// A stage's driver value goes out of scope.
fn end_stage(_: Unit) {}
