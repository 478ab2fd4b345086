//! [`FakeQueue`]: a command queue with a completion that takes time, for
//! tests of the shared wrappers ([`crate::shared`]).
//!
//! Commands are counted, not executed; each look at a completion lets the
//! "hardware" consume up to `speed` more commands, in order, so a
//! completion at sequence number `s` is done once `s` commands were
//! consumed — and with it everything queued before it.
//! A queue error can be armed to appear at the next look, and "interrupt
//! work" can be raised and drained to check that none is lost.

use crate::addr::DmaAddr;
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::shared::SplitCompletion;

/// A fake queue (see the module docs).
#[derive(Debug, Default, Clone)]
pub struct FakeQueue {
    /// Commands queued (completions included).
    pub queued: u64,
    /// Completions submitted.
    pub completions: u64,
    /// Highest sequence number the "hardware" has consumed.
    pub consumed: u64,
    /// Commands the "hardware" consumes per look.
    pub speed: u64,
    /// Range invalidations queued.
    pub invalidations: u64,
    /// Whole-domain invalidations queued.
    pub domain_invalidations: u64,
    /// Returned (once) by the next look, as a stopped queue would be.
    pub armed_error: Option<BackendError>,
    /// Returned (once) by the next completion submitted, as a driver that
    /// finds the queue stopped while queuing the completion (VT-d).
    pub armed_submit_error: Option<BackendError>,
    /// Interrupt work raised and not yet drained.
    pub irq_raised: u64,
    /// Interrupt work drained.
    pub irq_drained: u64,
    /// Poll budget.
    pub budget: u32,
}

impl FakeQueue {
    /// A queue consuming `speed` commands per look; budget 10^7 looks.
    pub fn new(speed: u64) -> Self {
        Self {
            speed,
            budget: 10_000_000,
            ..Self::default()
        }
    }

    /// What an interrupt handler does: drains the raised work.
    pub fn drain_irq(&mut self) -> u64 {
        let n = self.irq_raised;
        self.irq_raised = 0;
        self.irq_drained += n;
        n
    }
}

impl IommuBackend for FakeQueue {
    fn attach(&mut self, _dev: DeviceId, _how: Attachment) -> Result<(), BackendError> {
        Ok(())
    }

    fn invalidate(
        &mut self,
        _domain: &DomainInfo,
        _iova: DmaAddr,
        _len: u64,
        _leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.queued += 1;
        self.invalidations += 1;
        Ok(())
    }

    fn invalidate_domain(&mut self, _domain: &DomainInfo) -> Result<(), BackendError> {
        self.queued += 1;
        self.domain_invalidations += 1;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        let t = self.submit_completion()?;
        crate::shared::SplitSync::wait(self, t)
    }
}

impl SplitCompletion for FakeQueue {
    /// Its publish does nothing.
    fn publish_needed(&self) -> bool {
        false
    }

    fn queued(&self) -> u64 {
        self.queued
    }

    fn submit_completion(&mut self) -> Result<u64, BackendError> {
        if let Some(e) = self.armed_submit_error.take() {
            return Err(e);
        }
        self.queued += 1;
        self.completions += 1;
        Ok(self.queued)
    }

    fn completion_done(&mut self, ticket: u64) -> Result<bool, BackendError> {
        if let Some(e) = self.armed_error.take() {
            return Err(e);
        }
        self.consumed = self.consumed.saturating_add(self.speed).min(self.queued);
        Ok(self.consumed >= ticket)
    }

    fn completion_budget(&self) -> u32 {
        self.budget
    }
}
