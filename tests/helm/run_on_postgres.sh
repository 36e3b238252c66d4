#!/usr/bin/env bash
# The chart's PostgreSQL mode run with the built gateway (tests/helm/run_on_postgres.py), with the
# chart check tools installed into .venv as check.sh does. Needs CXGW_TEST_POSTGRES_URL (set by
# scripts/postgres.sh and scripts/test.sh).
#
#   scripts/postgres.sh bash tests/helm/run_on_postgres.sh target/debug/cx-gateway
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv || exit 1
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/helm/requirements.txt || exit 1
exec .venv/bin/python tests/helm/run_on_postgres.py "$@"
