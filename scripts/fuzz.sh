#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (see fuzz/README.md): each for SECONDS (default 60), or
# only the targets named after it. Installs cargo-fuzz when `cargo fuzz` is missing, builds the
# targets once (nightly, debug assertions on, no sanitizer), runs each from its committed seeds
# (fuzz/seeds/<target>) plus its working corpus (fuzz/corpus/<target>, not committed), and prints
# one line per target with the number of inputs run. Exits non-zero on the first crash; the
# crashing input is left in fuzz/artifacts/<target>/ (replay: cargo +nightly fuzz run -a -s none
# <target> <file>).
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh 600 tokens      # one target, 10 minutes
#   FUZZ_RUNS=1000000 scripts/fuzz.sh 0 webhook   # a fixed number of inputs instead of a time
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all_targets=(write_requests upstream_json webhook tokens config_files)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=("${all_targets[@]}")
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# The same flags for build and run, or `cargo fuzz run` rebuilds. No sanitizer: the code under
# test is safe Rust, where panics and overflow checks (debug assertions) find the bugs, and
# AddressSanitizer would double the build and halve the speed.
flags=(-a -s none)
# The committed lock file must be current (cargo fuzz has no --locked of its own).
cargo +nightly metadata --quiet --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null
# Every target at once: they share the build of the gateway library.
if ! build_log=$(cargo +nightly fuzz build "${flags[@]}" 2>&1); then
  echo "$build_log" >&2
  echo "fuzz: the targets do not build" >&2
  exit 1
fi

total=0
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/${target}"
  log="fuzz/artifacts/${target}.log"
  mkdir -p fuzz/artifacts
  limit=(-max_total_time="${seconds}")
  if [ -n "${FUZZ_RUNS:-}" ]; then
    limit=(-runs="${FUZZ_RUNS}")
  fi
  # -rss_limit_mb and -timeout turn memory blow-ups and hangs into failures too; -max_len keeps
  # inputs near the size of real messages' interesting parts.
  if ! cargo +nightly fuzz run "${flags[@]}" "$target" "fuzz/corpus/${target}" "fuzz/seeds/${target}" -- \
    "${limit[@]}" -rss_limit_mb=2048 -timeout=10 -max_len=8192 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: ${target} FAILED (log: ${log}, inputs in fuzz/artifacts/${target}/)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -n 1)
  runs=${runs:-0}
  total=$((total + runs))
  echo "fuzz: ${target}: ${runs} inputs, no crash"
done
echo "fuzz: ${total} inputs in all, no crash"
