//! Caller identities: who may call, how they prove it, what they may do, and their share.
//!
//! The callers file is TOML, one `[[caller]]` table per calling service:
//!
//! ```toml
//! [[caller]]
//! name = "billing"                       # shown in logs, spans and errors
//! token_sha256 = ["9f86d08188…"]         # SHA-256 (hex) of each accepted bearer token
//! client_subjects = ["billing.prod.svc"] # client-certificate CN or SAN that identifies it (mTLS)
//! permissions = ["read", "surveys:send"]
//! weight = 2                             # fair share of the upstream budget (default 1)
//! quota_per_minute = 600                 # hard cap of upstream requests per minute (optional)
//! segment_write_key_files = ["/etc/cx-gateway/segment/billing-web"] # Segment intake write keys
//! ```
//!
//! Segment write keys are files (a mounted Secret) rather than digests here, since the Segment
//! library on the other side needs the key itself and rotating it means replacing a file.
//!
//! Tokens are stored only as SHA-256 digests, and SHA-256 rather than argon2 on purpose: a
//! password hash makes brute force slow for low-entropy secrets a person picks, but bearer
//! tokens are machine-generated (32 random bytes, see the README), where a fast hash is already
//! infeasible to invert — and a deliberately slow hash on every RPC would hand any client a cheap
//! way to burn the gateway's CPU. A presented token is hashed and its digest compared with every
//! known digest in constant time, so neither the comparison nor an early exit reveals how much of
//! a digest matched.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::permissions::{Permission, PermissionSet};
use crate::config::{Secret, valid_name};
use crate::swapped::Swapped;
use crate::upstream::scheduler::fair::{CallerShare, CallerShares};

/// Where the callers come from.
#[derive(Debug, Clone)]
pub enum CallersSource {
    /// `CXGW_CALLERS_FILE`: reloaded on SIGHUP and when its content changes.
    File(PathBuf),
    /// `CXGW_CALLERS`: the same TOML inline, for simple setups; fixed for the life of the process.
    Inline(Secret),
}

impl CallersSource {
    /// The setting that names this source, for error messages.
    pub fn setting(&self) -> &'static str {
        match self {
            CallersSource::File(_) => "CXGW_CALLERS_FILE",
            CallersSource::Inline(_) => "CXGW_CALLERS",
        }
    }

    /// Reads the raw text.
    fn read(&self) -> Result<String, String> {
        match self {
            CallersSource::File(path) => std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read `{}`: {error}", path.display())),
            CallersSource::Inline(text) => Ok(text.expose().to_owned()),
        }
    }
}

/// One calling service.
pub struct Caller {
    name: Arc<str>,
    permissions: PermissionSet,
    weight: u32,
    quota_per_minute: Option<u32>,
    segment_write_key_files: Vec<PathBuf>,
}

impl Caller {
    /// The files holding the write keys this caller's Segment libraries present, read by the
    /// Segment intake.
    pub fn segment_write_key_files(&self) -> &[PathBuf] {
        &self.segment_write_key_files
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn permissions(&self) -> PermissionSet {
        self.permissions
    }

    pub fn may(&self, permission: Permission) -> bool {
        self.permissions.contains(permission)
    }

    /// Relative share of the upstream budget when callers compete (1 ..= 1000).
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// Upstream requests this caller may cause per minute and upstream, if capped.
    pub fn quota_per_minute(&self) -> Option<u32> {
        self.quota_per_minute
    }
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("name", &self.name)
            .field("permissions", &self.permissions)
            .field("weight", &self.weight)
            .field("quota_per_minute", &self.quota_per_minute)
            .finish()
    }
}

/// The weight every caller has unless its entry says otherwise.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Upper bound of a weight, so shares stay meaningful and the scheduler's arithmetic small.
pub const MAX_WEIGHT: u32 = 1000;

/// One parsed callers file: every caller, indexed by token digest and by certificate subject.
pub struct CallerTable {
    callers: Vec<Arc<Caller>>,
    tokens: Vec<([u8; 32], usize)>,
    subjects: HashMap<String, usize>,
}

impl fmt::Debug for CallerTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digests are not secrets, but there is nothing to learn from them in a log either.
        f.debug_struct("CallerTable")
            .field("callers", &self.callers)
            .field("tokens", &self.tokens.len())
            .field("subjects", &self.subjects.len())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default, rename = "caller")]
    callers: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    token_sha256: OneOrMany,
    #[serde(default)]
    client_subjects: Vec<String>,
    permissions: Vec<String>,
    weight: Option<u32>,
    quota_per_minute: Option<u32>,
    #[serde(default)]
    segment_write_key_files: Vec<PathBuf>,
}

/// `token_sha256 = "…"` or `token_sha256 = ["…", "…"]` (several during a token rotation).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}

/// SHA-256 of a token, the only form in which tokens are kept.
pub fn token_digest(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Equality of two digests that takes the same time wherever they differ.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        difference |= x ^ y;
    }
    // `black_box` keeps the optimiser from turning the loop back into an early-exit compare.
    std::hint::black_box(difference) == 0
}

fn parse_hex_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let high = (pair[0] as char).to_digit(16)?;
        let low = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(high * 16 + low).ok()?;
    }
    Some(out)
}

impl CallerTable {
    /// Parses and validates a callers file. Errors say which caller and which field is wrong and
    /// never repeat a digest or the file's text.
    pub fn parse(text: &str) -> Result<CallerTable, String> {
        let file: FileFormat = toml::from_str(text).map_err(|error| error.message().to_owned())?;
        if file.callers.is_empty() {
            return Err("no [[caller]] entries".to_owned());
        }
        let mut callers = Vec::with_capacity(file.callers.len());
        let mut tokens = Vec::new();
        let mut subjects = HashMap::new();
        let mut names = HashSet::new();
        for (index, entry) in file.callers.into_iter().enumerate() {
            if !valid_name(&entry.name) {
                return Err(format!(
                    "caller #{}: name must be 1 to 64 letters, digits, `-`, `_` or `.`",
                    index + 1
                ));
            }
            let name = entry.name;
            if !names.insert(name.clone()) {
                return Err(format!("caller `{name}` is listed twice"));
            }
            let mut permissions = PermissionSet::default();
            for permission in &entry.permissions {
                let parsed = Permission::parse(permission).ok_or_else(|| {
                    let known: Vec<&str> = Permission::ALL.iter().map(|p| p.as_str()).collect();
                    format!(
                        "caller `{name}`: unknown permission `{permission}` (known: {})",
                        known.join(", ")
                    )
                })?;
                permissions.insert(parsed);
            }
            let weight = entry.weight.unwrap_or(DEFAULT_WEIGHT);
            if !(1..=MAX_WEIGHT).contains(&weight) {
                return Err(format!(
                    "caller `{name}`: weight must be between 1 and {MAX_WEIGHT}"
                ));
            }
            if entry.quota_per_minute == Some(0) {
                return Err(format!(
                    "caller `{name}`: quota_per_minute must be at least 1 (leave it out for no quota)"
                ));
            }
            let hashes = entry.token_sha256.into_vec();
            if hashes.is_empty()
                && entry.client_subjects.is_empty()
                && entry.segment_write_key_files.is_empty()
            {
                return Err(format!(
                    "caller `{name}`: needs token_sha256, client_subjects or segment_write_key_files to be identified"
                ));
            }
            if entry
                .segment_write_key_files
                .iter()
                .any(|path| path.as_os_str().is_empty())
            {
                return Err(format!(
                    "caller `{name}`: empty path in segment_write_key_files"
                ));
            }
            for (n, hash) in hashes.iter().enumerate() {
                let digest = parse_hex_digest(hash).ok_or_else(|| {
                    format!(
                        "caller `{name}`: token_sha256 #{} is not 64 hexadecimal digits (the SHA-256 of the token)",
                        n + 1
                    )
                })?;
                if tokens
                    .iter()
                    .any(|(known, _)| digests_equal(known, &digest))
                {
                    return Err(format!(
                        "caller `{name}`: token_sha256 #{} is already used by a caller",
                        n + 1
                    ));
                }
                tokens.push((digest, index));
            }
            for subject in entry.client_subjects {
                let subject = subject.trim().to_owned();
                if subject.is_empty() {
                    return Err(format!("caller `{name}`: empty client subject"));
                }
                if subjects.insert(subject.clone(), index).is_some() {
                    return Err(format!(
                        "caller `{name}`: client subject `{subject}` is already used by a caller"
                    ));
                }
            }
            callers.push(Arc::new(Caller {
                name: Arc::from(name),
                permissions,
                weight,
                quota_per_minute: entry.quota_per_minute,
                segment_write_key_files: entry.segment_write_key_files,
            }));
        }
        Ok(CallerTable {
            callers,
            tokens,
            subjects,
        })
    }

    /// The caller whose token this is. Every known digest is compared, in constant time each.
    pub fn by_token(&self, token: &str) -> Option<&Arc<Caller>> {
        let digest = token_digest(token);
        let mut found = None;
        for (known, index) in &self.tokens {
            if digests_equal(known, &digest) {
                found = Some(*index);
            }
        }
        found.and_then(|index| self.callers.get(index))
    }

    /// The caller identified by one of a client certificate's names (CN or SAN).
    pub fn by_subject<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Option<&Arc<Caller>> {
        names
            .into_iter()
            .find_map(|name| self.subjects.get(name))
            .and_then(|index| self.callers.get(*index))
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Caller>> {
        self.callers.iter().find(|caller| &*caller.name == name)
    }

    pub fn len(&self) -> usize {
        self.callers.len()
    }

    /// Every caller, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Caller>> {
        self.callers.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.callers.is_empty()
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The source's content is what is already loaded.
    Unchanged,
    /// A new table is in force for every call from now on.
    Replaced { callers: usize },
}

/// The callers in force, swapped whole on reload: a call sees either the old table or the new
/// one, never a mix, and connections stay open across a reload.
/// The digest is the SHA-256 of the text the table came from, to skip reloads of an unchanged
/// file.
#[derive(Clone)]
pub struct CallerRegistry {
    source: CallersSource,
    table: Swapped<CallerTable>,
}

impl fmt::Debug for CallerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerRegistry")
            .field("setting", &self.source.setting())
            .field("callers", &self.current().len())
            .finish()
    }
}

impl CallerRegistry {
    /// Loads the callers once; an error names the setting and what is wrong.
    pub fn load(source: CallersSource) -> Result<CallerRegistry, String> {
        let text = source.read()?;
        let table = CallerTable::parse(&text)?;
        Ok(CallerRegistry {
            table: Swapped::new(table, token_digest(&text)),
            source,
        })
    }

    pub fn source(&self) -> &CallersSource {
        &self.source
    }

    /// The file being watched, if the callers come from one.
    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            CallersSource::File(path) => Some(path),
            CallersSource::Inline(_) => None,
        }
    }

    /// The table in force.
    pub fn current(&self) -> Arc<CallerTable> {
        self.table.current()
    }

    /// Reads the source again and swaps the table in if its content changed. A file that does not
    /// parse leaves the previous table in force (a typo must not lock every caller out).
    pub fn reload(&self) -> Result<Reloaded, String> {
        let text = self.source.read()?;
        let digest = token_digest(&text);
        if self.table.is_current(&digest) {
            return Ok(Reloaded::Unchanged);
        }
        let table = CallerTable::parse(&text)?;
        let callers = table.len();
        Ok(if self.table.replace(table, digest) {
            Reloaded::Replaced { callers }
        } else {
            Reloaded::Unchanged
        })
    }
}

impl CallerShares for CallerRegistry {
    fn share(&self, caller: &str) -> CallerShare {
        self.current()
            .by_name(caller)
            .map_or_else(CallerShare::default, |caller| CallerShare {
                weight: caller.weight,
                quota_per_minute: caller.quota_per_minute,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(digest: [u8; 32]) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn file(entries: &[(&str, &str, &str)]) -> String {
        entries
            .iter()
            .map(|(name, token, permissions)| {
                format!(
                    "[[caller]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\npermissions = [{permissions}]\n",
                    hex(token_digest(token))
                )
            })
            .collect()
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            hex(token_digest("test")),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn tokens_find_their_caller_and_nothing_else() {
        let table = CallerTable::parse(&file(&[
            ("billing", "tok-billing", "\"read\", \"surveys:send\""),
            ("crm", "tok-crm", "\"customers:write\""),
        ]))
        .unwrap();
        let billing = table.by_token("tok-billing").unwrap();
        assert_eq!(&**billing.name(), "billing");
        assert!(billing.may(Permission::SurveysSend));
        assert!(!billing.may(Permission::CustomersWrite));
        assert_eq!(billing.weight(), DEFAULT_WEIGHT);
        assert_eq!(&**table.by_token("tok-crm").unwrap().name(), "crm");
        assert!(table.by_token("tok-billin").is_none());
        assert!(table.by_token("").is_none());
        assert!(table.by_name("crm").is_some());
    }

    #[test]
    fn several_tokens_subjects_weight_and_quota() {
        let text = format!(
            "[[caller]]\nname = \"a\"\ntoken_sha256 = [\"{}\", \"{}\"]\nclient_subjects = [\"a.svc\", \"spiffe://c/ns/a\"]\npermissions = []\nweight = 3\nquota_per_minute = 20\n",
            hex(token_digest("old")),
            hex(token_digest("new"))
        );
        let table = CallerTable::parse(&text).unwrap();
        assert!(table.by_token("old").is_some());
        assert!(table.by_token("new").is_some());
        let caller = table.by_subject(["x", "spiffe://c/ns/a"]).unwrap();
        assert_eq!(caller.weight(), 3);
        assert_eq!(caller.quota_per_minute(), Some(20));
        assert!(table.by_subject(["b.svc"]).is_none());
    }

    #[test]
    fn bad_files_are_refused_with_a_reason_that_names_the_caller() {
        let digest = hex(token_digest("t"));
        for (text, expected) in [
            (String::new(), "no [[caller]]"),
            (
                format!(
                    "[[caller]]\nname = \"a b\"\ntoken_sha256 = \"{digest}\"\npermissions = []\n"
                ),
                "name must be",
            ),
            (
                format!(
                    "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\npermissions = [\"root\"]\n"
                ),
                "caller `a`: unknown permission `root`",
            ),
            (
                "[[caller]]\nname = \"a\"\ntoken_sha256 = \"abc\"\npermissions = []\n".to_owned(),
                "caller `a`: token_sha256 #1 is not 64",
            ),
            (
                "[[caller]]\nname = \"a\"\npermissions = []\n".to_owned(),
                "needs token_sha256, client_subjects or segment_write_key_files",
            ),
            (
                format!(
                    "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\npermissions = []\nweight = 0\n"
                ),
                "weight must be between",
            ),
            (
                format!(
                    "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\npermissions = []\nquota_per_minute = 0\n"
                ),
                "quota_per_minute must be at least 1",
            ),
            (
                format!(
                    "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\npermissions = []\n[[caller]]\nname = \"b\"\ntoken_sha256 = \"{digest}\"\npermissions = []\n"
                ),
                "caller `b`: token_sha256 #1 is already used",
            ),
            (
                format!(
                    "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\npermissions = []\ntoken = \"x\"\n"
                ),
                "unknown field",
            ),
        ] {
            let error = CallerTable::parse(&text).err().unwrap_or_default();
            assert!(
                error.contains(expected),
                "{error:?} should contain {expected:?}"
            );
            assert!(!error.contains(&digest), "{error}");
        }
    }

    #[test]
    fn reload_swaps_the_table_only_when_the_content_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callers.toml");
        std::fs::write(&path, file(&[("a", "tok-a", "\"read\"")])).unwrap();
        let registry = CallerRegistry::load(CallersSource::File(path.clone())).unwrap();
        let before = registry.current();
        assert!(before.by_token("tok-a").is_some());
        assert_eq!(registry.reload().unwrap(), Reloaded::Unchanged);

        std::fs::write(&path, "[[caller]]\nname = broken").unwrap();
        assert!(registry.reload().is_err());
        assert!(
            registry.current().by_token("tok-a").is_some(),
            "a bad file keeps the previous callers"
        );

        std::fs::write(&path, file(&[("b", "tok-b", "\"read\"")])).unwrap();
        assert_eq!(
            registry.reload().unwrap(),
            Reloaded::Replaced { callers: 1 }
        );
        assert!(registry.current().by_token("tok-a").is_none());
        assert!(registry.current().by_token("tok-b").is_some());
        // Whoever held the old table keeps a consistent view of it.
        assert!(before.by_token("tok-a").is_some());
    }

    #[test]
    fn digest_comparison_is_exact() {
        let a = token_digest("a");
        let mut b = a;
        assert!(digests_equal(&a, &b));
        b[31] ^= 1;
        assert!(!digests_equal(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!digests_equal(&a, &b));
    }
}
