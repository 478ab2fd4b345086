//! A fixed-capacity table of live transactions, keyed by DMA address.
//!
//! Consumer traits such as virtio-drivers' `Hal::unshare` or dma-api's
//! `DmaOp::unmap_streaming` give back only the DMA address they were handed;
//! the transaction state ([`IovaState`](crate::IovaState)) that must be
//! unlinked and freed has to be found from that address. [`LiveTable`] is that
//! lookup: `N` entries in a `heapless` vector, no heap, no panic, typed errors
//! when it is full or the address is unknown.
//!
//! ```
//! use bare_iommu::live::{LiveError, LiveTable};
//! use bare_iommu::DmaAddr;
//!
//! let mut live: LiveTable<&str, 2> = LiveTable::new();
//! live.insert(DmaAddr(0x10_0040), "header").unwrap();
//! live.insert(DmaAddr(0x20_0000), "data").unwrap();
//! // Full: the value comes back with the error, nothing is lost.
//! let (back, e) = live.insert(DmaAddr(0x30_0000), "status").unwrap_err();
//! assert_eq!((back, e), ("status", LiveError::Full { capacity: 2 }));
//! assert_eq!(live.get(DmaAddr(0x10_0040)), Some(&"header"));
//! assert_eq!(live.remove(DmaAddr(0x10_0040)), Ok("header"));
//! assert_eq!(
//!     live.remove(DmaAddr(0x10_0040)),
//!     Err(LiveError::Unknown { addr: DmaAddr(0x10_0040) })
//! );
//! ```

use core::fmt;

use crate::addr::DmaAddr;

/// Why a [`LiveTable`] refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum LiveError {
    /// Every one of the `capacity` entries is in use.
    Full {
        /// How many entries the table holds.
        capacity: usize,
    },
    /// No live transaction was recorded at this DMA address.
    Unknown {
        /// The address looked up.
        addr: DmaAddr,
    },
    /// A live transaction is already recorded at this DMA address.
    Duplicate {
        /// The address inserted twice.
        addr: DmaAddr,
    },
}

impl fmt::Display for LiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LiveError::Full { capacity } => {
                write!(f, "live-transaction table full ({capacity} entries)")
            }
            LiveError::Unknown { addr } => write!(f, "no live transaction at DMA address {addr}"),
            LiveError::Duplicate { addr } => {
                write!(
                    f,
                    "a live transaction is already recorded at DMA address {addr}"
                )
            }
        }
    }
}

impl core::error::Error for LiveError {}

/// Up to `N` live transactions `T` (usually [`IovaState`](crate::IovaState),
/// or a state with what an adapter must remember beside it), each found by
/// the exact DMA address that was handed to the consumer — including any
/// sub-page offset (see [`Domain::link_bytes`](crate::Domain::link_bytes)).
///
/// Lookups are a linear scan: the table is meant for the handful to a few
/// hundred buffers a driver has in flight.
pub struct LiveTable<T, const N: usize> {
    entries: heapless::Vec<(DmaAddr, T), N>,
}

impl<T, const N: usize> Default for LiveTable<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> LiveTable<T, N> {
    /// An empty table (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            entries: heapless::Vec::new(),
        }
    }

    /// Records `value` as live at `addr`.
    ///
    /// # Errors
    ///
    /// [`LiveError::Full`] when `N` entries are live, [`LiveError::Duplicate`]
    /// when `addr` is already recorded. Either way `value` is handed back
    /// with the error, so a transaction state is never dropped on the floor.
    pub fn insert(&mut self, addr: DmaAddr, value: T) -> Result<(), (T, LiveError)> {
        if self.position(addr).is_some() {
            return Err((value, LiveError::Duplicate { addr }));
        }
        self.entries
            .push((addr, value))
            .map_err(|(_, v)| (v, LiveError::Full { capacity: N }))
    }

    /// The transaction live at `addr`, if any.
    pub fn get(&self, addr: DmaAddr) -> Option<&T> {
        self.position(addr).map(|i| &self.entries[i].1)
    }

    /// The transaction live at `addr`, mutably, if any.
    pub fn get_mut(&mut self, addr: DmaAddr) -> Option<&mut T> {
        self.position(addr).map(move |i| &mut self.entries[i].1)
    }

    /// Takes the transaction live at `addr` out of the table.
    ///
    /// # Errors
    ///
    /// [`LiveError::Unknown`] when nothing is recorded at `addr`; the table is
    /// unchanged.
    pub fn remove(&mut self, addr: DmaAddr) -> Result<T, LiveError> {
        let i = self.position(addr).ok_or(LiveError::Unknown { addr })?;
        Ok(self.entries.swap_remove(i).1)
    }

    /// Whether a transaction is live at `addr`.
    pub fn contains(&self, addr: DmaAddr) -> bool {
        self.position(addr).is_some()
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is live.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries the table holds (`N`).
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The live entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (DmaAddr, &T)> {
        self.entries.iter().map(|(a, v)| (*a, v))
    }

    /// Takes any one live entry out (to tear everything down at the end).
    pub fn pop(&mut self) -> Option<(DmaAddr, T)> {
        self.entries.pop()
    }

    fn position(&self, addr: DmaAddr) -> Option<usize> {
        self.entries.iter().position(|(a, _)| *a == addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_and_removed_by_the_exact_address_handed_out() {
        let mut t: LiveTable<u32, 4> = LiveTable::new();
        t.insert(DmaAddr(0x1000_0040), 1).unwrap();
        t.insert(DmaAddr(0x1000_1000), 2).unwrap();
        // The page base of a sub-page address is another key.
        assert_eq!(t.get(DmaAddr(0x1000_0000)), None);
        assert_eq!(t.get(DmaAddr(0x1000_0040)), Some(&1));
        *t.get_mut(DmaAddr(0x1000_1000)).unwrap() = 5;
        assert_eq!(t.remove(DmaAddr(0x1000_1000)), Ok(5));
        assert_eq!(t.len(), 1);
        assert!(t.contains(DmaAddr(0x1000_0040)));
    }

    #[test]
    fn a_full_table_hands_the_value_back_and_keeps_its_entries() {
        let mut t: LiveTable<u32, 2> = LiveTable::new();
        t.insert(DmaAddr(1), 1).unwrap();
        t.insert(DmaAddr(2), 2).unwrap();
        assert_eq!(
            t.insert(DmaAddr(3), 3),
            Err((3, LiveError::Full { capacity: 2 }))
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove(DmaAddr(1)), Ok(1));
        t.insert(DmaAddr(3), 3).unwrap();
        assert_eq!(t.get(DmaAddr(3)), Some(&3));
    }

    #[test]
    fn unknown_and_duplicate_addresses_are_typed_errors_that_change_nothing() {
        let mut t: LiveTable<u32, 2> = LiveTable::new();
        assert_eq!(
            t.remove(DmaAddr(7)),
            Err(LiveError::Unknown { addr: DmaAddr(7) })
        );
        t.insert(DmaAddr(7), 1).unwrap();
        assert_eq!(
            t.insert(DmaAddr(7), 2),
            Err((2, LiveError::Duplicate { addr: DmaAddr(7) }))
        );
        assert_eq!(t.get(DmaAddr(7)), Some(&1));
        assert_eq!(t.pop(), Some((DmaAddr(7), 1)));
        assert!(t.is_empty());
    }
}
