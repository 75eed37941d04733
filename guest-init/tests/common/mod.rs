//! A fake guest for the setup tests: GPU layer, fake /proc and /sys, device dir, kernel log and a
//! workload root in a temp dir, inside a private mount namespace so no mount reaches the host.
#![allow(dead_code)]

use gpu_passthrough_init::context::SetupContext;
use gpu_passthrough_init::modules::{LoadError, ModuleLoader};
use gpu_passthrough_guest_contract::{DeviceNodes, Library, Manifest, Module, SCHEMA};
use gpu_passthrough_tests::fixtures;
use nix::errno::Errno;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const DRIVER: &str = fixtures::DRIVER_VERSION;
pub const VERMAGIC: &str = "6.1.0-56-amd64 SMP preempt mod_unload modversions ";

/// Real driver libraries (ELF with the right sonames), extracted once into cargo's test temp dir.
pub fn real_libs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = base.join("gpu-init-driver-libs");
        if dir
            .join("usr/lib/nvidia/libnvidia-ml.so.535.261.03")
            .is_file()
        {
            return dir.join("usr/lib/nvidia");
        }
        // Extract beside it and rename, so concurrent test binaries never see half a file.
        let partial = base.join(format!("gpu-init-driver-libs.{}", std::process::id()));
        std::fs::create_dir_all(&partial).unwrap();
        let libs_tar = fixtures::path(fixtures::NVIDIA_DRIVER_LIBS);
        let status = Command::new("tar")
            .arg("xzf")
            .arg(&libs_tar)
            .arg("-C")
            .arg(&partial)
            .args([
                "usr/lib/nvidia/libcuda.so.535.261.03",
                "usr/lib/nvidia/libnvidia-ml.so.535.261.03",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "extracting {} failed", libs_tar.display());
        if std::fs::rename(&partial, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&partial); // another process won the race
        }
        dir.join("usr/lib/nvidia")
    })
}

/// A temp dir on the same filesystem as [`real_libs`], so libraries are hard-linked, not copied.
fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Enter a private mount namespace for this test thread (tests run one per thread).
fn private_mount_namespace() {
    // Affects only the calling thread's namespaces.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// Debian-like: multiarch lib dir, static glibc ldconfig from the host.
    Debian,
    /// Alpine-like: /usr/lib, ld-musl, ldconfig is a no-op shell script.
    Musl,
}

pub struct Guest {
    pub tmp: tempfile::TempDir,
    pub layer: PathBuf,
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
    pub dev: PathBuf,
    pub kmsg: PathBuf,
    pub root: PathBuf,
    pub manifest: Manifest,
}

fn module(name: &str, file: &str, depends: &[&str], params: &str) -> Module {
    Module {
        name: name.into(),
        path: format!("/gpu/modules/{file}"),
        params: params.into(),
        depends: depends.iter().map(|d| d.to_string()).collect(),
        vermagic: VERMAGIC.into(),
        nvidia: true,
    }
}

pub fn manifest() -> Manifest {
    Manifest {
        schema: SCHEMA,
        release: "debian-6.1.0-56-nvidia-535".into(),
        arch: "x86_64".into(),
        kernel_version: "6.1.0-56-amd64".into(),
        driver_version: DRIVER.into(),
        module_flavor: "open".into(),
        modules: vec![
            module("nvidia", "nvidia.ko", &["drm"], "NVreg_DeviceFileMode=0660"),
            module("nvidia_uvm", "nvidia-uvm.ko", &["nvidia"], ""),
            module(
                "nvidia_modeset",
                "nvidia-modeset.ko",
                &["nvidia", "video"],
                "",
            ),
            module(
                "nvidia_drm",
                "nvidia-drm.ko",
                &["drm", "nvidia-modeset"],
                "modeset=1",
            ),
        ],
        firmware: vec![
            format!("/gpu/firmware/nvidia/{DRIVER}/gsp_ga10x.bin"),
            format!("/gpu/firmware/nvidia/{DRIVER}/gsp_tu10x.bin"),
        ],
        libraries: vec![
            Library {
                path: format!("/gpu/lib/libcuda.so.{DRIVER}"),
                soname: Some("libcuda.so.1".into()),
            },
            Library {
                path: format!("/gpu/lib/libnvidia-ml.so.{DRIVER}"),
                soname: Some("libnvidia-ml.so.1".into()),
            },
        ],
        binaries: vec!["/gpu/bin/nvidia-smi".into()],
        device_nodes: DeviceNodes {
            mode: 0o660,
            gid: 44,
        },
        inputs: vec![],
        capabilities: Default::default(),
    }
}

/// The driver's `/proc/driver/nvidia/gpus/<bus>/information` of a GPU with this device minor.
pub fn gpu_information(minor: u32) -> String {
    format!(
        "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\nGPU UUID: \t GPU-00000000-0000-0000-0000-00000000000{minor}\nBus Type: \t PCIe\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n"
    )
}

pub fn write(path: &Path, content: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

impl Guest {
    /// A guest whose driver registers (when loaded) with `gpus` GPUs.
    pub fn new(kind: RootKind, gpus: u32) -> Self {
        private_mount_namespace();
        let tmp = temp_dir();
        let t = tmp.path();
        let (layer, proc_root, sys_root, dev, root) = (
            t.join("layer"),
            t.join("proc"),
            t.join("sys"),
            t.join("dev"),
            t.join("root"),
        );
        let manifest = manifest();
        let gpu = layer.join("gpu");
        write(
            &gpu.join("manifest.json"),
            serde_json::to_string(&manifest).unwrap(),
        );
        for m in &manifest.modules {
            write(
                &layer.join(m.path.trim_start_matches('/')),
                b"\x7fELF fake module",
            );
        }
        for fw in &manifest.firmware {
            write(&layer.join(fw.trim_start_matches('/')), b"gsp");
        }
        let libs = real_libs();
        std::fs::create_dir_all(gpu.join("lib")).unwrap();
        for lib in &manifest.libraries {
            let name = Path::new(&lib.path).file_name().unwrap();
            let dst = gpu.join("lib").join(name);
            if std::fs::hard_link(libs.join(name), &dst).is_err() {
                std::fs::copy(libs.join(name), &dst).unwrap();
            }
            std::os::unix::fs::symlink(name, gpu.join("lib").join(lib.soname.as_ref().unwrap()))
                .unwrap();
        }
        write(&gpu.join("bin/nvidia-smi"), b"#!/bin/sh\n");
        write(
            &proc_root.join("devices"),
            "Character devices:\n  1 mem\n  5 /dev/tty\n195 nvidia-frontend\n236 nvidia-uvm\n\nBlock devices:\n  8 sd\n",
        );
        let gpus_dir = proc_root.join("driver/nvidia/gpus");
        std::fs::create_dir_all(&gpus_dir).unwrap();
        for i in 0..gpus {
            let gpu = gpus_dir.join(format!("0000:00:{:02x}.0", 5 + i));
            std::fs::create_dir(&gpu).unwrap();
            write(&gpu.join("information"), gpu_information(i));
        }
        write(&sys_root.join("module/firmware_class/parameters/path"), "");
        std::fs::create_dir_all(&dev).unwrap();
        let kmsg = t.join("kmsg");
        write(&kmsg, "6,1,100,-;Linux version 6.1.0-56-amd64\n");
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        match kind {
            RootKind::Debian => {
                std::fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
                std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
                std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
                std::fs::copy("/sbin/ldconfig", root.join("usr/sbin/ldconfig")).unwrap();
                write(
                    &root.join("etc/ld.so.conf"),
                    "include /etc/ld.so.conf.d/*.conf\n",
                );
            }
            RootKind::Musl => {
                write(&root.join("lib/ld-musl-x86_64.so.1"), b"\x7fELF musl");
                std::fs::create_dir_all(root.join("usr/lib")).unwrap();
                write(&root.join("sbin/ldconfig"), "#!/bin/sh\nexit 0\n");
            }
        }
        Guest {
            tmp,
            layer,
            proc_root,
            sys_root,
            dev,
            kmsg,
            root,
            manifest,
        }
    }

    pub fn context(&self) -> SetupContext {
        SetupContext {
            manifest: self.layer.join("gpu/manifest.json"),
            layer_root: self.layer.clone(),
            proc_root: self.proc_root.clone(),
            sys_root: self.sys_root.clone(),
            dev_dir: self.dev.clone(),
            kmsg: self.kmsg.clone(),
            root: Some(self.root.clone()),
            kernel_release: "6.1.0-56-amd64".into(),
            env: gpu_passthrough_init::env::GuestEnv::default(),
        }
    }

    /// Pretend the NVIDIA driver never registered (it failed to load).
    pub fn unregister_driver(&self) {
        write(
            &self.proc_root.join("devices"),
            "Character devices:\n  1 mem\n\nBlock devices:\n",
        );
        std::fs::remove_dir_all(self.proc_root.join("driver")).unwrap();
    }

    /// Mount points under this guest's temp dir, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let base = self.tmp.path();
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        points
    }

    /// Detach every mount the setup made, so the temp dir can be removed and the files under the
    /// mounts inspected.
    pub fn unmount_all(&self) {
        for p in self.mounts() {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// Run a program chrooted in the workload root; returns stdout.
    pub fn in_root(&self, program: &str, args: &[&str]) -> String {
        let mut cmd = Command::new(program);
        cmd.args(args);
        gpu_passthrough_init::sys::chroot_command(&mut cmd, &self.root);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// What the fake kernel does with one module file.
#[derive(Clone)]
pub enum Outcome {
    Load,
    Fail(Errno),
    /// Fail and write this line to the kernel log first.
    FailWithLog(Errno, String),
}

/// A `ModuleLoader` that returns chosen outcomes and records every call.
pub struct FakeKernel {
    pub kmsg: PathBuf,
    pub outcomes: HashMap<String, Outcome>,
    pub calls: RefCell<Vec<(String, String)>>,
}

impl FakeKernel {
    pub fn new(guest: &Guest) -> Self {
        Self {
            kmsg: guest.kmsg.clone(),
            outcomes: HashMap::new(),
            calls: RefCell::new(Vec::new()),
        }
    }

    pub fn with(mut self, file: &str, outcome: Outcome) -> Self {
        self.outcomes.insert(file.into(), outcome);
        self
    }

    pub fn loaded_files(&self) -> Vec<String> {
        self.calls.borrow().iter().map(|(f, _)| f.clone()).collect()
    }
}

impl ModuleLoader for FakeKernel {
    fn load(&self, path: &Path, params: &str) -> Result<(), LoadError> {
        // Like finit_module's caller, open the file first.
        std::fs::File::open(path).map_err(|source| LoadError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        self.calls
            .borrow_mut()
            .push((file.clone(), params.to_string()));
        match self.outcomes.get(&file).cloned().unwrap_or(Outcome::Load) {
            Outcome::Load => Ok(()),
            Outcome::Fail(e) => Err(LoadError::Kernel(e)),
            Outcome::FailWithLog(e, line) => {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&self.kmsg)
                    .unwrap();
                std::io::Write::write_all(&mut f, format!("3,7,900,-;{line}\n").as_bytes())
                    .unwrap();
                Err(LoadError::Kernel(e))
            }
        }
    }
}

/// The build command documented in guest-init/README.md.
pub fn build_static() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "-p",
            "gpu-passthrough-init",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "static build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    target.join("x86_64-unknown-linux-gnu/release/gpu-init")
}
