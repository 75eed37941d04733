//! Decompression of artifacts and initrd layers, recognised by magic bytes (never by file name).

use std::fmt;
use std::io::{self, BufRead, Cursor, Read};
use std::path::Path;

use super::ArchiveError;

/// A compression format, as recognised from a stream's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// No known compression magic: the bytes are used as they are.
    None,
    /// gzip (RFC 1952), possibly several members concatenated.
    Gzip,
    /// xz, possibly several streams concatenated.
    Xz,
    /// zstd, possibly several frames concatenated.
    Zstd,
    /// LZ4 in the legacy frame (magic `0x184c2102`) that the kernel's initramfs unpacker reads.
    Lz4Legacy,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
const LZ4_LEGACY_MAGIC: &[u8] = &[0x02, 0x21, 0x4c, 0x18];
/// The longest magic we look at.
const MAGIC_LEN: usize = 6;

impl Compression {
    /// Recognise the compression from the first bytes of a stream (at least 6 bytes should be
    /// given when available; fewer only match shorter magics).
    pub fn detect(magic: &[u8]) -> Compression {
        if magic.starts_with(XZ_MAGIC) {
            Compression::Xz
        } else if magic.starts_with(ZSTD_MAGIC) {
            Compression::Zstd
        } else if magic.starts_with(LZ4_LEGACY_MAGIC) {
            Compression::Lz4Legacy
        } else if magic.starts_with(GZIP_MAGIC) {
            Compression::Gzip
        } else {
            Compression::None
        }
    }

    /// A short lowercase name: `none`, `gzip`, `xz`, `zstd`, `lz4-legacy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4Legacy => "lz4-legacy",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Wrap `r` in the decoder its magic bytes call for. Returns the detected compression and a
/// reader of the decompressed bytes. Errors name the stream as `<stream>`; use
/// [`decompressing_reader_named`] when a file name is known.
pub fn decompressing_reader<'a, R: BufRead + 'a>(
    r: R,
) -> Result<(Compression, Box<dyn Read + 'a>), ArchiveError> {
    decompressing_reader_named(r, Path::new("<stream>"))
}

/// Memory the xz decoder may use. `xz -9` needs 65 MiB to decode; a stream whose header asks
/// for more (a dictionary of gigabytes) is refused instead of being allowed to allocate it.
/// zstd is bounded by its own default window limit (128 MiB).
pub const XZ_MEMLIMIT: u64 = 256 << 20;

/// Like [`decompressing_reader`], naming `name` in errors.
pub fn decompressing_reader_named<'a, R: BufRead + 'a>(
    mut r: R,
    name: &Path,
) -> Result<(Compression, Box<dyn Read + 'a>), ArchiveError> {
    // Read the magic out of the stream (fill_buf may return fewer bytes than exist), then put it
    // back in front with `chain`, so that no seeking is needed.
    let mut magic = Vec::with_capacity(MAGIC_LEN);
    (&mut r)
        .take(MAGIC_LEN as u64)
        .read_to_end(&mut magic)
        .map_err(|source| ArchiveError::Io {
            archive: name.to_path_buf(),
            source,
        })?;
    let compression = Compression::detect(&magic);
    let input = Cursor::new(magic).chain(r);
    let reader: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Xz => {
            let stream = liblzma::stream::Stream::new_stream_decoder(
                XZ_MEMLIMIT,
                liblzma::stream::CONCATENATED,
            )
            .map_err(|e| ArchiveError::Decompress {
                archive: name.to_path_buf(),
                compression,
                source: e.into(),
            })?;
            Box::new(liblzma::bufread::XzDecoder::new_stream(input, stream))
        }
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input).map_err(
            |source| ArchiveError::Decompress {
                archive: name.to_path_buf(),
                compression,
                source,
            },
        )?),
        Compression::Lz4Legacy => Box::new(Lz4LegacyReader::new(input)),
    };
    Ok((compression, reader))
}

/// The legacy LZ4 frame: the magic, then blocks of `u32` little-endian compressed length and
/// data, each decompressing to at most 8 MiB. The magic may reappear between blocks (the kernel
/// accepts concatenated streams); the stream ends at end of input.
struct Lz4LegacyReader<R> {
    inner: R,
    compressed: Vec<u8>,
    block: Vec<u8>,
    pos: usize,
    len: usize,
    at_start: bool,
}

const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// LZ4_compressBound(8 MiB): the largest a compressed legacy block can be.
const LZ4_LEGACY_MAX_COMPRESSED: usize = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK / 255 + 16;

impl<R: Read> Lz4LegacyReader<R> {
    fn new(inner: R) -> Self {
        Lz4LegacyReader {
            inner,
            compressed: Vec::new(),
            block: Vec::new(),
            pos: 0,
            len: 0,
            at_start: true,
        }
    }

    /// Read a little-endian u32, or `None` at a clean end of input.
    fn read_u32(&mut self) -> io::Result<Option<u32>> {
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "lz4 legacy stream ends inside a block header",
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(u32::from_le_bytes(buf)))
    }

    /// Decode the next block; returns false at end of stream.
    fn next_block(&mut self) -> io::Result<bool> {
        loop {
            let Some(word) = self.read_u32()? else {
                if self.at_start {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "empty lz4 legacy stream",
                    ));
                }
                return Ok(false);
            };
            if word.to_le_bytes() == LZ4_LEGACY_MAGIC {
                self.at_start = false;
                continue;
            }
            if self.at_start {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "lz4 legacy stream does not start with its magic",
                ));
            }
            let size = word as usize;
            if size == 0 || size > LZ4_LEGACY_MAX_COMPRESSED {
                // Zero padding after the last block ends the stream, as in the kernel.
                if size == 0 {
                    return Ok(false);
                }
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("lz4 legacy block of {size} bytes is larger than any valid block"),
                ));
            }
            self.compressed.resize(size, 0);
            self.inner.read_exact(&mut self.compressed)?;
            self.block.resize(LZ4_LEGACY_BLOCK, 0);
            let n = lz4_flex::block::decompress_into(&self.compressed, &mut self.block)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.pos = 0;
            self.len = n;
            return Ok(true);
        }
    }
}

impl<R: Read> Read for Lz4LegacyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos == self.len {
            if !self.next_block()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(compressed: &[u8]) -> (Compression, Vec<u8>) {
        let (c, mut r) = decompressing_reader(compressed).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        (c, out)
    }

    #[test]
    fn detects_and_decodes_each_format() {
        let payload: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&payload).unwrap();
        assert_eq!(
            roundtrip(&gz.finish().unwrap()),
            (Compression::Gzip, payload.clone())
        );

        let xz = liblzma::encode_all(&payload[..], 1).unwrap();
        assert_eq!(roundtrip(&xz), (Compression::Xz, payload.clone()));

        let zst = zstd::encode_all(&payload[..], 1).unwrap();
        assert_eq!(roundtrip(&zst), (Compression::Zstd, payload.clone()));

        let mut lz4 = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in payload.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            lz4.extend_from_slice(&(block.len() as u32).to_le_bytes());
            lz4.extend_from_slice(&block);
        }
        assert_eq!(roundtrip(&lz4), (Compression::Lz4Legacy, payload.clone()));

        assert_eq!(roundtrip(&payload), (Compression::None, payload.clone()));
        assert_eq!(roundtrip(b"ab"), (Compression::None, b"ab".to_vec()));
    }

    #[test]
    fn xz_asking_for_more_memory_than_the_limit_is_refused() {
        // Encode with a small dictionary, then rewrite the block header's LZMA2 dictionary
        // byte to 4 GiB (40) and fix the header's CRC32: the decoder would allocate it.
        let mut xz = liblzma::encode_all(&[1u8; 4096][..], 1).unwrap();
        let header_len = (xz[12] as usize + 1) * 4;
        let block = 12..12 + header_len;
        let filter = xz[block.clone()]
            .windows(2)
            .position(|w| w == [0x21, 0x01])
            .unwrap();
        xz[12 + filter + 2] = 40;
        let mut crc = flate2::Crc::new();
        crc.update(&xz[12..12 + header_len - 4]);
        xz[12 + header_len - 4..12 + header_len].copy_from_slice(&crc.sum().to_le_bytes());
        let (_, mut r) = decompressing_reader(&xz[..]).unwrap();
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().to_lowercase().contains("memory"), "{err}");
    }

    #[test]
    fn truncated_streams_fail_instead_of_returning_short_data() {
        let zst = zstd::encode_all(&[7u8; 10_000][..], 1).unwrap();
        let (_, mut r) = decompressing_reader(&zst[..zst.len() / 2]).unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err());

        let mut lz4 = LZ4_LEGACY_MAGIC.to_vec();
        let block = lz4_flex::block::compress(&[7u8; 10_000]);
        lz4.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz4.extend_from_slice(&block[..block.len() / 2]);
        let (_, mut r) = decompressing_reader(&lz4[..]).unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
