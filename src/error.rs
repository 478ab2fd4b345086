//! Error types: one per layer, each carrying the offending values.

use crate::addr::{DmaAddr, PhysAddr};
use crate::device::DeviceId;
use core::fmt;

/// An IOMMU driver's failure, as reported through [`crate::backend::IommuBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BackendError {
    /// A bounded wait on the hardware ran out: `what` names the wait,
    /// `polls` how many times the register was read.
    Timeout {
        /// Which wait.
        what: &'static str,
        /// How many polls were spent.
        polls: u32,
    },
    /// The device's ID is out of what the IOMMU supports or was never set up.
    UnknownDevice(DeviceId),
    /// The hardware lacks what was asked (`what` says which feature).
    Unsupported(&'static str),
    /// The lender refused table or queue memory.
    OutOfMemory,
    /// The command/invalidation queue stopped on an error; `code` is the
    /// hardware's error code, `index` the offending entry's slot.
    QueueError {
        /// Hardware error code (SMMU CMDQ_CONS.ERR, VT-d IQE/ITE/ICE bit).
        code: u32,
        /// Queue slot of the offending command.
        index: u32,
    },
    /// The hardware reported a global error while the operation ran.
    HardwareError {
        /// Raw error register value (SMMU GERROR, VT-d FSTS).
        status: u32,
    },
    /// The table walker does not snoop CPU caches (SMMU `IDR0.COHACC == 0`,
    /// VT-d `ECAP.C == 0` / `ECAP.SMPWC == 0`) and the lender cannot clean
    /// them ([`TableMemory::can_clean`](crate::mem::TableMemory::can_clean) is
    /// false): the hardware would walk stale tables, so set-up is refused.
    LenderCannotClean,
}

/// Errors of the I/O page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum PageTableError {
    /// An address or length that must be 4 KiB aligned is not.
    Unaligned {
        /// The offending value.
        value: u64,
    },
    /// A zero length.
    ZeroLength,
    /// `iova + len` or `phys + len` overflows, or goes past what the table covers.
    OutOfRange {
        /// Start of the range.
        iova: DmaAddr,
        /// Its length.
        len: u64,
        /// First address the table cannot translate.
        limit: u64,
    },
    /// An entry in the range is already present; nothing was changed.
    AlreadyMapped {
        /// The first mapped address found.
        iova: DmaAddr,
    },
    /// An address in the range is not mapped; nothing was changed.
    NotMapped {
        /// The first unmapped address found.
        iova: DmaAddr,
    },
    /// The physical address does not fit the format's output address size.
    PhysTooLarge {
        /// The offending address.
        phys: PhysAddr,
    },
    /// The lender refused a table page; nothing was changed.
    OutOfMemory,
    /// A mapping with neither read nor write permission (VT-d cannot express it).
    NoAccess,
    /// A table must have 2 to 5 levels.
    BadLevels {
        /// The levels asked for.
        levels: u8,
    },
    /// The unmap would cut a block (2 MiB / 1 GiB leaf) in part: refused,
    /// nothing changed. Unmap the whole block (it was mapped as one), or map
    /// with page-sized pieces where partial unmaps are wanted.
    PartialBlock {
        /// Start of the block.
        iova: DmaAddr,
        /// Its size in bytes.
        size: u64,
    },
}

/// Errors of the two-step DMA API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum DmaError {
    /// A zero length.
    ZeroLength,
    /// A physical address, offset or length that must be page aligned is not.
    Unaligned {
        /// The offending value.
        value: u64,
    },
    /// `a + b` overflowed.
    Overflow {
        /// First operand.
        a: u64,
        /// Second operand.
        b: u64,
    },
    /// `[offset, offset + len)` is not inside the transaction's `size` bytes.
    OutsideTransaction {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The transaction's size.
        size: u64,
    },
    /// Part of the range is already linked; nothing was changed.
    AlreadyLinked {
        /// First linked address found.
        iova: DmaAddr,
    },
    /// Part of the range is not linked; nothing was changed.
    NotLinked {
        /// First unlinked address found.
        iova: DmaAddr,
    },
    /// The IOVA allocator has no free range of this size.
    IovaExhausted {
        /// Requested size.
        size: u64,
    },
    /// The allocator's fixed-capacity bookkeeping is full.
    AllocatorFull,
    /// The request cannot fit below the device's DMA mask / the domain aperture.
    AboveDmaMask {
        /// Requested size.
        size: u64,
        /// The mask.
        mask: u64,
    },
    /// The transaction belongs to another domain.
    WrongDomain {
        /// The domain the transaction came from.
        expected: u16,
        /// The domain it was used with.
        found: u16,
    },
    /// The lender refused table memory; nothing was changed.
    OutOfMemory,
    /// The physical address does not fit the table format.
    PhysTooLarge {
        /// The offending address.
        phys: PhysAddr,
    },
    /// A P2P range and host memory, or two P2P providers, in one transaction.
    MixedP2p,
    /// The P2P path between provider and client is not supported.
    P2pNotSupported {
        /// Device owning the P2P memory.
        provider: DeviceId,
        /// Device doing the DMA.
        client: DeviceId,
    },
    /// Neither read nor write permission was asked for.
    NoAccess,
    /// The transaction still has linked bytes (use `free`, which unlinks them,
    /// or unlink first).
    StillLinked {
        /// Bytes still linked.
        linked: u64,
    },
    /// The domain is an identity (bypass) domain: use the direct path.
    IdentityDomain,
    /// A domain configuration value is out of range.
    BadConfig {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The IOMMU driver failed.
    Backend(BackendError),
    /// The unlink would cut a block (2 MiB / 1 GiB leaf, linked as one) in
    /// part: refused, nothing changed (no split under a live walker).
    PartialBlock {
        /// Start of the block.
        iova: DmaAddr,
        /// Its size in bytes.
        size: u64,
    },
    /// A bus-address P2P link or unlink would leave a hole in the linked
    /// part of the transaction, which such transactions keep as one run
    /// `[start, end)` of offsets (nothing in the IOMMU records them).
    BusAddrGap {
        /// The offset asked for.
        offset: u64,
        /// Start of the linked run.
        start: u64,
        /// End of the linked run.
        end: u64,
    },
    /// No more domains can get a unique transaction token (2^32 were made).
    TokensExhausted,
    /// A fixed IOVA range is not inside the domain's aperture.
    OutsideAperture {
        /// Start of the range asked for.
        start: u64,
        /// Its size.
        size: u64,
        /// First address of the aperture.
        aperture_start: u64,
        /// One past its last address.
        aperture_end: u64,
    },
    /// A fixed IOVA range overlaps a reserved range (for VT-d, e.g., the
    /// interrupt window 0xFEE0_0000–0xFEEF_FFFF); nothing was changed.
    IovaReserved {
        /// Start of the range asked for.
        start: u64,
        /// Its size.
        size: u64,
        /// Start of the reserved range it hits.
        reserved_start: u64,
        /// One past the end of that reserved range.
        reserved_end: u64,
    },
    /// A fixed IOVA range overlaps a live one (handed out, at a fixed
    /// address, or an identity region); nothing was changed.
    IovaInUse {
        /// Start of the range asked for.
        start: u64,
        /// Its size.
        size: u64,
        /// Start of the live range it hits.
        used_start: u64,
        /// One past the end of that live range.
        used_end: u64,
    },
    /// The domain already holds its maximum of fixed ranges (reserved,
    /// fixed-IOVA transactions and identity regions together).
    ReservedFull {
        /// How many it holds.
        capacity: u32,
    },
}

impl From<BackendError> for DmaError {
    fn from(e: BackendError) -> Self {
        DmaError::Backend(e)
    }
}

impl From<PageTableError> for DmaError {
    fn from(e: PageTableError) -> Self {
        match e {
            PageTableError::Unaligned { value } => DmaError::Unaligned { value },
            PageTableError::ZeroLength => DmaError::ZeroLength,
            PageTableError::OutOfRange { iova, len, .. } => {
                DmaError::Overflow { a: iova.0, b: len }
            }
            PageTableError::AlreadyMapped { iova } => DmaError::AlreadyLinked { iova },
            PageTableError::NotMapped { iova } => DmaError::NotLinked { iova },
            PageTableError::PhysTooLarge { phys } => DmaError::PhysTooLarge { phys },
            PageTableError::OutOfMemory => DmaError::OutOfMemory,
            PageTableError::NoAccess => DmaError::NoAccess,
            PageTableError::BadLevels { levels } => DmaError::BadConfig {
                what: "levels",
                value: levels as u64,
            },
            PageTableError::PartialBlock { iova, size } => DmaError::PartialBlock { iova, size },
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Timeout { what, polls } => {
                write!(f, "hardware wait `{what}` timed out after {polls} polls")
            }
            Self::UnknownDevice(d) => write!(f, "device {d} is unknown to the IOMMU"),
            Self::Unsupported(what) => write!(f, "the hardware does not support {what}"),
            Self::OutOfMemory => f.write_str("the lender refused table or queue memory"),
            Self::QueueError { code, index } => write!(
                f,
                "the command/invalidation queue stopped on error {code:#x} at slot {index}"
            ),
            Self::HardwareError { status } => {
                write!(
                    f,
                    "the hardware reported a global error (status {status:#x})"
                )
            }
            Self::LenderCannotClean => f.write_str(
                "the table walker is not cache coherent and the lender cannot clean caches",
            ),
        }
    }
}

impl fmt::Display for PageTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unaligned { value } => write!(f, "{value:#x} is not 4 KiB aligned"),
            Self::ZeroLength => f.write_str("zero length"),
            Self::OutOfRange { iova, len, limit } => write!(
                f,
                "[{iova}, +{len:#x}) goes past what the table translates ({limit:#x})"
            ),
            Self::AlreadyMapped { iova } => write!(f, "{iova} is already mapped"),
            Self::NotMapped { iova } => write!(f, "{iova} is not mapped"),
            Self::PhysTooLarge { phys } => {
                write!(f, "{phys} is above the format's output address size")
            }
            Self::OutOfMemory => f.write_str("the lender refused a table page"),
            Self::NoAccess => f.write_str("a mapping needs read or write permission"),
            Self::BadLevels { levels } => write!(f, "{levels} table levels (2 to 5 allowed)"),
            Self::PartialBlock { iova, size } => write!(
                f,
                "only part of the {size:#x}-byte block at {iova} would be unmapped (unmap all of it)"
            ),
        }
    }
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroLength => f.write_str("zero length"),
            Self::Unaligned { value } => write!(f, "{value:#x} is not page aligned"),
            Self::Overflow { a, b } => write!(f, "{a:#x} + {b:#x} overflows"),
            Self::OutsideTransaction { offset, len, size } => write!(
                f,
                "[{offset:#x}, +{len:#x}) is outside the transaction's {size:#x} bytes"
            ),
            Self::AlreadyLinked { iova } => write!(f, "{iova} is already linked"),
            Self::NotLinked { iova } => write!(f, "{iova} is not linked"),
            Self::IovaExhausted { size } => write!(f, "no free IOVA range of {size:#x} bytes"),
            Self::AllocatorFull => f.write_str("the IOVA allocator's bookkeeping is full"),
            Self::AboveDmaMask { size, mask } => write!(
                f,
                "{size:#x} bytes do not fit below DMA mask {mask:#x} and the aperture"
            ),
            Self::WrongDomain { expected, found } => write!(
                f,
                "the transaction belongs to domain {expected}, not domain {found}"
            ),
            Self::OutOfMemory => f.write_str("the lender refused table memory"),
            Self::PhysTooLarge { phys } => write!(f, "{phys} does not fit the table format"),
            Self::MixedP2p => {
                f.write_str("P2P memory and host memory (or two providers) in one transaction")
            }
            Self::P2pNotSupported { provider, client } => {
                write!(f, "no supported P2P path from {client} to {provider}")
            }
            Self::NoAccess => f.write_str("neither read nor write permission asked for"),
            Self::StillLinked { linked } => {
                write!(f, "the transaction still has {linked:#x} bytes linked")
            }
            Self::IdentityDomain => f.write_str("identity domain: use the direct path"),
            Self::BadConfig { what, value } => write!(f, "bad domain setting {what} = {value:#x}"),
            Self::Backend(e) => write!(f, "IOMMU driver: {e}"),
            Self::PartialBlock { iova, size } => write!(
                f,
                "only part of the {size:#x}-byte block at {iova} would be unlinked (unlink all of it)"
            ),
            Self::BusAddrGap { offset, start, end } => write!(
                f,
                "offset {offset:#x} would leave a hole in the bus-address run [{start:#x}, {end:#x})"
            ),
            Self::TokensExhausted => f.write_str("no unique domain token is left (2^32 were made)"),
            Self::OutsideAperture {
                start,
                size,
                aperture_start,
                aperture_end,
            } => write!(
                f,
                "[{start:#x}, +{size:#x}) is not inside the aperture [{aperture_start:#x}, {aperture_end:#x})"
            ),
            Self::IovaReserved {
                start,
                size,
                reserved_start,
                reserved_end,
            } => write!(
                f,
                "[{start:#x}, +{size:#x}) overlaps the reserved range [{reserved_start:#x}, {reserved_end:#x})"
            ),
            Self::IovaInUse {
                start,
                size,
                used_start,
                used_end,
            } => write!(
                f,
                "[{start:#x}, +{size:#x}) overlaps the live range [{used_start:#x}, {used_end:#x})"
            ),
            Self::ReservedFull { capacity } => write!(
                f,
                "the domain already holds {capacity} fixed and reserved IOVA ranges"
            ),
        }
    }
}

impl core::error::Error for BackendError {}

impl core::error::Error for PageTableError {}

impl core::error::Error for DmaError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(e),
            _ => None,
        }
    }
}
