//! The board's tests, run in this order. To add one: write
//! `fn name(ctx: &mut Ctx) -> Result<(), Fail>` in a module here and list it.

use crate::harness::TestFn;

mod basic;
mod bridge;
mod guest;
mod handoff;
mod irq;
mod msi;
mod nested;
mod p2p;
mod smmu;
mod smp;
mod virtio;
mod virtio_drivers;

/// Every test, by name; the runner prints `PASS name` / `FAIL name: why`.
pub const TESTS: &[(&str, TestFn)] = &[
    // Basic tests first: they need the SMMU as it comes out of reset.
    (
        "edu_dma_lands_in_ram_without_translation",
        basic::edu_dma_lands_in_ram_without_translation,
    ),
    ("smmu_registers_readable", basic::smmu_registers_readable),
    (
        "iommu_map_gives_each_device_its_stream_id",
        basic::iommu_map_gives_each_device_its_stream_id,
    ),
    (
        "memory_lender_frees_and_reuses",
        basic::memory_lender_frees_and_reuses,
    ),
    // SMMUv3 driver tests: each brings the SMMU up and shuts it down.
    (
        "smmu_probe_decodes_qemu_features",
        smmu::smmu_probe_decodes_qemu_features,
    ),
    (
        "smmu_linear_and_two_level_stream_tables_translate",
        smmu::smmu_linear_and_two_level_stream_tables_translate,
    ),
    (
        "smmu_two_step_links_scattered_pages_into_one_iova_range",
        smmu::smmu_two_step_links_scattered_pages_into_one_iova_range,
    ),
    (
        "smmu_unlinked_page_blocks_dma_and_reports_translation_fault",
        smmu::smmu_unlinked_page_blocks_dma_and_reports_translation_fault,
    ),
    (
        "smmu_missing_invalidation_would_be_caught",
        smmu::smmu_missing_invalidation_would_be_caught,
    ),
    (
        "smmu_two_domains_isolate_two_devices",
        smmu::smmu_two_domains_isolate_two_devices,
    ),
    (
        "smmu_guest_region_with_2m_blocks",
        smmu::smmu_guest_region_with_2m_blocks,
    ),
    (
        "bridged_device_dma_translated_and_fault_names_its_stream_id",
        bridge::bridged_device_dma_translated_and_fault_names_its_stream_id,
    ),
    (
        "guest_domain_confines_dma_to_guest_memory",
        guest::guest_domain_confines_dma_to_guest_memory,
    ),
    (
        "adopted_tables_translate_and_owner_changes_take_effect",
        guest::adopted_tables_translate_and_owner_changes_take_effect,
    ),
    // Nested translation: a guest's stage 1 on the hypervisor's stage 2.
    (
        "nested_dma_translates_through_both_stages_and_faults_name_the_stage",
        nested::nested_dma_translates_through_both_stages_and_faults_name_the_stage,
    ),
    (
        "nested_stage1_change_takes_effect_after_the_guest_invalidation",
        nested::nested_stage1_change_takes_effect_after_the_guest_invalidation,
    ),
    (
        "nested_stage2_change_takes_effect_after_s2_and_stage1_flush",
        nested::nested_stage2_change_takes_effect_after_s2_and_stage1_flush,
    ),
    (
        "nested_guest_cd_change_takes_effect_after_cfgi_cd",
        nested::nested_guest_cd_change_takes_effect_after_cfgi_cd,
    ),
    (
        "smmu_fault_storm_overflows_event_queue_and_recovers",
        smmu::smmu_fault_storm_overflows_event_queue_and_recovers,
    ),
    (
        "smmu_illegal_command_is_reported_and_queue_recovers",
        smmu::smmu_illegal_command_is_reported_and_queue_recovers,
    ),
    (
        "smmu_one_cmd_sync_per_sync_call",
        smmu::smmu_one_cmd_sync_per_sync_call,
    ),
    (
        "smmu_detach_returns_stream_to_abort",
        smmu::smmu_detach_returns_stream_to_abort,
    ),
    (
        "smmu_handoff_window_dma_lands_nowhere",
        handoff::smmu_handoff_window_dma_lands_nowhere,
    ),
    // SMMU interrupts through the GICv3 (what a hypervisor relies on).
    (
        "smmu_event_irq_delivers_translation_fault",
        irq::smmu_event_irq_delivers_translation_fault,
    ),
    (
        "smmu_gerror_irq_reports_event_queue_overflow",
        irq::smmu_gerror_irq_reports_event_queue_overflow,
    ),
    // P2P through the host bridge: edu DMAs into ivshmem's BAR 2.
    (
        "msi_through_the_smmu_arrives_only_with_the_doorbell_mapped",
        msi::msi_through_the_smmu_arrives_only_with_the_doorbell_mapped,
    ),
    (
        "p2p_dma_through_host_bridge_lands_in_peer_bar",
        p2p::p2p_dma_through_host_bridge_lands_in_peer_bar,
    ),
    (
        "p2p_without_an_allowed_host_bridge_is_refused",
        p2p::p2p_without_an_allowed_host_bridge_is_refused,
    ),
    // A real device class: virtio-blk's DMA through the SMMU.
    (
        "virtio_blk_reads_and_writes_through_iommu_tables",
        virtio::virtio_blk_reads_and_writes_through_iommu_tables,
    ),
    (
        "virtio_blk_dma_to_an_unlinked_buffer_faults",
        virtio::virtio_blk_dma_to_an_unlinked_buffer_faults,
    ),
    // virtio-drivers' own VirtIOBlk through the virtio-drivers adapter.
    (
        "virtio_drivers_blk_reads_and_writes_through_iommu_hal",
        virtio_drivers::virtio_drivers_blk_reads_and_writes_through_iommu_hal,
    ),
    (
        "virtio_drivers_unshared_buffer_faults",
        virtio_drivers::virtio_drivers_unshared_buffer_faults,
    ),
    // Several CPUs at once (QEMU -smp 4).
    (
        "four_cpus_run_a_job_and_start_again",
        smp::four_cpus_run_a_job_and_start_again,
    ),
    (
        "cpu_that_never_comes_up_fails_the_run_in_bounded_time",
        smp::cpu_that_never_comes_up_fails_the_run_in_bounded_time,
    ),
    (
        "four_cpus_dma_on_three_devices_while_faults_interrupt",
        smp::four_cpus_dma_on_three_devices_while_faults_interrupt,
    ),
];
