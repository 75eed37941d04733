//! Loading the manifest's kernel modules in order and classifying each failure.

use crate::context::SetupContext;
use crate::kmsg::{KernelLog, failed_firmware, signature_rejection};
use gpu_passthrough_guest_contract::report::{FailureClass, ModuleReport, ModuleResult};
use gpu_passthrough_guest_contract::{Module, normalize_module_name};
use nix::errno::Errno;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::Path;

/// Why a module could not be handed to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The `.ko` could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The module file.
        path: String,
        /// The open error.
        source: std::io::Error,
    },
    /// The parameters contain a NUL byte.
    #[error("module parameters for {path} contain a NUL byte: fix the manifest")]
    BadParams {
        /// The module file.
        path: String,
    },
    /// The kernel refused the module.
    #[error("finit_module: {0}")]
    Kernel(Errno),
}

/// Something that can load a kernel module: the real `finit_module`, or a fake in tests.
pub trait ModuleLoader {
    /// Load the module file at `path` with `params` (space-separated `key=value`).
    fn load(&self, path: &Path, params: &str) -> Result<(), LoadError>;
}

/// Loads modules with `finit_module(2)`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FinitModule;

impl ModuleLoader for FinitModule {
    fn load(&self, path: &Path, params: &str) -> Result<(), LoadError> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| LoadError::Open {
            path: shown.clone(),
            source,
        })?;
        let params = CString::new(params).map_err(|_| LoadError::BadParams { path: shown })?;
        nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty())
            .map_err(LoadError::Kernel)
    }
}

/// Load every module in order. Returns one report per module and the firmware files the kernel
/// log said were missing.
pub fn load_modules(
    ctx: &SetupContext,
    modules: &[Module],
    loader: &dyn ModuleLoader,
    log: &mut KernelLog,
) -> (Vec<ModuleReport>, Vec<String>) {
    let mut reports = Vec::with_capacity(modules.len());
    let mut failed: HashMap<String, FailureClass> = HashMap::new();
    let mut missing_firmware = Vec::new();
    // `nvidia.NVreg_NvLinkDisable=1` and the like: finit_module never reads the command line.
    let cmdline = std::fs::read_to_string(ctx.proc_root.join("cmdline")).unwrap_or_default();
    for module in modules {
        let name = normalize_module_name(&module.name);
        if let Some((dep, class)) = module.depends.iter().find_map(|d| {
            failed
                .get(&normalize_module_name(d))
                .map(|c| (normalize_module_name(d), *c))
        }) {
            failed.insert(name.clone(), class);
            reports.push(ModuleReport {
                message: Some(format!(
                    "not loaded because {dep}, which it depends on, failed ({})",
                    class_name(class)
                )),
                name,
                result: ModuleResult::Skipped,
                class: Some(class),
                errno: None,
                dependency: Some(dep),
            });
            continue;
        }
        let path = ctx.layer_path(&module.path);
        let params = std::iter::once(module.params.as_str())
            .chain(
                gpu_passthrough_guest_contract::cmdline_module_params(&cmdline, &name)
                    .iter()
                    .map(String::as_str),
            )
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let outcome = loader.load(&path, &params);
        let kernel_lines = log.read_new();
        let firmware: Vec<String> = kernel_lines
            .iter()
            .filter_map(|l| failed_firmware(l))
            .collect();
        for fw in &firmware {
            if !missing_firmware.contains(fw) {
                missing_firmware.push(fw.clone());
            }
        }
        let report = match outcome {
            Ok(()) => ok_report(name.clone(), ModuleResult::Loaded),
            Err(LoadError::Kernel(Errno::EEXIST)) => {
                ok_report(name.clone(), ModuleResult::AlreadyLoaded)
            }
            Err(err) => {
                let (class, errno, message) =
                    classify(ctx, module, &path, &err, &firmware, &kernel_lines);
                failed.insert(name.clone(), class);
                ModuleReport {
                    name: name.clone(),
                    result: ModuleResult::Failed,
                    class: Some(class),
                    errno,
                    dependency: None,
                    message: Some(message),
                }
            }
        };
        reports.push(report);
    }
    (reports, missing_firmware)
}

fn ok_report(name: String, result: ModuleResult) -> ModuleReport {
    ModuleReport {
        name,
        result,
        class: None,
        errno: None,
        dependency: None,
        message: None,
    }
}

/// The snake_case name of a class, as it appears in the JSON.
pub fn class_name(class: FailureClass) -> &'static str {
    match class {
        FailureClass::NoGpu => "no_gpu",
        FailureClass::WrongKernel => "wrong_kernel",
        FailureClass::MissingFirmware => "missing_firmware",
        FailureClass::MissingFile => "missing_file",
        FailureClass::InitFailed => "init_failed",
        FailureClass::SignatureRejected => "signature_rejected",
        FailureClass::Other => "other",
    }
}

fn classify(
    ctx: &SetupContext,
    module: &Module,
    path: &Path,
    err: &LoadError,
    firmware: &[String],
    kernel_lines: &[String],
) -> (FailureClass, Option<i32>, String) {
    let name = &module.name;
    let errno = match err {
        LoadError::Kernel(e) => Some(*e as i32),
        LoadError::Open { source, .. } => source.raw_os_error(),
        LoadError::BadParams { .. } => None,
    };
    if !firmware.is_empty() {
        let message = format!(
            "{name} failed to load because the kernel could not find firmware {}: the GPU layer must \
             carry it under /gpu/firmware/ (rebuild the initrd with the GSP firmware artifact)",
            firmware.join(", ")
        );
        return (FailureClass::MissingFirmware, errno, message);
    }
    if let Some(line) = kernel_lines
        .iter()
        .find(|l| l.contains("RmInitAdapter failed"))
    {
        let message = format!(
            "{name} loaded but could not initialise the GPU ({line}): the GPU needs a reset on \
             the host (often after waking from D3cold or a previous tenant's fault); the host \
             records this for the device"
        );
        return (FailureClass::InitFailed, errno, message);
    }
    match err {
        LoadError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => (
            FailureClass::MissingFile,
            errno,
            format!(
                "{} is not in the GPU layer: rebuild the initrd so it carries every module the \
                 manifest lists",
                path.display()
            ),
        ),
        LoadError::Kernel(Errno::ENODEV) => (
            FailureClass::NoGpu,
            errno,
            format!(
                "{name}: no NVIDIA GPU visible to this guest (ENODEV): pass the GPU through to the \
                 VM (vfio-pci device on the VMM command line) or boot without HAS_GPU=1"
            ),
        ),
        LoadError::Kernel(Errno::EKEYREJECTED) => (
            FailureClass::SignatureRejected,
            errno,
            signature_message(name, kernel_lines),
        ),
        LoadError::Kernel(e @ (Errno::ENOEXEC | Errno::EINVAL))
            if !kernel_lines.iter().any(|l| l.contains("nknown parameter")) =>
        {
            let built_for = module.vermagic.split_whitespace().next().unwrap_or("?");
            (
                FailureClass::WrongKernel,
                errno,
                format!(
                    "{name} was built for another kernel ({}; vermagic \"{}\" vs running {}): boot \
                     kernel {built_for} or build the GPU layer for release {}",
                    e.desc(),
                    module.vermagic.trim_end(),
                    ctx.kernel_release,
                    ctx.kernel_release
                ),
            )
        }
        _ => {
            let detail = kernel_lines
                .iter()
                .rev()
                .find(|l| l.contains(name.as_str()) || l.contains(&normalize_module_name(name)))
                .or(kernel_lines.last())
                .map(|l| format!("; kernel log: {l}"))
                .unwrap_or_default();
            (
                FailureClass::Other,
                errno,
                format!("{name} failed to load: {err}{detail}"),
            )
        }
    }
}

/// What a signature the kernel refused (EKEYREJECTED) means, from the kernel's own reason when it
/// logged one, and the fix.
fn signature_message(name: &str, kernel_lines: &[String]) -> String {
    const FIX: &str = "sign the modules with a key the guest kernel trusts (built into the kernel or \
                       enrolled in its keyring, e.g. through MOK; `versions build --sign-key \
                       --sign-cert`) and rebuild the GPU layer";
    let Some((line, reason)) = kernel_lines
        .iter()
        .find_map(|l| signature_rejection(l).map(|r| (l, r)))
    else {
        return format!(
            "{name}: the kernel refused its signature (EKEYREJECTED, no reason logged: the module \
             was changed after it was signed, or its signature is corrupt): {FIX}"
        );
    };
    let meaning = match reason {
        "unsigned module" => {
            "it is unsigned and the guest kernel enforces module signatures \
                              (module.sig_enforce=1 or CONFIG_MODULE_SIG_FORCE)"
        }
        "module with unavailable key" => "it is signed by a key the guest kernel does not trust",
        "module with unsupported crypto" => {
            "its signature uses a digest or key algorithm the guest kernel lacks (use sha256)"
        }
        _ => "the guest kernel refused its signature",
    };
    format!("{name}: {reason}: {meaning} (EKEYREJECTED; kernel: \"{line}\"): {FIX}")
}
