//! Secondary CPUs on QEMU `virt`: PSCI CPU_ON through the conduit the DTB's
//! `/psci` node names (`method`: `hvc` at EL1, `smc` when the board runs at
//! EL2 — an HVC would trap to the board itself), the CPUs' MPIDRs from
//! `/cpus/cpu@…`, a 64 KiB stack per AP, and [`board_common::smp`]'s
//! hand-over. An AP enters [`ap_start`] at the boot CPU's exception level
//! (QEMU starts it at the caller's EL, Arm DEN 0022 §5.1.4 leaves it to the
//! firmware, so both are handled), sets up its vectors and FP/SIMD as
//! `boot.rs` does, runs [`board_common::smp::ap_main`] and switches itself
//! off with PSCI CPU_OFF. Nothing runs on an AP between jobs.
//!
//! The MMU stays off on every CPU, so all data is Device-nGnRnE; QEMU's
//! exclusives (the spin locks, the atomics) work on it, real silicon need
//! not (Arm ARM B2.9.6: exclusives to Device memory are IMPLEMENTATION
//! DEFINED), which is one reason a real port turns the MMU on first.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;

use board_common::smp::{self, MAX_CPUS, SLOTS, Slot, SmpError, Starter};

use crate::fdt::{self, Fdt, FdtError};
use crate::time;

/// Each AP's stack.
const STACK: usize = 64 * 1024;

/// PSCI function IDs (Arm DEN 0022, SMC64 where there is one).
const CPU_OFF: u64 = 0x8400_0002;
const CPU_ON_64: u64 = 0xc400_0003;
const AFFINITY_INFO_64: u64 = 0xc400_0004;
/// AFFINITY_INFO: the affinity instance is OFF.
const AFF_OFF: i64 = 1;

#[repr(C, align(16))]
struct Stacks(UnsafeCell<[[u8; STACK]; MAX_CPUS]>);

// SAFETY: only the APs' `ap_start` reaches the bytes (through `sym`), each AP
// its own stack, and one AP per index runs at a time (`Starter::start`
// waits for the last one to be OFF).
unsafe impl Sync for Stacks {}

static AP_STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK]; MAX_CPUS]));

// AP entry (PSCI CPU_ON entry point): x0 = context id = the CPU index.
// Vectors and FP/SIMD as in boot.rs, then the stack of that index.
global_asm!(
    r#"
    .section .text.ap, "ax"
    .global ap_start
    .balign 4
ap_start:
    mov     x20, x0
    mrs     x19, CurrentEL
    ubfx    x19, x19, #2, #2
    cmp     x19, #2
    b.eq    2f
    adr     x1, exception_vectors
    msr     vbar_el1, x1
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    b       4f
2:  adr     x1, exception_vectors
    msr     vbar_el2, x1
    mrs     x1, hcr_el2
    tbnz    x1, #34, 3f
    mov     x1, #0x33ff
    msr     cptr_el2, x1
    b       4f
3:  mov     x1, #(3 << 20)
    msr     cptr_el2, x1
4:  isb
    adrp    x1, {stacks}
    add     x1, x1, :lo12:{stacks}
    add     x2, x20, #1
    mov     x3, #{stack}
    madd    x1, x2, x3, x1
    mov     sp, x1
    mov     x0, x20
    bl      {main}
5:  wfe
    b       5b
    "#,
    stacks = sym AP_STACKS,
    stack = const STACK,
    main = sym ap_rust,
);

unsafe extern "C" {
    /// The AP entry point above.
    fn ap_start();
}

/// The CPUs and the conduit, from the DTB.
pub struct Psci {
    smc: bool,
    /// MPIDR affinity of CPU index i (0: the boot CPU).
    mpidr: [u64; MAX_CPUS],
    count: usize,
}

static PSCI: spin::Once<Result<Psci, FdtError>> = spin::Once::new();

/// Reads `/psci` and `/cpus` once.
pub fn psci() -> Result<&'static Psci, FdtError> {
    PSCI.call_once(|| {
        // SAFETY: QEMU placed the DTB below the image (link.ld), in RAM that
        // nothing else uses or writes.
        let dt = unsafe { Fdt::at(fdt::VIRT_DTB) }?;
        let smc = dt.psci_uses_smc()?;
        let me = mpidr() & 0xff_00ff_ffff;
        let mut mpidr = [me; MAX_CPUS];
        let mut count = 1;
        dt.cpu_mpidrs(|m| {
            if m != me && count < MAX_CPUS {
                mpidr[count] = m;
                count += 1;
            }
        })?;
        Ok(Psci { smc, mpidr, count })
    })
    .as_ref()
    .map_err(|e| *e)
}

fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

impl Psci {
    /// A PSCI call through the DTB's conduit (SMC Calling Convention: x0
    /// function ID and result, x1–x3 arguments).
    fn call(&self, function: u64, a1: u64, a2: u64, a3: u64) -> i64 {
        let r: u64;
        if self.smc {
            // SAFETY: the DTB names SMC as the PSCI conduit: the firmware
            // (QEMU) handles it and returns; registers the SMCCC lets it
            // clobber are marked so.
            unsafe {
                asm!("smc #0", inout("x0") function => r, inout("x1") a1 => _,
                     inout("x2") a2 => _, inout("x3") a3 => _, clobber_abi("C"))
            };
        } else {
            // SAFETY: as above, through HVC (the board runs at EL1).
            unsafe {
                asm!("hvc #0", inout("x0") function => r, inout("x1") a1 => _,
                     inout("x2") a2 => _, inout("x3") a3 => _, clobber_abi("C"))
            };
        }
        r as i64
    }

    /// The conduit's name.
    pub fn conduit(&self) -> &'static str {
        if self.smc { "smc" } else { "hvc" }
    }
}

impl Starter for Psci {
    fn cpus(&self) -> usize {
        self.count
    }

    /// Waits (bounded) until the AP is OFF (it switches itself off after
    /// its last job), then CPU_ON with [`ap_start`] and the index.
    fn start(&self, cpu: usize, _slot: &'static Slot) -> Result<(), i64> {
        let target = *self.mpidr.get(cpu).ok_or(-2i64)?;
        let start = time::ticks();
        loop {
            let state = self.call(AFFINITY_INFO_64, target, 0, 0);
            if state == AFF_OFF {
                break;
            }
            if time::ticks().wrapping_sub(start) > time::frequency() {
                return Err(100 + state);
            }
            core::hint::spin_loop();
        }
        let entry = ap_start as *const () as usize as u64;
        match self.call(CPU_ON_64, target, entry, cpu as u64) {
            0 => Ok(()),
            e => Err(e),
        }
    }

    fn now(&self) -> u64 {
        time::ticks()
    }

    fn per_second(&self) -> u64 {
        time::frequency()
    }

    fn wake(&self) {
        // SAFETY: SEV only signals an event to every PE.
        unsafe { asm!("sev", options(nomem, nostack)) };
    }
}

/// The Rust side of [`ap_start`]: the job hand-over, then CPU_OFF.
extern "C" fn ap_rust(cpu: u64) -> ! {
    if let (Ok(psci), Some(slot)) = (psci(), SLOTS.get(cpu as usize)) {
        smp::ap_main(psci, slot);
        psci.call(CPU_OFF, 0, 0, 0);
    }
    loop {
        // SAFETY: WFE only waits for an event.
        unsafe { asm!("wfe", options(nomem, nostack)) };
    }
}

/// Plants the stack canary band at the bottom of every AP stack (at
/// boot, before any AP runs).
pub fn plant_stack_canaries() {
    // SAFETY: no AP runs before `smp::run`; an AP uses its stack from the
    // top, and its lowest 4 KiB only by overflowing.
    unsafe { board_common::stack_canary::plant_ap_stacks(AP_STACKS.0.get() as usize, STACK) };
}

/// The board's [`Starter`] (for `board_common::smp`'s own entry points).
pub fn starter() -> Result<&'static dyn Starter, FdtError> {
    psci().map(|p| p as &dyn Starter)
}

/// Runs `job(i)` on `cpus` CPUs at once (see [`board_common::smp::run`]);
/// a job still running after `seconds` of virtual time ends the run.
pub fn run(cpus: usize, seconds: u64, job: smp::Job<'_>) -> Result<(), SmpError> {
    let psci = psci().map_err(|_| SmpError::TooFewCpus {
        want: cpus,
        have: 1,
    })?;
    smp::run(psci, cpus, seconds, job)
}
