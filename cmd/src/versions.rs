//! `gpu-passthrough versions ...`: list and show releases, and the driver-upgrade workflow
//! (`add`, `pin`, `verify`). Files are written to the last `--registry FILE`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use gpu_passthrough::fetch::{FetchOptions, Fetcher};
use gpu_passthrough::registry::{Arch, ArtifactKind, ModuleFlavor, Registry, Release};
use gpu_passthrough::versions::{
    self, AddRequest, Verdict, VerifySource, VerifyStatus, VersionsError,
};
use serde::Serialize;

use crate::Global;
use crate::output::{emit, exit, fail};
use crate::progress::DownloadBar;

/// Registry commands.
#[derive(Debug, clap::Subcommand)]
pub enum VersionsCommand {
    /// List releases (embedded default plus --registry files), marking unpinned ones.
    List,
    /// Show one release (default: the default release), where it came from and its artifacts.
    Show {
        /// Release name.
        release: Option<String>,
    },
    /// Download artifacts, inspect them, and write a pinned release into the --registry FILE.
    Add(AddArgs),
    /// Fill in missing digests and sizes of a release by downloading, into the --registry FILE.
    Pin {
        /// Release name.
        release: String,
        /// Only this architecture's artifacts.
        #[arg(long)]
        arch: Option<Arch>,
    },
    /// Re-check every pinned artifact (exit 3 naming each mismatch; 4 if any is unpinned).
    Verify {
        /// Release name (default: every release).
        release: Option<String>,
        /// Re-hash the cached files instead of downloading again.
        #[arg(long)]
        cached: bool,
        /// Do not fail because of unpinned artifacts.
        #[arg(long)]
        allow_unpinned: bool,
    },
}

/// `versions add` arguments.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// Name of the new release.
    release: String,
    /// The guest kernel's `uname -r`.
    #[arg(long)]
    kernel_version: String,
    /// The NVIDIA driver version (required with NVIDIA artifacts).
    #[arg(long)]
    driver_version: Option<String>,
    /// NVIDIA kernel module flavor.
    #[arg(long)]
    flavor: Option<ModuleFlavor>,
    /// Architecture of the artifacts [default: this machine's].
    #[arg(long)]
    arch: Option<Arch>,
    /// KIND=URL (repeatable; the same KIND again adds a mirror).
    #[arg(long = "artifact", value_name = "KIND=URL", required = true)]
    artifacts: Vec<String>,
    /// Make it the default release.
    #[arg(long)]
    default: bool,
    /// Overwrite a release of the same name in FILE.
    #[arg(long)]
    replace: bool,
    /// Largest download accepted per artifact, in bytes (default: 4 GiB).
    #[arg(long, value_name = "BYTES")]
    max_download_bytes: Option<u64>,
}

/// Run a `versions` command.
pub fn run(global: &Global, cmd: &VersionsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VersionsCommand::List => list(global),
        VersionsCommand::Show { release } => show(global, release.as_deref()),
        VersionsCommand::Add(args) => add(global, args),
        VersionsCommand::Pin { release, arch } => pin(global, release, *arch),
        VersionsCommand::Verify {
            release,
            cached,
            allow_unpinned,
        } => verify(global, release.as_deref(), *cached, *allow_unpinned),
    }
}

fn load(global: &Global) -> anyhow::Result<Registry> {
    Ok(Registry::load(&global.registries)?)
}

/// The file `add` and `pin` write: the last `--registry`.
fn target_file(global: &Global, command: &str) -> anyhow::Result<PathBuf> {
    global.registries.last().cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "`versions {command}` writes a registry file: pass --registry FILE \
             (it is created if missing)"
        )
    })
}

fn fetcher(global: &Global) -> anyhow::Result<Fetcher> {
    Ok(Fetcher::new(&global.cache_dir(), FetchOptions::default())?)
}

/// The exit code the library's classification of a workflow error maps to.
fn versions_failure(err: VersionsError) -> anyhow::Error {
    let code = if err.is_verification_failure() {
        exit::VERIFY
    } else if err.is_refusal() {
        exit::REFUSED
    } else {
        exit::FAILURE
    };
    fail(code, err)
}

#[derive(Serialize)]
struct ReleaseSummary<'a> {
    name: &'a str,
    kernel_version: &'a str,
    driver_version: Option<&'a str>,
    module_flavor: Option<ModuleFlavor>,
    default: bool,
    arches: Vec<Arch>,
    artifacts: usize,
    unpinned: usize,
    source: &'a str,
}

fn list(global: &Global) -> anyhow::Result<ExitCode> {
    let registry = load(global)?;
    let rows: Vec<ReleaseSummary> = registry
        .releases()
        .map(|r| ReleaseSummary {
            name: &r.name,
            kernel_version: &r.kernel_version,
            driver_version: r.driver_version.as_deref(),
            module_flavor: r.module_flavor,
            default: r.default,
            arches: r.artifacts.keys().copied().collect(),
            artifacts: r.artifacts.values().map(Vec::len).sum(),
            unpinned: r
                .artifacts
                .values()
                .flatten()
                .filter(|a| !a.is_pinned())
                .count(),
            source: &r.source,
        })
        .collect();
    emit(global, &serde_json::json!({ "releases": rows }), |_| {
        println!(
            "  {:<34} {:<16} {:<11} {:<11} {:<16} {:<11} SOURCE",
            "RELEASE", "KERNEL", "DRIVER", "FLAVOR", "ARCH", "PINS"
        );
        for r in &rows {
            let pins = if r.unpinned == 0 {
                format!("{}/{}", r.artifacts, r.artifacts)
            } else {
                format!("UNPINNED {}/{}", r.artifacts - r.unpinned, r.artifacts)
            };
            let arches: Vec<&str> = r.arches.iter().map(|a| a.as_str()).collect();
            println!(
                "{} {:<34} {:<16} {:<11} {:<11} {:<16} {:<11} {}",
                if r.default { "*" } else { " " },
                r.name,
                r.kernel_version,
                r.driver_version.unwrap_or("-"),
                r.module_flavor.map_or("-", ModuleFlavor::as_str),
                arches.join(","),
                pins,
                r.source
            );
        }
        if rows.iter().any(|r| r.unpinned > 0) {
            println!("\nUNPINNED artifacts have no sha256 and are refused; {PIN_HINT}.");
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// How to pin, for messages about unpinned artifacts.
const PIN_HINT: &str = "pin them with `gpu-passthrough versions pin <release> --registry <file>`";

fn print_release(r: &Release) {
    println!(
        "release {}{}",
        r.name,
        if r.default { " (default)" } else { "" }
    );
    println!("  source:          {}", r.source);
    println!("  kernel_version:  {}", r.kernel_version);
    println!(
        "  driver_version:  {}",
        r.driver_version.as_deref().unwrap_or("-")
    );
    println!(
        "  module_flavor:   {}",
        r.module_flavor.map_or("-", ModuleFlavor::as_str)
    );
    for (arch, list) in &r.artifacts {
        println!("  {arch}:");
        for a in list {
            println!("    {}", a.kind);
            match &a.sha256 {
                Some(d) => println!("      sha256: {d}"),
                None => println!(
                    "      sha256: UNPINNED (run `gpu-passthrough versions pin {} --registry <file>`)",
                    r.name
                ),
            }
            match a.size {
                Some(s) => println!("      size:   {s}"),
                None => println!("      size:   -"),
            }
            for url in &a.urls {
                println!("      url:    {url}");
            }
        }
    }
}

fn show(global: &Global, name: Option<&str>) -> anyhow::Result<ExitCode> {
    let registry = load(global)?;
    let release = registry.resolve(name)?;
    emit(global, release, print_release)?;
    Ok(ExitCode::SUCCESS)
}

/// `KIND=URL` arguments → kind → mirrors, in the order given.
fn parse_artifact_args(args: &[String]) -> anyhow::Result<BTreeMap<ArtifactKind, Vec<String>>> {
    let mut out: BTreeMap<ArtifactKind, Vec<String>> = BTreeMap::new();
    for arg in args {
        let (kind, url) = arg.split_once('=').with_context(|| {
            format!(
                "--artifact `{arg}`: expected KIND=URL, e.g. kernel=https://example.com/vmlinuz"
            )
        })?;
        let kind: ArtifactKind = kind
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--artifact `{arg}`: {e}"))?;
        out.entry(kind).or_default().push(url.to_string());
    }
    Ok(out)
}

fn add(global: &Global, args: &AddArgs) -> anyhow::Result<ExitCode> {
    let file = target_file(global, "add")?;
    let Some(arch) = args.arch.or_else(Arch::host) else {
        anyhow::bail!("this machine's architecture is not supported: pass --arch");
    };
    let request = AddRequest {
        file,
        release: args.release.clone(),
        kernel_version: args.kernel_version.clone(),
        driver_version: args.driver_version.clone(),
        flavor: args.flavor,
        arch,
        artifacts: parse_artifact_args(&args.artifacts)?,
        default: args.default,
        replace: args.replace,
        max_download_bytes: args.max_download_bytes,
    };
    let report = versions::add(&fetcher(global)?, &request, &DownloadBar::new(global)).map_err(
        |e| match e {
            VersionsError::NoDriverVersion => fail(
                exit::FAILURE,
                anyhow::Error::new(e).context("pass --driver-version"),
            ),
            e => versions_failure(e),
        },
    )?;
    emit(global, &report, |r| {
        print_release(&r.release);
        if let Some(i) = &r.inspected {
            println!(
                "inspected: {} modules ({}), {} firmware files, {} libraries",
                i.modules.len(),
                i.modules.join(", "),
                i.firmware.len(),
                i.libraries.len()
            );
        }
        println!("written to {}", r.registry);
    })?;
    Ok(ExitCode::SUCCESS)
}

fn pin(global: &Global, name: &str, only: Option<Arch>) -> anyhow::Result<ExitCode> {
    let file = target_file(global, "pin")?;
    let report = versions::pin(
        &fetcher(global)?,
        &global.registries,
        &file,
        name,
        only,
        &DownloadBar::new(global),
    )
    .map_err(versions_failure)?;
    emit(global, &report, |r| {
        if r.pinned.is_empty() {
            println!(
                "release {}: nothing to pin, every artifact has a digest",
                r.release
            );
        }
        for p in &r.pinned {
            println!(
                "pinned {} {} {} {} bytes",
                r.release, p.arch, p.kind, p.size
            );
            println!("  sha256 {}", p.sha256);
        }
        if !r.pinned.is_empty() {
            println!("written to {}", r.registry);
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(
    global: &Global,
    name: Option<&str>,
    cached: bool,
    allow_unpinned: bool,
) -> anyhow::Result<ExitCode> {
    let registry = load(global)?;
    let source = if cached {
        VerifySource::Cache
    } else {
        VerifySource::Mirrors
    };
    let report = versions::verify(
        &fetcher(global)?,
        &registry,
        name,
        source,
        &DownloadBar::new(global),
    )
    .map_err(versions_failure)?;
    let verdict = report.verdict(allow_unpinned);
    let (code, message) = match &verdict {
        Verdict::Ok => (0, None),
        Verdict::Mismatch(_) => (exit::VERIFY, Some(verdict.to_string())),
        Verdict::Error(_) => (exit::FAILURE, Some(verdict.to_string())),
        Verdict::Unpinned(_) => (
            exit::REFUSED,
            Some(format!("{verdict}: {PIN_HINT} or pass --allow-unpinned")),
        ),
    };
    if global.json {
        // One JSON document: the rows plus the verdict.
        let doc = serde_json::json!({
            "artifacts": report.artifacts,
            "error": message,
            "exit_code": code,
        });
        emit(global, &doc, |_| {})?;
        return Ok(ExitCode::from(code));
    }
    for r in &report.artifacts {
        let detail = match r.status {
            VerifyStatus::Mismatch => format!(
                "MISMATCH from {}: expected sha256 {} ({} bytes), got {} ({} bytes)",
                r.url.as_deref().unwrap_or("the cache"),
                r.expected_sha256.as_deref().unwrap_or("-"),
                r.expected_size.map_or("?".into(), |s| s.to_string()),
                r.actual_sha256.as_deref().unwrap_or("-"),
                r.actual_size.map_or("?".into(), |s| s.to_string()),
            ),
            VerifyStatus::Unpinned => "UNPINNED (no sha256 to check)".into(),
            VerifyStatus::Error => format!("ERROR {}", r.error.as_deref().unwrap_or("")),
            status @ (VerifyStatus::Ok | VerifyStatus::NotCached) => status.as_str().into(),
        };
        println!("{} {} {}: {detail}", r.release, r.arch, r.kind);
    }
    match message {
        Some(msg) => Err(fail(code, anyhow::anyhow!(msg))),
        None => Ok(ExitCode::SUCCESS),
    }
}
