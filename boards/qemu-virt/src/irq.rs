//! IRQ handling at the board's exception level: the vector table's IRQ
//! entry (`boot.rs`) saves the interrupted context and calls [`irq_exception`],
//! which acknowledges each pending Group 1 interrupt (ICC_IAR1_EL1), runs
//! the handler registered for its INTID and ends it (ICC_EOIR1_EL1).
//!
//! Masking: IRQs are masked in PSTATE (DAIF.I) at boot, during a handler,
//! and inside [`masked`]. The mask/unmask and acknowledge/EOI instructions
//! are compiler barriers (their `asm!` may touch memory), so no access to
//! shared state moves across them. State shared between a test and a handler lives
//! in an [`IrqShared`]: a spin lock only ever taken with IRQs masked, so a
//! handler can never spin on a lock the code it interrupted holds (one CPU).

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

/// INTIDs 1020–1023 are special; 1023: no pending interrupt (spurious).
const SPECIAL: u32 = 1020;
/// Most interrupts one exception acknowledges before returning.
const MAX_PER_EXCEPTION: usize = 64;
/// Handler slots.
const SLOTS: usize = 8;

/// A handler: called with the INTID, IRQs masked, before the EOI.
pub type Handler = fn(u32);

/// One registered handler.
struct Slot {
    intid: u32,
    handler: Handler,
}

static HANDLERS: spin::Mutex<[Option<Slot>; SLOTS]> = spin::Mutex::new([const { None }; SLOTS]);
/// Interrupts acknowledged with no handler registered.
static UNHANDLED: AtomicU32 = AtomicU32::new(0);
/// Interrupts acknowledged, handled or not.
static TAKEN: AtomicU32 = AtomicU32::new(0);
/// Exceptions that found the handler table locked (impossible while the
/// lock is only taken with IRQs masked; counted to prove it).
static TABLE_BUSY: AtomicU32 = AtomicU32::new(0);

/// Counters since boot: (interrupts acknowledged, without a handler,
/// exceptions that found the handler table locked).
pub fn counters() -> (u32, u32, u32) {
    (
        TAKEN.load(Ordering::SeqCst),
        UNHANDLED.load(Ordering::SeqCst),
        TABLE_BUSY.load(Ordering::SeqCst),
    )
}

/// Runs `f` with IRQs masked (DAIF.I set), restoring the mask it found.
pub fn masked<R>(f: impl FnOnce() -> R) -> R {
    let daif: u64;
    // SAFETY: reads DAIF and masks IRQs on this CPU; no memory is touched.
    unsafe {
        asm!("mrs {}, daif", "msr daifset, #2", out(reg) daif, options(nostack));
    }
    let r = f();
    // SAFETY: restores the DAIF value read above (unmasks IRQs only if they
    // were unmasked on entry).
    unsafe { asm!("msr daif, {}", in(reg) daif, options(nostack)) };
    r
}

/// Unmasks IRQs on this CPU (DAIF.I clear): registered handlers may run
/// between any two instructions from now on.
pub fn unmask() {
    // SAFETY: clears PSTATE.I; every state a handler touches is behind an
    // `IrqShared` or atomics.
    unsafe { asm!("msr daifclr, #2", "isb", options(nostack)) };
}

/// Masks IRQs on this CPU (DAIF.I set).
pub fn mask() {
    // SAFETY: sets PSTATE.I; only delays interrupts.
    unsafe { asm!("msr daifset, #2", options(nostack)) };
}

/// Why a handler could not be registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Another handler owns the INTID.
    Taken(u32),
    /// Every slot is in use.
    Full,
}

/// Registers `handler` for `intid`.
pub fn register(intid: u32, handler: Handler) -> Result<(), RegisterError> {
    masked(|| {
        let mut table = HANDLERS.lock();
        if table.iter().flatten().any(|s| s.intid == intid) {
            return Err(RegisterError::Taken(intid));
        }
        let free = table
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or(RegisterError::Full)?;
        *free = Some(Slot { intid, handler });
        Ok(())
    })
}

/// Removes the handler of `intid`, if any.
pub fn unregister(intid: u32) {
    masked(|| {
        for s in HANDLERS.lock().iter_mut() {
            if s.as_ref().is_some_and(|s| s.intid == intid) {
                *s = None;
            }
        }
    });
}

/// Called by the vector table's IRQ entry with IRQs masked and the
/// interrupted registers saved: acknowledge, dispatch, end — until the CPU
/// interface reports nothing pending (bounded).
pub extern "C" fn irq_exception() {
    for _ in 0..MAX_PER_EXCEPTION {
        let intid = acknowledge();
        // 1020–1023 are special (1023: nothing pending); LPIs start at 8192.
        if (SPECIAL..=1023).contains(&intid) {
            break;
        }
        TAKEN.fetch_add(1, Ordering::SeqCst);
        let handler = match HANDLERS.try_lock() {
            Some(table) => table
                .iter()
                .flatten()
                .find(|s| s.intid == intid)
                .map(|s| s.handler),
            None => {
                TABLE_BUSY.fetch_add(1, Ordering::SeqCst);
                None
            }
        };
        match handler {
            Some(h) => h(intid),
            None => {
                UNHANDLED.fetch_add(1, Ordering::SeqCst);
            }
        }
        end_of_interrupt(intid);
    }
}

/// ICC_IAR1_EL1: the highest-priority pending Group 1 INTID, now active.
fn acknowledge() -> u32 {
    let v: u64;
    // SAFETY: reading ICC_IAR1_EL1 acknowledges one interrupt of this CPU's
    // interface; the caller ends it with `end_of_interrupt`.
    unsafe {
        asm!("mrs {}, icc_iar1_el1", "dsb sy", out(reg) v, options(nostack));
    }
    (v & 0xff_ffff) as u32
}

/// ICC_EOIR1_EL1: priority drop and deactivation (EOImode 0).
fn end_of_interrupt(intid: u32) {
    // SAFETY: ends the interrupt `acknowledge` returned.
    unsafe {
        asm!("msr icc_eoir1_el1, {}", "isb", in(reg) u64::from(intid), options(nostack));
    }
}

/// A value shared between normal code and IRQ handlers: a spin lock that is
/// only taken with IRQs masked, so on this single CPU the lock is never
/// contended and a handler never waits for the code it interrupted.
pub struct IrqShared<T> {
    inner: spin::Mutex<Option<T>>,
}

impl<T> IrqShared<T> {
    /// Empty.
    pub const fn new() -> Self {
        Self {
            inner: spin::Mutex::new(None),
        }
    }

    /// Stores `value`, returning what was there.
    pub fn put(&self, value: T) -> Option<T> {
        masked(|| self.inner.lock().replace(value))
    }

    /// Takes the value out.
    pub fn take(&self) -> Option<T> {
        masked(|| self.inner.lock().take())
    }

    /// Runs `f` on the value with IRQs masked; `None` when empty, or when
    /// the lock is held (only possible if a handler interrupted a holder,
    /// which masking rules out).
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        masked(|| self.inner.try_lock()?.as_mut().map(f))
    }
}
