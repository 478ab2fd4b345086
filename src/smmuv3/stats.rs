//! The driver's counters: [`Stats`] and [`Smmu::stats`].

use super::Smmu;
use super::cmdq::CommandCounts;
use super::error::CommandError;
use crate::mem::TableMemory;

/// Counters the driver keeps since the last [`Smmu::init`]; tests read them
/// through [`Smmu::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// Commands submitted, by kind.
    pub commands: CommandCounts,
    /// Calls of [`IommuBackend::sync`](crate::backend::IommuBackend::sync).
    pub sync_calls: u64,
    /// Command queue errors met (and recovered from).
    pub command_errors: u64,
    /// The last command error.
    pub last_command_error: Option<CommandError>,
    /// Event records delivered.
    pub events: u64,
    /// Times the event queue overflowed (events lost).
    pub event_overflows: u64,
    /// GERROR bits acknowledged, OR-ed together.
    pub gerrors_seen: u32,
}

impl<M: TableMemory> Smmu<M> {
    /// Counters since the last [`init`](Self::init).
    pub fn stats(&self) -> Stats {
        let (commands, command_errors, last_command_error) = match &self.run {
            Some(r) => {
                let (n, last) = r.cmdq.errors();
                (r.cmdq.counts(), n, last)
            }
            None => (CommandCounts::default(), 0, None),
        };
        Stats {
            commands,
            command_errors,
            last_command_error,
            ..self.counters
        }
    }
}
