//! The one-line machine-readable report: `GPU-INIT {json}`.
//!
//! Field names are a stable contract with the end-to-end harness; see `initrd/README.md`.

use serde::Serialize;
use std::collections::BTreeMap;

/// Prefix of the report line on the console.
pub const REPORT_PREFIX: &str = "GPU-INIT ";

/// Overall outcome of the GPU setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every module loaded, nodes, libraries and the CDI spec are in place.
    Ok,
    /// The driver is loaded but something around it is missing (see `problems`).
    Degraded,
    /// The driver is not usable (see `error` and `modules`).
    Failed,
    /// The guest was not asked for a GPU (`HAS_GPU` is not 1).
    Skipped,
}

/// Why a module did not load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// ENODEV: no NVIDIA GPU is visible to this guest.
    NoGpu,
    /// ENOEXEC/EINVAL: the module was built for another kernel.
    WrongKernel,
    /// The kernel log says a firmware file could not be loaded.
    MissingFirmware,
    /// The `.ko` named by the manifest is not in the GPU layer.
    MissingFile,
    /// The driver could not initialise the GPU (`RmInitAdapter failed` in the kernel log).
    InitFailed,
    /// Anything else (errno and kernel log line in the message).
    Other,
}

/// What happened to one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleResult {
    /// `finit_module` succeeded.
    Loaded,
    /// The kernel already had it (EEXIST).
    AlreadyLoaded,
    /// `finit_module` failed; see class and message.
    Failed,
    /// Not tried because a module it depends on failed.
    Skipped,
}

/// One module's line in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleReport {
    /// Kernel module name, e.g. `nvidia_uvm`.
    pub name: String,
    /// Outcome.
    pub result: ModuleResult,
    /// Failure class; for a skipped module, the class of the dependency that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<FailureClass>,
    /// The raw errno of a failed `finit_module`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// For a skipped module: the dependency that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dependency: Option<String>,
    /// Human explanation with the fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What was done to a device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAction {
    /// The node did not exist and was made.
    Created,
    /// A correct node was there already (mode and group fixed if needed).
    Kept,
    /// Something else was at that path and was replaced.
    Replaced,
}

/// One device node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    /// Absolute path as seen by this process.
    pub path: String,
    /// Character device major.
    pub major: u64,
    /// Character device minor.
    pub minor: u64,
    /// What was done.
    pub action: NodeAction,
}

/// A workload library that the driver's copy now hides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Shadowed {
    /// The soname both provide, e.g. `libcuda.so.1`.
    pub soname: String,
    /// The workload's file (path inside the workload root) that the driver's copy is mounted over.
    pub file: String,
}

/// Outcome of the root's `ldconfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LdconfigStatus {
    /// Ran and exited 0.
    Ok,
    /// The root has no glibc `ldconfig` (musl, distroless).
    Missing,
    /// Ran and failed; see `ldconfig_message`.
    Failed,
    /// Not attempted (no root, or an earlier step failed).
    NotRun,
}

/// Library injection into the workload root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibrariesReport {
    /// The root's library directory that got the soname links (path inside the root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Where the GPU layer is bind-mounted read-only inside the root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Soname links made visible (paths inside the root).
    pub injected: Vec<String>,
    /// Workload files hidden by the driver's copy.
    pub shadowed: Vec<Shadowed>,
    /// Outcome of the root's `ldconfig`.
    pub ldconfig: LdconfigStatus,
    /// Detail when `ldconfig` is missing or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ldconfig_message: Option<String>,
}

impl Default for LibrariesReport {
    fn default() -> Self {
        Self {
            dir: None,
            mount: None,
            injected: Vec::new(),
            shadowed: Vec::new(),
            ldconfig: LdconfigStatus::NotRun,
            ldconfig_message: None,
        }
    }
}

/// Firmware search path given to the kernel and firmware the kernel could not find.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FirmwareReport {
    /// Value written to `firmware_class.path`, valid after the switch into the root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Firmware files the kernel log reported as failing to load, or listed in the manifest but absent.
    pub missing: Vec<String>,
}

/// A setup-wide error (no manifest, unreadable manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportError {
    /// `no_gpu_layer`, `bad_manifest` or `no_root`.
    pub class: String,
    /// Explanation with the fix.
    pub message: String,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Overall outcome.
    pub status: Status,
    /// Setup-wide error, when the setup could not even start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportError>,
    /// Driver version from the manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Running kernel (`uname -r`).
    pub kernel: String,
    /// Modules in load order.
    pub modules: Vec<ModuleReport>,
    /// Device nodes.
    pub nodes: Vec<NodeReport>,
    /// GPUs the driver sees (`/proc/driver/nvidia/gpus/` entries).
    pub gpus: u32,
    /// Firmware path and missing files.
    pub firmware: FirmwareReport,
    /// Library injection.
    pub libraries: LibrariesReport,
    /// Programs put on the root's PATH (paths inside the root).
    pub binaries: Vec<String>,
    /// CDI spec written (path inside the root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cdi: Option<String>,
    /// Things that make the status `degraded`, one sentence each.
    pub problems: Vec<String>,
    /// Milliseconds per step: `modules`, `nodes`, `libraries`, `cdi`, `total`.
    pub timings_ms: BTreeMap<String, u64>,
}

impl Report {
    /// An empty report for the given kernel.
    pub fn new(kernel: String) -> Self {
        Self {
            status: Status::Ok,
            error: None,
            driver_version: None,
            kernel,
            modules: Vec::new(),
            nodes: Vec::new(),
            gpus: 0,
            firmware: FirmwareReport::default(),
            libraries: LibrariesReport::default(),
            binaries: Vec::new(),
            cdi: None,
            problems: Vec::new(),
            timings_ms: BTreeMap::new(),
        }
    }

    /// The report line, without a trailing newline: `GPU-INIT {json}`.
    pub fn line(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail; keep a valid line anyway.
        let json = serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"status":"failed","error":{{"class":"report","message":"{e}"}}}}"#)
        });
        format!("{REPORT_PREFIX}{json}")
    }

    /// Derive `status` from the modules, error and problems.
    pub fn finish_status(&mut self) {
        let module_failed = self
            .modules
            .iter()
            .any(|m| matches!(m.result, ModuleResult::Failed | ModuleResult::Skipped));
        self.status = if self.error.is_some() || module_failed {
            Status::Failed
        } else if !self.problems.is_empty() {
            Status::Degraded
        } else {
            Status::Ok
        };
    }
}
