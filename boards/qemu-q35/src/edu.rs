//! The edu devices of this board: `board_common::edu` plus a bounce page, so
//! a test can put bytes into the device buffer and read them out.
//!
//! The device buffer is not reachable through BAR0; only the DMA engine moves
//! bytes in and out of it. [`Edu::write_buf`] / [`Edu::read_buf`] therefore
//! go through a bounce page in RAM that the device reaches at
//! [`Edu::bounce_dma`] — its physical address by default, which is right while
//! translation is off (or for an identity/pass-through mapping). With
//! translation on, map [`Edu::bounce_page`] somewhere and call
//! [`Edu::set_bounce_dma`] first.

use crate::memory::BoardMemory;
use bare_iommu::{DeviceId, PhysAddr};
use board_common::edu::{DmaBudget, EduError};
use core::ops::Deref;

/// Status polls before a DMA counts as timed out. A DMA completes on a 100 ms
/// virtual timer; under `-icount shift=10` that is well under 100 000 polls.
const DMA_POLL_BUDGET: u32 = 10_000_000;

/// What went wrong moving bytes through the bounce page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceError {
    /// The DMA between the bounce page and the device buffer.
    Edu(EduError),
    /// The data does not fit the bounce page (or the device buffer).
    BounceTooSmall {
        /// Bytes asked for.
        len: usize,
    },
}

impl From<EduError> for BounceError {
    fn from(e: EduError) -> Self {
        Self::Edu(e)
    }
}

/// One edu function and its bounce page. Derefs to the device.
pub struct Edu {
    dev: board_common::edu::Edu,
    bounce: PhysAddr,
    bounce_dma: u64,
    mem: &'static BoardMemory,
}

impl Deref for Edu {
    type Target = board_common::edu::Edu;

    fn deref(&self) -> &Self::Target {
        &self.dev
    }
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
        // SAFETY: the caller guarantees BAR0 is mapped and ours.
        let dev =
            unsafe { board_common::edu::Edu::new(id, bar, DmaBudget::Polls(DMA_POLL_BUDGET)) };
        dev.verify()?;
        Ok(Self {
            dev,
            bounce,
            bounce_dma: bounce.0,
            mem,
        })
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

    /// Puts `data` into the device buffer at `off`, by DMA from the bounce page.
    pub fn write_buf(&self, off: u32, data: &[u8]) -> Result<(), BounceError> {
        let too_small = BounceError::BounceTooSmall { len: data.len() };
        let len = u32::try_from(data.len()).map_err(|_| too_small)?;
        self.mem.write(self.bounce, data).map_err(|_| too_small)?;
        Ok(self.dma_from_ram(self.bounce_dma, off, len)?)
    }

    /// Reads the device buffer at `off` into `out`, by DMA to the bounce page.
    pub fn read_buf(&self, off: u32, out: &mut [u8]) -> Result<(), BounceError> {
        let too_small = BounceError::BounceTooSmall { len: out.len() };
        let len = u32::try_from(out.len()).map_err(|_| too_small)?;
        self.dma_to_ram(self.bounce_dma, off, len)?;
        self.mem.read(self.bounce, out).map_err(|_| too_small)
    }
}
