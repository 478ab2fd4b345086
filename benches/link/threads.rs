//! `bench: shared threads ...`: one `SharedDomain` used by 1 and by 2
//! threads, each running whole transactions on its own IOVA ranges
//! (try_alloc, link 16 pages one call each, `sync_for`, unlink, destroy;
//! and once more with the domain-wide `sync` in their place) through its
//! own handle on one `SharedIommu` (a fake queue: the IOMMU costs nothing
//! here). Each thread tells the domain its CPU index, as a hypervisor
//! would from a per-CPU variable (`SharedDomain::with_cpu_index`). The
//! ratio is the 2-thread throughput over the 1-thread throughput for the
//! same total work (2.0 would be perfect scaling).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::time::Instant;

use bare_iommu::pgtable::arm::ArmStage1;
use bare_iommu::shared::{SharedDomain, SharedIommu};
use bare_iommu::testing::split::FakeQueue;
use bare_iommu::{DmaDirection, Domain, DomainConfig, MapAttrs, PhysAddr, TableMemory};

struct Heap;

fn layout(pages: usize) -> Layout {
    Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).unwrap()
}

// SAFETY: zeroed, size-aligned heap blocks, valid until freed; the pointer
// is the physical address.
unsafe impl TableMemory for Heap {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        if pages == 0 {
            return None;
        }
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout(pages)) };
        (!p.is_null()).then_some(PhysAddr(p as u64))
    }
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(pa.0 as *mut u8, layout(pages)) }
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as *mut u8
    }
}

const PAGES: u64 = 16;

thread_local! {
    /// This thread's CPU index (`cpu_index`), set as it starts its
    /// transactions.
    static CPU: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// What a hypervisor reads from a per-CPU variable: which CPU runs.
fn cpu_index() -> usize {
    CPU.with(|c| c.get())
}

/// How a thread's shard is found.
#[derive(Clone, Copy)]
enum Hint {
    /// The thread's CPU index (`SharedDomain::with_cpu_index`).
    Index,
    /// Its stack region (`SharedDomain::new`).
    Stack,
}

/// A shared domain with tag `id`.
fn shared(heap: &Heap, id: u16, hint: Hint) -> SharedDomain<ArmStage1, &Heap> {
    let d = Domain::new(ArmStage1, heap, cfg(id)).unwrap();
    match hint {
        Hint::Index => SharedDomain::with_cpu_index(d, cpu_index),
        Hint::Stack => SharedDomain::new(d),
    }
}

/// A 4-level domain with tag `id` whose aperture (1 MiB to 1 TiB) gives
/// every CPU an IOVA shard of its own.
fn cfg(id: u16) -> DomainConfig {
    DomainConfig {
        id,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end: 1 << 40,
        coherent_walk: true,
    }
}

/// Which sync the transactions call.
#[derive(Clone, Copy)]
enum Syncs {
    /// `sync_for(tx)` after the links, `destroy` at the end: the sync
    /// words of the transaction's shard (and the domain-wide one) only.
    Transaction,
    /// `sync()` after the links, `free` then `sync()` at the end: every
    /// shard's word.
    Domain,
}

fn transactions(
    dom: &SharedDomain<ArmStage1, &Heap>,
    iommu: &SharedIommu<FakeQueue>,
    n: u64,
    id: u64,
    sync: Syncs,
) {
    CPU.with(|c| c.set(id as usize));
    let mut h = iommu.cpu();
    for i in 0..n {
        let mut tx = dom
            .try_alloc(PAGES * 4096, u64::MAX)
            .unwrap()
            .into_iova()
            .unwrap();
        let base = 0x1_0000_0000 + (id << 32) + (i % 1024) * PAGES * 4096;
        for p in 0..PAGES {
            let pa = PhysAddr(base + p * 4096);
            dom.link(
                &mut tx,
                pa,
                p * 4096,
                4096,
                DmaDirection::ToDevice,
                MapAttrs::empty(),
            )
            .unwrap();
        }
        match sync {
            Syncs::Transaction => {
                dom.sync_for(&tx, &mut h).unwrap();
                dom.unlink(&mut tx, 0, PAGES * 4096).unwrap();
                dom.destroy(tx, &mut h).unwrap();
            }
            Syncs::Domain => {
                dom.sync(&mut h).unwrap();
                dom.unlink(&mut tx, 0, PAGES * 4096).unwrap();
                dom.free(tx).map_err(|(_, e)| e).unwrap();
                dom.sync(&mut h).unwrap();
            }
        }
    }
}

/// Nanoseconds per transaction with `threads` threads sharing `total`
/// (each thread on a domain and queue of its own with `separate`: the
/// scaling the machine itself allows now, shared by other work).
fn run(total: u64, threads: u64, sync: Syncs) -> f64 {
    run_on(total, threads, false, sync, Hint::Index)
}

/// Nanoseconds per transaction with 2 threads, each on a `SharedDomain` of
/// its own, both on one `SharedIommu` (what the shared command queue
/// costs when the domain is not shared).
fn run_two_domains(total: u64) -> f64 {
    let heap = Heap;
    let doms = [1, 2].map(|id| shared(&heap, id, Hint::Index));
    let iommu = SharedIommu::new(FakeQueue::new(u64::MAX), |_| {});
    for d in &doms {
        transactions(d, &iommu, 16, 0, Syncs::Transaction);
    }
    let start = Instant::now();
    std::thread::scope(|s| {
        for (id, dom) in doms.iter().enumerate() {
            let iommu = &iommu;
            s.spawn(move || transactions(dom, iommu, total / 2, id as u64, Syncs::Transaction));
        }
    });
    let ns = start.elapsed().as_nanos() as f64 / total as f64;
    let mut h = iommu.cpu();
    for d in doms {
        d.into_inner().teardown(&mut h).map_err(|(_, e)| e).unwrap();
    }
    ns
}

fn run_on(total: u64, threads: u64, separate: bool, sync: Syncs, hint: Hint) -> f64 {
    if separate {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(move || run_on(total / threads, 1, false, sync, hint));
            }
        });
        return start.elapsed().as_nanos() as f64 / total as f64;
    }
    let heap = Heap;
    let dom = shared(&heap, 1, hint);
    let iommu = SharedIommu::new(FakeQueue::new(u64::MAX), |_| {});
    // Warm the tables once.
    transactions(&dom, &iommu, 16, 0, sync);
    let start = Instant::now();
    std::thread::scope(|s| {
        for id in 0..threads {
            let (dom, iommu) = (&dom, &iommu);
            s.spawn(move || transactions(dom, iommu, total / threads, id, sync));
        }
    });
    let ns = start.elapsed().as_nanos() as f64 / total as f64;
    let mut h = iommu.cpu();
    dom.into_inner()
        .teardown(&mut h)
        .map_err(|(_, e)| e)
        .unwrap();
    ns
}

/// The `bench: shared threads ...` line (median of `samples` pairs).
pub fn line(total: u64, samples: usize) -> String {
    let [mut one, mut two, mut one_d, mut two_d, mut two_s] = [(); 5].map(|_| Vec::new());
    for _ in 0..samples {
        one.push(run(total, 1, Syncs::Transaction));
        two.push(run(total, 2, Syncs::Transaction));
        two_s.push(run_on(total, 2, false, Syncs::Transaction, Hint::Stack));
        one_d.push(run(total, 1, Syncs::Domain));
        two_d.push(run(total, 2, Syncs::Domain));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each sample's own ratio (its 1-thread and 2-thread runs were made
    // one after the other): the spread of the line on this machine.
    let spread = |one: &[f64], two: &[f64]| {
        let r: Vec<f64> = one.iter().zip(two).map(|(a, b)| a / b).collect();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}-{hi:.2}")
    };
    let (sp, sp_d, sp_s) = (
        spread(&one, &two),
        spread(&one_d, &two_d),
        spread(&one, &two_s),
    );
    let bs = med(&mut two_s);
    let (a, b) = (med(&mut one), med(&mut two));
    let (ad, bd) = (med(&mut one_d), med(&mut two_d));
    let apart = run_on(total, 2, true, Syncs::Transaction, Hint::Index);
    let one_iommu = run_two_domains(total);
    format!(
        "bench: shared threads s1 txn-{PAGES}-pages (disjoint transactions, one SharedDomain, \
         sync_for + destroy): 1 thread={a:.0} ns/txn 2 threads={b:.0} ns/txn ratio={:.2} \
         (samples {sp}; link/unlink on the read side: tables by compare-and-swap, one IOVA shard \
         per thread, each thread's CPU index given (with_cpu_index); with SharedDomain::new's \
         stack-region hint instead: 2 threads={bs:.0} ns/txn ratio={:.2} (samples {sp_s}); with \
         the domain-wide sync() instead: 1 thread={ad:.0} 2 threads={bd:.0} ns/txn ratio={:.2} \
         (samples {sp_d}); \
         2 threads on 2 domains of one SharedIommu={one_iommu:.0} ns/txn: ratio={:.2}; \
         2 threads on 2 separate domains and drivers={apart:.0} ns/txn: the machine's own ratio={:.2} now)",
        a / b,
        a / bs,
        ad / bd,
        a / one_iommu,
        a / apart
    )
}
