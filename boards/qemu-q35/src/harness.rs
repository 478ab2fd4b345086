//! The test harness: [`Ctx`] handed to every test, the `check!` / `fail!` /
//! `narrate!` macros, and the runner that prints `PASS name` / `FAIL name: why`
//! and the closing `N passed, M failed`.
//!
//! A test is `fn(&mut Ctx) -> Result<(), Fail>`, listed in
//! [`crate::tests::TESTS`].

use crate::edu::Edu;
use crate::ivshmem::Ivshmem;
use crate::memory::BoardMemory;
use crate::pci::Ecam;
use crate::{exit, println};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;

/// Why a test failed (truncated to 200 bytes).
pub type Fail = heapless::String<200>;

/// A board test.
pub type TestFn = fn(&mut Ctx) -> Result<(), Fail>;

/// Everything a test may use.
pub struct Ctx {
    /// Lent memory: table pool (the `TableMemory` for the library), DMA pages,
    /// the superpage region, and byte helpers.
    pub mem: &'static BoardMemory,
    /// The two edu functions: 00:03.0 (RID 0x18) and 00:04.0 (RID 0x20).
    pub edu: [Edu; 2],
    /// The ivshmem-plain at 00:05.0 (P2P provider), or why it is missing.
    pub ivshmem: Result<Ivshmem, Fail>,
    /// VT-d register base from the DMAR's first DRHD (QEMU: 0xfed90000).
    pub vtd_base: usize,
    /// Built with the `demo` feature (narration on).
    #[allow(dead_code, reason = "for tests")]
    pub demo: bool,
    /// The kernel command line (`-append`), e.g. `"cm"`, `"noqi"`, `"aw=39"`.
    pub cmdline: &'static str,
    /// PCI configuration access (segment 0).
    #[allow(dead_code, reason = "for tests")]
    pub ecam: Ecam,
}

impl Ctx {
    /// Whether the command line holds the word `name` (or `name=…`).
    pub fn arg(&self, name: &str) -> bool {
        self.cmdline
            .split_ascii_whitespace()
            .any(|w| w == name || w.split_once('=').is_some_and(|(k, _)| k == name))
    }

    /// The value of `key=value` on the command line.
    pub fn arg_value(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
    }
}

/// A `fmt::Write` into a [`Fail`] that keeps what fits and drops the rest.
struct Truncating<'a>(&'a mut Fail);

impl Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.0.push(c).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Formats a failure message (used by `fail!` / `check!`).
pub fn fail_msg(args: fmt::Arguments<'_>) -> Fail {
    let mut s = Fail::new();
    let _ = Truncating(&mut s).write_fmt(args);
    s
}

/// Returns `Err(Fail)` from the enclosing test with a formatted message.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)+) => {
        return Err($crate::harness::fail_msg(format_args!($($arg)+)))
    };
}

/// Fails the enclosing test with the message unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            $crate::fail!($($arg)+);
        }
    };
    ($cond:expr $(,)?) => {
        if !$cond {
            $crate::fail!("check failed: {}", stringify!($cond));
        }
    };
}

/// Prints an indented line only when the board is built with feature `demo`.
#[macro_export]
macro_rules! narrate {
    ($($arg:tt)+) => {
        if cfg!(feature = "demo") {
            $crate::println!("    | {}", format_args!($($arg)+));
        }
    };
}

/// Turns a library error or a missing value into a [`Fail`] naming the step:
/// `dom.link(...).or_fail("link page 0")?`.
pub trait OrFail<T> {
    /// `Err(Fail)` with "`what`: error" on failure.
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
static CURRENT: Mutex<&'static str> = Mutex::new("(boot)");

/// Prints the closing line and exits: status 0 only if all passed and at
/// least one ran.
pub fn finish() -> ! {
    let (p, f) = (PASSED.load(Ordering::SeqCst), FAILED.load(Ordering::SeqCst));
    println!("{p} passed, {f} failed");
    if f == 0 && p > 0 {
        exit::success()
    } else {
        exit::failure(1)
    }
}

/// Reports a failure outside any test (boot) and exits.
pub fn boot_failure(args: fmt::Arguments<'_>) -> ! {
    println!("FAIL boot: {args}");
    FAILED.fetch_add(1, Ordering::SeqCst);
    finish()
}

/// Called by the panic handler: a `FAIL` line naming the test, then the summary.
pub fn panicked(info: &core::panic::PanicInfo<'_>) -> ! {
    let name = CURRENT.try_lock().map(|g| *g).unwrap_or("?");
    match info.location() {
        Some(l) => println!(
            "FAIL panic: in {name} at {}:{}: {}",
            l.file(),
            l.line(),
            info.message()
        ),
        None => println!("FAIL panic: in {name}: {}", info.message()),
    }
    FAILED.fetch_add(1, Ordering::SeqCst);
    finish()
}

/// Runs the tests (only those whose name contains the `only=` argument, if
/// given) and exits.
pub fn run(ctx: &mut Ctx, tests: &'static [(&'static str, TestFn)]) -> ! {
    let only = ctx.arg_value("only");
    for &(name, test) in tests {
        if only.is_some_and(|o| !name.contains(o)) {
            continue;
        }
        *CURRENT.lock() = name;
        narrate!("{name}");
        let result = test(ctx);
        let bad_frees = ctx.mem.take_bad_frees();
        match result {
            Ok(()) if bad_frees == 0 => {
                PASSED.fetch_add(1, Ordering::SeqCst);
                println!("PASS {name}");
            }
            Ok(()) => {
                FAILED.fetch_add(1, Ordering::SeqCst);
                println!("FAIL {name}: {bad_frees} table frees did not match an allocation");
            }
            Err(why) => {
                FAILED.fetch_add(1, Ordering::SeqCst);
                println!("FAIL {name}: {why}");
            }
        }
    }
    *CURRENT.lock() = "(end)";
    finish()
}
