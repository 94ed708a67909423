#!/usr/bin/env bash
# Runs every fuzz target of both cargo-fuzz workspaces for <seconds> each, growing their
# corpora: protocols/fuzz (MQTT, framing, payloads, session) and gateway/fuzz (the disk
# buffer's recovery). Needs nightly and cargo-fuzz (deploy/local/install-deps.sh installs them).
#
#   deploy/local/fuzz-all.sh <seconds>
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:?usage: fuzz-all.sh <seconds>}
protocols/fuzz/run.sh "$seconds"
gateway/fuzz/run.sh "$seconds"
