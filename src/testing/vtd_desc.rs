//! A strict checker of what a VT-d driver hands the hardware: invalidation
//! descriptors (VT-d spec §6.5.2) and root / context / PASID entries (§9.1,
//! §9.3–§9.6).
//!
//! QEMU's intel-iommu executes many encodings a real unit refuses with an
//! invalidation-queue error (IQE) or a reserved-field fault. This checker
//! decodes each 128-bit (legacy, IQA.DW = 0) or 256-bit (scalable mode,
//! IQA.DW = 1) descriptor and refuses any type, granularity, field
//! combination or set reserved bit that the specification does not allow,
//! against the unit's CAP/ECAP ([`VtdRules`]). It allocates nothing, so the
//! drivers' unit tests and `tests/` can run it on every descriptor written.

/// What the checked unit supports and how it is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdRules {
    /// Scalable mode (RTADDR.TTM = 01b, 256-bit descriptors).
    pub scalable: bool,
    /// CAP.PSI: page-selective IOTLB invalidation.
    pub psi: bool,
    /// CAP.MAMV: largest address mask.
    pub mamv: u8,
    /// CAP.DRD / CAP.DWD: read / write draining.
    pub drain_reads: bool,
    /// CAP.DWD.
    pub drain_writes: bool,
    /// CAP.ND decoded: number of domain-ids.
    pub domains: u32,
    /// CAP.SAGAW.
    pub sagaw: u8,
    /// CAP.MGAW + 1: the host address width pointers must fit in.
    pub haw: u8,
    /// ECAP.PT.
    pub pt: bool,
    /// ECAP.SLTS / ECAP.FLTS.
    pub slts: bool,
    /// ECAP.FLTS.
    pub flts: bool,
    /// ECAP.SMPWC: scalable-mode page walks may snoop (PWSNP allowed).
    pub smpwc: bool,
    /// ECAP.PDS: page-request drain in wait descriptors.
    pub pds: bool,
    /// ECAP.IR: interrupt remapping (interrupt-entry-cache invalidation).
    pub ir: bool,
}

impl VtdRules {
    /// Rules from raw CAP / ECAP values; `scalable` is the mode in use.
    pub const fn from_caps(cap: u64, ecap: u64, scalable: bool) -> Self {
        let nd = (cap & 7) as u32;
        Self {
            scalable,
            psi: cap >> 39 & 1 != 0,
            mamv: (cap >> 48 & 0x3f) as u8,
            drain_reads: cap >> 55 & 1 != 0,
            drain_writes: cap >> 54 & 1 != 0,
            domains: 1 << (4 + 2 * nd),
            sagaw: (cap >> 8 & 0x1f) as u8,
            haw: (cap >> 16 & 0x3f) as u8 + 1,
            pt: ecap >> 6 & 1 != 0,
            slts: ecap >> 46 & 1 != 0,
            flts: ecap >> 47 & 1 != 0,
            smpwc: ecap >> 48 & 1 != 0,
            pds: ecap >> 42 & 1 != 0,
            ir: ecap >> 3 & 1 != 0,
        }
    }

    /// The largest AGAW (as the AW field value) SAGAW offers, if any.
    pub const fn largest_aw(&self) -> Option<u8> {
        if self.sagaw & 0b1000 != 0 {
            Some(3)
        } else if self.sagaw & 0b100 != 0 {
            Some(2)
        } else if self.sagaw & 0b10 != 0 {
            Some(1)
        } else {
            None
        }
    }

    fn aw_supported(&self, aw: u64) -> bool {
        (1..=3).contains(&aw) && self.sagaw & (1 << aw) != 0
    }

    fn above_haw(&self, pa: u64) -> bool {
        self.haw < 64 && pa >> self.haw != 0
    }
}

/// A descriptor that passed the checks, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum VtdDesc {
    /// Context-cache invalidate (§6.5.2.1): G 1 global, 2 domain, 3 device.
    Context {
        /// Granularity.
        g: u8,
        /// Domain-id.
        did: u16,
        /// Source-id.
        sid: u16,
    },
    /// IOTLB invalidate (§6.5.2.3): G 1 global, 2 domain, 3 page.
    Iotlb {
        /// Granularity.
        g: u8,
        /// Domain-id.
        did: u16,
        /// Page address (page-selective only).
        addr: u64,
        /// Address mask (page-selective only).
        am: u8,
        /// Invalidation hint.
        ih: bool,
    },
    /// PASID-based IOTLB invalidate (§6.5.2.4): G 2 PASID, 3 page.
    PasidIotlb {
        /// Granularity.
        g: u8,
        /// Domain-id.
        did: u16,
        /// PASID.
        pasid: u32,
        /// Page address (page-selective only).
        addr: u64,
        /// Address mask.
        am: u8,
        /// Invalidation hint.
        ih: bool,
    },
    /// PASID-cache invalidate (§6.5.2.2): G 0 domain, 1 PASID, 3 global.
    PasidCache {
        /// Granularity.
        g: u8,
        /// Domain-id.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// Interrupt-entry-cache invalidate (§6.5.2.7).
    Iec {
        /// G = 0: every entry.
        global: bool,
        /// First interrupt index (index-selective only).
        index: u16,
        /// Index mask: 2^im entries (index-selective only).
        im: u8,
    },
    /// Invalidation wait (§6.5.2.8).
    Wait {
        /// Status write (SW) to `status` with `data`.
        sw: bool,
        /// Interrupt (IF).
        irq: bool,
        /// Fence (FN).
        fence: bool,
        /// Status address.
        status: u64,
        /// Status data.
        data: u32,
    },
}

/// Why a descriptor or table entry would be refused by real hardware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Violation {
    /// Unknown type, or a type this mode does not accept (PASID-based types
    /// in legacy mode; interrupt-entry without ECAP.IR; device-TLB types are
    /// never emitted).
    UnknownType(u8),
    /// Set bits in reserved (or, for this type, meaningless) fields: word
    /// index and the offending bits.
    Reserved {
        /// 64-bit word of the descriptor or entry.
        word: u8,
        /// The set reserved bits.
        bits: u64,
    },
    /// A granularity value the type does not define.
    Granularity(u8),
    /// Page-selective invalidation on a unit without CAP.PSI.
    NoPsi,
    /// AM above CAP.MAMV.
    AmAboveMamv {
        /// AM.
        am: u8,
        /// MAMV.
        mamv: u8,
    },
    /// ADDR not aligned to 2^AM pages.
    Unaligned {
        /// ADDR.
        addr: u64,
        /// AM.
        am: u8,
    },
    /// DR / DW set without CAP.DRD / CAP.DWD.
    DrainUnsupported,
    /// Domain-id not below 2^(4 + 2·CAP.ND).
    DomainId(u16),
    /// A wait descriptor's status address not 4-byte aligned.
    StatusUnaligned(u64),
    /// A table pointer above the host address width, or zero where a table
    /// is needed.
    BadPointer(u64),
    /// An address width (AW) SAGAW does not offer, or pass-through AW other
    /// than the largest SAGAW.
    AddressWidth(u8),
    /// A translation type (TT / PGTT) the unit does not offer.
    TranslationType(u8),
    /// PASID-entry PWSNP does not follow ECAP.SMPWC.
    PageWalkSnoop,
}

const fn rsv(word: u8, v: u64, mask: u64) -> Result<(), Violation> {
    if v & mask != 0 {
        Err(Violation::Reserved {
            word,
            bits: v & mask,
        })
    } else {
        Ok(())
    }
}

/// Checks one descriptor, as read from the queue: `words[2..]` are the
/// upper half of a 256-bit slot (zero in a 128-bit queue).
///
/// # Errors
///
/// The first rule the descriptor breaks: [`Violation::UnknownType`],
/// [`Violation::Reserved`], [`Violation::Granularity`], [`Violation::NoPsi`],
/// [`Violation::AmAboveMamv`], [`Violation::Unaligned`],
/// [`Violation::DrainUnsupported`], [`Violation::DomainId`],
/// [`Violation::StatusUnaligned`] or [`Violation::BadPointer`].
pub fn check_descriptor(r: &VtdRules, words: [u64; 4]) -> Result<VtdDesc, Violation> {
    let [lo, hi, w2, w3] = words;
    // Type is bits 3:0 with bits 11:9 as type[6:4] (§6.5.2); no type this
    // driver may emit uses the upper bits.
    let ty = (lo & 0xf) as u8 | (((lo >> 9) & 7) as u8) << 4;
    // Every type below uses only the low 128 bits of a 256-bit slot.
    rsv(2, w2, !0)?;
    rsv(3, w3, !0)?;
    let g = ((lo >> 4) & 3) as u8;
    let did = (lo >> 16) as u16;
    let check_did = |did: u16| {
        if u32::from(did) >= r.domains {
            Err(Violation::DomainId(did))
        } else {
            Ok(())
        }
    };
    let check_page = |addr: u64, am: u8| {
        if am > r.mamv {
            return Err(Violation::AmAboveMamv { am, mamv: r.mamv });
        }
        // §6.5.2.3: ADDR is a naturally aligned block of 2^AM pages.
        if addr & ((1u64 << (12 + u32::from(am))) - 1) != 0 {
            return Err(Violation::Unaligned { addr, am });
        }
        Ok(())
    };
    match ty {
        1 => {
            // §6.5.2.1: 5:4 G, 31:16 DID, 47:32 SID, 49:48 FM; rest reserved.
            rsv(0, lo, 0xffff_c000_0000_ffc0)?;
            rsv(1, hi, !0)?;
            let sid = (lo >> 32) as u16;
            match g {
                1 => rsv(0, lo, 0x0003_ffff_ffff_0000)?,
                2 => {
                    rsv(0, lo, 0x0003_ffff_0000_0000)?;
                    check_did(did)?;
                }
                3 => check_did(did)?,
                _ => return Err(Violation::Granularity(g)),
            }
            // Function masks are a legacy-mode feature only.
            if r.scalable {
                rsv(0, lo, 0x0003_0000_0000_0000)?;
            }
            Ok(VtdDesc::Context { g, did, sid })
        }
        2 => {
            // §6.5.2.3: 5:4 G, 6 DW, 7 DR, 31:16 DID; hi 5:0 AM, 6 IH, 63:12 ADDR.
            rsv(0, lo, 0xffff_ffff_0000_ff00)?;
            rsv(1, hi, 0xf80)?;
            if lo & (1 << 7) != 0 && !r.drain_reads || lo & (1 << 6) != 0 && !r.drain_writes {
                return Err(Violation::DrainUnsupported);
            }
            let (addr, am, ih) = (hi & !0xfff, (hi & 0x3f) as u8, hi & (1 << 6) != 0);
            match g {
                1 => {
                    rsv(0, lo, 0xffff_0000)?;
                    rsv(1, hi, !0)?;
                }
                2 => {
                    rsv(1, hi, !0)?;
                    check_did(did)?;
                }
                3 => {
                    if !r.psi {
                        return Err(Violation::NoPsi);
                    }
                    check_did(did)?;
                    check_page(addr, am)?;
                }
                _ => return Err(Violation::Granularity(g)),
            }
            Ok(VtdDesc::Iotlb {
                g,
                did,
                addr,
                am,
                ih,
            })
        }
        5 => {
            // §6.5.2.8: 4 IF, 5 SW, 6 FN, 7 PD, 63:32 data; hi 63:2 address.
            rsv(0, lo, 0xffff_ff00)?;
            if lo & (1 << 7) != 0 && !r.pds {
                return Err(Violation::Reserved {
                    word: 0,
                    bits: 1 << 7,
                });
            }
            let sw = lo & (1 << 5) != 0;
            if sw {
                if hi & 3 != 0 {
                    return Err(Violation::StatusUnaligned(hi));
                }
                if r.above_haw(hi) || hi == 0 {
                    return Err(Violation::BadPointer(hi));
                }
            } else {
                // Without a status write, address and data mean nothing.
                rsv(0, lo, 0xffff_ffff_0000_0000)?;
                rsv(1, hi, !0)?;
            }
            Ok(VtdDesc::Wait {
                sw,
                irq: lo & (1 << 4) != 0,
                fence: lo & (1 << 6) != 0,
                status: hi,
                data: (lo >> 32) as u32,
            })
        }
        6 if r.scalable => {
            // §6.5.2.4: 5:4 G (10 PASID, 11 page), 31:16 DID, 51:32 PASID;
            // hi as for the IOTLB descriptor.
            rsv(0, lo, 0xfff0_0000_0000_ffc0)?;
            rsv(1, hi, 0xf80)?;
            let pasid = ((lo >> 32) & 0xf_ffff) as u32;
            let (addr, am, ih) = (hi & !0xfff, (hi & 0x3f) as u8, hi & (1 << 6) != 0);
            check_did(did)?;
            match g {
                2 => rsv(1, hi, !0)?,
                3 => check_page(addr, am)?,
                _ => return Err(Violation::Granularity(g)),
            }
            Ok(VtdDesc::PasidIotlb {
                g,
                did,
                pasid,
                addr,
                am,
                ih,
            })
        }
        7 if r.scalable => {
            // §6.5.2.2: 5:4 G (00 domain, 01 PASID, 11 global), 31:16 DID,
            // 51:32 PASID.
            rsv(0, lo, 0xfff0_0000_0000_ffc0)?;
            rsv(1, hi, !0)?;
            let pasid = ((lo >> 32) & 0xf_ffff) as u32;
            match g {
                0 => {
                    rsv(0, lo, 0x000f_ffff_0000_0000)?;
                    check_did(did)?;
                }
                1 => check_did(did)?,
                3 => rsv(0, lo, 0x000f_ffff_ffff_0000)?,
                _ => return Err(Violation::Granularity(g)),
            }
            Ok(VtdDesc::PasidCache { g, did, pasid })
        }
        4 if r.ir => {
            // §6.5.2.7: 4 G (0 global, 1 index-selective), 31:27 IM,
            // 47:32 IIDX; 8:5, 26:12, 63:48 and the upper half reserved.
            rsv(0, lo, 0xffff_0000_07ff_f1e0)?;
            rsv(1, hi, !0)?;
            let global = lo & (1 << 4) == 0;
            let index = (lo >> 32) as u16;
            let im = ((lo >> 27) & 0x1f) as u8;
            if global {
                // Index and mask mean nothing for a global invalidation.
                rsv(0, lo, 0x0000_ffff_f800_0000)?;
            } else if im > 16 || u32::from(index) & ((1u32 << im) - 1) != 0 {
                // IIDX names a naturally aligned block of 2^IM entries.
                return Err(Violation::Unaligned {
                    addr: u64::from(index),
                    am: im,
                });
            }
            Ok(VtdDesc::Iec { global, index, im })
        }
        t => Err(Violation::UnknownType(t)),
    }
}

/// Checks a present interrupt-remapping table entry, remapped format
/// (§9.10): lo 14:12 and 31:24 reserved, IM (bit 15, posted format) not
/// used by this crate, DLM 011b / 110b reserved, in xAPIC mode (`x2apic`
/// false: IRTA.EIME = 0) destination bits 39:32 and 63:48 reserved; hi
/// 63:20 reserved and SVT 11b reserved.
///
/// # Errors
///
/// The first [`Violation`] the entry breaks.
pub fn check_irte(raw: [u64; 2], x2apic: bool) -> Result<(), Violation> {
    let [lo, hi] = raw;
    if lo & 1 == 0 {
        return Ok(());
    }
    rsv(0, lo, 0xff00_f000)?;
    if !x2apic {
        rsv(0, lo, 0xffff_00ff_0000_0000)?;
    }
    let dlm = (lo >> 5) & 7;
    if dlm == 3 || dlm == 6 {
        return Err(Violation::Reserved {
            word: 0,
            bits: lo & 0xe0,
        });
    }
    rsv(1, hi, !0xf_ffff)?;
    if (hi >> 18) & 3 == 3 {
        return Err(Violation::Reserved {
            word: 1,
            bits: 3 << 18,
        });
    }
    Ok(())
}

/// Checks a legacy root entry (§9.1): P, CTP; the upper half is reserved.
/// A scalable root entry (§9.2) has a second P/CTP pair in the upper half.
///
/// # Errors
///
/// [`Violation::Reserved`] for set reserved bits, [`Violation::BadPointer`]
/// for a present half whose context-table pointer is zero or above the host
/// address width.
pub fn check_root_entry(r: &VtdRules, raw: [u64; 2]) -> Result<(), Violation> {
    let halves: &[(u8, u64)] = if r.scalable {
        &[(0, raw[0]), (1, raw[1])]
    } else {
        rsv(1, raw[1], !0)?;
        &[(0, raw[0])]
    };
    for &(w, v) in halves {
        if v & 1 != 0 {
            rsv(w, v, 0xffe)?;
            if v & !0xfff == 0 || r.above_haw(v & !0xfff) {
                return Err(Violation::BadPointer(v));
            }
        }
    }
    Ok(())
}

/// Checks a present legacy context entry (§9.3): lo 0 P, 1 FPD, 3:2 TT,
/// 63:12 SLPTPTR; hi 2:0 AW, 6:3 available, 23:8 DID.
///
/// # Errors
///
/// [`Violation::Reserved`], [`Violation::DomainId`] (DID not below the
/// unit's number of domains), [`Violation::AddressWidth`] (AW not in SAGAW,
/// or not the largest for pass-through), [`Violation::BadPointer`],
/// [`Violation::TranslationType`] (reserved TT, or pass-through without
/// ECAP.PT).
pub fn check_context_entry(r: &VtdRules, raw: [u64; 2]) -> Result<(), Violation> {
    let [lo, hi] = raw;
    if lo & 1 == 0 {
        return Ok(());
    }
    rsv(0, lo, 0xff0)?;
    rsv(1, hi, 0xffff_ffff_ff00_0080)?;
    let did = (hi >> 8) as u16;
    if u32::from(did) >= r.domains {
        return Err(Violation::DomainId(did));
    }
    let aw = (hi & 7) as u8;
    match (lo >> 2) & 3 {
        0 | 1 => {
            if !r.aw_supported(u64::from(aw)) {
                return Err(Violation::AddressWidth(aw));
            }
            let p = lo & !0xfff;
            if p == 0 || r.above_haw(p) {
                return Err(Violation::BadPointer(p));
            }
        }
        2 => {
            if !r.pt {
                return Err(Violation::TranslationType(2));
            }
            // §9.3: with TT = 10b, AW must name the largest AGAW SAGAW
            // offers (Linux: context_set_address_width(.., iommu->msagaw)).
            if Some(aw) != r.largest_aw() {
                return Err(Violation::AddressWidth(aw));
            }
            rsv(0, lo, !0xfff_u64)?;
        }
        t => return Err(Violation::TranslationType(t as u8)),
    }
    Ok(())
}

/// Checks a present scalable-mode context entry (§9.4): word 0: P, FPD,
/// DTE, PASIDE, PRE, PDTS 11:9, PASIDDIRPTR 63:12; word 1: RID_PASID 19:0,
/// RID_PRIV 20; words 2–3 reserved.
///
/// # Errors
///
/// [`Violation::Reserved`], or [`Violation::BadPointer`] for a PASID
/// directory pointer that is zero or above the host address width.
pub fn check_scalable_context(r: &VtdRules, raw: [u64; 4]) -> Result<(), Violation> {
    if raw[0] & 1 == 0 {
        return Ok(());
    }
    rsv(0, raw[0], 0x1e0)?;
    rsv(1, raw[1], !0x1f_ffff)?;
    rsv(2, raw[2], !0)?;
    rsv(3, raw[3], !0)?;
    let p = raw[0] & !0xfff;
    if p == 0 || r.above_haw(p) {
        return Err(Violation::BadPointer(p));
    }
    Ok(())
}

/// Checks a present PASID directory entry (§9.5): P, FPD, table 63:12.
///
/// # Errors
///
/// [`Violation::Reserved`], or [`Violation::BadPointer`] for a PASID table
/// pointer that is zero or above the host address width.
pub fn check_pasid_dir_entry(r: &VtdRules, e: u64) -> Result<(), Violation> {
    if e & 1 == 0 {
        return Ok(());
    }
    rsv(0, e, 0xffc)?;
    let p = e & !0xfff;
    if p == 0 || r.above_haw(p) {
        return Err(Violation::BadPointer(p));
    }
    Ok(())
}

/// Checks a present PASID table entry (§9.6) of the kinds this crate
/// builds: PGTT first-level, second-level or pass-through; DID below ND;
/// AW offered by SAGAW; PWSNP set exactly when ECAP.SMPWC says page walks
/// may snoop (Linux: `pasid_set_page_snoop(.., ecap_smpwc)`); no nesting,
/// no posted or extended-memory-type fields.
///
/// # Errors
///
/// [`Violation::Reserved`], [`Violation::DomainId`],
/// [`Violation::TranslationType`] (a PGTT the unit does not offer or this
/// crate does not build), [`Violation::AddressWidth`],
/// [`Violation::BadPointer`], [`Violation::PageWalkSnoop`].
pub fn check_pasid_entry(r: &VtdRules, raw: [u64; 8]) -> Result<(), Violation> {
    let w = raw;
    if w[0] & 1 == 0 {
        return Ok(());
    }
    // Word 0: 0 P, 1 FPD, 4:2 AW, 5 SLEE, 8:6 PGTT, 9 SLADE, 11:10 reserved.
    rsv(0, w[0], 0xc00)?;
    // Word 1: 15:0 DID, 22:16 reserved, 23 PWSNP, 24 PGSNP, 25 CD, 26 EMTE,
    // 29:27 EMT, 30 PWT, 31 PCD, 63:32 PAT. EMTE and memory types unused.
    rsv(1, w[1], 0x007f_0000 | 0xffff_ffff_fe00_0000)?;
    for (i, &v) in w.iter().enumerate().skip(3) {
        rsv(i as u8, v, !0)?;
    }
    let did = w[1] as u16;
    if u32::from(did) >= r.domains {
        return Err(Violation::DomainId(did));
    }
    let aw = ((w[0] >> 2) & 7) as u8;
    let pwsnp = w[1] & (1 << 23) != 0;
    let pgtt = ((w[0] >> 6) & 7) as u8;
    let walks = match pgtt {
        1 => {
            if !r.flts {
                return Err(Violation::TranslationType(pgtt));
            }
            // Word 2: 0 SRE, 1 ERE, 3:2 FLPM (4-level = 00), 4 WPE, 5 NXE,
            // 6 SMEP, 7 EAFE, 11:8 reserved, 63:12 FLPTPTR.
            rsv(2, w[2], 0xf0e)?;
            rsv(0, w[0], !0xfff_u64)?;
            let p = w[2] & !0xfff;
            if p == 0 || r.above_haw(p) {
                return Err(Violation::BadPointer(p));
            }
            true
        }
        2 => {
            if !r.slts {
                return Err(Violation::TranslationType(pgtt));
            }
            if !r.aw_supported(u64::from(aw)) {
                return Err(Violation::AddressWidth(aw));
            }
            rsv(2, w[2], !0)?;
            let p = w[0] & !0xfff;
            if p == 0 || r.above_haw(p) {
                return Err(Violation::BadPointer(p));
            }
            true
        }
        4 => {
            if !r.pt {
                return Err(Violation::TranslationType(pgtt));
            }
            rsv(0, w[0], !0xfff_u64)?;
            rsv(2, w[2], !0)?;
            false
        }
        t => return Err(Violation::TranslationType(t)),
    };
    if (walks && pwsnp != r.smpwc) || (!walks && pwsnp && !r.smpwc) {
        return Err(Violation::PageWalkSnoop);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
    const QEMU_ECAP: u64 = 0xf0_0f4a;

    fn legacy() -> VtdRules {
        VtdRules::from_caps(QEMU_CAP, QEMU_ECAP, false)
    }

    #[test]
    fn strict_vtd_checker_accepts_well_formed_descriptors() {
        let r = legacy();
        assert_eq!(
            check_descriptor(&r, [0x11, 0, 0, 0]),
            Ok(VtdDesc::Context {
                g: 1,
                did: 0,
                sid: 0
            })
        );
        // PSI of 2 MiB at 2 MiB, AM 9, IH, DW (QEMU has DWD).
        assert!(check_descriptor(&r, [0x0001_0072, 0x20_0049, 0, 0]).is_ok());
        assert!(check_descriptor(&r, [0xdead_beef_0000_0025, 0x8_1000, 0, 0]).is_ok());
        // IEC: global; index-selective for 4 entries at index 8.
        assert_eq!(
            check_descriptor(&r, [0x4, 0, 0, 0]),
            Ok(VtdDesc::Iec {
                global: true,
                index: 0,
                im: 0
            })
        );
        assert_eq!(
            check_descriptor(&r, [0x8_1000_0014, 0, 0, 0]),
            Ok(VtdDesc::Iec {
                global: false,
                index: 8,
                im: 2
            })
        );
    }

    #[test]
    fn strict_vtd_checker_refuses_bad_iec_descriptors() {
        let r = legacy();
        // Index 9 is not aligned to 2^2 entries.
        assert_eq!(
            check_descriptor(&r, [0x9_1000_0014, 0, 0, 0]),
            Err(Violation::Unaligned { addr: 9, am: 2 })
        );
        // A global invalidation with an index set; reserved bit 5; upper half.
        assert!(matches!(
            check_descriptor(&r, [0x9_0000_0004, 0, 0, 0]),
            Err(Violation::Reserved { word: 0, .. })
        ));
        assert!(check_descriptor(&r, [0x24, 0, 0, 0]).is_err());
        assert!(check_descriptor(&r, [0x4, 1, 0, 0]).is_err());
        // A unit without ECAP.IR has no interrupt entry cache.
        let no_ir = VtdRules::from_caps(QEMU_CAP, QEMU_ECAP & !(1 << 3), false);
        assert_eq!(
            check_descriptor(&no_ir, [0x4, 0, 0, 0]),
            Err(Violation::UnknownType(4))
        );
    }

    #[test]
    fn strict_vtd_checker_refuses_what_silicon_refuses() {
        let r = legacy();
        // Type 0 (e.g. queue memory never written / never cleaned).
        assert_eq!(
            check_descriptor(&r, [0, 0, 0, 0]),
            Err(Violation::UnknownType(0))
        );
        // PASID-cache invalidation in legacy mode.
        assert_eq!(
            check_descriptor(&r, [0x37, 0, 0, 0]),
            Err(Violation::UnknownType(7))
        );
        // PSI with the address not aligned to 2^AM pages.
        assert_eq!(
            check_descriptor(&r, [0x0001_0032, 0x1000 | 9, 0, 0]),
            Err(Violation::Unaligned {
                addr: 0x1000,
                am: 9
            })
        );
        // AM above MAMV (18).
        assert_eq!(
            check_descriptor(&r, [0x0001_0032, 19, 0, 0]),
            Err(Violation::AmAboveMamv { am: 19, mamv: 18 })
        );
        // Domain-selective IOTLB with an address: meaningless bits set.
        assert!(matches!(
            check_descriptor(&r, [0x0001_0022, 0x1000, 0, 0]),
            Err(Violation::Reserved { word: 1, .. })
        ));
        // Context-cache granularity 0.
        assert_eq!(
            check_descriptor(&r, [0x01, 0, 0, 0]),
            Err(Violation::Granularity(0))
        );
        // Wait with an unaligned status address.
        assert_eq!(
            check_descriptor(&r, [0x25, 0x8_1002, 0, 0]),
            Err(Violation::StatusUnaligned(0x8_1002))
        );
        // Upper half of a 256-bit slot not zero.
        assert!(matches!(
            check_descriptor(&r, [0x11, 0, 1, 0]),
            Err(Violation::Reserved { word: 2, .. })
        ));
    }

    #[test]
    fn strict_vtd_checker_refuses_bad_entries() {
        let r = legacy();
        // Pass-through must carry the largest AGAW (48-bit: AW 2).
        assert_eq!(check_context_entry(&r, [0x9, 0x702]), Ok(()));
        assert_eq!(
            check_context_entry(&r, [0x9, 0x701]),
            Err(Violation::AddressWidth(1))
        );
        // Reserved bit 4 of a context entry.
        assert!(check_context_entry(&r, [0x1011, 0x102]).is_err());
        let sm = VtdRules::from_caps(QEMU_CAP, QEMU_ECAP | 1 << 46 | 1 << 48, true);
        let mut pe = [0u64; 8];
        pe[0] = 0x7000 | 2 << 6 | 2 << 2 | 1;
        pe[1] = 5;
        assert_eq!(check_pasid_entry(&sm, pe), Err(Violation::PageWalkSnoop));
        pe[1] |= 1 << 23;
        assert_eq!(check_pasid_entry(&sm, pe), Ok(()));
    }
}
