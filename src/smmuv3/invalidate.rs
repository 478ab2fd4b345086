//! TLB invalidation planning: a range becomes range TLBIs (IDR3.RIL), page
//! TLBIs, or one ASID/VMID-wide TLBI.

use super::{Command, Smmu, SmmuError, TlbiRange};
use crate::addr::{DmaAddr, PAGE_SIZE};
use crate::backend::{DomainInfo, TableFormat};
use crate::mem::TableMemory;

impl<M: TableMemory> Smmu<M> {
    /// Queues TLB invalidation of `[iova, iova + len)` in `domain`.
    pub fn invalidate_range(
        &mut self,
        domain: &DomainInfo,
        iova: DmaAddr,
        len: u64,
        leaf_only: bool,
    ) -> Result<(), SmmuError> {
        if len == 0 {
            return Ok(());
        }
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
        let pages = (end - start) / PAGE_SIZE;
        let stage1 = match domain.format {
            TableFormat::ArmStage1 => true,
            TableFormat::ArmStage2 => false,
            _ => return Err(SmmuError::Unsupported("table format")),
        };
        let id = domain.id;
        let tlbi = |addr, range| {
            if stage1 {
                Command::tlbi_nh_va(0, id, addr, leaf_only, range)
            } else {
                Command::tlbi_s2_ipa(id, addr, leaf_only, range)
            }
        };
        let (use_ril, threshold) = self.run.as_ref().map_or((false, 0), |r| {
            (r.config.range_invalidation, r.config.tlbi_page_threshold)
        });
        if self.features.range_invalidation && use_ril {
            let mut addr = start;
            let mut left = pages;
            while let Some(r) = TlbiRange::first_chunk(left) {
                self.queue_command(tlbi(addr, Some(r)))?;
                left -= r.pages();
                addr += r.pages() * PAGE_SIZE;
            }
            if left != 0 {
                // Beyond what SCALE can express (2^31 pages): take it all.
                self.invalidate_all_of(domain)?;
            }
            Ok(())
        } else if pages > threshold {
            self.invalidate_all_of(domain)
        } else {
            for i in 0..pages {
                self.queue_command(tlbi(start + i * PAGE_SIZE, None))?;
            }
            Ok(())
        }
    }

    pub(super) fn invalidate_all_of(&mut self, domain: &DomainInfo) -> Result<(), SmmuError> {
        match domain.format {
            TableFormat::ArmStage1 => self.queue_command(Command::tlbi_nh_asid(0, domain.id)),
            TableFormat::ArmStage2 => self.queue_command(Command::tlbi_s12_vmall(domain.id)),
            _ => Err(SmmuError::Unsupported("table format")),
        }
    }
}
