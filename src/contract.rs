//! Checks that `docs/contract.md`, the project's statement of its contract,
//! names everything the code defines that a user of sendgate sees: every
//! `x-sendgate-*` header, refusal reason, event type, metric and setting.

use std::collections::BTreeSet;
use std::path::Path;

use crate::domain::events::EventType;
use crate::domain::plan::Reason;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `"x-sendgate-…"` string literal in the Rust files under `dir`.
fn headers_in(dir: &Path, found: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("a source folder").flatten() {
        let path = entry.path();
        if path.is_dir() {
            headers_in(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("a source file");
            for (start, _) in text.match_indices("\"x-sendgate-") {
                let rest = &text[start + 1..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .expect("a closed literal");
                // The bare prefix is how publishers' own copies are found.
                if end > "x-sendgate-".len() {
                    found.insert(rest[..end].to_owned());
                }
            }
        }
    }
}

/// `[section] key` of every setting in `config/default.toml`.
fn settings() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("config/default.toml")).expect("defaults");
    let mut section = String::new();
    let mut found = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" = ")
            && !line.starts_with('#')
            && !key.contains(' ')
        {
            found.push(format!("[{section}] {key}"));
        }
    }
    found
}

#[test]
fn the_contract_names_everything_the_code_defines() {
    let contract =
        std::fs::read_to_string(root().join("docs/contract.md")).expect("docs/contract.md");
    let mut headers = BTreeSet::new();
    headers_in(&root().join("src"), &mut headers);
    headers_in(&root().join("crates/core/src"), &mut headers);
    assert!(headers.len() >= 10, "found only {headers:?}");

    let reasons = Reason::ALL
        .into_iter()
        .chain([Reason::UnknownReservation, Reason::InvalidOutcome])
        .map(|r| r.as_str().to_owned());
    let events = EventType::ALL.into_iter().map(|e| e.as_str().to_owned());
    let metrics = crate::metrics::CATALOGUE.iter().map(|m| m.name.to_owned());
    let settings = settings();
    assert!(settings.len() >= 50, "found only {settings:?}");

    let missing: Vec<String> = headers
        .into_iter()
        .chain(reasons)
        .chain(events)
        .chain(metrics)
        .chain(settings)
        .filter(|name| !contract.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/contract.md does not name (in backticks): {missing:?}"
    );
}
