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
//! http(s) URLs go through a blocking reqwest client (rustls) with connect and read timeouts and
//! bounded retries with exponential backoff; `file://` URLs are read locally with the same checks.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::Flock;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use sha2::{Digest, Sha256};

use crate::registry::{Arch, Artifact, ArtifactKind, Release, Sha256Digest};

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
    #[error("{url}: {reason}; use the final https URL directly")]
    Redirect {
        /// The URL asked for.
        url: String,
        /// Why the redirect was refused.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{url} answered HTTP {status}; check the URL or add a mirror to `urls`")]
    Http {
        /// The URL.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The connection failed or broke.
    #[error("cannot download {url}: {message}; check the network and the URL")]
    Network {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
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
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
}

impl FetchError {
    fn is_transient(&self) -> bool {
        match self {
            FetchError::Network { .. } => true,
            FetchError::Http { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }
}

/// Downloads artifacts into a content-addressed cache.
#[derive(Debug, Clone)]
pub struct Fetcher {
    store: PathBuf,
    tmp: PathBuf,
    locks: PathBuf,
    options: FetchOptions,
    client: reqwest::blocking::Client,
}

impl Fetcher {
    /// A fetcher over the cache at `cache_dir` (created if missing).
    pub fn new(cache_dir: &Path, options: FetchOptions) -> Result<Fetcher, FetchError> {
        let base = cache_dir.join("artifacts");
        let store = base.join("sha256");
        let tmp = base.join("tmp");
        let locks = base.join("locks");
        for dir in [&store, &tmp, &locks] {
            fs::create_dir_all(dir).map_err(|source| FetchError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .user_agent(concat!("gpu-passthrough/", env!("CARGO_PKG_VERSION")))
            .redirect(redirect_policy())
            .build()
            .map_err(|e| FetchError::Client(e.to_string()))?;
        Ok(Fetcher {
            store,
            tmp,
            locks,
            options,
            client,
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
        if let Some(found) = self.cached_matching(&expected, artifact.size) {
            return Ok(found);
        }
        let _lock = self.lock(&expected)?;
        // Someone else may have finished it while we waited for the lock.
        if let Some(found) = self.cached_matching(&expected, artifact.size) {
            return Ok(found);
        }
        let partial = self.tmp.join(format!("{expected}.partial"));
        let mut mismatch = None;
        let mut last = None;
        for url in &artifact.urls {
            let resumed = fs::metadata(&partial).is_ok_and(|m| m.len() > 0);
            let mut result = self.download(url, &partial, artifact.size, progress);
            progress.end();
            if resumed && matches!(&result, Ok((actual, _)) if *actual != expected) {
                // The kept partial file may be what is wrong (left by a crash or another
                // mirror): try this URL once more from byte zero before blaming it.
                tracing::info!("resumed download of {url} does not verify: restarting from zero");
                remove_quietly(&partial);
                result = self.download(url, &partial, artifact.size, progress);
                progress.end();
            }
            match result {
                Ok((actual, size)) if actual == expected => {
                    let path = self.install(&partial, &expected)?;
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
                    tracing::warn!("{err}");
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
                .tempfile_in(&self.tmp)
                .map_err(|source| FetchError::Cache {
                    path: self.tmp.clone(),
                    source,
                })?
                .into_temp_path();
            let cap = size_cap.unwrap_or(self.options.max_unpinned_bytes);
            let result = self.download(url, &temp, Some(cap), progress);
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
                    let _lock = self.lock(&digest)?;
                    let path = match self.cached(&digest) {
                        Some(path) => path,
                        None => {
                            let path = self.install(&temp, &digest)?;
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
                    tracing::warn!("{err}");
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or(FetchError::NoUrls))
    }

    /// Path where a digest would live in the cache, if that file is present. Files only get
    /// there by rename after verification, so presence means valid.
    pub fn cached(&self, sha256: &Sha256Digest) -> Option<PathBuf> {
        let path = self.store.join(sha256.to_hex());
        fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .map(|_| path)
    }

    /// Re-hash a cached file (for `versions verify --cached`); `None` when it is not cached.
    pub fn rehash_cached(&self, sha256: &Sha256Digest) -> Result<Option<Fetched>, FetchError> {
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

    fn cached_matching(&self, sha256: &Sha256Digest, size: Option<u64>) -> Option<Fetched> {
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

    fn lock(&self, sha256: &Sha256Digest) -> Result<Flock<File>, FetchError> {
        let path = self.locks.join(format!("{sha256}.lock"));
        crate::fsutil::lock_exclusive(&path).map_err(|source| FetchError::Cache { path, source })
    }

    fn install(&self, temp: &Path, sha256: &Sha256Digest) -> Result<PathBuf, FetchError> {
        remove_one_quietly(&validator_path(temp));
        let path = self.store.join(sha256.to_hex());
        crate::fsutil::rename_durable(temp, &path).map_err(|source| FetchError::Cache {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Download `url` into `dest` (resuming what `dest` already holds when the server allows),
    /// retrying transient failures. Returns the digest and size of the complete file.
    fn download(
        &self,
        url: &str,
        dest: &Path,
        cap: Option<u64>,
        progress: &dyn Progress,
    ) -> Result<(Sha256Digest, u64), FetchError> {
        if url.starts_with("file://") {
            return self.copy_local(url, dest, cap, progress);
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(FetchError::BadUrl {
                url: url.to_string(),
                reason: "only https://, http:// and file:// URLs are supported".into(),
            });
        }
        let mut attempt = 0;
        loop {
            match self.http_attempt(url, dest, cap, progress) {
                Ok(done) => return Ok(done),
                Err(err) if err.is_transient() && attempt < self.options.retries => {
                    let wait = self
                        .options
                        .backoff
                        .saturating_mul(1u32 << attempt.min(16))
                        .min(self.options.max_backoff);
                    attempt += 1;
                    tracing::info!(
                        "{err}; retry {attempt} of {} in {wait:?}",
                        self.options.retries
                    );
                    std::thread::sleep(wait);
                }
                Err(err) => return Err(err),
            }
        }
    }

    fn http_attempt(
        &self,
        url: &str,
        dest: &Path,
        cap: Option<u64>,
        progress: &dyn Progress,
    ) -> Result<(Sha256Digest, u64), FetchError> {
        let network = |message: String| FetchError::Network {
            url: url.to_string(),
            message,
        };
        let cache_err = |source| FetchError::Cache {
            path: dest.to_path_buf(),
            source,
        };
        let mut have = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        // Resume only when the server can tell us the bytes kept are still its bytes: with
        // `If-Range` it sends the rest if the validator matches, and the whole new file if not.
        let validator = fs::read_to_string(validator_path(dest)).ok();
        if have > 0 && validator.is_none() {
            tracing::debug!("no validator for the kept part of {url}: starting over");
            remove_quietly(dest);
            have = 0;
        }
        let mut request = self.client.get(url);
        if have > 0
            && let Some(validator) = &validator
        {
            request = request
                .header(RANGE, format!("bytes={have}-"))
                .header(IF_RANGE, validator.as_str());
        }
        let mut response = request.send().map_err(|e| {
            if e.is_redirect() {
                FetchError::Redirect {
                    url: url.to_string(),
                    reason: crate::error_chain(&e),
                }
            } else {
                network(crate::error_chain(&e))
            }
        })?;
        let status = response.status();
        let (mut file, mut hasher, start) = if status == StatusCode::PARTIAL_CONTENT && have > 0 {
            let expected_range = format!("bytes {have}-");
            let range_ok = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&expected_range));
            if !range_ok {
                remove_quietly(dest);
                return Err(network(
                    "the server sent a range other than the one asked for".into(),
                ));
            }
            let mut hasher = Sha256::new();
            let mut kept = File::open(dest).map_err(cache_err)?;
            io::copy(&mut kept, &mut hasher).map_err(cache_err)?;
            let file = OpenOptions::new()
                .append(true)
                .open(dest)
                .map_err(cache_err)?;
            tracing::debug!("resuming {url} at byte {have}");
            (file, hasher, have)
        } else if status == StatusCode::OK {
            // A full answer (also to a range request): start over, remembering what names
            // this version of the file for a later resume.
            let file = File::create(dest).map_err(cache_err)?;
            match response_validator(&response) {
                Some(v) => fs::write(validator_path(dest), v).map_err(cache_err)?,
                None => remove_one_quietly(&validator_path(dest)),
            }
            (file, Sha256::new(), 0)
        } else if status == StatusCode::RANGE_NOT_SATISFIABLE {
            remove_quietly(dest);
            return Err(network(
                "the kept partial download does not fit the file: restarting".into(),
            ));
        } else {
            return Err(FetchError::Http {
                url: url.to_string(),
                status: status.as_u16(),
            });
        };
        let total = response.content_length().map(|len| len + start);
        if let (Some(cap), Some(total)) = (cap, total)
            && total > cap
        {
            remove_quietly(dest);
            return Err(FetchError::SizeCap {
                url: url.to_string(),
                cap,
                seen: total,
            });
        }
        progress.begin(url, total);
        progress.advance(start);
        let read_failed = |e: io::Error, written: u64, file: &File| {
            // Keep what arrived: the retry resumes from it.
            let _ = file.sync_all();
            network(format!("connection broke after {written} bytes: {e}"))
        };
        let written = copy_hashing(
            &mut response,
            &mut file,
            &mut hasher,
            start,
            Limit { cap, url, dest },
            progress,
            read_failed,
        )?;
        file.sync_all().map_err(cache_err)?;
        if let Some(total) = total
            && written != total
        {
            return Err(network(format!(
                "the body ended after {written} of {total} bytes"
            )));
        }
        Ok((hasher.finalize().into(), written))
    }

    fn copy_local(
        &self,
        url: &str,
        dest: &Path,
        cap: Option<u64>,
        progress: &dyn Progress,
    ) -> Result<(Sha256Digest, u64), FetchError> {
        let path = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| FetchError::BadUrl {
                url: url.to_string(),
                reason: "not an absolute file:// path".into(),
            })?;
        let file_err = |source| FetchError::FileUrl {
            url: url.to_string(),
            source,
        };
        let mut src = File::open(&path).map_err(file_err)?;
        let total = src.metadata().map_err(file_err)?.len();
        if let Some(cap) = cap
            && total > cap
        {
            return Err(FetchError::SizeCap {
                url: url.to_string(),
                cap,
                seen: total,
            });
        }
        let cache_err = |source| FetchError::Cache {
            path: dest.to_path_buf(),
            source,
        };
        let mut out = File::create(dest).map_err(cache_err)?;
        progress.begin(url, Some(total));
        let mut hasher = Sha256::new();
        let written = copy_hashing(
            &mut src,
            &mut out,
            &mut hasher,
            0,
            Limit { cap, url, dest },
            progress,
            |e, _, _| file_err(e),
        )?;
        out.sync_all().map_err(cache_err)?;
        Ok((hasher.finalize().into(), written))
    }
}

/// Where a copy goes and how large it may grow.
struct Limit<'a> {
    cap: Option<u64>,
    url: &'a str,
    dest: &'a Path,
}

/// Copy `src` to the end into `out` (which already holds `written` bytes, hashed into
/// `hasher`), hashing and reporting progress; past the size cap the partial file is removed.
/// A read error becomes `read_failed(error, bytes written so far, out)`.
fn copy_hashing(
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
fn validator_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".validator");
    PathBuf::from(name)
}

/// A strong `ETag`, else `Last-Modified`: what `If-Range` may carry (weak tags may not).
fn response_validator(response: &reqwest::blocking::Response) -> Option<String> {
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    header(ETAG)
        .filter(|tag| !tag.starts_with("W/"))
        .or_else(|| header(LAST_MODIFIED))
}

/// Follow at most 10 redirects, never to another scheme: an https download must not continue
/// over http, where anyone on the path could substitute the bytes of an unpinned artifact.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let from = attempt.previous().first().map(|u| u.scheme().to_string());
        match redirect_refusal(
            from.as_deref(),
            attempt.url().scheme(),
            attempt.previous().len(),
        ) {
            Some(message) => attempt.error(message),
            None => attempt.follow(),
        }
    })
}

/// Why a redirect to `to` is refused, after `hops` redirects from a URL of scheme `from`.
fn redirect_refusal(from: Option<&str>, to: &str, hops: usize) -> Option<String> {
    if hops > 10 {
        return Some("more than 10 redirects".into());
    }
    from.filter(|s| *s != to)
        .map(|from| format!("redirect from {from} to {to} changes the scheme"))
}

/// Remove a (partial) download and the validator kept beside it.
fn remove_quietly(path: &Path) {
    remove_one_quietly(&validator_path(path));
    remove_one_quietly(path);
}

fn remove_one_quietly(path: &Path) {
    if let Err(e) = fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::redirect_refusal;

    #[test]
    fn https_to_http_redirects_are_refused() {
        // The loopback mirror speaks http only, so the downgrade itself is checked here.
        let why = redirect_refusal(Some("https"), "http", 1).expect("a downgrade is refused");
        assert!(why.contains("https to http"), "{why}");
        assert!(redirect_refusal(Some("http"), "https", 1).is_some());
        assert_eq!(redirect_refusal(Some("https"), "https", 3), None);
        assert!(redirect_refusal(Some("https"), "https", 11).is_some());
    }
}
