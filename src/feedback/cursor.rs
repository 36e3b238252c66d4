//! Stream cursors: opaque to callers, a small versioned struct to the gateway.
//!
//! A cursor is base64url (no padding) of `version (1 byte) | log epoch (8 bytes, big endian) |
//! sequence (8 bytes, big endian)`: 23 characters. The epoch is drawn once when the log is
//! created, so a cursor of another data directory (a wiped or different gateway) is refused
//! instead of silently meaning another position. A new layout takes a new version byte; old
//! cursors stay readable.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const VERSION_1: u8 = 1;
const V1_LEN: usize = 1 + 8 + 8;

/// A position in the feedback log: every entry with a sequence up to `sequence` is behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub sequence: i64,
}

/// Why a cursor string was refused; the text is meant for a field violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("is not a cursor issued by this gateway")]
    Malformed,
    #[error("was issued by another feedback log (a different or reset data directory)")]
    OtherLog,
    #[error("is ahead of the feedback log")]
    Ahead,
}

impl Cursor {
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; V1_LEN];
        bytes[0] = VERSION_1;
        bytes[1..9].copy_from_slice(&self.epoch.to_be_bytes());
        bytes[9..].copy_from_slice(&self.sequence.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Parses a cursor without checking which log it belongs to.
    pub fn decode(text: &str) -> Result<Cursor, CursorError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text.as_bytes())
            .map_err(|_| CursorError::Malformed)?;
        match bytes.first() {
            Some(&VERSION_1) if bytes.len() == V1_LEN => {
                let mut epoch = [0u8; 8];
                epoch.copy_from_slice(&bytes[1..9]);
                let mut sequence = [0u8; 8];
                sequence.copy_from_slice(&bytes[9..]);
                let sequence = i64::from_be_bytes(sequence);
                if sequence < 0 {
                    return Err(CursorError::Malformed);
                }
                Ok(Cursor {
                    epoch: u64::from_be_bytes(epoch),
                    sequence,
                })
            }
            _ => Err(CursorError::Malformed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_stays_short() {
        let cursor = Cursor {
            epoch: 0xdead_beef_0bad_f00d,
            sequence: 1_234_567,
        };
        let text = cursor.encode();
        assert_eq!(text.len(), 23);
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(Cursor::decode(&text), Ok(cursor));
    }

    #[test]
    fn refuses_what_it_did_not_issue() {
        for bad in ["", "abc", "!!!!", "AgAAAAAAAAAAAAAAAAAAAAA", "AQ"] {
            assert_eq!(Cursor::decode(bad), Err(CursorError::Malformed), "{bad}");
        }
        let negative = URL_SAFE_NO_PAD.encode([[1u8].as_slice(), &[0; 8], &[0xff; 8]].concat());
        assert_eq!(Cursor::decode(&negative), Err(CursorError::Malformed));
    }
}
