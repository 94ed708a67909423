#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need, starts the real
# services they use, runs lints and every test, and stops what it started.
#
#   deploy/local/test-all.sh            (what .ci/run and the README call)
set -euo pipefail
cd "$(dirname "$0")/../.."

deploy/local/install-deps.sh

# Real services the tests talk to; stopped again at the end only if this script started them.
started=()
stop_started() {
    for service in "${started[@]}"; do
        deploy/local/"$service".sh stop || true
    done
}
trap stop_started EXIT
for service in kafka postgres mosquitto; do
    if ! deploy/local/"$service".sh status >/dev/null; then
        deploy/local/"$service".sh start
        started+=("$service")
    fi
done

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
jobs=${CARGO_BUILD_JOBS:-2}

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -j"$jobs" --locked -- -D warnings

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"; stop_started' EXIT
# --show-output: the fault tests print the verifier's counts.
cargo test --workspace -j"$jobs" --locked -- --show-output 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
