//! The GPU disk (`--form disk|both`) over the real fixtures: a byte-reproducible erofs image
//! that fsck.erofs accepts and that holds exactly the GPU layer's `/gpu` tree, a base layer with
//! the mount modules in load order, and the refusals (a mount module missing from the
//! kernel-modules artifact, mkfs.erofs not installed or planted in PATH).

use gpu_passthrough::outcome::{Classify, Outcome};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gpu_passthrough::archive::cpio::read_initrd;
use gpu_passthrough::fetch::{FetchOptions, Fetcher, NoProgress};
use gpu_passthrough::initrd::disk::{
    EROFS_UUID_OFFSET, IMAGE_ALIGN, IMAGE_FILE, ImageBinding, MKFS_EROFS, MODULE_DIR, ORDER_FILE,
    uuid_text,
};
use gpu_passthrough::initrd::listing::{self, Listing, ListingError};
use gpu_passthrough::initrd::{
    BuildOptions, DiskError, InitrdBuilder, InitrdError, LayerForm, Layers,
};
use gpu_passthrough::registry::{Arch, Registry};
use gpu_passthrough_tests::fixtures;

const RELEASE: &str = "fx-6.1-disk";

fn artifacts(kernel_modules: &str) -> Vec<(&'static str, PathBuf)> {
    let mut a = fixtures::gpu_artifacts();
    for (kind, file) in &mut a {
        if *kind == "kernel-modules" {
            *file = fixtures::path(kernel_modules);
        }
    }
    a
}

fn setup(name: &str, kernel_modules: &str) -> (PathBuf, Registry, PathBuf) {
    let dir = fixtures::process_scratch(env!("CARGO_TARGET_TMPDIR"), name);
    let reg = fixtures::write_registry(
        &dir,
        RELEASE,
        fixtures::KERNEL_VERSION,
        &artifacts(kernel_modules),
        true,
    );
    let init = fixtures::guest_init_stand_in(&dir);
    (dir, Registry::load(&[reg]).unwrap(), init)
}

fn build(
    cache: &Path,
    registry: &Registry,
    init: &Path,
    form: LayerForm,
) -> Result<Layers, InitrdError> {
    build_with(cache, registry, init, form, false)
}

fn build_with(
    cache: &Path,
    registry: &Registry,
    init: &Path,
    form: LayerForm,
    verity: bool,
) -> Result<Layers, InitrdError> {
    let fetcher = Fetcher::new(cache, FetchOptions::default()).unwrap();
    let mut options = BuildOptions::new(Arch::X86_64, init);
    options.form = form;
    options.verity = verity;
    InitrdBuilder::new(cache, &fetcher).build(
        registry.release(RELEASE).unwrap(),
        &options,
        &NoProgress,
    )
}

/// Unpack a (plain cpio) layer with GNU cpio, an independent reader.
fn unpack_cpio(layer: &Path, into: &Path) {
    fs::create_dir_all(into).unwrap();
    let st = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames"])
        .current_dir(into)
        .stdin(fs::File::open(layer).unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "GNU cpio could not unpack {}",
        layer.display()
    );
}

/// Every path in a directory tree, relative, with a leading `/`.
fn tree_paths(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.insert(format!("/{}", p.strip_prefix(root).unwrap().display()));
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn disk_image_is_reproducible_fsck_clean_padded_and_holds_the_manifest() {
    let (dir, registry, init) = setup("initrd_disk-image", fixtures::KERNEL_MODULES_PMEM);
    let a = build(&dir.join("cache-a"), &registry, &init, LayerForm::Disk).unwrap();
    let b = build(&dir.join("cache-b"), &registry, &init, LayerForm::Disk).unwrap();
    let (da, db) = (a.disk.clone().unwrap(), b.disk.clone().unwrap());
    assert_eq!(da.sha256, db.sha256, "two builds of the same inputs differ");
    assert_eq!(fs::read(&da.path).unwrap(), fs::read(&db.path).unwrap());
    assert_eq!(da.size % IMAGE_ALIGN, 0, "image not padded to 2 MiB");
    assert_eq!(fs::metadata(&da.path).unwrap().len(), da.size);
    // The disk form writes no GPU initramfs layer: combined is the base layer.
    assert_eq!(a.combined.sha256, a.base.sha256);

    let extract = dir.join("extract");
    let _ = fs::remove_dir_all(&extract);
    let out = Command::new("fsck.erofs")
        .arg(format!("--extract={}", extract.display()))
        .arg(&da.path)
        .output()
        .expect("fsck.erofs (erofs-utils) must be installed; .ci/run installs it");
    assert!(
        out.status.success(),
        "fsck.erofs rejected the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = tree_paths(&extract);
    let m = &a.manifest;
    let mut want: Vec<String> = m.modules.iter().map(|x| x.path.clone()).collect();
    want.extend(m.libraries.iter().map(|l| l.path.clone()));
    want.extend(m.binaries.iter().cloned());
    // Firmware lives under /gpu/firmware, so the image carries it too.
    assert!(!m.firmware.is_empty(), "the open release has GSP firmware");
    want.extend(m.firmware.iter().cloned());
    want.push("/manifest.json".into());
    want.push("/bin/gpu-init".into());
    for w in &want {
        let inside = w.strip_prefix("/gpu").unwrap_or(w);
        assert!(
            paths.contains(inside),
            "{inside} missing from the image: {paths:?}"
        );
    }
    for lib in &m.libraries {
        if let Some(soname) = &lib.soname {
            assert!(
                paths.contains(&format!("/lib/{soname}")),
                "soname link {soname} missing"
            );
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(extract.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["modules"].as_array().unwrap().len(),
        m.modules.len()
    );
    assert!(
        paths.iter().all(|p| p == "/bin"
            || p == "/lib"
            || p == "/modules"
            || p == "/firmware"
            || p == "/manifest.json"
            || p.starts_with("/firmware/")
            || p.starts_with("/bin/")
            || p.starts_with("/lib/")
            || p.starts_with("/modules/")),
        "unexpected entries in the image: {paths:?}"
    );
    // `initrd inspect` lists the image: the same tree fsck.erofs extracted.
    let Listing::Disk(listing) = listing::list(&da.path).unwrap() else {
        panic!("{} listed as an initrd", da.path.display());
    };
    assert_eq!(listing.size, da.size);
    let listed: BTreeSet<String> = listing
        .entries
        .iter()
        .map(|e| format!("/{}", e.path))
        .collect();
    assert_eq!(listed, paths, "inspect and fsck.erofs --extract disagree");
    let manifest_entry = listing
        .entries
        .iter()
        .find(|e| e.path == "manifest.json")
        .unwrap();
    assert_eq!(
        manifest_entry.size,
        fs::metadata(extract.join("manifest.json")).unwrap().len()
    );
    assert!(
        listing
            .entries
            .iter()
            .any(|e| e.kind == "symlink" && e.target.is_some()),
        "soname links are listed with their targets"
    );
    // Same bytes as the source library.
    let cuda = m
        .libraries
        .iter()
        .find(|l| l.path.contains("libcuda.so.5"))
        .unwrap();
    let name = Path::new(&cuda.path).file_name().unwrap();
    assert_eq!(
        fs::read(extract.join("lib").join(name)).unwrap().len() as u64,
        fs::metadata(extract.join("lib").join(name)).unwrap().len()
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_image_is_refused_by_inspect_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // An erofs superblock magic and nothing behind it.
    let mut bytes = vec![0u8; 8192];
    bytes[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
    let bad = dir.path().join("gpu.erofs");
    fs::write(&bad, &bytes).unwrap();
    let err = listing::list(&bad).unwrap_err();
    assert!(matches!(err, ListingError::Erofs(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("gpu.erofs") && msg.contains("not a readable erofs image"),
        "{msg}"
    );
    // No magic: read as an initrd, which it is not either.
    fs::write(&bad, vec![0xffu8; 4096]).unwrap();
    assert!(matches!(listing::list(&bad), Err(ListingError::Cpio(_))));
}

#[test]
fn base_layer_carries_the_mount_modules_in_load_order() {
    let (dir, registry, init) = setup("initrd_disk-base", fixtures::KERNEL_MODULES_PMEM);
    let both = build(&dir.join("cache"), &registry, &init, LayerForm::Both).unwrap();
    assert!(both.disk.is_some());
    assert_ne!(
        both.combined.sha256, both.base.sha256,
        "both keeps the initramfs layers"
    );
    let layers = read_initrd(&both.base.path).unwrap();
    let names: BTreeSet<String> = layers[0].entries.iter().map(|e| e.path.clone()).collect();
    let order_path = ORDER_FILE.trim_start_matches('/');
    assert!(names.contains(order_path), "{names:?}");
    let extract = dir.join("base");
    unpack_cpio(&both.base.path, &extract);
    let order: Vec<String> = fs::read_to_string(extract.join(order_path))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let expected = [
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "crc32c_generic",
        "libcrc32c",
        "libnvdimm",
        "nd_btt",
        "nd_virtio",
        "virtio_pmem",
        "nd_pmem",
        "erofs",
        "virtio_blk",
    ];
    let pos = |m: &str| {
        order
            .iter()
            .position(|o| o == &format!("{m}.ko"))
            .unwrap_or_else(|| panic!("{m} not in the base layer's order {order:?}"))
    };
    for m in expected {
        assert!(
            names.contains(&format!("{}/{m}.ko", MODULE_DIR.trim_start_matches('/'))),
            "{m}.ko missing from the base layer"
        );
        let _ = pos(m);
    }
    for (dep, user) in [
        ("virtio", "virtio_pci"),
        ("libnvdimm", "nd_pmem"),
        ("nd_virtio", "virtio_pmem"),
        ("libcrc32c", "erofs"),
        ("virtio_ring", "virtio_blk"),
    ] {
        assert!(
            pos(dep) < pos(user),
            "{dep} must load before {user}: {order:?}"
        );
    }
    // The initrd form's base layer is unchanged: no mount modules.
    let plain = build(&dir.join("cache"), &registry, &init, LayerForm::Initrd).unwrap();
    let plain_names: Vec<String> = read_initrd(&plain.base.path).unwrap()[0]
        .entries
        .iter()
        .map(|e| e.path.clone())
        .collect();
    assert!(
        !plain_names.iter().any(|n| n.contains("gpu-disk")),
        "{plain_names:?}"
    );
    assert!(plain.disk.is_none());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn xz_compressed_mount_modules_are_written_as_plain_elf() {
    let (dir, _, init) = setup("initrd_disk-xz", fixtures::KERNEL_MODULES_PMEM);
    let xz = dir.join("kernel-modules-pmem-xz.tar.gz");
    let originals =
        fixtures::xz_compress_modules(&fixtures::path(fixtures::KERNEL_MODULES_PMEM), &xz);
    let reg = fixtures::write_registry(
        &dir,
        RELEASE,
        fixtures::KERNEL_VERSION,
        &artifacts(xz.to_str().unwrap()),
        true,
    );
    let registry = Registry::load(&[reg]).unwrap();
    let layers = build(&dir.join("cache"), &registry, &init, LayerForm::Disk).unwrap();
    let extract = dir.join("base-xz");
    unpack_cpio(&layers.base.path, &extract);
    let order = fs::read_to_string(extract.join(ORDER_FILE.trim_start_matches('/'))).unwrap();
    let mut seen = 0;
    for name in order.lines() {
        let bytes = fs::read(extract.join(MODULE_DIR.trim_start_matches('/')).join(name)).unwrap();
        assert_eq!(
            bytes, originals[name],
            "{name} is not the decompressed module"
        );
        seen += 1;
    }
    assert_eq!(seen, 14, "mount modules in the base layer");
    let _ = fs::remove_dir_all(&dir);
}

/// The provisioner in the disk form: the layers are ensured before a device moves, the VM
/// boots the base layer, and the image is in its boot spec with the kernel word.
#[test]
fn a_provisioner_with_a_disk_attaches_the_image_and_boots_the_base_layer() {
    use gpu_passthrough::attach::{Owner, PlanRequest};
    use gpu_passthrough::provision::{GpuVmRequest, Provisioner};
    use gpu_passthrough::vmm::{DiskAttach, DiskIsolation, DiskRequest};
    let (dir, registry, init) = setup("initrd_disk-provision", fixtures::KERNEL_MODULES_PMEM);
    let h = gpu_passthrough_tests::sysfs::server_8gpu();
    let host = h.host();
    let owner = Owner::new("vm-disk").unwrap();
    let spec = Provisioner::new(&host, &registry, dir.join("cache"))
        .with_guest_init(&init)
        .attach(
            &GpuVmRequest {
                plan: PlanRequest {
                    gpus: Some(1),
                    ..Default::default()
                },
                owner: owner.clone(),
                release: Some(RELEASE.into()),
                initrd: None,
                disk: DiskRequest::shared(DiskAttach::Pmem),
            },
            &NoProgress,
        )
        .unwrap();
    // The disk's word comes last, after the devices' own (HAS_GPU=1, NVLink words).
    assert_eq!(
        spec.kernel_cmdline.first().map(String::as_str),
        Some("HAS_GPU=1")
    );
    assert_eq!(
        spec.kernel_cmdline.last().map(String::as_str),
        Some("GPU_DISK=pmem")
    );
    let disk = spec.disk.clone().expect("the spec names the image");
    assert_eq!(disk.size % IMAGE_ALIGN, 0);
    assert_eq!(fs::metadata(&disk.image).unwrap().len(), disk.size);
    let base = read_initrd(spec.initrd.as_ref().unwrap()).unwrap();
    assert!(
        base[0]
            .entries
            .iter()
            .any(|e| e.path == ORDER_FILE.trim_start_matches('/')),
        "the VM boots the base layer with the mount modules"
    );
    assert!(
        !base[0]
            .entries
            .iter()
            .any(|e| e.path == "gpu/manifest.json"),
        "and no GPU initramfs"
    );
    assert!(
        spec.qemu
            .args
            .iter()
            .any(|a| a == "virtio-pmem-pci,memdev=gpu0")
    );
    assert_eq!(spec.qemu.maxmem_extra_mib, Some(disk.size >> 20));
    assert!(spec.cloud_hypervisor.args.iter().any(|a| a == "--pmem"));
    assert_eq!(disk.isolation, DiskIsolation::Shared);
    host.detach(&owner).unwrap();
    assert!(h.journal_clean());
    // The platform's choice: a private copy in the VM's directory, attached by both VMMs in
    // place of the shared image, byte for byte the same (the base layer's binding holds).
    let vm_dir = dir.join("vm-disk");
    fs::create_dir(&vm_dir).unwrap();
    let attach_private = |vm_dir: &std::path::Path| {
        Provisioner::new(&host, &registry, dir.join("cache"))
            .with_guest_init(&init)
            .attach(
                &GpuVmRequest {
                    plan: PlanRequest {
                        gpus: Some(1),
                        ..Default::default()
                    },
                    owner: owner.clone(),
                    release: Some(RELEASE.into()),
                    initrd: None,
                    disk: DiskRequest::private(
                        DiskAttach::Blk {
                            device: "/dev/vdb".into(),
                        },
                        vm_dir,
                    ),
                },
                &NoProgress,
            )
            // The error's text is what is checked; a String keeps the closure's result small.
            .map_err(|e| e.to_string())
    };
    let private = attach_private(&vm_dir).unwrap();
    let copy = private.disk.clone().unwrap();
    assert_eq!(copy.isolation, DiskIsolation::Private);
    assert!(copy.image.starts_with(&vm_dir), "{}", copy.image.display());
    assert_eq!(
        fs::read(&copy.image).unwrap(),
        fs::read(&disk.image).unwrap()
    );
    let shared = disk.image.display().to_string();
    for args in [&private.qemu.args, &private.cloud_hypervisor.args] {
        let args = args.join(" ");
        assert!(args.contains(&*copy.image.display().to_string()), "{args}");
        assert!(!args.contains(&shared), "{args}");
    }
    assert_eq!(
        private.kernel_cmdline.last().map(String::as_str),
        Some("GPU_DISK=/dev/vdb")
    );
    host.detach(&owner).unwrap();
    // No VM directory: refused before a device moves, and nothing is left in the journal.
    let err = attach_private(&dir.join("no-such-vm")).unwrap_err();
    assert!(err.contains("no-such-vm"), "{err}");
    assert!(h.journal_clean());
    // A disk needs a release the provisioner builds: refused before anything moves.
    let err = Provisioner::new(&host, &registry, dir.join("cache"))
        .attach(
            &GpuVmRequest {
                plan: PlanRequest {
                    gpus: Some(1),
                    ..Default::default()
                },
                owner: owner.clone(),
                release: Some(RELEASE.into()),
                initrd: Some(dir.join("own.img")),
                disk: DiskRequest::shared(DiskAttach::Pmem),
            },
            &NoProgress,
        )
        .unwrap_err();
    assert!(err.outcome() == Outcome::Refused, "{err}");
    assert!(h.journal_clean());
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn kernel_modules_without_a_mount_module_are_refused_naming_it() {
    // The plain fixture has virtio_blk and erofs but no virtio_pmem.
    let (dir, registry, init) = setup("initrd_disk-missing", fixtures::KERNEL_MODULES);
    let err = build(&dir.join("cache"), &registry, &init, LayerForm::Disk).unwrap_err();
    match &err {
        InitrdError::Disk(DiskError::MountModuleMissing {
            module, release, ..
        }) => {
            assert_eq!(release, RELEASE);
            assert!(
                ["virtio_pmem", "nd_pmem", "libnvdimm", "nd_virtio", "nd_btt"]
                    .contains(&module.as_str()),
                "{module}"
            );
        }
        other => panic!("expected MountModuleMissing, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("kernel-modules artifact") && msg.contains(".ko"),
        "{msg}"
    );
    // Nothing published.
    let published: Vec<_> = fs::read_dir(dir.join("cache/layers"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(published.is_empty(), "a refused build left {published:?}");
    let _ = fs::remove_dir_all(&dir);
}

/// Child of the next test: runs a disk build with a PATH whose first directory holds a planted
/// `mkfs.erofs`.
#[test]
#[ignore = "child process of a_planted_mkfs_erofs_first_in_path_is_never_run"]
fn planted_mkfs_child() {
    let dir = PathBuf::from(std::env::var_os("DISK_CHILD_DIR").expect("run by the parent only"));
    let registry = Registry::load(&[dir.join("registry.toml")]).unwrap();
    let layers = build(
        &dir.join("cache"),
        &registry,
        &dir.join("gpu-init"),
        LayerForm::Disk,
    )
    .unwrap();
    assert!(layers.disk.is_some());
}

#[test]
fn a_planted_mkfs_erofs_first_in_path_is_never_run() {
    let (dir, _registry, _init) = setup("initrd_disk-planted", fixtures::KERNEL_MODULES_PMEM);
    let planted = dir.join("planted");
    fs::create_dir_all(&planted).unwrap();
    let marker = dir.join("planted-ran");
    let script = planted.join(MKFS_EROFS.program);
    fs::write(
        &script,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", planted.display(), std::env::var("PATH").unwrap());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "planted_mkfs_child", "--ignored", "--nocapture"])
        .env("DISK_CHILD_DIR", &dir)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    assert!(!marker.exists(), "the mkfs.erofs planted first in PATH ran");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn mkfs_erofs_is_found_only_in_the_system_directories_and_its_absence_names_the_package() {
    let found = MKFS_EROFS
        .find()
        .expect("erofs-utils is installed for these tests");
    assert!(
        found.starts_with("/usr") || found.starts_with("/sbin") || found.starts_with("/bin"),
        "{}",
        found.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let err = MKFS_EROFS.find_in(&[dir.path().to_path_buf()]).unwrap_err();
    let disk = InitrdError::Disk(DiskError::Mkfs(err));
    let text = disk.to_string();
    assert!(text.contains(MKFS_EROFS.package), "{text}");
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert_eq!(disk.outcome(), Outcome::Failed);
}

/// `veritysetup verify` of the image against its record.
fn verity_verifies(image: &Path, v: &gpu_passthrough::initrd::disk::Verity) -> bool {
    Command::new("veritysetup")
        .args(["verify", "--no-superblock"])
        .arg(format!("--hash-offset={}", v.hash_start_block * 4096))
        .arg(format!("--data-blocks={}", v.data_blocks))
        .arg(format!("--salt={}", v.salt))
        .args([image, image])
        .arg(&v.root_hash)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_verity_disk_records_its_root_hash_and_binds_the_base_layer_to_it() {
    let (dir, registry, init) = setup("initrd_disk-verity", fixtures::KERNEL_MODULES_VERITY);
    let cache = dir.join("cache");
    let plain = build(&cache, &registry, &init, LayerForm::Disk).unwrap();
    let layers = build_with(&cache, &registry, &init, LayerForm::Disk, true).unwrap();
    assert_ne!(layers.key, plain.key, "verity joins the cache key");
    assert!(plain.verity.is_none());
    let v = layers
        .verity
        .clone()
        .expect("the record carries the verity parameters");
    let image = layers.disk.as_ref().unwrap();
    assert_eq!(image.size % IMAGE_ALIGN, 0);
    assert_eq!(v.data_blocks * 4096, plain.disk.as_ref().unwrap().size);
    assert!(verity_verifies(&image.path, &v), "veritysetup verify");
    // The record on disk says the same, and the text output shows the root hash.
    let record: Layers = serde_json::from_slice(
        &fs::read(image.path.parent().unwrap().join("layers.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record.verity.as_ref(), Some(&v));
    assert!(layers.to_string().contains(&v.root_hash));
    // The base layer loads dm_verity (after its dependencies) and names the image it belongs to.
    let extract = dir.join("base");
    unpack_cpio(&layers.base.path, &extract);
    let order = fs::read_to_string(extract.join(ORDER_FILE.trim_start_matches('/'))).unwrap();
    let pos = |m: &str| {
        order
            .lines()
            .position(|l| l == format!("{m}.ko"))
            .unwrap_or_else(|| panic!("{m} missing: {order}"))
    };
    assert!(
        pos("dm_mod") < pos("dm_verity") && pos("dm_bufio") < pos("dm_verity"),
        "{order}"
    );
    let binding = ImageBinding::parse(
        &fs::read_to_string(extract.join(IMAGE_FILE.trim_start_matches('/'))).unwrap(),
    )
    .unwrap();
    assert_eq!(binding.verity_root.as_deref(), Some(v.root_hash.as_str()));
    // The UUID named is the image's own (erofs superblock).
    let bytes = fs::read(&image.path).unwrap();
    let at = EROFS_UUID_OFFSET as usize;
    let uuid: [u8; 16] = bytes[at..at + 16].try_into().unwrap();
    assert_eq!(binding.uuid, uuid_text(&uuid));
    // The plain disk's base layer is bound too, without a root hash, and loads no dm modules.
    let plain_extract = dir.join("plain-base");
    unpack_cpio(&plain.base.path, &plain_extract);
    let plain_binding = ImageBinding::parse(
        &fs::read_to_string(plain_extract.join(IMAGE_FILE.trim_start_matches('/'))).unwrap(),
    )
    .unwrap();
    assert!(plain_binding.verity_root.is_none());
    assert_ne!(
        plain_binding.uuid, binding.uuid,
        "another build, another image"
    );
    assert!(
        !fs::read_to_string(plain_extract.join(ORDER_FILE.trim_start_matches('/')))
            .unwrap()
            .contains("dm_verity")
    );
    // One byte flipped in a copy: the root hash no longer proves it.
    let copy = dir.join("tampered.erofs");
    let mut tampered = bytes;
    tampered[1 << 20] ^= 0x01;
    fs::write(&copy, &tampered).unwrap();
    assert!(!verity_verifies(&copy, &v));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn verity_needs_dm_verity_in_the_kernel_modules_artifact() {
    let (dir, registry, init) = setup("initrd_disk-noverity", fixtures::KERNEL_MODULES_PMEM);
    let e = build_with(&dir.join("cache"), &registry, &init, LayerForm::Disk, true).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("dm_verity") || text.contains("dm-verity"),
        "{text}"
    );
    assert!(
        matches!(e, InitrdError::Disk(DiskError::MountModuleMissing { .. })),
        "{e:?}"
    );
    let _ = fs::remove_dir_all(&dir);
}

/// The initramfs form writes the GPU layer while the driver libraries are still being unpacked
/// (kernel side first); the both form writes it from the whole plan, after the image. The bytes
/// must not depend on which.
#[test]
fn the_gpu_layer_written_during_unpacking_is_the_one_written_from_the_whole_plan() {
    let (dir, registry, init) = setup("initrd_disk-streamed", fixtures::KERNEL_MODULES_PMEM);
    let streamed = build(&dir.join("cache-a"), &registry, &init, LayerForm::Initrd).unwrap();
    let whole = build(&dir.join("cache-b"), &registry, &init, LayerForm::Both).unwrap();
    assert_eq!(streamed.gpu.sha256, whole.gpu.sha256);
    assert_eq!(streamed.gpu.size, whole.gpu.size);
    assert_eq!(streamed.manifest, whole.manifest);
    assert_ne!(
        streamed.base.sha256, whole.base.sha256,
        "the both form's base layer carries the mount modules"
    );
}
