//! `.deb` packages read with the tar reader's rules: the real headers package unpacks with its
//! absolute links kept inside the package root; a package without a data member, with a
//! compression we do not read, or with hostile entries is refused naming the package.

use std::fs;
use std::path::{Path, PathBuf};

use gpu_passthrough::archive::ArchiveError;
use gpu_passthrough::archive::deb::{extract_deb, is_deb};
use gpu_passthrough::archive::tar::Limits;
use gpu_passthrough_tests::fixtures;

/// An `ar` archive of `members` (name, bytes) written to `dir/name`.
fn deb(dir: &Path, name: &str, members: &[(&str, Vec<u8>)]) -> PathBuf {
    let mut ar = ar::Builder::new(Vec::new());
    for (member, bytes) in members {
        let header = ar::Header::new(member.as_bytes().to_vec(), bytes.len() as u64);
        ar.append(&header, bytes.as_slice()).unwrap();
    }
    let path = dir.join(name);
    fs::write(&path, ar.into_inner().unwrap()).unwrap();
    path
}

fn version() -> (&'static str, Vec<u8>) {
    ("debian-binary", b"2.0\n".to_vec())
}

#[test]
fn the_real_headers_package_unpacks_with_its_absolute_links_made_relative() {
    let package = fixtures::path("build-inputs/linux-headers-6.1.0-56-amd64_6.1.192-2_amd64.deb");
    assert!(is_deb(&package).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("root");
    let summary = extract_deb(&package, &dest, &Limits::default()).unwrap();
    assert!(summary.files > 100, "{summary:?}");
    let build = dest.join("lib/modules/6.1.0-56-amd64/build");
    assert_eq!(
        fs::read_link(&build).unwrap(),
        Path::new("../../../usr/src/linux-headers-6.1.0-56-amd64")
    );
    assert!(
        build.join(".config").is_file(),
        "the link resolves inside the package"
    );
    assert_eq!(
        fs::read_link(dest.join("usr/src/linux-headers-6.1.0-56-amd64/scripts")).unwrap(),
        Path::new("../../lib/linux-kbuild-6.1/scripts")
    );
}

#[test]
fn a_package_without_a_data_member_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = deb(
        dir.path(),
        "nodata.deb",
        &[version(), ("control.tar.gz", vec![1, 2, 3])],
    );
    let err = extract_deb(&p, &dir.path().join("out"), &Limits::default()).unwrap_err();
    assert!(matches!(err, ArchiveError::Deb { .. }), "{err}");
    assert!(err.to_string().contains("no data.tar member"), "{err}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn a_package_that_is_not_debian_or_uses_another_compression_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = deb(
        dir.path(),
        "nover.deb",
        &[("data.tar", fixtures::raw_tar(b"a", None))],
    );
    let err = extract_deb(&p, &dir.path().join("o1"), &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("debian-binary"), "{err}");

    let p = deb(
        dir.path(),
        "bz.deb",
        &[version(), ("data.tar.bz2", vec![0; 10])],
    );
    let err = extract_deb(&p, &dir.path().join("o2"), &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("data.tar.bz2"), "{err}");

    fs::write(dir.path().join("plain"), b"not an archive at all").unwrap();
    assert!(!is_deb(&dir.path().join("plain")).unwrap());
    let err = extract_deb(
        &dir.path().join("plain"),
        &dir.path().join("o3"),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::Deb { .. }), "{err}");
}

#[test]
fn a_hostile_data_member_is_refused_by_the_tar_rules() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path, link, needle) in [
        ("up.deb", &b"./usr/../../etc/passwd"[..], None, "`..`"),
        (
            "abs.deb",
            b"./lib/evil",
            Some(&b"/../../etc"[..]),
            "leaves the archive root",
        ),
        (
            "rel.deb",
            b"./lib/evil",
            Some(&b"../../etc"[..]),
            "leaves the archive root",
        ),
    ] {
        let p = deb(
            dir.path(),
            name,
            &[version(), ("data.tar", fixtures::raw_tar(path, link))],
        );
        let dest = dir.path().join(name).with_extension("out");
        let err = extract_deb(&p, &dest, &Limits::default()).unwrap_err();
        assert!(
            matches!(err, ArchiveError::UnsafeEntry { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(needle), "{name}: {err}");
        assert!(!dest.exists());
    }
    // Caps apply to the data member as to any tar.
    let p = deb(
        dir.path(),
        "big.deb",
        &[version(), ("data.tar", fixtures::raw_tar(b"a", None))],
    );
    let tiny = Limits {
        max_total_bytes: 16,
        ..Limits::default()
    };
    let err = extract_deb(&p, &dir.path().join("big.out"), &tiny).unwrap_err();
    assert!(matches!(err, ArchiveError::LimitExceeded { .. }), "{err}");
}
