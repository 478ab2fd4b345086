#![no_std]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
#![warn(clippy::missing_errors_doc)]
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
//! // Links alone need no invalidation: only the destroy waited.
//! assert_eq!(iommu.syncs, 1);
//! # Ok(()) }
//! ```
//!
//! # Where to start
//!
//! - [`Domain`]: one address space (its page tables and IOVA allocator) and
//!   the DMA API above.
//! - [`IovaState`] / [`DmaPath`] / [`Mapping`]: what a transaction hands back.
//! - [`TableMemory`]: the one trait you implement, lending memory for tables
//!   and queues.
//! - [`IommuBackend`]: what a driver does for a domain; [`smmuv3::Smmu`] and
//!   [`vtd::Vtd`] implement it, [`testing::RecordingBackend`] records calls
//!   for host tests.
//! - [`p2p::P2pRegistry`]: peer-to-peer DMA between PCI devices.
//! - [`shared`]: several CPUs — the concurrency model (what is `Send` /
//!   `Sync`, what to hold, what may run in interrupt context) and the
//!   wrappers that share a driver and a domain.
//!
//! # Features
//!
//! None is on by default; the library is `no_std` and needs no allocator
//! without them.
//!
//! | Feature | What it adds |
//! |---------|--------------|
//! | `defmt` | [`defmt::Format`](https://docs.rs/defmt/latest/defmt/trait.Format.html) on every public data type (addresses, configurations, states, errors, events, statistics), and the crate's own debug/warning messages go through `defmt`. |
//! | `log`   | The crate's own debug/warning messages go through the [`log`](https://docs.rs/log) facade (ignored when `defmt` is also on). |
//! | `alloc` | Conveniences that need a global allocator: [`mem::GlobalAllocMemory`][gam], a [`TableMemory`] lender for identity-mapped hosts. |
//! | `virtio-drivers` | `adapters::virtio_drivers`: a `virtio_drivers::Hal` over a domain and a transport wrapper that negotiates `VIRTIO_F_ACCESS_PLATFORM`. |
//! | `dma-api` | `adapters::dma_api`: a `dma_api::DmaOp` over a domain. dma-api 0.10 needs Rust 1.88 or later (above this crate's MSRV) and a global allocator. |
//!
//! With neither `defmt` nor `log` the crate's messages compile to nothing.
//! Errors never depend on a feature: every error type implements
//! [`core::fmt::Display`] and [`core::error::Error`].
//!
#![cfg_attr(feature = "alloc", doc = "[gam]: mem::GlobalAllocMemory")]
#![cfg_attr(
    not(feature = "alloc"),
    doc = "[gam]: https://docs.rs/bare-iommu/latest/bare_iommu/mem/struct.GlobalAllocMemory.html"
)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod adapters;
pub mod addr;
pub mod any_domain;
pub mod backend;
pub mod barrier;
pub mod bringup;
mod derive_check;
pub mod device;
pub mod error;
pub mod firmware;
pub mod guest;
pub mod iova;
pub mod live;
mod logging;
pub mod mem;
pub mod msi;
pub mod p2p;
pub mod pgtable;
#[cfg(target_has_atomic = "64")]
pub mod shared;
pub mod smmuv3;
pub mod state;
pub mod testing;
pub mod unaligned;
pub mod vtd;

pub use addr::{BusAddr, DmaAddr, PAGE_SIZE, PhysAddr};
pub use any_domain::{AnyDomain, AnyFormat};
pub use backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
pub use device::DeviceId;
pub use error::{BackendError, DmaError, PageTableError};
pub use mem::TableMemory;
pub use pgtable::{DmaDirection, IoPageTable, MapAttrs, PteFormat, TableReclaim};
pub use state::{
    DirectState, DmaKind, DmaPath, Domain, DomainConfig, IovaState, Mapping, VTD_INTERRUPT_WINDOW,
};
