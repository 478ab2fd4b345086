//! Issue 13 item 3: nested translation against the fake SMMU and the strict
//! model (STE fields, the guest CD, the commands of each stage's
//! invalidation and their order).

use super::*;
use crate::smmuv3::nested::GuestCdTable;
use crate::smmuv3::ste::CdTableFormat;
use crate::testing::smmu_cmd::check_nested_stage2_flush;

const SID: u32 = 0x28;
/// The guest's CD table, at an IPA no lent block covers (the fake must not
/// read it as a host address).
const CD_IPA: u64 = 0x7_0000_1000;

const S1P: u32 = 1 << 1;
const S2P: u32 = 1 << 0;

fn sync() -> [u64; 2] {
    Command::sync().0
}

#[test]
fn strict_smmu_nested_ste_points_at_the_guest_cd_table_by_ipa_on_the_stage2_domain() {
    let (regs, fake, mut s) = started(small_budget());
    fake.clear();
    s.attach_nested(SID, &s2_domain(7), &GuestCdTable::single(CD_IPA))
        .unwrap();
    // Installed like any STE: entry, then CFGI_STE + CFGI_CD_ALL + CMD_SYNC.
    assert_eq!(
        fake.commands(),
        [
            Command::cfgi_ste(SID, true).0,
            Command::cfgi_cd_all(SID).0,
            sync()
        ]
    );
    let seen = fake.last_ste(SID).unwrap();
    let ste = seen.ste.unwrap();
    // V, Config 0b111, S1ContextPtr = the IPA, S1Fmt = S1CDMax = 0.
    assert_eq!(ste[0], CD_IPA | 0b1111);
    // Stage-2 half as for the stage-2 domain alone.
    let alone = Ste::stage2(&s.stage2_config(&s2_domain(7)).unwrap());
    assert_eq!((ste[2], ste[3]), (alone.0[2], alone.0[3]));
    assert_eq!(ste[2] & 0xffff, 7);
    // CD fetch attributes as a stage-1 entry's, SHCFG incoming, no EATS.
    assert_eq!(ste[1], Ste::stage1(PhysAddr(0), 0).0[1] | 1 << 44);
    assert!(s.is_nested_vmid(7));
    // The guest's CD passes the strict model too.
    let cd = s
        .guest_context_descriptor(&s2_domain(7), 3, 0x7_0000_2000, 3)
        .unwrap();
    check_cd(&regs.caps(), regs.get(CR1), &cd.0).unwrap();
    assert_eq!(cd.asid(), 3);
    assert_eq!(cd.0[1], 0x7_0000_2000);
    // IPS: the stage-2 input range is 39 bits -> 40 bits (encoding 2).
    assert_eq!(cd.0[0] >> 32 & 7, 2);
    // Detach: abort, the guest's CDs invalidated, the VMID no longer nested.
    fake.clear();
    s.detach(DeviceId::new(0, 0, 5, 0).unwrap()).unwrap();
    assert_eq!(
        fake.commands(),
        [
            Command::cfgi_ste(SID, true).0,
            Command::cfgi_cd_all(SID).0,
            sync()
        ]
    );
    assert!(!s.is_nested_vmid(7));
    s.shutdown().unwrap();
}

#[test]
fn strict_smmu_nested_needs_both_stages_and_checks_its_parameters() {
    for idr0 in [IDR0_NESTED & !S2P, IDR0_NESTED & !S1P] {
        let (_regs, _fake, mut s) = started_on(
            Regs::with_idr(idr0, IDR1),
            HostMem::default(),
            small_budget(),
        );
        assert!(!s.supports_nested());
        assert!(matches!(
            s.attach_nested(SID, &s2_domain(7), &GuestCdTable::single(CD_IPA)),
            Err(SmmuError::Unsupported(_))
        ));
        assert!(matches!(
            s.guest_context_descriptor(&s2_domain(7), 1, 0x1000, 3),
            Err(SmmuError::Unsupported(_))
        ));
        assert!(matches!(
            s.invalidate_guest_va(7, 1, DmaAddr(0x1000), PAGE_SIZE, true),
            Err(SmmuError::Unsupported(_))
        ));
        assert!(matches!(
            s.invalidate_guest_cds(SID),
            Err(SmmuError::Unsupported(_))
        ));
        s.shutdown().unwrap();
    }
    let (_regs, fake, mut s) = started(small_budget());
    fake.clear();
    let bad = |s: &mut Smmu<HostMem>, parent: DomainInfo, cds: GuestCdTable| {
        matches!(
            s.attach_nested(SID, &parent, &cds),
            Err(SmmuError::BadDomain { .. })
        )
    };
    // A stage-1 parent; VMID 0 (the host's own stage-1 tag).
    assert!(bad(&mut s, s1_domain(7), GuestCdTable::single(CD_IPA)));
    assert!(bad(&mut s, s2_domain(0), GuestCdTable::single(CD_IPA)));
    // Misaligned, or beyond the 39-bit stage-2 input range.
    assert!(bad(&mut s, s2_domain(7), GuestCdTable::single(CD_IPA + 8)));
    assert!(bad(&mut s, s2_domain(7), GuestCdTable::single(1 << 39)));
    // Two CDs on an SMMU without SubstreamIDs; a two-level table of one.
    let two = GuestCdTable {
        cd_max: 1,
        ..GuestCdTable::single(CD_IPA)
    };
    assert!(bad(&mut s, s2_domain(7), two));
    let l2 = GuestCdTable {
        fmt: CdTableFormat::TwoLevel4K,
        ..GuestCdTable::single(CD_IPA)
    };
    assert!(bad(&mut s, s2_domain(7), l2));
    // A StreamID beyond the stream table: refused, and VMID 7 is not left
    // counted as nested.
    assert!(matches!(
        s.attach_nested(1 << 20, &s2_domain(7), &GuestCdTable::single(CD_IPA)),
        Err(SmmuError::StreamIdOutOfRange { .. })
    ));
    assert!(!s.is_nested_vmid(7));
    // Nothing was written for any of them.
    assert!(fake.commands().is_empty());
    for (asid, ttb, levels) in [
        (1, 0x1008, 3),  // TTB0 not 4 KiB aligned
        (1, 1 << 39, 3), // beyond stage 2's input
        (1, 0x1000, 5),  // levels
    ] {
        assert!(matches!(
            s.guest_context_descriptor(&s2_domain(7), asid, ttb, levels),
            Err(SmmuError::BadDomain { .. })
        ));
    }
    s.shutdown().unwrap();
}

#[test]
fn strict_smmu_stage2_change_of_a_nested_vmid_flushes_stage1_after_its_sync() {
    let (regs, fake, mut s) = started(small_budget());
    let caps = regs.caps();
    s.attach_nested(SID, &s2_domain(7), &GuestCdTable::single(CD_IPA))
        .unwrap();
    fake.clear();
    s.invalidate(&s2_domain(7), DmaAddr(0x4000_0000), PAGE_SIZE, true)
        .unwrap();
    IommuBackend::sync(&mut s).unwrap();
    // Linux arm_smmu_tlb_inv_range_domain for a nesting parent: the IPA
    // invalidation completes, then every stage-1 (combined) entry of the
    // VMID goes, and that completes too.
    assert_eq!(
        fake.commands(),
        [
            Command::tlbi_s2_ipa(7, 0x4000_0000, true, None).0,
            sync(),
            Command::tlbi_nh_all(7).0,
            sync()
        ]
    );
    check_nested_stage2_flush(&caps, &fake.commands(), &[7]).unwrap();
    // A stage-2 domain no nested stream uses: the IPA invalidation alone.
    fake.clear();
    s.invalidate(&s2_domain(8), DmaAddr(0x4000_0000), PAGE_SIZE, true)
        .unwrap();
    IommuBackend::sync(&mut s).unwrap();
    assert_eq!(
        fake.commands(),
        [Command::tlbi_s2_ipa(8, 0x4000_0000, true, None).0, sync()]
    );
    // The whole VMID (S12_VMALL) covers both stages: no extra flush.
    fake.clear();
    s.invalidate_domain(&s2_domain(7)).unwrap();
    IommuBackend::sync(&mut s).unwrap();
    assert_eq!(fake.commands(), [Command::tlbi_s12_vmall(7).0, sync()]);
    // Once the stream leaves nesting, VMID 7 is an ordinary stage 2.
    s.detach(DeviceId::new(0, 0, 5, 0).unwrap()).unwrap();
    fake.clear();
    s.invalidate(&s2_domain(7), DmaAddr(0x4000_0000), PAGE_SIZE, true)
        .unwrap();
    IommuBackend::sync(&mut s).unwrap();
    assert_eq!(fake.opcodes(), [0x2a, 0x46]);
    s.shutdown().unwrap();
}

#[test]
fn strict_smmu_model_refuses_a_nested_stage2_change_without_its_stage1_flush() {
    let caps = SmmuCaps::from_features(&smmu(&Regs::new()).features);
    let s2 = Command::tlbi_s2_ipa(7, 0x4000_0000, true, None).0;
    let nh = Command::tlbi_nh_all(7).0;
    // No flush; the flush before the IPA invalidation completed; no final sync.
    for cmds in [
        std::vec![s2, sync()],
        std::vec![s2, nh, sync()],
        std::vec![s2, sync(), nh],
        std::vec![s2, sync(), Command::tlbi_nh_all(8).0, sync()],
    ] {
        assert!(
            check_nested_stage2_flush(&caps, &cmds, &[7]).is_err(),
            "{cmds:#x?}"
        );
    }
    check_nested_stage2_flush(&caps, &[s2, sync(), nh, sync()], &[7]).unwrap();
    check_nested_stage2_flush(&caps, &[s2, Command::tlbi_s12_vmall(7).0, sync()], &[7]).unwrap();
    // A VMID that is not nested needs nothing more.
    check_nested_stage2_flush(&caps, &[s2, sync()], &[8]).unwrap();
    // NH_ALL's VMID is checked like any VMID.
    let small = SmmuCaps {
        vmid16: false,
        ..caps
    };
    assert!(check_command(&small, Command::tlbi_nh_all(0x100).0).is_err());
}

#[test]
fn strict_smmu_guest_stage1_invalidations_carry_the_guest_vmid() {
    let (regs, fake, mut s) = started(small_budget());
    let caps = regs.caps();
    s.attach_nested(SID, &s2_domain(7), &GuestCdTable::single(CD_IPA))
        .unwrap();
    fake.clear();
    s.invalidate_guest_va(7, 3, DmaAddr(0x10_0000), PAGE_SIZE, true)
        .unwrap();
    s.invalidate_guest_va(7, 3, DmaAddr(0x20_0000), 4 * PAGE_SIZE, false)
        .unwrap();
    s.invalidate_guest_asid(7, 3).unwrap();
    s.invalidate_guest_cd(SID, 0).unwrap();
    s.invalidate_guest_cds(SID).unwrap();
    assert!(fake.commands().is_empty(), "queued, not yet published");
    s.sync_commands().unwrap();
    let cmds = fake.commands();
    assert_eq!(
        cmds,
        [
            Command::tlbi_nh_va(7, 3, 0x10_0000, true, None).0,
            Command::tlbi_nh_va(7, 3, 0x20_0000, false, Some(TlbiRange { num: 0, scale: 2 })).0,
            Command::tlbi_nh_asid(7, 3).0,
            Command::cfgi_cd(SID, 0, true).0,
            Command::cfgi_cd_all(SID).0,
            sync()
        ]
    );
    for c in &cmds[..3] {
        match check_command(&caps, *c).unwrap() {
            Decoded::TlbiAddr { vmid, asid, .. } => assert_eq!((vmid, asid), (7, Some(3))),
            Decoded::TlbiNhAsid { vmid, asid } => assert_eq!((vmid, asid), (7, 3)),
            other => panic!("{other:?}"),
        }
    }
    // A guest stage-1 change needs no stage-2 invalidation or extra sync.
    assert_eq!(cmds.iter().filter(|c| c[0] as u8 == 0x46).count(), 1);
    // An SSID the SMMU does not have.
    assert!(matches!(
        s.invalidate_guest_cd(SID, 1),
        Err(SmmuError::BadDomain { .. })
    ));
    s.shutdown().unwrap();
}

#[test]
fn strict_smmu_nested_entries_never_hand_the_guest_ipa_to_the_lender() {
    let (_regs, _fake, mut s) = started(small_budget());
    let dev = DeviceId::new(0, 0, 5, 0).unwrap();
    // The level-2 stream table array for the SID is lent on first use.
    s.attach(dev, Attachment::Bypass).unwrap();
    let base = s.memory().live.load(Ordering::SeqCst);
    // Stage 1 (a CD page lent) -> nested: the CD page goes back.
    s.attach(dev, Attachment::Translated(s1_domain(5))).unwrap();
    assert_eq!(s.memory().live.load(Ordering::SeqCst), base + 1);
    s.attach_nested(SID, &s2_domain(7), &GuestCdTable::single(CD_IPA))
        .unwrap();
    assert_eq!(s.memory().live.load(Ordering::SeqCst), base);
    // Nested -> stage 1 -> nested, and shutdown with a nested entry live:
    // the guest's IPA is never freed as if the driver had lent it (HostMem
    // panics on a block it did not lend).
    s.attach(dev, Attachment::Translated(s1_domain(5))).unwrap();
    s.attach_nested(SID, &s2_domain(7), &GuestCdTable::single(CD_IPA))
        .unwrap();
    assert!(s.is_nested_vmid(7));
    s.shutdown().unwrap();
    assert_eq!(s.memory().live.load(Ordering::SeqCst), 0);
}
