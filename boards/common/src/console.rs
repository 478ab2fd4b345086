//! The board's console: `print!` / `println!` write through the byte output
//! the board registers with [`init`], each `\n` sent as `\r\n`.
//!
//! Unlocked on purpose (one CPU, no interrupts), so a panic in the middle of
//! a line still prints.

use core::fmt;

/// The board's "send one byte" function.
static PUT: spin::Once<fn(u8)> = spin::Once::new();

/// Sends the console's output to `put` (the board's UART transmit). Output
/// before this call is dropped; a second call changes nothing.
pub fn init(put: fn(u8)) {
    PUT.call_once(|| put);
}

/// A `fmt::Write` to the registered output, `\n` as `\r\n`.
struct Console(fn(u8));

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                (self.0)(b'\r');
            }
            (self.0)(b);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    if let Some(&put) = PUT.get() {
        let _ = fmt::Write::write_fmt(&mut Console(put), args);
    }
}

/// Prints to the board's console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Prints a line to the board's console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {
        $crate::console::_print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
