//! Arm SMMUv3 driver (IHI 0070).
//!
//! [`Smmu::new`] probes the register pages and decodes the [`Features`];
//! [`Smmu::init`] brings the SMMU up: GBPA abort and disable, stream table
//! (linear or 2-level), command and event queues, queues enabled, global
//! invalidation (CFGI_ALL, TLBI_NSNH_ALL, TLBI_EL2_ALL with IDR0.HYP,
//! CMD_SYNC), then SMMUEN — every CR0ACK/GBPA wait bounded. The driver then
//! implements [`IommuBackend`], so the core's two-step DMA API drives it;
//! [`Smmu::poll_events`] (no interrupt controller needed) and
//! [`Smmu::handle_irq`] deliver decoded [`Event`]s.
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

pub mod barrier;
pub mod cd;
pub mod cmd;
pub mod cmdq;
pub mod error;
pub mod event;
pub mod evtq;
pub mod features;
pub mod poll;
pub mod queue;
pub mod regs;
pub mod ste;
pub mod strtab;

use crate::logging::{log_debug, log_warn};
use tock_registers::interfaces::{Readable, Writeable};

pub use cd::ContextDescriptor;
pub use cmd::{Command, TlbiRange};
pub use cmdq::CommandCounts;
pub use error::{CommandError, CommandErrorCode, SmmuError};
pub use event::{Event, FaultInfo, Stage};
pub use features::Features;
pub use ste::{Stage2Config, Ste};
pub use strtab::StreamTableFormat;

use crate::addr::{DmaAddr, PAGE_SIZE};
use crate::backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;
use cmdq::CommandQueue;
use evtq::EventQueue;
use features::IdRegs;
use poll::poll_until;
use regs::{CR0, CR1, CR2, GBPA, GERROR, IRQ_CTRL, PAGE1_OFFSET, Page0, Page1};
use strtab::StreamTable;

/// MAIR the context descriptors carry: the attribute indexes the core's
/// stage-1 descriptors use.
pub const STAGE1_MAIR: u64 = crate::pgtable::arm::MAIR;

/// Which stream table layout [`Smmu::init`] builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StreamTableChoice {
    /// Linear when `2^sid_bits` STEs fit in 64 KiB or the SMMU has no
    /// 2-level support, else 2-level.
    Auto,
    /// Always linear.
    Linear,
    /// Always 2-level (needs IDR0.ST_LEVEL).
    TwoLevel,
}

/// Settings of [`Smmu::init`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SmmuConfig {
    /// Stream table layout.
    pub stream_table: StreamTableChoice,
    /// StreamID bits the stream table covers; `None`: all of IDR1.SIDSIZE.
    pub sid_bits: Option<u8>,
    /// log2 of command queue entries (capped by IDR1.CMDQS).
    pub cmdq_log2: u8,
    /// log2 of event queue records (capped by IDR1.EVENTQS).
    pub evtq_log2: u8,
    /// Enable the GERROR and event queue interrupts (for [`Smmu::handle_irq`]).
    pub irqs: bool,
    /// Use range invalidation when the SMMU has it (IDR3.RIL); `false`
    /// forces the per-page / whole-domain path.
    pub range_invalidation: bool,
    /// Without range invalidation, ranges longer than this many pages are
    /// invalidated by ASID/VMID instead of page by page.
    pub tlbi_page_threshold: u64,
    /// Polls before a wait on the SMMU gives up with a timeout.
    pub poll_budget: u32,
}

impl Default for SmmuConfig {
    fn default() -> Self {
        Self {
            stream_table: StreamTableChoice::Auto,
            sid_bits: None,
            cmdq_log2: 8,
            evtq_log2: 7,
            irqs: false,
            range_invalidation: true,
            tlbi_page_threshold: 64,
            poll_budget: 1_000_000,
        }
    }
}

/// Counters the driver keeps since the last [`Smmu::init`]; tests read them
/// through [`Smmu::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stats {
    /// Commands submitted, by kind.
    pub commands: CommandCounts,
    /// Calls of [`IommuBackend::sync`].
    pub sync_calls: u64,
    /// Command queue errors met (and recovered from).
    pub command_errors: u64,
    /// The last command error.
    pub last_command_error: Option<CommandError>,
    /// Event records delivered.
    pub events: u64,
    /// Times the event queue overflowed (events lost).
    pub event_overflows: u64,
    /// GERROR bits acknowledged, OR-ed together.
    pub gerrors_seen: u32,
}

/// What one [`Smmu::poll_events`] / [`Smmu::handle_irq`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EventReport {
    /// Records delivered to the callback.
    pub events: u32,
    /// The event queue overflowed: some records were lost
    /// (EVENTQ_PROD.OVFLG, or GERROR.EVENTQ_ABT_ERR on QEMU).
    pub overflow: bool,
    /// GERROR bits that were active and have been acknowledged.
    pub gerror: u32,
}

struct Running {
    strtab: StreamTable,
    cmdq: CommandQueue,
    evtq: EventQueue,
    config: SmmuConfig,
}

/// One SMMUv3.
pub struct Smmu<M: TableMemory> {
    page0: &'static Page0,
    page1: &'static Page1,
    mem: M,
    features: Features,
    run: Option<Running>,
    sync_calls: u64,
    events: u64,
    event_overflows: u64,
    gerrors_seen: u32,
}

impl<M: TableMemory> Smmu<M> {
    /// Probes the SMMU whose register page 0 is at `base` (page 1 at
    /// `base + 0x10000`) and decodes its features. Touches no state.
    ///
    /// # Safety
    ///
    /// `base` must map both register pages of an SMMUv3 as device memory, for
    /// as long as the returned value lives, and nothing else may drive it.
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
            sync_calls: 0,
            events: 0,
            event_overflows: 0,
            gerrors_seen: 0,
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

    /// Counters since the last [`init`](Self::init).
    pub fn stats(&self) -> Stats {
        let (commands, command_errors, last_command_error) = match &self.run {
            Some(r) => {
                let (n, last) = r.cmdq.errors();
                (r.cmdq.counts(), n, last)
            }
            None => (CommandCounts::default(), 0, None),
        };
        Stats {
            commands,
            sync_calls: self.sync_calls,
            command_errors,
            last_command_error,
            events: self.events,
            event_overflows: self.event_overflows,
            gerrors_seen: self.gerrors_seen,
        }
    }

    fn budget(&self) -> u32 {
        self.run
            .as_ref()
            .map_or(SmmuConfig::default().poll_budget, |r| r.config.poll_budget)
    }

    /// Writes CR0 and waits, bounded, for CR0ACK to match.
    fn write_cr0(&self, value: u32, budget: u32) -> Result<(), SmmuError> {
        self.page0.cr0.set(value);
        poll_until("CR0ACK", budget, || self.page0.cr0ack.get() == value)
    }

    fn wait_gbpa_idle(&self, budget: u32) -> Result<(), SmmuError> {
        poll_until("GBPA.UPDATE", budget, || {
            !self.page0.gbpa.is_set(GBPA::UPDATE)
        })
    }

    /// Disables the SMMU and gives back the stream table, the context
    /// descriptors and the queues. GBPA is set to abort first, so no stream
    /// bypasses while SMMUEN goes to 0. Domains' page tables stay with their
    /// owners.
    pub fn shutdown(&mut self) -> Result<(), SmmuError> {
        let budget = self.budget();
        self.wait_gbpa_idle(budget)?;
        self.page0.gbpa.write(GBPA::ABORT::SET + GBPA::UPDATE::SET);
        self.wait_gbpa_idle(budget)?;
        self.write_cr0(0, budget)?;
        if let Some(r) = self.run.take() {
            // SAFETY: CR0 is 0 (acknowledged): the SMMU reads neither the
            // stream table, the CDs nor the queues any more; every CD an STE
            // points at is a one-page block from `build_ste`.
            unsafe {
                r.strtab.free(&self.mem);
                r.cmdq.free(&self.mem);
                r.evtq.free(&self.mem);
            }
        }
        Ok(())
    }

    /// Brings the SMMU up (§3.3 and §6.3.9's order): disable, GBPA abort,
    /// stream table, command queue, event queue, queues enabled, CFGI_ALL +
    /// TLBI_NSNH_ALL (+ TLBI_EL2_ALL with IDR0.HYP) + CMD_SYNC, then SMMUEN.
    /// Every stream starts aborted.
    pub fn init(&mut self, config: SmmuConfig) -> Result<(), SmmuError> {
        self.shutdown()?;
        self.sync_calls = 0;
        self.events = 0;
        self.event_overflows = 0;
        self.gerrors_seen = 0;
        let f = self.features;
        let budget = config.poll_budget.max(1);
        let coherent = f.coherent;
        let p0 = self.page0;

        // Interrupts off until the queues are set up: an earlier owner may
        // have left them on, and `config.irqs` may want them off (§6.3.16).
        p0.irq_ctrl.set(0);
        poll_until("IRQ_CTRLACK", budget, || p0.irq_ctrlack.get() == 0)?;

        // Errors left over from an earlier owner (GERROR survives CR0 = 0).
        let active = p0.gerror.get() ^ p0.gerrorn.get();
        if active != 0 {
            p0.gerrorn.set(p0.gerrorn.get() ^ active);
        }

        let (sh, cache) = if coherent { (3, 1) } else { (0, 0) };
        p0.cr1.write(
            CR1::QUEUE_IC.val(cache)
                + CR1::QUEUE_OC.val(cache)
                + CR1::QUEUE_SH.val(sh)
                + CR1::TABLE_IC.val(cache)
                + CR1::TABLE_OC.val(cache)
                + CR1::TABLE_SH.val(sh),
        );
        p0.cr2.write(CR2::RECINVSID::SET + CR2::PTM::SET);

        let sid_bits = config.sid_bits.unwrap_or(f.sid_bits).min(f.sid_bits);
        let format = match config.stream_table {
            StreamTableChoice::Linear => StreamTableFormat::Linear,
            StreamTableChoice::TwoLevel if f.two_level_strtab => StreamTableFormat::TwoLevel,
            StreamTableChoice::TwoLevel => {
                return Err(SmmuError::Unsupported("2-level stream table"));
            }
            StreamTableChoice::Auto if sid_bits > strtab::LINEAR_MAX_BITS && f.two_level_strtab => {
                StreamTableFormat::TwoLevel
            }
            StreamTableChoice::Auto => StreamTableFormat::Linear,
        };
        let strtab = StreamTable::new(&self.mem, format, sid_bits, coherent)?;
        strtab.program(p0);

        let mut cmdq = CommandQueue::new(&self.mem, config.cmdq_log2.min(f.cmdq_log2_max))?;
        cmdq.program(p0);
        let mut evtq = EventQueue::new(&self.mem, config.evtq_log2.min(f.evtq_log2_max))?;
        evtq.program(p0, self.page1);

        barrier::wmb();
        let queues = CR0::CMDQEN::SET.value | CR0::EVENTQEN::SET.value;
        self.write_cr0(queues, budget)?;

        cmdq.push(p0, &self.mem, coherent, Command::cfgi_all(), budget)?;
        cmdq.push(p0, &self.mem, coherent, Command::tlbi_nsnh_all(), budget)?;
        if f.hyp {
            cmdq.push(p0, &self.mem, coherent, Command::tlbi_el2_all(), budget)?;
        }
        cmdq.sync(p0, &self.mem, coherent, budget)?;

        if config.irqs {
            let want = IRQ_CTRL::GERROR_IRQEN::SET + IRQ_CTRL::EVENTQ_IRQEN::SET;
            p0.irq_ctrl.write(want);
            poll_until("IRQ_CTRLACK", budget, || {
                p0.irq_ctrlack.get() == p0.irq_ctrl.get()
            })?;
        }

        self.write_cr0(queues | CR0::SMMUEN::SET.value, budget)?;
        log_debug!("smmuv3: enabled, {} StreamID bits", sid_bits);
        self.run = Some(Running {
            strtab,
            cmdq,
            evtq,
            config,
        });
        Ok(())
    }

    /// Queues `cmd` in the open batch (no wait; the next sync publishes it).
    /// Useful for commands the driver has no builder for, and to test the
    /// queue's error handling.
    pub fn queue_command(&mut self, cmd: Command) -> Result<(), SmmuError> {
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        run.cmdq
            .push(p0, &self.mem, coherent, cmd, run.config.poll_budget)
    }

    /// Publishes the open batch with one CMD_SYNC and waits for it.
    pub fn sync_commands(&mut self) -> Result<(), SmmuError> {
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        run.cmdq
            .sync(p0, &self.mem, coherent, run.config.poll_budget)
    }

    /// The STE that `how` needs for `sid`, allocating a CD for stage 1.
    fn build_ste(&mut self, how: &Attachment) -> Result<Ste, SmmuError> {
        let f = self.features;
        let info = match how {
            Attachment::Blocked => return Ok(Ste::abort()),
            Attachment::Bypass => return Ok(Ste::bypass()),
            Attachment::Translated(info) => info,
        };
        let ias = check_domain(info)?;
        match info.format {
            TableFormat::ArmStage1 => {
                if !f.stage1 {
                    return Err(SmmuError::Unsupported("stage 1 translation"));
                }
                if f.asid_bits < 16 && info.id >> f.asid_bits != 0 {
                    return Err(SmmuError::BadDomain {
                        what: "ASID",
                        value: info.id as u64,
                    });
                }
                if info.root.0 >> f.oas_bits != 0 {
                    return Err(SmmuError::BadDomain {
                        what: "TTB0 beyond OAS",
                        value: info.root.0,
                    });
                }
                let cd = ContextDescriptor::new(
                    info.id,
                    info.root,
                    64 - ias,
                    f.oas_encoding.min(5),
                    STAGE1_MAIR,
                );
                let pa = self.mem.alloc_zeroed(1).ok_or(SmmuError::OutOfMemory)?;
                let p = self.mem.phys_to_virt(pa).cast::<u64>();
                for (i, w) in cd.0.iter().enumerate() {
                    // SAFETY: a fresh, page-aligned page lent by `mem`; the SMMU
                    // cannot see it until an STE points at it.
                    unsafe { p.add(i).write_volatile(*w) };
                }
                if !f.coherent {
                    self.mem.clean(pa, ContextDescriptor::SIZE);
                }
                Ok(Ste::stage1(pa, 0))
            }
            TableFormat::ArmStage2 => {
                if !f.stage2 {
                    return Err(SmmuError::Unsupported("stage 2 translation"));
                }
                if f.vmid_bits < 16 && info.id >> f.vmid_bits != 0 {
                    return Err(SmmuError::BadDomain {
                        what: "VMID",
                        value: info.id as u64,
                    });
                }
                // The IPA space is capped by the OAS (§5.2 S2T0SZ). S2SL0 for
                // a 4 KiB granule: 0 starts at level 2, 1 at level 1, 2 at
                // level 0 — the root of a 2-, 3- or 4-level table.
                let ipa_bits = ias.min(f.oas_bits);
                let sl0 = info.levels - 2;
                if info.root.0 >> f.oas_bits != 0 {
                    return Err(SmmuError::BadDomain {
                        what: "S2TTB beyond OAS",
                        value: info.root.0,
                    });
                }
                Ok(Ste::stage2(&Stage2Config {
                    vmid: info.id,
                    ttb: info.root,
                    t0sz: 64 - ipa_bits,
                    sl0,
                    ps: f.oas_encoding.min(5),
                }))
            }
            _ => Err(SmmuError::Unsupported("table format")),
        }
    }

    /// Installs `new` as the STE of `sid` following [`ste::update_plan`], so
    /// the SMMU never reads a half-written entry; each sync point is
    /// CFGI_STE (+ CFGI_CD for a stage-1 entry) and CMD_SYNC. Returns the
    /// entry it replaced.
    fn write_ste(&mut self, sid: u32, new: Ste) -> Result<Ste, SmmuError> {
        let coherent = self.features.coherent;
        let p0 = self.page0;
        let run = self.run.as_mut().ok_or(SmmuError::NotInitialised)?;
        let budget = run.config.poll_budget;
        let slot = run.strtab.locate(&self.mem, sid, coherent)?;
        let old = slot.read();
        for step in ste::update_plan(&old, &new) {
            match step {
                ste::SteStep::Write { word, value } => {
                    // Earlier stores land before this one.
                    barrier::wmb();
                    slot.write_word(word as usize, value);
                }
                ste::SteStep::Sync => {
                    if !coherent {
                        self.mem.clean(slot.pa(), Ste::SIZE);
                    }
                    let cfgi = Command::cfgi_ste(sid, true);
                    run.cmdq.push(p0, &self.mem, coherent, cfgi, budget)?;
                    if new.context_ptr().is_some() {
                        let cfgi = Command::cfgi_cd(sid, 0, true);
                        run.cmdq.push(p0, &self.mem, coherent, cfgi, budget)?;
                    }
                    run.cmdq.sync(p0, &self.mem, coherent, budget)?;
                }
            }
        }
        Ok(old)
    }

    /// Points `sid`'s STE at `how` (see [`IommuBackend::attach`]).
    pub fn attach_stream(&mut self, sid: u32, how: Attachment) -> Result<(), SmmuError> {
        if self.run.is_none() {
            return Err(SmmuError::NotInitialised);
        }
        let new = self.build_ste(&how)?;
        let old = match self.write_ste(sid, new) {
            Ok(old) => old,
            Err(e) => {
                if let (Some(cd), SmmuError::OutOfMemory | SmmuError::StreamIdOutOfRange { .. }) =
                    (new.context_ptr(), e)
                {
                    // SAFETY: the CD page was allocated in `build_ste`; these
                    // errors come from locating the STE, before any store, so
                    // nothing points at it. (After other errors the STE may
                    // reference it: the page is then left allocated.)
                    unsafe { self.mem.free(cd, 1) };
                }
                return Err(e);
            }
        };
        if let Some(old_cd) = old.context_ptr() {
            if Some(old_cd) != new.context_ptr() {
                // SAFETY: the old CD page came from `build_ste`; the STE no
                // longer points at it and CFGI_STE + CMD_SYNC completed, so
                // the SMMU holds no reference to it.
                unsafe { self.mem.free(old_cd, 1) };
            }
        }
        Ok(())
    }

    /// Queues TLB invalidation of `[iova, iova + len)` in `domain`.
    pub fn invalidate_range(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), SmmuError> {
        if len == 0 {
            return Ok(());
        }
        let start = iova.0 & !(PAGE_SIZE - 1);
        let end = iova
            .0
            .checked_add(len)
            .and_then(|e| e.checked_add(PAGE_SIZE - 1))
            .ok_or(SmmuError::BadDomain {
                what: "invalidation range",
                value: len,
            })?
            & !(PAGE_SIZE - 1);
        let pages = (end - start) / PAGE_SIZE;
        let stage1 = match domain.format {
            TableFormat::ArmStage1 => true,
            TableFormat::ArmStage2 => false,
            _ => return Err(SmmuError::Unsupported("table format")),
        };
        let id = domain.id;
        let (use_ril, threshold) = self.run.as_ref().map_or((false, 0), |r| {
            (r.config.range_invalidation, r.config.tlbi_page_threshold)
        });
        if self.features.range_invalidation && use_ril {
            let mut addr = start;
            let mut left = pages;
            while let Some(r) = TlbiRange::first_chunk(left) {
                self.queue_command(if stage1 {
                    Command::tlbi_nh_va(0, id, addr, leaf_only, Some(r))
                } else {
                    Command::tlbi_s2_ipa(id, addr, leaf_only, Some(r))
                })?;
                left -= r.pages();
                addr += r.pages() * PAGE_SIZE;
            }
            if left != 0 {
                // Beyond what SCALE can express (2^31 pages): take it all.
                self.invalidate_all_of(domain)?;
            }
            Ok(())
        } else if pages > threshold {
            self.invalidate_all_of(domain)
        } else {
            for i in 0..pages {
                let addr = start + i * PAGE_SIZE;
                self.queue_command(if stage1 {
                    Command::tlbi_nh_va(0, id, addr, leaf_only, None)
                } else {
                    Command::tlbi_s2_ipa(id, addr, leaf_only, None)
                })?;
            }
            Ok(())
        }
    }

    fn invalidate_all_of(&mut self, domain: &DomainInfo) -> Result<(), SmmuError> {
        match domain.format {
            TableFormat::ArmStage1 => self.queue_command(Command::tlbi_nh_asid(0, domain.id)),
            TableFormat::ArmStage2 => self.queue_command(Command::tlbi_s12_vmall(domain.id)),
            _ => Err(SmmuError::Unsupported("table format")),
        }
    }

    /// Drains the event queue without an interrupt controller: every record
    /// goes to `f`, overflow and GERROR are detected, reported and
    /// acknowledged.
    pub fn poll_events(&mut self, mut f: impl FnMut(Event)) -> EventReport {
        let mut report = EventReport::default();
        let p0 = self.page0;
        let p1 = self.page1;
        let coherent = self.features.coherent;
        let Some(run) = self.run.as_mut() else {
            return report;
        };
        if run.evtq.take_overflow(p1) {
            log_warn!("smmuv3: event queue overflowed: events were lost");
            report.overflow = true;
        }
        // Bounded by the queue size: at most one full queue per call.
        for _ in 0..run.evtq.capacity() {
            match run.evtq.pop(&self.mem, p1, coherent) {
                Some(e) => {
                    report.events += 1;
                    f(e);
                }
                None => break,
            }
        }
        // GERROR: acknowledge everything but CMDQ_ERR, which the command
        // queue recovers from itself (it must first fix the command).
        let active = (p0.gerror.get() ^ p0.gerrorn.get()) & !GERROR::CMDQ_ERR::SET.value;
        if active != 0 {
            if active & GERROR::EVENTQ_ABT_ERR::SET.value != 0 {
                report.overflow = true;
            }
            p0.gerrorn.set(p0.gerrorn.get() ^ active);
            report.gerror = active;
            self.gerrors_seen |= active;
        }
        if report.overflow {
            self.event_overflows += 1;
        }
        self.events += report.events as u64;
        report
    }

    /// What a hypervisor calls from the SMMU's event or GERROR interrupt:
    /// drains events to `f`, acknowledges GERROR, and restarts a command
    /// queue stopped on an error. Returns what it found.
    pub fn handle_irq(&mut self, f: impl FnMut(Event)) -> EventReport {
        let report = self.poll_events(f);
        let p0 = self.page0;
        let active = p0.gerror.get() ^ p0.gerrorn.get();
        if active & GERROR::CMDQ_ERR::SET.value != 0 {
            // The recovery runs inside a sync; one with an empty batch is cheap.
            let _ = self.sync_commands();
        }
        report
    }
}

/// Input address bits of a domain, checked against the 4 KiB-granule shapes
/// the driver programs: 2, 3 or 4 levels (up to 30, 39, 48 bits).
fn check_domain(info: &DomainInfo) -> Result<u8, SmmuError> {
    if !(2..=4).contains(&info.levels) {
        return Err(SmmuError::BadDomain {
            what: "levels",
            value: info.levels as u64,
        });
    }
    let max = 12 + 9 * info.levels;
    // T0SZ <= 39 (§5.4 CD.T0SZ, §5.2 STE.S2T0SZ without IDR3.STT): at least 25 bits.
    if info.ias_bits > max || info.ias_bits < 25 {
        return Err(SmmuError::BadDomain {
            what: "ias_bits",
            value: info.ias_bits as u64,
        });
    }
    Ok(info.ias_bits)
}

impl<M: TableMemory> IommuBackend for Smmu<M> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        self.attach_stream(dev.stream_id(), how)
            .map_err(|e| match e {
                SmmuError::StreamIdOutOfRange { .. } => BackendError::UnknownDevice(dev),
                other => other.into(),
            })
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        Ok(self.invalidate_range(domain, iova, len, leaf_only)?)
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        Ok(self.invalidate_all_of(domain)?)
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        self.sync_calls += 1;
        Ok(self.sync_commands()?)
    }

    fn coherent_walk(&self) -> bool {
        self.features.coherent
    }
}

// A Smmu holds `&'static` register references and lent memory; moving it to
// another thread moves the only handle.
// SAFETY: no interior shared state; every access goes through `&mut self`
// (register reads through `&self` are side-effect free).
unsafe impl<M: TableMemory + Send> Send for Smmu<M> {}

#[cfg(test)]
mod host_tests;
