//! The test harness: what a test gets ([`Ctx`]), how it fails ([`Fail`],
//! [`fail!`], [`check!`], [`OrFail`]), and the runner that prints one
//! `PASS name` / `FAIL name: why` line per test and the closing
//! `N passed, M failed`, then exits with status 0 only if all passed.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::edu::Edu;
use crate::ivshmem::Ivshmem;
use crate::memory::BoardMemory;

/// Whether this image narrates (cargo feature `demo`).
pub const DEMO: bool = cfg!(feature = "demo");

/// Why a test failed: one line, cut at 200 bytes.
pub type Fail = heapless::String<200>;

/// A board test.
pub type TestFn = fn(&mut Ctx) -> Result<(), Fail>;

/// Everything a test may use.
pub struct Ctx {
    /// The board's memory: table lender, DMA buffer pages, block region.
    pub mem: &'static BoardMemory,
    /// The two edu devices: 00:05.0 (StreamID 0x28) and 00:06.0 (StreamID 0x30).
    pub edu: [Edu; 2],
    /// The ivshmem-plain at 00:07.0 (P2P provider), or why it is missing.
    pub ivshmem: Result<Ivshmem, Fail>,
    /// Base of the SMMUv3 register page 0 (page 1 at + 0x10000).
    pub smmu_base: usize,
    /// Whether this is the demo image (narration on).
    pub demo: bool,
}

/// Builds a [`Fail`] from format arguments, cutting what does not fit.
pub fn fail_msg(args: fmt::Arguments<'_>) -> Fail {
    struct Cut(Fail);
    impl Write for Cut {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            for c in s.chars() {
                // A newline would break the one-line-per-test output.
                let c = if c == '\n' { ' ' } else { c };
                if self.0.push(c).is_err() {
                    break;
                }
            }
            Ok(())
        }
    }
    let mut cut = Cut(Fail::new());
    let _ = cut.write_fmt(args);
    cut.0
}

/// Fails the test: `fail!("fmt", args)` returns `Err(Fail)` from the test.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {
        return Err($crate::harness::fail_msg(format_args!($($arg)*)))
    };
}

/// `check!(cond, "fmt", args)`: fails the test with the message unless `cond`.
#[macro_export]
macro_rules! check {
    ($cond:expr $(,)?) => {
        if !$cond {
            $crate::fail!("check failed: {}", stringify!($cond));
        }
    };
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            $crate::fail!($($arg)*);
        }
    };
}

/// `check_eq!(got, expected, "what")`: fails with both values unless equal.
#[macro_export]
macro_rules! check_eq {
    ($got:expr, $expected:expr, $($arg:tt)*) => {{
        let (got, expected) = (&$got, &$expected);
        if got != expected {
            $crate::fail!(
                "{}: got {:#x?}, expected {:#x?}",
                format_args!($($arg)*),
                got,
                expected
            );
        }
    }};
}

/// Prints a narration line in the demo image only.
#[macro_export]
macro_rules! narrate {
    ($($arg:tt)*) => {
        if $crate::harness::DEMO {
            $crate::println!("  | {}", format_args!($($arg)*));
        }
    };
}

/// `result.or_fail("what")?`: turns any error (or `None`) into a [`Fail`]
/// that says what was being done and the error's `Debug` form.
pub trait OrFail<T> {
    /// The value, or a [`Fail`] naming `what`.
    fn or_fail(self, what: &str) -> Result<T, Fail>;
}

impl<T, E: fmt::Debug> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Result<T, Fail> {
        self.map_err(|e| fail_msg(format_args!("{what}: {e:?}")))
    }
}

impl<T> OrFail<T> for Option<T> {
    fn or_fail(self, what: &str) -> Result<T, Fail> {
        self.ok_or_else(|| fail_msg(format_args!("{what}: none")))
    }
}

/// Index in the test list of the test running, `usize::MAX` outside tests.
static CURRENT: AtomicUsize = AtomicUsize::new(usize::MAX);
static PASSED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

/// Runs every test once, in order, and exits with the verdict.
pub fn run(ctx: &mut Ctx, tests: &[(&'static str, TestFn)]) -> ! {
    for (i, &(name, test)) in tests.iter().enumerate() {
        CURRENT.store(i, Ordering::SeqCst);
        if ctx.demo {
            println!("--- {name}");
        }
        let tables_before = ctx.mem.table_pages_in_use();
        let mut verdict = test(ctx);
        // Leave no DMA running into the next test.
        for edu in &ctx.edu {
            if let Err(e) = edu.wait_idle()
                && verdict.is_ok()
            {
                verdict = Err(fail_msg(format_args!("{} after the test: {e}", edu.id)));
            }
        }
        ctx.mem.reset_dma_pages();
        CURRENT.store(usize::MAX, Ordering::SeqCst);
        match verdict {
            Ok(()) => {
                PASSED.fetch_add(1, Ordering::SeqCst);
                println!("PASS {name}");
            }
            Err(why) => {
                FAILED.fetch_add(1, Ordering::SeqCst);
                println!("FAIL {name}: {why}");
            }
        }
        let tables_after = ctx.mem.table_pages_in_use();
        if tables_after > tables_before {
            println!(
                "  note: {name} left {} table pages allocated",
                tables_after - tables_before
            );
        }
    }
    finish(0)
}

/// Prints the summary (`extra_failed` more failures than counted) and exits:
/// status 0 only if nothing failed and at least one test passed.
fn finish(extra_failed: usize) -> ! {
    let passed = PASSED.load(Ordering::SeqCst);
    let failed = FAILED.load(Ordering::SeqCst) + extra_failed;
    println!("{passed} passed, {failed} failed");
    crate::exit::exit(if failed == 0 && passed > 0 { 0 } else { 1 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let current = CURRENT.swap(usize::MAX, Ordering::SeqCst);
    let name = crate::tests::TESTS.get(current).map(|t| t.0);
    let why = fail_msg(format_args!("{}", info.message()));
    let at = info.location();
    match (name, at) {
        (Some(n), Some(l)) => println!("FAIL {n}: panic: {why} at {}:{}", l.file(), l.line()),
        (Some(n), None) => println!("FAIL {n}: panic: {why}"),
        (None, Some(l)) => println!("FAIL panic: {why} at {}:{}", l.file(), l.line()),
        (None, None) => println!("FAIL panic: {why}"),
    }
    let not_run = name.map_or(0, |_| crate::tests::TESTS.len() - current - 1);
    if not_run > 0 {
        println!("  note: {not_run} tests not run after the panic");
    }
    finish(1)
}
