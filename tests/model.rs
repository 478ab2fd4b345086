//! Property test: random sequences of try_alloc / link / unlink / sync / free
//! against a reference model (IOVA page → physical page + attributes).
//!
//! After every step the software walk of the real tables must equal the
//! model; every sync must cost exactly one completion wait and its
//! invalidations must cover every page unlinked since the previous sync.

mod common;

use bare_iommu::pgtable::arm::{ArmStage1, ArmStage2};
use bare_iommu::pgtable::vtd::VtdSecondLevel;
use bare_iommu::testing::RecordingBackend;
use bare_iommu::vtd::first_level::VtdFirstLevel;
use bare_iommu::{
    DmaAddr, DmaDirection, DmaError, Domain, DomainConfig, IovaState, MapAttrs, PhysAddr, PteFormat,
};
use common::HostMemory;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const PAGE: u64 = 4096;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        pages: u64,
    },
    LinkPages {
        tx: usize,
        off: u64,
        phys: Vec<u64>,
    },
    Link {
        tx: usize,
        off: u64,
        pages: u64,
        phys: u64,
        aligned: bool,
        dir: u8,
    },
    Unlink {
        tx: usize,
        off: u64,
        pages: u64,
    },
    Sync,
    Free {
        tx: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => prop_oneof![1u64..=16, 1u64..=64, Just(1024u64)].prop_map(|pages| Op::Alloc { pages }),
        5 => (0usize..4, 0u64..1024, prop_oneof![1u64..=8, 1u64..=600], 0u64..4096, any::<bool>(), 1u8..=3)
            .prop_map(|(tx, off, pages, phys, aligned, dir)| Op::Link { tx, off, pages, phys, aligned, dir }),
        3 => (0usize..4, 0u64..1024, prop_oneof![1u64..=8, 1u64..=600])
            .prop_map(|(tx, off, pages)| Op::Unlink { tx, off, pages }),
        2 => (0usize..4, 0u64..1024, proptest::collection::vec(0u64..1 << 20, 1..600))
            .prop_map(|(tx, off, phys)| Op::LinkPages { tx, off, phys }),
        2 => Just(Op::Sync),
        1 => (0usize..4).prop_map(|tx| Op::Free { tx }),
    ]
}

fn dir(d: u8) -> DmaDirection {
    match d {
        1 => DmaDirection::ToDevice,
        2 => DmaDirection::FromDevice,
        _ => DmaDirection::Bidirectional,
    }
}

fn run<F: PteFormat>(fmt: F, levels: u8, ops: &[Op]) -> Result<(), TestCaseError> {
    let mem = HostMemory::new();
    let cfg = DomainConfig {
        id: 7,
        levels,
        aperture_start: 1 << 20,
        aperture_end: 1 << 32,
        coherent_walk: true,
    };
    let mut d = Domain::new(fmt, &mem, cfg).unwrap();
    let mut be = RecordingBackend::new();
    let mut txs: Vec<IovaState> = Vec::new();
    // Model: IOVA page → (phys page, canonical attrs).
    let mut model: BTreeMap<u64, (u64, MapAttrs)> = BTreeMap::new();
    let mut changed: BTreeSet<u64> = BTreeSet::new();

    for op in ops {
        match *op {
            Op::Alloc { pages } => {
                if txs.len() < 4 {
                    let t = d
                        .try_alloc(pages * PAGE, u64::MAX)
                        .unwrap()
                        .into_iova()
                        .unwrap();
                    prop_assert!(t.size() >= pages * PAGE);
                    prop_assert_eq!(t.iova().0 % t.size(), 0);
                    for o in &txs {
                        prop_assert!(
                            t.iova().0 + t.size() <= o.iova().0
                                || o.iova().0 + o.size() <= t.iova().0
                        );
                    }
                    txs.push(t);
                }
            }
            Op::Link {
                tx,
                off,
                pages,
                phys,
                aligned,
                dir: dbits,
            } => {
                let Some(t) = txs.get_mut(tx) else { continue };
                let off = off * PAGE;
                let len = pages * PAGE;
                let iova = t.iova().0 + off;
                // Optionally give the physical run the IOVA's 2 MiB alignment so blocks appear.
                let pa = if aligned {
                    (1 << 33) + (iova & ((2 << 20) - 1)) + (phys << 21)
                } else {
                    (1 << 33) + phys * PAGE
                };
                let attrs = dir(dbits).attrs();
                let want_ok = off + len <= t.size()
                    && (0..pages).all(|i| !model.contains_key(&(iova + i * PAGE)));
                let before = t.linked();
                let r = d.link(t, PhysAddr(pa), off, len, dir(dbits), MapAttrs::empty());
                if want_ok {
                    prop_assert_eq!(r, Ok(DmaAddr(iova)));
                    prop_assert_eq!(t.linked(), before + len);
                    for i in 0..pages {
                        model.insert(iova + i * PAGE, (pa + i * PAGE, fmt.canonical(attrs)));
                    }
                } else {
                    prop_assert!(r.is_err(), "link should have failed");
                    prop_assert_eq!(t.linked(), before);
                    if off + len > t.size() {
                        prop_assert_eq!(
                            r,
                            Err(DmaError::OutsideTransaction {
                                offset: off,
                                len,
                                size: t.size()
                            })
                        );
                    } else {
                        let already = matches!(r, Err(DmaError::AlreadyLinked { .. }));
                        prop_assert!(already, "expected AlreadyLinked, got {:?}", r);
                    }
                }
            }
            Op::LinkPages { tx, off, ref phys } => {
                let phys: &Vec<u64> = phys;
                let Some(t) = txs.get_mut(tx) else { continue };
                let off = off * PAGE;
                let pages = phys.len() as u64;
                let len = pages * PAGE;
                let iova = t.iova().0 + off;
                let list: Vec<PhysAddr> = phys
                    .iter()
                    .map(|p| PhysAddr((1 << 34) + p * PAGE))
                    .collect();
                let want_ok = off + len <= t.size()
                    && (0..pages).all(|i| !model.contains_key(&(iova + i * PAGE)));
                let before = t.linked();
                let r = d.link_pages(
                    t,
                    &list,
                    off,
                    DmaDirection::Bidirectional,
                    MapAttrs::empty(),
                );
                if want_ok {
                    prop_assert_eq!(r, Ok(DmaAddr(iova)));
                    for (i, p) in list.iter().enumerate() {
                        model.insert(
                            iova + i as u64 * PAGE,
                            (p.0, fmt.canonical(MapAttrs::READ | MapAttrs::WRITE)),
                        );
                    }
                    prop_assert_eq!(t.linked(), before + len);
                } else {
                    prop_assert!(r.is_err());
                    prop_assert_eq!(t.linked(), before);
                }
            }
            Op::Unlink { tx, off, pages } => {
                let Some(t) = txs.get_mut(tx) else { continue };
                let off = off * PAGE;
                let len = pages * PAGE;
                let iova = t.iova().0 + off;
                let want_ok = off + len <= t.size()
                    && (0..pages).all(|i| model.contains_key(&(iova + i * PAGE)));
                // A block (2 MiB / 1 GiB leaf) cut by either end is refused:
                // never split under a live walker.
                let inside_block = |a: u64| {
                    d.page_table()
                        .and_then(|pt| pt.translate(DmaAddr(a)))
                        .is_some_and(|(_, _, h)| h > 0 && a % (1u64 << (12 + 9 * h)) != 0)
                };
                let partial = want_ok && (inside_block(iova) || inside_block(iova + len));
                let before = t.linked();
                let r = d.unlink(t, off, len);
                if partial {
                    let refused = matches!(r, Err(DmaError::PartialBlock { .. }));
                    prop_assert!(refused, "expected PartialBlock, got {:?}", r);
                    prop_assert_eq!(t.linked(), before);
                } else if want_ok {
                    prop_assert_eq!(r, Ok(len));
                    prop_assert_eq!(t.linked(), before - len);
                    for i in 0..pages {
                        model.remove(&(iova + i * PAGE));
                        changed.insert(iova + i * PAGE);
                    }
                } else {
                    prop_assert!(r.is_err());
                    prop_assert_eq!(t.linked(), before);
                }
            }
            Op::Sync => {
                let (syncs, publishes) = (be.syncs, be.publishes);
                d.sync(&mut be).unwrap();
                // One completion wait when something was unlinked; none
                // (the writes only published) after links alone.
                let waits = u64::from(!changed.is_empty());
                prop_assert_eq!(be.syncs, syncs + waits, "completion waits per sync");
                prop_assert_eq!(be.publishes, publishes + 1 - waits, "publishes per sync");
                for &p in &changed {
                    prop_assert!(
                        be.covered_since_last_sync(7, p, PAGE),
                        "unlinked page {:#x} not invalidated",
                        p
                    );
                }
                changed.clear();
                prop_assert!(!d.has_pending());
            }
            Op::Free { tx } => {
                if tx < txs.len() {
                    let t = txs.remove(tx);
                    let (s, e) = (t.iova().0, t.iova().0 + t.size());
                    let linked: Vec<u64> = model.range(s..e).map(|(k, _)| *k).collect();
                    prop_assert_eq!(linked.len() as u64 * PAGE, t.linked());
                    for k in linked {
                        model.remove(&k);
                        changed.insert(k);
                    }
                    d.free(t).unwrap();
                }
            }
        }
        // The software walk equals the model on every page of every live transaction.
        for t in &txs {
            for p in (t.iova().0..t.iova().0 + t.size()).step_by(PAGE as usize) {
                let got = d.translate(DmaAddr(p));
                let want = model.get(&p).map(|&(pa, a)| (PhysAddr(pa), a));
                prop_assert_eq!(got, want, "iova {:#x}", p);
            }
        }
    }
    for t in txs {
        d.free(t).unwrap();
    }
    d.sync(&mut be).unwrap();
    // Everything unlinked and synced: only the root table, the root's child
    // when the format keeps it (`kept_height`; the aperture lies below
    // 4 GiB: one root entry) are left.
    let pt = d.page_table().unwrap();
    prop_assert!(pt.table_pages() <= 1 + usize::from(pt.kept_height().is_some()));
    prop_assert_eq!(mem.live_pages(), pt.table_pages());
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Operations per case: 1..40, or 1..4 under Miri (every table access is
/// checked there, and one long case costs minutes).
fn ops_len() -> core::ops::Range<usize> {
    if cfg!(miri) { 1..4 } else { 1..40 }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn stage1_tables_follow_the_model(ops in proptest::collection::vec(op(), ops_len())) {
        run(ArmStage1, 4, &ops)?;
    }

    #[test]
    fn stage2_tables_follow_the_model(ops in proptest::collection::vec(op(), ops_len())) {
        run(ArmStage2, 3, &ops)?;
    }

    #[test]
    fn vtd_first_level_tables_follow_the_model(ops in proptest::collection::vec(op(), ops_len())) {
        run(VtdFirstLevel { fl1gp: true, haw: 48 }, 4, &ops)?;
    }

    #[test]
    fn vtd_tables_follow_the_model(ops in proptest::collection::vec(op(), ops_len())) {
        run(VtdSecondLevel::default(), 4, &ops)?;
    }
}
