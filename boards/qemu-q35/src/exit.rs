//! Leaving QEMU: isa-debug-exit for failure, ACPI S5 (soft off) for success.
//!
//! `-device isa-debug-exit,iobase=0xf4,iosize=0x04` turns a write of `v` into
//! exit status `(v << 1) | 1`, never 0; only a power-off gives status 0.

use core::sync::atomic::{AtomicU16, Ordering};
use x86_64::instructions::port::Port;

const DEBUG_EXIT_PORT: u16 = 0xf4;
/// PM1a control block on q35 (ICH9 PMBASE 0x600 + 4), replaced by the FADT's value.
static PM1A_CNT: AtomicU16 = AtomicU16::new(0x604);
/// PM1_CNT: SLP_EN (bit 13) with SLP_TYP = 0, the S5 type of QEMU's DSDT.
const PM1_CNT_S5: u16 = 1 << 13;
/// How long to wait for the asynchronous power-off before calling it a failure.
const POWER_OFF_SPIN: u32 = 50_000_000;

/// Records the PM1a control port found in the FADT.
pub fn set_pm1a_cnt(port: u16) {
    PM1A_CNT.store(port, Ordering::Relaxed);
}

/// Exits QEMU with status `(code << 1) | 1`.
pub fn failure(code: u32) -> ! {
    // SAFETY: isa-debug-exit ends the VM; nothing else listens on 0xf4.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(code) };
    halt()
}

/// Powers off through ACPI S5, so QEMU exits with status 0.
pub fn success() -> ! {
    // SAFETY: a write to PM1a_CNT with SLP_EN requests the S5 power-off.
    unsafe { Port::<u16>::new(PM1A_CNT.load(Ordering::Relaxed)).write(PM1_CNT_S5) };
    for _ in 0..POWER_OFF_SPIN {
        core::hint::spin_loop();
    }
    println!("FAIL exit: ACPI S5 did not power off");
    failure(0x7f)
}

/// Stops the CPU for good.
pub fn halt() -> ! {
    loop {
        // SAFETY: cli; hlt parks the CPU; it touches no memory.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
