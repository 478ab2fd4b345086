//! The atomics and cell the shared wrappers use: `core`'s, or loom's when
//! the crate is built with `--cfg loom` (model tests, `tests/loom.rs`).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicU32, AtomicU64};

pub(crate) use core::sync::atomic::Ordering;

/// One turn of a spin loop (a scheduling point under loom).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
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
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(loom)]
        // SAFETY: exclusive access, guaranteed by the caller.
        return self.0.with_mut(|p| f(unsafe { &mut *p }));
        #[cfg(not(loom))]
        // SAFETY: exclusive access, guaranteed by the caller.
        f(unsafe { &mut *self.0.get() })
    }
}
