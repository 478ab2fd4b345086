//! Issue 11 §3: every table's valid-entry count (kept so an unmap knows at
//! once whether a table became empty) equals a full scan of the table after
//! any sequence of maps, unmaps, refused maps rolled back for lack of
//! memory, refused partial-block unmaps, scatter lists, retire-list frees
//! and prunes, in every format; and every lent page is a table or retired
//! (the counts live in the table pointers' ignored bits: no page of their
//! own).

mod common;

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::vtd::VtdFirstLevel;
use bare_iommu::{DmaAddr, IoPageTable, MapAttrs, PhysAddr, PteFormat};
use common::HostMemory;
use proptest::prelude::*;

const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;
const RW: MapAttrs = MapAttrs::READ.union(MapAttrs::WRITE);
/// Output addresses are the IOVA plus this (so blocks appear exactly where
/// the IOVA range is block aligned).
const PA_OFF: u64 = 1 << 40;

#[derive(Clone, Debug)]
enum Op {
    Map {
        at: u64,
        len: u64,
    },
    MapPages {
        at: u64,
        n: u64,
    },
    Unmap {
        at: u64,
        len: u64,
    },
    UnmapPresent {
        at: u64,
        len: u64,
    },
    /// Lets the lender hand out this many more pages (then refuses).
    Budget(Option<u64>),
    FreeRetired,
}

/// An IOVA near the edges that matter: 1 GiB and 2 MiB boundaries.
fn addr() -> impl Strategy<Value = u64> {
    (
        0u64..3,
        prop_oneof![Just(0u64), 1u64..4, Just(510u64), Just(511u64)],
        prop_oneof![Just(0u64), 1u64..4, Just(511u64)],
    )
        .prop_map(|(g, m, p)| g * G1 + m * M2 + p * K4)
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => Just(K4),
        2 => (2u64..8).prop_map(|n| n * K4),
        2 => Just(M2),
        1 => Just(M2 + K4),
        1 => Just(G1),
        1 => Just(G1 + M2),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (addr(), len()).prop_map(|(at, len)| Op::Map { at, len }),
        1 => (addr(), 1u64..600).prop_map(|(at, n)| Op::MapPages { at, n }),
        4 => (addr(), len()).prop_map(|(at, len)| Op::Unmap { at, len }),
        2 => (addr(), len()).prop_map(|(at, len)| Op::UnmapPresent { at, len }),
        1 => prop_oneof![Just(None), (0u64..4).prop_map(Some)].prop_map(Op::Budget),
        1 => Just(Op::FreeRetired),
    ]
}

fn run<F: PteFormat>(fmt: F, levels: u8, ops: &[Op]) -> Result<(), TestCaseError> {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, levels, true).unwrap();
    for (k, op) in ops.iter().enumerate() {
        match *op {
            Op::Map { at, len } => {
                let _ = t.map(DmaAddr(at), PhysAddr(at + PA_OFF), len, RW);
            }
            Op::MapPages { at, n } => {
                // Every other physical page: no two contiguous.
                let pages: Vec<PhysAddr> = (0..n).map(|i| PhysAddr(PA_OFF + 2 * i * K4)).collect();
                let _ = t.map_pages(DmaAddr(at), &pages, RW);
            }
            Op::Unmap { at, len } => {
                let _ = t.unmap(DmaAddr(at), len);
            }
            Op::UnmapPresent { at, len } => {
                let _ = t.unmap_present(DmaAddr(at), len);
            }
            Op::Budget(b) => mem.set_budget(b.map(|b| b as usize)),
            Op::FreeRetired => t.free_retired(),
        }
        prop_assert_eq!(t.check_counts(), Ok(()), "after op {} {:?}", k, op);
        prop_assert_eq!(
            mem.live_pages(),
            t.table_pages() + t.retired_pages(),
            "after op {} {:?}: a lent page is neither attached nor retired",
            k,
            op
        );
    }
    mem.set_budget(None);
    t.unmap_present(DmaAddr(0), 8 * G1).unwrap();
    prop_assert_eq!(t.check_counts(), Ok(()));
    t.free_retired();
    // Every op stays below 8 GiB: one root entry. Its child table is kept
    // when the root cannot hold a block (`kept_height`); every other
    // emptied table is detached.
    let kept = usize::from(t.kept_height().is_some());
    prop_assert!(t.table_pages() <= 1 + kept, "every emptied table detached");
    prop_assert_eq!(
        mem.live_pages(),
        t.table_pages(),
        "the root and a kept table are left"
    );
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn counts_match_a_scan_stage1(ops in proptest::collection::vec(op(), 1..40)) {
        run(ArmStage1, 4, &ops)?;
    }

    #[test]
    fn counts_match_a_scan_stage2_three_levels(ops in proptest::collection::vec(op(), 1..40)) {
        run(ArmStage2, 3, &ops)?;
    }

    #[test]
    fn counts_match_a_scan_vtd_second_level(ops in proptest::collection::vec(op(), 1..40)) {
        run(VtdSecondLevel::default(), 4, &ops)?;
    }

    #[test]
    fn counts_match_a_scan_vtd_first_level(ops in proptest::collection::vec(op(), 1..40)) {
        run(VtdFirstLevel { fl1gp: true, haw: 48 }, 4, &ops)?;
    }
}

/// The counts are where the formats say (`PteFormat::COUNT_SHIFT`), in the
/// pointers the IOMMU walks: three pages and a 2 MiB block show as counts
/// 3 and 2 in the raw descriptors `descriptor_at` returns, and every bit
/// outside the count is the pointer `PteFormat::table` made.
fn counts_sit_in_the_pointers<F: PteFormat>(fmt: F) {
    let mem = HostMemory::new();
    let mut t = IoPageTable::new(fmt, &mem, 4, true).unwrap();
    let base = 5 * G1;
    for i in 0..3 {
        t.map(DmaAddr(base + i * K4), PhysAddr(PA_OFF + i * K4), K4, RW)
            .unwrap();
    }
    t.map(DmaAddr(base + M2), PhysAddr(PA_OFF + M2), M2, RW)
        .unwrap();
    let mask = F::COUNT_MASK;
    // Height 1: the pointer to the leaf table (3 pages). Height 2: the
    // pointer to the table holding it and the block (2 entries). Height 3,
    // the root's entry: the pointer to the level-2 table (1 entry).
    for (h, n) in [(1, 3u64), (2, 2), (3, 1)] {
        let d = t.descriptor_at(DmaAddr(base), h).unwrap();
        assert_eq!(
            (d & mask) >> F::COUNT_SHIFT,
            n,
            "{:?} height {h}: {d:#x}",
            F::KIND
        );
        let bare = d & !mask;
        let bare_table = match fmt.decode(d, h) {
            bare_iommu::pgtable::Pte::Table(pa) => fmt.table(pa),
            other => panic!("{:?} height {h}: {other:?}", F::KIND),
        };
        assert_eq!(bare, bare_table, "{:?} height {h}", F::KIND);
    }
    let page = t.descriptor_at(DmaAddr(base + K4), 0).unwrap();
    assert_eq!(page, fmt.leaf(PhysAddr(PA_OFF + K4), 0, RW));
    assert_eq!(t.descriptor_at(DmaAddr(base + 3 * K4), 0), Some(0));
    assert_eq!(
        t.descriptor_at(DmaAddr(base + M2), 0),
        None,
        "a block above"
    );
    assert_eq!(t.descriptor_at(DmaAddr(base), 4), None, "above the root");
    assert_eq!(t.descriptor_at(DmaAddr(1 << 48), 0), None, "outside");
    t.unmap(DmaAddr(base + M2), M2).unwrap();
    let d = t.descriptor_at(DmaAddr(base), 2).unwrap();
    assert_eq!((d & mask) >> F::COUNT_SHIFT, 1, "the block's unmap counted");
}

#[test]
fn counts_sit_in_the_pointers_in_every_format() {
    counts_sit_in_the_pointers(ArmStage1);
    counts_sit_in_the_pointers(ArmStage2);
    counts_sit_in_the_pointers(VtdSecondLevel::default());
    counts_sit_in_the_pointers(VtdFirstLevel {
        fl1gp: true,
        haw: 48,
    });
}
