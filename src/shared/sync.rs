//! The atomics and cell the shared wrappers use: `core`'s, loom's when the
//! crate is built with `--cfg loom` (model tests, `tests/loom.rs`), or
//! shuttle's with `--cfg shuttle` (randomised schedules, `tests/shuttle.rs`:
//! every operation on them, and on a table word, is a point where shuttle
//! may switch threads).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64};

#[cfg(all(shuttle, not(loom)))]
pub(crate) use shuttle::sync::atomic::{AtomicU32, AtomicU64};

#[cfg(not(any(loom, shuttle)))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64};

pub(crate) use core::sync::atomic::Ordering;

/// One turn of a spin loop (a scheduling point under loom).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(all(shuttle, not(loom)))]
    shuttle::thread::yield_now();
    #[cfg(not(any(loom, shuttle)))]
    core::hint::spin_loop();
}

/// An `UnsafeCell` whose accesses loom can track.
pub(crate) struct Cell<T>(
    #[cfg(loom)] loom::cell::UnsafeCell<T>,
    #[cfg(not(loom))] core::cell::UnsafeCell<T>,
);

impl<T> Cell<T> {
    pub(crate) fn new(v: T) -> Self {
        #[cfg(loom)]
        return Self(loom::cell::UnsafeCell::new(v));
        #[cfg(not(loom))]
        Self(core::cell::UnsafeCell::new(v))
    }

    pub(crate) fn into_inner(self) -> T {
        self.0.into_inner()
    }

    /// Runs `f` on the value.
    ///
    /// # Safety
    ///
    /// The caller has exclusive access (holds the lock guarding the cell).
    #[inline(always)]
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(loom)]
        // SAFETY: exclusive access, guaranteed by the caller.
        return self.0.with_mut(|p| f(unsafe { &mut *p }));
        #[cfg(not(loom))]
        // SAFETY: exclusive access, guaranteed by the caller.
        f(unsafe { &mut *self.0.get() })
    }
}

impl<T> Cell<T> {
    /// Runs `f` on a shared reference to the value.
    ///
    /// # Safety
    ///
    /// Nobody has exclusive access meanwhile (the caller holds a read side
    /// of the lock guarding the cell).
    #[inline(always)]
    pub(crate) unsafe fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        #[cfg(loom)]
        // SAFETY: shared access only, guaranteed by the caller.
        return self.0.with(|p| f(unsafe { &*p }));
        #[cfg(not(loom))]
        // SAFETY: shared access only, guaranteed by the caller.
        f(unsafe { &*self.0.get() })
    }
}

/// One 64-bit word of lent table memory used atomically by several CPUs
/// (an upper table entry installed by compare-and-swap, whose count bits
/// several CPUs then change). Under `--cfg loom` every word is modelled by
/// a loom atomic (see `registry`), so the models see every interleaving and
/// every value a weak load may return.
#[derive(Clone, Copy)]
pub(crate) struct Word(*mut u64);

#[cfg_attr(loom, allow(clippy::needless_return))]
impl Word {
    /// The word at `p`.
    ///
    /// # Safety
    ///
    /// `p` is 8-byte aligned and valid for reads and writes as long as the
    /// `Word` is used, and every access another CPU may make to it
    /// meanwhile is atomic (through a `Word`).
    #[inline(always)]
    pub(crate) unsafe fn at(p: *mut u64) -> Self {
        Self(p)
    }

    #[cfg(not(loom))]
    #[inline(always)]
    fn a(self) -> &'static core::sync::atomic::AtomicU64 {
        // Under shuttle: a point where another thread may run first.
        #[cfg(shuttle)]
        shuttle::thread::yield_now();
        // SAFETY: aligned and valid, every concurrent access atomic (the
        // contract of `at`); the reference does not outlive the call using it.
        unsafe { core::sync::atomic::AtomicU64::from_ptr(self.0) }
    }

    /// Atomic load.
    #[inline(always)]
    pub(crate) fn load(self, o: Ordering) -> u64 {
        #[cfg(loom)]
        return registry::atomic(self.0).load(o);
        #[cfg(not(loom))]
        self.a().load(o)
    }

    /// Atomic store.
    #[inline(always)]
    pub(crate) fn store(self, v: u64, o: Ordering) {
        #[cfg(loom)]
        {
            registry::atomic(self.0).store(v, o);
            registry::wrote(self.0, v);
            return;
        }
        #[cfg(not(loom))]
        self.a().store(v, o)
    }

    /// Atomic compare-and-swap (strong).
    #[inline(always)]
    pub(crate) fn compare_exchange(
        self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        #[cfg(loom)]
        {
            let r = registry::atomic(self.0).compare_exchange(current, new, success, failure);
            if r.is_ok() {
                registry::wrote(self.0, new);
            }
            return r;
        }
        #[cfg(not(loom))]
        self.a().compare_exchange(current, new, success, failure)
    }

    /// Atomic add; returns the old value.
    #[inline(always)]
    pub(crate) fn fetch_add(self, v: u64, o: Ordering) -> u64 {
        #[cfg(loom)]
        {
            let old = registry::atomic(self.0).fetch_add(v, o);
            registry::wrote(self.0, old.wrapping_add(v));
            return old;
        }
        #[cfg(not(loom))]
        self.a().fetch_add(v, o)
    }

    /// Atomic subtract; returns the old value.
    #[inline(always)]
    pub(crate) fn fetch_sub(self, v: u64, o: Ordering) -> u64 {
        #[cfg(loom)]
        {
            let old = registry::atomic(self.0).fetch_sub(v, o);
            registry::wrote(self.0, old.wrapping_sub(v));
            return old;
        }
        #[cfg(not(loom))]
        self.a().fetch_sub(v, o)
    }

    /// Atomic and; returns the old value (the broken-variant model only).
    #[cfg(loom_broken_install)]
    pub(crate) fn fetch_and(self, v: u64, o: Ordering) -> u64 {
        let old = registry::atomic(self.0).fetch_and(v, o);
        registry::wrote(self.0, old & v);
        old
    }

    /// Atomic or; returns the old value (the broken-variant model only).
    #[cfg(loom_broken_install)]
    #[inline(always)]
    pub(crate) fn fetch_or(self, v: u64, o: Ordering) -> u64 {
        #[cfg(loom)]
        {
            let old = registry::atomic(self.0).fetch_or(v, o);
            registry::wrote(self.0, old | v);
            return old;
        }
        #[cfg(not(loom))]
        self.a().fetch_or(v, o)
    }
}

/// Loom cannot place its atomics on raw table memory, so each word of lent
/// memory used through a [`Word`] gets a loom atomic of its own, made on
/// first use with the word's value. Every atomic write is also written
/// through to the memory, so the exclusive (`&mut`) paths, which read and
/// write memory directly, see it; a word the exclusive side wrote since
/// (its memory no longer holds what the atomic last wrote) is taken up by
/// the atomic at its next use, as a store of the exclusive side. Reset it
/// ([`loom_reset`]) at the start of every model run; a lender used in a
/// model must not reuse an address within one run.
#[cfg(loom)]
mod registry {
    extern crate std;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use loom::sync::atomic::AtomicU64;

    use super::Ordering;

    struct Entry {
        atomic: Arc<AtomicU64>,
        /// What the atomic last wrote (and wrote through).
        last: u64,
    }

    std::thread_local! {
        // Per OS thread: each test's model runs its loom threads on its own.
        static REGISTRY: RefCell<HashMap<usize, Entry>> = RefCell::new(HashMap::new());
    }

    /// Runs `f` on the map; no loom operation may run inside (it may
    /// switch threads).
    fn with_map<R>(f: impl FnOnce(&mut HashMap<usize, Entry>) -> R) -> R {
        REGISTRY.with(|r| f(&mut r.borrow_mut()))
    }

    pub(super) fn reset() {
        // Leaked, not dropped: a loom object may only be dropped inside
        // the run that made it (a few words per run).
        let old = with_map(core::mem::take);
        core::mem::forget(old);
    }

    /// Gives every word of the page at `p` its atomic now, made by the
    /// calling thread (the one that lends the page): loom counts making an
    /// atomic as a write, which the threads that later reach the page
    /// through its publication must happen after.
    pub(super) fn page(p: *mut u64) {
        let made: std::vec::Vec<(usize, Entry)> = (0..512)
            .map(|i| {
                let w = p.wrapping_add(i);
                // SAFETY: a page being lent (the contract of `loom_page`).
                let mem = unsafe { w.read_volatile() };
                let e = Entry {
                    atomic: Arc::new(AtomicU64::new(mem)),
                    last: mem,
                };
                (w as usize, e)
            })
            .collect();
        with_map(|map| {
            for (k, e) in made {
                if let Some(old) = map.insert(k, e) {
                    core::mem::forget(old);
                }
            }
        });
    }

    /// The atomic of the word at `p`, caught up with a direct write.
    pub(super) fn atomic(p: *mut u64) -> Arc<AtomicU64> {
        // SAFETY: a word of lent memory (the contract of `Word::at`).
        let mem = unsafe { p.read_volatile() };
        let found = with_map(|map| {
            map.get_mut(&(p as usize)).map(|e| {
                let stale = e.last != mem;
                e.last = mem;
                (e.atomic.clone(), stale)
            })
        });
        let (a, stale) = match found {
            Some(f) => f,
            None => {
                let atomic = Arc::new(AtomicU64::new(mem));
                with_map(|map| {
                    map.insert(
                        p as usize,
                        Entry {
                            atomic: atomic.clone(),
                            last: mem,
                        },
                    )
                });
                (atomic, false)
            }
        };
        if stale {
            a.store(mem, Ordering::Release);
        }
        a
    }

    /// The atomic at `p` now holds `v` (latest in its modification order).
    pub(super) fn wrote(p: *mut u64, v: u64) {
        // SAFETY: as in `atomic`.
        unsafe { p.write_volatile(v) };
        with_map(|map| {
            if let Some(e) = map.get_mut(&(p as usize)) {
                e.last = v;
            }
        });
    }
}

/// Gives each word of the 4 KiB page at `pa` (its virtual address) its
/// loom atomic: a lender used in a model calls it for every page it lends.
#[cfg(loom)]
#[doc(hidden)]
pub fn loom_page(pa: *mut u8) {
    registry::page(pa.cast());
}

/// Forgets every word's loom atomic: call at the start of each model run.
#[cfg(loom)]
#[doc(hidden)]
pub fn loom_reset() {
    registry::reset();
}
