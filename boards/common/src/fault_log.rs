//! [`FaultLog`]: what the IOMMU's fault interrupt drained during a
//! several-CPU run, reached by the interrupt handler through
//! [`SharedIommu::handle_irq`] — which never spins on the driver's lock.
//!
//! The board keeps one `static` log per driver type and gives the run two
//! one-line functions: its interrupt handler (`LOG.on_irq()`) and the
//! deferred handler of [`SharedIommu::new`] (`LOG.deferred(b)`), run by
//! whichever CPU releases the driver's lock when the interrupt found it
//! taken. Records arrive in the order the IOMMU reported them: the run
//! makes one deliberate fault at a time and waits for it to be drained.

use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use bare_iommu::shared::{SharedIommu, SplitCompletion};

use crate::harness::{Fail, fail_msg};

/// Records kept (the counts are exact, the list is cut).
pub const KEEP: usize = 8;
/// Polls of the record list's lock (held by one drain at a time, briefly).
const LIST_POLLS: u32 = 1_000_000;
/// Polls [`Published`]'s drop waits for a handler still inside the driver.
const WITHDRAW_POLLS: u32 = 100_000_000;

/// Drains the driver's fault records to the callback (`Smmu::handle_irq`,
/// `Vtd::handle_irq`); returns whether it reported trouble (an overflow, a
/// global error).
pub type Drain<B, R> = fn(&mut B, &mut dyn FnMut(R)) -> bool;

/// Counters of one run, read after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqCounts {
    /// Records drained, by the handler or the deferred handler.
    pub handled: u32,
    /// Handler runs.
    pub irqs: u32,
    /// Handler runs that took the driver and drained themselves.
    pub drained_in_irq: u32,
    /// Handler runs that found the driver's lock taken and left the work
    /// to its holder (`handle_irq` returned `None`).
    pub deferred_irqs: u32,
    /// Runs of the deferred handler (on the CPU releasing the lock).
    pub deferred_runs: u32,
    /// Handler runs on another CPU than the interrupt's target.
    pub elsewhere: u32,
    /// Handler runs with no driver published.
    pub missed: u32,
    /// Drains that reported an overflow or a global error.
    pub trouble: u32,
    /// Records that found the list's lock busy beyond the bound.
    pub lost: u32,
}

/// A board's fault log for driver `B` with records `R`; see the module
/// documentation.
pub struct FaultLog<B: 'static, R> {
    /// The driver of the run, while published.
    iommu: AtomicPtr<SharedIommu<B>>,
    /// Handler runs between loading `iommu` and leaving the driver.
    users: AtomicU32,
    drain: Drain<B, R>,
    /// This CPU's identity (MPIDR, APIC ID).
    cpu_id: fn() -> u64,
    /// The identity of the CPU the interrupt is routed to.
    target: AtomicU64,
    records: spin::Mutex<heapless::Vec<R, KEEP>>,
    handled: AtomicU32,
    irqs: AtomicU32,
    drained_in_irq: AtomicU32,
    deferred_irqs: AtomicU32,
    deferred_runs: AtomicU32,
    elsewhere: AtomicU32,
    missed: AtomicU32,
    trouble: AtomicU32,
    lost: AtomicU32,
}

/// The driver published to the handler; withdrawn when dropped.
pub struct Published<'s, B: 'static, R: 'static> {
    log: &'static FaultLog<B, R>,
    _shared: &'s SharedIommu<B>,
}

impl<B: 'static, R: 'static> Drop for Published<'_, B, R> {
    fn drop(&mut self) {
        self.log.iommu.store(ptr::null_mut(), Ordering::SeqCst);
        // A handler that loaded the pointer before the store counted itself
        // in `users` first (both SeqCst): wait until it left.
        for _ in 0..WITHDRAW_POLLS {
            if self.log.users.load(Ordering::SeqCst) == 0 {
                return;
            }
            core::hint::spin_loop();
        }
        // The driver is about to go: a handler still inside it would touch
        // freed memory. Unreachable unless a handler hangs.
        panic!("fault handler still inside the driver after {WITHDRAW_POLLS} polls");
    }
}

impl<B: SplitCompletion + 'static, R: Copy + 'static> FaultLog<B, R> {
    /// An empty log draining with `drain`; `cpu_id` names the running CPU.
    pub const fn new(drain: Drain<B, R>, cpu_id: fn() -> u64) -> Self {
        Self {
            iommu: AtomicPtr::new(ptr::null_mut()),
            users: AtomicU32::new(0),
            drain,
            cpu_id,
            target: AtomicU64::new(u64::MAX),
            records: spin::Mutex::new(heapless::Vec::new()),
            handled: AtomicU32::new(0),
            irqs: AtomicU32::new(0),
            drained_in_irq: AtomicU32::new(0),
            deferred_irqs: AtomicU32::new(0),
            deferred_runs: AtomicU32::new(0),
            elsewhere: AtomicU32::new(0),
            missed: AtomicU32::new(0),
            trouble: AtomicU32::new(0),
            lost: AtomicU32::new(0),
        }
    }

    /// Empties the log; the running CPU becomes the interrupt's target.
    /// Call with no driver published and the interrupt off.
    pub fn reset(&self) {
        self.records.lock().clear();
        for c in self.counters() {
            c.store(0, Ordering::SeqCst);
        }
        self.target.store((self.cpu_id)(), Ordering::SeqCst);
    }

    fn counters(&self) -> [&AtomicU32; 9] {
        [
            &self.handled,
            &self.irqs,
            &self.drained_in_irq,
            &self.deferred_irqs,
            &self.deferred_runs,
            &self.elsewhere,
            &self.missed,
            &self.trouble,
            &self.lost,
        ]
    }

    /// Hands `shared` to the handler until the guard is dropped.
    pub fn publish<'s>(&'static self, shared: &'s SharedIommu<B>) -> Published<'s, B, R> {
        self.iommu
            .store(ptr::from_ref(shared).cast_mut(), Ordering::SeqCst);
        Published {
            log: self,
            _shared: shared,
        }
    }

    /// Records drained so far.
    pub fn handled(&self) -> u32 {
        self.handled.load(Ordering::SeqCst)
    }

    /// Handler runs so far.
    pub fn irqs(&self) -> u32 {
        self.irqs.load(Ordering::SeqCst)
    }

    /// Every counter.
    pub fn counts(&self) -> IrqCounts {
        let [
            handled,
            irqs,
            drained_in_irq,
            deferred_irqs,
            deferred_runs,
            elsewhere,
            missed,
            trouble,
            lost,
        ] = self.counters().map(|c| c.load(Ordering::SeqCst));
        IrqCounts {
            handled,
            irqs,
            drained_in_irq,
            deferred_irqs,
            deferred_runs,
            elsewhere,
            missed,
            trouble,
            lost,
        }
    }

    /// The records kept, in order.
    pub fn records(&self) -> Result<heapless::Vec<R, KEEP>, Fail> {
        for _ in 0..LIST_POLLS {
            if let Some(l) = self.records.try_lock() {
                return Ok(l.clone());
            }
            core::hint::spin_loop();
        }
        Err(fail_msg(format_args!("fault records: list lock busy")))
    }

    /// The interrupt handler's body: drains through
    /// [`SharedIommu::handle_irq`] and keeps the records its result carries;
    /// when the lock is taken, counts the run as deferred and returns (the
    /// holder drains as it releases).
    pub fn on_irq(&self) {
        self.irqs.fetch_add(1, Ordering::SeqCst);
        if (self.cpu_id)() != self.target.load(Ordering::SeqCst) {
            self.elsewhere.fetch_add(1, Ordering::SeqCst);
        }
        self.users.fetch_add(1, Ordering::SeqCst);
        let p = self.iommu.load(Ordering::SeqCst);
        // SAFETY: a non-null pointer was stored by `publish` from a live
        // `&SharedIommu`, and `Published::drop` clears it and then waits for
        // `users` (counted above, before the load) to reach zero before the
        // borrow ends.
        let shared = unsafe { p.as_ref() };
        match shared {
            None => {
                self.missed.fetch_add(1, Ordering::SeqCst);
            }
            Some(shared) => {
                let drain = self.drain;
                let got = shared.handle_irq(|b| collect(drain, b));
                match got {
                    Some((got, n, trouble)) => {
                        self.drained_in_irq.fetch_add(1, Ordering::SeqCst);
                        self.keep(&got, n, trouble);
                    }
                    None => {
                        self.deferred_irqs.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
        self.users.fetch_sub(1, Ordering::SeqCst);
    }

    /// The deferred handler's body (under the driver's lock, on the CPU
    /// releasing it).
    pub fn deferred(&self, b: &mut B) {
        self.deferred_runs.fetch_add(1, Ordering::SeqCst);
        let (got, n, trouble) = collect(self.drain, b);
        self.keep(&got, n, trouble);
    }

    /// Appends `n` drained records (`got`, cut) to the log.
    fn keep(&self, got: &[R], n: u32, trouble: bool) {
        if trouble {
            self.trouble.fetch_add(1, Ordering::SeqCst);
        }
        if n == 0 {
            return;
        }
        let mut list = None;
        for _ in 0..LIST_POLLS {
            list = self.records.try_lock();
            if list.is_some() {
                break;
            }
            core::hint::spin_loop();
        }
        match list {
            Some(mut l) => {
                for r in got {
                    let _ = l.push(*r);
                }
            }
            None => {
                self.lost.fetch_add(n, Ordering::SeqCst);
            }
        }
        // Last: a CPU waiting for its fault finds the record in the list.
        self.handled.fetch_add(n, Ordering::SeqCst);
    }
}

/// Drains `b` with `drain`: the first [`KEEP`] records, how many there
/// were, and whether the drain reported trouble.
fn collect<B, R>(drain: Drain<B, R>, b: &mut B) -> (heapless::Vec<R, KEEP>, u32, bool) {
    let mut got = heapless::Vec::<R, KEEP>::new();
    let mut n = 0u32;
    let trouble = drain(b, &mut |r| {
        n += 1;
        let _ = got.push(r);
    });
    (got, n, trouble)
}
