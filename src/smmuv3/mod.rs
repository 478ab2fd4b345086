//! Arm SMMUv3 driver (IHI 0070).
//!
//! [`Smmu::new`] probes the register pages and decodes the [`Features`];
//! [`Smmu::init`] brings the SMMU up: GBPA abort and disable, stream table
//! (linear or 2-level), command and event queues, queues enabled, global
//! invalidation (CFGI_ALL, TLBI_NSNH_ALL, TLBI_EL2_ALL with IDR0.HYP,
//! CMD_SYNC), then SMMUEN — every CR0ACK/GBPA wait bounded. The driver then
//! implements [`IommuBackend`](crate::backend::IommuBackend), so the core's
//! two-step DMA API drives it; [`Smmu::poll_events`] (no interrupt controller
//! needed) and [`Smmu::handle_irq`] deliver decoded [`Event`]s.
//!
//! ```no_run
//! use bare_iommu::pgtable::{DmaDirection, MapAttrs, arm::ArmStage1};
//! use bare_iommu::smmuv3::{Smmu, SmmuConfig};
//! use bare_iommu::state::{Domain, DomainConfig};
//! use bare_iommu::{DeviceId, DmaError, IommuBackend, PhysAddr, TableMemory};
//!
//! fn example<M: TableMemory + Copy>(mem: M) -> Result<(), DmaError> {
//!     // SAFETY: on QEMU `virt` the SMMU's two register pages are at 0x0905_0000.
//!     let mut smmu = unsafe { Smmu::new(0x0905_0000, mem) }.expect("probe");
//!     smmu.init(SmmuConfig::default()).expect("init");
//!     println!("{}", smmu.features());
//!     let config = DomainConfig {
//!         id: 1, // the ASID
//!         levels: 3,
//!         aperture_start: 0x10_0000,
//!         aperture_end: 1 << 39,
//!         coherent_walk: smmu.coherent_walk(),
//!     };
//!     let mut dom = Domain::new(ArmStage1, mem, config)?;
//!     let dev = DeviceId::new(0, 0, 5, 0).expect("00:05.0");
//!     smmu.attach(dev, dom.attachment())?;
//!     let mut tx = dom.try_alloc(0x2000, u64::MAX)?.into_iova().expect("translated");
//!     let dir = DmaDirection::FromDevice;
//!     dom.link(&mut tx, PhysAddr(0x4100_0000), 0, 0x1000, dir, MapAttrs::empty())?;
//!     dom.link(&mut tx, PhysAddr(0x4180_0000), 0x1000, 0x1000, dir, MapAttrs::empty())?;
//!     dom.sync(&mut smmu)?; // one CMD_SYNC for both links
//!     // ... the device DMAs to tx.iova() ...
//!     smmu.poll_events(|event| println!("{event}"));
//!     dom.destroy(tx, &mut smmu)?; // unlink, TLBI, one CMD_SYNC, IOVA freed
//!     smmu.detach(dev)?;
//!     Ok(())
//! }
//! ```

pub mod cd;
pub mod cmd;
pub mod cmdq;
pub mod error;
pub mod event;
pub mod evtq;
pub mod features;
pub mod nested;
pub mod poll;
pub mod queue;
pub mod regs;
pub mod ste;
pub mod strtab;

// `Smmu` and its probe/accessors/command submission live here; the rest of
// its implementation is split by job:
mod attach; // STE/CD building and installation (attach_stream)
mod backend; // impl IommuBackend
mod config; // SmmuConfig, StreamTableChoice
mod event_report; // EventReport, poll_events, handle_irq
mod init; // init, shutdown, the CR0/GBPA/IRQ_CTRL handshakes
mod invalidate; // invalidate_range: TLBI planning
mod stats; // Stats

use tock_registers::interfaces::Readable;

pub use cd::ContextDescriptor;
pub use cmd::{Command, TlbiRange};
pub use cmdq::CommandCounts;
pub use config::{SmmuConfig, StreamTableChoice};
pub use error::{CommandError, CommandErrorCode, SmmuError};
pub use event::{Event, EventRecord, FaultInfo, Stage};
pub use event_report::EventReport;
pub use features::{Features, StallModel};
pub use nested::{GuestCdTable, NESTED_VMIDS};
pub use stats::Stats;
pub use ste::{CdTableFormat, NestedStage1Config, Stage2Config, Ste, SteConfig};
pub use strtab::StreamTableFormat;

use crate::backend::TableFormat;
use crate::mem::TableMemory;
use cmdq::CommandQueue;
use evtq::EventQueue;
use features::IdRegs;
use regs::{PAGE1_OFFSET, Page0, Page1};
use strtab::StreamTable;

/// MAIR the context descriptors carry: the attribute indexes the core's
/// stage-1 descriptors use.
pub const STAGE1_MAIR: u64 = crate::pgtable::arm::MAIR;

struct Running {
    strtab: StreamTable,
    cmdq: CommandQueue,
    evtq: EventQueue,
    config: SmmuConfig,
    /// Context descriptors no STE points at any more, whose invalidation
    /// never completed (a failed attach): the SMMU may still hold them, so
    /// they go back only when `shutdown` has stopped it.
    stranded_cds: heapless::Vec<crate::addr::PhysAddr, STRANDED_CDS>,
    /// VMIDs nested streams use, with how many streams use each.
    nested_vmids: heapless::Vec<(u16, u32), NESTED_VMIDS>,
    /// Nested VMIDs whose stage 2 was invalidated in the open batch: the
    /// sync follows with CMD_TLBI_NH_ALL for each.
    pending_nh_all: heapless::Vec<u16, NESTED_VMIDS>,
}

/// Most context descriptors [`Running`] keeps for `shutdown`; beyond, a CD
/// stranded by a failed attach is leaked (never freed while the SMMU may
/// read it).
const STRANDED_CDS: usize = 16;

/// One SMMUv3.
pub struct Smmu<M: TableMemory> {
    page0: &'static Page0,
    page1: &'static Page1,
    mem: M,
    features: Features,
    run: Option<Running>,
    /// Tables and queues of an `init` that failed after programming them,
    /// while CR0ACK never showed the SMMU stopped: the next successful
    /// `shutdown` gives them back.
    stranded: Option<Running>,
    /// The counters the driver keeps itself; [`Smmu::stats`] adds the
    /// command queue's.
    counters: Stats,
    /// GERROR.SFM_ERR was seen: the SMMU is in service failure mode and the
    /// driver refuses to use it until the next `init`.
    service_failure: bool,
}

impl<M: TableMemory> Smmu<M> {
    /// Probes the SMMU whose register page 0 is at `base` (page 1 at
    /// `base + 0x10000`) and decodes its features. Touches no state.
    ///
    /// # Safety
    ///
    /// `base` must map both register pages of an SMMUv3 as device memory, for
    /// as long as the returned value lives, and nothing else may drive it.
    ///
    /// # Errors
    ///
    /// [`SmmuError::BadRegisterBase`] when `base` is null or not 64 KiB aligned;
    /// [`SmmuError::BadIdRegister`] when an ID register reads a value the architecture does not
    /// allow (e.g. SIDSIZE above 32).
    pub unsafe fn new(base: usize, mem: M) -> Result<Self, SmmuError> {
        if base == 0 || base % 0x1_0000 != 0 {
            return Err(SmmuError::BadRegisterBase { base });
        }
        // SAFETY: the caller guarantees both pages are mapped for our lifetime.
        let (page0, page1) = unsafe {
            (
                &*(base as *const Page0),
                &*((base + PAGE1_OFFSET) as *const Page1),
            )
        };
        let raw = IdRegs {
            idr: [
                page0.idr0.get(),
                page0.idr1.get(),
                page0.idr2.get(),
                page0.idr3.get(),
                page0.idr4.get(),
                page0.idr5.get(),
            ],
            iidr: page0.iidr.get(),
            aidr: page0.aidr.get(),
        };
        let features = Features::decode(raw);
        if !features.aarch64_tables {
            return Err(SmmuError::Unsupported("AArch64 translation tables"));
        }
        if !features.gran_4k {
            return Err(SmmuError::Unsupported("4 KiB granule"));
        }
        Ok(Self {
            page0,
            page1,
            mem,
            features,
            run: None,
            stranded: None,
            counters: Stats::default(),
            service_failure: false,
        })
    }

    /// The decoded features.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The memory lender.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The table format a new translated domain should use: stage 1 when the
    /// SMMU has it, else stage 2.
    pub fn preferred_format(&self) -> Option<TableFormat> {
        if self.features.stage1 {
            Some(TableFormat::ArmStage1)
        } else if self.features.stage2 {
            Some(TableFormat::ArmStage2)
        } else {
            None
        }
    }

    /// Whether domains of `format` can be attached.
    pub fn supports(&self, format: TableFormat) -> bool {
        match format {
            TableFormat::ArmStage1 => self.features.stage1,
            TableFormat::ArmStage2 => self.features.stage2,
            _ => false,
        }
    }

    /// The stream table layout in use, once initialised.
    pub fn stream_table_format(&self) -> Option<StreamTableFormat> {
        self.run.as_ref().map(|r| r.strtab.format())
    }

    fn budget(&self) -> u32 {
        self.run
            .as_ref()
            .map_or(SmmuConfig::default().poll_budget, |r| r.config.poll_budget)
    }

    /// Queues `cmd` in the open batch (no wait; the next sync publishes it).
    /// Useful for commands the driver has no builder for, and to test the
    /// queue's error handling.
    ///
    /// # Errors
    ///
    /// [`SmmuError::NotInitialised`] before `init`; [`SmmuError::ServiceFailure`] after
    /// `GERROR.SFM_ERR`; a timeout or command error met while a full queue is drained.
    pub fn queue_command(&mut self, cmd: Command) -> Result<(), SmmuError> {
        if self.service_failure {
            return Err(SmmuError::ServiceFailure);
        }
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        let r = run
            .cmdq
            .push(p0, &self.mem, coherent, cmd, run.config.poll_budget);
        self.check_service_failure(r)
    }

    /// Publishes the open batch with one CMD_SYNC and waits for it. When
    /// the batch invalidated the stage 2 of a VMID that nested streams use,
    /// a CMD_TLBI_NH_ALL of that VMID and a second CMD_SYNC follow (see
    /// [`nested`]).
    ///
    /// # Errors
    ///
    /// [`SmmuError::NotInitialised`] before `init`; [`SmmuError::ServiceFailure`] after
    /// `GERROR.SFM_ERR`; [`SmmuError::Timeout`] when CMD_SYNC does not complete in the poll budget;
    /// [`SmmuError::Command`] when a command in the batch was refused (the queue was recovered).
    pub fn sync_commands(&mut self) -> Result<(), SmmuError> {
        self.sync_batch()?;
        self.flush_nested_stage1()
    }

    /// One CMD_SYNC for the open batch, waited for.
    fn sync_batch(&mut self) -> Result<(), SmmuError> {
        if self.service_failure {
            return Err(SmmuError::ServiceFailure);
        }
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        let r = run
            .cmdq
            .sync(p0, &self.mem, coherent, run.config.poll_budget);
        // One register read per sync: a completed sync does not prove the
        // SMMU is healthy (SFM may stop translation but not the queue).
        self.check_service_failure_if(true, r)
    }

    /// Whether the SMMU entered service failure mode (GERROR.SFM_ERR, §7.3.14);
    /// once seen, every operation returns [`SmmuError::ServiceFailure`]
    /// until [`init`](Self::init).
    pub fn in_service_failure(&self) -> bool {
        self.service_failure
    }

    /// Turns `r` into [`SmmuError::ServiceFailure`] when GERROR.SFM_ERR is
    /// active (a wait that timed out because the SMMU stopped is reported as
    /// what it is), and remembers it.
    fn check_service_failure<T>(&mut self, r: Result<T, SmmuError>) -> Result<T, SmmuError> {
        self.check_service_failure_if(r.is_err(), r)
    }

    fn check_service_failure_if<T>(
        &mut self,
        check: bool,
        r: Result<T, SmmuError>,
    ) -> Result<T, SmmuError> {
        if check && self.page0.active_gerrors() & regs::GERROR::SFM_ERR::SET.value != 0 {
            self.service_failure = true;
            return Err(SmmuError::ServiceFailure);
        }
        r
    }
}

// A Smmu holds `&'static` register references and lent memory; moving it to
// another thread moves the only handle.
// SAFETY: no interior shared state; every access goes through `&mut self`
// (register reads through `&self` are side-effect free).
unsafe impl<M: TableMemory + Send> Send for Smmu<M> {}

#[cfg(test)]
mod host_tests;
