//! What a test gets ([`Ctx`]) and what the runner of `board_common::harness`
//! needs from this board ([`Board`]): the `only=` filter of the command line,
//! a check that every table free matched an allocation, and the exit path.

use board_common::harness::Board;
pub use board_common::harness::{Fail, OrFail, fail_msg};

use crate::edu::Edu;
use crate::ivshmem::Ivshmem;
use crate::memory::BoardMemory;
use crate::pci::Ecam;
use core::fmt;

/// A board test.
pub type TestFn = board_common::harness::TestFn<Ctx>;

/// Everything a test may use.
pub struct Ctx {
    /// Lent memory: table pool (the `TableMemory` for the library), DMA pages,
    /// the superpage region, and byte helpers.
    pub mem: &'static BoardMemory,
    /// The two edu functions: 00:03.0 (RID 0x18) and 00:04.0 (RID 0x20).
    pub edu: [Edu; 2],
    /// The edu behind the PCIe root port at 00:06.0: 01:00.0 (RID 0x100),
    /// or why it is missing.
    pub bridged: Result<Edu, Fail>,
    /// The ivshmem-plain at 00:05.0 (P2P provider), or why it is missing.
    pub ivshmem: Result<Ivshmem, Fail>,
    /// The virtio-blk at 00:08.0 (source-id 0x40), or why it is missing.
    pub virtio: Result<Virtio, Fail>,
    /// VT-d register base of the DRHD whose scope lists edu 0 (QEMU: 0xfed90000).
    pub vtd_base: usize,
    /// Length of the VT-d register block (the DRHD's Size).
    pub vtd_len: usize,
    /// The DMAR table (decoded with `bare_iommu::firmware::dmar`).
    pub dmar: &'static [u8],
    /// Built with the `demo` feature (narration on).
    pub demo: bool,
    /// The kernel command line (`-append`), e.g. `"cm"`, `"noqi"`, `"aw=39"`.
    pub cmdline: &'static str,
    /// PCI configuration access (segment 0).
    #[allow(dead_code, reason = "for tests")]
    pub ecam: Ecam,
    /// Local APIC IDs of the CPUs the MADT lists (for [`crate::smp`]).
    pub apic_ids: heapless::Vec<u32, { crate::acpi::MAX_CPUS }>,
}

/// The virtio-blk function, as the board set it up.
pub use board_common::virtio::VirtioFunction as Virtio;

impl Ctx {
    /// Whether the command line holds the word `name` (or `name=…`).
    pub fn arg(&self, name: &str) -> bool {
        self.cmdline
            .split_ascii_whitespace()
            .any(|w| w == name || w.split_once('=').is_some_and(|(k, _)| k == name))
    }

    /// The value of `key=value` on the command line.
    pub fn arg_value(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
    }
}

impl Board for Ctx {
    fn demo(&self) -> bool {
        self.demo
    }

    /// Only the tests whose name contains the `only=` argument, if given.
    fn selected(&self, name: &str) -> bool {
        self.arg_value("only").is_none_or(|o| name.contains(o))
    }

    /// Pages lent to domains: the unit's own structures (set up once per
    /// boot, lent through [`DRIVER_MEMORY`](crate::memory::DRIVER_MEMORY))
    /// are not counted.
    fn table_pages_in_use(&self) -> Option<usize> {
        Some(
            self.mem
                .table_pages_in_use()
                .saturating_sub(crate::memory::DRIVER_MEMORY.held()),
        )
    }

    fn after_test(&mut self) -> Result<(), Fail> {
        match self.mem.take_bad_frees() {
            0 => Ok(()),
            n => Err(fail_msg(format_args!(
                "{n} table frees did not match an allocation"
            ))),
        }
    }

    /// ACPI S5 (status 0) when everything passed, isa-debug-exit otherwise.
    fn exit(code: u32) -> ! {
        match code {
            0 => crate::exit::success(),
            _ => crate::exit::failure(code),
        }
    }
}

/// Reports a failure outside any test (boot) and exits.
pub fn boot_failure(args: fmt::Arguments<'_>) -> ! {
    board_common::harness::boot_failure::<Ctx>(args)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    board_common::harness::panicked::<Ctx>(info, crate::tests::TESTS)
}
