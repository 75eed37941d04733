//! `inspect`: the checks that move failures from boot time to build time.
//!
//! Given the extracted artifact trees of one release, [`inspect`] reads every NVIDIA module's
//! `.modinfo`, resolves its dependencies against the kernel-modules tree and `modules.builtin`,
//! finds its firmware, reads the userspace libraries' sonames, and returns the [`Inventory`] the
//! initrd builder packs, with the modules in load order. Every problem found is collected (a
//! driver-upgrade review wants the full list), each naming the file and the fix.
//!
//! Decision on dependencies without a kernel-modules tree: a dependency that is not an NVIDIA
//! module is then assumed to be provided by the guest kernel (built in, or loaded by the
//! platform's own initrd). It is not an error, but it is listed in
//! [`Inventory::external_dependencies`] so the caller can show it. With a kernel-modules tree,
//! such a dependency must resolve there or in its `modules.builtin`.
//!
//! Firmware is required unless the release goes without GSP (proprietary only): a `firmware=`
//! file missing from both the firmware tree and the
//! kernel-modules tree's `lib/firmware` is an error, since the module would fail at load time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use crate::modinfo::{ModInfo, normalize_module_name};
use crate::registry::{Arch, ArtifactKind, ModuleFlavor};

mod closure;
mod libraries;
mod problem;
mod signatures;

pub(crate) use closure::{ClosureGap, kernel_closure};
use libraries::inspect_driver_libs;
pub use problem::{InspectError, Problem};
pub use signatures::{SigningRule, check_tree as check_signatures};

/// What the registry says the artifacts must be.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// The guest kernel's `uname -r`; each module's vermagic must start with it.
    pub kernel_version: &'a str,
    /// The NVIDIA driver version; NVIDIA modules' `version=` and library names must carry it.
    pub driver_version: &'a str,
    /// The architecture every ELF file must be built for.
    pub arch: Arch,
    /// The module flavor the release claims; the modules' `license` fields must agree.
    pub flavor: Option<ModuleFlavor>,
    /// Whether the release ships GSP firmware. Without it (a proprietary release, `gsp =
    /// false`), the modules' `firmware=` lines are not required and no firmware is collected.
    pub gsp: bool,
    /// Who must have signed the NVIDIA modules, and whether the guest kernel refuses unsigned
    /// ones (then every module must carry a signature).
    pub signing: SigningRule<'a>,
}

/// The license the core NVIDIA modules (`nvidia`, `nvidia_modeset`) carry in the proprietary
/// build; the open build says `Dual MIT/GPL`.
pub const PROPRIETARY_LICENSE: &str = "NVIDIA";

/// The modules whose license tells the flavors apart (uvm and drm are open in both builds).
const FLAVOR_MODULES: [&str; 2] = ["nvidia", "nvidia_modeset"];

/// The extracted artifact roots (each the directory an artifact tar was extracted into).
#[derive(Debug, Clone, Copy, Default)]
pub struct Trees<'a> {
    /// The `nvidia-modules` artifact: every `.ko` in it is an NVIDIA module.
    pub nvidia_modules: Option<&'a Path>,
    /// The `kernel-modules` artifact (`lib/modules/<kver>/...`).
    pub kernel_modules: Option<&'a Path>,
    /// The `nvidia-firmware` artifact (`lib/firmware/...`).
    pub firmware: Option<&'a Path>,
    /// The `nvidia-driver-libs` artifact (`usr/lib/...`, `usr/bin/...`).
    pub driver_libs: Option<&'a Path>,
}

impl<'a> Trees<'a> {
    /// The trees of artifacts unpacked at `roots`, by kind (kinds not inspected are ignored).
    pub fn from_roots(roots: &'a BTreeMap<ArtifactKind, PathBuf>) -> Trees<'a> {
        let root = |k: ArtifactKind| roots.get(&k).map(PathBuf::as_path);
        Trees {
            nvidia_modules: root(ArtifactKind::NvidiaModules),
            kernel_modules: root(ArtifactKind::KernelModules),
            firmware: root(ArtifactKind::NvidiaFirmware),
            driver_libs: root(ArtifactKind::NvidiaDriverLibs),
        }
    }
}

/// Everything the GPU layer needs, checked.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Modules in load order (dependencies first; ties broken by name): the NVIDIA modules and
    /// the kernel modules they need that are not built into the kernel.
    pub modules: Vec<InspectedModule>,
    /// Every firmware file the modules name.
    pub firmware: Vec<FirmwareFile>,
    /// Each real (non-symlink) shared library of the driver-libs tree.
    pub libraries: Vec<InspectedLibrary>,
    /// Executables under `usr/bin` of the driver-libs tree (e.g. `nvidia-smi`).
    pub binaries: Vec<PathBuf>,
    /// `usr/share/nvidia/supported-gpus.json` of the driver-libs tree, if present.
    pub supported_gpus: Option<PathBuf>,
    /// Dependencies assumed to be provided by the guest kernel because no kernel-modules tree
    /// was given (normalized names, sorted).
    pub external_dependencies: Vec<String>,
}

/// One kernel module to load.
#[derive(Debug, Clone)]
pub struct InspectedModule {
    /// The module name as the kernel knows it (`name=`, underscores, e.g. `nvidia_uvm`).
    pub name: String,
    /// The `.ko` file.
    pub source: PathBuf,
    /// Its metadata.
    pub info: ModInfo,
    /// Whether it comes from the NVIDIA modules tree.
    pub nvidia: bool,
}

/// One firmware file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareFile {
    /// The path a module asks for, relative to `/lib/firmware` (e.g.
    /// `nvidia/535.261.03/gsp_ga10x.bin`).
    pub rel: PathBuf,
    /// Where it is in the extracted trees.
    pub source: PathBuf,
}

/// One userspace library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InspectedLibrary {
    /// The file name (e.g. `libcuda.so.535.261.03`).
    pub real_name: String,
    /// `DT_SONAME` from its ELF dynamic section (e.g. `libcuda.so.1`).
    pub soname: Option<String>,
    /// The file in the extracted tree.
    pub source: PathBuf,
}

/// Inspect the extracted artifact trees against what the release expects, resolving the
/// dependencies of every NVIDIA module.
pub fn inspect(expect: &Expectations, trees: &Trees) -> Result<Inventory, InspectError> {
    inspect_for(expect, trees, None)
}

/// [`inspect`], resolving dependencies only from `roots` (NVIDIA module names, either spelling),
/// the modules a layer will carry: an unused module's missing dependency (`nvidia_peermem`
/// without `ib_core`) must not block a layer that leaves it out. `None` means every NVIDIA module.
pub fn inspect_for(
    expect: &Expectations,
    trees: &Trees,
    roots: Option<&[String]>,
) -> Result<Inventory, InspectError> {
    with_driver_libs(
        inspect_kernel_side(expect, trees, roots),
        expect,
        trees.driver_libs,
    )
}

/// The first half of [`inspect_for`]: the modules and firmware, everything but the driver-libs
/// tree (which is ignored here). A builder can start on them while the driver libraries, the
/// largest artifact, are still being unpacked, then finish with [`with_driver_libs`].
pub fn inspect_kernel_side(
    expect: &Expectations,
    trees: &Trees,
    roots: Option<&[String]>,
) -> Result<Inventory, InspectError> {
    let mut problems = Vec::new();
    signatures::check_release(expect.signing, &mut problems);

    // NVIDIA modules: every .ko in the tree.
    let mut nvidia: BTreeMap<String, InspectedModule> = BTreeMap::new();
    if let Some(root) = trees.nvidia_modules {
        let files = module_files(root, &mut problems);
        if files.is_empty() {
            problems.push(Problem::NoNvidiaModules {
                tree: root.to_path_buf(),
            });
        }
        for file in files {
            if let Some(module) = load_module(&file, true, &mut problems) {
                check_module(expect, &module, &mut problems);
                insert_unique(&mut nvidia, module, &mut problems);
            }
        }
    }

    // Kernel modules: indexed by file name, read only when needed.
    let kernel_dir = trees
        .kernel_modules
        .map(|root| root.join("lib/modules").join(expect.kernel_version));
    let mut kernel_index: HashMap<String, Vec<PathBuf>> = HashMap::new();
    let mut builtin: BTreeSet<String> = BTreeSet::new();
    if let Some(dir) = &kernel_dir {
        for file in module_files(dir, &mut problems) {
            if let Some(stem) = module_stem(&file) {
                kernel_index.entry(stem).or_default().push(file);
            }
        }
        builtin = read_builtin(&dir.join("modules.builtin"));
    }

    // Close over dependencies, breadth first from the roots (sorted, so deterministic). Every
    // NVIDIA module stays in the inventory; only the reached ones have their dependencies resolved.
    let mut selected: BTreeMap<String, InspectedModule> = nvidia.clone();
    let mut external: BTreeSet<String> = BTreeSet::new();
    let mut queue: Vec<String> = match roots {
        None => selected.keys().cloned().collect(),
        Some(roots) => {
            let roots: BTreeSet<String> = roots.iter().map(|r| normalize_module_name(r)).collect();
            selected
                .keys()
                .filter(|k| roots.contains(*k))
                .cloned()
                .collect()
        }
    };
    let mut reached: BTreeSet<String> = queue.iter().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut head = 0;
    while head < queue.len() {
        let name = queue[head].clone();
        head += 1;
        let Some(module) = selected.get(&name) else {
            continue;
        };
        let (source, depends) = (module.source.clone(), module.info.depends());
        for dep in depends {
            let dep_name = normalize_module_name(&dep);
            if selected.contains_key(&dep_name) {
                if reached.insert(dep_name.clone()) {
                    queue.push(dep_name.clone());
                }
                edges.entry(name.clone()).or_default().insert(dep_name);
                continue;
            }
            if let Some(files) = kernel_index.get(&dep_name) {
                let mut found = None;
                for file in files {
                    if let Some(m) = load_module(file, false, &mut problems)
                        && m.name == dep_name
                    {
                        found = Some(m);
                        break;
                    }
                }
                if let Some(m) = found {
                    check_module(expect, &m, &mut problems);
                    selected.insert(dep_name.clone(), m);
                    reached.insert(dep_name.clone());
                    queue.push(dep_name.clone());
                    edges.entry(name.clone()).or_default().insert(dep_name);
                    continue;
                }
            }
            if builtin.contains(&dep_name) {
                continue;
            }
            if kernel_dir.is_none() {
                external.insert(dep_name);
                continue;
            }
            problems.push(Problem::UnresolvedDependency {
                file: source.clone(),
                module: name.clone(),
                dependency: dep,
            });
        }
    }

    let order = load_order(&selected, &edges, &mut problems);
    let modules: Vec<InspectedModule> = order
        .into_iter()
        .filter_map(|name| selected.remove(&name))
        .collect();

    if !expect.gsp && expect.flavor != Some(ModuleFlavor::Proprietary) {
        problems.push(Problem::OpenWithoutGsp);
    }
    let firmware = if expect.gsp {
        find_firmware(trees, &modules, &mut problems)
    } else {
        Vec::new()
    };
    if problems.is_empty() {
        Ok(Inventory {
            modules,
            firmware,
            libraries: Vec::new(),
            binaries: Vec::new(),
            supported_gpus: None,
            external_dependencies: external.into_iter().collect(),
        })
    } else {
        Err(InspectError::Rejected { problems })
    }
}

/// The second half of [`inspect_for`]: the driver-libs tree at `driver_libs` added to what
/// [`inspect_kernel_side`] found. Its problems come after the kernel side's, as one list.
pub fn with_driver_libs(
    kernel_side: Result<Inventory, InspectError>,
    expect: &Expectations,
    driver_libs: Option<&Path>,
) -> Result<Inventory, InspectError> {
    let (inventory, mut problems) = match kernel_side {
        Ok(inventory) => (Some(inventory), Vec::new()),
        Err(InspectError::Rejected { problems }) => (None, problems),
    };
    let (libraries, binaries, supported_gpus) = match driver_libs {
        Some(root) => inspect_driver_libs(expect, root, &mut problems),
        None => (Vec::new(), Vec::new(), None),
    };
    match inventory {
        Some(inventory) if problems.is_empty() => Ok(Inventory {
            libraries,
            binaries,
            supported_gpus,
            ..inventory
        }),
        _ => Err(InspectError::Rejected { problems }),
    }
}

fn insert_unique(
    map: &mut BTreeMap<String, InspectedModule>,
    module: InspectedModule,
    problems: &mut Vec<Problem>,
) {
    if let Some(first) = map.get(&module.name) {
        problems.push(Problem::DuplicateModule {
            name: module.name.clone(),
            first: first.source.clone(),
            second: module.source,
        });
        return;
    }
    map.insert(module.name.clone(), module);
}

fn load_module(file: &Path, nvidia: bool, problems: &mut Vec<Problem>) -> Option<InspectedModule> {
    match ModInfo::from_path(file) {
        Ok(info) => {
            let name = info
                .name()
                .map(normalize_module_name)
                .or_else(|| module_stem(file))
                .unwrap_or_default();
            Some(InspectedModule {
                name,
                source: file.to_path_buf(),
                info,
                nvidia,
            })
        }
        Err(e) => {
            problems.push(Problem::Unreadable {
                file: file.to_path_buf(),
                reason: e.to_string(),
            });
            None
        }
    }
}

fn check_module(expect: &Expectations, module: &InspectedModule, problems: &mut Vec<Problem>) {
    let file = &module.source;
    match module.info.vermagic_release() {
        None => problems.push(Problem::NoVermagic { file: file.clone() }),
        Some(release) if release != expect.kernel_version => problems.push(Problem::WrongKernel {
            file: file.clone(),
            built_for: release.to_string(),
            expected: expect.kernel_version.to_string(),
        }),
        Some(_) => {}
    }
    if let Some(claimed) = expect.flavor
        && module.nvidia
        && FLAVOR_MODULES.contains(&module.name.as_str())
    {
        let license = module.info.get("license").unwrap_or("none");
        let actual = if license == PROPRIETARY_LICENSE {
            ModuleFlavor::Proprietary
        } else {
            ModuleFlavor::Open
        };
        if actual != claimed {
            problems.push(Problem::WrongFlavor {
                file: file.clone(),
                module: module.name.clone(),
                license: license.to_string(),
                actual,
                claimed,
            });
        }
    }
    if module.nvidia && module.info.version() != Some(expect.driver_version) {
        problems.push(Problem::WrongDriverVersion {
            file: file.clone(),
            found: module.info.version().unwrap_or("none").to_string(),
            expected: expect.driver_version.to_string(),
        });
    }
    signatures::check_module(expect.signing, module, problems);
    let expected = expect.arch.elf_machine();
    if module.info.elf_machine() != expected {
        problems.push(Problem::WrongArch {
            file: file.clone(),
            machine: module.info.elf_machine(),
            arch: expect.arch,
            expected,
        });
    }
}

/// Kahn's algorithm over the selected modules; among the modules ready to load, the
/// alphabetically first goes next, so the order is stable.
fn load_order(
    selected: &BTreeMap<String, InspectedModule>,
    edges: &BTreeMap<String, BTreeSet<String>>,
    problems: &mut Vec<Problem>,
) -> Vec<String> {
    let mut pending: BTreeMap<&str, usize> = selected
        .keys()
        .map(|name| {
            let deps = edges
                .get(name)
                .map(|d| d.iter().filter(|x| selected.contains_key(*x)).count())
                .unwrap_or(0);
            (name.as_str(), deps)
        })
        .collect();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (module, deps) in edges {
        for dep in deps {
            dependents
                .entry(dep.as_str())
                .or_default()
                .push(module.as_str());
        }
    }
    let mut ready: BTreeSet<&str> = pending
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(name, _)| *name)
        .collect();
    let mut order = Vec::with_capacity(selected.len());
    while let Some(next) = ready.pop_first() {
        pending.remove(next);
        order.push(next.to_string());
        for dependent in dependents.get(next).into_iter().flatten() {
            if let Some(n) = pending.get_mut(dependent) {
                *n -= 1;
                if *n == 0 {
                    ready.insert(dependent);
                }
            }
        }
    }
    if !pending.is_empty() {
        problems.push(Problem::DependencyCycle {
            modules: pending.keys().copied().collect::<Vec<_>>().join(","),
        });
    }
    order
}

fn find_firmware(
    trees: &Trees,
    modules: &[InspectedModule],
    problems: &mut Vec<Problem>,
) -> Vec<FirmwareFile> {
    let roots: Vec<PathBuf> = [trees.firmware, trees.kernel_modules]
        .into_iter()
        .flatten()
        .flat_map(|root| [root.join("lib/firmware"), root.join("usr/lib/firmware")])
        .collect();
    let mut found: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for module in modules {
        for firmware in module.info.firmware() {
            let rel = PathBuf::from(&firmware);
            if found.contains_key(&rel) {
                continue;
            }
            // Only plain relative names: a module cannot make us look outside the trees.
            let plain = rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
            let source = roots
                .iter()
                .map(|root| root.join(&rel))
                .find(|path| plain && path.is_file());
            match source {
                Some(source) => {
                    found.insert(rel, source);
                }
                None => problems.push(Problem::MissingFirmware {
                    file: module.source.clone(),
                    firmware,
                }),
            }
        }
    }
    found
        .into_iter()
        .map(|(rel, source)| FirmwareFile { rel, source })
        .collect()
}

/// `drm_kms_helper` from `.../drm_kms_helper.ko[.xz|.zst|.gz]`, normalized.
fn module_stem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let stem = name
        .strip_suffix(".ko")
        .or_else(|| name.strip_suffix(".ko.xz"))
        .or_else(|| name.strip_suffix(".ko.zst"))
        .or_else(|| name.strip_suffix(".ko.gz"))?;
    Some(normalize_module_name(stem))
}

fn read_builtin(path: &Path) -> BTreeSet<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| module_stem(Path::new(line.trim())))
        .collect()
}

fn module_files(root: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    regular_files(root, problems)
        .into_iter()
        .filter(|p| module_stem(p).is_some())
        .collect()
}

/// Every regular file under `root`, sorted, not following symlinks.
fn regular_files(root: &Path, problems: &mut Vec<Problem>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                if dir.as_path() != root || e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(Problem::Unreadable {
                        file: dir.clone(),
                        reason: format!("cannot list the directory: {e}"),
                    });
                }
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => out.push(path),
                _ => {}
            }
        }
    }
    out.sort();
    out
}
