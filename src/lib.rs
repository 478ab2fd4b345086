#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
//! bare-iommu: ARM SMMUv3 and Intel VT-d for bare-metal hypervisors, unikernels
//! and firmware, with a two-step DMA mapping API.
//!
//! 1. [`Domain::try_alloc`] one IOVA range for a whole transaction,
//! 2. [`Domain::link`] physical ranges into it at offsets,
//! 3. [`Domain::sync`] once (one batched invalidation, one completion wait),
//! 4. [`Domain::unlink`] all or part, then [`Domain::free`] (by value).
//!
//! The transaction state ([`IovaState`]) records what was linked and how, so
//! unlink and free do exactly the inverse of link.
//!
//! ```
//! use bare_iommu::pgtable::arm::ArmStage1;
//! use bare_iommu::testing::RecordingBackend;
//! use bare_iommu::{DeviceId, DmaDirection, DmaPath, Domain, DomainConfig, IommuBackend, MapAttrs, PhysAddr, TableMemory};
//!
//! // The user lends table memory (here: the host heap, physical = virtual).
//! struct Heap;
//! // SAFETY: zeroed, size-aligned blocks that stay valid until freed.
//! unsafe impl TableMemory for Heap {
//!     fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
//!         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).ok()?;
//!         // SAFETY: non-zero size.
//!         let p = unsafe { std::alloc::alloc_zeroed(l) };
//!         (!p.is_null()).then(|| PhysAddr(p as u64))
//!     }
//!     unsafe fn free(&self, pa: PhysAddr, pages: usize) {
//!         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).unwrap();
//!         // SAFETY: allocated above with this layout.
//!         unsafe { std::alloc::dealloc(pa.0 as *mut u8, l) }
//!     }
//!     fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 { pa.0 as *mut u8 }
//! }
//!
//! # fn main() -> Result<(), bare_iommu::DmaError> {
//! // A real backend is `smmuv3::Smmu` or `vtd::Vtd`; this one records calls.
//! let mut iommu = RecordingBackend::new();
//! let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 1 << 20, aperture_end: 1 << 32, coherent_walk: true };
//! let mut dom = Domain::new(ArmStage1, Heap, cfg)?;
//! let dev = DeviceId::new(0, 0, 5, 0).unwrap();
//! iommu.attach(dev, dom.attachment())?;
//!
//! // 1. one IOVA range for the whole transaction
//! let DmaPath::Iova(mut tx) = dom.try_alloc(3 * 4096, u64::MAX)? else { unreachable!() };
//! // 2. link scattered pages at offsets: tables only, no waiting
//! dom.link(&mut tx, PhysAddr(0x8000_0000), 0, 4096, DmaDirection::FromDevice, MapAttrs::empty())?;
//! dom.link(&mut tx, PhysAddr(0x8123_4000), 4096, 2 * 4096, DmaDirection::FromDevice, MapAttrs::empty())?;
//! // 3. one sync
//! dom.sync(&mut iommu)?;
//! let device_address = tx.iova(); // program the device with this
//! # let _ = device_address;
//! // 4. unlink part, sync, then free the rest (free unlinks what is still linked)
//! dom.unlink(&mut tx, 4096, 4096)?;
//! assert_eq!(tx.linked(), 2 * 4096);
//! dom.destroy(tx, &mut iommu)?;
//! assert_eq!(iommu.syncs, 2);
//! # Ok(()) }
//! ```

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod addr;
pub mod backend;
pub mod barrier;
pub mod device;
pub mod error;
pub mod firmware;
pub mod iova;
mod logging;
pub mod mem;
pub mod p2p;
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
