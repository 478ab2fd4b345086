//! SMMUv3 driver tests: probe, stream tables, the two-step API through the
//! SMMU with the edu devices' DMA, faults, isolation, 2 MiB blocks, event
//! queue overflow, command errors and command counts.
//!
//! Every test brings the SMMU up itself and shuts it down at the end, so the
//! tests are independent of each other. Translated domains use the stage the
//! SMMU supports (stage 1 when present, else stage 2), so the main path runs
//! on all three QEMU configurations.

use bare_iommu::addr::PAGE_SIZE;
use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::{DmaDirection, MapAttrs, PteFormat};
use bare_iommu::shared::SharedDomain;
use bare_iommu::smmuv3::{
    Command, CommandErrorCode, Event, EventReport, Smmu, SmmuConfig, SmmuError, Stage,
    StreamTableChoice, StreamTableFormat,
};
use bare_iommu::state::{Domain, DomainConfig, IovaState};
use bare_iommu::{Attachment, DmaAddr, IommuBackend, PhysAddr, TableFormat};

use crate::edu::Edu;
use crate::harness::{Ctx, Fail, OrFail};
use crate::memory::BoardMemory;

pub(super) type Mem = &'static BoardMemory;
pub(super) type Dom<F> = Domain<F, Mem>;

pub(super) const PAGE: usize = PAGE_SIZE as usize;
/// edu emits 64-bit addresses (`dma_mask=0xffff_ffff_ffff_ffff` on the command line).
const DMA_MASK: u64 = u64::MAX;
/// IOVAs handed out start here (not at 0, so a zero address is never valid).
const APERTURE_START: u64 = 0x10_0000;

/// Events kept by [`drain`] (the count is exact, the list is cut).
const KEEP: usize = 16;

/// What the event queue held.
pub(super) struct Drained {
    pub(super) events: heapless::Vec<Event, KEEP>,
    pub(super) report: EventReport,
}

pub(super) fn drain(smmu: &mut Smmu<Mem>) -> Drained {
    let mut events = heapless::Vec::new();
    let mut report = EventReport::default();
    // A few rounds: one poll takes at most one queue's worth.
    for _ in 0..8 {
        let r = smmu.poll_events(|e| {
            let _ = events.push(e);
        });
        report.events += r.events;
        report.overflow |= r.overflow;
        report.gerror |= r.gerror;
        if r.events == 0 {
            break;
        }
    }
    Drained { events, report }
}

pub(super) fn bring_up(ctx: &Ctx, config: SmmuConfig) -> Result<Smmu<Mem>, Fail> {
    // SAFETY: `smmu_base` is the board's SMMUv3 (both register pages mapped,
    // MMU off), and no other test holds a driver for it while this one runs.
    let mut smmu = unsafe { Smmu::new(ctx.smmu_base, ctx.mem) }.or_fail("SMMU probe")?;
    smmu.init(config).or_fail("SMMU init")?;
    Ok(smmu)
}

pub(super) fn domain<F: PteFormat>(
    smmu: &Smmu<Mem>,
    ctx: &Ctx,
    fmt: F,
    id: u16,
) -> Result<Dom<F>, Fail> {
    domain_in(smmu, ctx.mem, fmt, id)
}

/// [`domain`] with its table pages from `mem`.
pub(super) fn domain_in<F: PteFormat>(
    smmu: &Smmu<Mem>,
    mem: Mem,
    fmt: F,
    id: u16,
) -> Result<Dom<F>, Fail> {
    levels_in(smmu, mem, fmt, id, 3)
}

/// A domain with a `levels`-level table; IOVAs stay below the SMMU's output
/// size (a stage-2 input is capped by it).
fn domain_with_levels<F: PteFormat>(
    smmu: &Smmu<Mem>,
    ctx: &Ctx,
    fmt: F,
    id: u16,
    levels: u8,
) -> Result<Dom<F>, Fail> {
    levels_in(smmu, ctx.mem, fmt, id, levels)
}

fn levels_in<F: PteFormat>(
    smmu: &Smmu<Mem>,
    mem: Mem,
    fmt: F,
    id: u16,
    levels: u8,
) -> Result<Dom<F>, Fail> {
    let bits = (12 + 9 * u32::from(levels)).min(u32::from(smmu.features().oas_bits));
    Domain::new(
        fmt,
        mem,
        DomainConfig {
            id,
            levels,
            aperture_start: APERTURE_START,
            aperture_end: 1 << bits,
            coherent_walk: smmu.coherent_walk(),
        },
    )
    .or_fail("domain")
}

pub(super) fn alloc<F: PteFormat>(dom: &mut Dom<F>, size: u64) -> Result<IovaState, Fail> {
    dom.try_alloc(size, DMA_MASK)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated transaction")
}

/// `N` fresh single DMA buffer pages.
pub(super) fn pages<const N: usize>(ctx: &Ctx) -> Result<[PhysAddr; N], Fail> {
    let mut pages = [PhysAddr(0); N];
    for p in pages.iter_mut() {
        *p = ctx.mem.dma_pages(1).or_fail("page")?;
    }
    Ok(pages)
}

/// A domain (format `fmt`, ID `id`) with `edu` attached to it.
pub(super) fn attached_domain<F: PteFormat>(
    smmu: &mut Smmu<Mem>,
    ctx: &Ctx,
    fmt: F,
    id: u16,
    edu: &Edu,
) -> Result<Dom<F>, Fail> {
    let dom = domain(smmu, ctx, fmt, id)?;
    smmu.attach(edu.id, dom.attachment()).or_fail("attach")?;
    Ok(dom)
}

/// Links `pages` read-write, one after another, from IOVA page `first` of `tx`.
fn link_pages<F: PteFormat>(
    dom: &mut Dom<F>,
    tx: &mut IovaState,
    first: u64,
    pages: &[PhysAddr],
) -> Result<(), Fail> {
    for (i, &p) in pages.iter().enumerate() {
        let off = (first + i as u64) * PAGE_SIZE;
        dom.link(
            tx,
            p,
            off,
            PAGE_SIZE,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
        )
        .or_fail("link")?;
    }
    Ok(())
}

/// A transaction of `pages.len()` IOVA pages, page `i` linked to `pages[i]`,
/// synced.
pub(super) fn map_pages<F: PteFormat>(
    smmu: &mut Smmu<Mem>,
    dom: &mut Dom<F>,
    pages: &[PhysAddr],
) -> Result<IovaState, Fail> {
    let mut tx = alloc(dom, pages.len() as u64 * PAGE_SIZE)?;
    link_pages(dom, &mut tx, 0, pages)?;
    dom.sync(smmu).or_fail("sync")?;
    Ok(tx)
}

/// Destroys the transaction, returns both devices to abort and ends the
/// domain ([`end_domain`]): no table page of it stays lent.
pub(super) fn destroy_and_detach<F: PteFormat>(
    smmu: &mut Smmu<Mem>,
    ctx: &Ctx,
    mut dom: Dom<F>,
    tx: IovaState,
) -> Result<(), Fail> {
    dom.destroy(tx, smmu).or_fail("destroy")?;
    detach_all(smmu, ctx)?;
    end_domain(smmu, dom)
}

/// Ends a domain no device is attached to any more: the SMMU drops what it
/// cached for it (TLBI by ASID/VMID + CMD_SYNC) and every table page goes
/// back to the lender.
pub(super) fn end_domain<F: PteFormat>(smmu: &mut Smmu<Mem>, dom: Dom<F>) -> Result<(), Fail> {
    dom.teardown(smmu)
        .map_err(|(_, e)| e)
        .or_fail("domain teardown")
}

fn at(iova: DmaAddr, off: u64) -> u64 {
    iova.get() + off
}

fn stage_name(format: TableFormat) -> &'static str {
    match format {
        TableFormat::ArmStage1 => "stage 1",
        TableFormat::ArmStage2 => "stage 2",
        _ => "?",
    }
}

/// Returns both devices to abort: done before a domain is dropped, so no
/// STE points at freed tables.
pub(super) fn detach_all(smmu: &mut Smmu<Mem>, ctx: &Ctx) -> Result<(), Fail> {
    for edu in &ctx.edu {
        smmu.detach(edu.id).or_fail("detach")?;
    }
    Ok(())
}

/// Detaches the devices and shuts the SMMU down (tables and queues freed).
pub(super) fn teardown(smmu: &mut Smmu<Mem>, ctx: &Ctx) -> Result<(), Fail> {
    detach_all(smmu, ctx)?;
    smmu.shutdown().or_fail("SMMU shutdown")
}

/// Runs `body` with a domain of the stage the SMMU prefers.
macro_rules! with_preferred_stage {
    ($smmu:expr, |$fmt:ident| $body:expr) => {
        match $smmu.preferred_format() {
            Some(::bare_iommu::TableFormat::ArmStage1) => {
                let $fmt = ::bare_iommu::pgtable::arm::ArmStage1;
                $body
            }
            Some(::bare_iommu::TableFormat::ArmStage2) => {
                let $fmt = ::bare_iommu::pgtable::arm::ArmStage2;
                $body
            }
            other => fail!("SMMU supports no translation stage ({other:?})"),
        }
    };
}
pub(super) use with_preferred_stage;

/// `edu` copies `len` bytes from `src` into its buffer and out to `dst`.
fn copy(edu: &Edu, src: u64, dst: u64, len: u32) -> Result<(), Fail> {
    edu.dma_from_ram(src, 0, len).or_fail("edu read DMA")?;
    edu.dma_to_ram(dst, 0, len).or_fail("edu write DMA")
}

/// `edu` writes `len` bytes to `iova`, which must not translate: `guard`
/// (the page the write would reach, filled with `byte` first) keeps its
/// bytes, and the event queue reports F_TRANSLATION for edu's StreamID at
/// that address. Returns what the queue held.
#[allow(
    clippy::too_many_arguments,
    reason = "one blocked DMA, fully described"
)]
pub(super) fn expect_blocked_write(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    edu: &Edu,
    iova: u64,
    len: u32,
    (guard, byte): (PhysAddr, u8),
    stage: Stage,
    what: &str,
) -> Result<Drained, Fail> {
    ctx.mem.fill(guard, PAGE, byte);
    let _ = drain(smmu);
    edu.dma_to_ram(iova, 0, len).or_fail(what)?;
    check_ok!(
        ctx.mem.check_filled(guard, PAGE, byte),
        "{what} reached memory"
    );
    let d = drain(smmu);
    expect_translation_fault(&d, edu.id.stream_id(), iova, iova + u64::from(len), stage)?;
    Ok(d)
}

pub(super) fn expect_translation_fault(
    d: &Drained,
    sid: u32,
    lo: u64,
    hi: u64,
    stage: Stage,
) -> Result<(), Fail> {
    check!(
        d.report.events > 0,
        "no event reported for the DMA to {lo:#x}"
    );
    for e in &d.events {
        match e {
            Event::Translation(f) => {
                check_eq!(f.stream_id, sid, "F_TRANSLATION StreamID");
                check!(
                    (lo..hi).contains(&f.addr),
                    "F_TRANSLATION address {:#x} outside [{lo:#x}, {hi:#x})",
                    f.addr
                );
                check!(!f.read, "F_TRANSLATION says read; the DMA wrote");
                check_eq!(f.stage, stage, "F_TRANSLATION stage");
            }
            other => fail!("unexpected event {other}"),
        }
    }
    Ok(())
}

pub(super) fn fault_stage(format: TableFormat) -> Stage {
    if format == TableFormat::ArmStage2 {
        Stage::Stage2
    } else {
        Stage::Stage1
    }
}

// ---------------------------------------------------------------------------

/// Probe: the decoded features are what QEMU 10 advertises on each of the
/// three configurations (values in shared/QEMU.md, decoded by hand).
pub fn smmu_probe_decodes_qemu_features(ctx: &mut Ctx) -> Result<(), Fail> {
    // SAFETY: as in `bring_up`; probing only reads ID registers.
    let smmu = unsafe { Smmu::new(ctx.smmu_base, ctx.mem) }.or_fail("SMMU probe")?;
    let f = *smmu.features();
    narrate!("SMMU at {:#x}: {}", ctx.smmu_base, f);
    let (s1, s2) = match f.raw.idr[0] {
        0x0d44_101b => (true, true),
        0x0d44_101a => (true, false),
        0x0d44_1019 => (false, true),
        other => fail!("IDR0 {other:#x} is none of QEMU's three configurations"),
    };
    check_eq!((f.stage1, f.stage2), (s1, s2), "stages (S1P, S2P)");
    check!(f.aarch64_tables, "TTF: AArch64 tables");
    check!(f.two_level_strtab, "ST_LEVEL: 2-level stream table");
    check!(f.coherent, "COHACC");
    check_eq!((f.asid_bits, f.vmid_bits), (16, 16), "ASID/VMID widths");
    check_eq!(f.sid_bits, 16, "SIDSIZE");
    check_eq!(f.ssid_bits, 0, "SSIDSIZE");
    check_eq!(
        (f.cmdq_log2_max, f.evtq_log2_max),
        (19, 19),
        "CMDQS/EVENTQS"
    );
    check_eq!(f.oas_bits, 44, "OAS");
    check!(f.gran_4k && f.gran_64k, "4K and 64K granules");
    check!(f.range_invalidation, "RIL");
    check!(
        !f.ats && !f.pri && !f.msi && !f.hyp && !f.btm,
        "QEMU has no ATS/PRI/MSI/HYP/BTM"
    );
    check_eq!(f.arch_minor, 1, "AIDR: SMMUv3.1");
    let expected = if s1 {
        TableFormat::ArmStage1
    } else {
        TableFormat::ArmStage2
    };
    check_eq!(
        smmu.preferred_format(),
        Some(expected),
        "stage chosen for domains"
    );
    narrate!("domains on this SMMU use {}", stage_name(expected));
    Ok(())
}

/// Both stream table layouts translate: a linear table covering 8 StreamID
/// bits and a 2-level table covering all 16; a stream never attached stays
/// aborted in both.
pub fn smmu_linear_and_two_level_stream_tables_translate(ctx: &mut Ctx) -> Result<(), Fail> {
    let cases = [
        (
            StreamTableChoice::Linear,
            Some(8),
            StreamTableFormat::Linear,
        ),
        (StreamTableChoice::Auto, None, StreamTableFormat::TwoLevel),
    ];
    for (choice, sid_bits, expected) in cases {
        let mut smmu = bring_up(
            ctx,
            SmmuConfig {
                stream_table: choice,
                sid_bits,
                ..SmmuConfig::default()
            },
        )?;
        check_eq!(
            smmu.stream_table_format(),
            Some(expected),
            "stream table layout"
        );
        with_preferred_stage!(smmu, |fmt| {
            let edu = &ctx.edu[0];
            let mut dom = attached_domain(&mut smmu, ctx, fmt, 3, edu)?;
            let [src, dst] = pages(ctx)?;
            let tx = map_pages(&mut smmu, &mut dom, &[src, dst])?;
            ctx.mem.fill_pattern(src, PAGE, 0x21);
            copy(edu, at(tx.iova(), 0), at(tx.iova(), PAGE_SIZE), PAGE as u32)?;
            check_ok!(
                ctx.mem.check_pattern(dst, PAGE, 0x21),
                "{expected:?} table: DMA through the IOVA differs"
            );
            // edu 1 was never attached: its DMA to the same physical page aborts.
            ctx.mem.fill(dst, PAGE, 0x5a);
            let other = &ctx.edu[1];
            other.dma_to_ram(dst.get(), 0, 64).or_fail("edu 1 DMA")?;
            check_ok!(
                ctx.mem.check_filled(dst, PAGE, 0x5a),
                "{expected:?} table: a never-attached stream reached memory"
            );
            let d = drain(&mut smmu);
            for e in &d.events {
                check!(
                    e.stream_id() == other.id.stream_id(),
                    "event {e} for a stream that should translate"
                );
            }
            narrate!(
                "{expected:?} stream table: {} translated {}; {} (never attached) aborted, {} event(s)",
                edu.id,
                tx.iova(),
                other.id,
                d.report.events
            );
            destroy_and_detach(&mut smmu, ctx, dom, tx)?;
        });
        teardown(&mut smmu, ctx)?;
    }
    Ok(())
}

/// Two-step transaction: four scattered physical pages linked, in shuffled
/// order, into one IOVA range; edu reads each page back through the IOVA
/// (bytes come from exactly the right page) and writes 4 KiB across a page
/// boundary of the range (bytes land in exactly the two right pages).
pub fn smmu_two_step_links_scattered_pages_into_one_iova_range(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        let edu = &ctx.edu[0];
        let mut dom = attached_domain(&mut smmu, ctx, fmt, 4, edu)?;

        // Eight single pages; use four that are not neighbours, shuffled,
        // and a scratch page after them.
        let pool: [PhysAddr; 8] = pages(ctx)?;
        let pages = [pool[5], pool[0], pool[7], pool[2]];
        let scratch = pool[3];
        let tx = map_pages(
            &mut smmu,
            &mut dom,
            &[pages[0], pages[1], pages[2], pages[3], scratch],
        )?;
        narrate!(
            "transaction IOVA {} + {:#x} ({}): pages {} {} {} {} + scratch {}",
            tx.iova(),
            tx.size(),
            stage_name(dom.info().or_fail("info")?.format),
            pages[0],
            pages[1],
            pages[2],
            pages[3],
            scratch
        );

        // Out of the range: each page's bytes come through its own IOVA page.
        for (i, &p) in pages.iter().enumerate() {
            ctx.mem.fill_pattern(p, PAGE, 0x40 + i as u8);
        }
        for i in 0..4u64 {
            ctx.mem.fill(scratch, PAGE, 0);
            copy(
                edu,
                at(tx.iova(), i * PAGE_SIZE),
                at(tx.iova(), 4 * PAGE_SIZE),
                PAGE as u32,
            )?;
            check_ok!(
                ctx.mem.check_pattern(scratch, PAGE, 0x40 + i as u8),
                "IOVA page {i} did not read physical page {}",
                pages[i as usize]
            );
        }
        narrate!("edu read IOVA pages 0..3: each came from its own physical page");

        // Into the range: 4 KiB at IOVA + 0x1800 covers the second half of
        // page 1 and the first half of page 2, nothing else.
        for &p in &pages {
            ctx.mem.fill(p, PAGE, 0);
        }
        ctx.mem.fill_pattern(scratch, PAGE, 0x60);
        copy(
            edu,
            at(tx.iova(), 4 * PAGE_SIZE),
            at(tx.iova(), 0x1800),
            PAGE as u32,
        )?;
        let half = PAGE / 2;
        for i in 0..half {
            let a = ctx.mem.byte(PhysAddr(pages[1].get() + (half + i) as u64));
            let b = ctx.mem.byte(PhysAddr(pages[2].get() + i as u64));
            check_eq!(
                a,
                crate::memory::pattern(0x60, i),
                "page 1 byte {:#x}",
                half + i
            );
            check_eq!(
                b,
                crate::memory::pattern(0x60, half + i),
                "page 2 byte {i:#x}"
            );
        }
        for (i, &p) in pages.iter().enumerate() {
            let (start, len) = match i {
                1 => (0, half),
                2 => (half, half),
                _ => (0, PAGE),
            };
            check_ok!(
                ctx.mem
                    .check_filled(PhysAddr(p.get() + start as u64), len, 0),
                "DMA wrote outside its target in page {i}"
            );
        }
        narrate!(
            "edu wrote 4 KiB at {:#x}: landed in {}+0x800.. and {}..+0x800 exactly",
            at(tx.iova(), 0x1800),
            pages[1],
            pages[2]
        );
        let d = drain(&mut smmu);
        check_eq!(d.report.events, 0, "events during valid DMA");
        destroy_and_detach(&mut smmu, ctx, dom, tx)?;
    });
    teardown(&mut smmu, ctx)
}

/// Partial unlink + sync: DMA to the unlinked page is blocked (memory
/// unchanged) and reported as F_TRANSLATION with edu's StreamID and the
/// IOVA; DMA to the still-linked page works.
pub fn smmu_unlinked_page_blocks_dma_and_reports_translation_fault(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        let edu = &ctx.edu[0];
        let mut dom = attached_domain(&mut smmu, ctx, fmt, 5, edu)?;
        let format = dom.info().or_fail("info")?.format;
        let [a, b, src] = pages(ctx)?;
        let mut tx = map_pages(&mut smmu, &mut dom, &[a, b, src])?;
        ctx.mem.fill_pattern(src, PAGE, 0x31);
        // Both pages work (and QEMU now caches their translations).
        copy(
            edu,
            at(tx.iova(), 2 * PAGE_SIZE),
            at(tx.iova(), 0),
            PAGE as u32,
        )?;
        edu.dma_to_ram(at(tx.iova(), PAGE_SIZE), 0, PAGE as u32)
            .or_fail("DMA to page b")?;
        check_ok!(
            ctx.mem.check_pattern(b, PAGE, 0x31),
            "DMA to page b before unlink"
        );

        dom.unlink(&mut tx, PAGE_SIZE, PAGE_SIZE)
            .or_fail("unlink")?;
        dom.sync(&mut smmu).or_fail("sync after unlink")?;
        narrate!(
            "unlinked IOVA {:#x} (page {b}) and synced",
            at(tx.iova(), PAGE_SIZE)
        );
        ctx.mem.fill(a, PAGE, 0);
        let target = at(tx.iova(), PAGE_SIZE) + 0x100;
        let d = expect_blocked_write(
            ctx,
            &mut smmu,
            edu,
            target,
            16,
            (b, 0xaa),
            fault_stage(format),
            "DMA to the unlinked page",
        )?;
        if let Some(e) = d.events.first() {
            narrate!("fault caught: {e} ({} record(s))", d.report.events);
        }
        // The page still linked works.
        edu.dma_to_ram(at(tx.iova(), 0), 0, PAGE as u32)
            .or_fail("DMA to page a")?;
        check_ok!(
            ctx.mem.check_pattern(a, PAGE, 0x31),
            "DMA to the still-linked page"
        );
        narrate!("DMA to the still-linked IOVA {} landed in {a}", tx.iova());
        destroy_and_detach(&mut smmu, ctx, dom, tx)?;
    });
    teardown(&mut smmu, ctx)
}

/// A skipped TLB invalidation is caught: QEMU caches translations, so with
/// the driver's invalidation suppressed a relinked IOVA still reaches the old
/// page (the test sees it), and with it the DMA lands in the new page.
pub fn smmu_missing_invalidation_would_be_caught(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        let edu = &ctx.edu[0];
        let mut dom = attached_domain(&mut smmu, ctx, fmt, 6, edu)?;
        let [old, stale_target, fresh, src] = pages(ctx)?;
        let mut tx = map_pages(&mut smmu, &mut dom, &[old, src])?;
        let dir = DmaDirection::Bidirectional;
        ctx.mem.fill_pattern(src, PAGE, 0x77);
        edu.dma_from_ram(at(tx.iova(), PAGE_SIZE), 0, PAGE as u32)
            .or_fail("read source")?;
        edu.dma_to_ram(at(tx.iova(), 0), 0, 64)
            .or_fail("first DMA")?;
        check!(
            ctx.mem.check_pattern(old, 64, 0x77).is_ok(),
            "first DMA did not land in the linked page"
        );

        // Relink IOVA page 0 to another page with the TLBI suppressed.
        let tlbi_before = smmu.stats().commands.tlbi();
        dom.unlink(&mut tx, 0, PAGE_SIZE).or_fail("unlink")?;
        dom.link(&mut tx, stale_target, 0, PAGE_SIZE, dir, MapAttrs::empty())
            .or_fail("relink")?;
        dom.sync(&mut board_common::forgetful::ForgetsInvalidation(&mut smmu))
            .or_fail("sync without TLBI")?;
        check_eq!(
            smmu.stats().commands.tlbi(),
            tlbi_before,
            "TLBIs while suppressed"
        );
        ctx.mem.fill(old, PAGE, 0);
        edu.dma_to_ram(at(tx.iova(), 0), 0, 64)
            .or_fail("DMA after skipped TLBI")?;
        let stale = ctx.mem.check_pattern(old, 64, 0x77).is_ok();
        check!(
            stale,
            "without a TLBI the DMA did not use the stale translation: this test could not catch a missing invalidation"
        );
        narrate!("TLBI suppressed: DMA still went to the old page {old} (stale IOTLB)");

        // Same again with the driver's invalidation: the DMA follows the tables.
        dom.unlink(&mut tx, 0, PAGE_SIZE).or_fail("unlink")?;
        dom.link(&mut tx, fresh, 0, PAGE_SIZE, dir, MapAttrs::empty())
            .or_fail("relink")?;
        dom.sync(&mut smmu).or_fail("sync")?;
        ctx.mem.fill(old, PAGE, 0);
        edu.dma_to_ram(at(tx.iova(), 0), 0, 64)
            .or_fail("DMA after TLBI")?;
        check_ok!(
            ctx.mem.check_filled(old, PAGE, 0),
            "after the driver's sync the DMA still reached the old page (stale IOTLB)"
        );
        check_ok!(
            ctx.mem.check_pattern(fresh, 64, 0x77),
            "after the driver's sync the DMA missed the new page"
        );
        check!(
            smmu.stats().commands.tlbi() > tlbi_before,
            "the driver queued no TLBI for the unlink"
        );
        narrate!("with the driver's TLBI the DMA landed in the new page {fresh}");
        destroy_and_detach(&mut smmu, ctx, dom, tx)?;
    });
    teardown(&mut smmu, ctx)
}

/// Two edu devices in two domains: the same IOVA reaches each domain's own
/// page, and an IOVA mapped only in the other domain faults.
pub fn smmu_two_domains_isolate_two_devices(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        let mut d0 = domain(&smmu, ctx, fmt, 7)?;
        let mut d1 = domain(&smmu, ctx, fmt, 8)?;
        let format = d0.info().or_fail("info")?.format;
        let [e0, e1] = &ctx.edu;
        smmu.attach(e0.id, d0.attachment())
            .or_fail("attach edu 0")?;
        smmu.attach(e1.id, d1.attachment())
            .or_fail("attach edu 1")?;
        let [p0, p1, only0] = pages(ctx)?;
        let t0 = map_pages(&mut smmu, &mut d0, &[p0])?;
        let t1 = map_pages(&mut smmu, &mut d1, &[p1])?;
        let t0b = map_pages(&mut smmu, &mut d0, &[only0])?;
        check_eq!(
            t0.iova(),
            t1.iova(),
            "both domains hand out the same first IOVA"
        );
        let iova = t0.iova().get();

        // Give each edu distinct bytes to write: read them through its own domain.
        ctx.mem.fill_pattern(p0, PAGE, 0x50);
        e0.dma_from_ram(iova, 0, 256).or_fail("edu 0 read")?;
        ctx.mem.fill_pattern(p1, PAGE, 0x51);
        e1.dma_from_ram(iova, 0, 256).or_fail("edu 1 read")?;
        ctx.mem.fill(p0, PAGE, 0);
        ctx.mem.fill(p1, PAGE, 0);
        e0.dma_to_ram(iova + 0x800, 0, 256).or_fail("edu 0 write")?;
        e1.dma_to_ram(iova + 0x800, 0, 256).or_fail("edu 1 write")?;
        let (w0, w1) = (PhysAddr(p0.get() + 0x800), PhysAddr(p1.get() + 0x800));
        check_ok!(
            ctx.mem.check_pattern(w0, 256, 0x50),
            "edu 0 at {iova:#x} did not land in its domain's page"
        );
        check_ok!(
            ctx.mem.check_pattern(w1, 256, 0x51),
            "edu 1 at {iova:#x} did not land in its domain's page"
        );
        narrate!("same IOVA {iova:#x}: {} -> {p0}, {} -> {p1}", e0.id, e1.id);

        // edu 1 tries domain 0's other mapping.
        let foreign = t0b.iova().get();
        let d = expect_blocked_write(
            ctx,
            &mut smmu,
            e1,
            foreign,
            64,
            (only0, 0xee),
            fault_stage(format),
            "edu 1's DMA to a page mapped only in edu 0's domain",
        )?;
        if let Some(e) = d.events.first() {
            narrate!("{} at {foreign:#x} (domain 0 only): blocked, {e}", e1.id);
        }
        d0.destroy(t0, &mut smmu).or_fail("destroy")?;
        d0.destroy(t0b, &mut smmu).or_fail("destroy")?;
        destroy_and_detach(&mut smmu, ctx, d1, t1)?;
        end_domain(&mut smmu, d0)?;
    });
    teardown(&mut smmu, ctx)
}

/// A guest-sized region (4 MiB) linked with 2 MiB blocks in a stage-2 domain
/// (stage 1 when the SMMU has no stage 2); edu DMAs into both blocks. Then
/// the same through a `SharedDomain`'s read side, and its unlink faults.
pub fn smmu_guest_region_with_2m_blocks(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let stage2 = smmu.supports(TableFormat::ArmStage2);
    if !stage2 {
        println!("  note: stage-1-only SMMU: the 2 MiB block test runs on stage 1");
    }
    // 3 levels (39-bit space, S2SL0 = 1) and 4 levels (48-bit, S2SL0 = 2).
    for levels in [3, 4] {
        if stage2 {
            guest_region(ctx, &mut smmu, ArmStage2, levels)?;
        } else {
            guest_region(ctx, &mut smmu, ArmStage1, levels)?;
        }
    }
    if stage2 {
        guest_region_shared(ctx, &mut smmu, ArmStage2)?;
    } else {
        guest_region_shared(ctx, &mut smmu, ArmStage1)?;
    }
    teardown(&mut smmu, ctx)
}

/// The same 4 MiB through a [`SharedDomain`]: its read side (no write-side
/// lock) writes the two 2 MiB blocks, the edu DMAs into both, and after a
/// shared unlink of the whole range and one sync the DMA faults and lands
/// nowhere.
fn guest_region_shared<F: PteFormat>(ctx: &Ctx, smmu: &mut Smmu<Mem>, fmt: F) -> Result<(), Fail> {
    const SIZE_2M: u64 = 2 << 20;
    let dom = domain_with_levels(smmu, ctx, fmt, 10, 4)?;
    let edu = &ctx.edu[1];
    smmu.attach(edu.id, dom.attachment()).or_fail("attach")?;
    let dom = SharedDomain::new(dom);
    let (region, _) = ctx.mem.block_region();
    let mut tx = dom
        .try_alloc(2 * SIZE_2M, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated")?;
    check!(
        tx.iova().is_aligned(SIZE_2M),
        "IOVA {} not 2 MiB aligned",
        tx.iova()
    );
    dom.link(
        &mut tx,
        region,
        0,
        2 * SIZE_2M,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .or_fail("shared link 4 MiB")?;
    dom.sync(smmu).or_fail("sync")?;
    let heights = dom.with(|d| {
        let pt = d.page_table()?;
        let h = |off: u64| pt.translate(DmaAddr(tx.iova().get() + off)).map(|t| t.2);
        Some([h(0x1234), h(SIZE_2M + 0x1234)])
    });
    check_eq!(heights, Some([Some(1), Some(1)]), "two 2 MiB blocks");
    let src = region.get() + SIZE_2M - PAGE_SIZE;
    let target = SIZE_2M + 0x20_0000 - 3 * PAGE_SIZE;
    ctx.mem.fill_pattern(PhysAddr(src), PAGE, 0x3c);
    ctx.mem.fill(PhysAddr(region.get() + target), PAGE, 0);
    edu.dma_from_ram(at(tx.iova(), SIZE_2M - PAGE_SIZE), 0, PAGE as u32)
        .or_fail("read")?;
    edu.dma_to_ram(at(tx.iova(), target), 0, PAGE as u32)
        .or_fail("write")?;
    check_ok!(
        ctx.mem
            .check_pattern(PhysAddr(region.get() + target), PAGE, 0x3c),
        "DMA through the shared blocks did not land at region +{target:#x}"
    );
    check_eq!(drain(smmu).report.events, 0, "events during the block DMA");
    dom.unlink(&mut tx, 0, 2 * SIZE_2M)
        .or_fail("shared unlink 4 MiB")?;
    dom.sync(smmu).or_fail("sync after unlink")?;
    ctx.mem.fill(PhysAddr(region.get() + target), PAGE, 0);
    edu.dma_to_ram(at(tx.iova(), target), 0, 64)
        .or_fail("write after unlink")?;
    check_ok!(
        ctx.mem
            .check_filled(PhysAddr(region.get() + target), PAGE, 0),
        "DMA reached the region after the shared unlink of its blocks"
    );
    check!(
        drain(smmu).report.events > 0,
        "no fault for the DMA after the shared unlink"
    );
    narrate!(
        "SharedDomain: 4 MiB linked as two 2 MiB blocks on the read side, {} DMA'd into them; \
         after the shared unlink and one sync its DMA faults",
        edu.id
    );
    dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    detach_all(smmu, ctx)?;
    end_domain(smmu, dom.into_inner())
}

fn guest_region<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    fmt: F,
    levels: u8,
) -> Result<(), Fail> {
    const SIZE_2M: u64 = 2 << 20;
    let mut dom = domain_with_levels(smmu, ctx, fmt, 9, levels)?;
    let format = dom.info().or_fail("info")?.format;
    let edu = &ctx.edu[1];
    smmu.attach(edu.id, dom.attachment()).or_fail("attach")?;
    let (region, len) = ctx.mem.block_region();
    check!(
        len >= 2 * SIZE_2M && region.is_aligned(SIZE_2M),
        "block region"
    );
    let mut tx = alloc(&mut dom, 2 * SIZE_2M)?;
    check!(
        tx.iova().is_aligned(SIZE_2M),
        "IOVA {} not 2 MiB aligned",
        tx.iova()
    );
    dom.link(
        &mut tx,
        region,
        0,
        2 * SIZE_2M,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .or_fail("link 4 MiB")?;
    dom.sync(smmu).or_fail("sync")?;
    let pt = dom.page_table().or_fail("page table")?;
    for off in [0, SIZE_2M] {
        let (pa, _, height) = pt
            .translate(DmaAddr(tx.iova().get() + off + 0x1234))
            .or_fail("software walk")?;
        check_eq!(height, 1, "leaf height at +{off:#x} (1 = 2 MiB block)");
        check_eq!(pa.get(), region.get() + off + 0x1234, "software walk");
    }
    // The pointer to the table holding the two blocks carries that
    // table's count (2) in bits 11:2, which the SMMU must ignore: the DMA
    // below walks through it.
    let pointer = pt
        .descriptor_at(tx.iova(), 2)
        .or_fail("the pointer above the blocks")?;
    check_eq!(
        (pointer & F::COUNT_MASK) >> F::COUNT_SHIFT,
        2,
        "count in the pointer {pointer:#x} to the blocks' table"
    );
    narrate!(
        "{}, {levels} levels: IOVA {} + 4 MiB -> {region} as two 2 MiB blocks (VMID/ASID 9), \
         their table's pointer {pointer:#x} (count 2 in its ignored bits 11:2)",
        stage_name(format),
        tx.iova()
    );
    // Source at the end of block 0, targets in both blocks.
    let src = region.get() + SIZE_2M - PAGE_SIZE;
    ctx.mem.fill_pattern(PhysAddr(src), PAGE, 0x2b);
    let targets = [0x3000u64, SIZE_2M + 0x10_0000, 2 * SIZE_2M - 2 * PAGE_SIZE];
    for &t in &targets {
        ctx.mem.fill(PhysAddr(region.get() + t), PAGE, 0);
    }
    edu.dma_from_ram(at(tx.iova(), SIZE_2M - PAGE_SIZE), 0, PAGE as u32)
        .or_fail("read")?;
    for &t in &targets {
        edu.dma_to_ram(at(tx.iova(), t), 0, PAGE as u32)
            .or_fail("write")?;
        check_ok!(
            ctx.mem
                .check_pattern(PhysAddr(region.get() + t), PAGE, 0x2b),
            "DMA to IOVA +{t:#x} did not land at region +{t:#x}"
        );
    }
    narrate!("{} DMA'd into both blocks at the right offsets", edu.id);
    let d = drain(smmu);
    check_eq!(d.report.events, 0, "events during block DMA");
    destroy_and_detach(smmu, ctx, dom, tx)
}

/// A fault storm (a 4 KiB DMA to an unmapped IOVA: 1024 records) overflows
/// a 128-record event queue: the overflow is reported, the SMMU keeps
/// translating, and later faults are recorded again.
pub fn smmu_fault_storm_overflows_event_queue_and_recovers(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(
        ctx,
        SmmuConfig {
            evtq_log2: 7,
            ..SmmuConfig::default()
        },
    )?;
    with_preferred_stage!(smmu, |fmt| {
        let edu = &ctx.edu[0];
        let mut dom = attached_domain(&mut smmu, ctx, fmt, 10, edu)?;
        let [p, src] = pages(ctx)?;
        let mut tx = alloc(&mut dom, 4 * PAGE_SIZE)?;
        link_pages(&mut dom, &mut tx, 0, &[src])?;
        dom.sync(&mut smmu).or_fail("sync")?;
        let hole = at(tx.iova(), 2 * PAGE_SIZE);
        let before = smmu.stats();
        edu.dma_to_ram(hole, 0, PAGE as u32).or_fail("storm DMA")?;
        let d = drain(&mut smmu);
        check!(
            d.report.overflow,
            "no overflow reported after {} events",
            d.report.events
        );
        check_eq!(
            d.report.events,
            128,
            "records delivered from a full 128-record queue"
        );
        check_eq!(
            smmu.stats().event_overflows,
            before.event_overflows + 1,
            "overflow counter"
        );
        narrate!(
            "fault storm at {hole:#x}: {} records delivered, overflow reported (GERROR {:#x})",
            d.report.events,
            d.report.gerror
        );
        // The SMMU still translates: the next transaction works.
        ctx.mem.fill_pattern(src, PAGE, 0x3c);
        link_pages(&mut dom, &mut tx, 1, &[p])?;
        dom.sync(&mut smmu).or_fail("sync after storm")?;
        copy(edu, at(tx.iova(), 0), at(tx.iova(), PAGE_SIZE), PAGE as u32)?;
        check_ok!(ctx.mem.check_pattern(p, PAGE, 0x3c), "DMA after the storm");
        // And records faults again: one 4-byte DMA, one record.
        edu.dma_to_ram(hole, 0, 4).or_fail("single fault")?;
        let d = drain(&mut smmu);
        check!(!d.report.overflow, "overflow reported again for one fault");
        check_eq!(d.report.events, 1, "records for one 4-byte fault");
        expect_translation_fault(
            &d,
            edu.id.stream_id(),
            hole,
            hole + 4,
            fault_stage(dom.info().or_fail("info")?.format),
        )?;
        narrate!("after the storm: DMA works, a single fault gives one record");
        destroy_and_detach(&mut smmu, ctx, dom, tx)?;
    });
    teardown(&mut smmu, ctx)
}

/// An illegal command is reported (CERROR_ILL, with the command) and the
/// queue recovers: the commands after it run, later syncs and DMA work.
pub fn smmu_illegal_command_is_reported_and_queue_recovers(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let bad = Command::raw([0x7f, 0xdead_beef]);
    let before = smmu.stats();
    smmu.queue_command(bad).or_fail("queue")?;
    smmu.queue_command(Command::cfgi_all()).or_fail("queue")?;
    match smmu.sync_commands() {
        Err(SmmuError::Command(e)) => {
            check_eq!(e.code, CommandErrorCode::Illegal, "error code");
            check_eq!(e.command, bad, "offending command");
            narrate!(
                "illegal command reported: {:?} at slot {}: {:?}",
                e.code,
                e.index,
                e.command
            );
        }
        other => fail!("sync after an illegal command: {other:?}"),
    }
    let after = smmu.stats();
    check_eq!(
        after.command_errors,
        before.command_errors + 1,
        "command errors"
    );
    check_eq!(
        after.commands.cfgi_all,
        before.commands.cfgi_all + 1,
        "CFGI_ALL queued"
    );
    smmu.sync_commands().or_fail("sync after recovery")?;
    // The queue works: attach (CFGI + sync) and a translated DMA.
    with_preferred_stage!(smmu, |fmt| {
        let edu = &ctx.edu[0];
        let mut dom = attached_domain(&mut smmu, ctx, fmt, 11, edu)?;
        let [src, dst] = pages(ctx)?;
        let tx = map_pages(&mut smmu, &mut dom, &[src, dst])?;
        ctx.mem.fill_pattern(src, PAGE, 0x4d);
        copy(edu, at(tx.iova(), 0), at(tx.iova(), PAGE_SIZE), PAGE as u32)?;
        check_ok!(
            ctx.mem.check_pattern(dst, PAGE, 0x4d),
            "DMA after queue recovery"
        );
        narrate!("queue recovered: attach, sync and DMA work");
        destroy_and_detach(&mut smmu, ctx, dom, tx)?;
    });
    teardown(&mut smmu, ctx)
}

/// The command counters: a sync after links alone issues no command at all
/// (no CMD_SYNC: nothing to invalidate, issue 11); one sync of a batch (two
/// unlinks of 3 and 1 pages) issues exactly one CMD_SYNC and the TLBIs the
/// SMMU needs: one
/// range TLBI per range with IDR3.RIL, one per page without; past the
/// threshold (64 pages) one TLBI by ASID/VMID, and the DMA shows it worked.
/// Run with range invalidation on (when the SMMU has it) and forced off.
pub fn smmu_one_cmd_sync_per_sync_call(ctx: &mut Ctx) -> Result<(), Fail> {
    for use_ril in [true, false] {
        let mut smmu = bring_up(
            ctx,
            SmmuConfig {
                range_invalidation: use_ril,
                ..SmmuConfig::default()
            },
        )?;
        let ril = use_ril && smmu.features().range_invalidation;
        with_preferred_stage!(smmu, |fmt| command_counts(ctx, &mut smmu, fmt, ril)?);
        teardown(&mut smmu, ctx)?;
    }
    Ok(())
}

fn command_counts<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    fmt: F,
    ril: bool,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = attached_domain(smmu, ctx, fmt, 12, edu)?;
    let format = dom.info().or_fail("info")?.format;
    let stage1 = format == TableFormat::ArmStage1;
    let six: [PhysAddr; 6] = pages(ctx)?;
    let mut tx = alloc(&mut dom, 8 * PAGE_SIZE)?;
    let before = smmu.stats();
    link_pages(&mut dom, &mut tx, 0, &six)?;
    dom.sync(smmu).or_fail("sync")?;
    let linked = smmu.stats();
    check_eq!(
        linked.sync_calls - before.sync_calls,
        0,
        "completion waits for a sync of 6 links"
    );
    check_eq!(
        linked.commands.sync - before.commands.sync,
        0,
        "CMD_SYNCs for one sync of 6 links"
    );
    check_eq!(
        linked.commands.total - before.commands.total,
        0,
        "commands for a sync of 6 links (nothing was cached)"
    );
    // The links are live without a CMD_SYNC: edu reads through the last one.
    ctx.mem.fill_pattern(six[5], PAGE, 0x5c);
    edu.dma_from_ram(at(tx.iova(), 5 * PAGE_SIZE), 0, 64)
        .or_fail("read through a link synced without CMD_SYNC")?;
    edu.dma_to_ram(at(tx.iova(), 4 * PAGE_SIZE), 0, 64)
        .or_fail("write through a link synced without CMD_SYNC")?;
    check_ok!(
        ctx.mem.check_pattern(six[4], 64, 0x5c),
        "DMA through links synced without CMD_SYNC"
    );
    narrate!("6 links + sync: 0 commands, 0 CMD_SYNC; the DMA through them works");

    dom.unlink(&mut tx, 0, 3 * PAGE_SIZE)
        .or_fail("unlink 3 pages")?;
    dom.unlink(&mut tx, 4 * PAGE_SIZE, PAGE_SIZE)
        .or_fail("unlink 1 page")?;
    dom.sync(smmu).or_fail("sync")?;
    let after = smmu.stats();
    let expected_tlbi = if ril { 2 } else { 4 };
    check_eq!(after.sync_calls - linked.sync_calls, 1, "sync calls");
    check_eq!(
        after.commands.sync - linked.commands.sync,
        1,
        "CMD_SYNCs for one sync of 2 unlinks"
    );
    let (va, ipa) = (
        after.commands.tlbi_nh_va - linked.commands.tlbi_nh_va,
        after.commands.tlbi_s2_ipa - linked.commands.tlbi_s2_ipa,
    );
    let expected = if stage1 {
        (expected_tlbi, 0)
    } else {
        (0, expected_tlbi)
    };
    check_eq!(
        (va, ipa),
        expected,
        "TLBI_NH_VA / TLBI_S2_IPA (range invalidation {ril})"
    );
    check_eq!(
        after.commands.tlbi() - linked.commands.tlbi(),
        expected_tlbi,
        "all TLBIs"
    );
    narrate!(
        "range invalidation {}: 2 unlinks (3 + 1 pages), one sync: {} {} + 1 CMD_SYNC",
        if ril { "on" } else { "off" },
        expected_tlbi,
        if stage1 { "TLBI_NH_VA" } else { "TLBI_S2_IPA" }
    );
    dom.destroy(tx, smmu).or_fail("destroy")?;

    // 80 pages: past the threshold without RIL, one TLBI for the domain.
    const BIG: usize = 80;
    let big = ctx.mem.dma_pages(BIG).or_fail("80 pages")?;
    let mut tx = alloc(&mut dom, BIG as u64 * PAGE_SIZE)?;
    dom.link(
        &mut tx,
        big,
        0,
        BIG as u64 * PAGE_SIZE,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .or_fail("link 80 pages")?;
    dom.sync(smmu).or_fail("sync")?;
    let probe = 70 * PAGE_SIZE;
    ctx.mem.fill_pattern(big, PAGE, 0x6e);
    edu.dma_from_ram(at(tx.iova(), 0), 0, 64).or_fail("read")?;
    edu.dma_to_ram(at(tx.iova(), probe), 0, 64)
        .or_fail("write page 70")?;
    let p70 = PhysAddr(big.get() + probe);
    check!(
        ctx.mem.check_pattern(p70, 64, 0x6e).is_ok(),
        "DMA to page 70 before unlink"
    );
    let linked = smmu.stats();
    dom.unlink(&mut tx, 0, BIG as u64 * PAGE_SIZE)
        .or_fail("unlink 80 pages")?;
    dom.sync(smmu).or_fail("sync")?;
    let after = smmu.stats();
    let c = |s: &bare_iommu::smmuv3::Stats| {
        (
            s.commands.tlbi_nh_va + s.commands.tlbi_s2_ipa,
            s.commands.tlbi_nh_asid + s.commands.tlbi_s12_vmall,
            s.commands.sync,
        )
    };
    let (a, b) = (c(&linked), c(&after));
    let got = (b.0 - a.0, b.1 - a.1, b.2 - a.2);
    // 80 = 0b101_0000: one range TLBI (NUM 4, SCALE 4) with RIL.
    let expected = if ril { (1, 0, 1) } else { (0, 1, 1) };
    check_eq!(
        got,
        expected,
        "(range/page TLBIs, domain TLBIs, CMD_SYNCs) for an 80-page unlink"
    );
    ctx.mem.fill(p70, PAGE, 0);
    let _ = drain(smmu);
    edu.dma_to_ram(at(tx.iova(), probe), 0, 64)
        .or_fail("write after unlink")?;
    check_ok!(
        ctx.mem.check_filled(p70, PAGE, 0),
        "DMA reached page 70 after an 80-page unlink (stale translation)"
    );
    let d = drain(smmu);
    check!(
        d.report.events > 0,
        "no fault for the DMA after the 80-page unlink"
    );
    narrate!(
        "80-page unlink: {} and one CMD_SYNC; the DMA to page 70 now faults",
        if ril {
            "1 range TLBI"
        } else {
            "1 TLBI by ASID/VMID (past 64 pages)"
        }
    );
    destroy_and_detach(smmu, ctx, dom, tx)?;
    let c = smmu.stats().commands;
    narrate!(
        "counters since init: {} commands: CFGI_STE {}, CFGI_CD {}, CFGI_ALL {}, TLBI_NH_VA {}, \
         TLBI_NH_ASID {}, TLBI_S2_IPA {}, TLBI_S12_VMALL {}, TLBI_NSNH_ALL {}, CMD_SYNC {}; sync() calls {}",
        c.total,
        c.cfgi_ste,
        c.cfgi_cd,
        c.cfgi_all,
        c.tlbi_nh_va,
        c.tlbi_nh_asid,
        c.tlbi_s2_ipa,
        c.tlbi_s12_vmall,
        c.tlbi_nsnh_all,
        c.sync,
        smmu.stats().sync_calls
    );
    Ok(())
}

/// Detach returns a stream to abort: after detach the device's DMA to an
/// IOVA that translated a moment ago reaches nothing.
pub fn smmu_detach_returns_stream_to_abort(ctx: &mut Ctx) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        let edu = &ctx.edu[1];
        let mut dom = attached_domain(&mut smmu, ctx, fmt, 13, edu)?;
        let [p] = pages(ctx)?;
        let tx = map_pages(&mut smmu, &mut dom, &[p])?;
        ctx.mem.fill_pattern(p, PAGE, 0x19);
        edu.dma_from_ram(tx.iova().get(), 0, 64).or_fail("read")?;
        smmu.detach(edu.id).or_fail("detach")?;
        ctx.mem.fill(p, PAGE, 0);
        edu.dma_to_ram(tx.iova().get(), 0, 64)
            .or_fail("DMA after detach")?;
        check_ok!(
            ctx.mem.check_filled(p, PAGE, 0),
            "DMA after detach reached memory"
        );
        // Bypass, then detach again: physical addresses work, then stop.
        smmu.attach(edu.id, Attachment::Bypass).or_fail("bypass")?;
        edu.dma_to_ram(p.get(), 0, 64).or_fail("bypass DMA")?;
        check!(
            ctx.mem.check_pattern(p, 64, 0x19).is_ok(),
            "bypass DMA did not land"
        );
        smmu.detach(edu.id).or_fail("detach")?;
        ctx.mem.fill(p, PAGE, 0);
        edu.dma_to_ram(p.get(), 0, 64).or_fail("DMA after detach")?;
        check!(
            ctx.mem.check_filled(p, PAGE, 0).is_ok(),
            "DMA after detaching bypass landed"
        );
        narrate!("detach: translated -> abort, bypass -> abort: nothing lands");
        let _ = drain(&mut smmu);
        destroy_and_detach(&mut smmu, ctx, dom, tx)?;
    });
    teardown(&mut smmu, ctx)
}
