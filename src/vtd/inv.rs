//! 128-bit invalidation descriptors for the invalidation queue (VT-d 6.5.2).

use crate::addr::{DmaAddr, PhysAddr};

/// Granularity of a context-cache invalidation (VT-d 6.5.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ContextGranularity {
    /// Every context entry.
    Global,
    /// Every entry of one domain-id.
    Domain(u16),
    /// One source-id (function mask 0) tagged with the given domain-id.
    Device {
        /// Domain-id the entry was cached under.
        did: u16,
        /// Source-id (requester ID).
        sid: u16,
    },
}

/// Granularity of an IOTLB invalidation (VT-d 6.5.2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IotlbGranularity {
    /// Every IOTLB entry.
    Global,
    /// Every entry of one domain-id (DSI).
    Domain(u16),
    /// 2^`am` pages at the naturally aligned `addr` in domain `did` (PSI).
    Page {
        /// Domain-id.
        did: u16,
        /// Base address, aligned to 2^(12 + am).
        addr: DmaAddr,
        /// Address mask: 2^am pages.
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

/// Granularity of a PASID-cache invalidation (VT-d 6.5.2.2, scalable mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PasidGranularity {
    /// Every PASID entry tagged with the domain-id.
    Domain(u16),
    /// One PASID in one domain.
    Pasid {
        /// Domain-id.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// Every PASID entry.
    Global,
}

/// Granularity of a PASID-based IOTLB invalidation (VT-d 6.5.2.4), for
/// first-level translations in scalable mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PasidIotlbGranularity {
    /// Every entry of one PASID in one domain.
    AllInPasid {
        /// Domain-id.
        did: u16,
        /// PASID.
        pasid: u32,
    },
    /// 2^`am` pages at the naturally aligned `addr` of one PASID.
    Page {
        /// Domain-id.
        did: u16,
        /// PASID.
        pasid: u32,
        /// Base address, aligned to 2^(12 + am).
        addr: DmaAddr,
        /// Address mask: 2^am pages.
        am: u8,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
}

/// Granularity of an interrupt-entry-cache invalidation (VT-d 6.5.2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IecGranularity {
    /// Every cached interrupt-remapping entry (G = 0).
    Global,
    /// The 2^`im` entries from `index`, which is aligned to 2^`im` (G = 1).
    Index {
        /// First interrupt index (IIDX).
        index: u16,
        /// Index mask (IM): 2^im entries.
        im: u8,
    },
}

/// One 128-bit descriptor of the invalidation queue (VT-d 6.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct InvDesc {
    lo: u64,
    hi: u64,
}

super::raw128!(InvDesc);

impl InvDesc {
    /// Type field of a context-cache invalidate descriptor.
    pub const TYPE_CONTEXT: u64 = 0x1;
    /// Type field of an IOTLB invalidate descriptor.
    pub const TYPE_IOTLB: u64 = 0x2;
    /// Type field of a PASID-based IOTLB invalidate descriptor.
    pub const TYPE_PASID_IOTLB: u64 = 0x6;
    /// Type field of a PASID-cache invalidate descriptor.
    pub const TYPE_PASID_CACHE: u64 = 0x7;
    /// Type field of an invalidation wait descriptor.
    pub const TYPE_WAIT: u64 = 0x5;
    /// Type field of an interrupt-entry-cache invalidate descriptor.
    pub const TYPE_IEC: u64 = 0x4;

    /// Interrupt-entry-cache invalidate descriptor (VT-d 6.5.2.7): G bit 4
    /// (0 global, 1 index-selective), IM 31:27, IIDX 47:32; the rest, and the
    /// whole upper half, reserved (Linux `qi_flush_iec` builds the same).
    pub const fn iec(g: IecGranularity) -> Self {
        let lo = match g {
            IecGranularity::Global => 0,
            IecGranularity::Index { index, im } => {
                (1 << 4) | (((im & 0x1f) as u64) << 27) | ((index as u64) << 32)
            }
        };
        Self {
            lo: lo | Self::TYPE_IEC,
            hi: 0,
        }
    }

    /// Context-cache invalidate descriptor (VT-d 6.5.2.1).
    pub const fn context(g: ContextGranularity) -> Self {
        let lo = match g {
            ContextGranularity::Global => 1 << 4,
            ContextGranularity::Domain(did) => (2 << 4) | ((did as u64) << 16),
            ContextGranularity::Device { did, sid } => {
                (3 << 4) | ((did as u64) << 16) | ((sid as u64) << 32)
            }
        };
        Self {
            lo: lo | Self::TYPE_CONTEXT,
            hi: 0,
        }
    }

    /// IOTLB invalidate descriptor (VT-d 6.5.2.3); `drain_reads` /
    /// `drain_writes` set DR / DW (only when CAP.DRD / CAP.DWD).
    pub const fn iotlb(g: IotlbGranularity, drain_reads: bool, drain_writes: bool) -> Self {
        let drain = ((drain_writes as u64) << 6) | ((drain_reads as u64) << 7);
        let (lo, hi) = match g {
            IotlbGranularity::Global => (1 << 4, 0),
            IotlbGranularity::Domain(did) => ((2 << 4) | ((did as u64) << 16), 0),
            IotlbGranularity::Page { did, addr, am, ih } => (
                (3 << 4) | ((did as u64) << 16),
                (addr.0 & !0xfff) | ((ih as u64) << 6) | (am as u64 & 0x3f),
            ),
        };
        Self {
            lo: lo | drain | Self::TYPE_IOTLB,
            hi,
        }
    }

    /// PASID-cache invalidate descriptor (VT-d 6.5.2.2): G (5:4) 00 domain,
    /// 01 PASID, 11 global; DID 31:16; PASID 51:32.
    pub const fn pasid_cache(g: PasidGranularity) -> Self {
        let lo = match g {
            PasidGranularity::Domain(did) => (did as u64) << 16,
            PasidGranularity::Pasid { did, pasid } => {
                (1 << 4) | ((did as u64) << 16) | (((pasid & 0xf_ffff) as u64) << 32)
            }
            PasidGranularity::Global => 3 << 4,
        };
        Self {
            lo: lo | Self::TYPE_PASID_CACHE,
            hi: 0,
        }
    }

    /// PASID-based IOTLB invalidate descriptor (VT-d 6.5.2.4): G (5:4) 10
    /// all of a PASID, 11 page-selective; DID 31:16; PASID 51:32; hi: ADDR
    /// 63:12, IH bit 6, AM 5:0.
    pub const fn pasid_iotlb(g: PasidIotlbGranularity) -> Self {
        let (lo, hi) = match g {
            PasidIotlbGranularity::AllInPasid { did, pasid } => (
                (2 << 4) | ((did as u64) << 16) | (((pasid & 0xf_ffff) as u64) << 32),
                0,
            ),
            PasidIotlbGranularity::Page {
                did,
                pasid,
                addr,
                am,
                ih,
            } => (
                (3 << 4) | ((did as u64) << 16) | (((pasid & 0xf_ffff) as u64) << 32),
                (addr.0 & !0xfff) | ((ih as u64) << 6) | (am as u64 & 0x3f),
            ),
        };
        Self {
            lo: lo | Self::TYPE_PASID_IOTLB,
            hi,
        }
    }

    /// Invalidation wait descriptor with status write (VT-d 6.5.2.8): when
    /// every earlier descriptor is done, the hardware writes `data` (32 bits)
    /// to the 4-byte aligned `status` address. No interrupt, no fence.
    pub const fn wait(status: PhysAddr, data: u32) -> Self {
        Self {
            lo: ((data as u64) << 32) | (1 << 5) | Self::TYPE_WAIT,
            hi: status.0 & !3,
        }
    }

    /// Type field (bits 3:0).
    pub const fn desc_type(self) -> u64 {
        self.lo & 0xf
    }
}

/// Splits `[iova, iova + len)` into naturally aligned power-of-two page
/// blocks for page-selective invalidation with address masks up to `mamv`.
/// Calls `f(addr, am)` for each block; returns the block count, or `None`
/// (after calling `f` for none) if more than `max_blocks` would be needed or
/// the range overflows, in which case the caller falls back to a domain-selective
/// invalidation.
pub fn psi_blocks(
    iova: DmaAddr,
    len: u64,
    mamv: u8,
    max_blocks: usize,
    mut f: impl FnMut(DmaAddr, u8),
) -> Option<usize> {
    let mut count = 0;
    for (addr, am) in psi_range(iova, len, mamv, max_blocks)? {
        f(addr, am);
        count += 1;
    }
    Some(count)
}

/// The blocks [`psi_blocks`] hands out, as an iterator; `None` under the
/// same conditions (more than `max_blocks` blocks, or overflow). Counting
/// stops at `max_blocks + 1`, so a huge range costs no long walk.
pub(crate) fn psi_range(
    iova: DmaAddr,
    len: u64,
    mamv: u8,
    max_blocks: usize,
) -> Option<impl Iterator<Item = (DmaAddr, u8)>> {
    let first = iova.0 >> 12;
    let end = iova.0.checked_add(len)?.checked_add(0xfff)? >> 12;
    let blocks = PsiBlocks::new(first, end, mamv);
    if blocks.clone().take(max_blocks.saturating_add(1)).count() > max_blocks {
        return None;
    }
    Some(blocks.map(|(pfn, am)| (DmaAddr(pfn << 12), am)))
}

/// Iterator over `(first page frame, address mask)` blocks covering `[pfn, end)`.
#[derive(Clone)]
struct PsiBlocks {
    pfn: u64,
    end: u64,
    mamv: u32,
}

impl PsiBlocks {
    fn new(pfn: u64, end: u64, mamv: u8) -> Self {
        Self {
            pfn,
            end,
            mamv: mamv as u32,
        }
    }
}

impl Iterator for PsiBlocks {
    type Item = (u64, u8);

    fn next(&mut self) -> Option<(u64, u8)> {
        if self.pfn >= self.end {
            return None;
        }
        // The largest block that starts aligned here and does not run past the end.
        let align = self.pfn.trailing_zeros(); // 64 when pfn == 0
        let fit = 63 - (self.end - self.pfn).leading_zeros();
        let am = align.min(fit).min(self.mamv);
        let pfn = self.pfn;
        self.pfn = pfn.saturating_add(1u64 << am);
        Some((pfn, am as u8))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn context_cache_descriptors_match_hand_worked_values() {
        // Type 1, G(5:4): 01 global, 10 domain, 11 device; DID 31:16; SID 47:32.
        assert_eq!(
            InvDesc::context(ContextGranularity::Global).raw(),
            [0x11, 0]
        );
        assert_eq!(
            InvDesc::context(ContextGranularity::Domain(5)).raw(),
            [0x0005_0021, 0]
        );
        assert_eq!(
            InvDesc::context(ContextGranularity::Device { did: 3, sid: 0x18 }).raw(),
            [0x0018_0003_0031, 0]
        );
    }

    #[test]
    fn iotlb_descriptors_match_hand_worked_values() {
        // Type 2, G: 01 global, 10 DSI, 11 PSI; DW bit 6, DR bit 7; DID 31:16;
        // hi: ADDR 63:12, IH bit 6, AM 5:0.
        assert_eq!(
            InvDesc::iotlb(IotlbGranularity::Global, false, false).raw(),
            [0x12, 0]
        );
        assert_eq!(
            InvDesc::iotlb(IotlbGranularity::Domain(0x42), true, true).raw(),
            [0x0042_00e2, 0]
        );
        let psi = IotlbGranularity::Page {
            did: 1,
            addr: DmaAddr(0x20_0000),
            am: 9,
            ih: true,
        };
        assert_eq!(
            InvDesc::iotlb(psi, false, true).raw(),
            [0x0001_0072, 0x20_0049]
        );
    }

    #[test]
    fn pasid_cache_descriptors_match_hand_worked_values() {
        assert_eq!(
            InvDesc::pasid_cache(PasidGranularity::Pasid { did: 2, pasid: 0 }).raw(),
            [0x0002_0017, 0]
        );
        assert_eq!(
            InvDesc::pasid_cache(PasidGranularity::Pasid {
                did: 1,
                pasid: 0x1_2345
            })
            .raw(),
            [0x1_2345_0001_0017, 0]
        );
        assert_eq!(
            InvDesc::pasid_cache(PasidGranularity::Global).raw(),
            [0x37, 0]
        );
        assert_eq!(
            InvDesc::pasid_cache(PasidGranularity::Domain(4)).raw(),
            [0x4_0007, 0]
        );
    }

    #[test]
    fn pasid_iotlb_descriptors_match_hand_worked_values() {
        let all = PasidIotlbGranularity::AllInPasid { did: 3, pasid: 0 };
        assert_eq!(InvDesc::pasid_iotlb(all).raw(), [0x3_0026, 0]);
        let page = PasidIotlbGranularity::Page {
            did: 1,
            pasid: 0x10,
            addr: DmaAddr(0x40_0000),
            am: 9,
            ih: true,
        };
        assert_eq!(
            InvDesc::pasid_iotlb(page).raw(),
            [0x10_0001_0036, 0x40_0049]
        );
    }

    #[test]
    fn iec_descriptors_match_hand_worked_values() {
        // Type 4; global: G = 0, nothing else.
        assert_eq!(InvDesc::iec(IecGranularity::Global).raw(), [0x4, 0]);
        // Index 0x1234, IM 2: G bit 4, IM 31:27 = 2 (0x1000_0000), IIDX 47:32.
        let d = InvDesc::iec(IecGranularity::Index {
            index: 0x1234,
            im: 2,
        });
        assert_eq!(d.raw(), [0x1234_1000_0014, 0]);
        assert_eq!(d.desc_type(), InvDesc::TYPE_IEC);
    }

    #[test]
    fn wait_descriptor_writes_status_data_to_address() {
        // Type 5, SW bit 5, status data 63:32; hi: status address 63:2.
        let d = InvDesc::wait(PhysAddr(0x8_1000), 0xdead_beef);
        assert_eq!(d.raw(), [0xdead_beef_0000_0025, 0x8_1000]);
        assert_eq!(d.desc_type(), InvDesc::TYPE_WAIT);
    }

    fn collect(iova: u64, len: u64, mamv: u8, max: usize) -> Option<Vec<(u64, u8)>> {
        let mut v = Vec::new();
        psi_blocks(DmaAddr(iova), len, mamv, max, |a, am| v.push((a.0, am)))?;
        Some(v)
    }

    #[test]
    fn psi_blocks_are_naturally_aligned_and_cover_exactly_the_range() {
        // Pages 1..7 (0x1000..0x8000): 1 page at 1, 2 at 2, 4 at 4.
        assert_eq!(
            collect(0x1000, 0x7000, 18, 16).unwrap(),
            [(0x1000, 0), (0x2000, 1), (0x4000, 2)]
        );
        // 2 MiB aligned 2 MiB: one block with AM=9.
        assert_eq!(
            collect(0x20_0000, 0x20_0000, 18, 16).unwrap(),
            [(0x20_0000, 9)]
        );
        // MAMV caps the mask: 4 pages with MAMV=1 → two blocks of 2.
        assert_eq!(collect(0, 0x4000, 1, 16).unwrap(), [(0, 1), (0x2000, 1)]);
        // Unaligned start and length round out to whole pages.
        assert_eq!(
            collect(0x1800, 0x1000, 18, 16).unwrap(),
            [(0x1000, 0), (0x2000, 0)]
        );
    }

    #[test]
    fn psi_blocks_give_up_past_the_limit() {
        assert!(collect(0x1000, 0x7000, 0, 6).is_none());
        assert!(collect(u64::MAX - 0xfff, 0x2000, 18, 16).is_none());
    }
}
