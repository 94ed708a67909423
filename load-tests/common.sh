# shellcheck shell=bash
# Shared by bench.sh, idle.sh and footprint.sh (sourced, not run). Expects HOST, ROOT, `log` (a
# message to stderr), `weir_pid` (empty when no weir runs) and WEIR_STOP_TIMEOUT.

# Where cargo puts the binaries these scripts build and run: $CARGO_TARGET_DIR, or $ROOT/target.
# A relative CARGO_TARGET_DIR is taken from $ROOT, where the scripts run cargo; export the
# result as CARGO_TARGET_DIR so cargo, this script and the scripts it runs agree.
cargo_target_dir() {
    local dir=${CARGO_TARGET_DIR:-target}
    [[ $dir == /* ]] || dir=$ROOT/$dir
    echo "$dir"
}

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

# machine_header TITLE: the first lines of a report: title and date, the machine, the commit.
machine_header() {
    local model mem_kib commit
    model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') || true
    mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null) || true
    commit=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]]; then
        commit+=-dirty
    fi
    echo "# $1 $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine: nproc=$(nproc) cpu=\"${model:-unknown}\" mem=$((${mem_kib:-0} / 1024))MiB kernel=$(uname -r)"
    echo "# commit: $commit"
}

# SIGTERM lets weir flush and ack what it holds; SIGKILL only after WEIR_STOP_TIMEOUT seconds.
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
