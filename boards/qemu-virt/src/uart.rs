//! PL011 UART at 0x0900_0000: transmit only, unlocked (one CPU, no
//! interrupts), so a panic in the middle of a line can still print.

use core::fmt;
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

fn put(byte: u8) {
    // Bounded: QEMU never holds TXFF, and a real FIFO drains in microseconds.
    for _ in 0..1_000_000 {
        if !regs().fr.is_set(FR::TXFF) {
            break;
        }
    }
    regs().dr.set(u32::from(byte));
}

/// Writer for `core::fmt`.
pub struct Uart;

impl fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

/// Prints to the UART.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::uart::Uart, format_args!($($arg)*));
    }};
}

/// Prints a line to the UART.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}
