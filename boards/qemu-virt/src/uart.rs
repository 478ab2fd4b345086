//! PL011 UART at 0x0900_0000: the byte output behind `print!` / `println!`
//! (`board_common::console`), transmit only.

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs};

/// Base of the PL011 on QEMU `virt`.
const PL011_BASE: usize = 0x0900_0000;

register_bitfields! [u32,
    /// UARTFR, PL011 TRM §3.3.3.
    FR [
        TXFF OFFSET(5) NUMBITS(1) []
    ],
    /// UARTCR, PL011 TRM §3.3.8.
    CR [
        UARTEN OFFSET(0) NUMBITS(1) [],
        TXE OFFSET(8) NUMBITS(1) [],
        RXE OFFSET(9) NUMBITS(1) []
    ]
];

register_structs! {
    /// PL011 registers, PL011 TRM §3.2.
    Pl011Regs {
        (0x00 => dr: ReadWrite<u32>),
        (0x04 => _reserved0),
        (0x18 => fr: ReadOnly<u32, FR::Register>),
        (0x1c => _reserved1),
        (0x30 => cr: ReadWrite<u32, CR::Register>),
        (0x34 => @END),
    }
}

fn regs() -> &'static Pl011Regs {
    // SAFETY: the PL011 is mapped at PL011_BASE on QEMU `virt`, the MMU is off
    // (identity), and the registers are only accessed through volatile cells.
    unsafe { &*(PL011_BASE as *const Pl011Regs) }
}

/// Enables the UART for transmit and receive (UARTCR = 0x301).
pub fn init() {
    regs()
        .cr
        .write(CR::UARTEN::SET + CR::TXE::SET + CR::RXE::SET);
}

/// Sends one byte (the output of `board_common::console`).
pub fn put(byte: u8) {
    // Bounded: QEMU never holds TXFF, and a real FIFO drains in microseconds.
    for _ in 0..1_000_000 {
        if !regs().fr.is_set(FR::TXFF) {
            break;
        }
    }
    regs().dr.set(u32::from(byte));
}
