//! The record of an unpacked artifact tree: every file's digest, link target and directory,
//! written beside the tree when it is unpacked, so that a later check can tell whether the tree
//! the cache trusts by presence still holds the bytes the verified archive had.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// One path of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum TreeEntry {
    Dir,
    File { sha256: String, size: u64 },
    Symlink { target: String },
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
                    sha256: hex::encode(digest),
                    size,
                }
            };
            out.insert(rel, e);
        }
    }
    Ok(out)
}

/// Write the record of `dir` (freshly scanned) to `record`, atomically.
pub(crate) fn write_record(dir: &Path, record: &Path) -> io::Result<()> {
    let tree = scan(dir)?;
    let bytes = serde_json::to_vec(&tree).map_err(io::Error::other)?;
    fsutil::write_atomic(record, &bytes)
}

/// Read a record written by [`write_record`].
pub(crate) fn read_record(record: &Path) -> io::Result<TreeRecord> {
    let bytes = fs::read(record)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The paths where `found` differs from `recorded`: changed, missing or added, sorted.
pub(crate) fn differences(recorded: &TreeRecord, found: &TreeRecord) -> Vec<String> {
    let mut out = Vec::new();
    for (path, want) in recorded {
        match found.get(path) {
            None => out.push(format!("{path} is missing")),
            Some(got) if got != want => out.push(format!("{path} changed")),
            Some(_) => {}
        }
    }
    for path in found.keys().filter(|p| !recorded.contains_key(*p)) {
        out.push(format!("{path} was added"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_added_or_missing_file_is_a_difference() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        fs::create_dir_all(t.join("a")).unwrap();
        fs::write(t.join("a/f"), b"one").unwrap();
        fs::write(t.join("g"), b"two").unwrap();
        let rec = record_path(&t);
        write_record(&t, &rec).unwrap();
        let recorded = read_record(&rec).unwrap();
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
