//! Everything the CLI writes to the terminal: logging set-up, JSON or human printing, download
//! progress, and errors as messages with a flag hint and an exit code.

use std::fmt::Display;
use std::io::IsTerminal;
use std::process::ExitCode;

use gpu_passthrough::Progress;
use gpu_passthrough::outcome::{Classified, Outcome, ReportOutcome};
use gpu_passthrough::remedy::Remedy;
use gpu_passthrough::text::escape_control;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::Global;

/// The exit code of an outcome (`None`: success), stable for scripts; what each outcome means
/// is [`Outcome`]'s to say.
pub fn exit_code(outcome: Option<Outcome>) -> u8 {
    match outcome {
        None => 0,
        Some(Outcome::Failed) => 1,
        Some(Outcome::VerificationFailed) => 3,
        Some(Outcome::Refused) => 4,
        Some(Outcome::NotReady) => 5,
    }
}

/// What a command returns: its exit code, or why it failed.
pub type CmdResult = Result<ExitCode, Classified>;

/// Set up `tracing` on stderr according to `-v`/`-q`.
pub fn init_logging(global: &Global) {
    let level = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPU_PASSTHROUGH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .try_init();
}

/// Print the command's answer: `value` as pretty JSON when `--json`, else through `human` for
/// people. The command succeeded.
pub fn emit<T: Serialize>(global: &Global, value: &T, human: impl FnOnce(&T)) -> CmdResult {
    if global.json {
        let text = serde_json::to_string_pretty(value).map_err(Classified::failed)?;
        println!("{text}");
    } else {
        human(value);
    }
    Ok(ExitCode::SUCCESS)
}

/// `value`'s `Display` form for a terminal: reports carry guest-derived text (a console's
/// fault messages), so every control character but the line breaks is escaped.
fn terminal<T: Display + ?Sized>(value: &T) -> String {
    value
        .to_string()
        .split('\n')
        .map(escape_control)
        .collect::<Vec<_>>()
        .join("\n")
}

/// [`emit`] with the value's `Display` form for people.
pub fn emit_text<T: Serialize + Display>(global: &Global, value: &T) -> CmdResult {
    emit(global, value, |v| print!("{}", terminal(v)))
}

/// [`emit`] for a list: one item a line for people.
pub fn emit_lines<T: Serialize + Display>(global: &Global, list: &[T]) -> CmdResult {
    emit(global, &list, |l| {
        l.iter().for_each(|v| println!("{}", terminal(v)))
    })
}

/// Print a report that judges the request, with the flag for what it refused or kept, and exit
/// with the code of its outcome.
pub fn emit_judged<T>(global: &Global, report: &T) -> CmdResult
where
    T: Serialize + Display + ReportOutcome,
{
    emit(global, report, |r| {
        print!("{}", terminal(r));
        if let Some(remedy) = r.remedy() {
            println!("({})", flag_hint(&remedy));
        }
    })?;
    Ok(ExitCode::from(exit_code(report.outcome())))
}

/// Print a failure (as JSON on stdout with `--json`, else on stderr) with the flag that fixes
/// it, and exit with the code of its outcome.
pub fn report_error(global: &Global, failure: &Classified) -> ExitCode {
    let code = exit_code(Some(failure.outcome()));
    let hint = failure.remedy().map(|r| format!(" ({})", flag_hint(r)));
    let message = format!("{}{}", terminal(failure), hint.unwrap_or_default());
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
fn flag_hint(remedy: &Remedy) -> String {
    match remedy {
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
        Remedy::DeclareGone => "--gone ID declares an owner gone".into(),
    }
}

/// Download progress: an indicatif bar on stderr implementing the library's [`Progress`]
/// callback. Off the terminal, with `--json` or `-q`, nothing is drawn.
pub struct DownloadBar {
    /// One bar, reset for each download; hidden until a download begins, so a command that
    /// downloads nothing draws nothing.
    bar: ProgressBar,
    shown: bool,
}

impl DownloadBar {
    /// A bar if stderr is a terminal and the user wants human output; else a silent sink.
    pub fn new(global: &Global) -> DownloadBar {
        DownloadBar {
            bar: ProgressBar::hidden(),
            shown: !global.json && !global.quiet && std::io::stderr().is_terminal(),
        }
    }
}

impl Progress for DownloadBar {
    fn begin(&self, url: &str, total: Option<u64>) {
        let style = match total {
            Some(total) => {
                self.bar.set_length(total);
                ProgressStyle::with_template(
                    "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ")
            }
            None => {
                self.bar.unset_length();
                ProgressStyle::with_template("{spinner} {msg:30!} {bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner())
            }
        };
        self.bar.set_style(style);
        self.bar
            .set_message(url.rsplit('/').next().unwrap_or(url).to_string());
        if self.shown && self.bar.is_hidden() {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        self.bar.reset();
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn end(&self) {
        self.bar.finish_and_clear();
    }
}
