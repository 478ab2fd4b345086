//! What the bare-metal QEMU test images (`boards/qemu-virt`, `boards/qemu-q35`)
//! share, apart from anything architecture-specific:
//!
//! - [`harness`]: [`Fail`](harness::Fail), the `fail!` / `check!` /
//!   `check_eq!` / `narrate!` macros, [`OrFail`](harness::OrFail), and the
//!   runner that prints `PASS name` / `FAIL name: why` and the closing
//!   `N passed, M failed`;
//! - [`console`]: `print!` / `println!` over the byte output a board registers;
//! - [`edu`]: QEMU's edu DMA engine, the device every board test drives;
//! - [`fault_log`]: the IOMMU fault interrupt's log, reached through the
//!   crate's shared driver without spinning on its lock;
//! - [`ivshmem`]: the ivshmem-plain BAR that P2P tests DMA into;
//! - [`p2p`]: the P2P test bodies, over the board's IOMMU;
//! - [`pattern`]: the test pattern and the byte checks of lent memory;
//! - [`smp`]: one job on several CPUs at once (the board starts the CPUs);
//! - [`smp_dma`]: the several-CPU DMA workload over the board's IOMMU;
//! - [`stack_canary`]: a band at the bottom of each stack, checked after
//!   every test (the boards have no guard pages);
//! - [`virtio`]: a polled virtio-blk driver (virtio 1.x PCI transport);
//! - [`virtio_dma`]: the virtio-blk test bodies, over the board's IOMMU;
//! - [`virtio_drivers_dma`]: virtio-drivers' own `VirtIOBlk` through
//!   bare-iommu's virtio-drivers adapter.
//!
//! A board keeps its boot code, UART, PCI/ACPI/DTB discovery, exit path, lent
//! memory and IOMMU tests, and implements [`harness::Board`]:
//!
//! ```ignore
//! board_common::console::init(uart::put);
//! let mut ctx = Ctx { /* edu, memory, ... */ };
//! board_common::harness::run(&mut ctx, tests::TESTS)
//! ```

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![allow(
    clippy::result_large_err,
    reason = "tests fail with a fixed 200-byte message, on the cold path"
)]

#[macro_use]
pub mod console;
#[macro_use]
pub mod harness;
pub mod bridge;
pub mod edu;
pub mod fault_log;
pub mod forgetful;
pub mod ivshmem;
pub mod p2p;
pub mod pattern;
pub mod smp;
pub mod smp_dma;
pub mod stack_canary;
pub mod virtio;
pub mod virtio_dma;
pub mod virtio_drivers_dma;
