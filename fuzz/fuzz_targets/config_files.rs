//! The configuration file and the callers file (both TOML), as an operator writes them. Odd
//! first bytes read the rest as a configuration file (in `serve` or `serve --sandbox` mode),
//! even ones as a callers file.
//!
//! Checked besides "no panic": an error never repeats a secret (API keys, the webhook secrets,
//! inline callers) or a token digest of the callers file.
#![no_main]

use cx_gateway::auth::callers::{CallerTable, token_digest};
use cx_gateway::config::{Config, MapSource, UpstreamMode, parse_config_file};
use libfuzzer_sys::fuzz_target;

/// Settings whose values are secrets and must not appear in any error.
const SECRETS: [&str; 6] = [
    "CXGW_RETENTLY_API_KEY",
    "CXGW_RETAINLY_API_KEY",
    "CXGW_RETAINLY_API_SECRET",
    "CXGW_WEBHOOK_SECRET",
    "CXGW_WEBHOOK_SIGNING_SECRET",
    "CXGW_CALLERS",
];

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if kind % 2 == 1 {
        config(text, kind & 2 == 0);
    } else {
        callers(text);
    }
});

fn config(text: &str, real: bool) {
    let Ok(MapSource(mut settings)) = parse_config_file(text, "fuzz.toml") else {
        return;
    };
    // Settings naming files would make the target read this machine's files.
    settings.retain(|key, _| !key.ends_with("_FILE"));
    let mode = if real {
        UpstreamMode::Real
    } else {
        UpstreamMode::Sandbox
    };
    if let Err(error) = Config::load(&MapSource(settings.clone()), mode) {
        let text = error.to_string();
        for key in SECRETS {
            if let Some(secret) = settings.get(key) {
                // Short values occur in any message by chance, and a value another setting
                // holds too may be quoted as that setting's.
                let shared = settings
                    .iter()
                    .any(|(other, value)| other != key && value.contains(secret.trim()));
                if secret.trim().len() >= 12 && !shared {
                    assert!(
                        !text.contains(secret.trim()),
                        "an error repeats the secret of {key}: {}",
                        error.key
                    );
                }
            }
        }
    }
}

fn callers(text: &str) {
    match CallerTable::parse(text) {
        Ok(table) => {
            assert!(!table.is_empty(), "a callers table without callers");
            assert!(
                table.by_token("").is_none(),
                "an empty token names a caller"
            );
            let _ = std::hint::black_box(table.by_token(text));
            let _ = std::hint::black_box(token_digest(text));
        }
        Err(error) => {
            for digest in digests(text) {
                assert!(
                    !error.contains(&digest),
                    "an error repeats a token digest of the callers file"
                );
            }
        }
    }
}

/// The `token_sha256` values of a callers file that are digests (64 hexadecimal digits) and
/// occur nowhere else in it (a name or a permission may be quoted in an error, and could hold
/// the same text).
fn digests(text: &str) -> Vec<String> {
    let Ok(document) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut digests = Vec::new();
    let mut others = Vec::new();
    let mut stack: Vec<(Option<&str>, &toml::Value)> = document
        .iter()
        .map(|(key, value)| {
            others.push(key.clone());
            (Some(key.as_str()), value)
        })
        .collect();
    while let Some((key, value)) = stack.pop() {
        match value {
            toml::Value::String(text) if key == Some("token_sha256") => digests.push(text.clone()),
            toml::Value::Array(items) => stack.extend(items.iter().map(|item| (key, item))),
            toml::Value::Table(table) => {
                for (name, value) in table {
                    others.push(name.clone());
                    stack.push((Some(name.as_str()), value));
                }
            }
            other => others.push(other.to_string()),
        }
    }
    digests.retain(|digest| {
        // Only real digests: shorter text can occur in any message by chance.
        digest.len() == 64
            && digest.bytes().all(|b| b.is_ascii_hexdigit())
            && !others.iter().any(|other| other.contains(digest.as_str()))
            && digests_are_distinct(text, digest)
    });
    digests
}

/// The digest occurs once in the text, so an error quoting it quotes the digest itself.
fn digests_are_distinct(text: &str, digest: &str) -> bool {
    text.matches(digest).count() == 1
}
