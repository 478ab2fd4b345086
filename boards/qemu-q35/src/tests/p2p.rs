//! Peer-to-peer DMA through the host bridge: edu (the client) DMAs into the
//! RAM-backed BAR 2 of an ivshmem-plain (the provider) through VT-d.
//!
//! The flow is `board_common::p2p`'s; here VT-d's side of it: a blocked DMA
//! leaves one fault record, and the BAR's entry is not snooped (the SNP bit
//! stays clear, which only shows in a second-level entry when ECAP.SC is
//! set — QEMU's is not).

use bare_iommu::p2p::P2pRegistry;
use bare_iommu::vtd::{Access, FaultReason};
use bare_iommu::{DeviceId, IommuBackend, MapAttrs, PhysAddr};
use board_common::p2p::{self, HOST_BRIDGE, P2pChecks, P2pTest, Reported, SEED};

use super::vtd::{
    APERTURE_A, BoardFormat, PAGE, Unit, attached_domain, end_domain, expect_one_fault,
    first_level, free_pages, no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::ivshmem::Ivshmem;

/// VT-d's side of the P2P tests.
struct VtdChecks {
    /// The fault reason of a write to an unmapped page in this run's format.
    unmapped_write: FaultReason,
    /// Whether domains use first-level tables (which have no SNP bit).
    first_level: bool,
}

impl P2pChecks<Unit> for VtdChecks {
    /// Nothing to drop: `with_unit` starts with empty fault records and
    /// every check drains them.
    fn before_dma(&mut self, _: &mut Unit) {}

    fn no_faults(&mut self, vtd: &mut Unit) -> Result<(), Fail> {
        no_faults(vtd)
    }

    fn blocked_write(
        &mut self,
        vtd: &mut Unit,
        dev: DeviceId,
        iova: u64,
        _len: u32,
    ) -> Result<Reported, Fail> {
        let r = expect_one_fault(vtd, dev, iova, &[self.unmapped_write], Access::Write)?;
        Ok(Reported {
            records: 1,
            first: fail_msg(format_args!("{r}")),
        })
    }

    fn bar_attrs(&self, vtd: &Unit, attrs: MapAttrs) -> Result<&'static str, Fail> {
        if vtd.features().sc && !self.first_level {
            check!(
                attrs.contains(MapAttrs::MMIO),
                "entry for the BAR is snooped: {attrs:?}"
            );
        }
        Ok("")
    }
}

per_format!(
    /// edu DMAs a pattern through a ThruHostBridge mapping into ivshmem's
    /// BAR 2; the CPU reads it back through the BAR. After unlink + sync the
    /// same DMA is blocked (BAR bytes unchanged) and the fault record names
    /// edu's source-id, the IOVA's page, a write and the not-present reason.
    p2p_dma_through_host_bridge_lands_in_peer_bar => through_host_bridge
);

fn through_host_bridge<F: BoardFormat>(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ctx.ivshmem.clone()?;
    let mut reg = p2p::registry(&iv, ctx.edu[0].id)?;
    reg.allow_host_bridge(HOST_BRIDGE)
        .or_fail("allow host bridge")?;
    in_domain::<F>(ctx, &iv, &mut reg, 20, false)
}

per_format!(
    /// Without an allowed host bridge, linking the BAR is refused with
    /// `P2pNotSupported` and nothing is mapped (edu's DMA to the IOVA faults,
    /// BAR bytes unchanged); a transaction mixing host memory and the BAR is
    /// refused with `MixedP2p` either way round.
    p2p_without_an_allowed_host_bridge_is_refused => refused
);

fn refused<F: BoardFormat>(ctx: &mut Ctx) -> Result<(), Fail> {
    let iv = ctx.ivshmem.clone()?;
    let mut reg = p2p::registry(&iv, ctx.edu[0].id)?;
    in_domain::<F>(ctx, &iv, &mut reg, 21, true)
}

/// Runs the P2P test body (`refused` or through the host bridge) in a
/// domain (ID `id`) edu 0 is attached to, with a source page holding the
/// pattern; frees the pages after.
fn in_domain<F: BoardFormat>(
    ctx: &Ctx,
    iv: &Ivshmem,
    reg: &mut P2pRegistry,
    id: u16,
    refused: bool,
) -> Result<(), Fail> {
    with_unit(ctx, |vtd| {
        let edu = &ctx.edu[0];
        let mut dom = attached_domain::<F>(vtd, ctx, edu, id, APERTURE_A)?;
        let src = ctx.mem.dma_pages(1).or_fail("page")?;
        ctx.mem
            .fill_pattern(src, PAGE, SEED)
            .or_fail("fill source")?;
        let mut checks = VtdChecks {
            unmapped_write: F::unmapped(Access::Write),
            first_level: first_level(ctx),
        };
        let test = P2pTest {
            iommu: &mut *vtd,
            dom: &mut dom,
            edu,
            iv,
            reg,
            src,
        };
        let mut host: Option<PhysAddr> = None;
        if refused {
            let page = ctx.mem.dma_pages(1).or_fail("page")?;
            host = Some(page);
            p2p::refused_without_bridge(test, page, &mut checks)?;
        } else {
            p2p::dma_through_host_bridge(test, &mut checks)?;
        }
        vtd.detach(edu.id).or_fail("detach")?;
        end_domain(vtd, dom)?;
        free_pages(ctx, src, 1)?;
        match host {
            Some(page) => free_pages(ctx, page, 1),
            None => Ok(()),
        }
    })
}
