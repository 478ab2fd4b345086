//! The stream table (IHI 0070, §3.3, §5.1): linear, or two levels with
//! level-2 arrays allocated on first use.

use tock_registers::interfaces::Writeable;

use super::error::SmmuError;
use super::regs::{Page0, STRTAB_BASE, STRTAB_BASE_CFG};
use super::ste::{L1Desc, Ste};
use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::mem::TableMemory;

/// StreamID bits a level-2 array resolves: 256 STEs (16 KiB), one PCI bus.
pub const SPLIT: u8 = 8;

/// Largest linear table chosen automatically: 2^10 STEs (64 KiB).
pub const LINEAR_MAX_BITS: u8 = 10;

/// Most StreamID bits a linear table covers: 2^16 STEs (4 MiB, one block
/// from the lender). Wider StreamIDs need the 2-level layout.
pub const LINEAR_LIMIT_BITS: u8 = 16;

/// Most level-1 descriptors: 2^17 (1 MiB), the cap Linux puts on its level-1
/// table (`STRTAB_MAX_L1_ENTRIES`); with [`SPLIT`] that is 25 StreamID bits.
/// SIDSIZE 32 would otherwise ask for 128 MiB of contiguous memory.
pub const L1_LIMIT_BITS: u8 = 17;

/// Most StreamID bits a 2-level table covers.
pub const TWO_LEVEL_LIMIT_BITS: u8 = L1_LIMIT_BITS + SPLIT;

/// Most StreamID bits a table of `format` covers.
pub const fn limit_bits(format: StreamTableFormat) -> u8 {
    match format {
        StreamTableFormat::Linear => LINEAR_LIMIT_BITS,
        StreamTableFormat::TwoLevel => TWO_LEVEL_LIMIT_BITS,
    }
}

/// Stream table layout (STRTAB_BASE_CFG.FMT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StreamTableFormat {
    /// One array of `2^sid_bits` STEs.
    Linear,
    /// Level-1 descriptors, each pointing at `2^SPLIT` STEs.
    TwoLevel,
}

/// The stream table.
pub struct StreamTable {
    base: PhysAddr,
    pages: usize,
    format: StreamTableFormat,
    sid_bits: u8,
}

fn pages_for(bytes: u64) -> usize {
    (bytes.div_ceil(PAGE_SIZE)).max(1) as usize
}

/// Bytes of one level-2 array: `2^SPLIT` STEs.
const L2_BYTES: u64 = (Ste::SIZE as u64) << SPLIT;

impl StreamTable {
    /// Allocates a table for `sid_bits` StreamID bits. A linear table starts
    /// with every STE aborting; a 2-level table with no level-2 arrays
    /// (unknown StreamIDs are reported as C_BAD_STREAMID and aborted).
    ///
    /// # Errors
    ///
    /// [`SmmuError::StreamTableTooLarge`] when `sid_bits` exceeds the format's cap;
    /// [`SmmuError::OutOfMemory`] when the lender refuses the table.
    pub fn new<M: TableMemory>(
        mem: &M,
        format: StreamTableFormat,
        sid_bits: u8,
        coherent: bool,
    ) -> Result<Self, SmmuError> {
        // Bounded before any shift: SIDSIZE up to 63 fits the register field,
        // and `64 << 58` would wrap to a one-page table with 2^58 entries.
        let max_bits = limit_bits(format);
        if sid_bits > max_bits {
            return Err(SmmuError::StreamTableTooLarge { sid_bits, max_bits });
        }
        let (bytes, entries) = match format {
            StreamTableFormat::Linear => ((Ste::SIZE as u64) << sid_bits, 1u64 << sid_bits),
            StreamTableFormat::TwoLevel => {
                let l1 = 1u64 << sid_bits.saturating_sub(SPLIT);
                (l1 * 8, l1)
            }
        };
        let pages = pages_for(bytes);
        let base = mem.alloc_zeroed(pages).ok_or(SmmuError::OutOfMemory)?;
        let table = Self {
            base,
            pages,
            format,
            sid_bits,
        };
        if format == StreamTableFormat::Linear {
            for sid in 0..entries {
                table.write_ste_words(mem, base, sid as u32, &Ste::abort());
            }
        }
        if !coherent {
            // A non-snooping SMMU reads memory, not the zeroes (level-1
            // descriptors) or aborting STEs still in the CPU's caches.
            mem.clean(base, bytes as usize);
        }
        Ok(table)
    }

    /// The layout.
    pub fn format(&self) -> StreamTableFormat {
        self.format
    }

    /// StreamID bits covered.
    pub fn sid_bits(&self) -> u8 {
        self.sid_bits
    }

    /// Programs STRTAB_BASE and STRTAB_BASE_CFG (with SMMUEN == 0).
    pub fn program(&self, regs: &Page0) {
        regs.strtab_base
            .write(STRTAB_BASE::RA::SET + STRTAB_BASE::ADDR.val(self.base.0 >> 6));
        let fmt = match self.format {
            StreamTableFormat::Linear => {
                STRTAB_BASE_CFG::FMT::Linear + STRTAB_BASE_CFG::SPLIT.val(0)
            }
            StreamTableFormat::TwoLevel => {
                STRTAB_BASE_CFG::FMT::TwoLevel + STRTAB_BASE_CFG::SPLIT.val(SPLIT as u32)
            }
        };
        regs.strtab_base_cfg
            .write(fmt + STRTAB_BASE_CFG::LOG2SIZE.val(self.sid_bits as u32));
    }

    fn ste_ptr<M: TableMemory>(mem: &M, array: PhysAddr, index: u32) -> (*mut u64, PhysAddr) {
        let pa = PhysAddr(array.0 + index as u64 * Ste::SIZE as u64);
        (mem.phys_to_virt(pa).cast::<u64>(), pa)
    }

    fn write_ste_words<M: TableMemory>(&self, mem: &M, array: PhysAddr, index: u32, ste: &Ste) {
        let (p, _) = Self::ste_ptr(mem, array, index);
        for (i, w) in ste.0.iter().enumerate() {
            // SAFETY: `index` is inside the STE array lent by `mem`; the STE is
            // 64-byte aligned.
            unsafe { p.add(i).write_volatile(*w) };
        }
    }

    fn l1_ptr<M: TableMemory>(&self, mem: &M, sid: u32) -> (*mut u64, PhysAddr) {
        let pa = PhysAddr(self.base.0 + (sid >> SPLIT) as u64 * 8);
        (mem.phys_to_virt(pa).cast::<u64>(), pa)
    }

    /// Where the STE of `sid` lives, allocating its level-2 array (all
    /// abort) when `sid` has none yet.
    ///
    /// # Errors
    ///
    /// [`SmmuError::StreamIdOutOfRange`] for a StreamID the table does not cover;
    /// [`SmmuError::OutOfMemory`] when the level-2 array cannot be lent.
    pub fn locate<M: TableMemory>(
        &mut self,
        mem: &M,
        sid: u32,
        coherent: bool,
    ) -> Result<SteSlot, SmmuError> {
        if self.sid_bits < 32 && sid >> self.sid_bits != 0 {
            return Err(SmmuError::StreamIdOutOfRange {
                sid,
                sid_bits: self.sid_bits,
            });
        }
        let (array, index) = match self.format {
            StreamTableFormat::Linear => (self.base, sid),
            StreamTableFormat::TwoLevel => {
                let (l1p, l1pa) = self.l1_ptr(mem, sid);
                // SAFETY: `sid >> SPLIT` is below the number of level-1
                // descriptors, inside the table lent by `mem`.
                let desc = L1Desc(unsafe { l1p.read_volatile() });
                let l2 = match desc.l2() {
                    Some(l2) => l2,
                    None => {
                        let l2 = mem
                            .alloc_zeroed(pages_for(L2_BYTES))
                            .ok_or(SmmuError::OutOfMemory)?;
                        for i in 0..(1u32 << SPLIT) {
                            self.write_ste_words(mem, l2, i, &Ste::abort());
                        }
                        if !coherent {
                            mem.clean(l2, L2_BYTES as usize);
                        }
                        // The array is complete (and cleaned) before the
                        // descriptor that publishes it: one 64-bit store.
                        crate::barrier::wmb_on(mem);
                        // SAFETY: as above.
                        unsafe { l1p.write_volatile(L1Desc::new(l2, SPLIT).0) };
                        if !coherent {
                            mem.clean(l1pa, 8);
                        }
                        l2
                    }
                };
                (l2, sid & ((1 << SPLIT) - 1))
            }
        };
        let (ptr, pa) = Self::ste_ptr(mem, array, index);
        Ok(SteSlot { ptr, pa })
    }

    /// Gives back the table, every level-2 array, and the context
    /// descriptor page of every stage-1 STE still in it (see
    /// `Smmu::attach_stream`: each stage-1 STE owns one CD page).
    ///
    /// # Safety
    ///
    /// The SMMU must no longer read the table (SMMUEN == 0), and every CD an
    /// STE points at must be a one-page block from `mem`.
    pub unsafe fn free<M: TableMemory>(self, mem: &M) {
        let free_cds = |array: PhysAddr, count: u32| {
            for i in 0..count {
                let (p, _) = Self::ste_ptr(mem, array, i);
                // SAFETY: `i` indexes an STE inside the array; dword 0 holds
                // V, Config and S1ContextPtr.
                let d0 = unsafe { p.read_volatile() };
                if let Some(cd) = Ste([d0, 0, 0, 0, 0, 0, 0, 0]).context_ptr() {
                    // SAFETY: the caller guarantees CDs are one-page blocks
                    // from `mem`, and the SMMU no longer reads them.
                    unsafe { mem.free(cd, 1) };
                }
            }
        };
        match self.format {
            StreamTableFormat::Linear => free_cds(self.base, 1 << self.sid_bits),
            StreamTableFormat::TwoLevel => {
                let l1_entries = 1u32 << self.sid_bits.saturating_sub(SPLIT);
                for i in 0..l1_entries {
                    let (p, _) = self.l1_ptr(mem, i << SPLIT);
                    // SAFETY: `i` indexes a level-1 descriptor inside the table.
                    let desc = L1Desc(unsafe { p.read_volatile() });
                    if let Some(l2) = desc.l2() {
                        free_cds(l2, 1 << SPLIT);
                        // SAFETY: allocated in `locate` with these pages; the
                        // SMMU no longer reads it (caller's guarantee).
                        unsafe { mem.free(l2, pages_for(L2_BYTES)) };
                    }
                }
            }
        }
        // SAFETY: allocated in `new` with these pages.
        unsafe { mem.free(self.base, self.pages) }
    }
}

/// One STE in the table.
pub struct SteSlot {
    ptr: *mut u64,
    pa: PhysAddr,
}

impl SteSlot {
    /// Physical address of the STE.
    pub fn pa(&self) -> PhysAddr {
        self.pa
    }

    /// Reads the STE.
    pub fn read(&self) -> Ste {
        let mut s = [0u64; 8];
        for (i, w) in s.iter_mut().enumerate() {
            // SAFETY: the slot points at a 64-byte STE inside lent table memory.
            *w = unsafe { self.ptr.add(i).read_volatile() };
        }
        Ste(s)
    }

    /// Writes dword `i` (0..8) with one 64-bit store.
    pub fn write_word(&self, i: usize, v: u64) {
        if i < 8 {
            // SAFETY: as in `read`; `i < 8`.
            unsafe { self.ptr.add(i).write_volatile(v) };
        }
    }
}
