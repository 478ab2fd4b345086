//! Arm VMSAv8-64 descriptors, 4 KiB granule: stage 1 (SMMU context
//! descriptor TTB0) and stage 2 (SMMU STE S2TTB).
//!
//! Layout from the Arm ARM (DDI 0487) D8.3 "Translation table descriptor
//! formats": bit 0 valid, bit 1 table/page (0 = block at levels 1–2),
//! output address bits `[47:12]`, lower attributes `[11:2]`, upper `[63:50]`.

use super::{MapAttrs, Pte, PteFormat};
use crate::addr::PhysAddr;
use crate::backend::TableFormat;
use bitflags::bitflags;

/// MAIR value for stage-1 tables written by this crate: Attr0 = Normal
/// write-back read/write-allocate (0xff), Attr1 = Device-nGnRE (0x04),
/// Attr2 = Normal non-cacheable (0x44). Put it in the context descriptor.
pub const MAIR: u64 = 0x00_44_04_ff;
/// AttrIndx of normal cacheable memory in [`MAIR`].
pub const ATTR_IDX_NORMAL: u64 = 0;
/// AttrIndx of Device-nGnRE in [`MAIR`].
pub const ATTR_IDX_DEVICE: u64 = 1;

const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;

bitflags! {
    /// Stage-1 descriptor bits (Arm ARM D8.3.2, D8.4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct S1Bits: u64 {
        /// Descriptor is valid.
        const VALID = 1 << 0;
        /// Table (levels 0–2) or page (level 3) descriptor; clear for a block.
        const TABLE_OR_PAGE = 1 << 1;
        /// AttrIndx[2:0], bits [4:2].
        const ATTR_INDX = 0b111 << 2;
        /// AP[1]: accessible at EL0 (unprivileged).
        const AP_UNPRIV = 1 << 6;
        /// AP[2]: read-only.
        const AP_RDONLY = 1 << 7;
        /// SH[1:0] = 0b10, outer shareable.
        const SH_OUTER = 0b10 << 8;
        /// SH[1:0] = 0b11, inner shareable.
        const SH_INNER = 0b11 << 8;
        /// Access flag.
        const AF = 1 << 10;
        /// Not global: the entry belongs to the ASID.
        const NG = 1 << 11;
        /// Privileged execute-never.
        const PXN = 1 << 53;
        /// (Unprivileged) execute-never.
        const UXN = 1 << 54;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for S1Bits {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "S1Bits({=u64:#x})", self.bits())
    }
}

bitflags! {
    /// Stage-2 descriptor bits (Arm ARM D8.3.2, D8.5.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct S2Bits: u64 {
        /// Descriptor is valid.
        const VALID = 1 << 0;
        /// Table (levels 0–2) or page (level 3) descriptor; clear for a block.
        const TABLE_OR_PAGE = 1 << 1;
        /// MemAttr[3:0], bits [5:2].
        const MEMATTR = 0b1111 << 2;
        /// S2AP[0]: reads allowed.
        const S2AP_R = 1 << 6;
        /// S2AP[1]: writes allowed.
        const S2AP_W = 1 << 7;
        /// SH[1:0] = 0b10, outer shareable.
        const SH_OUTER = 0b10 << 8;
        /// SH[1:0] = 0b11, inner shareable.
        const SH_INNER = 0b11 << 8;
        /// Access flag.
        const AF = 1 << 10;
        /// XN[1] (execute-never).
        const XN = 1 << 54;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for S2Bits {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "S2Bits({=u64:#x})", self.bits())
    }
}

/// Stage-2 MemAttr for Normal, outer and inner write-back.
pub const S2_MEMATTR_NORMAL_WB: u64 = 0b1111 << 2;
/// Stage-2 MemAttr for Device-nGnRE.
pub const S2_MEMATTR_DEVICE_NGNRE: u64 = 0b0001 << 2;

/// Leaves are allowed at heights 1 (2 MiB) and 2 (1 GiB) with a 4 KiB granule.
#[inline]
fn arm_leaf_allowed(height: u32) -> bool {
    height <= 2
}

#[inline]
fn decode_common(pte: u64, height: u32) -> Option<Result<PhysAddr, PhysAddr>> {
    if pte & 1 == 0 {
        return None;
    }
    let pa = PhysAddr(pte & ADDR_MASK);
    let bit1 = pte & 2 != 0;
    match (height, bit1) {
        (0, true) => Some(Err(pa)),                         // page
        (0, false) => None,                                 // reserved at level 3: invalid
        (_, true) => Some(Ok(pa)),                          // table
        (h, false) if arm_leaf_allowed(h) => Some(Err(pa)), // block
        _ => None,                                          // block not allowed here: invalid
    }
}

/// Arm VMSAv8-64 stage 1, 4 KiB granule, 48-bit output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ArmStage1;

impl PteFormat for ArmStage1 {
    const KIND: TableFormat = TableFormat::ArmStage1;
    /// Bits 11:2, IGNORED in a table descriptor (no FEAT_LPA2 `DS`, no
    /// FEAT_HAFT).
    const COUNT_SHIFT: u32 = 2;

    #[inline]
    fn leaf_allowed(&self, height: u32) -> bool {
        arm_leaf_allowed(height)
    }

    #[inline]
    fn is_leaf(&self, pte: u64, height: u32) -> bool {
        matches!(decode_common(pte, height), Some(Err(_)))
    }

    #[inline]
    fn oa_bits(&self) -> u32 {
        48
    }

    #[inline]
    fn table(&self, pa: PhysAddr) -> u64 {
        (pa.0 & ADDR_MASK) | (S1Bits::VALID | S1Bits::TABLE_OR_PAGE).bits()
    }

    #[inline]
    fn leaf(&self, pa: PhysAddr, height: u32, attrs: MapAttrs) -> u64 {
        let mut b = S1Bits::VALID | S1Bits::AF | S1Bits::NG;
        if height == 0 {
            b |= S1Bits::TABLE_OR_PAGE;
        }
        if !attrs.contains(MapAttrs::WRITE) {
            b |= S1Bits::AP_RDONLY;
        }
        if !attrs.contains(MapAttrs::PRIVILEGED) {
            b |= S1Bits::AP_UNPRIV;
        }
        if attrs.contains(MapAttrs::NO_EXEC) {
            b |= S1Bits::PXN | S1Bits::UXN;
        }
        let idx = if attrs.contains(MapAttrs::MMIO) {
            b |= S1Bits::SH_OUTER;
            ATTR_IDX_DEVICE
        } else {
            b |= S1Bits::SH_INNER;
            ATTR_IDX_NORMAL
        };
        (pa.0 & ADDR_MASK) | b.bits() | (idx << 2)
    }

    #[inline]
    fn decode(&self, pte: u64, height: u32) -> Pte {
        match decode_common(pte, height) {
            None => Pte::Invalid,
            Some(Ok(pa)) => Pte::Table(pa),
            Some(Err(pa)) => {
                let b = S1Bits::from_bits_retain(pte);
                let mut attrs = MapAttrs::READ;
                if !b.contains(S1Bits::AP_RDONLY) {
                    attrs |= MapAttrs::WRITE;
                }
                if !b.contains(S1Bits::AP_UNPRIV) {
                    attrs |= MapAttrs::PRIVILEGED;
                }
                if b.contains(S1Bits::UXN) {
                    attrs |= MapAttrs::NO_EXEC;
                }
                if (pte >> 2) & 0b111 == ATTR_IDX_DEVICE {
                    attrs |= MapAttrs::MMIO;
                }
                Pte::Leaf { pa, attrs }
            }
        }
    }

    fn canonical(&self, attrs: MapAttrs) -> MapAttrs {
        (attrs - MapAttrs::SKIP_CPU_SYNC) | MapAttrs::READ
    }
}

/// Arm VMSAv8-64 stage 2, 4 KiB granule, 48-bit output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ArmStage2;

impl PteFormat for ArmStage2 {
    const KIND: TableFormat = TableFormat::ArmStage2;
    /// Bits 11:2, IGNORED in a table descriptor (no FEAT_LPA2 `DS`, no
    /// FEAT_HAFT).
    const COUNT_SHIFT: u32 = 2;

    #[inline]
    fn leaf_allowed(&self, height: u32) -> bool {
        arm_leaf_allowed(height)
    }

    #[inline]
    fn is_leaf(&self, pte: u64, height: u32) -> bool {
        matches!(decode_common(pte, height), Some(Err(_)))
    }

    #[inline]
    fn oa_bits(&self) -> u32 {
        48
    }

    #[inline]
    fn table(&self, pa: PhysAddr) -> u64 {
        (pa.0 & ADDR_MASK) | (S2Bits::VALID | S2Bits::TABLE_OR_PAGE).bits()
    }

    #[inline]
    fn leaf(&self, pa: PhysAddr, height: u32, attrs: MapAttrs) -> u64 {
        let mut b = S2Bits::VALID | S2Bits::AF;
        if height == 0 {
            b |= S2Bits::TABLE_OR_PAGE;
        }
        if attrs.contains(MapAttrs::READ) {
            b |= S2Bits::S2AP_R;
        }
        if attrs.contains(MapAttrs::WRITE) {
            b |= S2Bits::S2AP_W;
        }
        if attrs.contains(MapAttrs::NO_EXEC) {
            b |= S2Bits::XN;
        }
        let memattr = if attrs.contains(MapAttrs::MMIO) {
            b |= S2Bits::SH_OUTER;
            S2_MEMATTR_DEVICE_NGNRE
        } else {
            b |= S2Bits::SH_INNER;
            S2_MEMATTR_NORMAL_WB
        };
        (pa.0 & ADDR_MASK) | b.bits() | memattr
    }

    #[inline]
    fn decode(&self, pte: u64, height: u32) -> Pte {
        match decode_common(pte, height) {
            None => Pte::Invalid,
            Some(Ok(pa)) => Pte::Table(pa),
            Some(Err(pa)) => {
                let b = S2Bits::from_bits_retain(pte);
                let mut attrs = MapAttrs::empty();
                if b.contains(S2Bits::S2AP_R) {
                    attrs |= MapAttrs::READ;
                }
                if b.contains(S2Bits::S2AP_W) {
                    attrs |= MapAttrs::WRITE;
                }
                if b.contains(S2Bits::XN) {
                    attrs |= MapAttrs::NO_EXEC;
                }
                if pte & S2Bits::MEMATTR.bits() == S2_MEMATTR_DEVICE_NGNRE {
                    attrs |= MapAttrs::MMIO;
                }
                Pte::Leaf { pa, attrs }
            }
        }
    }

    fn canonical(&self, attrs: MapAttrs) -> MapAttrs {
        attrs - MapAttrs::SKIP_CPU_SYNC - MapAttrs::PRIVILEGED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values worked out by hand from DDI 0487 D8.3 / D8.4 / D8.5.
    #[test]
    fn stage1_page_rw_normal() {
        // valid|page (0b11), AttrIndx 0, AP[1]=1 (0x40), AP[2]=0, SH=11 (0x300),
        // AF (0x400), nG (0x800): 0x40 | 0x300 | 0x400 | 0x800 | 3 = 0xf43.
        let d = ArmStage1.leaf(PhysAddr(0x8_1234_5000), 0, MapAttrs::READ | MapAttrs::WRITE);
        assert_eq!(d, 0x0000_0008_1234_5f43);
    }

    #[test]
    fn stage1_block_readonly_device_noexec() {
        // block (0b01), AttrIndx 1 (0x4), AP[1] (0x40), AP[2] (0x80), SH=10 (0x200),
        // AF, nG, PXN (1<<53), UXN (1<<54).
        let d = ArmStage1.leaf(
            PhysAddr(0x4020_0000),
            1,
            MapAttrs::READ | MapAttrs::MMIO | MapAttrs::NO_EXEC,
        );
        assert_eq!(d, 0x0060_0000_4020_0ec5);
        assert_eq!(
            ArmStage1.decode(d, 1),
            Pte::Leaf {
                pa: PhysAddr(0x4020_0000),
                attrs: MapAttrs::READ | MapAttrs::MMIO | MapAttrs::NO_EXEC
            }
        );
    }

    #[test]
    fn stage1_privileged_clears_ap1() {
        let d = ArmStage1.leaf(PhysAddr(0x1000), 0, MapAttrs::READ | MapAttrs::PRIVILEGED);
        assert_eq!(d & (1 << 6), 0);
        assert_eq!(d & (1 << 7), 1 << 7);
    }

    #[test]
    fn table_descriptor_and_invalid_encodings() {
        assert_eq!(ArmStage1.table(PhysAddr(0x4567_8000)), 0x4567_8003);
        assert_eq!(ArmStage2.table(PhysAddr(0x4567_8000)), 0x4567_8003);
        assert_eq!(
            ArmStage1.decode(0x4567_8003, 2),
            Pte::Table(PhysAddr(0x4567_8000))
        );
        // 0b01 at level 3 is reserved and treated as invalid; a block at level 0 too.
        assert_eq!(ArmStage1.decode(0x4567_8001, 0), Pte::Invalid);
        assert_eq!(ArmStage1.decode(0x4567_8001, 3), Pte::Invalid);
        assert_eq!(ArmStage1.decode(0x4567_8002, 1), Pte::Invalid);
    }

    #[test]
    fn stage2_page_and_block() {
        // page: 0b11, MemAttr 1111 (0x3c), S2AP R|W (0xc0), SH 11 (0x300), AF (0x400) = 0x7ff.
        let d = ArmStage2.leaf(PhysAddr(0x8000_0000), 0, MapAttrs::READ | MapAttrs::WRITE);
        assert_eq!(d, 0x8000_07ff);
        // block, write-only, Device-nGnRE (MemAttr 0001 = 0x4), SH 10 (0x200), AF, XN.
        let d = ArmStage2.leaf(
            PhysAddr(0x4000_0000),
            2,
            MapAttrs::WRITE | MapAttrs::MMIO | MapAttrs::NO_EXEC,
        );
        assert_eq!(d, 0x0040_0000_4000_0685);
        assert_eq!(
            ArmStage2.decode(d, 2),
            Pte::Leaf {
                pa: PhysAddr(0x4000_0000),
                attrs: MapAttrs::WRITE | MapAttrs::MMIO | MapAttrs::NO_EXEC
            }
        );
    }

    #[test]
    fn mair_attr_fields() {
        assert_eq!(MAIR & 0xff, 0xff);
        assert_eq!((MAIR >> 8) & 0xff, 0x04);
        assert_eq!((MAIR >> 16) & 0xff, 0x44);
    }
}
