//! `cargo bench --bench link` (`cargo xtask bench`): bare-iommu's two-step
//! API against the page-table crates a user would write the same tables
//! with, and against the physical limit (bare descriptor stores).
//!
//! Cases (every contender does the same work on the same lent memory, see
//! `arena.rs` and `contenders.rs`):
//! - `link4k-N`: map N separate 4 KiB pages into a fresh table, then one sync;
//! - `link1g`: map one physically contiguous GiB (blocks where allowed);
//! - `unlink4k-N`, `unlink1g`: unmap the same ranges, then one sync;
//! - `txn-fixed`: one whole two-step transaction for one page against the
//!   one-step `map` + `unmap` of the same page;
//! - `limit`: one volatile 8-byte store per page into existing leaf tables.
//!
//! Ours runs in each of its formats against the peer that writes the same
//! format: Arm stage 1 / stage 2 against `aarch64-paging`, VT-d second level
//! against the `x86_64` crate's 4-level mapper. The run ends with a summary,
//! one `bench: ...` line per case and peer; nothing here asserts a time.
//!
//! `BENCH_PROFILE=CASE/FMT/WHO [BENCH_ITERS=n]` runs one routine `n` times
//! without criterion (for `valgrind --tool=callgrind`).

mod arena;
mod contenders;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::{DmaDirection, Domain, IovaState, MapAttrs, PhysAddr};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

use arena::Arena;
use contenders::{
    Aarch64S1, Aarch64S2, CONFIG, Contender, GIB, Limit, NoopBackend, Ours, PAGE, VA_BASE, X86,
    pa_4k,
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
/// Samples per benchmark (criterion's minimum; the cases are long enough).
const SAMPLES: usize = 10;
/// Pages the arena lends: enough for a GiB of 4 KiB pages, or a batch of
/// fresh tables.
const ARENA_PAGES: usize = 4096;

/// The formats ours runs in, and the peer each is measured against.
const FORMATS: [(&str, &str); 3] = [
    ("s1", "aarch64-paging"),
    ("s2", "aarch64-paging"),
    ("vtd", "x86_64"),
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

/// Median ns/page over the measured samples (the warm-up runs come first
/// and are left out).
fn result(case: &str, who: &str) -> Option<f64> {
    let map = SAMPLES_NS.lock().unwrap();
    let all = map.get(&(case.to_string(), who.to_string()))?;
    let mut v: Vec<f64> = all[all.len().saturating_sub(SAMPLES)..].to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(v[v.len() / 2])
}

/// Times `work` on fresh states made by `setup`, `batch` states per timed
/// stretch (untimed: setup, teardown and the arena's re-zeroing).
#[allow(clippy::too_many_arguments)]
fn fresh<'a, S>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    case: &str,
    who: &str,
    pages: u64,
    batch: u64,
    arena: &'a Arena,
    mut setup: impl FnMut(&'a Arena) -> S,
    mut work: impl FnMut(&mut S),
) {
    g.bench_function(who, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let k = left.min(batch);
                let mut states: Vec<S> = (0..k).map(|_| setup(arena)).collect();
                let t = Instant::now();
                for s in states.iter_mut() {
                    work(s);
                }
                total += t.elapsed();
                black_box(&mut states);
                drop(states);
                arena.reset();
                left -= k;
            }
            record(
                case,
                who,
                total.as_nanos() as f64 / iters as f64 / pages as f64,
            );
            total
        })
    });
}

/// Times `work` run back to back on the same state.
fn steady(
    g: &mut BenchmarkGroup<'_, WallTime>,
    case: &str,
    who: &str,
    pages: u64,
    mut work: impl FnMut(),
) {
    g.bench_function(who, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                work();
            }
            let total = t.elapsed();
            record(
                case,
                who,
                total.as_nanos() as f64 / iters as f64 / pages as f64,
            );
            total
        })
    });
}

/// One case of fresh-table work.
#[derive(Clone, Copy)]
enum Op {
    Link4k(u64),
    LinkSg(u64),
    LinkRun(u64),
    Unlink4k(u64),
    Link1g,
    Unlink1g,
}

impl Op {
    /// What exists before the timed work.
    fn setup<'a, C: Contender<'a>>(self, arena: &'a Arena) -> C {
        let mut c = C::new(arena);
        match self {
            Op::Link4k(_) | Op::LinkSg(_) | Op::LinkRun(_) | Op::Link1g => {}
            Op::Unlink4k(n) => c.link_4k(n),
            Op::Unlink1g => c.link_1g(),
        }
        c
    }

    /// The timed work.
    fn work<'a, C: Contender<'a>>(self, c: &mut C) {
        match self {
            Op::Link4k(n) => c.link_4k(n),
            Op::LinkSg(n) => c.link_sg(n),
            Op::LinkRun(n) => c.link_run(n),
            Op::Unlink4k(n) => c.unlink_4k(n),
            Op::Link1g => c.link_1g(),
            Op::Unlink1g => c.unlink_1g(),
        }
    }

    fn pages(self) -> u64 {
        match self {
            Op::Link4k(n) | Op::LinkSg(n) | Op::LinkRun(n) | Op::Unlink4k(n) => n,
            Op::Link1g | Op::Unlink1g => PAGES_1G,
        }
    }

    /// Descriptors the limit writes for this case (one for the GiB block).
    fn limit_entries(self) -> u64 {
        match self {
            Op::Link1g | Op::Unlink1g => 1,
            _ => self.pages(),
        }
    }

    /// The case's name in the report.
    fn name(self) -> String {
        match self {
            Op::Link4k(n) => format!("link4k-{n}"),
            Op::LinkSg(n) => format!("linksg-{n}"),
            Op::LinkRun(n) => format!("linkrun-{n}"),
            Op::Unlink4k(n) => format!("unlink4k-{n}"),
            Op::Link1g => "link1g".into(),
            Op::Unlink1g => "unlink1g".into(),
        }
    }

    /// Every case, in the summary's order.
    fn all() -> Vec<Op> {
        let mut ops: Vec<Op> = NS.map(Op::Link4k).into();
        ops.extend(NS.map(Op::LinkSg));
        ops.extend([Op::LinkRun(RUN), Op::Link1g]);
        ops.extend(NS.map(Op::Unlink4k));
        ops.push(Op::Unlink1g);
        ops
    }
}

fn one<'a, C: Contender<'a>>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    case: &str,
    who: &str,
    op: Op,
    arena: &'a Arena,
) {
    let pages = op.pages();
    fresh(
        g,
        case,
        who,
        pages,
        batch_for(pages),
        arena,
        |a| op.setup::<C>(a),
        |c| op.work(c),
    );
}

/// Ours in each format and the peer writing the same format, on `op`.
fn per_format(g: &mut BenchmarkGroup<'_, WallTime>, case: &str, op: Op, arena: &Arena) {
    one::<Ours<ArmStage1>>(g, case, "s1/ours", op, arena);
    one::<Aarch64S1>(g, case, "s1/aarch64-paging", op, arena);
    one::<Ours<ArmStage2>>(g, case, "s2/ours", op, arena);
    one::<Aarch64S2>(g, case, "s2/aarch64-paging", op, arena);
    one::<Ours<VtdSecondLevel>>(g, case, "vtd/ours", op, arena);
    one::<X86>(g, case, "vtd/x86_64", op, arena);
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

/// One group: `op` for ours in each format and its peer, then the limit
/// storing (or, for an unlink, clearing) the same descriptors.
fn fresh_group(c: &mut Criterion, op: Op, arena: &Arena) {
    let case = op.name();
    let mut g = c.benchmark_group(&case);
    g.sample_size(SAMPLES);
    per_format(&mut g, &case, op, arena);
    let n = op.limit_entries();
    let limit = Limit::new(arena, n);
    match op {
        Op::Unlink4k(_) | Op::Unlink1g => {
            steady(&mut g, &case, "limit", op.pages(), || limit.clear(n))
        }
        _ => steady(&mut g, &case, "limit", op.pages(), || limit.store(n)),
    }
    g.finish();
    arena.reset();
}

fn run_benches(c: &mut Criterion, arena: &Arena) {
    for n in NS {
        for op in [Op::Link4k(n), Op::LinkSg(n), Op::Unlink4k(n)] {
            fresh_group(c, op, arena);
        }
    }
    for op in [Op::LinkRun(RUN), Op::Link1g, Op::Unlink1g] {
        fresh_group(c, op, arena);
    }

    let mut g = c.benchmark_group("txn-fixed");
    g.sample_size(SAMPLES);
    txn_fixed::<ArmStage1>(&mut g, "s1", arena);
    txn_fixed::<ArmStage2>(&mut g, "s2", arena);
    txn_fixed::<VtdSecondLevel>(&mut g, "vtd", arena);
    let limit = Limit::new(arena, 1);
    steady(&mut g, "txn-fixed", "limit", 1, || {
        limit.store(1);
        limit.clear(1)
    });
    g.finish();
    arena.reset();
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

fn txn_fixed<F: bare_iommu::PteFormat + Default>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    fmt: &str,
    arena: &Arena,
) {
    let mut dom = Domain::new(F::default(), arena, CONFIG).unwrap();
    let mut be = NoopBackend;
    steady(g, "txn-fixed", &format!("{fmt}/ours"), 1, || {
        two_step(&mut dom, &mut be)
    });
    steady(g, "txn-fixed", &format!("{fmt}/one-step"), 1, || {
        one_step(&mut dom, &mut be)
    });
}

/// Facts measured once, outside criterion.
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
    let small = on_fresh(arena, |c: &mut C| {
        c.link_4k(PAGES_1G);
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
    let small = on_fresh(arena, |c: &mut C| {
        let before = ALLOCS.load(Ordering::Relaxed);
        c.link_4k(512);
        c.unlink_4k(512);
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
/// address in bits [47:12].
fn descriptor(arena: &Arena, root: u64, va: u64, height: u32) -> u64 {
    let mut table = root;
    for h in (height..4).rev() {
        let idx = ((va >> (12 + 9 * h)) & 511) as usize;
        // SAFETY: `table` is a page of the arena that a contender's walk
        // reached; `idx < 512` stays inside it.
        let e = unsafe { arena.virt(table).cast::<u64>().add(idx).read_volatile() };
        if h == height {
            return e;
        }
        table = e & 0x0000_ffff_ffff_f000;
    }
    unreachable!()
}

/// What `C` writes for 512 separate pages and for the 1 GiB block.
fn written<'a, C: Contender<'a>>(arena: &'a Arena) -> Vec<u64> {
    let mut v: Vec<u64> = on_fresh(arena, |c: &mut C| {
        c.link_4k(512);
        (0..512)
            .map(|i| descriptor(arena, c.root(), VA_BASE + i * PAGE, 0))
            .collect()
    });
    v.push(on_fresh(arena, |c: &mut C| {
        c.link_1g();
        descriptor(arena, c.root(), VA_BASE, 2)
    }));
    v
}

/// Whether ours and the peer wrote the very same descriptors (same work).
fn same_bits(fmt: &str, ours: Vec<u64>, peer: Vec<u64>) -> String {
    match ours.iter().zip(&peer).position(|(a, b)| a != b) {
        None => format!(
            "bench: descriptors {fmt}: ours and its peer wrote identical bits \
             (page {:#x}, 1 GiB block {:#x})",
            ours[0], ours[512]
        ),
        Some(i) => format!(
            "bench: descriptors {fmt}: DIFFER at entry {i}: ours {:#x} peer {:#x}",
            ours[i], peer[i]
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
    let pages: [(&str, (usize, usize)); 6] = [
        ("s1/ours", table_pages::<Ours<ArmStage1>>(arena)),
        ("s1/aarch64-paging", table_pages::<Aarch64S1>(arena)),
        ("s2/ours", table_pages::<Ours<ArmStage2>>(arena)),
        ("s2/aarch64-paging", table_pages::<Aarch64S2>(arena)),
        ("vtd/ours", table_pages::<Ours<VtdSecondLevel>>(arena)),
        ("vtd/x86_64", table_pages::<X86>(arena)),
    ];
    for (who, (small, blocks)) in pages {
        lines.push(format!(
            "bench: table pages per GiB mapped {who}: as 4 KiB pages={small} as blocks={blocks} (root included)"
        ));
    }
    let allocs: [(&str, (u64, u64)); 6] = [
        ("s1/ours", heap_allocs::<Ours<ArmStage1>>(arena)),
        ("s1/aarch64-paging", heap_allocs::<Aarch64S1>(arena)),
        ("s2/ours", heap_allocs::<Ours<ArmStage2>>(arena)),
        ("s2/aarch64-paging", heap_allocs::<Aarch64S2>(arena)),
        ("vtd/ours", heap_allocs::<Ours<VtdSecondLevel>>(arena)),
        ("vtd/x86_64", heap_allocs::<X86>(arena)),
    ];
    for (who, (small, big)) in allocs {
        lines.push(format!(
            "bench: heap allocations {who}: link+unlink of 512 pages={small}, of 1 GiB={big}"
        ));
    }
    lines.push(same_bits(
        "s1",
        written::<Ours<ArmStage1>>(arena),
        written::<Aarch64S1>(arena),
    ));
    lines.push(same_bits(
        "s2",
        written::<Ours<ArmStage2>>(arena),
        written::<Aarch64S2>(arena),
    ));
    lines.push(same_bits(
        "vtd",
        written::<Ours<VtdSecondLevel>>(arena),
        written::<X86>(arena),
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

/// The summary lines of `case` for ours in `fmt`: against `peer`, and
/// against the limit.
fn compare(case: &str, fmt: &str, peer: &str) {
    let Some(ours) = result(case, &format!("{fmt}/ours")) else {
        return;
    };
    if let Some(p) = result(case, &format!("{fmt}/{peer}")) {
        println!(
            "bench: {case}/{fmt} ours={} ns/page {peer}={} ns/page ratio={:.2}",
            ns(ours),
            ns(p),
            p / ours
        );
    }
    if let Some(l) = result(case, "limit") {
        println!(
            "bench: {case}/{fmt} ours={} ns/page limit={} ns/page ratio={:.2}",
            ns(ours),
            ns(l),
            ours / l
        );
    }
}

fn summary(facts: &Facts) {
    println!();
    println!(
        "bench: machine: {}, {} CPUs; median of {SAMPLES} samples",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for op in Op::all() {
        for (fmt, peer) in FORMATS {
            compare(&op.name(), fmt, peer);
        }
    }
    for (fmt, _) in FORMATS {
        compare("txn-fixed", fmt, "one-step");
    }
    for l in &facts.lines {
        println!("{l}");
    }
}

/// `BENCH_PROFILE=CASE/FMT/WHO`: runs one routine without criterion.
fn profile(what: &str, arena: &Arena) {
    let iters: u64 = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    fn go<'a, C: Contender<'a>>(op: Op, iters: u64, arena: &'a Arena) {
        for _ in 0..iters {
            let mut c = op.setup::<C>(arena);
            op.work(&mut c);
            drop(c);
            arena.reset();
        }
    }
    let (case, who) = what.split_once('/').expect("BENCH_PROFILE=CASE/FMT/WHO");
    if case == "txn-fixed" {
        let mut be = NoopBackend;
        let mut dom = Domain::new(ArmStage1, arena, CONFIG).unwrap();
        for _ in 0..iters {
            match who {
                "s1/ours" => two_step(&mut dom, &mut be),
                "s1/one-step" => one_step(&mut dom, &mut be),
                other => panic!("unknown txn-fixed contender {other}"),
            }
        }
        return;
    }
    let op = Op::all()
        .into_iter()
        .find(|op| op.name() == case)
        .unwrap_or_else(|| panic!("unknown case {case}"));
    match who {
        "s1/ours" => go::<Ours<ArmStage1>>(op, iters, arena),
        "s1/aarch64-paging" => go::<Aarch64S1>(op, iters, arena),
        "s2/ours" => go::<Ours<ArmStage2>>(op, iters, arena),
        "s2/aarch64-paging" => go::<Aarch64S2>(op, iters, arena),
        "vtd/ours" => go::<Ours<VtdSecondLevel>>(op, iters, arena),
        "vtd/x86_64" => go::<X86>(op, iters, arena),
        "limit" => {
            let n = op.limit_entries();
            let l = Limit::new(arena, n);
            for _ in 0..iters {
                l.store(n);
            }
        }
        other => panic!("unknown contender {other}"),
    }
}

fn main() {
    let arena = Arena::new(ARENA_PAGES);
    if let Ok(what) = std::env::var("BENCH_PROFILE") {
        profile(&what, &arena);
        return;
    }
    let facts = facts(&arena);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1000))
        .nresamples(10_000)
        .without_plots()
        .configure_from_args();
    run_benches(&mut c, &arena);
    c.final_summary();
    summary(&facts);
}
