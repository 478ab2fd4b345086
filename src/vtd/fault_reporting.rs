//! Fault reporting through the registers (VT-d 7.2.1, 7.3.1): the
//! fault-recording registers (11.4.14), FSTS (11.4.9.1) and the fault-event
//! interrupt (FECTL, MSI address/data).

use tock_registers::interfaces::{Readable, Writeable};

use super::regs::{self, FECTL, FRCD3, FSTS, FrcdRegs};
use super::{FaultRecord, FaultStatus, Vtd};
use crate::logging::{log_debug, log_warn};
use crate::mem::TableMemory;

impl<M: TableMemory> Vtd<M> {
    fn frcd(&self, index: u16) -> &FrcdRegs {
        let off = regs::frcd_offset(self.features.cap, usize::from(index));
        // SAFETY: `new` checked that CAP.FRO × 16 + 16 · (NFR + 1) lies inside
        // the mapped block, and callers pass index < NFR + 1.
        unsafe { &*(self.base.wrapping_add(off) as *const FrcdRegs) }
    }

    /// Reads every fault-recording register holding a fault, hands each
    /// decoded record to `f`, clears it, then reports and clears the
    /// overflow (PFO) and queue error bits seen in FSTS.
    pub fn poll_faults(&mut self, mut f: impl FnMut(FaultRecord)) -> FaultStatus {
        let n = self.features.fault_records;
        let fri = self.regs().fsts.read(FSTS::FRI) as u16;
        for k in 0..n {
            let i = (fri + k) % n;
            if let Some(rec) = self.read_fault(i) {
                log_debug!("vt-d: fault record {}: source-id {:#x}", i, rec.source_id);
                f(rec);
                // RW1C on F (bit 127 = bit 31 of the last dword).
                self.frcd(i).status.write(FRCD3::F::SET);
            }
        }
        let status = self.fault_status();
        if status.overflow {
            log_warn!("vt-d: primary fault overflow: faults were lost");
        }
        // RW1C: clear the overflow if seen. The write is made even when
        // nothing is set: it is what lets the unit re-evaluate and drop
        // FECTL.IP once every condition has been serviced (VT-d 7.3.1).
        self.regs()
            .fsts
            .write(FSTS::PFO.val(status.overflow.into()));
        status
    }

    /// FECTL.IP: a fault event is pending (set while the interrupt is masked
    /// or not yet delivered; cleared once the faults are serviced).
    pub fn fault_irq_pending(&self) -> bool {
        self.regs().fectl.is_set(FECTL::IP)
    }

    /// The fault held by fault-recording register `index`, without clearing it.
    pub fn read_fault(&self, index: u16) -> Option<FaultRecord> {
        if index >= self.features.fault_records {
            return None;
        }
        let r = self.frcd(index);
        let hi = (u64::from(r.status.get()) << 32) | u64::from(r.sid.get());
        // `decode` answers None when F is clear.
        FaultRecord::decode(index, r.fi.get(), hi)
    }

    /// FSTS decoded, without clearing anything.
    pub fn fault_status(&self) -> FaultStatus {
        let s = self.regs().fsts.extract();
        FaultStatus {
            overflow: s.is_set(FSTS::PFO),
            queue_error: s.is_set(FSTS::IQE),
            timeout_error: s.is_set(FSTS::ITE),
            completion_error: s.is_set(FSTS::ICE),
        }
    }

    /// Entry point for the fault-event interrupt: drains the records as
    /// [`poll_faults`](Self::poll_faults) does (clearing FSTS, which lets the
    /// hardware drop FECTL.IP).
    pub fn handle_irq(&mut self, f: impl FnMut(FaultRecord)) -> FaultStatus {
        self.poll_faults(f)
    }

    /// Unmasks (or masks) the fault-event interrupt (FECTL.IM); the MSI
    /// address/data must be programmed with [`set_fault_msi`](Self::set_fault_msi).
    pub fn set_fault_irq_masked(&mut self, masked: bool) {
        self.regs().fectl.write(FECTL::IM.val(masked.into()));
    }

    /// Programs the fault-event MSI (FEDATA, FEADDR, FEUADDR).
    pub fn set_fault_msi(&mut self, addr: u64, data: u32) {
        let r = self.regs();
        r.fedata.set(data);
        r.feaddr.set(addr as u32);
        r.feuaddr.set((addr >> 32) as u32);
    }
}
