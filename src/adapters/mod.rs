//! Adapters to consumer crates' DMA traits, each behind the cargo feature of
//! the consumer crate's name, built only on this crate's public API.
//!
//! - `virtio-drivers` (module `virtio_drivers`): `IommuHal`, a
//!   `virtio_drivers::Hal` over a domain, and `AccessPlatform`, a transport
//!   wrapper that negotiates `VIRTIO_F_ACCESS_PLATFORM`.
//! - `dma-api` (module `dma_api`): `IommuDmaOp`, a `dma_api::DmaOp` over a
//!   domain (the feature needs Rust 1.88 or later, above the crate's MSRV).
//!
//! Both rest on [`session`]: a domain, its IOMMU, a lender for DMA buffers and
//! a [`LiveTable`](crate::live::LiveTable) that finds a transaction again from
//! the DMA address a trait hands back.

#[cfg(feature = "dma-api")]
#[cfg_attr(docsrs, doc(cfg(feature = "dma-api")))]
pub mod dma_api;
pub mod session;
#[cfg(feature = "virtio-drivers")]
#[cfg_attr(docsrs, doc(cfg(feature = "virtio-drivers")))]
pub mod virtio_drivers;
