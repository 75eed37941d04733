//! `gpu-init`: PID 1 of a GPU guest, or `gpu-init setup --root DIR` called by another init.

use gpu_passthrough_init::context::SetupContext;
use gpu_passthrough_init::loaded::AlreadyLoaded;
use gpu_passthrough_init::modules::FinitModule;
use gpu_passthrough_init::{boot, cdi_hook, dryrun, setup};
use gpu_passthrough_guest_contract::MANIFEST_PATH;
use gpu_passthrough_guest_contract::report::Status;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str =
    "usage: gpu-init setup --root DIR [--manifest PATH] [--strict] [--layer-root DIR]
                      [--dev-dir DIR] [--no-load]
       gpu-init nodes --dry-run [--proc-root DIR] [--dev-dir DIR] [--manifest PATH] [--json]
  (as PID 1 it boots the guest: see guest-init/README.md)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if std::process::id() == 1 {
        boot::pid1(&args);
    }
    if args.first().is_some_and(|a| cdi_hook::invoked_as_hook(a)) {
        return hook_command(&args[1..]);
    }
    match args.get(1).map(String::as_str) {
        Some("setup") => setup_command(&args[2..]),
        Some("nodes") => nodes_command(&args[2..]),
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
    let mut layer_root = None;
    let mut dev_dir = None;
    let mut no_load = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--root" => root = it.next().map(PathBuf::from),
            "--manifest" => match it.next() {
                Some(m) => manifest = PathBuf::from(m),
                None => return usage_error("--manifest needs a path"),
            },
            "--layer-root" => match it.next() {
                Some(d) => layer_root = Some(PathBuf::from(d)),
                None => return usage_error("--layer-root needs a directory"),
            },
            "--dev-dir" => match it.next() {
                Some(d) => dev_dir = Some(PathBuf::from(d)),
                None => return usage_error("--dev-dir needs a directory"),
            },
            "--no-load" => no_load = true,
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
    let mut ctx = SetupContext::system(manifest, Some(root));
    if let Some(dir) = layer_root {
        ctx.layer_root = dir;
    }
    if let Some(dir) = dev_dir {
        ctx.dev_dir = dir;
    }
    let report = if no_load {
        let loader = AlreadyLoaded {
            sys_root: ctx.sys_root.clone(),
        };
        setup::run(&ctx, &loader)
    } else {
        setup::run(&ctx, &FinitModule)
    };
    println!("{}", report.line());
    if strict && report.status != Status::Ok {
        eprintln!("gpu-init: --strict: GPU setup is not ok (see the GPU-INIT report)");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn nodes_command(args: &[String]) -> ExitCode {
    let parsed = match dryrun::DryRunArgs::parse(args) {
        Ok(a) => a,
        Err(e) => return usage_error(&e),
    };
    match dryrun::run(&parsed) {
        Ok(dry) if parsed.json => match serde_json::to_string_pretty(&dry) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("gpu-init: {e}");
                ExitCode::from(1)
            }
        },
        Ok(dry) => {
            print!("{}", dryrun::human(&dry));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpu-init: {e}");
            ExitCode::from(1)
        }
    }
}

/// A CDI container hook: the runtime gives the OCI state on standard input.
fn hook_command(args: &[String]) -> ExitCode {
    let mut state = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut state) {
        eprintln!(
            "{}: cannot read the container state: {e}",
            cdi_hook::HOOK_NAME
        );
        return ExitCode::from(1);
    }
    match cdi_hook::run(args, &state) {
        Ok(problems) => {
            for p in problems {
                eprintln!("{}: {p}", cdi_hook::HOOK_NAME);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{}: {msg}", cdi_hook::HOOK_NAME);
            ExitCode::from(1)
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("gpu-init: {message}\n{USAGE}");
    ExitCode::from(2)
}
