//! Host tests of the driver against a fake SMMU: register pages in host
//! memory and a thread that plays the hardware's part (CR0ACK follows CR0,
//! GBPA updates complete, the command queue is consumed and recorded,
//! opcode 0x7f is refused with CERROR_ILL).

extern crate std;

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::sync::{Arc, Mutex};
use std::thread;
use std::vec::Vec;

use super::*;
use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::backend::{Attachment, DomainInfo, IommuBackend};
use crate::device::DeviceId;
use crate::error::BackendError;

/// Host memory lender: blocks aligned to their power-of-two size; the
/// "physical" address is the host pointer. Counts the pages lent out.
#[derive(Clone, Default)]
struct HostMem {
    live: Arc<AtomicUsize>,
}

fn layout(pages: usize) -> Layout {
    let size = pages.next_power_of_two() * 4096;
    Layout::from_size_align(size, size).unwrap()
}

// SAFETY: zeroed, aligned, exclusively lent blocks; phys_to_virt is the identity.
unsafe impl TableMemory for HostMem {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout(pages)) };
        if p.is_null() {
            return None;
        }
        self.live.fetch_add(pages, Ordering::SeqCst);
        Some(PhysAddr(p as u64))
    }
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        self.live.fetch_sub(pages, Ordering::SeqCst);
        // SAFETY: allocated by `alloc_zeroed` with the same layout.
        unsafe { dealloc(pa.0 as *mut u8, layout(pages)) }
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        pa.0 as *mut u8
    }
}

const IDR0_NESTED: u32 = 0x0d44_101b;
const IDR1: u32 = 0x0273_0010;
const IDR3_RIL: u32 = 0x1414;
const IDR5: u32 = 0x74;

/// The fake's register block: 128 KiB (pages 0 and 1), 64 KiB aligned.
struct Regs {
    base: usize,
}

impl Regs {
    fn new() -> Self {
        let l = Layout::from_size_align(0x2_0000, 0x1_0000).unwrap();
        // SAFETY: non-zero size.
        let base = unsafe { alloc_zeroed(l) } as usize;
        assert_ne!(base, 0);
        let r = Self { base };
        r.set(0x00, IDR0_NESTED);
        r.set(0x04, IDR1);
        r.set(0x0c, IDR3_RIL);
        r.set(0x14, IDR5);
        r.set(0x1c, 1);
        r
    }
    fn reg(&self, off: usize) -> &AtomicU32 {
        // SAFETY: inside the live 128 KiB block, 4-byte aligned.
        unsafe { &*((self.base + off) as *const AtomicU32) }
    }
    fn get(&self, off: usize) -> u32 {
        self.reg(off).load(Ordering::SeqCst)
    }
    fn set(&self, off: usize, v: u32) {
        self.reg(off).store(v, Ordering::SeqCst)
    }
    fn get64(&self, off: usize) -> u64 {
        self.get(off) as u64 | (self.get(off + 4) as u64) << 32
    }
}

const CR0: usize = 0x20;
const CR0ACK: usize = 0x24;
const GBPA: usize = 0x44;
const IRQ_CTRL: usize = 0x50;
const IRQ_CTRLACK: usize = 0x54;
const GERROR: usize = 0x60;
const GERRORN: usize = 0x64;
const STRTAB_BASE_CFG: usize = 0x88;
const CMDQ_BASE: usize = 0x90;
const CMDQ_PROD: usize = 0x98;
const CMDQ_CONS: usize = 0x9c;

/// The hardware side, running on its own thread.
struct Fake {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<[u64; 2]>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Fake {
    fn start(regs: Arc<Regs>) -> Self {
        Self::start_with(regs, true)
    }

    /// A fake whose CR0ACK follows CR0 only if `ack_cr0`.
    fn start_with(regs: Arc<Regs>, ack_cr0: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, s, log) = (regs.clone(), stop.clone(), seen.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                step(&r, &log, ack_cr0);
                thread::yield_now();
            }
        });
        Self {
            stop,
            seen,
            handle: Some(handle),
        }
    }
    fn commands(&self) -> Vec<[u64; 2]> {
        self.seen.lock().unwrap().clone()
    }
    fn opcodes(&self) -> Vec<u8> {
        self.commands().iter().map(|c| c[0] as u8).collect()
    }
    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn step(r: &Regs, log: &Mutex<Vec<[u64; 2]>>, ack_cr0: bool) {
    if ack_cr0 {
        r.set(CR0ACK, r.get(CR0));
    }
    let gbpa = r.get(GBPA);
    if gbpa & (1 << 31) != 0 {
        r.set(GBPA, gbpa & !(1 << 31));
    }
    r.set(IRQ_CTRLACK, r.get(IRQ_CTRL));
    if r.get(CR0) & (1 << 3) == 0 || (r.get(GERROR) ^ r.get(GERRORN)) & 1 != 0 {
        return;
    }
    let base = r.get64(CMDQ_BASE);
    let log2 = (base & 0x1f) as u32;
    let addr = base & 0x000f_ffff_ffff_ffe0;
    let mask = (2u32 << log2) - 1;
    let slot_mask = (1u32 << log2) - 1;
    loop {
        let prod = r.get(CMDQ_PROD) & mask;
        let cons = r.get(CMDQ_CONS) & mask;
        if prod == cons {
            break;
        }
        let p = (addr + (cons & slot_mask) as u64 * 16) as *const u64;
        // SAFETY: the slot is inside the queue the driver programmed.
        let cmd = unsafe { [p.read_volatile(), p.add(1).read_volatile()] };
        if cmd[0] as u8 == 0x7f {
            r.set(CMDQ_CONS, cons | 1 << 24);
            r.set(GERROR, r.get(GERROR) ^ 1);
            break;
        }
        log.lock().unwrap().push(cmd);
        r.set(CMDQ_CONS, (cons + 1) & mask);
    }
}

fn smmu(regs: &Regs) -> Smmu<HostMem> {
    // SAFETY: the fake register block lives as long as the test.
    unsafe { Smmu::new(regs.base, HostMem::default()) }.unwrap()
}

/// A fake SMMU with its hardware thread, and a driver initialised on it.
fn started(config: SmmuConfig) -> (Arc<Regs>, Fake, Smmu<HostMem>) {
    let regs = Arc::new(Regs::new());
    let fake = Fake::start(regs.clone());
    let mut s = smmu(&regs);
    s.init(config).unwrap();
    (regs, fake, s)
}

fn small_budget() -> SmmuConfig {
    SmmuConfig {
        // Generous: the fake SMMU answers from another thread, which a loaded
        // machine (parallel tests, 2 cores) may not schedule for a while. Tests
        // that expect a timeout set their own small budget.
        poll_budget: 500_000_000,
        ..SmmuConfig::default()
    }
}

fn s1_domain(id: u16) -> DomainInfo {
    // The fake never walks tables: any address below the OAS will do.
    DomainInfo {
        id,
        root: PhysAddr(0x4000_0000 + u64::from(id) * 0x1000),
        format: TableFormat::ArmStage1,
        levels: 3,
        ias_bits: 39,
    }
}

#[test]
fn init_follows_the_spec_order_and_enables_last() {
    let (regs, fake, mut s) = started(small_budget());
    // Global invalidation: CFGI_ALL, TLBI_NSNH_ALL, one CMD_SYNC (no HYP: no TLBI_EL2_ALL).
    assert_eq!(fake.opcodes(), [0x04, 0x30, 0x46]);
    assert_eq!(fake.commands()[0], Command::cfgi_all().0);
    // SMMUEN with both queues; GBPA aborts.
    assert_eq!(regs.get(CR0), 0b1101);
    assert_ne!(regs.get(GBPA) & (1 << 20), 0);
    // SIDSIZE 16 does not fit a 64 KiB linear table: 2-level, split 8.
    let cfg = regs.get(STRTAB_BASE_CFG);
    assert_eq!((cfg >> 16 & 3, cfg >> 6 & 0x1f, cfg & 0x3f), (1, 8, 16));
    assert_eq!(regs.get64(CMDQ_BASE) & 0x1f, 8);
    s.shutdown().unwrap();
    assert_eq!(regs.get(CR0), 0);
}

#[test]
fn attach_writes_the_ste_last_and_invalidates_it() {
    let (_regs, fake, mut s) = started(small_budget());
    fake.clear();
    let dom = s1_domain(5);
    let dev = DeviceId::new(0, 0, 5, 0).unwrap();
    s.attach(dev, Attachment::Translated(dom)).unwrap();
    // A fresh (aborting) STE: no abort step, one CFGI_STE + CFGI_CD + sync.
    assert_eq!(fake.opcodes(), [0x03, 0x05, 0x46]);
    assert_eq!(fake.commands()[0], Command::cfgi_ste(0x28, true).0);
    // Moving to another domain changes only dword 0 (the CD pointer):
    // still no abort step.
    fake.clear();
    s.attach(dev, Attachment::Translated(s1_domain(6))).unwrap();
    assert_eq!(fake.opcodes(), [0x03, 0x05, 0x46]);
    // To bypass, dwords 1–7 change on a live entry: abort first, then the new entry.
    fake.clear();
    s.attach(dev, Attachment::Bypass).unwrap();
    assert_eq!(fake.opcodes(), [0x03, 0x46, 0x03, 0x46]);
    fake.clear();
    s.detach(dev).unwrap();
    assert_eq!(fake.opcodes(), [0x03, 0x46]);
    s.shutdown().unwrap();
}

#[test]
fn a_batch_of_invalidations_costs_one_cmd_sync() {
    let (_regs, fake, mut s) = started(small_budget());
    let dom = s1_domain(3);
    fake.clear();
    let before = s.stats();
    s.invalidate(&dom, DmaAddr(0x10_0000), 3 * PAGE_SIZE, true)
        .unwrap();
    s.invalidate(&dom, DmaAddr(0x20_0000), PAGE_SIZE, true)
        .unwrap();
    assert!(
        fake.opcodes().is_empty(),
        "nothing published before the sync"
    );
    IommuBackend::sync(&mut s).unwrap();
    assert_eq!(fake.opcodes(), [0x12, 0x12, 0x46]);
    // 3 pages from 0x10_0000 in one range: NUM 2, SCALE 0, TG 4K, Leaf.
    assert_eq!(
        fake.commands()[0],
        Command::tlbi_nh_va(0, 3, 0x10_0000, true, Some(TlbiRange { num: 2, scale: 0 })).0
    );
    let after = s.stats();
    assert_eq!(after.sync_calls - before.sync_calls, 1);
    assert_eq!(after.commands.sync - before.commands.sync, 1);
    assert_eq!(after.commands.tlbi_nh_va - before.commands.tlbi_nh_va, 2);
    s.shutdown().unwrap();
}

#[test]
fn without_range_invalidation_pages_then_whole_asid_past_the_threshold() {
    // A 4-entry queue: 20 commands wrap it five times.
    let (_regs, fake, mut s) = started(SmmuConfig {
        range_invalidation: false,
        cmdq_log2: 2,
        ..small_budget()
    });
    let dom = s1_domain(9);
    fake.clear();
    s.invalidate(&dom, DmaAddr(0x40_0000), 20 * PAGE_SIZE, true)
        .unwrap();
    IommuBackend::sync(&mut s).unwrap();
    let ops = fake.opcodes();
    assert_eq!(ops.len(), 21);
    assert!(ops[..20].iter().all(|&o| o == 0x12) && ops[20] == 0x46);
    let addrs: Vec<u64> = fake.commands()[..20]
        .iter()
        .map(|c| c[1] & !0xfff)
        .collect();
    assert_eq!(
        addrs,
        (0..20u64)
            .map(|i| 0x40_0000 + i * PAGE_SIZE)
            .collect::<Vec<_>>()
    );
    fake.clear();
    s.invalidate(&dom, DmaAddr(0x40_0000), 65 * PAGE_SIZE, false)
        .unwrap();
    IommuBackend::sync(&mut s).unwrap();
    assert_eq!(
        fake.commands(),
        [Command::tlbi_nh_asid(0, 9).0, Command::sync().0]
    );
    s.shutdown().unwrap();
}

#[test]
fn an_illegal_command_is_reported_replaced_and_the_queue_resumes() {
    let (regs, fake, mut s) = started(small_budget());
    fake.clear();
    let bad = Command::raw([0x7f, 0x1234]);
    s.queue_command(bad).unwrap();
    s.queue_command(Command::cfgi_all()).unwrap();
    let err = s.sync_commands().unwrap_err();
    let SmmuError::Command(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!(e.code, CommandErrorCode::Illegal);
    assert_eq!(e.command, bad);
    // The bad slot became a CMD_SYNC; the commands after it ran.
    assert_eq!(fake.opcodes(), [0x46, 0x04, 0x46]);
    // GERROR acknowledged: no error active any more.
    assert_eq!(regs.get(GERROR) ^ regs.get(GERRORN), 0);
    assert_eq!(s.stats().command_errors, 1);
    s.sync_commands().unwrap();
    s.shutdown().unwrap();
}

#[test]
fn an_smmu_that_never_completes_gbpa_gives_a_timeout_not_a_hang() {
    let regs = Regs::new();
    let mut s = smmu(&regs);
    // No fake thread: GBPA.UPDATE never clears, CR0ACK never follows.
    let e = s
        .init(SmmuConfig {
            poll_budget: 1000,
            ..SmmuConfig::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            SmmuError::Timeout {
                what: "GBPA.UPDATE",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn an_smmu_whose_cr0ack_never_follows_gives_a_timeout() {
    let regs = Arc::new(Regs::new());
    let _fake = Fake::start_with(regs.clone(), false);
    let mut s = smmu(&regs);
    let e = s
        .init(SmmuConfig {
            poll_budget: 10_000,
            ..SmmuConfig::default()
        })
        .unwrap_err();
    assert!(
        matches!(e, SmmuError::Timeout { what: "CR0ACK", .. }),
        "{e:?}"
    );
}

#[test]
fn an_error_met_while_the_queue_was_full_is_returned_by_the_next_sync() {
    // 4 entries: the fifth command publishes the first four and waits for
    // room, meeting the illegal one there.
    let (_regs, fake, mut s) = started(SmmuConfig {
        cmdq_log2: 2,
        ..small_budget()
    });
    fake.clear();
    let bad = Command::raw([0x7f, 0]);
    s.queue_command(bad).unwrap();
    for _ in 0..6 {
        s.queue_command(Command::tlbi_nsnh_all()).unwrap();
    }
    let e = s.sync_commands().unwrap_err();
    assert!(
        matches!(e, SmmuError::Command(c) if c.command == bad),
        "{e:?}"
    );
    assert_eq!(fake.opcodes().iter().filter(|&&o| o == 0x30).count(), 6);
    s.sync_commands().unwrap();
    s.shutdown().unwrap();
}

#[test]
fn a_linear_table_covers_the_configured_sid_bits_and_refuses_others() {
    let (regs, _fake, mut s) = started(SmmuConfig {
        sid_bits: Some(8),
        ..small_budget()
    });
    assert_eq!(s.stream_table_format(), Some(StreamTableFormat::Linear));
    let cfg = regs.get(STRTAB_BASE_CFG);
    assert_eq!((cfg >> 16 & 3, cfg & 0x3f), (0, 8));
    let far = DeviceId::from_rid(0, 0x0128);
    assert_eq!(
        s.attach(far, Attachment::Bypass),
        Err(BackendError::UnknownDevice(far))
    );
    s.attach(DeviceId::from_rid(0, 0x28), Attachment::Bypass)
        .unwrap();
    s.shutdown().unwrap();
}

#[test]
fn shutdown_gives_back_tables_queues_and_context_descriptors() {
    let regs = Arc::new(Regs::new());
    let _fake = Fake::start(regs.clone());
    let mut s = smmu(&regs);
    let live = s.memory().live.clone();
    s.init(small_budget()).unwrap();
    let d0 = DeviceId::new(0, 0, 5, 0).unwrap();
    let d1 = DeviceId::new(0, 3, 0, 0).unwrap();
    s.attach(d0, Attachment::Translated(s1_domain(1))).unwrap();
    s.attach(d1, Attachment::Translated(s1_domain(2))).unwrap();
    // Stream table L1, two L2 arrays (buses 0 and 3), two CDs, two queues.
    assert_eq!(live.load(Ordering::SeqCst), 1 + 2 * 4 + 2 + 1 + 1);
    s.shutdown().unwrap();
    assert_eq!(live.load(Ordering::SeqCst), 0);
}

const EVENTQ_BASE: usize = 0xa0;
const EVENTQ_PROD: usize = 0x1_00a8;
const EVENTQ_CONS: usize = 0x1_00ac;

/// Writes an event record the way the SMMU would and advances EVENTQ_PROD.
fn post_event(regs: &Regs, rec: [u64; 4]) {
    let base = regs.get64(EVENTQ_BASE);
    let log2 = (base & 0x1f) as u32;
    let addr = base & 0x000f_ffff_ffff_ffe0;
    let prod = regs.get(EVENTQ_PROD);
    let idx = prod & ((2 << log2) - 1);
    let p = (addr + (idx & ((1 << log2) - 1)) as u64 * 32) as *mut u64;
    for (i, w) in rec.iter().enumerate() {
        // SAFETY: a slot of the event queue the driver programmed.
        unsafe { p.add(i).write_volatile(*w) };
    }
    regs.set(
        EVENTQ_PROD,
        (prod & !((2 << log2) - 1)) | ((idx + 1) & ((2 << log2) - 1)),
    );
}

#[test]
fn handle_irq_decodes_events_and_acknowledges_overflow() {
    let (regs, _fake, mut s) = started(SmmuConfig {
        irqs: true,
        ..small_budget()
    });
    assert_eq!(regs.get(IRQ_CTRL), 0b101);
    post_event(&regs, [0x0000_0028_0000_0010, 0, 0x10_1000, 0]);
    post_event(&regs, [0x0000_0030_0000_0004, 0, 0, 0]);
    let mut got = Vec::new();
    let r = s.handle_irq(|e| got.push(e));
    assert_eq!(r.events, 2);
    assert!(!r.overflow);
    assert!(matches!(got[0], Event::Translation(f) if f.stream_id == 0x28 && f.addr == 0x10_1000));
    assert_eq!(got[1], Event::BadSte { stream_id: 0x30 });
    // CONS follows PROD.
    assert_eq!(regs.get(EVENTQ_CONS) & 0xfffff, 2);
    // Overflow: OVFLG toggles in PROD; the driver reports it once and copies
    // it to OVACKFLG.
    regs.set(EVENTQ_PROD, regs.get(EVENTQ_PROD) ^ (1 << 31));
    let r = s.handle_irq(|_| {});
    assert!(r.overflow);
    assert_eq!(regs.get(EVENTQ_CONS) >> 31, 1);
    assert!(!s.handle_irq(|_| {}).overflow);
    // QEMU's way: GERROR.EVENTQ_ABT_ERR, acknowledged through GERRORN.
    regs.set(GERROR, regs.get(GERROR) ^ (1 << 2));
    let r = s.poll_events(|_| {});
    assert!(r.overflow);
    assert_eq!(r.gerror, 1 << 2);
    assert_eq!(regs.get(GERROR) ^ regs.get(GERRORN), 0);
    assert_eq!(s.stats().event_overflows, 2);
    assert_eq!(s.stats().events, 2);
    s.shutdown().unwrap();
}

#[test]
fn init_without_irqs_turns_off_interrupts_an_earlier_init_enabled() {
    let (regs, _fake, mut s) = started(SmmuConfig {
        irqs: true,
        ..small_budget()
    });
    assert_eq!(regs.get(IRQ_CTRL), 0b101);
    s.init(small_budget()).unwrap();
    assert_eq!(regs.get(IRQ_CTRL), 0);
    assert_eq!(regs.get(IRQ_CTRLACK), 0);
    s.shutdown().unwrap();
}
