//! File-system primitives shared by the artifact cache, the layer cache and the bind journal:
//! exclusive locks, durable writes and atomic replacement, and file hashing. Each returns a plain
//! `io::Error`; the caller wraps it with the path and what it was doing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// An exclusive `flock` on `path` (created `0600` if missing, never through a symlink planted
/// there), held until the value is dropped.
pub(crate) fn lock_exclusive(path: &Path) -> io::Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
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

/// Start writing `len` bytes of `file` from `offset` back to disk, without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a large file written in steps like this leaves
/// its final fsync little to wait for.
#[allow(unsafe_code)]
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (offset, len) = (offset as libc::off64_t, len as libc::off64_t);
    // SAFETY: sync_file_range takes only integers; the descriptor is borrowed for the call.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
/// directory, fsync, rename, fsync of the directory). The file is `0644` (less the umask).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o644)
}

/// [`write_atomic`] for state only root reads (the journal, the health records): `0600`.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, 0o600)
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (tmp, mut file) = create_temp_beside(path, mode)?;
    let result = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| rename_durable(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A new file beside `path` under a fresh name, created exclusively (`O_CREAT|O_EXCL`, plus
/// `O_NOFOLLOW`): never an existing file, never through a symlink someone planted under the
/// name; a name taken is skipped for the next.
fn create_temp_beside(path: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for _ in 0..16 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.{}.{n}.{nanos:x}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)))
}

/// Create `dir` (and missing parents) `0700` if missing; then, whether new or not, say why it
/// is not safe for state only root may change: `Some(why)` when it is owned by someone other
/// than root or this user, or is group- or world-writable (anyone could then replace the
/// journal, or plant a link under a name it writes). `None` when it is safe.
pub(crate) fn private_dir(dir: &Path) -> io::Result<Option<String>> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o7777;
    Ok(if meta.uid() != 0 && meta.uid() != me {
        Some(format!("it is owned by uid {}, not root", meta.uid()))
    } else if mode & 0o022 != 0 {
        Some(format!("it is group- or world-writable (mode {mode:04o})"))
    } else {
        None
    })
}

/// The sha256 and length of everything `reader` yields.
pub(crate) fn sha256_reader(mut reader: impl io::Read) -> io::Result<([u8; 32], u64)> {
    let mut hasher = Sha256::new();
    // A large buffer in front of the hasher: `io::copy` reads into it directly, so a file is
    // read 256 KiB a call rather than 8 KiB.
    let mut buffered = io::BufWriter::with_capacity(256 << 10, &mut hasher);
    let size = io::copy(&mut reader, &mut buffered)?;
    buffered.flush()?;
    drop(buffered);
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
    fn a_link_planted_under_a_temp_or_lock_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let p = dir.path().join("journal.json");
        // A link under the temp name the previous scheme used (predictable: `<name>.tmp.<pid>`).
        let pid = std::process::id();
        std::os::unix::fs::symlink(&victim, dir.path().join(format!("journal.json.tmp.{pid}")))
            .unwrap();
        write_private(&p, b"state").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&p).unwrap(), b"state");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The lock file, too, is never opened through a link.
        let lock = dir.path().join("lock");
        std::os::unix::fs::symlink(&victim, &lock).unwrap();
        assert!(lock_exclusive(&lock).is_err());
    }

    #[test]
    fn a_state_dir_is_made_0700_and_refused_when_others_may_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        assert_eq!(private_dir(&state).unwrap(), None);
        assert_eq!(
            fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let why = private_dir(&state).unwrap().expect("refused");
        assert!(why.contains("0777"), "{why}");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(private_dir(&state).unwrap(), None, "0755 is safe");
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(&state, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
            let why = private_dir(&state).unwrap().expect("refused");
            assert!(why.contains("uid 4242"), "{why}");
        }
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
