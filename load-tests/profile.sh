#!/usr/bin/env bash
# Where weir's CPU time goes under one load: a flat `perf` profile of the weir process (symbols
# with their share of samples, and the same summed per crate) while `weir-load run` drives it.
#
#   load-tests/profile.sh [--sink blackhole|sqlite|postgres|kafka] [--qos 0|1]
#                         [--connections 100] [--rate 0] [--seconds 10] [--no-build]
#
# Builds release binaries (they carry debug info), starts weir with the sink on 127.0.0.1:1887
# (ops 9107, a temporary data_dir, per-device rates off as in bench.sh), starts the load (MQTT
# 3.1.1, 128 B JSON, --rate messages per second per device, 0 = flat out), waits 2 s, records
# `perf record -F 999` of weir for --seconds, and prints the top of `perf report`. The postgres
# sink writes table weir_profile on PG_URL (deploy/local/postgres.sh's by default), the kafka
# sink a new topic weir-profile-PID on 127.0.0.1:9092 (deploy/local/kafka.sh); both must run. With --rate
# and --connections it profiles the devices-10k shape too (e.g. --connections 10000 --rate 10).
# stdout: a header, the load's result line, the profile. Needs perf (linux-perf); exit 1 without.
set -euo pipefail

readonly HOST=127.0.0.1
readonly MQTT_PORT=1887
readonly OPS_PORT=9107
readonly WEIR_READY_TIMEOUT=30
readonly WEIR_STOP_TIMEOUT=30

sink=blackhole
qos=1
connections=100
rate=0
seconds=10
build=1
while (($# > 0)); do
    case $1 in
    --sink | --qos | --connections | --rate | --seconds)
        (($# >= 2)) || { echo "profile: $1 needs a value" >&2; exit 64; }
        case $1 in
        --sink) sink=$2 ;;
        --qos) qos=$2 ;;
        --connections) connections=$2 ;;
        --rate) rate=$2 ;;
        --seconds) seconds=$2 ;;
        esac
        shift 2
        ;;
    --no-build) build=0; shift ;;
    *) echo "profile: unknown argument '$1'" >&2; exit 64 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
log() { echo "profile: $*" >&2; }
weir_pid=
load_pid=
# shellcheck source=load-tests/common.sh
source "$ROOT/load-tests/common.sh"
TARGET_DIR=$(cargo_target_dir)
export CARGO_TARGET_DIR=$TARGET_DIR
readonly WEIR=$TARGET_DIR/release/weir LOAD=$TARGET_DIR/release/weir-load
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weir-profile.XXXXXX")
readonly WORK

cleanup() {
    [[ -z $load_pid ]] || kill "$load_pid" 2>/dev/null || true
    stop_weir
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v perf >/dev/null || { log "perf is not installed (apt-get install linux-perf)"; exit 1; }
if ((build)); then
    (cd "$ROOT" && cargo build --release -j2 -p weir -p weir-load >&2)
fi

case $sink in
blackhole | sqlite) sink_config= ;;
postgres) sink_config="url = \"${PG_URL:-postgres://weir@127.0.0.1:5433/weir}\"
table = \"weir_profile\"" ;;
kafka) sink_config="brokers = \"127.0.0.1:9092\"
topic = \"weir-profile-$$\"" ;;
*) log "unknown sink '$sink'"; exit 64 ;;
esac
cat >"$WORK/weir.toml" <<EOF
data_dir = "$WORK/data"
[ops]
listen = "$HOST:$OPS_PORT"
[[listeners]]
protocol = "mqtt"
listen = "$HOST:$MQTT_PORT"
max_messages_per_s = 0
max_bytes_per_s = 0
max_connections = 20000
max_connections_per_ip = 0
max_connection_rate = 0
[sink]
kind = "$sink"
$sink_config
EOF
cat >"$WORK/load.toml" <<EOF
name = "profile"
duration_s = $((seconds + 4))
[target]
mqtt = "$HOST:$MQTT_PORT"
connect_concurrency = 64
[[devices]]
name = "profile"
count = $connections
protocol = "mqtt3"
qos = $qos
rate = $rate
max_inflight = 100
EOF

machine_header "weir profile: sink=$sink qos=$qos connections=$connections rate=$rate seconds=$seconds"
"$WEIR" run --config "$WORK/weir.toml" >"$WORK/weir.log" 2>&1 &
weir_pid=$!
waited=0
until http_ok "http://$HOST:$OPS_PORT/healthz"; do
    ((waited < WEIR_READY_TIMEOUT * 10)) || { log "weir did not start"; tail -20 "$WORK/weir.log" >&2; exit 1; }
    sleep 0.1
    waited=$((waited + 1))
done
"$LOAD" run "$WORK/load.toml" --label weir --quiet --json "$WORK/load.json" --html "$WORK/load.html" \
    --cpu-pid "$weir_pid" >"$WORK/load.out" &
load_pid=$!
sleep 2
perf record -F 999 -p "$weir_pid" -o "$WORK/perf.data" -- sleep "$seconds" 2>"$WORK/perf.err" >&2
wait "$load_pid" || true
load_pid=
cat "$WORK/load.out"
echo "# top symbols (self time, share of weir's samples)"
perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -v -e '^#' -e '^$' | sed 's/ *$//' | cut -c1-150 | head -40 || true # head closes the pipe
echo "# by object (kernel = syscalls, network stack, page cache)"
perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null |
    grep -v -e '^#' -e '^$' | sed 's/ *$//' | head -10 || true
