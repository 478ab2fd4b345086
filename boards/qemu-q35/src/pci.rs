//! PCI configuration through ECAM (PCI Express Base 6.0 §7.2.2), function
//! discovery and 32-bit BAR placement. The ECAM accessors are this board's;
//! headers, BAR sizing and the command register are the `pci_types` crate's,
//! through its `ConfigRegionAccess` implemented over the ECAM.

use crate::acpi::EcamWindow;
use bare_iommu::DeviceId;
use core::ptr::{read_volatile, write_volatile};
use pci_types::{
    Bar, CommandRegister, ConfigRegionAccess, EndpointHeader, HeaderType, PciAddress, PciHeader,
    PciPciBridgeHeader,
};

/// Command register (offset 4): memory space enable.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus master enable.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
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

    /// Secondary and subordinate bus of the PCI-to-PCI bridge at
    /// `bus:devfn` (type-1 header), `None` when no bridge answers there.
    pub fn bridge_buses(&self, bus: u8, devfn: u8) -> Option<(u8, u8)> {
        let header = PciHeader::new(PciAddress::new(0, bus, devfn >> 3, devfn & 7));
        if header.id(self).0 == 0xffff || header.header_type(self) != HeaderType::PciPciBridge {
            return None;
        }
        let bridge = PciPciBridgeHeader::from_header(header, self)?;
        Some((
            bridge.secondary_bus_number(self),
            bridge.subordinate_bus_number(self),
        ))
    }

    /// Reads a byte.
    pub fn read8(&self, dev: DeviceId, off: u16) -> u8 {
        (self.read32(dev, off) >> ((off & 3) * 8)) as u8
    }

    /// Every present function, in bus/device/function order, passed to `f`.
    pub fn for_each_function(&self, mut f: impl FnMut(DeviceId, u16, u16)) {
        for bus in self.win.start_bus..=self.win.end_bus {
            for d in 0..32u8 {
                let f0 = PciHeader::new(PciAddress::new(self.win.segment, bus, d, 0));
                if f0.id(self).0 == 0xffff {
                    continue;
                }
                let funcs = if f0.has_multiple_functions(self) {
                    8
                } else {
                    1
                };
                for func in 0..funcs {
                    let Some(dev) = DeviceId::new(self.win.segment, bus, d, func) else {
                        continue;
                    };
                    let (vendor, device) = PciHeader::new(address(dev)).id(self);
                    if vendor != 0xffff {
                        f(dev, vendor, device);
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
        let bits = CommandRegister::from_bits_truncate(bits);
        PciHeader::new(address(dev)).update_command(self, |c| c | bits);
    }

    /// Runs `f` on the type-0 header of `dev` with memory decoding off, then
    /// restores the command register.
    fn with_decode_off<R>(
        &self,
        dev: DeviceId,
        f: impl FnOnce(&mut EndpointHeader) -> R,
    ) -> Option<R> {
        let mut ep = EndpointHeader::from_header(PciHeader::new(address(dev)), self)?;
        let cmd = ep.command(self);
        ep.update_command(self, |c| c - CommandRegister::MEMORY_ENABLE);
        let r = f(&mut ep);
        ep.update_command(self, |_| cmd);
        Some(r)
    }

    /// Base and size of memory BAR `bar` of a type-0 function (decode is
    /// switched off while sizing). `None` for I/O, absent or 64-bit-high BARs.
    pub fn memory_bar(&self, dev: DeviceId, bar: u8) -> Option<(u64, u64, bool)> {
        match self.with_decode_off(dev, |ep| ep.bar(bar, self))?? {
            Bar::Memory32 { address, size, .. } => {
                Some((u64::from(address), u64::from(size), false))
            }
            Bar::Memory64 { address, size, .. } => Some((address, size, true)),
            Bar::Io { .. } => None,
        }
    }

    /// Programs memory BAR `bar` (both halves of a 64-bit one) with `base`,
    /// decode off meanwhile; `false` when it is not a memory BAR.
    fn set_bar(&self, dev: DeviceId, bar: u8, base: u32) -> bool {
        self.with_decode_off(dev, |ep| {
            // SAFETY: `base` is a naturally aligned range of the 32-bit
            // window that nothing else decodes (BusyRanges), as big as the BAR.
            unsafe { ep.write_bar(bar, self, base as usize) }.is_ok()
        })
        .unwrap_or(false)
    }
}

/// `pci_types`' address of a function.
fn address(dev: DeviceId) -> PciAddress {
    PciAddress::new(dev.segment, dev.bus, dev.dev(), dev.func())
}

impl ConfigRegionAccess for Ecam {
    unsafe fn read(&self, address: PciAddress, offset: u16) -> u32 {
        match DeviceId::new(
            address.segment(),
            address.bus(),
            address.device(),
            address.function(),
        ) {
            Some(dev) => self.read32(dev, offset),
            None => u32::MAX,
        }
    }

    unsafe fn write(&self, address: PciAddress, offset: u16, value: u32) {
        if let Some(dev) = DeviceId::new(
            address.segment(),
            address.bus(),
            address.device(),
            address.function(),
        ) {
            self.write32(dev, offset, value);
        }
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
            if PciHeader::new(address(dev)).header_type(ecam) != HeaderType::Endpoint {
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
        let Some((base, size, _)) = ecam.memory_bar(dev, bar) else {
            return Err(PciError::UnusableBar { dev, bar, raw });
        };
        if base != 0 {
            return Ok(base);
        }
        if !size.is_power_of_two() {
            return Err(PciError::UnusableBar { dev, bar, raw });
        }
        let cand = self.free_range(size)?;
        // cand < 4 GiB by the window bounds (a 64-bit BAR's upper half is
        // written 0).
        if !ecam.set_bar(dev, bar, cand as u32) {
            return Err(PciError::UnusableBar { dev, bar, raw });
        }
        self.add(cand, size)?;
        Ok(cand)
    }

    /// A free, naturally aligned range of `size` (a power of two) bytes of
    /// the 32-bit window, not yet taken.
    fn free_range(&self, size: u64) -> Result<u64, PciError> {
        let mut cand = WINDOW_START;
        while cand + size <= WINDOW_END {
            if !self.overlaps(cand, cand + size) {
                return Ok(cand);
            }
            cand += size;
        }
        Err(PciError::NoSpace { size })
    }

    /// Takes a free, naturally aligned range of `size` (a power of two)
    /// bytes of the 32-bit window (a bridge's memory window) and returns
    /// its base.
    pub fn take(&mut self, size: u64) -> Result<u32, PciError> {
        let base = self.free_range(size)?;
        self.add(base, size)?;
        // Below 4 GiB by the window bounds.
        Ok(base as u32)
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
