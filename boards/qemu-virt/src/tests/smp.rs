//! Several CPUs at once: secondary CPUs started through PSCI
//! ([`crate::smp`]) run a job next to the boot CPU.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bare_iommu::pgtable::PteFormat;
use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::shared::SplitCompletion;
use bare_iommu::smmuv3::{Command, Event, Smmu, SmmuConfig};
use bare_iommu::{IommuBackend, PhysAddr, TableFormat};
use board_common::fault_log::FaultLog;
use board_common::smp::{Deaf, Job, MAX_CPUS, SmpError};
use board_common::smp_dma::{self, Devices, Expected, SmpBoard};

use super::smmu::{self, Dom, Mem};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::{irq, smp, time};

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

/// A CPU that does not come up (its start "succeeds" but it never reports:
/// `board_common::smp::Deaf`) fails the run within the start bound (a
/// tenth of a second of virtual time) with `NoResponse` for CPU 1, the job
/// runs on no CPU, and the next run starts all four again.
pub fn cpu_that_never_comes_up_fails_the_run_in_bounded_time(ctx: &mut Ctx) -> Result<(), Fail> {
    let _ = ctx;
    let s = smp::starter().map_err(|e| fail_msg(format_args!("DTB: {e:?}")))?;
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

/// The SMMU's fault log: its handler runs on the boot CPU (the SPIs are
/// routed there), the deferred drain on whichever CPU frees the driver.
static LOG: FaultLog<Smmu<Mem>, Event> = FaultLog::new(drain, mpidr);
/// Priority of both SMMU SPIs.
const PRIORITY: u8 = 0xa0;

/// Drains the event queue as the SMMU's interrupt does; whether it
/// reported an overflow, a GERROR or a command error.
fn drain(s: &mut Smmu<Mem>, f: &mut dyn FnMut(Event)) -> bool {
    let r = s.handle_irq(f);
    r.overflow || r.gerror != 0 || r.command_error.is_some()
}

/// The handler of the SMMU's event-queue and GERROR SPIs.
fn on_smmu_irq(_intid: u32) {
    LOG.on_irq();
}

/// What the holder of the SMMU's lock runs for an interrupt that found it
/// taken.
fn deferred(s: &mut Smmu<Mem>) {
    LOG.deferred(s);
}

/// The board's side of the test: domains of format `F`.
struct Virt<F> {
    mem: Mem,
    fmt: F,
}

impl<F: PteFormat + Copy + Send + Sync> SmpBoard for Virt<F> {
    type Iommu = Smmu<Mem>;
    type Format = F;
    type Mem = Mem;
    type Record = Event;

    fn log(&self) -> &'static FaultLog<Smmu<Mem>, Event> {
        &LOG
    }
    fn cpu_index(&self) -> fn() -> usize {
        // Aff0: QEMU's virt numbers its CPUs 0, 1, 2, 3 there.
        || (mpidr() & 0xff) as usize
    }
    fn deferred(&self) -> fn(&mut Smmu<Mem>) {
        deferred
    }
    fn new_domain(&self, smmu: &mut Smmu<Mem>, id: u16) -> Result<Dom<F>, Fail> {
        smmu::domain_in(smmu, self.mem, self.fmt, id)
    }
    /// The SMMU raises its interrupts since `init` (`irqs: true`); the
    /// test enables their SPIs around the whole run.
    fn arm(&self, _: &mut Smmu<Mem>) -> Result<(), Fail> {
        Ok(())
    }
    fn disarm(&self, _: &mut Smmu<Mem>) -> Result<(), Fail> {
        Ok(())
    }
    fn check_fault(&self, e: &Event, x: &Expected, format: TableFormat) -> Result<(), Fail> {
        match e {
            Event::Translation(f) => {
                check_eq!(f.stream_id, x.dev.stream_id(), "F_TRANSLATION StreamID");
                check_eq!(f.addr, x.iova, "F_TRANSLATION address");
                check!(!f.read, "F_TRANSLATION says read; the DMA wrote");
                check_eq!(f.stage, smmu::fault_stage(format), "F_TRANSLATION stage");
                Ok(())
            }
            other => fail!("unexpected event {other}"),
        }
    }
    fn nothing_left(&self, s: &mut Smmu<Mem>) -> Result<(), Fail> {
        let left = s.poll_events(|_| {});
        check_eq!(left.events, 0, "events left in the queue");
        Ok(())
    }
    fn queue_bad_command(&self, s: &mut Smmu<Mem>) -> Result<bool, Fail> {
        // Opcode 0x7f is no command: CERROR_ILL stops the queue (IHI 0070
        // §7.1) and raises GERROR.CMDQ_ERR, whose SPI this test handles.
        s.queue_command(Command::raw([0x7f, 0xdead_beef]))
            .or_fail("queue an illegal command")?;
        // A CMD_SYNC behind it publishes the producer index; its ticket is
        // waited for by nobody.
        let _ = s.submit_completion();
        Ok(true)
    }
    fn run(&self, job: Job<'_>) -> Result<(), SmpError> {
        smp::run(CPUS, JOB_SECONDS, job)
    }
    fn interrupts_on(&self) {
        irq::unmask();
    }
    fn interrupts_off(&self) {
        irq::mask();
    }
    fn now(&self) -> u64 {
        time::ticks()
    }
    fn per_second(&self) -> u64 {
        time::frequency()
    }
}

/// Four CPUs at once run DMA transactions on three devices — edu 00:05.0
/// and 00:06.0 in one domain, the virtio-blk 00:08.0 in another — through
/// the crate's shared SMMU and shared domains, every byte checked, while
/// each CPU raises one deliberate fault and the boot CPU takes the SMMU's
/// event-queue SPI (wired on `virt`, from the DTB) and drains the record
/// through `SharedIommu::handle_irq` (`board_common::smp_dma`).
pub fn four_cpus_dma_on_three_devices_while_faults_interrupt(ctx: &mut Ctx) -> Result<(), Fail> {
    let irqs = ctx
        .irqs
        .as_ref()
        .map_err(|why| fail_msg(format_args!("no SMMU interrupts: {why}")))?;
    let (eventq, gerror) = (
        irqs.smmu.eventq.intid().or_fail("eventq INTID")?,
        irqs.smmu.gerror.intid().or_fail("gerror INTID")?,
    );
    let virtio = ctx.virtio.clone()?;
    let mut pages = [[PhysAddr(0); 2]; MAX_CPUS];
    for p in pages.iter_mut() {
        *p = smmu::pages::<2>(ctx)?;
    }
    let dev = Devices {
        edu: [&ctx.edu[0], &ctx.edu[1]],
        virtio: &virtio,
        pages,
        queue: smmu::pages::<2>(ctx)?,
    };
    let smmu = smmu::bring_up(
        ctx,
        SmmuConfig {
            irqs: true,
            evtq_log2: 7,
            ..SmmuConfig::default()
        },
    )?;
    let gic = &irqs.gic;
    let armed = (|| {
        gic.configure_spi(eventq, irqs.smmu.eventq.edge(), PRIORITY)
            .or_fail("configure eventq SPI")?;
        gic.configure_spi(gerror, irqs.smmu.gerror.edge(), PRIORITY)
            .or_fail("configure gerror SPI")?;
        irq::register(eventq, on_smmu_irq).or_fail("register eventq handler")?;
        irq::register(gerror, on_smmu_irq).or_fail("register gerror handler")?;
        gic.enable_spi(eventq).or_fail("enable eventq SPI")?;
        gic.enable_spi(gerror).or_fail("enable gerror SPI")
    })();
    let mem = ctx.mem;
    let (mut smmu, r) = match (armed, smmu.preferred_format()) {
        (Err(e), _) => (smmu, Err(e)),
        (Ok(()), Some(TableFormat::ArmStage1)) => smp_dma::four_cpus(
            &Virt {
                mem,
                fmt: ArmStage1,
            },
            smmu,
            &dev,
        ),
        (Ok(()), Some(TableFormat::ArmStage2)) => smp_dma::four_cpus(
            &Virt {
                mem,
                fmt: ArmStage2,
            },
            smmu,
            &dev,
        ),
        (Ok(()), other) => (
            smmu,
            Err(fail_msg(format_args!(
                "SMMU supports no translation stage ({other:?})"
            ))),
        ),
    };
    irq::mask();
    let disarmed = gic
        .disable_spi(eventq)
        .and(gic.disable_spi(gerror))
        .or_fail("disable SPIs");
    irq::unregister(eventq);
    irq::unregister(gerror);
    let _ = smmu.detach(virtio.id);
    let down = smmu::teardown(&mut smmu, ctx);
    r.and(disarmed).and(down)
}
