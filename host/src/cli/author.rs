//! `evhost plugin new`, `build` and `test`: the author's commands that need no host.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::author::{Lang, NewProject, Project, SdkSource, TestOptions};
use crate::plugin::Kind;

/// What `plugin new` takes.
#[derive(Debug, clap::Args)]
pub(super) struct NewArgs {
    /// The plugin's name: lower-case letters, digits and `-`. The project is made in a
    /// directory of this name.
    name: String,
    /// What it is.
    #[arg(long, value_parser = parse_kind)]
    kind: Kind,
    /// What it is written in.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    lang: Lang,
    /// Where the project's directory is made.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Rust: the evhost-sdk crate to depend on by path (default: the one this binary was
    /// built with).
    #[arg(long, conflicts_with = "sdk_git")]
    sdk: Option<PathBuf>,
    /// Rust: a git repository to take evhost-sdk from.
    #[arg(long)]
    sdk_git: Option<String>,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    match s {
        "projection" => Ok(Kind::Projection),
        "extractor" => Ok(Kind::Extractor),
        "tool" => Ok(Kind::Tool),
        _ => Err(format!("{s:?}: give projection, extractor or tool")),
    }
}

/// What `plugin test` takes.
#[derive(Debug, clap::Args)]
pub(super) struct TestArgs {
    /// The project's directory.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The fixtures: a directory of `*.json`, or one file (default: the project's
    /// fixtures/).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Build first, as `plugin build` does.
    #[arg(long)]
    build: bool,
    /// A value over the manifest's `[config]` (KEY=VALUE or KEY=@FILE); repeat for more.
    #[arg(long = "config", value_name = "KEY=VALUE")]
    config: Vec<String>,
    /// Grant a capability the manifest asks for (`http:HOST:PORT`, `clock`, `random`), as
    /// the operator would at load; repeat for more.
    #[arg(long = "grant", value_name = "CAP")]
    grant: Vec<String>,
}

/// `plugin new`: writes the project and says what to do next.
pub(super) fn new(args: NewArgs) -> Result<()> {
    let sdk = match (args.sdk, args.sdk_git) {
        (Some(p), _) => {
            if !p.join("Cargo.toml").is_file() {
                bail!(
                    "--sdk {}: no Cargo.toml there (give plugin-sdk/ of evhost's repository)",
                    p.display()
                );
            }
            Some(SdkSource::Path(p.canonicalize().unwrap_or(p)))
        }
        (None, Some(url)) => Some(SdkSource::Git(url)),
        (None, None) => None,
    };
    let dir = NewProject {
        name: args.name.clone(),
        kind: args.kind,
        lang: args.lang,
        parent: args.dir,
        sdk,
    }
    .write()?;
    println!(
        "created the {} {} {} in {}\n  cd {}\n  evhost plugin build && evhost plugin test\n  evhost plugin deploy --wait",
        args.lang.as_str(),
        args.kind.as_str(),
        args.name,
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// `plugin build`: builds the project in `dir` and says where the component is.
pub(super) fn build(dir: &std::path::Path) -> Result<Project> {
    build_opened(Project::open(dir)?)
}

fn build_opened(project: Project) -> Result<Project> {
    let wasm = project.build()?;
    let size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "built {} ({} KiB), for {}",
        wasm.display(),
        size.div_ceil(1024),
        project.manifest_path.display()
    );
    Ok(project)
}

/// What `plugin deploy` loads: the project built, or, in a directory holding only a
/// manifest and its `.wasm` (nothing to build), that `.wasm` as it is.
pub(super) fn build_for_deploy(dir: &std::path::Path) -> Result<Project> {
    let project = Project::open(dir)?;
    if project.lang.is_none() && project.wasm_path().is_file() {
        eprintln!(
            "no sources to build in {}: deploying {} as it is",
            dir.display(),
            project.wasm_path().display()
        );
        return Ok(project);
    }
    build_opened(project)
}

/// `plugin test`: fails (non-zero exit) when any fixture does not match.
pub(super) async fn test(args: TestArgs) -> Result<()> {
    let project = if args.build {
        build(&args.dir)?
    } else {
        Project::open(&args.dir)?
    };
    let wasm_path = project.wasm_path();
    let wasm = std::fs::read(&wasm_path).with_context(|| {
        format!(
            "reading {} (build it first: evhost plugin build, or plugin test --build)",
            wasm_path.display()
        )
    })?;
    let fixtures = args
        .fixtures
        .unwrap_or_else(|| project.dir.join("fixtures"));
    let files = if fixtures.is_file() {
        vec![fixtures]
    } else {
        crate::author::fixture_files(&fixtures)?
    };
    let options = TestOptions {
        load: super::load_options(&args.config, &args.grant)?,
        cache_dir: project.dir.join(".evhost-cache"),
    };
    let manifest = project.manifest.clone();
    // Tools reach wasi:http through the async runtime; the calls themselves block.
    let report = tokio::task::spawn_blocking(move || {
        crate::author::fixtures::run(&manifest, &wasm, &files, &options)
    })
    .await
    .context("the test run panicked")??;
    let u = &report.usage;
    let mut cost = Vec::new();
    if let Some(ns) = report.ns_per_event {
        cost.push(format!(
            "{ns:.0} ns/event (warm, batches of {})",
            report.cost_batch
        ));
    }
    if report.ns_per_event.is_none()
        && project.manifest.kind == Kind::Tool
        && let Some(ns) = u.ns_per_event
    {
        cost.push(format!("{:.1} µs/invocation", ns / 1e3));
    }
    if let Some(f) = u.fuel_used_per_event {
        let per = if project.manifest.kind == Kind::Tool {
            "invocation"
        } else {
            "event"
        };
        cost.push(format!(
            "{f:.0} fuel/{per} of {}",
            u.fuel_per_event.unwrap_or_default()
        ));
    }
    cost.push(format!(
        "peak memory {} KiB of {} MiB",
        u.peak_memory_bytes.div_ceil(1024),
        u.memory_limit_bytes >> 20
    ));
    cost.push(format!("slowest call {:.2} ms", u.max_call_ms));
    cost.push(format!(
        "compile {:.0} ms",
        report.compile.as_secs_f64() * 1e3
    ));
    println!("cost: {}", cost.join(", "));
    let total = report.passed + report.failed.len();
    if report.failed.is_empty() {
        println!("{total} fixture(s) passed");
        Ok(())
    } else {
        bail!("{} of {total} fixture(s) failed", report.failed.len())
    }
}
