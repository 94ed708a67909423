#!/usr/bin/env bash
# Installs the system packages weir's tests and demos use, if they are missing:
#   mosquitto-clients (mosquitto_pub: the stock-client compatibility tests), mosquitto (benchmark
#   baseline), sqlite3 (reading the embedded sink back in the README demo), a JRE and Maven
#   (deploy/local/kafka.sh fetches Kafka's jars from Maven Central and runs the broker), Chromium
#   (the dashboard test drives it headless), haproxy (deploy/check.sh), and the PostgreSQL server (through
#   deploy/local/postgres.sh install).
# Idempotent: does nothing when everything is present. Debian/Ubuntu (apt-get); root or sudo.
set -euo pipefail

missing=()
command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
command -v java >/dev/null || missing+=(default-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v chromium >/dev/null || missing+=(chromium)
# deploy/check.sh validates the compose stack's load balancer config with it.
command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)

# The PostgreSQL server (deploy/local/postgres.sh runs its own cluster on 5433): installed by that
# script, which also drops the cluster the Debian package creates on 5432.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || "$(dirname "$0")/postgres.sh" install

# Rust tools the checks use beyond the stable toolchain, each installed only when missing: a
# nightly toolchain and cargo-fuzz (test-all.sh runs every protocols fuzz target briefly on its
# corpus), and cargo-deny (licenses, bans and sources of Cargo.lock; see deny.toml). A machine
# where the nightly toolchain cannot be downloaded goes on without it: test-all.sh says so and
# skips the fuzz step.
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "install-deps.sh: installing the nightly Rust toolchain (for cargo-fuzz)" >&2
    rustup toolchain install nightly --profile minimal ||
        echo "install-deps.sh: could not install the nightly toolchain; fuzz runs will be skipped" >&2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "install-deps.sh: installing cargo-fuzz" >&2
    nice -n 19 cargo install cargo-fuzz --locked --version "~0.13"
fi
if ! cargo deny --version >/dev/null 2>&1; then
    echo "install-deps.sh: installing cargo-deny" >&2
    # deny.toml is written for this release line.
    nice -n 19 cargo install cargo-deny --locked --version "~0.20"
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi

sudo=()
if ((EUID != 0)); then
    command -v sudo >/dev/null || { echo "install-deps.sh: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
fi
echo "install-deps.sh: installing ${missing[*]}" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The Debian package starts a system broker on 1883, weir's default port: stop it.
if [[ " ${missing[*]} " == *" mosquitto "* ]]; then
    "${sudo[@]}" systemctl stop mosquitto 2>/dev/null || "${sudo[@]}" service mosquitto stop 2>/dev/null || true
    "${sudo[@]}" pkill -x mosquitto 2>/dev/null || true
fi
