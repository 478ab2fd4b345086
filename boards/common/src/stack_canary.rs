//! Stack canaries: a band of known words at the bottom of each stack the
//! board runs on, checked after every test.
//!
//! The boards have no guard pages (their stacks sit in `.bss` next to
//! page tables and other statics), so a stack that outgrows its region
//! corrupts its neighbour silently and the run fails far from the cause
//! (a page fault on MMIO, a wrong byte). The band turns that into a
//! `FAIL name: stack overflow ...` line for the test that did it, as long
//! as the overflow stays inside the band.

use crate::harness::{Fail, fail_msg};

/// The word the band is filled with (its address is mixed in, so a copy of
/// the band elsewhere does not pass for it).
const WORD: u64 = 0x5ca1_ab1e_c0de_d00d;
/// Stacks registered at most.
const STACKS: usize = 9;

static BANDS: spin::Mutex<heapless::Vec<(&'static str, usize, usize), STACKS>> =
    spin::Mutex::new(heapless::Vec::new());

fn word_at(addr: usize) -> u64 {
    WORD ^ addr as u64
}

/// Fills `[bottom, bottom + len)` with the band and registers it under
/// `name`; a full registry leaves the stack unguarded.
///
/// # Safety
///
/// The range is the lowest, unused part of a stack (8-byte aligned) that
/// nothing else writes while the band is registered, except by overflowing.
pub unsafe fn plant(name: &'static str, bottom: usize, len: usize) {
    for a in (bottom..bottom + len).step_by(8) {
        // SAFETY: inside the caller's unused, aligned stack range.
        unsafe { core::ptr::write_volatile(a as *mut u64, word_at(a)) };
    }
    let _ = BANDS.lock().push((name, bottom, len));
}

/// Whether every registered band is intact: the failure names the stack
/// and how deep into its band it was written.
pub fn check() -> Result<(), Fail> {
    let bands = BANDS.lock();
    for &(name, bottom, len) in bands.iter() {
        // The highest word written over: the band is consumed from its top.
        let top = bottom + len;
        let hit = (bottom..top).step_by(8).rev().find(|&a| {
            // SAFETY: registered by `plant` over a stack range nothing
            // else writes (bar an overflow, which is what this looks for).
            let v = unsafe { core::ptr::read_volatile(a as *const u64) };
            v != word_at(a)
        });
        if let Some(a) = hit {
            return Err(fail_msg(format_args!(
                "stack overflow: the {name} stack reached {:#x} bytes into its {len:#x}-byte \
                 canary band (grow the stack)",
                top - a
            )));
        }
    }
    Ok(())
}

/// Band at the bottom of the boot stack (both boards' boot stacks are
/// 1 MiB).
pub const BOOT_BAND: usize = 64 * 1024;

/// Plants the band of [`BOOT_BAND`] bytes at `bottom`, the lowest address
/// of the boot stack, registered as "boot".
///
/// # Safety
///
/// As [`plant`]: `bottom` is the bottom of the boot stack the caller runs
/// on, far enough below its current depth that the lowest [`BOOT_BAND`]
/// bytes are reached only by an overflow.
pub unsafe fn plant_boot(bottom: usize) {
    // SAFETY: the caller's promise.
    unsafe { plant("boot", bottom, BOOT_BAND) }
}

/// Band at the bottom of each AP stack.
pub const AP_BAND: usize = 4096;

/// Plants a band of [`AP_BAND`] bytes at the bottom of each of the
/// [`MAX_CPUS`](crate::smp::MAX_CPUS) AP stacks laid out from `base`, one
/// every `stride` bytes (stack `i` is `[base + i * stride, base + (i + 1) *
/// stride)`).
///
/// # Safety
///
/// As [`plant`], for every AP stack: call before any AP runs.
pub unsafe fn plant_ap_stacks(base: usize, stride: usize) {
    const NAMES: [&str; crate::smp::MAX_CPUS] =
        ["AP slot 0", "AP slot 1", "AP slot 2", "AP slot 3"];
    for (i, name) in NAMES.iter().enumerate() {
        // SAFETY: the caller's promise, for the lowest `AP_BAND` bytes of
        // stack `i`.
        unsafe { plant(name, base + i * stride, AP_BAND) };
    }
}
