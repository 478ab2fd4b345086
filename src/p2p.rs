//! Peer-to-peer DMA: P2P memory providers, the PCI topology the decision
//! needs, and the map-type decision itself (Linux's `pci_p2pdma_map_type`).
//!
//! A P2P DMA may use a PCI *bus address* that a switch routes straight to
//! the peer, never passing the IOMMU; `unmap(addr)` alone cannot tell such an
//! address from an IOVA. So the decision is taken once, at link time, and
//! recorded in the transaction state ([`crate::IovaState::kind`]); unlink and
//! free then do exactly the inverse (see [`crate::Domain::link_p2p`]).
//!
//! QEMU does not model switch-level P2P routing, so the [`P2pMapType::BusAddr`]
//! outcome is proven by host tests only; the through-host-bridge path is
//! exercised on the emulated boards.

use crate::addr::{BusAddr, PhysAddr};
use crate::device::DeviceId;

/// Providers a [`P2pRegistry`] can hold.
pub const MAX_PROVIDERS: usize = 8;
/// Devices whose topology a [`P2pRegistry`] can hold.
pub const MAX_DEVICES: usize = 32;
/// Bridge ports on one device's upstream path.
pub const MAX_DEPTH: usize = 8;
/// Host bridges that can be marked as forwarding P2P.
pub const MAX_HOST_BRIDGES: usize = 4;
/// (provider, client) decisions cached.
pub const CACHE: usize = 16;

/// How a client reaches a provider's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum P2pMapType {
    /// Both sit below a common switch with no ACS redirect between them: the
    /// client uses the PCI bus address; the IOMMU never sees the traffic.
    BusAddr,
    /// Traffic goes up through the root complex of a host bridge known to
    /// forward P2P: map it through the IOMMU with device-memory attributes.
    ThruHostBridge,
}

/// Errors of the P2P registry and decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum P2pError {
    /// A provider range overlaps one already registered (by that device).
    Overlap {
        /// The device that registered the overlapping range.
        existing: DeviceId,
    },
    /// The fixed-capacity table is full.
    Full,
    /// The provider or device is not registered.
    Unknown(DeviceId),
    /// Zero length, or the range wraps around the address space.
    BadRange {
        /// Start of the range.
        start: PhysAddr,
        /// Its length.
        len: u64,
    },
    /// A path longer than [`MAX_DEPTH`].
    PathTooDeep,
    /// No supported P2P route between the two devices.
    NotSupported {
        /// The device owning the memory.
        provider: DeviceId,
        /// The device doing the DMA.
        client: DeviceId,
    },
}

impl core::fmt::Display for P2pError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Overlap { existing } => {
                write!(f, "the range overlaps P2P memory registered by {existing}")
            }
            Self::Full => f.write_str("the P2P registry's fixed-capacity table is full"),
            Self::Unknown(d) => write!(f, "{d} is not registered for P2P"),
            Self::BadRange { start, len } => write!(
                f,
                "bad P2P range [{start}, +{len:#x}) (empty, wrapping, or across a provider's edge)"
            ),
            Self::PathTooDeep => write!(f, "a PCI path longer than {MAX_DEPTH} ports"),
            Self::NotSupported { provider, client } => {
                write!(
                    f,
                    "no supported P2P route from {client} to {provider}'s memory"
                )
            }
        }
    }
}

impl core::error::Error for P2pError {}

/// A device's BAR (or part of one) offered as P2P memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct P2pProvider {
    /// The device whose BAR it is.
    pub device: DeviceId,
    /// CPU-physical start of the range.
    pub cpu_start: PhysAddr,
    /// Length in bytes.
    pub len: u64,
    /// The BAR's PCI bus address minus its CPU-physical address (two's
    /// complement): `bus = cpu + bus_offset`.
    pub bus_offset: u64,
}

impl P2pProvider {
    /// Whether `[pa, pa + len)` lies inside the provider.
    pub fn contains(&self, pa: PhysAddr, len: u64) -> bool {
        pa.0 >= self.cpu_start.0
            && pa
                .0
                .checked_add(len)
                .is_some_and(|e| e <= self.cpu_start.0 + self.len)
    }

    /// Whether any byte of `[pa, pa + len)` lies inside the provider.
    pub fn overlaps(&self, pa: PhysAddr, len: u64) -> bool {
        let end = pa.0.saturating_add(len);
        pa.0 < self.cpu_start.0 + self.len && end > self.cpu_start.0
    }

    /// The PCI bus address of CPU-physical `pa`.
    pub fn bus_addr(&self, pa: PhysAddr) -> BusAddr {
        BusAddr(pa.0.wrapping_add(self.bus_offset))
    }
}

/// One bridge port on a device's path to its root complex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Port {
    /// The port's own PCI function (root port, switch upstream/downstream port).
    pub id: DeviceId,
    /// ACS P2P Request Redirect is on: peer traffic through this port goes upstream.
    pub acs_redirect: bool,
}

/// Where a device sits: its host bridge and the ports from the root port down
/// to the port directly above it. A device on the root bus has an empty path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTopology {
    /// The device.
    pub device: DeviceId,
    /// Which host bridge (root complex) it is below.
    pub host_bridge: u16,
    /// Ports from the root port downwards.
    pub path: heapless::Vec<Port, MAX_DEPTH>,
}

#[cfg(feature = "defmt")]
impl defmt::Format for DeviceTopology {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "DeviceTopology {{ device: {}, host_bridge: {=u16}, path: {=[?]} }}",
            self.device,
            self.host_bridge,
            self.path.as_slice()
        )
    }
}

impl DeviceTopology {
    /// A device at `path` (root port first) below `host_bridge`.
    ///
    /// # Errors
    ///
    /// [`P2pError::PathTooDeep`]: `path` has more than [`MAX_DEPTH`] ports.
    pub fn new(device: DeviceId, host_bridge: u16, path: &[Port]) -> Result<Self, P2pError> {
        let path = heapless::Vec::from_slice(path).map_err(|_| P2pError::PathTooDeep)?;
        Ok(Self {
            device,
            host_bridge,
            path,
        })
    }
}

/// Providers, topology and cached decisions, all fixed capacity.
///
/// # Example
///
/// An NVMe drive writing straight into a GPU's memory below the same PCIe
/// switch: the switch routes the bus address, so nothing is mapped in the
/// IOMMU and the transaction records that.
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
/// use bare_iommu::p2p::{DeviceTopology, P2pMapType, P2pProvider, P2pRegistry, Port};
/// use bare_iommu::pgtable::arm::ArmStage1;
/// use bare_iommu::{DeviceId, DmaAddr, DmaDirection, DmaKind, Domain, DomainConfig, PhysAddr};
///
/// # fn main() -> Result<(), Box<dyn core::error::Error>> {
/// let dev = |bus, d| DeviceId::new(0, bus, d, 0).unwrap();
/// let port = |bus, d| Port { id: dev(bus, d), acs_redirect: false };
/// let (gpu, nvme) = (dev(3, 0), dev(4, 0));
///
/// // Host bridge 0, root port 00:1c.0, switch upstream port 01:00.0, then
/// // one downstream port for each device.
/// let mut p2p = P2pRegistry::new();
/// p2p.set_topology(DeviceTopology::new(gpu, 0, &[port(0, 0x1c), port(1, 0), port(2, 1)])?)?;
/// p2p.set_topology(DeviceTopology::new(nvme, 0, &[port(0, 0x1c), port(1, 0), port(2, 2)])?)?;
/// // 256 MiB of the GPU's BAR: CPU address 0x60_0000_0000, bus address 0x10_0000_0000.
/// p2p.register(P2pProvider {
///     device: gpu,
///     cpu_start: PhysAddr(0x60_0000_0000),
///     len: 1 << 28,
///     bus_offset: 0x10_0000_0000u64.wrapping_sub(0x60_0000_0000),
/// })?;
/// assert_eq!(p2p.map_type(gpu, nvme)?, P2pMapType::BusAddr);
///
/// let cfg = DomainConfig { id: 1, levels: 4, aperture_start: 1 << 20, aperture_end: 1 << 32, coherent_walk: true };
/// let mut dom = Domain::new(ArmStage1, Heap, cfg)?;
/// let mut tx = dom.try_alloc(4096, u64::MAX)?.into_iova().unwrap();
/// let addr = dom.link_p2p(&mut tx, &mut p2p, nvme, PhysAddr(0x60_0000_1000), 0, 4096, DmaDirection::FromDevice)?;
/// assert_eq!(addr, DmaAddr(0x10_0000_1000)); // the GPU's bus address
/// assert_eq!(tx.kind(), Some(DmaKind::P2pBusAddr));
/// assert!(!dom.has_pending()); // nothing for the IOMMU to invalidate
/// dom.free(tx).map_err(|(_, e)| e)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct P2pRegistry {
    providers: heapless::Vec<P2pProvider, MAX_PROVIDERS>,
    devices: heapless::Vec<DeviceTopology, MAX_DEVICES>,
    host_bridges: heapless::Vec<u16, MAX_HOST_BRIDGES>,
    cache: heapless::Vec<(DeviceId, DeviceId, Result<P2pMapType, P2pError>), CACHE>,
    /// Decisions computed (not answered from the cache); for tests and stats.
    pub computed: u32,
}

#[cfg(feature = "defmt")]
impl defmt::Format for P2pRegistry {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(
            f,
            "P2pRegistry {{ providers: {=[?]}, devices: {=[?]}, host_bridges: {=[?]}, cached: {=usize}, computed: {=u32} }}",
            self.providers.as_slice(),
            self.devices.as_slice(),
            self.host_bridges.as_slice(),
            self.cache.len(),
            self.computed
        )
    }
}

impl P2pRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers P2P memory. Overlap with another provider is refused.
    ///
    /// # Errors
    ///
    /// - [`P2pError::BadRange`]: `p.len` is 0 or `p.cpu_start + p.len`
    ///   overflows.
    /// - [`P2pError::Overlap`]: the range overlaps one already registered
    ///   (`existing` names its device).
    /// - [`P2pError::Full`]: [`MAX_PROVIDERS`] ranges are registered.
    pub fn register(&mut self, p: P2pProvider) -> Result<(), P2pError> {
        if p.len == 0 || p.cpu_start.0.checked_add(p.len).is_none() {
            return Err(P2pError::BadRange {
                start: p.cpu_start,
                len: p.len,
            });
        }
        if let Some(o) = self
            .providers
            .iter()
            .find(|o| o.overlaps(p.cpu_start, p.len))
        {
            return Err(P2pError::Overlap { existing: o.device });
        }
        self.providers.push(p).map_err(|_| P2pError::Full)
    }

    /// Removes every provider range of `device`.
    ///
    /// # Errors
    ///
    /// [`P2pError::Unknown`]: `device` has no range registered; nothing
    /// changes.
    pub fn unregister(&mut self, device: DeviceId) -> Result<(), P2pError> {
        let before = self.providers.len();
        self.providers.retain(|p| p.device != device);
        if self.providers.len() == before {
            return Err(P2pError::Unknown(device));
        }
        self.cache.retain(|(p, _, _)| *p != device);
        Ok(())
    }

    /// Records (or replaces) where a device sits. Clears cached decisions.
    ///
    /// # Errors
    ///
    /// [`P2pError::Full`]: the device is new and [`MAX_DEVICES`] devices are
    /// recorded (the cached decisions are still cleared).
    pub fn set_topology(&mut self, t: DeviceTopology) -> Result<(), P2pError> {
        self.cache.clear();
        if let Some(slot) = self.devices.iter_mut().find(|d| d.device == t.device) {
            *slot = t;
            return Ok(());
        }
        self.devices.push(t).map_err(|_| P2pError::Full)
    }

    /// Marks a host bridge as forwarding P2P between its root ports.
    ///
    /// # Errors
    ///
    /// [`P2pError::Full`]: the bridge is new and [`MAX_HOST_BRIDGES`] bridges
    /// are allowed already (the cached decisions are still cleared).
    pub fn allow_host_bridge(&mut self, host_bridge: u16) -> Result<(), P2pError> {
        self.cache.clear();
        if self.host_bridges.contains(&host_bridge) {
            return Ok(());
        }
        self.host_bridges
            .push(host_bridge)
            .map_err(|_| P2pError::Full)
    }

    /// The provider whose memory contains any byte of `[pa, pa + len)`.
    /// `Ok(None)` for host memory; an error if the range straddles a provider's edge.
    ///
    /// # Errors
    ///
    /// [`P2pError::BadRange`]: part of `[pa, pa + len)` is inside a
    /// provider's memory and part outside it.
    pub fn provider_of(&self, pa: PhysAddr, len: u64) -> Result<Option<P2pProvider>, P2pError> {
        match self.providers.iter().find(|p| p.overlaps(pa, len)) {
            None => Ok(None),
            Some(p) if p.contains(pa, len) => Ok(Some(*p)),
            Some(_) => Err(P2pError::BadRange { start: pa, len }),
        }
    }

    fn topology(&self, d: DeviceId) -> Result<&DeviceTopology, P2pError> {
        self.devices
            .iter()
            .find(|t| t.device == d)
            .ok_or(P2pError::Unknown(d))
    }

    /// How `client` reaches `provider`'s memory, cached per pair.
    ///
    /// # Errors
    ///
    /// - [`P2pError::Unknown`]: no topology was recorded
    ///   ([`set_topology`](Self::set_topology)) for `provider` or `client`.
    /// - [`P2pError::NotSupported`]: the two are below different host
    ///   bridges, or the path needs the host bridge (no common switch, or ACS
    ///   redirects upstream) and it was not allowed with
    ///   [`allow_host_bridge`](Self::allow_host_bridge).
    ///
    /// Errors are cached like answers, until the topology changes.
    pub fn map_type(
        &mut self,
        provider: DeviceId,
        client: DeviceId,
    ) -> Result<P2pMapType, P2pError> {
        if let Some((_, _, r)) = self
            .cache
            .iter()
            .find(|(p, c, _)| *p == provider && *c == client)
        {
            return *r;
        }
        let r = self.decide(provider, client);
        self.computed = self.computed.wrapping_add(1);
        if self.cache.is_full() {
            let _ = self.cache.remove(0);
        }
        let _ = self.cache.push((provider, client, r));
        r
    }

    fn decide(&self, provider: DeviceId, client: DeviceId) -> Result<P2pMapType, P2pError> {
        if provider == client {
            return Ok(P2pMapType::BusAddr);
        }
        let p = self.topology(provider)?;
        let c = self.topology(client)?;
        let not_supported = Err(P2pError::NotSupported { provider, client });
        if p.host_bridge != c.host_bridge {
            return not_supported;
        }
        // The deepest port both paths share is the common upstream switch port.
        let common = p
            .path
            .iter()
            .zip(c.path.iter())
            .take_while(|(a, b)| a.id == b.id)
            .count();
        // Ports below the common one (and the common one itself, whose
        // downstream side routes between them) must not redirect upstream.
        let redirect = p
            .path
            .iter()
            .skip(common.saturating_sub(1))
            .any(|x| x.acs_redirect)
            || c.path
                .iter()
                .skip(common.saturating_sub(1))
                .any(|x| x.acs_redirect);
        if common > 0 && !redirect {
            return Ok(P2pMapType::BusAddr);
        }
        if self.host_bridges.contains(&p.host_bridge) {
            Ok(P2pMapType::ThruHostBridge)
        } else {
            not_supported
        }
    }
}
