//! Just enough ACPI: RSDP → RSDT/XSDT → DMAR (decoded by the library's
//! `firmware::dmar`), MCFG (ECAM) and FADT (PM1a control port). Parsed by
//! hand, every read bounds-checked.
//!
//! Layouts: ACPI 6.5 §5.2.5 (RSDP), §5.2.6 (header), §5.2.7/8 (RSDT/XSDT),
//! §5.2.9 (FADT); PCI Firmware 3.3 §4.1.2 (MCFG); VT-d 4.1 §8.1/§8.3 (DMAR, DRHD).

use bare_iommu::firmware::FirmwareError;
use bare_iommu::firmware::dmar::Dmar;
use core::fmt;

/// Longest table this parser accepts (QEMU's are a few KiB).
const MAX_TABLE_LEN: u32 = 1 << 20;
/// The identity map covers `[0, 4 GiB)`.
const MAPPED_LIMIT: u64 = 1 << 32;
const HEADER_LEN: usize = 36;

/// Why the ACPI tables could not be used.
#[derive(Debug)]
pub enum AcpiError {
    /// No RSDP at the address PVH gave, nor in the BIOS area.
    NoRsdp,
    /// A table lies outside the identity-mapped 4 GiB.
    Unmapped(u64),
    /// A table's length is shorter than its header or absurdly long.
    BadLength { sig: [u8; 4], len: u32 },
    /// A table's bytes do not sum to zero.
    BadChecksum([u8; 4]),
    /// A required table is absent.
    Missing(&'static str),
    /// The library's DMAR parser refused the table.
    Dmar(FirmwareError),
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRsdp => write!(f, "no RSDP"),
            Self::Unmapped(pa) => write!(f, "table at {pa:#x} is above 4 GiB"),
            Self::BadLength { sig, len } => {
                write!(f, "table {} has length {len}", Sig(sig))
            }
            Self::BadChecksum(sig) => write!(f, "table {} has a bad checksum", Sig(sig)),
            Self::Missing(what) => write!(f, "no {what} table"),
            Self::Dmar(e) => write!(f, "DMAR: {e}"),
        }
    }
}

struct Sig<'a>(&'a [u8; 4]);

impl fmt::Display for Sig<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// One MCFG allocation: the ECAM window of a segment's bus range.
#[derive(Clone, Copy, Debug)]
pub struct EcamWindow {
    /// Physical base of bus `start_bus`'s configuration space.
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// What the board needs from ACPI.
#[derive(Clone, Debug)]
pub struct AcpiInfo {
    /// Register base of the first DRHD (QEMU: 0xfed90000).
    pub drhd_base: u64,
    /// Size of its register block: 2^Size 4 KiB pages (DMAR DRHD byte 5,
    /// bits 3:0; VT-d 8.3). QEMU: 0, one page.
    pub drhd_len: usize,
    /// Number of DRHD structures.
    pub drhd_count: usize,
    /// DMAR host address width (the field holds width − 1; this is the width).
    pub host_address_width: u8,
    /// The DMAR table's bytes (for `Dmar::unit_for` and RMRRs).
    pub dmar: &'static [u8],
    /// Segment-0 ECAM window from MCFG.
    pub ecam: EcamWindow,
    /// PM1a control port from the FADT, if it has one.
    pub pm1a_cnt: Option<u16>,
    /// Local APIC IDs of the enabled CPUs the MADT lists, in its order (at
    /// most [`MAX_CPUS`]); empty without a MADT.
    pub cpus: heapless::Vec<u32, MAX_CPUS>,
}

/// CPUs the board keeps track of.
pub const MAX_CPUS: usize = board_common::smp::MAX_CPUS;

/// The enabled processors of a MADT (ACPI 6.5 §5.2.12): Processor Local
/// APIC (type 0, APIC ID at byte 3) and Processor Local x2APIC (type 9,
/// x2APIC ID at bytes 4..8) entries whose flags (bytes 4..8 / 8..12) have
/// Enabled (bit 0) set. The entries start after the header and the 8 bytes
/// of local interrupt controller address and flags.
fn madt_cpus(madt: &[u8]) -> heapless::Vec<u32, MAX_CPUS> {
    let mut cpus = heapless::Vec::new();
    let mut off = HEADER_LEN + 8;
    while let (Some(&kind), Some(&len)) = (madt.get(off), madt.get(off + 1)) {
        if len < 2 {
            break;
        }
        let (id, flags) = match kind {
            0 => (
                madt.get(off + 3).map(|&b| u32::from(b)),
                le32(madt, off + 4),
            ),
            9 => (le32(madt, off + 4), le32(madt, off + 8)),
            _ => (None, None),
        };
        if let (Some(id), Some(flags)) = (id, flags)
            && flags & 1 != 0
            && !cpus.contains(&id)
        {
            let _ = cpus.push(id);
        }
        off += usize::from(len);
    }
    cpus
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The bytes `[pa, pa + len)` of identity-mapped firmware memory.
fn phys_bytes(pa: u64, len: usize) -> Result<&'static [u8], AcpiError> {
    let end = pa.checked_add(len as u64).ok_or(AcpiError::Unmapped(pa))?;
    if pa == 0 || end > MAPPED_LIMIT {
        return Err(AcpiError::Unmapped(pa));
    }
    // SAFETY: `[pa, end)` is below 4 GiB, identity-mapped by the boot code;
    // ACPI tables are firmware-reserved RAM that nothing writes while we run.
    Ok(unsafe { core::slice::from_raw_parts(pa as usize as *const u8, len) })
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0
}

/// A whole system description table, header validated.
fn table(pa: u64) -> Result<(&'static [u8], [u8; 4]), AcpiError> {
    let head = phys_bytes(pa, HEADER_LEN)?;
    let mut sig = [0u8; 4];
    sig.copy_from_slice(&head[..4]);
    let len = le32(head, 4).unwrap_or(0);
    if (len as usize) < HEADER_LEN || len > MAX_TABLE_LEN {
        return Err(AcpiError::BadLength { sig, len });
    }
    let bytes = phys_bytes(pa, len as usize)?;
    if !checksum_ok(bytes) {
        return Err(AcpiError::BadChecksum(sig));
    }
    Ok((bytes, sig))
}

fn find_rsdp(hint: u64) -> Result<&'static [u8], AcpiError> {
    let valid = |pa: u64| -> Option<&'static [u8]> {
        let b = phys_bytes(pa, 20).ok()?;
        (b.get(..8)? == b"RSD PTR " && checksum_ok(b)).then_some(b)
    };
    if hint != 0
        && let Some(b) = valid(hint)
    {
        // Revision ≥ 2 has a 36-byte structure with the XSDT address.
        if b.get(15).copied().unwrap_or(0) >= 2 {
            return phys_bytes(hint, 36);
        }
        return Ok(b);
    }
    // ACPI §5.2.5.1: 16-byte aligned in the BIOS area 0xe0000–0xfffff.
    let mut pa = 0xe0000u64;
    while pa < 0x10_0000 {
        if valid(pa).is_some() {
            return find_rsdp(pa);
        }
        pa += 16;
    }
    Err(AcpiError::NoRsdp)
}

/// Walks the tables from the RSDP at `rsdp_hint` (0: search the BIOS area).
pub fn parse(rsdp_hint: u64) -> Result<AcpiInfo, AcpiError> {
    let rsdp = find_rsdp(rsdp_hint)?;
    // Prefer the XSDT (8-byte entries) when the RSDP has one.
    let (root, entry_len) = match le64(rsdp, 24).filter(|&x| x != 0) {
        Some(xsdt) => (table(xsdt)?.0, 8),
        None => {
            let rsdt = le32(rsdp, 16).unwrap_or(0);
            (table(u64::from(rsdt))?.0, 4)
        }
    };
    let mut dmar = None;
    let mut mcfg = None;
    let mut fadt = None;
    let mut madt = None;
    let mut off = HEADER_LEN;
    while off + entry_len <= root.len() {
        let pa = if entry_len == 8 {
            le64(root, off)
        } else {
            le32(root, off).map(u64::from)
        };
        off += entry_len;
        let Some(pa) = pa else { break };
        let Ok((bytes, sig)) = table(pa) else {
            continue;
        };
        match &sig {
            b"DMAR" => dmar = Some(bytes),
            b"MCFG" => mcfg = Some(bytes),
            b"FACP" => fadt = Some(bytes),
            b"APIC" => madt = Some(bytes),
            _ => {}
        }
    }
    let dmar = dmar.ok_or(AcpiError::Missing("DMAR"))?;
    let mcfg = mcfg.ok_or(AcpiError::Missing("MCFG"))?;

    // DMAR: decoded by the library (bare_iommu::firmware::dmar); the board
    // drives the first unit and keeps the table for per-device lookups.
    let parsed = Dmar::new(dmar).map_err(AcpiError::Dmar)?;
    let haw = parsed.host_address_width();
    let mut first = None;
    let mut drhd_count = 0;
    for unit in parsed.units() {
        let unit = unit.map_err(AcpiError::Dmar)?;
        drhd_count += 1;
        first.get_or_insert(unit);
    }
    let first = first.ok_or(AcpiError::Missing("DRHD in DMAR"))?;
    let drhd_base = first.register_base;
    let drhd_len = usize::try_from(first.register_len()).unwrap_or(usize::MAX);

    // MCFG: header, 8 reserved bytes, then 16-byte allocations.
    let mut ecam = None;
    let mut off = 44;
    while off + 16 <= mcfg.len() {
        let base = le64(mcfg, off);
        let segment = le16(mcfg, off + 8);
        let start_bus = mcfg.get(off + 10).copied();
        let end_bus = mcfg.get(off + 11).copied();
        if let (Some(base), Some(0), Some(start_bus), Some(end_bus)) =
            (base, segment, start_bus, end_bus)
        {
            ecam = Some(EcamWindow {
                base,
                segment: 0,
                start_bus,
                end_bus,
            });
            break;
        }
        off += 16;
    }
    let ecam = ecam.ok_or(AcpiError::Missing("segment-0 allocation in MCFG"))?;

    // FADT: PM1a_CNT_BLK (u32 I/O port) at offset 64.
    let pm1a_cnt = fadt
        .and_then(|f| le32(f, 64))
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0);

    Ok(AcpiInfo {
        drhd_base,
        drhd_len,
        drhd_count,
        host_address_width: haw,
        dmar,
        ecam,
        pm1a_cnt,
        cpus: madt.map(madt_cpus).unwrap_or_default(),
    })
}
