//! What the board runners (`virt.rs`, `q35.rs`) share: building a board
//! image, running one QEMU command line bounded by [`TIMEOUT`] while echoing
//! what the board prints, and judging the run by its PASS/FAIL lines, its
//! closing `N passed, M failed` line and QEMU's exit status.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one QEMU run may take before it is killed and counted as failed
/// (a run takes a few seconds at most).
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// `boards/<board>` in the repository.
pub fn board_dir(board: &str) -> PathBuf {
    crate::root().join("boards").join(board)
}

/// `cargo build --release [--features demo]` in `boards/<board>`, with the
/// cargo that runs the xtask; returns the path of the image `bin` built for
/// `target`.
pub fn build(board: &str, target: &str, bin: &str, demo: bool) -> Result<PathBuf, String> {
    let dir = board_dir(board);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&dir).args(["build", "--release"]);
    if demo {
        cmd.args(["--features", "demo"]);
    }
    eprintln!("xtask: running {cmd:?} in {}", dir.display());
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo for boards/{board}: {e}"))?;
    if !status.success() {
        return Err(format!("building boards/{board} failed ({status})"));
    }
    let image = dir.join("target").join(target).join("release").join(bin);
    if !image.is_file() {
        return Err(format!(
            "build succeeded but board image {} is missing",
            image.display()
        ));
    }
    Ok(image)
}

/// What one QEMU run printed and how it ended.
pub struct Run {
    /// The board's output lines, without line ends.
    lines: Vec<String>,
    /// `None` when the run was killed at the timeout.
    status: Option<ExitStatus>,
}

/// Runs `cmd` (a QEMU command line), echoing its output as it comes and
/// killing it after [`TIMEOUT`].
pub fn run_qemu(mut cmd: Command) -> Result<Run, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| format!("{program} has no stdout pipe"))?;
    // Echo and keep the board's output while it runs; it ends when QEMU does.
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_string();
            println!("{line}");
            lines.push(line);
        }
        lines
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
                return Err(format!("waiting for {program}: {e}"));
            }
        }
    };
    let lines = reader
        .join()
        .map_err(|_| "the thread reading QEMU's output panicked".to_string())?;
    Ok(Run { lines, status })
}

/// `N passed, M failed` → (N, M), exactly (surrounding white space aside).
pub fn parse_summary(line: &str) -> Option<(usize, usize)> {
    let (p, f) = line.trim().split_once(" passed, ")?;
    let f = f.strip_suffix(" failed")?;
    Some((p.parse().ok()?, f.parse().ok()?))
}

impl Run {
    /// (passed, failed) of the run named `name`: its PASS and FAIL lines,
    /// plus one failure for each way the run itself went wrong (killed at the
    /// timeout, last line not the summary, a summary that disagrees with the
    /// lines, an exit status that disagrees with them).
    pub fn verdict(&self, name: &str) -> (usize, usize) {
        let pass = self.lines.iter().filter(|l| l.starts_with("PASS ")).count();
        let fail = self.lines.iter().filter(|l| l.starts_with("FAIL ")).count();
        let mut problems = Vec::new();
        match self.status {
            None => problems.push(format!("killed after {} s", TIMEOUT.as_secs())),
            Some(status) => {
                let last = self.lines.iter().rev().find(|l| !l.trim().is_empty());
                match last.and_then(|l| parse_summary(l)) {
                    None => problems.push(format!(
                        "no closing `N passed, M failed` line (QEMU {status})"
                    )),
                    Some((sp, sf)) => {
                        if (sp, sf) != (pass, fail) {
                            problems.push(format!(
                                "summary says {sp} passed, {sf} failed but the board printed {pass} PASS and {fail} FAIL lines"
                            ));
                        }
                        let all_passed = fail == 0 && pass > 0 && problems.is_empty();
                        if status.success() != all_passed {
                            problems.push(format!(
                                "QEMU {status} disagrees with {pass} passed, {fail} failed"
                            ));
                        }
                    }
                }
            }
        }
        for p in &problems {
            println!("xtask: FAIL {name}: {p}");
        }
        (pass, fail + problems.len())
    }
}
