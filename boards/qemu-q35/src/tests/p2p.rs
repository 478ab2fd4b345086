//! Peer-to-peer DMA through the host bridge: edu (the client) DMAs into the
//! RAM-backed BAR 2 of an ivshmem-plain (the provider) through VT-d.
//!
//! Both devices sit on the root bus of q35's one host bridge, so the
//! registry's answer is `ThruHostBridge` once that bridge is allowed: the BAR
//! is mapped through VT-d with device-memory attributes (not snooped: the
//! SNP bit stays clear, which only shows in the entry when ECAP.SC is set —
//! QEMU's is not). QEMU does not model switch-level P2P routing, so the
//! bus-address path is proven by host tests (tests/p2p.rs) only.

use bare_iommu::p2p::{DeviceTopology, P2pProvider, P2pRegistry};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::vtd::{Access, VtdFirstLevel};
use bare_iommu::{
    DmaAddr, DmaDirection, DmaError, DmaKind, IommuBackend, IovaState, MapAttrs, PAGE_SIZE,
    PhysAddr,
};

use super::vtd::{
    APERTURE_A, BoardFormat, Dom, PAGE, Unit, alloc_tx, expect_one_fault, first_level, free_pages,
    new_domain, no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail};
use crate::ivshmem::Ivshmem;
use crate::memory::pattern_byte;
use crate::{check, fail, narrate};

/// The host bridge both devices are below (q35 has one).
const HOST_BRIDGE: u16 = 0;
/// Where in BAR 2 the DMA goes: page 3, so the pages around it can show a
/// DMA that landed off target.
const TARGET_OFF: u64 = 3 * PAGE_SIZE;
/// Bytes one DMA moves.
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
    // Bus address (BAR register) minus CPU address: 0 on x86, computed all
    // the same.
    let bus_offset = iv.bar2_bus.wrapping_sub(iv.bar2.0);
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

/// A host page holding the pattern, linked read-only through `link_p2p` in
/// its own transaction; edu reads it into its buffer. Returns the
/// transaction and the page.
fn load_pattern<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
    dom: &mut Dom<F>,
    reg: &mut P2pRegistry,
) -> Result<(IovaState, PhysAddr), Fail> {
    let edu = &ctx.edu[0];
    let src = ctx.mem.dma_pages(1).or_fail("page")?;
    ctx.mem
        .fill_pattern(src, PAGE, SEED)
        .or_fail("fill source")?;
    let mut tx = alloc_tx(dom, PAGE_SIZE)?;
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
    check!(
        tx.kind() == Some(DmaKind::Translated),
        "kind of a host-memory link: {:?}",
        tx.kind()
    );
    dom.sync(vtd).or_fail("sync")?;
    edu.dma_from_ram(tx.iova().0, 0, LEN)
        .or_fail("edu read DMA")?;
    Ok((tx, src))
}

// ---------------------------------------------------------------------------

per_format!(
    /// edu DMAs a pattern through a ThruHostBridge mapping into ivshmem's
    /// BAR 2; the CPU reads it back through the BAR. After unlink + sync the
    /// same DMA is blocked (BAR bytes unchanged) and the fault record names
    /// edu's source-id, the IOVA's page, a write and the not-present reason.
    p2p_dma_through_host_bridge_lands_in_peer_bar => through_host_bridge
);

fn through_host_bridge<F: BoardFormat>(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ivshmem(ctx)?;
    let mut reg = registry(ctx, &iv)?;
    reg.allow_host_bridge(HOST_BRIDGE)
        .or_fail("allow host bridge")?;
    with_unit(ctx, |vtd| {
        let edu = &ctx.edu[0];
        let mut dom = new_domain::<F>(vtd, ctx, 20, APERTURE_A)?;
        vtd.attach(edu.id, dom.attachment()).or_fail("attach")?;
        let (src_tx, src) = load_pattern(ctx, vtd, &mut dom, &mut reg)?;

        let target = PhysAddr(iv.bar2.0 + TARGET_OFF);
        let mut tx = alloc_tx(&mut dom, PAGE_SIZE)?;
        let iova = dom
            .link_p2p(
                &mut tx,
                &mut reg,
                edu.id,
                target,
                0,
                PAGE_SIZE,
                DmaDirection::FromDevice,
            )
            .or_fail("link_p2p BAR2 page")?;
        check!(
            tx.kind() == Some(DmaKind::P2pThruHostBridge),
            "kind of the BAR2 link: {:?}",
            tx.kind()
        );
        check!(
            tx.provider() == Some(iv.id),
            "provider recorded in the state: {:?}",
            tx.provider()
        );
        check!(
            iova == tx.iova(),
            "a host-bridge link returns the IOVA, got {iova}"
        );
        let (pa, attrs) = dom.translate(iova).or_fail("VT-d table entry")?;
        check!(
            pa == target,
            "the IOVA's output address {pa}, expected {target}"
        );
        if vtd.features().sc && !first_level(ctx) {
            check!(
                attrs.contains(MapAttrs::MMIO),
                "entry for the BAR is snooped: {attrs:?}"
            );
        }
        dom.sync(vtd).or_fail("sync")?;
        narrate!(
            "{} -> {}: IOVA {iova} -> BAR2 {target} (P2pThruHostBridge)",
            edu.id,
            iv.id
        );

        // Pages around the target show a DMA that landed off target.
        iv.fill(TARGET_OFF - PAGE_SIZE, 3 * PAGE, 0);
        edu.dma_to_ram(iova.0, 0, LEN)
            .or_fail("edu write DMA into BAR2")?;
        for i in 0..u64::from(LEN) {
            let got = iv.byte(TARGET_OFF + i);
            let expected = pattern_byte(SEED, i as usize);
            check!(
                got == expected,
                "BAR2 byte {:#x} read by the CPU is {got:#04x}, expected {expected:#04x}",
                TARGET_OFF + i
            );
        }
        bar_filled(
            &iv,
            TARGET_OFF + u64::from(LEN),
            PAGE_SIZE - u64::from(LEN),
            0,
            "past the DMA",
        )?;
        bar_filled(&iv, TARGET_OFF - PAGE_SIZE, PAGE_SIZE, 0, "page below")?;
        bar_filled(&iv, TARGET_OFF + PAGE_SIZE, PAGE_SIZE, 0, "page above")?;
        no_faults(vtd)?;
        narrate!("CPU read {LEN} bytes of the pattern back through BAR2");

        // Unlink: the same DMA is blocked and reported.
        check!(
            dom.unlink(&mut tx, 0, PAGE_SIZE) == Ok(PAGE_SIZE),
            "unlink BAR2 page"
        );
        dom.sync(vtd).or_fail("sync after unlink")?;
        check!(
            tx.kind().is_none(),
            "kind after everything is unlinked: {:?}",
            tx.kind()
        );
        check!(
            dom.translate(iova).is_none(),
            "IOVA still translates after unlink"
        );
        iv.fill(TARGET_OFF, PAGE, 0xa5);
        edu.dma_to_ram(iova.0, 0, LEN)
            .or_fail("edu DMA after unlink")?;
        bar_filled(&iv, TARGET_OFF, PAGE_SIZE, 0xa5, "DMA after unlink")?;
        expect_one_fault(
            vtd,
            edu.id,
            iova.0,
            &[F::unmapped(Access::Write)],
            Access::Write,
        )?;
        narrate!("after unlink: blocked, fault recorded for {}", edu.id);

        dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
        dom.destroy(src_tx, vtd).or_fail("destroy")?;
        vtd.detach(edu.id).or_fail("detach")?;
        free_pages(ctx, src, 1)
    })
}

per_format!(
    /// Without an allowed host bridge, linking the BAR is refused with
    /// `P2pNotSupported` and nothing is mapped (edu's DMA to the IOVA faults,
    /// BAR bytes unchanged); a transaction mixing host memory and the BAR is
    /// refused with `MixedP2p` either way round.
    p2p_without_an_allowed_host_bridge_is_refused => refused
);

fn refused<F: BoardFormat>(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ivshmem(ctx)?;
    let mut reg = registry(ctx, &iv)?;
    with_unit(ctx, |vtd| {
        let edu = &ctx.edu[0];
        let mut dom = new_domain::<F>(vtd, ctx, 21, APERTURE_A)?;
        vtd.attach(edu.id, dom.attachment()).or_fail("attach")?;
        let (src_tx, src) = load_pattern(ctx, vtd, &mut dom, &mut reg)?;

        let target = PhysAddr(iv.bar2.0 + TARGET_OFF);
        let mut tx = alloc_tx(&mut dom, 2 * PAGE_SIZE)?;
        let dir = DmaDirection::FromDevice;
        let r = dom.link_p2p(&mut tx, &mut reg, edu.id, target, 0, PAGE_SIZE, dir);
        check!(
            r == Err(DmaError::P2pNotSupported {
                provider: iv.id,
                client: edu.id
            }),
            "link_p2p without an allowed host bridge: {r:?}"
        );
        check!(
            tx.linked() == 0,
            "{} bytes linked after the refusal",
            tx.linked()
        );
        check!(
            tx.kind().is_none(),
            "kind after the refusal: {:?}",
            tx.kind()
        );
        check!(
            dom.translate(tx.iova()).is_none(),
            "the refused link wrote a table entry"
        );
        dom.sync(vtd).or_fail("sync")?;
        iv.fill(TARGET_OFF, PAGE, 0x3c);
        edu.dma_to_ram(tx.iova().0, 0, LEN)
            .or_fail("edu DMA to the refused IOVA")?;
        bar_filled(&iv, TARGET_OFF, PAGE_SIZE, 0x3c, "DMA to the refused IOVA")?;
        expect_one_fault(
            vtd,
            edu.id,
            tx.iova().0,
            &[F::unmapped(Access::Write)],
            Access::Write,
        )?;
        narrate!("refused: P2pNotSupported; DMA to {} faulted", tx.iova());

        // Allow the bridge, so that mixing is the only reason left to refuse.
        reg.allow_host_bridge(HOST_BRIDGE)
            .or_fail("allow host bridge")?;
        let host = ctx.mem.dma_pages(1).or_fail("page")?;
        dom.link_p2p(&mut tx, &mut reg, edu.id, host, 0, PAGE_SIZE, dir)
            .or_fail("link host page")?;
        let r = dom.link_p2p(&mut tx, &mut reg, edu.id, target, PAGE_SIZE, PAGE_SIZE, dir);
        check!(
            r == Err(DmaError::MixedP2p),
            "BAR2 after host memory: {r:?}"
        );
        check!(
            tx.linked() == PAGE_SIZE,
            "{} bytes linked after the refusal",
            tx.linked()
        );
        check!(
            dom.translate(DmaAddr(tx.iova().0 + PAGE_SIZE)).is_none(),
            "the refused BAR2 link wrote a table entry"
        );
        check!(
            dom.unlink(&mut tx, 0, PAGE_SIZE) == Ok(PAGE_SIZE),
            "unlink host page"
        );
        dom.link_p2p(&mut tx, &mut reg, edu.id, target, 0, PAGE_SIZE, dir)
            .or_fail("link BAR2 page")?;
        check!(
            tx.kind() == Some(DmaKind::P2pThruHostBridge),
            "kind once the bridge is allowed: {:?}",
            tx.kind()
        );
        let r = dom.link_p2p(&mut tx, &mut reg, edu.id, host, PAGE_SIZE, PAGE_SIZE, dir);
        check!(
            r == Err(DmaError::MixedP2p),
            "host memory after BAR2 (link_p2p): {r:?}"
        );
        let r = dom.link(&mut tx, host, PAGE_SIZE, PAGE_SIZE, dir, MapAttrs::empty());
        check!(
            r == Err(DmaError::MixedP2p),
            "host memory after BAR2 (link): {r:?}"
        );
        check!(
            tx.linked() == PAGE_SIZE,
            "{} bytes linked after the refusals",
            tx.linked()
        );

        dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
        dom.destroy(src_tx, vtd).or_fail("destroy")?;
        vtd.detach(edu.id).or_fail("detach")?;
        free_pages(ctx, src, 1)?;
        free_pages(ctx, host, 1)
    })
}
