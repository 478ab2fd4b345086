//! The peer-to-peer test flow both boards run: edu (the client) DMAs into
//! the RAM-backed BAR 2 of an ivshmem-plain (the provider) below the same
//! host bridge, through the IOMMU.
//!
//! Both devices sit on the root bus of the machine's one host bridge, so the
//! registry's answer is `ThruHostBridge` once that bridge is allowed: the BAR
//! is mapped through the IOMMU with device-memory attributes. QEMU does not
//! model switch-level P2P routing, so the bus-address path is proven by host
//! tests (tests/p2p.rs) only.
//!
//! The board sets up the IOMMU and a domain with edu attached and says, with
//! [`P2pChecks`], how its IOMMU reports faults and which attributes a BAR
//! entry must carry; [`dma_through_host_bridge`] and [`refused_without_bridge`]
//! are the test bodies.

use bare_iommu::p2p::{DeviceTopology, P2pProvider, P2pRegistry};
use bare_iommu::{
    DeviceId, DmaAddr, DmaDirection, DmaError, DmaKind, Domain, IommuBackend, IovaState, MapAttrs,
    PAGE_SIZE, PhysAddr, PteFormat, TableMemory,
};

use crate::edu::Edu;
use crate::harness::{Fail, OrFail};
use crate::ivshmem::Ivshmem;
use crate::pattern::pattern;

/// The host bridge both devices are below (both machines have one).
pub const HOST_BRIDGE: u16 = 0;
/// Where in BAR 2 the DMA goes: page 3, so the pages around it can show a
/// DMA that landed off target.
pub const TARGET_OFF: u64 = 3 * PAGE_SIZE;
/// Bytes one DMA moves. A blocked DMA makes one SMMU event per 4 bytes: 64
/// events fit a 128-record event queue with room to spare.
pub const LEN: u32 = 256;
/// Pattern seed of the bytes edu carries.
pub const SEED: u8 = 0x71;

const PAGE: usize = PAGE_SIZE as usize;

/// What the IOMMU reported for a blocked DMA, for the narration.
pub struct Reported {
    /// Fault records (events) it produced.
    pub records: u32,
    /// The first of them, as text.
    pub first: Fail,
}

/// How the board's IOMMU `B` reports faults and maps a BAR.
pub trait P2pChecks<B> {
    /// Before a DMA whose faults the test checks: drops what the IOMMU
    /// recorded earlier, where records pile up between checks.
    fn before_dma(&mut self, iommu: &mut B);

    /// Fails if the IOMMU recorded a fault since [`before_dma`](Self::before_dma).
    fn no_faults(&mut self, iommu: &mut B) -> Result<(), Fail>;

    /// Fails unless the IOMMU reported the blocked write of `len` bytes by
    /// `dev` at `iova`, and nothing else.
    fn blocked_write(
        &mut self,
        iommu: &mut B,
        dev: DeviceId,
        iova: u64,
        len: u32,
    ) -> Result<Reported, Fail>;

    /// Fails unless `attrs` (of the BAR's table entry) are what a BAR needs;
    /// returns how to name them in the narration (`""` or `", Device-nGnRE"`).
    fn bar_attrs(&self, iommu: &B, attrs: MapAttrs) -> Result<&'static str, Fail>;
}

/// One P2P test's setting: `edu` attached to `dom` on `iommu`.
pub struct P2pTest<'a, F: PteFormat, M: TableMemory, B> {
    /// The IOMMU.
    pub iommu: &'a mut B,
    /// A translated domain with `edu` attached.
    pub dom: &'a mut Domain<F, M>,
    /// The client.
    pub edu: &'a Edu,
    /// The provider.
    pub iv: &'a Ivshmem,
    /// The registry from [`registry`].
    pub reg: &'a mut P2pRegistry,
    /// A host page holding [`pattern`]`(SEED, i)`.
    pub src: PhysAddr,
}

/// The registry the board would build: ivshmem BAR 2 as provider, it and
/// `client` on the root bus of host bridge 0 (empty paths).
pub fn registry(iv: &Ivshmem, client: DeviceId) -> Result<P2pRegistry, Fail> {
    let mut reg = P2pRegistry::new();
    // The BAR register holds the bus address; the board found where the CPU
    // sees it. (Equal on both machines, but nothing here relies on it.)
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
    for d in [iv.id, client] {
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

fn alloc<F: PteFormat, M: TableMemory>(
    dom: &mut Domain<F, M>,
    size: u64,
) -> Result<IovaState, Fail> {
    dom.try_alloc(size, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated transaction")
}

/// The source page linked read-only through `link_p2p` in its own
/// transaction; edu reads it into its buffer. Returns the transaction.
fn load_pattern<F: PteFormat, M: TableMemory, B: IommuBackend>(
    t: &mut P2pTest<'_, F, M, B>,
) -> Result<IovaState, Fail> {
    let mut tx = alloc(t.dom, PAGE_SIZE)?;
    t.dom
        .link_p2p(
            &mut tx,
            t.reg,
            t.edu.id,
            t.src,
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
    t.dom.sync(t.iommu).or_fail("sync")?;
    t.edu
        .dma_from_ram(tx.iova().get(), 0, LEN)
        .or_fail("edu read DMA")?;
    Ok(tx)
}

/// With the host bridge allowed: edu DMAs a pattern through a ThruHostBridge
/// mapping into ivshmem's BAR 2; the CPU reads it back through the BAR; the
/// entry has the attributes a BAR needs. After unlink + sync the same DMA is
/// blocked (BAR bytes unchanged) and the IOMMU reports it. Frees both
/// transactions; the board detaches.
pub fn dma_through_host_bridge<F: PteFormat, M: TableMemory, B: IommuBackend>(
    mut t: P2pTest<'_, F, M, B>,
    checks: &mut impl P2pChecks<B>,
) -> Result<(), Fail> {
    let src_tx = load_pattern(&mut t)?;

    let target = PhysAddr(t.iv.bar2.get() + TARGET_OFF);
    let mut tx = alloc(t.dom, PAGE_SIZE)?;
    let iova = t
        .dom
        .link_p2p(
            &mut tx,
            t.reg,
            t.edu.id,
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
    check_eq!(
        tx.provider(),
        Some(t.iv.id),
        "provider recorded in the state"
    );
    check_eq!(iova, tx.iova(), "a host-bridge link returns the IOVA");
    let (pa, attrs) = t.dom.translate(iova).or_fail("IOMMU table entry")?;
    check_eq!(pa, target, "the IOVA's output address");
    let attrs_note = checks.bar_attrs(t.iommu, attrs)?;
    t.dom.sync(t.iommu).or_fail("sync")?;
    narrate!(
        "{} -> {}: IOVA {iova} -> BAR2 {target} (P2pThruHostBridge{attrs_note})",
        t.edu.id,
        t.iv.id
    );

    // Pages around the target show a DMA that landed off target.
    t.iv.fill(TARGET_OFF - PAGE_SIZE, 3 * PAGE, 0);
    checks.before_dma(t.iommu);
    t.edu
        .dma_to_ram(iova.get(), 0, LEN)
        .or_fail("edu write DMA into BAR2")?;
    for i in 0..u64::from(LEN) {
        let got = t.iv.byte(TARGET_OFF + i);
        let expected = pattern(SEED, i as usize);
        check_eq!(
            got,
            expected,
            "BAR2 byte {:#x} read by the CPU",
            TARGET_OFF + i
        );
    }
    bar_filled(
        t.iv,
        TARGET_OFF + u64::from(LEN),
        PAGE_SIZE - u64::from(LEN),
        0,
        "past the DMA",
    )?;
    bar_filled(t.iv, TARGET_OFF - PAGE_SIZE, PAGE_SIZE, 0, "page below")?;
    bar_filled(t.iv, TARGET_OFF + PAGE_SIZE, PAGE_SIZE, 0, "page above")?;
    checks.no_faults(t.iommu)?;
    narrate!("CPU read {LEN} bytes of the pattern back through BAR2");

    // Unlink: the same DMA is blocked and reported.
    check_eq!(
        t.dom.unlink(&mut tx, 0, PAGE_SIZE),
        Ok(PAGE_SIZE),
        "unlink BAR2 page"
    );
    t.dom.sync(t.iommu).or_fail("sync after unlink")?;
    check_eq!(tx.kind(), None, "kind after everything is unlinked");
    check!(
        t.dom.translate(iova).is_none(),
        "IOVA still translates after unlink"
    );
    t.iv.fill(TARGET_OFF, PAGE, 0xa5);
    t.edu
        .dma_to_ram(iova.get(), 0, LEN)
        .or_fail("edu DMA after unlink")?;
    bar_filled(t.iv, TARGET_OFF, PAGE_SIZE, 0xa5, "DMA after unlink")?;
    let r = checks.blocked_write(t.iommu, t.edu.id, iova.get(), LEN)?;
    narrate!(
        "after unlink: blocked, {} event(s), first {}",
        r.records,
        r.first
    );

    t.dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    t.dom.destroy(src_tx, t.iommu).or_fail("destroy")
}

/// With the host bridge not (yet) allowed: linking the BAR is refused with
/// `P2pNotSupported` and nothing is mapped (edu's DMA to the IOVA is blocked
/// and reported, BAR bytes unchanged). Then, with the bridge allowed, a
/// transaction mixing host memory (the page `host`) and the BAR is refused
/// with `MixedP2p` either way round. Frees both transactions; the board
/// detaches.
pub fn refused_without_bridge<F: PteFormat, M: TableMemory, B: IommuBackend>(
    mut t: P2pTest<'_, F, M, B>,
    host: PhysAddr,
    checks: &mut impl P2pChecks<B>,
) -> Result<(), Fail> {
    let src_tx = load_pattern(&mut t)?;

    let target = PhysAddr(t.iv.bar2.get() + TARGET_OFF);
    let mut tx = alloc(t.dom, 2 * PAGE_SIZE)?;
    let dir = DmaDirection::FromDevice;
    check_eq!(
        t.dom
            .link_p2p(&mut tx, t.reg, t.edu.id, target, 0, PAGE_SIZE, dir),
        Err(DmaError::P2pNotSupported {
            provider: t.iv.id,
            client: t.edu.id
        }),
        "link_p2p without an allowed host bridge"
    );
    check_eq!(tx.linked(), 0, "bytes linked after the refusal");
    check_eq!(tx.kind(), None, "kind after the refusal");
    check!(
        t.dom.translate(tx.iova()).is_none(),
        "the refused link wrote a table entry"
    );
    t.dom.sync(t.iommu).or_fail("sync")?;
    t.iv.fill(TARGET_OFF, PAGE, 0x3c);
    checks.before_dma(t.iommu);
    t.edu
        .dma_to_ram(tx.iova().get(), 0, LEN)
        .or_fail("edu DMA to the refused IOVA")?;
    bar_filled(t.iv, TARGET_OFF, PAGE_SIZE, 0x3c, "DMA to the refused IOVA")?;
    let r = checks.blocked_write(t.iommu, t.edu.id, tx.iova().get(), LEN)?;
    narrate!(
        "refused: P2pNotSupported; DMA to {} faulted ({} event(s))",
        tx.iova(),
        r.records
    );

    // Allow the bridge, so that mixing is the only reason left to refuse.
    t.reg
        .allow_host_bridge(HOST_BRIDGE)
        .or_fail("allow host bridge")?;
    t.dom
        .link_p2p(&mut tx, t.reg, t.edu.id, host, 0, PAGE_SIZE, dir)
        .or_fail("link host page")?;
    check_eq!(
        t.dom
            .link_p2p(&mut tx, t.reg, t.edu.id, target, PAGE_SIZE, PAGE_SIZE, dir),
        Err(DmaError::MixedP2p),
        "BAR2 after host memory"
    );
    check_eq!(tx.linked(), PAGE_SIZE, "bytes linked after the refusal");
    check!(
        t.dom
            .translate(DmaAddr(tx.iova().get() + PAGE_SIZE))
            .is_none(),
        "the refused BAR2 link wrote a table entry"
    );
    check_eq!(t.dom.unlink(&mut tx, 0, PAGE_SIZE), Ok(PAGE_SIZE), "unlink");
    t.dom
        .link_p2p(&mut tx, t.reg, t.edu.id, target, 0, PAGE_SIZE, dir)
        .or_fail("link BAR2 page")?;
    check_eq!(
        tx.kind(),
        Some(DmaKind::P2pThruHostBridge),
        "kind once the bridge is allowed"
    );
    check_eq!(
        t.dom
            .link_p2p(&mut tx, t.reg, t.edu.id, host, PAGE_SIZE, PAGE_SIZE, dir),
        Err(DmaError::MixedP2p),
        "host memory after BAR2 (link_p2p)"
    );
    check_eq!(
        t.dom
            .link(&mut tx, host, PAGE_SIZE, PAGE_SIZE, dir, MapAttrs::empty()),
        Err(DmaError::MixedP2p),
        "host memory after BAR2 (link)"
    );
    check_eq!(tx.linked(), PAGE_SIZE, "bytes linked after the refusals");

    t.dom.free(tx).map_err(|(_, e)| e).or_fail("free")?;
    t.dom.destroy(src_tx, t.iommu).or_fail("destroy")
}
