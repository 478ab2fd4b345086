//! Intel VT-d remapping-hardware driver.
//!
//! [`Vtd`] drives one DMA-remapping hardware unit (one DRHD of the ACPI DMAR
//! table; finding it is the platform's job). It keeps the root table and
//! context tables in lent memory (legacy mode, or scalable mode with PASID
//! tables when [`VtdConfig::scalable`]), invalidates through the invalidation
//! queue (or the CCMD/IOTLB registers when queued invalidation is absent or
//! not wanted), decodes fault records, and implements
//! [`IommuBackend`](crate::IommuBackend) so the core's two-step API drives it
//! unchanged.
//!
//! ```no_run
//! use bare_iommu::pgtable::{DmaDirection, MapAttrs};
//! use bare_iommu::state::{Domain, DomainConfig};
//! use bare_iommu::vtd::{Vtd, VtdConfig};
//! use bare_iommu::{DeviceId, IommuBackend, PhysAddr, TableMemory};
//!
//! fn demo<M: TableMemory + Copy>(base: usize, mem: M, buf: PhysAddr) -> Option<u64> {
//!     // SAFETY: `base` maps the unit's registers and nothing else drives it.
//!     let mut vtd = unsafe { Vtd::new(base, bare_iommu::vtd::REGISTER_BLOCK_LEN, mem) }.ok()?;
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

mod attach;
mod backend;
pub mod caps;
mod config;
pub mod context;
mod error;
#[cfg(test)]
mod fakehw;
pub mod fault;
mod fault_reporting;
pub mod first_level;
mod gcmd;
mod handoff;
#[cfg(test)]
mod host_tests;
pub mod inv;
mod invalidate;
mod ir;
pub mod ir_entry;
mod ir_error;
#[cfg(test)]
mod ir_tests;
#[cfg(test)]
mod leak_tests;
pub mod qi;
pub mod reginv;
pub mod regs;
pub mod root;
mod scalable;
pub mod sm;
mod stats;
#[cfg(test)]
mod testmem;

use core::ptr::NonNull;

use tock_registers::interfaces::Readable;

pub use attach::DeviceState;
pub use caps::Features;
pub use config::{DEFAULT_POLL_BUDGET, VtdConfig};
pub use context::{ContextEntry, TranslationType};
pub use error::VtdError;
pub use fault::{Access, FaultReason, FaultRecord, FaultStatus};
pub use first_level::VtdFirstLevel;
pub use handoff::VtdHandoff;
pub use inv::{
    ContextGranularity, IecGranularity, InvDesc, IotlbGranularity, PasidGranularity,
    PasidIotlbGranularity,
};
pub use invalidate::PSI_MAX_BLOCKS;
pub use ir::{IrConfig, IrHandle};
pub use ir_entry::{DeliveryMode, Irte, IrteTarget, MsiMessage, SidQualifier, SourceValidation};
pub use ir_error::IrError;
pub use root::RootEntry;
pub use sm::{PasidDirEntry, PasidEntry, Pgtt, ScalableContextEntry, ScalableRootEntry};
pub use stats::VtdStats;

use crate::addr::PhysAddr;
use crate::error::BackendError;
use crate::mem::TableMemory;
use crate::pgtable::vtd::VtdSecondLevel;
use qi::InvQueue;
use regs::{IotlbRegs, VtdRegs};

/// Size of one remapping unit's register block when the DRHD gives none
/// (one 4 KiB page, VT-d 8.3 Size = 0).
pub const REGISTER_BLOCK_LEN: usize = 4096;

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
    /// A queue whose GCMD.QIE handshake timed out and whose switch-off was
    /// not confirmed either: the unit may fetch from it. Returned once
    /// GSTS.QIES is seen clear (`init`, `disable`, the next switch-on).
    stray_queue: Option<InvQueue>,
    /// An interrupt-remapping table (base, pages) whose GCMD.IRE handshake
    /// timed out and whose switch-off was not confirmed: the unit may remap
    /// through it. Returned once GSTS.IRES is seen clear.
    stray_ir: Option<(PhysAddr, usize)>,
    budget: u32,
    segment: u16,
    bypass_did: u16,
    scalable: bool,
    /// The write buffer was flushed since the last sync (CAP.RWBF).
    wb_flushed: bool,
    stats: VtdStats,
    /// The interrupt-remapping table, while remapping is on.
    ir: Option<ir::IrTable>,
    /// `root` is built but not latched yet ([`Vtd::adopt_begin`]): the
    /// unit still translates through the previous stage's tables.
    unlatched_root: bool,
}

/// How [`Vtd::init`] starts (private to the driver).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// From scratch: translation off first.
    Init,
    /// Taking over: translation kept on through the root swap.
    Adopt,
    /// As `Adopt`, but the new root is latched later (`adopt_finish`).
    AdoptBegin,
}

// SAFETY: the registers are MMIO owned by this value alone (contract of
// `new`); moving it to another thread moves that ownership.
unsafe impl<M: TableMemory + Send> Send for Vtd<M> {}

/// Shows the register base, mode, capabilities and counters; not the lender.
impl<M: TableMemory> core::fmt::Debug for Vtd<M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Vtd")
            .field("base", &format_args!("{:#x}", self.base))
            .field("segment", &self.segment)
            .field("root", &self.root)
            .field("scalable", &self.scalable)
            .field("queued_invalidation", &self.queue.is_some())
            .field("features", &self.features)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "defmt")]
impl<M: TableMemory> defmt::Format for Vtd<M> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "Vtd {{ base: {=usize:#x}, segment: {=u16}, root: {}, scalable: {=bool}, queued_invalidation: {=bool}, features: {}, stats: {} }}",
            self.base,
            self.segment,
            self.root,
            self.scalable,
            self.queue.is_some(),
            self.features,
            self.stats()
        )
    }
}

impl<M: TableMemory> Vtd<M> {
    /// Probes the unit whose registers start at `base` and span `len` bytes:
    /// reads VER, CAP, ECAP. Writes nothing; [`init`](Self::init) turns
    /// translation on.
    ///
    /// `len` is the size of the mapping: the DRHD's register-set size
    /// (ACPI DMAR, 2^(Size) 4 KiB pages; [`REGISTER_BLOCK_LEN`] when the
    /// firmware says 0). CAP.FRO/NFR and ECAP.IRO that place fault-recording
    /// or IOTLB registers past it are refused with
    /// [`VtdError::RegistersOutside`]: the driver never touches memory
    /// outside the block.
    ///
    /// # Errors
    ///
    /// - [`VtdError::RegistersOutside`]: `len` is smaller than the main
    ///   register set, or CAP/ECAP place fault-recording or IOTLB registers
    ///   past `len`.
    /// - [`VtdError::NoUnit`]: `base` is null, or VER reads 0 or all-ones.
    /// - [`VtdError::NoAddressWidth`]: CAP.SAGAW offers neither a 3- nor a
    ///   4-level table.
    ///
    /// # Safety
    ///
    /// `[base, base + len)` must be the (identity- or otherwise-) mapped
    /// virtual address range of a VT-d register block, uncached, valid for as
    /// long as the value lives, and driven by nothing else.
    pub unsafe fn new(base: usize, len: usize, mem: M) -> Result<Self, VtdError> {
        let main = core::mem::size_of::<VtdRegs>();
        if len < main {
            return Err(VtdError::RegistersOutside {
                what: "main registers",
                end: main,
                len,
            });
        }
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
        // Issue 15 #8: every register the driver may touch lies inside.
        let frcd_end = regs::frcd_offset(cap, usize::from(features.fault_records));
        if frcd_end > len {
            return Err(VtdError::RegistersOutside {
                what: "fault-recording registers (CAP.FRO, CAP.NFR)",
                end: frcd_end,
                len,
            });
        }
        let iotlb_end = regs::iotlb_offset(ecap) + core::mem::size_of::<IotlbRegs>();
        if iotlb_end > len {
            return Err(VtdError::RegistersOutside {
                what: "IOTLB registers (ECAP.IRO)",
                end: iotlb_end,
                len,
            });
        }
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
            stray_queue: None,
            stray_ir: None,
            budget: DEFAULT_POLL_BUDGET,
            segment: 0,
            bypass_did,
            scalable: false,
            wb_flushed: false,
            stats: VtdStats::default(),
            ir: None,
            unlatched_root: false,
        })
    }

    fn regs(&self) -> &VtdRegs {
        // SAFETY: `new`'s contract: `base` maps the register block for our lifetime.
        unsafe { self.regs.as_ref() }
    }

    fn iotlb_regs(&self) -> &IotlbRegs {
        // SAFETY: `new` checked that ECAP.IRO × 16 + 16 lies inside the
        // block mapped per its contract.
        unsafe { self.iotlb.as_ref() }
    }

    /// The decoded capabilities.
    pub fn features(&self) -> &Features {
        &self.features
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

    /// Whether the unit snoops CPU caches when it reads root, context and
    /// PASID tables and the invalidation queue (ECAP.C; Linux
    /// `__iommu_flush_cache` decides the same way in both modes).
    fn tables_coherent(&self) -> bool {
        self.features.coherent
    }

    /// Whether page-table walks snoop: ECAP.SMPWC in scalable mode (the
    /// PASID entry then sets PWSNP), ECAP.C in legacy mode (Linux
    /// `iommu_paging_structure_coherency`).
    fn walk_coherent(&self, scalable: bool) -> bool {
        if scalable {
            self.features.smpwc
        } else {
            self.features.coherent
        }
    }

    /// Cleans `[pa, pa + len)` of a root/context/PASID table to the point of
    /// coherency when the unit does not snoop (VT-d 6.2.4: software makes
    /// its updates visible to a non-coherent unit). `init` refused lenders
    /// that cannot.
    pub(super) fn clean_table(&self, pa: PhysAddr, len: usize) {
        if !self.tables_coherent() {
            self.mem.clean(pa, len);
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
}

#[cfg(test)]
mod tests {
    use super::testmem::{FakeRegs, HostMem, qemu_like};
    use super::*;

    #[test]
    fn probe_reads_capabilities_and_writes_nothing() {
        let r = qemu_like();
        // SAFETY: `r` is a register block in memory that outlives `vtd`.
        let vtd = unsafe { Vtd::new(r.base(), REGISTER_BLOCK_LEN, HostMem::new(4)) }.unwrap();
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
        let e = unsafe { Vtd::new(r.base(), REGISTER_BLOCK_LEN, HostMem::new(4)) }.err();
        assert_eq!(e, Some(VtdError::NoUnit { ver: 0 }));
    }
}
