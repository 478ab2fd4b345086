//! The generic walker: blocks where alignment allows, splits on partial
//! unmap, exact byte counts, freed tables — for every format.

mod common;

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::{DmaAddr, IoPageTable, MapAttrs, PageTableError, PhysAddr, PteFormat};
use common::HostMemory;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const RW: MapAttrs = MapAttrs::READ.union(MapAttrs::WRITE);

fn leaf_height<F: PteFormat>(t: &IoPageTable<F, &HostMemory>, iova: u64) -> Option<u32> {
    t.translate(DmaAddr(iova)).map(|(_, _, h)| h)
}

fn blocks_and_splits<F: PteFormat>(fmt: F) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    // 2 MiB-aligned on both sides: one block for the middle, pages at the ends.
    let iova = 0x4000_0000 - K4;
    let pa = 0x8000_0000 - K4;
    t.map(DmaAddr(iova), PhysAddr(pa), M2 + 2 * K4, RW).unwrap();
    assert_eq!(leaf_height(&t, iova), Some(0));
    assert_eq!(
        leaf_height(&t, 0x4000_0000),
        Some(1),
        "aligned 2 MiB run maps as a block"
    );
    assert_eq!(leaf_height(&t, 0x4000_0000 + M2), Some(0));
    assert_eq!(
        t.translate(DmaAddr(0x4000_0000 + 0x12345)).unwrap().0,
        PhysAddr(0x8000_0000 + 0x12345)
    );

    // Unmap one page in the middle of the block: the block is split, the rest still translates.
    let out = t.unmap(DmaAddr(0x4000_0000 + 0x10_0000), K4).unwrap();
    assert_eq!(out.bytes, K4);
    assert!(out.split);
    assert_eq!(t.translate(DmaAddr(0x4000_0000 + 0x10_0000)), None);
    for off in [0u64, 0xf_f000, 0x10_1000, M2 - K4] {
        let (p, a, h) = t.translate(DmaAddr(0x4000_0000 + off)).unwrap();
        assert_eq!(p, PhysAddr(0x8000_0000 + off));
        assert_eq!(h, 0);
        assert_eq!(a, fmt.canonical(RW));
    }
    // Unmap the rest: exactly the bytes still mapped.
    let out = t.unmap(DmaAddr(0x4000_0000), 0x10_0000).unwrap();
    assert_eq!(out.bytes, 0x10_0000);
    assert_eq!(
        t.unmap(DmaAddr(iova), M2 + 2 * K4),
        Err(PageTableError::NotMapped {
            iova: DmaAddr(0x4000_0000)
        })
    );
    let out = t.unmap_present(DmaAddr(iova), M2 + 2 * K4).unwrap();
    assert_eq!(out.bytes, M2 + 2 * K4 - 0x10_0000 - K4);
    assert!(out.freed_tables);
    t.free_retired();
    assert_eq!(t.table_pages(), 1, "all tables but the root are freed");
    assert_eq!(mem.live_pages(), 1);
}

#[test]
fn stage1_blocks_appear_when_aligned_and_split_on_partial_unmap() {
    blocks_and_splits(ArmStage1);
}

#[test]
fn stage2_blocks_appear_when_aligned_and_split_on_partial_unmap() {
    blocks_and_splits(ArmStage2);
}

#[test]
fn vtd_superpages_appear_when_aligned_and_split_on_partial_unmap() {
    blocks_and_splits(VtdSecondLevel::default());
}

#[test]
fn vtd_without_superpages_maps_pages_only() {
    let mem = HostMemory::new();
    let fmt = VtdSecondLevel {
        sllps: 0,
        snoop_control: false,
        haw: 48,
    };
    let mut t = IoPageTable::new(fmt, &mem, 3, true).unwrap();
    t.map(DmaAddr(0), PhysAddr(0), M2, RW).unwrap();
    assert_eq!(leaf_height(&t, 0x1000), Some(0));
    assert_eq!(t.ias_bits(), 39);
    assert_eq!(
        t.map(DmaAddr(1 << 39), PhysAddr(0), K4, RW),
        Err(PageTableError::OutOfRange {
            iova: DmaAddr(1 << 39),
            len: K4,
            limit: 1 << 39
        })
    );
    assert_eq!(
        t.map(DmaAddr(M2), PhysAddr(1 << 48), K4, RW),
        Err(PageTableError::PhysTooLarge {
            phys: PhysAddr(1 << 48)
        })
    );
}

#[test]
fn gigabyte_block_splits_down_to_pages() {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(ArmStage2, &mem, 4, true).unwrap();
    t.map(DmaAddr(G1), PhysAddr(4 * G1), G1, RW).unwrap();
    assert_eq!(leaf_height(&t, G1 + 5), Some(2));
    assert_eq!(t.table_pages(), 2);
    let out = t.unmap(DmaAddr(G1 + 3 * M2 + 7 * K4), K4).unwrap();
    assert_eq!(out.bytes, K4);
    assert_eq!(leaf_height(&t, G1), Some(1));
    assert_eq!(leaf_height(&t, G1 + 3 * M2), Some(0));
    assert_eq!(
        t.translate(DmaAddr(G1 + 3 * M2 + 8 * K4)).unwrap().0,
        PhysAddr(4 * G1 + 3 * M2 + 8 * K4)
    );
    assert_eq!(t.translate(DmaAddr(G1 + 3 * M2 + 7 * K4)), None);
    assert_eq!(t.table_pages(), 4);
}

#[test]
fn split_refused_by_the_lender_unmaps_nothing() {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
    t.map(DmaAddr(0), PhysAddr(0), M2, RW).unwrap();
    mem.set_budget(Some(0));
    assert_eq!(t.unmap(DmaAddr(K4), K4), Err(PageTableError::OutOfMemory));
    assert_eq!(t.translate(DmaAddr(K4)).unwrap().0, PhysAddr(K4));
}

#[test]
fn a_run_of_pages_fills_leaf_tables_without_extra_tables() {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
    // 1024 pages at an address that prevents blocks: root + L1 + L2 + 2 leaf tables.
    t.map(DmaAddr(0x20_0000), PhysAddr(0x1000), 1024 * K4, RW)
        .unwrap();
    assert_eq!(t.table_pages(), 5);
    assert_eq!(mem.allocs.get(), 5);
    assert_eq!(
        t.translate(DmaAddr(0x20_0000 + 1023 * K4)).unwrap().0,
        PhysAddr(0x1000 + 1023 * K4)
    );
}

#[test]
fn dropping_a_table_returns_every_page() {
    let mem = HostMemory::new();
    {
        let mut t = IoPageTable::new(VtdSecondLevel::default(), &mem, 4, false).unwrap();
        t.map(DmaAddr(0x1000), PhysAddr(0x1000), 300 * K4, RW)
            .unwrap();
        t.map(DmaAddr(1 << 40), PhysAddr(0x40_0000), M2, RW)
            .unwrap();
        assert!(mem.live_pages() > 1);
    }
    assert_eq!(mem.live_pages(), 0);
}
