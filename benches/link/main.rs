//! `cargo bench --bench link` (`cargo xtask bench`): bare-iommu's two-step
//! API against the page-table crates a user would write the same tables
//! with, and against the physical limit (bare descriptor stores).
//!
//! Cases (every contender does the same work on the same lent memory, see
//! `arena.rs` and `contenders.rs`):
//! - `link4k-N-PAT`: map N separate 4 KiB pages into a fresh table, one call
//!   per page, then one sync; `PAT` is `seq` (consecutive IOVAs) or `scat`
//!   (one page per 2 MiB region, shuffled with a fixed seed);
//! - `linksg-N`: the same N pages (`seq`) as one scatter list, where the
//!   API has such a call (peers without one: per page, and labelled so);
//! - `linkrun-N`: N physically contiguous pages, as few calls as possible;
//! - `link1g`: map one physically contiguous GiB (blocks where allowed);
//! - `unlink4k-N-PAT`, `unlink1g`: unmap the same ranges, then one sync;
//! - `txn-fixed`: one whole two-step transaction for one page against the
//!   one-step `map` + `unmap` of the same page;
//! - `limit`: one volatile 8-byte store per page into existing leaf tables;
//! - `shared threads`: 1 against 2 threads on disjoint transactions of one
//!   `SharedDomain` (`threads.rs`; `BENCH_THREADS_ONLY=1` runs it alone,
//!   shortly).
//!
//! Ours runs in each of its formats against the peers that write the same
//! format: Arm stage 1 against `aarch64-paging` and `page_table_multiarch`,
//! stage 2 against `aarch64-paging`, VT-d second level against the `x86_64`
//! crate's 4-level mapper and `page_table_multiarch`'s x86-64 table.
//!
//! Timing: every contender of a case runs one sample in turn (the order
//! rotating), `SAMPLES` rounds, so a noisy stretch of the machine hits all
//! of them alike; a sample is the time of the work only (set-up, scatter
//! vectors, teardown and the arena's re-zeroing are outside), the result
//! the median. The run ends with one `bench: ...` line per case and peer;
//! nothing here asserts a time.
//!
//! `BENCH_CASES=CASE[,CASE...]` times only those cases and prints their
//! `bench:` lines (no report, no facts, no threads line).
//!
//! `BENCH_PROFILE=CASE/FMT/WHO [BENCH_ITERS=n]` runs one routine `n` times
//! inside `profiled_work` (for `valgrind --tool=callgrind
//! --toggle-collect=*profiled_work*`, see `cargo xtask bench
//! --instructions`) and prints `profile: pages=N iters=n`.

mod arena;
mod contenders;
mod threads;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::{DmaDirection, Domain, IovaState, MapAttrs, PhysAddr};

use arena::{Arena, Zeroing};
use contenders::{
    Aarch64S1, Aarch64S2, CONFIG, Contender, GIB, Limit, NoopBackend, Ours, PAGE, Pattern, PtmArm,
    PtmX86, Shared, VA_BASE, Walker, X86, pa_4k,
};

/// Counts every heap allocation in the process.
struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Sizes of the 4 KiB-page cases.
const NS: [u64; 2] = [512, 32768];
/// Pages of the contiguous-run case.
const RUN: u64 = 32768;
/// Pages in a GiB.
const PAGES_1G: u64 = GIB / PAGE;
/// Measured samples per contender and case (after one warm-up sample each).
const SAMPLES: usize = 15;
/// Pages a sample times at least (several fresh tables for small cases).
const SAMPLE_PAGES: u64 = 65536;
/// Pages the arena lends: a table for 32768 scattered pages (one leaf table
/// each), or a batch of fresh tables.
const ARENA_PAGES: usize = 33_000;

/// The formats ours runs in, and the peers each is measured against, with
/// whether the peer zeroes its new table pages inside the timed region.
const FORMATS: [(&str, &[(&str, bool)]); 3] = [
    (
        "s1",
        &[("aarch64-paging", false), ("page_table_multiarch", true)],
    ),
    ("s2", &[("aarch64-paging", false)]),
    ("vtd", &[("x86_64", true), ("page_table_multiarch", true)]),
];

/// ns per page of every sample, by (case, who).
static SAMPLES_NS: Mutex<BTreeMap<(String, String), Vec<f64>>> = Mutex::new(BTreeMap::new());

fn record(case: &str, who: &str, ns_per_page: f64) {
    SAMPLES_NS
        .lock()
        .unwrap()
        .entry((case.to_string(), who.to_string()))
        .or_default()
        .push(ns_per_page);
}

/// Median ns/page over the measured samples.
fn result(case: &str, who: &str) -> Option<f64> {
    let map = SAMPLES_NS.lock().unwrap();
    let all = map.get(&(case.to_string(), who.to_string()))?;
    let mut v: Vec<f64> = all.clone();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// One contender of a case: `run` takes one sample and returns ns/page.
struct Runner<'a> {
    who: String,
    run: Box<dyn FnMut() -> f64 + 'a>,
}

/// Runs every contender one sample at a time, in rotating order, after one
/// warm-up sample each.
fn measure(case: &str, mut rs: Vec<Runner<'_>>) {
    eprintln!("bench: measuring {case} ({} contenders)", rs.len());
    for r in rs.iter_mut() {
        (r.run)();
    }
    let n = rs.len();
    for s in 0..SAMPLES {
        for j in 0..n {
            let r = &mut rs[(s + j) % n];
            let v = (r.run)();
            record(case, &r.who, v);
        }
    }
}

/// One case of fresh-table work.
#[derive(Clone, Copy)]
enum Op {
    Link4k(u64, Pattern),
    LinkSg(u64),
    LinkRun(u64),
    Unlink4k(u64, Pattern),
    Link1g,
    Unlink1g,
}

impl Op {
    /// The IOVA offsets of the per-page cases (made before timing).
    fn offsets(self) -> Vec<u64> {
        match self {
            Op::Link4k(n, p) | Op::Unlink4k(n, p) => p.offsets(n),
            Op::LinkSg(n) => Pattern::Seq.offsets(n),
            _ => Vec::new(),
        }
    }

    /// What exists before the timed work.
    fn setup<'a, C: Contender<'a>>(self, arena: &'a Arena, offs: &[u64]) -> C {
        let mut c = C::new(arena);
        c.prepare(offs);
        match self {
            Op::Link4k(..) | Op::LinkSg(_) | Op::LinkRun(_) | Op::Link1g => {
                if C::KEEPS_TABLES {
                    // The same range linked and unlinked once: the timed
                    // link goes into the tables that kept.
                    self.work(&mut c, offs);
                    c.unlink_everything();
                }
            }
            Op::Unlink4k(..) => c.link_4k(offs),
            Op::Unlink1g => c.link_1g(),
        }
        c
    }

    /// The timed work.
    fn work<'a, C: Contender<'a>>(self, c: &mut C, offs: &[u64]) {
        match self {
            Op::Link4k(..) => c.link_4k(offs),
            Op::LinkSg(_) => c.link_sg(offs),
            Op::LinkRun(n) => c.link_run(n),
            Op::Unlink4k(..) => c.unlink_4k(offs),
            Op::Link1g => c.link_1g(),
            Op::Unlink1g => c.unlink_1g(),
        }
    }

    fn pages(self) -> u64 {
        match self {
            Op::Link4k(n, _) | Op::LinkSg(n) | Op::LinkRun(n) | Op::Unlink4k(n, _) => n,
            Op::Link1g | Op::Unlink1g => PAGES_1G,
        }
    }

    /// Whether the work makes new tables (so who zeroes them matters).
    fn makes_tables(self) -> bool {
        !matches!(self, Op::Unlink4k(..) | Op::Unlink1g)
    }

    /// The offsets of the descriptors the limit writes (one for the block).
    fn limit_offsets(self) -> Vec<u64> {
        match self {
            Op::Link1g | Op::Unlink1g => vec![0],
            Op::LinkRun(n) => Pattern::Seq.offsets(n),
            _ => self.offsets(),
        }
    }

    /// The case's name in the report.
    fn name(self) -> String {
        match self {
            Op::Link4k(n, p) => format!("link4k-{n}-{}", p.name()),
            Op::LinkSg(n) => format!("linksg-{n}"),
            Op::LinkRun(n) => format!("linkrun-{n}"),
            Op::Unlink4k(n, p) => format!("unlink4k-{n}-{}", p.name()),
            Op::Link1g => "link1g".into(),
            Op::Unlink1g => "unlink1g".into(),
        }
    }

    /// Every case, in the summary's order.
    fn all() -> Vec<Op> {
        let mut ops = Vec::new();
        for p in [Pattern::Seq, Pattern::Scat] {
            ops.extend(NS.map(|n| Op::Link4k(n, p)));
        }
        ops.extend(NS.map(Op::LinkSg));
        ops.extend([Op::LinkRun(RUN), Op::Link1g]);
        for p in [Pattern::Seq, Pattern::Scat] {
            ops.extend(NS.map(|n| Op::Unlink4k(n, p)));
        }
        ops.push(Op::Unlink1g);
        ops
    }
}

/// How many fresh tables to time in one stretch so the clock's own cost
/// stays small against the work.
fn batch_for(pages: u64) -> u64 {
    if pages >= PAGES_1G {
        64
    } else {
        (4096 / pages).clamp(1, 64)
    }
}

/// A sample of `op` for `C`: fresh states made untimed, the work on them
/// timed, teardown and re-zeroing untimed.
fn fresh<'a, C: Contender<'a> + 'a>(
    who: &str,
    op: Op,
    offs: Rc<Vec<u64>>,
    arena: &'a Arena,
) -> Runner<'a> {
    let pages = op.pages();
    let batch = batch_for(pages);
    let stretches = (SAMPLE_PAGES / (batch * pages)).max(1);
    Runner {
        who: who.to_string(),
        run: Box::new(move || {
            let mut total = Duration::ZERO;
            for _ in 0..stretches {
                let mut states: Vec<C> = (0..batch).map(|_| op.setup::<C>(arena, &offs)).collect();
                let t = Instant::now();
                for s in states.iter_mut() {
                    op.work(s, &offs);
                }
                total += t.elapsed();
                black_box(&mut states);
                drop(states);
                arena.reset();
            }
            total.as_nanos() as f64 / (stretches * batch * pages) as f64
        }),
    }
}

/// A sample of `work` (covering `pages` pages) run back to back `reps` times.
fn steady<'a>(who: &str, pages: u64, reps: u64, mut work: impl FnMut() + 'a) -> Runner<'a> {
    Runner {
        who: who.to_string(),
        run: Box::new(move || {
            let t = Instant::now();
            for _ in 0..reps {
                work();
            }
            t.elapsed().as_nanos() as f64 / (reps * pages) as f64
        }),
    }
}

/// Every contender of `op`: ours in each format (also with a zeroing lender
/// where tables are made), the peers, and the limit.
fn runners<'a>(op: Op, arena: &'a Arena, limit: &'a Limit) -> Vec<Runner<'a>> {
    let offs = Rc::new(op.offsets());
    let o = || offs.clone();
    let mut rs = vec![
        fresh::<Ours<ArmStage1>>("s1/ours", op, o(), arena),
        fresh::<Aarch64S1>("s1/aarch64-paging", op, o(), arena),
        fresh::<PtmArm>("s1/page_table_multiarch", op, o(), arena),
        fresh::<Shared<ArmStage1>>("s1/shared", op, o(), arena),
        fresh::<Ours<ArmStage2>>("s2/ours", op, o(), arena),
        fresh::<Aarch64S2>("s2/aarch64-paging", op, o(), arena),
        fresh::<Ours<VtdSecondLevel>>("vtd/ours", op, o(), arena),
        fresh::<X86>("vtd/x86_64", op, o(), arena),
        fresh::<PtmX86>("vtd/page_table_multiarch", op, o(), arena),
    ];
    rs.push(fresh::<Ours<ArmStage1, &Arena, true>>(
        "s1/ours+keep",
        op,
        o(),
        arena,
    ));
    rs.push(fresh::<Ours<VtdSecondLevel, &Arena, true>>(
        "vtd/ours+keep",
        op,
        o(),
        arena,
    ));
    if op.makes_tables() {
        rs.push(fresh::<Ours<ArmStage1, Zeroing>>(
            "s1/ours+zero",
            op,
            o(),
            arena,
        ));
        rs.push(fresh::<Ours<VtdSecondLevel, Zeroing>>(
            "vtd/ours+zero",
            op,
            o(),
            arena,
        ));
    }
    let n = limit.slots.len() as u64;
    let reps = (SAMPLE_PAGES / n).max(1);
    if op.makes_tables() {
        rs.push(steady("limit", op.pages(), reps, move || limit.store()));
    } else {
        rs.push(steady("limit", op.pages(), reps, move || limit.clear()));
    }
    rs
}

fn run_benches(arena: &Arena) {
    // `BENCH_CASES=a,b`: only those cases (a quick look while working; the
    // report then lacks the others).
    let only = std::env::var("BENCH_CASES").ok();
    let wanted = |name: &str| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|c| c == name))
    };
    for op in Op::all() {
        if !wanted(&op.name()) {
            continue;
        }
        let limit = Limit::new(&op.limit_offsets());
        measure(&op.name(), runners(op, arena, &limit));
        arena.reset();
    }
    if !wanted("txn-fixed") {
        return;
    }
    let mut d1 = Domain::new(ArmStage1, arena, CONFIG).unwrap();
    let mut d2 = Domain::new(ArmStage2, arena, CONFIG).unwrap();
    let mut dv = Domain::new(VtdSecondLevel::default(), arena, CONFIG).unwrap();
    let (mut b1, mut b2, mut b3) = (NoopBackend, NoopBackend, NoopBackend);
    let (mut b4, mut b5, mut b6) = (NoopBackend, NoopBackend, NoopBackend);
    let d1 = std::cell::RefCell::new(&mut d1);
    let d2 = std::cell::RefCell::new(&mut d2);
    let dv = std::cell::RefCell::new(&mut dv);
    let limit = Limit::new(&[0]);
    const REPS: u64 = 2000;
    measure(
        "txn-fixed",
        vec![
            steady("s1/ours", 1, REPS, || {
                two_step(&mut d1.borrow_mut(), &mut b1)
            }),
            steady("s1/one-step", 1, REPS, || {
                one_step(&mut d1.borrow_mut(), &mut b2)
            }),
            steady("s2/ours", 1, REPS, || {
                two_step(&mut d2.borrow_mut(), &mut b3)
            }),
            steady("s2/one-step", 1, REPS, || {
                one_step(&mut d2.borrow_mut(), &mut b4)
            }),
            steady("vtd/ours", 1, REPS, || {
                two_step(&mut dv.borrow_mut(), &mut b5)
            }),
            steady("vtd/one-step", 1, REPS, || {
                one_step(&mut dv.borrow_mut(), &mut b6)
            }),
            steady("limit", 1, REPS, || {
                limit.store();
                limit.clear()
            }),
        ],
    );
}

/// The two-step transaction for one page.
#[inline(never)]
fn two_step<F: bare_iommu::PteFormat>(dom: &mut Domain<F, &Arena>, be: &mut NoopBackend) {
    let mut tx = dom.try_alloc(PAGE, u64::MAX).unwrap().into_iova().unwrap();
    dom.link(
        &mut tx,
        PhysAddr(pa_4k(0)),
        0,
        PAGE,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .unwrap();
    dom.sync(be).unwrap();
    dom.unlink(&mut tx, 0, PAGE).unwrap();
    dom.free(tx).unwrap();
    dom.sync(be).unwrap();
}

/// The one-step map + unmap of the same page.
#[inline(never)]
fn one_step<F: bare_iommu::PteFormat>(dom: &mut Domain<F, &Arena>, be: &mut NoopBackend) {
    let m = dom
        .map(
            be,
            PhysAddr(pa_4k(0)),
            PAGE,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
            u64::MAX,
        )
        .unwrap();
    dom.unmap(be, m).unwrap();
}

/// Facts measured once, outside the timing.
struct Facts {
    lines: Vec<String>,
}

/// `f` on a fresh `C` in an emptied arena; the arena is emptied again after.
fn on_fresh<'a, C: Contender<'a>, T>(arena: &'a Arena, f: impl FnOnce(&mut C) -> T) -> T {
    arena.reset();
    let mut c = C::new(arena);
    let t = f(&mut c);
    drop(c);
    arena.reset();
    t
}

fn table_pages<'a, C: Contender<'a>>(arena: &'a Arena) -> (usize, usize) {
    let offs = Pattern::Seq.offsets(PAGES_1G);
    let small = on_fresh(arena, |c: &mut C| {
        c.prepare(&offs);
        c.link_4k(&offs);
        arena.live()
    });
    let blocks = on_fresh(arena, |c: &mut C| {
        c.link_1g();
        arena.live()
    });
    (small, blocks)
}

/// Heap allocations while linking (and unlinking) 512 pages and a GiB,
/// tables already created by `C::new`.
fn heap_allocs<'a, C: Contender<'a>>(arena: &'a Arena) -> (u64, u64) {
    let offs = Pattern::Scat.offsets(512);
    let small = on_fresh(arena, |c: &mut C| {
        let before = ALLOCS.load(Ordering::Relaxed);
        c.prepare(&offs);
        c.link_4k(&offs);
        c.unlink_4k(&offs);
        ALLOCS.load(Ordering::Relaxed) - before
    });
    let big = on_fresh(arena, |c: &mut C| {
        let before = ALLOCS.load(Ordering::Relaxed);
        c.link_1g();
        c.unlink_1g();
        ALLOCS.load(Ordering::Relaxed) - before
    });
    (small, big)
}

/// The descriptor a 4-level walk from `root` finds for `va` at `height`
/// (0: page, 2: 1 GiB block); every format here keeps the next table's
/// address in bits [47:12] and bit 0 set in a valid entry; 0 where the walk
/// meets an invalid entry.
fn descriptor(arena: &Arena, root: u64, va: u64, height: u32) -> u64 {
    let mut table = root;
    for h in (height..4).rev() {
        let idx = ((va >> (12 + 9 * h)) & 511) as usize;
        // SAFETY: `table` is a page of the arena that a contender's walk
        // reached; `idx < 512` stays inside it.
        let e = unsafe { arena.virt(table).cast::<u64>().add(idx).read_volatile() };
        if h == height || e & 1 == 0 {
            return if h == height { e } else { 0 };
        }
        table = e & 0x0000_ffff_ffff_f000;
    }
    unreachable!()
}

/// What `C` writes for 512 separate pages in each pattern, for the
/// contiguous run of 512 pages and for the 1 GiB block; then whether
/// everything is gone after the unlinks.
fn written<'a, C: Contender<'a>>(arena: &'a Arena) -> Vec<u64> {
    let mut v = Vec::new();
    for p in [Pattern::Seq, Pattern::Scat] {
        let offs = p.offsets(512);
        v.extend(on_fresh(arena, |c: &mut C| {
            c.prepare(&offs);
            c.link_4k(&offs);
            let mut d: Vec<u64> = offs
                .iter()
                .map(|&o| descriptor(arena, c.root(), VA_BASE + o, 0))
                .collect();
            c.unlink_4k(&offs);
            d.extend(
                offs.iter()
                    .map(|&o| descriptor(arena, c.root(), VA_BASE + o, 0)),
            );
            d
        }));
    }
    v.extend(on_fresh(arena, |c: &mut C| {
        c.link_run(512);
        (0..512)
            .map(|i| descriptor(arena, c.root(), VA_BASE + i * PAGE, 0))
            .collect::<Vec<_>>()
    }));
    v.extend(on_fresh(arena, |c: &mut C| {
        c.link_1g();
        let d = descriptor(arena, c.root(), VA_BASE, 2);
        c.unlink_1g();
        [d, descriptor(arena, c.root(), VA_BASE, 2)]
    }));
    v
}

/// Whether ours and a peer wrote the very same descriptors (same work).
fn same_bits(fmt: &str, peer: &str, ours: &[u64], theirs: &[u64]) -> String {
    match ours.iter().zip(theirs).position(|(a, b)| a != b) {
        None if ours.len() == theirs.len() => format!(
            "bench: descriptors {fmt}: ours and {peer} wrote identical bits for 512 pages seq \
             and scat (and cleared them), a 512-page run and the 1 GiB block (page {:#x}, \
             block {:#x})",
            ours[0],
            ours[ours.len() - 2]
        ),
        None => format!("bench: descriptors {fmt}: {peer} wrote a different number"),
        Some(i) => format!(
            "bench: descriptors {fmt}: {peer} DIFFERS at entry {i}: ours {:#x} {peer} {:#x}",
            ours[i], theirs[i]
        ),
    }
}

fn facts(arena: &Arena) -> Facts {
    let mut lines = vec![format!(
        "bench: size_of IovaState={} bytes, Domain<ArmStage1>={} bytes, Domain<VtdSecondLevel>={} bytes",
        std::mem::size_of::<IovaState>(),
        std::mem::size_of::<Domain<ArmStage1, &Arena>>(),
        std::mem::size_of::<Domain<VtdSecondLevel, &Arena>>(),
    )];
    let pages: [(&str, (usize, usize)); 8] = [
        ("s1/ours", table_pages::<Ours<ArmStage1>>(arena)),
        ("s1/aarch64-paging", table_pages::<Aarch64S1>(arena)),
        ("s1/page_table_multiarch", table_pages::<PtmArm>(arena)),
        ("s2/ours", table_pages::<Ours<ArmStage2>>(arena)),
        ("s2/aarch64-paging", table_pages::<Aarch64S2>(arena)),
        ("vtd/ours", table_pages::<Ours<VtdSecondLevel>>(arena)),
        ("vtd/x86_64", table_pages::<X86>(arena)),
        ("vtd/page_table_multiarch", table_pages::<PtmX86>(arena)),
    ];
    for (who, (small, blocks)) in pages {
        lines.push(format!(
            "bench: table pages per GiB mapped {who}: as 4 KiB pages={small} as blocks={blocks} (root included)"
        ));
    }
    let allocs: [(&str, (u64, u64)); 8] = [
        ("s1/ours", heap_allocs::<Ours<ArmStage1>>(arena)),
        ("s1/aarch64-paging", heap_allocs::<Aarch64S1>(arena)),
        ("s1/page_table_multiarch", heap_allocs::<PtmArm>(arena)),
        ("s2/ours", heap_allocs::<Ours<ArmStage2>>(arena)),
        ("s2/aarch64-paging", heap_allocs::<Aarch64S2>(arena)),
        ("vtd/ours", heap_allocs::<Ours<VtdSecondLevel>>(arena)),
        ("vtd/x86_64", heap_allocs::<X86>(arena)),
        ("vtd/page_table_multiarch", heap_allocs::<PtmX86>(arena)),
    ];
    for (who, (small, big)) in allocs {
        lines.push(format!(
            "bench: heap allocations {who}: link+unlink of 512 scattered pages={small}, of 1 GiB={big}"
        ));
    }
    let s1 = written::<Ours<ArmStage1>>(arena);
    let s2 = written::<Ours<ArmStage2>>(arena);
    let vtd = written::<Ours<VtdSecondLevel>>(arena);
    lines.push(same_bits(
        "s1",
        "aarch64-paging",
        &s1,
        &written::<Aarch64S1>(arena),
    ));
    lines.push(same_bits(
        "s1",
        "page_table_multiarch",
        &s1,
        &written::<PtmArm>(arena),
    ));
    lines.push(same_bits(
        "s1",
        "ours+zero",
        &s1,
        &written::<Ours<ArmStage1, Zeroing>>(arena),
    ));
    lines.push(same_bits(
        "s2",
        "aarch64-paging",
        &s2,
        &written::<Aarch64S2>(arena),
    ));
    lines.push(same_bits("vtd", "x86_64", &vtd, &written::<X86>(arena)));
    lines.push(same_bits(
        "vtd",
        "page_table_multiarch",
        &vtd,
        &written::<PtmX86>(arena),
    ));
    let mut dom = Domain::new(ArmStage1, arena, CONFIG).unwrap();
    let mut be = NoopBackend;
    let before = ALLOCS.load(Ordering::Relaxed);
    two_step(&mut dom, &mut be);
    one_step(&mut dom, &mut be);
    lines.push(format!(
        "bench: heap allocations s1/ours: one two-step and one one-step transaction={}",
        ALLOCS.load(Ordering::Relaxed) - before
    ));
    drop(dom);
    arena.reset();
    lines.push(
        "bench: zeroing of new table pages: ours, aarch64-paging: by the lender, outside the \
         timed region (the arena is re-zeroed between samples); ours+zero: by a lender that \
         zeroes each page it lends, inside; ours+keep (TableReclaim::Keep): link cases into \
         tables kept from a link and unlink before the timed region, none lent or zeroed; \
         x86_64 (create_next_table: PageTable::zero) and \
         page_table_multiarch (PageTable64::alloc_table): by the crate, inside"
            .into(),
    );
    Facts { lines }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// `x` with four significant digits (1 GiB cases are fractions of a ns/page).
fn ns(x: f64) -> String {
    let digits = if x > 0.0 {
        (3.0 - x.log10().floor()).clamp(0.0, 9.0) as usize
    } else {
        3
    };
    format!("{x:.digits$}")
}

/// How `peer` does the work of `op`, when that is not the call ours makes
/// (then no ratio is printed).
fn different_call(op: Op, peer: &str) -> Option<&'static str> {
    match (op, peer) {
        (Op::LinkSg(_), _) => Some("one map call per page"),
        (Op::LinkRun(_), "x86_64") => Some("one map_to call per page (no range call)"),
        _ => None,
    }
}

/// What ours' call is, for the labelled lines.
fn our_call(op: Op) -> &'static str {
    match op {
        Op::LinkSg(_) => "one link_pages call, scatter list",
        _ => "one link call",
    }
}

/// The summary lines of `op` for ours in `fmt`: against each peer, and
/// against the limit.
/// The `bench:` lines of every case measured, each format against its
/// peers.
fn compare_all() {
    for op in Op::all() {
        for (fmt, peers) in FORMATS {
            compare(op, fmt, peers);
        }
    }
}

fn compare(op: Op, fmt: &str, peers: &[(&str, bool)]) {
    let case = op.name();
    // The GiB cases in ns per GiB, the others per 4 KiB page.
    let (scale, unit) = match op {
        Op::Link1g | Op::Unlink1g => (PAGES_1G as f64, "ns/GiB"),
        _ => (1.0, "ns/page"),
    };
    let get = |who: &str| result(&case, who).map(|x| x * scale);
    let ns = |x: f64| format!("{} {unit}", ns(x));
    let Some(ours) = get(&format!("{fmt}/ours")) else {
        return;
    };
    let zeroing = get(&format!("{fmt}/ours+zero"));
    for &(peer, zeroes_inside) in peers {
        let Some(p) = get(&format!("{fmt}/{peer}")) else {
            continue;
        };
        if let Some(how) = different_call(op, peer) {
            println!(
                "bench: {case}/{fmt} ours={} ({}) {peer}={} ({how}): \
                 different calls, not a peer ratio",
                ns(ours),
                our_call(op),
                ns(p),
            );
            continue;
        }
        match (zeroes_inside && op.makes_tables(), zeroing) {
            (true, Some(z)) => {
                println!(
                    "bench: {case}/{fmt} ours+zero={} {peer}={} ratio={:.2} \
                     (equal zeroing: both zero new tables inside the timed region)",
                    ns(z),
                    ns(p),
                    p / z
                );
                println!(
                    "bench: {case}/{fmt} ours={} {peer}={} ratio={:.2} \
                     (unequal zeroing: ours' lender zeroes outside, {peer} inside)",
                    ns(ours),
                    ns(p),
                    p / ours
                );
            }
            _ => println!(
                "bench: {case}/{fmt} ours={} {peer}={} ratio={:.2}",
                ns(ours),
                ns(p),
                p / ours
            ),
        }
    }
    if let (Op::Unlink4k(..) | Op::Unlink1g, Some(k)) = (op, get(&format!("{fmt}/ours+keep"))) {
        for &(peer, _) in peers {
            if let Some(p) = get(&format!("{fmt}/{peer}")) {
                println!(
                    "bench: {case}/{fmt} ours+keep={} {peer}={} ratio={:.2} \
                     (ours with TableReclaim::Keep: emptied tables stay attached)",
                    ns(k),
                    ns(p),
                    p / k
                );
            }
        }
    }
    if let Some(sh) = get(&format!("{fmt}/shared")) {
        println!(
            "bench: {case}/{fmt} shared={} ours={} ratio={:.2} \
             (the same calls through SharedDomain on one CPU against Domain: what sharing costs)",
            ns(sh),
            ns(ours),
            ours / sh
        );
    }
    if let Some(l) = get("limit") {
        println!(
            "bench: {case}/{fmt} ours={} limit={} ratio={:.2}",
            ns(ours),
            ns(l),
            ours / l
        );
    }
}

fn summary(facts: &Facts) {
    println!();
    println!(
        "bench: machine: {}, {} CPUs; median of {SAMPLES} interleaved samples",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    compare_all();
    for (fmt, _) in FORMATS {
        if let (Some(o), Some(p)) = (
            result("txn-fixed", &format!("{fmt}/ours")),
            result("txn-fixed", &format!("{fmt}/one-step")),
        ) {
            println!(
                "bench: txn-fixed/{fmt} ours={} ns one-step={} ns ratio={:.2}",
                ns(o),
                ns(p),
                p / o
            );
        }
    }
    for l in &facts.lines {
        println!("{l}");
    }
    let path = std::env::var("BENCH_REPORT").unwrap_or_else(|_| "target/bench-report.md".into());
    match std::fs::write(&path, tables()) {
        Ok(()) => println!("bench: README time tables written to {path}"),
        Err(e) => eprintln!("bench: cannot write {path}: {e}"),
    }
}

/// The README's two time tables (markdown), from this run's medians: ns per
/// 4 KiB page, ns per GiB for the 1 GiB rows. Peers' figures for calls
/// that differ from ours are marked (¹ scatter list, ² no range call).
fn tables() -> String {
    let rows = |op: Op| -> String {
        match op {
            Op::Link4k(n, p) => format!("link {n} pages {}, one call each", p.name()),
            Op::LinkSg(n) => format!("link {n} pages as one scatter list ¹"),
            Op::LinkRun(n) => format!("link {n} contiguous pages, one call"),
            Op::Unlink4k(n, p) => format!("unlink {n} pages {}, one call each", p.name()),
            Op::Link1g => "link 1 GiB block (ns per GiB)".into(),
            Op::Unlink1g => "unlink 1 GiB block (ns per GiB)".into(),
        }
    };
    let cell = |op: Op, who: &str| -> String {
        let scale = match op {
            Op::Link1g | Op::Unlink1g => PAGES_1G as f64,
            _ => 1.0,
        };
        let Some(v) = result(&op.name(), who) else {
            // Not measured: ours+zero where nothing is made, a peer absent.
            return String::new();
        };
        let peer = who.split('/').nth(1).unwrap_or(who);
        let is_peer = !peer.starts_with("ours") && peer != "limit" && peer != "shared";
        let mark = match different_call(op, peer) {
            Some(_) if !is_peer => "",
            Some(_) if matches!(op, Op::LinkSg(_)) => " ¹",
            Some(_) => " ²",
            None => "",
        };
        format!("{}{mark}", ns(v * scale))
    };
    let table = |cols: &[(&str, &str)]| -> String {
        let mut t = String::from("| case |");
        for (title, _) in cols {
            t.push_str(&format!(" {title} |"));
        }
        t.push_str("\n|---|");
        t.push_str(&"---|".repeat(cols.len()));
        t.push('\n');
        for op in Op::all() {
            t.push_str(&format!("| {} |", rows(op)));
            for (_, who) in cols {
                t.push_str(&format!(" {} |", cell(op, who)));
            }
            t.push('\n');
        }
        t
    };
    let mut out = String::new();
    out.push_str(&format!(
        "Machine: {}, {} CPUs; median of {SAMPLES} interleaved samples.\n\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str("Arm (ns per 4 KiB page; 1 GiB rows in ns per GiB):\n\n");
    out.push_str(&table(&[
        ("S1 ours", "s1/ours"),
        ("S1 ours+zero", "s1/ours+zero"),
        ("S1 ours+keep", "s1/ours+keep"),
        ("S1 shared", "s1/shared"),
        ("`aarch64-paging` S1", "s1/aarch64-paging"),
        ("`page_table_multiarch` S1", "s1/page_table_multiarch"),
        ("S2 ours", "s2/ours"),
        ("`aarch64-paging` S2", "s2/aarch64-paging"),
        ("limit", "limit"),
    ]));
    out.push_str("\nVT-d second level / x86-64 4-level (same units):\n\n");
    out.push_str(&table(&[
        ("ours", "vtd/ours"),
        ("ours+zero", "vtd/ours+zero"),
        ("ours+keep", "vtd/ours+keep"),
        ("`x86_64`", "vtd/x86_64"),
        ("`page_table_multiarch`", "vtd/page_table_multiarch"),
        ("limit", "limit"),
    ]));
    out
}

/// The routine callgrind counts (`--toggle-collect=*profiled_work*`).
#[inline(never)]
fn profiled_work<'a, C: Contender<'a>>(op: Op, c: &mut C, offs: &[u64]) {
    op.work(c, offs)
}

/// `BENCH_PROFILE=CASE/FMT/WHO`: runs one routine without timing.
fn profile(what: &str, arena: &Arena) {
    let iters: u64 = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    fn go<'a, C: Contender<'a>>(op: Op, iters: u64, arena: &'a Arena) {
        let offs = op.offsets();
        for _ in 0..iters {
            let mut c = op.setup::<C>(arena, &offs);
            let t0 = std::time::Instant::now();
            profiled_work(op, &mut c, &offs);
            if std::env::var("BENCH_TIME").is_ok() {
                eprintln!(
                    "t {:.2} ns/page",
                    t0.elapsed().as_nanos() as f64 / op.pages() as f64
                );
            }
            drop(c);
            arena.reset();
        }
    }
    let (case, who) = what.split_once('/').expect("BENCH_PROFILE=CASE/FMT/WHO");
    if case == "txn-fixed" {
        #[inline(never)]
        fn profiled_work<F: bare_iommu::PteFormat>(
            two: bool,
            dom: &mut Domain<F, &Arena>,
            be: &mut NoopBackend,
        ) {
            if two {
                two_step(dom, be)
            } else {
                one_step(dom, be)
            }
        }
        let mut be = NoopBackend;
        let mut dom = Domain::new(ArmStage1, arena, CONFIG).unwrap();
        for _ in 0..iters {
            match who {
                "s1/ours" => profiled_work(true, &mut dom, &mut be),
                "s1/one-step" => profiled_work(false, &mut dom, &mut be),
                other => panic!("unknown txn-fixed contender {other}"),
            }
        }
        println!("profile: pages=1 iters={iters}");
        return;
    }
    let op = Op::all()
        .into_iter()
        .find(|op| op.name() == case)
        .unwrap_or_else(|| panic!("unknown case {case}"));
    match who {
        "s1/ours" => go::<Ours<ArmStage1>>(op, iters, arena),
        "s1/shared" => go::<Shared<ArmStage1>>(op, iters, arena),
        "s1/ours+zero" => go::<Ours<ArmStage1, Zeroing>>(op, iters, arena),
        "s1/ours+keep" => go::<Ours<ArmStage1, &Arena, true>>(op, iters, arena),
        "s1/walker" => go::<Walker<ArmStage1>>(op, iters, arena),
        "s1/aarch64-paging" => go::<Aarch64S1>(op, iters, arena),
        "s1/page_table_multiarch" => go::<PtmArm>(op, iters, arena),
        "s2/ours" => go::<Ours<ArmStage2>>(op, iters, arena),
        "s2/aarch64-paging" => go::<Aarch64S2>(op, iters, arena),
        "vtd/ours" => go::<Ours<VtdSecondLevel>>(op, iters, arena),
        "vtd/ours+zero" => go::<Ours<VtdSecondLevel, Zeroing>>(op, iters, arena),
        "vtd/ours+keep" => go::<Ours<VtdSecondLevel, &Arena, true>>(op, iters, arena),
        "vtd/walker" => go::<Walker<VtdSecondLevel>>(op, iters, arena),
        "vtd/x86_64" => go::<X86>(op, iters, arena),
        "vtd/page_table_multiarch" => go::<PtmX86>(op, iters, arena),
        other => panic!("unknown contender {other}"),
    }
    println!("profile: pages={} iters={iters}", op.pages());
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let arena = Arena::new(ARENA_PAGES);
    if let Ok(what) = std::env::var("BENCH_PROFILE") {
        profile(&what, &arena);
        return;
    }
    if let Ok(v) = std::env::var("BENCH_THREADS_ONLY") {
        // A short smoke run of the threads line alone (`=N`: N transactions
        // per sample, 3 samples, when N > 1).
        match v.parse::<u64>() {
            Ok(n) if n > 1 => println!("{}", threads::line(n, 3)),
            _ => println!("{}", threads::line(2_000, 1)),
        }
        return;
    }
    if std::env::var("BENCH_CASES").is_ok() {
        run_benches(&arena);
        compare_all();
        return;
    }
    let facts = facts(&arena);
    run_benches(&arena);
    summary(&facts);
    println!("{}", threads::line(200_000, 5));
}
