//! A strict model of what a VT-d unit does with an interrupt request while
//! interrupt remapping is on (VT-d spec §5.1.4, §9.10), for the rules QEMU
//! does not enforce: QEMU 10 lets compatibility-format interrupts through
//! whatever GSTS.CFIS and IRTA.EIME say. The model reads the unit's state
//! (GSTS, IRTA) and the table as the unit would see it in memory, and says
//! where the interrupt goes or which fault reason blocks it.

use super::vtd_desc::check_irte;

/// The unit state the decision depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrUnitState {
    /// GSTS.IRES.
    pub ires: bool,
    /// GSTS.CFIS.
    pub cfis: bool,
    /// IRTA.EIME.
    pub eime: bool,
    /// 2^(IRTA.S + 1).
    pub entries: u32,
}

impl IrUnitState {
    /// From raw GSTS and IRTA register values.
    pub const fn from_regs(gsts: u32, irta: u64) -> Self {
        Self {
            ires: gsts & (1 << 25) != 0,
            cfis: gsts & (1 << 23) != 0,
            eime: irta & (1 << 11) != 0,
            entries: 2 << (irta & 0xf),
        }
    }
}

/// What happened to an interrupt request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrOutcome {
    /// Passed on unchanged (remapping off, or compatibility format with CFIS).
    Unremapped,
    /// Remapped through entry `index`.
    Remapped {
        /// Interrupt index used.
        index: u16,
        /// Vector delivered.
        vector: u8,
        /// Destination (8-bit APIC ID in xAPIC mode, 32-bit in x2APIC mode).
        destination: u32,
    },
    /// Blocked with this fault reason (appendix A, 20h–26h).
    Blocked(u8),
}

/// Decides the fate of the MSI write (`address`, `data`) from requester
/// `sid`; `entry(i)` reads interrupt-remapping entry `i` as the unit sees it.
pub fn remap_msi(
    s: &IrUnitState,
    address: u64,
    data: u32,
    sid: u16,
    entry: impl Fn(u16) -> [u64; 2],
) -> IrOutcome {
    if !s.ires {
        return IrOutcome::Unremapped;
    }
    // §5.1.4: an interrupt request is a DWORD write to 0xFEEx_xxxx.
    if address >> 32 != 0 || (address >> 20) & 0xfff != 0xfee {
        return IrOutcome::Blocked(0x20);
    }
    if address & (1 << 4) == 0 {
        // Compatibility format: blocked under EIME or with CFIS clear.
        return if s.eime || !s.cfis {
            IrOutcome::Blocked(0x25)
        } else {
            IrOutcome::Unremapped
        };
    }
    let handle = ((address >> 5) & 0x7fff) | (((address >> 2) & 1) << 15);
    let index = if address & (1 << 3) != 0 {
        // SHV: data 31:16 reserved, 15:0 the subhandle.
        if data >> 16 != 0 {
            return IrOutcome::Blocked(0x20);
        }
        handle + u64::from(data & 0xffff)
    } else {
        handle
    };
    if index >= u64::from(s.entries) {
        return IrOutcome::Blocked(0x21);
    }
    let index = index as u16;
    let raw = entry(index);
    if raw[0] & 1 == 0 {
        return IrOutcome::Blocked(0x22);
    }
    if check_irte(raw, s.eime).is_err() {
        return IrOutcome::Blocked(0x24);
    }
    let (want, sq, svt) = (raw[1] as u16, (raw[1] >> 16) & 3, (raw[1] >> 18) & 3);
    let ok = match svt {
        0 => true,
        1 => {
            // SQ: ignore none, bit 2, bits 2:1, bits 2:0 of the function.
            let mask: u16 = [0xffff, 0xfffb, 0xfff9, 0xfff8][sq as usize];
            sid & mask == want & mask
        }
        _ => {
            let bus = (sid >> 8) as u8;
            ((want >> 8) as u8..=want as u8).contains(&bus)
        }
    };
    if !ok {
        return IrOutcome::Blocked(0x26);
    }
    IrOutcome::Remapped {
        index,
        vector: (raw[0] >> 16) as u8,
        destination: if s.eime {
            (raw[0] >> 32) as u32
        } else {
            ((raw[0] >> 40) & 0xff) as u32
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: IrUnitState = IrUnitState {
        ires: true,
        cfis: false,
        eime: false,
        entries: 256,
    };

    #[test]
    fn model_follows_the_spec_order_of_checks() {
        // Entry 5: vector 0x40, APIC 1, only SID 0x18.
        let e = |i: u16| {
            if i == 5 {
                [0x0000_0100_0040_0001, 0x4_0018]
            } else {
                [0, 0]
            }
        };
        let msg = 0xfee0_00b8; // handle 5, remappable, SHV
        assert_eq!(
            remap_msi(&ON, msg, 0, 0x18, e),
            IrOutcome::Remapped {
                index: 5,
                vector: 0x40,
                destination: 1
            }
        );
        assert_eq!(remap_msi(&ON, msg, 0, 0x20, e), IrOutcome::Blocked(0x26));
        assert_eq!(remap_msi(&ON, msg, 1, 0x18, e), IrOutcome::Blocked(0x22));
        assert_eq!(
            remap_msi(&ON, msg, 1 << 16, 0x18, e),
            IrOutcome::Blocked(0x20)
        );
        assert_eq!(
            remap_msi(&ON, 0xfee0_0000 | (300 << 5) | 0x18, 0, 0x18, e),
            IrOutcome::Blocked(0x21)
        );
        assert_eq!(
            remap_msi(&ON, 0xfee0_0000, 0x40, 0x18, e),
            IrOutcome::Blocked(0x25)
        );
        let cfi = IrUnitState { cfis: true, ..ON };
        assert_eq!(
            remap_msi(&cfi, 0xfee0_0000, 0x40, 0x18, e),
            IrOutcome::Unremapped
        );
        let eim = IrUnitState { eime: true, ..cfi };
        assert_eq!(
            remap_msi(&eim, 0xfee0_0000, 0x40, 0x18, e),
            IrOutcome::Blocked(0x25)
        );
        // SQ 11b: any function of device 3 on bus 0.
        let q = |_: u16| [0x0000_0100_0040_0001, 0x7_0018];
        assert!(matches!(
            remap_msi(&ON, msg, 0, 0x1f, q),
            IrOutcome::Remapped { .. }
        ));
        assert_eq!(remap_msi(&ON, msg, 0, 0x20, q), IrOutcome::Blocked(0x26));
    }
}
