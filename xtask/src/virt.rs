//! `cargo xtask board virt-smmuv3`: builds `boards/qemu-virt` and runs it on
//! QEMU `virt` with an SMMUv3 in every configuration the board must pass:
//! (a) the default nested SMMU (stage 1 + stage 2), (b) stage 1 only and
//! (c) stage 2 only (the last two need `virt-9.0`: newer machine types force
//! `stage=nested`), entered at EL2 as a hypervisor is, and (d) the nested
//! SMMU entered at EL1 (`-cpu cortex-a57`), as a unikernel or firmware is;
//! all with a GICv3
//! (`gic-version=3`: under TCG `virt` defaults to a GICv2, which the board's
//! SMMU interrupt tests cannot use). Every run has four CPUs (`-smp 4`, for
//! the SMP tests), two
//! edu devices (00:05.0, 00:06.0) and an ivshmem-plain at 00:07.0 whose
//! RAM-backed BAR 2 is the P2P provider of the board's P2P tests, and a
//! modern-only virtio-blk at 00:08.0 (`iommu_platform=on`) over a fresh 1 MiB
//! raw image (`target/virtio-blk.img`, rewritten before each run).

use std::path::Path;
use std::process::Command;

use crate::runner::{self, Run};

const BOARD: &str = "qemu-virt";

/// One QEMU run.
struct Config {
    name: &'static str,
    machine: &'static [&'static str],
}

const CONFIGS: [Config; 4] = [
    Config {
        name: "(a) nested SMMUv3 (virt)",
        machine: &[
            "-machine",
            "virt,iommu=smmuv3,virtualization=on,gic-version=3",
            "-cpu",
            "max",
        ],
    },
    Config {
        name: "(b) stage-1-only SMMUv3 (virt-9.0)",
        machine: &[
            "-machine",
            "virt-9.0,iommu=smmuv3,virtualization=on,gic-version=3",
            "-cpu",
            "max",
            "-global",
            "arm-smmuv3.stage=1",
        ],
    },
    Config {
        name: "(c) stage-2-only SMMUv3 (virt-9.0)",
        machine: &[
            "-machine",
            "virt-9.0,iommu=smmuv3,virtualization=on,gic-version=3",
            "-cpu",
            "max",
            "-global",
            "arm-smmuv3.stage=2",
        ],
    },
    Config {
        name: "(d) nested SMMUv3, entered at EL1 (unikernel / firmware view)",
        machine: &[
            "-machine",
            "virt,iommu=smmuv3,gic-version=3",
            "-cpu",
            "cortex-a57",
        ],
    },
];

/// Arguments every run gets; `-semihosting` is what lets the board's exit
/// status reach us (without it a failing board could exit 0).
const COMMON: &[&str] = &[
    // Four CPUs: the SMP tests start the three secondaries through PSCI;
    // every other test runs on the boot CPU alone while they stay off.
    "-smp",
    "4",
    "-nographic",
    "-semihosting",
    "-icount",
    "shift=10,sleep=off",
    "-nic",
    "none",
    "-m",
    "512M",
    "-device",
    "edu,addr=05.0,dma_mask=0xffffffffffffffff",
    "-device",
    "edu,addr=06.0,dma_mask=0xffffffffffffffff",
    // A third edu behind a PCIe root port: bus 1, requester ID / StreamID 0x100.
    "-device",
    "pcie-root-port,id=rp1,chassis=1,addr=09.0",
    "-device",
    "edu,bus=rp1,addr=00.0,dma_mask=0xffffffffffffffff",
    // The P2P provider: RAM-backed BAR 2 (1 MiB) at a pinned slot.
    "-object",
    "memory-backend-ram,id=p2pmem,size=1M",
    "-device",
    "ivshmem-plain,memdev=p2pmem,addr=07.0",
];

/// Slot of the virtio-blk (after edu 05.0, 06.0 and ivshmem 07.0).
const VIRTIO_SLOT: &str = "08.0";

/// Builds the board and runs every configuration (only (a), with the
/// narrating image, when `demo`); returns (passed, failed) summed over runs.
pub fn run(extra: &[String], demo: bool) -> Result<(usize, usize), String> {
    let image = runner::build(BOARD, "aarch64-unknown-none", "board-qemu-virt", demo)?;
    let configs = if demo { &CONFIGS[..1] } else { &CONFIGS[..] };
    let (mut passed, mut failed) = (0, 0);
    for config in configs {
        println!("xtask: virt-smmuv3 configuration {}", config.name);
        let run = run_qemu(config, &image, extra)?;
        let (p, f) = run.verdict(config.name);
        println!("xtask: configuration {}: {p} PASS, {f} FAIL", config.name);
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

fn run_qemu(config: &Config, image: &Path, extra: &[String]) -> Result<Run, String> {
    // The tests write to the disk: every run starts from the pristine image.
    let disk = crate::disk::create(&runner::board_dir(BOARD))?;
    let mut cmd = Command::new("qemu-system-aarch64");
    cmd.args(config.machine)
        .args(COMMON)
        .args(crate::disk::qemu_args(&disk, VIRTIO_SLOT))
        .arg("-kernel")
        .arg(image)
        .args(extra);
    runner::run_qemu(cmd)
}

#[cfg(test)]
mod tests {
    use crate::runner::parse_summary;

    #[test]
    fn summary_line_is_parsed_exactly() {
        assert_eq!(parse_summary("3 passed, 0 failed"), Some((3, 0)));
        assert_eq!(parse_summary("12 passed, 4 failed"), Some((12, 4)));
        assert_eq!(parse_summary("PASS 3 passed, 0 failed"), None);
        assert_eq!(parse_summary("3 passed, 0 failed!"), None);
        assert_eq!(parse_summary("3 passed"), None);
    }
}
