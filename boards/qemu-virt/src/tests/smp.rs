//! Several CPUs at once: secondary CPUs started through PSCI
//! ([`crate::smp`]) run a job next to the boot CPU.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::harness::{Ctx, Fail};
use crate::smp;

/// CPUs every SMP test runs on (the xtask starts QEMU with `-smp 4`).
pub(super) const CPUS: usize = 4;
/// Virtual seconds a job may run on an AP before the run fails.
pub(super) const JOB_SECONDS: u64 = 60;

fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v & 0xff_00ff_ffff
}

/// Four CPUs run one job at once, each with its own index and MPIDR, twice
/// (the APs switch themselves off after a job and start again for the
/// next); every index ran exactly once per job.
pub fn four_cpus_run_a_job_and_start_again(_ctx: &mut Ctx) -> Result<(), Fail> {
    let psci = smp::psci().map_err(|e| crate::harness::fail_msg(format_args!("DTB: {e:?}")))?;
    narrate!(
        "PSCI conduit {}, {} CPUs in the DTB",
        psci.conduit(),
        board_common::smp::Starter::cpus(psci)
    );
    for round in 0..2 {
        let ran = [const { AtomicUsize::new(0) }; CPUS];
        let ids = [const { AtomicU64::new(u64::MAX) }; CPUS];
        let arrived = AtomicUsize::new(0);
        smp::run(CPUS, JOB_SECONDS, &|cpu| {
            ran[cpu].fetch_add(1, Ordering::SeqCst);
            ids[cpu].store(mpidr(), Ordering::SeqCst);
            arrived.fetch_add(1, Ordering::SeqCst);
            // All four are inside the job at the same time (bounded wait).
            let start = crate::time::ticks();
            while arrived.load(Ordering::SeqCst) < CPUS
                && crate::time::ticks().wrapping_sub(start) < crate::time::frequency()
            {
                core::hint::spin_loop();
            }
        })
        .map_err(|e| crate::harness::fail_msg(format_args!("round {round}: {e}")))?;
        for (cpu, n) in ran.iter().enumerate() {
            check_eq!(
                n.load(Ordering::SeqCst),
                1,
                "round {round}: runs on CPU {cpu}"
            );
        }
        check_eq!(
            arrived.load(Ordering::SeqCst),
            CPUS,
            "round {round}: CPUs in the job"
        );
        for a in 0..CPUS {
            for b in a + 1..CPUS {
                let (x, y) = (ids[a].load(Ordering::SeqCst), ids[b].load(Ordering::SeqCst));
                check!(
                    x != y,
                    "round {round}: CPUs {a} and {b} both report MPIDR {x:#x}"
                );
            }
        }
    }
    Ok(())
}
