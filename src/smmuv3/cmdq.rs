//! The command queue (IHI 0070, §3.5, §4): batching, bounded waits, error recovery.
//!
//! Commands are written to queue memory as they come and published to the
//! SMMU (CMDQ_PROD) only when a sync needs them or the queue is full, so a
//! batch of invalidations costs one doorbell and one CMD_SYNC.

use tock_registers::interfaces::{Readable, Writeable};

use super::cmd::{Command, Opcode};
use super::error::{CommandError, CommandErrorCode, SmmuError};
use super::poll::poll_until;
use super::queue::{QueueIndex, QueueMemory};
use super::regs::{CMDQ_CONS, CMDQ_PROD, GERROR, Page0};
use crate::addr::PhysAddr;
use crate::mem::TableMemory;

/// How many commands of each kind the driver has submitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CommandCounts {
    /// Every command.
    pub total: u64,
    /// CMD_CFGI_STE.
    pub cfgi_ste: u64,
    /// CMD_CFGI_CD.
    pub cfgi_cd: u64,
    /// CMD_CFGI_CD_ALL.
    pub cfgi_cd_all: u64,
    /// CMD_CFGI_ALL (CFGI_STE_RANGE).
    pub cfgi_all: u64,
    /// CMD_TLBI_NH_ALL.
    pub tlbi_nh_all: u64,
    /// CMD_TLBI_NH_VA.
    pub tlbi_nh_va: u64,
    /// CMD_TLBI_NH_ASID.
    pub tlbi_nh_asid: u64,
    /// CMD_TLBI_S2_IPA.
    pub tlbi_s2_ipa: u64,
    /// CMD_TLBI_S12_VMALL.
    pub tlbi_s12_vmall: u64,
    /// CMD_TLBI_NSNH_ALL.
    pub tlbi_nsnh_all: u64,
    /// CMD_TLBI_EL2_ALL.
    pub tlbi_el2_all: u64,
    /// CMD_SYNC.
    pub sync: u64,
    /// Anything else (raw commands).
    pub other: u64,
}

impl CommandCounts {
    fn count(&mut self, cmd: &Command) {
        self.total += 1;
        let slot = match cmd.opcode() {
            x if x == Opcode::CFGI_STE as u8 => &mut self.cfgi_ste,
            x if x == Opcode::CFGI_CD as u8 => &mut self.cfgi_cd,
            x if x == Opcode::CFGI_CD_ALL as u8 => &mut self.cfgi_cd_all,
            x if x == Opcode::CFGI_STE_RANGE as u8 => &mut self.cfgi_all,
            x if x == Opcode::TLBI_NH_ALL as u8 => &mut self.tlbi_nh_all,
            x if x == Opcode::TLBI_NH_VA as u8 => &mut self.tlbi_nh_va,
            x if x == Opcode::TLBI_NH_ASID as u8 => &mut self.tlbi_nh_asid,
            x if x == Opcode::TLBI_S2_IPA as u8 => &mut self.tlbi_s2_ipa,
            x if x == Opcode::TLBI_S12_VMALL as u8 => &mut self.tlbi_s12_vmall,
            x if x == Opcode::TLBI_NSNH_ALL as u8 => &mut self.tlbi_nsnh_all,
            x if x == Opcode::TLBI_EL2_ALL as u8 => &mut self.tlbi_el2_all,
            x if x == Opcode::SYNC as u8 => &mut self.sync,
            _ => &mut self.other,
        };
        *slot += 1;
    }

    /// Invalidation commands (every TLBI kind).
    pub const fn tlbi(&self) -> u64 {
        self.tlbi_nh_va
            + self.tlbi_nh_all
            + self.tlbi_nh_asid
            + self.tlbi_s2_ipa
            + self.tlbi_s12_vmall
            + self.tlbi_nsnh_all
            + self.tlbi_el2_all
    }
}

/// The command queue: `2^log2` 16-byte entries in lent memory.
pub struct CommandQueue {
    memory: QueueMemory<ENTRY>,
    /// Next slot software writes; ahead of CMDQ_PROD while a batch is open.
    prod: QueueIndex,
    /// Value last written to CMDQ_PROD.
    published: QueueIndex,
    /// Commands pushed since `program` (the shared wrapper's sequence numbers).
    pushed: u64,
    /// `pushed` when CMDQ_PROD was last written.
    published_seq: u64,
    counts: CommandCounts,
    errors: u64,
    last_error: Option<CommandError>,
    /// An error recovered from and not yet returned by a sync.
    unreported: Option<CommandError>,
}

/// Bytes per command.
const ENTRY: usize = 16;

impl CommandQueue {
    /// Allocates a queue of `2^log2` entries (at least one page).
    /// `coherent` is IDR0.COHACC: when clear, the zeroed queue is cleaned.
    ///
    /// # Errors
    ///
    /// [`SmmuError::OutOfMemory`] when the lender refuses the queue memory.
    pub fn new<M: TableMemory>(mem: &M, log2: u8, coherent: bool) -> Result<Self, SmmuError> {
        let memory = QueueMemory::new(mem, log2, coherent)?;
        let log2 = memory.log2();
        Ok(Self {
            memory,
            prod: QueueIndex::new(log2),
            published: QueueIndex::new(log2),
            pushed: 0,
            published_seq: 0,
            counts: CommandCounts::default(),
            errors: 0,
            last_error: None,
            unreported: None,
        })
    }

    /// Programs CMDQ_BASE/PROD/CONS (with the queue disabled).
    pub fn program(&mut self, regs: &Page0) {
        regs.cmdq_base.write(self.memory.base_register());
        regs.cmdq_prod.write(CMDQ_PROD::WR.val(0));
        regs.cmdq_cons.write(CMDQ_CONS::RD.val(0));
        self.prod = QueueIndex::new(self.memory.log2());
        self.published = self.prod;
        self.pushed = 0;
        self.published_seq = 0;
    }

    /// Gives the queue memory back.
    ///
    /// # Safety
    ///
    /// The SMMU must no longer read the queue (CMDQEN == 0).
    pub unsafe fn free<M: TableMemory>(self, mem: &M) {
        // SAFETY: the caller guarantees the SMMU no longer reads it.
        unsafe { self.memory.free(mem) }
    }

    /// Commands submitted so far.
    pub fn counts(&self) -> CommandCounts {
        self.counts
    }

    /// Command errors seen so far, and the last one.
    pub fn errors(&self) -> (u64, Option<CommandError>) {
        (self.errors, self.last_error)
    }

    fn entry_ptr<M: TableMemory>(&self, mem: &M, slot: u32) -> (*mut u64, PhysAddr) {
        let pa = self.memory.slot_pa(slot);
        (mem.phys_to_virt(pa).cast::<u64>(), pa)
    }

    fn write_slot<M: TableMemory>(&self, mem: &M, coherent: bool, slot: u32, cmd: &Command) {
        let (p, pa) = self.entry_ptr(mem, slot);
        // SAFETY: `slot < 2^log2`, so the 16 bytes lie inside the queue block
        // lent by `mem`, which `phys_to_virt` maps; 16-byte aligned.
        unsafe {
            p.write_volatile(cmd.0[0]);
            p.add(1).write_volatile(cmd.0[1]);
        }
        if !coherent {
            mem.clean(pa, ENTRY);
        }
    }

    fn read_slot<M: TableMemory>(&self, mem: &M, slot: u32) -> Command {
        let (p, _) = self.entry_ptr(mem, slot);
        // SAFETY: as in `write_slot`.
        unsafe { Command([p.read_volatile(), p.add(1).read_volatile()]) }
    }

    /// Appends `cmd` to the open batch; publishes and waits for room first
    /// when the queue is full.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Timeout`] when the queue is full and the SMMU does not consume within `budget`
    /// polls; [`SmmuError::Command`] when the SMMU stopped on a command while the queue was drained
    /// (the queue is recovered first); [`SmmuError::BadCommandIndex`] as for [`sync`](Self::sync).
    pub fn push<M: TableMemory>(
        &mut self,
        regs: &Page0,
        mem: &M,
        coherent: bool,
        cmd: Command,
        budget: u32,
    ) -> Result<(), SmmuError> {
        if self.prod.is_full(self.hw_cons(regs)) {
            self.publish(regs);
            let mut bad = None;
            poll_until("CMDQ space", budget, || {
                if let Err(e) = self.recover_if_stopped(regs, mem, coherent) {
                    bad = Some(e);
                    return true;
                }
                !self.prod.is_full(self.hw_cons(regs))
            })?;
            if let Some(e) = bad {
                return Err(e);
            }
        }
        self.write_slot(mem, coherent, self.prod.slot(), &cmd);
        self.prod = self.prod.next();
        self.pushed += 1;
        self.counts.count(&cmd);
        Ok(())
    }

    fn hw_cons(&self, regs: &Page0) -> QueueIndex {
        QueueIndex::from_raw(self.memory.log2(), regs.cmdq_cons.read(CMDQ_CONS::RD))
    }

    /// Makes everything pushed so far visible to the SMMU (CMDQ_PROD).
    pub fn publish(&mut self, regs: &Page0) {
        if self.published == self.prod {
            return;
        }
        crate::barrier::wmb();
        regs.cmdq_prod.write(CMDQ_PROD::WR.val(self.prod.raw()));
        self.published = self.prod;
        self.published_seq = self.pushed;
    }

    /// Commands pushed since the queue was programmed.
    pub fn queued(&self) -> u64 {
        self.pushed
    }

    /// Appends CMD_SYNC and publishes the batch without waiting; returns the
    /// sync's sequence number (its 1-based position since `program`), which
    /// [`sync_done`](Self::sync_done) takes.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push) (the queue was full and draining it failed).
    pub fn submit_sync<M: TableMemory>(
        &mut self,
        regs: &Page0,
        mem: &M,
        coherent: bool,
        budget: u32,
    ) -> Result<u64, SmmuError> {
        self.push(regs, mem, coherent, Command::sync(), budget)?;
        self.publish(regs);
        Ok(self.pushed)
    }

    /// One look, no wait: whether the command with sequence number `seq`
    /// (from [`submit_sync`](Self::submit_sync)) was consumed. A stopped
    /// queue is recovered first, and a command error met since the last
    /// report is returned (once) before the look.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Command`] (recovered; look again),
    /// [`SmmuError::BadCommandIndex`] as for [`sync`](Self::sync).
    pub fn sync_done<M: TableMemory>(
        &mut self,
        regs: &Page0,
        mem: &M,
        coherent: bool,
        seq: u64,
    ) -> Result<bool, SmmuError> {
        self.recover_if_stopped(regs, mem, coherent)?;
        if let Some(e) = self.unreported.take() {
            return Err(SmmuError::Command(e));
        }
        // CONS lies within one queue's length behind the published PROD,
        // so the distance names it without ambiguity.
        let pending = self.published.used_since(self.hw_cons(regs));
        let consumed = self.published_seq.saturating_sub(u64::from(pending));
        Ok(consumed >= seq)
    }

    /// Restarts a queue stopped on an error, publishing nothing new: the
    /// open batch stays unpublished. Returns the error found, if any; it is
    /// also kept for the next [`sync`](Self::sync) to return. A CMDQ_CONS.RD
    /// that names no published command is left alone (queue untouched,
    /// CMDQ_ERR not acknowledged): the next sync or push returns
    /// [`SmmuError::BadCommandIndex`].
    pub fn recover<M: TableMemory>(
        &mut self,
        regs: &Page0,
        mem: &M,
        coherent: bool,
    ) -> Option<CommandError> {
        self.recover_if_stopped(regs, mem, coherent).ok().flatten()
    }

    /// When the queue stopped on an error (GERROR.CMDQ_ERR active), records
    /// the offending command, replaces it with CMD_SYNC and acknowledges the
    /// error so the SMMU resumes (§7.1).
    ///
    /// # Errors
    ///
    /// [`SmmuError::BadCommandIndex`] when CMDQ_CONS.RD is not a published,
    /// unconsumed command; nothing is written or acknowledged then.
    fn recover_if_stopped<M: TableMemory>(
        &mut self,
        regs: &Page0,
        mem: &M,
        coherent: bool,
    ) -> Result<Option<CommandError>, SmmuError> {
        if regs.active_gerrors() & GERROR::CMDQ_ERR::SET.value == 0 {
            return Ok(None);
        }
        let cons = regs.cmdq_cons.extract();
        let log2 = self.memory.log2();
        let index = QueueIndex::from_raw(log2, cons.read(CMDQ_CONS::RD));
        // The SMMU stops with RD on the command it could not execute
        // (§7.1): one it read, so one published and not yet consumed. Those
        // lie in the 2^log2 indexes before CMDQ_PROD; RD at or past it (the
        // open batch, which the SMMU never saw) is garbage, and writing
        // CMD_SYNC there would destroy a queued command (Linux
        // `arm_smmu_cmdq_skip_err` trusts RD; hostile hardware is not).
        let behind = self.published.used_since(index);
        if behind == 0 || behind > 1u32 << log2 {
            return Err(SmmuError::BadCommandIndex {
                index: index.raw(),
                published: self.published.raw(),
            });
        }
        let code = CommandErrorCode::from_raw(cons.read(CMDQ_CONS::ERR) as u8);
        let command = self.read_slot(mem, index.slot());
        let error = CommandError {
            code,
            index: index.slot(),
            command,
        };
        self.errors += 1;
        self.last_error = Some(error);
        // The first one since the last sync is the one to report.
        self.unreported.get_or_insert(error);
        self.write_slot(mem, coherent, index.slot(), &Command::sync());
        crate::barrier::wmb_on(mem);
        regs.ack_gerrors(GERROR::CMDQ_ERR::SET.value);
        Ok(Some(error))
    }

    /// Appends CMD_SYNC, publishes the batch and waits, bounded, until the
    /// SMMU has consumed it. A command error met on the way (here or while a
    /// full queue was drained by `push`) is recovered from and returned once
    /// the sync completed.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Timeout`] when CMD_SYNC does not complete within `budget` polls;
    /// [`SmmuError::Command`] with the offending command when the SMMU reported CMDQ_ERR (the queue
    /// was recovered and the sync completed); [`SmmuError::BadCommandIndex`] when CMDQ_ERR came with
    /// a CMDQ_CONS.RD that names no published command (queue left as it was).
    pub fn sync<M: TableMemory>(
        &mut self,
        regs: &Page0,
        mem: &M,
        coherent: bool,
        budget: u32,
    ) -> Result<(), SmmuError> {
        self.push(regs, mem, coherent, Command::sync(), budget)?;
        let sync_at = QueueIndex::from_raw(self.memory.log2(), self.prod.raw().wrapping_sub(1));
        self.publish(regs);
        let mut bad = None;
        poll_until("CMD_SYNC completion", budget, || {
            if let Err(e) = self.recover_if_stopped(regs, mem, coherent) {
                bad = Some(e);
                return true;
            }
            self.hw_cons(regs).has_consumed(sync_at, self.prod)
        })?;
        if let Some(e) = bad {
            return Err(e);
        }
        match self.unreported.take() {
            Some(e) => Err(SmmuError::Command(e)),
            None => Ok(()),
        }
    }
}
