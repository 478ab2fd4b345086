//! P2P: the map-type decision over synthetic topologies, and the two-step
//! API doing exactly the inverse of what a P2P link did.

mod common;

use bare_iommu::p2p::{DeviceTopology, P2pError, P2pMapType, P2pProvider, P2pRegistry, Port};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::testing::RecordingBackend;
use bare_iommu::{
    DeviceId, DmaAddr, DmaDirection, DmaError, DmaKind, Domain, DomainConfig, IovaState, MapAttrs,
    PhysAddr,
};
use common::HostMemory;

fn dev(bus: u8, d: u8) -> DeviceId {
    DeviceId::new(0, bus, d, 0).unwrap()
}

fn port(bus: u8, d: u8, acs: bool) -> Port {
    Port {
        id: dev(bus, d),
        acs_redirect: acs,
    }
}

// Host bridge 0: root port 00:1c.0 → switch up 01:00.0 → downstream 02:01.0 (GPU 03:00.0)
// and 02:02.0 (NVMe 04:00.0); root port 00:1d.0 → NIC 05:00.0. Host bridge 1: 80:00.0.
const GPU: (u8, u8) = (3, 0);
const NVME: (u8, u8) = (4, 0);
const NIC: (u8, u8) = (5, 0);
const OTHER_HB: (u8, u8) = (0x81, 0);

fn registry(acs_on_nvme_port: bool) -> P2pRegistry {
    let mut r = P2pRegistry::new();
    let rp = port(0, 0x1c, false);
    let up = port(1, 0, false);
    r.set_topology(
        DeviceTopology::new(dev(GPU.0, GPU.1), 0, &[rp, up, port(2, 1, false)]).unwrap(),
    )
    .unwrap();
    r.set_topology(
        DeviceTopology::new(
            dev(NVME.0, NVME.1),
            0,
            &[rp, up, port(2, 2, acs_on_nvme_port)],
        )
        .unwrap(),
    )
    .unwrap();
    r.set_topology(DeviceTopology::new(dev(NIC.0, NIC.1), 0, &[port(0, 0x1d, false)]).unwrap())
        .unwrap();
    r.set_topology(
        DeviceTopology::new(dev(OTHER_HB.0, OTHER_HB.1), 1, &[port(0x80, 0, false)]).unwrap(),
    )
    .unwrap();
    r.register(P2pProvider {
        device: dev(GPU.0, GPU.1),
        cpu_start: PhysAddr(0x60_0000_0000),
        len: 1 << 28,
        bus_offset: 0u64.wrapping_sub(0x50_0000_0000),
    })
    .unwrap();
    r
}

#[test]
fn same_switch_without_acs_uses_the_bus_address() {
    let mut r = registry(false);
    assert_eq!(
        r.map_type(dev(GPU.0, GPU.1), dev(NVME.0, NVME.1)),
        Ok(P2pMapType::BusAddr)
    );
}

#[test]
fn provider_equal_to_client_uses_the_bus_address() {
    let mut r = registry(false);
    assert_eq!(
        r.map_type(dev(GPU.0, GPU.1), dev(GPU.0, GPU.1)),
        Ok(P2pMapType::BusAddr)
    );
}

#[test]
fn acs_redirect_sends_traffic_through_an_allowed_host_bridge_or_refuses() {
    let mut r = registry(true);
    let (g, n) = (dev(GPU.0, GPU.1), dev(NVME.0, NVME.1));
    assert_eq!(
        r.map_type(g, n),
        Err(P2pError::NotSupported {
            provider: g,
            client: n
        })
    );
    r.allow_host_bridge(0).unwrap();
    assert_eq!(r.map_type(g, n), Ok(P2pMapType::ThruHostBridge));
}

#[test]
fn different_root_ports_need_an_allowed_host_bridge() {
    let mut r = registry(false);
    let (g, c) = (dev(GPU.0, GPU.1), dev(NIC.0, NIC.1));
    assert_eq!(
        r.map_type(g, c),
        Err(P2pError::NotSupported {
            provider: g,
            client: c
        }),
        "unknown host bridge"
    );
    r.allow_host_bridge(0).unwrap();
    assert_eq!(r.map_type(g, c), Ok(P2pMapType::ThruHostBridge));
}

#[test]
fn different_host_bridges_are_not_supported() {
    let mut r = registry(false);
    r.allow_host_bridge(0).unwrap();
    r.allow_host_bridge(1).unwrap();
    let (g, c) = (dev(GPU.0, GPU.1), dev(OTHER_HB.0, OTHER_HB.1));
    assert_eq!(
        r.map_type(g, c),
        Err(P2pError::NotSupported {
            provider: g,
            client: c
        })
    );
}

#[test]
fn unknown_devices_are_errors_and_answers_are_cached() {
    let mut r = registry(false);
    let stranger = dev(9, 9);
    assert_eq!(
        r.map_type(dev(GPU.0, GPU.1), stranger),
        Err(P2pError::Unknown(stranger))
    );
    let before = r.computed;
    r.map_type(dev(GPU.0, GPU.1), dev(NVME.0, NVME.1)).unwrap();
    r.map_type(dev(GPU.0, GPU.1), dev(NVME.0, NVME.1)).unwrap();
    assert_eq!(
        r.computed,
        before + 1,
        "the second answer comes from the cache"
    );
}

#[test]
fn provider_registry_refuses_overlap_and_unknown() {
    let mut r = registry(false);
    let p = P2pProvider {
        device: dev(NVME.0, NVME.1),
        cpu_start: PhysAddr(0x60_0fff_0000),
        len: 0x1000,
        bus_offset: 0,
    };
    assert_eq!(
        r.register(p),
        Err(P2pError::Overlap {
            existing: dev(GPU.0, GPU.1)
        })
    );
    assert_eq!(
        r.unregister(dev(NVME.0, NVME.1)),
        Err(P2pError::Unknown(dev(NVME.0, NVME.1)))
    );
    r.unregister(dev(GPU.0, GPU.1)).unwrap();
    assert_eq!(r.provider_of(PhysAddr(0x60_0000_0000), 4096), Ok(None));
}

fn domain(mem: &HostMemory) -> Domain<VtdSecondLevel, &HostMemory> {
    let cfg = DomainConfig {
        id: 4,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end: 1 << 36,
        coherent_walk: true,
    };
    Domain::new(VtdSecondLevel::default(), mem, cfg).unwrap()
}

fn tx(d: &mut Domain<VtdSecondLevel, &HostMemory>) -> IovaState {
    d.try_alloc(16 * 4096, u64::MAX)
        .unwrap()
        .into_iova()
        .unwrap()
}

#[test]
fn bus_address_transaction_never_touches_the_iommu() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut r = registry(false);
    let tables = mem.live_pages();
    let mut t = tx(&mut d);
    let client = dev(NVME.0, NVME.1);
    let a = d
        .link_p2p(
            &mut t,
            &mut r,
            client,
            PhysAddr(0x60_0001_0000),
            0,
            2 * 4096,
            DmaDirection::FromDevice,
        )
        .unwrap();
    assert_eq!(
        a,
        DmaAddr(0x10_0001_0000),
        "bus address = CPU physical + bus offset"
    );
    assert_eq!(t.kind(), Some(DmaKind::P2pBusAddr));
    assert_eq!(t.provider(), Some(dev(GPU.0, GPU.1)));
    assert_eq!(d.translate(t.iova()), None, "no table entry was written");
    assert_eq!(mem.live_pages(), tables);
    assert_eq!(d.unlink(&mut t, 0, 4096), Ok(4096));
    assert!(!d.has_pending(), "nothing to invalidate");
    d.free(t).unwrap();
    assert!(
        be.log.is_empty(),
        "no IOMMU operation from link to free: {:?}",
        be.log
    );
    // The one-step form: its handle carries the kind, so unmap does nothing to the IOMMU.
    let m = d
        .map_p2p(
            &mut be,
            &mut r,
            client,
            PhysAddr(0x60_0000_0000),
            4096,
            DmaDirection::ToDevice,
            u64::MAX,
        )
        .unwrap();
    assert_eq!(m.kind(), Some(DmaKind::P2pBusAddr));
    assert_eq!(m.addr(), DmaAddr(0x10_0000_0000));
    d.unmap(&mut be, m).unwrap();
    assert!(be.log.is_empty(), "{:?}", be.log);
}

#[test]
fn host_bridge_transaction_is_mapped_as_device_memory_and_unmapped() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut r = registry(false);
    r.allow_host_bridge(0).unwrap();
    let client = dev(NIC.0, NIC.1);
    let m = d
        .map_p2p(
            &mut be,
            &mut r,
            client,
            PhysAddr(0x60_0000_2000),
            4096,
            DmaDirection::Bidirectional,
            u64::MAX,
        )
        .unwrap();
    assert_eq!(m.kind(), Some(DmaKind::P2pThruHostBridge));
    let (pa, _) = d.translate(m.addr()).unwrap();
    assert_eq!(
        pa,
        PhysAddr(0x60_0000_2000),
        "translated to the BAR's CPU-physical address"
    );
    let a = m.addr();
    d.unmap(&mut be, m).unwrap();
    assert_eq!(d.translate(a), None);
    // The map only published its writes; the unmap waited once.
    assert_eq!((be.publishes, be.syncs), (1, 1));
}

#[test]
fn mixing_host_memory_with_p2p_or_two_providers_is_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut r = registry(false);
    r.register(P2pProvider {
        device: dev(NVME.0, NVME.1),
        cpu_start: PhysAddr(0x70_0000_0000),
        len: 1 << 20,
        bus_offset: 0,
    })
    .unwrap();
    let client = dev(NVME.0, NVME.1);
    let mut t = tx(&mut d);
    d.link_p2p(
        &mut t,
        &mut r,
        client,
        PhysAddr(0x8000_0000),
        0,
        4096,
        DmaDirection::ToDevice,
    )
    .unwrap();
    assert_eq!(t.kind(), Some(DmaKind::Translated));
    assert_eq!(
        d.link_p2p(
            &mut t,
            &mut r,
            client,
            PhysAddr(0x60_0000_0000),
            4096,
            4096,
            DmaDirection::ToDevice
        ),
        Err(DmaError::MixedP2p)
    );
    d.unlink(&mut t, 0, 4096).unwrap();
    d.link_p2p(
        &mut t,
        &mut r,
        client,
        PhysAddr(0x60_0000_0000),
        0,
        4096,
        DmaDirection::ToDevice,
    )
    .unwrap();
    assert_eq!(
        d.link_p2p(
            &mut t,
            &mut r,
            client,
            PhysAddr(0x70_0000_0000),
            4096,
            4096,
            DmaDirection::ToDevice
        ),
        Err(DmaError::MixedP2p),
        "two providers"
    );
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x8000_0000),
            4096,
            4096,
            DmaDirection::ToDevice,
            MapAttrs::empty()
        ),
        Err(DmaError::MixedP2p)
    );
    // A range straddling a provider's edge is neither host memory nor P2P.
    let mut t2 = tx(&mut d);
    assert_eq!(
        d.link_p2p(
            &mut t2,
            &mut r,
            client,
            PhysAddr(0x60_0000_0000 + (1 << 28) - 4096),
            0,
            2 * 4096,
            DmaDirection::ToDevice
        ),
        Err(DmaError::MixedP2p)
    );
    d.free(t).unwrap();
    d.free(t2).unwrap();
}

#[test]
fn unsupported_route_is_a_typed_error_that_links_nothing() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut r = registry(false);
    let (g, c) = (dev(GPU.0, GPU.1), dev(NIC.0, NIC.1));
    let mut t = tx(&mut d);
    assert_eq!(
        d.link_p2p(
            &mut t,
            &mut r,
            c,
            PhysAddr(0x60_0000_0000),
            0,
            4096,
            DmaDirection::ToDevice
        ),
        Err(DmaError::P2pNotSupported {
            provider: g,
            client: c
        })
    );
    assert_eq!(t.linked(), 0);
    assert_eq!(d.translate(t.iova()), None);
    d.free(t).unwrap();
}

#[test]
fn host_bridge_link_is_device_memory_in_arm_tables() {
    use bare_iommu::pgtable::arm::{ATTR_IDX_DEVICE, ArmStage1};
    let mem = HostMemory::new();
    let cfg = DomainConfig {
        id: 5,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end: 1 << 36,
        coherent_walk: true,
    };
    let mut d = Domain::new(ArmStage1, &mem, cfg).unwrap();
    let mut r = registry(false);
    r.allow_host_bridge(0).unwrap();
    let mut t = d.try_alloc(4096, u64::MAX).unwrap().into_iova().unwrap();
    d.link_p2p(
        &mut t,
        &mut r,
        dev(NIC.0, NIC.1),
        PhysAddr(0x60_0000_0000),
        0,
        4096,
        DmaDirection::ToDevice,
    )
    .unwrap();
    let (_, attrs) = d.translate(t.iova()).unwrap();
    assert!(
        attrs.contains(MapAttrs::MMIO),
        "Device-nGnRE (AttrIndx {ATTR_IDX_DEVICE})"
    );
    d.free(t).unwrap();
}

#[test]
fn bus_address_links_track_their_offsets() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut r = registry(false);
    let mut t = tx(&mut d);
    let client = dev(NVME.0, NVME.1);
    let bar = PhysAddr(0x60_0001_0000);
    let dir = DmaDirection::FromDevice;
    let link = |d: &mut Domain<_, _>, t: &mut IovaState, r: &mut P2pRegistry, off: u64| {
        d.link_p2p(t, r, client, PhysAddr(bar.0 + off), off, 4096, dir)
    };
    link(&mut d, &mut t, &mut r, 4096).unwrap();
    // The same offset twice: refused, nothing counted twice.
    assert_eq!(
        link(&mut d, &mut t, &mut r, 4096),
        Err(DmaError::AlreadyLinked {
            iova: DmaAddr(t.iova().0 + 4096)
        })
    );
    assert_eq!(t.linked(), 4096);
    // A hole in the run: refused.
    assert_eq!(
        link(&mut d, &mut t, &mut r, 3 * 4096),
        Err(DmaError::BusAddrGap {
            offset: 3 * 4096,
            start: 4096,
            end: 2 * 4096
        })
    );
    // Grown at either end.
    link(&mut d, &mut t, &mut r, 2 * 4096).unwrap();
    link(&mut d, &mut t, &mut r, 0).unwrap();
    assert_eq!(t.linked(), 3 * 4096);
    assert!(t.linked() <= t.size());
    // Unlinking what was never linked, or the middle of the run: refused.
    assert_eq!(
        d.unlink(&mut t, 5 * 4096, 4096),
        Err(DmaError::NotLinked {
            iova: DmaAddr(t.iova().0 + 5 * 4096)
        })
    );
    assert!(matches!(
        d.unlink(&mut t, 4096, 4096),
        Err(DmaError::BusAddrGap { .. })
    ));
    assert_eq!(t.linked(), 3 * 4096);
    assert_eq!(d.unlink(&mut t, 0, 4096), Ok(4096));
    assert_eq!(
        d.unlink(&mut t, 0, 4096),
        Err(DmaError::NotLinked {
            iova: DmaAddr(t.iova().0)
        })
    );
    assert_eq!(d.unlink(&mut t, 4096, 2 * 4096), Ok(2 * 4096));
    assert_eq!(t.linked(), 0);
    assert_eq!(t.kind(), None);
    d.free(t).unwrap();
}
