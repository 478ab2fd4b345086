//! The two-step API's contract: every bad argument is a typed error that
//! changes nothing, and the state knows what it linked.

mod common;

use bare_iommu::pgtable::arm::ArmStage1;
use bare_iommu::testing::{Call, RecordingBackend};
use bare_iommu::{
    DmaAddr, DmaDirection, DmaError, DmaKind, DmaPath, Domain, DomainConfig, IovaState, MapAttrs,
    PhysAddr, PteFormat,
};
use common::HostMemory;

const MB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn cfg(id: u16) -> DomainConfig {
    DomainConfig {
        id,
        levels: 4,
        aperture_start: MB,
        aperture_end: 1 << 32,
        coherent_walk: true,
    }
}

fn domain(mem: &HostMemory) -> Domain<ArmStage1, &HostMemory> {
    Domain::new(ArmStage1, mem, cfg(1)).unwrap()
}

fn tx(d: &mut Domain<ArmStage1, &HostMemory>, size: u64) -> IovaState {
    d.try_alloc(size, u64::MAX).unwrap().into_iova().unwrap()
}

const RW: DmaDirection = DmaDirection::Bidirectional;

/// Whether the backend's log holds a walk-cache (not leaf-only)
/// invalidation of domain 1 covering `addr`.
fn walk_cache_invalidated(be: &RecordingBackend, addr: u64) -> bool {
    be.log.iter().any(|c| {
        matches!(
            *c,
            Call::Invalidate { domain: 1, iova, len, leaf_only: false }
                if iova.0 <= addr && addr < iova.0 + len
        )
    })
}

#[test]
fn state_fits_in_32_bytes() {
    assert!(
        std::mem::size_of::<IovaState>() <= 32,
        "{}",
        std::mem::size_of::<IovaState>()
    );
}

#[test]
fn link_of_non_contiguous_pages_translates_each_page() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 3 * 4096);
    assert_eq!(t.size(), 4 * 4096);
    let pages = [0x8000_3000u64, 0x8100_0000, 0x8000_1000];
    for (i, p) in pages.iter().enumerate() {
        let a = d
            .link(
                &mut t,
                PhysAddr(*p),
                i as u64 * 4096,
                4096,
                RW,
                MapAttrs::empty(),
            )
            .unwrap();
        assert_eq!(a, DmaAddr(t.iova().0 + i as u64 * 4096));
    }
    d.sync(&mut be).unwrap();
    assert_eq!(t.linked(), 3 * 4096);
    assert_eq!(t.kind(), Some(DmaKind::Translated));
    for (i, p) in pages.iter().enumerate() {
        let (pa, attrs) = d
            .translate(DmaAddr(t.iova().0 + i as u64 * 4096 + 0x123))
            .unwrap();
        assert_eq!(pa, PhysAddr(p + 0x123));
        assert!(attrs.contains(MapAttrs::READ | MapAttrs::WRITE));
    }
    assert_eq!(d.translate(DmaAddr(t.iova().0 + 3 * 4096)), None);
    // Linking does not invalidate on a backend without caching mode, and
    // with nothing to invalidate the sync waits for nothing: it publishes.
    assert_eq!((be.syncs, be.publishes), (0, 1));
    assert_eq!(be.invalidations, 0);
    d.destroy(t, &mut be).unwrap();
}

#[test]
fn zero_length_is_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    assert_eq!(d.try_alloc(0, u64::MAX), Err(DmaError::ZeroLength));
    let mut t = tx(&mut d, 8192);
    assert_eq!(
        d.link(&mut t, PhysAddr(0x1000), 0, 0, RW, MapAttrs::empty()),
        Err(DmaError::ZeroLength)
    );
    assert_eq!(d.unlink(&mut t, 0, 0), Err(DmaError::ZeroLength));
}

#[test]
fn unaligned_phys_offset_and_length_are_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 4 * 4096);
    let e = |v| Err(DmaError::Unaligned { value: v });
    assert_eq!(
        d.link(&mut t, PhysAddr(0x1234), 0, 4096, RW, MapAttrs::empty()),
        e(0x1234)
    );
    assert_eq!(
        d.link(&mut t, PhysAddr(0x1000), 0x10, 4096, RW, MapAttrs::empty()),
        e(0x10)
    );
    assert_eq!(
        d.link(&mut t, PhysAddr(0x1000), 0, 100, RW, MapAttrs::empty()),
        e(100)
    );
    assert_eq!(
        d.unlink(&mut t, 0x800, 4096),
        Err(DmaError::Unaligned { value: 0x800 })
    );
    assert_eq!(t.linked(), 0);
}

#[test]
fn arithmetic_overflow_is_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 4 * 4096);
    let big = !0xfffu64;
    assert_eq!(
        d.link(&mut t, PhysAddr(0x1000), big, 4096, RW, MapAttrs::empty()),
        Err(DmaError::Overflow { a: big, b: 4096 })
    );
    assert_eq!(
        d.link(&mut t, PhysAddr(big), 0, 4096, RW, MapAttrs::empty()),
        Err(DmaError::Overflow { a: big, b: 4096 })
    );
    assert_eq!(
        d.try_alloc(u64::MAX, u64::MAX).err(),
        Some(DmaError::Overflow {
            a: u64::MAX,
            b: 4096
        })
    );
}

#[test]
fn link_and_unlink_outside_the_transaction_are_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 2 * 4096);
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x1000),
            4096,
            2 * 4096,
            RW,
            MapAttrs::empty()
        ),
        Err(DmaError::OutsideTransaction {
            offset: 4096,
            len: 8192,
            size: 8192
        })
    );
    assert_eq!(
        d.unlink(&mut t, 8192, 4096),
        Err(DmaError::OutsideTransaction {
            offset: 8192,
            len: 4096,
            size: 8192
        })
    );
    // Nothing of the refused link is mapped.
    assert_eq!(d.translate(DmaAddr(t.iova().0 + 4096)), None);
}

#[test]
fn link_over_a_linked_range_changes_nothing() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 4 * 4096);
    d.link(
        &mut t,
        PhysAddr(0x10_2000),
        4096,
        4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    let before = mem.live_pages();
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x20_0000),
            0,
            3 * 4096,
            RW,
            MapAttrs::empty()
        ),
        Err(DmaError::AlreadyLinked {
            iova: DmaAddr(t.iova().0 + 4096)
        })
    );
    assert_eq!(
        d.translate(t.iova()),
        None,
        "the page before the conflict must not stay mapped"
    );
    assert_eq!(
        d.translate(DmaAddr(t.iova().0 + 4096)).unwrap().0,
        PhysAddr(0x10_2000)
    );
    assert_eq!(t.linked(), 4096);
    assert_eq!(mem.live_pages(), before);
}

#[test]
fn unlink_of_a_never_linked_range_and_double_unlink_are_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 4 * 4096);
    d.link(
        &mut t,
        PhysAddr(0x10_0000),
        0,
        2 * 4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    assert_eq!(
        d.unlink(&mut t, 4096, 2 * 4096),
        Err(DmaError::NotLinked {
            iova: DmaAddr(t.iova().0 + 8192)
        })
    );
    assert_eq!(t.linked(), 8192, "a refused unlink unlinks nothing");
    assert_eq!(d.unlink(&mut t, 0, 4096), Ok(4096));
    assert_eq!(
        d.unlink(&mut t, 0, 4096),
        Err(DmaError::NotLinked { iova: t.iova() })
    );
    assert_eq!(t.linked(), 4096);
}

#[test]
fn allocator_exhaustion_and_dma_mask_are_errors() {
    let mem = HostMemory::new();
    let mut d = Domain::new(
        ArmStage1,
        &mem,
        DomainConfig {
            id: 3,
            levels: 3,
            aperture_start: 0x10_0000,
            aperture_end: 0x20_0000,
            coherent_walk: true,
        },
    )
    .unwrap();
    assert_eq!(
        d.try_alloc(0x20_0000, u64::MAX),
        Err(DmaError::IovaExhausted { size: 0x20_0000 })
    );
    assert_eq!(
        d.try_alloc(0x1000, 0xf_ffff),
        Err(DmaError::AboveDmaMask {
            size: 0x1000,
            mask: 0xf_ffff
        })
    );
    let a = d
        .try_alloc(0x10_0000, u64::MAX)
        .unwrap()
        .into_iova()
        .unwrap();
    assert_eq!(
        d.try_alloc(0x1000, u64::MAX),
        Err(DmaError::IovaExhausted { size: 0x1000 })
    );
    d.free(a).unwrap();
    assert!(d.try_alloc(0x1000, u64::MAX).is_ok());
}

#[test]
fn lender_refusal_leaves_no_partial_mapping() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 4 << 20);
    let before = mem.live_pages();
    // The 4 MiB range at an unaligned physical address needs level-1, level-2
    // and two level-3 tables; allow only two pages.
    mem.set_budget(Some(2));
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x4000_1000),
            0,
            4 << 20,
            RW,
            MapAttrs::empty()
        ),
        Err(DmaError::OutOfMemory)
    );
    // The tables written before the refusal were reachable for a moment:
    // they go back to the lender only after the sync invalidates them.
    assert!(mem.live_pages() > before);
    assert!(d.has_pending());
    d.sync(&mut RecordingBackend::new()).unwrap();
    // The root's child stays (`IoPageTable::kept_height`).
    assert_eq!(
        mem.live_pages(),
        before + 1,
        "tables written before the refusal are given back after the sync"
    );
    assert_eq!(t.linked(), 0);
    for off in (0..4 << 20).step_by(4096) {
        assert_eq!(d.translate(DmaAddr(t.iova().0 + off)), None);
    }
    mem.set_budget(None);
    d.link(
        &mut t,
        PhysAddr(0x4000_1000),
        0,
        4 << 20,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
}

#[test]
fn wrong_domain_is_refused_and_returns_the_state() {
    let mem = HostMemory::new();
    let mut a = domain(&mem);
    let mut b = Domain::new(ArmStage1, &mem, cfg(2)).unwrap();
    let mut t = tx(&mut a, 4096);
    assert_eq!(
        b.link(&mut t, PhysAddr(0x1000), 0, 4096, RW, MapAttrs::empty()),
        Err(DmaError::WrongDomain {
            expected: 1,
            found: 2
        })
    );
    let (t, e) = b.free(t).unwrap_err();
    assert_eq!(
        e,
        DmaError::WrongDomain {
            expected: 1,
            found: 2
        }
    );
    a.free(t).unwrap();
}

#[test]
fn free_unlinks_what_is_still_linked_and_the_next_sync_invalidates_it() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let base_pages = mem.live_pages();
    let mut t = tx(&mut d, 8 * 4096);
    let iova = t.iova().0;
    d.link(
        &mut t,
        PhysAddr(0x9000_0000),
        0,
        4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.link(
        &mut t,
        PhysAddr(0x9100_0000),
        5 * 4096,
        2 * 4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    d.destroy(t, &mut be).unwrap();
    assert_eq!(d.translate(DmaAddr(iova)), None);
    assert_eq!(d.translate(DmaAddr(iova + 5 * 4096)), None);
    assert!(be.covered_since_last_sync(1, iova, 8 * 4096));
    // The links' sync published; the destroy's waited once.
    assert_eq!((be.publishes, be.syncs), (1, 1));
    // All but the root's child (kept: `IoPageTable::kept_height`).
    assert_eq!(
        mem.live_pages(),
        base_pages + 1,
        "emptied tables are given back after the sync"
    );
}

#[test]
fn freed_tables_wait_for_the_sync() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let base = mem.live_pages();
    let mut t = tx(&mut d, 4096);
    d.link(&mut t, PhysAddr(0x1000), 0, 4096, RW, MapAttrs::empty())
        .unwrap();
    d.sync(&mut be).unwrap();
    // Three tables (their counts live in the pointers to them).
    assert_eq!(mem.live_pages(), base + 3);
    d.unlink(&mut t, 0, 4096).unwrap();
    assert_eq!(
        mem.live_pages(),
        base + 3,
        "tables are not freed before the IOMMU forgot them"
    );
    be.fail_next_sync = Some(bare_iommu::BackendError::Timeout {
        what: "test",
        polls: 1,
    });
    assert!(d.sync(&mut be).is_err());
    assert_eq!(mem.live_pages(), base + 3, "a failed sync frees nothing");
    d.sync(&mut be).unwrap();
    // The leaf and level-2 tables went back; the root's child stays
    // (`IoPageTable::kept_height`).
    assert_eq!(mem.live_pages(), base + 1);
    // The invalidation of the unlink was re-issued by the retry, walk caches included.
    assert!(be.log.iter().any(|c| matches!(
        c,
        Call::Invalidate {
            leaf_only: false,
            ..
        }
    )));
    d.free(t).unwrap();
}

#[test]
fn caching_mode_invalidates_newly_linked_ranges() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend {
        caching_mode: true,
        ..RecordingBackend::new()
    };
    let mut t = tx(&mut d, 4 * 4096);
    d.link(
        &mut t,
        PhysAddr(0x5000),
        4096,
        2 * 4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    assert!(be.covered_since_last_sync(1, t.iova().0 + 4096, 2 * 4096));
    d.free(t).unwrap();
}

#[test]
fn identity_domain_hands_out_the_direct_path() {
    let mut d: Domain<ArmStage1, &HostMemory> = Domain::identity(0);
    let DmaPath::Direct(mut s) = d.try_alloc(8192, 0xffff_ffff).unwrap() else {
        panic!("identity domain must give the direct path");
    };
    assert_eq!(
        s.link(PhysAddr(0x8000_0000), 4096),
        Ok(DmaAddr(0x8000_0000))
    );
    assert_eq!(
        s.link(PhysAddr(0x1_0000_0000), 4096),
        Err(DmaError::AboveDmaMask {
            size: 4096,
            mask: 0xffff_ffff
        })
    );
    assert_eq!(s.kind(), DmaKind::Direct);
    s.unlink(4096).unwrap();
    assert!(s.unlink(4096).is_err());
}

#[test]
fn mixing_p2p_mmio_with_host_memory_is_refused() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut t = tx(&mut d, 4 * 4096);
    d.link(&mut t, PhysAddr(0x1000), 0, 4096, RW, MapAttrs::empty())
        .unwrap();
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x1000_0000),
            4096,
            4096,
            RW,
            MapAttrs::MMIO
        ),
        Err(DmaError::MixedP2p)
    );
    d.unlink(&mut t, 0, 4096).unwrap();
    d.link(
        &mut t,
        PhysAddr(0x1000_0000),
        4096,
        4096,
        RW,
        MapAttrs::MMIO,
    )
    .unwrap();
    assert_eq!(t.kind(), Some(DmaKind::P2pThruHostBridge));
    assert!(
        d.translate(DmaAddr(t.iova().0 + 4096))
            .unwrap()
            .1
            .contains(MapAttrs::MMIO)
    );
}

#[test]
fn one_step_map_and_unmap_use_the_same_path() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let m = d
        .map(
            &mut be,
            PhysAddr(0x7000),
            4096,
            DmaDirection::ToDevice,
            MapAttrs::empty(),
            u64::MAX,
        )
        .unwrap();
    let (pa, attrs) = d.translate(m.addr()).unwrap();
    assert_eq!(pa, PhysAddr(0x7000));
    assert!(
        !attrs.contains(MapAttrs::WRITE),
        "to-device mappings are read-only for the device"
    );
    assert_eq!(m.kind(), Some(DmaKind::Translated));
    let a = m.addr();
    d.unmap(&mut be, m).unwrap();
    assert_eq!(d.translate(a), None);
    // One-step map: no completion wait (nothing to invalidate); unmap: one.
    assert_eq!((be.publishes, be.syncs), (1, 1));
}

#[test]
fn many_scattered_unlinks_fall_back_to_one_domain_invalidation() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 64 * 4096);
    d.link(
        &mut t,
        PhysAddr(0x100_0000),
        0,
        64 * 4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    // 20 holes, none adjacent: more ranges than the domain batches one by one.
    for i in 0..20 {
        d.unlink(&mut t, i * 3 * 4096, 4096).unwrap();
    }
    d.sync(&mut be).unwrap();
    assert_eq!(be.domain_invalidations, 1);
    assert_eq!(be.invalidations, 0);
    assert!(be.covered_since_last_sync(1, t.iova().0, 64 * 4096));
    // Adjacent unlinks merge into one range invalidation.
    d.unlink(&mut t, 61 * 4096, 4096).unwrap();
    d.unlink(&mut t, 62 * 4096, 4096).unwrap();
    d.sync(&mut be).unwrap();
    assert_eq!(be.invalidations, 1);
    assert!(be.covered_since_last_sync(1, t.iova().0 + 61 * 4096, 2 * 4096));
    d.destroy(t, &mut be).unwrap();
}

#[test]
fn empty_tables_kept_when_retirement_is_full_are_not_leaked_by_a_later_block() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let base = mem.live_pages();
    let mut t = tx(&mut d, 256 << 20);
    // One page in each of 80 separate 2 MiB regions; unlink all without a sync,
    // so more tables empty out than can wait for the sync.
    for r in 0..80u64 {
        d.link(
            &mut t,
            PhysAddr(0x4000_0000 + r * 4096),
            r << 21,
            4096,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    for r in 0..80u64 {
        d.unlink(&mut t, r << 21, 4096).unwrap();
    }
    // A 2 MiB block where an emptied table may still be attached.
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        79 << 21,
        2 << 20,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    assert_eq!(
        d.translate(DmaAddr(t.iova().0 + (79 << 21) + 0x1234))
            .unwrap()
            .0,
        PhysAddr(0x8000_1234)
    );
    d.unlink(&mut t, 79 << 21, 2 << 20).unwrap();
    d.sync(&mut be).unwrap();
    d.free(t).unwrap();
    d.sync(&mut be).unwrap();
    d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    assert_eq!(
        mem.live_pages(),
        base - 1,
        "every table page is given back (the root with the domain)"
    );
}

#[test]
fn a_scatter_list_links_in_one_call_all_or_nothing() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 1024 * 4096);
    // 600 pages: crosses a 2 MiB boundary, physical pages in reverse order.
    let pages: Vec<PhysAddr> = (0..600u64)
        .map(|i| PhysAddr(0x9000_0000 - i * 4096))
        .collect();
    let a = d
        .link_pages(&mut t, &pages, 8 * 4096, RW, MapAttrs::empty())
        .unwrap();
    assert_eq!(a, DmaAddr(t.iova().0 + 8 * 4096));
    assert_eq!(t.linked(), 600 * 4096);
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(
            d.translate(DmaAddr(a.0 + i as u64 * 4096 + 7)).unwrap().0,
            PhysAddr(p.0 + 7)
        );
    }
    d.sync(&mut be).unwrap();
    // Refusals change nothing: an unaligned page, an overlap, table memory running out.
    let before = mem.live_pages();
    let bad = [PhysAddr(0x1000), PhysAddr(0x2001)];
    assert_eq!(
        d.link_pages(&mut t, &bad, 0, RW, MapAttrs::empty()),
        Err(DmaError::Unaligned { value: 0x2001 })
    );
    let two = [PhysAddr(0x1000), PhysAddr(0x2000)];
    assert_eq!(
        d.link_pages(&mut t, &two, 7 * 4096, RW, MapAttrs::empty()),
        Err(DmaError::AlreadyLinked {
            iova: DmaAddr(t.iova().0 + 8 * 4096)
        })
    );
    assert_eq!(d.translate(DmaAddr(t.iova().0 + 7 * 4096)), None);
    let far = [PhysAddr(0x1000); 3];
    let mut t2 = d.try_alloc(2 << 30, u64::MAX).unwrap().into_iova().unwrap();
    mem.set_budget(Some(1));
    assert_eq!(
        d.link_pages(&mut t2, &far, (1 << 30) - 4096, RW, MapAttrs::empty()),
        Err(DmaError::OutOfMemory)
    );
    mem.set_budget(None);
    d.sync(&mut be).unwrap();
    assert_eq!(mem.live_pages(), before);
    assert_eq!(t.linked(), 600 * 4096);
    assert_eq!(t2.linked(), 0);
    d.free(t2).unwrap();
    d.destroy(t, &mut be).unwrap();
}

/// Issue 11 §2: the per-page paths (taken once a page was linked with the
/// same attributes and its leaf table is cached) keep every typed refusal
/// of the checked path, and a refusal changes nothing.
#[test]
fn per_page_calls_after_a_warm_link_keep_every_refusal() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut other = Domain::new(ArmStage1, &mem, cfg(2)).unwrap();
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 4 * PAGE);
    let none = MapAttrs::empty();
    // Warm: the attributes' bits and the leaf table are cached now.
    d.link(&mut t, PhysAddr(0x10_0000), 0, PAGE, RW, none)
        .unwrap();
    let linked = t.linked();
    type Want = fn(&DmaError) -> bool;
    let cases: [(PhysAddr, u64, Want); 4] = [
        // The same page again.
        (PhysAddr(0x20_0000), 0, |e| {
            matches!(e, DmaError::AlreadyLinked { .. })
        }),
        // An unaligned offset, an offset past the end, an unaligned page.
        (PhysAddr(0x20_0000), PAGE + 8, |e| {
            matches!(e, DmaError::Unaligned { .. })
        }),
        (PhysAddr(0x20_0000), 4 * PAGE, |e| {
            matches!(e, DmaError::OutsideTransaction { .. })
        }),
        (PhysAddr(0x20_0008), PAGE, |e| {
            matches!(e, DmaError::Unaligned { .. })
        }),
    ];
    for (pa, off, want) in cases {
        let e = d.link(&mut t, pa, off, PAGE, RW, none).unwrap_err();
        assert!(want(&e), "link {pa:?} at {off:#x}: {e:?}");
        assert_eq!(t.linked(), linked, "a refused link changed the state");
    }
    // A page past the output size: refused with a typed error.
    let e = d
        .link(&mut t, PhysAddr(1 << 60), PAGE, PAGE, RW, none)
        .unwrap_err();
    assert!(matches!(e, DmaError::PhysTooLarge { .. }), "{e:?}");
    // Another domain's transaction, through the warm domain: refused.
    let mut t2 = tx(&mut other, PAGE);
    let e = d
        .link(&mut t2, PhysAddr(0x20_0000), 0, PAGE, RW, none)
        .unwrap_err();
    assert!(matches!(e, DmaError::WrongDomain { .. }), "{e:?}");
    let e = d.unlink(&mut t2, 0, PAGE).unwrap_err();
    assert!(matches!(e, DmaError::WrongDomain { .. }), "{e:?}");
    // P2P through the host bridge into a host-memory transaction: mixed.
    let e = d
        .link(&mut t, PhysAddr(0x20_0000), PAGE, PAGE, RW, MapAttrs::MMIO)
        .unwrap_err();
    assert!(matches!(e, DmaError::MixedP2p), "{e:?}");
    assert_eq!(t.linked(), linked);
    assert_eq!(
        d.translate(DmaAddr(t.iova().0 + PAGE)),
        None,
        "nothing linked by a refusal"
    );
    // Unlink: once, then a double unlink and a page never linked.
    assert_eq!(d.unlink(&mut t, 0, PAGE), Ok(PAGE));
    let e = d.unlink(&mut t, 0, PAGE).unwrap_err();
    assert!(matches!(e, DmaError::NotLinked { .. }), "{e:?}");
    let e = d.unlink(&mut t, 2 * PAGE, PAGE).unwrap_err();
    assert!(matches!(e, DmaError::NotLinked { .. }), "{e:?}");
    let e = d.unlink(&mut t, 8, PAGE).unwrap_err();
    assert!(matches!(e, DmaError::Unaligned { .. }), "{e:?}");
    assert_eq!(t.linked(), 0);
    d.destroy(t, &mut be).unwrap();
    other.free(t2).unwrap();
}

/// Issue 11 §2: the per-page paths test the offset with one mask built from
/// the state's size bits; a fixed-IOVA transaction (any size, not a power of
/// two) lets only its first page through that test, and every page past its
/// exact end is refused, on link and unlink, after a warm link.
/// The per-page paths keep the last leaf table they used (and pointers
/// into it): once an unlink empties that table and it goes back to the
/// lender, the next per-page link or unlink in the same 2 MiB must reach the
/// new table the IOMMU walks, never the old page.
#[test]
fn per_page_calls_after_their_leaf_table_went_back_reach_the_new_table() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 4 * PAGE);
    let none = MapAttrs::empty();
    for round in 0..3u64 {
        let pa = PhysAddr(0x4000_0000 + round * 0x10_0000);
        d.link(&mut t, pa, PAGE, PAGE, RW, none).unwrap();
        assert_eq!(
            d.translate(DmaAddr(t.iova().0 + PAGE + 5)).map(|(p, _)| p),
            Some(PhysAddr(pa.0 + 5)),
            "round {round}: the link is in the table the IOMMU walks"
        );
        assert_eq!(d.unlink(&mut t, PAGE, PAGE), Ok(PAGE));
        assert_eq!(d.translate(DmaAddr(t.iova().0 + PAGE)), None);
        // The emptied leaf table is handed back at the sync.
        d.sync(&mut be).unwrap();
        let e = d.unlink(&mut t, PAGE, PAGE).unwrap_err();
        assert!(matches!(e, DmaError::NotLinked { .. }), "{e:?}");
    }
    assert_eq!(d.page_table().unwrap().check_counts(), Ok(()));
    d.free(t).unwrap();
    d.sync(&mut be).unwrap();
}

#[test]
fn per_page_calls_in_a_fixed_transaction_stay_inside_its_exact_size() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let base = 0x4000_0000;
    let mut t = d.try_alloc_at(DmaAddr(base), 3 * PAGE).unwrap();
    assert_eq!(t.size(), 3 * PAGE);
    for i in 0..3 {
        let a = d
            .link(
                &mut t,
                PhysAddr(0x10_0000 + i * PAGE),
                i * PAGE,
                PAGE,
                RW,
                MapAttrs::empty(),
            )
            .unwrap();
        assert_eq!(a, DmaAddr(base + i * PAGE));
    }
    // Past the exact end (3 pages), and past the next power of two.
    for off in [3 * PAGE, 4 * PAGE, 8 * PAGE] {
        let e = d
            .link(
                &mut t,
                PhysAddr(0x20_0000),
                off,
                PAGE,
                RW,
                MapAttrs::empty(),
            )
            .unwrap_err();
        assert!(
            matches!(e, DmaError::OutsideTransaction { .. }),
            "link at {off:#x}: {e:?}"
        );
        assert_eq!(
            d.translate(DmaAddr(base + off)),
            None,
            "linked outside at {off:#x}"
        );
        let e = d.unlink(&mut t, off, PAGE).unwrap_err();
        assert!(
            matches!(e, DmaError::OutsideTransaction { .. }),
            "unlink at {off:#x}: {e:?}"
        );
    }
    assert_eq!(t.linked(), 3 * PAGE);
    for i in [0, 2, 1] {
        assert_eq!(d.unlink(&mut t, i * PAGE, PAGE), Ok(PAGE));
    }
    assert!(matches!(
        d.unlink(&mut t, 0, PAGE),
        Err(DmaError::NotLinked { .. })
    ));
    assert_eq!((t.linked(), t.kind()), (0, None));
    d.destroy(t, &mut be).unwrap();
}

/// Issue 11 §2: per-page unlinks in any order (runs, steps back, jumps,
/// more separate ranges than the pending list holds) are all invalidated
/// by the next sync.
#[test]
fn per_page_unlinks_in_any_order_are_all_invalidated_at_the_sync() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 128 * PAGE);
    for i in 0..128 {
        d.link(
            &mut t,
            PhysAddr(0x100_0000 + i * PAGE),
            i * PAGE,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    d.sync(&mut be).unwrap();
    let orders: [&[u64]; 2] = [
        // Runs, a step back that touches the last range, jumps.
        &[10, 11, 12, 5, 6, 20, 19, 18, 30, 0, 1, 2, 13, 9],
        // More separate ranges than the list holds (every other page).
        &[
            40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 64, 66, 68, 70, 72, 74, 76, 78,
        ],
    ];
    for order in orders {
        for &i in order {
            assert_eq!(d.unlink(&mut t, i * PAGE, PAGE), Ok(PAGE));
        }
        d.sync(&mut be).unwrap();
        for &i in order {
            assert!(
                be.covered_since_last_sync(1, t.iova().0 + i * PAGE, PAGE),
                "page {i} unlinked but not invalidated: {:?}",
                be.log
            );
        }
    }
    d.destroy(t, &mut be).unwrap();
}

/// Issue 11 §2: a per-page link (warm path) whose table walk runs out of
/// table memory takes back what it attached and has it invalidated, walk
/// caches included, before the tables go back to the lender.
#[test]
fn per_page_link_out_of_table_memory_invalidates_what_it_took_back() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 2 << 30);
    d.link(&mut t, PhysAddr(0x10_0000), 0, PAGE, RW, MapAttrs::empty())
        .unwrap();
    d.sync(&mut be).unwrap();
    let before = mem.live_pages();
    // A page in the next 1 GiB: a level-2 table is attached, then the leaf
    // table is refused.
    mem.set_budget(Some(1));
    let far = t.iova().0 + (1 << 30);
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x20_0000),
            1 << 30,
            PAGE,
            RW,
            MapAttrs::empty()
        ),
        Err(DmaError::OutOfMemory)
    );
    mem.set_budget(None);
    assert_eq!(t.linked(), PAGE);
    assert_eq!(d.translate(DmaAddr(far)), None);
    assert!(d.has_pending(), "the taken-back table waits for a sync");
    d.sync(&mut be).unwrap();
    assert!(
        walk_cache_invalidated(&be, far),
        "no walk-cache invalidation of the taken-back table: {:?}",
        be.log
    );
    assert_eq!(
        mem.live_pages(),
        before,
        "the taken-back pages are given back after the sync"
    );
    d.destroy(t, &mut be).unwrap();
}

/// Issue 11 §2: the per-page link decides with one masked compare of the
/// state's owner word; that compare refuses a transaction already holding
/// device memory (host-bridge P2P) even when the table's own one-page path
/// would take the page (same attributes as the last link, leaf table
/// cached): mixed kinds are refused and nothing is linked.
#[test]
fn per_page_host_link_into_a_device_memory_transaction_is_mixed() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    let mut host = tx(&mut d, 4 * PAGE);
    let mut dev = tx(&mut d, 4 * PAGE);
    d.link(&mut dev, PhysAddr(0x9000_0000), 0, PAGE, RW, MapAttrs::MMIO)
        .unwrap();
    assert_eq!(dev.kind(), Some(DmaKind::P2pThruHostBridge));
    for i in 0..3 {
        // Warm the one-page path with host attributes (in the same leaf
        // table), then try a host page in the device-memory transaction.
        d.link(
            &mut host,
            PhysAddr(0x10_0000 + i * PAGE),
            i * PAGE,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
        let off = (i + 1) * PAGE;
        assert_eq!(
            d.link(
                &mut dev,
                PhysAddr(0x20_0000),
                off,
                PAGE,
                RW,
                MapAttrs::empty()
            ),
            Err(DmaError::MixedP2p)
        );
        assert_eq!(d.translate(DmaAddr(dev.iova().0 + off)), None);
    }
    assert_eq!(
        (dev.linked(), dev.kind()),
        (PAGE, Some(DmaKind::P2pThruHostBridge))
    );
    // Unlinking the device page is a per-page unlink like any other.
    assert_eq!(d.unlink(&mut dev, 0, PAGE), Ok(PAGE));
    assert_eq!((dev.linked(), dev.kind(), dev.direction()), (0, None, None));
    d.destroy(dev, &mut be).unwrap();
    d.destroy(host, &mut be).unwrap();
}

/// A whole 2 MiB block unlinked in one call (the block path of `unlink`)
/// keeps every refusal of the checked path and invalidates the block.
#[test]
fn a_whole_block_unlink_invalidates_it_and_keeps_every_refusal() {
    const MB2: u64 = 2 * MB;
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut other = Domain::new(ArmStage1, &mem, cfg(2)).unwrap();
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 2 * MB2);
    assert_eq!(t.iova().0 % MB2, 0, "a 4 MiB transaction is 2 MiB aligned");
    let none = MapAttrs::empty();
    // A block at offset 2 MiB, pages at offset 0 (a block-sized range
    // that is not one block).
    d.link(&mut t, PhysAddr(0x4000_0000), MB2, MB2, RW, none)
        .unwrap();
    for i in 0..MB2 / PAGE {
        d.link(
            &mut t,
            PhysAddr(0x8000_0000 + 2 * i * PAGE),
            i * PAGE,
            PAGE,
            RW,
            none,
        )
        .unwrap();
    }
    d.sync(&mut be).unwrap();
    let mut foreign = tx(&mut other, 2 * MB2);
    // Another domain's transaction, past the end, a misaligned block:
    // refused, nothing changed.
    assert!(matches!(
        d.unlink(&mut foreign, MB2, MB2),
        Err(DmaError::WrongDomain { .. })
    ));
    assert!(matches!(
        d.unlink(&mut t, 2 * MB2, MB2),
        Err(DmaError::OutsideTransaction { .. })
    ));
    assert!(matches!(
        d.unlink(&mut t, MB2 + MB, MB2),
        Err(DmaError::OutsideTransaction { .. })
    ));
    assert_eq!(t.linked(), 2 * MB2);
    // The block: gone at once, its whole range invalidated at the sync.
    be.log.clear();
    assert_eq!(d.unlink(&mut t, MB2, MB2), Ok(MB2));
    assert_eq!(t.linked(), MB2);
    assert_eq!(d.translate(DmaAddr(t.iova().0 + MB2 + 5 * PAGE)), None);
    assert!(matches!(
        d.unlink(&mut t, MB2, MB2),
        Err(DmaError::NotLinked { .. })
    ));
    d.sync(&mut be).unwrap();
    let covered = be.log.iter().any(|c| {
        matches!(c, Call::Invalidate { domain: 1, iova, len, .. }
            if iova.0 <= t.iova().0 + MB2 && iova.0 + len >= t.iova().0 + 2 * MB2)
    });
    assert!(covered, "block not invalidated: {:?}", be.log);
    // The 512 pages of the other half, as one block-sized range.
    assert_eq!(d.unlink(&mut t, 0, MB2), Ok(MB2));
    assert_eq!(t.linked(), 0);
    assert_eq!(d.translate(DmaAddr(t.iova().0 + 7 * PAGE)), None);
    d.sync(&mut be).unwrap();
    d.free(t).unwrap();
    other.free(foreign).unwrap();
}

/// The leaf height `iova` translates at in `d` (0: a page, 1: 2 MiB, 2:
/// 1 GiB).
fn leaf_height(d: &Domain<ArmStage1, &HostMemory>, iova: u64) -> Option<u32> {
    d.page_table()
        .unwrap()
        .translate(DmaAddr(iova))
        .map(|(_, _, h)| h)
}

/// Issue 11: a whole 2 MiB / 1 GiB block of host memory takes a block path
/// (`IoPageTable::map_block_fast`). It writes one block, records the link as
/// any link does, and every refusal stays the checked path's typed error,
/// with nothing linked.
#[test]
fn a_whole_block_link_translates_as_one_block_and_keeps_every_refusal() {
    const GIB: u64 = 1 << 30;
    const MB2: u64 = 2 * MB;
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut other = Domain::new(ArmStage1, &mem, cfg(2)).unwrap();
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 2 * GIB);
    let base = t.iova().0;
    assert_eq!(base % (2 * GIB), 0);
    let none = MapAttrs::empty();
    let from = DmaDirection::FromDevice;
    let to = DmaDirection::ToDevice;
    // A 1 GiB block and a 2 MiB block, in two directions.
    assert_eq!(
        d.link(&mut t, PhysAddr(0x40_0000_0000), 0, GIB, from, none),
        Ok(DmaAddr(base))
    );
    assert_eq!(
        d.translate(DmaAddr(base + 0x1234_5000)),
        Some((PhysAddr(0x40_1234_5000), ArmStage1.canonical(from.attrs())))
    );
    assert_eq!(leaf_height(&d, base), Some(2));
    assert_eq!(
        (t.linked(), t.kind(), t.direction()),
        (GIB, Some(DmaKind::Translated), Some(from))
    );
    let at = GIB + MB2;
    assert_eq!(
        d.link(&mut t, PhysAddr(0x8000_0000), at, MB2, to, none),
        Ok(DmaAddr(base + at))
    );
    assert_eq!(
        d.translate(DmaAddr(base + at + 7 * PAGE)),
        Some((PhysAddr(0x8000_7000), ArmStage1.canonical(to.attrs())))
    );
    assert_eq!(leaf_height(&d, base + at), Some(1));
    assert_eq!(t.linked(), GIB + MB2);
    assert_eq!(t.direction(), Some(DmaDirection::Bidirectional));
    let linked = t.linked();
    // Linked already (the block itself; a block over a linked page).
    assert_eq!(
        d.link(&mut t, PhysAddr(0x40_0000_0000), 0, GIB, RW, none),
        Err(DmaError::AlreadyLinked {
            iova: DmaAddr(base)
        })
    );
    d.link(
        &mut t,
        PhysAddr(0x9000_0000),
        GIB + 5 * PAGE,
        PAGE,
        RW,
        none,
    )
    .unwrap();
    assert_eq!(
        d.link(&mut t, PhysAddr(0xa000_0000), GIB, MB2, RW, none),
        Err(DmaError::AlreadyLinked {
            iova: DmaAddr(base + GIB + 5 * PAGE)
        })
    );
    assert_eq!(d.translate(DmaAddr(base + GIB)), None);
    assert_eq!(d.unlink(&mut t, GIB + 5 * PAGE, PAGE), Ok(PAGE));
    // Another domain's transaction (whose IOVAs are free here), device
    // memory into a host-memory transaction, past the end, past the
    // output size: refused, nothing linked.
    let mut foreign = tx(&mut other, 2 * GIB);
    assert_eq!(foreign.iova().0, base);
    assert_eq!(
        d.link(&mut foreign, PhysAddr(0xa000_0000), GIB, MB2, RW, none),
        Err(DmaError::WrongDomain {
            expected: 2,
            found: 1
        })
    );
    assert_eq!(foreign.linked(), 0);
    assert_eq!(
        d.link(&mut t, PhysAddr(0xa000_0000), GIB, MB2, RW, MapAttrs::MMIO),
        Err(DmaError::MixedP2p)
    );
    assert!(matches!(
        d.link(&mut t, PhysAddr(0x4000_0000), 2 * GIB, GIB, RW, none),
        Err(DmaError::OutsideTransaction { .. })
    ));
    assert!(matches!(
        d.link(&mut t, PhysAddr(1 << 48), GIB, MB2, RW, none),
        Err(DmaError::PhysTooLarge { .. })
    ));
    assert_eq!(d.translate(DmaAddr(base + GIB)), None);
    assert_eq!(t.linked(), linked);
    // A host-memory block into a device-memory transaction: mixed.
    let mut dev = tx(&mut d, MB2);
    d.link(&mut dev, PhysAddr(0xb000_0000), 0, PAGE, RW, MapAttrs::MMIO)
        .unwrap();
    d.unlink(&mut dev, 0, PAGE).unwrap();
    d.link(&mut dev, PhysAddr(0xb000_0000), 0, MB2, RW, MapAttrs::MMIO)
        .unwrap();
    assert_eq!(leaf_height(&d, dev.iova().0), Some(1));
    assert_eq!(dev.kind(), Some(DmaKind::P2pThruHostBridge));
    d.unlink(&mut dev, 0, MB2).unwrap();
    d.link(&mut dev, PhysAddr(0xb000_0000), 0, PAGE, RW, MapAttrs::MMIO)
        .unwrap();
    assert_eq!(
        d.link(&mut t, PhysAddr(0xa000_0000), GIB, MB2, RW, none),
        Ok(DmaAddr(base + GIB))
    );
    d.unlink(&mut t, GIB, MB2).unwrap();
    // A physical start not aligned to the block: pages, not a block.
    d.link(&mut t, PhysAddr(0xa000_1000), GIB, MB2, RW, none)
        .unwrap();
    assert_eq!(leaf_height(&d, base + GIB), Some(0));
    assert_eq!(
        d.translate(DmaAddr(base + GIB + MB2 - PAGE))
            .map(|(pa, _)| pa),
        Some(PhysAddr(0xa000_1000 + MB2 - PAGE))
    );
    d.sync(&mut be).unwrap();
    d.destroy(t, &mut be).unwrap();
    d.destroy(dev, &mut be).unwrap();
    other.free(foreign).unwrap();
}

/// A block link on a backend that caches not-present entries (VT-d
/// caching mode) is invalidated at the sync, as any link is there.
#[test]
fn a_block_link_is_invalidated_when_the_backend_caches_not_present_entries() {
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    let mut be = RecordingBackend::new();
    be.caching_mode = true;
    let mut t = tx(&mut d, 1 << 30);
    let base = t.iova().0;
    d.link(
        &mut t,
        PhysAddr(0x4000_0000),
        0,
        1 << 30,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    assert!(
        be.log.iter().any(|c| matches!(
            *c,
            Call::Invalidate { domain: 1, iova, len, .. }
                if iova.0 <= base && base + (1 << 30) <= iova.0 + len
        )),
        "the block link was not invalidated: {:?}",
        be.log
    );
    d.destroy(t, &mut be).unwrap();
}

/// Under `TableReclaim::Keep` a block over tables kept empty fills them
/// (smaller blocks, pages where a leaf table is kept) instead of
/// overwriting the pointer to them, which would leak them and leave a
/// walk cache pointing at them; they all go back at the reclaim.
#[test]
fn a_block_link_over_tables_kept_empty_fills_them() {
    const GIB: u64 = 1 << 30;
    let mem = HostMemory::new();
    let mut d = domain(&mem);
    d.set_table_reclaim(bare_iommu::TableReclaim::Keep);
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, GIB);
    let base = t.iova().0;
    let before = mem.live_pages();
    d.link(
        &mut t,
        PhysAddr(0x10_0000),
        5 * MB,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.unlink(&mut t, 5 * MB, PAGE).unwrap();
    d.sync(&mut be).unwrap();
    let kept = mem.live_pages();
    assert!(kept > before, "the emptied tables are kept");
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x40_0000_0000),
            0,
            GIB,
            RW,
            MapAttrs::empty()
        ),
        Ok(DmaAddr(base))
    );
    assert_eq!(t.linked(), GIB);
    assert_eq!(mem.live_pages(), kept, "the kept tables were filled");
    assert_eq!(leaf_height(&d, base), Some(1));
    assert_eq!(leaf_height(&d, base + 5 * MB), Some(0));
    for off in [0, 5 * MB + 3 * PAGE, GIB - PAGE] {
        assert_eq!(
            d.translate(DmaAddr(base + off)).map(|(pa, _)| pa),
            Some(PhysAddr(0x40_0000_0000 + off))
        );
    }
    assert_eq!(d.unlink(&mut t, 0, GIB), Ok(GIB));
    assert_eq!(t.linked(), 0);
    d.sync(&mut be).unwrap();
    d.reclaim_empty_tables(&mut be).unwrap();
    assert_eq!(
        mem.live_pages(),
        before + 1,
        "every table but the root's kept child went back"
    );
    d.destroy(t, &mut be).unwrap();
}

/// A block link whose walk runs out of table memory is all or nothing:
/// the tables it attached are taken back, invalidated (walk caches too)
/// and handed back after the sync; the same link then succeeds.
#[test]
fn a_block_link_out_of_table_memory_takes_back_its_tables() {
    let mem = HostMemory::new();
    let five = DomainConfig {
        levels: 5,
        ..cfg(1)
    };
    let mut d = Domain::new(ArmStage1, &mem, five).unwrap();
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, 2 * MB);
    let base = t.iova().0;
    let before = mem.live_pages();
    // A level-3 table (the root's child, kept) and a level-2 table, then the
    // level-1 table is refused.
    mem.set_budget(Some(2));
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x4000_0000),
            0,
            2 * MB,
            RW,
            MapAttrs::empty()
        ),
        Err(DmaError::OutOfMemory)
    );
    mem.set_budget(None);
    assert_eq!(t.linked(), 0);
    assert_eq!(t.kind(), None);
    assert_eq!(d.translate(DmaAddr(base)), None);
    assert!(d.has_pending(), "the taken-back table waits for a sync");
    d.sync(&mut be).unwrap();
    assert!(
        walk_cache_invalidated(&be, base),
        "no walk-cache invalidation of the taken-back table: {:?}",
        be.log
    );
    assert_eq!(
        mem.live_pages(),
        before + 1,
        "only the kept level-3 table stays"
    );
    d.link(
        &mut t,
        PhysAddr(0x4000_0000),
        0,
        2 * MB,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    assert_eq!(
        d.page_table()
            .unwrap()
            .translate(DmaAddr(base + PAGE))
            .map(|(pa, _, h)| (pa, h)),
        Some((PhysAddr(0x4000_1000), 1))
    );
    d.destroy(t, &mut be).unwrap();
}
