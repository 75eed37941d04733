//! The built modules as a deterministic `nvidia-modules` artifact, in the layout `versions add`
//! reads: `lib/modules/<kernel>/kernel/drivers/gpu/<module>.ko`, sorted, owner 0, time 0,
//! modes 0644/0755, gzip without a name or time. The same modules give the same bytes.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};

/// Where the modules go inside the artifact.
pub fn module_dir(kernel_version: &str) -> PathBuf {
    Path::new("lib/modules")
        .join(kernel_version)
        .join("kernel/drivers/gpu")
}

/// Write `modules` (file name → host path; sorted by name) as a `.tar.gz` to `dest`.
pub fn pack(kernel_version: &str, modules: &[(String, PathBuf)], dest: &Path) -> io::Result<()> {
    let file = File::create(dest)?;
    let gz = GzBuilder::new().mtime(0).write(file, Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    let dir = module_dir(kernel_version);
    let mut prefix = PathBuf::new();
    for part in dir.components() {
        prefix.push(part);
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, format!("{}/", prefix.display()), io::empty())?;
    }
    let mut sorted: Vec<&(String, PathBuf)> = modules.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, path) in sorted {
        let bytes = std::fs::read(path)?;
        let mut h = header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
        tar.append_data(&mut h, dir.join(name), bytes.as_slice())?;
    }
    let gz = tar.into_inner()?;
    let mut file = gz.finish()?;
    file.flush()?;
    file.sync_all()
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// The artifact's file name: `nvidia-open-modules-535.261.03-6.1.0-56-amd64-x86_64.tar.gz`
/// (`nvidia-modules-...` for the proprietary flavor; `-signed` before the extension when signed).
pub fn file_name(
    flavor: crate::registry::ModuleFlavor,
    driver_version: &str,
    kernel_version: &str,
    arch: crate::registry::Arch,
    signed: bool,
) -> String {
    let flavor = match flavor {
        crate::registry::ModuleFlavor::Open => "open-",
        crate::registry::ModuleFlavor::Proprietary => "",
    };
    let signed = if signed { "-signed" } else { "" };
    format!("nvidia-{flavor}modules-{driver_version}-{kernel_version}-{arch}{signed}.tar.gz")
}
