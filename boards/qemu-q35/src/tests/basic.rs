//! Board self-tests: the devices, the VT-d unit's identity and the lender work
//! before any IOMMU code runs.

use crate::harness::{Ctx, Fail, OrFail, fail_msg};
use crate::memory::{SUPERPAGE_REGION_LEN, pattern};
use bare_iommu::DeviceId;
use bare_iommu::{PAGE_SIZE, PhysAddr, TableMemory};
use tock_registers::interfaces::Readable;
use tock_registers::registers::ReadOnly;
use tock_registers::{register_bitfields, register_structs};

const PAGE: usize = PAGE_SIZE as usize;

register_bitfields! [u64,
    /// Capability register (VT-d 4.1 §11.4.2), the fields checked here.
    CAP [
        /// Caching mode.
        CM OFFSET(7) NUMBITS(1) [],
        /// Supported adjusted guest address widths: bit 1 = 39-bit (3-level),
        /// bit 2 = 48-bit (4-level).
        SAGAW OFFSET(8) NUMBITS(5) [],
        /// Maximum guest address width − 1.
        MGAW OFFSET(16) NUMBITS(6) []
    ],
    /// Extended capability register (VT-d 4.1 §11.4.3).
    ECAP [
        /// Page-walk coherency.
        C OFFSET(0) NUMBITS(1) [],
        /// Queued invalidation.
        QI OFFSET(1) NUMBITS(1) []
    ]
];

register_bitfields! [u32,
    /// Global status (VT-d 4.1 §11.4.5).
    GSTS [
        /// Translation enable status.
        TES OFFSET(31) NUMBITS(1) []
    ]
];

register_structs! {
    /// The identification registers at the start of a VT-d unit (§11.4).
    VtdIdRegs {
        (0x00 => ver: ReadOnly<u32>),
        (0x04 => _reserved0),
        (0x08 => cap: ReadOnly<u64, CAP::Register>),
        (0x10 => ecap: ReadOnly<u64, ECAP::Register>),
        (0x18 => _reserved1),
        (0x1c => gsts: ReadOnly<u32, GSTS::Register>),
        (0x20 => @END),
    }
}

fn vtd_regs(ctx: &Ctx) -> &'static VtdIdRegs {
    // SAFETY: vtd_base is the DRHD register base from the DMAR, identity-mapped
    // uncached by the boot code; these registers are read-only.
    unsafe { &*(ctx.vtd_base as *const VtdIdRegs) }
}

/// With translation off (reset state), each edu's DMA reaches RAM at the
/// physical address it is given, in both directions, and only the bytes asked for.
pub fn edu_dma_lands_in_ram_without_translation(ctx: &mut Ctx) -> Result<(), Fail> {
    check!(
        !vtd_regs(ctx).gsts.is_set(GSTS::TES),
        "VT-d translation is already on (GSTS={:#x})",
        vtd_regs(ctx).gsts.get()
    );
    for (n, edu) in ctx.edu.iter().enumerate() {
        let seed = 0x11 + n as u8 * 0x40;
        let src = ctx.mem.dma_pages(1).or_fail("dma page for source")?;
        let dst = ctx.mem.dma_pages(1).or_fail("dma page for destination")?;
        ctx.mem
            .fill_pattern(src, PAGE, seed)
            .or_fail("fill source")?;
        ctx.mem.fill(dst, PAGE, 0xaa).or_fail("fill destination")?;

        narrate!("edu {}: RAM {} -> device buffer, 4 KiB", edu.id, src);
        edu.dma_from_ram(src.0, 0, PAGE as u32)
            .or_fail("RAM -> edu")?;
        narrate!("edu {}: device buffer -> RAM {}, 4 KiB", edu.id, dst);
        edu.dma_to_ram(dst.0, 0, PAGE as u32)
            .or_fail("edu -> RAM")?;
        check_ok!(ctx.mem.compare(src, dst, PAGE), "edu {}: full page", edu.id);
        check_ok!(
            ctx.mem.check_pattern(src, PAGE, seed),
            "edu {}: reading the source changed it",
            edu.id
        );

        // A 64-byte piece from buffer offset 0x80 to page offset 0x100 lands
        // there and nowhere else.
        ctx.mem
            .fill(dst, PAGE, 0x55)
            .or_fail("refill destination")?;
        let piece = PhysAddr(dst.0 + 0x100);
        edu.dma_to_ram(piece.0, 0x80, 64)
            .or_fail("edu -> RAM, 64 bytes")?;
        let mut got = [0u8; 64];
        ctx.mem.read(piece, &mut got).or_fail("read piece")?;
        for (i, &b) in got.iter().enumerate() {
            check!(
                b == pattern(seed, 0x80 + i),
                "edu {}: piece byte {i} is {b:#04x}, expected {:#04x}",
                edu.id,
                pattern(seed, 0x80 + i)
            );
        }
        check_ok!(
            ctx.mem.check_fill(dst, 0x100, 0x55),
            "edu {}: DMA wrote before its target",
            edu.id
        );
        check_ok!(
            ctx.mem
                .check_fill(PhysAddr(dst.0 + 0x140), PAGE - 0x140, 0x55),
            "edu {}: DMA wrote past its target",
            edu.id
        );

        // write_buf / read_buf go through the bounce page the same way.
        let msg = *b"bare-iommu edu bounce check";
        edu.write_buf(0x200, &msg).or_fail("write_buf")?;
        let mut back = [0u8; 27];
        edu.read_buf(0x200, &mut back).or_fail("read_buf")?;
        check!(back == msg, "edu {}: read_buf returned {:?}", edu.id, back);

        check!(ctx.mem.free_dma_pages(src, 1), "free source page");
        check!(ctx.mem.free_dma_pages(dst, 1), "free destination page");
    }
    Ok(())
}

/// The DRHD from the DMAR answers with QEMU's VT-d identity: VER 1.0, and the
/// address widths / caching mode this QEMU configuration asked for.
pub fn vtd_registers_readable(ctx: &mut Ctx) -> Result<(), Fail> {
    let r = vtd_regs(ctx);
    let (ver, cap, ecap) = (r.ver.get(), r.cap.get(), r.ecap.get());
    narrate!(
        "VT-d at {:#x}: VER={ver:#x} CAP={cap:#018x} ECAP={ecap:#x}",
        ctx.vtd_base
    );
    check!(ver == 0x10, "VER is {ver:#x}, expected 0x10");
    let aw39 = ctx.arg_value("aw") == Some("39");
    let (sagaw, mgaw) = if aw39 { (0b010, 39) } else { (0b110, 48) };
    check!(
        r.cap.read(CAP::SAGAW) == sagaw,
        "CAP.SAGAW is {:#b}, expected {sagaw:#b} (CAP={cap:#x})",
        r.cap.read(CAP::SAGAW)
    );
    check!(
        r.cap.read(CAP::MGAW) + 1 == mgaw,
        "CAP.MGAW+1 is {}, expected {mgaw}",
        r.cap.read(CAP::MGAW) + 1
    );
    let cm = ctx.arg("cm");
    check!(
        r.cap.is_set(CAP::CM) == cm,
        "CAP.CM is {}, expected {} from the command line",
        r.cap.is_set(CAP::CM),
        cm
    );
    check!(r.ecap.is_set(ECAP::QI), "ECAP.QI is clear (ECAP={ecap:#x})");
    check!(!r.ecap.is_set(ECAP::C), "ECAP.C is set (ECAP={ecap:#x})");
    Ok(())
}

/// The table lender hands out zeroed, aligned blocks, takes them back, lends
/// the same memory again, runs dry honestly, and rejects a free it never lent.
pub fn memory_lender_frees_and_reuses(ctx: &mut Ctx) -> Result<(), Fail> {
    let mem = ctx.mem;
    let before = mem.table_pages_in_use();

    let a = mem.alloc_zeroed(1).or_fail("alloc 1 page")?;
    check!(a.is_page_aligned(), "page {a} not 4 KiB aligned");
    mem.fill_pattern(a, PAGE, 7).or_fail("dirty page")?;
    // SAFETY: `a` is exactly one allocation of 1 page and no IOMMU uses it.
    unsafe { mem.free(a, 1) };
    check!(
        mem.table_pages_in_use() == before,
        "free did not give the page back"
    );
    let b = mem.alloc_zeroed(1).or_fail("alloc 1 page again")?;
    check!(b == a, "first-fit lender gave {b} after freeing {a}");
    check_ok!(mem.check_fill(b, PAGE, 0), "reused page not zeroed");

    // Blocks are aligned to their size rounded up to a power of two.
    let q = mem.alloc_zeroed(3).or_fail("alloc 3 pages")?;
    check!(
        q.is_aligned(4 * PAGE_SIZE),
        "3-page block {q} not 16 KiB aligned"
    );
    let big = mem.alloc_zeroed(512).or_fail("alloc 2 MiB")?;
    check!(
        big.is_aligned(512 * PAGE_SIZE),
        "2 MiB block {big} not 2 MiB aligned"
    );
    // SAFETY: each is exactly one earlier allocation, unused by any IOMMU.
    unsafe {
        mem.free(q, 3);
        mem.free(big, 512);
        mem.free(b, 1);
    }
    check!(
        mem.table_pages_in_use() == before,
        "blocks not all given back"
    );

    // Exhaust the pool one page at a time, then give everything back.
    let (start, end) = mem.table_pool_range();
    let free_pages = (end - start) as usize / PAGE - before;
    let mut got: heapless::Vec<PhysAddr, 2048> = heapless::Vec::new();
    while let Some(p) = mem.alloc_zeroed(1) {
        check!(p.0 >= start && p.0 < end, "page {p} outside the pool");
        if got.push(p).is_err() {
            fail!("lender handed out more pages than its pool holds");
        }
    }
    let count = got.len();
    for p in got {
        // SAFETY: one-page allocations from the loop above.
        unsafe { mem.free(p, 1) };
    }
    check!(
        count == free_pages,
        "lent {count} pages, pool had {free_pages} free"
    );
    check!(
        mem.table_pages_in_use() == before,
        "pages lost after the exhaust cycle"
    );

    // A free that matches no allocation is refused and counted.
    let x = mem.alloc_zeroed(1).or_fail("alloc 1 page for a bad free")?;
    // SAFETY: deliberately the wrong size; the lender must only count it.
    unsafe { mem.free(x, 2) };
    check!(
        mem.take_bad_frees() == 1,
        "free with the wrong size not detected"
    );
    check!(
        mem.table_pages_in_use() == before + 1,
        "bad free changed the pool"
    );
    // SAFETY: now exactly the allocation.
    unsafe { mem.free(x, 1) };
    check!(mem.table_pages_in_use() == before, "page not given back");

    // DMA pages: distinct, reusable, and a double free is refused.
    let dma_before = mem.dma_pages_in_use();
    let d1 = mem.dma_pages(1).or_fail("dma page 1")?;
    let d2 = mem.dma_pages(1).or_fail("dma page 2")?;
    check!(d1 != d2, "two DMA pages at the same address {d1}");
    check!(mem.free_dma_pages(d1, 1), "free dma page 1");
    check!(
        !mem.free_dma_pages(d1, 1),
        "double free of a DMA page accepted"
    );
    let d3 = mem.dma_pages(1).or_fail("dma page 3")?;
    check!(d3 == d1, "freed DMA page {d1} not reused (got {d3})");
    check!(
        mem.free_dma_pages(d2, 1) && mem.free_dma_pages(d3, 1),
        "free dma pages"
    );
    check!(
        mem.dma_pages_in_use() == dma_before,
        "DMA pages not all given back"
    );

    let sp = mem.superpage_region();
    check!(
        sp.is_aligned(2 << 20),
        "superpage region {sp} not 2 MiB aligned"
    );
    mem.fill(sp, SUPERPAGE_REGION_LEN, 0x3c)
        .or_fail("fill superpage region")?;
    Ok(())
}

/// The DMAR that QEMU built, decoded by `bare_iommu::firmware::dmar`, names
/// the unit the board drives for every device the tests use, and no unit for
/// a slot with nothing in it (QEMU 10 lists devices; no INCLUDE_PCI_ALL).
pub fn dmar_scopes_give_each_device_its_unit(ctx: &mut Ctx) -> Result<(), Fail> {
    use bare_iommu::firmware::dmar::Dmar;
    let dmar = Dmar::new(ctx.dmar).map_err(|e| fail_msg(format_args!("DMAR: {e}")))?;
    let ecam = &ctx.ecam;
    let bridges = |_seg: u16, bus: u8, devfn: u8| ecam.bridge_buses(bus, devfn);
    let mut devices: heapless::Vec<DeviceId, 3> = heapless::Vec::new();
    let _ = devices.push(ctx.edu[0].id);
    let _ = devices.push(ctx.edu[1].id);
    if let Ok(v) = &ctx.virtio {
        let _ = devices.push(v.id);
    }
    for dev in devices {
        let unit = dmar
            .unit_for(dev, &bridges)
            .map_err(|e| fail_msg(format_args!("scope of {dev}: {e}")))?;
        let base = unit.map(|u| u.register_base);
        narrate!(
            "DMAR: {dev} (source-id {:#06x}) -> DRHD {base:x?}",
            dev.source_id()
        );
        check!(
            base == Some(ctx.vtd_base as u64),
            "{dev}: owning DRHD {base:x?}, expected {:#x}",
            ctx.vtd_base
        );
        let rmrrs = dmar.reserved_regions_for(dev, &bridges).count();
        check!(rmrrs == 0, "{dev}: {rmrrs} RMRRs where QEMU emits none");
    }
    let empty = DeviceId::new(0, 0, 0x1e, 0).unwrap_or(ctx.edu[0].id);
    let unit = dmar.unit_for(empty, &bridges);
    check!(
        matches!(unit, Ok(None)),
        "empty slot {empty} has a unit: {:?}",
        unit.map(|u| u.map(|u| u.register_base))
    );
    Ok(())
}
