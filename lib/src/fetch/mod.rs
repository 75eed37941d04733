//! `fetch`: download artifacts into a content-addressed cache, verifying sha256 while streaming.
//!
//! Layout under the cache directory:
//! - `artifacts/sha256/<hex>`: verified files, named by their digest. A file appears here only by
//!   an atomic rename after its digest was checked, so a present file is a valid file.
//! - `artifacts/tmp/`: downloads in progress. A pinned download keeps its partial file
//!   (`<hex>.partial`) so that a later attempt can resume it with an HTTP `Range` request.
//! - `artifacts/locks/<hex>.lock`: one `flock` per digest, so that threads and processes fetching
//!   the same artifact take turns instead of corrupting each other's temp files.
//!
//! One concern a file: `cache.rs` (that store: lookup, locks, durable install, the copy that
//! hashes and caps the bytes as they arrive), `transport.rs` (one URL into one file: http(s)
//! with timeouts, retries with backoff, resume and redirect rules; `file://` locally). This file
//! is the policy over them: pinned or not, mirrors in order, a digest mismatch reported first.

mod cache;
mod transport;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::outcome::{Classify, Outcome};
use crate::registry::{Arch, Artifact, ArtifactKind, Release, Sha256Digest};
use crate::remedy::Remedy;
use cache::{Store, remove_one_quietly, remove_quietly, validator_path};
use transport::Transport;

/// Receives download progress. Every method has a no-op default.
pub trait Progress: Sync {
    /// A download from `url` (re)starts; `total` is its full size when known.
    fn begin(&self, _url: &str, _total: Option<u64>) {}
    /// `bytes` more bytes are on disk (a resumed download first reports the bytes it kept).
    fn advance(&self, _bytes: u64) {}
    /// The download from the last `begin`'s URL is over (finished or failed).
    fn end(&self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// How downloads behave.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Longest wait for the server while reading a response (per read, not per download).
    pub timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// How many times one URL is retried after a transient failure before the next mirror.
    pub retries: u32,
    /// Wait before the first retry; doubles after each retry.
    pub backoff: Duration,
    /// Upper bound of the wait between retries.
    pub max_backoff: Duration,
    /// Largest download accepted when no size is pinned (adding or pinning a release); a pinned
    /// `size` is always the exact cap.
    pub max_unpinned_bytes: u64,
}

/// The default for [`FetchOptions::max_unpinned_bytes`]: ten times the largest real artifact.
pub const DEFAULT_MAX_UNPINNED_BYTES: u64 = 4 << 30;

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
            retries: 3,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(10),
            max_unpinned_bytes: DEFAULT_MAX_UNPINNED_BYTES,
        }
    }
}

/// A verified file in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Where it is: `<cache>/artifacts/sha256/<hex>`.
    pub path: PathBuf,
    /// Its digest.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// Errors from fetching.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The artifact has no digest, so it cannot be verified.
    #[error(
        "release `{release}`: the {kind} artifact for {arch} is unpinned (no sha256), so it cannot \
         be verified; pin release {release} first"
    )]
    Unpinned {
        /// The release.
        release: String,
        /// The artifact kind.
        kind: ArtifactKind,
        /// The architecture.
        arch: Arch,
    },
    /// The artifact lists no URL.
    #[error("no URL to download from; add `url` or `urls` to the artifact in the registry")]
    NoUrls,
    /// The downloaded bytes do not have the expected digest.
    #[error(
        "sha256 mismatch for {url}: expected {expected}, got {actual}; the file changed upstream \
         or was tampered with: check the source, then re-pin the release \
         only if the change is legitimate"
    )]
    DigestMismatch {
        /// Where the bytes came from.
        url: String,
        /// The pinned digest.
        expected: Sha256Digest,
        /// The digest of what was received.
        actual: Sha256Digest,
    },
    /// The download grew beyond the registry's `size`.
    #[error(
        "{url} is larger than the size cap of {cap} bytes (at least {seen} bytes); the registry \
         `size` is wrong or the URL serves something else: check the URL, then fix `size`"
    )]
    SizeCap {
        /// The URL.
        url: String,
        /// The cap.
        cap: u64,
        /// Bytes seen (or announced) so far.
        seen: u64,
    },
    /// A download with no pinned size grew beyond the cap for such downloads.
    #[error(
        "{url} is larger than the cap of {cap} bytes for downloads without a pinned size (at \
         least {seen} bytes); check the URL, and raise the cap only if the artifact really is \
         that large"
    )]
    UnpinnedCap {
        /// The URL.
        url: String,
        /// The cap.
        cap: u64,
        /// Bytes seen (or announced) so far.
        seen: u64,
    },
    /// A redirect was refused (it changed the scheme, or there were too many).
    #[error("{url}: a redirect was refused; use the final https URL directly")]
    Redirect {
        /// The URL asked for.
        url: String,
        /// The client's error, which carries the reason.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{url} answered HTTP {status}; check the URL or add a mirror to `urls`")]
    Http {
        /// The URL.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The request failed: no connection, a timeout, a TLS or protocol error.
    #[error("cannot download {url}; check the network and the URL")]
    Network {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The connection broke while the body arrived; the bytes kept are resumed by a retry.
    #[error("the download of {url} broke after {written} bytes; check the network")]
    Interrupted {
        /// The URL.
        url: String,
        /// Bytes on disk when it broke.
        written: u64,
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The body ended before the announced length.
    #[error("the body of {url} ended after {written} of {total} bytes; check the network")]
    Truncated {
        /// The URL.
        url: String,
        /// Bytes received.
        written: u64,
        /// Bytes announced.
        total: u64,
    },
    /// A resumed download got another byte range than the one asked for; the kept part is
    /// dropped.
    #[error(
        "{url} answered a resume from byte {asked} with another range; the kept part was \
         dropped, so the next attempt starts from zero"
    )]
    WrongRange {
        /// The URL.
        url: String,
        /// The first byte asked for.
        asked: u64,
    },
    /// The server says the kept part of a download does not fit its file (it changed, or is
    /// shorter); the kept part is dropped.
    #[error(
        "{url} cannot resume from byte {kept} (HTTP 416: the file changed or is shorter); the \
         kept part was dropped, so the next attempt starts from zero"
    )]
    StalePartial {
        /// The URL.
        url: String,
        /// Bytes kept.
        kept: u64,
    },
    /// The URL cannot be used.
    #[error("bad URL `{url}`: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A `file://` URL could not be read.
    #[error("cannot read {url} (check that the file exists and is readable)")]
    FileUrl {
        /// The URL.
        url: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The cache could not be written.
    #[error("cannot use the cache at {path} (check that the cache dir is writable and has space)")]
    Cache {
        /// The path in the cache.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The HTTP client could not be set up (its TLS back end, most likely).
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
}

impl Classify for FetchError {
    fn outcome(&self) -> Outcome {
        match self {
            FetchError::DigestMismatch { .. }
            | FetchError::SizeCap { .. }
            | FetchError::UnpinnedCap { .. } => Outcome::VerificationFailed,
            FetchError::Unpinned { .. } => Outcome::Refused,
            FetchError::NoUrls
            | FetchError::Redirect { .. }
            | FetchError::Http { .. }
            | FetchError::Network { .. }
            | FetchError::Interrupted { .. }
            | FetchError::Truncated { .. }
            | FetchError::WrongRange { .. }
            | FetchError::StalePartial { .. }
            | FetchError::BadUrl { .. }
            | FetchError::FileUrl { .. }
            | FetchError::Cache { .. }
            | FetchError::Client(_) => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            FetchError::Unpinned { release, .. } => Some(Remedy::PinRelease(release.clone())),
            FetchError::Cache { .. } => Some(Remedy::CacheDir),
            _ => None,
        }
    }
}

impl FetchError {
    /// Whether a retry of the same URL may succeed.
    fn is_transient(&self) -> bool {
        match self {
            FetchError::Network { .. }
            | FetchError::Interrupted { .. }
            | FetchError::Truncated { .. }
            | FetchError::WrongRange { .. }
            | FetchError::StalePartial { .. } => true,
            FetchError::Http { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// Downloads artifacts into a content-addressed cache.
#[derive(Debug, Clone)]
pub struct Fetcher {
    store: Store,
    transport: Transport,
    max_unpinned_bytes: u64,
}

impl Fetcher {
    /// A fetcher over the cache at `cache_dir` (created if missing).
    pub fn new(cache_dir: &Path, options: FetchOptions) -> Result<Fetcher, FetchError> {
        Ok(Fetcher {
            store: Store::open(cache_dir)?,
            transport: Transport::new(&options)?,
            max_unpinned_bytes: options.max_unpinned_bytes,
        })
    }

    /// Pinned artifact → its verified file in the content-addressed cache
    /// (`<cache>/artifacts/sha256/<hex>`). Mirrors are tried in order. Refuses an unpinned
    /// artifact with an error naming release, kind, arch and the pin command.
    pub fn fetch(
        &self,
        release: &Release,
        arch: Arch,
        artifact: &Artifact,
        progress: &dyn Progress,
    ) -> Result<Fetched, FetchError> {
        let expected = artifact.sha256.ok_or_else(|| FetchError::Unpinned {
            release: release.name.clone(),
            kind: artifact.kind,
            arch,
        })?;
        if artifact.urls.is_empty() {
            return Err(FetchError::NoUrls);
        }
        if let Some(found) = self.store.cached_matching(&expected, artifact.size) {
            return Ok(found);
        }
        let _lock = self.store.lock(&expected)?;
        // Someone else may have finished it while we waited for the lock.
        if let Some(found) = self.store.cached_matching(&expected, artifact.size) {
            return Ok(found);
        }
        let partial = self.store.partial(&expected);
        let mut mismatch = None;
        let mut last = None;
        for url in &artifact.urls {
            let resumed = fs::metadata(&partial).is_ok_and(|m| m.len() > 0);
            let mut result = self
                .transport
                .download(url, &partial, artifact.size, progress);
            progress.end();
            if resumed && matches!(&result, Ok((actual, _)) if *actual != expected) {
                // The kept partial file may be what is wrong (left by a crash or another
                // mirror): try this URL once more from byte zero before blaming it.
                tracing::info!("resumed download of {url} does not verify: restarting from zero");
                remove_quietly(&partial);
                result = self
                    .transport
                    .download(url, &partial, artifact.size, progress);
                progress.end();
            }
            match result {
                Ok((actual, size)) if actual == expected => {
                    let path = self.store.install(&partial, &expected)?;
                    return Ok(Fetched {
                        path,
                        sha256: expected,
                        size,
                    });
                }
                Ok((actual, _)) => {
                    remove_quietly(&partial);
                    let err = FetchError::DigestMismatch {
                        url: url.clone(),
                        expected,
                        actual,
                    };
                    tracing::warn!("{err}");
                    mismatch.get_or_insert(err);
                }
                Err(err) => {
                    tracing::warn!("{}", crate::error_chain(&err));
                    last = Some(err);
                }
            }
        }
        // A digest mismatch is the most important thing to tell, whatever other mirrors did.
        Err(mismatch.or(last).unwrap_or(FetchError::NoUrls))
    }

    /// Download with no expected digest (for `versions add` / `pin`): returns digest and size.
    /// The file is still stored under its true digest. `size_cap` aborts oversized downloads.
    pub fn fetch_unpinned(
        &self,
        urls: &[String],
        size_cap: Option<u64>,
        progress: &dyn Progress,
    ) -> Result<Fetched, FetchError> {
        let mut last = None;
        for url in urls {
            let temp = tempfile::Builder::new()
                .prefix("unpinned-")
                .tempfile_in(self.store.tmp())
                .map_err(|source| FetchError::Cache {
                    path: self.store.tmp().to_path_buf(),
                    source,
                })?
                .into_temp_path();
            let cap = size_cap.unwrap_or(self.max_unpinned_bytes);
            let result = self.transport.download(url, &temp, Some(cap), progress);
            // A fresh temporary file per call: its validator is never needed again.
            remove_one_quietly(&validator_path(&temp));
            let result = result.map_err(|e| match e {
                FetchError::SizeCap { url, cap, seen } if size_cap.is_none() => {
                    FetchError::UnpinnedCap { url, cap, seen }
                }
                other => other,
            });
            progress.end();
            match result {
                Ok((digest, size)) => {
                    let _lock = self.store.lock(&digest)?;
                    let path = match self.store.cached(&digest) {
                        Some(path) => path,
                        None => {
                            let path = self.store.install(&temp, &digest)?;
                            // Installed by rename: nothing left for the guard to delete.
                            let _ = temp.keep();
                            path
                        }
                    };
                    return Ok(Fetched {
                        path,
                        sha256: digest,
                        size,
                    });
                }
                Err(err) => {
                    tracing::warn!("{}", crate::error_chain(&err));
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or(FetchError::NoUrls))
    }

    /// Path where a digest would live in the cache, if that file is present. Files only get
    /// there by rename after verification, so presence means valid.
    pub fn cached(&self, sha256: &Sha256Digest) -> Option<PathBuf> {
        self.store.cached(sha256)
    }

    /// Re-hash a cached file (for `versions verify --cached`); `None` when it is not cached.
    pub fn rehash_cached(&self, sha256: &Sha256Digest) -> Result<Option<Fetched>, FetchError> {
        self.store.rehash(sha256)
    }
}
