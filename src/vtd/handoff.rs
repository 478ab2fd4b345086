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
//! 4. Once `adopt` returns, [`VtdHandoff::blocking_root`] is free memory
//!    again; attach devices as after `init`.

use tock_registers::interfaces::{Readable, Writeable};

use super::inv::{ContextGranularity, IotlbGranularity, PasidGranularity};
use super::regs::{FECTL, GCMD, RTADDR};
use super::{Vtd, VtdConfig, VtdError};
use crate::addr::PhysAddr;
use crate::backend::IommuBackend;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// What [`Vtd::hand_off`] leaves for the next stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdHandoff {
    /// The zeroed 4 KiB root table the unit translates through (every
    /// device blocked). The unit may read it until the next stage's
    /// [`Vtd::adopt`] returns: keep it reserved, and unchanged, until then.
    pub blocking_root: PhysAddr,
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
    /// is blocked and recorded in the fault registers (reason 1h, root entry
    /// not present), which the next stage reads after [`adopt`](Self::adopt).
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
        // The empty table is in memory (cleaned for a non-coherent unit)
        // before the unit is told where it is.
        self.clean_table(root, 4096);
        crate::barrier::wmb_on(&self.mem);
        let ttm = if self.scalable {
            RTADDR::TTM::Scalable
        } else {
            RTADDR::TTM::Legacy
        };
        let te_on = self.regs().gsts.get() & te != 0;
        self.regs()
            .rtaddr
            .write(RTADDR::RTA.val(root.0 >> 12) + ttm);
        if let Err(e) = self.gcmd_one_shot(GCMD::SRTP::SET.value, true, "VT-d GSTS.RTPS") {
            if !te_on {
                // SAFETY: translation is off, so the unit walks no root
                // table, whatever it latches late (see `init`).
                unsafe { self.mem.free(root, 1) };
            }
            return Err(e.into());
        }
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
        // The queue is drained (the sync's wait completed): off, so the next
        // stage may program its own (IQA changes only with QIES clear,
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
        Ok(VtdHandoff {
            blocking_root: root,
            scalable: self.scalable,
        })
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
        self.init_inner(config, true)
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
            assert_eq!(fake.regs.u64(0x20) & !0xfff, h.blocking_root.0);
            for i in 0..512 {
                assert_eq!(
                    fake.mem.dev_u64(h.blocking_root.0 + 8 * i, false),
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
            assert_ne!(fake.regs.u64(0x20) & !0xfff, h.blocking_root.0);
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
        assert_eq!(fake.regs.u64(0x20) & !0xfff, h.blocking_root.0);
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
