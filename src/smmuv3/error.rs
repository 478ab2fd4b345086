//! Errors of the SMMUv3 driver.

use core::fmt;

use super::cmd::Command;
use crate::error::BackendError;

/// CMDQ_CONS.ERR (IHI 0070, §7.1): why the command queue stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CommandErrorCode {
    /// CERROR_ILL (0x01): illegal command.
    Illegal,
    /// CERROR_ABT (0x02): abort on command fetch.
    Abort,
    /// CERROR_ATC_INV_SYNC (0x03): ATC invalidation timed out before a CMD_SYNC.
    AtcInvSync,
    /// Another (implementation defined) code.
    Other(u8),
}

impl CommandErrorCode {
    /// From the ERR field's value.
    pub const fn from_raw(v: u8) -> Self {
        match v {
            1 => Self::Illegal,
            2 => Self::Abort,
            3 => Self::AtcInvSync,
            other => Self::Other(other),
        }
    }

    /// The field's value.
    pub const fn raw(&self) -> u8 {
        match *self {
            Self::Illegal => 1,
            Self::Abort => 2,
            Self::AtcInvSync => 3,
            Self::Other(v) => v,
        }
    }
}

/// A command the SMMU refused, as found when the queue stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CommandError {
    /// Why.
    pub code: CommandErrorCode,
    /// Queue slot of the command.
    pub index: u32,
    /// The command itself.
    pub command: Command,
}

/// An SMMUv3 driver failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum SmmuError {
    /// A bounded wait ran out.
    Timeout {
        /// Which wait.
        what: &'static str,
        /// Polls spent.
        polls: u32,
    },
    /// The lender refused memory.
    OutOfMemory,
    /// The SMMU lacks a feature the request needs.
    Unsupported(&'static str),
    /// A StreamID beyond what the stream table covers.
    StreamIdOutOfRange {
        /// The StreamID.
        sid: u32,
        /// Number of StreamID bits covered.
        sid_bits: u8,
    },
    /// A domain parameter the SMMU cannot take.
    BadDomain {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The command queue stopped on a command; the queue was recovered.
    Command(CommandError),
    /// The driver was used before `init`.
    NotInitialised,
    /// The register base given to `Smmu::new` is null or not 64 KiB aligned.
    BadRegisterBase {
        /// The address given.
        base: usize,
    },
    /// An identification register holds a value the architecture does not
    /// allow (e.g. IDR1.SIDSIZE above 32): the SMMU is broken or not an SMMUv3.
    BadIdRegister {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u32,
    },
    /// A stream table of `sid_bits` StreamID bits would exceed what the
    /// driver lends one (`max_bits`).
    StreamTableTooLarge {
        /// StreamID bits asked for.
        sid_bits: u8,
        /// The most this layout covers.
        max_bits: u8,
    },
    /// The SMMU does not snoop CPU caches (IDR0.COHACC = 0) and the lender
    /// cannot clean them ([`TableMemory::can_clean`](crate::mem::TableMemory::can_clean)):
    /// the SMMU would read stale tables and commands.
    LenderCannotClean,
    /// GERROR.SFM_ERR: the SMMU entered service failure mode (§7.3.14). It
    /// no longer translates or consumes commands reliably; the driver stops
    /// using it and every later operation returns this error until `init`.
    ServiceFailure,
    /// GERROR.CMDQ_ERR came with a CMDQ_CONS.RD that names no published,
    /// unconsumed command (e.g. a slot of the batch not yet published): the
    /// SMMU is broken. The queue was not touched and the error not
    /// acknowledged.
    BadCommandIndex {
        /// CMDQ_CONS.RD (slot and wrap bit).
        index: u32,
        /// What the driver last wrote to CMDQ_PROD.
        published: u32,
    },
}

impl fmt::Display for SmmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmmuError::Command(e) => write!(
                f,
                "command queue error {:?} at slot {} on {:?}",
                e.code, e.index, e.command
            ),
            other => write!(f, "{other:?}"),
        }
    }
}

impl From<SmmuError> for BackendError {
    fn from(e: SmmuError) -> Self {
        match e {
            SmmuError::Timeout { what, polls } => BackendError::Timeout { what, polls },
            SmmuError::OutOfMemory => BackendError::OutOfMemory,
            SmmuError::Unsupported(what) => BackendError::Unsupported(what),
            SmmuError::StreamIdOutOfRange { .. } => BackendError::Unsupported("StreamID"),
            SmmuError::BadDomain { what, .. } => BackendError::Unsupported(what),
            SmmuError::Command(c) => BackendError::QueueError {
                code: c.code.raw() as u32,
                index: c.index,
            },
            SmmuError::NotInitialised => BackendError::Unsupported("SMMU not initialised"),
            SmmuError::BadRegisterBase { .. } => BackendError::Unsupported("SMMU register base"),
            SmmuError::BadIdRegister { what, .. } => BackendError::Unsupported(what),
            SmmuError::StreamTableTooLarge { .. } => BackendError::Unsupported("stream table size"),
            SmmuError::LenderCannotClean => BackendError::LenderCannotClean,
            SmmuError::BadCommandIndex { .. } => BackendError::HardwareError {
                status: super::regs::GERROR::CMDQ_ERR::SET.value,
            },
            SmmuError::ServiceFailure => BackendError::HardwareError {
                status: super::regs::GERROR::SFM_ERR::SET.value,
            },
        }
    }
}

impl core::error::Error for SmmuError {}
