//! x86 port I/O.

use core::arch::asm;

/// Writes a byte to an I/O port.
///
/// # Safety
///
/// The port write must not break memory safety (true of the legacy devices
/// this board drives itself: isa-debug-exit, ACPI PM, PCI config ports).
pub unsafe fn outb(port: u16, val: u8) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
///
/// # Safety
///
/// As for [`outb`].
pub unsafe fn outw(port: u16, val: u16) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
///
/// # Safety
///
/// As for [`outb`].
pub unsafe fn outl(port: u16, val: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags))
    }
}
