//! Tar reading stays bounded against hostile extension headers, and normalises what it passes
//! on.

use std::io::{self, Read};
use std::path::Path;

use gpu_passthrough::archive::ArchiveError;
use gpu_passthrough::archive::tar::{
    EntryKind, Limits, MAX_LONG_NAME_BYTES, MAX_PAX_HEADER_BYTES, extract_tar, walk_tar_stream,
};
use tar::{EntryType, Header};

fn gnu_header(path: &str, kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_cksum();
    h
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

fn walk(bytes: &[u8]) -> Result<Vec<(String, EntryKind, u32)>, ArchiveError> {
    let mut seen = Vec::new();
    walk_tar_stream(
        bytes,
        Path::new("t.tar"),
        &Limits::default(),
        &mut |e, r| {
            io::copy(r, &mut io::sink()).unwrap();
            seen.push((e.path.display().to_string(), e.kind.clone(), e.mode));
            Ok(())
        },
    )?;
    Ok(seen)
}

/// A tar whose first header is a GNU long name of `name_len` bytes, generated on the fly, that
/// refuses to be read further than `budget` bytes (so a parser reading the name whole fails
/// here instead of allocating gigabytes).
struct LongNameBomb {
    header: Vec<u8>,
    pos: u64,
    total: u64,
    budget: u64,
}

impl LongNameBomb {
    fn new(name_len: u64, budget: u64) -> Self {
        let header = gnu_header("././@LongLink", EntryType::GNULongName, name_len, 0o644);
        LongNameBomb {
            header: header.as_bytes().to_vec(),
            pos: 0,
            total: 512 + name_len,
            budget,
        }
    }
}

impl Read for LongNameBomb {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.budget {
            return Err(io::Error::other(
                "the reader pulled the long name's payload",
            ));
        }
        let n = (buf.len() as u64)
            .min(self.total - self.pos)
            .min(self.budget - self.pos) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = self.pos + i as u64;
            *b = if at < 512 {
                self.header[at as usize]
            } else {
                b'a'
            };
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[test]
fn a_3_gib_gnu_long_name_is_refused_from_its_header() {
    let bomb = LongNameBomb::new(3 << 30, 1 << 20);
    let input = io::BufReader::new(bomb);
    let err = walk_tar_stream(
        input,
        Path::new("bomb.tar"),
        &Limits::default(),
        &mut |_, _| Ok(()),
    )
    .unwrap_err();
    match err {
        ArchiveError::ExtensionHeaderTooLarge { size, limit, .. } => {
            assert_eq!(size, 3 << 30);
            assert_eq!(limit, MAX_LONG_NAME_BYTES);
        }
        other => panic!("expected ExtensionHeaderTooLarge, got {other:?}"),
    }
}

#[test]
fn a_long_name_over_the_cap_is_refused_and_one_under_it_is_read() {
    // Over: 64 KiB of name, which the tar crate alone would happily read and hand out.
    let name_len = 64 << 10;
    let mut bytes = gnu_header("././@LongLink", EntryType::GNULongName, name_len, 0o644)
        .as_bytes()
        .to_vec();
    bytes.extend(std::iter::repeat_n(b'a', name_len as usize));
    bytes.extend(gnu_header("placeholder", EntryType::Regular, 0, 0o644).as_bytes());
    bytes.extend([0u8; 1024]);
    let err = walk(&bytes).unwrap_err();
    assert!(
        matches!(err, ArchiveError::ExtensionHeaderTooLarge { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("GNU long name")
            && message.contains("@LongLink\" at byte 0")
            && message.contains(&format!("claims {name_len} bytes")),
        "the error must name the header, where it is and its size: {message}"
    );

    // Under the cap: a 300-byte name still works.
    let mut t = tar::Builder::new(Vec::new());
    let long = format!("{}/f", "d".repeat(300));
    let mut h = Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    t.append_data(&mut h, &long, &b"x"[..]).unwrap();
    let seen = walk(&t.into_inner().unwrap()).unwrap();
    assert_eq!(seen[0].0, long);
}

#[test]
fn a_pax_header_over_the_cap_is_refused() {
    let record = pax_record("comment", &"p".repeat(MAX_PAX_HEADER_BYTES as usize + 10));
    let mut t = tar::Builder::new(Vec::new());
    let mut h = Header::new_ustar();
    h.set_path("PaxHeaders/x").unwrap();
    h.set_entry_type(EntryType::XHeader);
    h.set_size(record.len() as u64);
    h.set_cksum();
    t.append(&h, record.as_bytes()).unwrap();
    let f = gnu_header("f", EntryType::Regular, 1, 0o644);
    t.append(&f, &b"x"[..]).unwrap();
    let err = walk(&t.into_inner().unwrap()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::ExtensionHeaderTooLarge { limit, .. } if limit == MAX_PAX_HEADER_BYTES),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("PAX extended header \"PaxHeaders/x\" at byte 0"),
        "the error must name the PAX header (it carries the entry's name): {message}"
    );
}

#[test]
fn pax_sparse_files_are_refused() {
    // GNU tar --sparse --format=pax: an ordinary-looking file whose PAX records say it is a
    // sparse map, not the file's content.
    let records = format!(
        "{}{}{}",
        pax_record("GNU.sparse.major", "1"),
        pax_record("GNU.sparse.minor", "0"),
        pax_record("GNU.sparse.name", "lib/libcuda.so.1"),
    );
    let mut t = tar::Builder::new(Vec::new());
    let mut h = Header::new_ustar();
    h.set_path("PaxHeaders/x").unwrap();
    h.set_entry_type(EntryType::XHeader);
    h.set_size(records.len() as u64);
    h.set_cksum();
    t.append(&h, records.as_bytes()).unwrap();
    let f = gnu_header(
        "GNUSparseFile.0/libcuda.so.1",
        EntryType::Regular,
        512,
        0o644,
    );
    t.append(&f, &[0u8; 512][..]).unwrap();
    let err = walk(&t.into_inner().unwrap()).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, ArchiveError::UnsafeEntry { .. }) && message.contains("sparse"),
        "{message}"
    );
}

#[test]
fn directory_modes_are_normalised_to_0755() {
    let mut t = tar::Builder::new(Vec::new());
    t.append(
        &gnu_header("open/", EntryType::Directory, 0, 0o777),
        &b""[..],
    )
    .unwrap();
    t.append(
        &gnu_header("closed/", EntryType::Directory, 0, 0o000),
        &b""[..],
    )
    .unwrap();
    t.append(
        &gnu_header("closed/f", EntryType::Regular, 1, 0o644),
        &b"x"[..],
    )
    .unwrap();
    let bytes = t.into_inner().unwrap();
    let seen = walk(&bytes).unwrap();
    assert_eq!(seen[0].2, 0o755, "{seen:?}");
    assert_eq!(seen[1].2, 0o755, "{seen:?}");

    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("dirs.tar");
    std::fs::write(&archive, &bytes).unwrap();
    let dest = tmp.path().join("out");
    extract_tar(&archive, &dest, &Limits::default()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for dir in ["open", "closed"] {
        let mode = std::fs::metadata(dest.join(dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755, "{dir}");
    }
}

#[test]
fn file_modes_lose_group_and_world_write_and_keep_their_read_and_execute_bits() {
    let mut t = tar::Builder::new(Vec::new());
    for (name, mode) in [("shared", 0o666), ("tool", 0o777), ("private", 0o600)] {
        t.append(&gnu_header(name, EntryType::Regular, 1, mode), &b"x"[..])
            .unwrap();
    }
    let bytes = t.into_inner().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("files.tar");
    std::fs::write(&archive, &bytes).unwrap();
    let dest = tmp.path().join("out");
    extract_tar(&archive, &dest, &Limits::default()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (name, want) in [("shared", 0o644), ("tool", 0o755), ("private", 0o600)] {
        let mode = std::fs::metadata(dest.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, want, "{name}: {mode:o}");
    }
}
