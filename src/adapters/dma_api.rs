//! `dma-api` (0.10) adapter: [`IommuDmaOp`], a [`DmaOp`] over a domain.
//!
//! dma-api's `DeviceDma` hands every allocation and streaming mapping to a
//! `&'static dyn DmaOp` and gives it back by handle; [`IommuDmaOp`] turns
//! those calls into transactions of a [`DmaSession`] (a
//! [`DomainSession`](super::session::DomainSession) over the device's domain
//! and IOMMU), which finds each one again by the DMA address in the handle.
//!
//! # The session
//!
//! `DmaOp` takes `&self` and `DeviceDma` needs it `'static`, `Sync` and
//! `Send`: keep the [`IommuDmaOp`] in a `static` (its constructor is
//! `const`) and lend it a session for the duration of a closure with
//! [`IommuDmaOp::with`], so the domain and the IOMMU need not be `'static`
//! themselves. Every call takes the op's `spin::Mutex`, so any number of
//! `DeviceDma` clones on any number of CPUs share one session safely.
//! Create, use **and drop** the dma-api buffers inside `with`: a call
//! outside any `with` finds no session — an allocation or a mapping fails,
//! and a buffer dropped then stays mapped (its pages stay lent) until the
//! session's [`teardown`](super::session::DomainSession::teardown). One
//! session per op at a time (`with` does not nest); one op per device (or per
//! group of devices that share a domain).
//!
//! # Syncs: where the trait allows batching, and where it does not
//!
//! `DmaOp` 0.10 hands over exactly one buffer per call and has no call that
//! ends a batch, so every call is its own transaction with its own sync:
//!
//! - `alloc_contiguous` (`ContiguousArray`, `ContiguousBox`, …): all the
//!   pages of one allocation in one transaction, one sync — the batch the
//!   trait allows. The DMA direction is not part of the call, so allocations
//!   are mapped read-write.
//! - `map_streaming` (`StreamingMap`): one sync per buffer. The device may
//!   use the address as soon as the call returns (the driver writes it to a
//!   register next), and `sync_map_for_device` is no safe place to defer it
//!   to: a driver may skip it (nothing forces a `FromDevice` buffer's
//!   `prepare_for_device`), and it runs again on every reuse of the mapping.
//!   The sync only publishes the new entries (no command and no completion
//!   wait, except on VT-d in caching mode).
//! - `unmap_streaming` / `dealloc_contiguous`: one sync per buffer, waiting
//!   for one completion: the buffer is the CPU's (or the allocator's) again
//!   when the call returns, so the IOMMU must have forgotten it by then.
//!
//! A driver that has several buffers to hand over together gets one sync
//! for all of them by taking one allocation and slicing it.
//!
//! # What the adapter refuses
//!
//! `DmaOp` reports failure only as `None` / `dma_api::DmaError`, which has
//! no variant for an IOMMU refusal: every [`AdapterError`]
//! becomes `None` or [`DmaError::NoMemory`] (logged through the crate's log
//! feature).
//!
//! - An allocation alignment above [`PAGE_SIZE`]: the lender hands out pages,
//!   so the CPU pointer could not honour it.
//! - `alloc_coherent` always fails: the adapter cannot give a non-coherent
//!   device an uncached CPU alias. Describe a cache-coherent device as
//!   `DmaCoherency::Coherent` (`DeviceDma` then never asks for one), or use
//!   contiguous buffers, whose `prepare_for_device` / `complete_for_cpu`
//!   clean and invalidate the CPU caches (dma-api's default `flush` /
//!   `invalidate`, kept here).
//! - Addresses beyond the constraint's `addr_mask`: the session hands out
//!   IOVAs up to its own mask; a narrower device mask is checked after the
//!   fact and the buffer given back.
//! - Mappings are exposed by page: a sub-page streaming buffer's DMA address
//!   keeps its offset, and the rest of its pages is reachable by the device,
//!   as on Linux (see [`crate::unaligned`]).
//!
//! ```ignore
//! static OP: IommuDmaOp = IommuDmaOp::new();
//!
//! let mut session = DomainSession::<_, _, _, 32>::new(&mut dom, &mut iommu, &lender, mask);
//! OP.with(&mut session, || {
//!     let info = DmaDeviceInfo::new(
//!         DmaDomainId::Translated(NonZeroU64::new(1).unwrap()),
//!         DmaCoherency::Coherent,
//!         DmaConstraints::new(mask),
//!     );
//!     let dev = DeviceDma::new(info, &OP);
//!     let mut buf = dev.contiguous_array_zero::<u8>(4096, DmaDirection::FromDevice)?;
//!     // hand buf.dma_addr() to the device ...
//!     Ok(())
//! })?;
//! ```

use core::alloc::Layout;
use core::num::NonZeroUsize;
use core::ptr::NonNull;

use dma_api::{
    DmaAddr as ApiAddr, DmaAllocHandle, DmaConstraints, DmaDirection as ApiDirection, DmaError,
    DmaMapHandle, DmaOp,
};

use super::session::{AdapterError, DmaSession};
use crate::addr::{DmaAddr, PAGE_SIZE};
use crate::pgtable::DmaDirection;

/// The lent session: a lifetime-erased pointer, present only while
/// [`IommuDmaOp::with`] runs.
struct Slot(Option<NonNull<dyn DmaSession + Send>>);

// SAFETY: the pointer is only dereferenced with the op's mutex held, and only
// while `with` — which holds the exclusive borrow it came from — runs; the
// session itself is `Send`, so using it from another CPU is allowed.
unsafe impl Send for Slot {}

/// A [`DmaOp`] over the [`DmaSession`] that [`with`](IommuDmaOp::with) lends
/// it (see the [module docs](self)).
pub struct IommuDmaOp {
    slot: spin::Mutex<Slot>,
}

impl Default for IommuDmaOp {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes the session when `with` ends, however it ends.
struct Uninstall<'a>(&'a IommuDmaOp);

impl Drop for Uninstall<'_> {
    fn drop(&mut self) {
        self.0.slot.lock().0 = None;
    }
}

impl IommuDmaOp {
    /// An op with no session: every call fails until [`with`](Self::with).
    pub const fn new() -> Self {
        Self {
            slot: spin::Mutex::new(Slot(None)),
        }
    }

    /// Runs `f` with `session` lent to this op, and takes it back before
    /// returning.
    ///
    /// # Errors
    ///
    /// [`AdapterError::AlreadyInstalled`] when this op already has a session
    /// (`f` is not run).
    pub fn with<R>(
        &self,
        session: &mut (dyn DmaSession + Send),
        f: impl FnOnce() -> R,
    ) -> Result<R, AdapterError> {
        {
            let mut slot = self.slot.lock();
            if slot.0.is_some() {
                return Err(AdapterError::AlreadyInstalled);
            }
            let p: NonNull<dyn DmaSession + Send + '_> = NonNull::from(session);
            // SAFETY: only the lifetime changes. The pointer is removed (by
            // `Uninstall`, also on unwind) before this function returns, that
            // is while the exclusive borrow of `session` is still held, so it
            // is never used after the session could move or die.
            let p: NonNull<dyn DmaSession + Send + 'static> = unsafe { core::mem::transmute(p) };
            slot.0 = Some(p);
        }
        let _guard = Uninstall(self);
        Ok(f())
    }

    /// Transactions the lent session holds live (`None`: no session).
    pub fn live(&self) -> Option<usize> {
        self.call(|s| Ok(s.live())).ok()
    }

    /// Runs `op` on the lent session, if any.
    fn call<R>(
        &self,
        op: impl FnOnce(&mut dyn DmaSession) -> Result<R, AdapterError>,
    ) -> Result<R, AdapterError> {
        let slot = self.slot.lock();
        let Some(mut p) = slot.0 else {
            return Err(AdapterError::NotInstalled);
        };
        // SAFETY: lent by `with`, whose exclusive borrow is live while the
        // pointer is present; the mutex (held until `op` returns) makes this
        // the only reference.
        op(unsafe { p.as_mut() })
    }
}

/// dma-api's direction as the device sees it.
pub fn direction(d: ApiDirection) -> DmaDirection {
    match d {
        ApiDirection::ToDevice => DmaDirection::ToDevice,
        ApiDirection::FromDevice => DmaDirection::FromDevice,
        ApiDirection::Bidirectional => DmaDirection::Bidirectional,
    }
}

/// Pages that hold `bytes` (at least one byte).
fn pages_for(bytes: usize) -> Option<usize> {
    if bytes == 0 {
        return None;
    }
    Some(bytes.div_ceil(PAGE_SIZE as usize))
}

/// Whether `[dma, dma + len)` lies at or below `mask`.
fn within(dma: DmaAddr, len: usize, mask: u64) -> bool {
    (len as u64)
        .checked_sub(1)
        .and_then(|l| dma.0.checked_add(l))
        .is_some_and(|end| end <= mask)
}

fn refused(what: &str, e: AdapterError) {
    let _ = (what, e);
    crate::logging::log_warn!("dma-api adapter: {} refused: {:?}", what, e);
}

// SAFETY (the `unsafe fn`s' contracts): an allocation's pages are zeroed,
// lender-owned and mapped for the device until `dealloc_contiguous`, which
// unmaps them and waits for the IOMMU before giving them back; a streaming
// mapping covers exactly the buffer's pages until `unmap_streaming`, which
// unmaps them and waits for the IOMMU before returning.
impl DmaOp for IommuDmaOp {
    fn page_size(&self) -> usize {
        PAGE_SIZE as usize
    }

    unsafe fn alloc_contiguous(
        &self,
        constraints: DmaConstraints,
        layout: Layout,
    ) -> Option<DmaAllocHandle> {
        let pages = pages_for(layout.size())?;
        if layout.align() > PAGE_SIZE as usize || constraints.align > PAGE_SIZE as usize {
            return None;
        }
        let r = self.call(|s| {
            let (dma, va) = s.alloc(pages, DmaDirection::Bidirectional)?;
            if !within(dma, layout.size(), constraints.addr_mask) {
                let _ = s.dealloc(dma, pages);
                return Err(AdapterError::Dma(crate::error::DmaError::AboveDmaMask {
                    size: (pages as u64) * PAGE_SIZE,
                    mask: constraints.addr_mask,
                }));
            }
            Ok((dma, va))
        });
        match r {
            Ok((dma, va)) => {
                // SAFETY: `va` is the CPU address of the zeroed pages the
                // session lent (no alias), `dma` their device address, and
                // `layout` fits in them.
                let h = unsafe { DmaAllocHandle::new(va, va, ApiAddr::from(dma.0), layout) };
                Some(h)
            }
            Err(e) => {
                refused("alloc_contiguous", e);
                None
            }
        }
    }

    unsafe fn dealloc_contiguous(&self, handle: DmaAllocHandle) {
        let Some(pages) = pages_for(handle.size()) else {
            return;
        };
        let dma = DmaAddr(handle.dma_addr().as_u64());
        if let Err(e) = self.call(|s| s.dealloc(dma, pages)) {
            // The trait cannot fail: the pages stay mapped and lent (never
            // reused) until the session's teardown.
            refused("dealloc_contiguous", e);
        }
    }

    unsafe fn alloc_coherent(
        &self,
        _constraints: DmaConstraints,
        _layout: Layout,
    ) -> Option<DmaAllocHandle> {
        // No uncached CPU alias to give (see the module docs).
        None
    }

    unsafe fn dealloc_coherent(&self, handle: DmaAllocHandle) -> Result<(), DmaError> {
        // `alloc_coherent` hands nothing out; a handle from elsewhere is
        // released like an allocation when the session knows it.
        let pages = pages_for(handle.size()).ok_or(DmaError::ZeroSizedBuffer)?;
        let dma = DmaAddr(handle.dma_addr().as_u64());
        self.call(|s| s.dealloc(dma, pages)).map_err(|e| {
            refused("dealloc_coherent", e);
            DmaError::CoherentReleaseFailed
        })
    }

    unsafe fn map_streaming(
        &self,
        constraints: DmaConstraints,
        addr: NonNull<u8>,
        size: NonZeroUsize,
        direction: ApiDirection,
    ) -> Result<DmaMapHandle, DmaError> {
        let layout = Layout::from_size_align(size.get(), constraints.align.max(1))?;
        let buf = NonNull::slice_from_raw_parts(addr, size.get());
        let dir = self::direction(direction);
        let dma = self
            .call(|s| {
                // SAFETY: per `map_streaming`'s contract the buffer stays live
                // until `unmap_streaming`, which unshares it.
                let dma = unsafe { s.share(buf, dir) }?;
                if !within(dma, size.get(), constraints.addr_mask) {
                    let _ = s.unshare(dma);
                    return Ok(Err(DmaError::DmaMaskNotMatch {
                        addr: ApiAddr::from(dma.0),
                        mask: constraints.addr_mask,
                    }));
                }
                Ok(Ok(dma))
            })
            .map_err(|e| {
                refused("map_streaming", e);
                DmaError::NoMemory
            })??;
        // SAFETY: `addr` is the caller's buffer, live until `unmap_streaming`;
        // no bounce buffer: the device reaches the buffer itself.
        Ok(unsafe { DmaMapHandle::new(addr, ApiAddr::from(dma.0), layout, None) })
    }

    unsafe fn unmap_streaming(&self, handle: DmaMapHandle) {
        let dma = DmaAddr(handle.dma_addr().as_u64());
        if let Err(e) = self.call(|s| s.unshare(dma)) {
            // The trait cannot fail; nothing was unmapped (see the module docs).
            refused("unmap_streaming", e);
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use core::num::NonZeroU64;

    use dma_api::{DeviceDma, DmaCoherency, DmaDeviceInfo, DmaDomainId};

    use super::*;
    use crate::adapters::session::DomainSession;
    use crate::any_domain::{AnyDomain, AnyFormat};
    use crate::state::DomainConfig;
    use crate::testing::RecordingBackend;
    use crate::testing::heap::HostMemory;

    const APERTURE: u64 = 1 << 20;

    fn domain() -> AnyDomain<HostMemory> {
        let cfg = DomainConfig {
            id: 5,
            levels: 4,
            aperture_start: APERTURE,
            aperture_end: 1 << 40,
            coherent_walk: true,
        };
        AnyDomain::new(AnyFormat::ArmStage2, HostMemory::default(), cfg).unwrap()
    }

    fn device(op: &'static IommuDmaOp, coherency: DmaCoherency, mask: u64) -> DeviceDma {
        let id = DmaDomainId::Translated(NonZeroU64::new(5).unwrap());
        DeviceDma::new(
            DmaDeviceInfo::new(id, coherency, DmaConstraints::new(mask)),
            op,
        )
    }

    fn translates(dom: &AnyDomain<HostMemory>, dma: u64) -> Option<u64> {
        dom.translate(DmaAddr(dma)).map(|(pa, _)| pa.0)
    }

    #[test]
    fn a_contiguous_array_is_one_transaction_and_its_drop_unmaps_it() {
        static OP: IommuDmaOp = IommuDmaOp::new();
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let mut s =
            DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, HostMemory::default(), u64::MAX);
        let (dma, va) = OP
            .with(&mut s, || {
                let dev = device(&OP, DmaCoherency::Coherent, u64::MAX);
                // Three pages: one transaction, one sync.
                let arr = dev
                    .contiguous_array_zero::<u8>(3 * 4096 - 100, ApiDirection::FromDevice)
                    .unwrap();
                assert_eq!(OP.live(), Some(1));
                assert!(arr.as_slice_cpu().iter().all(|b| *b == 0));
                let out = (arr.dma_addr().as_u64(), arr.as_ptr().as_ptr() as u64);
                core::mem::forget(arr);
                out
            })
            .unwrap();
        // Between the scopes the mapping stays live: every page translates.
        for p in 0..3 {
            assert_eq!(translates(s.domain(), dma + p * 4096), Some(va + p * 4096));
        }
        assert!(dma >= APERTURE);
        assert_eq!(
            (s.iommu().syncs, s.iommu().publishes),
            (0, 1),
            "one allocation: its table writes published once, no completion wait"
        );
        // Its release through the trait unmaps it and waits once.
        OP.with(&mut s, || {
            let layout = Layout::from_size_align(3 * 4096 - 100, 1).unwrap();
            let va = NonNull::new(va as usize as *mut u8).unwrap();
            // SAFETY: the handle alloc_contiguous returned, rebuilt.
            let h = unsafe { DmaAllocHandle::new(va, va, ApiAddr::from(dma), layout) };
            // SAFETY: released once; nothing uses it any more.
            unsafe { OP.dealloc_contiguous(h) };
            assert_eq!(OP.live(), Some(0));
        })
        .unwrap();
        for p in 0..3 {
            assert_eq!(translates(s.domain(), dma + p * 4096), None);
        }
        assert_eq!(s.iommu().syncs, 1, "the release waited for the IOMMU once");
    }

    #[test]
    fn a_sub_page_streaming_buffer_is_mapped_at_its_offset_until_dropped() {
        static OP: IommuDmaOp = IommuDmaOp::new();
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let mut s =
            DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, HostMemory::default(), u64::MAX);
        let mut stack = [0u8; 64];
        let va = stack[8..24].as_ptr() as u64;
        let mut seen = None;
        OP.with(&mut s, || {
            let dev = device(&OP, DmaCoherency::Coherent, u64::MAX);
            let map = dev
                .map_streaming_slice(&mut stack[8..24], 1, ApiDirection::ToDevice)
                .unwrap();
            let dma = map.dma_addr().as_u64();
            assert_eq!(dma % 4096, va % 4096, "the DMA address keeps the offset");
            assert_eq!(OP.live(), Some(1));
            seen = Some(dma);
            drop(map);
            assert_eq!(OP.live(), Some(0));
        })
        .unwrap();
        let dma = seen.unwrap();
        assert_eq!(translates(s.domain(), dma), None, "unmapped on drop");
        assert_eq!(
            (s.iommu().publishes, s.iommu().syncs),
            (1, 1),
            "a map publishes once, an unmap waits once"
        );
    }

    #[test]
    fn a_live_mapping_translates_to_the_buffer() {
        static OP: IommuDmaOp = IommuDmaOp::new();
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let mut s =
            DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, HostMemory::default(), u64::MAX);
        let mut buf = std::vec![0u32; 2048];
        let va = buf.as_ptr() as u64;
        let dma = OP
            .with(&mut s, || {
                let dev = device(&OP, DmaCoherency::Coherent, u64::MAX);
                let map = dev
                    .map_streaming_slice(&mut buf, 4, ApiDirection::Bidirectional)
                    .unwrap();
                let dma = map.dma_addr().as_u64();
                core::mem::forget(map);
                dma
            })
            .unwrap();
        assert_eq!(translates(s.domain(), dma), Some(va));
        assert_eq!(translates(s.domain(), dma + 8191), Some(va + 8191));
        s.teardown().unwrap();
        assert_eq!(translates(s.domain(), dma), None);
    }

    #[test]
    fn calls_without_a_session_fail_and_sessions_do_not_nest() {
        static OP: IommuDmaOp = IommuDmaOp::new();
        let dev = device(&OP, DmaCoherency::Coherent, u64::MAX);
        assert_eq!(
            dev.contiguous_array_zero::<u8>(16, ApiDirection::ToDevice)
                .err(),
            Some(DmaError::NoMemory)
        );
        let mut b = [0u8; 16];
        assert_eq!(
            dev.map_streaming_slice(&mut b, 1, ApiDirection::ToDevice)
                .err(),
            Some(DmaError::NoMemory)
        );
        assert_eq!(OP.live(), None);
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let mut s =
            DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, HostMemory::default(), u64::MAX);
        let mut dom2 = domain();
        let mut iommu2 = RecordingBackend::new();
        let mut s2 = DomainSession::<_, _, _, 8>::new(
            &mut dom2,
            &mut iommu2,
            HostMemory::default(),
            u64::MAX,
        );
        let nested = OP.with(&mut s, || OP.with(&mut s2, || ()).err()).unwrap();
        assert_eq!(nested, Some(AdapterError::AlreadyInstalled));
        assert_eq!(OP.live(), None, "the session is taken back after with");
    }

    #[test]
    fn what_the_adapter_cannot_honour_is_refused_and_nothing_stays_mapped() {
        static OP: IommuDmaOp = IommuDmaOp::new();
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let mut s =
            DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, HostMemory::default(), u64::MAX);
        OP.with(&mut s, || {
            // A device mask below the domain's aperture: no IOVA fits.
            let narrow = device(&OP, DmaCoherency::Coherent, APERTURE - 1);
            assert!(matches!(
                narrow.contiguous_array_zero::<u8>(64, ApiDirection::ToDevice),
                Err(DmaError::NoMemory)
            ));
            let mut b = [0u8; 64];
            assert!(matches!(
                narrow.map_streaming_slice(&mut b, 1, ApiDirection::ToDevice),
                Err(DmaError::DmaMaskNotMatch { .. })
            ));
            let dev = device(&OP, DmaCoherency::Coherent, u64::MAX);
            // Alignment beyond a page: the lender's pages cannot honour it.
            assert!(
                dev.contiguous_array_zero_with_align::<u8>(64, 2 * 4096, ApiDirection::ToDevice)
                    .is_err()
            );
            // A non-coherent device's coherent memory: no uncached alias.
            let nc = device(&OP, DmaCoherency::NonCoherent, u64::MAX);
            assert_eq!(
                nc.coherent_array_zero::<u8>(64).err(),
                Some(DmaError::NoMemory)
            );
            // ... but a coherent device's coherent memory is contiguous memory.
            let c = dev.coherent_array_zero::<u8>(64).unwrap();
            assert_eq!(OP.live(), Some(1));
            drop(c);
            assert_eq!(OP.live(), Some(0));
        })
        .unwrap();
    }
}
