//! The several-CPU DMA workload both boards run: four CPUs at once move
//! bytes through three devices (two edu, one virtio-blk) and two domains
//! built by this crate, while deliberate faults are raised and the boot
//! CPU takes the IOMMU's fault interrupts.
//!
//! **Locking, until the library's concurrent API lands (issue #16):** the
//! IOMMU driver, each domain and each device sit behind a `spin::Mutex`
//! held for one call (or one DMA), never across a wait for another CPU. The
//! IOMMU is reached only through [`SmpBoard::iommu`] (which also masks the
//! CPU's interrupts, as the fault handler takes the same lock) and the
//! domains only through [`Work::domain`]: switching to a shared domain and
//! a shared driver changes those two functions and the types of
//! [`Work::doms`], not the workload. Lock order: fault token → domain →
//! IOMMU; a device's lock is held alone (for its DMA); the fault handler
//! takes the IOMMU alone.
//!
//! Per CPU `c` and round `r`, on lane `(c + r) % 3` (edu 0, edu 1 — both
//! attached to domain 0 — or the virtio-blk in domain 1): fill page P with
//! a pattern of a seed unique to `(c, r)` and page Q with a guard byte;
//! allocate a two-page transaction, link P (to device) and Q (from device),
//! sync; under the device's lock move P's 4 KiB into the device and back
//! out into Q (edu: its buffer; virtio-blk: 8 sectors of the disk that are
//! this CPU's alone); check every byte of Q and of P; destroy the
//! transaction (unlink, sync, free). In round [`FAULT_ROUND`] each AP also
//! takes the fault token, links only the first page of a two-page
//! transaction and has an edu write 4 bytes into the second: the IOMMU
//! blocks it and raises its fault interrupt on the boot CPU, whose handler
//! drains the record; the AP waits (bounded) for that before it goes on,
//! so each fault is recorded (VT-d on QEMU has one fault register). The
//! boot CPU runs its rounds with interrupts on and then keeps taking them
//! until every AP is done.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use bare_iommu::{
    DeviceId, DmaDirection, Domain, IommuBackend, IovaState, MapAttrs, PAGE_SIZE, PhysAddr,
    PteFormat, TableMemory,
};
use spin::{Mutex, MutexGuard};

use crate::edu::Edu;
use crate::harness::{Fail, OrFail, fail_msg};
use crate::pattern::{check_with, fill_with, pattern};
use crate::smp::MAX_CPUS;
use crate::virtio::{BlkOp, BlkRequest, DmaBuf, VIRTIO_BLK_S_OK, VirtioBlk};

/// Rounds per CPU: each CPU visits each of the three lanes once.
pub const ROUNDS: usize = 3;
/// The round in which each AP also raises one deliberate fault.
pub const FAULT_ROUND: usize = 1;
/// Most deliberate faults in one run (one per AP).
pub const MAX_FAULTS: usize = MAX_CPUS - 1;
/// First disk sector of CPU `c`'s eight (after every sector another test uses).
const FIRST_SECTOR: u64 = 1024;
/// What page Q holds where nothing has landed yet.
const GUARD: u8 = 0xa5;
const PAGE: usize = PAGE_SIZE as usize;
/// Polls of a lock before the run fails.
const LOCK_POLLS: u32 = 5_000_000;

/// What the workload needs from the board.
pub trait SmpBoard<B>: Sync {
    /// Runs `f` on the IOMMU driver with this CPU's interrupts masked (the
    /// fault handler takes the same lock), the lock taken with a bound.
    fn iommu<R>(&self, f: impl FnOnce(&mut B) -> R) -> Result<R, Fail>;
    /// Fault records the fault handler has drained so far.
    fn faults_handled(&self) -> u32;
    /// Lets this CPU take interrupts (the boot CPU, between lock holds).
    fn interrupts_on(&self);
    /// Stops this CPU taking interrupts.
    fn interrupts_off(&self);
    /// A free-running counter (virtual time) and its ticks per second.
    fn now(&self) -> u64;
    /// Ticks of [`SmpBoard::now`] in a second.
    fn per_second(&self) -> u64;
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
/// up in domain 1 by the board) and its request header / status buffers.
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

/// Everything the CPUs share.
pub struct Work<'a, F: PteFormat, M: TableMemory> {
    /// Domain 0 (both edu functions attached) and domain 1 (the virtio-blk).
    pub doms: [Mutex<Domain<F, M>>; 2],
    /// The two edu functions.
    pub edu: [Mutex<Mmio<&'a Edu>>; 2],
    /// The virtio-blk.
    pub virtio: Mutex<Mmio<VirtioLane>>,
    /// Pages P and Q of each CPU (identity-mapped, lent to this test).
    pub pages: [[PhysAddr; 2]; MAX_CPUS],
    /// CPUs in the run.
    pub cpus: usize,
    /// Held by the AP raising a deliberate fault.
    pub fault_token: Mutex<()>,
    /// The deliberate faults made, in order.
    pub expected: Mutex<heapless::Vec<Expected, MAX_FAULTS>>,
    /// Transactions completed with every byte checked, per lane.
    pub done: [AtomicU32; 3],
    /// APs that finished their rounds.
    pub aps_finished: AtomicUsize,
    /// CPUs inside a round now, and the most there were at once.
    pub in_flight: AtomicUsize,
    /// The most CPUs inside a round at once.
    pub max_in_flight: AtomicUsize,
    /// The first failure of each CPU.
    pub failed: [Mutex<Option<Fail>>; MAX_CPUS],
}

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

impl<'a, F: PteFormat, M: TableMemory> Work<'a, F, M>
where
    Domain<F, M>: Send,
{
    /// Runs `f` on domain `i` (the one place the workload reaches a domain:
    /// with the shared domain API this becomes a plain call).
    fn domain<R>(&self, i: usize, f: impl FnOnce(&mut Domain<F, M>) -> R) -> Result<R, Fail> {
        let d = self.doms.get(i).or_fail("domain index")?;
        Ok(f(&mut *lock(d, "domain")?))
    }

    /// A two-page transaction in domain `dom` with `p` linked at 0 (`dir_p`)
    /// and, if given, `q` at one page (device writes), synced.
    fn map<B: IommuBackend, S: SmpBoard<B>>(
        &self,
        board: &S,
        dom: usize,
        p: PhysAddr,
        q: Option<PhysAddr>,
    ) -> Result<IovaState, Fail> {
        self.domain(dom, |d| {
            let mut tx = d
                .try_alloc(2 * PAGE_SIZE, u64::MAX)
                .or_fail("try_alloc")?
                .into_iova()
                .or_fail("translated domain gave the direct path")?;
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
                .and_then(|()| match q {
                    Some(q) => d
                        .link(
                            &mut tx,
                            q,
                            PAGE_SIZE,
                            PAGE_SIZE,
                            DmaDirection::FromDevice,
                            MapAttrs::empty(),
                        )
                        .map(|_| ())
                        .or_fail("link Q"),
                    None => Ok(()),
                })
                .and_then(|()| board.iommu(|u| d.sync(u))?.or_fail("sync"));
            match linked {
                Ok(()) => Ok(tx),
                Err(e) => {
                    let _ = board.iommu(|u| d.destroy(tx, u));
                    Err(e)
                }
            }
        })?
    }

    fn unmap<B: IommuBackend, S: SmpBoard<B>>(
        &self,
        board: &S,
        dom: usize,
        tx: IovaState,
    ) -> Result<(), Fail> {
        self.domain(dom, |d| board.iommu(|u| d.destroy(tx, u)))??
            .or_fail("destroy")
    }

    /// One round of CPU `cpu` on `lane`.
    fn round<B: IommuBackend, S: SmpBoard<B>>(
        &self,
        board: &S,
        cpu: usize,
        round: usize,
        lane: usize,
    ) -> Result<(), Fail> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let r = self.round_body(board, cpu, round, lane);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn round_body<B: IommuBackend, S: SmpBoard<B>>(
        &self,
        board: &S,
        cpu: usize,
        round: usize,
        lane: usize,
    ) -> Result<(), Fail> {
        let [p, q] = *self.pages.get(cpu).or_fail("pages")?;
        let seed = (cpu * 16 + round * 4 + lane) as u8;
        fill(p, |i| pattern(seed, i));
        fill(q, |_| GUARD);
        let dom = usize::from(lane == 2);
        let tx = self.map(board, dom, p, Some(q))?;
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
                let sector = FIRST_SECTOR + 8 * cpu as u64;
                for (op, data_dma) in [(BlkOp::Write, iova), (BlkOp::Read, iova + PAGE_SIZE)] {
                    let req = BlkRequest {
                        op,
                        sector,
                        header: v.0.header,
                        data_dma,
                        data_len: PAGE,
                        status: v.0.status,
                    };
                    let c = v.0.blk.request(&req).or_fail("virtio request")?;
                    check_eq!(c.status, VIRTIO_BLK_S_OK, "virtio {op:?} status");
                }
                Ok(())
            })(),
        };
        let unmapped = self.unmap(board, dom, tx);
        moved?;
        unmapped?;
        check(q, |i| pattern(seed, i), "Q after the round trip")?;
        check(p, |i| pattern(seed, i), "P after the round trip")?;
        if let Some(n) = self.done.get(lane) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The deliberate fault of AP `cpu`: a 4-byte edu write into the
    /// unlinked second page of a transaction of domain 0; waits (bounded)
    /// for the boot CPU's handler to drain it.
    fn fault<B: IommuBackend, S: SmpBoard<B>>(&self, board: &S, cpu: usize) -> Result<(), Fail> {
        let _token = lock(&self.fault_token, "fault token")?;
        let [p, _] = *self.pages.get(cpu).or_fail("pages")?;
        let seed = 0xf0 | cpu as u8;
        fill(p, |i| pattern(seed, i));
        let tx = self.map(board, 0, p, None)?;
        let hole = tx.iova().get() + PAGE_SIZE + 8 * cpu as u64;
        let lane = cpu % 2;
        let made = (|| {
            let before = board.faults_handled();
            let edu = lock(self.edu.get(lane).or_fail("edu")?, "edu")?;
            lock(&self.expected, "expected")?
                .push(Expected {
                    dev: edu.0.id,
                    iova: hole,
                })
                .ok()
                .or_fail("expected faults")?;
            edu.0.dma_to_ram(hole, 0, 4).or_fail("faulting DMA")?;
            drop(edu);
            let start = board.now();
            while board.faults_handled() == before {
                if board.now().wrapping_sub(start) > 10 * board.per_second() {
                    fail!("CPU {cpu}: the fault at {hole:#x} was not handled within 10 s");
                }
                core::hint::spin_loop();
            }
            Ok(())
        })();
        let unmapped = self.unmap(board, 0, tx);
        made?;
        unmapped?;
        check(p, |i| pattern(seed, i), "linked page next to the fault")
    }

    fn rounds<B: IommuBackend, S: SmpBoard<B>>(&self, board: &S, cpu: usize) -> Result<(), Fail> {
        for round in 0..ROUNDS {
            let lane = (cpu + round) % 3;
            self.round(board, cpu, round, lane)
                .map_err(|e| fail_msg(format_args!("CPU {cpu} round {round} lane {lane}: {e}")))?;
            if cpu != 0 && round == FAULT_ROUND {
                self.fault(board, cpu)
                    .map_err(|e| fail_msg(format_args!("CPU {cpu} fault: {e}")))?;
            }
        }
        Ok(())
    }

    /// The job of CPU `cpu` (give it to the board's `smp::run`).
    pub fn job<B: IommuBackend, S: SmpBoard<B>>(&self, board: &S, cpu: usize) {
        if cpu == 0 {
            board.interrupts_on();
        }
        let r = self.rounds(board, cpu);
        if cpu == 0 {
            // Keep taking fault interrupts until every AP is done (bounded).
            let start = board.now();
            while self.aps_finished.load(Ordering::SeqCst) + 1 < self.cpus
                && board.now().wrapping_sub(start) < 30 * board.per_second()
            {
                core::hint::spin_loop();
            }
            board.interrupts_off();
        } else {
            self.aps_finished.fetch_add(1, Ordering::SeqCst);
        }
        if let (Err(e), Some(slot)) = (r, self.failed.get(cpu)) {
            *slot.lock() = Some(e);
        }
    }

    /// After the run: the first CPU failure, else the per-lane counts
    /// (every round of every CPU completed); at least three CPUs were inside
    /// a round at the same time (one per device).
    pub fn verdict(&self) -> Result<[u32; 3], Fail> {
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
        Ok(done)
    }
}
