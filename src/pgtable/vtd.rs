//! Intel VT-d second-level paging entries, 4 KiB granule.
//!
//! Layout from the VT-d specification, 9.8 "Second-Level Paging Entries":
//! bit 0 R, bit 1 W, bit 7 PS (leaf at 2 MiB / 1 GiB), bit 11 SNP (snoop,
//! only when `ECAP.SC`), address bits [HAW-1:12]. An entry with R = W = 0 is
//! not present.

use super::{MapAttrs, Pte, PteFormat};
use crate::addr::PhysAddr;
use crate::backend::TableFormat;
use bitflags::bitflags;

bitflags! {
    /// Second-level entry bits (VT-d 9.8).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SlBits: u64 {
        /// Read permission.
        const R = 1 << 0;
        /// Write permission.
        const W = 1 << 1;
        /// Page size: this entry maps a 2 MiB or 1 GiB superpage.
        const PS = 1 << 7;
        /// Snoop: force snooped accesses (valid only when `ECAP.SC`).
        const SNP = 1 << 11;
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for SlBits {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "SlBits({=u64:#x})", self.bits())
    }
}

/// VT-d second-level format, configured from the remapping unit's capabilities.
///
/// Entries it makes hold no address bit at or above `haw`; `decode` reads
/// the address field 51:12 whole, so an entry written by someone else with
/// (reserved) bits set there decodes to the address those bits name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdSecondLevel {
    /// `CAP.SLLPS`: bit 0 = 2 MiB superpages, bit 1 = 1 GiB superpages.
    pub sllps: u8,
    /// `ECAP.SC`: the SNP bit may be set in leaves.
    pub snoop_control: bool,
    /// Host address width in bits (`CAP.MGAW`); outputs must be below it.
    pub haw: u8,
}

impl Default for VtdSecondLevel {
    /// 2 MiB and 1 GiB superpages, no snoop control, 48-bit addresses.
    fn default() -> Self {
        Self {
            sllps: 0b11,
            snoop_control: false,
            haw: 48,
        }
    }
}

impl VtdSecondLevel {
    /// The address field of every entry this crate reads back (bits 51:12;
    /// the table's valid-entry count lives above it, at 61:52). Entries are
    /// only ever read from tables this crate wrote, where
    /// [`addr_mask`](Self::addr_mask) already cleared every address bit
    /// from `haw` up: reading with the fixed field gives the same address
    /// without working the mask out of `haw` on every walk (issue 11: 10
    /// of a 1 GiB unlink's 156 instructions).
    const READ_ADDR: u64 = 0x000f_ffff_ffff_f000;

    #[inline]
    fn addr_mask(&self) -> u64 {
        let haw = u32::from(self.haw).clamp(13, 52);
        ((1u64 << haw) - 1) & !0xfff
    }
}

impl PteFormat for VtdSecondLevel {
    const KIND: TableFormat = TableFormat::VtdSecondLevel;
    /// Bits 61:52, ignored in a non-leaf entry.
    const COUNT_SHIFT: u32 = 52;

    #[inline]
    fn leaf_allowed(&self, height: u32) -> bool {
        match height {
            0 => true,
            1 => self.sllps & 1 != 0,
            // The walker splits a 1 GiB leaf into 2 MiB leaves, so 1 GiB needs both.
            2 => self.sllps & 0b11 == 0b11,
            _ => false,
        }
    }

    #[inline]
    fn oa_bits(&self) -> u32 {
        u32::from(self.haw).clamp(13, 52)
    }

    #[inline]
    fn table(&self, pa: PhysAddr) -> u64 {
        (pa.0 & self.addr_mask()) | (SlBits::R | SlBits::W).bits()
    }

    #[inline]
    fn leaf(&self, pa: PhysAddr, height: u32, attrs: MapAttrs) -> u64 {
        let mut b = SlBits::empty();
        if attrs.contains(MapAttrs::READ) {
            b |= SlBits::R;
        }
        if attrs.contains(MapAttrs::WRITE) {
            b |= SlBits::W;
        }
        if height > 0 {
            b |= SlBits::PS;
        }
        if self.snoop_control && !attrs.contains(MapAttrs::MMIO) {
            b |= SlBits::SNP;
        }
        (pa.0 & self.addr_mask()) | b.bits()
    }

    #[inline]
    fn is_leaf(&self, pte: u64, height: u32) -> bool {
        let b = SlBits::from_bits_retain(pte);
        b.intersects(SlBits::R | SlBits::W)
            && (height == 0 || (b.contains(SlBits::PS) && self.leaf_allowed(height)))
    }

    #[inline]
    fn decode(&self, pte: u64, height: u32) -> Pte {
        let b = SlBits::from_bits_retain(pte);
        if !b.intersects(SlBits::R | SlBits::W) {
            return Pte::Invalid;
        }
        let pa = PhysAddr(pte & Self::READ_ADDR);
        if height > 0 && !b.contains(SlBits::PS) {
            return Pte::Table(pa);
        }
        if height > 0 && !self.leaf_allowed(height) {
            return Pte::Invalid;
        }
        let mut attrs = MapAttrs::empty();
        if b.contains(SlBits::R) {
            attrs |= MapAttrs::READ;
        }
        if b.contains(SlBits::W) {
            attrs |= MapAttrs::WRITE;
        }
        if self.snoop_control && !b.contains(SlBits::SNP) {
            attrs |= MapAttrs::MMIO;
        }
        Pte::Leaf { pa, attrs }
    }

    fn canonical(&self, attrs: MapAttrs) -> MapAttrs {
        let mut a = attrs & (MapAttrs::READ | MapAttrs::WRITE);
        if self.snoop_control && attrs.contains(MapAttrs::MMIO) {
            a |= MapAttrs::MMIO;
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_entry_read_write() {
        // R (1) | W (2) at address 0x1234_5000; no PS, no SNP without ECAP.SC.
        let f = VtdSecondLevel::default();
        assert_eq!(
            f.leaf(PhysAddr(0x1234_5000), 0, MapAttrs::READ | MapAttrs::WRITE),
            0x1234_5003
        );
        assert_eq!(
            f.leaf(PhysAddr(0x1234_5000), 0, MapAttrs::WRITE),
            0x1234_5002
        );
    }

    #[test]
    fn superpage_sets_ps_and_snoop_when_supported() {
        let f = VtdSecondLevel {
            sllps: 1,
            snoop_control: true,
            haw: 39,
        };
        // R | PS (0x80) | SNP (0x800) = 0x881 at 2 MiB-aligned 0x20_0000.
        assert_eq!(f.leaf(PhysAddr(0x20_0000), 1, MapAttrs::READ), 0x20_0881);
        // MMIO leaves are not snooped.
        assert_eq!(
            f.leaf(PhysAddr(0x20_0000), 1, MapAttrs::READ | MapAttrs::MMIO),
            0x20_0081
        );
        assert!(f.leaf_allowed(1));
        assert!(!f.leaf_allowed(2));
    }

    #[test]
    fn table_entry_and_not_present() {
        let f = VtdSecondLevel::default();
        assert_eq!(f.table(PhysAddr(0xabc_d000)), 0xabc_d003);
        assert_eq!(f.decode(0xabc_d003, 1), Pte::Table(PhysAddr(0xabc_d000)));
        assert_eq!(f.decode(0xabc_d000, 0), Pte::Invalid);
        assert_eq!(
            f.decode(0xabc_d001, 0),
            Pte::Leaf {
                pa: PhysAddr(0xabc_d000),
                attrs: MapAttrs::READ
            }
        );
    }

    #[test]
    fn address_bits_above_haw_are_dropped() {
        let f = VtdSecondLevel {
            sllps: 0,
            snoop_control: false,
            haw: 39,
        };
        assert_eq!(f.leaf(PhysAddr(0x80_0000_1000), 0, MapAttrs::READ), 0x1001);
        assert_eq!(f.oa_bits(), 39);
    }

    #[test]
    fn what_is_written_decodes_back_to_the_same_address() {
        // haw 39: every address bit from 39 up is dropped when written, so
        // reading the fixed field 51:12 back gives what was written, and a
        // valid-entry count in bits 61:52 is no part of a table's address.
        let f = VtdSecondLevel {
            sllps: 0b11,
            snoop_control: false,
            haw: 39,
        };
        let pa = PhysAddr(0x7f_ffff_f000);
        let t = f.table(PhysAddr(pa.0 | (1 << 40)));
        assert_eq!(f.decode(t, 2), Pte::Table(pa));
        let counted = t | (0x3ff << VtdSecondLevel::COUNT_SHIFT);
        assert_eq!(f.decode(counted, 1), Pte::Table(pa));
        let leaf = f.leaf(PhysAddr(0x40_0000_0000 | (1 << 45)), 2, MapAttrs::READ);
        assert_eq!(
            f.decode(leaf, 2),
            Pte::Leaf {
                pa: PhysAddr(0x40_0000_0000),
                attrs: MapAttrs::READ
            }
        );
    }
}
