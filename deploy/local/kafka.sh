#!/usr/bin/env bash
# Runs a real Apache Kafka broker (KRaft, one combined broker+controller node) on 127.0.0.1 for
# tests and demos, without Docker: the jars come from Maven Central through Maven.
#
#   deploy/local/kafka.sh start            fetch the jars if needed, format storage once, start the
#                                          broker in the background, wait until it answers a
#                                          Kafka request; exit 0 at once if it already runs
#   deploy/local/kafka.sh stop [--wipe]    stop only the broker this script started (SIGTERM, then
#                                          SIGKILL after KAFKA_STOP_TIMEOUT); --wipe also deletes
#                                          its data so the next start is fresh
#   deploy/local/kafka.sh wipe             same as stop --wipe
#   deploy/local/kafka.sh status           prints "running ..." (exit 0) or "stopped" (exit 3)
#   deploy/local/kafka.sh pid              prints the broker's pid (exit 3 when not running)
#   deploy/local/kafka.sh kill             SIGKILL the broker (fault tests); data is kept, and the
#                                          next start recovers it
#   deploy/local/kafka.sh topic NAME [PARTITIONS]
#                                          create a topic (replication 1) unless it exists
#   deploy/local/kafka.sh fetch            only fetch the jars (e.g. while something else builds)
#   deploy/local/kafka.sh tool CLASS [ARG...]
#                                          run a Kafka tool class on the same classpath, e.g.
#                                          org.apache.kafka.tools.ConsoleProducer or
#                                          org.apache.kafka.tools.consumer.ConsoleConsumer
#                                          (add --bootstrap-server 127.0.0.1:$KAFKA_PORT yourself)
#
# Environment:
#   KAFKA_PORT (9092)             client listener, PLAINTEXT://127.0.0.1:PORT (also advertised)
#   KAFKA_CONTROLLER_PORT (9093)  KRaft controller listener, CONTROLLER://127.0.0.1:PORT
#   KAFKA_VERSION (4.4.0)         org.apache.kafka:kafka_2.13 / kafka-tools version
#   KAFKA_LOG4J_VERSION (2.25.5)  log4j2 binding version (the one Kafka itself depends on)
#   KAFKA_START_TIMEOUT (90)      seconds to wait for the broker to answer
#   KAFKA_STOP_TIMEOUT (30)       seconds to wait after SIGTERM before SIGKILL
#   KAFKA_HEAP_OPTS ("-Xmx1g -Xms256m"), KAFKA_JVM_OPTS (G1 settings): the broker JVM's options
#   KAFKA_JAVA (java)             the java executable (17 or newer)
#   WEIR_CACHE        jars cache root, default ${XDG_CACHE_HOME:-$HOME/.cache}/weir; the jars go to
#                     $WEIR_CACHE/kafka-VERSION/libs (outside the repo, reused once complete)
#   WEIR_LOCAL_STATE  state root, default ${XDG_STATE_HOME:-$HOME/.local/state}/weir-local
#
# State: $WEIR_LOCAL_STATE/kafka-PORT/ holds server.properties, log4j2.xml, kafka.pid,
# server.log (the broker's log4j log), stdout.log (JVM stdout/stderr), cluster.id and data/
# (log.dirs and the KRaft metadata log).
set -euo pipefail

readonly HOST=127.0.0.1
readonly PORT=${KAFKA_PORT:-9092}
readonly CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
readonly VERSION=${KAFKA_VERSION:-4.4.0}
readonly LOG4J_VERSION=${KAFKA_LOG4J_VERSION:-2.25.5}
readonly DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
readonly START_TIMEOUT=${KAFKA_START_TIMEOUT:-90}
readonly STOP_TIMEOUT=${KAFKA_STOP_TIMEOUT:-30}
readonly JAVA=${KAFKA_JAVA:-java}

readonly CACHE_ROOT=${WEIR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/weir}
readonly KAFKA_HOME=$CACHE_ROOT/kafka-$VERSION
readonly LIBS=$KAFKA_HOME/libs
readonly MARKER=$KAFKA_HOME/libs.complete
# What the libs hold; a marker with other contents (another artifact list) means fetch again.
readonly LIBS_SPEC="kafka_2.13:$VERSION kafka-tools:$VERSION log4j-slf4j-impl:$LOG4J_VERSION v1"

readonly STATE_ROOT=${WEIR_LOCAL_STATE:-${XDG_STATE_HOME:-$HOME/.local/state}/weir-local}
readonly STATE_DIR=$STATE_ROOT/kafka-$PORT
readonly CONF=$STATE_DIR/server.properties
readonly LOG4J_CONF=$STATE_DIR/log4j2.xml
readonly TOOLS_LOG4J_CONF=$STATE_DIR/tools-log4j2.xml
readonly PID_FILE=$STATE_DIR/kafka.pid
readonly SERVER_LOG=$STATE_DIR/server.log
readonly STDOUT_LOG=$STATE_DIR/stdout.log
readonly DATA_DIR=$STATE_DIR/data
readonly CLUSTER_ID_FILE=$STATE_DIR/cluster.id
readonly FORMATTED=$STATE_DIR/formatted

usage() {
    sed -n '4,24p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

log() {
    echo "kafka.sh: $*" >&2
}

for port in "$PORT" "$CONTROLLER_PORT"; do
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
        log "invalid port: $port"
        exit 64
    fi
done
if ((PORT == CONTROLLER_PORT)); then
    log "KAFKA_PORT and KAFKA_CONTROLLER_PORT must differ"
    exit 64
fi
for value in "$START_TIMEOUT" "$STOP_TIMEOUT"; do
    [[ $value =~ ^[0-9]+$ ]] || {
        log "invalid timeout: $value"
        exit 64
    }
done

check_java() {
    local version major
    command -v "$JAVA" >/dev/null || {
        log "$JAVA not found; Kafka $VERSION needs Java 17 or newer (deploy/local/install-deps.sh)"
        exit 1
    }
    version=$("$JAVA" -version 2>&1 | sed -n 's/.* version "\([^"]*\)".*/\1/p' | head -n 1)
    major=${version%%.*}
    if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 17)); then
        log "Kafka $VERSION needs Java 17 or newer; $JAVA is ${version:-unknown}"
        exit 1
    fi
}

write_fetch_pom() {
    cat >"$1" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/kafka.sh: the runtime classpath of a Kafka broker and its tools. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.weir</groupId>
  <artifactId>kafka-local-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <!-- The broker: pulls kafka-server, kafka-metadata, kafka-raft, kafka-storage, the
         coordinators, kafka-clients and scala-library transitively. -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$VERSION</version>
    </dependency>
    <!-- Admin and console tools (readiness probe, topic creation, console producer/consumer).
         Kafka Connect's runtime (Jetty, Jersey) is only for the connect-plugin-path tool. -->
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$VERSION</version>
      <exclusions>
        <exclusion>
          <groupId>org.apache.kafka</groupId>
          <artifactId>connect-runtime</artifactId>
        </exclusion>
      </exclusions>
    </dependency>
    <!-- Kafka logs through slf4j 1.7; route it to log4j2 as the Kafka distribution does. -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

# Copies the jars into $LIBS once; later calls only check the marker.
fetch() {
    local lock_fd attempt tmp status
    if [[ -f $MARKER && $(<"$MARKER") == "$LIBS_SPEC" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || {
        log "mvn not found; it fetches Kafka's jars from Maven Central (deploy/local/install-deps.sh)"
        exit 1
    }
    mkdir -p "$KAFKA_HOME"
    # Two scripts starting brokers on two ports at once must not fetch into the same place.
    exec {lock_fd}>"$KAFKA_HOME/fetch.lock"
    flock "$lock_fd"
    if [[ -f $MARKER && $(<"$MARKER") == "$LIBS_SPEC" ]]; then
        exec {lock_fd}>&-
        return 0
    fi
    log "fetching Kafka $VERSION jars from Maven Central into $LIBS"
    tmp=$KAFKA_HOME/fetch
    rm -rf "$tmp"
    mkdir -p "$tmp"
    write_fetch_pom "$tmp/pom.xml"
    local -a mvn_args=(
        -B -q -Dstyle.color=never -f "$tmp/pom.xml"
        # Retries of single transfers: Maven 3.8 (wagon) and 3.9 (resolver transport) spellings.
        -Dmaven.wagon.http.retryHandler.count=5
        -Dmaven.wagon.http.retryHandler.requestSentEnabled=true
        -Dmaven.wagon.httpconnectionManager.ttlSeconds=25
        -Dmaven.wagon.rto=60000
        -Daether.connector.http.retryHandler.count=5
        -Daether.connector.requestTimeout=60000
        "$DEPENDENCY_PLUGIN:copy-dependencies"
        -DincludeScope=runtime
        -DoutputDirectory="$tmp/libs"
    )
    status=1
    for attempt in 1 2 3 4; do
        # After a failure, -U makes Maven retry what it cached as unavailable.
        if ((attempt > 1)); then
            log "Maven fetch failed (attempt $((attempt - 1))); retrying in $(((attempt - 1) * 5))s"
            sleep $(((attempt - 1) * 5))
            rm -rf "$tmp/libs"
            ((attempt > 2)) || mvn_args=(-U "${mvn_args[@]}")
        fi
        if mvn "${mvn_args[@]}" >"$tmp/mvn.log" 2>&1; then
            status=0
            break
        fi
    done
    if ((status != 0)) || ! compgen -G "$tmp/libs/kafka_2.13-*.jar" >/dev/null ||
        ! compgen -G "$tmp/libs/kafka-tools-*.jar" >/dev/null; then
        log "could not fetch Kafka $VERSION from Maven Central; Maven said:"
        tail -n 30 "$tmp/mvn.log" >&2 || true
        exec {lock_fd}>&-
        exit 1
    fi
    rm -rf "$LIBS"
    mv "$tmp/libs" "$LIBS"
    echo "$LIBS_SPEC" >"$MARKER"
    exec {lock_fd}>&-
    log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$LIBS" | cut -f1))"
}

# The pid in the pid file, if that process is still this script's broker for this port (a
# recycled pid, or a zombie left after a kill, does not count).
running_pid() {
    local pid
    [[ -f $PID_FILE ]] || return 1
    pid=$(<"$PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    is_ours "$pid" || return 1
    echo "$pid"
}

is_ours() {
    local cmdline
    cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $cmdline == *kafka.Kafka*"$CONF"* ]]
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c ": >/dev/tcp/$HOST/$1" 2>/dev/null
}

write_tools_log4j() {
    cat >"$TOOLS_LOG4J_CONF" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/kafka.sh: Kafka tools log warnings to stderr only. -->
<Configuration status="warn" shutdownHook="disable">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
EOF
}

# Runs a Kafka tool class on the broker's classpath in a small, fast-starting JVM.
run_tool() {
    mkdir -p "$STATE_DIR"
    [[ -f $TOOLS_LOG4J_CONF ]] || write_tools_log4j
    "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" -cp "$LIBS/*" "$@"
}

# A real Kafka request: ApiVersions to the broker on the client listener.
answers() {
    timeout 30 "$JAVA" -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -Dlog4j2.configurationFile="$TOOLS_LOG4J_CONF" -cp "$LIBS/*" \
        org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "$HOST:$PORT" \
        >/dev/null 2>&1
}

write_config() {
    cat >"$CONF" <<EOF
# Generated by deploy/local/kafka.sh; rewritten on every start.
# One KRaft node that is both broker and controller, on loopback only.
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
log.dirs=$DATA_DIR

# Topics are created by the tests or by weir, never by a producer's first send.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
# Consumers in tests join their group at once instead of after 3 s.
group.initial.rebalance.delay.ms=0
# After a SIGKILL (fault tests) the restarted node waits for its previous incarnation's session
# to expire before it is unfenced and serves: 5 s instead of the default 9 s.
broker.session.timeout.ms=5000
broker.heartbeat.interval.ms=1000

# Small machine (2 cores), small test data.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.segment.bytes=16777216
log.retention.hours=24
log.retention.check.interval.ms=60000
log.cleaner.dedupe.buffer.size=16777216
EOF
}

write_log4j() {
    # \${sys:kafka.logs.dir} is resolved by log4j from the JVM's -Dkafka.logs.dir.
    cat >"$LOG4J_CONF" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/local/kafka.sh; rewritten on every start. -->
<!-- shutdownHook disabled: Kafka logs its own shutdown after log4j's hook would have run. -->
<Configuration status="warn" shutdownHook="disable">
  <Appenders>
    <RollingFile name="server" fileName="${sys:kafka.logs.dir}/server.log"
                 filePattern="${sys:kafka.logs.dir}/server.log.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="64 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="server"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients.NetworkClient" level="WARN"/>
  </Loggers>
</Configuration>
EOF
}

# Formats the KRaft storage once per state dir (a standalone, single-voter dynamic quorum).
format_storage() {
    local cluster_id
    if [[ -f $FORMATTED ]]; then
        if [[ $(<"$FORMATTED") != "controller=$CONTROLLER_PORT" ]]; then
            log "the storage in $DATA_DIR was formatted for another controller port" \
                "($(<"$FORMATTED")); run '$0 wipe' first"
            exit 1
        fi
        return 0
    fi
    rm -rf "$DATA_DIR"
    if [[ ! -s $CLUSTER_ID_FILE ]]; then
        cluster_id=$(run_tool kafka.tools.StorageTool random-uuid)
        echo "$cluster_id" >"$CLUSTER_ID_FILE"
    fi
    cluster_id=$(<"$CLUSTER_ID_FILE")
    log "formatting KRaft storage in $DATA_DIR (cluster id $cluster_id)"
    run_tool kafka.tools.StorageTool format --config "$CONF" --cluster-id "$cluster_id" \
        --standalone >"$STATE_DIR/format.log" 2>&1 || {
        log "formatting failed:"
        cat "$STATE_DIR/format.log" >&2
        exit 1
    }
    echo "controller=$CONTROLLER_PORT" >"$FORMATTED"
}

print_logs() {
    log "last lines of $STDOUT_LOG and $SERVER_LOG:"
    tail -n 15 "$STDOUT_LOG" >&2 2>/dev/null || true
    tail -n 40 "$SERVER_LOG" >&2 2>/dev/null || true
}

start() {
    local pid polls=0 started=0 launched
    local -a heap_opts jvm_opts
    if pid=$(running_pid) && port_open "$PORT"; then
        log "already running on $HOST:$PORT (pid $pid)"
        return 0
    fi
    if [[ -n ${pid:-} ]]; then
        # Ours, but not accepting connections (starts are serialised by the lock): wedged.
        log "pid $pid is this script's broker but $HOST:$PORT does not answer; restarting it"
        stop
    fi
    check_java
    fetch
    mkdir -p "$STATE_DIR"
    for port in "$PORT" "$CONTROLLER_PORT"; do
        if port_open "$port"; then
            log "port $port on $HOST is taken by something this script did not start; not starting"
            exit 1
        fi
    done
    write_config
    write_log4j
    write_tools_log4j
    format_storage
    rm -f "$PID_FILE"
    # One previous run's logs are kept (a killed broker's last words); the readiness check below
    # must only see this run's "Kafka Server started".
    [[ ! -f $SERVER_LOG ]] || mv -f "$SERVER_LOG" "$STATE_DIR/server.previous.log"
    [[ ! -f $STDOUT_LOG ]] || mv -f "$STDOUT_LOG" "$STATE_DIR/stdout.previous.log"
    read -ra heap_opts <<<"${KAFKA_HEAP_OPTS:--Xmx1g -Xms256m}"
    read -ra jvm_opts <<<"${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent}"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # setsid: the broker outlives this script and its terminal. The child writes its own pid
    # before exec'ing java, so the pid file names the JVM whatever setsid does.
    # shellcheck disable=SC2016 # expanded by the inner bash
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka-local "$PID_FILE" \
        "$JAVA" "${heap_opts[@]}" "${jvm_opts[@]}" -Djava.awt.headless=true \
        -Dkafka.logs.dir="$STATE_DIR" -Dlog4j2.configurationFile="$LOG4J_CONF" \
        -cp "$LIBS/*" kafka.Kafka "$CONF" >"$STDOUT_LOG" 2>&1 </dev/null {STATE_LOCK_FD}>&- &
    launched=$SECONDS
    log "starting Kafka $VERSION on $HOST:$PORT (controller $CONTROLLER_PORT, state $STATE_DIR)"
    # Cheap checks every 0.2 s until the server says it started and the port accepts, then a
    # real ApiVersions request (a JVM, ~1 s), repeated until it succeeds.
    while :; do
        if ((SECONDS - launched >= START_TIMEOUT)); then
            log "Kafka did not answer on $HOST:$PORT within ${START_TIMEOUT}s; stopping it"
            print_logs
            stop
            exit 1
        fi
        # (the child writes the pid file a moment after the launch)
        if ((polls > 10)) && ! pid=$(running_pid); then
            log "Kafka exited during startup"
            print_logs
            rm -f "$PID_FILE"
            exit 1
        fi
        if ((started == 0)) && grep -q 'Kafka Server started' "$SERVER_LOG" 2>/dev/null &&
            port_open "$PORT"; then
            started=1
        fi
        if ((started == 1)) && answers; then
            break
        fi
        sleep 0.2
        polls=$((polls + 1))
    done
    pid=$(running_pid) || pid=unknown
    log "running on $HOST:$PORT (pid $pid) after $((SECONDS - launched))s; log $SERVER_LOG"
}

stop() {
    local pid waited=0
    if ! pid=$(running_pid); then
        rm -f "$PID_FILE"
        log "not running on port $PORT"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    while is_ours "$pid"; do
        if ((waited >= STOP_TIMEOUT * 10)); then
            log "pid $pid ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid"
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE"
    log "stopped (pid $pid)"
}

# After SIGKILL: wait (at most 10 s) until the process is gone or only a zombie.
wait_gone() {
    local i
    for ((i = 0; i < 100; i++)); do
        is_ours "$1" || return 0
        sleep 0.1
    done
    log "pid $1 still there 10s after SIGKILL"
    return 1
}

wipe() {
    stop
    rm -rf "$DATA_DIR" "$FORMATTED" "$CLUSTER_ID_FILE"
    log "wiped $DATA_DIR"
}

kill_broker() {
    local pid
    if ! pid=$(running_pid); then
        log "not running on port $PORT"
        return 0
    fi
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid"
    rm -f "$PID_FILE"
    log "killed (pid $pid)"
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

create_topic() {
    local name=$1 partitions=${2:-1}
    [[ $partitions =~ ^[1-9][0-9]*$ ]] || {
        log "invalid partition count: $partitions"
        exit 64
    }
    running_pid >/dev/null || {
        log "not running on port $PORT; run '$0 start' first"
        exit 1
    }
    run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$PORT" --create \
        --if-not-exists --topic "$name" --partitions "$partitions" --replication-factor 1 >/dev/null
}

# start, stop, wipe and kill of one port run one at a time (two tests starting the same broker
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
    kill_broker
    ;;
topic)
    [[ $# -ge 1 && $# -le 2 ]] || usage
    check_java
    fetch
    create_topic "$@"
    ;;
fetch)
    [[ $# -eq 0 ]] || usage
    check_java
    fetch
    ;;
tool)
    [[ $# -ge 1 ]] || usage
    check_java
    fetch
    run_tool "$@"
    ;;
*) usage ;;
esac
