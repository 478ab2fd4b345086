//! Secondary CPUs on q35: the MADT's local APIC IDs, INIT-SIPI-SIPI through
//! the boot CPU's local APIC (xAPIC or x2APIC, [`irq::send_ipi`]), a
//! real-mode trampoline copied below 1 MiB that goes straight to long mode
//! on the boot CPU's page tables, a 64 KiB stack per AP, and
//! [`board_common::smp`]'s hand-over.
//!
//! The start-up sequence is the one of Intel SDM Vol. 3 §9.4.4.1 (INIT,
//! 10 ms, SIPI, 200 µs, SIPI). A SIPI starts the AP in real mode at
//! `vector << 12` (CS = vector << 8, IP = 0): the trampoline loads its own
//! GDT (64-bit code 0x08, data 0x10, like `boot.rs`), sets CR4.PAE, the
//! boot CPU's CR3, EFER.LME, then CR0.PE | PG together and far-jumps into
//! the 64-bit code segment, which is allowed straight from real mode (SDM
//! §10.8.5 asks for protected mode first; CPUs and QEMU accept the
//! combined step, as several boot loaders rely on). The AP then loads the
//! board's IDT (an exception on an AP ends the run with its vector), runs
//! [`board_common::smp::ap_main`] with interrupts off and halts; the next
//! INIT resets it.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::ptr::{addr_of, write_volatile};

use board_common::smp::{self, MAX_CPUS, SLOTS, Slot, SmpError, Starter};
use x86_64::registers::control::Cr3;

use crate::irq;

/// Where the trampoline runs: a free page below 1 MiB (SIPI vector 0x08).
/// Firmware data the board still reads (ACPI tables, in the BIOS area or
/// high RAM) is elsewhere; [`Cpus::start`] checks the DMAR is not here.
pub const TRAMPOLINE: usize = 0x8000;
/// Each AP's stack.
const STACK: usize = 64 * 1024;
/// ICR low words (SDM Vol. 3 11.6.1): INIT (delivery mode 101b) and
/// Start-up (110b | vector), both level assert.
const ICR_INIT: u32 = 0x4500;
const ICR_STARTUP: u32 = 0x4600;
/// TSC ticks in a second: QEMU's TSC under `-icount` counts virtual
/// nanoseconds; elsewhere it runs at least this fast, so waits measured in
/// it are at least this long.
const TSC_PER_SECOND: u64 = 1_000_000_000;

#[repr(C, align(16))]
struct Stacks(UnsafeCell<[[u8; STACK]; MAX_CPUS]>);

// SAFETY: only the trampoline reaches the bytes (through the stack pointer
// `start` writes), each AP its own stack, and an AP index is started again
// only after its last job reported DONE.
unsafe impl Sync for Stacks {}

static AP_STACKS: Stacks = Stacks(UnsafeCell::new([[0; STACK]; MAX_CPUS]));

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_tramp_start, ap_tramp_end, ap_tramp_cr3, ap_tramp_stack, ap_tramp_cpu
    .code16
ap_tramp_start:
    cli
    cld
    mov     %cs, %ax
    mov     %ax, %ds
    lgdtl   ap_tramp_gdt_ptr - ap_tramp_start
    mov     %cr4, %eax
    or      $0x20, %eax                 /* PAE */
    mov     %eax, %cr4
    movl    ap_tramp_cr3 - ap_tramp_start, %eax
    mov     %eax, %cr3
    mov     $0xc0000080, %ecx           /* EFER.LME */
    rdmsr
    or      $0x100, %eax
    wrmsr
    mov     %cr0, %eax
    or      $0x80000001, %eax           /* PG | PE */
    mov     %eax, %cr0
    ljmpl   $0x08, ${tramp} + ap_tramp_64 - ap_tramp_start

    .code64
ap_tramp_64:
    mov     $0x10, %eax
    mov     %eax, %ds
    mov     %eax, %es
    mov     %eax, %ss
    xor     %eax, %eax
    mov     %eax, %fs
    mov     %eax, %gs
    mov     {tramp} + ap_tramp_stack - ap_tramp_start, %rsp
    mov     {tramp} + ap_tramp_cpu - ap_tramp_start, %rdi
    xor     %ebp, %ebp
    movabs  ${entry}, %rax
    call    *%rax
1:  cli
    hlt
    jmp     1b

    .balign 8
ap_tramp_gdt:
    .quad   0
    .quad   0x00af9a000000ffff          /* 0x08: 64-bit code */
    .quad   0x00cf92000000ffff          /* 0x10: data */
ap_tramp_gdt_ptr:
    .word   ap_tramp_gdt_ptr - ap_tramp_gdt - 1
    .long   {tramp} + ap_tramp_gdt - ap_tramp_start
    .balign 8
ap_tramp_cr3:
    .quad   0
ap_tramp_stack:
    .quad   0
ap_tramp_cpu:
    .quad   0
ap_tramp_end:
    .text
"#,
    tramp = const TRAMPOLINE,
    entry = sym ap_entry,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_stack: u8;
    static ap_tramp_cpu: u8;
}

/// The CPUs of the MADT.
pub struct Cpus {
    /// Local APIC ID of CPU index i (0: the boot CPU).
    apic: heapless::Vec<u32, MAX_CPUS>,
    /// The DMAR's bytes, which the trampoline must not overwrite.
    dmar: (usize, usize),
}

static CPUS: spin::Once<Cpus> = spin::Once::new();

/// Records the MADT's CPUs (the boot CPU, `boot_apic`, first) and the
/// firmware range to keep clear of; later calls change nothing.
pub fn init(madt: &[u32], boot_apic: u32, dmar: &'static [u8]) -> &'static Cpus {
    CPUS.call_once(|| {
        let mut apic = heapless::Vec::new();
        let _ = apic.push(boot_apic);
        for &id in madt.iter().filter(|&&id| id != boot_apic) {
            let _ = apic.push(id);
        }
        Cpus {
            apic,
            dmar: (dmar.as_ptr() as usize, dmar.len()),
        }
    })
}

fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn delay(ticks: u64) {
    let start = tsc();
    while tsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

impl Starter for Cpus {
    fn cpus(&self) -> usize {
        self.apic.len()
    }

    /// Copies the trampoline to [`TRAMPOLINE`] with this AP's stack and
    /// index, then INIT, SIPI, SIPI. Error codes: -1 no such CPU, -2 the
    /// trampoline page holds the DMAR, -3 an IPI stayed pending.
    fn start(&self, cpu: usize, _slot: &'static Slot) -> Result<(), i64> {
        let apic = *self.apic.get(cpu).ok_or(-1i64)?;
        let base = addr_of!(ap_tramp_start) as usize;
        let len = addr_of!(ap_tramp_end) as usize - base;
        let (dmar, dmar_len) = self.dmar;
        if dmar < TRAMPOLINE + 4096 && TRAMPOLINE < dmar + dmar_len {
            return Err(-2);
        }
        let at = |sym: *const u8| TRAMPOLINE + (sym as usize - base);
        let stack_top = AP_STACKS.0.get() as usize + (cpu + 1) * STACK;
        // SAFETY: the trampoline page is RAM below 1 MiB that nothing else
        // uses after boot (checked against the DMAR above), identity-mapped;
        // no AP runs the trampoline now (`smp::run` starts one AP at a time
        // and waits until it left the trampoline). The three data words are
        // inside the copied range.
        unsafe {
            core::ptr::copy_nonoverlapping(base as *const u8, TRAMPOLINE as *mut u8, len);
            write_volatile(
                at(addr_of!(ap_tramp_cr3)) as *mut u64,
                Cr3::read_raw().0.start_address().as_u64(),
            );
            write_volatile(at(addr_of!(ap_tramp_stack)) as *mut u64, stack_top as u64);
            write_volatile(at(addr_of!(ap_tramp_cpu)) as *mut u64, cpu as u64);
        }
        // The copy is visible before the AP runs it (the IPI write is an
        // uncached MMIO / MSR write; this keeps the compiler from sinking
        // the stores).
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        let vector = (TRAMPOLINE >> 12) as u32;
        let ok = irq::send_ipi(apic, ICR_INIT)
            && {
                delay(TSC_PER_SECOND / 100);
                irq::send_ipi(apic, ICR_STARTUP | vector)
            }
            && {
                delay(TSC_PER_SECOND / 5000);
                irq::send_ipi(apic, ICR_STARTUP | vector)
            };
        if ok { Ok(()) } else { Err(-3) }
    }

    fn now(&self) -> u64 {
        tsc()
    }

    fn per_second(&self) -> u64 {
        TSC_PER_SECOND
    }
}

/// The AP's Rust entry from the trampoline (interrupts off, its own stack).
extern "C" fn ap_entry(cpu: u64) {
    irq::load_idt();
    if let (Some(cpus), Some(slot)) = (CPUS.get(), SLOTS.get(cpu as usize)) {
        smp::ap_main(cpus, slot);
    }
    // SAFETY: the trampoline halts after the return; nothing else to do.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Plants the stack canary band at the bottom of every AP stack (at
/// boot, before any AP runs).
pub fn plant_stack_canaries() {
    // SAFETY: no AP runs before `smp::run`; an AP uses its stack from the
    // top, and its lowest 4 KiB only by overflowing.
    unsafe { board_common::stack_canary::plant_ap_stacks(AP_STACKS.0.get() as usize, STACK) };
}

/// The board's [`Starter`], once [`init`] ran (for `board_common::smp`'s
/// own entry points).
pub fn starter() -> Option<&'static dyn Starter> {
    CPUS.get().map(|c| c as &dyn Starter)
}

/// Runs `job(i)` on `cpus` CPUs at once (see [`board_common::smp::run`]);
/// a job still running after `seconds` of virtual time ends the run.
pub fn run(cpus: usize, seconds: u64, job: smp::Job<'_>) -> Result<(), SmpError> {
    let Some(c) = CPUS.get() else {
        return Err(SmpError::TooFewCpus {
            want: cpus,
            have: 1,
        });
    };
    smp::run(c, cpus, seconds, job)
}
