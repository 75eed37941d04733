//! What the CLI tests share: the binary cargo built for them, one run of it against a fake
//! host, and its `--json` answer. Each test binary uses a part of it.
#![allow(dead_code)]

use std::process::{Command, Output};

use gpu_passthrough_tests::sysfs::FakeHost;

/// The CLI under test, built by cargo for this test with the `simulation` feature.
pub fn cli_binary() -> &'static str {
    env!("CARGO_BIN_EXE_gpu-passthrough")
}

/// `gpu-passthrough ARGS` against `h`'s sysfs, state and device directories, no failpoint.
pub fn run(h: &FakeHost, args: &[&str]) -> Output {
    Command::new(cli_binary())
        .args(h.cli_args())
        .args(args)
        .args(["--dev-dir", h.dev.to_str().unwrap()])
        .env_remove("GPU_PASSTHROUGH_FAILPOINT")
        .output()
        .expect("run the CLI")
}

/// The run's stdout as JSON, or a panic showing what it printed instead.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}
