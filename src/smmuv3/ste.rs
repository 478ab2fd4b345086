//! Stream table entries and level-1 stream table descriptors (IHI 0070, §5.2, §5.1.2).

use crate::addr::PhysAddr;

/// STE.Config (§5.2, bits \[3:1\] of dword 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SteConfig {
    /// 0b000: abort every transaction, no event.
    Abort,
    /// 0b100: stage 1 and stage 2 bypass.
    Bypass,
    /// 0b101: stage 1 translates, stage 2 bypass.
    Stage1,
    /// 0b110: stage 1 bypass, stage 2 translates.
    Stage2,
    /// 0b111: both stages translate.
    Nested,
    /// Any other (reserved) value.
    Reserved(u8),
}

impl SteConfig {
    const fn bits(self) -> u64 {
        match self {
            SteConfig::Abort => 0b000,
            SteConfig::Bypass => 0b100,
            SteConfig::Stage1 => 0b101,
            SteConfig::Stage2 => 0b110,
            SteConfig::Nested => 0b111,
            SteConfig::Reserved(v) => (v & 0b111) as u64,
        }
    }

    const fn from_bits(v: u64) -> Self {
        match v & 0b111 {
            0b000 => SteConfig::Abort,
            0b100 => SteConfig::Bypass,
            0b101 => SteConfig::Stage1,
            0b110 => SteConfig::Stage2,
            0b111 => SteConfig::Nested,
            other => SteConfig::Reserved(other as u8),
        }
    }
}

const V: u64 = 1 << 0;
const CONFIG_SHIFT: u32 = 1;
/// S1ContextPtr / S2TTB / L2Ptr: physical address bits \[51:6\] (resp. \[51:4\]).
const ADDR_51_6: u64 = 0x000f_ffff_ffff_ffc0;
const ADDR_51_4: u64 = 0x000f_ffff_ffff_fff0;

// Dword 1.
const S1CIR_WBRA: u64 = 1 << 2;
const S1COR_WBRA: u64 = 1 << 4;
const S1CSH_ISH: u64 = 3 << 6;
/// S1CSH = 0b10: outer shareable (with S1CIR = S1COR = 0b00, non-cacheable).
const S1CSH_OSH: u64 = 2 << 6;
/// S1STALLD: stage-1 faults terminate, never stall (bit 27).
const S1STALLD: u64 = 1 << 27;
/// S1DSS = 0b10: a transaction without a SubstreamID uses CD 0 (bits \[1:0\]).
const S1DSS_SSID0: u64 = 0b10;
/// S1Fmt: dword 0 bits \[5:4\].
const S1FMT_SHIFT: u32 = 4;
/// S1CDMax: dword 0 bits \[63:59\].
const S1CDMAX_SHIFT: u32 = 59;
/// SHCFG = 0b01: use the incoming shareability.
const SHCFG_INCOMING: u64 = 1 << 44;

// Dword 2.
const S2VMID_MASK: u64 = 0xffff;
const VTCR_SHIFT: u32 = 32;
const S2AA64: u64 = 1 << 51;
const S2R: u64 = 1 << 58;

/// Stage-2 parameters of an STE (§5.2, dwords 2–3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Stage2Config {
    /// VMID tagging the stage-2 TLB entries.
    pub vmid: u16,
    /// Physical address of the stage-2 root table (S2TTB).
    pub ttb: PhysAddr,
    /// S2T0SZ: the IPA space is `64 - t0sz` bits.
    pub t0sz: u8,
    /// S2SL0 for a 4 KiB granule: 0 = start at level 2, 1 = level 1, 2 = level 0.
    pub sl0: u8,
    /// S2PS: output size encoding (as IDR5.OAS).
    pub ps: u8,
    /// The SMMU snoops CPU caches (IDR0.COHACC): the table walk is
    /// write-back inner shareable, else non-cacheable outer shareable — as
    /// SMMU_CR1 says for the SMMU's other accesses.
    pub coherent: bool,
}

impl Stage2Config {
    /// The VTCR field of dword 2 (bits \[50:32\]): T0SZ, SL0, IR0/OR0/SH0
    /// (write-back read/write-allocate inner shareable when coherent,
    /// non-cacheable outer shareable when not), TG = 4 KiB, PS. S2DS,
    /// S2HA and S2HD stay 0: the table counts live in bits 11:2 of table
    /// descriptors (`pgtable::counts`), IGNORED only without them.
    const fn vtcr(&self) -> u64 {
        let (cache, sh) = if self.coherent { (1, 3) } else { (0, 2) };
        (self.t0sz as u64 & 0x3f)
            | ((self.sl0 as u64 & 0b11) << 6)
            | (cache << 8) // S2IR0
            | (cache << 10) // S2OR0
            | (sh << 12) // S2SH0
            // S2TG = 0b00: 4 KiB
            | ((self.ps as u64 & 0b111) << 16)
    }
}

/// S1Fmt (§5.2, dword 0 bits \[5:4\]): how the CD table is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CdTableFormat {
    /// 0b00: a linear array of `2^S1CDMax` CDs.
    Linear,
    /// 0b01: two levels, 4 KiB level-2 tables (64 CDs each).
    TwoLevel4K,
    /// 0b10: two levels, 64 KiB level-2 tables (1024 CDs each).
    TwoLevel64K,
}

impl CdTableFormat {
    /// The S1Fmt field value.
    pub const fn bits(self) -> u64 {
        match self {
            CdTableFormat::Linear => 0b00,
            CdTableFormat::TwoLevel4K => 0b01,
            CdTableFormat::TwoLevel64K => 0b10,
        }
    }
}

/// Stage-1 parameters of a nested STE (§5.2 dwords 0–1): the CD table lives
/// in the guest's intermediate-physical space and is fetched through stage 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct NestedStage1Config {
    /// S1ContextPtr: the IPA of the CD table (64-byte aligned).
    pub cd_table_ipa: u64,
    /// S1Fmt.
    pub fmt: CdTableFormat,
    /// S1CDMax: the table holds `2^cd_max` CDs (0: one CD, no SubstreamIDs).
    pub cd_max: u8,
    /// As [`Stage2Config::coherent`]: the CD fetch attributes.
    pub coherent: bool,
    /// S1STALLD: stage-1 faults never stall (SMMUs with STALL_MODEL = 0b00).
    pub no_stall: bool,
}

/// A 64-byte stream table entry (§5.2), dwords in little-endian order.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ste(pub [u64; 8]);

impl Ste {
    /// Size of an STE in bytes.
    pub const SIZE: usize = 64;

    /// Valid, Config = abort: the stream's transactions are terminated
    /// without an event.
    pub const fn abort() -> Self {
        Self([V, 0, 0, 0, 0, 0, 0, 0])
    }

    /// Valid, Config = bypass, incoming shareability kept.
    pub const fn bypass() -> Self {
        Self([
            V | (SteConfig::Bypass.bits() << CONFIG_SHIFT),
            SHCFG_INCOMING,
            0,
            0,
            0,
            0,
            0,
            0,
        ])
    }

    /// Valid, stage 1 translates through the single context descriptor at
    /// `cd` (S1Fmt linear, S1CDMax = 0, S1STALLD = 0), stage 2 bypass.
    /// `vmid` tags stage-1 TLB entries when the SMMU also has stage 2.
    pub const fn stage1(cd: PhysAddr, vmid: u16) -> Self {
        Self::stage1_with(cd, vmid, true, false)
    }

    /// [`Ste::stage1`] for an SMMU that snoops CPU caches or not
    /// (`coherent`: the CD fetch is write-back inner shareable, else
    /// non-cacheable outer shareable, as SMMU_CR1), with S1STALLD set when
    /// `no_stall` (an SMMU with IDR0.STALL_MODEL = 0b00: Linux sets it for
    /// masters that cannot stall; the driver never resumes a stall).
    pub const fn stage1_with(cd: PhysAddr, vmid: u16, coherent: bool, no_stall: bool) -> Self {
        let attrs = if coherent {
            S1CIR_WBRA | S1COR_WBRA | S1CSH_ISH
        } else {
            S1CSH_OSH
        };
        let stalld = if no_stall { S1STALLD } else { 0 };
        Self([
            V | (SteConfig::Stage1.bits() << CONFIG_SHIFT) | (cd.0 & ADDR_51_6),
            attrs | stalld,
            vmid as u64 & S2VMID_MASK,
            0,
            0,
            0,
            0,
            0,
        ])
    }

    /// Valid, stage 1 bypass, stage 2 translates; faults are recorded (S2R).
    pub const fn stage2(cfg: &Stage2Config) -> Self {
        Self([
            V | (SteConfig::Stage2.bits() << CONFIG_SHIFT),
            SHCFG_INCOMING,
            (cfg.vmid as u64 & S2VMID_MASK) | (cfg.vtcr() << VTCR_SHIFT) | S2AA64 | S2R,
            cfg.ttb.0 & ADDR_51_4,
            0,
            0,
            0,
            0,
        ])
    }

    /// Valid, Config = 0b111 (nested): stage 1 through the guest's CD table
    /// at an IPA, stage 2 as [`Ste::stage2`] (whose VMID also tags the
    /// guest's stage-1 TLB entries). The stage-1 fields are those of
    /// [`Ste::stage1_with`] plus S1Fmt / S1CDMax, and with more than one CD
    /// S1DSS = 0b10: DMA without a SubstreamID uses CD 0 (Linux
    /// `arm_smmu_make_nested_cd_table_ste` takes these from the guest's
    /// STE; here the hypervisor states them). SHCFG stays "incoming" as in
    /// the stage-2 entry; EATS = 0 (no ATS).
    pub const fn nested(s1: &NestedStage1Config, s2: &Stage2Config) -> Self {
        let attrs = if s1.coherent {
            S1CIR_WBRA | S1COR_WBRA | S1CSH_ISH
        } else {
            S1CSH_OSH
        };
        let stalld = if s1.no_stall { S1STALLD } else { 0 };
        let dss = if s1.cd_max != 0 { S1DSS_SSID0 } else { 0 };
        let base = Self::stage2(s2);
        Self([
            V | (SteConfig::Nested.bits() << CONFIG_SHIFT)
                | (s1.fmt.bits() << S1FMT_SHIFT)
                | (s1.cd_table_ipa & ADDR_51_6)
                | ((s1.cd_max as u64 & 0x1f) << S1CDMAX_SHIFT),
            base.0[1] | attrs | stalld | dss,
            base.0[2],
            base.0[3],
            0,
            0,
            0,
            0,
        ])
    }

    /// Whether V is set.
    pub const fn valid(&self) -> bool {
        self.0[0] & V != 0
    }

    /// S2VMID (dword 2), meaningful for stage-2 and nested entries.
    pub const fn vmid(&self) -> u16 {
        (self.0[2] & S2VMID_MASK) as u16
    }

    /// The Config field.
    pub const fn config(&self) -> SteConfig {
        SteConfig::from_bits(self.0[0] >> CONFIG_SHIFT)
    }

    /// S1ContextPtr of a stage-1 entry: a CD the driver allocated. `None`
    /// for a nested entry, whose pointer is a guest IPA the driver does not
    /// own (see [`Ste::guest_cd_table`]).
    pub const fn context_ptr(&self) -> Option<PhysAddr> {
        match self.config() {
            SteConfig::Stage1 if self.valid() => Some(PhysAddr(self.0[0] & ADDR_51_6)),
            _ => None,
        }
    }

    /// S1ContextPtr of a nested entry: the IPA of the guest's CD table.
    pub const fn guest_cd_table(&self) -> Option<PhysAddr> {
        match self.config() {
            SteConfig::Nested if self.valid() => Some(PhysAddr(self.0[0] & ADDR_51_6)),
            _ => None,
        }
    }
}

/// One step of replacing a live STE (§3.21: the SMMU may read the entry
/// at any time, 64 bits at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SteStep {
    /// Store `value` into dword `word` (one single-copy-atomic 64-bit store,
    /// ordered after the previous steps).
    Write {
        /// Dword index, 0..8.
        word: u8,
        /// The value.
        value: u64,
    },
    /// CFGI_STE for the stream + CMD_SYNC: from here on the SMMU uses what
    /// is in memory.
    Sync,
}

/// The ordered steps that turn `old` into `new` such that every state the
/// SMMU can observe is `old`, `new`, or an aborting entry:
///
/// - to abort: dword 0 first (the rest is ignored from then on), then the
///   other dwords;
/// - from a live entry whose dwords 1–7 change: dword 0 to abort and a sync
///   first, so no cached or fresh read mixes the two;
/// - otherwise dwords 1–7, then dword 0 (which makes them count), then a sync.
pub fn update_plan(old: &Ste, new: &Ste) -> heapless::Vec<SteStep, 12> {
    let mut plan = heapless::Vec::new();
    // At most 1 + 1 + 7 + 1 + 1 = 11 steps: pushes cannot fail.
    let mut push = |step| {
        let _ = plan.push(step);
    };
    let changed = |i: usize| old.0.get(i) != new.0.get(i);
    let tail_changes = (1..8).any(changed);
    if new.config() == SteConfig::Abort {
        push(SteStep::Write {
            word: 0,
            value: new.0[0],
        });
    } else if old.valid() && old.config() != SteConfig::Abort && tail_changes {
        push(SteStep::Write {
            word: 0,
            value: Ste::abort().0[0],
        });
        push(SteStep::Sync);
    }
    for i in 1..8 {
        if changed(i) {
            push(SteStep::Write {
                word: i as u8,
                value: new.0[i],
            });
        }
    }
    if new.config() != SteConfig::Abort {
        push(SteStep::Write {
            word: 0,
            value: new.0[0],
        });
    }
    push(SteStep::Sync);
    plan
}

impl core::fmt::Debug for Ste {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Ste({:?}, {:#018x?})", self.config(), self.0)
    }
}

/// A level-1 stream table descriptor (§5.1.2): points at a level-2 array of
/// `2^(span - 1)` STEs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct L1Desc(pub u64);

impl L1Desc {
    /// A descriptor for a level-2 table at `l2` holding `2^split` STEs
    /// (Span = split + 1).
    pub const fn new(l2: PhysAddr, split: u8) -> Self {
        Self(((split as u64 + 1) & 0x1f) | (l2.0 & ADDR_51_6))
    }

    /// Span == 0: no level-2 table.
    pub const fn invalid() -> Self {
        Self(0)
    }

    /// The level-2 table, if the descriptor has one.
    pub const fn l2(&self) -> Option<PhysAddr> {
        if self.0 & 0x1f == 0 {
            None
        } else {
            Some(PhysAddr(self.0 & ADDR_51_6))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_and_bypass_match_the_spec_layout() {
        // V = 1, Config = 0b000.
        assert_eq!(Ste::abort().0[0], 0x1);
        // V = 1, Config = 0b100 -> bits [3:1] = 0b100 -> 0x9; SHCFG [45:44] = 0b01.
        let b = Ste::bypass();
        assert_eq!(b.0[0], 0x9);
        assert_eq!(b.0[1], 0x0000_1000_0000_0000);
        assert_eq!(b.config(), SteConfig::Bypass);
    }

    #[test]
    fn stage1_entry_points_at_the_context_descriptor() {
        let s = Ste::stage1(PhysAddr(0x4123_4000), 0);
        // V | Config 0b101 << 1 = 0xb, S1ContextPtr in [51:6], S1Fmt = S1CDMax = 0.
        assert_eq!(s.0[0], 0x4123_400b);
        // S1CIR = 1 (bits 3:2), S1COR = 1 (5:4), S1CSH = 3 (7:6): 0b1101_0100.
        assert_eq!(s.0[1], 0xd4);
        assert_eq!(s.0[2], 0);
        assert_eq!(s.context_ptr(), Some(PhysAddr(0x4123_4000)));
    }

    #[test]
    fn stage2_entry_carries_vmid_vtcr_and_ttb() {
        let s = Ste::stage2(&Stage2Config {
            vmid: 0x12,
            ttb: PhysAddr(0x4800_0000),
            t0sz: 25,
            sl0: 1,
            ps: 4,
            coherent: true,
        });
        // V | Config 0b110 << 1 = 0xd.
        assert_eq!(s.0[0], 0xd);
        assert_eq!(s.0[1], 1 << 44);
        // VTCR = T0SZ 25 | SL0 1 << 6 | IR0 1 << 8 | OR0 1 << 10 | SH0 3 << 12 | PS 4 << 16
        //      = 0x19 | 0x40 | 0x100 | 0x400 | 0x3000 | 0x40000 = 0x43559.
        // dword2 = VMID | VTCR << 32 | S2AA64 (51) | S2R (58).
        assert_eq!(s.0[2], 0x12 | (0x43559 << 32) | (1 << 51) | (1 << 58));
        assert_eq!(s.0[2], 0x040c_3559_0000_0012);
        assert_eq!(s.0[3], 0x4800_0000);
        assert_eq!(s.context_ptr(), None);
    }

    #[test]
    fn nested_entry_combines_the_guest_cd_table_with_stage2() {
        let s2 = Stage2Config {
            vmid: 0x12,
            ttb: PhysAddr(0x4800_0000),
            t0sz: 25,
            sl0: 1,
            ps: 4,
            coherent: true,
        };
        let s1 = NestedStage1Config {
            cd_table_ipa: 0x8_0000_1000,
            fmt: CdTableFormat::Linear,
            cd_max: 0,
            coherent: true,
            no_stall: false,
        };
        let n = Ste::nested(&s1, &s2);
        // V | Config 0b111 << 1 = 0xf; S1ContextPtr the IPA; S1Fmt = S1CDMax = 0.
        assert_eq!(n.0[0], 0x8_0000_100f);
        // S1CIR/S1COR/S1CSH = 0xd4 (as stage 1), SHCFG incoming (bit 44).
        assert_eq!(n.0[1], 0xd4 | 1 << 44);
        // Dwords 2-3 exactly as the stage-2 entry's.
        assert_eq!(n.0[2], 0x040c_3559_0000_0012);
        assert_eq!(n.0[3], 0x4800_0000);
        assert_eq!(n.config(), SteConfig::Nested);
        assert_eq!(n.vmid(), 0x12);
        // The driver owns no CD here: the pointer is the guest's IPA.
        assert_eq!(n.context_ptr(), None);
        assert_eq!(n.guest_cd_table(), Some(PhysAddr(0x8_0000_1000)));
        // 4 CDs in a linear table: S1CDMax = 2 ([63:59]), S1DSS = 0b10.
        let four = Ste::nested(
            &NestedStage1Config {
                cd_max: 2,
                no_stall: true,
                ..s1
            },
            &s2,
        );
        assert_eq!(four.0[0], 0x8_0000_100f | 2 << 59);
        assert_eq!(four.0[1], 0xd4 | 1 << 44 | 1 << 27 | 0b10);
    }

    /// Like Linux's arm-smmu-v3-test: every transition between a set of
    /// entries exposes only the old entry, the new one, or an abort, and
    /// ends with the new entry synced.
    #[test]
    fn live_updates_never_expose_a_mixed_entry() {
        let s2 = |vmid, ttb| {
            Ste::stage2(&Stage2Config {
                vmid,
                ttb: PhysAddr(ttb),
                t0sz: 25,
                sl0: 1,
                ps: 4,
                coherent: true,
            })
        };
        let entries = [
            Ste([0; 8]),
            Ste::abort(),
            Ste::bypass(),
            Ste::stage1(PhysAddr(0x4000_1000), 0),
            Ste::stage1(PhysAddr(0x4000_2000), 0),
            s2(1, 0x4800_0000),
            s2(2, 0x4900_0000),
            Ste::nested(
                &NestedStage1Config {
                    cd_table_ipa: 0x8_0000_1000,
                    fmt: CdTableFormat::Linear,
                    cd_max: 0,
                    coherent: true,
                    no_stall: false,
                },
                &Stage2Config {
                    vmid: 1,
                    ttb: PhysAddr(0x4800_0000),
                    t0sz: 25,
                    sl0: 1,
                    ps: 4,
                    coherent: true,
                },
            ),
        ];
        for old in &entries {
            for new in &entries {
                let plan = update_plan(old, new);
                let mut mem = *old;
                let mut syncs = 0;
                for step in &plan {
                    match *step {
                        SteStep::Write { word, value } => mem.0[word as usize] = value,
                        SteStep::Sync => syncs += 1,
                    }
                    // What the SMMU makes of an entry: V = 0 ignores the rest,
                    // so does Config = abort.
                    let meaning = |s: &Ste| match (s.valid(), s.config()) {
                        (false, _) => Ste([0; 8]),
                        (true, SteConfig::Abort) => Ste::abort(),
                        _ => *s,
                    };
                    let m = meaning(&mem);
                    assert!(
                        m == meaning(old) || m == meaning(new) || m == Ste::abort(),
                        "{old:?} -> {new:?}: exposes {mem:?} after {step:?}"
                    );
                }
                assert_eq!(mem, *new, "{old:?} -> {new:?}");
                assert_eq!(plan.last(), Some(&SteStep::Sync));
                // Two syncs only when a live entry's dwords 1-7 change.
                let live = old.valid() && old.config() != SteConfig::Abort;
                let two = live && new.config() != SteConfig::Abort && old.0[1..] != new.0[1..];
                assert_eq!(syncs, if two { 2 } else { 1 }, "{old:?} -> {new:?}");
            }
        }
        // Switching a stage-1 stream to another CD is one store and one sync.
        assert_eq!(
            update_plan(&entries[3], &entries[4]).as_slice(),
            &[
                SteStep::Write {
                    word: 0,
                    value: entries[4].0[0]
                },
                SteStep::Sync
            ]
        );
    }

    #[test]
    fn l1_descriptor_span_is_split_plus_one() {
        let d = L1Desc::new(PhysAddr(0x4010_0000), 8);
        assert_eq!(d.0, 0x4010_0009);
        assert_eq!(d.l2(), Some(PhysAddr(0x4010_0000)));
        assert_eq!(L1Desc::invalid().l2(), None);
    }
}
