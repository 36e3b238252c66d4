#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs what the tests need (Python tools
# into .venv, buf from npm), then formatting and lints, the Rust unit and integration tests, the
# grpcurl suite against the built binary, the Python client test, a short fuzz run, the contract
# lint, the Helm chart checks and a quick benchmark smoke run. Prints one line per suite and a
# closing summary.
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

build_binary() {
  cargo build --locked --bin cx-gateway
}

echo "::: setup"
if ! setup_python; then
  echo "::: setup: FAILED (python tools)"
  echo "suites: 0 passed, 1 failed"
  exit 1
fi
export PATH="$root/.venv/bin:$PATH"

suite "rust lints" rust_lints
suite "rust tests" rust_tests
if build_binary; then
  suite "grpcurl suite" bash tests/grpcurl/run.sh target/debug/cx-gateway
  suite "python client" .venv/bin/python tests/python/test_client.py target/debug/cx-gateway
  # A scaled-down run of every benchmark scenario, so the benchmark cannot rot; it asserts no
  # timing, it only has to complete and print its table.
  suite "bench smoke" target/debug/cx-gateway bench --quick --json target/bench-quick.json
else
  failed=$((failed + 1))
  failures+=("build")
fi
# About a minute of fuzzing in all (12 s per target) from the committed seeds; a long run is
# `scripts/fuzz.sh SECONDS`.
suite "fuzz smoke" bash scripts/fuzz.sh 12
suite "contract lint" bash scripts/buf-lint.sh
suite "helm chart" bash tests/helm/check.sh

if [ "$failed" -gt 0 ]; then
  echo "failed suites: ${failures[*]}"
fi
echo "suites: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
