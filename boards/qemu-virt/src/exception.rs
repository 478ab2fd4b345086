//! Unexpected exceptions: reported as a panic (which fails the running test
//! and ends the run with a non-zero status).

use core::arch::asm;

/// Names of the 16 vector entries (Arm ARM D1.3.1, vector offsets).
const KINDS: [&str; 16] = [
    "sync, current EL, SP_EL0",
    "IRQ, current EL, SP_EL0",
    "FIQ, current EL, SP_EL0",
    "SError, current EL, SP_EL0",
    "sync, current EL, SP_ELx",
    "IRQ, current EL, SP_ELx",
    "FIQ, current EL, SP_ELx",
    "SError, current EL, SP_ELx",
    "sync, lower EL, AArch64",
    "IRQ, lower EL, AArch64",
    "FIQ, lower EL, AArch64",
    "SError, lower EL, AArch64",
    "sync, lower EL, AArch32",
    "IRQ, lower EL, AArch32",
    "FIQ, lower EL, AArch32",
    "SError, lower EL, AArch32",
];

/// The exception level the board runs at (1 or 2).
pub fn current_el() -> u64 {
    let el: u64;
    // SAFETY: reading CurrentEL has no side effects.
    unsafe { asm!("mrs {}, CurrentEL", out(reg) el, options(nomem, nostack)) };
    (el >> 2) & 3
}

/// Called from the vector table with the entry's index; never returns.
pub extern "C" fn unexpected_exception(index: u64) -> ! {
    let (esr, elr, far): (u64, u64, u64);
    if current_el() == 2 {
        // SAFETY: reading the EL2 syndrome registers has no side effects.
        unsafe {
            asm!("mrs {}, esr_el2", out(reg) esr, options(nomem, nostack));
            asm!("mrs {}, elr_el2", out(reg) elr, options(nomem, nostack));
            asm!("mrs {}, far_el2", out(reg) far, options(nomem, nostack));
        }
    } else {
        // SAFETY: reading the EL1 syndrome registers has no side effects.
        unsafe {
            asm!("mrs {}, esr_el1", out(reg) esr, options(nomem, nostack));
            asm!("mrs {}, elr_el1", out(reg) elr, options(nomem, nostack));
            asm!("mrs {}, far_el1", out(reg) far, options(nomem, nostack));
        }
    }
    let kind = KINDS.get(index as usize).copied().unwrap_or("?");
    panic!(
        "unexpected exception ({kind}): ESR={esr:#x} (EC={:#x}) ELR={elr:#x} FAR={far:#x}",
        esr >> 26
    );
}
