//! QEMU's `ivshmem-plain` (docs/specs/ivshmem-spec.rst): BAR 2 is the
//! memory of a host memory backend, plain RAM behind a PCI BAR. The board
//! offers it as P2P memory that edu DMAs into.

use bare_iommu::{DeviceId, PhysAddr};

/// PCI vendor ID of ivshmem (Red Hat).
pub const VENDOR: u16 = 0x1af4;
/// PCI device ID of ivshmem.
pub const DEVICE: u16 = 0x1110;
/// The BAR holding the shared memory.
pub const MEMORY_BAR: u8 = 2;

/// The ivshmem function with BAR 2 assigned and decoding on.
#[derive(Clone, Copy, Debug)]
pub struct Ivshmem {
    /// Its PCI identity.
    pub id: DeviceId,
    /// CPU physical address of BAR 2 (from the host bridge's `ranges`).
    pub bar2: PhysAddr,
    /// PCI bus address of BAR 2 (read back from the BAR register).
    pub bar2_bus: u64,
    /// Length of BAR 2.
    pub len: u64,
}

impl Ivshmem {
    fn ptr(&self, off: u64, len: usize) -> *mut u8 {
        let end = off.checked_add(len as u64);
        assert!(
            end.is_some_and(|e| e <= self.len),
            "ivshmem BAR 2 access {off:#x}+{len:#x} beyond {:#x}",
            self.len
        );
        (self.bar2.get() + off) as usize as *mut u8
    }

    /// Fills `[off, off + len)` of BAR 2 with `byte`, through the CPU.
    pub fn fill(&self, off: u64, len: usize, byte: u8) {
        let p = self.ptr(off, len);
        for i in 0..len {
            // SAFETY: inside BAR 2 (checked by `ptr`), which decodes RAM.
            unsafe { p.add(i).write_volatile(byte) };
        }
    }

    /// Byte `off` of BAR 2, read by the CPU.
    pub fn byte(&self, off: u64) -> u8 {
        // SAFETY: inside BAR 2 (checked by `ptr`), which decodes RAM.
        unsafe { self.ptr(off, 1).read_volatile() }
    }
}
