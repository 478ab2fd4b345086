//! Deriving a `bookworm-backports` source from the machine's own apt sources.
//!
//! QEMU 10 is in bookworm-backports. Rather than naming a package archive,
//! the xtask reads the entries apt already uses (`/etc/apt/sources.list` and
//! `/etc/apt/sources.list.d/*.list` in one-line format, `*.sources` in deb822
//! format), takes the one that serves the `bookworm` suite (its URIs — a
//! mirror or a proxy — and its keyring), and adds only the
//! `bookworm-backports` suite to it. When no such entry exists it says so and
//! the caller prints the command for the user to run.

/// One enabled `deb` entry of apt's sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Archive URIs (one-line format: one; deb822: one or more).
    pub uris: Vec<String>,
    /// Suites served.
    pub suites: Vec<String>,
    /// Components.
    pub components: Vec<String>,
    /// The keyring (`signed-by` / `Signed-By`) as written, when given. In
    /// deb822 it may be an inline key block spanning several lines.
    pub signed_by: Option<String>,
}

/// What was found for bookworm-backports.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// An enabled entry already serves `bookworm-backports`.
    AlreadyConfigured,
    /// Write this deb822 text to a new file in `/etc/apt/sources.list.d/`.
    Add(String),
    /// No enabled `deb` entry serves `bookworm`: nothing to derive from.
    NoBookwormEntry,
}

/// Parses one-line format (`sources.list`, `*.list`): `deb [opts] URI SUITE COMPONENT...`.
pub fn parse_one_line(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue; // deb-src, comments, blank lines
        };
        let rest = rest.trim_start();
        let (opts, rest) = match rest.strip_prefix('[') {
            Some(r) => match r.split_once(']') {
                Some((o, r)) => (o, r),
                None => continue, // malformed: apt would refuse it too
            },
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        let signed_by = opts
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_string);
        out.push(Entry {
            uris: vec![uri.to_string()],
            suites: vec![suite.to_string()],
            components: words.map(str::to_string).collect(),
            signed_by,
        });
    }
    out
}

/// Parses deb822 format (`*.sources`): stanzas separated by blank lines,
/// `Field: value` with continuation lines starting with white space.
pub fn parse_deb822(text: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for stanza in stanzas(text) {
        let field = |name: &str| {
            stanza
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let words = |name: &str| -> Vec<String> {
            field(name)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        let enabled = field("Enabled").is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
        if !enabled || !words("Types").iter().any(|t| t == "deb") {
            continue;
        }
        out.push(Entry {
            uris: words("URIs"),
            suites: words("Suites"),
            components: words("Components"),
            signed_by: field("Signed-By"),
        });
    }
    out
}

/// Splits deb822 text into stanzas of (field, value); comment lines dropped,
/// continuation lines joined to their field with a newline.
fn stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut all = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !cur.is_empty() {
                all.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut() {
                v.push('\n');
                v.push_str(line);
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        all.push(cur);
    }
    all
}

/// Decides what to do from every enabled entry apt has.
pub fn plan(entries: &[Entry]) -> Plan {
    let serves = |e: &Entry, s: &str| e.suites.iter().any(|x| x == s) && !e.uris.is_empty();
    if entries.iter().any(|e| serves(e, "bookworm-backports")) {
        return Plan::AlreadyConfigured;
    }
    // Prefer an entry that carries `main` (QEMU is in main).
    let base = entries
        .iter()
        .filter(|e| serves(e, "bookworm"))
        .max_by_key(|e| e.components.iter().any(|c| c == "main"));
    let Some(base) = base else {
        return Plan::NoBookwormEntry;
    };
    let mut text = format!(
        "Types: deb\nURIs: {}\nSuites: bookworm-backports\nComponents: main\n",
        base.uris.join(" ")
    );
    if let Some(k) = &base.signed_by {
        text.push_str(&format!("Signed-By: {k}\n"));
    }
    Plan::Add(text)
}

/// Reads every apt source file on this machine, in apt's order.
pub fn machine_entries() -> Vec<Entry> {
    let mut entries = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        entries.extend(parse_one_line(&t));
    }
    let mut files: Vec<_> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(t) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("list") => entries.extend(parse_one_line(&t)),
            Some("sources") => entries.extend(parse_deb822(&t)),
            _ => {} // apt ignores other names (e.g. *.disabled)
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    // Host names below are placeholders for a lab mirror and a caching proxy.
    const DEB822_MIRROR: &str = "\
Types: deb deb-src
# a local mirror
URIs: http://mirror.lab.example/debian http://mirror2.lab.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/lab-archive-keyring.gpg

Types: deb
URIs: http://mirror.lab.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/lab-archive-keyring.gpg
";

    #[test]
    fn deb822_mirror_keeps_its_uris_and_keyring_and_adds_only_backports() {
        let Plan::Add(text) = plan(&parse_deb822(DEB822_MIRROR)) else {
            panic!("expected a derived source");
        };
        assert_eq!(
            text,
            "Types: deb\n\
             URIs: http://mirror.lab.example/debian http://mirror2.lab.example/debian\n\
             Suites: bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/lab-archive-keyring.gpg\n"
        );
    }

    #[test]
    fn one_line_proxy_entry_with_options_is_derived() {
        let list = "\
# deb http://old.lab.example/debian bookworm main
deb-src http://apt-proxy.lan.example:3142/debian bookworm main
deb [arch=amd64 signed-by=/etc/apt/keyrings/proxy.gpg] http://apt-proxy.lan.example:3142/debian bookworm main non-free-firmware
deb http://apt-proxy.lan.example:3142/debian-security bookworm-security main
";
        assert_eq!(
            plan(&parse_one_line(list)),
            Plan::Add(
                "Types: deb\nURIs: http://apt-proxy.lan.example:3142/debian\n\
                 Suites: bookworm-backports\nComponents: main\n\
                 Signed-By: /etc/apt/keyrings/proxy.gpg\n"
                    .into()
            )
        );
    }

    #[test]
    fn an_entry_without_keyring_gives_a_source_without_signed_by() {
        let e = parse_one_line("deb http://mirror.lab.example/debian/ bookworm main\n");
        assert_eq!(
            plan(&e),
            Plan::Add(
                "Types: deb\nURIs: http://mirror.lab.example/debian/\n\
                 Suites: bookworm-backports\nComponents: main\n"
                    .into()
            )
        );
    }

    #[test]
    fn inline_deb822_key_block_is_carried_over_verbatim() {
        let src = "Types: deb\nURIs: http://mirror.lab.example/debian\nSuites: bookworm\n\
                   Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n -----END PGP PUBLIC KEY BLOCK-----\n";
        let Plan::Add(text) = plan(&parse_deb822(src)) else {
            panic!("expected a derived source");
        };
        assert!(text.ends_with(
            "Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n -----END PGP PUBLIC KEY BLOCK-----\n"
        ));
    }

    #[test]
    fn several_entries_prefer_the_one_with_main() {
        let mut e = parse_one_line(
            "deb http://a.lab.example/debian bookworm contrib\ndeb http://b.lab.example/debian bookworm main\n",
        );
        e.extend(parse_deb822(
            "Types: deb\nURIs: http://c.lab.example/x\nSuites: trixie\nComponents: main\n",
        ));
        let Plan::Add(text) = plan(&e) else {
            panic!("expected a derived source");
        };
        assert!(
            text.contains("URIs: http://b.lab.example/debian\n"),
            "{text}"
        );
    }

    #[test]
    fn existing_backports_entry_means_nothing_to_write() {
        let mut e = parse_deb822(DEB822_MIRROR);
        e.extend(parse_one_line(
            "deb http://mirror.lab.example/debian bookworm-backports main\n",
        ));
        assert_eq!(plan(&e), Plan::AlreadyConfigured);
    }

    #[test]
    fn disabled_or_commented_backports_does_not_count() {
        let mut e = parse_deb822(
            "Enabled: no\nTypes: deb\nURIs: http://m.lab.example/debian\nSuites: bookworm-backports\nComponents: main\n",
        );
        e.extend(parse_one_line(
            "# deb http://m.lab.example/debian bookworm-backports main\n",
        ));
        e.extend(parse_one_line(
            "deb http://m.lab.example/debian bookworm main\n",
        ));
        assert!(matches!(plan(&e), Plan::Add(_)));
    }

    #[test]
    fn missing_bookworm_entry_is_reported() {
        let mut e = parse_deb822(
            "Types: deb\nURIs: http://mirror.lab.example/debian-security\nSuites: bookworm-security\nComponents: main\n",
        );
        e.extend(parse_one_line(
            "deb http://mirror.lab.example/debian trixie main\n",
        ));
        assert_eq!(plan(&e), Plan::NoBookwormEntry);
        assert_eq!(plan(&[]), Plan::NoBookwormEntry);
    }
}
