#!/usr/bin/env bash
# Runs every check of sluice on a fresh Debian machine: installs what is
# missing, then formatting, clippy (-D warnings) and the whole test suite.
#
#   ./tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Servers the end-to-end tests start on ephemeral loopback ports, what
# librdkafka's build needs, Node.js for AssemblyScript scripts and Chromium
# for the dashboard, from Debian's packages when missing.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# redis-cli makes the test Redis Cluster; openssl the test TLS certificates.
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
# AssemblyScript scripts build with npm (the compiler comes from the npm registry).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# The dashboard test drives Debian's headless Chromium through ChromeDriver.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's packages may start the services; the tests start their own.
for service in redis-server mosquitto; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        systemctl stop "$service" || true
    fi
done

# The toolchain, with wasm32-wasip2, rustfmt and clippy, from rust-toolchain.toml.
if command -v rustup >/dev/null 2>&1; then
    step "toolchain (rust-toolchain.toml)"
    rustup toolchain install
fi
host_target=$(rustc -vV | sed -n 's/^host: //p')

step "formatting"
cargo fmt --all --check
(cd scripts && cargo fmt --all --check)
(cd tests/guests && cargo fmt --all --check)

step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
for dir in scripts tests/guests; do
    # As components (wasm32-wasip2), and natively with their unit tests.
    (cd "$dir" && cargo clippy -- -D warnings)
    (cd "$dir" && cargo clippy --all-targets --target "$host_target" -- -D warnings)
done

step "example scripts' own unit tests (native)"
(cd scripts && cargo test --target "$host_target")

step "test suite"
cargo build --bin sluice
cargo test --workspace --no-fail-fast

step "all checks passed"
