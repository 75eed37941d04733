//! A release's provenance as named fields, so `versions diff` can show what changed in how two
//! releases' modules were made: every build input's digest, the compiler, the builder, the
//! sandbox, the signer.

use serde::Serialize;

use crate::registry::{Arch, Release};

/// A provenance field that differs between two releases (`None`: the release has none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// The field: `compiler`, `signer`, `kernel-headers #2`, ...
    pub field: String,
    /// Its value in A.
    pub from: Option<String>,
    /// Its value in B.
    pub to: Option<String>,
}

/// The provenance fields of `release` for `arch`, in a stable order.
pub fn fields(release: &Release, arch: Arch) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(b) = &release.build {
        out.push(("builder".into(), b.builder.clone()));
        out.push(("compiler".into(), b.compiler.clone()));
        out.push(("sandbox".into(), b.sandbox.clone()));
        out.push(("source_date_epoch".into(), b.source_date_epoch.to_string()));
    }
    if let Some(s) = &release.signer {
        out.push(("signer".into(), format!("{} (key {})", s.subject, s.key_id)));
    }
    if release.module_sig_force {
        out.push(("module_sig_force".into(), "true".into()));
    }
    let mut seen: Vec<(crate::registry::ArtifactKind, usize)> = Vec::new();
    for a in release.artifacts.get(&arch).into_iter().flatten() {
        if !a.kind.is_build_input() {
            continue;
        }
        let n = match seen.iter_mut().find(|(k, _)| *k == a.kind) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                seen.push((a.kind, 1));
                1
            }
        };
        let digest = a
            .sha256
            .map_or_else(|| "unpinned".to_string(), |d| d.to_hex());
        out.push((format!("{} #{n}", a.kind), digest));
    }
    out
}

/// The provenance fields that differ from `a` to `b`.
pub fn changes(a: &Release, b: &Release, arch: Arch) -> Vec<FieldChange> {
    let (fa, fb) = (fields(a, arch), fields(b, arch));
    let mut names: Vec<&String> = fa.iter().chain(fb.iter()).map(|(n, _)| n).collect();
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(*n));
    let get =
        |f: &[(String, String)], n: &str| f.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    names
        .into_iter()
        .filter_map(|n| {
            let (from, to) = (get(&fa, n), get(&fb, n));
            (from != to).then(|| FieldChange {
                field: n.clone(),
                from,
                to,
            })
        })
        .collect()
}
