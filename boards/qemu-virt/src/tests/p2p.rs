//! Peer-to-peer DMA through the host bridge: edu (the client) DMAs into the
//! RAM-backed BAR 2 of an ivshmem-plain (the provider) through the SMMU.
//!
//! The flow is `board_common::p2p`'s; here the SMMU's side of it: faults are
//! F_TRANSLATION events in the event queue, and a BAR's entry must be
//! Device-nGnRE.

use bare_iommu::DeviceId;
use bare_iommu::p2p::P2pRegistry;
use bare_iommu::pgtable::{MapAttrs, PteFormat};
use bare_iommu::smmuv3::{Smmu, SmmuConfig, Stage};
use board_common::p2p::{self, HOST_BRIDGE, P2pChecks, P2pTest, Reported, SEED};

use super::smmu::{
    Mem, PAGE, attached_domain, bring_up, detach_all, drain, end_domain, expect_translation_fault,
    fault_stage, teardown, with_preferred_stage,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::ivshmem::Ivshmem;

/// The SMMU's side of the P2P tests, for a domain of translation `stage`.
struct SmmuChecks {
    stage: Stage,
}

impl P2pChecks<Smmu<Mem>> for SmmuChecks {
    fn before_dma(&mut self, smmu: &mut Smmu<Mem>) {
        let _ = drain(smmu);
    }

    fn no_faults(&mut self, smmu: &mut Smmu<Mem>) -> Result<(), Fail> {
        let d = drain(smmu);
        check_eq!(d.report.events, 0, "events during the P2P DMA");
        Ok(())
    }

    fn blocked_write(
        &mut self,
        smmu: &mut Smmu<Mem>,
        dev: DeviceId,
        iova: u64,
        len: u32,
    ) -> Result<Reported, Fail> {
        let d = drain(smmu);
        check!(!d.report.overflow, "event queue overflowed");
        let end = iova + u64::from(len);
        expect_translation_fault(&d, dev.stream_id(), iova, end, self.stage)?;
        let first = d.events.first().or_fail("first event")?;
        Ok(Reported {
            records: d.report.events,
            first: fail_msg(format_args!("{first}")),
        })
    }

    fn bar_attrs(&self, _: &Smmu<Mem>, attrs: MapAttrs) -> Result<&'static str, Fail> {
        check!(
            attrs.contains(MapAttrs::MMIO),
            "{} entry for the BAR is not Device-nGnRE: {attrs:?}",
            if self.stage == Stage::Stage2 {
                "stage-2"
            } else {
                "stage-1"
            }
        );
        Ok(", Device-nGnRE")
    }
}

/// Which P2P test body to run.
enum Body {
    ThroughHostBridge,
    Refused,
}

/// edu DMAs a pattern through a ThruHostBridge mapping into ivshmem's BAR 2;
/// the CPU reads it back through the BAR; the SMMU's entry is Device-nGnRE.
/// After unlink + sync the same DMA is blocked (BAR bytes unchanged) and
/// reported as F_TRANSLATION with edu's StreamID and the IOVA.
pub fn p2p_dma_through_host_bridge_lands_in_peer_bar(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ctx.ivshmem.clone()?;
    let mut reg = p2p::registry(&iv, ctx.edu[0].id)?;
    reg.allow_host_bridge(HOST_BRIDGE)
        .or_fail("allow host bridge")?;
    run(ctx, &iv, &mut reg, 20, Body::ThroughHostBridge)
}

/// Without an allowed host bridge, linking the BAR is refused with
/// `P2pNotSupported` and nothing is mapped (edu's DMA to the IOVA faults,
/// BAR bytes unchanged); a transaction mixing host memory and the BAR is
/// refused with `MixedP2p` either way round.
pub fn p2p_without_an_allowed_host_bridge_is_refused(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ctx.ivshmem.clone()?;
    let mut reg = p2p::registry(&iv, ctx.edu[0].id)?;
    run(ctx, &iv, &mut reg, 21, Body::Refused)
}

/// Brings the SMMU up, runs `body` in a domain (ID `id`) of the stage the
/// SMMU prefers, shuts the SMMU down.
fn run(ctx: &Ctx, iv: &Ivshmem, reg: &mut P2pRegistry, id: u16, body: Body) -> Result<(), Fail> {
    let mut smmu = bring_up(ctx, SmmuConfig::default())?;
    with_preferred_stage!(smmu, |fmt| {
        in_domain(ctx, &mut smmu, fmt, id, iv, reg, &body)?;
    });
    teardown(&mut smmu, ctx)
}

fn in_domain<F: PteFormat>(
    ctx: &Ctx,
    smmu: &mut Smmu<Mem>,
    fmt: F,
    id: u16,
    iv: &Ivshmem,
    reg: &mut P2pRegistry,
    body: &Body,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let mut dom = attached_domain(smmu, ctx, fmt, id, edu)?;
    let format = dom.info().or_fail("info")?.format;
    let src = ctx.mem.dma_pages(1).or_fail("page")?;
    ctx.mem.fill_pattern(src, PAGE, SEED);
    let mut checks = SmmuChecks {
        stage: fault_stage(format),
    };
    let test = P2pTest {
        iommu: smmu,
        dom: &mut dom,
        edu,
        iv,
        reg,
        src,
    };
    match body {
        Body::ThroughHostBridge => p2p::dma_through_host_bridge(test, &mut checks)?,
        Body::Refused => {
            let host = ctx.mem.dma_pages(1).or_fail("page")?;
            p2p::refused_without_bridge(test, host, &mut checks)?
        }
    }
    detach_all(smmu, ctx)?;
    end_domain(smmu, dom)
}
