//! DMA protection across a hand-off between two boot stages in one image
//! (issue 12 item 5): stage 1 hands the unit off blocking every device
//! (`Vtd::hand_off`: translation on through an empty root table), a device
//! DMA started in the window lands nowhere, and stage 2 takes the unit over
//! with translation never off (`Vtd::adopt`), finds the window's fault
//! record and translates its own domain.

use bare_iommu::firmware::ReservedRegion;
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::vtd::{Access, FaultReason, VtdFirstLevel};
use bare_iommu::{IommuBackend, PAGE_SIZE, PhysAddr, TableMemory};

use super::vtd::{
    APERTURE_A, BoardFormat, Dom, PAGE, PAGE_U32, Unit, config, destroy_and_detach, end_domain,
    expect_one_fault, expect_write_lands, first_level, free_pages, load_buffer, new_domain,
    no_faults, one_page, probe, with_unit_owned,
};
use crate::edu::Edu;
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

/// An identity domain of `edu` over `region` (`id`), attached.
fn identity_domain<F: BoardFormat>(
    vtd: &mut Unit,
    ctx: &Ctx,
    edu: &Edu,
    id: u16,
    region: ReservedRegion,
) -> Result<Dom<F>, Fail> {
    let mut dom = new_domain::<F>(vtd, ctx, id, (0x10_0000, 1 << 32))?;
    dom.install_identity_regions(&[region], vtd)
        .or_fail("install identity region")?;
    vtd.attach(edu.id, dom.attachment()).or_fail("attach")?;
    Ok(dom)
}

/// Identity regions kept across the hand-off: stage 1 leaves edu 0 attached
/// to an identity domain over page X (an RMRR-style region) and hands off
/// with `hand_off_keeping_attached`. In the window edu's DMA to X lands and
/// its DMA to page Y (not in the region) does not; stage 2 (`adopt_begin`,
/// its own identity domain over X, `adopt_finish`) keeps X working through
/// the swap with TE never clear, and reads Y's fault record.
pub fn handoff_keeping_identity_region_keeps_its_dma_and_blocks_the_rest(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    with_unit_owned(ctx, |stage1| {
        if first_level(ctx) {
            keep_with::<VtdFirstLevel>(ctx, stage1)
        } else {
            keep_with::<VtdSecondLevel>(ctx, stage1)
        }
    })
}

fn keep_with<F: BoardFormat>(ctx: &Ctx, mut stage1: Unit) -> (Option<Unit>, Result<(), Fail>) {
    let edu = &ctx.edu[0];
    let Some(pa) = ctx.mem.dma_pages(2) else {
        return (Some(stage1), Err(fail_msg(format_args!("no DMA pages"))));
    };
    let (x, y) = (pa, PhysAddr(pa.0 + PAGE_SIZE));
    let region = ReservedRegion {
        base: x.0,
        len: PAGE_SIZE,
    };
    if stage1.interrupt_remapping_enabled()
        && let Err(e) = stage1.disable_interrupt_remapping()
    {
        return (Some(stage1), Err(fail_msg(format_args!("IR off: {e}"))));
    }
    let dom1 = match identity_domain::<F>(&mut stage1, ctx, edu, 7, region) {
        Ok(d) => d,
        Err(e) => return (Some(stage1), Err(e)),
    };
    let handoff = match stage1.hand_off_keeping_attached() {
        Ok(h) => h,
        Err(e) => return (Some(stage1), Err(fail_msg(format_args!("hand_off: {e}")))),
    };
    end_stage(stage1);

    let window = (|| -> Result<(), Fail> {
        ctx.mem.fill_pattern(x, PAGE, 0x71).or_fail("pattern")?;
        edu.dma_from_ram(x.0, 0, PAGE_U32)
            .or_fail("RAM -> edu in the window")?;
        ctx.mem.fill(x, PAGE, 0).or_fail("clear X")?;
        ctx.mem.fill(y, PAGE, 0x66).or_fail("fill Y")?;
        edu.dma_to_ram(x.0, 0, PAGE_U32)
            .or_fail("edu -> X in the window")?;
        edu.dma_to_ram(y.0, 0, PAGE_U32)
            .or_fail("edu -> Y in the window")?;
        check_ok!(
            ctx.mem.check_pattern(x, PAGE, 0x71),
            "the kept region's DMA in the window"
        );
        check_ok!(
            ctx.mem.check_fill(y, PAGE, 0x66),
            "a DMA outside the kept region reached memory in the window"
        );
        Ok(())
    })();

    let mut stage2 = match probe(ctx) {
        Ok(v) => v,
        Err(e) => return (None, Err(e)),
    };
    if let Err(e) = stage2.adopt_begin(config(ctx)) {
        return (None, Err(fail_msg(format_args!("adopt_begin: {e}"))));
    }
    let r = window.and_then(|()| {
        let dom2 = identity_domain::<F>(&mut stage2, ctx, edu, 8, region)?;
        stage2.adopt_finish().or_fail("adopt_finish")?;
        let gsts = stage2.global_status();
        check!(gsts & TES != 0, "translation off after adopt ({gsts:#x})");
        // Stage 1's tables are not walked any more: its memory is free
        // (here: its domain goes back to the shared lender).
        end_domain(&mut stage2, dom1)?;
        expect_one_fault(
            &mut stage2,
            edu.id,
            y.0,
            &[F::unmapped(Access::Write)],
            Access::Write,
        )?;
        ctx.mem.fill(x, PAGE, 0).or_fail("clear X")?;
        edu.dma_to_ram(x.0, 0, PAGE_U32)
            .or_fail("edu -> X after adopt")?;
        check_ok!(
            ctx.mem.check_pattern(x, PAGE, 0x71),
            "the kept region's DMA after adopt"
        );
        no_faults(&mut stage2)?;
        stage2.detach(edu.id).or_fail("detach")?;
        end_domain(&mut stage2, dom2)?;
        free_pages(ctx, pa, 2)
    });
    if r.is_err() {
        // Maybe half adopted: the next test starts from a fresh `init`, and
        // stage 1's root (perhaps still walked) stays lent.
        return (None, r);
    }
    // SAFETY: after adopt_finish the unit walks stage 2's root only; stage
    // 1's root came from this same lender.
    unsafe { DRIVER_MEMORY.free(handoff.root, 1) };
    (Some(stage2), r)
}
