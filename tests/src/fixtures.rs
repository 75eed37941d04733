//! The real artifacts in `shared/fixtures/` (a Debian kernel, its modules, NVIDIA 535.261.03 open
//! modules, GSP firmware and libraries) and their `SHA256SUMS`.
//!
//! The directory is `$GPU_PASSTHROUGH_FIXTURES` when set, else the first `shared/fixtures` found
//! walking up from this crate (`../shared/fixtures` beside a checkout; beside the main checkout
//! for a worktree under it), else `e2e/work/fixtures` (made there by `e2e/run`). The build script looks it up: without it this crate does not build,
//! with one message saying how to get the fixtures, never a silent skip.
//!
//! ```no_run
//! use gpu_passthrough_tests::fixtures;
//! let kernel = fixtures::path(fixtures::KERNEL);                 // absolute path
//! let digest = fixtures::sha256sums()[fixtures::KERNEL].clone(); // lowercase hex
//! # drop((kernel, digest));
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The guest kernel image (bzImage).
pub const KERNEL: &str = "linux-6.1.0-56-amd64/vmlinuz";
/// The guest kernel's `uname -r`.
pub const KERNEL_VERSION: &str = "6.1.0-56-amd64";
/// The kernel's own modules (tar.gz).
pub const KERNEL_MODULES: &str = "linux-6.1.0-56-amd64/kernel-modules-6.1.0-56-amd64-x86_64.tar.gz";
/// [`KERNEL_MODULES`] plus the virtio-pmem/nvdimm modules a guest needs to mount a GPU disk.
pub const KERNEL_MODULES_PMEM: &str =
    "linux-6.1.0-56-amd64/kernel-modules-6.1.0-56-amd64-pmem-x86_64.tar.gz";
/// [`KERNEL_MODULES_PMEM`] plus `dm_verity` and its dependencies: what a guest needs to open the
/// GPU disk through dm-verity.
pub const KERNEL_MODULES_VERITY: &str =
    "linux-6.1.0-56-amd64/kernel-modules-6.1.0-56-amd64-verity-x86_64.tar.gz";
/// The NVIDIA driver version of the fixtures.
pub const DRIVER_VERSION: &str = "535.261.03";
/// The NVIDIA open kernel modules built for [`KERNEL_VERSION`] (tar.gz).
pub const NVIDIA_MODULES: &str =
    "nvidia-535.261.03/nvidia-open-modules-535.261.03-6.1.0-56-amd64-x86_64.tar.gz";
/// The GSP firmware (tar.gz).
pub const NVIDIA_FIRMWARE: &str = "nvidia-535.261.03/nvidia-gsp-firmware-535.261.03.tar.gz";
/// The NVIDIA userspace libraries and tools (tar.gz).
pub const NVIDIA_DRIVER_LIBS: &str =
    "nvidia-535.261.03/nvidia-driver-libs-535.261.03-x86_64.tar.gz";
/// The proprietary 535.309.01 driver (no GSP firmware is shipped for it, on purpose).
pub const PROPRIETARY_DRIVER_VERSION: &str = "535.309.01";
/// Its kernel modules (tar.gz).
pub const PROPRIETARY_MODULES: &str =
    "nvidia-535.309.01/nvidia-modules-535.309.01-6.1.0-56-amd64-x86_64.tar.gz";
/// Its libraries and tools, with the video ones (tar.gz).
pub const PROPRIETARY_DRIVER_LIBS: &str =
    "nvidia-535.309.01/nvidia-driver-libs-535.309.01-x86_64.tar.gz";

/// The artifacts of a 535.309.01 proprietary release without GSP firmware.
pub fn proprietary_artifacts() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("kernel-modules", path(KERNEL_MODULES)),
        ("nvidia-modules", path(PROPRIETARY_MODULES)),
        ("nvidia-driver-libs", path(PROPRIETARY_DRIVER_LIBS)),
    ]
}

/// NVIDIA's supported-GPU list.
pub const SUPPORTED_GPUS: &str = "nvidia-535.261.03/supported-gpus.json";

/// The fixtures directory (see the module docs): `$GPU_PASSTHROUGH_FIXTURES` at run time if set,
/// else the one the build found. Panics with the fix when the variable names no fixtures.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("GPU_PASSTHROUGH_FIXTURES") {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("SHA256SUMS").is_file(),
            "GPU_PASSTHROUGH_FIXTURES={} has no SHA256SUMS; point it at the fixtures directory",
            dir.display()
        );
        return dir;
    }
    PathBuf::from(env!("GPU_PASSTHROUGH_FIXTURES_DIR"))
}

/// The absolute path of a fixture given relative to the fixtures directory.
pub fn path(relative: &str) -> PathBuf {
    dir().join(relative)
}

/// `SHA256SUMS` as relative path (no leading `./`) → lowercase hex digest.
pub fn sha256sums() -> BTreeMap<String, String> {
    let file = dir().join("SHA256SUMS");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    parse_sha256sums(&text)
}

/// Parse `sha256sum` output (`<hex>  <path>` or `<hex> *<path>` lines).
pub fn parse_sha256sums(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (hex, name) = line.split_once(char::is_whitespace)?;
            let name = name.trim_start().trim_start_matches('*');
            let name = name.strip_prefix("./").unwrap_or(name);
            Some((name.to_string(), hex.to_ascii_lowercase()))
        })
        .collect()
}

/// The four artifacts of a GPU release made from the fixtures, as (registry kind, absolute path).
pub fn gpu_artifacts() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("kernel-modules", path(KERNEL_MODULES)),
        ("nvidia-modules", path(NVIDIA_MODULES)),
        ("nvidia-firmware", path(NVIDIA_FIRMWARE)),
        ("nvidia-driver-libs", path(NVIDIA_DRIVER_LIBS)),
    ]
}

/// A registry file at `dir/registry.toml` with one release of driver 535.261.03 whose artifacts
/// are `file://` URLs of `artifacts`, pinned (digest and size computed here) when `pinned`.
pub fn write_registry(
    dir: &Path,
    release: &str,
    kernel_version: &str,
    artifacts: &[(&str, PathBuf)],
    pinned: bool,
) -> PathBuf {
    let header = format!(
        "kernel_version = \"{kernel_version}\"\ndriver_version = \"{DRIVER_VERSION}\"\n\
         module_flavor = \"open\"\n"
    );
    write_registry_with(dir, release, &header, artifacts, pinned)
}

/// [`write_registry`] with the release's own fields (`header`: TOML lines such as
/// `driver_version = "..."`).
pub fn write_registry_with(
    dir: &Path,
    release: &str,
    header: &str,
    artifacts: &[(&str, PathBuf)],
    pinned: bool,
) -> PathBuf {
    use sha2::{Digest, Sha256};
    let mut toml = format!("[releases.\"{release}\"]\n{header}");
    for (kind, file) in artifacts {
        toml += &format!(
            "\n[[releases.\"{release}\".artifacts.x86_64]]\nkind = \"{kind}\"\nurl = \"file://{}\"\n",
            file.display()
        );
        if pinned {
            let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            toml += &format!(
                "sha256 = \"{}\"\nsize = {}\n",
                hex::encode(Sha256::digest(&bytes)),
                bytes.len()
            );
        }
    }
    let out = dir.join("registry.toml");
    std::fs::write(&out, toml).unwrap();
    out
}

/// A minimal static x86_64 ELF standing in for gpu-init: the builder checks only that it is one.
pub fn guest_init_stand_in(dir: &Path) -> PathBuf {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    (h[4], h[5], h[6], h[16], h[18], h[20], h[52]) = (2, 1, 1, 2, 62, 1, 64);
    let out = dir.join("gpu-init");
    std::fs::write(&out, h).unwrap();
    out
}

/// A scratch directory that lives as long as the test process: `base/name-<pid>`.
///
/// For trees a whole test binary shares (extracted once, kept in a `static`). A `static`
/// `TempDir` is never dropped, so it would leak hundreds of megabytes into `/tmp` per run; this
/// one sits under cargo's `CARGO_TARGET_TMPDIR` (pass `env!("CARGO_TARGET_TMPDIR")`), and the
/// directories of earlier runs, whose process is gone, are removed when a new one is made. The
/// pid keeps a child process of the same test binary from touching its parent's directory.
pub fn process_scratch(base: &str, name: &str) -> PathBuf {
    let base = Path::new(base);
    let prefix = format!("{name}-");
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(pid) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let dir = base.join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// Re-pack the tarball `input` into `out` (gzip), passing each `.ko` entry's path and bytes
/// through `edit`, which returns the entry's new path and bytes; other entries are copied.
pub fn repack_modules(
    input: &Path,
    out: &Path,
    mut edit: impl FnMut(&str, Vec<u8>) -> (String, Vec<u8>),
) {
    use std::io::Read;
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(out).unwrap(),
        flate2::Compression::fast(),
    );
    let mut builder = tar::Builder::new(gz);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(input).unwrap(),
    ));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut header = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if path.ends_with(".ko") {
            let (path, data) = edit(&path, data);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, path, &data[..]).unwrap();
        } else {
            builder.append(&header, &data[..]).unwrap();
        }
    }
    builder.into_inner().unwrap().finish().unwrap();
}

/// The tarball `input` with every `.ko` xz-compressed to `.ko.xz`, as distributions ship them,
/// written to `out`. Returns each module's original bytes by file name.
pub fn xz_compress_modules(input: &Path, out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut originals = BTreeMap::new();
    repack_modules(input, out, |path, data| {
        let xz = liblzma::encode_all(&data[..], 1).unwrap();
        let name = Path::new(path).file_name().unwrap().to_string_lossy();
        originals.insert(name.into_owned(), data);
        (format!("{path}.xz"), xz)
    });
    originals
}

/// A gzip-compressed tar of regular files (mode 0644; parents left implicit), `(path, bytes)`.
pub fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, *bytes).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// A tar with one entry whose raw name and link target are given (a symlink when `link` is
/// set), bytes the `tar` crate's safe setters would refuse to write: hostile archives for tests.
pub fn raw_tar(path: &[u8], link: Option<&[u8]>) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    let old = h.as_old_mut();
    old.name[..path.len()].copy_from_slice(path);
    if let Some(link) = link {
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(if link.is_some() {
        tar::EntryType::Symlink
    } else {
        tar::EntryType::Regular
    });
    h.set_size(0);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, &[][..]).unwrap();
    tar.into_inner().unwrap()
}
