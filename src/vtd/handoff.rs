//! DMA protection across a hand-off between two boot stages (issue 12
//! item 5): [`Vtd::hand_off`] leaves the unit translating through an empty
//! root table, so every device is blocked and its DMA recorded as a fault;
//! [`Vtd::adopt`] swaps the next stage's tables in without ever clearing
//! GCMD.TE.
//!
//! The sequence, from the first instruction to the next stage's first
//! translated DMA:
//!
//! 1. First stage, before it lets any device master: `Vtd::new` and
//!    [`Vtd::hand_off`] (or [`Vtd::init`]). Either turns translation on with
//!    a root table that blocks every device. Protected memory regions set
//!    by earlier firmware (PMEN) stay on until translation is on.
//! 2. First stage, done with its devices: detach them, tear its domains
//!    down, turn interrupt remapping off, then [`Vtd::hand_off`]. The unit
//!    keeps translating through an empty root table; queued invalidation is
//!    off and the fault interrupt masked. Pass the returned [`VtdHandoff`] on.
//! 3. Next stage: `Vtd::new` over the same registers and [`Vtd::adopt`]:
//!    its own (empty) root table is latched with TE still set, then the
//!    context cache and IOTLB are invalidated globally. Every device stays
//!    blocked throughout; faults recorded in the window are still in the
//!    fault registers ([`Vtd::poll_faults`]).
//! 4. Once `adopt` returns, [`VtdHandoff::root`] is free memory
//!    again; attach devices as after `init`.
//!
//! To keep some devices translating across the hand-off (identity maps of
//! RMRR regions a device still uses), stage 1 leaves them attached and calls
//! [`Vtd::hand_off_keeping_attached`]; stage 2 calls [`Vtd::adopt_begin`],
//! attaches them to identity domains of its own, then [`Vtd::adopt_finish`].

use tock_registers::interfaces::{Readable, Writeable};

use super::inv::{ContextGranularity, IotlbGranularity, PasidGranularity};
use super::regs::{FECTL, GCMD};
use super::{Start, Vtd, VtdConfig, VtdError};
use crate::addr::PhysAddr;
use crate::backend::IommuBackend;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// What [`Vtd::hand_off`] leaves for the next stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdHandoff {
    /// The root table the unit translates through: after
    /// [`Vtd::hand_off`] a zeroed 4 KiB page (every device blocked); after
    /// [`Vtd::hand_off_keeping_attached`] the stage's own root table. The
    /// unit reads it, and all it points to, until the next stage's
    /// [`Vtd::adopt`] / [`Vtd::adopt_finish`] returns: keep it reserved,
    /// and unchanged, until then.
    pub root: PhysAddr,
    /// Whether it was latched in scalable mode (RTADDR.TTM = 01b): the next
    /// stage's [`VtdConfig::scalable`] must match, since the mode cannot
    /// change while translation is on.
    pub scalable: bool,
}

impl<M: TableMemory> Vtd<M> {
    /// Leaves the unit blocking every device, translation on, for the next
    /// boot stage: a zeroed root table (no root entry present) is latched
    /// with GCMD.SRTP while TE stays set (or TE is set after it when
    /// translation was off, e.g. right after [`Vtd::new`] at the first
    /// instruction), the context cache and IOTLB are invalidated globally
    /// and waited for, then queued invalidation is switched off (its pages
    /// go back) and the fault interrupt masked. A device's DMA from then on
    /// is blocked and recorded in the fault registers (root or context
    /// entry not present; QEMU reports 1h), which the next stage reads after
    /// [`adopt`](Self::adopt).
    ///
    /// The previous root and context tables are no longer walked once this
    /// returns; they stay lent (leaked), as with a second [`init`](Self::init).
    /// Domains attached to this unit should be torn down before (their
    /// devices are blocked after it in any case). The unit then refuses
    /// `attach` until `init` or `adopt`.
    ///
    /// # Errors
    ///
    /// [`VtdError::Backend`] with [`BackendError::Unsupported`] while
    /// interrupt remapping is on (its table would outlive this stage: turn
    /// it off first); [`BackendError::OutOfMemory`] when the lender refuses
    /// the root page; [`BackendError::Timeout`] / [`BackendError::QueueError`]
    /// when a handshake or the invalidation fails. After a failure the unit
    /// may still translate through the old tables: retry, or `init`.
    pub fn hand_off(&mut self) -> Result<VtdHandoff, VtdError> {
        let te = GCMD::TE::SET.value;
        let ire = GCMD::IRE::SET.value;
        if self.ir.is_some() || self.regs().gsts.get() & ire != 0 {
            return Err(BackendError::Unsupported(
                "hand_off with interrupt remapping on: disable it first",
            )
            .into());
        }
        let root = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
        // The empty table is cleaned for a non-coherent unit; `latch_root`
        // orders it before RTADDR and gives it back if the handshake fails
        // with translation off.
        self.clean_table(root, 4096);
        let te_on = self.regs().gsts.get() & te != 0;
        self.latch_root(root, te_on)?;
        // VT-d 11.4.4 (SRTP): a root-table switch is followed by a global
        // context-cache invalidation, then a global IOTLB invalidation, so
        // nothing cached from the old tables survives (Linux
        // `iommu_set_root_entry` followed by `flush_context`/`flush_iotlb`).
        self.flush_before_invalidation()?;
        self.context_invalidate(ContextGranularity::Global)?;
        if self.scalable {
            self.pasid_cache_invalidate(PasidGranularity::Global)?;
        }
        self.iotlb_invalidate(IotlbGranularity::Global)?;
        self.sync()?;
        if !te_on {
            self.gcmd(te, true, "VT-d GSTS.TES set")?;
        }
        self.quiesce_for_next_stage()?;
        Ok(VtdHandoff {
            root,
            scalable: self.scalable,
        })
    }

    /// Queued invalidation off (its pages go back), fault interrupt masked,
    /// the root forgotten: what both hand-offs end with.
    fn quiesce_for_next_stage(&mut self) -> Result<(), VtdError> {
        // The queue is drained (the caller's sync completed): off, so the
        // next stage may program its own (IQA changes only with QIES clear,
        // VT-d 6.5.2); TE stays set in the write (`gcmd` repeats it).
        if self.regs().gsts.get() & GCMD::QIE::SET.value != 0 {
            self.gcmd(GCMD::QIE::SET.value, false, "VT-d GSTS.QIES clear")?;
        }
        for q in [
            self.queue.take(),
            self.parked.take(),
            self.stray_queue.take(),
        ]
        .into_iter()
        .flatten()
        {
            self.release_queue(q);
        }
        // Faults of the window stay in the records for the next stage; no
        // interrupt toward a vector this stage routed.
        self.regs().fectl.write(FECTL::IM::SET);
        self.root = None;
        self.unlatched_root = false;
        Ok(())
    }

    /// Hands the unit off with the devices still attached translating as
    /// they do now (issue 12 item 5, "identity regions kept"): typically a
    /// stage detaches every device but those whose firmware-owned DMA must
    /// not stop (RMRR / RMR regions, a boot framebuffer), which it left
    /// attached to identity domains (`Domain::install_identity_regions`).
    /// Every other device is blocked. Nothing is switched: the pending
    /// table writes are synced, queued invalidation goes off and the fault
    /// interrupt is masked.
    ///
    /// The returned [`VtdHandoff::root`] is this stage's root table. It, the
    /// context (and PASID) tables under it and the kept domains' page
    /// tables must stay in place, unchanged, until the next stage's
    /// [`adopt_finish`](Self::adopt_finish) returns; drop the kept domains
    /// without `teardown` (dropping a `Domain` gives nothing back).
    ///
    /// The next stage takes over with [`adopt_begin`](Self::adopt_begin),
    /// attaches the same devices to identity domains of its own with the
    /// same regions, then [`adopt_finish`](Self::adopt_finish): the swap
    /// under TE then gives the same translations, as VT-d 11.4.4 asks.
    ///
    /// # Errors
    ///
    /// As [`hand_off`](Self::hand_off) (interrupt remapping on, a failed
    /// sync or handshake).
    pub fn hand_off_keeping_attached(&mut self) -> Result<VtdHandoff, VtdError> {
        let ire = GCMD::IRE::SET.value;
        if self.ir.is_some() || self.regs().gsts.get() & ire != 0 {
            return Err(BackendError::Unsupported(
                "hand_off with interrupt remapping on: disable it first",
            )
            .into());
        }
        let root = self
            .root
            .ok_or(BackendError::Unsupported("VT-d unit not initialised"))?;
        if self.unlatched_root || self.regs().gsts.get() & GCMD::TE::SET.value == 0 {
            return Err(BackendError::Unsupported(
                "hand_off_keeping_attached needs translation on through this stage's root",
            )
            .into());
        }
        self.sync()?;
        self.quiesce_for_next_stage()?;
        Ok(VtdHandoff {
            root,
            scalable: self.scalable,
        })
    }

    /// The first half of [`adopt`](Self::adopt) for a hand-off that kept
    /// devices translating ([`hand_off_keeping_attached`](Self::hand_off_keeping_attached)):
    /// builds this stage's root table and turns queued invalidation on, but
    /// leaves the unit translating through the previous stage's tables.
    /// Attach the kept devices to this stage's identity domains now (their
    /// context entries go into the new root; the invalidations that follow
    /// only make the unit re-read the old tables, which give the same
    /// result), then call [`adopt_finish`](Self::adopt_finish). Other
    /// devices may be attached too: they take effect at `adopt_finish`.
    ///
    /// With translation off it is [`adopt`](Self::adopt) (there is nothing
    /// to keep), and `adopt_finish` is refused.
    ///
    /// # Errors
    ///
    /// Those of [`adopt`](Self::adopt).
    pub fn adopt_begin(&mut self, config: VtdConfig) -> Result<(), VtdError> {
        self.init_inner(config, Start::AdoptBegin)
    }

    /// Latches the root table [`adopt_begin`](Self::adopt_begin) built, with
    /// TE kept, then invalidates the context cache and IOTLB globally; the
    /// protected memory regions go last. The previous stage's tables are
    /// free once it returns.
    ///
    /// # Errors
    ///
    /// [`BackendError::Unsupported`] without a pending `adopt_begin`; a
    /// timed-out SRTP handshake (retry: the root stays pending) or
    /// invalidation.
    pub fn adopt_finish(&mut self) -> Result<(), VtdError> {
        self.finish_adoption()
    }

    /// Takes over a unit a previous stage left translating (after its
    /// [`hand_off`](Self::hand_off)) without ever clearing GCMD.TE: as
    /// [`init`](Self::init) (new root table, invalidation queue, global
    /// context-cache and IOTLB invalidation, protected memory regions lifted
    /// only after), except that TE stays set through the root-table swap and
    /// the fault records are left for the caller to read. Every device is
    /// blocked when it returns.
    ///
    /// The swap is safe under TE because both tables block every device
    /// (VT-d 11.4.4 SRTP asks that tables switched under translation give
    /// the same results for in-flight DMA). Adopting a unit whose previous
    /// owner still translated devices through its own tables moves them to
    /// blocked; DMA in flight at that moment may complete through either.
    /// A unit found with translation off is initialised as by `init` (it was
    /// not blocking; any protected memory regions stay on until TE is set),
    /// except that the fault records are kept.
    ///
    /// # Errors
    ///
    /// Those of [`init`](Self::init), and [`BackendError::Unsupported`] when
    /// translation is on and `config.scalable` differs from the table mode
    /// the unit runs in (RTADDR.TTM cannot change under TE). If the new
    /// root's SRTP handshake times out under TE, that page stays lent.
    pub fn adopt(&mut self, config: VtdConfig) -> Result<(), VtdError> {
        self.init_inner(config, Start::Adopt)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::vec::Vec;

    use super::super::fakehw::{ECAP_SM_SL, Ev, FakeVtd, QEMU_CAP, QEMU_ECAP, SharedMem};
    use super::*;
    use crate::backend::{Attachment, IommuBackend};
    use crate::device::DeviceId;
    use crate::testing::vtd_desc::VtdDesc;

    const TE: u32 = 1 << 31;
    const SRTP: u32 = 1 << 30;
    const QIES: u32 = 1 << 26;

    fn cfg(scalable: bool) -> VtdConfig {
        VtdConfig {
            poll_budget: 500_000_000,
            scalable,
            ..VtdConfig::default()
        }
    }

    fn probe(fake: &FakeVtd) -> Vtd<SharedMem> {
        // SAFETY: the fake's block outlives the driver (the tests keep it).
        unsafe { Vtd::new(fake.regs.base(), fake.regs.len(), fake.mem.clone()) }.unwrap()
    }

    /// Every GCMD write from `from` on, and whether it carried TE.
    fn gcmd_writes(log: &[Ev]) -> Vec<u32> {
        log.iter()
            .filter_map(|e| match e {
                Ev::Gcmd(g) => Some(*g),
                _ => None,
            })
            .collect()
    }

    /// Stage 1 runs a device, hands off; stage 2 adopts. From the first
    /// write of the hand-off to the end of the adoption no GCMD write drops
    /// TE (a plain `init` would: it clears TE before its SRTP), the root
    /// table latched for the window is all zero as the unit reads it (no
    /// device has a root entry), each SRTP is followed by global
    /// context-cache then global IOTLB invalidations, and the window runs
    /// without queued invalidation.
    #[test]
    fn strict_vtd_hand_off_and_adopt_keep_translation_on_throughout() {
        for scalable in [false, true] {
            let ecap = if scalable {
                QEMU_ECAP | ECAP_SM_SL
            } else {
                QEMU_ECAP
            };
            // Not coherent (ECAP.C = 0): the empty root must be cleaned.
            let fake = FakeVtd::start(QEMU_CAP, ecap, SharedMem::new(256, true));
            let mut v1 = probe(&fake);
            v1.init(cfg(scalable)).unwrap();
            let dev = DeviceId::new(0, 0, 3, 0).unwrap();
            v1.attach(dev, Attachment::Bypass).unwrap();
            fake.clear();

            let h = v1.hand_off().unwrap();
            assert_eq!(h.scalable, scalable);
            let gsts = fake.regs.u32(0x1c);
            assert!(gsts & TE != 0 && gsts & QIES == 0, "GSTS {gsts:#x}");
            assert_eq!(fake.regs.u64(0x20) & !0xfff, h.root.0);
            for i in 0..512 {
                assert_eq!(
                    fake.mem.dev_u64(h.root.0 + 8 * i, false),
                    0,
                    "root word {i} as the unit reads it"
                );
            }
            assert!(
                v1.attach(dev, Attachment::Bypass).is_err(),
                "a handed-off unit refuses attach"
            );
            let handed = fake.log();

            let mut v2 = probe(&fake);
            v2.adopt(cfg(scalable)).unwrap();
            let log = fake.log();
            let writes = gcmd_writes(&log);
            assert!(
                writes.iter().all(|g| g & TE != 0),
                "scalable {scalable}: a GCMD write dropped TE: {writes:x?}"
            );
            assert_eq!(
                writes.iter().filter(|g| *g & SRTP != 0).count(),
                2,
                "one SRTP per stage: {writes:x?}"
            );
            let gsts = fake.regs.u32(0x1c);
            assert!(gsts & TE != 0 && gsts & QIES != 0, "GSTS {gsts:#x}");
            assert_ne!(fake.regs.u64(0x20) & !0xfff, h.root.0);
            // After each SRTP: global context cache, then global IOTLB.
            for part in [&handed[..], &log[handed.len()..]] {
                let srtp = part
                    .iter()
                    .position(|e| matches!(e, Ev::Gcmd(g) if g & SRTP != 0))
                    .unwrap();
                let descs: Vec<VtdDesc> = part[srtp..]
                    .iter()
                    .filter_map(|e| match e {
                        Ev::Desc(d) => Some(*d),
                        _ => None,
                    })
                    .collect();
                let ctx = descs
                    .iter()
                    .position(|d| matches!(d, VtdDesc::Context { g: 1, .. }))
                    .unwrap_or_else(|| panic!("no global context inv: {descs:x?}"));
                let tlb = descs
                    .iter()
                    .position(|d| matches!(d, VtdDesc::Iotlb { g: 1, .. }))
                    .unwrap_or_else(|| panic!("no global IOTLB inv: {descs:x?}"));
                assert!(ctx < tlb, "{descs:x?}");
            }
            // Stage 2 translates: a device attaches.
            v2.attach(dev, Attachment::Bypass).unwrap();
        }
    }

    /// Keeping a device translating across the hand-off: the previous
    /// stage's root stays latched until `adopt_finish`, whose SRTP comes
    /// after the device was attached in the new root (the swap gives the
    /// same translation); no GCMD write drops TE, and one SRTP is made.
    #[test]
    fn strict_vtd_hand_off_keeping_attached_swaps_only_after_the_new_root_is_built() {
        let fake = FakeVtd::start(QEMU_CAP, QEMU_ECAP, SharedMem::new(256, true));
        let mut v1 = probe(&fake);
        v1.init(cfg(false)).unwrap();
        let dev = DeviceId::new(0, 0, 3, 0).unwrap();
        v1.attach(dev, Attachment::Bypass).unwrap();
        let old_root = fake.regs.u64(0x20) & !0xfff;
        fake.clear();
        let h = v1.hand_off_keeping_attached().unwrap();
        assert_eq!(h.root.0, old_root, "the stage's own root is handed on");
        assert_eq!(fake.regs.u64(0x20) & !0xfff, old_root);
        let gsts = fake.regs.u32(0x1c);
        assert!(gsts & TE != 0 && gsts & QIES == 0, "GSTS {gsts:#x}");

        let mut v2 = probe(&fake);
        v2.adopt_begin(cfg(false)).unwrap();
        v2.attach(dev, Attachment::Bypass).unwrap();
        let before = fake.log();
        assert!(
            !gcmd_writes(&before).iter().any(|g| g & SRTP != 0),
            "no root switch before adopt_finish: {before:x?}"
        );
        assert_eq!(fake.regs.u64(0x20) & !0xfff, old_root);
        v2.adopt_finish().unwrap();
        let writes = gcmd_writes(&fake.log());
        assert!(writes.iter().all(|g| g & TE != 0), "{writes:x?}");
        assert_eq!(writes.iter().filter(|g| *g & SRTP != 0).count(), 1);
        let new_root = fake.regs.u64(0x20) & !0xfff;
        assert_ne!(new_root, old_root);
        // The device's entry is in the new root as the unit reads it.
        let re = fake.mem.dev_u64(new_root, false);
        assert!(re & 1 != 0, "root entry of bus 0 present: {re:#x}");
        let ce = fake.mem.dev_u64((re & !0xfff) + 3 * 8 * 16, false);
        assert!(ce & 1 != 0, "context entry of 00:03.0 present: {ce:#x}");
        assert!(v2.adopt_finish().is_err(), "a second adopt_finish");
    }

    /// The first stage can block every device at its first instruction:
    /// `hand_off` right after `new`, on a unit with translation off, turns
    /// translation on over the empty root (SRTP before TE).
    #[test]
    fn strict_vtd_hand_off_from_reset_turns_translation_on_over_an_empty_root() {
        let fake = FakeVtd::start(QEMU_CAP, QEMU_ECAP, SharedMem::new(64, true));
        let mut v = probe(&fake);
        let h = v.hand_off().unwrap();
        let log = fake.log();
        let srtp = log
            .iter()
            .position(|e| matches!(e, Ev::Gcmd(g) if g & SRTP != 0))
            .unwrap();
        let te = log
            .iter()
            .position(|e| matches!(e, Ev::Gcmd(g) if g & TE != 0))
            .unwrap();
        assert!(srtp < te, "{log:x?}");
        assert!(fake.regs.u32(0x1c) & TE != 0);
        assert_eq!(fake.regs.u64(0x20) & !0xfff, h.root.0);
    }

    /// Interrupt remapping would outlive the stage: refused, nothing written.
    #[test]
    fn hand_off_with_interrupt_remapping_on_is_refused() {
        let fake = FakeVtd::start(QEMU_CAP, QEMU_ECAP, SharedMem::new(64, true));
        let mut v = probe(&fake);
        v.init(cfg(false)).unwrap();
        // Firmware (or this stage) left IRE on.
        fake.regs.set_u32(0x1c, fake.regs.u32(0x1c) | (1 << 25));
        fake.clear();
        assert!(matches!(
            v.hand_off(),
            Err(VtdError::Backend(BackendError::Unsupported(_)))
        ));
        assert!(gcmd_writes(&fake.log()).is_empty());
    }
}
