#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need (Python tools
# into .venv, buf and the Node client's packages from npm, Go, prometheus, sqlite3 and
# PostgreSQL from Debian, cargo-fuzz from crates.io), starts a throw-away PostgreSQL cluster for
# the store's tests (scripts/postgres.sh; removed at exit), then formatting and lints, the Rust
# unit and integration tests, the grpcurl suite against the built binary, the Python, Node and
# Go client tests, Segment's Python library against the Segment intake, the client guide's
# and README snippet checks, the contract lint and breaking-change guard, the Helm chart checks (and
# the chart's PostgreSQL mode run with the built gateway), the
# monitoring checks (promtool, a real Prometheus), a quick benchmark smoke run and a short fuzz
# run. Prints one line per suite and a closing summary.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

passed=0
failed=0
failures=()
suite() {
  local name=$1
  shift
  echo "::: ${name}"
  if "$@"; then
    passed=$((passed + 1))
    echo "::: ${name}: ok"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "::: ${name}: FAILED"
  fi
}

setup_python() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || return 1
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
}

# The store fault suite runs the sqlite3 command its recovery message names.
setup_debian() {
  command -v sqlite3 >/dev/null 2>&1 && return 0
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  "${sudo[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq sqlite3 >/dev/null
}

rust_lints() {
  cargo fmt --all -- --check && cargo clippy --workspace --all-targets --locked -- -D warnings
}

rust_tests() {
  if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
  else
    cargo test --workspace --locked --no-fail-fast
  fi
}

# The Node caller and Segment's Node library against the Segment intake: the pinned packages (npm
# ci, skipped while the lock file is unchanged), then
# node's test runner against the built binary.
node_client() {
  local stamp=tests/node/node_modules/.cxgw-lock-sha256
  local lock
  lock=$(sha256sum tests/node/package-lock.json | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$lock" ]; then
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error) || return 1
    echo "$lock" >"$stamp"
  fi
  (cd tests/node && CXGW_BINARY="$root/target/debug/cx-gateway" node --test client.test.js segment.test.js)
}

build_binary() {
  cargo build --locked --workspace --bins
}

echo "::: setup"
if ! setup_python; then
  echo "::: setup: FAILED (python tools)"
  echo "suites: 0 passed, 1 failed"
  exit 1
fi
export PATH="$root/.venv/bin:$PATH"
if ! setup_debian; then
  echo "::: setup: FAILED (debian packages)"
  echo "suites: 0 passed, 1 failed"
  exit 1
fi

# The PostgreSQL engine's tests run against a real server; they fail rather than skip without it.
source scripts/postgres.sh
trap postgres_stop EXIT
if ! postgres_start; then
  echo "::: setup: FAILED (postgresql)"
  echo "suites: 0 passed, 1 failed"
  exit 1
fi
export CXGW_TEST_REQUIRE_POSTGRES=1

suite "rust lints" rust_lints
suite "rust tests" rust_tests
if build_binary; then
  suite "grpcurl suite" bash tests/grpcurl/run.sh target/debug/cx-gateway
  suite "python client" .venv/bin/python tests/python/test_client.py target/debug/cx-gateway
  # Segment's own Python library against the Segment intake.
  suite "segment library" .venv/bin/python tests/python/test_segment.py target/debug/cx-gateway
  suite "node client" node_client
  suite "go client" bash tests/go/run.sh target/debug/cx-gateway
  # A scaled-down run of every benchmark scenario, so the benchmark cannot rot; it asserts no
  # timing, it only has to complete and print its table.
  suite "bench smoke" target/debug/cx-gateway-bench --quick --json target/bench-quick.json
  # Alerting rules (promtool) and every dashboard and alert query against a real Prometheus.
  suite "monitoring" bash tests/monitoring/check.sh target/debug/cx-gateway
  # The chart's PostgreSQL mode as rendered (settings, environment, Secret files), run as two
  # replicas of the built gateway on the test database.
  suite "helm chart on postgres" bash tests/helm/run_on_postgres.sh target/debug/cx-gateway
else
  failed=$((failed + 1))
  failures+=("build")
fi
suite "client guide snippets" python3 scripts/check-doc-snippets.py
suite "readme snippets" python3 scripts/check-doc-snippets.py README.md
suite "contract lint" bash scripts/buf-lint.sh
suite "contract guard" bash scripts/buf-breaking.sh
suite "helm chart" bash tests/helm/check.sh
# About a minute of fuzzing in all (12 s per target) from the committed seeds; a long run is
# `scripts/fuzz.sh SECONDS`. Last, since its first build is the longest step.
suite "fuzz smoke" bash scripts/fuzz.sh 12

if [ "$failed" -gt 0 ]; then
  echo "failed suites: ${failures[*]}"
fi
echo "suites: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
