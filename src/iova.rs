//! IOVA allocator: one contiguous, naturally aligned range per transaction.
//!
//! A buddy allocator over the domain's aperture. Every range is a power of two
//! in size and aligned to its size, which is what lets the page table use
//! 2 MiB / 1 GiB blocks whenever the physical memory is aligned too. Free
//! blocks of each order live in a fixed-capacity set, so nothing is heap
//! allocated; allocation and free cost O(orders × capacity) = O(1) for a given
//! configuration, and freeing coalesces buddies.

use crate::addr::PAGE_SHIFT;
use crate::error::DmaError;

/// Smallest order: one 4 KiB page.
const MIN_ORDER: u32 = PAGE_SHIFT;
/// Largest order: a 2^57-byte block (5-level tables).
const MAX_ORDER: u32 = 57;
const ORDERS: usize = (MAX_ORDER - MIN_ORDER + 1) as usize;

/// Free blocks one order may hold before the allocator reports
/// [`DmaError::AllocatorFull`].
pub const FREE_PER_ORDER: usize = 16;

/// A range handed out by [`IovaAllocator::alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IovaRange {
    /// First address.
    pub start: u64,
    /// Size in bytes: a power of two ≥ 4 KiB, and `start` is a multiple of it.
    pub size: u64,
}

/// Buddy allocator over `[start, end)`.
pub struct IovaAllocator {
    free: [heapless::Vec<u64, FREE_PER_ORDER>; ORDERS],
    start: u64,
    end: u64,
    in_use: u64,
}

fn order_of(size: u64) -> Option<u32> {
    if size == 0 {
        return None;
    }
    let o = size
        .checked_next_power_of_two()?
        .trailing_zeros()
        .max(MIN_ORDER);
    (o <= MAX_ORDER).then_some(o)
}

impl IovaAllocator {
    /// An allocator for the aperture `[start, end)`; both must be 4 KiB
    /// aligned and `start < end`.
    pub fn new(start: u64, end: u64) -> Result<Self, DmaError> {
        if start & 0xfff != 0 {
            return Err(DmaError::Unaligned { value: start });
        }
        if end & 0xfff != 0 {
            return Err(DmaError::Unaligned { value: end });
        }
        if start >= end {
            return Err(DmaError::BadConfig {
                what: "aperture",
                value: end,
            });
        }
        let mut a = Self {
            free: core::array::from_fn(|_| heapless::Vec::new()),
            start,
            end,
            in_use: 0,
        };
        // Cut the aperture into maximal aligned blocks; two of them are never
        // buddies, so coalescing by "buddy is free" never leaves the aperture.
        let mut cur = start;
        while cur < end {
            let align = if cur == 0 {
                MAX_ORDER
            } else {
                cur.trailing_zeros().min(MAX_ORDER)
            };
            let mut o = align;
            while o > MIN_ORDER && cur.checked_add(1u64 << o).is_none_or(|e| e > end) {
                o -= 1;
            }
            a.push(o, cur)?;
            cur += 1u64 << o;
        }
        Ok(a)
    }

    fn push(&mut self, order: u32, addr: u64) -> Result<(), DmaError> {
        let list = self
            .free
            .get_mut((order - MIN_ORDER) as usize)
            .ok_or(DmaError::AllocatorFull)?;
        list.push(addr).map_err(|_| DmaError::AllocatorFull)
    }

    fn take(&mut self, order: u32, addr: u64) -> bool {
        let Some(list) = self.free.get_mut((order - MIN_ORDER) as usize) else {
            return false;
        };
        match list.iter().position(|&a| a == addr) {
            Some(i) => {
                list.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// The aperture `[start, end)`.
    pub fn aperture(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Bytes handed out and not yet freed.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// A range of at least `size` bytes that lies entirely at or below `mask`
    /// (a device's DMA mask: the highest address it can emit).
    pub fn alloc(&mut self, size: u64, mask: u64) -> Result<IovaRange, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroLength);
        }
        let want = order_of(size).ok_or(DmaError::IovaExhausted { size })?;
        let bsize = 1u64 << want;
        // The range must fit under the mask at all.
        if self
            .start
            .checked_add(bsize - 1)
            .is_none_or(|last| last > mask)
            || bsize - 1 > mask
        {
            return Err(DmaError::AboveDmaMask { size, mask });
        }
        // Lowest eligible block of the smallest order that has one.
        let mut found = None;
        for o in want..=MAX_ORDER {
            let list = &self.free[(o - MIN_ORDER) as usize];
            let best = list
                .iter()
                .copied()
                .filter(|&a| a.checked_add(bsize - 1).is_some_and(|last| last <= mask))
                .min();
            if let Some(a) = best {
                found = Some((o, a));
                break;
            }
        }
        let Some((mut o, addr)) = found else {
            return Err(DmaError::IovaExhausted { size });
        };
        // Every order the split passes through must have room for one more
        // free block; check first so a refusal changes nothing.
        if (want..o).any(|k| self.free[(k - MIN_ORDER) as usize].is_full()) {
            return Err(DmaError::AllocatorFull);
        }
        self.take(o, addr);
        // Split down, keeping the low half; the high halves become free.
        while o > want {
            o -= 1;
            self.push(o, addr + (1u64 << o))?;
        }
        self.in_use += bsize;
        Ok(IovaRange {
            start: addr,
            size: bsize,
        })
    }

    /// Gives a range back, coalescing it with free buddies.
    ///
    /// `range` must be one handed out by [`alloc`](Self::alloc) and not freed
    /// since; a range outside the aperture or misaligned is refused.
    pub fn free(&mut self, range: IovaRange) -> Result<(), DmaError> {
        let Some(mut o) = order_of(range.size) else {
            return Err(DmaError::ZeroLength);
        };
        if 1u64 << o != range.size || range.start & (range.size - 1) != 0 {
            return Err(DmaError::Unaligned { value: range.start });
        }
        if range.start < self.start
            || range
                .start
                .checked_add(range.size)
                .is_none_or(|e| e > self.end)
        {
            return Err(DmaError::OutsideTransaction {
                offset: range.start,
                len: range.size,
                size: self.end,
            });
        }
        let mut addr = range.start;
        while o < MAX_ORDER {
            let buddy = addr ^ (1u64 << o);
            if !self.take(o, buddy) {
                break;
            }
            addr &= !(1u64 << o);
            o += 1;
        }
        self.push(o, addr)?;
        self.in_use = self.in_use.saturating_sub(range.size);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_naturally_aligned_and_disjoint() {
        let mut a = IovaAllocator::new(0x1000, 0x1000_0000).unwrap();
        let r1 = a.alloc(0x3000, u64::MAX).unwrap();
        assert_eq!(r1.size, 0x4000);
        assert_eq!(r1.start % 0x4000, 0);
        let r2 = a.alloc(0x20_0000, u64::MAX).unwrap();
        assert_eq!(r2.start % 0x20_0000, 0);
        assert!(r1.start + r1.size <= r2.start || r2.start + r2.size <= r1.start);
        assert!(r1.start >= 0x1000);
    }

    #[test]
    fn free_coalesces_back_to_the_whole_aperture() {
        let mut a = IovaAllocator::new(0, 1 << 30).unwrap();
        let rs: heapless::Vec<IovaRange, 64> = (0..64)
            .map(|_| a.alloc(0x1000, u64::MAX).unwrap())
            .collect();
        for r in rs.iter().rev() {
            a.free(*r).unwrap();
        }
        assert_eq!(a.in_use(), 0);
        assert_eq!(
            a.alloc(1 << 30, u64::MAX).unwrap(),
            IovaRange {
                start: 0,
                size: 1 << 30
            }
        );
    }

    #[test]
    fn dma_mask_is_respected() {
        let mut a = IovaAllocator::new(0, 1 << 40).unwrap();
        let r = a.alloc(0x10000, 0x0fff_ffff).unwrap();
        assert!(r.start + r.size - 1 <= 0x0fff_ffff);
        assert_eq!(
            a.alloc(1 << 29, 0x0fff_ffff),
            Err(DmaError::AboveDmaMask {
                size: 1 << 29,
                mask: 0x0fff_ffff
            })
        );
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = IovaAllocator::new(0x10000, 0x20000).unwrap();
        a.alloc(0x10000, u64::MAX).unwrap();
        assert_eq!(
            a.alloc(0x1000, u64::MAX),
            Err(DmaError::IovaExhausted { size: 0x1000 })
        );
    }
}
