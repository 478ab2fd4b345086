//! Event queue records (IHI 0070, §7.3): 32-byte records decoded into a typed enum.

use core::fmt;

/// Which translation stage a fault came from (event `S2` bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Stage {
    /// Stage 1 (S2 = 0).
    Stage1,
    /// Stage 2 (S2 = 1).
    Stage2,
}

/// What a translation fault record carries (§7.3.12–§7.3.15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultInfo {
    /// StreamID of the faulting transaction.
    pub stream_id: u32,
    /// SubstreamID, when the transaction had one (SSV).
    pub substream_id: Option<u32>,
    /// The input address (IOVA) that faulted.
    pub addr: u64,
    /// Intermediate physical address, for a stage-2 fault (bits \[51:12\]).
    pub ipa: u64,
    /// The access was a read (RnW = 1); false for a write.
    pub read: bool,
    /// The stage that faulted.
    pub stage: Stage,
    /// Privileged access (PnU).
    pub privileged: bool,
    /// Instruction fetch (InD).
    pub instruction: bool,
    /// CLASS: 0 CD fetch, 1 translation table walk, 2 input address.
    pub class: u8,
}

/// A decoded event record (§7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Event {
    /// F_UUT (0x01): unsupported upstream transaction.
    UnsupportedTransaction {
        /// StreamID.
        stream_id: u32,
        /// Input address.
        addr: u64,
    },
    /// C_BAD_STREAMID (0x02): StreamID out of range of the stream table.
    BadStreamId {
        /// StreamID.
        stream_id: u32,
    },
    /// F_STE_FETCH (0x03): the STE could not be fetched.
    SteFetch {
        /// StreamID.
        stream_id: u32,
        /// Address of the fetch.
        fetch_addr: u64,
    },
    /// C_BAD_STE (0x04): the STE is invalid or illegal.
    BadSte {
        /// StreamID.
        stream_id: u32,
    },
    /// F_STREAM_DISABLED (0x06).
    StreamDisabled {
        /// StreamID.
        stream_id: u32,
    },
    /// C_BAD_SUBSTREAMID (0x08).
    BadSubstreamId {
        /// StreamID.
        stream_id: u32,
    },
    /// F_CD_FETCH (0x09): the CD could not be fetched.
    CdFetch {
        /// StreamID.
        stream_id: u32,
        /// Address of the fetch.
        fetch_addr: u64,
    },
    /// C_BAD_CD (0x0a): the CD is invalid or illegal.
    BadCd {
        /// StreamID.
        stream_id: u32,
    },
    /// F_WALK_EABT (0x0b): external abort on a table walk.
    WalkExternalAbort(FaultInfo),
    /// F_TRANSLATION (0x10): no valid translation.
    Translation(FaultInfo),
    /// F_ADDR_SIZE (0x11): address outside the configured size.
    AddressSize(FaultInfo),
    /// F_ACCESS (0x12): access flag fault.
    Access(FaultInfo),
    /// F_PERMISSION (0x13): the permissions forbid the access.
    Permission(FaultInfo),
    /// Any other event ID, with its raw record.
    Other {
        /// EVENT_ID.
        id: u8,
        /// StreamID.
        stream_id: u32,
        /// The raw record.
        raw: [u64; 4],
    },
}

const SSV: u64 = 1 << 11;

impl Event {
    /// Size of an event record in bytes.
    pub const SIZE: usize = 32;

    /// Decodes a raw 32-byte record.
    pub fn decode(raw: [u64; 4]) -> Self {
        let [d0, d1, d2, d3] = raw;
        let id = d0 as u8;
        let stream_id = (d0 >> 32) as u32;
        let fault = || FaultInfo {
            stream_id,
            substream_id: if d0 & SSV != 0 {
                Some(((d0 >> 12) & 0xf_ffff) as u32)
            } else {
                None
            },
            addr: d2,
            ipa: d3 & 0x000f_ffff_ffff_f000,
            read: d1 & (1 << 35) != 0,
            stage: if d1 & (1 << 39) != 0 {
                Stage::Stage2
            } else {
                Stage::Stage1
            },
            privileged: d1 & (1 << 33) != 0,
            instruction: d1 & (1 << 34) != 0,
            class: ((d1 >> 40) & 0b11) as u8,
        };
        match id {
            0x01 => Event::UnsupportedTransaction {
                stream_id,
                addr: d2,
            },
            0x02 => Event::BadStreamId { stream_id },
            0x03 => Event::SteFetch {
                stream_id,
                fetch_addr: d3 & 0x000f_ffff_ffff_fff8,
            },
            0x04 => Event::BadSte { stream_id },
            0x06 => Event::StreamDisabled { stream_id },
            0x08 => Event::BadSubstreamId { stream_id },
            0x09 => Event::CdFetch {
                stream_id,
                fetch_addr: d3 & 0x000f_ffff_ffff_fff8,
            },
            0x0a => Event::BadCd { stream_id },
            0x0b => Event::WalkExternalAbort(fault()),
            0x10 => Event::Translation(fault()),
            0x11 => Event::AddressSize(fault()),
            0x12 => Event::Access(fault()),
            0x13 => Event::Permission(fault()),
            _ => Event::Other { id, stream_id, raw },
        }
    }

    /// The StreamID the event is about.
    pub const fn stream_id(&self) -> u32 {
        match *self {
            Event::UnsupportedTransaction { stream_id, .. }
            | Event::BadStreamId { stream_id }
            | Event::SteFetch { stream_id, .. }
            | Event::BadSte { stream_id }
            | Event::StreamDisabled { stream_id }
            | Event::BadSubstreamId { stream_id }
            | Event::CdFetch { stream_id, .. }
            | Event::BadCd { stream_id }
            | Event::Other { stream_id, .. } => stream_id,
            Event::WalkExternalAbort(f)
            | Event::Translation(f)
            | Event::AddressSize(f)
            | Event::Access(f)
            | Event::Permission(f) => f.stream_id,
        }
    }

    /// The fault details, for translation-related faults.
    pub const fn fault(&self) -> Option<&FaultInfo> {
        match self {
            Event::WalkExternalAbort(f)
            | Event::Translation(f)
            | Event::AddressSize(f)
            | Event::Access(f)
            | Event::Permission(f) => Some(f),
            _ => None,
        }
    }

    /// The spec's name of the event.
    pub const fn name(&self) -> &'static str {
        match self {
            Event::UnsupportedTransaction { .. } => "F_UUT",
            Event::BadStreamId { .. } => "C_BAD_STREAMID",
            Event::SteFetch { .. } => "F_STE_FETCH",
            Event::BadSte { .. } => "C_BAD_STE",
            Event::StreamDisabled { .. } => "F_STREAM_DISABLED",
            Event::BadSubstreamId { .. } => "C_BAD_SUBSTREAMID",
            Event::CdFetch { .. } => "F_CD_FETCH",
            Event::BadCd { .. } => "C_BAD_CD",
            Event::WalkExternalAbort(_) => "F_WALK_EABT",
            Event::Translation(_) => "F_TRANSLATION",
            Event::AddressSize(_) => "F_ADDR_SIZE",
            Event::Access(_) => "F_ACCESS",
            Event::Permission(_) => "F_PERMISSION",
            Event::Other { .. } => "event",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sid={:#x}", self.name(), self.stream_id())?;
        match self {
            Event::SteFetch { fetch_addr, .. } | Event::CdFetch { fetch_addr, .. } => {
                write!(f, " fetch={fetch_addr:#x}")
            }
            Event::UnsupportedTransaction { addr, .. } => write!(f, " addr={addr:#x}"),
            Event::Other { id, .. } => write!(f, " id={id:#04x}"),
            _ => match self.fault() {
                Some(i) => {
                    write!(
                        f,
                        " iova={:#x} {}",
                        i.addr,
                        if i.read { "read" } else { "write" }
                    )?;
                    match i.stage {
                        Stage::Stage1 => write!(f, " stage 1"),
                        Stage::Stage2 => write!(f, " stage 2 ipa={:#x}", i.ipa),
                    }
                }
                None => Ok(()),
            },
        }
    }
}

impl Event {
    /// The numeric EVENT_ID of the record (§7.3, bits \[7:0\] of the first
    /// word): 0x10 for F_TRANSLATION, 0x04 for C_BAD_STE, and so on; for
    /// [`Event::Other`] the ID the record carried.
    pub const fn id(&self) -> u8 {
        match self {
            Event::UnsupportedTransaction { .. } => 0x01,
            Event::BadStreamId { .. } => 0x02,
            Event::SteFetch { .. } => 0x03,
            Event::BadSte { .. } => 0x04,
            Event::StreamDisabled { .. } => 0x06,
            Event::BadSubstreamId { .. } => 0x08,
            Event::CdFetch { .. } => 0x09,
            Event::BadCd { .. } => 0x0a,
            Event::WalkExternalAbort(_) => 0x0b,
            Event::Translation(_) => 0x10,
            Event::AddressSize(_) => 0x11,
            Event::Access(_) => 0x12,
            Event::Permission(_) => 0x13,
            Event::Other { id, .. } => *id,
        }
    }
}

/// One event-queue record exactly as the SMMU wrote it (§7.3: 32 bytes, four
/// little-endian 64-bit words), for what the decoded [`Event`] does not keep:
/// logging the record, or forwarding it unchanged to a guest's virtual SMMU.
/// [`Smmu::poll_event_records`](super::Smmu::poll_event_records) delivers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct EventRecord {
    words: [u64; 4],
}

impl EventRecord {
    /// A record from its four 64-bit words (word 0 at the lowest address).
    pub const fn from_words(words: [u64; 4]) -> Self {
        Self { words }
    }

    /// The four 64-bit words.
    pub const fn words(&self) -> [u64; 4] {
        self.words
    }

    /// The 32 bytes as they lie in the event queue (little endian).
    pub fn to_bytes(&self) -> [u8; Event::SIZE] {
        let mut out = [0u8; Event::SIZE];
        for (chunk, w) in out.chunks_exact_mut(8).zip(self.words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// A record from the 32 bytes of a queue slot (little endian).
    pub fn from_bytes(bytes: [u8; Event::SIZE]) -> Self {
        let mut words = [0u64; 4];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
        }
        Self { words }
    }

    /// EVENT_ID, bits \[7:0\].
    pub const fn id(&self) -> u8 {
        self.words[0] as u8
    }

    /// StreamID, bits \[63:32\].
    pub const fn stream_id(&self) -> u32 {
        (self.words[0] >> 32) as u32
    }

    /// The decoded event.
    pub fn decode(&self) -> Event {
        Event::decode(self.words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_fault_decodes_sid_address_direction_and_stage() {
        // EVENT_ID 0x10, StreamID 0x28 in [63:32]; dword 1: RnW (bit 35) = 0
        // (a write), S2 (bit 39) = 1, CLASS (41:40) = 0b10; InputAddr 0x10_3000.
        let e = Event::decode([
            0x0000_0028_0000_0010,
            1 << 39 | 2 << 40,
            0x10_3000,
            0x10_3000,
        ]);
        assert_eq!(e.name(), "F_TRANSLATION");
        let Event::Translation(f) = e else {
            panic!("{e:?}")
        };
        assert_eq!(f.stream_id, 0x28);
        assert_eq!(f.addr, 0x10_3000);
        assert!(!f.read);
        assert_eq!(f.stage, Stage::Stage2);
        assert_eq!(f.class, 2);
        assert_eq!(f.substream_id, None);
    }

    #[test]
    fn read_permission_fault_with_substream() {
        // SSV (bit 11) = 1, SubstreamID 3 in [31:12]; RnW = 1.
        let e = Event::decode([0x0000_0030_0000_3813, 1 << 35, 0xdead_0000, 0]);
        let Event::Permission(f) = e else {
            panic!("{e:?}")
        };
        assert_eq!((f.stream_id, f.substream_id, f.read), (0x30, Some(3), true));
        assert_eq!(f.stage, Stage::Stage1);
    }

    #[test]
    fn configuration_errors_decode_by_id() {
        assert_eq!(
            Event::decode([0x0000_0010_0000_0002, 0, 0, 0]),
            Event::BadStreamId { stream_id: 0x10 }
        );
        assert_eq!(
            Event::decode([0x0000_0010_0000_0004, 0, 0, 0]),
            Event::BadSte { stream_id: 0x10 }
        );
        assert_eq!(
            Event::decode([0x0000_0010_0000_000a, 0, 0, 0]),
            Event::BadCd { stream_id: 0x10 }
        );
        assert_eq!(
            Event::decode([0x0000_0010_0000_0003, 0, 0, 0x4000_0a07]),
            Event::SteFetch {
                stream_id: 0x10,
                fetch_addr: 0x4000_0a00
            }
        );
        assert_eq!(
            Event::decode([0x0000_0010_0000_0009, 0, 0, 0x4000_0b00]).name(),
            "F_CD_FETCH"
        );
        assert_eq!(
            Event::decode([0x0000_0010_0000_0011, 0, 0, 0]).name(),
            "F_ADDR_SIZE"
        );
        assert_eq!(
            Event::decode([0x0000_0010_0000_0012, 0, 0, 0]).name(),
            "F_ACCESS"
        );
        assert!(matches!(
            Event::decode([0x0000_0010_0000_0077, 0, 0, 0]),
            Event::Other {
                id: 0x77,
                stream_id: 0x10,
                ..
            }
        ));
    }
    #[test]
    fn event_id_is_the_records_event_id_and_the_raw_record_round_trips() {
        for id in 0u8..=0x30 {
            let words = [
                0x0000_0041_0000_0000 | u64::from(id),
                1 << 35,
                0x10_3004,
                0x10_3000,
            ];
            let r = EventRecord::from_words(words);
            assert_eq!(r.id(), id);
            assert_eq!(r.decode().id(), id, "{}", r.decode().name());
            assert_eq!(r.stream_id(), 0x41);
            assert_eq!(r.words(), words);
            let bytes = r.to_bytes();
            // Byte 0 is EVENT_ID, bytes 4..8 the StreamID (little endian).
            assert_eq!((bytes[0], bytes[4], bytes[16]), (id, 0x41, 0x04));
            assert_eq!(EventRecord::from_bytes(bytes), r);
        }
    }
}
