//! `cargo xtask board virt-smmuv3`: builds `boards/qemu-virt` and runs it on
//! QEMU `virt` with an SMMUv3 in every configuration the board must pass:
//! (a) the default nested SMMU (stage 1 + stage 2), (b) stage 1 only and
//! (c) stage 2 only (the last two need `virt-9.0`: newer machine types force
//! `stage=nested`), entered at EL2 as a hypervisor is, and (d) the nested
//! SMMU entered at EL1 (`-cpu cortex-a57`), as a unikernel or firmware is;
//! all with a GICv3
//! (`gic-version=3`: under TCG `virt` defaults to a GICv2, which the board's
//! SMMU interrupt tests cannot use). Every run has two
//! edu devices (00:05.0, 00:06.0) and an ivshmem-plain at 00:07.0 whose
//! RAM-backed BAR 2 is the P2P provider of the board's P2P tests, and a
//! modern-only virtio-blk at 00:08.0 (`iommu_platform=on`) over a fresh 1 MiB
//! raw image (`target/virtio-blk.img`, rewritten before each run).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one QEMU run may take before it is killed and counted as failed
/// (a run takes well under a second).
const TIMEOUT: Duration = Duration::from_secs(60);

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
    let image = build(demo)?;
    let configs = if demo { &CONFIGS[..1] } else { &CONFIGS[..] };
    let (mut passed, mut failed) = (0, 0);
    for config in configs {
        println!("xtask: virt-smmuv3 configuration {}", config.name);
        let run = run_qemu(config, &image, extra)?;
        let (p, f) = run.verdict(config.name);
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

fn board_dir() -> PathBuf {
    crate::root().join("boards").join("qemu-virt")
}

/// `cargo build --release [--features demo]` in the board directory, with
/// the cargo that runs the xtask; returns the image path.
fn build(demo: bool) -> Result<PathBuf, String> {
    let dir = board_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&dir).args(["build", "--release"]);
    if demo {
        cmd.args(["--features", "demo"]);
    }
    eprintln!("xtask: running {cmd:?} in {}", dir.display());
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo for boards/qemu-virt: {e}"))?;
    if !status.success() {
        return Err(format!("building boards/qemu-virt failed ({status})"));
    }
    let image = dir
        .join("target")
        .join("aarch64-unknown-none")
        .join("release")
        .join("board-qemu-virt");
    if !image.is_file() {
        return Err(format!("board image {} is missing", image.display()));
    }
    Ok(image)
}

/// What one QEMU run printed and how it ended.
struct Run {
    passes: usize,
    fails: usize,
    /// The board's closing `N passed, M failed` line, if it printed one.
    summary: Option<(usize, usize)>,
    /// `None` when the run was killed at the timeout.
    status: Option<ExitStatus>,
}

fn run_qemu(config: &Config, image: &Path, extra: &[String]) -> Result<Run, String> {
    // The tests write to the disk: every run starts from the pristine image.
    let disk = crate::disk::create(&board_dir())?;
    let mut cmd = Command::new("qemu-system-aarch64");
    cmd.args(config.machine)
        .args(COMMON)
        .args(crate::disk::qemu_args(&disk, VIRTIO_SLOT))
        .arg("-kernel")
        .arg(image)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-aarch64: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or("qemu-system-aarch64 has no stdout pipe")?;
    // Echo and parse the board's output while it runs; it ends when QEMU does.
    let reader = thread::spawn(move || {
        let mut run = Run {
            passes: 0,
            fails: 0,
            summary: None,
            status: None,
        };
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r');
            println!("{line}");
            if line.starts_with("PASS ") {
                run.passes += 1;
            } else if line.starts_with("FAIL ") {
                run.fails += 1;
            } else if let Some(s) = parse_summary(line) {
                run.summary = Some(s);
            }
        }
        run
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for qemu-system-aarch64: {e}"));
            }
        }
    };
    let mut run = reader
        .join()
        .map_err(|_| "the thread reading QEMU's output panicked".to_string())?;
    run.status = status;
    Ok(run)
}

/// `N passed, M failed`, exactly.
fn parse_summary(line: &str) -> Option<(usize, usize)> {
    let (p, f) = line.split_once(" passed, ")?;
    let f = f.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

impl Run {
    /// (passed, failed) of the run: its PASS and FAIL lines, plus one failure
    /// for each way the run itself went wrong (timeout, no summary, a summary
    /// that disagrees with the lines, an exit status that disagrees with it).
    fn verdict(&self, name: &str) -> (usize, usize) {
        let mut problems = Vec::new();
        match self.status {
            None => problems.push(format!("killed after {} s", TIMEOUT.as_secs())),
            Some(status) => match self.summary {
                None => problems.push(format!("no summary line (QEMU {status})")),
                Some((p, f)) => {
                    if (p, f) != (self.passes, self.fails) {
                        problems.push(format!(
                            "summary says {p} passed, {f} failed but the board printed {} PASS and {} FAIL lines",
                            self.passes, self.fails
                        ));
                    }
                    let all_passed = f == 0 && p > 0;
                    if status.success() != all_passed {
                        problems.push(format!("QEMU {status} disagrees with the summary"));
                    }
                }
            },
        }
        for p in &problems {
            println!("xtask: FAIL {name}: {p}");
        }
        let failed = self.fails + problems.len();
        println!(
            "xtask: configuration {name}: {} PASS, {failed} FAIL",
            self.passes
        );
        (self.passes, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_summary;

    #[test]
    fn summary_line_is_parsed_exactly() {
        assert_eq!(parse_summary("3 passed, 0 failed"), Some((3, 0)));
        assert_eq!(parse_summary("12 passed, 4 failed"), Some((12, 4)));
        assert_eq!(parse_summary("PASS 3 passed, 0 failed"), None);
        assert_eq!(parse_summary("3 passed, 0 failed!"), None);
        assert_eq!(parse_summary("3 passed"), None);
    }
}
