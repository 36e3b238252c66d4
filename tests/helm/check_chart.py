"""Checks of the Helm chart (helm/cx-gateway), the Dockerfile, the .dockerignore and the names
the operations guide uses.

For the default values and every value set in helm/cx-gateway/ci/: lint (strict), render offline
through the Helm v4 SDK, validate every rendered object with kubernetes-validate in strict mode
against the oldest Kubernetes the chart supports and the newest the validator knows, and assert
the properties operators rely on (gRPC probes on the grpc port, hardening, keys, webhook secrets
and the database URL only as files, the data volume at CXGW_DATA_DIR, drain timing, the workload
kind of each store mode). Then a table of bad value sets, each of which the schema must refuse,
and the template guards that refuse to expose an unauthenticated webhook. Prints one line per check and `N passed, N failed` last; exits 1 on any
failure.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import dockerfile
import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cx-gateway"
RELEASE = "cxgw"
NAMESPACE = "cx"
FULLNAME = "cxgw-cx-gateway"
# The oldest Kubernetes the chart accepts (Chart.yaml kubeVersion) and the newest the validator
# ships schemas for.
KUBE_VERSIONS = ["1.30.0", kv.latest_version()]
# Custom resources: kubernetes-validate has schemas for built-in kinds only, so these are skipped
# there and checked field by field below instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "GRPCRoute", "HTTPRoute"}
# Values that must never leave the Secret: searched for, in clear and in base64, in everything else.
CANARIES = {
    "retentlyApiKey": "rk-canary-7f3a9c51",
    "retainlyApiKey": "rak-canary-21be04d7",
    "retainlyApiSecret": "ras-canary-d95e11a0",
}
# The database URL the chart stores in its Secret (store.postgres.url), and its password alone:
# searched for the same way, in clear and in base64.
POSTGRES_PASSWORD_CANARY = "pgpw-canary-4e7b19c3"
POSTGRES_URL_CANARY = f"postgres://cxgw:{POSTGRES_PASSWORD_CANARY}@cx-db-rw.cx.svc:5432/cx?sslmode=require"
# The webhook secrets, searched for the same way when the chart stores them.
WEBHOOK_CANARIES = {
    "secret": "whs-canary-5c0e8b27",
    "signingSecret": "whk-canary-93a4f6d1",
}
# Where each webhook secret is read from, and the file it is mounted as.
WEBHOOK_FILE_VARS = {
    "CXGW_WEBHOOK_SECRET_FILE": ("secret", "webhook-secret"),
    "CXGW_WEBHOOK_SIGNING_SECRET_FILE": ("signingSecret", "webhook-signing-secret"),
}
WEBHOOK_SETTINGS = {
    "CXGW_WEBHOOK_SECRET_HEADER",
    "CXGW_WEBHOOK_TOLERANCE",
    "CXGW_WEBHOOK_MAX_BODY_BYTES",
}
KEY_FILE_VARS = {
    "CXGW_RETENTLY_API_KEY_FILE": "retentlyApiKey",
    "CXGW_RETAINLY_API_KEY_FILE": "retainlyApiKey",
    "CXGW_RETAINLY_API_SECRET_FILE": "retainlyApiSecret",
}
SECRET_NAME = re.compile(r"(API_KEY|API_SECRET)$")
# Any secret setting of the gateway, by value or by file.
ANY_SECRET_SETTING = re.compile(r"^CXGW_\w*(API_KEY|SECRET)(_FILE)?$")
# The gateway's own gRPC services, from the contract: what the GRPCRoute routes by default.
GATEWAY_SERVICES = sorted(
    f"cx.gateway.v1.{name}"
    for proto in (ROOT / "proto" / "cx" / "gateway" / "v1").glob("*.proto")
    for name in re.findall(r"^service (\w+) \{", proto.read_text(), flags=re.MULTILINE)
)


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, body: Callable[[], None]) -> bool:
        try:
            body()
        except Exception as error:  # a failed check is reported, never fatal to the run
            self.failed += 1
            detail = str(error)
            if isinstance(error, AssertionError) and not detail:
                # A bare assert: its own source line says what was expected.
                frame = traceback.extract_tb(error.__traceback__)[-1]
                detail = f"line {frame.lineno}: {frame.line}"
            elif not isinstance(error, AssertionError):
                detail = "".join(traceback.format_exception_only(type(error), error)).strip()
            print(f"FAIL {name}: {detail}")
            return False
        self.passed += 1
        print(f"ok   {name}")
        return True


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Rendered:
    """One rendering: the merged values, the manifests by template and the parsed objects."""

    def __init__(self, chart: helm.Chart, values: dict[str, Any]) -> None:
        self.raw = values
        self.values = chart.merge_values(values)
        self.manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        self.notes = self.manifests.get("cx-gateway/templates/NOTES.txt", "")
        self.objects: list[tuple[str, dict[str, Any]]] = []
        for template, text in sorted(self.manifests.items()):
            if not template.endswith((".yaml", ".yml")):
                continue
            for document in yaml.safe_load_all(text):
                if document:
                    self.objects.append((template, document))

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for _, obj in self.objects if obj.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.kind(kind)
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    def hook_pods(self) -> list[dict[str, Any]]:
        return [
            o
            for o in self.kind("Pod")
            if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
        ]

    def postgres(self) -> bool:
        return self.values["store"]["mode"] == "postgres"

    def workload_kind(self) -> str:
        return "Deployment" if self.postgres() else "StatefulSet"

    def workload(self) -> dict[str, Any]:
        """The one workload: the StatefulSet of the embedded store or the Deployment of the
        PostgreSQL mode, never both."""
        other = "StatefulSet" if self.postgres() else "Deployment"
        assert not self.kind(other), f"a {other} next to the {self.workload_kind()}"
        return self.one(self.workload_kind())

    def pod_spec(self) -> dict[str, Any]:
        return self.workload()["spec"]["template"]["spec"]

    def container(self) -> dict[str, Any]:
        containers = self.pod_spec()["containers"]
        assert len(containers) == 1, f"expected one container, found {len(containers)}"
        return containers[0]

    def env(self) -> dict[str, dict[str, Any]]:
        return {item["name"]: item for item in self.container().get("env", [])}

    def config_map(self) -> dict[str, str]:
        maps = [o for o in self.kind("ConfigMap") if o["metadata"]["name"] == FULLNAME]
        assert len(maps) == 1, "the settings ConfigMap is missing"
        return maps[0]["data"]

    def service(self, name: str) -> dict[str, Any]:
        found = [o for o in self.kind("Service") if o["metadata"]["name"] == name]
        assert len(found) == 1, f"service {name} missing"
        return found[0]


def image_uid_gid() -> tuple[int, int]:
    """The numeric USER of the Dockerfile's final stage."""
    user = None
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd.upper() == "FROM":
            user = None
        elif command.cmd.upper() == "USER":
            user = command.value[0]
    assert user, "the final stage sets no USER"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"USER {user} is not numeric uid:gid"
    return int(uid), int(gid)


# ---------------------------------------------------------------------------------------------
# Properties every rendering must have.


def check_lint(values: dict[str, Any]) -> Callable[[], None]:
    def body() -> None:
        report = helm.lint(
            str(CHART), values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, json.dumps(report, indent=1)

    return body


def check_kubernetes_validate(rendered: Rendered, version: str) -> Callable[[], None]:
    def body() -> None:
        errors = []
        validated = 0
        for template, obj in rendered.objects:
            if obj["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
                validated += 1
            except kv.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                errors.append(f"{template} {obj['kind']}: {path}: {error.message}")
            except kv.SchemaNotFoundError as error:
                errors.append(f"{template}: {error.message}")
        assert not errors, "\n  ".join(errors)
        assert validated >= 6, f"only {validated} objects validated"

    return body


def check_labels(rendered: Rendered) -> None:
    required = [
        "helm.sh/chart",
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/version",
    ]
    for template, obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in required if label not in labels]
        assert not missing, f"{template} {obj['kind']} lacks {missing}"
    workload = rendered.workload()
    selector = workload["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "cx-gateway",
        "app.kubernetes.io/instance": RELEASE,
    }, f"selector {selector} is not the stable selector labels"
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items(), "pod labels do not carry the selector"


def check_workload(rendered: Rendered) -> None:
    """The embedded store: one StatefulSet replica with its headless Service, no autoscaler. The
    PostgreSQL mode: a Deployment that surges (a new pod is ready before an old one stops), no
    volume claim, no headless Service, an autoscaler aimed at the Deployment when enabled."""
    values = rendered.values
    workload = rendered.workload()
    spec = workload["spec"]
    autoscaling = values["autoscaling"]["enabled"]
    if not rendered.postgres():
        assert spec.get("replicas") == 1, "the embedded store allows one replica"
        assert spec["serviceName"] == f"{FULLNAME}-headless"
        headless = rendered.service(f"{FULLNAME}-headless")
        assert headless["spec"]["clusterIP"] == "None"
        assert not rendered.kind("HorizontalPodAutoscaler"), "an HPA with the embedded store"
        return
    names = [s["metadata"]["name"] for s in rendered.kind("Service")]
    assert names == [FULLNAME], f"Services {names}: the headless one belongs to the StatefulSet"
    strategy = spec["strategy"]
    assert strategy["type"] == "RollingUpdate", f"strategy {strategy}"
    rolling = strategy["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a roll would stop a pod before its replacement is ready"
    assert rolling["maxSurge"] not in (0, "0%"), "a roll without surge cannot keep every pod serving"
    assert "volumeClaimTemplates" not in spec and "serviceName" not in spec
    if autoscaling:
        assert "replicas" not in spec, "replicas fights the HPA"
        hpa = rendered.one("HorizontalPodAutoscaler")["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": FULLNAME,
        }, f"HPA target {hpa['scaleTargetRef']}"
        assert hpa["minReplicas"] == values["autoscaling"]["minReplicas"]
        assert hpa["maxReplicas"] == values["autoscaling"]["maxReplicas"]
    else:
        assert spec["replicas"] == values["replicaCount"], f"replicas {spec.get('replicas')}"
        assert not rendered.kind("HorizontalPodAutoscaler"), "an HPA although autoscaling is off"


def check_ports(rendered: Rendered) -> None:
    values = rendered.values
    segment = values["segment"]["enabled"]
    names = {"grpc", "http"} | ({"segment"} if segment else set())
    ports = {p["name"]: p for p in rendered.container()["ports"]}
    assert set(ports) == names, f"container ports {sorted(ports)}"
    assert ports["grpc"]["containerPort"] == values["containerPorts"]["grpc"]
    assert ports["http"]["containerPort"] == values["containerPorts"]["http"]
    settings = rendered.config_map()
    assert settings["CXGW_GRPC_ADDR"] == f"0.0.0.0:{values['containerPorts']['grpc']}"
    assert settings["CXGW_ADMIN_ADDR"] == f"0.0.0.0:{values['containerPorts']['http']}"
    services = [FULLNAME] if rendered.postgres() else [FULLNAME, f"{FULLNAME}-headless"]
    for name in services:
        service_ports = {p["name"]: p for p in rendered.service(name)["spec"]["ports"]}
        assert set(service_ports) == names, f"{name} ports {sorted(service_ports)}"
        assert service_ports["grpc"]["targetPort"] == "grpc"
        assert service_ports["http"]["targetPort"] == "http"
    main = {p["name"]: p for p in rendered.service(FULLNAME)["spec"]["ports"]}
    assert main["grpc"]["port"] == values["service"]["ports"]["grpc"]
    assert main["http"]["port"] == values["service"]["ports"]["http"]
    if segment:
        # The Segment intake: its own port, its listen address, and the write key files mounted
        # read-only where the callers file's segment_write_key_files point.
        assert ports["segment"]["containerPort"] == values["containerPorts"]["segment"]
        assert main["segment"]["port"] == values["service"]["ports"]["segment"]
        assert main["segment"]["targetPort"] == "segment"
        assert settings["CXGW_SEGMENT_LISTEN_ADDR"] == f"0.0.0.0:{values['containerPorts']['segment']}"
        if values["segment"]["writeKeysSecret"]:
            volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
            volume = volumes["segment-write-keys"]["secret"]
            assert volume["secretName"] == values["segment"]["writeKeysSecret"]
            assert volume["defaultMode"] == 0o440, "write key files readable beyond the pod's group"
            mount = [m for m in rendered.container()["volumeMounts"] if m["name"] == "segment-write-keys"]
            assert mount == [
                {"name": "segment-write-keys", "mountPath": "/etc/cx-gateway/segment", "readOnly": True}
            ], f"write keys mount {mount}"
    else:
        assert "CXGW_SEGMENT_LISTEN_ADDR" not in settings, "the segment intake is on by default"


def check_probes(rendered: Rendered) -> None:
    container = rendered.container()
    grpc_port = rendered.values["containerPorts"]["grpc"]
    # Kubelet's gRPC probes cannot speak TLS: with TLS on, the admin port's endpoints answer.
    tls = bool(rendered.values["tls"]["secretName"])
    paths = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe_name, path in paths.items():
        probe = container.get(probe_name)
        assert probe, f"{probe_name} missing"
        handlers = {"grpc", "httpGet", "tcpSocket", "exec"} & set(probe)
        if tls:
            assert handlers == {"httpGet"}, f"{probe_name} uses {sorted(handlers)} with tls"
            assert probe["httpGet"] == {"path": path, "port": "http"}, probe_name
        else:
            assert handlers == {"grpc"}, f"{probe_name} uses {sorted(handlers)}, not grpc"
            assert probe["grpc"]["port"] == grpc_port, f"{probe_name} is not on the grpc port"
        assert probe["timeoutSeconds"] >= 1 and probe["periodSeconds"] >= 1


def check_callers_and_tls(rendered: Rendered) -> None:
    """Callers and certificates reach the pod as read-only files from Secrets, mounted as whole
    directories (a subPath mount would never see a Secret update, so nothing would reload)."""
    values = rendered.values
    env = rendered.env()
    settings = rendered.config_map()
    mounts = {m["name"]: m for m in rendered.container()["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    assert settings["CXGW_TRUSTED_MESH"] == str(values["callers"]["trustedMesh"]).lower()
    assert settings["CXGW_RELOAD_INTERVAL"] == values["callers"]["reloadInterval"]
    expected_files = {}
    callers = values["callers"]
    if callers["existingSecret"]:
        expected_files["CXGW_CALLERS_FILE"] = ("callers", callers["existingSecret"], "callers.toml")
    tls = values["tls"]
    if tls["secretName"]:
        expected_files["CXGW_TLS_CERT_FILE"] = ("tls", tls["secretName"], "tls.crt")
        expected_files["CXGW_TLS_KEY_FILE"] = ("tls", tls["secretName"], "tls.key")
    if tls["clientCaSecretName"]:
        expected_files["CXGW_TLS_CLIENT_CA_FILE"] = (
            "client-ca",
            tls["clientCaSecretName"],
            "ca.crt",
        )
        assert settings["CXGW_TLS_CLIENT_AUTH"] == tls["clientAuth"]
    alerts = values["alerts"]
    if alerts["existingSecret"]:
        # The whole Secret: the rules name their secret files by path beside the rules file.
        mount = mounts["alerts"]
        assert mount.get("readOnly") is True and "subPath" not in mount, "alerts"
        assert env["CXGW_ALERT_RULES_FILE"]["value"] == f"{mount['mountPath']}/{alerts['rulesKey']}"
        secret = volumes["alerts"]["secret"]
        assert secret["secretName"] == alerts["existingSecret"], "alerts"
        assert secret["defaultMode"] == 0o440, "alerts"
        assert "items" not in secret, "every key of the alerts Secret is mounted"
    else:
        assert "CXGW_ALERT_RULES_FILE" not in env, "CXGW_ALERT_RULES_FILE set without its Secret"
    assert "CXGW_ALERT_RULES_FILE" not in settings, "CXGW_ALERT_RULES_FILE in the ConfigMap"
    for variable in ("CXGW_CALLERS_FILE", "CXGW_TLS_CERT_FILE", "CXGW_TLS_KEY_FILE",
                     "CXGW_TLS_CLIENT_CA_FILE"):
        assert variable not in settings, f"{variable} in the ConfigMap"
        if variable not in expected_files:
            assert variable not in env, f"{variable} set without its Secret"
    for variable, (volume_name, secret_name, file_name) in expected_files.items():
        mount = mounts[volume_name]
        assert mount.get("readOnly") is True and "subPath" not in mount, volume_name
        assert env[variable]["value"] == f"{mount['mountPath']}/{file_name}", variable
        secret = volumes[volume_name]["secret"]
        assert secret["secretName"] == secret_name, volume_name
        assert secret["defaultMode"] == 0o440, volume_name
        assert file_name in {item["path"] for item in secret["items"]}, volume_name


def check_event_rules(rendered: Rendered) -> None:
    """The rules file reaches the pod as a read-only file from a ConfigMap mounted as a whole
    directory (so an update reloads), and the cool-down is a plain setting."""
    values = rendered.values["eventRules"]
    env = rendered.env()
    settings = rendered.config_map()
    mounts = {m["name"]: m for m in rendered.container()["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    assert "CXGW_EVENT_RULES_FILE" not in settings, "CXGW_EVENT_RULES_FILE in the ConfigMap"
    if values["existingConfigMap"]:
        mount = mounts["event-rules"]
        assert mount.get("readOnly") is True and "subPath" not in mount, "event-rules mount"
        assert env["CXGW_EVENT_RULES_FILE"]["value"] == f"{mount['mountPath']}/rules.toml"
        config_map = volumes["event-rules"]["configMap"]
        assert config_map["name"] == values["existingConfigMap"]
        assert config_map["items"] == [{"key": values["configMapKey"], "path": "rules.toml"}]
    else:
        assert "CXGW_EVENT_RULES_FILE" not in env, "CXGW_EVENT_RULES_FILE without its ConfigMap"
        assert "event-rules" not in mounts and "event-rules" not in volumes
    if values["surveyCooldown"]:
        assert settings["CXGW_SURVEY_COOLDOWN"] == values["surveyCooldown"]
    else:
        assert "CXGW_SURVEY_COOLDOWN" not in settings


def check_drain_timing(rendered: Rendered) -> None:
    values = rendered.values
    grace = values["config"]["shutdownGraceSeconds"]
    delay = values["drain"]["delaySeconds"]
    pause = values["lifecycle"]["preStopSleepSeconds"]
    margin = values["lifecycle"]["terminationGraceMarginSeconds"]
    assert rendered.config_map()["CXGW_SHUTDOWN_GRACE"] == f"{grace}s"
    assert rendered.config_map()["CXGW_DRAIN_DELAY"] == f"{delay}s"
    total = rendered.pod_spec()["terminationGracePeriodSeconds"]
    assert total == pause + delay + grace + margin, f"terminationGracePeriodSeconds {total}"
    assert total > pause + delay + grace, "no margin after the drain window"
    pre_stop = rendered.container().get("lifecycle", {}).get("preStop", {})
    if pause:
        assert pre_stop == {"sleep": {"seconds": pause}}, f"preStop {pre_stop}"
    else:
        assert not pre_stop


def check_security(rendered: Rendered) -> None:
    uid, gid = image_uid_gid()
    pod = rendered.pod_spec()
    pod_ctx = pod["securityContext"]
    assert pod_ctx.get("runAsNonRoot") is True
    assert pod_ctx.get("runAsUser") == uid, f"pod uid {pod_ctx.get('runAsUser')} != image {uid}"
    assert pod_ctx.get("runAsGroup") == gid
    assert pod_ctx.get("fsGroup") == gid, "the data volume must be group-writable"
    assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    assert pod.get("enableServiceLinks") is False
    ctx = rendered.container()["securityContext"]
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("privileged") is False
    assert ctx.get("runAsNonRoot") is True
    assert ctx.get("capabilities") == {"drop": ["ALL"]}, f"capabilities {ctx.get('capabilities')}"
    assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}
    for account in rendered.kind("ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False


def check_resources(rendered: Rendered) -> None:
    resources = rendered.container()["resources"]
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            assert resource in resources.get(section, {}), f"no {section}.{resource}"


def check_writable_paths(rendered: Rendered) -> None:
    values = rendered.values
    data_dir = rendered.config_map()["CXGW_DATA_DIR"]
    assert data_dir == values["persistence"]["mountPath"]
    mounts = rendered.container()["volumeMounts"]
    writable = {m["mountPath"]: m["name"] for m in mounts if not m.get("readOnly")}
    assert writable == {data_dir: "data", "/tmp": "tmp"}, f"writable mounts {writable}"
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    assert "emptyDir" in volumes["tmp"], "/tmp is not an emptyDir"
    templates = rendered.workload()["spec"].get("volumeClaimTemplates", [])
    persistence = values["persistence"]
    if rendered.postgres():
        # The database holds everything: the pod's data directory is scratch space.
        assert volumes["data"] == {
            "name": "data",
            "emptyDir": {"sizeLimit": persistence["emptyDirSizeLimit"]},
        }, f"data volume {volumes['data']}"
        assert not templates, "a volume claim in the PostgreSQL mode"
    elif not persistence["enabled"]:
        assert "emptyDir" in volumes["data"] and not templates
    elif persistence["existingClaim"]:
        claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
        assert claim == persistence["existingClaim"] and not templates
    else:
        assert "data" not in volumes, "data is both a volume and a claim template"
        assert [t["metadata"]["name"] for t in templates] == ["data"]
        spec = templates[0]["spec"]
        assert spec["resources"]["requests"]["storage"] == persistence["size"]
        assert spec["accessModes"] == persistence["accessModes"]
        # Claim template metadata is immutable: nothing version-dependent may label it.
        assert set(templates[0]["metadata"]["labels"]) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
        }
        if persistence["storageClass"]:
            assert spec["storageClassName"] == persistence["storageClass"]


def check_settings(rendered: Rendered) -> None:
    values = rendered.values
    settings = rendered.config_map()
    for key, value in settings.items():
        assert key.startswith("CXGW_"), f"{key} in the settings ConfigMap"
        assert isinstance(value, str), f"{key} is not a string"
    config = values["config"]
    expected = {
        "CXGW_LOG_FORMAT": config["logFormat"],
        "CXGW_LOG": config["log"],
        "CXGW_REFLECTION": str(config["reflection"]).lower(),
        "CXGW_MAX_MESSAGE_BYTES": str(config["maxMessageBytes"]),
        "CXGW_MAX_CONCURRENT_STREAMS": str(config["maxConcurrentStreams"]),
        "CXGW_MAX_CONNECTION_AGE": config["maxConnectionAge"],
        "CXGW_RETENTLY_BASE_URL": config["retently"]["baseUrl"],
        "CXGW_RETENTLY_REQUESTS_PER_MINUTE": str(config["retently"]["requestsPerMinute"]),
        "CXGW_RETAINLY_BASE_URL": config["retainly"]["baseUrl"],
        "CXGW_RETAINLY_REQUESTS_PER_MINUTE": str(config["retainly"]["requestsPerMinute"]),
    }
    for name, value in config["extraSettings"].items():
        expected[name] = str(value)
    wrong = {k: (settings.get(k), v) for k, v in expected.items() if settings.get(k) != v}
    assert not wrong, f"settings differ (rendered, expected): {wrong}"
    envelope = rendered.container()["envFrom"]
    assert envelope == [{"configMapRef": {"name": FULLNAME}}], f"envFrom {envelope}"
    annotations = rendered.workload()["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(
        r"[0-9a-f]{64}", annotations.get("checksum/config", "")
    ), "no config checksum"


def check_keys_are_files(rendered: Rendered) -> None:
    """The keys reach the pod only as files from the Secret; nothing else carries them."""
    values = rendered.values
    keys = values["upstreamKeys"]
    settings = rendered.config_map()
    leaked = [k for k in settings if SECRET_NAME.search(k) or k.endswith("_FILE")]
    assert not leaked, f"key settings in the ConfigMap: {leaked}"
    env = rendered.env()
    inline = [name for name in env if SECRET_NAME.search(name)]
    assert not inline, f"keys as environment variables: {inline}"
    if values["sandbox"]["enabled"]:
        assert not set(KEY_FILE_VARS) & set(env), "key files in sandbox mode"
        assert rendered.container()["args"] == ["serve", "--sandbox"]
        return
    assert rendered.container()["args"] == ["serve"]
    secret_name = keys["existingSecret"] or FULLNAME
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    # The volume of the Secret that maps the key names (the same Secret may hold other secrets,
    # mounted through volumes of their own).
    key_names = {keys["secretKeys"][field] for field in CANARIES}
    key_volumes = [
        v
        for v in volumes.values()
        if v.get("secret", {}).get("secretName") == secret_name
        and key_names <= {item["key"] for item in v["secret"].get("items", [])}
    ]
    assert len(key_volumes) == 1, f"{len(key_volumes)} key volumes from Secret {secret_name}"
    volume = key_volumes[0]
    mount = [m for m in rendered.container()["volumeMounts"] if m["name"] == volume["name"]]
    assert len(mount) == 1 and mount[0].get("readOnly") is True, "key volume not mounted read-only"
    assert volume["secret"]["defaultMode"] == 0o440, "key files readable beyond the pod's group"
    paths = {item["key"]: item["path"] for item in volume["secret"]["items"]}
    for variable, field in KEY_FILE_VARS.items():
        assert variable in env, f"{variable} not set"
        key_name = keys["secretKeys"][field]
        assert key_name in paths, f"Secret key {key_name} not mounted"
        assert env[variable]["value"] == f"{mount[0]['mountPath']}/{paths[key_name]}", variable


def expected_secret_data(values: dict[str, Any]) -> dict[str, str]:
    """What the chart's own Secret must hold: the upstream keys unless they come from an existing
    Secret (or the sandbox needs none), the webhook secrets unless they come from one, the
    database URL in the PostgreSQL mode unless it comes from one."""
    data = {}
    keys = values["upstreamKeys"]
    if not values["sandbox"]["enabled"] and not keys["existingSecret"]:
        for field in CANARIES:
            data[keys["secretKeys"][field]] = keys[field]
    webhook = values["webhook"]
    if webhook["enabled"] and not webhook["existingSecret"]:
        data[webhook["secretKeys"]["secret"]] = webhook["secret"]
        if webhook["requireSignature"]:
            data[webhook["secretKeys"]["signingSecret"]] = webhook["signingSecret"]
    postgres = values["store"]["postgres"]
    if values["store"]["mode"] == "postgres" and not postgres["existingSecret"]:
        data[postgres["secretKey"]] = postgres["url"]
    return data


def check_chart_secret(rendered: Rendered) -> None:
    """The chart renders a Secret exactly when it manages a secret, holding exactly those values,
    and the pod template carries its checksum so that a changed value rolls the pod (every secret
    is read once at start)."""
    expected = expected_secret_data(rendered.values)
    secrets = rendered.kind("Secret")
    annotations = rendered.workload()["spec"]["template"]["metadata"]["annotations"]
    if not expected:
        names = [s["metadata"]["name"] for s in secrets]
        assert not secrets, f"Secrets {names} rendered although every secret comes from elsewhere"
        assert "checksum/secret" not in annotations, "checksum of a Secret that is not rendered"
        return
    secret = rendered.one("Secret")
    assert secret["metadata"]["name"] == FULLNAME
    assert "stringData" not in secret, "stringData would show the values in the manifest"
    stored = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert stored == expected, f"Secret holds {sorted(stored)}, expected {sorted(expected)}"
    assert re.fullmatch(
        r"[0-9a-f]{64}", annotations.get("checksum/secret", "")
    ), "pods would not roll when a secret changes"


def check_webhook(rendered: Rendered) -> None:
    """The webhook receiver: secrets only as read-only files from a Secret (the chart's or
    existingSecret), never in the ConfigMap or an environment value; the other settings in the
    ConfigMap; nothing of it while it is off."""
    values = rendered.values
    webhook = values["webhook"]
    settings = rendered.config_map()
    container = rendered.container()
    env_list = container.get("env", [])
    env = rendered.env()
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    in_config = [k for k in settings if ANY_SECRET_SETTING.match(k)]
    assert not in_config, f"secret settings in the ConfigMap: {in_config}"
    for item in env_list:
        name = item["name"]
        if not ANY_SECRET_SETTING.match(name):
            continue
        assert name.endswith("_FILE"), f"{name} carries a secret in the pod spec"
        assert set(item) == {"name", "value"}, f"{name} is not a plain file path"
        assert item["value"].startswith("/etc/cx-gateway/"), f"{name} points at {item['value']}"
    webhook_env = {name for name in env if name.startswith("CXGW_WEBHOOK_")}
    webhook_settings = {key for key in settings if key.startswith("CXGW_WEBHOOK_")}
    if not webhook["enabled"]:
        assert not webhook_env, f"webhook variables while it is off: {sorted(webhook_env)}"
        assert not webhook_settings, f"webhook settings while it is off: {sorted(webhook_settings)}"
        assert "webhook-secrets" not in volumes, "webhook secrets mounted while it is off"
        assert not rendered.kind("Ingress") and not rendered.kind("HTTPRoute"), (
            "the webhook path is exposed while the receiver is off"
        )
        return
    assert webhook_settings == WEBHOOK_SETTINGS, f"webhook settings {sorted(webhook_settings)}"
    assert settings["CXGW_WEBHOOK_SECRET_HEADER"] == webhook["secretHeader"]
    assert settings["CXGW_WEBHOOK_TOLERANCE"] == f"{webhook['toleranceSeconds']}s"
    assert settings["CXGW_WEBHOOK_MAX_BODY_BYTES"] == str(webhook["maxBodyBytes"])
    expected_vars = {"CXGW_WEBHOOK_SECRET_FILE"}
    if webhook["requireSignature"]:
        expected_vars.add("CXGW_WEBHOOK_SIGNING_SECRET_FILE")
    assert webhook_env == expected_vars, f"webhook variables {sorted(webhook_env)}"
    directory = env["CXGW_WEBHOOK_SECRET_FILE"]["value"].rsplit("/", 1)[0]
    mount = mounts.get(directory)
    assert mount, f"nothing is mounted at {directory}"
    assert mount.get("readOnly") is True, "webhook secrets mounted writable"
    assert "subPath" not in mount, "a subPath mount never sees a Secret update"
    secret = volumes[mount["name"]].get("secret")
    assert secret, f"volume {mount['name']} is not a Secret"
    assert secret["secretName"] == (webhook["existingSecret"] or FULLNAME), secret["secretName"]
    assert secret["defaultMode"] == 0o440, "webhook secrets readable beyond the pod's group"
    paths = {item["key"]: item["path"] for item in secret["items"]}
    wanted = {}
    for variable in expected_vars:
        field, file_name = WEBHOOK_FILE_VARS[variable]
        wanted[webhook["secretKeys"][field]] = file_name
        assert env[variable]["value"] == f"{directory}/{file_name}", variable
    assert paths == wanted, f"mounted {paths}, expected {wanted}"


def check_store_settings(rendered: Rendered) -> None:
    """CXGW_STORE follows store.mode. In the PostgreSQL mode the URL reaches the pod only as a
    read-only file from a Secret (the chart's or existingSecret) through CXGW_POSTGRES_URL_FILE,
    never in the ConfigMap or an environment value; the CA bundle likewise; pool size and claim
    lease are plain settings. With the embedded store no CXGW_POSTGRES_* name is set at all (the
    gateway refuses them there)."""
    values = rendered.values
    store = values["store"]
    settings = rendered.config_map()
    env_list = rendered.container().get("env", [])
    env = rendered.env()
    assert settings["CXGW_STORE"] == store["mode"], f"CXGW_STORE {settings.get('CXGW_STORE')}"
    assert "CXGW_STORE" not in env, "CXGW_STORE beside the ConfigMap"
    postgres_settings = {key for key in settings if key.startswith("CXGW_POSTGRES_")}
    postgres_env = {item["name"] for item in env_list if item["name"].startswith("CXGW_POSTGRES_")}
    mounts = {m["name"]: m for m in rendered.container()["volumeMounts"]}
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    if not rendered.postgres():
        assert not postgres_settings and not postgres_env, "CXGW_POSTGRES_* with the embedded store"
        assert not {"postgres-url", "postgres-ca"} & (set(mounts) | set(volumes))
        return
    postgres = store["postgres"]
    assert postgres_settings == {"CXGW_POSTGRES_POOL_SIZE", "CXGW_POSTGRES_CLAIM_LEASE"}, (
        f"database settings in the ConfigMap: {sorted(postgres_settings)}"
    )
    assert settings["CXGW_POSTGRES_POOL_SIZE"] == str(postgres["poolSize"])
    assert settings["CXGW_POSTGRES_CLAIM_LEASE"] == f"{postgres['claimLeaseSeconds']}s"
    expected_env = {"CXGW_POSTGRES_URL_FILE"}
    expected_files = {"CXGW_POSTGRES_URL_FILE": (
        "postgres-url", postgres["existingSecret"] or FULLNAME, postgres["secretKey"], "url"
    )}
    if postgres["caSecretName"]:
        expected_env.add("CXGW_POSTGRES_CA_FILE")
        expected_files["CXGW_POSTGRES_CA_FILE"] = (
            "postgres-ca", postgres["caSecretName"], postgres["caSecretKey"], "ca.crt"
        )
    assert postgres_env == expected_env, f"database variables {sorted(postgres_env)}"
    for variable, (volume_name, secret_name, key, file_name) in expected_files.items():
        item = next(i for i in env_list if i["name"] == variable)
        assert set(item) == {"name", "value"}, f"{variable} is not a plain file path"
        mount = mounts[volume_name]
        assert mount.get("readOnly") is True and "subPath" not in mount, volume_name
        assert item["value"] == f"{mount['mountPath']}/{file_name}", variable
        secret = volumes[volume_name]["secret"]
        assert secret["secretName"] == secret_name, f"{volume_name} from {secret['secretName']}"
        assert secret["defaultMode"] == 0o440, f"{volume_name} readable beyond the pod's group"
        assert secret["items"] == [{"key": key, "path": file_name}], f"{volume_name} items"
    # The URL itself is in no value, by name or by reference, and in no setting.
    assert "CXGW_POSTGRES_URL" not in env and "CXGW_POSTGRES_URL" not in settings
    for item in env_list:
        reference = item.get("valueFrom", {}).get("secretKeyRef", {})
        assert reference.get("name") != (postgres["existingSecret"] or FULLNAME) or (
            reference.get("key") != postgres["secretKey"]
        ), f"{item['name']} carries the database URL"


def check_no_key_outside_secret(rendered: Rendered) -> None:
    forms = []
    secrets = [*CANARIES.values(), *WEBHOOK_CANARIES.values()]
    for canary in [*secrets, POSTGRES_URL_CANARY, POSTGRES_PASSWORD_CANARY]:
        forms += [canary, base64.b64encode(canary.encode()).decode()]
    for template, text in rendered.manifests.items():
        if template.endswith("/secret.yaml"):
            continue
        found = [form for form in forms if form in text]
        assert not found, f"{template} contains a key value"


def check_otel(rendered: Rendered) -> None:
    otel = rendered.values["otel"]
    env = rendered.env()
    names = [item["name"] for item in rendered.container().get("env", [])]
    otel_names = [n for n in names if n.startswith("OTEL_")]
    if not otel["enabled"]:
        assert not otel_names, f"OTEL_* set while otel is disabled: {otel_names}"
        return
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == otel["endpoint"]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == otel["protocol"]
    assert env["OTEL_SERVICE_NAME"]["value"] == (otel["serviceName"] or FULLNAME)
    assert env["OTEL_TRACES_SAMPLER"]["value"] == otel["sampler"]
    assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == otel["samplerArg"]
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(",")
    for attribute, variable in [
        ("k8s.namespace.name", "OTEL_K8S_NAMESPACE"),
        ("k8s.pod.name", "OTEL_K8S_POD_NAME"),
        ("k8s.node.name", "OTEL_K8S_NODE_NAME"),
    ]:
        assert f"{attribute}=$({variable})" in attributes, f"{attribute} missing"
        # $(VAR) expands only when VAR is defined earlier in the list.
        assert names.index(variable) < names.index("OTEL_RESOURCE_ATTRIBUTES")
        assert "fieldRef" in env[variable]["valueFrom"]
    for name, value in otel["resourceAttributes"].items():
        assert f"{name}={value}" in attributes, f"resource attribute {name} missing"
    if otel["headersSecret"]["name"]:
        reference = env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"]
        assert reference == {
            "name": otel["headersSecret"]["name"],
            "key": otel["headersSecret"]["key"],
        }
        assert "value" not in env["OTEL_EXPORTER_OTLP_HEADERS"]
    for name, value in otel["extraEnv"].items():
        assert env[name]["value"] == str(value), name


def check_network_policy(rendered: Rendered) -> None:
    policy_values = rendered.values["networkPolicy"]
    if not policy_values["enabled"]:
        assert not rendered.kind("NetworkPolicy")
        return
    policy = rendered.one("NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ports = rendered.values["containerPorts"]
    first = policy["ingress"][0]
    # The Segment intake's port, when it is on, is reached by the same peers.
    expected = [ports["grpc"], ports["http"]] + (
        [ports["segment"]] if rendered.values["segment"]["enabled"] else []
    )
    assert sorted(p["port"] for p in first["ports"]) == sorted(expected)
    if policy_values["allowExternal"]:
        assert "from" not in first
    else:
        peers = first["from"]
        assert {"podSelector": {"matchLabels": {f"{FULLNAME}-client": "true"}}} in peers
        if policy_values["ingressNSMatchLabels"]:
            assert any(
                p.get("namespaceSelector", {}).get("matchLabels")
                == policy_values["ingressNSMatchLabels"]
                for p in peers
            ), "namespace selector missing"
        test_pods = rendered.hook_pods()
        for pod in test_pods:
            assert (
                pod["metadata"]["labels"].get(f"{FULLNAME}-client") == "true"
            ), "helm test pod blocked"
    if policy_values["allowExternalEgress"]:
        assert policy["egress"] == [{}]
    else:
        assert {} not in policy["egress"], "egress open although allowExternalEgress is false"
        opened = {
            (p["port"], p["protocol"]) for rule in policy["egress"] for p in rule.get("ports", [])
        }
        assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= opened, f"egress ports {opened}"
        for rule in policy_values["extraEgress"]:
            assert rule in policy["egress"]


def check_pdb(rendered: Rendered) -> None:
    pdb_values = rendered.values["pdb"]
    if not pdb_values["enabled"]:
        assert not rendered.kind("PodDisruptionBudget")
        return
    spec = rendered.one("PodDisruptionBudget")["spec"]
    # Helm drops null values when merging, so an unset bound is simply absent.
    if pdb_values.get("minAvailable") is not None:
        assert (
            spec.get("minAvailable") == pdb_values["minAvailable"] and "maxUnavailable" not in spec
        )
    else:
        assert (
            spec.get("maxUnavailable") == pdb_values["maxUnavailable"]
            and "minAvailable" not in spec
        )
        # One replica and minAvailable 1 would block every node drain.
        assert spec["maxUnavailable"] != 0
    assert spec["selector"]["matchLabels"] == rendered.workload()["spec"]["selector"]["matchLabels"]


def check_exposure(rendered: Rendered) -> None:
    """Ingress and HTTPRoute carry only the webhook path to the http port; GRPCRoute the gRPC API."""
    values = rendered.values
    ingress_values = values["ingress"]
    if ingress_values["enabled"]:
        ingress = rendered.one("Ingress")["spec"]
        assert [r["host"] for r in ingress["rules"]] == ingress_values["hosts"]
        for rule in ingress["rules"]:
            paths = rule["http"]["paths"]
            assert len(paths) == 1 and paths[0]["path"] == "/webhooks/retently"
            assert paths[0]["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
        if ingress_values["tls"]:
            assert ingress["tls"] == ingress_values["tls"]
        if ingress_values["className"]:
            assert ingress["ingressClassName"] == ingress_values["className"]
    else:
        assert not rendered.kind("Ingress")
    route_values = values["httpRoute"]
    if route_values["enabled"]:
        route = rendered.one("HTTPRoute")
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        spec = route["spec"]
        assert spec["parentRefs"] == route_values["parentRefs"]
        assert spec["hostnames"] == route_values["hostnames"]
        assert spec["rules"] == [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/webhooks/retently"}}],
                "backendRefs": [{"name": FULLNAME, "port": values["service"]["ports"]["http"]}],
            }
        ], f"HTTPRoute rules {spec['rules']}"
    else:
        assert not rendered.kind("HTTPRoute")
    grpc_values = values["grpcRoute"]
    if grpc_values["enabled"]:
        route = rendered.one("GRPCRoute")
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        spec = route["spec"]
        assert spec["parentRefs"] == grpc_values["parentRefs"]
        (rule,) = spec["rules"]
        assert rule["backendRefs"] == [
            {"name": FULLNAME, "port": values["service"]["ports"]["grpc"]}
        ]
        assert GATEWAY_SERVICES, "no service found in proto/cx/gateway/v1"
        matched = [m["method"]["service"] for m in rule.get("matches", [])]
        assert matched == grpc_values["services"], f"GRPCRoute services {matched}"
        if "services" not in rendered.raw.get("grpcRoute", {}):
            # The default routes every service of the contract, and nothing else.
            assert sorted(matched) == GATEWAY_SERVICES, f"default GRPCRoute services {matched}"
        assert all(m["method"]["type"] == "Exact" for m in rule.get("matches", []))
    else:
        assert not rendered.kind("GRPCRoute")


def check_service_monitor(rendered: Rendered) -> None:
    monitor_values = rendered.values["metrics"]["serviceMonitor"]
    if not monitor_values["enabled"]:
        assert not rendered.kind("ServiceMonitor")
        return
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    for name, value in monitor_values["labels"].items():
        assert monitor["metadata"]["labels"].get(name) == value
    spec = monitor["spec"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == monitor_values["interval"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # It must select the regular Service and not the headless one (no double scraping).
    selector = spec["selector"]

    def selects(service: dict[str, Any]) -> bool:
        labels = service["metadata"]["labels"]
        if not selector["matchLabels"].items() <= labels.items():
            return False
        for expression in selector.get("matchExpressions", []):
            assert expression["operator"] == "DoesNotExist"
            if expression["key"] in labels:
                return False
        return True

    selected = [s["metadata"]["name"] for s in rendered.kind("Service") if selects(s)]
    assert selected == [FULLNAME], f"ServiceMonitor selects {selected}"


RUNBOOK = ROOT / "docs" / "runbook.md"


def runbook_sections() -> set[str]:
    """The alert names docs/runbook.md has a section for (`## CxGateway...`)."""
    return set(re.findall(r"^## (CxGateway\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE))


def check_prometheus_rule(rendered: Rendered) -> None:
    monitoring = rendered.values["monitoring"]
    rules_values = monitoring["rules"]
    if not rules_values["enabled"]:
        assert not rendered.kind("PrometheusRule")
        return
    rule = rendered.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == (rules_values["namespace"] or NAMESPACE)
    for name, value in rules_values["labels"].items():
        assert rule["metadata"]["labels"].get(name) == value, f"rule label {name}"
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    names = [alert["alert"] for alert in alerts]
    assert len(names) == len(set(names)) >= 13, f"alerts {names}"
    sections = runbook_sections()
    selector = monitoring["selector"] or f'namespace="{NAMESPACE}", job="{FULLNAME}"'
    for alert in alerts:
        name = alert["alert"]
        labels = alert["labels"]
        assert labels["severity"] in {"warning", "critical"}, f"{name} severity"
        for label, value in rules_values["alertLabels"].items():
            assert labels.get(label) == value, f"{name} lacks alert label {label}"
        annotations = alert["annotations"]
        # The description carries the values the alert fired with (its value or labels).
        assert annotations["summary"] and "{{ $" in annotations["description"], name
        assert annotations["runbook_url"] == f"{monitoring['runbookUrl']}#{name.lower()}", name
        assert name in sections, f"docs/runbook.md has no section for {name}"
        # Every gateway series is narrowed to this release (kube-state-metrics is not ours).
        for series in re.findall(r"\b((?:cxgw|rpc)_\w+)\{([^}]*)\}", alert["expr"]):
            assert series[1].startswith(selector), f"{name}: {series[0]} not selected by {selector}"
    assert sections <= set(names), f"runbook sections without an alert: {sections - set(names)}"


def check_dashboard(rendered: Rendered) -> None:
    dashboard_values = rendered.values["monitoring"]["dashboard"]
    maps = [o for o in rendered.kind("ConfigMap") if o["metadata"]["name"].endswith("-dashboard")]
    if not dashboard_values["enabled"]:
        assert not maps
        return
    (config_map,) = maps
    metadata = config_map["metadata"]
    assert metadata["namespace"] == (dashboard_values["namespace"] or NAMESPACE)
    label = dashboard_values["sidecarLabel"]
    assert metadata["labels"].get(label) == dashboard_values["sidecarLabelValue"], "sidecar label"
    assert metadata.get("annotations", {}) == dashboard_values["annotations"]
    (text,) = config_map["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    targets = [
        target for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert len(targets) >= 20, f"{len(targets)} panel queries"
    for target in targets:
        assert 'namespace="$namespace", job="$job"' in target["expr"], target["expr"]


def check_test_hook(rendered: Rendered) -> None:
    tests = rendered.values["tests"]
    pods = rendered.hook_pods()
    if not tests["enabled"]:
        assert not pods
        return
    assert len(pods) == 1, f"{len(pods)} test pods"
    pod = pods[0]
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert isinstance(spec["securityContext"]["runAsUser"], int)
    target = f"{FULLNAME}:{rendered.values['service']['ports']['grpc']}"
    tls = rendered.values["tls"]
    # The test speaks what the gRPC port speaks, and under mutual TLS shows a client certificate.
    client_cert = tls["secretName"] and tests["clientCertSecretName"]
    client_dir = "/etc/cx-gateway-test/client"
    if client_cert:
        (volume,) = spec["volumes"]
        assert volume["secret"]["secretName"] == tests["clientCertSecretName"]
        assert volume["secret"]["defaultMode"] == 0o440
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
    else:
        assert not spec.get("volumes"), "a client certificate without TLS"
    containers = spec["containers"]
    assert len(containers) == len(tests["services"])
    for container, service in zip(containers, tests["services"]):
        # Only names the gateway's health service knows: any other is NOT_FOUND, a failed test.
        assert service == "" or service in GATEWAY_SERVICES, f"unknown health service {service}"
        assert container["image"] == f"{tests['image']['repository']}:{tests['image']['tag']}"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        command = container["command"]
        if client_cert:
            assert container["volumeMounts"] == [
                {"name": "client-cert", "mountPath": client_dir, "readOnly": True}
            ]
        if tests["tool"] == "grpc_health_probe":
            assert command[0] == "grpc_health_probe"
            assert f"-addr={target}" in command and f"-service={service}" in command
            assert ("-tls" in command) == bool(tls["secretName"]), "TLS flag does not match the port"
            assert (f"-tls-client-cert={client_dir}/tls.crt" in command) == bool(client_cert)
        else:
            script = command[-1]
            assert command[:2] == ["/bin/sh", "-c"]
            assert "grpc.health.v1.Health/Check" in script and target in script
            assert json.dumps({"service": service}).replace('{"service": ', "") in script
            # grpcurl exits 0 on NOT_SERVING: the script must look at the answer.
            assert "grep -q '\"SERVING\"'" in script
            words = script.split()
            if tls["secretName"]:
                assert "-insecure" in words and "-plaintext" not in words, "plaintext to TLS"
            else:
                assert "-plaintext" in words and "-insecure" not in words
            assert ("-cert" in words) == bool(client_cert), "client certificate flag"


def check_notes(rendered: Rendered) -> None:
    notes = rendered.notes
    assert f"port-forward service/{FULLNAME}" in notes, "no port-forward instructions"
    values = rendered.values
    grpcurl = "grpcurl -cacert" if values["tls"]["secretName"] else "grpcurl -plaintext"
    assert grpcurl in notes and "grpc.health.v1.Health/Check" in notes
    callers_missing = not (
        values["sandbox"]["enabled"]
        or values["callers"]["existingSecret"]
        or values["callers"]["trustedMesh"]
    )
    assert ("no callers are configured" in notes) == callers_missing, "missing-callers warning"
    keys = values["upstreamKeys"]
    keys_missing = (
        not values["sandbox"]["enabled"]
        and not keys["existingSecret"]
        and not all(keys[f] for f in CANARIES)
    )
    assert ("upstream keys are missing" in notes) == keys_missing, "missing-keys warning wrong"
    postgres = values["store"]["mode"] == "postgres"
    assert ("persistence is disabled" in notes) == (
        not postgres and not values["persistence"]["enabled"]
    ), "persistence warning"
    assert ("STORE: PostgreSQL" in notes) == postgres, "store notes"
    policy = values["networkPolicy"]
    unreachable = (
        postgres
        and policy["enabled"]
        and not policy["allowExternalEgress"]
        and not policy["extraEgress"]
    )
    assert ("cannot reach the database" in notes) == unreachable, "database egress warning"
    kind = "deployment" if postgres else "statefulset"
    assert f"rollout status {kind}/{FULLNAME}" in notes, "rollout command names another kind"
    webhook = values["webhook"]
    assert ("Retently webhooks are received" in notes) == webhook["enabled"], "webhook notes"
    if webhook["enabled"]:
        assert f'"{webhook["secretHeader"]}: <the shared secret>"' in notes, "secret header"
        assert ("Signatures are required" in notes) == webhook["requireSignature"]
        exposed = values["ingress"]["enabled"] or values["httpRoute"]["enabled"]
        assert ("Nothing exposes them" in notes) == (not exposed), "exposure notes"


def check_image(rendered: Rendered) -> None:
    image = rendered.values["image"]
    reference = rendered.container()["image"]
    repository = (
        f"{image['registry']}/{image['repository']}" if image["registry"] else image["repository"]
    )
    if image["digest"]:
        assert reference == f"{repository}@{image['digest']}"
    else:
        chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
        assert reference == f"{repository}:{image['tag'] or chart_version}"


PROPERTY_CHECKS: list[tuple[str, Callable[[Rendered], None]]] = [
    ("labels", check_labels),
    ("workload of the store mode", check_workload),
    ("ports grpc/http", check_ports),
    ("grpc probes", check_probes),
    ("callers and tls as files", check_callers_and_tls),
    ("event rules as a file", check_event_rules),
    ("drain timing", check_drain_timing),
    ("security contexts", check_security),
    ("resources", check_resources),
    ("read-only root, data at CXGW_DATA_DIR", check_writable_paths),
    ("settings ConfigMap", check_settings),
    ("keys only as files", check_keys_are_files),
    ("chart Secret holds exactly the managed secrets", check_chart_secret),
    ("webhook secrets only as files, settings in the ConfigMap", check_webhook),
    ("store settings, database URL only as a file", check_store_settings),
    ("no key value outside the Secret", check_no_key_outside_secret),
    ("OTEL_* variables", check_otel),
    ("network policy", check_network_policy),
    ("disruption budget", check_pdb),
    ("ingress and routes", check_exposure),
    ("service monitor", check_service_monitor),
    ("alerting rules", check_prometheus_rule),
    ("dashboard ConfigMap", check_dashboard),
    ("helm test pod", check_test_hook),
    ("NOTES", check_notes),
    ("image reference", check_image),
]


# ---------------------------------------------------------------------------------------------
# Values the schema must refuse: (name, values, text the error must contain).

BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    (
        "client CA without a server certificate",
        {"tls": {"clientCaSecretName": "ca"}},
        "/tls/secretName",
    ),
    ("client auth not known", {"tls": {"clientAuth": "sometimes"}}, "/tls/clientAuth"),
    ("reload interval not a duration", {"callers": {"reloadInterval": "soon"}}, "reloadInterval"),
    ("callers inline in the ConfigMap", {"config": {"extraSettings": {"CXGW_CALLERS": "x"}}}, "CXGW_CALLERS"),
    (
        "alert rules file in the ConfigMap",
        {"config": {"extraSettings": {"CXGW_ALERT_RULES_FILE": "/x"}}},
        "CXGW_ALERT_RULES_FILE",
    ),
    ("alert rules Secret not a name", {"alerts": {"existingSecret": "Bad_Name"}}, "/alerts/existingSecret"),
    ("webhook on without a secret", {"webhook": {"enabled": True}}, "/webhook/secret"),
    (
        "webhook signature without its secret",
        {"webhook": {"enabled": True, "secret": "s", "requireSignature": True}},
        "/webhook/signingSecret",
    ),
    (
        "webhook signature with the receiver off",
        {"webhook": {"requireSignature": True, "signingSecret": "s"}},
        "/webhook/enabled",
    ),
    ("webhook enabled as a string", {"webhook": {"enabled": "true"}}, "/webhook/enabled"),
    ("webhook secret as a number", {"webhook": {"secret": 12345}}, "/webhook/secret"),
    (
        "webhook signature flag as a string",
        {"webhook": {"requireSignature": "no"}},
        "/webhook/requireSignature",
    ),
    ("unknown webhook key", {"webhook": {"secretFile": "/x"}}, "secretFile"),
    (
        "unknown webhook secret key name field",
        {"webhook": {"secretKeys": {"token": "t"}}},
        "token",
    ),
    (
        "webhook existing Secret name malformed",
        {"webhook": {"existingSecret": "Hooks_Secret"}},
        "/webhook/existingSecret",
    ),
    (
        "webhook secret key name malformed",
        {"webhook": {"secretKeys": {"secret": "webhook/secret"}}},
        "/webhook/secretKeys/secret",
    ),
    (
        "webhook header not a header name",
        {"webhook": {"secretHeader": "x cx secret"}},
        "/webhook/secretHeader",
    ),
    ("webhook header empty", {"webhook": {"secretHeader": ""}}, "/webhook/secretHeader"),
    (
        "negative webhook tolerance",
        {"webhook": {"toleranceSeconds": -300}},
        "/webhook/toleranceSeconds",
    ),
    ("zero webhook tolerance", {"webhook": {"toleranceSeconds": 0}}, "/webhook/toleranceSeconds"),
    (
        "webhook tolerance as a duration string",
        {"webhook": {"toleranceSeconds": "5m"}},
        "/webhook/toleranceSeconds",
    ),
    (
        "webhook tolerance fractional",
        {"webhook": {"toleranceSeconds": 2.5}},
        "/webhook/toleranceSeconds",
    ),
    ("negative webhook body size", {"webhook": {"maxBodyBytes": -1}}, "/webhook/maxBodyBytes"),
    (
        "webhook body size below the gateway's minimum",
        {"webhook": {"maxBodyBytes": 512}},
        "/webhook/maxBodyBytes",
    ),
    (
        "webhook body size above the gateway's maximum",
        {"webhook": {"maxBodyBytes": 67108865}},
        "/webhook/maxBodyBytes",
    ),
    (
        "webhook body size as a string",
        {"webhook": {"maxBodyBytes": "1MiB"}},
        "/webhook/maxBodyBytes",
    ),
    (
        "webhook secret inlined through extraSettings",
        {"config": {"extraSettings": {"CXGW_WEBHOOK_SECRET": "x"}}},
        "'CXGW_WEBHOOK_SECRET'",
    ),
    (
        "webhook signing secret file through extraSettings",
        {"config": {"extraSettings": {"CXGW_WEBHOOK_SIGNING_SECRET_FILE": "/x"}}},
        "'CXGW_WEBHOOK_SIGNING_SECRET_FILE'",
    ),
    (
        "webhook setting the chart owns through extraSettings",
        {"config": {"extraSettings": {"CXGW_WEBHOOK_TOLERANCE": "1h"}}},
        "'CXGW_WEBHOOK_TOLERANCE'",
    ),
    (
        "webhook secret inlined through extraEnv",
        {"extraEnv": [{"name": "CXGW_WEBHOOK_SIGNING_SECRET", "value": "x"}]},
        "/extraEnv/0/name",
    ),
    ("negative replicas", {"replicaCount": -1}, "/replicaCount"),
    ("replicas as a string", {"replicaCount": "1"}, "/replicaCount"),
    ("replicas fractional", {"replicaCount": 1.5}, "/replicaCount"),
    ("two replicas with the embedded store", {"replicaCount": 2}, "/replicaCount"),
    (
        "autoscaling with the embedded store",
        {"autoscaling": {"enabled": True}},
        "/autoscaling/enabled",
    ),
    ("store mode not built", {"store": {"mode": "redis"}}, "/store/mode"),
    ("postgres without a URL source", {"store": {"mode": "postgres"}}, "/store/postgres"),
    (
        "postgres with an empty URL and no Secret",
        {"store": {"mode": "postgres", "postgres": {"url": "", "existingSecret": ""}}},
        "/store/postgres",
    ),
    (
        "a database URL with the embedded store",
        {"store": {"postgres": {"url": "postgres://db/cx"}}},
        "/store/postgres/url",
    ),
    (
        "a database Secret with the embedded store",
        {"store": {"postgres": {"existingSecret": "cx-db-app"}}},
        "/store/postgres/existingSecret",
    ),
    ("URL as a number", {"store": {"mode": "postgres", "postgres": {"url": 5432}}}, "/store/postgres/url"),
    (
        "URL Secret name malformed",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "DB_App"}}},
        "/store/postgres/existingSecret",
    ),
    (
        "URL Secret key malformed",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "secretKey": "db/uri"}}},
        "/store/postgres/secretKey",
    ),
    (
        "CA Secret name malformed",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "caSecretName": "Db Ca"}}},
        "/store/postgres/caSecretName",
    ),
    (
        "pool size zero",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "poolSize": 0}}},
        "/store/postgres/poolSize",
    ),
    (
        "pool size above the gateway's maximum",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "poolSize": 101}}},
        "/store/postgres/poolSize",
    ),
    (
        "claim lease below the gateway's minimum",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "claimLeaseSeconds": 2}}},
        "/store/postgres/claimLeaseSeconds",
    ),
    (
        "claim lease as a duration string",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "claimLeaseSeconds": "30s"}}},
        "/store/postgres/claimLeaseSeconds",
    ),
    ("unknown store key", {"store": {"postgresUrl": "x"}}, "postgresUrl"),
    (
        "unknown postgres key",
        {"store": {"mode": "postgres", "postgres": {"existingSecret": "db", "password": "x"}}},
        "password",
    ),
    (
        "an existing claim in the postgres mode",
        {
            "store": {"mode": "postgres", "postgres": {"existingSecret": "db"}},
            "persistence": {"existingClaim": "data-cxgw-cx-gateway-0"},
        },
        "/persistence/existingClaim",
    ),
    (
        "three sandbox replicas on postgres (an emulator each)",
        {
            "sandbox": {"enabled": True},
            "store": {"mode": "postgres", "postgres": {"existingSecret": "db"}},
            "replicaCount": 3,
        },
        "/replicaCount",
    ),
    (
        "an autoscaled sandbox on postgres",
        {
            "sandbox": {"enabled": True},
            "store": {"mode": "postgres", "postgres": {"existingSecret": "db"}},
            "autoscaling": {"enabled": True},
        },
        "/autoscaling/enabled",
    ),
    (
        "database URL inlined through extraEnv",
        {"extraEnv": [{"name": "CXGW_POSTGRES_URL", "value": "postgres://db/cx"}]},
        "/extraEnv/0/name",
    ),
    (
        "database setting through extraSettings",
        {"config": {"extraSettings": {"CXGW_POSTGRES_POOL_SIZE": 4}}},
        "'CXGW_POSTGRES_POOL_SIZE'",
    ),
    (
        "database URL file through extraSettings",
        {"config": {"extraSettings": {"CXGW_POSTGRES_URL_FILE": "/x"}}},
        "'CXGW_POSTGRES_URL_FILE'",
    ),
    (
        "store engine through extraSettings",
        {"config": {"extraSettings": {"CXGW_STORE": "postgres"}}},
        "'CXGW_STORE'",
    ),
    ("unknown top-level key", {"replicas": 1}, "replicas"),
    ("unknown nested key", {"config": {"logLevel": "debug"}}, "logLevel"),
    ("unknown persistence key", {"persistence": {"sizeGi": 5}}, "sizeGi"),
    ("log format not supported", {"config": {"logFormat": "xml"}}, "/config/logFormat"),
    (
        "grace as a duration string",
        {"config": {"shutdownGraceSeconds": "20s"}},
        "/config/shutdownGraceSeconds",
    ),
    ("zero grace", {"config": {"shutdownGraceSeconds": 0}}, "/config/shutdownGraceSeconds"),
    ("drain delay as a duration string", {"drain": {"delaySeconds": "5s"}}, "/drain/delaySeconds"),
    ("negative drain delay", {"drain": {"delaySeconds": -1}}, "/drain/delaySeconds"),
    ("bad duration", {"config": {"maxConnectionAge": "30 minutes"}}, "/config/maxConnectionAge"),
    (
        "base URL not http",
        {"config": {"retently": {"baseUrl": "ftp://example.com"}}},
        "/config/retently/baseUrl",
    ),
    (
        "base URL with credentials",
        {"config": {"retainly": {"baseUrl": "https://u:p@track.retainly.app"}}},
        "/config/retainly/baseUrl",
    ),
    (
        "budget as a string",
        {"config": {"retently": {"requestsPerMinute": "150"}}},
        "/config/retently/requestsPerMinute",
    ),
    (
        "key inlined through extraSettings",
        {"config": {"extraSettings": {"CXGW_RETENTLY_API_KEY": "x"}}},
        "'CXGW_RETENTLY_API_KEY'",
    ),
    (
        "key file through extraSettings",
        {"config": {"extraSettings": {"CXGW_RETAINLY_API_SECRET_FILE": "/x"}}},
        "'CXGW_RETAINLY_API_SECRET_FILE'",
    ),
    ("non-CXGW extra setting", {"config": {"extraSettings": {"LOG": "debug"}}}, "'LOG'"),
    (
        "extra setting the chart owns",
        {"config": {"extraSettings": {"CXGW_DATA_DIR": "/x"}}},
        "'CXGW_DATA_DIR'",
    ),
    (
        "key inlined through extraEnv",
        {"extraEnv": [{"name": "CXGW_RETAINLY_API_KEY", "value": "x"}]},
        "/extraEnv/0/name",
    ),
    (
        "key as a number",
        {"upstreamKeys": {"retentlyApiKey": 12345}},
        "/upstreamKeys/retentlyApiKey",
    ),
    ("port out of range", {"containerPorts": {"grpc": 70000}}, "/containerPorts/grpc"),
    ("service port as a string", {"service": {"ports": {"http": "8080"}}}, "/service/ports/http"),
    ("service type unknown", {"service": {"type": "External"}}, "/service/type"),
    ("pull policy unknown", {"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("digest malformed", {"image": {"digest": "latest"}}, "/image/digest"),
    ("size not a quantity", {"persistence": {"size": "lots"}}, "/persistence/size"),
    (
        "access mode unknown",
        {"persistence": {"accessModes": ["ReadWriteSometimes"]}},
        "/persistence/accessModes/0",
    ),
    ("probe period zero", {"livenessProbe": {"periodSeconds": 0}}, "/livenessProbe/periodSeconds"),
    (
        "probe health service malformed",
        {"readinessProbe": {"service": "not a service"}},
        "/readinessProbe/service",
    ),
    (
        "negative preStop pause",
        {"lifecycle": {"preStopSleepSeconds": -5}},
        "/lifecycle/preStopSleepSeconds",
    ),
    (
        "boolean as a string",
        {"networkPolicy": {"allowExternal": "yes"}},
        "/networkPolicy/allowExternal",
    ),
    ("PDB with neither bound", {"pdb": {"maxUnavailable": None, "minAvailable": None}}, "/pdb"),
    ("PDB percentage malformed", {"pdb": {"maxUnavailable": "half"}}, "/pdb/maxUnavailable"),
    ("OTEL enabled without an endpoint", {"otel": {"enabled": True}}, "/otel/endpoint"),
    ("OTEL protocol unknown", {"otel": {"protocol": "thrift"}}, "/otel/protocol"),
    (
        "OTEL extra variable not OTEL_",
        {"otel": {"extraEnv": {"JAEGER_ENDPOINT": "x"}}},
        "'JAEGER_ENDPOINT'",
    ),
    (
        "OTEL headers secret without key",
        {"otel": {"headersSecret": {"name": "auth"}}},
        "/otel/headersSecret/key",
    ),
    ("ingress without hosts", {"ingress": {"enabled": True}}, "/ingress/hosts"),
    ("HTTPRoute without parents", {"httpRoute": {"enabled": True}}, "/httpRoute/parentRefs"),
    ("GRPCRoute without parents", {"grpcRoute": {"enabled": True}}, "/grpcRoute/parentRefs"),
    (
        "GRPCRoute service malformed",
        {"grpcRoute": {"services": ["Customer Service"]}},
        "/grpcRoute/services/0",
    ),
    ("test tool unknown", {"tests": {"tool": "curl"}}, "/tests/tool"),
    ("test services empty", {"tests": {"services": []}}, "/tests/services"),
    ("pod annotations not strings", {"podAnnotations": {"a": 1}}, "/podAnnotations/a"),
    (
        "alert threshold as a string",
        {"monitoring": {"rules": {"thresholds": {"outboxQueued": "1000"}}}},
        "/monitoring/rules/thresholds/outboxQueued",
    ),
    (
        "alert window not a duration",
        {"monitoring": {"rules": {"thresholds": {"deadLetterWindow": "15 minutes"}}}},
        "/monitoring/rules/thresholds/deadLetterWindow",
    ),
    (
        "error ratio above 1",
        {"monitoring": {"rules": {"thresholds": {"upstreamErrorRatio": 5}}}},
        "/monitoring/rules/thresholds/upstreamErrorRatio",
    ),
    (
        "unknown alert threshold",
        {"monitoring": {"rules": {"thresholds": {"queueDepth": 5}}}},
        "queueDepth",
    ),
    (
        "alert label overriding the severity",
        {"monitoring": {"rules": {"alertLabels": {"severity": "page"}}}},
        "'severity'",
    ),
    (
        "metrics selector with braces",
        {"monitoring": {"selector": '{job="x"}'}},
        "/monitoring/selector",
    ),
    ("runbook URL not http", {"monitoring": {"runbookUrl": "docs/runbook.md"}}, "/monitoring/runbookUrl"),
    (
        "dashboard sidecar label malformed",
        {"monitoring": {"dashboard": {"sidecarLabel": "grafana dashboard"}}},
        "/monitoring/dashboard/sidecarLabel",
    ),
]


def check_bad_values(
    chart: helm.Chart, values: dict[str, Any], fragment: str
) -> Callable[[], None]:
    def body() -> None:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmValuesError as error:
            message = str(error)
            assert "schema" in message, f"refused, but not by the schema: {message}"
            assert fragment in message, f"refused for another reason: {message.strip()}"
            return
        raise AssertionError("rendered although the values are invalid")

    return body


# ---------------------------------------------------------------------------------------------
# The guard of the webhook path: exposing it without the shared secret fails the rendering.

WEBHOOK_ON = {"webhook": {"enabled": True, "secret": WEBHOOK_CANARIES["secret"]}}
EXPOSURES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("ingress.enabled", {"ingress": {"enabled": True, "hosts": ["hooks.example.com"]}}, ["Ingress"]),
    (
        "httpRoute.enabled",
        {"httpRoute": {"enabled": True, "parentRefs": [{"name": "public"}]}},
        ["HTTPRoute"],
    ),
]
# Ways of leaving the receiver without a secret that the schema accepts, so that the template
# guard, not the schema, has to refuse them.
WITHOUT_SECRET: list[tuple[str, dict[str, Any]]] = [
    ("webhook off", {}),
    ("webhook off with a secret value", {"webhook": {"enabled": False, "secret": "x"}}),
    (
        "webhook off with an existing Secret",
        {"webhook": {"enabled": False, "existingSecret": "hooks"}},
    ),
]


def check_webhook_guard(
    chart: helm.Chart, value: str, exposure: dict[str, Any], without: dict[str, Any]
) -> Callable[[], None]:
    def body() -> None:
        values = deep_merge(exposure, without)
        chart.validate_schema(values)  # the schema lets it through; the template must not
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmRenderError as error:
            message = str(error)
            assert f"{value} exposes /webhooks/retently" in message, message
            assert "no webhook secret is configured" in message, message
            return
        raise AssertionError("the webhook path is exposed without a shared secret")

    return body


def check_webhook_exposed_with_secret(
    chart: helm.Chart, exposure: dict[str, Any], kinds: list[str]
) -> Callable[[], None]:
    def body() -> None:
        for secret in (WEBHOOK_ON, {"webhook": {"enabled": True, "existingSecret": "hooks"}}):
            rendered = Rendered(chart, deep_merge(exposure, secret))
            for kind in kinds:
                rendered.one(kind)
            check_webhook(rendered)
            check_chart_secret(rendered)

    return body


def check_ci_exposure_needs_secret(chart: helm.Chart) -> None:
    """The CI value set that exposes webhooks renders only because it configures the secret."""
    raw = yaml.safe_load((CHART / "ci" / "webhooks-ingress-values.yaml").read_text())
    assert raw["webhook"]["enabled"] is True
    assert raw["ingress"]["enabled"] and raw["httpRoute"]["enabled"]
    without = {key: value for key, value in raw.items() if key != "webhook"}
    try:
        chart.render(without, name=RELEASE, namespace=NAMESPACE)
    except helm.HelmRenderError as error:
        assert "no webhook secret is configured" in str(error), str(error)
        return
    raise AssertionError("rendered without the webhook secret")


def check_webhook_secret_rolls_pod(chart: helm.Chart) -> None:
    """The receiver reads its secrets at start: a new chart-managed value must roll the pod."""

    def checksum(values: dict[str, Any]) -> str:
        workload = Rendered(chart, values).workload()
        return workload["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    signed = {"webhook": {"enabled": True, "requireSignature": True, "secret": "a", "signingSecret": "b"}}
    first = checksum(signed)
    assert checksum(deep_merge(signed, {"webhook": {"secret": "c"}})) != first, "shared secret"
    assert checksum(deep_merge(signed, {"webhook": {"signingSecret": "d"}})) != first, "signing"


def check_test_pod_under_mutual_tls(chart: helm.Chart) -> None:
    """A required client certificate the test pod does not have would fail every `helm test`:
    the chart refuses to render it, and renders it once the certificate is named."""
    mtls = {
        "tls": {"secretName": "server", "clientCaSecretName": "ca", "clientAuth": "required"},
        "callers": {"existingSecret": "callers"},
    }
    try:
        chart.render(mtls, name=RELEASE, namespace=NAMESPACE)
    except helm.HelmRenderError as error:
        assert "needs tests.clientCertSecretName" in str(error), str(error)
    else:
        raise AssertionError("a test pod without a client certificate under required mutual TLS")
    optional = deep_merge(mtls, {"tls": {"clientAuth": "optional"}})
    check_test_hook(Rendered(chart, optional))
    with_cert = deep_merge(mtls, {"tests": {"clientCertSecretName": "test-client"}})
    for tool in ("grpcurl", "grpc_health_probe"):
        rendered = Rendered(chart, deep_merge(with_cert, {"tests": {"tool": tool}}))
        check_test_hook(rendered)
        assert rendered.hook_pods()[0]["spec"]["volumes"], "client certificate not mounted"
    disabled = deep_merge(mtls, {"tests": {"enabled": False}})
    assert not Rendered(chart, disabled).hook_pods()


def check_webhook_key_collision(chart: helm.Chart) -> None:
    """Two chart-managed secrets under one key name would silently lose one of them."""
    values = {
        "webhook": {
            "enabled": True,
            "secret": "a",
            "secretKeys": {"secret": "retently-api-key"},
        }
    }
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    except helm.HelmRenderError as error:
        assert 'key "retently-api-key" is already used' in str(error), str(error)
        return
    raise AssertionError("rendered a Secret where the webhook secret replaces an API key")


# ---------------------------------------------------------------------------------------------
# Templates the shipped schema keeps out of reach, and the image.


def check_hpa_follows_mode(chart: helm.Chart) -> None:
    """The autoscaler exists only in the PostgreSQL mode (the schema refuses it with the embedded
    store, see the bad values) and scales the Deployment, which then leaves replicas to it."""
    values = {
        "store": {"mode": "postgres", "postgres": {"existingSecret": "cx-db-app"}},
        "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    }
    rendered = Rendered(chart, values)
    hpa = rendered.one("HorizontalPodAutoscaler")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }, f"HPA target {hpa['spec']['scaleTargetRef']}"
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 3
    metrics = {
        m["resource"]["name"]: m["resource"]["target"]["averageUtilization"]
        for m in hpa["spec"]["metrics"]
    }
    assert metrics == {"cpu": 75, "memory": 80}, f"metrics {metrics}"
    assert "replicas" not in rendered.workload()["spec"], "replicas fights the HPA"
    check_workload(rendered)
    without = Rendered(chart, deep_merge(values, {"autoscaling": {"enabled": False}}))
    assert not without.kind("HorizontalPodAutoscaler")


def postgres_values(url: str = POSTGRES_URL_CANARY) -> dict[str, Any]:
    """The PostgreSQL mode with the URL in the chart's own Secret."""
    return {"store": {"mode": "postgres", "postgres": {"url": url}}, "replicaCount": 2}


def check_postgres_url_rolls_pods(chart: helm.Chart) -> None:
    """The URL is read at start: a new chart-managed value must roll the pods, and the Secret
    holds it under its key."""

    def checksum(values: dict[str, Any]) -> str:
        workload = Rendered(chart, values).workload()
        return workload["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]

    first = checksum(postgres_values())
    rotated = POSTGRES_URL_CANARY.replace(POSTGRES_PASSWORD_CANARY, "pgpw-rotated-0b61")
    assert checksum(postgres_values(rotated)) != first, "a new database password does not roll"
    assert checksum(postgres_values()) == first, "the checksum is not stable"
    rendered = Rendered(chart, deep_merge(postgres_values(), {"upstreamKeys": dict(CANARIES)}))
    secret = rendered.one("Secret")
    stored = base64.b64decode(secret["data"]["postgres-url"]).decode()
    assert stored == POSTGRES_URL_CANARY, "the Secret does not hold the URL"
    check_store_settings(rendered)
    check_chart_secret(rendered)
    check_no_key_outside_secret(rendered)


def check_postgres_key_collision(chart: helm.Chart) -> None:
    """The URL under a key name another chart-managed secret uses would replace that secret."""
    values = deep_merge(
        postgres_values(), {"store": {"postgres": {"secretKey": "retently-api-key"}}}
    )
    try:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    except helm.HelmRenderError as error:
        message = str(error)
        assert 'store.postgres.secretKey: key "retently-api-key" is already used' in message, message
        assert POSTGRES_PASSWORD_CANARY not in message, "the refusal shows the database password"
        return
    raise AssertionError("rendered a Secret where the database URL replaces an API key")


def check_refusal_hides_url(chart: helm.Chart) -> None:
    """A value set refused for any reason never repeats the database URL in the error (the
    schema checks the URL by type only: a pattern would print a refused value whole)."""
    refused = [
        deep_merge(postgres_values(), {"sandbox": {"enabled": True}}),
        deep_merge(postgres_values(), {"store": {"mode": "embedded"}}),
        deep_merge(postgres_values(), {"store": {"postgres": {"poolSize": 0}}}),
    ]
    for values in refused:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmValuesError as error:
            assert POSTGRES_PASSWORD_CANARY not in str(error), f"the error shows the URL: {error}"
            continue
        raise AssertionError("rendered although the values are invalid")


def check_database_egress_warning(chart: helm.Chart) -> None:
    """Egress limited to DNS and HTTPS shuts the pods out of the database: the notes say so until
    an extraEgress rule is given."""
    closed = deep_merge(postgres_values(), {"networkPolicy": {"allowExternalEgress": False}})
    rendered = Rendered(chart, closed)
    assert "cannot reach the database" in rendered.notes, "no warning"
    check_notes(rendered)
    rule = {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 5432, "protocol": "TCP"}]}
    opened = Rendered(chart, deep_merge(closed, {"networkPolicy": {"extraEgress": [rule]}}))
    assert "cannot reach the database" not in opened.notes, "warning despite an egress rule"
    check_network_policy(opened)


def check_sandbox_on_postgres(chart: helm.Chart) -> None:
    """`serve --sandbox` runs with CXGW_STORE=postgres (its emulator in the pod, the store in the
    database), so one replica renders; more are refused (see the bad values), since each pod's
    emulator would be a different upstream behind one shared outbox."""
    values = deep_merge(postgres_values(), {"sandbox": {"enabled": True}, "replicaCount": 1})
    rendered = Rendered(chart, values)
    assert rendered.container()["args"] == ["serve", "--sandbox"]
    assert rendered.workload()["spec"]["replicas"] == 1
    check_store_settings(rendered)
    check_keys_are_files(rendered)
    check_chart_secret(rendered)


def check_dockerfile() -> None:
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages = [c for c in commands if c.cmd.upper() == "FROM"]
    assert len(stages) == 2, f"{len(stages)} stages"
    assert stages[0].value[0] == "rust:1.95-bookworm", f"builder {stages[0].value}"
    assert stages[1].value[0].startswith("gcr.io/distroless/cc-debian12:nonroot"), stages[1].value
    final = commands[commands.index(stages[1]) :]
    by_name: dict[str, list[Any]] = {}
    for command in final:
        by_name.setdefault(command.cmd.upper(), []).append(command)
    assert [c.value for c in by_name["ENTRYPOINT"]] == [("/usr/local/bin/cx-gateway",)]
    assert by_name["ENTRYPOINT"][0].json, "ENTRYPOINT must be exec form (signals reach the gateway)"
    assert [c.value for c in by_name["CMD"]] == [("serve",)]
    assert sorted(v for c in by_name["EXPOSE"] for v in c.value) == ["50051", "8080"]
    uid, gid = image_uid_gid()
    assert uid != 0 and gid != 0
    build = " ".join(" ".join(c.value) for c in commands if c.cmd.upper() == "RUN")
    assert "--release" in build and "--locked" in build, "not a locked release build"
    assert not by_name.get("ADD"), "ADD in the final stage"
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    data_env = [v for c in by_name.get("ENV", []) for v in c.value]
    assert chart_values["persistence"]["mountPath"] in data_env, "image and chart data dirs differ"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".git", "target", ".venv", "node_modules"):
        assert entry in ignored, f".dockerignore lacks {entry}"


def check_cli(all_rendered: list[tuple[str, Rendered]]) -> None:
    """The command operators run, over every rendered built-in object of every value set."""
    with tempfile.TemporaryDirectory() as scratch:
        files = []
        for set_name, rendered in all_rendered:
            objects = [obj for _, obj in rendered.objects if obj["kind"] not in CRD_KINDS]
            path = Path(scratch) / f"{set_name.removesuffix('.yaml')}.yaml"
            path.write_text(yaml.safe_dump_all(objects))
            files.append(str(path))
        assert len(files) == len(value_sets()), "a value set did not render"
        command = [str(Path(sys.executable).with_name("kubernetes-validate")), "--strict"]
        for version in KUBE_VERSIONS:
            command += ["-k", version]
        result = subprocess.run(command + files, capture_output=True, text=True, timeout=300)
        lines = (result.stdout + result.stderr).splitlines()
        problems = "\n  ".join(line for line in lines if not line.startswith("INFO "))
        assert result.returncode == 0 and not problems, f"exit {result.returncode}:\n  {problems}"
        passed = [line for line in lines if " passed for resource " in line]
        assert len(passed) >= 6 * len(files) * len(KUBE_VERSIONS), f"{len(passed)} validations"


def check_values_documented() -> None:
    """Every key in values.yaml has a comment on the line above or on its own line."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^\s*([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        previous = next((p for p in reversed(lines[:number]) if p.strip()), "")
        if previous.strip().startswith("#") or "#" in line.split(":", 1)[1]:
            continue
        undocumented.append(f"{number + 1}: {match.group(1)}")
    assert not undocumented, f"values without a comment: {undocumented}"


# Texts whose setting and value names must exist: the operations guide, the values file and the
# templates (the install notes, the messages of the guards).
NAMED_IN = [
    ROOT / "docs" / "operations.md",
    ROOT / "docs" / "runbook.md",
    CHART / "values.yaml",
    *sorted(p for p in (CHART / "templates").rglob("*") if p.is_file()),
]
# OTEL_* variables read by the OpenTelemetry SDK itself rather than by the gateway's code.
SDK_OTEL_NAMES = {"OTEL_BSP_MAX_QUEUE_SIZE"}
# Dotted names that are files, not values (tls.crt in a kubernetes.io/tls Secret).
# API groups that look like value names (the top-level value `monitoring`).
API_GROUPS = {"monitoring.coreos.com"}
FILE_SUFFIXES = {"crt", "key", "pem", "toml", "db", "yaml", "json", "md", "txt", "sh"}


def settings_read_by_gateway() -> tuple[set[str], set[str]]:
    """CXGW_* names the gateway reads (with the _FILE form of every secret setting) and the
    OTEL_* names or name prefixes its code mentions."""
    cxgw: set[str] = set()
    otel: set[str] = set()
    for source in (ROOT / "src").rglob("*.rs"):
        text = source.read_text()
        cxgw.update(re.findall(r'"(CXGW_[A-Z0-9_]+)"', text))
        cxgw.update(f"{name}_FILE" for name in re.findall(r'secret\("(CXGW_[A-Z0-9_]+)"\)', text))
        otel.update(re.findall(r'"(OTEL_[A-Z0-9_]+)', text))
    return cxgw, otel


def check_named_settings_exist() -> None:
    """Every CXGW_* and OTEL_* variable the guide, the values file and the notes name is one the
    gateway (or the chart, or the OpenTelemetry SDK) reads."""
    cxgw, otel = settings_read_by_gateway()
    assert "CXGW_WEBHOOK_SECRET_FILE" in cxgw and "CXGW_GRPC_ADDR" in cxgw, "settings not found"
    # The pod template lives in _helpers.tpl, so every template file counts.
    chart_text = "".join(
        path.read_text() for path in (CHART / "templates").rglob("*") if path.is_file()
    )
    chart_otel = set(re.findall(r"\b(OTEL_[A-Z0-9_]*[A-Z0-9])\b", chart_text))
    unknown = []
    for path in NAMED_IN:
        text = path.read_text()
        for name in sorted(set(re.findall(r"\b(CXGW_[A-Z0-9_]*[A-Z0-9])\b", text))):
            if name not in cxgw:
                unknown.append(f"{path.relative_to(ROOT)}: {name}")
        for name in sorted(set(re.findall(r"\b(OTEL_[A-Z0-9_]*[A-Z0-9])\b", text))):
            known = (
                name in chart_otel
                or name in SDK_OTEL_NAMES
                or any(name == o or (o.endswith("_") and name.startswith(o)) for o in otel)
            )
            if not known:
                unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, f"names the gateway does not read: {unknown}"


def check_named_values_exist() -> None:
    """Every chart value the guide, the values file and the notes name (`webhook.secretHeader`,
    `--set callers.existingSecret=...`) exists in values.yaml."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    top = "|".join(sorted(values, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./$-])((?:{top})(?:\.(?:[A-Za-z][A-Za-z0-9]*|\{{[A-Za-z0-9,]+\}}))+)")
    missing = []
    checked = 0
    for path in NAMED_IN:
        for name in sorted(set(pattern.findall(path.read_text()))):
            if name.rsplit(".", 1)[-1] in FILE_SUFFIXES or name in API_GROUPS:
                continue
            # upstreamKeys.secretKeys.{a,b} names several values.
            head, _, tail = name.partition(".{")
            names = [f"{head}.{leaf}" for leaf in tail.rstrip("}").split(",")] if tail else [name]
            for full in names:
                checked += 1
                node: Any = values
                for part in full.split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.append(f"{path.relative_to(ROOT)}: {full}")
                        break
                    node = node[part]
    assert checked >= 50, f"only {checked} value names found"
    assert not missing, f"values that do not exist: {missing}"


def check_package() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        archive = helm.package(str(CHART), destination=scratch)
        assert Path(archive).name == "cx-gateway-0.1.0.tgz", archive
        with helm.Chart.load(archive) as packaged:
            assert packaged.schema is not None, "the schema is not in the package"
            packaged.render(None, name=RELEASE, namespace=NAMESPACE)


def value_sets() -> list[tuple[str, dict[str, Any]]]:
    sets = [("default", {})]
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        sets.append((path.name, yaml.safe_load(path.read_text()) or {}))
    return sets


def with_canaries(values: dict[str, Any]) -> dict[str, Any]:
    """The value set with recognisable key, webhook secret and database URL values, for those the
    chart stores itself."""
    keys = values.get("upstreamKeys", {})
    if not (keys.get("existingSecret") or values.get("sandbox", {}).get("enabled")):
        values = deep_merge(values, {"upstreamKeys": dict(CANARIES)})
    webhook = values.get("webhook", {})
    if webhook.get("enabled") and not webhook.get("existingSecret"):
        canaries = {"secret": WEBHOOK_CANARIES["secret"]}
        if webhook.get("requireSignature"):
            canaries["signingSecret"] = WEBHOOK_CANARIES["signingSecret"]
        values = deep_merge(values, {"webhook": canaries})
    store = values.get("store", {})
    if store.get("mode") == "postgres" and not store.get("postgres", {}).get("existingSecret"):
        values = deep_merge(values, {"store": {"postgres": {"url": POSTGRES_URL_CANARY}}})
    return values


def main() -> int:
    results = Results()
    print(
        f"helm sdk {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}, "
        f"kubernetes {', '.join(KUBE_VERSIONS)}"
    )
    with helm.Chart.load(str(CHART)) as chart:
        sets = value_sets()

        def enough_sets() -> None:
            assert len(sets) - 1 >= 3, f"only {len(sets) - 1} value sets under ci/"

        results.check("ci value sets present", enough_sets)
        all_rendered: list[tuple[str, Rendered]] = []
        for set_name, raw in sets:
            results.check(
                f"[{set_name}] schema accepts", lambda raw=raw: chart.validate_schema(raw)
            )
            results.check(f"[{set_name}] lint --strict", check_lint(raw))
            results.check(f"[{set_name}] renders", lambda raw=raw: Rendered(chart, raw))
            # The same set again with canary key values, for the key-handling checks.
            canary_holder: dict[str, Rendered] = {}

            def render_canaries(raw: dict[str, Any] = raw) -> None:
                canary_holder["r"] = Rendered(chart, with_canaries(raw))

            if not results.check(f"[{set_name}] renders with key values", render_canaries):
                continue
            rendered = canary_holder["r"]
            all_rendered.append((set_name, rendered))
            for version in KUBE_VERSIONS:
                results.check(
                    f"[{set_name}] kubernetes-validate --strict {version}",
                    check_kubernetes_validate(rendered, version),
                )
            for check_name, check in PROPERTY_CHECKS:
                results.check(f"[{set_name}] {check_name}", lambda check=check: check(rendered))
        for name, values, fragment in BAD_VALUES:
            results.check(
                f"[bad values] {name} is refused", check_bad_values(chart, values, fragment)
            )
        for value, exposure, kinds in EXPOSURES:
            for without_name, without in WITHOUT_SECRET:
                results.check(
                    f"[webhook guard] {value} with {without_name} fails to render",
                    check_webhook_guard(chart, value, exposure, without),
                )
            results.check(
                f"[webhook guard] {value} renders with a webhook secret",
                check_webhook_exposed_with_secret(chart, exposure, kinds),
            )
        results.check(
            "[webhook guard] the CI exposure set fails without its webhook section",
            lambda: check_ci_exposure_needs_secret(chart),
        )
        results.check(
            "[webhook] a changed webhook secret rolls the pod",
            lambda: check_webhook_secret_rolls_pod(chart),
        )
        results.check(
            "[helm test] under mutual TLS the test pod needs a client certificate",
            lambda: check_test_pod_under_mutual_tls(chart),
        )
        results.check(
            "[webhook] a webhook secret key name cannot replace another secret",
            lambda: check_webhook_key_collision(chart),
        )
        results.check(
            "[cli] kubernetes-validate --strict accepts every rendered manifest",
            lambda: check_cli(all_rendered),
        )
        results.check(
            "[hpa] the autoscaler scales the Deployment of the PostgreSQL mode",
            lambda: check_hpa_follows_mode(chart),
        )
        results.check(
            "[postgres] a changed database URL rolls the pods",
            lambda: check_postgres_url_rolls_pods(chart),
        )
        results.check(
            "[postgres] the URL's key name cannot replace another secret",
            lambda: check_postgres_key_collision(chart),
        )
        results.check(
            "[postgres] a refused value set never shows the database URL",
            lambda: check_refusal_hides_url(chart),
        )
        results.check(
            "[postgres] the notes warn when egress shuts out the database",
            lambda: check_database_egress_warning(chart),
        )
        results.check(
            "[postgres] the sandbox runs one replica on PostgreSQL",
            lambda: check_sandbox_on_postgres(chart),
        )
    results.check(
        "[image] Dockerfile: locked release build, distroless, non-root", check_dockerfile
    )
    results.check("[values] every value is documented", check_values_documented)
    results.check("[docs] every CXGW_*/OTEL_* name in the guide exists", check_named_settings_exist)
    results.check("[docs] every chart value the guide names exists", check_named_values_exist)
    results.check("[package] chart packages and renders from the archive", check_package)
    print(f"{results.passed} passed, {results.failed} failed")
    return 0 if results.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
