//! Reading tar artifacts safely.
//!
//! The `tar` crate parses headers (ustar, GNU long names, PAX); every entry is then validated
//! here before the caller sees it or anything is written: only regular files, directories and
//! symlinks that stay inside the archive root are accepted; paths are relative with no `..`;
//! no entry may pass through a symlink; setuid/setgid/sticky bits are dropped; sizes and counts
//! are capped, counting the bytes actually read from the decompressed stream.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use super::ArchiveError;
use super::decompress::{Compression, decompressing_reader_named};
use super::tar_headers::{HeaderGuard, Oversized};
pub use super::tar_headers::{MAX_LONG_NAME_BYTES, MAX_PAX_HEADER_BYTES};

/// Caps on what one archive may contain. The defaults are generous (the largest real payload is
/// a few hundred MB) but finite, so that a hostile archive cannot fill the disk or memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest size of one file entry, in bytes.
    pub max_entry_bytes: u64,
    /// Largest total of file contents, in bytes. The decompressed stream as a whole (headers
    /// included) may exceed it only by a small per-entry allowance.
    pub max_total_bytes: u64,
    /// Largest number of entries (of any type).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entry_bytes: 2 << 30,
            max_total_bytes: 8 << 30,
            max_entries: 200_000,
        }
    }
}

/// What an accepted entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Directory,
    /// A regular file of `size` bytes.
    File {
        /// The content size in bytes.
        size: u64,
    },
    /// A symbolic link; the target, resolved from the link's directory, stays inside the root.
    Symlink {
        /// The target exactly as stored (relative).
        target: PathBuf,
    },
}

/// One accepted archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    /// The path relative to the archive root: only normal components (no `.`, `..` or `/`).
    pub path: PathBuf,
    /// What the entry is.
    pub kind: EntryKind,
    /// Permission bits (`0o777` mask); setuid, setgid and sticky are stripped.
    pub mode: u32,
}

/// What a walk or an extraction saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarSummary {
    /// The compression recognised from the archive's magic bytes.
    pub compression: Compression,
    /// Accepted entries of every kind (the root `./` entry is not counted).
    pub entries: u64,
    /// Regular files.
    pub files: u64,
    /// Directories (explicit entries only).
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Total bytes of file contents.
    pub file_bytes: u64,
}

/// Stream every entry in archive order; file contents are readable from `contents` during the
/// callback (what the callback leaves unread is skipped). Directories and symlinks get an empty
/// reader. Checks that need the whole archive (symlink chains) run after the last entry, so a
/// caller that acts on entries must be ready to undo its work when this returns an error.
pub fn walk_tar(
    archive: &Path,
    limits: &Limits,
    visit: &mut dyn FnMut(&TarEntry, &mut dyn Read) -> Result<(), ArchiveError>,
) -> Result<TarSummary, ArchiveError> {
    let file = File::open(archive).map_err(|source| ArchiveError::Io {
        archive: archive.to_path_buf(),
        source,
    })?;
    walk_tar_stream(
        BufReader::with_capacity(1 << 16, file),
        archive,
        limits,
        visit,
    )
}

/// Like [`walk_tar`] over any (possibly compressed) stream; `name` is used in error messages.
pub fn walk_tar_stream<R: BufRead>(
    input: R,
    name: &Path,
    limits: &Limits,
    visit: &mut dyn FnMut(&TarEntry, &mut dyn Read) -> Result<(), ArchiveError>,
) -> Result<TarSummary, ArchiveError> {
    walk_tar_stream_with(input, name, limits, AbsoluteLinks::Refuse, visit)
}

/// How a symlink whose target is absolute is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AbsoluteLinks {
    /// Refused: an artifact's links must be relative.
    #[default]
    Refuse,
    /// The archive's root stands for the filesystem root (a Debian package's data): a target
    /// `/usr/src/x` means the archive's own `usr/src/x`, and is written as a relative link.
    FromRoot,
}

/// [`walk_tar_stream`], with absolute symlink targets treated as `links` says.
pub fn walk_tar_stream_with<R: BufRead>(
    input: R,
    name: &Path,
    limits: &Limits,
    links: AbsoluteLinks,
    visit: &mut dyn FnMut(&TarEntry, &mut dyn Read) -> Result<(), ArchiveError>,
) -> Result<TarSummary, ArchiveError> {
    let (compression, decoded) = decompressing_reader_named(input, name)?;
    let state = Rc::new(Cell::new(SourceState::Ok));
    let stream_cap = limits
        .max_total_bytes
        .saturating_add(
            limits
                .max_entries
                .saturating_mul(STREAM_ALLOWANCE_PER_ENTRY),
        )
        .saturating_add(STREAM_SLACK);
    let source = GuardedSource {
        inner: decoded,
        remaining: stream_cap,
        state: Rc::clone(&state),
    };
    let oversized = Rc::new(Cell::new(None));
    let source = HeaderGuard::new(source, Rc::clone(&oversized));
    let mut walker = Walker {
        oversized: Rc::clone(&oversized),
        archive: name.to_path_buf(),
        limits: *limits,
        links,
        nodes: HashMap::new(),
        symlinks: Vec::new(),
        summary: TarSummary {
            compression,
            entries: 0,
            files: 0,
            directories: 0,
            symlinks: 0,
            file_bytes: 0,
        },
        seen: 0,
    };
    let mut tar = tar::Archive::new(source);
    let entries = tar
        .entries()
        .map_err(|e| walker.stream_error(&state, compression, "", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| walker.stream_error(&state, compression, "", e))?;
        let Some(accepted) = walker.accept(&mut entry)? else {
            continue;
        };
        let shown = accepted.path.display().to_string();
        let visited = visit(&accepted, &mut entry);
        // A failure of the stream under the visitor (decoder, size cap) is reported as such,
        // whatever error the visitor wrapped it in.
        if state.get() != SourceState::Ok || oversized.get().is_some() {
            return Err(walker.stream_error(
                &state,
                compression,
                &shown,
                io::Error::other("the stream failed while reading this entry"),
            ));
        }
        visited?;
    }
    // Read the compressed stream to its end: gzip's CRC and xz/zstd checksums sit after the
    // tar's end-of-archive blocks, and a corrupted byte inside a stored block is caught only there.
    let mut rest = tar.into_inner().into_inner();
    io::copy(&mut rest, &mut io::sink())
        .map_err(|e| walker.stream_error(&state, compression, "", e))?;
    walker.finish()?;
    Ok(walker.summary)
}

/// Extract into `dest`, which must not exist or be an empty directory. All-or-nothing: entries
/// are written into a fresh sibling directory that is renamed to `dest` only when the whole
/// archive has been read and validated; on any error it is removed and `dest` is left as it
/// was. Files are created with `O_CREAT|O_EXCL|O_NOFOLLOW` and no symlink is ever followed.
pub fn extract_tar(
    archive: &Path,
    dest: &Path,
    limits: &Limits,
) -> Result<TarSummary, ArchiveError> {
    extract_from(archive, dest, limits, AbsoluteLinks::Refuse, None, || {
        open_archive(archive)
    })
}

/// One path an extraction wrote, relative to the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    /// A directory: an archive entry, or a parent made for one.
    Dir,
    /// A regular file of this many bytes.
    File {
        /// Length in bytes.
        size: u64,
    },
    /// A symbolic link.
    Symlink {
        /// The target as written.
        target: PathBuf,
    },
}

/// Relative path → what [`extract_tar_listed`] wrote there: every path of the tree.
pub type Listing = BTreeMap<PathBuf, Extracted>;

/// [`extract_tar`], also returning every path written (each file with its length): a record
/// of the tree without reading it back. Nothing is hashed here: the archive itself is the
/// reference a tree is checked against later.
pub fn extract_tar_listed(
    archive: &Path,
    dest: &Path,
    limits: &Limits,
) -> Result<(TarSummary, Listing), ArchiveError> {
    let mut listing = Listing::new();
    let summary = extract_from(
        archive,
        dest,
        limits,
        AbsoluteLinks::Refuse,
        Some(&mut listing),
        || open_archive(archive),
    )?;
    Ok((summary, listing))
}

fn open_archive(archive: &Path) -> Result<BufReader<File>, ArchiveError> {
    File::open(archive)
        .map(|f| BufReader::with_capacity(1 << 16, f))
        .map_err(|source| ArchiveError::Io {
            archive: archive.to_path_buf(),
            source,
        })
}

/// [`extract_tar`] of any (possibly compressed) stream; `name` is used in error messages,
/// absolute symlink targets are treated as `links` says.
pub fn extract_tar_stream<R: BufRead>(
    input: R,
    name: &Path,
    dest: &Path,
    limits: &Limits,
    links: AbsoluteLinks,
) -> Result<TarSummary, ArchiveError> {
    extract_from(name, dest, limits, links, None, || Ok(input))
}

fn extract_from<R: BufRead>(
    archive: &Path,
    dest: &Path,
    limits: &Limits,
    links: AbsoluteLinks,
    mut listing: Option<&mut Listing>,
    open: impl FnOnce() -> Result<R, ArchiveError>,
) -> Result<TarSummary, ArchiveError> {
    let dest_error = |reason: String| ArchiveError::Destination {
        dest: dest.to_path_buf(),
        reason,
    };
    let dest_io = |source| ArchiveError::DestinationIo {
        dest: dest.to_path_buf(),
        source,
    };
    let dest_was_empty_dir = match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => return Err(dest_io(source)),
        Ok(meta) if meta.is_dir() => {
            let mut listing = fs::read_dir(dest).map_err(dest_io)?;
            if listing.next().is_some() {
                return Err(dest_error(
                    "the directory is not empty; remove it or choose another destination".into(),
                ));
            }
            true
        }
        Ok(_) => {
            return Err(dest_error(
                "it exists and is not a directory; remove it or choose another destination".into(),
            ));
        }
    };
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = dest
        .file_name()
        .ok_or_else(|| dest_error("the path has no final component; name a directory".into()))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}.extract-", base.to_string_lossy()))
        .tempdir_in(&parent)
        .map_err(|e| {
            dest_error(format!(
                "cannot create a staging directory in {}: {e}; check that it exists and is writable",
                parent.display()
            ))
        })?;
    let root = staging.path().to_path_buf();
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    let write_err = |path: &Path, source: io::Error| ArchiveError::Write {
        archive: archive.to_path_buf(),
        path: path.to_path_buf(),
        source,
    };

    let input = open()?;
    let summary = walk_tar_stream_with(input, archive, limits, links, &mut |entry, contents| {
        let target = root.join(&entry.path);
        if let Some(parent) = entry.path.parent() {
            ensure_dirs(&root, parent).map_err(|e| write_err(&target, e))?;
            if let Some(listing) = listing.as_deref_mut() {
                for dir in parent.ancestors().filter(|d| !d.as_os_str().is_empty()) {
                    listing.entry(dir.to_path_buf()).or_insert(Extracted::Dir);
                }
            }
        }
        match &entry.kind {
            EntryKind::Directory => {
                match fs::create_dir(&target) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let meta =
                            fs::symlink_metadata(&target).map_err(|e| write_err(&target, e))?;
                        if !meta.is_dir() {
                            return Err(write_err(&target, e));
                        }
                    }
                    Err(e) => return Err(write_err(&target, e)),
                }
                dir_modes.push((target, entry.mode));
                if let Some(listing) = listing.as_deref_mut() {
                    listing.insert(entry.path.clone(), Extracted::Dir);
                }
            }
            EntryKind::File { size } => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| write_err(&target, e))?;
                // Through a large buffer: `io::copy` then fills it straight from the decoder,
                // one write per 256 KiB instead of per 8 KiB.
                let mut writer = io::BufWriter::with_capacity(COPY_BUFFER, &mut file);
                let copied = io::copy(contents, &mut writer)
                    .and_then(|n| writer.flush().map(|()| n))
                    .map_err(|e| write_err(&target, e))?;
                drop(writer);
                if copied != *size {
                    return Err(write_err(
                        &target,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("entry holds {copied} bytes, header says {size}"),
                        ),
                    ));
                }
                file.set_permissions(fs::Permissions::from_mode(entry.mode))
                    .map_err(|e| write_err(&target, e))?;
                if let Some(listing) = listing.as_deref_mut() {
                    // A listed tree is synced as a whole later: start its writeback now, so
                    // that sync has little left to wait for (a failure shows there).
                    let _ = crate::fsutil::start_writeback(&file, 0, copied);
                    listing.insert(entry.path.clone(), Extracted::File { size: copied });
                }
            }
            EntryKind::Symlink { target: link } => {
                std::os::unix::fs::symlink(link, &target).map_err(|e| write_err(&target, e))?;
                if let Some(listing) = listing.as_deref_mut() {
                    let target = link.clone();
                    listing.insert(entry.path.clone(), Extracted::Symlink { target });
                }
            }
        }
        Ok(())
    })?;

    // Directory modes last, deepest first, so a read-only directory did not block its children.
    dir_modes.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (dir, mode) in &dir_modes {
        fs::set_permissions(dir, fs::Permissions::from_mode(*mode))
            .map_err(|e| write_err(dir, e))?;
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(|e| write_err(&root, e))?;
    if dest_was_empty_dir {
        fs::remove_dir(dest)
            .map_err(|e| dest_error(format!("cannot replace the empty directory: {e}")))?;
    }
    fs::rename(&root, dest).map_err(|e| {
        dest_error(format!(
            "cannot move the extracted tree into place: {e}; check that nothing else created it meanwhile"
        ))
    })?;
    // The staging path is gone (renamed); make sure its guard does not try to delete `dest`.
    let _ = staging.keep();
    Ok(summary)
}

/// The write buffer of an extracted file.
const COPY_BUFFER: usize = 256 << 10;

/// Create the directories of `rel` (relative, validated) under `root`, never following symlinks:
/// the walker has already refused any entry whose path passes through one.
fn ensure_dirs(root: &Path, rel: &Path) -> io::Result<()> {
    let mut path = root.to_path_buf();
    for component in rel.components() {
        path.push(component);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a parent path exists and is not a directory",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&path)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Header bytes the stream may carry per entry beyond file contents (a header, a GNU long name
/// or a PAX record of ordinary length).
const STREAM_ALLOWANCE_PER_ENTRY: u64 = 4096;
/// Stream bytes allowed beyond the per-entry allowance (end-of-archive blocks, padding).
const STREAM_SLACK: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Ok,
    LimitHit,
    DecodeFailed,
}

/// The decompressed stream, capped, remembering whether a failure came from the decoder or the
/// cap (the tar parser only sees an `io::Error`).
struct GuardedSource<'a> {
    inner: Box<dyn Read + 'a>,
    remaining: u64,
    state: Rc<Cell<SourceState>>,
}

impl Read for GuardedSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // Only an error if there is more to read.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe) {
                Ok(0) => Ok(0),
                Ok(_) => {
                    self.state.set(SourceState::LimitHit);
                    Err(io::Error::other("archive stream exceeds the size limit"))
                }
                Err(e) => {
                    self.state.set(SourceState::DecodeFailed);
                    Err(e)
                }
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..want]) {
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.state.set(SourceState::DecodeFailed);
                Err(e)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File,
    Symlink,
}

struct Walker {
    archive: PathBuf,
    /// Set by the header guard when an extension header was over its cap.
    oversized: Rc<Cell<Option<Oversized>>>,
    limits: Limits,
    links: AbsoluteLinks,
    nodes: HashMap<PathBuf, Node>,
    /// Each symlink with the paths its target walks through (lexically, relative to the
    /// root) before reaching its final component.
    symlinks: Vec<(PathBuf, Vec<PathBuf>)>,
    summary: TarSummary,
    /// Headers seen, including skipped ones, for the entry-count cap.
    seen: u64,
}

impl Walker {
    fn unsafe_entry(
        &self,
        entry: &str,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> ArchiveError {
        ArchiveError::UnsafeEntry {
            archive: self.archive.clone(),
            entry: entry.to_string(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }

    fn limit(&self, entry: &str, what: &'static str, limit: u64) -> ArchiveError {
        ArchiveError::LimitExceeded {
            archive: self.archive.clone(),
            entry: entry.to_string(),
            what,
            limit,
        }
    }

    fn stream_error(
        &self,
        state: &Cell<SourceState>,
        compression: Compression,
        entry: &str,
        e: io::Error,
    ) -> ArchiveError {
        if let Some(found) = self.oversized.get() {
            return ArchiveError::ExtensionHeaderTooLarge {
                archive: self.archive.clone(),
                what: found.kind.describe(),
                header: found.name(),
                offset: found.offset,
                size: found.size,
                limit: found.kind.cap(),
            };
        }
        match state.get() {
            SourceState::LimitHit => self.limit(
                if entry.is_empty() { "<headers>" } else { entry },
                "total size",
                self.limits.max_total_bytes,
            ),
            SourceState::DecodeFailed if compression != Compression::None => {
                ArchiveError::Decompress {
                    archive: self.archive.clone(),
                    compression,
                    source: e,
                }
            }
            _ => ArchiveError::Malformed {
                archive: self.archive.clone(),
                entry: (!entry.is_empty()).then(|| entry.to_string()),
                source: e,
            },
        }
    }

    /// Validate one entry; `None` for entries that carry nothing to extract (the root `./`,
    /// PAX global headers).
    fn accept<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Option<TarEntry>, ArchiveError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        self.seen += 1;
        if self.seen > self.limits.max_entries {
            return Err(self.limit(&shown, "entry count", self.limits.max_entries));
        }
        // GNU tar's PAX sparse format (`--sparse --format=pax`) stores a sparse map in what
        // looks like a regular file; extracting it as one would hand out the map as content.
        let own_type = entry.header().entry_type();
        let is_extension =
            own_type.is_pax_local_extensions() || own_type.is_pax_global_extensions();
        if !is_extension {
            let sparse = entry
                .pax_extensions()
                .ok()
                .flatten()
                .is_some_and(|mut records| {
                    records.any(|r| r.is_ok_and(|r| r.key_bytes().starts_with(b"GNU.sparse.")))
                });
            if sparse {
                return Err(self.unsafe_entry(
                    &shown,
                    "it is a sparse file (PAX format)",
                    "re-pack the artifact without --sparse",
                ));
            }
        }
        let header = entry.header();
        let kind = header.entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(None);
        }
        let node = if kind.is_file() || kind.is_contiguous() {
            Node::File
        } else if kind.is_dir() {
            Node::Dir
        } else if kind.is_symlink() {
            Node::Symlink
        } else {
            let (what, fix) = if kind.is_hard_link() {
                (
                    "it is a hard link",
                    "re-pack the artifact with the file copied instead of hard-linked (GNU tar --hard-dereference)",
                )
            } else if kind.is_character_special() || kind.is_block_special() {
                (
                    "it is a device node",
                    "re-pack the artifact without device nodes",
                )
            } else if kind.is_fifo() {
                ("it is a fifo", "re-pack the artifact without fifos")
            } else if kind.is_gnu_sparse() {
                (
                    "it is a sparse file",
                    "re-pack the artifact without --sparse",
                )
            } else {
                (
                    "its entry type is not a file, directory or symlink",
                    "re-pack the artifact with GNU tar",
                )
            };
            return Err(self.unsafe_entry(&shown, what, fix));
        };

        let path = self.relative_path(&shown, &raw_path, node)?;
        let Some(path) = path else {
            return Ok(None);
        };

        // No entry may live under a symlink or a file, wherever they appeared in the archive.
        let mut ancestor = PathBuf::new();
        let parents: Vec<_> = path
            .parent()
            .map(|p| p.components().collect())
            .unwrap_or_default();
        for component in parents {
            ancestor.push(component);
            match self.nodes.get(&ancestor) {
                Some(Node::Symlink) => {
                    return Err(self.unsafe_entry(
                        &shown,
                        format!(
                            "its path passes through the symlink `{}`",
                            ancestor.display()
                        ),
                        "re-pack the artifact with real directories instead of symlinked ones",
                    ));
                }
                Some(Node::File) => {
                    return Err(self.unsafe_entry(
                        &shown,
                        format!("its parent `{}` is a regular file", ancestor.display()),
                        "re-pack the artifact from a real directory tree",
                    ));
                }
                Some(Node::Dir) => {}
                None => {
                    self.nodes.insert(ancestor.clone(), Node::Dir);
                }
            }
        }
        match (self.nodes.get(&path), node) {
            (None, _) => {}
            (Some(Node::Dir), Node::Dir) => {}
            (Some(_), _) => {
                return Err(self.unsafe_entry(
                    &shown,
                    "the archive holds this path twice",
                    "re-pack the artifact so that each path appears once",
                ));
            }
        }
        self.nodes.insert(path.clone(), node);

        let mode = header.mode().map_err(|source| ArchiveError::Malformed {
            archive: self.archive.clone(),
            entry: Some(shown.clone()),
            source,
        })? & 0o777;
        // A directory's mode from an artifact only decides who may add files under it (0777)
        // or lock the builder out of it (0000): both are wrong for a layer, so it is fixed. A
        // file keeps its read and execute bits but nobody other than its owner may write it:
        // the unpacked tree is what layers and disks are built from.
        let mode = if node == Node::Dir {
            0o755
        } else {
            mode & 0o755
        };

        let kind = match node {
            Node::Dir => {
                self.summary.directories += 1;
                EntryKind::Directory
            }
            Node::File => {
                let size = entry.size();
                if size > self.limits.max_entry_bytes {
                    return Err(self.limit(&shown, "entry size", self.limits.max_entry_bytes));
                }
                self.summary.file_bytes = self.summary.file_bytes.saturating_add(size);
                if self.summary.file_bytes > self.limits.max_total_bytes {
                    return Err(self.limit(&shown, "total size", self.limits.max_total_bytes));
                }
                self.summary.files += 1;
                EntryKind::File { size }
            }
            Node::Symlink => {
                let target = self.symlink_target(&shown, entry, &path)?;
                self.summary.symlinks += 1;
                EntryKind::Symlink { target }
            }
        };
        self.summary.entries += 1;
        Ok(Some(TarEntry { path, kind, mode }))
    }

    /// The entry's path as normal components only; `None` for the root directory itself.
    fn relative_path(
        &self,
        shown: &str,
        raw: &[u8],
        node: Node,
    ) -> Result<Option<PathBuf>, ArchiveError> {
        if raw.contains(&0) {
            return Err(self.unsafe_entry(
                shown,
                "its path contains a NUL byte",
                "re-pack the artifact with plain file names",
            ));
        }
        let mut path = PathBuf::new();
        for component in Path::new(OsStr::from_bytes(raw)).components() {
            match component {
                Component::Normal(part) => path.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(self.unsafe_entry(
                        shown,
                        "its path contains `..`",
                        "re-pack the artifact from inside its root directory, without `..` in any path",
                    ));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.unsafe_entry(
                        shown,
                        "its path is absolute",
                        "re-pack the artifact with relative paths (GNU tar strips the leading `/` by default; do not use -P)",
                    ));
                }
            }
        }
        if path.as_os_str().is_empty() {
            if node == Node::Dir {
                return Ok(None);
            }
            return Err(self.unsafe_entry(
                shown,
                "its path is empty",
                "re-pack the artifact with GNU tar",
            ));
        }
        Ok(Some(path))
    }

    fn symlink_target<R: Read>(
        &mut self,
        shown: &str,
        entry: &tar::Entry<'_, R>,
        path: &Path,
    ) -> Result<PathBuf, ArchiveError> {
        let fix = "re-pack the artifact with symlinks that point inside it, as relative paths";
        let Some(raw) = entry.link_name_bytes() else {
            return Err(self.unsafe_entry(shown, "the symlink has no target", fix));
        };
        if raw.is_empty() || raw.contains(&0) {
            return Err(self.unsafe_entry(
                shown,
                "the symlink target is empty or contains a NUL byte",
                fix,
            ));
        }
        let mut target = Path::new(OsStr::from_bytes(&raw)).to_path_buf();
        if self.links == AbsoluteLinks::FromRoot && target.is_absolute() {
            // From the link's directory up to the archive root, then down to the target.
            let depth = path.parent().map_or(0, |p| p.components().count());
            let mut relative: PathBuf = std::iter::repeat_n("..", depth).collect();
            relative.push(target.strip_prefix("/").unwrap_or(&target));
            target = relative;
        }
        let mut resolved: Vec<&OsStr> = path
            .parent()
            .map(|p| p.iter().collect())
            .unwrap_or_default();
        let mut traversed: Vec<PathBuf> = Vec::new();
        for component in target.components() {
            match component {
                Component::Normal(part) => {
                    resolved.push(part);
                    traversed.push(resolved.iter().collect());
                }
                Component::CurDir => {}
                Component::ParentDir => {
                    if resolved.pop().is_none() {
                        return Err(self.unsafe_entry(
                            shown,
                            format!(
                                "the symlink target `{}` leaves the archive root",
                                target.display()
                            ),
                            fix,
                        ));
                    }
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(self.unsafe_entry(
                        shown,
                        format!("the symlink target `{}` is absolute", target.display()),
                        fix,
                    ));
                }
            }
        }
        // The final component may itself be a symlink (chains are fine); only the ones walked
        // through matter.
        let final_path: PathBuf = resolved.iter().collect();
        if traversed.last() == Some(&final_path) {
            traversed.pop();
        }
        self.symlinks.push((path.to_path_buf(), traversed));
        Ok(target)
    }

    /// Checks that need every entry: a symlink's target must not pass through another symlink
    /// (lexical resolution could not vouch for where `..` after a symlink lands).
    fn finish(&self) -> Result<(), ArchiveError> {
        for (link, traversed) in &self.symlinks {
            if let Some(through) = traversed
                .iter()
                .find(|p| self.nodes.get(*p) == Some(&Node::Symlink))
            {
                return Err(self.unsafe_entry(
                    &link.display().to_string(),
                    format!(
                        "the symlink target passes through another symlink `{}`",
                        through.display()
                    ),
                    "re-pack the artifact with symlinks that point at real files or directories",
                ));
            }
        }
        Ok(())
    }
}
