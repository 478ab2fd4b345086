//! Compile-time list of the common traits each public type implements.
//!
//! Nothing here runs: each closure only names `needs::<T>()` for every type,
//! so dropping a derive (or adding a public type without one, once listed)
//! fails the build, including `cargo clippy --lib --features defmt,log,alloc`
//! for the `defmt` list. Add new public types here.
//!
//! Groups:
//! - value types (addresses, configurations, descriptors, errors, events,
//!   statistics): `Debug`, `Clone`, `Copy`, `PartialEq`, `Eq`, and
//!   `defmt::Format` with the `defmt` feature;
//! - transaction states (`IovaState`, `DirectState`, `DmaPath`, `Mapping`):
//!   `Debug`, `PartialEq`, `Eq`, `defmt::Format` but deliberately **not**
//!   `Clone`/`Copy`: a state is consumed by `free`/`unmap`, so a copy would
//!   let the same range be freed twice;
//! - owners of tables or registers (`Domain`, `IoPageTable`, `IovaAllocator`,
//!   `P2pRegistry`, `Vtd`, `InvQueue`, `DeviceTopology`, lenders): `Debug` and
//!   `defmt::Format` (summaries: the lender and table contents are not shown).

#![allow(dead_code)]

use crate::mem::TableMemory;
use crate::pgtable::arm::{ArmStage1, ArmStage2};
use crate::pgtable::vtd::VtdSecondLevel;

fn debug<T: core::fmt::Debug + ?Sized>() {}
fn value<T: core::fmt::Debug + Clone + Copy + PartialEq + Eq>() {}
fn eq<T: core::fmt::Debug + PartialEq + Eq>() {}
#[cfg(feature = "defmt")]
fn format<T: defmt::Format + ?Sized>() {}

/// Types generic over a lender are checked with this one.
type Lender = &'static dyn TableMemory;

macro_rules! values {
    ($($t:ty),* $(,)?) => {
        const _: fn() = || {
            $(value::<$t>();)*
        };
        #[cfg(feature = "defmt")]
        const _: fn() = || {
            $(format::<$t>();)*
        };
    };
}

macro_rules! others {
    ($check:ident: $($t:ty),* $(,)?) => {
        const _: fn() = || {
            $($check::<$t>();)*
        };
        #[cfg(feature = "defmt")]
        const _: fn() = || {
            $(format::<$t>();)*
        };
    };
}

// Crate root, addresses, core API.
values!(
    crate::addr::PhysAddr,
    crate::addr::DmaAddr,
    crate::addr::BusAddr,
    crate::device::DeviceId,
    crate::backend::TableFormat,
    crate::backend::DomainInfo,
    crate::backend::Attachment,
    crate::error::BackendError,
    crate::error::PageTableError,
    crate::error::DmaError,
    crate::iova::IovaRange,
    crate::iova::FixedRange,
    crate::iova::FixedUse,
    crate::state::DmaKind,
    crate::state::DomainConfig,
    crate::p2p::P2pMapType,
    crate::p2p::P2pError,
    crate::p2p::P2pProvider,
    crate::p2p::Port,
);

// Page-table formats.
values!(
    crate::pgtable::MapAttrs,
    crate::pgtable::DmaDirection,
    crate::pgtable::Pte,
    crate::pgtable::UnmapOutcome,
    crate::pgtable::arm::S1Bits,
    crate::pgtable::arm::S2Bits,
    ArmStage1,
    ArmStage2,
    crate::pgtable::vtd::SlBits,
    VtdSecondLevel,
    crate::vtd::VtdFirstLevel,
);

// VT-d.
values!(
    crate::vtd::VtdError,
    crate::vtd::VtdConfig,
    crate::vtd::Features,
    crate::vtd::VtdStats,
    crate::vtd::DeviceState,
    crate::vtd::TranslationType,
    crate::vtd::ContextEntry,
    crate::vtd::RootEntry,
    crate::vtd::ScalableRootEntry,
    crate::vtd::ScalableContextEntry,
    crate::vtd::PasidDirEntry,
    crate::vtd::PasidEntry,
    crate::vtd::Pgtt,
    crate::vtd::ContextGranularity,
    crate::vtd::IotlbGranularity,
    crate::vtd::PasidGranularity,
    crate::vtd::PasidIotlbGranularity,
    crate::vtd::InvDesc,
    crate::vtd::Access,
    crate::vtd::FaultReason,
    crate::vtd::FaultRecord,
    crate::vtd::FaultStatus,
);

// SMMUv3 (value types only; `Smmu`, `StreamTable`, `SteSlot`,
// `CommandQueue` and `EventQueue` have no `Debug` yet).
values!(
    crate::smmuv3::SmmuError,
    crate::smmuv3::CommandError,
    crate::smmuv3::CommandErrorCode,
    crate::smmuv3::SmmuConfig,
    crate::smmuv3::StreamTableChoice,
    crate::smmuv3::StreamTableFormat,
    crate::smmuv3::Features,
    crate::smmuv3::features::IdRegs,
    crate::smmuv3::Stats,
    crate::smmuv3::CommandCounts,
    crate::smmuv3::EventReport,
    crate::smmuv3::Event,
    crate::smmuv3::FaultInfo,
    crate::smmuv3::Stage,
    crate::smmuv3::ContextDescriptor,
    crate::smmuv3::Command,
    crate::smmuv3::cmd::Opcode,
    crate::smmuv3::TlbiRange,
    crate::smmuv3::Ste,
    crate::smmuv3::Stage2Config,
    crate::smmuv3::ste::SteConfig,
    crate::smmuv3::ste::SteStep,
    crate::smmuv3::ste::L1Desc,
    crate::smmuv3::queue::QueueIndex,
);

// Test doubles' reports.
values!(
    crate::testing::Call,
    crate::testing::order::Violation,
    crate::testing::order::Event,
    crate::testing::vtd_desc::VtdRules,
    crate::testing::vtd_desc::VtdDesc,
    crate::testing::vtd_desc::Violation,
);

// Device assignment.
values!(
    crate::guest::GuestRegion,
    crate::guest::GuestError,
    crate::guest::ForeignTables,
);

// Transaction states: never Clone (see the module docs).
others!(eq:
    crate::state::IovaState,
    crate::state::DirectState,
    crate::state::DmaPath,
    crate::state::Mapping,
    crate::msi::MsiDoorbell,
    crate::p2p::DeviceTopology,
);

// Owners of tables, ranges or registers: summaries.
others!(debug:
    crate::state::Domain<ArmStage1, Lender>,
    crate::state::Domain<ArmStage2, Lender>,
    crate::state::Domain<VtdSecondLevel, Lender>,
    crate::guest::GuestDomain<ArmStage2, Lender, 4>,
    crate::pgtable::IoPageTable<ArmStage1, Lender>,
    crate::iova::IovaAllocator,
    crate::p2p::P2pRegistry,
    crate::vtd::Vtd<Lender>,
    crate::vtd::qi::InvQueue,
);

#[cfg(feature = "alloc")]
values!(crate::mem::GlobalAllocMemory);
