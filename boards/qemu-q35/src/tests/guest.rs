//! Device assignment on VT-d (issue 13 item 2): a device confined to a
//! guest's memory map through a second-level domain (first level with
//! `sm fl`), and tables the hypervisor owns adopted as they are.

use bare_iommu::guest::{ForeignTables, GuestDomain, GuestRegion};
use bare_iommu::pgtable::{DmaDirection, IoPageTable, MapAttrs};
use bare_iommu::vtd::Access;
use bare_iommu::{DmaAddr, IommuBackend, PAGE_SIZE, PhysAddr};

use super::vtd::{
    APERTURE_A, BoardFormat, PAGE, PAGE_U32, Unit, expect_write_blocked, first_level, free_pages,
    new_domain, no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail};
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
