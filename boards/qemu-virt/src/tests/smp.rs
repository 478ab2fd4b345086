//! Several CPUs at once: secondary CPUs started through PSCI
//! ([`crate::smp`]) run a job next to the boot CPU.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::{DmaDirection, MapAttrs, PteFormat};
use bare_iommu::smmuv3::{Event, Smmu, SmmuConfig};
use bare_iommu::{IommuBackend, PAGE_SIZE, PhysAddr, TableFormat};
use board_common::edu::DmaBudget;
use board_common::smp::{Deaf, MAX_CPUS, SmpError};
use board_common::smp_dma::{self, Mmio, SmpBoard, VirtioLane, Work};
use board_common::virtio::{DmaBuf, VirtioBlk};
use spin::Mutex;

use super::smmu::{self, Mem};
use crate::harness::{Ctx, Fail, OrFail, Virtio, fail_msg};
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

/// The SMMU while the SMP test runs: every CPU reaches it through
/// [`Virt::iommu`], the interrupt handler through the same lock.
static SMP_SMMU: Mutex<Option<Smmu<Mem>>> = Mutex::new(None);
/// Events the handler drained, in order (the count is exact, the list cut).
static EVENTS: Mutex<heapless::Vec<Event, 8>> = Mutex::new(heapless::Vec::new());
/// Events drained so far.
static HANDLED: AtomicU32 = AtomicU32::new(0);
/// Handler runs, runs on another CPU than the boot CPU, runs that could
/// not reach the SMMU, and whether an overflow or a GERROR was reported.
static IRQS: AtomicU32 = AtomicU32::new(0);
static ELSEWHERE: AtomicU32 = AtomicU32::new(0);
static MISSED: AtomicU32 = AtomicU32::new(0);
static TROUBLE: AtomicU32 = AtomicU32::new(0);
/// The boot CPU's MPIDR affinity (the SPIs are routed to it).
static BOOT_MPIDR: AtomicU64 = AtomicU64::new(u64::MAX);
/// Polls of a virtio request (QEMU completes it in real time).
const VIRTIO_POLLS: u32 = 20_000_000;
/// Priority of both SMMU SPIs.
const PRIORITY: u8 = 0xa0;

/// The handler of the SMMU's event-queue and GERROR SPIs.
fn on_smmu_irq(_intid: u32) {
    IRQS.fetch_add(1, Ordering::SeqCst);
    if mpidr() != BOOT_MPIDR.load(Ordering::SeqCst) {
        ELSEWHERE.fetch_add(1, Ordering::SeqCst);
    }
    let mut got: heapless::Vec<Event, 8> = heapless::Vec::new();
    let mut n = 0u32;
    // Bounded: an AP holds the SMMU for one call at a time, IRQs masked.
    let report = smp_dma::lock(&SMP_SMMU, "SMMU").ok().and_then(|mut s| {
        s.as_mut().map(|s| {
            s.handle_irq(|e| {
                n += 1;
                let _ = got.push(e);
            })
        })
    });
    let Some(report) = report else {
        MISSED.fetch_add(1, Ordering::SeqCst);
        return;
    };
    if report.overflow || report.gerror != 0 {
        TROUBLE.fetch_add(1, Ordering::SeqCst);
    }
    if let Ok(mut evs) = smp_dma::lock(&EVENTS, "events") {
        for e in got {
            let _ = evs.push(e);
        }
    }
    HANDLED.fetch_add(n, Ordering::SeqCst);
}

/// The board's side of the workload.
struct Virt;

impl SmpBoard<Smmu<Mem>> for Virt {
    fn iommu<R>(&self, f: impl FnOnce(&mut Smmu<Mem>) -> R) -> Result<R, Fail> {
        irq::masked(|| {
            let mut s = smp_dma::lock(&SMP_SMMU, "SMMU")?;
            s.as_mut().map(f).or_fail("SMMU")
        })
    }
    fn faults_handled(&self) -> u32 {
        HANDLED.load(Ordering::SeqCst)
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
/// domains and an SMMU built by this crate, every byte checked
/// (`board_common::smp_dma`), while each AP raises one deliberate fault
/// (an edu write to an unlinked IOVA) and the boot CPU takes the SMMU's
/// event-queue SPI (wired on `virt`, from the DTB) and drains the record
/// with `Smmu::handle_irq`. Exactly the deliberate faults arrive, each
/// once, in order, through the interrupt, on the boot CPU. Until the
/// library's concurrent API lands, the SMMU and each domain sit behind a
/// `spin::Mutex` held per call (see `smp_dma`).
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
    let smmu = smmu::bring_up(
        ctx,
        SmmuConfig {
            irqs: true,
            evtq_log2: 7,
            ..SmmuConfig::default()
        },
    )?;
    let format = smmu.preferred_format();
    irq::masked(|| {
        *SMP_SMMU.lock() = Some(smmu);
        EVENTS.lock().clear();
    });
    for c in [&HANDLED, &IRQS, &ELSEWHERE, &MISSED, &TROUBLE] {
        c.store(0, Ordering::SeqCst);
    }
    BOOT_MPIDR.store(mpidr(), Ordering::SeqCst);
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
    let r = armed.and_then(|()| match format {
        Some(TableFormat::ArmStage1) => shared(ctx, ArmStage1, virtio),
        Some(TableFormat::ArmStage2) => shared(ctx, ArmStage2, virtio),
        other => Err(fail_msg(format_args!(
            "SMMU supports no translation stage ({other:?})"
        ))),
    });
    irq::mask();
    let disarmed = gic
        .disable_spi(eventq)
        .and(gic.disable_spi(gerror))
        .or_fail("disable SPIs");
    irq::unregister(eventq);
    irq::unregister(gerror);
    let down = match irq::masked(|| SMP_SMMU.lock().take()) {
        Some(mut s) => {
            let _ = s.detach(virtio.id);
            smmu::teardown(&mut s, ctx)
        }
        None => Err(fail_msg(format_args!("the SMMU went missing"))),
    };
    r.and(disarmed).and(down)
}

/// The test with the SMMU in [`SMP_SMMU`]: domains, the virtio queue, the
/// run, the checks, the teardown.
fn shared<F: PteFormat + Send>(ctx: &Ctx, fmt: F, virtio: Virtio) -> Result<(), Fail> {
    let b = Virt;
    let mut pages = [[PhysAddr(0); 2]; MAX_CPUS];
    for p in pages.iter_mut().flatten() {
        *p = ctx.mem.dma_pages(1).or_fail("page")?;
    }
    let [ring, header] = smmu::pages::<2>(ctx)?;
    let d0 = b.iommu(|s| smmu::domain(s, ctx, fmt, 40))??;
    let mut d1 = b.iommu(|s| smmu::domain(s, ctx, fmt, 41))??;
    let stage = smmu::fault_stage(d0.info().or_fail("info")?.format);
    b.iommu(|s| -> Result<(), Fail> {
        for e in &ctx.edu {
            s.attach(e.id, d0.attachment()).or_fail("attach edu")?;
        }
        s.attach(virtio.id, d1.attachment())
            .or_fail("attach virtio")
    })??;
    // The virtqueue and the request header in one transaction of domain 1.
    let mut qtx = smmu::alloc(&mut d1, 2 * PAGE_SIZE)?;
    let both = DmaDirection::Bidirectional;
    let ring_iova = d1
        .link(&mut qtx, ring, 0, PAGE_SIZE, both, MapAttrs::empty())
        .or_fail("link ring")?
        .get();
    let header_iova = d1
        .link(
            &mut qtx,
            header,
            PAGE_SIZE,
            PAGE_SIZE,
            both,
            MapAttrs::empty(),
        )
        .or_fail("link header")?
        .get();
    b.iommu(|s| d1.sync(s))?.or_fail("sync")?;
    let cpu = |pa: PhysAddr, off: usize| (pa.get() as usize + off) as *mut u8;
    // SAFETY: the ring page is lent to this test (identity mapped, MMU
    // off), the device reaches it at `ring_iova` through the tables just
    // synced, and the function is driven by this test alone.
    let blk = unsafe {
        VirtioBlk::init(
            virtio.pci,
            DmaBuf::new(cpu(ring, 0), ring_iova),
            DmaBudget::Polls(VIRTIO_POLLS),
        )
    }
    .or_fail("virtio-blk init")?;
    // SAFETY: the header page is lent to this test: header at 0, status
    // byte at 0x800, reached by the device at `header_iova`.
    let lane = unsafe {
        VirtioLane {
            blk,
            header: DmaBuf::new(cpu(header, 0), header_iova),
            status: DmaBuf::new(cpu(header, 0x800), header_iova + 0x800),
        }
    };
    let _ = b.iommu(|s| s.poll_events(|_| {}))?;

    let work = Work {
        doms: [Mutex::new(d0), Mutex::new(d1)],
        edu: [Mutex::new(Mmio(&ctx.edu[0])), Mutex::new(Mmio(&ctx.edu[1]))],
        virtio: Mutex::new(Mmio(lane)),
        pages,
        cpus: CPUS,
        fault_token: Mutex::new(()),
        expected: Mutex::new(heapless::Vec::new()),
        done: [const { AtomicU32::new(0) }; 3],
        aps_finished: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        failed: [const { Mutex::new(None) }; MAX_CPUS],
    };
    let ran = smp::run(CPUS, JOB_SECONDS, &|cpu| work.job(&b, cpu));
    let verdict = work.verdict();
    let most = work.max_in_flight.load(Ordering::SeqCst);
    let expected = work.expected.lock().clone();
    let Work {
        doms: [d0, d1],
        virtio: lane,
        ..
    } = work;
    let (d0, mut d1) = (d0.into_inner(), d1.into_inner());
    let reset = lane.into_inner().0.blk.reset();
    let destroyed = b.iommu(|s| d1.destroy(qtx, s))?;
    b.iommu(|s| -> Result<(), Fail> {
        smmu::detach_all(s, ctx)?;
        s.detach(virtio.id).or_fail("detach virtio")?;
        smmu::end_domain(s, d0)?;
        smmu::end_domain(s, d1)
    })??;
    ran.map_err(|e| fail_msg(format_args!("{e}")))?;
    let done = verdict?;
    reset.or_fail("virtio reset")?;
    destroyed.or_fail("destroy queue transaction")?;

    // Exactly the deliberate faults, once each, in order, through the
    // event-queue SPI on the boot CPU.
    let events = irq::masked(|| EVENTS.lock().clone());
    narrate!(
        "{CPUS} CPUs: {} edu 0 / {} edu 1 / {} virtio-blk transactions ({most} CPUs in a round at once), {} events through {} interrupts",
        done[0],
        done[1],
        done[2],
        events.len(),
        IRQS.load(Ordering::SeqCst)
    );
    check_eq!(expected.len(), CPUS - 1, "deliberate faults made");
    check_eq!(
        HANDLED.load(Ordering::SeqCst) as usize,
        expected.len(),
        "events the handler drained"
    );
    for (e, x) in events.iter().zip(&expected) {
        match e {
            Event::Translation(f) => {
                check_eq!(f.stream_id, x.dev.stream_id(), "F_TRANSLATION StreamID");
                check_eq!(f.addr, x.iova, "F_TRANSLATION address");
                check!(!f.read, "F_TRANSLATION says read; the DMA wrote");
                check_eq!(f.stage, stage, "F_TRANSLATION stage");
            }
            other => fail!("unexpected event {other}"),
        }
    }
    check_eq!(
        MISSED.load(Ordering::SeqCst),
        0,
        "handler runs without the SMMU"
    );
    check_eq!(
        ELSEWHERE.load(Ordering::SeqCst),
        0,
        "handler runs on another CPU than the boot CPU"
    );
    check_eq!(
        TROUBLE.load(Ordering::SeqCst),
        0,
        "overflows or GERRORs reported"
    );
    let left = b.iommu(|s| s.poll_events(|_| {}))?;
    check_eq!(left.events, 0, "events left in the queue");
    Ok(())
}
