//! `verify --deep`: re-check what the cache trusts by presence: unpacked artifact trees against
//! the verified archives they came from, built layers against the digests recorded when they
//! were made.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fetch::Fetcher;
use crate::fsutil;
use crate::initrd::Layers;
use crate::initrd::tree;
use crate::inspect::{SigningRule, check_signatures};
use crate::registry::{ArtifactKind, Release, Sha256Digest};

/// What a [`CacheRow`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheItem {
    /// An artifact extracted under `<cache>/unpacked/<sha256>`.
    UnpackedTree,
    /// A built layer under `<cache>/layers/<key>/`.
    Layer,
    /// The module signatures of a release's unpacked `nvidia-modules` artifact, against the
    /// signer and `module_sig_force` the release records.
    ModuleSignatures,
}

/// The state of one cached item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheStatus {
    /// Its bytes are what was recorded.
    Ok,
    /// Its bytes differ from the record; `detail` says where.
    Mismatch,
    /// It cannot be checked: made by an older builder that kept no record, or an unpacked tree
    /// whose archive is no longer cached.
    Unrecorded,
    /// It could not be read; see `detail`.
    Error,
}

impl CacheStatus {
    /// The name used in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Ok => "ok",
            CacheStatus::Mismatch => "mismatch",
            CacheStatus::Unrecorded => "unrecorded",
            CacheStatus::Error => "error",
        }
    }
}

/// One cached item's check.
#[derive(Debug, Clone, Serialize)]
pub struct CacheRow {
    /// What it is.
    pub item: CacheItem,
    /// Where it is.
    pub path: PathBuf,
    /// The outcome.
    pub status: CacheStatus,
    /// What differs, or why it could not be checked.
    pub detail: Option<String>,
}

impl std::fmt::Display for CacheRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let item = match self.item {
            CacheItem::UnpackedTree => "unpacked tree",
            CacheItem::Layer => "layer",
            CacheItem::ModuleSignatures => "module signatures",
        };
        write!(
            f,
            "{item} {}: {}",
            self.path.display(),
            self.status.as_str().to_uppercase()
        )?;
        match &self.detail {
            Some(d) => writeln!(f, " {d}"),
            None => writeln!(f),
        }
    }
}

impl CacheRow {
    fn new(item: CacheItem, path: PathBuf, status: CacheStatus, detail: Option<String>) -> Self {
        CacheRow {
            item,
            path,
            status,
            detail,
        }
    }
}

/// Check every unpacked tree and every built layer under `cache_dir` (the artifacts through
/// `fetcher`, which caches them there), sorted by path.
pub fn verify_cache(fetcher: &Fetcher, cache_dir: &Path) -> Vec<CacheRow> {
    let mut rows = Vec::new();
    let unpacked = cache_dir.join("unpacked");
    for dir in subdirs(&unpacked) {
        rows.push(check_tree(fetcher, &dir));
    }
    for dir in subdirs(&cache_dir.join("layers")) {
        rows.extend(check_layers(&dir));
    }
    rows
}

/// For each of `releases` that names a signer or forces signatures: the signatures of its
/// `nvidia-modules` trees unpacked in the cache, one row each (a tree not unpacked is
/// `unrecorded`: `initrd build` unpacks and checks it).
pub fn verify_signatures<'r>(
    cache_dir: &Path,
    releases: impl IntoIterator<Item = &'r Release>,
) -> Vec<CacheRow> {
    let mut rows = Vec::new();
    for release in releases {
        let rule = SigningRule::of(release);
        if rule.signer.is_none() && !rule.module_sig_force {
            continue;
        }
        for list in release.artifacts.values() {
            for artifact in list
                .iter()
                .filter(|a| a.kind == ArtifactKind::NvidiaModules)
            {
                let Some(digest) = artifact.sha256 else {
                    continue;
                };
                let dir = cache_dir.join("unpacked").join(digest.to_hex());
                let row = |status, detail| {
                    CacheRow::new(CacheItem::ModuleSignatures, dir.clone(), status, detail)
                };
                if !dir.is_dir() {
                    rows.push(row(
                        CacheStatus::Unrecorded,
                        Some(format!(
                            "release {}'s nvidia-modules are not unpacked in this cache; `initrd \
                             build` unpacks and checks them",
                            release.name
                        )),
                    ));
                    continue;
                }
                let problems = check_signatures(rule, &dir);
                rows.push(match problems.is_empty() {
                    true => row(CacheStatus::Ok, None),
                    false => row(
                        CacheStatus::Mismatch,
                        Some(format!(
                            "release {}: {}",
                            release.name,
                            problems
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        )),
                    ),
                });
            }
        }
    }
    rows
}

/// Complete entries only: `tmp-*` directories are builds in progress or abandoned.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with("tmp-"))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// An unpacked tree against the archive it was unpacked from (its name is the archive's
/// digest), which is re-hashed first: the tree must hold exactly what unpacking it writes.
fn check_tree(fetcher: &Fetcher, dir: &Path) -> CacheRow {
    let row =
        |status, detail| CacheRow::new(CacheItem::UnpackedTree, dir.to_path_buf(), status, detail);
    let unpack_again = "delete the tree and it is unpacked again";
    if !tree::record_path(dir).is_file() {
        return row(
            CacheStatus::Unrecorded,
            Some(format!(
                "no record that it was completely unpacked: {unpack_again}"
            )),
        );
    }
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let Ok(digest) = name.parse::<Sha256Digest>() else {
        return row(
            CacheStatus::Error,
            Some(format!(
                "`{name}` is not an artifact's digest: {unpack_again}"
            )),
        );
    };
    let archive = match fetcher.rehash_cached(&digest) {
        Ok(Some(fetched)) if fetched.sha256 == digest => fetched.path,
        Ok(Some(fetched)) => {
            return row(
                CacheStatus::Mismatch,
                Some(format!(
                    "the artifact it was unpacked from, {}, no longer has that digest (it has \
                     {}): delete both and they are fetched and unpacked again",
                    fetched.path.display(),
                    fetched.sha256
                )),
            );
        }
        Ok(None) => {
            return row(
                CacheStatus::Unrecorded,
                Some(format!(
                    "the artifact it was unpacked from is no longer cached, so there is nothing \
                     to check it against: {unpack_again}"
                )),
            );
        }
        Err(e) => return row(CacheStatus::Error, Some(e.to_string())),
    };
    let expected = match tree::from_archive(&archive) {
        Ok(e) => e,
        Err(e) => return row(CacheStatus::Error, Some(e.to_string())),
    };
    match tree::scan(dir) {
        Err(e) => row(CacheStatus::Error, Some(e.to_string())),
        Ok(found) => {
            let diff = tree::differences(&expected, &found);
            if diff.is_empty() {
                row(CacheStatus::Ok, None)
            } else {
                row(
                    CacheStatus::Mismatch,
                    Some(format!("{}; {unpack_again}", diff.join(", "))),
                )
            }
        }
    }
}

fn check_layers(dir: &Path) -> Vec<CacheRow> {
    let record = dir.join("layers.json");
    let layers: Layers = match fs::read(&record)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => {
            return vec![CacheRow::new(
                CacheItem::Layer,
                dir.to_path_buf(),
                CacheStatus::Error,
                Some(format!("{}: {e}", record.display())),
            )];
        }
    };
    [&layers.base, &layers.gpu, &layers.combined]
        .into_iter()
        .map(|layer| {
            let path = dir.join(&layer.path);
            let (status, detail) = match fs::File::open(&path).and_then(fsutil::sha256_reader) {
                Err(e) => (CacheStatus::Error, Some(e.to_string())),
                Ok((digest, size)) if hex::encode(digest) == layer.sha256 && size == layer.size => {
                    (CacheStatus::Ok, None)
                }
                Ok((digest, size)) => (
                    CacheStatus::Mismatch,
                    Some(format!(
                        "sha256 {} and {size} bytes, recorded {} and {} bytes; delete {} and the \
                         layers are built again",
                        hex::encode(digest),
                        layer.sha256,
                        layer.size,
                        dir.display()
                    )),
                ),
            };
            CacheRow::new(CacheItem::Layer, path, status, detail)
        })
        .collect()
}
