//! VT-d driver tests on QEMU q35 + intel-iommu: probe, translated DMA through
//! the two-step API, faults, invalidation, isolation, superpages, the
//! invalidation queue. The same list runs under every configuration the
//! xtask starts (caching mode off/on, `noqi`, `aw=39`); the tests read the
//! configuration from the command line and expect what it implies.

use crate::edu::Edu;
use crate::harness::{Ctx, Fail, OrFail};
use crate::memory::{BoardMemory, DRIVER_MEMORY, DriverMemory, pattern};
use bare_iommu::backend::{Attachment, IommuBackend};
use bare_iommu::error::BackendError;
use bare_iommu::pgtable::PteFormat;
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::pgtable::{DmaDirection, MapAttrs};
use bare_iommu::shared::SharedDomain;
use bare_iommu::state::{Domain, DomainConfig, IovaState};
use bare_iommu::vtd::{
    Access, DeviceState, FaultReason, FaultRecord, FaultStatus, InvDesc, Vtd, VtdConfig,
    VtdFirstLevel, VtdStats,
};
use bare_iommu::{DeviceId, DmaAddr, PAGE_SIZE, PhysAddr};
use spin::Mutex;

pub(super) const PAGE: usize = PAGE_SIZE as usize;
pub(super) const PAGE_U32: u32 = PAGE_SIZE as u32;
const SIZE_2M: u64 = 2 << 20;
/// IOVA apertures of the two test domains: disjoint, so an address of one
/// domain is never mapped in the other.
pub(super) const APERTURE_A: (u64, u64) = (0x10_0000, 0x1000_0000);
const APERTURE_B: (u64, u64) = (0x1000_0000, 0x2000_0000);

/// The unit lends its own structures from [`DRIVER_MEMORY`]: they live as
/// long as the boot, so the runner does not count them against a test.
pub(super) type Unit = Vtd<&'static DriverMemory>;
pub(super) type Dom<F> = Domain<F, &'static BoardMemory>;

/// A table format a test domain can use: second level (legacy, and scalable
/// mode with SLTS) or first level (scalable mode with FLTS, `fl`).
pub(super) trait BoardFormat: PteFormat {
    /// The format configured from the unit's capabilities.
    fn for_unit(vtd: &Unit) -> Self;
    /// Table levels of a new domain.
    fn levels(vtd: &Unit) -> u8;
    /// The fault reason of a DMA to an unmapped page.
    fn unmapped(access: Access) -> FaultReason;
}

impl BoardFormat for VtdSecondLevel {
    fn for_unit(vtd: &Unit) -> Self {
        vtd.second_level_format()
    }
    fn levels(vtd: &Unit) -> u8 {
        vtd.domain_levels()
    }
    fn unmapped(access: Access) -> FaultReason {
        match access {
            Access::Write => FaultReason::WriteDenied,
            Access::Read => FaultReason::ReadDenied,
        }
    }
}

impl BoardFormat for VtdFirstLevel {
    fn for_unit(vtd: &Unit) -> Self {
        vtd.first_level_format()
    }
    fn levels(_: &Unit) -> u8 {
        4
    }
    fn unmapped(_: Access) -> FaultReason {
        FaultReason::FirstLevelEntryNotPresent
    }
}

/// Whether this run's domains use first-level tables (`sm fl`).
pub(super) fn first_level(ctx: &Ctx) -> bool {
    config(ctx).scalable && ctx.arg("fl")
}

/// A public test running `$body::<F>` with the format of this run; with
/// `with_unit`, `$body::<F>(ctx, vtd)` inside [`with_unit`].
macro_rules! per_format {
    ($(#[$m:meta])* $name:ident => with_unit $body:ident) => {
        $(#[$m])*
        pub fn $name(ctx: &mut Ctx) -> Result<(), Fail> {
            if first_level(ctx) {
                with_unit(ctx, |vtd| $body::<::bare_iommu::vtd::VtdFirstLevel>(ctx, vtd))
            } else {
                with_unit(ctx, |vtd| {
                    $body::<::bare_iommu::pgtable::vtd::VtdSecondLevel>(ctx, vtd)
                })
            }
        }
    };
    ($(#[$m:meta])* $name:ident => $body:ident) => {
        $(#[$m])*
        pub fn $name(ctx: &mut Ctx) -> Result<(), Fail> {
            if first_level(ctx) {
                $body::<::bare_iommu::vtd::VtdFirstLevel>(ctx)
            } else {
                $body::<::bare_iommu::pgtable::vtd::VtdSecondLevel>(ctx)
            }
        }
    };
}
pub(super) use per_format;

/// The unit, initialised once per boot by the first test that needs it.
static UNIT: Mutex<Option<Unit>> = Mutex::new(None);

pub(super) fn config(ctx: &Ctx) -> VtdConfig {
    VtdConfig {
        use_qi: !ctx.arg("noqi"),
        // Scalable mode (`sm`, with `-global intel-iommu.x-scalable-mode=on`)
        // runs on queued invalidation only; `noqi` keeps legacy tables.
        scalable: ctx.arg("sm") && !ctx.arg("noqi"),
        ..VtdConfig::default()
    }
}

pub(super) fn probe(ctx: &Ctx) -> Result<Unit, Fail> {
    // SAFETY: vtd_base is the DRHD register base from the DMAR, identity-mapped
    // uncached by the boot code; these tests are the unit's only driver.
    unsafe { Vtd::new(ctx.vtd_base, ctx.vtd_len, &DRIVER_MEMORY) }.or_fail("probe")
}

/// Runs `f` with the initialised unit; both edus are blocked and the fault
/// records empty before and after.
pub(super) fn with_unit(
    ctx: &Ctx,
    f: impl FnOnce(&mut Unit) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let mut guard = UNIT.lock();
    if guard.is_none() {
        let mut v = probe(ctx)?;
        v.init(config(ctx)).or_fail("init")?;
        *guard = Some(v);
    }
    let vtd = guard.as_mut().or_fail("unit")?;
    let reset = |vtd: &mut Unit| -> Result<(), Fail> {
        for e in ctx.edu.iter() {
            vtd.detach(e.id).or_fail("detach")?;
        }
        vtd.poll_faults(|_| {});
        Ok(())
    };
    reset(vtd)?;
    let r = f(vtd);
    reset(vtd)?;
    r
}

/// Like [`with_unit`], but moves the unit out of its lock for the duration
/// of `f` (to hand it to an interrupt handler, say); `f` gives it back, and
/// if it cannot (`None`) the next test probes and initialises a new one.
pub(super) fn with_unit_owned(
    ctx: &Ctx,
    f: impl FnOnce(Unit) -> (Option<Unit>, Result<(), Fail>),
) -> Result<(), Fail> {
    let mut guard = UNIT.lock();
    let mut vtd = match guard.take() {
        Some(v) => v,
        None => {
            let mut v = probe(ctx)?;
            v.init(config(ctx)).or_fail("init")?;
            v
        }
    };
    let reset = |vtd: &mut Unit| -> Result<(), Fail> {
        for e in ctx.edu.iter() {
            vtd.detach(e.id).or_fail("detach")?;
        }
        vtd.poll_faults(|_| {});
        Ok(())
    };
    if let Err(e) = reset(&mut vtd) {
        *guard = Some(vtd);
        return Err(e);
    }
    let (back, r) = f(vtd);
    if let Some(mut v) = back {
        let after = reset(&mut v);
        *guard = Some(v);
        after?;
    }
    r
}

pub(super) fn new_domain<F: BoardFormat>(
    vtd: &Unit,
    ctx: &Ctx,
    id: u16,
    aperture: (u64, u64),
) -> Result<Dom<F>, Fail> {
    new_domain_in::<F>(vtd, ctx.mem, id, aperture)
}

/// [`new_domain`] with its table pages from `mem`.
pub(super) fn new_domain_in<F: BoardFormat>(
    vtd: &Unit,
    mem: &'static BoardMemory,
    id: u16,
    aperture: (u64, u64),
) -> Result<Dom<F>, Fail> {
    Domain::new(
        F::for_unit(vtd),
        mem,
        DomainConfig {
            id,
            levels: F::levels(vtd),
            aperture_start: aperture.0,
            aperture_end: aperture.1,
            coherent_walk: vtd.coherent_walk(),
        },
    )
    .or_fail("domain")
}

/// A domain (ID `id`, IOVAs in `aperture`) with `edu` attached to it.
pub(super) fn attached_domain<F: BoardFormat>(
    vtd: &mut Unit,
    ctx: &Ctx,
    edu: &Edu,
    id: u16,
    aperture: (u64, u64),
) -> Result<Dom<F>, Fail> {
    let dom = new_domain::<F>(vtd, ctx, id, aperture)?;
    vtd.attach(edu.id, dom.attachment()).or_fail("attach")?;
    Ok(dom)
}

/// One fresh DMA page linked as a one-page transaction of a domain `edu` is
/// attached to, synced: where most tests start.
pub(super) struct OnePage<F: BoardFormat> {
    pub(super) dom: Dom<F>,
    pub(super) tx: IovaState,
    /// The page.
    pub(super) pa: PhysAddr,
    /// Its IOVA.
    pub(super) iova: u64,
}

pub(super) fn one_page<F: BoardFormat>(
    vtd: &mut Unit,
    ctx: &Ctx,
    edu: &Edu,
    id: u16,
    aperture: (u64, u64),
) -> Result<OnePage<F>, Fail> {
    let mut dom = attached_domain::<F>(vtd, ctx, edu, id, aperture)?;
    let pa = ctx.mem.dma_pages(1).or_fail("page")?;
    let mut tx = alloc_tx(&mut dom, PAGE_SIZE)?;
    let iova = link(&mut dom, &mut tx, pa, 0, PAGE_SIZE)?;
    dom.sync(vtd).or_fail("sync")?;
    Ok(OnePage { dom, tx, pa, iova })
}

/// Destroys the transaction (whatever is still linked unlinked, synced, the
/// range freed) and detaches `edu`.
pub(super) fn destroy_and_detach<F: BoardFormat>(
    vtd: &mut Unit,
    mut dom: Dom<F>,
    tx: IovaState,
    edu: &Edu,
) -> Result<(), Fail> {
    dom.destroy(tx, vtd).or_fail("destroy")?;
    vtd.detach(edu.id).or_fail("detach")?;
    end_domain(vtd, dom)
}

/// Ends a domain no device is attached to any more: the unit drops what it
/// cached for it (domain-selective invalidation + wait) and every table page
/// goes back to the lender.
pub(super) fn end_domain<F: BoardFormat>(vtd: &mut Unit, dom: Dom<F>) -> Result<(), Fail> {
    dom.teardown(vtd)
        .map_err(|(_, e)| e)
        .or_fail("domain teardown")
}

pub(super) fn alloc_tx<F: BoardFormat>(dom: &mut Dom<F>, size: u64) -> Result<IovaState, Fail> {
    dom.try_alloc(size, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated domain gave the direct path")
}

fn link<F: BoardFormat>(
    dom: &mut Dom<F>,
    tx: &mut IovaState,
    pa: PhysAddr,
    off: u64,
    len: u64,
) -> Result<u64, Fail> {
    dom.link(
        tx,
        pa,
        off,
        len,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .map(|a| a.0)
    .or_fail("link")
}

/// Drains the fault records: (records, status).
pub(super) fn faults(vtd: &mut Unit) -> (heapless::Vec<FaultRecord, 8>, FaultStatus) {
    let mut v = heapless::Vec::new();
    let st = vtd.poll_faults(|r| {
        let _ = v.push(r);
    });
    (v, st)
}

/// Fault record `r` names `dev`, the page of `addr`, one of `reasons` and
/// `access`.
pub(super) fn check_record(
    r: &FaultRecord,
    dev: DeviceId,
    addr: u64,
    reasons: &[FaultReason],
    access: Access,
) -> Result<(), Fail> {
    check!(
        r.source_id == dev.source_id(),
        "fault source-id {:#x}, expected {:#x}",
        r.source_id,
        dev.source_id()
    );
    check!(
        r.address.0 == addr & !(PAGE_SIZE - 1),
        "fault address {}, expected {:#x}",
        r.address,
        addr & !(PAGE_SIZE - 1)
    );
    check!(
        reasons.contains(&r.reason),
        "fault reason {:?} ({:#x}), expected one of {:?}",
        r.reason,
        r.code,
        reasons
    );
    check!(
        r.access == access,
        "fault access {:?}, expected {:?}",
        r.access,
        access
    );
    Ok(())
}

/// Exactly one fault, from `dev`, at the page of `addr`, with `reason` and
/// `access`: that record.
pub(super) fn expect_one_fault(
    vtd: &mut Unit,
    dev: DeviceId,
    addr: u64,
    reasons: &[FaultReason],
    access: Access,
) -> Result<FaultRecord, Fail> {
    let (recs, st) = faults(vtd);
    check!(
        recs.len() == 1,
        "{} fault records, expected 1 ({:?})",
        recs.len(),
        recs.first()
    );
    let r = recs.first().or_fail("record")?;
    narrate!("{}", r);
    check_record(r, dev, addr, reasons, access)?;
    check!(!st.overflow, "unexpected primary fault overflow");
    Ok(*r)
}

/// A one-page device write to `iova` is blocked: `pa` (the page the IOVA
/// reached, or would) keeps its bytes, and exactly one fault names the
/// device, the page, one of `reasons` and a write.
pub(super) fn expect_write_blocked(
    ctx: &Ctx,
    vtd: &mut Unit,
    edu: &Edu,
    iova: u64,
    pa: PhysAddr,
    reasons: &[FaultReason],
    what: &str,
) -> Result<(), Fail> {
    ctx.mem.fill(pa, PAGE, 0x66).or_fail("fill")?;
    edu.dma_to_ram(iova, 0, PAGE_U32).or_fail(what)?;
    check_ok!(
        ctx.mem.check_fill(pa, PAGE, 0x66),
        "{what}: the DMA reached memory"
    );
    expect_one_fault(vtd, edu.id, iova, reasons, Access::Write)?;
    Ok(())
}

pub(super) fn no_faults(vtd: &mut Unit) -> Result<(), Fail> {
    let (recs, st) = faults(vtd);
    if let Some(r) = recs.first() {
        fail!("unexpected fault: {}", r);
    }
    check!(!st.overflow, "unexpected primary fault overflow");
    Ok(())
}

/// `pa` cleared, then a one-page device write to `iova` (which must translate
/// to `pa`) from a buffer loaded by [`load_buffer`] with `seed`: the page
/// holds the pattern.
pub(super) fn expect_write_lands(
    ctx: &Ctx,
    edu: &Edu,
    iova: u64,
    pa: PhysAddr,
    seed: u8,
    what: &str,
) -> Result<(), Fail> {
    ctx.mem.fill(pa, PAGE, 0).or_fail("clear")?;
    edu.dma_to_ram(iova, 0, PAGE_U32).or_fail("edu -> RAM")?;
    check_ok!(ctx.mem.check_pattern(pa, PAGE, seed), "{what}");
    Ok(())
}

/// Loads the device buffer with `pattern(seed, i)` from a physical page
/// reached through `dma` (which must translate to `pa`).
pub(super) fn load_buffer(
    ctx: &Ctx,
    edu: &Edu,
    pa: PhysAddr,
    dma: u64,
    seed: u8,
) -> Result<(), Fail> {
    ctx.mem
        .fill_pattern(pa, PAGE, seed)
        .or_fail("fill source")?;
    edu.dma_from_ram(dma, 0, PAGE_U32).or_fail("RAM -> edu")
}

pub(super) fn free_pages(ctx: &Ctx, pa: PhysAddr, n: usize) -> Result<(), Fail> {
    check!(ctx.mem.free_dma_pages(pa, n), "free DMA pages at {pa}");
    Ok(())
}

fn delta(a: u64, b: u64) -> u64 {
    b.wrapping_sub(a)
}

/// Probe decodes CAP/ECAP to what this QEMU configuration advertises.
pub fn vtd_probe_decodes_what_qemu_advertises(ctx: &mut Ctx) -> Result<(), Fail> {
    let v = probe(ctx)?;
    let f = *v.features();
    narrate!("{}", f);
    let aw39 = ctx.arg_value("aw") == Some("39");
    check!(f.version == (1, 0), "version {:?}", f.version);
    check!(
        f.domains == 65536,
        "{} domains, expected 65536 (ND=6)",
        f.domains
    );
    let (sagaw, mgaw, levels) = if aw39 { (0b010, 39, 3) } else { (0b110, 48, 4) };
    check!(
        f.sagaw == sagaw,
        "SAGAW {:#b}, expected {sagaw:#b}",
        f.sagaw
    );
    check!(f.mgaw == mgaw, "MGAW {} expected {mgaw}", f.mgaw);
    check!(
        v.domain_levels() == levels,
        "{} levels chosen",
        v.domain_levels()
    );
    check!(f.fault_records == 1, "NFR+1 = {}", f.fault_records);
    check!(
        f.fault_record_offset == 0x220,
        "FRO*16 = {:#x}",
        f.fault_record_offset
    );
    check!(f.iotlb_offset == 0xf0, "IRO*16 = {:#x}", f.iotlb_offset);
    check!(f.caching_mode == ctx.arg("cm"), "CM = {}", f.caching_mode);
    check!(f.psi && f.mamv == 18, "PSI {} MAMV {}", f.psi, f.mamv);
    check!(f.superpage_2m(), "SLLPS {:#b} lacks 2 MiB", f.sllps);
    check!(f.qi && f.ir && f.pt, "QI {} IR {} PT {}", f.qi, f.ir, f.pt);
    check!(!f.coherent, "ECAP.C set");
    check!(
        f.smts == ctx.arg("sm")
            && f.slts == (ctx.arg("sm") && !ctx.arg("fl"))
            && f.flts == (ctx.arg("sm") && ctx.arg("fl")),
        "SMTS {} SLTS {} FLTS {} with `sm` = {}, `fl` = {}",
        f.smts,
        f.slts,
        f.flts,
        ctx.arg("sm"),
        ctx.arg("fl")
    );
    check!(
        v.global_status() & (1 << 31) == 0,
        "probe found translation already on"
    );
    Ok(())
}

/// Init turns translation on (and queued invalidation unless `noqi`), and a
/// device with no context entry is blocked: its DMA leaves memory alone and
/// the fault names it.
pub fn vtd_init_enables_translation_and_blocks_unattached_devices(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let mut v = probe(ctx)?;
    v.init(config(ctx)).or_fail("init")?;
    let gsts = v.global_status();
    narrate!("GSTS={:#x} stats={:?}", gsts, v.stats());
    check!(gsts & (1 << 31) != 0, "GSTS.TES clear ({gsts:#x})");
    check!(gsts & (1 << 30) != 0, "GSTS.RTPS clear ({gsts:#x})");
    let qi = !ctx.arg("noqi");
    check!(
        (gsts & (1 << 26) != 0) == qi && v.uses_queued_invalidation() == qi,
        "GSTS.QIES {} with queued invalidation wanted = {qi}",
        gsts & (1 << 26) != 0
    );
    let s = v.stats();
    if qi {
        check!(
            s.wait_descriptors == 1 && s.register_invalidations == 0,
            "init: {s:?}"
        );
    } else {
        check!(
            s.wait_descriptors == 0 && s.register_invalidations == 2,
            "init without QI: {s:?}"
        );
    }
    check!(
        v.is_scalable() == config(ctx).scalable,
        "scalable mode {} (wanted {})",
        v.is_scalable(),
        config(ctx).scalable
    );
    check!(
        v.wants_first_level() == first_level(ctx),
        "first-level tables wanted: {}",
        v.wants_first_level()
    );
    *UNIT.lock() = Some(v);
    with_unit(ctx, |vtd| {
        let edu = &ctx.edu[0];
        let dst = ctx.mem.dma_pages(1).or_fail("page")?;
        expect_write_blocked(
            ctx,
            vtd,
            edu,
            dst.0,
            dst,
            &[
                FaultReason::RootEntryNotPresent,
                FaultReason::ContextEntryNotPresent,
            ],
            "blocked DMA",
        )?;
        free_pages(ctx, dst, 1)
    })
}

/// One transaction of four pages linked out of order from scattered physical
/// pages, one sync: DMA into and out of it (straddling page boundaries) moves
/// exactly the right bytes between exactly the right pages.
fn noncontiguous_transaction_dma_both_ways_hits_exact_pages_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = attached_domain::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    let pool = ctx.mem.dma_pages(8).or_fail("8 pages")?;
    let page = |i: u64| PhysAddr(pool.0 + i * PAGE_SIZE);
    ctx.mem.fill(pool, 8 * PAGE, 0x55).or_fail("fill")?;
    // Transaction page k → physical page order[k]; the others are guards.
    let order = [5u64, 0, 7, 2];
    let guards = [1u64, 3, 4, 6];
    let mut tx = alloc_tx(&mut dom, 4 * PAGE_SIZE)?;
    let base = tx.iova().0;
    for (k, &p) in order.iter().enumerate() {
        link(&mut dom, &mut tx, page(p), k as u64 * PAGE_SIZE, PAGE_SIZE)?;
    }
    dom.sync(vtd).or_fail("sync")?;
    for (k, &p) in order.iter().enumerate() {
        let t = dom.translate(DmaAddr(base + k as u64 * PAGE_SIZE + 8));
        check!(
            t.map(|(pa, _)| pa) == Some(PhysAddr(page(p).0 + 8)),
            "software walk of page {k}: {t:?}"
        );
    }
    // RAM → device from transaction pages 2 and 3 (physical 7 and 2),
    // straddling their boundary.
    ctx.mem
        .fill_pattern(page(7), PAGE, 0x21)
        .or_fail("pattern")?;
    ctx.mem
        .fill_pattern(page(2), PAGE, 0x42)
        .or_fail("pattern")?;
    narrate!("edu reads IOVA {:#x} (4 KiB across 2 pages)", base + 0x2800);
    edu.dma_from_ram(base + 2 * PAGE_SIZE + 0x800, 0, PAGE_U32)
        .or_fail("RAM -> edu")?;
    // Device → RAM into transaction pages 0 and 1 (physical 5 and 0).
    narrate!("edu writes IOVA {:#x} (4 KiB across 2 pages)", base + 0x800);
    edu.dma_to_ram(base + 0x800, 0, PAGE_U32)
        .or_fail("edu -> RAM")?;
    let half = PAGE / 2;
    check_ok!(
        ctx.mem.compare(
            PhysAddr(page(7).0 + 0x800),
            PhysAddr(page(5).0 + 0x800),
            half,
        ),
        "second half of tx page 0"
    );
    check_ok!(
        ctx.mem.compare(page(2), page(0), half),
        "first half of tx page 1"
    );
    check_ok!(
        ctx.mem.check_fill(page(5), half, 0x55),
        "DMA wrote before its target"
    );
    check_ok!(
        ctx.mem.check_fill(PhysAddr(page(0).0 + 0x800), half, 0x55),
        "DMA wrote past its target"
    );
    for g in guards {
        check_ok!(
            ctx.mem.check_fill(page(g), PAGE, 0x55),
            "guard page {g} touched"
        );
    }
    check_ok!(ctx.mem.check_pattern(page(7), PAGE, 0x21), "source changed");
    no_faults(vtd)?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    free_pages(ctx, pool, 8)
}

/// Unlinking one page of two blocks DMA to it after the sync: memory stays as
/// it was and the fault record names the device, the page and the access;
/// the page still linked keeps working.
fn unlinked_page_blocks_dma_and_fault_is_decoded_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = attached_domain::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    let pa = ctx.mem.dma_pages(1).or_fail("page a")?;
    let pb = ctx.mem.dma_pages(1).or_fail("page b")?;
    let mut tx = alloc_tx(&mut dom, 2 * PAGE_SIZE)?;
    let ia = link(&mut dom, &mut tx, pa, 0, PAGE_SIZE)?;
    let ib = link(&mut dom, &mut tx, pb, PAGE_SIZE, PAGE_SIZE)?;
    dom.sync(vtd).or_fail("sync")?;
    load_buffer(ctx, edu, pa, ia, 0x33)?;
    edu.dma_to_ram(ib, 0, PAGE_U32).or_fail("edu -> b")?;
    check_ok!(
        ctx.mem.check_pattern(pb, PAGE, 0x33),
        "DMA to linked page b"
    );
    no_faults(vtd)?;

    dom.unlink(&mut tx, PAGE_SIZE, PAGE_SIZE)
        .or_fail("unlink b")?;
    dom.sync(vtd).or_fail("sync after unlink")?;
    narrate!("edu writes unlinked IOVA {:#x}", ib);
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        ib,
        pb,
        &[F::unmapped(Access::Write)],
        "edu -> unlinked b",
    )?;

    narrate!("edu reads unlinked IOVA {:#x}", ib + 0x10);
    edu.dma_from_ram(ib + 0x10, 0, 64)
        .or_fail("unlinked b -> edu")?;
    expect_one_fault(vtd, edu.id, ib, &[F::unmapped(Access::Read)], Access::Read)?;

    // The faulted read left the first 64 buffer bytes undefined (QEMU
    // zeroes them); the rest still holds page a's pattern.
    ctx.mem.fill(pa, PAGE, 0).or_fail("clear a")?;
    edu.dma_to_ram(ia + 0x100, 0x100, 0x100)
        .or_fail("edu -> a")?;
    let mut got = [0u8; 4];
    ctx.mem
        .read(PhysAddr(pa.0 + 0x100), &mut got)
        .or_fail("read a")?;
    let want = [0x100, 0x101, 0x102, 0x103].map(|i| pattern(0x33, i));
    check!(
        got == want,
        "page a no longer reachable after unlinking b: {got:?}, expected {want:?}"
    );
    no_faults(vtd)?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    free_pages(ctx, pa, 1)?;
    free_pages(ctx, pb, 1)
}

/// A backend that drops every invalidation but still syncs: what a driver
/// that forgot the IOTLB invalidation would do.
/// QEMU caches translations: without the IOTLB invalidation an unlinked page
/// stays reachable (so the unlink test would catch a driver that skips it);
/// the page-selective invalidation the driver issues removes it.
fn skipped_iotlb_invalidation_is_caught_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let OnePage {
        mut dom,
        mut tx,
        pa,
        iova,
    } = one_page::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    let info = dom.info().or_fail("info")?;
    // Warm the IOTLB with a DMA through the page.
    load_buffer(ctx, edu, pa, iova, 0x44)?;

    dom.unlink(&mut tx, 0, PAGE_SIZE).or_fail("unlink")?;
    dom.sync(&mut board_common::forgetful::ForgetsInvalidation(vtd))
        .or_fail("sync w/o invalidation")?;
    ctx.mem.fill(pa, PAGE, 0x66).or_fail("refill")?;
    edu.dma_to_ram(iova, 0, PAGE_U32).or_fail("stale DMA")?;
    check!(
        ctx.mem.check_fill(pa, PAGE, 0x66).is_err(),
        "DMA blocked without an IOTLB invalidation: QEMU did not cache the \
         translation, so this configuration cannot show a skipped invalidation"
    );
    no_faults(vtd)?;
    narrate!("stale translation used after unlink without invalidation; now invalidating");

    let psi_before = vtd.stats().iotlb_psi;
    vtd.invalidate(&info, DmaAddr(iova), PAGE_SIZE, false)
        .or_fail("invalidate")?;
    vtd.sync().or_fail("sync")?;
    check!(
        vtd.stats().iotlb_psi == psi_before + 1,
        "one page-selective invalidation expected, stats {:?}",
        vtd.stats()
    );
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        iova,
        pa,
        &[F::unmapped(Access::Write)],
        "DMA after invalidation",
    )?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    free_pages(ctx, pa, 1)
}

/// Two devices in two domains: each reaches its own pages; one device using
/// the other's IOVA is blocked and the fault names it.
fn two_domains_are_isolated_with<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail> {
    let (e0, e1) = (&ctx.edu[0], &ctx.edu[1]);
    let mut da = new_domain::<F>(vtd, ctx, 1, APERTURE_A)?;
    let mut db = new_domain::<F>(vtd, ctx, 2, APERTURE_B)?;
    vtd.attach(e0.id, da.attachment()).or_fail("attach a")?;
    vtd.attach(e1.id, db.attachment()).or_fail("attach b")?;
    check!(
        matches!(
            vtd.device_state(e0.id).or_fail("state")?,
            DeviceState::Translated { did: 1, .. }
        ) && matches!(
            vtd.device_state(e1.id).or_fail("state")?,
            DeviceState::Translated { did: 2, .. }
        ),
        "context entries do not carry the domain-ids"
    );
    let pa = ctx.mem.dma_pages(1).or_fail("page a")?;
    let pb = ctx.mem.dma_pages(1).or_fail("page b")?;
    let mut ta = alloc_tx(&mut da, PAGE_SIZE)?;
    let mut tb = alloc_tx(&mut db, PAGE_SIZE)?;
    let ia = link(&mut da, &mut ta, pa, 0, PAGE_SIZE)?;
    let ib = link(&mut db, &mut tb, pb, 0, PAGE_SIZE)?;
    da.sync(vtd).or_fail("sync a")?;
    db.sync(vtd).or_fail("sync b")?;
    load_buffer(ctx, e0, pa, ia, 0x51)?;
    load_buffer(ctx, e1, pb, ib, 0x52)?;
    ctx.mem.fill(pa, PAGE, 0x11).or_fail("fill a")?;
    ctx.mem.fill(pb, PAGE, 0x22).or_fail("fill b")?;
    e0.dma_to_ram(ia, 0, PAGE_U32).or_fail("edu0 -> a")?;
    e1.dma_to_ram(ib, 0, PAGE_U32).or_fail("edu1 -> b")?;
    check_ok!(
        ctx.mem.check_pattern(pa, PAGE, 0x51),
        "edu0 in its own domain"
    );
    check_ok!(
        ctx.mem.check_pattern(pb, PAGE, 0x52),
        "edu1 in its own domain"
    );
    no_faults(vtd)?;
    // edu1 tries domain A's IOVA.
    expect_write_blocked(
        ctx,
        vtd,
        e1,
        ia,
        pa,
        &[F::unmapped(Access::Write)],
        "edu1 -> a's IOVA",
    )?;
    da.destroy(ta, vtd).or_fail("destroy a")?;
    db.destroy(tb, vtd).or_fail("destroy b")?;
    vtd.detach(e0.id).or_fail("detach")?;
    vtd.detach(e1.id).or_fail("detach")?;
    end_domain(vtd, da)?;
    end_domain(vtd, db)?;
    free_pages(ctx, pa, 1)?;
    free_pages(ctx, pb, 1)
}

/// A 2 MiB-aligned 2 MiB link uses one 2 MiB superpage when CAP.SLLPS allows;
/// DMA anywhere inside lands at the same offset; unlinking it takes one
/// page-selective invalidation (AM = 9) that really removes it. Then the
/// same through a `SharedDomain`'s read side.
fn superpage_2m_used_when_sllps_allows_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    check!(
        F::for_unit(vtd).leaf_allowed(1),
        "QEMU advertises 2 MiB superpages"
    );
    let mut dom = attached_domain::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    let region = ctx.mem.superpage_region();
    ctx.mem
        .fill(region, SIZE_2M as usize, 0x55)
        .or_fail("fill")?;
    let mut tx = alloc_tx(&mut dom, SIZE_2M)?;
    check!(
        tx.iova().0 % SIZE_2M == 0,
        "IOVA {} not 2 MiB aligned",
        tx.iova()
    );
    let tables_before = ctx.mem.table_pages_in_use();
    let walked_before = dom.page_table().or_fail("table")?.table_pages();
    let iova = link(&mut dom, &mut tx, region, 0, SIZE_2M)?;
    dom.sync(vtd).or_fail("sync")?;
    let leaf = dom
        .page_table()
        .or_fail("table")?
        .translate(DmaAddr(iova + 0x12_3456))
        .or_fail("software walk")?;
    check!(
        leaf.0 == PhysAddr(region.0 + 0x12_3456) && leaf.2 == 1,
        "walk gave {:?} at height {}, expected a 2 MiB leaf (height 1)",
        leaf.0,
        leaf.2
    );
    // The walker's count of tables the IOMMU walks, and the lender's of
    // pages lent: the same (the valid-entry counts live in bits 61:52 of
    // the pointers, which the IOMMU ignores: no page of their own).
    let new_tables = dom.page_table().or_fail("table")?.table_pages() - walked_before;
    check!(
        new_tables == usize::from(F::levels(vtd)) - 2,
        "{new_tables} table pages for one 2 MiB link, expected no last-level table"
    );
    let new_lent = ctx.mem.table_pages_in_use() - tables_before;
    check!(
        new_lent == new_tables,
        "{new_lent} pages lent for one 2 MiB link: {new_tables} tables expected"
    );
    // The pointer to the table holding the superpage carries that table's
    // count (1) in bits 61:52, which the unit must ignore: the DMA below
    // walks through it.
    let pointer = dom
        .page_table()
        .or_fail("table")?
        .descriptor_at(DmaAddr(iova), 2)
        .or_fail("the pointer above the superpage")?;
    check!(
        (pointer & F::COUNT_MASK) >> F::COUNT_SHIFT == 1 && pointer & 1 != 0,
        "the pointer to the superpage's table is {pointer:#x}: expected count 1 in bits 61:52"
    );
    dma_inside_superpage(
        ctx,
        edu,
        region,
        iova,
        0x12_3000,
        0x61,
        "DMA inside the superpage",
    )?;
    check_ok!(
        ctx.mem.check_fill(region, 0x12_3000, 0x55),
        "DMA wrote before its target"
    );
    no_faults(vtd)?;

    let s0 = vtd.stats();
    dom.unlink(&mut tx, 0, SIZE_2M).or_fail("unlink")?;
    dom.sync(vtd).or_fail("sync")?;
    let s1 = vtd.stats();
    check!(
        delta(s0.iotlb_psi, s1.iotlb_psi) == 1 && s0.iotlb_dsi == s1.iotlb_dsi,
        "unlink of a superpage: {} PSI, {} DSI",
        delta(s0.iotlb_psi, s1.iotlb_psi),
        delta(s0.iotlb_dsi, s1.iotlb_dsi)
    );
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        iova + 0x12_3000,
        PhysAddr(region.0 + 0x12_3000),
        &[F::unmapped(Access::Write)],
        "DMA after unlink",
    )?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    superpage_2m_shared::<F>(ctx, vtd)
}

/// Through the superpage mapping `region` at `iova`: the edu reads the
/// pattern of `byte` from the superpage's last page into its buffer and
/// writes it at `offset`; the page there must hold it.
fn dma_inside_superpage(
    ctx: &Ctx,
    edu: &Edu,
    region: PhysAddr,
    iova: u64,
    offset: u64,
    byte: u8,
    what: &str,
) -> Result<(), Fail> {
    let src = PhysAddr(region.0 + SIZE_2M - PAGE_SIZE);
    load_buffer(ctx, edu, src, iova + SIZE_2M - PAGE_SIZE, byte)?;
    edu.dma_to_ram(iova + offset, 0, PAGE_U32)
        .or_fail("edu -> the superpage")?;
    check_ok!(
        ctx.mem
            .check_pattern(PhysAddr(region.0 + offset), PAGE, byte),
        "{what}"
    );
    Ok(())
}

/// The same superpage through a `SharedDomain`: its read side (no
/// write-side lock) writes the one entry, the edu's DMA lands inside it,
/// and after a shared unlink and one sync the DMA is blocked.
fn superpage_2m_shared<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let dom = SharedDomain::new(attached_domain::<F>(vtd, ctx, edu, 1, APERTURE_A)?);
    let region = ctx.mem.superpage_region();
    ctx.mem
        .fill(region, SIZE_2M as usize, 0x55)
        .or_fail("fill")?;
    let mut tx = dom
        .try_alloc(SIZE_2M, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated")?;
    let iova = dom
        .link(
            &mut tx,
            region,
            0,
            SIZE_2M,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
        )
        .or_fail("shared link 2 MiB")?
        .0;
    dom.sync(vtd).or_fail("sync")?;
    let height = dom.with(|d| {
        d.page_table()
            .and_then(|pt| pt.translate(DmaAddr(iova + 0x12_3456)))
            .map(|t| (t.0, t.2))
    });
    check!(
        height == Some((PhysAddr(region.0 + 0x12_3456), 1)),
        "shared walk gave {height:?}, expected a 2 MiB leaf (height 1)"
    );
    dma_inside_superpage(
        ctx,
        edu,
        region,
        iova,
        0x4_5000,
        0x62,
        "DMA inside the shared superpage",
    )?;
    no_faults(vtd)?;
    dom.unlink(&mut tx, 0, SIZE_2M).or_fail("shared unlink")?;
    dom.sync(vtd).or_fail("sync")?;
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        iova + 0x4_5000,
        PhysAddr(region.0 + 0x4_5000),
        &[F::unmapped(Access::Write)],
        "DMA after the shared unlink",
    )?;
    dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    vtd.detach(edu.id).or_fail("detach")?;
    end_domain(vtd, dom.into_inner())
}

/// A sync after several unlinks puts exactly one invalidation-wait
/// descriptor in the queue (IQT moves by the invalidations plus one); a sync
/// after several links puts none (nothing to invalidate), except under
/// caching mode, where the links are invalidated and waited for once.
/// Without queued invalidation, no wait descriptor ever, and the
/// invalidations go through the registers.
fn exactly_one_wait_descriptor_per_sync_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let qi = vtd.uses_queued_invalidation();
    check!(qi != ctx.arg("noqi"), "queued invalidation in use: {qi}");
    let cm = vtd.features().caching_mode;
    let mut dom = attached_domain::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    let pool = ctx.mem.dma_pages(3).or_fail("pages")?;
    let mut tx = alloc_tx(&mut dom, 8 * PAGE_SIZE)?;
    let offs = [0u64, 2, 5];

    // `ranges` invalidated; a completion is waited for only when there is
    // something to invalidate (issue 11: no empty waits).
    let check_sync =
        |vtd: &mut Unit, s0: VtdStats, t0: u32, ranges: u64, what: &str| -> Result<(), Fail> {
            let s1 = vtd.stats();
            let t1 = vtd.queue_tail();
            let psi = delta(s0.iotlb_psi, s1.iotlb_psi);
            let want = u64::from(ranges > 0);
            narrate!("{what}: stats {:?}", s1);
            check!(
                delta(s0.syncs, s1.syncs) == want,
                "{what}: syncs {}, expected {want}",
                delta(s0.syncs, s1.syncs)
            );
            check!(psi == ranges, "{what}: {psi} PSI for {ranges} ranges");
            if qi {
                let waits = delta(s0.wait_descriptors, s1.wait_descriptors);
                let queued = delta(s0.queued_descriptors, s1.queued_descriptors);
                check!(
                    waits == want,
                    "{what}: {waits} wait descriptors for one sync, expected {want}"
                );
                check!(
                    queued == psi + want,
                    "{what}: {queued} descriptors for {psi} PSI + {want} wait"
                );
                let n = vtd.queue_entries();
                let moved = u64::from((t1 + n - t0) % n);
                check!(
                    moved == queued,
                    "{what}: IQT moved {moved} slots, {queued} queued"
                );
            } else {
                check!(
                    s1.wait_descriptors == 0,
                    "{what}: wait descriptor without QI"
                );
                check!(
                    delta(s0.register_invalidations, s1.register_invalidations) == psi,
                    "{what}: register invalidations {:?}",
                    s1
                );
            }
            Ok(())
        };

    let (s0, t0) = (vtd.stats(), vtd.queue_tail());
    for (i, &o) in offs.iter().enumerate() {
        let pa = PhysAddr(pool.0 + i as u64 * PAGE_SIZE);
        link(&mut dom, &mut tx, pa, o * PAGE_SIZE, PAGE_SIZE)?;
    }
    dom.sync(vtd).or_fail("sync links")?;
    // Caching mode: newly present entries are invalidated too (and waited
    // for once); otherwise the sync waits for nothing.
    check_sync(vtd, s0, t0, if cm { 3 } else { 0 }, "links")?;

    let last = PhysAddr(pool.0 + 2 * PAGE_SIZE);
    load_buffer(ctx, edu, last, tx.iova().0 + 5 * PAGE_SIZE, 0x71)?;
    no_faults(vtd)?;

    let (s0, t0) = (vtd.stats(), vtd.queue_tail());
    for &o in offs.iter() {
        dom.unlink(&mut tx, o * PAGE_SIZE, PAGE_SIZE)
            .or_fail("unlink")?;
    }
    dom.sync(vtd).or_fail("sync unlinks")?;
    check_sync(vtd, s0, t0, 3, "unlinks")?;

    dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    vtd.detach(edu.id).or_fail("detach")?;
    end_domain(vtd, dom)?;
    free_pages(ctx, pool, 3)
}

/// With one fault record (NFR = 0): a second device's fault while the record
/// still holds the first is reported as primary fault overflow and not
/// recorded; clearing both lets the next fault be recorded.
pub fn fault_overflow_reported_and_clearing_records_next_fault(ctx: &mut Ctx) -> Result<(), Fail> {
    with_unit(ctx, |vtd| {
        let (e0, e1) = (&ctx.edu[0], &ctx.edu[1]);
        check!(
            vtd.features().fault_records == 1,
            "QEMU has one fault record"
        );
        let dst = ctx.mem.dma_pages(1).or_fail("page")?;
        // Both devices are blocked: every DMA faults.
        e0.dma_to_ram(dst.0, 0, 64).or_fail("edu0 DMA")?;
        let first = vtd.read_fault(0).or_fail("first fault not recorded")?;
        check!(
            first.source_id == e0.id.source_id(),
            "first fault from {:#x}",
            first.source_id
        );
        check!(!vtd.fault_status().overflow, "overflow after one fault");

        e1.dma_to_ram(dst.0 + PAGE_SIZE / 2, 0, 64)
            .or_fail("edu1 DMA")?;
        let st = vtd.fault_status();
        check!(
            st.overflow,
            "second fault with the record full did not set PFO"
        );
        let still = vtd.read_fault(0).or_fail("record lost")?;
        check!(
            still.source_id == e0.id.source_id(),
            "record now from {:#x}: the second fault overwrote it",
            still.source_id
        );

        check!(
            vtd.fault_irq_pending(),
            "FECTL.IP clear with a fault recorded and the interrupt masked"
        );
        // The interrupt-handler entry drains the records and the overflow.
        let mut recs: heapless::Vec<FaultRecord, 8> = heapless::Vec::new();
        let st = vtd.handle_irq(|r| {
            let _ = recs.push(r);
        });
        check!(st.overflow, "handle_irq did not report the overflow");
        check!(
            !vtd.fault_irq_pending(),
            "FECTL.IP still set after handle_irq serviced every fault"
        );
        check!(
            recs.len() == 1 && recs.first().map(|r| r.source_id) == Some(e0.id.source_id()),
            "handle_irq returned {:?}",
            recs
        );
        check!(!vtd.fault_status().overflow, "PFO not cleared");
        check!(vtd.read_fault(0).is_none(), "record not cleared");

        e1.dma_to_ram(dst.0 + PAGE_SIZE / 2, 0, 64)
            .or_fail("edu1 DMA again")?;
        expect_one_fault(
            vtd,
            e1.id,
            dst.0,
            &[
                FaultReason::RootEntryNotPresent,
                FaultReason::ContextEntryNotPresent,
            ],
            Access::Write,
        )?;
        free_pages(ctx, dst, 1)
    })
}

/// Detach removes the present context entry and blocks the device at once;
/// a pass-through attach (TT = 10b) lets DMA use physical addresses.
fn detach_blocks_and_bypass_passes_through_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[1];
    let OnePage { dom, tx, pa, iova } = one_page::<F>(vtd, ctx, edu, 2, APERTURE_B)?;
    load_buffer(ctx, edu, pa, iova, 0x81)?;
    no_faults(vtd)?;

    vtd.detach(edu.id).or_fail("detach")?;
    let st = vtd.device_state(edu.id).or_fail("state")?;
    check!(
        st == DeviceState::Blocked,
        "after detach the device is {st:?}"
    );
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        iova,
        pa,
        &[FaultReason::ContextEntryNotPresent],
        "DMA after detach",
    )?;

    vtd.attach(edu.id, Attachment::Bypass).or_fail("bypass")?;
    let st = vtd.device_state(edu.id).or_fail("state")?;
    check!(
        st == DeviceState::PassThrough {
            did: vtd.bypass_domain_id()
        },
        "after a bypass attach the device is {st:?}"
    );
    edu.dma_to_ram(pa.0, 0, PAGE_U32)
        .or_fail("pass-through DMA")?;
    check_ok!(
        ctx.mem.check_pattern(pa, PAGE, 0x81),
        "pass-through DMA to the physical address"
    );
    no_faults(vtd)?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    free_pages(ctx, pa, 1)
}

/// An invalid descriptor stops the queue: the next sync reports the queue
/// error with the slot, the driver patches it, and the queue runs on. Under
/// `noqi` the raw-submit path refuses instead.
fn invalid_descriptor_reported_and_queue_recovers_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let bad = InvDesc::from_raw([0xf, 0]);
    if !vtd.uses_queued_invalidation() {
        check!(
            matches!(vtd.submit_raw(bad), Err(BackendError::Unsupported(_))),
            "raw descriptor accepted without a queue"
        );
        return Ok(());
    }
    let slot = vtd.queue_tail();
    vtd.submit_raw(bad).or_fail("submit")?;
    match vtd.sync() {
        Err(BackendError::QueueError { code, index }) => {
            narrate!("queue error code {code:#x} at slot {index}");
            check!(code & 0x10 != 0, "code {code:#x} lacks IQE");
            check!(
                index == slot,
                "error at slot {index}, bad descriptor in slot {slot}"
            );
        }
        other => fail!("sync after an invalid descriptor returned {other:?}"),
    }
    check!(!vtd.fault_status().queue_error, "IQE not cleared");
    vtd.sync().or_fail("sync after recovery")?;
    // Translation still works after the recovery.
    let edu = &ctx.edu[0];
    let OnePage { dom, tx, pa, iova } = one_page::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    load_buffer(ctx, edu, pa, iova, 0x91)?;
    expect_write_lands(ctx, edu, iova, pa, 0x91, "DMA after queue recovery")?;
    no_faults(vtd)?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    free_pages(ctx, pa, 1)
}

/// Link a page, DMA through it, unlink it, and check the next DMA is blocked:
/// proves the invalidation path in use works.
fn link_dma_unlink_blocked<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
    seed: u8,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let OnePage {
        mut dom,
        mut tx,
        pa,
        iova,
    } = one_page::<F>(vtd, ctx, edu, 1, APERTURE_A)?;
    load_buffer(ctx, edu, pa, iova, seed)?;
    expect_write_lands(ctx, edu, iova, pa, seed, "DMA through the linked page")?;
    dom.unlink(&mut tx, 0, PAGE_SIZE).or_fail("unlink")?;
    dom.sync(vtd).or_fail("sync")?;
    expect_write_blocked(
        ctx,
        vtd,
        edu,
        iova,
        pa,
        &[F::unmapped(Access::Write)],
        "DMA after unlink",
    )?;
    destroy_and_detach(vtd, dom, tx, edu)?;
    free_pages(ctx, pa, 1)
}

/// Switching between queued and register-based invalidation with
/// translation on: every GCMD write keeps TE (GSTS.TES stays set), QIES
/// follows, and invalidation works in each mode. Under scalable mode the
/// switch is refused and nothing changes.
fn invalidation_mode_switch_keeps_translation_on_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    if vtd.is_scalable() {
        // Scalable mode needs the queue: switching it off is refused
        // before any GCMD write, and everything stays on.
        check!(
            matches!(
                vtd.set_queued_invalidation(false),
                Err(BackendError::Unsupported(_))
            ),
            "queued invalidation switched off under scalable mode"
        );
        let gsts = vtd.global_status();
        check!(
            gsts & (1 << 31) != 0 && gsts & (1 << 26) != 0,
            "GSTS={gsts:#x} after the refused switch"
        );
        return link_dma_unlink_blocked::<F>(ctx, vtd, 0xa5);
    }
    let start = vtd.uses_queued_invalidation();
    for (step, qi) in [!start, start].into_iter().enumerate() {
        vtd.set_queued_invalidation(qi).or_fail("switch")?;
        let gsts = vtd.global_status();
        narrate!("queued invalidation {qi}: GSTS={gsts:#x}");
        check!(
            gsts & (1 << 31) != 0,
            "TES lost by the QIE write (GSTS={gsts:#x})"
        );
        check!(
            (gsts & (1 << 26) != 0) == qi && vtd.uses_queued_invalidation() == qi,
            "QIES {:#x} after asking for {qi}",
            gsts & (1 << 26)
        );
        let s0 = vtd.stats();
        link_dma_unlink_blocked::<F>(ctx, vtd, 0xa0 + step as u8)?;
        let s1 = vtd.stats();
        if qi {
            check!(
                s1.wait_descriptors > s0.wait_descriptors,
                "no wait descriptor with QI"
            );
            check!(
                s1.register_invalidations == s0.register_invalidations,
                "register invalidation with QI"
            );
        } else {
            check!(
                s1.wait_descriptors == s0.wait_descriptors,
                "wait descriptor without QI"
            );
            check!(
                s1.register_invalidations > s0.register_invalidations,
                "no register invalidation"
            );
        }
    }
    Ok(())
}

per_format!(
    /// [`noncontiguous_transaction_dma_both_ways_hits_exact_pages_with`] in this run's table format.
    noncontiguous_transaction_dma_both_ways_hits_exact_pages => with_unit noncontiguous_transaction_dma_both_ways_hits_exact_pages_with
);
per_format!(
    /// [`unlinked_page_blocks_dma_and_fault_is_decoded_with`] in this run's table format.
    unlinked_page_blocks_dma_and_fault_is_decoded => with_unit unlinked_page_blocks_dma_and_fault_is_decoded_with
);
per_format!(
    /// [`skipped_iotlb_invalidation_is_caught_with`] in this run's table format.
    skipped_iotlb_invalidation_is_caught => with_unit skipped_iotlb_invalidation_is_caught_with
);
per_format!(
    /// [`two_domains_are_isolated_with`] in this run's table format.
    two_domains_are_isolated => with_unit two_domains_are_isolated_with
);
per_format!(
    /// [`superpage_2m_used_when_sllps_allows_with`] in this run's table format.
    superpage_2m_used_when_sllps_allows => with_unit superpage_2m_used_when_sllps_allows_with
);
per_format!(
    /// [`exactly_one_wait_descriptor_per_sync_with`] in this run's table format.
    exactly_one_wait_descriptor_per_sync => with_unit exactly_one_wait_descriptor_per_sync_with
);
per_format!(
    /// [`detach_blocks_and_bypass_passes_through_with`] in this run's table format.
    detach_blocks_and_bypass_passes_through => with_unit detach_blocks_and_bypass_passes_through_with
);
per_format!(
    /// [`invalid_descriptor_reported_and_queue_recovers_with`] in this run's table format.
    invalid_descriptor_reported_and_queue_recovers => with_unit invalid_descriptor_reported_and_queue_recovers_with
);
per_format!(
    /// [`invalidation_mode_switch_keeps_translation_on_with`] in this run's table format.
    invalidation_mode_switch_keeps_translation_on => with_unit invalidation_mode_switch_keeps_translation_on_with
);
