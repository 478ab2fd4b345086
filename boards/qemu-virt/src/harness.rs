//! What a test gets ([`Ctx`]) and what the runner of `board_common::harness`
//! needs from this board ([`Board`]): after each test, no edu DMA may still
//! run and every DMA buffer page goes back; the exit is semihosting.

use board_common::harness::Board;
pub use board_common::harness::{Fail, OrFail, fail_msg};

use crate::edu::Edu;
use crate::ivshmem::Ivshmem;
use crate::memory::BoardMemory;

/// Whether this image narrates (cargo feature `demo`).
pub const DEMO: bool = cfg!(feature = "demo");

/// A board test.
pub type TestFn = board_common::harness::TestFn<Ctx>;

/// Everything a test may use.
pub struct Ctx {
    /// The board's memory: table lender, DMA buffer pages, block region.
    pub mem: &'static BoardMemory,
    /// The two edu devices: 00:05.0 (StreamID 0x28) and 00:06.0 (StreamID 0x30).
    pub edu: [Edu; 2],
    /// The edu behind the PCIe root port at 00:09.0: 01:00.0 (StreamID
    /// 0x100), or why it is missing.
    pub bridged: Result<Edu, Fail>,
    /// The ivshmem-plain at 00:07.0 (P2P provider), or why it is missing.
    pub ivshmem: Result<Ivshmem, Fail>,
    /// The virtio-blk at 00:08.0 (StreamID 0x40), or why it is missing.
    pub virtio: Result<Virtio, Fail>,
    /// Base of the SMMUv3 register page 0 (page 1 at + 0x10000).
    pub smmu_base: usize,
    /// The GICv3 and the SMMU's wired interrupts, or why they are missing.
    pub irqs: Result<crate::Irqs, Fail>,
    /// Whether this is the demo image (narration on).
    pub demo: bool,
}

/// The virtio-blk function, as the board set it up.
pub use board_common::virtio::VirtioFunction as Virtio;

impl Board for Ctx {
    fn demo(&self) -> bool {
        self.demo
    }

    /// Leaves no DMA running into the next test and takes back every DMA page.
    fn after_test(&mut self) -> Result<(), Fail> {
        let idle = self.edu.iter().try_for_each(|edu| {
            edu.wait_idle()
                .map_err(|e| fail_msg(format_args!("{} after the test: {e}", edu.id)))
        });
        self.mem.reset_dma_pages();
        idle
    }

    fn table_pages_in_use(&self) -> Option<usize> {
        Some(self.mem.table_pages_in_use())
    }

    fn exit(code: u32) -> ! {
        crate::exit::exit(code)
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    board_common::harness::panicked::<Ctx>(info, crate::tests::TESTS)
}
