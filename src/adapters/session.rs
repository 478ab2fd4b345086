//! [`DmaSession`]: what a consumer trait's DMA calls need, in one
//! object-safe trait, and [`DomainSession`], its implementation over an
//! [`AnyDomain`], an IOMMU backend and a lender of DMA buffers.
//!
//! Consumer traits hand over one buffer at a time and take it back by DMA
//! address only. A [`DomainSession`] therefore:
//!
//! - gives every buffer its own transaction (`try_alloc` of the pages it
//!   touches, `link` / [`link_bytes`](crate::Domain::link_bytes), one `sync`),
//!   and records it in a [`LiveTable`] under the DMA address it returns —
//!   with the buffer's sub-page offset, so sub-page buffers (virtio-blk's
//!   request header on the stack) work; the rest of each touched page is
//!   exposed to the device, as on Linux (see [`crate::unaligned`]);
//! - on unshare, finds the transaction by that address, unlinks and frees
//!   it, and syncs before returning, so the buffer is the CPU's alone again.
//!
//! A buffer that is virtually contiguous but physically scattered is linked
//! page by page at consecutive IOVAs (one table walk per physically
//! contiguous run), so the device still sees one contiguous range.

use core::fmt;
use core::ptr::NonNull;

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::any_domain::AnyDomain;
use crate::backend::IommuBackend;
use crate::error::DmaError;
use crate::live::{LiveError, LiveTable};
use crate::mem::TableMemory;
use crate::pgtable::{DmaDirection, MapAttrs};
use crate::state::IovaState;

/// Why an adapter could not do what its consumer asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum AdapterError {
    /// The domain refused (no IOVA space, no table memory, backend failure, …).
    Dma(DmaError),
    /// The live-transaction table is full, or the address is not live.
    Live(LiveError),
    /// The CPU address has no physical address (`virt_to_phys` said `None`).
    NoPhysical {
        /// The CPU address.
        va: usize,
    },
    /// The lender has no DMA memory for `pages` pages.
    OutOfMemory {
        /// Pages asked for.
        pages: usize,
    },
    /// A zero-length buffer or a zero-page allocation.
    Empty,
    /// No session is installed (the adapter's global is empty).
    NotInstalled,
    /// A session is already installed: adapters' scopes do not nest.
    AlreadyInstalled,
}

impl From<DmaError> for AdapterError {
    fn from(e: DmaError) -> Self {
        AdapterError::Dma(e)
    }
}

impl From<LiveError> for AdapterError {
    fn from(e: LiveError) -> Self {
        AdapterError::Live(e)
    }
}

impl fmt::Display for AdapterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdapterError::Dma(e) => write!(f, "DMA mapping failed: {e:?}"),
            AdapterError::Live(e) => write!(f, "{e}"),
            AdapterError::NoPhysical { va } => {
                write!(f, "CPU address {va:#x} has no physical address")
            }
            AdapterError::OutOfMemory { pages } => write!(f, "no DMA memory for {pages} page(s)"),
            AdapterError::Empty => write!(f, "zero-length DMA buffer"),
            AdapterError::NotInstalled => write!(f, "no DMA session installed"),
            AdapterError::AlreadyInstalled => write!(f, "a DMA session is already installed"),
        }
    }
}

impl core::error::Error for AdapterError {}

/// The DMA operations consumer traits need, object-safe so an adapter's
/// global can hold any session. [`DomainSession`] implements it.
pub trait DmaSession {
    /// `pages` zeroed, physically contiguous pages mapped for `dir`: their
    /// DMA address and a CPU pointer. One transaction, one sync.
    ///
    /// # Errors
    ///
    /// [`AdapterError::OutOfMemory`] when the lender is empty, else what the
    /// domain or the live table refused; nothing is left behind on error.
    fn alloc(
        &mut self,
        pages: usize,
        dir: DmaDirection,
    ) -> Result<(DmaAddr, NonNull<u8>), AdapterError>;

    /// Undoes [`alloc`](Self::alloc): unlinks, syncs, then returns the pages.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Live`] when `dma` was not handed out by `alloc`;
    /// else what the domain refused (the pages are then kept, not reused).
    fn dealloc(&mut self, dma: DmaAddr, pages: usize) -> Result<(), AdapterError>;

    /// Maps an existing buffer for `dir` (one transaction, one sync) and
    /// returns the DMA address of its first byte.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Empty`] for an empty buffer,
    /// [`AdapterError::NoPhysical`] when a page has no physical address,
    /// else what the domain or the live table refused; nothing is left
    /// mapped on error.
    ///
    /// # Safety
    ///
    /// `buf` must stay valid and unmoved until [`unshare`](Self::unshare).
    unsafe fn share(
        &mut self,
        buf: NonNull<[u8]>,
        dir: DmaDirection,
    ) -> Result<DmaAddr, AdapterError>;

    /// Undoes [`share`](Self::share) for the address it returned: unlinks,
    /// frees and syncs, so the device can no longer reach the buffer.
    ///
    /// # Errors
    ///
    /// [`AdapterError::Live`] when `dma` is not a live shared address; else
    /// what the domain refused.
    fn unshare(&mut self, dma: DmaAddr) -> Result<(), AdapterError>;

    /// A CPU pointer to `size` bytes of device MMIO at `pa` (a BAR).
    fn mmio_phys_to_virt(&self, pa: PhysAddr, size: usize) -> Option<NonNull<u8>>;

    /// Transactions live (shared buffers and allocations).
    fn live(&self) -> usize;
}

/// One live transaction of a [`DomainSession`].
struct Live {
    tx: IovaState,
    /// Pages taken from the lender by `alloc`, if this is an allocation.
    lent: Option<(PhysAddr, usize)>,
}

/// Converts a CPU address to the physical address the IOMMU output must be.
pub type VirtToPhys = fn(usize) -> Option<PhysAddr>;
/// Converts a physical MMIO range (a BAR) to a CPU pointer.
pub type MmioToVirt = fn(PhysAddr, usize) -> Option<NonNull<u8>>;

/// The identity map: physical address = CPU address (MMU off, or a 1:1 map).
pub fn identity_virt_to_phys(va: usize) -> Option<PhysAddr> {
    Some(PhysAddr(va as u64))
}

/// The identity map for MMIO: CPU pointer = physical address.
pub fn identity_mmio(pa: PhysAddr, _size: usize) -> Option<NonNull<u8>> {
    NonNull::new(pa.0 as usize as *mut u8)
}

/// A [`DmaSession`] over a translated [`AnyDomain`] and its IOMMU `B`, with
/// DMA buffers from the lender `L` and up to `N` live transactions.
pub struct DomainSession<
    'a,
    M: TableMemory,
    B: IommuBackend + ?Sized,
    L: TableMemory,
    const N: usize,
> {
    dom: &'a mut AnyDomain<M>,
    iommu: &'a mut B,
    lender: L,
    dma_mask: u64,
    virt_to_phys: VirtToPhys,
    mmio: MmioToVirt,
    live: LiveTable<Live, N>,
}

impl<'a, M: TableMemory, B: IommuBackend + ?Sized, L: TableMemory, const N: usize>
    DomainSession<'a, M, B, L, N>
{
    /// A session on `dom` (attached to the device through `iommu`), handing
    /// out IOVAs at or below `dma_mask` and DMA buffers from `lender`, with an
    /// identity CPU map; change it with [`with_cpu_map`](Self::with_cpu_map).
    pub fn new(dom: &'a mut AnyDomain<M>, iommu: &'a mut B, lender: L, dma_mask: u64) -> Self {
        Self {
            dom,
            iommu,
            lender,
            dma_mask,
            virt_to_phys: identity_virt_to_phys,
            mmio: identity_mmio,
            live: LiveTable::new(),
        }
    }

    /// Uses `virt_to_phys` for buffers and `mmio` for BARs instead of the
    /// identity map.
    pub fn with_cpu_map(mut self, virt_to_phys: VirtToPhys, mmio: MmioToVirt) -> Self {
        self.virt_to_phys = virt_to_phys;
        self.mmio = mmio;
        self
    }

    /// The domain.
    pub fn domain(&mut self) -> &mut AnyDomain<M> {
        self.dom
    }

    /// The IOMMU.
    pub fn iommu(&mut self) -> &mut B {
        self.iommu
    }

    /// The transaction live at `dma` (an address `share`/`alloc` returned).
    pub fn transaction(&self, dma: DmaAddr) -> Option<&IovaState> {
        self.live.get(dma).map(|l| &l.tx)
    }

    /// Unlinks, frees and syncs every transaction still live (buffers the
    /// consumer never gave back), returning lent pages to the lender. Call it
    /// after the device was reset or detached.
    ///
    /// # Errors
    ///
    /// The first failure; the rest is still torn down.
    pub fn teardown(&mut self) -> Result<(), AdapterError> {
        let mut first = Ok(());
        while let Some((_, l)) = self.live.pop() {
            if let Err(e) = self.finish(l) {
                first = first.and(Err(e));
            }
        }
        first
    }

    fn finish(&mut self, l: Live) -> Result<(), AdapterError> {
        self.dom.destroy(l.tx, self.iommu)?;
        if let Some((pa, pages)) = l.lent {
            // SAFETY: the block came from `alloc_zeroed(pages)` of this lender,
            // and the sync in `destroy` completed: the IOMMU cannot reach it.
            unsafe { self.lender.free(pa, pages) };
        }
        Ok(())
    }

    /// Links `tx` and records it; on any failure gives everything back.
    fn commit(
        &mut self,
        mut tx: IovaState,
        link: impl FnOnce(&mut AnyDomain<M>, &mut IovaState) -> Result<DmaAddr, DmaError>,
        lent: Option<(PhysAddr, usize)>,
    ) -> Result<DmaAddr, AdapterError> {
        let linked = link(self.dom, &mut tx).and_then(|a| self.dom.sync(self.iommu).map(|()| a));
        let dma = match linked {
            Ok(a) => a,
            Err(e) => {
                let _ = self.dom.destroy(tx, self.iommu);
                return Err(e.into());
            }
        };
        if let Err((l, e)) = self.live.insert(dma, Live { tx, lent }) {
            let _ = self.dom.destroy(l.tx, self.iommu);
            return Err(e.into());
        }
        Ok(dma)
    }

    fn alloc_tx(&mut self, bytes: u64) -> Result<IovaState, AdapterError> {
        self.dom
            .try_alloc(bytes, self.dma_mask)?
            .into_iova()
            .ok_or(AdapterError::Dma(DmaError::IdentityDomain))
    }
}

impl<M: TableMemory, B: IommuBackend + ?Sized, L: TableMemory, const N: usize> DmaSession
    for DomainSession<'_, M, B, L, N>
{
    fn alloc(
        &mut self,
        pages: usize,
        dir: DmaDirection,
    ) -> Result<(DmaAddr, NonNull<u8>), AdapterError> {
        if pages == 0 {
            return Err(AdapterError::Empty);
        }
        let bytes = (pages as u64)
            .checked_mul(PAGE_SIZE)
            .ok_or(AdapterError::OutOfMemory { pages })?;
        let pa = self
            .lender
            .alloc_zeroed(pages)
            .ok_or(AdapterError::OutOfMemory { pages })?;
        let va = NonNull::new(self.lender.phys_to_virt(pa));
        let r = match (va, self.alloc_tx(bytes)) {
            (Some(va), Ok(tx)) => self
                .commit(
                    tx,
                    |d, tx| d.link(tx, pa, 0, bytes, dir, MapAttrs::empty()),
                    Some((pa, pages)),
                )
                .map(|dma| (dma, va)),
            (None, Ok(tx)) => {
                let _ = self.dom.free(tx);
                Err(AdapterError::NoPhysical { va: 0 })
            }
            (_, Err(e)) => Err(e),
        };
        if r.is_err() {
            // SAFETY: never linked (or unlinked and synced): the IOMMU
            // cannot reach it.
            unsafe { self.lender.free(pa, pages) };
        }
        r
    }

    fn dealloc(&mut self, dma: DmaAddr, pages: usize) -> Result<(), AdapterError> {
        match self.live.get(dma) {
            Some(l) if l.lent.map(|(_, p)| p) == Some(pages) => {}
            _ => return Err(LiveError::Unknown { addr: dma }.into()),
        }
        let l = self.live.remove(dma)?;
        self.finish(l)
    }

    unsafe fn share(
        &mut self,
        buf: NonNull<[u8]>,
        dir: DmaDirection,
    ) -> Result<DmaAddr, AdapterError> {
        let len = buf.len();
        if len == 0 {
            return Err(AdapterError::Empty);
        }
        let va = buf.cast::<u8>().as_ptr() as usize;
        let first = va & !(PAGE_SIZE as usize - 1);
        let end = va.checked_add(len).ok_or(AdapterError::Empty)?;
        let bytes = crate::unaligned::span(PhysAddr(va as u64), len as u64)?;
        let v2p = self.virt_to_phys;
        let start_pa = v2p(va).ok_or(AdapterError::NoPhysical { va })?;
        // Every page must have a physical address before anything is linked.
        let mut page = first + PAGE_SIZE as usize;
        while page < end {
            v2p(page).ok_or(AdapterError::NoPhysical { va: page })?;
            page += PAGE_SIZE as usize;
        }
        let tx = self.alloc_tx(bytes)?;
        self.commit(
            tx,
            |d, tx| {
                // Runs of physically contiguous pages, each linked in one call.
                let mut page = first;
                let mut run_va = first;
                let mut run_pa = start_pa.page_base();
                while page < end {
                    let next = page + PAGE_SIZE as usize;
                    let contiguous = next < end
                        && v2p(next).map(|p| p.0) == Some(run_pa.0 + (next - run_va) as u64);
                    if !contiguous {
                        let off = (run_va - first) as u64;
                        d.link(
                            tx,
                            run_pa,
                            off,
                            (next - run_va) as u64,
                            dir,
                            MapAttrs::empty(),
                        )?;
                        if next < end {
                            run_va = next;
                            // Checked above: every page has a physical address.
                            run_pa = v2p(next).unwrap_or(PhysAddr(0)).page_base();
                        }
                    }
                    page = next;
                }
                Ok(DmaAddr(tx.iova().0 + start_pa.page_offset()))
            },
            None,
        )
    }

    fn unshare(&mut self, dma: DmaAddr) -> Result<(), AdapterError> {
        match self.live.get(dma) {
            Some(l) if l.lent.is_none() => {}
            _ => return Err(LiveError::Unknown { addr: dma }.into()),
        }
        let l = self.live.remove(dma)?;
        self.finish(l)
    }

    fn mmio_phys_to_virt(&self, pa: PhysAddr, size: usize) -> Option<NonNull<u8>> {
        (self.mmio)(pa, size)
    }

    fn live(&self) -> usize {
        self.live.len()
    }
}
