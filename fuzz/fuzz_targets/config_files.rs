//! The files an operator writes (all TOML): the configuration file, the callers file, the event
//! rules file and the alert rules file. The first byte picks the file: odd bytes read the rest
//! as a configuration file (in `serve` or `serve --sandbox` mode); even ones, by `(byte / 2) % 3`,
//! as a callers file, an event rules file or an alert rules file.
//!
//! Checked besides "no panic": an error never repeats a secret (API keys, the webhook secrets,
//! inline callers), a token digest of the callers file or an alert rule's URL (a Slack webhook
//! URL is a secret); every rule that loads decides on attributes drawn from the same input.
#![no_main]

use cx_gateway::alerts::rules::{EventKind, Rules as AlertRules};
use cx_gateway::auth::callers::{CallerTable, token_digest};
use cx_gateway::config::{Config, MapSource, UpstreamMode, parse_config_file};
use cx_gateway::pb;
use cx_gateway::rules::{Attributes, parse_file as parse_event_rules};
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
        match (kind / 2) % 3 {
            0 => callers(text),
            1 => event_rules(text),
            _ => alert_rules(text),
        }
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

/// Every string, number and boolean of a TOML document with the key it is under, depth first.
fn scalars(document: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut found = Vec::new();
    let mut stack: Vec<(&str, &toml::Value)> = document
        .iter()
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    while let Some((key, value)) = stack.pop() {
        match value {
            toml::Value::Array(items) => stack.extend(items.iter().map(|item| (key, item))),
            toml::Value::Table(table) => {
                stack.extend(table.iter().map(|(name, value)| (name.as_str(), value)));
            }
            scalar => found.push((key.to_owned(), scalar.clone())),
        }
    }
    found
}

/// The event attributes an input describes: each scalar of the document under its key, so the
/// audience filters of the rules meet the names and values they test.
fn attributes_of(text: &str) -> prost_types::Struct {
    use prost_types::value::Kind;
    let fields = text
        .parse::<toml::Table>()
        .map(|document| scalars(&document))
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            let kind = match value {
                toml::Value::String(text) => Kind::StringValue(text),
                toml::Value::Integer(number) => Kind::NumberValue(number as f64),
                toml::Value::Float(number) => Kind::NumberValue(number),
                toml::Value::Boolean(flag) => Kind::BoolValue(flag),
                other => Kind::StringValue(other.to_string()),
            };
            (key, prost_types::Value { kind: Some(kind) })
        })
        .collect();
    prost_types::Struct { fields }
}

fn event_rules(text: &str) {
    let Ok(rules) = parse_event_rules(text) else {
        return;
    };
    let attributes = attributes_of(text);
    let both = Attributes {
        properties: Some(&attributes),
        traits: Some(&attributes),
    };
    let none = Attributes {
        properties: None,
        traits: None,
    };
    for rule in &rules {
        assert!(
            (1..=64).contains(&rule.id.len()),
            "a rule id of {} bytes",
            rule.id.len()
        );
        assert!(
            (0.0..=100.0).contains(&rule.sample_percent),
            "rule `{}` samples {}%",
            rule.id,
            rule.sample_percent
        );
        assert!(!rule.events.is_empty(), "rule `{}` names no event", rule.id);
        let _ = std::hint::black_box(rule.decide(text, &rule.id, &both));
        let _ = std::hint::black_box(rule.decide("", "", &none));
        // The sample is a pure function of the rule, the customer and the message id.
        assert_eq!(
            rule.sampled_in(text, &rule.id),
            rule.sampled_in(text, &rule.id)
        );
    }
}

fn alert_rules(text: &str) {
    let Ok(document) = text.parse::<toml::Table>() else {
        // Not TOML: refused before any file is read.
        let _ = std::hint::black_box(AlertRules::parse(text));
        return;
    };
    let values = scalars(&document);
    // Files named by the rules (`url_file`, `secret_file`) would make the target read this
    // machine's files.
    if values.iter().any(|(key, _)| key.ends_with("_file")) {
        return;
    }
    match AlertRules::parse(text) {
        Ok(rules) => {
            let feedback = pb::Feedback::default();
            for rule in rules.iter() {
                for kind in [EventKind::Created, EventKind::Updated] {
                    let _ = std::hint::black_box(rule.matches(kind, &feedback));
                }
                assert!(rules.get(&rule.name).is_some());
            }
        }
        Err(error) => assert_no_url(text, &error, &values),
    }
}

/// The error of a refused alert rules file repeats none of its URLs (a Slack webhook URL is a
/// secret). Only URLs long enough not to occur by chance and found nowhere else in the file
/// (a rule name may be quoted, and could hold the same text) are checked.
fn assert_no_url(text: &str, error: &str, values: &[(String, toml::Value)]) {
    for (key, value) in values {
        let toml::Value::String(url) = value else {
            continue;
        };
        if key != "url" || url.len() < 12 || text.matches(url.as_str()).count() != 1 {
            continue;
        }
        let elsewhere = values.iter().any(|(other_key, other)| {
            other_key != "url" && other.to_string().contains(url.as_str())
        });
        if !elsewhere {
            assert!(
                !error.contains(url.as_str()),
                "an error repeats a rule's url"
            );
        }
    }
}
