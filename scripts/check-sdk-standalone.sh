#!/usr/bin/env bash
# Checks that the SDK stands alone, as an author outside this repository uses it: copies
# plugin-sdk/ to a scratch directory, writes a projection that depends on it by path, and
# builds that for wasm32-wasip2 and runs its native test. Fails if the SDK reaches back
# into the repository (workspace inheritance, ../wit) or its example stops compiling.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp -r "$root/plugin-sdk" "$scratch/evhost-sdk"
mkdir -p "$scratch/my-counter/src"
cat > "$scratch/my-counter/Cargo.toml" <<'TOML'
[package]
name = "my-counter"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
evhost-sdk = { path = "../evhost-sdk" }
serde = { version = "1", features = ["derive"] }

[workspace]
TOML
cat > "$scratch/my-counter/src/lib.rs" <<'RUST'
use std::borrow::Cow;

use evhost_sdk::{Error, Event, Projection};

pub struct Counter;

impl Projection for Counter {
    type State = u64;
    fn key<'e>(e: &'e Event) -> Result<Cow<'e, str>, Error> {
        Ok(Cow::Borrowed(&e.event_type))
    }
    fn apply(_key: &str, n: &mut u64, _e: &Event) -> Result<(), Error> {
        *n += 1;
        Ok(())
    }
}

evhost_sdk::export_projection!(Counter);

#[test]
fn counts() {
    let mut h = evhost_sdk::testing::Harness::<Counter>::new();
    h.handle(vec![Event::new("a.b", "{}"), Event::new("a.b", "{}")]).unwrap();
    assert_eq!(h.state("a.b"), Some(2));
}
RUST
# Shared between runs so that a second check costs seconds.
export CARGO_TARGET_DIR="$root/target/sdk-standalone"
cd "$scratch/my-counter"
cargo build --quiet --release --target wasm32-wasip2
cargo test --quiet
test -s "$CARGO_TARGET_DIR/wasm32-wasip2/release/my_counter.wasm"
echo "the SDK builds a plugin outside the repository"
