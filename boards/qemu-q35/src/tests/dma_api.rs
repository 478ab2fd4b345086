//! bare-iommu's dma-api adapter (`IommuDmaOp`) on VT-d, proven with a driver
//! written against `dma_api` alone ([`crate::edu_dma_api`]): edu 0 (source-id
//! 0x18) attached to an `AnyDomain` of this run's format, its DMA memory
//! from a `DeviceDma` whose op is the adapter.

use core::num::NonZeroU64;

use bare_iommu::adapters::dma_api::IommuDmaOp;
use bare_iommu::adapters::session::DomainSession;
use bare_iommu::vtd::Access;
use bare_iommu::{AnyDomain, Domain, IommuBackend, PhysAddr};
use dma_api::{DeviceDma, DmaCoherency, DmaConstraints, DmaDeviceInfo, DmaDomainId};

use super::vtd::{
    APERTURE_A, BoardFormat, Unit, attached_domain, expect_one_fault, first_level, no_faults,
    per_format, with_unit,
};
use crate::edu_dma_api::EduDma;
use crate::harness::{Ctx, Fail, OrFail};
use crate::memory::BoardMemory;

type Mem = &'static BoardMemory;

/// edu's default DMA mask: 28 bits.
const EDU_MASK: u64 = (1 << 28) - 1;
/// Bytes moved.
const LEN: usize = 3000;

/// The op `DeviceDma` needs `'static`; the session is lent per test.
static OP: IommuDmaOp = IommuDmaOp::new();

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(7) ^ 0xa5
}

per_format!(
    /// Bytes written into edu from a dma-api streaming mapping come back,
    /// through the IOMMU, into a dma-api contiguous buffer; that buffer,
    /// released through dma-api and then written by the device again (the
    /// driver kept its address), is blocked: its memory keeps the old bytes
    /// and the fault record names edu, that address and a write. Nothing
    /// stays live or lent afterwards.
    dma_api_edu_dma_lands_in_buffer_and_released_buffer_faults => with_unit edu_dma
);

fn edu_dma<F: BoardFormat>(ctx: &Ctx, vtd: &mut Unit) -> Result<(), Fail>
where
    AnyDomain<Mem>: From<Domain<F, Mem>>,
{
    let edu = &ctx.edu[0];
    let (id, bar) = (edu.id, edu.bar());
    let tables = ctx.mem.table_pages_in_use();
    let mut dom = AnyDomain::from(attached_domain::<F>(vtd, ctx, edu, 41, APERTURE_A)?);
    let mut released = None;
    let body = {
        let mut session = DomainSession::<_, _, _, 8>::new(&mut dom, &mut *vtd, ctx.mem, EDU_MASK);
        let r = OP
            .with(&mut session, || -> Result<(), Fail> {
                let info = DmaDeviceInfo::new(
                    DmaDomainId::Translated(NonZeroU64::new(41).or_fail("id")?),
                    DmaCoherency::Coherent,
                    DmaConstraints::new(EDU_MASK),
                );
                // SAFETY: edu 0's BAR 0, enabled by the board; this test is
                // its only driver.
                let drv = unsafe { EduDma::new(bar, DeviceDma::new(info, &OP)) };
                let mut out = [0u8; LEN];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = pattern(i);
                }
                narrate!("edu reads {} bytes from a dma-api streaming mapping", LEN);
                check_ok!(drv.write_buffer(0, &mut out), "edu <- streaming map");
                check!(OP.live() == Some(0), "streaming mapping left live");
                let buf = drv
                    .read_buffer(0, LEN)
                    .or_fail("edu -> contiguous buffer")?;
                let dma = buf.dma_addr();
                narrate!("edu wrote {} bytes to dma-api buffer at IOVA {}", LEN, dma);
                check!(
                    dma.as_u64() >= APERTURE_A.0 && dma.as_u64() < APERTURE_A.1,
                    "buffer IOVA {dma} outside the domain's aperture"
                );
                for (i, b) in buf.as_slice_cpu().iter().enumerate() {
                    check!(
                        *b == pattern(i),
                        "byte {i}: {b:#x}, expected {:#x}",
                        pattern(i)
                    );
                }
                let cpu = buf.as_ptr().as_ptr() as u64;
                drop(buf);
                check!(OP.live() == Some(0), "released buffer left live");
                // A different pattern in edu, then the stale write.
                out.iter_mut().for_each(|b| *b = 0x3c);
                check_ok!(drv.write_buffer(0, &mut out), "edu <- second pattern");
                narrate!("edu writes the released buffer's IOVA {} again", dma);
                check_ok!(drv.write_to(dma, 0, LEN), "edu -> released buffer");
                released = Some((dma.as_u64(), cpu));
                Ok(())
            })
            .or_fail("lend session")?;
        let left = session.teardown().or_fail("session teardown");
        r.and(left)
    };
    let checked = body.and_then(|()| {
        let (dma, cpu) = released.or_fail("no released buffer")?;
        let mut got = [0u8; 64];
        ctx.mem
            .read(PhysAddr(cpu), &mut got)
            .or_fail("read released buffer")?;
        // The page went back to the lender and may hold anything now (a
        // page table, say); only the stale write's bytes must be missing.
        check!(
            got != [0x3c; 64],
            "the write to the released buffer reached memory"
        );
        expect_one_fault(vtd, id, dma, &[F::unmapped(Access::Write)], Access::Write)?;
        no_faults(vtd)
    });
    let detached = vtd.detach(id).or_fail("detach");
    let ended = dom
        .teardown(&mut *vtd)
        .map_err(|(_, e)| e)
        .or_fail("domain teardown");
    checked.and(detached).and(ended)?;
    check!(
        ctx.mem.table_pages_in_use() == tables,
        "{} table pages lent after the test, {} before",
        ctx.mem.table_pages_in_use(),
        tables
    );
    check!(crate::heap::HEAP.live() == 0, "heap blocks left allocated");
    Ok(())
}
