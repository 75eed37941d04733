//! `gpu-passthrough versions ...`: list and show releases, and the driver-upgrade workflow
//! (`add`, `pin`, `verify`). Files are written to the last `--registry FILE`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use gpu_passthrough::Fetcher;
use gpu_passthrough::driver_build::{SigningKey, Stage, sandbox::SandboxLimits};
use gpu_passthrough::outcome::{Classified, ReportOutcome};
use gpu_passthrough::registry::{Arch, ArtifactKind, ModuleFlavor, Signer};
use gpu_passthrough::text::ReleaseTable;
use gpu_passthrough::versions::build::{self, BuildInputs, BuildRequest, RebuildRequest};
use gpu_passthrough::versions::{self, AddRequest, Verdict, VerifySource, VersionsError};

use crate::Global;
use crate::output::{
    CmdResult, DownloadBar, emit, emit_judged, emit_text, exit_code, report_error,
};

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
    Verify(VerifyArgs),
    /// Build NVIDIA's modules in a sandbox from --artifact nvidia-kernel-source=URL,
    /// kernel-headers=URL (once per archive) and source-patch=URL (in order); pin into FILE.
    Build(BuildArgs),
}

/// `versions build` arguments: those of `add`, the inputs as `--artifact`s, and the build's own.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    add: AddArgs,
    /// Sign every module with KEY (and --sign-cert).
    #[arg(long, value_name = "KEY", requires = "sign_cert")]
    sign_key: Option<PathBuf>,
    /// KEY's X.509 certificate.
    #[arg(long, value_name = "CERT", requires = "sign_key")]
    sign_cert: Option<PathBuf>,
    /// The artifact's URL is URL/<file name> [default: a file:// URL].
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// Copy the artifact into DIR for publishing.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Kill the build past SECONDS.
    #[arg(long, value_name = "SECONDS", default_value_t = 10800)]
    time_limit: u64,
    /// Cap each build process's address space at MIB.
    #[arg(long, value_name = "MIB", default_value_t = 8192)]
    memory_limit: u64,
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
    /// The NVIDIA modules are signed by this certificate CN (`modinfo`'s `signer:`); each must
    /// carry that signature.
    #[arg(long, value_name = "CN", requires = "signer_key_id")]
    signer: Option<String>,
    /// The signing certificate's serial as `AA:BB:...` (`modinfo`'s `sig_key:`).
    #[arg(long, value_name = "ID", requires = "signer")]
    signer_key_id: Option<String>,
    /// The guest kernel refuses unsigned modules (CONFIG_MODULE_SIG_FORCE=y): needs --signer.
    #[arg(long)]
    module_sig_force: bool,
}

/// `versions verify` arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Release name (default: every release).
    release: Option<String>,
    /// Re-hash the cached files instead of downloading again.
    #[arg(long)]
    cached: bool,
    /// Do not fail because of unpinned artifacts.
    #[arg(long)]
    allow_unpinned: bool,
    /// Also re-check the cache: each unpacked artifact tree against its archive, each built
    /// layer against its recorded digests.
    #[arg(long)]
    deep: bool,
    /// Rebuild RELEASE's modules from its pinned inputs and compare (exit 3 naming each module
    /// that differs).
    #[arg(long, requires = "release")]
    rebuild: bool,
}

/// Run a `versions` command.
pub fn run(global: &Global, cmd: &VersionsCommand) -> CmdResult {
    match cmd {
        VersionsCommand::List => list(global),
        VersionsCommand::Show { release } => {
            emit_text(global, global.at.registry()?.resolve(release.as_deref())?)
        }
        VersionsCommand::Add(args) => add(global, args),
        VersionsCommand::Pin { release, arch } => pin(global, release, *arch),
        VersionsCommand::Diff { from, to, arch } => diff(global, from, to, *arch),
        VersionsCommand::Verify(args) => verify(global, args),
        VersionsCommand::Build(args) => build(global, args),
    }
}

/// The file `add` and `pin` write: the last `--registry`.
fn target_file(global: &Global, command: &str) -> Result<PathBuf, Classified> {
    global.at.registries.last().cloned().ok_or_else(|| {
        Classified::message(format!(
            "`versions {command}` writes a registry file: pass --registry FILE \
             (it is created if missing)"
        ))
    })
}

/// The architecture asked for, else this machine's.
fn arch_or_host(arch: Option<Arch>) -> Result<Arch, Classified> {
    arch.or_else(Arch::host).ok_or_else(|| {
        Classified::message("this machine's architecture is not supported: pass --arch")
    })
}

fn list(global: &Global) -> CmdResult {
    let rows = versions::summaries(&global.at.registry()?);
    emit(global, &serde_json::json!({ "releases": rows }), |_| {
        print!("{}", ReleaseTable(&rows));
        if rows.iter().any(|r| r.unpinned > 0) {
            println!("\nUNPINNED artifacts have no sha256 and are refused; {PIN_HINT}.");
        }
    })
}

/// How to pin, for messages about unpinned artifacts.
const PIN_HINT: &str = "pin them with `gpu-passthrough versions pin <release> --registry <file>`";

fn add(global: &Global, args: &AddArgs) -> CmdResult {
    let artifacts = versions::artifact_urls(&args.artifacts).map_err(artifact_flag)?;
    let request = add_request(global, args, "add", artifacts)?;
    let (fetcher, bar, _) = fetcher(global)?;
    match versions::add(&fetcher, &request, &bar) {
        Err(e @ VersionsError::NoDriverVersion) => {
            Err(Classified::from(e).context("pass --driver-version"))
        }
        report => emit_text(global, &report?),
    }
}

/// The release `add` writes from its flags (and `build`, which takes them too).
fn add_request(
    global: &Global,
    args: &AddArgs,
    command: &str,
    artifacts: BTreeMap<ArtifactKind, Vec<String>>,
) -> Result<AddRequest, Classified> {
    Ok(AddRequest {
        file: target_file(global, command)?,
        release: args.release.clone(),
        kernel_version: args.kernel_version.clone(),
        driver_version: args.driver_version.clone(),
        flavor: args.flavor,
        gsp: !args.no_gsp,
        arch: arch_or_host(args.arch)?,
        artifacts,
        default: args.default,
        replace: args.replace,
        max_download_bytes: args.max_download_bytes,
        signer: args
            .signer
            .clone()
            .zip(args.signer_key_id.clone())
            .map(|(subject, key_id)| Signer { subject, key_id }),
        module_sig_force: args.module_sig_force,
    })
}

/// A bad `--artifact` pair.
fn artifact_flag(problem: String) -> Classified {
    Classified::message(format!("--artifact {problem}"))
}

/// The fetcher over the cache, a progress bar for its downloads, and the cache.
fn fetcher(global: &Global) -> Result<(Fetcher, DownloadBar, PathBuf), Classified> {
    let cache = global.at.cache_dir();
    Ok((versions::fetcher(&cache)?, DownloadBar::new(global), cache))
}

fn build(global: &Global, a: &BuildArgs) -> CmdResult {
    let need = |flag| Classified::message(format!("`versions build` needs {flag}"));
    let add = add_request(global, &a.add, "build", BTreeMap::new())?;
    let driver = (add.driver_version.clone()).ok_or_else(|| need("--driver-version"))?;
    let flavor = add
        .flavor
        .ok_or_else(|| need("--flavor open|proprietary"))?;
    let inputs = BuildInputs::parse(&a.add.artifacts).map_err(artifact_flag)?;
    let request = BuildRequest {
        signing: (a.sign_key.clone().zip(a.sign_cert.clone()))
            .map(|(key, cert)| SigningKey { key, cert }),
        base_url: a.base_url.clone(),
        out_dir: a.out.clone(),
        limits: SandboxLimits {
            wall: Duration::from_secs(a.time_limit),
            memory_bytes: a.memory_limit << 20,
        },
        ..BuildRequest::from_add(add, driver, flavor, inputs)?
    };
    let (fetcher, bar, cache) = fetcher(global)?;
    let report = build::build(&fetcher, &cache, &request, &bar, &stages(global))?;
    emit_text(global, &report)
}

/// Build stages on stderr, for people.
fn stages(global: &Global) -> impl Fn(Stage) + '_ {
    |s| {
        if !global.quiet {
            eprintln!("{s}")
        }
    }
}

fn pin(global: &Global, name: &str, only: Option<Arch>) -> CmdResult {
    let file = target_file(global, "pin")?;
    let (fetcher, bar, _) = fetcher(global)?;
    let report = versions::pin(&fetcher, &global.at.registries, &file, name, only, &bar)?;
    emit_text(global, &report)
}

fn diff(global: &Global, from: &str, to: &str, arch: Option<Arch>) -> CmdResult {
    let arch = arch_or_host(arch)?;
    let ((fetcher, bar, cache), registry) = (fetcher(global)?, global.at.registry()?);
    let report = versions::diff(&fetcher, &cache, &registry, from, to, arch, &bar)?;
    emit_text(global, &report)
}

/// `versions verify`: the rows, then the verdict as the error and exit code.
fn verify(global: &Global, args: &VerifyArgs) -> CmdResult {
    let ((fetcher, bar, cache), registry) = (fetcher(global)?, global.at.registry()?);
    if let Some(name) = args.release.clone().filter(|_| args.rebuild) {
        let arch = arch_or_host(None)?;
        let req = RebuildRequest {
            release: name,
            arch,
            signing: None,
        };
        let report =
            build::verify_rebuild(&fetcher, &cache, &registry, &req, &bar, &stages(global))?;
        return emit_judged(global, &report);
    }
    let source = match args.cached {
        true => VerifySource::Cache,
        false => VerifySource::Mirrors,
    };
    let name = args.release.as_deref();
    let report = match args.deep {
        true => versions::verify_deep(&fetcher, &cache, &registry, name, source, &bar)?,
        false => versions::verify(&fetcher, &registry, name, source, &bar)?,
    };
    let verdict = report.verdict(args.allow_unpinned);
    let outcome = verdict.outcome();
    let message = match verdict {
        Verdict::Ok => None,
        Verdict::Unpinned(_) => Some(format!("{verdict}: {PIN_HINT} or pass --allow-unpinned")),
        _ => Some(verdict.to_string()),
    };
    // With --json, one document: the rows plus the verdict; for people, the rows, then the
    // verdict as the error.
    let code = exit_code(outcome);
    let doc = serde_json::json!({
        "artifacts": report.artifacts,
        "cache": report.cache,
        "error": message,
        "exit_code": code,
    });
    emit(global, &doc, |_| print!("{report}"))?;
    Ok(match outcome.zip(message) {
        Some((outcome, msg)) if !global.json => {
            report_error(global, &Classified::message(msg).with_outcome(outcome))
        }
        _ => ExitCode::from(code),
    })
}
