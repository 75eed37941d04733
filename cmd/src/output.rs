//! Output shared by every command: logging set-up, JSON or human printing, and errors as
//! messages with a hint and an exit code.

use std::process::ExitCode;

use gpu_passthrough::outcome::{Outcome, outcome};
use gpu_passthrough::remedy::Remedy;
use serde::Serialize;

use crate::Global;

/// Exit codes, stable for scripts.
pub mod exit {
    /// A general failure (I/O, network, bad input).
    pub const FAILURE: u8 = 1;
    /// Verification failed: a digest, a module check, a pin that no longer matches.
    pub const VERIFY: u8 = 3;
    /// The request was refused by a safety check (plan refusals, unpinned artifacts).
    pub const REFUSED: u8 = 4;
    /// A host readiness check failed (doctor).
    pub const NOT_READY: u8 = 5;
}

/// An error that carries an exit code the CLI decided; library errors get theirs from
/// [`outcome`].
#[derive(Debug)]
pub struct Failure {
    /// Process exit code.
    pub code: u8,
    /// The underlying error.
    pub error: anyhow::Error,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)
    }
}

impl std::error::Error for Failure {
    // The wrapped error's causes, so the chain is printed once, whole.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// Every error in the chain, looking inside [`Failure`]s.
fn causes(err: &anyhow::Error) -> Vec<&(dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    for cause in err.chain() {
        match cause.downcast_ref::<Failure>() {
            Some(f) => out.extend(f.error.chain()),
            None => out.push(cause),
        }
    }
    out
}

/// Wrap an error with an exit code.
pub fn fail(code: u8, error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Failure {
        code,
        error: error.into(),
    })
}

/// Set up `tracing` on stderr according to `-v`/`-q`.
pub fn init_logging(global: &Global) {
    let level = if global.quiet {
        "error"
    } else {
        match global.verbose {
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPU_PASSTHROUGH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}

/// Print `value` as pretty JSON when `--json`, else call `human` to print it for people.
pub fn emit<T: Serialize>(
    global: &Global,
    value: &T,
    human: impl FnOnce(&T),
) -> anyhow::Result<()> {
    if global.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

/// Like [`emit`], printing the value's `Display` form for people.
pub fn emit_text<T: Serialize + std::fmt::Display>(
    global: &Global,
    value: &T,
) -> anyhow::Result<()> {
    emit(global, value, |v| print!("{v}"))
}

/// The exit code of an error: the CLI's own where it set one, else the library's outcome.
fn exit_code(err: &anyhow::Error) -> u8 {
    if let Some(f) = err.chain().find_map(|c| c.downcast_ref::<Failure>()) {
        return f.code;
    }
    match outcome(err.as_ref()) {
        Outcome::Refused => exit::REFUSED,
        Outcome::VerificationFailed => exit::VERIFY,
        Outcome::Failed => exit::FAILURE,
    }
}

/// Print an error (as JSON on stdout with `--json`, else on stderr) and pick the exit code.
pub fn report_error(global: &Global, err: &anyhow::Error) -> ExitCode {
    let code = exit_code(err);
    let mut message = format!("{err:#}");
    if let Some(hint) = flag_hint(err) {
        message = format!("{message} ({hint})");
    }
    if global.json {
        let body = serde_json::json!({ "error": message, "exit_code": code });
        println!("{body}");
    } else {
        eprintln!("error: {message}");
    }
    ExitCode::from(code)
}

/// The flag or command that fixes a library error (the library names no flags: a control plane
/// has none).
fn flag_hint(err: &anyhow::Error) -> Option<String> {
    let remedy = causes(err)
        .into_iter()
        .find_map(gpu_passthrough::remedy::remedy)?;
    Some(match remedy {
        Remedy::SysfsRoot => "--sysfs-root DIR names the sysfs tree".into(),
        Remedy::StateDir => "--state-dir DIR picks another state dir".into(),
        Remedy::CacheDir => "--cache-dir DIR picks another cache".into(),
        Remedy::RegistryFile => "check the path given to --registry".into(),
        Remedy::NameDevices => "name DEVICE addresses or pass --gpus N".into(),
        Remedy::AllowBootVga => "--allow-boot-vga moves the boot display".into(),
        Remedy::PinRelease(r) => {
            format!("run `gpu-passthrough versions pin {r} --registry <file>`")
        }
        Remedy::Reconcile => "then run `gpu-passthrough reconcile`".into(),
        Remedy::GuestInit => "pass the static guest init with --guest-init PATH".into(),
    })
}
