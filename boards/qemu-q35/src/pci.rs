//! PCI configuration through ECAM, function discovery and 32-bit BAR placement.
//!
//! Layout: PCI Express Base 6.0 §7.2.2 (ECAM), §7.5.1 (type 0 header).

use crate::acpi::EcamWindow;
use bare_iommu::DeviceId;
use core::ptr::{read_volatile, write_volatile};

/// Command register (offset 4): memory space enable.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
const OFF_VENDOR: u16 = 0x00;
const OFF_COMMAND: u16 = 0x04;
const OFF_HEADER_TYPE: u16 = 0x0e;
const OFF_BAR0: u16 = 0x10;
/// Where this board places BARs firmware left unassigned, and the limit
/// (0xfec0_0000 onwards: IOAPIC, HPET, VT-d, LAPIC).
const WINDOW_START: u64 = 0xc000_0000;
const WINDOW_END: u64 = 0xfec0_0000;

/// ECAM access to one segment.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    win: EcamWindow,
}

/// A placement failure.
pub enum PciError {
    /// The function's BAR is not a memory BAR or sizes to zero.
    UnusableBar { dev: DeviceId, bar: u8, raw: u32 },
    /// No free, aligned range of `size` bytes in the 32-bit window.
    NoSpace { size: u64 },
    /// Too many BARs to track.
    TooManyBars,
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::UnusableBar { dev, bar, raw } => {
                write!(f, "{dev} BAR{bar} ({raw:#x}) is not a sizable memory BAR")
            }
            Self::NoSpace { size } => write!(f, "no free {size:#x}-byte range below 0xfec00000"),
            Self::TooManyBars => write!(f, "too many BARs to track"),
        }
    }
}

impl Ecam {
    /// The ECAM window MCFG described.
    pub fn new(win: EcamWindow) -> Self {
        Self { win }
    }

    /// Bytes of configuration space the window covers.
    pub fn window(&self) -> (u64, u64) {
        let buses = u64::from(self.win.end_bus.saturating_sub(self.win.start_bus)) + 1;
        (self.win.base, buses << 20)
    }

    fn addr(&self, dev: DeviceId, off: u16) -> Option<usize> {
        if dev.bus < self.win.start_bus || dev.bus > self.win.end_bus || off > 0xffc {
            return None;
        }
        let bus = u64::from(dev.bus - self.win.start_bus);
        let a = self.win.base + (bus << 20) + (u64::from(dev.devfn) << 12) + u64::from(off);
        usize::try_from(a).ok()
    }

    /// Reads a naturally aligned dword; all-ones outside the window.
    pub fn read32(&self, dev: DeviceId, off: u16) -> u32 {
        match self.addr(dev, off & !3) {
            // SAFETY: inside the MCFG window, identity-mapped uncached; a config
            // read has no effect on memory.
            Some(a) => unsafe { read_volatile(a as *const u32) },
            None => u32::MAX,
        }
    }

    /// Writes a naturally aligned dword; ignored outside the window.
    pub fn write32(&self, dev: DeviceId, off: u16, val: u32) {
        if let Some(a) = self.addr(dev, off & !3) {
            // SAFETY: as in `read32`; the callers only write command registers
            // and BARs of functions this board owns.
            unsafe { write_volatile(a as *mut u32, val) }
        }
    }

    /// Reads a naturally aligned word.
    pub fn read16(&self, dev: DeviceId, off: u16) -> u16 {
        (self.read32(dev, off) >> ((off & 2) * 8)) as u16
    }

    /// Writes a naturally aligned word (read-modify-write of its dword).
    pub fn write16(&self, dev: DeviceId, off: u16, val: u16) {
        let shift = (off & 2) * 8;
        let old = self.read32(dev, off) & !(0xffff << shift);
        self.write32(dev, off, old | (u32::from(val) << shift));
    }

    /// Reads a byte.
    /// Secondary and subordinate bus of the PCI-to-PCI bridge at
    /// `bus:devfn` (type-1 header bytes 0x19/0x1a), `None` when no bridge
    /// answers there.
    pub fn bridge_buses(&self, bus: u8, devfn: u8) -> Option<(u8, u8)> {
        let dev = DeviceId::from_rid(0, u16::from(bus) << 8 | u16::from(devfn));
        if self.read16(dev, 0) == 0xffff || self.read8(dev, 0x0e) & 0x7f != 1 {
            return None;
        }
        Some((self.read8(dev, 0x19), self.read8(dev, 0x1a)))
    }

    pub fn read8(&self, dev: DeviceId, off: u16) -> u8 {
        (self.read32(dev, off) >> ((off & 3) * 8)) as u8
    }

    /// Every present function, in bus/device/function order, passed to `f`.
    pub fn for_each_function(&self, mut f: impl FnMut(DeviceId, u16, u16)) {
        for bus in self.win.start_bus..=self.win.end_bus {
            for d in 0..32u8 {
                let Some(f0) = DeviceId::new(self.win.segment, bus, d, 0) else {
                    continue;
                };
                if self.read16(f0, OFF_VENDOR) == 0xffff {
                    continue;
                }
                let funcs = if self.read8(f0, OFF_HEADER_TYPE) & 0x80 != 0 {
                    8
                } else {
                    1
                };
                for func in 0..funcs {
                    let Some(dev) = DeviceId::new(self.win.segment, bus, d, func) else {
                        continue;
                    };
                    let id = self.read32(dev, OFF_VENDOR);
                    if id & 0xffff != 0xffff {
                        f(dev, id as u16, (id >> 16) as u16);
                    }
                }
            }
        }
    }

    /// The function `vendor:device` at device number `slot` of bus 0, if
    /// there is one (the last such, in [`for_each_function`](Self::for_each_function) order).
    pub fn find_at(&self, vendor: u16, device: u16, slot: u8) -> Option<DeviceId> {
        let mut found = None;
        self.for_each_function(|dev, v, d| {
            if v == vendor && d == device && dev.bus == 0 && dev.dev() == slot {
                found = Some(dev);
            }
        });
        found
    }

    /// Sets bits in the command register.
    pub fn enable(&self, dev: DeviceId, bits: u16) {
        let cmd = self.read16(dev, OFF_COMMAND);
        self.write16(dev, OFF_COMMAND, cmd | bits);
    }

    /// Base and size of memory BAR `bar` of a type-0 function (decode is
    /// switched off while sizing). `None` for I/O, absent or 64-bit-high BARs.
    pub fn memory_bar(&self, dev: DeviceId, bar: u8) -> Option<(u64, u64, bool)> {
        let off = OFF_BAR0 + u16::from(bar) * 4;
        let raw = self.read32(dev, off);
        if raw & 1 != 0 {
            return None;
        }
        let is64 = (raw >> 1) & 3 == 2;
        let cmd = self.read16(dev, OFF_COMMAND);
        self.write16(dev, OFF_COMMAND, cmd & !CMD_MEMORY);
        self.write32(dev, off, u32::MAX);
        let mask = self.read32(dev, off) & !0xf;
        self.write32(dev, off, raw);
        let mut base = u64::from(raw & !0xf);
        let mut size_mask = u64::from(mask) | 0xffff_ffff_0000_0000;
        if is64 {
            let hi = self.read32(dev, off + 4);
            self.write32(dev, off + 4, u32::MAX);
            let hmask = self.read32(dev, off + 4);
            self.write32(dev, off + 4, hi);
            base |= u64::from(hi) << 32;
            size_mask = (u64::from(hmask) << 32) | u64::from(mask);
        }
        self.write16(dev, OFF_COMMAND, cmd);
        if mask == 0 {
            return None;
        }
        Some((base, (!size_mask).wrapping_add(1), is64))
    }

    /// Programs a 32-bit memory BAR.
    pub fn set_bar32(&self, dev: DeviceId, bar: u8, base: u32) {
        let off = OFF_BAR0 + u16::from(bar) * 4;
        let cmd = self.read16(dev, OFF_COMMAND);
        self.write16(dev, OFF_COMMAND, cmd & !CMD_MEMORY);
        self.write32(dev, off, base);
        self.write16(dev, OFF_COMMAND, cmd);
    }
}

/// Memory ranges already decoded by PCI functions (and the ECAM window), so a
/// new BAR goes where nothing else answers.
pub struct BusyRanges {
    ranges: heapless::Vec<(u64, u64), 64>,
}

impl BusyRanges {
    /// Collects every assigned memory BAR of every type-0 function.
    pub fn scan(ecam: &Ecam) -> Result<Self, PciError> {
        let mut me = Self {
            ranges: heapless::Vec::new(),
        };
        let (eb, es) = ecam.window();
        me.add(eb, es)?;
        let mut err = None;
        ecam.for_each_function(|dev, _, _| {
            if ecam.read8(dev, OFF_HEADER_TYPE) & 0x7f != 0 {
                return;
            }
            let mut bar = 0;
            while bar < 6 {
                let mut step = 1;
                if let Some((base, size, is64)) = ecam.memory_bar(dev, bar) {
                    if is64 {
                        step = 2;
                    }
                    if base != 0
                        && let Err(e) = me.add(base, size)
                    {
                        err = Some(e);
                    }
                }
                bar += step;
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(me),
        }
    }

    fn add(&mut self, base: u64, size: u64) -> Result<(), PciError> {
        self.ranges
            .push((base, base.saturating_add(size)))
            .map_err(|_| PciError::TooManyBars)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.ranges.iter().any(|&(s, e)| start < e && s < end)
    }

    /// Places memory BAR `bar` of `dev` (32- or 64-bit) in a free, naturally
    /// aligned range of the 32-bit window unless firmware already did;
    /// returns its base.
    pub fn place(&mut self, ecam: &Ecam, dev: DeviceId, bar: u8) -> Result<u64, PciError> {
        let raw = ecam.read32(dev, OFF_BAR0 + u16::from(bar) * 4);
        let Some((base, size, is64)) = ecam.memory_bar(dev, bar) else {
            return Err(PciError::UnusableBar { dev, bar, raw });
        };
        if base != 0 {
            return Ok(base);
        }
        if !size.is_power_of_two() {
            return Err(PciError::UnusableBar { dev, bar, raw });
        }
        let mut cand = WINDOW_START;
        while cand + size <= WINDOW_END {
            if !self.overlaps(cand, cand + size) {
                // cand < 4 GiB by the window bounds.
                ecam.set_bar32(dev, bar, cand as u32);
                if is64 {
                    // The upper half of a 64-bit BAR: below 4 GiB.
                    ecam.set_bar32(dev, bar + 1, 0);
                }
                self.add(cand, size)?;
                return Ok(cand);
            }
            cand += size;
        }
        Err(PciError::NoSpace { size })
    }
}

/// One function's configuration space, for the virtio driver's capability
/// walk.
#[derive(Clone, Copy)]
pub struct FunctionConfig {
    /// The ECAM.
    pub ecam: Ecam,
    /// The function.
    pub dev: DeviceId,
}

impl board_common::virtio::ConfigSpace for FunctionConfig {
    fn read32(&self, offset: u16) -> u32 {
        self.ecam.read32(self.dev, offset)
    }
}
