//! IOVA allocator: one contiguous, naturally aligned range per transaction.
//!
//! Every range is a power of two in size and aligned to its size, which is
//! what lets the page table use 2 MiB / 1 GiB blocks whenever the physical
//! memory is aligned too. The allocator keeps the ranges *handed out*, sorted,
//! in a fixed-capacity list (no heap): allocation takes the lowest aligned gap
//! that fits (first fit), and giving a range back only removes its entry, so
//! it cannot fail for lack of room. (A buddy allocator's free lists can fill
//! up on a free, after the caller has already torn its mappings down, and
//! leave that range unreleasable for ever.) The cost: at most [`MAX_RANGES`]
//! transactions in flight per domain, and O(ranges) per allocation.
//!
//! Beside the ranges it hands out, the allocator keeps up to [`MAX_FIXED`]
//! *fixed* ranges of any page-multiple size at addresses the caller chose
//! (also sorted, also heapless): [`reserve`](IovaAllocator::reserve)d ranges,
//! never handed out and never linked (Linux `reserve_iova`, e.g. the x86
//! interrupt window), and [`alloc_at`](IovaAllocator::alloc_at) ranges,
//! live like an allocated one but at a fixed address (identity maps,
//! RMRR/RMR regions). [`alloc`](IovaAllocator::alloc) steps over both.

use crate::addr::PAGE_SHIFT;
use crate::error::DmaError;

/// Smallest order: one 4 KiB page.
const MIN_ORDER: u32 = PAGE_SHIFT;
/// Largest order: a 2^57-byte block (5-level tables).
const MAX_ORDER: u32 = 57;
/// Low bits of a packed entry holding the order (the start is page aligned).
const ORDER_MASK: u64 = 0x3f;

/// Ranges one allocator may have handed out at once; one more is refused
/// with [`DmaError::AllocatorFull`] (nothing changes then).
pub const MAX_RANGES: usize = 512;

/// Fixed ranges (reserved or at a caller-chosen address) one allocator
/// holds at once; one more is refused with [`DmaError::ReservedFull`].
pub const MAX_FIXED: usize = 32;

/// A range handed out by [`IovaAllocator::alloc`] or
/// [`IovaAllocator::alloc_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IovaRange {
    /// First address.
    pub start: u64,
    /// Size in bytes. From [`alloc`](IovaAllocator::alloc): a power of two
    /// ≥ 4 KiB, and `start` is a multiple of it; from
    /// [`alloc_at`](IovaAllocator::alloc_at): any multiple of 4 KiB.
    pub size: u64,
}

/// What a fixed range of the allocator is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FixedUse {
    /// Never handed out, never linked ([`IovaAllocator::reserve`]).
    Reserved,
    /// Live at a caller-chosen address, owned by a transaction
    /// ([`IovaAllocator::alloc_at`]).
    Fixed,
    /// Live at a caller-chosen address, owned by the domain itself (an
    /// identity-mapped firmware region, kept until the domain is torn down).
    Identity,
}

/// A fixed range: `[start, end)` and what it is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FixedRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Reserved, or live and whose.
    pub kind: FixedUse,
}

/// First-fit allocator of naturally aligned ranges over `[start, end)`.
#[derive(Debug)]
pub struct IovaAllocator {
    /// Ranges handed out, sorted by start: `start | order`.
    used: heapless::Vec<u64, MAX_RANGES>,
    /// Fixed ranges, sorted by start, disjoint from each other and `used`.
    fixed: heapless::Vec<FixedRange, MAX_FIXED>,
    start: u64,
    end: u64,
    in_use: u64,
}

#[cfg(feature = "defmt")]
impl defmt::Format for IovaAllocator {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "IovaAllocator {{ start: {=u64:#x}, end: {=u64:#x}, in_use: {=u64:#x}, ranges: {=usize}, fixed: {=usize} }}",
            self.start,
            self.end,
            self.in_use,
            self.used.len(),
            self.fixed.len()
        )
    }
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

#[inline]
fn unpack(e: u64) -> (u64, u64) {
    let start = e & !ORDER_MASK;
    (start, start + (1u64 << (e & ORDER_MASK)))
}

impl IovaAllocator {
    /// An allocator for the aperture `[start, end)`; both must be 4 KiB
    /// aligned, `start < end` and `end <= 2^57`.
    ///
    /// # Errors
    ///
    /// - [`DmaError::Unaligned`]: `start` or `end` is not 4 KiB aligned.
    /// - [`DmaError::BadConfig`] (`what: "aperture"`): `start >= end` or
    ///   `end > 2^57`.
    pub fn new(start: u64, end: u64) -> Result<Self, DmaError> {
        Self::check_aperture(start, end)?;
        Ok(Self::empty(start, end))
    }

    /// An allocator over nothing, to be [`reset`](Self::reset) later: a
    /// shard's before its chunk is granted. Every request to it fails.
    pub(crate) const fn unset() -> Self {
        Self::empty(0, 0)
    }

    /// Whether it covers any range (not [`unset`](Self::unset)).
    pub(crate) fn is_set(&self) -> bool {
        self.end > self.start
    }

    /// Makes this an empty allocator over `[start, end)` in place (nothing
    /// handed out, no fixed ranges): the range table is never copied, where
    /// a value from [`new`](Self::new) is moved whole (4 KiB and more).
    /// Errors as `new`; nothing changes then.
    pub(crate) fn reset(&mut self, start: u64, end: u64) -> Result<(), DmaError> {
        Self::check_aperture(start, end)?;
        self.used.clear();
        self.fixed.clear();
        self.start = start;
        self.end = end;
        self.in_use = 0;
        Ok(())
    }

    #[inline(always)]
    const fn empty(start: u64, end: u64) -> Self {
        Self {
            used: heapless::Vec::new(),
            fixed: heapless::Vec::new(),
            start,
            end,
            in_use: 0,
        }
    }

    /// The checks of [`new`](Self::new).
    fn check_aperture(start: u64, end: u64) -> Result<(), DmaError> {
        if start & 0xfff != 0 {
            return Err(DmaError::Unaligned { value: start });
        }
        if end & 0xfff != 0 {
            return Err(DmaError::Unaligned { value: end });
        }
        if start >= end || end > 1u64 << MAX_ORDER {
            return Err(DmaError::BadConfig {
                what: "aperture",
                value: end,
            });
        }
        Ok(())
    }

    /// The aperture `[start, end)`.
    pub fn aperture(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Bytes handed out and not yet freed.
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// Ranges handed out and not yet freed.
    pub fn ranges(&self) -> usize {
        self.used.len()
    }

    /// A range of at least `size` bytes that lies entirely at or below `mask`
    /// (a device's DMA mask: the highest address it can emit).
    ///
    /// # Errors
    ///
    /// - [`DmaError::ZeroLength`]: `size` is 0.
    /// - [`DmaError::AboveDmaMask`]: a range of that size cannot lie below
    ///   `mask` inside the aperture, even with nothing allocated.
    /// - [`DmaError::AllocatorFull`]: [`MAX_RANGES`] ranges are already out.
    /// - [`DmaError::IovaExhausted`]: no free range of that size is left below
    ///   the mask (or `size` rounds up past 2^57).
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
        if self.used.is_full() {
            return Err(DmaError::AllocatorFull);
        }
        // One past the last usable address (`end <= 2^57`, so no overflow;
        // an unset allocator's `end` of 0 gives a limit of 0: nothing fits).
        let limit = if mask >= self.end.saturating_sub(1) {
            self.end
        } else {
            mask + 1
        };
        // First fit over two sorted, disjoint lists: step `cur` past every
        // range (handed out or fixed) that overlaps the aligned candidate.
        // Each step passes at least one range: O(ranges + fixed).
        let mut cur = self.start;
        let (mut i, mut j) = (0, 0);
        let found = loop {
            // `cur <= 2^57` and `bsize <= 2^57`: no overflow.
            let cand = (cur + bsize - 1) & !(bsize - 1);
            let end = cand + bsize;
            if end > limit {
                break None;
            }
            while i < self.used.len() && unpack(self.used[i]).1 <= cand {
                i += 1;
            }
            while j < self.fixed.len() && self.fixed[j].end <= cand {
                j += 1;
            }
            let mut next = None;
            if let Some(&e) = self.used.get(i) {
                let (s, e) = unpack(e);
                if s < end {
                    next = Some(e);
                }
            }
            if let Some(f) = self.fixed.get(j) {
                if f.start < end {
                    next = Some(next.map_or(f.end, |n: u64| n.max(f.end)));
                }
            }
            match next {
                None => break Some(cand),
                Some(n) => cur = n,
            }
        };
        let at = i;
        let Some(start) = found else {
            return Err(DmaError::IovaExhausted { size });
        };
        // Cannot fail: checked not full above. Past every range handed out
        // (the common case: the first range, or a new highest one) a push,
        // which moves nothing; `insert` would still call a move of zero
        // entries and its bounds logic (issue 11: 83 of a 1 GiB
        // transaction's 147 instructions).
        let packed = start | u64::from(want);
        if at == self.used.len() {
            self.used.push(packed)
        } else {
            self.used.insert(at, packed)
        }
        .map_err(|_| DmaError::AllocatorFull)?;
        self.in_use += bsize;
        Ok(IovaRange { start, size: bsize })
    }

    /// Where `range` is in the list of ranges handed out: an error when it
    /// was not handed out (or was freed since). Changes nothing.
    ///
    /// # Errors
    ///
    /// - [`DmaError::Unaligned`]: `range.size` is not a power of two of at
    ///   least 4 KiB, so it cannot have come from [`alloc`](Self::alloc).
    /// - [`DmaError::OutsideTransaction`]: no range with that start and size
    ///   is handed out.
    pub fn find(&self, range: IovaRange) -> Result<usize, DmaError> {
        let Some(o) = order_of(range.size).filter(|&o| 1u64 << o == range.size) else {
            return Err(DmaError::Unaligned { value: range.size });
        };
        let key = range.start | u64::from(o);
        match self
            .used
            .binary_search_by(|e| (e & !ORDER_MASK).cmp(&range.start))
        {
            Ok(i) if self.used[i] == key => Ok(i),
            _ => Err(DmaError::OutsideTransaction {
                offset: range.start,
                len: range.size,
                size: self.end,
            }),
        }
    }

    /// Gives back the range at `index` (from [`find`](Self::find)). Cannot
    /// fail: it only removes the entry. An index past the list does nothing.
    pub fn release(&mut self, index: usize) {
        if index < self.used.len() {
            let (s, e) = unpack(self.used.remove(index));
            self.in_use = self.in_use.saturating_sub(e - s);
        }
    }

    /// Gives a range back: [`find`](Self::find) then
    /// [`release`](Self::release). `range` must be one handed out by
    /// [`alloc`](Self::alloc) and not freed since; otherwise it is refused
    /// and nothing changes.
    ///
    /// # Errors
    ///
    /// As [`find`](Self::find): [`DmaError::Unaligned`] or
    /// [`DmaError::OutsideTransaction`] when `range` is not handed out.
    pub fn free(&mut self, range: IovaRange) -> Result<(), DmaError> {
        let i = self.find(range)?;
        self.release(i);
        Ok(())
    }
}

impl IovaAllocator {
    /// The fixed ranges (reserved and caller-placed), sorted by start.
    pub fn fixed(&self) -> &[FixedRange] {
        &self.fixed
    }

    /// Whether `[start, start + size)` touches a reserved range: the first
    /// one it touches.
    pub fn reserved_overlap(&self, start: u64, size: u64) -> Option<FixedRange> {
        let end = start.saturating_add(size);
        self.fixed
            .iter()
            .find(|f| f.kind == FixedUse::Reserved && f.start < end && start < f.end)
            .copied()
    }

    /// Checks `[start, start + size)` may become a fixed range: where it
    /// goes in `fixed`. Changes nothing.
    fn place_fixed(&self, start: u64, size: u64) -> Result<usize, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroLength);
        }
        if start & 0xfff != 0 {
            return Err(DmaError::Unaligned { value: start });
        }
        if size & 0xfff != 0 {
            return Err(DmaError::Unaligned { value: size });
        }
        let end = start
            .checked_add(size)
            .ok_or(DmaError::Overflow { a: start, b: size })?;
        if start < self.start || end > self.end {
            return Err(DmaError::OutsideAperture {
                start,
                size,
                aperture_start: self.start,
                aperture_end: self.end,
            });
        }
        // Both lists are sorted and disjoint, so their ends are sorted too:
        // the first range ending after `start` is the only candidate.
        let at = self.fixed.partition_point(|f| f.end <= start);
        if let Some(f) = self.fixed.get(at).filter(|f| f.start < end) {
            return Err(if f.kind == FixedUse::Reserved {
                DmaError::IovaReserved {
                    start,
                    size,
                    reserved_start: f.start,
                    reserved_end: f.end,
                }
            } else {
                DmaError::IovaInUse {
                    start,
                    size,
                    used_start: f.start,
                    used_end: f.end,
                }
            });
        }
        let u = self.used.partition_point(|&e| unpack(e).1 <= start);
        if let Some(&e) = self.used.get(u) {
            let (s, e) = unpack(e);
            if s < end {
                return Err(DmaError::IovaInUse {
                    start,
                    size,
                    used_start: s,
                    used_end: e,
                });
            }
        }
        if self.fixed.is_full() {
            return Err(DmaError::ReservedFull {
                capacity: MAX_FIXED as u32,
            });
        }
        Ok(at)
    }

    /// Adds a fixed range of `kind` (see [`place_fixed`](Self::place_fixed)).
    fn insert_fixed(
        &mut self,
        start: u64,
        size: u64,
        kind: FixedUse,
    ) -> Result<IovaRange, DmaError> {
        let at = self.place_fixed(start, size)?;
        let end = start + size;
        // Cannot fail: checked not full above.
        self.fixed
            .insert(at, FixedRange { start, end, kind })
            .map_err(|_| DmaError::ReservedFull {
                capacity: MAX_FIXED as u32,
            })?;
        if kind != FixedUse::Reserved {
            self.in_use += size;
        }
        Ok(IovaRange { start, size })
    }

    /// Reserves `[start, start + size)`: [`alloc`](Self::alloc) never hands
    /// out an address in it and [`alloc_at`](Self::alloc_at) refuses it (as
    /// Linux `reserve_iova`). A reservation is never given back.
    ///
    /// # Errors
    ///
    /// Nothing changes on an error.
    /// - [`DmaError::ZeroLength`]: `size` is 0.
    /// - [`DmaError::Unaligned`]: `start` or `size` is not 4 KiB aligned.
    /// - [`DmaError::Overflow`]: `start + size` overflows.
    /// - [`DmaError::OutsideAperture`]: the range is not inside the aperture.
    /// - [`DmaError::IovaReserved`]: it overlaps a reserved range.
    /// - [`DmaError::IovaInUse`]: it overlaps a live range (handed out or
    ///   fixed).
    /// - [`DmaError::ReservedFull`]: [`MAX_FIXED`] fixed ranges are held.
    pub fn reserve(&mut self, start: u64, size: u64) -> Result<(), DmaError> {
        self.insert_fixed(start, size, FixedUse::Reserved)
            .map(|_| ())
    }

    /// Hands out exactly `[start, start + size)`, a caller-chosen range (an
    /// identity map, a fixed device address); give it back with
    /// [`free_fixed`](Self::free_fixed).
    ///
    /// # Errors
    ///
    /// As [`reserve`](Self::reserve); nothing changes on an error.
    pub fn alloc_at(&mut self, start: u64, size: u64) -> Result<IovaRange, DmaError> {
        self.insert_fixed(start, size, FixedUse::Fixed)
    }

    /// [`alloc_at`](Self::alloc_at) for a range the domain itself owns.
    pub(crate) fn alloc_identity(&mut self, start: u64, size: u64) -> Result<IovaRange, DmaError> {
        self.insert_fixed(start, size, FixedUse::Identity)
    }

    /// Where the [`alloc_at`](Self::alloc_at) range `range` is in
    /// [`fixed`](Self::fixed). Changes nothing.
    ///
    /// # Errors
    ///
    /// [`DmaError::OutsideTransaction`]: no range with that start and size
    /// is handed out by `alloc_at`.
    pub fn find_fixed(&self, range: IovaRange) -> Result<usize, DmaError> {
        let at = self.fixed.partition_point(|f| f.start < range.start);
        match self.fixed.get(at) {
            Some(f)
                if f.start == range.start
                    && Some(f.end) == range.start.checked_add(range.size)
                    && f.kind == FixedUse::Fixed =>
            {
                Ok(at)
            }
            _ => Err(DmaError::OutsideTransaction {
                offset: range.start,
                len: range.size,
                size: self.end,
            }),
        }
    }

    /// Gives back the fixed range at `index` (from
    /// [`find_fixed`](Self::find_fixed)). Cannot fail; an index past the
    /// list, or of a reservation, does nothing.
    pub fn release_fixed(&mut self, index: usize) {
        if self
            .fixed
            .get(index)
            .is_some_and(|f| f.kind != FixedUse::Reserved)
        {
            let f = self.fixed.remove(index);
            self.in_use = self.in_use.saturating_sub(f.end - f.start);
        }
    }

    /// Gives back the domain-owned range starting at `start`, if any.
    pub(crate) fn release_identity(&mut self, start: u64) {
        if let Some(i) = self
            .fixed
            .iter()
            .position(|f| f.start == start && f.kind == FixedUse::Identity)
        {
            self.release_fixed(i);
        }
    }

    /// Gives back a range from [`alloc_at`](Self::alloc_at):
    /// [`find_fixed`](Self::find_fixed) then
    /// [`release_fixed`](Self::release_fixed).
    ///
    /// # Errors
    ///
    /// As [`find_fixed`](Self::find_fixed); nothing changes then.
    pub fn free_fixed(&mut self, range: IovaRange) -> Result<(), DmaError> {
        let i = self.find_fixed(range)?;
        self.release_fixed(i);
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
    fn unset_serves_nothing_and_reset_starts_afresh_in_place() {
        let mut a = IovaAllocator::unset();
        assert!(!a.is_set());
        assert!(a.alloc(0x1000, u64::MAX).is_err());
        a.reset(1 << 30, 2 << 30).unwrap();
        assert!(a.is_set());
        let r = a.alloc(0x1000, u64::MAX).unwrap();
        assert!(r.start >= 1 << 30 && r.start + r.size <= 2 << 30);
        // A bad aperture changes nothing.
        assert!(matches!(
            a.reset(3 << 30, 3 << 30),
            Err(DmaError::BadConfig { .. })
        ));
        assert!(matches!(
            a.reset(0x800, 1 << 30),
            Err(DmaError::Unaligned { .. })
        ));
        assert_eq!(
            (a.aperture(), a.ranges(), a.in_use()),
            ((1 << 30, 2 << 30), 1, 0x1000)
        );
        // A reset forgets what was handed out: the whole new aperture is free.
        a.reset(0, 1 << 20).unwrap();
        assert_eq!((a.ranges(), a.in_use()), (0, 0));
        assert_eq!(
            a.alloc(1 << 20, u64::MAX).unwrap(),
            IovaRange {
                start: 0,
                size: 1 << 20
            }
        );
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
    fn freeing_out_of_order_never_fails() {
        // Many small ranges freed in an order that leaves every other one
        // allocated: a buddy allocator's per-order free lists fill up here.
        let mut a = IovaAllocator::new(1 << 20, 1 << 32).unwrap();
        let rs: heapless::Vec<IovaRange, 256> = (0..256)
            .map(|_| a.alloc(0x1000, u64::MAX).unwrap())
            .collect();
        for r in rs.iter().step_by(2) {
            a.free(*r).unwrap();
        }
        for r in rs.iter().skip(1).step_by(2) {
            a.free(*r).unwrap();
        }
        assert_eq!(a.in_use(), 0);
        assert_eq!(a.ranges(), 0);
    }

    #[test]
    fn a_full_allocator_refuses_to_allocate_and_changes_nothing() {
        let mut a = IovaAllocator::new(0, 1 << 40).unwrap();
        for _ in 0..MAX_RANGES {
            a.alloc(0x1000, u64::MAX).unwrap();
        }
        let used = a.in_use();
        assert_eq!(a.alloc(0x1000, u64::MAX), Err(DmaError::AllocatorFull));
        assert_eq!(a.in_use(), used);
    }

    #[test]
    fn a_range_freed_twice_is_refused() {
        let mut a = IovaAllocator::new(0, 1 << 30).unwrap();
        let r = a.alloc(0x4000, u64::MAX).unwrap();
        a.free(r).unwrap();
        assert!(a.free(r).is_err());
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

    /// A range that lands below ranges already handed out goes in its
    /// place (only a range past all of them is appended): the first-fit
    /// scan and `find` rely on the list staying sorted.
    #[test]
    fn a_range_in_a_gap_below_others_is_found_and_freed() {
        let mut a = IovaAllocator::new(0, 1 << 30).unwrap();
        let r: heapless::Vec<IovaRange, 3> =
            (0..3).map(|_| a.alloc(0x1000, u64::MAX).unwrap()).collect();
        a.free(r[0]).unwrap();
        // The gap at 0 is the first fit, below `r[1]` and `r[2]`.
        let again = a.alloc(0x1000, u64::MAX).unwrap();
        assert_eq!(again, r[0]);
        // Past every range: appended.
        let high = a.alloc(0x4000, u64::MAX).unwrap();
        assert_eq!(high.start, 0x4000);
        for x in [r[2], again, high, r[1]] {
            a.free(x).unwrap();
        }
        assert_eq!((a.in_use(), a.ranges()), (0, 0));
    }
}
