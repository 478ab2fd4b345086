//! A recording backend for host tests: no hardware, every call remembered.
//!
//! Use it to check what the core asks of a driver: how many completion waits
//! a sync costs, and which ranges were invalidated.

#[cfg(test)]
pub mod heap;
pub mod order;
pub mod smmu_cmd;
#[cfg(target_has_atomic = "64")]
pub mod split;
pub mod vtd_desc;
pub mod vtd_ir;

use crate::addr::DmaAddr;
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;

/// How many calls a [`RecordingBackend`] keeps in its log.
pub const LOG_CAPACITY: usize = 256;

/// One call a [`RecordingBackend`] received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Call {
    /// `attach(dev, how)`.
    Attach(DeviceId, Attachment),
    /// `invalidate(domain, iova, len, leaf_only)`.
    Invalidate {
        /// Domain tag.
        domain: u16,
        /// Start.
        iova: DmaAddr,
        /// Length.
        len: u64,
        /// Leaf entries only.
        leaf_only: bool,
    },
    /// `invalidate_domain(domain)`.
    InvalidateDomain(u16),
    /// `sync()`: one completion wait.
    Sync,
    /// `publish()`: table writes made visible, no command, no wait.
    Publish,
}

/// A backend that records calls instead of touching hardware.
#[derive(Debug, Default)]
pub struct RecordingBackend {
    /// The most recent calls (oldest dropped first when full).
    pub log: heapless::Deque<Call, LOG_CAPACITY>,
    /// Completion waits issued.
    pub syncs: u64,
    /// [`IommuBackend::publish`] calls (no command, no wait).
    pub publishes: u64,
    /// Range invalidations queued.
    pub invalidations: u64,
    /// Whole-domain invalidations queued.
    pub domain_invalidations: u64,
    /// Answer to [`IommuBackend::needs_map_invalidation`] (VT-d caching mode).
    pub caching_mode: bool,
    /// When set, the next `sync` fails with this error (and is still counted).
    pub fail_next_sync: Option<BackendError>,
}

impl RecordingBackend {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    fn record(&mut self, c: Call) {
        if self.log.is_full() {
            self.log.pop_front();
        }
        let _ = self.log.push_back(c);
    }

    /// Whether the invalidations logged since the last-but-one `Sync` cover
    /// every byte of `[iova, iova + len)` in `domain` (or the whole domain was
    /// invalidated).
    pub fn covered_since_last_sync(&self, domain: u16, iova: u64, len: u64) -> bool {
        let mut cur = iova;
        let end = iova + len;
        let mut calls: heapless::Vec<(u64, u64), LOG_CAPACITY> = heapless::Vec::new();
        for c in self.log.iter().rev().skip_while(|c| **c == Call::Sync) {
            match *c {
                Call::Sync => break,
                Call::InvalidateDomain(d) if d == domain => return true,
                Call::Invalidate {
                    domain: d,
                    iova,
                    len,
                    ..
                } if d == domain => {
                    let _ = calls.push((iova.0, iova.0 + len));
                }
                _ => {}
            }
        }
        calls.sort_unstable();
        for (s, e) in calls {
            if s <= cur && e > cur {
                cur = e;
            }
        }
        cur >= end
    }
}

impl IommuBackend for RecordingBackend {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        self.record(Call::Attach(dev, how));
        Ok(())
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.invalidations += 1;
        self.record(Call::Invalidate {
            domain: domain.id,
            iova,
            len,
            leaf_only,
        });
        Ok(())
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        self.domain_invalidations += 1;
        self.record(Call::InvalidateDomain(domain.id));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        self.syncs += 1;
        self.record(Call::Sync);
        match self.fail_next_sync.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn publish(&mut self) -> Result<(), BackendError> {
        self.publishes += 1;
        self.record(Call::Publish);
        Ok(())
    }

    fn needs_map_invalidation(&self) -> bool {
        self.caching_mode
    }
}
