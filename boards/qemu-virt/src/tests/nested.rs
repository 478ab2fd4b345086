//! SMMUv3 nested translation (issue 13 item 3): a "guest" owns a CD and
//! stage-1 tables in its intermediate-physical (IPA) space; the
//! "hypervisor" owns the stage-2 domain (a `GuestDomain`) that maps the
//! guest's IPAs to host pages. The guest's table pages sit at
//! IPA = HPA + `GUEST_OFFSET` (so every stage-1 table walk and the CD fetch
//! go through stage 2 too); its data pages at IPAs unrelated to their HPAs.
//!
//! Runs on SMMUs with both stages (configurations (a) and (d)); the others
//! print a note and pass.

use core::cell::RefCell;

use bare_iommu::guest::{GuestDomain, GuestRegion};
use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::{DmaDirection, IoPageTable, MapAttrs};
use bare_iommu::smmuv3::{Command, Event, GuestCdTable, Smmu, SmmuConfig, Stage};
use bare_iommu::{DmaAddr, DomainInfo, IommuBackend, PAGE_SIZE, PhysAddr, TableMemory};

use super::smmu::{Mem, PAGE, bring_up, domain, drain, expect_translation_fault, teardown};
use crate::harness::{Ctx, Fail, OrFail};
use crate::memory::BoardMemory;

/// VMID of the hypervisor's stage 2; ASID of the guest's stage 1.
const VMID: u16 = 31;
const ASID: u16 = 9;
/// Guest-owned table pages: IPA = HPA + this.
const GUEST_OFFSET: u64 = 0x10_0000_0000;
/// Guest data pages (IPAs), each backed by a host page elsewhere.
const IPA_SRC: u64 = 0x20_0000_0000;
const IPA_DST: u64 = 0x20_0000_1000;
const IPA_DST2: u64 = 0x20_0000_2000;
/// An IPA stage 2 does not map.
const IPA_HOLE: u64 = 0x20_0010_0000;
/// Guest IOVAs, all in one stage-1 leaf table.
const IOVA_SRC: u64 = 0x1000_0000;
const IOVA_DST: u64 = 0x1000_1000;
/// Not mapped by the guest's stage 1.
const IOVA_NOMAP: u64 = 0x1000_2000;
/// Mapped by stage 1 to `IPA_HOLE`.
const IOVA_S2HOLE: u64 = 0x1000_3000;
/// Blocks a [`GuestMem`] may have lent at once.
const LENT: usize = 24;
/// Bytes per DMA (a faulting DMA makes one event per 4 bytes on QEMU).
const LEN: u32 = 64;

/// The guest's memory as its own page tables see it: pages lent by the
/// board, addressed by IPA. Remembers what it lent, so the hypervisor can
/// map each page in stage 2. Room for two 3-level table sets.
struct GuestMem {
    mem: &'static BoardMemory,
    lent: RefCell<heapless::Vec<(PhysAddr, usize), LENT>>,
}

impl GuestMem {
    fn new(mem: &'static BoardMemory) -> Self {
        Self {
            mem,
            lent: RefCell::new(heapless::Vec::new()),
        }
    }

    fn hpa(ipa: PhysAddr) -> PhysAddr {
        PhysAddr(ipa.get().wrapping_sub(GUEST_OFFSET))
    }
}

// SAFETY: zeroed DMA pages aligned to their (power-of-two) size, valid until
// freed; an IPA turns into the page's address by subtracting GUEST_OFFSET.
unsafe impl TableMemory for GuestMem {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let hpa = self.mem.dma_pages(pages)?;
        if self.lent.borrow_mut().push((hpa, pages)).is_err() {
            self.mem.free_dma_pages(hpa, pages);
            return None;
        }
        Some(PhysAddr(hpa.get() + GUEST_OFFSET))
    }
    unsafe fn free(&self, ipa: PhysAddr, pages: usize) {
        let hpa = Self::hpa(ipa);
        self.lent.borrow_mut().retain(|&(p, _)| p != hpa);
        self.mem.free_dma_pages(hpa, pages);
    }
    fn phys_to_virt(&self, ipa: PhysAddr) -> *mut u8 {
        self.mem.phys_to_virt(Self::hpa(ipa))
    }
    fn clean(&self, ipa: PhysAddr, len: usize) {
        self.mem.clean(Self::hpa(ipa), len)
    }
}

fn page(gpa: u64, hpa: PhysAddr) -> GuestRegion {
    GuestRegion {
        gpa,
        hpa,
        len: PAGE_SIZE,
        dir: DmaDirection::Bidirectional,
        attrs: MapAttrs::empty(),
    }
}

/// One nested setup: edu 0 translated by the guest's stage 1 (IOVA → IPA)
/// and the hypervisor's stage 2 (IPA → HPA).
struct Nested<'g> {
    s2: GuestDomain<ArmStage2, Mem, 32>,
    s2_info: DomainInfo,
    s1: IoPageTable<ArmStage1, &'g GuestMem>,
    cd_ipa: PhysAddr,
    gm: &'g GuestMem,
    /// Host pages behind IPA_SRC, IPA_DST, IPA_DST2.
    src: PhysAddr,
    dst: PhysAddr,
    dst2: PhysAddr,
}

/// `Ok(None)` (with a printed note) when the SMMU cannot nest.
fn set_up<'g>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    gm: &'g GuestMem,
) -> Result<Option<Nested<'g>>, Fail> {
    if !smmu.supports_nested() {
        println!("  note: this SMMU lacks stage 1 or stage 2 (IDR0.S1P/S2P): no nesting to test");
        check!(
            smmu.attach_nested(0x28, &dummy_s2(), &GuestCdTable::single(0))
                .is_err(),
            "attach_nested accepted on an SMMU without both stages"
        );
        return Ok(None);
    }
    let edu = &ctx.edu[0];
    let [src, dst, dst2] = super::smmu::pages::<3>(ctx)?;
    let rw = MapAttrs::READ | MapAttrs::WRITE;

    // The guest: a CD page and stage-1 tables, in its IPA space.
    let cd_ipa = gm.alloc_zeroed(1).or_fail("guest CD page")?;
    let mut s1 = IoPageTable::new(ArmStage1, gm, 3, smmu.coherent_walk()).or_fail("guest s1")?;
    for (iova, ipa) in [
        (IOVA_SRC, IPA_SRC),
        (IOVA_DST, IPA_DST),
        (IOVA_S2HOLE, IPA_HOLE),
    ] {
        s1.map(DmaAddr(iova), PhysAddr(ipa), PAGE_SIZE, rw)
            .or_fail("guest maps")?;
    }

    // The hypervisor: stage 2 maps the guest's data pages and every page
    // the guest's structures live in (CD, stage-1 tables).
    let mut s2: GuestDomain<ArmStage2, Mem, 32> =
        GuestDomain::new(domain(smmu, ctx, ArmStage2, VMID)?);
    for r in [page(IPA_SRC, src), page(IPA_DST, dst), page(IPA_DST2, dst2)] {
        s2.add(r).or_fail("stage 2 data page")?;
    }
    let lent: heapless::Vec<(PhysAddr, usize), LENT> = gm.lent.borrow().clone();
    for (hpa, _) in lent {
        s2.add(page(hpa.get() + GUEST_OFFSET, hpa))
            .or_fail("stage 2 guest table page")?;
    }
    s2.sync(smmu).or_fail("stage 2 sync")?;
    let s2_info = s2.domain().info().or_fail("stage 2 info")?;

    // The guest writes its CD into its own memory.
    let cd = smmu
        .guest_context_descriptor(&s2_info, ASID, s1.root().get(), 3)
        .or_fail("guest CD")?;
    let mut bytes = [0u8; 64];
    for (i, w) in cd.0.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    ctx.mem.write(GuestMem::hpa(cd_ipa), &bytes);

    smmu.attach_nested(
        edu.id.stream_id(),
        &s2_info,
        &GuestCdTable::single(cd_ipa.get()),
    )
    .or_fail("attach_nested")?;
    check!(smmu.is_nested_vmid(VMID), "VMID not recorded as nested");
    Ok(Some(Nested {
        s2,
        s2_info,
        s1,
        cd_ipa,
        gm,
        src,
        dst,
        dst2,
    }))
}

fn dummy_s2() -> DomainInfo {
    DomainInfo {
        id: VMID,
        root: PhysAddr(0x4000_0000),
        format: bare_iommu::TableFormat::ArmStage2,
        levels: 3,
        ias_bits: 39,
    }
}

impl Nested<'_> {
    fn end(self, ctx: &Ctx, smmu: &mut Smmu<Mem>) -> Result<(), Fail> {
        smmu.detach(ctx.edu[0].id).or_fail("detach")?;
        check!(!smmu.is_nested_vmid(VMID), "VMID still nested after detach");
        self.s2
            .teardown(smmu)
            .map_err(|(_, e)| e)
            .or_fail("stage 2 teardown")?;
        // SAFETY: the stream is detached and everything tagged with the
        // VMID (both stages) was invalidated by the teardown above.
        unsafe {
            self.s1.free_all();
            self.gm.free(self.cd_ipa, 1);
        }
        Ok(())
    }
}

/// `edu` reads `LEN` bytes at `src` and writes them to `dst` (both IOVAs).
fn copy(ctx: &Ctx, src: u64, dst: u64) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    edu.dma_from_ram(src, 0, LEN).or_fail("edu read")?;
    edu.dma_to_ram(dst, 0, LEN).or_fail("edu write")
}

/// A DMA through both stages lands in the host page stage 2 gives the IPA
/// stage 1 gives the IOVA; an IOVA the guest did not map faults in stage 1
/// (S2 = 0, the IOVA); an IPA the hypervisor did not map faults in stage 2
/// (S2 = 1, the IOVA as input address and the IPA in the record).
pub fn nested_dma_translates_through_both_stages_and_faults_name_the_stage(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let gm = GuestMem::new(ctx.mem);
    let Some(n) = set_up(ctx, &mut smmu, &gm)? else {
        return teardown(&mut smmu, ctx);
    };
    let sid = ctx.edu[0].id.stream_id();
    check!(
        n.dst.get() != IPA_DST && n.src.get() != IPA_SRC,
        "data pages must not be identity mapped"
    );
    ctx.mem.fill_pattern(n.src, PAGE, 0x3c);
    ctx.mem.fill(n.dst, PAGE, 0);
    copy(ctx, IOVA_SRC, IOVA_DST)?;
    check_ok!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x3c),
        "IOVA {IOVA_DST:#x} -> IPA {IPA_DST:#x} -> {} did not receive the DMA",
        n.dst
    );
    check_eq!(drain(&mut smmu).report.events, 0, "events for mapped DMA");
    narrate!(
        "IOVA {IOVA_DST:#x} -> (guest stage 1) IPA {IPA_DST:#x} -> (stage 2) {}: the bytes landed there",
        n.dst
    );

    // Stage-1 fault: the guest's tables do not map the IOVA.
    let _ = drain(&mut smmu);
    ctx.edu[0]
        .dma_to_ram(IOVA_NOMAP, 0, LEN)
        .or_fail("stage-1 fault DMA")?;
    let d = drain(&mut smmu);
    expect_translation_fault(
        &d,
        sid,
        IOVA_NOMAP,
        IOVA_NOMAP + u64::from(LEN),
        Stage::Stage1,
    )?;
    narrate!("IOVA {IOVA_NOMAP:#x} unmapped in the guest's stage 1: F_TRANSLATION, S2 = 0");

    // Stage-2 fault: stage 1 gives IPA_HOLE, which stage 2 does not map.
    ctx.mem.fill(n.dst, PAGE, 0x11);
    ctx.edu[0]
        .dma_to_ram(IOVA_S2HOLE, 0, LEN)
        .or_fail("stage-2 fault DMA")?;
    let d = drain(&mut smmu);
    expect_translation_fault(
        &d,
        sid,
        IOVA_S2HOLE,
        IOVA_S2HOLE + u64::from(LEN),
        Stage::Stage2,
    )?;
    for e in &d.events {
        if let Event::Translation(f) = e {
            check_eq!(f.ipa, IPA_HOLE, "stage-2 fault IPA");
            // QEMU: a fault translating the stage-1 output is CLASS_IN.
            check_eq!(f.class, 2, "stage-2 fault CLASS (IN)");
        }
    }
    check_ok!(
        ctx.mem.check_filled(n.dst, PAGE, 0x11),
        "the faulting DMA reached memory"
    );
    narrate!(
        "IOVA {IOVA_S2HOLE:#x} -> IPA {IPA_HOLE:#x} unmapped in stage 2: F_TRANSLATION, S2 = 1, IPA {IPA_HOLE:#x}"
    );
    n.end(ctx, &mut smmu)?;
    teardown(&mut smmu, ctx)
}

/// The guest remaps an IOVA in its stage 1: without an invalidation the
/// SMMU keeps using its cached entry; after CMD_TLBI_NH_VA tagged with the
/// VMID and CMD_SYNC the DMA reaches the new page.
pub fn nested_stage1_change_takes_effect_after_the_guest_invalidation(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let gm = GuestMem::new(ctx.mem);
    let Some(mut n) = set_up(ctx, &mut smmu, &gm)? else {
        return teardown(&mut smmu, ctx);
    };
    ctx.mem.fill_pattern(n.src, PAGE, 0x4d);
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.mem.fill(n.dst2, PAGE, 0);
    copy(ctx, IOVA_SRC, IOVA_DST)?;
    check_ok!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x4d),
        "first DMA missed its page"
    );

    // The guest moves IOVA_DST to IPA_DST2 (break, then make) and tells no one.
    let rw = MapAttrs::READ | MapAttrs::WRITE;
    n.s1.unmap(DmaAddr(IOVA_DST), PAGE_SIZE).or_fail("unmap")?;
    n.s1.map(DmaAddr(IOVA_DST), PhysAddr(IPA_DST2), PAGE_SIZE, rw)
        .or_fail("remap")?;
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("stale DMA")?;
    check!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x4d).is_ok(),
        "without an invalidation the SMMU did not use its cached stage-1 entry: \
         this test could not catch a missing one"
    );
    narrate!(
        "guest remapped IOVA {IOVA_DST:#x} without TLBI: DMA still reached {}",
        n.dst
    );

    let before = smmu.stats().commands;
    smmu.invalidate_guest_va(VMID, ASID, DmaAddr(IOVA_DST), PAGE_SIZE, true)
        .or_fail("guest TLBI")?;
    smmu.sync_commands().or_fail("sync")?;
    let after = smmu.stats().commands;
    check_eq!(after.tlbi_nh_va - before.tlbi_nh_va, 1, "TLBI_NH_VA count");
    check_eq!(after.sync - before.sync, 1, "CMD_SYNC count");
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("DMA after TLBI")?;
    check_ok!(
        ctx.mem.check_pattern(n.dst2, LEN as usize, 0x4d),
        "after TLBI_NH_VA (VMID {VMID}, ASID {ASID}) the DMA missed the new page"
    );
    check_ok!(
        ctx.mem.check_filled(n.dst, PAGE, 0),
        "after TLBI_NH_VA the DMA still reached the old page"
    );
    check_eq!(drain(&mut smmu).report.events, 0, "events");
    narrate!(
        "after TLBI_NH_VA + CMD_SYNC: the DMA reached {} (IPA {IPA_DST2:#x})",
        n.dst2
    );
    n.end(ctx, &mut smmu)?;
    teardown(&mut smmu, ctx)
}

/// The hypervisor moves an IPA to another host page: without an
/// invalidation the cached (combined) entry is used; CMD_TLBI_S2_IPA alone
/// does not remove it (QEMU, like the architecture, caches stage 1 and 2
/// combined under the ASID/VMID); the driver's stage-2 invalidation
/// (TLBI_S2_IPA, CMD_SYNC, TLBI_NH_ALL of the VMID, CMD_SYNC) does.
pub fn nested_stage2_change_takes_effect_after_s2_and_stage1_flush(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let gm = GuestMem::new(ctx.mem);
    let Some(mut n) = set_up(ctx, &mut smmu, &gm)? else {
        return teardown(&mut smmu, ctx);
    };
    let [dst3] = super::smmu::pages::<1>(ctx)?;
    ctx.mem.fill_pattern(n.src, PAGE, 0x6e);
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.mem.fill(dst3, PAGE, 0);
    copy(ctx, IOVA_SRC, IOVA_DST)?;
    check_ok!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x6e),
        "first DMA missed its page"
    );

    // The hypervisor moves IPA_DST to dst3 without any invalidation.
    let mut forgetful = board_common::forgetful::ForgetsInvalidation(&mut smmu);
    n.s2.remove(IPA_DST, &mut forgetful)
        .or_fail("remove without TLBI")?;
    n.s2.add(page(IPA_DST, dst3)).or_fail("re-add")?;
    n.s2.sync(&mut forgetful).or_fail("sync without TLBI")?;
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("stale DMA")?;
    check!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x6e).is_ok(),
        "without an invalidation the SMMU did not use its cached entry: \
         this test could not catch a missing one"
    );

    // TLBI_S2_IPA alone (what a driver unaware of nesting would send).
    smmu.queue_command(Command::tlbi_s2_ipa(VMID, IPA_DST, true, None))
        .or_fail("TLBI_S2_IPA")?;
    smmu.sync_commands().or_fail("sync")?;
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("DMA after S2_IPA only")?;
    check!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x6e).is_ok(),
        "TLBI_S2_IPA alone removed the combined entry: this test could not \
         catch a missing stage-1 flush"
    );
    narrate!(
        "stage 2 remapped IPA {IPA_DST:#x}: stale without TLBI, still stale after TLBI_S2_IPA alone"
    );

    // The driver's stage-2 invalidation, as GuestDomain::remove issues it.
    let before = smmu.stats().commands;
    smmu.invalidate(&n.s2_info, DmaAddr(IPA_DST), PAGE_SIZE, true)
        .or_fail("stage-2 invalidate")?;
    IommuBackend::sync(&mut smmu).or_fail("sync")?;
    let after = smmu.stats().commands;
    check_eq!(
        after.tlbi_s2_ipa - before.tlbi_s2_ipa,
        1,
        "TLBI_S2_IPA count"
    );
    check_eq!(
        after.tlbi_nh_all - before.tlbi_nh_all,
        1,
        "TLBI_NH_ALL count"
    );
    check_eq!(after.sync - before.sync, 2, "CMD_SYNC count");
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("DMA after the driver's invalidation")?;
    check_ok!(
        ctx.mem.check_pattern(dst3, LEN as usize, 0x6e),
        "after the driver's stage-2 invalidation the DMA missed the new page"
    );
    check_ok!(
        ctx.mem.check_filled(n.dst, PAGE, 0),
        "after the driver's stage-2 invalidation the DMA still reached the old page"
    );
    check_eq!(drain(&mut smmu).report.events, 0, "events");
    narrate!(
        "TLBI_S2_IPA + CMD_SYNC + TLBI_NH_ALL(VMID {VMID}) + CMD_SYNC: the DMA reached {dst3}"
    );
    n.end(ctx, &mut smmu)?;
    teardown(&mut smmu, ctx)
}

/// The guest points its CD at new stage-1 tables under a new ASID: the SMMU
/// keeps the CD it cached until CMD_CFGI_CD (+ CMD_SYNC), then walks the new
/// tables.
pub fn nested_guest_cd_change_takes_effect_after_cfgi_cd(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let gm = GuestMem::new(ctx.mem);
    let Some(mut n) = set_up(ctx, &mut smmu, &gm)? else {
        return teardown(&mut smmu, ctx);
    };
    let sid = ctx.edu[0].id.stream_id();
    ctx.mem.fill_pattern(n.src, PAGE, 0x27);
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.mem.fill(n.dst2, PAGE, 0);
    copy(ctx, IOVA_SRC, IOVA_DST)?;
    check_ok!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x27),
        "first DMA missed its page"
    );

    // The guest builds a second set of tables (IOVA_DST -> IPA_DST2); the
    // hypervisor maps their pages in stage 2 (new entries: no invalidation).
    let before: heapless::Vec<(PhysAddr, usize), LENT> = gm.lent.borrow().clone();
    let rw = MapAttrs::READ | MapAttrs::WRITE;
    let mut s1b =
        IoPageTable::new(ArmStage1, &gm, 3, smmu.coherent_walk()).or_fail("second tables")?;
    s1b.map(DmaAddr(IOVA_DST), PhysAddr(IPA_DST2), PAGE_SIZE, rw)
        .or_fail("second tables map")?;
    let now: heapless::Vec<(PhysAddr, usize), LENT> = gm.lent.borrow().clone();
    for (hpa, _) in now.iter().filter(|p| !before.contains(p)) {
        n.s2.add(page(hpa.get() + GUEST_OFFSET, *hpa))
            .or_fail("stage 2 maps the new table page")?;
    }
    n.s2.sync(&mut smmu).or_fail("stage 2 sync")?;

    // The guest rewrites its CD: new ASID, new TTB0.
    let cd = smmu
        .guest_context_descriptor(&n.s2_info, ASID + 1, s1b.root().get(), 3)
        .or_fail("new CD")?;
    let mut bytes = [0u8; 64];
    for (i, w) in cd.0.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    ctx.mem.write(GuestMem::hpa(n.cd_ipa), &bytes);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("DMA before CFGI_CD")?;
    check!(
        ctx.mem.check_pattern(n.dst, LEN as usize, 0x27).is_ok(),
        "without CFGI_CD the SMMU did not use its cached CD: this test could \
         not catch a missing one"
    );
    narrate!(
        "guest rewrote its CD (ASID {}, new tables): the SMMU still used the cached one",
        ASID + 1
    );

    let before = smmu.stats().commands;
    smmu.invalidate_guest_cd(sid, 0).or_fail("CFGI_CD")?;
    // The old ASID's entries are the guest's to drop too.
    smmu.invalidate_guest_asid(VMID, ASID)
        .or_fail("TLBI_NH_ASID")?;
    smmu.sync_commands().or_fail("sync")?;
    let after = smmu.stats().commands;
    check_eq!(after.cfgi_cd - before.cfgi_cd, 1, "CFGI_CD count");
    ctx.mem.fill(n.dst, PAGE, 0);
    ctx.edu[0]
        .dma_to_ram(IOVA_DST, 0, LEN)
        .or_fail("DMA after CFGI_CD")?;
    check_ok!(
        ctx.mem.check_pattern(n.dst2, LEN as usize, 0x27),
        "after CFGI_CD the DMA did not go through the new tables"
    );
    check_ok!(
        ctx.mem.check_filled(n.dst, PAGE, 0),
        "after CFGI_CD the DMA still used the old tables"
    );
    check_eq!(drain(&mut smmu).report.events, 0, "events");
    narrate!(
        "after CFGI_CD + CMD_SYNC: the new CD's tables sent the DMA to {}",
        n.dst2
    );
    let old_s1 = core::mem::replace(&mut n.s1, s1b);
    n.end(ctx, &mut smmu)?;
    // SAFETY: the stream was detached and the VMID invalidated by `end`.
    unsafe { old_s1.free_all() };
    teardown(&mut smmu, ctx)
}
