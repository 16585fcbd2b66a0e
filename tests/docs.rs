//! The reference docs against the code, so that they cannot drift apart:
//! every configuration key is in docs/configuration.md and config/imattr.toml,
//! every metric is in docs/metrics.md, and the docs link only to files that exist.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use imattr::config::Config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// `section.key` for every key of the default configuration, via serde.
fn config_keys() -> BTreeSet<String> {
    let value = serde_json::to_value(Config::default()).expect("Config serialises");
    let sections = value.as_object().expect("Config is a table of sections");
    let mut keys = BTreeSet::new();
    for (section, table) in sections {
        let table = table
            .as_object()
            .unwrap_or_else(|| panic!("[{section}] is a table"));
        assert!(!table.is_empty(), "[{section}] has keys");
        for key in table.keys() {
            keys.insert(format!("{section}.{key}"));
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented() {
    let keys = config_keys();
    // The serialisation must see the whole structure, or this test is empty.
    for known in ["amqp.url", "tencent.secret_key", "shutdown.timeout_secs"] {
        assert!(keys.contains(known), "{known} not among {keys:?}");
    }
    let doc = read("docs/configuration.md");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document (as `section.key`): {missing:?}"
    );
}

#[test]
fn every_config_key_is_in_the_sample_file() {
    let sample: toml::Table = read("config/imattr.toml")
        .parse()
        .expect("config/imattr.toml is TOML");
    let mut missing = Vec::new();
    for key in config_keys() {
        let (section, name) = key.split_once('.').expect("section.key");
        let present = sample
            .get(section)
            .and_then(|s| s.as_table())
            .is_some_and(|t| t.contains_key(name));
        if !present {
            missing.push(key);
        }
    }
    assert!(missing.is_empty(), "config/imattr.toml lacks: {missing:?}");
}

#[test]
fn the_sample_file_holds_the_defaults() {
    // Through serde alone: unknown keys and wrong types fail here too.
    let loaded: Config =
        toml::from_str(&read("config/imattr.toml")).expect("config/imattr.toml is a Config");
    assert_eq!(
        serde_json::to_value(&loaded).unwrap(),
        serde_json::to_value(Config::default()).unwrap(),
        "config/imattr.toml holds a value other than the default"
    );
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literals that follow `counter!(`, `gauge!(` and `histogram!(`
/// (and their `describe_` forms), plus every `"imattr_…"` literal (names kept
/// in constants), over src/.
fn metric_names() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for mac in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in text.match_indices(mac) {
                let rest = text[at + mac.len()..].trim_start();
                if let Some(lit) = rest.strip_prefix('"') {
                    let name = &lit[..lit.find('"').expect("closing quote")];
                    names.insert(name.to_string());
                }
            }
        }
        for (at, _) in text.match_indices("\"imattr_") {
            let lit = &text[at + 1..];
            let end = lit
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(lit.len());
            if lit[end..].starts_with('"') {
                names.insert(lit[..end].to_string());
            }
        }
    }
    names
}

/// How docs/metrics.md marks a metric announced but not registered by the code.
const PLANNED: &str = "**Not yet registered.**";

#[test]
fn every_metric_is_documented() {
    let names = metric_names();
    for known in ["imattr_messages_received_total", "imattr_paused"] {
        assert!(
            names.contains(known),
            "{known} not found in src/: {names:?}"
        );
    }
    let doc = read("docs/metrics.md");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not document: {missing:?}"
    );
    // A table row for a metric the code does not register says so, and one
    // the code registers does not claim otherwise.
    for line in doc.lines().filter(|l| l.starts_with("| `imattr_")) {
        let name = line[3..].split('`').next().unwrap_or_default();
        let planned = line.contains(PLANNED);
        assert_eq!(
            planned,
            !names.contains(name),
            "docs/metrics.md: {name} is {} in src/ but its row {} {:?}",
            if names.contains(name) {
                "registered"
            } else {
                "not registered"
            },
            if planned { "says" } else { "does not say" },
            PLANNED,
        );
    }
}

/// Relative links in README.md and docs/*.md point to files that exist.
#[test]
fn relative_links_resolve() {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "md") {
            pages.push(p);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let dir = page.parent().unwrap();
            if !dir.join(target).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:?}");
}

/// Nothing in the docs points outside the repository's own pages.
#[test]
fn docs_stand_on_their_own() {
    let mut pages = vec![root().join("README.md")];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "md") {
            pages.push(p);
        }
    }
    for page in pages {
        let text = std::fs::read_to_string(&page).unwrap();
        for bad in ["../shared", "CONTRACT"] {
            assert!(!text.contains(bad), "{} mentions {bad}", page.display());
        }
    }
}

/// The `imattr_…` names an alert rule or a dashboard queries are metrics the
/// code registers (histograms through their `_bucket`, `_sum`, `_count` series).
#[test]
fn alerts_and_dashboard_query_existing_metrics() {
    let names = metric_names();
    let dashboard = read("deploy/grafana/imattr-dashboard.json");
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() > 5));
    let alerts = read("deploy/prometheus/imattr-alerts.yml");
    for (file, text) in [("dashboard", &dashboard), ("alert rules", &alerts)] {
        let mut used = BTreeSet::new();
        for (at, _) in text.match_indices("imattr_") {
            if text[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let rest = &text[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            used.insert(rest[..end].to_string());
        }
        assert!(!used.is_empty(), "{file} queries no imattr metric");
        for name in used {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| names.contains(*b)))
                .unwrap_or(&name);
            assert!(
                names.contains(base),
                "{file} queries {name}, which src/ does not register"
            );
        }
    }
}
