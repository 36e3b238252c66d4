#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/seeds/<target>/ (committed).

Each seed is a valid or nearly valid input of its target, so the fuzzer starts from the shapes
the gateway really reads (protobuf requests, upstream JSON, webhook calls, tokens, TOML files)
instead of having to discover them. Run it again after changing a target's input layout.
"""
import base64
import hashlib
import hmac
import json
import os
import shutil
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


# ---- a minimal protobuf writer ----
def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field, wire):
    return varint(field << 3 | wire)


def s(field, text):
    data = text.encode() if isinstance(text, str) else text
    return key(field, 2) + varint(len(data)) + data


def m(field, *parts):
    return s(field, b"".join(parts))


def i(field, n):
    return key(field, 0) + varint(n)


def d(field, x):
    return key(field, 1) + struct.pack("<d", x)


def ts(field, seconds, nanos=0):
    return m(field, i(1, seconds), i(2, nanos) if nanos else b"")


def value(v):
    """google.protobuf.Value"""
    if v is None:
        return i(1, 0)
    if isinstance(v, bool):
        return i(4, int(v))
    if isinstance(v, (int, float)):
        return d(2, float(v))
    if isinstance(v, str):
        return s(3, v)
    if isinstance(v, dict):
        return m(5, struct_(v))
    return m(6, b"".join(m(1, value(x)) for x in v))


def struct_(fields):
    return b"".join(m(1, s(1, k), m(2, value(v))) for k, v in fields.items())


def options(mode=0, key_=""):
    return (i(1, mode) if mode else b"") + (s(2, key_) if key_ else b"")


def write(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def write_requests():
    prop = lambda name, val: m(7, s(1, name), m(2, val))
    customer = m(
        1,
        s(1, "cust-1"), s(2, "Ann@Example.com"), s(3, "Ann"), s(4, "Lee"), s(5, "Acme"),
        s(6, "vip"), prop("plan", s(1, "gold")), prop("seats", i(3, 12)),
        prop("score", d(2, 9.5)), prop("active", i(4, 1)),
        prop("renewal", m(5, i(1, 2025), i(2, 6), i(3, 30))),
        prop("seen", m(6, i(1, 1_700_000_000))), prop("langs", m(7, s(1, "en"), s(1, "de"))),
        s(10, "CTO"), ts(11, 1_700_000_000),
    )
    write("write_requests", "upsert_customers",
          b"\x00" + customer + i(2, 1) + i(2, 2) + m(3, options(1, "key-1")))
    write("write_requests", "delete_customers",
          b"\x01" + m(1, s(1, "cust-1")) + m(1, s(2, "bob@example.com")) + i(2, 1))
    write("write_requests", "unsubscribe",
          b"\x02" + s(1, "ann@example.com") + s(1, "bob@example.com") + s(2, "bye"))
    write("write_requests", "resubscribe", b"\x03" + s(1, "ann@example.com") + m(2, options(2)))
    item = m(3, s(1, "order-1"), m(2, struct_({"sku": "A-1", "qty": 2, "tags": ["x"], "meta": {"k": True}})))
    write("write_requests", "upsert_array_items",
          b"\x04" + m(1, s(1, "cust-1"), s(2, "orders"), item))
    write("write_requests", "delete_array_items",
          b"\x05" + m(1, s(1, "cust-1"), s(2, "orders"), s(3, "order-1")))
    recipient = m(2, s(1, "ann@example.com"), s(2, "Ann"), s(5, "vip"),
                  m(6, s(1, "plan"), m(2, s(1, "gold"))))
    write("write_requests", "send_survey",
          b"\x06" + s(1, "5f1ec45b27b8313876290001") + recipient + i(3, 2) + m(4, options(2, "k")))
    write("write_requests", "set_feedback_tags",
          b"\x07" + s(1, "65a1b2c3d4e5f60718293a4b") + s(2, "billing") + i(3, 1))
    write("write_requests", "set_feedback_topics",
          b"\x08" + s(1, "65a1b2c3d4e5f60718293a4b") + m(2, s(1, "price"), i(2, 3)) + i(3, 2))
    event = lambda name, email: m(
        1, s(1, "cust-1"), s(2, email), s(3, name),
        m(4, struct_({"first_name": "Ann", "tags": "a, b", "plan": "gold", "total": 12.5, "n": 3,
                      "ok": True, "items": [1, "x"], "nested": {"a": None}})),
        ts(5, 1_700_000_000, 5), s(6, "msg-1"))
    write("write_requests", "track_event", b"\x09" + event("signup", "ann@example.com") + m(2, options(2, "msg-1")))
    write("write_requests", "track_event_unmapped", b"\x09" + event("page.viewed", ""))
    write("write_requests", "track_events",
          b"\x0a" + event("order.completed", "ann@example.com") + event("x", ""))
    write("write_requests", "get_customer", b"\x0b" + s(1, "ann@example.com"))
    token = base64.urlsafe_b64encode(b"v1:2:20:cbf29ce484222325").rstrip(b"=").decode()
    write("write_requests", "list_customers",
          b"\x0c" + i(1, 20) + s(2, token) + s(3, "ann@example.com") + ts(4, 1_600_000_000) + i(6, 1))
    write("write_requests", "get_company", b"\x0d" + s(1, "example.com"))
    write("write_requests", "list_companies", b"\x0e" + i(1, 50))


def upstream_json():
    feedback = {
        "id": "65a1b2c3d4e5f60718293a4b", "customerId": "5f1e", "email": "ann@example.com",
        "campaignId": "5f1ec45b27b8313876290001", "score": 9, "comment": "great",
        "createdDate": "2024-01-01T10:00:00.000Z", "metricsType": "NPS", "channel": "email",
        "tags": ["a", "b"], "topics": [{"name": "price", "sentiment": "positive"}],
        "sentiment": "positive", "resolved": "1", "firstName": "Ann", "properties": {"plan": "gold"},
    }
    models = [
        {"id": "5f1e", "email": "ann@example.com", "firstName": "Ann", "tags": "a,b",
         "properties": [{"label": "plan", "type": "string", "value": "gold"}],
         "createdDate": "2024-01-01T00:00:00Z"},
        {"id": "c1", "companyName": "Acme", "domain": "acme.com", "industry": "retail",
         "cxMetrics": {"NPS": 50, "CSAT": "4.5"}, "tags": ["t"]},
        feedback,
        {"id": "5f1ec45b27b8313876290001", "name": "Onboarding", "isActive": True,
         "type": "transactional", "metric": "NPS", "channel": "email"},
        {"id": "t1", "name": "Default", "type": "email", "metric": "NPS"},
        {"nps": 42, "promoters": 10, "passives": "3", "detractors": 2, "total": 15},
        {"id": "s1", "email": "ann@example.com", "campaignId": "c1", "sentDate": 1700000000,
         "status": "delivered", "detailedStatus": {"opened": True}, "sentBy": "campaign",
         "channel": "email"},
        {"campaignId": "c1", "name": "Onboarding", "metric": "NPS",
         "summary": {"score": 40, "responses": 10},
         "deliveryStats": {"sent": 100, "opened": "50"},
         "daily": [{"date": "2024-01-01", "score": 40}]},
        {"label": "plan", "type": "integer", "value": "12"},
        {"event": "feedback.created", "feedback": feedback},
        {"message": "The subscribers.3.email field is required.", "errors": {"subscribers.3.email": ["bad"]}},
        {"detail": [{"loc": ["body", "customers", 2, "email"], "msg": "bad email", "type": "value_error"}],
         "message": "forbidden"},
    ]
    for index, model in enumerate(models):
        write("upstream_json", f"model_{index:02}", bytes([index]) + json.dumps(model).encode())


def webhook():
    item = {"id": "65a1b2c3d4e5f60718293a4b", "createdDate": "2024-01-01T10:00:00Z",
            "email": "ann@example.com", "score": 10, "campaignId": "c1"}
    bodies = [
        {"event": "feedback.created", "feedback": item},
        item,
        {"feedback": [item, item]},
        [{"event": "feedback.created", "feedback": item}, item],
        {"event": "contact.unsubscribed", "email": "ann@example.com"},
    ]
    for index, body in enumerate(bodies):
        data = json.dumps(body).encode()
        write("webhook", f"signed_{index}", bytes([1, 0, 10, 0]) + data)
        extra = b"v0=abc,v1=" + b"00" * 32
        write("webhook", f"signed_extra_{index}", bytes([1, 0xFF, 0xF0, len(extra)]) + extra + data)
    data = json.dumps(bodies[0]).encode()
    t = 1_704_067_200
    tag = hmac.new(b"whsec-fuzz", f"{t}.".encode() + data, hashlib.sha256).hexdigest()
    header = f"t={t},v1={tag}".encode()
    write("webhook", "raw_header", bytes([0, 0, 0, len(header)]) + header + data)


def tokens():
    size = struct.pack(">i", 20)
    fp = "cbf29ce484222325"  # the fingerprint of empty filters
    cursor = bytes([1]) + (7).to_bytes(8, "big") + (42).to_bytes(8, "big")
    write("tokens", "stream_cursor", bytes([0]) + size + b"\x00" + cursor)
    write("tokens", "stream_cursor_text", bytes([1]) + size + b"\x00" + base64.urlsafe_b64encode(cursor).rstrip(b"="))
    write("tokens", "page", bytes([2]) + size + b"\x00" + f"v1:40:20:{fp}".encode())
    write("tokens", "pinned_page", bytes([4]) + size + b"\x00" + f"v1:40:20:{fp}:1704067100000".encode())
    write("tokens", "list", bytes([6]) + size + b"\x00" + f"u1:3:20:1704067200001:1704067000:{fp}".encode())
    write("tokens", "list_filters", bytes([6]) + size + b"email=a@b.c\x00" + b"u1:2:50:1:1704067000:0")
    subscribe = m(1, s(1, "c1"), i(2, 1), i(3, 1), d(4, 0.0), d(5, 10.0), i(6, 1)) + s(2, base64.urlsafe_b64encode(cursor).rstrip(b"=").decode())
    write("tokens", "subscribe", bytes([8]) + size + b"\x00" + subscribe)
    write("tokens", "subscribe_time", bytes([8]) + size + b"\x00" + ts(3, 1_700_000_000))


def config_files():
    config = """\
grpc_addr = "127.0.0.1:50051"
admin_addr = "127.0.0.1:9090"
retently_api_key = "retently-key-0123456789"
retainly_api_key = "retainly-key-0123456789"
retainly_api_secret = "retainly-secret-0123456789"
retently_base_url = "https://app.retently.com"
retently_requests_per_minute = 150
trusted_mesh = true
log_format = "json"
event_mappings = "signup=5f1ec45b27b8313876290001;order.completed=c2,c3"
webhook_secret = "hook-secret-0123456789"
webhook_signing_secret = "signing-secret-0123456789"
reload_interval = "10s"
feedback_sync = true
feedback_poll_interval = "30s"
feedback_retention = "30d"
feedback_subscriber_buffer = 256
webhook_tolerance = "5m"
webhook_max_body_bytes = 1048576
max_message_bytes = 4194304
max_concurrent_streams = 200
shutdown_grace = "20s"
idempotency_window = "24h"
outbox_retry_window = "4h"
data_dir = "/var/lib/cx-gateway"
tls_client_auth = "none"
"""
    write("config_files", "config_real", b"\x01" + config.encode())
    write("config_files", "config_sandbox", b"\x03" + b'grpc_addr = "127.0.0.1:0"\nmax_concurrent_streams = 100\n')
    digest = hashlib.sha256(b"token-1").hexdigest()
    callers = f"""\
[[caller]]
name = "billing"
token_sha256 = "{digest}"
permissions = ["read", "customers:write", "surveys:send", "deliveries:read"]
weight = 2
quota_per_minute = 600

[[caller]]
name = "reports"
token_sha256 = ["{hashlib.sha256(b'token-2').hexdigest()}"]
client_subjects = ["spiffe://cluster/ns/reports"]
"""
    write("config_files", "callers", b"\x00" + callers.encode())
    event_rules = """\
[[rule]]
id = "order-nps"
events = ["Order Placed", "order.completed"]
campaign = "5f1ec45b27b8313876290001"
sample_percent = 20
delay_days = 2
throttle_days = 30
cooldown = "14d"
audience = { all = [
  { trait = "country", in = ["US", "CA"] },
  { any = [ { trait = "plan", eq = "pro" }, { property = "total", gte = 100 } ] },
  { property = "coupon", exists = false },
  { trait = "created_at", before = "2026-01-01T00:00:00Z" },
] }

[[rule]]
id = "renewal"
events = ["Renewed"]
campaign = "c2"
audience = { property = "plan", ne = "free" }
"""
    # (2 / 2) % 3 == 1: the event rules file.
    write("config_files", "event_rules", b"\x02" + event_rules.encode())
    alert_rules = """\
[[rule]]
name = "nps-detractors"
on = ["created", "updated"]
metrics = ["NPS"]
categories = ["detractor"]
score_min = 0
score_max = 6
campaigns = ["5f1ec45b27b8313876290001"]
tags = ["churn-risk"]
comment = "present"
comment_contains = ["cancel", "refund"]
customer_properties = { plan = "enterprise" }
format = "slack"
url = "https://hooks.slack.example/services/T000/B000/XXXXXXXX"
rate_limit = { count = 10, per = "1h" }
"""
    # (4 / 2) % 3 == 2: the alert rules file (signed-json needs a secret file, which the target
    # does not read).
    write("config_files", "alert_rules", b"\x04" + alert_rules.encode())


if __name__ == "__main__":
    shutil.rmtree(ROOT, ignore_errors=True)
    write_requests()
    upstream_json()
    webhook()
    tokens()
    config_files()
