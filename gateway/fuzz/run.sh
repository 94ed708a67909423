#!/usr/bin/env bash
# Runs the gateway's fuzz targets (all of them, or those named) for <seconds> each, at the
# lowest CPU priority, growing corpus/<target>. Crashes land in artifacts/<target>/; each one
# becomes a fix, a unit test and an input in the corpus (replayed by `cargo test`).
#
#   gateway/fuzz/run.sh <seconds> [target...]
#   gateway/fuzz/run.sh 600 wal_segments
#
# Afterwards, `cargo +nightly fuzz cmin <target>` shrinks the corpus before committing it.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:?usage: run.sh <seconds> [target...]}
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

for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    echo "== fuzzing $target for ${seconds}s"
    # -timeout: one input running longer than 10 s is a hang, reported like a crash.
    nice -n 19 cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1
done
