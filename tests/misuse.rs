//! Misuse the README promises to survive (issue 15): every failure a value
//! that changes nothing, no page handed back before the sync that follows
//! its retirement, no IOVA range lost.

mod common;

use bare_iommu::pgtable::arm::ArmStage1;
use bare_iommu::testing::RecordingBackend;
use bare_iommu::{
    BackendError, DmaAddr, DmaDirection, DmaError, Domain, DomainConfig, IovaState, MapAttrs,
    PhysAddr, TableMemory,
};
use common::HostMemory;
use std::cell::Cell;

const PAGE: u64 = 4096;
const RW: DmaDirection = DmaDirection::Bidirectional;

fn cfg(id: u16) -> DomainConfig {
    DomainConfig {
        id,
        levels: 4,
        aperture_start: 1 << 20,
        aperture_end: 1 << 40,
        coherent_walk: true,
    }
}

fn tx<M: TableMemory>(d: &mut Domain<ArmStage1, M>, size: u64) -> IovaState {
    d.try_alloc(size, u64::MAX).unwrap().into_iova().unwrap()
}

/// A lender whose pages, from the `high_from`-th on, lie above what a
/// 48-bit output address can reach (the CPU sees them through an offset).
struct HighAfter<'a> {
    inner: &'a HostMemory,
    lent: Cell<usize>,
    high_from: usize,
}

const HIGH: u64 = 1 << 56;

// SAFETY: forwards to HostMemory, translating the high alias back.
unsafe impl TableMemory for HighAfter<'_> {
    fn alloc_zeroed(&self, pages: usize) -> Option<PhysAddr> {
        let p = self.inner.alloc_zeroed(pages)?;
        let n = self.lent.get();
        self.lent.set(n + 1);
        Some(if n >= self.high_from {
            PhysAddr(p.0 + HIGH)
        } else {
            p
        })
    }
    unsafe fn free(&self, pa: PhysAddr, pages: usize) {
        // SAFETY: the caller hands back one of our blocks.
        unsafe { self.inner.free(PhysAddr(pa.0 % HIGH), pages) }
    }
    fn phys_to_virt(&self, pa: PhysAddr) -> *mut u8 {
        self.inner.phys_to_virt(PhysAddr(pa.0 % HIGH))
    }
}

#[test]
fn a_link_refused_for_a_table_above_the_output_size_leaves_only_the_kept_table() {
    let host = HostMemory::new();
    // The root and one more table are reachable, the third table is not.
    // (Pages lent in order: root, the level-1 table, the level-2 table.)
    let mem = HighAfter {
        inner: &host,
        lent: Cell::new(0),
        high_from: 2,
    };
    let mut d = Domain::new(ArmStage1, &mem, cfg(1)).unwrap();
    let mut be = RecordingBackend::new();
    let mut t = tx(&mut d, PAGE);
    let r = d.link(
        &mut t,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    );
    assert!(matches!(r, Err(DmaError::PhysTooLarge { .. })), "{r:?}");
    assert_eq!(t.linked(), 0);
    // The level-1 table made before the refusal is a child of the root,
    // which stage 1 keeps attached (`IoPageTable::kept_height`); the
    // refused level-2 table was never attached and went back at once.
    let pt = d.page_table().unwrap();
    assert_eq!(pt.kept_height(), Some(2));
    assert_eq!((pt.table_pages(), pt.retired_pages()), (2, 0));
    d.sync(&mut be).unwrap();
    // The root and the level-1 table.
    assert_eq!(host.live_pages(), 2);
    assert_eq!(d.translate(t.iova()), None);
}

#[test]
fn freeing_many_small_transactions_out_of_order_never_loses_a_range() {
    let mem = HostMemory::new();
    let mut d = Domain::new(ArmStage1, &mem, cfg(1)).unwrap();
    let mut be = RecordingBackend::new();
    let mut ts: Vec<IovaState> = (0..100).map(|_| tx(&mut d, PAGE)).collect();
    for (i, t) in ts.iter_mut().enumerate() {
        d.link(
            t,
            PhysAddr(0x8000_0000 + i as u64 * PAGE),
            0,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    // Every other one first: a buddy allocator's free lists fill up here.
    let mut odd = Vec::new();
    for (i, t) in ts.drain(..).enumerate() {
        if i % 2 == 0 {
            d.free(t).map_err(|(_, e)| e).unwrap();
        } else {
            odd.push(t);
        }
    }
    for t in odd {
        d.free(t).map_err(|(_, e)| e).unwrap();
    }
    d.sync(&mut be).unwrap();
    // The whole space is back: the largest range fits again.
    let big = tx(&mut d, 1 << 39);
    assert_eq!(big.iova(), DmaAddr(1 << 39));
    let low = tx(&mut d, PAGE);
    assert_eq!(low.iova(), DmaAddr(1 << 20));
}

#[test]
fn a_transaction_cannot_be_used_with_another_domain_of_the_same_id() {
    let mem = HostMemory::new();
    let mut a = Domain::new(ArmStage1, &mem, cfg(1)).unwrap();
    let mut b = Domain::new(ArmStage1, &mem, cfg(1)).unwrap();
    let mut ta = tx(&mut a, PAGE);
    let r = b.link(
        &mut ta,
        PhysAddr(0x8000_0000),
        0,
        PAGE,
        RW,
        MapAttrs::empty(),
    );
    assert!(matches!(r, Err(DmaError::WrongDomain { .. })), "{r:?}");
    assert_eq!(b.translate(ta.iova()), None);
    let (ta, e) = b.free(ta).expect_err("b freed a's transaction");
    assert!(matches!(e, DmaError::WrongDomain { .. }));
    // b still hands out its own range, a's transaction still works in a.
    let tb = tx(&mut b, PAGE);
    assert_eq!(tb.iova(), ta.iova(), "both start at the aperture");
    a.free(ta).unwrap();
    b.free(tb).unwrap();
}

#[test]
fn hundreds_of_emptied_tables_go_back_at_the_next_sync() {
    let mem = HostMemory::new();
    let mut d = Domain::new(ArmStage1, &mem, cfg(1)).unwrap();
    let mut be = RecordingBackend::new();
    // One page in each of 200 separate 2 MiB regions: 200 leaf tables that
    // empty out in one unlink (the retired list has no capacity).
    let mut t = tx(&mut d, 200 << 21);
    for r in 0..200u64 {
        d.link(
            &mut t,
            PhysAddr(0x8000_0000 + r * PAGE),
            r << 21,
            PAGE,
            RW,
            MapAttrs::empty(),
        )
        .unwrap();
    }
    d.sync(&mut be).unwrap();
    assert!(mem.live_pages() > 200);
    d.destroy(t, &mut be).unwrap();
    assert_eq!(
        mem.live_pages(),
        2,
        "empty tables still lent after the destroy's sync (the root and the \
         kept level-1 table stay)"
    );
    assert_eq!(d.page_table().unwrap().table_pages(), 2);
}

#[test]
fn a_noncoherent_domain_over_a_lender_that_cannot_clean_is_refused() {
    let mem = HostMemory::new();
    let mut c = cfg(1);
    c.coherent_walk = false;
    let r = Domain::new(ArmStage1, &mem, c);
    assert!(matches!(
        r.err(),
        Some(DmaError::Backend(BackendError::LenderCannotClean))
    ));
    assert_eq!(mem.live_pages(), 0, "nothing lent for a refused domain");
}
