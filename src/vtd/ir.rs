//! Interrupt remapping (VT-d chapter 5): the interrupt-remapping table in
//! lent memory, its enable through IRTA and GCMD, entries allocated to one
//! device each, and the interrupt-entry-cache invalidations that make a
//! changed entry take effect.
//!
//! ```no_run
//! use bare_iommu::vtd::{IrConfig, IrteTarget, Vtd, VtdConfig};
//! use bare_iommu::{DeviceId, TableMemory};
//!
//! fn route<M: TableMemory>(vtd: &mut Vtd<M>, dev: DeviceId) -> Option<(u64, u32)> {
//!     vtd.init(VtdConfig::default()).ok()?; // queued invalidation on
//!     vtd.enable_interrupt_remapping(IrConfig::default()).ok()?;
//!     // Vector 0x40 to APIC 0; only `dev` may raise it.
//!     let irq = vtd.alloc_irte(dev, &IrteTarget::fixed(0x40, 0)).ok()?;
//!     let msi = irq.msi(); // program these into the device's MSI capability
//!     // Later: move it to APIC 1, vector 0x41 (written, invalidated, waited for).
//!     vtd.retarget_irte(&irq, &IrteTarget::fixed(0x41, 1)).ok()?;
//!     vtd.free_irte(irq).ok()?;
//!     Some((msi.address, msi.data))
//! }
//! ```

use tock_registers::interfaces::{Readable, Writeable};

use super::inv::{IecGranularity, InvDesc};
use super::ir_entry::{Irte, IrteTarget, MsiMessage, SourceValidation};
use super::regs::{GCMD, IRTA};
use super::{IrError, Vtd};
use crate::addr::PhysAddr;
use crate::barrier::wmb_on;
use crate::device::DeviceId;
use crate::error::BackendError;
use crate::mem::TableMemory;

/// Bytes per interrupt-remapping table entry.
const IRTE_BYTES: u64 = 16;

/// How [`Vtd::enable_interrupt_remapping`] sets remapping up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IrConfig {
    /// Entries in the table: a power of two from 2 to 65536 (IRTA.S).
    /// 256 entries fill one 4 KiB page.
    pub entries: u32,
    /// Extended interrupt mode (IRTA.EIME): 32-bit x2APIC destinations.
    /// Needs ECAP.EIM; the CPUs' local APICs must be in x2APIC mode.
    pub x2apic: bool,
    /// Let compatibility-format interrupts (the plain 0xFEEx_xxxx MSIs of a
    /// device that was never given a remappable message) through
    /// unremapped (GCMD.CFI). Off by default: with CFI clear such an
    /// interrupt is blocked and reported (fault reason 25h, VT-d 5.1.4), so
    /// a device can only raise what an entry allows. Ignored by the
    /// hardware under x2APIC mode, which always blocks them.
    pub compat_format: bool,
}

impl Default for IrConfig {
    fn default() -> Self {
        Self {
            entries: 256,
            x2apic: false,
            compat_format: false,
        }
    }
}

/// An allocated interrupt-remapping entry. Not `Copy`: [`Vtd::free_irte`]
/// takes it by value, so a freed entry cannot be changed or freed again
/// through the same handle.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IrHandle {
    index: u16,
}

impl IrHandle {
    /// The interrupt index (the entry's position in the table).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The MSI address and data the device must be given.
    pub fn msi(&self) -> MsiMessage {
        MsiMessage::remappable(self.index)
    }

    /// A handle for any index, to test that unallocated ones are refused.
    #[cfg(test)]
    pub(super) fn for_test(index: u16) -> Self {
        Self { index }
    }
}

/// The table the unit remaps through.
#[derive(Debug)]
pub(super) struct IrTable {
    base: PhysAddr,
    pages: usize,
    entries: u32,
    x2apic: bool,
    /// Where the next allocation starts looking.
    cursor: u32,
}

impl IrTable {
    /// Base and page count of the table.
    pub(super) fn span(&self) -> (PhysAddr, usize) {
        (self.base, self.pages)
    }
}

impl<M: TableMemory> Vtd<M> {
    /// Turns interrupt remapping on: allocates a zeroed table of
    /// `cfg.entries` (every entry not present: every remappable interrupt
    /// is blocked until an entry is allocated), points IRTA at it (with
    /// EIME for x2APIC), latches it with GCMD.SIRTP, invalidates the
    /// interrupt entry cache globally (Linux `iommu_set_irq_remapping`),
    /// sets or clears GCMD.CFI as `cfg.compat_format` says, and only then
    /// sets GCMD.IRE, so no interrupt is remapped through a half-set-up unit
    /// and compatibility-format interrupts are never let through by
    /// accident. Every GCMD write repeats the enables GSTS shows; every wait
    /// is bounded.
    ///
    /// Needs queued invalidation on ([`IrError::NeedsQueuedInvalidation`]):
    /// the interrupt entry cache has no register-based invalidation. If
    /// firmware left remapping on, it is turned off first.
    ///
    /// # Errors
    ///
    /// [`IrError::NotSupported`] without ECAP.IR; [`IrError::NoExtendedInterruptMode`] for x2APIC
    /// without ECAP.EIM; [`IrError::NeedsQueuedInvalidation`] with queued invalidation off;
    /// [`IrError::TableSize`] for a size that is not a power of two from 2 to 65536;
    /// [`IrError::AlreadyEnabled`]; [`IrError::Backend`] when the table cannot be lent or a GSTS /
    /// wait-descriptor wait times out. After an error the table is back with the lender, except
    /// when GSTS.IRES neither showed IRE set nor, asked again, clear: the unit may then remap
    /// through it, and it stays lent until [`disable`](Self::disable), [`init`](Self::init) or the
    /// next enable sees IRES clear.
    pub fn enable_interrupt_remapping(&mut self, cfg: IrConfig) -> Result<(), IrError> {
        if !self.features.ir {
            return Err(IrError::NotSupported);
        }
        if cfg.x2apic && !self.features.eim {
            return Err(IrError::NoExtendedInterruptMode);
        }
        if !cfg.entries.is_power_of_two() || !(2..=1 << 16).contains(&cfg.entries) {
            return Err(IrError::TableSize {
                entries: cfg.entries,
            });
        }
        if self.ir.is_some() {
            return Err(IrError::AlreadyEnabled);
        }
        if self.queue.is_none() {
            return Err(IrError::NeedsQueuedInvalidation);
        }
        let ire = GCMD::IRE::SET.value;
        if self.regs().gsts.get() & ire != 0 {
            self.gcmd(ire, false, "VT-d GSTS.IRES clear")?;
        }
        // GSTS.IRES is clear: a table an earlier failed enable had to keep
        // is read no more.
        self.release_stray_ir();
        let bytes = u64::from(cfg.entries) * IRTE_BYTES;
        let pages = bytes.div_ceil(4096) as usize;
        let base = self
            .mem
            .alloc_zeroed(pages)
            .ok_or(BackendError::OutOfMemory)?;
        // The zeroed table reaches memory before the unit is told where it is.
        self.clean_table(base, pages * 4096);
        wmb_on(&self.mem);
        let s = cfg.entries.trailing_zeros() - 1;
        self.regs().irta.write(
            IRTA::IRTA.val(base.0 >> 12)
                + IRTA::EIME.val(cfg.x2apic.into())
                + IRTA::S.val(s.into()),
        );
        // Until GCMD.IRE is written below, IRES is clear (seen so above, and
        // every GCMD write repeats only what GSTS shows): the unit remaps no
        // interrupt, so it reads no interrupt-remapping table whatever IRTA
        // it latched (VT-d 5.1.2, 11.4.4 IRE), and the next enable latches
        // its own table before it sets IRE. A failure up to there gives the
        // table back at once.
        if let Err(e) = self.gcmd_one_shot(GCMD::SIRTP::SET.value, true, "VT-d GSTS.IRTPS") {
            self.release_ir_table(base, pages);
            return Err(e.into());
        }
        if let Err(e) = self.finish_ir_enable(cfg) {
            self.release_ir_table(base, pages);
            return Err(e);
        }
        if let Err(e) = self.gcmd(ire, true, "VT-d GSTS.IRES set") {
            // The unit may yet act on the IRE it was sent.
            self.abandon_ir_table(base, pages);
            return Err(e.into());
        }
        self.ir = Some(IrTable {
            base,
            pages,
            entries: cfg.entries,
            x2apic: cfg.x2apic,
            cursor: 0,
        });
        Ok(())
    }

    /// The steps of [`enable_interrupt_remapping`](Self::enable_interrupt_remapping)
    /// between latching the table and setting IRE: the global entry-cache
    /// invalidation and CFI.
    fn finish_ir_enable(&mut self, cfg: IrConfig) -> Result<(), IrError> {
        // Entries cached from an earlier table must go before remapping
        // starts (Linux skips this only under CAP.ESIRTPS; it is harmless).
        self.iec(IecGranularity::Global)?;
        // CFI is decided here, before IRE, whatever firmware left: with IRE
        // set, CFIS alone decides whether a compatibility-format interrupt
        // passes unremapped (VT-d 5.1.4), so it is never left to chance
        // (Linux `iommu_enable_irq_remapping` clears it likewise).
        let cfi = GCMD::CFI::SET.value;
        if (self.regs().gsts.get() & cfi != 0) != cfg.compat_format {
            let what = if cfg.compat_format {
                "VT-d GSTS.CFIS set"
            } else {
                "VT-d GSTS.CFIS clear"
            };
            self.gcmd(cfi, cfg.compat_format, what)?;
        }
        Ok(())
    }

    /// Gives an interrupt-remapping table back to the lender. Caller: the
    /// unit reads it no more (GSTS.IRES clear and not asked for since).
    pub(super) fn release_ir_table(&mut self, base: PhysAddr, pages: usize) {
        // SAFETY: `base` was lent with `pages` pages by `enable_interrupt_remapping`
        // and, per the caller, interrupt remapping is off, so the unit does
        // not read it.
        unsafe { self.mem.free(base, pages) };
    }

    /// Gives back the table of an enable whose IRE handshake timed out, if
    /// any. Caller: GSTS.IRES was just seen clear.
    pub(super) fn release_stray_ir(&mut self) {
        if let Some((base, pages)) = self.stray_ir.take() {
            self.release_ir_table(base, pages);
        }
    }

    /// After GCMD.IRE was sent but GSTS.IRES never showed it: asks for IRE
    /// off; once IRES reads clear the table goes back, otherwise the unit
    /// may still remap through it and it stays lent (`stray_ir`) until a
    /// later `disable`, `init` or enable sees IRES clear.
    pub(super) fn abandon_ir_table(&mut self, base: PhysAddr, pages: usize) {
        if self
            .gcmd(GCMD::IRE::SET.value, false, "VT-d GSTS.IRES clear")
            .is_ok()
        {
            self.release_ir_table(base, pages);
        } else {
            self.stray_ir = Some((base, pages));
        }
    }

    /// `disable`'s share for a stray table: IRE off, confirmed, then the
    /// table goes back.
    pub(super) fn reclaim_stray_ir(&mut self) -> Result<(), BackendError> {
        if self.stray_ir.is_some() {
            self.gcmd(GCMD::IRE::SET.value, false, "VT-d GSTS.IRES clear")?;
            self.release_stray_ir();
        }
        Ok(())
    }

    /// Turns interrupt remapping off (GCMD.IRE clear), invalidates the
    /// interrupt entry cache and returns the table to the lender. Every
    /// handle still held becomes meaningless.
    ///
    /// # Errors
    ///
    /// [`IrError::NotEnabled`] when remapping is off; [`IrError::Backend`] when GSTS.IRES does not
    /// clear or the invalidation wait times out (the table is then kept: the unit may still read
    /// it).
    pub fn disable_interrupt_remapping(&mut self) -> Result<(), IrError> {
        let Some(t) = self.ir.as_ref() else {
            return Err(IrError::NotEnabled);
        };
        let (base, pages) = (t.base, t.pages);
        self.gcmd(GCMD::IRE::SET.value, false, "VT-d GSTS.IRES clear")?;
        self.iec(IecGranularity::Global)?;
        self.ir = None;
        // Remapping is off and the entry cache was invalidated and waited
        // for, so the unit no longer reads the table.
        self.release_ir_table(base, pages);
        Ok(())
    }

    /// Whether interrupt remapping is on (this driver enabled it).
    pub fn interrupt_remapping_enabled(&self) -> bool {
        self.ir.is_some()
    }

    /// Allocates an entry that delivers `target` and that only `dev` may
    /// raise (SVT = 01b, SQ = 00b, SID = its requester-id), writes it,
    /// invalidates its cached copy and waits. Give the device
    /// [`IrHandle::msi`].
    ///
    /// # Errors
    ///
    /// As [`alloc_irte_with`](Self::alloc_irte_with).
    pub fn alloc_irte(&mut self, dev: DeviceId, target: &IrteTarget) -> Result<IrHandle, IrError> {
        if dev.segment != self.segment {
            return Err(IrError::WrongSegment(dev));
        }
        self.alloc_irte_with(SourceValidation::exact(dev.rid()), target)
    }

    /// As [`alloc_irte`](Self::alloc_irte), with any source validation
    /// (a bus range for devices behind a PCIe-to-PCI bridge; none at all
    /// only when the requester cannot be known).
    ///
    /// # Errors
    ///
    /// [`IrError::NotEnabled`]; [`IrError::TableFull`]; [`IrError::WrongSegment`] for a device of
    /// another segment; [`IrError::Vector`] / [`IrError::Destination`] / [`IrError::BusRange`] for
    /// a target or source the entry cannot express; [`IrError::Backend`] when the invalidation wait
    /// fails (the entry is then not handed out).
    pub fn alloc_irte_with(
        &mut self,
        source: SourceValidation,
        target: &IrteTarget,
    ) -> Result<IrHandle, IrError> {
        let t = self.ir.as_ref().ok_or(IrError::NotEnabled)?;
        let entry = Irte::remapped(target, source, t.x2apic)?;
        let (entries, start) = (t.entries, t.cursor);
        let mut found = None;
        for k in 0..entries {
            let i = (start + k) % entries;
            let e = self.irte_at(i);
            if !e.allocated() && !e.present() {
                found = Some(i);
                break;
            }
        }
        let index = found.ok_or(IrError::TableFull { entries })?;
        // Upper half (source validation) first, then the lower half with P:
        // the unit never sees a present entry with a stale upper half.
        self.write_irte(index, entry.marked())?;
        if let Some(t) = self.ir.as_mut() {
            t.cursor = (index + 1) % entries;
        }
        Ok(IrHandle {
            index: index as u16,
        })
    }

    /// Points the entry at a new vector / destination, keeping its source
    /// validation: one 64-bit store of the lower half (the unit sees the old
    /// or the new entry, never a mix), an index-selective invalidation and
    /// its wait, so the next interrupt goes to the new target.
    ///
    /// # Errors
    ///
    /// [`IrError::NotEnabled`]; [`IrError::NotAllocated`] for a handle that is not an allocated
    /// entry; [`IrError::Vector`] / [`IrError::Destination`] for a target the entry cannot express;
    /// [`IrError::Backend`] when the invalidation wait fails.
    pub fn retarget_irte(&mut self, h: &IrHandle, target: &IrteTarget) -> Result<(), IrError> {
        let old = self.allocated(h)?;
        let x2apic = self.ir.as_ref().is_some_and(|t| t.x2apic);
        let new = Irte::remapped(target, SourceValidation::None, x2apic)?;
        let entry = Irte::from_raw([new.raw()[0], old.raw()[1]]).marked();
        self.write_irte(u32::from(h.index), entry)
    }

    /// Rewrites the entry with a new target and source validation (the
    /// entry moves to another requester). The upper half cannot change in
    /// the same store as the lower, so the entry goes not-present first,
    /// that is invalidated and waited for, and only then is the new entry
    /// written and invalidated: no interrupt is ever checked against one
    /// requester and delivered to the other's target.
    ///
    /// # Errors
    ///
    /// As [`retarget_irte`](Self::retarget_irte), plus [`IrError::WrongSegment`] /
    /// [`IrError::BusRange`] for the new source.
    pub fn update_irte(
        &mut self,
        h: &IrHandle,
        source: SourceValidation,
        target: &IrteTarget,
    ) -> Result<(), IrError> {
        self.allocated(h)?;
        let x2apic = self.ir.as_ref().is_some_and(|t| t.x2apic);
        let entry = Irte::remapped(target, source, x2apic)?.marked();
        self.write_irte(u32::from(h.index), entry)
    }

    /// Frees the entry: not present, invalidated and waited for, then
    /// cleared and available again. An interrupt the device raises with
    /// the old message afterwards is blocked (fault reason 22h).
    ///
    /// # Errors
    ///
    /// [`IrError::NotEnabled`]; [`IrError::NotAllocated`]; [`IrError::Backend`] when the
    /// invalidation wait fails (the entry stays not present and allocated).
    pub fn free_irte(&mut self, h: IrHandle) -> Result<(), IrError> {
        let old = self.allocated(&h)?;
        let i = u32::from(h.index);
        self.write_irte(i, old.not_present())?;
        // Nothing reads a not-present entry's other fields: clear them
        // without another invalidation.
        self.store_irte(i, Irte::EMPTY);
        Ok(())
    }

    /// The entry at `index` as the table holds it, or `None` when
    /// remapping is off or the index is past the table.
    pub fn read_irte(&self, index: u16) -> Option<Irte> {
        let t = self.ir.as_ref()?;
        (u32::from(index) < t.entries).then(|| self.irte_at(u32::from(index)))
    }

    /// Invalidates the interrupt entry cache (VT-d 6.5.2.7) and waits for
    /// it: after a table change made behind the driver's back, or to
    /// re-read every entry. Needs queued invalidation.
    ///
    /// # Errors
    ///
    /// [`IrError::NeedsQueuedInvalidation`] with queued invalidation off; [`IrError::Backend`] when
    /// the queue or its wait fails.
    pub fn invalidate_interrupt_entries(&mut self, g: IecGranularity) -> Result<(), IrError> {
        if let IecGranularity::Index { index, im } = g {
            let t = self.ir.as_ref().ok_or(IrError::NotEnabled)?;
            // The checker's rule: IIDX aligned to 2^IM, IM ≤ 16.
            if im > 16 || u32::from(index) & ((1u32 << im) - 1) != 0 {
                return Err(IrError::NotAllocated { index });
            }
            if u32::from(index) >= t.entries {
                return Err(IrError::NotAllocated { index });
            }
        }
        self.iec(g)
    }

    /// Pushes one IEC descriptor and waits for it.
    fn iec(&mut self, g: IecGranularity) -> Result<(), IrError> {
        match self.queue_push(InvDesc::iec(g)) {
            None => Err(IrError::NeedsQueuedInvalidation),
            Some(pushed) => {
                pushed?;
                self.sync_invalidations()?;
                Ok(())
            }
        }
    }

    /// The entry `h` names, checked to be allocated in this table.
    fn allocated(&self, h: &IrHandle) -> Result<Irte, IrError> {
        let t = self.ir.as_ref().ok_or(IrError::NotEnabled)?;
        let i = u32::from(h.index);
        if i >= t.entries || !self.irte_at(i).allocated() {
            return Err(IrError::NotAllocated { index: h.index });
        }
        Ok(self.irte_at(i))
    }

    fn irte_ptr(&self, index: u32) -> *mut u64 {
        let base = self.ir.as_ref().map_or(0, |t| t.base.0);
        self.mem
            .phys_to_virt(PhysAddr(base + u64::from(index) * IRTE_BYTES))
            .cast::<u64>()
    }

    /// Reads entry `index` (< entries, remapping on).
    fn irte_at(&self, index: u32) -> Irte {
        let p = self.irte_ptr(index);
        // SAFETY: callers pass an index below the table's entry count; the
        // table was lent by `mem` for as long as remapping is on, and
        // `phys_to_virt` makes it valid, 16-byte aligned.
        unsafe { Irte::from_raw([p.read_volatile(), p.add(1).read_volatile()]) }
    }

    /// Stores entry `index`: upper half, barrier, lower half (P lives in
    /// the lower half), then cleans the line for a non-coherent unit.
    fn store_irte(&self, index: u32, e: Irte) {
        let p = self.irte_ptr(index);
        let [lo, hi] = e.raw();
        // SAFETY: as in `irte_at`; the entry is 16-byte aligned, so each
        // half is one naturally aligned 64-bit store the unit sees whole.
        unsafe { p.add(1).write_volatile(hi) };
        wmb_on(&self.mem);
        // SAFETY: as above.
        unsafe { p.write_volatile(lo) };
        let pa = PhysAddr(self.ir.as_ref().map_or(0, |t| t.base.0) + u64::from(index) * IRTE_BYTES);
        self.clean_table(pa, IRTE_BYTES as usize);
    }

    /// Makes entry `index` hold `new` as the unit sees it: a present entry
    /// whose upper half changes goes not-present (invalidated, waited for)
    /// first; then the store, an index-selective invalidation and its wait.
    fn write_irte(&mut self, index: u32, new: Irte) -> Result<(), IrError> {
        let old = self.irte_at(index);
        if old.present() && new.present() && old.raw()[1] != new.raw()[1] {
            self.store_irte(index, old.not_present());
            self.iec_index(index)?;
        }
        self.store_irte(index, new);
        self.iec_index(index)
    }

    fn iec_index(&mut self, index: u32) -> Result<(), IrError> {
        self.iec(IecGranularity::Index {
            index: index as u16,
            im: 0,
        })
    }
}
