#!/usr/bin/env bash
# Chart checks: installs the tools into .venv at the repository root (PyPI only; everything else
# runs offline), then lints, renders and validates helm/cx-gateway and its value sets, asserts the
# properties operators rely on, and feeds the schema a table of bad values.
# Prints `N passed, N failed` last and exits non-zero on any failure.
set -uo pipefail
cd "$(dirname "$0")/../.."

setup() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || return 1
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt
}

if ! setup; then
  echo "could not install the chart check tools listed in tests/helm/requirements.txt"
  echo "0 passed, 1 failed"
  exit 1
fi
exec .venv/bin/python tests/helm/check_chart.py
