//! Bare-metal aarch64 test image for QEMU `virt` with an SMMUv3: boots at EL2
//! (or EL1), finds the two edu devices, and runs the tests of [`tests::TESTS`].
//!
//! Run with `cargo xtask board virt-smmuv3` from the repository root.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// A test's `Fail` is a 200-byte string on purpose: a readable reason without
// an allocator. Returning it by value is fine for a test image.
#![allow(clippy::result_large_err)]

#[macro_use]
mod uart;
#[macro_use]
mod harness;
mod boot;
mod edu;
mod exception;
mod exit;
mod memory;
mod pci;
mod tests;
mod time;

use bare_iommu::DeviceId;

use crate::edu::Edu;
use crate::harness::Ctx;
use crate::memory::MEMORY;

/// Base of the SMMUv3 on QEMU `virt` (register page 0; page 1 at + 0x10000).
pub const SMMU_BASE: usize = 0x0905_0000;

/// Slots the xtask pins the two edu devices at (`-device edu,addr=05.0` and `06.0`).
const EDU_SLOTS: [u8; 2] = [5, 6];

/// Entered from `boot.rs` with the exception level.
extern "C" fn main(el: u64) -> ! {
    uart::init();
    println!(
        "board qemu-virt: EL{el}, {} tests{}",
        tests::TESTS.len(),
        if harness::DEMO { " (demo)" } else { "" }
    );
    MEMORY.check_layout();
    let mut window = pci::MmioWindow::new();
    let edu = EDU_SLOTS.map(|slot| setup_edu(slot, &mut window));
    let mut ctx = Ctx {
        mem: &MEMORY,
        edu,
        smmu_base: SMMU_BASE,
        demo: harness::DEMO,
    };
    harness::run(&mut ctx, tests::TESTS)
}

/// Finds the edu at `slot` on bus 0, assigns its BAR 0 and enables it.
fn setup_edu(slot: u8, window: &mut pci::MmioWindow) -> Edu {
    let ecam = pci::Ecam::virt();
    let found = pci::find(ecam, edu::VENDOR, edu::DEVICE);
    let Some(&address) = found.iter().find(|a| a.device() == slot) else {
        panic!(
            "no edu at 00:{slot:02x}.0 (found {} edu): run with -device edu,addr={slot:02x}.0",
            found.len()
        );
    };
    let function = match pci::enable(ecam, address, window) {
        Ok(f) => f,
        Err(e) => panic!("edu: {e}"),
    };
    let Some(id) = DeviceId::new(0, address.bus(), address.device(), address.function()) else {
        panic!("edu at {address}: not a valid device/function");
    };
    // SAFETY: `function.bar0` is the BAR just assigned and enabled, and this is
    // the only wrapper for it.
    let edu = unsafe { Edu::new(id, function.bar0) };
    if !edu.alive() {
        panic!("edu {id} at {:#x} does not answer", function.bar0);
    }
    narrate!(
        "edu {id}: BAR0 {:#x} ({} KiB)",
        function.bar0,
        function.bar0_size >> 10
    );
    edu
}
