//! The GPU payload as a read-only erofs image (the "driver disk"), and the mount modules the base
//! layer carries so the guest can mount it.
//!
//! A VM given the image on virtio-pmem maps the host's page cache of the file (DAX): every VM on
//! the host shares one copy, and the guest's own RAM holds none of it. The image is made by
//! `mkfs.erofs` (erofs-utils) with every knob that would make the bytes vary pinned: a fixed
//! timestamp, a UUID derived from the cache key, all files owned by root, compact inodes, and no
//! inline tail data (a tail packed into the inode block cannot be read through DAX, so it would
//! be copied into the guest's page cache). The image is padded to a multiple of 2 MiB, the
//! granularity QEMU's virtio-pmem maps it at.
//!
//! With `--verity` a dm-verity hash tree (`veritysetup format` from cryptsetup-bin, sha256,
//! 4096-byte blocks, no verity superblock, a salt derived from the cache key so the bytes stay
//! reproducible) is appended after the padded data, and the file padded again; its root hash and
//! parameters go into the record, the base layer and the boot's `GPU_DISK_VERITY=` word. DAX does
//! not pass through device-mapper, so such a disk is meant for virtio-blk (or pmem without DAX):
//! the guest reads it through its page cache, each block checked against the tree.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

pub use gpu_passthrough_guest_contract::disk::{
    EROFS_UUID_OFFSET, IMAGE_FILE, ImageBinding, MODULE_DIR, MOUNT_MODULES, ORDER_FILE,
    VERITY_BLOCK, VERITY_MODULES, Verity, uuid_text,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::LayerFile;
use crate::fsutil::sha256_file;
use crate::inspect::{ClosureGap, Expectations, InspectedModule, Problem, kernel_closure};
use crate::outcome::{Classify, Outcome};
use crate::tools::{RunError, Tool, ToolError, run_bounded};

/// The program that writes the image, and the package that ships it (Debian, Ubuntu, Fedora).
pub const MKFS_EROFS: Tool = Tool {
    program: "mkfs.erofs",
    package: "erofs-utils",
};
/// The program that writes the dm-verity hash tree, and its package.
pub const VERITYSETUP: Tool = Tool {
    program: "veritysetup",
    package: "cryptsetup-bin",
};
/// How long `mkfs.erofs` or `veritysetup` may run on one image (a few seconds for a driver's
/// few hundred MiB) before it is taken as hung and killed.
pub const TOOL_LIMIT: Duration = Duration::from_secs(600);

/// The image is padded to a multiple of this (QEMU maps virtio-pmem in 2 MiB steps).
pub const IMAGE_ALIGN: u64 = 2 << 20;
/// File name of the image in a cache entry.
pub const IMAGE_NAME: &str = "gpu.erofs";

/// How the GPU payload reaches the guest.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LayerForm {
    /// An initramfs layer (`gpu.cpio.<c>`, and `combined`): today's behaviour.
    #[default]
    Initrd,
    /// An erofs image, and a base layer carrying the modules that mount it. No GPU initramfs
    /// layer is written: `gpu` and `combined` then name the base layer, the initrd such a VM
    /// boots.
    Disk,
    /// Both: the initramfs layers and the image (the base layer carries the mount modules).
    Both,
}

impl LayerForm {
    /// Every form.
    pub const ALL: [LayerForm; 3] = [LayerForm::Initrd, LayerForm::Disk, LayerForm::Both];

    /// The name used in the cache key, flags and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerForm::Initrd => "initrd",
            LayerForm::Disk => "disk",
            LayerForm::Both => "both",
        }
    }

    /// Whether the GPU initramfs layer is written.
    pub fn initramfs(self) -> bool {
        self != LayerForm::Disk
    }

    /// Whether the erofs image (and the mount modules in the base layer) is written.
    pub fn image(self) -> bool {
        self != LayerForm::Initrd
    }
}

impl fmt::Display for LayerForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A form name that is none of `initrd`, `disk`, `both`.
#[derive(Debug, Error)]
#[error("unknown layer form `{0}`: use initrd, disk or both")]
pub struct UnknownForm(pub String);

impl Classify for UnknownForm {
    fn outcome(&self) -> Outcome {
        Outcome::Refused
    }
}

impl FromStr for LayerForm {
    type Err = UnknownForm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LayerForm::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownForm(s.to_string()))
    }
}

/// Errors making the image or resolving its mount modules. Each names the culprit and the fix.
#[derive(Debug, Error)]
pub enum DiskError {
    /// `mkfs.erofs` is not installed where the system keeps programs, or could be replaced by
    /// someone other than root.
    #[error(transparent)]
    Mkfs(#[from] ToolError),
    /// `mkfs.erofs` ran and failed.
    #[error("`{program}` failed ({status}) making {image}: {stderr}")]
    MkfsFailed {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The image it was writing.
        image: PathBuf,
        /// What it printed on stderr (last lines).
        stderr: String,
    },
    /// The release's kernel-modules artifact lacks a module needed to mount the image.
    #[error(
        "release `{release}`: the kernel-modules artifact has no `{module}`{}, which the guest \
         needs to mount the GPU disk: add {module}.ko (and its dependencies) to the artifact, or \
         build the initramfs form only",
        needed_by.as_ref().map(|m| format!(" (needed by {m})")).unwrap_or_default()
    )]
    MountModuleMissing {
        /// Release name.
        release: String,
        /// The missing module.
        module: String,
        /// The module whose `depends=` names it.
        needed_by: Option<String>,
    },
    /// The release has no kernel-modules artifact to take the mount modules from.
    #[error(
        "release `{release}` has no kernel-modules artifact, so the GPU disk's mount modules \
         ({}) cannot be resolved: add the kernel-modules artifact, or build the initramfs form only",
        MOUNT_MODULES.join(", ")
    )]
    NoKernelModules {
        /// Release name.
        release: String,
    },
    /// The mount modules found have problems (wrong kernel, unreadable, cycle).
    #[error("release `{release}`: the GPU disk's mount modules failed {} check(s): {}",
        problems.len(),
        problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    MountModuleProblems {
        /// Release name.
        release: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// `veritysetup` ran and failed, or printed no root hash.
    #[error("`{program}` failed ({status}) adding the hash tree to {image}: {stderr}")]
    VerityFailed {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The image.
        image: PathBuf,
        /// What it printed (last lines).
        stderr: String,
    },
    /// `mkfs.erofs` or `veritysetup` could not be started or ran past [`TOOL_LIMIT`].
    #[error("making the GPU disk {image}")]
    Run {
        /// The image being made.
        image: PathBuf,
        /// The run's failure.
        #[source]
        source: RunError,
    },
    /// A file-system operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl Classify for DiskError {
    fn outcome(&self) -> Outcome {
        match self {
            // The release's own modules cannot mount the disk: a reviewer's matter.
            DiskError::MountModuleMissing { .. } | DiskError::MountModuleProblems { .. } => {
                Outcome::VerificationFailed
            }
            DiskError::Mkfs(e) => e.outcome(),
            DiskError::MkfsFailed { .. }
            | DiskError::VerityFailed { .. }
            | DiskError::NoKernelModules { .. }
            | DiskError::Run { .. }
            | DiskError::Io { .. } => Outcome::Failed,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DiskError {
    let context = context.into();
    move |source| DiskError::Io { context, source }
}

/// The mount modules (and, for a verity image, `dm_verity`) and their dependencies from the
/// kernel-modules tree, in load order.
pub(super) fn mount_modules(
    release: &str,
    expect: &Expectations,
    kernel_modules: Option<&Path>,
    verity: bool,
) -> Result<Vec<InspectedModule>, DiskError> {
    let root = kernel_modules.ok_or_else(|| DiskError::NoKernelModules {
        release: release.to_string(),
    })?;
    let mut wanted = MOUNT_MODULES.to_vec();
    if verity {
        wanted.extend(VERITY_MODULES);
    }
    kernel_closure(expect, root, &wanted).map_err(|gap| match gap {
        ClosureGap::Missing { module, needed_by } => DiskError::MountModuleMissing {
            release: release.to_string(),
            module,
            needed_by,
        },
        ClosureGap::Problems(problems) => DiskError::MountModuleProblems {
            release: release.to_string(),
            problems,
        },
    })
}

/// The base-layer files for `modules`: `MODULE_DIR/<name>.ko` each (decompressed) and `ORDER_FILE`, as
/// (archive path without the leading `/`, bytes).
/// and `IMAGE_FILE` naming the image the layer is built with.
pub(super) fn base_files(
    modules: &[InspectedModule],
    binding: &ImageBinding,
) -> Result<Vec<(String, Vec<u8>)>, DiskError> {
    let dir = MODULE_DIR.trim_start_matches('/');
    let mut order = String::new();
    let mut files = Vec::new();
    for m in modules {
        let file = format!("{}.ko", m.name);
        // Plain ELF: the guest init calls finit_module without the compressed-file flag.
        let bytes = crate::modinfo::decompressed_module(&m.source)
            .map_err(io_err(format!("decompressing {}", m.source.display())))?;
        files.push((format!("{dir}/{file}"), bytes));
        order.push_str(&file);
        order.push('\n');
    }
    files.push((
        ORDER_FILE.trim_start_matches('/').to_string(),
        order.into_bytes(),
    ));
    files.push((
        IMAGE_FILE.trim_start_matches('/').to_string(),
        binding.render().into_bytes(),
    ));
    Ok(files)
}

/// A UUID from the cache key (hex): the same inputs give the same image, different ones differ.
pub fn uuid_from_key(key: &str) -> String {
    let mut hex: String = key
        .chars()
        .filter(char::is_ascii_hexdigit)
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    // RFC 4122 version 4 / variant bits, so tools accept it as a UUID.
    hex.replace_range(12..13, "4");
    let variant = u8::from_str_radix(&hex[16..17], 16).unwrap_or(0) & 0x3 | 0x8;
    hex.replace_range(16..17, &format!("{variant:x}"));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Make `dir/IMAGE_NAME` from the tree at `tree` (which becomes the image's root, mounted at
/// `/gpu`), pad it to [`IMAGE_ALIGN`], append a dm-verity hash tree when `verity_salt` is given
/// (hex), and describe it (path relative to `dir`).
pub(super) fn make_image(
    tree: &Path,
    dir: &Path,
    uuid: &str,
    verity_salt: Option<&str>,
) -> Result<(LayerFile, Option<Verity>), DiskError> {
    let image = dir.join(IMAGE_NAME);
    let mkfs = MKFS_EROFS.find()?;
    let output = run_bounded(
        Command::new(&mkfs)
            .arg("--quiet")
            .arg("-T0")
            .arg(format!("-U{uuid}"))
            .arg("--all-root")
            .arg("-Enoinline_data")
            .arg("-Eforce-inode-compact")
            .arg("-x-1")
            .arg(&image)
            .arg(tree)
            .env("LC_ALL", "C"),
        TOOL_LIMIT,
    )
    .map_err(|source| DiskError::Run {
        image: image.clone(),
        source,
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(DiskError::MkfsFailed {
            program: MKFS_EROFS.program,
            status: output.status,
            image,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
        });
    }
    let file = File::options()
        .write(true)
        .open(&image)
        .map_err(io_err(format!("opening {}", image.display())))?;
    let len = file
        .metadata()
        .map_err(io_err(format!("reading {}", image.display())))?
        .len();
    let mut padded = len.div_ceil(IMAGE_ALIGN).max(1) * IMAGE_ALIGN;
    file.set_len(padded)
        .map_err(io_err(format!("padding {}", image.display())))?;
    let verity = match verity_salt {
        Some(salt) => {
            let verity = add_hash_tree(&image, padded, salt)?;
            let total = file
                .metadata()
                .map_err(io_err(format!("reading {}", image.display())))?
                .len();
            padded = total.div_ceil(IMAGE_ALIGN) * IMAGE_ALIGN;
            file.set_len(padded)
                .map_err(io_err(format!("padding {}", image.display())))?;
            Some(verity)
        }
        None => None,
    };
    file.sync_all()
        .map_err(io_err(format!("syncing {}", image.display())))?;
    let sha256 = sha256_file(&image).map_err(io_err(format!("hashing {}", image.display())))?;
    let layer = LayerFile {
        path: PathBuf::from(IMAGE_NAME),
        size: padded,
        sha256,
    };
    Ok((layer, verity))
}

/// Append the dm-verity hash tree of the first `data_len` bytes of `image` to it.
fn add_hash_tree(image: &Path, data_len: u64, salt: &str) -> Result<Verity, DiskError> {
    let program = VERITYSETUP.find()?;
    let blocks = data_len / VERITY_BLOCK;
    let output = run_bounded(
        Command::new(&program)
            .arg("format")
            .arg("--no-superblock")
            .arg(format!("--hash-offset={data_len}"))
            .arg(format!("--data-blocks={blocks}"))
            .arg(format!("--data-block-size={VERITY_BLOCK}"))
            .arg(format!("--hash-block-size={VERITY_BLOCK}"))
            .arg("--hash=sha256")
            .arg(format!("--salt={salt}"))
            .arg(image)
            .arg(image)
            .env("LC_ALL", "C"),
        TOOL_LIMIT,
    )
    .map_err(|source| DiskError::Run {
        image: image.to_path_buf(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let root_hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|v| v.trim().to_ascii_lowercase());
    match root_hash {
        Some(root_hash) if output.status.success() => Ok(Verity {
            root_hash,
            salt: salt.to_ascii_lowercase(),
            data_blocks: blocks,
            hash_start_block: blocks,
        }),
        _ => {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            Err(DiskError::VerityFailed {
                program: VERITYSETUP.program,
                status: output.status,
                image: image.to_path_buf(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            })
        }
    }
}

/// The salt of an image's hash tree: from the cache key, so the same inputs give the same bytes.
pub fn salt_from_key(key: &str) -> String {
    let hex: String = key.chars().filter(char::is_ascii_hexdigit).collect();
    format!("{hex:0<64}")[..64].to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_say_what_they_write() {
        for f in LayerForm::ALL {
            assert_eq!(f.as_str().parse::<LayerForm>().unwrap(), f);
        }
        assert!(LayerForm::Initrd.initramfs() && !LayerForm::Initrd.image());
        assert!(!LayerForm::Disk.initramfs() && LayerForm::Disk.image());
        assert!(LayerForm::Both.initramfs() && LayerForm::Both.image());
        let err = "squashfs".parse::<LayerForm>().unwrap_err().to_string();
        assert!(err.contains("squashfs") && err.contains("disk"), "{err}");
    }

    /// `veritysetup verify` of `image` against `v`.
    fn verifies(image: &Path, v: &Verity) -> bool {
        Command::new(VERITYSETUP.find().unwrap())
            .arg("verify")
            .arg("--no-superblock")
            .arg(format!(
                "--hash-offset={}",
                v.hash_start_block * VERITY_BLOCK
            ))
            .arg(format!("--data-blocks={}", v.data_blocks))
            .arg(format!("--salt={}", v.salt))
            .args([image, image])
            .arg(&v.root_hash)
            .status()
            .unwrap()
            .success()
    }

    #[test]
    fn a_verity_image_carries_a_hash_tree_its_root_hash_proves() {
        if MKFS_EROFS.find().is_err() || VERITYSETUP.find().is_err() {
            eprintln!("skipped: needs erofs-utils and cryptsetup-bin (.ci/run installs them)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("modules")).unwrap();
        std::fs::write(tree.join("modules/nvidia.ko"), vec![7u8; 300_000]).unwrap();
        let key = "ab".repeat(32);
        let uuid = uuid_from_key(&key);
        let salt = salt_from_key(&key);
        let (plain, none) = make_image(&tree, dir.path(), &uuid, None).unwrap();
        assert!(none.is_none());
        let plain_size = plain.size;
        let (layer, verity) = make_image(&tree, dir.path(), &uuid, Some(&salt)).unwrap();
        let v = verity.unwrap();
        assert_eq!(v.salt, salt);
        assert_eq!(
            v.data_blocks * VERITY_BLOCK,
            plain_size,
            "the tree covers the data"
        );
        assert_eq!(v.hash_start_block, v.data_blocks, "appended after it");
        assert!(layer.size > plain_size && layer.size.is_multiple_of(IMAGE_ALIGN));
        let image = dir.path().join(&layer.path);
        assert!(verifies(&image, &v));
        // Reproducible: the same inputs give the same root hash.
        let (_, again) = make_image(&tree, dir.path(), &uuid, Some(&salt)).unwrap();
        assert_eq!(again.unwrap(), v);
        // One byte flipped in the data: the root hash no longer proves it.
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[100_000] ^= 1;
        std::fs::write(&image, &bytes).unwrap();
        assert!(!verifies(&image, &v));
    }

    #[test]
    fn salts_are_64_hex_digits_of_the_key() {
        assert_eq!(salt_from_key(&"c".repeat(80)), "c".repeat(64));
        assert_eq!(salt_from_key("ab"), format!("ab{}", "0".repeat(62)));
    }

    #[test]
    fn uuid_is_a_stable_rfc4122_uuid_of_the_key() {
        let key = "0123456789abcdef0123456789abcdef0123456789abcdef";
        let u = uuid_from_key(key);
        assert_eq!(u, uuid_from_key(key));
        assert_ne!(u, uuid_from_key(&key.replace('0', "f")));
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
    }
}
