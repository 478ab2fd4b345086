//! The test harness: how a test fails ([`Fail`], `fail!`, `check!`,
//! `check_eq!`, [`OrFail`]), how it narrates (`narrate!`), and the runner
//! that prints one `PASS name` / `FAIL name: why` line per test and the
//! closing `N passed, M failed`, then exits with status 0 only if all passed.
//!
//! A test is `fn(&mut Ctx) -> Result<(), Fail>` over the board's own context
//! type, which implements [`Board`].

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Why a test failed: one line, cut at 200 bytes.
pub type Fail = heapless::String<200>;

/// A board test over the board's context `C`.
pub type TestFn<C> = fn(&mut C) -> Result<(), Fail>;

/// A named test: the runner prints `PASS name` / `FAIL name: why`.
pub type Test<C> = (&'static str, TestFn<C>);

/// What the runner needs from a board: implemented by the context its tests
/// receive.
pub trait Board: Sized {
    /// Whether this is the demo image (narration on).
    fn demo(&self) -> bool;

    /// Whether to run the test `name` (default: every test).
    fn selected(&self, _name: &str) -> bool {
        true
    }

    /// After each test, before its line is printed: tidies up for the next
    /// test and reports what the board saw go wrong that the test did not
    /// (a DMA still running, a bad free). Its failure fails a passing test.
    fn after_test(&mut self) -> Result<(), Fail>;

    /// IOMMU table pages lent out to domains and drivers that a test may
    /// create and must end (a driver set up once per boot is not counted),
    /// if the runner should check them (default: no check). A test that
    /// leaves more lent than before it ran fails: a domain must end with
    /// `Domain::teardown`, a driver with its shutdown.
    fn table_pages_in_use(&self) -> Option<usize> {
        None
    }

    /// Ends the QEMU run with exit status `code` (0: everything passed).
    fn exit(code: u32) -> !;
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

/// `check_ok!(result, "what", args)`: fails the test with `what: error`
/// (the error's `Display` form) unless `result` is `Ok`.
#[macro_export]
macro_rules! check_ok {
    ($result:expr, $($arg:tt)*) => {
        if let Err(e) = $result {
            $crate::fail!("{}: {}", format_args!($($arg)*), e);
        }
    };
}

/// Prints a narration line (`  | ...`) in the demo image only: the board
/// crate's cargo feature `demo` decides, where the macro is used.
#[macro_export]
macro_rules! narrate {
    ($($arg:tt)*) => {
        if cfg!(feature = "demo") {
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

static PASSED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
/// Index in the test list of the test running, `usize::MAX` outside tests.
static CURRENT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Runs the selected tests once, in order, and exits with the verdict.
pub fn run<B: Board>(board: &mut B, tests: &[Test<B>]) -> ! {
    for (i, &(name, test)) in tests.iter().enumerate() {
        if !board.selected(name) {
            continue;
        }
        CURRENT.store(i, Ordering::SeqCst);
        if board.demo() {
            println!("--- {name}");
        }
        let tables_before = board.table_pages_in_use();
        let verdict = test(board);
        let tidy = board.after_test().and(crate::stack_canary::check());
        CURRENT.store(usize::MAX, Ordering::SeqCst);
        let lent = match (tables_before, board.table_pages_in_use()) {
            (Some(before), Some(after)) if after > before => Err(fail_msg(format_args!(
                "left {} table pages lent (a domain dropped without teardown?)",
                after - before
            ))),
            _ => Ok(()),
        };
        match verdict.and(tidy).and(lent) {
            Ok(()) => {
                PASSED.fetch_add(1, Ordering::SeqCst);
                println!("PASS {name}");
            }
            Err(why) => {
                FAILED.fetch_add(1, Ordering::SeqCst);
                println!("FAIL {name}: {why}");
            }
        }
    }
    finish::<B>(0)
}

/// Reports a failure outside any test (`FAIL boot: why`), then the summary,
/// and exits.
pub fn boot_failure<B: Board>(args: fmt::Arguments<'_>) -> ! {
    println!("FAIL boot: {args}");
    finish::<B>(1)
}

/// For the board's panic handler: a `FAIL` line naming the test that
/// panicked (from `tests`, the list given to [`run`]), then the summary.
pub fn panicked<B: Board>(info: &core::panic::PanicInfo<'_>, tests: &[Test<B>]) -> ! {
    let current = CURRENT.swap(usize::MAX, Ordering::SeqCst);
    let name = tests.get(current).map(|t| t.0);
    let why = fail_msg(format_args!("{}", info.message()));
    let at = info.location();
    match (name, at) {
        (Some(n), Some(l)) => println!("FAIL {n}: panic: {why} at {}:{}", l.file(), l.line()),
        (Some(n), None) => println!("FAIL {n}: panic: {why}"),
        (None, Some(l)) => println!("FAIL panic: {why} at {}:{}", l.file(), l.line()),
        (None, None) => println!("FAIL panic: {why}"),
    }
    let not_run = name.map_or(0, |_| tests.len() - current - 1);
    if not_run > 0 {
        println!("  note: {not_run} tests not run after the panic");
    }
    finish::<B>(1)
}

/// Prints the summary (`extra_failed` more failures than counted) and exits:
/// status 0 only if nothing failed and at least one test passed.
fn finish<B: Board>(extra_failed: usize) -> ! {
    let passed = PASSED.load(Ordering::SeqCst);
    let failed = FAILED.load(Ordering::SeqCst) + extra_failed;
    println!("{passed} passed, {failed} failed");
    B::exit(if failed == 0 && passed > 0 { 0 } else { 1 })
}
