#!/usr/bin/env python3
"""Runs the README's recipe for verifying a signed alert against a real delivery.

Usage: verify_alert.py SECRET_FILE HEADER_FILE BODY_FILE

The alert integration test (tests/it/alerts.rs) writes the Cx-Signature header and the body of
an alert the gateway delivered, and runs this script: the recipe must accept the delivery and
reject a forged signature, a changed body and a replay outside the tolerance.
"""

import pathlib
import sys

# [START verify_alert]
import hashlib
import hmac
import time


def verify_alert(secret: bytes, header: str, body: bytes, tolerance: int = 300) -> bool:
    """True when the Cx-Signature `header` signs the raw request `body` with `secret`."""
    fields = dict(part.strip().partition("=")[::2] for part in header.split(","))
    timestamp, signature = fields.get("t", ""), fields.get("v1", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance:
        return False  # no timestamp, or too old or too new: a replay
    signed = timestamp.encode() + b"." + body
    expected = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)
# [END verify_alert]


def main() -> int:
    secret_file, header_file, body_file = (pathlib.Path(arg) for arg in sys.argv[1:4])
    secret = secret_file.read_text().strip().encode()
    header = header_file.read_text().strip()
    body = body_file.read_bytes()
    timestamp = int(dict(part.partition("=")[::2] for part in header.split(","))["t"])
    forged = "t={},v1={}".format(
        timestamp, hmac.new(b"not-the-secret", str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    )
    real_time = time.time
    cases = [
        ("valid", lambda: verify_alert(secret, header, body), True),
        ("forged", lambda: verify_alert(secret, forged, body), False),
        ("tampered", lambda: verify_alert(secret, header, body.replace(b"detractor", b"promoter") + b" "), False),
    ]
    failures = 0
    for name, check, expected in cases:
        outcome = check()
        print(f"{name}: {'accepted' if outcome else 'rejected'}")
        failures += outcome != expected
    # The same delivery presented again later than the tolerance allows.
    time.time = lambda: real_time() + 301
    try:
        outcome = verify_alert(secret, header, body)
    finally:
        time.time = real_time
    print(f"replayed: {'accepted' if outcome else 'rejected'}")
    failures += outcome
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
