//! Bare-metal aarch64 test image for QEMU `virt` with an SMMUv3: boots at EL2
//! (or EL1), finds the two edu devices, and runs the tests of [`tests::TESTS`].
//!
//! Run with `cargo xtask board virt-smmuv3` from the repository root.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
// A test's `Fail` is a 200-byte string on purpose: a readable reason without
// an allocator. Returning it by value is fine for a test image.
#![allow(clippy::result_large_err)]

#[macro_use]
extern crate board_common;

mod boot;
mod exception;
mod exit;
mod fdt;
mod gic;
mod harness;
mod irq;
mod its;
mod memory;
mod pci;
mod smp;
mod tests;
mod time;
mod uart;

use bare_iommu::DeviceId;
use board_common::edu::{DmaBudget, Edu};
use board_common::{edu, ivshmem, virtio};

use crate::harness::{Ctx, Fail, fail_msg};
use crate::ivshmem::Ivshmem;
use crate::memory::MEMORY;

/// Base of the SMMUv3 on QEMU `virt` (register page 0; page 1 at + 0x10000).
pub const SMMU_BASE: usize = 0x0905_0000;

/// Slots the xtask pins the two edu devices at (`-device edu,addr=05.0` and `06.0`).
const EDU_SLOTS: [u8; 2] = [5, 6];
/// Slot the xtask pins the ivshmem-plain at (`-device ivshmem-plain,addr=07.0`).
const IVSHMEM_SLOT: u8 = 7;
/// Slot of the PCIe root port with an edu behind it (bus 1).
const BRIDGE_SLOT: u8 = 9;
/// Slot the xtask pins the virtio-blk at (`-device virtio-blk-pci,addr=08.0`).
const VIRTIO_SLOT: u8 = 8;

/// Plants the canary bands of the boot stack (`link.ld`: `__stack_bottom`, 1 MiB) and of the
/// AP stacks.
fn plant_stack_canaries() {
    unsafe extern "C" {
        static __stack_bottom: u8;
    }
    // SAFETY: `__stack_bottom` is the bottom of the boot stack this CPU runs on,
    // near its top here.
    unsafe { board_common::stack_canary::plant_boot(&raw const __stack_bottom as usize) };
    smp::plant_stack_canaries();
}

/// Entered from `boot.rs` with the exception level.
extern "C" fn main(el: u64) -> ! {
    uart::init();
    board_common::console::init(uart::put);
    plant_stack_canaries();
    println!(
        "board qemu-virt: EL{el}, {} tests{}",
        tests::TESTS.len(),
        if harness::DEMO { " (demo)" } else { "" }
    );
    MEMORY.check_layout();
    let mut window = pci::MmioWindow::new();
    let edu = EDU_SLOTS.map(|slot| setup_edu(slot, &mut window));
    let bridged = setup_bridged_edu(&mut window);
    if let Err(why) = &bridged {
        println!("  note: no edu behind a bridge: {why}");
    }
    let ivshmem = setup_ivshmem(&mut window);
    if let Err(why) = &ivshmem {
        println!("  note: no P2P provider: {why}");
    }
    let virtio = setup_virtio(&mut window);
    if let Err(why) = &virtio {
        println!("  note: no virtio-blk: {why}");
    }
    let irqs = setup_irqs();
    if let Err(why) = &irqs {
        println!("  note: no SMMU interrupts: {why}");
    }
    let mut ctx = Ctx {
        mem: &MEMORY,
        edu,
        bridged,
        ivshmem,
        virtio,
        smmu_base: SMMU_BASE,
        irqs,
        demo: harness::DEMO,
    };
    board_common::harness::run(&mut ctx, tests::TESTS)
}

/// The SMMU's wired interrupts, from its DTB node (`interrupts` in the
/// order of `interrupt-names`).
#[derive(Clone, Copy, Debug)]
pub struct SmmuIrqs {
    /// Event queue not empty.
    pub eventq: fdt::GicInterrupt,
    /// A global error became active.
    pub gerror: fdt::GicInterrupt,
}

/// The GIC, brought up with every interrupt disabled, and the SMMU's
/// interrupts.
pub struct Irqs {
    /// The GICv3.
    pub gic: gic::Gic,
    /// The SMMU's interrupts.
    pub smmu: SmmuIrqs,
}

/// Reads the GICv3 and the SMMU's interrupts from the DTB and brings the
/// GIC up (IRQs stay masked).
fn setup_irqs() -> Result<Irqs, Fail> {
    // SAFETY: QEMU placed the DTB below the image (link.ld), in RAM that
    // nothing else uses or writes.
    let fdt = unsafe { fdt::Fdt::at(fdt::VIRT_DTB) }
        .map_err(|e| fail_msg(format_args!("DTB at {:#x}: {e:?}", fdt::VIRT_DTB)))?;
    const SMMU: &str = "arm,smmu-v3";
    let irq = |name| {
        fdt.interrupt_index(SMMU, name)
            .and_then(|i| fdt.interrupt(SMMU, i))
            .map_err(|e| fail_msg(format_args!("SMMU {name} interrupt in the DTB: {e:?}")))
    };
    let smmu = SmmuIrqs {
        eventq: irq("eventq")?,
        gerror: irq("gerror")?,
    };
    // SAFETY: the GIC's frames come from the DTB (MMU off: identity), and
    // this is the only driver of the GIC.
    let gic = unsafe { gic::Gic::from_dtb(&fdt) }
        .map_err(|e| fail_msg(format_args!("GICv3 (run with gic-version=3): {e:?}")))?;
    gic.init()
        .map_err(|e| fail_msg(format_args!("GICv3 init: {e:?}")))?;
    let trigger = |i: fdt::GicInterrupt| if i.edge() { "edge" } else { "level" };
    let intid = |i: fdt::GicInterrupt| {
        i.intid()
            .ok_or_else(|| fail_msg(format_args!("SMMU interrupt {i:?} is not an SPI/PPI")))
    };
    let (eventq, gerror) = (intid(smmu.eventq)?, intid(smmu.gerror)?);
    narrate!(
        "GICv{}: SMMU eventq SPI {} = INTID {eventq} ({}), gerror SPI {} = INTID {gerror} ({})",
        gic.arch_rev(),
        smmu.eventq.number,
        trigger(smmu.eventq),
        smmu.gerror.number,
        trigger(smmu.gerror)
    );
    Ok(Irqs { gic, smmu })
}

/// Finds the edu at `slot` on bus 0, assigns its BAR 0 and enables it.
fn setup_edu(slot: u8, window: &mut pci::MmioWindow) -> Edu {
    let ecam = pci::Ecam::virt();
    let found = pci::find(ecam, edu::VENDOR, edu::DEVICE);
    let Some(&address) = found.iter().find(|a| a.device() == slot) else {
        panic!(
            "no edu at 00:{slot:02x}.0 (found {} edu): run with -device edu,addr={slot:02x}.0",
            found.len()
        );
    };
    let function = match pci::enable(ecam, address, window) {
        Ok(f) => f,
        Err(e) => panic!("edu: {e}"),
    };
    let Some(id) = DeviceId::new(0, address.bus(), address.device(), address.function()) else {
        panic!("edu at {address}: not a valid device/function");
    };
    // A DMA may take a second of virtual time (edu completes one after 100 ms).
    let budget = DmaBudget::Ticks {
        now: time::ticks,
        ticks: time::frequency(),
    };
    // SAFETY: `function.bar0` is the BAR just assigned and enabled (MMU off:
    // identity), and this is the only wrapper for it.
    let edu = unsafe { Edu::new(id, function.bar0, budget) };
    if let Err(e) = edu.verify() {
        panic!("edu {id} at {:#x}: {e}", function.bar0);
    }
    narrate!(
        "edu {id}: BAR0 {:#x} ({} KiB)",
        function.bar0,
        function.bar0_size >> 10
    );
    edu
}

/// Numbers the PCIe root port at 00:[`BRIDGE_SLOT`].0 (secondary bus 1),
/// gives it a 1 MiB memory window and puts the edu at 01:00.0 (requester ID
/// and StreamID 0x100) in it: a device whose requester ID is not its devfn.
fn setup_bridged_edu(window: &mut pci::MmioWindow) -> Result<Edu, Fail> {
    const WINDOW: u32 = 1 << 20;
    let ecam = pci::Ecam::virt();
    let port = pci_types::PciAddress::new(0, 0, BRIDGE_SLOT, 0);
    let dev = pci_types::PciAddress::new(0, 1, 0, 0);
    let base = window
        .take(u64::from(WINDOW))
        .map_err(|e| fail_msg(format_args!("bridge window: {e}")))?;
    let base = u32::try_from(base).map_err(|_| fail_msg(format_args!("window {base:#x}")))?;
    board_common::bridge::open(&ecam, port, 1, base, WINDOW).map_err(|e| {
        fail_msg(format_args!(
            "{e}: run with -device pcie-root-port,id=rp1,chassis=1,addr={BRIDGE_SLOT:02x}.0 -device edu,bus=rp1,addr=00.0"
        ))
    })?;
    let found = pci_types::PciHeader::new(dev).id(ecam);
    if found != (edu::VENDOR, edu::DEVICE) {
        return Err(fail_msg(format_args!(
            "01:00.0 is {:04x}:{:04x}, not an edu",
            found.0, found.1
        )));
    }
    board_common::bridge::place_bar0(&ecam, dev, base, WINDOW)
        .map_err(|e| fail_msg(format_args!("edu 01:00.0: {e}")))?;
    let id = DeviceId::new(0, 1, 0, 0).ok_or_else(|| fail_msg(format_args!("01:00.0")))?;
    let budget = DmaBudget::Ticks {
        now: time::ticks,
        ticks: time::frequency(),
    };
    // SAFETY: BAR0 was just placed at the start of the bridge's window (MMU
    // off: identity), which nothing else decodes; this is its only wrapper.
    let edu = unsafe { Edu::new(id, u64::from(base), budget) };
    edu.verify()
        .map_err(|e| fail_msg(format_args!("edu {id} at {base:#x}: {e}")))?;
    Ok(edu)
}

/// Finds the ivshmem-plain at [`IVSHMEM_SLOT`], assigns its BAR 2 after the
/// edu BARs, enables it, and works out where the CPU sees the BAR: the BAR
/// register holds a PCI bus address; the host bridge's DTB `ranges` say
/// which CPU address that is.
fn setup_ivshmem(window: &mut pci::MmioWindow) -> Result<Ivshmem, Fail> {
    let ecam = pci::Ecam::virt();
    let found = pci::find(ecam, ivshmem::VENDOR, ivshmem::DEVICE);
    let Some(&address) = found.iter().find(|a| a.device() == IVSHMEM_SLOT) else {
        return Err(fail_msg(format_args!(
            "no ivshmem at 00:{IVSHMEM_SLOT:02x}.0: run with -object memory-backend-ram,id=p2pmem,size=1M -device ivshmem-plain,memdev=p2pmem,addr={IVSHMEM_SLOT:02x}.0"
        )));
    };
    let id = DeviceId::new(0, address.bus(), address.device(), address.function())
        .ok_or_else(|| fail_msg(format_args!("ivshmem at {address}: bad device/function")))?;
    let bar = pci::enable_bar(ecam, address, ivshmem::MEMORY_BAR, window)
        .map_err(|e| fail_msg(format_args!("ivshmem: {e}")))?;
    if !bar.is_64 || !bar.prefetchable {
        return Err(fail_msg(format_args!(
            "ivshmem BAR 2 is not 64-bit prefetchable memory"
        )));
    }
    // SAFETY: QEMU placed the DTB below the image (link.ld), in RAM that
    // nothing else uses or writes.
    let fdt = unsafe { fdt::Fdt::at(fdt::VIRT_DTB) }
        .map_err(|e| fail_msg(format_args!("DTB at {:#x}: {e:?}", fdt::VIRT_DTB)))?;
    let cpu = fdt
        .pci_bus_to_cpu(bar.address)
        .map_err(|e| fail_msg(format_args!("PCI bus address of ivshmem BAR 2: {e:?}")))?;
    narrate!(
        "ivshmem {id}: BAR2 bus {:#x} = CPU {cpu:#x} ({} KiB)",
        bar.address,
        bar.size >> 10
    );
    Ok(Ivshmem {
        id,
        bar2: bare_iommu::PhysAddr(cpu),
        bar2_bus: bar.address,
        len: bar.size,
    })
}

/// Finds the virtio-blk at [`VIRTIO_SLOT`], assigns the BAR holding its
/// virtio structures (BAR 4 on QEMU: 64-bit, placed in the 32-bit window),
/// enables memory decoding and bus mastering, and walks its capabilities.
fn setup_virtio(window: &mut pci::MmioWindow) -> Result<harness::Virtio, Fail> {
    let ecam = pci::Ecam::virt();
    let found = pci::find(ecam, virtio::VENDOR, virtio::DEVICE_BLK);
    let Some(&address) = found.iter().find(|a| a.device() == VIRTIO_SLOT) else {
        return Err(fail_msg(format_args!(
            "no virtio-blk at 00:{VIRTIO_SLOT:02x}.0: run with -drive file=IMG,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0,addr={VIRTIO_SLOT:02x}.0,iommu_platform=on,disable-legacy=on"
        )));
    };
    let id = DeviceId::new(0, address.bus(), address.device(), address.function())
        .ok_or_else(|| fail_msg(format_args!("virtio at {address}: bad device/function")))?;
    let config = pci::FunctionConfig { ecam, address };
    let mut bars = [None; 6];
    let bar = pci::enable_bar(ecam, address, virtio::MODERN_BAR, window)
        .map_err(|e| fail_msg(format_args!("virtio-blk: {e}")))?;
    if let Some(slot) = bars.get_mut(usize::from(virtio::MODERN_BAR)) {
        *slot = Some((bar.address, bar.size));
    }
    let pci = virtio::VirtioPci::probe(&config, &bars)
        .map_err(|e| fail_msg(format_args!("virtio-blk {id}: {e}")))?;
    narrate!(
        "virtio-blk {id}: BAR{} {:#x} ({} KiB), common cfg {:#x}, notify {:#x}, device cfg {:#x}",
        virtio::MODERN_BAR,
        bar.address,
        bar.size >> 10,
        pci.common,
        pci.notify,
        pci.device
    );
    Ok(harness::Virtio {
        id,
        pci,
        ecam: pci::ECAM_BASE as u64,
    })
}
