//! Every page lent to the unit goes back to the lender unless the unit may
//! still read it (issue 15): GCMD handshakes that time out, against the
//! fake unit (`fakehw`) made deaf or late for one command, with a lender
//! that counts the pages it has out.

use super::fakehw::{FakeVtd, QEMU_CAP, QEMU_ECAP, SharedMem};
use super::*;
use crate::error::BackendError;
use crate::mem::TableMemory;

const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;
const IRE: u32 = 1 << 25;
const SIRTP: u32 = 1 << 24;

/// Long enough for the fake's thread on a loaded machine, short enough for
/// the waits that must time out.
fn cfg(use_qi: bool) -> VtdConfig {
    VtdConfig {
        poll_budget: 50_000_000,
        use_qi,
        ..VtdConfig::default()
    }
}

fn unit() -> (FakeVtd, Vtd<SharedMem>) {
    let fake = FakeVtd::start(QEMU_CAP, QEMU_ECAP, SharedMem::new(64, true));
    // SAFETY: the fake's block lives as long as `fake`, which the tests keep
    // alive longer than the driver.
    let v = unsafe { Vtd::new(fake.regs.base(), fake.regs.len(), fake.mem.clone()) }.unwrap();
    (fake, v)
}

fn timed_out(e: BackendError, what: &str) -> bool {
    matches!(e, BackendError::Timeout { what: w, .. } if w == what)
}

#[test]
fn leak_root_table_whose_srtp_times_out_goes_back() {
    let (fake, mut v) = unit();
    fake.set_deaf(SRTP);
    let e = v.init(cfg(true)).unwrap_err();
    assert!(timed_out(e.into(), "VT-d GSTS.RTPS"), "{e:?}");
    assert_eq!(
        fake.mem.lent_pages(),
        0,
        "translation is off: nothing walks it"
    );
    // The unit answers again: a fresh init works and lends root + queue.
    fake.set_deaf(0);
    v.init(cfg(true)).unwrap();
    assert_eq!(fake.mem.lent_pages(), 3);
}

#[test]
fn leak_queue_whose_qie_times_out_goes_back_once_qies_reads_clear() {
    let (fake, mut v) = unit();
    v.init(cfg(false)).unwrap();
    let before = fake.mem.lent_pages();
    fake.set_deaf(QIE);
    let e = v.set_queued_invalidation(true).unwrap_err();
    assert!(timed_out(e, "VT-d GSTS.QIES set"), "{e:?}");
    assert_eq!(
        fake.mem.lent_pages(),
        before,
        "QIES never set: queue unused"
    );
    fake.set_deaf(0);
    v.set_queued_invalidation(true).unwrap();
    assert_eq!(fake.mem.lent_pages(), before + 2);
}

/// A unit that took the QIE the driver gave up on and now will not let go:
/// GSTS.QIES reads set while the driver asks for it clear. The fake cannot
/// switch QIES on between the driver's last poll and its next write, so
/// the test puts the queue where the timed-out switch-on leaves it.
#[test]
fn leak_queue_acknowledged_late_stays_lent_until_disable_sees_qies_clear() {
    let (fake, mut v) = unit();
    v.init(cfg(false)).unwrap();
    let before = fake.mem.lent_pages();
    fake.set_deaf(QIE);
    fake.regs.set_u32(0x1c, fake.regs.u32(0x1c) | QIE);
    let q = qi::InvQueue::new(&fake.mem, 10, false, false).unwrap();
    v.abandon_queue(q);
    assert_eq!(fake.mem.lent_pages(), before + 2, "kept while QIES is set");
    // The switch-on refuses while the unit holds on to the stray queue.
    let e = v.set_queued_invalidation(true).unwrap_err();
    assert!(timed_out(e, "VT-d GSTS.QIES clear"), "{e:?}");
    assert_eq!(fake.mem.lent_pages(), before + 2);
    fake.set_deaf(0);
    v.disable().unwrap();
    assert_eq!(v.global_status() & QIE, 0);
    assert_eq!(fake.mem.lent_pages(), before);
}

#[test]
fn leak_interrupt_table_whose_sirtp_times_out_goes_back() {
    let (fake, mut v) = unit();
    v.init(cfg(true)).unwrap();
    let before = fake.mem.lent_pages();
    fake.set_deaf(SIRTP);
    let e = v
        .enable_interrupt_remapping(IrConfig::default())
        .unwrap_err();
    assert_eq!(
        e,
        IrError::Backend(BackendError::Timeout {
            what: "VT-d GSTS.IRTPS",
            polls: 50_000_000
        })
    );
    assert_eq!(
        fake.mem.lent_pages(),
        before,
        "IRE is off: nothing reads it"
    );
    fake.set_deaf(0);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    assert_eq!(fake.mem.lent_pages(), before + 1);
}

#[test]
fn leak_interrupt_table_whose_ire_never_shows_goes_back() {
    let (fake, mut v) = unit();
    v.init(cfg(true)).unwrap();
    let before = fake.mem.lent_pages();
    fake.set_deaf(IRE);
    let e = v
        .enable_interrupt_remapping(IrConfig::default())
        .unwrap_err();
    assert!(matches!(e, IrError::Backend(b) if timed_out(b, "VT-d GSTS.IRES set")));
    assert_eq!(fake.mem.lent_pages(), before);
    assert!(!v.interrupt_remapping_enabled());
}

/// As for the queue: IRES reads set (the unit took the IRE the driver gave
/// up on) while the driver asks for it clear.
#[test]
fn leak_interrupt_table_acknowledged_late_stays_lent_until_disable() {
    let (fake, mut v) = unit();
    v.init(cfg(true)).unwrap();
    let before = fake.mem.lent_pages();
    fake.set_deaf(IRE);
    fake.regs.set_u32(0x1c, fake.regs.u32(0x1c) | IRE);
    let t = fake.mem.alloc_zeroed(1).unwrap();
    v.abandon_ir_table(t, 1);
    assert_eq!(fake.mem.lent_pages(), before + 1, "kept while IRES is set");
    fake.set_deaf(0);
    v.disable().unwrap();
    assert_eq!(v.global_status() & IRE, 0);
    // The queue is parked (kept for reuse), the table back.
    assert_eq!(fake.mem.lent_pages(), before);
}

#[test]
fn leak_reinit_gives_back_queue_and_interrupt_table() {
    let (fake, mut v) = unit();
    v.init(cfg(true)).unwrap();
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    assert_eq!(fake.mem.lent_pages(), 4, "root, queue + status, IR table");
    v.init(cfg(true)).unwrap();
    // Queue and IR table went back once QIES / IRES read clear; the old
    // root stays lent (documented), next to the new root and queue.
    assert_eq!(fake.mem.lent_pages(), 4);
    v.set_queued_invalidation(false).unwrap();
    v.init(cfg(true)).unwrap();
    // The parked queue went back too.
    assert_eq!(fake.mem.lent_pages(), 5);
}
