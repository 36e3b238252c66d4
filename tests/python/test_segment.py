"""Segment's own Python library (segment-analytics-python from PyPI) against the gateway's
Segment intake: the library is configured with the gateway's host and a write key and nothing
else, exactly as a team would point an existing integration at the gateway.

It starts the built binary twice: `cx-gateway sandbox` (the upstream emulator, whose admin
endpoints show what reached Retently and Retainly) and `cx-gateway serve` against it with the
intake on, one caller with a write key file, and a survey mapped to the `Order Placed` event.

Usage: test_segment.py path/to/cx-gateway
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request
import uuid

from segment.analytics import Client
from segment.analytics.request import APIError

BINARY = None
WRITE_KEY = "wk-python-" + uuid.uuid4().hex
# How long the outbox may take to deliver (it delivers within a second when idle).
DELIVERY_WAIT = 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def wait_until(what, condition, limit=60):
    """Polls `condition` (effects in another process announce themselves through no signal)."""
    deadline = time.monotonic() + limit
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def answers(url):
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


class SegmentLibraryTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="cxgw-segment-")
        root = pathlib.Path(cls.dir.name)
        sandbox_port, grpc_port, admin_port, segment_port = (free_port() for _ in range(4))
        cls.sandbox = f"http://127.0.0.1:{sandbox_port}"
        env = {"PATH": os.environ.get("PATH", ""), "CXGW_LOG_FORMAT": "json"}
        cls.logs = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        cls.processes = [
            subprocess.Popen(
                [BINARY, "sandbox"],
                env={**env, "CXGW_SANDBOX_ADDR": f"127.0.0.1:{sandbox_port}"},
                stdout=cls.logs[0],
                stderr=subprocess.STDOUT,
            )
        ]
        wait_until("the sandbox", lambda: answers(f"{cls.sandbox}/_sandbox/stats"))
        campaigns = get_json(f"{cls.sandbox}/_sandbox/retently/campaigns")["campaigns"]
        cls.campaign = next(
            c["id"] for c in campaigns if c["isActive"] and c["type"] == "transactional" and c["metric"] == "NPS"
        )

        key_file = root / "web.key"
        key_file.write_text(WRITE_KEY + "\n")
        (root / "callers.toml").write_text(
            f"""[[caller]]
name = "web-shop"
permissions = ["events:write", "customers:write"]
segment_write_key_files = ["{key_file}"]
"""
        )
        (root / "data").mkdir()
        cls.processes.append(
            subprocess.Popen(
                [BINARY, "serve"],
                env={
                    **env,
                    "CXGW_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
                    "CXGW_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
                    "CXGW_SEGMENT_LISTEN_ADDR": f"127.0.0.1:{segment_port}",
                    "CXGW_DATA_DIR": str(root / "data"),
                    "CXGW_CALLERS_FILE": str(root / "callers.toml"),
                    "CXGW_EVENT_MAPPINGS": f"Order Placed={cls.campaign}",
                    "CXGW_RETENTLY_BASE_URL": cls.sandbox,
                    "CXGW_RETAINLY_BASE_URL": cls.sandbox,
                    "CXGW_RETENTLY_API_KEY": "sandbox-retently-key",
                    "CXGW_RETAINLY_API_KEY": "sandbox-retainly-key",
                    "CXGW_RETAINLY_API_SECRET": "sandbox-retainly-secret",
                },
                stdout=cls.logs[1],
                stderr=subprocess.STDOUT,
            )
        )
        wait_until("the gateway", lambda: answers(f"http://127.0.0.1:{admin_port}/readyz"))
        # An existing Segment integration, pointed at the gateway: only `host` changes.
        cls.client = Client(WRITE_KEY, host=f"http://127.0.0.1:{segment_port}", sync_mode=True, max_retries=0)
        cls.host = f"http://127.0.0.1:{segment_port}"

    @classmethod
    def tearDownClass(cls):
        for process in reversed(cls.processes):
            process.terminate()
            process.wait(timeout=60)
        for log in cls.logs:
            log.seek(0)
            text = log.read().decode(errors="replace")
            assert WRITE_KEY not in text, "the write key leaked into a log"
        cls.dir.cleanup()

    def events_of(self, user):
        events = get_json(f"{self.sandbox}/_sandbox/retainly/events")["events"]
        return [e for e in events if e["customerId"] == user]

    def test_identify_and_track_reach_both_upstreams_and_the_mapped_survey(self):
        write_key, intake = WRITE_KEY, self.host
        # [START segment_python]
        analytics = Client(write_key, host=intake)
        analytics.identify("py-1", {"email": "py.one@example.com", "firstName": "Py", "plan": "team"})
        analytics.track("py-1", "Order Placed", {"email": "py.one@example.com", "total": 99})
        analytics.flush()  # waits until the queued messages were sent
        # [END segment_python]
        analytics.shutdown()
        wait_until(
            "the customer at both upstreams",
            lambda: any(c["email"] == "py.one@example.com" for c in get_json(f"{self.sandbox}/_sandbox/retently/customers")["customers"])
            and answers(f"{self.sandbox}/_sandbox/retainly/customers/py-1"),
        )
        retainly = get_json(f"{self.sandbox}/_sandbox/retainly/customers/py-1")
        self.assertEqual(retainly["fields"]["plan"], "team")
        events = wait_until("the event", lambda: self.events_of("py-1"))
        self.assertEqual(events[0]["event"], "Order Placed")
        sends = wait_until(
            "the mapped survey",
            lambda: [
                s
                for s in get_json(f"{self.sandbox}/_sandbox/retently/surveys")["sends"]
                if "py.one@example.com" in s["recipients"]
            ],
        )
        self.assertEqual(sends[0]["campaignId"], self.campaign)

    def test_a_batch_from_the_queueing_client_with_gzip(self):
        # The library's default mode: a background thread sends the queued messages as one
        # batch, here gzip-compressed.
        errors = []
        client = Client(
            WRITE_KEY,
            host=self.host,
            gzip=True,
            upload_size=10,
            max_retries=0,
            on_error=lambda error, batch: errors.append(error),
        )
        for n in range(5):
            client.track("py-batch", f"Step {n}", {"n": n})
        client.identify("py-batch", {"email": "py.batch@example.com", "name": "Bat Ch"})
        client.page("py-batch", "Docs", "Home")
        client.shutdown()
        self.assertEqual(errors, [])
        events = wait_until("five events", lambda: len(self.events_of("py-batch")) == 5 and self.events_of("py-batch"))
        self.assertEqual([e["event"] for e in events], [f"Step {n}" for n in range(5)])
        wait_until("the batch's identify", lambda: answers(f"{self.sandbox}/_sandbox/retainly/customers/py-batch"))

    def test_a_wrong_write_key_is_refused(self):
        client = Client("wk-not-a-key", host=self.host, sync_mode=True, max_retries=0)
        with self.assertRaises(APIError) as raised:
            client.track("py-wrong", "Anything")
        self.assertEqual(raised.exception.status, 401)
        self.assertEqual(raised.exception.code, "invalid_write_key")

    def test_a_repeated_message_id_makes_no_second_upstream_call(self):
        message_id = str(uuid.uuid4())
        for _ in range(3):
            self.client.track("py-dup", "Trial Started", {"plan": "pro"}, message_id=message_id)
        # One more event of the same customer: the outbox delivers a customer's events in order,
        # so once it arrived, any duplicate queued before it would have arrived too.
        self.client.track("py-dup", "Trial Ended")
        events = wait_until("the second event", lambda: len(self.events_of("py-dup")) >= 2 and self.events_of("py-dup"))
        self.assertEqual([e["event"] for e in events], ["Trial Started", "Trial Ended"])


if __name__ == "__main__":
    BINARY = str(pathlib.Path(sys.argv.pop(1)).resolve())
    unittest.main(verbosity=2)
