//! `evhost plugin new`: a project for one plugin, in Rust, JavaScript or Python, with its
//! manifest, one worked example, fixtures and a README, that builds as it is written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::project::Lang;
use crate::plugin::{Kind, valid_name};

/// Where a Rust project takes the SDK from.
#[derive(Debug, Clone)]
pub enum SdkSource {
    /// A checkout of the `evhost-sdk` crate (`plugin-sdk/` in evhost's repository).
    Path(PathBuf),
    /// A git repository holding it.
    Git(String),
}

impl SdkSource {
    /// The SDK of the source tree this binary was built from, when it is still there: what
    /// an author who built evhost from a checkout has.
    pub fn built_from() -> Option<SdkSource> {
        let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
        sdk.join("Cargo.toml")
            .is_file()
            .then(|| SdkSource::Path(sdk.canonicalize().unwrap_or(sdk)))
    }

    /// The dependency as Cargo.toml writes it.
    fn dependency(&self) -> String {
        match self {
            SdkSource::Path(p) => format!("{{ path = {} }}", toml_string(&p.display().to_string())),
            SdkSource::Git(url) => format!("{{ git = {} }}", toml_string(url)),
        }
    }
}

/// What `plugin new` is asked to write.
#[derive(Debug, Clone)]
pub struct NewProject {
    /// The plugin's name (the manifest's `name`, the `.wasm`'s and the directory's).
    pub name: String,
    /// Projection, extractor or tool.
    pub kind: Kind,
    /// The guest language.
    pub lang: Lang,
    /// The directory the project's own directory is made in.
    pub parent: PathBuf,
    /// Rust only: where the SDK comes from.
    pub sdk: Option<SdkSource>,
}

/// The contract a JavaScript or Python project builds against, copied into it.
const WIT: &str = include_str!("../../../wit/v0.2.0/plugin.wit");

/// Where that copy goes.
pub(super) const WIT_PATH: &str = "wit/plugin.wit";

/// One file of a template, with `{{name}}`-style placeholders.
struct File {
    path: String,
    text: String,
}

impl NewProject {
    /// Writes the project into `parent/name`; refuses a directory that already has files.
    /// Returns the project's directory.
    pub fn write(&self) -> Result<PathBuf> {
        if !valid_name(&self.name) {
            bail!(
                "{:?} cannot name a plugin: use lower-case letters, digits and '-' (not first), \
                 at most 64 bytes",
                self.name
            );
        }
        if self.lang == Lang::Rust && self.name.starts_with(|c: char| c.is_ascii_digit()) {
            bail!(
                "{:?} cannot name a Rust plugin: cargo refuses package names that start with a \
                 digit; start it with a letter",
                self.name
            );
        }
        if self.lang != Lang::Rust && self.sdk.is_some() {
            bail!(
                "--sdk and --sdk-git are for Rust projects; a {} project needs no SDK",
                self.lang.as_str()
            );
        }
        let dir = self.parent.join(&self.name);
        if dir.exists()
            && std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .next()
                .is_some()
        {
            bail!(
                "{} already exists and is not empty: choose another name or --dir",
                dir.display()
            );
        }
        let files = self.files()?;
        for f in files {
            let path = dir.join(&f.path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, f.text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(dir)
    }

    fn files(&self) -> Result<Vec<File>> {
        let kind = self.kind.as_str();
        let (manifest, fixture) = match self.kind {
            Kind::Projection => (
                include_str!("../../templates/common/projection.toml"),
                include_str!("../../templates/common/projection.json"),
            ),
            Kind::Extractor => (
                include_str!("../../templates/common/extractor.toml"),
                include_str!("../../templates/common/extractor.json"),
            ),
            Kind::Tool => (
                include_str!("../../templates/common/tool.toml"),
                include_str!("../../templates/common/tool.json"),
            ),
        };
        let mut files = vec![
            self.file(&format!("{}.toml", self.name), manifest),
            self.file(&format!("fixtures/{kind}.json"), fixture),
        ];
        if self.kind == Kind::Projection {
            files.push(self.file(
                "fixtures/refused.json",
                include_str!("../../templates/common/projection-refused.json"),
            ));
        }
        let extra;
        match self.lang {
            Lang::Rust => {
                let sdk = self.sdk.clone().or_else(SdkSource::built_from).context(
                    "the evhost-sdk crate is not where this binary was built from: give \
                     --sdk PATH (plugin-sdk/ in evhost's repository) or --sdk-git URL",
                )?;
                let source = match self.kind {
                    Kind::Projection => include_str!("../../templates/rust/projection.rs"),
                    Kind::Extractor => include_str!("../../templates/rust/extractor.rs"),
                    Kind::Tool => include_str!("../../templates/rust/tool.rs"),
                };
                files.push(File {
                    path: "Cargo.toml".into(),
                    text: self
                        .fill(include_str!("../../templates/rust/Cargo.toml.in"))
                        .replace("{{sdk}}", &sdk.dependency()),
                });
                files.push(self.file("src/lib.rs", source));
                files.push(self.file(".gitignore", "/target\n/*.wasm\n/.evhost-cache\n"));
                extra = "\n`cargo test` runs the plugin natively, without wasm.\n";
            }
            Lang::Js => {
                let source = match self.kind {
                    Kind::Projection => include_str!("../../templates/js/projection.js"),
                    Kind::Extractor => include_str!("../../templates/js/extractor.js"),
                    Kind::Tool => include_str!("../../templates/js/tool.js"),
                };
                files.push(self.file(&format!("{}.js", self.name), source));
                files.push(self.file("evhost.js", include_str!("../../templates/js/evhost.js")));
                files.push(self.file(
                    "package.json",
                    include_str!("../../templates/js/package.json.in"),
                ));
                files.push(self.file(WIT_PATH, WIT));
                files.push(self.file(".gitignore", "/node_modules\n/*.wasm\n/.evhost-cache\n"));
                extra = "\n`plugin build` runs componentize-js (`npm install` fetches the version \
                         package.json pins, the first time).\n";
            }
            Lang::Python => {
                let source = match self.kind {
                    Kind::Projection => include_str!("../../templates/python/projection.py"),
                    Kind::Extractor => include_str!("../../templates/python/extractor.py"),
                    Kind::Tool => include_str!("../../templates/python/tool.py"),
                };
                files.push(self.file("app.py", source));
                files.push(self.file(
                    "evhost_guest.py",
                    include_str!("../../templates/python/evhost_guest.py"),
                ));
                files.push(self.file(WIT_PATH, WIT));
                files.push(self.file(".gitignore", "/*.wasm\n/.evhost-cache\n__pycache__/\n"));
                extra = "\n`plugin build` runs componentize-py (`pip install \
                         componentize-py==0.25.1`).\n";
            }
        }
        files.push(File {
            path: "README.md".into(),
            text: self
                .fill(include_str!("../../templates/common/README.md.in"))
                .replace("{{extra}}", extra),
        });
        Ok(files)
    }

    fn file(&self, path: &str, template: &str) -> File {
        File {
            path: path.to_owned(),
            text: self.fill(template),
        }
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("{{name}}", &self.name)
            .replace("{{kind}}", self.kind.as_str())
            .replace("{{lang}}", self.lang.as_str())
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
