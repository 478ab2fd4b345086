//! Errors of interrupt remapping.

use core::fmt;

use crate::device::DeviceId;
use crate::error::BackendError;

/// Why an interrupt-remapping request was refused. Nothing was changed in
/// the table or the registers unless the variant says otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum IrError {
    /// The unit has no interrupt remapping (ECAP.IR = 0).
    NotSupported,
    /// x2APIC destinations asked for, but the unit has no extended
    /// interrupt mode (ECAP.EIM = 0).
    NoExtendedInterruptMode,
    /// Queued invalidation is off: the interrupt entry cache can only be
    /// invalidated through the queue (VT-d 6.5.2.7). Turn it on with
    /// [`Vtd::set_queued_invalidation`](super::Vtd::set_queued_invalidation)
    /// (or `VtdConfig::use_qi`) first.
    NeedsQueuedInvalidation,
    /// The table size is not a power of two from 2 to 65536 entries
    /// (IRTA.S encodes 2^(S + 1), S ≤ 15).
    TableSize {
        /// Entries asked for.
        entries: u32,
    },
    /// Interrupt remapping is not enabled on this unit.
    NotEnabled,
    /// Interrupt remapping is already enabled: disable it first.
    AlreadyEnabled,
    /// Every entry of the table is allocated.
    TableFull {
        /// Entries in the table.
        entries: u32,
    },
    /// The handle's index is not an allocated entry of this table.
    NotAllocated {
        /// The interrupt index.
        index: u16,
    },
    /// The destination does not fit the mode: above 255 for xAPIC (EIME = 0).
    Destination {
        /// The APIC ID asked for.
        destination: u32,
        /// Whether the table uses x2APIC (32-bit) destinations.
        x2apic: bool,
    },
    /// Vectors 0–15 are reserved by the local APIC (Intel SDM Vol. 3 11.5.2);
    /// fixed and lowest-priority interrupts need 16–255.
    Vector(u8),
    /// A bus range whose first bus is above its last.
    BusRange {
        /// First bus.
        first: u8,
        /// Last bus.
        last: u8,
    },
    /// The device is on another PCI segment than this unit's.
    WrongSegment(DeviceId),
    /// A hardware wait, allocation or queue operation failed.
    Backend(BackendError),
}

impl From<BackendError> for IrError {
    fn from(e: BackendError) -> Self {
        Self::Backend(e)
    }
}

impl From<IrError> for BackendError {
    fn from(e: IrError) -> Self {
        match e {
            IrError::Backend(b) => b,
            _ => BackendError::Unsupported("interrupt remapping refused the request"),
        }
    }
}

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSupported => write!(f, "the unit has no interrupt remapping (ECAP.IR = 0)"),
            Self::NoExtendedInterruptMode => {
                write!(f, "x2APIC destinations need ECAP.EIM, which the unit lacks")
            }
            Self::NeedsQueuedInvalidation => write!(
                f,
                "interrupt-entry-cache invalidation needs queued invalidation: enable it first"
            ),
            Self::TableSize { entries } => write!(
                f,
                "{entries} interrupt-remapping entries: must be a power of two from 2 to 65536"
            ),
            Self::NotEnabled => write!(f, "interrupt remapping is not enabled"),
            Self::AlreadyEnabled => write!(f, "interrupt remapping is already enabled"),
            Self::TableFull { entries } => {
                write!(f, "all {entries} interrupt-remapping entries are allocated")
            }
            Self::NotAllocated { index } => {
                write!(f, "interrupt index {index:#x} is not an allocated entry")
            }
            Self::Destination {
                destination,
                x2apic,
            } => {
                if *x2apic {
                    write!(f, "destination {destination:#x} not representable")
                } else {
                    write!(
                        f,
                        "destination APIC ID {destination:#x} above 0xff needs x2APIC mode (EIME)"
                    )
                }
            }
            Self::Vector(v) => write!(f, "vector {v:#x} is reserved (use 0x10..=0xff)"),
            Self::BusRange { first, last } => {
                write!(f, "bus range {first:#x}..={last:#x} is empty")
            }
            Self::WrongSegment(d) => write!(f, "{d} is not on this unit's PCI segment"),
            Self::Backend(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for IrError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(e),
            _ => None,
        }
    }
}
