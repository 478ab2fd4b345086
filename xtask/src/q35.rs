//! `cargo xtask board q35-vtd [-- QEMU ARGS]`: builds `boards/qemu-q35` and
//! runs it on QEMU `q35` + `intel-iommu` in every configuration the VT-d driver
//! must handle, one QEMU run each.
//!
//! Every run also has two edu devices (00:03.0, 00:04.0), an ivshmem-plain
//! at 00:05.0 (P2P provider) and a modern-only virtio-blk at 00:08.0
//! (`iommu_platform=on`) over a fresh 1 MiB raw image
//! (`target/virtio-blk.img`, rewritten before each run).
//!
//! The board learns the configuration from its command line (`-append`):
//! `cm` (caching mode on), `noqi` (leave queued invalidation off), `aw=39`
//! (3-level tables), `sm` (scalable mode), `fl` (first-level tables). An `-append WORDS` among the extra arguments is added to
//! each configuration's words instead of replacing them (e.g. `-append
//! only=edu` runs only the tests whose name contains `edu`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Longest a QEMU run may take before it is killed and counted as a failure.
const TIMEOUT: Duration = Duration::from_secs(60);
/// qboot boots in about half SeaBIOS's time and leaves BARs to the board.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";
const BOARD_DIR: &str = "boards/qemu-q35";
const IMAGE: &str = "target/x86_64-unknown-none/release/board-qemu-q35";

/// One QEMU configuration.
struct Config {
    name: &'static str,
    /// The `-device intel-iommu,...` argument.
    iommu: &'static str,
    /// Words for the board's command line.
    append: &'static str,
}

const CONFIGS: [Config; 6] = [
    Config {
        name: "intel-iommu, caching-mode off",
        iommu: "intel-iommu,intremap=on",
        append: "",
    },
    Config {
        name: "intel-iommu, caching-mode=on",
        iommu: "intel-iommu,intremap=on,caching-mode=on",
        append: "cm",
    },
    Config {
        name: "intel-iommu, no queued invalidation (register-based)",
        iommu: "intel-iommu,intremap=on",
        append: "noqi",
    },
    Config {
        name: "intel-iommu, aw-bits=39 (3-level tables)",
        iommu: "intel-iommu,intremap=on,aw-bits=39",
        append: "aw=39",
    },
    Config {
        name: "intel-iommu, scalable mode (PASID tables, second level)",
        iommu: "intel-iommu,intremap=on,x-scalable-mode=on",
        append: "sm",
    },
    Config {
        name: "intel-iommu, scalable mode with first-level tables",
        iommu: "intel-iommu,intremap=on,x-scalable-mode=on,x-flts=on",
        append: "sm fl",
    },
];

/// Builds the board image (with feature `demo` if asked); returns its path.
fn build(demo: bool) -> Result<PathBuf, String> {
    let dir = crate::root().join(BOARD_DIR);
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&dir).args(["build", "--release"]);
    if demo {
        cmd.args(["--features", "demo"]);
    }
    eprintln!("xtask: running {cmd:?} in {}", dir.display());
    let status = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building {BOARD_DIR} failed ({status})"));
    }
    let image = dir.join(IMAGE);
    if !image.is_file() {
        return Err(format!(
            "build succeeded but {} is missing",
            image.display()
        ));
    }
    Ok(image)
}

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
fn qemu_command(
    cfg: &Config,
    image: &std::path::Path,
    disk: &std::path::Path,
    extra: &[String],
    words: &str,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    if std::path::Path::new(QBOOT).is_file() {
        cmd.args(["-bios", QBOOT]);
    }
    cmd.args(["-machine", "q35,kernel-irqchip=split", "-device", cfg.iommu])
        .args(["-nographic", "-nic", "none", "-m", "512M"])
        .args(["-icount", "shift=10,sleep=off"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        // Pinned slots: RIDs 0x18 and 0x20; full DMA mask so IOVAs may use
        // every address bit the IOMMU offers.
        .args(["-device", "edu,addr=03.0,dma_mask=0xffffffffffffffff"])
        .args(["-device", "edu,addr=04.0,dma_mask=0xffffffffffffffff"])
        // The P2P provider: RAM-backed BAR 2 (1 MiB) at a pinned slot.
        .args(["-object", "memory-backend-ram,id=p2pmem,size=1M"])
        .args(["-device", "ivshmem-plain,memdev=p2pmem,addr=05.0"])
        // A modern-only virtio-blk whose DMA goes through the IOMMU.
        .args(crate::disk::qemu_args(disk, VIRTIO_SLOT))
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
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// Output and end of one QEMU run.
struct RunOutput {
    lines: Vec<String>,
    /// `None` when the run was killed at the timeout.
    status: Option<ExitStatus>,
}

/// Runs QEMU, echoing its output, killing it after [`TIMEOUT`].
fn run_qemu(mut cmd: Command) -> Result<RunOutput, String> {
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for QEMU: {e}"));
            }
        }
    };
    let _ = reader.join();
    Ok(RunOutput {
        lines: rx.try_iter().collect(),
        status,
    })
}

/// `N passed, M failed` → (N, M).
fn parse_summary(line: &str) -> Option<(usize, usize)> {
    let (p, f) = line.trim().split_once(" passed, ")?;
    let f = f.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

/// Judges one run: (passed, failed), with failures added for a timeout, a
/// missing or inconsistent summary, or an exit status that disagrees.
fn judge(out: &RunOutput) -> (usize, usize) {
    let pass = out.lines.iter().filter(|l| l.starts_with("PASS ")).count();
    let mut fail = out.lines.iter().filter(|l| l.starts_with("FAIL ")).count();
    let Some(status) = out.status else {
        println!("FAIL qemu: killed after {} s", TIMEOUT.as_secs());
        return (pass, fail + 1);
    };
    let last = out.lines.iter().rev().find(|l| !l.trim().is_empty());
    let Some((sp, sf)) = last.and_then(|l| parse_summary(l)) else {
        println!("FAIL qemu: no closing `N passed, M failed` line (exit {status})");
        return (pass, fail + 1);
    };
    if (sp, sf) != (pass, fail) {
        println!("FAIL qemu: summary says {sp} passed, {sf} failed; lines say {pass}, {fail}");
        fail += 1;
    }
    let all_passed = fail == 0 && pass > 0;
    if status.success() != all_passed {
        println!("FAIL qemu: exit {status} disagrees with {pass} passed, {fail} failed");
        fail += 1;
    }
    (pass, fail)
}

/// Builds the board and runs every configuration; returns (passed, failed)
/// summed over them.
pub fn run(extra: &[String], demo: bool) -> Result<(usize, usize), String> {
    let image = build(demo)?;
    let (extra, words) = split_append(extra);
    let (mut passed, mut failed) = (0, 0);
    for (i, cfg) in CONFIGS.iter().enumerate() {
        println!("== q35-vtd {}/{}: {}", i + 1, CONFIGS.len(), cfg.name);
        // The tests write to the disk: every run starts from the pristine image.
        let disk = crate::disk::create(&crate::root().join(BOARD_DIR))?;
        let out = run_qemu(qemu_command(cfg, &image, &disk, &extra, &words))?;
        let (p, f) = judge(&out);
        println!("== q35-vtd {}: {p} passed, {f} failed", cfg.name);
        passed += p;
        failed += f;
    }
    Ok((passed, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

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
