//! Interrupts in long mode: an IDT, the local APIC (xAPIC), bounded waits
//! (MSRs, CR2/CR3, CS, `lidt`, `cli` and port I/O through the `x86_64` crate).
//!
//! [`init`] masks the legacy 8259 PICs, enables the local APIC through its
//! MMIO page at 0xfee0_0000 (identity-mapped uncached by [`boot`](crate::boot):
//! everything from 0xb000_0000 up is PWT|PCD) with every local interrupt
//! source masked, and loads an IDT whose stubs save the caller-saved
//! registers and call [`irq_dispatch`] with the vector. Exceptions end the run
//! with a message; [`TIMER_VECTOR`] (the APIC timer) bounds [`wait_until`];
//! [`DEVICE_VECTOR`] calls the handler registered with [`set_device_handler`],
//! then signals EOI. The CPU runs with interrupts disabled (the trampoline's
//! `cli`) except inside [`wait_until`] (and, on the boot CPU, for the run
//! of the SMP test, whose APs never enable them), so test code shares state
//! with a handler through locks it takes with interrupts off. [`send_ipi`]
//! and [`load_idt`] serve the APs ([`crate::smp`]).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use spin::{Mutex, Once};
use x86_64::VirtAddr;
use x86_64::instructions::interrupts;
use x86_64::instructions::port::Port;
use x86_64::instructions::tables::lidt;
use x86_64::registers::control::{Cr2, Cr3};
use x86_64::registers::model_specific::Msr;
use x86_64::registers::segmentation::{CS, Segment};
use x86_64::structures::DescriptorTablePointer;

/// The vector a device MSI is programmed to (data = vector, fixed delivery).
pub const DEVICE_VECTOR: u8 = 0x40;
/// The APIC timer's vector (bounds the waits).
pub const TIMER_VECTOR: u8 = 0x41;
/// The spurious-interrupt vector (SVR; no EOI for it, SDM Vol. 3 11.9).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Two vectors that only count and signal EOI: targets for remapped MSIs.
pub const COUNT_VECTORS: [u8; 2] = [0x42, 0x43];

/// xAPIC base (IA32_APIC_BASE reset value).
pub const LAPIC_BASE: usize = 0xfee0_0000;
/// MSI address: 0xfee in bits 31:20 (Intel SDM Vol. 3 11.11.1).
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const IA32_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE: xAPIC global enable (bit 11), x2APIC mode (bit 10).
const APIC_BASE_EN: u64 = 1 << 11;
const APIC_BASE_EXTD: u64 = 1 << 10;

// Local APIC register offsets (Intel SDM Vol. 3 table 11-1).
const LAPIC_ID: usize = 0x20;
const LAPIC_TPR: usize = 0x80;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_IRR: usize = 0x200;
const LAPIC_ICR_LO: usize = 0x300;
const LAPIC_ICR_HI: usize = 0x310;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_LVT_ERROR: usize = 0x370;
const LAPIC_TIMER_INIT: usize = 0x380;
const LAPIC_TIMER_DIV: usize = 0x3e0;
/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// LVT: masked.
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer: periodic mode.
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: divide by 16.
const TIMER_DIV_16: u32 = 0b0011;
/// Timer period in (divided) APIC bus ticks. QEMU's APIC bus runs at 1 GHz,
/// so this is 10 ms of virtual time; the waits count ticks, so a different
/// bus frequency changes how long they last, not whether they end.
const TIMER_PERIOD: u32 = 625_000;

/// Vectors that get a stub: the 32 exceptions, the three above and the
/// two [`COUNT_VECTORS`].
const STUBS: usize = 37;

// One stub per vector: push the vector, join the common path, which saves
// the caller-saved registers (the target has no SSE state and no red zone),
// aligns the stack and calls `irq_dispatch(vector)`. Exceptions that push an
// error code never return, so the stack layout only matters for interrupts.
global_asm!(
    r#"
    .section .text.irq, "ax"
    .code64
    .altmacro
    .macro irq_stub n
    irq_stub_\n:
        push $\n
        jmp irq_common
    .endm
    .macro irq_stub_ref n
        .quad irq_stub_\n
    .endm

    .set irq_n, 0
    .rept 32
        irq_stub %irq_n
        .set irq_n, irq_n + 1
    .endr
    irq_stub 64
    irq_stub 65
    irq_stub 255
    irq_stub 66
    irq_stub 67

irq_common:
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    push %rbp
    mov 80(%rsp), %rdi
    mov %rsp, %rbp
    and $-16, %rsp
    cld
    call irq_dispatch
    mov %rbp, %rsp
    pop %rbp
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $8, %rsp
    iretq

    .section .rodata.irq, "a"
    .balign 8
    .global irq_stub_table
irq_stub_table:
    .set irq_n, 0
    .rept 32
        irq_stub_ref %irq_n
        .set irq_n, irq_n + 1
    .endr
    irq_stub_ref 64
    irq_stub_ref 65
    irq_stub_ref 255
    irq_stub_ref 66
    irq_stub_ref 67
    .noaltmacro
"#,
    options(att_syntax)
);

unsafe extern "C" {
    /// Addresses of the stubs: vectors 0..32, then 0x40, 0x41, 0xff, 0x42, 0x43.
    static irq_stub_table: [u64; STUBS];
}

/// The vector of stub `i` of `irq_stub_table`.
const fn stub_vector(i: usize) -> u8 {
    match i {
        32 => DEVICE_VECTOR,
        33 => TIMER_VECTOR,
        34 => SPURIOUS_VECTOR,
        35 => COUNT_VECTORS[0],
        36 => COUNT_VECTORS[1],
        n => n as u8,
    }
}

/// A 64-bit interrupt gate (Intel SDM Vol. 3 6.14.1): 16 bytes.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Gate([u64; 2]);

impl Gate {
    const MISSING: Self = Self([0, 0]);

    /// Present, DPL 0, type 0xE (interrupt gate: IF cleared on entry), IST 0.
    fn interrupt(handler: u64, selector: u16) -> Self {
        let lo = (handler & 0xffff)
            | (u64::from(selector) << 16)
            | (0x8e << 40)
            | ((handler >> 16) & 0xffff) << 48;
        Self([lo, handler >> 32])
    }
}

/// The IDT: 256 gates, absent except the stubbed vectors.
#[repr(C, align(4096))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();
/// Interrupts taken per stubbed vector (index as in `irq_stub_table`).
static COUNTS: [AtomicU32; 5] = [const { AtomicU32::new(0) }; 5];
/// The local APIC is in x2APIC mode: registers are MSRs 0x800 + offset / 16.
static X2APIC: AtomicBool = AtomicBool::new(false);
/// What [`DEVICE_VECTOR`] calls.
static DEVICE_HANDLER: Mutex<Option<fn()>> = Mutex::new(None);
/// The local APIC is set up.
static READY: Once<u32> = Once::new();

/// What stopped the interrupt setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqError {
    /// IA32_APIC_BASE does not point at the xAPIC page the board maps.
    ApicBase(u64),
    /// x2APIC mode asked for, but the CPU does not offer it (CPUID.1:ECX.21).
    NoX2Apic,
    /// The page tables do not map the xAPIC page identity, writable and
    /// uncached: the leaf entry found (0 if none).
    ApicMapping(u64),
}

impl core::fmt::Display for IrqError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::ApicBase(v) => write!(f, "IA32_APIC_BASE = {v:#x}, expected {LAPIC_BASE:#x}"),
            Self::NoX2Apic => write!(f, "the CPU has no x2APIC (run with -cpu ...,+x2apic)"),
            Self::ApicMapping(e) => write!(
                f,
                "{LAPIC_BASE:#x} not mapped identity, writable, uncached (leaf entry {e:#x})"
            ),
        }
    }
}

/// IA32_APIC_BASE (Intel SDM Vol. 3 11.4.4).
fn read_apic_base() -> u64 {
    // SAFETY: IA32_APIC_BASE exists on every CPU QEMU models with an APIC;
    // reading it has no side effect.
    unsafe { Msr::new(IA32_APIC_BASE).read() }
}

/// Writes IA32_APIC_BASE.
fn write_apic_base(val: u64) {
    // SAFETY: `init` calls it only to set the global enable bit, keeping the
    // base the CPU already uses (checked to be the mapped xAPIC page);
    // `enable_x2apic` to set EN, then EXTD, on a CPU that offers x2APIC.
    unsafe { Msr::new(IA32_APIC_BASE).write(val) }
}

/// Reads MSR `msr`.
fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only called for the x2APIC register MSRs while the APIC is in
    // x2APIC mode (checked by the callers), where they exist; reads have no
    // side effect.
    unsafe { Msr::new(msr).read() }
}

/// Writes MSR `msr`.
fn wrmsr(msr: u32, val: u64) {
    // SAFETY: only called for x2APIC register MSRs while the APIC is in
    // x2APIC mode, with the values the xAPIC MMIO path would write.
    unsafe { Msr::new(msr).write(val) }
}

/// The x2APIC MSR of xAPIC register offset `off` (SDM Vol. 3 11.12.1.2).
const fn x2apic_msr(off: usize) -> u32 {
    0x800 + (off >> 4) as u32
}

fn lapic_read(off: usize) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        return rdmsr(x2apic_msr(off)) as u32;
    }
    // SAFETY: the xAPIC page is identity-mapped uncached (boot.rs) and
    // IA32_APIC_BASE was checked to point at it; `off` is a register offset
    // of table 11-1, 16-byte aligned.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + off) as *const u32) }
}

fn lapic_write(off: usize, val: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        return wrmsr(x2apic_msr(off), val.into());
    }
    // SAFETY: as for `lapic_read`.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + off) as *mut u32, val) }
}

/// The leaf page-table entry mapping `va` in the tables CR3 points at, and
/// the size of the page it maps (4-level paging, Intel SDM Vol. 3 4.5).
fn leaf_entry(va: u64) -> Option<(u64, u64)> {
    const PRESENT: u64 = 1;
    const PAGE_SIZE_BIT: u64 = 1 << 7;
    const FRAME: u64 = 0x000f_ffff_ffff_f000;
    let mut table = Cr3::read_raw().0.start_address().as_u64() & FRAME;
    for (level, shift) in [39u32, 30, 21, 12].into_iter().enumerate() {
        let index = (va >> shift) & 0x1ff;
        // SAFETY: `table` is a page-table page of the tables the CPU is
        // using (CR3 or a present non-leaf entry); the boot code builds them
        // in identity-mapped low memory. Reads only.
        let entry = unsafe { core::ptr::read_volatile((table + index * 8) as *const u64) };
        if entry & PRESENT == 0 {
            return None;
        }
        if shift == 12 || (level > 0 && entry & PAGE_SIZE_BIT != 0) {
            return Some((entry, 1 << shift));
        }
        table = entry & FRAME;
    }
    None
}

/// Checks the xAPIC page is mapped identity, present, writable and uncached
/// (PCD set: the boot code's PWT|PCD for everything from 0xb000_0000 up).
fn check_apic_mapping() -> Result<(), IrqError> {
    const WRITABLE: u64 = 1 << 1;
    const PCD: u64 = 1 << 4;
    let va = LAPIC_BASE as u64;
    let Some((entry, size)) = leaf_entry(va) else {
        return Err(IrqError::ApicMapping(0));
    };
    let frame = entry & 0x000f_ffff_ffff_f000 & !(size - 1);
    if frame != va & !(size - 1) || entry & WRITABLE == 0 || entry & PCD == 0 {
        return Err(IrqError::ApicMapping(entry));
    }
    Ok(())
}

/// Sets up the PICs (masked), the local APIC and the IDT; interrupts stay
/// disabled. Returns the local APIC ID. Idempotent.
pub fn init() -> Result<u32, IrqError> {
    if let Some(id) = READY.get() {
        return Ok(*id);
    }
    let base = read_apic_base();
    let x2 = base & APIC_BASE_EXTD != 0;
    X2APIC.store(x2, Ordering::Relaxed);
    if !x2 {
        if base & 0xf_ffff_f000 != LAPIC_BASE as u64 {
            return Err(IrqError::ApicBase(base));
        }
        check_apic_mapping()?;
        if base & APIC_BASE_EN == 0 {
            write_apic_base(base | APIC_BASE_EN);
        }
    }
    // SAFETY: OCW1 to both 8259 data ports masks every legacy IRQ line; the
    // board uses none of them.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
    for lvt in [LAPIC_LVT_TIMER, LAPIC_LVT_LINT0, LAPIC_LVT_ERROR] {
        lapic_write(lvt, LVT_MASKED);
    }
    // LINT1 stays as firmware left it (NMI); nothing raises one.
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));

    let idt = IDT.call_once(|| {
        let mut gates = [Gate::MISSING; 256];
        let cs = CS::get_reg().0;
        // SAFETY: irq_stub_table is a read-only table of STUBS addresses
        // emitted by the global_asm! above.
        let stubs = unsafe { &*core::ptr::addr_of!(irq_stub_table) };
        for (i, &stub) in stubs.iter().enumerate() {
            if let Some(g) = gates.get_mut(usize::from(stub_vector(i))) {
                *g = Gate::interrupt(stub, cs);
            }
        }
        Idt(gates)
    });
    let idtr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: the IDT is 'static and every present gate points at a stub
    // that saves what it clobbers and returns with iretq (or ends the run).
    unsafe { lidt(&idtr) };
    // xAPIC: the ID in bits 31:24; x2APIC: the whole 32-bit register.
    let id = if x2 {
        lapic_read(LAPIC_ID)
    } else {
        lapic_read(LAPIC_ID) >> 24
    };
    Ok(*READY.call_once(|| id))
}

/// Puts the local APIC in x2APIC mode (IA32_APIC_BASE EN then EN | EXTD,
/// SDM Vol. 3 11.12.5), before [`init`]. Interrupts stay disabled.
pub fn enable_x2apic() -> Result<(), IrqError> {
    // CPUID leaf 1 exists on every x86-64 CPU.
    let ecx = core::arch::x86_64::__cpuid(1).ecx;
    if ecx & (1 << 21) == 0 {
        return Err(IrqError::NoX2Apic);
    }
    let base = read_apic_base();
    if base & APIC_BASE_EN == 0 {
        write_apic_base(base | APIC_BASE_EN);
    }
    write_apic_base(base | APIC_BASE_EN | APIC_BASE_EXTD);
    Ok(())
}

/// Whether the local APIC runs in x2APIC mode (known after [`init`]).
pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// MSI address and data that deliver `vector` to this CPU's local APIC:
/// physical destination mode, fixed delivery, edge (SDM Vol. 3 11.11.1-2).
pub fn msi_for(apic_id: u32, vector: u8) -> (u64, u32) {
    (
        MSI_ADDRESS_BASE | (u64::from(apic_id & 0xff) << 12),
        u32::from(vector),
    )
}

/// ICR: delivery status (xAPIC only; SDM Vol. 3 11.6.1): the IPI is not yet sent.
const ICR_SEND_PENDING: u32 = 1 << 12;
/// Polls of the delivery status before an IPI counts as stuck.
const ICR_POLLS: u32 = 1_000_000;

/// Sends the inter-processor interrupt `icr_lo` (vector, delivery mode,
/// level; SDM Vol. 3 11.6.1) to the local APIC `apic_id`, physical
/// destination. xAPIC: destination in ICR bits 63:56, then the low word
/// (which sends), and a bounded wait for the delivery status to clear;
/// x2APIC: one 64-bit write of MSR 0x830 with the 32-bit destination in bits
/// 63:32 (SDM 11.12.9; no delivery status). `false` if it stayed pending.
pub fn send_ipi(apic_id: u32, icr_lo: u32) -> bool {
    if X2APIC.load(Ordering::Relaxed) {
        wrmsr(
            x2apic_msr(LAPIC_ICR_LO),
            (u64::from(apic_id) << 32) | u64::from(icr_lo),
        );
        return true;
    }
    lapic_write(LAPIC_ICR_HI, (apic_id & 0xff) << 24);
    lapic_write(LAPIC_ICR_LO, icr_lo);
    (0..ICR_POLLS).any(|_| {
        let idle = lapic_read(LAPIC_ICR_LO) & ICR_SEND_PENDING == 0;
        core::hint::spin_loop();
        idle
    })
}

/// Loads the board's IDT on this CPU (an AP: the boot CPU's [`init`] built
/// it); `false` if it is not built yet.
pub fn load_idt() -> bool {
    let Some(idt) = IDT.get() else {
        return false;
    };
    let idtr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(idt),
    };
    // SAFETY: as in `init`: the IDT is 'static and its gates point at the
    // stubs, which work on any CPU (they use the stack they interrupt).
    unsafe { lidt(&idtr) };
    true
}

/// Registers (or with `None` removes) the [`DEVICE_VECTOR`] handler.
pub fn set_device_handler(handler: Option<fn()>) {
    without_interrupts(|| *DEVICE_HANDLER.lock() = handler);
}

/// Interrupts taken so far on `vector` (one of the three non-exception ones).
pub fn count(vector: u8) -> u32 {
    counter(vector).map_or(0, |c| c.load(Ordering::SeqCst))
}

fn counter(vector: u8) -> Option<&'static AtomicU32> {
    match vector {
        DEVICE_VECTOR => COUNTS.first(),
        TIMER_VECTOR => COUNTS.get(1),
        SPURIOUS_VECTOR => COUNTS.get(2),
        v if v == COUNT_VECTORS[0] => COUNTS.get(3),
        v if v == COUNT_VECTORS[1] => COUNTS.get(4),
        _ => None,
    }
}

/// Whether `vector` is latched in the local APIC's IRR (accepted, not yet
/// delivered to the CPU).
pub fn requested(vector: u8) -> bool {
    let v = usize::from(vector);
    lapic_read(LAPIC_IRR + 0x10 * (v / 32)) & (1 << (v % 32)) != 0
}

/// Runs `f` with interrupts disabled, restoring IF afterwards (`x86_64`'s
/// `cli` / `sti` are compiler barriers, so no access to state shared with a
/// handler moves out of the critical section).
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    interrupts::without_interrupts(f)
}

/// Waits with `sti; hlt` until `done()` (checked with interrupts disabled)
/// holds or `ticks` periods of the APIC timer (~10 ms each) have passed;
/// returns whether `done()` held. Interrupts are disabled again on return.
pub fn wait_until(ticks: u32, mut done: impl FnMut() -> bool) -> bool {
    if READY.get().is_none() {
        return done();
    }
    let start = count(TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_DIV, TIMER_DIV_16);
    lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INIT, TIMER_PERIOD);
    let ok = loop {
        // `x86_64`'s cli is a compiler barrier (not `nomem`), like the sti/hlt.
        interrupts::disable();
        if done() {
            break true;
        }
        if count(TIMER_VECTOR).wrapping_sub(start) >= ticks {
            break false;
        }
        // SAFETY: sti's one-instruction shadow makes an interrupt that is
        // already pending wake the hlt rather than slip in before it; the
        // timer is running, so the hlt ends. Handlers run here, so this stays
        // hand-written: `x86_64`'s `enable_and_hlt` is `nomem`, not a
        // compiler barrier.
        unsafe { asm!("sti", "hlt", options(nostack)) };
    };
    lapic_write(LAPIC_TIMER_INIT, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    ok
}

/// Rust side of every stub: counts, runs the device handler, signals EOI.
#[unsafe(no_mangle)]
extern "C" fn irq_dispatch(vector: u64) {
    let v = vector as u8;
    if let Some(c) = counter(v) {
        c.fetch_add(1, Ordering::SeqCst);
    }
    match v {
        DEVICE_VECTOR => {
            // try_lock: test code takes the lock only with interrupts off.
            let handler = DEVICE_HANDLER.try_lock().and_then(|h| *h);
            if let Some(h) = handler {
                h();
            }
            lapic_write(LAPIC_EOI, 0);
        }
        TIMER_VECTOR => lapic_write(LAPIC_EOI, 0),
        v if COUNT_VECTORS.contains(&v) => lapic_write(LAPIC_EOI, 0),
        SPURIOUS_VECTOR => {}
        _ => {
            let cr2 = Cr2::read_raw();
            crate::harness::boot_failure(format_args!("CPU exception {vector} (cr2 {cr2:#x})"))
        }
    }
}
