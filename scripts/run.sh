#!/usr/bin/env bash
# Runs an evhost host on this machine: embedded sled under ./evhost-data, HTTP on
# 127.0.0.1:7700, the example plugins loaded (http-get granted the one host its manifest
# asks for). Extra arguments go to `evhost serve` (e.g. --listen 127.0.0.1:7800).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build-plugins.sh
exec cargo run --release -p evhost --bin evhost -- serve --data "${EVHOST_DATA:-evhost-data}" --plugins target/plugins \
    --grant http-get=http:127.0.0.1:8931 "$@"
