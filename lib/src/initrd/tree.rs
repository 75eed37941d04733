//! The record of an unpacked artifact tree: every path it holds (directories, files with their
//! lengths, link targets), written beside the tree once the tree is synced. Its presence is what
//! makes the cache trust the tree. A deep check compares the tree with the verified archive it
//! was unpacked from ([`from_archive`] against [`scan`]), so the unpacking hashes nothing.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::archive::ArchiveError;
use crate::archive::tar::{EntryKind, Extracted, Limits, Listing, walk_tar};
use crate::fsutil;

/// One path of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum TreeEntry {
    Dir,
    /// A regular file; its SHA-256 where it was hashed ([`scan`], [`from_archive`]), not in the
    /// record written at unpacking, which lists what was written.
    File {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sha256: Option<String>,
        size: u64,
    },
    Symlink {
        target: String,
    },
}

/// Relative path → entry, sorted.
pub(crate) type TreeRecord = BTreeMap<String, TreeEntry>;

/// Where the record of the tree `dir` is kept: `<dir>.tree.json`, outside the tree, so that
/// the tree holds exactly what the archive held.
pub(crate) fn record_path(dir: &Path) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".tree.json");
    dir.with_file_name(name)
}

/// Walk `dir` and hash every regular file.
pub(crate) fn scan(dir: &Path) -> io::Result<TreeRecord> {
    let mut out = TreeRecord::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let rel = path
                .strip_prefix(dir)
                .map_err(io::Error::other)?
                .to_string_lossy()
                .into_owned();
            let kind = entry.file_type()?;
            let e = if kind.is_symlink() {
                TreeEntry::Symlink {
                    target: fs::read_link(&path)?.to_string_lossy().into_owned(),
                }
            } else if kind.is_dir() {
                stack.push(path.clone());
                TreeEntry::Dir
            } else {
                let (digest, size) = fsutil::sha256_reader(fs::File::open(&path)?)?;
                TreeEntry::File {
                    sha256: Some(hex::encode(digest)),
                    size,
                }
            };
            out.insert(rel, e);
        }
    }
    Ok(out)
}

/// The record of a tree as its extraction wrote it: the paths [`scan`] of the tree finds then,
/// without digests and without reading it back.
pub(crate) fn from_listing(listing: &Listing) -> TreeRecord {
    listing
        .iter()
        .map(|(path, e)| {
            let entry = match e {
                Extracted::Dir => TreeEntry::Dir,
                Extracted::File { size } => TreeEntry::File {
                    sha256: None,
                    size: *size,
                },
                Extracted::Symlink { target } => TreeEntry::Symlink {
                    target: target.to_string_lossy().into_owned(),
                },
            };
            (path.to_string_lossy().into_owned(), entry)
        })
        .collect()
}

/// What unpacking `archive` writes, as [`scan`] of that tree would find it: every entry with
/// each file's digest, and the parent directories the archive leaves implicit. Read through
/// the same checks as an extraction, without writing anything.
pub(crate) fn from_archive(archive: &Path) -> Result<TreeRecord, ArchiveError> {
    let mut out = TreeRecord::new();
    walk_tar(archive, &Limits::default(), &mut |entry, contents| {
        for parent in entry.path.ancestors().skip(1) {
            if !parent.as_os_str().is_empty() {
                out.insert(parent.to_string_lossy().into_owned(), TreeEntry::Dir);
            }
        }
        let e = match &entry.kind {
            EntryKind::Directory => TreeEntry::Dir,
            EntryKind::File { .. } => {
                let (digest, size) =
                    fsutil::sha256_reader(contents).map_err(|source| ArchiveError::Io {
                        archive: archive.to_path_buf(),
                        source,
                    })?;
                TreeEntry::File {
                    sha256: Some(hex::encode(digest)),
                    size,
                }
            }
            EntryKind::Symlink { target } => TreeEntry::Symlink {
                target: target.to_string_lossy().into_owned(),
            },
        };
        out.insert(entry.path.to_string_lossy().into_owned(), e);
        Ok(())
    })?;
    Ok(out)
}

/// Write `tree` to `record`, atomically.
pub(crate) fn write_record(tree: &TreeRecord, record: &Path) -> io::Result<()> {
    let bytes = serde_json::to_vec(tree).map_err(io::Error::other)?;
    fsutil::write_atomic(record, &bytes)
}

/// The paths where `found` differs from `expected`: changed, missing or added, sorted.
pub(crate) fn differences(expected: &TreeRecord, found: &TreeRecord) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in expected {
        match found.get(path) {
            None => out.push(format!("{path} is missing")),
            Some(got) if got != want => out.push(format!("{path} changed")),
            Some(_) => {}
        }
    }
    for path in found.keys().filter(|p| !expected.contains_key(*p)) {
        out.push(format!("{path} was added"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_and_the_extraction_list_what_a_scan_of_the_tree_finds() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.tar");
        let mut b = tar::Builder::new(fs::File::create(&archive).unwrap());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(if kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            b.append_data(&mut h, path, data).unwrap();
        };
        // Implicit parents (usr/lib/x86_64), an explicit directory, files, a link, an empty file.
        add(
            "usr/lib/x86_64/libcuda.so.535",
            tar::EntryType::Regular,
            b"elf bytes",
            None,
        );
        add(
            "usr/lib/x86_64/libcuda.so.1",
            tar::EntryType::Symlink,
            b"",
            Some("libcuda.so.535"),
        );
        add("firmware", tar::EntryType::Directory, b"", None);
        add(
            "firmware/gsp.bin",
            tar::EntryType::Regular,
            &[7u8; 300_000],
            None,
        );
        add("empty", tar::EntryType::Regular, b"", None);
        b.into_inner().unwrap();
        let t = dir.path().join("t");
        let (_, listing) =
            crate::archive::tar::extract_tar_listed(&archive, &t, &Default::default()).unwrap();
        let scanned = scan(&t).unwrap();
        assert_eq!(scanned.len(), 8, "{scanned:?}");
        assert_eq!(from_archive(&archive).unwrap(), scanned);
        // The record written at unpacking: the same paths, kinds and sizes, no digests.
        let without_digests: TreeRecord = scanned
            .into_iter()
            .map(|(path, e)| match e {
                TreeEntry::File { size, .. } => (path, TreeEntry::File { sha256: None, size }),
                other => (path, other),
            })
            .collect();
        assert_eq!(from_listing(&listing), without_digests);
    }

    #[test]
    fn a_changed_added_or_missing_file_is_a_difference() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        fs::create_dir_all(t.join("a")).unwrap();
        fs::write(t.join("a/f"), b"one").unwrap();
        fs::write(t.join("g"), b"two").unwrap();
        let recorded = scan(&t).unwrap();
        assert!(differences(&recorded, &scan(&t).unwrap()).is_empty());
        fs::write(t.join("a/f"), b"One").unwrap();
        fs::remove_file(t.join("g")).unwrap();
        fs::write(t.join("h"), b"new").unwrap();
        assert_eq!(
            differences(&recorded, &scan(&t).unwrap()),
            ["a/f changed", "g is missing", "h was added"]
        );
    }
}
