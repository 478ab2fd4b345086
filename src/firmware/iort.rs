//! ACPI IORT: I/O remapping table (Arm DEN 0049E.e).
//!
//! ```text
//! IORT header (48 B): node count u32 @36, first node offset u32 @40
//! node: type u8, length u16, revision u8, identifier u32,
//!       ID mapping count u32, ID mapping array offset u32, body …
//! ID mapping (20 B): input base, ID count − 1, output base,
//!       output reference (offset of the next node), flags (bit 0 single)
//! ```
//!
//! A device's requester ID enters at its root complex (or named component)
//! node; each ID mapping turns an input ID range into an output range at the
//! node it references, until the chain reaches an SMMU (the ID is then a
//! StreamID) or an ITS group (the device is not behind an SMMU). Linux
//! `iort_node_map_id` walks the same way.

use super::{ACPI_HEADER_LEN, AcpiHeader, FirmwareError, Reader, ReservedRegion};

/// Most hops an ID mapping chain may take (real tables take one or two).
pub const MAX_MAPPING_DEPTH: usize = 16;
/// Bytes of one ID mapping (DEN 0049E §3.4).
const ID_MAPPING_LEN: usize = 20;
/// Bytes of one RMR memory range descriptor (DEN 0049E §3.1.7).
const RMR_DESC_LEN: usize = 20;
/// Bytes of the node header.
const NODE_HEADER_LEN: usize = 16;

/// An IORT table.
#[derive(Clone, Copy, Debug)]
pub struct Iort<'a> {
    table: &'a [u8],
    header: AcpiHeader,
    count: u32,
    first: usize,
}

impl<'a> Iort<'a> {
    /// Checks the header of the IORT in `bytes` (signature, length within
    /// `bytes`, node array offset inside the table). The checksum is not
    /// checked ([`super::acpi_checksum_ok`]).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn new(bytes: &'a [u8]) -> Result<Self, FirmwareError> {
        let (header, table) = AcpiHeader::parse(bytes, b"IORT")?;
        let r = Reader(table);
        let count = r.u32(ACPI_HEADER_LEN)?;
        let first = r.u32(ACPI_HEADER_LEN + 4)? as usize;
        if first < ACPI_HEADER_LEN + 12 || (count > 0 && first >= table.len()) {
            return Err(FirmwareError::BadLength {
                offset: ACPI_HEADER_LEN + 4,
                len: first,
            });
        }
        Ok(Self {
            table,
            header,
            count,
            first,
        })
    }

    /// The ACPI header (its revision is the IORT spec revision).
    pub fn header(&self) -> &AcpiHeader {
        &self.header
    }

    /// Every node, in table order. After an error the iterator ends.
    pub fn nodes(&self) -> Nodes<'a> {
        Nodes {
            table: self.table,
            off: self.first,
            left: self.count,
        }
    }

    /// The node starting at `reference` (an offset into the table, as ID
    /// mappings refer to nodes); [`FirmwareError::BadReference`] when no
    /// node starts there.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn node_at(&self, reference: u32) -> Result<Node<'a>, FirmwareError> {
        for n in self.nodes() {
            let n = n?;
            if n.offset == reference as usize {
                return Ok(n);
            }
        }
        Err(FirmwareError::BadReference { reference })
    }

    /// The root complex node of PCI `segment`, if any.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn root_complex(&self, segment: u32) -> Result<Option<Node<'a>>, FirmwareError> {
        for n in self.nodes() {
            let n = n?;
            if matches!(n.kind()?, NodeKind::RootComplex(rc) if rc.segment == segment) {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// The named component node whose ACPI device path is `name` (without
    /// the terminating NUL, e.g. `b"\\_SB.DEV0"`), if any.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn named_component(&self, name: &[u8]) -> Result<Option<Node<'a>>, FirmwareError> {
        for n in self.nodes() {
            let n = n?;
            if matches!(n.kind()?, NodeKind::NamedComponent(nc) if nc.name == name) {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// Where PCI requester ID `rid` on `segment` goes: the SMMU node and
    /// StreamID, or `None` when the chain ends without an SMMU (at an ITS
    /// group, or where no mapping covers the ID: the device's DMA is not
    /// translated), or when there is no root complex for the segment.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn map_pci(
        &self,
        segment: u32,
        rid: u32,
    ) -> Result<Option<StreamTarget<'a>>, FirmwareError> {
        match self.root_complex(segment)? {
            Some(rc) => self.map_id(rc, rid),
            None => Ok(None),
        }
    }

    /// Walks the ID mapping chain from `node` with input ID `id` until it
    /// reaches an SMMU (see [`Iort::map_pci`]).
    ///
    /// A single mapping (flag bit 0) of a named component or root complex
    /// maps any input to its output base; elsewhere it does not apply (Linux
    /// `iort_id_map`). Ranges are inclusive: `input_base ..= input_base + count`.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn map_id(
        &self,
        node: Node<'a>,
        id: u32,
    ) -> Result<Option<StreamTarget<'a>>, FirmwareError> {
        let mut node = node;
        let mut id = id;
        for _ in 0..MAX_MAPPING_DEPTH {
            if matches!(node.kind, 3 | 4) {
                return Ok(Some(StreamTarget {
                    smmu: node,
                    stream_id: id,
                }));
            }
            let named_or_rc = matches!(node.kind, 1 | 2);
            let mut next = None;
            for m in node.id_mappings()? {
                let m = m?;
                if m.single() {
                    if named_or_rc {
                        next = Some((m.output_reference, m.output_base));
                        break;
                    }
                    continue;
                }
                if let Some(out) = m.map(id)? {
                    next = Some((m.output_reference, out));
                    break;
                }
            }
            let Some((reference, out)) = next else {
                return Ok(None);
            };
            node = self.node_at(reference)?;
            id = out;
            if node.kind == 0 {
                // An ITS group: the ID is an MSI DeviceID, no SMMU on the way.
                return Ok(None);
            }
        }
        Err(FirmwareError::MappingLoop)
    }

    /// Calls `f` with every RMR memory range that StreamID `stream_id` of
    /// the SMMU node `smmu` must keep identity-mapped (DEN 0049E §3.1.7:
    /// an RMR node's ID mappings name the SMMU and the StreamIDs
    /// `output_base ..= output_base + count`).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn reserved_regions_for(
        &self,
        smmu: &Node<'a>,
        stream_id: u32,
        mut f: impl FnMut(ReservedRegion, RmrFlags),
    ) -> Result<(), FirmwareError> {
        for n in self.nodes() {
            let n = n?;
            let NodeKind::Rmr(rmr) = n.kind()? else {
                continue;
            };
            let mut hit = false;
            for m in n.id_mappings()? {
                let m = m?;
                let end = m
                    .output_base
                    .checked_add(m.count)
                    .ok_or(FirmwareError::Overflow { offset: m.offset })?;
                if m.output_reference as usize == smmu.offset
                    && (m.output_base..=end).contains(&stream_id)
                {
                    hit = true;
                }
            }
            if hit {
                for r in rmr.regions() {
                    f(r?, rmr.flags);
                }
            }
        }
        Ok(())
    }
}

/// An SMMU node and the StreamID a device's DMA carries into it.
#[derive(Clone, Copy, Debug)]
pub struct StreamTarget<'a> {
    /// The SMMU node (SMMUv3, or SMMUv1/v2).
    pub smmu: Node<'a>,
    /// The StreamID.
    pub stream_id: u32,
}

/// The nodes of an IORT ([`Iort::nodes`]).
#[derive(Clone, Debug)]
pub struct Nodes<'a> {
    table: &'a [u8],
    off: usize,
    left: u32,
}

impl<'a> Iterator for Nodes<'a> {
    type Item = Result<Node<'a>, FirmwareError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = Node::parse(self.table, self.off);
        match &r {
            Ok(n) => self.off += n.bytes.len(),
            Err(_) => self.left = 0,
        }
        Some(r)
    }
}

/// One IORT node.
#[derive(Clone, Copy, Debug)]
pub struct Node<'a> {
    /// Offset in the table (what ID mappings refer to).
    pub offset: usize,
    kind: u8,
    /// Node revision.
    pub revision: u8,
    /// Identifier (unique per table since IORT E.b; 0 before).
    pub identifier: u32,
    bytes: &'a [u8],
    mappings: u32,
    mappings_at: usize,
}

impl<'a> Node<'a> {
    fn parse(table: &'a [u8], at: usize) -> Result<Self, FirmwareError> {
        let t = Reader(table);
        let len = usize::from(t.u16(at + 1)?);
        if len < NODE_HEADER_LEN {
            return Err(FirmwareError::BadLength { offset: at, len });
        }
        let bytes = t.slice(at, len)?;
        let r = Reader(bytes);
        let mappings = r.u32(8)?;
        let mappings_at = r.u32(12)? as usize;
        if mappings > 0 {
            // The array must lie inside the node, after its header.
            let size = (mappings as usize).checked_mul(ID_MAPPING_LEN);
            let end = size.and_then(|s| s.checked_add(mappings_at));
            if mappings_at < NODE_HEADER_LEN || end.is_none_or(|e| e > len) {
                return Err(FirmwareError::BadLength { offset: at, len });
            }
        }
        Ok(Self {
            offset: at,
            kind: bytes[0],
            revision: r.u8(3)?,
            identifier: r.u32(4)?,
            bytes,
            mappings,
            mappings_at,
        })
    }

    /// The node type (0 ITS group, 1 named component, 2 root complex,
    /// 3 SMMUv1/v2, 4 SMMUv3, 5 PMCG, 6 RMR).
    pub fn node_type(&self) -> u8 {
        self.kind
    }

    /// Where the type-specific fields end: at the ID mapping array, or at
    /// the node's end when it has none.
    fn fixed_end(&self) -> usize {
        if self.mappings > 0 {
            self.mappings_at
        } else {
            self.bytes.len()
        }
    }

    /// The type-specific fields (only those within the node's fixed part).
    fn fixed(&self) -> Reader<'a> {
        Reader(&self.bytes[..self.fixed_end()])
    }

    /// Decodes the type-specific fields.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn kind(&self) -> Result<NodeKind<'a>, FirmwareError> {
        let r = self.fixed();
        let short = |e: FirmwareError| match e {
            FirmwareError::Truncated { .. } => FirmwareError::BadLength {
                offset: self.offset,
                len: self.bytes.len(),
            },
            e => e,
        };
        let decoded = (|| {
            Ok(match self.kind {
                0 => {
                    let n = r.u32(16)? as usize;
                    let ids = r.slice(
                        20,
                        n.checked_mul(4).ok_or(FirmwareError::Overflow {
                            offset: self.offset,
                        })?,
                    )?;
                    NodeKind::ItsGroup(ItsGroup { ids })
                }
                1 => {
                    let tail = r.0.get(29..).unwrap_or(&[]);
                    let name_len = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                    NodeKind::NamedComponent(NamedComponent {
                        flags: r.u32(16)?,
                        coherent: r.u32(20)? & 1 != 0,
                        memory_address_limit: r.u8(28)?,
                        name: &tail[..name_len],
                    })
                }
                2 => NodeKind::RootComplex(RootComplex {
                    coherent: r.u32(16)? & 1 != 0,
                    ats: r.u32(24)? & 1 != 0,
                    segment: r.u32(28)?,
                    memory_address_limit: r.u8(32).ok(),
                }),
                4 => NodeKind::Smmuv3(Smmuv3 {
                    base: r.u64(16)?,
                    flags: r.u32(24)?,
                    model: r.u32(40)?,
                    event_gsiv: r.u32(44)?,
                    pri_gsiv: r.u32(48)?,
                    gerr_gsiv: r.u32(52)?,
                    sync_gsiv: r.u32(56)?,
                    proximity_domain: r.u32(60).ok(),
                    device_id_mapping_index: r.u32(64).ok(),
                }),
                6 => {
                    let n = r.u32(20)? as usize;
                    let at = r.u32(24)? as usize;
                    let size = n.checked_mul(RMR_DESC_LEN).ok_or(FirmwareError::Overflow {
                        offset: self.offset,
                    })?;
                    // The descriptors may sit after the ID mappings: read
                    // them from the whole node.
                    let descs = Reader(self.bytes).slice(at, size)?;
                    NodeKind::Rmr(Rmr {
                        flags: RmrFlags(r.u32(16)?),
                        descs,
                        offset: self.offset,
                    })
                }
                other => NodeKind::Other(other),
            })
        })();
        decoded.map_err(short)
    }

    /// The node's ID mappings. An error if the array does not fit the node
    /// (checked when the node was read, so this only repeats it).
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when the bytes it reads are truncated or
    /// malformed; the variant names what was wrong and at which offset.
    pub fn id_mappings(&self) -> Result<IdMappings<'a>, FirmwareError> {
        let n = self.mappings as usize;
        let bytes = if n == 0 {
            &[][..]
        } else {
            Reader(self.bytes).slice(self.mappings_at, n * ID_MAPPING_LEN)?
        };
        Ok(IdMappings {
            bytes,
            off: 0,
            base: self.offset + self.mappings_at,
        })
    }
}

/// A node's type-specific fields.
#[derive(Clone, Copy, Debug)]
pub enum NodeKind<'a> {
    /// Type 0: a group of GIC ITSes (where MSIs land).
    ItsGroup(ItsGroup<'a>),
    /// Type 1: a platform device named by its ACPI path.
    NamedComponent(NamedComponent<'a>),
    /// Type 2: a PCI root complex.
    RootComplex(RootComplex),
    /// Type 4: an SMMUv3.
    Smmuv3(Smmuv3),
    /// Type 6: reserved memory ranges.
    Rmr(Rmr<'a>),
    /// Another type (3 SMMUv1/v2, 5 PMCG, future types), not decoded.
    Other(u8),
}

/// An ITS group node.
#[derive(Clone, Copy, Debug)]
pub struct ItsGroup<'a> {
    ids: &'a [u8],
}

impl ItsGroup<'_> {
    /// The GIC ITS identifiers (as in the MADT).
    pub fn its_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// A named component node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedComponent<'a> {
    /// Node flags (bit 0: stall supported; bits 5:1 SubstreamID width).
    pub flags: u32,
    /// Cache-coherent attribute: the device's DMA is coherent.
    pub coherent: bool,
    /// Bits of address the device can drive.
    pub memory_address_limit: u8,
    /// ACPI device object path, without the NUL.
    pub name: &'a [u8],
}

/// A PCI root complex node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootComplex {
    /// Cache-coherent attribute.
    pub coherent: bool,
    /// ATS supported.
    pub ats: bool,
    /// PCI segment number.
    pub segment: u32,
    /// Bits of address the root complex can drive (node revision ≥ 1).
    pub memory_address_limit: Option<u8>,
}

/// An SMMUv3 node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Smmuv3 {
    /// Physical base of register page 0.
    pub base: u64,
    /// Flags (bit 0 COHACC override, bit 1 HTTU override, bit 3 proximity
    /// domain valid, bit 4 DeviceID mapping index valid).
    pub flags: u32,
    /// Model (0 generic; others name errata).
    pub model: u32,
    /// Event queue interrupt (GSIV; 0 when MSI-only).
    pub event_gsiv: u32,
    /// PRI queue interrupt.
    pub pri_gsiv: u32,
    /// GERROR interrupt.
    pub gerr_gsiv: u32,
    /// CMD_SYNC interrupt.
    pub sync_gsiv: u32,
    /// Proximity domain (node revision ≥ 1).
    pub proximity_domain: Option<u32>,
    /// Index of the ID mapping that gives the SMMU's own MSI DeviceID.
    pub device_id_mapping_index: Option<u32>,
}

impl Smmuv3 {
    /// The SMMU's table walks are coherent (COHACC override).
    pub fn coherent(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// RMR node flags (DEN 0049E §3.1.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RmrFlags(pub u32);

impl RmrFlags {
    /// Remapping permitted: the OS may later map the range elsewhere
    /// (Linux: `IOMMU_RESV_DIRECT_RELAXABLE`).
    pub fn remap_permitted(self) -> bool {
        self.0 & 1 != 0
    }

    /// Access privileged.
    pub fn privileged(self) -> bool {
        self.0 & 2 != 0
    }

    /// Access attributes (bits 9:2): 0–3 Device, 4 Normal non-cacheable,
    /// 5 Normal write-back.
    pub fn access_attributes(self) -> u8 {
        (self.0 >> 2) as u8
    }
}

/// A reserved memory range node.
#[derive(Clone, Copy, Debug)]
pub struct Rmr<'a> {
    /// Flags.
    pub flags: RmrFlags,
    descs: &'a [u8],
    offset: usize,
}

impl Rmr<'_> {
    /// The memory ranges. A zero-length or overflowing range is an error.
    pub fn regions(&self) -> impl Iterator<Item = Result<ReservedRegion, FirmwareError>> + '_ {
        let offset = self.offset;
        self.descs.chunks_exact(RMR_DESC_LEN).map(move |c| {
            let r = Reader(c);
            let base = r.u64(0)?;
            let len = r.u64(8)?;
            if len == 0 || base.checked_add(len - 1).is_none() {
                return Err(FirmwareError::Overflow { offset });
            }
            Ok(ReservedRegion { base, len })
        })
    }
}

/// One ID mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct IdMapping {
    /// First input ID.
    pub input_base: u32,
    /// Number of IDs minus one.
    pub count: u32,
    /// First output ID.
    pub output_base: u32,
    /// Offset of the node the output IDs belong to.
    pub output_reference: u32,
    /// Flags (bit 0: single mapping).
    pub flags: u32,
    offset: usize,
}

impl IdMapping {
    /// A single mapping: the node's own ID, not a range.
    pub fn single(&self) -> bool {
        self.flags & 1 != 0
    }

    /// The output ID of `id`, `None` when `id` is outside the input range.
    ///
    /// # Errors
    ///
    /// [`FirmwareError`] when a structure it reads is truncated or
    /// malformed, a mapping points to no node or loops, or a scope path goes through something that
    /// is not a bridge; the variant names what and where.
    pub fn map(&self, id: u32) -> Result<Option<u32>, FirmwareError> {
        let Some(delta) = id.checked_sub(self.input_base) else {
            return Ok(None);
        };
        if delta > self.count {
            return Ok(None);
        }
        self.output_base
            .checked_add(delta)
            .map(Some)
            .ok_or(FirmwareError::Overflow {
                offset: self.offset,
            })
    }
}

/// A node's ID mappings ([`Node::id_mappings`]).
#[derive(Clone, Debug)]
pub struct IdMappings<'a> {
    bytes: &'a [u8],
    off: usize,
    base: usize,
}

impl Iterator for IdMappings<'_> {
    type Item = Result<IdMapping, FirmwareError>;

    fn next(&mut self) -> Option<Self::Item> {
        let r = Reader(self.bytes);
        if self.off >= self.bytes.len() {
            return None;
        }
        let at = self.off;
        self.off += ID_MAPPING_LEN;
        Some((|| {
            Ok(IdMapping {
                input_base: r.u32(at)?,
                count: r.u32(at + 4)?,
                output_base: r.u32(at + 8)?,
                output_reference: r.u32(at + 12)?,
                flags: r.u32(at + 16)?,
                offset: self.base + at,
            })
        })())
    }
}
