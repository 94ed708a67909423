#!/usr/bin/env bash
# weir's memory per idle device connection, per protocol.
#
#   load-tests/idle.sh [--connections 10000] [--protocols mqtt,ws,tcp] [--no-build]
#                      [-- IDLE_ARGS...]
#
# IDLE_ARGS go to every `weir-load idle` run, e.g. `-- --settle-secs 10 --warmup 200`.
# Builds release weir and weir-load (cargo build --release -j2 -p weir -p weir-load), raises the
# open-file soft limit to the hard limit (ulimit -n), then for each protocol in turn: writes a
# config with that protocol's listener (mqtt 127.0.0.1:21883, ws 127.0.0.1:28080, tcp
# 127.0.0.1:27000 with length_prefixed framing; max_connections 20000; no idle timeout), the
# blackhole sink and ops on 127.0.0.1:29100; starts weir from ${CARGO_TARGET_DIR:-target}/release
# (a relative CARGO_TARGET_DIR is taken from the repository root); waits for /readyz; runs
# `weir-load idle` (N connections spread over source addresses 127.0.0.2-127.0.0.5, each doing
# one acknowledged message, then idle; weir's RSS before and after); stops weir.
#
# Each protocol gets a fresh weir: memory that one protocol's closed connections leave in weir's
# allocator (freed, but still resident) would otherwise be reused by the next protocol's
# connections and hide their cost; and a protocol weir does not serve yet (weir refuses to start
# with it) does not keep the others from being measured.
#
# stdout: a header (machine, date, commit), each run's JSON line and SUMMARY line, then a table.
# stderr: build output and progress. weir is stopped on exit, whatever happens.
# Exit: 0 every protocol within its target (2048 B mqtt/tcp, 8192 B ws); 3 one was over its
# target; 1 setup failed or a protocol could not be measured (weir did not start or get ready,
# a listener did not answer or closed connections).
set -euo pipefail

readonly HOST=127.0.0.1
readonly OPS_PORT=29100
readonly SOURCE_ADDRS=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
readonly MAX_CONNECTIONS=20000
readonly WEIR_READY_TIMEOUT=${WEIR_READY_TIMEOUT:-30}
readonly WEIR_STOP_TIMEOUT=${WEIR_STOP_TIMEOUT:-30}
readonly ALL_PROTOCOLS="mqtt ws tcp"
# Warm-up connections and spare descriptors on top of --connections (see `weir-load idle --help`).
readonly FD_MARGIN=1000

connections=10000
protocols=$ALL_PROTOCOLS
build=1
idle_args=()

usage() {
    echo "usage: $0 [--connections N] [--protocols mqtt,ws,tcp] [--no-build] [-- IDLE_ARGS...]" >&2
    exit 64
}

while (($# > 0)); do
    case $1 in
    --connections)
        (($# >= 2)) || usage
        [[ $2 =~ ^[0-9]+$ && $2 -gt 0 ]] || {
            echo "idle: --connections needs a positive integer, got '$2'" >&2
            exit 64
        }
        connections=$2
        shift 2
        ;;
    --protocols)
        (($# >= 2)) || usage
        protocols=${2//,/ }
        for protocol in $protocols; do
            [[ " $ALL_PROTOCOLS " == *" $protocol "* ]] || {
                echo "idle: unknown protocol '$protocol' (known: ${ALL_PROTOCOLS// /,})" >&2
                exit 64
            }
        done
        [[ -n ${protocols// /} ]] || usage
        shift 2
        ;;
    --no-build)
        build=0
        shift
        ;;
    --)
        shift
        idle_args=("$@")
        break
        ;;
    -h | --help) usage ;;
    *)
        echo "idle: unknown argument '$1'" >&2
        usage
        ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# cargo_target_dir, http_ok, port_taken, machine_header, stop_weir.
# shellcheck source=common.sh
source "$ROOT/load-tests/common.sh"
readonly ROOT
CARGO_TARGET_DIR=$(cargo_target_dir)
export CARGO_TARGET_DIR
readonly TARGET_DIR=$CARGO_TARGET_DIR
readonly LOAD=$TARGET_DIR/release/weir-load
readonly WEIR=$TARGET_DIR/release/weir
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weir-idle.XXXXXX")
readonly WORK

weir_pid=
weir_failure= # why the last start_weir failed, for the table
failed=0
over_target=0
declare -a rows=()

log() {
    echo "idle: $*" >&2
}

die() {
    log "$*"
    exit 1
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_weir || true
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

listener_port() {
    case $1 in
    mqtt) echo 21883 ;;
    ws) echo 28080 ;;
    tcp) echo 27000 ;;
    esac
}

# The listener's TOML table for a protocol.
listener_config() {
    local protocol=$1 port
    port=$(listener_port "$1")
    echo "[[listeners]]"
    echo "protocol = \"$protocol\""
    echo "listen = \"$HOST:$port\""
    echo "max_connections = $MAX_CONNECTIONS"
    # Every simulated device comes from one address, as fast as it can connect.
    echo "max_connections_per_ip = 0"
    echo "max_connection_rate = 0"
    case $protocol in
    ws) echo "idle_timeout_ms = 0" ;;
    tcp)
        echo "framing = \"length_prefixed\""
        echo "idle_timeout_ms = 0"
        ;;
    esac
}

header() {
    machine_header "weir idle connections"
    echo "# scenario: $connections idle connections per protocol ($protocols), sources $SOURCE_ADDRS," \
        "open-file limit $(ulimit -n), extra idle args: ${idle_args[*]:-none}"
}

# start_weir PROTOCOL: writes the config, starts weir, waits for /readyz. Fails (after printing
# weir's last log lines) if weir exits or is not ready in time.
start_weir() {
    local protocol=$1 port config=$WORK/weir-$1.toml weir_log=$WORK/weir-$1.log waited=0
    port=$(listener_port "$protocol")
    weir_failure=
    for taken in "$port" "$OPS_PORT"; do
        if port_taken "$taken"; then
            weir_failure="port $taken on $HOST is already in use (another weir?)"
            log "$weir_failure"
            return 1
        fi
    done
    mkdir -p "$WORK/data-$protocol"
    {
        echo "data_dir = \"$WORK/data-$protocol\""
        echo
        echo "[ops]"
        echo "listen = \"$HOST:$OPS_PORT\""
        echo
        listener_config "$protocol"
        echo
        echo "[sink]"
        echo "kind = \"blackhole\""
    } >"$config"
    log "starting weir for $protocol (config $config, log $weir_log)"
    "$WEIR" run --config "$config" >"$weir_log" 2>&1 &
    weir_pid=$!
    until http_ok "http://$HOST:$OPS_PORT/readyz"; do
        if ! kill -0 "$weir_pid" 2>/dev/null; then
            wait "$weir_pid" 2>/dev/null || true
            weir_pid=
            weir_failure="weir exited: $(tail -n 1 "$weir_log" | sed 's/^weir: //')"
            log "weir exited before /readyz answered ($protocol); last log lines:"
            tail -n 20 "$weir_log" >&2 || true
            return 1
        fi
        if ((waited >= WEIR_READY_TIMEOUT * 10)); then
            weir_failure="weir not ready within ${WEIR_READY_TIMEOUT}s"
            log "weir not ready within ${WEIR_READY_TIMEOUT}s ($protocol); last log lines:"
            tail -n 20 "$weir_log" >&2 || true
            stop_weir
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    log "weir is ready (pid $weir_pid, $protocol on $HOST:$port)"
}


# json_number FILE KEY: the top-level number KEY of the JSON line in FILE.
json_number() {
    sed -n "s/.*\"$2\":\(-\{0,1\}[0-9][0-9.]*\).*/\1/p" "$1" | head -n 1
}

# row PROTOCOL RESULT [JSON_FILE]
row() {
    local protocol=$1 result=$2 json=${3:-} before=- after=- per=- anon=- target=-
    if [[ -n $json && -s $json ]]; then
        before=$(($(json_number "$json" rss_before) / 1024))KiB
        after=$(($(json_number "$json" rss_after) / 1024))KiB
        per=$(json_number "$json" bytes_per_connection)
        anon=$(json_number "$json" anon_bytes_per_connection)
        target=$(json_number "$json" target_bytes)
    fi
    rows+=("$(printf '%-8s %11s %14s %14s %9s %9s %8s  %s' \
        "$protocol" "$connections" "$before" "$after" "$per" "$anon" "$target" "$result")")
}

# measure PROTOCOL: one fresh weir, one `weir-load idle` run, one table row.
measure() {
    local protocol=$1 port status=0 out=$WORK/idle-$1.json err=$WORK/idle-$1.err reason
    port=$(listener_port "$protocol")
    if ! start_weir "$protocol"; then
        failed=1
        row "$protocol" "ERROR: $weir_failure"
        echo "SUMMARY idle-$protocol: not measured: $weir_failure"
        return
    fi
    log "weir-load idle --protocol $protocol --connections $connections"
    RUST_LIB_BACKTRACE=0 "$LOAD" idle --protocol "$protocol" --connections "$connections" --target "$HOST:$port" \
        --weir-pid "$weir_pid" --source-addrs "$SOURCE_ADDRS" "${idle_args[@]}" >"$out" 2>"$err" ||
        status=$?
    cat "$err" >&2
    stop_weir
    cat "$out"
    case $status in
    0) row "$protocol" PASS "$out" ;;
    3)
        over_target=1
        row "$protocol" "FAIL: over target" "$out"
        ;;
    *)
        failed=1
        # anyhow's error and its causes, on one line.
        reason=$(awk '/^Error: /{found=1} found' "$err" | grep -v -e '^\s*$' -e '^Caused by:' |
            sed 's/^Error: //; s/^ *//; s/^[0-9]*: //' | sed ':a;N;$!ba;s/\n/: /g')
        row "$protocol" "ERROR: ${reason:-weir-load idle exited $status}"
        echo "SUMMARY idle-$protocol: not measured: ${reason:-weir-load idle exited $status}"
        ;;
    esac
    sleep 2 # let the closed sockets' TIME_WAITs and weir's port go before the next run
}

hard_limit=$(ulimit -Hn)
if [[ $hard_limit != unlimited ]] && ((hard_limit < connections + FD_MARGIN)); then
    die "--connections $connections needs about $((connections + FD_MARGIN)) open files per process," \
        "but the hard limit is $hard_limit; lower --connections or raise the hard limit"
fi
ulimit -n "$hard_limit"

if ((build)); then
    log "building release binaries (cargo build --release -j2 -p weir -p weir-load)"
    (cd "$ROOT" && cargo build --release -j2 -p weir -p weir-load >&2) || die "the release build failed"
fi
[[ -x $WEIR && -x $LOAD ]] || die "$WEIR or $LOAD is missing; run without --no-build"

header
for protocol in $protocols; do
    measure "$protocol"
done

echo
printf '%-8s %11s %14s %14s %9s %9s %8s  %s\n' protocol connections rss_before rss_after B/conn \
    anon_B/conn target result
printf '%s\n' "${rows[@]}"

if ((failed)); then
    exit 1
elif ((over_target)); then
    exit 3
fi
