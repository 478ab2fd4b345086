//! A strict SMMUv3 model of what the driver hands the hardware: commands
//! (IHI 0070 §4), stream table entries (§5.2), context descriptors (§5.4)
//! and level-1 stream table descriptors (§5.1.2).
//!
//! QEMU accepts encodings real SMMUs refuse (a reserved range TLBI raises
//! CERROR_ILL on silicon and the driver's recovery then drops it). These
//! checkers decode every field, demand that reserved fields are zero and
//! that only legal combinations appear, and check the walk attributes of
//! an STE/CD against SMMU_CR1 and IDR0.COHACC. They are plain functions so
//! a fake SMMU can run them on everything it consumes, and unit tests on
//! everything a builder produces.
//!
//! Where the architecture leaves a choice, the checker is stricter than the
//! specification and says so ("driver rule"): the driver must never need
//! the lenient reading.

use crate::smmuv3::Features;

/// What the checked encodings may use: the relevant identification fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuCaps {
    /// IDR0.S1P.
    pub stage1: bool,
    /// IDR0.S2P.
    pub stage2: bool,
    /// IDR0.HYP.
    pub hyp: bool,
    /// IDR0.SEV (CMD_SYNC CS = SIG_SEV).
    pub sev: bool,
    /// IDR0.MSI (CMD_SYNC CS = SIG_IRQ).
    pub msi: bool,
    /// IDR3.RIL: range TLBIs (TG != 0).
    pub ril: bool,
    /// 16-bit ASIDs (IDR0.ASID16); else ASID\[15:8\] is RES0.
    pub asid16: bool,
    /// 16-bit VMIDs (IDR0.VMID16); else VMID\[15:8\] is RES0.
    pub vmid16: bool,
    /// IDR5.GRAN4K / GRAN16K / GRAN64K.
    pub granules: [bool; 3],
    /// IDR1.SIDSIZE.
    pub sid_bits: u8,
    /// IDR1.SSIDSIZE.
    pub ssid_bits: u8,
    /// IDR0.COHACC: walks and queue accesses snoop CPU caches.
    pub coherent: bool,
    /// IDR0.STALL_MODEL.
    pub stall_model: u8,
    /// Output address bits (IDR5.OAS).
    pub oas_bits: u8,
}

impl SmmuCaps {
    /// The capabilities the driver decoded.
    pub fn from_features(f: &Features) -> Self {
        Self {
            stage1: f.stage1,
            stage2: f.stage2,
            hyp: f.hyp,
            sev: f.raw.idr[0] & (1 << 14) != 0,
            msi: f.msi,
            ril: f.range_invalidation,
            asid16: f.asid_bits == 16,
            vmid16: f.vmid_bits == 16,
            granules: [f.gran_4k, f.gran_16k, f.gran_64k],
            sid_bits: f.sid_bits,
            ssid_bits: f.ssid_bits,
            coherent: f.coherent,
            stall_model: ((f.raw.idr[0] >> 24) & 3) as u8,
            oas_bits: f.oas_bits,
        }
    }
}

/// Why an encoding is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// An opcode the architecture does not define (or the driver never uses).
    UnknownOpcode(u8),
    /// A reserved (RES0) field is not zero: `bits` are the offending bits of
    /// dword `dword`.
    Reserved {
        /// Structure and dword, e.g. "TLBI_NH_VA dword 0".
        what: &'static str,
        /// Dword index.
        dword: u8,
        /// The non-zero reserved bits.
        bits: u64,
    },
    /// A combination of field values the architecture reserves or makes
    /// illegal (CERROR_ILL, C_BAD_STE, C_BAD_CD), or that the driver rule
    /// forbids.
    Illegal {
        /// The rule broken, in words.
        rule: &'static str,
        /// The offending value.
        value: u64,
    },
    /// The encoding needs a feature the SMMU lacks.
    Unsupported(&'static str),
}

/// Range fields of a TLBI by address (§4.4.1): TG != 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeFields {
    /// TG: 1 = 4 KiB, 2 = 16 KiB, 3 = 64 KiB.
    pub tg: u8,
    /// NUM.
    pub num: u8,
    /// SCALE.
    pub scale: u8,
}

/// A decoded command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Decoded {
    CfgiSte {
        sid: u32,
        leaf: bool,
    },
    /// CMD_CFGI_STE_RANGE; `range == 31` is CMD_CFGI_ALL.
    CfgiSteRange {
        sid: u32,
        range: u8,
    },
    CfgiCd {
        sid: u32,
        ssid: u32,
        leaf: bool,
    },
    CfgiCdAll {
        sid: u32,
    },
    TlbiNhAll {
        vmid: u16,
    },
    TlbiNhAsid {
        vmid: u16,
        asid: u16,
    },
    /// TLBI_NH_VA (`asid: Some`) or TLBI_S2_IPA (`asid: None`).
    TlbiAddr {
        vmid: u16,
        asid: Option<u16>,
        addr: u64,
        leaf: bool,
        ttl: u8,
        range: Option<RangeFields>,
    },
    TlbiS12Vmall {
        vmid: u16,
    },
    TlbiNsnhAll,
    TlbiEl2All,
    /// CMD_SYNC with its completion signal (CS).
    Sync {
        cs: u8,
    },
}

impl Decoded {
    /// For a TLBI by address: the bytes it invalidates, `[start, end)`. A
    /// non-range TLBI covers the one 4 KiB page holding the address (any
    /// level's entry for it); a range one `(NUM + 1) << SCALE` granules.
    pub fn tlbi_span(&self) -> Option<(u64, u64)> {
        match *self {
            Decoded::TlbiAddr { addr, range, .. } => {
                let (gran_shift, pages) = match range {
                    None => (12, 1u64),
                    Some(r) => (10 + 2 * u32::from(r.tg), (u64::from(r.num) + 1) << r.scale),
                };
                let start = addr & !((1u64 << gran_shift) - 1);
                Some((
                    start,
                    start.saturating_add(pages.saturating_mul(1 << gran_shift)),
                ))
            }
            _ => None,
        }
    }
}

fn res0(what: &'static str, dword: u8, value: u64, allowed: u64) -> Result<(), Violation> {
    let bits = value & !allowed;
    if bits != 0 {
        return Err(Violation::Reserved { what, dword, bits });
    }
    Ok(())
}

fn illegal(rule: &'static str, value: u64) -> Violation {
    Violation::Illegal { rule, value }
}

const fn mask(hi: u32, lo: u32) -> u64 {
    ((u64::MAX) >> (63 - hi)) & !((1u64 << lo) - 1)
}

fn field(v: u64, hi: u32, lo: u32) -> u64 {
    (v & mask(hi, lo)) >> lo
}

fn check_asid(caps: &SmmuCaps, asid: u16) -> Result<(), Violation> {
    if !caps.asid16 && asid > 0xff {
        return Err(illegal(
            "ASID[15:8] is RES0 without IDR0.ASID16",
            asid.into(),
        ));
    }
    Ok(())
}

fn check_vmid(caps: &SmmuCaps, vmid: u16) -> Result<(), Violation> {
    if !caps.vmid16 && vmid > 0xff {
        return Err(illegal(
            "VMID[15:8] is RES0 without IDR0.VMID16",
            vmid.into(),
        ));
    }
    Ok(())
}

fn check_sid(caps: &SmmuCaps, sid: u32) -> Result<(), Violation> {
    if caps.sid_bits < 32 && u64::from(sid) >> caps.sid_bits != 0 {
        return Err(illegal(
            "StreamID beyond IDR1.SIDSIZE (driver rule)",
            sid.into(),
        ));
    }
    Ok(())
}

// Opcodes (§4.1–§4.7).
const OP_PREFETCH_CONFIG: u8 = 0x01;
const OP_CFGI_STE: u8 = 0x03;
const OP_CFGI_STE_RANGE: u8 = 0x04;
const OP_CFGI_CD: u8 = 0x05;
const OP_CFGI_CD_ALL: u8 = 0x06;
const OP_TLBI_NH_ALL: u8 = 0x10;
const OP_TLBI_NH_ASID: u8 = 0x11;
const OP_TLBI_NH_VA: u8 = 0x12;
const OP_TLBI_EL2_ALL: u8 = 0x20;
const OP_TLBI_S12_VMALL: u8 = 0x28;
const OP_TLBI_S2_IPA: u8 = 0x2a;
const OP_TLBI_NSNH_ALL: u8 = 0x30;
const OP_SYNC: u8 = 0x46;

/// Checks one 16-byte command against §4 and decodes it.
///
/// Commands the driver never emits (PREFETCH, ATC, PRI, resume, stage-1
/// EL2/EL3 TLBIs by VA) are refused as [`Violation::UnknownOpcode`]: a
/// driver that starts using one must teach the checker its format first.
///
/// # Errors
///
/// The first [`Violation`] the command breaks.
pub fn check_command(caps: &SmmuCaps, cmd: [u64; 2]) -> Result<Decoded, Violation> {
    let [d0, d1] = cmd;
    let op = d0 as u8;
    match op {
        OP_CFGI_STE | OP_CFGI_STE_RANGE => {
            // §4.3.1/§4.3.2: SSec (bit 10) is RES0 for Non-secure commands;
            // SID [63:32]; dword 1: Leaf [0] or Range [4:0].
            res0("CFGI_STE dword 0", 0, d0, mask(7, 0) | mask(63, 32))?;
            let sid = (d0 >> 32) as u32;
            if op == OP_CFGI_STE {
                res0("CFGI_STE dword 1", 1, d1, 1)?;
                check_sid(caps, sid)?;
                Ok(Decoded::CfgiSte {
                    sid,
                    leaf: d1 & 1 != 0,
                })
            } else {
                res0("CFGI_STE_RANGE dword 1", 1, d1, mask(4, 0))?;
                let range = (d1 & 0x1f) as u8;
                if range != 31 {
                    check_sid(caps, sid)?;
                }
                Ok(Decoded::CfgiSteRange { sid, range })
            }
        }
        OP_CFGI_CD => {
            // §4.3.3: SSID [31:12], SID [63:32]; dword 1: Leaf.
            res0("CFGI_CD dword 0", 0, d0, mask(7, 0) | mask(63, 12))?;
            res0("CFGI_CD dword 1", 1, d1, 1)?;
            let sid = (d0 >> 32) as u32;
            let ssid = field(d0, 31, 12) as u32;
            check_sid(caps, sid)?;
            if u64::from(ssid) >> caps.ssid_bits != 0 {
                return Err(illegal("SSID beyond IDR1.SSIDSIZE", ssid.into()));
            }
            Ok(Decoded::CfgiCd {
                sid,
                ssid,
                leaf: d1 & 1 != 0,
            })
        }
        OP_CFGI_CD_ALL => {
            res0("CFGI_CD_ALL dword 0", 0, d0, mask(7, 0) | mask(63, 32))?;
            res0("CFGI_CD_ALL dword 1", 1, d1, 0)?;
            let sid = (d0 >> 32) as u32;
            check_sid(caps, sid)?;
            Ok(Decoded::CfgiCdAll { sid })
        }
        OP_TLBI_NH_ALL | OP_TLBI_S12_VMALL => {
            // §4.4.2 / §4.4.11: VMID [47:32] only.
            res0("TLBI by VMID dword 0", 0, d0, mask(7, 0) | mask(47, 32))?;
            res0("TLBI by VMID dword 1", 1, d1, 0)?;
            let vmid = field(d0, 47, 32) as u16;
            if op == OP_TLBI_NH_ALL {
                if !caps.stage1 {
                    return Err(Violation::Unsupported("TLBI_NH_ALL needs stage 1"));
                }
                // VMID is RES0 without stage 2; it names the nested guest's
                // (or VMID 0) stage-1 entries otherwise.
                if !caps.stage2 && vmid != 0 {
                    return Err(illegal("TLBI_NH_ALL VMID without stage 2", vmid.into()));
                }
                check_vmid(caps, vmid)?;
                return Ok(Decoded::TlbiNhAll { vmid });
            }
            if !caps.stage2 {
                return Err(Violation::Unsupported("TLBI_S12_VMALL needs stage 2"));
            }
            check_vmid(caps, vmid)?;
            Ok(Decoded::TlbiS12Vmall { vmid })
        }
        OP_TLBI_NH_ASID => {
            // §4.4.3: VMID [47:32], ASID [63:48]; no address, no range.
            res0("TLBI_NH_ASID dword 0", 0, d0, mask(7, 0) | mask(63, 32))?;
            res0("TLBI_NH_ASID dword 1", 1, d1, 0)?;
            if !caps.stage1 {
                return Err(Violation::Unsupported("TLBI_NH_ASID needs stage 1"));
            }
            let asid = (d0 >> 48) as u16;
            check_asid(caps, asid)?;
            Ok(Decoded::TlbiNhAsid {
                vmid: field(d0, 47, 32) as u16,
                asid,
            })
        }
        OP_TLBI_NH_VA | OP_TLBI_S2_IPA => check_tlbi_addr(caps, op, d0, d1),
        OP_TLBI_NSNH_ALL | OP_TLBI_EL2_ALL => {
            res0("TLBI_*_ALL dword 0", 0, d0, mask(7, 0))?;
            res0("TLBI_*_ALL dword 1", 1, d1, 0)?;
            if op == OP_TLBI_EL2_ALL {
                if !caps.hyp {
                    return Err(Violation::Unsupported("TLBI_EL2_ALL needs IDR0.HYP"));
                }
                return Ok(Decoded::TlbiEl2All);
            }
            Ok(Decoded::TlbiNsnhAll)
        }
        OP_SYNC => {
            // §4.7.3: CS [13:12], MSH [23:22], MSIAttr [27:24], MSIData
            // [63:32]; dword 1 MSIAddress [51:2].
            res0(
                "CMD_SYNC dword 0",
                0,
                d0,
                mask(7, 0) | mask(13, 12) | mask(27, 22) | mask(63, 32),
            )?;
            res0("CMD_SYNC dword 1", 1, d1, mask(51, 2))?;
            let cs = field(d0, 13, 12) as u8;
            match cs {
                // Driver rule: with SIG_NONE the MSI fields mean nothing and
                // stay zero.
                0 if d0 & (mask(27, 22) | mask(63, 32)) != 0 || d1 != 0 => {
                    return Err(illegal("CMD_SYNC SIG_NONE with MSI fields", d0));
                }
                1 if !caps.msi => {
                    return Err(Violation::Unsupported("CMD_SYNC SIG_IRQ needs IDR0.MSI"));
                }
                2 if !caps.sev => {
                    return Err(Violation::Unsupported("CMD_SYNC SIG_SEV needs IDR0.SEV"));
                }
                3 => return Err(illegal("CMD_SYNC CS = 0b11 is reserved", 3)),
                _ => {}
            }
            Ok(Decoded::Sync { cs })
        }
        OP_PREFETCH_CONFIG => Err(Violation::UnknownOpcode(op)),
        other => Err(Violation::UnknownOpcode(other)),
    }
}

/// TLBI_NH_VA / TLBI_S2_IPA (§4.4.4, §4.4.12) and their range form
/// (§4.4.1.1, SMMUv3.2 RIL).
fn check_tlbi_addr(caps: &SmmuCaps, op: u8, d0: u64, d1: u64) -> Result<Decoded, Violation> {
    let stage1 = op == OP_TLBI_NH_VA;
    // dword 0: NUM [16:12], SCALE [24:20], VMID [47:32], ASID [63:48] (NH only).
    let d0_ok = mask(7, 0)
        | mask(16, 12)
        | mask(24, 20)
        | mask(47, 32)
        | if stage1 { mask(63, 48) } else { 0 };
    // dword 1: Leaf [0], TTL [9:8], TG [11:10], address [63:12] (IPA [51:12]).
    let d1_ok = 1 | mask(11, 8) | if stage1 { mask(63, 12) } else { mask(51, 12) };
    let name = if stage1 { "TLBI_NH_VA" } else { "TLBI_S2_IPA" };
    res0(name, 0, d0, d0_ok)?;
    res0(name, 1, d1, d1_ok)?;
    if stage1 && !caps.stage1 {
        return Err(Violation::Unsupported("TLBI_NH_VA needs stage 1"));
    }
    if !stage1 && !caps.stage2 {
        return Err(Violation::Unsupported("TLBI_S2_IPA needs stage 2"));
    }
    let vmid = field(d0, 47, 32) as u16;
    let asid = (d0 >> 48) as u16;
    if stage1 {
        check_asid(caps, asid)?;
    } else {
        check_vmid(caps, vmid)?;
    }
    let num = field(d0, 16, 12) as u8;
    let scale = field(d0, 24, 20) as u8;
    let leaf = d1 & 1 != 0;
    let ttl = field(d1, 9, 8) as u8;
    let tg = field(d1, 11, 10) as u8;
    let addr = d1 & mask(63, 12);
    let range = if tg == 0 {
        // Driver rule: without a granule there is no range and no level
        // hint; NUM, SCALE and TTL stay zero (RES0 without RIL).
        if num != 0 || scale != 0 {
            return Err(illegal("NUM/SCALE with TG = 0", d0));
        }
        if ttl != 0 {
            return Err(illegal("TTL with TG = 0", ttl.into()));
        }
        None
    } else {
        if !caps.ril {
            return Err(Violation::Unsupported(
                "range TLBI (TG != 0) needs IDR3.RIL",
            ));
        }
        if !caps.granules[usize::from(tg - 1)] {
            return Err(Violation::Unsupported("TG names a granule IDR5 lacks"));
        }
        // §4.4.1.1: TTL = NUM = SCALE = 0 with TG != 0 is reserved
        // (CERROR_ILL on real SMMUs).
        if ttl == 0 && num == 0 && scale == 0 {
            return Err(illegal("range TLBI with TTL = NUM = SCALE = 0", d1));
        }
        // TTL is the level of the leaf entry; level 1 holds no blocks with
        // a 16 KiB or 64 KiB granule (without 52-bit addresses).
        if ttl == 1 && tg != 1 {
            return Err(illegal(
                "TTL = 1 is reserved for 16K/64K granules",
                ttl.into(),
            ));
        }
        // Driver rule (Linux __arm_smmu_tlb_inv_range): the level hint is
        // only given for leaf invalidations; walk-cache invalidation must
        // reach every level.
        if ttl != 0 && !leaf {
            return Err(illegal("TTL hint on a non-leaf invalidation", ttl.into()));
        }
        let gran_shift = 10 + 2 * u32::from(tg);
        if addr & ((1u64 << gran_shift) - 1) != 0 {
            return Err(illegal("range TLBI address not granule aligned", addr));
        }
        let pages = (u64::from(num) + 1) << scale;
        if addr.checked_add((pages - 1) << gran_shift).is_none() {
            return Err(illegal("range TLBI wraps the address space", addr));
        }
        Some(RangeFields { tg, num, scale })
    };
    Ok(Decoded::TlbiAddr {
        vmid,
        asid: stage1.then_some(asid),
        addr,
        leaf,
        ttl,
        range,
    })
}

/// The nested stage-2 rule (Linux `arm_smmu_tlb_inv_range_domain` for a
/// nesting parent; IHI 0070 §3.17: an SMMU may cache entries that combine
/// stage 1 and stage 2, which CMD_TLBI_S2_IPA does not remove): in `cmds`,
/// every CMD_TLBI_S2_IPA of a VMID in `nested` is completed by a CMD_SYNC,
/// after which a CMD_TLBI_NH_ALL of that VMID (or a CMD_TLBI_S12_VMALL,
/// which removes both stages) is issued and completed by another CMD_SYNC.
/// Invalid commands are refused as by [`check_command`].
///
/// # Errors
///
/// The first [`Violation`]: an undecodable command, or a nested VMID whose
/// stage-2 invalidation is not followed by its stage-1 flush.
pub fn check_nested_stage2_flush(
    caps: &SmmuCaps,
    cmds: &[[u64; 2]],
    nested: &[u16],
) -> Result<(), Violation> {
    // Per nested VMID: 0 = clean, 1 = S2 invalidated (awaiting a sync),
    // 2 = S2 invalidation completed (awaiting the stage-1 flush),
    // 3 = flushed (awaiting its sync).
    let mut states: heapless::Vec<(u16, u8), 16> = nested.iter().map(|&v| (v, 0)).collect();
    for cmd in cmds {
        match check_command(caps, *cmd)? {
            Decoded::TlbiAddr {
                vmid, asid: None, ..
            } => {
                // A stage-2 invalidation before an earlier one's flush
                // completed restarts the wait.
                for e in states.iter_mut().filter(|e| e.0 == vmid) {
                    e.1 = 1;
                }
            }
            Decoded::TlbiNhAll { vmid } => {
                // Only counts once the IPA invalidation completed.
                for e in states.iter_mut().filter(|e| e.0 == vmid && e.1 == 2) {
                    e.1 = 3;
                }
            }
            Decoded::TlbiS12Vmall { vmid } => {
                // Both stages at once: no ordering to keep.
                for e in states.iter_mut().filter(|e| e.0 == vmid && e.1 != 0) {
                    e.1 = 3;
                }
            }
            Decoded::Sync { .. } => {
                for e in states.iter_mut() {
                    e.1 = match e.1 {
                        1 => 2,
                        3 => 0,
                        other => other,
                    };
                }
            }
            _ => {}
        }
    }
    match states.iter().find(|e| e.1 != 0) {
        Some(&(vmid, _)) => Err(illegal(
            "nested VMID's stage-2 invalidation not followed by a completed TLBI_NH_ALL",
            vmid.into(),
        )),
        None => Ok(()),
    }
}

/// Memory attributes the SMMU uses for its own table walks and queue
/// accesses, from SMMU_CR1 (§6.3.11): inner/outer cacheability (0 = NC,
/// 1 = WB, 2 = WT) and shareability (0 = NSH, 2 = OSH, 3 = ISH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkAttrs {
    /// Inner cacheability.
    pub ic: u8,
    /// Outer cacheability.
    pub oc: u8,
    /// Shareability.
    pub sh: u8,
}

impl WalkAttrs {
    /// The TABLE_* fields of a CR1 value.
    pub const fn table_from_cr1(cr1: u32) -> Self {
        Self {
            ic: ((cr1 >> 6) & 3) as u8,
            oc: ((cr1 >> 8) & 3) as u8,
            sh: ((cr1 >> 10) & 3) as u8,
        }
    }

    /// The QUEUE_* fields of a CR1 value.
    pub const fn queue_from_cr1(cr1: u32) -> Self {
        Self {
            ic: (cr1 & 3) as u8,
            oc: ((cr1 >> 2) & 3) as u8,
            sh: ((cr1 >> 4) & 3) as u8,
        }
    }

    /// Whether these are the attributes the coherency of the SMMU calls for
    /// (driver rule, Linux io-pgtable-arm's TCR for `coherent_walk`):
    /// coherent → write-back, inner shareable; not coherent → non-cacheable,
    /// outer shareable (the CPU cleans every line it writes).
    pub const fn fit(&self, coherent: bool) -> bool {
        if coherent {
            self.ic == 1 && self.oc == 1 && self.sh == 3
        } else {
            self.ic == 0 && self.oc == 0 && self.sh == 2
        }
    }
}

/// Checks SMMU_CR1: both the table and the queue attributes fit the SMMU's
/// coherency.
///
/// # Errors
///
/// The first [`Violation`] the register value breaks.
pub fn check_cr1(caps: &SmmuCaps, cr1: u32) -> Result<(), Violation> {
    res0("CR1", 0, cr1.into(), mask(11, 0))?;
    if !WalkAttrs::table_from_cr1(cr1).fit(caps.coherent) {
        return Err(illegal(
            "CR1 table attributes do not fit IDR0.COHACC",
            cr1.into(),
        ));
    }
    if !WalkAttrs::queue_from_cr1(cr1).fit(caps.coherent) {
        return Err(illegal(
            "CR1 queue attributes do not fit IDR0.COHACC",
            cr1.into(),
        ));
    }
    Ok(())
}

/// Cacheability encodings of STE S1CIR/S1COR, S2IR0/S2OR0 and CD IRGN0/ORGN0
/// (0 = NC, 1 = WB read/write-allocate, 2 = WT, 3 = WB no-allocate) mapped to
/// CR1's (0 = NC, 1 = WB, 2 = WT).
const fn cr1_cache(v: u8) -> u8 {
    match v {
        3 => 1,
        other => other,
    }
}

fn attrs_agree(what: &'static str, ir: u64, or: u64, sh: u64, cr1: u32) -> Result<(), Violation> {
    let table = WalkAttrs::table_from_cr1(cr1);
    let got = WalkAttrs {
        ic: cr1_cache(ir as u8),
        oc: cr1_cache(or as u8),
        sh: sh as u8,
    };
    if sh == 1 {
        return Err(illegal("shareability 0b01 is reserved", sh));
    }
    if got != table {
        return Err(illegal(what, ir | or << 2 | sh << 4));
    }
    Ok(())
}

/// Checks a stream table entry (§5.2) the driver wrote: V, a defined
/// Config, RES0 fields zero in every dword the driver's configurations
/// use, and walk attributes that agree with `cr1` (CD fetch S1CIR/S1COR/
/// S1CSH for stage 1, S2IR0/S2OR0/S2SH0 for stage 2).
///
/// # Errors
///
/// The first [`Violation`] the entry breaks.
pub fn check_ste(caps: &SmmuCaps, cr1: u32, ste: &[u64; 8]) -> Result<(), Violation> {
    let d0 = ste[0];
    if d0 & 1 == 0 {
        // V = 0: the rest is ignored; the driver never leaves junk there.
        res0("STE (V = 0)", 0, d0, 0)?;
        return Ok(());
    }
    let config = field(d0, 3, 1);
    match config {
        // Abort: the SMMU ignores dwords 1-7, which an update in progress
        // may still hold (`ste::update_plan` aborts a live entry first).
        0b000 => res0("STE abort", 0, d0, mask(3, 0)),
        0b100 => {
            res0("STE bypass", 0, d0, mask(3, 0))?;
            // dword 1: SHCFG [45:44] (and the other override fields).
            res0("STE bypass", 1, ste[1], mask(51, 44) | mask(40, 32))?;
            for (i, w) in ste.iter().enumerate().skip(2) {
                res0("STE bypass", i as u8, *w, 0)?;
            }
            Ok(())
        }
        0b101..=0b111 => {
            let s1 = config & 0b001 != 0;
            let s2 = config & 0b010 != 0;
            if s1 && !caps.stage1 {
                return Err(Violation::Unsupported("STE stage 1 needs IDR0.S1P"));
            }
            if s2 && !caps.stage2 {
                return Err(Violation::Unsupported("STE stage 2 needs IDR0.S2P"));
            }
            // dword 0: V, Config, S1Fmt [5:4], S1ContextPtr [51:6], S1CDMax [63:59].
            res0("STE dword 0", 0, d0, mask(51, 0) | mask(63, 59))?;
            if !s1 && d0 & mask(63, 4) != 0 {
                return Err(illegal("STE S1 fields without stage 1", d0));
            }
            let d1 = ste[1];
            // dword 1: S1DSS..S2HWU [11:0], DRE..MEV [19:12] (CONT [16:13]),
            // S1STALLD [27], EATS [29:28], STRW [31:30], MemAttr..INSTCFG [51:32].
            res0(
                "STE dword 1",
                1,
                d1,
                mask(19, 0) | mask(31, 27) | mask(40, 32) | mask(51, 44),
            )?;
            if s1 {
                let (fmt, cd_max) = (field(d0, 5, 4), field(d0, 63, 59));
                let cd = d0 & mask(51, 6);
                if s2 {
                    // Nested (§5.2): S1ContextPtr is an IPA, translated by
                    // stage 2, so it must lie inside the stage-2 input range
                    // (64 - S2T0SZ bits); S1CDMax at most IDR1.SSIDSIZE;
                    // S1Fmt 0b11 is reserved; a linear table of several CDs
                    // is aligned to its size; with one CD, S1Fmt = 0 and
                    // S1DSS = 0 (driver rule: they mean nothing then).
                    let ipa_bits = 64 - field(ste[2], 37, 32);
                    if ipa_bits < 64 && cd >> ipa_bits != 0 {
                        return Err(illegal("nested S1ContextPtr beyond the stage-2 input", cd));
                    }
                    if cd_max > u64::from(caps.ssid_bits) {
                        return Err(illegal("S1CDMax beyond IDR1.SSIDSIZE", cd_max));
                    }
                    if fmt == 0b11 {
                        return Err(illegal("S1Fmt 0b11 is reserved", fmt));
                    }
                    if cd_max == 0 && (fmt != 0 || field(d1, 1, 0) != 0) {
                        return Err(illegal("one CD: S1Fmt = S1DSS = 0 (driver rule)", d0));
                    }
                    if fmt == 0 && cd % (64 << cd_max) != 0 {
                        return Err(illegal("linear CD table not aligned to its size", cd));
                    }
                    if field(d1, 1, 0) == 0b11 {
                        return Err(illegal("S1DSS 0b11 is reserved", d1));
                    }
                } else {
                    if fmt != 0 || cd_max != 0 {
                        return Err(illegal("driver STEs hold one CD: S1Fmt = S1CDMax = 0", d0));
                    }
                    if caps.oas_bits < 64 && cd >> caps.oas_bits != 0 {
                        return Err(illegal("S1ContextPtr beyond the OAS", cd));
                    }
                }
                // EATS (ATS) stays 0: the driver enables no ATS.
                if field(d1, 29, 28) != 0 {
                    return Err(illegal("EATS != 0 without ATS (driver rule)", d1));
                }
                attrs_agree(
                    "STE S1CIR/S1COR/S1CSH disagree with CR1",
                    field(d1, 3, 2),
                    field(d1, 5, 4),
                    field(d1, 7, 6),
                    cr1,
                )?;
                let stalld = d1 & (1 << 27) != 0;
                match caps.stall_model {
                    // Stalls supported but not forced: Linux sets S1STALLD
                    // when the master cannot stall; the driver never
                    // resumes stalled transactions, so it must.
                    0b00 if !stalld => {
                        return Err(illegal("S1STALLD = 0 on an SMMU that can stall", d1));
                    }
                    // §5.2: S1STALLD is RES0 without stalls and ILLEGAL
                    // when stalls are forced.
                    0b01 | 0b10 if stalld => {
                        return Err(illegal("S1STALLD = 1 with STALL_MODEL != 0", d1));
                    }
                    0b11 => return Err(illegal("STALL_MODEL = 0b11 is reserved", 3)),
                    _ => {}
                }
            } else if d1 & mask(31, 0) != 0 {
                return Err(illegal("STE S1 attributes without stage 1", d1));
            }
            let d2 = ste[2];
            // dword 2: S2VMID [15:0], VTCR [50:32], S2AA64 [51], S2ENDI..S2R [58:52].
            res0("STE dword 2", 2, d2, mask(15, 0) | mask(58, 32))?;
            check_vmid(caps, d2 as u16)?;
            if s2 {
                if d2 & (1 << 51) == 0 {
                    return Err(illegal("S2AA64 = 0: AArch32 stage 2", d2));
                }
                if field(d2, 47, 46) != 0 {
                    return Err(illegal("driver stage 2 uses S2TG = 4 KiB", d2));
                }
                if caps.stall_model == 0b10 && d2 & (1 << 57) == 0 {
                    return Err(illegal("S2S = 0 on a stall-forced SMMU", d2));
                }
                attrs_agree(
                    "STE S2IR0/S2OR0/S2SH0 disagree with CR1",
                    field(d2, 41, 40),
                    field(d2, 43, 42),
                    field(d2, 45, 44),
                    cr1,
                )?;
                res0("STE dword 3", 3, ste[3], mask(51, 4))?;
            } else {
                if d2 & mask(58, 32) != 0 {
                    return Err(illegal("STE S2 fields without stage 2", d2));
                }
                res0("STE dword 3", 3, ste[3], 0)?;
            }
            for (i, w) in ste.iter().enumerate().skip(4) {
                res0("STE dwords 4-7", i as u8, *w, 0)?;
            }
            Ok(())
        }
        other => Err(illegal("STE Config 0b001-0b011 is reserved", other)),
    }
}

/// Checks a context descriptor (§5.4) the driver wrote: V, AArch64, a TTB0
/// walk with a 4 KiB granule, TTB1 disabled, RES0 fields zero, A = 1 and
/// S = 0 (no stalls), and IRGN0/ORGN0/SH0 agreeing with `cr1`.
///
/// # Errors
///
/// The first [`Violation`] the descriptor breaks.
pub fn check_cd(caps: &SmmuCaps, cr1: u32, cd: &[u64; 8]) -> Result<(), Violation> {
    let d0 = cd[0];
    if d0 & (1 << 31) == 0 {
        return Err(illegal("CD V = 0", d0));
    }
    if d0 & (1 << 41) == 0 {
        return Err(illegal("CD AA64 = 0", d0));
    }
    if d0 & (1 << 30) == 0 {
        return Err(illegal("driver CDs disable TTB1 walks (EPD1 = 1)", d0));
    }
    if d0 & (1 << 14) != 0 {
        return Err(illegal("driver CDs walk TTB0 (EPD0 = 0)", d0));
    }
    if field(d0, 7, 6) != 0 {
        return Err(illegal("driver CDs use TG0 = 4 KiB", d0));
    }
    let t0sz = field(d0, 5, 0);
    if !(16..=39).contains(&t0sz) {
        return Err(illegal("T0SZ outside 16..=39 for a 4 KiB granule", t0sz));
    }
    if field(d0, 34, 32) > 6 {
        return Err(illegal(
            "IPS encoding > 0b110 is reserved",
            field(d0, 34, 32),
        ));
    }
    if d0 & (1 << 46) == 0 {
        return Err(illegal("CD A = 0: faults would stall", d0));
    }
    if d0 & (1 << 44) != 0 {
        return Err(illegal("CD S = 1: the driver never resumes stalls", d0));
    }
    if d0 & (1 << 15) != 0 {
        return Err(illegal("driver CDs are little-endian (ENDI = 0)", d0));
    }
    check_asid(caps, (d0 >> 48) as u16)?;
    attrs_agree(
        "CD IRGN0/ORGN0/SH0 disagree with CR1",
        field(d0, 9, 8),
        field(d0, 11, 10),
        field(d0, 13, 12),
        cr1,
    )?;
    // dword 1: NSCFG0 [0], HAD0 [1], TTB0 [51:4]; above it HWU bits and RES0.
    res0("CD dword 1", 1, cd[1], mask(51, 4))?;
    let ttb0 = cd[1] & mask(51, 4);
    if caps.oas_bits < 64 && ttb0 >> caps.oas_bits != 0 {
        return Err(illegal("TTB0 beyond the OAS", ttb0));
    }
    // dword 2: TTB1 (unused, EPD1); dword 3: MAIR; 4: AMAIR; 5-7: RES0 for us.
    res0("CD dword 2", 2, cd[2], 0)?;
    for (i, w) in cd.iter().enumerate().skip(4) {
        res0("CD dwords 4-7", i as u8, *w, 0)?;
    }
    Ok(())
}

/// Checks a level-1 stream table descriptor (§5.1.2): Span 0 (invalid) or
/// `split + 1`, L2Ptr inside the OAS and aligned to the level-2 array.
///
/// # Errors
///
/// The first [`Violation`] the descriptor breaks.
pub fn check_l1_desc(caps: &SmmuCaps, split: u8, desc: u64) -> Result<(), Violation> {
    res0("L1STD", 0, desc, mask(4, 0) | mask(51, 6))?;
    let span = desc & 0x1f;
    if span == 0 {
        if desc != 0 {
            return Err(illegal("invalid L1STD with an address (driver rule)", desc));
        }
        return Ok(());
    }
    if span != u64::from(split) + 1 {
        return Err(illegal("L1STD Span != SPLIT + 1", span));
    }
    let l2 = desc & mask(51, 6);
    let align = 64u64 << split;
    if l2 % align.min(4096) != 0 {
        return Err(illegal("L2Ptr not aligned to its array", l2));
    }
    if caps.oas_bits < 64 && l2 >> caps.oas_bits != 0 {
        return Err(illegal("L2Ptr beyond the OAS", l2));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smmuv3::cmd::{Command, TlbiRange};

    /// QEMU `virt` 10 values (nested, RIL, coherent).
    pub(crate) fn qemu_caps() -> SmmuCaps {
        SmmuCaps {
            stage1: true,
            stage2: true,
            hyp: false,
            sev: false,
            msi: false,
            ril: true,
            asid16: true,
            vmid16: true,
            granules: [true, true, true],
            sid_bits: 16,
            ssid_bits: 0,
            coherent: true,
            stall_model: 1,
            oas_bits: 44,
        }
    }

    #[test]
    fn strict_smmu_checker_refuses_the_reserved_one_page_range() {
        let caps = qemu_caps();
        // TG = 4K, NUM = SCALE = TTL = 0: §4.4.1.1 reserved.
        let cmd = [0x0003_0000_0000_0012, 0x1000 | 1 << 10 | 1];
        assert!(matches!(
            check_command(&caps, cmd),
            Err(Violation::Illegal { .. })
        ));
        // The same with TTL = 3 is a legal one-page range.
        assert!(check_command(&caps, [cmd[0], cmd[1] | 3 << 8]).is_ok());
        // TTL on a non-leaf range is the driver rule's refusal.
        assert!(check_command(&caps, [cmd[0], (cmd[1] | 3 << 8) & !1]).is_err());
        // TTL = 1 with a 64K granule is reserved.
        assert!(check_command(&caps, [cmd[0] | 1 << 12, 0x1_0000 | 3 << 10 | 1 << 8 | 1]).is_err());
        // Without RIL any TG is refused.
        let no_ril = SmmuCaps { ril: false, ..caps };
        assert!(check_command(&no_ril, [cmd[0] | 1 << 12, cmd[1]]).is_err());
    }

    #[test]
    fn strict_smmu_checker_refuses_reserved_bits_and_missing_features() {
        let caps = qemu_caps();
        // A reserved bit in each kind of command.
        for cmd in [
            [Command::cfgi_ste(1, true).0[0] | 1 << 10, 1],
            [Command::cfgi_all().0[0], 31 | 1 << 5],
            [Command::tlbi_nh_asid(0, 1).0[0], 1],
            [Command::tlbi_s12_vmall(1).0[0] | 1 << 48, 0],
            [Command::tlbi_nsnh_all().0[0] | 1 << 8, 0],
            [Command::sync().0[0] | 1 << 14, 0],
            [Command::sync().0[0] | 3 << 12, 0],
            [
                Command::tlbi_s2_ipa(1, 0x1000, true, None).0[0] | 1 << 48,
                0x1001,
            ],
            [
                Command::tlbi_s2_ipa(1, 0x1000, true, None).0[0],
                0x1001 | 1 << 60,
            ],
            [
                Command::tlbi_nh_va(0, 1, 0x1000, true, None).0[0],
                0x1001 | 1 << 4,
            ],
            [0x7f, 0],
        ] {
            assert!(check_command(&caps, cmd).is_err(), "{cmd:#x?}");
        }
        let s1_only = SmmuCaps {
            stage2: false,
            ..caps
        };
        assert!(check_command(&s1_only, Command::tlbi_s12_vmall(1).0).is_err());
        assert!(check_command(&caps, Command::tlbi_el2_all().0).is_err());
        let small = SmmuCaps {
            asid16: false,
            ..caps
        };
        assert!(check_command(&small, Command::tlbi_nh_asid(0, 0x100).0).is_err());
        // Every builder's ordinary output passes.
        for cmd in [
            Command::cfgi_ste(0x28, true),
            Command::cfgi_all(),
            Command::cfgi_cd(0x28, 0, true),
            Command::tlbi_nh_asid(0, 7),
            Command::tlbi_nh_va(0, 3, 0x1234_5000, true, None),
            Command::tlbi_nh_va(0, 3, 0x40_0000, false, Some(TlbiRange { num: 2, scale: 1 })),
            Command::tlbi_s2_ipa(9, 0x20_0000, true, None),
            Command::tlbi_s12_vmall(9),
            Command::tlbi_nsnh_all(),
            Command::sync(),
        ] {
            check_command(&caps, cmd.0).unwrap_or_else(|e| panic!("{cmd:?}: {e:?}"));
        }
    }
}
