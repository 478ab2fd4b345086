//! Firmware tables: where the IOMMUs are, which StreamID / source-id a
//! device's DMA carries, and which memory must stay mapped.
//!
//! Each parser takes the bytes of one table (or one devicetree property) that
//! the caller located (with the `acpi` or `fdt` crates, or by hand) and decodes
//! them lazily into plain values. Nothing allocates, nothing panics: every
//! read is bounds-checked and anything cut short or inconsistent is a
//! [`FirmwareError`] naming the offset.
//!
//! - [`dmar`]: ACPI DMAR (Intel VT-d 4.1 chapter 8): DRHD, RMRR, ATSR, RHSA, SATC.
//! - [`iort`]: ACPI IORT (Arm DEN 0049E): SMMUv3, root complex, named
//!   component and RMR nodes, ID mappings walked to a StreamID.
//! - [`devicetree`]: `iommu-map`, `iommu-map-mask` and `iommus` property values.

pub mod devicetree;
pub mod dmar;
pub mod iort;

use core::fmt;

/// Why a firmware table could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FirmwareError {
    /// A read of `needed` bytes at `offset` goes past the `len` bytes given.
    Truncated {
        /// Offset of the read.
        offset: usize,
        /// Bytes the read needed.
        needed: usize,
        /// Bytes available.
        len: usize,
    },
    /// The table's signature is not the one the parser decodes.
    BadSignature {
        /// The signature expected.
        expected: [u8; 4],
        /// The signature found.
        found: [u8; 4],
    },
    /// The bytes do not sum to zero (ACPI 6.5 §5.2.6).
    BadChecksum,
    /// A structure's length field is impossible: shorter than its fixed
    /// part, or running past its parent.
    BadLength {
        /// Offset of the structure.
        offset: usize,
        /// The length it claims.
        len: usize,
    },
    /// An IORT ID mapping's output reference names no node.
    BadReference {
        /// The reference (an offset into the table).
        reference: u32,
    },
    /// An ID mapping chain did not end after [`iort::MAX_MAPPING_DEPTH`] hops
    /// (a cycle in the table).
    MappingLoop,
    /// A base + offset computation overflows 32 or 64 bits.
    Overflow {
        /// Offset of the entry whose values overflow.
        offset: usize,
    },
    /// A DMAR device-scope path goes through a function that is not a
    /// bridge, or one the caller could not read.
    NotABridge {
        /// Segment of the function.
        segment: u16,
        /// Bus of the function.
        bus: u8,
        /// `dev << 3 | fn` of the function.
        devfn: u8,
    },
    /// A DMAR device-scope path element names a device above 31 or a
    /// function above 7.
    BadPath {
        /// Offset of the device scope within its parent structure.
        offset: usize,
    },
    /// A devicetree property's length is not a whole number of entries.
    BadPropertyLength {
        /// Length of the property in bytes.
        len: usize,
        /// Bytes per entry.
        entry: usize,
    },
    /// A devicetree `#iommu-cells` value outside 0..=[`devicetree::MAX_IOMMU_CELLS`],
    /// or one the caller could not find.
    BadIommuCells {
        /// The IOMMU's phandle.
        phandle: u32,
    },
}

impl fmt::Display for FirmwareError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Truncated {
                offset,
                needed,
                len,
            } => write!(
                f,
                "table cut short: {needed} bytes at offset {offset:#x}, only {len} bytes given"
            ),
            Self::BadSignature { expected, found } => write!(
                f,
                "signature {:?} where {:?} was expected",
                Sig(found),
                Sig(expected)
            ),
            Self::BadChecksum => write!(f, "table bytes do not sum to zero"),
            Self::BadLength { offset, len } => {
                write!(
                    f,
                    "structure at offset {offset:#x} claims impossible length {len}"
                )
            }
            Self::BadReference { reference } => {
                write!(
                    f,
                    "ID mapping refers to {reference:#x}, where no node starts"
                )
            }
            Self::MappingLoop => write!(f, "ID mapping chain does not end (cycle in the table)"),
            Self::Overflow { offset } => {
                write!(
                    f,
                    "entry at offset {offset:#x} overflows its address or ID range"
                )
            }
            Self::NotABridge {
                segment,
                bus,
                devfn,
            } => write!(
                f,
                "scope path goes through {segment:04x}:{bus:02x}:{:02x}.{}, which is not a bridge",
                devfn >> 3,
                devfn & 7
            ),
            Self::BadPath { offset } => {
                write!(
                    f,
                    "device scope at offset {offset:#x} names a device > 31 or function > 7"
                )
            }
            Self::BadPropertyLength { len, entry } => write!(
                f,
                "property of {len} bytes is not a whole number of {entry}-byte entries"
            ),
            Self::BadIommuCells { phandle } => {
                write!(f, "IOMMU phandle {phandle:#x} has no usable #iommu-cells")
            }
        }
    }
}

impl core::error::Error for FirmwareError {}

struct Sig([u8; 4]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            let c = if b.is_ascii_graphic() { b as char } else { '?' };
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// A physical memory range that must stay identity-mapped for a device
/// (DMAR RMRR, IORT RMR): `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ReservedRegion {
    /// First byte.
    pub base: u64,
    /// Length in bytes (never zero).
    pub len: u64,
}

/// Length of the ACPI system description table header (ACPI 6.5 §5.2.6).
pub const ACPI_HEADER_LEN: usize = 36;

/// The ACPI table header fields a parser needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AcpiHeader {
    /// Four-character signature.
    pub signature: [u8; 4],
    /// Length of the whole table, header included.
    pub length: u32,
    /// Table revision.
    pub revision: u8,
    /// OEM ID.
    pub oem_id: [u8; 6],
}

impl AcpiHeader {
    /// Reads the header of `bytes` and checks its signature is `sig` and its
    /// length fits in `bytes`. Returns the header and the table's bytes (cut
    /// to its length).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn parse<'a>(bytes: &'a [u8], sig: &[u8; 4]) -> Result<(Self, &'a [u8]), FirmwareError> {
        let r = Reader(bytes);
        let signature = r.array::<4>(0)?;
        if &signature != sig {
            return Err(FirmwareError::BadSignature {
                expected: *sig,
                found: signature,
            });
        }
        let length = r.u32(4)?;
        let len = length as usize;
        if len < ACPI_HEADER_LEN {
            return Err(FirmwareError::BadLength { offset: 0, len });
        }
        let table = r.slice(0, len)?;
        Ok((
            Self {
                signature,
                length,
                revision: r.u8(8)?,
                oem_id: r.array::<6>(10)?,
            },
            table,
        ))
    }
}

/// Whether the bytes of an ACPI table sum to zero (ACPI 6.5 §5.2.6). The
/// parsers do not insist on it (firmware fixes checksums late, and a
/// hypervisor may patch tables); call it when you want to.
pub fn acpi_checksum_ok(table: &[u8]) -> bool {
    table.iter().fold(0u8, |s, &b| s.wrapping_add(b)) == 0
}

/// Bounds-checked little-endian reads of a byte slice.
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn slice(&self, offset: usize, needed: usize) -> Result<&'a [u8], FirmwareError> {
        let err = FirmwareError::Truncated {
            offset,
            needed,
            len: self.0.len(),
        };
        let end = offset.checked_add(needed).ok_or(err)?;
        self.0.get(offset..end).ok_or(err)
    }

    pub(crate) fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N], FirmwareError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.slice(offset, N)?);
        Ok(a)
    }

    pub(crate) fn u8(&self, offset: usize) -> Result<u8, FirmwareError> {
        Ok(self.array::<1>(offset)?[0])
    }

    pub(crate) fn u16(&self, offset: usize) -> Result<u16, FirmwareError> {
        Ok(u16::from_le_bytes(self.array(offset)?))
    }

    pub(crate) fn u32(&self, offset: usize) -> Result<u32, FirmwareError> {
        Ok(u32::from_le_bytes(self.array(offset)?))
    }

    pub(crate) fn u64(&self, offset: usize) -> Result<u64, FirmwareError> {
        Ok(u64::from_le_bytes(self.array(offset)?))
    }

    pub(crate) fn be32(&self, offset: usize) -> Result<u32, FirmwareError> {
        Ok(u32::from_be_bytes(self.array(offset)?))
    }
}
