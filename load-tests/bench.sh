#!/usr/bin/env bash
# End-to-end ingest benchmark: weir against a Mosquitto baseline, measured in the same run.
#
#   load-tests/bench.sh [--connections 100] [--duration 10] [--payload 128] [-- FLOOD_ARGS...]
#
# FLOOD_ARGS go to every `weir-load flood` run, e.g. `-- --max-inflight 10 --tcp-nodelay false`.
# Builds release binaries, starts Mosquitto (deploy/local/mosquitto.sh, port 1884) and weir
# (MQTT 127.0.0.1:1885, ops 127.0.0.1:9105, a temporary data_dir), then runs `weir-load flood`
# against each:
#   qos0-blackhole  QoS 0, Mosquitto vs weir with the blackhole sink
#   qos1-blackhole  QoS 1, Mosquitto vs weir with the blackhole sink
#   qos1-sqlite     QoS 1, weir committing to SQLite; the baseline is Mosquitto's QoS 1 ingest
#                   from qos1-blackhole (Mosquitto persists nothing, so it is an upper bound)
# stdout: a header (machine, commit), every JSON result line, one SUMMARY line per scenario.
# stderr: build output and progress. Everything this script started is stopped on exit.
# Exit: 0 all ran; 1 setup failed; 2 weir was not ready (Mosquitto baselines still reported).
set -euo pipefail

readonly MOSQUITTO_PORT=1884
readonly WEIR_MQTT_PORT=1885
readonly WEIR_OPS_PORT=9105
readonly HOST=127.0.0.1
readonly WEIR_READY_TIMEOUT=${WEIR_READY_TIMEOUT:-30}
readonly WEIR_STOP_TIMEOUT=${WEIR_STOP_TIMEOUT:-30}

connections=100
duration=10
payload=128
flood_args=()

usage() {
    echo "usage: $0 [--connections N] [--duration SECONDS] [--payload BYTES] [-- FLOOD_ARGS...]" >&2
    exit 64
}

while (($# > 0)); do
    case $1 in
    --connections | --duration | --payload)
        (($# >= 2)) || usage
        [[ $2 =~ ^[0-9]+$ && $2 -gt 0 ]] || {
            echo "bench: $1 needs a positive integer, got '$2'" >&2
            exit 64
        }
        case $1 in
        --connections) connections=$2 ;;
        --duration) duration=$2 ;;
        --payload) payload=$2 ;;
        esac
        shift 2
        ;;
    --)
        shift
        flood_args=("$@")
        break
        ;;
    -h | --help) usage ;;
    *)
        echo "bench: unknown argument '$1'" >&2
        usage
        ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly MOSQUITTO_SH=$ROOT/deploy/local/mosquitto.sh
readonly LOAD=$ROOT/target/release/weir-load
readonly WEIR=$ROOT/target/release/weir
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weir-bench.XXXXXX")
readonly WORK
RUN_ID=$(date +%s)
readonly RUN_ID

mosquitto_started=0
weir_pid=
weir_ready=1
weir_unready_reason=

log() {
    echo "bench: $*" >&2
}

die() {
    log "$*"
    exit 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_weir || true
    if ((mosquitto_started)); then
        "$MOSQUITTO_SH" stop "$MOSQUITTO_PORT" || true
    fi
    if ((status == 0)); then
        rm -rf "$WORK"
    else
        log "logs and configs kept in $WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 0 when an HTTP GET of the URL returns 2xx.
http_ok() {
    local url=$1 port path reply
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null
        return
    fi
    port=${url#http://"$HOST":}
    path=/${port#*/}
    port=${port%%/*}
    reply=$(
        exec 3<>"/dev/tcp/$HOST/$port" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$HOST" >&3
        timeout 2 head -n 1 <&3
    ) 2>/dev/null || return 1
    [[ $reply == HTTP/1.?" 2"* ]]
}

# 0 when something accepts TCP connections on the port.
port_taken() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

header() {
    local model mem_kib commit
    model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') || true
    mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null) || true
    commit=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]]; then
        commit+=-dirty
    fi
    echo "# weir bench $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine: nproc=$(nproc) cpu=\"${model:-unknown}\" mem=$((${mem_kib:-0} / 1024))MiB kernel=$(uname -r)"
    echo "# commit: $commit"
    echo "# scenario: connections=$connections duration=${duration}s payload=${payload}B" \
        "extra flood args: ${flood_args[*]:-none}; generator, Mosquitto and weir share these CPUs"
}

build() {
    log "building release binaries (cargo build --release -j2 -p weir -p weir-load)"
    if (cd "$ROOT" && cargo build --release -j2 -p weir -p weir-load >&2); then
        return
    fi
    log "the workspace build failed; retrying weir-load alone to tell whose failure it is"
    (cd "$ROOT" && cargo build --release -j2 -p weir-load >&2) ||
        die "weir-load (load-tests/) does not build; nothing can be measured"
    weir_ready=0
    weir_unready_reason="GATEWAY NOT READY: target/release/weir does not build (see the cargo errors above)"
    log "$weir_unready_reason; running the Mosquitto baselines only"
}

start_mosquitto() {
    if "$MOSQUITTO_SH" status "$MOSQUITTO_PORT" >/dev/null; then
        log "Mosquitto already running on $MOSQUITTO_PORT; using it and leaving it running"
    else
        "$MOSQUITTO_SH" start "$MOSQUITTO_PORT"
        mosquitto_started=1
    fi
}

# start_weir SINK: writes a config for the sink, starts weir and waits for /healthz.
start_weir() {
    local sink=$1
    local data_dir=$WORK/data-$sink config=$WORK/weir-$sink.toml weir_log=$WORK/weir-$sink.log
    local waited=0
    local port
    for port in "$WEIR_MQTT_PORT" "$WEIR_OPS_PORT"; do
        if port_taken "$port"; then
            die "port $port on $HOST is already in use; stop whatever holds it (another weir?)"
        fi
    done
    mkdir -p "$data_dir"
    cat >"$config" <<EOF
data_dir = "$data_dir"

[ops]
listen = "$HOST:$WEIR_OPS_PORT"

[[listeners]]
protocol = "mqtt"
listen = "$HOST:$WEIR_MQTT_PORT"

[sink]
kind = "$sink"
EOF
    log "starting weir with the $sink sink (config $config, log $weir_log)"
    "$WEIR" run --config "$config" >"$weir_log" 2>&1 &
    weir_pid=$!
    until http_ok "http://$HOST:$WEIR_OPS_PORT/healthz"; do
        if ! kill -0 "$weir_pid" 2>/dev/null; then
            wait "$weir_pid" 2>/dev/null || true
            weir_pid=
            weir_unready_reason="GATEWAY NOT READY: 'weir run' exited before /healthz answered (sink $sink)"
            log "$weir_unready_reason; last log lines:"
            tail -n 20 "$weir_log" >&2 || true
            return 1
        fi
        if ((waited >= WEIR_READY_TIMEOUT * 10)); then
            weir_unready_reason="GATEWAY NOT READY: no answer from http://$HOST:$WEIR_OPS_PORT/healthz within ${WEIR_READY_TIMEOUT}s (sink $sink)"
            log "$weir_unready_reason; last log lines:"
            tail -n 20 "$weir_log" >&2 || true
            stop_weir
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    log "weir is healthy (pid $weir_pid)"
}

# SIGTERM lets weir flush and ack what it holds; SIGKILL only after the grace period.
stop_weir() {
    local waited=0
    [[ -n $weir_pid ]] || return 0
    if kill -TERM "$weir_pid" 2>/dev/null; then
        while kill -0 "$weir_pid" 2>/dev/null; do
            if ((waited >= WEIR_STOP_TIMEOUT * 10)); then
                log "weir (pid $weir_pid) still running ${WEIR_STOP_TIMEOUT}s after SIGTERM; killing it"
                kill -KILL "$weir_pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    wait "$weir_pid" 2>/dev/null || true
    log "weir stopped (pid $weir_pid)"
    weir_pid=
}

# flood LABEL PORT QOS: runs one flood, prints its JSON line, keeps it in $WORK/LABEL-qosQOS.json.
flood() {
    local label=$1 port=$2 qos=$3 out=$WORK/$1-qos$3.json
    log "flood: $label qos$qos on port $port"
    if ! "$LOAD" flood --host "$HOST" --port "$port" --connections "$connections" --qos "$qos" \
        --payload-bytes "$payload" --duration-secs "$duration" \
        --client-prefix "bench-$RUN_ID-$label-q$qos" --label "$label" "${flood_args[@]}" >"$out"; then
        log "flood against $label (qos$qos) got nothing through; see the errors above"
    fi
    cat "$out"
    sleep 2 # let sockets close and the servers settle before the next run
}

# summary SCENARIO BASELINE_JSON CANDIDATE_JSON
summary() {
    local scenario=$1 baseline=$2 candidate=$3
    if ((weir_ready)) && [[ -s $candidate ]]; then
        "$LOAD" compare --scenario "$scenario" --baseline "$baseline" --candidate "$candidate"
    else
        echo "SUMMARY $scenario: no weir result; $weir_unready_reason"
    fi
}

# Many simulated devices need many descriptors, in the generator and in the servers.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

header
build
start_mosquitto

# (a) and (b): blackhole sink, one weir instance.
flood mosquitto "$MOSQUITTO_PORT" 0
if ((weir_ready)) && start_weir blackhole; then
    flood weir-blackhole "$WEIR_MQTT_PORT" 0
else
    weir_ready=0
fi
summary qos0-blackhole "$WORK/mosquitto-qos0.json" "$WORK/weir-blackhole-qos0.json"

flood mosquitto "$MOSQUITTO_PORT" 1
if ((weir_ready)); then
    flood weir-blackhole "$WEIR_MQTT_PORT" 1
    stop_weir
fi
summary qos1-blackhole "$WORK/mosquitto-qos1.json" "$WORK/weir-blackhole-qos1.json"

# (c): SQLite sink; Mosquitto has no equivalent, so its QoS 1 ingest from (b) is the baseline.
if ((weir_ready)) && start_weir sqlite; then
    flood weir-sqlite "$WEIR_MQTT_PORT" 1
    stop_weir
else
    weir_ready=0
fi
summary "qos1-sqlite (baseline: Mosquitto QoS 1 ingest from qos1-blackhole, no persistence)" \
    "$WORK/mosquitto-qos1.json" "$WORK/weir-sqlite-qos1.json"

if ((!weir_ready)); then
    log "$weir_unready_reason"
    exit 2
fi
