#!/usr/bin/env bash
# Edge footprint: weir's stripped release binary and its idle memory with the default config,
# side by side with Mosquitto (Debian's package) measured the same way in the same run.
#
#   load-tests/footprint.sh [--no-build] [--settle-secs 5]
#
# Builds release weir (cargo build --release -j2 -p weir), strips a copy (the size an edge
# device ships), starts it with exactly `weir default-config` but its ports moved out of the way
# (MQTT 127.0.0.1:31883, ops 127.0.0.1:31900: below the ephemeral port range, which outgoing
# connections of other programs draw from) and a temporary data_dir, waits for /readyz and
# --settle-secs, and reads VmRSS (with its RssAnon and RssFile parts), VmHWM and threads from
# /proc. Then the same for Mosquitto with the config deploy/local/mosquitto.sh writes (port
# 31884). Both idle: no connection at all.
#
# The page cache: the stripped copy is written back and dropped from the page cache before weir
# starts (dd oflag=nocache), as for the first start of an installed binary after a boot, so the
# figure does not depend on how the copy happened to be cached. About 10 MB of RSS is weir's
# own file pages, clean and shared with the page cache (RssFile; Mosquitto's is its shared
# libraries). On a kernel that maps whole page-cache folios on a fault (6.18 here) that is about
# 80% of the binary's mapped size, whichever way it was cached: measured 10.2-10.8 MiB of
# RssFile both freshly copied and dropped first. What weir allocates is RssAnon.
#
# stdout: a header (machine, date, commit), one line per process, one SUMMARY line.
# Exit: 0 both within the target (15 MB binary, 15 MB idle RSS); 3 over it; 1 setup failed.
set -euo pipefail

readonly HOST=127.0.0.1
readonly MQTT_PORT=31883
readonly OPS_PORT=31900
readonly MOSQUITTO_PORT=31884
readonly TARGET_BYTES=$((15 * 1000 * 1000))
readonly WEIR_READY_TIMEOUT=${WEIR_READY_TIMEOUT:-30}
readonly WEIR_STOP_TIMEOUT=${WEIR_STOP_TIMEOUT:-30}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
readonly ROOT
readonly MOSQUITTO_SH=$ROOT/deploy/local/mosquitto.sh
# shellcheck source=load-tests/common.sh
source "$ROOT/load-tests/common.sh"

build=1
settle=5
while (($# > 0)); do
    case $1 in
    --no-build) build=0; shift ;;
    --settle-secs)
        [[ ${2:-} =~ ^[0-9]+$ ]] || { echo "footprint: --settle-secs needs whole seconds" >&2; exit 64; }
        settle=$2
        shift 2
        ;;
    *) echo "usage: $0 [--no-build] [--settle-secs N]" >&2; exit 64 ;;
    esac
done

log() {
    echo "footprint: $*" >&2
}

WORK=$(mktemp -d)
readonly WORK
weir_pid=
mosquitto_started=0
cleanup() {
    stop_weir || true
    if ((mosquitto_started)); then
        "$MOSQUITTO_SH" stop "$MOSQUITTO_PORT" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# status_kib PID FIELD: a /proc/PID/status field in KiB (VmRSS, VmHWM), or Threads.
status_field() {
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"
}

CARGO_TARGET_DIR=$(cargo_target_dir)
export CARGO_TARGET_DIR
if ((build)); then
    log "building release weir (cargo build --release -j2 -p weir)"
    (cd "$ROOT" && cargo build --release -j2 -p weir >&2)
fi
WEIR=$CARGO_TARGET_DIR/release/weir
[[ -x $WEIR ]] || { log "no release weir at $WEIR"; exit 1; }
cp "$WEIR" "$WORK/weir"
strip "$WORK/weir"
weir_bytes=$(stat -c %s "$WORK/weir")
unstripped_bytes=$(stat -c %s "$WEIR")
# Written back and out of the page cache: a first start, not one from a freshly written copy.
dd of="$WORK/weir" oflag=nocache conv=notrunc,fdatasync count=0 status=none </dev/null

# The default config, as shipped, with the ports moved and the data in the work dir.
"$WORK/weir" default-config |
    sed -e "s#^data_dir = .*#data_dir = \"$WORK/data\"#" \
        -e "s#127.0.0.1:1883#$HOST:$MQTT_PORT#" \
        -e "s#127.0.0.1:9100#$HOST:$OPS_PORT#" >"$WORK/weir.toml"
grep -q "$MQTT_PORT" "$WORK/weir.toml" && grep -q "$OPS_PORT" "$WORK/weir.toml" ||
    { log "could not move the default config's ports"; exit 1; }
"$WORK/weir" check --config "$WORK/weir.toml" >/dev/null

machine_header "weir footprint"
echo "# weir: stripped release binary, default config (ports moved), idle ${settle}s after /readyz, no connection"

"$WORK/weir" run --config "$WORK/weir.toml" >"$WORK/weir.log" 2>&1 &
weir_pid=$!
waited=0
until http_ok "http://$HOST:$OPS_PORT/readyz"; do
    kill -0 "$weir_pid" 2>/dev/null || { log "weir exited:"; tail -n 20 "$WORK/weir.log" >&2; exit 1; }
    ((waited < WEIR_READY_TIMEOUT * 10)) || { log "weir not ready within ${WEIR_READY_TIMEOUT}s"; exit 1; }
    sleep 0.1
    waited=$((waited + 1))
done
sleep "$settle"
weir_rss=$(status_field "$weir_pid" VmRSS)
weir_anon=$(status_field "$weir_pid" RssAnon)
weir_file=$(status_field "$weir_pid" RssFile)
weir_hwm=$(status_field "$weir_pid" VmHWM)
weir_threads=$(status_field "$weir_pid" Threads)
stop_weir

if ! "$MOSQUITTO_SH" status "$MOSQUITTO_PORT" >/dev/null 2>&1; then
    "$MOSQUITTO_SH" start "$MOSQUITTO_PORT" >&2
    mosquitto_started=1
fi
state=${WEIR_LOCAL_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/weir-local}/mosquitto-$MOSQUITTO_PORT
mosquitto_pid=$(cat "$state/mosquitto.pid")
sleep "$settle"
mosquitto_bin=$(readlink -f "/proc/$mosquitto_pid/exe")
mosquitto_bytes=$(stat -c %s "$mosquitto_bin")
mosquitto_rss=$(status_field "$mosquitto_pid" VmRSS)
mosquitto_hwm=$(status_field "$mosquitto_pid" VmHWM)
mosquitto_threads=$(status_field "$mosquitto_pid" Threads)
mosquitto_version=$("$mosquitto_bin" -h 2>/dev/null | awk 'NR == 1 { print $3 }' || true)

printf 'weir      binary=%s B (unstripped %s B) idle_rss=%s KiB (anon %s, file %s) peak_rss=%s KiB threads=%s\n' \
    "$weir_bytes" "$unstripped_bytes" "$weir_rss" "$weir_anon" "$weir_file" "$weir_hwm" "$weir_threads"
printf 'mosquitto binary=%s B (%s; shared libraries not counted) idle_rss=%s KiB peak_rss=%s KiB threads=%s\n' \
    "$mosquitto_bytes" "${mosquitto_version:-version unknown}" "$mosquitto_rss" "$mosquitto_hwm" "$mosquitto_threads"
verdict=ok
if ((weir_bytes > TARGET_BYTES || weir_rss * 1024 > TARGET_BYTES)); then
    verdict=OVER
fi
awk -v wb="$weir_bytes" -v wr="$weir_rss" -v mr="$mosquitto_rss" -v v="$verdict" 'BEGIN {
    printf "SUMMARY footprint: weir binary %.1f MB, idle RSS %.1f MB (target <= 15 MB each: %s); Mosquitto idle RSS %.1f MB; RSS ratio weir/Mosquitto %.2f\n",
        wb / 1e6, wr * 1024 / 1e6, v, mr * 1024 / 1e6, wr / mr
}'
[[ $verdict == ok ]] || exit 3
