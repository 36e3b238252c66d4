"""The chart's PostgreSQL mode, run: renders helm/cx-gateway with store.mode "postgres" and the
test database's URL in the chart's own Secret, lays out what the pod would see (the ConfigMap's
settings, the container's environment, the Secret's files at their mount paths, moved under a
temporary root), and starts the built gateway twice from it, as two replicas of the Deployment
sharing the database. Both must become ready, drain cleanly on SIGTERM and never print the URL or
its password; a URL file with a wrong password must stop the gateway at start without printing
either.

    tests/helm/run_on_postgres.py target/debug/cx-gateway   # needs CXGW_TEST_POSTGRES_URL
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cx-gateway"
RELEASE = "cxgw"
FULLNAME = "cxgw-cx-gateway"
# How long a replica may take to open the store, migrate and report ready on a busy machine.
READY_WITHIN_SECONDS = 60
# Nothing listens here: the replicas must not reach anything but the database.
UNREACHABLE_UPSTREAM = "http://127.0.0.1:9"


def psql(url: str, statement: str) -> None:
    """Runs one statement as the URL's user on its server's `postgres` database; the password
    goes through the environment, never the command line."""
    parts = urllib.parse.urlsplit(url)
    env = {
        **os.environ,
        "PGHOST": parts.hostname or "127.0.0.1",
        "PGPORT": str(parts.port or 5432),
        "PGUSER": urllib.parse.unquote(parts.username or ""),
        "PGPASSWORD": urllib.parse.unquote(parts.password or ""),
        "PGDATABASE": "postgres",
    }
    program = shutil.which("psql")
    assert program, "psql is missing (Debian's postgresql package brings it)"
    result = subprocess.run(
        [program, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", statement],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"psql: {result.stderr.strip()}"


def with_database(url: str, database: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(url)._replace(path=f"/{database}"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(url: str) -> list[dict[str, Any]]:
    values = {
        "replicaCount": 2,
        "store": {"mode": "postgres", "postgres": {"url": url, "poolSize": 3}},
        "upstreamKeys": {
            "retentlyApiKey": "run-retently-key",
            "retainlyApiKey": "run-retainly-key",
            "retainlyApiSecret": "run-retainly-secret",
        },
        "callers": {"trustedMesh": True},
        "config": {
            "logFormat": "text",
            "retently": {"baseUrl": UNREACHABLE_UPSTREAM},
            "retainly": {"baseUrl": UNREACHABLE_UPSTREAM},
        },
    }
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name=RELEASE, namespace="cx")
    return [
        document
        for template, text in manifests.items()
        if template.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]


def one(objects: list[dict[str, Any]], kind: str, name: str = FULLNAME) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


class Replica:
    """One pod of the Deployment as a local process: the chart's settings and files, its own
    ports and scratch directories."""

    def __init__(self, binary: str, objects: list[dict[str, Any]], scratch: Path, name: str):
        settings = one(objects, "ConfigMap")["data"]
        secret = one(objects, "Secret")["data"]
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        self.root = scratch / name
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for mount in container["volumeMounts"]:
            directory = self.root / mount["mountPath"].lstrip("/")
            directory.mkdir(parents=True, exist_ok=True)
            source = volumes[mount["name"]].get("secret")
            if source is None:
                continue
            assert source["secretName"] == FULLNAME, f"{mount['name']} from another Secret"
            for item in source["items"]:
                (directory / item["path"]).write_bytes(base64.b64decode(secret[item["key"]]))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **settings}
        for item in container["env"]:
            assert set(item) == {"name", "value"}, f"{item['name']} is not a plain value"
            value = item["value"]
            env[item["name"]] = str(self.root / value.lstrip("/")) if value.startswith("/") else value
        self.admin = free_port()
        env.update(
            {
                "CXGW_DATA_DIR": str(self.root / settings["CXGW_DATA_DIR"].lstrip("/")),
                "TMPDIR": str(self.root / "tmp"),
                "CXGW_GRPC_ADDR": f"127.0.0.1:{free_port()}",
                "CXGW_ADMIN_ADDR": f"127.0.0.1:{self.admin}",
                # The drain delay keeps a stopping pod serving for the Service's sake; no Service
                # here.
                "CXGW_DRAIN_DELAY": "0s",
            }
        )
        self.env = env
        self.args = [binary, *container["args"]]
        self.log_path = self.root / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_WITHIN_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.log()}")
            if self.ready():
                return
            time.sleep(0.2)  # polling /readyz: the only signal a starting gateway gives
        raise AssertionError(f"not ready within {READY_WITHIN_SECONDS} s:\n{self.log()}")

    def stop(self) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def password_of(url: str) -> str:
    password = urllib.parse.urlsplit(url).password
    assert password, "the test database's URL carries no password"
    return password


def check_two_replicas(binary: str, url: str, scratch: Path) -> None:
    objects = render(url)
    settings = one(objects, "ConfigMap")["data"]
    assert settings["CXGW_STORE"] == "postgres" and "CXGW_POSTGRES_URL" not in settings
    replicas = [Replica(binary, objects, scratch, f"replica-{n}") for n in (1, 2)]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
    finally:
        codes = [replica.stop() for replica in replicas if replica.process is not None]
    assert codes == [0, 0], f"exit codes {codes}"
    for replica in replicas:
        text = replica.log()
        assert "store open on postgres pool_size=3" in text, f"not on PostgreSQL:\n{text}"
        assert url not in text and password_of(url) not in text, "the URL is in the log"


def check_wrong_password(binary: str, url: str, scratch: Path) -> None:
    parts = urllib.parse.urlsplit(url)
    wrong_password = "run-wrong-password-5d1c"
    wrong = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", f":{wrong_password}@"))
    wrong_url = urllib.parse.urlunsplit(wrong)
    assert wrong_url != url
    replica = Replica(binary, render(wrong_url), scratch, "wrong-password")
    replica.start()
    assert replica.process is not None
    code = replica.process.wait(timeout=120)
    text = replica.log()
    assert code != 0, f"started with a wrong password:\n{text}"
    assert "cannot open the postgres store" in text, text
    assert wrong_password not in text and wrong_url not in text, "the URL is in the error"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    binary = sys.argv[1]
    url = os.environ.get("CXGW_TEST_POSTGRES_URL")
    if not url:
        print("FAIL CXGW_TEST_POSTGRES_URL is not set (run through scripts/postgres.sh)")
        return 1
    failed = 0
    # A database of its own: the cluster is shared with the other suites of the run.
    database = f"cxgw_chart_{secrets.token_hex(4)}"
    psql(url, f'CREATE DATABASE "{database}"')
    url = with_database(url, database)
    with tempfile.TemporaryDirectory() as scratch:
        for name, check in [
            ("two replicas start, serve and drain on the chart's PostgreSQL rendering", check_two_replicas),
            ("a wrong database password stops the start without printing the URL", check_wrong_password),
        ]:
            try:
                check(binary, url, Path(scratch))
                print(f"ok   {name}")
            except AssertionError as error:
                failed += 1
                print(f"FAIL {name}: {error}")
    psql(os.environ["CXGW_TEST_POSTGRES_URL"], f'DROP DATABASE "{database}" WITH (FORCE)')
    print(f"{2 - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
