//! Model tests of the shared driver wrapper (`bare_iommu::shared`) under
//! loom, which runs every interleaving of the threads' atomic operations:
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" cargo test --release --test loom
//! ```
//!
//! (`cargo xtask loom` runs the same.) Without `--cfg loom` this file is
//! empty.
#![cfg(loom)]

use bare_iommu::PhysAddr;
use bare_iommu::addr::DmaAddr;
use bare_iommu::backend::{DomainInfo, IommuBackend, TableFormat};
use bare_iommu::error::BackendError;
use bare_iommu::shared::SharedIommu;
use bare_iommu::testing::split::FakeQueue;
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
