//! Tests of the board itself: edu DMA with the SMMU as reset left it, the
//! SMMU's ID registers, and the memory lender.

use bare_iommu::addr::PAGE_SIZE;
use bare_iommu::{PhysAddr, TableMemory};

use crate::harness::{Ctx, Fail, OrFail, fail_msg};

/// SMMUv3 register offsets this file reads (SMMUv3 spec §6.3).
const SMMU_IDR0: usize = 0x00;
const SMMU_IDR1: usize = 0x04;
const SMMU_IDR5: usize = 0x14;
const SMMU_CR0: usize = 0x20;
const SMMU_GBPA: usize = 0x44;

fn smmu_read(ctx: &Ctx, offset: usize) -> u32 {
    // SAFETY: `smmu_base` is the SMMU's register page 0 (MMU off: identity);
    // the offsets above are ID/control registers, whose reads have no side effects.
    unsafe { ((ctx.smmu_base + offset) as *const u32).read_volatile() }
}

const PAGE: usize = PAGE_SIZE as usize;

/// Out of reset the SMMU is disabled and GBPA lets every stream through, so
/// edu's DMA addresses are physical addresses: a pattern goes RAM → edu →
/// RAM and lands exactly where asked, on both edu devices.
pub fn edu_dma_lands_in_ram_without_translation(ctx: &mut Ctx) -> Result<(), Fail> {
    let cr0 = smmu_read(ctx, SMMU_CR0);
    let gbpa = smmu_read(ctx, SMMU_GBPA);
    check!(
        cr0 & 1 == 0 && gbpa & (1 << 20) == 0,
        "SMMU not in reset bypass (CR0={cr0:#x}, GBPA={gbpa:#x}): run this test before SMMU tests"
    );
    narrate!("SMMU disabled, GBPA={gbpa:#x}: DMA addresses are physical");
    for (n, edu) in ctx.edu.iter().enumerate() {
        check_eq!(
            edu.ident() & 0xff,
            0xed,
            "{} identification register",
            edu.id
        );
        let seed = 0x10 + n as u8;
        let src = ctx.mem.dma_pages(1).or_fail("source page")?;
        let dst = ctx.mem.dma_pages(1).or_fail("destination page")?;
        ctx.mem.fill_pattern(src, PAGE, seed);

        // Whole page: RAM → edu buffer → another RAM page.
        edu.dma_from_ram(src.get(), 0, PAGE as u32)
            .or_fail("RAM -> edu")?;
        edu.dma_to_ram(dst.get(), 0, PAGE as u32)
            .or_fail("edu -> RAM")?;
        check_ok!(
            ctx.mem.check_pattern(dst, PAGE, seed),
            "{}: page copied through edu differs",
            edu.id
        );
        narrate!("{}: 4 KiB {src} -> edu -> {dst}: bytes match", edu.id);

        // Offsets on both sides, and nothing written outside the target range.
        ctx.mem.fill(dst, PAGE, 0);
        let (from, buf_off, to, len) = (0x100usize, 0x800u32, 0x40usize, 0x200usize);
        let src_part = PhysAddr(src.get() + from as u64);
        let dst_part = PhysAddr(dst.get() + to as u64);
        edu.dma_from_ram(src_part.get(), buf_off, len as u32)
            .or_fail("RAM -> edu at offset")?;
        edu.dma_to_ram(dst_part.get(), buf_off, len as u32)
            .or_fail("edu -> RAM at offset")?;
        for i in 0..len {
            let got = ctx.mem.byte(PhysAddr(dst_part.get() + i as u64));
            let expected = crate::memory::pattern(seed, from + i);
            check!(
                got == expected,
                "{}: byte {i} of the offset copy is {got:#04x}, expected {expected:#04x}",
                edu.id
            );
        }
        check_ok!(
            ctx.mem.check_filled(dst, to, 0),
            "{}: DMA wrote before its target",
            edu.id
        );
        let after = PhysAddr(dst_part.get() + len as u64);
        check_ok!(
            ctx.mem.check_filled(after, PAGE - to - len, 0),
            "{}: DMA wrote past its target",
            edu.id
        );
        narrate!("{}: {len:#x} bytes at offsets land exactly", edu.id);
    }
    Ok(())
}

/// The SMMU answers at `smmu_base` with sane ID registers: at least one
/// translation stage, AArch64 tables, 4 KiB granule, StreamIDs wide enough
/// for both edu devices.
pub fn smmu_registers_readable(ctx: &mut Ctx) -> Result<(), Fail> {
    let idr0 = smmu_read(ctx, SMMU_IDR0);
    let idr1 = smmu_read(ctx, SMMU_IDR1);
    let idr5 = smmu_read(ctx, SMMU_IDR5);
    let (s2p, s1p) = (idr0 & 1 != 0, idr0 & 2 != 0);
    narrate!("IDR0={idr0:#010x}: stage 1 {s1p}, stage 2 {s2p}");
    check!(s1p || s2p, "IDR0={idr0:#x} has neither S1P nor S2P");
    let ttf = (idr0 >> 2) & 3;
    check!(ttf & 2 != 0, "IDR0.TTF={ttf:#b}: no AArch64 tables");
    check!(idr5 & (1 << 4) != 0, "IDR5={idr5:#x}: no 4 KiB granule");
    let sidsize = idr1 & 0x3f;
    let widest = ctx.edu.iter().map(|e| e.id.stream_id()).max().unwrap_or(0);
    check!(
        widest >> sidsize == 0,
        "IDR1.SIDSIZE={sidsize} cannot hold StreamID {widest:#x}"
    );
    Ok(())
}

/// The table lender hands out zeroed, aligned blocks, takes them back, and
/// hands the same memory out again (so tests can run for ever without
/// running dry); the DMA page pool does the same.
pub fn memory_lender_frees_and_reuses(ctx: &mut Ctx) -> Result<(), Fail> {
    let mem = ctx.mem;
    let before = mem.table_pages_in_use();

    let a = mem.alloc_zeroed(1).or_fail("one page")?;
    check!(a.is_page_aligned(), "{a} not 4 KiB aligned");
    check_ok!(mem.check_filled(a, PAGE, 0), "fresh page not zeroed");
    mem.fill_pattern(a, PAGE, 7);
    // SAFETY: `a` came from alloc_zeroed(1) and nothing else holds it.
    unsafe { mem.free(a, 1) };
    let b = mem.alloc_zeroed(1).or_fail("page after free")?;
    check!(b == a, "freed page {a} not reused: got {b}");
    check_ok!(mem.check_filled(b, PAGE, 0), "reused page not zeroed again");
    // SAFETY: `b` came from alloc_zeroed(1).
    unsafe { mem.free(b, 1) };

    // Blocks are aligned to their size rounded up to a power of two.
    let q = mem.alloc_zeroed(3).or_fail("three pages")?;
    check!(
        q.is_aligned(4 * PAGE_SIZE),
        "3-page block {q} not 16 KiB aligned"
    );
    // SAFETY: `q` came from alloc_zeroed(3).
    unsafe { mem.free(q, 3) };
    let big = mem.alloc_zeroed(300).or_fail("300 pages")?;
    check!(
        big.is_aligned(2 << 20),
        "300-page block {big} not 2 MiB aligned"
    );
    // SAFETY: `big` came from alloc_zeroed(300).
    unsafe { mem.free(big, 300) };

    // Exhaust the pool page by page, give everything back, then take the
    // whole free space again as one block.
    let free_pages = mem.table_pool_pages() - before;
    let mut held: heapless::Vec<PhysAddr, 2048> = heapless::Vec::new();
    while let Some(p) = mem.alloc_zeroed(1) {
        if held.push(p).is_err() {
            fail!(
                "pool handed out more than its {} pages",
                mem.table_pool_pages()
            );
        }
    }
    check_eq!(held.len(), free_pages, "pages handed out before exhaustion");
    for &p in &held {
        // SAFETY: each came from alloc_zeroed(1) and is freed once.
        unsafe { mem.free(p, 1) };
    }
    check_eq!(
        mem.table_pages_in_use(),
        before,
        "pages in use after freeing all"
    );
    if before == 0 {
        let all = mem.table_pool_pages();
        let whole = mem.alloc_zeroed(all).or_fail("whole pool after freeing")?;
        check!(
            whole.is_aligned(all as u64 * PAGE_SIZE),
            "{all}-page block {whole} not aligned to its size"
        );
        // SAFETY: `whole` came from alloc_zeroed(all).
        unsafe { mem.free(whole, all) };
    }
    narrate!("table pool: {free_pages} pages out, all back, reused");

    let d = mem.dma_pages(2).or_fail("two DMA pages")?;
    check!(
        d.is_aligned(2 * PAGE_SIZE),
        "DMA block {d} not 8 KiB aligned"
    );
    mem.free_dma_pages(d, 2);
    let e = mem.dma_pages(2).or_fail("DMA pages after free")?;
    check!(e == d, "freed DMA pages {d} not reused: got {e}");
    mem.free_dma_pages(e, 2);
    check_eq!(mem.dma_pages_in_use(), 0, "DMA pages in use after freeing");

    // Byte access helpers round-trip, and the block region is 2 MiB aligned.
    let (block, size) = mem.block_region();
    check!(
        block.is_aligned(2 << 20) && size >= 4 << 20,
        "block region {block}+{size:#x} not 2 MiB aligned / 4 MiB long"
    );
    let msg = *b"bare-iommu";
    let at = PhysAddr(block.get() + size - PAGE_SIZE + 3);
    mem.write(at, &msg);
    let mut back = [0u8; 10];
    mem.read(at, &mut back);
    check_eq!(back, msg, "bytes read back from {at}");
    Ok(())
}

/// The DTB's `iommu-map` on the PCI host bridge, decoded by
/// `bare_iommu::firmware::devicetree`, sends each device's requester ID to the
/// SMMUv3 node (by phandle, whose `#iommu-cells` is 1) as the StreamID the
/// tests program: on `virt` the map is the identity over all 65536 RIDs.
pub fn iommu_map_gives_each_device_its_stream_id(ctx: &mut Ctx) -> Result<(), Fail> {
    use bare_iommu::firmware::devicetree::IommuTarget;
    let (map, phandle) = dt_iommu_map()?;
    let mut ids: heapless::Vec<bare_iommu::DeviceId, 4> = heapless::Vec::new();
    let _ = ids.push(ctx.edu[0].id);
    let _ = ids.push(ctx.edu[1].id);
    if let Ok(e) = &ctx.bridged {
        let _ = ids.push(e.id);
    }
    if let Ok(v) = &ctx.virtio {
        let _ = ids.push(v.id);
    }
    for dev in ids {
        let got = map
            .map(u32::from(dev.rid()))
            .map_err(|e| fail_msg(format_args!("iommu-map of {dev}: {e}")))?;
        narrate!("iommu-map: {dev} (RID {:#06x}) -> {got:x?}", dev.rid());
        let want = IommuTarget {
            phandle,
            id: dev.stream_id(),
        };
        check!(
            got == Some(want),
            "{dev}: iommu-map gives {got:x?}, expected {want:x?}"
        );
    }
    // A RID behind a bridge (bus 1) maps too.
    let behind = map.map(0x100).map_err(|e| fail_msg(format_args!("{e}")))?;
    check!(
        behind == Some(IommuTarget { phandle, id: 0x100 }),
        "RID 0x100 -> {behind:x?}"
    );
    Ok(())
}

/// The host bridge's `iommu-map` (with its mask) from the DTB, and the
/// SMMU's phandle (checked to take one-cell specifiers).
pub(super) fn dt_iommu_map()
-> Result<(bare_iommu::firmware::devicetree::IommuMap<'static>, u32), Fail> {
    // SAFETY: QEMU placed the DTB below the image (link.ld), in RAM that
    // nothing else uses or writes.
    let fdt = unsafe { crate::fdt::Fdt::at(crate::fdt::VIRT_DTB) }
        .map_err(|e| fail_msg(format_args!("DTB: {e:?}")))?;
    let prop = |c, p| {
        fdt.property(c, p)
            .map_err(|e| fail_msg(format_args!("{c} {p}: {e:?}")))
    };
    let map = prop("pci-host-ecam-generic", "iommu-map")?;
    let mask = fdt.property("pci-host-ecam-generic", "iommu-map-mask").ok();
    let cell = |b: &[u8]| b.try_into().map(u32::from_be_bytes).ok();
    let phandle = cell(prop("arm,smmu-v3", "phandle")?)
        .ok_or_else(|| fail_msg(format_args!("SMMU phandle is not one cell")))?;
    let cells = cell(prop("arm,smmu-v3", "#iommu-cells")?);
    check!(cells == Some(1), "SMMU #iommu-cells {cells:?}, expected 1");
    let map = bare_iommu::firmware::devicetree::IommuMap::new(map, mask)
        .map_err(|e| fail_msg(format_args!("iommu-map: {e}")))?;
    Ok((map, phandle))
}
