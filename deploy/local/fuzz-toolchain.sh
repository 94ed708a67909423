# Sourced by protocols/fuzz/run.sh and gateway/fuzz/run.sh: makes sure cargo-fuzz can run.
# A missing nightly toolchain is an error (exit 69, EX_UNAVAILABLE: installing one is the
# machine's business, see install-deps.sh); a missing cargo-fuzz is installed, pinned to the
# release line install-deps.sh installs.
require_cargo_fuzz() {
    if ! rustup run nightly rustc --version >/dev/null 2>&1; then
        echo "run.sh: cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)" >&2
        exit 69
    fi
    if ! cargo fuzz --version >/dev/null 2>&1; then
        nice -n 19 cargo install cargo-fuzz --locked --version "~0.13"
    fi
}
