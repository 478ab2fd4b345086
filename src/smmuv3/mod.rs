//! Arm SMMUv3 driver (IHI 0070).
