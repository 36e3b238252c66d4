"""Renders the chart's alerting rules and dashboard the way an install would (Helm v4 SDK,
default thresholds, release "cxgw" in namespace "cx") and writes what Prometheus and Grafana
would load into OUT_DIR: rules.yml (the PrometheusRule's spec, a plain Prometheus rule file) and
dashboard.json (the ConfigMap's JSON). So promtool and the live check test the shipped rules.

Usage: render.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cx-gateway"
RELEASE = "cxgw"
NAMESPACE = "cx"
VALUES = {"monitoring": {"rules": {"enabled": True}, "dashboard": {"enabled": True}}}


class RuleDumper(yaml.SafeDumper):
    """Writes multi-line expressions as literal blocks, so promtool's messages quote them as the
    template wrote them."""


RuleDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(VALUES, name=RELEASE, namespace=NAMESPACE)
    objects = [
        document
        for template, text in manifests.items()
        if template.endswith(".yaml")
        for document in yaml.safe_load_all(text)
        if document
    ]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    (dashboard,) = [
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")
    ]
    (out / "rules.yml").write_text(
        yaml.dump(rule["spec"], Dumper=RuleDumper, sort_keys=False, width=100)
    )
    (out / "dashboard.json").write_text(dashboard["data"]["cx-gateway.json"])
    groups = rule["spec"]["groups"]
    alerts = sum(len(group["rules"]) for group in groups)
    print(f"rendered {alerts} alerts in {len(groups)} groups and the dashboard into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
