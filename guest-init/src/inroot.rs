//! Every file operation in the workload root, resolved by the kernel as if the root were `/`.
//!
//! The root is untrusted: any component may be a symlink (absolute, or `..`-laden) meant to lead
//! out of it. Paths are opened with `openat2(RESOLVE_IN_ROOT)` from a handle on the root; the last
//! component is then created, replaced or inspected relative to its parent's handle without being
//! followed; mount targets are handed to the kernel as handles, never re-resolved by path.

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why the workload root cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The kernel has no `openat2` (Linux older than 5.6).
    #[error(
        "the kernel has no openat2 (Linux 5.6 or newer), which gpu-init needs to keep every write \
         inside the workload root; boot a newer kernel"
    )]
    NoOpenat2,
    /// Opening the root failed.
    #[error("cannot open the workload root {path}")]
    Open {
        /// The root.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A handle on the workload root.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    host: PathBuf,
    /// The root's absolute host path as the kernel names it, to turn handles back into paths.
    real: Option<PathBuf>,
}

fn relative(path: &str) -> &str {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() { "." } else { rel }
}

/// The last component of `path`, which must be a plain name.
fn last_name(path: &str) -> std::io::Result<(&str, &OsStr)> {
    let p = Path::new(path);
    match p.components().next_back() {
        Some(Component::Normal(name)) => {
            let parent = p.parent().and_then(Path::to_str).unwrap_or("/");
            Ok((parent, name))
        }
        _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

impl RootDir {
    /// Open `root`. Fails with [`RootError::NoOpenat2`] on a kernel without `openat2`.
    pub fn open(root: &Path) -> Result<Self, RootError> {
        let open_err = |source: std::io::Error| RootError::Open {
            path: root.display().to_string(),
            source,
        };
        let fd = rustix::fs::open(
            root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| open_err(e.into()))?;
        let dir = Self {
            fd,
            host: root.to_path_buf(),
            real: None,
        };
        // Probe once, so an old kernel is one clear error and not one per file.
        match dir.open_path("/", OFlags::PATH | OFlags::DIRECTORY, ResolveFlags::empty()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Err(RootError::NoOpenat2),
            Err(e) => return Err(open_err(e)),
            Ok(_) => {}
        }
        let real = std::fs::read_link(format!("/proc/self/fd/{}", raw(dir.fd.as_fd()))).ok();
        Ok(Self { real, ..dir })
    }

    /// The root as the caller named it on the host.
    pub fn host_path(&self) -> &Path {
        &self.host
    }

    /// The handle on the root.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `openat2(root, path, RESOLVE_IN_ROOT | extra)`: symlinks are followed as if chrooted.
    pub fn open_path(
        &self,
        path: &str,
        flags: OFlags,
        extra: ResolveFlags,
    ) -> std::io::Result<OwnedFd> {
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | extra;
        // EAGAIN: a concurrent rename raced the lookup; the kernel asks us to retry.
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.fd,
                relative(path),
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                resolve,
            ) {
                Err(Errno::AGAIN) if tries < 8 => tries += 1,
                other => return other.map_err(Into::into),
            }
        }
    }

    /// A handle on the directory `path` (inside the root).
    pub fn dir(&self, path: &str) -> std::io::Result<OwnedFd> {
        self.open_path(
            path,
            OFlags::PATH | OFlags::DIRECTORY,
            ResolveFlags::empty(),
        )
    }

    /// True when `path` is a directory reached without any symlink.
    pub fn is_plain_dir(&self, path: &str) -> bool {
        self.open_path(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW,
            ResolveFlags::NO_SYMLINKS,
        )
        .is_ok()
    }

    /// `mkdir -p` inside the root; returns a handle on the directory.
    pub fn create_dir_all(&self, path: &str) -> std::io::Result<OwnedFd> {
        let mut parent = self.dir("/")?;
        let mut prefix = PathBuf::from("/");
        for c in Path::new(path).components() {
            let Component::Normal(name) = c else {
                continue;
            };
            prefix.push(name);
            let shown = prefix.to_string_lossy();
            parent = match self.dir(&shown) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    self.dir(&shown)?
                }
                Err(e) => return Err(e),
            };
        }
        Ok(parent)
    }

    /// What is at `path` itself (a final symlink is not followed); `None` when nothing is.
    pub fn lstat(&self, path: &str) -> std::io::Result<Option<FileType>> {
        let (parent, name) = last_name(path)?;
        let dir = match self.dir(parent) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The target of the symlink `path`.
    pub fn read_link(&self, path: &str) -> std::io::Result<PathBuf> {
        let (parent, name) = last_name(path)?;
        let dir = self.dir(parent)?;
        let target = rustix::fs::readlinkat(&dir, name, Vec::new())?;
        Ok(PathBuf::from(OsStr::from_bytes(target.as_bytes())))
    }

    /// Create the symlink `path -> target`; its parent directories are made as needed.
    pub fn symlink(&self, target: &str, path: &str) -> std::io::Result<()> {
        let (parent, name) = last_name(path)?;
        let dir = self.create_dir_all(parent)?;
        rustix::fs::symlinkat(target, &dir, name).map_err(Into::into)
    }

    /// Replace `path` with a file holding `contents` (mode 0644), atomically. Whatever was at
    /// `path`, a symlink included, is replaced and never written through.
    pub fn write_file(&self, path: &str, contents: &[u8]) -> std::io::Result<()> {
        let (parent, name) = last_name(path)?;
        let dir = self.create_dir_all(parent)?;
        let mut tmp_name = b".".to_vec();
        tmp_name.extend_from_slice(name.as_bytes());
        tmp_name.extend_from_slice(b".gpu-init-tmp");
        let tmp = OsStr::from_bytes(&tmp_name);
        match rustix::fs::unlinkat(&dir, tmp, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(
            &dir,
            tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(contents)?;
        file.sync_all()?;
        rustix::fs::renameat(&dir, tmp, &dir, name).map_err(Into::into)
    }

    /// Create `path` with `contents` unless something (even a dangling symlink) is there.
    /// Returns whether it was created.
    pub fn create_new(&self, path: &str, contents: &[u8]) -> std::io::Result<bool> {
        let (parent, name) = last_name(path)?;
        let dir = self.create_dir_all(parent)?;
        match rustix::fs::openat(
            &dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => {
                std::fs::File::from(fd).write_all(contents)?;
                Ok(true)
            }
            Err(Errno::EXIST) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A handle on what `path` resolves to inside the root (symlinks followed, in the root).
    pub fn open_target(&self, path: &str) -> std::io::Result<OwnedFd> {
        self.open_path(path, OFlags::PATH, ResolveFlags::empty())
    }

    /// Open `path` for reading, resolved inside the root.
    pub fn open_read(&self, path: &str) -> std::io::Result<std::fs::File> {
        self.open_path(path, OFlags::RDONLY, ResolveFlags::empty())
            .map(std::fs::File::from)
    }

    /// The path inside the root of a handle opened by this root, when the kernel can tell.
    pub fn path_of(&self, fd: BorrowedFd<'_>) -> Option<String> {
        let real = self.real.as_ref()?;
        let host = std::fs::read_link(format!("/proc/self/fd/{}", raw(fd))).ok()?;
        let inside = host.strip_prefix(real).ok()?;
        Some(format!("/{}", inside.display()))
    }
}

fn raw(fd: BorrowedFd<'_>) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// True when `fd` and `path` are the same inode (e.g. our file is already mounted there).
pub fn same_inode(fd: BorrowedFd<'_>, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (rustix::fs::fstat(fd), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.st_dev == b.dev() && a.st_ino == b.ino(),
        _ => false,
    }
}

/// The file type behind a handle.
pub fn file_type(fd: BorrowedFd<'_>) -> std::io::Result<FileType> {
    Ok(FileType::from_raw_mode(rustix::fs::fstat(fd)?.st_mode))
}
