//! A driver for edu's DMA engine written against dma-api alone: every byte
//! the device moves goes through memory a `dma_api::DeviceDma` handed out
//! (a `ContiguousArray` the device writes, a `StreamingMap` of the caller's
//! bytes the device reads). It knows nothing of IOMMUs: whatever `DmaOp`
//! the `DeviceDma` carries decides what the device may reach.
//!
//! edu's registers (QEMU docs/specs/edu.rst): DMA source 0x80, destination
//! 0x88, count 0x90, command 0x98 (bit 0 start, cleared when done; bit 1
//! direction, 1 = device → RAM); the device buffer is at 0x40000.

use dma_api::{ContiguousArray, DeviceDma, DmaAddr, DmaDirection, DmaError};

/// Device-side address of edu's 4 KiB buffer.
const BUF_BASE: u64 = 0x4_0000;
const BUF_SIZE: usize = 4096;
const SRC: usize = 0x80;
const DST: usize = 0x88;
const COUNT: usize = 0x90;
const CMD: usize = 0x98;
const CMD_START: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
/// Polls of the command register before a DMA counts as lost (a DMA takes
/// a 100 ms virtual timer; far fewer polls under `-icount`).
const POLLS: u32 = 10_000_000;

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EduDmaError {
    /// dma-api refused the buffer.
    Dma(DmaError),
    /// The range is not inside the device buffer, or empty.
    OutOfBuffer,
    /// The engine did not finish within the poll budget.
    Timeout,
    /// A DMA is still running.
    Busy,
}

impl core::fmt::Display for EduDmaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Dma(e) => write!(f, "dma-api: {e}"),
            Self::OutOfBuffer => f.write_str("range outside edu's 4 KiB buffer"),
            Self::Timeout => f.write_str("edu DMA did not finish"),
            Self::Busy => f.write_str("edu DMA still running"),
        }
    }
}

impl From<DmaError> for EduDmaError {
    fn from(e: DmaError) -> Self {
        Self::Dma(e)
    }
}

/// One edu function, its DMA memory from `dma`.
pub struct EduDma {
    bar0: usize,
    dma: DeviceDma,
}

impl EduDma {
    /// The edu whose BAR 0 is at `bar0`, with DMA memory from `dma`.
    ///
    /// # Safety
    ///
    /// `bar0` must be the identity-mapped BAR 0 of an enabled edu with bus
    /// mastering on, driven by nothing else meanwhile.
    pub unsafe fn new(bar0: u64, dma: DeviceDma) -> Self {
        Self {
            bar0: bar0 as usize,
            dma,
        }
    }

    fn reg(&self, off: usize) -> *mut u64 {
        (self.bar0 + off) as *mut u64
    }

    fn read(&self, off: usize) -> u64 {
        // SAFETY: a register inside BAR 0 (per `new`).
        unsafe { self.reg(off).read_volatile() }
    }

    fn write(&self, off: usize, v: u64) {
        // SAFETY: as in `read`.
        unsafe { self.reg(off).write_volatile(v) }
    }

    /// Copies `data` into the device buffer at `dev_off`, the device reading
    /// it from a streaming mapping of `data`.
    pub fn write_buffer(&self, dev_off: usize, data: &mut [u8]) -> Result<(), EduDmaError> {
        let len = fits(dev_off, data.len())?;
        let map = self
            .dma
            .map_streaming_slice_for_device(data, 1, DmaDirection::ToDevice)?;
        let r = self.run(map.dma_addr().as_u64(), BUF_BASE + dev_off as u64, len, 0);
        drop(map);
        r
    }

    /// A fresh buffer of `len` bytes that the device fills from its buffer
    /// at `dev_off`.
    pub fn read_buffer(
        &self,
        dev_off: usize,
        len: usize,
    ) -> Result<ContiguousArray<u8>, EduDmaError> {
        let n = fits(dev_off, len)?;
        let buf = self
            .dma
            .contiguous_array_zero::<u8>(len, DmaDirection::FromDevice)?;
        buf.prepare_for_device(0..len);
        self.run(
            BUF_BASE + dev_off as u64,
            buf.dma_addr().as_u64(),
            n,
            CMD_TO_RAM,
        )?;
        buf.complete_for_cpu(0..len);
        Ok(buf)
    }

    /// Has the device write `len` bytes of its buffer to `dma` — an address
    /// a dma-api buffer had, which the caller says is still the device's. A
    /// driver that kept the address of a buffer it released calls this.
    pub fn write_to(&self, dma: DmaAddr, dev_off: usize, len: usize) -> Result<(), EduDmaError> {
        let n = fits(dev_off, len)?;
        self.run(BUF_BASE + dev_off as u64, dma.as_u64(), n, CMD_TO_RAM)
    }

    fn run(&self, src: u64, dst: u64, count: u64, dir: u64) -> Result<(), EduDmaError> {
        if self.read(CMD) & CMD_START != 0 {
            return Err(EduDmaError::Busy);
        }
        self.write(SRC, src);
        self.write(DST, dst);
        self.write(COUNT, count);
        self.write(CMD, CMD_START | dir);
        for _ in 0..POLLS {
            if self.read(CMD) & CMD_START == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(EduDmaError::Timeout)
    }
}

/// `len` as a DMA count when `[off, off + len)` is a non-empty part of the
/// device buffer.
fn fits(off: usize, len: usize) -> Result<u64, EduDmaError> {
    match off.checked_add(len) {
        Some(end) if len > 0 && end <= BUF_SIZE => Ok(len as u64),
        _ => Err(EduDmaError::OutOfBuffer),
    }
}
