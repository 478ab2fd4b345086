//! The strict memory-order model (issue 9 §1): every test runs the two-step
//! API over an [`OrderLender`], which records barriers, cleans, backend calls
//! and pages handed back, and checks after every operation that
//! - a new table is visible (barrier, clean when not coherent) before the
//!   pointer to it is stored,
//! - no valid descriptor is swapped for another without break-before-make,
//! - every cleared descriptor is invalidated before `sync` returns,
//! - no table page goes back while a walk could reach it.
//!
//! All tests are named `strict_model_*` so they can be run together:
//! `cargo test --test strict_model strict_model_`.

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::testing::RecordingBackend;
use bare_iommu::testing::order::{Event, OrderBackend, OrderLender, Page, Violation};
use bare_iommu::{
    DeviceId, DmaDirection, DmaError, Domain, DomainConfig, IommuBackend, IovaState, MapAttrs,
    PhysAddr, PteFormat, TableReclaim,
};

const PAGE: u64 = 4096;
const MB2: u64 = 2 << 20;
const RW: DmaDirection = DmaDirection::Bidirectional;

fn arena() -> Vec<Page> {
    vec![Page::ZERO; 2 * 128]
}

fn cfg(coherent: bool) -> DomainConfig {
    DomainConfig {
        id: 7,
        levels: 4,
        aperture_start: 1 << 30,
        aperture_end: 1 << 40,
        coherent_walk: coherent,
    }
}

fn domain<'l, 'a, F: PteFormat>(
    fmt: F,
    mem: &'l OrderLender<'a>,
    coherent: bool,
) -> Domain<F, &'l OrderLender<'a>> {
    let d = Domain::new(fmt, mem, cfg(coherent)).unwrap();
    let info = d.info().unwrap();
    mem.watch_root(info.root, info.levels, F::COUNT_MASK);
    d
}

fn tx<F: PteFormat, M: bare_iommu::TableMemory>(d: &mut Domain<F, M>, size: u64) -> IovaState {
    d.try_alloc(size, u64::MAX).unwrap().into_iova().unwrap()
}

#[track_caller]
fn clean(mem: &OrderLender<'_>) {
    let v = mem.check();
    assert!(v.is_empty(), "strict model: {v:#x?}");
}

/// Links, scatter links, a block, unlinks and syncs over one domain: the
/// common path must keep every rule.
fn ordinary_use<F: PteFormat>(fmt: F, coherent: bool) {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, coherent);
    let mut d = domain(fmt, &mem, coherent);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let dev = DeviceId::new(0, 0, 3, 0).unwrap();
    be.attach(dev, d.attachment()).unwrap();
    let mut t = tx(&mut d, 4 * MB2);
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    let pages = [PhysAddr(0x8100_0000), PhysAddr(0x8000_5000)];
    d.link_pages(&mut t, &pages, PAGE, RW, MapAttrs::empty())
        .unwrap();
    d.link(
        &mut t,
        PhysAddr(0x4000_0000),
        MB2,
        MB2,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.unlink(&mut t, PAGE, PAGE).unwrap();
    d.unlink(&mut t, MB2, MB2).unwrap();
    clean(&mem);
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.free(t).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    be.detach(dev).unwrap();
}

#[test]
fn strict_model_new_table_is_visible_before_its_pointer_stage1() {
    ordinary_use(ArmStage1, true);
}

#[test]
fn strict_model_new_table_is_visible_before_its_pointer_stage2() {
    ordinary_use(ArmStage2, true);
}

#[test]
fn strict_model_new_table_is_visible_before_its_pointer_vtd() {
    ordinary_use(VtdSecondLevel::default(), true);
}

#[test]
fn strict_model_noncoherent_walk_cleans_every_written_line() {
    ordinary_use(ArmStage1, false);
    ordinary_use(VtdSecondLevel::default(), false);
}

#[test]
fn strict_model_noncoherent_walk_cleans_the_new_table_before_publishing_it() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, false);
    let mut d = domain(ArmStage1, &mem, false);
    let mut t = tx(&mut d, PAGE);
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    // Three new tables (levels 2, 1, 0): each zeroed page cleaned, each
    // followed by a barrier before its pointer.
    let cleans = mem.count(|e| matches!(e, Event::Clean(_, 4096)));
    assert!(
        cleans >= 4,
        "{cleans} whole-page cleans: {:?}",
        mem.events()
    );
}

/// A block with one page unlinked in its middle: either refused (nothing
/// changes) or done with break-before-make — never a table stored over the
/// live block.
fn partial_block_unlink<F: PteFormat>(fmt: F) {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(fmt, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let mut t = tx(&mut d, MB2);
    d.link(&mut t, PhysAddr(0x4000_0000), 0, MB2, RW, MapAttrs::empty())
        .unwrap();
    d.sync(&mut be).unwrap();
    let r = d.unlink(&mut t, 5 * PAGE, PAGE);
    clean(&mem);
    assert!(
        matches!(r, Err(DmaError::PartialBlock { .. })),
        "partial unlink of a live block: {r:?}"
    );
    // Nothing changed: the whole block still translates, linked bytes too.
    assert_eq!(t.linked(), MB2);
    assert_eq!(
        d.translate(bare_iommu::DmaAddr(t.iova().0 + 5 * PAGE)),
        Some((PhysAddr(0x4000_0000 + 5 * PAGE), fmt.canonical(RW.attrs())))
    );
    d.unlink(&mut t, 0, MB2).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
}

#[test]
fn strict_model_partial_unlink_of_a_block_is_refused_stage1() {
    partial_block_unlink(ArmStage1);
}

#[test]
fn strict_model_partial_unlink_of_a_block_is_refused_vtd() {
    partial_block_unlink(VtdSecondLevel::default());
}

/// Whole-block links (1 GiB and 2 MiB, the block path of `Domain::link`)
/// keep every rule: each new table visible (and cleaned) before its
/// pointer, the block's line cleaned on a non-coherent walk; and a block
/// link that runs out of table memory hands back no table before the sync
/// that invalidates it.
fn block_links<F: PteFormat>(fmt: F, coherent: bool) {
    const GIB: u64 = 1 << 30;
    let mut a = arena();
    let mem = OrderLender::new(&mut a, coherent);
    let mut d = domain(fmt, &mem, coherent);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let mut t = tx(&mut d, 2 * GIB);
    let base = t.iova().0;
    d.link(
        &mut t,
        PhysAddr(0x40_0000_0000),
        0,
        GIB,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    d.link(
        &mut t,
        PhysAddr(0x4000_0000),
        GIB + MB2,
        MB2,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    let pt = d.page_table().unwrap();
    assert_eq!(
        pt.translate(bare_iommu::DmaAddr(base + 5 * PAGE)),
        Some((PhysAddr(0x40_0000_5000), fmt.canonical(RW.attrs()), 2))
    );
    assert_eq!(
        pt.translate(bare_iommu::DmaAddr(base + GIB + MB2)),
        Some((PhysAddr(0x4000_0000), fmt.canonical(RW.attrs()), 1))
    );
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.unlink(&mut t, 0, GIB).unwrap();
    d.unlink(&mut t, GIB + MB2, MB2).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.free(t).unwrap();

    // Five levels: the block's walk attaches a level-3 table (the root's
    // child, kept) and a level-2 table, then the lender runs dry.
    let five = DomainConfig {
        levels: 5,
        ..cfg(coherent)
    };
    let mut d = Domain::new(fmt, &mem, five).unwrap();
    let info = d.info().unwrap();
    mem.watch_root(info.root, info.levels, F::COUNT_MASK);
    let mut t = tx(&mut d, MB2);
    mem.set_budget(Some(2));
    let r = d.link(&mut t, PhysAddr(0x4000_0000), 0, MB2, RW, MapAttrs::empty());
    assert_eq!(r, Err(DmaError::OutOfMemory));
    clean(&mem);
    mem.set_budget(None);
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.link(&mut t, PhysAddr(0x4000_0000), 0, MB2, RW, MapAttrs::empty())
        .unwrap();
    clean(&mem);
    d.unlink(&mut t, 0, MB2).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.free(t).unwrap();
}

#[test]
fn strict_model_block_links_keep_every_rule_stage1() {
    block_links(ArmStage1, true);
    block_links(ArmStage1, false);
}

#[test]
fn strict_model_block_links_keep_every_rule_vtd() {
    block_links(VtdSecondLevel::default(), true);
    block_links(VtdSecondLevel::default(), false);
}

#[test]
fn strict_model_dropping_a_domain_frees_no_table_the_iommu_may_walk() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(ArmStage1, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let mut t = tx(&mut d, PAGE);
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    let lent = mem.lent_pages();
    drop(d);
    clean(&mem);
    assert_eq!(mem.lent_pages(), lent, "drop handed table pages back");
}

#[test]
fn strict_model_teardown_invalidates_the_domain_before_freeing_tables() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(ArmStage1, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let dev = DeviceId::new(0, 0, 3, 0).unwrap();
    be.attach(dev, d.attachment()).unwrap();
    let mut t = tx(&mut d, PAGE);
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    d.free(t).unwrap();
    be.detach(dev).unwrap();
    d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), 0, "teardown kept table pages");
    assert!(be.inner.domain_invalidations >= 1);
}

#[test]
fn strict_model_teardown_with_a_failing_sync_frees_nothing() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let d = domain(ArmStage1, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    be.inner.fail_next_sync = Some(bare_iommu::BackendError::Timeout {
        what: "test",
        polls: 1,
    });
    let lent = mem.lent_pages();
    let (d, e) = d.teardown(&mut be).err().unwrap();
    assert!(matches!(e, DmaError::Backend(_)));
    assert_eq!(mem.lent_pages(), lent);
    d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), 0);
}

#[test]
fn strict_model_failed_link_hands_back_no_page_before_the_sync() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(ArmStage1, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    // One page in its own 512 GiB region: unlinking it retires 3 tables.
    let mut t1 = tx(&mut d, PAGE);
    d.link(
        &mut t1,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    d.unlink(&mut t1, 0, PAGE).unwrap();
    // A link elsewhere that gets one table and then runs out: the retired
    // tables and the briefly-published new one must wait for the sync.
    let mut t2 = d.try_alloc(1 << 39, u64::MAX).unwrap().into_iova().unwrap();
    mem.set_budget(Some(1));
    let r = d.link(
        &mut t2,
        PhysAddr(0x9000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    );
    assert_eq!(r, Err(DmaError::OutOfMemory));
    clean(&mem);
    mem.set_budget(None);
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.free(t1).unwrap();
    d.free(t2).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
}

#[test]
fn strict_model_every_unlinked_descriptor_is_invalidated_before_sync_returns() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(ArmStage2, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let mut ts: Vec<IovaState> = (0..20).map(|_| tx(&mut d, 8 * PAGE)).collect();
    for (i, t) in ts.iter_mut().enumerate() {
        d.link(
            t,
            PhysAddr(0x8000_0000 + i as u64 * 8 * PAGE),
            0,
            8 * PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    d.sync(&mut be).unwrap();
    for (i, t) in ts.iter_mut().enumerate() {
        d.unlink(t, (i as u64 % 8) * PAGE, PAGE).unwrap();
    }
    d.sync(&mut be).unwrap();
    clean(&mem);
    for t in ts {
        d.free(t).unwrap();
    }
    d.sync(&mut be).unwrap();
    clean(&mem);
}

#[test]
fn strict_model_many_emptied_tables_are_invalidated_before_they_go_back() {
    let mut a = vec![Page::ZERO; 2 * 256];
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(ArmStage1, &mem, true);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    // One page in each of 100 separate 2 MiB regions: 100 leaf tables (and
    // their level-2 parent) empty out in one unlink and wait on the retired
    // list, threaded through the pages themselves, for one completion.
    let mut t = tx(&mut d, 100 * MB2);
    for r in 0..100u64 {
        d.link(
            &mut t,
            PhysAddr(0x8000_0000 + r * PAGE),
            r * MB2,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    d.sync(&mut be).unwrap();
    d.destroy(t, &mut be).unwrap();
    clean(&mem);
    assert_eq!(
        mem.lent_pages(),
        2,
        "only the root and its child (kept: `kept_height`) are left"
    );
}

/// The recorder itself: a table pointer stored with no barrier, a page
/// freed while still reachable, and a swap of valid descriptors are caught.
#[test]
fn strict_model_recorder_catches_what_it_must() {
    use bare_iommu::TableMemory;
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let root = mem.alloc_zeroed(1).unwrap();
    mem.watch_root(root, 4, ArmStage1::COUNT_MASK);
    let child = mem.alloc_zeroed(1).unwrap();
    let slot = mem.phys_to_virt(root).cast::<u64>();
    // SAFETY: both pages are lent to this test.
    unsafe { slot.write_volatile(child.0 | 3) };
    let v = mem.check();
    assert!(
        matches!(v.first(), Some(Violation::PublishedBeforeVisible { .. })),
        "{v:?}"
    );
    // A count in the pointer's ignored bits (bits 11:2 on Arm) is no store
    // for the rules; a change of any other bit of a valid pointer is.
    // SAFETY: as above.
    unsafe { slot.write_volatile(child.0 | 3 | 5 << ArmStage1::COUNT_SHIFT) };
    assert_eq!(mem.check().len(), 1, "a count change is not a violation");
    // SAFETY: as above.
    unsafe { slot.write_volatile(child.0 | 3 | 1 << 60) };
    let v = mem.check();
    assert!(
        matches!(v.get(1), Some(Violation::BreakBeforeMake { .. })),
        "{v:?}"
    );
    // SAFETY: as above.
    unsafe { slot.write_volatile(0x8000_0000 | 1) };
    let v = mem.check();
    assert!(
        v.iter()
            .any(|x| matches!(x, Violation::BreakBeforeMake { .. })),
        "{v:?}"
    );
    // SAFETY: `child` was lent by `alloc_zeroed(1)`.
    unsafe { mem.free(child, 1) };
    let v = mem.check();
    assert!(
        v.iter()
            .any(|x| matches!(x, Violation::FreedWhileReachable { .. })),
        "{v:?}"
    );
}

/// (completion waits, publishes) the backend received since `since`.
fn waits_and_publishes(mem: &OrderLender<'_>, since: usize) -> (usize, usize) {
    let ev = mem.events();
    let new = ev.get(since..).unwrap_or(&[]);
    (
        new.iter().filter(|e| matches!(e, Event::Sync(_))).count(),
        new.iter().filter(|e| matches!(e, Event::Publish)).count(),
    )
}

/// Issue 11 §1: a sync after links alone submits no completion (nothing to
/// invalidate: no TLB holds a not-present entry), only publishes the writes,
/// which are ordered and cleaned before it (rule 5); an unlink's sync
/// submits exactly one completion, before the retired tables go back. With a
/// backend that caches not-present entries (VT-d caching mode) the link's
/// sync invalidates and waits once.
fn link_sync_waits_for_nothing(coherent: bool, caching_mode: bool) {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, coherent);
    let mut d = domain(VtdSecondLevel::default(), &mem, coherent);
    let mut rec = RecordingBackend::new();
    rec.caching_mode = caching_mode;
    let mut be = OrderBackend::new(rec, &mem);
    let dev = DeviceId::new(0, 0, 3, 0).unwrap();
    be.attach(dev, d.attachment()).unwrap();
    let mut t = tx(&mut d, 4 * PAGE);
    // Events are read from the log, which keeps the latest LOG entries:
    // stay well inside it.
    let before = mem.events().len();
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    let link = waits_and_publishes(&mem, before);
    let want = if caching_mode { (1, 0) } else { (0, 1) };
    assert_eq!(
        link,
        want,
        "link + sync (caching mode {caching_mode}): {:?}",
        mem.events()
    );
    assert!(!d.has_pending());

    let before = mem.events().len();
    d.unlink(&mut t, 0, PAGE).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    assert_eq!(
        waits_and_publishes(&mem, before),
        (1, 0),
        "unlink + sync: {:?}",
        mem.events()
    );
    // The emptied tables went back after that completion (rule 4 checked
    // by the recorder); the root and its child (kept: `kept_height`) are
    // left.
    let pt = d.page_table().unwrap();
    assert_eq!(pt.kept_height(), Some(u32::from(pt.levels()) - 2));
    assert_eq!(mem.lent_pages(), 2);
    assert!(
        mem.events().len() < bare_iommu::testing::order::LOG,
        "event log full: the counts above may have missed events"
    );
    d.free(t).unwrap();
    be.detach(dev).unwrap();
}

#[test]
fn strict_model_link_then_sync_submits_no_completion() {
    link_sync_waits_for_nothing(true, false);
    link_sync_waits_for_nothing(false, false);
}

#[test]
fn strict_model_unlink_then_sync_submits_exactly_one_completion() {
    // Also in caching mode, where the link's sync waits once too.
    link_sync_waits_for_nothing(true, true);
    link_sync_waits_for_nothing(false, true);
}

/// Fixed-IOVA transactions and identity regions take the same path as
/// allocated ones: every rule holds for them too.
fn fixed_iova_use<F: PteFormat>(fmt: F, coherent: bool) {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, coherent);
    let mut d = domain(fmt, &mem, coherent);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let dev = DeviceId::new(0, 0, 3, 0).unwrap();
    be.attach(dev, d.attachment()).unwrap();
    // Three pages and a 2 MiB block at caller-chosen addresses, sizes that
    // are not powers of two.
    let at = (1 << 31) + 3 * PAGE;
    let mut t = d.try_alloc_at(bare_iommu::DmaAddr(at), 3 * PAGE).unwrap();
    d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        3 * PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    let mut b = d
        .try_alloc_at(bare_iommu::DmaAddr(1 << 32), MB2 + PAGE)
        .unwrap();
    d.link(&mut b, PhysAddr(0x4000_0000), 0, MB2, RW, MapAttrs::empty())
        .unwrap();
    d.link(
        &mut b,
        PhysAddr(0x9000_0000),
        MB2,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    clean(&mem);
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.unlink(&mut t, PAGE, PAGE).unwrap();
    d.unlink(&mut b, 0, MB2).unwrap();
    clean(&mem);
    d.sync(&mut be).unwrap();
    clean(&mem);
    d.free(t).unwrap();
    d.free(b).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    // Identity regions installed in one call, synced inside it.
    let regions = [
        bare_iommu::firmware::ReservedRegion {
            base: 3 << 30,
            len: 5 * PAGE,
        },
        bare_iommu::firmware::ReservedRegion {
            base: (3 << 30) + MB2,
            len: MB2,
        },
    ];
    d.install_identity_regions(&regions, &mut be).unwrap();
    clean(&mem);
    // A refused install takes back what it wrote: invalidated at the sync.
    let bad = [
        bare_iommu::firmware::ReservedRegion {
            base: 5 << 30,
            len: PAGE,
        },
        bare_iommu::firmware::ReservedRegion {
            base: 3 << 30,
            len: PAGE,
        },
    ];
    assert!(matches!(
        d.install_identity_regions(&bad, &mut be),
        Err(DmaError::IovaInUse { .. })
    ));
    clean(&mem);
    d.sync(&mut be).unwrap();
    clean(&mem);
    be.detach(dev).unwrap();
}

#[test]
fn strict_model_fixed_iova_links_keep_every_rule_stage1() {
    fixed_iova_use(ArmStage1, true);
    fixed_iova_use(ArmStage1, false);
}

#[test]
fn strict_model_fixed_iova_links_keep_every_rule_stage2() {
    fixed_iova_use(ArmStage2, true);
}

#[test]
fn strict_model_fixed_iova_links_keep_every_rule_vtd() {
    fixed_iova_use(VtdSecondLevel::default(), true);
    fixed_iova_use(VtdSecondLevel::default(), false);
}

/// Links one page in each of `regions` 2 MiB regions of `t`, then syncs.
fn link_scattered<F: PteFormat, M: bare_iommu::TableMemory, B: IommuBackend>(
    d: &mut Domain<F, M>,
    t: &mut IovaState,
    be: &mut B,
    regions: u64,
) {
    for r in 0..regions {
        d.link(
            t,
            PhysAddr(0x8000_0000 + r * PAGE),
            r * MB2,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    d.sync(be).unwrap();
}

/// Unlinks what `link_scattered` linked, then syncs.
fn unlink_scattered<F: PteFormat, M: bare_iommu::TableMemory, B: IommuBackend>(
    d: &mut Domain<F, M>,
    t: &mut IovaState,
    be: &mut B,
    regions: u64,
) {
    for r in 0..regions {
        d.unlink(t, r * MB2, PAGE).unwrap();
    }
    d.sync(be).unwrap();
}

/// `TableReclaim::Keep` against `Eager` on 40 scattered pages (one leaf
/// table each, under one level-1 table): kept tables stay attached through
/// unlink and sync and are linked into again without a page lent;
/// `reclaim_empty_tables` hands them back only after their invalidation
/// completed; eager hands them back at the sync as before.
fn kept_tables<F: PteFormat>(fmt: F, policy: TableReclaim) {
    const N: u64 = 40;
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(fmt, &mem, true);
    assert_eq!(d.table_reclaim(), TableReclaim::Eager, "the default");
    d.set_table_reclaim(policy);
    assert_eq!(d.table_reclaim(), policy);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let mut t = tx(&mut d, N * MB2);
    link_scattered(&mut d, &mut t, &mut be, N);
    clean(&mem);
    // Root, the root's kept child, the level-1 table and 40 leaf tables
    // (the counts live in the pointers: no page of their own).
    let lent = mem.lent_pages();
    assert_eq!(lent, 3 + N as usize);
    unlink_scattered(&mut d, &mut t, &mut be, N);
    clean(&mem);
    for r in 0..N {
        assert_eq!(d.translate(t.dma_addr(r * MB2).unwrap()), None);
    }
    if policy == TableReclaim::Eager {
        assert_eq!(mem.lent_pages(), 2, "eager: emptied tables went back");
        assert_eq!(d.reclaim_empty_tables(&mut be).unwrap(), 0);
        d.free(t).unwrap();
        d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
        clean(&mem);
        return;
    }
    assert_eq!(mem.lent_pages(), lent, "keep: no table handed back");
    // Linked again: into the kept tables, no page lent.
    link_scattered(&mut d, &mut t, &mut be, N);
    clean(&mem);
    assert_eq!(
        mem.lent_pages(),
        lent,
        "a re-link into kept tables lent a page"
    );
    unlink_scattered(&mut d, &mut t, &mut be, N);
    // A multi-page unlink across two leaf tables (the general path) keeps
    // them too.
    d.link(
        &mut t,
        PhysAddr(0x9000_0000),
        MB2 - PAGE,
        2 * PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    d.unlink(&mut t, MB2 - PAGE, 2 * PAGE).unwrap();
    d.sync(&mut be).unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), lent);
    // A reclaim whose completion fails hands nothing back; the next sync
    // (after the invalidation completed) does.
    be.inner.fail_next_sync = Some(bare_iommu::BackendError::Timeout {
        what: "test",
        polls: 1,
    });
    assert!(matches!(
        d.reclaim_empty_tables(&mut be),
        Err(DmaError::Backend(_))
    ));
    clean(&mem);
    assert_eq!(mem.lent_pages(), lent, "handed back before the completion");
    d.sync(&mut be).unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), 2, "only the root and its kept child stay");
    // Nothing left to reclaim; linking again lends fresh tables.
    assert_eq!(d.reclaim_empty_tables(&mut be).unwrap(), 0);
    link_scattered(&mut d, &mut t, &mut be, 2);
    unlink_scattered(&mut d, &mut t, &mut be, 2);
    // Two leaf tables and their level-1 parent (the walk caches of their
    // ranges invalidated before they go).
    assert_eq!(d.reclaim_empty_tables(&mut be).unwrap(), 3);
    clean(&mem);
    assert_eq!(mem.lent_pages(), 2);
    d.free(t).unwrap();
    d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), 0);
}

#[test]
fn strict_model_kept_tables_are_reused_and_reclaimed_after_the_invalidation_stage1() {
    kept_tables(ArmStage1, TableReclaim::Keep);
}

#[test]
fn strict_model_kept_tables_are_reused_and_reclaimed_after_the_invalidation_vtd() {
    kept_tables(VtdSecondLevel::default(), TableReclaim::Keep);
}

#[test]
fn strict_model_eager_reclaim_hands_emptied_tables_back_at_the_sync() {
    kept_tables(ArmStage2, TableReclaim::Eager);
}

/// Kept tables still attached at teardown go back with the rest, after
/// the whole-domain invalidation.
#[test]
fn strict_model_teardown_hands_back_kept_tables() {
    let mut a = arena();
    let mem = OrderLender::new(&mut a, true);
    let mut d = domain(ArmStage1, &mem, true);
    d.set_table_reclaim(TableReclaim::Keep);
    let mut be = OrderBackend::new(RecordingBackend::new(), &mem);
    let mut t = tx(&mut d, 8 * MB2);
    link_scattered(&mut d, &mut t, &mut be, 8);
    unlink_scattered(&mut d, &mut t, &mut be, 8);
    assert_eq!(mem.lent_pages(), 3 + 8);
    d.free(t).unwrap();
    d.teardown(&mut be).map_err(|(_, e)| e).unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), 0);
}

/// `SharedDomain`'s read side under the recorder: per-page links, a run
/// and a scatter list across a leaf table's edge, a 2 MiB block, their
/// unlinks (pages one by one, runs across the edge, the whole block), a
/// link that runs out of table pages half way, the reclaim of the emptied
/// tables and the free: every rule holds on a coherent and a non-coherent
/// walker (new tables visible before their pointers, every written line
/// cleaned, no valid descriptor replaced, every cleared one invalidated
/// before a sync returns, no page back while a walk may reach it).
fn shared_use<F: PteFormat>(fmt: F, coherent: bool) {
    use bare_iommu::shared::SharedDomain;
    use bare_iommu::testing::split::FakeQueue;
    let mut a = vec![Page::ZERO; 2 * 256];
    let mem = OrderLender::new(&mut a, coherent);
    let dom = SharedDomain::new(domain(fmt, &mem, coherent));
    let mut be = OrderBackend::new(FakeQueue::new(1), &mem);
    let step = |what: &str| {
        let v = mem.check();
        assert!(v.is_empty(), "strict model after {what}: {v:#x?}");
    };
    let mut t = dom
        .try_alloc(8 * MB2, u64::MAX)
        .unwrap()
        .into_iova()
        .unwrap();
    let edge = MB2;
    for k in 0..3u64 {
        dom.link(
            &mut t,
            PhysAddr(0x8000_0000 + k * PAGE),
            edge - 3 * PAGE + k * PAGE,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    step("per-page links");
    dom.link(
        &mut t,
        PhysAddr(0x9000_0000),
        edge,
        3 * PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    step("a run");
    let list = [0xa000_3000u64, 0xa001_0000, 0xa000_0000, 0xa002_5000].map(PhysAddr);
    dom.link_pages(&mut t, &list, 3 * MB2 - 2 * PAGE, RW, MapAttrs::empty())
        .unwrap();
    step("a scatter list across an edge");
    dom.link(
        &mut t,
        PhysAddr(0x4000_0000),
        4 * MB2,
        MB2,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    step("a 2 MiB block");
    dom.sync(&mut be).unwrap();
    step("the sync after the links");
    // Out of table pages half way through a list: what was written is
    // taken back, and invalidated at the next sync.
    // (The first table has a page already, the second has to be lent.)
    dom.link(
        &mut t,
        PhysAddr(0xb100_0000),
        5 * MB2,
        PAGE,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    dom.sync(&mut be).unwrap();
    mem.set_budget(Some(0));
    let far = [0xb000_0000u64, 0xb000_1000, 0xb000_2000].map(PhysAddr);
    assert_eq!(
        dom.link_pages(&mut t, &far, 6 * MB2 - 2 * PAGE, RW, MapAttrs::empty()),
        Err(DmaError::OutOfMemory)
    );
    mem.set_budget(None);
    step("a list that ran out of tables");
    dom.sync(&mut be).unwrap();
    step("the sync after it");
    for k in 0..3u64 {
        dom.unlink(&mut t, edge - 3 * PAGE + k * PAGE, PAGE)
            .unwrap();
    }
    dom.unlink(&mut t, edge, 3 * PAGE).unwrap();
    dom.unlink(&mut t, 3 * MB2 - 2 * PAGE, 4 * PAGE).unwrap();
    dom.unlink(&mut t, 4 * MB2, MB2).unwrap();
    dom.unlink(&mut t, 5 * MB2, PAGE).unwrap();
    step("the unlinks");
    dom.sync(&mut be).unwrap();
    step("the sync after the unlinks");
    dom.reclaim_now();
    dom.sync(&mut be).unwrap();
    step("the reclaim and its sync");
    dom.link(
        &mut t,
        PhysAddr(0x4020_0000),
        6 * MB2,
        MB2,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    dom.free(t).map_err(|(_, e)| e).unwrap();
    dom.sync(&mut be).unwrap();
    step("a block freed with its transaction");
    dom.into_inner()
        .teardown(&mut be)
        .map_err(|(_, e)| e)
        .unwrap();
    clean(&mem);
    assert_eq!(mem.lent_pages(), 0);
}

#[test]
fn strict_model_shared_domain_keeps_every_rule_stage1() {
    shared_use(ArmStage1, true);
    shared_use(ArmStage1, false);
}

#[test]
fn strict_model_shared_domain_keeps_every_rule_vtd() {
    shared_use(VtdSecondLevel::default(), true);
    shared_use(VtdSecondLevel::default(), false);
}
