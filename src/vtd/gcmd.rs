//! Global command and status (GCMD/GSTS, VT-d 11.4.4–11.4.5): the bounded
//! command/status handshakes and what is built on them — init, disable,
//! switching queued invalidation on and off, the write-buffer flush.

use core::sync::atomic::{Ordering, fence};

use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};

use super::inv::{ContextGranularity, IotlbGranularity, PasidGranularity};
use super::qi::InvQueue;
use super::regs::{self, FECTL, GCMD, PMEN, RTADDR};
use super::{Start, Vtd, VtdConfig, VtdError};
use crate::addr::PhysAddr;
use crate::backend::IommuBackend;
use crate::error::BackendError;
use crate::mem::TableMemory;

impl<M: TableMemory> Vtd<M> {
    /// Raw GSTS.
    pub fn global_status(&self) -> u32 {
        self.regs().gsts.get()
    }

    /// Sets or clears one GCMD command bit and waits, bounded, until GSTS
    /// reports `on` for it. Every write repeats the enables GSTS shows.
    pub(super) fn gcmd(&self, bit: u32, on: bool, what: &'static str) -> Result<(), BackendError> {
        self.gcmd_then_wait(bit, on, on, what)
    }

    /// Fires a one-shot GCMD command (SRTP, WBF) and waits for its status bit
    /// to reach `done` (RTPS set, WBFS clear).
    pub(super) fn gcmd_one_shot(
        &self,
        bit: u32,
        done: bool,
        what: &'static str,
    ) -> Result<(), BackendError> {
        self.gcmd_then_wait(bit, true, done, what)
    }

    /// Writes GCMD with `bit` set (`set`) or cleared, keeping the enables
    /// GSTS shows, then waits, bounded, until GSTS shows `bit` as `done`.
    fn gcmd_then_wait(
        &self,
        bit: u32,
        set: bool,
        done: bool,
        what: &'static str,
    ) -> Result<(), BackendError> {
        let r = self.regs();
        fence(Ordering::SeqCst);
        r.gcmd.set(regs::gcmd_value(r.gsts.get(), bit, set));
        let mut polls = 0u32;
        while (r.gsts.get() & bit != 0) != done {
            polls += 1;
            if polls >= self.budget {
                return Err(BackendError::Timeout { what, polls });
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Sets the unit up and turns translation on: root table, invalidation
    /// queue (if wanted and present), global invalidation, fault state
    /// cleared, then GCMD.TE, and only then the protected memory regions
    /// off (PMEN.EPM). Every device starts blocked. Refused with
    /// [`BackendError::LenderCannotClean`] when the unit does not snoop
    /// (ECAP.C, or ECAP.SMPWC in scalable mode) and the lender cannot clean. Calling it again
    /// re-initialises from scratch: the previous run's invalidation queues
    /// and interrupt-remapping table go back to the lender once GSTS shows
    /// QIES and IRES clear; its root and context tables stay lent (leaked),
    /// not freed. A root table whose GCMD.SRTP handshake times out goes back
    /// (translation is off then, so the unit walks no table).
    ///
    /// # Errors
    ///
    /// [`VtdError::Backend`] with:
    /// - [`BackendError::Unsupported`]: `config.scalable` on a unit without
    ///   ECAP.SMTS and a translation type (ECAP.SLTS / ECAP.FLTS), or
    ///   without queued invalidation (ECAP.QI, `config.use_qi`).
    /// - [`BackendError::LenderCannotClean`]: as above.
    /// - [`BackendError::OutOfMemory`]: the lender refused the root table or
    ///   the queue pages.
    /// - [`BackendError::Timeout`]: a GSTS handshake, PMEN.PRS or an
    ///   invalidation did not complete within `config.poll_budget` polls.
    /// - [`BackendError::QueueError`]: the first invalidations stopped the
    ///   queue.
    ///
    /// After an error translation may be off: call `init` again or stop using
    /// the unit.
    pub fn init(&mut self, config: VtdConfig) -> Result<(), VtdError> {
        self.init_inner(config, Start::Init)
    }

    /// [`init`](Self::init), or (`Start::Adopt*`) [`adopt`](Self::adopt) /
    /// [`adopt_begin`](Self::adopt_begin): a unit found translating keeps
    /// GCMD.TE through the root-table swap, and the fault records are left
    /// for the caller.
    pub(super) fn init_inner(&mut self, config: VtdConfig, start: Start) -> Result<(), VtdError> {
        let adopt = start != Start::Init;
        self.unlatched_root = false;
        self.budget = config.poll_budget.max(1);
        self.segment = config.segment;
        if let Some(did) = config.bypass_domain_id {
            self.bypass_did = did;
        }
        if config.scalable {
            if !(self.features.smts && (self.features.slts || self.features.flts)) {
                return Err(BackendError::Unsupported(
                    "scalable mode needs ECAP.SMTS and ECAP.SLTS or ECAP.FLTS",
                )
                .into());
            }
            if !(config.use_qi && self.features.qi) {
                return Err(
                    BackendError::Unsupported("scalable mode needs queued invalidation").into(),
                );
            }
        }
        // A unit that does not snoop reads tables and queue from memory: the
        // lender must be able to clean them there (issue 9 #5).
        if (!self.tables_coherent() || !self.walk_coherent(config.scalable))
            && !self.mem.can_clean()
        {
            return Err(BackendError::LenderCannotClean.into());
        }
        let te = GCMD::TE::SET.value;
        let qie = GCMD::QIE::SET.value;
        // Firmware or an earlier run may have left things on. Translation
        // goes off before the new root table is set: under TE = 1 the spec
        // wants the new tables to translate as the old ones did (VT-d
        // 11.4.4, SRTP), which a fresh all-blocked table does not. Protected
        // memory regions stay on through this window; they are lifted only
        // once translation is on again, below.
        let keep_te = adopt && self.regs().gsts.get() & te != 0;
        if keep_te {
            // Adopting: translation stays on. The new root is empty, so it
            // blocks every device, as the blocking root `hand_off` left does
            // (VT-d 11.4.4 SRTP: under TE the new tables must translate as
            // the old ones; both block). The table mode cannot change here.
            let scalable_now = self.regs().rtaddr.read(RTADDR::TTM) == 1;
            if scalable_now != config.scalable {
                return Err(BackendError::Unsupported(
                    "adopt cannot change RTADDR.TTM while translation is on",
                )
                .into());
            }
        } else if self.regs().gsts.get() & te != 0 {
            self.gcmd(te, false, "VT-d GSTS.TES clear")?;
        }
        // Interrupt remapping rests on the queue about to be dropped: off
        // first (its table, if ours, is leaked like the DMA tables).
        let ire = GCMD::IRE::SET.value;
        if self.regs().gsts.get() & ire != 0 {
            self.gcmd(ire, false, "VT-d GSTS.IRES clear")?;
        }
        // IRES is clear: the unit remaps through no table, ours go back.
        if let Some(t) = self.ir.take() {
            let (base, pages) = t.span();
            self.release_ir_table(base, pages);
        }
        self.release_stray_ir();
        if self.regs().gsts.get() & qie != 0 {
            self.gcmd(qie, false, "VT-d GSTS.QIES clear")?;
        }
        // QIES is clear: the unit fetches from no queue and writes no wait
        // status (VT-d 11.4.4 QIE: QIES clears once queued invalidation has
        // stopped), so every queue of ours goes back.
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
        self.scalable = config.scalable;
        self.wb_flushed = false;

        // The previous root table (and its context tables) stays lent: see
        // the doc comment.
        self.root = None;
        let root = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
        self.clean_table(root, 4096);
        if keep_te && start == Start::AdoptBegin {
            // The unit still translates through the previous stage's tables;
            // `adopt_finish` latches this root once the caller has attached
            // what must keep translating as before.
            self.root = Some(root);
            self.unlatched_root = true;
            if config.use_qi && self.features.qi {
                self.set_queued_invalidation(true)?;
            }
            return Ok(());
        }
        self.latch_root(root, keep_te)?;
        self.root = Some(root);

        if config.use_qi && self.features.qi {
            self.set_queued_invalidation(true)?;
        }
        self.after_latch(adopt)
    }

    /// Points RTADDR at `root` and latches it (GCMD.SRTP, bounded). If the
    /// handshake times out with translation off, the page goes back.
    pub(super) fn latch_root(&mut self, root: PhysAddr, translating: bool) -> Result<(), VtdError> {
        let ttm = if self.scalable {
            RTADDR::TTM::Scalable
        } else {
            RTADDR::TTM::Legacy
        };
        // The table is in memory before the unit is told where it is.
        crate::barrier::wmb_on(&self.mem);
        self.regs()
            .rtaddr
            .write(RTADDR::RTA.val(root.0 >> 12) + ttm);
        if let Err(e) = self.gcmd_one_shot(GCMD::SRTP::SET.value, true, "VT-d GSTS.RTPS") {
            if translating {
                // Translation is on: the unit may latch this table late and
                // walk it, so it stays lent (leaked), never reused.
                return Err(e.into());
            }
            // TE is clear (switched off above, never set since): the unit
            // translates nothing and walks no root table, whatever RTADDR it
            // may latch late (VT-d 11.4.4 TE), and the next `init` latches
            // its own table before it sets TE. So this one goes back.
            // SAFETY: allocated by the caller with one page, never walked (above).
            unsafe { self.mem.free(root, 1) };
            return Err(e.into());
        }
        Ok(())
    }

    /// After a new root is latched: global context-cache (+ PASID-cache)
    /// and IOTLB invalidation (VT-d 11.4.4 SRTP asks for both, in that
    /// order), fault state, TE, then the protected memory regions off.
    pub(super) fn after_latch(&mut self, adopt: bool) -> Result<(), VtdError> {
        let te = GCMD::TE::SET.value;
        self.flush_before_invalidation()?;
        self.context_invalidate(ContextGranularity::Global)?;
        if self.scalable {
            self.pasid_cache_invalidate(PasidGranularity::Global)?;
        }
        self.iotlb_invalidate(IotlbGranularity::Global)?;
        self.sync()?;

        // Start with no stale faults (an adopting stage reads them itself:
        // they may name a device that tried DMA during the hand-off); keep
        // the fault interrupt masked until the user routes it (handle_irq
        // works with or without it).
        if !adopt {
            let _ = self.poll_faults(|_| {});
        }
        self.regs().fectl.write(FECTL::IM::SET);

        self.gcmd(te, true, "VT-d GSTS.TES set")?;

        // Only now that translation blocks every device may the protected
        // memory regions firmware set up go (Linux `intel_iommu_init`:
        // translation enabled, then `iommu_disable_protect_mem_regions`).
        self.disable_protected_regions()?;
        Ok(())
    }

    /// [`adopt_begin`](Self::adopt_begin)'s second half: latches the new
    /// root with TE kept.
    pub(super) fn finish_adoption(&mut self) -> Result<(), VtdError> {
        if !self.unlatched_root {
            return Err(BackendError::Unsupported("adopt_finish without adopt_begin").into());
        }
        let root = self
            .root
            .ok_or(BackendError::Unsupported("VT-d unit not initialised"))?;
        self.latch_root(root, true)?;
        self.unlatched_root = false;
        self.after_latch(true)
    }

    /// Clears PMEN.EPM and waits, bounded, for PMEN.PRS to clear (VT-d
    /// 11.4.10). Nothing to do when no region is enabled.
    fn disable_protected_regions(&self) -> Result<(), BackendError> {
        let pmen = &self.regs().pmen;
        if !pmen.is_set(PMEN::EPM) && !pmen.is_set(PMEN::PRS) {
            return Ok(());
        }
        pmen.modify(PMEN::EPM::CLEAR);
        let mut polls = 0u32;
        while pmen.is_set(PMEN::PRS) {
            polls += 1;
            if polls >= self.budget {
                return Err(BackendError::Timeout {
                    what: "VT-d PMEN.PRS clear",
                    polls,
                });
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Switches between queued and register-based invalidation while
    /// translation stays on. Switching off first syncs (the queue must be
    /// drained, its last descriptor a wait); switching on (re)programs the
    /// queue with IQT = 0. Both GCMD writes keep TE (VT-d 6.5.2, 11.4.4).
    ///
    /// # Errors
    ///
    /// - [`BackendError::Unsupported`]: switching on without ECAP.QI, or off
    ///   in scalable mode while translation is on (scalable mode needs the
    ///   queue).
    /// - [`BackendError::OutOfMemory`]: the lender refused the queue pages.
    /// - [`BackendError::Timeout`], [`BackendError::QueueError`]: the drain
    ///   before switching off, or the GSTS.QIES handshake, failed. A new
    ///   queue whose switch-on timed out goes back to the lender once QIES,
    ///   asked to clear, reads clear; otherwise the unit may still fetch from
    ///   it and it stays lent until a later switch-on, [`disable`](Self::disable)
    ///   or [`init`](Self::init) sees QIES clear.
    pub fn set_queued_invalidation(&mut self, on: bool) -> Result<(), BackendError> {
        if on == self.queue.is_some() {
            return Ok(());
        }
        let qie = GCMD::QIE::SET.value;
        if on {
            if !self.features.qi {
                return Err(BackendError::Unsupported(
                    "queued invalidation needs ECAP.QI",
                ));
            }
            // A queue an earlier switch-on had to keep goes first, once
            // QIES is seen clear (IQA may change only then, VT-d 6.5.2).
            self.reclaim_stray_queue()?;
            let mut q = match self.parked.take() {
                Some(q) => q,
                None => InvQueue::new(
                    &self.mem,
                    self.budget,
                    self.scalable,
                    !self.tables_coherent(),
                )?,
            };
            q.program(self.regs());
            if let Err(e) = self.gcmd(qie, true, "VT-d GSTS.QIES set") {
                self.abandon_queue(q);
                return Err(e);
            }
            self.queue = Some(q);
        } else {
            if self.scalable && self.regs().gsts.get() & GCMD::TE::SET.value != 0 {
                return Err(BackendError::Unsupported(
                    "scalable mode runs on queued invalidation",
                ));
            }
            if self.ir.is_some() {
                // The interrupt entry cache has no register-based
                // invalidation (VT-d 6.5.2.7).
                return Err(BackendError::Unsupported(
                    "interrupt remapping runs on queued invalidation: disable it first",
                ));
            }
            self.sync()?;
            self.gcmd(qie, false, "VT-d GSTS.QIES clear")?;
            self.parked = self.queue.take();
        }
        Ok(())
    }

    /// Folds a queue's counters into the unit's and gives its pages back.
    /// Caller: the unit fetches from it no more (GSTS.QIES seen clear, or
    /// never set while it was programmed).
    pub(super) fn release_queue(&mut self, q: InvQueue) {
        self.stats.wait_descriptors += q.waits();
        self.stats.queued_descriptors += q.submitted();
        // SAFETY: the queue's pages were lent by `self.mem` (`InvQueue::new`)
        // and, per the caller, the unit no longer uses them.
        unsafe { q.release(&self.mem) };
    }

    /// After GCMD.QIE was sent but GSTS.QIES never showed it: asks for QIE
    /// off; once QIES reads clear the unit fetches nothing (and nothing was
    /// submitted: IQT = 0), so the pages go back. Otherwise the unit may
    /// still use the queue: it stays lent (`stray_queue`) until a later
    /// switch-on, `disable` or `init` sees QIES clear.
    pub(super) fn abandon_queue(&mut self, q: InvQueue) {
        if self
            .gcmd(GCMD::QIE::SET.value, false, "VT-d GSTS.QIES clear")
            .is_ok()
        {
            self.release_queue(q);
        } else {
            self.stray_queue = Some(q);
        }
    }

    /// QIE off, confirmed, then the stray queue (if any) goes back.
    fn reclaim_stray_queue(&mut self) -> Result<(), BackendError> {
        if let Some(q) = self.stray_queue.take() {
            if let Err(e) = self.gcmd(GCMD::QIE::SET.value, false, "VT-d GSTS.QIES clear") {
                self.stray_queue = Some(q);
                return Err(e);
            }
            self.release_queue(q);
        }
        Ok(())
    }

    /// Turns interrupt remapping (if on), translation and queued
    /// invalidation off (every device then accesses memory untranslated).
    /// A queue or interrupt-remapping table kept after a timed-out enable
    /// handshake goes back to the lender once GSTS shows QIES / IRES clear.
    ///
    /// # Errors
    ///
    /// [`BackendError::Timeout`] when GSTS.IRES or GSTS.TES does not clear in
    /// time, and those of
    /// [`set_queued_invalidation`](Self::set_queued_invalidation)`(false)`.
    pub fn disable(&mut self) -> Result<(), BackendError> {
        if self.ir.is_some() {
            self.disable_interrupt_remapping()?;
        } else {
            self.reclaim_stray_ir()?;
        }
        self.gcmd(GCMD::TE::SET.value, false, "VT-d GSTS.TES clear")?;
        self.set_queued_invalidation(false)?;
        self.reclaim_stray_queue()
    }

    /// [`flush_write_buffer`](Self::flush_write_buffer) once per batch:
    /// before the first invalidation after table writes, or at the sync.
    pub(super) fn flush_before_invalidation(&mut self) -> Result<(), BackendError> {
        if !self.wb_flushed {
            self.flush_write_buffer()?;
            self.wb_flushed = true;
        }
        Ok(())
    }

    /// GCMD.WBF when CAP.RWBF: flushes the write buffer so table writes
    /// reach memory before the unit reads them.
    pub(super) fn flush_write_buffer(&mut self) -> Result<(), BackendError> {
        if self.features.rwbf {
            self.gcmd_one_shot(GCMD::WBF::SET.value, false, "VT-d GSTS.WBFS clear")?;
            self.stats.write_buffer_flushes += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testmem::{HostMem, qemu_like};
    use super::*;

    #[test]
    fn init_on_unresponsive_hardware_times_out_instead_of_hanging() {
        let r = qemu_like();
        // SAFETY: `r` is a register block in memory that outlives `vtd`.
        let mut vtd =
            unsafe { Vtd::new(r.base(), super::super::REGISTER_BLOCK_LEN, HostMem::new(4)) }
                .unwrap();
        let cfg = VtdConfig {
            poll_budget: 20,
            ..VtdConfig::default()
        };
        assert_eq!(
            vtd.init(cfg),
            Err(VtdError::Backend(BackendError::Timeout {
                what: "VT-d GSTS.RTPS",
                polls: 20
            }))
        );
        // The SRTP write carried only SRTP (nothing was enabled in GSTS).
        assert_eq!(r.get_u32(0x18), 1 << 30);
    }
}
