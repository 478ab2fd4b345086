//! Every error type follows the ecosystem's conventions: `Display` that names
//! the offending values, `core::error::Error` with the driver error as source.

use bare_iommu::addr::DmaAddr;
use bare_iommu::error::{BackendError, DmaError, PageTableError};
use bare_iommu::p2p::P2pError;
use bare_iommu::smmuv3::SmmuError;
use bare_iommu::vtd::VtdError;
use bare_iommu::{DeviceId, PhysAddr};
use core::error::Error;

fn is_error<E: Error + Send + Sync + 'static>() {}

#[test]
fn every_error_type_is_a_core_error() {
    is_error::<BackendError>();
    is_error::<PageTableError>();
    is_error::<DmaError>();
    is_error::<SmmuError>();
    is_error::<VtdError>();
    is_error::<P2pError>();
}

#[test]
fn p2p_errors_name_the_devices_and_the_range() {
    let gpu = DeviceId::new(0, 3, 0, 0).unwrap();
    let nvme = DeviceId::new(0, 4, 0, 0).unwrap();
    let e = P2pError::NotSupported {
        provider: gpu,
        client: nvme,
    };
    let s = e.to_string();
    assert!(
        s.contains(&gpu.to_string()) && s.contains(&nvme.to_string()),
        "{s}"
    );
    let e = P2pError::BadRange {
        start: PhysAddr(0x60_0000_0000),
        len: 0,
    };
    assert!(e.to_string().contains("0x6000000000"), "{e}");
    assert!(P2pError::Full.source().is_none());
}

#[test]
fn display_names_the_offending_values() {
    let e = DmaError::OutsideTransaction {
        offset: 0x3000,
        len: 0x2000,
        size: 0x4000,
    };
    assert_eq!(
        e.to_string(),
        "[0x3000, +0x2000) is outside the transaction's 0x4000 bytes"
    );
    let e = PageTableError::NotMapped {
        iova: DmaAddr(0x1234_5000),
    };
    assert!(e.to_string().contains("0x12345000"), "{e}");
    let e = BackendError::Timeout {
        what: "CMD_SYNC",
        polls: 1000,
    };
    assert!(e.to_string().contains("CMD_SYNC") && e.to_string().contains("1000"));
}

#[test]
fn a_driver_failure_is_the_source_of_the_dma_error() {
    let inner = BackendError::QueueError { code: 1, index: 7 };
    let e = DmaError::Backend(inner);
    let src = e.source().expect("a backend error has a source");
    assert_eq!(src.to_string(), inner.to_string());
    assert!(DmaError::ZeroLength.source().is_none());
    let v = VtdError::Backend(inner);
    assert_eq!(v.source().map(|s| s.to_string()), Some(inner.to_string()));
}
