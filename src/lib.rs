#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
//! bare-iommu: ARM SMMUv3 and Intel VT-d for bare-metal hypervisors, unikernels
//! and firmware, with a two-step DMA mapping API.

pub mod addr;
pub mod backend;
pub mod device;
pub mod error;
pub mod iova;
mod logging;
pub mod mem;
pub mod pgtable;
pub mod smmuv3;
pub mod state;
pub mod testing;
pub mod vtd;

pub use addr::{BusAddr, DmaAddr, PAGE_SIZE, PhysAddr};
pub use backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
pub use device::DeviceId;
pub use error::{BackendError, DmaError, PageTableError};
pub use mem::TableMemory;
pub use pgtable::{DmaDirection, IoPageTable, MapAttrs, PteFormat};
pub use state::{DirectState, DmaKind, DmaPath, Domain, DomainConfig, IovaState, Mapping};
