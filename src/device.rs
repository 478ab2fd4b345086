//! Device identity: a PCI function on a segment.

use core::fmt;

/// A PCI function: segment, bus, device (0–31) and function (0–7).
///
/// Its requester ID (`bus << 8 | dev << 3 | fn`) is the SMMUv3 StreamID and the
/// VT-d source-id of the function's DMA.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeviceId {
    /// PCI segment (domain) number.
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device and function: `dev << 3 | fn`.
    pub devfn: u8,
}

impl DeviceId {
    /// A PCI function, or `None` if `dev > 31` or `func > 7`.
    pub const fn new(segment: u16, bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev > 31 || func > 7 {
            return None;
        }
        Some(Self {
            segment,
            bus,
            devfn: (dev << 3) | func,
        })
    }

    /// The function from its 16-bit requester ID on `segment`.
    pub const fn from_rid(segment: u16, rid: u16) -> Self {
        Self {
            segment,
            bus: (rid >> 8) as u8,
            devfn: rid as u8,
        }
    }

    /// Device number (0–31).
    pub const fn dev(self) -> u8 {
        self.devfn >> 3
    }

    /// Function number (0–7).
    pub const fn func(self) -> u8 {
        self.devfn & 7
    }

    /// Requester ID: `bus << 8 | devfn`.
    pub const fn rid(self) -> u16 {
        ((self.bus as u16) << 8) | self.devfn as u16
    }

    /// SMMUv3 StreamID of the function (its requester ID).
    pub const fn stream_id(self) -> u32 {
        self.rid() as u32
    }

    /// VT-d source-id of the function (its requester ID).
    pub const fn source_id(self) -> u16 {
        self.rid()
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment,
            self.bus,
            self.dev(),
            self.func()
        )
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requester_id_packs_bus_dev_fn() {
        let d = DeviceId::new(0, 0, 5, 0).unwrap();
        assert_eq!(d.stream_id(), 0x28);
        let d = DeviceId::new(1, 0x3a, 0x1f, 7).unwrap();
        assert_eq!(d.rid(), 0x3aff);
        assert_eq!(DeviceId::from_rid(1, 0x3aff), d);
        assert!(DeviceId::new(0, 0, 32, 0).is_none());
        assert!(DeviceId::new(0, 0, 0, 8).is_none());
    }
}
