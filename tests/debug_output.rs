//! `{:?}` on the owners of tables (domains, page tables, allocators,
//! registries) prints a summary a user can log, without asking the lender
//! to be `Debug` and without dumping table memory.

mod common;

use bare_iommu::iova::IovaAllocator;
use bare_iommu::p2p::P2pRegistry;
use bare_iommu::pgtable::arm::ArmStage2;
use bare_iommu::{DmaDirection, Domain, DomainConfig, MapAttrs, PhysAddr};
use common::HostMemory;

#[test]
fn a_domain_debug_shows_its_tag_format_root_and_iova_use() {
    let mem = HostMemory::new(); // not Debug
    let cfg = DomainConfig {
        id: 42,
        levels: 3,
        aperture_start: 0,
        aperture_end: 1 << 30,
        coherent_walk: true,
    };
    let mut dom = Domain::new(ArmStage2, &mem, cfg).unwrap();
    let mut tx = dom
        .try_alloc(2 * 4096, u64::MAX)
        .unwrap()
        .into_iova()
        .unwrap();
    dom.link(
        &mut tx,
        PhysAddr(0x4000_0000),
        0,
        4096,
        DmaDirection::ToDevice,
        MapAttrs::empty(),
    )
    .unwrap();
    let root = dom.info().unwrap().root;
    let s = format!("{dom:?}");
    assert!(s.starts_with("Domain {"), "{s}");
    assert!(s.contains("id: 42"), "{s}");
    assert!(s.contains("ArmStage2"), "{s}");
    assert!(s.contains(&format!("{root:?}")), "{s}");
    assert!(s.contains("iova_in_use: 8192"), "{s}");
    let pt = format!("{:?}", dom.page_table().unwrap());
    assert!(
        pt.contains("levels: 3") && pt.contains("table_pages: 3"),
        "{pt}"
    );

    let identity = Domain::<ArmStage2, &HostMemory>::identity(7);
    assert_eq!(
        format!("{identity:?}"),
        "Domain { id: 7, identity: true, .. }"
    );
    dom.free(tx).unwrap();
}

#[test]
fn allocator_and_registry_debug_print_their_state() {
    let mut a = IovaAllocator::new(0x1000, 0x10_0000).unwrap();
    a.alloc(0x4000, u64::MAX).unwrap();
    let s = format!("{a:?}");
    assert!(s.contains("in_use: 16384"), "{s}");
    let r = P2pRegistry::new();
    assert!(format!("{r:?}").contains("computed: 0"));
}
