//! `virtio-drivers` (0.13) adapter: a [`Hal`] over a domain, and
//! [`AccessPlatform`], a transport wrapper that negotiates
//! `VIRTIO_F_ACCESS_PLATFORM`.
//!
//! # The global
//!
//! `virtio_drivers::Hal`'s functions are static (no `&self`), so [`IommuHal`]
//! reaches its domain through a global: [`IommuHal::with`] installs a
//! [`DmaSession`] (a [`DomainSession`](super::session::DomainSession) over the
//! device's domain and IOMMU) for the duration of a closure, behind a
//! `spin::Mutex`, and removes it before returning. Create, use **and drop**
//! virtio-drivers devices inside `with`: a `Hal` call outside any `with`
//! finds no session and fails — `share` then hands the device DMA address 0,
//! which no domain maps (so the device's DMA faults instead of reaching
//! memory), and `dma_dealloc` returns an error, which virtio-drivers turns
//! into a panic. A device kept across calls works as long as every call that
//! uses it runs inside a `with` of the same session (its live transactions
//! are the session's). One session at a time: `with` does not nest.
//!
//! # Syncs
//!
//! - `dma_alloc` (virtqueues) maps all its pages in one transaction, one sync.
//! - `share` and `unshare` see one buffer at a time and the trait gives no
//!   end-of-batch call: virtio-drivers shares a request's buffers one by one
//!   and then notifies, maybe not at all when the device suppressed
//!   notifications (`VIRTIO_RING_F_EVENT_IDX`), so the notify is no safe
//!   batch boundary. Each `share` therefore costs one sync (the device may
//!   look at the buffer any time after it returns) and each `unshare` one
//!   sync (the buffer is the CPU's again when it returns). A share's sync
//!   only publishes the new entries (no command, no completion wait, except
//!   on VT-d in caching mode); an unshare's waits for one completion. A
//!   virtio-blk read is three shares and three unshares: three waits.
//! - Buffers need not be page-aligned: a buffer's pages are linked and its
//!   DMA address carries its offset. The rest of each touched page is
//!   exposed to the device (see [`crate::unaligned`]), as on Linux.
//!
//! # ACCESS_PLATFORM
//!
//! virtio-drivers never negotiates `VIRTIO_F_ACCESS_PLATFORM` (bit 33). A
//! device that offers it (QEMU's `iommu_platform=on`) refuses FEATURES_OK
//! without it; one that does not is accessed with physical addresses,
//! bypassing the IOMMU. Wrap the transport in [`AccessPlatform`]: it accepts
//! the bit whenever the device offers it, so the device's DMA goes through
//! the IOMMU and the addresses [`IommuHal`] hands out are the ones it uses.
//!
//! ```ignore
//! let mut session = DomainSession::<_, _, _, 32>::new(&mut dom, &mut smmu, &lender, u64::MAX);
//! IommuHal::with(&mut session, || {
//!     let transport = AccessPlatform::new(PciTransport::new::<IommuHal, _>(&mut root, df)?);
//!     let mut blk = VirtIOBlk::<IommuHal, _>::new(transport)?;
//!     blk.read_blocks(0, &mut buf)?;
//!     Ok(())
//! })?;
//! ```

use core::ptr::NonNull;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr as VirtioPhys};

use super::session::{AdapterError, DmaSession};
use crate::addr::{DmaAddr, PhysAddr};
use crate::pgtable::DmaDirection;

/// `VIRTIO_F_ACCESS_PLATFORM` (virtio 1.2 §6: feature bit 33): the device
/// accesses memory through the platform's IOMMU.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// The installed session: a lifetime-erased pointer, present only while
/// [`IommuHal::with`] runs.
struct Slot(Option<NonNull<dyn DmaSession>>);

// SAFETY: the pointer is only dereferenced with the mutex held, and only
// while `with` — which holds the exclusive borrow it came from — runs.
unsafe impl Send for Slot {}

static SESSION: spin::Mutex<Slot> = spin::Mutex::new(Slot(None));

/// The `virtio_drivers::Hal` over the session [`with`](IommuHal::with)
/// installed (see the [module docs](self) for the global it needs).
pub struct IommuHal;

/// Removes the session when `with` ends, however it ends.
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        SESSION.lock().0 = None;
    }
}

impl IommuHal {
    /// Runs `f` with `session` installed as the one every [`IommuHal`] call
    /// uses, and removes it before returning.
    ///
    /// # Errors
    ///
    /// [`AdapterError::AlreadyInstalled`] when called inside another `with`
    /// (`f` is not run).
    pub fn with<R>(session: &mut dyn DmaSession, f: impl FnOnce() -> R) -> Result<R, AdapterError> {
        {
            let mut slot = SESSION.lock();
            if slot.0.is_some() {
                return Err(AdapterError::AlreadyInstalled);
            }
            let p: NonNull<dyn DmaSession + '_> = NonNull::from(session);
            // SAFETY: only the lifetime changes. The pointer is removed (by
            // `Uninstall`, also on unwind) before this function returns, that
            // is while the exclusive borrow of `session` is still held, so it
            // is never used after the session could move or die.
            let p: NonNull<dyn DmaSession + 'static> = unsafe { core::mem::transmute(p) };
            slot.0 = Some(p);
        }
        let _guard = Uninstall;
        Ok(f())
    }

    /// Runs `op` on the installed session, if any.
    fn call<R>(
        op: impl FnOnce(&mut dyn DmaSession) -> Result<R, AdapterError>,
    ) -> Result<R, AdapterError> {
        let slot = SESSION.lock();
        let Some(mut p) = slot.0 else {
            return Err(AdapterError::NotInstalled);
        };
        // SAFETY: installed by `with`, whose exclusive borrow is live while
        // the pointer is present; the mutex (held until `op` returns) makes
        // this the only reference.
        op(unsafe { p.as_mut() })
    }

    /// Transactions the installed session holds live (`None`: none installed).
    pub fn live() -> Option<usize> {
        Self::call(|s| Ok(s.live())).ok()
    }
}

/// virtio's direction as the device sees it.
pub fn direction(d: BufferDirection) -> DmaDirection {
    match d {
        BufferDirection::DriverToDevice => DmaDirection::ToDevice,
        BufferDirection::DeviceToDriver => DmaDirection::FromDevice,
        BufferDirection::Both => DmaDirection::Bidirectional,
    }
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned, lender-owned pages that
// nothing else uses until `dma_dealloc`; `share` maps exactly the buffer's
// pages and `unshare` unmaps them (with a completed sync) before returning;
// `mmio_phys_to_virt` is the session's map of BARs.
unsafe impl Hal for IommuHal {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (VirtioPhys, NonNull<u8>) {
        match Self::call(|s| s.alloc(pages, self::direction(direction))) {
            Ok((dma, va)) => (dma.0, va),
            // virtio-drivers reads DMA address 0 as "no memory".
            Err(_) => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: VirtioPhys, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        match Self::call(|s| s.dealloc(DmaAddr(paddr), pages)) {
            Ok(()) => 0,
            Err(_) => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: VirtioPhys, size: usize) -> NonNull<u8> {
        Self::call(|s| {
            s.mmio_phys_to_virt(PhysAddr(paddr), size)
                .ok_or(AdapterError::NoPhysical { va: paddr as usize })
        })
        .unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> VirtioPhys {
        // SAFETY: virtio-drivers keeps the buffer valid until `unshare`.
        match Self::call(|s| unsafe { s.share(buffer, self::direction(direction)) }) {
            Ok(dma) => dma.0,
            // The trait cannot fail: address 0 is below every domain's
            // aperture, so the device's DMA to it faults instead of landing.
            Err(_) => 0,
        }
    }

    unsafe fn unshare(paddr: VirtioPhys, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Nothing to copy back: the device wrote the buffer itself. An
        // unknown address (a failed share's 0) has nothing to undo.
        let _ = Self::call(|s| s.unshare(DmaAddr(paddr)));
    }
}

/// A transport that accepts `VIRTIO_F_ACCESS_PLATFORM` whenever the device
/// offers it, on top of what the driver negotiates; everything else is
/// forwarded to `T` unchanged.
#[derive(Debug)]
pub struct AccessPlatform<T: Transport> {
    inner: T,
    offered: u64,
    written: u64,
}

impl<T: Transport> AccessPlatform<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            offered: 0,
            written: 0,
        }
    }

    /// The features the driver wrote last (with ACCESS_PLATFORM when offered).
    pub fn driver_features(&self) -> u64 {
        self.written
    }

    /// The wrapped transport.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: Transport> Transport for AccessPlatform<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.offered = self.inner.read_device_features();
        self.offered
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        // virtio 1.2 §6.1: a driver that can work through the IOMMU SHOULD
        // accept ACCESS_PLATFORM when offered; the device MAY refuse
        // FEATURES_OK without it (QEMU with iommu_platform=on does).
        self.written = driver_features | (self.offered & F_ACCESS_PLATFORM);
        self.inner.write_driver_features(self.written);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: VirtioPhys,
        driver_area: VirtioPhys,
        device_area: VirtioPhys,
    ) {
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<C: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<C> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<C: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: C,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::adapters::session::DomainSession;
    use crate::any_domain::{AnyDomain, AnyFormat};
    use crate::state::DomainConfig;
    use crate::testing::RecordingBackend;
    use crate::testing::heap::HostMemory;

    /// `IommuHal` has one global: its tests take turns.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn domain() -> AnyDomain<HostMemory> {
        let cfg = DomainConfig {
            id: 4,
            levels: 4,
            aperture_start: 1 << 20,
            aperture_end: 1 << 40,
            coherent_walk: true,
        };
        AnyDomain::new(AnyFormat::ArmStage2, HostMemory::default(), cfg).unwrap()
    }

    fn translates(dom: &AnyDomain<HostMemory>, dma: u64) -> Option<u64> {
        dom.translate(DmaAddr(dma)).map(|(pa, _)| pa.0)
    }

    #[test]
    fn a_sub_page_buffer_is_shared_at_its_offset_and_unshared_by_that_address() {
        let _serial = SERIAL.lock().unwrap();
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let lender = HostMemory::default();
        // A 16-byte request header inside a larger (stack) buffer.
        let mut stack = [0u8; 64];
        let header = NonNull::from(&mut stack[8..24]);
        let va = header.cast::<u8>().as_ptr() as u64;
        let dma = {
            let mut s = DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, &lender, u64::MAX);
            IommuHal::with(&mut s, || {
                // SAFETY: `stack` outlives the share.
                let dma = unsafe { IommuHal::share(header, BufferDirection::DriverToDevice) };
                assert_ne!(dma, 0);
                assert_eq!(dma % 4096, va % 4096, "the DMA address keeps the offset");
                assert_eq!(IommuHal::live(), Some(1));
                dma
            })
            .unwrap()
        };
        // Between the scopes the mapping stays live, translates to the header...
        assert_eq!(translates(&dom, dma), Some(va));
        assert_eq!(
            (iommu.syncs, iommu.publishes),
            (0, 1),
            "a share only publishes its table writes: no completion wait"
        );
        let mut s = DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, &lender, u64::MAX);
        // ...but a new session does not know it: the live table is per session.
        IommuHal::with(&mut s, || {
            // SAFETY: as above.
            unsafe { IommuHal::unshare(dma, header, BufferDirection::DriverToDevice) };
            assert_eq!(IommuHal::live(), Some(0));
        })
        .unwrap();
        assert_eq!(s.teardown(), Ok(()));
        drop(s);
        assert_eq!(
            translates(&dom, dma),
            Some(va),
            "an unknown address unshares nothing"
        );
    }

    #[test]
    fn share_unshare_and_alloc_dealloc_map_exactly_while_live() {
        let _serial = SERIAL.lock().unwrap();
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let lender = HostMemory::default();
        let mut buf = std::vec![0u8; 3 * 4096 + 100];
        let b = NonNull::from(&mut buf[50..50 + 2 * 4096]);
        let va = b.cast::<u8>().as_ptr() as u64;
        let mut s = DomainSession::<_, _, _, 8>::new(&mut dom, &mut iommu, &lender, u64::MAX);
        let (ring, ring_va, dma) = IommuHal::with(&mut s, || {
            let (ring, ring_va) = IommuHal::dma_alloc(2, BufferDirection::Both);
            assert_ne!(ring, 0);
            // SAFETY: `buf` outlives the share.
            let dma = unsafe { IommuHal::share(b, BufferDirection::DeviceToDriver) };
            (ring, ring_va, dma)
        })
        .unwrap();
        assert_eq!(
            (s.iommu().syncs, s.iommu().publishes),
            (0, 2),
            "an alloc and a share each publish, neither waits"
        );
        let dom_ref = s.domain();
        assert_eq!(
            translates(dom_ref, ring + 4096),
            Some(ring_va.as_ptr() as u64 + 4096)
        );
        // Every byte of the buffer translates to itself, first and last.
        assert_eq!(translates(dom_ref, dma), Some(va));
        assert_eq!(
            translates(dom_ref, dma + 2 * 4096 - 1),
            Some(va + 2 * 4096 - 1)
        );
        let writable = dom_ref.translate(DmaAddr(dma)).unwrap().1;
        assert!(writable.contains(crate::MapAttrs::WRITE));
        IommuHal::with(&mut s, || {
            // SAFETY: the pair from `dma_alloc` / `share` above.
            unsafe {
                IommuHal::unshare(dma, b, BufferDirection::DeviceToDriver);
                assert_eq!(IommuHal::dma_dealloc(ring, ring_va, 2), 0);
                // Twice is an error, not a double free.
                assert_eq!(IommuHal::dma_dealloc(ring, ring_va, 2), -1);
            }
        })
        .unwrap();
        assert_eq!(s.iommu().syncs, 2, "one sync per unshare, one per dealloc");
        assert_eq!(translates(s.domain(), dma), None);
        assert_eq!(translates(s.domain(), ring), None);
        drop(s);
        assert_eq!(lender.blocks_out(), 0, "dealloc gave the ring pages back");
    }

    #[test]
    fn outside_a_session_share_hands_out_an_unmapped_address_and_scopes_do_not_nest() {
        let _serial = SERIAL.lock().unwrap();
        let mut x = [0u8; 8];
        // SAFETY: `x` outlives the call.
        let dma = unsafe { IommuHal::share(NonNull::from(&mut x[..]), BufferDirection::Both) };
        assert_eq!(dma, 0);
        assert_eq!(IommuHal::dma_alloc(1, BufferDirection::Both).0, 0);
        assert_eq!(IommuHal::live(), None);
        let mut dom = domain();
        let mut iommu = RecordingBackend::new();
        let lender = HostMemory::default();
        let mut s = DomainSession::<_, _, _, 1>::new(&mut dom, &mut iommu, &lender, u64::MAX);
        let mut dom2 = domain();
        let mut iommu2 = RecordingBackend::new();
        let mut s2 = DomainSession::<_, _, _, 1>::new(&mut dom2, &mut iommu2, &lender, u64::MAX);
        let nested = IommuHal::with(&mut s, || IommuHal::with(&mut s2, || ()).err()).unwrap();
        assert_eq!(nested, Some(AdapterError::AlreadyInstalled));
        // A full live table: the second share fails and leaves nothing mapped.
        let mut y = [0u8; 8];
        IommuHal::with(&mut s, || {
            // SAFETY: `x` and `y` outlive the session.
            unsafe {
                assert_ne!(
                    IommuHal::share(NonNull::from(&mut x[..]), BufferDirection::Both),
                    0
                );
                assert_eq!(
                    IommuHal::share(NonNull::from(&mut y[..]), BufferDirection::Both),
                    0
                );
            }
        })
        .unwrap();
        assert_eq!(s.live(), 1);
        assert!(!s.domain().has_pending());
        assert_eq!(s.teardown(), Ok(()));
        assert_eq!(s.live(), 0);
    }

    /// A transport that offers `offered` and records what the driver wrote.
    struct Fake {
        offered: u64,
        written: u64,
        status: DeviceStatus,
    }

    impl Transport for Fake {
        fn device_type(&self) -> DeviceType {
            DeviceType::Block
        }
        fn read_device_features(&mut self) -> u64 {
            self.offered
        }
        fn write_driver_features(&mut self, f: u64) {
            self.written = f;
        }
        fn max_queue_size(&mut self, _: u16) -> u32 {
            16
        }
        fn notify(&mut self, _: u16) {}
        fn get_status(&self) -> DeviceStatus {
            self.status
        }
        fn set_status(&mut self, s: DeviceStatus) {
            // Like QEMU under iommu_platform=on: no FEATURES_OK without bit 33.
            self.status = if self.written & F_ACCESS_PLATFORM == 0 {
                s - DeviceStatus::FEATURES_OK
            } else {
                s
            };
        }
        fn set_guest_page_size(&mut self, _: u32) {}
        fn requires_legacy_layout(&self) -> bool {
            false
        }
        fn queue_set(&mut self, _: u16, _: u32, _: u64, _: u64, _: u64) {}
        fn queue_unset(&mut self, _: u16) {}
        fn queue_used(&mut self, _: u16) -> bool {
            false
        }
        fn ack_interrupt(&mut self) -> InterruptStatus {
            InterruptStatus::empty()
        }
        fn read_config_generation(&self) -> u32 {
            0
        }
        fn read_config_space<C: zerocopy::FromBytes + zerocopy::IntoBytes>(
            &self,
            _: usize,
        ) -> virtio_drivers::Result<C> {
            Err(virtio_drivers::Error::ConfigSpaceMissing)
        }
        fn write_config_space<C: zerocopy::IntoBytes + zerocopy::Immutable>(
            &mut self,
            _: usize,
            _: C,
        ) -> virtio_drivers::Result<()> {
            Ok(())
        }
    }

    bitflags::bitflags! {
        /// What a driver supports (here: VERSION_1 only).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        struct Flags: u64 {
            const VERSION_1 = 1 << 32;
        }
    }

    #[test]
    fn access_platform_is_accepted_when_offered_so_features_ok_sticks() {
        const VERSION_1: u64 = 1 << 32;
        let fake = || Fake {
            offered: VERSION_1 | F_ACCESS_PLATFORM | 1 << 5,
            written: 0,
            status: DeviceStatus::empty(),
        };
        // virtio-drivers alone: the device refuses FEATURES_OK.
        let mut bare = fake();
        let got = bare.begin_init(Flags::VERSION_1);
        assert_eq!(got, Flags::VERSION_1);
        assert!(!bare.get_status().contains(DeviceStatus::FEATURES_OK));
        // Wrapped: bit 33 is accepted on top of what the driver chose.
        let mut t = AccessPlatform::new(fake());
        t.begin_init(Flags::VERSION_1);
        assert_eq!(t.driver_features(), VERSION_1 | F_ACCESS_PLATFORM);
        assert!(t.get_status().contains(DeviceStatus::FEATURES_OK));
        // Not offered: not written.
        let mut t = AccessPlatform::new(Fake {
            offered: VERSION_1,
            ..fake()
        });
        t.begin_init(Flags::VERSION_1);
        assert_eq!(t.into_inner().written, VERSION_1);
    }
}
