//! A device behind a PCI-to-PCI bridge (a PCIe root port): both boards put
//! an edu on the root port's secondary bus, so its requester ID (bus 1) is
//! not its device/function number, and number the bus and open the window
//! themselves (no firmware does it for them).

use pci_types::{
    Bar, CommandRegister, ConfigRegionAccess, EndpointHeader, HeaderType, PciAddress, PciHeader,
};

/// Bridge type-1 header offsets (PCI-to-PCI Bridge Architecture 1.2 §3.2).
const BUS_NUMBERS: u16 = 0x18;
const IO_BASE_LIMIT: u16 = 0x1c;
const MEMORY_BASE_LIMIT: u16 = 0x20;
const PREF_BASE_LIMIT: u16 = 0x24;
const PREF_UPPER_BASE: u16 = 0x28;
const PREF_UPPER_LIMIT: u16 = 0x2c;
/// Memory windows are 1 MiB granular.
const WINDOW_GRAIN: u32 = 1 << 20;

/// Why a bridge or the device behind it could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BridgeError {
    /// No PCI-to-PCI bridge answers at the address.
    NotABridge(PciAddress),
    /// The memory window is not 1 MiB aligned and sized, or is empty.
    BadWindow { base: u32, size: u32 },
    /// No endpoint with a memory BAR 0 behind the bridge.
    NoEndpoint(PciAddress),
    /// BAR 0 does not fit the window.
    BarTooLarge { size: u64, window: u32 },
}

impl core::fmt::Display for BridgeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotABridge(a) => write!(f, "no PCI-to-PCI bridge at {a}"),
            Self::BadWindow { base, size } => {
                write!(f, "bridge window {base:#x}+{size:#x} is not 1 MiB granular")
            }
            Self::NoEndpoint(a) => write!(f, "no endpoint with a memory BAR 0 at {a}"),
            Self::BarTooLarge { size, window } => {
                write!(
                    f,
                    "BAR 0 of {size:#x} bytes does not fit a {window:#x} window"
                )
            }
        }
    }
}

/// Numbers the bridge at `bridge` (secondary = subordinate = `secondary`),
/// opens its memory window `[base, base + size)` with I/O and prefetchable
/// windows closed, and turns on memory and bus-master forwarding (without
/// bus mastering the bridge drops its devices' DMA, in QEMU as in silicon).
pub fn open<A: ConfigRegionAccess>(
    access: &A,
    bridge: PciAddress,
    secondary: u8,
    base: u32,
    size: u32,
) -> Result<(), BridgeError> {
    let mut header = PciHeader::new(bridge);
    if header.id(access).0 == 0xffff || header.header_type(access) != HeaderType::PciPciBridge {
        return Err(BridgeError::NotABridge(bridge));
    }
    if size == 0 || !base.is_multiple_of(WINDOW_GRAIN) || !size.is_multiple_of(WINDOW_GRAIN) {
        return Err(BridgeError::BadWindow { base, size });
    }
    let last = base
        .checked_add(size - 1)
        .ok_or(BridgeError::BadWindow { base, size })?;
    // SAFETY: configuration writes to the bridge's own type-1 registers; the
    // window is a free range the board chose for it.
    unsafe {
        let buses = access.read(bridge, BUS_NUMBERS) & 0xff00_0000;
        access.write(
            bridge,
            BUS_NUMBERS,
            buses
                | u32::from(bridge.bus())
                | u32::from(secondary) << 8
                | u32::from(secondary) << 16,
        );
        // I/O base above limit: closed (status bits in the upper half kept clear).
        access.write(bridge, IO_BASE_LIMIT, 0x0000_00f0);
        access.write(
            bridge,
            MEMORY_BASE_LIMIT,
            (base >> 16) & 0xfff0 | (last & 0xfff0_0000),
        );
        access.write(bridge, PREF_BASE_LIMIT, 0x0000_fff0);
        access.write(bridge, PREF_UPPER_BASE, 0xffff_ffff);
        access.write(bridge, PREF_UPPER_LIMIT, 0);
    }
    header.update_command(access, |c| {
        c | CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE
    });
    Ok(())
}

/// Puts memory BAR 0 of the endpoint at `dev` (behind an opened bridge) at
/// `base`, the start of the bridge's window of `window` bytes, and turns on
/// memory decoding and bus mastering; returns the BAR's size.
pub fn place_bar0<A: ConfigRegionAccess>(
    access: &A,
    dev: PciAddress,
    base: u32,
    window: u32,
) -> Result<u64, BridgeError> {
    let header = PciHeader::new(dev);
    if header.id(access).0 == 0xffff {
        return Err(BridgeError::NoEndpoint(dev));
    }
    let mut ep = EndpointHeader::from_header(header, access).ok_or(BridgeError::NoEndpoint(dev))?;
    ep.update_command(access, |c| {
        c - (CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE)
    });
    let size = match ep.bar(0, access) {
        Some(Bar::Memory32 { size, .. }) => u64::from(size),
        Some(Bar::Memory64 { size, .. }) => size,
        _ => return Err(BridgeError::NoEndpoint(dev)),
    };
    if size > u64::from(window) {
        return Err(BridgeError::BarTooLarge { size, window });
    }
    // SAFETY: `base` starts the bridge's window, which nothing else decodes,
    // and the BAR fits it.
    unsafe { ep.write_bar(0, access, base as usize) }.map_err(|_| BridgeError::NoEndpoint(dev))?;
    ep.update_command(access, |c| {
        c | CommandRegister::MEMORY_ENABLE | CommandRegister::BUS_MASTER_ENABLE
    });
    Ok(size)
}
