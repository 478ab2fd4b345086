//! The board's test list. Add a test: write `pub fn name(ctx: &mut Ctx) ->
//! Result<(), Fail>` in a module here and list it with `test!(module::name)`.
//! Tests run in this order, all in one boot per QEMU configuration.

use crate::harness::TestFn;

mod basic;
mod bridge;
mod dma_api;
mod guest;
mod handoff;
mod ir;
mod irq;
mod msi;
mod p2p;
mod reserved;
mod smp;
mod virtio;
mod virtio_drivers;
mod vtd;

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
    test!(basic::dmar_scopes_give_each_device_its_unit),
    test!(basic::memory_lender_frees_and_reuses),
    test!(vtd::vtd_probe_decodes_what_qemu_advertises),
    test!(vtd::vtd_init_enables_translation_and_blocks_unattached_devices),
    test!(vtd::noncontiguous_transaction_dma_both_ways_hits_exact_pages),
    test!(vtd::unlinked_page_blocks_dma_and_fault_is_decoded),
    test!(vtd::skipped_iotlb_invalidation_is_caught),
    test!(vtd::two_domains_are_isolated),
    test!(vtd::superpage_2m_used_when_sllps_allows),
    test!(vtd::exactly_one_wait_descriptor_per_sync),
    test!(vtd::fault_overflow_reported_and_clearing_records_next_fault),
    test!(vtd::detach_blocks_and_bypass_passes_through),
    test!(vtd::invalid_descriptor_reported_and_queue_recovers),
    test!(vtd::invalidation_mode_switch_keeps_translation_on),
    test!(handoff::handoff_window_dma_lands_nowhere_and_next_stage_sees_the_fault),
    test!(handoff::handoff_keeping_identity_region_keeps_its_dma_and_blocks_the_rest),
    test!(irq::vtd_fault_msi_delivers_decoded_fault),
    test!(irq::vtd_fault_pending_while_masked_fires_on_unmask),
    test!(msi::msi_arrives_while_the_device_is_translated),
    test!(ir::ir_msi_arrives_at_the_vector_and_apic_of_its_irte),
    test!(ir::ir_retargeted_irte_moves_the_next_interrupt),
    test!(ir::ir_entry_of_another_source_id_blocks_msi_with_decoded_fault),
    test!(ir::ir_cfi_off_blocks_compat_msi_where_the_unit_gates_it),
    test!(ir::ir_x2apic_destination_uses_all_32_bits),
    test!(ir::ir_freed_irte_blocks_msi_with_decoded_fault),
    test!(ir::ir_refused_without_queued_invalidation),
    test!(bridge::bridged_device_dma_translated_and_fault_names_its_requester_id),
    test!(reserved::interrupt_window_is_never_handed_out),
    test!(reserved::rmrr_identity_region_dma_lands),
    test!(guest::guest_domain_confines_dma_to_guest_memory),
    test!(guest::adopted_tables_translate_and_owner_changes_take_effect),
    test!(guest::two_guests_are_isolated_and_their_interrupts_remapped),
    test!(p2p::p2p_dma_through_host_bridge_lands_in_peer_bar),
    test!(p2p::p2p_without_an_allowed_host_bridge_is_refused),
    test!(virtio::virtio_blk_reads_and_writes_through_iommu_tables),
    test!(virtio::virtio_blk_dma_to_an_unlinked_buffer_faults),
    test!(virtio_drivers::virtio_drivers_blk_reads_and_writes_through_iommu_hal),
    test!(virtio_drivers::virtio_drivers_unshared_buffer_faults),
    test!(dma_api::dma_api_edu_dma_lands_in_buffer_and_released_buffer_faults),
    test!(smp::four_cpus_run_a_job_and_start_again),
    test!(smp::cpu_that_never_comes_up_fails_the_run_in_bounded_time),
    test!(smp::four_cpus_dma_on_three_devices_while_faults_interrupt),
];
