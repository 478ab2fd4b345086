//! PL011 UART at 0x0900_0000: the byte output behind `print!` / `println!`
//! (`board_common::console`), transmit only, driven by the `arm-pl011-uart`
//! crate.

use arm_pl011_uart::{
    DataBits, LineConfig, PL011Registers, Parity, StopBits, Uart, UniqueMmioPointer,
};
use core::ptr::NonNull;

/// Base of the PL011 on QEMU `virt`.
const PL011_BASE: usize = 0x0900_0000;
/// UARTCLK of the PL011 on QEMU `virt` (the DTB's `apb-pclk`, 24 MHz).
const UARTCLK: u32 = 24_000_000;
/// Bounded wait for room in the transmit FIFO: QEMU never holds TXFF, and a
/// real FIFO drains in microseconds.
const TX_POLL_BUDGET: u32 = 1_000_000;

/// A handle on the PL011. The driver keeps no state of its own, so each
/// caller makes one for the bytes it sends and drops it.
fn pl011() -> Option<Uart<'static>> {
    let regs = NonNull::new(PL011_BASE as *mut PL011Registers)?;
    // SAFETY: the PL011's registers are mapped at PL011_BASE on QEMU `virt`
    // (MMU off: identity, device memory), only this module drives them, and a
    // handle lives only for one `init` or `put`.
    Some(Uart::new(unsafe { UniqueMmioPointer::new(regs) }))
}

/// Enables the UART for transmit and receive, 115200 8N1, FIFOs on.
pub fn init() {
    if let Some(mut uart) = pl011() {
        let line = LineConfig {
            data_bits: DataBits::Bits8,
            parity: Parity::None,
            stop_bits: StopBits::One,
        };
        // Only fails for a baud rate the clock cannot divide to.
        let _ = uart.enable(line, 115_200, UARTCLK);
    }
}

/// Sends one byte (the output of `board_common::console`).
pub fn put(byte: u8) {
    let Some(mut uart) = pl011() else { return };
    for _ in 0..TX_POLL_BUDGET {
        if !uart.is_tx_fifo_full() {
            break;
        }
    }
    uart.write_word(byte);
}
