//! QEMU's `edu` educational PCI device (QEMU docs/specs/edu.rst): a DMA engine
//! between RAM and a 4 KiB buffer inside the device.
//!
//! The buffer is reachable only by DMA (BAR 0 does not expose it). A DMA that
//! the IOMMU faults completes all the same: edu has no error status, so a test
//! checks memory and the IOMMU's fault records, never edu.
//!
//! How long a DMA may take is the board's to say ([`DmaBudget`]): a timer
//! where the architecture has a cheap one, a number of polls otherwise.

use bare_iommu::DeviceId;
use core::fmt;
use core::sync::atomic::{Ordering, fence};
use tock_registers::fields::FieldValue;
use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs};

/// PCI vendor ID of edu.
pub const VENDOR: u16 = 0x1234;
/// PCI device ID of edu.
pub const DEVICE: u16 = 0x11e8;
/// Device-side address of the internal buffer.
pub const BUF_BASE: u64 = 0x4_0000;
/// Size of the internal buffer.
pub const BUF_SIZE: u32 = 4096;
/// `ident` register: major/minor version in bits 31:16, 0xed in bits 7:0.
const IDENT_MAGIC: u32 = 0xed;
/// What the liveness check writes (edu returns its complement).
const LIVENESS_PROBE: u32 = 0x5a5a_0f0f;

register_bitfields! [u64,
    /// DMA command register (edu.rst, offset 0x98).
    DMA_CMD [
        /// Start; edu clears it when the transfer is done.
        START OFFSET(0) NUMBITS(1) [],
        /// Direction.
        DIRECTION OFFSET(1) NUMBITS(1) [
            RamToEdu = 0,
            EduToRam = 1
        ],
        /// Raise an interrupt when done.
        IRQ OFFSET(2) NUMBITS(1) []
    ]
];

register_structs! {
    /// edu BAR 0 (edu.rst, "MMIO area spec").
    EduRegs {
        (0x00 => id: ReadOnly<u32>),
        (0x04 => liveness: ReadWrite<u32>),
        (0x08 => _reserved0),
        (0x80 => dma_src: ReadWrite<u64>),
        (0x88 => dma_dst: ReadWrite<u64>),
        (0x90 => dma_count: ReadWrite<u64>),
        (0x98 => dma_cmd: ReadWrite<u64, DMA_CMD::Register>),
        (0xa0 => @END),
    }
}

/// How long to wait for a DMA before it counts as timed out. edu completes a
/// DMA on a 100 ms virtual timer.
#[derive(Clone, Copy)]
pub enum DmaBudget {
    /// This many polls of the command register.
    Polls(u32),
    /// Until the counter `now` has advanced by `ticks`.
    Ticks {
        /// A free-running counter (e.g. the Arm generic timer).
        now: fn() -> u64,
        /// How far it may advance.
        ticks: u64,
    },
}

/// What went wrong with an edu DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EduError {
    /// `[buf_off, buf_off + len)` is not inside the 4 KiB buffer, or `len` is 0.
    OutOfBuffer {
        /// Offset into the buffer.
        buf_off: u32,
        /// Length.
        len: u32,
    },
    /// A previous DMA is still running (edu ignores DMA registers meanwhile).
    Busy,
    /// The DMA did not complete within the budget.
    Timeout {
        /// Polls of the command register spent.
        polls: u32,
    },
    /// BAR 0 does not answer like an edu device.
    NotEdu {
        /// What its identification register read.
        ident: u32,
    },
}

impl fmt::Display for EduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfBuffer { buf_off, len } => write!(
                f,
                "edu buffer range {buf_off:#x}+{len:#x} outside 0..{BUF_SIZE:#x}"
            ),
            Self::Busy => write!(f, "edu DMA still running"),
            Self::Timeout { polls } => write!(f, "edu DMA timed out after {polls} polls"),
            Self::NotEdu { ident } => write!(f, "BAR0 ident {ident:#x} is not edu"),
        }
    }
}

/// One edu function with BAR 0 assigned and bus mastering on.
pub struct Edu {
    /// Its PCI identity: the SMMU StreamID / VT-d source-id.
    pub id: DeviceId,
    regs: &'static EduRegs,
    bar0: u64,
    budget: DmaBudget,
}

impl Edu {
    /// Wraps the edu whose BAR 0 is at CPU address `bar0`; each DMA may take
    /// `budget`.
    ///
    /// # Safety
    ///
    /// `bar0` must be the CPU address of an enabled edu BAR 0, identity
    /// mapped (or with the MMU off), used by nothing else.
    pub unsafe fn new(id: DeviceId, bar0: u64, budget: DmaBudget) -> Self {
        // SAFETY: per the caller, the BAR is mapped and ours; its registers
        // are only reached through volatile cells.
        let regs = unsafe { &*(bar0 as usize as *const EduRegs) };
        Self {
            id,
            regs,
            bar0,
            budget,
        }
    }

    /// CPU address of BAR 0.
    pub fn bar(&self) -> u64 {
        self.bar0
    }

    /// The identification register: `0xRRrr00ed`, major.minor version in the top bytes.
    pub fn ident(&self) -> u32 {
        self.regs.id.get()
    }

    /// Whether the card answers: it returns the inverse of what was written.
    pub fn alive(&self) -> bool {
        self.regs.liveness.set(LIVENESS_PROBE);
        self.regs.liveness.get() == !LIVENESS_PROBE
    }

    /// Checks that BAR 0 is an edu: the ident magic, and a live liveness register.
    pub fn verify(&self) -> Result<(), EduError> {
        let ident = self.ident();
        if ident & 0xff != IDENT_MAGIC || !self.alive() {
            return Err(EduError::NotEdu { ident });
        }
        Ok(())
    }

    /// Copies `len` bytes from the buffer at `buf_off` to `dma_addr` (an IOVA
    /// when the IOMMU translates) and waits for the device to finish.
    pub fn dma_to_ram(&self, dma_addr: u64, buf_off: u32, len: u32) -> Result<(), EduError> {
        let src = Self::buf_addr(buf_off, len)?;
        self.run(src, dma_addr, len, DMA_CMD::DIRECTION::EduToRam)
    }

    /// Copies `len` bytes from `dma_addr` into the buffer at `buf_off` and
    /// waits for the device to finish.
    pub fn dma_from_ram(&self, dma_addr: u64, buf_off: u32, len: u32) -> Result<(), EduError> {
        let dst = Self::buf_addr(buf_off, len)?;
        self.run(dma_addr, dst, len, DMA_CMD::DIRECTION::RamToEdu)
    }

    /// Whether a DMA is running.
    pub fn busy(&self) -> bool {
        self.regs.dma_cmd.is_set(DMA_CMD::START)
    }

    /// Waits (bounded by the budget) until no DMA runs.
    pub fn wait_idle(&self) -> Result<(), EduError> {
        let start = match self.budget {
            DmaBudget::Ticks { now, .. } => now(),
            DmaBudget::Polls(_) => 0,
        };
        let mut polls: u32 = 0;
        while self.busy() {
            polls = polls.saturating_add(1);
            let spent = match self.budget {
                DmaBudget::Polls(max) => polls >= max,
                DmaBudget::Ticks { now, ticks } => now().wrapping_sub(start) >= ticks,
            };
            if spent {
                return Err(EduError::Timeout { polls });
            }
            core::hint::spin_loop();
        }
        // Order the CPU's later reads of what the device wrote after completion.
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn buf_addr(buf_off: u32, len: u32) -> Result<u64, EduError> {
        match buf_off.checked_add(len) {
            Some(end) if len > 0 && end <= BUF_SIZE => Ok(BUF_BASE + u64::from(buf_off)),
            _ => Err(EduError::OutOfBuffer { buf_off, len }),
        }
    }

    fn run(
        &self,
        src: u64,
        dst: u64,
        len: u32,
        dir: FieldValue<u64, DMA_CMD::Register>,
    ) -> Result<(), EduError> {
        if self.busy() {
            return Err(EduError::Busy);
        }
        // Order the CPU's earlier writes of what the device reads before the start.
        fence(Ordering::SeqCst);
        self.regs.dma_src.set(src);
        self.regs.dma_dst.set(dst);
        self.regs.dma_count.set(u64::from(len));
        self.regs.dma_cmd.write(DMA_CMD::START::SET + dir);
        self.wait_idle()
    }
}
