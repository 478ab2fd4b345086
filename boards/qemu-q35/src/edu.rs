//! QEMU's `edu` teaching device: a DMA engine between RAM and a 4 KiB buffer
//! inside the device (QEMU docs/specs/edu.rst).
//!
//! The device buffer is not reachable through BAR0; only the DMA engine moves
//! bytes in and out of it. [`Edu::write_buf`] / [`Edu::read_buf`] therefore
//! go through a bounce page in RAM that the device reaches at
//! [`Edu::bounce_dma`] — its physical address by default, which is right while
//! translation is off (or for an identity/pass-through mapping). With
//! translation on, map [`Edu::bounce_page`] somewhere and call
//! [`Edu::set_bounce_dma`] first.
//!
//! The device reports no error when its DMA faults: check memory and the
//! IOMMU's fault records.

use crate::memory::BoardMemory;
use bare_iommu::{DeviceId, PhysAddr};
use core::fmt;
use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs};

/// Device-internal address of the DMA buffer.
pub const EDU_BUF_ADDR: u64 = 0x40000;
/// Size of the DMA buffer.
pub const EDU_BUF_LEN: u32 = 4096;
/// Status polls before a DMA counts as timed out. A DMA completes on a 100 ms
/// virtual timer; under `-icount shift=10` that is well under 100 000 polls.
const DMA_POLL_BUDGET: u32 = 10_000_000;
/// `ident` register: major/minor version in bits 31:16, 0xed in bits 7:0.
const IDENT_MAGIC: u32 = 0xed;

register_bitfields! [u64,
    /// DMA command register.
    DMA_CMD [
        /// Start a transfer; reads 1 until it completes.
        START OFFSET(0) NUMBITS(1) [],
        /// 1: device buffer → RAM, 0: RAM → device buffer.
        TO_RAM OFFSET(1) NUMBITS(1) [],
        /// Raise an interrupt on completion.
        IRQ OFFSET(2) NUMBITS(1) []
    ]
];

register_structs! {
    /// BAR0 registers.
    EduRegs {
        (0x00 => ident: ReadOnly<u32>),
        (0x04 => liveness: ReadWrite<u32>),
        (0x08 => _reserved0),
        (0x80 => dma_src: ReadWrite<u64>),
        (0x88 => dma_dst: ReadWrite<u64>),
        (0x90 => dma_count: ReadWrite<u64>),
        (0x98 => dma_cmd: ReadWrite<u64, DMA_CMD::Register>),
        (0xa0 => @END),
    }
}

/// A DMA the device could not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EduError {
    /// `[off, off + len)` does not fit the 4 KiB device buffer (QEMU would abort).
    OutOfBuffer { off: u32, len: u32 },
    /// A previous DMA is still running.
    Busy,
    /// The DMA did not complete within the poll budget.
    Timeout,
    /// BAR0 does not answer like an edu device.
    NotEdu { ident: u32 },
    /// The bounce page is too small or the data does not fit.
    BounceTooSmall { len: usize },
}

impl fmt::Display for EduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfBuffer { off, len } => {
                write!(f, "edu buffer range {off:#x}+{len:#x} exceeds 4 KiB")
            }
            Self::Busy => write!(f, "edu DMA still running"),
            Self::Timeout => write!(f, "edu DMA did not complete"),
            Self::NotEdu { ident } => write!(f, "BAR0 ident {ident:#x} is not edu"),
            Self::BounceTooSmall { len } => write!(f, "{len} bytes do not fit the bounce page"),
        }
    }
}

/// One edu function.
pub struct Edu {
    /// Its PCI identity (requester ID = VT-d source-id).
    pub id: DeviceId,
    regs: &'static EduRegs,
    bar: u64,
    bounce: PhysAddr,
    bounce_dma: u64,
    mem: &'static BoardMemory,
}

#[allow(dead_code, reason = "bounce accessors are for tests that translate")]
impl Edu {
    /// The device whose BAR0 is at `bar` (memory decode and bus master on),
    /// with a 4 KiB `bounce` page of `mem`'s DMA pool.
    ///
    /// # Safety
    ///
    /// `bar` must be the identity-mapped BAR0 of an edu function, used by
    /// nothing else; `bounce` a page nothing else uses.
    pub unsafe fn new(
        id: DeviceId,
        bar: u64,
        bounce: PhysAddr,
        mem: &'static BoardMemory,
    ) -> Result<Self, EduError> {
        // SAFETY: the caller guarantees BAR0 is mapped and ours; EduRegs is the
        // register layout of that BAR.
        let regs = unsafe { &*(bar as usize as *const EduRegs) };
        let ident = regs.ident.get();
        if ident & 0xff != IDENT_MAGIC {
            return Err(EduError::NotEdu { ident });
        }
        // The liveness register returns the complement of what was written.
        regs.liveness.set(0x1234_5678);
        if regs.liveness.get() != !0x1234_5678 {
            return Err(EduError::NotEdu { ident });
        }
        Ok(Self {
            id,
            regs,
            bar,
            bounce,
            bounce_dma: bounce.0,
            mem,
        })
    }

    /// Physical address of BAR0.
    pub fn bar(&self) -> u64 {
        self.bar
    }

    /// The bounce page used by `write_buf` / `read_buf`.
    pub fn bounce_page(&self) -> PhysAddr {
        self.bounce
    }

    /// The DMA address at which the device reaches the bounce page.
    pub fn bounce_dma(&self) -> u64 {
        self.bounce_dma
    }

    /// Tells the device where the bounce page is mapped (IOVA), or its
    /// physical address again with `set_bounce_dma(edu.bounce_page().0)`.
    pub fn set_bounce_dma(&mut self, dma: u64) {
        self.bounce_dma = dma;
    }

    fn check_range(off: u32, len: u32) -> Result<(), EduError> {
        match off.checked_add(len) {
            Some(end) if end <= EDU_BUF_LEN => Ok(()),
            _ => Err(EduError::OutOfBuffer { off, len }),
        }
    }

    fn run(&self, src: u64, dst: u64, len: u32, to_ram: bool) -> Result<(), EduError> {
        if self.regs.dma_cmd.is_set(DMA_CMD::START) {
            return Err(EduError::Busy);
        }
        self.regs.dma_src.set(src);
        self.regs.dma_dst.set(dst);
        self.regs.dma_count.set(u64::from(len));
        let dir = if to_ram {
            DMA_CMD::TO_RAM::SET
        } else {
            DMA_CMD::TO_RAM::CLEAR
        };
        self.regs.dma_cmd.write(DMA_CMD::START::SET + dir);
        for _ in 0..DMA_POLL_BUDGET {
            if !self.regs.dma_cmd.is_set(DMA_CMD::START) {
                // Order later CPU reads of the buffer after the completion.
                core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(EduError::Timeout)
    }

    /// Device buffer `[buf_off, buf_off + len)` → bus address `dma_addr`;
    /// waits (bounded) for completion.
    pub fn dma_to_ram(&self, dma_addr: u64, buf_off: u32, len: u32) -> Result<(), EduError> {
        Self::check_range(buf_off, len)?;
        self.run(EDU_BUF_ADDR + u64::from(buf_off), dma_addr, len, true)
    }

    /// Bus address `dma_addr` → device buffer `[buf_off, buf_off + len)`;
    /// waits (bounded) for completion.
    pub fn dma_from_ram(&self, dma_addr: u64, buf_off: u32, len: u32) -> Result<(), EduError> {
        Self::check_range(buf_off, len)?;
        core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
        self.run(dma_addr, EDU_BUF_ADDR + u64::from(buf_off), len, false)
    }

    /// Puts `data` into the device buffer at `off`, by DMA from the bounce page.
    pub fn write_buf(&self, off: u32, data: &[u8]) -> Result<(), EduError> {
        let len =
            u32::try_from(data.len()).map_err(|_| EduError::BounceTooSmall { len: data.len() })?;
        Self::check_range(off, len)?;
        self.mem
            .write(self.bounce, data)
            .map_err(|_| EduError::BounceTooSmall { len: data.len() })?;
        self.dma_from_ram(self.bounce_dma, off, len)
    }

    /// Reads the device buffer at `off` into `out`, by DMA to the bounce page.
    pub fn read_buf(&self, off: u32, out: &mut [u8]) -> Result<(), EduError> {
        let len =
            u32::try_from(out.len()).map_err(|_| EduError::BounceTooSmall { len: out.len() })?;
        Self::check_range(off, len)?;
        self.dma_to_ram(self.bounce_dma, off, len)?;
        self.mem
            .read(self.bounce, out)
            .map_err(|_| EduError::BounceTooSmall { len: out.len() })
    }
}
