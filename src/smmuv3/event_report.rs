//! Draining the event queue and acknowledging GERROR: [`EventReport`],
//! [`Smmu::poll_events`] and [`Smmu::handle_irq`].

use super::regs::GERROR;
use super::{CommandError, Event, EventRecord, Smmu};
use crate::logging::log_warn;
use crate::mem::TableMemory;

/// What one [`Smmu::poll_events`] / [`Smmu::handle_irq`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EventReport {
    /// Records delivered to the callback.
    pub events: u32,
    /// The event queue overflowed: some records were lost
    /// (EVENTQ_PROD.OVFLG, or GERROR.EVENTQ_ABT_ERR on QEMU).
    pub overflow: bool,
    /// GERROR bits that were active and have been acknowledged.
    pub gerror: u32,
    /// The command queue had stopped on this command; [`Smmu::handle_irq`]
    /// replaced it with CMD_SYNC and restarted the queue. The next sync
    /// returns it too.
    pub command_error: Option<CommandError>,
    /// GERROR.SFM_ERR: the SMMU entered service failure mode; the driver
    /// refuses every later operation with
    /// [`SmmuError::ServiceFailure`](super::SmmuError::ServiceFailure).
    pub service_failure: bool,
}

impl<M: TableMemory> Smmu<M> {
    /// Drains the event queue without an interrupt controller: every record
    /// goes to `f`, overflow and GERROR are detected, reported and
    /// acknowledged.
    pub fn poll_events(&mut self, mut f: impl FnMut(Event)) -> EventReport {
        self.poll_event_records(|r| f(r.decode()))
    }

    /// [`poll_events`](Self::poll_events) delivering each record as the SMMU
    /// wrote it ([`EventRecord`]: numeric ID, raw 32 bytes, `decode()`).
    pub fn poll_event_records(&mut self, mut f: impl FnMut(EventRecord)) -> EventReport {
        let mut report = EventReport::default();
        let p0 = self.page0;
        let p1 = self.page1;
        let coherent = self.features.coherent;
        let Some(run) = self.run.as_mut() else {
            return report;
        };
        if run.evtq.take_overflow(p1) {
            log_warn!("smmuv3: event queue overflowed: events were lost");
            report.overflow = true;
        }
        // Bounded by the queue size: at most one full queue per call.
        for _ in 0..run.evtq.capacity() {
            match run.evtq.pop_record(&self.mem, p1, coherent) {
                Some(e) => {
                    report.events += 1;
                    f(e);
                }
                None => break,
            }
        }
        // GERROR: acknowledge everything but CMDQ_ERR, which the command
        // queue recovers from itself (it must first fix the command).
        let active = p0.active_gerrors() & !GERROR::CMDQ_ERR::SET.value;
        if active != 0 {
            if active & GERROR::EVENTQ_ABT_ERR::SET.value != 0 {
                report.overflow = true;
            }
            if active & GERROR::SFM_ERR::SET.value != 0 {
                // §7.3.14: the SMMU no longer behaves; stop using it.
                log_warn!("smmuv3: service failure mode (GERROR.SFM_ERR)");
                self.service_failure = true;
                report.service_failure = true;
            }
            p0.ack_gerrors(active);
            report.gerror = active;
            self.counters.gerrors_seen |= active;
        }
        if report.overflow {
            self.counters.event_overflows += 1;
        }
        self.counters.events += report.events as u64;
        report
    }

    /// What a hypervisor calls from the SMMU's event or GERROR interrupt:
    /// drains events to `f`, acknowledges GERROR, and restarts a command
    /// queue stopped on an error. Returns what it found.
    ///
    /// It issues no command: a batch the interrupted code was building stays
    /// unpublished, and the error that stopped the queue is returned in
    /// [`EventReport::command_error`] (and by the next sync), not dropped.
    pub fn handle_irq(&mut self, f: impl FnMut(Event)) -> EventReport {
        let mut report = self.poll_events(f);
        let coherent = self.features.coherent;
        let p0 = self.page0;
        if let Some(run) = self.run.as_mut() {
            report.command_error = run.cmdq.recover(p0, &self.mem, coherent);
        }
        report
    }
}
