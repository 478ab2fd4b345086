//! Device assignment on VT-d (issue 13 item 2): a device confined to a
//! guest's memory map through a second-level domain (first level with
//! `sm fl`), and tables the hypervisor owns adopted as they are.

use bare_iommu::guest::{ForeignTables, GuestDomain, GuestRegion};
use bare_iommu::pgtable::{DmaDirection, IoPageTable, MapAttrs};
use bare_iommu::vtd::{Access, IrteTarget};
use bare_iommu::{DmaAddr, IommuBackend, PAGE_SIZE, PhysAddr};

use super::ir;
use super::vtd::{
    APERTURE_A, BoardFormat, PAGE, PAGE_U32, Unit, expect_write_blocked, first_level, free_pages,
    new_domain, no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail};
use crate::irq::COUNT_VECTORS;
use crate::memory::BoardMemory;

type Mem = &'static BoardMemory;

/// Guest RAM: two pages at this GPA, each backed by its own host page.
const GPA_RAM: u64 = 0x0400_0000;
/// A third region, far from the first.
const GPA_HIGH: u64 = 0x0800_0000;
/// A GPA no region covers.
const GPA_HOLE: u64 = 0x0600_0000;

fn ram(gpa: u64, hpa: PhysAddr) -> GuestRegion {
    GuestRegion {
        gpa,
        hpa,
        len: PAGE_SIZE,
        dir: DmaDirection::Bidirectional,
        attrs: MapAttrs::empty(),
    }
}

/// Three fresh pages.
fn three(ctx: &Ctx) -> Result<[PhysAddr; 3], Fail> {
    let pa = ctx.mem.dma_pages(3).or_fail("3 pages")?;
    Ok([
        pa,
        PhysAddr(pa.0 + PAGE_SIZE),
        PhysAddr(pa.0 + 2 * PAGE_SIZE),
    ])
}

per_format!(
    /// A guest memory map of three one-page regions: edu's DMA to
    /// guest-physical addresses lands in the backing host pages; a GPA
    /// outside the map is blocked and the fault record names that GPA; a
    /// removed region is blocked as soon as `remove` returns.
    guest_domain_confines_dma_to_guest_memory => with_unit confined
);

fn confined<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let [ram0, ram1, high] = three(ctx)?;
    let mut guest: GuestDomain<F, Mem, 4> =
        GuestDomain::new(new_domain::<F>(vtd, ctx, 21, APERTURE_A)?);
    guest
        .add_all(
            &[
                ram(GPA_RAM, ram0),
                ram(GPA_RAM + PAGE_SIZE, ram1),
                ram(GPA_HIGH, high),
            ],
            vtd,
        )
        .or_fail("guest memory map")?;
    vtd.attach(edu.id, guest.attachment()).or_fail("attach")?;

    ctx.mem.fill_pattern(ram0, PAGE, 0x51).or_fail("pattern")?;
    ctx.mem.fill(ram1, PAGE, 0).or_fail("clear")?;
    ctx.mem.fill(high, PAGE, 0).or_fail("clear")?;
    edu.dma_from_ram(GPA_RAM, 0, PAGE_U32).or_fail("read GPA")?;
    edu.dma_to_ram(GPA_RAM + PAGE_SIZE, 0, PAGE_U32)
        .or_fail("write GPA")?;
    edu.dma_to_ram(GPA_HIGH, 0, PAGE_U32)
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
    no_faults(vtd)?;
    narrate!(
        "{} read GPA {GPA_RAM:#x} and wrote GPA {:#x} and {GPA_HIGH:#x}: the bytes are in host pages {ram0}, {ram1}, {high}",
        edu.id,
        GPA_RAM + PAGE_SIZE
    );

    let unmapped = [F::unmapped(Access::Write)];
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        GPA_HOLE,
        ram0,
        &unmapped,
        "DMA outside the guest map",
    )?;
    check!(
        guest.region_of(GPA_HOLE).is_none(),
        "the hole is in the map"
    );
    narrate!("DMA to GPA {GPA_HOLE:#x} (outside the map): blocked, the record names that GPA");

    guest.remove(GPA_HIGH, vtd).or_fail("remove region")?;
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        GPA_HIGH,
        high,
        &unmapped,
        "DMA to a removed region",
    )?;
    narrate!("region at GPA {GPA_HIGH:#x} removed: the next DMA there is blocked");
    vtd.detach(edu.id).or_fail("detach")?;
    guest
        .teardown(vtd)
        .map_err(|(_, e)| e)
        .or_fail("guest teardown")?;
    free_pages(ctx, ram0, 3)
}

per_format!(
    /// Tables the "hypervisor" built and owns (an `IoPageTable` it drives
    /// itself), adopted with `ForeignTables`: edu's DMA translates through
    /// them; when the owner remaps a GPA without telling the unit the old
    /// page is still reached (the IOTLB cached it), and after `changed` the
    /// new one is.
    adopted_tables_translate_and_owner_changes_take_effect => with_unit adopted
);

fn adopted<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let [src, old, new] = three(ctx)?;
    let rw = MapAttrs::READ | MapAttrs::WRITE;
    let levels = F::levels(vtd);
    let mut pt = IoPageTable::new(F::for_unit(vtd), ctx.mem, levels, vtd.coherent_walk())
        .or_fail("owner's table")?;
    pt.map(DmaAddr(GPA_RAM), src, PAGE_SIZE, rw)
        .or_fail("owner maps src")?;
    pt.map(DmaAddr(GPA_HIGH), old, PAGE_SIZE, rw)
        .or_fail("owner maps old")?;
    // SAFETY: `pt` is a table of this format and levels that stays allocated
    // until after the device is detached and the domain-id invalidated below.
    let tables = unsafe { ForeignTables::new(F::KIND, pt.root(), levels, 22) }.or_fail("adopt")?;
    vtd.attach(edu.id, tables.attachment()).or_fail("attach")?;

    ctx.mem.fill_pattern(src, PAGE, 0x62).or_fail("pattern")?;
    ctx.mem.fill(old, PAGE, 0).or_fail("clear")?;
    ctx.mem.fill(new, PAGE, 0).or_fail("clear")?;
    edu.dma_from_ram(GPA_RAM, 0, PAGE_U32).or_fail("read")?;
    edu.dma_to_ram(GPA_HIGH, 0, PAGE_U32).or_fail("write")?;
    check_ok!(
        ctx.mem.check_pattern(old, PAGE, 0x62),
        "DMA through the adopted tables did not land"
    );

    // The owner moves GPA_HIGH to `new` (break, then make) without telling
    // the unit: the cached translation still reaches `old`.
    pt.unmap(DmaAddr(GPA_HIGH), PAGE_SIZE).or_fail("unmap")?;
    pt.map(DmaAddr(GPA_HIGH), new, PAGE_SIZE, rw)
        .or_fail("remap")?;
    ctx.mem.fill(old, PAGE, 0).or_fail("clear")?;
    edu.dma_to_ram(GPA_HIGH, 0, PAGE_U32)
        .or_fail("stale write")?;
    check!(
        ctx.mem.check_pattern(old, PAGE, 0x62).is_ok(),
        "without an invalidation the unit did not use its cached entry: this \
         configuration cannot show what `changed` does"
    );
    tables
        .changed(vtd, DmaAddr(GPA_HIGH), PAGE_SIZE)
        .or_fail("changed")?;
    ctx.mem.fill(old, PAGE, 0).or_fail("clear")?;
    edu.dma_to_ram(GPA_HIGH, 0, PAGE_U32)
        .or_fail("write after changed")?;
    check_ok!(
        ctx.mem.check_pattern(new, PAGE, 0x62),
        "after `changed` the DMA did not reach the new page"
    );
    check_ok!(
        ctx.mem.check_fill(old, PAGE, 0),
        "after `changed` the DMA still reached the old page"
    );
    no_faults(vtd)?;
    narrate!(
        "owner remapped GPA {GPA_HIGH:#x} from {old} to {new}: stale until `changed`, then the new page"
    );

    vtd.detach(edu.id).or_fail("detach")?;
    tables.changed_all(vtd).or_fail("changed_all")?;
    // SAFETY: no device is attached to the tables and everything cached for
    // the domain-id was invalidated and completed above.
    unsafe { pt.free_all() };
    free_pages(ctx, src, 3)
}

/// The hypervisor's view, end to end: two guests with the same
/// guest-physical layout backed by different host pages, one edu each
/// (00:03.0 in guest A, 00:04.0 in guest B), each edu's MSI remapped to its
/// guest's vector. Each device's DMA to the same GPAs lands in its own
/// guest's pages only; guest B's device reaching a GPA only guest A maps is
/// blocked and the fault names B's device and the GPA; each MSI arrives at
/// its guest's vector.
pub fn two_guests_are_isolated_and_their_interrupts_remapped(ctx: &mut Ctx) -> Result<(), Fail> {
    ir::with_ir(ctx, |ctx, vtd, apic| {
        if first_level(ctx) {
            two_guests::<bare_iommu::vtd::VtdFirstLevel>(ctx, vtd, apic)
        } else {
            two_guests::<bare_iommu::pgtable::vtd::VtdSecondLevel>(ctx, vtd, apic)
        }
    })
}

fn two_guests<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit, apic: u32) -> Result<(), Fail> {
    let [va, vb] = COUNT_VECTORS;
    let (ea, eb) = (&ctx.edu[0], &ctx.edu[1]);
    let [a0, a1, a_high] = three(ctx)?;
    let [b0, b1, _] = three(ctx)?;
    let mut ga: GuestDomain<F, Mem, 4> =
        GuestDomain::new(new_domain::<F>(vtd, ctx, 41, APERTURE_A)?);
    let mut gb: GuestDomain<F, Mem, 4> =
        GuestDomain::new(new_domain::<F>(vtd, ctx, 42, APERTURE_A)?);
    ga.add_all(
        &[
            ram(GPA_RAM, a0),
            ram(GPA_RAM + PAGE_SIZE, a1),
            ram(GPA_HIGH, a_high),
        ],
        vtd,
    )
    .or_fail("guest A map")?;
    gb.add_all(&[ram(GPA_RAM, b0), ram(GPA_RAM + PAGE_SIZE, b1)], vtd)
        .or_fail("guest B map")?;
    vtd.attach(ea.id, ga.attachment()).or_fail("attach A")?;
    vtd.attach(eb.id, gb.attachment()).or_fail("attach B")?;
    let ha = vtd
        .alloc_irte(ea.id, &IrteTarget::fixed(va, apic))
        .or_fail("IRTE A")?;
    let hb = vtd
        .alloc_irte(eb.id, &IrteTarget::fixed(vb, apic))
        .or_fail("IRTE B")?;
    ir::program_msi(ctx, ea.id, ha.msi())?;
    ir::program_msi(ctx, eb.id, hb.msi())?;

    ctx.mem.fill_pattern(a0, PAGE, 0xa1).or_fail("pattern")?;
    ctx.mem.fill_pattern(b0, PAGE, 0xb2).or_fail("pattern")?;
    ctx.mem.fill(a1, PAGE, 0).or_fail("clear")?;
    ctx.mem.fill(b1, PAGE, 0).or_fail("clear")?;
    for edu in [ea, eb] {
        edu.dma_from_ram(GPA_RAM, 0, PAGE_U32).or_fail("read GPA")?;
        edu.dma_to_ram(GPA_RAM + PAGE_SIZE, 0, PAGE_U32)
            .or_fail("write GPA")?;
    }
    check_ok!(
        ctx.mem.check_pattern(a1, PAGE, 0xa1),
        "guest A's copy did not land in A's page"
    );
    check_ok!(
        ctx.mem.check_pattern(b1, PAGE, 0xb2),
        "guest B's copy did not land in B's page"
    );
    no_faults(vtd)?;
    narrate!(
        "{} and {} each copied GPA {GPA_RAM:#x} to {:#x} in their own guest: {a0} -> {a1}, {b0} -> {b1}",
        ea.id,
        eb.id,
        GPA_RAM + PAGE_SIZE
    );

    expect_write_blocked(
        ctx,
        vtd,
        eb,
        GPA_HIGH,
        a_high,
        &[F::unmapped(Access::Write)],
        "guest B's device writing a GPA only guest A maps",
    )?;
    narrate!(
        "{} writing GPA {GPA_HIGH:#x} (guest A's only): blocked, recorded",
        eb.id
    );

    ir::raise(ctx, 0)?;
    check_eq!(ir::arrived()?, Some(va), "vector of guest A's device");
    ir::raise(ctx, 1)?;
    check_eq!(ir::arrived()?, Some(vb), "vector of guest B's device");
    no_faults(vtd)?;
    narrate!(
        "MSIs remapped: {} -> vector {va:#x}, {} -> vector {vb:#x}",
        ea.id,
        eb.id
    );

    vtd.free_irte(ha).or_fail("free IRTE A")?;
    vtd.free_irte(hb).or_fail("free IRTE B")?;
    vtd.detach(ea.id).or_fail("detach A")?;
    vtd.detach(eb.id).or_fail("detach B")?;
    ga.teardown(vtd)
        .map_err(|(_, e)| e)
        .or_fail("guest A teardown")?;
    gb.teardown(vtd)
        .map_err(|(_, e)| e)
        .or_fail("guest B teardown")?;
    free_pages(ctx, a0, 3)?;
    free_pages(ctx, b0, 3)
}
