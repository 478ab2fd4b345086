//! The generic walker: blocks where alignment allows, partial unmaps of a
//! block refused (never split under a live walker), exact byte counts,
//! freed tables — for every format.

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

fn blocks_and_partial_unmaps<F: PteFormat>(fmt: F) {
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

    // Unmap one page in the middle of the block, or a range ending inside
    // it: refused, nothing changes (no table stored over the live block).
    let refused = Err(PageTableError::PartialBlock {
        iova: DmaAddr(0x4000_0000),
        size: M2,
    });
    assert_eq!(t.unmap(DmaAddr(0x4000_0000 + 0x10_0000), K4), refused);
    assert_eq!(t.unmap(DmaAddr(iova), 2 * K4), refused);
    for off in [0u64, 0xf_f000, 0x10_0000, 0x10_1000, M2 - K4] {
        let (p, a, h) = t.translate(DmaAddr(0x4000_0000 + off)).unwrap();
        assert_eq!(p, PhysAddr(0x8000_0000 + off));
        assert_eq!(h, 1);
        assert_eq!(a, fmt.canonical(RW));
    }
    assert_eq!(leaf_height(&t, iova), Some(0), "the page before is kept");
    // The whole block goes in one unmap: exactly its bytes.
    let out = t.unmap(DmaAddr(0x4000_0000), M2).unwrap();
    assert_eq!(out.bytes, M2);
    assert_eq!(
        t.unmap(DmaAddr(iova), M2 + 2 * K4),
        Err(PageTableError::NotMapped {
            iova: DmaAddr(0x4000_0000)
        })
    );
    let out = t.unmap_present(DmaAddr(iova), M2 + 2 * K4).unwrap();
    assert_eq!(out.bytes, 2 * K4);
    assert!(out.freed_tables);
    t.free_retired();
    // All tables but the root and its child (kept: `kept_height`) are freed.
    assert_eq!(t.kept_height(), Some(2));
    assert_eq!(t.table_pages(), 2);
    // Nothing else: the counts live in the table pointers.
    assert_eq!(mem.live_pages(), 2);
}

#[test]
fn stage1_blocks_appear_when_aligned_and_partial_unmaps_are_refused() {
    blocks_and_partial_unmaps(ArmStage1);
}

#[test]
fn stage2_blocks_appear_when_aligned_and_partial_unmaps_are_refused() {
    blocks_and_partial_unmaps(ArmStage2);
}

#[test]
fn vtd_superpages_appear_when_aligned_and_partial_unmaps_are_refused() {
    blocks_and_partial_unmaps(VtdSecondLevel::default());
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
fn a_page_inside_a_gigabyte_block_cannot_be_unmapped_alone() {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(ArmStage2, &mem, 4, true).unwrap();
    t.map(DmaAddr(G1), PhysAddr(4 * G1), G1, RW).unwrap();
    assert_eq!(leaf_height(&t, G1 + 5), Some(2));
    assert_eq!(t.table_pages(), 2);
    let allocs = mem.allocs.get();
    assert_eq!(
        t.unmap(DmaAddr(G1 + 3 * M2 + 7 * K4), K4),
        Err(PageTableError::PartialBlock {
            iova: DmaAddr(G1),
            size: G1
        })
    );
    assert_eq!(
        t.translate(DmaAddr(G1 + 3 * M2 + 7 * K4)).unwrap().0,
        PhysAddr(4 * G1 + 3 * M2 + 7 * K4)
    );
    assert_eq!(t.table_pages(), 2);
    assert_eq!(mem.allocs.get(), allocs, "no table page taken for a split");
    assert_eq!(t.unmap(DmaAddr(G1), G1).unwrap().bytes, G1);
}

#[test]
fn a_run_of_pages_fills_leaf_tables_without_extra_tables() {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(ArmStage1, &mem, 4, true).unwrap();
    // 1024 pages at an address that prevents blocks: root + L1 + L2 + 2 leaf tables.
    t.map(DmaAddr(0x20_0000), PhysAddr(0x1000), 1024 * K4, RW)
        .unwrap();
    assert_eq!(t.table_pages(), 5);
    // Nothing else: the counts live in the table pointers.
    assert_eq!(mem.allocs.get(), 5);
    assert_eq!(
        t.translate(DmaAddr(0x20_0000 + 1023 * K4)).unwrap().0,
        PhysAddr(0x1000 + 1023 * K4)
    );
}

#[test]
fn dropping_a_table_hands_back_nothing_and_free_all_hands_back_everything() {
    let mem = HostMemory::new();
    let build = || {
        let mut t = IoPageTable::new(VtdSecondLevel::default(), &mem, 4, true).unwrap();
        t.map(DmaAddr(0x1000), PhysAddr(0x1000), 300 * K4, RW)
            .unwrap();
        t.map(DmaAddr(1 << 40), PhysAddr(0x40_0000), M2, RW)
            .unwrap();
        t
    };
    let t = build();
    let pages = mem.live_pages();
    assert!(pages > 1);
    // The IOMMU may still walk a dropped table: its pages stay lent.
    {
        let _dropped_here = t;
    }
    assert_eq!(mem.live_pages(), pages);
    let t = build();
    // SAFETY: no IOMMU ever saw this table.
    unsafe { t.free_all() };
    assert_eq!(mem.live_pages(), pages);
}

/// Issue 11 §3: unmapping a 1 GiB block decides that its table became
/// empty from the table's valid-entry count, without reading the other 511
/// entries. With 5 levels the emptied table is detached and retired; with
/// 4 it is the root's child, which stays attached (`kept_height`).
fn block_1g_unmap_reads_no_neighbours<F: PteFormat>(fmt: F, levels: u8) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, levels, true).unwrap();
    t.map(DmaAddr(G1), PhysAddr(4 * G1), G1, RW).unwrap();
    assert_eq!(leaf_height(&t, G1), Some(2));
    let pages = t.table_pages();
    let before = mem.lookups.get();
    let out = t.unmap(DmaAddr(G1), G1).unwrap();
    let reads = mem.lookups.get() - before;
    assert_eq!(out.bytes, G1);
    assert_eq!(t.translate(DmaAddr(G1)), None);
    assert_eq!(t.kept_height(), Some(u32::from(levels) - 2));
    if levels == 4 {
        assert!(!out.freed_tables, "the root's child stays attached");
        assert_eq!((t.table_pages(), t.retired_pages()), (pages, 0));
    } else {
        assert!(out.freed_tables, "the emptied table is detached");
        assert_eq!(t.table_pages(), pages - 1);
        // The table alone (its count went with the pointer to it).
        assert_eq!(t.retired_pages(), 1);
    }
    // A walk to the block and back (a few entries per level), not a scan
    // of the table's 512 entries.
    assert!(reads < 32, "{reads} table entries read to unmap one block");
}

#[test]
fn unmapping_a_1g_block_reads_no_neighbour_entries() {
    for levels in [4, 5] {
        block_1g_unmap_reads_no_neighbours(ArmStage1, levels);
        block_1g_unmap_reads_no_neighbours(ArmStage2, levels);
        block_1g_unmap_reads_no_neighbours(VtdSecondLevel::default(), levels);
    }
}

/// Issue 11 §3: unmapping the only page of a leaf table (a scattered
/// unlink) decides that the leaf table became empty from its count, without
/// reading its other 511 entries; the emptied tables are detached.
fn scattered_page_unmap_reads_no_neighbours<F: PteFormat>(fmt: F) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    // One page in each of four 2 MiB regions: four leaf tables.
    for r in 0..4u64 {
        t.map(DmaAddr(G1 + r * M2), PhysAddr(0x1000 + 2 * r * K4), K4, RW)
            .unwrap();
    }
    let pages = t.table_pages();
    for r in [2u64, 0, 3] {
        let before = mem.lookups.get();
        let out = t.unmap(DmaAddr(G1 + r * M2), K4).unwrap();
        let reads = mem.lookups.get() - before;
        assert_eq!(out.bytes, K4);
        assert!(out.freed_tables, "the emptied leaf table is detached");
        assert!(
            reads < 32,
            "{reads} table entries read to unmap one scattered page"
        );
    }
    assert_eq!(t.table_pages(), pages - 3);
    assert_eq!(leaf_height(&t, G1 + M2), Some(0), "the last page stays");
}

#[test]
fn unmapping_a_scattered_page_reads_no_neighbour_entries() {
    scattered_page_unmap_reads_no_neighbours(ArmStage1);
    scattered_page_unmap_reads_no_neighbours(ArmStage2);
    scattered_page_unmap_reads_no_neighbours(VtdSecondLevel::default());
}

/// `PteFormat::is_leaf` (the 1 GiB unmap's check) answers as `decode` does,
/// for leaves written by the format, tables, and arbitrary words, at every
/// height, in every format.
fn is_leaf_agrees_with_decode<F: PteFormat>(fmt: F) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut words = vec![0u64, 1, 2, 3, u64::MAX, fmt.table(PhysAddr(0x4000_0000))];
    for h in 0..3 {
        if h == 0 || fmt.leaf_allowed(h) {
            words.push(fmt.leaf(PhysAddr(0x4000_0000), h, RW));
            words.push(fmt.leaf(PhysAddr(0x4000_0000), h, MapAttrs::READ));
        }
    }
    // Fewer under Miri, which checks every access (minutes otherwise).
    for _ in 0..if cfg!(miri) { 200 } else { 20_000 } {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        words.push(x);
        words.push(x & 0xfff);
    }
    for &w in &words {
        for h in 0..5 {
            let want = matches!(fmt.decode(w, h), bare_iommu::pgtable::Pte::Leaf { .. });
            assert_eq!(fmt.is_leaf(w, h), want, "word {w:#x} at height {h}");
        }
    }
}

#[test]
fn is_leaf_answers_as_decode_in_every_format() {
    is_leaf_agrees_with_decode(ArmStage1);
    is_leaf_agrees_with_decode(ArmStage2);
    for sllps in 0..4 {
        for snoop_control in [false, true] {
            is_leaf_agrees_with_decode(VtdSecondLevel {
                sllps,
                snoop_control,
                haw: 48,
            });
        }
    }
    for fl1gp in [false, true] {
        is_leaf_agrees_with_decode(bare_iommu::vtd::VtdFirstLevel { fl1gp, haw: 48 });
    }
}

/// The one-block unmap shortcut (`len` of 2 MiB or 1 GiB) answers only for
/// a present block inside the input range; every other gigabyte-long
/// unmap gets the full path's answer.
fn gigabyte_unmaps_that_are_not_one_block<F: PteFormat>(fmt: F) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    // A GiB of 2 MiB blocks (mapped in two halves, so no 1 GiB block).
    t.map(DmaAddr(G1), PhysAddr(4 * G1), G1 / 2, RW).unwrap();
    t.map(DmaAddr(G1 + G1 / 2), PhysAddr(8 * G1), G1 / 2, RW)
        .unwrap();
    assert_eq!(leaf_height(&t, G1), Some(1));
    // A 1 GiB block next to it.
    t.map(DmaAddr(2 * G1), PhysAddr(4 * G1), G1, RW).unwrap();
    assert_eq!(leaf_height(&t, 2 * G1), Some(2));
    // Past the input range (48 bits): refused, nothing read.
    assert_eq!(
        t.unmap(DmaAddr(1 << 48), G1),
        Err(PageTableError::OutOfRange {
            iova: DmaAddr(1 << 48),
            len: G1,
            limit: 1 << 48
        })
    );
    // Nothing mapped there.
    assert_eq!(
        t.unmap(DmaAddr(5 * G1), G1),
        Err(PageTableError::NotMapped {
            iova: DmaAddr(5 * G1)
        })
    );
    // A GiB that cuts the 1 GiB block: refused, the block stays.
    assert_eq!(
        t.unmap(DmaAddr(G1 + G1 / 2), G1),
        Err(PageTableError::PartialBlock {
            iova: DmaAddr(2 * G1),
            size: G1
        })
    );
    assert_eq!(leaf_height(&t, 2 * G1 + G1 / 2), Some(2));
    assert_eq!(leaf_height(&t, G1 + G1 / 2), Some(1));
    // The GiB of 2 MiB blocks goes whole, then the block alone.
    assert_eq!(t.unmap(DmaAddr(G1), G1).unwrap().bytes, G1);
    assert_eq!(leaf_height(&t, G1 + G1 - K4), None);
    assert_eq!(leaf_height(&t, 2 * G1), Some(2));
    let out = t.unmap(DmaAddr(2 * G1), G1).unwrap();
    assert_eq!(out.bytes, G1);
    assert!(!out.freed_tables, "the root's children are kept");
    assert_eq!(leaf_height(&t, 2 * G1), None);
    assert_eq!(
        t.unmap(DmaAddr(2 * G1), G1),
        Err(PageTableError::NotMapped {
            iova: DmaAddr(2 * G1)
        })
    );
    t.check_counts().unwrap();
}

#[test]
fn gigabyte_unmaps_that_are_not_one_block_get_the_full_answer() {
    gigabyte_unmaps_that_are_not_one_block(ArmStage1);
    gigabyte_unmaps_that_are_not_one_block(ArmStage2);
    gigabyte_unmaps_that_are_not_one_block(VtdSecondLevel::default());
}

/// Per-page unmaps that empty leaf tables (detached from the parent the
/// lookup cached, the parent too when it empties) leave the same tables
/// as one whole-range unmap, at every depth: the root as parent (2
/// levels), kept root children (no block at the root), deeper parents.
fn per_page_unmaps_detach_like_a_range_unmap<F: PteFormat + Copy>(fmt: F, levels: u8) {
    let mem = HostMemory::new();
    let mut a = IoPageTable::new(fmt, &mem, levels, true).unwrap();
    let mut b = IoPageTable::new(fmt, &mem, levels, true).unwrap();
    // Pages in 2 MiB regions spread over two 1 GiB regions (one region
    // only when the table translates 1 GiB): two pages in some leaf
    // tables, one in others.
    let span = (1u64 << a.ias_bits()).min(2 * G1);
    let mut pages = Vec::new();
    for i in 0..24u64 {
        let base = (i * 45 * M2) % span;
        pages.push(base + (i % 3) * K4);
        if i % 4 == 0 {
            pages.push(base + 100 * K4);
        }
    }
    for t in [&mut a, &mut b] {
        for (i, &p) in pages.iter().enumerate() {
            t.map(DmaAddr(p), PhysAddr(0x8000_0000 + i as u64 * K4), K4, RW)
                .unwrap();
        }
        t.check_counts().unwrap();
    }
    // `a`: page by page, in an order that empties leaf tables and their
    // parents at different times.
    for &p in pages.iter().rev().step_by(2).chain(pages.iter().step_by(2)) {
        a.unmap(DmaAddr(p), K4).unwrap();
        if !cfg!(miri) {
            a.check_counts().unwrap();
        }
        assert_eq!(a.translate(DmaAddr(p)), None);
    }
    a.check_counts().unwrap();
    b.unmap_present(DmaAddr(0), span).unwrap();
    a.free_retired();
    b.free_retired();
    assert_eq!(a.table_pages(), b.table_pages());
    // And every page can be linked again.
    for &p in &pages {
        a.map(DmaAddr(p), PhysAddr(0x9000_0000), K4, RW).unwrap();
        if !cfg!(miri) {
            a.check_counts().unwrap();
        }
    }
    a.check_counts().unwrap();
}

#[test]
fn per_page_unmaps_detach_emptied_tables_as_a_range_unmap_does() {
    // Under Miri (minutes per configuration: every step rescans the
    // tables) one configuration with a 1 GiB-capable upper level.
    let levels = if cfg!(miri) { 4..=4 } else { 2..=5 };
    for levels in levels {
        per_page_unmaps_detach_like_a_range_unmap(ArmStage1, levels);
        if cfg!(miri) {
            continue;
        }
        per_page_unmaps_detach_like_a_range_unmap(VtdSecondLevel::default(), levels);
        per_page_unmaps_detach_like_a_range_unmap(
            VtdSecondLevel {
                sllps: 0,
                snoop_control: false,
                haw: 48,
            },
            levels,
        );
    }
}

/// The one-block map shortcut (`len` of 2 MiB or 1 GiB, both addresses
/// aligned to it, the entry empty) answers only for such a call; every
/// other block-long map gets the full path's answer, the table unchanged
/// on every refusal.
fn block_maps_that_are_not_one_empty_entry<F: PteFormat>(fmt: F) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    let one_gib_blocks = fmt.leaf_allowed(2);
    // One 1 GiB block where the format has them, 2 MiB blocks otherwise.
    t.map(DmaAddr(G1), PhysAddr(4 * G1), G1, RW).unwrap();
    let h = if one_gib_blocks { 2 } else { 1 };
    assert_eq!(leaf_height(&t, G1 + G1 - K4), Some(h));
    assert_eq!(
        t.translate(DmaAddr(G1 + 0x12_3000)).map(|(pa, _, _)| pa),
        Some(PhysAddr(4 * G1 + 0x12_3000))
    );
    // Mapped already: the block itself, a 2 MiB block inside it.
    let taken = Err(PageTableError::AlreadyMapped { iova: DmaAddr(G1) });
    assert_eq!(t.map(DmaAddr(G1), PhysAddr(8 * G1), G1, RW), taken);
    let inside = Err(PageTableError::AlreadyMapped {
        iova: DmaAddr(G1 + M2),
    });
    assert_eq!(t.map(DmaAddr(G1 + M2), PhysAddr(8 * G1), M2, RW), inside);
    // A 1 GiB map over a 2 MiB block names the block.
    t.map(DmaAddr(3 * G1 + 4 * M2), PhysAddr(8 * G1), M2, RW)
        .unwrap();
    assert_eq!(
        t.map(DmaAddr(3 * G1), PhysAddr(8 * G1), G1, RW),
        Err(PageTableError::AlreadyMapped {
            iova: DmaAddr(3 * G1 + 4 * M2)
        })
    );
    assert_eq!(leaf_height(&t, 3 * G1), None);
    // No access, past the input range, past the output range: refused.
    assert_eq!(
        t.map(DmaAddr(5 * G1), PhysAddr(8 * G1), M2, MapAttrs::empty()),
        Err(PageTableError::NoAccess)
    );
    assert!(matches!(
        t.map(DmaAddr(1 << 48), PhysAddr(8 * G1), M2, RW),
        Err(PageTableError::OutOfRange { .. })
    ));
    let oa_end = 1u64 << fmt.oa_bits();
    assert_eq!(
        t.map(DmaAddr(5 * G1), PhysAddr(oa_end), M2, RW),
        Err(PageTableError::PhysTooLarge {
            phys: PhysAddr(oa_end)
        })
    );
    assert_eq!(leaf_height(&t, 5 * G1), None);
    // The last block below the output end fits.
    t.map(DmaAddr(5 * G1), PhysAddr(oa_end - M2), M2, RW)
        .unwrap();
    assert_eq!(leaf_height(&t, 5 * G1), Some(1));
    // A physical start aligned to a page only: pages.
    t.map(DmaAddr(6 * G1), PhysAddr(8 * G1 + K4), M2, RW)
        .unwrap();
    assert_eq!(leaf_height(&t, 6 * G1), Some(0));
    assert_eq!(
        t.translate(DmaAddr(6 * G1 + M2 - K4)).map(|(pa, _, _)| pa),
        Some(PhysAddr(8 * G1 + M2))
    );
    t.check_counts().unwrap();
    // Three levels: a 1 GiB block sits in the root.
    let mut t3 = IoPageTable::new(fmt, &mem, 3, true).unwrap();
    t3.map(DmaAddr(G1), PhysAddr(4 * G1), G1, RW).unwrap();
    assert_eq!(leaf_height(&t3, G1 + K4), Some(h));
    t3.check_counts().unwrap();
}

#[test]
fn block_maps_that_are_not_one_empty_entry_get_the_full_answer() {
    block_maps_that_are_not_one_empty_entry(ArmStage1);
    block_maps_that_are_not_one_empty_entry(ArmStage2);
    block_maps_that_are_not_one_empty_entry(VtdSecondLevel::default());
    // 2 MiB superpages only; a 47-bit output range (host lender pages
    // lie below 2^47).
    block_maps_that_are_not_one_empty_entry(VtdSecondLevel {
        sllps: 1,
        snoop_control: true,
        haw: 47,
    });
}

/// One-page maps whose attributes change from page to page (one-way DMA
/// buffers next to read-write ones, other attribute bits mixed in) write
/// each page's own descriptor, whether the one-page path knows its bits
/// (the last map's, or a plain direction's) or has to encode them: the
/// translation decodes to the page and its attributes, as the full
/// path's range map of the same attributes does.
fn per_page_maps_with_changing_attributes<F: PteFormat + Copy>(fmt: F) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    let mut oracle = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    let all = [
        MapAttrs::READ,
        MapAttrs::WRITE,
        RW,
        MapAttrs::READ,
        MapAttrs::READ | MapAttrs::NO_EXEC,
        MapAttrs::WRITE,
        MapAttrs::READ | MapAttrs::MMIO,
        RW,
        MapAttrs::WRITE,
        RW | MapAttrs::PRIVILEGED,
        MapAttrs::READ,
    ];
    for (i, &attrs) in all.iter().enumerate() {
        let iova = 0x4000_0000 + i as u64 * K4;
        let pa = 0x8000_0000 + 2 * i as u64 * K4;
        t.map(DmaAddr(iova), PhysAddr(pa), K4, attrs).unwrap();
        // The oracle maps two pages in one call (the encoding path), then
        // drops the second.
        oracle
            .map(DmaAddr(iova), PhysAddr(pa), 2 * K4, attrs)
            .unwrap();
        oracle.unmap(DmaAddr(iova + K4), K4).unwrap();
        let got = t.translate(DmaAddr(iova));
        assert_eq!(got, oracle.translate(DmaAddr(iova)), "page {i}, {attrs:?}");
        assert_eq!(
            got.map(|(p, a, _)| (p, a)),
            Some((PhysAddr(pa), fmt.canonical(attrs))),
            "page {i}, {attrs:?}"
        );
    }
    // Every earlier page kept its own attributes.
    for (i, &attrs) in all.iter().enumerate() {
        let iova = 0x4000_0000 + i as u64 * K4;
        assert_eq!(
            t.translate(DmaAddr(iova)).map(|(_, a, _)| a),
            Some(fmt.canonical(attrs)),
            "page {i} again"
        );
    }
}

#[test]
fn per_page_maps_with_changing_attributes_write_each_pages_own() {
    per_page_maps_with_changing_attributes(ArmStage1);
    per_page_maps_with_changing_attributes(ArmStage2);
    per_page_maps_with_changing_attributes(VtdSecondLevel::default());
    per_page_maps_with_changing_attributes(bare_iommu::vtd::VtdFirstLevel {
        fl1gp: true,
        haw: 48,
    });
}
