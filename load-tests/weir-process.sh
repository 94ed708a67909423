# Shared by bench.sh and idle.sh (sourced, not run): stopping the weir process a script started.
# Expects `log` (a message to stderr), `weir_pid` (empty when none runs) and WEIR_STOP_TIMEOUT.

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
