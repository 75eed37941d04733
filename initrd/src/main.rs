//! `gpu-init`: PID 1 of a GPU guest, or `gpu-init setup --root DIR` called by another init.

use gpu_passthrough_init::context::SetupContext;
use gpu_passthrough_init::modules::FinitModule;
use gpu_passthrough_init::{boot, setup};
use gpu_passthrough_manifest::MANIFEST_PATH;
use gpu_passthrough_manifest::report::Status;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: gpu-init setup --root DIR [--manifest PATH] [--strict]
  (as PID 1 it boots the guest: see initrd/README.md)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if std::process::id() == 1 {
        boot::pid1(&args);
    }
    match args.get(1).map(String::as_str) {
        Some("setup") => setup_command(&args[2..]),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("gpu-init: not PID 1 and no command given\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn setup_command(args: &[String]) -> ExitCode {
    let mut root = None;
    let mut manifest = PathBuf::from(MANIFEST_PATH);
    let mut strict = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--root" => root = it.next().map(PathBuf::from),
            "--manifest" => match it.next() {
                Some(m) => manifest = PathBuf::from(m),
                None => return usage_error("--manifest needs a path"),
            },
            "--strict" => strict = true,
            other => return usage_error(&format!("unknown argument {other}")),
        }
    }
    let Some(root) = root else {
        return usage_error("--root DIR is required (the workload's root directory)");
    };
    if !root.is_dir() {
        return usage_error(&format!("--root {} is not a directory", root.display()));
    }
    let ctx = SetupContext::system(manifest, Some(root));
    let report = setup::run(&ctx, &FinitModule);
    println!("{}", report.line());
    if strict && report.status != Status::Ok {
        eprintln!("gpu-init: --strict: GPU setup is not ok (see the GPU-INIT report)");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("gpu-init: {message}\n{USAGE}");
    ExitCode::from(2)
}
