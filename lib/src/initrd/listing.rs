//! `initrd inspect`: what a file made by `initrd build` holds, whichever form it has: the cpio
//! layers of an initrd, or the tree of a GPU disk image (erofs), told apart by their bytes.

use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::archive::cpio::{CpioError, InitrdLayer, read_initrd};
use crate::archive::erofs::{ErofsError, ImageListing, is_erofs, read_image};
use crate::outcome::{Classify, Outcome};
use crate::remedy::Remedy;

/// The contents of an initrd or a GPU disk image. Serializes as the bare listing: an initrd's
/// layers stay the JSON array they always were.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Listing {
    /// Concatenated cpio layers.
    Initrd(Vec<InitrdLayer>),
    /// An erofs image.
    Disk(ImageListing),
}

/// Why a file could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    /// The file could not be opened or read.
    #[error("cannot read {file}")]
    Io {
        /// The file.
        file: String,
        /// The read error.
        #[source]
        source: std::io::Error,
    },
    /// Not a readable initrd.
    #[error(transparent)]
    Cpio(#[from] CpioError),
    /// Not a readable erofs image.
    #[error(transparent)]
    Erofs(#[from] ErofsError),
}

impl Classify for ListingError {
    fn outcome(&self) -> Outcome {
        match self {
            ListingError::Io { .. } => Outcome::Failed,
            ListingError::Cpio(e) => e.outcome(),
            ListingError::Erofs(e) => e.outcome(),
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            ListingError::Io { .. } => None,
            ListingError::Cpio(e) => e.remedy(),
            ListingError::Erofs(e) => e.remedy(),
        }
    }
}

/// List the file at `path`: an erofs image if it has an erofs superblock, else an initrd.
pub fn list(path: &Path) -> Result<Listing, ListingError> {
    let mut head = Vec::with_capacity(2048);
    std::fs::File::open(path)
        .and_then(|f| f.take(2048).read_to_end(&mut head))
        .map_err(|source| ListingError::Io {
            file: path.display().to_string(),
            source,
        })?;
    if is_erofs(&head) {
        Ok(Listing::Disk(read_image(path)?))
    } else {
        Ok(Listing::Initrd(read_initrd(path)?))
    }
}
