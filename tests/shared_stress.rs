//! Several CPUs on one domain: threads link, unlink (one page or runs, on
//! the shared path: tables installed by compare-and-swap, counts kept
//! atomically), reclaim empty tables, sync, alloc and free their own
//! transactions on one `SharedDomain` through their own handles on one
//! `SharedIommu`, while another thread plays the IOMMU's interrupt.
//! Every step is checked against each thread's model of its transactions
//! (what `translate` must answer, which refusals must change nothing); at
//! the end every table page is back with the lender and every interrupt's
//! work was done exactly once.
//!
//! 10^6 operations in a release build (`cargo xtask stress`), fewer in a
//! debug build; `SHARED_STRESS_OPS` and `SHARED_STRESS_SEED` override.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;

use bare_iommu::pgtable::arm::ArmStage1;
use bare_iommu::shared::{SharedDomain, SharedIommu};
use bare_iommu::testing::split::FakeQueue;
use bare_iommu::{
    DmaAddr, DmaDirection, DmaError, Domain, DomainConfig, IovaState, MapAttrs, PhysAddr,
    TableMemory,
};

/// A heap lender several threads use at once; counts the pages out.
#[derive(Default)]
struct Heap {
    out: AtomicUsize,
}

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
        if p.is_null() {
            return None;
        }
        self.out.fetch_add(pages, Ordering::SeqCst);
        Some(PhysAddr(p as u64))
    }
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        self.out.fetch_sub(pages, Ordering::SeqCst);
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(pa.0 as *mut u8, layout(pages)) }
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as *mut u8
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One thread's transaction and the pages it has linked (offset -> phys).
struct Tx {
    state: IovaState,
    pages: u64,
    linked: BTreeMap<u64, u64>,
    /// First pages of the 2 MiB blocks linked (a 4 MiB transaction's).
    blocks: Vec<u64>,
}

impl Tx {
    /// Whether pages `[off, off + n)` cut a block (an unlink refused).
    fn cuts_block(&self, off: u64, n: u64) -> bool {
        self.blocks
            .iter()
            .any(|&b| off < b + 512 && b < off + n && !(off <= b && b + 512 <= off + n))
    }
}

const THREADS: u64 = 2;
const RW: DmaDirection = DmaDirection::Bidirectional;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn check(dom: &SharedDomain<ArmStage1, &Heap>, tx: &Tx, off: u64) {
    let at = DmaAddr(tx.state.iova().0 + off * 4096 + 0x123);
    let seen = dom.translate(at).map(|(p, _)| p.0);
    let want = tx.linked.get(&off).map(|p| p + 0x123);
    assert_eq!(seen, want, "translate({at:?}) at offset page {off}");
}

#[allow(clippy::too_many_lines)]
fn worker(
    dom: &SharedDomain<ArmStage1, &Heap>,
    iommu: &SharedIommu<FakeQueue>,
    seed: u64,
    ops: u64,
    id: u64,
    big: bool,
) {
    let mut rng = Rng(seed ^ (id + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut h = iommu.cpu();
    let mut txs: Vec<Tx> = Vec::new();
    for _ in 0..ops {
        match rng.below(100) {
            // A new transaction of 1..=16 pages, or (`big`) sometimes of
            // 4 MiB, whose runs may cross a leaf table's edge: those links
            // and unlinks take the write side, and may detach tables the
            // shared path attached.
            0..=9 if txs.len() < 16 => {
                let pages = if big && rng.below(8) == 0 {
                    1024
                } else {
                    1 + rng.below(16)
                };
                let state = dom
                    .try_alloc(pages * 4096, u64::MAX)
                    .expect("try_alloc")
                    .into_iova()
                    .expect("translated");
                txs.push(Tx {
                    state,
                    pages,
                    linked: BTreeMap::new(),
                    blocks: Vec::new(),
                });
            }
            // Link one page (refused, changing nothing, when already linked).
            10..=49 if !txs.is_empty() => {
                let i = rng.below(txs.len() as u64) as usize;
                let tx = &mut txs[i];
                let off = rng.below(tx.pages);
                let phys = 0x1_0000_0000 + (id << 32) + rng.below(1 << 20) * 4096;
                let r = dom.link(
                    &mut tx.state,
                    PhysAddr(phys),
                    off * 4096,
                    4096,
                    RW,
                    MapAttrs::empty(),
                );
                match tx.linked.entry(off) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        assert!(matches!(r, Err(DmaError::AlreadyLinked { .. })), "{r:?}");
                    }
                    std::collections::btree_map::Entry::Vacant(v) => {
                        r.expect("link");
                        v.insert(phys);
                    }
                }
                check(dom, tx, off);
            }
            // Unlink one page (refused, changing nothing, when not linked).
            50..=79 if !txs.is_empty() => {
                let i = rng.below(txs.len() as u64) as usize;
                let tx = &mut txs[i];
                let off = rng.below(tx.pages);
                let r = dom.unlink(&mut tx.state, off * 4096, 4096);
                if tx.cuts_block(off, 1) {
                    assert!(matches!(r, Err(DmaError::PartialBlock { .. })), "{r:?}");
                } else if tx.linked.remove(&off).is_some() {
                    r.expect("unlink");
                } else {
                    assert!(matches!(r, Err(DmaError::NotLinked { .. })), "{r:?}");
                }
                check(dom, tx, off);
                assert_eq!(tx.state.linked(), tx.linked.len() as u64 * 4096);
            }
            // Link 2..=4 pages in one call (within the
            // transaction; refused, changing nothing, when any is linked).
            // A 2 MiB block (contiguous, aligned in IOVA and PA) into a
            // 4 MiB transaction: the read side writes one entry.
            80 if txs.iter().any(|t| t.pages == 1024) => {
                let tx = txs.iter_mut().find(|t| t.pages == 1024).expect("a big one");
                assert_eq!(tx.state.iova().0 % (2 << 20), 0, "aligned transaction");
                let off = 512 * rng.below(2);
                let phys = 0x1_0000_0000 + (id << 32) + rng.below(256) * (2 << 20);
                let r = dom.link(
                    &mut tx.state,
                    PhysAddr(phys),
                    off * 4096,
                    2 << 20,
                    RW,
                    MapAttrs::empty(),
                );
                if (off..off + 512).any(|o| tx.linked.contains_key(&o)) {
                    assert!(matches!(r, Err(DmaError::AlreadyLinked { .. })), "{r:?}");
                } else {
                    r.expect("link block");
                    for k in 0..512 {
                        tx.linked.insert(off + k, phys + k * 4096);
                    }
                    // A block, unless an empty leaf table was left
                    // attached there (pages then go into it, as on the
                    // exclusive path).
                    let at = DmaAddr(tx.state.iova().0 + off * 4096);
                    let height = dom.with(|d| d.page_table().unwrap().translate(at).map(|t| t.2));
                    match height {
                        Some(1) => tx.blocks.push(off),
                        h => assert_eq!(h, Some(0), "a block or pages"),
                    }
                }
                check(dom, tx, off + rng.below(512));
            }
            80..=84 if !txs.is_empty() => {
                let i = rng.below(txs.len() as u64) as usize;
                let tx = &mut txs[i];
                let n = (2 + rng.below(3)).min(tx.pages);
                let off = if tx.pages == 1024 && rng.below(2) == 0 {
                    510 + rng.below(2)
                } else {
                    rng.below(tx.pages - n + 1)
                };
                // A contiguous run, or (half the time) as many scattered
                // pages through `link_pages` (the read side, across a leaf
                // table's edge too).
                let phys: Vec<u64> = if rng.below(2) == 0 {
                    let p = 0x1_0000_0000 + (id << 32) + rng.below(1 << 20) * 4096;
                    (0..n).map(|k| p + k * 4096).collect()
                } else {
                    (0..n)
                        .map(|_| 0x1_0000_0000 + (id << 32) + rng.below(1 << 20) * 4096)
                        .collect()
                };
                let r = if phys.windows(2).all(|w| w[1] == w[0] + 4096) {
                    dom.link(
                        &mut tx.state,
                        PhysAddr(phys[0]),
                        off * 4096,
                        n * 4096,
                        RW,
                        MapAttrs::empty(),
                    )
                } else {
                    let list: Vec<PhysAddr> = phys.iter().map(|&p| PhysAddr(p)).collect();
                    dom.link_pages(&mut tx.state, &list, off * 4096, RW, MapAttrs::empty())
                };
                if (off..off + n).any(|o| tx.linked.contains_key(&o)) {
                    assert!(matches!(r, Err(DmaError::AlreadyLinked { .. })), "{r:?}");
                } else {
                    r.expect("link run");
                    for (k, p) in (0..n).zip(&phys) {
                        tx.linked.insert(off + k, *p);
                    }
                }
                for k in 0..n {
                    check(dom, tx, off + k);
                }
            }
            // Unlink a run of 2..=4 pages (refused, changing nothing,
            // unless every page is linked).
            85..=88 if !txs.is_empty() => {
                let i = rng.below(txs.len() as u64) as usize;
                let tx = &mut txs[i];
                let n = (2 + rng.below(3)).min(tx.pages);
                let off = if tx.pages == 1024 && rng.below(2) == 0 {
                    510 + rng.below(2)
                } else {
                    rng.below(tx.pages - n + 1)
                };
                // Now and then a whole block of a 4 MiB transaction.
                let (off, n) = match tx.blocks.first() {
                    Some(&b) if rng.below(2) == 0 => (b, 512),
                    _ => (off, n),
                };
                let r = dom.unlink(&mut tx.state, off * 4096, n * 4096);
                let all = (off..off + n).all(|o| tx.linked.contains_key(&o));
                if tx.cuts_block(off, n) {
                    // Both refusals apply when pages are missing too.
                    assert!(
                        matches!(r, Err(DmaError::PartialBlock { .. }))
                            || (!all && matches!(r, Err(DmaError::NotLinked { .. }))),
                        "{r:?}"
                    );
                } else if all {
                    assert_eq!(r.expect("unlink run"), n * 4096);
                    for k in 0..n {
                        tx.linked.remove(&(off + k));
                    }
                    tx.blocks.retain(|&b| !(off <= b && b < off + n));
                } else {
                    assert!(matches!(r, Err(DmaError::NotLinked { .. })), "{r:?}");
                }
                for k in 0..n {
                    check(dom, tx, off + k);
                }
                assert_eq!(tx.state.linked(), tx.linked.len() as u64 * 4096);
            }
            // Reclaim the emptied tables now (the write side, waiting for
            // the other CPUs to leave the read side).
            89 => dom.reclaim_now(),
            // Sync the domain (the wait runs outside the domain lock).
            90 => dom.sync(&mut h).expect("sync"),
            // Sync one transaction (its shard's side and the domain-wide one).
            91 if !txs.is_empty() => {
                let i = rng.below(txs.len() as u64) as usize;
                dom.sync_for(&txs[i].state, &mut h).expect("sync_for");
            }
            // Free or destroy a transaction.
            92..=99 if !txs.is_empty() => {
                let i = rng.below(txs.len() as u64) as usize;
                let tx = txs.swap_remove(i);
                if rng.below(2) == 0 {
                    dom.free(tx.state).map_err(|(_, e)| e).expect("free");
                } else {
                    dom.destroy(tx.state, &mut h).expect("destroy");
                }
            }
            // A transaction of another CPU's is not ours to read, but a
            // random page of ours must match the model at any time.
            _ => {
                if let Some(tx) = txs.first() {
                    check(dom, tx, rng.below(tx.pages));
                }
            }
        }
    }
    for tx in txs {
        dom.destroy(tx.state, &mut h).expect("destroy");
    }
    dom.sync(&mut h).expect("final sync");
}

/// Each thread in its own IOVA shard (a chunk of 1 GiB): the common case.
#[test]
fn shared_stress_threads_on_one_domain_match_their_models() {
    stress(1 << 40);
}

/// An aperture too small to shard (8 MiB): every transaction comes from
/// the domain's allocator, the threads' transactions interleave in the
/// same four leaf tables, and every table install races (compare-and-swap
/// against the other thread, reclaims in between).
#[test]
fn shared_stress_threads_sharing_leaf_tables_match_their_models() {
    stress(9 << 20);
}

fn stress(aperture_end: u64) {
    let default_ops = if cfg!(debug_assertions) {
        20_000
    } else {
        1_000_000
    };
    let ops = env("SHARED_STRESS_OPS", default_ops);
    let seed = env("SHARED_STRESS_SEED", 0x5eed_c0de);
    println!(
        "shared stress: {ops} operations over {THREADS} threads, seed {seed:#x}, aperture end {aperture_end:#x}"
    );
    let heap = Heap::default();
    let cfg = DomainConfig {
        id: 1,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end,
        coherent_walk: true,
    };
    let dom = SharedDomain::new(Domain::new(ArmStage1, &heap, cfg).unwrap());
    let iommu = SharedIommu::new(FakeQueue::new(4), |q: &mut FakeQueue| {
        q.drain_irq();
    });
    let done = AtomicBool::new(false);
    let start = std::time::Instant::now();
    let irqs = thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|id| {
                let (dom, iommu) = (&dom, &iommu);
                s.spawn(move || worker(dom, iommu, seed, ops / THREADS, id, aperture_end > 1 << 30))
            })
            .collect();
        let irq = s.spawn(|| {
            let mut raised = 0u64;
            while !done.load(Ordering::SeqCst) {
                iommu.with(|q| q.irq_raised += 1);
                raised += 1;
                let _ = iommu.handle_irq(FakeQueue::drain_irq);
                thread::yield_now();
            }
            raised
        });
        let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        done.store(true, Ordering::SeqCst);
        for j in joined {
            j.unwrap();
        }
        irq.join().unwrap()
    });
    let elapsed = start.elapsed();
    let (drained, left, completions, invalidations) = iommu.with(|q| {
        (
            q.irq_drained,
            q.irq_raised,
            q.completions,
            q.invalidations + q.domain_invalidations,
        )
    });
    println!(
        "shared stress: {:.2?}, {completions} completions for {invalidations} invalidations, {irqs} interrupts",
        elapsed
    );
    assert_eq!(
        (drained, left),
        (irqs, 0),
        "every interrupt's work done once"
    );
    let mut h = iommu.cpu();
    dom.with(|d| d.page_table().unwrap().check_counts())
        .expect("every table's count matches a scan");
    let lent = dom.with(|d| {
        let p = d.page_table().unwrap();
        p.table_pages() + p.retired_pages()
    });
    assert_eq!(
        heap.out.load(Ordering::SeqCst),
        lent,
        "every page lent is attached or retired"
    );
    let dom = dom.into_inner();
    assert!(!dom.has_pending());
    dom.teardown(&mut h).map_err(|(_, e)| e).unwrap();
    assert_eq!(heap.out.load(Ordering::SeqCst), 0, "every table page back");
}

/// The per-page link and unlink follow their shard's leaf-table hint while
/// another thread reclaims the emptied leaf tables and syncs (handing them
/// back to the lender) all the while: each link must land in the tables
/// `translate` walks, never in a table the hint named before a reclaim
/// detached it. (Fails with `--cfg broken_leaf_hint`: the hint's
/// generation not checked.)
#[test]
fn shared_stress_links_through_the_leaf_hint_while_another_thread_reclaims() {
    let rounds = env(
        "SHARED_STRESS_OPS",
        if cfg!(debug_assertions) {
            2_000
        } else {
            50_000
        },
    );
    let heap = Heap::default();
    let cfg = DomainConfig {
        id: 1,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end: 1 << 40,
        coherent_walk: true,
    };
    let dom = SharedDomain::new(Domain::new(ArmStage1, &heap, cfg).unwrap());
    let iommu = SharedIommu::new(FakeQueue::new(1), |q: &mut FakeQueue| {
        q.drain_irq();
    });
    let done = AtomicBool::new(false);
    let reclaims = thread::scope(|s| {
        let reclaimer = s.spawn(|| {
            let mut h = iommu.cpu();
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) {
                dom.reclaim_now();
                dom.sync(&mut h).expect("sync");
                let _ = iommu.handle_irq(FakeQueue::drain_irq);
                n += 1;
            }
            n
        });
        let mut h = iommu.cpu();
        let mut tx = dom
            .try_alloc(4 * 4096, u64::MAX)
            .unwrap()
            .into_iova()
            .unwrap();
        for r in 0..rounds {
            for k in 0..4u64 {
                let pa = 0x8000_0000 + ((r * 4 + k) % 1024) * 4096;
                dom.link(&mut tx, PhysAddr(pa), k * 4096, 4096, RW, MapAttrs::empty())
                    .expect("link");
                let at = DmaAddr(tx.iova().0 + k * 4096);
                assert_eq!(
                    dom.translate(at).map(|t| t.0),
                    Some(PhysAddr(pa)),
                    "round {r}, page {k}"
                );
            }
            // Every page out: the leaf table is empty, noted for a reclaim.
            for k in 0..4u64 {
                dom.unlink(&mut tx, k * 4096, 4096).expect("unlink");
            }
            // Now and then, room for the reclaim before the next link.
            if r % 4 == 0 {
                thread::yield_now();
            }
        }
        dom.destroy(tx, &mut h).expect("destroy");
        done.store(true, Ordering::SeqCst);
        reclaimer.join().unwrap()
    });
    println!("shared stress: {rounds} rounds of link and unlink against {reclaims} reclaims");
    let mut h = iommu.cpu();
    dom.reclaim_now();
    dom.sync(&mut h).unwrap();
    dom.with(|d| d.page_table().unwrap().check_counts())
        .expect("every table's count matches a scan");
    let dom = dom.into_inner();
    dom.teardown(&mut h).map_err(|(_, e)| e).unwrap();
    let _ = iommu.handle_irq(FakeQueue::drain_irq);
    assert_eq!(heap.out.load(Ordering::SeqCst), 0, "every table page back");
}
