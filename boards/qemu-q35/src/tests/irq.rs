//! The VT-d fault event as a hypervisor takes it: an MSI to a local APIC
//! vector, whose handler drains the fault records with `Vtd::handle_irq`.
//!
//! The unit moves into [`IRQ_UNIT`] for the test: the handler takes that lock
//! (interrupts are off inside a handler), the test takes it only with
//! interrupts disabled ([`irq::without_interrupts`]), and interrupts are on
//! only inside [`irq::wait_until`], so the two never contend. The VT-d fault
//! event MSI is not subject to interrupt remapping (VT-d 5.1.6; QEMU's
//! `vtd_generate_interrupt` sends FEADDR/FEDATA straight to the APIC), so
//! the compatibility-format address 0xfee0_0000 | APIC ID << 12 with data =
//! vector is what arrives.

use super::vtd::{
    APERTURE_A, BoardFormat, Dom, PAGE_U32, Unit, alloc_tx, attached_domain, check_record,
    end_domain, first_level, free_pages, with_unit_owned,
};
use crate::harness::{Ctx, Fail, OrFail};
use crate::irq::{self, DEVICE_VECTOR};
use bare_iommu::backend::IommuBackend;
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::pgtable::{DmaDirection, MapAttrs};
use bare_iommu::state::IovaState;
use bare_iommu::vtd::{Access, FaultRecord, VtdFirstLevel};
use bare_iommu::{DeviceId, PAGE_SIZE, PhysAddr};
use spin::Mutex;

/// APIC timer periods (~10 ms of virtual time each) to wait for an interrupt.
const WAIT_TICKS: u32 = 200;
/// Periods to wait for an interrupt that must not come.
const QUIET_TICKS: u32 = 5;

/// The unit while the fault interrupt is routed to [`on_fault_irq`].
static IRQ_UNIT: Mutex<Option<Unit>> = Mutex::new(None);
/// What the handler saw.
static SEEN: Mutex<Seen> = Mutex::new(Seen::new());

/// What [`on_fault_irq`] recorded.
struct Seen {
    /// Handler runs.
    irqs: u32,
    /// Records `handle_irq` decoded, in order.
    records: heapless::Vec<FaultRecord, 8>,
    /// `handle_irq` reported a primary fault overflow.
    overflow: bool,
    /// Handler runs that found no unit to service.
    missed: u32,
}

impl Seen {
    const fn new() -> Self {
        Self {
            irqs: 0,
            records: heapless::Vec::new(),
            overflow: false,
            missed: 0,
        }
    }
}

/// The [`DEVICE_VECTOR`] handler: services the unit's fault records.
fn on_fault_irq() {
    let mut recs: heapless::Vec<FaultRecord, 8> = heapless::Vec::new();
    let mut overflow = false;
    // try_lock: interrupts are on only while the test holds neither lock.
    let serviced = IRQ_UNIT
        .try_lock()
        .and_then(|mut g| {
            g.as_mut().map(|v| {
                overflow = v
                    .handle_irq(|r| {
                        let _ = recs.push(r);
                    })
                    .overflow;
            })
        })
        .is_some();
    if let Some(mut s) = SEEN.try_lock() {
        s.irqs += 1;
        s.overflow |= overflow;
        s.missed += u32::from(!serviced);
        for r in recs {
            let _ = s.records.push(r);
        }
    }
}

/// `f` on the unit, with interrupts disabled.
fn unit<R>(f: impl FnOnce(&mut Unit) -> R) -> Result<R, Fail> {
    irq::without_interrupts(|| IRQ_UNIT.lock().as_mut().map(f)).or_fail("unit")
}

fn seen<R>(f: impl FnOnce(&Seen) -> R) -> R {
    irq::without_interrupts(|| f(&SEEN.lock()))
}

/// A write to an unlinked IOVA raises the fault event as an MSI; the
/// handler's `handle_irq` decodes the record (source-id, address, reason),
/// FECTL.IP is clear afterwards, and a second fault (a read) raises a second
/// interrupt: the event re-arms once the record is cleared.
pub fn vtd_fault_msi_delivers_decoded_fault(ctx: &mut Ctx) -> Result<(), Fail> {
    if first_level(ctx) {
        routed(ctx, fault_msi_body::<VtdFirstLevel>)
    } else {
        routed(ctx, fault_msi_body::<VtdSecondLevel>)
    }
}

/// A fault while the event is masked sends nothing and leaves FECTL.IP set;
/// unmasking it sends the pending interrupt (VT-d 7.3.1), which the handler
/// services.
pub fn vtd_fault_pending_while_masked_fires_on_unmask(ctx: &mut Ctx) -> Result<(), Fail> {
    if first_level(ctx) {
        routed(ctx, masked_body::<VtdFirstLevel>)
    } else {
        routed(ctx, masked_body::<VtdSecondLevel>)
    }
}

/// Sets the interrupts up, moves the unit to the handler, runs `body` with
/// the local APIC ID, takes the unit back with the fault event masked again
/// (as the other tests expect it).
fn routed(ctx: &Ctx, body: fn(&Ctx, u32) -> Result<(), Fail>) -> Result<(), Fail> {
    let apic_id = irq::init().or_fail("interrupt setup")?;
    with_unit_owned(ctx, |vtd| {
        irq::without_interrupts(|| {
            *IRQ_UNIT.lock() = Some(vtd);
            *SEEN.lock() = Seen::new();
        });
        irq::set_device_handler(Some(on_fault_irq));
        let r = body(ctx, apic_id);
        irq::set_device_handler(None);
        let mut back = irq::without_interrupts(|| IRQ_UNIT.lock().take());
        if let Some(v) = back.as_mut() {
            v.set_fault_irq_masked(true);
            v.set_fault_msi(0, 0);
        }
        (back, r)
    })
}

/// Checks the interrupt `n` (1-based) delivered exactly one record: from
/// `dev`, at the page of `iova`, for `access`.
fn check_delivered<F: BoardFormat>(
    n: u32,
    dev: DeviceId,
    iova: u64,
    access: Access,
) -> Result<(), Fail> {
    let got = irq::wait_until(WAIT_TICKS, || seen(|s| s.irqs >= n));
    let (irqs, count, missed, overflow, rec) = seen(|s| {
        (
            s.irqs,
            s.records.len(),
            s.missed,
            s.overflow,
            s.records.get(n as usize - 1).copied(),
        )
    });
    check!(
        got,
        "no fault interrupt #{n} within {WAIT_TICKS} timer ticks ({irqs} taken, vector {DEVICE_VECTOR:#x} requested: {})",
        irq::requested(DEVICE_VECTOR)
    );
    check!(irqs == n, "{irqs} fault interrupts, expected {n}");
    check!(missed == 0, "{missed} interrupts found no unit to service");
    check!(
        count == n as usize,
        "{count} records through handle_irq, expected {n}"
    );
    check!(!overflow, "handle_irq reported a primary fault overflow");
    let r = rec.or_fail("record")?;
    narrate!("interrupt {n}: {}", r);
    check_record(&r, dev, iova, &[F::unmapped(access)], access)?;
    let (ip, held) = unit(|v| (v.fault_irq_pending(), v.read_fault(r.index)))?;
    check!(!ip, "FECTL.IP still set after the handler");
    if let Some(h) = held {
        fail!("fault record still held after the handler: {}", h);
    }
    check!(
        !irq::requested(DEVICE_VECTOR),
        "vector {DEVICE_VECTOR:#x} requested again after the handler"
    );
    Ok(())
}

/// A domain for edu 0 with a two-page transaction whose first page is
/// linked: (domain, transaction, page, its IOVA, the unlinked IOVA).
fn half_linked<F: BoardFormat>(ctx: &Ctx) -> Result<(Dom<F>, IovaState, PhysAddr, u64, u64), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = unit(|v| attached_domain::<F>(v, ctx, edu, 1, APERTURE_A))??;
    let pa = ctx.mem.dma_pages(1).or_fail("page")?;
    let mut tx = alloc_tx(&mut dom, 2 * PAGE_SIZE)?;
    let ia = dom
        .link(
            &mut tx,
            pa,
            0,
            PAGE_SIZE,
            DmaDirection::Bidirectional,
            MapAttrs::empty(),
        )
        .or_fail("link")?
        .0;
    // The second page of the range stays unlinked.
    let ib = ia + PAGE_SIZE;
    unit(|v| dom.sync(v))?.or_fail("sync")?;
    Ok((dom, tx, pa, ia, ib))
}

/// Unlinks and frees what [`half_linked`] set up, detaches edu 0.
fn tear_down<F: BoardFormat>(
    ctx: &Ctx,
    mut dom: Dom<F>,
    tx: IovaState,
    pa: PhysAddr,
) -> Result<(), Fail> {
    unit(|v| v.set_fault_irq_masked(true))?;
    unit(|v| dom.destroy(tx, v))?.or_fail("destroy")?;
    unit(|v| v.detach(ctx.edu[0].id))?.or_fail("detach")?;
    unit(|v| end_domain(v, dom))??;
    free_pages(ctx, pa, 1)
}

fn fault_msi_body<F: BoardFormat>(ctx: &Ctx, apic_id: u32) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let (dom, tx, pa, ia, ib) = half_linked::<F>(ctx)?;
    let (addr, data) = irq::msi_for(apic_id, DEVICE_VECTOR);
    narrate!("fault event MSI: FEADDR {addr:#x} FEDATA {data:#x}, unmasked");
    unit(|v| {
        v.set_fault_msi(addr, data);
        v.set_fault_irq_masked(false);
    })?;

    // A DMA to the linked page raises nothing.
    ctx.mem.fill(pa, PAGE_SIZE as usize, 0).or_fail("clear")?;
    edu.dma_to_ram(ia, 0, 64).or_fail("edu -> linked page")?;
    check!(
        !irq::wait_until(QUIET_TICKS, || seen(|s| s.irqs > 0)),
        "fault interrupt after a DMA to a linked page"
    );

    narrate!("edu writes unlinked IOVA {ib:#x}");
    edu.dma_to_ram(ib, 0, PAGE_U32).or_fail("edu -> unlinked")?;
    // Interrupts are still off: the MSI must be waiting in the APIC's IRR.
    check!(
        irq::requested(DEVICE_VECTOR),
        "fault MSI did not reach the local APIC (IRR bit of {DEVICE_VECTOR:#x} clear)"
    );
    check_delivered::<F>(1, edu.id, ib, Access::Write)?;

    narrate!("edu reads unlinked IOVA {:#x}", ib + 0x10);
    edu.dma_from_ram(ib + 0x10, 0, 64)
        .or_fail("unlinked -> edu")?;
    check_delivered::<F>(2, edu.id, ib, Access::Read)?;
    tear_down(ctx, dom, tx, pa)
}

fn masked_body<F: BoardFormat>(ctx: &Ctx, apic_id: u32) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let (dom, tx, pa, _, ib) = half_linked::<F>(ctx)?;
    let (addr, data) = irq::msi_for(apic_id, DEVICE_VECTOR);
    unit(|v| {
        v.set_fault_msi(addr, data);
        v.set_fault_irq_masked(true);
    })?;
    narrate!("edu writes unlinked IOVA {ib:#x} with the fault event masked");
    edu.dma_to_ram(ib, 0, 64).or_fail("edu -> unlinked")?;
    check!(
        unit(|v| v.fault_irq_pending())?,
        "FECTL.IP clear after a masked fault"
    );
    check!(
        !irq::wait_until(QUIET_TICKS, || seen(|s| s.irqs > 0)),
        "fault interrupt while the fault event is masked"
    );
    narrate!("unmask: the pending fault event is sent");
    unit(|v| v.set_fault_irq_masked(false))?;
    check!(
        irq::requested(DEVICE_VECTOR),
        "unmasking a pending fault event sent no MSI (IRR bit of {DEVICE_VECTOR:#x} clear)"
    );
    check_delivered::<F>(1, edu.id, ib, Access::Write)?;
    tear_down(ctx, dom, tx, pa)
}
