//! `cargo xtask bench [--instructions]`: the timed benchmarks
//! (`cargo bench --bench link`), and with `--instructions` also the
//! instructions per page of the main cases, counted by callgrind on the
//! bench binary in profile mode (`BENCH_PROFILE`), only inside the bench's
//! `profiled_work` (set-up and teardown are not counted).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;

use crate::{cargo, run};

/// The cases counted, and whether each makes new tables (then ours is also
/// counted with the zeroing lender).
const CASES: [(&str, bool); 8] = [
    ("link4k-32768-seq", true),
    ("link4k-32768-scat", true),
    ("unlink4k-32768-seq", false),
    ("unlink4k-32768-scat", false),
    ("linksg-32768", true),
    ("linkrun-32768", true),
    ("link1g", true),
    ("unlink1g", false),
];

/// The formats counted and their peers (stage 2 has the same peer as
/// stage 1 and is left out to keep the run short).
const FORMATS: [(&str, &[&str]); 2] = [
    ("s1", &["aarch64-paging", "page_table_multiarch"]),
    ("vtd", &["x86_64", "page_table_multiarch"]),
];

/// Runs the benches (unless `only_instructions`); with `instructions`,
/// then the callgrind counts.
pub fn bench(instructions: bool, only_instructions: bool) -> bool {
    if !only_instructions && !run(cargo().args(["bench", "--bench", "link"])) {
        return false;
    }
    if !instructions && !only_instructions {
        return true;
    }
    match count_all() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("xtask bench --instructions: {e}");
            false
        }
    }
}

/// The bench executable cargo built (`--no-run`, JSON messages).
fn bench_binary() -> Result<String, String> {
    let out = cargo()
        .args([
            "bench",
            "--bench",
            "link",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .map_err(|e| format!("cargo bench --no-run: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("\"name\":\"link\""))
        .find_map(|l| {
            let at = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let rest = &l[at..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .ok_or_else(|| "no executable for bench `link` in cargo's output".into())
}

/// Instructions per page (per GiB for the 1 GiB cases) of one contender.
fn count(bin: &str, case: &str, who: &str) -> Result<f64, String> {
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--toggle-collect=*profiled_work*",
            bin,
        ])
        .env("BENCH_PROFILE", format!("{case}/{who}"))
        .env("BENCH_ITERS", "1")
        .output()
        .map_err(|e| format!("valgrind (apt-get install valgrind): {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let collected: f64 = err
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("{case}/{who}: no callgrind count\n{err}"))?;
    let field = |name: &str| -> Option<f64> {
        stdout
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|n| n.parse().ok())
    };
    let pages = field("pages=").ok_or_else(|| format!("{case}/{who}: no pages"))?;
    let iters = field("iters=").ok_or_else(|| format!("{case}/{who}: no iters"))?;
    let per = if case.ends_with("1g") {
        iters
    } else {
        pages * iters
    };
    Ok(collected / per)
}

fn count_all() -> Result<(), String> {
    let bin = bench_binary()?;
    let mut jobs = Vec::new();
    for (case, makes_tables) in CASES {
        for (fmt, peers) in FORMATS {
            let mut whos = vec!["ours".to_string()];
            if makes_tables {
                whos.push("ours+zero".into());
            }
            // Ours keeping emptied tables (`TableReclaim::Keep`; the link
            // cases into tables kept from an earlier link and unlink).
            whos.push("ours+keep".into());
            // The walker alone (`IoPageTable`), the floor of the two-step API.
            whos.push("walker".into());
            // One CPU through `SharedDomain` (what the concurrency costs).
            if fmt == "s1" {
                whos.push("shared".into());
            }
            whos.extend(peers.iter().map(|p| p.to_string()));
            for who in whos {
                jobs.push((case, format!("{fmt}/{who}")));
            }
        }
    }
    let results: Mutex<Counts> = Mutex::new(BTreeMap::new());
    let next = Mutex::new(0usize);
    // Two at a time: instruction counts do not depend on the load.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().unwrap();
                        *n += 1;
                        *n - 1
                    };
                    let Some((case, who)) = jobs.get(i) else {
                        break;
                    };
                    let r = count(&bin, case, who);
                    results
                        .lock()
                        .unwrap()
                        .insert((case.to_string(), who.clone()), r);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let mut failed = false;
    println!();
    for (case, _) in CASES {
        let unit = if case.ends_with("1g") {
            "instr/GiB"
        } else {
            "instr/page"
        };
        for (fmt, peers) in FORMATS {
            let note = match (case, fmt) {
                ("linksg-32768", _) => " (ours: one link_pages call; peers: one map call per page)",
                ("linkrun-32768", "vtd") => " (x86_64: one map_to call per page, no range call)",
                _ => "",
            };
            let mut line = format!("bench: {case}/{fmt}");
            let names = ["ours", "ours+zero", "ours+keep", "walker", "shared"]
                .iter()
                .chain(peers.iter());
            for name in names {
                let Some(r) = results.get(&(case.to_string(), format!("{fmt}/{name}"))) else {
                    continue;
                };
                match r {
                    Ok(v) => line.push_str(&format!(" {name}={v:.0} {unit}")),
                    Err(e) => {
                        failed = true;
                        eprintln!("{e}");
                        line.push_str(&format!(" {name}=FAILED"));
                    }
                }
            }
            println!("{line}{note}");
        }
    }
    let path = "target/bench-instructions.md";
    match std::fs::write(path, instruction_table(&results)) {
        Ok(()) => println!("bench: README instruction table written to {path}"),
        Err(e) => eprintln!("bench: cannot write {path}: {e}"),
    }
    if failed {
        Err("some counts failed".into())
    } else {
        Ok(())
    }
}

type Counts = BTreeMap<(String, String), Result<f64, String>>;

/// The README's instruction table (markdown): instructions per page (per
/// GiB for the 1 GiB rows), one column per contender.
fn instruction_table(results: &Counts) -> String {
    const COLS: [(&str, &str); 13] = [
        ("S1 ours", "s1/ours"),
        ("S1 ours+zero", "s1/ours+zero"),
        ("S1 ours+keep", "s1/ours+keep"),
        ("S1 walker", "s1/walker"),
        ("S1 `SharedDomain`", "s1/shared"),
        ("`aarch64-paging`", "s1/aarch64-paging"),
        ("`ptm` S1", "s1/page_table_multiarch"),
        ("VT-d ours", "vtd/ours"),
        ("VT-d ours+zero", "vtd/ours+zero"),
        ("VT-d ours+keep", "vtd/ours+keep"),
        ("VT-d walker", "vtd/walker"),
        ("`x86_64`", "vtd/x86_64"),
        ("`ptm` x86", "vtd/page_table_multiarch"),
    ];
    fn label(case: &str) -> &str {
        match case {
            "link4k-32768-seq" => "link seq, one call each",
            "link4k-32768-scat" => "link scat, one call each",
            "unlink4k-32768-seq" => "unlink seq, one call each",
            "unlink4k-32768-scat" => "unlink scat, one call each",
            "linksg-32768" => "link as one scatter list ¹",
            "linkrun-32768" => "link contiguous run, one call",
            "link1g" => "link 1 GiB block (per GiB)",
            "unlink1g" => "unlink 1 GiB block (per GiB)",
            other => other,
        }
    }
    let mut t = String::from("| case |");
    for (title, _) in COLS {
        t.push_str(&format!(" {title} |"));
    }
    t.push_str("\n|---|");
    t.push_str(&"---|".repeat(COLS.len()));
    t.push('\n');
    for (case, _) in CASES {
        t.push_str(&format!("| {} |", label(case)));
        for (_, who) in COLS {
            let v = match results.get(&(case.to_string(), who.to_string())) {
                Some(Ok(v)) => {
                    let peer = !["ours", "walker", "shared"].iter().any(|w| who.contains(w));
                    let mark = match case {
                        "linksg-32768" if peer => " ¹",
                        "linkrun-32768" if who == "vtd/x86_64" => " ²",
                        _ => "",
                    };
                    format!("{v:.0}{mark}")
                }
                Some(Err(_)) => "failed".into(),
                None => String::new(),
            };
            t.push_str(&format!(" {v} |"));
        }
        t.push('\n');
    }
    t
}
