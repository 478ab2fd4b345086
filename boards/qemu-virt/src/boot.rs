//! Entry from QEMU at EL2 (`virtualization=on`) or EL1: stack, BSS, FP/SIMD,
//! exception vectors (IRQs go to [`crate::irq::irq_exception`], everything
//! else is unexpected), then [`crate::main`]. The MMU stays off, so every data
//! access is Device-nGnRnE (the target is `+strict-align`, so that is fine).

use core::arch::global_asm;

global_asm!(
    r#"
    .section .text.boot, "ax"
    .global _start
_start:
    // Only CPU 0 runs (QEMU starts secondaries in PSCI off; be safe anyway).
    mrs     x1, mpidr_el1
    and     x1, x1, #0xff
    cbnz    x1, 9f

    mrs     x19, CurrentEL
    ubfx    x19, x19, #2, #2
    cmp     x19, #2
    b.eq    2f
    cmp     x19, #1
    b.ne    9f

    // EL1: vectors, FP/SIMD on (CPACR_EL1.FPEN = 0b11).
    adr     x1, exception_vectors
    msr     vbar_el1, x1
    mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    b       4f

2:  // EL2: vectors, FP/SIMD not trapped (CPTR_EL2 layout depends on HCR_EL2.E2H).
    adr     x1, exception_vectors
    msr     vbar_el2, x1
    mrs     x1, hcr_el2
    tbnz    x1, #34, 3f
    mov     x1, #0x33ff             // RES1 bits, TFP = 0
    msr     cptr_el2, x1
    b       4f
3:  mov     x1, #(3 << 20)          // E2H = 1: FPEN = 0b11
    msr     cptr_el2, x1

4:  isb
    adrp    x1, __stack_top
    add     x1, x1, :lo12:__stack_top
    mov     sp, x1

    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
5:  cmp     x1, x2
    b.hs    6f
    str     xzr, [x1], #8
    b       5b

6:  mov     x0, x19
    bl      {main}
9:  wfe
    b       9b

    // Exception vectors: 16 entries of 0x80 bytes. An IRQ taken at the
    // current EL on SP_ELx (entry 5) goes to `irq_entry`; every other entry
    // is unexpected: it reports its index and never returns.
    .balign 0x800
    .global exception_vectors
exception_vectors:
    .set    idx, 0
    .rept   16
    .balign 0x80
    .if     idx == 5
    b       irq_entry
    .else
    mov     x0, #idx
    b       exception_common
    .endif
    .set    idx, idx + 1
    .endr
exception_common:
    // The boot CPU reports on a fresh boot stack; an AP (smp.rs) keeps its
    // own stack rather than overwrite the boot CPU's.
    mrs     x1, mpidr_el1
    and     x1, x1, #0xff
    cbnz    x1, 1f
    adrp    x1, __stack_top
    add     x1, x1, :lo12:__stack_top
    mov     sp, x1
1:  b       {exception}

    // IRQ: save what the AAPCS64 lets a call clobber (x0-x18, x30) and all
    // of FP/SIMD (the interrupted code may hold 128-bit values in v8-v15,
    // whose upper halves a call may clobber) with FPCR/FPSR, on the
    // interrupted stack; run the dispatcher; restore; return. ELR/SPSR need
    // no saving: IRQs stay masked until `eret`, and any other exception in
    // the handler ends the run.
irq_entry:
    sub     sp, sp, #0x2b0
    stp     x0, x1, [sp, #0x00]
    stp     x2, x3, [sp, #0x10]
    stp     x4, x5, [sp, #0x20]
    stp     x6, x7, [sp, #0x30]
    stp     x8, x9, [sp, #0x40]
    stp     x10, x11, [sp, #0x50]
    stp     x12, x13, [sp, #0x60]
    stp     x14, x15, [sp, #0x70]
    stp     x16, x17, [sp, #0x80]
    stp     x18, x30, [sp, #0x90]
    mrs     x0, fpcr
    mrs     x1, fpsr
    stp     x0, x1, [sp, #0xa0]
    stp     q0, q1, [sp, #0xb0]
    stp     q2, q3, [sp, #0xd0]
    stp     q4, q5, [sp, #0xf0]
    stp     q6, q7, [sp, #0x110]
    stp     q8, q9, [sp, #0x130]
    stp     q10, q11, [sp, #0x150]
    stp     q12, q13, [sp, #0x170]
    stp     q14, q15, [sp, #0x190]
    stp     q16, q17, [sp, #0x1b0]
    stp     q18, q19, [sp, #0x1d0]
    stp     q20, q21, [sp, #0x1f0]
    stp     q22, q23, [sp, #0x210]
    stp     q24, q25, [sp, #0x230]
    stp     q26, q27, [sp, #0x250]
    stp     q28, q29, [sp, #0x270]
    stp     q30, q31, [sp, #0x290]
    bl      {irq}
    ldp     q0, q1, [sp, #0xb0]
    ldp     q2, q3, [sp, #0xd0]
    ldp     q4, q5, [sp, #0xf0]
    ldp     q6, q7, [sp, #0x110]
    ldp     q8, q9, [sp, #0x130]
    ldp     q10, q11, [sp, #0x150]
    ldp     q12, q13, [sp, #0x170]
    ldp     q14, q15, [sp, #0x190]
    ldp     q16, q17, [sp, #0x1b0]
    ldp     q18, q19, [sp, #0x1d0]
    ldp     q20, q21, [sp, #0x1f0]
    ldp     q22, q23, [sp, #0x210]
    ldp     q24, q25, [sp, #0x230]
    ldp     q26, q27, [sp, #0x250]
    ldp     q28, q29, [sp, #0x270]
    ldp     q30, q31, [sp, #0x290]
    ldp     x0, x1, [sp, #0xa0]
    msr     fpcr, x0
    msr     fpsr, x1
    ldp     x0, x1, [sp, #0x0]
    ldp     x2, x3, [sp, #0x10]
    ldp     x4, x5, [sp, #0x20]
    ldp     x6, x7, [sp, #0x30]
    ldp     x8, x9, [sp, #0x40]
    ldp     x10, x11, [sp, #0x50]
    ldp     x12, x13, [sp, #0x60]
    ldp     x14, x15, [sp, #0x70]
    ldp     x16, x17, [sp, #0x80]
    ldp     x18, x30, [sp, #0x90]
    add     sp, sp, #0x2b0
    eret
    "#,
    main = sym crate::main,
    exception = sym crate::exception::unexpected_exception,
    irq = sym crate::irq::irq_exception,
);
