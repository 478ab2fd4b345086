//! `cargo xtask board q35-vtd [-- QEMU ARGS]`: builds `boards/qemu-q35` and
//! runs it on QEMU `q35` + `intel-iommu` in every configuration the VT-d driver
//! must handle, one QEMU run each.
//!
//! Every run has four CPUs (`-smp 4`, for the SMP tests), two edu devices
//! (00:03.0, 00:04.0), a third behind the PCIe root port at 00:06.0
//! (01:00.0), an ivshmem-plain
//! at 00:05.0 (P2P provider) and a modern-only virtio-blk at 00:08.0
//! (`iommu_platform=on`) over a fresh 1 MiB raw image
//! (`target/virtio-blk.img`, rewritten before each run).
//!
//! The board learns the configuration from its command line (`-append`):
//! `cm` (caching mode on), `noqi` (leave queued invalidation off), `aw=39`
//! (3-level tables), `sm` (scalable mode), `fl` (first-level tables),
//! `x2apic` (local APIC in x2APIC mode, interrupt remapping with EIM). An `-append WORDS` among the extra arguments is added to
//! each configuration's words instead of replacing them (e.g. `-append
//! only=edu` runs only the tests whose name contains `edu`).

use std::path::Path;
use std::process::Command;

use crate::runner;

/// qboot boots in about half SeaBIOS's time and leaves BARs to the board.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
const BOARD: &str = "qemu-q35";

/// One QEMU configuration.
struct Config {
    name: &'static str,
    /// The `-device intel-iommu,...` argument.
    iommu: &'static str,
    /// Words for the board's command line.
    append: &'static str,
    /// More QEMU arguments for this configuration.
    args: &'static [&'static str],
}

const CONFIGS: [Config; 7] = [
    Config {
        name: "intel-iommu, caching-mode off",
        iommu: "intel-iommu,intremap=on",
        append: "",
        args: &[],
    },
    Config {
        name: "intel-iommu, caching-mode=on",
        iommu: "intel-iommu,intremap=on,caching-mode=on",
        append: "cm",
        args: &[],
    },
    Config {
        name: "intel-iommu, no queued invalidation (register-based)",
        iommu: "intel-iommu,intremap=on",
        append: "noqi",
        args: &[],
    },
    Config {
        name: "intel-iommu, aw-bits=39 (3-level tables)",
        iommu: "intel-iommu,intremap=on,aw-bits=39",
        append: "aw=39",
        args: &[],
    },
    Config {
        name: "intel-iommu, scalable mode (PASID tables, second level)",
        iommu: "intel-iommu,intremap=on,x-scalable-mode=on",
        append: "sm",
        args: &[],
    },
    Config {
        name: "intel-iommu, scalable mode with first-level tables",
        iommu: "intel-iommu,intremap=on,x-scalable-mode=on,x-flts=on",
        append: "sm fl",
        args: &[],
    },
    Config {
        name: "intel-iommu, x2APIC interrupt remapping (eim=on)",
        iommu: "intel-iommu,intremap=on,eim=on",
        append: "x2apic",
        // TCG emulates x2APIC; qemu64 does not advertise it by default.
        args: &["-cpu", "qemu64,+x2apic"],
    },
];

/// Splits `-append WORDS` out of the user's extra arguments.
fn split_append(extra: &[String]) -> (Vec<String>, String) {
    let mut rest = Vec::new();
    let mut words = Vec::new();
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        if a == "-append" {
            if let Some(v) = it.next() {
                words.push(v.clone());
            }
        } else {
            rest.push(a.clone());
        }
    }
    (rest, words.join(" "))
}

/// Slot of the virtio-blk (after edu 03.0, 04.0 and ivshmem 05.0).
const VIRTIO_SLOT: &str = "08.0";

/// The QEMU command line for one configuration; `disk` is the raw image
/// behind the virtio-blk.
fn qemu_command(cfg: &Config, image: &Path, disk: &Path, extra: &[String], words: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    if Path::new(QBOOT).is_file() {
        cmd.args(["-bios", QBOOT]);
    }
    cmd.args(["-machine", "q35,kernel-irqchip=split", "-device", cfg.iommu])
        .args(["-nographic", "-nic", "none", "-m", "512M"])
        // Four CPUs: the SMP tests start the three APs (INIT-SIPI-SIPI);
        // every other test runs on the boot CPU while they wait for a SIPI.
        .args(["-smp", "4"])
        .args(["-icount", "shift=10,sleep=off"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        // Pinned slots: RIDs 0x18 and 0x20; full DMA mask so IOVAs may use
        // every address bit the IOMMU offers.
        .args(["-device", "edu,addr=03.0,dma_mask=0xffffffffffffffff"])
        .args(["-device", "edu,addr=04.0,dma_mask=0xffffffffffffffff"])
        // The P2P provider: RAM-backed BAR 2 (1 MiB) at a pinned slot.
        .args(["-object", "memory-backend-ram,id=p2pmem,size=1M"])
        .args(["-device", "ivshmem-plain,memdev=p2pmem,addr=05.0"])
        // A third edu behind a PCIe root port: bus 1, requester ID 0x100.
        .args(["-device", "pcie-root-port,id=rp1,chassis=1,addr=06.0"])
        .args([
            "-device",
            "edu,bus=rp1,addr=00.0,dma_mask=0xffffffffffffffff",
        ])
        // A modern-only virtio-blk whose DMA goes through the IOMMU.
        .args(crate::disk::qemu_args(disk, VIRTIO_SLOT))
        .args(cfg.args)
        .arg("-kernel")
        .arg(image);
    let append = [cfg.append, words]
        .iter()
        .filter(|w| !w.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if !append.is_empty() {
        cmd.args(["-append", &append]);
    }
    cmd.args(extra);
    cmd
}

/// Builds the board and runs every configuration; returns (passed, failed)
/// summed over them.
pub fn run(extra: &[String], demo: bool) -> Result<(usize, usize), String> {
    let image = runner::build(BOARD, "x86_64-unknown-none", "board-qemu-q35", demo)?;
    let (extra, words) = split_append(extra);
    let (mut passed, mut failed) = (0, 0);
    for (i, cfg) in CONFIGS.iter().enumerate() {
        println!("== q35-vtd {}/{}: {}", i + 1, CONFIGS.len(), cfg.name);
        // The tests write to the disk: every run starts from the pristine image.
        let disk = crate::disk::create(&runner::board_dir(BOARD))?;
        let out = runner::run_qemu(qemu_command(cfg, &image, &disk, &extra, &words))?;
        let (p, f) = out.verdict(cfg.name);
        println!("== q35-vtd {}: {p} passed, {f} failed", cfg.name);
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::parse_summary;

    #[test]
    fn summary_line_parses() {
        assert_eq!(parse_summary("12 passed, 0 failed"), Some((12, 0)));
        assert_eq!(parse_summary("3 passed, 1 failed\r"), Some((3, 1)));
        assert_eq!(parse_summary("PASS x"), None);
        assert_eq!(parse_summary("3 passed, 1 failed, 2 skipped"), None);
    }

    #[test]
    fn extra_append_words_are_split_out() {
        let extra: Vec<String> = ["-d", "int", "-append", "only=edu", "-s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (rest, words) = split_append(&extra);
        assert_eq!(rest, ["-d", "int", "-s"]);
        assert_eq!(words, "only=edu");
    }
}
