//! ACPI DMAR: DMA remapping reporting (Intel VT-d 4.1 chapter 8).
//!
//! ```text
//! DMAR header (48 B) │ remapping structures: type u16, length u16, body …
//!   0 DRHD  a remapping unit: register base, segment, INCLUDE_PCI_ALL, device scopes
//!   1 RMRR  memory a device keeps using (USB, GPU stolen memory): identity-map it
//!   2 ATSR  root ports under which ATS may be used
//!   3 RHSA  NUMA proximity domain of a DRHD
//!   5 SATC  devices whose ATC must be enabled (or may be)
//! ```
//!
//! Device scopes name a device by a start bus and a path of (device,
//! function) pairs through bridges (§8.3.1.1); resolving a path needs the
//! secondary bus of each bridge on it, read from PCI config space by the
//! caller through [`PciBridges`].

use super::{ACPI_HEADER_LEN, AcpiHeader, FirmwareError, Reader, ReservedRegion};
use crate::device::DeviceId;

/// Offset of the first remapping structure (after the 36-byte header, host
/// address width, flags and 10 reserved bytes; VT-d 4.1 §8.1).
const STRUCTURES_AT: usize = 48;

/// What a DMAR parser needs from PCI config space: the bus numbers behind a
/// bridge. Implemented for closures `Fn(segment, bus, devfn) -> Option<(u8, u8)>`.
pub trait PciBridges {
    /// The secondary and subordinate bus numbers of the PCI-to-PCI bridge at
    /// `segment:bus:devfn` (type-1 header bytes 0x19 and 0x1a), or `None`
    /// when no bridge answers there.
    fn bus_range(&self, segment: u16, bus: u8, devfn: u8) -> Option<(u8, u8)>;
}

impl<F: Fn(u16, u8, u8) -> Option<(u8, u8)>> PciBridges for F {
    fn bus_range(&self, segment: u16, bus: u8, devfn: u8) -> Option<(u8, u8)> {
        self(segment, bus, devfn)
    }
}

/// A topology without bridges: every scope path must be one element long.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBridges;

impl PciBridges for NoBridges {
    fn bus_range(&self, _: u16, _: u8, _: u8) -> Option<(u8, u8)> {
        None
    }
}

bitflags::bitflags! {
    /// DMAR header flags (VT-d 4.1 §8.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DmarFlags: u8 {
        /// Interrupt remapping is supported.
        const INTR_REMAP = 1 << 0;
        /// Firmware asks the OS not to enable x2APIC mode.
        const X2APIC_OPT_OUT = 1 << 1;
        /// Firmware set up DMA protection the OS may take over (opt-in).
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }
}

/// A DMAR table.
#[derive(Clone, Copy, Debug)]
pub struct Dmar<'a> {
    table: &'a [u8],
    header: AcpiHeader,
    haw: u8,
    flags: DmarFlags,
}

impl<'a> Dmar<'a> {
    /// Checks the header of the DMAR table in `bytes` (signature, length
    /// within `bytes`, room for the fixed fields). Bytes past the table's
    /// length are ignored. The checksum is not checked
    /// ([`super::acpi_checksum_ok`]).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn new(bytes: &'a [u8]) -> Result<Self, FirmwareError> {
        let (header, table) = AcpiHeader::parse(bytes, b"DMAR")?;
        if table.len() < STRUCTURES_AT {
            return Err(FirmwareError::BadLength {
                offset: 0,
                len: table.len(),
            });
        }
        let r = Reader(table);
        Ok(Self {
            table,
            header,
            haw: r.u8(ACPI_HEADER_LEN)?.saturating_add(1),
            flags: DmarFlags::from_bits_retain(r.u8(ACPI_HEADER_LEN + 1)?),
        })
    }

    /// The ACPI header.
    pub fn header(&self) -> &AcpiHeader {
        &self.header
    }

    /// Host address width: the widest DMA physical address (the field holds
    /// the width minus one; this is the width).
    pub fn host_address_width(&self) -> u8 {
        self.haw
    }

    /// Header flags.
    pub fn flags(&self) -> DmarFlags {
        self.flags
    }

    /// Every remapping structure, in table order. After an error the
    /// iterator ends.
    pub fn structures(&self) -> Structures<'a> {
        Structures {
            table: self.table,
            off: STRUCTURES_AT,
        }
    }

    /// The remapping units (DRHDs).
    pub fn units(&self) -> impl Iterator<Item = Result<Drhd<'a>, FirmwareError>> + use<'a> {
        self.structures().filter_map(|s| match s {
            Ok(Structure::Drhd(d)) => Some(Ok(d)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    }

    /// The reserved-memory regions (RMRRs).
    pub fn rmrrs(&self) -> impl Iterator<Item = Result<Rmrr<'a>, FirmwareError>> + use<'a> {
        self.structures().filter_map(|s| match s {
            Ok(Structure::Rmrr(r)) => Some(Ok(r)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    }

    /// The remapping unit that translates `dev`'s DMA, or `None` when no unit
    /// covers it (its DMA is not remapped).
    ///
    /// VT-d 4.1 §8.3: a unit whose device scopes list the device (as an
    /// endpoint, or under a listed bridge) owns it; otherwise the segment's
    /// unit with INCLUDE_PCI_ALL does (Linux `dmar_find_matched_drhd_unit`
    /// decides the same way).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn unit_for(
        &self,
        dev: DeviceId,
        bridges: &impl PciBridges,
    ) -> Result<Option<Drhd<'a>>, FirmwareError> {
        let mut catch_all = None;
        for unit in self.units() {
            let unit = unit?;
            if unit.segment != dev.segment {
                continue;
            }
            if unit.include_pci_all() {
                catch_all.get_or_insert(unit);
                continue;
            }
            if scopes_cover(unit.scopes(), unit.segment, dev, bridges)? {
                return Ok(Some(unit));
            }
        }
        Ok(catch_all)
    }

    /// The regions that must stay identity-mapped while `dev` is translated:
    /// every RMRR whose scope lists it (VT-d 4.1 §8.4).
    pub fn reserved_regions_for<'b, B: PciBridges>(
        &self,
        dev: DeviceId,
        bridges: &'b B,
    ) -> impl Iterator<Item = Result<ReservedRegion, FirmwareError>> + use<'a, 'b, B> {
        self.rmrrs().filter_map(move |r| {
            let r = match r {
                Ok(r) => r,
                Err(e) => return Some(Err(e)),
            };
            if r.segment != dev.segment {
                return None;
            }
            match scopes_cover(r.scopes(), r.segment, dev, bridges) {
                Ok(true) => Some(r.region()),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            }
        })
    }
}

fn scopes_cover(
    scopes: Scopes<'_>,
    segment: u16,
    dev: DeviceId,
    bridges: &impl PciBridges,
) -> Result<bool, FirmwareError> {
    for scope in scopes {
        if scope?.covers(segment, dev, bridges)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The remapping structures of a DMAR table ([`Dmar::structures`]).
#[derive(Clone, Debug)]
pub struct Structures<'a> {
    table: &'a [u8],
    off: usize,
}

impl<'a> Iterator for Structures<'a> {
    type Item = Result<Structure<'a>, FirmwareError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.off >= self.table.len() {
            return None;
        }
        let r = self.decode();
        if r.is_err() {
            // Nothing after a broken length can be trusted.
            self.off = self.table.len();
        }
        Some(r)
    }
}

impl<'a> Structures<'a> {
    fn decode(&mut self) -> Result<Structure<'a>, FirmwareError> {
        let t = Reader(self.table);
        let at = self.off;
        let kind = t.u16(at)?;
        let len = usize::from(t.u16(at + 2)?);
        let min = match kind {
            0 => 16,
            1 => 24,
            2 | 5 => 8,
            3 => 20,
            _ => 4,
        };
        if len < min {
            return Err(FirmwareError::BadLength { offset: at, len });
        }
        let b = t.slice(at, len)?;
        self.off = at + len;
        let r = Reader(b);
        Ok(match kind {
            0 => Structure::Drhd(Drhd {
                flags: r.u8(4)?,
                size: r.u8(5)? & 0xf,
                segment: r.u16(6)?,
                register_base: r.u64(8)?,
                scopes: &b[16..],
                offset: at,
            }),
            1 => {
                let base = r.u64(8)?;
                let limit = r.u64(16)?;
                if limit < base {
                    return Err(FirmwareError::Overflow { offset: at });
                }
                Structure::Rmrr(Rmrr {
                    segment: r.u16(6)?,
                    base,
                    limit,
                    scopes: &b[24..],
                    offset: at,
                })
            }
            2 => Structure::Atsr(Atsr {
                all_ports: r.u8(4)? & 1 != 0,
                segment: r.u16(6)?,
                scopes: &b[8..],
                offset: at,
            }),
            3 => Structure::Rhsa(Rhsa {
                register_base: r.u64(8)?,
                proximity_domain: r.u32(16)?,
            }),
            5 => Structure::Satc(Satc {
                atc_required: r.u8(4)? & 1 != 0,
                segment: r.u16(6)?,
                scopes: &b[8..],
                offset: at,
            }),
            _ => Structure::Other { kind, bytes: b },
        })
    }
}

/// One remapping structure.
#[derive(Clone, Copy, Debug)]
pub enum Structure<'a> {
    /// DMA remapping hardware unit definition (§8.3).
    Drhd(Drhd<'a>),
    /// Reserved memory region (§8.4).
    Rmrr(Rmrr<'a>),
    /// Root port ATS capability (§8.5).
    Atsr(Atsr<'a>),
    /// Remapping hardware static affinity (§8.6).
    Rhsa(Rhsa),
    /// SoC integrated address translation cache (§8.8).
    Satc(Satc<'a>),
    /// A structure this parser does not decode (ANDD, SIDP, future types).
    Other {
        /// Its type.
        kind: u16,
        /// All its bytes, the 4-byte type/length included.
        bytes: &'a [u8],
    },
}

/// A DMA remapping hardware unit (VT-d 4.1 §8.3).
#[derive(Clone, Copy, Debug)]
pub struct Drhd<'a> {
    flags: u8,
    size: u8,
    /// PCI segment the unit serves.
    pub segment: u16,
    /// Physical base of its register block.
    pub register_base: u64,
    scopes: &'a [u8],
    offset: usize,
}

impl<'a> Drhd<'a> {
    /// INCLUDE_PCI_ALL: the unit owns every device of its segment that no
    /// other unit lists.
    pub fn include_pci_all(&self) -> bool {
        self.flags & 1 != 0
    }

    /// Raw flags byte.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Length of the register block: 2^Size 4 KiB pages (byte 5, bits 3:0).
    pub fn register_len(&self) -> u64 {
        4096 << self.size
    }

    /// Offset of the structure in the table.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Its device scopes (IOAPIC, HPET and PCI devices it covers).
    pub fn scopes(&self) -> Scopes<'a> {
        Scopes::new(self.scopes)
    }
}

/// A reserved memory region (VT-d 4.1 §8.4): memory the listed devices
/// may DMA to at any time, to be identity-mapped in their domains.
#[derive(Clone, Copy, Debug)]
pub struct Rmrr<'a> {
    /// PCI segment of the devices.
    pub segment: u16,
    /// First byte (4 KiB aligned on conforming firmware).
    pub base: u64,
    /// Last byte (inclusive).
    pub limit: u64,
    scopes: &'a [u8],
    offset: usize,
}

impl<'a> Rmrr<'a> {
    /// The devices that use the region.
    pub fn scopes(&self) -> Scopes<'a> {
        Scopes::new(self.scopes)
    }

    /// The region as `[base, limit]`; an error when it spans all of the
    /// 64-bit space (its length would not fit).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn region(&self) -> Result<ReservedRegion, FirmwareError> {
        let len = (self.limit - self.base)
            .checked_add(1)
            .ok_or(FirmwareError::Overflow {
                offset: self.offset,
            })?;
        Ok(ReservedRegion {
            base: self.base,
            len,
        })
    }
}

/// Root-port ATS capability reporting (VT-d 4.1 §8.5).
#[derive(Clone, Copy, Debug)]
pub struct Atsr<'a> {
    /// ALL_PORTS: every root port of the segment supports ATS.
    pub all_ports: bool,
    /// PCI segment.
    pub segment: u16,
    scopes: &'a [u8],
    offset: usize,
}

impl<'a> Atsr<'a> {
    /// The root ports listed (when not `all_ports`).
    pub fn scopes(&self) -> Scopes<'a> {
        Scopes::new(self.scopes)
    }

    /// Offset of the structure in the table.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// Remapping hardware static affinity (VT-d 4.1 §8.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rhsa {
    /// Register base of the DRHD it describes.
    pub register_base: u64,
    /// ACPI proximity domain.
    pub proximity_domain: u32,
}

/// SoC integrated address translation cache (VT-d 4.1 §8.8).
#[derive(Clone, Copy, Debug)]
pub struct Satc<'a> {
    /// ATC_REQUIRED: the listed devices must have their ATC enabled to work
    /// correctly (else they only may).
    pub atc_required: bool,
    /// PCI segment.
    pub segment: u16,
    scopes: &'a [u8],
    offset: usize,
}

impl<'a> Satc<'a> {
    /// The devices with an address translation cache.
    pub fn scopes(&self) -> Scopes<'a> {
        Scopes::new(self.scopes)
    }

    /// Offset of the structure in the table.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// Device scope entries of a structure (VT-d 4.1 §8.3.1).
#[derive(Clone, Debug)]
pub struct Scopes<'a> {
    bytes: &'a [u8],
    off: usize,
}

impl<'a> Scopes<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, off: 0 }
    }
}

impl<'a> Iterator for Scopes<'a> {
    type Item = Result<DeviceScope<'a>, FirmwareError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.off >= self.bytes.len() {
            return None;
        }
        let at = self.off;
        let r = Reader(self.bytes);
        let parsed = (|| {
            let kind = r.u8(at)?;
            let len = usize::from(r.u8(at + 1)?);
            // 6 fixed bytes and at least one 2-byte path element.
            if len < 8 || len % 2 != 0 {
                return Err(FirmwareError::BadLength { offset: at, len });
            }
            let b = r.slice(at, len)?;
            Ok(DeviceScope {
                kind: ScopeKind::from_raw(kind),
                enumeration_id: b[4],
                start_bus: b[5],
                path: &b[6..],
                offset: at,
            })
        })();
        match &parsed {
            Ok(s) => self.off = at + 6 + s.path.len(),
            Err(_) => self.off = self.bytes.len(),
        }
        Some(parsed)
    }
}

/// What a device scope names (VT-d 4.1 §8.3.1, Table 19).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ScopeKind {
    /// A PCI endpoint (path ends at the function).
    PciEndpoint,
    /// A PCI bridge and every device below it.
    PciSubHierarchy,
    /// An I/O APIC (enumeration ID = its APIC ID).
    IoApic,
    /// An MSI-capable HPET (enumeration ID = its number).
    Hpet,
    /// An ACPI namespace device (enumeration ID = ANDD device number).
    AcpiNamespace,
    /// A reserved type.
    Other(u8),
}

impl ScopeKind {
    fn from_raw(v: u8) -> Self {
        match v {
            1 => Self::PciEndpoint,
            2 => Self::PciSubHierarchy,
            3 => Self::IoApic,
            4 => Self::Hpet,
            5 => Self::AcpiNamespace,
            o => Self::Other(o),
        }
    }
}

/// One device scope entry.
#[derive(Clone, Copy, Debug)]
pub struct DeviceScope<'a> {
    /// What it names.
    pub kind: ScopeKind,
    /// IOAPIC ID, HPET number or ANDD device number (0 for PCI scopes).
    pub enumeration_id: u8,
    /// Bus the path starts on.
    pub start_bus: u8,
    path: &'a [u8],
    offset: usize,
}

/// Where a device scope leads once its path is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ResolvedScope {
    /// The function at the end of the path: the endpoint, the bridge of a
    /// sub-hierarchy, or the source-id of an IOAPIC/HPET/namespace device.
    pub device: DeviceId,
    /// For a sub-hierarchy: the bridge's secondary and subordinate buses.
    pub buses: Option<(u8, u8)>,
}

impl DeviceScope<'_> {
    /// The (device, function) pairs of the path, from the start bus down.
    pub fn path(&self) -> impl Iterator<Item = (u8, u8)> + '_ {
        self.path.chunks_exact(2).map(|p| (p[0], p[1]))
    }

    /// Follows the path through bridges (VT-d 4.1 §8.3.1.1): each element
    /// but the last names a bridge whose secondary bus carries the next.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn resolve(
        &self,
        segment: u16,
        bridges: &impl PciBridges,
    ) -> Result<ResolvedScope, FirmwareError> {
        let mut bus = self.start_bus;
        let mut last = None;
        for (dev, func) in self.path() {
            if let Some(prev) = last {
                let prev: DeviceId = prev;
                let (secondary, _) = bridges.bus_range(segment, prev.bus, prev.devfn).ok_or(
                    FirmwareError::NotABridge {
                        segment,
                        bus: prev.bus,
                        devfn: prev.devfn,
                    },
                )?;
                bus = secondary;
            }
            let d = DeviceId::new(segment, bus, dev, func).ok_or(FirmwareError::BadPath {
                offset: self.offset,
            })?;
            last = Some(d);
        }
        let device = last.ok_or(FirmwareError::BadLength {
            offset: self.offset,
            len: 6,
        })?;
        let buses = if self.kind == ScopeKind::PciSubHierarchy {
            Some(bridges.bus_range(segment, device.bus, device.devfn).ok_or(
                FirmwareError::NotABridge {
                    segment,
                    bus: device.bus,
                    devfn: device.devfn,
                },
            )?)
        } else {
            None
        };
        Ok(ResolvedScope { device, buses })
    }

    /// Whether the scope covers PCI function `dev`: it is the endpoint, or
    /// the bridge of a sub-hierarchy or on a bus below it. IOAPIC, HPET and
    /// namespace scopes cover no PCI function.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn covers(
        &self,
        segment: u16,
        dev: DeviceId,
        bridges: &impl PciBridges,
    ) -> Result<bool, FirmwareError> {
        if dev.segment != segment {
            return Ok(false);
        }
        Ok(match self.kind {
            ScopeKind::PciEndpoint => self.resolve(segment, bridges)?.device == dev,
            ScopeKind::PciSubHierarchy => {
                let r = self.resolve(segment, bridges)?;
                let (secondary, subordinate) = r.buses.unwrap_or((0, 0));
                // Secondary bus 0: the bridge was never numbered, nothing is below it.
                r.device == dev || (secondary != 0 && (secondary..=subordinate).contains(&dev.bus))
            }
            _ => false,
        })
    }
}
