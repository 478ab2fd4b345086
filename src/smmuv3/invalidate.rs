//! TLB invalidation planning: a range becomes range TLBIs (IDR3.RIL), page
//! TLBIs, or one ASID/VMID-wide TLBI.

use super::{Command, Smmu, SmmuError, TlbiRange};
use crate::addr::{DmaAddr, PAGE_SIZE};
use crate::backend::{DomainInfo, TableFormat};
use crate::mem::TableMemory;

/// Most page-by-page TLBIs one invalidation queues (without IDR3.RIL);
/// longer ranges take one ASID/VMID-wide TLBI. Linux draws the same line
/// (`CMDQ_MAX_TLBI_OPS`, one page of commands' worth: 512 for 4 KiB pages).
pub const MAX_TLBI_PAGES: u64 = 512;

/// How [`plan`] turns a range into commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Planner {
    /// Stage-1 domain (TLBI_NH_VA / TLBI_NH_ASID) or stage 2 (TLBI_S2_IPA /
    /// TLBI_S12_VMALL).
    pub stage1: bool,
    /// ASID (stage 1) or VMID (stage 2).
    pub id: u16,
    /// The VMID stage-1 TLBIs are tagged with: 0 for the driver's own
    /// stage-1 domains, the guest's VMID for a nested guest's ASID.
    pub s1_vmid: u16,
    /// Range TLBIs may be used (IDR3.RIL and the configuration).
    pub ril: bool,
    /// Without ranges: more pages than this are invalidated by ASID/VMID.
    pub threshold: u64,
}

impl Planner {
    /// The whole-domain invalidation: TLBI_NH_ASID for stage 1 (every
    /// stage-1 entry and walk of the ASID), TLBI_S12_VMALL for stage 2.
    pub(super) const fn all(&self) -> Command {
        if self.stage1 {
            Command::tlbi_nh_asid(self.s1_vmid, self.id)
        } else {
            Command::tlbi_s12_vmall(self.id)
        }
    }

    /// Emits the commands that invalidate `pages` 4 KiB pages from the
    /// page-aligned `start`: leaf entries only when `leaf`, with `ttl` the
    /// level (1–3) of those leaf entries when the caller knows it (0: not
    /// known). Non-leaf invalidation (tables were freed or replaced) sets
    /// Leaf = 0 and never a level hint, so walk caches of every level go.
    pub(super) fn plan(
        &self,
        start: u64,
        pages: u64,
        leaf: bool,
        ttl: u8,
        mut emit: impl FnMut(Command) -> Result<(), SmmuError>,
    ) -> Result<(), SmmuError> {
        // The TTL hint names a leaf level, 1 to 3 (0: unknown); every
        // caller's level is refused here, before any command is queued.
        if ttl > 3 {
            return Err(SmmuError::BadDomain {
                what: "leaf level",
                value: ttl.into(),
            });
        }
        let (vmid, asid) = if self.stage1 {
            (self.s1_vmid, self.id)
        } else {
            (self.id, 0)
        };
        let tlbi =
            |addr, range| Command::tlbi_addr(self.stage1, vmid, asid, addr, leaf, range, ttl);
        if pages == 0 {
            return Ok(());
        }
        if self.ril {
            // Each command covers `(NUM + 1) << SCALE` pages; a one-page
            // chunk without a level hint is sent as a single-address TLBI
            // (`Command::tlbi_addr`), never as the reserved TTL = NUM =
            // SCALE = 0 range.
            let mut addr = start;
            let mut left = pages;
            while let Some(r) = TlbiRange::first_chunk(left) {
                emit(tlbi(addr, Some(r)))?;
                left -= r.pages();
                addr = addr.wrapping_add(r.pages() * PAGE_SIZE);
            }
            if left != 0 {
                // Beyond what SCALE can express (2^31 pages): take it all.
                emit(self.all())?;
            }
            Ok(())
        } else if pages > self.threshold {
            emit(self.all())
        } else {
            for i in 0..pages {
                emit(tlbi(start + i * PAGE_SIZE, None))?;
            }
            Ok(())
        }
    }
}

impl<M: TableMemory> Smmu<M> {
    /// Queues TLB invalidation of `[iova, iova + len)` in `domain`.
    ///
    /// # Errors
    ///
    /// [`SmmuError::NotInitialised`] before `init`; [`SmmuError::ServiceFailure`] after
    /// `GERROR.SFM_ERR`; a timeout or command error met while a full queue is drained.
    pub fn invalidate_range(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), SmmuError> {
        self.invalidate_range_at_level(domain, iova, len, leaf_only, 0)
    }

    /// [`invalidate_range`](Self::invalidate_range) for a caller that knows
    /// the level (1–3) of every leaf entry removed from the range (e.g. only
    /// 2 MiB blocks: level 2): range TLBIs then carry it as their TTL hint,
    /// which lets the SMMU skip the other levels. `level` 0 means unknown;
    /// the hint is dropped for non-leaf invalidation.
    ///
    /// # Errors
    ///
    /// As [`invalidate_range`](Self::invalidate_range).
    pub fn invalidate_range_at_level(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
        level: u8,
    ) -> Result<(), SmmuError> {
        if len == 0 {
            return Ok(());
        }
        let (start, pages) = page_span(iova, len)?;
        let planner = self.planner(domain)?;
        planner.plan(start, pages, leaf_only, level, |cmd| {
            self.queue_command(cmd)
        })?;
        if !planner.stage1 {
            self.note_stage2_change(planner.id);
        }
        Ok(())
    }

    /// Stage-1 invalidation of `domain`'s ASID tagged with `vmid` (a nested
    /// guest's), planned as [`invalidate_range_at_level`](Self::invalidate_range_at_level).
    pub(super) fn invalidate_tagged(
        &mut self,
        domain: &DomainInfo,
        vmid: u16,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
        level: u8,
    ) -> Result<(), SmmuError> {
        if len == 0 {
            return Ok(());
        }
        let (start, pages) = page_span(iova, len)?;
        let mut planner = self.planner(domain)?;
        planner.s1_vmid = vmid;
        planner.plan(start, pages, leaf_only, level, |cmd| {
            self.queue_command(cmd)
        })
    }

    pub(super) fn planner(&self, domain: &DomainInfo) -> Result<Planner, SmmuError> {
        let stage1 = match domain.format {
            TableFormat::ArmStage1 => true,
            TableFormat::ArmStage2 => false,
            _ => return Err(SmmuError::Unsupported("table format")),
        };
        let (use_ril, threshold) = self.run.as_ref().map_or((false, 0), |r| {
            (r.config.range_invalidation, r.config.tlbi_page_threshold)
        });
        Ok(Planner {
            stage1,
            id: domain.id,
            s1_vmid: 0,
            ril: self.features.range_invalidation && use_ril,
            // One call never queues more than MAX_TLBI_PAGES page TLBIs,
            // whatever the configuration: a 2^52-page range would otherwise
            // take 2^52 commands.
            threshold: threshold.min(MAX_TLBI_PAGES),
        })
    }

    /// Queues invalidation of everything the SMMU caches for `domain`:
    /// TLBI_NH_ASID (stage 1) or TLBI_S12_VMALL (stage 2), which also remove
    /// the walk-cache entries of its tables.
    pub(super) fn invalidate_all_of(&mut self, domain: &DomainInfo) -> Result<(), SmmuError> {
        let cmd = self.planner(domain)?.all();
        self.queue_command(cmd)
    }
}

/// The first page and the page count of `[iova, iova + len)`, widened to
/// whole pages.
fn page_span(iova: DmaAddr, len: u64) -> Result<(u64, u64), SmmuError> {
    let start = iova.0 & !(PAGE_SIZE - 1);
    let end = iova
        .0
        .checked_add(len)
        .and_then(|e| e.checked_add(PAGE_SIZE - 1))
        .ok_or(SmmuError::BadDomain {
            what: "invalidation range",
            value: len,
        })?
        & !(PAGE_SIZE - 1);
    Ok((start, (end - start) / PAGE_SIZE))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::testing::smmu_cmd::{Decoded, SmmuCaps, check_command};

    fn caps(ril: bool) -> SmmuCaps {
        SmmuCaps {
            stage1: true,
            stage2: true,
            hyp: false,
            sev: false,
            msi: false,
            ril,
            asid16: true,
            vmid16: true,
            granules: [true, false, false],
            sid_bits: 16,
            ssid_bits: 0,
            coherent: true,
            stall_model: 1,
            oas_bits: 48,
        }
    }

    /// Every command the planner emits for `pages` pages from `start` is
    /// legal, tagged with the domain, of the asked leaf-ness, and together
    /// they cover the range (or one command takes the whole domain).
    fn check_plan(p: &Planner, start: u64, pages: u64, leaf: bool, ttl: u8) {
        let mut cmds = Vec::new();
        p.plan(start, pages, leaf, ttl, |c| {
            cmds.push(c);
            Ok(())
        })
        .unwrap();
        let caps = caps(p.ril);
        let mut spans = Vec::new();
        let mut whole = false;
        for c in &cmds {
            let d = check_command(&caps, c.0).unwrap_or_else(|e| {
                panic!("{p:?} {start:#x}+{pages} leaf {leaf} ttl {ttl}: {c:?}: {e:?}")
            });
            match d {
                Decoded::TlbiAddr {
                    vmid,
                    asid,
                    leaf: l,
                    ttl: t,
                    ..
                } => {
                    assert_eq!(l, leaf, "{c:?}");
                    if p.stage1 {
                        assert_eq!((vmid, asid), (0, Some(p.id)));
                    } else {
                        assert_eq!((vmid, asid), (p.id, None));
                    }
                    // A hint only when given, for leaf invalidation.
                    assert!(t == 0 || (leaf && t == ttl), "{c:?}");
                    spans.push(d.tlbi_span().unwrap());
                }
                Decoded::TlbiNhAsid { asid, .. } if p.stage1 => {
                    assert_eq!(asid, p.id);
                    whole = true;
                }
                Decoded::TlbiS12Vmall { vmid } if !p.stage1 => {
                    assert_eq!(vmid, p.id);
                    whole = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        if whole {
            return;
        }
        spans.sort_unstable();
        let end = start + pages * PAGE_SIZE;
        let mut cur = start;
        for (s, e) in spans {
            assert!(s <= cur, "gap at {cur:#x} in {start:#x}+{pages}");
            cur = cur.max(e);
        }
        assert!(cur >= end, "{start:#x}+{pages} covered only to {cur:#x}");
        // Without a whole-domain fallback nothing beyond the range goes.
        assert_eq!(cur, end, "{start:#x}+{pages} over-invalidated");
    }

    #[test]
    fn strict_smmu_tlbi_plans_are_legal_and_cover_every_range() {
        let mut sizes: Vec<u64> = (1..=70).collect();
        sizes.extend([
            95, 96, 97, 511, 512, 513, 1023, 1025, 4095, 4097, 0x3_0001, 0x12_3457,
        ]);
        if cfg!(miri) {
            // Every command is decoded and checked: keep Miri's run short.
            sizes = Vec::from([1, 2, 3, 64, 65, 513]);
        }
        for stage1 in [true, false] {
            for ril in [true, false] {
                let p = Planner {
                    stage1,
                    id: 0x42,
                    s1_vmid: 0,
                    ril,
                    threshold: 64,
                };
                for &pages in &sizes {
                    for start in [0u64, 0x1000, 0x20_0000, 0x7fff_f000] {
                        for leaf in [true, false] {
                            for ttl in 0..=3 {
                                check_plan(&p, start, pages, leaf, ttl);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn strict_smmu_one_page_tlbi_is_the_single_address_form() {
        let p = Planner {
            stage1: true,
            id: 3,
            s1_vmid: 0,
            ril: true,
            threshold: 64,
        };
        for leaf in [true, false] {
            let mut cmds = Vec::new();
            p.plan(0x40_0000, 1, leaf, 0, |c| {
                cmds.push(c);
                Ok(())
            })
            .unwrap();
            // TG = 0, NUM = SCALE = TTL = 0; Leaf as asked.
            assert_eq!(
                cmds,
                [Command::raw([
                    0x0003_0000_0000_0012,
                    0x40_0000 | leaf as u64
                ])]
            );
        }
        // With the level known, a leaf page may use the hinted range form.
        let mut cmds = Vec::new();
        p.plan(0x40_0000, 1, true, 3, |c| {
            cmds.push(c);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            cmds,
            [Command::raw([
                0x0003_0000_0000_0012,
                0x40_0000 | 3 << 8 | 1 << 10 | 1
            ])]
        );
    }

    #[test]
    fn a_leaf_level_above_3_is_refused_before_any_command() {
        for stage1 in [true, false] {
            let p = Planner {
                stage1,
                id: 3,
                s1_vmid: 5,
                ril: true,
                threshold: 64,
            };
            let mut cmds = Vec::new();
            let r = p.plan(0x40_0000, 4, true, 4, |c| {
                cmds.push(c);
                Ok(())
            });
            assert_eq!(
                r,
                Err(SmmuError::BadDomain {
                    what: "leaf level",
                    value: 4
                })
            );
            assert!(cmds.is_empty(), "{cmds:?}");
        }
    }
}
