#!/usr/bin/env bash
# Runs the protocol fuzz targets (all of them, or those named) for <seconds> each, one after the
# other, at the lowest CPU priority. Crashes land in artifacts/<target>/; each one becomes a
# fix, a unit test and an input in the corpus (replayed by `cargo test`, see
# protocols/tests/fuzz_corpus.rs). The gateway's own targets run with gateway/fuzz/run.sh;
# deploy/local/fuzz-all.sh runs both.
#
#   protocols/fuzz/run.sh <seconds> [target...]           grows corpus/<target>
#   protocols/fuzz/run.sh --check <seconds> [target...]   the committed corpus stays as it is, and
#                                                          the seed is fixed (WEIR_FUZZ_SEED)
#                                                          (CI: new inputs go to a scratch dir)
#   protocols/fuzz/run.sh 600 mqtt_session
#
# Afterwards, shrink a grown corpus before committing it, keeping every coverage edge (not every
# hit-count variant) and the `regression-*` inputs by name (move them aside, cmin, move back):
#   cargo +nightly fuzz cmin <target> -- -use_counters=0
set -euo pipefail
cd "$(dirname "$0")"

check=false
if [[ ${1:-} == --check ]]; then
    check=true
    shift
fi
seconds=${1:?usage: run.sh [--check] <seconds> [target...]}
shift
[[ $seconds =~ ^[0-9]+$ ]] || { echo "run.sh: <seconds> must be a whole number, got '$seconds'" >&2; exit 64; }

# shellcheck source=deploy/local/fuzz-toolchain.sh
source ../../deploy/local/fuzz-toolchain.sh
require_cargo_fuzz

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# One build for every target (cargo fuzz run would otherwise check the build once per target).
nice -n 19 cargo +nightly fuzz build

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    dirs=("corpus/$target")
    if $check; then
        # libFuzzer writes what it finds into the first directory it is given.
        mkdir -p "$scratch/$target"
        dirs=("$scratch/$target" "corpus/$target")
    fi
    echo "== fuzzing $target for ${seconds}s"
    # -timeout: one input running longer than 10 s is a hang, reported like a crash.
    run=(nice -n 19 cargo +nightly fuzz run "$target" "${dirs[@]}" --
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1)
    # CI walks the same mutation sequence every time (a fixed seed), so a run on a fast machine
    # covers a longer prefix of what a slow one covers and a passing commit stays passing; new
    # ground is for the long runs without --check. WEIR_FUZZ_SEED picks another sequence.
    $check && run+=(-seed="${WEIR_FUZZ_SEED:-1}")
    if ! $check; then
        "${run[@]}" || failed+=("$target")
        continue
    fi
    # CI: libFuzzer's progress lines only when something failed.
    log="$scratch/$target.log"
    if "${run[@]}" >"$log" 2>&1; then
        grep -E '^(INFO: seed corpus|stat::number_of_executed_units|stat::peak_rss_mb|Done )' "$log" || true
    else
        tail -n 80 "$log"
        failed+=("$target")
    fi
done
if ((${#failed[@]} > 0)); then
    echo "run.sh: crashes in ${failed[*]} (inputs in protocols/fuzz/artifacts/)" >&2
    exit 1
fi
