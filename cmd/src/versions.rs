//! `gpu-passthrough versions ...`: list and show releases, and the driver-upgrade workflow
//! (`add`, `pin`, `verify`). Files are written to the last `--registry FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use gpu_passthrough::registry::{Arch, ModuleFlavor, Registry};
use gpu_passthrough::text::ReleaseTable;
use gpu_passthrough::versions::{self, AddRequest, Verdict, VerifySource, VersionsError};

use crate::Global;
use crate::output::{emit, emit_text, exit, fail};
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
    /// What changes from release A to B: kernel, driver, modules, firmware, libraries, GPUs.
    Diff {
        /// The release upgraded from.
        from: String,
        /// The release upgraded to.
        to: String,
        /// Architecture compared [default: this machine's].
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
        /// Also re-hash the unpacked artifact trees and built layers in the cache.
        #[arg(long)]
        deep: bool,
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
    /// NVIDIA kernel module flavor (checked against the modules' license fields).
    #[arg(long)]
    flavor: Option<ModuleFlavor>,
    /// The release ships no GSP firmware (proprietary modules only, e.g. for Pascal GPUs).
    #[arg(long)]
    no_gsp: bool,
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
        VersionsCommand::Diff { from, to, arch } => diff(global, from, to, *arch),
        VersionsCommand::Verify {
            release,
            cached,
            allow_unpinned,
            deep,
        } => verify(global, release.as_deref(), *cached, *allow_unpinned, *deep),
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

fn list(global: &Global) -> anyhow::Result<ExitCode> {
    let rows = versions::summaries(&load(global)?);
    emit(global, &serde_json::json!({ "releases": rows }), |_| {
        print!("{}", ReleaseTable(&rows));
        if rows.iter().any(|r| r.unpinned > 0) {
            println!("\nUNPINNED artifacts have no sha256 and are refused; {PIN_HINT}.");
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// How to pin, for messages about unpinned artifacts.
const PIN_HINT: &str = "pin them with `gpu-passthrough versions pin <release> --registry <file>`";

fn show(global: &Global, name: Option<&str>) -> anyhow::Result<ExitCode> {
    let registry = load(global)?;
    let release = registry.resolve(name)?;
    emit_text(global, release)?;
    Ok(ExitCode::SUCCESS)
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
        gsp: !args.no_gsp,
        arch,
        artifacts: versions::artifact_urls(&args.artifacts)
            .map_err(|e| anyhow::anyhow!("--artifact {e}"))?,
        default: args.default,
        replace: args.replace,
        max_download_bytes: args.max_download_bytes,
    };
    let report = versions::add(
        &versions::fetcher(&global.cache_dir())?,
        &request,
        &DownloadBar::new(global),
    )
    .map_err(|e| match e {
        VersionsError::NoDriverVersion => fail(
            exit::FAILURE,
            anyhow::Error::new(e).context("pass --driver-version"),
        ),
        e => e.into(),
    })?;
    emit_text(global, &report)?;
    Ok(ExitCode::SUCCESS)
}

fn pin(global: &Global, name: &str, only: Option<Arch>) -> anyhow::Result<ExitCode> {
    let file = target_file(global, "pin")?;
    let report = versions::pin(
        &versions::fetcher(&global.cache_dir())?,
        &global.registries,
        &file,
        name,
        only,
        &DownloadBar::new(global),
    )?;
    emit_text(global, &report)?;
    Ok(ExitCode::SUCCESS)
}

fn diff(global: &Global, from: &str, to: &str, arch: Option<Arch>) -> anyhow::Result<ExitCode> {
    let Some(arch) = arch.or_else(Arch::host) else {
        anyhow::bail!("this machine's architecture is not supported: pass --arch");
    };
    let report = versions::diff(
        &versions::fetcher(&global.cache_dir())?,
        &global.cache_dir(),
        &load(global)?,
        from,
        to,
        arch,
        &DownloadBar::new(global),
    )?;
    emit_text(global, &report)?;
    Ok(ExitCode::SUCCESS)
}

fn verify(
    global: &Global,
    name: Option<&str>,
    cached: bool,
    allow_unpinned: bool,
    deep: bool,
) -> anyhow::Result<ExitCode> {
    let registry = load(global)?;
    let source = if cached {
        VerifySource::Cache
    } else {
        VerifySource::Mirrors
    };
    let bar = DownloadBar::new(global);
    let fetcher = versions::fetcher(&global.cache_dir())?;
    let report = if deep {
        let cache = global.cache_dir();
        versions::verify_deep(&fetcher, &cache, &registry, name, source, &bar)?
    } else {
        versions::verify(&fetcher, &registry, name, source, &bar)?
    };
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
            "cache": report.cache,
            "error": message,
            "exit_code": code,
        });
        emit(global, &doc, |_| {})?;
        return Ok(ExitCode::from(code));
    }
    for r in &report.artifacts {
        print!("{r}");
    }
    for r in &report.cache {
        print!("{r}");
    }
    match message {
        Some(msg) => Err(fail(code, anyhow::anyhow!(msg))),
        None => Ok(ExitCode::SUCCESS),
    }
}
