//! Getting the bytes of one URL into one file: http(s) through a blocking reqwest client
//! (rustls) with connect and read timeouts, bounded retries with exponential backoff, resume
//! with `Range`/`If-Range`, and redirects that never change the scheme; `file://` read locally
//! with the same checks.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use sha2::{Digest, Sha256};

use super::cache::{Limit, copy_hashing, remove_one_quietly, remove_quietly, validator_path};
use super::{FetchError, FetchOptions, Progress};
use crate::registry::Sha256Digest;

/// The HTTP client and the retry policy.
#[derive(Debug, Clone)]
pub(super) struct Transport {
    client: reqwest::blocking::Client,
    options: FetchOptions,
}

impl Transport {
    /// A client with `options`' timeouts and the redirect policy.
    pub(super) fn new(options: &FetchOptions) -> Result<Transport, FetchError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            .user_agent(concat!("gpu-passthrough/", env!("CARGO_PKG_VERSION")))
            .redirect(redirect_policy())
            .build()
            .map_err(FetchError::Client)?;
        Ok(Transport {
            client,
            options: options.clone(),
        })
    }

    /// Download `url` into `dest` (resuming what `dest` already holds when the server allows),
    /// retrying transient failures. Returns the digest and size of the complete file.
    pub(super) fn download(
        &self,
        url: &str,
        dest: &Path,
        cap: Option<u64>,
        progress: &dyn Progress,
    ) -> Result<(Sha256Digest, u64), FetchError> {
        if url.starts_with("file://") {
            return copy_local(url, dest, cap, progress);
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
                        "{}; retry {attempt} of {} in {wait:?}",
                        crate::error_chain(&err),
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
        let mut response = request.send().map_err(|source| {
            let url = url.to_string();
            if source.is_redirect() {
                FetchError::Redirect { url, source }
            } else {
                FetchError::Network { url, source }
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
                return Err(FetchError::WrongRange {
                    url: url.to_string(),
                    asked: have,
                });
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
            return Err(FetchError::StalePartial {
                url: url.to_string(),
                kept: have,
            });
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
        let read_failed = |source: io::Error, written: u64, file: &File| {
            // Keep what arrived: the retry resumes from it.
            let _ = file.sync_all();
            FetchError::Interrupted {
                url: url.to_string(),
                written,
                source,
            }
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
            return Err(FetchError::Truncated {
                url: url.to_string(),
                written,
                total,
            });
        }
        Ok((hasher.finalize().into(), written))
    }
}

/// A `file://` URL: the same size cap and hashing as a download, no retries.
fn copy_local(
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
