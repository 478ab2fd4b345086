//! Finding (and on Debian bookworm as root, installing) QEMU ≥ 10.
//!
//! QEMU 10 is in bookworm-backports. The source for it is derived from the
//! machine's own apt configuration (see [`crate::apt`]): the same mirror or
//! proxy and keyring as its `bookworm` entry, with only the suite changed.

use crate::apt::{self, Plan};
use std::process::Command;

const NEEDED_MAJOR: u32 = 10;
const PACKAGES: [&str; 2] = ["qemu-system-arm", "qemu-system-x86"];

fn major_version(binary: &str) -> Option<u32> {
    let out = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "QEMU emulator version 10.0.2 (Debian ...)"
    let v = text.split("version ").nth(1)?;
    v.split('.').next()?.trim().parse().ok()
}

fn all_present() -> bool {
    ["qemu-system-aarch64", "qemu-system-x86_64"]
        .iter()
        .all(|b| major_version(b).is_some_and(|m| m >= NEEDED_MAJOR))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn is_bookworm() -> bool {
    std::fs::read_to_string("/etc/os-release")
        .is_ok_and(|s| s.contains("VERSION_CODENAME=bookworm"))
}

const SOURCES: &str = "/etc/apt/sources.list.d/bare-iommu-backports.sources";

fn install_command() -> String {
    format!(
        "apt-get update && apt-get install -y -t bookworm-backports {}",
        PACKAGES.join(" ")
    )
}

/// The exact commands for a user to run; `derived` is the source text when
/// one could be derived from the machine's apt configuration.
fn manual_command(derived: Option<&str>, why: &str) -> String {
    let add = match derived {
        Some(text) => format!("printf '{}' > {SOURCES}", text.replace('\n', "\\n")),
        None => format!(
            "printf 'Types: deb\\nURIs: YOUR-DEBIAN-MIRROR\\nSuites: bookworm-backports\\n\
             Components: main\\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\\n' > {SOURCES}\n  \
             (YOUR-DEBIAN-MIRROR: the URI of the mirror that serves Debian bookworm to this machine)"
        ),
    };
    format!(
        "QEMU >= {NEEDED_MAJOR} (qemu-system-aarch64 and qemu-system-x86_64) is required and {why}. \
         On Debian bookworm run as root:\n  {add}\n  {}",
        install_command()
    )
}

/// Makes sure QEMU ≥ 10 is on PATH, installing it from bookworm-backports when possible.
pub fn ensure_installed() -> Result<(), String> {
    if all_present() {
        return Ok(());
    }
    let plan = apt::plan(&apt::machine_entries());
    let derived = match &plan {
        Plan::Add(text) => Some(text.as_str()),
        _ => None,
    };
    if !is_bookworm() {
        return Err(manual_command(derived, "this is not Debian bookworm"));
    }
    if !is_root() {
        return Err(manual_command(derived, "installing it needs root"));
    }
    match &plan {
        Plan::AlreadyConfigured => {}
        Plan::Add(text) => {
            eprintln!(
                "xtask: adding bookworm-backports from this machine's bookworm entry:\n{text}"
            );
            std::fs::write(SOURCES, text).map_err(|e| format!("writing {SOURCES}: {e}"))?;
        }
        Plan::NoBookwormEntry => {
            return Err(manual_command(
                None,
                "apt has no enabled `deb` entry for bookworm to derive bookworm-backports from",
            ));
        }
    }
    eprintln!("xtask: installing QEMU {NEEDED_MAJOR} from bookworm-backports");
    let ok = Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-t", "bookworm-backports"])
            .args(PACKAGES)
            .status()
            .is_ok_and(|s| s.success());
    if ok && all_present() {
        Ok(())
    } else {
        Err(manual_command(derived, "the install did not succeed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_command_without_a_bookworm_entry_names_no_archive() {
        let c = manual_command(None, "apt has no entry");
        assert!(c.contains("YOUR-DEBIAN-MIRROR"), "{c}");
        assert!(c.contains("Suites: bookworm-backports"), "{c}");
        assert!(c.contains(&install_command()), "{c}");
        assert!(!c.contains("http"), "{c}");
    }

    #[test]
    fn printed_command_with_a_derived_source_writes_exactly_it() {
        let derived = "Types: deb\nURIs: http://mirror.lab.example/debian\nSuites: bookworm-backports\nComponents: main\n";
        let c = manual_command(Some(derived), "installing it needs root");
        assert!(c.contains(&format!(
            "printf 'Types: deb\\nURIs: http://mirror.lab.example/debian\\nSuites: bookworm-backports\\nComponents: main\\n' > {SOURCES}"
        )), "{c}");
    }
}
