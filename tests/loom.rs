//! Model tests of the shared wrappers (`bare_iommu::shared`) under loom,
//! which runs every interleaving of the threads' atomic operations (within
//! the preemption bound) and every value a weak load may return: the
//! driver wrapper, and the shared-access path of a domain (tables installed
//! by compare-and-swap, atomic counts, the reclaim's exclusion, the sync
//! that finds nothing):
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" cargo test --release --test loom
//! ```
//!
//! (`cargo xtask loom` runs the same.) Without `--cfg loom` this file is
//! empty. A whole `SharedDomain` with its write side racing readers is
//! tested under shuttle instead (`tests/shuttle.rs`): loom 0.7 stops on
//! its own `VersionVec` assertion on that shape (tokio-rs/loom#252).
#![cfg(loom)]

mod common;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bare_iommu::addr::DmaAddr;
use bare_iommu::backend::{DomainInfo, IommuBackend, TableFormat};
use bare_iommu::error::BackendError;
use bare_iommu::pgtable::arm::ArmStage1;
use bare_iommu::shared::SharedDomain;
use bare_iommu::shared::SharedIommu;
use bare_iommu::testing::split::FakeQueue;
use bare_iommu::{DmaDirection, IovaState, MapAttrs, PhysAddr, TableMemory};
use loom::sync::Arc;
use loom::thread;

fn info() -> DomainInfo {
    DomainInfo {
        id: 1,
        root: PhysAddr(0x1000),
        format: TableFormat::ArmStage1,
        levels: 4,
        ias_bits: 48,
    }
}

/// Every interleaving with at most two preemptions (loom's advice: bugs
/// need few), so the run stays in seconds.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.check(f);
}

/// Loom threads run on small stacks; a `SharedDomain` holds its IOVA
/// shards inline (tens of KiB).
const STACK: usize = 4 << 20;

fn spawn_big<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new().stack_size(STACK).spawn(f).unwrap()
}

/// [`model`] with the body on a big stack.
fn model_big(f: impl Fn() + Sync + Send + 'static) {
    let f = std::sync::Arc::new(f);
    model(move || {
        let f = f.clone();
        spawn_big(move || f()).join().unwrap();
    });
}

fn drain(q: &mut FakeQueue) {
    q.drain_irq();
}

fn shared(speed: u64) -> Arc<SharedIommu<FakeQueue>> {
    let mut q = FakeQueue::new(speed);
    q.budget = 20;
    Arc::new(SharedIommu::new(q, drain))
}

/// An interrupt racing a CPU that queues and syncs: whichever way they
/// interleave, the interrupt's work is done exactly once (by the handler,
/// or by the lock holder it deferred to) and nothing deadlocks.
#[test]
fn loom_an_interrupt_during_a_sync_is_handled_once_and_never_deadlocks() {
    model(|| {
        let s = shared(1);
        let cpu = {
            let s = s.clone();
            thread::spawn(move || {
                let mut h = s.cpu();
                h.invalidate(&info(), DmaAddr(0x1000), 0x1000, true)
                    .unwrap();
                h.sync().unwrap();
            })
        };
        // The interrupt: the hardware raised work, then the handler runs.
        s.with(|q| q.irq_raised += 1);
        let _ = s.handle_irq(FakeQueue::drain_irq);
        cpu.join().unwrap();
        let (raised, drained) = s.with(|q| (q.irq_raised, q.irq_drained));
        assert_eq!((raised, drained), (0, 1));
    });
}

/// Two CPUs queue and sync at once: both syncs succeed, and never more
/// completions are submitted than syncs (one may serve both).
#[test]
fn loom_two_cpus_sync_and_one_completion_may_serve_both() {
    model(|| {
        let s = shared(2);
        let threads: Vec<_> = (0..2u64)
            .map(|i| {
                let s = s.clone();
                thread::spawn(move || {
                    let mut h = s.cpu();
                    h.invalidate(&info(), DmaAddr(0x1000 << i), 0x1000, true)
                        .unwrap();
                    h.sync().unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let (completions, invalidations) = s.with(|q| (q.completions, q.invalidations));
        assert_eq!(invalidations, 2);
        assert!((1..=2).contains(&completions), "{completions}");
    });
}

/// A queue error met by one CPU reaches the other CPU's sync when their
/// windows overlap, and is never lost: at least one of them returns it.
#[test]
fn loom_a_queue_error_is_reported_by_at_least_the_cpu_that_met_it() {
    let stop = BackendError::QueueError { code: 1, index: 3 };
    model(move || {
        let s = shared(2);
        s.with(|q| q.armed_error = Some(stop));
        let threads: Vec<_> = (0..2u64)
            .map(|i| {
                let s = s.clone();
                thread::spawn(move || {
                    let mut h = s.cpu();
                    h.invalidate(&info(), DmaAddr(0x1000 << i), 0x1000, true)
                        .unwrap();
                    h.sync()
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results.contains(&Err(stop)), "{results:?}");
        for r in &results {
            assert!(r.is_ok() || *r == Err(stop), "{r:?}");
        }
    });
}

/// A heap lender for the domain models: counts the pages out, and keeps
/// freed pages until it is dropped, so that no address is reused within
/// one model run (the loom stand-ins of table words are kept by address).
#[derive(Default)]
struct Heap {
    out: AtomicUsize,
    freed: Mutex<Vec<u64>>,
}

fn page() -> Layout {
    Layout::from_size_align(4096, 4096).unwrap()
}

// SAFETY: zeroed, page-aligned heap pages, valid until the lender is
// dropped; the pointer is the physical address.
unsafe impl TableMemory for Heap {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        assert_eq!(pages, 1);
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(page()) };
        self.out.fetch_add(1, Ordering::SeqCst);
        bare_iommu::shared::loom_page(p);
        Some(PhysAddr(p as u64))
    }
    unsafe fn free(&self, pa: PhysAddr, _pages: usize) {
        self.out.fetch_sub(1, Ordering::SeqCst);
        self.freed.lock().unwrap().push(pa.0);
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as *mut u8
    }
}

impl Drop for Heap {
    fn drop(&mut self) {
        for p in self.freed.get_mut().unwrap().drain(..) {
            // SAFETY: allocated above with this layout, handed back.
            unsafe { dealloc(p as *mut u8, page()) };
        }
    }
}

type Dom = SharedDomain<ArmStage1, &'static Heap>;

/// A fresh 3-level domain (root, one upper level, leaf tables) whose
/// aperture is too small to shard: transactions come from the domain's
/// allocator, side by side in one leaf table.
fn fresh() -> (&'static Heap, Arc<Dom>) {
    bare_iommu::shared::loom_reset();
    let heap: &'static Heap = Box::leak(Box::default());
    (heap, Arc::new(common::one_leaf_table_domain(heap)))
}

fn one_page(dom: &Dom) -> IovaState {
    dom.try_alloc(4096, u64::MAX).unwrap().into_iova().unwrap()
}

fn link(dom: &Dom, tx: &mut IovaState, pa: u64) {
    dom.link(
        tx,
        PhysAddr(pa),
        0,
        4096,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .unwrap();
}

/// Every page lent is attached or back with the lender, and every table's
/// count matches a scan of it.
fn check_pages_and_counts(heap: &Heap, dom: &Dom) {
    let (tables, retired) = dom.with(|d| {
        let pt = d.page_table().unwrap();
        pt.check_counts().expect("counts match a scan");
        (pt.table_pages(), pt.retired_pages())
    });
    assert_eq!(heap.out.load(Ordering::SeqCst), tables + retired);
}

/// Two CPUs link a page each into the same, not yet existing, upper and
/// leaf tables: each install is raced by compare-and-swap. Whoever wins,
/// both pages translate, exactly one table per level is attached (the
/// loser's page went back at once), and the counts are right.
#[test]
fn loom_two_cpus_install_the_same_tables_and_the_loser_gives_its_pages_back() {
    model_big(|| {
        let (heap, dom) = fresh();
        let mut a = one_page(&dom);
        let mut b = one_page(&dom);
        let (ia, ib) = (a.iova(), b.iova());
        let t = {
            let dom = dom.clone();
            spawn_big(move || {
                link(&dom, &mut a, 0x8000_0000);
                a
            })
        };
        link(&dom, &mut b, 0x9000_0000);
        let a = t.join().unwrap();
        assert_eq!(dom.translate(ia).map(|t| t.0), Some(PhysAddr(0x8000_0000)));
        assert_eq!(dom.translate(ib).map(|t| t.0), Some(PhysAddr(0x9000_0000)));
        // Root, one upper table, one leaf table.
        assert_eq!(
            dom.with(|d| d.page_table().map(|p| p.table_pages())),
            Some(3)
        );
        check_pages_and_counts(heap, &dom);
        dom.free(a).unwrap();
        dom.free(b).unwrap();
    });
}

/// One CPU unlinks its page while another links its own into the same
/// leaf table: the count, changed by both at once, ends right.
#[test]
fn loom_link_and_unlink_of_disjoint_pages_in_one_table_keep_its_count() {
    model_big(|| {
        let (heap, dom) = fresh();
        let mut a = one_page(&dom);
        let mut b = one_page(&dom);
        link(&dom, &mut a, 0x8000_0000);
        let (ia, ib) = (a.iova(), b.iova());
        let t = {
            let dom = dom.clone();
            spawn_big(move || {
                dom.unlink(&mut a, 0, 4096).unwrap();
                a
            })
        };
        link(&dom, &mut b, 0x9000_0000);
        let a = t.join().unwrap();
        assert_eq!(dom.translate(ia), None);
        assert_eq!(dom.translate(ib).map(|t| t.0), Some(PhysAddr(0x9000_0000)));
        check_pages_and_counts(heap, &dom);
        dom.free(a).unwrap();
        dom.free(b).unwrap();
    });
}

/// A shard's leaf-table hint (`LeafHint`, a seqlock over four words) may
/// be filled by two CPUs at once (a shard is only a hint) while a third
/// reads it: a reader gets a whole entry one CPU wrote (leaf table and
/// count slot of the region asked for) or nothing, never words of two
/// entries, nor an entry of another generation; one fill at least lands.
#[test]
fn loom_a_leaf_hint_two_cpus_fill_at_once_is_never_read_torn() {
    model(|| {
        let h = Arc::new(bare_iommu::shared::LoomLeafHint::new());
        let fills: Vec<_> = (1..=2u64)
            .map(|i| {
                let h = h.clone();
                thread::spawn(move || h.put(i, 7, i << 12, i << 3))
            })
            .collect();
        for i in 1..=2u64 {
            if let Some(e) = h.get(i, 7) {
                assert_eq!(e, (i << 12, i << 3));
            }
        }
        assert_eq!(h.get(1, 8), None);
        for f in fills {
            f.join().unwrap();
        }
        assert!(h.get(1, 7).is_some() || h.get(2, 7).is_some());
    });
}

/// The reclaim's exclusion: the domain lock (reader counts in per-shard
/// slots, `SharedDomain`'s read side for links and unlinks, its write side
/// for the reclaim of emptied tables) never lets the write side in while a
/// reader of any slot is inside, nor a reader in while the write side
/// runs: loom checks every access to the guarded cell for a data race.
/// Two CPUs enter the read side on their own slots, a third tries the
/// write side as the reclaim in `SharedDomain::sync` does.
#[test]
fn loom_the_reclaim_side_of_the_domain_lock_excludes_every_reader() {
    reclaim_side_excludes_readers([0, 1]);
}

/// The same with both readers in one slot: one holds its solo word, the
/// other counts itself in the slot, and the write side must exclude both.
#[test]
fn loom_the_reclaim_side_excludes_a_solo_and_a_counted_reader_of_one_slot() {
    reclaim_side_excludes_readers([0, 0]);
}

fn reclaim_side_excludes_readers(slots: [usize; 2]) {
    model(move || {
        let l = Arc::new(bare_iommu::shared::LoomRwCell::new(0));
        let readers: Vec<_> = slots
            .into_iter()
            .map(|slot| {
                let l = l.clone();
                thread::spawn(move || l.try_read_twice(slot))
            })
            .collect();
        let wrote = l.try_write_add(1);
        for r in readers {
            if let Some((a, b)) = r.join().unwrap() {
                assert_eq!(a, b);
            }
        }
        assert_eq!(
            l.try_read_twice(0),
            Some((u64::from(wrote), u64::from(wrote)))
        );
    });
}

/// CPU A unlinks a page and syncs; CPU B syncs at the same time and may
/// take A's range: however they interleave, A's sync returns only once the
/// invalidation of its range was consumed by the "hardware" (A may reuse
/// the memory then).
#[test]
fn loom_a_sync_returns_only_after_a_completion_covering_its_unlinks() {
    sync_covers_unlinks(false);
}

/// The same on a domain whose aperture gives each CPU a shard, A syncing
/// its transaction (`sync_for`) while B syncs the whole domain.
#[test]
fn loom_a_transaction_sync_returns_only_after_a_completion_covering_its_unlinks() {
    sync_covers_unlinks(true);
}

fn sync_covers_unlinks(per_tx: bool) {
    model_big(move || {
        let (_heap, dom) = if per_tx {
            bare_iommu::shared::loom_reset();
            let heap: &'static Heap = Box::leak(Box::default());
            (heap, Arc::new(common::shared_domain(heap, 64 << 20)))
        } else {
            fresh()
        };
        let s = shared(1);
        let mut a = dom.try_alloc(8192, u64::MAX).unwrap().into_iova().unwrap();
        dom.link(
            &mut a,
            PhysAddr(0x8000_0000),
            0,
            8192,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
        )
        .unwrap();
        let mut h = s.cpu();
        dom.sync(&mut h).unwrap();
        let t = {
            let (dom, s) = (dom.clone(), s.clone());
            spawn_big(move || {
                let mut h = s.cpu();
                dom.sync(&mut h).unwrap();
            })
        };
        // One page of two: the leaf table stays, nothing is retired.
        dom.unlink(&mut a, 0, 4096).unwrap();
        if per_tx {
            dom.sync_for(&a, &mut h).unwrap();
        } else {
            dom.sync(&mut h).unwrap();
        }
        let (invalidations, consumed) = s.with(|q| (q.invalidations, q.consumed));
        assert_eq!(invalidations, 1);
        assert!(
            consumed >= 1,
            "A's sync returned before its invalidation ran"
        );
        t.join().unwrap();
        dom.free(a).unwrap();
    });
}
