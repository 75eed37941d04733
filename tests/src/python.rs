//! Python tools some tests drive (a gRPC C-core client, the Prometheus exposition parser, the
//! Kubernetes schema validator): `.ci/run` installs them into a virtual environment and names
//! its interpreter in `GPU_PASSTHROUGH_PYTHON`. Where they are missing a test is skipped, with
//! a note, except under CI (`CI=true`), where that is a failure.

use std::path::PathBuf;
use std::process::Command;

/// The interpreter to use: `$GPU_PASSTHROUGH_PYTHON`, else `python3`.
fn interpreter() -> PathBuf {
    std::env::var_os("GPU_PASSTHROUGH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// An interpreter that imports every module in `modules`; `None` (after a note on stderr)
/// where there is none outside CI. Under `CI=true` a missing module fails the test.
pub fn with_modules(modules: &[&str]) -> Option<PathBuf> {
    let python = interpreter();
    let imports = format!("import {}", modules.join(", "));
    let ok = Command::new(&python)
        .args(["-c", &imports])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    let how = format!(
        "{} cannot `{imports}`: run `python3 -m venv target/py && target/py/bin/pip install grpcio \
         prometheus-client kubernetes-validate` and set GPU_PASSTHROUGH_PYTHON=target/py/bin/python \
         (as .ci/run does)",
        python.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{how}");
    }
    eprintln!("skipped: {how}");
    None
}
