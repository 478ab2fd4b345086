//! Reserved IOVA ranges on real VT-d tables (issue 12 item 3): a domain
//! never hands out an IOVA in the interrupt window 0xFEE0_0000–0xFEEF_FFFF,
//! and a firmware-style reserved region (an RMRR) installed as an identity
//! map carries a device's DMA to the same physical addresses.

use bare_iommu::firmware::ReservedRegion;
use bare_iommu::iova::FixedUse;
use bare_iommu::{DmaAddr, DmaError, IommuBackend, PAGE_SIZE, PhysAddr, VTD_INTERRUPT_WINDOW};

use super::vtd::{
    BoardFormat, PAGE, PAGE_U32, Unit, attached_domain, end_domain, first_level, free_pages,
    new_domain, no_faults, per_format, with_unit,
};
use crate::harness::{Ctx, Fail, OrFail};

const MB: u64 = 1 << 20;

/// A 16 MiB aperture around the window: first fit of 1 MiB ranges would
/// reach 0xFEE0_0000 after 14 of them; every range handed out avoids it, and
/// a fixed IOVA over it is refused.
fn interrupt_window_is_never_handed_out_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let (w0, w1) = VTD_INTERRUPT_WINDOW;
    let mut dom = new_domain::<F>(vtd, ctx, 5, (0xFE00_0000, 0xFF00_0000))?;
    let mut got: heapless::Vec<bare_iommu::IovaState, 16> = heapless::Vec::new();
    loop {
        match dom.try_alloc(MB, u64::MAX) {
            Ok(p) => {
                let t = p
                    .into_iova()
                    .or_fail("translated domain gave the direct path")?;
                let (s, e) = (t.iova().0, t.iova().0 + t.size());
                check!(
                    !(s < w1 && w0 < e),
                    "handed out [{s:#x}, {e:#x}) in the window"
                );
                if got.push(t).is_err() {
                    fail!("more than 16 ranges of 1 MiB in 16 MiB");
                }
            }
            Err(DmaError::IovaExhausted { .. }) => break,
            Err(e) => fail!("try_alloc: {e}"),
        }
    }
    check!(got.len() == 15, "{} ranges of 1 MiB, want 15", got.len());
    narrate!("15 MiB handed out around the window, none of it in [{w0:#x}, {w1:#x})");
    let r = dom.try_alloc_at(DmaAddr(0xFEE0_0000), PAGE_SIZE);
    check!(
        matches!(
            r,
            Err(DmaError::IovaReserved {
                reserved_start: 0xFEE0_0000,
                ..
            })
        ),
        "fixed IOVA in the window: {r:?}"
    );
    while let Some(t) = got.pop() {
        dom.free(t).map_err(|(_, e)| e).or_fail("free")?;
    }
    dom.sync(vtd).or_fail("sync")?;
    end_domain(vtd, dom)
}

per_format!(
    /// No IOVA of a VT-d domain is in the interrupt window.
    interrupt_window_is_never_handed_out => with_unit interrupt_window_is_never_handed_out_with
);

/// Two pages installed as an RMRR-style identity region (IOVA = physical
/// address) in one call: edu reads one and writes the other at their
/// physical addresses, through the unit, with no fault; an allocated
/// transaction of the same domain never lands on them.
fn rmrr_identity_region_dma_lands_with<F: BoardFormat>(
    ctx: &Ctx,
    vtd: &mut Unit,
) -> Result<(), Fail> {
    let edu = &ctx.edu[0];
    let pa = ctx.mem.dma_pages(2).or_fail("2 pages")?;
    // edu's DMA mask is 28 bits.
    check!(
        pa.0 + 2 * PAGE_SIZE <= 1 << 28,
        "DMA pages at {pa} are above edu's reach"
    );
    let mut dom = attached_domain::<F>(vtd, ctx, edu, 6, (0x10_0000, 1 << 32))?;
    let region = ReservedRegion {
        base: pa.0,
        len: 2 * PAGE_SIZE,
    };
    dom.install_identity_regions(&[region], vtd)
        .or_fail("install identity region")?;
    check!(
        dom.fixed_ranges()
            .iter()
            .any(|f| f.start == pa.0 && f.kind == FixedUse::Identity),
        "the region is not kept by the domain"
    );
    let (src, dst) = (pa, PhysAddr(pa.0 + PAGE_SIZE));
    ctx.mem.fill_pattern(src, PAGE, 0x3c).or_fail("pattern")?;
    ctx.mem.fill(dst, PAGE, 0).or_fail("clear")?;
    narrate!(
        "edu reads IOVA {:#x} and writes IOVA {:#x} (identity)",
        src.0,
        dst.0
    );
    edu.dma_from_ram(src.0, 0, PAGE_U32).or_fail("RAM -> edu")?;
    edu.dma_to_ram(dst.0, 0, PAGE_U32).or_fail("edu -> RAM")?;
    check_ok!(
        ctx.mem.check_pattern(dst, PAGE, 0x3c),
        "identity-mapped write"
    );
    no_faults(vtd)?;
    // A fixed IOVA over the region is refused; allocations go around it.
    let r = dom.try_alloc_at(DmaAddr(pa.0), PAGE_SIZE);
    check!(
        matches!(r, Err(DmaError::IovaInUse { .. })),
        "fixed IOVA over the identity region: {r:?}"
    );
    vtd.detach(edu.id).or_fail("detach")?;
    end_domain(vtd, dom)?;
    free_pages(ctx, pa, 2)
}

per_format!(
    /// An identity-mapped reserved region carries DMA at physical addresses.
    rmrr_identity_region_dma_lands => with_unit rmrr_identity_region_dma_lands_with
);
