//! Runs A, A' and B: what the `GPU-INIT` report and the workload print on a guest's console.
//! The report is read as [`gpu_passthrough_guest_contract::report::Report`], the type the guest init
//! serializes.

use crate::checks::{Checks, json};
use crate::console::Console;
use gpu_passthrough_guest_contract::report::{
    FailureClass, LdconfigStatus, ModuleReport, ModuleResult, Report, Status, find_report,
};

/// The report on the console, or a failed check saying why there is none.
fn report(c: &mut Checks, console: &Console) -> Option<Report> {
    let found = find_report(&console.text);
    let why = match &found {
        None => format!("no GPU-INIT line; last lines: {}", console.tail(5)),
        Some(Err(e)) => format!("the GPU-INIT line is not the contract's report: {e}"),
        Some(Ok(_)) => String::new(),
    };
    let ok = matches!(found, Some(Ok(_)));
    c.check(
        "a GPU-INIT report line that deserializes as the contract's Report",
        ok,
        || why,
    );
    found.and_then(Result::ok)
}

fn failed_with(m: Option<&ModuleReport>, class: FailureClass, errnos: &[i32]) -> bool {
    m.is_some_and(|m| {
        m.result == ModuleResult::Failed
            && m.class == Some(class)
            && m.errno.is_some_and(|e| errnos.contains(&e))
    })
}

/// Run A: HAS_GPU=1 on a guest without a GPU. The real modules pass the kernel's checks and
/// `nvidia` fails with ENODEV; libraries, firmware and programs are in place anyway.
pub fn gpu_guest(console: &Console, driver: &str, kernel: &str, boot_rc: i32) -> Checks {
    let mut c = Checks::default();
    if let Some(r) = report(&mut c, console) {
        no_gpu_report(&mut c, &r, driver, kernel);
    }
    c.check(
        format!("ldconfig -p resolves libcuda.so.1 to the {driver} file"),
        console.all_after("E2E-A libcuda_real ").any(|rest| {
            rest.split_once(" -> ")
                .is_some_and(|(_, real)| real.ends_with(&format!("/libcuda.so.{driver}")))
        }),
        || format!("libcuda_real: {:?}", console.after("E2E-A libcuda_real ")),
    );
    if let Some(line) = console.after("E2E-A libcuda_real ") {
        c.info(format!("libcuda_real {line}"));
    }
    c.check(
        "nvidia-smi is on the workload's PATH",
        console
            .after("E2E-A which ")
            .is_some_and(|p| p.starts_with('/') && p.ends_with("/nvidia-smi")),
        || format!("which: {:?}", console.after("E2E-A which ")),
    );
    c.check(
        "nvidia-smi exits 9 (no driver to talk to)",
        console.after("E2E-A nvidia_smi_rc ") == Some("9"),
        || format!("nvidia_smi_rc: {:?}", console.after("E2E-A nvidia_smi_rc ")),
    );
    c.check("guest powered off by itself", boot_rc == 0, || {
        format!("QEMU exit {boot_rc}")
    });
    c
}

/// What every GPU-less guest's report must say: the driver and kernel it ran, and `nvidia`
/// accepted by the kernel's checks, then failing with ENODEV (`nvidia_check` names the check).
pub fn driver_reached_the_kernel(
    c: &mut Checks,
    r: &Report,
    driver: &str,
    kernel: &str,
    nvidia_check: &str,
) {
    c.check(
        format!("report driver_version is {driver}"),
        r.driver_version.as_deref() == Some(driver),
        || format!("got {:?}", r.driver_version),
    );
    c.check(
        format!("report kernel is the running {kernel}"),
        r.kernel == kernel,
        || format!("got {:?}", r.kernel),
    );
    let nvidia = r.module("nvidia");
    c.check(
        nvidia_check,
        failed_with(nvidia, FailureClass::NoGpu, &[19]),
        || format!("got {}", json(&nvidia)),
    );
}

fn no_gpu_report(c: &mut Checks, r: &Report, driver: &str, kernel: &str) {
    driver_reached_the_kernel(
        c,
        r,
        driver,
        kernel,
        "nvidia.ko passed the kernel's version checks and failed with ENODEV, class no_gpu",
    );
    for dep in ["nvidia_uvm", "nvidia_modeset", "nvidia_drm"] {
        let m = r.module(dep);
        c.check(
            format!("{dep} skipped because nvidia failed (class no_gpu)"),
            m.is_some_and(|m| {
                m.result == ModuleResult::Skipped
                    && m.class == Some(FailureClass::NoGpu)
                    && m.dependency.is_some()
            }),
            || format!("got {}", json(&m)),
        );
    }
    let kernel_deps: Vec<&ModuleReport> = r
        .modules
        .iter()
        .filter(|m| !m.name.starts_with("nvidia"))
        .collect();
    c.check(
        "the kernel modules nvidia needs (drm, ...) loaded",
        !kernel_deps.is_empty()
            && kernel_deps
                .iter()
                .all(|m| matches!(m.result, ModuleResult::Loaded | ModuleResult::AlreadyLoaded)),
        || format!("got {}", json(&kernel_deps)),
    );
    c.check(
        "GSP firmware found (none missing, search path set)",
        r.firmware.missing.is_empty() && r.firmware.path.is_some(),
        || format!("firmware: {}", json(&r.firmware)),
    );
    let injected = |soname: &str| r.libraries.injects(soname);
    c.check(
        "driver libraries injected (libcuda.so.1, libnvidia-ml.so.1)",
        injected("libcuda.so.1") && injected("libnvidia-ml.so.1"),
        || format!("libraries: {}", json(&r.libraries)),
    );
    c.check(
        "the workload root's ldconfig ran",
        r.libraries.ldconfig == LdconfigStatus::Ok,
        || format!("libraries: {}", json(&r.libraries)),
    );
    c.check(
        "nvidia-smi put on the workload's PATH",
        r.binaries.iter().any(|b| b.ends_with("/nvidia-smi")),
        || format!("binaries: {:?}", r.binaries),
    );
    c.check(
        "zero GPUs seen and overall status failed",
        r.gpus == 0 && r.status == Status::Failed,
        || format!("gpus={} status={:?}", r.gpus, r.status),
    );
}

/// Run A': `nvidia.ko` doctored as built for `module_kernel`, booted on another kernel.
pub fn wrong_kernel_guest(console: &Console, module_kernel: &str) -> Checks {
    let mut c = Checks::default();
    if let Some(r) = report(&mut c, console) {
        let nvidia = r.module("nvidia");
        c.check(
            "nvidia.ko classified wrong_kernel (ENOEXEC/EINVAL)",
            failed_with(nvidia, FailureClass::WrongKernel, &[8, 22]),
            || format!("got {}", json(&nvidia)),
        );
        let message = nvidia.and_then(|m| m.message.as_deref()).unwrap_or("");
        c.check(
            format!("the message names the module's kernel {module_kernel}"),
            message.contains(module_kernel),
            || format!("message: {message:?}"),
        );
    }
    c
}

/// Run B, combined initrd with HAS_GPU=0: the workload runs and no GPU work is done.
pub fn no_gpu_guest(console: &Console) -> Checks {
    let mut c = Checks::default();
    c.check(
        "workload ran with HAS_GPU=0",
        console.has("E2E-A workload done"),
        || format!("last lines: {}", console.tail(5)),
    );
    match find_report(&console.text) {
        None => c.check("no GPU-INIT report, no GPU work", true, String::new),
        Some(Err(e)) => c.check(
            "report says GPU setup skipped, nothing loaded",
            false,
            || format!("the GPU-INIT line is not the contract's report: {e}"),
        ),
        Some(Ok(r)) => c.check(
            "report says GPU setup skipped, nothing loaded",
            r.status == Status::Skipped
                && r.modules.is_empty()
                && r.nodes.is_empty()
                && r.libraries.injected.is_empty(),
            || format!("got {}", json(&r)),
        ),
    }
    c.check("no nvidia module loaded", !console.has("NVRM"), || {
        format!("NVRM line: {:?}", console.after("NVRM"))
    });
    c.check(
        "no /dev/nvidia* in the workload",
        !console.has("E2E-A node"),
        || format!("node: {:?}", console.after("E2E-A node ")),
    );
    c
}

/// Run B, base layer only: it still boots into the workload.
pub fn base_only_guest(console: &Console) -> Checks {
    let mut c = Checks::default();
    c.check(
        "base-only guest ran the workload",
        console.has("E2E-A workload done"),
        || format!("last lines: {}", console.tail(5)),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_passthrough_guest_contract::report::{FirmwareReport, LibrariesReport};

    const DRIVER: &str = "535.261.03";
    const KERNEL: &str = "6.1.0-56-amd64";

    fn module(name: &str, result: ModuleResult, class: Option<FailureClass>) -> ModuleReport {
        ModuleReport {
            name: name.into(),
            result,
            class,
            errno: (result == ModuleResult::Failed).then_some(19),
            dependency: (result == ModuleResult::Skipped).then(|| "nvidia".into()),
            message: None,
        }
    }

    fn good_report() -> Report {
        let mut r = Report::new(KERNEL.into());
        r.status = Status::Failed;
        r.driver_version = Some(DRIVER.into());
        let no_gpu = Some(FailureClass::NoGpu);
        r.modules = vec![
            module("drm", ModuleResult::Loaded, None),
            module("nvidia", ModuleResult::Failed, no_gpu),
            module("nvidia_uvm", ModuleResult::Skipped, no_gpu),
            module("nvidia_modeset", ModuleResult::Skipped, no_gpu),
            module("nvidia_drm", ModuleResult::Skipped, no_gpu),
        ];
        r.firmware = FirmwareReport {
            path: Some("/gpu/firmware".into()),
            missing: vec![],
        };
        r.libraries = LibrariesReport {
            injected: vec![
                "/lib/x86_64-linux-gnu/libcuda.so.1".into(),
                "/lib/x86_64-linux-gnu/libnvidia-ml.so.1".into(),
            ],
            ldconfig: LdconfigStatus::Ok,
            ..LibrariesReport::default()
        };
        r.binaries = vec!["/usr/bin/nvidia-smi".into()];
        r
    }

    fn console(report: &Report) -> Console {
        Console::parse(&format!(
            "3.10 {}\n3.50 E2E-A libcuda_real /lib/x86_64-linux-gnu/libcuda.so.1 -> \
             /.gpu/lib/libcuda.so.{DRIVER}\n3.60 E2E-A which /usr/bin/nvidia-smi\n\
             3.70 E2E-A nvidia_smi_rc 9\n3.80 E2E-A workload done\n",
            report.line()
        ))
    }

    #[test]
    fn a_good_run_a_console_passes_every_check() {
        let c = gpu_guest(&console(&good_report()), DRIVER, KERNEL, 0);
        assert_eq!(c.failed(), 0, "{:#?}", c.lines());
        assert_eq!(
            c.lines().iter().filter(|l| l.starts_with("PASS")).count(),
            17
        );
    }

    #[test]
    fn each_run_a_defect_fails_its_own_check() {
        let mut loaded = good_report();
        loaded.modules[1] = module("nvidia", ModuleResult::Loaded, None);
        let mut fw = good_report();
        fw.firmware.missing = vec!["gsp_ga10x.bin".into()];
        let mut no_ld = good_report();
        no_ld.libraries.ldconfig = LdconfigStatus::Missing;
        for (report, failing) in [
            (loaded, "nvidia.ko passed"),
            (fw, "GSP firmware found"),
            (no_ld, "ldconfig ran"),
        ] {
            let c = gpu_guest(&console(&report), DRIVER, KERNEL, 0);
            let failed: Vec<_> = c.lines().iter().filter(|l| l.starts_with("FAIL")).collect();
            assert!(
                failed.iter().any(|l| l.contains(failing)),
                "{failing}: {failed:#?}"
            );
        }
        let c = gpu_guest(&console(&good_report()), DRIVER, KERNEL, 124);
        assert_eq!(c.failed(), 1);
    }

    #[test]
    fn a_missing_or_foreign_report_is_one_failed_check_not_silence() {
        let none = Console::parse("1.0 E2E-A workload done\n");
        let c = gpu_guest(&none, DRIVER, KERNEL, 0);
        assert!(c.lines()[0].starts_with("FAIL a GPU-INIT report line"));
        let renamed = good_report().line().replace("\"modules\"", "\"kmods\"");
        let c = wrong_kernel_guest(&Console::parse(&renamed), "6.1.0-99-amd64");
        assert_eq!(c.failed(), 1, "{:#?}", c.lines());
        assert!(c.lines()[0].contains("not the contract's report"));
    }

    #[test]
    fn run_b_passes_without_a_report_and_fails_on_gpu_work() {
        let quiet = Console::parse("1.0 E2E-A workload done\n");
        assert_eq!(no_gpu_guest(&quiet).failed(), 0);
        let mut skipped = Report::new(KERNEL.into());
        skipped.status = Status::Skipped;
        let text = format!("{}\nE2E-A workload done\n", skipped.line());
        assert_eq!(no_gpu_guest(&Console::parse(&text)).failed(), 0);
        let busy = format!(
            "{}\nNVRM: loading\nE2E-A workload done\n",
            good_report().line()
        );
        assert_eq!(no_gpu_guest(&Console::parse(&busy)).failed(), 2);
    }
}
