#!/usr/bin/env bash
# The grpcurl suite: starts the built binary with `serve --sandbox` on free loopback ports and
# drives it the way a person with grpcurl would. Each case checks grpcurl's exit code (64 + the
# gRPC code on errors) and what it printed. Usage: tests/grpcurl/run.sh path/to/cx-gateway
set -uo pipefail
binary=${1:?usage: run.sh path/to/cx-gateway}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill "$gateway_pid" 2>/dev/null; wait "$gateway_pid" 2>/dev/null; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
admin_port=$(free_port)
addr="127.0.0.1:${grpc_port}"

# An empty event rules file (no rules); the cases write rules into it and send SIGHUP.
rules_file="$work/rules.toml"
: >"$rules_file"
CXGW_GRPC_ADDR="$addr" CXGW_ADMIN_ADDR="127.0.0.1:${admin_port}" CXGW_LOG_FORMAT=json \
  CXGW_EVENT_RULES_FILE="$rules_file" CXGW_SHUTDOWN_GRACE=5s "$binary" serve --sandbox >"$work/gateway.log" 2>&1 &
gateway_pid=$!

# The gateway logs "gateway serving" once both listeners are bound; wait for that line.
for _ in $(seq 1 300); do
  grep -q '"gateway serving"' "$work/gateway.log" && break
  kill -0 "$gateway_pid" 2>/dev/null || { cat "$work/gateway.log"; echo "the gateway exited early"; exit 1; }
  sleep 0.1
done

passed=0
failed=0
# case NAME EXPECTED_EXIT GREP_PATTERN... -- GRPCURL_ARGS...
case_() {
  local name=$1 expected=$2
  shift 2
  local patterns=()
  while [ "$1" != "--" ]; do patterns+=("$1"); shift; done
  shift
  local out rc
  out=$(grpcurl -plaintext -emit-defaults "$@" 2>&1)
  rc=$?
  local ok=1
  [ "$rc" -eq "$expected" ] || ok=0
  for pattern in "${patterns[@]}"; do
    grep -qE -- "$pattern" <<<"$out" || { ok=0; echo "  missing: $pattern"; }
  done
  if [ "$ok" -eq 1 ]; then
    passed=$((passed + 1)); echo "ok   $name"
  else
    failed=$((failed + 1)); echo "FAIL $name (exit $rc, expected $expected)"; sed 's/^/  | /' <<<"$out" | head -40
  fi
}

source "$here/cases.sh"

# A clean drain on SIGTERM: exit code 0.
kill -TERM "$gateway_pid"
if wait "$gateway_pid"; then
  passed=$((passed + 1)); echo "ok   drains and exits 0 on SIGTERM"
else
  failed=$((failed + 1)); echo "FAIL drains and exits 0 on SIGTERM"; tail -20 "$work/gateway.log"
fi
gateway_pid=

echo "grpcurl: ${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
