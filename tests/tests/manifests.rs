//! The manifests in `deploy/` are accepted by a cluster: each resource validates, strictly (no
//! unknown field), against the Kubernetes API schemas of the oldest and newest versions
//! `kubernetes-validate` knows. KubeVirt's own kinds have no schema there (they are
//! CustomResourceDefinitions), and only they may be left unchecked.

use std::path::{Path, PathBuf};
use std::process::Command;

const VALIDATE: &str = r#"
import sys
import kubernetes_validate as kv
from kubernetes_validate.utils import SchemaNotFoundError, all_versions, resources_from_file
versions = sorted(set([all_versions()[0], kv.latest_version()]))
checked, failures = 0, []
for f in sys.argv[1:]:
    for r in resources_from_file(f):
        for v in versions:
            what = "%s %s %s in %s" % (f, r.get("apiVersion"), r.get("kind"), v)
            try:
                kv.validate(r, v, strict=True)
                checked += 1
            except SchemaNotFoundError:
                if not str(r.get("apiVersion", "")).startswith("kubevirt.io/"):
                    failures.append("%s: no schema" % what)
            except kv.ValidationError as e:
                failures.append("%s: %s at %s" % (what, e.message, "/".join(map(str, e.path))))
print("checked", checked)
for x in failures:
    print("FAIL", x)
sys.exit(1 if failures else 0)
"#;

fn validate(python: &Path, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(python)
        .arg("-c")
        .arg(VALIDATE)
        .args(files)
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn deploy_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read deploy/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn deploy_manifests_validate_against_the_kubernetes_schemas() {
    let Some(python) = gpu_passthrough_tests::python::with_modules(&["kubernetes_validate"]) else {
        return;
    };
    let files = deploy_files();
    assert!(files.len() >= 2, "{files:?}");
    let (ok, text) = validate(&python, &files);
    assert!(ok, "{text}");
    let checked: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("checked "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a count");
    // The DaemonSet, in both versions, at least.
    assert!(checked >= 2, "{text}");
}

#[test]
fn a_misspelt_field_is_caught() {
    let Some(python) = gpu_passthrough_tests::python::with_modules(&["kubernetes_validate"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemonset = deploy_files()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("daemonset"))
        .expect("the DaemonSet manifest");
    let text = std::fs::read_to_string(daemonset).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        text.replace(
            "      priorityClassName:",
            "      hostPid: true\n      priorityClassName:",
        ),
    )
    .unwrap();
    let (ok, out) = validate(&python, &[bad]);
    assert!(!ok, "{out}");
    assert!(out.contains("hostPid"), "{out}");
}
