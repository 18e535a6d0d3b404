#!/usr/bin/env bash
# Runs every evhost test: unit and property tests, tests on real sled, tests of the real
# .wasm plugins, end-to-end tests of the real binary over loopback HTTP, and the plugins'
# own native tests, and the author's walk in Rust, JavaScript and Python. Installs what they
# need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --guests
scripts/build-plugins.sh
scripts/build-guests.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
cargo test --manifest-path plugins/Cargo.toml --target-dir target/plugins-native --locked --quiet
scripts/check-sdk-standalone.sh
