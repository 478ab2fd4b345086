//! Device assignment on the SMMU (issue 13 item 2): a device confined to a
//! guest's memory map through a stage-2 domain (VMID = domain id; stage 1
//! on an SMMU without stage 2), and tables the hypervisor owns adopted as
//! they are.

use bare_iommu::guest::{ForeignTables, GuestDomain, GuestRegion};
use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::{DmaDirection, IoPageTable, MapAttrs, PteFormat};
use bare_iommu::smmuv3::{Smmu, SmmuConfig};
use bare_iommu::{DmaAddr, IommuBackend, PAGE_SIZE, PhysAddr, TableFormat};

use super::smmu::{
    Mem, PAGE, bring_up, domain, drain, expect_blocked_write, fault_stage, pages, teardown,
};
use crate::harness::{Ctx, Fail, OrFail};

/// Guest RAM: two pages at this GPA, each backed by its own host page.
const GPA_RAM: u64 = 0x4000_0000;
/// A third region, far from the first.
const GPA_HIGH: u64 = 0x6000_0000;
/// A GPA no region covers.
const GPA_HOLE: u64 = 0x5000_0000;

fn ram(gpa: u64, hpa: PhysAddr) -> GuestRegion {
    GuestRegion {
        gpa,
        hpa,
        len: PAGE_SIZE,
        dir: DmaDirection::Bidirectional,
        attrs: MapAttrs::empty(),
    }
}

/// Runs `body` with stage 2 when the SMMU has it, else stage 1 (noted).
fn on_stage2(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    body2: fn(&Ctx, &mut Smmu<Mem>, ArmStage2) -> Result<(), Fail>,
    body1: fn(&Ctx, &mut Smmu<Mem>, ArmStage1) -> Result<(), Fail>,
) -> Result<(), Fail> {
    if smmu.supports(TableFormat::ArmStage2) {
        body2(ctx, smmu, ArmStage2)
    } else {
        println!("  note: stage-1-only SMMU: the guest's tables are stage 1");
        body1(ctx, smmu, ArmStage1)
    }
}

/// A guest memory map of three one-page regions: edu's DMA to guest-physical
/// addresses lands in the backing host pages; a GPA outside the map is
/// blocked and the event names that GPA; a removed region is blocked as
/// soon as `remove` returns.
pub fn guest_domain_confines_dma_to_guest_memory(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    on_stage2(ctx, &mut smmu, confined::<ArmStage2>, confined::<ArmStage1>)?;
    teardown(&mut smmu, ctx)
}

fn confined<F: PteFormat>(ctx: &Ctx, smmu: &mut Smmu<Mem>, fmt: F) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let [ram0, ram1, high] = pages::<3>(ctx)?;
    let mut guest: GuestDomain<F, Mem, 4> = GuestDomain::new(domain(smmu, ctx, fmt, 21)?);
    guest
        .add_all(
            &[
                ram(GPA_RAM, ram0),
                ram(GPA_RAM + PAGE_SIZE, ram1),
                ram(GPA_HIGH, high),
            ],
            smmu,
        )
        .or_fail("guest memory map")?;
    smmu.attach(edu.id, guest.attachment()).or_fail("attach")?;
    let stage = fault_stage(F::KIND);

    ctx.mem.fill_pattern(ram0, PAGE, 0x51);
    ctx.mem.fill(ram1, PAGE, 0);
    ctx.mem.fill(high, PAGE, 0);
    edu.dma_from_ram(GPA_RAM, 0, PAGE as u32)
        .or_fail("read GPA")?;
    edu.dma_to_ram(GPA_RAM + PAGE_SIZE, 0, PAGE as u32)
        .or_fail("write GPA")?;
    edu.dma_to_ram(GPA_HIGH, 0, PAGE as u32)
        .or_fail("write high GPA")?;
    check_ok!(
        ctx.mem.check_pattern(ram1, PAGE, 0x51),
        "DMA to GPA {:#x} did not land in its host page {ram1}",
        GPA_RAM + PAGE_SIZE
    );
    check_ok!(
        ctx.mem.check_pattern(high, PAGE, 0x51),
        "DMA to GPA {GPA_HIGH:#x} did not land in its host page {high}"
    );
    check_eq!(
        drain(smmu).report.events,
        0,
        "events for DMA inside the map"
    );
    narrate!(
        "{} read GPA {GPA_RAM:#x} and wrote GPA {:#x} and {GPA_HIGH:#x}: the bytes are in host pages {ram0}, {ram1}, {high}",
        edu.id,
        GPA_RAM + PAGE_SIZE
    );

    let d = expect_blocked_write(
        ctx,
        smmu,
        edu,
        GPA_HOLE,
        PAGE as u32,
        (ram0, 0x77),
        stage,
        "DMA outside the guest map",
    )?;
    for e in &d.events {
        if let bare_iommu::smmuv3::Event::Translation(f) = e {
            check!(
                guest.region_of(f.addr).is_none(),
                "the faulting GPA {:#x} is inside the map",
                f.addr
            );
        }
    }
    narrate!("DMA to GPA {GPA_HOLE:#x} (outside the map): blocked, the event names that GPA");

    guest.remove(GPA_HIGH, smmu).or_fail("remove region")?;
    expect_blocked_write(
        ctx,
        smmu,
        edu,
        GPA_HIGH,
        PAGE as u32,
        (high, 0x78),
        stage,
        "DMA to a removed region",
    )?;
    narrate!("region at GPA {GPA_HIGH:#x} removed: the next DMA there is blocked");
    smmu.detach(edu.id).or_fail("detach")?;
    guest
        .teardown(smmu)
        .map_err(|(_, e)| e)
        .or_fail("guest teardown")
}

/// Tables the "hypervisor" built and owns (an `IoPageTable` it drives
/// itself), adopted with `ForeignTables`: edu's DMA translates through them;
/// when the owner remaps a GPA without telling the SMMU the old page is
/// still reached (the SMMU cached it), and after `changed` the new one is.
pub fn adopted_tables_translate_and_owner_changes_take_effect(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    on_stage2(ctx, &mut smmu, adopted::<ArmStage2>, adopted::<ArmStage1>)?;
    teardown(&mut smmu, ctx)
}

fn adopted<F: PteFormat>(ctx: &Ctx, smmu: &mut Smmu<Mem>, fmt: F) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let [src, old, new] = pages::<3>(ctx)?;
    let rw = MapAttrs::READ | MapAttrs::WRITE;
    let mut pt =
        IoPageTable::new(fmt, ctx.mem, 3, smmu.coherent_walk()).or_fail("owner's table")?;
    pt.map(DmaAddr(GPA_RAM), src, PAGE_SIZE, rw)
        .or_fail("owner maps src")?;
    pt.map(DmaAddr(GPA_HIGH), old, PAGE_SIZE, rw)
        .or_fail("owner maps old")?;
    // SAFETY: `pt` is a 3-level table of this format that stays allocated
    // until after the device is detached and the tag invalidated below.
    let tables = unsafe { ForeignTables::new(F::KIND, pt.root(), 3, 22) }.or_fail("adopt")?;
    smmu.attach(edu.id, tables.attachment()).or_fail("attach")?;

    ctx.mem.fill_pattern(src, PAGE, 0x62);
    ctx.mem.fill(old, PAGE, 0);
    ctx.mem.fill(new, PAGE, 0);
    edu.dma_from_ram(GPA_RAM, 0, PAGE as u32).or_fail("read")?;
    edu.dma_to_ram(GPA_HIGH, 0, PAGE as u32).or_fail("write")?;
    check_ok!(
        ctx.mem.check_pattern(old, PAGE, 0x62),
        "DMA through the adopted tables did not land"
    );

    // The owner moves GPA_HIGH to `new` (break, then make) without telling
    // the SMMU: the cached translation still reaches `old`.
    pt.unmap(DmaAddr(GPA_HIGH), PAGE_SIZE).or_fail("unmap")?;
    pt.map(DmaAddr(GPA_HIGH), new, PAGE_SIZE, rw)
        .or_fail("remap")?;
    ctx.mem.fill(old, PAGE, 0);
    edu.dma_to_ram(GPA_HIGH, 0, PAGE as u32)
        .or_fail("stale write")?;
    check!(
        ctx.mem.check_pattern(old, PAGE, 0x62).is_ok(),
        "without an invalidation the SMMU did not use its cached entry: this \
         configuration cannot show what `changed` does"
    );
    tables
        .changed(smmu, DmaAddr(GPA_HIGH), PAGE_SIZE)
        .or_fail("changed")?;
    ctx.mem.fill(old, PAGE, 0);
    edu.dma_to_ram(GPA_HIGH, 0, PAGE as u32)
        .or_fail("write after changed")?;
    check_ok!(
        ctx.mem.check_pattern(new, PAGE, 0x62),
        "after `changed` the DMA did not reach the new page"
    );
    check_ok!(
        ctx.mem.check_filled(old, PAGE, 0),
        "after `changed` the DMA still reached the old page"
    );
    check_eq!(drain(smmu).report.events, 0, "events");
    narrate!(
        "owner remapped GPA {GPA_HIGH:#x} from {old} to {new}: stale until `changed`, then the new page"
    );

    smmu.detach(edu.id).or_fail("detach")?;
    tables.changed_all(smmu).or_fail("changed_all")?;
    // SAFETY: no device is attached to the tables and everything cached for
    // the tag was invalidated and completed above.
    unsafe { pt.free_all() };
    Ok(())
}
