//! Finding (and on Debian bookworm as root, installing) QEMU ≥ 10.

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
const SOURCES_TEXT: &str = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";

fn manual_command() -> String {
    format!(
        "QEMU >= {NEEDED_MAJOR} (qemu-system-aarch64 and qemu-system-x86_64) is required. On Debian bookworm run as root:\n  \
         printf '{}' > {SOURCES}\n  apt-get update && apt-get install -y -t bookworm-backports {}",
        SOURCES_TEXT.replace('\n', "\\n"),
        PACKAGES.join(" ")
    )
}

/// Makes sure QEMU ≥ 10 is on PATH, installing it from bookworm-backports when possible.
pub fn ensure_installed() -> Result<(), String> {
    if all_present() {
        return Ok(());
    }
    if !(is_root() && is_bookworm()) {
        return Err(manual_command());
    }
    let has_backports = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_to_string(e.path()).is_ok_and(|s| s.contains("bookworm-backports"))
            })
        })
        .unwrap_or(false)
        || std::fs::read_to_string("/etc/apt/sources.list")
            .is_ok_and(|s| s.contains("bookworm-backports"));
    if !has_backports {
        std::fs::write(SOURCES, SOURCES_TEXT).map_err(|e| format!("writing {SOURCES}: {e}"))?;
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
        Err(manual_command())
    }
}
