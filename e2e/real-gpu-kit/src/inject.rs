//! Library injection on the real driver: a GPU layer made from the installed driver's libraries
//! and `nvidia-smi`, `gpu-init setup --no-load` into a scratch Debian-like root (the host's glibc
//! and ldconfig), then `ldconfig -p`, `nvidia-smi -L` and a CUDA probe chrooted in that root.
//! Everything happens on a tmpfs in a private mount namespace: nothing outlives the run.

use crate::CheckResult;
use crate::facts::GpuFact;
use crate::probe::Probe;
use gpu_passthrough_guest_contract::{DeviceNodes, Library, Manifest, Module, SCHEMA};
use nix::mount::{MsFlags, mount};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Sonames of the driver's compute libraries; the first two are required.
pub const SONAMES: &[&str] = &[
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4",
    "libcudadebugger.so.1",
];

/// The host's glibc pieces a dynamically linked program needs.
const GLIBC: &[&str] = &[
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
];

/// `(soname, path)` of the x86-64 entries of `ldconfig -p` output.
pub fn ldconfig_entries(text: &str) -> Vec<(String, PathBuf)> {
    text.lines()
        .filter_map(|l| {
            let (left, path) = l.split_once(" => ")?;
            let soname = left.split_whitespace().next()?;
            (left.contains("x86-64") || !left.contains('('))
                .then(|| (soname.to_string(), PathBuf::from(path.trim())))
        })
        .collect()
}

/// GPU names from `nvidia-smi -L` (`GPU 0: NAME (UUID: ...)`).
pub fn smi_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("GPU ")?.split_once(": ")?.1;
            Some(
                rest.rsplit_once(" (UUID")
                    .map_or(rest, |(n, _)| n)
                    .trim()
                    .to_string(),
            )
        })
        .collect()
}

/// A path inside `root`, resolving symlinks as the chrooted loader would (absolute targets
/// relative to `root`), up to 16 hops.
pub fn resolve_in_root(root: &Path, path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..16 {
        let host = root.join(p.strip_prefix("/").unwrap_or(&p));
        match std::fs::read_link(&host) {
            Ok(t) if t.is_absolute() => p = t,
            Ok(t) => p = p.parent().unwrap_or(Path::new("/")).join(t),
            Err(_) => return p,
        }
    }
    p
}

fn chrooted(root: &Path, program: &str, args: &[&str]) -> std::io::Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin");
    let root = root.to_path_buf();
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec the closure only calls chroot and chdir on prepared data.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::chroot(&root)?;
            nix::unistd::chdir("/")?;
            Ok(())
        });
    }
    cmd.output()
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))
}

/// Enter a private mount namespace and put a tmpfs on `scratch`.
pub fn private_scratch(scratch: &Path) -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("unshare(CLONE_NEWNS): {e} (the kit needs root)"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make / private: {e}"))?;
    std::fs::create_dir_all(scratch).map_err(|e| format!("mkdir {}: {e}", scratch.display()))?;
    mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| format!("tmpfs on {}: {e}", scratch.display()))
}

/// Detach the scratch tmpfs (and the binds under it) and remove its mount point.
pub fn drop_scratch(scratch: &Path) {
    let _ = nix::mount::umount2(scratch, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(scratch);
}

/// What the injection check needs from outside.
pub struct Inputs<'a> {
    /// The loaded driver's version.
    pub driver_version: &'a str,
    /// The GPUs.
    pub gpus: &'a [GpuFact],
    /// Output of the host's `ldconfig -p`.
    pub ldconfig_p: &'a str,
    /// The installed `nvidia-smi`.
    pub nvidia_smi: Option<PathBuf>,
    /// The host's `ldconfig` (an ELF).
    pub ldconfig: PathBuf,
    /// The `gpu-init` to run.
    pub gpu_init: PathBuf,
    /// This kit's binary (copied into the root as the CUDA probe).
    pub probe: PathBuf,
    /// Scratch directory (already a private tmpfs).
    pub scratch: PathBuf,
}

/// Build the layer and root and run the setup. Returns the check and the setup's stdout.
pub fn run(i: &Inputs<'_>) -> (CheckResult, String) {
    let mut fail = Vec::new();
    let mut notes = Vec::new();
    let mut facts = json!({});
    let setup = match prepare_and_setup(i, &mut notes, &mut facts) {
        Ok(out) => out,
        Err(e) => {
            fail.push(e);
            return (
                CheckResult::from_findings("libraries", fail, notes, facts),
                String::new(),
            );
        }
    };
    let root = i.scratch.join("root");
    // ldconfig -p inside the root resolves libcuda.so.1 to the installed version.
    match chrooted(&root, "/usr/sbin/ldconfig", &["-p"]) {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let want = format!("libcuda.so.{}", i.driver_version);
            match ldconfig_entries(&text)
                .into_iter()
                .find(|(s, _)| s == "libcuda.so.1")
            {
                Some((_, p)) => {
                    let real = resolve_in_root(&root, &p);
                    if real.file_name().and_then(|n| n.to_str()) != Some(want.as_str()) {
                        fail.push(format!(
                            "in the root, libcuda.so.1 => {} resolves to {}, not {want}",
                            p.display(),
                            real.display()
                        ));
                    } else {
                        notes.push(format!(
                            "ldconfig -p: libcuda.so.1 => {} ({want})",
                            p.display()
                        ));
                    }
                }
                None => fail.push(format!(
                    "ldconfig -p in the root has no libcuda.so.1:\n{text}"
                )),
            }
        }
        Err(e) => fail.push(format!("cannot run ldconfig -p in the root: {e}")),
    }
    // nvidia-smi -L lists the GPUs.
    match chrooted(&root, "/usr/local/bin/nvidia-smi", &["-L"]) {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let names = smi_names(&text);
            facts["nvidia_smi"] = json!(text);
            if !out.status.success() || names.len() != i.gpus.len() {
                fail.push(format!(
                    "nvidia-smi -L in the root listed {} GPUs (want {}), exit {:?}: {} {}",
                    names.len(),
                    i.gpus.len(),
                    out.status.code(),
                    text.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            } else {
                notes.push(format!("nvidia-smi -L: {}", names.join(", ")));
            }
        }
        Err(e) => fail.push(format!("cannot run nvidia-smi in the root: {e}")),
    }
    // The CUDA driver API sees the devices.
    match chrooted(&root, "/usr/bin/real-gpu-probe", &["cuda-probe"]) {
        Ok(out) => match serde_json::from_slice::<Probe>(&out.stdout) {
            Ok(p) => {
                facts["cuda"] = json!(p);
                if p.init != Some(0) || p.count < 1 || p.names.len() != p.count as usize {
                    fail.push(format!("CUDA probe in the root: {p:?}"));
                } else {
                    notes.push(format!(
                        "CUDA: {} device(s): {}",
                        p.count,
                        p.names.join(", ")
                    ));
                }
            }
            Err(e) => fail.push(format!(
                "CUDA probe output does not parse ({e}): {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        },
        Err(e) => fail.push(format!("cannot run the CUDA probe in the root: {e}")),
    }
    (
        CheckResult::from_findings("libraries", fail, notes, facts),
        setup,
    )
}

fn prepare_and_setup(
    i: &Inputs<'_>,
    notes: &mut Vec<String>,
    facts: &mut serde_json::Value,
) -> Result<String, String> {
    let layer = i.scratch.join("layer");
    let root = i.scratch.join("root");
    let gpu = layer.join("gpu");
    // The driver's libraries as the system's loader finds them.
    let entries = ldconfig_entries(i.ldconfig_p);
    let mut libraries = Vec::new();
    for soname in SONAMES {
        let Some((_, path)) = entries.iter().find(|(s, _)| s == soname) else {
            if libraries.len() < 2 {
                return Err(format!(
                    "the system's loader cache has no {soname}: is the driver's userspace installed?"
                ));
            }
            continue;
        };
        let real = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let name = real
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.ends_with(&format!(".so.{}", i.driver_version)) {
            return Err(format!(
                "{soname} resolves to {}, not the loaded driver {}: driver and libraries differ",
                real.display(),
                i.driver_version
            ));
        }
        copy(&real, &gpu.join("lib").join(&name))?;
        std::os::unix::fs::symlink(&name, gpu.join("lib").join(soname))
            .map_err(|e| format!("symlink {soname}: {e}"))?;
        libraries.push(Library {
            path: format!("/gpu/lib/{name}"),
            soname: Some(soname.to_string()),
        });
    }
    let mut binaries = Vec::new();
    if let Some(smi) = &i.nvidia_smi {
        copy(smi, &gpu.join("bin/nvidia-smi"))?;
        binaries.push("/gpu/bin/nvidia-smi".to_string());
    }
    // Modules that are loaded here: reported already loaded, never loaded.
    let modules: Vec<Module> = ["nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"]
        .iter()
        .filter(|m| Path::new("/sys/module").join(m).is_dir())
        .map(|m| Module {
            name: m.to_string(),
            path: format!("/gpu/modules/{}.ko", m.replace('_', "-")),
            params: String::new(),
            depends: Vec::new(),
            vermagic: String::new(),
            nvidia: true,
        })
        .collect();
    let manifest = Manifest {
        schema: SCHEMA,
        release: "real-gpu-kit".into(),
        arch: std::env::consts::ARCH.into(),
        kernel_version: String::new(),
        driver_version: i.driver_version.into(),
        module_flavor: "open".into(),
        modules,
        firmware: Vec::new(),
        libraries: libraries.clone(),
        binaries,
        device_nodes: DeviceNodes {
            mode: 0o666,
            gid: 0,
        },
        inputs: Vec::new(),
        capabilities: Default::default(),
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(gpu.join("manifest.json"), text).map_err(|e| format!("manifest: {e}"))?;
    facts["libraries"] = json!(libraries);

    // A Debian-like root: the host's glibc, its ldconfig, the probe.
    let libc_dir = entries
        .iter()
        .find(|(s, _)| s == "libc.so.6")
        .and_then(|(_, p)| std::fs::canonicalize(p).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or("the loader cache has no libc.so.6")?;
    let multiarch = root.join("usr/lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&multiarch).map_err(|e| e.to_string())?;
    for lib in GLIBC {
        let from = libc_dir.join(lib);
        if from.exists() {
            copy(&from, &multiarch.join(lib))?;
        }
    }
    copy(
        &libc_dir.join("ld-linux-x86-64.so.2"),
        &root.join("lib64/ld-linux-x86-64.so.2"),
    )?;
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).map_err(|e| e.to_string())?;
    copy(&i.ldconfig, &root.join("usr/sbin/ldconfig"))?;
    std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).map_err(|e| e.to_string())?;
    copy(&i.probe, &root.join("usr/bin/real-gpu-probe"))?;
    std::fs::create_dir_all(root.join("etc/ld.so.conf.d")).map_err(|e| e.to_string())?;
    std::fs::write(
        root.join("etc/ld.so.conf"),
        "include /etc/ld.so.conf.d/*.conf\n",
    )
    .map_err(|e| e.to_string())?;
    for d in ["dev", "proc", "sys", "tmp", "usr/local/bin"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| e.to_string())?;
    }
    for (name, minor) in [("null", 3), ("zero", 5), ("urandom", 9)] {
        nix::sys::stat::mknod(
            &root.join("dev").join(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, minor),
        )
        .map_err(|e| format!("mknod /dev/{name}: {e}"))?;
    }
    for d in ["proc", "sys"] {
        mount(
            Some(Path::new("/").join(d).as_path()),
            &root.join(d),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("bind /{d} into the root: {e}"))?;
    }
    // The setup: nodes into the root's /dev only, nothing loaded.
    let out = Command::new(&i.gpu_init)
        .arg("setup")
        .arg("--root")
        .arg(&root)
        .arg("--manifest")
        .arg(gpu.join("manifest.json"))
        .arg("--layer-root")
        .arg(&layer)
        .arg("--dev-dir")
        .arg(root.join("dev"))
        .arg("--no-load")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", i.gpu_init.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    notes.push(format!("gpu-init setup exit {:?}", out.status.code()));
    Ok(stdout)
}
