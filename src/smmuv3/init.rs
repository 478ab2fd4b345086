//! Bringing the SMMU up and down: [`Smmu::init`] and [`Smmu::shutdown`],
//! with the bounded CR0/CR0ACK, GBPA.UPDATE and IRQ_CTRL/IRQ_CTRLACK
//! handshakes.

use tock_registers::interfaces::{Readable, Writeable};

use super::cmdq::CommandQueue;
use super::evtq::EventQueue;
use super::poll::poll_until;
use super::regs::{CR0, CR1, CR2, GBPA, IRQ_CTRL};
use super::strtab::{self, StreamTable, StreamTableFormat};
use super::{Command, Running, Smmu, SmmuConfig, SmmuError, StallModel, StreamTableChoice};
use crate::logging::log_debug;
use crate::mem::TableMemory;

impl<M: TableMemory> Smmu<M> {
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
    ///
    /// # Errors
    ///
    /// [`SmmuError::Timeout`] when GBPA or CR0ACK does not acknowledge within the poll budget
    /// (nothing is given back then: the SMMU may still read it). Shutting down an SMMU that was
    /// never initialised only sets GBPA to abort and SMMUEN to 0.
    pub fn shutdown(&mut self) -> Result<(), SmmuError> {
        let budget = self.budget();
        self.shutdown_with(budget)
    }

    /// Leaves the SMMU blocking every stream for the next boot stage (issue
    /// 12 item 5): GBPA.ABORT is set through the GBPA.UPDATE handshake
    /// (IHI 0070 6.3.14: wait for UPDATE clear, write with UPDATE set, wait
    /// for it to clear again, each wait bounded) while SMMUEN is still on,
    /// and only then SMMUEN goes to 0, so there is no moment in which a
    /// stream bypasses. With SMMUEN = 0 and GBPA.ABORT = 1 every incoming
    /// transaction is terminated with an abort, and the SMMU needs no
    /// memory: the stream table, CDs and queues go back to the lender (this
    /// is [`shutdown`](Self::shutdown), named for the hand-off).
    ///
    /// Called right after [`Smmu::new`], before any device masters, it is
    /// also the first stage's "block everything from the first
    /// instruction": the reset value of GBPA.ABORT is IMPLEMENTATION
    /// DEFINED (QEMU resets it to 0, bypass).
    ///
    /// A transaction aborted in this state leaves no record the next stage
    /// could read: the event queue is off (CR0 = 0) and the stage's queue
    /// memory is gone; QEMU (`smmuv3_translate`, the `SMMU_TRANS_ABORT`
    /// case) records no event for a GBPA abort at all, only the trace event
    /// `smmuv3_translate_abort`.
    ///
    /// The next stage takes the SMMU over with [`init`](Self::init), which
    /// starts by re-asserting GBPA.ABORT and SMMUEN = 0 and sets SMMUEN only
    /// once its stream table (every STE abort), queues and global
    /// invalidations are in place. SMMUEN cannot stay on across the swap:
    /// STRTAB_BASE, STRTAB_BASE_CFG and the queue bases are writable only
    /// while SMMUEN (resp. CMDQEN/EVENTQEN) and its ACK are 0 (IHI 0070
    /// §6.3, the access conditions of SMMU_STRTAB_BASE, SMMU_STRTAB_BASE_CFG,
    /// SMMU_CMDQ_BASE and SMMU_EVENTQ_BASE); GBPA.ABORT keeps that moment
    /// closed instead.
    ///
    /// # Errors
    ///
    /// Those of [`shutdown`](Self::shutdown).
    pub fn hand_off(&mut self) -> Result<(), SmmuError> {
        self.shutdown()
    }

    /// [`shutdown`](Self::shutdown) with an explicit poll budget (`init`'s
    /// own, before any configuration is running).
    fn shutdown_with(&mut self, budget: u32) -> Result<(), SmmuError> {
        self.wait_gbpa_idle(budget)?;
        // Read-modify-write (§6.3.14): only ABORT changes; the other
        // attribute overrides firmware set stay as they were.
        let gbpa = self.page0.gbpa.get() & !GBPA::UPDATE::SET.value;
        self.page0
            .gbpa
            .set(gbpa | GBPA::ABORT::SET.value | GBPA::UPDATE::SET.value);
        self.wait_gbpa_idle(budget)?;
        self.write_cr0(0, budget)?;
        for r in [self.run.take(), self.stranded.take()]
            .into_iter()
            .flatten()
        {
            // SAFETY: CR0 is 0 (acknowledged): the SMMU reads neither the
            // stream table, the CDs nor the queues any more; every CD an STE
            // points at is a one-page block from `build_ste`.
            unsafe { r.free(&self.mem) };
        }
        Ok(())
    }

    /// Brings the SMMU up (§3.3 and §6.3.9's order): disable, GBPA abort,
    /// stream table, command queue, event queue, queues enabled, CFGI_ALL +
    /// TLBI_NSNH_ALL (+ TLBI_EL2_ALL with IDR0.HYP) + CMD_SYNC, then SMMUEN.
    /// Every stream starts aborted.
    ///
    /// Refused before any register is written: a non-coherent SMMU
    /// (IDR0.COHACC = 0) over a lender that cannot clean
    /// ([`SmmuError::LenderCannotClean`]); a stall-forced SMMU
    /// (IDR0.STALL_MODEL = 0b10: the driver never resumes stalled
    /// transactions, so a faulting device would hang); IDR1.SIDSIZE above
    /// the architecture's 32.
    ///
    /// The stream table covers at most [`strtab::LINEAR_LIMIT_BITS`]
    /// StreamID bits when linear and [`strtab::TWO_LEVEL_LIMIT_BITS`] with
    /// two levels (Linux caps its level-1 table the same way); StreamIDs
    /// above are refused by `attach` with
    /// [`SmmuError::StreamIdOutOfRange`].
    ///
    /// # Errors
    ///
    /// [`SmmuError::Timeout`] when CR0ACK or GBPA does not acknowledge within `config.poll_budget`
    /// polls; [`SmmuError::Unsupported`] / [`SmmuError::StreamTableTooLarge`] for a configuration
    /// the hardware cannot take; [`SmmuError::LenderCannotClean`] for a non-coherent SMMU over a
    /// lender that cannot clean; [`SmmuError::OutOfMemory`] when tables or queues cannot be lent; a
    /// command error or timeout of the initial invalidation sync.
    pub fn init(&mut self, config: SmmuConfig) -> Result<(), SmmuError> {
        let f = self.features;
        let budget = config.poll_budget.max(1);
        let coherent = f.coherent;
        if !coherent && !self.mem.can_clean() {
            return Err(SmmuError::LenderCannotClean);
        }
        match f.stall_model {
            StallModel::Forced => {
                return Err(SmmuError::Unsupported(
                    "stall-forced SMMU (IDR0.STALL_MODEL = 0b10)",
                ));
            }
            StallModel::Reserved => {
                return Err(SmmuError::BadIdRegister {
                    what: "IDR0.STALL_MODEL",
                    value: 3,
                });
            }
            StallModel::Stall | StallModel::Terminate => {}
        }
        if f.sid_bits > 32 {
            return Err(SmmuError::BadIdRegister {
                what: "IDR1.SIDSIZE",
                value: f.sid_bits.into(),
            });
        }
        // The first waits already use the caller's budget.
        self.shutdown_with(budget)?;
        self.counters = Default::default();
        self.service_failure = false;
        let p0 = self.page0;

        // Interrupts off until the queues are set up: an earlier owner may
        // have left them on, and `config.irqs` may want them off (§6.3.16).
        p0.irq_ctrl.set(0);
        poll_until("IRQ_CTRLACK", budget, || p0.irq_ctrlack.get() == 0)?;
        // No MSIs: an address left by an earlier owner would turn every
        // interrupt into a stray write (Linux arm_smmu_setup_msis clears
        // them the same way); the wired interrupts are what we enable.
        p0.gerror_irq_cfg0.set(0);
        p0.eventq_irq_cfg0.set(0);
        if f.pri {
            p0.priq_irq_cfg0.set(0);
        }

        // Errors left over from an earlier owner (GERROR survives CR0 = 0).
        let active = p0.active_gerrors();
        if active != 0 {
            p0.ack_gerrors(active);
        }

        // The SMMU's own accesses (stream table, CDs, queues): write-back
        // inner shareable when it snoops, else non-cacheable outer shareable
        // with the CPU cleaning every line it writes (§6.3.11; the STE and CD
        // walk attributes agree, see `attach`).
        let (sh, cache) = if coherent { (3, 1) } else { (2, 0) };
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
            // A 2-level table of at most SPLIT StreamID bits would program
            // STRTAB_BASE_CFG.LOG2SIZE below SPLIT, which §6.3.24 does not
            // allow; one level-2 array's worth is a linear table anyway
            // (Linux `arm_smmu_device_hw_probe` drops 2-level likewise).
            StreamTableChoice::TwoLevel if sid_bits <= strtab::SPLIT => StreamTableFormat::Linear,
            StreamTableChoice::TwoLevel if f.two_level_strtab => StreamTableFormat::TwoLevel,
            StreamTableChoice::TwoLevel => {
                return Err(SmmuError::Unsupported("2-level stream table"));
            }
            StreamTableChoice::Auto if sid_bits > strtab::LINEAR_MAX_BITS && f.two_level_strtab => {
                StreamTableFormat::TwoLevel
            }
            StreamTableChoice::Auto => StreamTableFormat::Linear,
        };
        let sid_bits = sid_bits.min(strtab::limit_bits(format));
        // Everything is allocated before the SMMU is told about any of it: a
        // refusal gives back what was lent so far (CR0 is 0, acknowledged).
        let mut run = self.allocate(config, format, sid_bits)?;
        run.strtab.program(p0);
        run.cmdq.program(p0);
        run.evtq.program(p0, self.page1);

        match self.enable(&mut run, budget) {
            Ok(()) => {
                log_debug!("smmuv3: enabled, {} StreamID bits", sid_bits);
                self.run = Some(run);
                Ok(())
            }
            Err(e) => {
                self.abandon(run, budget);
                Err(e)
            }
        }
    }

    /// Allocates the stream table and both queues, or nothing.
    fn allocate(
        &self,
        config: SmmuConfig,
        format: StreamTableFormat,
        sid_bits: u8,
    ) -> Result<Running, SmmuError> {
        let f = self.features;
        let mem = &self.mem;
        let strtab = StreamTable::new(mem, format, sid_bits, f.coherent)?;
        let cmdq = match CommandQueue::new(mem, config.cmdq_log2.min(f.cmdq_log2_max), f.coherent) {
            Ok(q) => q,
            Err(e) => {
                // SAFETY: never programmed: the SMMU has not seen it.
                unsafe { strtab.free(mem) };
                return Err(e);
            }
        };
        match EventQueue::new(mem, config.evtq_log2.min(f.evtq_log2_max), f.coherent) {
            Ok(evtq) => Ok(Running {
                strtab,
                cmdq,
                evtq,
                config,
                stranded_cds: heapless::Vec::new(),
                nested_vmids: heapless::Vec::new(),
                pending_nh_all: heapless::Vec::new(),
            }),
            Err(e) => {
                // SAFETY: as above.
                unsafe {
                    strtab.free(mem);
                    cmdq.free(mem);
                }
                Err(e)
            }
        }
    }

    /// With the tables and queues programmed: queues on, global
    /// invalidation, interrupts, then SMMUEN.
    fn enable(&self, run: &mut Running, budget: u32) -> Result<(), SmmuError> {
        let (p0, mem, coherent) = (self.page0, &self.mem, self.features.coherent);
        crate::barrier::wmb_on(mem);
        let queues = CR0::CMDQEN::SET.value | CR0::EVENTQEN::SET.value;
        self.write_cr0(queues, budget)?;

        let cmdq = &mut run.cmdq;
        cmdq.push(p0, mem, coherent, Command::cfgi_all(), budget)?;
        cmdq.push(p0, mem, coherent, Command::tlbi_nsnh_all(), budget)?;
        if self.features.hyp {
            cmdq.push(p0, mem, coherent, Command::tlbi_el2_all(), budget)?;
        }
        cmdq.sync(p0, mem, coherent, budget)?;

        if run.config.irqs {
            let want = IRQ_CTRL::GERROR_IRQEN::SET + IRQ_CTRL::EVENTQ_IRQEN::SET;
            p0.irq_ctrl.write(want);
            poll_until("IRQ_CTRLACK", budget, || {
                p0.irq_ctrlack.get() == p0.irq_ctrl.get()
            })?;
        }

        self.write_cr0(queues | CR0::SMMUEN::SET.value, budget)
    }

    /// After a failed [`enable`](Self::enable): turns the SMMU off again and
    /// gives back the tables and queues once CR0ACK shows it stopped. If it
    /// does not, the SMMU may still read them: they are kept, and the next
    /// [`shutdown`](Self::shutdown) that sees CR0ACK = 0 gives them back.
    fn abandon(&mut self, run: Running, budget: u32) {
        if self.write_cr0(0, budget).is_ok() {
            // SAFETY: CR0ACK = 0: the SMMU reads neither the table nor the
            // queues; no STE points at a CD yet.
            unsafe { run.free(&self.mem) };
        } else {
            self.stranded = Some(run);
        }
    }
}

impl Running {
    /// Gives back the stream table (with its level-2 arrays and CDs) and
    /// both queues.
    ///
    /// # Safety
    ///
    /// CR0 is 0 and acknowledged: the SMMU reads none of them any more;
    /// every CD an STE points at is a one-page block from `mem`.
    pub(super) unsafe fn free<M: TableMemory>(self, mem: &M) {
        // SAFETY: the caller's guarantee; each stranded CD is a one-page
        // block from `build_ste` that no STE points at.
        unsafe {
            for cd in self.stranded_cds {
                mem.free(cd, 1);
            }
            self.strtab.free(mem);
            self.cmdq.free(mem);
            self.evtq.free(mem);
        }
    }
}
