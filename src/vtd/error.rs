//! Errors of probing and initialising a unit.

use crate::error::BackendError;

/// Errors of probing and initialising a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum VtdError {
    /// VER reads 0 or all-ones: no remapping unit answers at the base.
    NoUnit {
        /// The value read from VER.
        ver: u32,
    },
    /// CAP.SAGAW offers neither a 3-level nor a 4-level second-level table.
    NoAddressWidth {
        /// The SAGAW field.
        sagaw: u8,
    },
    /// CAP/ECAP place registers (fault records at CAP.FRO, CAP.NFR; IOTLB
    /// registers at ECAP.IRO) past the register block the caller mapped:
    /// the driver refuses rather than touch memory outside it.
    RegistersOutside {
        /// Which registers.
        what: &'static str,
        /// First byte offset past them.
        end: usize,
        /// The mapped block's length.
        len: usize,
    },
    /// A hardware wait or table allocation failed.
    Backend(BackendError),
}

impl From<BackendError> for VtdError {
    fn from(e: BackendError) -> Self {
        VtdError::Backend(e)
    }
}

impl From<VtdError> for BackendError {
    fn from(e: VtdError) -> Self {
        match e {
            VtdError::Backend(b) => b,
            VtdError::NoUnit { .. } => BackendError::Unsupported("no VT-d unit at the base"),
            VtdError::RegistersOutside { .. } => {
                BackendError::Unsupported("VT-d registers outside the mapped block")
            }
            VtdError::NoAddressWidth { .. } => {
                BackendError::Unsupported("CAP.SAGAW has no 39- or 48-bit width")
            }
        }
    }
}

impl core::fmt::Display for VtdError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoUnit { ver } => write!(f, "no VT-d unit answers (VER = {ver:#x})"),
            Self::NoAddressWidth { sagaw } => {
                write!(f, "CAP.SAGAW {sagaw:#x} offers no 3- or 4-level table")
            }
            Self::RegistersOutside { what, end, len } => write!(
                f,
                "{what} end at offset {end:#x}, past the {len:#x}-byte register block"
            ),
            Self::Backend(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for VtdError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(e),
            _ => None,
        }
    }
}
