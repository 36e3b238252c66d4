//! Webhook bodies and signatures. The input is `flags | skew (2 bytes) | header length | header |
//! body`. With flag bit 0 the target signs the body itself (so bodies reach the reader behind a
//! valid signature) and appends the fuzzed header as extra, unknown or rotated parts; otherwise
//! the fuzzed header is the whole signature header.
//!
//! Checked besides "no panic": a correct signature within the tolerance is accepted and one
//! outside it is stale, whatever else the header holds; an accepted body yields at most 1000
//! responses, each with the id and creation time the log needs.
#![no_main]

use std::fmt::Write as _;
use std::time::Duration;

use cx_gateway::feedback::webhook::{Rejection, read_body, verify_signature};
use libfuzzer_sys::fuzz_target;
use ring::hmac;

const SECRET: &[u8] = b"whsec-fuzz";
const NOW: i64 = 1_704_067_200;
const TOLERANCE: Duration = Duration::from_secs(300);

fuzz_target!(|data: &[u8]| {
    let [flags, skew_high, skew_low, header_len, rest @ ..] = data else {
        return;
    };
    let header_len = usize::from(*header_len).min(rest.len());
    let (header, body) = rest.split_at(header_len);
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET);
    // Up to ±9 hours around the tolerance, to land on both sides of it.
    let skew = i64::from(i16::from_be_bytes([*skew_high, *skew_low]));

    if flags & 1 == 1 {
        let timestamp = NOW + skew;
        let mut signed = timestamp.to_string().into_bytes();
        signed.push(b'.');
        signed.extend_from_slice(body);
        let tag = hmac::sign(&key, &signed);
        let mut value = format!("t={timestamp},v1=");
        for byte in tag.as_ref() {
            let _ = write!(value, "{byte:02x}");
        }
        // Extra parts: only well-formed `name=value` ones keep the header readable.
        let extra = String::from_utf8_lossy(header);
        let extra_ok = extra.split(',').all(|part| {
            part.trim()
                .split_once('=')
                .is_some_and(|(name, value)| match name.trim() {
                    "t" => false,
                    "v1" => {
                        let value = value.trim();
                        value.len() % 2 == 0
                            && value.len() <= 128
                            && value.bytes().all(|b| b.is_ascii_hexdigit())
                    }
                    _ => true,
                })
        });
        if !extra.is_empty() {
            value.push(',');
            value.push_str(&extra);
        }
        let verdict = verify_signature(&key, Some(value.as_bytes()), body, NOW, TOLERANCE);
        if extra.is_empty() || extra_ok {
            let expected = if skew.unsigned_abs() > TOLERANCE.as_secs() {
                Err(Rejection::Stale)
            } else {
                Ok(())
            };
            assert_eq!(verdict, expected, "a correct signature was judged wrongly");
        }
        if verdict.is_ok() {
            read(body);
        }
    } else {
        let verdict = verify_signature(&key, Some(header), body, NOW, TOLERANCE);
        if verdict.is_ok() {
            read(body);
        }
        // Unauthenticated paths of the receiver read no body; the reader must still hold up.
        read(body);
    }
});

fn read(body: &[u8]) {
    if let Ok(observed) = read_body(body) {
        assert!(observed.len() <= 1000, "too many responses in one call");
        for item in observed {
            assert!(!item.feedback_id.is_empty(), "a response without an id");
            assert!(!item.payload.is_empty(), "a response without a payload");
        }
    }
}
