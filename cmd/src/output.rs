//! Output shared by every command: logging set-up, JSON or human printing, and errors as
//! messages with a hint and an exit code.

use std::process::ExitCode;

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

/// An error that carries its own exit code; anything else exits with [`exit::FAILURE`].
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

/// Print an error (as JSON on stdout with `--json`, else on stderr) and pick the exit code.
pub fn report_error(global: &Global, err: &anyhow::Error) -> ExitCode {
    let code = err
        .chain()
        .find_map(|c| c.downcast_ref::<Failure>())
        .map_or(exit::FAILURE, |f| f.code);
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

/// The command or flag that fixes a library error: the library names no CLI flags, since a
/// control plane has none; the CLI adds them here, once.
fn flag_hint(err: &anyhow::Error) -> Option<String> {
    use gpu_passthrough::attach::{AttachError, JournalError, RefusalReason};
    use gpu_passthrough::fetch::FetchError;
    use gpu_passthrough::pci::PciError;
    use gpu_passthrough::registry::RegistryError;
    causes(err).into_iter().find_map(|cause| {
        // Transparent wrappers (`#[error(transparent)]`) hide the wrapped error from the chain.
        let fetch = cause.downcast_ref::<FetchError>().or_else(|| {
            match cause.downcast_ref::<gpu_passthrough::initrd::InitrdError>()? {
                gpu_passthrough::initrd::InitrdError::Fetch(e) => Some(e),
                _ => None,
            }
        });
        if let Some(e) = fetch {
            return match e {
                FetchError::Unpinned { release, .. } => Some(format!(
                    "run `gpu-passthrough versions pin {release} --registry <file>`"
                )),
                FetchError::Cache { .. } => Some("--cache-dir DIR picks another cache".into()),
                _ => None,
            };
        }
        if let Some(JournalError::Io { .. }) = cause.downcast_ref::<JournalError>() {
            return Some("--state-dir DIR picks another state dir".into());
        }
        if let Some(PciError::Read { .. }) = cause.downcast_ref::<PciError>() {
            return Some("--sysfs-root DIR names the sysfs tree".into());
        }
        if let Some(RegistryError::Read { .. }) = cause.downcast_ref::<RegistryError>() {
            return Some("check the path given to --registry".into());
        }
        match cause.downcast_ref::<AttachError>()? {
            AttachError::Pci(PciError::Read { .. }) => {
                Some("--sysfs-root DIR names the sysfs tree".into())
            }
            AttachError::Journal(JournalError::Io { .. }) => {
                Some("--state-dir DIR picks another state dir".into())
            }
            AttachError::NothingRequested => Some("name DEVICE addresses or pass --gpus N".into()),
            AttachError::RollbackFailed { .. } => {
                Some("then run `gpu-passthrough reconcile`".into())
            }
            AttachError::Refused(refusals)
                if refusals.iter().any(|r| r.reason == RefusalReason::BootVga) =>
            {
                Some("--allow-boot-vga moves the boot display".into())
            }
            _ => None,
        }
    })
}
