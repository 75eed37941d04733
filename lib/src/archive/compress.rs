//! Output compression for initrd layers: none, legacy-frame LZ4, zstd and gzip.
//!
//! Every encoder here is deterministic: the same input gives the same bytes on any machine
//! (gzip with a zero mtime and no file name; zstd always in multi-threaded mode, whose output
//! does not depend on the number of workers; LZ4 in fixed 8 MiB chunks).

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How an initrd layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    /// Plain cpio: the fastest to unpack, the largest.
    None,
    /// LZ4 in the legacy frame (magic `0x184c2102`), the only LZ4 framing the kernel unpacks.
    /// The kernel reads a legacy LZ4 stream to the end of the initrd, so such a layer must be
    /// the last one in the file.
    Lz4,
    /// zstd level 3.
    Zstd,
    /// gzip level 6, for the oldest kernels and tools.
    Gzip,
}

impl LayerCompression {
    /// Every choice, in the order the CLI lists them.
    pub const ALL: [LayerCompression; 4] = [
        LayerCompression::None,
        LayerCompression::Lz4,
        LayerCompression::Zstd,
        LayerCompression::Gzip,
    ];

    /// The name used on the command line and in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerCompression::None => "none",
            LayerCompression::Lz4 => "lz4",
            LayerCompression::Zstd => "zstd",
            LayerCompression::Gzip => "gzip",
        }
    }

    /// File name suffix for a cpio archive compressed this way.
    pub fn suffix(self) -> &'static str {
        match self {
            LayerCompression::None => "cpio",
            LayerCompression::Lz4 => "cpio.lz4",
            LayerCompression::Zstd => "cpio.zst",
            LayerCompression::Gzip => "cpio.gz",
        }
    }
}

impl fmt::Display for LayerCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LayerCompression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LayerCompression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown compression `{s}`: use none, lz4, zstd or gzip"))
    }
}

/// A writer that must be finished explicitly, returning the inner writer.
pub trait FinishWrite<W>: Write {
    /// Flush the compressed stream's trailer and return the inner writer.
    fn finish(self: Box<Self>) -> io::Result<W>;
}

struct Plain<W>(W);

impl<W: Write> Write for Plain<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> FinishWrite<W> for Plain<W> {
    fn finish(self: Box<Self>) -> io::Result<W> {
        Ok(self.0)
    }
}

impl<W: Write> FinishWrite<W> for flate2::write::GzEncoder<W> {
    fn finish(self: Box<Self>) -> io::Result<W> {
        (*self).finish()
    }
}

impl<W: Write> FinishWrite<W> for zstd::stream::write::Encoder<'static, W> {
    fn finish(self: Box<Self>) -> io::Result<W> {
        (*self).finish()
    }
}

/// zstd level for initrd layers: level 3 is zstd's default and unpacks as fast as any level.
const ZSTD_LEVEL: i32 = 3;
/// Largest zstd block: just under the 128 KiB that zstd pre-splits (see `compressing_writer`).
const ZSTD_MAX_BLOCK: u32 = 127 << 10;
/// gzip level, as `gzip -6`.
const GZIP_LEVEL: u32 = 6;

/// Wrap `inner` in an encoder for `compression`.
pub fn compressing_writer<W: Write + 'static>(
    compression: LayerCompression,
    inner: W,
) -> io::Result<Box<dyn FinishWrite<W>>> {
    Ok(match compression {
        LayerCompression::None => Box::new(Plain(inner)),
        LayerCompression::Gzip => Box::new(
            flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(3) // Unix, fixed so the header never depends on the builder
                .write(inner, flate2::Compression::new(GZIP_LEVEL)),
        ),
        LayerCompression::Zstd => {
            let mut encoder = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
            // Multi-threaded output is identical for any worker count >= 1, so this stays
            // deterministic across machines while using every core.
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            encoder.multithread(workers.max(1))?;
            encoder.include_checksum(true)?;
            // zstd 1.5.7 splits each full 128 KiB block by content before compressing it
            // ("pre-splitting"): on these payloads about 10% more CPU at level 3 for 0.8% less
            // size. It never splits smaller blocks, so a 127 KiB maximum turns it off and keeps
            // level 3 the work `zstd -3` of 1.5.4 (Debian 12's CLI) does.
            encoder.set_parameter(zstd::zstd_safe::CParameter::MaxBlockSize(ZSTD_MAX_BLOCK))?;
            Box::new(encoder)
        }
        LayerCompression::Lz4 => Box::new(Lz4LegacyWriter::new(inner)?),
    })
}

/// Magic number of the legacy LZ4 frame, little-endian on disk.
pub const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Uncompressed chunk size of the legacy frame; the kernel's unlz4 expects exactly this.
const LZ4_LEGACY_CHUNK: usize = 8 << 20;

/// Writes the legacy LZ4 frame: the magic, then chunks of `u32 LE compressed size` + an LZ4
/// block of at most 8 MiB of input.
pub struct Lz4LegacyWriter<W: Write> {
    inner: W,
    pending: Vec<u8>,
    compressed: Vec<u8>,
}

impl<W: Write> Lz4LegacyWriter<W> {
    /// Start a legacy LZ4 stream on `inner` (writes the magic).
    pub fn new(mut inner: W) -> io::Result<Self> {
        inner.write_all(&LZ4_LEGACY_MAGIC.to_le_bytes())?;
        Ok(Lz4LegacyWriter {
            inner,
            pending: Vec::with_capacity(LZ4_LEGACY_CHUNK),
            compressed: vec![0; lz4_flex::block::get_maximum_output_size(LZ4_LEGACY_CHUNK)],
        })
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let n = lz4_flex::block::compress_into(&self.pending, &mut self.compressed)
            .map_err(io::Error::other)?;
        let size = u32::try_from(n).map_err(io::Error::other)?;
        self.inner.write_all(&size.to_le_bytes())?;
        self.inner.write_all(&self.compressed[..n])?;
        self.pending.clear();
        Ok(())
    }
}

impl<W: Write> Write for Lz4LegacyWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = LZ4_LEGACY_CHUNK - self.pending.len();
        let n = buf.len().min(room);
        self.pending.extend_from_slice(&buf[..n]);
        if self.pending.len() == LZ4_LEGACY_CHUNK {
            self.flush_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> FinishWrite<W> for Lz4LegacyWriter<W> {
    fn finish(mut self: Box<Self>) -> io::Result<W> {
        self.flush_chunk()?;
        Ok(self.inner)
    }
}

/// Reads a legacy LZ4 stream (after its magic) to the end of the input, as the kernel does.
pub struct Lz4LegacyReader<R: Read> {
    inner: R,
    chunk: Vec<u8>,
    out: Vec<u8>,
    pos: usize,
}

impl<R: Read> Lz4LegacyReader<R> {
    /// Decode `inner`, which must start just after the 4-byte magic.
    pub fn new(inner: R) -> Self {
        Lz4LegacyReader {
            inner,
            chunk: Vec::new(),
            out: Vec::new(),
            pos: 0,
        }
    }

    /// Read the next chunk; `false` at the end of the input.
    fn next_chunk(&mut self) -> io::Result<bool> {
        let mut size = [0u8; 4];
        match read_full(&mut self.inner, &mut size)? {
            0 => return Ok(false),
            4 => {}
            _ => return Err(invalid("truncated LZ4 chunk header")),
        }
        let size = u32::from_le_bytes(size);
        if size == LZ4_LEGACY_MAGIC {
            // Concatenated legacy streams: a repeated magic starts the next one.
            return self.next_chunk();
        }
        let size = size as usize;
        if size > lz4_flex::block::get_maximum_output_size(LZ4_LEGACY_CHUNK) {
            return Err(invalid("LZ4 chunk larger than the legacy frame allows"));
        }
        self.chunk.resize(size, 0);
        self.inner.read_exact(&mut self.chunk)?;
        self.out.resize(LZ4_LEGACY_CHUNK, 0);
        let n = lz4_flex::block::decompress_into(&self.chunk, &mut self.out)
            .map_err(|e| invalid(&format!("corrupt LZ4 chunk: {e}")))?;
        self.out.truncate(n);
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for Lz4LegacyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if !self.next_chunk()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        // Compressible but not trivial, and longer than one LZ4 chunk.
        (0..(9u32 << 20)).map(|i| ((i / 7) % 251) as u8).collect()
    }

    fn compress(c: LayerCompression, data: &[u8]) -> Vec<u8> {
        let mut w = compressing_writer(c, Vec::new()).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn lz4_legacy_round_trips_across_chunks() {
        let data = sample();
        let out = compress(LayerCompression::Lz4, &data);
        assert_eq!(&out[..4], &LZ4_LEGACY_MAGIC.to_le_bytes());
        let mut back = Vec::new();
        Lz4LegacyReader::new(&out[4..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn every_encoder_is_deterministic_and_decodable() {
        let data = sample();
        for c in LayerCompression::ALL {
            let a = compress(c, &data);
            let b = compress(c, &data);
            assert_eq!(a, b, "{c} output differs between two runs");
            let mut back = Vec::new();
            match c {
                LayerCompression::None => back = a.clone(),
                LayerCompression::Gzip => {
                    flate2::read::GzDecoder::new(&a[..])
                        .read_to_end(&mut back)
                        .unwrap();
                }
                LayerCompression::Zstd => {
                    zstd::stream::read::Decoder::new(&a[..])
                        .unwrap()
                        .read_to_end(&mut back)
                        .unwrap();
                }
                LayerCompression::Lz4 => {
                    Lz4LegacyReader::new(&a[4..])
                        .read_to_end(&mut back)
                        .unwrap();
                }
            }
            assert_eq!(back, data, "{c} does not round-trip");
        }
    }

    #[test]
    fn gzip_header_has_no_timestamp_or_name() {
        let out = compress(LayerCompression::Gzip, b"x");
        assert_eq!(
            &out[..4],
            &[0x1f, 0x8b, 8, 0],
            "flags must be 0: no name, no comment"
        );
        assert_eq!(&out[4..8], &[0, 0, 0, 0], "mtime must be 0");
    }

    #[test]
    fn corrupt_lz4_chunk_is_an_error_not_a_panic() {
        let mut out = compress(LayerCompression::Lz4, &sample());
        out[10] ^= 0xff;
        out.truncate(out.len() - 100);
        let mut back = Vec::new();
        assert!(
            Lz4LegacyReader::new(&out[4..])
                .read_to_end(&mut back)
                .is_err()
        );
    }

    #[test]
    fn names_parse_back() {
        for c in LayerCompression::ALL {
            assert_eq!(c.as_str().parse::<LayerCompression>().unwrap(), c);
        }
        assert!(
            "brotli"
                .parse::<LayerCompression>()
                .unwrap_err()
                .contains("none, lz4, zstd")
        );
    }
}
