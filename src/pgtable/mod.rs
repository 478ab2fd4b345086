//! The I/O page table: one radix walker, descriptor formats plugged in.
//!
//! [`IoPageTable`] walks and edits tables of any [`PteFormat`]; the formats
//! ([`arm::ArmStage1`], [`arm::ArmStage2`], [`vtd::VtdSecondLevel`]) only
//! encode and decode single descriptors.

pub mod arm;
mod attrs;
mod counts;
mod format;
mod reclaim;
mod table;
pub mod vtd;

pub use attrs::{DmaDirection, MapAttrs};
pub use format::{Pte, PteFormat};
pub use reclaim::TableReclaim;
#[cfg(loom)]
#[doc(hidden)]
pub use table::LoomLeafHint;
pub use table::{IoPageTable, UnmapOutcome};
pub(crate) use table::{LeafHint, SharedMapError};
