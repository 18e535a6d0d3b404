#!/usr/bin/env bash
# Installs what building and testing evhost needs on a fresh machine: the pinned Rust
# toolchain with the wasm32-wasip2 target (from rust-toolchain.toml), promtool, and Chromium
# with playwright-core for the dashboard's browser test. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rustup >/dev/null; then
    echo "error: rustup is required (https://rustup.rs); install it and re-run" >&2
    exit 1
fi
# Inside the repo, rustup reads rust-toolchain.toml and installs its targets too.
rustup toolchain install >/dev/null
# promtool (Debian's package prometheus) checks the host's /metrics in the tests.
if ! command -v promtool >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "error: promtool is required (Debian package prometheus); install it and re-run" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# The dashboard's browser test: Debian's chromium, driven by playwright-core from npm.
if ! command -v chromium >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "error: chromium is required for the dashboard's browser test (Debian package chromium)" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v npm >/dev/null; then
    echo "error: node and npm are required for the dashboard's browser test" >&2
    exit 1
fi
(cd tests/browser && npm ci --no-audit --no-fund --silent)
