//! The virtio-drivers adapter on real hardware models: virtio-drivers' own
//! `VirtIOBlk`, over its own `PciTransport` wrapped in bare-iommu's
//! `AccessPlatform`, with bare-iommu's `IommuHal` mapping every queue and
//! buffer through a translated domain (`iommu_platform=on`: the device's DMA
//! goes through the IOMMU). Both boards run these bodies; the board brings
//! the IOMMU up, attaches the function to an `AnyDomain` and says how its
//! IOMMU reports faults ([`FaultChecks`]).
//!
//! Buffers live on this stack, not page-aligned: every request's 16-byte
//! header and 1-byte status (virtio-drivers' own, on its stack) and the data
//! buffers are shared as sub-page ranges at their offsets.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use bare_iommu::adapters::session::DomainSession;
use bare_iommu::adapters::virtio_drivers::{AccessPlatform, F_ACCESS_PLATFORM, IommuHal};
use bare_iommu::{AnyDomain, IommuBackend, TableMemory};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{Cam, DeviceFunction, MmioCam, PciRoot};
use virtio_drivers::{BufferDirection, Hal, PhysAddr as VirtioPhys};

use crate::harness::{Fail, OrFail, fail_msg};
use crate::virtio::{VirtioFunction, status};
use crate::virtio_dma::{FaultChecks, sector_byte};

/// Live transactions one session may hold (a virtqueue's three areas, a
/// request's header, data and status, with room to spare).
const LIVE: usize = 16;
/// First sector of the multi-sector read.
const READ_FIRST: usize = 64;
/// The sector overwritten (and restored).
const WRITE_SECTOR: usize = 150;
/// What a buffer holds where the device must not write.
const GUARD: u8 = 0xee;

/// A virtio function, a translated domain it is attached to (on `iommu`),
/// and the lender of DMA buffers.
pub struct DriversTest<'a, M: TableMemory, B, L: TableMemory> {
    /// The IOMMU.
    pub iommu: &'a mut B,
    /// The function's domain.
    pub dom: &'a mut AnyDomain<M>,
    /// Where `dma_alloc` (the virtqueue) takes pages from.
    pub lender: L,
    /// The virtio-blk.
    pub dev: VirtioFunction,
}

/// virtio-drivers' PCI view of the function (ECAM of the board).
fn transport<H: Hal>(dev: &VirtioFunction) -> Result<AccessPlatform<PciTransport>, Fail> {
    // SAFETY: the board's ECAM window (identity mapped), used by this test
    // alone while it runs.
    let cam = unsafe { MmioCam::new(dev.ecam as usize as *mut u8, Cam::Ecam) };
    let mut root = PciRoot::new(cam);
    let rid = dev.id.rid();
    let df = DeviceFunction {
        bus: (rid >> 8) as u8,
        device: dev.id.dev(),
        function: dev.id.func(),
    };
    let t = PciTransport::new::<H, _>(&mut root, df)
        .map_err(|e| fail_msg(format_args!("virtio-drivers PciTransport: {e}")))?;
    Ok(AccessPlatform::new(t))
}

/// The device status and the high word of the driver features, read from
/// the common configuration (virtio 1.2 §4.1.4.3).
fn device_state(dev: &VirtioFunction) -> (u8, u32) {
    let common = dev.pci.common as usize as *mut u8;
    // SAFETY: the function's common configuration structure (identity
    // mapped BAR); driver_feature_select (0x08) / driver_feature (0x0c) /
    // device_status (0x14).
    unsafe {
        common.add(0x08).cast::<u32>().write_volatile(1);
        let hi = common.add(0x0c).cast::<u32>().read_volatile();
        (common.add(0x14).read_volatile(), hi)
    }
}

fn check_sectors(buf: &[u8], first: usize, what: &str) -> Result<(), Fail> {
    for (k, sector) in buf.chunks(SECTOR_SIZE).enumerate() {
        let s = (first + k) as u64;
        for (i, &b) in sector.iter().enumerate() {
            if b != sector_byte(s, i) {
                fail!(
                    "{what}: byte {i} of sector {s} is {b:#04x}, the image has {:#04x}",
                    sector_byte(s, i)
                );
            }
        }
    }
    Ok(())
}

fn blk<H: Hal>(dev: &VirtioFunction) -> Result<VirtIOBlk<H, AccessPlatform<PciTransport>>, Fail> {
    VirtIOBlk::<H, _>::new(transport::<H>(dev)?)
        .map_err(|e| fail_msg(format_args!("VirtIOBlk::new: {e}")))
}

/// virtio-drivers' `VirtIOBlk` through `IommuHal` + `AccessPlatform`: the
/// device keeps FEATURES_OK with ACCESS_PLATFORM; four sectors read into a
/// stack buffer hold the image's bytes; a sector written from the stack
/// reads back with its new bytes and its neighbours intact; the IOMMU
/// reports no fault; every transaction is gone afterwards.
pub fn reads_and_writes<M: TableMemory, B: IommuBackend, L: TableMemory>(
    t: DriversTest<'_, M, B, L>,
    checks: &mut impl FaultChecks<B>,
) -> Result<(), Fail> {
    let dev = t.dev;
    let mut session = DomainSession::<_, _, _, LIVE>::new(t.dom, t.iommu, t.lender, u64::MAX);
    checks.before_dma(session.iommu());
    let body = IommuHal::with(&mut session, || -> Result<(), Fail> {
        let mut blk = blk::<IommuHal>(&dev)?;
        let (st, features_hi) = device_state(&dev);
        let up = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        check_eq!(st, up, "device status after VirtIOBlk::new");
        check_eq!(
            u64::from(features_hi) << 32 & F_ACCESS_PLATFORM,
            F_ACCESS_PLATFORM,
            "ACCESS_PLATFORM negotiated"
        );
        check_eq!(blk.capacity(), crate::virtio_dma::IMAGE_SECTORS, "capacity");

        // An odd offset on the stack: a sub-page buffer across a page boundary
        // at most, shared at its offset.
        let mut space = [GUARD; 4 * SECTOR_SIZE + 3];
        let buf = &mut space[3..];
        blk.read_blocks(READ_FIRST, buf).or_fail("read_blocks")?;
        check_sectors(buf, READ_FIRST, "read")?;
        narrate!(
            "VirtIOBlk read sectors {READ_FIRST}..{} into a stack buffer at {:p} through IommuHal",
            READ_FIRST + 4,
            buf.as_ptr()
        );

        let mut one = [0u8; SECTOR_SIZE];
        for (i, b) in one.iter_mut().enumerate() {
            *b = crate::pattern::pattern(0x3c, i);
        }
        blk.write_blocks(WRITE_SECTOR, &one)
            .or_fail("write_blocks")?;
        buf.fill(GUARD);
        blk.read_blocks(WRITE_SECTOR - 1, &mut buf[..3 * SECTOR_SIZE])
            .or_fail("read back")?;
        check_sectors(
            &buf[..SECTOR_SIZE],
            WRITE_SECTOR - 1,
            "read back, sector before",
        )?;
        check!(
            buf[SECTOR_SIZE..2 * SECTOR_SIZE] == one,
            "the written sector did not read back"
        );
        check_sectors(
            &buf[2 * SECTOR_SIZE..3 * SECTOR_SIZE],
            WRITE_SECTOR + 1,
            "read back, sector after",
        )?;
        check!(
            buf[3 * SECTOR_SIZE..].iter().all(|&b| b == GUARD),
            "the read back wrote past its three sectors"
        );

        // Put the image's bytes back.
        for (i, b) in one.iter_mut().enumerate() {
            *b = sector_byte(WRITE_SECTOR as u64, i);
        }
        blk.write_blocks(WRITE_SECTOR, &one).or_fail("restore")?;
        drop(blk);
        check_eq!(
            IommuHal::live(),
            Some(0),
            "transactions live after the device is dropped"
        );
        Ok(())
    });
    let faults = checks.no_faults(session.iommu());
    let down = session.teardown().or_fail("teardown");
    body.or_fail("IommuHal::with")??;
    faults?;
    down
}

/// Arms [`StaleHal`]: the next device-written share of at least a sector
/// is remembered, and unshared right after the request's last share.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The buffer [`StaleHal`] remembered: its DMA address (0: none), pointer
/// and length.
static STALE: spin::Mutex<Option<(u64, usize, usize)>> = spin::Mutex::new(None);
/// Set by [`StaleHal::share`] once it unshared the remembered buffer.
static UNSHARED: AtomicBool = AtomicBool::new(false);

/// [`IommuHal`] that unshares the armed data buffer while its request is
/// still being built, keeping the DMA address in the descriptor (the way a
/// driver that keeps an address past `unshare` would program the device).
///
/// The unshare happens in the share of the request's status byte, the last
/// buffer `VirtQueue::add` shares before it publishes the avail index: the
/// device cannot see the request before it (QEMU kicks a queue on
/// DRIVER_OK and may process it before any notify), and the freed IOVA is
/// not handed to another buffer of the request (first fit would give it to
/// the very next share).
struct StaleHal;

// SAFETY: every call is IommuHal's; the remembered buffer is unshared
// once, by `share`, and never again.
unsafe impl Hal for StaleHal {
    fn dma_alloc(pages: usize, d: BufferDirection) -> (VirtioPhys, NonNull<u8>) {
        IommuHal::dma_alloc(pages, d)
    }
    unsafe fn dma_dealloc(pa: VirtioPhys, va: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: forwarded unchanged.
        unsafe { IommuHal::dma_dealloc(pa, va, pages) }
    }
    unsafe fn mmio_phys_to_virt(pa: VirtioPhys, size: usize) -> NonNull<u8> {
        // SAFETY: forwarded unchanged.
        unsafe { IommuHal::mmio_phys_to_virt(pa, size) }
    }
    unsafe fn share(buf: NonNull<[u8]>, d: BufferDirection) -> VirtioPhys {
        // SAFETY: forwarded unchanged.
        let pa = unsafe { IommuHal::share(buf, d) };
        if d != BufferDirection::DeviceToDriver {
            return pa;
        }
        if buf.len() >= SECTOR_SIZE {
            if ARMED.swap(false, Ordering::SeqCst) {
                *STALE.lock() = Some((pa, buf.cast::<u8>().as_ptr() as usize, buf.len()));
            }
            return pa;
        }
        // The status byte: the request's last share.
        let stale = *STALE.lock();
        if let Some((spa, va, len)) = stale
            && !UNSHARED.swap(true, Ordering::SeqCst)
        {
            let data = core::ptr::slice_from_raw_parts_mut(va as *mut u8, len);
            if let Some(data) = NonNull::new(data) {
                // SAFETY: the buffer IommuHal shared at `spa` for this
                // request, still valid (the request has not returned).
                unsafe { IommuHal::unshare(spa, data, BufferDirection::DeviceToDriver) };
            }
        }
        pa
    }
    unsafe fn unshare(pa: VirtioPhys, buf: NonNull<[u8]>, d: BufferDirection) {
        let stale = STALE.lock().map(|(a, _, _)| a);
        if stale != Some(pa) {
            // SAFETY: forwarded unchanged.
            unsafe { IommuHal::unshare(pa, buf, d) }
        }
    }
}

/// A sector read the normal way lands; then a read whose data buffer was
/// unshared while its request was built, before the request was published
/// to the device (the address kept in the descriptor): the buffer keeps its
/// bytes and the IOMMU reports the device's blocked write at that
/// very address. QEMU still completes the request with VIRTIO_BLK_S_OK, so
/// `read_blocks` says Ok: only the IOMMU tells.
pub fn unshared_buffer_faults<M: TableMemory, B: IommuBackend, L: TableMemory>(
    t: DriversTest<'_, M, B, L>,
    checks: &mut impl FaultChecks<B>,
) -> Result<(), Fail> {
    let dev = t.dev;
    let mut session = DomainSession::<_, _, _, LIVE>::new(t.dom, t.iommu, t.lender, u64::MAX);
    checks.before_dma(session.iommu());
    *STALE.lock() = None;
    UNSHARED.store(false, Ordering::SeqCst);
    let body = IommuHal::with(&mut session, || -> Result<(), Fail> {
        let mut blk = blk::<StaleHal>(&dev)?;
        let mut buf = [GUARD; SECTOR_SIZE];
        blk.read_blocks(READ_FIRST, &mut buf)
            .or_fail("read while shared")?;
        check_sectors(&buf, READ_FIRST, "read while shared")?;
        Ok(())
    });
    body.or_fail("IommuHal::with")??;
    checks.no_faults(session.iommu())?;

    checks.before_dma(session.iommu());
    let mut buf = [GUARD; SECTOR_SIZE];
    let body = IommuHal::with(&mut session, || -> Result<(), Fail> {
        let mut blk = blk::<StaleHal>(&dev)?;
        ARMED.store(true, Ordering::SeqCst);
        let r = blk.read_blocks(READ_FIRST + 1, &mut buf);
        check!(
            !ARMED.load(Ordering::SeqCst),
            "the data buffer was never shared"
        );
        check!(
            UNSHARED.load(Ordering::SeqCst),
            "the status byte was never shared, so nothing was unshared before the device ran"
        );
        check_eq!(r, Ok(()), "QEMU's completion of the blocked read");
        drop(blk);
        Ok(())
    });
    let (stale, sva) = STALE.lock().take().map_or((0, 0), |(a, v, _)| (a, v));
    let down = (|| {
        body.or_fail("IommuHal::with")??;
        let changed = buf.iter().filter(|&&b| b != GUARD).count();
        check!(
            changed == 0,
            "the device wrote {changed} bytes through the unshared DMA address {stale:#x} (buffer at {:#x}, unshared at {sva:#x})",
            buf.as_ptr() as usize
        );
        check!(
            session
                .domain()
                .translate(bare_iommu::DmaAddr(stale))
                .is_none(),
            "the unshared address {stale:#x} still translates"
        );
        let r = checks.blocked_write(session.iommu(), dev.id, stale, SECTOR_SIZE as u32)?;
        narrate!(
            "read into an unshared buffer at DMA {stale:#x}: blocked, {} fault record(s), first {}",
            r.records,
            r.first
        );
        Ok(())
    })();
    let td = session.teardown().or_fail("teardown");
    down?;
    td
}
