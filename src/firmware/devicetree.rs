//! Devicetree IOMMU bindings: `iommu-map` / `iommu-map-mask` on a PCI host
//! bridge (Linux `Documentation/devicetree/bindings/pci/pci-iommu.txt`) and
//! `iommus` on a platform device (`bindings/iommu/iommu.txt`).
//!
//! The caller finds the node with its own FDT reader and hands over the
//! property values: big-endian 32-bit cells, as stored in the blob.
//!
//! ```text
//! iommu-map      = < rid-base  iommu-phandle  iommu-base  length > …
//! iommu-map-mask = < mask >            (RIDs are ANDed with it first)
//! iommus         = < phandle  specifier… > …   (#iommu-cells of each IOMMU)
//! ```

use super::{FirmwareError, Reader};

/// Most specifier cells [`Iommus`] accepts per IOMMU (real bindings use 0–2).
pub const MAX_IOMMU_CELLS: usize = 4;
/// Bytes of one `iommu-map` entry: four cells.
const MAP_ENTRY_LEN: usize = 16;

/// An IOMMU and the ID (for an SMMU: the StreamID) a device's DMA carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IommuTarget {
    /// Phandle of the IOMMU node.
    pub phandle: u32,
    /// The IOMMU specifier (StreamID for SMMUv3).
    pub id: u32,
}

/// One `iommu-map` entry: RIDs `rid_base .. rid_base + length` go to
/// `phandle` as IDs from `iommu_base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IommuMapEntry {
    /// First requester ID.
    pub rid_base: u32,
    /// Phandle of the IOMMU.
    pub phandle: u32,
    /// First IOMMU specifier.
    pub iommu_base: u32,
    /// Number of requester IDs.
    pub length: u32,
}

/// A host bridge's `iommu-map` (with its `iommu-map-mask`, if any).
#[derive(Clone, Copy, Debug)]
pub struct IommuMap<'a> {
    bytes: &'a [u8],
    mask: u32,
}

impl<'a> IommuMap<'a> {
    /// Checks the property values: `map` a whole number of 4-cell entries,
    /// `mask` (when present) exactly one cell.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn new(map: &'a [u8], mask: Option<&[u8]>) -> Result<Self, FirmwareError> {
        if map.len() % MAP_ENTRY_LEN != 0 {
            return Err(FirmwareError::BadPropertyLength {
                len: map.len(),
                entry: MAP_ENTRY_LEN,
            });
        }
        let mask = match mask {
            None => u32::MAX,
            Some(m) if m.len() == 4 => Reader(m).be32(0)?,
            Some(m) => {
                return Err(FirmwareError::BadPropertyLength {
                    len: m.len(),
                    entry: 4,
                });
            }
        };
        Ok(Self { bytes: map, mask })
    }

    /// The mask applied to requester IDs (all ones without `iommu-map-mask`).
    pub fn mask(&self) -> u32 {
        self.mask
    }

    /// The entries, in order.
    pub fn entries(&self) -> impl Iterator<Item = IommuMapEntry> + 'a {
        self.bytes.chunks_exact(MAP_ENTRY_LEN).map(|c| {
            let cell = |i: usize| u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
            IommuMapEntry {
                rid_base: cell(0),
                phandle: cell(4),
                iommu_base: cell(8),
                length: cell(12),
            }
        })
    }

    /// The IOMMU and ID of requester ID `rid`: the first entry whose range
    /// holds `rid & mask` (Linux `of_map_id`). `None` when no entry does:
    /// the binding then puts the device behind no IOMMU. An ID past 32 bits
    /// is [`FirmwareError::Overflow`].
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn map(&self, rid: u32) -> Result<Option<IommuTarget>, FirmwareError> {
        let masked = rid & self.mask;
        for (i, e) in self.entries().enumerate() {
            let end = u64::from(e.rid_base) + u64::from(e.length);
            if masked < e.rid_base || u64::from(masked) >= end {
                continue;
            }
            let id =
                e.iommu_base
                    .checked_add(masked - e.rid_base)
                    .ok_or(FirmwareError::Overflow {
                        offset: i * MAP_ENTRY_LEN,
                    })?;
            return Ok(Some(IommuTarget {
                phandle: e.phandle,
                id,
            }));
        }
        Ok(None)
    }
}

/// One `iommus` entry: an IOMMU and its specifier cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IommuSpecifier {
    /// Phandle of the IOMMU node.
    pub phandle: u32,
    cells: [u32; MAX_IOMMU_CELLS],
    len: u8,
}

impl IommuSpecifier {
    /// The specifier cells (`#iommu-cells` of them).
    pub fn cells(&self) -> &[u32] {
        &self.cells[..usize::from(self.len)]
    }

    /// The first cell: the StreamID for SMMUv3 (`#iommu-cells = <1>`).
    pub fn stream_id(&self) -> Option<u32> {
        self.cells().first().copied()
    }
}

/// Decodes a device's `iommus` property. `iommu_cells` gives the
/// `#iommu-cells` of the IOMMU node with a phandle (`None` when the caller
/// finds no such node).
pub fn iommus<F: FnMut(u32) -> Option<u32>>(prop: &[u8], iommu_cells: F) -> Iommus<'_, F> {
    Iommus {
        bytes: prop,
        off: 0,
        cells_of: iommu_cells,
    }
}

/// The entries of an `iommus` property ([`iommus`]). After an error the
/// iterator ends.
pub struct Iommus<'a, F> {
    bytes: &'a [u8],
    off: usize,
    cells_of: F,
}

impl<F: FnMut(u32) -> Option<u32>> Iterator for Iommus<'_, F> {
    type Item = Result<IommuSpecifier, FirmwareError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.off >= self.bytes.len() {
            return None;
        }
        let r = self.decode();
        if r.is_err() {
            self.off = self.bytes.len();
        }
        Some(r)
    }
}

impl<F: FnMut(u32) -> Option<u32>> Iommus<'_, F> {
    fn decode(&mut self) -> Result<IommuSpecifier, FirmwareError> {
        if self.bytes.len() % 4 != 0 {
            return Err(FirmwareError::BadPropertyLength {
                len: self.bytes.len(),
                entry: 4,
            });
        }
        let r = Reader(self.bytes);
        let phandle = r.be32(self.off)?;
        let n = (self.cells_of)(phandle)
            .map(|n| n as usize)
            .filter(|&n| n <= MAX_IOMMU_CELLS)
            .ok_or(FirmwareError::BadIommuCells { phandle })?;
        let mut cells = [0u32; MAX_IOMMU_CELLS];
        for (i, c) in cells.iter_mut().take(n).enumerate() {
            *c = r.be32(self.off + 4 + 4 * i)?;
        }
        self.off += 4 + 4 * n;
        Ok(IommuSpecifier {
            phandle,
            cells,
            len: n as u8,
        })
    }
}
