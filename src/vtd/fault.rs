//! Primary fault records (VT-d 7.2.1, 11.4.14) and fault reasons (appendix A).

use core::fmt;

use crate::addr::DmaAddr;
use crate::device::DeviceId;

/// Non-recoverable fault reason of a DMA-remapping fault (VT-d appendix A:
/// the legacy-mode codes and the scalable-mode codes this driver can cause).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum FaultReason {
    /// 01h: the root entry's present bit is clear.
    RootEntryNotPresent,
    /// 02h: the context entry's present bit is clear (device blocked).
    ContextEntryNotPresent,
    /// 03h: the context entry is invalid (bad AW, TT, …).
    ContextEntryInvalid,
    /// 04h: the address is above the guest address width.
    AddressBeyondMgaw,
    /// 05h: a write to a page without W (or not present).
    WriteDenied,
    /// 06h: a read of a page without R (or not present).
    ReadDenied,
    /// 07h: a second-level paging entry could not be read.
    PagingEntryAccess,
    /// 08h: the root table could not be read.
    RootTableAccess,
    /// 09h: the context table could not be read.
    ContextTableAccess,
    /// 0Ah: reserved bits set in a root entry.
    RootEntryReserved,
    /// 0Bh: reserved bits set in a context entry.
    ContextEntryReserved,
    /// 0Ch: reserved bits set in a second-level paging entry.
    PagingEntryReserved,
    /// 0Dh: the context entry's TT forbids this request type.
    TranslationTypeBlocked,
    /// 20h: a remappable interrupt request with reserved fields set (MSI
    /// address above 4 GiB, data bits 31:16 with SHV, …).
    IrRequestReserved,
    /// 21h: the interrupt index is past the table (IRTA.S).
    IrIndexBeyondTable,
    /// 22h: the interrupt-remapping entry is not present.
    IrEntryNotPresent,
    /// 23h: the interrupt-remapping table could not be read.
    IrTableAccess,
    /// 24h: reserved bits set in a present interrupt-remapping entry.
    IrEntryReserved,
    /// 25h: a compatibility-format interrupt blocked (GSTS.CFIS clear, or
    /// extended interrupt mode on).
    IrCompatibilityBlocked,
    /// 26h: the requester failed the entry's source validation
    /// (SVT/SQ/SID): a device raised an entry that is not its own.
    IrSourceIdBlocked,
    /// 27h: a posted-interrupt descriptor could not be accessed.
    IrPostedDescriptorAccess,
    /// 59h (scalable mode): the PASID table entry is not present.
    PasidEntryNotPresent,
    /// 5Bh (scalable mode): the PASID table entry is invalid.
    PasidEntryInvalid,
    /// 70h: a first-level paging entry could not be read.
    FirstLevelEntryAccess,
    /// 71h: a first-level paging entry is not present.
    FirstLevelEntryNotPresent,
    /// 72h: reserved bits set in a first-level paging entry.
    FirstLevelEntryReserved,
    /// 73h: the PASID entry's first-level table pointer is invalid.
    FirstLevelPointerInvalid,
    /// 81h: a first-level entry denies the request's privilege (U/S).
    FirstLevelPrivilege,
    /// 85h (scalable mode): a write to a page without write permission.
    ScalableWriteDenied,
    /// Another code (scalable mode, …).
    Other(u8),
}

impl FaultReason {
    /// The reason for raw fault-reason code `code`.
    pub const fn from_code(code: u8) -> Self {
        match code {
            0x01 => Self::RootEntryNotPresent,
            0x02 => Self::ContextEntryNotPresent,
            0x03 => Self::ContextEntryInvalid,
            0x04 => Self::AddressBeyondMgaw,
            0x05 => Self::WriteDenied,
            0x06 => Self::ReadDenied,
            0x07 => Self::PagingEntryAccess,
            0x08 => Self::RootTableAccess,
            0x09 => Self::ContextTableAccess,
            0x0a => Self::RootEntryReserved,
            0x0b => Self::ContextEntryReserved,
            0x0c => Self::PagingEntryReserved,
            0x0d => Self::TranslationTypeBlocked,
            0x20 => Self::IrRequestReserved,
            0x21 => Self::IrIndexBeyondTable,
            0x22 => Self::IrEntryNotPresent,
            0x23 => Self::IrTableAccess,
            0x24 => Self::IrEntryReserved,
            0x25 => Self::IrCompatibilityBlocked,
            0x26 => Self::IrSourceIdBlocked,
            0x27 => Self::IrPostedDescriptorAccess,
            0x59 => Self::PasidEntryNotPresent,
            0x5b => Self::PasidEntryInvalid,
            0x70 => Self::FirstLevelEntryAccess,
            0x71 => Self::FirstLevelEntryNotPresent,
            0x72 => Self::FirstLevelEntryReserved,
            0x73 => Self::FirstLevelPointerInvalid,
            0x81 => Self::FirstLevelPrivilege,
            0x85 => Self::ScalableWriteDenied,
            c => Self::Other(c),
        }
    }
}

/// Access type of the faulting request (FRCD.T).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Access {
    /// T = 0: a write (the device wrote memory).
    Write,
    /// T = 1: a read (the device read memory).
    Read,
}

/// One decoded primary fault record (VT-d 11.4.14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultRecord {
    /// Which fault-recording register held it.
    pub index: u16,
    /// Fault reason.
    pub reason: FaultReason,
    /// Raw fault-reason code.
    pub code: u8,
    /// Requester of the faulting DMA (segment 0 unless the caller says otherwise).
    pub source_id: u16,
    /// Faulting page address (FI, bits 63:12).
    pub address: DmaAddr,
    /// Read or write.
    pub access: Access,
    /// PASID of the request when PP is set.
    pub pasid: Option<u32>,
    /// Execute requested (EXE).
    pub exec: bool,
    /// Privileged-mode requested (PRIV).
    pub privileged: bool,
}

impl FaultRecord {
    /// Decodes a fault-recording register from its low and high 64-bit
    /// halves; `None` if the F bit is clear (no fault held).
    pub const fn decode(index: u16, lo: u64, hi: u64) -> Option<Self> {
        if hi & (1 << 63) == 0 {
            return None;
        }
        let code = ((hi >> 32) & 0xff) as u8;
        Some(Self {
            index,
            reason: FaultReason::from_code(code),
            code,
            source_id: (hi & 0xffff) as u16,
            address: DmaAddr(lo & !0xfff),
            access: if hi & (1 << 62) != 0 {
                Access::Read
            } else {
                Access::Write
            },
            pasid: if hi & (1 << 31) != 0 {
                Some(((hi >> 40) & 0xf_ffff) as u32)
            } else {
                None
            },
            exec: hi & (1 << 30) != 0,
            privileged: hi & (1 << 29) != 0,
        })
    }

    /// Whether this is an interrupt-remapping fault (reasons 20h–27h,
    /// VT-d 7.1.1): then [`address`](Self::address) means nothing and
    /// [`interrupt_index`](Self::interrupt_index) names the entry.
    pub const fn is_interrupt_fault(&self) -> bool {
        matches!(self.code, 0x20..=0x27)
    }

    /// The interrupt index of an interrupt-remapping fault (FI bits 63:48,
    /// VT-d 11.4.14), `None` for a DMA fault.
    pub const fn interrupt_index(&self) -> Option<u16> {
        if self.is_interrupt_fault() {
            Some((self.address.0 >> 48) as u16)
        } else {
            None
        }
    }

    /// The faulting PCI function on `segment`.
    pub const fn device(&self, segment: u16) -> DeviceId {
        DeviceId::from_rid(segment, self.source_id)
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(i) = self.interrupt_index() {
            return write!(
                f,
                "fault #{}: interrupt from {} index {:#x} reason {:#04x} ({:?})",
                self.index,
                self.device(0),
                i,
                self.code,
                self.reason
            );
        }
        write!(
            f,
            "fault #{}: {:?} {} at {} reason {:#04x} ({:?})",
            self.index,
            self.access,
            self.device(0),
            self.address,
            self.code,
            self.reason
        )?;
        if let Some(p) = self.pasid {
            write!(f, " pasid {p:#x}")?;
        }
        Ok(())
    }
}

/// Fault status beyond the records themselves, from FSTS (VT-d 11.4.9.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultStatus {
    /// PFO: a fault arrived while its record was still full, and was lost.
    pub overflow: bool,
    /// IQE: the invalidation queue hit an invalid descriptor.
    pub queue_error: bool,
    /// ITE: a device-TLB invalidation timed out.
    pub timeout_error: bool,
    /// ICE: an invalidation completion error.
    pub completion_error: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_fault_of_blocked_page_decodes() {
        // hi: F(63) | T(62)=read | FR(39:32)=06h | SID(15:0)=0x0018; lo: FI=0x1234_5000.
        let hi = (1u64 << 63) | (1 << 62) | (0x06 << 32) | 0x18;
        let r = FaultRecord::decode(0, 0x1234_5000, hi).unwrap();
        assert_eq!(r.reason, FaultReason::ReadDenied);
        assert_eq!(r.code, 6);
        assert_eq!(r.source_id, 0x18);
        assert_eq!(r.device(0), DeviceId::new(0, 0, 3, 0).unwrap());
        assert_eq!(r.address, DmaAddr(0x1234_5000));
        assert_eq!(r.access, Access::Read);
        assert_eq!(r.pasid, None);
    }

    #[test]
    fn write_fault_with_pasid_decodes() {
        // T=0 write, FR=05h, PP(95 → hi bit 31), PV(123:104 → hi 59:40)=0x12345, SID 0x0120.
        let hi = (1u64 << 63) | (0x12345 << 40) | (0x05 << 32) | (1 << 31) | 0x0120;
        let r = FaultRecord::decode(3, 0xabc_dfff, hi).unwrap();
        assert_eq!(r.index, 3);
        assert_eq!(r.access, Access::Write);
        assert_eq!(r.reason, FaultReason::WriteDenied);
        assert_eq!(r.pasid, Some(0x12345));
        assert_eq!(r.address, DmaAddr(0xabc_d000));
        assert_eq!(r.source_id, 0x120);
    }

    #[test]
    fn interrupt_remapping_faults_decode_with_their_index() {
        // hi: F | FR 26h | SID 0x18; lo: FI with the interrupt index 0x0005
        // in 63:48 (VT-d 11.4.14), T clear.
        let hi = (1u64 << 63) | (0x26 << 32) | 0x18;
        let r = FaultRecord::decode(0, 5 << 48, hi).unwrap();
        assert_eq!(r.reason, FaultReason::IrSourceIdBlocked);
        assert!(r.is_interrupt_fault());
        assert_eq!(r.interrupt_index(), Some(5));
        let names = [
            (0x20, FaultReason::IrRequestReserved),
            (0x21, FaultReason::IrIndexBeyondTable),
            (0x22, FaultReason::IrEntryNotPresent),
            (0x23, FaultReason::IrTableAccess),
            (0x24, FaultReason::IrEntryReserved),
            (0x25, FaultReason::IrCompatibilityBlocked),
            (0x26, FaultReason::IrSourceIdBlocked),
            (0x27, FaultReason::IrPostedDescriptorAccess),
        ];
        for (code, reason) in names {
            assert_eq!(FaultReason::from_code(code), reason);
        }
        // A DMA fault has no interrupt index.
        let dma = FaultRecord::decode(0, 0x1234_5000, (1u64 << 63) | (6 << 32)).unwrap();
        assert_eq!(dma.interrupt_index(), None);
        assert_eq!(FaultReason::from_code(0x28), FaultReason::Other(0x28));
    }

    #[test]
    fn record_without_f_bit_is_empty() {
        assert_eq!(FaultRecord::decode(0, 0x1000, (0x06 << 32) | 0x18), None);
        assert_eq!(
            FaultReason::from_code(0x02),
            FaultReason::ContextEntryNotPresent
        );
        assert_eq!(FaultReason::from_code(0x31), FaultReason::Other(0x31));
        assert_eq!(
            FaultReason::from_code(0x71),
            FaultReason::FirstLevelEntryNotPresent
        );
    }
}
