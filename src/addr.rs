//! Address newtypes and 4 KiB granule helpers.
//!
//! A CPU physical address, an I/O virtual address and a PCI bus address are all
//! plain numbers to the hardware; the types keep them apart in the API.

use core::fmt;

/// The translation granule this crate maps with: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;
/// 2 MiB: a level-2 block / VT-d 2 MiB superpage.
pub const SIZE_2M: u64 = 1 << 21;
/// 1 GiB: a level-1 block / VT-d 1 GiB superpage.
pub const SIZE_1G: u64 = 1 << 30;

macro_rules! address {
    ($(#[$m:meta])* $name:ident, $short:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[cfg_attr(feature = "defmt", derive(defmt::Format))]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            #[inline]
            pub const fn get(self) -> u64 {
                self.0
            }
            /// Whether the address is a multiple of [`PAGE_SIZE`].
            #[inline]
            pub const fn is_page_aligned(self) -> bool {
                self.0 & (PAGE_SIZE - 1) == 0
            }
            /// Whether the address is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align.wrapping_sub(1)) == 0
            }
            /// The address plus `off`, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// The address rounded down to its page.
            #[inline]
            pub const fn page_base(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }
            /// The offset of the address inside its page.
            #[inline]
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($short, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address!(
    /// A CPU physical address.
    PhysAddr,
    "PA"
);
address!(
    /// An address a device puts on the bus: an IOVA when an IOMMU translates it,
    /// a physical address on the direct path, a bus address for switch-level P2P.
    DmaAddr,
    "DMA"
);
address!(
    /// A PCI bus address (what a peer device's BAR decodes), as opposed to the
    /// CPU-physical address of the same BAR.
    BusAddr,
    "BUS"
);

/// Rounds `len` up to a whole number of pages, or `None` on overflow.
#[inline]
pub const fn page_round_up(len: u64) -> Option<u64> {
    match len.checked_add(PAGE_SIZE - 1) {
        Some(v) => Some(v & !(PAGE_SIZE - 1)),
        None => None,
    }
}
