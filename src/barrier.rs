//! Ordering of table and queue writes before the doorbell that publishes them.

/// Orders every earlier memory write before later writes, including device
/// register writes (Arm `dsb st`; a compiler + CPU fence elsewhere).
#[inline]
pub fn wmb() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `dsb st` only waits for earlier stores; no memory or register is
    // touched.
    unsafe {
        core::arch::asm!("dsb st", options(nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// Orders earlier reads of a producer index before later reads of the
/// entries it covers (Arm `dsb ld`).
#[inline]
pub fn rmb() {
    #[cfg(target_arch = "aarch64")]
    // SAFETY: `dsb ld` only waits for earlier loads.
    unsafe {
        core::arch::asm!("dsb ld", options(nostack, preserves_flags));
    }
    #[cfg(not(target_arch = "aarch64"))]
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// [`wmb`], then tells `mem`'s ordering hook (test recorders see where the
/// crate's barriers fall between its table stores).
#[inline]
pub fn wmb_on<M: crate::mem::TableMemory + ?Sized>(mem: &M) {
    wmb();
    mem.observe_barrier();
}
