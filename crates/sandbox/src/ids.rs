//! ObjectId-like identifiers: 24 lowercase hex characters drawn from a seeded generator, so the
//! same seed and the same sequence of calls give the same ids.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The id source of one sandbox. Separate from the data generator so that adding a random choice
/// to the seed data does not shift every id.
pub(crate) struct IdGen {
    rng: StdRng,
}

impl IdGen {
    pub(crate) fn new(seed: u64) -> Self {
        IdGen {
            rng: StdRng::seed_from_u64(seed ^ 0x1d5_1d5_1d5),
        }
    }

    pub(crate) fn next(&mut self) -> String {
        let bytes: [u8; 12] = self.rng.random();
        hex(&bytes)
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

/// Whether `raw` has the shape of an id this API hands out.
pub(crate) fn is_object_id(raw: &str) -> bool {
    raw.len() == 24 && raw.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_24_lowercase_hex_and_deterministic() {
        let mut a = IdGen::new(7);
        let mut b = IdGen::new(7);
        for _ in 0..100 {
            let id = a.next();
            assert_eq!(id.len(), 24);
            assert!(
                id.bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
            );
            assert!(is_object_id(&id));
            assert_eq!(id, b.next());
        }
        assert_ne!(IdGen::new(8).next(), IdGen::new(7).next());
    }
}
