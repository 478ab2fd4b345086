//! Scalable-mode attach (VT-d 9.4–9.6): each device gets a PASID directory
//! and PASID table; PASID 0 (the context entry's RID_PASID) holds its
//! second-level table or pass-through.

use super::sm::{PasidDirEntry, PasidEntry, Pgtt, ScalableContextEntry};
use super::{ContextGranularity, DeviceState, IotlbGranularity, PasidGranularity, Vtd};
use crate::addr::PhysAddr;
use crate::backend::{Attachment, IommuBackend, TableFormat};
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;

impl<M: TableMemory> Vtd<M> {
    fn read_sm_context(&self, slot: PhysAddr) -> ScalableContextEntry {
        ScalableContextEntry::from_raw(self.read_words::<4>(slot))
    }

    /// The PASID 0 entry a scalable context entry leads to, if its directory
    /// entry is present.
    fn read_pasid0(&self, ce: ScalableContextEntry) -> Option<PasidEntry> {
        let dir = ce.pasid_dir()?;
        let de = PasidDirEntry(self.read_words::<1>(dir)[0]);
        de.is_present()
            .then(|| PasidEntry::from_raw(self.read_words::<8>(de.table())))
    }

    pub(super) fn scalable_state(&self, slot: PhysAddr) -> DeviceState {
        let ce = self.read_sm_context(slot);
        if !ce.is_present() {
            return DeviceState::Blocked;
        }
        let Some(pe) = self.read_pasid0(ce).filter(|pe| pe.is_present()) else {
            return DeviceState::Blocked;
        };
        match pe.pgtt() {
            t if t == Pgtt::PassThrough as u8 => DeviceState::PassThrough { did: pe.did() },
            t if t == Pgtt::FirstLevel as u8 => DeviceState::Translated {
                format: TableFormat::VtdFirstLevel,
                did: pe.did(),
                root: pe.flptptr(),
                levels: 4,
            },
            t if t == Pgtt::SecondLevel as u8 => DeviceState::Translated {
                format: TableFormat::VtdSecondLevel,
                did: pe.did(),
                root: pe.slptptr(),
                levels: pe.aw() + 2,
            },
            _ => DeviceState::Blocked,
        }
    }

    /// Flushes what the unit may cache for `sid` under `did`: context entry,
    /// PASID 0 entry, IOTLB of the domain.
    /// The entries written before it reach memory first (CAP.RWBF).
    fn flush_scalable(&mut self, sid: u16, did: u16) -> Result<(), BackendError> {
        self.flush_write_buffer()?;
        self.context_invalidate(ContextGranularity::Device { did, sid })?;
        self.pasid_cache_invalidate(PasidGranularity::Pasid { did, pasid: 0 })?;
        self.iotlb_invalidate(IotlbGranularity::Domain(did))
    }

    pub(super) fn attach_scalable(
        &mut self,
        dev: DeviceId,
        how: Attachment,
    ) -> Result<(), BackendError> {
        let new = match how {
            Attachment::Blocked => None,
            Attachment::Bypass => {
                if !self.features.pt {
                    return Err(BackendError::Unsupported("pass-through needs ECAP.PT"));
                }
                // AW of the largest AGAW, as for legacy pass-through
                // (Linux `intel_pasid_setup_pass_through`).
                let levels = self.features.largest_levels().unwrap_or(3);
                Some(PasidEntry::pass_through(levels, self.bypass_did).ok_or(
                    BackendError::Unsupported("no address width for pass-through"),
                )?)
            }
            Attachment::Translated(info) => {
                self.check_translated(&info)?;
                Some(if info.format == TableFormat::VtdFirstLevel {
                    PasidEntry::first_level(info.root, info.id)
                } else {
                    PasidEntry::second_level(info.root, info.levels, info.id)
                        .ok_or(BackendError::Unsupported("table levels"))?
                })
            }
        };
        // Page walks snoop when the unit can (ECAP.SMPWC); `coherent_walk`
        // tells the core the same (Linux `intel_pasid_setup_second_level`:
        // `pasid_set_page_snoop(.., ecap_smpwc)`).
        let new = new.map(|pe| pe.with_page_walk_snoop(self.features.smpwc));
        let Some(slot) = self.context_slot(dev, new.is_some())? else {
            return Ok(());
        };
        let sid = dev.source_id();
        let old = self.read_sm_context(slot);
        let old_pe = self.read_pasid0(old);
        if old.is_present() {
            if new.is_some() && old_pe == new {
                return Ok(());
            }
            // Take the device down first; the directory stays for reuse.
            self.write_words(slot, &old.without_present().raw());
            let did = old_pe.map_or(0, |pe| pe.did());
            self.flush_scalable(sid, did)?;
            self.sync()?;
        }
        let Some(pe) = new else {
            return Ok(());
        };
        let dir = match old.pasid_dir() {
            Some(d) => d,
            None => {
                let d = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
                // The zeroes must reach memory before the unit may read the
                // directory (VT-d 6.2.4; a non-coherent unit sees no cache).
                self.clean_table(d, 4096);
                d
            }
        };
        let de = PasidDirEntry(self.read_words::<1>(dir)[0]);
        let table = if de.is_present() {
            de.table()
        } else {
            let t = self.mem.alloc_zeroed(1).ok_or(BackendError::OutOfMemory)?;
            self.clean_table(t, 4096);
            self.write_words(dir, &[PasidDirEntry::present(t).0]);
            t
        };
        // PASID 0 = table entry 0; not reachable while the context entry is
        // not present, so it is rewritten in place.
        self.write_words(table, &pe.raw());
        let ce = ScalableContextEntry::present(dir, ScalableContextEntry::PDTS_ONE_PAGE);
        self.write_words(slot, &ce.raw());
        // Not-present → present: flush what a caching-mode unit may hold for
        // the device (domain-id 0) and the new domain.
        if self.features.caching_mode {
            self.flush_write_buffer()?;
            self.context_invalidate(ContextGranularity::Device { did: 0, sid })?;
        }
        self.flush_scalable(sid, pe.did())?;
        self.sync()
    }
}
