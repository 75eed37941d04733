//! The content-addressed store under `<cache>/artifacts`: verified files named by their digest,
//! partial downloads and their validators, per-digest locks, and the copy that hashes and caps
//! the bytes as they arrive.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;
use sha2::{Digest, Sha256};

use super::{FetchError, Fetched, Progress};
use crate::registry::Sha256Digest;

/// The three directories of the store.
#[derive(Debug, Clone)]
pub(super) struct Store {
    /// `artifacts/sha256/<hex>`: verified files only.
    verified: PathBuf,
    /// `artifacts/tmp/`: downloads in progress.
    tmp: PathBuf,
    /// `artifacts/locks/<hex>.lock`: one `flock` per digest.
    locks: PathBuf,
}

impl Store {
    /// The store in `cache_dir`, its directories created if missing.
    pub(super) fn open(cache_dir: &Path) -> Result<Store, FetchError> {
        let base = cache_dir.join("artifacts");
        let store = Store {
            verified: base.join("sha256"),
            tmp: base.join("tmp"),
            locks: base.join("locks"),
        };
        for dir in [&store.verified, &store.tmp, &store.locks] {
            fs::create_dir_all(dir).map_err(|source| FetchError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(store)
    }

    /// Where downloads in progress go.
    pub(super) fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// The kept partial download of a pinned digest, which a later attempt resumes.
    pub(super) fn partial(&self, sha256: &Sha256Digest) -> PathBuf {
        self.tmp.join(format!("{sha256}.partial"))
    }

    /// Path where a digest would live in the cache, if that file is present. Files only get
    /// there by rename after verification, so presence means valid.
    pub(super) fn cached(&self, sha256: &Sha256Digest) -> Option<PathBuf> {
        let path = self.verified.join(sha256.to_hex());
        fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .map(|_| path)
    }

    /// Re-hash a cached file; `None` when it is not cached.
    pub(super) fn rehash(&self, sha256: &Sha256Digest) -> Result<Option<Fetched>, FetchError> {
        let Some(path) = self.cached(sha256) else {
            return Ok(None);
        };
        let cache_err = |source| FetchError::Cache {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(cache_err)?;
        let (digest, size) = crate::fsutil::sha256_reader(file).map_err(cache_err)?;
        Ok(Some(Fetched {
            sha256: digest.into(),
            size,
            path,
        }))
    }

    /// The cached file of a digest, unless its size differs from the registry's.
    pub(super) fn cached_matching(
        &self,
        sha256: &Sha256Digest,
        size: Option<u64>,
    ) -> Option<Fetched> {
        let path = self.cached(sha256)?;
        let actual = fs::metadata(&path).ok()?.len();
        if size.is_some_and(|s| s != actual) {
            tracing::warn!(
                "cached {} has {actual} bytes, the registry says {size:?}: fetching again",
                path.display()
            );
            return None;
        }
        Some(Fetched {
            path,
            sha256: *sha256,
            size: actual,
        })
    }

    /// Take the digest's lock, so that threads and processes fetching it take turns.
    pub(super) fn lock(&self, sha256: &Sha256Digest) -> Result<Flock<File>, FetchError> {
        let path = self.locks.join(format!("{sha256}.lock"));
        crate::fsutil::lock_exclusive(&path).map_err(|source| FetchError::Cache { path, source })
    }

    /// Move a verified temporary file to its digest's name, durably.
    pub(super) fn install(
        &self,
        temp: &Path,
        sha256: &Sha256Digest,
    ) -> Result<PathBuf, FetchError> {
        remove_one_quietly(&validator_path(temp));
        let path = self.verified.join(sha256.to_hex());
        crate::fsutil::rename_durable(temp, &path).map_err(|source| FetchError::Cache {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// Where a copy goes and how large it may grow.
pub(super) struct Limit<'a> {
    /// The size cap, if any.
    pub(super) cap: Option<u64>,
    /// The URL the bytes come from (for the error).
    pub(super) url: &'a str,
    /// The file written.
    pub(super) dest: &'a Path,
}

/// Copy `src` to the end into `out` (which already holds `written` bytes, hashed into
/// `hasher`), hashing and reporting progress; past the size cap the partial file is removed.
/// A read error becomes `read_failed(error, bytes written so far, out)`.
pub(super) fn copy_hashing(
    src: &mut dyn Read,
    out: &mut File,
    hasher: &mut Sha256,
    mut written: u64,
    limit: Limit<'_>,
    progress: &dyn Progress,
    read_failed: impl FnOnce(io::Error, u64, &File) -> FetchError,
) -> Result<u64, FetchError> {
    let cache_err = |source| FetchError::Cache {
        path: limit.dest.to_path_buf(),
        source,
    };
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(written),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_failed(e, written, out)),
        };
        written += n as u64;
        if let Some(cap) = limit.cap
            && written > cap
        {
            remove_quietly(limit.dest);
            return Err(FetchError::SizeCap {
                url: limit.url.to_string(),
                cap,
                seen: written,
            });
        }
        out.write_all(&buf[..n]).map_err(cache_err)?;
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
    }
}

/// Where the validator of a partial download is kept: beside it.
pub(super) fn validator_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".validator");
    PathBuf::from(name)
}

/// Remove a (partial) download and the validator kept beside it.
pub(super) fn remove_quietly(path: &Path) {
    remove_one_quietly(&validator_path(path));
    remove_one_quietly(path);
}

/// Remove one file; a file already gone is no news.
pub(super) fn remove_one_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
}
