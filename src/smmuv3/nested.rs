//! Nested translation (IHI 0070 §3.3.2, STE.Config = 0b111): a guest's
//! stage 1 on top of the hypervisor's stage 2.
//!
//! The hypervisor owns a stage-2 domain (its VMID tags every TLB entry the
//! stream makes); the guest owns a CD table and stage-1 tables in its own
//! intermediate-physical (IPA) space. The STE points at the guest's CD
//! table by IPA, as Linux iommufd's nested STE does
//! (`arm_smmu_make_nested_cd_table_ste`): the SMMU fetches the CDs and
//! walks the stage-1 tables through stage 2, then translates the stage-1
//! output (an IPA) through stage 2 again.
//!
//! Why a method and not an [`Attachment`](crate::Attachment) variant: the
//! shared enum is matched exhaustively by the VT-d driver and the test
//! doubles, and a guest CD table (S1Fmt, S1CDMax) is SMMU-specific; so
//! nesting is [`Smmu::attach_nested`] and nothing nested can reach VT-d.
//! Moving a nested stream back to a domain, bypass or abort is the ordinary
//! [`Smmu::attach_stream`] / `attach` / `detach`.
//!
//! Invalidation:
//! - the guest changed its stage-1 tables: [`Smmu::invalidate_guest_va`] /
//!   [`Smmu::invalidate_guest_asid`] (CMD_TLBI_NH_VA / NH_ASID tagged with the
//!   guest's VMID; §4.4.3–§4.4.4);
//! - the guest changed a CD: [`Smmu::invalidate_guest_cd`] /
//!   [`Smmu::invalidate_guest_cds`] (CMD_CFGI_CD / CMD_CFGI_CD_ALL);
//! - the hypervisor changed stage 2: the ordinary domain invalidation
//!   (CMD_TLBI_S2_IPA) is followed, once it completed, by CMD_TLBI_NH_ALL of
//!   the VMID: the SMMU may cache entries that combine both stages, which an
//!   IPA invalidation does not reach (Linux `arm_smmu_tlb_inv_range_domain`
//!   for a `nest_parent`: the S2 range with its sync, then NH_ALL with its
//!   own). The driver does this by itself for every VMID a nested stream
//!   uses: [`Smmu::sync_commands`] then issues a second CMD_SYNC.
//!
//! Each call queues; [`Smmu::sync_commands`] (or the backend's `sync`)
//! completes the batch with CMD_SYNC.

use super::ste::{CdTableFormat, NestedStage1Config};
use super::{Command, ContextDescriptor, STAGE1_MAIR, Smmu, SmmuError, StallModel, Ste, SteConfig};
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::backend::{DomainInfo, TableFormat};
use crate::mem::TableMemory;

/// Most VMIDs the driver tracks as used by nested streams at once (each
/// costs a CMD_TLBI_NH_ALL when its stage 2 changes).
pub const NESTED_VMIDS: usize = 16;

/// The guest's CD table, as the hypervisor points a stream at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GuestCdTable {
    /// IPA of the table (S1ContextPtr), 64-byte aligned, inside the
    /// stage-2 domain's input range.
    pub ipa: u64,
    /// S1Fmt.
    pub fmt: CdTableFormat,
    /// S1CDMax: `2^cd_max` CDs, at most IDR1.SSIDSIZE (0: one CD, the only
    /// choice on an SMMU without SubstreamIDs).
    pub cd_max: u8,
}

impl GuestCdTable {
    /// A table of one CD at `ipa`.
    pub const fn single(ipa: u64) -> Self {
        Self {
            ipa,
            fmt: CdTableFormat::Linear,
            cd_max: 0,
        }
    }
}

/// Input (IPA) bits of a stage-2 domain as the driver programs it (S2T0SZ):
/// the table's reach capped by the output size.
fn ipa_bits_of(oas_bits: u8, stage2: &DomainInfo) -> u8 {
    stage2.ias_bits.min(oas_bits)
}

/// Smallest IPS/OAS encoding whose size covers `bits`, capped at `max_enc`
/// (IHI 0070 §5.4 CD.IPS: 0 = 32 bits ... 5 = 48 bits).
fn ips_for(bits: u8, max_enc: u8) -> u8 {
    const SIZES: [u8; 6] = [32, 36, 40, 42, 44, 48];
    let enc = SIZES.iter().position(|&s| s >= bits).unwrap_or(5) as u8;
    enc.min(max_enc)
}

impl<M: TableMemory> Smmu<M> {
    /// Whether the SMMU can nest: IDR0.S1P and IDR0.S2P both set.
    pub fn supports_nested(&self) -> bool {
        self.features.stage1 && self.features.stage2
    }

    fn check_nested(&self, stage2: &DomainInfo) -> Result<(), SmmuError> {
        if !self.supports_nested() {
            return Err(SmmuError::Unsupported(
                "nested translation (needs IDR0.S1P and IDR0.S2P)",
            ));
        }
        if stage2.format != TableFormat::ArmStage2 {
            return Err(SmmuError::BadDomain {
                what: "nested parent is not a stage-2 domain",
                value: stage2.id.into(),
            });
        }
        // The driver's own stage-1 streams tag their TLB entries with VMID 0:
        // a guest's ASIDs under VMID 0 would share them (Linux allocates
        // nesting VMIDs from 1 too).
        if stage2.id == 0 {
            return Err(SmmuError::BadDomain {
                what: "VMID 0 is the host's stage-1 tag, not a guest's",
                value: 0,
            });
        }
        Ok(())
    }

    /// The STE for a nested stream: the guest's CD table on `stage2`.
    fn nested_ste(&self, stage2: &DomainInfo, cds: &GuestCdTable) -> Result<Ste, SmmuError> {
        self.check_nested(stage2)?;
        let f = self.features;
        let s2 = self.stage2_config(stage2)?;
        let ipa_bits = 64 - s2.t0sz;
        if cds.ipa % 64 != 0 || cds.ipa >> ipa_bits != 0 {
            return Err(SmmuError::BadDomain {
                what: "guest CD table IPA (64-byte aligned, inside stage 2)",
                value: cds.ipa,
            });
        }
        // §5.2 S1CDMax: at most IDR1.SSIDSIZE; with more than one CD a
        // linear table must be aligned to its size.
        if cds.cd_max > f.ssid_bits || cds.cd_max > 20 {
            return Err(SmmuError::BadDomain {
                what: "S1CDMax beyond IDR1.SSIDSIZE",
                value: cds.cd_max.into(),
            });
        }
        if cds.cd_max == 0 && cds.fmt != CdTableFormat::Linear {
            return Err(SmmuError::BadDomain {
                what: "two-level CD table of one CD",
                value: cds.fmt.bits(),
            });
        }
        if cds.fmt == CdTableFormat::Linear {
            let size = (ContextDescriptor::SIZE as u64) << cds.cd_max;
            if cds.ipa % size != 0 {
                return Err(SmmuError::BadDomain {
                    what: "linear CD table not aligned to its size",
                    value: cds.ipa,
                });
            }
        }
        Ok(Ste::nested(
            &NestedStage1Config {
                cd_table_ipa: cds.ipa,
                fmt: cds.fmt,
                cd_max: cds.cd_max,
                coherent: f.coherent,
                no_stall: f.stall_model == StallModel::Stall,
            },
            &s2,
        ))
    }

    /// Points `sid` at nested translation: the guest's CD table `cds` (at
    /// an IPA) on the hypervisor's stage-2 domain `stage2` (whose VMID the
    /// guest's TLB entries carry). Installed like every STE update (never
    /// a half-written entry; CFGI_STE + CFGI_CD_ALL + CMD_SYNC). From then
    /// on, invalidating `stage2` also flushes the guest's stage-1 entries of
    /// that VMID (see the module docs).
    ///
    /// The guest writes its CDs (see
    /// [`guest_context_descriptor`](Self::guest_context_descriptor)) and
    /// stage-1 tables into its memory before the device's first DMA; stage 2
    /// must map the CD table and table pages.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Unsupported`] without IDR0.S1P and IDR0.S2P;
    /// [`SmmuError::BadDomain`] for a parent that is not stage 2, VMID 0 (the tag of the driver's
    /// own stage-1 streams), a VMID, level count or size
    /// the SMMU cannot take, a CD table IPA that is misaligned or outside the stage-2 input range,
    /// S1CDMax beyond IDR1.SSIDSIZE, or more than [`NESTED_VMIDS`] VMIDs in nested use;
    /// otherwise as [`attach_stream`](Self::attach_stream).
    pub fn attach_nested(
        &mut self,
        sid: u32,
        stage2: &DomainInfo,
        cds: &GuestCdTable,
    ) -> Result<(), SmmuError> {
        let run = self.run.as_ref().ok_or(SmmuError::NotInitialised)?;
        let new = self.nested_ste(stage2, cds)?;
        let vmid = stage2.id;
        if !run.nested_vmids.iter().any(|&(v, _)| v == vmid) && run.nested_vmids.is_full() {
            return Err(SmmuError::BadDomain {
                what: "more VMIDs in nested use than NESTED_VMIDS",
                value: vmid.into(),
            });
        }
        // Counted before the write: should it fail half-way the stream may
        // already use the VMID nested, and an extra NH_ALL is harmless.
        self.count_nested(vmid, true);
        let old = match self.write_ste(sid, new) {
            Ok(old) => old,
            Err((e, states)) => {
                if states.is_none() {
                    // The STE was never found (StreamID out of range, no
                    // level-2 array): nothing uses the VMID nested.
                    self.count_nested(vmid, false);
                }
                self.after_failed_write(new, states);
                return Err(e);
            }
        };
        self.after_replacing(&old, &new);
        Ok(())
    }

    /// Bookkeeping once `old` was replaced by `new` and the change completed:
    /// the CD page the driver lent a stage-1 entry goes back, and a nested
    /// entry's VMID loses a user.
    pub(super) fn after_replacing(&mut self, old: &Ste, new: &Ste) {
        if let Some(old_cd) = old.context_ptr() {
            if Some(old_cd) != new.context_ptr() {
                // SAFETY: the old CD page came from `build_ste`; the STE no
                // longer points at it and CFGI_STE + CMD_SYNC completed, so
                // the SMMU holds no reference to it.
                unsafe { self.mem.free(old_cd, 1) };
            }
        }
        if old.valid() && old.config() == SteConfig::Nested {
            self.count_nested(old.vmid(), false);
        }
    }

    /// One more (`up`) or one fewer nested stream on `vmid`.
    fn count_nested(&mut self, vmid: u16, up: bool) {
        let Some(run) = self.run.as_mut() else {
            return;
        };
        let set = &mut run.nested_vmids;
        match set.iter().position(|&(v, _)| v == vmid) {
            Some(i) if up => set[i].1 += 1,
            Some(i) => {
                set[i].1 -= 1;
                if set[i].1 == 0 {
                    set.swap_remove(i);
                }
            }
            // Capacity was checked by the caller.
            None if up => {
                let _ = set.push((vmid, 1));
            }
            None => {}
        }
    }

    /// Whether a stream uses `vmid` for nested translation.
    pub fn is_nested_vmid(&self, vmid: u16) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| r.nested_vmids.iter().any(|&(v, _)| v == vmid))
    }

    /// Records that stage 2 of `vmid` changed: when nested streams use it,
    /// the next sync flushes their stage-1 (combined) entries too.
    pub(super) fn note_stage2_change(&mut self, vmid: u16) {
        if !self.is_nested_vmid(vmid) {
            return;
        }
        if let Some(run) = self.run.as_mut() {
            if !run.pending_nh_all.contains(&vmid) {
                // As many slots as nested VMIDs: cannot fail.
                let _ = run.pending_nh_all.push(vmid);
            }
        }
    }

    /// After a completed CMD_SYNC: TLBI_NH_ALL for every nested VMID whose
    /// stage 2 changed in the batch, and a second CMD_SYNC.
    pub(super) fn flush_nested_stage1(&mut self) -> Result<(), SmmuError> {
        let pending = match self.run.as_mut() {
            Some(run) if !run.pending_nh_all.is_empty() => core::mem::take(&mut run.pending_nh_all),
            _ => return Ok(()),
        };
        let r = (|| {
            for &vmid in &pending {
                self.queue_command(Command::tlbi_nh_all(vmid))?;
            }
            self.sync_batch()
        })();
        if r.is_err() {
            // Not done: the next sync tries again.
            if let Some(run) = self.run.as_mut() {
                run.pending_nh_all = pending;
            }
        }
        r
    }

    /// The CD a guest writes into its own memory for a stage-1 context on
    /// top of `stage2`: `asid`, tables at `ttb0_ipa` (an IPA) with `levels`
    /// levels (2–4, 4 KiB granule; input size `12 + 9 * levels` bits, at
    /// least 25), output size (IPS) the smallest that covers the stage-2
    /// input range. Walk attributes, A, R, AA64 as the driver's own CDs.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Unsupported`] without nesting; [`SmmuError::BadDomain`] for an ASID wider
    /// than the SMMU's, a level count outside 2–4, a TTB0 that is not 4 KiB aligned or outside
    /// the stage-2 input range.
    pub fn guest_context_descriptor(
        &self,
        stage2: &DomainInfo,
        asid: u16,
        ttb0_ipa: u64,
        levels: u8,
    ) -> Result<ContextDescriptor, SmmuError> {
        self.check_nested(stage2)?;
        let f = self.features;
        if u64::from(asid) >> f.asid_bits != 0 {
            return Err(SmmuError::BadDomain {
                what: "ASID",
                value: asid.into(),
            });
        }
        if !(2..=4).contains(&levels) {
            return Err(SmmuError::BadDomain {
                what: "levels",
                value: levels.into(),
            });
        }
        let (oas_bits, max_enc) = f.output_size();
        let ipa_bits = ipa_bits_of(oas_bits, stage2);
        if ttb0_ipa % PAGE_SIZE != 0 || ttb0_ipa >> ipa_bits != 0 {
            return Err(SmmuError::BadDomain {
                what: "guest TTB0 IPA (4 KiB aligned, inside stage 2)",
                value: ttb0_ipa,
            });
        }
        // T0SZ <= 39 (§5.4): at least 25 input bits.
        let ias = (12 + 9 * levels).max(25);
        Ok(ContextDescriptor::with_walk(
            asid,
            PhysAddr(ttb0_ipa),
            64 - ias,
            ips_for(ipa_bits, max_enc),
            STAGE1_MAIR,
            f.coherent,
        ))
    }

    /// The guest changed stage-1 entries of `[iova, iova + len)` in `asid`:
    /// queues CMD_TLBI_NH_VA tagged with the guest's `vmid` (ranges with
    /// IDR3.RIL, else pages, else NH_ASID past the threshold); `leaf_only`
    /// false when table pages changed.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Unsupported`] without nesting; otherwise as
    /// [`invalidate_range`](Self::invalidate_range).
    pub fn invalidate_guest_va(
        &mut self,
        vmid: u16,
        asid: u16,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), SmmuError> {
        let guest = self.guest_domain(asid)?;
        self.invalidate_tagged(&guest, vmid, iova, len, leaf_only, 0)
    }

    /// The guest dropped or replaced everything of `asid`: queues
    /// CMD_TLBI_NH_ASID tagged with `vmid`.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Unsupported`] without nesting; as
    /// [`queue_command`](Self::queue_command).
    pub fn invalidate_guest_asid(&mut self, vmid: u16, asid: u16) -> Result<(), SmmuError> {
        self.guest_domain(asid)?;
        self.queue_command(Command::tlbi_nh_asid(vmid, asid))
    }

    /// The guest changed the CD of `ssid` in the table of stream `sid`:
    /// queues CMD_CFGI_CD (Leaf = 1). (A new ASID in the CD also needs the
    /// old ASID's TLB entries invalidated.)
    ///
    /// # Errors
    ///
    /// [`SmmuError::Unsupported`] without nesting; [`SmmuError::BadDomain`] for an SSID beyond
    /// IDR1.SSIDSIZE; as [`queue_command`](Self::queue_command).
    pub fn invalidate_guest_cd(&mut self, sid: u32, ssid: u32) -> Result<(), SmmuError> {
        if !self.supports_nested() {
            return Err(SmmuError::Unsupported("nested translation"));
        }
        if u64::from(ssid) >> self.features.ssid_bits != 0 {
            return Err(SmmuError::BadDomain {
                what: "SubstreamID beyond IDR1.SSIDSIZE",
                value: ssid.into(),
            });
        }
        self.queue_command(Command::cfgi_cd(sid, ssid, true))
    }

    /// The guest changed several CDs of stream `sid` (or its table
    /// layout): queues CMD_CFGI_CD_ALL.
    ///
    /// # Errors
    ///
    /// [`SmmuError::Unsupported`] without nesting; as
    /// [`queue_command`](Self::queue_command).
    pub fn invalidate_guest_cds(&mut self, sid: u32) -> Result<(), SmmuError> {
        if !self.supports_nested() {
            return Err(SmmuError::Unsupported("nested translation"));
        }
        self.queue_command(Command::cfgi_cd_all(sid))
    }

    /// A stage-1 [`DomainInfo`] standing for the guest's `asid` (for the
    /// TLBI planner; root and levels are not used).
    fn guest_domain(&self, asid: u16) -> Result<DomainInfo, SmmuError> {
        if !self.supports_nested() {
            return Err(SmmuError::Unsupported("nested translation"));
        }
        if u64::from(asid) >> self.features.asid_bits != 0 {
            return Err(SmmuError::BadDomain {
                what: "ASID",
                value: asid.into(),
            });
        }
        Ok(DomainInfo {
            id: asid,
            root: PhysAddr(0),
            format: TableFormat::ArmStage1,
            levels: 4,
            ias_bits: 48,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_covers_the_ipa_range_within_the_oas() {
        assert_eq!(ips_for(39, 4), 2); // 40 bits
        assert_eq!(ips_for(40, 4), 2);
        assert_eq!(ips_for(44, 4), 4);
        assert_eq!(ips_for(48, 4), 4); // capped at the OAS
        assert_eq!(ips_for(30, 5), 0);
    }
}
