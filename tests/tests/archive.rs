//! Safe tar reading: hostile archives are refused with a message naming the entry and the fix,
//! extraction is all-or-nothing, compression is recognised by magic bytes.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use gpu_passthrough::archive::ArchiveError;
use gpu_passthrough::archive::decompress::Compression;
use gpu_passthrough::archive::tar::{
    EntryKind, Limits, TarEntry, extract_tar, walk_tar, walk_tar_stream,
};
use proptest::prelude::*;
use tar::{EntryType, Header};

/// An archive under construction, with raw headers so that hostile entries can be written
/// (the tar crate's own `set_path` refuses `..` and absolute paths).
struct RawTar {
    builder: tar::Builder<Vec<u8>>,
}

impl RawTar {
    fn new() -> Self {
        RawTar {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn entry(
        &mut self,
        path: &[u8],
        kind: EntryType,
        link: Option<&[u8]>,
        data: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = Header::new_gnu();
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..path.len()].copy_from_slice(path);
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(path.as_bytes(), EntryType::Regular, None, data, 0o644)
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.entry(path.as_bytes(), EntryType::Directory, None, b"", 0o755)
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            path.as_bytes(),
            EntryType::Symlink,
            Some(target.as_bytes()),
            b"",
            0o777,
        )
    }

    fn pax_path(&mut self, path: &str, data: &[u8]) -> &mut Self {
        let record = pax_record("path", path);
        let mut h = Header::new_ustar();
        h.set_path("PaxHeaders/x").unwrap();
        h.set_entry_type(EntryType::XHeader);
        h.set_size(record.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.builder.append(&h, record.as_bytes()).unwrap();
        self.file("placeholder-name", data)
    }

    fn bytes(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }

    fn write(self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, self.bytes()).unwrap();
        path
    }
}

/// One PAX record: `<len> <key>=<value>\n`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

fn walk_all(archive: &Path, limits: &Limits) -> Result<Vec<(TarEntry, Vec<u8>)>, ArchiveError> {
    let mut seen = Vec::new();
    walk_tar(archive, limits, &mut |entry, contents| {
        let mut data = Vec::new();
        contents.read_to_end(&mut data).unwrap();
        seen.push((entry.clone(), data));
        Ok(())
    })?;
    Ok(seen)
}

/// Assert that both walking and extracting refuse the archive with a message containing
/// `needle`, and that extraction leaves no destination behind.
fn assert_refused(tar: RawTar, needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tar.write(tmp.path(), "hostile.tar");
    let walked = walk_all(&archive, &Limits::default());
    let message = walked.expect_err("walk must refuse").to_string();
    assert!(message.contains(needle), "`{message}` lacks `{needle}`");
    assert!(
        message.contains("hostile.tar"),
        "`{message}` does not name the archive"
    );

    let dest = tmp.path().join("out");
    let err = extract_tar(&archive, &dest, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains(needle), "{err}");
    assert!(!dest.exists(), "extract left {dest:?} behind");
    let leftovers: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("hostile.tar")],
        "staging dir left behind"
    );
    assert!(!tmp.path().parent().unwrap().join("passwd").exists());
}

#[test]
fn refuses_parent_components() {
    let mut t = RawTar::new();
    t.file("ok", b"x").file("a/../../evil", b"x");
    assert_refused(t, "`..`");
}

#[test]
fn refuses_absolute_paths() {
    let mut t = RawTar::new();
    t.file("/etc/passwd", b"root::0:0::/:/bin/sh\n");
    assert_refused(t, "absolute");
}

#[test]
fn refuses_symlink_escaping_the_root() {
    let mut t = RawTar::new();
    t.dir("a").symlink("a/up", "../../etc");
    assert_refused(t, "leaves the archive root");
}

#[test]
fn refuses_absolute_symlink_targets() {
    let mut t = RawTar::new();
    t.symlink("passwd", "/etc/passwd");
    assert_refused(t, "is absolute");
}

#[test]
fn refuses_entries_through_a_symlink() {
    // The classic: a symlink to the outside world, then a file written "into" it. Here the link
    // itself stays inside, so only the pass-through rule stops the write.
    let mut t = RawTar::new();
    t.dir("real")
        .symlink("link", "real")
        .file("link/file", b"x");
    assert_refused(t, "passes through the symlink `link`");
}

#[test]
fn refuses_symlink_chains_that_escape_through_another_symlink() {
    // Lexically a/b/t -> s/../x stays inside, but a/b/s is the root itself, so s/.. is outside.
    let mut t = RawTar::new();
    t.dir("a")
        .dir("a/b")
        .symlink("a/b/s", "../..")
        .symlink("a/b/t", "s/../x");
    assert_refused(t, "passes through another symlink");
}

#[test]
fn refuses_hard_links() {
    let mut t = RawTar::new();
    t.file("f", b"x")
        .entry(b"g", EntryType::Link, Some(b"f"), b"", 0o644);
    assert_refused(t, "hard link");
}

#[test]
fn refuses_device_nodes_and_fifos() {
    for (kind, needle) in [
        (EntryType::Char, "device node"),
        (EntryType::Block, "device node"),
        (EntryType::Fifo, "fifo"),
    ] {
        let mut t = RawTar::new();
        t.entry(b"dev/thing", kind, None, b"", 0o600);
        assert_refused(t, needle);
    }
}

#[test]
fn refuses_duplicate_paths_and_files_under_files() {
    let mut t = RawTar::new();
    t.file("f", b"1").file("f", b"2");
    assert_refused(t, "twice");

    let mut t = RawTar::new();
    t.file("f", b"1").file("f/g", b"2");
    assert_refused(t, "is a regular file");
}

#[test]
fn refusal_message_names_the_entry_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = RawTar::new();
    t.file("x/../../escape.txt", b"x");
    let archive = t.write(tmp.path(), "artifact.tar");
    let err = walk_all(&archive, &Limits::default()).unwrap_err();
    match &err {
        ArchiveError::UnsafeEntry { entry, fix, .. } => {
            assert_eq!(entry, "x/../../escape.txt");
            assert!(fix.starts_with("re-pack the artifact"), "{fix}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn limits_count_entries_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = RawTar::new();
    t.file("a", &[1u8; 3000])
        .file("b", &[2u8; 3000])
        .file("c", b"");
    let archive = t.write(tmp.path(), "big.tar");

    let small_entry = Limits {
        max_entry_bytes: 2999,
        ..Limits::default()
    };
    let err = walk_all(&archive, &small_entry).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::LimitExceeded { what: "entry size", entry, .. } if entry == "a"),
        "{err:?}"
    );

    let small_total = Limits {
        max_total_bytes: 5000,
        ..Limits::default()
    };
    let err = walk_all(&archive, &small_total).unwrap_err();
    assert!(
        matches!(
            &err,
            ArchiveError::LimitExceeded {
                what: "total size",
                ..
            }
        ),
        "{err:?}"
    );

    let few = Limits {
        max_entries: 2,
        ..Limits::default()
    };
    let err = walk_all(&archive, &few).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::LimitExceeded { what: "entry count", entry, .. } if entry == "c"),
        "{err:?}"
    );

    let dest = tmp.path().join("out");
    assert!(extract_tar(&archive, &dest, &small_total).is_err());
    assert!(!dest.exists());

    let exact = Limits {
        max_entry_bytes: 3000,
        max_total_bytes: 6000,
        max_entries: 3,
    };
    assert_eq!(walk_all(&archive, &exact).unwrap().len(), 3);
}

#[test]
fn stream_cap_stops_headers_that_hide_bytes() {
    // A PAX header carrying a huge value counts against the stream, not against file sizes:
    // the stream cap must still stop it.
    let tmp = tempfile::tempdir().unwrap();
    let mut t = RawTar::new();
    let padding = "p".repeat(600_000);
    let record = pax_record("comment", &padding);
    let mut h = Header::new_ustar();
    h.set_path("PaxHeaders/x").unwrap();
    h.set_entry_type(EntryType::XHeader);
    h.set_size(record.len() as u64);
    h.set_cksum();
    t.builder.append(&h, record.as_bytes()).unwrap();
    t.file("f", b"x");
    let archive = t.write(tmp.path(), "pax-bomb.tar");
    let tight = Limits {
        max_entry_bytes: 10,
        max_total_bytes: 10,
        max_entries: 1,
    };
    let err = walk_all(&archive, &tight).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::LimitExceeded {
                what: "total size",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn setuid_setgid_and_sticky_bits_are_stripped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = RawTar::new();
    t.entry(
        b"bin/tool",
        EntryType::Regular,
        None,
        b"#!/bin/sh\n",
        0o6755,
    )
    .entry(b"shared", EntryType::Directory, None, b"", 0o1777);
    let archive = t.write(tmp.path(), "modes.tar");
    let seen = walk_all(&archive, &Limits::default()).unwrap();
    assert_eq!(seen[0].0.mode, 0o755);
    assert_eq!(seen[1].0.mode, 0o755);

    let dest = tmp.path().join("out");
    extract_tar(&archive, &dest, &Limits::default()).unwrap();
    let mode = fs::metadata(dest.join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    let mode = fs::metadata(dest.join("shared"))
        .unwrap()
        .permissions()
        .mode();
    // Directory modes are normalised.
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn gnu_long_names_and_pax_paths_work() {
    let tmp = tempfile::tempdir().unwrap();
    let long = format!("{}/file.txt", "d".repeat(150));
    let pax = format!("{}/pax.txt", "p".repeat(120));
    let mut t = RawTar::new();
    let mut h = Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    t.builder.append_data(&mut h, &long, &b"long"[..]).unwrap();
    t.pax_path(&pax, b"pax!");
    let archive = t.write(tmp.path(), "names.tar");
    let seen = walk_all(&archive, &Limits::default()).unwrap();
    let paths: Vec<_> = seen.iter().map(|(e, _)| e.path.clone()).collect();
    assert_eq!(paths, vec![PathBuf::from(&long), PathBuf::from(&pax)]);
    assert_eq!(seen[1].1, b"pax!");

    let dest = tmp.path().join("out");
    extract_tar(&archive, &dest, &Limits::default()).unwrap();
    assert_eq!(fs::read(dest.join(&long)).unwrap(), b"long");
    assert_eq!(fs::read(dest.join(&pax)).unwrap(), b"pax!");
}

#[test]
fn pax_paths_are_validated_too() {
    let mut t = RawTar::new();
    t.pax_path("../../escape", b"x");
    assert_refused(t, "`..`");
}

fn sample_tar() -> Vec<u8> {
    let mut t = RawTar::new();
    t.dir("./")
        .dir("./usr/")
        .dir("./usr/lib/")
        .file("./usr/lib/libfoo.so.1.2.3", b"\x7fELF pretend")
        .symlink("./usr/lib/libfoo.so.1", "libfoo.so.1.2.3")
        .symlink("./usr/lib/up", "../lib/./libfoo.so.1.2.3")
        .file("./usr/lib/empty", b"");
    t.bytes()
}

#[test]
fn compression_is_recognised_by_magic_not_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let tar = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let variants = [
        (Compression::None, tar.clone()),
        (Compression::Gzip, gz.finish().unwrap()),
        (Compression::Zstd, zstd::encode_all(&tar[..], 3).unwrap()),
        (Compression::Xz, liblzma::encode_all(&tar[..], 6).unwrap()),
    ];
    for (i, (compression, bytes)) in variants.into_iter().enumerate() {
        // Deliberately misleading names.
        let archive = tmp.path().join(format!("artifact-{i}.tar.gz.bz2"));
        fs::write(&archive, bytes).unwrap();
        let dest = tmp.path().join(format!("out-{i}"));
        let summary = extract_tar(&archive, &dest, &Limits::default()).unwrap();
        assert_eq!(summary.compression, compression);
        assert_eq!(
            (summary.files, summary.symlinks, summary.directories),
            (2, 2, 2)
        );
        assert_eq!(summary.file_bytes, 12);
        assert_eq!(
            fs::read(dest.join("usr/lib/libfoo.so.1")).unwrap(),
            b"\x7fELF pretend"
        );
        assert_eq!(
            fs::read_link(dest.join("usr/lib/up")).unwrap(),
            Path::new("../lib/./libfoo.so.1.2.3")
        );
        assert_eq!(
            fs::read(dest.join("usr/lib/up")).unwrap(),
            b"\x7fELF pretend"
        );
    }
}

#[test]
fn walk_reports_kinds_in_archive_order() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.tar");
    fs::write(&archive, sample_tar()).unwrap();
    let seen = walk_all(&archive, &Limits::default()).unwrap();
    let kinds: Vec<_> = seen
        .iter()
        .map(|(e, _)| (e.path.to_str().unwrap().to_string(), e.kind.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("usr".into(), EntryKind::Directory),
            ("usr/lib".into(), EntryKind::Directory),
            (
                "usr/lib/libfoo.so.1.2.3".into(),
                EntryKind::File { size: 12 }
            ),
            (
                "usr/lib/libfoo.so.1".into(),
                EntryKind::Symlink {
                    target: "libfoo.so.1.2.3".into()
                }
            ),
            (
                "usr/lib/up".into(),
                EntryKind::Symlink {
                    target: "../lib/./libfoo.so.1.2.3".into()
                }
            ),
            ("usr/lib/empty".into(), EntryKind::File { size: 0 }),
        ]
    );
}

#[test]
fn destination_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.tar");
    fs::write(&archive, sample_tar()).unwrap();

    // An empty directory is fine and is replaced by the tree.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    extract_tar(&archive, &empty, &Limits::default()).unwrap();
    assert!(empty.join("usr/lib/empty").is_file());

    // A non-empty directory or a file is refused and left alone.
    let err = extract_tar(&archive, &empty, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let file = tmp.path().join("file");
    fs::write(&file, b"keep").unwrap();
    let err = extract_tar(&archive, &file, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"keep");
}

#[test]
fn truncated_and_corrupt_archives_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let tar = sample_tar();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (name, bytes) in [
        ("truncated.tar", tar[..1100].to_vec()),
        ("truncated.tar.zst", zst[..zst.len() - 8].to_vec()),
    ] {
        let archive = tmp.path().join(name);
        fs::write(&archive, bytes).unwrap();
        let dest = tmp.path().join(format!("out-{name}"));
        let err = extract_tar(&archive, &dest, &Limits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::Malformed { .. }
                    | ArchiveError::Decompress { .. }
                    | ArchiveError::Write { .. }
            ),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
        assert!(!dest.exists());
    }
    let missing = extract_tar(
        &tmp.path().join("nope.tar"),
        &tmp.path().join("o"),
        &Limits::default(),
    )
    .unwrap_err();
    assert!(matches!(missing, ArchiveError::Io { .. }), "{missing:?}");
}

#[test]
fn visitor_errors_stop_the_walk() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("a.tar");
    fs::write(&archive, sample_tar()).unwrap();
    let mut visited = 0;
    let err = walk_tar(&archive, &Limits::default(), &mut |entry, _| {
        visited += 1;
        if entry.path.ends_with("libfoo.so.1.2.3") {
            return Err(ArchiveError::Visitor {
                archive: archive.clone(),
                entry: entry.path.display().to_string(),
                message: "not wanted".into(),
            });
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(visited, 3);
    assert!(err.to_string().contains("not wanted"));
}

fn assert_only_normal(path: &Path) {
    assert!(!path.as_os_str().is_empty());
    assert!(
        path.components().all(|c| matches!(c, Component::Normal(_))),
        "{path:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes never panic and never yield an unsafe path.
    #[test]
    fn walker_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = walk_tar_stream(&bytes[..], Path::new("fuzz.tar"), &Limits::default(), &mut |e, r| {
            assert_only_normal(&e.path);
            let _ = std::io::copy(r, &mut std::io::sink());
            Ok(())
        });
    }

    /// Corrupting a valid archive (headers included) never panics and never yields an unsafe
    /// path; symlink targets stay relative.
    #[test]
    fn walker_survives_corrupted_archives(flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8)) {
        let mut bytes = sample_tar();
        for (at, value) in flips {
            let len = bytes.len();
            bytes[at % len] = value;
        }
        let _ = walk_tar_stream(&bytes[..], Path::new("fuzz.tar"), &Limits::default(), &mut |e, _| {
            assert_only_normal(&e.path);
            if let EntryKind::Symlink { target } = &e.kind {
                assert!(target.is_relative());
            }
            Ok(())
        });
    }
}

#[test]
fn corruption_caught_only_by_the_gzip_checksum_is_refused() {
    // A stored (level 0) gzip stream: flipping a content byte keeps the deflate structure valid,
    // so only the CRC at the very end of the stream can tell.
    let dir = tempfile::tempdir().unwrap();
    let content = vec![b'a'; 4096];
    let mut builder = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    builder
        .append_data(&mut h, "lib/payload.bin", &content[..])
        .unwrap();
    let tar_bytes = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(&tar_bytes).unwrap();
    let mut bytes = gz.finish().unwrap();
    let good = dir.path().join("good.tar.gz");
    fs::write(&good, &bytes).unwrap();
    assert!(walk_all(&good, &Limits::default()).is_ok());

    let at = bytes.windows(16).position(|w| w == [b'a'; 16]).unwrap() + 100;
    bytes[at] = b'b';
    let bad = dir.path().join("bad.tar.gz");
    fs::write(&bad, &bytes).unwrap();
    let err = walk_all(&bad, &Limits::default()).unwrap_err().to_string();
    assert!(
        err.contains("bad.tar.gz") && err.contains("corrupt"),
        "{err}"
    );
    let dest = dir.path().join("out");
    assert!(extract_tar(&bad, &dest, &Limits::default()).is_err());
    assert!(
        !dest.exists(),
        "a corrupt archive left a partial extraction"
    );
}
