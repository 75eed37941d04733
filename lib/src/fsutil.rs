//! File-system primitives shared by the artifact cache, the layer cache and the bind journal:
//! exclusive locks, durable writes and atomic replacement, and file hashing. Each returns a plain
//! `io::Error`; the caller wraps it with the path and what it was doing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// An exclusive `flock` on `path` (created if missing), held until the value is dropped.
pub(crate) fn lock_exclusive(path: &Path) -> io::Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io::Error::from(errno))
}

/// Create `path` with `bytes` and fsync it (no rename: for files inside a directory that is
/// itself published atomically).
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Fsync a directory, making the renames and creations in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flush everything written to the filesystem holding `path` (`syncfs(2)`): one call for a
/// whole unpacked tree instead of an fsync per file.
pub(crate) fn sync_filesystem(path: &Path) -> io::Result<()> {
    nix::unistd::syncfs(File::open(path)?).map_err(io::Error::from)
}

/// Rename `from` to `to` and make the rename durable (fsync of `to`'s directory).
pub(crate) fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    match to.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// Replace `path` with `bytes` atomically: a reader sees the old or the new content, never a
/// mix, and after return the new content survives a power cut (temp file in the same
/// directory, fsync, rename, fsync of the directory).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = write_synced(&tmp, bytes).and_then(|()| rename_durable(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The sha256 and length of everything `reader` yields.
pub(crate) fn sha256_reader(mut reader: impl io::Read) -> io::Result<([u8; 32], u64)> {
    let mut hasher = Sha256::new();
    let size = io::copy(&mut reader, &mut hasher)?;
    Ok((hasher.finalize().into(), size))
}

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let (digest, _) = sha256_reader(File::open(path)?)?;
    Ok(hex::encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temp file was left behind");
    }

    #[test]
    fn atomic_write_into_a_missing_directory_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing/state.json");
        assert!(write_atomic(&p, b"x").is_err());
        assert!(!dir.path().join("missing").exists());
    }

    #[test]
    fn hashes_match_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_second_lock_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let first = lock_exclusive(&p).unwrap();
        let file = OpenOptions::new().write(true).open(&p).unwrap();
        let second = Flock::lock(file, FlockArg::LockExclusiveNonblock);
        assert!(second.is_err(), "the lock was not exclusive");
        drop(first);
        let file = OpenOptions::new().write(true).open(&p).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
