//! A value read from files that a reload swaps whole: a reader gets one version or the next,
//! never a mix, and keeps the version it got for as long as it holds it (an evaluation, a call).
//! The callers file and the alert rules file are kept this way.

use std::sync::{Arc, PoisonError, RwLock};

/// The version in force of a reloadable value, with the digest of what it was read from, so a
/// reload of unchanged content swaps nothing.
pub struct Swapped<T> {
    state: Arc<RwLock<Version<T>>>,
}

struct Version<T> {
    value: Arc<T>,
    digest: [u8; 32],
}

impl<T> Clone for Swapped<T> {
    fn clone(&self) -> Self {
        Swapped {
            state: Arc::clone(&self.state),
        }
    }
}

impl<T> Swapped<T> {
    /// `value`, read from content whose digest is `digest`.
    pub fn new(value: T, digest: [u8; 32]) -> Swapped<T> {
        Swapped {
            state: Arc::new(RwLock::new(Version {
                value: Arc::new(value),
                digest,
            })),
        }
    }

    /// The version in force.
    pub fn current(&self) -> Arc<T> {
        // Readers only clone an `Arc` under the lock, so a poisoned lock still holds a whole
        // version.
        Arc::clone(
            &self
                .state
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .value,
        )
    }

    /// Whether the version in force was read from content with this digest.
    pub fn is_current(&self, digest: &[u8; 32]) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .digest
            == *digest
    }

    /// Puts `value` in force unless the version in force came from the same content; whether
    /// it did.
    pub fn replace(&self, value: T, digest: [u8; 32]) -> bool {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.digest == digest {
            return false;
        }
        *state = Version {
            value: Arc::new(value),
            digest,
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_swaps_only_changed_content_and_readers_keep_their_version() {
        let swapped = Swapped::new("one", [1; 32]);
        let held = swapped.current();
        assert!(swapped.is_current(&[1; 32]));
        assert!(!swapped.replace("again", [1; 32]));
        assert_eq!(*swapped.current(), "one");
        assert!(swapped.replace("two", [2; 32]));
        assert_eq!(*swapped.clone().current(), "two");
        assert!(!swapped.is_current(&[1; 32]));
        assert_eq!(*held, "one");
    }
}
