//! Settings of [`Smmu::init`](super::Smmu::init).

/// Which stream table layout [`Smmu::init`](super::Smmu::init) builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum StreamTableChoice {
    /// Linear when `2^sid_bits` STEs fit in 64 KiB or the SMMU has no
    /// 2-level support, else 2-level.
    Auto,
    /// Always linear.
    Linear,
    /// 2-level (needs IDR0.ST_LEVEL); linear when no more than
    /// [`SPLIT`](super::strtab::SPLIT) StreamID bits are covered (one
    /// level-2 array's worth: LOG2SIZE may not be below SPLIT).
    TwoLevel,
}

/// Settings of [`Smmu::init`](super::Smmu::init).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SmmuConfig {
    /// Stream table layout.
    pub stream_table: StreamTableChoice,
    /// StreamID bits the stream table covers; `None`: all of IDR1.SIDSIZE.
    pub sid_bits: Option<u8>,
    /// log2 of command queue entries (capped by IDR1.CMDQS).
    pub cmdq_log2: u8,
    /// log2 of event queue records (capped by IDR1.EVENTQS).
    pub evtq_log2: u8,
    /// Enable the GERROR and event queue interrupts (for
    /// [`Smmu::handle_irq`](super::Smmu::handle_irq)).
    pub irqs: bool,
    /// Use range invalidation when the SMMU has it (IDR3.RIL); `false`
    /// forces the per-page / whole-domain path.
    pub range_invalidation: bool,
    /// Without range invalidation, ranges longer than this many pages are
    /// invalidated by ASID/VMID instead of page by page. Capped at 512
    /// (`MAX_TLBI_PAGES`), so one call queues a bounded number of commands.
    pub tlbi_page_threshold: u64,
    /// Polls before a wait on the SMMU gives up with a timeout.
    pub poll_budget: u32,
}

impl Default for SmmuConfig {
    fn default() -> Self {
        Self {
            stream_table: StreamTableChoice::Auto,
            sid_bits: None,
            cmdq_log2: 8,
            evtq_log2: 7,
            irqs: false,
            range_invalidation: true,
            tlbi_page_threshold: 64,
            poll_budget: 1_000_000,
        }
    }
}
