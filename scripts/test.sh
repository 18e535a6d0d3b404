#!/usr/bin/env bash
# Runs every evhost test: unit and property tests, tests on real sled, and end-to-end tests
# of the real binary over loopback HTTP. Installs what they need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
