//! A fake VT-d unit for host tests: a register block in host memory and a
//! thread that plays the hardware (GSTS follows GCMD, PRS follows PMEN.EPM,
//! CCMD / IOTLB register invalidations complete, the invalidation queue is
//! consumed). Every descriptor it reads goes through the strict checker
//! (`testing::vtd_desc`), and it reads table and queue memory the way a
//! non-coherent unit does: only what the driver cleaned.

extern crate std;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::{Arc, Mutex};
use std::thread;
use std::vec;
use std::vec::Vec;

use crate::addr::PhysAddr;
use crate::mem::TableMemory;
use crate::testing::vtd_desc::{Violation, VtdDesc, VtdRules, check_descriptor};

/// Fake physical address of the arena's first byte.
const ARENA_PHYS: u64 = 0x40_0000;
/// What a non-coherent unit sees in memory the CPU zeroed but never cleaned.
const POISON: u8 = 0xa5;

struct Arena {
    ptr: *mut u8,
    layout: Layout,
    next: AtomicUsize,
    /// The unit's view of memory: bytes reach it only through `clean`.
    device: Mutex<Vec<u8>>,
    /// Every `clean(pa, len)` call.
    cleans: Mutex<Vec<(u64, usize)>>,
    can_clean: bool,
    /// Blocks lent and not given back: base → pages.
    lent: Mutex<std::collections::BTreeMap<u64, usize>>,
}

// SAFETY: the arena pointer is only used for volatile/atomic accesses; the
// rest is behind mutexes or atomics.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `SharedMem::new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// A bump lender shared with the fake unit's thread; fake physical
/// addresses start at 4 MiB. Records cleans and keeps the device's view.
#[derive(Clone)]
pub struct SharedMem(Arc<Arena>);

impl SharedMem {
    /// An arena of `pages` pages; `can_clean` is what `can_clean()` answers.
    pub fn new(pages: usize, can_clean: bool) -> Self {
        let layout = Layout::from_size_align(pages * 4096, 1 << 16).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self(Arc::new(Arena {
            ptr,
            layout,
            next: AtomicUsize::new(0),
            device: Mutex::new(vec![POISON; pages * 4096]),
            cleans: Mutex::new(Vec::new()),
            can_clean,
            lent: Mutex::new(std::collections::BTreeMap::new()),
        }))
    }

    fn off(&self, pa: u64) -> Option<usize> {
        let off = usize::try_from(pa.checked_sub(ARENA_PHYS)?).ok()?;
        (off < self.0.layout.size()).then_some(off)
    }

    /// The CPU's view of the 64-bit word at `pa`.
    pub fn cpu_u64(&self, pa: u64) -> u64 {
        let off = self.off(pa).expect("inside the arena");
        // SAFETY: inside the arena, 8-byte aligned by the callers.
        unsafe { (*self.0.ptr.add(off).cast::<AtomicU64>()).load(Ordering::SeqCst) }
    }

    /// The unit's view of the 64-bit word at `pa` (`coherent`: it snoops).
    pub fn dev_u64(&self, pa: u64, coherent: bool) -> u64 {
        if coherent {
            return self.cpu_u64(pa);
        }
        let off = self.off(pa).expect("inside the arena");
        let d = self.0.device.lock().unwrap();
        u64::from_le_bytes(d[off..off + 8].try_into().unwrap())
    }

    /// The unit writes a 32-bit word (both views).
    pub fn dev_write_u32(&self, pa: u64, v: u32) {
        let Some(off) = self.off(pa) else { return };
        // SAFETY: inside the arena, 4-byte aligned (checked by the checker).
        unsafe { (*self.0.ptr.add(off).cast::<AtomicU32>()).store(v, Ordering::SeqCst) };
        self.0.device.lock().unwrap()[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Whether the unit sees exactly what the CPU wrote in `[pa, pa + len)`.
    pub fn device_sees_cpu(&self, pa: u64, len: usize) -> bool {
        (0..len as u64 / 8).all(|i| self.dev_u64(pa + i * 8, false) == self.cpu_u64(pa + i * 8))
    }

    /// Pages lent and not given back.
    pub fn lent_pages(&self) -> usize {
        self.0.lent.lock().unwrap().values().sum()
    }

    /// Every `clean` call so far.
    pub fn cleans(&self) -> Vec<(u64, usize)> {
        self.0.cleans.lock().unwrap().clone()
    }
}

// SAFETY: hands out disjoint, zeroed, size-aligned blocks of the arena.
unsafe impl TableMemory for SharedMem {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let size = pages.next_power_of_two() * 4096;
        let a = &self.0;
        // One compare-exchange: lenders are called from several CPUs at once
        // (`crate::shared`), and two must never get the same page.
        let mut start = 0;
        a.next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
                start = next.next_multiple_of(size);
                (start + pages * 4096 <= a.layout.size()).then_some(start + pages * 4096)
            })
            .ok()?;
        a.lent
            .lock()
            .unwrap()
            .insert(ARENA_PHYS + start as u64, pages);
        // The CPU zeroed it; the unit still sees whatever was there before.
        a.device.lock().unwrap()[start..start + pages * 4096].fill(POISON);
        Some(PhysAddr(ARENA_PHYS + start as u64))
    }
    /// Counts only (the arena is a bump); a block not lent, or given back
    /// with another size, fails the test.
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        let was = self.0.lent.lock().unwrap().remove(&pa.0);
        assert_eq!(was, Some(pages), "free of {pa:?} ({pages} pages)");
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.0
            .ptr
            .wrapping_add(pa.0.wrapping_sub(ARENA_PHYS) as usize)
    }
    fn clean(&self, pa: PhysAddr, len: usize) {
        self.0.cleans.lock().unwrap().push((pa.0, len));
        let Some(start) = self.off(pa.0 & !63) else {
            return;
        };
        let end = (start + (pa.0 as usize & 63) + len).next_multiple_of(64);
        let end = end.min(self.0.layout.size());
        let mut d = self.0.device.lock().unwrap();
        for i in start..end {
            // SAFETY: inside the arena.
            d[i] = unsafe { self.0.ptr.add(i).read_volatile() };
        }
    }
    fn can_clean(&self) -> bool {
        self.0.can_clean
    }
}

/// What the fake unit saw, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ev {
    /// A GCMD write.
    Gcmd(u32),
    /// PMEN.EPM changed to the value given.
    Pmen(bool),
    /// A descriptor that passed the strict checker.
    Desc(VtdDesc),
    /// A descriptor the checker refused (not executed).
    Bad([u64; 4], Violation),
    /// A CCMD invalidation.
    Ccmd(u64),
    /// An IOTLB register invalidation (IOTLB, IVA).
    Iotlb(u64, u64),
    /// The interrupt-remapping entry an index-selective IEC descriptor
    /// made the unit re-read, as the unit sees it in memory.
    IrteSeen(u16, [u64; 2]),
}

/// GCMD never holds this after the fake read it (bit 0 is reserved), so
/// every driver write, even of 0, is seen.
const SENTINEL: u32 = 1;
const PERSISTENT: u32 = (1 << 31) | (1 << 28) | (1 << 26) | (1 << 25) | (1 << 23);
const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;
const SIRTP: u32 = 1 << 24;

/// A register block of `len` bytes.
pub struct Regs {
    words: Vec<AtomicU64>,
}

impl Regs {
    /// A zeroed block of `len` bytes.
    pub fn new(len: usize) -> Self {
        Self {
            words: (0..len.div_ceil(8)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    /// Base address for `Vtd::new`.
    pub fn base(&self) -> usize {
        self.words.as_ptr() as usize
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.words.len() * 8
    }
    fn a32(&self, off: usize) -> &AtomicU32 {
        assert!(off + 4 <= self.len() && off % 4 == 0);
        // SAFETY: inside the block, aligned; AtomicU64 storage can be viewed
        // as two AtomicU32 halves.
        unsafe { &*((self.base() + off) as *const AtomicU32) }
    }
    /// Reads a 32-bit register.
    pub fn u32(&self, off: usize) -> u32 {
        self.a32(off).load(Ordering::SeqCst)
    }
    /// Writes a 32-bit register.
    pub fn set_u32(&self, off: usize, v: u32) {
        self.a32(off).store(v, Ordering::SeqCst)
    }
    /// Writes a 32-bit register only if it still holds `old` (the fake's
    /// read-modify-writes must not undo a driver write made in between).
    pub fn cas_u32(&self, off: usize, old: u32, new: u32) -> bool {
        self.a32(off)
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
    /// Reads a 64-bit register.
    pub fn u64(&self, off: usize) -> u64 {
        self.words[off / 8].load(Ordering::SeqCst)
    }
    /// Writes a 64-bit register.
    pub fn set_u64(&self, off: usize, v: u64) {
        self.words[off / 8].store(v, Ordering::SeqCst)
    }
}

/// QEMU 10's intel-iommu defaults (shared/QEMU.md).
pub const QEMU_CAP: u64 = 0x00d2_008c_222f_0606;
/// QEMU 10's ECAP (C = 0: not coherent).
pub const QEMU_ECAP: u64 = 0xf0_0f4a;
/// ECAP bits for scalable mode with second-level tables: SMTS, SLTS, PASID.
pub const ECAP_SM_SL: u64 = (1 << 43) | (1 << 46) | (1 << 40);
/// ECAP.FLTS.
pub const ECAP_FLTS: u64 = 1 << 47;
/// ECAP.SMPWC.
pub const ECAP_SMPWC: u64 = 1 << 48;

/// The fake unit and its thread.
pub struct FakeVtd {
    /// Its registers.
    pub regs: Arc<Regs>,
    /// The lender it reads tables and queues from.
    pub mem: SharedMem,
    log: Arc<Mutex<Vec<Ev>>>,
    scalable: Arc<AtomicBool>,
    /// GCMD bits whose status never changes (one-shot bits never complete).
    deaf: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl FakeVtd {
    /// A unit advertising `cap` / `ecap` with a 4 KiB register block.
    pub fn start(cap: u64, ecap: u64, mem: SharedMem) -> Self {
        let regs = Arc::new(Regs::new(4096));
        regs.set_u32(0x00, 0x10);
        regs.set_u64(0x08, cap);
        regs.set_u64(0x10, ecap);
        regs.set_u32(0x18, SENTINEL);
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let scalable = Arc::new(AtomicBool::new(false));
        let deaf = Arc::new(AtomicU32::new(0));
        let (r, l, s, m, sm) = (
            regs.clone(),
            log.clone(),
            stop.clone(),
            mem.clone(),
            scalable.clone(),
        );
        let d = deaf.clone();
        let handle = thread::spawn(move || {
            let mut epm = r.u32(0x64) >> 31 != 0;
            while !s.load(Ordering::SeqCst) {
                step(&r, &m, &l, &sm, &d, &mut epm);
                thread::yield_now();
            }
        });
        Self {
            regs,
            mem,
            log,
            scalable,
            deaf,
            stop,
            handle: Some(handle),
        }
    }

    /// The strict rules for this unit in its current mode.
    pub fn rules(&self) -> VtdRules {
        VtdRules::from_caps(
            self.regs.u64(0x08),
            self.regs.u64(0x10),
            self.scalable.load(Ordering::SeqCst),
        )
    }

    /// From now on GSTS never changes for `bits` of GCMD (a one-shot
    /// command among them never completes, an enable keeps the status it
    /// shows, even one a test wrote into GSTS); 0 restores.
    pub fn set_deaf(&self, bits: u32) {
        self.deaf.store(bits, Ordering::SeqCst);
    }

    /// Everything seen so far.
    pub fn log(&self) -> Vec<Ev> {
        self.log.lock().unwrap().clone()
    }

    /// Forgets what was seen.
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// The descriptors the checker refused.
    pub fn refused(&self) -> Vec<Ev> {
        self.log()
            .into_iter()
            .filter(|e| matches!(e, Ev::Bad(..)))
            .collect()
    }

    /// The descriptors executed.
    pub fn descs(&self) -> Vec<VtdDesc> {
        self.log()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Desc(d) => Some(d),
                _ => None,
            })
            .collect()
    }
}

impl Drop for FakeVtd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn step(
    r: &Regs,
    m: &SharedMem,
    log: &Mutex<Vec<Ev>>,
    scalable: &AtomicBool,
    deaf: &AtomicU32,
    epm: &mut bool,
) {
    let ecap = r.u64(0x10);
    let coherent = ecap & 1 != 0;
    // GCMD → GSTS: enables follow, SRTP latches RTADDR, WBF completes at once.
    let g = r.u32(0x18);
    if g != SENTINEL {
        r.set_u32(0x18, SENTINEL);
        log.lock().unwrap().push(Ev::Gcmd(g));
        let old = r.u32(0x1c);
        let deaf = deaf.load(Ordering::SeqCst);
        // One-shot statuses (RTPS, FLS, IRTPS) stay set until the next
        // command: real hardware clears RTPS as SRTP is written, which a
        // polling fake cannot do, so a stale RTPS must not outlive a write.
        let mut gsts = g & PERSISTENT;
        if g & SRTP & !deaf != 0 {
            gsts |= SRTP;
            scalable.store(r.u64(0x20) >> 10 & 3 == 1, Ordering::SeqCst);
        }
        if g & SIRTP & !deaf != 0 {
            gsts |= SIRTP;
        }
        gsts = (gsts & !(deaf & PERSISTENT)) | (old & deaf & PERSISTENT);
        if gsts & QIE != 0 && old & QIE == 0 {
            r.set_u64(0x80, 0);
        }
        r.set_u32(0x1c, gsts);
    }
    // PMEN: PRS follows EPM.
    let p = r.u32(0x64);
    let now = p >> 31 != 0;
    if now != *epm {
        *epm = now;
        log.lock().unwrap().push(Ev::Pmen(now));
    }
    // Only if the driver did not write PMEN since `p` was read: otherwise
    // the next step sees its write.
    r.cas_u32(0x64, p, (u32::from(now) << 31) | u32::from(now));
    // CCMD: ICC clears, CAIG = CIRG.
    let c = r.u64(0x28);
    if c >> 63 != 0 {
        log.lock().unwrap().push(Ev::Ccmd(c));
        r.set_u64(0x28, (c & !(1 << 63) & !(3 << 59)) | ((c >> 61 & 3) << 59));
    }
    // IOTLB registers at ECAP.IRO × 16, if inside the block.
    let iro = ((ecap >> 8) & 0x3ff) as usize * 16;
    if iro + 16 <= r.len() {
        let t = r.u64(iro + 8);
        if t >> 63 != 0 {
            log.lock().unwrap().push(Ev::Iotlb(t, r.u64(iro)));
            r.set_u64(
                iro + 8,
                (t & !(1 << 63) & !(3 << 57)) | ((t >> 60 & 3) << 57),
            );
        }
    }
    // The invalidation queue, while QIES and no queue error.
    if r.u32(0x1c) & QIE == 0 || r.u32(0x34) & (1 << 4) != 0 {
        return;
    }
    let rules = VtdRules::from_caps(r.u64(0x08), ecap, scalable.load(Ordering::SeqCst));
    let iqa = r.u64(0x90);
    let slot = if iqa >> 11 & 1 != 0 { 32u64 } else { 16 };
    let size = 4096u64 << (iqa & 7);
    let base = iqa & !0xfff;
    let tail = r.u64(0x88) & 0x7_fff0;
    let mut head = r.u64(0x80);
    while head != tail {
        let pa = base + head;
        let words = [0, 1, 2, 3].map(|i| {
            if i < slot / 8 {
                m.dev_u64(pa + i * 8, coherent)
            } else {
                0
            }
        });
        match check_descriptor(&rules, words) {
            Ok(d) => {
                // Logged before the status write completes a wait: a driver
                // that saw its wait done finds the descriptor in the log.
                log.lock().unwrap().push(Ev::Desc(d));
                if let VtdDesc::Wait {
                    sw: true,
                    status,
                    data,
                    ..
                } = d
                {
                    m.dev_write_u32(status, data);
                }
                if let VtdDesc::Iec {
                    global: false,
                    index,
                    ..
                } = d
                {
                    let pa = (r.u64(0xb8) & !0xfff) + u64::from(index) * 16;
                    let raw = [m.dev_u64(pa, coherent), m.dev_u64(pa + 8, coherent)];
                    log.lock().unwrap().push(Ev::IrteSeen(index, raw));
                }
            }
            Err(v) => log.lock().unwrap().push(Ev::Bad(words, v)),
        }
        head = (head + slot) % size;
        r.set_u64(0x80, head);
    }
}
