//! The descriptor-format trait the generic walker is written against.

use super::MapAttrs;
use crate::addr::PhysAddr;
use crate::backend::TableFormat;

/// One decoded descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Pte {
    /// Not present.
    Invalid,
    /// Points to the next-level table.
    Table(PhysAddr),
    /// Maps a page (height 0) or a block / superpage (height > 0).
    Leaf {
        /// Output address.
        pa: PhysAddr,
        /// The attributes the descriptor encodes.
        attrs: MapAttrs,
    },
}

/// A descriptor format: how one 64-bit table entry encodes a table pointer
/// or a leaf. Heights count from the leaf level: height 0 maps 4 KiB, height 1
/// 2 MiB, height 2 1 GiB, height 3 512 GiB.
pub trait PteFormat: Copy {
    /// The format tag handed to backends.
    const KIND: TableFormat;

    /// First of the ten bits of a table descriptor (one [`table`](Self::table)
    /// made) that the IOMMU ignores and the walker keeps the pointed-to
    /// table's valid-entry count in: bits 11:2 on Arm, 61:52 on VT-d (see
    /// the `counts` module). `decode` must read a table descriptor with any
    /// count there as the same table.
    const COUNT_SHIFT: u32;

    /// The count's ten bits in a table descriptor (from
    /// [`COUNT_SHIFT`](Self::COUNT_SHIFT)): `(pte & COUNT_MASK) >>
    /// COUNT_SHIFT` is the pointed-to table's valid-entry count.
    const COUNT_MASK: u64 = super::counts::COUNT_BITS << Self::COUNT_SHIFT;

    /// Whether a leaf (block / superpage) may be written at `height`.
    fn leaf_allowed(&self, height: u32) -> bool;

    /// Output address bits: physical addresses must be below `1 << oa_bits()`.
    fn oa_bits(&self) -> u32;

    /// Descriptor pointing to a next-level table at `pa`.
    fn table(&self, pa: PhysAddr) -> u64;

    /// Leaf descriptor at `height` mapping `pa` with `attrs`. For a
    /// page-aligned `pa` below `1 << oa_bits()` it must equal
    /// `pa | leaf(0, height, attrs)` (address bits ORed with attribute bits):
    /// the walker relies on it to write runs of descriptors quickly.
    fn leaf(&self, pa: PhysAddr, height: u32, attrs: MapAttrs) -> u64;

    /// Decodes a descriptor found at `height`.
    fn decode(&self, pte: u64, height: u32) -> Pte;

    /// Whether `pte` at `height` is a leaf: `decode` gives
    /// [`Pte::Leaf`]. Formats answer without decoding the attributes.
    #[inline]
    fn is_leaf(&self, pte: u64, height: u32) -> bool {
        matches!(self.decode(pte, height), Pte::Leaf { .. })
    }

    /// The attributes a leaf written with `attrs` decodes back to: what the
    /// format can express (e.g. stage 1 is always readable, VT-d has no XN).
    fn canonical(&self, attrs: MapAttrs) -> MapAttrs;
}
