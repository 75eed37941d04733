//! The `GPU-INIT {json}` report: one console line in which the guest init says what it did.
//!
//! Field and value names are a stable contract (the table in `guest-init/README.md`); the end-to-end
//! harness and any platform that reads guest consoles deserialize this very type. Unknown fields
//! are accepted when reading, so a host can read the report of a newer guest that added one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Prefix of the report line on the console.
pub const REPORT_PREFIX: &str = "GPU-INIT ";

/// Overall outcome of the GPU setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// EKEYREJECTED: the kernel refused the module's signature (unsigned or signed by a key it
    /// does not trust, under `module.sig_enforce=1` or `CONFIG_MODULE_SIG_FORCE`; or a signature
    /// that does not verify). The message has the kernel's reason and the fix.
    SignatureRejected,
    /// Anything else (errno and kernel log line in the message).
    Other,
}

/// What happened to one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleReport {
    /// Kernel module name, e.g. `nvidia_uvm`.
    pub name: String,
    /// Outcome.
    pub result: ModuleResult,
    /// Failure class; for a skipped module, the class of the dependency that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<FailureClass>,
    /// The raw errno of a failed `finit_module`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// For a skipped module: the dependency that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<String>,
    /// Human explanation with the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What was done to a device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Absolute path as seen by the guest init.
    pub path: String,
    /// Character device major.
    pub major: u64,
    /// Character device minor.
    pub minor: u64,
    /// What was done.
    pub action: NodeAction,
}

/// A workload library that the driver's copy now hides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadowed {
    /// The soname both provide, e.g. `libcuda.so.1`.
    pub soname: String,
    /// The workload's file (path inside the workload root) that the driver's copy is mounted over.
    pub file: String,
}

/// Outcome of the root's `ldconfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LdconfigStatus {
    /// Ran and exited 0.
    Ok,
    /// The root has no glibc `ldconfig` (musl, distroless).
    Missing,
    /// Ran and failed; see `ldconfig_message`.
    Failed,
    /// Not run: where `ldconfig` or its cache should be is not a regular file (a FIFO, a
    /// device); see `ldconfig_message`.
    NotAFile,
    /// Ran past its deadline and was killed; see `ldconfig_message`.
    TimedOut,
    /// Not attempted (no root, or an earlier step failed).
    #[default]
    NotRun,
}

impl LdconfigStatus {
    /// Whether it is an error of the root's `ldconfig` (failed, not a file, timed out).
    pub fn is_error(self) -> bool {
        matches!(
            self,
            LdconfigStatus::Failed | LdconfigStatus::NotAFile | LdconfigStatus::TimedOut
        )
    }
}

/// Library injection into the workload root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LibrariesReport {
    /// The root's library directory that got the soname links (path inside the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Where the GPU layer is bind-mounted read-only inside the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Soname links made visible (paths inside the root).
    pub injected: Vec<String>,
    /// Workload files hidden by the driver's copy.
    pub shadowed: Vec<Shadowed>,
    /// Outcome of the root's `ldconfig`.
    pub ldconfig: LdconfigStatus,
    /// Detail when `ldconfig` is missing or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ldconfig_message: Option<String>,
}

impl LibrariesReport {
    /// Whether a link named `soname` (`libcuda.so.1`) was injected, in whichever directory.
    pub fn injects(&self, soname: &str) -> bool {
        self.injected
            .iter()
            .any(|p| p.rsplit('/').next() == Some(soname))
    }
}

/// Firmware search path given to the kernel and firmware the kernel could not find.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareReport {
    /// Value written to `firmware_class.path`, valid after the switch into the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Firmware files the kernel log reported as failing to load, or listed in the manifest but absent.
    pub missing: Vec<String>,
}

/// Why the setup could not even start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupErrorClass {
    /// `HAS_GPU=1` but the initrd has no `/gpu/manifest.json`: the GPU layer was not appended.
    NoGpuLayer,
    /// The manifest is unreadable, malformed or of another schema version.
    BadManifest,
    /// The report itself could not be serialized (the line then carries only this error).
    Report,
    /// `GPU_DISK` names no usable image: a bad value, a device that never appeared, a mount
    /// module that would not load, a mount that failed, or an image other than the one the base
    /// layer was built with.
    GpuDisk,
    /// The image was built with dm-verity and could not be proven intact: the boot carries no
    /// root hash for it, a root hash other than the base layer's, or the image's bytes do not
    /// hash to it. Nothing from the image was loaded.
    GpuDiskIntegrity,
}

/// Where the GPU payload under `/gpu` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadSource {
    /// The GPU initramfs layer, unpacked into guest RAM by the kernel.
    Initramfs,
    /// A read-only image on a virtio-pmem device (`GPU_DISK=pmem`), mapped from the host.
    Pmem,
    /// A read-only image on a virtio-blk device (`GPU_DISK=/dev/vdX`).
    VirtioBlk,
}

/// How the GPU payload reached the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadReport {
    /// Where it came from.
    pub source: PayloadSource,
    /// The block device the image was mounted from (`/dev/pmem0`, `/dev/vdb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// `true` when the image is mounted with DAX: reads map the host's pages, no guest page cache.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dax: bool,
    /// The mount modules loaded before the mount, in order (already loaded ones included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mount_modules: Vec<String>,
    /// Milliseconds from reading `GPU_DISK` to the image mounted at `/gpu` (module loads, the
    /// wait for the device, the mount).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_ms: Option<u64>,
    /// Guest `MemAvailable` (kB) the mount took: the modules, the device's memory map, the
    /// mount. With DAX the payload's bytes add nothing to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_mem_kb: Option<u64>,
}

impl PayloadReport {
    /// A payload from `source` with nothing measured yet.
    pub fn new(source: PayloadSource) -> Self {
        Self {
            source,
            device: None,
            dax: false,
            mount_modules: Vec::new(),
            mount_ms: None,
            mount_mem_kb: None,
        }
    }
}

/// A setup-wide error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportError {
    /// What kind of error.
    pub class: SetupErrorClass,
    /// Explanation with the fix.
    pub message: String,
}

/// What happened to a guest daemon of the driver (`nvidia-persistenced`, `nv-fabricmanager`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonResult {
    /// Started; `pid` is set.
    Started,
    /// Could not be started; see `message`.
    Failed,
    /// In the layer but not started because the driver did not load.
    Skipped,
    /// Needed (or asked for) but the layer does not carry it.
    Absent,
    /// Not needed in this guest (no NVSwitch for the fabric manager).
    NotNeeded,
}

/// One guest daemon's line in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonReport {
    /// Program name, e.g. `nvidia-persistenced`.
    pub name: String,
    /// Outcome.
    pub result: DaemonResult,
    /// Its process id when started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Arguments it was started with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Why, for anything but `started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Overall outcome.
    pub status: Status,
    /// Setup-wide error, when the setup could not even start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportError>,
    /// Driver version from the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// Where the GPU payload came from (set by the guest init as PID 1; absent in `setup` mode,
    /// where the caller put the payload in place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadReport>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdi: Option<String>,
    /// Driver capabilities whose files were injected (`NVIDIA_DRIVER_CAPABILITIES` met by
    /// what the layer carries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<crate::capability::Capability>,
    /// The `NVIDIA_*`/`CUDA_*` variables handed to the workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// The driver's guest daemons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub daemons: Vec<DaemonReport>,
    /// `true` when `kernel.modules_disabled=1` was written after the setup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub modules_locked: bool,
    /// Things that make the status `degraded`, one sentence each.
    pub problems: Vec<String>,
    /// Milliseconds per step: `modules`, `nodes`, `libraries`, `cdi`, `total`.
    pub timings_ms: BTreeMap<String, u64>,
}

impl Report {
    /// An empty report (status `ok`, nothing done yet) for the given running kernel.
    pub fn new(kernel: String) -> Self {
        Self {
            status: Status::Ok,
            error: None,
            driver_version: None,
            payload: None,
            kernel,
            modules: Vec::new(),
            nodes: Vec::new(),
            gpus: 0,
            firmware: FirmwareReport::default(),
            libraries: LibrariesReport::default(),
            binaries: Vec::new(),
            cdi: None,
            capabilities: Vec::new(),
            environment: BTreeMap::new(),
            daemons: Vec::new(),
            modules_locked: false,
            problems: Vec::new(),
            timings_ms: BTreeMap::new(),
        }
    }

    /// The report line, without a trailing newline: `GPU-INIT {json}`.
    pub fn line(&self) -> String {
        // Serializing plain structs of strings and numbers cannot fail; keep a valid line anyway.
        let json = serde_json::to_string(self).unwrap_or_else(|e| {
            let error = ReportError {
                class: SetupErrorClass::Report,
                message: e.to_string(),
            };
            let error = serde_json::to_string(&error).unwrap_or_default();
            format!(r#"{{"status":"failed","error":{error}}}"#)
        });
        format!("{REPORT_PREFIX}{json}")
    }

    /// The module of that name (compared with [`crate::normalize_module_name`]).
    pub fn module(&self, name: &str) -> Option<&ModuleReport> {
        let name = crate::normalize_module_name(name);
        self.modules
            .iter()
            .find(|m| crate::normalize_module_name(&m.name) == name)
    }
}

/// The report in one console line, if it has one: `None` when the line carries no `GPU-INIT {`,
/// else the deserialized report or why it does not parse. Whatever precedes the prefix (a
/// timestamp, interleaved kernel output) and trailing whitespace (a serial console's `\r`) is
/// ignored.
pub fn parse_report_line(line: &str) -> Option<Result<Report, serde_json::Error>> {
    let at = line.find(&format!("{REPORT_PREFIX}{{"))?;
    let json = line[at + REPORT_PREFIX.len()..].trim_end();
    Some(serde_json::from_str(json))
}

/// The first report line in a whole console log (see [`parse_report_line`]).
pub fn find_report(console: &str) -> Option<Result<Report, serde_json::Error>> {
    console.lines().find_map(parse_report_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report::new("6.1.0-56-amd64".into());
        r.status = Status::Failed;
        r.driver_version = Some("535.261.03".into());
        r.modules = vec![
            ModuleReport {
                name: "drm".into(),
                result: ModuleResult::Loaded,
                class: None,
                errno: None,
                dependency: None,
                message: None,
            },
            ModuleReport {
                name: "nvidia".into(),
                result: ModuleResult::Failed,
                class: Some(FailureClass::NoGpu),
                errno: Some(19),
                dependency: None,
                message: Some("nvidia: no NVIDIA GPU visible to this guest (ENODEV)".into()),
            },
            ModuleReport {
                name: "nvidia_uvm".into(),
                result: ModuleResult::Skipped,
                class: Some(FailureClass::NoGpu),
                errno: None,
                dependency: Some("nvidia".into()),
                message: Some("skipped".into()),
            },
        ];
        r.nodes = vec![NodeReport {
            path: "/dev/nvidiactl".into(),
            major: 195,
            minor: 255,
            action: NodeAction::Created,
        }];
        r.firmware.path = Some("/gpu/firmware".into());
        r.libraries = LibrariesReport {
            dir: Some("/lib/x86_64-linux-gnu".into()),
            mount: Some("/.gpu".into()),
            injected: vec!["/lib/x86_64-linux-gnu/libcuda.so.1".into()],
            shadowed: vec![Shadowed {
                soname: "libcuda.so.1".into(),
                file: "/lib/x86_64-linux-gnu/libcuda.so.1".into(),
            }],
            ldconfig: LdconfigStatus::Ok,
            ldconfig_message: None,
        };
        r.binaries = vec!["/usr/bin/nvidia-smi".into()];
        r.cdi = Some("/etc/cdi/nvidia.json".into());
        r.problems = vec!["firmware missing".into()];
        r.timings_ms.insert("total".into(), 12);
        r
    }

    #[test]
    fn a_report_line_round_trips_through_parse_report_line() {
        let report = sample();
        let parsed = parse_report_line(&report.line()).unwrap().unwrap();
        assert_eq!(parsed, report);
        let mut failed = Report::new("k".into());
        failed.status = Status::Failed;
        failed.error = Some(ReportError {
            class: SetupErrorClass::NoGpuLayer,
            message: "no /gpu/manifest.json".into(),
        });
        assert_eq!(parse_report_line(&failed.line()).unwrap().unwrap(), failed);
    }

    /// The wire names the README documents and the harness reads, byte for byte.
    #[test]
    fn field_and_value_names_are_the_documented_ones() {
        let json = sample().line();
        for needle in [
            r#"GPU-INIT {"status":"failed","driver_version":"535.261.03","kernel":"6.1.0-56-amd64","modules":[{"name":"drm","result":"loaded"},"#,
            r#"{"name":"nvidia","result":"failed","class":"no_gpu","errno":19,"message":"#,
            r#"{"name":"nvidia_uvm","result":"skipped","class":"no_gpu","dependency":"nvidia","#,
            r#""nodes":[{"path":"/dev/nvidiactl","major":195,"minor":255,"action":"created"}],"gpus":0,"#,
            r#""firmware":{"path":"/gpu/firmware","missing":[]},"#,
            r#""libraries":{"dir":"/lib/x86_64-linux-gnu","mount":"/.gpu","injected":["#,
            r#""shadowed":[{"soname":"libcuda.so.1","file":"#,
            r#""ldconfig":"ok"},"binaries":["/usr/bin/nvidia-smi"],"cdi":"/etc/cdi/nvidia.json","#,
            r#""problems":["firmware missing"],"timings_ms":{"total":12}}"#,
        ] {
            assert!(json.contains(needle), "{needle}\nnot in\n{json}");
        }
        let error = ReportError {
            class: SetupErrorClass::BadManifest,
            message: "m".into(),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"class":"bad_manifest","message":"m"}"#
        );
        let classes = [
            (FailureClass::WrongKernel, "wrong_kernel"),
            (FailureClass::MissingFirmware, "missing_firmware"),
            (FailureClass::MissingFile, "missing_file"),
            (FailureClass::InitFailed, "init_failed"),
            (FailureClass::SignatureRejected, "signature_rejected"),
            (FailureClass::Other, "other"),
        ];
        for (class, name) in classes {
            assert_eq!(
                serde_json::to_string(&class).unwrap(),
                format!("\"{name}\"")
            );
        }
        assert_eq!(
            serde_json::to_string(&LdconfigStatus::NotRun).unwrap(),
            "\"not_run\""
        );
        assert_eq!(
            serde_json::to_string(&ModuleResult::AlreadyLoaded).unwrap(),
            "\"already_loaded\""
        );
    }

    #[test]
    fn the_payload_and_the_disk_error_have_their_documented_names() {
        let mut r = Report::new("k".into());
        r.payload = Some(PayloadReport {
            source: PayloadSource::Pmem,
            device: Some("/dev/pmem0".into()),
            dax: true,
            mount_modules: vec!["erofs".into()],
            mount_ms: Some(7),
            mount_mem_kb: Some(4300),
        });
        r.error = Some(ReportError {
            class: SetupErrorClass::GpuDisk,
            message: "m".into(),
        });
        let line = r.line();
        assert!(
            line.contains(
                r#""error":{"class":"gpu_disk","message":"m"},"payload":{"source":"pmem","device":"/dev/pmem0","dax":true,"mount_modules":["erofs"],"mount_ms":7,"mount_mem_kb":4300},"kernel":"k""#
            ),
            "{line}"
        );
        assert_eq!(parse_report_line(&line).unwrap().unwrap(), r);
        assert_eq!(
            serde_json::to_string(&PayloadSource::VirtioBlk).unwrap(),
            "\"virtio_blk\""
        );
        // An initramfs payload says only where it came from.
        let plain = PayloadReport::new(PayloadSource::Initramfs);
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"source":"initramfs"}"#
        );
    }

    #[test]
    fn the_report_is_found_behind_a_timestamp_and_before_a_carriage_return() {
        let line = format!("12.34 {}\r", sample().line());
        assert_eq!(parse_report_line(&line).unwrap().unwrap(), sample());
        let console = format!("[    1.0] nvidia: loading\n{line}\nE2E-A workload done\n");
        assert_eq!(find_report(&console).unwrap().unwrap(), sample());
    }

    #[test]
    fn lines_without_a_report_are_none_and_broken_reports_are_errors() {
        assert!(parse_report_line("E2E-A workload done").is_none());
        assert!(parse_report_line("GPU-INIT starting").is_none());
        assert!(find_report("a\nb\n").is_none());
        assert!(
            parse_report_line(r#"GPU-INIT {"status":"failed""#)
                .unwrap()
                .is_err()
        );
        // An unknown failure class is a schema change, not something to guess at.
        let bad = sample().line().replace("\"no_gpu\"", "\"gpu_on_fire\"");
        assert!(parse_report_line(&bad).unwrap().is_err());
    }

    #[test]
    fn a_field_added_by_a_newer_guest_is_accepted() {
        let newer = sample().line().replacen('{', r#"{"added_later":true,"#, 1);
        assert_eq!(parse_report_line(&newer).unwrap().unwrap(), sample());
    }

    #[test]
    fn injected_links_are_looked_up_by_soname() {
        let libs = sample().libraries;
        assert!(libs.injects("libcuda.so.1"));
        assert!(
            !libs.injects("libcuda.so"),
            "the whole file name, not a prefix"
        );
        assert!(!libs.injects("libnvidia-ml.so.1"));
    }

    #[test]
    fn modules_are_looked_up_by_normalised_name() {
        let report = sample();
        assert_eq!(report.module("nvidia-uvm").unwrap().name, "nvidia_uvm");
        assert!(report.module("nvidia-drm").is_none());
    }
}
