//! Adapters to consumer crates' DMA traits, each behind the cargo feature of
//! the consumer crate's name, built only on this crate's public API.
//!
//! - `virtio-drivers` (module `virtio_drivers`): `IommuHal`, a
//!   `virtio_drivers::Hal` over a domain, and `AccessPlatform`, a transport
//!   wrapper that negotiates `VIRTIO_F_ACCESS_PLATFORM`.
//!
//! Both rest on [`session`]: a domain, its IOMMU, a lender for DMA buffers and
//! a [`LiveTable`](crate::live::LiveTable) that finds a transaction again from
//! the DMA address a trait hands back.

pub mod session;
#[cfg(feature = "virtio-drivers")]
#[cfg_attr(docsrs, doc(cfg(feature = "virtio-drivers")))]
pub mod virtio_drivers;
