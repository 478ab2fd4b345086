//! Host tests of the shared wrappers on one thread, with the interleavings
//! written out (the threaded and loom tests are in `tests/`).

extern crate std;

use std::boxed::Box;

use super::{SharedDomain, SharedIommu, SplitSync};
use crate::addr::{DmaAddr, PhysAddr};
use crate::backend::{DomainInfo, IommuBackend, TableFormat};
use crate::error::BackendError;
use crate::pgtable::arm::ArmStage1;
use crate::pgtable::{DmaDirection, MapAttrs};
use crate::state::{Domain, DomainConfig, IovaState};
use crate::testing::heap::HostMemory;
use crate::testing::split::FakeQueue;

fn info() -> DomainInfo {
    DomainInfo {
        id: 1,
        root: PhysAddr(0x1000),
        format: TableFormat::ArmStage1,
        levels: 4,
        ias_bits: 48,
    }
}

fn drain(q: &mut FakeQueue) {
    q.drain_irq();
}

#[test]
fn one_completion_serves_the_batches_of_several_cpus() {
    let s = SharedIommu::new(FakeQueue::new(1), drain);
    let (mut a, mut b) = (s.cpu(), s.cpu());
    a.invalidate(&info(), DmaAddr(0x1000), 0x1000, true)
        .unwrap();
    b.invalidate(&info(), DmaAddr(0x8000), 0x1000, true)
        .unwrap();
    let ta = a.submit().unwrap();
    // B's command was queued before A's completion: A's covers it.
    let tb = b.submit().unwrap();
    assert_eq!(ta, tb);
    a.wait(ta).unwrap();
    b.wait(tb).unwrap();
    assert_eq!(s.with(|q| q.completions), 1);
    // A command queued after it needs a completion of its own.
    b.invalidate(&info(), DmaAddr(0x9000), 0x1000, true)
        .unwrap();
    b.sync().unwrap();
    assert_eq!(s.with(|q| q.completions), 2);
}

#[test]
fn an_interrupt_on_the_cpu_holding_the_lock_is_deferred_to_the_holder_not_deadlocked() {
    let s = SharedIommu::new(FakeQueue::new(1), drain);
    let ran_now = s.with(|q| {
        q.irq_raised = 3;
        // The interrupt arrives while this CPU holds the lock: it must
        // return at once instead of spinning on its own CPU's lock.
        s.handle_irq(FakeQueue::drain_irq)
    });
    assert_eq!(ran_now, None);
    // The holder ran the deferred handler as it released the lock.
    assert_eq!(s.with(|q| (q.irq_raised, q.irq_drained)), (0, 3));
    // With the lock free, the handler runs at once.
    s.with(|q| q.irq_raised = 2);
    assert_eq!(s.handle_irq(FakeQueue::drain_irq), Some(2));
}

#[test]
fn a_queue_error_reaches_every_cpu_whose_window_saw_it() {
    let s = SharedIommu::new(FakeQueue::new(1), drain);
    let (mut a, mut b) = (s.cpu(), s.cpu());
    a.invalidate(&info(), DmaAddr(0x1000), 0x1000, true)
        .unwrap();
    b.invalidate(&info(), DmaAddr(0x8000), 0x1000, true)
        .unwrap();
    let stop = BackendError::QueueError { code: 1, index: 7 };
    s.with(|q| q.armed_error = Some(stop));
    // A meets the error; B's commands may have been the bad one: both hear.
    assert_eq!(a.sync(), Err(stop));
    assert_eq!(b.sync(), Err(stop));
    // Reported once per window: the next syncs are clean.
    let mut c = s.cpu();
    c.invalidate(&info(), DmaAddr(0x2000), 0x1000, true)
        .unwrap();
    c.sync().unwrap();
    a.sync().unwrap();
    b.sync().unwrap();
}

/// The CPU whose own completion submit meets the queue error gets it
/// there, and once: its next sync is clean; another CPU whose window saw
/// the error gets it from its wait.
#[test]
fn a_queue_error_met_at_submit_is_reported_once_to_that_cpu() {
    let s = SharedIommu::new(FakeQueue::new(1), drain);
    let (mut a, mut b) = (s.cpu(), s.cpu());
    a.invalidate(&info(), DmaAddr(0x1000), 0x1000, true)
        .unwrap();
    b.invalidate(&info(), DmaAddr(0x8000), 0x1000, true)
        .unwrap();
    let stop = BackendError::QueueError { code: 1, index: 7 };
    s.with(|q| q.armed_submit_error = Some(stop));
    assert_eq!(a.sync(), Err(stop));
    assert_eq!(b.sync(), Err(stop));
    a.invalidate(&info(), DmaAddr(0x2000), 0x1000, true)
        .unwrap();
    assert_eq!(a.sync(), Ok(()), "the error was reported to A twice");
    b.sync().unwrap();
}

#[test]
fn a_completion_that_never_arrives_is_a_timeout() {
    let mut q = FakeQueue::new(0);
    q.budget = 50;
    let s = SharedIommu::new(q, drain);
    let mut a = s.cpu();
    a.invalidate(&info(), DmaAddr(0x1000), 0x1000, true)
        .unwrap();
    assert!(matches!(
        a.sync(),
        Err(BackendError::Timeout { polls: 50, .. })
    ));
}

/// A backend that runs `during` (another CPU's work) while it waits.
struct Interleaved<'a> {
    inner: FakeQueue,
    during: Option<Box<dyn FnOnce() + 'a>>,
}

impl IommuBackend for Interleaved<'_> {
    fn attach(&mut self, dev: crate::DeviceId, how: crate::Attachment) -> Result<(), BackendError> {
        self.inner.attach(dev, how)
    }
    fn invalidate(
        &mut self,
        d: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf: bool,
    ) -> Result<(), BackendError> {
        self.inner.invalidate(d, iova, len, leaf)
    }
    fn invalidate_domain(&mut self, d: &DomainInfo) -> Result<(), BackendError> {
        self.inner.invalidate_domain(d)
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        self.inner.sync()
    }
}

impl SplitSync for Interleaved<'_> {
    fn submit(&mut self) -> Result<u64, BackendError> {
        self.inner.submit()
    }
    fn queue_and_submit(
        &mut self,
        queue: &mut dyn FnMut(&mut dyn IommuBackend) -> Result<bool, BackendError>,
    ) -> Result<Option<u64>, BackendError> {
        self.inner.queue_and_submit(queue)
    }
    fn wait(&mut self, ticket: u64) -> Result<(), BackendError> {
        if let Some(f) = self.during.take() {
            f();
        }
        self.inner.wait(ticket)
    }
}

/// A 4-level domain with tag `id` whose aperture (1 MiB to 1 TiB) is
/// sharded.
fn cfg(id: u16) -> DomainConfig {
    DomainConfig {
        id,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end: 1 << 40,
        coherent_walk: true,
    }
}

fn domain(mem: &HostMemory) -> SharedDomain<ArmStage1, &HostMemory> {
    SharedDomain::new(Domain::new(ArmStage1, mem, cfg(1)).unwrap())
}

/// A transaction of `size` bytes from `dom`'s allocator.
fn tx(dom: &SharedDomain<ArmStage1, &HostMemory>, size: u64) -> IovaState {
    dom.try_alloc(size, u64::MAX).unwrap().into_iova().unwrap()
}

/// Links the 4 KiB page at `pa` at `offset` of `t`, both directions.
fn link_page(dom: &SharedDomain<ArmStage1, &HostMemory>, t: &mut IovaState, pa: u64, offset: u64) {
    dom.link(t, PhysAddr(pa), offset, 4096, RW, MapAttrs::empty())
        .unwrap();
}

const RW: DmaDirection = DmaDirection::Bidirectional;

#[test]
fn a_shared_sync_waits_outside_the_lock_and_frees_only_covered_tables() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    // Two transactions far apart: each has its own leaf and level-2 tables.
    let mut t1 = tx(&dom, 1 << 30);
    let mut t2 = tx(&dom, 1 << 30);
    let pa = PhysAddr(0x8000_0000);
    dom.link(&mut t1, pa, 0, 4096, RW, MapAttrs::empty())
        .unwrap();
    dom.link(&mut t2, pa, 0, 4096, RW, MapAttrs::empty())
        .unwrap();
    dom.sync(&mut q).unwrap();
    let with_both = mem.blocks_out();
    dom.unlink(&mut t1, 0, 4096).unwrap();
    // The shared unlink leaves the emptied tables attached; reclaiming
    // them (the write side) retires them.
    assert_eq!(mem.blocks_out(), with_both);
    dom.reclaim_now();
    let iova2 = t2.iova();
    let t2 = core::cell::RefCell::new(t2);
    let mut q = {
        let mut during = Interleaved {
            inner: q.clone(),
            during: Some(Box::new(|| {
                // Another CPU, while this sync waits: the lock is free (a lock
                // held across the wait would deadlock here), and what it
                // retires is not covered by the completion being waited for.
                dom.unlink(&mut t2.borrow_mut(), 0, 4096).unwrap();
                dom.reclaim_now();
                assert_eq!(dom.with(|d| d.translate(iova2)), None);
            })),
        };
        dom.sync(&mut during).unwrap();
        during.inner
    };
    // t1's tables were retired before the completion was queued: they went
    // back. t2's were retired after: they wait for the next sync.
    let kept = dom.with(|d| d.page_table().unwrap().retired_pages());
    assert!(kept > 0);
    let after_first = mem.blocks_out();
    // (t1 emptied its leaf and level-2 tables; t2 the same. The level-1
    // table the two shared, a child of the root, stays attached: see
    // `IoPageTable`'s kept tables.)
    assert_eq!((with_both - after_first, kept), (2, 2));
    dom.sync(&mut q).unwrap();
    assert_eq!(mem.blocks_out(), after_first - kept);
    assert_eq!(dom.with(|d| d.page_table().unwrap().retired_pages()), 0);
    dom.free(t1).unwrap();
    dom.free(t2.into_inner()).unwrap();
}

#[test]
fn a_failed_shared_sync_frees_nothing_and_the_next_invalidates_the_domain() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 1 << 30);
    link_page(&dom, &mut t, 0x8000_0000, 0);
    dom.sync(&mut q).unwrap();
    let before = mem.blocks_out();
    dom.unlink(&mut t, 0, 4096).unwrap();
    dom.reclaim_now();
    q.armed_error = Some(BackendError::QueueError { code: 1, index: 0 });
    assert!(dom.sync(&mut q).is_err());
    assert_eq!(mem.blocks_out(), before);
    assert!(dom.has_pending());
    let whole = q.domain_invalidations;
    dom.sync(&mut q).unwrap();
    assert_eq!(q.domain_invalidations, whole + 1);
    assert!(mem.blocks_out() < before);
    dom.free(t).unwrap();
}

/// A CPU handle that runs `during` (another CPU's work) while it waits.
struct DuringWait<'a, B> {
    inner: B,
    during: Option<Box<dyn FnOnce() + 'a>>,
}

impl<B: IommuBackend> IommuBackend for DuringWait<'_, B> {
    fn attach(&mut self, dev: crate::DeviceId, how: crate::Attachment) -> Result<(), BackendError> {
        self.inner.attach(dev, how)
    }
    fn invalidate(
        &mut self,
        d: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf: bool,
    ) -> Result<(), BackendError> {
        self.inner.invalidate(d, iova, len, leaf)
    }
    fn invalidate_domain(&mut self, d: &DomainInfo) -> Result<(), BackendError> {
        self.inner.invalidate_domain(d)
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        self.inner.sync()
    }
}

impl<B: SplitSync> SplitSync for DuringWait<'_, B> {
    fn submit(&mut self) -> Result<u64, BackendError> {
        self.inner.submit()
    }
    fn queue_and_submit(
        &mut self,
        queue: &mut dyn FnMut(&mut dyn IommuBackend) -> Result<bool, BackendError>,
    ) -> Result<Option<u64>, BackendError> {
        self.inner.queue_and_submit(queue)
    }
    fn wait(&mut self, ticket: u64) -> Result<(), BackendError> {
        if let Some(f) = self.during.take() {
            f();
        }
        self.inner.wait(ticket)
    }
}

/// CPU A unlinks; CPU B's sync takes A's range and waits for its
/// completion; A's own sync, begun while B waits, finds nothing left to
/// queue but must still not return before that completion: A may reuse
/// the unlinked memory as soon as its sync returns.
#[test]
fn a_sync_that_finds_nothing_waits_for_the_completion_that_took_its_ranges() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let iommu = SharedIommu::new(FakeQueue::new(1), drain);
    let mut a = iommu.cpu();
    let mut t = tx(&dom, 2 * 4096);
    dom.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        8192,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    dom.sync(&mut a).unwrap();
    // One page of two: no table empties, nothing is retired.
    dom.unlink(&mut t, 0, 4096).unwrap();
    let mut b = DuringWait {
        inner: iommu.cpu(),
        during: Some(Box::new(|| {
            dom.sync(&mut a).unwrap();
            let (queued, consumed) = iommu.with(|q| (q.queued, q.consumed));
            assert_eq!(consumed, queued, "A's sync returned before B's completion");
        })),
    };
    dom.sync(&mut b).unwrap();
    dom.free(t).unwrap();
}

/// Tables the shared path attached are counted; a write-side call that
/// detaches them (here the plain `Domain::unlink` through `with`) must
/// see them counted first (it used to subtract from a count that did not
/// hold them yet).
#[test]
fn the_write_side_counts_tables_the_shared_path_attached_before_detaching_them() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 4096);
    link_page(&dom, &mut t, 0x8000_0000, 0);
    // The first write-side call: it detaches the leaf and level-2 tables
    // (the root's child stays: `kept_height`).
    dom.with(|d| d.unlink(&mut t, 0, 4096)).unwrap();
    let pt = |d: &mut Domain<ArmStage1, &HostMemory>| {
        let p = d.page_table().unwrap();
        (p.table_pages(), p.retired_pages())
    };
    assert_eq!(dom.with(pt), (2, 2));
    dom.sync(&mut q).unwrap();
    assert_eq!(dom.with(pt), (2, 0));
    dom.free(t).unwrap();
}

#[test]
fn tables_whose_hints_a_full_list_dropped_are_swept_by_the_reclaim() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 64 << 21);
    let before = mem.blocks_out();
    // One page in each of 20 2 MiB regions: 20 leaf tables under one
    // level-1 table, more than a shard's list of empty tables holds.
    for r in 0..20u64 {
        link_page(&dom, &mut t, 0x8000_0000 + r * 4096, r << 21);
    }
    dom.sync(&mut q).unwrap();
    assert_eq!(mem.blocks_out(), before + 2 + 20);
    for r in 0..20u64 {
        dom.unlink(&mut t, r << 21, 4096).unwrap();
    }
    dom.reclaim_now();
    dom.sync(&mut q).unwrap();
    // Every leaf table and their parent went back after the sync; the
    // root's kept child stays.
    assert_eq!(mem.blocks_out(), before + 1);
    assert_eq!(dom.with(|d| d.page_table().unwrap().retired_pages()), 0);
    dom.free(t).unwrap();
}

/// The per-page link and unlink follow the shard's [`LeafHint`]
/// (`crate::pgtable::LeafHint`) to the last leaf table walked to; a reclaim
/// on the write side detaches that table once it is empty. The next link in
/// the same 2 MiB must walk again (the hint's generation is old) and land
/// in the tables the IOMMU walks — before the detached table went back to
/// the lender and after.
#[test]
fn a_link_after_a_reclaim_does_not_follow_the_hint_into_the_detached_table() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 4096);
    let retired = |d: &mut Domain<ArmStage1, &HostMemory>| d.page_table().unwrap().retired_pages();
    for (round, pa) in [0x8000_0000u64, 0x9000_0000, 0xa000_0000]
        .into_iter()
        .enumerate()
    {
        // A walk: this CPU's hint names the leaf table.
        link_page(&dom, &mut t, pa, 0);
        assert_eq!(dom.translate(t.iova()).map(|x| x.0), Some(PhysAddr(pa)));
        // Through the hint: the leaf table is left empty.
        dom.unlink(&mut t, 0, 4096).unwrap();
        assert_eq!(dom.translate(t.iova()), None);
        dom.reclaim_now();
        assert!(
            dom.with(retired) > 0,
            "round {round}: the tables were reclaimed"
        );
        if round == 1 {
            // Handed back: the hint's table is now the lender's again.
            dom.sync(&mut q).unwrap();
            assert_eq!(dom.with(retired), 0);
        }
    }
    link_page(&dom, &mut t, 0xb000_0000, 0);
    assert_eq!(
        dom.translate(t.iova()).map(|x| x.0),
        Some(PhysAddr(0xb000_0000))
    );
    dom.with(|d| d.page_table().unwrap().check_counts())
        .unwrap();
    dom.unlink(&mut t, 0, 4096).unwrap();
    dom.sync(&mut q).unwrap();
    dom.free(t).unwrap();
}

/// `with` may put another domain in place (its table's detach generation
/// starts where the old one's did): a shard's leaf-table hint must not
/// send the next link into the old table.
#[test]
fn a_domain_put_in_place_through_with_does_not_inherit_the_leaf_hints() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 4096);
    link_page(&dom, &mut t, 0x8000_0000, 0);
    let fresh = Domain::new(ArmStage1, &mem, cfg(1)).unwrap();
    let old = dom.with(|d| core::mem::replace(d, fresh));
    // From the same shard chunk (or, if this call lands on another shard,
    // the same first chunk of the new domain's allocator): `t`'s 2 MiB.
    let mut t2 = tx(&dom, 4096);
    assert_eq!(t2.iova().0 >> 21, t.iova().0 >> 21);
    link_page(&dom, &mut t2, 0x9000_0000, 0);
    assert_eq!(
        dom.translate(t2.iova()).map(|x| x.0),
        Some(PhysAddr(0x9000_0000))
    );
    // The old table is as it was (`t2` may have come from another shard,
    // whose chunk the new domain's allocator handed out again: `t`'s page).
    let old_there = (t2.iova() == t.iova()).then_some(PhysAddr(0x8000_0000));
    assert_eq!(old.translate(t2.iova()).map(|x| x.0), old_there);
    dom.with(|d| d.page_table().unwrap().check_counts())
        .unwrap();
    dom.unlink(&mut t2, 0, 4096).unwrap();
    dom.sync(&mut q).unwrap();
    dom.free(t2).unwrap();
    let mut old = old;
    old.unlink(&mut t, 0, 4096).unwrap();
}

/// A one-way buffer's per-page links (device reads only, or writes only)
/// take the one-page path too, with the descriptor of their own direction:
/// each page translates with the attributes the plain domain gives it.
#[test]
fn per_page_links_of_one_way_buffers_write_their_own_direction() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut plain = Domain::new(ArmStage1, &mem, cfg(2)).unwrap();
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 16 * 4096);
    let mut u = plain
        .try_alloc(16 * 4096, u64::MAX)
        .unwrap()
        .into_iova()
        .unwrap();
    let dirs = [
        DmaDirection::ToDevice,
        DmaDirection::FromDevice,
        DmaDirection::Bidirectional,
    ];
    // Twice round: the second finds the leaf table through the hint.
    for round in 0..2u64 {
        for (i, &dir) in dirs.iter().enumerate() {
            let off = (round * 3 + i as u64) * 4096;
            let pa = PhysAddr(0x8000_0000 + off);
            let at = dom
                .link(&mut t, pa, off, 4096, dir, MapAttrs::empty())
                .unwrap();
            let want = plain
                .link(&mut u, pa, off, 4096, dir, MapAttrs::empty())
                .unwrap();
            let (got_pa, got) = dom.translate(at).unwrap();
            assert_eq!(got_pa, pa);
            assert_eq!(
                Some((pa, got)),
                plain.translate(want),
                "{dir:?}, round {round}"
            );
        }
    }
    // ToDevice is read-only in every format.
    let (_, ro) = dom.translate(DmaAddr(t.iova().0)).unwrap();
    assert!(!ro.contains(MapAttrs::WRITE), "{ro:?}");
    dom.unlink(&mut t, 0, 6 * 4096).unwrap();
    dom.sync(&mut q).unwrap();
    dom.free(t).unwrap();
    plain.unlink(&mut u, 0, 6 * 4096).unwrap();
    plain.destroy(u, &mut q).unwrap();
    plain.teardown(&mut q).map_err(|(_, e)| e).unwrap();
}

/// Runs `f` 32 KiB deeper in this thread's stack: another stack region,
/// which `SharedDomain` takes for another CPU (a shard of its own).
#[inline(never)]
fn as_another_cpu<R>(f: impl FnOnce() -> R) -> R {
    let pad = [0u8; 32 << 10];
    let r = f();
    core::hint::black_box(&pad);
    r
}

/// A transaction from this CPU's shard and one from another CPU's
/// (checked to be in two shards), a page linked in each, synced.
fn here_and_there(
    dom: &SharedDomain<ArmStage1, &HostMemory>,
    q: &mut FakeQueue,
) -> (IovaState, IovaState) {
    let mut here = tx(dom, 1 << 21);
    let mut there = as_another_cpu(|| tx(dom, 1 << 21));
    assert!(
        here.iova().0.abs_diff(there.iova().0) >= 1 << 30,
        "two shards"
    );
    link_page(dom, &mut here, 0x8000_0000, 0);
    link_page(dom, &mut there, 0x8000_1000, 0);
    dom.sync(q).unwrap();
    (here, there)
}

#[test]
fn a_transaction_sync_covers_its_unlinks_wherever_made_and_refuses_another_domains() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let (mut here, mut there) = here_and_there(&dom, &mut q);
    let before = q.invalidations;
    // Both unlinked on this CPU: each range is kept with its transaction.
    dom.unlink(&mut there, 0, 4096).unwrap();
    dom.unlink(&mut here, 0, 4096).unwrap();
    dom.sync_for(&there, &mut q).unwrap();
    assert_eq!(q.invalidations - before, 1, "`there`'s range only");
    dom.sync_for(&here, &mut q).unwrap();
    assert_eq!(q.invalidations - before, 2, "then `here`'s");
    // Nothing is left for the whole domain's sync.
    dom.sync(&mut q).unwrap();
    assert_eq!(q.invalidations - before, 2);
    // A transaction of another domain is refused, nothing queued.
    let mem2 = HostMemory::default();
    let other = SharedDomain::new(Domain::new(ArmStage1, &mem2, cfg(2)).unwrap());
    let foreign = tx(&other, 4096);
    assert!(matches!(
        dom.sync_for(&foreign, &mut q),
        Err(crate::DmaError::WrongDomain { .. })
    ));
    assert_eq!(q.invalidations - before, 2);
    dom.free(here).unwrap();
    dom.free(there).unwrap();
    other.free(foreign).unwrap();
}

/// The count a leaf table's pointer holds (its valid entries).
fn leaf_count<M: crate::mem::TableMemory>(dom: &SharedDomain<ArmStage1, M>, iova: u64) -> u64 {
    use crate::pgtable::PteFormat;
    let d = dom
        .with(|d| d.page_table().unwrap().descriptor_at(DmaAddr(iova), 1))
        .expect("a leaf table");
    (d & ArmStage1::COUNT_MASK) >> ArmStage1::COUNT_SHIFT
}

/// `link_pages` runs on the read side across leaf tables: every page where
/// it belongs, each table's count right, and nothing changed when a page
/// of the list is bad or a page of the range is linked already.
#[test]
fn shared_link_pages_crosses_leaf_tables_all_or_nothing() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    let mut q = FakeQueue::new(1);
    let mut t = tx(&dom, 4 << 20);
    let base = t.iova().0;
    // Four pages, two on each side of the first leaf table's edge.
    let off = (2 << 20) - 2 * 4096;
    let pages = [0x8000_3000u64, 0x8001_0000, 0x9000_0000, 0x8000_1000].map(PhysAddr);
    link_page(&dom, &mut t, 0xa000_0000, off + 3 * 4096);
    let before = t.linked();
    assert_eq!(
        dom.link_pages(&mut t, &pages, off, RW, MapAttrs::empty()),
        Err(crate::error::DmaError::AlreadyLinked {
            iova: DmaAddr(base + off + 3 * 4096)
        })
    );
    let bad = [pages[0], PhysAddr(0x8000_0800)];
    assert!(
        dom.link_pages(&mut t, &bad, off, RW, MapAttrs::empty())
            .is_err()
    );
    assert_eq!(t.linked(), before);
    for k in 0..3 {
        assert_eq!(
            dom.translate(DmaAddr(base + off + k * 4096)),
            None,
            "page {k}"
        );
    }
    dom.unlink(&mut t, off + 3 * 4096, 4096).unwrap();
    let at = dom.link_pages(&mut t, &pages, off, RW, MapAttrs::empty());
    assert_eq!(at, Ok(DmaAddr(base + off)));
    assert_eq!(t.linked(), 4 * 4096);
    for (k, p) in pages.iter().enumerate() {
        let iova = DmaAddr(base + off + k as u64 * 4096);
        assert_eq!(dom.translate(iova).map(|(pa, _)| pa), Some(*p), "page {k}");
    }
    assert_eq!(leaf_count(&dom, base), 2);
    assert_eq!(leaf_count(&dom, base + (2 << 20)), 2);
    dom.sync(&mut q).unwrap();
    dom.destroy(t, &mut q).unwrap();
}

/// A lender that lends `left` more pages, then none.
struct Budget<'a> {
    mem: &'a HostMemory,
    left: core::cell::Cell<usize>,
}

// SAFETY: `HostMemory`'s pages, handed on as they are.
unsafe impl crate::mem::TableMemory for Budget<'_> {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let left = self.left.get().checked_sub(pages)?;
        self.left.set(left);
        self.mem.alloc_zeroed(pages)
    }

    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.mem.free(pa, pages) }
    }

    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.mem.phys_to_virt(pa)
    }
}

/// A `link_pages` on the read side that runs out of table pages half way
/// takes back the entries it wrote (the first leaf table's count as it
/// was, no translation left) and has the range invalidated at the next
/// sync: a walker may have cached them meanwhile.
#[test]
fn shared_link_pages_out_of_tables_takes_back_what_it_wrote() {
    let host = HostMemory::default();
    let mem = Budget {
        mem: &host,
        left: core::cell::Cell::new(usize::MAX),
    };
    let dom = SharedDomain::new(Domain::new(ArmStage1, &mem, cfg(1)).unwrap());
    let mut q = FakeQueue::new(1);
    let mut t = dom
        .try_alloc(4 << 20, u64::MAX)
        .unwrap()
        .into_iova()
        .unwrap();
    let base = t.iova().0;
    dom.link(
        &mut t,
        PhysAddr(0xa000_0000),
        0,
        4096,
        RW,
        MapAttrs::empty(),
    )
    .unwrap();
    dom.sync(&mut q).unwrap();
    let invalidations = q.invalidations;
    // The first leaf table exists, the second needs a page: none left.
    mem.left.set(0);
    let off = (2 << 20) - 2 * 4096;
    let pages = [0x8000_3000u64, 0x8001_0000, 0x9000_0000].map(PhysAddr);
    assert_eq!(
        dom.link_pages(&mut t, &pages, off, RW, MapAttrs::empty()),
        Err(crate::error::DmaError::OutOfMemory)
    );
    assert_eq!(t.linked(), 4096);
    for k in 0..3 {
        assert_eq!(
            dom.translate(DmaAddr(base + off + k * 4096)),
            None,
            "page {k}"
        );
    }
    assert_eq!(leaf_count(&dom, base), 1);
    dom.sync(&mut q).unwrap();
    assert!(
        q.invalidations > invalidations,
        "the taken-back range invalidated"
    );
    mem.left.set(usize::MAX);
    dom.link_pages(&mut t, &pages, off, RW, MapAttrs::empty())
        .unwrap();
    assert_eq!(
        dom.translate(DmaAddr(base + off + 2 * 4096))
            .map(|(p, _)| p),
        Some(pages[2])
    );
    dom.destroy(t, &mut q).unwrap();
}

std::thread_local! {
    /// The CPU index `cpu_index` reports on this thread.
    static CPU: core::cell::Cell<usize> = const { core::cell::Cell::new(0) };
}

fn cpu_index() -> usize {
    CPU.with(|c| c.get())
}

#[test]
fn a_given_cpu_index_picks_the_shard_wherever_the_stack_is() {
    let mem = HostMemory::default();
    let dom =
        SharedDomain::with_cpu_index(Domain::new(ArmStage1, &mem, cfg(1)).unwrap(), cpu_index);
    let on = |cpu: usize, deeper: bool| {
        CPU.with(|c| c.set(cpu));
        if deeper {
            as_another_cpu(|| tx(&dom, 1 << 21))
        } else {
            tx(&dom, 1 << 21)
        }
    };
    let a = on(0, false);
    // CPU 0 deeper in its stack (a region `new` takes for another CPU):
    // still CPU 0's shard. CPU 4 shares it too (four shards).
    let b = on(0, true);
    let c = on(4, false);
    // CPUs 1 and 2: shards of their own.
    let d = on(1, false);
    let e = on(2, true);
    let near = |x: &IovaState, y: &IovaState| x.iova().0.abs_diff(y.iova().0) < 1 << 30;
    assert!(
        near(&a, &b) && near(&a, &c),
        "CPU 0's shard: {:?}",
        [&a, &b, &c].map(|t| t.iova())
    );
    assert!(
        !near(&a, &d) && !near(&a, &e) && !near(&d, &e),
        "three shards"
    );
    for t in [a, b, c, d, e] {
        dom.free(t).map_err(|(_, e)| e).unwrap();
    }
}

#[test]
fn a_domain_sync_covers_another_cpus_unlinks_before_it_returns() {
    let mem = HostMemory::default();
    let dom = domain(&mem);
    // Completions take several looks: a sync that returns waited.
    let mut q = FakeQueue::new(1);
    let (mut here, mut there) = here_and_there(&dom, &mut q);
    // Another CPU unlinks a page of its transaction (its shard's side);
    // this CPU unlinks one of its own and syncs the whole domain.
    as_another_cpu(|| dom.unlink(&mut there, 0, 4096)).unwrap();
    dom.unlink(&mut here, 0, 4096).unwrap();
    let ranges = q.invalidations;
    dom.sync(&mut q).unwrap();
    assert_eq!(
        q.invalidations - ranges,
        2,
        "both ranges, the other CPU's too"
    );
    assert_eq!(
        q.consumed, q.queued,
        "the sync returned before its completion"
    );
    assert!(!dom.has_pending());
    // Nothing is left for the other CPU's own sync.
    as_another_cpu(|| dom.sync_for(&there, &mut q)).unwrap();
    assert_eq!(q.invalidations - ranges, 2);
    dom.free(here).unwrap();
    dom.free(there).unwrap();
}
