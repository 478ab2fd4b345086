//! When a table page that an unmap empties goes back to the lender.

/// What happens to a table that an unmap leaves with no valid entry.
///
/// Either way every cleared descriptor is invalidated before the sync
/// returns, and no table page goes back to the lender while the IOMMU could
/// still walk it: a detached table waits on the retired list for the
/// invalidation of the range it covered, walk caches included, and its
/// completion.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum TableReclaim {
    /// Detach an emptied table at once and hand it back after the next
    /// sync (the default): memory follows the mappings, at the price of a
    /// detach, a walk-cache invalidation and, when the range is linked
    /// again, a fresh table (zeroed by the lender).
    #[default]
    Eager,
    /// Leave emptied tables attached, with their count at zero: a later link
    /// into the same region needs no allocation and no zeroing, and an
    /// unlink that empties a table only clears its entry (leaf
    /// invalidation). This is Linux io-pgtable's behaviour (an unmap never
    /// frees a table it did not remove a block for), and what the shared
    /// path of `SharedDomain` does between its reclaims. The empty tables
    /// go back through `Domain::reclaim_empty_tables`, or at `teardown`.
    Keep,
}
