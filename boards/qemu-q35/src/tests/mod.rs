//! The board's test list. Add a test: write `pub fn name(ctx: &mut Ctx) ->
//! Result<(), Fail>` in a module here and list it with `test!(module::name)`.
//! Tests run in this order, all in one boot per QEMU configuration.

use crate::harness::TestFn;

mod basic;

/// `(stringify!(name), module::name)`.
macro_rules! test {
    ($module:ident :: $name:ident) => {
        (stringify!($name), $module::$name as TestFn)
    };
}

/// Every board test, in run order.
pub const TESTS: &[(&str, TestFn)] = &[
    test!(basic::edu_dma_lands_in_ram_without_translation),
    test!(basic::vtd_registers_readable),
    test!(basic::memory_lender_frees_and_reuses),
];
