//! Firmware-table parsers on tables QEMU 10.0.2 really produced, and on
//! hand-built tables for what QEMU never emits (RMRR, RHSA, SATC, bridges in
//! paths, named components, RMR nodes).
//!
//! How the fixtures were captured (scripts in tests/fixtures/capture/):
//! - `dmar-q35.bin`: `qemu-system-x86_64 -S -machine q35,kernel-irqchip=split
//!   -device intel-iommu,intremap=on`; `capture/x86.py` reads fw_cfg file
//!   `etc/acpi/tables` through the HMP monitor (`o /h 0x510 SEL`, `i /b 0x511`)
//!   and cuts out the DMAR.
//! - `dmar-q35-bridge.bin`: the same with `device-iotlb=on -device edu,addr=03.0
//!   -device pcie-root-port,id=rp,addr=06.0,chassis=1 -device edu,bus=rp`
//!   (endpoint and sub-hierarchy scopes, and an ATSR).
//! - `iort-virt.bin`: `qemu-system-aarch64 -m 512M -machine
//!   virt,iommu=smmuv3,acpi=on,gic-version=3 -cpu max -kernel capture/dump.elf`;
//!   the 20-instruction image (`capture/dump.S`, built with llvm-mc and
//!   rust-lld) copies fw_cfg `etc/acpi/tables` into RAM, HMP `pmemsave`
//!   saves it, and the IORT is cut out.
//! - `virt-smmuv3.dtb`: `qemu-system-aarch64 -machine
//!   virt,iommu=smmuv3,gic-version=3,dumpdtb=FILE -cpu max -m 512M -nic none
//!   -device edu,addr=05.0`, trailing free space cut (totalsize patched).
//!
//! QEMU leaves ACPI checksums to the firmware's table loader (the fw_cfg copy
//! holds 0); the checksum byte of each ACPI fixture was set so the table sums
//! to zero, as a guest sees it. No other byte was changed.

use bare_iommu::DeviceId;
use bare_iommu::firmware::devicetree::{IommuMap, IommuTarget, iommus};
use bare_iommu::firmware::dmar::{Dmar, DmarFlags, NoBridges, ScopeKind, Structure};
use bare_iommu::firmware::iort::{Iort, NodeKind};
use bare_iommu::firmware::{FirmwareError, ReservedRegion, acpi_checksum_ok};

const DMAR_Q35: &[u8] = include_bytes!("fixtures/dmar-q35.bin");
const DMAR_Q35_BRIDGE: &[u8] = include_bytes!("fixtures/dmar-q35-bridge.bin");
const IORT_VIRT: &[u8] = include_bytes!("fixtures/iort-virt.bin");
const VIRT_DTB: &[u8] = include_bytes!("fixtures/virt-smmuv3.dtb");

fn dev(bus: u8, d: u8, f: u8) -> DeviceId {
    DeviceId::new(0, bus, d, f).unwrap()
}

/// The q35 bridge fixture's topology: root port 00:06.0 has bus 1 behind it.
fn q35_bridges(seg: u16, bus: u8, devfn: u8) -> Option<(u8, u8)> {
    (seg == 0 && bus == 0 && devfn == 6 << 3).then_some((1, 1))
}

#[test]
fn q35_dmar_names_the_vtd_unit_qemu_places() {
    assert!(acpi_checksum_ok(DMAR_Q35));
    let dmar = Dmar::new(DMAR_Q35).unwrap();
    assert_eq!(dmar.host_address_width(), 48);
    assert_eq!(dmar.flags(), DmarFlags::INTR_REMAP);
    let units: Vec<_> = dmar.units().map(Result::unwrap).collect();
    assert_eq!(units.len(), 1);
    let u = units[0];
    assert_eq!(
        (u.register_base, u.register_len(), u.segment),
        (0xfed9_0000, 4096, 0)
    );
    assert!(!u.include_pci_all(), "QEMU 10 lists its devices instead");
    let scopes: Vec<_> = u
        .scopes()
        .map(|s| {
            let s = s.unwrap();
            (
                s.kind,
                s.enumeration_id,
                s.resolve(0, &NoBridges).unwrap().device,
            )
        })
        .collect();
    assert_eq!(
        scopes,
        [
            (ScopeKind::IoApic, 0, dev(0xff, 0, 0)),
            (ScopeKind::PciEndpoint, 0, dev(0, 0, 0)),
            (ScopeKind::PciEndpoint, 0, dev(0, 1, 0)),
            (ScopeKind::PciEndpoint, 0, dev(0, 0x1f, 0)),
            (ScopeKind::PciEndpoint, 0, dev(0, 0x1f, 2)),
            (ScopeKind::PciEndpoint, 0, dev(0, 0x1f, 3)),
        ]
    );
    let owner = dmar.unit_for(dev(0, 0x1f, 2), &NoBridges).unwrap().unwrap();
    assert_eq!(owner.register_base, 0xfed9_0000);
    // Not listed and no INCLUDE_PCI_ALL unit: not remapped.
    assert!(dmar.unit_for(dev(0, 2, 0), &NoBridges).unwrap().is_none());
    assert_eq!(
        dmar.reserved_regions_for(dev(0, 0x1f, 2), &NoBridges)
            .count(),
        0
    );
}

#[test]
fn q35_dmar_puts_a_device_behind_a_root_port_under_the_unit() {
    let dmar = Dmar::new(DMAR_Q35_BRIDGE).unwrap();
    let kinds: Vec<_> = dmar
        .structures()
        .map(|s| match s.unwrap() {
            Structure::Drhd(_) => "DRHD",
            Structure::Atsr(a) => {
                assert!(a.all_ports);
                assert_eq!(a.segment, 0);
                "ATSR"
            }
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["DRHD", "ATSR"]);
    let u = dmar.units().next().unwrap().unwrap();
    let port = u
        .scopes()
        .map(Result::unwrap)
        .find(|s| s.kind == ScopeKind::PciSubHierarchy)
        .unwrap();
    let r = port.resolve(0, &q35_bridges).unwrap();
    assert_eq!((r.device, r.buses), (dev(0, 6, 0), Some((1, 1))));
    // The edu behind the port (bus 1) and the port itself are owned.
    for d in [dev(1, 0, 0), dev(0, 6, 0), dev(0, 3, 0)] {
        assert!(dmar.unit_for(d, &q35_bridges).unwrap().is_some(), "{d}");
    }
    assert!(dmar.unit_for(dev(2, 0, 0), &q35_bridges).unwrap().is_none());
    assert!(dmar.unit_for(dev(0, 4, 0), &q35_bridges).unwrap().is_none());
    // Resolving the sub-hierarchy needs the bridge's buses.
    assert_eq!(
        dmar.unit_for(dev(1, 0, 0), &NoBridges).unwrap_err(),
        FirmwareError::NotABridge {
            segment: 0,
            bus: 0,
            devfn: 6 << 3
        }
    );
}

/// A DMAR built by hand: header + the given structures.
fn dmar_with(structs: &[Vec<u8>]) -> Vec<u8> {
    let mut t = b"DMAR".to_vec();
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"TESTER");
    t.resize(36, 0);
    t.extend_from_slice(&[38, 0x3]);
    t.resize(48, 0);
    for s in structs {
        t.extend_from_slice(s);
    }
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

fn structure(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut s = kind.to_le_bytes().to_vec();
    s.extend_from_slice(&((body.len() + 4) as u16).to_le_bytes());
    s.extend_from_slice(body);
    s
}

fn scope(kind: u8, enum_id: u8, bus: u8, path: &[(u8, u8)]) -> Vec<u8> {
    let mut s = vec![kind, (6 + 2 * path.len()) as u8, 0, 0, enum_id, bus];
    for &(d, f) in path {
        s.extend_from_slice(&[d, f]);
    }
    s
}

fn drhd(flags: u8, seg: u16, base: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![flags, 1];
    b.extend_from_slice(&seg.to_le_bytes());
    b.extend_from_slice(&base.to_le_bytes());
    scopes.iter().for_each(|s| b.extend_from_slice(s));
    structure(0, &b)
}

fn rmrr(seg: u16, base: u64, limit: u64, scopes: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![0, 0];
    b.extend_from_slice(&seg.to_le_bytes());
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&limit.to_le_bytes());
    scopes.iter().for_each(|s| b.extend_from_slice(s));
    structure(1, &b)
}

/// 00:1c.0 → bus 2; 02:00.0 → bus 3 (a switch below a root port).
fn two_level(seg: u16, bus: u8, devfn: u8) -> Option<(u8, u8)> {
    match (seg, bus, devfn) {
        (0, 0, 0xe0) => Some((2, 4)),
        (0, 2, 0x00) => Some((3, 4)),
        _ => None,
    }
}

#[test]
fn dmar_resolves_paths_through_two_bridges_and_prefers_listed_units() {
    let t = dmar_with(&[
        drhd(
            0,
            0,
            0xfed9_1000,
            &[scope(1, 0, 0, &[(0x1c, 0), (0, 0), (0, 1)])],
        ),
        drhd(0, 1, 0xfed9_3000, &[]),
        drhd(1, 0, 0xfed9_2000, &[scope(3, 8, 0xf0, &[(0x1f, 0)])]),
        rmrr(
            0,
            0x7c00_0000,
            0x7c01_ffff,
            &[scope(1, 0, 0, &[(0x1c, 0), (0, 0), (0, 1)])],
        ),
        rmrr(0, 0xe000, 0xefff, &[scope(2, 0, 0, &[(0x1c, 0)])]),
        structure(
            3,
            &[0, 0, 0, 0, 0, 0x20, 0xd9, 0xfe, 0, 0, 0, 0, 7, 0, 0, 0],
        ),
        structure(5, &[1, 0, 0, 0, 1, 8, 0, 0, 0, 0, 5, 0]),
    ]);
    let dmar = Dmar::new(&t).unwrap();
    assert_eq!(
        dmar.flags(),
        DmarFlags::INTR_REMAP | DmarFlags::X2APIC_OPT_OUT
    );
    let target = dev(3, 0, 1);
    let u = dmar.unit_for(target, &two_level).unwrap().unwrap();
    assert_eq!(
        u.register_base, 0xfed9_1000,
        "the listing unit wins over INCLUDE_PCI_ALL"
    );
    assert_eq!(u.register_len(), 8192);
    let other = dmar.unit_for(dev(3, 0, 0), &two_level).unwrap().unwrap();
    assert_eq!(
        other.register_base, 0xfed9_2000,
        "everything else goes to the catch-all"
    );
    assert!(
        dmar.unit_for(DeviceId::new(1, 0, 1, 0).unwrap(), &two_level)
            .unwrap()
            .is_none()
    );
    let regions: Vec<_> = dmar
        .reserved_regions_for(target, &two_level)
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        regions,
        [
            ReservedRegion {
                base: 0x7c00_0000,
                len: 0x2_0000
            },
            ReservedRegion {
                base: 0xe000,
                len: 0x1000
            },
        ]
    );
    // 03:00.0 is below 00:1c.0 (sub-hierarchy) but not the endpoint 03:00.1.
    let only_sub: Vec<_> = dmar
        .reserved_regions_for(dev(3, 0, 0), &two_level)
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        only_sub,
        [ReservedRegion {
            base: 0xe000,
            len: 0x1000
        }]
    );
    let mut saw = (false, false);
    for s in dmar.structures() {
        match s.unwrap() {
            Structure::Rhsa(r) => {
                assert_eq!((r.register_base, r.proximity_domain), (0xfed9_2000, 7));
                saw.0 = true;
            }
            Structure::Satc(s) => {
                assert!(s.atc_required);
                let sc = s.scopes().next().unwrap().unwrap();
                assert_eq!(sc.resolve(0, &NoBridges).unwrap().device, dev(0, 5, 0));
                saw.1 = true;
            }
            _ => {}
        }
    }
    assert_eq!(saw, (true, true));
}

#[test]
fn dmar_refuses_what_is_cut_or_inconsistent() {
    let good = dmar_with(&[drhd(1, 0, 0xfed9_0000, &[scope(1, 0, 0, &[(3, 0)])])]);
    assert!(matches!(
        Dmar::new(&good[..40]),
        Err(FirmwareError::Truncated { .. })
    ));
    let mut bad_sig = good.clone();
    bad_sig[0] = b'X';
    assert!(matches!(
        Dmar::new(&bad_sig),
        Err(FirmwareError::BadSignature { .. })
    ));
    // A structure length past the table.
    let mut long = good.clone();
    long[50] = 200;
    let d = Dmar::new(&long).unwrap();
    assert!(matches!(
        d.structures().next(),
        Some(Err(FirmwareError::Truncated { .. }))
    ));
    // A zero structure length would loop forever if accepted.
    let mut zero = good.clone();
    zero[50] = 0;
    let d = Dmar::new(&zero).unwrap();
    assert_eq!(d.structures().count(), 1);
    assert!(matches!(
        d.structures().next(),
        Some(Err(FirmwareError::BadLength { .. }))
    ));
    // A scope naming device 32.
    let t = dmar_with(&[drhd(0, 0, 0xfed9_0000, &[scope(1, 0, 0, &[(32, 0)])])]);
    let d = Dmar::new(&t).unwrap();
    assert!(matches!(
        d.unit_for(dev(0, 3, 0), &NoBridges),
        Err(FirmwareError::BadPath { .. })
    ));
    // An RMRR whose limit is below its base.
    let t = dmar_with(&[rmrr(0, 0x2000, 0x1000, &[])]);
    assert!(matches!(
        Dmar::new(&t).unwrap().rmrrs().next(),
        Some(Err(FirmwareError::Overflow { .. }))
    ));
}

#[test]
fn virt_iort_maps_requester_ids_to_the_smmu_qemu_places() {
    assert!(acpi_checksum_ok(IORT_VIRT));
    let iort = Iort::new(IORT_VIRT).unwrap();
    let kinds: Vec<_> = iort.nodes().map(|n| n.unwrap().node_type()).collect();
    assert_eq!(kinds, [0, 4, 2], "ITS group, SMMUv3, root complex");
    let t = iort.map_pci(0, 0x28).unwrap().unwrap();
    assert_eq!(t.stream_id, 0x28);
    let NodeKind::Smmuv3(s) = t.smmu.kind().unwrap() else {
        panic!("not an SMMUv3")
    };
    assert_eq!(s.base, 0x0905_0000);
    assert!(s.coherent());
    // The SPIs the virt board reads from the DTB (106..109: events, PRI, sync, GERROR).
    assert_eq!(
        (s.event_gsiv, s.pri_gsiv, s.gerr_gsiv, s.sync_gsiv),
        (0x6a, 0x6b, 0x6d, 0x6c)
    );
    // QEMU routes only the buses it saw at build time (bus 0) through the SMMU;
    // RIDs from 0x100 go straight to the ITS.
    assert!(iort.map_pci(0, 0x100).unwrap().is_none());
    assert!(iort.map_pci(0, 0xff).unwrap().is_some());
    assert!(
        iort.map_pci(1, 0x28).unwrap().is_none(),
        "no root complex for segment 1"
    );
    let rc = iort.root_complex(0).unwrap().unwrap();
    let NodeKind::RootComplex(r) = rc.kind().unwrap() else {
        panic!()
    };
    assert_eq!(
        (r.segment, r.coherent, r.ats, r.memory_address_limit),
        (0, true, false, Some(64))
    );
    let mut n = 0;
    iort.reserved_regions_for(&t.smmu, 0x28, |_, _| n += 1)
        .unwrap();
    assert_eq!(n, 0, "QEMU emits no RMR node");
}

/// Appends an IORT node; returns its offset.
fn node(t: &mut Vec<u8>, kind: u8, body: &[u8], maps: &[[u32; 5]]) -> u32 {
    let at = t.len() as u32;
    let map_at = 16 + body.len();
    let len = map_at + 20 * maps.len();
    t.push(kind);
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(0);
    t.extend_from_slice(&0u32.to_le_bytes());
    t.extend_from_slice(&(maps.len() as u32).to_le_bytes());
    t.extend_from_slice(&(if maps.is_empty() { 0 } else { map_at as u32 }).to_le_bytes());
    t.extend_from_slice(body);
    for m in maps {
        m.iter().for_each(|v| t.extend_from_slice(&v.to_le_bytes()));
    }
    at
}

fn iort_header(nodes: u32) -> Vec<u8> {
    let mut t = b"IORT".to_vec();
    t.resize(36, 0);
    t.extend_from_slice(&nodes.to_le_bytes());
    t.extend_from_slice(&48u32.to_le_bytes());
    t.resize(48, 0);
    t
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t
}

fn smmu_body(base: u64) -> Vec<u8> {
    let mut b = base.to_le_bytes().to_vec();
    b.resize(52, 0);
    b
}

#[test]
fn iort_walks_named_components_and_finds_rmr_regions() {
    let mut t = iort_header(4);
    let smmu = node(&mut t, 4, &smmu_body(0x2b40_0000), &[]);
    let mut nc = vec![0u8; 13];
    nc.extend_from_slice(b"\\_SB.DMA0\0\0\0");
    let nc_at = node(&mut t, 1, &nc, &[[0, 0, 0x4a, smmu, 1]]);
    let mut rc = vec![0u8; 20];
    rc[12] = 2; // segment 2
    node(&mut t, 2, &rc, &[[0x0, 0xffff, 0x10000, smmu, 0]]);
    let mut rmr = 0u32.to_le_bytes().to_vec();
    rmr.extend_from_slice(&2u32.to_le_bytes());
    rmr.extend_from_slice(&(16u32 + 12 + 20).to_le_bytes());
    node(&mut t, 6, &rmr, &[[0, 1, 0x4a, smmu, 1]]);
    for (base, len) in [(0x8000_0000u64, 0x1_0000u64), (0x9000_0000, 0x20_0000)] {
        t.extend_from_slice(&base.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
    }
    // Patch the RMR node's length to cover its descriptors.
    let rmr_at = t.len() - 40 - 48;
    let rmr_len = (48 + 40) as u16;
    t[rmr_at + 1..rmr_at + 3].copy_from_slice(&rmr_len.to_le_bytes());
    let t = finish(t);
    let iort = Iort::new(&t).unwrap();
    let n = iort.named_component(b"\\_SB.DMA0").unwrap().unwrap();
    assert_eq!(n.offset as u32, nc_at);
    let target = iort.map_id(n, 0).unwrap().unwrap();
    assert_eq!((target.smmu.offset as u32, target.stream_id), (smmu, 0x4a));
    assert_eq!(iort.map_pci(2, 0x0310).unwrap().unwrap().stream_id, 0x10310);
    let mut regions = vec![];
    iort.reserved_regions_for(&target.smmu, 0x4b, |r, f| {
        regions.push((r, f.remap_permitted()))
    })
    .unwrap();
    assert_eq!(
        regions,
        [
            (
                ReservedRegion {
                    base: 0x8000_0000,
                    len: 0x1_0000
                },
                false
            ),
            (
                ReservedRegion {
                    base: 0x9000_0000,
                    len: 0x20_0000
                },
                false
            ),
        ]
    );
    let mut none = 0;
    iort.reserved_regions_for(&target.smmu, 0x4c, |_, _| none += 1)
        .unwrap();
    assert_eq!(none, 0);
}

#[test]
fn iort_refuses_cycles_and_dangling_references() {
    let mut t = iort_header(2);
    // Two root complexes mapping into each other.
    let mut rc = vec![0u8; 20];
    node(&mut t, 2, &rc, &[[0, 0xffff, 0, 48 + 56, 0]]);
    rc[12] = 1;
    node(&mut t, 2, &rc, &[[0, 0xffff, 0, 48, 0]]);
    let t = finish(t);
    let iort = Iort::new(&t).unwrap();
    assert_eq!(iort.map_pci(0, 5).unwrap_err(), FirmwareError::MappingLoop);
    let mut t = iort_header(1);
    node(&mut t, 2, &[0u8; 20], &[[0, 0xffff, 0, 0x999, 0]]);
    let t = finish(t);
    assert_eq!(
        Iort::new(&t).unwrap().map_pci(0, 5).unwrap_err(),
        FirmwareError::BadReference { reference: 0x999 }
    );
    // An ID mapping array claimed past the node's end.
    let mut t = iort_header(1);
    node(&mut t, 2, &[0u8; 20], &[[0, 0xffff, 0, 48, 0]]);
    t[48 + 8] = 9;
    let t = finish(t);
    assert!(matches!(
        Iort::new(&t).unwrap().nodes().next(),
        Some(Err(FirmwareError::BadLength { .. }))
    ));
    // Output ID overflow.
    let mut t = iort_header(2);
    let smmu = 48 + 56;
    node(&mut t, 2, &[0u8; 20], &[[0, 0xffff, 0xffff_fff0, smmu, 0]]);
    node(&mut t, 4, &smmu_body(0), &[]);
    let t = finish(t);
    let iort = Iort::new(&t).unwrap();
    assert_eq!(
        iort.map_pci(0, 0xf).unwrap().unwrap().stream_id,
        0xffff_ffff
    );
    assert!(matches!(
        iort.map_pci(0, 0x10),
        Err(FirmwareError::Overflow { .. })
    ));
}

/// Just enough FDT walking for the test: (node path depth, name, props).
fn fdt_props(dtb: &[u8], mut f: impl FnMut(&[u8], &[u8], &[u8])) {
    let be = |o: usize| u32::from_be_bytes(dtb[o..o + 4].try_into().unwrap()) as usize;
    let (st, strs) = (be(8), be(12));
    let mut off = st;
    let mut names: Vec<&[u8]> = vec![];
    loop {
        let tok = be(off);
        off += 4;
        match tok {
            1 => {
                let end = off + dtb[off..].iter().position(|&b| b == 0).unwrap();
                names.push(&dtb[off..end]);
                off = (end + 1 + 3) & !3;
            }
            2 => {
                names.pop();
            }
            3 => {
                let (len, nameoff) = (be(off), be(off + 4));
                let val = &dtb[off + 8..off + 8 + len];
                let n0 = strs + nameoff;
                let n1 = n0 + dtb[n0..].iter().position(|&b| b == 0).unwrap();
                f(names.last().unwrap(), &dtb[n0..n1], val);
                off = (off + 8 + len + 3) & !3;
            }
            4 => {}
            _ => break,
        }
    }
}

#[test]
fn virt_devicetree_iommu_map_gives_the_smmu_and_stream_ids() {
    let mut map = None;
    let mut mask = None;
    let mut smmu_phandle = None;
    let mut smmu_cells = None;
    let mut cur_is_smmu = false;
    let mut last_node: Vec<u8> = vec![];
    fdt_props(VIRT_DTB, |node, name, val| {
        if node != last_node.as_slice() {
            last_node = node.to_vec();
            cur_is_smmu = false;
        }
        match name {
            b"iommu-map" => map = Some(val.to_vec()),
            b"iommu-map-mask" => mask = Some(val.to_vec()),
            b"compatible" if val.starts_with(b"arm,smmu-v3") => cur_is_smmu = true,
            b"phandle" if node.starts_with(b"smmuv3@") => {
                smmu_phandle = Some(u32::from_be_bytes(val.try_into().unwrap()))
            }
            b"#iommu-cells" if node.starts_with(b"smmuv3@") => {
                smmu_cells = Some(u32::from_be_bytes(val.try_into().unwrap()))
            }
            _ => {}
        }
    });
    let phandle = smmu_phandle.expect("smmuv3 node with a phandle");
    assert_eq!(smmu_cells, Some(1));
    let map = map.expect("pcie node has iommu-map");
    let m = IommuMap::new(&map, mask.as_deref()).unwrap();
    assert_eq!(m.mask(), u32::MAX);
    let e: Vec<_> = m.entries().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(
        (e[0].rid_base, e[0].phandle, e[0].iommu_base, e[0].length),
        (0, phandle, 0, 0x10000)
    );
    // The board's edu at 00:05.0 and a device behind a bridge at 01:00.0.
    assert_eq!(
        m.map(0x28).unwrap(),
        Some(IommuTarget { phandle, id: 0x28 })
    );
    assert_eq!(
        m.map(0x100).unwrap(),
        Some(IommuTarget { phandle, id: 0x100 })
    );
    assert_eq!(m.map(0x1_0000).unwrap(), None);
}

fn cells(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|c| c.to_be_bytes()).collect()
}

#[test]
fn iommu_map_applies_mask_and_offsets() {
    // Two IOMMUs: RIDs 0-0xff → phandle 1 from 0x800; 0x100-0x1ff → phandle 2 from 0.
    let map = cells(&[0, 1, 0x800, 0x100, 0x100, 2, 0, 0x100]);
    let mask = cells(&[0x1f8]);
    let m = IommuMap::new(&map, Some(&mask)).unwrap();
    assert_eq!(
        m.map(0x0d).unwrap(),
        Some(IommuTarget {
            phandle: 1,
            id: 0x808
        })
    );
    assert_eq!(
        m.map(0x10f).unwrap(),
        Some(IommuTarget {
            phandle: 2,
            id: 0x8
        })
    );
    assert_eq!(
        m.map(0x200).unwrap(),
        Some(IommuTarget {
            phandle: 1,
            id: 0x800
        })
    );
    assert!(matches!(
        IommuMap::new(&map[..12], None),
        Err(FirmwareError::BadPropertyLength { len: 12, entry: 16 })
    ));
    let over = cells(&[0, 1, 0xffff_ffff, 2]);
    let m = IommuMap::new(&over, None).unwrap();
    assert_eq!(m.map(0).unwrap().unwrap().id, 0xffff_ffff);
    assert!(matches!(m.map(1), Err(FirmwareError::Overflow { .. })));
}

#[test]
fn iommus_reads_each_iommus_cell_count() {
    let prop = cells(&[7, 0x21, 9, 0x1, 0x2, 7, 0x22]);
    let cells_of = |p| match p {
        7 => Some(1),
        9 => Some(2),
        _ => None,
    };
    let got: Vec<_> = iommus(&prop, cells_of)
        .map(|s| {
            let s = s.unwrap();
            (s.phandle, s.cells().to_vec())
        })
        .collect();
    assert_eq!(got, [(7, vec![0x21]), (9, vec![1, 2]), (7, vec![0x22])]);
    let bad: Vec<_> = iommus(&cells(&[8, 1]), cells_of).collect();
    assert_eq!(bad, [Err(FirmwareError::BadIommuCells { phandle: 8 })]);
    let cut: Vec<_> = iommus(&cells(&[9, 1]), cells_of).collect();
    assert!(matches!(cut[..], [Err(FirmwareError::Truncated { .. })]));
}
