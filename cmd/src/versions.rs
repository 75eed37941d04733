//! `gpu-passthrough versions ...`: list and show releases, and the driver-upgrade workflow
//! (`add`, `pin`, `verify`). Files are written to the last `--registry FILE`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use gpu_passthrough::archive::tar::{Limits, extract_tar};
use gpu_passthrough::fetch::{FetchError, FetchOptions, Fetched, Fetcher};
use gpu_passthrough::inspect::{Expectations, Inventory, Trees, inspect};
use gpu_passthrough::registry::{
    Arch, Artifact, ArtifactKind, ArtifactPin, ModuleFlavor, Registry, RegistryError, Release,
    pin_artifacts, write_release,
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

/// A fetch error about `what`, with its exit code: verification failures and refusals have their
/// own.
fn fetch_failure(what: &str, err: FetchError) -> anyhow::Error {
    let code = match err {
        FetchError::DigestMismatch { .. } | FetchError::SizeCap { .. } => exit::VERIFY,
        FetchError::Unpinned { .. } => exit::REFUSED,
        _ => exit::FAILURE,
    };
    fail(code, anyhow::anyhow!("{what}: {err}"))
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
            println!(
                "\nUNPINNED artifacts have no sha256 and are refused; pin them with \
                 `gpu-passthrough versions pin <release> --registry <file>`."
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

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

#[derive(Serialize)]
struct AddReport<'a> {
    release: &'a Release,
    registry: String,
    inspected: Option<InspectionSummary>,
}

#[derive(Serialize)]
struct InspectionSummary {
    modules: Vec<String>,
    firmware: Vec<String>,
    libraries: Vec<String>,
}

impl From<&Inventory> for InspectionSummary {
    fn from(inv: &Inventory) -> Self {
        InspectionSummary {
            modules: inv.modules.iter().map(|m| m.name.clone()).collect(),
            firmware: inv
                .firmware
                .iter()
                .map(|f| f.rel.display().to_string())
                .collect(),
            libraries: inv.libraries.iter().map(|l| l.real_name.clone()).collect(),
        }
    }
}

fn add(global: &Global, args: &AddArgs) -> anyhow::Result<ExitCode> {
    let file = target_file(global, "add")?;
    let arch = match args.arch.or_else(Arch::host) {
        Some(arch) => arch,
        None => anyhow::bail!("this machine's architecture is not supported: pass --arch"),
    };
    let wanted = parse_artifact_args(&args.artifacts)?;
    // Refuse early what would be refused after a long download.
    if !args.replace && file.exists() {
        let existing = Registry::read(&file)?;
        if existing.release(&args.release).is_ok() {
            return Err(RegistryError::Exists {
                file: file.display().to_string(),
                release: args.release.clone(),
            }
            .into());
        }
    }
    let has_driver_artifacts = wanted.keys().any(|k| *k != ArtifactKind::Kernel);
    if has_driver_artifacts && args.driver_version.is_none() {
        anyhow::bail!(
            "NVIDIA artifacts need --driver-version: the modules and libraries are checked against it"
        );
    }

    let fetcher = fetcher(global)?;
    let bar = DownloadBar::new(global);
    let mut fetched: BTreeMap<ArtifactKind, (Vec<String>, Fetched)> = BTreeMap::new();
    for (kind, urls) in &wanted {
        tracing::info!("downloading {kind}");
        let got = fetcher
            .fetch_unpinned(urls, None, &bar)
            .map_err(|e| fetch_failure(&format!("{kind} artifact"), e))?;
        fetched.insert(*kind, (urls.clone(), got));
    }

    let inventory = match &args.driver_version {
        Some(driver_version) if has_driver_artifacts => Some(inspect_artifacts(
            &fetched,
            &args.kernel_version,
            driver_version,
            arch,
        )?),
        _ => None,
    };

    let artifacts = fetched
        .iter()
        .map(|(kind, (urls, got))| Artifact {
            kind: *kind,
            urls: urls.clone(),
            sha256: Some(got.sha256),
            size: Some(got.size),
        })
        .collect();
    let release = Release {
        name: args.release.clone(),
        kernel_version: args.kernel_version.clone(),
        driver_version: args.driver_version.clone(),
        module_flavor: args.flavor,
        default: args.default,
        artifacts: BTreeMap::from([(arch, artifacts)]),
        source: file.display().to_string(),
    };
    write_release(&file, &release, args.replace)?;
    let report = AddReport {
        release: &release,
        registry: file.display().to_string(),
        inspected: inventory.as_ref().map(InspectionSummary::from),
    };
    emit(global, &report, |r| {
        print_release(r.release);
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

/// Extract every tar artifact into a scratch directory and run the module, firmware and library
/// checks. A failure is a verification failure (exit 3) that names each file.
fn inspect_artifacts(
    fetched: &BTreeMap<ArtifactKind, (Vec<String>, Fetched)>,
    kernel_version: &str,
    driver_version: &str,
    arch: Arch,
) -> anyhow::Result<Inventory> {
    let scratch =
        tempfile::tempdir().context("cannot create a scratch directory for inspection")?;
    let mut roots: BTreeMap<ArtifactKind, PathBuf> = BTreeMap::new();
    for (kind, (urls, got)) in fetched {
        if *kind == ArtifactKind::Kernel {
            continue;
        }
        let dest = scratch.path().join(kind.as_str());
        extract_tar(&got.path, &dest, &Limits::default()).map_err(|e| {
            fail(
                exit::VERIFY,
                anyhow::anyhow!("{kind} artifact from {}: {e}", urls[0]),
            )
        })?;
        roots.insert(*kind, dest);
    }
    let root = |k: ArtifactKind| roots.get(&k).map(PathBuf::as_path);
    let trees = Trees {
        nvidia_modules: root(ArtifactKind::NvidiaModules),
        kernel_modules: root(ArtifactKind::KernelModules),
        firmware: root(ArtifactKind::NvidiaFirmware),
        driver_libs: root(ArtifactKind::NvidiaDriverLibs),
    };
    let expect = Expectations {
        kernel_version,
        driver_version,
        arch,
    };
    inspect(&expect, &trees).map_err(|e| {
        let msg = relative_to(&e.to_string(), scratch.path());
        fail(
            exit::VERIFY,
            anyhow::anyhow!("release refused, registry unchanged: {msg}"),
        )
    })
}

/// Paths in messages are inside the scratch directory, which is gone once we return: show them
/// relative to the artifact (`nvidia-modules/lib/modules/.../nvidia.ko`).
fn relative_to(message: &str, scratch: &Path) -> String {
    message.replace(&format!("{}/", scratch.display()), "")
}

#[derive(Serialize)]
struct PinReport {
    release: String,
    registry: String,
    pinned: Vec<PinRow>,
}

#[derive(Serialize)]
struct PinRow {
    arch: Arch,
    kind: ArtifactKind,
    sha256: String,
    size: u64,
}

fn pin(global: &Global, name: &str, only: Option<Arch>) -> anyhow::Result<ExitCode> {
    let file = target_file(global, "pin")?;
    // The target file may not exist yet: pinning an embedded release creates it.
    let readable: Vec<PathBuf> = global
        .registries
        .iter()
        .filter(|p| *p != &file || p.exists())
        .cloned()
        .collect();
    let registry = Registry::load(&readable)?;
    let release = registry.release(name)?;
    let fetcher = fetcher(global)?;
    let bar = DownloadBar::new(global);
    let mut pins = Vec::new();
    for (arch, list) in &release.artifacts {
        if only.is_some_and(|a| a != *arch) {
            continue;
        }
        for a in list.iter().filter(|a| !a.is_pinned()) {
            let got = fetcher
                .fetch_unpinned(&a.urls, a.size, &bar)
                .map_err(|e| fetch_failure(&format!("{arch} {} artifact", a.kind), e))?;
            pins.push(ArtifactPin {
                arch: *arch,
                kind: a.kind,
                sha256: got.sha256,
                size: got.size,
            });
        }
    }
    if !pins.is_empty() {
        pin_artifacts(&file, release, &pins)?;
    }
    let report = PinReport {
        release: name.to_string(),
        registry: file.display().to_string(),
        pinned: pins
            .iter()
            .map(|p| PinRow {
                arch: p.arch,
                kind: p.kind,
                sha256: p.sha256.to_hex(),
                size: p.size,
            })
            .collect(),
    };
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

#[derive(Serialize)]
struct VerifyRow {
    release: String,
    arch: Arch,
    kind: ArtifactKind,
    /// `ok`, `mismatch`, `unpinned`, `not-cached` or `error`.
    status: &'static str,
    expected_sha256: Option<String>,
    actual_sha256: Option<String>,
    expected_size: Option<u64>,
    actual_size: Option<u64>,
    url: Option<String>,
    error: Option<String>,
}

fn verify(
    global: &Global,
    name: Option<&str>,
    cached: bool,
    allow_unpinned: bool,
) -> anyhow::Result<ExitCode> {
    let registry = load(global)?;
    let releases: Vec<&Release> = match name {
        Some(n) => vec![registry.release(n)?],
        None => registry.releases().collect(),
    };
    let fetcher = fetcher(global)?;
    let bar = DownloadBar::new(global);
    let mut rows = Vec::new();
    for release in releases {
        for (arch, list) in &release.artifacts {
            for a in list {
                rows.push(verify_one(&fetcher, &bar, release, *arch, a, cached));
            }
        }
    }
    let count = |s: &str| rows.iter().filter(|r| r.status == s).count();
    let (mismatches, errors, unpinned) = (count("mismatch"), count("error"), count("unpinned"));
    let failure = if mismatches > 0 || errors > 0 {
        let bad: Vec<String> = rows
            .iter()
            .filter(|r| r.status == "mismatch" || r.status == "error")
            .map(|r| format!("{} {} {} ({})", r.release, r.arch, r.kind, r.status))
            .collect();
        let code = if mismatches > 0 {
            exit::VERIFY
        } else {
            exit::FAILURE
        };
        Some((
            code,
            format!(
                "{} artifact(s) failed verification: {}; if the change upstream is legitimate, \
                 re-add or re-pin the release",
                bad.len(),
                bad.join(", ")
            ),
        ))
    } else if unpinned > 0 && !allow_unpinned {
        Some((
            exit::REFUSED,
            format!(
                "{unpinned} artifact(s) are unpinned and cannot be verified; pin them with \
                 `gpu-passthrough versions pin <release> --registry <file>` or pass --allow-unpinned"
            ),
        ))
    } else {
        None
    };
    if global.json {
        // One JSON document: the rows plus the verdict.
        let (code, error) = match &failure {
            Some((code, msg)) => (*code, Some(msg.as_str())),
            None => (0, None),
        };
        let doc = serde_json::json!({ "artifacts": rows, "error": error, "exit_code": code });
        emit(global, &doc, |_| {})?;
        return Ok(ExitCode::from(code));
    }
    for r in &rows {
        let detail = match r.status {
            "mismatch" => format!(
                "MISMATCH from {}: expected sha256 {} ({} bytes), got {} ({} bytes)",
                r.url.as_deref().unwrap_or("the cache"),
                r.expected_sha256.as_deref().unwrap_or("-"),
                r.expected_size.map_or("?".into(), |s| s.to_string()),
                r.actual_sha256.as_deref().unwrap_or("-"),
                r.actual_size.map_or("?".into(), |s| s.to_string()),
            ),
            "unpinned" => "UNPINNED (no sha256 to check)".into(),
            "error" => format!("ERROR {}", r.error.as_deref().unwrap_or("")),
            other => other.to_string(),
        };
        println!("{} {} {}: {detail}", r.release, r.arch, r.kind);
    }
    match failure {
        Some((code, msg)) => Err(fail(code, anyhow::anyhow!(msg))),
        None => Ok(ExitCode::SUCCESS),
    }
}

fn verify_one(
    fetcher: &Fetcher,
    bar: &DownloadBar,
    release: &Release,
    arch: Arch,
    a: &Artifact,
    cached: bool,
) -> VerifyRow {
    let mut row = VerifyRow {
        release: release.name.clone(),
        arch,
        kind: a.kind,
        status: "ok",
        expected_sha256: a.sha256.map(|d| d.to_hex()),
        actual_sha256: None,
        expected_size: a.size,
        actual_size: None,
        url: None,
        error: None,
    };
    let Some(expected) = a.sha256 else {
        row.status = "unpinned";
        return row;
    };
    let result = if cached {
        match fetcher.rehash_cached(&expected) {
            Ok(None) => {
                row.status = "not-cached";
                return row;
            }
            Ok(Some(got)) => Ok(got),
            Err(e) => Err(e),
        }
    } else {
        // Each mirror must still serve the pinned bytes.
        let mut last = None;
        for url in &a.urls {
            row.url = Some(url.clone());
            match fetcher.fetch_unpinned(std::slice::from_ref(url), a.size, bar) {
                Ok(got) if got.sha256 == expected && a.size.is_none_or(|s| s == got.size) => {
                    last = Some(Ok(got));
                }
                other => {
                    last = Some(other);
                    break;
                }
            }
        }
        last.unwrap_or(Err(FetchError::NoUrls))
    };
    match result {
        Ok(got) => {
            row.actual_sha256 = Some(got.sha256.to_hex());
            row.actual_size = Some(got.size);
            if got.sha256 != expected || a.size.is_some_and(|s| s != got.size) {
                row.status = "mismatch";
            }
        }
        Err(FetchError::SizeCap { seen, .. }) => {
            row.status = "mismatch";
            row.actual_size = Some(seen);
        }
        Err(e) => {
            row.status = "error";
            row.error = Some(e.to_string());
        }
    }
    row
}
