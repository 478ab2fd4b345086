//! Pointing a stream at a domain: building the STE (and the CD of a stage-1
//! domain) and installing it without exposing a half-written entry.

use super::{
    Command, ContextDescriptor, STAGE1_MAIR, Smmu, SmmuError, Stage2Config, StallModel, Ste, ste,
};
use crate::addr::PhysAddr;
use crate::backend::{Attachment, DomainInfo, TableFormat};

/// The CD an STE pointed at before a failed update, and the one it points
/// at now.
type CdPair = (Option<PhysAddr>, Option<PhysAddr>);
use crate::mem::TableMemory;

impl<M: TableMemory> Smmu<M> {
    /// The STE that `how` needs for `sid`, allocating a CD for stage 1.
    fn build_ste(&mut self, how: &Attachment) -> Result<Ste, SmmuError> {
        let f = self.features;
        let info = match how {
            Attachment::Blocked => return Ok(Ste::abort()),
            Attachment::Bypass => return Ok(Ste::bypass()),
            Attachment::Translated(info) => info,
        };
        let ias = check_domain(info)?;
        match info.format {
            TableFormat::ArmStage1 => {
                if !f.stage1 {
                    return Err(SmmuError::Unsupported("stage 1 translation"));
                }
                fits("ASID", info.id.into(), f.asid_bits)?;
                let (oas_bits, ips) = f.output_size();
                fits("TTB0 beyond OAS", info.root.0, oas_bits)?;
                let cd = ContextDescriptor::with_walk(
                    info.id,
                    info.root,
                    64 - ias,
                    ips,
                    STAGE1_MAIR,
                    f.coherent,
                );
                let pa = self.mem.alloc_zeroed(1).ok_or(SmmuError::OutOfMemory)?;
                let p = self.mem.phys_to_virt(pa).cast::<u64>();
                for (i, w) in cd.0.iter().enumerate() {
                    // SAFETY: a fresh, page-aligned page lent by `mem`; the SMMU
                    // cannot see it until an STE points at it.
                    unsafe { p.add(i).write_volatile(*w) };
                }
                if !f.coherent {
                    self.mem.clean(pa, ContextDescriptor::SIZE);
                }
                // S1STALLD where the SMMU could stall: the driver terminates
                // faults (CD.A = 1, S = 0) and never resumes a stall.
                let no_stall = f.stall_model == StallModel::Stall;
                Ok(Ste::stage1_with(pa, 0, f.coherent, no_stall))
            }
            TableFormat::ArmStage2 => Ok(Ste::stage2(&self.stage2_config(info)?)),
            _ => Err(SmmuError::Unsupported("table format")),
        }
    }

    /// The stage-2 half of an STE for the stage-2 domain `info` (also the
    /// parent of a nested stream).
    pub(super) fn stage2_config(&self, info: &DomainInfo) -> Result<Stage2Config, SmmuError> {
        let f = self.features;
        if !f.stage2 {
            return Err(SmmuError::Unsupported("stage 2 translation"));
        }
        let ias = check_domain(info)?;
        fits("VMID", info.id.into(), f.vmid_bits)?;
        // The IPA space is capped by the OAS (§5.2 S2T0SZ). S2SL0 for
        // a 4 KiB granule: 0 starts at level 2, 1 at level 1, 2 at
        // level 0 — the root of a 2-, 3- or 4-level table.
        let (oas_bits, ps) = f.output_size();
        let ipa_bits = ias.min(oas_bits);
        let sl0 = info.levels - 2;
        fits("S2TTB beyond OAS", info.root.0, oas_bits)?;
        Ok(Stage2Config {
            vmid: info.id,
            ttb: info.root,
            t0sz: 64 - ipa_bits,
            sl0,
            ps,
            coherent: f.coherent,
        })
    }

    /// Installs `new` as the STE of `sid` following [`ste::update_plan`], so
    /// the SMMU never reads a half-written entry; each sync point is
    /// CFGI_STE (+ CFGI_CD for a stage-1 entry) and CMD_SYNC. Returns the
    /// entry it replaced.
    ///
    /// On an error after the STE was found, also returns the CD the entry
    /// pointed at before and the one it points at now (a sync that failed
    /// may leave the update half done).
    pub(super) fn write_ste(
        &mut self,
        sid: u32,
        new: Ste,
    ) -> Result<Ste, (SmmuError, Option<CdPair>)> {
        let coherent = self.features.coherent;
        let run = self.run.as_mut().ok_or((SmmuError::NotInitialised, None))?;
        let slot = run
            .strtab
            .locate(&self.mem, sid, coherent)
            .map_err(|e| (e, None))?;
        let old = slot.read();
        self.apply_plan(sid, &slot, &old, &new)
            .map_err(|e| (e, Some((old.context_ptr(), slot.read().context_ptr()))))?;
        Ok(old)
    }

    fn apply_plan(
        &mut self,
        sid: u32,
        slot: &super::strtab::SteSlot,
        old: &Ste,
        new: &Ste,
    ) -> Result<(), SmmuError> {
        let coherent = self.features.coherent;
        // A CD the stream used or will use: its cached copy goes too, so
        // after a detach nothing fetched for the stream stays cached.
        let has_cd = old.context_ptr().is_some() || new.context_ptr().is_some();
        // A guest's CD table (nested): every CD of the stream may be cached
        // (one per SubstreamID), so CFGI_CD_ALL.
        let has_guest_cds = old.guest_cd_table().is_some() || new.guest_cd_table().is_some();
        for step in ste::update_plan(old, new) {
            match step {
                ste::SteStep::Write { word, value } => {
                    // Earlier stores (and cleans) land before this one.
                    crate::barrier::wmb_on(&self.mem);
                    slot.write_word(word as usize, value);
                    if !coherent {
                        // The SMMU may fetch the live entry at any time: each
                        // step reaches memory before the next one is made.
                        self.mem.clean(slot.pa(), Ste::SIZE);
                    }
                }
                ste::SteStep::Sync => {
                    self.queue_command(Command::cfgi_ste(sid, true))?;
                    if has_cd {
                        self.queue_command(Command::cfgi_cd(sid, 0, true))?;
                    }
                    if has_guest_cds {
                        self.queue_command(Command::cfgi_cd_all(sid))?;
                    }
                    self.sync_commands()?;
                }
            }
        }
        Ok(())
    }

    /// Points `sid`'s STE at `how` (see
    /// [`IommuBackend::attach`](crate::backend::IommuBackend::attach)).
    ///
    /// # Errors
    ///
    /// [`SmmuError::NotInitialised`] before `init`; [`SmmuError::StreamIdOutOfRange`] for a
    /// StreamID the stream table does not cover; [`SmmuError::BadDomain`] /
    /// [`SmmuError::Unsupported`] for a domain this SMMU cannot translate (stage, levels, ASID/VMID
    /// width, output size); [`SmmuError::OutOfMemory`] when a level-2 array or context descriptor
    /// cannot be lent; [`SmmuError::ServiceFailure`] after `GERROR.SFM_ERR`; a command error or
    /// timeout of the CFGI/TLBI sync.
    pub fn attach_stream(&mut self, sid: u32, how: Attachment) -> Result<(), SmmuError> {
        if self.run.is_none() {
            return Err(SmmuError::NotInitialised);
        }
        let new = self.build_ste(&how)?;
        let old = match self.write_ste(sid, new) {
            Ok(old) => old,
            Err((e, states)) => {
                self.after_failed_write(new, states);
                return Err(e);
            }
        };
        self.after_replacing(&old, &new);
        Ok(())
    }
}

impl<M: TableMemory> Smmu<M> {
    /// Who owns the context descriptors of a failed STE update. `states`
    /// is the entry before and the entry now, when the STE was found.
    ///
    /// - A CD the STE points at now stays with it (freed when the STE is
    ///   replaced, or by `shutdown`).
    /// - The new CD, if the STE does not point at it: word 0 never held it
    ///   (it is the last word written), so the SMMU never saw it: freed now.
    /// - The old CD, if the STE no longer points at it: the SMMU may still
    ///   hold it (the CFGI_CD + CMD_SYNC did not complete), so it is kept
    ///   until `shutdown` has stopped the SMMU; should that list be full it
    ///   is leaked rather than freed early.
    pub(super) fn after_failed_write(&mut self, new: Ste, states: Option<CdPair>) {
        let now = states.and_then(|(_, now)| now);
        if let Some(cd) = new.context_ptr() {
            if Some(cd) != now {
                // SAFETY: allocated in `build_ste`; no STE word the SMMU
                // could read ever held its address.
                unsafe { self.mem.free(cd, 1) };
            }
        }
        let old_cd = states.and_then(|(old, _)| old);
        if let (Some(cd), Some(run)) = (old_cd, self.run.as_mut()) {
            if Some(cd) != now && Some(cd) != new.context_ptr() {
                let _ = run.stranded_cds.push(cd);
            }
        }
    }
}

/// `value` (the domain's `what`) must fit in `bits` bits.
fn fits(what: &'static str, value: u64, bits: u8) -> Result<(), SmmuError> {
    if value.checked_shr(bits.into()).unwrap_or(0) != 0 {
        return Err(SmmuError::BadDomain { what, value });
    }
    Ok(())
}

/// Input address bits of a domain, checked against the 4 KiB-granule shapes
/// the driver programs: 2, 3 or 4 levels (up to 30, 39, 48 bits).
fn check_domain(info: &DomainInfo) -> Result<u8, SmmuError> {
    if !(2..=4).contains(&info.levels) {
        return Err(SmmuError::BadDomain {
            what: "levels",
            value: info.levels as u64,
        });
    }
    let max = 12 + 9 * info.levels;
    // T0SZ <= 39 (§5.4 CD.T0SZ, §5.2 STE.S2T0SZ without IDR3.STT): at least 25 bits.
    if info.ias_bits > max || info.ias_bits < 25 {
        return Err(SmmuError::BadDomain {
            what: "ias_bits",
            value: info.ias_bits as u64,
        });
    }
    Ok(info.ias_bits)
}
