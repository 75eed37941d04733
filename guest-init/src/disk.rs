//! The GPU payload from a read-only disk image (`GPU_DISK=pmem` or `GPU_DISK=/dev/vdX`).
//!
//! The host built the payload as an erofs image and a base layer carrying the modules needed to
//! mount it (`/gpu-disk/<name>.ko`, in load order in `/gpu-disk/order`). Before the
//! setup, init loads them, waits for the device and mounts the image read-only at `/gpu`; on
//! virtio-pmem with DAX, so reads map the host's page cache instead of filling guest RAM. From
//! there on the setup cannot tell the image from the initramfs layer.

use crate::context::in_root;
use crate::modules::{LoadError, ModuleLoader};
use gpu_passthrough_guest_contract::disk::{KERNEL_WORD, MODULE_DIR, ORDER_FILE, PMEM};
use gpu_passthrough_guest_contract::report::{
    PayloadReport, PayloadSource, Report, ReportError, SetupErrorClass,
};
use nix::errno::Errno;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the image is mounted: the layer's root, as the manifest's paths expect.
pub const MOUNTPOINT: &str = "/gpu";
/// The block device of the first virtio-pmem region.
pub const PMEM_DEVICE: &str = "/dev/pmem0";
/// How long to wait for the device after its driver loaded (probing is asynchronous).
pub const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Why the image could not be mounted. Each is the report's `gpu_disk` error.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `GPU_DISK` is neither `pmem` nor a `/dev/` path.
    #[error(
        "{KERNEL_WORD}={value} is not valid: use {KERNEL_WORD}=pmem (virtio-pmem) or a block device such as {KERNEL_WORD}=/dev/vdb (virtio-blk)"
    )]
    BadValue {
        /// The value given.
        value: String,
    },
    /// The base layer lists no mount modules.
    #[error(
        "{KERNEL_WORD} is set but {ORDER_FILE} cannot be read: the base layer was not built for a \
         disk payload; append the base layer built with the disk form (`initrd build --form disk`)"
    )]
    NoModuleList {
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// A mount module would not load.
    #[error(
        "loading the disk mount module {module} from the base layer (it must be built for this \
         guest kernel: rebuild the layers for the release this guest boots)"
    )]
    ModuleLoad {
        /// The module file name.
        module: String,
        /// What the kernel said.
        #[source]
        source: LoadError,
    },
    /// The device did not show up.
    #[error(
        "{KERNEL_WORD}={value}: {device} did not appear within {}s: attach the image (QEMU: \
         memory-backend-file + virtio-pmem-pci, or a read-only virtio drive; Cloud Hypervisor: \
         --pmem or --disk readonly=on) or correct {KERNEL_WORD}",
        waited.as_secs()
    )]
    NoDevice {
        /// The `GPU_DISK` value.
        value: String,
        /// The device waited for.
        device: String,
        /// How long.
        waited: Duration,
    },
    /// The mount itself failed.
    #[error(
        "mounting {device} (erofs, read-only) on {MOUNTPOINT}: {errno}: is it the image built by \
         `initrd build --form disk` for this release?"
    )]
    Mount {
        /// The device.
        device: String,
        /// The mount error.
        errno: Errno,
    },
}

/// The device `GPU_DISK` names and whether it is the pmem kind.
fn device_for(value: &str) -> Result<(PathBuf, PayloadSource), DiskError> {
    if value == PMEM {
        return Ok((PathBuf::from(PMEM_DEVICE), PayloadSource::Pmem));
    }
    let path = Path::new(value);
    let plain = path.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    });
    if value.starts_with("/dev/") && value.len() > "/dev/".len() && plain {
        return Ok((path.to_path_buf(), PayloadSource::VirtioBlk));
    }
    Err(DiskError::BadValue {
        value: value.to_string(),
    })
}

/// Mounts an erofs image read-only: the real `mount(2)`, or a fake in tests.
pub trait ImageMount {
    /// Mount `device` on `target`, read-only, with `-o dax=always` when `dax`.
    fn mount(&self, device: &Path, target: &Path, dax: bool) -> Result<(), Errno>;
}

/// `mount(2)` of an erofs file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct ErofsMount;

impl ImageMount for ErofsMount {
    fn mount(&self, device: &Path, target: &Path, dax: bool) -> Result<(), Errno> {
        nix::mount::mount(
            Some(device),
            target,
            Some("erofs"),
            nix::mount::MsFlags::MS_RDONLY,
            dax.then_some("dax=always"),
        )
    }
}

/// The image mounted: the report's `payload`, and what degrades it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// For the report.
    pub payload: PayloadReport,
    /// Problems found on the way (DAX refused, an initramfs layer hidden under the image).
    pub problems: Vec<String>,
}

/// Load the mount modules listed under `root`, wait up to `wait` for the device `value` names
/// (under `root` too) and mount it read-only at `root/gpu`.
pub fn mount_payload(
    value: &str,
    root: &Path,
    loader: &dyn ModuleLoader,
    mounter: &dyn ImageMount,
    wait: Duration,
) -> Result<Mounted, DiskError> {
    let start = Instant::now();
    let (device, source) = device_for(value)?;
    let available_before = mem_available_kb(root);
    let order = std::fs::read_to_string(in_root(root, ORDER_FILE))
        .map_err(|source| DiskError::NoModuleList { source })?;
    let mut mount_modules = Vec::new();
    for file in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = in_root(root, &format!("{MODULE_DIR}/{file}"));
        match loader.load(&path, "") {
            Ok(()) | Err(LoadError::Kernel(Errno::EEXIST)) => {}
            Err(source) => {
                return Err(DiskError::ModuleLoad {
                    module: file.to_string(),
                    source,
                });
            }
        }
        mount_modules.push(file.trim_end_matches(".ko").to_string());
    }
    let shown = device.display().to_string();
    let device_path = in_root(root, &shown);
    let deadline = Instant::now() + wait;
    while !device_path.exists() {
        if Instant::now() >= deadline {
            return Err(DiskError::NoDevice {
                value: value.to_string(),
                device: shown,
                waited: wait,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut problems = Vec::new();
    let target = in_root(root, MOUNTPOINT);
    if target.join("manifest.json").exists() {
        problems.push(format!(
            "{MOUNTPOINT} already held a GPU initramfs layer; the disk image now hides it, but it \
             still takes guest RAM: append only the base layer with {KERNEL_WORD}"
        ));
    }
    let _ = std::fs::create_dir_all(&target);
    let mount_err = |errno| DiskError::Mount {
        device: shown.clone(),
        errno,
    };
    let mut dax = source == PayloadSource::Pmem;
    match mounter.mount(&device_path, &target, dax) {
        Ok(()) => {}
        // A kernel or device without DAX for erofs still serves the image, through its page cache.
        Err(e @ (Errno::EINVAL | Errno::EOPNOTSUPP)) if dax => {
            mounter
                .mount(&device_path, &target, false)
                .map_err(mount_err)?;
            dax = false;
            problems.push(format!(
                "{shown} was mounted without DAX (dax=always: {e}): the payload is read into guest \
                 page cache"
            ));
        }
        Err(e) => return Err(mount_err(e)),
    }
    Ok(Mounted {
        payload: PayloadReport {
            source,
            device: Some(shown),
            dax,
            mount_modules,
            mount_ms: Some(start.elapsed().as_millis() as u64),
            mount_mem_kb: available_before
                .zip(mem_available_kb(root))
                .map(|(before, after)| before.saturating_sub(after)),
        },
        problems,
    })
}

/// `MemAvailable` of `root/proc/meminfo`, in kB.
fn mem_available_kb(root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(in_root(root, "/proc/meminfo")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The report of a guest whose image could not be mounted: nothing else was attempted.
pub fn failed_report(kernel: String, value: &str, error: &DiskError) -> Report {
    let mut report = Report::new(kernel);
    let mut message = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(c) = cause {
        message.push_str(&format!(": {c}"));
        cause = c.source();
    }
    report.error = Some(ReportError {
        class: SetupErrorClass::GpuDisk,
        message,
    });
    if let Ok((device, source)) = device_for(value) {
        report.payload = Some(PayloadReport {
            device: Some(device.display().to_string()),
            ..PayloadReport::new(source)
        });
    }
    crate::report::finish_status(&mut report);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_passthrough_guest_contract::report::Status;
    use std::cell::RefCell;

    /// Records loads; fails the module named in `refuse`.
    #[derive(Default)]
    struct Loader {
        loaded: RefCell<Vec<String>>,
        refuse: Option<(&'static str, Errno)>,
    }
    impl ModuleLoader for Loader {
        fn load(&self, path: &Path, _: &str) -> Result<(), LoadError> {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !path.is_file() {
                return Err(LoadError::Open {
                    path: name,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            if let Some((bad, errno)) = self.refuse
                && name == bad
            {
                return Err(LoadError::Kernel(errno));
            }
            self.loaded.borrow_mut().push(name);
            Ok(())
        }
    }

    /// Answers mounts with the errnos given, in turn (then success); records each attempt.
    #[derive(Default)]
    struct Mounter {
        answers: RefCell<Vec<Errno>>,
        calls: RefCell<Vec<(PathBuf, bool)>>,
    }
    impl ImageMount for Mounter {
        fn mount(&self, device: &Path, _: &Path, dax: bool) -> Result<(), Errno> {
            self.calls.borrow_mut().push((device.to_path_buf(), dax));
            let mut answers = self.answers.borrow_mut();
            if answers.is_empty() {
                Ok(())
            } else {
                Err(answers.remove(0))
            }
        }
    }

    /// A guest root with the mount modules `virtio_pmem.ko erofs.ko` and, if given, a device.
    fn guest(name: &str, device: Option<&str>) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("gpu-init-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = in_root(&root, MODULE_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        for m in ["virtio_pmem.ko", "erofs.ko"] {
            std::fs::write(dir.join(m), b"\x7fELF").unwrap();
        }
        std::fs::write(in_root(&root, ORDER_FILE), "virtio_pmem.ko\nerofs.ko\n").unwrap();
        std::fs::create_dir_all(in_root(&root, "/proc")).unwrap();
        std::fs::write(
            in_root(&root, "/proc/meminfo"),
            "MemTotal:  1000 kB\nMemAvailable:     800 kB\n",
        )
        .unwrap();
        if let Some(dev) = device {
            let dev = in_root(&root, dev);
            std::fs::create_dir_all(dev.parent().unwrap()).unwrap();
            std::fs::write(dev, b"").unwrap();
        }
        root
    }

    #[test]
    fn pmem_loads_the_modules_in_order_and_mounts_with_dax() {
        let root = guest("pmem", Some(PMEM_DEVICE));
        let (loader, mounter) = (Loader::default(), Mounter::default());
        let m = mount_payload("pmem", &root, &loader, &mounter, DEVICE_WAIT).unwrap();
        assert_eq!(*loader.loaded.borrow(), ["virtio_pmem.ko", "erofs.ko"]);
        assert_eq!(m.payload.source, PayloadSource::Pmem);
        assert_eq!(m.payload.device.as_deref(), Some(PMEM_DEVICE));
        assert!(m.payload.dax && m.problems.is_empty());
        assert_eq!(m.payload.mount_modules, ["virtio_pmem", "erofs"]);
        assert!(m.payload.mount_ms.is_some());
        assert_eq!(m.payload.mount_mem_kb, Some(0), "read before and after");
        assert_eq!(mem_available_kb(&root), Some(800));
        assert_eq!(
            *mounter.calls.borrow(),
            [(in_root(&root, PMEM_DEVICE), true)]
        );
        assert!(in_root(&root, MOUNTPOINT).is_dir());
    }

    #[test]
    fn a_block_device_is_mounted_without_dax() {
        let root = guest("blk", Some("/dev/vdb"));
        let mounter = Mounter::default();
        let m =
            mount_payload("/dev/vdb", &root, &Loader::default(), &mounter, DEVICE_WAIT).unwrap();
        assert_eq!(m.payload.source, PayloadSource::VirtioBlk);
        assert!(!m.payload.dax);
        assert_eq!(
            *mounter.calls.borrow(),
            [(in_root(&root, "/dev/vdb"), false)]
        );
    }

    #[test]
    fn dax_refused_falls_back_to_the_page_cache_and_says_so() {
        let root = guest("nodax", Some(PMEM_DEVICE));
        let mounter = Mounter {
            answers: RefCell::new(vec![Errno::EOPNOTSUPP]),
            ..Mounter::default()
        };
        let m = mount_payload("pmem", &root, &Loader::default(), &mounter, DEVICE_WAIT).unwrap();
        assert!(!m.payload.dax);
        assert_eq!(mounter.calls.borrow().len(), 2);
        assert!(m.problems[0].contains("without DAX"), "{:?}", m.problems);
    }

    #[test]
    fn a_device_that_never_appears_is_a_gpu_disk_error_naming_it() {
        let root = guest("nodev", None);
        let mounter = Mounter::default();
        let wait = Duration::from_millis(120);
        let t = Instant::now();
        let e = mount_payload("/dev/vdz", &root, &Loader::default(), &mounter, wait).unwrap_err();
        assert!(t.elapsed() >= wait);
        assert!(matches!(e, DiskError::NoDevice { .. }), "{e:?}");
        assert!(mounter.calls.borrow().is_empty(), "nothing is mounted");
        let report = failed_report("k".into(), "/dev/vdz", &e);
        assert_eq!(report.status, Status::Failed);
        let error = report.error.unwrap();
        assert_eq!(error.class, SetupErrorClass::GpuDisk);
        assert!(
            error.message.contains("/dev/vdz did not appear") && error.message.contains("--pmem"),
            "{}",
            error.message
        );
        assert_eq!(report.payload.unwrap().source, PayloadSource::VirtioBlk);
    }

    #[test]
    fn bad_values_are_refused_before_anything_loads() {
        let root = guest("bad", None);
        for value in ["", "vdb", "/dev/", "/dev/../etc/passwd", "nvme", "/tmp/x"] {
            let loader = Loader::default();
            let e =
                mount_payload(value, &root, &loader, &Mounter::default(), DEVICE_WAIT).unwrap_err();
            assert!(matches!(e, DiskError::BadValue { .. }), "{value}: {e:?}");
            assert!(e.to_string().contains("GPU_DISK=pmem"), "{e}");
            assert!(loader.loaded.borrow().is_empty());
        }
    }

    #[test]
    fn a_module_that_will_not_load_is_named_with_the_kernel_error() {
        let root = guest("modfail", Some(PMEM_DEVICE));
        let loader = Loader {
            refuse: Some(("erofs.ko", Errno::ENOEXEC)),
            ..Loader::default()
        };
        let e =
            mount_payload("pmem", &root, &loader, &Mounter::default(), DEVICE_WAIT).unwrap_err();
        let report = failed_report("k".into(), "pmem", &e);
        let message = report.error.unwrap().message;
        assert!(
            message.contains("mount module erofs.ko") && message.contains("ENOEXEC"),
            "{message}"
        );
        // An already loaded module (built in, or loaded by the platform) is fine.
        let loader = Loader {
            refuse: Some(("virtio_pmem.ko", Errno::EEXIST)),
            ..Loader::default()
        };
        assert!(mount_payload("pmem", &root, &loader, &Mounter::default(), DEVICE_WAIT).is_ok());
    }

    #[test]
    fn a_base_layer_without_the_module_list_says_which_form_to_build() {
        let root = guest("nolist", Some(PMEM_DEVICE));
        std::fs::remove_file(in_root(&root, ORDER_FILE)).unwrap();
        let e = mount_payload(
            "pmem",
            &root,
            &Loader::default(),
            &Mounter::default(),
            DEVICE_WAIT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--form disk"), "{e}");
    }

    #[test]
    fn a_failed_mount_and_a_hidden_initramfs_layer_are_reported() {
        let root = guest("mountfail", Some(PMEM_DEVICE));
        let mounter = Mounter {
            answers: RefCell::new(vec![Errno::EINVAL, Errno::EINVAL]),
            ..Mounter::default()
        };
        let e =
            mount_payload("pmem", &root, &Loader::default(), &mounter, DEVICE_WAIT).unwrap_err();
        assert!(e.to_string().contains("EINVAL"), "{e}");
        std::fs::write(in_root(&root, "/gpu/manifest.json"), "{}").unwrap();
        let m = mount_payload(
            "pmem",
            &root,
            &Loader::default(),
            &Mounter::default(),
            DEVICE_WAIT,
        )
        .unwrap();
        assert!(m.problems[0].contains("hides it"), "{:?}", m.problems);
    }
}
