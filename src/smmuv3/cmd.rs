//! Command queue entries (IHI 0070, §4): 16-byte commands built field by field.

/// Command opcodes (§4.1–§4.7), byte 0 of every command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
#[allow(non_camel_case_types)]
pub enum Opcode {
    /// CMD_PREFETCH_CONFIG (§4.2.1).
    PREFETCH_CONFIG = 0x01,
    /// CMD_CFGI_STE (§4.3.1).
    CFGI_STE = 0x03,
    /// CMD_CFGI_STE_RANGE (§4.3.2); CMD_CFGI_ALL is its Range = 31 form.
    CFGI_STE_RANGE = 0x04,
    /// CMD_CFGI_CD (§4.3.3).
    CFGI_CD = 0x05,
    /// CMD_CFGI_CD_ALL (§4.3.4).
    CFGI_CD_ALL = 0x06,
    /// CMD_TLBI_NH_ALL (§4.4.2).
    TLBI_NH_ALL = 0x10,
    /// CMD_TLBI_NH_ASID (§4.4.3).
    TLBI_NH_ASID = 0x11,
    /// CMD_TLBI_NH_VA (§4.4.4).
    TLBI_NH_VA = 0x12,
    /// CMD_TLBI_NH_VAA (§4.4.5).
    TLBI_NH_VAA = 0x13,
    /// CMD_TLBI_EL3_ALL (§4.4.6).
    TLBI_EL3_ALL = 0x18,
    /// CMD_TLBI_EL2_ALL (§4.4.8).
    TLBI_EL2_ALL = 0x20,
    /// CMD_TLBI_S12_VMALL (§4.4.11).
    TLBI_S12_VMALL = 0x28,
    /// CMD_TLBI_S2_IPA (§4.4.12).
    TLBI_S2_IPA = 0x2a,
    /// CMD_TLBI_NSNH_ALL (§4.4.13).
    TLBI_NSNH_ALL = 0x30,
    /// CMD_SYNC (§4.7.3).
    SYNC = 0x46,
}

/// Range of a TLBI in 4 KiB pages: `(num + 1) << scale` pages (§4.4.1.1,
/// used when IDR3.RIL = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TlbiRange {
    /// NUM, 0..=31.
    pub num: u8,
    /// SCALE, 0..=31.
    pub scale: u8,
}

impl TlbiRange {
    /// Pages the range covers.
    pub const fn pages(&self) -> u64 {
        ((self.num as u64 & 0x1f) + 1) << (self.scale & 0x1f)
    }

    /// The largest range of the form `(num + 1) << scale` that begins a
    /// decomposition of `pages` pages: the lowest set bit gives SCALE and the
    /// next five bits NUM. Repeating on the remainder covers `pages` exactly
    /// in at most `ceil(64 / 5)` commands. `None` for zero pages.
    pub const fn first_chunk(pages: u64) -> Option<Self> {
        if pages == 0 {
            return None;
        }
        let scale = pages.trailing_zeros();
        if scale > 31 {
            return None;
        }
        // Bit 0 of `pages >> scale` is set, so `chunks` is odd, never 0.
        let chunks = (pages >> scale) & 0x1f;
        Some(Self {
            num: (chunks - 1) as u8,
            scale: scale as u8,
        })
    }
}

/// A 16-byte command (§4.1.1).
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Command(pub [u64; 2]);

const SID_SHIFT: u32 = 32;
const VMID_SHIFT: u32 = 32;
const ASID_SHIFT: u32 = 48;
const NUM_SHIFT: u32 = 12;
const SCALE_SHIFT: u32 = 20;
const SSID_SHIFT: u32 = 12;
const LEAF: u64 = 1;
/// TG = 0b01: 4 KiB translation granule of a range TLBI (dword 1, bits \[11:10\]).
const TG_4K: u64 = 1 << 10;
/// TTL: level of the leaf entries a range TLBI covers (dword 1, bits \[9:8\]).
const TTL_SHIFT: u32 = 8;
const VA_MASK: u64 = !0xfff;
const IPA_MASK: u64 = 0x000f_ffff_ffff_f000;

impl Command {
    /// The opcode byte.
    pub const fn opcode(&self) -> u8 {
        self.0[0] as u8
    }

    /// A command from its raw dwords (e.g. to test error handling).
    pub const fn raw(dwords: [u64; 2]) -> Self {
        Self(dwords)
    }

    const fn op(op: Opcode) -> u64 {
        op as u64
    }

    /// CMD_CFGI_STE: the STE of `sid` (and, with `leaf == false`, the CDs it
    /// points at) may have changed.
    pub const fn cfgi_ste(sid: u32, leaf: bool) -> Self {
        Self([
            Self::op(Opcode::CFGI_STE) | ((sid as u64) << SID_SHIFT),
            leaf as u64,
        ])
    }

    /// CMD_CFGI_ALL: CMD_CFGI_STE_RANGE with Range = 31, every StreamID.
    pub const fn cfgi_all() -> Self {
        Self([Self::op(Opcode::CFGI_STE_RANGE), 31])
    }

    /// CMD_CFGI_CD: the CD of (`sid`, `ssid`) may have changed.
    pub const fn cfgi_cd(sid: u32, ssid: u32, leaf: bool) -> Self {
        Self([
            Self::op(Opcode::CFGI_CD)
                | (((ssid as u64) & 0xf_ffff) << SSID_SHIFT)
                | ((sid as u64) << SID_SHIFT),
            leaf as u64,
        ])
    }

    /// CMD_CFGI_CD_ALL: every CD of `sid` (all SubstreamIDs) may have changed.
    pub const fn cfgi_cd_all(sid: u32) -> Self {
        Self([
            Self::op(Opcode::CFGI_CD_ALL) | ((sid as u64) << SID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NH_ALL: every stage-1 entry (all ASIDs) tagged with `vmid`,
    /// including entries that combine stage 1 with stage 2 (§4.4.2).
    pub const fn tlbi_nh_all(vmid: u16) -> Self {
        Self([
            Self::op(Opcode::TLBI_NH_ALL) | ((vmid as u64) << VMID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NH_ASID: every stage-1 entry of `asid` under `vmid`.
    pub const fn tlbi_nh_asid(vmid: u16, asid: u16) -> Self {
        Self([
            Self::op(Opcode::TLBI_NH_ASID)
                | ((vmid as u64) << VMID_SHIFT)
                | ((asid as u64) << ASID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NH_VA: stage-1 entries of `asid` for `va` (one page), or for
    /// `range` pages from `va` when given (needs IDR3.RIL). A one-page range
    /// becomes the single-address form (see [`Command::tlbi_addr`]).
    pub const fn tlbi_nh_va(
        vmid: u16,
        asid: u16,
        va: u64,
        leaf: bool,
        range: Option<TlbiRange>,
    ) -> Self {
        Self::tlbi_addr(true, vmid, asid, va, leaf, range, 0)
    }

    /// CMD_TLBI_S2_IPA: stage-2 entries of `vmid` for `ipa` (one page), or for
    /// `range` pages from `ipa`.
    pub const fn tlbi_s2_ipa(vmid: u16, ipa: u64, leaf: bool, range: Option<TlbiRange>) -> Self {
        Self::tlbi_addr(false, vmid, 0, ipa, leaf, range, 0)
    }

    /// CMD_TLBI_NH_VA (`stage1`, tagged `vmid`/`asid`) or CMD_TLBI_S2_IPA
    /// (tagged `vmid`) for `addr`, or for `range` 4 KiB pages from `addr`.
    /// `ttl` is the level (1–3) of the leaf entries a range covers, 0 when
    /// unknown.
    ///
    /// The encoding is always one a real SMMU accepts (§4.4.1.1, Linux
    /// `__arm_smmu_tlb_inv_range`): TG = 0 (single address, TTL = NUM =
    /// SCALE = 0) without a range; TG = 4 KiB with a range; a level hint only
    /// on leaf invalidations (walk caches of every level must go otherwise);
    /// and since TG != 0 with TTL = NUM = SCALE = 0 is reserved, a one-page
    /// range without a hint becomes the single-address form, which removes
    /// the page's entry at whatever level it sits.
    pub const fn tlbi_addr(
        stage1: bool,
        vmid: u16,
        asid: u16,
        addr: u64,
        leaf: bool,
        range: Option<TlbiRange>,
        ttl: u8,
    ) -> Self {
        let ttl = if leaf && ttl >= 1 && ttl <= 3 { ttl } else { 0 };
        let range = match range {
            Some(r) if r.num & 0x1f == 0 && r.scale & 0x1f == 0 && ttl == 0 => None,
            other => other,
        };
        let (num_scale, tg_ttl) = match range {
            Some(r) => (
                ((r.num as u64 & 0x1f) << NUM_SHIFT) | ((r.scale as u64 & 0x1f) << SCALE_SHIFT),
                TG_4K | ((ttl as u64) << TTL_SHIFT),
            ),
            None => (0, 0),
        };
        let (op, tag, addr_mask) = if stage1 {
            (
                Opcode::TLBI_NH_VA,
                ((vmid as u64) << VMID_SHIFT) | ((asid as u64) << ASID_SHIFT),
                VA_MASK,
            )
        } else {
            (Opcode::TLBI_S2_IPA, (vmid as u64) << VMID_SHIFT, IPA_MASK)
        };
        Self([
            Self::op(op) | num_scale | tag,
            (addr & addr_mask) | tg_ttl | (leaf as u64 * LEAF),
        ])
    }

    /// CMD_TLBI_S12_VMALL: every entry tagged with `vmid`.
    pub const fn tlbi_s12_vmall(vmid: u16) -> Self {
        Self([
            Self::op(Opcode::TLBI_S12_VMALL) | ((vmid as u64) << VMID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NSNH_ALL: every non-secure, non-hypervisor entry.
    pub const fn tlbi_nsnh_all() -> Self {
        Self([Self::op(Opcode::TLBI_NSNH_ALL), 0])
    }

    /// CMD_TLBI_EL2_ALL: every EL2 entry (only with IDR0.HYP).
    pub const fn tlbi_el2_all() -> Self {
        Self([Self::op(Opcode::TLBI_EL2_ALL), 0])
    }

    /// CMD_SYNC with CS = SIG_NONE: completion is seen by polling CMDQ_CONS.
    pub const fn sync() -> Self {
        Self([Self::op(Opcode::SYNC), 0])
    }
}

impl core::fmt::Debug for Command {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Command(op {:#04x}: {:#018x} {:#018x})",
            self.opcode(),
            self.0[0],
            self.0[1]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_invalidations_match_the_spec_layout() {
        // Opcode 0x03, SID in [63:32], Leaf in dword 1 bit 0.
        assert_eq!(Command::cfgi_ste(0x28, true).0, [0x0000_0028_0000_0003, 1]);
        // CFGI_STE_RANGE, SID 0, Range 31.
        assert_eq!(Command::cfgi_all().0, [0x04, 31]);
        // Opcode 0x05, SSID [31:12], SID [63:32].
        assert_eq!(
            Command::cfgi_cd(0x30, 0, true).0,
            [0x0000_0030_0000_0005, 1]
        );
        assert_eq!(
            Command::cfgi_cd(0x30, 2, false).0,
            [0x0000_0030_0000_2005, 0]
        );
    }

    #[test]
    fn tlbi_commands_match_the_spec_layout() {
        // VMID [47:32], ASID [63:48].
        assert_eq!(Command::tlbi_nh_asid(0, 7).0, [0x0007_0000_0000_0011, 0]);
        // Single page: TG = 0, address in [63:12], Leaf.
        assert_eq!(
            Command::tlbi_nh_va(0, 3, 0x1234_5678, true, None).0,
            [0x0003_0000_0000_0012, 0x1234_5001]
        );
        // Range: NUM 2 [16:12], SCALE 1 [24:20], TG 0b01 [11:10].
        let r = TlbiRange { num: 2, scale: 1 };
        assert_eq!(r.pages(), 6);
        assert_eq!(
            Command::tlbi_nh_va(1, 3, 0x40_0000, false, Some(r)).0,
            [0x0003_0001_0010_2012, 0x40_0400]
        );
        assert_eq!(
            Command::tlbi_s2_ipa(9, 0x20_0000, true, None).0,
            [0x0000_0009_0000_002a, 0x20_0001]
        );
        assert_eq!(Command::tlbi_s12_vmall(9).0, [0x0000_0009_0000_0028, 0]);
        assert_eq!(Command::tlbi_nsnh_all().0, [0x30, 0]);
        // CFGI_CD_ALL: SID [63:32]; TLBI_NH_ALL: VMID [47:32].
        assert_eq!(Command::cfgi_cd_all(0x28).0, [0x0000_0028_0000_0006, 0]);
        assert_eq!(Command::tlbi_nh_all(9).0, [0x0000_0009_0000_0010, 0]);
        assert_eq!(Command::tlbi_el2_all().0, [0x20, 0]);
        assert_eq!(Command::sync().0, [0x46, 0]);
    }

    #[test]
    fn range_chunks_cover_a_page_count_exactly() {
        for pages in [1u64, 2, 3, 31, 32, 33, 64, 100, 513, 4097, 0x12_3456] {
            let mut left = pages;
            let mut cmds = 0;
            while let Some(r) = TlbiRange::first_chunk(left) {
                assert!(r.pages() <= left, "{pages}: chunk {r:?} > {left}");
                left -= r.pages();
                cmds += 1;
            }
            assert_eq!(left, 0);
            assert!(cmds <= 13, "{pages} took {cmds} commands");
        }
        // 6 pages = 3 << 1: one command, NUM = 2, SCALE = 1.
        assert_eq!(
            TlbiRange::first_chunk(6),
            Some(TlbiRange { num: 2, scale: 1 })
        );
        // 512 pages: NUM 0, SCALE 9.
        assert_eq!(
            TlbiRange::first_chunk(512),
            Some(TlbiRange { num: 0, scale: 9 })
        );
    }
}
