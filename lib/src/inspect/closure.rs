//! A kernel module's dependency closure through `depends=`, in load order, for modules the
//! guest needs on its own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::modinfo::normalize_module_name;

use super::{
    Expectations, InspectedModule, Problem, check_module, load_module, load_order, module_files,
    module_stem, read_builtin,
};

/// Why [`kernel_closure`] could not resolve its modules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClosureGap {
    /// `module` (wanted, or a dependency of `needed_by`) is neither in the tree nor built in.
    Missing {
        /// The module that is missing.
        module: String,
        /// The module whose `depends=` names it; `None` when it was asked for directly.
        needed_by: Option<String>,
    },
    /// The modules that were found have problems (wrong kernel, unreadable, cycle).
    Problems(Vec<Problem>),
}

/// Modules `wanted` of the kernel-modules tree `root` (`lib/modules/<kver>/...`) and everything
/// they depend on through `depends=`, in load order; built-in modules are left out. The same
/// resolution [`inspect`](super::inspect) does for the NVIDIA modules, for modules the guest
/// needs on its own.
pub(crate) fn kernel_closure(
    expect: &Expectations,
    root: &Path,
    wanted: &[&str],
) -> Result<Vec<InspectedModule>, ClosureGap> {
    let mut problems = Vec::new();
    let dir = root.join("lib/modules").join(expect.kernel_version);
    let mut index: HashMap<String, Vec<PathBuf>> = HashMap::new();
    for file in module_files(&dir, &mut problems) {
        if let Some(stem) = module_stem(&file) {
            index.entry(stem).or_default().push(file);
        }
    }
    let builtin = read_builtin(&dir.join("modules.builtin"));
    let mut selected: BTreeMap<String, InspectedModule> = BTreeMap::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut queue: Vec<(String, Option<String>)> = wanted
        .iter()
        .map(|w| (normalize_module_name(w), None))
        .collect();
    let mut head = 0;
    while head < queue.len() {
        let (name, needed_by) = queue[head].clone();
        head += 1;
        if let Some(parent) = &needed_by {
            edges
                .entry(parent.clone())
                .or_default()
                .insert(name.clone());
        }
        if selected.contains_key(&name) {
            continue;
        }
        let found = index.get(&name).and_then(|files| {
            files
                .iter()
                .find_map(|f| load_module(f, false, &mut problems).filter(|m| m.name == name))
        });
        match found {
            Some(m) => {
                check_module(expect, &m, &mut problems);
                for dep in m.info.depends() {
                    queue.push((normalize_module_name(&dep), Some(name.clone())));
                }
                selected.insert(name, m);
            }
            None if builtin.contains(&name) => {
                if let Some(parent) = &needed_by {
                    edges.entry(parent.clone()).or_default().remove(&name);
                }
            }
            None => {
                return Err(ClosureGap::Missing {
                    module: name,
                    needed_by,
                });
            }
        }
    }
    let order = load_order(&selected, &edges, &mut problems);
    if !problems.is_empty() {
        return Err(ClosureGap::Problems(problems));
    }
    Ok(order
        .into_iter()
        .filter_map(|n| selected.remove(&n))
        .collect())
}
