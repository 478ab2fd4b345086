//! Linking byte ranges that are not page-aligned.
//!
//! An IOMMU maps whole 4 KiB pages. A buffer that starts or ends inside a
//! page (a virtio-blk request header on the stack, a 1-byte status) is linked
//! by mapping every page it touches; the device gets the IOVA of the page plus
//! the buffer's offset in it.
//!
//! **The rest of every touched page is exposed to the device** for as long as
//! the link lives: whatever else lies in those pages (other stack variables,
//! other buffers) can be read — and, for a [`DmaDirection::FromDevice`] or
//! [`DmaDirection::Bidirectional`] link, overwritten — by the device. Linux's
//! `dma_map_page` / `iommu_dma_map_page` does exactly the same (it maps with
//! `iova_align` to whole granules); only its swiotlb bounce path, which
//! copies a sub-granule buffer into a dedicated bounce page for untrusted
//! devices (`dev_use_swiotlb`), avoids it. This crate does not bounce: keep
//! DMA buffers page-aligned, or in pages that hold nothing secret, when the
//! device is not trusted.

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr, page_round_up};
use crate::error::DmaError;
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, MapAttrs, PteFormat};
use crate::state::{Domain, IovaState};

/// Bytes of IOVA space that `[phys, phys + len)` needs: the whole pages it
/// touches. Pass the sum for all the buffers of a transaction to
/// [`Domain::try_alloc`].
///
/// # Errors
///
/// [`DmaError::ZeroLength`] for `len == 0`, [`DmaError::Overflow`] when the
/// range wraps.
pub fn span(phys: PhysAddr, len: u64) -> Result<u64, DmaError> {
    if len == 0 {
        return Err(DmaError::ZeroLength);
    }
    phys.0
        .checked_add(len)
        .ok_or(DmaError::Overflow { a: phys.0, b: len })?;
    let off = phys.page_offset();
    off.checked_add(len)
        .and_then(page_round_up)
        .ok_or(DmaError::Overflow { a: off, b: len })
}

impl<F: PteFormat, M: TableMemory> Domain<F, M> {
    /// [`link`](Self::link) for a byte range that need not be page-aligned:
    /// links every page `[phys, phys + len)` touches at the page-aligned
    /// `offset` of the transaction and returns the device address of `phys`
    /// itself (the IOVA of its page plus `phys`'s offset in the page).
    ///
    /// The rest of each touched page is exposed to the device, as on Linux
    /// (see the [module docs](crate::unaligned)). Unlink with
    /// [`unlink_bytes`](Self::unlink_bytes) and the returned address.
    ///
    /// # Errors
    ///
    /// As [`link`](Self::link) for the page-rounded range (`offset` must be
    /// page-aligned and the pages must fit the transaction; see [`span`]);
    /// nothing changes on any error.
    pub fn link_bytes(
        &mut self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let bytes = span(phys, len)?;
        let page = self.link(tx, phys.page_base(), offset, bytes, dir, attrs)?;
        Ok(DmaAddr(page.0 + phys.page_offset()))
    }

    /// Undoes [`link_bytes`](Self::link_bytes): `dma` is the address it
    /// returned and `len` the same length. Unlinks every page the range
    /// touches; returns the bytes unlinked (whole pages).
    ///
    /// # Errors
    ///
    /// [`DmaError::OutsideTransaction`] when `dma` is not inside `tx`; else
    /// as [`unlink`](Self::unlink) (nothing changes on any error).
    pub fn unlink_bytes(
        &mut self,
        tx: &mut IovaState,
        dma: DmaAddr,
        len: u64,
    ) -> Result<u64, DmaError> {
        let offset =
            dma.page_base()
                .0
                .checked_sub(tx.iova().0)
                .ok_or(DmaError::OutsideTransaction {
                    offset: 0,
                    len,
                    size: tx.size(),
                })?;
        let bytes = span(PhysAddr(dma.0), len)?;
        debug_assert_eq!(offset % PAGE_SIZE, 0);
        self.unlink(tx, offset, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable::arm::ArmStage1;
    use crate::state::DomainConfig;
    use crate::testing::RecordingBackend;

    #[test]
    fn span_counts_every_touched_page() {
        assert_eq!(span(PhysAddr(0x1000), 0x1000), Ok(0x1000));
        assert_eq!(span(PhysAddr(0x1ff0), 0x10), Ok(0x1000));
        assert_eq!(span(PhysAddr(0x1ff0), 0x11), Ok(0x2000));
        assert_eq!(span(PhysAddr(0x1001), 0x1000), Ok(0x2000));
        assert_eq!(span(PhysAddr(0), 0), Err(DmaError::ZeroLength));
        assert!(matches!(
            span(PhysAddr(u64::MAX - 2), 8),
            Err(DmaError::Overflow { .. })
        ));
    }

    fn domain() -> Domain<ArmStage1, crate::testing::heap::HostMemory> {
        let cfg = DomainConfig {
            id: 3,
            levels: 4,
            aperture_start: 1 << 20,
            aperture_end: 1 << 32,
            coherent_walk: true,
        };
        Domain::new(ArmStage1, crate::testing::heap::HostMemory::default(), cfg).unwrap()
    }

    #[test]
    fn a_sub_page_buffer_gets_its_offset_and_both_touched_pages_translate() {
        let mut dom = domain();
        let mut tx = dom
            .try_alloc(0x4000, u64::MAX)
            .unwrap()
            .into_iova()
            .unwrap();
        // 0x20 bytes that straddle the boundary between two pages.
        let phys = PhysAddr(0x8000_0ff0);
        let dma = dom
            .link_bytes(
                &mut tx,
                phys,
                0x1000,
                0x20,
                DmaDirection::ToDevice,
                MapAttrs::empty(),
            )
            .unwrap();
        assert_eq!(dma.0, tx.iova().0 + 0x1000 + 0xff0);
        assert_eq!(tx.linked(), 0x2000);
        // The buffer's first and last byte translate to themselves...
        assert_eq!(dom.translate(dma).unwrap().0, phys);
        assert_eq!(
            dom.translate(DmaAddr(dma.0 + 0x1f)).unwrap().0,
            PhysAddr(0x8000_100f)
        );
        // ...and so does the rest of both pages: it is exposed.
        assert_eq!(
            dom.translate(DmaAddr(tx.iova().0 + 0x1000)).unwrap().0,
            PhysAddr(0x8000_0000)
        );
        assert_eq!(
            dom.translate(DmaAddr(tx.iova().0 + 0x2fff)).unwrap().0,
            PhysAddr(0x8000_1fff)
        );
        assert_eq!(dom.unlink_bytes(&mut tx, dma, 0x20), Ok(0x2000));
        assert_eq!(tx.linked(), 0);
        assert!(dom.translate(dma).is_none());
        let mut iommu = RecordingBackend::new();
        dom.destroy(tx, &mut iommu).unwrap();
    }

    #[test]
    fn an_unaligned_link_that_does_not_fit_changes_nothing() {
        let mut dom = domain();
        let mut tx = dom
            .try_alloc(0x1000, u64::MAX)
            .unwrap()
            .into_iova()
            .unwrap();
        // Two bytes across a page boundary need two pages; the transaction has one.
        assert!(matches!(
            dom.link_bytes(
                &mut tx,
                PhysAddr(0x8000_0fff),
                0,
                2,
                DmaDirection::ToDevice,
                MapAttrs::empty()
            ),
            Err(DmaError::OutsideTransaction { .. })
        ));
        assert_eq!(tx.linked(), 0);
        assert!(dom.translate(tx.iova()).is_none());
        // An address below the transaction is refused by unlink_bytes.
        assert!(matches!(
            dom.unlink_bytes(&mut tx, DmaAddr(0x10), 1),
            Err(DmaError::OutsideTransaction { .. })
        ));
        dom.free(tx).unwrap();
    }
}
