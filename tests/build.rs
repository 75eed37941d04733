//! Finds the real fixtures once, at build time, so that `cargo test` on a machine without them
//! stops before any test runs with one message saying how to get them, instead of every test
//! that needs them failing on its own. The directory found is compiled in
//! (`GPU_PASSTHROUGH_FIXTURES_DIR`, read by `fixtures::dir`).
//!
//! The lookup: `$GPU_PASSTHROUGH_FIXTURES` when set, else the first `shared/fixtures` holding a
//! `SHA256SUMS` above this crate (`../shared/fixtures` beside a checkout, and beside the main
//! checkout for a worktree under it), else `e2e/work/fixtures` (where `e2e/run` and `.ci/run`
//! make them on a machine without any).

use std::path::{Path, PathBuf};

const ENV: &str = "GPU_PASSTHROUGH_FIXTURES";

fn main() {
    println!("cargo::rerun-if-env-changed={ENV}");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    match find(&manifest_dir) {
        Ok(dir) => {
            println!(
                "cargo::rerun-if-changed={}",
                dir.join("SHA256SUMS").display()
            );
            println!(
                "cargo::rustc-env=GPU_PASSTHROUGH_FIXTURES_DIR={}",
                dir.display()
            );
        }
        Err(why) => {
            // A failed build script runs again on the next build: no rerun rule needed.
            println!(
                "cargo::error=the tests need the real fixtures (a Debian guest kernel and NVIDIA \
                 535 driver artifacts), and {why}. Put them in ../shared/fixtures beside the \
                 repository (a copy, or make them there: `sudo e2e/make-fixtures.sh \
                 ../shared/fixtures`, Debian with network, about 15 minutes; `.ci/run` and \
                 `e2e/run` make them in e2e/work/fixtures), or set {ENV}=DIR."
            );
        }
    }
}

fn find(manifest_dir: &Path) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(ENV) {
        let dir = PathBuf::from(dir);
        return if dir.join("SHA256SUMS").is_file() {
            Ok(dir)
        } else {
            Err(format!("{ENV}={} has no SHA256SUMS", dir.display()))
        };
    }
    let made_here = manifest_dir.join("../e2e/work/fixtures");
    manifest_dir
        .ancestors()
        .map(|a| a.join("shared/fixtures"))
        .chain([made_here])
        .find(|d| d.join("SHA256SUMS").is_file())
        .ok_or_else(|| {
            format!(
                "there is no shared/fixtures with a SHA256SUMS above {} (nor e2e/work/fixtures)",
                manifest_dir.display()
            )
        })
}
