//! Intel VT-d remapping-hardware driver.
//!
//! [`Vtd`] drives one DMA-remapping hardware unit (one DRHD of the ACPI DMAR
//! table; finding it is the platform's job). It keeps the root table and
//! context tables in lent memory (legacy mode, or scalable mode with PASID
//! tables when [`VtdConfig::scalable`]), invalidates through the invalidation
//! queue (or the CCMD/IOTLB registers when queued invalidation is absent or
//! not wanted), decodes fault records, and implements [`IommuBackend`] so the
//! core's two-step API drives it unchanged.
//!
//! ```no_run
//! use bare_iommu::pgtable::{DmaDirection, MapAttrs};
//! use bare_iommu::state::{Domain, DomainConfig};
//! use bare_iommu::vtd::{Vtd, VtdConfig};
//! use bare_iommu::{DeviceId, IommuBackend, PhysAddr, TableMemory};
//!
//! fn demo<M: TableMemory + Copy>(base: usize, mem: M, buf: PhysAddr) -> Option<u64> {
//!     // SAFETY: `base` maps the unit's registers and nothing else drives it.
//!     let mut vtd = unsafe { Vtd::new(base, mem) }.ok()?;
//!     let _caps = vtd.features(); // Display: the decoded CAP/ECAP
//!     vtd.init(VtdConfig::default()).ok()?; // translation on, every device blocked
//!
//!     let cfg = DomainConfig {
//!         id: 1,
//!         levels: vtd.domain_levels(),
//!         aperture_start: 1 << 20,
//!         aperture_end: 1 << 32,
//!         coherent_walk: vtd.coherent_walk(),
//!     };
//!     let mut dom = Domain::new(vtd.second_level_format(), mem, cfg).ok()?;
//!     let dev = DeviceId::new(0, 0, 3, 0)?;
//!     vtd.attach(dev, dom.attachment()).ok()?;
//!
//!     let mut tx = dom.try_alloc(2 * 4096, u64::MAX).ok()?.into_iova()?;
//!     let iova = dom
//!         .link(&mut tx, buf, 0, 4096, DmaDirection::FromDevice, MapAttrs::empty())
//!         .ok()?;
//!     dom.sync(&mut vtd).ok()?; // one invalidation-wait descriptor
//!     // ... the device DMAs to `iova` ...
//!     dom.destroy(tx, &mut vtd).ok()?; // unlink, invalidate, wait, free the IOVA
//!     vtd.poll_faults(|f| {
//!         let _ = f; // decoded FaultRecord: source-id, address, reason
//!     });
//!     Some(iova.0)
//! }
//! ```

/// `from_raw` / `raw` for a 128-bit in-memory structure kept as `lo`/`hi`.
macro_rules! raw128 {
    ($t:ident) => {
        impl $t {
            /// The structure from its two raw 64-bit halves, low first.
            pub const fn from_raw(raw: [u64; 2]) -> Self {
                Self {
                    lo: raw[0],
                    hi: raw[1],
                }
            }

            /// The two raw 64-bit halves, low first.
            pub const fn raw(self) -> [u64; 2] {
                [self.lo, self.hi]
            }
        }
    };
}
use raw128;

pub mod caps;
pub mod context;
pub mod fault;
pub mod first_level;
pub mod inv;
pub mod qi;
pub mod reginv;
pub mod regs;
pub mod root;
mod scalable;
pub mod sm;
#[cfg(test)]
mod testmem;

use crate::logging::{log_debug, log_warn};
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};

pub use caps::Features;
pub use context::{ContextEntry, TranslationType};
pub use fault::{Access, FaultReason, FaultRecord, FaultStatus};
pub use first_level::VtdFirstLevel;
pub use inv::{
    ContextGranularity, InvDesc, IotlbGranularity, PasidGranularity, PasidIotlbGranularity,
};
pub use root::RootEntry;
pub use sm::{PasidDirEntry, PasidEntry, Pgtt, ScalableContextEntry, ScalableRootEntry};

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
    /// Scalable-mode translation (RTADDR.TTM = 01b): scalable context
    /// entries and PASID tables whose PASID 0 entry carries the
    /// second-level table. Needs ECAP.SMTS, ECAP.SLTS and queued invalidation.
    pub scalable: bool,
}

impl Default for VtdConfig {
    fn default() -> Self {
        Self {
            use_qi: true,
            bypass_domain_id: None,
            segment: 0,
            poll_budget: DEFAULT_POLL_BUDGET,
            scalable: false,
        }
    }
}

/// How a device's DMA is currently programmed, read back from the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeviceState {
    /// No present context (or PASID) entry: DMA is blocked.
    Blocked,
    /// Translated through a second-level (or, in scalable mode, first-level) table.
    Translated {
        /// Which table format the unit walks.
        format: TableFormat,
        /// Domain-id.
        did: u16,
        /// Second-level table root.
        root: PhysAddr,
        /// Table levels (AW + 2).
        levels: u8,
    },
    /// Pass-through.
    PassThrough {
        /// Domain-id.
        did: u16,
    },
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
    /// Page-selective IOTLB invalidations (queued or by register; PASID-based
    /// page-selective ones for first-level domains included).
    pub iotlb_psi: u64,
    /// Domain-selective IOTLB invalidations (PASID-based all-in-PASID ones
    /// for first-level domains included).
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
    /// A queue switched off by [`Vtd::set_queued_invalidation`], kept for reuse.
    parked: Option<InvQueue>,
    budget: u32,
    segment: u16,
    bypass_did: u16,
    scalable: bool,
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
            parked: None,
            budget: DEFAULT_POLL_BUDGET,
            segment: 0,
            bypass_did,
            scalable: false,
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
        unsafe { &*(self.base.wrapping_add(off) as *const FrcdRegs) }
    }

    /// The decoded capabilities.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Counters since probe.
    pub fn stats(&self) -> VtdStats {
        let mut s = self.stats;
        for q in [&self.queue, &self.parked].into_iter().flatten() {
            s.wait_descriptors += q.waits();
            s.queued_descriptors += q.submitted();
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

    /// IQT as a descriptor slot index (IQT / descriptor size), for tests
    /// counting descriptors; 0 when queued invalidation is off.
    pub fn queue_tail(&self) -> u32 {
        let size = if self.scalable { 32 } else { 16 };
        ((self.regs().iqt.get() & 0x7_fff0) / size) as u32
    }

    /// Descriptor slots in the invalidation queue (256, or 128 with the
    /// 256-bit descriptors of scalable mode); 0 without a queue.
    pub fn queue_entries(&self) -> u32 {
        self.queue.as_ref().map_or(0, |q| q.entries())
    }

    /// Whether scalable-mode translation is on.
    pub fn is_scalable(&self) -> bool {
        self.scalable
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

    /// Table levels for new second-level domains: 4 (48-bit) when SAGAW
    /// allows, else 3. First-level domains always use 4.
    pub fn domain_levels(&self) -> u8 {
        self.features.max_levels().unwrap_or(3)
    }

    /// The VT-d first-level format this unit walks (scalable mode with
    /// ECAP.FLTS): 2 MiB pages always, 1 GiB with CAP.FL1GP.
    pub fn first_level_format(&self) -> VtdFirstLevel {
        VtdFirstLevel {
            fl1gp: self.features.fl1gp,
            haw: self.features.mgaw,
        }
    }

    /// Whether domains for this unit should use first-level tables: scalable
    /// mode on a unit with ECAP.FLTS but no ECAP.SLTS.
    pub fn wants_first_level(&self) -> bool {
        self.scalable && self.features.flts && !self.features.slts
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
        if config.scalable {
            if !(self.features.smts && (self.features.slts || self.features.flts)) {
                return Err(BackendError::Unsupported(
                    "scalable mode needs ECAP.SMTS and ECAP.SLTS or ECAP.FLTS",
                )
                .into());
            }
            if !(config.use_qi && self.features.qi) {
                return Err(
                    BackendError::Unsupported("scalable mode needs queued invalidation").into(),
                );
            }
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
        self.parked = None;
        self.scalable = config.scalable;
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
        let ttm = if self.scalable {
            RTADDR::TTM::Scalable
        } else {
            RTADDR::TTM::Legacy
        };
        self.regs()
            .rtaddr
            .write(RTADDR::RTA.val(root.0 >> 12) + ttm);
        self.gcmd_one_shot(GCMD::SRTP::SET.value, true, "VT-d GSTS.RTPS")?;

        if config.use_qi && self.features.qi {
            self.set_queued_invalidation(true)?;
        }

        self.flush_write_buffer()?;
        self.context_invalidate(ContextGranularity::Global)?;
        if self.scalable {
            self.pasid_cache_invalidate(PasidGranularity::Global)?;
        }
        self.iotlb_invalidate(IotlbGranularity::Global)?;
        self.sync()?;

        // Start with no stale faults; keep the fault interrupt masked until
        // the user routes it (handle_irq works with or without it).
        let _ = self.poll_faults(|_| {});
        self.regs().fectl.write(FECTL::IM::SET);

        self.gcmd(te, true, "VT-d GSTS.TES set")?;
        Ok(())
    }

    /// Switches between queued and register-based invalidation while
    /// translation stays on. Switching off first syncs (the queue must be
    /// drained, its last descriptor a wait); switching on (re)programs the
    /// queue with IQT = 0. Both GCMD writes keep TE (VT-d 6.5.2, 11.4.4).
    pub fn set_queued_invalidation(&mut self, on: bool) -> Result<(), BackendError> {
        if on == self.queue.is_some() {
            return Ok(());
        }
        let qie = GCMD::QIE::SET.value;
        if on {
            if !self.features.qi {
                return Err(BackendError::Unsupported(
                    "queued invalidation needs ECAP.QI",
                ));
            }
            let mut q = match self.parked.take() {
                Some(q) => q,
                None => InvQueue::new(&self.mem, self.budget, self.scalable)?,
            };
            q.program(self.regs());
            self.gcmd(qie, true, "VT-d GSTS.QIES set")?;
            self.queue = Some(q);
        } else {
            if self.scalable && self.regs().gsts.get() & GCMD::TE::SET.value != 0 {
                return Err(BackendError::Unsupported(
                    "scalable mode runs on queued invalidation",
                ));
            }
            self.sync()?;
            self.gcmd(qie, false, "VT-d GSTS.QIES clear")?;
            self.parked = self.queue.take();
        }
        Ok(())
    }

    /// Turns translation and queued invalidation off (every device then
    /// accesses memory untranslated).
    pub fn disable(&mut self) -> Result<(), BackendError> {
        self.gcmd(GCMD::TE::SET.value, false, "VT-d GSTS.TES clear")?;
        self.set_queued_invalidation(false)
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

    fn pasid_cache_invalidate(&mut self, g: PasidGranularity) -> Result<(), BackendError> {
        let q = self.queue.as_mut().ok_or(BackendError::Unsupported(
            "PASID-cache invalidation needs queued invalidation",
        ))?;
        // SAFETY: see `regs()`.
        let regs = unsafe { self.regs.as_ref() };
        q.push(regs, &self.mem, InvDesc::pasid_cache(g))
    }

    /// PASID-based IOTLB invalidation (first-level domains, scalable mode).
    fn pasid_iotlb_invalidate(&mut self, g: PasidIotlbGranularity) -> Result<(), BackendError> {
        match g {
            PasidIotlbGranularity::AllInPasid { .. } => self.stats.iotlb_dsi += 1,
            PasidIotlbGranularity::Page { .. } => self.stats.iotlb_psi += 1,
        }
        let q = self.queue.as_mut().ok_or(BackendError::Unsupported(
            "PASID-based IOTLB invalidation needs queued invalidation",
        ))?;
        // SAFETY: see `regs()`.
        let regs = unsafe { self.regs.as_ref() };
        q.push(regs, &self.mem, InvDesc::pasid_iotlb(g))
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

    /// Reads `N` consecutive 64-bit words of a lent table at `pa`.
    fn read_words<const N: usize>(&self, pa: PhysAddr) -> [u64; N] {
        let p = self.mem.phys_to_virt(pa).cast::<u64>();
        let mut out = [0u64; N];
        for (i, w) in out.iter_mut().enumerate() {
            // SAFETY: `pa` is an 8-byte aligned entry of `N` words inside a
            // table page lent by `mem` (callers pass entry addresses only).
            *w = unsafe { p.add(i).read_volatile() };
        }
        out
    }

    /// Writes an entry whose present bit is bit 0 of word 0 so the hardware
    /// never sees a half-written present entry: a present entry gets word 0
    /// last, a not-present one first.
    fn write_words(&self, pa: PhysAddr, words: &[u64]) {
        let p = self.mem.phys_to_virt(pa).cast::<u64>();
        let Some((&first, rest)) = words.split_first() else {
            return;
        };
        let write_rest = || {
            for (i, &w) in rest.iter().enumerate() {
                // SAFETY: as in `read_words`; word i + 1 of the entry.
                unsafe { p.add(i + 1).write_volatile(w) };
            }
        };
        if first & 1 != 0 {
            write_rest();
            fence(Ordering::SeqCst);
            // SAFETY: as in `read_words`; word 0 of the entry.
            unsafe { p.write_volatile(first) };
        } else {
            // SAFETY: as above.
            unsafe { p.write_volatile(first) };
            fence(Ordering::SeqCst);
            write_rest();
        }
        self.mem.clean(pa, words.len() * 8);
    }

    /// Physical address of the context entry of `dev` (16 bytes in legacy
    /// mode, 32 in scalable mode), allocating the context table when `create`.
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
        let raw = self.read_words::<2>(rpa);
        let existing = if self.scalable {
            ScalableRootEntry::from_raw(raw).context_table(dev.devfn)
        } else {
            let re = RootEntry::from_raw(raw);
            re.is_present().then(|| re.context_table())
        };
        let table = match existing {
            Some(t) => t,
            None if create => {
                let t = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
                self.mem.clean(t, 4096);
                let new = if self.scalable {
                    ScalableRootEntry::from_raw(raw)
                        .with_context_table(dev.devfn, t)
                        .raw()
                } else {
                    RootEntry::present(t).raw()
                };
                // Only the half for this devfn changes; the other keeps its
                // value, so the write order of the halves does not matter.
                self.write_words(rpa, &new);
                t
            }
            None => return Ok(None),
        };
        Ok(Some(if self.scalable {
            PhysAddr(table.0 + u64::from(dev.devfn & 0x7f) * 32)
        } else {
            PhysAddr(table.0 + u64::from(dev.devfn) * 16)
        }))
    }

    fn read_context(&self, pa: PhysAddr) -> ContextEntry {
        ContextEntry::from_raw(self.read_words::<2>(pa))
    }

    fn write_context(&self, pa: PhysAddr, e: ContextEntry) {
        self.write_words(pa, &e.raw());
    }

    /// How `dev`'s DMA is programmed now, read back from the tables.
    pub fn device_state(&mut self, dev: DeviceId) -> Result<DeviceState, BackendError> {
        let Some(slot) = self.context_slot(dev, false)? else {
            return Ok(DeviceState::Blocked);
        };
        if self.scalable {
            return Ok(self.scalable_state(slot));
        }
        let ce = self.read_context(slot);
        Ok(if !ce.is_present() {
            DeviceState::Blocked
        } else if ce.tt() == TranslationType::PassThrough as u8 {
            DeviceState::PassThrough { did: ce.did() }
        } else {
            DeviceState::Translated {
                format: TableFormat::VtdSecondLevel,
                did: ce.did(),
                root: ce.slptptr(),
                levels: ce.aw() + 2,
            }
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
                self.check_translated(&info)?;
                ContextEntry::translated(info.root, info.levels, info.id)
                    .ok_or(BackendError::Unsupported("table levels"))
            }
        }
    }

    /// Whether this unit can walk `info`'s tables under its domain-id.
    fn check_translated(&self, info: &DomainInfo) -> Result<(), BackendError> {
        match info.format {
            TableFormat::VtdSecondLevel if self.scalable && !self.features.slts => {
                return Err(BackendError::Unsupported(
                    "second-level tables in scalable mode need ECAP.SLTS",
                ));
            }
            TableFormat::VtdSecondLevel => {}
            TableFormat::VtdFirstLevel => {
                if !(self.scalable && self.features.flts) {
                    return Err(BackendError::Unsupported(
                        "first-level tables need scalable mode and ECAP.FLTS",
                    ));
                }
                if info.levels != 4 {
                    return Err(BackendError::Unsupported(
                        "first-level tables have 4 levels",
                    ));
                }
                return self.check_did(info.id);
            }
            _ => {
                return Err(BackendError::Unsupported(
                    "VT-d walks only VtdSecondLevel / VtdFirstLevel tables",
                ));
            }
        }
        if !self.features.supports_levels(info.levels) {
            return Err(BackendError::Unsupported(
                "table levels not in CAP.SAGAW (3 = 39-bit, 4 = 48-bit)",
            ));
        }
        self.check_did(info.id)
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
        if self.scalable {
            return self.attach_scalable(dev, how);
        }
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
        // First-level translations are tagged with the PASID (0 = RID_PASID):
        // invalidate them per PASID, page-selectively (VT-d 6.5.2.4).
        let first_level = domain.format == TableFormat::VtdFirstLevel;
        if self.features.psi || first_level {
            let mut blocks: heapless::Vec<(DmaAddr, u8), PSI_MAX_BLOCKS> = heapless::Vec::new();
            let fits = inv::psi_blocks(iova, len, self.features.mamv, PSI_MAX_BLOCKS, |a, am| {
                let _ = blocks.push((a, am));
            });
            if fits.is_some() {
                for (addr, am) in blocks {
                    if first_level {
                        self.pasid_iotlb_invalidate(PasidIotlbGranularity::Page {
                            did,
                            pasid: 0,
                            addr,
                            am,
                            ih: leaf_only,
                        })?;
                    } else {
                        self.iotlb_invalidate(IotlbGranularity::Page {
                            did,
                            addr,
                            am,
                            ih: leaf_only,
                        })?;
                    }
                }
                return Ok(());
            }
        }
        self.invalidate_domain(domain)
    }

    fn invalidate_domain(&mut self, domain: &DomainInfo) -> Result<(), BackendError> {
        self.check_did(domain.id)?;
        if domain.format == TableFormat::VtdFirstLevel {
            self.pasid_iotlb_invalidate(PasidIotlbGranularity::AllInPasid {
                did: domain.id,
                pasid: 0,
            })
        } else {
            self.iotlb_invalidate(IotlbGranularity::Domain(domain.id))
        }
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
