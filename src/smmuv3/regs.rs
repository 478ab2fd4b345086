//! SMMUv3 register pages 0 and 1 (IHI 0070 revision C numbering, §6.3 "Register formats").
//!
//! Every register the driver touches is declared here once; the rest of the
//! driver reads and writes fields by name.
// The macros generate items (field constants, enum values) that cannot carry
// doc comments; the declarations below are documented instead.
#![allow(missing_docs)]

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

/// Offset of register page 1 from the SMMU base (§6.1).
pub const PAGE1_OFFSET: usize = 0x1_0000;

register_bitfields![u32,
    /// SMMU_IDR0 (§6.3.1).
    pub IDR0 [
        /// Stage 2 translation supported.
        S2P OFFSET(0) NUMBITS(1) [],
        /// Stage 1 translation supported.
        S1P OFFSET(1) NUMBITS(1) [],
        /// Translation table formats: 0b10 AArch64, 0b11 both.
        TTF OFFSET(2) NUMBITS(2) [],
        /// Coherent access to tables, queues and the stream table.
        COHACC OFFSET(4) NUMBITS(1) [],
        /// Broadcast TLB maintenance.
        BTM OFFSET(5) NUMBITS(1) [],
        /// Hardware translation table update (access flag / dirty).
        HTTU OFFSET(6) NUMBITS(2) [],
        /// Hypervisor stage 1 contexts (EL2 StreamWorld).
        HYP OFFSET(9) NUMBITS(1) [],
        /// PCIe ATS.
        ATS OFFSET(10) NUMBITS(1) [],
        /// 16-bit ASIDs.
        ASID16 OFFSET(12) NUMBITS(1) [],
        /// MSIs.
        MSI OFFSET(13) NUMBITS(1) [],
        /// PCIe PRI.
        PRI OFFSET(16) NUMBITS(1) [],
        /// 16-bit VMIDs.
        VMID16 OFFSET(18) NUMBITS(1) [],
        /// 2-level context descriptor tables.
        CD2L OFFSET(19) NUMBITS(1) [],
        /// Stall model.
        STALL_MODEL OFFSET(24) NUMBITS(2) [],
        /// Multi-level stream table: 0b00 linear only, 0b01 2-level.
        ST_LEVEL OFFSET(27) NUMBITS(2) []
    ],
    /// SMMU_IDR1 (§6.3.2).
    pub IDR1 [
        /// StreamID bits.
        SIDSIZE OFFSET(0) NUMBITS(6) [],
        /// SubstreamID bits.
        SSIDSIZE OFFSET(6) NUMBITS(5) [],
        /// log2 of the largest PRI queue.
        PRIQS OFFSET(11) NUMBITS(5) [],
        /// log2 of the largest event queue.
        EVENTQS OFFSET(16) NUMBITS(5) [],
        /// log2 of the largest command queue.
        CMDQS OFFSET(21) NUMBITS(5) [],
        /// Queue base registers are fixed.
        QUEUES_PRESET OFFSET(29) NUMBITS(1) [],
        /// Stream table base registers are fixed.
        TABLES_PRESET OFFSET(30) NUMBITS(1) []
    ],
    /// SMMU_IDR3 (§6.3.4).
    pub IDR3 [
        /// Hierarchical attribute disables.
        HAD OFFSET(2) NUMBITS(1) [],
        /// Range invalidation (TLBI ... with TG/NUM/SCALE).
        RIL OFFSET(10) NUMBITS(1) [],
        /// Break-before-make level.
        BBML OFFSET(11) NUMBITS(2) []
    ],
    /// SMMU_IDR5 (§6.3.6).
    pub IDR5 [
        /// Output address size.
        OAS OFFSET(0) NUMBITS(3) [],
        /// 4 KiB granule.
        GRAN4K OFFSET(4) NUMBITS(1) [],
        /// 16 KiB granule.
        GRAN16K OFFSET(5) NUMBITS(1) [],
        /// 64 KiB granule.
        GRAN64K OFFSET(6) NUMBITS(1) [],
        /// Virtual address extension.
        VAX OFFSET(10) NUMBITS(2) [],
        /// Maximum outstanding stalls.
        STALL_MAX OFFSET(16) NUMBITS(16) []
    ],
    /// SMMU_AIDR (§6.3.8).
    pub AIDR [
        /// Minor revision: 0 = SMMUv3.0, 1 = v3.1, ...
        ARCH_MINOR_REV OFFSET(0) NUMBITS(4) [],
        /// Major revision: 0 = SMMUv3.
        ARCH_MAJOR_REV OFFSET(4) NUMBITS(4) []
    ],
    /// SMMU_CR0 and SMMU_CR0ACK (§6.3.9, §6.3.10).
    pub CR0 [
        /// SMMU enable.
        SMMUEN OFFSET(0) NUMBITS(1) [],
        /// PRI queue enable.
        PRIQEN OFFSET(1) NUMBITS(1) [],
        /// Event queue enable.
        EVENTQEN OFFSET(2) NUMBITS(1) [],
        /// Command queue enable.
        CMDQEN OFFSET(3) NUMBITS(1) [],
        /// ATS check.
        ATSCHK OFFSET(4) NUMBITS(1) [],
        /// VMID wildcard.
        VMW OFFSET(6) NUMBITS(3) []
    ],
    /// SMMU_CR1 (§6.3.11): cacheability and shareability of tables and queues.
    pub CR1 [
        /// Queue inner cacheability.
        QUEUE_IC OFFSET(0) NUMBITS(2) [NonCacheable = 0, WriteBack = 1],
        /// Queue outer cacheability.
        QUEUE_OC OFFSET(2) NUMBITS(2) [NonCacheable = 0, WriteBack = 1],
        /// Queue shareability.
        QUEUE_SH OFFSET(4) NUMBITS(2) [NonShareable = 0, Outer = 2, Inner = 3],
        /// Table inner cacheability.
        TABLE_IC OFFSET(6) NUMBITS(2) [NonCacheable = 0, WriteBack = 1],
        /// Table outer cacheability.
        TABLE_OC OFFSET(8) NUMBITS(2) [NonCacheable = 0, WriteBack = 1],
        /// Table shareability.
        TABLE_SH OFFSET(10) NUMBITS(2) [NonShareable = 0, Outer = 2, Inner = 3]
    ],
    /// SMMU_CR2 (§6.3.12).
    pub CR2 [
        /// EL2-E2H translation regime.
        E2H OFFSET(0) NUMBITS(1) [],
        /// Record C_BAD_STREAMID for invalid input StreamIDs.
        RECINVSID OFFSET(1) NUMBITS(1) [],
        /// Private TLB maintenance (ignore broadcast TLBI).
        PTM OFFSET(2) NUMBITS(1) []
    ],
    /// SMMU_GBPA (§6.3.14): global bypass attributes, used while SMMUEN == 0.
    pub GBPA [
        /// Write 1 with the new value; reads 1 until the update completes.
        UPDATE OFFSET(31) NUMBITS(1) [],
        /// Abort incoming transactions instead of bypassing them.
        ABORT OFFSET(20) NUMBITS(1) []
    ],
    /// SMMU_IRQ_CTRL (§6.3.16).
    pub IRQ_CTRL [
        /// GERROR interrupt enable.
        GERROR_IRQEN OFFSET(0) NUMBITS(1) [],
        /// PRI queue interrupt enable.
        PRIQ_IRQEN OFFSET(1) NUMBITS(1) [],
        /// Event queue interrupt enable.
        EVENTQ_IRQEN OFFSET(2) NUMBITS(1) []
    ],
    /// SMMU_GERROR and SMMU_GERRORN (§6.3.18, §6.3.19): an error is active
    /// while its bit differs between the two.
    pub GERROR [
        /// Command queue error (CMDQ_CONS.ERR says which).
        CMDQ_ERR OFFSET(0) NUMBITS(1) [],
        /// Event queue write aborted (QEMU: event queue full).
        EVENTQ_ABT_ERR OFFSET(2) NUMBITS(1) [],
        /// PRI queue write aborted.
        PRIQ_ABT_ERR OFFSET(3) NUMBITS(1) [],
        /// CMD_SYNC MSI write aborted.
        MSI_CMDQ_ABT_ERR OFFSET(4) NUMBITS(1) [],
        /// Event queue MSI write aborted.
        MSI_EVENTQ_ABT_ERR OFFSET(5) NUMBITS(1) [],
        /// PRI queue MSI write aborted.
        MSI_PRIQ_ABT_ERR OFFSET(6) NUMBITS(1) [],
        /// GERROR MSI write aborted.
        MSI_GERROR_ABT_ERR OFFSET(7) NUMBITS(1) [],
        /// Service failure mode.
        SFM_ERR OFFSET(8) NUMBITS(1) [],
        /// Command queue control page error.
        CMDQP_ERR OFFSET(9) NUMBITS(1) []
    ],
    /// SMMU_STRTAB_BASE_CFG (§6.3.24).
    pub STRTAB_BASE_CFG [
        /// log2 of the number of StreamIDs the table covers.
        LOG2SIZE OFFSET(0) NUMBITS(6) [],
        /// StreamID bits resolved by a level-2 table.
        SPLIT OFFSET(6) NUMBITS(5) [],
        /// Format.
        FMT OFFSET(16) NUMBITS(2) [Linear = 0, TwoLevel = 1]
    ],
    /// SMMU_CMDQ_PROD (§6.3.26).
    pub CMDQ_PROD [
        /// Write index with the wrap bit just above it.
        WR OFFSET(0) NUMBITS(20) []
    ],
    /// SMMU_CMDQ_CONS (§6.3.27).
    pub CMDQ_CONS [
        /// Read index with the wrap bit just above it.
        RD OFFSET(0) NUMBITS(20) [],
        /// Error code of the command at RD, valid while GERROR.CMDQ_ERR is active.
        ERR OFFSET(24) NUMBITS(7) []
    ],
    /// SMMU_EVENTQ_PROD (§6.3.29).
    pub EVENTQ_PROD [
        /// Write index with the wrap bit just above it.
        WR OFFSET(0) NUMBITS(20) [],
        /// Overflow flag: toggles when events are lost.
        OVFLG OFFSET(31) NUMBITS(1) []
    ],
    /// SMMU_EVENTQ_CONS (§6.3.30).
    pub EVENTQ_CONS [
        /// Read index with the wrap bit just above it.
        RD OFFSET(0) NUMBITS(20) [],
        /// Overflow acknowledge: copy of OVFLG once seen.
        OVACKFLG OFFSET(31) NUMBITS(1) []
    ]
];

register_bitfields![u64,
    /// SMMU_STRTAB_BASE (§6.3.23).
    pub STRTAB_BASE [
        /// Physical address of the stream table, bits \[51:6\].
        ADDR OFFSET(6) NUMBITS(46) [],
        /// Read-allocate hint.
        RA OFFSET(62) NUMBITS(1) []
    ],
    /// SMMU_CMDQ_BASE / SMMU_EVENTQ_BASE (§6.3.25, §6.3.28).
    pub Q_BASE [
        /// log2 of the number of entries.
        LOG2SIZE OFFSET(0) NUMBITS(5) [],
        /// Physical address of the queue, bits \[51:5\].
        ADDR OFFSET(5) NUMBITS(47) [],
        /// Read/write-allocate hint.
        ALLOC OFFSET(62) NUMBITS(1) []
    ]
];

register_structs! {
    /// Register page 0 (§6.2, offsets 0x0000–0x00df).
    pub Page0 {
        (0x00 => pub idr0: ReadOnly<u32, IDR0::Register>),
        (0x04 => pub idr1: ReadOnly<u32, IDR1::Register>),
        (0x08 => pub idr2: ReadOnly<u32>),
        (0x0c => pub idr3: ReadOnly<u32, IDR3::Register>),
        (0x10 => pub idr4: ReadOnly<u32>),
        (0x14 => pub idr5: ReadOnly<u32, IDR5::Register>),
        (0x18 => pub iidr: ReadOnly<u32>),
        (0x1c => pub aidr: ReadOnly<u32, AIDR::Register>),
        (0x20 => pub cr0: ReadWrite<u32, CR0::Register>),
        (0x24 => pub cr0ack: ReadOnly<u32, CR0::Register>),
        (0x28 => pub cr1: ReadWrite<u32, CR1::Register>),
        (0x2c => pub cr2: ReadWrite<u32, CR2::Register>),
        (0x30 => _reserved0),
        (0x40 => pub statusr: ReadOnly<u32>),
        (0x44 => pub gbpa: ReadWrite<u32, GBPA::Register>),
        (0x48 => pub agbpa: ReadWrite<u32>),
        (0x4c => _reserved1),
        (0x50 => pub irq_ctrl: ReadWrite<u32, IRQ_CTRL::Register>),
        (0x54 => pub irq_ctrlack: ReadOnly<u32, IRQ_CTRL::Register>),
        (0x58 => _reserved2),
        (0x60 => pub gerror: ReadOnly<u32, GERROR::Register>),
        (0x64 => pub gerrorn: ReadWrite<u32, GERROR::Register>),
        (0x68 => pub gerror_irq_cfg0: ReadWrite<u64>),
        (0x70 => pub gerror_irq_cfg1: ReadWrite<u32>),
        (0x74 => pub gerror_irq_cfg2: ReadWrite<u32>),
        (0x78 => _reserved3),
        (0x80 => pub strtab_base: ReadWrite<u64, STRTAB_BASE::Register>),
        (0x88 => pub strtab_base_cfg: ReadWrite<u32, STRTAB_BASE_CFG::Register>),
        (0x8c => _reserved4),
        (0x90 => pub cmdq_base: ReadWrite<u64, Q_BASE::Register>),
        (0x98 => pub cmdq_prod: ReadWrite<u32, CMDQ_PROD::Register>),
        (0x9c => pub cmdq_cons: ReadWrite<u32, CMDQ_CONS::Register>),
        (0xa0 => pub eventq_base: ReadWrite<u64, Q_BASE::Register>),
        (0xa8 => _eventq_page0_alias),
        (0xb0 => pub eventq_irq_cfg0: ReadWrite<u64>),
        (0xb8 => pub eventq_irq_cfg1: ReadWrite<u32>),
        (0xbc => pub eventq_irq_cfg2: ReadWrite<u32>),
        (0xc0 => pub priq_base: ReadWrite<u64, Q_BASE::Register>),
        (0xc8 => _priq_page0_alias),
        (0xd0 => pub priq_irq_cfg0: ReadWrite<u64>),
        (0xd8 => pub priq_irq_cfg1: ReadWrite<u32>),
        (0xdc => pub priq_irq_cfg2: ReadWrite<u32>),
        (0xe0 => @END),
    }
}

register_structs! {
    /// Register page 1 (§6.2, base + 0x10000): the queue indexes software
    /// polls (event queue and PRI queue producer/consumer).
    pub Page1 {
        (0x00 => _reserved0),
        (0xa8 => pub eventq_prod: ReadWrite<u32, EVENTQ_PROD::Register>),
        (0xac => pub eventq_cons: ReadWrite<u32, EVENTQ_CONS::Register>),
        (0xb0 => _reserved1),
        (0xc8 => pub priq_prod: ReadWrite<u32>),
        (0xcc => pub priq_cons: ReadWrite<u32>),
        (0xd0 => @END),
    }
}

impl Page0 {
    /// GERROR bits active now: those that differ from GERRORN (§6.3.18).
    pub fn active_gerrors(&self) -> u32 {
        self.gerror.get() ^ self.gerrorn.get()
    }

    /// Acknowledges the active GERROR `bits` by toggling them in GERRORN
    /// (§6.3.19).
    pub fn ack_gerrors(&self, bits: u32) {
        self.gerrorn.set(self.gerrorn.get() ^ bits);
    }
}
