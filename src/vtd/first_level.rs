//! VT-d first-level paging entries (VT-d 9.7): x86-64 4-level paging, used
//! by scalable-mode PASID entries with PGTT = 001b.
//!
//! Bits: 0 P, 1 R/W, 2 U/S, 3 PWT, 4 PCD, 5 A and 6 D (set by the hardware),
//! 7 PS (leaf at 2 MiB / 1 GiB), address bits `[HAW-1:12]`. MMIO leaves (P2P
//! through the host bridge) set PCD | PWT: PAT entry 3, uncacheable. Every present leaf is readable;
//! requests without PASID are user requests, so every entry sets U/S.

use crate::addr::PhysAddr;
use crate::backend::TableFormat;
use crate::pgtable::{MapAttrs, Pte, PteFormat};

/// First-level format, configured from the unit's capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdFirstLevel {
    /// CAP.FL1GP: 1 GiB pages allowed (2 MiB pages always are).
    pub fl1gp: bool,
    /// Host address width (CAP.MGAW); outputs must be below it.
    pub haw: u8,
}

impl VtdFirstLevel {
    const P: u64 = 1;
    const RW: u64 = 1 << 1;
    const US: u64 = 1 << 2;
    const PWT: u64 = 1 << 3;
    const PCD: u64 = 1 << 4;
    const PS: u64 = 1 << 7;

    fn addr_mask(&self) -> u64 {
        let haw = u32::from(self.haw).clamp(13, 52);
        ((1u64 << haw) - 1) & !0xfff
    }
}

impl PteFormat for VtdFirstLevel {
    const KIND: TableFormat = TableFormat::VtdFirstLevel;
    /// Bits 61:52, ignored in a non-leaf entry.
    const COUNT_SHIFT: u32 = 52;

    fn leaf_allowed(&self, height: u32) -> bool {
        match height {
            0 | 1 => true,
            2 => self.fl1gp,
            _ => false,
        }
    }

    fn oa_bits(&self) -> u32 {
        u32::from(self.haw).clamp(13, 52)
    }

    fn table(&self, pa: PhysAddr) -> u64 {
        // Non-leaf entries allow everything; the leaf decides.
        (pa.0 & self.addr_mask()) | Self::US | Self::RW | Self::P
    }

    fn leaf(&self, pa: PhysAddr, height: u32, attrs: MapAttrs) -> u64 {
        let mut v = (pa.0 & self.addr_mask()) | Self::US | Self::P;
        if attrs.contains(MapAttrs::WRITE) {
            v |= Self::RW;
        }
        if height > 0 {
            v |= Self::PS;
        }
        if attrs.contains(MapAttrs::MMIO) {
            v |= Self::PCD | Self::PWT;
        }
        v
    }

    fn decode(&self, pte: u64, height: u32) -> Pte {
        if pte & Self::P == 0 {
            return Pte::Invalid;
        }
        let pa = PhysAddr(pte & self.addr_mask());
        if height > 0 && pte & Self::PS == 0 {
            return Pte::Table(pa);
        }
        if height > 0 && !self.leaf_allowed(height) {
            return Pte::Invalid;
        }
        let mut attrs = MapAttrs::READ;
        if pte & Self::RW != 0 {
            attrs |= MapAttrs::WRITE;
        }
        if pte & (Self::PCD | Self::PWT) == Self::PCD | Self::PWT {
            attrs |= MapAttrs::MMIO;
        }
        Pte::Leaf { pa, attrs }
    }

    fn canonical(&self, attrs: MapAttrs) -> MapAttrs {
        // Present means readable: a write-only link reads back as read-write.
        MapAttrs::READ | (attrs & (MapAttrs::WRITE | MapAttrs::MMIO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: VtdFirstLevel = VtdFirstLevel {
        fl1gp: false,
        haw: 48,
    };

    #[test]
    fn leaf_and_table_entries_match_hand_worked_values() {
        // P | U/S = 0x5, + R/W = 0x7; PS (0x80) at 2 MiB.
        assert_eq!(
            F.leaf(PhysAddr(0x1234_5000), 0, MapAttrs::READ),
            0x1234_5005
        );
        assert_eq!(
            F.leaf(PhysAddr(0x1234_5000), 0, MapAttrs::READ | MapAttrs::WRITE),
            0x1234_5007
        );
        assert_eq!(F.leaf(PhysAddr(0x20_0000), 1, MapAttrs::WRITE), 0x20_0087);
        assert_eq!(F.table(PhysAddr(0xabc_d000)), 0xabc_d007);
        // MMIO: + PWT (0x8) | PCD (0x10) = 0x1d for a read-only page.
        let d = F.leaf(PhysAddr(0x1000_0000), 0, MapAttrs::READ | MapAttrs::MMIO);
        assert_eq!(d, 0x1000_001d);
        assert_eq!(
            F.decode(d, 0),
            Pte::Leaf {
                pa: PhysAddr(0x1000_0000),
                attrs: MapAttrs::READ | MapAttrs::MMIO
            }
        );
    }

    #[test]
    fn decode_ignores_accessed_and_dirty_bits() {
        // A (0x20) and D (0x40) written back by the hardware.
        assert_eq!(
            F.decode(0x1234_5065, 0),
            Pte::Leaf {
                pa: PhysAddr(0x1234_5000),
                attrs: MapAttrs::READ
            }
        );
        assert_eq!(F.decode(0xabc_d027, 1), Pte::Table(PhysAddr(0xabc_d000)));
        assert_eq!(F.decode(0xabc_d006, 0), Pte::Invalid);
    }

    #[test]
    fn one_gib_pages_need_fl1gp() {
        assert!(F.leaf_allowed(1) && !F.leaf_allowed(2));
        let g = VtdFirstLevel {
            fl1gp: true,
            haw: 39,
        };
        assert!(g.leaf_allowed(2));
        assert_eq!(g.oa_bits(), 39);
        assert_eq!(
            F.canonical(MapAttrs::WRITE),
            MapAttrs::READ | MapAttrs::WRITE
        );
    }
}
