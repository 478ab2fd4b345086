//! The contenders: bare-iommu's two-step API over each of its formats, and
//! the crates a user would write the same tables with instead. Every one
//! does the same work on the same lent memory ([`Arena`]) and the same
//! addresses (a list of IOVA offsets from [`VA_BASE`], made before anything
//! is timed: see [`Pattern`]).
//!
//! Who zeroes table pages: the arena hands out pages zeroed outside the
//! timed region. `aarch64-paging` relies on that (its `Translation`
//! contract), and so does ours; `x86_64` (`create_next_table` calls
//! `PageTable::zero`) and `page_table_multiarch` (`alloc_table` writes
//! zeros) zero every new table inside the timed region. `ours+zero` is ours
//! with a lender ([`Zeroing`]) that zeroes every page it lends, inside the
//! timed region, for the equal comparison.
//!
//! `ours+keep` is ours with [`TableReclaim::Keep`] (Linux io-pgtable's
//! behaviour, and every peer's here): unlinks leave emptied tables
//! attached, and the link cases link into tables kept from a link and
//! unlink of the same range made before the timed region (no table lent,
//! none zeroed).

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{El1Attributes, PhysicalAddress, Stage2Attributes};
use aarch64_paging::paging::{
    Constraints, El1And0, MemoryRegion, Stage2, TranslationRegime, VaRange,
};
use bare_iommu::pgtable::PteFormat;
use bare_iommu::{
    Attachment, BackendError, DeviceId, DmaAddr, DmaDirection, Domain, DomainConfig, DomainInfo,
    IommuBackend, IovaState, MapAttrs, PhysAddr, TableReclaim,
};
use page_table_entry::x86_64::X64PTE;
use page_table_multiarch::x86_64::X64PagingMetaData;
use page_table_multiarch::{GenericPTE, MappingFlags, PageSize, PageTable64, PagingMetaData};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size1GiB, Size4KiB,
};

use crate::arena::{Arena, ArenaHandler, ArenaRef, Zeroing};

/// Where every contender's mappings start (ours: the aperture's first IOVA,
/// and where the buddy allocator puts every transaction here, up to the
/// 64 GiB one of the scattered pattern).
pub const VA_BASE: u64 = 1 << 36;
/// 2 MiB: the span of one leaf table.
pub const MIB2: u64 = 2 << 20;
/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// Output address of the 1 GiB run (1 GiB aligned, so blocks fit).
pub const PA_1G: u64 = 0x40_0000_0000;
/// Output address of a contiguous run of pages: 4 KiB past a 2 MiB
/// boundary, so no block can be used and every page takes a descriptor.
pub const PA_RUN: u64 = 0x20_0000_1000;

/// Where the pages of a per-page case lie in the IOVA space.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Pattern {
    /// Page `i` at `VA_BASE + i * 4 KiB`: 512 pages share a leaf table.
    Seq,
    /// One page per 2 MiB region (each in its own leaf table), the regions
    /// visited in a shuffled order (fixed seed), so no leaf-table cache
    /// decides the result.
    Scat,
}

impl Pattern {
    /// The IOVA offsets (from `VA_BASE`) of `n` pages, in the order mapped.
    pub fn offsets(self, n: u64) -> Vec<u64> {
        match self {
            Pattern::Seq => (0..n).map(|i| i * PAGE).collect(),
            Pattern::Scat => {
                let mut v: Vec<u64> = (0..n).map(|i| i * MIB2).collect();
                // Fisher-Yates with a fixed xorshift64* seed.
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                for i in (1..v.len()).rev() {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
                    v.swap(i, (r % (i as u64 + 1)) as usize);
                }
                v
            }
        }
    }

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Scat => "scat",
        }
    }
}

/// Bytes of IOVA space the offsets `offs` span from `VA_BASE`.
pub fn span(offs: &[u64]) -> u64 {
    offs.iter().max().map_or(PAGE, |m| m + PAGE)
}

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
    /// Per-transaction set-up from the offsets a timed `link_4k` will get
    /// (outside the timed region; ours sizes its transaction here).
    fn prepare(&mut self, _offs: &[u64]) {}
    /// Maps separate 4 KiB pages at `VA_BASE + offs[i]` → `pa_4k(i)`, one
    /// call per page, then makes them visible once.
    fn link_4k(&mut self, offs: &[u64]);
    /// Unmaps the pages of `link_4k`, one call per page, then one sync.
    fn unlink_4k(&mut self, offs: &[u64]);
    /// Maps `n` physically contiguous pages at `PA_RUN` at `VA_BASE` with as
    /// few calls as the API allows (4 KiB descriptors only), then one sync.
    fn link_run(&mut self, n: u64);
    /// Maps the same `n` separate pages as `link_4k` (`pa_4k(i)`) as one
    /// scatter list, with as few calls as the API allows, then one sync.
    /// Peers without a scatter-list call map page by page (`offs` are the
    /// sequential offsets).
    fn link_sg(&mut self, offs: &[u64]) {
        self.link_4k(offs)
    }
    /// Maps the physically contiguous GiB at `PA_1G` at `VA_BASE`, with the
    /// largest blocks the format allows, then one sync.
    fn link_1g(&mut self);
    /// Unmaps that GiB, then one sync.
    fn unlink_1g(&mut self);
    /// Physical address of the root table (for checking what was written).
    fn root(&self) -> u64;
    /// Whether the contender keeps emptied tables and the link cases should
    /// run on tables kept from an earlier link and unlink (`ours+keep`).
    const KEEPS_TABLES: bool = false;
    /// Unlinks everything linked, then one sync (set-up of the kept-table
    /// link cases; only called when [`KEEPS_TABLES`](Self::KEEPS_TABLES)).
    fn unlink_everything(&mut self) {}
}

/// Longest scatter list the benchmarks link.
pub const SG_MAX: u64 = 32768;

/// `pa_4k(0..SG_MAX)`, made on first use.
pub fn scatter_list() -> &'static [PhysAddr] {
    static LIST: std::sync::OnceLock<Vec<PhysAddr>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| (0..SG_MAX).map(|i| PhysAddr(pa_4k(i))).collect())
}

/// How ours gets its lender from the arena: `&Arena` (pages zeroed outside
/// the timed region) or [`Zeroing`] (zeroed when lent, inside it).
pub trait Lender<'a>: bare_iommu::TableMemory + Sized {
    fn of(arena: &'a Arena) -> Self;
}

impl<'a> Lender<'a> for &'a Arena {
    fn of(arena: &'a Arena) -> Self {
        arena
    }
}

impl<'a> Lender<'a> for Zeroing<'a> {
    fn of(arena: &'a Arena) -> Self {
        Zeroing(arena)
    }
}

/// bare-iommu: `try_alloc` → `link`… → `sync`; `unlink`… → `sync`.
/// `KEEP`: the domain keeps emptied tables ([`TableReclaim::Keep`]).
pub struct Ours<'a, F: PteFormat, L: Lender<'a> = &'a Arena, const KEEP: bool = false> {
    pub dom: Domain<F, L>,
    pub tx: Option<IovaState>,
    pub be: NoopBackend,
    /// The scatter list `pa_4k(0..)`, built once before anything is timed
    /// and shared by every state (a list per state would be 256 KiB of
    /// set-up writes each, evicting the states a batch then times).
    pub sg: &'static [PhysAddr],
    /// The transaction size `link_4k` allocates (`prepare`).
    pub span: u64,
    _arena: core::marker::PhantomData<&'a Arena>,
}

/// Four levels (48-bit IOVAs), aperture from `VA_BASE`, coherent walker.
pub const CONFIG: DomainConfig = DomainConfig {
    id: 1,
    levels: 4,
    aperture_start: VA_BASE,
    aperture_end: 1 << 47,
    coherent_walk: true,
};

impl<'a, F: PteFormat + Default, L: Lender<'a>, const KEEP: bool> Ours<'a, F, L, KEEP> {
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

impl<'a, F: PteFormat + Default, L: Lender<'a>, const KEEP: bool> Contender<'a>
    for Ours<'a, F, L, KEEP>
{
    const KEEPS_TABLES: bool = KEEP;

    fn unlink_everything(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.dom.free(tx).unwrap();
        }
        self.dom.sync(&mut self.be).unwrap();
    }

    fn new(arena: &'a Arena) -> Self {
        let mut dom = Domain::new(F::default(), L::of(arena), CONFIG).unwrap();
        if KEEP {
            dom.set_table_reclaim(TableReclaim::Keep);
        }
        Self {
            dom,
            tx: None,
            be: NoopBackend,
            sg: scatter_list(),
            span: PAGE,
            _arena: core::marker::PhantomData,
        }
    }

    #[inline(never)]
    fn link_sg(&mut self, offs: &[u64]) {
        let n = offs.len() as u64;
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

    fn prepare(&mut self, offs: &[u64]) {
        self.span = span(offs);
    }

    #[inline(never)]
    fn link_4k(&mut self, offs: &[u64]) {
        let mut tx = self.tx(self.span);
        for (i, &off) in offs.iter().enumerate() {
            self.dom
                .link(
                    &mut tx,
                    PhysAddr(pa_4k(i as u64)),
                    off,
                    PAGE,
                    DmaDirection::Bidirectional,
                    MapAttrs::empty(),
                )
                .unwrap();
        }
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
    }

    #[inline(never)]
    fn unlink_4k(&mut self, offs: &[u64]) {
        let tx = self.tx.as_mut().unwrap();
        for &off in offs {
            self.dom.unlink(tx, off, PAGE).unwrap();
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
    fn link_4k(&mut self, offs: &[u64]) {
        for (i, &off) in offs.iter().enumerate() {
            self.map_range(VA_BASE + off, PAGE, pa_4k(i as u64), R::flags());
        }
    }

    /// Unmapping in aarch64-paging is mapping with attributes lacking VALID.
    #[inline(never)]
    fn unlink_4k(&mut self, offs: &[u64]) {
        for &off in offs {
            self.map_range(VA_BASE + off, PAGE, 0, R::Attributes::default());
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
    fn link_4k(&mut self, offs: &[u64]) {
        for (i, &off) in offs.iter().enumerate() {
            let page = Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(VA_BASE + off));
            let frame = PhysFrame::containing_address(x86_64::PhysAddr::new(pa_4k(i as u64)));
            // SAFETY: the tables are never loaded into CR3.
            unsafe { self.pt.map_to(page, frame, X86_FLAGS, &mut self.alloc) }
                .unwrap()
                .ignore();
        }
    }

    #[inline(never)]
    fn unlink_4k(&mut self, offs: &[u64]) {
        for &off in offs {
            let page = Page::<Size4KiB>::containing_address(x86_64::VirtAddr::new(VA_BASE + off));
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

/// arceos-org/page_table_multiarch 0.6: `PageTable64` through one cursor
/// per transaction (`map` / `unmap` per page, `map_region` for a run or a
/// block, `unmap_region` for the block); the cursor's TLB flush is compiled
/// out on a hosted target (`cfg(target_os = "none")`), so nothing else runs.
pub struct Ptm<M: PagingMetaData, P: PtmPte> {
    pub pt: PageTable64<M, P, ArenaHandler>,
}

/// The descriptor types the `page_table_multiarch` contenders use, and the
/// flags that make them write the same bits as ours.
pub trait PtmPte: GenericPTE {
    const FLAGS: MappingFlags;
}

/// x86-64 4-level: the crate's own `X64PTE` and `X64PagingMetaData`
/// (`READ | WRITE | EXECUTE`: present, writable, no NX, as ours' VT-d
/// second-level leaf).
pub type PtmX86 = Ptm<X64PagingMetaData, X64PTE>;

impl PtmPte for X64PTE {
    const FLAGS: MappingFlags = MappingFlags::READ
        .union(MappingFlags::WRITE)
        .union(MappingFlags::EXECUTE);
}

/// Arm stage 1: the crate's `A64PTE` and `A64PagingMetaData` build only for
/// aarch64 targets (its TLB flush is inline `tlbi`), so this is its generic
/// `PageTable64` with [`A64Meta`] (the same constants, no flush: a hosted
/// target never calls it) and [`ArmS1Pte`], a descriptor written here
/// against its `GenericPTE` trait the way `A64PTE` is, with ours' memory
/// attribute index and nG.
pub type PtmArm = Ptm<A64Meta, ArmS1Pte>;

/// `A64PagingMetaData`'s constants: 4 levels, 48-bit VA and PA.
pub struct A64Meta;

impl PagingMetaData for A64Meta {
    const LEVELS: usize = 4;
    const PA_MAX_BITS: usize = 48;
    const VA_MAX_BITS: usize = 48;
    type VirtAddr = memory_addr::VirtAddr;

    fn vaddr_is_valid(vaddr: usize) -> bool {
        let top = vaddr >> Self::VA_MAX_BITS;
        top == 0 || top == 0xffff
    }

    fn flush_tlb(_: Option<memory_addr::VirtAddr>) {}
}

/// A VMSAv8-64 stage 1 descriptor (4 KiB granule) built the way
/// `page_table_entry::aarch64::A64PTE` builds one from `MappingFlags`, with
/// ours' choices where they differ: normal memory is `AttrIndx` 0 (A64PTE's
/// MAIR puts it at 1), every page is non-global (ours tags by ASID), and
/// EL0 access does not add PXN.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct ArmS1Pte(u64);

impl ArmS1Pte {
    const VALID: u64 = 1 << 0;
    const NON_BLOCK: u64 = 1 << 1;
    const AP_EL0: u64 = 1 << 6;
    const AP_RO: u64 = 1 << 7;
    const SH_INNER: u64 = 3 << 8;
    const AF: u64 = 1 << 10;
    const NG: u64 = 1 << 11;
    const PXN: u64 = 1 << 53;
    const UXN: u64 = 1 << 54;
    const ADDR: u64 = 0x0000_ffff_ffff_f000;

    fn attr(flags: MappingFlags) -> u64 {
        if flags.is_empty() {
            return 0;
        }
        let mut a = if flags.contains(MappingFlags::DEVICE) {
            1 << 2
        } else if flags.contains(MappingFlags::UNCACHED) {
            (2 << 2) | Self::SH_INNER
        } else {
            Self::SH_INNER
        };
        if flags.contains(MappingFlags::READ) {
            a |= Self::VALID;
        }
        if !flags.contains(MappingFlags::WRITE) {
            a |= Self::AP_RO;
        }
        if flags.contains(MappingFlags::USER) {
            a |= Self::AP_EL0;
        }
        if !flags.contains(MappingFlags::EXECUTE) {
            a |= Self::UXN | Self::PXN;
        }
        a | Self::AF | Self::NG
    }
}

impl GenericPTE for ArmS1Pte {
    fn new_page(paddr: memory_addr::PhysAddr, flags: MappingFlags, is_huge: bool) -> Self {
        let mut a = Self::attr(flags);
        if !is_huge {
            a |= Self::NON_BLOCK;
        }
        Self(a | (paddr.as_usize() as u64 & Self::ADDR))
    }
    fn new_table(paddr: memory_addr::PhysAddr) -> Self {
        Self(Self::VALID | Self::NON_BLOCK | (paddr.as_usize() as u64 & Self::ADDR))
    }
    fn paddr(&self) -> memory_addr::PhysAddr {
        memory_addr::PhysAddr::from((self.0 & Self::ADDR) as usize)
    }
    fn flags(&self) -> MappingFlags {
        if self.0 & Self::VALID == 0 {
            return MappingFlags::empty();
        }
        let mut f = MappingFlags::READ;
        if self.0 & Self::AP_RO == 0 {
            f |= MappingFlags::WRITE;
        }
        if self.0 & Self::AP_EL0 != 0 {
            f |= MappingFlags::USER;
        }
        if self.0 & Self::UXN == 0 {
            f |= MappingFlags::EXECUTE;
        }
        f
    }
    fn set_paddr(&mut self, paddr: memory_addr::PhysAddr) {
        self.0 = (self.0 & !Self::ADDR) | (paddr.as_usize() as u64 & Self::ADDR);
    }
    fn set_flags(&mut self, flags: MappingFlags, is_huge: bool) {
        let mut a = Self::attr(flags);
        if !is_huge {
            a |= Self::NON_BLOCK;
        }
        self.0 = (self.0 & Self::ADDR) | a;
    }
    fn bits(self) -> usize {
        self.0 as usize
    }
    fn is_unused(&self) -> bool {
        self.0 == 0
    }
    fn is_present(&self) -> bool {
        self.0 & Self::VALID != 0
    }
    fn is_huge(&self) -> bool {
        self.0 & Self::NON_BLOCK == 0
    }
    fn clear(&mut self) {
        self.0 = 0
    }
}

impl PtmPte for ArmS1Pte {
    const FLAGS: MappingFlags = MappingFlags::READ
        .union(MappingFlags::WRITE)
        .union(MappingFlags::EXECUTE)
        .union(MappingFlags::USER);
}

fn vaddr(va: u64) -> memory_addr::VirtAddr {
    memory_addr::VirtAddr::from(va as usize)
}

fn paddr(pa: u64) -> memory_addr::PhysAddr {
    memory_addr::PhysAddr::from(pa as usize)
}

impl<'a, M: PagingMetaData<VirtAddr = memory_addr::VirtAddr>, P: PtmPte> Contender<'a>
    for Ptm<M, P>
{
    fn new(arena: &'a Arena) -> Self {
        ArenaHandler::lend(arena);
        Self {
            pt: PageTable64::try_new().unwrap(),
        }
    }

    #[inline(never)]
    fn link_4k(&mut self, offs: &[u64]) {
        let mut c = self.pt.cursor();
        for (i, &off) in offs.iter().enumerate() {
            c.map(
                vaddr(VA_BASE + off),
                paddr(pa_4k(i as u64)),
                PageSize::Size4K,
                P::FLAGS,
            )
            .unwrap();
        }
    }

    #[inline(never)]
    fn unlink_4k(&mut self, offs: &[u64]) {
        let mut c = self.pt.cursor();
        for &off in offs {
            c.unmap(vaddr(VA_BASE + off)).unwrap();
        }
    }

    #[inline(never)]
    fn link_run(&mut self, n: u64) {
        let mut c = self.pt.cursor();
        c.map_region(
            vaddr(VA_BASE),
            |v| paddr(PA_RUN + (v.as_usize() as u64 - VA_BASE)),
            (n * PAGE) as usize,
            P::FLAGS,
            false,
        )
        .unwrap();
    }

    #[inline(never)]
    fn link_1g(&mut self) {
        let mut c = self.pt.cursor();
        c.map_region(
            vaddr(VA_BASE),
            |v| paddr(PA_1G + (v.as_usize() as u64 - VA_BASE)),
            GIB as usize,
            P::FLAGS,
            true,
        )
        .unwrap();
    }

    #[inline(never)]
    fn unlink_1g(&mut self) {
        let mut c = self.pt.cursor();
        c.unmap_region(vaddr(VA_BASE), GIB as usize).unwrap();
    }

    fn root(&self) -> u64 {
        self.pt.root_paddr().as_usize() as u64
    }
}

/// The physical limit: stores of ready descriptors into leaf tables that
/// already exist (in an arena of its own), one volatile 64-bit store per
/// page (a walker must see each descriptor whole) through a pointer made
/// before timing, no walk, no checks.
pub struct Limit {
    _arena: Arena,
    pub slots: Vec<*mut u64>,
}

impl Limit {
    /// Leaf tables for pages at `offs` (as the contenders place them).
    pub fn new(offs: &[u64]) -> Self {
        let tables = (span(offs).div_ceil(MIB2)) as usize;
        let arena = Arena::new(tables);
        let leaves: Vec<*mut u64> = (0..tables)
            .map(|_| arena.virt(arena.alloc_page().unwrap()).cast::<u64>())
            .collect();
        let slots = offs
            .iter()
            .map(|&off| leaves[(off / MIB2) as usize].wrapping_add(((off / PAGE) % 512) as usize))
            .collect();
        Self {
            _arena: arena,
            slots,
        }
    }

    /// Stores the page descriptors of `link_4k`.
    #[inline(never)]
    pub fn store(&self) {
        for (i, p) in self.slots.iter().enumerate() {
            // SAFETY: each slot is an entry of a leaf table in `_arena`.
            unsafe { p.write_volatile(pa_4k(i as u64) | 0x7ff) };
        }
    }

    /// Clears them.
    #[inline(never)]
    pub fn clear(&self) {
        for p in &self.slots {
            // SAFETY: as in `store`.
            unsafe { p.write_volatile(0) };
        }
    }
}

/// The walker alone (`IoPageTable::map` / `unmap`, no transaction, no
/// pending-range bookkeeping): counted by callgrind only (`s1/walker`,
/// `vtd/walker`), as the floor the two-step API is measured against.
pub struct Walker<'a, F: PteFormat> {
    pub pt: bare_iommu::pgtable::IoPageTable<F, &'a Arena>,
}

impl<'a, F: PteFormat + Default> Contender<'a> for Walker<'a, F> {
    fn new(arena: &'a Arena) -> Self {
        Self {
            pt: bare_iommu::pgtable::IoPageTable::new(F::default(), arena, 4, true).unwrap(),
        }
    }

    #[inline(never)]
    fn link_4k(&mut self, offs: &[u64]) {
        let attrs = MapAttrs::READ | MapAttrs::WRITE;
        for (i, &off) in offs.iter().enumerate() {
            self.pt
                .map(
                    DmaAddr(VA_BASE + off),
                    PhysAddr(pa_4k(i as u64)),
                    PAGE,
                    attrs,
                )
                .unwrap();
        }
    }

    #[inline(never)]
    fn unlink_4k(&mut self, offs: &[u64]) {
        for &off in offs {
            self.pt.unmap(DmaAddr(VA_BASE + off), PAGE).unwrap();
        }
        self.pt.free_retired();
    }

    #[inline(never)]
    fn link_run(&mut self, n: u64) {
        let attrs = MapAttrs::READ | MapAttrs::WRITE;
        self.pt
            .map(DmaAddr(VA_BASE), PhysAddr(PA_RUN), n * PAGE, attrs)
            .unwrap();
    }

    #[inline(never)]
    fn link_1g(&mut self) {
        let attrs = MapAttrs::READ | MapAttrs::WRITE;
        self.pt
            .map(DmaAddr(VA_BASE), PhysAddr(PA_1G), GIB, attrs)
            .unwrap();
    }

    #[inline(never)]
    fn unlink_1g(&mut self) {
        self.pt.unmap(DmaAddr(VA_BASE), GIB).unwrap();
        self.pt.free_retired();
    }

    fn root(&self) -> u64 {
        self.pt.root().0
    }
}

/// bare-iommu through [`SharedDomain`](bare_iommu::shared::SharedDomain)
/// (the read side, tables by compare-and-swap) with a split-sync queue that
/// completes at once: the per-call cost of sharing, on one CPU.
pub struct Shared<'a, F: PteFormat> {
    pub dom: bare_iommu::shared::SharedDomain<F, &'a Arena>,
    pub tx: Option<IovaState>,
    pub be: bare_iommu::testing::split::FakeQueue,
    /// As [`Ours::span`].
    pub span: u64,
    _arena: core::marker::PhantomData<&'a Arena>,
}

impl<'a, F: PteFormat + Default> Shared<'a, F> {
    fn tx(&mut self, size: u64) -> IovaState {
        self.dom
            .try_alloc(size, u64::MAX)
            .unwrap()
            .into_iova()
            .unwrap()
    }
}

impl<'a, F: PteFormat + Default> Contender<'a> for Shared<'a, F> {
    fn new(arena: &'a Arena) -> Self {
        let mut s = Self {
            dom: bare_iommu::shared::SharedDomain::new(
                Domain::new(F::default(), arena, CONFIG).unwrap(),
            ),
            tx: None,
            be: bare_iommu::testing::split::FakeQueue::new(u64::MAX),
            span: PAGE,
            _arena: core::marker::PhantomData,
        };
        // Steady state: a first sync has told the domain that this IOMMU
        // does not cache not-present entries (links need not be recorded).
        s.dom.sync(&mut s.be).unwrap();
        s
    }

    fn prepare(&mut self, offs: &[u64]) {
        self.span = span(offs);
    }

    #[inline(never)]
    fn link_4k(&mut self, offs: &[u64]) {
        let mut tx = self.tx(self.span);
        for (i, &off) in offs.iter().enumerate() {
            self.dom
                .link(
                    &mut tx,
                    PhysAddr(pa_4k(i as u64)),
                    off,
                    PAGE,
                    DmaDirection::Bidirectional,
                    MapAttrs::empty(),
                )
                .unwrap();
        }
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
    }

    #[inline(never)]
    fn unlink_4k(&mut self, offs: &[u64]) {
        let tx = self.tx.as_mut().unwrap();
        for &off in offs {
            self.dom.unlink(tx, off, PAGE).unwrap();
        }
        self.dom.sync(&mut self.be).unwrap();
    }

    #[inline(never)]
    fn link_sg(&mut self, offs: &[u64]) {
        let n = offs.len();
        let mut tx = self.tx(n as u64 * PAGE);
        self.dom
            .link_pages(
                &mut tx,
                &scatter_list()[..n],
                0,
                DmaDirection::Bidirectional,
                MapAttrs::empty(),
            )
            .unwrap();
        self.dom.sync(&mut self.be).unwrap();
        self.tx = Some(tx);
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
        self.dom.with(|d| d.info().unwrap().root.0)
    }
}
