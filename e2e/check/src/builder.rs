//! Run BH (builder hardening): a release whose kernel modules are all
//! `.ko.xz`, its layers appended to a platform initrd whose `/lib` is a symlink (usrmerge).
//! The guest's early script (`E2E-BH` lines) looks at the root before handing over to our init.

use crate::checks::{Checks, json};
use crate::console::Console;
use crate::layers;
use gpu_passthrough_guest_contract::FIRMWARE_DIR;
use gpu_passthrough_guest_contract::report::{FailureClass, ModuleResult, find_report};
use std::path::Path;

/// The GPU layer of the xz release: plain `.ko` modules, and nothing outside `/gpu`.
pub fn xz_gpu_layer(layer: &Path) -> Checks {
    let mut c = Checks::default();
    let listed = layers::entries(layer);
    let names = listed.as_ref().map(Vec::as_slice).unwrap_or_default();
    let err = || match &listed {
        Ok(e) => format!("{} entries", e.len()),
        Err(e) => format!("{e:#}"),
    };
    let modules: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("gpu/modules/"))
        .collect();
    c.check(
        "xz release: every module in the GPU layer is a plain .ko",
        !modules.is_empty() && modules.iter().all(|n| n.ends_with(".ko")),
        || format!("{}; modules: {modules:?}", err()),
    );
    let outside: Vec<&String> = names
        .iter()
        .filter(|n| *n != "gpu" && !n.starts_with("gpu/"))
        .collect();
    c.check(
        "xz release: no GPU layer entry outside /gpu (so /lib -> usr/lib survives)",
        listed.is_ok() && outside.is_empty(),
        || format!("{}; outside: {outside:?}", err()),
    );
    let fw = FIRMWARE_DIR.trim_start_matches('/');
    c.check(
        format!("xz release: GSP firmware is in the GPU layer under {FIRMWARE_DIR}"),
        names
            .iter()
            .any(|n| n.starts_with(&format!("{fw}/nvidia/")) && n.ends_with(".bin")),
        err,
    );
    c
}

/// The guest: the platform's `/lib` symlink and its contents survived our layers, the modules
/// that were `.ko.xz` in the artifacts loaded, and the firmware search path leads to the files.
pub fn appended_guest(console: &Console, driver: &str) -> Checks {
    let mut c = Checks::default();
    let said = |k: &str| console.after(&format!("E2E-BH {k} ")).map(str::trim);
    c.check(
        "usrmerge: /lib is still the platform's symlink to usr/lib after our layers unpacked",
        said("lib_link") == Some("usr/lib"),
        || {
            format!(
                "lib_link: {:?}; last lines: {}",
                said("lib_link"),
                console.tail(5)
            )
        },
    );
    c.check(
        "usrmerge: the platform's file under /lib is still reachable",
        said("lib_marker") == Some("platform"),
        || format!("lib_marker: {:?}", said("lib_marker")),
    );
    c.check(
        "usrmerge: no /lib/firmware was created by our layers",
        said("lib_firmware") == Some("absent"),
        || format!("lib_firmware: {:?}", said("lib_firmware")),
    );
    let gsp = "gsp_ga10x.bin";
    c.check(
        format!("firmware: {FIRMWARE_DIR}/nvidia/{driver}/ holds the GSP files before init runs"),
        said("gsp").is_some_and(|l| l.split_whitespace().any(|f| f == gsp)),
        || format!("gsp: {:?}", said("gsp")),
    );
    let Some(Ok(r)) = find_report(&console.text) else {
        c.check("xz release: a GPU-INIT report line", false, || {
            format!("none parsed; last lines: {}", console.tail(5))
        });
        return c;
    };
    // Every module of the layer was .ko.xz in the artifacts: the kernel accepting them at all
    // (not ENOEXEC/wrong_kernel) shows they were written decompressed.
    // Those before nvidia (drm, video, ...) are tried; those after it are skipped because of it.
    let tried: Vec<_> = r
        .modules
        .iter()
        .filter(|m| m.name != "nvidia" && m.result != ModuleResult::Skipped)
        .collect();
    c.check(
        "xz release: the kernel loads every dependency module that was .ko.xz",
        !tried.is_empty()
            && tried
                .iter()
                .all(|m| matches!(m.result, ModuleResult::Loaded | ModuleResult::AlreadyLoaded)),
        || json(&r.modules),
    );
    let nvidia = r.modules.iter().find(|m| m.name == "nvidia");
    c.check(
        "xz release: nvidia (was nvidia.ko.xz) passes the kernel's checks and fails ENODEV (no_gpu)",
        nvidia.is_some_and(|m| m.class == Some(FailureClass::NoGpu) && m.errno == Some(19)),
        || json(&nvidia),
    );
    c.check(
        "xz release: no module classified wrong_kernel",
        !r.modules
            .iter()
            .any(|m| m.class == Some(FailureClass::WrongKernel)),
        || json(&r.modules),
    );
    c.check(
        "firmware: none missing, and firmware_class.path was set",
        r.firmware.missing.is_empty() && r.firmware.path.is_some(),
        || json(&r.firmware),
    );
    c.check(
        "firmware: after the switch, firmware_class.path leads to the GSP files in the workload",
        said("fw_path_gsp") == Some("present"),
        || format!("fw_path_gsp: {:?}", said("fw_path_gsp")),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(lib_link: &str) -> Console {
        Console::parse(&format!(
            "1.0 E2E-BH lib_link {lib_link}\n1.0 E2E-BH lib_marker platform\n\
             1.0 E2E-BH lib_firmware absent\n1.0 E2E-BH gsp gsp_ga10x.bin gsp_tu10x.bin \n\
             2.0 E2E-BH fw_path_gsp present\n"
        ))
    }

    #[test]
    fn a_replaced_lib_symlink_fails_and_a_missing_report_is_a_failure() {
        let good = appended_guest(&console("usr/lib"), "535.261.03");
        // Only the report checks fail: there is no GPU-INIT line in this console.
        assert_eq!(good.failed(), 1, "{:?}", good.lines());
        let bad = appended_guest(&console(""), "535.261.03");
        assert_eq!(bad.failed(), 2, "{:?}", bad.lines());
    }
}
