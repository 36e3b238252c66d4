"""Every dashboard query and every alert expression, evaluated by a real Prometheus.

Starts, on free loopback ports: the upstream emulator (`cx-gateway sandbox`), the gateway
(`cx-gateway serve` against it, with two callers, a webhook secret, a short retry window and a
1 s feedback poll) and Debian's `prometheus` scraping the gateway's /metrics every second with
the labels the ServiceMonitor gives (namespace "cx", job "cxgw-cx-gateway") and loading the
rendered alerting rules. Then drives a short scenario: a crowd of SendSurvey calls from two
callers, reads beyond a small budget, asynchronous writes while the emulator injects 5xx answers
and a 429 burst, a FeedbackStream subscription replaying the log, refused and accepted webhook
calls. Last, it evaluates through Prometheus's HTTP API every panel target of the dashboard (the
Grafana variables replaced by the test's values), the dashboard's variable queries and every
alert expression: each must parse, and every panel must return data. A renamed metric or label
fails it.

Usage: live.py GATEWAY_BINARY RENDERED_DIR (the directory render.py wrote).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

NAMESPACE = "cx"
JOB = "cxgw-cx-gateway"
POD = "cxgw-cx-gateway-0"
# What Grafana would put in place of the dashboard's variables for this installation.
VARIABLES = {
    "$__rate_interval": "30s",
    "$__interval": "1s",
    "$namespace": NAMESPACE,
    "$job": JOB,
}
# Alerts whose condition the scenario itself creates (writes given up, reads beyond the budget):
# their expressions must see it, which proves their label matchers against real series, not only
# their syntax. CxGatewayUpstreamErrors is not among them: a 5xx series is born with its first
# answer and the circuit breaker ends the burst within a scrape or two, so its rate over the
# scenario depends on where the scrapes fall; promtool's firing and silent cases cover it.
SCENARIO_ALERTS = {
    "CxGatewayDeadLettersIncreasing",
    "CxGatewayRequestsShed",
}
# How long the scenario's effects may take to show in Prometheus; the loop ends as soon as every
# panel has data, so this bounds a failure, not a pass.
DATA_DEADLINE_SECONDS = 120
TOKENS = {"crm": "crm-token-5b1f0e", "billing": "billing-token-a73c22"}
WEBHOOK_SECRET = "webhook-secret-for-the-live-check"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: object | None = None, headers: dict[str, str] | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            return response.status, (json.loads(text) if text.strip().startswith(("{", "[")) else text)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_until(what: str, ready, deadline_seconds: float, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not ready after {deadline_seconds} s")


class Stack:
    """The three processes, stopped (and their files removed) however the check ends."""

    def __init__(self, binary: str, rendered: Path) -> None:
        self.binary = binary
        self.rendered = rendered
        self.work = Path(tempfile.mkdtemp(prefix="cxgw-live-"))
        self.processes: list[subprocess.Popen] = []
        self.sandbox_port = free_port()
        self.grpc_port = free_port()
        self.admin_port = free_port()
        self.prometheus_port = free_port()
        self.sandbox = f"http://127.0.0.1:{self.sandbox_port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.prometheus = f"http://127.0.0.1:{self.prometheus_port}"
        self.grpc = f"127.0.0.1:{self.grpc_port}"

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        process = subprocess.Popen(
            command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        sandbox = self.spawn(
            "sandbox",
            [self.binary, "sandbox"],
            {
                "CXGW_SANDBOX_ADDR": f"127.0.0.1:{self.sandbox_port}",
                # New responses keep arriving, so the feedback sync has something to read.
                "CXGW_SANDBOX_FEEDBACK_PER_SECOND": "2",
                "CXGW_LOG_FORMAT": "json",
            },
        )
        wait_until(
            "sandbox",
            lambda: http("GET", f"{self.sandbox}/_sandbox/stats")[0] == 200,
            30,
            sandbox,
        )
        callers = self.work / "callers.toml"
        callers.write_text(
            "".join(
                f'[[caller]]\nname = "{name}"\n'
                f'token_sha256 = ["{hashlib.sha256(token.encode()).hexdigest()}"]\n'
                'permissions = ["read", "surveys:send", "events:write", "customers:write", '
                '"feedback:subscribe", "deliveries:read"]\n\n'
                for name, token in TOKENS.items()
            )
        )
        gateway = self.spawn(
            "gateway",
            [self.binary, "serve"],
            {
                "CXGW_GRPC_ADDR": self.grpc,
                "CXGW_ADMIN_ADDR": f"127.0.0.1:{self.admin_port}",
                "CXGW_DATA_DIR": str(self.work / "data"),
                "CXGW_LOG_FORMAT": "json",
                "CXGW_CALLERS_FILE": str(callers),
                "CXGW_RETENTLY_BASE_URL": f"{self.sandbox}/",
                "CXGW_RETAINLY_BASE_URL": f"{self.sandbox}/",
                "CXGW_RETENTLY_API_KEY": "sandbox-retently-key",
                "CXGW_RETAINLY_API_KEY": "sandbox-retainly-key",
                "CXGW_RETAINLY_API_SECRET": "sandbox-retainly-secret",
                # A small Retently budget, so a burst of reads waits and some are refused.
                "CXGW_RETENTLY_REQUESTS_PER_MINUTE": "40",
                # Writes the emulator keeps failing become dead letters within the scenario.
                "CXGW_OUTBOX_RETRY_WINDOW": "3s",
                "CXGW_FEEDBACK_POLL_INTERVAL": "1s",
                "CXGW_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "CXGW_SHUTDOWN_GRACE": "2s",
            },
        )
        wait_until(
            "gateway",
            lambda: '"gateway serving"' in self.log("gateway"),
            60,
            gateway,
        )
        rules = self.work / "rules.yml"
        shutil.copy(self.rendered / "rules.yml", rules)
        config = self.work / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {
                            "job_name": JOB,
                            "metrics_path": "/metrics",
                            "static_configs": [
                                {
                                    "targets": [f"127.0.0.1:{self.admin_port}"],
                                    # The target labels the Prometheus Operator adds.
                                    "labels": {"namespace": NAMESPACE, "pod": POD},
                                }
                            ],
                        }
                    ],
                }
            )
        )
        prometheus = self.spawn(
            "prometheus",
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--log.level=warn",
            ],
            {},
        )
        wait_until(
            "prometheus",
            lambda: http("GET", f"{self.prometheus}/-/ready")[0] == 200,
            60,
            prometheus,
        )
        # rate() sees the scenario's increases only against a sample from before them: wait for
        # Prometheus's first scrape of the gateway (the counters at their starting values).
        wait_until(
            "prometheus's first scrape of the gateway",
            lambda: bool(query(self, "cxgw_scheduler_events_total")["data"]["result"]),
            60,
            prometheus,
        )

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def grpcurl(stack: Stack, caller: str, method: str, body: dict, max_time: float = 20) -> int:
    result = subprocess.run(
        [
            "grpcurl",
            "-plaintext",
            "-max-time",
            str(max_time),
            "-H",
            f"authorization: Bearer {TOKENS[caller]}",
            "-d",
            json.dumps(body),
            stack.grpc,
            method,
        ],
        capture_output=True,
        text=True,
        timeout=max_time + 30,
    )
    return result.returncode


def crowd(calls: list[tuple[str, str, dict, float]], stack: Stack) -> list[int]:
    codes: list[int] = [0] * len(calls)

    def run(index: int, call: tuple[str, str, dict, float]) -> None:
        caller, method, body, max_time = call
        codes[index] = grpcurl(stack, caller, method, body, max_time)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def scenario(stack: Stack) -> None:
    _, campaigns = http("GET", f"{stack.sandbox}/_sandbox/retently/campaigns")
    campaign = next(
        c["id"]
        for c in campaigns["campaigns"]
        if c.get("type", "").lower() == "transactional" and c.get("isActive", c.get("active", True))
    )
    # A subscription that replays the log from its start, then stays open for live events.
    subscription = subprocess.Popen(
        [
            "grpcurl",
            "-plaintext",
            "-max-time",
            "60",
            "-H",
            f"authorization: Bearer {TOKENS['crm']}",
            "-d",
            json.dumps({"position": "STREAM_POSITION_EARLIEST"}),
            stack.grpc,
            "cx.gateway.v1.FeedbackStream/Subscribe",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.processes.append(subscription)
    survey = "cx.gateway.v1.SurveyService/SendSurvey"
    codes = crowd(
        [
            (
                ("crm", "billing")[i % 2],
                survey,
                {
                    "campaign_id": campaign,
                    "recipients": [
                        {"email": f"crowd-{i}-a@example.com"},
                        {"email": f"crowd-{i}-b@example.com"},
                    ],
                },
                30,
            )
            for i in range(30)
        ],
        stack,
    )
    print(f"survey crowd: {codes.count(0)} of {len(codes)} calls answered OK")
    # Reads of distinct customers beyond the small budget, with short deadlines: some wait,
    # some are refused.
    codes = crowd(
        [
            (
                ("crm", "billing")[i % 2],
                "cx.gateway.v1.CustomerService/GetCustomer",
                {"email": f"reader-{i}@example.com"},
                2,
            )
            for i in range(60)
        ],
        stack,
    )
    print(f"reads beyond the budget: {codes.count(0)} of {len(codes)} answered OK, exit codes {sorted(set(codes))}")
    # Asynchronous writes while Retainly fails half the time and Retently answers a 429 burst.
    http("PUT", f"{stack.sandbox}/_sandbox/faults/retainly", {"errorRate": 0.5})
    http("PUT", f"{stack.sandbox}/_sandbox/faults/retently", {"burst429": 2, "burstRetryAfterSecs": 1})
    crowd(
        [
            (
                "crm",
                "cx.gateway.v1.EventService/TrackEvent",
                {
                    "event": {"customer_id": f"c-{i}", "name": "order_completed"},
                    "options": {"mode": "DELIVERY_MODE_ASYNC"},
                },
                10,
            )
            for i in range(20)
        ],
        stack,
    )
    # Then it fails every call: these exhaust the short retry window and are dead-lettered.
    # 503 only, which says nothing was applied: each event is retried (or refused by the open
    # circuit) until the short retry window ends, and is then dead-lettered.
    http("PUT", f"{stack.sandbox}/_sandbox/faults/retainly", {"errorRate": 1.0, "errorStatuses": [503]})
    crowd(
        [
            (
                "billing",
                "cx.gateway.v1.EventService/TrackEvent",
                {
                    "event": {"customer_id": f"d-{i}", "name": "trial_started"},
                    "options": {"mode": "DELIVERY_MODE_ASYNC"},
                },
                10,
            )
            for i in range(5)
        ],
        stack,
    )
    # Webhook calls: one with a wrong secret (refused), one accepted.
    webhook = f"{stack.admin}/webhooks/retently"
    refused, _ = http("POST", webhook, {"event": "feedback.created"}, {"x-cx-webhook-secret": "wrong"})
    accepted, _ = http(
        "POST",
        webhook,
        {"event": "ping"},
        {"x-cx-webhook-secret": WEBHOOK_SECRET},
    )
    print(f"webhook calls answered {refused} (wrong secret) and {accepted}")


def query(stack: Stack, expr: str) -> dict:
    url = f"{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, answer = http("GET", url)
    if isinstance(answer, str):
        answer = json.loads(answer)
    return {"http": status, **answer}


def substitute(expr: str) -> str:
    # Longest names first: $__rate_interval before $__interval.
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name]).replace("${" + name[1:] + "}", VARIABLES[name])
    return expr


def panel_targets(dashboard: dict) -> list[tuple[str, str]]:
    targets = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                targets.append((f"{inner['title']} [{target['refId']}]", target["expr"]))
    return targets


def evaluate(stack: Stack) -> int:
    dashboard = json.loads((stack.rendered / "dashboard.json").read_text())
    rules = yaml.safe_load((stack.rendered / "rules.yml").read_text())
    alerts = [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]
    panels = panel_targets(dashboard)
    assert panels, "the dashboard has no panel queries"

    # Wait for the scenario to show: every panel and the alerts it provokes return data (or the
    # deadline says which do not).
    watched = panels + [(name, expr) for name, expr in alerts if name in SCENARIO_ALERTS]
    deadline = time.monotonic() + DATA_DEADLINE_SECONDS
    while True:
        empty = []
        for name, expr in watched:
            answer = query(stack, substitute(expr))
            if answer.get("status") != "success":
                print(f"FAIL panel {name} does not parse: {answer.get('error')}\n  {expr}")
                return 1
            if not answer["data"]["result"]:
                empty.append(name)
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(1)

    failures = 0
    for name, expr in panels:
        answer = query(stack, substitute(expr))
        if answer["data"]["result"]:
            print(f"ok   panel {name}: {len(answer['data']['result'])} series")
        else:
            failures += 1
            print(f"FAIL panel {name} returned no data\n  {substitute(expr)}")
    # The dashboard's variables (Grafana's label_values) through the label values API.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        definition = substitute(variable["definition"])
        inner = definition[len("label_values(") : -1]
        match, _, label = inner.rpartition(",")
        url = f"{stack.prometheus}/api/v1/label/{label.strip()}/values?" + urllib.parse.urlencode(
            {"match[]": match.strip()}
        )
        _, answer = http("GET", url)
        values = answer.get("data", []) if isinstance(answer, dict) else []
        expected = VARIABLES[f"${variable['name']}"]
        if expected in values:
            print(f"ok   variable {variable['name']}: {values}")
        else:
            failures += 1
            print(f"FAIL variable {variable['name']} offers {values}, not {expected}")
    for name, expr in alerts:
        answer = query(stack, expr)
        if answer.get("status") != "success":
            failures += 1
            print(f"FAIL alert {name}: {answer.get('error')}\n  {expr}")
            continue
        firing = len(answer["data"]["result"])
        if name in SCENARIO_ALERTS and not firing:
            failures += 1
            print(f"FAIL alert {name} does not see what the scenario did\n  {expr}")
        else:
            print(f"ok   alert {name} parses and evaluates ({firing} series above threshold now)")
    # Prometheus loaded the rendered rules themselves and evaluates them without error.
    _, loaded = http("GET", f"{stack.prometheus}/api/v1/rules")
    loaded_rules = [r for g in loaded["data"]["groups"] for r in g["rules"]]
    unhealthy = [r["name"] for r in loaded_rules if r.get("health") == "err"]
    if len(loaded_rules) == len(alerts) and not unhealthy:
        print(f"ok   prometheus loaded all {len(alerts)} alerting rules, none in error")
    else:
        failures += 1
        print(f"FAIL prometheus loaded {len(loaded_rules)} rules, in error: {unhealthy}")
    print(
        f"evaluated {len(panels)} panel queries, {sum(1 for v in dashboard['templating']['list'] if v['type'] == 'query')} "
        f"variable queries and {len(alerts)} alert expressions against prometheus: "
        f"{failures} failed"
    )
    return failures


def main() -> int:
    binary, rendered = sys.argv[1], Path(sys.argv[2])
    stack = Stack(binary, rendered)
    try:
        stack.start()
        scenario(stack)
        failures = evaluate(stack)
        if failures:
            print("gateway log tail:\n" + "\n".join(stack.log("gateway").splitlines()[-20:]))
        return 1 if failures else 0
    except Exception as error:  # report and clean up instead of leaving processes behind
        print(f"FAIL live check: {error}")
        for name in ("sandbox", "gateway", "prometheus"):
            print(f"--- {name} log tail:\n" + "\n".join(stack.log(name).splitlines()[-15:]))
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
