//! Ordering of table and queue writes before the doorbell that publishes them.

/// Orders every earlier memory write before later writes, including device
/// register writes: Arm `dsb st`; x86-64 `sfence` (Linux's `wmb()`): x86
/// never reorders ordinary stores with each other, nor with a later
/// uncached register store, and `sfence` also orders non-temporal and
/// write-combining stores a lender may have zeroed a page with (a full
/// `mfence` or locked instruction, which also orders later loads, costs
/// several times more and is not needed here; the non-coherent clean has
/// its own `mfence`); a full fence on other targets.
#[inline]
pub fn wmb() {
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    // SAFETY: `dsb st` only waits for earlier stores; no memory or register is
    // touched.
    unsafe {
        core::arch::asm!("dsb st", options(nostack, preserves_flags));
    }
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: `sfence` only orders earlier stores before later ones; no
    // memory or register is touched. Without `nomem` it is also a compiler
    // barrier: no store moves across it.
    unsafe {
        core::arch::asm!("sfence", options(nostack, preserves_flags));
    }
    // Other targets, and Miri (which runs no inline assembly).
    #[cfg(any(miri, not(any(target_arch = "aarch64", target_arch = "x86_64"))))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// Orders earlier reads of a producer index before later reads of the
/// entries it covers: Arm `dsb ld`; x86-64 `lfence` (Linux's `rmb()`; x86
/// does not reorder loads with loads); a full fence on other targets.
#[inline]
pub fn rmb() {
    #[cfg(all(target_arch = "aarch64", not(miri)))]
    // SAFETY: `dsb ld` only waits for earlier loads.
    unsafe {
        core::arch::asm!("dsb ld", options(nostack, preserves_flags));
    }
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    // SAFETY: `lfence` only orders earlier loads before later ones; no
    // memory or register is touched (and, without `nomem`, no access moves
    // across it at compile time).
    unsafe {
        core::arch::asm!("lfence", options(nostack, preserves_flags));
    }
    // Other targets, and Miri (which runs no inline assembly).
    #[cfg(any(miri, not(any(target_arch = "aarch64", target_arch = "x86_64"))))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// [`wmb`], then tells `mem`'s ordering hook (test recorders see where the
/// crate's barriers fall between its table stores).
#[inline]
pub fn wmb_on<M: crate::mem::TableMemory + ?Sized>(mem: &M) {
    wmb();
    mem.observe_barrier();
}
