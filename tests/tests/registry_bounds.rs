//! Registry and `versions add` inputs that would make the builder walk the host or download
//! without bound.

use gpu_passthrough::outcome::{Classify, Outcome};
use std::collections::BTreeMap;
use std::time::Duration;

use gpu_passthrough::fetch::{FetchError, FetchOptions, Fetcher, NoProgress};
use gpu_passthrough::registry::{Arch, ArtifactKind, Registry, RegistryError};
use gpu_passthrough::versions::{self, AddRequest, VersionsError};
use gpu_passthrough_tests::http::Mirror;

fn release_with(kernel: &str, driver: &str) -> String {
    format!(
        "[releases.r]\nkernel_version = \"{kernel}\"\ndriver_version = \"{driver}\"\n\
         [[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://example.invalid/k\"\n"
    )
}

#[test]
fn version_strings_that_are_paths_are_refused_by_the_parser() {
    for (kernel, driver, field) in [
        ("/", "535.261.03", "kernel_version"),
        ("..", "535.261.03", "kernel_version"),
        ("6.1.0/../../etc", "535.261.03", "kernel_version"),
        ("6.1.0-56-amd64", "535/../x", "driver_version"),
        ("6.1.0-56-amd64", ".", "driver_version"),
    ] {
        let err = Registry::parse(&release_with(kernel, driver), "v.toml").unwrap_err();
        match &err {
            RegistryError::Invalid { field: f, .. } => assert_eq!(f, field, "{err}"),
            other => panic!("{kernel}/{driver}: expected Invalid, got {other:?}"),
        }
    }
    Registry::parse(&release_with("6.1.0-56-amd64", "535.261.03"), "v.toml").unwrap();
}

#[test]
fn a_sha256_without_a_size_is_refused() {
    let text = "[releases.r]\nkernel_version = \"6.1.0-56-amd64\"\n\
        [[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://example.invalid/k\"\n\
        sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";
    let err = Registry::parse(text, "pin.toml").unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, RegistryError::Invalid { field, .. } if field.ends_with(".size")),
        "{message}"
    );
    assert!(message.contains("size"), "{message}");
}

fn options() -> FetchOptions {
    FetchOptions {
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        retries: 0,
        backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..FetchOptions::default()
    }
}

fn request(file: std::path::PathBuf, kernel: &str, url: String) -> AddRequest {
    AddRequest {
        file,
        release: "r".into(),
        kernel_version: kernel.into(),
        driver_version: None,
        flavor: None,
        gsp: true,
        arch: Arch::X86_64,
        artifacts: BTreeMap::from([(ArtifactKind::Kernel, vec![url])]),
        default: false,
        replace: false,
        max_download_bytes: None,
        signer: None,
        module_sig_force: false,
    }
}

#[test]
fn versions_add_refuses_a_path_as_kernel_version_before_downloading() {
    let mirror = Mirror::files([("/k", vec![1u8; 10])]);
    let tmp = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(&tmp.path().join("cache"), options()).unwrap();
    let file = tmp.path().join("reg.toml");
    let err = versions::add(
        &fetcher,
        &request(file.clone(), "/", mirror.url("/k")),
        &NoProgress,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            VersionsError::BadVersion {
                field: "kernel_version",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(mirror.hits("/k"), 0, "downloaded before refusing");
    assert!(!file.exists());
}

#[test]
fn unpinned_downloads_have_a_default_cap_and_it_can_be_overridden() {
    let body = vec![7u8; 64 << 10];
    let mirror = Mirror::files([("/k", body)]);
    let tmp = tempfile::tempdir().unwrap();
    let small = FetchOptions {
        max_unpinned_bytes: 16 << 10,
        ..options()
    };
    let fetcher = Fetcher::new(&tmp.path().join("cache"), small).unwrap();
    let file = tmp.path().join("reg.toml");
    let err = versions::add(
        &fetcher,
        &request(file.clone(), "6.1.0-56-amd64", mirror.url("/k")),
        &NoProgress,
    )
    .unwrap_err();
    match &err {
        VersionsError::Fetch {
            source: FetchError::UnpinnedCap { cap, .. },
            ..
        } => assert_eq!(*cap, 16 << 10),
        other => panic!("expected UnpinnedCap, got {other:?}"),
    }
    assert!(err.outcome() == Outcome::VerificationFailed);
    assert!(!file.exists());

    let mut raised = request(file.clone(), "6.1.0-56-amd64", mirror.url("/k"));
    raised.max_download_bytes = Some(1 << 20);
    let report = versions::add(&fetcher, &raised, &NoProgress).unwrap();
    assert_eq!(
        report.release.artifacts[&Arch::X86_64][0].size,
        Some(64 << 10)
    );
}
