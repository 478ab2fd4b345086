//! PCI on QEMU `virt`: ECAM enumeration of bus 0 and BAR assignment in the
//! 32-bit MMIO window (nothing has assigned BARs before us).

use pci_types::{
    Bar, CommandRegister, ConfigRegionAccess, EndpointHeader, HeaderType, PciAddress, PciHeader,
};

/// ECAM (PCIe enhanced configuration space) base with `highmem` on.
pub const ECAM_BASE: usize = 0x40_1000_0000;
/// Start of the 32-bit PCI MMIO window.
pub const MMIO32_BASE: u64 = 0x1000_0000;
/// End (exclusive) of the 32-bit PCI MMIO window.
pub const MMIO32_END: u64 = 0x3eff_0000;

/// Configuration space through ECAM.
#[derive(Clone, Copy)]
pub struct Ecam {
    base: usize,
}

impl Ecam {
    /// The `virt` board's ECAM.
    pub const fn virt() -> Self {
        Self { base: ECAM_BASE }
    }

    fn reg(&self, address: PciAddress, offset: u16) -> *mut u32 {
        let off = (usize::from(address.bus()) << 20)
            | (usize::from(address.device()) << 15)
            | (usize::from(address.function()) << 12)
            | usize::from(offset & 0xffc);
        (self.base + off) as *mut u32
    }
}

impl ConfigRegionAccess for Ecam {
    unsafe fn read(&self, address: PciAddress, offset: u16) -> u32 {
        // SAFETY: the ECAM window covers bus 0..=255 of segment 0 on `virt`;
        // the offset is masked to a dword inside the function's 4 KiB.
        unsafe { self.reg(address, offset).read_volatile() }
    }

    unsafe fn write(&self, address: PciAddress, offset: u16, value: u32) {
        // SAFETY: as for `read`; the caller chose a register that may be written.
        unsafe { self.reg(address, offset).write_volatile(value) }
    }
}

/// Why a function could not be set up.
#[derive(Clone, Copy, Debug)]
pub enum PciError {
    /// The BAR is absent or not a memory BAR.
    NoMemoryBar {
        /// The function.
        address: PciAddress,
        /// The BAR.
        slot: u8,
    },
    /// The 32-bit MMIO window is full.
    WindowFull {
        /// Size that did not fit.
        size: u64,
    },
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMemoryBar { address, slot } => {
                write!(f, "{address}: BAR {slot} is not a memory BAR")
            }
            Self::WindowFull { size } => {
                write!(
                    f,
                    "no room for a {size:#x}-byte BAR in the 32-bit MMIO window"
                )
            }
        }
    }
}

/// BAR 0 of a function on bus 0, assigned, with decoding enabled.
#[derive(Clone, Copy)]
pub struct Function {
    /// CPU physical address of BAR 0.
    pub bar0: u64,
    /// Size of BAR 0.
    pub bar0_size: u64,
}

/// Hands out 32-bit MMIO addresses, naturally aligned.
pub struct MmioWindow {
    next: u64,
}

impl MmioWindow {
    /// The whole 32-bit window.
    pub const fn new() -> Self {
        Self { next: MMIO32_BASE }
    }

    /// Takes a naturally aligned range of `size` bytes (a bridge's memory
    /// window, a BAR) and returns its base.
    pub fn take(&mut self, size: u64) -> Result<u64, PciError> {
        let start = self.next.next_multiple_of(size.max(1));
        let end = start
            .checked_add(size)
            .filter(|&e| e <= MMIO32_END)
            .ok_or(PciError::WindowFull { size })?;
        self.next = end;
        Ok(start)
    }
}

/// Endpoints on bus 0 with the given vendor/device ID, in slot order.
pub fn find(ecam: Ecam, vendor: u16, device: u16) -> heapless::Vec<PciAddress, 32> {
    let mut out = heapless::Vec::new();
    for dev in 0..32u8 {
        let addr = PciAddress::new(0, 0, dev, 0);
        let header = PciHeader::new(addr);
        let (v, d) = header.id(ecam);
        if v == 0xffff {
            continue;
        }
        if v == vendor && d == device && header.header_type(ecam) == HeaderType::Endpoint {
            // Capacity 32 = number of slots: cannot overflow.
            let _ = out.push(addr);
        }
    }
    out
}

/// Assigns BAR 0 of an endpoint from `window` and enables memory decoding and
/// bus mastering.
pub fn enable(
    ecam: Ecam,
    address: PciAddress,
    window: &mut MmioWindow,
) -> Result<Function, PciError> {
    let bar = enable_bar(ecam, address, 0, window)?;
    Ok(Function {
        bar0: bar.address,
        bar0_size: bar.size,
    })
}

/// A memory BAR as the function decodes it after [`enable_bar`].
#[derive(Clone, Copy)]
pub struct MemoryBar {
    /// The address read back from the BAR register: a PCI bus address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
    /// A 64-bit BAR (two registers).
    pub is_64: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

/// Assigns memory BAR `slot` of an endpoint from `window` (the window's
/// addresses are written to the BAR as they are) and enables memory decoding
/// and bus mastering; returns the BAR as read back from the function.
pub fn enable_bar(
    ecam: Ecam,
    address: PciAddress,
    slot: u8,
    window: &mut MmioWindow,
) -> Result<MemoryBar, PciError> {
    let no_bar = PciError::NoMemoryBar { address, slot };
    let header = PciHeader::new(address);
    let mut ep = EndpointHeader::from_header(header, ecam).ok_or(no_bar)?;
    // Decoding off while the BAR is sized and moved.
    ep.update_command(ecam, |c| {
        c - (CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE)
    });
    let size = match ep.bar(slot, ecam) {
        Some(Bar::Memory32 { size, .. }) => u64::from(size),
        Some(Bar::Memory64 { size, .. }) => size,
        _ => return Err(no_bar),
    };
    let base = window.take(size)?;
    // SAFETY: `base` is a naturally aligned range of the MMIO window that no
    // other BAR uses, and the BAR is a memory BAR of that size.
    unsafe { ep.write_bar(slot, ecam, base as usize) }.map_err(|_| no_bar)?;
    // Read back (sizing writes the register, so before decoding is on).
    let bar = match ep.bar(slot, ecam) {
        Some(Bar::Memory32 {
            address,
            size,
            prefetchable,
        }) => Ok(MemoryBar {
            address: u64::from(address),
            size: u64::from(size),
            is_64: false,
            prefetchable,
        }),
        Some(Bar::Memory64 {
            address,
            size,
            prefetchable,
        }) => Ok(MemoryBar {
            address,
            size,
            is_64: true,
            prefetchable,
        }),
        _ => Err(no_bar),
    }?;
    ep.update_command(ecam, |c| {
        c | CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE
    });
    Ok(bar)
}

/// One function's configuration space through ECAM, for the virtio driver's
/// capability walk.
#[derive(Clone, Copy)]
pub struct FunctionConfig {
    /// The ECAM.
    pub ecam: Ecam,
    /// The function.
    pub address: PciAddress,
}

impl board_common::virtio::ConfigSpace for FunctionConfig {
    fn read32(&self, offset: u16) -> u32 {
        // SAFETY: a configuration read of a present function has no side
        // effects on memory.
        unsafe { self.ecam.read(self.address, offset) }
    }
}
