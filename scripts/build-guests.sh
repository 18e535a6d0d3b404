#!/usr/bin/env bash
# Builds the JavaScript and Python guests in plugins/guests/ into target/plugins-guests/
# (or $1), each as <name>.wasm beside its manifest <name>.toml. Needs what
# scripts/setup.sh installs: componentize-js in plugins/guests/node_modules and
# componentize-py on PATH. A guest whose sources are older than its .wasm is not rebuilt.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
guests="$root/plugins/guests"
out="${1:-$root/target/plugins-guests}"
mkdir -p "$out"
# Absolute: the tools run in a scratch copy of each guest.
out="$(cd "$out" && pwd)"
js="$guests/node_modules/.bin/componentize-js"
for dir in "$guests"/*/; do
    name="$(basename "$dir")"
    manifest="$dir/$name.toml"
    [ -f "$manifest" ] || continue
    kind="$(sed -n 's/^kind = "\(.*\)"/\1/p' "$manifest")"
    wasm="$out/$name.wasm"
    # -L: the decoders and the WIT are links into host/templates and wit/.
    if [ -f "$wasm" ] && [ -z "$(find -L "$dir" -newer "$wasm" -type f -not -path '*/fixtures/*' | head -1)" ]; then
        cp "$manifest" "$out/$name.toml"
        continue
    fi
    # Built from a copy with the links resolved: componentize-py leaves linked modules out.
    stage="$(mktemp -d)"
    cp -rL "$dir/." "$stage/"
    if [ -f "$dir/package.json" ]; then
        (cd "$stage" && "$js" --wit wit/plugin.wit --world-name "$kind" -o "$wasm.tmp" "$name.js" >/dev/null)
    else
        (cd "$stage" && componentize-py -d wit/plugin.wit -w "$kind" componentize app -o "$wasm.tmp" >/dev/null)
    fi
    rm -rf "$stage"
    mv "$wasm.tmp" "$wasm"
    cp "$manifest" "$out/$name.toml"
done
