//! Making sure the toolchain pinned in `rust-toolchain.toml` has its
//! components and bare-metal targets.
//!
//! rustup installs a toolchain file's components and targets only when it
//! installs the toolchain itself: a toolchain that is already present (or an
//! install with auto-install switched off) leaves `aarch64-unknown-none` and
//! `x86_64-unknown-none` missing, and the first board build fails with
//! "can't find crate for `core`". The xtask adds what is missing, or prints
//! the exact command when it cannot.

use std::process::Command;

/// What `rust-toolchain.toml` pins.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pinned {
    /// `channel = "..."`.
    pub channel: String,
    /// `components = [...]`.
    pub components: Vec<String>,
    /// `targets = [...]`.
    pub targets: Vec<String>,
}

/// Reads the `[toolchain]` table of a `rust-toolchain.toml` text (the subset
/// rustup documents: `channel`, `components`, `targets`; other keys ignored).
pub fn parse(text: &str) -> Result<Pinned, String> {
    let mut p = Pinned::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "channel" => p.channel = value.trim_matches('"').to_string(),
            "components" => p.components = list(value)?,
            "targets" => p.targets = list(value)?,
            _ => {}
        }
    }
    if p.channel.is_empty() {
        return Err("rust-toolchain.toml names no channel".into());
    }
    Ok(p)
}

fn list(value: &str) -> Result<Vec<String>, String> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| format!("rust-toolchain.toml: expected a one-line list, found `{value}`"))?;
    Ok(inner
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect())
}

/// The `rustup` commands that add what `installed_*` lacks (empty when nothing is missing).
pub fn missing_commands(
    p: &Pinned,
    installed_components: &[String],
    installed_targets: &[String],
) -> Vec<Vec<String>> {
    // `rustup component list --installed` prints `clippy-x86_64-unknown-linux-gnu`.
    let has_component = |c: &str| {
        installed_components
            .iter()
            .any(|i| i == c || i.strip_prefix(c).is_some_and(|rest| rest.starts_with('-')))
    };
    let comps: Vec<&String> = p.components.iter().filter(|c| !has_component(c)).collect();
    let targets: Vec<&String> = p
        .targets
        .iter()
        .filter(|t| !installed_targets.contains(t))
        .collect();
    let mut cmds = Vec::new();
    for (what, names) in [("component", comps), ("target", targets)] {
        if !names.is_empty() {
            let mut c: Vec<String> = ["rustup", what, "add", "--toolchain", &p.channel]
                .iter()
                .map(|s| s.to_string())
                .collect();
            c.extend(names.into_iter().cloned());
            cmds.push(c);
        }
    }
    cmds
}

fn rustup_list(args: &[&str]) -> Option<Vec<String>> {
    let out = Command::new("rustup").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect(),
    )
}

/// Adds the components and targets `rust-toolchain.toml` pins when they are
/// missing. Without rustup, or when rustup fails, returns the command to run.
pub fn ensure_installed() -> Result<(), String> {
    let path = crate::root().join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let p = parse(&text)?;
    let shown = |cmds: &[Vec<String>]| {
        cmds.iter()
            .map(|c| format!("  {}", c.join(" ")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (Some(comps), Some(targets)) = (
        rustup_list(&[
            "component",
            "list",
            "--installed",
            "--toolchain",
            &p.channel,
        ]),
        rustup_list(&["target", "list", "--installed", "--toolchain", &p.channel]),
    ) else {
        let all = missing_commands(&p, &[], &[]);
        return Err(format!(
            "could not ask rustup what toolchain {} has; install it with rustup, then run:\n{}",
            p.channel,
            shown(&all)
        ));
    };
    let cmds = missing_commands(&p, &comps, &targets);
    for c in &cmds {
        eprintln!("xtask: running {}", c.join(" "));
        let ok = Command::new(&c[0])
            .args(&c[1..])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!(
                "`{}` failed; run it yourself:\n{}",
                c.join(" "),
                shown(&cmds)
            ));
        }
    }
    Ok(())
}

/// The `rust-version` of the library's `Cargo.toml` (its `[package]` table).
pub fn msrv() -> Result<String, String> {
    let path = crate::root().join("Cargo.toml");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "rust-version").then(|| v.trim().trim_matches('"').to_string())
        })
        .ok_or_else(|| "Cargo.toml has no rust-version".into())
}

/// Installs toolchain `channel` (minimal profile) with `components` and
/// `targets` when rustup lacks any of them.
pub fn ensure_toolchain(
    channel: &str,
    components: &[&str],
    targets: &[&str],
) -> Result<(), String> {
    let owned = |v: &[&str]| v.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    let pinned = Pinned {
        channel: channel.to_string(),
        components: owned(components),
        targets: owned(targets),
    };
    let have_targets = rustup_list(&["target", "list", "--installed", "--toolchain", channel]);
    let have_comps = rustup_list(&["component", "list", "--installed", "--toolchain", channel]);
    let mut cmds = Vec::new();
    if have_targets.is_none() {
        cmds.push(owned(&[
            "rustup",
            "toolchain",
            "install",
            channel,
            "--profile",
            "minimal",
        ]));
    }
    cmds.extend(missing_commands(
        &pinned,
        &have_comps.unwrap_or_default(),
        &have_targets.unwrap_or_default(),
    ));
    for c in &cmds {
        eprintln!("xtask: running {}", c.join(" "));
        if !Command::new(&c[0])
            .args(&c[1..])
            .status()
            .is_ok_and(|s| s.success())
        {
            return Err(format!("`{}` failed", c.join(" ")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[toolchain]\nchannel = \"1.95.0\" # pinned\ncomponents = [\"rustfmt\", \"clippy\"]\ntargets = [\"aarch64-unknown-none\", \"x86_64-unknown-none\"]\nprofile = \"minimal\"\n";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_the_pinned_toolchain() {
        let p = parse(FILE).unwrap();
        assert_eq!(p.channel, "1.95.0");
        assert_eq!(p.components, strings(&["rustfmt", "clippy"]));
        assert_eq!(
            p.targets,
            strings(&["aarch64-unknown-none", "x86_64-unknown-none"])
        );
    }

    #[test]
    fn a_toolchain_without_its_targets_gets_exactly_the_missing_ones_added() {
        let p = parse(FILE).unwrap();
        let comps = strings(&[
            "cargo-x86_64-unknown-linux-gnu",
            "rustfmt-x86_64-unknown-linux-gnu",
        ]);
        let targets = strings(&["x86_64-unknown-linux-gnu", "x86_64-unknown-none"]);
        assert_eq!(
            missing_commands(&p, &comps, &targets),
            vec![
                strings(&[
                    "rustup",
                    "component",
                    "add",
                    "--toolchain",
                    "1.95.0",
                    "clippy"
                ]),
                strings(&[
                    "rustup",
                    "target",
                    "add",
                    "--toolchain",
                    "1.95.0",
                    "aarch64-unknown-none"
                ]),
            ]
        );
    }

    #[test]
    fn nothing_is_run_when_everything_is_installed() {
        let p = parse(FILE).unwrap();
        let comps = strings(&[
            "clippy-x86_64-unknown-linux-gnu",
            "rustfmt-x86_64-unknown-linux-gnu",
        ]);
        let targets = strings(&["aarch64-unknown-none", "x86_64-unknown-none"]);
        assert!(missing_commands(&p, &comps, &targets).is_empty());
    }

    #[test]
    fn a_file_without_a_channel_is_refused() {
        assert!(parse("[toolchain]\ntargets = [\"x\"]\n").is_err());
    }
}
