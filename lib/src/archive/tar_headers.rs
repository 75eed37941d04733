//! A watch on the tar stream's block structure, so extension headers are capped before the `tar`
//! crate reads them.
//!
//! The `tar` crate reads a GNU long name (`L`/`K`) or a PAX record (`x`) whole into memory before
//! handing out the entry it describes: a header claiming a 3 GiB name costs 3 GiB of RAM before
//! any check of ours could run. This reader sits between the decompressed stream and the parser,
//! follows the same header/data framing the parser does (including a PAX `size` overriding the
//! next header's), and fails the read that completes an oversized extension header, so its
//! payload is never read at all.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

/// Largest GNU long name or long link target accepted, in bytes (Linux's `PATH_MAX` is 4096).
pub const MAX_LONG_NAME_BYTES: u64 = 8 << 10;
/// Largest PAX extended header (local or global) accepted, in bytes.
pub const MAX_PAX_HEADER_BYTES: u64 = 1 << 20;

const BLOCK: usize = 512;

/// Which extension header went over its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExtensionKind {
    /// GNU `L` or `K`.
    LongName,
    /// PAX `x` or `g`.
    Pax,
}

impl ExtensionKind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            ExtensionKind::LongName => "GNU long name",
            ExtensionKind::Pax => "PAX extended",
        }
    }

    pub(crate) fn cap(self) -> u64 {
        match self {
            ExtensionKind::LongName => MAX_LONG_NAME_BYTES,
            ExtensionKind::Pax => MAX_PAX_HEADER_BYTES,
        }
    }
}

/// An oversized extension header seen in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversized {
    pub(crate) kind: ExtensionKind,
    pub(crate) size: u64,
    /// The header's own name field (`././@LongLink`, `PaxHeaders.N/<file>`), NUL-padded.
    pub(crate) name: [u8; 100],
    /// Where the header starts in the uncompressed tar stream.
    pub(crate) offset: u64,
}

impl Oversized {
    /// The header's name, for messages.
    pub(crate) fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Passes bytes through unchanged while tracking headers; see the module documentation.
pub(crate) struct HeaderGuard<R> {
    inner: R,
    found: Rc<Cell<Option<Oversized>>>,
    header: [u8; BLOCK],
    header_len: usize,
    /// Data (with padding) of the current entry still to pass.
    data_left: u64,
    /// The PAX record being collected (its size is capped, so this is bounded).
    pax: Option<Vec<u8>>,
    pax_left: u64,
    /// A PAX `size` record that overrides the next ordinary header's size, as the parser does.
    pending_size: Option<u64>,
    /// Bytes of the stream observed so far.
    pos: u64,
    /// Past the end of the archive, or at a point the parser refuses anyway (sparse entries,
    /// unreadable sizes): nothing more to watch.
    done: bool,
}

impl<R: Read> HeaderGuard<R> {
    pub(crate) fn new(inner: R, found: Rc<Cell<Option<Oversized>>>) -> Self {
        HeaderGuard {
            inner,
            found,
            header: [0; BLOCK],
            header_len: 0,
            data_left: 0,
            pax: None,
            pax_left: 0,
            pending_size: None,
            pos: 0,
            done: false,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> Result<(), Oversized> {
        while !bytes.is_empty() && !self.done {
            if self.data_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.data_left).unwrap_or(usize::MAX));
                if let Some(pax) = self.pax.as_mut() {
                    let take = n.min(usize::try_from(self.pax_left).unwrap_or(usize::MAX));
                    pax.extend_from_slice(&bytes[..take]);
                    self.pax_left -= take as u64;
                }
                self.data_left -= n as u64;
                self.pos += n as u64;
                bytes = &bytes[n..];
                if self.data_left == 0
                    && let Some(pax) = self.pax.take()
                {
                    self.pending_size = pax_size(&pax);
                }
                continue;
            }
            let n = bytes.len().min(BLOCK - self.header_len);
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            self.pos += n as u64;
            bytes = &bytes[n..];
            if self.header_len == BLOCK {
                self.header_len = 0;
                self.on_header()?;
            }
        }
        Ok(())
    }

    fn on_header(&mut self) -> Result<(), Oversized> {
        if self.header.iter().all(|b| *b == 0) {
            // The parser stops at the first zero block.
            self.done = true;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&self.header);
        let kind = header.entry_type();
        let Ok(mut size) = header.entry_size() else {
            self.done = true;
            return Ok(());
        };
        let extension = if kind.is_gnu_longname() || kind.is_gnu_longlink() {
            Some(ExtensionKind::LongName)
        } else if kind.is_pax_local_extensions() || kind.is_pax_global_extensions() {
            Some(ExtensionKind::Pax)
        } else {
            None
        };
        match extension {
            Some(ext) if size > ext.cap() => {
                let mut name = [0u8; 100];
                name.copy_from_slice(&self.header[..100]);
                return Err(Oversized {
                    kind: ext,
                    size,
                    name,
                    offset: self.pos - BLOCK as u64,
                });
            }
            Some(_) => {}
            None => {
                if let Some(pax) = self.pending_size.take() {
                    size = pax;
                }
            }
        }
        if kind.is_gnu_sparse() {
            // Refused by the walker as soon as the parser yields it; its extension blocks
            // break the plain framing, so stop watching here.
            self.done = true;
            return Ok(());
        }
        if kind.is_pax_local_extensions() {
            self.pax = Some(Vec::with_capacity(size as usize));
            self.pax_left = size;
        }
        let Some(padded) = size.checked_add(BLOCK as u64 - 1) else {
            self.done = true;
            return Ok(());
        };
        self.data_left = padded & !(BLOCK as u64 - 1);
        if self.data_left == 0
            && let Some(pax) = self.pax.take()
        {
            self.pending_size = pax_size(&pax);
        }
        Ok(())
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

/// The `size` record of a PAX header, read the way the parser reads it.
fn pax_size(records: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(records) {
        let record = record.ok()?;
        if record.key() == Ok("size") {
            return record.value().ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(found) = self.found.get() {
            return Err(oversized_error(found));
        }
        let n = self.inner.read(buf)?;
        if let Err(found) = self.observe(&buf[..n]) {
            self.found.set(Some(found));
            return Err(oversized_error(found));
        }
        Ok(n)
    }
}

fn oversized_error(found: Oversized) -> io::Error {
    io::Error::other(format!(
        "the {} header {:?} at byte {} claims {} bytes, over the cap of {} bytes",
        found.kind.describe(),
        found.name(),
        found.offset,
        found.size,
        found.kind.cap()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, size: u64) -> [u8; BLOCK] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_path("././@LongLink").unwrap();
        h.set_size(size);
        h.set_cksum();
        *h.as_bytes()
    }

    #[test]
    fn oversized_long_name_fails_on_its_header_block() {
        let found = Rc::new(Cell::new(None));
        let bytes = header(b'L', 3 << 30);
        let mut guard = HeaderGuard::new(&bytes[..], Rc::clone(&found));
        let mut buf = [0u8; BLOCK];
        assert!(guard.read(&mut buf).is_err());
        let got = found.get().unwrap();
        assert_eq!(
            (got.kind, got.size, got.offset, got.name().as_str()),
            (ExtensionKind::LongName, 3 << 30, 0, "@LongLink")
        );
    }

    #[test]
    fn pax_size_overrides_next_header_framing() {
        // A PAX header says the next entry holds 1024 bytes though its header says 0; the
        // 1024 bytes must be passed as data, not taken for a header (here: an oversized `L`).
        let record = b"16 size=0001024\n";
        let mut stream = Vec::new();
        stream.extend_from_slice(&header(b'x', record.len() as u64));
        let mut block = [0u8; BLOCK];
        block[..record.len()].copy_from_slice(record);
        stream.extend_from_slice(&block);
        stream.extend_from_slice(&header(b'0', 0));
        stream.extend_from_slice(&header(b'L', 3 << 30));
        stream.extend_from_slice(&[0u8; BLOCK]);
        let found = Rc::new(Cell::new(None));
        let mut guard = HeaderGuard::new(&stream[..], Rc::clone(&found));
        io::copy(&mut guard, &mut io::sink()).unwrap();
        assert_eq!(found.get(), None);
    }
}
