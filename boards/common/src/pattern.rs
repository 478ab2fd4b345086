//! The test pattern the boards' tests write and DMA, and the byte loops
//! their memory helpers share (volatile: devices write behind the CPU's
//! back).

use bare_iommu::PhysAddr;
use core::fmt;

/// Byte `i` of the test pattern of `seed`. Two seeds differ at every index
/// (the seed term is a bijection XORed in), and the byte depends on both the
/// low and the high byte of the index, so data that lands shifted, on the
/// wrong page or from another buffer shows.
pub fn pattern(seed: u8, i: usize) -> u8 {
    (i as u8) ^ ((i >> 8) as u8).wrapping_mul(0x3d) ^ seed.wrapping_mul(0x65).wrapping_add(0x5a)
}

/// The first byte that differed from what a test expected.
#[derive(Clone, Copy, Debug)]
pub struct Mismatch {
    /// Where.
    pub at: PhysAddr,
    /// What should be there.
    pub expected: u8,
    /// What is there.
    pub got: u8,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "byte at {} is {:#04x}, expected {:#04x}",
            self.at, self.got, self.expected
        )
    }
}

/// Writes `byte(i)` to each of the `len` bytes at `p`.
///
/// # Safety
///
/// `p` must be valid for writes of `len` bytes that nothing else is using.
pub unsafe fn fill_with(p: *mut u8, len: usize, byte: impl Fn(usize) -> u8) {
    for i in 0..len {
        // SAFETY: `i < len`, and the caller vouches for the range.
        unsafe { p.add(i).write_volatile(byte(i)) };
    }
}

/// Checks the `len` bytes at `p` (physical address `pa`) against
/// `expected(i)`; the first byte that differs otherwise.
///
/// # Safety
///
/// `p` must be valid for reads of `len` bytes.
pub unsafe fn check_with(
    p: *const u8,
    pa: PhysAddr,
    len: usize,
    expected: impl Fn(usize) -> u8,
) -> Result<(), Mismatch> {
    for i in 0..len {
        // SAFETY: `i < len`, and the caller vouches for the range.
        let got = unsafe { p.add(i).read_volatile() };
        let want = expected(i);
        if got != want {
            return Err(Mismatch {
                at: PhysAddr(pa.get() + i as u64),
                expected: want,
                got,
            });
        }
    }
    Ok(())
}
