//! Entry from QEMU at EL2 (`virtualization=on`) or EL1: stack, BSS, FP/SIMD,
//! exception vectors, then [`crate::main`]. The MMU stays off, so every data
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

    // Exception vectors: 16 entries of 0x80 bytes. None is expected: each one
    // reports its index and never returns.
    .balign 0x800
exception_vectors:
    .set    idx, 0
    .rept   16
    .balign 0x80
    mov     x0, #idx
    b       exception_common
    .set    idx, idx + 1
    .endr
exception_common:
    adrp    x1, __stack_top
    add     x1, x1, :lo12:__stack_top
    mov     sp, x1
    b       {exception}
    "#,
    main = sym crate::main,
    exception = sym crate::exception::unexpected_exception,
);
