//! Mapping attributes and DMA direction.

use bitflags::bitflags;

bitflags! {
    /// Attributes of one linked range, independent of the descriptor format.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MapAttrs: u32 {
        /// The device may read (DMA to the device).
        const READ = 1 << 0;
        /// The device may write (DMA from the device).
        const WRITE = 1 << 1;
        /// The target is MMIO / device memory (P2P through the host bridge):
        /// Arm Device-nGnRE, VT-d no snoop.
        const MMIO = 1 << 2;
        /// Only privileged transactions may use the mapping (Arm stage 1 AP[1]=0).
        const PRIVILEGED = 1 << 3;
        /// Instruction fetches are not allowed (Arm XN).
        const NO_EXEC = 1 << 4;
        /// The caller does CPU cache maintenance itself (not a table bit; kept
        /// for the caller's own bookkeeping, never encoded).
        const SKIP_CPU_SYNC = 1 << 5;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for MapAttrs {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "MapAttrs({=u32:#x})", self.bits())
    }
}

/// Direction of a DMA transfer, from the CPU's point of view (as Linux's
/// `enum dma_data_direction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum DmaDirection {
    /// Memory → device: the device reads.
    ToDevice = 1,
    /// Device → memory: the device writes.
    FromDevice = 2,
    /// Both.
    Bidirectional = 3,
}

impl DmaDirection {
    /// The read/write permissions the IOMMU must grant for this direction.
    pub const fn attrs(self) -> MapAttrs {
        match self {
            DmaDirection::ToDevice => MapAttrs::READ,
            DmaDirection::FromDevice => MapAttrs::WRITE,
            DmaDirection::Bidirectional => MapAttrs::READ.union(MapAttrs::WRITE),
        }
    }

    pub(crate) const fn from_bits(b: u8) -> Option<Self> {
        match b {
            1 => Some(DmaDirection::ToDevice),
            2 => Some(DmaDirection::FromDevice),
            3 => Some(DmaDirection::Bidirectional),
            _ => None,
        }
    }
}
