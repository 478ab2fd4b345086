//! Bare-metal test image for QEMU `q35` + `intel-iommu`, booted by PVH.
//!
//! Boot: [`boot`] (PVH note + trampoline) → [`board_main`]: COM1, command line,
//! ACPI (DMAR, MCFG, FADT), PCI (two edu functions, BAR0 placed, memory + bus
//! master on), then every test in [`tests::TESTS`] through
//! `board_common::harness::run`.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![allow(
    clippy::result_large_err,
    reason = "tests fail with a fixed 200-byte message, on the cold path"
)]

#[macro_use]
extern crate board_common;

mod acpi;
mod boot;
mod edu;
mod edu_dma_api;
mod exit;
mod harness;
mod heap;
mod irq;
mod memory;
mod pci;
mod serial;
mod smp;
mod tests;

use bare_iommu::DeviceId;
use board_common::{ivshmem, virtio};
use harness::{Ctx, Fail, OrFail, boot_failure, fail_msg};
use ivshmem::Ivshmem;

/// `hvm_start_info.magic` (Xen public/arch-x86/hvm/start_info.h).
const HVM_START_MAGIC: u32 = 0x336e_c578;
const EDU_VENDOR: u16 = 0x1234;
const EDU_DEVICE: u16 = 0x11e8;
const CMDLINE_MAX: usize = 256;
/// Slot the xtask pins the ivshmem-plain at (`-device ivshmem-plain,addr=05.0`).
const IVSHMEM_SLOT: u8 = 5;
/// Slot of the PCIe root port with an edu behind it (bus 1).
const BRIDGE_SLOT: u8 = 6;
/// Slot the xtask pins the virtio-blk at (`-device virtio-blk-pci,addr=08.0`).
const VIRTIO_SLOT: u8 = 8;

/// The command line, copied out of firmware memory.
static CMDLINE: spin::Once<heapless::String<CMDLINE_MAX>> = spin::Once::new();

/// Reads `hvm_start_info`: (cmdline, rsdp address).
fn start_info(pa: u64) -> (&'static str, u64) {
    if pa == 0 || pa >= 1 << 32 {
        boot_failure(format_args!("hvm_start_info at {pa:#x}"));
    }
    let p = pa as usize as *const u8;
    // SAFETY: PVH hands a valid hvm_start_info (checked by its magic) in
    // identity-mapped low memory; fields at +0 (magic), +0x18 (cmdline_paddr),
    // +0x20 (rsdp_paddr).
    let (magic, cmdline_pa, rsdp) = unsafe {
        (
            core::ptr::read_unaligned(p as *const u32),
            core::ptr::read_unaligned(p.add(0x18) as *const u64),
            core::ptr::read_unaligned(p.add(0x20) as *const u64),
        )
    };
    if magic != HVM_START_MAGIC {
        boot_failure(format_args!("hvm_start_info magic {magic:#x}"));
    }
    let cmdline = CMDLINE.call_once(|| {
        let mut s = heapless::String::new();
        if cmdline_pa != 0 && cmdline_pa < (1 << 32) - CMDLINE_MAX as u64 {
            for i in 0..CMDLINE_MAX {
                // SAFETY: the NUL-terminated command line PVH placed in
                // identity-mapped low memory; reading stops at the NUL.
                let b = unsafe { core::ptr::read((cmdline_pa as usize + i) as *const u8) };
                if b == 0 || !b.is_ascii() || s.push(b as char).is_err() {
                    break;
                }
            }
        }
        s
    });
    (cmdline.as_str(), rsdp)
}

/// Plants the canary bands of the boot stack (`boot.rs`: `boot_stack`, 1 MiB above the page tables) and of the
/// AP stacks.
fn plant_stack_canaries() {
    unsafe extern "C" {
        static boot_stack: u8;
    }
    // SAFETY: `boot_stack` is the bottom of the boot stack this CPU runs on,
    // near its top here.
    unsafe { board_common::stack_canary::plant_boot(&raw const boot_stack as usize) };
    smp::plant_stack_canaries();
}

/// Rust entry from the trampoline, with the `hvm_start_info` address.
#[unsafe(no_mangle)]
extern "C" fn board_main(start_info_pa: u64) -> ! {
    serial::init();
    board_common::console::init(serial::put);
    println!();
    plant_stack_canaries();
    let (cmdline, rsdp) = start_info(start_info_pa);
    // `x2apic`: the local APIC runs in x2APIC mode (the eim=on configuration).
    if cmdline.split_ascii_whitespace().any(|w| w == "x2apic") {
        irq::enable_x2apic().unwrap_or_else(|e| boot_failure(format_args!("x2APIC: {e}")));
    }

    let info = acpi::parse(rsdp).unwrap_or_else(|e| boot_failure(format_args!("ACPI: {e}")));
    if let Some(port) = info.pm1a_cnt {
        exit::set_pm1a_cnt(port);
    }
    let ecam = pci::Ecam::new(info.ecam);

    let mut found: heapless::Vec<DeviceId, 2> = heapless::Vec::new();
    ecam.for_each_function(|dev, vendor, device| {
        if vendor == EDU_VENDOR && device == EDU_DEVICE && dev.bus == 0 {
            let _ = found.push(dev);
        }
    });
    let [id0, id1] = found.as_slice() else {
        boot_failure(format_args!("expected two edu functions, found {found:?}"))
    };
    let mut busy = pci::BusyRanges::scan(&ecam)
        .unwrap_or_else(|e| boot_failure(format_args!("PCI scan: {e}")));
    let mem = &memory::MEMORY;
    let mut edu_at = |id: DeviceId| {
        let bar = busy
            .place(&ecam, id, 0)
            .unwrap_or_else(|e| boot_failure(format_args!("edu {id} BAR0: {e}")));
        ecam.enable(id, pci::CMD_MEMORY | pci::CMD_BUS_MASTER);
        let bounce = mem
            .dma_pages(1)
            .unwrap_or_else(|| boot_failure(format_args!("no bounce page")));
        // SAFETY: BAR0 was just placed in a free range below 4 GiB (identity
        // mapped) and decodes for this edu alone; the bounce page is ours.
        unsafe { edu::Edu::new(id, bar, bounce, mem) }
            .unwrap_or_else(|e| boot_failure(format_args!("edu {id}: {e}")))
    };
    let edu = [edu_at(*id0), edu_at(*id1)];
    let bridged = setup_bridged_edu(&ecam, &mut busy);
    if let Err(why) = &bridged {
        println!("  note: no edu behind a bridge: {why}");
    }
    let ivshmem = setup_ivshmem(&ecam, &mut busy);
    if let Err(why) = &ivshmem {
        println!("  note: no P2P provider: {why}");
    }
    let virtio = setup_virtio(&ecam, &mut busy);
    if let Err(why) = &virtio {
        println!("  note: no virtio-blk: {why}");
    }

    println!(
        "q35: cmdline \"{cmdline}\", VT-d at {:#x} ({} DRHD, HAW {}), ECAM at {:#x}, edu {} BAR0 {:#x}, edu {} BAR0 {:#x}",
        info.drhd_base,
        info.drhd_count,
        info.host_address_width,
        info.ecam.base,
        edu[0].id,
        edu[0].bar(),
        edu[1].id,
        edu[1].bar()
    );
    // The unit that owns the first edu, by its DMAR device scopes (bridges
    // on a scope's path are read from config space).
    let dmar = bare_iommu::firmware::dmar::Dmar::new(info.dmar)
        .unwrap_or_else(|e| boot_failure(format_args!("DMAR: {e}")));
    let owner = dmar
        .unit_for(edu[0].id, &|_seg, bus, devfn| ecam.bridge_buses(bus, devfn))
        .unwrap_or_else(|e| boot_failure(format_args!("DMAR scope of {}: {e}", edu[0].id)))
        .unwrap_or_else(|| boot_failure(format_args!("no DRHD covers {}", edu[0].id)));
    let Ok(vtd_base) = usize::try_from(owner.register_base) else {
        boot_failure(format_args!("DRHD base {:#x}", owner.register_base))
    };
    let mut ctx = Ctx {
        mem,
        edu,
        bridged,
        ivshmem,
        virtio,
        vtd_base,
        vtd_len: usize::try_from(owner.register_len()).unwrap_or(info.drhd_len),
        dmar: info.dmar,
        demo: cfg!(feature = "demo"),
        cmdline,
        ecam,
        apic_ids: info.cpus.clone(),
    };
    board_common::harness::run(&mut ctx, tests::TESTS)
}

/// Numbers the PCIe root port at 00:[`BRIDGE_SLOT`].0 (secondary bus 1),
/// gives it a 1 MiB memory window and puts the edu at 01:00.0 (requester ID
/// 0x100) in it: a device whose requester ID is not its devfn.
fn setup_bridged_edu(ecam: &pci::Ecam, busy: &mut pci::BusyRanges) -> Result<edu::Edu, Fail> {
    const WINDOW: u32 = 1 << 20;
    let port = pci_types::PciAddress::new(0, 0, BRIDGE_SLOT, 0);
    let dev = pci_types::PciAddress::new(0, 1, 0, 0);
    let base = busy
        .take(u64::from(WINDOW))
        .map_err(|e| fail_msg(format_args!("bridge window: {e}")))?;
    board_common::bridge::open(ecam, port, 1, base, WINDOW).map_err(|e| {
        fail_msg(format_args!(
            "{e}: run with -device pcie-root-port,id=rp1,chassis=1,addr={BRIDGE_SLOT:02x}.0 -device edu,bus=rp1,addr=00.0"
        ))
    })?;
    let id = DeviceId::new(0, 1, 0, 0).or_fail("01:00.0")?;
    let (vendor, device) = (ecam.read16(id, 0), ecam.read16(id, 2));
    if (vendor, device) != (EDU_VENDOR, EDU_DEVICE) {
        return Err(fail_msg(format_args!(
            "01:00.0 is {vendor:04x}:{device:04x}, not an edu"
        )));
    }
    board_common::bridge::place_bar0(ecam, dev, base, WINDOW)
        .map_err(|e| fail_msg(format_args!("edu {id}: {e}")))?;
    let mem = &memory::MEMORY;
    let bounce = mem.dma_pages(1).or_fail("bounce page")?;
    // SAFETY: BAR0 was just placed at the start of the bridge's window (below
    // 4 GiB, identity mapped), which nothing else decodes; the bounce page is
    // ours.
    unsafe { edu::Edu::new(id, u64::from(base), bounce, mem) }
        .map_err(|e| fail_msg(format_args!("edu {id}: {e}")))
}

/// Finds the ivshmem-plain at [`IVSHMEM_SLOT`] on bus 0, places its BAR 2
/// (64-bit, prefetchable) where nothing else decodes, enables it. The BAR
/// register holds the PCI bus address; on x86 the host bridge does not
/// translate memory addresses (q35's _CRS windows have a zero translation
/// offset), so the CPU reaches the BAR at the same address.
fn setup_ivshmem(ecam: &pci::Ecam, busy: &mut pci::BusyRanges) -> Result<Ivshmem, Fail> {
    let Some(id) = ecam.find_at(ivshmem::VENDOR, ivshmem::DEVICE, IVSHMEM_SLOT) else {
        return Err(fail_msg(format_args!(
            "no ivshmem at 00:{IVSHMEM_SLOT:02x}.0: run with -object memory-backend-ram,id=p2pmem,size=1M -device ivshmem-plain,memdev=p2pmem,addr={IVSHMEM_SLOT:02x}.0"
        )));
    };
    let base = busy
        .place(ecam, id, ivshmem::MEMORY_BAR)
        .map_err(|e| fail_msg(format_args!("ivshmem {id} BAR2: {e}")))?;
    ecam.enable(id, pci::CMD_MEMORY | pci::CMD_BUS_MASTER);
    let raw = ecam.read32(id, ivshmem::BAR2_OFFSET);
    // Bits 2:1 = 10b: 64-bit; bit 3: prefetchable (PCIe 6.0 §7.5.1.2.1).
    if (raw >> 1) & 3 != 2 || raw & (1 << 3) == 0 {
        return Err(fail_msg(format_args!(
            "ivshmem BAR2 ({raw:#x}) is not 64-bit prefetchable memory"
        )));
    }
    let (bus, len, _) = ecam
        .memory_bar(id, ivshmem::MEMORY_BAR)
        .ok_or_else(|| fail_msg(format_args!("ivshmem {id}: BAR2 reads back empty")))?;
    if bus != base {
        return Err(fail_msg(format_args!(
            "ivshmem BAR2 reads back {bus:#x}, placed at {base:#x}"
        )));
    }
    narrate!("ivshmem {id}: BAR2 {bus:#x} ({} KiB)", len >> 10);
    Ok(Ivshmem {
        id,
        bar2: bare_iommu::PhysAddr(bus),
        bar2_bus: bus,
        len,
    })
}

/// Finds the virtio-blk at [`VIRTIO_SLOT`] on bus 0, places the BAR holding
/// its virtio structures (BAR 4, 64-bit) below 4 GiB where nothing else
/// decodes, enables memory decoding and bus mastering, and walks its
/// capabilities.
fn setup_virtio(ecam: &pci::Ecam, busy: &mut pci::BusyRanges) -> Result<harness::Virtio, Fail> {
    let Some(id) = ecam.find_at(virtio::VENDOR, virtio::DEVICE_BLK, VIRTIO_SLOT) else {
        return Err(fail_msg(format_args!(
            "no virtio-blk at 00:{VIRTIO_SLOT:02x}.0: run with -drive file=IMG,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0,addr={VIRTIO_SLOT:02x}.0,iommu_platform=on,disable-legacy=on"
        )));
    };
    let base = busy.place(ecam, id, virtio::MODERN_BAR).map_err(|e| {
        fail_msg(format_args!(
            "virtio-blk {id} BAR{}: {e}",
            virtio::MODERN_BAR
        ))
    })?;
    ecam.enable(id, pci::CMD_MEMORY | pci::CMD_BUS_MASTER);
    let (bus, len, _) = ecam
        .memory_bar(id, virtio::MODERN_BAR)
        .ok_or_else(|| fail_msg(format_args!("virtio-blk {id}: BAR4 reads back empty")))?;
    if bus != base {
        return Err(fail_msg(format_args!(
            "virtio-blk BAR4 reads back {bus:#x}, placed at {base:#x}"
        )));
    }
    let mut bars = [None; 6];
    if let Some(slot) = bars.get_mut(usize::from(virtio::MODERN_BAR)) {
        *slot = Some((bus, len));
    }
    let config = pci::FunctionConfig {
        ecam: *ecam,
        dev: id,
    };
    let pci = virtio::VirtioPci::probe(&config, &bars)
        .map_err(|e| fail_msg(format_args!("virtio-blk {id}: {e}")))?;
    narrate!(
        "virtio-blk {id}: BAR4 {bus:#x} ({} KiB), common cfg {:#x}, notify {:#x}, device cfg {:#x}",
        len >> 10,
        pci.common,
        pci.notify,
        pci.device
    );
    Ok(harness::Virtio {
        id,
        pci,
        ecam: ecam.window().0,
    })
}
