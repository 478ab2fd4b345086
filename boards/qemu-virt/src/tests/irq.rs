//! The SMMU's interrupt path, as a hypervisor uses it: the SMMU's wired
//! event-queue and GERROR SPIs (numbers and trigger from the DTB) routed by
//! the GICv3 to this CPU, the IRQ vector acknowledging them, and a handler
//! calling [`Smmu::handle_irq`]. No test here polls the event queue to get
//! its result: everything the checks look at was recorded by the handler.
//!
//! The driver is shared with the handler through an [`IrqShared`]: the test
//! reaches it only with IRQs masked, the handler runs with IRQs masked, so
//! on this one CPU neither ever waits for the other.

use core::sync::atomic::{AtomicU32, Ordering};

use bare_iommu::TableFormat;
use bare_iommu::addr::PAGE_SIZE;
use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::{DmaDirection, MapAttrs, PteFormat};
use bare_iommu::smmuv3::regs::{GERROR, Page0};
use bare_iommu::smmuv3::{Event, EventReport, Smmu, SmmuConfig};
use tock_registers::interfaces::Readable;

use super::smmu::{self, Drained, Mem};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::irq::{self, IrqShared};
use crate::{Irqs, time};

/// Events the handler keeps (the count is exact, the list is cut).
const KEEP: usize = 16;
/// Priorities (lower is more urgent): errors before events, as Linux does
/// not but a hypervisor may want; it also makes the GERROR handler the one
/// that sees an overflow first.
const GERROR_PRIORITY: u8 = 0x80;
const EVENTQ_PRIORITY: u8 = 0xa0;

/// What the handler saw since the test armed it.
#[derive(Default)]
struct Seen {
    /// The first records delivered.
    events: heapless::Vec<Event, KEEP>,
    /// Records delivered.
    event_count: u32,
    /// Handler runs for the event-queue / GERROR interrupt.
    eventq_irqs: u32,
    gerror_irqs: u32,
    /// GERROR bits acknowledged in runs for each interrupt.
    acked_in_eventq_irq: u32,
    acked_in_gerror_irq: u32,
    /// An overflow was reported.
    overflow: bool,
}

/// The driver and what the handler recorded.
struct Shared {
    smmu: Smmu<Mem>,
    eventq: u32,
    gerror: u32,
    seen: Seen,
}

static SHARED: IrqShared<Shared> = IrqShared::new();
/// Handler runs that found no driver (never expected).
static MISSED: AtomicU32 = AtomicU32::new(0);

/// The registered handler of both SMMU interrupts: what a hypervisor's
/// SMMU interrupt handler does, plus bookkeeping for the checks.
fn smmu_irq(intid: u32) {
    let ran = SHARED.with(|s| {
        let seen = &mut s.seen;
        let report = s.smmu.handle_irq(|e| {
            seen.event_count += 1;
            let _ = seen.events.push(e);
        });
        seen.overflow |= report.overflow;
        if intid == s.gerror {
            seen.gerror_irqs += 1;
            seen.acked_in_gerror_irq |= report.gerror;
        } else if intid == s.eventq {
            seen.eventq_irqs += 1;
            seen.acked_in_eventq_irq |= report.gerror;
        }
    });
    if ran.is_none() {
        MISSED.fetch_add(1, Ordering::SeqCst);
    }
}

/// Runs `f` on the shared driver (IRQs masked meanwhile).
fn shared<R>(f: impl FnOnce(&mut Shared) -> R) -> Result<R, Fail> {
    SHARED.with(f).or_fail("driver shared with the IRQ handler")
}

/// Waits (bounded: one second of virtual time) until the handler's record
/// satisfies `done`, with IRQs open.
fn wait_for(what: &str, done: impl Fn(&Seen) -> bool) -> Result<(), Fail> {
    let deadline = time::ticks() + time::frequency();
    loop {
        if shared(|s| done(&s.seen))? {
            return Ok(());
        }
        if time::ticks() > deadline {
            let (e, g, n) =
                shared(|s| (s.seen.eventq_irqs, s.seen.gerror_irqs, s.seen.event_count))?;
            fail!("{what}: not seen within 1 s ({e} eventq / {g} gerror IRQs, {n} events)");
        }
        core::hint::spin_loop();
    }
}

/// Brings the SMMU up with its interrupts enabled, hands it to the
/// handler, configures and enables both SPIs and unmasks IRQs; runs `body`;
/// then masks IRQs, disables the SPIs, takes the driver back and shuts the
/// SMMU down — whatever `body` returned.
fn with_smmu_irqs(
    ctx: &Ctx,
    evtq_log2: u8,
    body: impl FnOnce(&Ctx, &Irqs) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let irqs = ctx
        .irqs
        .as_ref()
        .map_err(|why| fail_msg(format_args!("no SMMU interrupts: {why}")))?;
    let (eventq, gerror) = (
        irqs.smmu.eventq.intid().or_fail("eventq INTID")?,
        irqs.smmu.gerror.intid().or_fail("gerror INTID")?,
    );
    let smmu = smmu::bring_up(
        ctx,
        SmmuConfig {
            irqs: true,
            evtq_log2,
            ..SmmuConfig::default()
        },
    )?;
    SHARED.put(Shared {
        smmu,
        eventq,
        gerror,
        seen: Seen::default(),
    });
    let armed = arm(irqs, eventq, gerror);
    let verdict = armed.and_then(|()| body(ctx, irqs));
    irq::mask();
    let gic = &irqs.gic;
    let disarmed = gic
        .disable_spi(eventq)
        .and(gic.disable_spi(gerror))
        .or_fail("disable SPIs");
    irq::unregister(eventq);
    irq::unregister(gerror);
    let down = match SHARED.take() {
        Some(mut s) => smmu::teardown(&mut s.smmu, ctx),
        None => Err(fail_msg(format_args!("the driver went missing"))),
    };
    let later = if down.is_ok() {
        interrupts_off_for_next_owner(ctx)
    } else {
        Ok(())
    };
    let missed = MISSED.swap(0, Ordering::SeqCst);
    let missed = if missed == 0 {
        Ok(())
    } else {
        Err(fail_msg(format_args!(
            "{missed} handler runs found no driver"
        )))
    };
    verdict.and(disarmed).and(down).and(later).and(missed)
}

/// The next owner that brings the SMMU up without interrupts gets none:
/// `init` with `irqs: false` leaves SMMU_IRQ_CTRL (and its ACK) at 0.
fn interrupts_off_for_next_owner(ctx: &Ctx) -> Result<(), Fail> {
    let mut smmu = smmu::bring_up(ctx, SmmuConfig::default())?;
    // SAFETY: `smmu_base` is the SMMU's register page 0 (MMU off:
    // identity); IRQ_CTRL/IRQ_CTRLACK reads have no side effects.
    let page0 = unsafe { &*(ctx.smmu_base as *const Page0) };
    let (ctrl, ack) = (page0.irq_ctrl.get(), page0.irq_ctrlack.get());
    smmu.shutdown().or_fail("SMMU shutdown")?;
    check_eq!(
        (ctrl, ack),
        (0, 0),
        "IRQ_CTRL/IRQ_CTRLACK after init without interrupts"
    );
    Ok(())
}

fn arm(irqs: &Irqs, eventq: u32, gerror: u32) -> Result<(), Fail> {
    let gic = &irqs.gic;
    gic.configure_spi(eventq, irqs.smmu.eventq.edge(), EVENTQ_PRIORITY)
        .or_fail("configure eventq SPI")?;
    gic.configure_spi(gerror, irqs.smmu.gerror.edge(), GERROR_PRIORITY)
        .or_fail("configure gerror SPI")?;
    irq::register(eventq, smmu_irq).or_fail("register eventq handler")?;
    irq::register(gerror, smmu_irq).or_fail("register gerror handler")?;
    gic.enable_spi(eventq).or_fail("enable eventq SPI")?;
    gic.enable_spi(gerror).or_fail("enable gerror SPI")?;
    irq::unmask();
    Ok(())
}

/// Runs `body` with a domain format the SMMU supports (stage 1 first).
fn preferred<R>(
    body1: impl FnOnce(ArmStage1) -> Result<R, Fail>,
    body2: impl FnOnce(ArmStage2) -> Result<R, Fail>,
) -> Result<R, Fail> {
    match shared(|s| s.smmu.preferred_format())? {
        Some(TableFormat::ArmStage1) => body1(ArmStage1),
        Some(TableFormat::ArmStage2) => body2(ArmStage2),
        other => fail!("SMMU supports no translation stage ({other:?})"),
    }
}

/// A domain with `edu` 0 attached and a 4-page transaction whose page 0 is
/// linked and synced; returns the domain, the transaction and the IOVA of
/// its unlinked page 2.
fn domain_with_hole<F: PteFormat>(
    ctx: &Ctx,
    fmt: F,
    id: u16,
) -> Result<(smmu::Dom<F>, bare_iommu::state::IovaState, u64), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = shared(|s| smmu::attached_domain(&mut s.smmu, ctx, fmt, id, edu))??;
    let [page] = smmu::pages(ctx)?;
    let mut tx = smmu::alloc(&mut dom, 4 * PAGE_SIZE)?;
    dom.link(
        &mut tx,
        page,
        0,
        PAGE_SIZE,
        DmaDirection::Bidirectional,
        MapAttrs::empty(),
    )
    .or_fail("link")?;
    shared(|s| dom.sync(&mut s.smmu))?.or_fail("sync")?;
    let hole = tx.iova().get() + 2 * PAGE_SIZE;
    Ok((dom, tx, hole))
}

/// Destroys the transaction, detaches both devices and ends the domain.
fn finish<F: PteFormat>(
    ctx: &Ctx,
    mut dom: smmu::Dom<F>,
    tx: bare_iommu::state::IovaState,
) -> Result<(), Fail> {
    shared(|s| dom.destroy(tx, &mut s.smmu))?.or_fail("destroy")?;
    shared(|s| smmu::detach_all(&mut s.smmu, ctx))??;
    shared(|s| smmu::end_domain(&mut s.smmu, dom))?
}

/// What the handler delivered, in the form `smmu::expect_translation_fault`
/// checks.
fn delivered() -> Result<Drained, Fail> {
    shared(|s| Drained {
        events: s.seen.events.clone(),
        report: EventReport {
            events: s.seen.event_count,
            overflow: s.seen.overflow,
            gerror: s.seen.acked_in_eventq_irq | s.seen.acked_in_gerror_irq,
            ..EventReport::default()
        },
    })
}

/// The event-queue interrupt delivers a translation fault: edu writes to an
/// unlinked IOVA; with IRQs masked at the CPU the event-queue SPI is left
/// pending at the GIC and nothing is delivered; once IRQs are unmasked the
/// handler runs, `handle_irq` decodes F_TRANSLATION (edu's StreamID, the
/// IOVA) and drains the queue; a second fault with IRQs open arrives the
/// same way. The test never polls the queue for its result.
pub fn smmu_event_irq_delivers_translation_fault(ctx: &mut Ctx) -> Result<(), Fail> {
    with_smmu_irqs(ctx, 7, |ctx, irqs| {
        preferred(
            |fmt| event_irq(ctx, irqs, fmt),
            |fmt| event_irq(ctx, irqs, fmt),
        )
    })
}

fn event_irq<F: PteFormat>(ctx: &Ctx, irqs: &Irqs, fmt: F) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let sid = edu.id.stream_id();
    let eventq = irqs.smmu.eventq.intid().or_fail("eventq INTID")?;
    let (dom, tx, hole) = domain_with_hole(ctx, fmt, 20)?;
    let stage = smmu::fault_stage(dom.info().or_fail("info")?.format);
    let (taken_before, unhandled_before, _) = irq::counters();

    // IRQs masked at the CPU: the SMMU raises its SPI, nothing is handled.
    irq::mask();
    edu.dma_to_ram(hole, 0, 4).or_fail("faulting DMA")?;
    let pending = irqs.gic.spi_pending(eventq).or_fail("GICD_ISPENDR")?;
    let before = shared(|s| s.seen.event_count)?;
    check!(
        pending,
        "event-queue SPI {eventq} not pending at the GIC after the fault"
    );
    check_eq!(before, 0, "events handled while IRQs were masked");
    narrate!("fault with IRQs masked: INTID {eventq} pending at the distributor, nothing handled");

    // Unmasked: the pending interrupt is taken and the handler delivers it.
    irq::unmask();
    wait_for("F_TRANSLATION through the event-queue IRQ", |s| {
        s.event_count >= 1
    })?;
    let d = delivered()?;
    check_eq!(d.report.events, 1, "records for one 4-byte fault");
    smmu::expect_translation_fault(&d, sid, hole, hole + 4, stage)?;
    let irqs_seen = shared(|s| s.seen.eventq_irqs)?;
    check!(irqs_seen >= 1, "no event-queue IRQ handled");
    check!(
        !irqs.gic.spi_pending(eventq).or_fail("GICD_ISPENDR")?,
        "event-queue SPI still pending after the handler"
    );
    if let Some(Event::Translation(f)) = d.events.first() {
        narrate!(
            "unmasked: INTID {eventq} taken → handle_irq: F_TRANSLATION StreamID {:#x} at {:#x} ({:?})",
            f.stream_id,
            f.addr,
            f.stage
        );
    }

    // IRQs open: a second fault is delivered while the test waits.
    let second = hole + 0x40;
    edu.dma_to_ram(second, 0, 4)
        .or_fail("second faulting DMA")?;
    wait_for("second F_TRANSLATION through the IRQ", |s| {
        s.event_count >= 2
    })?;
    let d = delivered()?;
    check_eq!(d.report.events, 2, "records for two 4-byte faults");
    match d.events.get(1) {
        Some(Event::Translation(f)) => {
            check_eq!(f.stream_id, sid, "second F_TRANSLATION StreamID");
            check_eq!(f.addr, second, "second F_TRANSLATION address");
        }
        other => fail!("second record: {other:?}"),
    }
    check!(!d.report.overflow, "overflow reported for two faults");
    check_eq!(d.report.gerror, 0, "GERROR bits for two faults");

    // Nothing was left for polling: the handler drained the queue.
    let left = shared(|s| s.smmu.poll_events(|_| {}))?;
    check_eq!(left.events, 0, "records left in the queue after the IRQs");
    let (taken, unhandled, busy) = irq::counters();
    check!(taken > taken_before, "no interrupt acknowledged");
    check_eq!(unhandled, unhandled_before, "interrupts without a handler");
    check_eq!(busy, 0, "IRQs that found the handler table locked");
    check_eq!(
        shared(|s| s.smmu.stats().events)?,
        2,
        "records the driver delivered in all"
    );
    finish(ctx, dom, tx)
}

/// The GERROR interrupt reports an event-queue overflow: a 4 KiB DMA to an
/// unlinked IOVA makes 1024 records for a 128-record queue; QEMU flags
/// GERROR.EVENTQ_ABT_ERR. The GERROR SPI (more urgent than the event-queue
/// SPI) is taken, its handler's `handle_irq` reports the overflow and
/// acknowledges the error (GERROR == GERRORN afterwards); the queue then
/// delivers a later fault through its own interrupt again.
pub fn smmu_gerror_irq_reports_event_queue_overflow(ctx: &mut Ctx) -> Result<(), Fail> {
    with_smmu_irqs(ctx, 7, |ctx, irqs| {
        preferred(
            |fmt| gerror_irq(ctx, irqs, fmt),
            |fmt| gerror_irq(ctx, irqs, fmt),
        )
    })
}

fn gerror_irq<F: PteFormat>(ctx: &Ctx, irqs: &Irqs, fmt: F) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let sid = edu.id.stream_id();
    let gerror = irqs.smmu.gerror.intid().or_fail("gerror INTID")?;
    let (dom, tx, hole) = domain_with_hole(ctx, fmt, 21)?;
    let stage = smmu::fault_stage(dom.info().or_fail("info")?.format);
    let abt = GERROR::EVENTQ_ABT_ERR::SET.value;

    edu.dma_to_ram(hole, 0, PAGE_SIZE as u32)
        .or_fail("fault storm DMA")?;
    wait_for("overflow through the GERROR IRQ", |s| {
        s.gerror_irqs >= 1 && s.overflow
    })?;
    let (gerror_irqs, in_gerror, in_eventq, count) = shared(|s| {
        (
            s.seen.gerror_irqs,
            s.seen.acked_in_gerror_irq,
            s.seen.acked_in_eventq_irq,
            s.seen.event_count,
        )
    })?;
    check!(gerror_irqs >= 1, "no GERROR IRQ handled");
    check_eq!(
        in_gerror & abt,
        abt,
        "EVENTQ_ABT_ERR acknowledged by the GERROR IRQ's handler (eventq handler acked {in_eventq:#x})"
    );
    check_eq!(count, 128, "records delivered from a full 128-record queue");
    let d = delivered()?;
    smmu::expect_translation_fault(&d, sid, hole, hole + PAGE_SIZE, stage)?;
    // SAFETY: `smmu_base` is the SMMU's register page 0 (MMU off:
    // identity); GERROR and GERRORN reads have no side effects.
    let page0 = unsafe { &*(ctx.smmu_base as *const Page0) };
    let (ge, gn) = (page0.gerror.get(), page0.gerrorn.get());
    check_eq!(
        ge ^ gn,
        0,
        "GERROR ^ GERRORN after the handler (GERROR {ge:#x})"
    );
    check!(
        !irqs.gic.spi_pending(gerror).or_fail("GICD_ISPENDR")?,
        "GERROR SPI still pending after the handler"
    );
    check_eq!(
        shared(|s| s.smmu.stats().event_overflows)?,
        1,
        "overflows the driver counted"
    );
    narrate!(
        "fault storm: GERROR INTID {gerror} taken first → handle_irq acknowledged {in_gerror:#x} (EVENTQ_ABT_ERR), {count} records; GERROR == GERRORN == {gn:#x}"
    );

    // The queue works again: one fault, one record, through the eventq IRQ.
    let eventq_before = shared(|s| s.seen.eventq_irqs)?;
    edu.dma_to_ram(hole, 0, 4).or_fail("single fault")?;
    wait_for("a fault after the overflow", |s| s.event_count >= 129)?;
    let (count, eventq_irqs, overflows) = shared(|s| {
        (
            s.seen.event_count,
            s.seen.eventq_irqs,
            s.smmu.stats().event_overflows,
        )
    })?;
    check_eq!(count, 129, "records after one more fault");
    check!(
        eventq_irqs > eventq_before,
        "the fault after the overflow came without an event-queue IRQ"
    );
    check_eq!(overflows, 1, "overflows after one more fault");
    finish(ctx, dom, tx)
}
