//! PVH entry: the ELF note QEMU looks for, and the 32-bit → 64-bit trampoline.
//!
//! QEMU's `-kernel` loader finds the `XEN_ELFNOTE_PHYS32_ENTRY` note (type 18,
//! name "Xen") and starts the CPU at that address in 32-bit protected mode,
//! paging off, flat segments, `ebx` pointing at `hvm_start_info`. The
//! trampoline zeroes BSS, identity-maps the first 4 GiB with 2 MiB pages
//! (uncached from 0xb000_0000 up: ECAM, PCI BARs, VT-d, APICs), loads a GDT,
//! enters long mode and calls [`board_main`](crate::board_main) with the
//! `hvm_start_info` address.

core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi                  /* hvm_start_info, kept in esi */

    /* Zero BSS (page tables and stack live there). */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT */
    mov $boot_pdpt, %eax
    or $0x3, %eax                   /* present, writable */
    mov %eax, boot_pml4

    /* PDPT[0..4] -> the four page directories */
    mov $boot_pd, %eax
    or $0x3, %eax
    xor %ecx, %ecx
1:  mov %eax, boot_pdpt(,%ecx,8)
    add $0x1000, %eax
    inc %ecx
    cmp $4, %ecx
    jb 1b

    /* 2048 x 2 MiB pages: identity map of [0, 4 GiB) */
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax                  /* present, writable, 2 MiB page */
    cmp $0x580, %ecx                /* 0xb000_0000 >> 21 */
    jb 3f
    or $0x18, %eax                  /* PWT | PCD: uncached MMIO */
3:  mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    /* Long mode: PAE, CR3, EFER.LME, then paging. */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    mov %esi, %edi                  /* arg 0: hvm_start_info (zero-extended) */
    call board_main
4:  cli
    hlt
    jmp 4b

    .section .rodata.boot_gdt, "a"
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff        /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .balign 16
    .global boot_stack
boot_stack:
    .skip 1024 * 1024
boot_stack_top:
"#,
    options(att_syntax)
);
