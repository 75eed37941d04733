//! The fetcher against the loopback mirror: verification, resume, size cap, mirrors, retries,
//! and concurrent fetchers of one artifact (threads and processes).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gpu_passthrough::fetch::{FetchError, FetchOptions, Fetcher, NoProgress, Progress};
use gpu_passthrough::registry::{Arch, Artifact, ArtifactKind, Release, Sha256Digest};
use gpu_passthrough_tests::http::Mirror;

const PATH: &str = "/artifact.bin";

/// Deterministic, incompressible-looking bytes.
fn payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn options() -> FetchOptions {
    FetchOptions {
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        retries: 3,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..FetchOptions::default()
    }
}

fn release() -> Release {
    Release {
        name: "test-rel".into(),
        kernel_version: "6.1.0-56-amd64".into(),
        driver_version: None,
        module_flavor: None,
        gsp: true,
        vgpu: None,
        signer: None,
        module_sig_force: false,
        build: None,
        default: false,
        artifacts: BTreeMap::new(),
        source: "test".into(),
    }
}

fn artifact(urls: Vec<String>, sha256: Option<Sha256Digest>, size: Option<u64>) -> Artifact {
    Artifact {
        kind: ArtifactKind::Kernel,
        urls,
        sha256,
        size,
    }
}

fn store_entries(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache.join("artifacts/sha256"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn tmp_entries(cache: &Path) -> usize {
    fs::read_dir(cache.join("artifacts/tmp"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

#[derive(Default)]
struct Counting(AtomicU64);

impl Progress for Counting {
    fn advance(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::SeqCst);
    }
}

#[test]
fn pinned_fetch_lands_in_the_content_addressed_store_and_is_reused() {
    let body = payload(300_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(
        vec![mirror.url(PATH)],
        Some(digest),
        Some(body.len() as u64),
    );
    let progress = Counting::default();

    let got = fetcher
        .fetch(&release(), Arch::X86_64, &a, &progress)
        .unwrap();
    assert_eq!(
        got.path,
        cache.path().join("artifacts/sha256").join(digest.to_hex())
    );
    assert_eq!(got.sha256, digest);
    assert_eq!(got.size, body.len() as u64);
    assert_eq!(fs::read(&got.path).unwrap(), body);
    assert_eq!(progress.0.load(Ordering::SeqCst), body.len() as u64);
    assert_eq!(fetcher.cached(&digest), Some(got.path.clone()));

    let again = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
    assert_eq!(again, got);
    assert_eq!(
        mirror.hits(PATH),
        1,
        "a cached artifact is not downloaded again"
    );
    assert_eq!(tmp_entries(cache.path()), 0);
}

#[test]
fn unpinned_artifact_is_refused_naming_the_release_to_pin() {
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(vec!["http://127.0.0.1:9/never".into()], None, None);
    let err = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap_err();
    assert!(matches!(err, FetchError::Unpinned { .. }), "{err:?}");
    let msg = err.to_string();
    for needle in ["test-rel", "kernel", "x86_64", "pin release test-rel"] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
}

#[test]
fn tampered_bytes_are_rejected_and_nothing_is_cached() {
    let body = payload(100_000);
    let digest = Sha256Digest::of(&body);
    let mut tampered = body.clone();
    tampered[5000] ^= 1;
    let actual = Sha256Digest::of(&tampered);
    let mirror = Mirror::files([(PATH, tampered)]);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(vec![mirror.url(PATH)], Some(digest), None);

    let err = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err:?}");
    assert!(msg.contains(&mirror.url(PATH)), "{msg}");
    assert!(
        msg.contains(&digest.to_hex()) && msg.contains(&actual.to_hex()),
        "{msg}"
    );
    assert!(store_entries(cache.path()).is_empty());
    assert_eq!(tmp_entries(cache.path()), 0, "the temp file is deleted");
    assert_eq!(fetcher.cached(&digest), None);
}

#[test]
fn dropped_connection_resumes_with_a_range_request() {
    let body = payload(500_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    mirror.drop_after(PATH, 200_000, 1);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(
        vec![mirror.url(PATH)],
        Some(digest),
        Some(body.len() as u64),
    );

    let got = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), body);
    let log = mirror.requests();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].range, None);
    assert_eq!(log[1].range.as_deref(), Some("bytes=200000-"));
    assert_eq!(log[1].status, 206);
}

#[test]
fn server_without_ranges_restarts_from_zero() {
    let body = payload(400_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    mirror.set_ranges(false);
    mirror.drop_after(PATH, 100_000, 1);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(vec![mirror.url(PATH)], Some(digest), None);

    let got = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), body);
    let log = mirror.requests();
    assert_eq!(log.len(), 2);
    assert!(log[1].range.is_some(), "the fetcher asked to resume");
    assert_eq!(log[1].status, 200, "the server sent everything again");
}

#[test]
fn size_cap_aborts_an_oversized_download() {
    let body = payload(200_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body)]);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(vec![mirror.url(PATH)], Some(digest), Some(1000));

    let err = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap_err();
    assert!(
        matches!(err, FetchError::SizeCap { cap: 1000, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&mirror.url(PATH)));
    assert!(store_entries(cache.path()).is_empty());
    assert_eq!(tmp_entries(cache.path()), 0);

    // The unpinned path (versions add) honours a cap too.
    let err = fetcher
        .fetch_unpinned(&[mirror.url(PATH)], Some(1000), &NoProgress)
        .unwrap_err();
    assert!(matches!(err, FetchError::SizeCap { .. }), "{err:?}");
    assert!(store_entries(cache.path()).is_empty());
}

#[test]
fn mirrors_are_tried_in_order() {
    let body = payload(50_000);
    let digest = Sha256Digest::of(&body);
    let good = Mirror::files([(PATH, body.clone())]);
    let broken = Mirror::files([("/other", vec![1, 2, 3])]); // 404 for PATH
    let flaky = Mirror::files([(PATH, body.clone())]);
    flaky.fail_next(PATH, 100, 503);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let a = artifact(
        vec![broken.url(PATH), flaky.url(PATH), good.url(PATH)],
        Some(digest),
        None,
    );

    let got = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), body);
    assert_eq!(broken.hits(PATH), 1, "404 is not retried");
    assert_eq!(flaky.hits(PATH), 4, "503 is retried `retries` times");
    assert_eq!(good.hits(PATH), 1);
}

#[test]
fn transient_failures_are_retried_then_succeed() {
    let body = payload(10_000);
    let mirror = Mirror::files([(PATH, body.clone())]);
    mirror.fail_next(PATH, 2, 503);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let got = fetcher
        .fetch_unpinned(&[mirror.url(PATH)], None, &NoProgress)
        .unwrap();
    assert_eq!(got.sha256, Sha256Digest::of(&body));
    assert_eq!(mirror.hits(PATH), 3);
    assert_eq!(store_entries(cache.path()), vec![got.sha256.to_hex()]);
}

#[test]
fn all_mirrors_failing_reports_the_last_error() {
    let mirror = Mirror::files([("/x", vec![0])]);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let err = fetcher
        .fetch_unpinned(&[mirror.url("/missing")], None, &NoProgress)
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Http { status: 404, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("/missing"));
    assert_eq!(tmp_entries(cache.path()), 0);
}

#[test]
fn file_urls_are_read_locally_with_the_same_checks() {
    let dir = tempfile::tempdir().unwrap();
    let body = payload(20_000);
    let file = dir.path().join("k.bin");
    fs::write(&file, &body).unwrap();
    let url = format!("file://{}", file.display());
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();

    let good = artifact(vec![url.clone()], Some(Sha256Digest::of(&body)), None);
    let got = fetcher
        .fetch(&release(), Arch::X86_64, &good, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), body);

    let wrong = Sha256Digest::of(b"something else");
    let bad = artifact(vec![url.clone()], Some(wrong), None);
    let err = fetcher
        .fetch(&release(), Arch::X86_64, &bad, &NoProgress)
        .unwrap_err();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err:?}");
    assert_eq!(fetcher.cached(&wrong), None);

    let missing = artifact(
        vec![format!("file://{}/nope", dir.path().display())],
        Some(wrong),
        None,
    );
    let err = fetcher
        .fetch(&release(), Arch::X86_64, &missing, &NoProgress)
        .unwrap_err();
    assert!(matches!(err, FetchError::FileUrl { .. }), "{err:?}");
}

#[test]
fn eight_threads_fetching_one_artifact_leave_one_valid_file() {
    let body = payload(2_000_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let a = artifact(
        vec![mirror.url(PATH)],
        Some(digest),
        Some(body.len() as u64),
    );
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
                    fetcher
                        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
                        .unwrap()
                        .path
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fs::read(&paths[0]).unwrap(), body);
    assert_eq!(store_entries(cache.path()), vec![digest.to_hex()]);
    assert_eq!(tmp_entries(cache.path()), 0);
    assert_eq!(
        mirror.hits(PATH),
        1,
        "the lock makes later fetchers reuse the first download"
    );
}

const CHILD_ENV: &str = "GPU_PASSTHROUGH_TEST_FETCH_CHILD";

/// Run by `four_processes_fetching_one_artifact_leave_one_valid_file` in child processes; it
/// asserts nothing on its own, so it is ignored in normal runs.
#[test]
#[ignore = "helper: run as a child process by four_processes_fetching_one_artifact_leave_one_valid_file"]
fn fetch_child_process() {
    let spec = std::env::var(CHILD_ENV).expect("run by the parent test");
    let mut parts = spec.splitn(3, ' ');
    let (cache, digest, url) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let fetcher = Fetcher::new(Path::new(cache), options()).unwrap();
    let a = artifact(vec![url.to_string()], Some(digest.parse().unwrap()), None);
    fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
}

#[test]
fn four_processes_fetching_one_artifact_leave_one_valid_file() {
    let body = payload(3_000_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "fetch_child_process",
                    "--ignored",
                    "--test-threads=1",
                ])
                .env(
                    CHILD_ENV,
                    format!("{} {} {}", cache.path().display(), digest, mirror.url(PATH)),
                )
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a child fetch failed");
    }
    let path = cache.path().join("artifacts/sha256").join(digest.to_hex());
    assert_eq!(fs::read(&path).unwrap(), body);
    assert_eq!(store_entries(cache.path()), vec![digest.to_hex()]);
    assert_eq!(tmp_entries(cache.path()), 0);
    assert_eq!(mirror.hits(PATH), 1);
}

#[test]
fn a_corrupt_partial_file_is_discarded_and_the_download_restarted() {
    let body = payload(120_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    // What a crash mid-download from a bad mirror would leave behind.
    let partial = cache
        .path()
        .join("artifacts/tmp")
        .join(format!("{digest}.partial"));
    fs::write(&partial, vec![0u8; 50_000]).unwrap();
    let a = artifact(vec![mirror.url(PATH)], Some(digest), None);

    let got = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&got.path).unwrap(), body);
    // Nothing recorded which version of the file those bytes came from (no validator), so
    // they are not resumed from at all: one request, from zero.
    let log = mirror.requests();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].range, None, "resumed bytes nothing can vouch for");
    assert_eq!(tmp_entries(cache.path()), 0);
}

#[test]
fn a_stalled_server_trips_the_read_timeout_and_the_retry_resumes() {
    let body = payload(300_000);
    let digest = Sha256Digest::of(&body);
    let mirror = Mirror::files([(PATH, body.clone())]);
    mirror.stall_after(PATH, 100_000, 1, Duration::from_secs(3));
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(
        cache.path(),
        FetchOptions {
            timeout: Duration::from_millis(400),
            ..options()
        },
    )
    .unwrap();
    let a = artifact(vec![mirror.url(PATH)], Some(digest), None);
    let started = std::time::Instant::now();
    let got = fetcher
        .fetch(&release(), Arch::X86_64, &a, &NoProgress)
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the read timeout, not the server, ended the stalled attempt ({:?})",
        started.elapsed()
    );
    assert_eq!(fs::read(&got.path).unwrap(), body);
    let log = mirror.requests();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1].status, 206);
}

/// Swaps the mirror's content for `path` once the client has received `after` bytes.
struct SwapAfter<'a> {
    mirror: &'a Mirror,
    after: u64,
    seen: std::sync::atomic::AtomicU64,
    new: Vec<u8>,
}

impl Progress for SwapAfter<'_> {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, bytes: u64) {
        use std::sync::atomic::Ordering;
        let before = self.seen.fetch_add(bytes, Ordering::SeqCst);
        if before < self.after && before + bytes >= self.after {
            self.mirror.serve_instead(PATH, self.new.clone());
        }
    }
    fn end(&self) {}
}

#[test]
fn resume_names_its_validator_and_a_file_changed_upstream_is_not_spliced() {
    // The first answer breaks after 200 kB and the file then changes
    // upstream: the resume must carry If-Range, so the server sends the whole new file
    // instead of its tail being appended to the old file's head.
    let old = payload(500_000);
    let new: Vec<u8> = old.iter().map(|b| b.wrapping_add(1)).collect();
    let mirror = Mirror::files([(PATH, old)]);
    mirror.drop_after(PATH, 200_000, 1);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let swap = SwapAfter {
        mirror: &mirror,
        after: 200_000,
        seen: Default::default(),
        new: new.clone(),
    };
    let got = fetcher
        .fetch_unpinned(&[mirror.url(PATH)], None, &swap)
        .unwrap();
    let log = mirror.requests();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[1].if_range.is_some(),
        "resumed without a validator: {log:?}"
    );
    assert_eq!(log[1].status, 200, "{log:?}");
    assert_eq!(got.sha256, Sha256Digest::of(&new));
    assert_eq!(fs::read(&got.path).unwrap(), new);
}

#[test]
fn without_a_validator_a_broken_download_starts_over() {
    let body = payload(300_000);
    let mirror = Mirror::files([(PATH, body.clone())]);
    mirror.set_validators(false);
    mirror.drop_after(PATH, 100_000, 1);
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let got = fetcher
        .fetch_unpinned(&[mirror.url(PATH)], None, &NoProgress)
        .unwrap();
    let log = mirror.requests();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(
        log[1].range, None,
        "resumed with nothing to validate: {log:?}"
    );
    assert_eq!(fs::read(&got.path).unwrap(), body);
}

#[test]
fn a_redirect_that_changes_the_scheme_is_refused() {
    let mirror = Mirror::files([(PATH, payload(1000))]);
    mirror.redirect("/moved", "ftp://127.0.0.1/elsewhere");
    let cache = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(cache.path(), options()).unwrap();
    let err = fetcher
        .fetch_unpinned(&[mirror.url("/moved")], None, &NoProgress)
        .unwrap_err();
    assert!(matches!(err, FetchError::Redirect { .. }), "{err:?}");
    let chain = gpu_passthrough::error_chain(&err);
    assert!(chain.contains("changes the scheme"), "{chain}");
    assert_eq!(
        mirror.hits("/moved"),
        1,
        "a refused redirect is not retried"
    );

    // Same scheme: followed.
    mirror.redirect("/same", &mirror.url(PATH));
    let got = fetcher
        .fetch_unpinned(&[mirror.url("/same")], None, &NoProgress)
        .unwrap();
    assert_eq!(got.size, 1000);
}
