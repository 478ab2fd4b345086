//! The virtio-blk test flow both boards run: a real storage device's DMA
//! through tables this crate wrote.
//!
//! The xtask gives QEMU a 1 MiB raw disk image ([`IMAGE_SECTORS`] sectors,
//! sector `s` filled with [`sector_byte`]`(s, i)`, recreated before every
//! run) behind a `virtio-blk-pci` with `iommu_platform=on`. The board sets
//! up the IOMMU and a translated domain with the virtio function attached,
//! lends fresh pages and says, with [`FaultChecks`], how its IOMMU reports
//! faults; [`reads_and_writes`] and [`unlinked_buffer_faults`] are the test
//! bodies. One transaction holds everything the device touches: the
//! virtqueue page, the request header/status page and [`DATA_PAGES`]
//! separate data pages, linked with `link` / `link_pages` and synced once.

use bare_iommu::{
    DeviceId, DmaDirection, Domain, IommuBackend, IovaState, MapAttrs, PAGE_SIZE, PhysAddr,
    PteFormat, TableMemory,
};

use crate::edu::DmaBudget;
use crate::harness::{Fail, OrFail};
use crate::p2p::Reported;
use crate::pattern::{Mismatch, check_with, fill_with, pattern};
use crate::virtio::{
    BlkOp, BlkRequest, Completion, DmaBuf, F_ACCESS_PLATFORM, F_VERSION_1, SECTOR_SIZE,
    VIRTIO_BLK_S_OK, VirtioBlk, VirtioPci, status,
};

/// Sectors of the disk image the xtask writes (1 MiB).
pub const IMAGE_SECTORS: u64 = 2048;
/// Separate data pages linked into the transaction.
pub const DATA_PAGES: usize = 4;
/// Sectors one data page holds.
const SECTORS_PER_PAGE: u64 = PAGE_SIZE / SECTOR_SIZE as u64;
/// First sector of the multi-page read.
const READ_FIRST: u64 = 64;
/// The sector the write test overwrites (and restores).
const WRITE_SECTOR: u64 = 130;
/// Pattern seed of the bytes written to [`WRITE_SECTOR`].
const NEW_SEED: u8 = 0xc3;
/// Pattern seed of the data pages that must not be written to the disk.
const DECOY_SEED: u8 = 0x17;
/// What data pages hold where nothing may land.
const GUARD: u8 = 0xee;

const PAGE: usize = PAGE_SIZE as usize;
/// IOVA offsets in the transaction: ring page, header page, data pages.
const RING_OFF: u64 = 0;
const HEADER_OFF: u64 = PAGE_SIZE;
const DATA_OFF: u64 = 2 * PAGE_SIZE;
/// Where the status byte lies in the header page.
const STATUS_OFF: usize = 0x800;

/// Byte `i` of sector `sector` of the disk image: the sector number (8 bytes,
/// little endian), then a pattern of the index and the sector number, so a
/// sector read from the wrong place, or shifted, shows. The xtask
/// (`xtask/src/disk.rs`) writes the same bytes.
pub fn sector_byte(sector: u64, i: usize) -> u8 {
    if i < 8 {
        return (sector >> (8 * i)) as u8;
    }
    (i as u8)
        ^ ((i >> 8) as u8).wrapping_mul(0x3d)
        ^ (sector as u8).wrapping_mul(0x65)
        ^ ((sector >> 8) as u8).wrapping_mul(0x9b)
        ^ 0x5a
}

/// How the board's IOMMU `B` reports faults.
pub trait FaultChecks<B> {
    /// Before a DMA whose faults the test checks: drops what the IOMMU
    /// recorded earlier.
    fn before_dma(&mut self, iommu: &mut B);

    /// Fails if the IOMMU recorded a fault since [`before_dma`](Self::before_dma).
    fn no_faults(&mut self, iommu: &mut B) -> Result<(), Fail>;

    /// Fails unless the IOMMU reported a blocked write by `dev` into
    /// `[iova, iova + len)`, and nothing else.
    fn blocked_write(
        &mut self,
        iommu: &mut B,
        dev: DeviceId,
        iova: u64,
        len: u32,
    ) -> Result<Reported, Fail>;
}

/// Fresh, zeroed, identity-mapped pages the board lends to one test.
#[derive(Clone, Copy)]
pub struct Pages {
    /// The virtqueue (descriptor table, available and used rings).
    pub ring: PhysAddr,
    /// Request header at 0, status byte at 0x800.
    pub header: PhysAddr,
    /// Data pages (separate physical pages, consecutive IOVAs).
    pub data: [PhysAddr; DATA_PAGES],
}

/// One virtio test's setting: the function `dev` attached to `dom` on `iommu`.
pub struct VirtioTest<'a, F: PteFormat, M: TableMemory, B> {
    /// The IOMMU.
    pub iommu: &'a mut B,
    /// A translated domain with `dev` attached.
    pub dom: &'a mut Domain<F, M>,
    /// The virtio function (StreamID / source-id).
    pub dev: DeviceId,
    /// Where its virtio structures are.
    pub pci: VirtioPci,
    /// How long one request may take.
    pub budget: DmaBudget,
    /// The pages it may use.
    pub pages: Pages,
}

fn ptr(pa: PhysAddr) -> *mut u8 {
    pa.get() as usize as *mut u8
}

/// Fills `len` bytes at `pa + off` with `byte(i)`.
fn fill(pa: PhysAddr, off: usize, len: usize, byte: impl Fn(usize) -> u8) {
    assert!(off + len <= PAGE, "fill past a page");
    // SAFETY: a page the board lent this test (identity mapped), inside it.
    unsafe { fill_with(ptr(pa).add(off), len, byte) }
}

/// Checks `len` bytes at `pa + off` against `byte(i)`.
fn check(pa: PhysAddr, off: usize, len: usize, byte: impl Fn(usize) -> u8) -> Result<(), Mismatch> {
    assert!(off + len <= PAGE, "check past a page");
    let at = PhysAddr(pa.get() + off as u64);
    // SAFETY: as in `fill`.
    unsafe { check_with(ptr(pa).add(off), at, len, byte) }
}

/// Checks that data page `page` holds sectors `first..` of the image from
/// byte `off` for `sectors` sectors.
fn check_image(
    pages: &Pages,
    page: usize,
    off: usize,
    first: u64,
    sectors: u64,
) -> Result<(), Fail> {
    let pa = *pages.data.get(page).or_fail("data page")?;
    for s in 0..sectors {
        let at = off + s as usize * SECTOR_SIZE;
        let sector = first + s;
        check_ok!(
            check(pa, at, SECTOR_SIZE, |i| sector_byte(sector, i)),
            "data page {page} at {at:#x}: not sector {sector} of the image"
        );
    }
    Ok(())
}

/// Checks that data page `page` holds [`GUARD`] in `[off, PAGE)`.
fn check_guard(pages: &Pages, page: usize, off: usize, what: &str) -> Result<(), Fail> {
    let pa = *pages.data.get(page).or_fail("data page")?;
    check_ok!(
        check(pa, off, PAGE - off, |_| GUARD),
        "{what}: data page {page} changed past {off:#x}"
    );
    Ok(())
}

/// The driver's view of the lent pages, at the transaction's IOVA.
struct Bufs {
    header: DmaBuf,
    status: DmaBuf,
    /// IOVA of data page 0 (data page `k` at `+ k * PAGE_SIZE`).
    data: u64,
}

impl Bufs {
    fn request(&self, op: BlkOp, sector: u64, data_off: u64, data_len: usize) -> BlkRequest {
        BlkRequest {
            op,
            sector,
            header: self.header,
            data_dma: self.data + data_off,
            data_len,
            status: self.status,
        }
    }
}

/// Allocates one IOVA range for the ring page, the header page and the data
/// pages; links the first two with `link` and the data pages with one
/// `link_pages`; syncs once; brings the device up with its queue at the
/// ring page's IOVA.
fn setup<F: PteFormat, M: TableMemory, B: IommuBackend>(
    t: &mut VirtioTest<'_, F, M, B>,
) -> Result<(IovaState, VirtioBlk, Bufs), Fail> {
    let size = DATA_OFF + DATA_PAGES as u64 * PAGE_SIZE;
    let mut tx = t
        .dom
        .try_alloc(size, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated transaction")?;
    let dir = DmaDirection::Bidirectional;
    let p = t.pages;
    let linked = (|| {
        let ring = t
            .dom
            .link(&mut tx, p.ring, RING_OFF, PAGE_SIZE, dir, MapAttrs::empty())
            .or_fail("link ring page")?;
        let header = t
            .dom
            .link(
                &mut tx,
                p.header,
                HEADER_OFF,
                PAGE_SIZE,
                dir,
                MapAttrs::empty(),
            )
            .or_fail("link header page")?;
        let data = t
            .dom
            .link_pages(&mut tx, &p.data, DATA_OFF, dir, MapAttrs::empty())
            .or_fail("link_pages data pages")?;
        t.dom.sync(t.iommu).or_fail("sync")?;
        Ok::<_, Fail>((ring, header, data))
    })();
    let (ring, header, data) = match linked {
        Ok(v) => v,
        Err(e) => {
            let _ = t.dom.destroy(tx, t.iommu);
            return Err(e);
        }
    };
    narrate!(
        "{}: one transaction at {}: ring page {} -> {}, header page {} -> {}, data pages {} -> {:x?} (link_pages), synced once",
        t.dev,
        tx.iova(),
        ring,
        p.ring,
        header,
        p.header,
        data,
        p.data.map(|pa| pa.get())
    );
    // SAFETY: the ring page is lent to this test (identity mapped, page
    // aligned) and used for nothing else.
    let ring_buf = unsafe { DmaBuf::new(ptr(p.ring), ring.get()) };
    // SAFETY: `pci` is the board's enabled virtio function, driven by this
    // test only; the ring page is lent to this test, page aligned, and the
    // device reaches it at `ring` through the tables just synced.
    let blk = match unsafe { VirtioBlk::init(t.pci, ring_buf, t.budget) } {
        Ok(b) => b,
        Err(e) => {
            let _ = t.dom.destroy(tx, t.iommu);
            fail!("virtio-blk init: {e}");
        }
    };
    // SAFETY: the header page is lent to this test (identity mapped): the
    // header at its start, the status byte at STATUS_OFF.
    let bufs = unsafe {
        Bufs {
            header: DmaBuf::new(ptr(p.header), header.get()),
            status: DmaBuf::new(
                ptr(p.header).add(STATUS_OFF),
                header.get() + STATUS_OFF as u64,
            ),
            data: data.get(),
        }
    };
    Ok((tx, blk, bufs))
}

/// Runs `body` on a device brought up by [`setup`]; then, whatever it
/// returned, resets the device (it stops all DMA) and destroys the
/// transaction. The board detaches the function.
fn with_device<F: PteFormat, M: TableMemory, B: IommuBackend>(
    mut t: VirtioTest<'_, F, M, B>,
    body: impl FnOnce(
        &mut VirtioTest<'_, F, M, B>,
        &mut VirtioBlk,
        &Bufs,
        &mut IovaState,
    ) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let (mut tx, mut blk, bufs) = setup(&mut t)?;
    let r = body(&mut t, &mut blk, &bufs, &mut tx);
    let reset = blk.reset();
    let destroyed = t.dom.destroy(tx, t.iommu);
    r?;
    reset.or_fail("virtio reset")?;
    destroyed.or_fail("destroy")
}

/// One request, which must complete with `VIRTIO_BLK_S_OK` and the used
/// length virtio-blk reports (data + status byte for a read, the status byte
/// for a write).
fn request_ok(blk: &mut VirtioBlk, req: &BlkRequest, what: &str) -> Result<(), Fail> {
    let c = blk.request(req).or_fail(what)?;
    check_eq!(c.status, VIRTIO_BLK_S_OK, "{what}: request status");
    let written = match req.op {
        BlkOp::Read => req.data_len as u32 + 1,
        BlkOp::Write => 1,
    };
    check_eq!(c.written, written, "{what}: bytes the device wrote");
    Ok(())
}

/// The device accepts VERSION_1 + ACCESS_PLATFORM (its status reads
/// ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK) and reports the image's
/// size; a read of [`DATA_PAGES`] pages' worth of sectors lands, sector by
/// sector, in the right separate pages with exactly the image's bytes; a
/// sector written from one data page (its neighbours hold other bytes) and
/// read back with its neighbours into another holds the new bytes, the
/// neighbours keep the image's, and nothing lands outside the read. The
/// IOMMU reports no fault. The sector is restored at the end.
pub fn reads_and_writes<F: PteFormat, M: TableMemory, B: IommuBackend>(
    t: VirtioTest<'_, F, M, B>,
    checks: &mut impl FaultChecks<B>,
) -> Result<(), Fail> {
    with_device(t, |t, blk, bufs, _| {
        // The device kept FEATURES_OK for VERSION_1 + ACCESS_PLATFORM (QEMU
        // clears it when ACCESS_PLATFORM is missing under iommu_platform=on).
        let up = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        check_eq!(blk.device_status(), up, "device status after init");
        check_eq!(
            blk.features(),
            F_VERSION_1 | F_ACCESS_PLATFORM,
            "features negotiated"
        );
        check_eq!(blk.capacity(), IMAGE_SECTORS, "capacity in sectors");
        narrate!(
            "virtio-blk {}: features VERSION_1 + ACCESS_PLATFORM, {} sectors, status {:#x}",
            t.dev,
            blk.capacity(),
            blk.device_status()
        );
        let p = t.pages;
        checks.before_dma(t.iommu);

        // Read across every data page.
        for &pa in &p.data {
            fill(pa, 0, PAGE, |_| GUARD);
        }
        let sectors = DATA_PAGES as u64 * SECTORS_PER_PAGE;
        let req = bufs.request(BlkOp::Read, READ_FIRST, 0, DATA_PAGES * PAGE);
        request_ok(blk, &req, "read")?;
        for page in 0..DATA_PAGES {
            let first = READ_FIRST + page as u64 * SECTORS_PER_PAGE;
            check_image(&p, page, 0, first, SECTORS_PER_PAGE)?;
        }
        narrate!(
            "read sectors {READ_FIRST}..{} from IOVA {:#x}: each of the {DATA_PAGES} pages holds its 8 sectors of the image",
            READ_FIRST + sectors,
            bufs.data
        );

        // Write one sector from data page 1: pages 0 and 3, and the rest of
        // page 1, hold decoys a wrong DMA would write instead.
        for &pa in &p.data {
            fill(pa, 0, PAGE, |i| pattern(DECOY_SEED, i));
        }
        let [_, src, dst, _] = p.data;
        fill(src, 0, SECTOR_SIZE, |i| pattern(NEW_SEED, i));
        let req = bufs.request(BlkOp::Write, WRITE_SECTOR, PAGE_SIZE, SECTOR_SIZE);
        request_ok(blk, &req, "write")?;

        // Read it back with both neighbours into data page 2.
        for &pa in &p.data {
            fill(pa, 0, PAGE, |_| GUARD);
        }
        let req = bufs.request(
            BlkOp::Read,
            WRITE_SECTOR - 1,
            2 * PAGE_SIZE,
            3 * SECTOR_SIZE,
        );
        request_ok(blk, &req, "read back")?;
        check_image(&p, 2, 0, WRITE_SECTOR - 1, 1)?;
        check_ok!(
            check(dst, SECTOR_SIZE, SECTOR_SIZE, |i| pattern(NEW_SEED, i)),
            "sector {WRITE_SECTOR} read back"
        );
        check_image(&p, 2, 2 * SECTOR_SIZE, WRITE_SECTOR + 1, 1)?;
        check_guard(&p, 2, 3 * SECTOR_SIZE, "read back")?;
        for page in [0, 1, 3] {
            check_guard(&p, page, 0, "read back")?;
        }
        checks.no_faults(t.iommu)?;
        narrate!(
            "wrote sector {WRITE_SECTOR} from data page 1, read {}..={} back into data page 2: new bytes, neighbours intact, other pages untouched",
            WRITE_SECTOR - 1,
            WRITE_SECTOR + 1
        );

        // Put the image's bytes back.
        fill(src, 0, SECTOR_SIZE, |i| sector_byte(WRITE_SECTOR, i));
        let req = bufs.request(BlkOp::Write, WRITE_SECTOR, PAGE_SIZE, SECTOR_SIZE);
        request_ok(blk, &req, "restore")
    })
}

/// After a good read into data page 0, the page is unlinked (sync) and a
/// one-sector read into it is issued: the device's DMA is blocked (the page
/// keeps its bytes) and the IOMMU reports the blocked write at the page's
/// IOVA.
///
/// What QEMU 10's device does with it, asserted here: it does **not** fail
/// the request. `dma_memory_map` of a buffer the IOMMU refuses falls back to
/// a bounce buffer whose write-back the IOMMU drops again (one fault for the
/// map, then one per 4 bytes of the write-back), and virtio-blk completes
/// the request with `VIRTIO_BLK_S_OK` and the full length in the used ring.
/// A guest cannot tell from virtio; the IOMMU's fault report is the only
/// witness.
pub fn unlinked_buffer_faults<F: PteFormat, M: TableMemory, B: IommuBackend>(
    t: VirtioTest<'_, F, M, B>,
    checks: &mut impl FaultChecks<B>,
) -> Result<(), Fail> {
    with_device(t, |t, blk, bufs, tx| {
        let page = *t.pages.data.first().or_fail("data page")?;
        checks.before_dma(t.iommu);
        let req = bufs.request(BlkOp::Read, READ_FIRST, 0, PAGE);
        request_ok(blk, &req, "read while linked")?;
        check_image(&t.pages, 0, 0, READ_FIRST, SECTORS_PER_PAGE)?;
        checks.no_faults(t.iommu)?;

        check_eq!(
            t.dom.unlink(tx, DATA_OFF, PAGE_SIZE),
            Ok(PAGE_SIZE),
            "unlink data page 0"
        );
        t.dom.sync(t.iommu).or_fail("sync after unlink")?;
        check!(
            t.dom.translate(bare_iommu::DmaAddr(bufs.data)).is_none(),
            "data page 0 still translates after unlink"
        );

        fill(page, 0, PAGE, |_| GUARD);
        let used = blk.used_idx();
        checks.before_dma(t.iommu);
        let req = bufs.request(BlkOp::Read, READ_FIRST + 1, 0, SECTOR_SIZE);
        let got = blk.request(&req);
        check_ok!(
            check(page, 0, PAGE, |_| GUARD),
            "the blocked read reached the unlinked page"
        );
        let r = checks.blocked_write(t.iommu, t.dev, bufs.data, SECTOR_SIZE as u32)?;
        // QEMU's answer (see above): success, though nothing was written.
        check_eq!(
            got,
            Ok(Completion {
                status: VIRTIO_BLK_S_OK,
                written: SECTOR_SIZE as u32 + 1
            }),
            "QEMU's completion of the blocked read"
        );
        check_eq!(
            blk.used_idx(),
            used.wrapping_add(1),
            "used ring index after the blocked read"
        );
        check_eq!(
            blk.device_status() & (status::DEVICE_NEEDS_RESET | status::FAILED),
            0,
            "device status error bits"
        );
        narrate!(
            "after unlink: the read into {:#x} was blocked (page unchanged), {} fault record(s), first {}; QEMU still completed it with VIRTIO_BLK_S_OK",
            bufs.data,
            r.records,
            r.first
        );
        Ok(())
    })
}
