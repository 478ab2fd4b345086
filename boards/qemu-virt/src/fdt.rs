//! Just enough of the flattened device tree (Devicetree Specification v0.4,
//! chapter 5) to read the PCI host bridge's `ranges` (how a PCI bus address
//! in a memory window maps to a CPU physical address) and a device's `reg`
//! and `interrupts` (found by its `compatible` string).
//!
//! QEMU puts the DTB at the start of RAM when it fits below the image
//! (link.ld leaves 2 MiB for it).

use core::ops::ControlFlow;

/// Where QEMU `virt` places the DTB.
pub const VIRT_DTB: usize = 0x4000_0000;
/// Most bytes a DTB may span here (the gap below the image).
const MAX_SIZE: u32 = 2 << 20;
/// Devicetree Specification 5.2: header magic.
const MAGIC: u32 = 0xd00d_feed;
/// Devicetree Specification 5.4.1: structure block tokens.
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Why the DTB could not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdtError {
    /// No DTB magic at the address.
    NoDtb,
    /// The structure block is cut or holds an unknown token.
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

/// A DTB in memory.
pub struct Fdt {
    bytes: &'static [u8],
}

/// One structure-block token [`Fdt::walk`] hands on (`FDT_NOP` skipped).
enum Token {
    /// `FDT_BEGIN_NODE` with the node's name.
    Begin(&'static [u8]),
    /// `FDT_END_NODE`.
    End,
    /// `FDT_PROP`: name and value.
    Prop(&'static [u8], &'static [u8]),
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
        // SAFETY: per the caller, the header's 40 bytes are readable.
        let head = unsafe { core::slice::from_raw_parts(addr as *const u8, 40) };
        if be32(head, 0) != Some(MAGIC) {
            return Err(FdtError::NoDtb);
        }
        let total = be32(head, 4).ok_or(FdtError::Malformed)?;
        if total > MAX_SIZE {
            return Err(FdtError::Malformed);
        }
        // SAFETY: `total` ≤ MAX_SIZE bytes, readable per the caller.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, total as usize) };
        Ok(Self { bytes })
    }

    fn header(&self, off: usize) -> Result<usize, FdtError> {
        be32(self.bytes, off)
            .map(|v| v as usize)
            .ok_or(FdtError::Malformed)
    }

    fn string(&self, off: usize) -> Result<&'static [u8], FdtError> {
        let start = self
            .header(12)?
            .checked_add(off)
            .ok_or(FdtError::Malformed)?;
        cstr(self.bytes, start).ok_or(FdtError::Malformed)
    }

    /// Walks the structure block (Devicetree Specification 5.4), handing `f`
    /// each node start, node end and property with the depth of its node (1:
    /// the root); stops early with what `f` breaks with, or at `FDT_END`.
    fn walk<R>(
        &self,
        mut f: impl FnMut(usize, Token) -> ControlFlow<R>,
    ) -> Result<Option<R>, FdtError> {
        let mut off = self.header(8)?;
        let mut depth = 0usize;
        loop {
            let token = be32(self.bytes, off).ok_or(FdtError::Malformed)?;
            off += 4;
            let flow = match token {
                FDT_BEGIN_NODE => {
                    let name = cstr(self.bytes, off).ok_or(FdtError::Malformed)?;
                    off = (off + name.len() + 1).next_multiple_of(4);
                    depth += 1;
                    f(depth, Token::Begin(name))
                }
                FDT_END_NODE => {
                    let flow = f(depth, Token::End);
                    if flow.is_continue() {
                        depth = depth.checked_sub(1).ok_or(FdtError::Malformed)?;
                    }
                    flow
                }
                FDT_PROP => {
                    let len = self.header(off)?;
                    let name = self.string(self.header(off + 4)?)?;
                    let start = off + 8;
                    let value = start
                        .checked_add(len)
                        .and_then(|end| self.bytes.get(start..end))
                        .ok_or(FdtError::Malformed)?;
                    off = (start + len).next_multiple_of(4);
                    f(depth, Token::Prop(name, value))
                }
                FDT_NOP => ControlFlow::Continue(()),
                FDT_END => return Ok(None),
                _ => return Err(FdtError::Malformed),
            };
            if let ControlFlow::Break(r) = flow {
                return Ok(Some(r));
            }
        }
    }

    /// Every memory window (32- and 64-bit) of the first `pcie@` node
    /// directly below the root, in `ranges` order; calls `f` for each.
    pub fn pci_windows(&self, mut f: impl FnMut(PciWindow)) -> Result<(), FdtError> {
        let mut in_pcie = false;
        // #address-cells / #size-cells of the root (the parent bus of the
        // host bridge) and of the host bridge itself; the spec's defaults.
        let (mut root_ac, mut pci_ac, mut pci_sc) = (2u32, 3u32, 2u32);
        let mut ranges: Option<&'static [u8]> = None;
        self.walk(|depth, token| {
            match token {
                Token::Begin(name) => {
                    if depth == 2 && ranges.is_none() && name.starts_with(b"pcie@") {
                        in_pcie = true;
                    }
                }
                Token::End => {
                    if depth == 2 && in_pcie {
                        return ControlFlow::Break(());
                    }
                }
                Token::Prop(name, value) => {
                    let cells = be32(value, 0);
                    match (depth, in_pcie, name) {
                        (1, _, b"#address-cells") => root_ac = cells.unwrap_or(root_ac),
                        (2, true, b"#address-cells") => pci_ac = cells.unwrap_or(pci_ac),
                        (2, true, b"#size-cells") => pci_sc = cells.unwrap_or(pci_sc),
                        (2, true, b"ranges") => ranges = Some(value),
                        _ => {}
                    }
                }
            }
            ControlFlow::Continue(())
        })?;
        let ranges = ranges.ok_or(FdtError::NoPciRanges)?;
        // PCI bus binding: child address = 3 cells (phys.hi flags, phys.mid,
        // phys.lo); phys.hi bits 25:24 are the space code (2 = 32-bit
        // memory, 3 = 64-bit memory).
        if pci_ac != 3 || !(1..=2).contains(&root_ac) || !(1..=2).contains(&pci_sc) {
            return Err(FdtError::Malformed);
        }
        let entry = 4 * (pci_ac + root_ac + pci_sc) as usize;
        for e in ranges.chunks_exact(entry) {
            let hi = be32(e, 0).ok_or(FdtError::Malformed)?;
            let bus = cells(e, 4, 2).ok_or(FdtError::Malformed)?;
            let cpu = cells(e, 12, root_ac).ok_or(FdtError::Malformed)?;
            let size = cells(e, 12 + 4 * root_ac as usize, pci_sc).ok_or(FdtError::Malformed)?;
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
        // The node at depth 2 being read: does it match, and its property.
        let (mut matches, mut value) = (false, None);
        let mut seen = false;
        let found = self.walk(|depth, token| {
            if depth != 2 {
                return ControlFlow::Continue(());
            }
            match token {
                Token::Begin(_) => (matches, value) = (false, None),
                Token::End => {
                    if matches {
                        if let Some(v) = value {
                            return ControlFlow::Break(v);
                        }
                        seen = true;
                    }
                }
                Token::Prop(name, v) => {
                    if name == b"compatible" {
                        matches |= v.split(|&c| c == 0).any(|c| c == compatible.as_bytes());
                    } else if name == prop.as_bytes() {
                        value = Some(v);
                    }
                }
            }
            ControlFlow::Continue(())
        })?;
        found.ok_or(if seen {
            FdtError::NoProperty(prop)
        } else {
            FdtError::NoNode(compatible)
        })
    }

    /// Region `index` of the `reg` property (address, size) of the node
    /// compatible with `compatible`; the root's cells are 2 + 2 on `virt`.
    pub fn reg(&self, compatible: &'static str, index: usize) -> Result<(u64, u64), FdtError> {
        let reg = self.property(compatible, "reg")?;
        let at = index.checked_mul(16).ok_or(FdtError::Malformed)?;
        let addr = cells(reg, at, 2).ok_or(FdtError::NoProperty("reg"))?;
        let size = cells(reg, at + 8, 2).ok_or(FdtError::NoProperty("reg"))?;
        Ok((addr, size))
    }

    /// Interrupt `index` of the node compatible with `compatible`, in the
    /// Arm GIC binding's three cells (type: 0 SPI, 1 PPI; number; flags).
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
fn cells(b: &[u8], off: usize, n: u32) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..n as usize {
        v = (v << 32) | u64::from(be32(b, off + 4 * i)?);
    }
    Some(v)
}

/// The NUL-terminated string at `off`, without the NUL.
fn cstr(b: &[u8], off: usize) -> Option<&[u8]> {
    let rest = b.get(off..)?;
    let n = rest.iter().position(|&c| c == 0)?;
    rest.get(..n)
}
