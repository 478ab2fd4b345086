//! The event queue (IHI 0070, §3.5, §7.2): draining records and spotting overflow.

use tock_registers::interfaces::{Readable, Writeable};

use super::error::SmmuError;
use super::event::{Event, EventRecord};
use super::queue::{QueueIndex, QueueMemory};
use super::regs::{EVENTQ_CONS, EVENTQ_PROD, Page0, Page1};
use crate::mem::TableMemory;

/// Bytes per event record.
const ENTRY: usize = Event::SIZE;

/// The event queue: `2^log2` 32-byte records in lent memory.
pub struct EventQueue {
    memory: QueueMemory<ENTRY>,
    cons: QueueIndex,
    /// EVENTQ_CONS.OVACKFLG last written.
    ovack: bool,
}

impl EventQueue {
    /// Allocates a queue of `2^log2` records (at least one page).
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
            cons: QueueIndex::new(log2),
            ovack: false,
        })
    }

    /// Number of records the queue holds.
    pub const fn capacity(&self) -> u32 {
        1 << self.memory.log2()
    }

    /// Programs EVENTQ_BASE/PROD/CONS (with the queue disabled).
    pub fn program(&mut self, p0: &Page0, p1: &Page1) {
        p0.eventq_base.write(self.memory.base_register());
        p1.eventq_prod.write(EVENTQ_PROD::WR.val(0));
        p1.eventq_cons.write(EVENTQ_CONS::RD.val(0));
        self.cons = QueueIndex::new(self.memory.log2());
        self.ovack = false;
    }

    /// Gives the queue memory back.
    ///
    /// # Safety
    ///
    /// The SMMU must no longer write the queue (EVENTQEN == 0).
    pub unsafe fn free<M: TableMemory>(self, mem: &M) {
        // SAFETY: the caller guarantees the SMMU no longer writes it.
        unsafe { self.memory.free(mem) }
    }

    /// Whether EVENTQ_PROD.OVFLG differs from our acknowledgement: events were
    /// lost. Acknowledges it (the next CONS write carries the new OVACKFLG).
    pub fn take_overflow(&mut self, p1: &Page1) -> bool {
        let ovflg = p1.eventq_prod.is_set(EVENTQ_PROD::OVFLG);
        if ovflg == self.ovack {
            return false;
        }
        self.ovack = ovflg;
        self.write_cons(p1);
        true
    }

    fn write_cons(&self, p1: &Page1) {
        p1.eventq_cons.write(
            EVENTQ_CONS::RD.val(self.cons.raw()) + EVENTQ_CONS::OVACKFLG.val(self.ovack as u32),
        );
    }

    /// Takes the oldest record, if any, and frees its slot.
    /// `coherent` is the SMMU's `IDR0.COHACC`: when clear, the record's lines
    /// are invalidated through the lender before they are read.
    pub fn pop<M: TableMemory>(&mut self, mem: &M, p1: &Page1, coherent: bool) -> Option<Event> {
        self.pop_record(mem, p1, coherent).map(|r| r.decode())
    }

    /// [`pop`](Self::pop), undecoded: the record as the SMMU wrote it.
    pub fn pop_record<M: TableMemory>(
        &mut self,
        mem: &M,
        p1: &Page1,
        coherent: bool,
    ) -> Option<EventRecord> {
        let prod = QueueIndex::from_raw(self.memory.log2(), p1.eventq_prod.read(EVENTQ_PROD::WR));
        if prod.is_empty(self.cons) {
            return None;
        }
        crate::barrier::rmb();
        let pa = self.memory.slot_pa(self.cons.slot());
        if !coherent {
            mem.invalidate(pa, ENTRY);
        }
        let p = mem.phys_to_virt(pa).cast::<u64>();
        let mut raw = [0u64; 4];
        for (i, w) in raw.iter_mut().enumerate() {
            // SAFETY: the slot lies inside the queue block lent by `mem`;
            // 32-byte aligned.
            *w = unsafe { p.add(i).read_volatile() };
        }
        // The record's reads complete before the slot is handed back: once
        // EVENTQ_CONS moves, the SMMU may overwrite it (Linux
        // `queue_inc_cons` puts a full barrier here). `dsb ld` waits for
        // earlier loads before any later load or store, the register write
        // included.
        crate::barrier::rmb();
        mem.observe_barrier();
        self.cons = self.cons.next();
        self.write_cons(p1);
        Some(EventRecord::from_words(raw))
    }
}
