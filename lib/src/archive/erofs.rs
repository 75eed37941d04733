//! Listing an erofs image (the GPU disk, `initrd build --form disk`) entry by entry, as
//! [`super::cpio::read_initrd`] lists a cpio layer. Reading goes through the `erofs-rs` crate;
//! writing is `mkfs.erofs`'s (see [`crate::initrd::disk`]).

use std::io::Read;
use std::path::Path;

use erofs_rs::EroFS;
use erofs_rs::backend::SliceImage;
use serde::Serialize;

use super::cpio::InitrdEntry;
use crate::outcome::{Classify, Outcome};

/// Where the erofs superblock starts, and its magic (little endian) there.
const SUPERBLOCK_OFFSET: usize = 1024;
const MAGIC: [u8; 4] = 0xE0F5_E1E2u32.to_le_bytes();

/// Why an image could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    /// The file could not be read.
    #[error("cannot read {file}")]
    Io {
        /// The image.
        file: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// The file has no erofs superblock.
    #[error(
        "{file} is not a readable erofs image (no erofs superblock at byte 1024); rebuild it with `initrd build`"
    )]
    NoSuperblock {
        /// The image.
        file: String,
    },
    /// The erofs reader could not read the image.
    #[error(
        "{file} is not a readable erofs image{}; rebuild it with `initrd build`",
        entry.as_ref().map(|e| format!(" (at {e})")).unwrap_or_default()
    )]
    Malformed {
        /// The image.
        file: String,
        /// The entry being read, once the walk got that far.
        entry: Option<String>,
        /// What the reader found.
        #[source]
        source: erofs_rs::Error,
    },
}

impl Classify for ErofsError {
    fn outcome(&self) -> Outcome {
        match self {
            ErofsError::Io { .. }
            | ErofsError::NoSuperblock { .. }
            | ErofsError::Malformed { .. } => Outcome::Failed,
        }
    }
}

/// An erofs image's contents.
#[derive(Debug, Clone, Serialize)]
pub struct ImageListing {
    /// Size of the image file in bytes (padding included).
    pub size: u64,
    /// Every entry below the root, depth first, names sorted within a directory.
    pub entries: Vec<InitrdEntry>,
    /// Sum of file content sizes.
    pub content_bytes: u64,
}

/// Whether `head` (the file's first bytes, at least 1028 of them) starts an erofs image.
pub fn is_erofs(head: &[u8]) -> bool {
    head.get(SUPERBLOCK_OFFSET..SUPERBLOCK_OFFSET + 4) == Some(&MAGIC[..])
}

/// List every entry of the erofs image at `path`.
pub fn read_image(path: &Path) -> Result<ImageListing, ErofsError> {
    let file = path.display().to_string();
    let io_err = |source| ErofsError::Io {
        file: file.clone(),
        source,
    };
    // The reader wants the image as one slice; the GPU image is a few hundred MB at most and
    // this is an inspection command, so reading it whole beats an unsafe mmap.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err)?;
    let malformed = |source| ErofsError::Malformed {
        file: file.clone(),
        entry: None,
        source,
    };
    if !is_erofs(&bytes) {
        return Err(ErofsError::NoSuperblock { file });
    }
    let fs = EroFS::new(SliceImage::new(&bytes)).map_err(malformed)?;
    let mut entries = Vec::new();
    let mut content_bytes = 0;
    for entry in fs.walk_dir("/").map_err(malformed)? {
        let entry = entry.map_err(malformed)?;
        let inode = entry.inode;
        let path = entry.dir_entry.path();
        let path = path.to_string_lossy().trim_start_matches('/').to_string();
        let (kind, target) = if inode.is_dir() {
            ("dir", None)
        } else if inode.is_file() {
            content_bytes += inode.data_size();
            ("file", None)
        } else if inode.is_symlink() {
            let target = fs
                .read_link_inode(inode)
                .map_err(|source| ErofsError::Malformed {
                    file: file.clone(),
                    entry: Some(path.clone()),
                    source,
                })?;
            ("symlink", Some(target.to_string_lossy().into_owned()))
        } else {
            ("other", None)
        };
        entries.push(InitrdEntry {
            path,
            kind,
            mode: std::os::unix::fs::PermissionsExt::mode(&inode.permissions()) & 0o7777,
            size: if kind == "dir" { 0 } else { inode.data_size() },
            target,
            rdev: inode.device(),
        });
    }
    Ok(ImageListing {
        size: bytes.len() as u64,
        entries,
        content_bytes,
    })
}
