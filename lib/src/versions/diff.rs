//! What changes from release A to release B: the kernel, the driver, the modules the guest loads
//! (and with which parameters), firmware, libraries, programs, and the GPUs the driver supports.
//! This is what a reviewer reads next to the registry diff of `versions add`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::fetch::{Fetcher, Progress};
use crate::initrd::{BuildOptions, InitrdBuilder, InitrdError, module_params};
use crate::inspect::Inventory;
use crate::outcome::{Classify, Outcome};
use crate::pci::ids::SupportedGpus;
use crate::registry::{Arch, Registry, RegistryError, Release};
use crate::remedy::Remedy;

/// A field that differs, `from` → `to` (`None`: unset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change<T> {
    /// Its value in A.
    pub from: T,
    /// Its value in B.
    pub to: T,
}

fn change<T: PartialEq + Clone>(a: &T, b: &T) -> Option<Change<T>> {
    (a != b).then(|| Change {
        from: a.clone(),
        to: b.clone(),
    })
}

/// Names added and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetDiff {
    /// In B only.
    pub added: Vec<String>,
    /// In A only.
    pub removed: Vec<String>,
}

impl SetDiff {
    fn of(a: &BTreeSet<String>, b: &BTreeSet<String>) -> Self {
        SetDiff {
            added: b.difference(a).cloned().collect(),
            removed: a.difference(b).cloned().collect(),
        }
    }
}

/// A library whose file changes under the same soname.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LibraryChange {
    /// The soname both provide (`libcuda.so.1`).
    pub soname: String,
    /// The real file name in A.
    pub from: String,
    /// The real file name in B.
    pub to: String,
}

/// Libraries by soname: added, removed, and replaced by another file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LibraryDiff {
    /// Sonames in B only (with B's real file name).
    pub added: Vec<String>,
    /// Sonames in A only (with A's real file name).
    pub removed: Vec<String>,
    /// Same soname, another real file.
    pub changed: Vec<LibraryChange>,
}

/// A module whose load parameters differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParamChange {
    /// The module.
    pub module: String,
    /// Parameters in A.
    pub from: String,
    /// Parameters in B.
    pub to: String,
}

/// A GPU the driver gains or loses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuChange {
    /// PCI device ID, `0x2330`.
    pub device_id: String,
    /// NVIDIA's name for it.
    pub name: String,
}

/// Everything that changes from release A to release B (for one architecture).
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseDiff {
    /// Release A.
    pub from: String,
    /// Release B.
    pub to: String,
    /// The architecture compared.
    pub arch: Arch,
    /// The guest kernel.
    pub kernel_version: Option<Change<String>>,
    /// The driver version.
    pub driver_version: Option<Change<Option<String>>>,
    /// The module flavor.
    pub module_flavor: Option<Change<Option<String>>>,
    /// GSP firmware shipped and used.
    pub gsp: Option<Change<bool>>,
    /// Modules the guest loads (dependencies included).
    pub modules: SetDiff,
    /// Load parameters of modules in both.
    pub module_params: Vec<ParamChange>,
    /// Firmware files.
    pub firmware: SetDiff,
    /// Libraries by soname.
    pub libraries: LibraryDiff,
    /// Programs (`nvidia-smi`, ...).
    pub programs: SetDiff,
    /// GPUs B's driver supports that A's does not.
    pub gpus_gained: Vec<GpuChange>,
    /// GPUs A's driver supports that B's does not.
    pub gpus_lost: Vec<GpuChange>,
    /// How the modules were made: build inputs, compiler, builder, sandbox, signer.
    pub provenance: Vec<super::provenance::FieldChange>,
}

/// Errors of [`diff`].
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// A release is not in the registry.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A release's artifacts could not be fetched or inspected.
    #[error("release `{release}` could not be inspected")]
    Inspect {
        /// The release.
        release: String,
        /// Why.
        #[source]
        source: InitrdError,
    },
}

impl Classify for DiffError {
    fn outcome(&self) -> Outcome {
        match self {
            DiffError::Registry(e) => e.outcome(),
            DiffError::Inspect { source, .. } => source.outcome(),
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            DiffError::Registry(e) => e.remedy(),
            DiffError::Inspect { source, .. } => source.remedy(),
        }
    }
}

/// Compare releases `a` and `b` of `registry` for `arch`: their registry fields, and what their
/// artifacts hold (fetched into, and unpacked from, the cache under `cache_dir`).
pub fn diff(
    fetcher: &Fetcher,
    cache_dir: &Path,
    registry: &Registry,
    a: &str,
    b: &str,
    arch: Arch,
    progress: &dyn Progress,
) -> Result<ReleaseDiff, DiffError> {
    let (ra, rb) = (registry.release(a)?, registry.release(b)?);
    let builder = InitrdBuilder::new(cache_dir, fetcher);
    let look = |r: &Release| {
        builder
            .inventory(r, arch, progress)
            .map(|(inv, _)| inv)
            .map_err(|source| DiffError::Inspect {
                release: r.name.clone(),
                source,
            })
    };
    let (ia, ib) = (look(ra)?, look(rb)?);
    Ok(compare(ra, &ia, rb, &ib, arch))
}

/// The comparison itself, over two inspected releases.
pub fn compare(
    ra: &Release,
    ia: &Inventory,
    rb: &Release,
    ib: &Inventory,
    arch: Arch,
) -> ReleaseDiff {
    let modules =
        |i: &Inventory| -> BTreeSet<String> { i.modules.iter().map(|m| m.name.clone()).collect() };
    let firmware = |i: &Inventory| -> BTreeSet<String> {
        i.firmware
            .iter()
            .map(|f| f.rel.display().to_string())
            .collect()
    };
    let programs = |i: &Inventory| -> BTreeSet<String> {
        i.binaries
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    let (ma, mb) = (modules(ia), modules(ib));
    // The parameters a default build of each release loads its modules with.
    let options = BuildOptions::new(arch, "");
    let module_params = ma
        .intersection(&mb)
        .filter_map(|m| {
            let (from, to) = (
                module_params(ra, &options, m),
                module_params(rb, &options, m),
            );
            (from != to).then(|| ParamChange {
                module: m.clone(),
                from,
                to,
            })
        })
        .collect();
    ReleaseDiff {
        from: ra.name.clone(),
        to: rb.name.clone(),
        arch,
        kernel_version: change(&ra.kernel_version, &rb.kernel_version),
        driver_version: change(&ra.driver_version, &rb.driver_version),
        module_flavor: change(
            &ra.module_flavor.map(|f| f.to_string()),
            &rb.module_flavor.map(|f| f.to_string()),
        ),
        gsp: change(&ra.gsp, &rb.gsp),
        modules: SetDiff::of(&ma, &mb),
        module_params,
        firmware: SetDiff::of(&firmware(ia), &firmware(ib)),
        libraries: libraries(ia, ib),
        programs: SetDiff::of(&programs(ia), &programs(ib)),
        gpus_gained: gpus(ib, ia),
        gpus_lost: gpus(ia, ib),
        provenance: super::provenance::changes(ra, rb, arch),
    }
}

fn libraries(a: &Inventory, b: &Inventory) -> LibraryDiff {
    let by_soname = |i: &Inventory| -> BTreeMap<String, String> {
        i.libraries
            .iter()
            .map(|l| {
                (
                    l.soname.clone().unwrap_or_else(|| l.real_name.clone()),
                    l.real_name.clone(),
                )
            })
            .collect()
    };
    let (la, lb) = (by_soname(a), by_soname(b));
    let mut out = LibraryDiff::default();
    for (soname, real) in &lb {
        match la.get(soname) {
            None => out.added.push(real.clone()),
            Some(old) if old != real => out.changed.push(LibraryChange {
                soname: soname.clone(),
                from: old.clone(),
                to: real.clone(),
            }),
            Some(_) => {}
        }
    }
    out.removed = la
        .iter()
        .filter(|(s, _)| !lb.contains_key(*s))
        .map(|(_, real)| real.clone())
        .collect();
    out
}

/// GPUs `have`'s driver lists that `other`'s does not (none when either has no list).
fn gpus(have: &Inventory, other: &Inventory) -> Vec<GpuChange> {
    let load = |i: &Inventory| {
        i.supported_gpus
            .as_deref()
            .and_then(|p| SupportedGpus::load(p).ok())
    };
    let (Some(have), Some(other)) = (load(have), load(other)) else {
        return Vec::new();
    };
    have.device_ids()
        .into_iter()
        .filter(|id| !other.knows(*id))
        .map(|id| GpuChange {
            device_id: format!("0x{id:04x}"),
            name: have.name(id).unwrap_or_default().to_string(),
        })
        .collect()
}
