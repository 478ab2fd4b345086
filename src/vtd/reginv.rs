//! Register-based invalidation (VT-d 6.5.1): CCMD and the IOTLB registers,
//! used when queued invalidation is absent or not enabled. Each call waits,
//! bounded, for the hardware to clear the busy bit.

use tock_registers::interfaces::{Readable, Writeable};

use super::inv::{ContextGranularity, IotlbGranularity};
use super::regs::{CCMD, IOTLB, IVA, IotlbRegs, VtdRegs};
use crate::error::BackendError;

/// CCMD value for a context-cache invalidation of granularity `g`.
pub fn ccmd_value(g: ContextGranularity) -> u64 {
    let v = match g {
        ContextGranularity::Global => CCMD::ICC::SET + CCMD::CIRG::Global,
        ContextGranularity::Domain(did) => {
            CCMD::ICC::SET + CCMD::CIRG::Domain + CCMD::DID.val(did.into())
        }
        ContextGranularity::Device { did, sid } => {
            CCMD::ICC::SET
                + CCMD::CIRG::Device
                + CCMD::DID.val(did.into())
                + CCMD::SID.val(sid.into())
        }
    };
    v.value
}

/// IVA and IOTLB register values for an IOTLB invalidation of granularity `g`.
pub fn iotlb_values(g: IotlbGranularity, drain_reads: bool, drain_writes: bool) -> (u64, u64) {
    let drain = IOTLB::DR.val(drain_reads.into()) + IOTLB::DW.val(drain_writes.into());
    let (iva, cmd) = match g {
        IotlbGranularity::Global => (0, IOTLB::IIRG::Global),
        IotlbGranularity::Domain(did) => (0, IOTLB::IIRG::Domain + IOTLB::DID.val(did.into())),
        IotlbGranularity::Page { did, addr, am, ih } => (
            (IVA::ADDR.val(addr.0 >> 12) + IVA::IH.val(ih.into()) + IVA::AM.val(am.into())).value,
            IOTLB::IIRG::Page + IOTLB::DID.val(did.into()),
        ),
    };
    (iva, (IOTLB::IVT::SET + cmd + drain).value)
}

/// Invalidates the context cache through CCMD and waits for ICC to clear.
///
/// # Errors
///
/// [`BackendError::Timeout`]: CCMD.ICC did not clear within `budget` polls.
pub fn invalidate_context(
    regs: &VtdRegs,
    g: ContextGranularity,
    budget: u32,
) -> Result<(), BackendError> {
    regs.ccmd.set(ccmd_value(g));
    let mut polls = 0u32;
    while regs.ccmd.is_set(CCMD::ICC) {
        polls += 1;
        if polls >= budget {
            return Err(BackendError::Timeout {
                what: "VT-d CCMD.ICC",
                polls,
            });
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Invalidates the IOTLB through IVA / IOTLB_REG and waits for IVT to clear.
/// An actual granularity of 0 (IAIG) means the hardware refused the request.
///
/// # Errors
///
/// - [`BackendError::Timeout`]: IOTLB.IVT did not clear within `budget`
///   polls.
/// - [`BackendError::Unsupported`]: the hardware refused the request
///   (IAIG = 0).
pub fn invalidate_iotlb(
    iotlb: &IotlbRegs,
    g: IotlbGranularity,
    drain_reads: bool,
    drain_writes: bool,
    budget: u32,
) -> Result<(), BackendError> {
    let (iva, cmd) = iotlb_values(g, drain_reads, drain_writes);
    if matches!(g, IotlbGranularity::Page { .. }) {
        iotlb.iva.set(iva);
    }
    iotlb.iotlb.set(cmd);
    let mut polls = 0u32;
    loop {
        let v = iotlb.iotlb.extract();
        if !v.is_set(IOTLB::IVT) {
            if v.read(IOTLB::IAIG) == 0 {
                return Err(BackendError::Unsupported(
                    "register-based IOTLB invalidation refused (IAIG = 0)",
                ));
            }
            return Ok(());
        }
        polls += 1;
        if polls >= budget {
            return Err(BackendError::Timeout {
                what: "VT-d IOTLB.IVT",
                polls,
            });
        }
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::DmaAddr;

    #[test]
    fn ccmd_values_match_hand_worked_layout() {
        // ICC 63, CIRG 62:61 (01 global, 11 device), SID 31:16, DID 15:0.
        assert_eq!(
            ccmd_value(ContextGranularity::Global),
            0xa000_0000_0000_0000
        );
        assert_eq!(
            ccmd_value(ContextGranularity::Device { did: 5, sid: 0x18 }),
            0xe000_0000_0018_0005
        );
    }

    #[test]
    fn iotlb_register_values_match_hand_worked_layout() {
        // IVT 63, IIRG 61:60 (10 domain, 11 page), DR 49, DW 48, DID 47:32.
        let (iva, cmd) = iotlb_values(IotlbGranularity::Domain(3), false, false);
        assert_eq!((iva, cmd), (0, 0xa000_0003_0000_0000));
        let page = IotlbGranularity::Page {
            did: 2,
            addr: DmaAddr(0x40_0000),
            am: 9,
            ih: false,
        };
        let (iva, cmd) = iotlb_values(page, true, true);
        assert_eq!(iva, 0x40_0009);
        assert_eq!(cmd, 0xb003_0002_0000_0000);
    }
}
