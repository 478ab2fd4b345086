//! Arbitrary arguments never panic, and a refused call changes nothing.

mod common;

use bare_iommu::pgtable::arm::ArmStage2;
use bare_iommu::testing::RecordingBackend;
use bare_iommu::{DmaAddr, DmaDirection, Domain, DomainConfig, MapAttrs, PhysAddr};
use common::HostMemory;
use proptest::prelude::*;

fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u64..64).prop_map(|p| p * 4096),
        (0u64..64).prop_map(|p| p * 4096),
        (0u64..64).prop_map(|p| p * 4096 + 1),
        Just(u64::MAX),
        Just(u64::MAX - 4095),
        Just(1u64 << 48),
    ]
}

#[derive(Clone, Debug)]
enum Call {
    Link(u64, u64, u64, u8),
    Unlink(u64, u64),
    Sync,
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        (any_u64(), any_u64(), any_u64(), 0u8..8).prop_map(|(p, o, l, a)| Call::Link(p, o, l, a)),
        (any_u64(), any_u64()).prop_map(|(o, l)| Call::Unlink(o, l)),
        Just(Call::Sync),
    ]
}

/// 2,000 cases, or `PROPTEST_CASES` (Miri runs a handful).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_arguments_never_panic_and_refusals_change_nothing(
        size in prop_oneof![4 => 1u64..(1 << 22), 1 => any_u64()],
        mask in prop_oneof![4 => Just(u64::MAX), 2 => Just(0xffff_ffffu64), 1 => any_u64()],
        calls in proptest::collection::vec(call(), 1..20),
    ) {
        let mem = HostMemory::new();
        let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 0x1000, aperture_end: 1 << 40, coherent_walk: true };
        let mut d = Domain::new(ArmStage2, &mem, cfg).unwrap();
        let mut be = RecordingBackend::new();
        let Ok(path) = d.try_alloc(size, mask) else { return Ok(()) };
        let Some(mut tx) = path.into_iova() else { return Ok(()) };
        prop_assert!(tx.size() >= size && tx.iova().0 + tx.size() - 1 <= mask);
        // Snapshot of every page of a small transaction (large ones: the first 64 pages).
        let pages = (tx.size() / 4096).min(64);
        let snapshot = |d: &Domain<ArmStage2, &HostMemory>, base: u64| -> Vec<Option<(PhysAddr, MapAttrs)>> {
            (0..pages).map(|i| d.translate(DmaAddr(base + i * 4096))).collect()
        };
        for c in calls {
            let before = snapshot(&d, tx.iova().0);
            let linked = tx.linked();
            let tables = mem.live_pages();
            let refused = match c {
                Call::Link(p, o, l, a) => {
                    let attrs = MapAttrs::from_bits_truncate(u32::from(a) << 2);
                    d.link(&mut tx, PhysAddr(p), o, l, DmaDirection::Bidirectional, attrs).is_err()
                }
                Call::Unlink(o, l) => d.unlink(&mut tx, o, l).is_err(),
                Call::Sync => d.sync(&mut be).is_err(),
            };
            if refused {
                prop_assert_eq!(snapshot(&d, tx.iova().0), before);
                prop_assert_eq!(tx.linked(), linked);
                prop_assert_eq!(mem.live_pages(), tables);
            }
        }
        d.destroy(tx, &mut be).unwrap();
        // The root, the root's child the format keeps (`kept_height`; the
        // transaction lies under one root entry).
        let pt = d.page_table().unwrap();
        prop_assert!(pt.table_pages() <= 1 + usize::from(pt.kept_height().is_some()));
        prop_assert_eq!(mem.live_pages(), pt.table_pages());
    }
}
