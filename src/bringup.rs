//! Bringing the crate up on a new platform, end to end (documentation only;
//! the README's "Bring-up on a new platform" follows the same steps).
//!
//! The order matters: DMA is blocked before anything else, the IOMMU is
//! found from firmware, each device's requester ID is turned into the ID
//! its DMA carries, firmware's reserved regions are kept mapped, and only
//! then does a device get a translated domain. Both examples compile
//! (`cargo test --doc`); the QEMU boards do the same on emulated hardware
//! (`boards/qemu-q35/src/main.rs` and `tests/handoff.rs`,
//! `boards/qemu-virt/src/tests/basic.rs` and `tests/handoff.rs`).
//!
//! # x86: VT-d from the ACPI DMAR
//!
//! ```no_run
//! use bare_iommu::firmware::dmar::Dmar;
//! use bare_iommu::firmware::ReservedRegion;
//! use bare_iommu::pgtable::{DmaDirection, MapAttrs};
//! use bare_iommu::state::{Domain, DomainConfig};
//! use bare_iommu::vtd::{Vtd, VtdConfig};
//! use bare_iommu::{DeviceId, IommuBackend, PhysAddr, TableMemory};
//!
//! /// `dmar`: the DMAR table's bytes (found through the RSDP/XSDT, e.g. with
//! /// the `acpi` crate); `bridges`: reads a bridge's (secondary, subordinate)
//! /// bus numbers from config space, so device scopes through bridges resolve.
//! fn bring_up<M: TableMemory + Copy>(
//!     dmar: &[u8],
//!     bridges: &impl Fn(u16, u8, u8) -> Option<(u8, u8)>,
//!     mem: M,
//!     dev: DeviceId,
//!     buf: PhysAddr,
//! ) -> Option<()> {
//!     // 1. Find the unit that owns the device: its DRHD (device scopes, or
//!     //    the segment's INCLUDE_PCI_ALL unit). The source-id of its DMA is
//!     //    its requester ID (`dev.source_id()`), whatever bus it sits on.
//!     let dmar = Dmar::new(dmar).ok()?;
//!     let unit = dmar.unit_for(dev, bridges).ok()??;
//!     let base = usize::try_from(unit.register_base).ok()?; // identity-mapped, uncached
//!     let len = usize::try_from(unit.register_len()).ok()?;
//!
//!     // 2. DMA blocked from here on, before any device is let master:
//!     //    `hand_off` turns translation on over an empty root table. A
//!     //    later stage takes the unit over with `adopt` (TE never clears).
//!     // SAFETY: `base` maps this DRHD's registers; nothing else drives it.
//!     let mut vtd = unsafe { Vtd::new(base, len, mem) }.ok()?;
//!     let handoff = vtd.hand_off().ok()?;
//!     // ... this stage's work; then, possibly in the next stage:
//!     vtd.adopt(VtdConfig::default()).ok()?;
//!     // SAFETY: `adopt` latched its own root: the unit no longer reads this page.
//!     unsafe { mem.free(handoff.root, 1) };
//!     // Faults a device raised in the window are still recorded.
//!     vtd.poll_faults(|f| {
//!         let _ = f; // source-id, address, reason
//!     });
//!
//!     // 3. A domain for the device. VT-d domains never hand out IOVAs in
//!     //    the interrupt window 0xFEE0_0000..0xFEF0_0000 (a DMA write there
//!     //    is an MSI), so the device's MSIs keep working while it translates.
//!     let mut dom = Domain::new(
//!         vtd.second_level_format(),
//!         mem,
//!         DomainConfig {
//!             id: 1,
//!             levels: vtd.domain_levels(),
//!             aperture_start: 1 << 20,
//!             aperture_end: 1 << 39,
//!             coherent_walk: vtd.coherent_walk(),
//!         },
//!     )
//!     .ok()?;
//!
//!     // 4. Firmware's RMRRs for this device stay identity-mapped (a USB
//!     //    controller's legacy buffers, a GPU's stolen memory).
//!     let mut rmrrs: heapless::Vec<ReservedRegion, 8> = heapless::Vec::new();
//!     for r in dmar.reserved_regions_for(dev, bridges) {
//!         rmrrs.push(r.ok()?).ok()?;
//!     }
//!     dom.install_identity_regions(&rmrrs, &mut vtd).ok()?;
//!
//!     // 5. Attach (the context entry is written last), then the first
//!     //    transaction: one IOVA range, link, one sync, DMA.
//!     vtd.attach(dev, dom.attachment()).ok()?;
//!     let mut tx = dom.try_alloc(4096, u64::MAX).ok()?.into_iova()?;
//!     let iova = dom
//!         .link(&mut tx, buf, 0, 4096, DmaDirection::FromDevice, MapAttrs::empty())
//!         .ok()?;
//!     dom.sync(&mut vtd).ok()?;
//!     let _ = iova; // program the device with it
//!
//!     // 6. Faults: decoded records (source-id, address, reason), by
//!     //    polling or from the fault-event MSI (`handle_irq`).
//!     vtd.poll_faults(|f| {
//!         let _ = f;
//!     });
//!     dom.destroy(tx, &mut vtd).ok()?;
//!     Some(())
//! }
//! ```
//!
//! # Arm: SMMUv3 from the devicetree or the IORT
//!
//! ```no_run
//! use bare_iommu::firmware::devicetree::IommuMap;
//! use bare_iommu::firmware::iort::{Iort, NodeKind};
//! use bare_iommu::firmware::ReservedRegion;
//! use bare_iommu::pgtable::arm::ArmStage1;
//! use bare_iommu::pgtable::{DmaDirection, MapAttrs};
//! use bare_iommu::smmuv3::{Smmu, SmmuConfig};
//! use bare_iommu::state::{Domain, DomainConfig};
//! use bare_iommu::{DeviceId, IommuBackend, PhysAddr, TableMemory};
//!
//! /// The StreamID of `dev` from the host bridge's `iommu-map` and
//! /// `iommu-map-mask` property values (read with the `fdt` crate).
//! fn stream_id_from_dt(map: &[u8], mask: Option<&[u8]>, dev: DeviceId) -> Option<u32> {
//!     let target = IommuMap::new(map, mask).ok()?.map(u32::from(dev.rid())).ok()??;
//!     // `target.phandle` names the SMMU node (its `reg` is the base).
//!     Some(target.id)
//! }
//!
//! /// With ACPI: the SMMU base, the StreamID and the RMR regions from the IORT.
//! fn from_iort(
//!     iort: &[u8],
//!     dev: DeviceId,
//!     rmrs: &mut heapless::Vec<ReservedRegion, 8>,
//! ) -> Option<(u64, u32)> {
//!     let iort = Iort::new(iort).ok()?;
//!     let t = iort.map_pci(u32::from(dev.segment), u32::from(dev.rid())).ok()??;
//!     let NodeKind::Smmuv3(smmu) = t.smmu.kind().ok()? else {
//!         return None; // an SMMUv1/v2: not this driver's
//!     };
//!     iort.reserved_regions_for(&t.smmu, t.stream_id, |r, _flags| {
//!         let _ = rmrs.push(r);
//!     })
//!     .ok()?;
//!     Some((smmu.base, t.stream_id))
//! }
//!
//! fn bring_up<M: TableMemory + Copy>(base: usize, mem: M, dev: DeviceId, buf: PhysAddr) -> Option<()> {
//!     // SAFETY: `base` maps both register pages (128 KiB); nothing else drives them.
//!     let mut smmu = unsafe { Smmu::new(base, mem) }.ok()?;
//!     // DMA blocked first: GBPA.ABORT (through the GBPA.UPDATE handshake),
//!     // SMMUEN off. Every stream aborts; nothing is recorded.
//!     smmu.hand_off().ok()?;
//!     // `init` keeps GBPA.ABORT until its stream table (all STEs abort),
//!     // queues and global invalidations are live, then sets SMMUEN. A
//!     // later stage takes over the same way.
//!     smmu.init(SmmuConfig::default()).ok()?;
//!
//!     // `attach(dev, ..)` programs the requester ID as StreamID
//!     // (`dev.stream_id()`, the identity on QEMU `virt`); where
//!     // `stream_id_from_dt` or `from_iort` gives another StreamID, use
//!     // `smmu.attach_stream(sid, how)` with it.
//!     let mut dom = Domain::new(
//!         ArmStage1,
//!         mem,
//!         DomainConfig {
//!             id: 1,
//!             levels: 4,
//!             aperture_start: 1 << 20,
//!             aperture_end: 1 << 40,
//!             coherent_walk: smmu.coherent_walk(),
//!         },
//!     )
//!     .ok()?;
//!     let mut rmrs = heapless::Vec::<ReservedRegion, 8>::new();
//!     let _ = rmrs.push(ReservedRegion { base: 0x8000_0000, len: 0x10_0000 }); // from `from_iort`
//!     dom.install_identity_regions(&rmrs, &mut smmu).ok()?;
//!     smmu.attach(dev, dom.attachment()).ok()?; // STE written last, CFGI_STE + CMD_SYNC
//!
//!     let mut tx = dom.try_alloc(4096, u64::MAX).ok()?.into_iova()?;
//!     dom.link(&mut tx, buf, 0, 4096, DmaDirection::ToDevice, MapAttrs::empty()).ok()?;
//!     dom.sync(&mut smmu).ok()?; // one CMD_SYNC
//!     // ... the device reads `tx.iova()` ...
//!     // Faults: decoded events (StreamID, address, stage), by polling or
//!     // from the event-queue interrupt (`handle_irq`).
//!     smmu.poll_events(|e| {
//!         let _ = e;
//!     });
//!     dom.destroy(tx, &mut smmu).ok()?;
//!     Some(())
//! }
//! ```
