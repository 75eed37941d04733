//! The GPU payload from a read-only disk image (`GPU_DISK=pmem` or `GPU_DISK=/dev/vdX`).
//!
//! The host built the payload as an erofs image and a base layer carrying the modules needed to
//! mount it (`/gpu-disk/<name>.ko`, in load order in `/gpu-disk/order`). Before the
//! setup, init loads them, waits for the device and mounts the image read-only at `/gpu`; on
//! virtio-pmem with DAX, so reads map the host's page cache instead of filling guest RAM. From
//! there on the setup cannot tell the image from the initramfs layer.
//!
//! The base layer names the image it was built with (`/gpu-disk/image`: erofs UUID, and the
//! dm-verity root hash when built with `--verity`); any other image is refused. A verity image is
//! opened through a dm-verity device made from `GPU_DISK_VERITY=` (the measured command line),
//! and fails closed: no root hash, another root hash, or bytes that do not hash to it give
//! `gpu_disk_integrity` and nothing from the image is loaded. DAX does not pass through
//! device-mapper, so a verity image is read through the guest's page cache (virtio-blk, or pmem
//! without DAX).

use crate::context::in_root;
use crate::dm::{DeviceMapper, DmError};
use crate::modules::{LoadError, ModuleLoader};
use gpu_passthrough_guest_contract::disk::{
    EROFS_UUID_OFFSET, IMAGE_FILE, ImageBinding, KERNEL_WORD, MODULE_DIR, ORDER_FILE, PMEM,
    VERITY_WORD, Verity, uuid_text,
};
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
    /// The base layer records a verity image but the boot carries no root hash.
    #[error(
        "{device}: the base layer was built for a dm-verity image (root hash {built}) but the \
         kernel command line has no {VERITY_WORD}=: boot with the boot spec's kernel words, which \
         carry it; the image is not opened unverified"
    )]
    VerityMissing {
        /// The device.
        device: String,
        /// The base layer's root hash.
        built: String,
    },
    /// `GPU_DISK_VERITY` is malformed.
    #[error(
        "{device}: {VERITY_WORD}={value} is not valid: use <root hash>:<salt>:<data blocks>:<hash start \
         block> as the boot spec writes it"
    )]
    VerityValue {
        /// The device.
        device: String,
        /// The value given.
        value: String,
    },
    /// The root hash on the command line is not the base layer's.
    #[error(
        "{device}: {VERITY_WORD} gives root hash {booted} but the base layer was built with \
         {built}: boot the base layer and the command line of the same build"
    )]
    VerityMismatch {
        /// The device.
        device: String,
        /// The command line's root hash.
        booted: String,
        /// The base layer's (`none`: built without verity).
        built: String,
    },
    /// The image's bytes do not hash to the root hash.
    #[error(
        "{device}: the image does not match its dm-verity root hash {root} ({errno} reading it \
         through dm-verity): it was changed or corrupted; copy the image from the build again \
         (`initrd build --form disk --verity`)"
    )]
    Unverified {
        /// The device.
        device: String,
        /// The root hash.
        root: String,
        /// The read error (EIO).
        errno: Errno,
    },
    /// The dm-verity device could not be made.
    #[error("{device}: making the dm-verity device (dm_mod, dm_verity loaded from the base layer)")]
    DeviceMapper {
        /// The device.
        device: String,
        /// The failed step.
        #[source]
        source: DmError,
    },
    /// The image is not the one the base layer was built with.
    #[error(
        "{device} holds erofs image {found} but the base layer was built with image {expected}: \
         attach the image built with this base layer (same `initrd build` output)"
    )]
    OtherImage {
        /// The device.
        device: String,
        /// The image's UUID.
        found: String,
        /// The base layer's.
        expected: String,
    },
    /// The image's superblock could not be read.
    #[error("reading the erofs superblock of {device}: {errno}")]
    Read {
        /// The device.
        device: String,
        /// The error.
        errno: Errno,
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

impl DiskError {
    /// Whether this is an integrity failure (`gpu_disk_integrity`) rather than `gpu_disk`.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            DiskError::VerityMissing { .. }
                | DiskError::VerityValue { .. }
                | DiskError::VerityMismatch { .. }
                | DiskError::Unverified { .. }
        )
    }
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

    /// Read `buf.len()` bytes of `device` at `offset`.
    fn read_at(&self, device: &Path, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        use std::os::unix::fs::FileExt;
        let errno = |e: std::io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        std::fs::File::open(device)
            .map_err(errno)?
            .read_exact_at(buf, offset)
            .map_err(errno)
    }
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

/// What the kernel command line says about the image: `GPU_DISK` and `GPU_DISK_VERITY`.
#[derive(Debug, Clone, Copy)]
pub struct DiskWords<'a> {
    /// `GPU_DISK`.
    pub device: &'a str,
    /// `GPU_DISK_VERITY`, if given.
    pub verity: Option<&'a str>,
}

/// The verity parameters to open the image with: from the command line, checked against the
/// base layer's record before anything loads.
fn verity_for(
    words: DiskWords,
    binding: Option<&ImageBinding>,
    device: &str,
) -> Result<Option<Verity>, DiskError> {
    let built = binding.and_then(|b| b.verity_root.clone());
    let Some(value) = words.verity else {
        return match built {
            Some(built) => Err(DiskError::VerityMissing {
                device: device.to_string(),
                built,
            }),
            None => Ok(None),
        };
    };
    let verity = Verity::parse(value).ok_or_else(|| DiskError::VerityValue {
        device: device.to_string(),
        value: value.to_string(),
    })?;
    if binding.is_some() && built.as_deref() != Some(verity.root_hash.as_str()) {
        return Err(DiskError::VerityMismatch {
            device: device.to_string(),
            booted: verity.root_hash,
            built: built.unwrap_or_else(|| "none".into()),
        });
    }
    Ok(Some(verity))
}

/// Load the mount modules listed under `root`, wait up to `wait` for the device `words` names
/// (under `root` too), open it through dm-verity when it has a root hash, check it is the image
/// the base layer was built with, and mount it read-only at `root/gpu`.
pub fn mount_payload(
    words: DiskWords,
    root: &Path,
    loader: &dyn ModuleLoader,
    mounter: &dyn ImageMount,
    mapper: &dyn DeviceMapper,
    wait: Duration,
) -> Result<Mounted, DiskError> {
    let start = Instant::now();
    let value = words.device;
    let (device, source) = device_for(value)?;
    let binding = std::fs::read_to_string(in_root(root, IMAGE_FILE))
        .ok()
        .and_then(|t| ImageBinding::parse(&t));
    let shown = device.display().to_string();
    let verity = verity_for(words, binding.as_ref(), &shown)?;
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
    let device_path = match &verity {
        Some(v) => {
            mapper
                .create_verity(&device_path, v)
                .map_err(|source| DiskError::DeviceMapper {
                    device: shown.clone(),
                    source,
                })?
        }
        None => device_path,
    };
    let unverified = |errno| match &verity {
        Some(v) if errno == Errno::EIO => DiskError::Unverified {
            device: shown.clone(),
            root: v.root_hash.clone(),
            errno,
        },
        _ => DiskError::Read {
            device: shown.clone(),
            errno,
        },
    };
    let mut uuid = [0u8; 16];
    mounter
        .read_at(&device_path, EROFS_UUID_OFFSET, &mut uuid)
        .map_err(unverified)?;
    if let Some(b) = &binding
        && b.uuid != uuid_text(&uuid)
    {
        return Err(DiskError::OtherImage {
            device: shown,
            found: uuid_text(&uuid),
            expected: b.uuid.clone(),
        });
    }
    let mount_err = |errno| match (&verity, errno) {
        (Some(_), Errno::EIO) => unverified(errno),
        _ => DiskError::Mount {
            device: shown.clone(),
            errno,
        },
    };
    // DAX does not pass through device-mapper.
    let mut dax = source == PayloadSource::Pmem && verity.is_none();
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
        class: if error.is_integrity() {
            SetupErrorClass::GpuDiskIntegrity
        } else {
            SetupErrorClass::GpuDisk
        },
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
        reads: RefCell<Vec<PathBuf>>,
        read_error: RefCell<Option<Errno>>,
        uuid: [u8; 16],
    }

    fn words(device: &str) -> DiskWords<'_> {
        DiskWords {
            device,
            verity: None,
        }
    }

    /// Makes `/dev/dm-0` under the device's root; records tables; fails when told.
    #[derive(Default)]
    struct Dm {
        tables: RefCell<Vec<String>>,
        fail: Option<Errno>,
    }
    impl DeviceMapper for Dm {
        fn create_verity(&self, device: &Path, verity: &Verity) -> Result<PathBuf, DmError> {
            if let Some(errno) = self.fail {
                return Err(DmError {
                    step: "DM_TABLE_LOAD (verity)",
                    errno,
                });
            }
            self.tables
                .borrow_mut()
                .push(verity.table(&device.display().to_string()));
            Ok(device.with_file_name("dm-0"))
        }
    }
    impl ImageMount for Mounter {
        fn read_at(&self, device: &Path, _: u64, buf: &mut [u8]) -> Result<(), Errno> {
            self.reads.borrow_mut().push(device.to_path_buf());
            match *self.read_error.borrow() {
                Some(errno) => Err(errno),
                None => {
                    buf.copy_from_slice(&self.uuid);
                    Ok(())
                }
            }
        }
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
        let m = mount_payload(
            words("pmem"),
            &root,
            &loader,
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap();
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
        let m = mount_payload(
            words("/dev/vdb"),
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap();
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
        let m = mount_payload(
            words("pmem"),
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap();
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
        let e = mount_payload(
            words("/dev/vdz"),
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            wait,
        )
        .unwrap_err();
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
            let e = mount_payload(
                words(value),
                &root,
                &loader,
                &Mounter::default(),
                &Dm::default(),
                DEVICE_WAIT,
            )
            .unwrap_err();
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
        let e = mount_payload(
            words("pmem"),
            &root,
            &loader,
            &Mounter::default(),
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap_err();
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
        assert!(
            mount_payload(
                words("pmem"),
                &root,
                &loader,
                &Mounter::default(),
                &Dm::default(),
                DEVICE_WAIT
            )
            .is_ok()
        );
    }

    #[test]
    fn a_base_layer_without_the_module_list_says_which_form_to_build() {
        let root = guest("nolist", Some(PMEM_DEVICE));
        std::fs::remove_file(in_root(&root, ORDER_FILE)).unwrap();
        let e = mount_payload(
            words("pmem"),
            &root,
            &Loader::default(),
            &Mounter::default(),
            &Dm::default(),
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
        let e = mount_payload(
            words("pmem"),
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("EINVAL"), "{e}");
        std::fs::write(in_root(&root, "/gpu/manifest.json"), "{}").unwrap();
        let m = mount_payload(
            words("pmem"),
            &root,
            &Loader::default(),
            &Mounter::default(),
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap();
        assert!(m.problems[0].contains("hides it"), "{:?}", m.problems);
    }

    const ROOT_HASH: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

    /// A guest root whose base layer records an image with `uuid` (bytes 0..16) and, if given,
    /// a verity root hash.
    fn bound(name: &str, verity_root: Option<&str>) -> (PathBuf, [u8; 16]) {
        let root = guest(name, Some("/dev/vdb"));
        let uuid: [u8; 16] = core::array::from_fn(|i| i as u8);
        let binding = ImageBinding {
            uuid: uuid_text(&uuid),
            verity_root: verity_root.map(str::to_string),
        };
        std::fs::write(in_root(&root, IMAGE_FILE), binding.render()).unwrap();
        (root, uuid)
    }

    fn verity_word(root_hash: &str) -> String {
        format!("{root_hash}:{}:512:512", "ab".repeat(32))
    }

    #[test]
    fn a_verity_image_is_opened_through_dm_verity_and_mounted_without_dax() {
        let (root, uuid) = bound("verity", Some(ROOT_HASH));
        let mounter = Mounter {
            uuid,
            ..Mounter::default()
        };
        let dm = Dm::default();
        let word = verity_word(ROOT_HASH);
        let w = DiskWords {
            device: "/dev/vdb",
            verity: Some(&word),
        };
        let m = mount_payload(w, &root, &Loader::default(), &mounter, &dm, DEVICE_WAIT).unwrap();
        let dm_node = in_root(&root, "/dev/dm-0");
        assert_eq!(
            *mounter.reads.borrow(),
            std::slice::from_ref(&dm_node),
            "read through verity"
        );
        assert_eq!(*mounter.calls.borrow(), [(dm_node, false)]);
        assert!(!m.payload.dax);
        let tables = dm.tables.borrow();
        assert!(
            tables[0].contains(&format!("512 512 sha256 {ROOT_HASH}")),
            "{tables:?}"
        );
    }

    #[test]
    fn a_verity_image_fails_closed_with_gpu_disk_integrity() {
        let (root, uuid) = bound("tamper", Some(ROOT_HASH));
        let other = "6b".repeat(32);
        let good = verity_word(ROOT_HASH);
        let wrong = verity_word(&other);
        let cases: [(Option<&str>, Option<Errno>, &str); 4] = [
            (None, None, "no GPU_DISK_VERITY="),
            (Some(&wrong), None, "was built with 5a5a"),
            (Some("zz:1"), None, "is not valid"),
            // A flipped byte: reads through dm-verity fail with EIO.
            (
                Some(&good),
                Some(Errno::EIO),
                "does not match its dm-verity root hash",
            ),
        ];
        for (verity, read_error, says) in cases {
            let loader = Loader::default();
            let mounter = Mounter {
                uuid,
                read_error: RefCell::new(read_error),
                ..Mounter::default()
            };
            let w = DiskWords {
                device: "/dev/vdb",
                verity,
            };
            let e = mount_payload(w, &root, &loader, &mounter, &Dm::default(), DEVICE_WAIT)
                .unwrap_err();
            let report = failed_report("k".into(), "/dev/vdb", &e);
            let error = report.error.unwrap();
            assert_eq!(error.class, SetupErrorClass::GpuDiskIntegrity, "{e}");
            assert!(
                error.message.contains(says) && error.message.contains("/dev/vdb"),
                "{}",
                error.message
            );
            assert!(mounter.calls.borrow().is_empty(), "nothing mounted: {e}");
            if read_error.is_none() {
                assert!(loader.loaded.borrow().is_empty(), "nothing loaded: {e}");
            }
        }
    }

    #[test]
    fn a_root_hash_for_an_image_built_without_verity_is_refused() {
        let (root, uuid) = bound("noverity", None);
        let word = verity_word(ROOT_HASH);
        let mounter = Mounter {
            uuid,
            ..Mounter::default()
        };
        let w = DiskWords {
            device: "/dev/vdb",
            verity: Some(&word),
        };
        let e = mount_payload(
            w,
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap_err();
        assert!(
            e.is_integrity() && e.to_string().contains("built with none"),
            "{e}"
        );
    }

    #[test]
    fn an_image_other_than_the_base_layers_is_refused_naming_both() {
        let (root, uuid) = bound("other", None);
        let mut other = uuid;
        other[0] = 0xee;
        let mounter = Mounter {
            uuid: other,
            ..Mounter::default()
        };
        let e = mount_payload(
            words("/dev/vdb"),
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        )
        .unwrap_err();
        let report = failed_report("k".into(), "/dev/vdb", &e);
        let error = report.error.unwrap();
        assert_eq!(error.class, SetupErrorClass::GpuDisk);
        assert!(
            error.message.contains(&uuid_text(&other)) && error.message.contains(&uuid_text(&uuid)),
            "{}",
            error.message
        );
        assert!(mounter.calls.borrow().is_empty());
        // The same image is accepted.
        let mounter = Mounter {
            uuid,
            ..Mounter::default()
        };
        let ok = mount_payload(
            words("/dev/vdb"),
            &root,
            &Loader::default(),
            &mounter,
            &Dm::default(),
            DEVICE_WAIT,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn a_device_mapper_failure_is_a_gpu_disk_error_and_nothing_is_mounted() {
        let (root, uuid) = bound("dmfail", Some(ROOT_HASH));
        let word = verity_word(ROOT_HASH);
        let mounter = Mounter {
            uuid,
            ..Mounter::default()
        };
        let dm = Dm {
            fail: Some(Errno::EINVAL),
            ..Dm::default()
        };
        let w = DiskWords {
            device: "/dev/vdb",
            verity: Some(&word),
        };
        let e =
            mount_payload(w, &root, &Loader::default(), &mounter, &dm, DEVICE_WAIT).unwrap_err();
        let message = failed_report("k".into(), "/dev/vdb", &e)
            .error
            .unwrap()
            .message;
        assert!(
            message.contains("DM_TABLE_LOAD") && message.contains("EINVAL"),
            "{message}"
        );
        assert!(mounter.calls.borrow().is_empty());
    }
}
