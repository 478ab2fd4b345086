//! The contenders: bare-iommu's two-step API over each of its formats, and
//! the crates a user would write the same tables with instead. Every one
//! does the same work on the same lent memory ([`Arena`]) and the same
//! addresses.

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{
    Constraints, El1And0, MemoryRegion, Stage2, TranslationRegime, VaRange,
};
use bare_iommu::pgtable::PteFormat;
use bare_iommu::{
    Attachment, BackendError, DeviceId, DmaAddr, DmaDirection, Domain, DomainConfig, DomainInfo,
    IommuBackend, IovaState, MapAttrs, PhysAddr,
};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size1GiB, Size4KiB,
};

use crate::arena::{Arena, ArenaRef};

/// Where every contender's mappings start (ours: the aperture's first IOVA).
pub const VA_BASE: u64 = 1 << 30;
/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// Output address of the 1 GiB run (1 GiB aligned, so blocks fit).
pub const PA_1G: u64 = 0x40_0000_0000;
/// Output address of a contiguous run of pages: 4 KiB past a 2 MiB
/// boundary, so no block can be used and every page takes a descriptor.
pub const PA_RUN: u64 = 0x20_0000_1000;

/// Output address of the `i`-th separate 4 KiB page: every other page of a
/// region, so no two are contiguous and nobody can merge them.
#[inline]
pub fn pa_4k(i: u64) -> u64 {
    0x10_0000_0000 + 2 * i * PAGE
}

/// A backend that does nothing: the host has no IOMMU to wait on.
pub struct NoopBackend;

impl IommuBackend for NoopBackend {
    fn attach(&mut self, _: DeviceId, _: Attachment) -> Result<(), BackendError> {
        Ok(())
    }
    fn invalidate(
        &mut self,
        _: &DomainInfo,
        _: DmaAddr,
        _: u64,
        _: bool,
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn invalidate_domain(&mut self, _: &DomainInfo) -> Result<(), BackendError> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The work every contender does, each on a fresh table.
pub trait Contender<'a>: Sized {
    /// A fresh, empty table in `arena`.
    fn new(arena: &'a Arena) -> Self;
    /// Maps `n` separate 4 KiB pages at `VA_BASE + i * 4 KiB` → `pa_4k(i)`,
    /// one call per page, then makes them visible once.
    fn link_4k(&mut self, n: u64);
    /// Unmaps the `n` pages of `link_4k`, one call per page, then one sync.
    fn unlink_4k(&mut self, n: u64);
    /// Maps `n` physically contiguous pages at `PA_RUN` at `VA_BASE` with as
    /// few calls as the API allows (4 KiB descriptors only), then one sync.
    fn link_run(&mut self, n: u64);
    /// Maps the same `n` separate pages as `link_4k` (`pa_4k(i)`) as one
    /// scatter list, with as few calls as the API allows, then one sync.
    /// Peers without a scatter-list call map page by page.
    fn link_sg(&mut self, n: u64) {
        self.link_4k(n)
    }
    /// Maps the physically contiguous GiB at `PA_1G` at `VA_BASE`, with the
    /// largest blocks the format allows, then one sync.
    fn link_1g(&mut self);
    /// Unmaps that GiB, then one sync.
    fn unlink_1g(&mut self);
    /// Physical address of the root table (for checking what was written).
    fn root(&self) -> u64;
}

/// Longest scatter list the benchmarks link.
pub const SG_MAX: u64 = 32768;

/// bare-iommu: `try_alloc` → `link`… → `sync`; `unlink`… → `sync`.
pub struct Ours<'a, F: PteFormat> {
    pub dom: Domain<F, &'a Arena>,
    pub tx: Option<IovaState>,
    pub be: NoopBackend,
    /// The scatter list `pa_4k(0..)`, built before anything is timed.
    pub sg: Vec<PhysAddr>,
}

/// Four levels (48-bit IOVAs), aperture from `VA_BASE`, coherent walker.
pub const CONFIG: DomainConfig = DomainConfig {
    id: 1,
    levels: 4,
    aperture_start: VA_BASE,
    aperture_end: 1 << 47,
    coherent_walk: true,
};

impl<'a, F: PteFormat + Default> Ours<'a, F> {
    fn tx(&mut self, size: u64) -> IovaState {
        let tx = self
            .dom
            .try_alloc(size, u64::MAX)
            .unwrap()
            .into_iova()
            .unwrap();
        debug_assert_eq!(tx.iova().get(), VA_BASE);
        tx
    }
}

impl<'a, F: PteFormat + Default> Contender<'a> for Ours<'a, F> {
    fn new(arena: &'a Arena) -> Self {
        Self {
            dom: Domain::new(F::default(), arena, CONFIG).unwrap(),
            tx: None,
            be: NoopBackend,
            sg: (0..SG_MAX).map(|i| PhysAddr(pa_4k(i))).collect(),
        }
    }

    #[inline(never)]
    fn link_sg(&mut self, n: u64) {
        let mut tx = self.tx(n * PAGE);
        let list = &self.sg[..n as usize];
        self.dom
            .link_pages(
                &mut tx,
                list,
                0,
                DmaDirection::Bidirectional,
                MapAttrs::empty(),
            )
            .unwrap();
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
    }

    #[inline(never)]
    fn link_4k(&mut self, n: u64) {
        let mut tx = self.tx(n * PAGE);
        for i in 0..n {
            self.dom
                .link(
                    &mut tx,
                    PhysAddr(pa_4k(i)),
                    i * PAGE,
                    PAGE,
                    DmaDirection::Bidirectional,
                    MapAttrs::empty(),
                )
                .unwrap();
        }
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
    }

    /// Unmapping in aarch64-paging is mapping with attributes lacking VALID.
    #[inline(never)]
    fn unlink_4k(&mut self, n: u64) {
        let tx = self.tx.as_mut().unwrap();
        for i in 0..n {
            self.dom.unlink(tx, i * PAGE, PAGE).unwrap();
        }
        self.dom.sync(&mut self.be).unwrap();
    }

    #[inline(never)]
    fn link_run(&mut self, n: u64) {
        let mut tx = self.tx(n * PAGE);
        self.dom
            .link(
                &mut tx,
                PhysAddr(PA_RUN),
                0,
                n * PAGE,
                DmaDirection::Bidirectional,
                MapAttrs::empty(),
            )
            .unwrap();
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
    }

    #[inline(never)]
    fn link_1g(&mut self) {
        let mut tx = self.tx(GIB);
        self.dom
            .link(
                &mut tx,
                PhysAddr(PA_1G),
                0,
                GIB,
                DmaDirection::Bidirectional,
                MapAttrs::empty(),
            )
            .unwrap();
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
    }

    #[inline(never)]
    fn unlink_1g(&mut self) {
        let tx = self.tx.as_mut().unwrap();
        self.dom.unlink(tx, 0, GIB).unwrap();
        self.dom.sync(&mut self.be).unwrap();
    }

    fn root(&self) -> u64 {
        self.dom.info().unwrap().root.0
    }
}

/// google/aarch64-paging `Mapping::map_range`, one region per page.
pub struct Aarch64<'a, R: TranslationRegime> {
    pub map: Mapping<ArenaRef<'a>, R>,
}

/// Stage 1 (EL1&0, lower VA range): the same bits ours writes for a
/// read/write normal page (AttrIndx 0, inner shareable, AF, nG, EL0 access).
pub type Aarch64S1<'a> = Aarch64<'a, El1And0>;
/// Stage 2: S2AP read/write, normal write-back, inner shareable, AF.
pub type Aarch64S2<'a> = Aarch64<'a, Stage2>;

/// What the stage 1 and stage 2 contenders differ in: how the table is
/// made and the attributes of a mapped page.
pub trait Aarch64Regime: TranslationRegime {
    /// A fresh, empty table (root level 0) in `arena`.
    fn mapping(arena: &Arena) -> Mapping<ArenaRef<'_>, Self>;
    /// The attributes of a read/write normal page, as ours writes them.
    fn flags() -> Self::Attributes;
}

impl Aarch64Regime for El1And0 {
    fn mapping(arena: &Arena) -> Mapping<ArenaRef<'_>, Self> {
        Mapping::with_asid_and_va_range(ArenaRef(arena), 1, 0, El1And0, VaRange::Lower)
    }
    fn flags() -> El1Attributes {
        El1Attributes::VALID
            | El1Attributes::ATTRIBUTE_INDEX_0
            | El1Attributes::INNER_SHAREABLE
            | El1Attributes::ACCESSED
            | El1Attributes::NON_GLOBAL
            | El1Attributes::USER
    }
}

impl Aarch64Regime for Stage2 {
    fn mapping(arena: &Arena) -> Mapping<ArenaRef<'_>, Self> {
        Mapping::new(ArenaRef(arena), 0, Stage2)
    }
    fn flags() -> Stage2Attributes {
        Stage2Attributes::VALID
            | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
            | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
            | Stage2Attributes::S2AP_ACCESS_RW
            | Stage2Attributes::SH_INNER
            | Stage2Attributes::ACCESS_FLAG
    }
}

fn region(va: u64, len: u64) -> MemoryRegion {
    MemoryRegion::new(va as usize, (va + len) as usize)
}

impl<'a, R: Aarch64Regime> Aarch64<'a, R> {
    /// Maps `len` bytes at `va` to `pa` with `flags` in one call.
    fn map_range(&mut self, va: u64, len: u64, pa: u64, flags: R::Attributes) {
        self.map
            .map_range(
                &region(va, len),
                PhysicalAddress(pa as usize),
                flags,
                Constraints::empty(),
            )
            .unwrap();
    }
}

impl<'a, R: Aarch64Regime> Contender<'a> for Aarch64<'a, R> {
    fn new(arena: &'a Arena) -> Self {
        Self {
            map: R::mapping(arena),
        }
    }

    #[inline(never)]
    fn link_4k(&mut self, n: u64) {
        for i in 0..n {
            self.map_range(VA_BASE + i * PAGE, PAGE, pa_4k(i), R::flags());
        }
    }

    /// Unmapping in aarch64-paging is mapping with attributes lacking VALID.
    #[inline(never)]
    fn unlink_4k(&mut self, n: u64) {
        for i in 0..n {
            self.map_range(VA_BASE + i * PAGE, PAGE, 0, R::Attributes::default());
        }
    }

    #[inline(never)]
    fn link_run(&mut self, n: u64) {
        self.map_range(VA_BASE, n * PAGE, PA_RUN, R::flags());
    }

    #[inline(never)]
    fn link_1g(&mut self) {
        self.map_range(VA_BASE, GIB, PA_1G, R::flags());
    }

    #[inline(never)]
    fn unlink_1g(&mut self) {
        self.map_range(VA_BASE, GIB, 0, R::Attributes::default());
    }

    fn root(&self) -> u64 {
        self.map.root_address().0 as u64
    }
}

/// rust-osdev/x86_64 `OffsetPageTable::map_to` / `unmap`, one page per call;
/// the TLB flush each returns is ignored (nothing on the host caches them).
pub struct X86<'a> {
    pub pt: OffsetPageTable<'a>,
    pub alloc: ArenaRef<'a>,
    root: u64,
}

const X86_FLAGS: PageTableFlags = PageTableFlags::PRESENT.union(PageTableFlags::WRITABLE);

impl<'a> Contender<'a> for X86<'a> {
    fn new(arena: &'a Arena) -> Self {
        let root = arena.alloc_page().unwrap();
        // SAFETY: a zeroed, 4 KiB aligned arena page lent to this table only.
        let l4 = unsafe { &mut *arena.virt(root).cast::<PageTable>() };
        // SAFETY: every arena page's virtual address is its physical address
        // plus this offset.
        let pt = unsafe { OffsetPageTable::new(l4, x86_64::VirtAddr::new(arena.offset())) };
        Self {
            pt,
            alloc: ArenaRef(arena),
            root,
        }
    }

    #[inline(never)]
    fn link_4k(&mut self, n: u64) {
        for i in 0..n {
            let page =
                Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(VA_BASE + i * PAGE));
            let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(pa_4k(i)));
            // SAFETY: the tables are never loaded into CR3.
            unsafe { self.pt.map_to(page, frame, X86_FLAGS, &mut self.alloc) }
                .unwrap()
                .ignore();
        }
    }

    /// Unmapping in aarch64-paging is mapping with attributes lacking VALID.
    #[inline(never)]
    fn unlink_4k(&mut self, n: u64) {
        for i in 0..n {
            let page =
                Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(VA_BASE + i * PAGE));
            Mapper::<Size4KiB>::unmap(&mut self.pt, page)
                .unwrap()
                .1
                .ignore();
        }
    }

    /// The mapper has no range call: one `map_to` per page.
    #[inline(never)]
    fn link_run(&mut self, n: u64) {
        for i in 0..n {
            let page =
                Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(VA_BASE + i * PAGE));
            let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(PA_RUN + i * PAGE));
            // SAFETY: the tables are never loaded into CR3.
            unsafe { self.pt.map_to(page, frame, X86_FLAGS, &mut self.alloc) }
                .unwrap()
                .ignore();
        }
    }

    #[inline(never)]
    fn link_1g(&mut self) {
        let page = Page::<Size1GiB>::from_start_address(x86_64::VirtAddr::new(VA_BASE)).unwrap();
        let frame =
            PhysFrame::<Size1GiB>::from_start_address(x86_64::PhysAddr::new(PA_1G)).unwrap();
        // SAFETY: the tables are never loaded into CR3.
        unsafe { self.pt.map_to(page, frame, X86_FLAGS, &mut self.alloc) }
            .unwrap()
            .ignore();
    }

    #[inline(never)]
    fn unlink_1g(&mut self) {
        let page = Page::<Size1GiB>::from_start_address(x86_64::VirtAddr::new(VA_BASE)).unwrap();
        Mapper::<Size1GiB>::unmap(&mut self.pt, page)
            .unwrap()
            .1
            .ignore();
    }

    fn root(&self) -> u64 {
        self.root
    }
}

/// The physical limit: stores of ready descriptors into leaf tables that
/// already exist, one volatile 64-bit store per page (a walker must see each
/// descriptor whole), no walk, no checks.
pub struct Limit {
    pub leaves: Vec<*mut u64>,
}

impl Limit {
    /// Leaf tables for `n` pages, taken from `arena` before timing.
    pub fn new(arena: &Arena, n: u64) -> Self {
        let tables = n.div_ceil(512);
        Self {
            leaves: (0..tables)
                .map(|_| arena.virt(arena.alloc_page().unwrap()).cast::<u64>())
                .collect(),
        }
    }

    /// Stores the `n` page descriptors of `link_4k`.
    #[inline(never)]
    pub fn store(&self, n: u64) {
        for i in 0..n as usize {
            // SAFETY: `i / 512 < leaves.len()`, `i % 512 < 512`: inside an arena page.
            unsafe {
                self.leaves
                    .get_unchecked(i >> 9)
                    .add(i & 511)
                    .write_volatile(pa_4k(i as u64) | 0x7ff)
            };
        }
    }

    /// Clears the `n` page descriptors.
    #[inline(never)]
    pub fn clear(&self, n: u64) {
        for i in 0..n as usize {
            // SAFETY: as in `store`.
            unsafe {
                self.leaves
                    .get_unchecked(i >> 9)
                    .add(i & 511)
                    .write_volatile(0)
            };
        }
    }
}
