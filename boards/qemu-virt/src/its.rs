//! A minimal GICv3 ITS driver (Arm IHI 0069, chapter 5 and §12.19) for
//! QEMU `virt,gic-version=3`: LPIs on the boot CPU's redistributor, flat
//! device and collection tables, the command queue, and MAPD / MAPC / MAPTI
//! so that one device's MSI (a write of an EventID to `GITS_TRANSLATER`)
//! becomes one LPI. Enough to show an MSI travelling through the SMMU.
//!
//! Tables live in this image's .bss (MMU off: accesses are Device memory,
//! QEMU models no caches), so nothing is cleaned.

use core::ptr::{addr_of, addr_of_mut};

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

use crate::fdt::Fdt;
use crate::gic::Gic;

/// DTB `compatible` of an ITS.
const COMPATIBLE: &str = "arm,gic-v3-its";
/// Offset of `GITS_TRANSLATER` in the ITS's translation frame (§12.19.14).
pub const TRANSLATER: u64 = 0x1_0040;
/// First LPI INTID.
pub const FIRST_LPI: u32 = 8192;
/// INTID bits the LPI tables cover (IDbits + 1): INTIDs below 2^14, so
/// LPIs 8192..16383.
const ID_BITS: u32 = 14;
/// Polls of GITS_CREADR before a command counts as lost.
const POLL_BUDGET: u32 = 1_000_000;

register_structs! {
    /// The ITS control frame (§12.19), 64 KiB.
    ItsRegs {
        (0x0000 => ctlr: ReadWrite<u32>),
        (0x0004 => iidr: ReadOnly<u32>),
        (0x0008 => typer: ReadOnly<u64>),
        (0x0010 => _reserved0),
        (0x0080 => cbaser: ReadWrite<u64>),
        (0x0088 => cwriter: ReadWrite<u64>),
        (0x0090 => creadr: ReadOnly<u64>),
        (0x0098 => _reserved1),
        (0x0100 => baser: [ReadWrite<u64>; 8]),
        (0x0140 => _reserved2),
        (0x10040 => translater: WriteOnly<u32>),
        (0x10044 => _reserved3),
        (0x10048 => @END),
    }
}

#[repr(C, align(65536))]
struct Aligned64K<const N: usize>([u8; N]);
#[repr(C, align(4096))]
struct Aligned4K<const N: usize>([u8; N]);

/// LPI configuration table: one byte per LPI (priority | enable).
static mut PROP: Aligned4K<{ 1 << (ID_BITS - 3) }> = Aligned4K([0; 1 << (ID_BITS - 3)]);
/// LPI pending table: one bit per INTID, 64 KiB aligned.
static mut PEND: Aligned64K<{ 1 << (ID_BITS - 3) }> = Aligned64K([0; 1 << (ID_BITS - 3)]);
/// Device table, collection table (one 4 KiB page each), command queue.
static mut DEVICES: Aligned4K<4096> = Aligned4K([0; 4096]);
static mut COLLECTIONS: Aligned4K<4096> = Aligned4K([0; 4096]);
static mut QUEUE: Aligned4K<4096> = Aligned4K([0; 4096]);
/// Interrupt translation tables, one per mapped device (256-byte aligned).
static mut ITT: Aligned4K<4096> = Aligned4K([0; 4096]);
/// Bytes of [`ITT`] one device gets.
const ITT_SLOT: usize = 256;

/// Why the ITS could not be brought up or a command did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItsError {
    /// No `arm,gic-v3-its` in the DTB (run with `-machine virt,gic-version=3`).
    NoIts,
    /// The GIC implements fewer INTID bits than the LPI tables need.
    NoLpis,
    /// A GITS_BASER of the needed type is missing.
    NoTable(&'static str),
    /// A command did not complete.
    Timeout,
    /// No more ITT slots or a DeviceID the flat table cannot hold.
    Full,
}

/// The ITS, enabled, with one collection mapped to this CPU.
pub struct Its {
    regs: &'static ItsRegs,
    base: u64,
    write: usize,
    /// RDbase field of MAPC / SYNC (a processor number or an address >> 16).
    rdbase: u64,
    itt_used: usize,
}

impl Its {
    /// Finds the ITS in the DTB and brings up LPIs on this CPU's
    /// redistributor and the ITS (tables, command queue, collection 0 →
    /// this CPU).
    ///
    /// # Safety
    ///
    /// Call once; the ITS frame from the DTB is mapped (MMU off: identity)
    /// and nothing else drives it or the redistributor's LPI registers.
    pub unsafe fn init(fdt: &Fdt, gic: &Gic) -> Result<Self, ItsError> {
        let (base, _) = fdt
            .child_reg("arm,gic-v3", COMPATIBLE, 0)
            .map_err(|_| ItsError::NoIts)?;
        if gic.id_bits() < ID_BITS {
            return Err(ItsError::NoLpis);
        }
        // SAFETY: per the caller, the ITS frame is mapped device memory.
        let regs = unsafe { &*(base as usize as *const ItsRegs) };
        // LPIs on the redistributor: every LPI priority 0xa0, enabled.
        // SAFETY: the tables are this module's statics, used by nothing else.
        let (prop, pend) = unsafe {
            let prop = &mut *addr_of_mut!(PROP);
            prop.0.fill(0xa0 | 1);
            (addr_of!(PROP) as u64, addr_of!(PEND) as u64)
        };
        gic.enable_lpis(prop | u64::from(ID_BITS - 1), pend | 1 << 62);

        regs.ctlr.set(0);
        let mut devices = false;
        let mut collections = false;
        for b in &regs.baser {
            let v = b.get();
            let entry = ((v >> 48) & 0x1f) + 1;
            // Flat, 4 KiB pages, one page, valid (Type and Entry_Size kept).
            let keep = v & (0x7 << 56 | 0x1f << 48);
            match (v >> 56) & 7 {
                1 => {
                    b.set(keep | 1 << 63 | addr_of!(DEVICES) as u64);
                    devices = entry > 0;
                }
                4 => {
                    b.set(keep | 1 << 63 | addr_of!(COLLECTIONS) as u64);
                    collections = true;
                }
                _ => {}
            }
        }
        if !devices {
            return Err(ItsError::NoTable("device"));
        }
        if !collections {
            return Err(ItsError::NoTable("collection"));
        }
        regs.cbaser.set(1 << 63 | addr_of!(QUEUE) as u64);
        regs.cwriter.set(0);
        regs.ctlr.set(1);
        let rdbase = if regs.typer.get() & (1 << 19) != 0 {
            gic.rd_address() >> 16
        } else {
            u64::from(gic.processor_number())
        };
        let mut its = Self {
            regs,
            base,
            write: 0,
            rdbase,
            itt_used: 0,
        };
        // MAPC: collection 0 → this CPU.
        its.command([0x09, 0, 1 << 63 | rdbase << 16, 0])?;
        its.sync()?;
        Ok(its)
    }

    /// Physical address of `GITS_TRANSLATER`, the MSI doorbell.
    pub fn doorbell(&self) -> u64 {
        self.base + TRANSLATER
    }

    /// Maps (`device_id`, `event`) to LPI `lpi` on collection 0 (MAPD with
    /// a fresh ITT, MAPTI, INV, SYNC).
    pub fn map_event(&mut self, device_id: u32, event: u32, lpi: u32) -> Result<(), ItsError> {
        if device_id >= 4096 / 8 || self.itt_used + ITT_SLOT > 4096 {
            return Err(ItsError::Full);
        }
        let itt = addr_of!(ITT) as u64 + self.itt_used as u64;
        self.itt_used += ITT_SLOT;
        let dev = u64::from(device_id) << 32;
        // MAPD: 2^(Size + 1) EventIDs; Size = 3: 16 events.
        self.command([0x08 | dev, 3, 1 << 63 | itt, 0])?;
        // MAPTI: EventID → pINTID, collection 0.
        self.command([0x0a | dev, u64::from(event) | u64::from(lpi) << 32, 0, 0])?;
        // INV: the redistributor rereads the LPI's configuration.
        self.command([0x0c | dev, u64::from(event), 0, 0])?;
        self.sync()
    }

    fn sync(&mut self) -> Result<(), ItsError> {
        self.command([0x05, 0, self.rdbase << 16, 0])
    }

    /// Writes one command, advances GITS_CWRITER and waits until the ITS
    /// has read it (GITS_CREADR).
    fn command(&mut self, cmd: [u64; 4]) -> Result<(), ItsError> {
        // SAFETY: the queue is this module's static; the ITS reads a slot
        // only once CWRITER passes it.
        unsafe {
            let q = addr_of_mut!(QUEUE) as *mut u64;
            for (i, w) in cmd.iter().enumerate() {
                q.add(self.write / 8 + i).write_volatile(*w);
            }
        }
        self.write = (self.write + 32) % 4096;
        self.regs.cwriter.set(self.write as u64);
        for _ in 0..POLL_BUDGET {
            if self.regs.creadr.get() & 0xf_ffe0 == self.write as u64 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(ItsError::Timeout)
    }
}

/// The highest-priority pending Group 1 INTID of this CPU (ICC_HPPIR1_EL1;
/// 1023: none), IRQs may stay masked.
pub fn highest_pending() -> u32 {
    let v: u64;
    // SAFETY: reading ICC_HPPIR1_EL1 has no side effects.
    unsafe { core::arch::asm!("mrs {}, icc_hppir1_el1", out(reg) v, options(nomem, nostack)) };
    (v & 0xff_ffff) as u32
}

/// Acknowledges and ends the highest-priority pending Group 1 interrupt
/// (ICC_IAR1_EL1 / ICC_EOIR1_EL1) with IRQs masked; returns its INTID.
pub fn take() -> u32 {
    crate::irq::masked(|| {
        let v: u64;
        // SAFETY: acknowledges one interrupt of this CPU and ends it at once.
        unsafe {
            core::arch::asm!("mrs {}, icc_iar1_el1", "dsb sy", out(reg) v, options(nostack));
            let intid = v & 0xff_ffff;
            if !(1020..=1023).contains(&intid) {
                core::arch::asm!("msr icc_eoir1_el1, {}", "isb", in(reg) intid, options(nostack));
            }
        }
        (v & 0xff_ffff) as u32
    })
}
