//! A plugin project on disk: its manifest, its language, and how it is built into the
//! component named after the manifest (`<name>.wasm` beside `<name>.toml`, as
//! `evhost plugin load` and `--plugins` expect).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::plugin::Manifest;

/// A guest language `plugin new` writes and `plugin build` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, through the evhost-sdk crate, built by cargo for wasm32-wasip2.
    Rust,
    /// JavaScript, built by jco (componentize-js).
    Js,
    /// Python, built by componentize-py.
    Python,
}

impl Lang {
    /// The language's name as `--lang` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Js => "js",
            Lang::Python => "python",
        }
    }
}

/// A plugin project: a directory with one manifest and the sources of one language.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project's directory.
    pub dir: PathBuf,
    /// Its manifest file, `<name>.toml`.
    pub manifest_path: PathBuf,
    /// The manifest, parsed.
    pub manifest: Manifest,
    /// What it is written in; `None` for a directory holding only a manifest and its
    /// built `.wasm` (which `plugin test` runs, and `plugin build` cannot build).
    pub lang: Option<Lang>,
}

/// Files ending `.toml` in a project that are never its manifest.
const NOT_MANIFESTS: &[&str] = &["Cargo.toml", "pyproject.toml", "rust-toolchain.toml"];

impl Project {
    /// The project in `dir`: the one `*.toml` there that is a plugin manifest, and the
    /// language its files say (Cargo.toml, package.json, or a Python module).
    pub fn open(dir: &Path) -> Result<Project> {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("reading the plugin project {}", dir.display()))?;
        let mut candidates: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "toml")
                    && !p
                        .file_name()
                        .is_some_and(|n| NOT_MANIFESTS.iter().any(|m| n == *m))
            })
            .collect();
        candidates.sort();
        // The manifest is the .toml that parses as one and is named after its plugin; other
        // .toml files (rustfmt.toml, clippy.toml, ...) are left alone.
        let mut manifests = Vec::new();
        let mut refused = Vec::new();
        for path in &candidates {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            match Manifest::parse(&text) {
                Ok(m) => manifests.push((path.clone(), m)),
                Err(e) => refused.push((path.clone(), e)),
            }
        }
        let (manifest_path, manifest) = match manifests.len() {
            1 => manifests.pop().expect("one manifest"),
            0 => match refused.as_slice() {
                [] => bail!(
                    "{} has no plugin manifest (<name>.toml): run `evhost plugin new` to start \
                     a project, or give the project's directory",
                    dir.display()
                ),
                [(path, e)] => bail!("{}: {e}", path.display()),
                many => bail!(
                    "{} has no plugin manifest among its .toml files ({})",
                    dir.display(),
                    many.iter()
                        .map(|(p, e)| format!("{}: {e}", p.display()))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            },
            _ => bail!(
                "{} has several plugin manifests ({}): keep one per project",
                dir.display(),
                manifests
                    .iter()
                    .map(|(p, _)| p.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let stem = manifest_path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy();
        if stem != manifest.name {
            bail!(
                "{} names the plugin {:?}: name the file {}.toml, so that the host finds \
                 {}.wasm beside it",
                manifest_path.display(),
                manifest.name,
                manifest.name,
                manifest.name
            );
        }
        let lang = if dir.join("Cargo.toml").is_file() {
            Some(Lang::Rust)
        } else if dir.join("package.json").is_file() {
            Some(Lang::Js)
        } else if dir.join("app.py").is_file() {
            Some(Lang::Python)
        } else {
            None
        };
        Ok(Project {
            dir: dir.to_owned(),
            manifest_path,
            manifest,
            lang,
        })
    }

    /// Where the built component goes: `<name>.wasm` beside the manifest.
    pub fn wasm_path(&self) -> PathBuf {
        self.dir.join(format!("{}.wasm", self.manifest.name))
    }

    /// Builds the component and puts it at [`Project::wasm_path`]; the build tool's output
    /// goes to stderr as it runs.
    pub fn build(&self) -> Result<PathBuf> {
        let out = self.wasm_path();
        match self.lang {
            Some(Lang::Rust) => self.build_rust(&out)?,
            Some(Lang::Js) => self.build_js(&out)?,
            Some(Lang::Python) => self.build_python(&out)?,
            None => bail!(
                "{} has no Cargo.toml, package.json or app.py: cannot tell how to build it",
                self.dir.display()
            ),
        }
        Ok(out)
    }

    /// `cargo build --release --target wasm32-wasip2`, then the cdylib's `.wasm` copied to
    /// `out` (cargo names it after the crate, with `_` for `-`).
    fn build_rust(&self, out: &Path) -> Result<()> {
        let child = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("running cargo (is Rust installed? https://rustup.rs)")?;
        let output = child.wait_with_output().context("waiting for cargo")?;
        let built = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact")
            .filter(|m| {
                m["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
            })
            .flat_map(|m| {
                m["filenames"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|f| f.as_str().map(PathBuf::from))
            })
            .find(|f| f.extension().is_some_and(|x| x == "wasm"));
        if !output.status.success() {
            bail!(
                "cargo build failed ({}); if it says the target wasm32-wasip2 is not \
                 installed, run `rustup target add wasm32-wasip2`",
                output.status
            );
        }
        let built = built.context(
            "cargo built no .wasm: the crate needs crate-type = [\"cdylib\", \"rlib\"] \
             under [lib]",
        )?;
        copy_into_place(&built, out)
    }
}

impl Project {
    /// The project's world, as the WIT names it (`projection`, `extractor`, `tool`).
    fn world(&self) -> &'static str {
        self.manifest.kind.as_str()
    }

    /// componentize-js over `<name>.js`: the project's own (node_modules), else one on
    /// PATH, else `npm install` first.
    fn build_js(&self, out: &Path) -> Result<()> {
        let source = format!("{}.js", self.manifest.name);
        if !self.dir.join(&source).is_file() {
            bail!(
                "{} has no {source}: the plugin's source is named after its manifest",
                self.dir.display()
            );
        }
        // Absolute: the tool runs in the project's directory.
        let local = std::path::absolute(self.dir.join("node_modules/.bin/componentize-js"))
            .context("resolving the project's node_modules")?;
        let tool = if local.is_file() {
            local
        } else if let Some(found) = on_path("componentize-js") {
            found
        } else {
            eprintln!("componentize-js is not installed here: npm install");
            run(
                Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund"])
                    .current_dir(&self.dir),
                "npm install (is Node.js installed?)",
            )?;
            local
        };
        // Absolute: the tool runs in the project's directory.
        let tmp = std::path::absolute(out.with_extension("wasm.building"))
            .context("resolving the output path")?;
        run(
            Command::new(&tool)
                .args([
                    "--wit",
                    super::scaffold::WIT_PATH,
                    "--world-name",
                    self.world(),
                    "-o",
                ])
                .arg(&tmp)
                .arg(&source)
                .current_dir(&self.dir),
            "componentize-js",
        )?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))
    }

    /// componentize-py over the module `app`.
    fn build_python(&self, out: &Path) -> Result<()> {
        let tool = on_path("componentize-py")
            .context("componentize-py is not installed: pip install componentize-py==0.25.1")?;
        // Absolute: the tool runs in the project's directory.
        let tmp = std::path::absolute(out.with_extension("wasm.building"))
            .context("resolving the output path")?;
        run(
            Command::new(tool)
                .args([
                    "-d",
                    super::scaffold::WIT_PATH,
                    "-w",
                    self.world(),
                    "componentize",
                    "app",
                    "-o",
                ])
                .arg(&tmp)
                .current_dir(&self.dir),
            "componentize-py",
        )?;
        std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))
    }
}

/// Runs `cmd` with its output on stderr; fails naming `what` if it does.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// `program` on PATH, if it is there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Copies `from` to `to` through a temporary file, so that a host reading `to` never
/// sees half a component.
fn copy_into_place(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("wasm.tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("writing {}", to.display()))?;
    Ok(())
}
