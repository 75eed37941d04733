//! Which driver libraries and programs go into the GPU layer: those of the capabilities asked
//! for (default: every capability the artifact has), and the guest daemons always. The manifest
//! records what the layer carries, per capability, so the guest init can select again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use gpu_passthrough_guest_contract::capability::GUEST_DAEMONS;

use super::{BuildOptions, InitrdError};
use crate::capabilities::{self, Capability, CapabilitySet};
use crate::inspect::{InspectedLibrary, Inventory};
use crate::registry::Release;

/// What the layer carries of the driver's userspace.
pub(super) struct Selection<'i> {
    /// Libraries to pack.
    pub libraries: Vec<&'i InspectedLibrary>,
    /// Programs to pack.
    pub binaries: Vec<&'i PathBuf>,
    /// Capability → guest paths of its packed files.
    pub capabilities: BTreeMap<Capability, Vec<String>>,
}

/// Decide, before a byte is written. Asking for a capability the artifact lacks, or selecting
/// when a file is in no known capability, is an error naming it.
pub(super) fn select<'i>(
    release: &Release,
    options: &BuildOptions,
    inv: &'i Inventory,
) -> Result<Selection<'i>, InitrdError> {
    let lib_cap = |l: &InspectedLibrary| capabilities::of_library(&l.real_name);
    let bin_name = |b: &PathBuf| {
        b.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let carried: BTreeSet<Capability> = inv
        .libraries
        .iter()
        .filter_map(lib_cap)
        .chain(
            inv.binaries
                .iter()
                .map(bin_name)
                .filter(|n| !GUEST_DAEMONS.contains(&n.as_str()))
                .filter_map(|n| capabilities::of_program(&n)),
        )
        .collect();
    // `all` means whatever the artifact has; a named capability must be there.
    let wanted = match &options.capabilities {
        Some(set) if *set != CapabilitySet::all() => {
            if let Some(missing) = set.0.iter().find(|c| !carried.contains(c)) {
                return Err(InitrdError::CapabilityNotCarried {
                    release: release.name.clone(),
                    capability: *missing,
                    carried: CapabilitySet(carried).to_string(),
                });
            }
            Some(set)
        }
        _ => None,
    };
    let mut capabilities: BTreeMap<Capability, Vec<String>> = BTreeMap::new();
    // Whether a file of capability `cap` goes in (recorded under it). With capabilities named,
    // a file in none of them stays out, and a file of no known capability is an error: it
    // could belong to any.
    let mut admit = |cap: Option<Capability>, name: &str, guest_path: String| match (cap, wanted) {
        (None, Some(_)) => Err(InitrdError::UnclassifiedFile {
            release: release.name.clone(),
            file: name.to_string(),
        }),
        (Some(c), Some(set)) if !set.contains(c) => Ok(false),
        (Some(c), _) => {
            capabilities.entry(c).or_default().push(guest_path);
            Ok(true)
        }
        (None, None) => Ok(true),
    };
    let mut libraries = Vec::new();
    for lib in &inv.libraries {
        let path = format!("/gpu/lib/{}", lib.real_name);
        if admit(lib_cap(lib), &lib.real_name, path)? {
            libraries.push(lib);
        }
    }
    let mut binaries = Vec::new();
    for bin in &inv.binaries {
        let name = bin_name(bin);
        // The guest daemons go in whatever was asked: the guest init decides whether to start them.
        let daemon = GUEST_DAEMONS.contains(&name.as_str());
        let path = format!("/gpu/bin/{name}");
        if daemon || admit(capabilities::of_program(&name), &name, path)? {
            binaries.push(bin);
        }
    }
    let mut out = Selection {
        libraries,
        binaries,
        capabilities,
    };
    for files in out.capabilities.values_mut() {
        files.sort();
    }
    Ok(out)
}
