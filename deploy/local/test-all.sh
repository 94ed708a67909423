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

# ---- supply chain and fuzzing (deny.toml, protocols/fuzz) ----
echo "== supply chain: licenses, bans and sources of Cargo.lock (cargo-deny; deny.toml says what is not checked)"
cargo deny --locked check --hide-inclusion-graph licenses bans sources
echo "== fuzz targets on their committed corpora, ${WEIR_FUZZ_SECONDS:-30} s each"
if rustup run nightly rustc --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    protocols/fuzz/run.sh --check "${WEIR_FUZZ_SECONDS:-30}"
else
    echo "fuzz: SKIPPED: no nightly toolchain or no cargo-fuzz (deploy/local/install-deps.sh installs them)"
fi
# ---- end of supply chain and fuzzing ----

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"; stop_started' EXIT
# --show-output: the fault tests print the verifier's counts.
cargo test --workspace -j"$jobs" --locked -- --show-output 2>&1 | tee "$log"
# One closing line for the whole suite (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

echo "== deployment artifacts (deploy/check.sh; every weir config through this build's weir check)"
WEIR_BIN="${CARGO_TARGET_DIR:-target}/debug/weir" deploy/check.sh
