//! `archive`: reading tar artifacts safely; writing and reading deterministic cpio (newc) initrds;
//! listing erofs images.
//!
//! Reading is defensive by design: artifacts come from the network, so every tar entry is
//! validated before anything touches the disk (see [`tar`]), and compression is recognised by its
//! magic bytes, never by a file name (see [`decompress`]).

pub mod compress;
pub mod cpio;
pub mod deb;
pub mod decompress;
pub mod erofs;
pub mod tar;
mod tar_headers;

use std::io;
use std::path::PathBuf;

use self::decompress::Compression;
use crate::outcome::{Classify, Outcome};

/// Why an archive could not be read or extracted. Every variant names the archive (and the entry,
/// when there is one) and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive file could not be opened or read.
    #[error("cannot read archive {archive} (check that the file exists and is readable)")]
    Io {
        /// The archive being read.
        archive: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The compressed stream is damaged or truncated.
    #[error(
        "archive {archive}: {compression} stream is corrupt or truncated ({source}); fetch the artifact again and check its sha256"
    )]
    Decompress {
        /// The archive being read.
        archive: PathBuf,
        /// The compression detected from the magic bytes.
        compression: Compression,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The tar structure itself is malformed.
    #[error(
        "archive {archive} is not a valid tar archive{}; fetch the artifact again or re-pack it with GNU tar",
        entry.as_ref().map(|e| format!(" (at entry `{e}`)")).unwrap_or_default()
    )]
    Malformed {
        /// The archive being read.
        archive: PathBuf,
        /// The entry being read, when the headers got that far.
        entry: Option<String>,
        /// What the tar parser found wrong.
        #[source]
        source: io::Error,
    },
    /// An entry was refused because extracting it could be unsafe.
    #[error("archive {archive}: entry `{entry}` refused: {reason}; {fix}")]
    UnsafeEntry {
        /// The archive being read.
        archive: PathBuf,
        /// The entry's path as stored in the archive.
        entry: String,
        /// Why the entry is refused.
        reason: String,
        /// How to repair the artifact.
        fix: String,
    },
    /// An entry or the whole archive exceeds a size or count limit.
    #[error(
        "archive {archive}: entry `{entry}` exceeds the {what} limit of {limit}; re-pack the artifact smaller or raise the limit if the artifact is trusted"
    )]
    LimitExceeded {
        /// The archive being read.
        archive: PathBuf,
        /// The entry being read when the limit was hit.
        entry: String,
        /// Which limit: `entry size`, `total size` or `entry count`.
        what: &'static str,
        /// The limit's value (bytes or entries).
        limit: u64,
    },
    /// An extension header (GNU long name, PAX record) claims more bytes than any real path or
    /// record needs; it is refused before its payload is read.
    #[error(
        "archive {archive}: the {what} header {header:?} at byte {offset} of the tar stream claims {size} bytes, over the cap of {limit} bytes; no packager writes such a header, so the artifact is damaged or hostile: fetch it from its vendor again"
    )]
    ExtensionHeaderTooLarge {
        /// The archive being read.
        archive: PathBuf,
        /// Which header: `GNU long name` or `PAX extended`.
        what: &'static str,
        /// The header's own name field (`././@LongLink`, `PaxHeaders.N/<file>`).
        header: String,
        /// Where the header starts in the uncompressed tar stream.
        offset: u64,
        /// The size the header claims.
        size: u64,
        /// The cap for that kind of header.
        limit: u64,
    },
    /// The extraction destination cannot be looked at.
    #[error("cannot extract into {dest}: it cannot be read")]
    DestinationIo {
        /// The destination directory.
        dest: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A `.deb` package's `ar` structure is unusable, or it has no data member we read.
    #[error("package {archive}: {reason}; fetch the package again from its Debian mirror")]
    Deb {
        /// The package being read.
        archive: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The extraction destination is unusable.
    #[error("cannot extract into {dest}: {reason}")]
    Destination {
        /// The destination directory.
        dest: PathBuf,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// Writing an extracted entry failed.
    #[error(
        "cannot write {path} while extracting {archive}: {source}; check free space and permissions"
    )]
    Write {
        /// The archive being extracted.
        archive: PathBuf,
        /// The file being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The caller's visitor refused an entry.
    #[error("archive {archive}: entry `{entry}`: {message}")]
    Visitor {
        /// The archive being read (may be empty when the visitor does not know it).
        archive: PathBuf,
        /// The entry being visited.
        entry: String,
        /// The visitor's message.
        message: String,
    },
}

impl Classify for ArchiveError {
    fn outcome(&self) -> Outcome {
        match self {
            ArchiveError::Io { .. }
            | ArchiveError::Decompress { .. }
            | ArchiveError::Malformed { .. }
            | ArchiveError::UnsafeEntry { .. }
            | ArchiveError::LimitExceeded { .. }
            | ArchiveError::ExtensionHeaderTooLarge { .. }
            | ArchiveError::Destination { .. }
            | ArchiveError::DestinationIo { .. }
            | ArchiveError::Write { .. }
            | ArchiveError::Deb { .. }
            | ArchiveError::Visitor { .. } => Outcome::Failed,
        }
    }
}
