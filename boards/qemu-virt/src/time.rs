//! The Arm generic timer's counter, which bounds edu DMA waits (virtual time
//! under `-icount`, so waits cost the same on every host).

use core::arch::asm;

/// Counter value (CNTPCT_EL0).
pub fn ticks() -> u64 {
    let t: u64;
    // SAFETY: reading the physical counter has no side effects.
    unsafe { asm!("isb", "mrs {}, cntpct_el0", out(reg) t, options(nomem, nostack)) };
    t
}

/// Counter frequency in Hz (CNTFRQ_EL0, set by QEMU).
pub fn frequency() -> u64 {
    let f: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) f, options(nomem, nostack)) };
    f
}
