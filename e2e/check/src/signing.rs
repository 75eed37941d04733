//! Run F: NVIDIA's open modules built from Debian's source by `versions build`, against the
//! prebuilt fixture modules; their signatures read by our parser and by kmod's `modinfo`; the
//! builds' figures and reproducibility; and the guests booted with `module.sig_enforce=1`.

use crate::checks::{Checks, json};
use crate::console::Console;
use gpu_passthrough::modinfo::ModInfo;
use gpu_passthrough::modsig;
use gpu_passthrough_guest_contract::report::{FailureClass, ModuleResult, find_report};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `.modinfo` fields a build for the same kernel and driver must reproduce.
const SAME_FIELDS: [&str; 4] = ["version", "vermagic", "license", "depends"];

/// Who must have signed the built modules (`None`: they must carry no signature).
pub struct Expected<'a> {
    /// The signing certificate's common name (`modinfo`'s `signer:`).
    pub signer: &'a str,
    /// Its serial as `AA:BB:...` (`modinfo`'s `sig_key:`).
    pub key_id: &'a str,
}

/// Every `.ko` under `dir` by file name.
fn modules_in(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && name.ends_with(".ko")
            {
                found.insert(name.to_string(), path);
            }
        }
    }
    Ok(found)
}

/// What kmod's real `modinfo -F FIELD` prints, trimmed.
fn modinfo_field(module: &Path, field: &str) -> Result<String, String> {
    let out = Command::new("modinfo")
        .args(["-F", field])
        .arg(module)
        .output()
        .map_err(|e| format!("cannot run modinfo (install kmod): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The built modules (unpacked under `built`) against the prebuilt ones (under `prebuilt`):
/// every prebuilt module was built, with the same version, vermagic, license and `depends=`;
/// signed by `signer` (our reading and kmod's `modinfo` agree), or unsigned.
pub fn built_modules(built: &Path, prebuilt: &Path, signer: Option<&Expected>) -> Checks {
    let mut c = Checks::default();
    let (built_set, prebuilt_set) = match (modules_in(built), modules_in(prebuilt)) {
        (Ok(b), Ok(p)) => (b, p),
        (b, p) => {
            c.check(
                "the built and prebuilt module trees are readable",
                false,
                || format!("{:?} / {:?}", b.err(), p.err()),
            );
            return c;
        }
    };
    c.check(
        "every prebuilt NVIDIA module was built",
        !prebuilt_set.is_empty() && prebuilt_set.keys().all(|k| built_set.contains_key(k)),
        || {
            format!(
                "prebuilt {:?}, built {:?}",
                prebuilt_set.keys().collect::<Vec<_>>(),
                built_set.keys().collect::<Vec<_>>()
            )
        },
    );
    for (name, reference) in &prebuilt_set {
        let Some(ours) = built_set.get(name) else {
            continue;
        };
        let (ours_info, reference_info) =
            match (ModInfo::from_path(ours), ModInfo::from_path(reference)) {
                (Ok(a), Ok(b)) => (a, b),
                (a, b) => {
                    c.check(format!("{name}: .modinfo readable"), false, || {
                        format!(
                            "{:?} / {:?}",
                            a.err().map(|e| e.to_string()),
                            b.err().map(|e| e.to_string())
                        )
                    });
                    continue;
                }
            };
        let differing: Vec<String> = SAME_FIELDS
            .iter()
            .filter(|f| ours_info.all(f) != reference_info.all(f))
            .map(|f| {
                format!(
                    "{f}: built {:?}, prebuilt {:?}",
                    ours_info.all(f),
                    reference_info.all(f)
                )
            })
            .collect();
        c.check(
            format!("{name}: same version, vermagic, license and depends= as the prebuilt module"),
            differing.is_empty(),
            || differing.join("; "),
        );
        signature_checks(&mut c, name, ours, signer);
    }
    c
}

fn signature_checks(c: &mut Checks, name: &str, module: &Path, signer: Option<&Expected>) {
    let ours = modsig::from_path(module);
    let kmod_signer = modinfo_field(module, "signer");
    let kmod_key = modinfo_field(module, "sig_key");
    match signer {
        None => c.check(
            format!("{name}: unsigned (our reader and modinfo see no signature)"),
            matches!(ours, Ok(None)) && kmod_signer.as_deref() == Ok(""),
            || format!("ours {ours:?}, modinfo signer {kmod_signer:?}"),
        ),
        Some(want) => {
            let sig = ours.as_ref().ok().and_then(Option::as_ref);
            c.check(
                format!(
                    "{name}: signed by {} (key {}), as our reader sees it",
                    want.signer, want.key_id
                ),
                sig.is_some_and(|s| {
                    s.signer.as_deref() == Some(want.signer) && s.key_id_hex() == want.key_id
                }),
                || format!("{ours:?}"),
            );
            c.check(
                format!("{name}: kmod's modinfo shows the same signer and sig_key"),
                kmod_signer.as_deref() == Ok(want.signer) && kmod_key.as_deref() == Ok(want.key_id),
                || format!("modinfo signer {kmod_signer:?}, sig_key {kmod_key:?}"),
            );
            c.check(
                format!("{name}: signature digest is sha256 (the kernel's CONFIG_MODULE_SIG_HASH)"),
                sig.is_some_and(|s| s.hash_algo == "sha256")
                    && modinfo_field(module, "sig_hashalgo").as_deref() == Ok("sha256"),
                || format!("{ours:?}"),
            );
        }
    }
}

/// `versions build --json` output: a real build or a cache hit, as asked; its figures.
pub fn build_report(
    json_path: &Path,
    label: &str,
    expect_cache_hit: bool,
) -> anyhow::Result<Checks> {
    let mut c = Checks::default();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json_path)?)?;
    let hit = v["cache_hit"].as_bool();
    c.check(
        format!(
            "{label}: {}",
            if expect_cache_hit {
                "a cache hit (no compile)"
            } else {
                "compiled (no cache hit)"
            }
        ),
        hit == Some(expect_cache_hit),
        || format!("cache_hit {hit:?}"),
    );
    let modules = v["modules"].as_array().map(Vec::len).unwrap_or(0);
    c.check(
        format!("{label}: the report lists the built modules with their digests"),
        modules >= 4
            && v["modules"].as_array().is_some_and(|m| {
                m.iter()
                    .all(|m| m["sha256"].as_str().is_some_and(|d| d.len() == 64))
            }),
        || format!("modules {}", json(&v["modules"])),
    );
    if let Some(seconds) = v["seconds"].as_f64() {
        c.figure(format!("run F {label} (s)"), format!("{seconds:.1}"));
    }
    Ok(c)
}

/// The module digests of a build report, by file name.
fn module_digests(json_path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(json_path)?)?;
    Ok(v["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["name"].as_str()?.to_string(),
                m["sha256"].as_str()?.to_string(),
            ))
        })
        .collect())
}

/// Two builds of the same inputs in fresh caches: the same module bytes.
pub fn reproducible(first: &Path, second: &Path) -> anyhow::Result<Checks> {
    let mut c = Checks::default();
    let (a, b) = (module_digests(first)?, module_digests(second)?);
    for (name, digest) in &a {
        c.info(format!(
            "{name} sha256 first {digest} second {}",
            b.get(name).map_or("-", String::as_str)
        ));
    }
    let differing: Vec<&String> = a.keys().filter(|k| a.get(*k) != b.get(*k)).collect();
    c.check(
        "a second build of the same inputs gives byte-identical modules",
        !a.is_empty() && a.len() == b.len() && differing.is_empty(),
        || format!("differ: {differing:?}"),
    );
    Ok(c)
}

/// A guest booted with `module.sig_enforce=1`: `nvidia` refused for its signature with the
/// kernel's `reason`, its dependents skipped with the same class, and the kernel's own
/// (Debian-signed) modules loaded.
pub fn signature_guest(console: &Console, reason: &str, boot_rc: i32) -> Checks {
    let mut c = Checks::default();
    let found = find_report(&console.text);
    c.check(
        "a GPU-INIT report line that deserializes as the contract's Report",
        matches!(found, Some(Ok(_))),
        || format!("last lines: {}", console.tail(5)),
    );
    if let Some(Ok(r)) = found {
        let nvidia = r.module("nvidia");
        c.check(
            format!(
                "nvidia refused with EKEYREJECTED, class signature_rejected, reason '{reason}'"
            ),
            nvidia.is_some_and(|m| {
                m.result == ModuleResult::Failed
                    && m.class == Some(FailureClass::SignatureRejected)
                    && m.errno == Some(129)
                    && m.message.as_deref().is_some_and(|t| t.contains(reason))
            }),
            || format!("got {}", json(&nvidia)),
        );
        c.check(
            "the message names the fix (a key the guest kernel trusts)",
            nvidia
                .and_then(|m| m.message.as_deref())
                .is_some_and(|t| t.contains("a key the guest kernel trusts")),
            || format!("got {}", json(&nvidia)),
        );
        for dep in ["nvidia_uvm", "nvidia_modeset", "nvidia_drm"] {
            let m = r.module(dep);
            c.check(
                format!("{dep} skipped because nvidia's signature was refused"),
                m.is_some_and(|m| {
                    m.result == ModuleResult::Skipped
                        && m.class == Some(FailureClass::SignatureRejected)
                }),
                || format!("got {}", json(&m)),
            );
        }
        let kernel_own: Vec<_> = r
            .modules
            .iter()
            .filter(|m| !m.name.starts_with("nvidia"))
            .collect();
        c.check(
            "the kernel's own Debian-signed modules (drm, ...) still load under sig_enforce",
            kernel_own.iter().any(|m| m.name == "drm")
                && kernel_own.iter().all(|m| m.result == ModuleResult::Loaded),
            || format!("got {}", json(&kernel_own)),
        );
    }
    c.check("guest powered off by itself", boot_rc == 0, || {
        format!("QEMU exit {boot_rc}")
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(report: &str) -> Console {
        Console::parse(&format!("1.00 boot\n2.00 GPU-INIT {report}\n"))
    }

    #[test]
    fn a_signature_guest_needs_the_class_the_reason_and_the_kernels_modules_loaded() {
        let good = r#"{"status":"failed","kernel":"k","modules":[
            {"name":"drm","result":"loaded"},
            {"name":"nvidia","result":"failed","class":"signature_rejected","errno":129,"message":"nvidia: unsigned module: ... sign the modules with a key the guest kernel trusts"},
            {"name":"nvidia_uvm","result":"skipped","class":"signature_rejected","dependency":"nvidia"},
            {"name":"nvidia_modeset","result":"skipped","class":"signature_rejected","dependency":"nvidia"},
            {"name":"nvidia_drm","result":"skipped","class":"signature_rejected","dependency":"nvidia_modeset"}],
            "nodes":[],"gpus":0,"firmware":{"missing":[]},"libraries":{"injected":[],"shadowed":[],"ldconfig":"not_run"},
            "binaries":[],"problems":[],"timings_ms":{"modules":1,"nodes":0,"total":1}}"#
            .replace('\n', "");
        let c = signature_guest(&console(&good), "unsigned module", 0);
        assert_eq!(c.failed(), 0, "{:?}", c.lines());
        // The other reason is not this one.
        assert_eq!(
            signature_guest(&console(&good), "unavailable key", 0).failed(),
            1
        );
        // A kernel module that did not load fails the check.
        let drm_failed = good.replace(
            r#"{"name":"drm","result":"loaded"}"#,
            r#"{"name":"drm","result":"failed","class":"signature_rejected","errno":129}"#,
        );
        assert_eq!(
            signature_guest(&console(&drm_failed), "unsigned module", 0).failed(),
            1
        );
        assert_eq!(
            signature_guest(&console("{}"), "unsigned module", 1).failed(),
            2,
            "no report, and QEMU did not exit cleanly"
        );
    }

    #[test]
    fn reproducibility_compares_every_module_digest() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let d = "a".repeat(64);
        let a = write(
            "a.json",
            &format!(r#"{{"modules":[{{"name":"nvidia.ko","sha256":"{d}"}}]}}"#),
        );
        let b = write(
            "b.json",
            &format!(r#"{{"modules":[{{"name":"nvidia.ko","sha256":"{d}"}}]}}"#),
        );
        let other = write(
            "c.json",
            &format!(
                r#"{{"modules":[{{"name":"nvidia.ko","sha256":"{}"}}]}}"#,
                "b".repeat(64)
            ),
        );
        assert_eq!(reproducible(&a, &b).unwrap().failed(), 0);
        assert_eq!(reproducible(&a, &other).unwrap().failed(), 1);
    }
}
