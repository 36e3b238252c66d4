//! Segment write keys: which caller of the callers file a presented key stands for.
//!
//! Keys are files named on the callers' entries (`segment_write_key_files`), typically a mounted
//! Kubernetes Secret. Like bearer tokens, only their SHA-256 digests are kept in memory and a
//! presented key is compared with every digest in constant time. The files are read again when
//! the callers file was reloaded and at most every `CXGW_RELOAD_INTERVAL` otherwise, so a rotated
//! key takes effect without a restart (the same cadence as the callers file itself).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::auth::callers::token_digest;
use crate::auth::{Caller, CallerRegistry, CallerTable};

/// Who a presented write key stands for.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Authentication is off (no callers configured: `serve --sandbox` or a trusted mesh), so
    /// every key is accepted, as every gRPC call is.
    Anonymous,
    /// The caller whose key file holds the key.
    Caller(Arc<Caller>),
}

/// The write keys in force.
pub struct WriteKeys {
    registry: Option<CallerRegistry>,
    refresh_every: Duration,
    loaded: Mutex<Loaded>,
}

/// A key's digest and the caller it stands for.
type KeyEntry = ([u8; 32], Arc<Caller>);

struct Loaded {
    /// The callers table the keys were read for; a reload of the callers file replaces it.
    table: Option<Arc<CallerTable>>,
    read_at: Instant,
    keys: Vec<KeyEntry>,
}

impl WriteKeys {
    /// Reads every key file once. Any unreadable, empty or shared key file is an error here, so
    /// a gateway never starts with a Segment caller that cannot authenticate.
    pub fn load(
        registry: Option<CallerRegistry>,
        refresh_every: Duration,
    ) -> Result<WriteKeys, String> {
        let (table, keys) = match &registry {
            Some(registry) => {
                let table = registry.current();
                let (keys, problems) = read_keys(&table);
                if let Some(problem) = problems.into_iter().next() {
                    return Err(problem);
                }
                (Some(table), keys)
            }
            None => (None, Vec::new()),
        };
        Ok(WriteKeys {
            registry,
            refresh_every,
            loaded: Mutex::new(Loaded {
                table,
                read_at: Instant::now(),
                keys,
            }),
        })
    }

    /// How many keys are in force (for the start-up log).
    pub fn len(&self) -> usize {
        self.loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether callers are configured at all (otherwise every key is accepted).
    pub fn authenticates(&self) -> bool {
        self.registry.is_some()
    }

    /// The principal a presented key stands for; `None` for an unknown key.
    pub fn resolve(&self, key: &str) -> Option<Principal> {
        let Some(registry) = &self.registry else {
            return Some(Principal::Anonymous);
        };
        let digest = token_digest(key);
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        let table = registry.current();
        let stale = loaded.read_at.elapsed() >= self.refresh_every;
        let replaced = !loaded
            .table
            .as_ref()
            .is_some_and(|known| Arc::ptr_eq(known, &table));
        if stale || replaced {
            let (keys, problems) = read_keys(&table);
            for problem in problems {
                tracing::warn!(%problem, "a segment write key is not in force");
            }
            *loaded = Loaded {
                table: Some(table),
                read_at: Instant::now(),
                keys,
            };
        }
        let mut found = None;
        // Every digest is compared so the time taken does not depend on which one matched.
        for (known, caller) in &loaded.keys {
            if digests_equal(known, &digest) {
                found = Some(Arc::clone(caller));
            }
        }
        found.map(Principal::Caller)
    }
}

/// The digests of every caller's key files, and a description of each file that could not be
/// used. Problems name the caller and the file, never the file's content.
fn read_keys(table: &CallerTable) -> (Vec<KeyEntry>, Vec<String>) {
    let mut keys: Vec<KeyEntry> = Vec::new();
    let mut problems = Vec::new();
    for caller in table.iter() {
        for path in caller.segment_write_key_files() {
            let name = caller.name();
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(error) => {
                    problems.push(format!(
                        "caller `{name}`: cannot read segment write key file `{}`: {error}",
                        path.display()
                    ));
                    continue;
                }
            };
            // A trailing newline is what editors and `echo` leave; it is not part of the key.
            let key = text.trim();
            if key.is_empty() {
                problems.push(format!(
                    "caller `{name}`: segment write key file `{}` is empty",
                    path.display()
                ));
                continue;
            }
            let digest = token_digest(key);
            if let Some((_, owner)) = keys.iter().find(|(known, _)| digests_equal(known, &digest)) {
                problems.push(format!(
                    "caller `{name}`: segment write key file `{}` holds a key already used by caller `{}`",
                    path.display(),
                    owner.name()
                ));
                continue;
            }
            keys.push((digest, Arc::clone(caller)));
        }
    }
    (keys, problems)
}

/// Equality of two digests that takes the same time wherever they differ.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        difference |= x ^ y;
    }
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::CallersSource;
    use crate::config::Secret;

    fn hex(digest: [u8; 32]) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn registry(entries: &[(&str, &std::path::Path)]) -> CallerRegistry {
        let text: String = entries
            .iter()
            .map(|(name, path)| {
                format!(
                    "[[caller]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\npermissions = [\"events:write\"]\nsegment_write_key_files = [\"{}\"]\n",
                    hex(token_digest(&format!("grpc-{name}"))),
                    path.display()
                )
            })
            .collect();
        CallerRegistry::load(CallersSource::Inline(Secret::new(text))).unwrap()
    }

    /// Writes each `(file name, content)` in `dir`; returns their paths in order.
    fn key_files(dir: &tempfile::TempDir, files: &[(&str, &str)]) -> Vec<std::path::PathBuf> {
        files
            .iter()
            .map(|(name, content)| {
                let path = dir.path().join(name);
                std::fs::write(&path, content).unwrap();
                path
            })
            .collect()
    }

    #[test]
    fn keys_find_their_caller_and_rotate_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let [web, crm] = key_files(&dir, &[("web", "wk-web-1\n"), ("crm", "wk-crm")])
            .try_into()
            .unwrap();
        let keys = WriteKeys::load(
            Some(registry(&[("web", &web), ("crm", &crm)])),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        let name = |key: &str| match keys.resolve(key) {
            Some(Principal::Caller(caller)) => Some(caller.name().to_string()),
            _ => None,
        };
        assert_eq!(name("wk-web-1").as_deref(), Some("web"));
        assert_eq!(name("wk-crm").as_deref(), Some("crm"));
        assert_eq!(name("wk-web-2"), None);
        assert_eq!(name(""), None);
        // The gRPC token of a caller is not a write key.
        assert_eq!(name("grpc-web"), None);

        std::fs::write(&web, "wk-web-2").unwrap();
        assert_eq!(name("wk-web-2").as_deref(), Some("web"));
        assert_eq!(
            name("wk-web-1"),
            None,
            "a rotated key is no longer accepted"
        );
    }

    #[test]
    fn an_unusable_key_file_refuses_the_start_without_showing_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let [a, b] = key_files(
            &dir,
            &[("a", "wk-shared-secret"), ("b", "wk-shared-secret")],
        )
        .try_into()
        .unwrap();
        let error = WriteKeys::load(Some(registry(&[("a", &a), ("b", &b)])), Duration::ZERO)
            .err()
            .unwrap();
        assert!(error.contains("already used by caller `a`"), "{error}");
        assert!(!error.contains("wk-shared-secret"), "{error}");

        let missing = dir.path().join("missing");
        let error = WriteKeys::load(Some(registry(&[("a", &missing)])), Duration::ZERO)
            .err()
            .unwrap();
        assert!(
            error.contains("cannot read segment write key file"),
            "{error}"
        );

        std::fs::write(&b, "\n").unwrap();
        let error = WriteKeys::load(Some(registry(&[("b", &b)])), Duration::ZERO)
            .err()
            .unwrap();
        assert!(error.contains("is empty"), "{error}");
    }

    #[test]
    fn without_callers_every_key_is_anonymous() {
        let keys = WriteKeys::load(None, Duration::ZERO).unwrap();
        assert!(matches!(
            keys.resolve("anything"),
            Some(Principal::Anonymous)
        ));
    }
}
