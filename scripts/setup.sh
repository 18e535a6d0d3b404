#!/usr/bin/env bash
# Installs what building and testing evhost needs on a fresh machine: the pinned Rust
# toolchain with the wasm32-wasip2 target (from rust-toolchain.toml). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v rustup >/dev/null; then
    echo "error: rustup is required (https://rustup.rs); install it and re-run" >&2
    exit 1
fi
# Inside the repo, rustup reads rust-toolchain.toml and installs its targets too.
rustup toolchain install >/dev/null
