//! The CDI spec: valid against the CDI 0.6 JSON schema (tests/cdi-schema/, see SOURCE there), with
//! the hooks `nvidia-ctk` emits, and those hooks giving an image of another layout `libcuda.so.1`.

mod common;

use gpu_passthrough_init::{cdi, cdi_hook};
use serde_json::{Value, json};
use std::path::Path;

const SCHEMA: &str = include_str!("cdi-schema/schema.json");
const DEFS: &str = include_str!("cdi-schema/defs.json");
const LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

/// Serves the schema's relative `defs.json` from the test tree; nothing is fetched.
struct Defs;

impl jsonschema::Retrieve for Defs {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.as_str().ends_with("/defs.json") {
            Ok(serde_json::from_str(DEFS)?)
        } else {
            Err(format!("not in the test tree: {uri}").into())
        }
    }
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .with_base_uri("json-schema:///")
        .with_retriever(Defs)
        .build(schema)
        .unwrap()
}

fn errors(spec: &Value) -> Vec<String> {
    let whole = validator(&serde_json::from_str(SCHEMA).unwrap());
    // The 0.6 top-level schema does not list the spec-wide containerEdits; check them against
    // the same definition the devices' edits use.
    let edits = validator(&json!({ "$ref": "defs.json#/definitions/containerEdits" }));
    whole
        .iter_errors(spec)
        .chain(edits.iter_errors(&spec["containerEdits"]))
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

fn spec() -> Value {
    let names = ["nvidiactl", "nvidia0", "nvidia-uvm"].map(String::from);
    cdi::spec(&common::manifest(), &[(0, 0)], &names, LIB_DIR)
}

fn hook<'a>(spec: &'a Value, name: &str) -> &'a Value {
    spec["containerEdits"]["hooks"]
        .as_array()
        .unwrap_or_else(|| panic!("no hooks in {spec}"))
        .iter()
        .find(|h| h["args"][1] == name)
        .unwrap_or_else(|| panic!("no {name} hook in {spec}"))
}

fn args(hook: &Value) -> Vec<String> {
    hook["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_spec_is_valid_cdi_0_6_and_carries_the_nvidia_ctk_hooks() {
    let spec = spec();
    assert_eq!(errors(&spec), Vec::<String>::new());

    let links = hook(&spec, "create-symlinks");
    assert_eq!(links["hookName"], "createContainer");
    assert_eq!(links["path"], "/usr/lib/gpu-passthrough/bin/gpu-init");
    assert_eq!(
        args(links),
        [
            "nvidia-cdi-hook",
            "create-symlinks",
            "--link",
            "libcuda.so.535.261.03::/usr/lib/x86_64-linux-gnu/libcuda.so.1",
            "--link",
            "libcuda.so.1::/usr/lib/x86_64-linux-gnu/libcuda.so",
            "--link",
            "libnvidia-ml.so.535.261.03::/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
            "--link",
            "libnvidia-ml.so.1::/usr/lib/x86_64-linux-gnu/libnvidia-ml.so",
        ]
    );
    let ldcache = hook(&spec, "update-ldcache");
    assert_eq!(ldcache["hookName"], "createContainer");
    assert_eq!(
        args(ldcache),
        ["nvidia-cdi-hook", "update-ldcache", "--folder", LIB_DIR]
    );
}

#[test]
fn the_schema_check_rejects_a_hook_without_a_path() {
    let mut spec = spec();
    spec["containerEdits"]["hooks"][0]
        .as_object_mut()
        .unwrap()
        .remove("path");
    spec["devices"][0]["containerEdits"]["deviceNodes"][0] = json!({ "major": 195 });
    let errors = errors(&spec);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("\"path\"")), "{errors:?}");
}

/// An image with another layout (Fedora-like `/usr/lib64`, no multiarch dir): after the runtime's
/// mounts (emulated by a copy) and the spec's hooks, its loader finds the driver's libcuda.so.1.
#[test]
fn the_hooks_give_an_image_of_another_layout_libcuda_so_1() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bundle = tmp.path().join("bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("usr/lib64")).unwrap();
    std::fs::create_dir_all(rootfs.join("usr/sbin")).unwrap();
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::copy("/sbin/ldconfig", rootfs.join("usr/sbin/ldconfig")).unwrap();
    std::fs::write(
        rootfs.join("etc/ld.so.conf"),
        "include /etc/ld.so.conf.d/*.conf\n",
    )
    .unwrap();
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#,
    )
    .unwrap();
    let spec = spec();
    for m in spec["containerEdits"]["mounts"].as_array().unwrap() {
        let container = m["containerPath"].as_str().unwrap();
        let Some(name) = container.strip_prefix(&format!("{LIB_DIR}/")) else {
            continue;
        };
        let dst = rootfs.join(container.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(common::real_libs().join(name), &dst).unwrap();
    }
    let state = format!(
        r#"{{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":"{}"}}"#,
        bundle.display()
    );
    for name in ["create-symlinks", "update-ldcache"] {
        let problems = cdi_hook::run(&args(hook(&spec, name))[1..], &state).unwrap();
        assert!(problems.is_empty(), "{name}: {problems:?}");
    }

    let lib_dir = rootfs.join(LIB_DIR.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_link(lib_dir.join("libcuda.so.1")).unwrap(),
        Path::new("libcuda.so.535.261.03")
    );
    assert_eq!(
        std::fs::read_link(lib_dir.join("libcuda.so")).unwrap(),
        Path::new("libcuda.so.1")
    );
    let mut cmd = std::process::Command::new("/usr/sbin/ldconfig");
    cmd.arg("-p");
    gpu_passthrough_init::sys::chroot_command(&mut cmd, &rootfs);
    let out = cmd.output().unwrap();
    let cache = String::from_utf8_lossy(&out.stdout);
    assert!(
        cache
            .lines()
            .any(|l| l.contains("libcuda.so.1 ")
                && l.contains(&format!("=> {LIB_DIR}/libcuda.so.1"))),
        "{cache}"
    );
}
