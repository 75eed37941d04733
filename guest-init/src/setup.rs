//! The GPU setup: modules, nodes, firmware path, libraries, programs, CDI spec, report.

use crate::context::SetupContext;
use crate::inroot::RootDir;
use crate::kmsg::KernelLog;
use crate::modules::{ModuleLoader, load_modules};
use crate::{cdi, daemons, env, libraries, nodes};
use gpu_passthrough_guest_contract::report::{Report, ReportError, SetupErrorClass, Status};
use gpu_passthrough_guest_contract::{FIRMWARE_DIR, Manifest};
use std::time::Instant;

/// Run the whole setup. Never fails: everything that goes wrong is in the report.
pub fn run(ctx: &SetupContext, loader: &dyn ModuleLoader) -> Report {
    let start = Instant::now();
    let mut report = Report::new(ctx.kernel_release.clone());
    let manifest = match read_manifest(ctx) {
        Ok(m) => m,
        Err(error) => {
            report.error = Some(error);
            crate::report::finish_status(&mut report);
            report.timings_ms.insert("total".into(), ms(start));
            return report;
        }
    };
    report.driver_version = Some(manifest.driver_version.clone());
    // NVIDIA_DRIVER_CAPABILITIES: from here on the manifest holds only what is to be injected.
    report.problems.extend(ctx.env.problems.iter().cloned());
    let (manifest, injected, lacking) = env::select(&manifest, &ctx.env.capabilities);
    report.problems.extend(lacking);
    report.environment = ctx.env.workload_env(&injected);
    report.capabilities = injected;

    let step = Instant::now();
    // Before any module loads: the firmware is in the layer's /gpu/firmware, not the kernel's
    // default /lib/firmware (the layer emits nothing outside /gpu).
    if ctx.layer_path(FIRMWARE_DIR).is_dir() {
        match libraries::set_firmware_path(ctx, &ctx.layer_path(FIRMWARE_DIR).to_string_lossy()) {
            Ok(path) => report.firmware.path = Some(path),
            Err(e) => report.problems.push(e.to_string()),
        }
    }
    let mut log = KernelLog::open(&ctx.kmsg);
    let (modules, missing_fw) = load_modules(ctx, &manifest.modules, loader, &mut log);
    report.modules = modules;
    for fw in &manifest.firmware {
        if !ctx.layer_path(fw).is_file() {
            report.firmware.missing.push(fw.clone());
        }
    }
    for fw in missing_fw {
        if !report.firmware.missing.iter().any(|m| m.ends_with(&fw)) {
            report.firmware.missing.push(fw);
        }
    }
    if !report.firmware.missing.is_empty() {
        report.problems.push(format!(
            "firmware missing: {}: the GPU will not initialise; rebuild the initrd with the GSP \
             firmware artifact",
            report.firmware.missing.join(", ")
        ));
    }
    report.timings_ms.insert("modules".into(), ms(step));

    let step = Instant::now();
    let driver_up = report.modules.iter().all(|m| m.class.is_none());
    let node_plan = nodes::plan_from_proc(&ctx.proc_root);
    report.gpus = node_plan.gpus;
    report.problems.extend(node_plan.problems);
    // NVIDIA_VISIBLE_DEVICES: a hidden GPU gets no node at all (the workload shares /dev).
    let visible = env::visible_minors(&ctx.env.visible, &node_plan.gpus_by_bus);
    let mut planned = node_plan.nodes;
    planned.retain(|n| {
        n.name != format!("nvidia{}", n.minor)
            || node_plan.gpus_by_bus.iter().all(|(_, m)| *m != n.minor)
            || visible.iter().any(|(_, m)| *m == n.minor)
    });
    if planned.is_empty() && driver_up {
        report.problems.push(format!(
            "the NVIDIA driver is not registered in {}: no device nodes made",
            ctx.proc_root.join("devices").display()
        ));
    } else if driver_up && report.gpus == 0 {
        report.problems.push(format!(
            "the driver sees no GPU ({} is empty): only control nodes were made",
            ctx.proc_root.join("driver/nvidia/gpus").display()
        ));
    }
    // The workload root is untrusted: every path in it is resolved inside it.
    let root_dir = ctx.root.as_deref().map(RootDir::open);
    let mut dev_dirs = vec![ctx.dev_dir.clone()];
    if let (Some(root), Some(Ok(dir))) = (&ctx.root, &root_dir) {
        match root_dev_dir(root, dir) {
            Ok(Some(root_dev)) if !crate::sys::same_file(&root_dev, &ctx.dev_dir) => {
                dev_dirs.push(root_dev)
            }
            Ok(_) => {}
            Err(problem) => report.problems.push(problem),
        }
    }
    for dir in &dev_dirs {
        for spec in &planned {
            match nodes::ensure(
                dir,
                spec,
                manifest.device_nodes.mode,
                manifest.device_nodes.gid,
            ) {
                Ok(n) => report.nodes.push(n),
                Err(e) => report.problems.push(e.to_string()),
            }
        }
    }
    report.timings_ms.insert("nodes".into(), ms(step));

    let step = Instant::now();
    match root_dir {
        None => report.problems.push(
            "no workload root given: libraries, programs and the CDI spec were not installed"
                .into(),
        ),
        Some(Err(e)) => {
            let mut problem = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                problem.push_str(&format!(": {c}"));
                cause = c.source();
            }
            report.problems.push(format!(
                "{problem}: libraries, programs and the CDI spec were not installed"
            ));
        }
        Some(Ok(root)) => {
            let root = &root;
            if ctx.layer_path(FIRMWARE_DIR).is_dir() {
                match libraries::expose_firmware(ctx) {
                    Ok(path) => report.firmware.path = Some(path),
                    Err(e) => report.problems.push(e.to_string()),
                }
            }
            let injected = libraries::mount_layer(ctx, root).and_then(|()| {
                let libs = libraries::inject_libraries(root, &manifest, ctx, &mut report.problems)?;
                let bins = libraries::link_binaries(root, &manifest, &mut report.problems)?;
                Ok((libs, bins))
            });
            match injected {
                Ok((libs, bins)) => {
                    report.libraries = libs;
                    report.binaries = bins;
                }
                Err(e) => report.problems.push(e.to_string()),
            }
            report.timings_ms.insert("libraries".into(), ms(step));

            let step = Instant::now();
            let lib_dir = report
                .libraries
                .dir
                .clone()
                .unwrap_or_else(|| "/usr/lib".into());
            // A spec for a driver that did not load would advertise devices that do not exist.
            if driver_up {
                match cdi::write(
                    root,
                    &manifest,
                    &visible,
                    &report.nodes,
                    &ctx.dev_dir,
                    &lib_dir,
                ) {
                    Ok(path) => report.cdi = Some(path),
                    Err(e) => report.problems.push(e.to_string()),
                }
            }
            report.timings_ms.insert("cdi".into(), ms(step));
        }
    }
    // After the modules (and the nodes) are there: the driver's own daemons, then the lock.
    let driver_down = report.modules.iter().find(|m| m.class.is_some()).map(|m| {
        let class = serde_json::to_value(m.class).unwrap_or_default();
        format!("{}: {}", m.name, class.as_str().unwrap_or("failed"))
    });
    let decisions = daemons::decide(ctx, &manifest, &ctx.env, driver_down.as_deref());
    let (started, problems) = daemons::run(ctx, decisions);
    report.daemons = started;
    report.problems.extend(problems);
    if ctx.env.lock_modules {
        match daemons::lock_modules(&ctx.proc_root) {
            Ok(()) => report.modules_locked = true,
            Err(problem) => report.problems.push(problem),
        }
    }
    crate::report::finish_status(&mut report);
    report.timings_ms.insert("total".into(), ms(start));
    report
}

/// The root's `/dev` as a host path, when nodes may be made in it: a plain directory, reached
/// without symlinks, whose `nvidia-caps` (if any) is one too — so no node lands outside the root.
/// `Ok(None)`: the root has no `/dev`. `Err`: the problem to report.
fn root_dev_dir(
    root: &std::path::Path,
    dir: &RootDir,
) -> Result<Option<std::path::PathBuf>, String> {
    match dir.lstat("/dev") {
        Ok(None) => return Ok(None),
        Ok(Some(_)) => {}
        Err(e) => return Err(format!("cannot inspect /dev of the workload root: {e}")),
    }
    for d in ["/dev", "/dev/nvidia-caps"] {
        let present = !matches!(dir.lstat(d), Ok(None));
        if present && !dir.is_plain_dir(d) {
            return Err(format!(
                "{d} in the workload root is not a plain directory (a symlink?): no device nodes \
                 were made in it; make it a directory or mount a devtmpfs there"
            ));
        }
    }
    Ok(Some(root.join("dev")))
}

/// The report for a guest that was not asked for a GPU.
pub fn skipped(kernel: String) -> Report {
    let mut report = Report::new(kernel);
    report.status = Status::Skipped;
    report
}

fn read_manifest(ctx: &SetupContext) -> Result<Manifest, ReportError> {
    let text = match std::fs::read_to_string(&ctx.manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReportError {
                class: SetupErrorClass::NoGpuLayer,
                message: format!(
                    "HAS_GPU=1 but {} does not exist: this initrd has no GPU layer; boot the \
                     combined initrd (base + GPU layer) or drop HAS_GPU=1",
                    ctx.manifest.display()
                ),
            });
        }
        Err(e) => {
            return Err(ReportError {
                class: SetupErrorClass::BadManifest,
                message: format!("cannot read {}: {e}", ctx.manifest.display()),
            });
        }
    };
    Manifest::from_json(&text).map_err(|e| ReportError {
        class: SetupErrorClass::BadManifest,
        message: format!("{}: {}", ctx.manifest.display(), with_causes(&e)),
    })
}

/// An error and its `#[source]` chain on one line: the report has no room for a chain.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

fn ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
