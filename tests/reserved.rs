//! Reserved IOVA ranges, fixed-IOVA transactions and identity regions
//! (issue 12 item 3): every refusal is a typed error that changes nothing,
//! and no IOVA in a reserved or fixed range is ever handed out.

mod common;

use bare_iommu::error::BackendError;
use bare_iommu::firmware::ReservedRegion;
use bare_iommu::firmware::dmar::{Dmar, NoBridges};
use bare_iommu::iova::{FixedRange, FixedUse, MAX_FIXED};
use bare_iommu::pgtable::arm::ArmStage1;
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::testing::RecordingBackend;
use bare_iommu::vtd::VtdFirstLevel;
use bare_iommu::{
    AnyDomain, AnyFormat, DeviceId, DmaAddr, DmaDirection, DmaError, Domain, DomainConfig,
    IovaState, MapAttrs, PhysAddr, PteFormat, VTD_INTERRUPT_WINDOW,
};
use common::HostMemory;

const PAGE: u64 = 4096;
const MB: u64 = 1 << 20;
const RW: DmaDirection = DmaDirection::Bidirectional;
const WINDOW: (u64, u64) = (0xFEE0_0000, 0xFEF0_0000);

fn cfg(start: u64, end: u64) -> DomainConfig {
    DomainConfig {
        id: 3,
        levels: 4,
        aperture_start: start,
        aperture_end: end,
        coherent_walk: true,
    }
}

fn arm(mem: &HostMemory, start: u64, end: u64) -> Domain<ArmStage1, &HostMemory> {
    Domain::new(ArmStage1, mem, cfg(start, end)).unwrap()
}

fn alloc<F: PteFormat>(d: &mut Domain<F, &HostMemory>, size: u64) -> Result<IovaState, DmaError> {
    d.try_alloc(size, u64::MAX).map(|p| p.into_iova().unwrap())
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn range(t: &IovaState) -> (u64, u64) {
    (t.iova().0, t.iova().0 + t.size())
}

/// Allocates `size`-byte ranges until the aperture is exhausted.
fn drain<F: PteFormat>(d: &mut Domain<F, &HostMemory>, size: u64) -> Vec<IovaState> {
    let mut out = Vec::new();
    loop {
        match alloc(d, size) {
            Ok(t) => out.push(t),
            Err(DmaError::IovaExhausted { .. }) => return out,
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[test]
fn a_reserved_range_is_never_handed_out() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, MB, 2 * MB);
    d.reserve(DmaAddr(MB + 0x8_0000), 3 * PAGE).unwrap();
    let got = drain(&mut d, PAGE);
    assert_eq!(got.len() as u64, 256 - 3, "every other page is handed out");
    for t in &got {
        assert!(
            !overlaps(range(t), (MB + 0x8_0000, MB + 0x8_3000)),
            "{:#x}",
            t.iova().0
        );
    }
    for t in got {
        d.free(t).unwrap();
    }
    // A size whose first fit is over the reservation goes past it.
    let starts: Vec<u64> = (0..3)
        .map(|_| alloc(&mut d, 0x4_0000).unwrap().iova().0)
        .collect::<Vec<_>>();
    assert_eq!(starts, [MB, MB + 0x4_0000, MB + 0xC_0000]);
    assert_eq!(
        alloc(&mut d, 0x4_0000),
        Err(DmaError::IovaExhausted { size: 0x4_0000 })
    );
}

#[test]
fn a_block_sized_request_skips_a_reserved_page_inside_its_first_fit() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, 0, 8 * MB);
    d.reserve(DmaAddr(2 * MB + 5 * PAGE), PAGE).unwrap();
    let a = alloc(&mut d, 2 * MB).unwrap();
    let b = alloc(&mut d, 2 * MB).unwrap();
    let c = alloc(&mut d, 2 * MB).unwrap();
    assert_eq!((a.iova().0, b.iova().0, c.iova().0), (0, 4 * MB, 6 * MB));
    assert_eq!(
        alloc(&mut d, 2 * MB),
        Err(DmaError::IovaExhausted { size: 2 * MB })
    );
}

#[test]
fn reserve_refuses_bad_ranges_and_changes_nothing() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, MB, 64 * MB);
    let live = alloc(&mut d, 4 * PAGE).unwrap();
    d.reserve(DmaAddr(32 * MB), MB).unwrap();
    let before: Vec<FixedRange> = d.fixed_ranges().to_vec();
    let cases = [
        (2 * MB + 1, PAGE, DmaError::Unaligned { value: 2 * MB + 1 }),
        (2 * MB, 100, DmaError::Unaligned { value: 100 }),
        (2 * MB, 0, DmaError::ZeroLength),
        (!0xfff, PAGE, DmaError::Overflow { a: !0xfff, b: PAGE }),
        (
            0,
            PAGE,
            DmaError::OutsideAperture {
                start: 0,
                size: PAGE,
                aperture_start: MB,
                aperture_end: 64 * MB,
            },
        ),
        (
            63 * MB,
            2 * MB,
            DmaError::OutsideAperture {
                start: 63 * MB,
                size: 2 * MB,
                aperture_start: MB,
                aperture_end: 64 * MB,
            },
        ),
        (
            live.iova().0 + PAGE,
            PAGE,
            DmaError::IovaInUse {
                start: live.iova().0 + PAGE,
                size: PAGE,
                used_start: live.iova().0,
                used_end: live.iova().0 + 4 * PAGE,
            },
        ),
        (
            32 * MB - PAGE,
            2 * PAGE,
            DmaError::IovaReserved {
                start: 32 * MB - PAGE,
                size: 2 * PAGE,
                reserved_start: 32 * MB,
                reserved_end: 33 * MB,
            },
        ),
    ];
    for (start, size, want) in cases {
        assert_eq!(d.reserve(DmaAddr(start), size), Err(want), "{start:#x}");
        assert_eq!(d.fixed_ranges(), &before[..]);
    }
    // Over a fixed-IOVA transaction.
    let fixed = d.try_alloc_at(DmaAddr(40 * MB), 2 * PAGE).unwrap();
    assert!(matches!(
        d.reserve(DmaAddr(40 * MB), PAGE),
        Err(DmaError::IovaInUse {
            used_start: 0x280_0000,
            ..
        })
    ));
    d.free(fixed).unwrap();
    d.free(live).unwrap();
}

#[test]
fn reservations_past_capacity_are_refused() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, MB, 1 << 32);
    for i in 0..MAX_FIXED as u64 {
        d.reserve(DmaAddr(2 * MB + i * 2 * PAGE), PAGE).unwrap();
    }
    assert_eq!(
        d.reserve(DmaAddr(1 << 30), PAGE),
        Err(DmaError::ReservedFull {
            capacity: MAX_FIXED as u32
        })
    );
    assert_eq!(
        d.try_alloc_at(DmaAddr(1 << 30), PAGE),
        Err(DmaError::ReservedFull {
            capacity: MAX_FIXED as u32
        })
    );
    assert_eq!(d.fixed_ranges().len(), MAX_FIXED);
    // Allocation still works around them all.
    let got = alloc(&mut d, PAGE).unwrap();
    assert_eq!(got.iova().0, MB);
}

#[test]
fn an_identity_domain_has_nothing_to_reserve_or_fix() {
    let mem = HostMemory::new();
    let mut d = Domain::<ArmStage1, &HostMemory>::identity(9);
    assert_eq!(d.reserve(DmaAddr(MB), PAGE), Err(DmaError::IdentityDomain));
    assert_eq!(
        d.try_alloc_at(DmaAddr(MB), PAGE),
        Err(DmaError::IdentityDomain)
    );
    let mut be = RecordingBackend::new();
    // DMA is already identity: nothing to install, and nothing was asked of the IOMMU.
    d.install_identity_regions(
        &[ReservedRegion {
            base: MB,
            len: PAGE,
        }],
        &mut be,
    )
    .unwrap();
    assert_eq!((be.syncs, be.publishes), (0, 0));
    assert!(d.fixed_ranges().is_empty());
    let _ = mem;
}

#[test]
fn a_fixed_iova_transaction_links_syncs_unlinks_and_frees_like_any_other() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, MB, 1 << 32);
    let mut be = RecordingBackend::new();
    // Three pages at an address no power-of-two allocation would give.
    let at = 0x1234_5000;
    let mut t = d.try_alloc_at(DmaAddr(at), 3 * PAGE).unwrap();
    assert!(t.is_fixed());
    assert_eq!((t.iova(), t.size(), t.linked()), (DmaAddr(at), 3 * PAGE, 0));
    assert_eq!(
        d.fixed_ranges(),
        &[FixedRange {
            start: at,
            end: at + 3 * PAGE,
            kind: FixedUse::Fixed
        }]
    );
    let a = d
        .link(
            &mut t,
            PhysAddr(0x9000_0000),
            PAGE,
            2 * PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    assert_eq!(a, DmaAddr(at + PAGE));
    assert_eq!(
        d.link(
            &mut t,
            PhysAddr(0x9100_0000),
            2 * PAGE,
            2 * PAGE,
            RW,
            MapAttrs::empty()
        ),
        Err(DmaError::OutsideTransaction {
            offset: 2 * PAGE,
            len: 2 * PAGE,
            size: 3 * PAGE
        })
    );
    d.sync(&mut be).unwrap();
    assert_eq!(
        d.translate(DmaAddr(at + 2 * PAGE)).map(|(pa, _)| pa),
        Some(PhysAddr(0x9000_1000))
    );
    assert_eq!(d.translate(DmaAddr(at)), None);
    d.unlink(&mut t, 2 * PAGE, PAGE).unwrap();
    assert_eq!(t.linked(), PAGE);
    d.sync(&mut be).unwrap();
    assert!(be.covered_since_last_sync(3, at + 2 * PAGE, PAGE));
    assert_eq!(d.translate(DmaAddr(at + 2 * PAGE)), None);
    // A state of another domain is refused.
    let mut other = arm(&mem, MB, 1 << 32);
    let t = match other.free(t) {
        Err((t, DmaError::WrongDomain { .. })) => t,
        r => panic!("{r:?}"),
    };
    d.destroy(t, &mut be).unwrap();
    assert_eq!(d.translate(DmaAddr(at + PAGE)), None);
    assert!(d.fixed_ranges().is_empty());
    // The range is free again, for a fixed or an allocated transaction.
    let again = d.try_alloc_at(DmaAddr(at), 3 * PAGE).unwrap();
    d.free(again).unwrap();
}

#[test]
fn try_alloc_never_hands_out_an_iova_of_a_fixed_transaction() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, MB, 2 * MB);
    let f = d.try_alloc_at(DmaAddr(MB + 16 * PAGE), 5 * PAGE).unwrap();
    let got = drain(&mut d, PAGE);
    assert_eq!(got.len(), 256 - 5);
    assert!(
        got.iter()
            .all(|t| !overlaps(range(t), (MB + 16 * PAGE, MB + 21 * PAGE)))
    );
    d.free(f).unwrap();
    // Its pages are handed out again once it is freed.
    let t = alloc(&mut d, PAGE).unwrap();
    assert_eq!(t.iova().0, MB + 16 * PAGE);
}

#[test]
fn try_alloc_at_refuses_live_reserved_and_outside_ranges() {
    let mem = HostMemory::new();
    let mut d = arm(&mem, MB, 64 * MB);
    let live = alloc(&mut d, 4 * PAGE).unwrap();
    let fixed = d.try_alloc_at(DmaAddr(8 * MB), 2 * PAGE).unwrap();
    d.reserve(DmaAddr(16 * MB), PAGE).unwrap();
    let before: Vec<FixedRange> = d.fixed_ranges().to_vec();
    let cases = [
        (
            live.iova().0,
            PAGE,
            DmaError::IovaInUse {
                start: live.iova().0,
                size: PAGE,
                used_start: live.iova().0,
                used_end: live.iova().0 + 4 * PAGE,
            },
        ),
        (
            8 * MB - PAGE,
            2 * PAGE,
            DmaError::IovaInUse {
                start: 8 * MB - PAGE,
                size: 2 * PAGE,
                used_start: 8 * MB,
                used_end: 8 * MB + 2 * PAGE,
            },
        ),
        (
            16 * MB - 2 * PAGE,
            4 * PAGE,
            DmaError::IovaReserved {
                start: 16 * MB - 2 * PAGE,
                size: 4 * PAGE,
                reserved_start: 16 * MB,
                reserved_end: 16 * MB + PAGE,
            },
        ),
        (
            64 * MB,
            PAGE,
            DmaError::OutsideAperture {
                start: 64 * MB,
                size: PAGE,
                aperture_start: MB,
                aperture_end: 64 * MB,
            },
        ),
        (9 * MB + 8, PAGE, DmaError::Unaligned { value: 9 * MB + 8 }),
        (9 * MB, PAGE + 8, DmaError::Unaligned { value: PAGE + 8 }),
        (9 * MB, 0, DmaError::ZeroLength),
        (
            9 * MB,
            1 << 44,
            DmaError::BadConfig {
                what: "fixed_size",
                value: 1 << 44,
            },
        ),
    ];
    for (start, size, want) in cases {
        assert_eq!(
            d.try_alloc_at(DmaAddr(start), size),
            Err(want),
            "{start:#x}+{size:#x}"
        );
        assert_eq!(d.fixed_ranges(), &before[..]);
    }
    d.free(fixed).unwrap();
    d.free(live).unwrap();
}

fn vtd_window_is_reserved<F: PteFormat>(fmt: F) {
    let mem = HostMemory::new();
    // 16 MiB around the window: without the reservation, first fit of
    // 1 MiB ranges would hand out 0xFEE0_0000.
    let mut d = Domain::new(fmt, &mem, cfg(0xFE00_0000, 0xFF00_0000)).unwrap();
    assert_eq!(
        d.fixed_ranges(),
        &[FixedRange {
            start: WINDOW.0,
            end: WINDOW.1,
            kind: FixedUse::Reserved
        }]
    );
    let got = drain(&mut d, MB);
    assert_eq!(got.len(), 15, "every MiB but the window's");
    for t in &got {
        assert!(!overlaps(range(t), WINDOW), "{:#x}", t.iova().0);
    }
    for t in got {
        d.free(t).unwrap();
    }
    let got = drain(&mut d, 64 << 10);
    assert_eq!(got.len(), 15 * 16);
    assert!(got.iter().all(|t| !overlaps(range(t), WINDOW)));
}

#[test]
fn a_vtd_second_level_domain_never_hands_out_the_interrupt_window() {
    vtd_window_is_reserved(VtdSecondLevel::default());
}

#[test]
fn a_vtd_first_level_domain_never_hands_out_the_interrupt_window() {
    vtd_window_is_reserved(VtdFirstLevel {
        fl1gp: true,
        haw: 48,
    });
}

#[test]
fn a_fixed_iova_over_the_interrupt_window_is_refused_on_vtd_only() {
    assert_eq!(VTD_INTERRUPT_WINDOW, WINDOW);
    let mem = HostMemory::new();
    let mut be = RecordingBackend::new();
    let want = |start, size| DmaError::IovaReserved {
        start,
        size,
        reserved_start: WINDOW.0,
        reserved_end: WINDOW.1,
    };
    // Inside the aperture, and also outside it (the window is never
    // translated, whatever the aperture).
    for (start, end) in [(MB, 1 << 32), (MB, 1 << 30)] {
        let mut d = Domain::new(VtdSecondLevel::default(), &mem, cfg(start, end)).unwrap();
        assert_eq!(
            d.try_alloc_at(DmaAddr(0xFEE0_0000), PAGE),
            Err(want(0xFEE0_0000, PAGE))
        );
        assert_eq!(
            d.try_alloc_at(DmaAddr(0xFED0_0000), 2 * MB),
            Err(want(0xFED0_0000, 2 * MB))
        );
        assert_eq!(
            d.install_identity_regions(
                &[ReservedRegion {
                    base: 0xFEEF_F000,
                    len: PAGE
                }],
                &mut be
            ),
            Err(want(0xFEEF_F000, PAGE))
        );
        // Right next to it is fine when the aperture covers it.
        if end > WINDOW.1 {
            let t = d.try_alloc_at(DmaAddr(WINDOW.1), PAGE).unwrap();
            d.free(t).unwrap();
        }
    }
    // AnyDomain forwards.
    let mut a = AnyDomain::new(
        AnyFormat::VtdFirstLevel(VtdFirstLevel {
            fl1gp: true,
            haw: 48,
        }),
        &mem,
        cfg(MB, 1 << 32),
    )
    .unwrap();
    assert_eq!(
        a.try_alloc_at(DmaAddr(0xFEE0_0000), PAGE),
        Err(want(0xFEE0_0000, PAGE))
    );
    assert_eq!(a.fixed_ranges().len(), 1);
    // Arm has no such window: an SMMU domain may use the address.
    let mut d = arm(&mem, MB, 1 << 32);
    assert!(d.fixed_ranges().is_empty());
    let t = d.try_alloc_at(DmaAddr(0xFEE0_0000), PAGE).unwrap();
    d.free(t).unwrap();
}

/// A DMAR with one RMRR for 00:1f.2 at `[base, limit]`.
fn dmar_with_rmrr(base: u64, limit: u64) -> Vec<u8> {
    let mut t = b"DMAR".to_vec();
    t.extend_from_slice(&[0; 4]);
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"TESTER");
    t.resize(36, 0);
    t.extend_from_slice(&[38, 0x1]);
    t.resize(48, 0);
    // RMRR (type 1): reserved, segment, base, limit, one endpoint scope.
    let mut body = vec![0, 0, 0, 0];
    body.extend_from_slice(&base.to_le_bytes());
    body.extend_from_slice(&limit.to_le_bytes());
    body.extend_from_slice(&[1, 8, 0, 0, 0, 0, 0x1f, 2]);
    t.extend_from_slice(&1u16.to_le_bytes());
    t.extend_from_slice(&((body.len() + 4) as u16).to_le_bytes());
    t.extend_from_slice(&body);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    let sum = t.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

#[test]
fn rmrr_regions_from_a_parsed_dmar_are_identity_mapped_in_one_call() {
    let table = dmar_with_rmrr(0x7c00_0000, 0x7c02_2fff);
    let dmar = Dmar::new(&table).unwrap();
    let sata = DeviceId::new(0, 0, 0x1f, 2).unwrap();
    let mut regions: Vec<ReservedRegion> = dmar
        .reserved_regions_for(sata, &NoBridges)
        .map(Result::unwrap)
        .collect();
    regions.push(ReservedRegion {
        base: 0xe000,
        len: 0x2000,
    });
    let mem = HostMemory::new();
    let mut be = RecordingBackend::new();
    let mut d = Domain::new(VtdSecondLevel::default(), &mem, cfg(0, 1 << 32)).unwrap();
    d.install_identity_regions(&regions, &mut be).unwrap();
    assert!(!d.has_pending(), "installed and synced in the one call");
    assert_eq!(be.syncs + be.publishes, 1);
    for r in &regions {
        for off in [0, r.len - PAGE] {
            let (pa, attrs) = d.translate(DmaAddr(r.base + off)).unwrap();
            assert_eq!(pa, PhysAddr(r.base + off));
            assert!(attrs.contains(MapAttrs::READ | MapAttrs::WRITE));
        }
        assert_eq!(d.translate(DmaAddr(r.base + r.len)), None);
    }
    assert_eq!(
        d.fixed_ranges()
            .iter()
            .map(|f| (f.start, f.end, f.kind))
            .collect::<Vec<_>>(),
        [
            (0xe000, 0x1_0000, FixedUse::Identity),
            (0x7c00_0000, 0x7c02_3000, FixedUse::Identity),
            (WINDOW.0, WINDOW.1, FixedUse::Reserved),
        ]
    );
    // Never handed out, never linked over.
    assert!(matches!(
        d.try_alloc_at(DmaAddr(0x7c01_0000), PAGE),
        Err(DmaError::IovaInUse {
            used_start: 0x7c00_0000,
            ..
        })
    ));
    let mut d2 = Domain::new(
        VtdSecondLevel::default(),
        &mem,
        cfg(0x7c00_0000, 0x7c10_0000),
    )
    .unwrap();
    d2.install_identity_regions(&regions[..1], &mut be).unwrap();
    let got = drain(&mut d2, PAGE);
    assert_eq!(got.len() as u64, 256 - 0x23);
    assert!(got.iter().all(|t| t.iova().0 >= 0x7c02_3000));
    // Teardown hands every page back, the identity maps' tables included.
    for t in got {
        d2.free(t).unwrap();
    }
    d2.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    assert_eq!(mem.live_pages(), 0);
}

#[test]
fn installing_identity_regions_is_all_or_nothing() {
    let mem = HostMemory::new();
    let mut be = RecordingBackend::new();
    let mut d = arm(&mem, MB, 1 << 32);
    let good = ReservedRegion {
        base: 0x4000_0000,
        len: 4 * MB,
    };
    let cases = [
        (
            ReservedRegion {
                base: 0x4000_0000 + MB,
                len: PAGE,
            },
            DmaError::IovaInUse {
                start: 0x4000_0000 + MB,
                size: PAGE,
                used_start: 0x4000_0000,
                used_end: 0x4040_0000,
            },
        ),
        (
            ReservedRegion {
                base: 0x5000_0800,
                len: PAGE,
            },
            DmaError::Unaligned { value: 0x5000_0800 },
        ),
        (
            ReservedRegion {
                base: 0x5000_0000,
                len: 0xfff,
            },
            DmaError::Unaligned { value: 0xfff },
        ),
        (
            ReservedRegion {
                base: 0x5000_0000,
                len: 0,
            },
            DmaError::ZeroLength,
        ),
        (
            ReservedRegion {
                base: 0xe000,
                len: PAGE,
            },
            DmaError::OutsideAperture {
                start: 0xe000,
                size: PAGE,
                aperture_start: MB,
                aperture_end: 1 << 32,
            },
        ),
    ];
    for (bad, want) in cases {
        assert_eq!(d.install_identity_regions(&[good, bad], &mut be), Err(want));
        assert!(d.fixed_ranges().is_empty(), "{bad:?}");
        assert_eq!(d.translate(DmaAddr(good.base)), None);
        // What was written is invalidated at the next sync.
        d.sync(&mut be).unwrap();
        assert!(be.covered_since_last_sync(3, good.base, good.len));
    }
    // The lender refusing a table page: nothing stays either.
    let d2_mem = HostMemory::new();
    let mut d2 = arm(&d2_mem, MB, 1 << 32);
    d2_mem.set_budget(Some(2));
    let far = ReservedRegion {
        base: 0x8000_0000,
        len: PAGE,
    };
    assert_eq!(
        d2.install_identity_regions(&[good, far], &mut be),
        Err(DmaError::OutOfMemory)
    );
    assert!(d2.fixed_ranges().is_empty());
    assert_eq!(d2.translate(DmaAddr(good.base)), None);
    d2_mem.set_budget(None);
    d2.install_identity_regions(&[good, far], &mut be).unwrap();
    assert_eq!(
        d2.translate(DmaAddr(far.base)).map(|(pa, _)| pa),
        Some(PhysAddr(far.base))
    );
}

#[test]
fn a_failed_sync_leaves_identity_regions_installed_and_a_second_sync_completes() {
    let mem = HostMemory::new();
    let mut be = RecordingBackend::new();
    be.caching_mode = true; // maps need an invalidation and a wait
    be.fail_next_sync = Some(BackendError::Timeout {
        what: "test",
        polls: 1,
    });
    let mut d = arm(&mem, MB, 1 << 32);
    let r = ReservedRegion {
        base: 0x4000_0000,
        len: PAGE,
    };
    assert!(matches!(
        d.install_identity_regions(&[r], &mut be),
        Err(DmaError::Backend(BackendError::Timeout { .. }))
    ));
    assert_eq!(d.fixed_ranges().len(), 1);
    assert!(d.has_pending());
    d.sync(&mut be).unwrap();
    assert!(!d.has_pending());
    assert_eq!(
        d.translate(DmaAddr(r.base)).map(|(pa, _)| pa),
        Some(PhysAddr(r.base))
    );
}
