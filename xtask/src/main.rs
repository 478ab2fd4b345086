//! Project automation: `cargo xtask test | stress | loom | demo | board NAME [-- QEMU ARGS] | bench [--instructions]`.

mod apt;
mod bench;
mod disk;
mod q35;
mod qemu;
mod runner;
mod toolchain;
mod virt;

use std::process::{Command, ExitCode};

/// Outcome of one step of `cargo xtask test`.
struct Tally {
    passed: usize,
    failed: usize,
}

impl Tally {
    fn step(&mut self, name: &str, ok: bool) {
        if ok {
            self.passed += 1;
            println!("xtask: PASS {name}");
        } else {
            self.failed += 1;
            println!("xtask: FAIL {name}");
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The repository root (the parent of this crate's manifest directory).
pub fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> bool {
    eprintln!("xtask: running {cmd:?}");
    matches!(cmd.status(), Ok(s) if s.success())
}

/// Runs one board by name; returns (passed, failed) of its test lines.
fn board(name: &str, extra: &[String], demo: bool) -> Result<(usize, usize), String> {
    qemu::ensure_installed()?;
    match name {
        "virt-smmuv3" => virt::run(extra, demo),
        "q35-vtd" => q35::run(extra, demo),
        other => Err(format!(
            "unknown board `{other}`; known boards: virt-smmuv3, q35-vtd"
        )),
    }
}

fn test(extra: &[String]) -> ExitCode {
    let mut t = Tally {
        passed: 0,
        failed: 0,
    };
    t.step("fmt", run(cargo().args(["fmt", "--all", "--check"])));
    t.step(
        "clippy",
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])),
    );
    t.step(
        "clippy (defmt,log,alloc,virtio-drivers,dma-api)",
        run(cargo().args([
            "clippy",
            "--lib",
            "--all-targets",
            "--features",
            "defmt,log,alloc,virtio-drivers,dma-api",
            "--",
            "-D",
            "warnings",
        ])),
    );
    t.step("host tests", run(cargo().args(["test", "--workspace"])));
    t.step(
        "host tests (alloc, adapters)",
        run(cargo().args([
            "test",
            "--lib",
            "--features",
            "alloc,virtio-drivers,dma-api",
        ])),
    );
    t.step("stress (10^6 operations, release)", stress());
    t.step("loom (shared driver models)", loom());
    t.step("shuttle (whole SharedDomain schedules)", shuttle());
    t.step(
        "rustdoc (-D warnings)",
        run(cargo()
            .args([
                "doc",
                "--no-deps",
                "--lib",
                "--features",
                "log,alloc,virtio-drivers,dma-api",
            ])
            .env("RUSTDOCFLAGS", "-D warnings")),
    );
    for target in ["aarch64-unknown-none", "x86_64-unknown-none"] {
        t.step(
            &format!("build {target}"),
            run(cargo().args(["build", "--lib", "--target", target])),
        );
        t.step(
            &format!("build {target} (defmt,log)"),
            run(cargo().args([
                "build",
                "--lib",
                "--target",
                target,
                "--features",
                "defmt,log,virtio-drivers,dma-api",
            ])),
        );
    }
    msrv_builds(&mut t);
    miri(&mut t);
    for dir in ["boards/common", "boards/qemu-virt", "boards/qemu-q35"] {
        t.step(
            &format!("fmt {dir}"),
            run(cargo()
                .current_dir(root().join(dir))
                .args(["fmt", "--check"])),
        );
        t.step(
            &format!("clippy {dir}"),
            run(cargo().current_dir(root().join(dir)).args([
                "clippy",
                "--release",
                "--",
                "-D",
                "warnings",
            ])),
        );
    }
    for b in ["virt-smmuv3", "q35-vtd"] {
        match board(b, extra, false) {
            Ok((p, f)) => {
                println!("xtask: board {b}: {p} passed, {f} failed");
                t.step(&format!("board {b}"), f == 0 && p > 0);
            }
            Err(e) => {
                println!("xtask: board {b}: {e}");
                t.step(&format!("board {b}"), false);
            }
        }
    }
    println!("{} passed, {} failed", t.passed, t.failed);
    if t.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The nightly that runs Miri, pinned so a fresh machine gets the same one.
const MIRI_TOOLCHAIN: &str = "nightly-2026-05-20";

/// Integration tests run under Miri (see [`miri`]).
const MIRI_TESTS: &[&str] = &[
    "pgtable",
    "two_step",
    "misuse",
    "p2p",
    "robustness",
    "errors",
    "debug_output",
    "firmware",
    "firmware_corrupt",
];

/// Runs the library's unit tests and the integration tests of
/// [`MIRI_TESTS`] under Miri (undefined behaviour, out-of-bounds and
/// aliasing checks on every raw table and queue access), with few property
/// cases. The SMMUv3 and VT-d host tests whose fake hardware is a second
/// thread polling shared memory are skipped (under Miri their poll budgets
/// are minutes long).
fn miri(t: &mut Tally) {
    if let Err(e) = toolchain::ensure_toolchain(MIRI_TOOLCHAIN, &["miri", "rust-src"], &[]) {
        println!("xtask: miri: {e}");
        t.step("miri", false);
        return;
    }
    let mut c = Command::new("rustup");
    c.current_dir(root())
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env("PROPTEST_CASES", "4")
        // Leaks are not errors here: dropping a domain deliberately hands its
        // table pages to nobody (the IOMMU may still walk them), and the
        // tests' counting lenders check what must come back.
        .env("MIRIFLAGS", "-Zmiri-disable-isolation -Zmiri-ignore-leaks")
        .args(["run", MIRI_TOOLCHAIN, "cargo", "miri", "test", "--lib"])
        // The integration tests that reach raw table memory through the
        // public API with bounded work. Left to their native runs: the
        // model and strict-model scenarios, the reserved-range drains and
        // the count property tests (each rescans or replays hundreds of
        // tables per step: together over 20 minutes under Miri), and the
        // stress tests (their release runs are a step of their own).
        .args(MIRI_TESTS.iter().flat_map(|t| ["--test", t]))
        .arg("--target-dir")
        .arg(root().join("target").join("miri"))
        .args([
            "--",
            "--skip",
            "host_tests",
            "--skip",
            "ir_tests",
            "--skip",
            "leak_tests",
            // The hand-off tests drive the same threaded fake VT-d unit.
            "--skip",
            "vtd::handoff::tests",
        ]);
    t.step("miri (host tests)", run(&mut c));
}

/// The model-based stress tests (tests/stress.rs, and tests/shared_stress.rs:
/// threads on one shared domain) in a release build, where each runs 10^6
/// operations by default (`STRESS_SEED`, `STRESS_OPS` and
/// `STRESS_KNOWN_DEFECTS` pass through from the environment).
fn stress() -> bool {
    run(cargo().args([
        "test",
        "--release",
        "--test",
        "stress",
        "--test",
        "shared_stress",
        "--",
        "--nocapture",
    ]))
}

/// The shuttle schedule tests of a whole `SharedDomain` (tests/shuttle.rs),
/// in their own target directory (built with `--cfg shuttle`).
fn shuttle() -> bool {
    run(cargo()
        .env("RUSTFLAGS", "--cfg shuttle")
        .args(["test", "--release", "--test", "shuttle", "--target-dir"])
        .arg(root().join("target").join("shuttle")))
}

/// The loom model tests of the shared wrappers (tests/loom.rs), in their
/// own target directory (everything is built with `--cfg loom`).
fn loom() -> bool {
    run(cargo()
        .env("RUSTFLAGS", "--cfg loom")
        .args(["test", "--release", "--test", "loom", "--target-dir"])
        .arg(root().join("target").join("loom")))
}

/// Builds the library with the toolchain its `rust-version` names, for the
/// host and both bare-metal targets, with the locked dependencies.
fn msrv_builds(t: &mut Tally) {
    const TARGETS: [&str; 2] = ["aarch64-unknown-none", "x86_64-unknown-none"];
    let msrv = match toolchain::msrv() {
        Ok(v) => v,
        Err(e) => {
            println!("xtask: msrv: {e}");
            t.step("msrv", false);
            return;
        }
    };
    if let Err(e) = toolchain::ensure_toolchain(&msrv, &[], &TARGETS) {
        println!("xtask: msrv {msrv}: {e}");
        t.step(&format!("msrv {msrv}"), false);
        return;
    }
    let target_dir = root().join("target").join("msrv");
    let build = |target: Option<&str>, features: &str| {
        // `rustup run` puts that toolchain's cargo and rustc first on PATH,
        // whatever toolchain runs the xtask.
        let mut c = Command::new("rustup");
        c.current_dir(root())
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("CARGO")
            .args([
                "run",
                &msrv,
                "cargo",
                "build",
                "--locked",
                "--lib",
                "--features",
                features,
            ])
            .arg("--target-dir")
            .arg(&target_dir);
        if let Some(t) = target {
            c.args(["--target", t]);
        }
        run(&mut c)
    };
    t.step(
        &format!("msrv {msrv} host (defmt,log,alloc)"),
        build(None, "defmt,log,alloc"),
    );
    for target in TARGETS {
        t.step(
            &format!("msrv {msrv} {target} (defmt,log)"),
            build(Some(target), "defmt,log"),
        );
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (head, extra) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (&args[..], Vec::new()),
    };
    if !head.is_empty()
        && let Err(e) = toolchain::ensure_installed()
    {
        eprintln!("xtask: the pinned toolchain is incomplete: {e}");
        return ExitCode::FAILURE;
    }
    match head.first().map(String::as_str) {
        Some("test") => test(&extra),
        Some("stress") => {
            if stress() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("loom") => {
            if loom() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some(step @ ("msrv" | "miri")) => {
            let mut t = Tally {
                passed: 0,
                failed: 0,
            };
            if step == "msrv" {
                msrv_builds(&mut t);
            } else {
                miri(&mut t);
            }
            println!("{} passed, {} failed", t.passed, t.failed);
            if t.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("demo") => match board("virt-smmuv3", &extra, true) {
            Ok((_, 0)) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("xtask demo: {e}");
                ExitCode::FAILURE
            }
        },
        Some("board") => {
            let Some(name) = head.get(1) else {
                eprintln!("usage: cargo xtask board virt-smmuv3|q35-vtd [-- QEMU ARGS]");
                return ExitCode::FAILURE;
            };
            match board(name, &extra, false) {
                Ok((p, f)) => {
                    println!("{p} passed, {f} failed");
                    if f == 0 && p > 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("xtask board {name}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("bench") => {
            if bench::bench(
                head.iter().any(|a| a == "--instructions"),
                head.iter().any(|a| a == "--instructions-only"),
            ) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        _ => {
            eprintln!(
                "usage: cargo xtask test [-- QEMU ARGS] | stress | msrv | miri | demo | board NAME [-- QEMU ARGS] | bench [--instructions | --instructions-only]"
            );
            ExitCode::FAILURE
        }
    }
}
