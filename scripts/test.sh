#!/usr/bin/env bash
# Runs every evhost test: unit and property tests, tests on real sled, tests of the real
# .wasm plugins, end-to-end tests of the real binary over loopback HTTP, and the plugins'
# own native tests, the end-to-end suite again on the NATS log, and the author's walk in Rust, JavaScript and Python. Installs what they
# need first.
set -euo pipefail
cd "$(dirname "$0")/.."
# A failing test prints its message and place, not a backtrace that buries them.
export RUST_BACKTRACE="${RUST_BACKTRACE:-0}"
scripts/setup.sh --guests
scripts/build-plugins.sh
scripts/build-guests.sh
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
# The end-to-end suite that matters again with every host on the NATS JetStream log (one
# nats-server per test binary, one stream per data directory). Left out: tests of the
# embedded log's own files (segments, the erase intent and its fault points). Selected
# with --workspace, as the pass above, so cargo reuses its build (`-p evhost-tests` alone
# resolves dependency features differently and rebuilds wasmtime).
EVHOST_TEST_LOG=nats cargo test --workspace --locked \
    --test http_api --test streams --test stream_admin --test time_travel \
    --test projections --test tools --test failures --test lifecycle --test upgrades \
    --test poison --test contract --test state_loss "$@" -- \
    --skip an_erasure_cut_short --skip a_hard_delete_survives_kill_9
cargo test --manifest-path plugins/Cargo.toml --target-dir target/plugins-native --locked --quiet
scripts/check-sdk-standalone.sh
