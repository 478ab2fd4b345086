//! The board's tests, run in this order. To add one: write
//! `fn name(ctx: &mut Ctx) -> Result<(), Fail>` in a module here and list it.

use crate::harness::TestFn;

mod basic;

/// Every test, by name; the runner prints `PASS name` / `FAIL name: why`.
pub const TESTS: &[(&str, TestFn)] = &[
    // Basic tests first: they need the SMMU as it comes out of reset.
    (
        "edu_dma_lands_in_ram_without_translation",
        basic::edu_dma_lands_in_ram_without_translation,
    ),
    ("smmu_registers_readable", basic::smmu_registers_readable),
    (
        "memory_lender_frees_and_reuses",
        basic::memory_lender_frees_and_reuses,
    ),
];
