//! The DTB questions the board asks, answered through the `fdt` crate (which
//! walks the structure block): the PCI host bridge's `ranges` (how a PCI bus
//! address in a memory window maps to a CPU physical address) and a device's
//! `reg` and `interrupts` (found by its `compatible` string). What `fdt` 0.1
//! does not decode is decoded here: the PCI bus binding's `ranges` entries
//! and the Arm GIC binding's three-cell interrupt specifiers.
//!
//! QEMU puts the DTB at the start of RAM when it fits below the image
//! (link.ld leaves 2 MiB for it).

/// Where QEMU `virt` places the DTB.
pub const VIRT_DTB: usize = 0x4000_0000;
/// Most bytes a DTB may span here (the gap below the image).
const MAX_SIZE: usize = 2 << 20;

/// Why the DTB could not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdtError {
    /// No DTB magic at the address.
    NoDtb,
    /// The DTB is larger than the gap below the image, or a property is cut.
    Malformed,
    /// No `pcie@…` node with a `ranges` property.
    NoPciRanges,
    /// No memory window of the host bridge contains the bus address.
    NotInWindow(u64),
    /// No node directly below the root is compatible with the string.
    NoNode(&'static str),
    /// The node has no such property (or it is too short).
    NoProperty(&'static str),
}

/// A DTB in memory, parsed by the `fdt` crate.
pub struct Fdt {
    dt: ::fdt::Fdt<'static>,
}

/// One memory window of a PCI host bridge (`ranges` entry, PCI bus binding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    /// PCI bus address of the window's start.
    pub bus: u64,
    /// CPU physical address of the window's start.
    pub cpu: u64,
    /// Length.
    pub size: u64,
}

impl Fdt {
    /// The DTB at `addr`.
    ///
    /// # Safety
    ///
    /// `addr` must be readable RAM for [`MAX_SIZE`] bytes that nothing writes
    /// while the returned value lives.
    pub unsafe fn at(addr: usize) -> Result<Self, FdtError> {
        // SAFETY: per the caller, MAX_SIZE bytes at `addr` are readable and
        // not written while the DTB is in use.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, MAX_SIZE) };
        // `fdt::Fdt::new` checks the magic and that `totalsize` fits the slice.
        let dt = ::fdt::Fdt::new(bytes).map_err(|e| match e {
            ::fdt::FdtError::BadMagic => FdtError::NoDtb,
            _ => FdtError::Malformed,
        })?;
        Ok(Self { dt })
    }

    /// The nodes directly below the root.
    fn top_nodes(&self) -> impl Iterator<Item = ::fdt::node::FdtNode<'_, 'static>> {
        self.dt
            .find_node("/")
            .into_iter()
            .flat_map(|root| root.children())
    }

    /// The first node directly below the root whose `compatible` list holds
    /// `compatible` and that has property `prop`.
    fn node_with(
        &self,
        compatible: &'static str,
        prop: &'static str,
    ) -> Result<::fdt::node::FdtNode<'_, 'static>, FdtError> {
        let mut seen = false;
        self.top_nodes()
            .filter(|n| {
                n.compatible()
                    .is_some_and(|c| c.all().any(|c| c == compatible))
            })
            .find(|n| {
                seen = true;
                n.property(prop).is_some()
            })
            .ok_or(if seen {
                FdtError::NoProperty(prop)
            } else {
                FdtError::NoNode(compatible)
            })
    }

    /// Every memory window (32- and 64-bit) of the first `pcie@` node
    /// directly below the root, in `ranges` order; calls `f` for each.
    pub fn pci_windows(&self, mut f: impl FnMut(PciWindow)) -> Result<(), FdtError> {
        let pcie = self
            .top_nodes()
            .find(|n| n.name.starts_with("pcie@") && n.property("ranges").is_some())
            .ok_or(FdtError::NoPciRanges)?;
        let ranges = pcie.property("ranges").ok_or(FdtError::NoPciRanges)?.value;
        // #address-cells of the root (the host bridge's parent bus) and the
        // host bridge's own #address-cells / #size-cells.
        let root_ac = self.dt.root().cell_sizes().address_cells;
        let pci = pcie.cell_sizes();
        // PCI bus binding: child address = 3 cells (phys.hi flags, phys.mid,
        // phys.lo); phys.hi bits 25:24 are the space code (2 = 32-bit
        // memory, 3 = 64-bit memory).
        if pci.address_cells != 3
            || !(1..=2).contains(&root_ac)
            || !(1..=2).contains(&pci.size_cells)
        {
            return Err(FdtError::Malformed);
        }
        let entry = 4 * (pci.address_cells + root_ac + pci.size_cells);
        for e in ranges.chunks_exact(entry) {
            let hi = be32(e, 0).ok_or(FdtError::Malformed)?;
            let bus = cells(e, 4, 2).ok_or(FdtError::Malformed)?;
            let cpu = cells(e, 12, root_ac).ok_or(FdtError::Malformed)?;
            let size = cells(e, 12 + 4 * root_ac, pci.size_cells).ok_or(FdtError::Malformed)?;
            if (hi >> 24) & 3 >= 2 {
                f(PciWindow { bus, cpu, size });
            }
        }
        Ok(())
    }

    /// The value of property `prop` of the first node directly below the
    /// root whose `compatible` list holds `compatible`.
    pub fn property(
        &self,
        compatible: &'static str,
        prop: &'static str,
    ) -> Result<&'static [u8], FdtError> {
        let node = self.node_with(compatible, prop)?;
        node.property(prop)
            .map(|p| p.value)
            .ok_or(FdtError::NoProperty(prop))
    }

    /// Region `index` of the `reg` property (address, size) of the node
    /// compatible with `compatible`, in its parent's address and size cells.
    pub fn reg(&self, compatible: &'static str, index: usize) -> Result<(u64, u64), FdtError> {
        let node = self.node_with(compatible, "reg")?;
        let region = node
            .reg()
            .and_then(|mut r| r.nth(index))
            .ok_or(FdtError::NoProperty("reg"))?;
        let size = region.size.ok_or(FdtError::NoProperty("reg"))?;
        Ok((region.starting_address as u64, size as u64))
    }

    /// Region `index` of the `reg` property of the first child, compatible
    /// with `compatible`, of the top-level node compatible with `parent`
    /// (e.g. the ITS below the GIC), in the parent's address and size cells.
    pub fn child_reg(
        &self,
        parent: &'static str,
        compatible: &'static str,
        index: usize,
    ) -> Result<(u64, u64), FdtError> {
        let parent = self.node_with(parent, "compatible")?;
        let node = parent
            .children()
            .find(|n| {
                n.compatible()
                    .is_some_and(|c| c.all().any(|c| c == compatible))
            })
            .ok_or(FdtError::NoNode(compatible))?;
        let region = node
            .reg()
            .and_then(|mut r| r.nth(index))
            .ok_or(FdtError::NoProperty("reg"))?;
        let size = region.size.ok_or(FdtError::NoProperty("reg"))?;
        Ok((region.starting_address as u64, size as u64))
    }

    /// Interrupt `index` of the node compatible with `compatible`, in the
    /// Arm GIC binding's three cells (type: 0 SPI, 1 PPI; number; flags).
    /// The `fdt` crate reads only one- and two-cell specifiers, so the cells
    /// are decoded here.
    pub fn interrupt(
        &self,
        compatible: &'static str,
        index: usize,
    ) -> Result<GicInterrupt, FdtError> {
        let irqs = self.property(compatible, "interrupts")?;
        let at = index.checked_mul(12).ok_or(FdtError::Malformed)?;
        let missing = FdtError::NoProperty("interrupts");
        Ok(GicInterrupt {
            kind: be32(irqs, at).ok_or(missing)?,
            number: be32(irqs, at + 4).ok_or(missing)?,
            flags: be32(irqs, at + 8).ok_or(missing)?,
        })
    }

    /// Position of `name` in the `interrupt-names` list of the node
    /// compatible with `compatible`.
    pub fn interrupt_index(
        &self,
        compatible: &'static str,
        name: &'static str,
    ) -> Result<usize, FdtError> {
        let names = self.property(compatible, "interrupt-names")?;
        names
            .split(|&c| c == 0)
            .position(|n| n == name.as_bytes())
            .ok_or(FdtError::NoProperty(name))
    }

    /// The PSCI conduit the `/psci` node names (`method`: "hvc" or "smc";
    /// Linux binding `arm,psci`): `true` for SMC.
    pub fn psci_uses_smc(&self) -> Result<bool, FdtError> {
        let node = self
            .dt
            .find_node("/psci")
            .ok_or(FdtError::NoNode("/psci"))?;
        let method = node
            .property("method")
            .ok_or(FdtError::NoProperty("method"))?
            .value;
        match method.split(|&c| c == 0).next() {
            Some(b"smc") => Ok(true),
            Some(b"hvc") => Ok(false),
            _ => Err(FdtError::Malformed),
        }
    }

    /// The MPIDR affinity (`reg`) of every `/cpus/cpu@…` node, in DTB
    /// order, through `f`; returns how many there were.
    pub fn cpu_mpidrs(&self, mut f: impl FnMut(u64)) -> Result<usize, FdtError> {
        let cpus = self
            .dt
            .find_node("/cpus")
            .ok_or(FdtError::NoNode("/cpus"))?;
        let ac = cpus.cell_sizes().address_cells;
        if !(1..=2).contains(&ac) {
            return Err(FdtError::Malformed);
        }
        let mut n = 0;
        for cpu in cpus.children().filter(|c| c.name.starts_with("cpu@")) {
            let reg = cpu.property("reg").ok_or(FdtError::NoProperty("reg"))?;
            f(cells(reg.value, 0, ac).ok_or(FdtError::Malformed)?);
            n += 1;
        }
        Ok(n)
    }

    /// The CPU physical address at which PCI bus address `bus` appears.
    pub fn pci_bus_to_cpu(&self, bus: u64) -> Result<u64, FdtError> {
        let mut found = None;
        self.pci_windows(|w| {
            if found.is_none() && bus >= w.bus && bus - w.bus < w.size {
                found = Some(w.cpu + (bus - w.bus));
            }
        })?;
        found.ok_or(FdtError::NotInWindow(bus))
    }
}

/// One interrupt specifier of the Arm GIC binding (3 cells).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicInterrupt {
    /// 0: SPI, 1: PPI.
    pub kind: u32,
    /// SPI number (INTID − 32) or PPI number (INTID − 16).
    pub number: u32,
    /// Trigger type, bits 3:0: 1 rising edge, 2 falling edge, 4 level high,
    /// 8 level low.
    pub flags: u32,
}

impl GicInterrupt {
    /// The GIC INTID, for an SPI or PPI.
    pub fn intid(&self) -> Option<u32> {
        match self.kind {
            0 => self.number.checked_add(32),
            1 => self.number.checked_add(16),
            _ => None,
        }
    }

    /// Whether the interrupt is edge-triggered.
    pub fn edge(&self) -> bool {
        self.flags & 0b11 != 0
    }
}

fn be32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// `n` (1 or 2) big-endian cells at `off` as one number.
fn cells(b: &[u8], off: usize, n: usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..n {
        v = (v << 32) | u64::from(be32(b, off + 4 * i)?);
    }
    Some(v)
}
