//! Host tests of interrupt remapping against the fake unit (`fakehw`):
//! the enable sequence, every descriptor through the strict checker, every
//! entry through the IRTE checker as the (non-coherent) unit sees it, and
//! break-before-make when an entry changes owner.

extern crate std;

use std::vec::Vec;

use super::fakehw::{Ev, FakeVtd, QEMU_CAP, QEMU_ECAP, SharedMem};
use super::*;
use crate::device::DeviceId;
use crate::testing::vtd_desc::{VtdDesc, check_irte};
use crate::testing::vtd_ir::{IrOutcome, IrUnitState, remap_msi};

const SIRTP: u32 = 1 << 24;
const IRE: u32 = 1 << 25;
const CFI: u32 = 1 << 23;
const QIE: u32 = 1 << 26;
const TE: u32 = 1 << 31;
const ECAP_EIM: u64 = 1 << 4;
const ECAP_IR: u64 = 1 << 3;

fn started(ecap: u64, use_qi: bool) -> (FakeVtd, Vtd<SharedMem>) {
    let fake = FakeVtd::start(QEMU_CAP, ecap, SharedMem::new(256, true));
    // SAFETY: the fake's block outlives the driver (dropped after it).
    let mut v = unsafe { Vtd::new(fake.regs.base(), fake.regs.len(), fake.mem.clone()) }.unwrap();
    v.init(VtdConfig {
        poll_budget: 500_000_000,
        use_qi,
        ..VtdConfig::default()
    })
    .unwrap();
    fake.clear();
    (fake, v)
}

fn dev(n: u8) -> DeviceId {
    DeviceId::new(0, 0, n, 0).unwrap()
}

fn gcmds(fake: &FakeVtd) -> Vec<u32> {
    fake.log()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Gcmd(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn seen(fake: &FakeVtd) -> Vec<(u16, [u64; 2])> {
    fake.log()
        .into_iter()
        .filter_map(|e| match e {
            Ev::IrteSeen(i, raw) => Some((i, raw)),
            _ => None,
        })
        .collect()
}

#[test]
fn strict_vtd_ir_enable_sets_table_then_invalidates_then_cfi_then_ire() {
    let (fake, mut v) = started(QEMU_ECAP, true);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    // IRTA: a page-aligned table, S = 7 (256 entries), EIME clear.
    let irta = fake.regs.u64(0xb8);
    assert_eq!(irta & 0xfff, 7);
    assert_ne!(irta & !0xfff, 0);
    // SIRTP (repeating TE and QIE); CFI already clear as wanted, so IRE.
    assert_eq!(
        gcmds(&fake),
        [TE | QIE | SIRTP, TE | QIE | IRE],
        "GCMD writes"
    );
    // The global IEC (and its wait) came between SIRTP and IRE.
    let log = fake.log();
    let pos = |f: &dyn Fn(&Ev) -> bool| log.iter().position(f).unwrap();
    let sirtp = pos(&|e| *e == Ev::Gcmd(TE | QIE | SIRTP));
    let iec = pos(&|e| matches!(e, Ev::Desc(VtdDesc::Iec { global: true, .. })));
    let ire = pos(&|e| *e == Ev::Gcmd(TE | QIE | IRE));
    assert!(sirtp < iec && iec < ire, "{log:?}");
    assert!(fake.refused().is_empty(), "{:?}", fake.refused());
    assert_eq!(fake.regs.u32(0x1c) & (IRE | CFI), IRE);
    // The zeroed table reached the unit's view of memory.
    assert!(fake.mem.device_sees_cpu(irta & !0xfff, 4096));
}

#[test]
fn strict_vtd_ir_x2apic_sets_eime_and_compat_format_sets_cfi() {
    let (fake, mut v) = started(QEMU_ECAP | ECAP_EIM, true);
    let cfg = IrConfig {
        entries: 1 << 12,
        x2apic: true,
        compat_format: true,
    };
    v.enable_interrupt_remapping(cfg).unwrap();
    // S = 11, EIME bit 11; 16 pages of table.
    assert_eq!(fake.regs.u64(0xb8) & 0xfff, 0x800 | 11);
    assert_eq!(gcmds(&fake)[1..], [TE | QIE | CFI, TE | QIE | CFI | IRE]);
    // Later GCMD writes repeat CFI.
    v.disable_interrupt_remapping().unwrap();
    assert_eq!(*gcmds(&fake).last().unwrap(), TE | QIE | CFI);
    // Left on (by firmware, or an earlier run) and not wanted: CFI is
    // cleared before IRE is set.
    fake.clear();
    v.enable_interrupt_remapping(IrConfig {
        compat_format: false,
        ..cfg
    })
    .unwrap();
    assert_eq!(gcmds(&fake)[1..], [TE | QIE, TE | QIE | IRE]);
    v.disable_interrupt_remapping().unwrap();
    // x2APIC entries carry 32-bit destinations.
    v.enable_interrupt_remapping(cfg).unwrap();
    let h = v
        .alloc_irte(dev(3), &IrteTarget::fixed(0x40, 0x1_0000))
        .unwrap();
    let e = v.read_irte(h.index()).unwrap();
    assert_eq!(e.destination(true), 0x1_0000);
    assert_eq!(check_irte(e.raw(), true), Ok(()));
}

#[test]
fn strict_vtd_ir_refuses_without_queue_and_unsupported_modes() {
    let (fake, mut v) = started(QEMU_ECAP, false);
    assert_eq!(
        v.enable_interrupt_remapping(IrConfig::default()),
        Err(IrError::NeedsQueuedInvalidation)
    );
    assert!(gcmds(&fake).is_empty(), "nothing written when refused");
    assert_eq!(
        v.enable_interrupt_remapping(IrConfig {
            x2apic: true,
            ..IrConfig::default()
        }),
        Err(IrError::NoExtendedInterruptMode)
    );
    for entries in [0, 1, 3, 1 << 17] {
        assert_eq!(
            v.enable_interrupt_remapping(IrConfig {
                entries,
                ..IrConfig::default()
            }),
            Err(IrError::TableSize { entries })
        );
    }
    assert_eq!(
        v.alloc_irte(dev(3), &IrteTarget::fixed(0x40, 0)),
        Err(IrError::NotEnabled)
    );
    // With the queue on it works, and the queue cannot go off under it.
    v.set_queued_invalidation(true).unwrap();
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    assert!(v.set_queued_invalidation(false).is_err());
    assert!(v.uses_queued_invalidation());
    assert_eq!(
        v.enable_interrupt_remapping(IrConfig::default()),
        Err(IrError::AlreadyEnabled)
    );

    let (_f, mut no_ir) = started(QEMU_ECAP & !ECAP_IR, true);
    assert_eq!(
        no_ir.enable_interrupt_remapping(IrConfig::default()),
        Err(IrError::NotSupported)
    );
}

#[test]
fn strict_vtd_ir_alloc_writes_a_checked_entry_and_invalidates_its_index() {
    let (fake, mut v) = started(QEMU_ECAP, true);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    fake.clear();
    let a = v.alloc_irte(dev(3), &IrteTarget::fixed(0x40, 1)).unwrap();
    let b = v.alloc_irte(dev(4), &IrteTarget::fixed(0x41, 0)).unwrap();
    assert_ne!(a.index(), b.index());
    // The unit re-read each entry after it was complete and cleaned: the
    // hand-worked value of ir_entry's test plus the allocated mark (AVL).
    let s = seen(&fake);
    assert_eq!(s.len(), 2);
    assert_eq!(
        s[0],
        (
            a.index(),
            [0x0000_0100_0040_0001 | Irte::ALLOCATED, 0x4_0018]
        )
    );
    assert_eq!(s[1].1[1], 0x4_0020);
    for (_, raw) in &s {
        assert_eq!(check_irte(*raw, false), Ok(()));
    }
    // Each allocation: one index-selective IEC and one wait.
    let descs = fake.descs();
    assert_eq!(descs.len(), 4, "{descs:?}");
    assert!(matches!(descs[1], VtdDesc::Wait { .. }));
    assert!(fake.refused().is_empty());
    assert_eq!(a.msi(), MsiMessage::remappable(a.index()));
    // xAPIC tables refuse 32-bit destinations; bad vectors are refused.
    assert_eq!(
        v.alloc_irte(dev(3), &IrteTarget::fixed(0x40, 0x100)),
        Err(IrError::Destination {
            destination: 0x100,
            x2apic: false
        })
    );
    assert_eq!(
        v.alloc_irte(
            DeviceId::new(1, 0, 3, 0).unwrap(),
            &IrteTarget::fixed(0x40, 0)
        ),
        Err(IrError::WrongSegment(DeviceId::new(1, 0, 3, 0).unwrap()))
    );
}

#[test]
fn strict_vtd_ir_retarget_is_one_store_and_owner_change_is_break_before_make() {
    let (fake, mut v) = started(QEMU_ECAP, true);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    let h = v.alloc_irte(dev(3), &IrteTarget::fixed(0x40, 0)).unwrap();
    fake.clear();
    v.retarget_irte(&h, &IrteTarget::fixed(0x41, 2)).unwrap();
    let s = seen(&fake);
    assert_eq!(s.len(), 1, "a retarget needs one invalidation: {s:?}");
    let e = Irte::from_raw(s[0].1);
    assert!(e.present());
    assert_eq!((e.vector(), e.destination(false)), (0x41, 2));
    assert_eq!(e.source_id(), 0x18, "source validation kept");

    fake.clear();
    v.update_irte(
        &h,
        SourceValidation::exact(dev(4).rid()),
        &IrteTarget::fixed(0x42, 0),
    )
    .unwrap();
    let s = seen(&fake);
    assert_eq!(s.len(), 2, "owner change: not-present, then new: {s:?}");
    let first = Irte::from_raw(s[0].1);
    assert!(
        !first.present(),
        "the old entry was not made not-present first"
    );
    assert_eq!(first.source_id(), 0x18);
    let second = Irte::from_raw(s[1].1);
    assert!(second.present());
    assert_eq!((second.vector(), second.source_id()), (0x42, 0x20));
    assert!(fake.refused().is_empty());
}

#[test]
fn strict_vtd_ir_free_blocks_then_reuses_and_full_table_is_an_error() {
    let (fake, mut v) = started(QEMU_ECAP, true);
    v.enable_interrupt_remapping(IrConfig {
        entries: 2,
        ..IrConfig::default()
    })
    .unwrap();
    let t = IrteTarget::fixed(0x40, 0);
    let a = v.alloc_irte(dev(3), &t).unwrap();
    let b = v.alloc_irte(dev(3), &t).unwrap();
    assert_eq!(
        v.alloc_irte(dev(3), &t),
        Err(IrError::TableFull { entries: 2 })
    );
    let ia = a.index();
    fake.clear();
    v.free_irte(a).unwrap();
    // The unit saw the entry not present before it became reusable.
    let s = seen(&fake);
    assert_eq!(s.len(), 1);
    assert!(!Irte::from_raw(s[0].1).present());
    assert_eq!(v.read_irte(ia), Some(Irte::EMPTY));
    let c = v.alloc_irte(dev(4), &t).unwrap();
    assert_eq!(c.index(), ia);
    // A handle of another table size / unallocated index is refused.
    v.free_irte(c).unwrap();
    assert_eq!(
        v.retarget_irte(&IrHandle::for_test(ia), &t),
        Err(IrError::NotAllocated { index: ia })
    );
    v.free_irte(b).unwrap();
    assert_eq!(
        v.invalidate_interrupt_entries(IecGranularity::Index { index: 1, im: 1 }),
        Err(IrError::NotAllocated { index: 1 })
    );
    v.invalidate_interrupt_entries(IecGranularity::Global)
        .unwrap();
    v.disable_interrupt_remapping().unwrap();
    assert_eq!(fake.regs.u32(0x1c) & IRE, 0);
    assert!(fake.refused().is_empty());
}

#[test]
fn strict_vtd_ir_reinit_turns_remapping_off_first() {
    let (fake, mut v) = started(QEMU_ECAP, true);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    fake.clear();
    v.init(VtdConfig {
        poll_budget: 500_000_000,
        ..VtdConfig::default()
    })
    .unwrap();
    // TE off, then IRE off (before QIE goes off), QIE off, ...
    let g = gcmds(&fake);
    assert_eq!(g[..3], [QIE | IRE, QIE, 0], "{g:x?}");
    assert!(!v.interrupt_remapping_enabled());
}

/// The strict model's answer for an MSI from `sid`, reading the unit's
/// registers and the table as the (non-coherent) unit sees it.
fn model(fake: &FakeVtd, msg: MsiMessage, sid: u16) -> IrOutcome {
    let irta = fake.regs.u64(0xb8);
    let s = IrUnitState::from_regs(fake.regs.u32(0x1c), irta);
    let base = irta & !0xfff;
    remap_msi(&s, msg.address, msg.data, sid, |i| {
        let pa = base + u64::from(i) * 16;
        [fake.mem.dev_u64(pa, false), fake.mem.dev_u64(pa + 8, false)]
    })
}

#[test]
fn strict_vtd_ir_model_blocks_compat_format_while_cfi_is_off() {
    let compat = MsiMessage {
        address: 0xfee0_1000,
        data: 0x40,
    };
    let (fake, mut v) = started(QEMU_ECAP | ECAP_EIM, true);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    assert_eq!(model(&fake, compat, 0x18), IrOutcome::Blocked(0x25));
    // Only when asked for do compatibility-format interrupts pass.
    v.disable_interrupt_remapping().unwrap();
    let cfi = IrConfig {
        compat_format: true,
        ..IrConfig::default()
    };
    v.enable_interrupt_remapping(cfi).unwrap();
    assert_eq!(model(&fake, compat, 0x18), IrOutcome::Unremapped);
    // Extended interrupt mode blocks them even with CFI.
    v.disable_interrupt_remapping().unwrap();
    v.enable_interrupt_remapping(IrConfig {
        x2apic: true,
        ..cfi
    })
    .unwrap();
    assert_eq!(model(&fake, compat, 0x18), IrOutcome::Blocked(0x25));
}

#[test]
fn strict_vtd_ir_model_delivers_only_the_owner_to_the_chosen_target() {
    let (fake, mut v) = started(QEMU_ECAP, true);
    v.enable_interrupt_remapping(IrConfig::default()).unwrap();
    let h = v.alloc_irte(dev(3), &IrteTarget::fixed(0x42, 7)).unwrap();
    let want = IrOutcome::Remapped {
        index: h.index(),
        vector: 0x42,
        destination: 7,
    };
    assert_eq!(model(&fake, h.msi(), dev(3).rid()), want);
    assert_eq!(
        model(&fake, h.msi(), dev(4).rid()),
        IrOutcome::Blocked(0x26)
    );
    v.retarget_irte(&h, &IrteTarget::fixed(0x43, 2)).unwrap();
    assert!(matches!(
        model(&fake, h.msi(), dev(3).rid()),
        IrOutcome::Remapped {
            vector: 0x43,
            destination: 2,
            ..
        }
    ));
    let msg = h.msi();
    v.free_irte(h).unwrap();
    assert_eq!(model(&fake, msg, dev(3).rid()), IrOutcome::Blocked(0x22));
}
