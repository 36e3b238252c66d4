#!/usr/bin/env bash
# The monitoring checks: renders the chart's alerting rules and dashboard (tests/monitoring/render.py),
# runs `promtool check rules` and `promtool test rules` (a firing and a silent case per alert),
# then evaluates every dashboard query and alert expression against a real Prometheus scraping a
# gateway on the sandbox (tests/monitoring/live.py). Installs Debian's `prometheus` (which brings
# promtool) when it is missing. Usage: tests/monitoring/check.sh path/to/cx-gateway
set -uo pipefail
binary=${1:?usage: check.sh path/to/cx-gateway}
cd "$(dirname "$0")/../.."
root=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  # The package's service is not started: its postinst only enables it under systemd.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) \
    >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; echo "cannot install prometheus"; exit 1; }
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || exit 1
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt || exit 1
# grpcurl for the scenario.
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt || exit 1
export PATH="$root/.venv/bin:$PATH"

status=0
.venv/bin/python tests/monitoring/render.py "$work" || exit 1
promtool check rules "$work/rules.yml" || status=1
# promtool resolves rule_files next to the test file.
cp tests/monitoring/alerts_test.yml "$work/"
promtool test rules "$work/alerts_test.yml" || status=1
.venv/bin/python tests/monitoring/live.py "$binary" "$work" || status=1
exit "$status"
