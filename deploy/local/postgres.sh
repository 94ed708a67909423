#!/usr/bin/env bash
# Runs a real PostgreSQL server (its own cluster, not Debian's) on 127.0.0.1 for tests and demos,
# without Docker: the server comes from Debian's postgresql packages.
#
#   deploy/local/postgres.sh start           install the server packages if needed, initdb once,
#                                            start the server in the background, wait until it
#                                            accepts connections, make sure role and database
#                                            "weir" exist; exit 0 at once if it already runs
#   deploy/local/postgres.sh stop [--wipe]   stop only the cluster this script runs (pg_ctl stop
#                                            -m fast); --wipe also deletes its data directory so
#                                            the next start is fresh
#   deploy/local/postgres.sh wipe            same as stop --wipe
#   deploy/local/postgres.sh status          prints "running ..." (exit 0) or "stopped" (exit 3)
#   deploy/local/postgres.sh pid             prints the postmaster's pid (exit 3 when not running)
#   deploy/local/postgres.sh kill            SIGKILL the postmaster (fault tests); its children
#                                            exit on their own, the data is kept and the next
#                                            start runs PostgreSQL's crash recovery (WAL replay)
#   deploy/local/postgres.sh url             prints postgres://weir@127.0.0.1:PORT/weir
#   deploy/local/postgres.sh ca              prints the CA certificate that verifies the server (TLS)
#   deploy/local/postgres.sh psql [ARG...]   psql connected to that URL (stdin passes through,
#                                            e.g. "\copy t from stdin csv"); ARGs may override
#   deploy/local/postgres.sh install         only install the server packages if they are missing
#
# Environment:
#   PG_PORT (5433)            TCP port on 127.0.0.1 (5432 is left to a system PostgreSQL)
#   PG_START_TIMEOUT (60)     seconds to wait for the server to accept connections (crash
#                             recovery after a kill counts against it)
#   PG_STOP_TIMEOUT (60)      seconds for a fast shutdown before immediate shutdown, then SIGKILL
#   PG_OS_USER (postgres)     when run as root: the system user initdb and the server run as
#                             (PostgreSQL refuses root); created if missing. Once the data
#                             directory exists, its owner is used. As non-root: the current user.
#   PG_BINDIR                 server binaries; default the newest /usr/lib/postgresql/VER/bin
#                             (without PG_BINDIR, an existing data directory uses its own VER)
#   WEIR_LOCAL_STATE  state root, default ${XDG_STATE_HOME:-$HOME/.local/state}/weir-local
#
# State: $WEIR_LOCAL_STATE/postgres-PORT/ (owned by the server's user) holds data/ (the cluster:
# initdb -E UTF8 --locale=C --auth=trust --data-checksums, superuser "postgres"), weir.conf (the
# settings, included by data/postgresql.conf and rewritten on every start), postgresql.log (the
# server's log, appended), run/ (the unix socket) and lock. Trust authentication: any local user
# connects as any role; the server listens on 127.0.0.1 only.
set -euo pipefail

readonly HOST=127.0.0.1
readonly PORT=${PG_PORT:-5433}
readonly START_TIMEOUT=${PG_START_TIMEOUT:-60}
readonly STOP_TIMEOUT=${PG_STOP_TIMEOUT:-60}
readonly DATABASE=weir
readonly ROLE=weir
readonly SUPERUSER=postgres

readonly STATE_ROOT=${WEIR_LOCAL_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/weir-local}
readonly STATE_DIR=$STATE_ROOT/postgres-$PORT
readonly DATA_DIR=$STATE_DIR/data
readonly CONF=$STATE_DIR/weir.conf
readonly LOG_FILE=$STATE_DIR/postgresql.log
readonly SOCKET_DIR=$STATE_DIR/run
readonly URL=postgres://$ROLE@$HOST:$PORT/$DATABASE

usage() {
    sed -n '4,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

log() {
    echo "postgres.sh: $*" >&2
}

if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
    log "invalid port: $PORT"
    exit 64
fi
for value in "$START_TIMEOUT" "$STOP_TIMEOUT"; do
    [[ $value =~ ^[0-9]+$ ]] || {
        log "invalid timeout: $value"
        exit 64
    }
done

# As root the server runs as PG_OS_USER (PostgreSQL refuses to run as root); otherwise as us.
if ((EUID == 0)); then
    readonly OS_USER=${PG_OS_USER:-postgres}
    if [[ $OS_USER == root ]]; then
        log "PG_OS_USER must not be root: PostgreSQL refuses to run as root"
        exit 64
    fi
else
    OS_USER=$(id -un)
    readonly OS_USER
fi

# The user the server runs as: the data directory's owner once it exists (so a later PG_OS_USER
# does not matter), else OS_USER.
server_user() {
    if ((EUID == 0)) && [[ -d $DATA_DIR ]]; then
        stat -c %U "$DATA_DIR"
    else
        echo "$OS_USER"
    fi
}

# Runs a command as the server's user, from / (the caller's directory may be closed to it).
as_user() {
    if ((EUID == 0)); then
        (cd / && runuser -u "$(server_user)" -- "$@")
    else
        (cd / && "$@")
    fi
}

# The newest installed server's bin directory (or PG_BINDIR); fails when there is none.
newest_bindir() {
    local dir best=
    if [[ -n ${PG_BINDIR:-} ]]; then
        [[ -x $PG_BINDIR/postgres && -x $PG_BINDIR/initdb && -x $PG_BINDIR/pg_ctl ]] || return 1
        echo "$PG_BINDIR"
        return 0
    fi
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x $dir/postgres && -x $dir/initdb && -x $dir/pg_ctl ]] || continue
        best=$(printf '%s\n' "$best" "$dir" | sed '/^$/d' | sort -V | tail -n 1)
    done
    [[ -n $best ]] || return 1
    echo "$best"
}

install_server() {
    local -a sudo=()
    local before after cluster
    if newest_bindir >/dev/null; then
        return 0
    fi
    if ((EUID != 0)); then
        command -v sudo >/dev/null || {
            log "the PostgreSQL server is not installed and this is not root; install the Debian" \
                "packages postgresql and postgresql-contrib"
            exit 1
        }
        sudo=(sudo)
    fi
    # The package creates (and, where services may start, starts) its own cluster on 5432; only
    # clusters that appear during this install are removed afterwards.
    before=$(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}' || true)
    log "installing the PostgreSQL server (apt-get install postgresql postgresql-contrib)"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql postgresql-contrib >/dev/null
    after=$(pg_lsclusters -h 2>/dev/null | awk '{print $1 "/" $2}' || true)
    for cluster in $after; do
        if ! grep -qxF "$cluster" <<<"$before"; then
            # Just created by the package, so empty: stop it and drop it (frees 5432, and nothing
            # starts it at boot).
            log "dropping the cluster $cluster the Debian package just created (this script runs its own)"
            "${sudo[@]}" pg_dropcluster --stop "${cluster%%/*}" "${cluster#*/}" || true
        fi
    done
    newest_bindir >/dev/null || {
        log "the PostgreSQL server binaries are still missing after installing"
        exit 1
    }
}

# The bin directory to run this cluster with: its own version once initialised.
bindir() {
    local version dir
    if [[ -f $DATA_DIR/PG_VERSION ]]; then
        version=$(<"$DATA_DIR/PG_VERSION")
        dir=/usr/lib/postgresql/$version/bin
        [[ -n ${PG_BINDIR:-} ]] && dir=$PG_BINDIR
        if ! [[ -x $dir/postgres && -x $dir/pg_ctl ]]; then
            log "$DATA_DIR was created by PostgreSQL $version, which is not installed" \
                "(or PG_BINDIR does not hold it); run '$0 wipe' to start afresh"
            exit 1
        fi
        echo "$dir"
        return 0
    fi
    newest_bindir
}

# A client program: the server version's own, else whatever is on PATH.
client() {
    local dir
    if dir=$(bindir 2>/dev/null) && [[ -x $dir/$1 ]]; then
        echo "$dir/$1"
    elif command -v "$1" >/dev/null; then
        command -v "$1"
    else
        log "$1 not found; run '$0 install'"
        exit 1
    fi
}

# The postmaster's pid, from postmaster.pid, if that process still is this cluster's postmaster
# (a recycled pid, or a zombie, does not count).
running_pid() {
    local pid
    [[ -f $DATA_DIR/postmaster.pid ]] || return 1
    pid=$(head -n 1 "$DATA_DIR/postmaster.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    is_ours "$pid" || return 1
    echo "$pid"
}

is_ours() {
    local cmdline
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $cmdline == */postgres\ -D\ "$DATA_DIR"\ * ]]
}

# True while pid $1 exists and is not a zombie.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c ": >/dev/tcp/$HOST/$1" 2>/dev/null
}

# The postmaster's own state line in postmaster.pid: starting, stopping, ready or standby.
pm_status() {
    sed -n 8p "$DATA_DIR/postmaster.pid" 2>/dev/null | tr -d ' '
}

ready() {
    "$(client pg_isready)" -q -h "$HOST" -p "$PORT" -U "$SUPERUSER" -d postgres -t 2 >/dev/null 2>&1
}

# Lets the server's user reach and own the state dir: as root, the state root may lie under a
# directory it cannot traverse (/root is 0700); it gets search permission (x) only there.
prepare_state_dir() {
    local dir user path=
    local -a parts
    mkdir -p "$STATE_DIR" "$SOCKET_DIR"
    ((EUID == 0)) || return 0
    user=$(server_user)
    if ! id -u "$user" >/dev/null 2>&1; then
        log "creating the system user $user to run PostgreSQL"
        useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin "$user"
    fi
    chown "$user:" "$STATE_DIR" "$SOCKET_DIR"
    chmod 0700 "$STATE_DIR"
    runuser -u "$user" -- test -x "$STATE_DIR" 2>/dev/null && return 0
    IFS=/ read -ra parts <<<"${STATE_DIR#/}"
    for dir in "${parts[@]}"; do
        path=$path/$dir
        [[ $path == "$STATE_DIR" ]] && break
        runuser -u "$user" -- test -x "$path" 2>/dev/null && continue
        if command -v setfacl >/dev/null && setfacl -m "u:$user:x" "$path" 2>/dev/null; then
            log "granted $user search permission on $path (ACL u:$user:x)"
        else
            chmod o+x "$path"
            log "granted search permission on $path to others (chmod o+x) so $user reaches $STATE_DIR"
        fi
    done
    runuser -u "$user" -- test -x "$STATE_DIR" || {
        log "$user still cannot reach $STATE_DIR; set WEIR_LOCAL_STATE to a directory it can"
        exit 1
    }
}

# initdb once per state dir (into a temporary directory, renamed when complete).
init_cluster() {
    local bin=$1 tmp=$STATE_DIR/data.initdb
    [[ -f $DATA_DIR/PG_VERSION ]] && return 0
    rm -rf "$DATA_DIR" "$tmp"
    log "initdb $DATA_DIR ($("$bin/postgres" --version))"
    if ! as_user "$bin/initdb" -D "$tmp" -U "$SUPERUSER" -E UTF8 --locale=C --auth=trust \
        --data-checksums >"$STATE_DIR/initdb.log" 2>&1; then
        log "initdb failed:"
        cat "$STATE_DIR/initdb.log" >&2
        rm -rf "$tmp"
        exit 1
    fi
    printf '\n# Added by deploy/local/postgres.sh: the test instance settings.\ninclude %s\n' \
        "'$CONF'" >>"$tmp/postgresql.conf"
    mv "$tmp" "$DATA_DIR"
}

# A test CA and a server certificate for 127.0.0.1, made once: the server takes TLS and plain
# connections; clients verify it with `postgres.sh ca` as their root.
ensure_tls() {
    local dir=$STATE_DIR/tls
    if [[ ! -s $dir/server.crt || ! -s $dir/server.key || ! -s $dir/ca.crt ]]; then
        mkdir -p "$dir"
        local ext=$dir/server.ext
        printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$ext"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
            -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=weir local test CA" \
            -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
            -keyout "$dir/server.key" -out "$dir/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
            -days 3650 -extfile "$ext" -out "$dir/server.crt" 2>/dev/null
        chmod 600 "$dir/server.key" "$dir/ca.key"
        chmod 644 "$dir/ca.crt" "$dir/server.crt"
    fi
    if ((EUID == 0)); then
        chown -R "$(server_user):" "$dir"
    fi
}

write_config() {
    ensure_tls
    cat >"$CONF" <<EOF
# Generated by deploy/local/postgres.sh; rewritten on every start; included by
# $DATA_DIR/postgresql.conf.
listen_addresses = '$HOST'
port = $PORT
unix_socket_directories = '$SOCKET_DIR'
cluster_name = 'weir-$PORT'
max_connections = 200
shared_buffers = 256MB

# Durability is under test: the defaults, spelled out.
fsync = on
synchronous_commit = on
full_page_writes = on
# No replication or archiving: minimal WAL (crash recovery still replays it).
wal_level = minimal
max_wal_senders = 0
archive_mode = off

# To stderr, which goes to $LOG_FILE.
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'

# TLS for clients that ask (sslmode=require); plain connections still work.
ssl = on
ssl_cert_file = '$STATE_DIR/tls/server.crt'
ssl_key_file = '$STATE_DIR/tls/server.key'
EOF
    if ((EUID == 0)); then
        chown "$(server_user):" "$CONF"
    fi
}

print_log() {
    local from=${1:-0}
    log "last lines of $LOG_FILE:"
    tail -c +"$((from + 1))" "$LOG_FILE" 2>/dev/null | tail -n 40 >&2 || true
}

admin_sql() {
    "$(client psql)" -h "$HOST" -p "$PORT" -U "$SUPERUSER" -d postgres -X -q -A -t \
        -v ON_ERROR_STOP=1 "$@"
}

# The role and database the tests use (cheap, so checked on every start).
ensure_database() {
    if [[ -z $(admin_sql -c "select 1 from pg_roles where rolname = '$ROLE'") ]]; then
        log "creating role $ROLE (superuser, trust)"
        admin_sql -c "create role $ROLE login superuser"
    fi
    if [[ -z $(admin_sql -c "select 1 from pg_database where datname = '$DATABASE'") ]]; then
        log "creating database $DATABASE"
        admin_sql -c "create database $DATABASE owner $ROLE"
    fi
}

# Waits (until the deadline, in SECONDS) for the server to accept connections.
wait_ready() {
    local deadline=$1 log_from=$2
    # pg_isready only once the postmaster says it is ready: each refused probe during crash
    # recovery would log a FATAL line.
    until [[ $(pm_status) == ready ]] && ready; do
        if ! running_pid >/dev/null; then
            log "PostgreSQL exited during startup"
            print_log "$log_from"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            log "PostgreSQL did not accept connections on $HOST:$PORT within ${START_TIMEOUT}s"
            print_log "$log_from"
            return 2
        fi
        sleep 0.1
    done
}

start() {
    local pid bin log_from launched launcher status=0 user
    local -a as_user=()
    if pid=$(running_pid); then
        if ready; then
            log "already running on $HOST:$PORT (pid $pid)"
            return 0
        fi
        # Ours but not accepting connections yet (e.g. recovering after a backend crash).
        log "pid $pid is this script's server but does not accept connections yet; waiting"
        wait_ready $((SECONDS + START_TIMEOUT)) 0 || exit 1
        ensure_database
        return 0
    fi
    install_server
    bin=$(bindir)
    # A unix socket path has at most 107 bytes.
    if ((${#SOCKET_DIR} + ${#PORT} + 10 > 107)); then
        log "socket path $SOCKET_DIR/.s.PGSQL.$PORT is too long for a unix socket; set a shorter WEIR_LOCAL_STATE"
        exit 1
    fi
    if port_open "$PORT"; then
        log "port $PORT on $HOST is taken by something this script did not start; not starting"
        exit 1
    fi
    prepare_state_dir
    init_cluster "$bin"
    write_config
    touch "$LOG_FILE"
    if ((EUID == 0)); then
        user=$(server_user)
        chown "$user:" "$LOG_FILE"
        as_user=(runuser -u "$user" --)
    fi
    log_from=$(stat -c %s "$LOG_FILE")
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # setsid: the server outlives this script and its terminal. The wrapping bash is the
    # postmaster's parent and reaps it: a postmaster left as a zombie (after a kill) would keep its
    # pid "alive" in postmaster.pid and block the next start. postmaster.pid is how we find it.
    # shellcheck disable=SC2016 # expanded by the inner bash
    (cd / && exec setsid "${as_user[@]}" bash -c '"$@" & wait "$!"' weir-postgres \
        "$bin/postgres" -D "$DATA_DIR" >>"$LOG_FILE" 2>&1 </dev/null {STATE_LOCK_FD}>&-) &
    launcher=$!
    launched=$SECONDS
    log "starting PostgreSQL on $HOST:$PORT (state $STATE_DIR)"
    # The postmaster writes postmaster.pid a moment after the launch.
    until running_pid >/dev/null; do
        if ! alive "$launcher"; then
            log "PostgreSQL exited during startup"
            print_log "$log_from"
            exit 1
        fi
        if ((SECONDS - launched >= START_TIMEOUT)); then
            log "PostgreSQL did not write $DATA_DIR/postmaster.pid within ${START_TIMEOUT}s"
            print_log "$log_from"
            exit 1
        fi
        sleep 0.1
    done
    wait_ready $((launched + START_TIMEOUT)) "$log_from" || status=$?
    if ((status == 2)); then
        stop
    fi
    ((status == 0)) || exit 1
    ensure_database
    pid=$(running_pid) || pid=unknown
    log "running on $HOST:$PORT (pid $pid) after $((SECONDS - launched))s; $URL; log $LOG_FILE"
}

# Waits (at most 10 s) until none of the given pids is alive.
wait_gone() {
    local i pid any
    for ((i = 0; i < 100; i++)); do
        any=0
        for pid in "$@"; do
            if alive "$pid"; then
                any=1
                break
            fi
        done
        ((any == 1)) || return 0
        sleep 0.1
    done
    log "pids $* still there 10s after SIGKILL"
    return 1
}

stop() {
    local pid bin
    if ! pid=$(running_pid); then
        log "not running on port $PORT"
        return 0
    fi
    bin=$(bindir)
    if ! as_user "$bin/pg_ctl" stop -D "$DATA_DIR" -m fast -w -t "$STOP_TIMEOUT" >/dev/null; then
        log "fast shutdown did not finish within ${STOP_TIMEOUT}s; immediate shutdown"
        as_user "$bin/pg_ctl" stop -D "$DATA_DIR" -m immediate -w -t 10 >/dev/null ||
            kill_server
    fi
    log "stopped (pid $pid)"
}

kill_server() {
    local pid
    local -a children
    if ! pid=$(running_pid); then
        log "not running on port $PORT"
        return 0
    fi
    # The postmaster's children (checkpointer, backends, ...) exit once they notice it is gone;
    # the next start needs them gone (they hold the shared memory).
    mapfile -t children < <(ps -o pid= --ppid "$pid" | tr -d ' ')
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" "${children[@]}"
    log "killed (pid $pid); the next start runs crash recovery"
}

wipe() {
    stop
    rm -rf "$DATA_DIR" "$STATE_DIR/data.initdb" "$CONF"
    log "wiped $DATA_DIR"
}

status() {
    local pid
    if pid=$(running_pid); then
        echo "running (pid $pid, $HOST:$PORT)"
        return 0
    fi
    echo "stopped"
    return 3
}

print_pid() {
    local pid
    if pid=$(running_pid); then
        echo "$pid"
        return 0
    fi
    return 3
}

run_psql() {
    exec "$(client psql)" -h "$HOST" -p "$PORT" -U "$ROLE" -d "$DATABASE" "$@"
}

# start, stop, wipe and kill of one port run one at a time (two tests starting the same server
# at once: the second waits, then finds it running).
lock_state() {
    mkdir -p "$STATE_DIR"
    exec {STATE_LOCK_FD}>"$STATE_DIR/lock"
    flock "$STATE_LOCK_FD"
}

[[ $# -ge 1 ]] || usage
COMMAND=$1
shift
case $COMMAND in
start | stop | wipe | kill) lock_state ;;
esac
case $COMMAND in
start)
    [[ $# -eq 0 ]] || usage
    start
    ;;
stop)
    case $* in
    "") stop ;;
    --wipe) wipe ;;
    *) usage ;;
    esac
    ;;
wipe)
    [[ $# -eq 0 ]] || usage
    wipe
    ;;
status)
    [[ $# -eq 0 ]] || usage
    status
    ;;
pid)
    [[ $# -eq 0 ]] || usage
    print_pid
    ;;
kill)
    [[ $# -eq 0 ]] || usage
    kill_server
    ;;
url)
    [[ $# -eq 0 ]] || usage
    echo "$URL"
    ;;
ca)
    # The root that verifies the server's TLS certificate.
    [[ $# -eq 0 ]] || usage
    echo "$STATE_DIR/tls/ca.crt"
    ;;
psql)
    run_psql "$@"
    ;;
install)
    [[ $# -eq 0 ]] || usage
    install_server
    ;;
*) usage ;;
esac
