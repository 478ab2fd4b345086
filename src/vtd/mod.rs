//! Intel VT-d remapping-hardware driver (legacy-mode translation).
//!
//! [`Vtd`] drives one DMA-remapping hardware unit (one DRHD of the ACPI DMAR
//! table; finding it is the platform's job). It keeps a legacy root table and
//! per-bus context tables in lent memory, invalidates through the
//! invalidation queue (or the CCMD/IOTLB registers when queued invalidation is
//! absent or not wanted), decodes fault records, and implements
//! [`IommuBackend`] so the core's two-step API drives it unchanged.
//!
//! ```no_run
//! # use bare_iommu::{TableMemory, vtd::{Vtd, VtdConfig}};
//! # fn demo<M: TableMemory>(base: usize, mem: M) -> Result<(), bare_iommu::vtd::VtdError> {
//! // SAFETY: `base` maps the unit's registers and nothing else drives it.
//! let mut vtd = unsafe { Vtd::new(base, mem)? };
//! // `log` or a UART: the decoded capabilities.
//! let _features = vtd.features();
//! vtd.init(VtdConfig::default())?; // translation on, every device blocked
//! # Ok(()) }
//! ```

pub mod caps;
pub mod context;
pub mod fault;
pub mod inv;
pub mod qi;
pub mod reginv;
pub mod regs;
pub mod root;
#[cfg(test)]
mod testmem;

use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};

pub use caps::Features;
pub use context::{ContextEntry, TranslationType};
pub use fault::{Access, FaultReason, FaultRecord, FaultStatus};
pub use inv::{ContextGranularity, InvDesc, IotlbGranularity};
pub use root::RootEntry;

use crate::addr::{DmaAddr, PhysAddr};
use crate::backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;
use crate::pgtable::vtd::VtdSecondLevel;
use qi::InvQueue;
use regs::{FECTL, FRCD3, FSTS, FrcdRegs, GCMD, IotlbRegs, PMEN, RTADDR, VtdRegs};

/// Default bound on every poll loop, in register reads.
pub const DEFAULT_POLL_BUDGET: u32 = 1_000_000;

/// Past this many page-selective blocks, one range is invalidated
/// domain-selectively instead.
pub const PSI_MAX_BLOCKS: usize = 16;

/// Errors of probing and initialising a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum VtdError {
    /// VER reads 0 or all-ones: no remapping unit answers at the base.
    NoUnit {
        /// The value read from VER.
        ver: u32,
    },
    /// CAP.SAGAW offers neither a 3-level nor a 4-level second-level table.
    NoAddressWidth {
        /// The SAGAW field.
        sagaw: u8,
    },
    /// A hardware wait or table allocation failed.
    Backend(BackendError),
}

impl From<BackendError> for VtdError {
    fn from(e: BackendError) -> Self {
        VtdError::Backend(e)
    }
}

impl From<VtdError> for BackendError {
    fn from(e: VtdError) -> Self {
        match e {
            VtdError::Backend(b) => b,
            VtdError::NoUnit { .. } => BackendError::Unsupported("no VT-d unit at the base"),
            VtdError::NoAddressWidth { .. } => {
                BackendError::Unsupported("CAP.SAGAW has no 39- or 48-bit width")
            }
        }
    }
}

/// How [`Vtd::init`] sets the unit up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdConfig {
    /// Use queued invalidation when ECAP.QI; otherwise (or when false) use
    /// register-based invalidation.
    pub use_qi: bool,
    /// Domain-id for pass-through context entries; `None` = the highest
    /// domain-id the unit supports.
    pub bypass_domain_id: Option<u16>,
    /// PCI segment of the devices behind this unit.
    pub segment: u16,
    /// Bound on every poll loop, in register reads.
    pub poll_budget: u32,
}

impl Default for VtdConfig {
    fn default() -> Self {
        Self {
            use_qi: true,
            bypass_domain_id: None,
            segment: 0,
            poll_budget: DEFAULT_POLL_BUDGET,
        }
    }
}

/// Counters of what the driver asked the hardware to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdStats {
    /// Completed [`IommuBackend::sync`] calls.
    pub syncs: u64,
    /// Invalidation-wait descriptors submitted.
    pub wait_descriptors: u64,
    /// Descriptors submitted to the invalidation queue (waits included).
    pub queued_descriptors: u64,
    /// Page-selective IOTLB invalidations (queued or by register).
    pub iotlb_psi: u64,
    /// Domain-selective IOTLB invalidations.
    pub iotlb_dsi: u64,
    /// Global IOTLB invalidations.
    pub iotlb_global: u64,
    /// Context-cache invalidations.
    pub context_invalidations: u64,
    /// Invalidations done through CCMD / IOTLB registers.
    pub register_invalidations: u64,
    /// Write-buffer flushes (CAP.RWBF).
    pub write_buffer_flushes: u64,
}

/// One VT-d remapping unit.
pub struct Vtd<M: TableMemory> {
    regs: NonNull<VtdRegs>,
    iotlb: NonNull<IotlbRegs>,
    base: usize,
    mem: M,
    features: Features,
    root: Option<PhysAddr>,
    queue: Option<InvQueue>,
    budget: u32,
    segment: u16,
    bypass_did: u16,
    stats: VtdStats,
}

// SAFETY: the registers are MMIO owned by this value alone (contract of
// `new`); moving it to another thread moves that ownership.
unsafe impl<M: TableMemory + Send> Send for Vtd<M> {}

impl<M: TableMemory> Vtd<M> {
    /// Probes the unit whose registers start at `base`: reads VER, CAP, ECAP.
    /// Writes nothing; [`init`](Self::init) turns translation on.
    ///
    /// # Safety
    ///
    /// `base` must be the (identity- or otherwise-) mapped virtual address of
    /// a VT-d register block, uncached, valid for as long as the value lives,
    /// and driven by nothing else.
    pub unsafe fn new(base: usize, mem: M) -> Result<Self, VtdError> {
        let regs = NonNull::new(base as *mut VtdRegs).ok_or(VtdError::NoUnit { ver: 0 })?;
        // SAFETY: the caller guarantees `base` maps the register block.
        let r = unsafe { regs.as_ref() };
        let ver = r.ver.get();
        if ver == 0 || ver == u32::MAX {
            return Err(VtdError::NoUnit { ver });
        }
        let cap = r.cap.get();
        let ecap = r.ecap.get();
        let features = Features::decode(ver, cap, ecap);
        if features.max_levels().is_none() {
            return Err(VtdError::NoAddressWidth {
                sagaw: features.sagaw,
            });
        }
        let iotlb = NonNull::new(base.wrapping_add(regs::iotlb_offset(ecap)) as *mut IotlbRegs)
            .ok_or(VtdError::NoUnit { ver })?;
        let bypass_did = u16::try_from(features.domains - 1).unwrap_or(u16::MAX);
        Ok(Self {
            regs,
            iotlb,
            base,
            mem,
            features,
            root: None,
            queue: None,
            budget: DEFAULT_POLL_BUDGET,
            segment: 0,
            bypass_did,
            stats: VtdStats::default(),
        })
    }

    fn regs(&self) -> &VtdRegs {
        // SAFETY: `new`'s contract: `base` maps the register block for our lifetime.
        unsafe { self.regs.as_ref() }
    }

    fn iotlb_regs(&self) -> &IotlbRegs {
        // SAFETY: ECAP.IRO places the IOTLB registers inside the unit's
        // register page, mapped per `new`'s contract.
        unsafe { self.iotlb.as_ref() }
    }

    fn frcd(&self, index: u16) -> &FrcdRegs {
        let off = regs::frcd_offset(self.features.cap, usize::from(index));
        // SAFETY: CAP.FRO and CAP.NFR place the fault-recording registers
        // inside the unit's register page (index < NFR + 1, checked by callers).
        unsafe { &*((self.base + off) as *const FrcdRegs) }
    }

    /// The decoded capabilities.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Counters since probe.
    pub fn stats(&self) -> VtdStats {
        let mut s = self.stats;
        if let Some(q) = &self.queue {
            s.wait_descriptors = q.waits();
            s.queued_descriptors = q.submitted();
        }
        s
    }

    /// Whether queued invalidation is in use.
    pub fn uses_queued_invalidation(&self) -> bool {
        self.queue.is_some()
    }

    /// Raw GSTS.
    pub fn global_status(&self) -> u32 {
        self.regs().gsts.get()
    }

    /// Raw IQT (tail index × 16), for tests counting descriptors.
    pub fn queue_tail(&self) -> u64 {
        self.regs().iqt.get()
    }

    /// The VT-d second-level page-table format this unit walks: superpage
    /// sizes from CAP.SLLPS, SNP from ECAP.SC, address width from CAP.MGAW.
    pub fn second_level_format(&self) -> VtdSecondLevel {
        VtdSecondLevel {
            sllps: self.features.sllps,
            snoop_control: self.features.sc,
            haw: self.features.mgaw,
        }
    }

    /// Table levels for new domains: 4 (48-bit) when SAGAW allows, else 3.
    pub fn domain_levels(&self) -> u8 {
        self.features.max_levels().unwrap_or(3)
    }

    /// The domain-id used by pass-through context entries.
    pub fn bypass_domain_id(&self) -> u16 {
        self.bypass_did
    }

    /// Sets or clears one GCMD command bit and waits, bounded, until GSTS
    /// reports `status_on` for it. Every write repeats the enables GSTS shows.
    fn gcmd(&self, bit: u32, on: bool, what: &'static str) -> Result<(), BackendError> {
        let r = self.regs();
        fence(Ordering::SeqCst);
        r.gcmd.set(regs::gcmd_value(r.gsts.get(), bit, on));
        let mut polls = 0u32;
        loop {
            let set = r.gsts.get() & bit != 0;
            if set == on {
                return Ok(());
            }
            polls += 1;
            if polls >= self.budget {
                return Err(BackendError::Timeout { what, polls });
            }
            core::hint::spin_loop();
        }
    }

    /// Fires a one-shot GCMD command (SRTP, WBF) and waits for its status bit
    /// to reach `done` (RTPS set, WBFS clear).
    fn gcmd_one_shot(&self, bit: u32, done: bool, what: &'static str) -> Result<(), BackendError> {
        let r = self.regs();
        fence(Ordering::SeqCst);
        r.gcmd.set(regs::gcmd_value(r.gsts.get(), bit, true));
        let mut polls = 0u32;
        while (r.gsts.get() & bit != 0) != done {
            polls += 1;
            if polls >= self.budget {
                return Err(BackendError::Timeout { what, polls });
            }
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Sets the unit up and turns translation on: root table, invalidation
    /// queue (if wanted and present), global invalidation, fault state
    /// cleared, then GCMD.TE. Every device starts blocked. Calling it again
    /// re-initialises from scratch (tables of the previous run are leaked to
    /// the lender, not freed, because the hardware may still hold them).
    pub fn init(&mut self, config: VtdConfig) -> Result<(), VtdError> {
        self.budget = config.poll_budget.max(1);
        self.segment = config.segment;
        if let Some(did) = config.bypass_domain_id {
            self.bypass_did = did;
        }
        let te = GCMD::TE::SET.value;
        let qie = GCMD::QIE::SET.value;
        // Firmware or an earlier run may have left things on.
        if self.regs().gsts.get() & te != 0 {
            self.gcmd(te, false, "VT-d GSTS.TES clear")?;
        }
        if self.regs().gsts.get() & qie != 0 {
            self.gcmd(qie, false, "VT-d GSTS.QIES clear")?;
        }
        self.queue = None;
        if self.regs().pmen.is_set(PMEN::PRS) {
            self.regs().pmen.modify(PMEN::EPM::CLEAR);
            let mut polls = 0u32;
            while self.regs().pmen.is_set(PMEN::PRS) {
                polls += 1;
                if polls >= self.budget {
                    return Err(BackendError::Timeout {
                        what: "VT-d PMEN.PRS clear",
                        polls,
                    }
                    .into());
                }
            }
        }

        let root = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
        self.mem.clean(root, 4096);
        self.root = Some(root);
        self.regs()
            .rtaddr
            .write(RTADDR::RTA.val(root.0 >> 12) + RTADDR::TTM::Legacy);
        self.gcmd_one_shot(GCMD::SRTP::SET.value, true, "VT-d GSTS.RTPS")?;

        if config.use_qi && self.features.qi {
            let mut q = InvQueue::new(&self.mem, self.budget)?;
            q.program(self.regs());
            self.gcmd(qie, true, "VT-d GSTS.QIES set")?;
            self.queue = Some(q);
        }

        self.flush_write_buffer()?;
        self.context_invalidate(ContextGranularity::Global)?;
        self.iotlb_invalidate(IotlbGranularity::Global)?;
        self.sync()?;

        // Start with no stale faults; keep the fault interrupt masked until
        // the user routes it (handle_irq works with or without it).
        let _ = self.poll_faults(|_| {});
        self.regs().fectl.write(FECTL::IM::SET);

        self.gcmd(te, true, "VT-d GSTS.TES set")?;
        Ok(())
    }

    /// Turns translation and queued invalidation off (every device then
    /// accesses memory untranslated).
    pub fn disable(&mut self) -> Result<(), BackendError> {
        self.gcmd(GCMD::TE::SET.value, false, "VT-d GSTS.TES clear")?;
        if self.queue.take().is_some() {
            self.gcmd(GCMD::QIE::SET.value, false, "VT-d GSTS.QIES clear")?;
        }
        Ok(())
    }

    fn flush_write_buffer(&mut self) -> Result<(), BackendError> {
        if self.features.rwbf {
            self.gcmd_one_shot(GCMD::WBF::SET.value, false, "VT-d GSTS.WBFS clear")?;
            self.stats.write_buffer_flushes += 1;
        }
        Ok(())
    }

    fn context_invalidate(&mut self, g: ContextGranularity) -> Result<(), BackendError> {
        self.stats.context_invalidations += 1;
        if let Some(q) = self.queue.as_mut() {
            // SAFETY: see `regs()`.
            let regs = unsafe { self.regs.as_ref() };
            q.push(regs, &self.mem, InvDesc::context(g))
        } else {
            self.stats.register_invalidations += 1;
            fence(Ordering::SeqCst);
            reginv::invalidate_context(self.regs(), g, self.budget)
        }
    }

    fn iotlb_invalidate(&mut self, g: IotlbGranularity) -> Result<(), BackendError> {
        match g {
            IotlbGranularity::Global => self.stats.iotlb_global += 1,
            IotlbGranularity::Domain(_) => self.stats.iotlb_dsi += 1,
            IotlbGranularity::Page { .. } => self.stats.iotlb_psi += 1,
        }
        let (dr, dw) = (self.features.drain_reads, self.features.drain_writes);
        if let Some(q) = self.queue.as_mut() {
            // SAFETY: see `regs()`.
            let regs = unsafe { self.regs.as_ref() };
            q.push(regs, &self.mem, InvDesc::iotlb(g, dr, dw))
        } else {
            self.stats.register_invalidations += 1;
            fence(Ordering::SeqCst);
            reginv::invalidate_iotlb(self.iotlb_regs(), g, dr, dw, self.budget)
        }
    }

    /// Physical address of the context entry of `dev`, allocating the bus's
    /// context table when `create`.
    fn context_slot(
        &mut self,
        dev: DeviceId,
        create: bool,
    ) -> Result<Option<PhysAddr>, BackendError> {
        if dev.segment != self.segment {
            return Err(BackendError::UnknownDevice(dev));
        }
        let root = self
            .root
            .ok_or(BackendError::Unsupported("VT-d unit not initialised"))?;
        let rpa = PhysAddr(root.0 + u64::from(dev.bus) * 16);
        let rp = self.mem.phys_to_virt(rpa).cast::<u64>();
        // SAFETY: the root table is one lent page of 256 16-byte entries; bus < 256.
        let re = RootEntry::from_raw(unsafe { [rp.read_volatile(), rp.add(1).read_volatile()] });
        let table = if re.is_present() {
            re.context_table()
        } else if create {
            let t = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
            self.mem.clean(t, 4096);
            let [lo, hi] = RootEntry::present(t).raw();
            // SAFETY: as above; hi first, then lo with P.
            unsafe {
                rp.add(1).write_volatile(hi);
                fence(Ordering::SeqCst);
                rp.write_volatile(lo);
            }
            self.mem.clean(rpa, 16);
            t
        } else {
            return Ok(None);
        };
        Ok(Some(PhysAddr(table.0 + u64::from(dev.devfn) * 16)))
    }

    fn read_context(&self, pa: PhysAddr) -> ContextEntry {
        let p = self.mem.phys_to_virt(pa).cast::<u64>();
        // SAFETY: `pa` is a 16-byte slot of a lent context-table page.
        ContextEntry::from_raw(unsafe { [p.read_volatile(), p.add(1).read_volatile()] })
    }

    /// Writes a context entry so the hardware never sees a half-written
    /// present entry: clearing writes the P half first, setting writes it last.
    fn write_context(&self, pa: PhysAddr, e: ContextEntry) {
        let p = self.mem.phys_to_virt(pa).cast::<u64>();
        let [lo, hi] = e.raw();
        // SAFETY: `pa` is a 16-byte slot of a lent context-table page.
        unsafe {
            if e.is_present() {
                p.add(1).write_volatile(hi);
                fence(Ordering::SeqCst);
                p.write_volatile(lo);
            } else {
                p.write_volatile(lo);
                fence(Ordering::SeqCst);
                p.add(1).write_volatile(hi);
            }
        }
        self.mem.clean(pa, 16);
    }

    /// The context entry currently programmed for `dev` (blocked if none).
    pub fn context_entry(&mut self, dev: DeviceId) -> Result<ContextEntry, BackendError> {
        Ok(match self.context_slot(dev, false)? {
            Some(pa) => self.read_context(pa),
            None => ContextEntry::blocked(),
        })
    }

    fn entry_for(&self, how: Attachment) -> Result<ContextEntry, BackendError> {
        match how {
            Attachment::Blocked => Ok(ContextEntry::blocked()),
            Attachment::Bypass => {
                if !self.features.pt {
                    return Err(BackendError::Unsupported("pass-through needs ECAP.PT"));
                }
                ContextEntry::pass_through(self.domain_levels(), self.bypass_did).ok_or(
                    BackendError::Unsupported("no address width for pass-through"),
                )
            }
            Attachment::Translated(info) => {
                if info.format != TableFormat::VtdSecondLevel {
                    return Err(BackendError::Unsupported(
                        "VT-d translates only VtdSecondLevel tables",
                    ));
                }
                if !self.features.supports_levels(info.levels) {
                    return Err(BackendError::Unsupported(
                        "table levels not in CAP.SAGAW (3 = 39-bit, 4 = 48-bit)",
                    ));
                }
                self.check_did(info.id)?;
                ContextEntry::translated(info.root, info.levels, info.id)
                    .ok_or(BackendError::Unsupported("table levels"))
            }
        }
    }

    fn check_did(&self, did: u16) -> Result<(), BackendError> {
        if u32::from(did) >= self.features.domains {
            return Err(BackendError::Unsupported("domain-id beyond CAP.ND"));
        }
        if did == 0 && self.features.caching_mode {
            return Err(BackendError::Unsupported(
                "domain-id 0 is reserved under caching mode (CAP.CM)",
            ));
        }
        Ok(())
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
                f(rec);
                // RW1C on F (bit 127 = bit 31 of the last dword).
                self.frcd(i).status.write(FRCD3::F::SET);
            }
        }
        let status = self.fault_status();
        if status.overflow {
            self.regs().fsts.write(FSTS::PFO::SET);
        }
        status
    }

    /// The fault held by fault-recording register `index`, without clearing it.
    pub fn read_fault(&self, index: u16) -> Option<FaultRecord> {
        if index >= self.features.fault_records {
            return None;
        }
        let r = self.frcd(index);
        let hi = (u64::from(r.status.get()) << 32) | u64::from(r.sid.get());
        if hi & (1 << 63) == 0 {
            return None;
        }
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

    /// Submits a raw descriptor to the invalidation queue (diagnostics and
    /// tests: a malformed one makes the next sync report the queue error).
    pub fn submit_raw(&mut self, desc: InvDesc) -> Result<(), BackendError> {
        let q = self
            .queue
            .as_mut()
            .ok_or(BackendError::Unsupported("queued invalidation not enabled"))?;
        // SAFETY: see `regs()`.
        let regs = unsafe { self.regs.as_ref() };
        q.push(regs, &self.mem, desc)
    }
}

impl<M: TableMemory> IommuBackend for Vtd<M> {
    fn attach(&mut self, dev: DeviceId, how: Attachment) -> Result<(), BackendError> {
        let new = self.entry_for(how)?;
        let Some(slot) = self.context_slot(dev, new.is_present())? else {
            // No context table for the bus: the device is already blocked.
            return Ok(());
        };
        let old = self.read_context(slot);
        if old == new {
            return Ok(());
        }
        let sid = dev.source_id();
        if old.is_present() {
            // Present → anything: take it down first and flush what was cached
            // under the old domain-id (VT-d 6.5.3.3 / 6.2.2).
            self.write_context(slot, ContextEntry::blocked());
            self.flush_write_buffer()?;
            self.context_invalidate(ContextGranularity::Device {
                did: old.did(),
                sid,
            })?;
            self.iotlb_invalidate(IotlbGranularity::Domain(old.did()))?;
        }
        if new.is_present() {
            self.write_context(slot, new);
            self.flush_write_buffer()?;
            if self.features.caching_mode {
                // Not-present entries may be cached, tagged with domain-id 0 (6.1).
                self.context_invalidate(ContextGranularity::Device { did: 0, sid })?;
                self.iotlb_invalidate(IotlbGranularity::Domain(new.did()))?;
            }
        }
        self.sync()
    }

    fn invalidate(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), BackendError> {
        self.check_did(domain.id)?;
        if len == 0 {
            return Ok(());
        }
        let did = domain.id;
        if self.features.psi {
            let mut blocks: heapless::Vec<(DmaAddr, u8), PSI_MAX_BLOCKS> = heapless::Vec::new();
            let fits = inv::psi_blocks(iova, len, self.features.mamv, PSI_MAX_BLOCKS, |a, am| {
                let _ = blocks.push((a, am));
            });
            if fits.is_some() {
                for (addr, am) in blocks {
                    self.iotlb_invalidate(IotlbGranularity::Page {
                        did,
                        addr,
                        am,
                        ih: leaf_only,
                    })?;
                }
                return Ok(());
            }
        }
        self.iotlb_invalidate(IotlbGranularity::Domain(did))
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        self.check_did(domain.id)?;
        self.iotlb_invalidate(IotlbGranularity::Domain(domain.id))
    }

    fn sync(&mut self) -> Result<(), BackendError> {
        fence(Ordering::SeqCst);
        if let Some(q) = self.queue.as_mut() {
            // SAFETY: see `regs()`.
            let regs = unsafe { self.regs.as_ref() };
            q.sync(regs, &self.mem)?;
        } else {
            // Register-based invalidations completed when issued.
            self.flush_write_buffer()?;
        }
        self.stats.syncs += 1;
        Ok(())
    }

    fn needs_map_invalidation(&self) -> bool {
        self.features.caching_mode
    }

    fn coherent_walk(&self) -> bool {
        self.features.coherent
    }
}

#[cfg(test)]
mod tests {
    use super::testmem::{FakeRegs, HostMem};
    use super::*;

    fn qemu_like() -> FakeRegs {
        let r = FakeRegs::new();
        r.set_u32(0x00, 0x10);
        r.set_u64(0x08, 0x00d2_008c_222f_0606);
        r.set_u64(0x10, 0xf0_0f4a);
        r
    }

    #[test]
    fn probe_reads_capabilities_and_writes_nothing() {
        let r = qemu_like();
        // SAFETY: `r` is a register block in memory that outlives `vtd`.
        let vtd = unsafe { Vtd::new(r.base(), HostMem::new(4)) }.unwrap();
        assert_eq!(vtd.features().domains, 65536);
        assert_eq!(vtd.domain_levels(), 4);
        assert_eq!(vtd.bypass_domain_id(), 0xffff);
        assert_eq!(vtd.second_level_format().sllps, 0b11);
        assert_eq!(vtd.second_level_format().haw, 48);
        assert_eq!(r.get_u32(0x18), 0, "probe must not write GCMD");
    }

    #[test]
    fn probe_of_nothing_is_an_error() {
        let r = FakeRegs::new();
        // SAFETY: as above.
        let e = unsafe { Vtd::new(r.base(), HostMem::new(4)) }.err();
        assert_eq!(e, Some(VtdError::NoUnit { ver: 0 }));
    }

    #[test]
    fn init_on_unresponsive_hardware_times_out_instead_of_hanging() {
        let r = qemu_like();
        // SAFETY: as above.
        let mut vtd = unsafe { Vtd::new(r.base(), HostMem::new(4)) }.unwrap();
        let cfg = VtdConfig {
            poll_budget: 20,
            ..VtdConfig::default()
        };
        assert_eq!(
            vtd.init(cfg),
            Err(VtdError::Backend(BackendError::Timeout {
                what: "VT-d GSTS.RTPS",
                polls: 20
            }))
        );
        // The SRTP write carried only SRTP (nothing was enabled in GSTS).
        assert_eq!(r.get_u32(0x18), 1 << 30);
    }

    #[test]
    fn caching_mode_reserves_domain_zero_and_asks_for_map_invalidation() {
        let r = qemu_like();
        r.set_u64(0x08, 0x00d2_008c_222f_0686);
        // SAFETY: as above.
        let vtd = unsafe { Vtd::new(r.base(), HostMem::new(4)) }.unwrap();
        assert!(vtd.needs_map_invalidation());
        assert!(vtd.check_did(0).is_err());
        assert!(vtd.check_did(1).is_ok());
    }
}
