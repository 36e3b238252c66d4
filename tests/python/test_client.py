"""A Python service calling the gateway through stubs generated from proto/ with grpcio-tools.

Proof that polyglot stubs work: it generates the stubs into a temporary directory, starts the
built binary with `serve --sandbox` on free loopback ports, and makes real calls, decoding the
google.rpc error details of a bad request the way any gRPC client would.

The regions between `[START name]` and `[END name]` are the Python snippets of docs/clients.md
(scripts/check-doc-snippets.py keeps them equal).

Usage: test_client.py path/to/cx-gateway
"""

import hashlib
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = None
GEN = tempfile.mkdtemp(prefix="cxgw-stubs-")


# [START python_stubs]
def generate_stubs():
    """Generates cx/gateway/v1/*_pb2.py and *_pb2_grpc.py from the contract with grpcio-tools."""
    proto_root = ROOT / "proto"
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    # grpcio-tools ships the well-known types (google/protobuf/*.proto) the contract imports.
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={GEN}", f"--grpc_python_out={GEN}", *files]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with {code}")
    sys.path.insert(0, GEN)
# [END python_stubs]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        generate_stubs()
        grpc_port, admin_port = free_port(), free_port()
        # One registered caller, so the gateway checks the token every call sends.
        token = secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        callers = f"""[[caller]]
name = "python-client"
token_sha256 = ["{digest}"]
permissions = ["read", "customers:write", "events:write", "deliveries:read", "deliveries:retry", "feedback:subscribe"]
"""
        env = dict(os.environ)
        env.update(
            CXGW_GRPC_ADDR=f"127.0.0.1:{grpc_port}",
            CXGW_ADMIN_ADDR=f"127.0.0.1:{admin_port}",
            CXGW_LOG_FORMAT="json",
            CXGW_CALLERS=callers,
            # Frequent polls and heartbeats, so the feedback log is filled soon and says so.
            CXGW_FEEDBACK_POLL_INTERVAL="200ms",
            CXGW_FEEDBACK_HEARTBEAT_INTERVAL="200ms",
        )
        cls.log = tempfile.TemporaryFile()
        cls.process = subprocess.Popen([BINARY, "serve", "--sandbox"], env=env, stdout=cls.log, stderr=subprocess.STDOUT)
        address = f"127.0.0.1:{grpc_port}"
        # [START python_channel]
        # The gateway's published service config: per-method timeouts, and retries where they are
        # safe, paced by the gateway's grpc-retry-pushback-ms (its RetryInfo delay).
        service_config = (ROOT / "clients" / "service-config.json").read_text()
        channel = grpc.insecure_channel(address, options=[("grpc.service_config", service_config)])
        # Every call names its caller with a bearer token (never logged by the gateway).
        auth = [("authorization", f"Bearer {token}")]
        # [END python_channel]
        cls.channel, cls.auth = channel, auth
        # Readiness is a signal the channel gives: wait for the connection, bounded.
        grpc.channel_ready_future(cls.channel).result(timeout=60)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.process.terminate()
        cls.process.wait(timeout=60)

    def test_health_is_serving(self):
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service="cx.gateway.v1.DeliveryService"))
        self.assertEqual(response.status, health_pb2.HealthCheckResponse.SERVING)

    def test_dead_letter_list_starts_empty(self):
        from cx.gateway.v1 import delivery_service_pb2 as d, delivery_service_pb2_grpc as dg

        stub = dg.DeliveryServiceStub(self.channel)
        auth = self.auth
        # [START python_unary]
        response = stub.ListDeadLetters(d.ListDeadLettersRequest(page_size=10), metadata=auth, timeout=10)
        # [END python_unary]
        self.assertEqual(len(response.deliveries), 0)
        self.assertEqual(response.total_size, 0)
        self.assertEqual(response.next_page_token, "")

    def test_unknown_delivery_is_not_found_with_error_info(self):
        from cx.gateway.v1 import delivery_service_pb2 as d, delivery_service_pb2_grpc as dg

        stub = dg.DeliveryServiceStub(self.channel)
        with self.assertRaises(grpc.RpcError) as raised:
            stub.GetDelivery(d.GetDeliveryRequest(delivery_id="dlv_unknown"), metadata=self.auth, timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.NOT_FOUND)
        info = self._detail(raised.exception, error_details_pb2.ErrorInfo)
        self.assertEqual(info.reason, "DELIVERY_NOT_FOUND")
        self.assertEqual(info.domain, "cx-gateway")

    def test_bad_input_is_invalid_argument_with_field_violations(self):
        from cx.gateway.v1 import delivery_service_pb2 as d, delivery_service_pb2_grpc as dg

        stub = dg.DeliveryServiceStub(self.channel)
        request = d.RetryDeadLettersRequest(delivery_ids=["dlv_a", "dlv_a"], method="x")
        auth = self.auth
        # [START python_error_details]
        try:
            stub.RetryDeadLetters(request, metadata=auth, timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            info = error_detail(error, error_details_pb2.ErrorInfo)
            bad_request = error_detail(error, error_details_pb2.BadRequest)
            fields = sorted(v.field for v in bad_request.field_violations)
        # [END python_error_details]
        self.assertEqual((info.domain, info.reason), ("cx-gateway", "INVALID_FIELDS"))
        self.assertEqual(fields, ["delivery_ids[1]", "method"])

    def test_a_call_without_the_token_is_unauthenticated(self):
        from cx.gateway.v1 import delivery_service_pb2 as d, delivery_service_pb2_grpc as dg

        stub = dg.DeliveryServiceStub(self.channel)
        with self.assertRaises(grpc.RpcError) as raised:
            stub.ListDeadLetters(d.ListDeadLettersRequest(page_size=10), timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.UNAUTHENTICATED)
        info = error_detail(raised.exception, error_details_pb2.ErrorInfo)
        self.assertEqual(info.reason, "CALLER_UNAUTHENTICATED")

    def test_a_thousand_bad_items_fit_a_c_core_client(self):
        # gRPC C-core refuses trailers over 16 KiB and reports RESOURCE_EXHAUSTED without
        # details; the gateway caps the details so this client sees them.
        from cx.gateway.v1 import customer_service_pb2 as c, customer_service_pb2_grpc as cg
        from cx.gateway.v1 import common_pb2

        stub = cg.CustomerServiceStub(self.channel)
        customers = [
            c.Customer(customer_id=f"c{i}", email=f"not-an-address-{i}") for i in range(1000)
        ]
        with self.assertRaises(grpc.RpcError) as raised:
            stub.UpsertCustomers(
                c.UpsertCustomersRequest(
                    customers=customers,
                    destinations=[common_pb2.DESTINATION_RETENTLY],
                ),
                metadata=self.auth,
                timeout=10,
            )
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        bad_request = self._detail(raised.exception, error_details_pb2.BadRequest)
        self.assertEqual(len(bad_request.field_violations), 50)
        self.assertEqual(bad_request.field_violations[0].field, "customers[0].email")
        info = self._detail(raised.exception, error_details_pb2.ErrorInfo)
        self.assertEqual(info.metadata["violations"], "1000")
        self.assertEqual(info.metadata["violations_omitted"], "950")

    def test_an_undecodable_message_is_invalid_argument(self):
        send_raw = self.channel.unary_unary("/cx.gateway.v1.EventService/TrackEvent")
        with self.assertRaises(grpc.RpcError) as raised:
            send_raw(b"\xff\xff\xff\xff", metadata=self.auth, timeout=10)
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        info = self._detail(raised.exception, error_details_pb2.ErrorInfo)
        self.assertEqual(info.reason, "MALFORMED_REQUEST")
        self.assertEqual(info.domain, "cx-gateway")

    def test_customer_history_comes_from_the_feedback_log(self):
        from cx.gateway.v1 import feedback_stream_pb2 as f, feedback_stream_pb2_grpc as fg
        from cx.gateway.v1 import survey_service_pb2 as s, survey_service_pb2_grpc as sg

        # A heartbeat with a sync time says the log holds a complete poll.
        stream = fg.FeedbackStreamStub(self.channel).Subscribe(f.SubscribeRequest(), metadata=self.auth, timeout=60)
        for message in stream:
            if message.WhichOneof("payload") == "heartbeat" and message.heartbeat.HasField("sync_time"):
                break
        stream.cancel()

        stub = sg.SurveyServiceStub(self.channel)
        # The newest seeded response of the last 23 hours lies within the log's first backfill.
        listed = s.ListFeedbackRequest(page_size=1)
        listed.start_time.FromSeconds(int(time.time()) - 23 * 3600)
        newest = stub.ListFeedback(listed, metadata=self.auth, timeout=30).feedback[0]
        history = stub.GetCustomerFeedbackHistory(
            s.GetCustomerFeedbackHistoryRequest(email=newest.email.upper(), page_size=100),
            metadata=self.auth,
            timeout=10,
        )
        self.assertTrue(history.HasField("synced_until"))
        self.assertIn(newest.feedback_id, [item.feedback_id for item in history.feedback])
        self.assertEqual({item.email.lower() for item in history.feedback}, {newest.email.lower()})
        times = [item.create_time.ToMilliseconds() for item in history.feedback]
        self.assertEqual(times, sorted(times, reverse=True))
        self.assertEqual(sum(summary.response_count for summary in history.summaries), history.total_size)

        with self.assertRaises(grpc.RpcError) as raised:
            stub.GetCustomerFeedbackHistory(
                s.GetCustomerFeedbackHistoryRequest(email=newest.email, page_token="Zm9yZ2Vk"),
                metadata=self.auth,
                timeout=10,
            )
        self.assertEqual(raised.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        bad_request = self._detail(raised.exception, error_details_pb2.BadRequest)
        self.assertEqual([v.field for v in bad_request.field_violations], ["page_token"])

    def _detail(self, error, message_type):
        detail = error_detail(error, message_type)
        self.assertIsNotNone(detail, f"no {message_type.DESCRIPTOR.name} in the error details")
        return detail


# [START python_error_detail]
def error_detail(error, message_type):
    """The detail of `message_type` (ErrorInfo, BadRequest, RetryInfo...) of a failed call, or None."""
    status = rpc_status.from_call(error)  # decodes grpc-status-details-bin
    for any_detail in status.details if status else []:
        if any_detail.Is(message_type.DESCRIPTOR):
            detail = message_type()
            any_detail.Unpack(detail)
            return detail
    return None
# [END python_error_detail]


if __name__ == "__main__":
    BINARY = str(pathlib.Path(sys.argv.pop(1)).resolve())
    unittest.main(verbosity=2)
