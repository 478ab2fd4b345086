//! One interrupt-remapping table entry (IRTE, VT-d 9.10, remapped format)
//! and the remappable-format MSI a device is given to use it (VT-d 5.1.5.2).

use super::IrError;

/// Delivery mode of the remapped interrupt (IRTE DLM, bits 7:5; the same
/// encodings as the MSI data register, Intel SDM Vol. 3 11.11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeliveryMode {
    /// 000b: the vector to the destination.
    Fixed,
    /// 001b: the vector to the lowest-priority processor of the destination.
    LowestPriority,
    /// 010b: SMI (vector ignored).
    Smi,
    /// 100b: NMI (vector ignored).
    Nmi,
    /// 101b: INIT (vector ignored).
    Init,
    /// 111b: ExtINT.
    ExtInt,
}

impl DeliveryMode {
    const fn bits(self) -> u64 {
        match self {
            Self::Fixed => 0,
            Self::LowestPriority => 1,
            Self::Smi => 2,
            Self::Nmi => 4,
            Self::Init => 5,
            Self::ExtInt => 7,
        }
    }

    /// Whether the vector field is delivered (fixed, lowest priority).
    const fn uses_vector(self) -> bool {
        matches!(self, Self::Fixed | Self::LowestPriority)
    }
}

/// Where and how a remapped interrupt is delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IrteTarget {
    /// Vector (16–255 for fixed and lowest-priority delivery).
    pub vector: u8,
    /// Destination: an APIC ID (physical mode) or a logical destination;
    /// 8 bits in xAPIC mode, 32 bits in x2APIC mode (IRTA.EIME).
    pub destination: u32,
    /// Logical (DM = 1) rather than physical (DM = 0) destination mode.
    pub logical: bool,
    /// Delivery mode.
    pub delivery: DeliveryMode,
    /// Level-triggered (TM = 1) rather than edge (TM = 0).
    pub level: bool,
    /// Redirection hint (RH): lowest-priority among the destination set.
    pub redirection_hint: bool,
}

impl IrteTarget {
    /// A fixed, edge-triggered interrupt with `vector` to the processor
    /// whose APIC ID is `apic_id` (physical mode): what an MSI usually wants.
    pub const fn fixed(vector: u8, apic_id: u32) -> Self {
        Self {
            vector,
            destination: apic_id,
            logical: false,
            delivery: DeliveryMode::Fixed,
            level: false,
            redirection_hint: false,
        }
    }
}

/// Which bits of the requester-id are compared when SVT = 01b (IRTE SQ,
/// VT-d table 9-29): a device with phantom functions or an alias may need to
/// ignore some function bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SidQualifier {
    /// 00b: all 16 bits.
    All,
    /// 01b: ignore bit 2 (function bit 2).
    IgnoreBit2,
    /// 10b: ignore bits 2:1.
    IgnoreBits2To1,
    /// 11b: ignore bits 2:0 (the whole function number).
    IgnoreBits2To0,
}

/// How the unit checks the requester of an interrupt against the entry
/// (IRTE SVT/SQ/SID, VT-d 9.10). Without it any device that learns the
/// handle can raise the entry's vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SourceValidation {
    /// SVT = 00b: no check; any requester may use the entry.
    None,
    /// SVT = 01b: the requester-id must equal `sid` on the bits `qualifier` keeps.
    Requester {
        /// Source-id (bus << 8 | devfn).
        sid: u16,
        /// Which bits are compared.
        qualifier: SidQualifier,
    },
    /// SVT = 10b: the requester's bus must lie in `first..=last` (a device
    /// behind a PCIe-to-PCI bridge, whose requests carry the bridge's id).
    Bus {
        /// First bus.
        first: u8,
        /// Last bus.
        last: u8,
    },
}

impl SourceValidation {
    /// SVT = 01b with SQ = 00b: exactly the function `sid`.
    pub const fn exact(sid: u16) -> Self {
        Self::Requester {
            sid,
            qualifier: SidQualifier::All,
        }
    }

    /// The upper half of the IRTE: SID 79:64, SQ 81:80, SVT 83:82.
    const fn hi(self) -> u64 {
        match self {
            Self::None => 0,
            Self::Requester { sid, qualifier } => {
                let sq = match qualifier {
                    SidQualifier::All => 0,
                    SidQualifier::IgnoreBit2 => 1,
                    SidQualifier::IgnoreBits2To1 => 2,
                    SidQualifier::IgnoreBits2To0 => 3,
                };
                (sid as u64) | (sq << 16) | (1 << 18)
            }
            Self::Bus { first, last } => (((first as u64) << 8) | last as u64) | (2 << 18),
        }
    }
}

/// One interrupt-remapping table entry, remapped format (VT-d 9.10):
/// lo: 0 P, 1 FPD, 2 DM, 3 RH, 4 TM, 7:5 DLM, 11:8 AVL, 15 IM (0), 23:16 V,
/// 63:32 DST (xAPIC: APIC ID in 47:40, 39:32 and 63:48 reserved);
/// hi: 15:0 SID, 17:16 SQ, 19:18 SVT, 63:20 reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Irte {
    lo: u64,
    hi: u64,
}

super::raw128!(Irte);

impl Irte {
    /// Present (P).
    pub const PRESENT: u64 = 1;
    /// The AVL bit this driver uses to mark an entry allocated; hardware
    /// ignores AVL (VT-d 9.10), so the mark survives while P is clear during
    /// an update.
    pub const ALLOCATED: u64 = 1 << 8;

    /// An all-zero (not present, free) entry.
    pub const EMPTY: Self = Self { lo: 0, hi: 0 };

    /// A present remapped-format entry delivering `target`, usable only by
    /// the requesters `source` lets through. `x2apic` is the table's
    /// IRTA.EIME: 32-bit destinations in bits 63:32; otherwise an 8-bit APIC
    /// ID in bits 47:40 (Linux `set_irte_sid` / `prepare_irte` lay it out
    /// the same way).
    ///
    /// # Errors
    ///
    /// [`IrError::Vector`] for a vector below 16 with fixed or lowest-priority delivery;
    /// [`IrError::Destination`] for an APIC ID above 255 without `x2apic`; [`IrError::BusRange`]
    /// for a bus range whose first bus is above its last.
    pub const fn remapped(
        target: &IrteTarget,
        source: SourceValidation,
        x2apic: bool,
    ) -> Result<Self, IrError> {
        if target.delivery.uses_vector() && target.vector < 16 {
            return Err(IrError::Vector(target.vector));
        }
        if let SourceValidation::Bus { first, last } = source {
            if first > last {
                return Err(IrError::BusRange { first, last });
            }
        }
        let dst = if x2apic {
            (target.destination as u64) << 32
        } else if target.destination > 0xff {
            return Err(IrError::Destination {
                destination: target.destination,
                x2apic,
            });
        } else {
            (target.destination as u64) << 40
        };
        let vector = if target.delivery.uses_vector() {
            target.vector as u64
        } else {
            0
        };
        let lo = Self::PRESENT
            | ((target.logical as u64) << 2)
            | ((target.redirection_hint as u64) << 3)
            | ((target.level as u64) << 4)
            | (target.delivery.bits() << 5)
            | (vector << 16)
            | dst;
        Ok(Self {
            lo,
            hi: source.hi(),
        })
    }

    /// Whether P is set.
    pub const fn present(self) -> bool {
        self.lo & Self::PRESENT != 0
    }

    /// Whether the driver's allocated mark (AVL bit 0) is set.
    pub const fn allocated(self) -> bool {
        self.lo & Self::ALLOCATED != 0
    }

    /// The same entry with the allocated mark set.
    pub const fn marked(self) -> Self {
        Self {
            lo: self.lo | Self::ALLOCATED,
            hi: self.hi,
        }
    }

    /// The same entry with P clear (the allocated mark kept).
    pub const fn not_present(self) -> Self {
        Self {
            lo: self.lo & !Self::PRESENT,
            hi: self.hi,
        }
    }

    /// The vector (V).
    pub const fn vector(self) -> u8 {
        (self.lo >> 16) as u8
    }

    /// The destination, decoded for the table's mode.
    pub const fn destination(self, x2apic: bool) -> u32 {
        if x2apic {
            (self.lo >> 32) as u32
        } else {
            ((self.lo >> 40) & 0xff) as u32
        }
    }

    /// The source-id field (SID).
    pub const fn source_id(self) -> u16 {
        self.hi as u16
    }
}

/// The MSI address and data a device must be given to raise the interrupt
/// of one remapping entry (remappable format, VT-d 5.1.5.2): address
/// 0xFEE in 31:20, handle bits 14:0 in 19:5, interrupt format (1 = remappable)
/// in bit 4, SHV in bit 3, handle bit 15 in bit 2; SHV is set and the data is
/// the subhandle 0, so the entry used is exactly the handle (Linux
/// `fill_msi_msg` composes the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MsiMessage {
    /// MSI address (the upper 32 bits are zero).
    pub address: u64,
    /// MSI data.
    pub data: u32,
}

impl MsiMessage {
    /// Interrupt format bit: remappable.
    pub const REMAPPABLE: u64 = 1 << 4;
    /// Subhandle valid.
    pub const SHV: u64 = 1 << 3;

    /// The message that selects interrupt index `index`.
    pub const fn remappable(index: u16) -> Self {
        let h = index as u64;
        Self {
            address: 0xfee0_0000
                | ((h & 0x7fff) << 5)
                | Self::REMAPPABLE
                | Self::SHV
                | (((h >> 15) & 1) << 2),
            data: 0,
        }
    }

    /// The interrupt index a remappable message selects (handle +
    /// subhandle when SHV), or `None` for a compatibility-format message.
    pub const fn index(self) -> Option<u16> {
        if self.address & Self::REMAPPABLE == 0 {
            return None;
        }
        let handle = ((self.address >> 5) & 0x7fff) | (((self.address >> 2) & 1) << 15);
        let sub = if self.address & Self::SHV != 0 {
            self.data as u64 & 0xffff
        } else {
            0
        };
        Some(handle.wrapping_add(sub) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::vtd_desc::{Violation, check_irte};

    #[test]
    fn irte_matches_hand_worked_xapic_value() {
        // Vector 0x40 to APIC 1, physical, fixed, edge, only RID 0x18:
        // lo = P | V 0x40 << 16 | APIC 1 << 40; hi = SID 0x18 | SVT 01b << 18.
        let e = Irte::remapped(
            &IrteTarget::fixed(0x40, 1),
            SourceValidation::exact(0x18),
            false,
        )
        .unwrap();
        assert_eq!(e.raw(), [0x0000_0100_0040_0001, 0x4_0018]);
        assert_eq!(check_irte(e.raw(), false), Ok(()));
        assert_eq!(e.destination(false), 1);
        assert_eq!(e.source_id(), 0x18);
    }

    #[test]
    fn irte_matches_hand_worked_x2apic_and_other_fields() {
        // Vector 0x51 to x2APIC ID 0x1234 (63:32), logical (DM bit 2), RH
        // (bit 3), level (bit 4), lowest priority (DLM 001b at 7:5 = 0x20);
        // bus range 2..=5: SID = 0x0205, SVT 10b.
        let t = IrteTarget {
            vector: 0x51,
            destination: 0x1234,
            logical: true,
            delivery: DeliveryMode::LowestPriority,
            level: true,
            redirection_hint: true,
        };
        let e = Irte::remapped(&t, SourceValidation::Bus { first: 2, last: 5 }, true).unwrap();
        assert_eq!(e.raw(), [0x0000_1234_0051_003d, 0x8_0205]);
        assert_eq!(check_irte(e.raw(), true), Ok(()));
        // SQ 11b: 0x3 << 16.
        let q = SourceValidation::Requester {
            sid: 0x20,
            qualifier: SidQualifier::IgnoreBits2To0,
        };
        let e = Irte::remapped(&IrteTarget::fixed(0x30, 0), q, false).unwrap();
        assert_eq!(e.raw()[1], 0x7_0020);
        // NMI carries no vector.
        let nmi = IrteTarget {
            delivery: DeliveryMode::Nmi,
            ..IrteTarget::fixed(0, 2)
        };
        let e = Irte::remapped(&nmi, SourceValidation::None, false).unwrap();
        assert_eq!(e.raw(), [0x0000_0200_0000_0081, 0]);
    }

    #[test]
    fn irte_refuses_what_the_mode_cannot_hold() {
        let src = SourceValidation::exact(0x18);
        assert_eq!(
            Irte::remapped(&IrteTarget::fixed(0x40, 0x100), src, false),
            Err(IrError::Destination {
                destination: 0x100,
                x2apic: false
            })
        );
        assert!(Irte::remapped(&IrteTarget::fixed(0x40, 0x100), src, true).is_ok());
        assert_eq!(
            Irte::remapped(&IrteTarget::fixed(0x0f, 0), src, false),
            Err(IrError::Vector(0x0f))
        );
        assert_eq!(
            Irte::remapped(
                &IrteTarget::fixed(0x40, 0),
                SourceValidation::Bus { first: 3, last: 2 },
                false
            ),
            Err(IrError::BusRange { first: 3, last: 2 })
        );
    }

    #[test]
    fn strict_irte_checker_refuses_reserved_bits() {
        let e = Irte::remapped(
            &IrteTarget::fixed(0x40, 1),
            SourceValidation::exact(0x18),
            false,
        )
        .unwrap()
        .raw();
        // xAPIC: destination bits 39:32 are reserved.
        assert_eq!(
            check_irte([e[0] | 1 << 32, e[1]], false),
            Err(Violation::Reserved {
                word: 0,
                bits: 1 << 32
            })
        );
        // Bits 14:12, 31:24 of the low half; 63:20 of the high half; IM (posted).
        assert!(check_irte([e[0] | 1 << 12, e[1]], false).is_err());
        assert!(check_irte([e[0] | 1 << 24, e[1]], false).is_err());
        assert!(check_irte([e[0] | 1 << 15, e[1]], false).is_err());
        assert!(check_irte([e[0], e[1] | 1 << 20], false).is_err());
        // SVT 11b is reserved.
        assert!(check_irte([e[0], e[1] | 3 << 18], false).is_err());
        // A not-present entry is not checked.
        assert_eq!(check_irte([Irte::ALLOCATED, !0], false), Ok(()));
    }

    #[test]
    fn remappable_msi_matches_hand_worked_values() {
        // Handle 5: 5 << 5 = 0xa0, format bit 4 and SHV bit 3: 0x18.
        let m = MsiMessage::remappable(5);
        assert_eq!(m.address, 0xfee0_00b8);
        assert_eq!(m.data, 0);
        assert_eq!(m.index(), Some(5));
        // Handle 0x8001: handle[15] goes to bit 2.
        let m = MsiMessage::remappable(0x8001);
        assert_eq!(m.address, 0xfee0_003c);
        assert_eq!(m.index(), Some(0x8001));
        // Handle 0x7fff fills 19:5.
        assert_eq!(MsiMessage::remappable(0x7fff).address, 0xfeef_fff8);
        // A compatibility-format message selects no entry.
        let compat = MsiMessage {
            address: 0xfee0_0000,
            data: 0x40,
        };
        assert_eq!(compat.index(), None);
    }
}
