//! Debian packages (`.deb`) read as safely as tar artifacts.
//!
//! A `.deb` is an `ar` archive: `debian-binary` (the format version), `control.tar.*`, then
//! `data.tar.{xz,zst,gz}` or a plain `data.tar`. Only the data member is extracted, through
//! [`super::tar`] with every one of its rules (no escaping paths, no devices, capped sizes);
//! the package's root stands for `/`, so an absolute symlink target such as
//! `lib/modules/K/build -> /usr/src/linux-headers-K` is kept as the relative link it means.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::ArchiveError;
use super::tar::{AbsoluteLinks, Limits, TarSummary, extract_tar_stream};

/// The first bytes of every `ar` archive, `.deb` included.
pub const AR_MAGIC: &[u8; 8] = b"!<arch>\n";

/// More members than any real package has (three, sometimes a signature or two).
const MAX_MEMBERS: usize = 16;

/// The data member names we read; another compression (bzip2, lzma) is refused by name.
const DATA_MEMBERS: [&str; 4] = ["data.tar", "data.tar.gz", "data.tar.xz", "data.tar.zst"];

/// Whether the file at `path` starts like an `ar` archive (a `.deb`), whatever its name.
pub fn is_deb(path: &Path) -> Result<bool, ArchiveError> {
    let io_err = |source| ArchiveError::Io {
        archive: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 8];
    let mut file = File::open(path).map_err(io_err)?;
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..]).map_err(io_err)? {
            0 => return Ok(false),
            n => read += n,
        }
    }
    Ok(&magic == AR_MAGIC)
}

/// Extract the data member of the package `deb` into `dest` (all-or-nothing, like
/// [`super::tar::extract_tar`]).
pub fn extract_deb(deb: &Path, dest: &Path, limits: &Limits) -> Result<TarSummary, ArchiveError> {
    let bad = |reason: String| ArchiveError::Deb {
        archive: deb.to_path_buf(),
        reason,
    };
    let file = File::open(deb).map_err(|source| ArchiveError::Io {
        archive: deb.to_path_buf(),
        source,
    })?;
    let mut archive = ar::Archive::new(BufReader::with_capacity(1 << 16, file));
    let mut members = 0;
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(|e| bad(format!("its ar structure is malformed ({e})")))?;
        members += 1;
        if members > MAX_MEMBERS {
            return Err(bad(format!(
                "it has more than {MAX_MEMBERS} members, which no Debian package has"
            )));
        }
        let name = String::from_utf8_lossy(entry.header().identifier()).into_owned();
        if members == 1 {
            let mut version = Vec::new();
            (&mut entry)
                .take(16)
                .read_to_end(&mut version)
                .map_err(|e| bad(format!("its debian-binary member cannot be read ({e})")))?;
            if name != "debian-binary" || !version.starts_with(b"2.") {
                return Err(bad(
                    "it does not start with a `debian-binary` member of format 2.x: it is not \
                     a Debian binary package"
                        .into(),
                ));
            }
            continue;
        }
        if !name.starts_with("data.tar") {
            continue;
        }
        if !DATA_MEMBERS.contains(&name.as_str()) {
            return Err(bad(format!(
                "its data member `{name}` uses a compression we do not read (xz, zstd, gzip or none)"
            )));
        }
        if entry.header().size() > limits.max_total_bytes {
            return Err(ArchiveError::LimitExceeded {
                archive: deb.to_path_buf(),
                entry: name,
                what: "total size",
                limit: limits.max_total_bytes,
            });
        }
        let shown = deb.join(&name);
        return extract_tar_stream(
            BufReader::with_capacity(1 << 16, entry),
            &shown,
            dest,
            limits,
            AbsoluteLinks::FromRoot,
        );
    }
    if members == 0 {
        return Err(bad("it is empty or not an ar archive".into()));
    }
    Err(bad("it has no data.tar member".into()))
}
