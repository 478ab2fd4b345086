//! Peer-to-peer DMA through the host bridge: edu (the client) DMAs into the
//! RAM-backed BAR 2 of an ivshmem-plain (the provider) through the SMMU.
//!
//! Both devices sit on the root bus of `virt`'s one host bridge, so the
//! registry's answer is [`P2pMapType::ThruHostBridge`](bare_iommu::p2p::P2pMapType)
//! once that bridge is allowed: the BAR is mapped through the SMMU with
//! device-memory attributes. QEMU does not model switch-level P2P routing,
//! so the bus-address path is proven by host tests (tests/p2p.rs) only.

use bare_iommu::addr::PAGE_SIZE;
use bare_iommu::p2p::{DeviceTopology, P2pProvider, P2pRegistry};
use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::{DmaDirection, MapAttrs, PteFormat};
use bare_iommu::smmuv3::{Smmu, SmmuConfig};
use bare_iommu::{DmaError, DmaKind, IommuBackend, PhysAddr, TableFormat};

use super::smmu::{
    Dom, Mem, PAGE, alloc, bring_up, detach_all, domain, drain, expect_translation_fault,
    fault_stage, teardown, with_preferred_stage,
};
use crate::harness::{Ctx, Fail, OrFail};
use crate::ivshmem::Ivshmem;
use crate::memory::pattern;

/// The host bridge both devices are below (`virt` has one).
const HOST_BRIDGE: u16 = 0;
/// Where in BAR 2 the DMA goes: page 3, so the pages around it can show a
/// DMA that landed off target.
const TARGET_OFF: u64 = 3 * PAGE_SIZE;
/// Bytes one DMA moves. A blocked DMA makes one event per 4 bytes: 64
/// events fit the event queue (128 records) with room to spare.
const LEN: u32 = 256;
/// Pattern seed of the bytes edu carries.
const SEED: u8 = 0x71;

fn ivshmem(ctx: &Ctx) -> Result<Ivshmem, Fail> {
    ctx.ivshmem.clone()
}

/// The registry the board would build: ivshmem BAR 2 as provider, both
/// devices on the root bus of host bridge 0 (empty paths).
fn registry(ctx: &Ctx, iv: &Ivshmem) -> Result<P2pRegistry, Fail> {
    let mut reg = P2pRegistry::new();
    // The BAR register holds the bus address; the DTB said where the CPU
    // sees it. (On `virt` the two are equal, but nothing here relies on it.)
    let bus_offset = iv.bar2_bus.wrapping_sub(iv.bar2.get());
    narrate!(
        "provider {}: BAR2 CPU {} bus {:#x} (bus offset {bus_offset:#x}), {} KiB",
        iv.id,
        iv.bar2,
        iv.bar2_bus,
        iv.len >> 10
    );
    reg.register(P2pProvider {
        device: iv.id,
        cpu_start: iv.bar2,
        len: iv.len,
        bus_offset,
    })
    .or_fail("register provider")?;
    for d in [iv.id, ctx.edu[0].id] {
        reg.set_topology(DeviceTopology::new(d, HOST_BRIDGE, &[]).or_fail("topology")?)
            .or_fail("set topology")?;
    }
    Ok(reg)
}

/// Checks BAR 2 `[off, off + len)` holds `byte` everywhere, as the CPU reads it.
fn bar_filled(iv: &Ivshmem, off: u64, len: u64, byte: u8, what: &str) -> Result<(), Fail> {
    for i in 0..len {
        let got = iv.byte(off + i);
        if got != byte {
            fail!(
                "{what}: BAR2 byte {:#x} is {got:#04x}, expected {byte:#04x}",
                off + i
            );
        }
    }
    Ok(())
}

/// A host page holding the pattern, linked read-only in its own
/// transaction; edu reads it into its buffer. Returns the transaction.
fn load_pattern<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    dom: &mut Dom<F>,
    reg: &mut P2pRegistry,
) -> Result<bare_iommu::IovaState, Fail> {
    let edu = &ctx.edu[0];
    let src = ctx.mem.dma_pages(1).or_fail("page")?;
    ctx.mem.fill_pattern(src, PAGE, SEED);
    let mut tx = alloc(dom, PAGE_SIZE)?;
    dom.link_p2p(
        &mut tx,
        reg,
        edu.id,
        src,
        0,
        PAGE_SIZE,
        DmaDirection::ToDevice,
    )
    .or_fail("link host page")?;
    check_eq!(
        tx.kind(),
        Some(DmaKind::Translated),
        "kind of a host-memory link"
    );
    dom.sync(smmu).or_fail("sync")?;
    edu.dma_from_ram(tx.iova().get(), 0, LEN)
        .or_fail("edu read DMA")?;
    Ok(tx)
}

// ---------------------------------------------------------------------------

/// edu DMAs a pattern through a ThruHostBridge mapping into ivshmem's BAR 2;
/// the CPU reads it back through the BAR; the SMMU's entry is Device-nGnRE.
/// After unlink + sync the same DMA is blocked (BAR bytes unchanged) and
/// reported as F_TRANSLATION with edu's StreamID and the IOVA.
pub fn p2p_dma_through_host_bridge_lands_in_peer_bar(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ivshmem(ctx)?;
    let mut reg = registry(ctx, &iv)?;
    reg.allow_host_bridge(HOST_BRIDGE)
        .or_fail("allow host bridge")?;
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        through_host_bridge(ctx, &mut smmu, fmt, &iv, &mut reg)?;
    });
    teardown(&mut smmu, ctx)
}

fn through_host_bridge<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    fmt: F,
    iv: &Ivshmem,
    reg: &mut P2pRegistry,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = domain(smmu, ctx, fmt, 20)?;
    let format = dom.info().or_fail("info")?.format;
    smmu.attach(edu.id, dom.attachment()).or_fail("attach")?;
    let src_tx = load_pattern(ctx, smmu, &mut dom, reg)?;

    let target = PhysAddr(iv.bar2.get() + TARGET_OFF);
    let mut tx = alloc(&mut dom, PAGE_SIZE)?;
    let iova = dom
        .link_p2p(
            &mut tx,
            reg,
            edu.id,
            target,
            0,
            PAGE_SIZE,
            DmaDirection::FromDevice,
        )
        .or_fail("link_p2p BAR2 page")?;
    check_eq!(
        tx.kind(),
        Some(DmaKind::P2pThruHostBridge),
        "kind of the BAR2 link"
    );
    check_eq!(tx.provider(), Some(iv.id), "provider recorded in the state");
    check_eq!(iova, tx.iova(), "a host-bridge link returns the IOVA");
    let (pa, attrs) = dom.translate(iova).or_fail("SMMU table entry")?;
    check_eq!(pa, target, "the IOVA's output address");
    check!(
        attrs.contains(MapAttrs::MMIO),
        "{} entry for the BAR is not Device-nGnRE: {attrs:?}",
        if format == TableFormat::ArmStage2 {
            "stage-2"
        } else {
            "stage-1"
        }
    );
    dom.sync(smmu).or_fail("sync")?;
    narrate!(
        "{} -> {}: IOVA {iova} -> BAR2 {target} (P2pThruHostBridge, Device-nGnRE)",
        edu.id,
        iv.id
    );

    // Pages around the target show a DMA that landed off target.
    iv.fill(TARGET_OFF - PAGE_SIZE, 3 * PAGE, 0);
    let _ = drain(smmu);
    edu.dma_to_ram(iova.get(), 0, LEN)
        .or_fail("edu write DMA into BAR2")?;
    for i in 0..u64::from(LEN) {
        let got = iv.byte(TARGET_OFF + i);
        let expected = pattern(SEED, i as usize);
        check_eq!(
            got,
            expected,
            "BAR2 byte {:#x} read by the CPU",
            TARGET_OFF + i
        );
    }
    bar_filled(
        iv,
        TARGET_OFF + u64::from(LEN),
        PAGE_SIZE - u64::from(LEN),
        0,
        "past the DMA",
    )?;
    bar_filled(iv, TARGET_OFF - PAGE_SIZE, PAGE_SIZE, 0, "page below")?;
    bar_filled(iv, TARGET_OFF + PAGE_SIZE, PAGE_SIZE, 0, "page above")?;
    let d = drain(smmu);
    check_eq!(d.report.events, 0, "events during the P2P DMA");
    narrate!("CPU read {LEN} bytes of the pattern back through BAR2");

    // Unlink: the same DMA is blocked and reported.
    check_eq!(
        dom.unlink(&mut tx, 0, PAGE_SIZE),
        Ok(PAGE_SIZE),
        "unlink BAR2 page"
    );
    dom.sync(smmu).or_fail("sync after unlink")?;
    check_eq!(tx.kind(), None, "kind after everything is unlinked");
    check!(
        dom.translate(iova).is_none(),
        "IOVA still translates after unlink"
    );
    iv.fill(TARGET_OFF, PAGE, 0xa5);
    edu.dma_to_ram(iova.get(), 0, LEN)
        .or_fail("edu DMA after unlink")?;
    bar_filled(iv, TARGET_OFF, PAGE_SIZE, 0xa5, "DMA after unlink")?;
    let d = drain(smmu);
    check!(!d.report.overflow, "event queue overflowed");
    expect_translation_fault(
        &d,
        edu.id.stream_id(),
        iova.get(),
        iova.get() + u64::from(LEN),
        fault_stage(format),
    )?;
    if let Some(e) = d.events.first() {
        narrate!(
            "after unlink: blocked, {} event(s), first {e}",
            d.report.events
        );
    }

    dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    dom.destroy(src_tx, smmu).or_fail("destroy")?;
    detach_all(smmu, ctx)
}

/// Without an allowed host bridge, linking the BAR is refused with
/// `P2pNotSupported` and nothing is mapped (edu's DMA to the IOVA faults,
/// BAR bytes unchanged); a transaction mixing host memory and the BAR is
/// refused with `MixedP2p` either way round.
pub fn p2p_without_an_allowed_host_bridge_is_refused(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ivshmem(ctx)?;
    let mut reg = registry(ctx, &iv)?;
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        refused(ctx, &mut smmu, fmt, &iv, &mut reg)?;
    });
    teardown(&mut smmu, ctx)
}

fn refused<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    fmt: F,
    iv: &Ivshmem,
    reg: &mut P2pRegistry,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = domain(smmu, ctx, fmt, 21)?;
    let format = dom.info().or_fail("info")?.format;
    smmu.attach(edu.id, dom.attachment()).or_fail("attach")?;
    let src_tx = load_pattern(ctx, smmu, &mut dom, reg)?;

    let target = PhysAddr(iv.bar2.get() + TARGET_OFF);
    let mut tx = alloc(&mut dom, 2 * PAGE_SIZE)?;
    let dir = DmaDirection::FromDevice;
    check_eq!(
        dom.link_p2p(&mut tx, reg, edu.id, target, 0, PAGE_SIZE, dir),
        Err(DmaError::P2pNotSupported {
            provider: iv.id,
            client: edu.id
        }),
        "link_p2p without an allowed host bridge"
    );
    check_eq!(tx.linked(), 0, "bytes linked after the refusal");
    check_eq!(tx.kind(), None, "kind after the refusal");
    check!(
        dom.translate(tx.iova()).is_none(),
        "the refused link wrote a table entry"
    );
    dom.sync(smmu).or_fail("sync")?;
    iv.fill(TARGET_OFF, PAGE, 0x3c);
    let _ = drain(smmu);
    edu.dma_to_ram(tx.iova().get(), 0, LEN)
        .or_fail("edu DMA to the refused IOVA")?;
    bar_filled(iv, TARGET_OFF, PAGE_SIZE, 0x3c, "DMA to the refused IOVA")?;
    let d = drain(smmu);
    expect_translation_fault(
        &d,
        edu.id.stream_id(),
        tx.iova().get(),
        tx.iova().get() + u64::from(LEN),
        fault_stage(format),
    )?;
    narrate!(
        "refused: P2pNotSupported; DMA to {} faulted ({} event(s))",
        tx.iova(),
        d.report.events
    );

    // Allow the bridge, so that mixing is the only reason left to refuse.
    reg.allow_host_bridge(0).or_fail("allow host bridge")?;
    let host = ctx.mem.dma_pages(1).or_fail("page")?;
    dom.link_p2p(&mut tx, reg, edu.id, host, 0, PAGE_SIZE, dir)
        .or_fail("link host page")?;
    check_eq!(
        dom.link_p2p(&mut tx, reg, edu.id, target, PAGE_SIZE, PAGE_SIZE, dir),
        Err(DmaError::MixedP2p),
        "BAR2 after host memory"
    );
    check_eq!(tx.linked(), PAGE_SIZE, "bytes linked after the refusal");
    check!(
        dom.translate(bare_iommu::DmaAddr(tx.iova().get() + PAGE_SIZE))
            .is_none(),
        "the refused BAR2 link wrote a table entry"
    );
    check_eq!(dom.unlink(&mut tx, 0, PAGE_SIZE), Ok(PAGE_SIZE), "unlink");
    dom.link_p2p(&mut tx, reg, edu.id, target, 0, PAGE_SIZE, dir)
        .or_fail("link BAR2 page")?;
    check_eq!(
        tx.kind(),
        Some(DmaKind::P2pThruHostBridge),
        "kind once the bridge is allowed"
    );
    check_eq!(
        dom.link_p2p(&mut tx, reg, edu.id, host, PAGE_SIZE, PAGE_SIZE, dir),
        Err(DmaError::MixedP2p),
        "host memory after BAR2 (link_p2p)"
    );
    check_eq!(
        dom.link(&mut tx, host, PAGE_SIZE, PAGE_SIZE, dir, MapAttrs::empty()),
        Err(DmaError::MixedP2p),
        "host memory after BAR2 (link)"
    );
    check_eq!(tx.linked(), PAGE_SIZE, "bytes linked after the refusals");

    dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    dom.destroy(src_tx, smmu).or_fail("destroy")?;
    detach_all(smmu, ctx)
}
