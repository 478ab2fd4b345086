//! [`IrqLock`]: a spin lock an interrupt handler may use without spinning.
//!
//! One atomic word holds both the lock bit and an "interrupt work pending"
//! bit. An interrupt handler that finds the lock taken (by another CPU, or
//! by the very code it interrupted) sets the pending bit and returns; the
//! holder sees the bit when it releases and runs the deferred handler before
//! the lock is free. Because both bits live in one word, every step is a
//! read-modify-write of the same location: there is no window where the
//! holder releases without seeing the flag and the handler fails to take the
//! lock (the store-buffering race a separate flag and lock would have).

use super::sync::{AtomicU32, Cell, Ordering, spin_hint};

const LOCKED: u32 = 1;
const PENDING: u32 = 2;

/// Sets LOCKED in `state` (keeping PENDING), spinning while another CPU
/// holds it: the free lock taken at once (the common case, written
/// inline), else the spin.
#[inline(always)]
fn acquire(state: &AtomicU32) {
    if state
        .compare_exchange_weak(0, LOCKED, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        acquire_slow(state);
    }
}

/// [`acquire`] when the lock was not free at the first try.
#[cold]
#[inline(never)]
fn acquire_slow(state: &AtomicU32) {
    loop {
        let s = state.load(Ordering::Relaxed);
        if s & LOCKED == 0
            && state
                .compare_exchange_weak(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return;
        }
        spin_hint();
    }
}

/// A plain spin lock over `T`, for data no interrupt handler reaches (a
/// shared domain's shards and sides): nothing can be deferred to its
/// holder, so it is released by a store, not a compare-and-swap — one
/// locked instruction per use instead of two.
pub(crate) struct SpinLock<T> {
    state: AtomicU32,
    data: Cell<T>,
}

// SAFETY: as for `IrqLock`: `data` is only reached by the thread that set
// LOCKED (Acquire), and handed on by the Release store that clears it.
unsafe impl<T: Send> Sync for SpinLock<T> {}

/// Releases a [`SpinLock`] when dropped (also on unwinding, in host tests).
struct Unlock<'a>(&'a AtomicU32);

impl Drop for Unlock<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Only LOCKED can be set: nothing sets PENDING on this lock.
        self.0.store(0, Ordering::Release);
    }
}

impl<T> SpinLock<T> {
    pub(crate) fn new(data: T) -> Self {
        Self {
            state: AtomicU32::new(0),
            data: Cell::new(data),
        }
    }

    pub(crate) fn into_inner(self) -> T {
        self.data.into_inner()
    }

    /// Runs `f` under the lock, spinning while another CPU holds it. `f`
    /// must not take this lock again.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        acquire(&self.state);
        let _unlock = Unlock(&self.state);
        // SAFETY: LOCKED is ours.
        unsafe { self.data.with_mut(f) }
    }
}

/// Releases the lock when dropped, also when `f` panics (host tests unwind:
/// the other threads then see the lock free instead of spinning forever).
struct Release<'a, T>(&'a IrqLock<T>);

impl<T> Drop for Release<'_, T> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A spin lock over `T` with a deferred-interrupt handler.
pub(crate) struct IrqLock<T> {
    state: AtomicU32,
    data: Cell<T>,
    deferred: fn(&mut T),
}

// SAFETY: `data` is only reached by the one thread that set LOCKED (an
// Acquire compare-exchange), and handed on by a Release store or
// compare-exchange on `state`; `T: Send` lets it move between threads.
unsafe impl<T: Send> Sync for IrqLock<T> {}

impl<T> IrqLock<T> {
    /// A free lock over `data`; `deferred` runs, under the lock, the work an
    /// interrupt handler could not do because the lock was taken.
    pub(crate) fn new(data: T, deferred: fn(&mut T)) -> Self {
        Self {
            state: AtomicU32::new(0),
            data: Cell::new(data),
            deferred,
        }
    }

    /// The value, when nobody else can hold the lock.
    pub(crate) fn into_inner(self) -> T {
        self.data.into_inner()
    }

    /// Runs `f` under the lock, spinning while another CPU holds it. Not for
    /// interrupt context (see [`try_with_or_defer`](Self::try_with_or_defer)).
    /// `f` must not take this lock again.
    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        acquire(&self.state);
        let _release = Release(self);
        // SAFETY: LOCKED is ours.
        unsafe { self.data.with_mut(f) }
    }

    /// Runs `f` under the lock if it is free now; `None` (nothing run, no
    /// flag set) when it is taken.
    pub(crate) fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let s = self.state.load(Ordering::Relaxed);
        if s & LOCKED != 0
            || self
                .state
                .compare_exchange(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let _release = Release(self);
        // SAFETY: LOCKED is ours.
        Some(unsafe { self.data.with_mut(f) })
    }

    /// For interrupt context: runs `f` now when the lock is free; when it is
    /// taken, leaves the work to the holder (which runs the deferred handler
    /// as it releases) and returns `None` at once. Never spins on the lock.
    pub(crate) fn try_with_or_defer<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let prev = self.state.fetch_or(PENDING, Ordering::AcqRel);
        if prev & LOCKED != 0 {
            // The holder's release sees PENDING (same word) and runs the handler.
            return None;
        }
        loop {
            let s = self.state.load(Ordering::Relaxed);
            if s & LOCKED != 0 || s & PENDING == 0 {
                // Taken since (its holder will see PENDING), or a holder
                // already ran the deferred handler after our flag was set.
                return None;
            }
            // Take the lock and our own flag with it: we do the work now.
            if self
                .state
                .compare_exchange_weak(s, LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                break;
            }
            spin_hint();
        }
        let _release = Release(self);
        // SAFETY: LOCKED is ours.
        Some(unsafe { self.data.with_mut(f) })
    }

    /// Frees the lock, first running the deferred handler for every
    /// interrupt that found it taken.
    #[inline(always)]
    fn release(&self) {
        // No interrupt came meanwhile (the common case, written inline).
        if self
            .state
            .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            self.release_slow();
        }
    }

    /// [`release`](Self::release) when PENDING was set.
    #[cold]
    #[inline(never)]
    fn release_slow(&self) {
        // Bounded by the interrupts that arrive while the handler runs.
        loop {
            // PENDING is set: clear it (keeping LOCKED) and do the work.
            self.state.fetch_and(!PENDING, Ordering::Acquire);
            let deferred = self.deferred;
            // SAFETY: LOCKED is still ours.
            unsafe { self.data.with_mut(deferred) };
            if self
                .state
                .compare_exchange(LOCKED, 0, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

/// `T` alone on its cache lines (128 bytes: the line pair some Arm and x86
/// parts fetch together), so that one CPU's writes there never evict what
/// another reads.
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> core::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Reader slots of a [`ShardedRwLock`]: one per shard, so that CPUs on
/// different shards never write the same cache line to enter.
pub(crate) const SLOTS: usize = 4;

const WRITER: u32 = 1 << 31;
const WANT: u32 = 1 << 30;

/// One reader slot, alone on its cache line (128 bytes: the line pair
/// some Arm and x86 parts prefetch together): the count of readers (with
/// the writer's bits) and the *solo* word, which one reader at a time holds
/// alone (0 free, [`SOLO_IN`] a reader, [`WRITER`] the writer).
#[repr(align(128))]
struct Slot {
    count: AtomicU32,
    solo: AtomicU32,
}

/// A reader holds a slot's solo word.
const SOLO_IN: u32 = 1;

impl Slot {
    /// The solo word, taken for the caller alone (released when the guard
    /// drops); `None` when another reader holds it or a writer wants or
    /// holds the slot (the caller then counts itself in, or waits).
    #[inline(always)]
    fn take_solo(&self) -> Option<SoloRelease<'_>> {
        (self.count.load(Ordering::Relaxed) & (WRITER | WANT) == 0
            && self
                .solo
                .compare_exchange(0, SOLO_IN, Ordering::Acquire, Ordering::Relaxed)
                .is_ok())
        // Lazily: a guard made and dropped here would release a solo word
        // this caller does not hold.
        .then(|| SoloRelease(&self.solo))
    }
}

/// A reader-writer spin lock whose readers count themselves in one of
/// [`SLOTS`] slots (a per-CPU reader count, as Linux's `percpu_rw_semaphore`
/// keeps). A reader first tries its slot's solo word: taken by a
/// compare-and-swap from free, it is the reader's alone, so leaving is a
/// plain store (one locked instruction per read section, not two). When
/// another reader holds it, the reader counts itself in the slot instead
/// (a compare-and-swap to enter, a subtraction to leave). The write side
/// takes every slot, in order: in each it sets WANT (new readers of that
/// slot wait, and do not try the solo word), waits for the slot's counted
/// readers to leave and holds the count with WRITER, then waits for the
/// solo reader to leave and holds the solo word with WRITER (a
/// compare-and-swap from free: nobody else writes a held solo word, so the
/// reader's store cannot lose a writer's bit). The write side is for rare
/// work (reclaiming empty tables, the fallback paths);
/// [`try_write`](Self::try_write) never waits.
///
/// Which slot a reader uses only spreads the load: any slot is correct.
pub(crate) struct ShardedRwLock<T> {
    slots: [Slot; SLOTS],
    data: Cell<T>,
}

// SAFETY: `data` is reached shared (`&T`) only by readers counted in a
// slot, which no writer holds; exclusively (`&mut T`) only by the writer
// that holds every slot (Acquire on entry, Release on exit hand it on).
// Readers share `&T` across threads (`T: Sync`), writers move it (`T: Send`).
unsafe impl<T: Send + Sync> Sync for ShardedRwLock<T> {}

/// Leaves the read side when dropped (also on unwinding, in host tests).
struct ReadRelease<'a>(&'a AtomicU32);

impl Drop for ReadRelease<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

/// Leaves a solo read section when dropped.
struct SoloRelease<'a>(&'a AtomicU32);

impl Drop for SoloRelease<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        // Ours alone: nobody else writes a held solo word.
        self.0.store(0, Ordering::Release);
    }
}

/// Leaves the write side when dropped: `.1` slots held whole, and the
/// count (not the solo word) of slot `.1` when `.2`.
struct WriteRelease<'a, T>(&'a ShardedRwLock<T>, usize, bool);

impl<T> Drop for WriteRelease<'_, T> {
    fn drop(&mut self) {
        for s in self.0.slots.iter().take(self.1) {
            s.solo.store(0, Ordering::Release);
            // Only WRITER (and WANTs of other writers, which set it again)
            // can be set: readers never enter a slot a writer holds.
            s.count.store(0, Ordering::Release);
        }
        if self.2 {
            if let Some(s) = self.0.slots.get(self.1) {
                s.count.store(0, Ordering::Release);
            }
        }
    }
}

impl<T> ShardedRwLock<T> {
    pub(crate) fn new(data: T) -> Self {
        Self {
            slots: core::array::from_fn(|_| Slot {
                count: AtomicU32::new(0),
                solo: AtomicU32::new(0),
            }),
            data: Cell::new(data),
        }
    }

    pub(crate) fn into_inner(self) -> T {
        self.data.into_inner()
    }

    /// Runs `f` on the read side, counted in slot `slot % SLOTS`; spins
    /// while a writer holds or wants that slot. `f` must not take this
    /// lock again.
    #[inline(always)]
    pub(crate) fn read<R>(&self, slot: usize, f: impl FnOnce(&T) -> R) -> R {
        let slot = &self.slots[slot % SLOTS];
        if let Some(_release) = slot.take_solo() {
            // SAFETY: the solo reader of a slot no writer holds.
            return unsafe { self.data.with(f) };
        }
        self.read_counted(&slot.count, f)
    }

    /// [`read`](Self::read) counted in the slot's reader count.
    #[inline(always)]
    fn read_counted<R>(&self, s: &AtomicU32, f: impl FnOnce(&T) -> R) -> R {
        let mut v = s.load(Ordering::Relaxed);
        loop {
            if v & (WRITER | WANT) == 0 {
                match s.compare_exchange(v, v + 1, Ordering::Acquire, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(cur) => {
                        v = cur;
                        continue;
                    }
                }
            }
            spin_hint();
            // A load (see `SharedDomain::take_pending`): the writer's release
            // is not slowed by readers taking the line at every turn. A
            // load sees the release within the coherence delay; loom does
            // not return a value a spinning thread saw before its yield.
            v = s.load(Ordering::Relaxed);
        }
        let _release = ReadRelease(s);
        // SAFETY: counted as a reader in a slot no writer holds.
        unsafe { self.data.with(f) }
    }

    /// Runs `f` on the write side, waiting for the readers to leave.
    /// `f` must not take this lock again.
    pub(crate) fn write<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut held = WriteRelease(self, 0, false);
        for slot in &self.slots {
            let s = &slot.count;
            let mut v = s.load(Ordering::Relaxed);
            loop {
                if v & !WANT == 0 {
                    if s.compare_exchange(v, WRITER, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        break;
                    }
                } else if v & WANT == 0 {
                    s.fetch_or(WANT, Ordering::Relaxed);
                }
                spin_hint();
                v = s.load(Ordering::Relaxed);
            }
            held.2 = true;
            // The solo reader leaves by a store; no new one comes (the
            // count shows WRITER).
            while slot
                .solo
                .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                spin_hint();
            }
            held.2 = false;
            held.1 += 1;
        }
        // SAFETY: every slot held with WRITER: no reader, no other writer.
        unsafe { self.data.with_mut(f) }
    }

    /// Runs `f` on the write side if no reader or writer is in now;
    /// `None` (nothing run) otherwise. Never waits.
    pub(crate) fn try_write<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let mut held = WriteRelease(self, 0, false);
        for slot in &self.slots {
            if slot
                .count
                .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return None;
            }
            held.2 = true;
            if slot
                .solo
                .compare_exchange(0, WRITER, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                return None;
            }
            held.2 = false;
            held.1 += 1;
        }
        // SAFETY: as in `write`.
        Some(unsafe { self.data.with_mut(f) })
    }
}

#[cfg(loom)]
impl<T> ShardedRwLock<T> {
    /// The read side's entry without the wait (the model tests: loom
    /// explores every interleaving of one attempt against the write side).
    fn try_read<R>(&self, slot: usize, f: impl FnOnce(&T) -> R) -> Option<R> {
        let slot = &self.slots[slot % SLOTS];
        if let Some(_release) = slot.take_solo() {
            // SAFETY: the solo reader of a slot no writer holds.
            return Some(unsafe { self.data.with(f) });
        }
        let s = &slot.count;
        let v = s.load(Ordering::Relaxed);
        if v & (WRITER | WANT) != 0
            || s.compare_exchange(v, v + 1, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        let _release = ReadRelease(s);
        // SAFETY: counted as a reader in a slot no writer holds.
        Some(unsafe { self.data.with(f) })
    }
}

/// Model-test access to the domain lock ([`ShardedRwLock`] over a `u64`).
#[cfg(loom)]
#[doc(hidden)]
pub struct LoomRwCell(ShardedRwLock<u64>);

#[cfg(loom)]
impl LoomRwCell {
    /// A lock over `v`.
    pub fn new(v: u64) -> Self {
        Self(ShardedRwLock::new(v))
    }

    /// Reads the value twice in one read section on `slot`, if the read
    /// side could be entered at once.
    pub fn try_read_twice(&self, slot: usize) -> Option<(u64, u64)> {
        self.0.try_read(slot, |v| (*v, *v))
    }

    /// Adds `n` on the write side if it is free now; whether it was.
    pub fn try_write_add(&self, n: u64) -> bool {
        self.0.try_write(|v| *v += n).is_some()
    }
}
