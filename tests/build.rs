//! Builds the plugins in `plugins/` for wasm32-wasip2 once per build of the tests (not once
//! per test), into `target/plugins/`, and tells the tests where they are.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for dir in ["plugins", "plugin-sdk", "wit", "scripts/build-plugins.sh"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    let out = root.join("target").join("plugins");
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/build-plugins.sh")).arg(&out);
    // The inner cargo builds another workspace for another target: none of this build's
    // settings apply to it.
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().expect("run scripts/build-plugins.sh");
    assert!(
        status.success(),
        "building the plugins failed (see the output above)"
    );
    println!("cargo:rustc-env=EVHOST_TEST_PLUGINS={}", out.display());
    // The JavaScript and Python guests, built by scripts/build-guests.sh (scripts/test.sh
    // runs it; it needs the component tools scripts/setup.sh installs).
    println!(
        "cargo:rustc-env=EVHOST_TEST_GUESTS={}",
        root.join("target/plugins-guests").display()
    );
    // Plugins built only for tests (no manifest) are used straight from the build.
    let built = root.join("target/plugins-build/wasm32-wasip2/release");
    println!(
        "cargo:rustc-env=EVHOST_TEST_PLUGIN_BUILD={}",
        built.display()
    );
}
