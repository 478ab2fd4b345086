//! What [`Vtd::init`](super::Vtd::init) is told: the unit's configuration
//! and the default bound on poll loops.

/// Default bound on every poll loop, in register reads.
pub const DEFAULT_POLL_BUDGET: u32 = 1_000_000;

/// How [`Vtd::init`](super::Vtd::init) sets the unit up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct VtdConfig {
    /// Use queued invalidation when ECAP.QI; otherwise (or when false) use
    /// register-based invalidation.
    pub use_qi: bool,
    /// Domain-id for pass-through context entries; `None` = the highest
    /// domain-id the unit supports.
    pub bypass_domain_id: Option<u16>,
    /// PCI segment of the devices behind this unit.
    pub segment: u16,
    /// Bound on every poll loop, in register reads.
    pub poll_budget: u32,
    /// Scalable-mode translation (RTADDR.TTM = 01b): scalable context
    /// entries and PASID tables whose PASID 0 entry carries the
    /// second-level table. Needs ECAP.SMTS, ECAP.SLTS and queued invalidation.
    pub scalable: bool,
}

impl Default for VtdConfig {
    fn default() -> Self {
        Self {
            use_qi: true,
            bypass_domain_id: None,
            segment: 0,
            poll_budget: DEFAULT_POLL_BUDGET,
            scalable: false,
        }
    }
}
