//! COM1 (16550 UART at I/O port 0x3f8): the byte output behind `print!` /
//! `println!` (`board_common::console`), driven by the `uart_16550` crate.

use uart_16550::backend::PioBackend;
use uart_16550::{BaudRate, Config, Uart16550};

const COM1: u16 = 0x3f8;
/// Bounded wait for the transmitter (QEMU's UART is always ready).
const TX_POLL_BUDGET: u32 = 100_000;

/// A handle on COM1. The driver keeps no state `put` needs (FIFO on, no CTS
/// check, as `init` configures), so each caller makes its own: nothing is
/// locked, and an interrupt handler may print while the interrupted code is
/// printing.
fn com1() -> Option<Uart16550<PioBackend>> {
    // SAFETY: COM1's eight I/O ports belong to this UART, which only this
    // module drives; programming it touches no memory.
    unsafe { Uart16550::new_port(COM1) }.ok()
}

/// Programs COM1 for 115200 8N1, FIFOs on (trigger level 14), interrupts
/// off, DTR / RTS / OUT2 set. Without a UART the board runs silent.
pub fn init() {
    if let Some(mut uart) = com1() {
        let config = Config {
            baud_rate: BaudRate::Baud115200,
            ..Config::DEFAULT
        };
        let _ = uart.init(config);
    }
}

/// Sends one byte (the output of `board_common::console`); drops it if the
/// transmitter stays busy for the whole budget.
pub fn put(byte: u8) {
    let Some(mut uart) = com1() else { return };
    for _ in 0..TX_POLL_BUDGET {
        if uart.try_send_byte(byte).is_ok() {
            return;
        }
        core::hint::spin_loop();
    }
}
