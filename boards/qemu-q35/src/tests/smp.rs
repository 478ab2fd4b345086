//! Several CPUs at once: application processors started with
//! INIT-SIPI-SIPI ([`crate::smp`]) run a job next to the boot CPU.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use bare_iommu::vtd::{Access, FaultRecord, InvDesc};
use bare_iommu::{IommuBackend, PhysAddr, TableFormat};
use board_common::fault_log::FaultLog;
use board_common::smp::{Deaf, Job, MAX_CPUS, SmpError};
use board_common::smp_dma::{self, Devices, Expected, SmpBoard};

use super::vtd::{
    APERTURE_A, BoardFormat, Dom, Unit, check_record, first_level, free_pages, new_domain_in,
    no_faults, per_format, with_unit_owned,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::irq::{self, DEVICE_VECTOR};
use crate::memory::BoardMemory;
use crate::smp;

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
            check!(
                ctx.apic_ids.contains(&id),
                "round {round}: CPU {cpu} reports APIC ID {id}, not in the MADT"
            );
            for (other, o) in ids.iter().enumerate().skip(cpu + 1) {
                let o = o.load(Ordering::SeqCst);
                check!(
                    o != id,
                    "round {round}: CPUs {cpu} and {other} both report APIC ID {id}"
                );
            }
        }
    }
    Ok(())
}

/// A CPU that does not come up (its start "succeeds" but it never reports:
/// `board_common::smp::Deaf`) fails the run within the start bound (a
/// tenth of a second of virtual time) with `NoResponse` for CPU 1, the job
/// runs on no CPU, and the next run starts all four again.
pub fn cpu_that_never_comes_up_fails_the_run_in_bounded_time(ctx: &mut Ctx) -> Result<(), Fail> {
    cpus(ctx)?;
    let s = smp::starter().or_fail("CPU list")?;
    let per_second = s.per_second();
    let ran = AtomicUsize::new(0);
    let t0 = s.now();
    let r = board_common::smp::run_bounded(&Deaf(s), CPUS, per_second / 10, per_second, &|_| {
        ran.fetch_add(1, Ordering::SeqCst);
    });
    let took = s.now().wrapping_sub(t0);
    check_eq!(
        r,
        Err(SmpError::NoResponse { cpu: 1 }),
        "run with a deaf CPU 1"
    );
    check_eq!(ran.load(Ordering::SeqCst), 0, "CPUs that ran the job");
    check!(
        took < per_second / 5,
        "the failed run took {took} ticks ({per_second} a second)"
    );
    smp::run(CPUS, JOB_SECONDS, &|_| {
        ran.fetch_add(1, Ordering::SeqCst);
    })
    .map_err(|e| fail_msg(format_args!("the next run: {e}")))?;
    check_eq!(ran.load(Ordering::SeqCst), CPUS, "CPUs in the next run");
    Ok(())
}

/// The unit's fault log: its handler runs on the boot CPU (the MSI's
/// target), the deferred drain on whichever CPU frees the driver.
static LOG: FaultLog<Unit, FaultRecord> = FaultLog::new(drain, cpu_id);

fn cpu_id() -> u64 {
    u64::from(apic_id())
}

/// Drains the fault records as the fault event's handler does; whether it
/// reported an overflow or a queue error.
fn drain(v: &mut Unit, f: &mut dyn FnMut(FaultRecord)) -> bool {
    let s = v.handle_irq(f);
    s.overflow || s.queue_error || s.timeout_error || s.completion_error
}

/// The [`irq::DEVICE_VECTOR`] handler: the unit's fault event.
fn on_fault() {
    LOG.on_irq();
}

/// What the holder of the unit's lock runs for an interrupt that found it
/// taken.
fn deferred(v: &mut Unit) {
    LOG.deferred(v);
}

/// The board's side of the test: domains of format `F`.
struct Q35<F> {
    mem: &'static BoardMemory,
    _format: PhantomData<F>,
}

impl<F: BoardFormat + Send + Sync> SmpBoard for Q35<F> {
    type Iommu = Unit;
    type Format = F;
    type Mem = &'static BoardMemory;
    type Record = FaultRecord;

    fn log(&self) -> &'static FaultLog<Unit, FaultRecord> {
        &LOG
    }
    fn cpu_index(&self) -> fn() -> usize {
        // QEMU's q35 gives CPU n the APIC ID n.
        || apic_id() as usize
    }
    fn deferred(&self) -> fn(&mut Unit) {
        deferred
    }
    fn new_domain(&self, v: &mut Unit, id: u16) -> Result<Dom<F>, Fail> {
        new_domain_in::<F>(v, self.mem, id, APERTURE_A)
    }
    /// The fault event: an MSI to the running (boot) CPU.
    fn arm(&self, v: &mut Unit) -> Result<(), Fail> {
        let (addr, data) = irq::msi_for(apic_id(), DEVICE_VECTOR);
        irq::set_device_handler(Some(on_fault));
        v.set_fault_msi(addr, data);
        v.set_fault_irq_masked(false);
        Ok(())
    }
    fn disarm(&self, v: &mut Unit) -> Result<(), Fail> {
        v.set_fault_irq_masked(true);
        v.set_fault_msi(0, 0);
        irq::set_device_handler(None);
        Ok(())
    }
    fn check_fault(&self, r: &FaultRecord, x: &Expected, _: TableFormat) -> Result<(), Fail> {
        check_record(
            r,
            x.dev,
            x.iova,
            &[F::unmapped(Access::Write)],
            Access::Write,
        )
    }
    fn nothing_left(&self, v: &mut Unit) -> Result<(), Fail> {
        no_faults(v)
    }
    fn queue_bad_command(&self, v: &mut Unit) -> Result<bool, Fail> {
        if !v.uses_queued_invalidation() {
            return Ok(false);
        }
        // Type 0xf is no descriptor: the unit sets FSTS.IQE (VT-d 11.4.9.1)
        // and raises the fault event, whose MSI this test handles.
        v.submit_raw(InvDesc::from_raw([0xf, 0]))
            .or_fail("submit an invalid descriptor")?;
        Ok(true)
    }
    fn run(&self, job: Job<'_>) -> Result<(), SmpError> {
        smp::run(CPUS, JOB_SECONDS, job)
    }
    fn interrupts_on(&self) {
        x86_64::instructions::interrupts::enable();
    }
    fn interrupts_off(&self) {
        x86_64::instructions::interrupts::disable();
    }
    fn now(&self) -> u64 {
        // SAFETY: RDTSC only reads the time-stamp counter.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    fn per_second(&self) -> u64 {
        // QEMU's TSC counts virtual nanoseconds under -icount.
        1_000_000_000
    }
}

per_format!(
    /// Four CPUs at once run DMA transactions on three devices — edu
    /// 00:03.0 and 00:04.0 in one domain, the virtio-blk 00:08.0 in another
    /// — through the crate's shared unit and shared domains, every byte
    /// checked, while each CPU raises one deliberate fault and the boot CPU
    /// takes the unit's fault-event MSI and drains the record through
    /// `SharedIommu::handle_irq` (`board_common::smp_dma`).
    four_cpus_dma_on_three_devices_while_faults_interrupt => four_cpus_body
);

fn four_cpus_body<F: BoardFormat + Send + Sync>(ctx: &mut Ctx) -> Result<(), Fail> {
    cpus(ctx)?;
    let virtio = ctx.virtio.clone()?;
    let mut pages = [[PhysAddr(0); 2]; MAX_CPUS];
    for p in pages.iter_mut().flatten() {
        *p = ctx.mem.dma_pages(1).or_fail("page")?;
    }
    let queue = [
        ctx.mem.dma_pages(1).or_fail("ring page")?,
        ctx.mem.dma_pages(1).or_fail("header page")?,
    ];
    let dev = Devices {
        edu: [&*ctx.edu[0], &*ctx.edu[1]],
        virtio: &virtio,
        pages,
        queue,
    };
    let board = Q35::<F> {
        mem: ctx.mem,
        _format: PhantomData,
    };
    let r = with_unit_owned(ctx, |vtd| {
        let (mut back, r) = smp_dma::four_cpus(&board, vtd, &dev);
        // Whatever the run left: the fault event off, the virtio-blk
        // blocked again.
        let _ = board.disarm(&mut back);
        let _ = back.detach(virtio.id);
        (Some(back), r)
    });
    for p in pages.into_iter().flatten().chain(queue) {
        free_pages(ctx, p, 1)?;
    }
    r
}
