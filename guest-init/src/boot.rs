//! PID 1 mode: mount the basics, run the GPU setup, switch into the workload root, run the
//! workload, power off.

use crate::context::SetupContext;
use crate::modules::FinitModule;
use crate::{disk, setup};
use gpu_passthrough_guest_contract::MANIFEST_PATH;
use gpu_passthrough_guest_contract::report::{PayloadReport, PayloadSource, Report};
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where a block-device root is mounted before the switch.
pub const NEWROOT: &str = "/newroot";
/// How long to wait for a block device root to appear.
const ROOT_WAIT: Duration = Duration::from_secs(10);

/// What to do when boot cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Power the guest off (default: never leave it hung).
    Poweroff,
    /// Start `/bin/sh` on the console for debugging.
    Shell,
}

/// A fatal boot error.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A kernel command-line setting has a bad value.
    #[error("{name}={value} is not valid: {hint}")]
    BadSetting {
        /// Variable name.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is accepted.
        hint: &'static str,
    },
    /// The root could not be mounted or found.
    #[error("workload root {root}: {reason}")]
    Root {
        /// `GPU_INIT_ROOT` value.
        root: String,
        /// Why, with the fix.
        reason: String,
    },
    /// A syscall in the switch failed.
    #[error("{step}: {errno}")]
    Sys {
        /// What was attempted.
        step: String,
        /// The errno.
        errno: Errno,
    },
    /// The workload could not be started.
    #[error(
        "cannot start workload {command}: {source}: pass an existing program after `--` on the kernel command line"
    )]
    Exec {
        /// The program.
        command: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Boot settings from init's environment (kernel command-line `NAME=value` words) and argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// `HAS_GPU=1`.
    pub has_gpu: bool,
    /// `GPU_INIT_ROOT`: a block device (`/dev/vda`) or a directory inside the initramfs.
    pub root: Option<String>,
    /// `GPU_INIT_ROOTFSTYPE`: filesystem of a block-device root (default: try every one the
    /// kernel knows).
    pub rootfstype: Option<String>,
    /// `GPU_INIT_ON_ERROR`: `poweroff` (default) or `shell`.
    pub on_error: OnError,
    /// `GPU_INIT_STRICT=1`: a GPU setup that is not `ok` is fatal.
    pub strict: bool,
    /// `GPU_DISK`: the GPU payload is an image on this device (`pmem` or `/dev/vdX`), checked
    /// when it is mounted so that a bad value is the report's classified error.
    pub gpu_disk: Option<String>,
    /// `GPU_DISK_VERITY`: the image's dm-verity root hash and parameters.
    pub gpu_disk_verity: Option<String>,
    /// The workload: init's argv after its name (words after ` -- ` on the kernel command line).
    pub command: Vec<String>,
}

impl BootConfig {
    /// Read the settings. `env` looks a variable up; `args` is init's full argv.
    pub fn parse(env: impl Fn(&str) -> Option<String>, args: &[String]) -> Result<Self, BootError> {
        let on_error = match env("GPU_INIT_ON_ERROR").as_deref() {
            None | Some("") | Some("poweroff") => OnError::Poweroff,
            Some("shell") => OnError::Shell,
            Some(other) => {
                return Err(BootError::BadSetting {
                    name: "GPU_INIT_ON_ERROR",
                    value: other.to_string(),
                    hint: "use poweroff or shell",
                });
            }
        };
        let has_gpu = match env("HAS_GPU").as_deref() {
            None | Some("") | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(BootError::BadSetting {
                    name: "HAS_GPU",
                    value: other.to_string(),
                    hint: "use 1 or 0",
                });
            }
        };
        Ok(Self {
            has_gpu,
            root: env("GPU_INIT_ROOT").filter(|r| !r.is_empty()),
            rootfstype: env("GPU_INIT_ROOTFSTYPE").filter(|r| !r.is_empty()),
            on_error,
            strict: env("GPU_INIT_STRICT").as_deref() == Some("1"),
            gpu_disk: env(gpu_passthrough_guest_contract::disk::KERNEL_WORD),
            gpu_disk_verity: env(gpu_passthrough_guest_contract::disk::VERITY_WORD),
            command: args.iter().skip(1).cloned().collect(),
        })
    }
}

fn sys(step: impl Into<String>) -> impl FnOnce(Errno) -> BootError {
    let step = step.into();
    move |errno| BootError::Sys { step, errno }
}

/// Mount procfs, sysfs and devtmpfs; an already mounted one is fine.
pub fn mount_basics() -> Result<(), BootError> {
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let _ = std::fs::create_dir_all(target);
        match mount(
            Some(fstype),
            target,
            Some(fstype),
            MsFlags::MS_NOSUID,
            None::<&str>,
        ) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => return Err(sys(format!("mount {fstype} on {target}"))(e)),
        }
    }
    Ok(())
}

/// Make the root ready to switch into; returns its path in the initramfs (`/` for none).
pub fn prepare_root(config: &BootConfig) -> Result<PathBuf, BootError> {
    let Some(root) = config.root.as_deref() else {
        return Ok(PathBuf::from("/"));
    };
    let err = |reason: String| BootError::Root {
        root: root.to_string(),
        reason,
    };
    if root.starts_with("/dev/") {
        let deadline = Instant::now() + ROOT_WAIT;
        while !Path::new(root).exists() {
            if Instant::now() > deadline {
                return Err(err(format!(
                    "the device did not appear within {}s: is its driver built into the kernel or \
                     loaded by the base layer (virtio_blk is a module on Debian kernels)?",
                    ROOT_WAIT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::create_dir_all(NEWROOT);
        let types = match &config.rootfstype {
            Some(t) => vec![t.clone()],
            None => std::fs::read_to_string("/proc/filesystems")
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.starts_with("nodev"))
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect(),
        };
        let mut tried = Vec::new();
        for fstype in &types {
            match mount(
                Some(root),
                NEWROOT,
                Some(fstype.as_str()),
                MsFlags::empty(),
                None::<&str>,
            ) {
                Ok(()) => return Ok(PathBuf::from(NEWROOT)),
                Err(e) => tried.push(format!("{fstype}: {e}")),
            }
        }
        return Err(err(format!(
            "cannot mount it ({}): set GPU_INIT_ROOTFSTYPE and make sure that filesystem's driver is \
             built in",
            tried.join("; ")
        )));
    }
    let dir = PathBuf::from(root);
    if !dir.is_dir() {
        return Err(err(
            "is neither a /dev/ block device nor a directory in the initramfs".into(),
        ));
    }
    // switch_root moves a mount: make the directory one.
    mount(
        Some(&dir),
        &dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("bind-mount {root} on itself")))?;
    Ok(dir)
}

/// Move `/dev`, `/proc`, `/sys` into `root`, make it `/` and enter it. The initramfs (and so
/// `/gpu`) is not deleted: the bind mount of the GPU layer inside the root still needs it.
pub fn switch_root(root: &Path) -> Result<(), BootError> {
    for dir in ["/dev", "/proc", "/sys"] {
        let target = root.join(dir.trim_start_matches('/'));
        if target.is_dir() || std::fs::create_dir_all(&target).is_ok() {
            mount(
                Some(dir),
                &target,
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(sys(format!("move {dir} into {}", root.display())))?;
        }
    }
    nix::unistd::chdir(root).map_err(sys(format!("chdir {}", root.display())))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys(format!("move {} to /", root.display())))?;
    nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(sys("chdir /"))?;
    // Anything the kernel did not let us move (missing directory) is mounted fresh.
    mount_basics()
}

/// The workload command: the configured one, else `/sbin/init`, else `/bin/sh`.
pub fn workload(config: &BootConfig) -> Vec<String> {
    if !config.command.is_empty() {
        return config.command.clone();
    }
    if Path::new("/sbin/init").exists() {
        vec!["/sbin/init".into()]
    } else {
        vec!["/bin/sh".into()]
    }
}

/// An init system must itself be PID 1; everything else runs as our child.
fn is_init_system(program: &str) -> bool {
    program == "/sbin/init" || program.ends_with("/systemd") || program.ends_with("/init")
}

/// Run the workload with `env` added to init's environment; returns its exit code when it ran
/// as our child.
pub fn run_workload(
    command: &[String],
    env: &std::collections::BTreeMap<String, String>,
) -> Result<i32, BootError> {
    let Some((program, args)) = command.split_first() else {
        return Ok(0);
    };
    let mut cmd = Command::new(program);
    cmd.args(args).envs(env);
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    let exec_err = |source| BootError::Exec {
        command: program.clone(),
        source,
    };
    if is_init_system(program) {
        return Err(exec_err(cmd.exec()));
    }
    let child = cmd.spawn().map_err(exec_err)?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // As PID 1 we inherit every orphan: reap them all until the workload itself exits.
    loop {
        use nix::sys::wait::{WaitStatus, waitpid};
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p == pid => return Ok(code),
            Ok(WaitStatus::Signaled(p, sig, _)) if p == pid => return Ok(128 + sig as i32),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(sys("wait for the workload")(e)),
        }
    }
}

/// Flush and power off. Only returns if the kernel refuses (not PID 1, no privilege).
pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
}

fn print_report(report: &Report) {
    use std::io::Write;
    // One write call for the whole line, so console output of others does not split it.
    let _ = std::io::stdout()
        .lock()
        .write_all(format!("{}\n", report.line()).as_bytes());
}

/// The whole PID 1 life. Never returns normally: it powers off or execs.
pub fn pid1(args: &[String]) -> ! {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("gpu-init: fatal: internal error: {info}; powering off");
        power_off();
    }));
    let config = BootConfig::parse(|k| std::env::var(k).ok(), args);
    let on_error = config
        .as_ref()
        .map(|c| c.on_error)
        .unwrap_or(OnError::Poweroff);
    let outcome = config.and_then(|c| boot(&c));
    match outcome {
        Ok(code) => eprintln!("gpu-init: workload exited with status {code}; powering off"),
        Err(e) => {
            eprintln!("gpu-init: fatal: {e}");
            if on_error == OnError::Shell {
                eprintln!("gpu-init: GPU_INIT_ON_ERROR=shell: starting /bin/sh");
                let e = Command::new("/bin/sh").exec();
                eprintln!("gpu-init: cannot start /bin/sh: {e}");
            }
            eprintln!("gpu-init: powering off");
        }
    }
    power_off();
    // reboot(2) failed: exiting makes the kernel panic, which with panic=-1 also ends the guest.
    std::process::exit(1)
}

fn boot(config: &BootConfig) -> Result<i32, BootError> {
    mount_basics()?;
    // The image first: its modules include virtio_blk, which a block-device root needs too.
    let disk = config
        .gpu_disk
        .as_deref()
        .filter(|_| config.has_gpu)
        .map(|value| {
            let words = disk::DiskWords {
                device: value,
                verity: config.gpu_disk_verity.as_deref(),
            };
            let mounted = disk::mount_payload(
                words,
                Path::new("/"),
                &FinitModule,
                &disk::ErofsMount,
                &crate::dm::KernelDm,
                disk::DEVICE_WAIT,
            );
            (value, mounted)
        });
    // A bad root is fatal, but the GPU report still comes first: the harness always gets its line.
    let prepared = prepare_root(config);
    // Opened before the setup, so faults of the setup itself are reported too.
    let xid_log = config
        .has_gpu
        .then(|| crate::xid_watch::open(Path::new("/dev/kmsg")))
        .flatten();
    let report = if config.has_gpu {
        let ctx = SetupContext::system(
            PathBuf::from(MANIFEST_PATH),
            prepared.as_ref().ok().cloned(),
        );
        match disk {
            Some((value, Err(e))) => disk::failed_report(ctx.kernel_release.clone(), value, &e),
            Some((_, Ok(mounted))) => {
                let mut report = setup::run(&ctx, &FinitModule);
                report.payload = Some(mounted.payload);
                report.problems.extend(mounted.problems);
                crate::report::finish_status(&mut report);
                report
            }
            None => {
                let mut report = setup::run(&ctx, &FinitModule);
                report.payload = Some(PayloadReport::new(PayloadSource::Initramfs));
                report
            }
        }
    } else {
        setup::skipped(crate::context::running_kernel())
    };
    print_report(&report);
    if let Some(log) = xid_log {
        crate::xid_watch::spawn(log);
    }
    let root = prepared?;
    if config.strict
        && config.has_gpu
        && report.status != gpu_passthrough_guest_contract::report::Status::Ok
    {
        return Err(BootError::Root {
            root: root.display().to_string(),
            reason: format!(
                "GPU_INIT_STRICT=1 and the GPU setup is {:?}: see the GPU-INIT report",
                report.status
            ),
        });
    }
    if root != Path::new("/") {
        switch_root(&root)?;
    }
    // The toolkit's variables as the setup settled them (the kernel gave us the rest already).
    run_workload(&workload(config), &report.environment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)], args: &[&str]) -> Result<BootConfig, BootError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        BootConfig::parse(|k| vars.get(k).cloned(), &args)
    }

    #[test]
    fn reads_the_kernel_command_line_settings() {
        let c = parse(
            &[
                ("HAS_GPU", "1"),
                ("GPU_INIT_ROOT", "/dev/vda"),
                ("GPU_INIT_ON_ERROR", "shell"),
                ("GPU_DISK", "pmem"),
            ],
            &["/init", "/bin/sh", "-c", "nvidia-smi"],
        )
        .unwrap();
        assert!(c.has_gpu);
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.on_error, OnError::Shell);
        assert_eq!(c.gpu_disk.as_deref(), Some("pmem"));
        assert_eq!(c.command, ["/bin/sh", "-c", "nvidia-smi"]);
        let d = parse(&[], &["/init"]).unwrap();
        assert!(!d.has_gpu && d.root.is_none() && d.command.is_empty() && d.gpu_disk.is_none());
        assert_eq!(d.on_error, OnError::Poweroff);
    }

    #[test]
    fn rejects_bad_values_naming_the_setting() {
        let e = parse(&[("HAS_GPU", "yes")], &["/init"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("HAS_GPU=yes") && e.contains("1 or 0"), "{e}");
        let e = parse(&[("GPU_INIT_ON_ERROR", "reboot")], &["/init"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("poweroff or shell"), "{e}");
    }

    #[test]
    fn init_systems_are_execed_other_workloads_are_children() {
        assert!(is_init_system("/sbin/init"));
        assert!(is_init_system("/lib/systemd/systemd"));
        assert!(!is_init_system("/bin/sh"));
        assert!(!is_init_system("/usr/bin/nvidia-smi"));
    }
}
