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
            drop(table.by_token(text));
            drop(token_digest(text));
        }
        Err(error) => {
            for digest in hex_runs(text) {
                assert!(
                    !error.contains(digest),
                    "an error repeats a token digest of the callers file"
                );
            }
        }
    }
}

/// Runs of 64 hexadecimal digits (token digests) in the text.
fn hex_runs(text: &str) -> Vec<&str> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .filter(|run| run.len() >= 64)
        .collect()
}
