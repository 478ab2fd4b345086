//! COM1 (16550 UART at I/O port 0x3f8): the byte output behind `print!` /
//! `println!` (`board_common::console`).

use crate::port::{inb, outb};

const COM1: u16 = 0x3f8;
/// Line status register offset; bit 5 = transmit holding register empty.
const LSR: u16 = 5;
const LSR_THRE: u8 = 1 << 5;
/// Bounded wait for the transmitter (QEMU's UART is always ready).
const TX_POLL_BUDGET: u32 = 100_000;

/// Programs COM1 for 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    // SAFETY: COM1 registers; programming the UART touches no memory.
    unsafe {
        outb(COM1 + 1, 0x00); // IER: no interrupts
        outb(COM1 + 3, 0x80); // LCR: DLAB
        outb(COM1, 0x01); // DLL: divisor 1 = 115200 baud
        outb(COM1 + 1, 0x00); // DLM
        outb(COM1 + 3, 0x03); // LCR: 8N1
        outb(COM1 + 2, 0xc7); // FCR: FIFO on, cleared
        outb(COM1 + 4, 0x0b); // MCR: DTR, RTS, OUT2
    }
}

/// Sends one byte (the output of `board_common::console`).
pub fn put(byte: u8) {
    for _ in 0..TX_POLL_BUDGET {
        // SAFETY: reading COM1's LSR has no side effect on memory.
        if unsafe { inb(COM1 + LSR) } & LSR_THRE != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: writing COM1's THR sends one byte.
    unsafe { outb(COM1, byte) }
}
