//! Root and context tables in lent memory (root entry VT-d 9.1, context
//! entry 9.3): finding or creating a device's context entry (both modes),
//! the legacy entry for an attachment, legacy attach/detach, and reading a
//! device's state back. Scalable-mode attach is in `scalable`.

use super::{ContextEntry, ContextGranularity, IotlbGranularity, RootEntry, ScalableRootEntry};
use super::{TranslationType, Vtd};
use crate::addr::PhysAddr;
use crate::backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
use crate::barrier::wmb_on;
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// How a device's DMA is currently programmed, read back from the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DeviceState {
    /// No present context (or PASID) entry: DMA is blocked.
    Blocked,
    /// Translated through a second-level (or, in scalable mode, first-level) table.
    Translated {
        /// Which table format the unit walks.
        format: TableFormat,
        /// Domain-id.
        did: u16,
        /// Second-level table root.
        root: PhysAddr,
        /// Table levels (AW + 2).
        levels: u8,
    },
    /// Pass-through.
    PassThrough {
        /// Domain-id.
        did: u16,
    },
}

impl<M: TableMemory> Vtd<M> {
    /// Reads `N` consecutive 64-bit words of a lent table at `pa`.
    pub(super) fn read_words<const N: usize>(&self, pa: PhysAddr) -> [u64; N] {
        let p = self.mem.phys_to_virt(pa).cast::<u64>();
        let mut out = [0u64; N];
        for (i, w) in out.iter_mut().enumerate() {
            // SAFETY: `pa` is an 8-byte aligned entry of `N` words inside a
            // table page lent by `mem` (callers pass entry addresses only).
            *w = unsafe { p.add(i).read_volatile() };
        }
        out
    }

    /// Writes an entry whose present bit is bit 0 of word 0 so the hardware
    /// never sees a half-written present entry: a present entry gets word 0
    /// last, a not-present one first.
    pub(super) fn write_words(&self, pa: PhysAddr, words: &[u64]) {
        let p = self.mem.phys_to_virt(pa).cast::<u64>();
        let Some((&first, rest)) = words.split_first() else {
            return;
        };
        let write_rest = || {
            for (i, &w) in rest.iter().enumerate() {
                // SAFETY: as in `read_words`; word i + 1 of the entry.
                unsafe { p.add(i + 1).write_volatile(w) };
            }
        };
        if first & 1 != 0 {
            write_rest();
            wmb_on(&self.mem);
            // SAFETY: as in `read_words`; word 0 of the entry.
            unsafe { p.write_volatile(first) };
        } else {
            // SAFETY: as above.
            unsafe { p.write_volatile(first) };
            wmb_on(&self.mem);
            write_rest();
        }
        self.clean_table(pa, words.len() * 8);
    }

    /// Physical address of the context entry of `dev` (16 bytes in legacy
    /// mode, 32 in scalable mode), allocating the context table when `create`.
    pub(super) fn context_slot(
        &mut self,
        dev: DeviceId,
        create: bool,
    ) -> Result<Option<PhysAddr>, BackendError> {
        if dev.segment != self.segment {
            return Err(BackendError::UnknownDevice(dev));
        }
        let root = self
            .root
            .ok_or(BackendError::Unsupported("VT-d unit not initialised"))?;
        let rpa = PhysAddr(root.0 + u64::from(dev.bus) * 16);
        let raw = self.read_words::<2>(rpa);
        let existing = if self.scalable {
            ScalableRootEntry::from_raw(raw).context_table(dev.devfn)
        } else {
            let re = RootEntry::from_raw(raw);
            re.is_present().then(|| re.context_table())
        };
        let table = match existing {
            Some(t) => t,
            None if create => {
                let t = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
                self.clean_table(t, 4096);
                let new = if self.scalable {
                    ScalableRootEntry::from_raw(raw)
                        .with_context_table(dev.devfn, t)
                        .raw()
                } else {
                    RootEntry::present(t).raw()
                };
                // Only the half for this devfn changes; the other keeps its
                // value, so the write order of the halves does not matter.
                self.write_words(rpa, &new);
                t
            }
            None => return Ok(None),
        };
        Ok(Some(if self.scalable {
            PhysAddr(table.0 + u64::from(dev.devfn & 0x7f) * 32)
        } else {
            PhysAddr(table.0 + u64::from(dev.devfn) * 16)
        }))
    }

    fn read_context(&self, pa: PhysAddr) -> ContextEntry {
        ContextEntry::from_raw(self.read_words::<2>(pa))
    }

    fn write_context(&self, pa: PhysAddr, e: ContextEntry) {
        self.write_words(pa, &e.raw());
    }

    /// How `dev`'s DMA is programmed now, read back from the tables.
    ///
    /// # Errors
    ///
    /// - [`BackendError::UnknownDevice`]: `dev` is on another PCI segment
    ///   than this unit's.
    /// - [`BackendError::Unsupported`]: the unit was not initialised
    ///   ([`Vtd::init`]).
    pub fn device_state(&mut self, dev: DeviceId) -> Result<DeviceState, BackendError> {
        let Some(slot) = self.context_slot(dev, false)? else {
            return Ok(DeviceState::Blocked);
        };
        if self.scalable {
            return Ok(self.scalable_state(slot));
        }
        let ce = self.read_context(slot);
        Ok(if !ce.is_present() {
            DeviceState::Blocked
        } else if ce.tt() == TranslationType::PassThrough as u8 {
            DeviceState::PassThrough { did: ce.did() }
        } else {
            DeviceState::Translated {
                format: TableFormat::VtdSecondLevel,
                did: ce.did(),
                root: ce.slptptr(),
                levels: ce.aw() + 2,
            }
        })
    }

    fn entry_for(&self, how: Attachment) -> Result<ContextEntry, BackendError> {
        match how {
            Attachment::Blocked => Ok(ContextEntry::blocked()),
            Attachment::Bypass => {
                if !self.features.pt {
                    return Err(BackendError::Unsupported("pass-through needs ECAP.PT"));
                }
                // VT-d 9.3: with TT = 10b, AW names the largest AGAW the
                // unit supports, not the width of any table in use (Linux
                // `domain_context_mapping_one`: `iommu->msagaw`).
                let levels = self.features.largest_levels().unwrap_or(3);
                ContextEntry::pass_through(levels, self.bypass_did).ok_or(
                    BackendError::Unsupported("no address width for pass-through"),
                )
            }
            Attachment::Translated(info) => {
                self.check_translated(&info)?;
                ContextEntry::translated(info.root, info.levels, info.id)
                    .ok_or(BackendError::Unsupported("table levels"))
            }
        }
    }

    /// Whether this unit can walk `info`'s tables under its domain-id.
    pub(super) fn check_translated(&self, info: &DomainInfo) -> Result<(), BackendError> {
        match info.format {
            TableFormat::VtdSecondLevel if self.scalable && !self.features.slts => {
                return Err(BackendError::Unsupported(
                    "second-level tables in scalable mode need ECAP.SLTS",
                ));
            }
            TableFormat::VtdSecondLevel => {}
            TableFormat::VtdFirstLevel => {
                if !(self.scalable && self.features.flts) {
                    return Err(BackendError::Unsupported(
                        "first-level tables need scalable mode and ECAP.FLTS",
                    ));
                }
                if info.levels != 4 {
                    return Err(BackendError::Unsupported(
                        "first-level tables have 4 levels",
                    ));
                }
                return self.check_did(info.id);
            }
            _ => {
                return Err(BackendError::Unsupported(
                    "VT-d walks only VtdSecondLevel / VtdFirstLevel tables",
                ));
            }
        }
        if !self.features.supports_levels(info.levels) {
            return Err(BackendError::Unsupported(
                "table levels not in CAP.SAGAW (3 = 39-bit, 4 = 48-bit)",
            ));
        }
        self.check_did(info.id)
    }

    /// Points `dev`'s legacy-mode context entry at `how`, taking a present
    /// entry down and flushing it first (for [`IommuBackend::attach`]).
    pub(super) fn attach_legacy(
        &mut self,
        dev: DeviceId,
        how: Attachment,
    ) -> Result<(), BackendError> {
        let new = self.entry_for(how)?;
        let Some(slot) = self.context_slot(dev, new.is_present())? else {
            // No context table for the bus: the device is already blocked.
            return Ok(());
        };
        let old = self.read_context(slot);
        if old == new {
            return Ok(());
        }
        let sid = dev.source_id();
        if old.is_present() {
            // Present → anything: take it down first and flush what was cached
            // under the old domain-id (VT-d 6.5.3.3 / 6.2.2).
            self.write_context(slot, ContextEntry::blocked());
            self.flush_write_buffer()?;
            self.context_invalidate(ContextGranularity::Device {
                did: old.did(),
                sid,
            })?;
            self.iotlb_invalidate(IotlbGranularity::Domain(old.did()))?;
        }
        if new.is_present() {
            self.write_context(slot, new);
            self.flush_write_buffer()?;
            if self.features.caching_mode {
                // Not-present entries may be cached, tagged with domain-id 0 (6.1).
                self.context_invalidate(ContextGranularity::Device { did: 0, sid })?;
                self.iotlb_invalidate(IotlbGranularity::Domain(new.did()))?;
            }
        }
        self.sync()
    }
}
