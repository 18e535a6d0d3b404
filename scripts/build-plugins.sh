#!/usr/bin/env bash
# Builds the plugins in plugins/ for wasm32-wasip2 and assembles them, each as
# <name>.wasm beside its manifest <name>.toml, in target/plugins/ (or $1).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/target/plugins}"
cargo build --release --target wasm32-wasip2 \
    --manifest-path "$root/plugins/Cargo.toml" \
    --target-dir "$root/target/plugins-build" --quiet
mkdir -p "$out"
for manifest in "$root"/plugins/*/*.toml; do
    crate_dir="$(dirname "$manifest")"
    [ "$(basename "$manifest")" = "Cargo.toml" ] && continue
    name="$(basename "$manifest" .toml)"
    crate="$(basename "$crate_dir" | tr '-' '_')"
    wasm="$root/target/plugins-build/wasm32-wasip2/release/$crate.wasm"
    cp "$wasm" "$out/$name.wasm.tmp" && mv "$out/$name.wasm.tmp" "$out/$name.wasm"
    cp "$manifest" "$out/$name.toml"
done
