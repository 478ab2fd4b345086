//! A minimal GICv3 driver (Arm IHI 0069, GIC architecture v3/v4) for QEMU
//! `virt,gic-version=3`: the distributor, the boot CPU's redistributor and
//! the CPU interface's system registers — enough to route the SMMU's wired
//! SPIs to this CPU as Group 1 IRQs. The register bases come from the DTB.
//!
//! The board runs with one security state as QEMU gives it without EL3
//! (GICD_CTLR.DS = 1): every interrupt it uses is Group 1, signalled as IRQ
//! and acknowledged through ICC_IAR1_EL1 (see [`crate::irq`]).

use core::arch::asm;

use tock_registers::interfaces::{ReadWriteable, Readable, Writeable};
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs};

use crate::exception::current_el;
use crate::fdt::{Fdt, FdtError};

register_bitfields! [u32,
    /// GICD_CTLR (§12.9.4), the view with one security state (DS = 1).
    pub GICD_CTLR [
        /// Register write pending: an earlier write is still taking effect.
        RWP OFFSET(31) NUMBITS(1) [],
        /// Disable security: one security state (reads 1 without EL3 on QEMU).
        DS OFFSET(6) NUMBITS(1) [],
        /// Affinity routing enable.
        ARE OFFSET(4) NUMBITS(1) [],
        /// Group 1 interrupts forwarded.
        ENABLE_GRP1 OFFSET(1) NUMBITS(1) [],
        /// Group 0 interrupts forwarded.
        ENABLE_GRP0 OFFSET(0) NUMBITS(1) []
    ],
    /// GICR_WAKER (§12.11.42).
    pub GICR_WAKER [
        /// The redistributor's interface to the CPU is quiescent.
        CHILDREN_ASLEEP OFFSET(2) NUMBITS(1) [],
        /// The CPU is asleep: set at reset, cleared to let interrupts in.
        PROCESSOR_SLEEP OFFSET(1) NUMBITS(1) []
    ]
];

register_bitfields! [u64,
    /// GICR_TYPER (§12.11.39).
    pub GICR_TYPER [
        /// Affinity of the CPU this redistributor serves (Aff3.Aff2.Aff1.Aff0).
        AFFINITY OFFSET(32) NUMBITS(32) [],
        /// The last redistributor of the region.
        LAST OFFSET(4) NUMBITS(1) [],
        /// GICv4 virtual LPIs: two more 64 KiB frames per redistributor.
        VLPIS OFFSET(1) NUMBITS(1) []
    ]
];

register_structs! {
    /// The distributor (GICD, §12.9), 64 KiB.
    pub GicdRegs {
        (0x0000 => pub ctlr: ReadWrite<u32, GICD_CTLR::Register>),
        (0x0004 => pub typer: ReadOnly<u32>),
        (0x0008 => pub iidr: ReadOnly<u32>),
        (0x000c => _reserved0),
        /// GICD_IGROUPR<n>: 1 bit per INTID, 1 = Group 1.
        (0x0080 => pub igroupr: [ReadWrite<u32>; 32]),
        /// GICD_ISENABLER<n>: write 1 to enable forwarding.
        (0x0100 => pub isenabler: [ReadWrite<u32>; 32]),
        /// GICD_ICENABLER<n>: write 1 to disable forwarding.
        (0x0180 => pub icenabler: [ReadWrite<u32>; 32]),
        /// GICD_ISPENDR<n>: pending state; write 1 to set.
        (0x0200 => pub ispendr: [ReadWrite<u32>; 32]),
        /// GICD_ICPENDR<n>: write 1 to clear pending.
        (0x0280 => pub icpendr: [ReadWrite<u32>; 32]),
        (0x0300 => pub isactiver: [ReadWrite<u32>; 32]),
        /// GICD_ICACTIVER<n>: write 1 to clear active.
        (0x0380 => pub icactiver: [ReadWrite<u32>; 32]),
        /// GICD_IPRIORITYR<n>: one priority byte per INTID, 4 per register.
        (0x0400 => pub ipriorityr: [ReadWrite<u32>; 255]),
        (0x07fc => _reserved1),
        /// GICD_ICFGR<n>: 2 bits per INTID; the upper one set = edge-triggered.
        (0x0c00 => pub icfgr: [ReadWrite<u32>; 64]),
        (0x0d00 => pub igrpmodr: [ReadWrite<u32>; 32]),
        (0x0d80 => _reserved2),
        /// GICD_IROUTER<n> (n = INTID, 32..1019): the affinity an SPI goes to.
        (0x6000 => pub irouter: [ReadWrite<u64>; 1020]),
        (0x7fe0 => _reserved3),
        /// GICD_PIDR2: bits 7:4 the architecture revision (3: GICv3, 4: GICv4).
        (0xffe8 => pub pidr2: ReadOnly<u32>),
        (0xffec => _reserved4),
        (0x10000 => @END),
    },

    /// A redistributor's RD_base frame (§12.10), 64 KiB.
    pub GicrRdRegs {
        (0x0000 => pub ctlr: ReadWrite<u32>),
        (0x0004 => pub iidr: ReadOnly<u32>),
        (0x0008 => pub typer: ReadOnly<u64, GICR_TYPER::Register>),
        (0x0010 => pub statusr: ReadWrite<u32>),
        (0x0014 => pub waker: ReadWrite<u32, GICR_WAKER::Register>),
        (0x0018 => _reserved0),
        /// GICR_PROPBASER (§12.11.32): LPI configuration table and IDbits.
        (0x0070 => pub propbaser: ReadWrite<u64>),
        /// GICR_PENDBASER (§12.11.31): LPI pending table.
        (0x0078 => pub pendbaser: ReadWrite<u64>),
        (0x0080 => _reserved1),
        (0x10000 => @END),
    },

    /// A redistributor's SGI_base frame (§12.10): SGIs and PPIs, 64 KiB.
    pub GicrSgiRegs {
        (0x0000 => _reserved0),
        (0x0080 => pub igroupr0: ReadWrite<u32>),
        (0x0084 => _reserved1),
        (0x0100 => pub isenabler0: ReadWrite<u32>),
        (0x0104 => _reserved2),
        (0x0180 => pub icenabler0: ReadWrite<u32>),
        (0x0184 => _reserved3),
        (0x0280 => pub icpendr0: ReadWrite<u32>),
        (0x0284 => _reserved4),
        (0x0400 => pub ipriorityr: [ReadWrite<u32>; 8]),
        (0x0420 => _reserved5),
        (0x0c00 => pub icfgr: [ReadWrite<u32>; 2]),
        (0x0c08 => _reserved6),
        (0x10000 => @END),
    }
}

/// DTB `compatible` of a GICv3 (Linux binding `arm,gic-v3`).
const COMPATIBLE: &str = "arm,gic-v3";
/// First SPI INTID; SPIs end at 1019.
pub const FIRST_SPI: u32 = 32;
const LAST_SPI: u32 = 1019;
/// Priority every interrupt gets until configured (lower is more urgent).
const DEFAULT_PRIORITY: u8 = 0xa0;
/// Polls of GICD_CTLR.RWP / GICR_WAKER before giving up.
const POLL_BUDGET: u32 = 1_000_000;
/// 64 KiB: one redistributor frame.
const FRAME: usize = 0x1_0000;

/// What went wrong bringing the GIC up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicError {
    /// The DTB has no GICv3 (QEMU `virt` defaults to a GICv2: run with
    /// `-machine virt,gic-version=3`).
    Dtb(FdtError),
    /// GICD_PIDR2 names another architecture revision.
    NotGicV3 { pidr2: u32 },
    /// No redistributor in the region serves this CPU's affinity.
    NoRedistributor { affinity: u32 },
    /// A register wait did not finish.
    Timeout(&'static str),
    /// Not an SPI this GIC implements.
    BadIntid(u32),
}

/// The distributor and the boot CPU's redistributor.
pub struct Gic {
    gicd: &'static GicdRegs,
    rd: &'static GicrRdRegs,
    sgi: &'static GicrSgiRegs,
    /// INTIDs the distributor implements: 32 × (GICD_TYPER.ITLinesNumber + 1).
    lines: u32,
}

impl Gic {
    /// Finds the GICv3 in the DTB (`reg` 0: GICD, `reg` 1: the
    /// redistributor region) and the redistributor of the running CPU.
    ///
    /// # Safety
    ///
    /// The DTB's GIC registers must be mapped as device memory (MMU off:
    /// identity) and no other code may drive the GIC while the value lives.
    pub unsafe fn from_dtb(fdt: &Fdt) -> Result<Self, GicError> {
        let (gicd, _) = fdt.reg(COMPATIBLE, 0).map_err(GicError::Dtb)?;
        let (gicr, gicr_len) = fdt.reg(COMPATIBLE, 1).map_err(GicError::Dtb)?;
        // SAFETY: per the caller, the DTB's GICD frame is mapped device memory.
        let gicd = unsafe { &*(gicd as usize as *const GicdRegs) };
        let pidr2 = gicd.pidr2.get();
        if !(3..=4).contains(&((pidr2 >> 4) & 0xf)) {
            return Err(GicError::NotGicV3 { pidr2 });
        }
        let affinity = mpidr_affinity();
        let mut at = gicr as usize;
        let end = at.saturating_add(gicr_len as usize);
        while at.saturating_add(2 * FRAME) <= end {
            // SAFETY: `at` lies in the DTB's redistributor region (mapped per
            // the caller); each redistributor starts with its RD_base frame.
            let rd = unsafe { &*(at as *const GicrRdRegs) };
            let typer = rd.typer.extract();
            if typer.read(GICR_TYPER::AFFINITY) as u32 == affinity {
                // SAFETY: the SGI_base frame follows RD_base (§12.10).
                let sgi = unsafe { &*((at + FRAME) as *const GicrSgiRegs) };
                let lines = 32 * ((gicd.typer.get() & 0x1f) + 1);
                return Ok(Self {
                    gicd,
                    rd,
                    sgi,
                    lines: lines.min(LAST_SPI + 1),
                });
            }
            if typer.is_set(GICR_TYPER::LAST) {
                break;
            }
            at += if typer.is_set(GICR_TYPER::VLPIS) {
                4 * FRAME
            } else {
                2 * FRAME
            };
        }
        Err(GicError::NoRedistributor { affinity })
    }

    /// INTID bits the GIC implements (GICD_TYPER.IDbits + 1).
    pub fn id_bits(&self) -> u32 {
        ((self.gicd.typer.get() >> 19) & 0x1f) + 1
    }

    /// Physical address of this CPU's redistributor (RD_base).
    pub fn rd_address(&self) -> u64 {
        self.rd as *const GicrRdRegs as u64
    }

    /// This CPU's processor number (GICR_TYPER bits 23:8), as an ITS with
    /// GITS_TYPER.PTA = 0 names redistributors.
    pub fn processor_number(&self) -> u32 {
        ((self.rd.typer.get() >> 8) & 0xffff) as u32
    }

    /// Turns LPIs on for this CPU (§5.1.1): the configuration and pending
    /// tables (register values as GICR_PROPBASER / GICR_PENDBASER take
    /// them), then GICR_CTLR.EnableLPIs.
    pub fn enable_lpis(&self, propbaser: u64, pendbaser: u64) {
        self.rd.propbaser.set(propbaser);
        self.rd.pendbaser.set(pendbaser);
        self.rd.ctlr.set(self.rd.ctlr.get() | 1);
    }

    /// The architecture revision (GICD_PIDR2.ArchRev: 3 or 4).
    pub fn arch_rev(&self) -> u32 {
        (self.gicd.pidr2.get() >> 4) & 0xf
    }

    fn wait_rwp(&self) -> Result<(), GicError> {
        for _ in 0..POLL_BUDGET {
            if !self.gicd.ctlr.is_set(GICD_CTLR::RWP) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(GicError::Timeout("GICD_CTLR.RWP"))
    }

    /// Brings the GIC up (§4.1 / the GICv3 software overview's order):
    /// distributor off, affinity routing on, every SPI disabled, not
    /// pending, Group 1, default priority, routed to this CPU; distributor
    /// on for Group 1; this CPU's redistributor awake with SGIs/PPIs
    /// disabled; then the CPU interface (system registers, priority mask
    /// open, Group 1 on). IRQs stay masked in PSTATE until a caller
    /// unmasks them.
    pub fn init(&self) -> Result<(), GicError> {
        let d = self.gicd;
        d.ctlr.set(0);
        self.wait_rwp()?;
        d.ctlr.write(GICD_CTLR::ARE::SET);
        self.wait_rwp()?;
        let route = mpidr_affinity_route();
        for reg in FIRST_SPI / 32..self.lines / 32 {
            let i = reg as usize;
            if let (Some(ice), Some(icp), Some(ica), Some(grp)) = (
                d.icenabler.get(i),
                d.icpendr.get(i),
                d.icactiver.get(i),
                d.igroupr.get(i),
            ) {
                ice.set(u32::MAX);
                icp.set(u32::MAX);
                ica.set(u32::MAX);
                grp.set(u32::MAX);
            }
        }
        self.wait_rwp()?;
        let prio = u32::from_ne_bytes([DEFAULT_PRIORITY; 4]);
        for intid in FIRST_SPI..self.lines {
            if intid % 4 == 0
                && let Some(p) = d.ipriorityr.get(intid as usize / 4)
            {
                p.set(prio);
            }
            if let Some(r) = d.irouter.get(intid as usize) {
                r.set(route);
            }
        }
        d.ctlr
            .write(GICD_CTLR::ARE::SET + GICD_CTLR::ENABLE_GRP1::SET);
        self.wait_rwp()?;

        // The redistributor: wake it, then SGIs/PPIs off, Group 1.
        self.rd.waker.modify(GICR_WAKER::PROCESSOR_SLEEP::CLEAR);
        let mut awake = false;
        for _ in 0..POLL_BUDGET {
            if !self.rd.waker.is_set(GICR_WAKER::CHILDREN_ASLEEP) {
                awake = true;
                break;
            }
            core::hint::spin_loop();
        }
        if !awake {
            return Err(GicError::Timeout("GICR_WAKER.ChildrenAsleep"));
        }
        self.sgi.icenabler0.set(u32::MAX);
        self.sgi.icpendr0.set(u32::MAX);
        self.sgi.igroupr0.set(u32::MAX);
        for p in &self.sgi.ipriorityr {
            p.set(prio);
        }

        cpu_interface_init();
        Ok(())
    }

    fn check_spi(&self, intid: u32) -> Result<(usize, u32), GicError> {
        if !(FIRST_SPI..self.lines).contains(&intid) {
            return Err(GicError::BadIntid(intid));
        }
        Ok(((intid / 32) as usize, 1 << (intid % 32)))
    }

    /// Sets an SPI's trigger (edge or level), priority (lower is more
    /// urgent; the CPU interface implements at least the upper 5 bits) and
    /// Group 1 routing to this CPU. Leaves its enable alone.
    pub fn configure_spi(&self, intid: u32, edge: bool, priority: u8) -> Result<(), GicError> {
        let (reg, bit) = self.check_spi(intid)?;
        let d = self.gicd;
        let cfg = d
            .icfgr
            .get(intid as usize / 16)
            .ok_or(GicError::BadIntid(intid))?;
        let shift = 2 * (intid % 16) + 1;
        let v = cfg.get() & !(1 << shift);
        cfg.set(if edge { v | (1 << shift) } else { v });
        let p = d
            .ipriorityr
            .get(intid as usize / 4)
            .ok_or(GicError::BadIntid(intid))?;
        let shift = 8 * (intid % 4);
        p.set((p.get() & !(0xff << shift)) | (u32::from(priority) << shift));
        if let Some(g) = d.igroupr.get(reg) {
            g.set(g.get() | bit);
        }
        if let Some(r) = d.irouter.get(intid as usize) {
            r.set(mpidr_affinity_route());
        }
        Ok(())
    }

    /// Lets the distributor forward `intid` (GICD_ISENABLER).
    pub fn enable_spi(&self, intid: u32) -> Result<(), GicError> {
        let (reg, bit) = self.check_spi(intid)?;
        if let Some(r) = self.gicd.isenabler.get(reg) {
            r.set(bit);
        }
        Ok(())
    }

    /// Stops forwarding `intid` and clears a pending edge (GICD_ICENABLER,
    /// GICD_ICPENDR), waiting for the disable to take effect.
    pub fn disable_spi(&self, intid: u32) -> Result<(), GicError> {
        let (reg, bit) = self.check_spi(intid)?;
        if let Some(r) = self.gicd.icenabler.get(reg) {
            r.set(bit);
        }
        self.wait_rwp()?;
        if let Some(r) = self.gicd.icpendr.get(reg) {
            r.set(bit);
        }
        Ok(())
    }

    /// Whether `intid` is pending at the distributor (GICD_ISPENDR).
    pub fn spi_pending(&self, intid: u32) -> Result<bool, GicError> {
        let (reg, bit) = self.check_spi(intid)?;
        Ok(self
            .gicd
            .ispendr
            .get(reg)
            .is_some_and(|r| r.get() & bit != 0))
    }
}

/// Aff3.Aff2.Aff1.Aff0 of this CPU, as GICR_TYPER.Affinity_Value holds it.
fn mpidr_affinity() -> u32 {
    let mpidr = mpidr();
    (((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff)) as u32
}

/// This CPU's affinity as GICD_IROUTER wants it (Aff3 at bits 39:32,
/// Aff2.Aff1.Aff0 at 23:0; Interrupt_Routing_Mode 0: this PE only).
fn mpidr_affinity_route() -> u64 {
    mpidr() & 0xff_00ff_ffff
}

fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effects.
    unsafe { asm!("mrs {}, mpidr_el1", out(reg) v, options(nomem, nostack)) };
    v
}

/// The CPU interface (§12.2): system register access on (ICC_SRE_EL2.SRE
/// and .Enable at EL2, ICC_SRE_EL1.SRE at EL1), physical IRQs taken to EL2
/// when running there (HCR_EL2.IMO: with IMO = 0 an IRQ would target EL1
/// and never be taken at EL2), every priority let through
/// (ICC_PMR_EL1 = 0xff), no preemption grouping (ICC_BPR1_EL1 = 0), EOI
/// both drops priority and deactivates (ICC_CTLR_EL1.EOImode = 0), and
/// Group 1 enabled (ICC_IGRPEN1_EL1).
fn cpu_interface_init() {
    if current_el() == 2 {
        // SAFETY: at EL2, ICC_SRE_EL2 (SRE bit 0, Enable bit 3) only
        // selects system-register access to the CPU interface; HCR_EL2.IMO
        // (bit 4) only routes physical IRQs to EL2. Nothing runs at EL1.
        unsafe {
            asm!(
                "mrs {t}, icc_sre_el2",
                "orr {t}, {t}, #0x1",
                "orr {t}, {t}, #0x8",
                "msr icc_sre_el2, {t}",
                "isb",
                "mrs {t}, hcr_el2",
                "orr {t}, {t}, #0x10",
                "msr hcr_el2, {t}",
                "isb",
                t = out(reg) _,
                options(nomem, nostack)
            );
        }
    } else {
        // SAFETY: at EL1, ICC_SRE_EL1.SRE (bit 0) selects system-register
        // access to the CPU interface.
        unsafe {
            asm!(
                "mrs {t}, icc_sre_el1",
                "orr {t}, {t}, #0x1",
                "msr icc_sre_el1, {t}",
                "isb",
                t = out(reg) _,
                options(nomem, nostack)
            );
        }
    }
    // SAFETY: with system-register access on, these configure only this
    // CPU's interface; IRQs are still masked in PSTATE.
    unsafe {
        asm!(
            "msr icc_pmr_el1, {pmr}",
            "msr icc_bpr1_el1, xzr",
            "mrs {t}, icc_ctlr_el1",
            "bic {t}, {t}, #0x2",
            "msr icc_ctlr_el1, {t}",
            "mov {t}, #1",
            "msr icc_igrpen1_el1, {t}",
            "isb",
            pmr = in(reg) 0xffu64,
            t = out(reg) _,
            options(nomem, nostack)
        );
    }
}
