//! Several CPUs at once: application processors started with
//! INIT-SIPI-SIPI ([`crate::smp`]) run a job next to the boot CPU.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::{irq, smp};

/// CPUs every SMP test runs on (the xtask starts QEMU with `-smp 4`).
pub(super) const CPUS: usize = 4;
/// Virtual seconds a job may run on an AP before the run fails.
pub(super) const JOB_SECONDS: u64 = 60;

/// The local APIC ID of the running CPU (CPUID leaf 1, EBX bits 31:24;
/// leaf 0xB EDX in x2APIC mode).
fn apic_id() -> u32 {
    if irq::x2apic() {
        // CPUID leaf 0xB exists on every CPU offering x2APIC.
        core::arch::x86_64::__cpuid_count(0xb, 0).edx
    } else {
        core::arch::x86_64::__cpuid(1).ebx >> 24
    }
}

/// Brings the interrupt setup (the IDT the APs load) and the CPU list up.
pub(super) fn cpus(ctx: &Ctx) -> Result<(), Fail> {
    let me = irq::init().or_fail("interrupt setup")?;
    smp::init(&ctx.apic_ids, me, ctx.dmar);
    Ok(())
}

/// Four CPUs run one job at once, each with its own index and local APIC
/// ID, twice (each AP halts after a job; INIT-SIPI-SIPI starts it again);
/// every index ran exactly once per job.
pub fn four_cpus_run_a_job_and_start_again(ctx: &mut Ctx) -> Result<(), Fail> {
    cpus(ctx)?;
    narrate!("MADT local APIC IDs {:?}", ctx.apic_ids);
    for round in 0..2 {
        let ran = [const { AtomicUsize::new(0) }; CPUS];
        let ids = [const { AtomicU32::new(u32::MAX) }; CPUS];
        let arrived = AtomicUsize::new(0);
        smp::run(CPUS, JOB_SECONDS, &|cpu| {
            ran[cpu].fetch_add(1, Ordering::SeqCst);
            ids[cpu].store(apic_id(), Ordering::SeqCst);
            arrived.fetch_add(1, Ordering::SeqCst);
            // All four are inside the job at the same time (bounded wait).
            for _ in 0..10_000_000 {
                if arrived.load(Ordering::SeqCst) >= CPUS {
                    break;
                }
                core::hint::spin_loop();
            }
        })
        .map_err(|e| fail_msg(format_args!("round {round}: {e}")))?;
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
        for (cpu, id) in ids.iter().enumerate() {
            let id = id.load(Ordering::SeqCst);
            check_eq!(
                Some(&id),
                ctx.apic_ids.get(cpu),
                "round {round}: APIC ID of CPU {cpu}"
            );
        }
    }
    Ok(())
}
