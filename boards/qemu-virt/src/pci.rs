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
pub enum PciError {
    /// BAR 0 is absent or not a memory BAR.
    NoMemoryBar(PciAddress),
    /// The 32-bit MMIO window is full.
    WindowFull {
        /// Size that did not fit.
        size: u64,
    },
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMemoryBar(a) => write!(f, "{a}: BAR 0 is not a memory BAR"),
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

    fn take(&mut self, size: u64) -> Result<u64, PciError> {
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
    let header = PciHeader::new(address);
    let mut ep = EndpointHeader::from_header(header, ecam).ok_or(PciError::NoMemoryBar(address))?;
    // Decoding off while BAR 0 is sized and moved.
    ep.update_command(ecam, |c| {
        c - (CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE)
    });
    let size = match ep.bar(0, ecam) {
        Some(Bar::Memory32 { size, .. }) => u64::from(size),
        Some(Bar::Memory64 { size, .. }) => size,
        _ => return Err(PciError::NoMemoryBar(address)),
    };
    let base = window.take(size)?;
    // SAFETY: `base` is a naturally aligned range of the MMIO window that no
    // other BAR uses, and the BAR is a memory BAR of that size.
    unsafe { ep.write_bar(0, ecam, base as usize) }.map_err(|_| PciError::NoMemoryBar(address))?;
    ep.update_command(ecam, |c| {
        c | CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE
    });
    Ok(Function {
        bar0: base,
        bar0_size: size,
    })
}
