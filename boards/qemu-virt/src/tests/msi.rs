//! MSI behind the SMMU (issue 12 item 4): on Arm an MSI is a DMA write of
//! the EventID to the GIC ITS doorbell (`GITS_TRANSLATER`), and the SMMU
//! translates it like any other write of the device. With the doorbell
//! mapped into the device's domain (`Domain::map_msi_doorbell`) edu's MSI
//! becomes its LPI; without it the write is a translation fault and no
//! interrupt arrives.

use core::sync::atomic::{AtomicBool, Ordering};

use bare_iommu::msi::MSI_IOVA_BASE;
use bare_iommu::smmuv3::SmmuConfig;
use bare_iommu::{DeviceId, DmaAddr, IommuBackend, PhysAddr};
use pci_types::{ConfigRegionAccess, PciAddress};

use super::smmu::{
    bring_up, domain, drain, end_domain, expect_translation_fault, fault_stage, teardown,
    with_preferred_stage,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::its::{self, FIRST_LPI, Its};
use crate::pci::Ecam;

/// PCI capability ID of MSI (PCI 3.0 §6.8.1).
const CAP_MSI: u32 = 0x05;
/// edu interrupt-raise and -acknowledge registers (BAR0 offsets, QEMU
/// hw/misc/edu.c).
const EDU_IRQ_RAISE: u64 = 0x60;
const EDU_IRQ_ACK: u64 = 0x64;
/// The LPI and EventID edu's MSI is mapped to.
const LPI: u32 = FIRST_LPI + 5;
const EVENT: u32 = 3;
/// Polls of the CPU interface for the LPI.
const POLLS: u32 = 200_000;
/// The ITS is brought up once per boot.
static ITS_UP: AtomicBool = AtomicBool::new(false);

fn address(dev: DeviceId) -> PciAddress {
    PciAddress::new(0, dev.bus, dev.dev(), dev.func())
}

/// Programs `dev`'s 64-bit MSI capability with `addr` / `data` and enables
/// it (one vector), INTx off.
fn program_msi(dev: DeviceId, addr: u64, data: u32) -> Result<(), Fail> {
    let ecam = Ecam::virt();
    let a = address(dev);
    // SAFETY: configuration accesses to a present function the test owns.
    unsafe {
        let mut at = ecam.read(a, 0x34) & 0xfc;
        let mut cap = None;
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let hdr = ecam.read(a, at as u16);
            if hdr & 0xff == CAP_MSI {
                cap = Some(at as u16);
                break;
            }
            at = (hdr >> 8) & 0xfc;
        }
        let cap = cap.or_fail("edu MSI capability")?;
        let ctl = ecam.read(a, cap) >> 16;
        check!(ctl & (1 << 7) != 0, "{dev}: MSI is not 64-bit capable");
        ecam.write(a, cap, ecam.read(a, cap) & !(1 << 16));
        ecam.write(a, cap + 4, addr as u32);
        ecam.write(a, cap + 8, (addr >> 32) as u32);
        ecam.write(a, cap + 0xc, data & 0xffff);
        let cmd = ecam.read(a, 0x04);
        ecam.write(a, 0x04, cmd | 1 << 10);
        let ctl = (ctl & !(7 << 4)) | 1;
        ecam.write(a, cap, (ecam.read(a, cap) & 0xffff) | ctl << 16);
    }
    Ok(())
}

fn disable_msi(dev: DeviceId) {
    let ecam = Ecam::virt();
    let a = address(dev);
    // SAFETY: as in `program_msi`.
    unsafe {
        let mut at = ecam.read(a, 0x34) & 0xfc;
        for _ in 0..48 {
            if at == 0 {
                return;
            }
            let hdr = ecam.read(a, at as u16);
            if hdr & 0xff == CAP_MSI {
                ecam.write(a, at as u16, hdr & !(1 << 16));
                return;
            }
            at = (hdr >> 8) & 0xfc;
        }
    }
}

/// edu raises its interrupt (one MSI) and acknowledges it in the device.
fn raise(bar: u64) {
    // SAFETY: BAR0 of the edu (MMU off: identity); 0x60 / 0x64 are its
    // interrupt raise / acknowledge registers.
    unsafe {
        core::ptr::write_volatile((bar + EDU_IRQ_RAISE) as *mut u32, 1);
        core::ptr::write_volatile((bar + EDU_IRQ_ACK) as *mut u32, 1);
    }
}

/// Whether the LPI became pending at this CPU (polled, IRQs masked); if so
/// it is acknowledged and ended.
fn lpi_arrived() -> bool {
    for _ in 0..POLLS {
        if its::highest_pending() == LPI {
            return its::take() == LPI;
        }
        core::hint::spin_loop();
    }
    false
}

/// edu 00:05.0 in a translated domain, its MSI (EventID 3 → LPI 8197 in
/// the ITS) aimed at the doorbell's IOVA: with the doorbell page mapped
/// (fixed IOVA 0x800_0000, device memory) the LPI arrives and the SMMU
/// reports nothing; with it unmapped no LPI arrives and the SMMU reports
/// F_TRANSLATION for edu's StreamID at the doorbell's IOVA.
pub fn msi_through_the_smmu_arrives_only_with_the_doorbell_mapped(
    ctx: &mut Ctx,
) -> Result<(), Fail> {
    let irqs = ctx.irqs.as_ref().map_err(|e| e.clone())?;
    check!(
        !ITS_UP.swap(true, Ordering::SeqCst),
        "the ITS was already brought up in this boot"
    );
    // SAFETY: QEMU placed the DTB below the image, in RAM nothing writes.
    let fdt = unsafe { crate::fdt::Fdt::at(crate::fdt::VIRT_DTB) }
        .map_err(|e| fail_msg(format_args!("DTB: {e:?}")))?;
    // SAFETY: once per boot (checked above); the ITS frame is from the DTB
    // and this is its only driver.
    let mut its =
        unsafe { Its::init(&fdt, &irqs.gic) }.map_err(|e| fail_msg(format_args!("ITS: {e:?}")))?;
    let edu = &ctx.edu[0];
    // msi-map of QEMU virt: DeviceID = requester ID.
    its.map_event(u32::from(edu.id.rid()), EVENT, LPI)
        .map_err(|e| fail_msg(format_args!("ITS map: {e:?}")))?;
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    let r = (|| -> Result<(), Fail> {
        with_preferred_stage!(smmu, |fmt| {
            let mut dom = domain(&smmu, ctx, fmt, 61)?;
            let stage = fault_stage(dom.info().or_fail("info")?.format);
            smmu.attach(edu.id, dom.attachment()).or_fail("attach")?;
            let db = dom
                .map_msi_doorbell(DmaAddr(MSI_IOVA_BASE), PhysAddr(its.doorbell()), &mut smmu)
                .or_fail("map doorbell")?;
            let msi = db.msi_address().0;
            program_msi(edu.id, msi, EVENT)?;
            let _ = drain(&mut smmu);
            raise(edu.bar());
            check!(
                lpi_arrived(),
                "LPI {LPI} did not arrive with the doorbell mapped (pending: {})",
                its::highest_pending()
            );
            check_eq!(drain(&mut smmu).report.events, 0, "SMMU events for the MSI");
            narrate!(
                "{} MSI to IOVA {msi:#x} (doorbell {:#x} mapped) -> LPI {LPI}",
                edu.id,
                its.doorbell()
            );

            dom.unmap_msi_doorbell(db, &mut smmu)
                .or_fail("unmap doorbell")?;
            raise(edu.bar());
            check!(
                !lpi_arrived(),
                "LPI {LPI} arrived with the doorbell unmapped"
            );
            let d = drain(&mut smmu);
            expect_translation_fault(&d, edu.id.stream_id(), msi, msi + 4, stage)?;
            narrate!(
                "doorbell unmapped: no LPI, the SMMU reported the MSI write at {msi:#x} ({} event(s))",
                d.report.events
            );
            disable_msi(edu.id);
            smmu.detach(edu.id).or_fail("detach")?;
            end_domain(&mut smmu, dom)?;
        });
        Ok(())
    })();
    disable_msi(edu.id);
    let down = teardown(&mut smmu, ctx);
    r.and(down)
}
