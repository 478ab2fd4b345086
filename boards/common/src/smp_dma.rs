//! The several-CPU DMA test both boards run: four CPUs at once move bytes
//! through three devices (two edu, one virtio-blk) and two domains built by
//! this crate, through the crate's own sharing API, while deliberate faults
//! are raised and the boot CPU takes the IOMMU's fault interrupts.
//!
//! **Sharing (`bare_iommu::shared`):** the driver is wrapped once in a
//! [`SharedIommu`]; each CPU takes its own [`IommuCpu`] handle and syncs
//! through it; the two domains are [`SharedDomain`]s, told each CPU's
//! index ([`SmpBoard::cpu_index`]), that every CPU allocates, links,
//! unlinks, syncs and frees in. After the run no 2 MiB region of IOVA may
//! have served two CPUs (each allocates from its own shard). No lock of this module
//! guards the driver or a domain. The fault interrupt's handler
//! ([`FaultLog::on_irq`]) reaches the driver only through
//! [`SharedIommu::handle_irq`], which never spins on the driver's lock: when
//! the lock is taken, the holder drains the records as it releases it
//! ([`FaultLog::deferred`]). The boot CPU does not mask its interrupts
//! around its own IOMMU calls, so the interrupt may preempt it while it
//! holds the driver's lock. A device sits behind a `spin::Mutex` held for
//! its DMA (the device, not the IOMMU, is what cannot be shared).
//!
//! Per CPU `c` and round `r`, on lane `(c + r) % 3` (edu 0, edu 1 — both
//! attached to domain 0 — or the virtio-blk in domain 1): fill page P with
//! a pattern of a seed unique to `(c, r)` and page Q with a guard byte;
//! allocate a two-page transaction, link P (to device) and Q (from device),
//! sync; under the device's lock move P's 4 KiB into the device and back
//! out into Q (edu: its buffer; virtio-blk: 8 sectors of the disk that are
//! this CPU's alone); check every byte of Q and of P; destroy the
//! transaction (unlink, sync, free).
//!
//! In round [`FAULT_ROUND`] each CPU also takes the fault token and makes
//! one deliberate fault (`Work::fault`): it links P and Q in one
//! `link_pages`, has an edu copy P into Q (so the IOMMU has the
//! translation of Q's IOVA cached), unlinks Q and syncs through its own
//! handle, refills Q with the guard byte and has the edu write 4 bytes to
//! Q's old IOVA. The IOMMU must
//! block it (Q keeps every guard byte: a sync skipped or not covering the
//! unlink shows here) and raise its fault interrupt on the boot CPU; the
//! CPU waits (bounded) until the record is drained before it goes on, so
//! each fault is recorded alone (VT-d on QEMU has one fault register). The
//! boot CPU makes its fault with the driver's lock held on purpose
//! ([`SharedIommu::with`]) and its interrupts unmasked only inside: the
//! handler then runs while the code it interrupted holds the lock, must
//! return without draining, and the drain must happen as the lock is
//! released. The boot CPU runs its rounds with interrupts on and then keeps
//! taking them until every AP is done.
//!
//! After the run the boot CPU stops the command queue on purpose (a
//! command the hardware refuses): the interrupt's handler must report it,
//! and the syncs of two handles made before it must both return the error
//! (the shared driver's errors reach every window that saw them). After
//! the run no domain may still wait for a sync.
//!
//! A board implements [`SmpBoard`] (its driver, how a domain is made, how
//! the fault interrupt is routed, how a fault record is checked) and calls
//! [`four_cpus`].

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use bare_iommu::shared::{IommuCpu, SharedDomain, SharedIommu, SplitCompletion};
use bare_iommu::{
    BackendError, DeviceId, DmaDirection, Domain, IommuBackend, IovaState, MapAttrs, PAGE_SIZE,
    PhysAddr, PteFormat, TableFormat, TableMemory,
};
use spin::{Mutex, MutexGuard};

use crate::edu::{DmaBudget, Edu};
use crate::fault_log::{FaultLog, IrqCounts};
use crate::harness::{Fail, OrFail, fail_msg};
use crate::pattern::{check_with, fill_with, pattern};
use crate::smp::{Job, MAX_CPUS, SmpError};
use crate::virtio::{BlkOp, BlkRequest, DmaBuf, VIRTIO_BLK_S_OK, VirtioBlk, VirtioFunction};

/// Rounds per CPU: each CPU visits each of the three lanes once.
pub const ROUNDS: usize = 3;
/// The round in which each CPU also raises one deliberate fault.
pub const FAULT_ROUND: usize = 1;
/// Most deliberate faults in one run (one per CPU).
pub const MAX_FAULTS: usize = MAX_CPUS;
/// First disk sector of CPU `c`'s eight (after every sector another test uses).
const FIRST_SECTOR: u64 = 1024;
/// What page Q holds where nothing has landed yet.
const GUARD: u8 = 0xa5;
const PAGE: usize = PAGE_SIZE as usize;
/// Polls of a lock before the run fails.
const LOCK_POLLS: u32 = 5_000_000;
/// Polls of a virtio request (QEMU completes it in real time).
const VIRTIO_POLLS: u32 = 20_000_000;
/// Domain IDs of the run's two domains.
const DOMAIN_IDS: [u16; 2] = [40, 41];

/// What the test needs from the board.
pub trait SmpBoard: Sync {
    /// The IOMMU driver (initialised, its fault interrupt not yet routed).
    type Iommu: SplitCompletion + Send + 'static;
    /// The table format of the domains.
    type Format: PteFormat + Send + Sync;
    /// The lender of the domains' table pages.
    type Mem: TableMemory + Send + Sync;
    /// One fault record as the driver reports it.
    type Record: Copy + Send + 'static;

    /// The board's fault log (a `static`, whose handler is registered).
    fn log(&self) -> &'static FaultLog<Self::Iommu, Self::Record>;
    /// The deferred handler given to [`SharedIommu::new`]: calls
    /// [`FaultLog::deferred`] on [`log`](Self::log).
    fn deferred(&self) -> fn(&mut Self::Iommu);
    /// The running CPU's index (0 for the boot CPU, distinct for each),
    /// given to [`SharedDomain::with_cpu_index`].
    fn cpu_index(&self) -> fn() -> usize;
    /// A new translated domain with ID `id`.
    fn new_domain(
        &self,
        iommu: &mut Self::Iommu,
        id: u16,
    ) -> Result<Domain<Self::Format, Self::Mem>, Fail>;
    /// Routes the fault interrupt to the running (boot) CPU, whose handler
    /// calls [`FaultLog::on_irq`].
    fn arm(&self, iommu: &mut Self::Iommu) -> Result<(), Fail>;
    /// Stops the fault interrupt.
    fn disarm(&self, iommu: &mut Self::Iommu) -> Result<(), Fail>;
    /// Fails unless `rec` reports the blocked write `x` (into a domain of
    /// `format`).
    fn check_fault(
        &self,
        rec: &Self::Record,
        x: &Expected,
        format: TableFormat,
    ) -> Result<(), Fail>;
    /// Fails if the IOMMU still holds a fault record.
    fn nothing_left(&self, iommu: &mut Self::Iommu) -> Result<(), Fail>;
    /// Queues one command the hardware refuses (SMMU: an illegal opcode;
    /// VT-d: an invalid descriptor) and makes it visible to the hardware,
    /// without waiting and without looking at the queue's state after;
    /// `false` when the driver has no command queue (VT-d `noqi`).
    fn queue_bad_command(&self, iommu: &mut Self::Iommu) -> Result<bool, Fail>;
    /// Runs `job` on every CPU at once (the board's `smp::run`).
    fn run(&self, job: Job<'_>) -> Result<(), SmpError>;
    /// Lets this CPU take interrupts.
    fn interrupts_on(&self);
    /// Stops this CPU taking interrupts.
    fn interrupts_off(&self);
    /// A free-running counter (virtual time).
    fn now(&self) -> u64;
    /// Ticks of [`SmpBoard::now`] in a second.
    fn per_second(&self) -> u64;
}

/// What the test drives: lent to it by the board.
pub struct Devices<'a> {
    /// The two edu functions (attached to domain 0).
    pub edu: [&'a Edu; 2],
    /// The virtio-blk (attached to domain 1).
    pub virtio: &'a VirtioFunction,
    /// Pages P and Q of each CPU (fresh, identity mapped).
    pub pages: [[PhysAddr; 2]; MAX_CPUS],
    /// The virtqueue page and the request header page (fresh).
    pub queue: [PhysAddr; 2],
}

/// A device wrapper that holds MMIO pointers (so it is not `Send`) moved
/// behind a lock shared by the CPUs.
pub struct Mmio<T>(pub T);

// SAFETY: the wrapped drivers are `!Send` only for their raw pointers to
// identity-mapped device registers and lent pages, which every CPU reaches
// at the same addresses; the `Mutex` around them lets one CPU at a time use
// them.
unsafe impl<T> Send for Mmio<T> {}

/// The virtio-blk, driven by whoever holds its lock: the driver (queue set
/// up in domain 1) and its request header / status buffers.
pub struct VirtioLane {
    /// The driver.
    pub blk: VirtioBlk,
    /// Request header buffer.
    pub header: DmaBuf,
    /// Status byte buffer.
    pub status: DmaBuf,
}

/// One deliberate fault: the device and the IOVA it wrote to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The device that made the write.
    pub dev: DeviceId,
    /// The (unlinked) IOVA written.
    pub iova: u64,
}

type Dom<S> = SharedDomain<<S as SmpBoard>::Format, <S as SmpBoard>::Mem>;
type Cpu<'s, S> = IommuCpu<'s, <S as SmpBoard>::Iommu>;

/// Everything the CPUs share.
struct Work<'a, S: SmpBoard> {
    /// The driver, shared.
    iommu: &'a SharedIommu<S::Iommu>,
    /// Domain 0 (both edu functions attached) and domain 1 (the virtio-blk).
    doms: [Dom<S>; 2],
    /// The two edu functions.
    edu: [Mutex<Mmio<&'a Edu>>; 2],
    /// The virtio-blk.
    virtio: Mutex<Mmio<VirtioLane>>,
    /// Pages P and Q of each CPU (identity-mapped, lent to this test).
    pages: [[PhysAddr; 2]; MAX_CPUS],
    /// CPUs in the run.
    cpus: usize,
    /// Held by the CPU raising a deliberate fault.
    fault_token: Mutex<()>,
    /// The deliberate faults made, in order.
    expected: Mutex<heapless::Vec<Expected, MAX_FAULTS>>,
    /// Transactions completed with every byte checked, per lane.
    done: [AtomicU32; 3],
    /// APs that finished their rounds.
    aps_finished: AtomicUsize,
    /// CPUs inside a round now.
    in_flight: AtomicUsize,
    /// The most CPUs inside a round at once.
    max_in_flight: AtomicUsize,
    /// The first failure of each CPU.
    failed: [Mutex<Option<Fail>>; MAX_CPUS],
    /// Where each transaction began: (CPU, domain, its 2 MiB region).
    regions: Mutex<heapless::Vec<(usize, usize, u64), REGIONS>>,
}

/// Transactions recorded in [`Work::regions`]: every CPU's rounds and
/// deliberate fault.
const REGIONS: usize = MAX_CPUS * (ROUNDS + 1);

/// Takes `m` with a bound.
pub fn lock<'m, T>(m: &'m Mutex<T>, what: &str) -> Result<MutexGuard<'m, T>, Fail> {
    for _ in 0..LOCK_POLLS {
        if let Some(g) = m.try_lock() {
            return Ok(g);
        }
        core::hint::spin_loop();
    }
    Err(fail_msg(format_args!(
        "{what}: lock not free after {LOCK_POLLS} polls"
    )))
}

/// A transaction of `len` bytes from `d`.
fn begin<S: SmpBoard>(d: &Dom<S>, len: u64) -> Result<IovaState, Fail> {
    d.try_alloc(len, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated domain gave the direct path")
}

/// `tx` when its links and sync (`linked`) went well, else destroyed
/// (through `cpu`) and the failure.
fn kept_or_destroyed<S: SmpBoard>(
    d: &Dom<S>,
    tx: IovaState,
    cpu: &mut Cpu<'_, S>,
    linked: Result<(), Fail>,
) -> Result<IovaState, Fail> {
    match linked {
        Ok(()) => Ok(tx),
        Err(e) => {
            let _ = d.destroy(tx, cpu);
            Err(e)
        }
    }
}

fn fill(pa: PhysAddr, byte: impl Fn(usize) -> u8) {
    // SAFETY: `pa` is one of this CPU's pages in `Work::pages`, identity
    // mapped, lent to this test and used by no other CPU.
    unsafe { fill_with(pa.get() as usize as *mut u8, PAGE, byte) }
}

fn check(pa: PhysAddr, byte: impl Fn(usize) -> u8, what: &str) -> Result<(), Fail> {
    // SAFETY: as in `fill`.
    let r = unsafe { check_with(pa.get() as usize as *const u8, pa, PAGE, byte) };
    r.map_err(|m| fail_msg(format_args!("{what}: {m}")))
}

/// Waits (bounded, `seconds` of virtual time) until `done()`.
fn wait_for<S: SmpBoard>(board: &S, seconds: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = board.now();
    while !done() {
        if board.now().wrapping_sub(start) > seconds * board.per_second() {
            return done();
        }
        core::hint::spin_loop();
    }
    true
}

impl<S: SmpBoard> Work<'_, S> {
    fn dom(&self, i: usize) -> Result<&Dom<S>, Fail> {
        self.doms.get(i).or_fail("domain index")
    }

    /// A transaction of `len` bytes from domain `dom`, its 2 MiB region
    /// noted with CPU `c`, which allocated it.
    fn begin(&self, c: usize, dom: usize, len: u64) -> Result<IovaState, Fail> {
        let tx = begin::<S>(self.dom(dom)?, len)?;
        // Full only if a CPU ran more transactions than planned: then the
        // check at the end sees fewer of them, no harm.
        let _ = lock(&self.regions, "regions")?.push((c, dom, tx.iova().0 >> 21));
        Ok(tx)
    }

    /// A two-page transaction of CPU `c` in domain `dom` with `p` linked at
    /// 0 (to the device) and `q` at one page (from the device), synced
    /// through this CPU's handle.
    fn map(
        &self,
        cpu: &mut Cpu<'_, S>,
        c: usize,
        dom: usize,
        p: PhysAddr,
        q: PhysAddr,
    ) -> Result<IovaState, Fail> {
        let d = self.dom(dom)?;
        let mut tx = self.begin(c, dom, 2 * PAGE_SIZE)?;
        let linked = d
            .link(
                &mut tx,
                p,
                0,
                PAGE_SIZE,
                DmaDirection::ToDevice,
                MapAttrs::empty(),
            )
            .map(|_| ())
            .or_fail("link P")
            .and_then(|()| {
                d.link(
                    &mut tx,
                    q,
                    PAGE_SIZE,
                    PAGE_SIZE,
                    DmaDirection::FromDevice,
                    MapAttrs::empty(),
                )
                .map(|_| ())
                .or_fail("link Q")
            })
            .and_then(|()| d.sync_for(&tx, cpu).or_fail("sync_for"));
        kept_or_destroyed::<S>(d, tx, cpu, linked)
    }

    /// A transaction of CPU `c` in domain `dom` with `pages` linked one
    /// after another from 0 in one call (both directions), synced through
    /// this CPU's handle.
    fn map_pages(
        &self,
        cpu: &mut Cpu<'_, S>,
        c: usize,
        dom: usize,
        pages: &[PhysAddr],
    ) -> Result<IovaState, Fail> {
        let d = self.dom(dom)?;
        let mut tx = self.begin(c, dom, pages.len() as u64 * PAGE_SIZE)?;
        let linked = d
            .link_pages(
                &mut tx,
                pages,
                0,
                DmaDirection::Bidirectional,
                MapAttrs::empty(),
            )
            .map(|_| ())
            .or_fail("link_pages")
            .and_then(|()| d.sync_for(&tx, cpu).or_fail("sync_for"));
        kept_or_destroyed::<S>(d, tx, cpu, linked)
    }

    fn unmap(&self, cpu: &mut Cpu<'_, S>, dom: usize, tx: IovaState) -> Result<(), Fail> {
        self.dom(dom)?.destroy(tx, cpu).or_fail("destroy")
    }

    /// One round of CPU `c` on `lane`.
    fn round(&self, cpu: &mut Cpu<'_, S>, c: usize, round: usize, lane: usize) -> Result<(), Fail> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let r = self.round_body(cpu, c, round, lane);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn round_body(
        &self,
        cpu: &mut Cpu<'_, S>,
        c: usize,
        round: usize,
        lane: usize,
    ) -> Result<(), Fail> {
        let [p, q] = *self.pages.get(c).or_fail("pages")?;
        let seed = (c * 16 + round * 4 + lane) as u8;
        fill(p, |i| pattern(seed, i));
        fill(q, |_| GUARD);
        let dom = usize::from(lane == 2);
        let tx = self.map(cpu, c, dom, p, q)?;
        let iova = tx.iova().get();
        let moved = match lane {
            0 | 1 => (|| {
                let edu = lock(self.edu.get(lane).or_fail("edu")?, "edu")?;
                edu.0
                    .dma_from_ram(iova, 0, PAGE as u32)
                    .or_fail("P -> edu")?;
                edu.0
                    .dma_to_ram(iova + PAGE_SIZE, 0, PAGE as u32)
                    .or_fail("edu -> Q")
            })(),
            _ => (|| {
                let mut v = lock(&self.virtio, "virtio")?;
                let sector = FIRST_SECTOR + 8 * c as u64;
                for (op, data_dma) in [(BlkOp::Write, iova), (BlkOp::Read, iova + PAGE_SIZE)] {
                    let req = BlkRequest {
                        op,
                        sector,
                        header: v.0.header,
                        data_dma,
                        data_len: PAGE,
                        status: v.0.status,
                    };
                    let done = v.0.blk.request(&req).or_fail("virtio request")?;
                    check_eq!(done.status, VIRTIO_BLK_S_OK, "virtio {op:?} status");
                }
                Ok(())
            })(),
        };
        let unmapped = self.unmap(cpu, dom, tx);
        moved?;
        unmapped?;
        check(q, |i| pattern(seed, i), "Q after the round trip")?;
        check(p, |i| pattern(seed, i), "P after the round trip")?;
        if let Some(n) = self.done.get(lane) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The deliberate fault of CPU `c` (see the module documentation): a
    /// 4-byte edu write to Q's IOVA after Q was used, unlinked and synced.
    fn fault(&self, board: &S, cpu: &mut Cpu<'_, S>, c: usize) -> Result<(), Fail> {
        let _token = lock(&self.fault_token, "fault token")?;
        let [p, q] = *self.pages.get(c).or_fail("pages")?;
        let seed = 0xf0 | c as u8;
        fill(p, |i| pattern(seed, i));
        fill(q, |_| GUARD);
        let mut tx = self.map_pages(cpu, c, 0, &[p, q])?;
        let hole = tx.iova().get() + PAGE_SIZE + 8 * c as u64;
        let edu = lock(self.edu.get(c % 2).or_fail("edu")?, "edu")?;
        let mut wrote = false;
        let made = (|| {
            // Q through the IOMMU: its translation is now cached.
            edu.0
                .dma_from_ram(tx.iova().get(), 0, PAGE as u32)
                .or_fail("P -> edu")?;
            edu.0
                .dma_to_ram(tx.iova().get() + PAGE_SIZE, 0, PAGE as u32)
                .or_fail("edu -> Q")?;
            check(q, |i| pattern(seed, i), "Q before the unlink")?;
            let d = self.dom(0)?;
            check_eq!(
                d.unlink(&mut tx, PAGE_SIZE, PAGE_SIZE)
                    .or_fail("unlink Q")?,
                PAGE_SIZE,
                "bytes unlinked"
            );
            // The transaction's own sync (its shard's side only): the
            // device's DMA to Q below must fault all the same.
            d.sync_for(&tx, cpu).or_fail("sync_for after the unlink")?;
            fill(q, |_| GUARD);
            wrote = true;
            lock(&self.expected, "expected")?
                .push(Expected {
                    dev: edu.0.id,
                    iova: hole,
                })
                .ok()
                .or_fail("expected faults")?;
            if c == 0 {
                self.held_fault(board, edu.0, hole)
            } else {
                let before = board.log().handled();
                edu.0.dma_to_ram(hole, 0, 4).or_fail("faulting DMA")?;
                if !wait_for(board, 10, || board.log().handled() != before) {
                    fail!("the fault at {hole:#x} was not drained within 10 s");
                }
                Ok(())
            }
        })();
        drop(edu);
        let unmapped = self.unmap(cpu, 0, tx);
        // First what the memory says (once the faulting write was made): a
        // write that landed explains a fault that never came.
        if wrote {
            check(q, |_| GUARD, "the unlinked page Q after the blocked write")?;
        }
        made?;
        unmapped?;
        check(
            p,
            |i| pattern(seed, i),
            "the linked page P next to the fault",
        )
    }

    /// The boot CPU's fault: made with its interrupts masked, then taken
    /// while this CPU holds the driver's lock. The handler must leave the
    /// record (it cannot take the lock, and must not spin on it); releasing
    /// the lock must drain it, here, at once.
    fn held_fault(&self, board: &S, edu: &Edu, hole: u64) -> Result<(), Fail> {
        let log = board.log();
        board.interrupts_off();
        let (irqs, handled) = (log.irqs(), log.handled());
        let made = edu.dma_to_ram(hole, 0, 4).or_fail("faulting DMA");
        let inside = made.map(|()| {
            self.iommu.with(|_| {
                board.interrupts_on();
                let came = wait_for(board, 10, || log.irqs() != irqs);
                board.interrupts_off();
                (came, log.handled() == handled)
            })
        });
        let drained = log.handled().wrapping_sub(handled);
        board.interrupts_on();
        let (came, untouched) = inside?;
        check!(
            came,
            "the fault interrupt did not arrive while the boot CPU held the driver's lock"
        );
        check!(
            untouched,
            "the handler drained while the interrupted code held the driver's lock"
        );
        check_eq!(
            drained,
            1,
            "records drained as the lock was released (the deferred handler)"
        );
        Ok(())
    }

    fn rounds(&self, board: &S, c: usize) -> Result<(), Fail> {
        let mut cpu = self.iommu.cpu();
        for round in 0..ROUNDS {
            let lane = (c + round) % 3;
            self.round(&mut cpu, c, round, lane)
                .map_err(|e| fail_msg(format_args!("CPU {c} round {round} lane {lane}: {e}")))?;
            if round == FAULT_ROUND {
                self.fault(board, &mut cpu, c)
                    .map_err(|e| fail_msg(format_args!("CPU {c} fault: {e}")))?;
            }
        }
        Ok(())
    }

    /// The job of CPU `c`.
    fn job(&self, board: &S, c: usize) {
        if c == 0 {
            board.interrupts_on();
        }
        let r = self.rounds(board, c);
        if c == 0 {
            // Keep taking fault interrupts until every AP is done (bounded).
            wait_for(board, 30, || {
                self.aps_finished.load(Ordering::SeqCst) + 1 >= self.cpus
            });
            board.interrupts_off();
        } else {
            self.aps_finished.fetch_add(1, Ordering::SeqCst);
        }
        if let (Err(e), Some(slot)) = (r, self.failed.get(c)) {
            *slot.lock() = Some(e);
        }
    }

    /// After the run: the first CPU failure, else the per-lane counts
    /// (every round of every CPU completed); at least three CPUs were inside
    /// a round at the same time (one per device); no domain waits for a
    /// sync (every CPU's last sync ran).
    fn verdict(&self) -> Result<[u32; 3], Fail> {
        for slot in &self.failed {
            if let Some(e) = slot.lock().clone() {
                return Err(e);
            }
        }
        let done = [0, 1, 2].map(|i| self.done[i].load(Ordering::SeqCst));
        let total: u32 = done.iter().sum();
        check_eq!(
            total as usize,
            self.cpus * ROUNDS,
            "transactions completed (per lane {done:?})"
        );
        let most = self.max_in_flight.load(Ordering::SeqCst);
        check!(
            most >= 3.min(self.cpus),
            "at most {most} CPUs were inside a round at once"
        );
        for (i, d) in self.doms.iter().enumerate() {
            check!(
                !d.has_pending(),
                "domain {i} still has unlinks waiting for a sync after the run"
            );
        }
        // Each CPU told its domains its index: its transactions come from
        // its own IOVA shard (chunks of at least 2 MiB, one per shard), so
        // no 2 MiB region served two CPUs.
        let regions = lock(&self.regions, "regions")?;
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                check!(
                    a.1 != b.1 || a.2 != b.2 || a.0 == b.0,
                    "CPUs {} and {} got IOVAs in one 2 MiB region of domain {} ({:#x}): \
                     one IOVA shard served both",
                    a.0,
                    b.0,
                    a.1,
                    a.2 << 21
                );
            }
        }
        Ok(done)
    }
}

/// What [`setup`] made for the run.
struct Setup<S: SmpBoard> {
    doms: [Domain<S::Format, S::Mem>; 2],
    /// Domain 1's transaction holding the virtqueue and the request header.
    queue_tx: IovaState,
    lane: VirtioLane,
    format: TableFormat,
}

/// Domains 0 and 1 with the devices attached, the virtqueue in domain 1,
/// the virtio-blk driver up: done by the boot CPU on the unshared driver.
fn setup<S: SmpBoard>(
    board: &S,
    iommu: &mut S::Iommu,
    dev: &Devices<'_>,
) -> Result<Setup<S>, Fail> {
    let d0 = board.new_domain(iommu, DOMAIN_IDS[0])?;
    let mut d1 = board.new_domain(iommu, DOMAIN_IDS[1])?;
    let format = d0.info().or_fail("domain info")?.format;
    for e in dev.edu {
        iommu.attach(e.id, d0.attachment()).or_fail("attach edu")?;
    }
    iommu
        .attach(dev.virtio.id, d1.attachment())
        .or_fail("attach virtio")?;
    let [ring, header] = dev.queue;
    let mut tx = d1
        .try_alloc(2 * PAGE_SIZE, u64::MAX)
        .or_fail("try_alloc")?
        .into_iova()
        .or_fail("translated domain gave the direct path")?;
    let both = DmaDirection::Bidirectional;
    let ring_iova = d1
        .link(&mut tx, ring, 0, PAGE_SIZE, both, MapAttrs::empty())
        .or_fail("link ring")?
        .get();
    let header_iova = d1
        .link(
            &mut tx,
            header,
            PAGE_SIZE,
            PAGE_SIZE,
            both,
            MapAttrs::empty(),
        )
        .or_fail("link header")?
        .get();
    d1.sync(iommu).or_fail("sync")?;
    let cpu = |pa: PhysAddr, off: usize| (pa.get() as usize + off) as *mut u8;
    // SAFETY: the ring page is lent to this test (identity mapped), the
    // device reaches it at `ring_iova` through the tables just synced, and
    // the function is driven by this test alone.
    let blk = unsafe {
        VirtioBlk::init(
            dev.virtio.pci,
            DmaBuf::new(cpu(ring, 0), ring_iova),
            DmaBudget::Polls(VIRTIO_POLLS),
        )
    }
    .or_fail("virtio-blk init")?;
    // SAFETY: the header page is lent to this test: header at 0, status
    // byte at 0x800, reached by the device at `header_iova`.
    let lane = unsafe {
        VirtioLane {
            blk,
            header: DmaBuf::new(cpu(header, 0), header_iova),
            status: DmaBuf::new(cpu(header, 0x800), header_iova + 0x800),
        }
    };
    Ok(Setup {
        doms: [d0, d1],
        queue_tx: tx,
        lane,
        format,
    })
}

/// The test: four CPUs at once run DMA transactions on three devices
/// through [`SharedDomain`]s and one [`SharedIommu`], every byte checked,
/// while each CPU raises one deliberate fault and the boot CPU takes the
/// fault interrupt (see the module documentation). Exactly the deliberate
/// faults arrive, each once, in order, drained through
/// [`SharedIommu::handle_irq`] or, when its lock was taken, by the lock's
/// holder; the handler runs on the boot CPU only, never without the
/// driver, and at least once (the boot CPU's fault) finds the lock taken.
/// Gives the driver back (its devices detached, its domains ended).
pub fn four_cpus<S: SmpBoard>(
    board: &S,
    mut iommu: S::Iommu,
    dev: &Devices<'_>,
) -> (S::Iommu, Result<(), Fail>) {
    let log = board.log();
    log.reset();
    // Nothing recorded before the run counts.
    let _ = board.nothing_left(&mut iommu);
    let set = match setup(board, &mut iommu, dev) {
        Ok(s) => s,
        Err(e) => return (iommu, Err(e)),
    };
    let Setup {
        doms: [d0, d1],
        queue_tx,
        lane,
        format,
    } = set;
    let shared = SharedIommu::new(iommu, board.deferred());
    let published = log.publish(&shared);
    let armed = shared.with(|b| board.arm(b));
    let work = Work::<S> {
        iommu: &shared,
        doms: [d0, d1].map(|d| SharedDomain::with_cpu_index(d, board.cpu_index())),
        edu: dev.edu.map(|e| Mutex::new(Mmio(e))),
        virtio: Mutex::new(Mmio(lane)),
        pages: dev.pages,
        cpus: MAX_CPUS,
        fault_token: Mutex::new(()),
        expected: Mutex::new(heapless::Vec::new()),
        done: [const { AtomicU32::new(0) }; 3],
        aps_finished: AtomicUsize::new(0),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        failed: [const { Mutex::new(None) }; MAX_CPUS],
        regions: Mutex::new(heapless::Vec::new()),
    };
    let ran = armed.and_then(|()| {
        board
            .run(&|c| work.job(board, c))
            .map_err(|e| fail_msg(format_args!("{e}")))
    });
    let stopped = match ran {
        Ok(()) => error_fan_out(board, &shared),
        Err(_) => Ok(false),
    };
    let disarmed = shared.with(|b| board.disarm(b));
    drop(published);
    let verdict = work.verdict();
    let most = work.max_in_flight.load(Ordering::SeqCst);
    let expected = work.expected.lock().clone();
    let Work {
        doms: [d0, d1],
        virtio: lane,
        ..
    } = work;
    let (d0, mut d1) = (d0.into_inner(), d1.into_inner());
    let mut iommu = shared.into_inner();
    let reset = lane.into_inner().0.blk.reset();
    let destroyed = d1.destroy(queue_tx, &mut iommu);
    let ended = (|| {
        for d in dev.edu.iter().map(|e| e.id).chain([dev.virtio.id]) {
            iommu.detach(d).or_fail("detach")?;
        }
        for d in [d0, d1] {
            d.teardown(&mut iommu)
                .map_err(|(_, e)| e)
                .or_fail("domain teardown")?;
        }
        Ok(())
    })();
    let checked = (|| {
        ran?;
        let stopped = stopped?;
        disarmed?;
        let done = verdict?;
        reset.or_fail("virtio reset")?;
        destroyed.or_fail("destroy queue transaction")?;
        ended?;
        let records = log.records()?;
        let n = log.counts();
        narrate!(
            "{MAX_CPUS} CPUs: {} edu 0 / {} edu 1 / {} virtio-blk transactions ({most} CPUs in a round at once), {} faults through {} interrupts ({} drained in the handler, {} left to the lock holder, {} deferred drains)",
            done[0],
            done[1],
            done[2],
            n.handled,
            n.irqs,
            n.drained_in_irq,
            n.deferred_irqs,
            n.deferred_runs
        );
        check_faults(board, &expected, &records, n, format, stopped)?;
        board.nothing_left(&mut iommu)
    })();
    (iommu, checked)
}

/// After the run, on the boot CPU: a command the hardware refuses stops
/// the queue; the fault interrupt's handler must report it (the driver's
/// `handle_irq` says so, and the run's drain keeps it), and the next sync
/// of each of two handles made before it — two CPUs' windows — must return
/// the queue error, which the shared driver records for every window that
/// saw it; then both sync cleanly (the queue runs on, and no handle hears
/// of the error twice). Whether a queue was stopped.
fn error_fan_out<S: SmpBoard>(board: &S, shared: &SharedIommu<S::Iommu>) -> Result<bool, Fail> {
    let log = board.log();
    let mut cpus = [shared.cpu(), shared.cpu()];
    let trouble = log.counts().trouble;
    board.interrupts_off();
    // Visible to the hardware, waited for by nobody: the interrupt's
    // handler is the first to look.
    let stopped = shared.with(|b| board.queue_bad_command(b))?;
    if !stopped {
        return Ok(false);
    }
    board.interrupts_on();
    let reported = wait_for(board, 10, || log.counts().trouble != trouble);
    board.interrupts_off();
    check!(
        reported,
        "the interrupt's handler did not report the stopped command queue"
    );
    for (i, cpu) in cpus.iter_mut().enumerate() {
        match cpu.sync() {
            Err(BackendError::QueueError { .. }) => {}
            other => fail!("handle {i}'s sync after the queue error returned {other:?}"),
        }
    }
    // The queue runs on, and each handle heard of the error once: the one
    // whose own submit met it (VT-d: the driver recovers the queue as it
    // queues the wait descriptor) counts it as seen.
    for (i, cpu) in cpus.iter_mut().enumerate() {
        cpu.sync()
            .map_err(|e| fail_msg(format_args!("handle {i}'s sync after recovery: {e}")))?;
    }
    Ok(true)
}

/// Exactly the deliberate faults, once each, in order, drained through the
/// shared handler; the handler ran on the boot CPU only, with the driver
/// published, and left work to a lock holder at least once.
fn check_faults<S: SmpBoard>(
    board: &S,
    expected: &[Expected],
    records: &[S::Record],
    n: IrqCounts,
    format: TableFormat,
    stopped: bool,
) -> Result<(), Fail> {
    check_eq!(expected.len(), MAX_CPUS, "deliberate faults made");
    check_eq!(n.handled as usize, expected.len(), "fault records drained");
    check_eq!(records.len(), expected.len(), "fault records kept");
    for (r, x) in records.iter().zip(expected) {
        board.check_fault(r, x, format)?;
    }
    check_eq!(n.missed, 0, "handler runs with no driver published");
    check_eq!(
        n.elsewhere,
        0,
        "handler runs on another CPU than the boot CPU"
    );
    check_eq!(
        n.trouble,
        u32::from(stopped),
        "drains reporting an overflow or an error (the stopped queue only)"
    );
    check_eq!(n.lost, 0, "records lost to a busy list");
    check!(
        n.deferred_irqs >= 1 && n.deferred_runs >= 1,
        "the handler never found the driver's lock taken ({n:?})"
    );
    check_eq!(
        n.drained_in_irq + n.deferred_irqs,
        n.irqs,
        "handler runs that published a driver"
    );
    Ok(())
}
