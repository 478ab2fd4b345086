//! Transaction state and the two-step DMA API.
//!
//! Modelled on Linux's `dma_iova_try_alloc` / `dma_iova_link` /
//! `dma_iova_sync` / `dma_iova_unlink` / `dma_iova_destroy` /
//! `dma_iova_free`, with the bookkeeping moved into the state:
//!
//! - [`Domain::try_alloc`] returns a [`DmaPath`]: an [`IovaState`] when the
//!   IOMMU translates, a [`DirectState`] when the domain is identity. The two
//!   are different types, so a request can never carry a stale IOVA size into
//!   the direct path.
//! - [`Domain::link`] writes tables only, all or nothing, and records the
//!   linked bytes and the kind of mapping in the state.
//! - [`Domain::sync`] issues the invalidations for everything that changed and
//!   waits on the hardware **once**.
//! - [`Domain::unlink`] undoes part or all of what was linked; unlinking what
//!   was never linked is an error that changes nothing.
//! - [`Domain::free`] and [`Domain::destroy`] take the state by value (a freed
//!   transaction cannot be used again: that is a compile error) and unlink
//!   whatever is still linked: no caller-remembered length is needed.
//!
//! Nothing on these paths allocates from a heap.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::addr::{DmaAddr, PAGE_SIZE, PhysAddr};
use crate::backend::{Attachment, DomainInfo, IommuBackend, TableFormat};
use crate::barrier::wmb_on;
use crate::device::DeviceId;
use crate::error::{BackendError, DmaError, PageTableError};
use crate::firmware::ReservedRegion;
use crate::iova::{FixedRange, IovaAllocator, IovaRange};
use crate::logging::log_debug;
use crate::mem::TableMemory;
use crate::p2p::{P2pMapType, P2pRegistry};
use crate::pgtable::{DmaDirection, IoPageTable, MapAttrs, PteFormat, TableReclaim};

mod concurrent;
pub(crate) use concurrent::{SharedEffect, SharedPending};

/// What kind of mapping a transaction's links made. Unlink and free do
/// exactly the inverse of what this says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum DmaKind {
    /// Host memory translated by the IOMMU.
    Translated = 1,
    /// A peer's BAR reached by its PCI bus address, routed by a switch: the
    /// IOMMU never sees it, so there is nothing to unmap.
    P2pBusAddr = 2,
    /// A peer's BAR reached through the host bridge: translated by the IOMMU
    /// with device-memory attributes.
    P2pThruHostBridge = 3,
    /// No IOMMU translation: DMA addresses are physical addresses.
    Direct = 4,
}

/// Bit of `IovaState::dirs` saying `provider` is set.
const HAS_PROVIDER: u8 = 0x80;
/// Low bits of `IovaState::iova` holding log2 of the size (the IOVA is
/// aligned to its size, at least 4 KiB).
const SIZE_BITS: u64 = 0x3f;
/// `IovaState::iova & SIZE_BITS` of a fixed-IOVA transaction
/// ([`Domain::try_alloc_at`]): no power of two the allocator hands out
/// (at least 2^12), so the size in pages is in `IovaState::aux` instead.
/// Zero, so that the per-page paths' size mask (see `holds_page`) admits
/// offset 0 only, which every fixed transaction holds.
const FIXED_ORDER: u64 = 0;
// `holds_page` relies on the size bits being the six a shift count takes.
const _: () = assert!(SIZE_BITS == 63);

/// The VT-d interrupt window `[0xFEE0_0000, 0xFEF0_0000)`: on x86 a DMA
/// write there is an interrupt message (VT-d spec, "Handling Requests to
/// Interrupt Address Range": such requests are not DMA-remapped), so no
/// IOVA in it is ever handed out; Linux reserves it in every DMA domain
/// (`IOAPIC_RANGE_START..=IOAPIC_RANGE_END` in `intel_iommu_get_resv_regions`,
/// applied by `iova_reserve_iommu_regions`).
pub const VTD_INTERRUPT_WINDOW: (u64, u64) = (0xFEE0_0000, 0xFEF0_0000);

/// The next domain token: every translated domain gets its own, never
/// reused, so a transaction can only ever be used with the domain that made
/// it (a domain id can repeat; a token cannot).
static NEXT_TOKEN: AtomicU32 = AtomicU32::new(1);

fn new_token() -> Result<u32, DmaError> {
    NEXT_TOKEN
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
            (t != 0).then(|| t.wrapping_add(1))
        })
        .map_err(|_| DmaError::TokensExhausted)
}

/// One IOVA transaction: a contiguous IOVA range owned by the caller, into
/// which physical ranges are linked at offsets. 32 bytes on 64-bit targets.
///
/// Not `Clone`: there is exactly one owner, and [`Domain::free`] consumes it.
///
/// # Example
///
/// ```
/// # struct Heap;
/// # // SAFETY: zeroed, size-aligned blocks, valid until freed; physical = virtual.
/// # unsafe impl bare_iommu::TableMemory for Heap {
/// #     fn alloc_zeroed(&self, pages: usize) -> Option<bare_iommu::PhysAddr> {
/// #         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).ok()?;
/// #         if pages == 0 { return None; }
/// #         // SAFETY: non-zero size.
/// #         let p = unsafe { std::alloc::alloc_zeroed(l) };
/// #         (!p.is_null()).then(|| bare_iommu::PhysAddr(p as u64))
/// #     }
/// #     unsafe fn free(&self, pa: bare_iommu::PhysAddr, pages: usize) {
/// #         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).unwrap();
/// #         // SAFETY: allocated above with this layout.
/// #         unsafe { std::alloc::dealloc(pa.0 as *mut u8, l) }
/// #     }
/// #     fn phys_to_virt(&self, pa: bare_iommu::PhysAddr) -> *mut u8 { pa.0 as *mut u8 }
/// # }
/// use bare_iommu::pgtable::arm::ArmStage1;
/// use bare_iommu::testing::RecordingBackend;
/// use bare_iommu::{DmaAddr, DmaDirection, DmaError, DmaKind, Domain, DomainConfig, MapAttrs, PhysAddr};
///
/// # fn main() -> Result<(), DmaError> {
/// let mut iommu = RecordingBackend::new();
/// let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 1 << 20, aperture_end: 1 << 32, coherent_walk: true };
/// let mut dom = Domain::new(ArmStage1, Heap, cfg)?;
///
/// let mut tx = dom.try_alloc(5 * 4096, u64::MAX)?.into_iova().unwrap();
/// assert_eq!(tx.size(), 8 * 4096); // a power of two of pages
/// assert_eq!((tx.linked(), tx.kind(), tx.direction()), (0, None, None));
///
/// // Link one page at offset 8 KiB; the rest of the range stays unmapped.
/// dom.link(&mut tx, PhysAddr(0x9000_0000), 2 * 4096, 4096, DmaDirection::ToDevice, MapAttrs::empty())?;
/// assert_eq!(tx.linked(), 4096);
/// assert_eq!(tx.kind(), Some(DmaKind::Translated));
/// assert_eq!(tx.direction(), Some(DmaDirection::ToDevice));
/// assert_eq!(tx.dma_addr(2 * 4096 + 100)?, DmaAddr(tx.iova().0 + 2 * 4096 + 100));
///
/// // A state belongs to the domain that made it.
/// let mut other = Domain::new(ArmStage1, Heap, cfg)?;
/// assert!(matches!(other.unlink(&mut tx, 2 * 4096, 4096), Err(DmaError::WrongDomain { .. })));
///
/// // `free` consumes the state and unlinks what is left; sync before the
/// // memory is reused.
/// dom.free(tx).map_err(|(_, e)| e)?;
/// dom.sync(&mut iommu)?;
/// # Ok(()) }
/// ```
#[must_use = "an IovaState holds an IOVA range and mappings: give it back with Domain::free or destroy"]
#[derive(PartialEq, Eq)]
pub struct IovaState {
    /// First IOVA, with log2 of the size in the low bits ([`SIZE_BITS`]).
    iova: u64,
    linked: u64,
    /// Who owns the state and what it holds, in one word so that the
    /// per-page link decides with one masked compare ([`LINK_FAST_MASK`]):
    /// the domain's unique token (bits 0..32, see
    /// `NEXT_TOKEN`), the domain id (32..48), the kind code of the links
    /// (48..56, [`kind_code`]; 0 exactly while nothing is linked) and the
    /// union of the directions linked with [`HAS_PROVIDER`] (56..64).
    owner: u64,
    /// Requester ID and segment of the P2P provider of the links, if any.
    provider: (u16, u16),
    /// Fixed-IOVA transactions (`iova & SIZE_BITS == FIXED_ORDER`): the size
    /// in pages. Otherwise, bus-address links only: page index (in the
    /// transaction) of the first linked page; the run
    /// `[aux, aux + linked)` is linked. (Bus-address links are refused in a
    /// fixed-IOVA transaction, so the two uses never meet.)
    aux: u32,
}

/// Bits of `IovaState::owner` holding the token.
const TOKEN_BITS: u64 = 0xffff_ffff;
/// Shifts of the domain id, kind code and directions in `IovaState::owner`.
const DOMAIN_SHIFT: u32 = 32;
const KIND_SHIFT: u32 = 48;
const DIRS_SHIFT: u32 = 56;
/// Kind codes in `IovaState::owner` (0: nothing linked), one bit each so a
/// mask picks the kinds a per-page path refuses.
const KIND_TRANSLATED: u64 = 1;
const KIND_HOST_BRIDGE: u64 = 2;
const KIND_BUS_ADDR: u64 = 4;
const KIND_DIRECT: u64 = 8;
/// A per-page link of host memory is for the domain whose token is the
/// owner word masked with this: nothing or host memory linked (every kind
/// bit but `KIND_TRANSLATED` clear), no P2P provider.
const LINK_FAST_MASK: u64 =
    TOKEN_BITS | ((0xff & !KIND_TRANSLATED) << KIND_SHIFT) | ((HAS_PROVIDER as u64) << DIRS_SHIFT);

/// A per-page unlink is for the domain whose token is the owner word
/// masked with this: no bus-address links (those never reached the tables).
const UNLINK_FAST_MASK: u64 = TOKEN_BITS | (KIND_BUS_ADDR << KIND_SHIFT);

/// The kind code of `kind` in `IovaState::owner`.
#[inline(always)]
const fn kind_code(kind: DmaKind) -> u64 {
    match kind {
        DmaKind::Translated => KIND_TRANSLATED,
        DmaKind::P2pThruHostBridge => KIND_HOST_BRIDGE,
        DmaKind::P2pBusAddr => KIND_BUS_ADDR,
        DmaKind::Direct => KIND_DIRECT,
    }
}

/// Shows the IOVA, size, bytes linked, domain, kind and directions.
impl core::fmt::Debug for IovaState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IovaState")
            .field("iova", &self.iova())
            .field("size", &self.size())
            .field("linked", &self.linked)
            .field("domain", &self.domain_id())
            .field("kind", &self.kind())
            .field("direction", &self.direction())
            .field("provider", &self.provider())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for IovaState {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "IovaState {{ iova: {=u64:#x}, size: {=u64:#x}, linked: {=u64:#x}, domain: {=u16}, kind: {} }}",
            self.base(),
            self.size(),
            self.linked,
            self.domain_id(),
            self.kind()
        )
    }
}

impl IovaState {
    /// A state of the domain with `token` and `id`, nothing linked.
    #[inline]
    fn new(iova: u64, token: u32, id: u16, aux: u32) -> Self {
        Self {
            iova,
            linked: 0,
            owner: u64::from(token) | (u64::from(id) << DOMAIN_SHIFT),
            provider: (0, 0),
            aux,
        }
    }

    /// The token of the domain that made the state.
    #[inline(always)]
    fn token(&self) -> u32 {
        self.owner as u32
    }

    /// The kind and direction bits (`HAS_PROVIDER` included).
    #[inline(always)]
    fn dirs(&self) -> u8 {
        (self.owner >> DIRS_SHIFT) as u8
    }

    /// Whether the links are bus-address P2P links.
    #[inline(always)]
    fn is_bus_addr(&self) -> bool {
        (self.owner >> KIND_SHIFT) as u8 & KIND_BUS_ADDR as u8 != 0
    }

    /// Records links of `kind` in direction bits `dirs`.
    #[inline(always)]
    fn record_links(&mut self, kind: DmaKind, dirs: u8) {
        self.owner = (self.owner & !(0xff << KIND_SHIFT))
            | (kind_code(kind) << KIND_SHIFT)
            | (u64::from(dirs) << DIRS_SHIFT);
    }

    /// Nothing linked any more: the next link may be of any kind.
    #[inline(always)]
    fn forget_links(&mut self) {
        self.linked = 0;
        self.owner &= TOKEN_BITS | (0xffff << DOMAIN_SHIFT);
        self.provider = (0, 0);
    }

    /// First IOVA of the transaction.
    #[inline]
    pub fn iova(&self) -> DmaAddr {
        DmaAddr(self.base())
    }

    #[inline(always)]
    fn base(&self) -> u64 {
        self.iova & !SIZE_BITS
    }

    /// Size of the IOVA range in bytes (the request rounded up to a power of
    /// two of pages).
    #[inline]
    pub fn size(&self) -> u64 {
        let order = self.iova & SIZE_BITS;
        if order == FIXED_ORDER {
            u64::from(self.aux) * PAGE_SIZE
        } else {
            1u64 << order
        }
    }

    /// Whether the IOVA was chosen by the caller ([`Domain::try_alloc_at`]):
    /// then [`size`](Self::size) is exactly the size asked for, not a power
    /// of two.
    #[inline]
    pub fn is_fixed(&self) -> bool {
        self.iova & SIZE_BITS == FIXED_ORDER
    }

    /// The offset bits at or above the size (`!(2^order - 1)`): an offset
    /// with one of them set is outside the transaction. `wrapping_shl`
    /// takes the shift modulo 64, the low six bits of `iova`, exactly its
    /// SIZE_BITS (one instruction on x86 and Arm); a fixed-IOVA
    /// transaction (order [`FIXED_ORDER`], 0) gets every bit.
    #[inline(always)]
    fn outside_mask(&self) -> u64 {
        u64::MAX.wrapping_shl(self.iova as u32)
    }

    /// Whether `[offset, offset + 4 KiB)` is a page of the transaction
    /// (the per-page paths' test): `offset` page aligned and below the
    /// size, in one test against a mask of the bits it may not have. For a
    /// power-of-two size 2^order the mask is `!(2^order - 1)` plus the page
    /// offset bits. A fixed-IOVA transaction (order [`FIXED_ORDER`], 0)
    /// gets a mask of every bit: only offset 0 passes, its first page (its
    /// size is at least one page); any other offset answers `false` and
    /// takes the checked path.
    #[inline(always)]
    fn holds_page(&self, offset: u64) -> bool {
        offset & (self.outside_mask() | (PAGE_SIZE - 1)) == 0
    }

    /// Whether `[offset, offset + len)` is a naturally aligned block of the
    /// transaction (the block link's and unlink's test): `len` a power of
    /// two of at least a page, `offset` a multiple of it, and the block
    /// below the size, in one test against
    /// [`outside_mask`](Self::outside_mask). A fixed-IOVA transaction
    /// answers `false` (its mask has every bit).
    #[inline(always)]
    fn holds_block(&self, offset: u64, len: u64) -> bool {
        let mask = self.outside_mask();
        len.is_power_of_two()
            && len >= PAGE_SIZE
            && offset & (len - 1) == 0
            && (offset | (len - 1)) & mask == 0
    }

    /// Whether a per-page link of host memory ([`MapAttrs::MMIO`] not in
    /// `attrs`) at `offset` may take the per-page path of the domain whose
    /// token is `token`: the page is inside the transaction, which belongs
    /// to that domain and holds nothing or host memory only.
    #[inline(always)]
    fn takes_host_page(&self, offset: u64, token: u32, attrs: MapAttrs) -> bool {
        self.holds_page(offset)
            && self.owner & LINK_FAST_MASK == u64::from(token)
            && !attrs.contains(MapAttrs::MMIO)
    }

    /// The bus-address run `[start, end)` of offsets linked.
    fn bus_run(&self) -> (u64, u64) {
        let s = u64::from(self.aux) * PAGE_SIZE;
        (s, s + self.linked)
    }

    /// Bytes currently linked.
    pub fn linked(&self) -> u64 {
        self.linked
    }

    /// The domain the transaction belongs to.
    pub fn domain_id(&self) -> u16 {
        (self.owner >> DOMAIN_SHIFT) as u16
    }

    /// Kind of the linked mappings, `None` while nothing is linked.
    pub fn kind(&self) -> Option<DmaKind> {
        match (self.owner >> KIND_SHIFT) & 0xff {
            KIND_TRANSLATED => Some(DmaKind::Translated),
            KIND_HOST_BRIDGE => Some(DmaKind::P2pThruHostBridge),
            KIND_BUS_ADDR => Some(DmaKind::P2pBusAddr),
            KIND_DIRECT => Some(DmaKind::Direct),
            _ => None,
        }
    }

    /// Union of the directions linked so far, `None` while nothing is linked.
    pub fn direction(&self) -> Option<DmaDirection> {
        DmaDirection::from_bits(self.dirs() & !HAS_PROVIDER)
    }

    /// The P2P provider whose memory is linked, if the links are P2P.
    pub fn provider(&self) -> Option<DeviceId> {
        (self.dirs() & HAS_PROVIDER != 0)
            .then(|| DeviceId::from_rid(self.provider.1, self.provider.0))
    }

    /// The device address of byte `offset` of the transaction (its IOVA; a
    /// bus-address P2P link returns its own address from `link_p2p`).
    ///
    /// # Errors
    ///
    /// [`DmaError::OutsideTransaction`]: `offset` is not below
    /// [`size`](Self::size).
    pub fn dma_addr(&self, offset: u64) -> Result<DmaAddr, DmaError> {
        if offset >= self.size() {
            return Err(DmaError::OutsideTransaction {
                offset,
                len: 0,
                size: self.size(),
            });
        }
        Ok(DmaAddr(self.base() + offset))
    }
}

/// The direct path (identity domain, no IOMMU, bypass): DMA addresses are
/// physical addresses, checked against the device's DMA mask.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DirectState {
    dma_mask: u64,
    size: u64,
    linked: u64,
}

impl DirectState {
    /// A direct-path transaction for a device with `dma_mask`, for up to
    /// `size` bytes. Use it where there is no IOMMU at all.
    ///
    /// # Errors
    ///
    /// [`DmaError::ZeroLength`]: `size` is 0.
    pub fn new(size: u64, dma_mask: u64) -> Result<Self, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroLength);
        }
        Ok(Self {
            dma_mask,
            size,
            linked: 0,
        })
    }

    /// The DMA address of `[phys, phys + len)`: `phys` itself, when the whole
    /// range is reachable under the DMA mask and the transaction's size.
    ///
    /// # Errors
    ///
    /// - [`DmaError::ZeroLength`]: `len` is 0.
    /// - [`DmaError::Overflow`]: `phys + len` (or the linked total) overflows.
    /// - [`DmaError::AboveDmaMask`]: the range ends above the DMA mask: the
    ///   device cannot reach it (bounce it, or use an IOMMU).
    /// - [`DmaError::OutsideTransaction`]: more than the transaction's size
    ///   would be linked.
    ///
    /// Nothing changes on an error.
    pub fn link(&mut self, phys: PhysAddr, len: u64) -> Result<DmaAddr, DmaError> {
        if len == 0 {
            return Err(DmaError::ZeroLength);
        }
        let last = phys
            .0
            .checked_add(len - 1)
            .ok_or(DmaError::Overflow { a: phys.0, b: len })?;
        if last > self.dma_mask {
            return Err(DmaError::AboveDmaMask {
                size: len,
                mask: self.dma_mask,
            });
        }
        let linked = self.linked.checked_add(len).ok_or(DmaError::Overflow {
            a: self.linked,
            b: len,
        })?;
        if linked > self.size {
            return Err(DmaError::OutsideTransaction {
                offset: self.linked,
                len,
                size: self.size,
            });
        }
        self.linked = linked;
        Ok(DmaAddr(phys.0))
    }

    /// Forgets `len` linked bytes (nothing to tear down on the direct path).
    ///
    /// # Errors
    ///
    /// - [`DmaError::ZeroLength`]: `len` is 0.
    /// - [`DmaError::NotLinked`]: `len` is more than is linked.
    pub fn unlink(&mut self, len: u64) -> Result<(), DmaError> {
        if len == 0 {
            return Err(DmaError::ZeroLength);
        }
        if len > self.linked {
            return Err(DmaError::NotLinked {
                iova: DmaAddr(self.linked),
            });
        }
        self.linked -= len;
        Ok(())
    }

    /// Bytes currently linked.
    pub fn linked(&self) -> u64 {
        self.linked
    }

    /// Always [`DmaKind::Direct`].
    pub fn kind(&self) -> DmaKind {
        DmaKind::Direct
    }
}

/// What [`Domain::try_alloc`] hands out (Linux's `dma_use_iova()` made a type).
#[must_use]
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DmaPath {
    /// The IOMMU translates: link physical ranges into the IOVA range.
    Iova(IovaState),
    /// Identity domain: use physical addresses.
    Direct(DirectState),
}

impl DmaPath {
    /// The IOVA state, if this is the IOVA path.
    pub fn into_iova(self) -> Option<IovaState> {
        match self {
            DmaPath::Iova(s) => Some(s),
            DmaPath::Direct(_) => None,
        }
    }
}

/// A one-step mapping ([`Domain::map`]): the transaction and the address,
/// which knows its own kind, so `unmap` can never confuse an IOVA with a
/// bus address.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Mapping {
    state: IovaState,
    addr: DmaAddr,
}

impl Mapping {
    /// The device address to program.
    pub fn addr(&self) -> DmaAddr {
        self.addr
    }

    /// Bytes mapped.
    pub fn len(&self) -> u64 {
        self.state.linked
    }

    /// Whether nothing is mapped (never true for a mapping `map` returned).
    pub fn is_empty(&self) -> bool {
        self.state.linked == 0
    }

    /// Kind of the mapping.
    pub fn kind(&self) -> Option<DmaKind> {
        self.state.kind()
    }
}

/// Settings of a translated domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DomainConfig {
    /// Hardware tag: SMMU ASID (stage 1) / VMID (stage 2), VT-d domain-id.
    pub id: u16,
    /// Page-table levels (3 → 39-bit, 4 → 48-bit IOVAs).
    pub levels: u8,
    /// IOVAs handed out lie in `[aperture_start, aperture_end)`.
    pub aperture_start: u64,
    /// End (exclusive) of the aperture; at most `1 << (12 + 9 * levels)`.
    pub aperture_end: u64,
    /// Whether the IOMMU walker snoops CPU caches (see
    /// [`IommuBackend::coherent_walk`]); if not, table writes are cleaned.
    pub coherent_walk: bool,
}

const PENDING: usize = 16;

#[derive(Clone, Copy, Debug)]
struct Inval {
    start: u64,
    end: u64,
    leaf_only: bool,
}

/// Ranges whose translations changed since the last sync.
///
/// The range a run of per-page calls grows is kept apart from the others
/// (`last`), so that growing it by a page is one compare and one store.
struct PendingList {
    /// The range added last, `[0, 0)` when none (growing that one from 0
    /// is right too).
    last: Inval,
    /// The ranges before `last`.
    list: heapless::Vec<Inval, { PENDING - 1 }>,
    /// More than [`PENDING`] separate ranges were added: the whole domain.
    overflow: bool,
}

/// No range: `PendingList::last` when the list is empty.
const NO_INVAL: Inval = Inval {
    start: 0,
    end: 0,
    leaf_only: true,
};

impl PendingList {
    const fn new() -> Self {
        Self {
            last: NO_INVAL,
            list: heapless::Vec::new(),
            overflow: false,
        }
    }

    /// Adds the page at `start` (page aligned), leaf entries only. The
    /// next page of a run, the common case, is one test.
    #[inline(always)]
    fn add_page(&mut self, start: u64) {
        if start == self.last.end {
            // `start + PAGE_SIZE` cannot overflow: `start` is a page below
            // the input range's end, at most 2^57.
            self.last.end = start + PAGE_SIZE;
            return;
        }
        self.add(start, PAGE_SIZE, true);
    }

    #[inline]
    fn add(&mut self, start: u64, len: u64, leaf_only: bool) {
        if self.overflow {
            // The whole domain is invalidated at the sync: nothing to note
            // (one test per call once the scattered pages overflowed).
            return;
        }
        let end = start.saturating_add(len);
        let last = &mut self.last;
        if last.start == last.end {
            // The first range since the sync (a lone unlink, e.g. of a
            // block): nothing to move to `list`.
            *last = Inval {
                start,
                end,
                leaf_only,
            };
            return;
        }
        if start <= last.end && end >= last.start {
            // Touches the last range (a run of links or unlinks): grow it.
            last.start = last.start.min(start);
            last.end = last.end.max(end);
            last.leaf_only &= leaf_only;
            return;
        }
        self.push(start, end, leaf_only);
    }

    /// Starts a new last range, the old one moving to `list`.
    #[inline(never)]
    fn push(&mut self, start: u64, end: u64, leaf_only: bool) {
        let new = Inval {
            start,
            end,
            leaf_only,
        };
        let old = core::mem::replace(&mut self.last, new);
        if old.start != old.end && self.list.push(old).is_err() {
            self.overflow = true;
        }
    }

    /// Calls `f` on each range, oldest first, stopping at its first error
    /// (meaningless when `overflow`).
    #[inline]
    fn for_each<E>(&self, mut f: impl FnMut(&Inval) -> Result<(), E>) -> Result<(), E> {
        for r in &self.list {
            f(r)?;
        }
        if self.last.start != self.last.end {
            f(&self.last)?;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.last.start == self.last.end && self.list.is_empty() && !self.overflow
    }

    #[inline]
    fn clear(&mut self) {
        self.last = NO_INVAL;
        self.list.clear();
        self.overflow = false;
    }
}

/// Queues the invalidation of every range of `unmapped` (walk caches too
/// where a table went) and, when `with_maps` (the backend caches
/// not-present entries), of `mapped`; the whole domain instead when either
/// list overflowed. The caller has ordered the table stores before it.
fn queue_ranges<B: IommuBackend + ?Sized>(
    backend: &mut B,
    info: &DomainInfo,
    unmapped: &PendingList,
    mapped: &PendingList,
    with_maps: bool,
) -> Result<(), BackendError> {
    if unmapped.overflow || (with_maps && mapped.overflow) {
        return backend.invalidate_domain(info);
    }
    unmapped
        .for_each(|r| backend.invalidate(info, DmaAddr(r.start), r.end - r.start, r.leaf_only))?;
    if with_maps {
        mapped.for_each(|r| backend.invalidate(info, DmaAddr(r.start), r.end - r.start, true))?;
    }
    Ok(())
}

struct Translated<F: PteFormat, M: TableMemory> {
    pt: IoPageTable<F, M>,
    iova: IovaAllocator,
    /// Unlinked ranges: always invalidated at sync.
    unmapped: PendingList,
    /// Linked ranges: invalidated only when the backend caches not-present entries.
    mapped: PendingList,
}

impl<F: PteFormat, M: TableMemory> Translated<F, M> {
    /// Whether a sync has nothing to invalidate: links only since the last
    /// one (a new valid entry replaced a not-present one, which no TLB or
    /// walk cache holds) on a backend that does not cache not-present
    /// entries (`with_maps` false), and no table retired.
    #[inline(always)]
    fn nothing_to_invalidate(&self, with_maps: bool) -> bool {
        self.unmapped.is_empty()
            && (!with_maps || self.mapped.is_empty())
            && self.pt.retired_pages() == 0
    }

    /// The rest of a sync with something to invalidate: queues the
    /// invalidation of every pending range (the whole domain when the
    /// ranges overflowed) after a barrier, waits for its completion, then
    /// clears the ranges and hands the retired tables back. Out of line,
    /// so a sync after links only saves no registers for it.
    #[inline(never)]
    fn invalidate_and_wait<B: IommuBackend + ?Sized>(
        &mut self,
        id: u16,
        with_maps: bool,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        let info = self.info(id);
        // Table stores happen before the backend's doorbell write.
        wmb_on(self.pt.memory());
        queue_ranges(backend, &info, &self.unmapped, &self.mapped, with_maps)?;
        backend.sync()?;
        self.unmapped.clear();
        self.mapped.clear();
        // The completion covers every table retired so far (the retired
        // list has no capacity, so no empty table is ever left attached).
        self.pt.free_retired();
        Ok(())
    }

    fn info(&self, id: u16) -> DomainInfo {
        DomainInfo {
            id,
            root: self.pt.root(),
            format: F::KIND,
            levels: self.pt.levels(),
            ias_bits: self.pt.ias_bits() as u8,
        }
    }
}

/// What a shared sync queued (`crate::shared::SharedDomain::sync`): the
/// completion's ticket, and the retired-page count and handed-back count
/// it saw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncBegun {
    pub(crate) ticket: u64,
    retired: usize,
    popped: u64,
}

/// An IOMMU domain: a page table, its IOVA space and its pending
/// invalidations — or an identity domain, where DMA bypasses translation.
///
/// Dropping a translated domain hands **no** table page back: the IOMMU may
/// still walk them (a device still attached, or a walk cached). Give the
/// pages back with [`teardown`](Self::teardown), which invalidates the whole
/// domain and waits for it first; a dropped domain's pages stay lent.
///
/// # Example
///
/// A network card's receive ring: three scattered pages the device sees as
/// 12 KiB contiguous below 4 GiB. (`Heap` is a host lender like the one in
/// the [crate example](crate); the backend would be an
/// [`Smmu`](crate::smmuv3::Smmu) or a [`Vtd`](crate::vtd::Vtd).)
///
/// ```
/// # struct Heap;
/// # // SAFETY: zeroed, size-aligned blocks, valid until freed; physical = virtual.
/// # unsafe impl bare_iommu::TableMemory for Heap {
/// #     fn alloc_zeroed(&self, pages: usize) -> Option<bare_iommu::PhysAddr> {
/// #         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).ok()?;
/// #         if pages == 0 { return None; }
/// #         // SAFETY: non-zero size.
/// #         let p = unsafe { std::alloc::alloc_zeroed(l) };
/// #         (!p.is_null()).then(|| bare_iommu::PhysAddr(p as u64))
/// #     }
/// #     unsafe fn free(&self, pa: bare_iommu::PhysAddr, pages: usize) {
/// #         let l = std::alloc::Layout::from_size_align(pages * 4096, pages.next_power_of_two() * 4096).unwrap();
/// #         // SAFETY: allocated above with this layout.
/// #         unsafe { std::alloc::dealloc(pa.0 as *mut u8, l) }
/// #     }
/// #     fn phys_to_virt(&self, pa: bare_iommu::PhysAddr) -> *mut u8 { pa.0 as *mut u8 }
/// # }
/// use bare_iommu::pgtable::arm::ArmStage1;
/// use bare_iommu::testing::RecordingBackend;
/// use bare_iommu::{DeviceId, DmaAddr, DmaDirection, DmaPath, Domain, DomainConfig};
/// use bare_iommu::{IommuBackend, MapAttrs, PhysAddr};
///
/// # fn main() -> Result<(), bare_iommu::DmaError> {
/// let mut iommu = RecordingBackend::new();
/// let nic = DeviceId::new(0, 3, 0, 0).unwrap();
///
/// // IOVAs in [1 MiB, 4 GiB), 4-level stage-1 tables lent by `Heap`.
/// let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 1 << 20, aperture_end: 1 << 32, coherent_walk: true };
/// let mut dom = Domain::new(ArmStage1, Heap, cfg)?;
/// iommu.attach(nic, dom.attachment())?;
///
/// let pages = [PhysAddr(0x8_1000_0000), PhysAddr(0x8_2000_0000), PhysAddr(0x8_3000_0000)];
/// let mut rx = dom.try_alloc(3 * 4096, u32::MAX.into())?.into_iova().expect("a translated domain");
/// dom.link_pages(&mut rx, &pages, 0, DmaDirection::FromDevice, MapAttrs::empty())?;
/// dom.sync(&mut iommu)?;
/// let ring = rx.iova(); // program the NIC with this
/// assert_eq!(dom.translate(DmaAddr(ring.0 + 4096)).map(|(pa, _)| pa), Some(pages[1]));
///
/// // Done: unlink, wait, release the range; then the domain itself.
/// dom.destroy(rx, &mut iommu)?;
/// iommu.detach(nic)?;
/// dom.teardown(&mut iommu).map_err(|(_, e)| e)?;
///
/// // An identity domain hands out the direct path: DMA addresses are
/// // physical addresses, checked against the device's mask.
/// let mut bypass = Domain::<ArmStage1, Heap>::identity(2);
/// let DmaPath::Direct(mut d) = bypass.try_alloc(4096, u32::MAX.into())? else { unreachable!() };
/// assert_eq!(d.link(PhysAddr(0x1000), 4096)?, DmaAddr(0x1000));
/// # Ok(()) }
/// ```
pub struct Domain<F: PteFormat, M: TableMemory> {
    id: u16,
    /// Unique per domain; transactions carry it (`NEXT_TOKEN`).
    token: u32,
    inner: Option<Translated<F, M>>,
}

/// Whether `F` is a VT-d format (its domains reserve the interrupt window).
fn is_vtd<F: PteFormat>() -> bool {
    matches!(
        F::KIND,
        TableFormat::VtdSecondLevel | TableFormat::VtdFirstLevel
    )
}

#[inline]
fn check_aligned(v: u64) -> Result<(), DmaError> {
    if v % PAGE_SIZE != 0 {
        Err(DmaError::Unaligned { value: v })
    } else {
        Ok(())
    }
}

/// The kind a link with `attrs` makes, refused if the transaction already
/// holds links of another kind.
#[inline(always)]
fn link_kind(tx: &IovaState, attrs: MapAttrs) -> Result<DmaKind, DmaError> {
    let kind = if attrs.contains(MapAttrs::MMIO) {
        DmaKind::P2pThruHostBridge
    } else {
        DmaKind::Translated
    };
    if tx.linked != 0 && tx.kind() != Some(kind) {
        return Err(DmaError::MixedP2p);
    }
    Ok(kind)
}

/// The attributes written: the caller's, with read/write from `dir`.
#[inline(always)]
fn link_attrs(attrs: MapAttrs, dir: DmaDirection) -> MapAttrs {
    (attrs - MapAttrs::READ - MapAttrs::WRITE) | dir.attrs()
}

/// Bookkeeping after a link's table write `r` (all or nothing).
#[inline(always)]
fn finish_link<F: PteFormat, M: TableMemory>(
    t: &mut Translated<F, M>,
    tx: &mut IovaState,
    iova: u64,
    len: u64,
    kind: DmaKind,
    dir: DmaDirection,
    r: Result<(), PageTableError>,
) -> Result<DmaAddr, DmaError> {
    if let Err(e) = r {
        if matches!(
            e,
            PageTableError::OutOfMemory | PageTableError::PhysTooLarge { .. }
        ) {
            // Entries (tables at least) may have been written and taken back:
            // a walker may have cached them, so they are invalidated like an
            // unlink, walk caches included, and the tables taken back wait
            // for that sync.
            t.unmapped.add(iova, len, false);
        }
        return Err(e.into());
    }
    t.mapped.add(iova, len, true);
    tx.linked += len;
    tx.record_links(kind, tx.dirs() | dir as u8);
    Ok(DmaAddr(iova))
}

/// Shows the tag and, for a translated domain, its format, root, levels,
/// table pages and IOVA bytes in use; neither the lender nor the tables.
impl<F: PteFormat, M: TableMemory> core::fmt::Debug for Domain<F, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut d = f.debug_struct("Domain");
        d.field("id", &self.id);
        match &self.inner {
            None => d.field("identity", &true),
            Some(t) => d
                .field("format", &F::KIND)
                .field("root", &t.pt.root())
                .field("levels", &t.pt.levels())
                .field("table_pages", &t.pt.table_pages())
                .field("iova_in_use", &t.iova.in_use()),
        };
        d.finish_non_exhaustive()
    }
}

#[cfg(feature = "defmt")]
impl<F: PteFormat, M: TableMemory> defmt::Format for Domain<F, M> {
    fn format(&self, f: defmt::Formatter<'_>) {
        match &self.inner {
            None => defmt::write!(f, "Domain {{ id: {=u16}, identity }}", self.id),
            Some(t) => defmt::write!(
                f,
                "Domain {{ id: {=u16}, format: {}, root: {}, levels: {=u8}, table_pages: {=usize}, iova_in_use: {=u64} }}",
                self.id,
                F::KIND,
                t.pt.root(),
                t.pt.levels(),
                t.pt.table_pages(),
                t.iova.in_use()
            ),
        }
    }
}

impl<F: PteFormat, M: TableMemory> Domain<F, M> {
    /// A translated domain with an empty page table taken from `mem`.
    ///
    /// Refused with [`BackendError::LenderCannotClean`] when the walk is not
    /// coherent (`config.coherent_walk == false`) and the lender cannot clean
    /// caches ([`TableMemory::can_clean`]): the IOMMU would read stale tables.
    ///
    /// # Errors
    ///
    /// - [`DmaError::Backend`]`(`[`BackendError::LenderCannotClean`]`)`: as
    ///   above.
    /// - [`DmaError::BadConfig`]: `levels` is not 2 to 5 (`what: "levels"`),
    ///   the aperture ends past what `levels` levels translate
    ///   (`"aperture_end"`), or `aperture_start >= aperture_end` or the
    ///   aperture passes 2^57 (`"aperture"`).
    /// - [`DmaError::Unaligned`]: an aperture bound is not 4 KiB aligned.
    /// - [`DmaError::TokensExhausted`]: 2^32 domains were made in this
    ///   program.
    /// - [`DmaError::OutOfMemory`], [`DmaError::PhysTooLarge`]: the lender
    ///   refused the root table page, or lent one above the format's output
    ///   address size.
    pub fn new(fmt: F, mem: M, config: DomainConfig) -> Result<Self, DmaError> {
        if !config.coherent_walk && !mem.can_clean() {
            return Err(DmaError::Backend(BackendError::LenderCannotClean));
        }
        if !(2..=5).contains(&config.levels) {
            return Err(DmaError::BadConfig {
                what: "levels",
                value: u64::from(config.levels),
            });
        }
        let limit = 1u64 << (12 + 9 * u32::from(config.levels));
        if config.aperture_end > limit {
            return Err(DmaError::BadConfig {
                what: "aperture_end",
                value: config.aperture_end,
            });
        }
        let mut iova = IovaAllocator::new(config.aperture_start, config.aperture_end)?;
        if is_vtd::<F>() {
            // The interrupt window, clipped to the aperture (both ends are
            // page aligned, and the allocator is empty: cannot fail).
            let (ws, we) = VTD_INTERRUPT_WINDOW;
            let (s, e) = (ws.max(config.aperture_start), we.min(config.aperture_end));
            if s < e {
                iova.reserve(s, e - s)?;
            }
        }
        let token = new_token()?;
        let pt = IoPageTable::new(fmt, mem, config.levels, config.coherent_walk)?;
        Ok(Self {
            id: config.id,
            token,
            inner: Some(Translated {
                pt,
                iova,
                unmapped: PendingList::new(),
                mapped: PendingList::new(),
            }),
        })
    }

    /// An identity domain: [`try_alloc`](Self::try_alloc) hands out the
    /// direct path and devices attached with [`attachment`](Self::attachment)
    /// bypass translation.
    pub fn identity(id: u16) -> Self {
        // No transaction is ever made from an identity domain: no token.
        Self {
            id,
            token: 0,
            inner: None,
        }
    }

    /// The domain's hardware tag.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// What a backend needs to translate through this domain, or `None` for
    /// an identity domain.
    pub fn info(&self) -> Option<DomainInfo> {
        self.inner.as_ref().map(|t| t.info(self.id))
    }

    /// How to attach devices to this domain: `backend.attach(dev, dom.attachment())`.
    pub fn attachment(&self) -> Attachment {
        match self.info() {
            Some(info) => Attachment::Translated(info),
            None => Attachment::Bypass,
        }
    }

    /// The page table (for inspection and software translation), if translated.
    pub fn page_table(&self) -> Option<&IoPageTable<F, M>> {
        self.inner.as_ref().map(|t| &t.pt)
    }

    /// Software translation of `iova` through this domain's tables.
    pub fn translate(&self, iova: DmaAddr) -> Option<(PhysAddr, MapAttrs)> {
        self.inner
            .as_ref()?
            .pt
            .translate(iova)
            .map(|(pa, a, _)| (pa, a))
    }

    /// Whether invalidations are waiting for [`sync`](Self::sync).
    pub fn has_pending(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|t| !t.unmapped.is_empty() || !t.mapped.is_empty())
    }

    /// Step 1: reserve a contiguous IOVA range of at least `size` bytes,
    /// entirely at or below `dma_mask`, for one whole transaction.
    ///
    /// For an identity domain this returns [`DmaPath::Direct`].
    ///
    /// # Errors
    ///
    /// - [`DmaError::ZeroLength`]: `size` is 0.
    /// - [`DmaError::Overflow`]: `size` overflows when rounded up to a page.
    /// - [`DmaError::AboveDmaMask`]: no range of that size fits below
    ///   `dma_mask` inside the domain's aperture.
    /// - [`DmaError::IovaExhausted`]: the aperture has no free range of that
    ///   size below the mask (free transactions, or use a larger aperture).
    /// - [`DmaError::AllocatorFull`]: the domain already has
    ///   [`MAX_RANGES`](crate::iova::MAX_RANGES) transactions open.
    pub fn try_alloc(&mut self, size: u64, dma_mask: u64) -> Result<DmaPath, DmaError> {
        if size == 0 {
            return Err(DmaError::ZeroLength);
        }
        let Some(t) = self.inner.as_mut() else {
            return Ok(DmaPath::Direct(DirectState::new(size, dma_mask)?));
        };
        let size = crate::addr::page_round_up(size).ok_or(DmaError::Overflow {
            a: size,
            b: PAGE_SIZE,
        })?;
        let r = t.iova.alloc(size, dma_mask)?;
        log_debug!("iova alloc {:#x}+{:#x}", r.start, r.size);
        Ok(DmaPath::Iova(IovaState::new(
            r.start | u64::from(r.size.trailing_zeros()),
            self.token,
            self.id,
            0,
        )))
    }

    /// Refuses `[start, start + size)` for a VT-d domain when it touches the
    /// interrupt window, even outside the aperture (where the allocator
    /// holds no reservation for it).
    fn check_interrupt_window(start: u64, size: u64) -> Result<(), DmaError> {
        let (ws, we) = VTD_INTERRUPT_WINDOW;
        if is_vtd::<F>() && start < we && start.saturating_add(size) > ws {
            return Err(DmaError::IovaReserved {
                start,
                size,
                reserved_start: ws,
                reserved_end: we,
            });
        }
        Ok(())
    }

    /// Reserves `[iova, iova + size)`: [`try_alloc`](Self::try_alloc) never
    /// hands out an address in it, and [`try_alloc_at`](Self::try_alloc_at)
    /// and [`install_identity_regions`](Self::install_identity_regions)
    /// refuse it. A reservation lasts as long as the domain. VT-d domains
    /// reserve the interrupt window ([`VTD_INTERRUPT_WINDOW`]) themselves.
    ///
    /// # Errors
    ///
    /// Nothing changes on an error.
    /// - [`DmaError::IdentityDomain`]: the domain does not translate.
    /// - [`DmaError::ZeroLength`], [`DmaError::Unaligned`] (`iova` or
    ///   `size` not 4 KiB aligned), [`DmaError::Overflow`].
    /// - [`DmaError::OutsideAperture`]: not inside the domain's aperture.
    /// - [`DmaError::IovaReserved`] / [`DmaError::IovaInUse`]: it overlaps a
    ///   reserved range / a live transaction or identity region.
    /// - [`DmaError::ReservedFull`]: the domain holds
    ///   [`MAX_FIXED`](crate::iova::MAX_FIXED) fixed ranges already.
    pub fn reserve(&mut self, iova: DmaAddr, size: u64) -> Result<(), DmaError> {
        let t = self.inner.as_mut().ok_or(DmaError::IdentityDomain)?;
        t.iova.reserve(iova.0, size)
    }

    /// The reserved ranges, fixed-IOVA transactions and identity regions of
    /// the domain, sorted by address (empty for an identity domain).
    pub fn fixed_ranges(&self) -> &[FixedRange] {
        self.inner.as_ref().map_or(&[], |t| t.iova.fixed())
    }

    /// Step 1 at a caller-chosen address: a transaction for exactly
    /// `[iova, iova + size)` (identity maps, fixed device addresses). The
    /// rest of the two-step API works on it unchanged (`link` at offsets
    /// from `iova`, `unlink`, `sync`, `free` / `destroy`), except that
    /// bus-address P2P links are refused (their device address is not the
    /// IOVA: use [`try_alloc`](Self::try_alloc)). [`IovaState::size`] is
    /// `size` exactly.
    ///
    /// # Errors
    ///
    /// Nothing changes on an error.
    /// - [`DmaError::IdentityDomain`]: the domain does not translate (DMA
    ///   addresses are already physical addresses).
    /// - [`DmaError::ZeroLength`], [`DmaError::Unaligned`] (`iova` or
    ///   `size` not 4 KiB aligned), [`DmaError::Overflow`].
    /// - [`DmaError::IovaReserved`]: the range touches a reserved range, on
    ///   VT-d the interrupt window even outside the aperture.
    /// - [`DmaError::OutsideAperture`]: not inside the domain's aperture.
    /// - [`DmaError::IovaInUse`]: it overlaps a live transaction (from
    ///   `try_alloc` or `try_alloc_at`) or an identity region.
    /// - [`DmaError::BadConfig`] (`what: "fixed_size"`): `size` is 2^44
    ///   bytes or more (2^32 pages, the most a fixed state records).
    /// - [`DmaError::ReservedFull`]: the domain holds
    ///   [`MAX_FIXED`](crate::iova::MAX_FIXED) fixed ranges already.
    pub fn try_alloc_at(&mut self, iova: DmaAddr, size: u64) -> Result<IovaState, DmaError> {
        let token = self.token;
        let domain = self.id;
        let t = self.inner.as_mut().ok_or(DmaError::IdentityDomain)?;
        if size == 0 {
            return Err(DmaError::ZeroLength);
        }
        Self::check_interrupt_window(iova.0, size)?;
        let pages = u32::try_from(size / PAGE_SIZE).map_err(|_| DmaError::BadConfig {
            what: "fixed_size",
            value: size,
        })?;
        let r = t.iova.alloc_at(iova.0, size)?;
        log_debug!("iova alloc_at {:#x}+{:#x}", r.start, r.size);
        Ok(IovaState::new(r.start | FIXED_ORDER, token, domain, pages))
    }

    /// Installs firmware's reserved regions (DMAR RMRRs, IORT RMRs: see
    /// [`crate::firmware`]) as identity maps (IOVA = physical address,
    /// read and write) in one call, then [`sync`](Self::sync)s once.
    ///
    /// The domain keeps them: no state is returned, each shows in
    /// [`fixed_ranges`](Self::fixed_ranges) as
    /// [`FixedUse::Identity`](crate::iova::FixedUse::Identity), no IOVA in
    /// them is handed out, and they stay mapped until
    /// [`teardown`](Self::teardown) (firmware's devices may use them at any
    /// time: Linux maps RMRRs for the device's whole life too,
    /// `iommu_create_device_direct_mappings`). The domain's aperture must
    /// cover them. An identity domain needs nothing: `Ok(())`.
    ///
    /// Each region must be page aligned at both ends, as the DMAR spec
    /// requires of an RMRR (Linux refuses others in `rmrr_sanity_check`).
    ///
    /// # Errors
    ///
    /// Until the sync, all or nothing: on an error no region stays
    /// installed (what was written is taken back and invalidated at the
    /// next sync).
    /// - [`DmaError::ZeroLength`], [`DmaError::Unaligned`],
    ///   [`DmaError::Overflow`]: a region is empty, unaligned or wraps.
    /// - [`DmaError::IovaReserved`]: a region touches a reserved range (on
    ///   VT-d, the interrupt window).
    /// - [`DmaError::OutsideAperture`], [`DmaError::IovaInUse`],
    ///   [`DmaError::ReservedFull`]: as for [`try_alloc_at`](Self::try_alloc_at)
    ///   (two regions overlapping each other give `IovaInUse`).
    /// - [`DmaError::PhysTooLarge`], [`DmaError::OutOfMemory`]: the table
    ///   format cannot reach a region / the lender refused a table page.
    /// - [`DmaError::Backend`]: the sync failed. The regions **are**
    ///   installed then; call [`sync`](Self::sync) again before relying on
    ///   them.
    pub fn install_identity_regions<B: IommuBackend + ?Sized>(
        &mut self,
        regions: &[ReservedRegion],
        backend: &mut B,
    ) -> Result<(), DmaError> {
        let Some(t) = self.inner.as_mut() else {
            return Ok(());
        };
        let mut done = 0;
        let mut failed = None;
        for r in regions {
            if let Err(e) = Self::install_one(t, r) {
                failed = Some(e);
                break;
            }
            done += 1;
        }
        if let Some(e) = failed {
            for r in &regions[..done] {
                // Installed above, so inside the aperture: cannot fail.
                if let Ok(out) = t.pt.unmap_present(DmaAddr(r.base), r.len) {
                    t.unmapped.add(r.base, r.len, !out.freed_tables);
                }
                t.iova.release_identity(r.base);
            }
            return Err(e);
        }
        self.sync(backend)
    }

    /// One region of [`install_identity_regions`](Self::install_identity_regions):
    /// all or nothing.
    fn install_one(t: &mut Translated<F, M>, r: &ReservedRegion) -> Result<(), DmaError> {
        if r.len == 0 {
            return Err(DmaError::ZeroLength);
        }
        Self::check_interrupt_window(r.base, r.len)?;
        let range = t.iova.alloc_identity(r.base, r.len)?;
        let end = range.start + range.size;
        // `alloc_identity` checked: page aligned, non-empty, inside the
        // aperture (so inside the table), no overflow; phys = iova.
        let attrs = DmaDirection::Bidirectional.attrs();
        match t.pt.map_prechecked(range.start, range.start, end, attrs) {
            Ok(()) => {
                t.mapped.add(range.start, range.size, true);
                Ok(())
            }
            Err(e) => {
                if matches!(
                    e,
                    PageTableError::OutOfMemory | PageTableError::PhysTooLarge { .. }
                ) {
                    // As in `finish_link`: tables written and taken back
                    // are invalidated, walk caches included.
                    t.unmapped.add(range.start, range.size, false);
                }
                t.iova.release_identity(range.start);
                Err(e.into())
            }
        }
    }

    #[inline]
    fn translated(&mut self, tx: &IovaState) -> Result<&mut Translated<F, M>, DmaError> {
        // The token, not the id: two domains may share an id (one torn down,
        // one new; or two IOMMUs), never a token.
        if tx.token() != self.token {
            return Err(DmaError::WrongDomain {
                expected: tx.domain_id(),
                found: self.id,
            });
        }
        self.inner.as_mut().ok_or(DmaError::IdentityDomain)
    }

    /// Checks `[offset, offset + len)` against the transaction.
    #[inline]
    fn check_window(tx: &IovaState, offset: u64, len: u64) -> Result<u64, DmaError> {
        if len == 0 {
            return Err(DmaError::ZeroLength);
        }
        if (offset | len) % PAGE_SIZE != 0 {
            // One test for both on the way through; the error names the
            // first that is wrong.
            check_aligned(offset)?;
            check_aligned(len)?;
        }
        let end = offset
            .checked_add(len)
            .ok_or(DmaError::Overflow { a: offset, b: len })?;
        if end > tx.size() {
            return Err(DmaError::OutsideTransaction {
                offset,
                len,
                size: tx.size(),
            });
        }
        Ok(tx.base() + offset)
    }

    /// Step 2: link `[phys, phys + len)` at `offset` into the transaction,
    /// with the permissions of `dir` plus `attrs`. Writes tables only; call
    /// [`sync`](Self::sync) before the device uses the range.
    ///
    /// All or nothing: on any error the tables and the state are unchanged.
    /// `attrs` containing [`MapAttrs::MMIO`] makes this a P2P-through-host-
    /// bridge link; mixing it with host-memory links in one transaction is
    /// refused with [`DmaError::MixedP2p`].
    ///
    /// # Errors
    ///
    /// - [`DmaError::ZeroLength`]: `len` is 0.
    /// - [`DmaError::Unaligned`]: `offset` or `len` is not page aligned.
    /// - [`DmaError::Overflow`], [`DmaError::OutsideTransaction`]:
    ///   `[offset, offset + len)` overflows or is not inside the
    ///   transaction's [`size`](IovaState::size).
    /// - [`DmaError::WrongDomain`]: `tx` was made by another domain (or one
    ///   torn down).
    /// - [`DmaError::Unaligned`] also when `phys` is not page aligned;
    ///   [`DmaError::Overflow`] when `phys + len` overflows.
    /// - [`DmaError::MixedP2p`]: the transaction already holds links of
    ///   another kind (host memory vs. [`MapAttrs::MMIO`] or bus-address P2P).
    /// - [`DmaError::AlreadyLinked`]: part of the range is linked.
    /// - [`DmaError::PhysTooLarge`]: `phys + len` passes the format's output
    ///   address size.
    /// - [`DmaError::OutOfMemory`]: the lender refused a table page (what was
    ///   written is taken back and invalidated at the next sync).
    /// - [`DmaError::IdentityDomain`]: never for a state this domain made
    ///   (an identity domain hands out [`DmaPath::Direct`]).
    #[inline(always)]
    pub fn link(
        &mut self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        // The per-page link of host memory, in the shape the last link had
        // (see `IoPageTable::map_page_fast`): one combined test of the
        // offset, the transaction's domain and kind, then the table's own
        // one-page path. Any other call (nothing done) goes down
        // `link_checked`, which checks each argument and names the error.
        // The only failures here are `AlreadyMapped` (nothing changed) or
        // `OutOfMemory` / `PhysTooLarge` for a table page (what was written
        // is taken back and queued for invalidation, as on the full path).
        // Written out here, not in a helper returning an outcome: the
        // compiler then returns the common case without storing and
        // re-reading a large `Result`.
        if len == PAGE_SIZE && tx.takes_host_page(offset, self.token, attrs) {
            if let Some(t) = self.inner.as_mut() {
                // Page aligned (base and offset are) and inside the
                // aperture, which `new` checked lies inside the table's
                // input range.
                let iova = tx.base() + offset;
                match t.pt.map_page_in_range(iova, phys.0, link_attrs(attrs, dir)) {
                    Some(Ok(())) => {
                        t.mapped.add_page(iova);
                        tx.linked += PAGE_SIZE;
                        // The kind was nothing or host memory (the mask
                        // above): host memory now.
                        tx.owner |=
                            (KIND_TRANSLATED << KIND_SHIFT) | (u64::from(dir as u8) << DIRS_SHIFT);
                        return Ok(DmaAddr(iova));
                    }
                    Some(Err(e)) => return Err(self.link_page_failed(iova, PAGE_SIZE, e)),
                    None => {}
                }
            }
        } else if tx.owner & LINK_FAST_MASK == u64::from(self.token)
            && !attrs.contains(MapAttrs::MMIO)
            && tx.holds_block(offset, len)
        {
            // A whole 2 MiB / 1 GiB block of host memory, in a transaction
            // of this domain holding nothing or host memory (the per-page
            // test above, for a block): `IoPageTable::map_block_fast` is
            // the rest of the check (`None` for any other shape or a
            // non-empty entry, nothing changed).
            if let Some(t) = self.inner.as_mut() {
                // Aligned to `len` (base and offset are) and inside the
                // aperture, as for a page.
                let iova = tx.base() + offset;
                match t
                    .pt
                    .map_block_fast(iova, phys.0, len, link_attrs(attrs, dir))
                {
                    Some(Ok(())) => {
                        // As `finish_link` records a link.
                        t.mapped.add(iova, len, true);
                        tx.linked += len;
                        tx.owner |=
                            (KIND_TRANSLATED << KIND_SHIFT) | (u64::from(dir as u8) << DIRS_SHIFT);
                        return Ok(DmaAddr(iova));
                    }
                    Some(Err(e)) => return Err(self.link_page_failed(iova, len, e)),
                    None => {}
                }
            }
        }
        self.link_checked(tx, phys, offset, len, dir, attrs)
    }

    /// The per-page (or block) link's table write at `[iova, iova + len)`
    /// failed with `e`: what a failed link does after it ([`finish_link`]),
    /// off the per-call path.
    #[cold]
    #[inline(never)]
    fn link_page_failed(&mut self, iova: u64, len: u64, e: PageTableError) -> DmaError {
        if let Some(t) = self.inner.as_mut() {
            if matches!(
                e,
                PageTableError::OutOfMemory | PageTableError::PhysTooLarge { .. }
            ) {
                // As in `finish_link`: tables were written and taken back.
                t.unmapped.add(iova, len, false);
            }
        }
        e.into()
    }

    /// [`link`](Self::link) of any shape, every argument checked. Cold: a
    /// run of per-page calls reaches it only when the shape changes (or on
    /// an error), a multi-page link once per call; marking it so lays
    /// `link`'s one-page path out as the fall-through, a few instructions
    /// fewer per page (callgrind, issue 11).
    #[cold]
    #[inline(never)]
    fn link_checked(
        &mut self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        if tx.linked != 0 && tx.dirs() & HAS_PROVIDER != 0 {
            return Err(DmaError::MixedP2p);
        }
        self.link_inner(tx, phys, offset, len, dir, attrs)
    }

    #[inline(always)]
    fn link_inner(
        &mut self,
        tx: &mut IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let (iova, kind) = Self::check_link(tx, phys, offset, len, attrs)?;
        let t = self.translated(tx)?;
        // The window check above proved what `map` would check again: a
        // page-aligned, non-empty range inside the aperture, an aligned
        // physical start, no overflow; `link_attrs` makes `dir` grant access.
        let r =
            t.pt.map_prechecked(iova, phys.0, iova + len, link_attrs(attrs, dir));
        finish_link(t, tx, iova, len, kind, dir, r)
    }

    /// Links separate 4 KiB physical pages (a scatter list) at consecutive
    /// offsets from `offset`, in one call: the same contract as
    /// [`link`](Self::link) (tables only, all or nothing), with one table
    /// walk per 2 MiB instead of one per page.
    ///
    /// # Errors
    ///
    /// As [`link`](Self::link), with `len = pages.len() * 4096`
    /// ([`DmaError::ZeroLength`] for no pages); [`DmaError::Unaligned`] or
    /// [`DmaError::PhysTooLarge`] name the first bad page.
    pub fn link_pages(
        &mut self,
        tx: &mut IovaState,
        pages: &[PhysAddr],
        offset: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
    ) -> Result<DmaAddr, DmaError> {
        let (iova, len, kind) = Self::check_link_pages(tx, pages, offset, attrs)?;
        let t = self.translated(tx)?;
        let r = t.pt.map_pages(DmaAddr(iova), pages, link_attrs(attrs, dir));
        finish_link(t, tx, iova, len, kind, dir, r)
    }

    /// The checks of a contiguous link that need only the state: the
    /// window, the physical start's alignment and end, the kind: `(iova,
    /// kind)` of the link.
    #[inline(always)]
    pub(crate) fn check_link(
        tx: &IovaState,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        attrs: MapAttrs,
    ) -> Result<(u64, DmaKind), DmaError> {
        let iova = Self::check_window(tx, offset, len)?;
        check_aligned(phys.0)?;
        phys.0
            .checked_add(len)
            .ok_or(DmaError::Overflow { a: phys.0, b: len })?;
        Ok((iova, link_kind(tx, attrs)?))
    }

    /// The checks of [`link_pages`](Self::link_pages) that need only the
    /// state: `(iova, len, kind)` of the link.
    #[inline]
    pub(crate) fn check_link_pages(
        tx: &IovaState,
        pages: &[PhysAddr],
        offset: u64,
        attrs: MapAttrs,
    ) -> Result<(u64, u64, DmaKind), DmaError> {
        let len = (pages.len() as u64)
            .checked_mul(PAGE_SIZE)
            .ok_or(DmaError::Overflow {
                a: pages.len() as u64,
                b: PAGE_SIZE,
            })?;
        let iova = Self::check_window(tx, offset, len)?;
        if tx.linked != 0 && tx.dirs() & HAS_PROVIDER != 0 {
            return Err(DmaError::MixedP2p);
        }
        Ok((iova, len, link_kind(tx, attrs)?))
    }

    /// [`link`](Self::link) for a range that may be a peer device's P2P
    /// memory: classifies `[phys, phys + len)` against `p2p`'s providers and
    /// the PCI topology, and records the answer in the state.
    ///
    /// - host memory: an ordinary translated link;
    /// - [`P2pMapType::ThruHostBridge`]: translated with device-memory attributes
    ///   ([`MapAttrs::MMIO`]: Arm Device-nGnRE, VT-d not snooped);
    /// - [`P2pMapType::BusAddr`]: no table is written and nothing will be
    ///   invalidated; the returned address is the PCI bus address;
    /// - no route: [`DmaError::P2pNotSupported`].
    ///
    /// Host memory and P2P memory, or two providers, in one transaction are
    /// refused with [`DmaError::MixedP2p`]; nothing changes on any error.
    ///
    /// # Errors
    ///
    /// - Those of [`link`](Self::link), for host memory and host-bridge P2P.
    /// - [`DmaError::MixedP2p`] also when `[phys, phys + len)` straddles a
    ///   provider's edge, or the transaction holds another provider's memory.
    /// - [`DmaError::P2pNotSupported`]: `p2p` knows no route from `client`
    ///   to the provider ([`P2pRegistry::map_type`] failed).
    /// - [`DmaError::AlreadyLinked`], [`DmaError::BusAddrGap`]: a bus-address
    ///   link overlaps the linked run or would leave a hole before or after it.
    #[allow(clippy::too_many_arguments)]
    pub fn link_p2p(
        &mut self,
        tx: &mut IovaState,
        p2p: &mut P2pRegistry,
        client: DeviceId,
        phys: PhysAddr,
        offset: u64,
        len: u64,
        dir: DmaDirection,
    ) -> Result<DmaAddr, DmaError> {
        Self::check_window(tx, offset, len)?;
        check_aligned(phys.0)?;
        phys.0
            .checked_add(len)
            .ok_or(DmaError::Overflow { a: phys.0, b: len })?;
        let provider = match p2p.provider_of(phys, len) {
            Ok(None) => return self.link(tx, phys, offset, len, dir, MapAttrs::empty()),
            Ok(Some(p)) => p,
            Err(_) => return Err(DmaError::MixedP2p),
        };
        let key = (provider.device.rid(), provider.device.segment);
        if tx.linked != 0 && (tx.dirs() & HAS_PROVIDER == 0 || tx.provider != key) {
            return Err(DmaError::MixedP2p);
        }
        let ty = p2p
            .map_type(provider.device, client)
            .map_err(|_| DmaError::P2pNotSupported {
                provider: provider.device,
                client,
            })?;
        match ty {
            P2pMapType::ThruHostBridge => {
                let a = self.link_inner(tx, phys, offset, len, dir, MapAttrs::MMIO)?;
                tx.provider = key;
                tx.owner |= u64::from(HAS_PROVIDER) << DIRS_SHIFT;
                Ok(a)
            }
            P2pMapType::BusAddr => {
                if tx.is_fixed() {
                    // The state's `aux` holds the fixed size; and the device
                    // would use the bus address, never the fixed IOVA.
                    return Err(DmaError::P2pNotSupported {
                        provider: provider.device,
                        client,
                    });
                }
                if tx.linked != 0 && !tx.is_bus_addr() {
                    return Err(DmaError::MixedP2p);
                }
                self.translated(tx)?;
                // Nothing in the IOMMU records a bus-address link, so the
                // state does: one run of linked offsets, grown at either end.
                let first = u32::try_from(offset / PAGE_SIZE).map_err(|_| {
                    DmaError::OutsideTransaction {
                        offset,
                        len,
                        size: u64::from(u32::MAX) * PAGE_SIZE,
                    }
                })?;
                if tx.linked == 0 {
                    tx.aux = first;
                } else {
                    let (s, e) = tx.bus_run();
                    if offset < e && offset + len > s {
                        return Err(DmaError::AlreadyLinked {
                            iova: DmaAddr(tx.base() + offset.max(s)),
                        });
                    }
                    if offset + len == s {
                        tx.aux = first;
                    } else if offset != e {
                        return Err(DmaError::BusAddrGap {
                            offset,
                            start: s,
                            end: e,
                        });
                    }
                }
                tx.linked += len;
                tx.record_links(DmaKind::P2pBusAddr, tx.dirs() | dir as u8 | HAS_PROVIDER);
                tx.provider = key;
                Ok(DmaAddr(provider.bus_addr(phys).0))
            }
        }
    }

    /// One-step P2P-aware map: the returned [`Mapping`] carries the kind, so
    /// [`unmap`](Self::unmap) knows whether there is anything to tear down.
    ///
    /// # Errors
    ///
    /// Those of [`map`](Self::map) and [`link_p2p`](Self::link_p2p). On any
    /// error the transaction is freed again.
    #[allow(clippy::too_many_arguments)]
    pub fn map_p2p<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        p2p: &mut P2pRegistry,
        client: DeviceId,
        phys: PhysAddr,
        len: u64,
        dir: DmaDirection,
        dma_mask: u64,
    ) -> Result<Mapping, DmaError> {
        self.one_step(backend, len, dma_mask, |dom, tx| {
            dom.link_p2p(tx, p2p, client, phys, 0, len, dir)
        })
    }

    /// Step 3: invalidate what changed since the last sync (one batch) and
    /// wait for the hardware once. Table pages freed by unlinks are handed
    /// back to the lender only after the wait succeeded.
    ///
    /// With nothing to invalidate (only links since the last sync, and a
    /// backend that does not cache not-present entries) no command is
    /// issued and nothing is waited for: the table writes are only made
    /// visible (a barrier, and [`IommuBackend::publish`], e.g. the VT-d
    /// write-buffer flush; cleans were done as the entries were written).
    ///
    /// # Errors
    ///
    /// [`DmaError::Backend`]: the backend's `invalidate`,
    /// `invalidate_domain` or `sync` failed (see [`IommuBackend::sync`]).
    /// The pending invalidations are kept and no table page is handed back:
    /// call `sync` again (after recovering the IOMMU) before reusing memory
    /// that was unlinked.
    pub fn sync<B: IommuBackend + ?Sized>(&mut self, backend: &mut B) -> Result<(), DmaError> {
        let id = self.id;
        let Some(t) = self.inner.as_mut() else {
            // An identity domain has no tables: nothing to publish or wait for.
            return Ok(());
        };
        let with_maps = backend.needs_map_invalidation();
        if t.nothing_to_invalidate(with_maps) {
            // No command, no wait: the table stores made visible (cleans
            // were done as the entries were written), then published.
            wmb_on(t.pt.memory());
            backend.publish()?;
            t.mapped.clear();
            return Ok(());
        }
        t.invalidate_and_wait(id, with_maps, backend)
    }

    /// Chooses what unlinks do with the table pages they empty (see
    /// [`TableReclaim`]): [`TableReclaim::Eager`] (the default) detaches
    /// them and hands them back after the next [`sync`](Self::sync);
    /// [`TableReclaim::Keep`] leaves them attached, as Linux io-pgtable does,
    /// until [`reclaim_empty_tables`](Self::reclaim_empty_tables) or
    /// [`teardown`](Self::teardown). Tables left empty under `Keep` stay
    /// attached after a switch back to `Eager` until they are reclaimed. An
    /// identity domain has no tables: nothing changes.
    pub fn set_table_reclaim(&mut self, policy: TableReclaim) {
        if let Some(t) = self.inner.as_mut() {
            t.pt.set_table_reclaim(policy);
        }
    }

    /// The policy [`set_table_reclaim`](Self::set_table_reclaim) chose
    /// ([`TableReclaim::Eager`] for an identity domain).
    pub fn table_reclaim(&self) -> TableReclaim {
        self.inner
            .as_ref()
            .map_or(TableReclaim::Eager, |t| t.pt.table_reclaim())
    }

    /// Hands back every table page left attached with no valid entry (by
    /// [`TableReclaim::Keep`]): detaches them (the root's children excepted
    /// where the root cannot hold a block, see
    /// [`IoPageTable::kept_height`]), queues the invalidation of the ranges
    /// they covered, walk caches included, and [`sync`](Self::sync)s; the
    /// pages go back to the lender only once that completed. Returns the
    /// number of table pages detached. Reads every entry of the upper tables: call it when memory
    /// is wanted back, not per transaction.
    ///
    /// # Errors
    ///
    /// [`DmaError::Backend`], as [`sync`](Self::sync): the tables stay
    /// detached and retired, their invalidation pending, and nothing is
    /// handed back until a later `sync` succeeds.
    pub fn reclaim_empty_tables<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
    ) -> Result<usize, DmaError> {
        let Some(t) = self.inner.as_mut() else {
            return Ok(0);
        };
        let unmapped = &mut t.unmapped;
        // Every detached table's range, non-leaf: the walk caches may hold
        // the pointer that was cleared (IHI 0070 CMD_TLBI_NH_VA / S2_IPA,
        // §4.4.4 / §4.4.12, with Leaf = 0; VT-d 6.5.2.3 page-selective
        // IOTLB invalidation with IH = 0).
        let n =
            t.pt.reclaim_empty_tables(|start, len| unmapped.add(start, len, false));
        self.sync(backend)?;
        Ok(n)
    }

    /// A shared sync's completion of `begun` arrived. Hands back the
    /// retired table pages that were retired before `begun` queued its
    /// invalidations: all but those retired since, which wait for a later
    /// sync. `popped` is the caller's count of pages every `sync_finish`
    /// handed back so far (pages retired since = growth of the list plus
    /// what others popped; when others popped newer pages, more are kept
    /// than needed — never fewer). Returns how many pages went back.
    pub(crate) fn sync_finish(&mut self, begun: SyncBegun, popped: u64) -> usize {
        let Some(t) = self.inner.as_mut() else {
            return 0;
        };
        let since = popped.saturating_sub(begun.popped) as usize;
        let keep = (t.pt.retired_pages() + since).saturating_sub(begun.retired);
        t.pt.free_retired_older(keep)
    }

    /// Ends the domain: invalidates everything the IOMMU cached for it
    /// (SMMU TLBI by ASID/VMID, VT-d domain-selective invalidation), waits
    /// for that to complete, and only then hands every table page back to
    /// the lender (the root included).
    ///
    /// Detach every device from the domain first (`backend.detach(dev)`):
    /// the crate does not see attachments, and a device still attached would
    /// walk freed pages. On a backend error nothing is freed and the domain
    /// is handed back, to retry or to drop (dropping keeps its pages lent).
    /// Transactions still open are not freed: their IOVA ranges die with the
    /// domain, and any further use of them is a `WrongDomain` error.
    ///
    /// # Errors
    ///
    /// `(self, `[`DmaError::Backend`]`)`: the domain invalidation or its sync
    /// failed. An identity domain never fails.
    #[allow(
        clippy::result_large_err,
        reason = "the domain is handed back whole on failure, as free hands back its state"
    )]
    pub fn teardown<B: IommuBackend + ?Sized>(
        mut self,
        backend: &mut B,
    ) -> Result<(), (Self, DmaError)> {
        let Some(t) = self.inner.as_mut() else {
            return Ok(());
        };
        let info = t.info(self.id);
        wmb_on(t.pt.memory());
        // IHI 0070 §4.4.2 (CMD_TLBI_NH_ASID / CMD_TLBI_S12_VMALL) and VT-d
        // §6.5.2.4 (domain-selective IOTLB invalidation): everything tagged
        // with the domain goes, walk caches included; the sync is the
        // completion that lets the pages be reused (Linux
        // `arm_smmu_domain_free_paging` / `domain_exit` free tables only
        // after such a flush).
        if let Err(e) = backend
            .invalidate_domain(&info)
            .and_then(|()| backend.sync())
        {
            return Err((self, e.into()));
        }
        if let Some(t) = self.inner.take() {
            // SAFETY: the whole domain was invalidated and that completed;
            // the caller detached its devices (documented above).
            unsafe { t.pt.free_all() };
        }
        Ok(())
    }

    /// Step 4: unlink `[offset, offset + len)` of the transaction. The whole
    /// range must be linked (else [`DmaError::NotLinked`], nothing changed).
    /// Queues the invalidation; the memory may be reused after the next
    /// [`sync`](Self::sync). Returns the bytes unlinked.
    ///
    /// # Errors
    ///
    /// - [`DmaError::ZeroLength`]: `len` is 0.
    /// - [`DmaError::Unaligned`]: `offset` or `len` is not page aligned.
    /// - [`DmaError::Overflow`], [`DmaError::OutsideTransaction`]:
    ///   `[offset, offset + len)` overflows or is not inside the
    ///   transaction's [`size`](IovaState::size).
    /// - [`DmaError::WrongDomain`]: `tx` was made by another domain (or one
    ///   torn down).
    /// - [`DmaError::NotLinked`]: part of the range is not linked.
    /// - [`DmaError::PartialBlock`]: the range cuts a 2 MiB / 1 GiB block
    ///   that was linked as one (unlink all of it).
    /// - [`DmaError::BusAddrGap`]: a bus-address P2P unlink from the middle
    ///   of the linked run (unlink from either end).
    ///
    /// Nothing changes on an error.
    #[inline(always)]
    pub fn unlink(&mut self, tx: &mut IovaState, offset: u64, len: u64) -> Result<u64, DmaError> {
        // The per-page unlink of a linked page of a translated transaction
        // of this domain (see `IoPageTable::unmap_page_fast`). Any other
        // call (nothing done) goes down `unlink_checked`, which checks each
        // argument and names the error.
        if len == PAGE_SIZE
            && tx.holds_page(offset)
            && tx.owner & UNLINK_FAST_MASK == u64::from(self.token)
        {
            if let Some(t) = self.inner.as_mut() {
                // Page aligned and inside the aperture (see `link`).
                let iova = tx.base() + offset;
                if let Some(out) = t.pt.unmap_page_in_range(iova) {
                    if out.freed_tables {
                        t.unmapped.add(iova, PAGE_SIZE, false);
                    } else {
                        t.unmapped.add_page(iova);
                    }
                    // A page of the transaction was linked, through it
                    // (nothing else writes its range): `linked` counts it.
                    debug_assert!(tx.linked >= PAGE_SIZE);
                    tx.linked = tx.linked.wrapping_sub(PAGE_SIZE);
                    if tx.linked == 0 {
                        tx.forget_links();
                    }
                    return Ok(PAGE_SIZE);
                }
            }
        } else if tx.owner & UNLINK_FAST_MASK == u64::from(self.token)
            && tx.holds_block(offset, len)
        {
            // A whole 2 MiB / 1 GiB block (see
            // `IoPageTable::unmap_block_fast`, which is the rest of the
            // check: `None` for any other shape, nothing changed).
            if let Some(t) = self.inner.as_mut() {
                let iova = tx.base() + offset;
                // Aligned to `len` (base and offset are) and inside the
                // aperture, as for a page.
                if let Some(out) = t.pt.unmap_block_in_range(iova, len) {
                    t.unmapped.add(iova, len, !out.freed_tables);
                    // The block was linked through the transaction: counted.
                    debug_assert!(tx.linked >= len);
                    tx.linked = tx.linked.wrapping_sub(len);
                    if tx.linked == 0 {
                        tx.forget_links();
                    }
                    return Ok(len);
                }
            }
        }
        self.unlink_checked(tx, offset, len)
    }

    /// [`unlink`](Self::unlink) of any shape, every argument checked.
    #[inline(never)]
    fn unlink_checked(
        &mut self,
        tx: &mut IovaState,
        offset: u64,
        len: u64,
    ) -> Result<u64, DmaError> {
        let iova = Self::check_window(tx, offset, len)?;
        let t = self.translated(tx)?;
        let bytes = if tx.is_bus_addr() {
            // Bus-address links never reached the IOMMU: only the run of
            // linked offsets changes, and only at either end.
            let (s, e) = tx.bus_run();
            if offset < s || offset + len > e {
                let first = if offset < s { offset } else { offset.max(e) };
                return Err(DmaError::NotLinked {
                    iova: DmaAddr(tx.base() + first),
                });
            }
            if offset == s {
                tx.aux += (len / PAGE_SIZE) as u32;
            } else if offset + len != e {
                return Err(DmaError::BusAddrGap {
                    offset,
                    start: s,
                    end: e,
                });
            }
            len
        } else {
            // The window check above proved the range page-aligned, non-empty
            // and inside the aperture.
            let out = t.pt.unmap_prechecked(iova, iova + len)?;
            t.unmapped.add(iova, len, !out.freed_tables);
            out.bytes
        };
        tx.linked = tx.linked.saturating_sub(bytes);
        if tx.linked == 0 {
            // Nothing linked: the next link may be of any kind.
            tx.forget_links();
        }
        Ok(bytes)
    }

    /// Step 5: give the transaction back. Whatever is still linked is
    /// unlinked first (its invalidation is queued for the next sync). On an
    /// error (a transaction of another domain) the state is returned
    /// untouched; once the unlinking starts nothing can fail: the IOVA
    /// range is found first and its release cannot fail.
    ///
    /// # Errors
    ///
    /// `(tx, e)`, the state handed back untouched, with `e`:
    /// - [`DmaError::WrongDomain`]: `tx` belongs to another domain (or one
    ///   torn down): free it there.
    /// - [`DmaError::OutsideTransaction`]: this domain has no such range
    ///   open (cannot happen for a state it handed out and did not free).
    pub fn free(&mut self, tx: IovaState) -> Result<(), (IovaState, DmaError)> {
        let t = match self.translated(&tx) {
            Ok(t) => t,
            Err(e) => return Err((tx, e)),
        };
        let range = IovaRange {
            start: tx.base(),
            size: tx.size(),
        };
        let fixed = tx.is_fixed();
        let found = if fixed {
            t.iova.find_fixed(range)
        } else {
            t.iova.find(range)
        };
        let slot = match found {
            Ok(i) => i,
            Err(e) => return Err((tx, e)),
        };
        if tx.linked != 0 && !tx.is_bus_addr() {
            // The range is the transaction's own (checked against the
            // aperture when it was made): cannot fail.
            if let Ok(out) = t.pt.unmap_present(DmaAddr(range.start), range.size) {
                t.unmapped.add(range.start, range.size, !out.freed_tables);
            }
        }
        if fixed {
            t.iova.release_fixed(slot);
        } else {
            t.iova.release(slot);
        }
        Ok(())
    }

    /// [`free`](Self::free) followed by [`sync`](Self::sync): unlinks
    /// everything, waits for the invalidation, releases the IOVA range.
    ///
    /// # Errors
    ///
    /// Those of [`free`](Self::free) (then `tx` is dropped: its range stays
    /// allocated) and of [`sync`](Self::sync) (the range is already
    /// released; sync again before reusing the memory).
    pub fn destroy<B: IommuBackend + ?Sized>(
        &mut self,
        tx: IovaState,
        backend: &mut B,
    ) -> Result<(), DmaError> {
        self.free(tx).map_err(|(_, e)| e)?;
        self.sync(backend)
    }

    /// One-step map: try_alloc + link + sync of one physically contiguous range.
    ///
    /// # Errors
    ///
    /// - [`DmaError::Unaligned`]: `len` is not page aligned.
    /// - [`DmaError::IdentityDomain`]: the domain does not translate (use
    ///   [`DirectState`]).
    /// - Those of [`try_alloc`](Self::try_alloc), [`link`](Self::link) and
    ///   [`sync`](Self::sync).
    ///
    /// On any error the transaction is freed again.
    pub fn map<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        phys: PhysAddr,
        len: u64,
        dir: DmaDirection,
        attrs: MapAttrs,
        dma_mask: u64,
    ) -> Result<Mapping, DmaError> {
        self.one_step(backend, len, dma_mask, |dom, tx| {
            dom.link(tx, phys, 0, len, dir, attrs)
        })
    }

    /// The one-step shape: a transaction of `len` bytes, `link` into it,
    /// sync unless nothing reached the IOMMU; on any failure the
    /// transaction is freed again.
    fn one_step<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        len: u64,
        dma_mask: u64,
        link: impl FnOnce(&mut Self, &mut IovaState) -> Result<DmaAddr, DmaError>,
    ) -> Result<Mapping, DmaError> {
        check_aligned(len)?;
        let Some(mut tx) = self.try_alloc(len, dma_mask)?.into_iova() else {
            return Err(DmaError::IdentityDomain);
        };
        let linked = link(self, &mut tx);
        let done = match linked {
            Ok(_) if tx.is_bus_addr() => Ok(()),
            Ok(_) => self.sync(backend),
            Err(e) => Err(e),
        };
        match (linked, done) {
            (Ok(addr), Ok(())) => Ok(Mapping { state: tx, addr }),
            (Err(e), _) | (_, Err(e)) => {
                let _ = self.free(tx);
                Err(e)
            }
        }
    }

    /// One-step unmap of a [`Mapping`]: unlink, sync, free.
    ///
    /// # Errors
    ///
    /// Those of [`destroy`](Self::destroy): [`DmaError::WrongDomain`] for a
    /// mapping of another domain, [`DmaError::Backend`] when the sync fails.
    pub fn unmap<B: IommuBackend + ?Sized>(
        &mut self,
        backend: &mut B,
        m: Mapping,
    ) -> Result<(), DmaError> {
        if m.state.is_bus_addr() {
            // Nothing reached the IOMMU: nothing to invalidate or wait for.
            return self.free(m.state).map_err(|(_, e)| e);
        }
        self.destroy(m.state, backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_at_most_32_bytes() {
        assert!(core::mem::size_of::<IovaState>() <= 32);
    }

    #[test]
    fn every_domain_gets_its_own_token() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}
