//! A minimal virtio-blk driver over the virtio 1.x ("modern") PCI transport,
//! polled, with one split virtqueue (Virtual I/O Device (VIRTIO) Version 1.2:
//! §4.1 PCI transport, §3.1 device initialization, §2.7 split virtqueues,
//! §5.2 block device).
//!
//! Arch-independent: the board finds the function, assigns its BARs, turns on
//! memory decoding and bus mastering, and hands over the configuration space
//! ([`ConfigSpace`]) and the BAR addresses. The driver walks the vendor
//! capabilities for the common, notify and device configuration structures,
//! negotiates `VIRTIO_F_VERSION_1` and `VIRTIO_F_ACCESS_PLATFORM` (so the
//! device's DMA goes through the IOMMU: QEMU's `iommu_platform=on`), sets up
//! queue 0 in memory the caller lends at a DMA address of its choosing (an
//! IOVA when the IOMMU translates) and waits for completions within a
//! bounded [`DmaBudget`]; no interrupts.

use core::fmt;
use core::sync::atomic::{Ordering, fence};
use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

use crate::edu::DmaBudget;

/// PCI vendor ID of virtio devices (Red Hat).
pub const VENDOR: u16 = 0x1af4;
/// PCI device ID of a modern-only virtio block device (0x1040 + device type 2, §4.1.2).
pub const DEVICE_BLK: u16 = 0x1042;
/// The BAR QEMU puts the virtio structures in (64-bit memory; the board
/// assigns it, the capability walk checks it).
pub const MODERN_BAR: u8 = 4;
/// Bytes per sector (§5.2.6: `sector` counts 512-byte units).
pub const SECTOR_SIZE: usize = 512;
/// Entries of the one virtqueue (a power of two, §2.7).
pub const QUEUE_SIZE: u16 = 8;
/// Bytes of the ring memory the caller lends: descriptor table, driver area
/// and device area at fixed offsets in one 4 KiB page.
pub const RING_BYTES: usize = 4096;
/// Where the descriptor table lies in the ring memory (16-byte aligned, §2.7).
const DESC_OFF: usize = 0;
/// Where the driver area (available ring) lies (2-byte aligned).
const AVAIL_OFF: usize = 0x400;
/// Where the device area (used ring) lies (4-byte aligned).
const USED_OFF: usize = 0x800;

/// Feature bit 32: the modern interface (§6).
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit 33: the device's DMA goes through the platform's IOMMU (§6).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// PCI capability ID of a vendor-specific capability (virtio's, §4.1.4).
const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Configuration offset of the status register (its high half of dword 1).
const PCI_STATUS_DWORD: u16 = 0x04;
/// Status bit: the capabilities list is present.
const PCI_STATUS_CAP_LIST: u32 = 1 << (16 + 4);
/// Configuration offset of the capabilities pointer.
const PCI_CAP_PTR: u16 = 0x34;
/// `cfg_type` of `struct virtio_pci_cap` (§4.1.4).
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;

/// Device status bits (§2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// Request types (§5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request status: success (§5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// What the driver leaves in the status byte, so a byte the device never
/// wrote shows.
pub const STATUS_UNWRITTEN: u8 = 0xff;

/// Descriptor flags (§2.7.5).
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// `queue_msix_vector` / `config_msix_vector`: no MSI-X vector (§4.1.5.1.2).
const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Polls of `device_status` allowed for a reset to finish.
const RESET_POLLS: u32 = 100_000;

register_structs! {
    /// `struct virtio_pci_common_cfg` (§4.1.4.3). The 64-bit queue addresses
    /// are written as two 32-bit halves, low first, as the spec allows.
    CommonCfg {
        (0x00 => device_feature_select: ReadWrite<u32>),
        (0x04 => device_feature: ReadOnly<u32>),
        (0x08 => driver_feature_select: ReadWrite<u32>),
        (0x0c => driver_feature: ReadWrite<u32>),
        (0x10 => config_msix_vector: ReadWrite<u16>),
        (0x12 => num_queues: ReadOnly<u16>),
        (0x14 => device_status: ReadWrite<u8>),
        (0x15 => config_generation: ReadOnly<u8>),
        (0x16 => queue_select: ReadWrite<u16>),
        (0x18 => queue_size: ReadWrite<u16>),
        (0x1a => queue_msix_vector: ReadWrite<u16>),
        (0x1c => queue_enable: ReadWrite<u16>),
        (0x1e => queue_notify_off: ReadOnly<u16>),
        (0x20 => queue_desc_lo: ReadWrite<u32>),
        (0x24 => queue_desc_hi: ReadWrite<u32>),
        (0x28 => queue_driver_lo: ReadWrite<u32>),
        (0x2c => queue_driver_hi: ReadWrite<u32>),
        (0x30 => queue_device_lo: ReadWrite<u32>),
        (0x34 => queue_device_hi: ReadWrite<u32>),
        (0x38 => @END),
    }
}

register_structs! {
    /// The start of `struct virtio_blk_config` (§5.2.4): the capacity in
    /// 512-byte sectors, read as two 32-bit halves.
    BlkConfig {
        (0x00 => capacity_lo: ReadOnly<u32>),
        (0x04 => capacity_hi: ReadOnly<u32>),
        (0x08 => @END),
    }
}

/// Bytes of `struct virtio_blk_config` the driver reads.
const BLK_CONFIG_BYTES: u32 = 8;
/// Bytes of `struct virtio_pci_common_cfg` the driver uses.
const COMMON_CFG_BYTES: u32 = 0x38;

/// The function's PCI configuration space, as the board reaches it.
pub trait ConfigSpace {
    /// The naturally aligned dword at `offset`.
    fn read32(&self, offset: u16) -> u32;
}

/// What went wrong with the virtio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioError {
    /// The function has no capabilities list, or it loops.
    BadCapabilityList,
    /// No usable capability of `cfg_type` (1 common, 2 notify, 4 device).
    MissingCapability {
        /// The structure missing.
        cfg_type: u8,
    },
    /// A capability points into a BAR the board did not assign, or past its end.
    BadCapability {
        /// The structure.
        cfg_type: u8,
        /// The BAR it names.
        bar: u8,
    },
    /// Queue 0's notify address lies past the notification structure.
    NotifyOutOfRange {
        /// `queue_notify_off * notify_off_multiplier`.
        offset: u64,
    },
    /// `device_status` did not read 0 after a reset.
    ResetTimeout {
        /// What it read last.
        status: u8,
    },
    /// The device does not offer a feature the driver needs.
    FeatureMissing {
        /// The features it offers.
        offered: u64,
        /// The ones missing.
        missing: u64,
    },
    /// The device cleared FEATURES_OK: it refuses the features.
    FeaturesRefused {
        /// The device status.
        status: u8,
    },
    /// Queue 0 is absent or smaller than [`QUEUE_SIZE`].
    QueueTooSmall {
        /// Its maximum size.
        max: u16,
    },
    /// The request's data is empty or not a whole number of sectors, or
    /// longer than a descriptor can say.
    BadLength {
        /// Bytes asked for.
        len: usize,
    },
    /// The device set DEVICE_NEEDS_RESET (§2.1.2) instead of completing the
    /// request; the used ring did not move.
    DeviceNeedsReset {
        /// The device status.
        status: u8,
    },
    /// No completion within the budget.
    Timeout {
        /// Polls of the used ring spent.
        polls: u32,
    },
    /// [`VirtioBlk::wait`] with no request in flight.
    NothingSubmitted,
    /// The device completed a chain the driver did not submit.
    UnexpectedCompletion {
        /// The head index in the used ring element.
        id: u32,
    },
}

impl fmt::Display for VirtioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadCapabilityList => write!(f, "no or looping PCI capabilities list"),
            Self::MissingCapability { cfg_type } => {
                write!(f, "no virtio capability of cfg_type {cfg_type}")
            }
            Self::BadCapability { cfg_type, bar } => write!(
                f,
                "virtio capability {cfg_type} lies outside BAR {bar} (unassigned or too small)"
            ),
            Self::NotifyOutOfRange { offset } => {
                write!(
                    f,
                    "queue notify offset {offset:#x} past the notify structure"
                )
            }
            Self::ResetTimeout { status } => {
                write!(f, "device status {status:#x} after reset, expected 0")
            }
            Self::FeatureMissing { offered, missing } => write!(
                f,
                "device offers features {offered:#x}, missing {missing:#x} (iommu_platform=on?)"
            ),
            Self::FeaturesRefused { status } => {
                write!(f, "device cleared FEATURES_OK (status {status:#x})")
            }
            Self::QueueTooSmall { max } => {
                write!(f, "queue 0 holds {max} entries, need {QUEUE_SIZE}")
            }
            Self::BadLength { len } => write!(f, "{len} bytes is not a whole number of sectors"),
            Self::DeviceNeedsReset { status } => {
                write!(f, "device set DEVICE_NEEDS_RESET (status {status:#x})")
            }
            Self::Timeout { polls } => write!(f, "no completion after {polls} polls"),
            Self::NothingSubmitted => write!(f, "no request in flight"),
            Self::UnexpectedCompletion { id } => write!(f, "completion of unknown chain {id}"),
        }
    }
}

/// A virtio function the board has set up: BAR placed, memory decoding
/// and bus mastering on.
#[derive(Clone, Copy)]
pub struct VirtioFunction {
    /// Its PCI identity: the IOMMU's StreamID (SMMUv3) or source-id (VT-d).
    pub id: bare_iommu::DeviceId,
    /// Where its virtio structures are.
    pub pci: VirtioPci,
    /// CPU address of the ECAM window (bus 0) its configuration space is in,
    /// for drivers that walk it themselves (virtio-drivers' `PciRoot`).
    pub ecam: u64,
}

/// Where the virtio structures of one function are, as the CPU reaches
/// them (identity mapped, or the MMU off).
#[derive(Clone, Copy, Debug)]
pub struct VirtioPci {
    /// `struct virtio_pci_common_cfg`.
    pub common: u64,
    /// Base of the notification structure.
    pub notify: u64,
    /// Bytes of the notification structure.
    pub notify_len: u32,
    /// `notify_off_multiplier` of the notify capability.
    pub notify_off_multiplier: u32,
    /// The device-specific configuration.
    pub device: u64,
}

/// A capability as the walk found it.
#[derive(Clone, Copy)]
struct Cap {
    bar: u8,
    offset: u32,
    length: u32,
    extra: u32,
}

impl VirtioPci {
    /// Walks the capabilities list of a function whose memory BARs are at
    /// `bars[i] = Some((cpu_address, size))` (§4.1.4): the first common,
    /// notify and device capability that lies inside an assigned BAR.
    pub fn probe(
        cfg: &impl ConfigSpace,
        bars: &[Option<(u64, u64)>; 6],
    ) -> Result<Self, VirtioError> {
        if cfg.read32(PCI_STATUS_DWORD) & PCI_STATUS_CAP_LIST == 0 {
            return Err(VirtioError::BadCapabilityList);
        }
        let mut found: [Option<Cap>; 5] = [None; 5];
        let mut ptr = (cfg.read32(PCI_CAP_PTR) & 0xfc) as u16;
        // 48 capabilities fill the 192 bytes past the header: more is a loop.
        let mut steps = 0;
        while ptr != 0 {
            steps += 1;
            if steps > 48 || ptr < 0x40 {
                return Err(VirtioError::BadCapabilityList);
            }
            let head = cfg.read32(ptr);
            let (id, next, cfg_type) = (head as u8, (head >> 8) as u8, (head >> 24) as u8);
            if id == PCI_CAP_ID_VNDR
                && let Some(slot @ None) = found.get_mut(usize::from(cfg_type).wrapping_sub(1))
            {
                *slot = Some(Cap {
                    bar: cfg.read32(ptr + 4) as u8,
                    offset: cfg.read32(ptr + 8),
                    length: cfg.read32(ptr + 12),
                    extra: if cfg_type == CFG_NOTIFY {
                        cfg.read32(ptr + 16)
                    } else {
                        0
                    },
                });
            }
            ptr = u16::from(next & 0xfc);
        }
        let locate = |cfg_type: u8, need: u32| -> Result<(u64, Cap), VirtioError> {
            let cap = found
                .get(usize::from(cfg_type) - 1)
                .copied()
                .flatten()
                .ok_or(VirtioError::MissingCapability { cfg_type })?;
            let bad = VirtioError::BadCapability {
                cfg_type,
                bar: cap.bar,
            };
            let (base, size) = bars
                .get(usize::from(cap.bar))
                .copied()
                .flatten()
                .ok_or(bad)?;
            let end = u64::from(cap.offset) + u64::from(cap.length.max(need));
            if cap.length < need || end > size {
                return Err(bad);
            }
            Ok((base + u64::from(cap.offset), cap))
        };
        let (common, _) = locate(CFG_COMMON, COMMON_CFG_BYTES)?;
        let (notify, ncap) = locate(CFG_NOTIFY, 2)?;
        let (device, _) = locate(CFG_DEVICE, BLK_CONFIG_BYTES)?;
        Ok(Self {
            common,
            notify,
            notify_len: ncap.length,
            notify_off_multiplier: ncap.extra,
            device,
        })
    }
}

/// Memory lent to the device: where the CPU writes it and where the device
/// reaches it (an IOVA when the IOMMU translates).
#[derive(Clone, Copy, Debug)]
pub struct DmaBuf {
    cpu: *mut u8,
    dma: u64,
}

impl DmaBuf {
    /// `cpu` and, for the device, `dma`.
    ///
    /// # Safety
    ///
    /// `cpu` must be valid for reads and writes of as many bytes as the
    /// driver uses there (a ring: [`RING_BYTES`], 4 KiB aligned; a request
    /// header: 16, 8-byte aligned; a status byte: 1), used by nothing else,
    /// for as long as requests use it.
    pub unsafe fn new(cpu: *mut u8, dma: u64) -> Self {
        Self { cpu, dma }
    }

    /// The CPU pointer.
    pub fn cpu(&self) -> *mut u8 {
        self.cpu
    }

    /// The device (DMA) address.
    pub fn dma(&self) -> u64 {
        self.dma
    }
}

/// Direction of a block request (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// `VIRTIO_BLK_T_IN`: the device writes the data buffer.
    Read,
    /// `VIRTIO_BLK_T_OUT`: the device reads the data buffer.
    Write,
}

/// One block request: a three-descriptor chain (header, data, status).
#[derive(Clone, Copy, Debug)]
pub struct BlkRequest {
    /// Read or write.
    pub op: BlkOp,
    /// First sector.
    pub sector: u64,
    /// Where the 16-byte `struct virtio_blk_req` header goes (device-readable).
    pub header: DmaBuf,
    /// The data: `data_len` bytes at this device address.
    pub data_dma: u64,
    /// Bytes of data: a whole number of sectors.
    pub data_len: usize,
    /// The status byte (device-writable).
    pub status: DmaBuf,
}

/// What the device returned for a completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The status byte (`VIRTIO_BLK_S_OK` = 0).
    pub status: u8,
    /// Bytes the device says it wrote into the chain (`len` of the used element).
    pub written: u32,
}

/// A virtio-blk device, initialised with queue 0 in lent memory.
pub struct VirtioBlk {
    common: &'static CommonCfg,
    notify: *mut u16,
    device: &'static BlkConfig,
    ring: DmaBuf,
    budget: DmaBudget,
    features: u64,
    capacity: u64,
    /// Next free entry of the available ring (free-running, §2.7.6).
    avail_idx: u16,
    /// Used ring entries consumed so far (free-running).
    last_used: u16,
    /// The status byte of the request in flight.
    pending_status: Option<DmaBuf>,
}

impl VirtioBlk {
    /// Resets the device and brings it up (§3.1.1): ACKNOWLEDGE, DRIVER,
    /// features VERSION_1 + ACCESS_PLATFORM, FEATURES_OK, queue 0 of
    /// [`QUEUE_SIZE`] entries in `ring` ([`RING_BYTES`], zeroed here), no
    /// MSI-X, DRIVER_OK. Each request may take `budget`.
    ///
    /// # Safety
    ///
    /// `pci` must describe an enabled virtio function (memory decoding and
    /// bus mastering on) that nothing else drives, and the device must reach
    /// the bytes of `ring` at its DMA address while it runs.
    pub unsafe fn init(
        pci: VirtioPci,
        ring: DmaBuf,
        budget: DmaBudget,
    ) -> Result<Self, VirtioError> {
        // SAFETY: per the caller, these addresses are the function's common
        // and device configuration structures, mapped, reached only through
        // volatile cells, and at least as long as the structs (checked by
        // `VirtioPci::probe`).
        let (common, device) = unsafe {
            (
                &*(pci.common as usize as *const CommonCfg),
                &*(pci.device as usize as *const BlkConfig),
            )
        };
        let mut me = Self {
            common,
            notify: pci.notify as usize as *mut u16,
            device,
            ring,
            budget,
            features: 0,
            capacity: 0,
            avail_idx: 0,
            last_used: 0,
            pending_status: None,
        };
        me.reset()?;
        let c = me.common;
        c.device_status.set(status::ACKNOWLEDGE);
        c.device_status.set(status::ACKNOWLEDGE | status::DRIVER);
        let offered = me.device_features();
        let wanted = F_VERSION_1 | F_ACCESS_PLATFORM;
        if offered & wanted != wanted {
            c.device_status.set(status::FAILED);
            return Err(VirtioError::FeatureMissing {
                offered,
                missing: wanted & !offered,
            });
        }
        c.driver_feature_select.set(0);
        c.driver_feature.set(wanted as u32);
        c.driver_feature_select.set(1);
        c.driver_feature.set((wanted >> 32) as u32);
        c.device_status
            .set(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        let st = c.device_status.get();
        if st & status::FEATURES_OK == 0 {
            c.device_status.set(status::FAILED);
            return Err(VirtioError::FeaturesRefused { status: st });
        }
        me.features = wanted;

        // Queue 0 (§4.1.5.1.3).
        c.config_msix_vector.set(VIRTIO_MSI_NO_VECTOR);
        c.queue_select.set(0);
        let max = if c.num_queues.get() == 0 {
            0
        } else {
            c.queue_size.get()
        };
        if max < QUEUE_SIZE {
            c.device_status.set(status::FAILED);
            return Err(VirtioError::QueueTooSmall { max });
        }
        // SAFETY: a ring `DmaBuf` is valid for RING_BYTES bytes (`DmaBuf::new`).
        unsafe { core::ptr::write_bytes(ring.cpu, 0, RING_BYTES) };
        c.queue_size.set(QUEUE_SIZE);
        c.queue_msix_vector.set(VIRTIO_MSI_NO_VECTOR);
        let set64 = |lo: &ReadWrite<u32>, hi: &ReadWrite<u32>, v: u64| {
            lo.set(v as u32);
            hi.set((v >> 32) as u32);
        };
        set64(
            &c.queue_desc_lo,
            &c.queue_desc_hi,
            ring.dma + DESC_OFF as u64,
        );
        set64(
            &c.queue_driver_lo,
            &c.queue_driver_hi,
            ring.dma + AVAIL_OFF as u64,
        );
        set64(
            &c.queue_device_lo,
            &c.queue_device_hi,
            ring.dma + USED_OFF as u64,
        );
        let notify_off = u64::from(c.queue_notify_off.get()) * u64::from(pci.notify_off_multiplier);
        if notify_off + 2 > u64::from(pci.notify_len) {
            c.device_status.set(status::FAILED);
            return Err(VirtioError::NotifyOutOfRange { offset: notify_off });
        }
        me.notify = (pci.notify + notify_off) as usize as *mut u16;
        fence(Ordering::SeqCst);
        c.queue_enable.set(1);

        me.capacity = me.read_capacity();
        c.device_status
            .set(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        Ok(me)
    }

    /// Writes 0 to `device_status` and waits (bounded) until it reads 0: the
    /// device forgets the queue and stops all DMA (§4.1.4.3.2).
    pub fn reset(&mut self) -> Result<(), VirtioError> {
        self.common.device_status.set(0);
        let mut st = self.common.device_status.get();
        for _ in 0..RESET_POLLS {
            if st == 0 {
                break;
            }
            core::hint::spin_loop();
            st = self.common.device_status.get();
        }
        self.avail_idx = 0;
        self.last_used = 0;
        match st {
            0 => Ok(()),
            status => Err(VirtioError::ResetTimeout { status }),
        }
    }

    /// The 64 feature bits the device offers.
    fn device_features(&self) -> u64 {
        let c = self.common;
        c.device_feature_select.set(0);
        let lo = u64::from(c.device_feature.get());
        c.device_feature_select.set(1);
        let hi = u64::from(c.device_feature.get());
        (hi << 32) | lo
    }

    /// The capacity, read until `config_generation` is stable (§4.1.4.3.1).
    fn read_capacity(&self) -> u64 {
        let mut value = 0;
        for _ in 0..16 {
            let before = self.common.config_generation.get();
            let lo = u64::from(self.device.capacity_lo.get());
            let hi = u64::from(self.device.capacity_hi.get());
            value = (hi << 32) | lo;
            if self.common.config_generation.get() == before {
                break;
            }
        }
        value
    }

    /// The features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.common.device_status.get()
    }

    /// The device's `idx` of the used ring: how many requests it completed.
    pub fn used_idx(&self) -> u16 {
        self.ring_read16(USED_OFF + 2)
    }

    fn ring_ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off < RING_BYTES);
        self.ring.cpu.wrapping_add(off)
    }

    fn ring_read16(&self, off: usize) -> u16 {
        // SAFETY: `off` is inside the ring page lent at init, 2-byte aligned.
        u16::from_le(unsafe { (self.ring_ptr(off) as *const u16).read_volatile() })
    }

    fn ring_read32(&self, off: usize) -> u32 {
        // SAFETY: as in `ring_read16`, 4-byte aligned.
        u32::from_le(unsafe { (self.ring_ptr(off) as *const u32).read_volatile() })
    }

    fn ring_write16(&self, off: usize, v: u16) {
        // SAFETY: as in `ring_read16`.
        unsafe { (self.ring_ptr(off) as *mut u16).write_volatile(v.to_le()) }
    }

    /// Writes descriptor `i` (§2.7.5).
    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.ring_ptr(DESC_OFF + 16 * usize::from(i));
        // SAFETY: descriptor `i < QUEUE_SIZE` lies in the ring page's
        // descriptor table, 16-byte aligned.
        unsafe {
            (p as *mut u64).write_volatile(addr.to_le());
            (p.add(8) as *mut u32).write_volatile(len.to_le());
            (p.add(12) as *mut u16).write_volatile(flags.to_le());
            (p.add(14) as *mut u16).write_volatile(next.to_le());
        }
    }

    /// Puts `req` on the queue as descriptors 0, 1, 2 (one request at a
    /// time), writes its header and [`STATUS_UNWRITTEN`] into the status
    /// byte, and notifies the device. Wait with [`wait`](Self::wait).
    pub fn submit(&mut self, req: &BlkRequest) -> Result<(), VirtioError> {
        let bad = VirtioError::BadLength { len: req.data_len };
        if req.data_len == 0 || !req.data_len.is_multiple_of(SECTOR_SIZE) {
            return Err(bad);
        }
        let len = u32::try_from(req.data_len).map_err(|_| bad)?;
        let kind = match req.op {
            BlkOp::Read => VIRTIO_BLK_T_IN,
            BlkOp::Write => VIRTIO_BLK_T_OUT,
        };
        // SAFETY: a header `DmaBuf` holds 16 bytes (8-byte aligned), a status
        // `DmaBuf` one (`DmaBuf::new`).
        unsafe {
            let h = req.header.cpu;
            (h as *mut u32).write_volatile(kind.to_le());
            (h.add(4) as *mut u32).write_volatile(0);
            (h.add(8) as *mut u64).write_volatile(req.sector.to_le());
            req.status.cpu.write_volatile(STATUS_UNWRITTEN);
        }
        let data_flags = match req.op {
            BlkOp::Read => VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            BlkOp::Write => VIRTQ_DESC_F_NEXT,
        };
        self.write_desc(0, req.header.dma, 16, VIRTQ_DESC_F_NEXT, 1);
        self.write_desc(1, req.data_dma, len, data_flags, 2);
        self.write_desc(2, req.status.dma, 1, VIRTQ_DESC_F_WRITE, 0);
        // Driver area: ring[idx % size] = head, then idx (§2.7.13).
        let slot = usize::from(self.avail_idx % QUEUE_SIZE);
        self.ring_write16(AVAIL_OFF + 4 + 2 * slot, 0);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ring_write16(AVAIL_OFF + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        // SAFETY: the queue's notify address inside the notify structure
        // (probe checked it lies in the BAR); writing the queue index is the
        // notification (§4.1.5.2).
        unsafe { self.notify.write_volatile(0) };
        self.pending_status = Some(req.status);
        Ok(())
    }

    /// Waits (bounded by the budget) for the device to complete the request
    /// [`submit`](Self::submit) queued: its status byte and the bytes it
    /// wrote. [`VirtioError::DeviceNeedsReset`] as soon as the device sets
    /// DEVICE_NEEDS_RESET without completing it.
    pub fn wait(&mut self) -> Result<Completion, VirtioError> {
        let Some(status_buf) = self.pending_status else {
            return Err(VirtioError::NothingSubmitted);
        };
        let start = match self.budget {
            DmaBudget::Ticks { now, .. } => now(),
            DmaBudget::Polls(_) => 0,
        };
        let mut polls: u32 = 0;
        while self.used_idx() == self.last_used {
            let st = self.device_status();
            if st & status::DEVICE_NEEDS_RESET != 0 {
                return Err(VirtioError::DeviceNeedsReset { status: st });
            }
            polls = polls.saturating_add(1);
            let spent = match self.budget {
                DmaBudget::Polls(max) => polls >= max,
                DmaBudget::Ticks { now, ticks } => now().wrapping_sub(start) >= ticks,
            };
            if spent {
                return Err(VirtioError::Timeout { polls });
            }
            core::hint::spin_loop();
        }
        // Read what the device wrote only after seeing its used index.
        fence(Ordering::SeqCst);
        let slot = usize::from(self.last_used % QUEUE_SIZE);
        let id = self.ring_read32(USED_OFF + 4 + 8 * slot);
        let written = self.ring_read32(USED_OFF + 8 + 8 * slot);
        self.last_used = self.last_used.wrapping_add(1);
        self.pending_status = None;
        if id != 0 {
            return Err(VirtioError::UnexpectedCompletion { id });
        }
        // SAFETY: a status `DmaBuf` holds one byte (`DmaBuf::new`).
        let status = unsafe { status_buf.cpu.read_volatile() };
        Ok(Completion { status, written })
    }

    /// [`submit`](Self::submit), then [`wait`](Self::wait).
    pub fn request(&mut self, req: &BlkRequest) -> Result<Completion, VirtioError> {
        self.submit(req)?;
        self.wait()
    }
}
