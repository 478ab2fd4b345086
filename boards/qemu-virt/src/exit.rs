//! Leaving QEMU with a status: Arm semihosting SYS_EXIT (needs `-semihosting`;
//! without it `hlt` is an undefined instruction and the vectors report it).

/// Semihosting operation number of SYS_EXIT.
const SYS_EXIT: u64 = 0x18;
/// ADP_Stopped_ApplicationExit: "the application exited", with a status.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// Ends the QEMU run with exit status `code`.
pub fn exit(code: u32) -> ! {
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, u64::from(code)];
    // SAFETY: the semihosting call reads the two-word block through x1 and
    // ends the emulation; nothing else is touched.
    unsafe {
        core::arch::asm!(
            "hlt #0xf000",
            in("x0") SYS_EXIT,
            in("x1") block.as_ptr(),
            options(nostack, readonly)
        );
    }
    loop {
        // SAFETY: `wfe` only waits; reached only if semihosting is off.
        unsafe { core::arch::asm!("wfe", options(nomem, nostack)) };
    }
}
