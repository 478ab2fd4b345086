//! Several CPUs at once: application processors started with
//! INIT-SIPI-SIPI ([`crate::smp`]) run a job next to the boot CPU.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use bare_iommu::pgtable::{DmaDirection, MapAttrs};
use bare_iommu::vtd::{Access, FaultRecord};
use bare_iommu::{IommuBackend, PAGE_SIZE, PhysAddr};
use board_common::edu::DmaBudget;
use board_common::smp::{Deaf, MAX_CPUS, SmpError};
use board_common::smp_dma::{self, Mmio, SmpBoard, VirtioLane, Work};
use board_common::virtio::{DmaBuf, VirtioBlk};
use spin::Mutex;

use super::vtd::{
    APERTURE_A, BoardFormat, Unit, alloc_tx, check_record, end_domain, first_level, free_pages,
    new_domain, no_faults, per_format, with_unit_owned,
};
use crate::harness::{Ctx, Fail, OrFail, Virtio, fail_msg};
use crate::irq::{self, DEVICE_VECTOR};
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

/// The unit while the SMP test runs: every CPU reaches it through
/// [`Q35::iommu`], the fault handler through the same lock.
static SMP_UNIT: Mutex<Option<Unit>> = Mutex::new(None);
/// Fault records the handler drained, in order.
static RECORDS: Mutex<heapless::Vec<FaultRecord, 8>> = Mutex::new(heapless::Vec::new());
/// Records drained so far.
static HANDLED: AtomicU32 = AtomicU32::new(0);
/// Handler runs, runs on a CPU other than the MSI's target, runs that could
/// not reach the unit, and whether an overflow was reported.
static IRQS: AtomicU32 = AtomicU32::new(0);
static ELSEWHERE: AtomicU32 = AtomicU32::new(0);
static MISSED: AtomicU32 = AtomicU32::new(0);
static OVERFLOW: AtomicBool = AtomicBool::new(false);
/// The APIC ID the fault MSI is sent to (the boot CPU's).
static TARGET_APIC: AtomicU32 = AtomicU32::new(u32::MAX);
/// Polls of a virtio request (QEMU completes it in real time).
const VIRTIO_POLLS: u32 = 20_000_000;

/// The [`irq::DEVICE_VECTOR`] handler: drains the unit's fault records.
fn on_fault() {
    IRQS.fetch_add(1, Ordering::SeqCst);
    if apic_id() != TARGET_APIC.load(Ordering::SeqCst) {
        ELSEWHERE.fetch_add(1, Ordering::SeqCst);
    }
    let mut got: heapless::Vec<FaultRecord, 8> = heapless::Vec::new();
    // Bounded: an AP holds the unit for one call at a time, interrupts off.
    let status = smp_dma::lock(&SMP_UNIT, "unit").ok().and_then(|mut u| {
        u.as_mut().map(|v| {
            v.handle_irq(|r| {
                let _ = got.push(r);
            })
        })
    });
    let Some(status) = status else {
        MISSED.fetch_add(1, Ordering::SeqCst);
        return;
    };
    OVERFLOW.fetch_or(status.overflow, Ordering::SeqCst);
    if let Ok(mut recs) = smp_dma::lock(&RECORDS, "records") {
        for r in &got {
            let _ = recs.push(*r);
        }
    }
    HANDLED.fetch_add(got.len() as u32, Ordering::SeqCst);
}

/// The board's side of the workload.
struct Q35;

impl SmpBoard<Unit> for Q35 {
    fn iommu<R>(&self, f: impl FnOnce(&mut Unit) -> R) -> Result<R, Fail> {
        irq::without_interrupts(|| {
            let mut u = smp_dma::lock(&SMP_UNIT, "VT-d unit")?;
            u.as_mut().map(f).or_fail("VT-d unit")
        })
    }
    fn faults_handled(&self) -> u32 {
        HANDLED.load(Ordering::SeqCst)
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
    /// — through domains and a unit built by this crate, every byte checked
    /// (`board_common::smp_dma`), while each AP raises one deliberate
    /// fault (an edu write to an unlinked IOVA) and the boot CPU takes the
    /// unit's fault-event MSI and drains the record with `Vtd::handle_irq`.
    /// Exactly the deliberate faults arrive, each once, in order, through
    /// the interrupt, on the boot CPU. Until the library's concurrent API
    /// lands, the unit and each domain sit behind a `spin::Mutex` held per
    /// call (see `smp_dma`).
    four_cpus_dma_on_three_devices_while_faults_interrupt => four_cpus_body
);

fn four_cpus_body<F: BoardFormat + Send>(ctx: &mut Ctx) -> Result<(), Fail> {
    cpus(ctx)?;
    let boot_apic = irq::init().or_fail("interrupt setup")?;
    let virtio = ctx.virtio.clone()?;
    let mut pages = [[PhysAddr(0); 2]; MAX_CPUS];
    for p in pages.iter_mut().flatten() {
        *p = ctx.mem.dma_pages(1).or_fail("page")?;
    }
    let queue = [
        ctx.mem.dma_pages(1).or_fail("ring page")?,
        ctx.mem.dma_pages(1).or_fail("header page")?,
    ];
    let r = with_unit_owned(ctx, |vtd| {
        irq::without_interrupts(|| {
            *SMP_UNIT.lock() = Some(vtd);
            RECORDS.lock().clear();
        });
        for c in [&HANDLED, &IRQS, &ELSEWHERE, &MISSED] {
            c.store(0, Ordering::SeqCst);
        }
        OVERFLOW.store(false, Ordering::SeqCst);
        let r = shared::<F>(ctx, virtio, pages, queue, boot_apic);
        irq::set_device_handler(None);
        let mut back = irq::without_interrupts(|| SMP_UNIT.lock().take());
        if let Some(v) = back.as_mut() {
            v.set_fault_irq_masked(true);
            v.set_fault_msi(0, 0);
            let _ = v.detach(virtio.id);
        }
        (back, r)
    });
    for p in pages.into_iter().flatten().chain(queue) {
        free_pages(ctx, p, 1)?;
    }
    r
}

/// The test with the unit in [`SMP_UNIT`]: domains, the virtio queue, the
/// fault MSI, the run, the checks, the teardown.
fn shared<F: BoardFormat + Send>(
    ctx: &Ctx,
    virtio: Virtio,
    pages: [[PhysAddr; 2]; MAX_CPUS],
    [ring, header]: [PhysAddr; 2],
    boot_apic: u32,
) -> Result<(), Fail> {
    let b = Q35;
    let d0 = b.iommu(|v| new_domain::<F>(v, ctx, 40, APERTURE_A))??;
    let mut d1 = b.iommu(|v| new_domain::<F>(v, ctx, 41, APERTURE_A))??;
    b.iommu(|v| -> Result<(), Fail> {
        for e in &ctx.edu {
            v.attach(e.id, d0.attachment()).or_fail("attach edu")?;
        }
        v.attach(virtio.id, d1.attachment())
            .or_fail("attach virtio")
    })??;
    // The virtqueue and the request header in one transaction of domain 1.
    let mut qtx = alloc_tx(&mut d1, 2 * PAGE_SIZE)?;
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
    b.iommu(|v| d1.sync(v))?.or_fail("sync")?;
    let cpu = |pa: PhysAddr, off: usize| (pa.get() as usize + off) as *mut u8;
    // SAFETY: the ring page is lent to this test (identity mapped), the
    // device reaches it at `ring_iova` through the tables just synced, and
    // the function is driven by this test alone.
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

    // The fault event: an MSI to the boot CPU, handled by `on_fault`.
    let (addr, data) = irq::msi_for(boot_apic, DEVICE_VECTOR);
    TARGET_APIC.store(boot_apic, Ordering::SeqCst);
    b.iommu(|v| {
        v.poll_faults(|_| {});
        v.set_fault_msi(addr, data);
        v.set_fault_irq_masked(false);
    })?;
    irq::set_device_handler(Some(on_fault));

    let work = Work {
        doms: [Mutex::new(d0), Mutex::new(d1)],
        edu: [
            Mutex::new(Mmio(&*ctx.edu[0])),
            Mutex::new(Mmio(&*ctx.edu[1])),
        ],
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
    irq::set_device_handler(None);
    b.iommu(|v| v.set_fault_irq_masked(true))?;
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
    let destroyed = b.iommu(|v| d1.destroy(qtx, v))?;
    b.iommu(|v| -> Result<(), Fail> {
        for d in [ctx.edu[0].id, ctx.edu[1].id, virtio.id] {
            v.detach(d).or_fail("detach")?;
        }
        end_domain(v, d0)?;
        end_domain(v, d1)
    })??;
    ran.map_err(|e| fail_msg(format_args!("{e}")))?;
    let done = verdict?;
    reset.or_fail("virtio reset")?;
    destroyed.or_fail("destroy queue transaction")?;

    // Exactly the deliberate faults, once each, in order, through the MSI
    // on the boot CPU.
    let recs = irq::without_interrupts(|| RECORDS.lock().clone());
    narrate!(
        "{CPUS} CPUs: {} edu 0 / {} edu 1 / {} virtio-blk transactions ({most} CPUs in a round at once), {} faults through {} interrupts",
        done[0],
        done[1],
        done[2],
        recs.len(),
        IRQS.load(Ordering::SeqCst)
    );
    check_eq!(expected.len(), CPUS - 1, "deliberate faults made");
    check_eq!(
        recs.len(),
        expected.len(),
        "fault records the handler drained"
    );
    for (r, e) in recs.iter().zip(&expected) {
        check_record(
            r,
            e.dev,
            e.iova,
            &[F::unmapped(Access::Write)],
            Access::Write,
        )?;
    }
    check_eq!(
        MISSED.load(Ordering::SeqCst),
        0,
        "handler runs without the unit"
    );
    check_eq!(
        ELSEWHERE.load(Ordering::SeqCst),
        0,
        "handler runs on another CPU than the MSI's target"
    );
    check!(
        !OVERFLOW.load(Ordering::SeqCst),
        "primary fault overflow reported"
    );
    b.iommu(no_faults)?
}
