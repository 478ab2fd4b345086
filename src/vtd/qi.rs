//! The invalidation queue (VT-d 6.5.2): a ring of 128-bit descriptors in lent
//! memory, a tail the driver writes and a head the hardware advances.

use tock_registers::interfaces::{Readable, Writeable};

use super::inv::{ContextGranularity, InvDesc};
use super::regs::{FSTS, IQA, IQERCD, VtdRegs};
use crate::addr::PhysAddr;
use crate::barrier::wmb_on;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// Descriptors in one 4 KiB queue page (IQA.QS = 0, 128-bit descriptors).
pub const QUEUE_ENTRIES: u32 = 256;
/// Descriptors in one 4 KiB queue page with 256-bit descriptors (IQA.DW = 1).
pub const QUEUE_ENTRIES_WIDE: u32 = 128;

/// FSTS bits that stop or poison the queue: IQE (4), ICE (5), ITE (6).
const QUEUE_ERRORS: u32 = FSTS::IQE::SET.value | FSTS::ICE::SET.value | FSTS::ITE::SET.value;

/// The invalidation queue's software state.
#[derive(Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InvQueue {
    /// Queue memory (one page).
    base: PhysAddr,
    /// Status word the wait descriptors write (own page).
    status: PhysAddr,
    /// Next free slot.
    tail: u32,
    /// Bound on every poll loop.
    budget: u32,
    /// 256-bit descriptors (IQA.DW = 1, needed in scalable mode).
    wide: bool,
    /// Wait descriptors submitted so far.
    waits: u64,
    /// Descriptors submitted so far (waits included).
    submitted: u64,
    /// The unit does not snoop: clean every line written (ECAP.C = 0).
    clean: bool,
}

impl InvQueue {
    /// Allocates the queue and its status page; does not touch registers.
    /// `wide` selects 256-bit descriptors (scalable mode). `clean`: the unit
    /// does not snoop CPU caches, so both pages are cleaned after zeroing
    /// (a dirty zero line evicted later would overwrite the status the unit
    /// wrote) and every descriptor after it is written.
    ///
    /// # Errors
    ///
    /// [`BackendError::OutOfMemory`]: the lender refused one of the two
    /// pages (the other is given back).
    pub fn new(
        mem: &impl TableMemory,
        budget: u32,
        wide: bool,
        clean: bool,
    ) -> Result<Self, BackendError> {
        let base = mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
        let Some(status) = mem.alloc_zeroed(1) else {
            // SAFETY: `base` was just allocated with one page and never published.
            unsafe { mem.free(base, 1) };
            return Err(BackendError::OutOfMemory);
        };
        if clean {
            mem.clean(base, 4096);
            mem.clean(status, 4096);
        }
        Ok(Self {
            base,
            status,
            tail: 0,
            budget,
            wide,
            waits: 0,
            submitted: 0,
            clean,
        })
    }

    /// Gives both pages back to the lender.
    ///
    /// # Safety
    ///
    /// `mem` lent the pages, and the unit no longer fetches from the queue
    /// nor writes the status page (GSTS.QIES seen clear, or never set).
    pub(super) unsafe fn release(self, mem: &impl TableMemory) {
        // SAFETY: one page each, allocated in `new` from `mem`; the caller
        // guarantees the unit is done with them.
        unsafe {
            mem.free(self.base, 1);
            mem.free(self.status, 1);
        }
    }

    /// Programs IQT = 0 and IQA; the caller then sets GCMD.QIE (VT-d 6.5.2).
    pub fn program(&mut self, regs: &VtdRegs) {
        self.tail = 0;
        regs.iqt.set(0);
        regs.iqa.write(
            IQA::IQA.val(self.base.0 >> 12) + IQA::DW.val(self.wide.into()) + IQA::QS.val(0),
        );
    }

    /// Number of descriptor slots.
    pub fn entries(&self) -> u32 {
        if self.wide {
            QUEUE_ENTRIES_WIDE
        } else {
            QUEUE_ENTRIES
        }
    }

    /// Bytes per descriptor.
    fn slot_bytes(&self) -> u64 {
        if self.wide { 32 } else { 16 }
    }

    /// IQH/IQT hold the byte offset of a slot; bits 18:4.
    fn offset_to_slot(&self, reg: u64) -> u32 {
        ((reg & 0x7_fff0) / self.slot_bytes()) as u32 % self.entries()
    }

    /// Physical address of the queue.
    pub fn base(&self) -> PhysAddr {
        self.base
    }

    /// Wait descriptors submitted so far.
    pub fn waits(&self) -> u64 {
        self.waits
    }

    /// Descriptors submitted so far, waits included.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Current tail slot.
    pub fn tail(&self) -> u32 {
        self.tail
    }

    fn head(&self, regs: &VtdRegs) -> u32 {
        self.offset_to_slot(regs.iqh.get())
    }

    /// Reports and recovers from a queue error in FSTS (IQE / ICE / ITE).
    /// On IQE the offending descriptor (at IQH) is replaced with a harmless
    /// global context-cache invalidation and IQE is cleared, so the queue runs on.
    fn check_errors(&self, regs: &VtdRegs, mem: &impl TableMemory) -> Result<(), BackendError> {
        let fsts = regs.fsts.get();
        if fsts & QUEUE_ERRORS == 0 {
            return Ok(());
        }
        let head = self.head(regs);
        let iqei = regs.iqercd.read(IQERCD::IQEI) as u32;
        if fsts & FSTS::IQE::SET.value != 0 {
            self.write_slot(mem, head, InvDesc::context(ContextGranularity::Global));
        }
        // RW1C: clear exactly the error bits seen.
        regs.fsts.set(fsts & QUEUE_ERRORS);
        Err(BackendError::QueueError {
            code: (fsts & QUEUE_ERRORS) | (iqei << 8),
            index: head,
        })
    }

    fn write_slot(&self, mem: &impl TableMemory, slot: u32, desc: InvDesc) {
        let size = self.slot_bytes();
        let pa = PhysAddr(self.base.0 + u64::from(slot % self.entries()) * size);
        let p = mem.phys_to_virt(pa).cast::<u64>();
        let [lo, hi] = desc.raw();
        // SAFETY: `pa` lies in the queue page lent by `mem` (slot < entries,
        // `size` bytes each), aligned; `phys_to_virt` makes it valid for writes.
        unsafe {
            p.write_volatile(lo);
            p.add(1).write_volatile(hi);
            if self.wide {
                // A 128-bit descriptor in a 256-bit slot: upper half zero.
                p.add(2).write_volatile(0);
                p.add(3).write_volatile(0);
            }
        }
        if self.clean {
            mem.clean(pa, size as usize);
        }
    }

    /// Appends one descriptor and moves IQT past it; waits (bounded) while
    /// the queue is full.
    ///
    /// # Errors
    ///
    /// - [`BackendError::QueueError`]: FSTS shows a queue error (IQE, ICE,
    ///   ITE) while waiting for room; `index` is the head slot, `code` the
    ///   FSTS bits with IQERCD.IQEI above them. The bits are cleared.
    /// - [`BackendError::Timeout`]: the queue stayed full for the budget.
    ///
    /// Nothing is written on an error.
    pub fn push(
        &mut self,
        regs: &VtdRegs,
        mem: &impl TableMemory,
        desc: InvDesc,
    ) -> Result<(), BackendError> {
        let next = (self.tail + 1) % self.entries();
        let mut polls = 0u32;
        while self.head(regs) == next {
            self.check_errors(regs, mem)?;
            polls += 1;
            if polls >= self.budget {
                return Err(BackendError::Timeout {
                    what: "VT-d invalidation queue full",
                    polls,
                });
            }
            core::hint::spin_loop();
        }
        self.write_slot(mem, self.tail, desc);
        // The descriptor (and every table write before it) must be visible
        // before the hardware sees the new tail.
        wmb_on(mem);
        self.tail = next;
        regs.iqt.set(u64::from(next) * self.slot_bytes());
        self.submitted += 1;
        Ok(())
    }

    /// Submits one invalidation-wait descriptor with status write and waits,
    /// bounded, until the hardware has written its status (so every earlier
    /// descriptor is complete). Queue errors seen meanwhile are returned.
    ///
    /// # Errors
    ///
    /// [`BackendError::QueueError`] (as for [`push`](Self::push)) or
    /// [`BackendError::Timeout`] when the status write did not arrive within
    /// the budget.
    pub fn sync(&mut self, regs: &VtdRegs, mem: &impl TableMemory) -> Result<(), BackendError> {
        let ticket = self.submit_wait(regs, mem)?;
        let mut polls = 0u32;
        loop {
            if self.wait_done(mem, ticket) {
                return Ok(());
            }
            self.check_errors(regs, mem)?;
            polls += 1;
            if polls >= self.budget {
                return Err(BackendError::Timeout {
                    what: "VT-d invalidation wait descriptor",
                    polls,
                });
            }
            core::hint::spin_loop();
        }
    }

    /// Submits one invalidation-wait descriptor with status write, without
    /// waiting; returns its ticket (the count of waits submitted, from 1),
    /// which [`look`](Self::look) takes. The status data is the ticket's low
    /// 32 bits.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push), and a queue error already in FSTS.
    pub fn submit_wait(
        &mut self,
        regs: &VtdRegs,
        mem: &impl TableMemory,
    ) -> Result<u64, BackendError> {
        self.check_errors(regs, mem)?;
        let ticket = self.waits + 1;
        self.push(regs, mem, InvDesc::wait(self.status, ticket as u32))?;
        self.waits = ticket;
        Ok(ticket)
    }

    /// One look, no wait: whether the wait descriptor of `ticket` wrote its
    /// status. A queue error in FSTS is recovered from and returned first
    /// (once; look again).
    ///
    /// # Errors
    ///
    /// [`BackendError::QueueError`] as for [`push`](Self::push).
    pub fn look(
        &mut self,
        regs: &VtdRegs,
        mem: &impl TableMemory,
        ticket: u64,
    ) -> Result<bool, BackendError> {
        if self.wait_done(mem, ticket) {
            return Ok(true);
        }
        self.check_errors(regs, mem)?;
        Ok(false)
    }

    /// Whether the status word shows `ticket` (or a later wait) done: the
    /// unit executes wait descriptors in queue order (VT-d 6.5.2.8), so the
    /// word only moves forward, modulo 2^32 — and never past the last wait
    /// submitted: a value beyond it is not believed.
    fn wait_done(&self, mem: &impl TableMemory, ticket: u64) -> bool {
        // The unit writes the status word: drop any stale CPU copy first.
        mem.invalidate(self.status, 4);
        let status = mem.phys_to_virt(self.status).cast::<u32>();
        // SAFETY: the status page was lent by `mem` and is 4-byte aligned.
        let v = unsafe { status.read_volatile() };
        let ahead = u64::from(v.wrapping_sub(ticket as u32));
        ahead <= self.waits.saturating_sub(ticket)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::super::testmem::{FakeRegs, HostMem};
    use super::*;

    fn slot(mem: &HostMem, q: &InvQueue, i: u32) -> [u64; 2] {
        let p = mem
            .phys_to_virt(PhysAddr(q.base().0 + u64::from(i) * 16))
            .cast::<u64>();
        // SAFETY: inside the host lender's queue page.
        unsafe { [p.read(), p.add(1).read()] }
    }

    #[test]
    fn push_writes_descriptor_and_moves_tail_register() {
        let mem = HostMem::new(8);
        let regs = FakeRegs::new();
        let mut q = InvQueue::new(&mem, 100, false, true).unwrap();
        q.program(regs.get());
        assert_eq!(regs.get().iqa.get(), q.base().0);
        let d = InvDesc::context(ContextGranularity::Global);
        q.push(regs.get(), &mem, d).unwrap();
        q.push(regs.get(), &mem, d).unwrap();
        assert_eq!(slot(&mem, &q, 0), d.raw());
        assert_eq!(slot(&mem, &q, 1), d.raw());
        // IQT holds the index shifted by 4 (128-bit descriptors).
        assert_eq!(regs.get().iqt.get(), 2 << 4);
    }

    #[test]
    fn sync_appends_exactly_one_wait_and_completes_on_status_write() {
        let mem = HostMem::new(8);
        let regs = FakeRegs::new();
        let mut q = InvQueue::new(&mem, 100, false, true).unwrap();
        q.program(regs.get());
        // Play the hardware: the status word already holds the first sequence number.
        // SAFETY: the status page belongs to the host lender.
        unsafe { mem.phys_to_virt(q.status).cast::<u32>().write(1) };
        q.sync(regs.get(), &mem).unwrap();
        assert_eq!(q.waits(), 1);
        assert_eq!(q.submitted(), 1);
        let w = slot(&mem, &q, 0);
        assert_eq!(w, InvDesc::wait(q.status, 1).raw());
        assert_eq!(w[0] & 0xf, InvDesc::TYPE_WAIT);
    }

    #[test]
    fn sync_without_completion_times_out() {
        let mem = HostMem::new(8);
        let regs = FakeRegs::new();
        let mut q = InvQueue::new(&mem, 50, false, true).unwrap();
        q.program(regs.get());
        let e = q.sync(regs.get(), &mem).unwrap_err();
        assert_eq!(
            e,
            BackendError::Timeout {
                what: "VT-d invalidation wait descriptor",
                polls: 50
            }
        );
    }

    #[test]
    fn queue_error_is_reported_with_the_offending_slot_and_patched() {
        let mem = HostMem::new(8);
        let regs = FakeRegs::new();
        let mut q = InvQueue::new(&mem, 50, false, true).unwrap();
        q.program(regs.get());
        let bad = InvDesc::from_raw([0xf, 0]);
        q.push(regs.get(), &mem, bad).unwrap();
        // Hardware stopped at slot 0 with IQE, IQEI = 1 (invalid descriptor type).
        regs.set_u32(0x34, 1 << 4);
        regs.set_u64(0xb0, 1);
        let e = q.sync(regs.get(), &mem).unwrap_err();
        assert_eq!(
            e,
            BackendError::QueueError {
                code: 0x10 | (1 << 8),
                index: 0
            }
        );
        assert_eq!(
            slot(&mem, &q, 0),
            InvDesc::context(ContextGranularity::Global).raw()
        );
    }

    #[test]
    fn wide_queue_uses_32_byte_slots_and_dw() {
        let mem = HostMem::new(8);
        let regs = FakeRegs::new();
        let mut q = InvQueue::new(&mem, 10, true, true).unwrap();
        q.program(regs.get());
        // IQA.DW (bit 11) set, QS 0.
        assert_eq!(regs.get().iqa.get(), q.base().0 | (1 << 11));
        let d = InvDesc::context(ContextGranularity::Global);
        q.push(regs.get(), &mem, d).unwrap();
        q.push(regs.get(), &mem, d).unwrap();
        // Second descriptor at byte 32; IQT = 2 slots × 32 bytes.
        let p = mem.phys_to_virt(PhysAddr(q.base().0 + 32)).cast::<u64>();
        // SAFETY: three words inside the queue page of the host lender.
        let words = unsafe { [p.read(), p.add(1).read(), p.add(2).read()] };
        assert_eq!(words, [0x11, 0, 0]);
        assert_eq!(regs.get().iqt.get(), 64);
        assert_eq!(q.entries(), 128);
    }

    #[test]
    fn full_queue_waits_for_the_head_and_times_out() {
        let mem = HostMem::new(8);
        let regs = FakeRegs::new();
        let mut q = InvQueue::new(&mem, 10, false, true).unwrap();
        q.program(regs.get());
        let d = InvDesc::context(ContextGranularity::Global);
        for _ in 0..QUEUE_ENTRIES - 1 {
            q.push(regs.get(), &mem, d).unwrap();
        }
        assert!(matches!(
            q.push(regs.get(), &mem, d),
            Err(BackendError::Timeout { .. })
        ));
        // The hardware consumed some: room again.
        regs.set_u64(0x80, 10 << 4);
        q.push(regs.get(), &mem, d).unwrap();
        assert_eq!(q.tail(), 0);
    }
}
