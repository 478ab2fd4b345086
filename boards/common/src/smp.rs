//! Running one closure on several CPUs at once: the part of secondary-CPU
//! bring-up that does not depend on the architecture.
//!
//! A board starts an application processor (AP) its own way (PSCI CPU_ON on
//! `virt`, INIT-SIPI-SIPI on q35: [`Starter`]) and makes it call [`ap_main`]
//! with its [`Slot`] on a stack of its own. [`run`] then hands every AP the
//! job, runs it on the calling CPU too, and waits for every AP to report.
//!
//! The hand-over is a small state machine per AP, so that a job either runs
//! on every CPU or on the calling CPU alone, and every wait is bounded:
//!
//! ```text
//!  BSP: IDLE ──start──▶ STARTING          AP: STARTING ──▶ READY (came up)
//!  BSP: READY ──▶ GO (all came up)        AP: GO ──job──▶ DONE ──▶ off
//!  BSP: READY ──▶ ABORT (one did not)     AP: ABORT ──▶ DONE ──▶ off (no job)
//!  BSP: STARTING ──▶ ABANDONED (timeout)  AP: finds ABANDONED ──▶ off (no job)
//! ```
//!
//! The transitions out of STARTING and READY are compare-and-swap, so a
//! late AP and a BSP that gave up on it never both win. APs are started for
//! each [`run`] and switched off (or halted) after it, so between runs they
//! cost QEMU nothing and the single-CPU tests run as before.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Most CPUs a job runs on (the boot CPU and three APs).
pub const MAX_CPUS: usize = 4;

/// A job: called with the CPU's index (0 = the boot CPU, 1.. the APs).
pub type Job<'a> = &'a (dyn Fn(usize) + Sync);

const IDLE: u32 = 0;
const STARTING: u32 = 1;
const READY: u32 = 2;
const GO: u32 = 3;
const ABORT: u32 = 4;
const DONE: u32 = 5;
const ABANDONED: u32 = 6;

/// One AP's mailbox.
pub struct Slot {
    state: AtomicU32,
    /// The CPU index [`ap_main`] passes to the job.
    index: AtomicUsize,
    /// The job, valid from GO until the AP stores DONE: [`run`] does not
    /// return before that.
    job: spin::Mutex<Option<Job<'static>>>,
}

impl Slot {
    const fn new() -> Self {
        Self {
            state: AtomicU32::new(IDLE),
            index: AtomicUsize::new(0),
            job: spin::Mutex::new(None),
        }
    }
}

/// The mailboxes, by CPU index (slot 0, the boot CPU's, is unused).
pub static SLOTS: [Slot; MAX_CPUS] = [const { Slot::new() }; MAX_CPUS];

/// Why a job did not run on every CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// Fewer CPUs than asked for (the firmware tables list `have`).
    TooFewCpus {
        /// CPUs asked for.
        want: usize,
        /// CPUs the firmware lists (capped at [`MAX_CPUS`]).
        have: usize,
    },
    /// The board could not start CPU `cpu` (the board's error code).
    Start {
        /// CPU index.
        cpu: usize,
        /// What the start call returned (PSCI status, or a board code).
        code: i64,
    },
    /// CPU `cpu` was started but did not report within the bound.
    NoResponse {
        /// CPU index.
        cpu: usize,
    },
}

impl core::fmt::Display for SmpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooFewCpus { want, have } => write!(
                f,
                "{want} CPUs wanted, the firmware lists {have} (run QEMU with -smp {want})"
            ),
            Self::Start { cpu, code } => write!(f, "starting CPU {cpu} failed ({code})"),
            Self::NoResponse { cpu } => write!(f, "CPU {cpu} did not come up in time"),
        }
    }
}

/// What a board provides to start APs and bound the waits.
pub trait Starter {
    /// CPUs the firmware lists, the boot CPU included.
    fn cpus(&self) -> usize;
    /// Makes CPU `cpu` (1..) run [`ap_main`]`(slot)` on a stack of its own,
    /// once it is able to start (an AP still switching off from the last run
    /// is waited for, bounded). `Err(code)` when it will not run at all.
    fn start(&self, cpu: usize, slot: &'static Slot) -> Result<(), i64>;
    /// A free-running counter (virtual time under `-icount`).
    fn now(&self) -> u64;
    /// Counter ticks in a second (of virtual time).
    fn per_second(&self) -> u64;
    /// Wakes CPUs waiting in [`Starter::relax`] (`sev` on Arm); default: nothing.
    fn wake(&self) {}
    /// One step of a wait loop (`yield` / `pause`: lets QEMU run another vCPU).
    fn relax(&self) {
        core::hint::spin_loop();
    }
}

/// Waits until `done()` or `ticks` of `s`'s counter pass; whether `done()`.
fn wait(s: &dyn Starter, ticks: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = s.now();
    loop {
        if done() {
            return true;
        }
        if s.now().wrapping_sub(start) > ticks {
            return done();
        }
        s.relax();
    }
}

/// Seconds (of virtual time) an AP may take to come up.
const START_SECONDS: u64 = 5;

/// Runs `job(i)` on CPUs 0..`cpus` at once: CPU 0 is the caller, the others
/// are started for it and switched off after. Returns once every CPU has
/// finished, or with an error and the job not run anywhere if an AP did not
/// come up. A job that has not finished on every AP within `seconds` of
/// virtual time is a failed run: this panics (the AP may still use `job`'s
/// borrows, so returning would be unsound).
pub fn run(s: &dyn Starter, cpus: usize, seconds: u64, job: Job<'_>) -> Result<(), SmpError> {
    let per_second = s.per_second();
    run_bounded(
        s,
        cpus,
        START_SECONDS * per_second,
        seconds * per_second,
        job,
    )
}

/// [`run`] with both bounds in ticks of `s`'s counter: `start` for each AP
/// to come up, `finish` for every AP to finish the job.
pub fn run_bounded(
    s: &dyn Starter,
    cpus: usize,
    start: u64,
    finish: u64,
    job: Job<'_>,
) -> Result<(), SmpError> {
    let have = s.cpus().min(MAX_CPUS);
    if cpus > have || cpus == 0 {
        return Err(SmpError::TooFewCpus { want: cpus, have });
    }
    // SAFETY: only the lifetime changes. `job` is reached only by APs
    // between GO and DONE, and this function does not return before every AP that got
    // GO has stored DONE (or it panics, ending the run).
    let job: Job<'static> = unsafe { core::mem::transmute::<Job<'_>, Job<'static>>(job) };
    let mut failed = None;
    let mut started = 0;
    for (cpu, slot) in SLOTS.iter().enumerate().take(cpus).skip(1) {
        slot.index.store(cpu, Ordering::Relaxed);
        *slot.job.lock() = Some(job);
        slot.state.store(STARTING, Ordering::Release);
        if let Err(code) = s.start(cpu, slot) {
            slot.state.store(IDLE, Ordering::Release);
            failed = Some(SmpError::Start { cpu, code });
            break;
        }
        let up = wait(s, start, || slot.state.load(Ordering::Acquire) != STARTING);
        if !up
            && slot
                .state
                .compare_exchange(STARTING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            failed = Some(SmpError::NoResponse { cpu });
            break;
        }
        started = cpu;
    }
    let verdict = if failed.is_none() { GO } else { ABORT };
    let mut go = [false; MAX_CPUS];
    for (cpu, slot) in SLOTS.iter().enumerate().take(started + 1).skip(1) {
        let told = slot
            .state
            .compare_exchange(READY, verdict, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        go[cpu] = told && verdict == GO;
        if !told && failed.is_none() {
            // It gave up waiting for the verdict: the others run without it.
            failed = Some(SmpError::NoResponse { cpu });
        }
    }
    s.wake();
    if failed.is_none() {
        job(0);
    }
    // Every AP that saw GO or ABORT reports DONE (one that gave up is
    // ABANDONED and touches nothing more).
    for (cpu, slot) in SLOTS.iter().enumerate().take(started + 1).skip(1) {
        let finished = wait(s, finish, || {
            matches!(slot.state.load(Ordering::Acquire), DONE | ABANDONED)
        });
        if !finished && go[cpu] {
            panic!("CPU {cpu} did not finish its job within {finish} ticks");
        }
        *slot.job.lock() = None;
        slot.state.store(IDLE, Ordering::Release);
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What an AP runs once it has a stack: reports itself, waits (bounded) for
/// the verdict, runs the job on GO, reports DONE. Returns when the AP has
/// nothing more to do; the board then switches it off or halts it.
pub fn ap_main(s: &dyn Starter, slot: &'static Slot) {
    if slot
        .state
        .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // ABANDONED: the boot CPU gave up on this AP; the job is not ours.
        return;
    }
    // The boot CPU starts the others one by one, each within START_SECONDS.
    let decided = wait(
        s,
        (MAX_CPUS as u64 + 1) * START_SECONDS * s.per_second(),
        || slot.state.load(Ordering::Acquire) != READY,
    );
    if !decided
        && slot
            .state
            .compare_exchange(READY, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    {
        return;
    }
    if slot.state.load(Ordering::Acquire) == GO {
        let job = *slot.job.lock();
        if let Some(job) = job {
            job(slot.index.load(Ordering::Relaxed));
        }
    }
    slot.state.store(DONE, Ordering::Release);
}

/// A [`Starter`] whose APs never come up: `start` reports success and does
/// nothing. For testing that a CPU that does not come up fails the run in
/// bounded time, with the job run nowhere.
pub struct Deaf<'a>(pub &'a dyn Starter);

impl Starter for Deaf<'_> {
    fn cpus(&self) -> usize {
        self.0.cpus()
    }
    fn start(&self, _cpu: usize, _slot: &'static Slot) -> Result<(), i64> {
        Ok(())
    }
    fn now(&self) -> u64 {
        self.0.now()
    }
    fn per_second(&self) -> u64 {
        self.0.per_second()
    }
}
