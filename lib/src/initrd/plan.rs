//! What goes into the GPU layer: the modules (with the dependencies they need), firmware,
//! libraries with their soname links, programs and the manifest, decided before a byte is
//! written. The layer is written in two parts, each in path order: the kernel side (modules
//! and firmware), which is known before the driver libraries (the largest artifact) are
//! unpacked, so a build can start writing it meanwhile; then the userspace side.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use gpu_passthrough_guest_contract as manifest;

use super::{BuildOptions, InitrdError, io_err};
use crate::archive::cpio::CpioWriter;
use crate::failpoint::Failpoint;
use crate::inspect::{InspectedModule, Inventory};
use crate::registry::Release;

/// What goes into the GPU layer, decided before a byte is written.
pub(super) struct GpuLayerPlan {
    kernel_side: KernelSide,
    /// The driver's libraries and programs, the guest init and the manifest, with the parents
    /// the kernel side does not already have.
    userspace: Entries,
    pub(super) manifest: manifest::Manifest,
}

/// Archive path → what to put there, sorted by path (parents before children).
type Entries = BTreeMap<String, Source>;

/// The modules and firmware of the layer, with their parents: what [`GpuLayerPlan::write`]
/// writes first.
#[derive(PartialEq, Eq)]
pub(super) struct KernelSide {
    entries: Entries,
    modules: Vec<manifest::Module>,
    firmware: Vec<String>,
}

#[derive(PartialEq, Eq)]
enum Source {
    Dir,
    File {
        from: PathBuf,
        mode: u32,
    },
    /// A kernel module, written decompressed: the guest's `finit_module` is called without
    /// `MODULE_INIT_COMPRESSED_FILE`, so a `.ko.xz` would fail `ENOEXEC`.
    Module {
        from: PathBuf,
    },
    GuestInit,
    Manifest,
    Symlink(String),
}

impl KernelSide {
    /// The kernel side of the layer for `inv` (its modules and firmware; its driver libraries,
    /// if any, are not looked at).
    pub(super) fn new(
        release: &Release,
        options: &BuildOptions,
        inv: &Inventory,
    ) -> Result<Self, InitrdError> {
        let mut entries = BTreeMap::new();
        let modules = select_modules(release, options, inv)?;
        let mut manifest_modules = Vec::new();
        for m in &modules {
            let file = m
                .source
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_else(|| format!("{}.ko", m.name));
            let file = [".xz", ".zst", ".gz"]
                .iter()
                .find_map(|ext| file.strip_suffix(ext).filter(|f| f.ends_with(".ko")))
                .map(str::to_string)
                .unwrap_or(file);
            let path = format!("gpu/modules/{file}");
            entries.insert(
                path.clone(),
                Source::Module {
                    from: m.source.clone(),
                },
            );
            manifest_modules.push(manifest::Module {
                name: m.name.clone(),
                path: format!("/{path}"),
                params: module_params(release, options, &m.name),
                depends: m
                    .info
                    .depends()
                    .iter()
                    .map(|d| manifest::normalize_module_name(d))
                    .collect(),
                vermagic: m.info.vermagic().unwrap_or_default().to_string(),
                nvidia: m.nvidia,
            });
        }
        let mut firmware = Vec::new();
        for fw in &inv.firmware {
            // Under /gpu, not /lib/firmware: the layer must append cleanly to a usrmerge root.
            let path = format!(
                "{}/{}",
                manifest::FIRMWARE_DIR.trim_start_matches('/'),
                fw.rel.display()
            );
            entries.insert(
                path.clone(),
                Source::File {
                    from: fw.source.clone(),
                    mode: 0o644,
                },
            );
            firmware.push(format!("/{path}"));
        }
        add_parents(&mut entries, &BTreeMap::new());
        Ok(KernelSide {
            entries,
            modules: manifest_modules,
            firmware,
        })
    }

    /// Write the kernel side's entries.
    pub(super) fn write<W: Write>(&self, cpio: &mut CpioWriter<W>) -> Result<(), InitrdError> {
        // It holds neither the guest init nor the manifest (the userspace side's).
        write_entries(cpio, &self.entries, b"", b"")
    }
}

impl GpuLayerPlan {
    pub(super) fn new(
        release: &Release,
        options: &BuildOptions,
        driver_version: &str,
        inv: &Inventory,
        inputs: Vec<manifest::Input>,
    ) -> Result<Self, InitrdError> {
        let kernel_side = KernelSide::new(release, options, inv)?;
        let mut entries = BTreeMap::new();
        let selection = super::select::select(release, options, inv)?;
        let mut libraries = Vec::new();
        for lib in selection.libraries {
            let path = format!("gpu/lib/{}", lib.real_name);
            entries.insert(
                path.clone(),
                Source::File {
                    from: lib.source.clone(),
                    mode: 0o755,
                },
            );
            if let Some(soname) = lib.soname.as_ref().filter(|s| **s != lib.real_name) {
                entries.insert(
                    format!("gpu/lib/{soname}"),
                    Source::Symlink(lib.real_name.clone()),
                );
            }
            libraries.push(manifest::Library {
                path: format!("/{path}"),
                soname: lib.soname.clone(),
            });
        }
        // gpu-init is in the layer for other inits to call, but is not the workload's program:
        // it stays out of `binaries`, which the guest puts on the workload's PATH.
        let mut binaries = Vec::new();
        entries.insert("gpu/bin/gpu-init".into(), Source::GuestInit);
        for bin in selection.binaries {
            let Some(name) = bin.file_name() else {
                continue;
            };
            let path = format!("gpu/bin/{}", name.to_string_lossy());
            entries.insert(
                path.clone(),
                Source::File {
                    from: bin.clone(),
                    mode: 0o755,
                },
            );
            binaries.push(format!("/{path}"));
        }
        binaries.sort();
        entries.insert("gpu/manifest.json".into(), Source::Manifest);
        add_parents(&mut entries, &kernel_side.entries);
        let manifest = manifest::Manifest {
            schema: manifest::SCHEMA,
            release: release.name.clone(),
            arch: options.arch.as_str().to_string(),
            kernel_version: release.kernel_version.clone(),
            driver_version: driver_version.to_string(),
            module_flavor: release
                .module_flavor
                .map_or("open", |f| f.as_str())
                .to_string(),
            modules: kernel_side.modules.clone(),
            firmware: kernel_side.firmware.clone(),
            libraries,
            binaries,
            device_nodes: options.device_nodes,
            inputs,
            capabilities: selection.capabilities,
        };
        Ok(GpuLayerPlan {
            kernel_side,
            userspace: entries,
            manifest,
        })
    }

    pub(super) fn manifest_json(&self) -> Result<Vec<u8>, InitrdError> {
        let mut v = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| io_err("serializing the manifest")(io::Error::other(e)))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Write the whole GPU layer's entries: the kernel side, then the userspace side.
    pub(super) fn write<W: Write>(
        &self,
        cpio: &mut CpioWriter<W>,
        guest_init: &[u8],
    ) -> Result<(), InitrdError> {
        self.kernel_side.write(cpio)?;
        self.write_userspace(cpio, guest_init, &self.kernel_side)
    }

    /// Write the userspace side, after `written` (this plan's kernel side, as written before
    /// the plan was complete).
    pub(super) fn write_userspace<W: Write>(
        &self,
        cpio: &mut CpioWriter<W>,
        guest_init: &[u8],
        written: &KernelSide,
    ) -> Result<(), InitrdError> {
        // The same inventory's modules and firmware give the same kernel side.
        debug_assert!(
            *written == self.kernel_side,
            "the kernel side written is this plan's"
        );
        Failpoint::InitrdMidway.hit();
        write_entries(cpio, &self.userspace, guest_init, &self.manifest_json()?)
    }

    /// Every entry, the kernel side's first.
    fn entries(&self) -> impl Iterator<Item = (&String, &Source)> {
        self.kernel_side.entries.iter().chain(&self.userspace)
    }
}

/// Add to `entries` every parent directory of its paths that neither it nor `written` has: the
/// kernel's unpacker does not create missing parents.
fn add_parents(entries: &mut Entries, written: &Entries) {
    let parents: BTreeSet<String> = entries.keys().flat_map(|p| parents_of(p)).collect();
    for p in parents.into_iter().filter(|p| !written.contains_key(p)) {
        entries.entry(p).or_insert(Source::Dir);
    }
}

fn write_entries<W: Write>(
    cpio: &mut CpioWriter<W>,
    entries: &Entries,
    guest_init: &[u8],
    manifest: &[u8],
) -> Result<(), InitrdError> {
    for (path, source) in entries {
        match source {
            Source::Dir => cpio.directory(path, 0o755)?,
            Source::Symlink(target) => cpio.symlink(path, target)?,
            Source::GuestInit => {
                cpio.file(path, 0o755, guest_init.len() as u64, &mut &guest_init[..])?
            }
            Source::Manifest => {
                cpio.file(path, 0o644, manifest.len() as u64, &mut &manifest[..])?
            }
            Source::Module { from } => {
                let bytes = crate::modinfo::decompressed_module(from)
                    .map_err(io_err(format!("decompressing {}", from.display())))?;
                cpio.file(path, 0o644, bytes.len() as u64, &mut &bytes[..])?;
            }
            Source::File { from, mode } => {
                let mut f =
                    File::open(from).map_err(io_err(format!("reading {}", from.display())))?;
                let size = f
                    .metadata()
                    .map_err(io_err(format!("reading {}", from.display())))?
                    .len();
                cpio.file(path, *mode, size, &mut f)?;
            }
        }
    }
    Ok(())
}

impl GpuLayerPlan {
    /// Write the `/gpu` part of the layer as a directory tree at `root` (which stands for
    /// `/gpu`), for the disk image: the same entries, modes and bytes as the cpio layer.
    pub(super) fn materialize(&self, root: &Path, guest_init: &[u8]) -> Result<(), InitrdError> {
        use std::os::unix::fs::PermissionsExt;
        let manifest = self.manifest_json()?;
        fs::create_dir_all(root).map_err(io_err(format!("creating {}", root.display())))?;
        for (path, source) in self.entries() {
            let Some(rel) = path.strip_prefix("gpu/") else {
                continue;
            };
            let dest = root.join(rel);
            let ctx = || format!("writing {}", dest.display());
            let mode = match source {
                Source::Dir => {
                    fs::create_dir_all(&dest).map_err(io_err(ctx()))?;
                    0o755
                }
                Source::Symlink(target) => {
                    std::os::unix::fs::symlink(target, &dest).map_err(io_err(ctx()))?;
                    continue;
                }
                Source::GuestInit => {
                    fs::write(&dest, guest_init).map_err(io_err(ctx()))?;
                    0o755
                }
                Source::Manifest => {
                    fs::write(&dest, &manifest).map_err(io_err(ctx()))?;
                    0o644
                }
                Source::Module { from } => {
                    let bytes = crate::modinfo::decompressed_module(from)
                        .map_err(io_err(format!("decompressing {}", from.display())))?;
                    fs::write(&dest, bytes).map_err(io_err(ctx()))?;
                    0o644
                }
                Source::File { from, mode } => {
                    fs::copy(from, &dest).map_err(io_err(ctx()))?;
                    *mode
                }
            };
            fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(io_err(ctx()))?;
        }
        Ok(())
    }
}

/// The parameters `name` is loaded with: the caller's, plus `NVreg_EnableGpuFirmware=0` for
/// `nvidia` of a release without GSP firmware (the proprietary modules would otherwise try to
/// load the firmware the layer does not carry).
pub fn module_params(release: &Release, options: &BuildOptions, name: &str) -> String {
    let mut params: Vec<String> = options
        .module_params
        .get(name)
        .cloned()
        .into_iter()
        .collect();
    if name == "nvidia" && !release.gsp {
        params.push(NO_GSP_PARAM.to_string());
    }
    params.join(" ")
}

/// The `nvidia` parameter that keeps the proprietary driver off GSP firmware.
pub(super) const NO_GSP_PARAM: &str = "NVreg_EnableGpuFirmware=0";

/// The requested NVIDIA modules and everything they depend on, in the inventory's load order.
fn select_modules<'i>(
    release: &Release,
    options: &BuildOptions,
    inv: &'i Inventory,
) -> Result<Vec<&'i InspectedModule>, InitrdError> {
    let by_name: BTreeMap<&str, &InspectedModule> =
        inv.modules.iter().map(|m| (m.name.as_str(), m)).collect();
    let mut wanted = BTreeSet::new();
    let mut stack: Vec<String> = Vec::new();
    for m in &options.modules {
        let m = manifest::normalize_module_name(m);
        if !by_name.get(m.as_str()).is_some_and(|x| x.nvidia) {
            let available = inv
                .modules
                .iter()
                .filter(|x| x.nvidia)
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(InitrdError::UnknownModule {
                module: m,
                release: release.name.clone(),
                available,
            });
        }
        stack.push(m);
    }
    while let Some(name) = stack.pop() {
        if !wanted.insert(name.clone()) {
            continue;
        }
        if let Some(m) = by_name.get(name.as_str()) {
            stack.extend(
                m.info
                    .depends()
                    .iter()
                    .map(|d| manifest::normalize_module_name(d)),
            );
        }
        // A dependency the inventory does not list is built into the kernel (inspect checked).
    }
    Ok(inv
        .modules
        .iter()
        .filter(|m| wanted.contains(&m.name))
        .collect())
}

fn parents_of(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = path;
    while let Some(i) = cur.rfind('/') {
        cur = &cur[..i];
        out.push(cur.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_listed_deepest_first() {
        assert_eq!(parents_of("gpu/lib/libcuda.so.1"), ["gpu/lib", "gpu"]);
        assert!(parents_of("init").is_empty());
    }
}
