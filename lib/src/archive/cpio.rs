//! Deterministic cpio (newc) writing, and reading initrds back for inspection.
//!
//! Entries carry fixed metadata (mtime 0, uid/gid 0, inode numbers in write order, `nlink` 1 for
//! files so the kernel never tries to hard-link them), so the same entries in the same order give
//! the same bytes. Callers add entries in sorted order and every parent directory before its
//! children: the kernel's initramfs unpacker does not create missing parents.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use serde::Serialize;
use thiserror::Error;

use super::compress::{LZ4_LEGACY_MAGIC, Lz4LegacyReader};
use crate::outcome::{Classify, Outcome};

/// Errors writing or reading cpio archives.
#[derive(Debug, Error)]
pub enum CpioError {
    /// An entry name the newc format or the kernel cannot take.
    #[error("cpio entry name `{name}` is not allowed: {why}")]
    BadName {
        /// The offending name.
        name: String,
        /// Why it was refused.
        why: &'static str,
    },
    /// A file's contents were shorter or longer than announced.
    #[error("cpio entry `{name}`: expected {expected} bytes, the source gave {actual}")]
    SizeMismatch {
        /// Entry name.
        name: String,
        /// Announced size.
        expected: u64,
        /// Bytes actually read.
        actual: u64,
    },
    /// A file too large for the newc format (4 GiB).
    #[error("cpio entry `{name}` is {size} bytes; newc cannot hold files of 4 GiB or more")]
    TooLarge {
        /// Entry name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// A layer whose bytes the cpio reader or the decompressor could not read.
    #[error("{file}: the {compression} layer at byte {offset} cannot be read")]
    Unreadable {
        /// The initrd file.
        file: String,
        /// Where the layer starts.
        offset: u64,
        /// The layer's compression (`none` for plain cpio).
        compression: &'static str,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// A malformed archive while reading.
    #[error("{file}: layer at byte {offset}: {why}")]
    Malformed {
        /// The initrd file.
        file: String,
        /// Where the layer starts.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// An I/O error.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl Classify for CpioError {
    fn outcome(&self) -> Outcome {
        Outcome::Failed
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CpioError {
    let context = context.into();
    move |source| CpioError::Io { context, source }
}

/// File type bits of `st_mode`.
mod kind {
    pub const DIR: u32 = 0o040000;
    pub const FILE: u32 = 0o100000;
    pub const SYMLINK: u32 = 0o120000;
    pub const CHAR: u32 = 0o020000;
    pub const BLOCK: u32 = 0o060000;
    pub const MASK: u32 = 0o170000;
}

/// How much of a file's contents is read at a time.
const COPY_CHUNK: usize = 256 << 10;

/// Streams entries into a newc archive with fixed metadata.
pub struct CpioWriter<W: Write> {
    inner: W,
    next_ino: u32,
    bytes: u64,
    entries: u64,
}

impl<W: Write> CpioWriter<W> {
    /// Start an archive on `inner`.
    pub fn new(inner: W) -> Self {
        // Inode 0 is avoided: some tools treat it as "no inode".
        CpioWriter {
            inner,
            next_ino: 1,
            bytes: 0,
            entries: 0,
        }
    }

    /// Bytes of file contents written so far.
    pub fn content_bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
    ) -> Result<cpio::newc::Builder, CpioError> {
        check_name(name)?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entries += 1;
        Ok(cpio::newc::Builder::new(name)
            .ino(ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(nlink)
            .mtime(0))
    }

    /// A directory.
    pub fn directory(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        let h = self.header(name, kind::DIR | (perm & 0o7777), 2)?;
        h.write(&mut self.inner, 0)
            .finish()
            .map_err(io_err(format!("writing `{name}`")))?;
        Ok(())
    }

    /// A regular file of exactly `size` bytes read from `contents`.
    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let size32 = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            size,
        })?;
        let h = self.header(name, kind::FILE | (perm & 0o7777), 1)?;
        let mut w = h.write(&mut self.inner, size32);
        // Through a large buffer: `io::copy` then makes one read and one write (a compressor
        // call) per 256 KiB instead of per 8 KiB.
        let mut source = io::BufReader::with_capacity(COPY_CHUNK, contents.take(size));
        let copied = io::copy(&mut source, &mut w).map_err(io_err(format!("writing `{name}`")))?;
        drop(source);
        if copied != size {
            return Err(CpioError::SizeMismatch {
                name: name.to_string(),
                expected: size,
                actual: copied,
            });
        }
        // A source that grew after it was measured would make the archive lie about the file.
        let mut probe = [0u8; 1];
        if contents
            .read(&mut probe)
            .map_err(io_err(format!("reading `{name}`")))?
            != 0
        {
            return Err(CpioError::SizeMismatch {
                name: name.to_string(),
                expected: size,
                actual: size + 1,
            });
        }
        w.finish().map_err(io_err(format!("writing `{name}`")))?;
        self.bytes += size;
        Ok(())
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let h = self.header(name, kind::SYMLINK | 0o777, 1)?;
        let mut w = h.write(&mut self.inner, target.len() as u32);
        w.write_all(target.as_bytes())
            .map_err(io_err(format!("writing `{name}`")))?;
        w.finish().map_err(io_err(format!("writing `{name}`")))?;
        Ok(())
    }

    /// A character device node.
    pub fn char_device(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let h = self
            .header(name, kind::CHAR | (perm & 0o7777), 1)?
            .rdev_major(major)
            .rdev_minor(minor);
        h.write(&mut self.inner, 0)
            .finish()
            .map_err(io_err(format!("writing `{name}`")))?;
        Ok(())
    }

    /// Write the trailer and return the inner writer.
    pub fn finish(self) -> Result<W, CpioError> {
        cpio::newc::trailer(self.inner).map_err(io_err("writing the cpio trailer"))
    }
}

fn check_name(name: &str) -> Result<(), CpioError> {
    let bad = |why| {
        Err(CpioError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.starts_with('/') {
        return bad("absolute; names are relative to the initramfs root");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    if name
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("has an empty, `.` or `..` component");
    }
    if name == "TRAILER!!!" {
        return bad("is the end-of-archive marker");
    }
    Ok(())
}

/// One entry of an initrd layer, as `initrd inspect` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InitrdEntry {
    /// Path inside the initramfs.
    pub path: String,
    /// `dir`, `file`, `symlink`, `char`, `block` or `other`.
    pub kind: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// Content size in bytes (files and symlinks).
    pub size: u64,
    /// Symlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device numbers of a device node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdev: Option<(u32, u32)>,
}

/// One layer (one cpio archive) of an initrd file.
#[derive(Debug, Clone, Serialize)]
pub struct InitrdLayer {
    /// Byte offset of the layer in the file.
    pub offset: u64,
    /// Its compression: `none`, `gzip`, `zstd`, `xz` or `lz4`.
    pub compression: &'static str,
    /// Its entries, in archive order.
    pub entries: Vec<InitrdEntry>,
    /// Sum of file content sizes.
    pub content_bytes: u64,
}

/// A reader that counts how many bytes its consumer has taken.
struct Counting<R> {
    inner: R,
    consumed: u64,
}

impl<R: BufRead> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.consumed += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Counting<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.consumed += amt as u64;
        self.inner.consume(amt);
    }
}

/// List every layer of an initrd file: concatenated cpio archives, each plain or compressed
/// (gzip, zstd, xz, legacy LZ4), with zero padding between them, as the kernel unpacks them.
pub fn read_initrd(path: &Path) -> Result<Vec<InitrdLayer>, CpioError> {
    let file_name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(io_err(format!("opening {file_name}")))?;
    let mut input = Counting {
        inner: BufReader::with_capacity(1 << 20, file),
        consumed: 0,
    };
    let mut layers = Vec::new();
    loop {
        // Skip the zero padding the kernel also skips between archives.
        loop {
            let buf = input
                .fill_buf()
                .map_err(io_err(format!("reading {file_name}")))?;
            if buf.is_empty() {
                return Ok(layers);
            }
            let zeros = buf.iter().take_while(|&&b| b == 0).count();
            if zeros == 0 {
                break;
            }
            input.consume(zeros);
        }
        let offset = input.consumed;
        let magic = input
            .fill_buf()
            .map_err(io_err(format!("reading {file_name}")))?;
        let malformed = |why: String| CpioError::Malformed {
            file: file_name.clone(),
            offset,
            why,
        };
        let unreadable = |compression, source| CpioError::Unreadable {
            file: file_name.clone(),
            offset,
            compression,
            source,
        };
        let layer = if magic.starts_with(b"07070") {
            read_layer(&mut input, "none", offset).map_err(|e| unreadable("none", e))?
        } else {
            let (compression, mut decoder): (&'static str, Box<dyn Read + '_>) =
                if magic.starts_with(&[0x1f, 0x8b]) {
                    (
                        "gzip",
                        Box::new(flate2::bufread::GzDecoder::new(&mut input)),
                    )
                } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    let d = zstd::stream::read::Decoder::with_buffer(&mut input)
                        .map_err(|e| unreadable("zstd", e))?
                        .single_frame();
                    ("zstd", Box::new(d))
                } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
                    ("xz", Box::new(liblzma::bufread::XzDecoder::new(&mut input)))
                } else if magic.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
                    input.consume(4);
                    // Like the kernel, a legacy LZ4 stream runs to the end of the file.
                    ("lz4", Box::new(Lz4LegacyReader::new(&mut input)))
                } else {
                    return Err(malformed(format!(
                        "unknown data (starts with {:02x?}); not a cpio archive or a compression \
                         the kernel unpacks",
                        &magic[..magic.len().min(6)]
                    )));
                };
            let layer = read_layer(&mut decoder, compression, offset)
                .map_err(|e| unreadable(compression, e))?;
            // Consume the rest of the compressed stream (its checksum trailer, or for LZ4 the
            // padding up to the end) so the next layer starts where the kernel would find it.
            io::copy(&mut decoder, &mut io::sink()).map_err(|e| unreadable(compression, e))?;
            layer
        };
        layers.push(layer);
    }
}

/// Read one cpio archive up to and including its trailer (and its padding).
fn read_layer(
    input: &mut dyn Read,
    compression: &'static str,
    offset: u64,
) -> io::Result<InitrdLayer> {
    let mut entries = Vec::new();
    let mut content_bytes = 0;
    let mut reader: &mut dyn Read = input;
    loop {
        let mut entry_reader = cpio::newc::Reader::new(reader)?;
        let e = entry_reader.entry().clone();
        if e.is_trailer() {
            entry_reader.finish()?;
            break;
        }
        let mode = e.mode();
        let (kind_name, target) = match mode & kind::MASK {
            kind::DIR => ("dir", None),
            kind::FILE => ("file", None),
            kind::SYMLINK => {
                let mut t = String::new();
                (&mut entry_reader).take(4096).read_to_string(&mut t)?;
                ("symlink", Some(t))
            }
            kind::CHAR => ("char", None),
            kind::BLOCK => ("block", None),
            _ => ("other", None),
        };
        let size = u64::from(e.file_size());
        if kind_name == "file" {
            content_bytes += size;
        }
        let rdev = matches!(kind_name, "char" | "block").then(|| (e.rdev_major(), e.rdev_minor()));
        entries.push(InitrdEntry {
            path: e.name().to_string(),
            kind: kind_name,
            mode: mode & 0o7777,
            size,
            target,
            rdev,
        });
        reader = entry_reader.finish()?;
    }
    Ok(InitrdLayer {
        offset,
        compression,
        entries,
        content_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::compress::{LayerCompression, compressing_writer};

    fn layer(c: LayerCompression, names: &[&str]) -> Vec<u8> {
        let enc = compressing_writer(c, Vec::new()).unwrap();
        let mut w = CpioWriter::new(enc);
        w.directory("gpu", 0o755).unwrap();
        for n in names {
            let data = n.as_bytes();
            w.file(
                &format!("gpu/{n}"),
                0o644,
                data.len() as u64,
                &mut &data[..],
            )
            .unwrap();
        }
        w.symlink("gpu/link", "a").unwrap();
        w.char_device("dev-console", 0o600, 5, 1).unwrap();
        let mut out = w.finish().unwrap().finish().unwrap();
        // Pad like the builder does, so the next layer starts 4-aligned.
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn same_entries_give_same_bytes() {
        assert_eq!(
            layer(LayerCompression::None, &["a", "b"]),
            layer(LayerCompression::None, &["a", "b"])
        );
    }

    #[test]
    fn reads_back_concatenated_layers_of_every_compression() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        let mut all = Vec::new();
        // LZ4 last: the kernel reads a legacy LZ4 stream to the end of the file.
        for c in [
            LayerCompression::None,
            LayerCompression::Gzip,
            LayerCompression::Zstd,
            LayerCompression::Lz4,
        ] {
            all.extend(layer(c, &[c.as_str()]));
        }
        std::fs::write(&path, &all).unwrap();
        let layers = read_initrd(&path).unwrap();
        let kinds: Vec<_> = layers.iter().map(|l| l.compression).collect();
        assert_eq!(kinds, ["none", "gzip", "zstd", "lz4"]);
        for l in &layers {
            let paths: Vec<_> = l.entries.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths.len(), 4, "{paths:?}");
            assert_eq!(l.entries[2].target.as_deref(), Some("a"));
            assert_eq!(l.entries[3].rdev, Some((5, 1)));
        }
        assert_eq!(layers[0].offset, 0);
    }

    #[test]
    fn refuses_hostile_names() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["/etc/passwd", "a/../b", "", "a//b", "TRAILER!!!"] {
            assert!(
                matches!(w.directory(bad, 0o755), Err(CpioError::BadName { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_source_of_the_wrong_size_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let err = w.file("f", 0o644, 10, &mut &b"short"[..]).unwrap_err();
        assert!(err.to_string().contains("expected 10 bytes"), "{err}");
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("f", 0o644, 2, &mut &b"longer"[..]).is_err());
    }

    #[test]
    fn garbage_is_reported_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        let mut data = layer(LayerCompression::None, &["a"]);
        let off = data.len();
        data.extend_from_slice(b"garbage!");
        std::fs::write(&path, &data).unwrap();
        let err = read_initrd(&path).unwrap_err().to_string();
        assert!(err.contains(&format!("byte {off}")), "{err}");
    }
}
