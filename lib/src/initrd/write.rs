//! Streaming the layers to disk: the small base layer built in memory, the GPU layer compressed
//! once and teed into both the gpu file and the combined file (which starts with a copy of the
//! base), each hashed and measured as it is written.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{InitrdError, LayerFile, io_err};
use crate::archive::compress::{LayerCompression, compressing_writer};
use crate::archive::cpio::CpioWriter;
use crate::fsutil;

/// Write `base.cpio` into `dir`: its record (path relative to `dir`) and its bytes, which the
/// combined layer starts with.
pub(super) fn base_file(
    dir: &Path,
    guest_init: &[u8],
    base_extra: &[(String, Vec<u8>)],
) -> Result<(LayerFile, Vec<u8>), InitrdError> {
    let name = PathBuf::from("base.cpio");
    let bytes = base_layer(guest_init, base_extra)?;
    let base = LayerFile {
        path: name.clone(),
        size: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&bytes)),
    };
    synced(&dir.join(&name), &bytes)?;
    Ok((base, bytes))
}

/// Write `gpu.<ext>` and `combined.<ext>` (`base` then the GPU layer) into `dir`, the GPU
/// layer's entries written by `write_gpu` into a cpio stream compressed once; paths in the
/// result are relative to `dir`.
pub(super) fn gpu_files<T>(
    dir: &Path,
    compression: LayerCompression,
    base: &[u8],
    write_gpu: impl FnOnce(&mut CpioWriter<&mut dyn Write>) -> Result<T, InitrdError>,
) -> Result<(LayerFile, LayerFile, T), InitrdError> {
    let gpu_name = PathBuf::from(format!("gpu.{}", compression.suffix()));
    let combined_name = PathBuf::from(format!("combined.{}", compression.suffix()));
    let gpu_file = HashingFile::create(&dir.join(&gpu_name))?;
    let mut combined_file = HashingFile::create(&dir.join(&combined_name))?;
    combined_file
        .write_all(base)
        .map_err(io_err("writing the combined layer"))?;
    let tee = Tee {
        a: BufWriter::with_capacity(1 << 20, gpu_file),
        b: BufWriter::with_capacity(1 << 20, combined_file),
    };
    let mut encoder =
        compressing_writer(compression, tee).map_err(io_err("starting the compressor"))?;
    let mut cpio = CpioWriter::new(&mut *encoder as &mut dyn Write);
    let written = write_gpu(&mut cpio)?;
    cpio.finish()?;
    // No padding after the layer: `zstd -dc`/`gzip -dc` reject trailing zeros, and the
    // kernel needs alignment only before a plain cpio, which whoever appends one must pad.
    let tee = encoder
        .finish()
        .map_err(io_err("finishing the compressed GPU layer"))?;
    let (gpu_file, combined_file) = tee.into_inner()?;
    let gpu = gpu_file.finish(gpu_name)?;
    let combined = combined_file.finish(combined_name)?;
    Ok((gpu, combined, written))
}

/// Create `path` with `bytes`, fsynced.
pub(super) fn synced(path: &Path, bytes: &[u8]) -> Result<(), InitrdError> {
    fsutil::write_synced(path, bytes).map_err(io_err(format!("writing {}", path.display())))
}

/// The base layer: small, so built in memory.
fn base_layer(guest_init: &[u8], extra: &[(String, Vec<u8>)]) -> Result<Vec<u8>, InitrdError> {
    let mut w = CpioWriter::new(Vec::new());
    // No `lib`: the layers may be appended to a root whose `/lib` is a symlink (usrmerge).
    for dir in ["dev", "mnt", "newroot", "proc", "run", "sys", "tmp"] {
        w.directory(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    w.char_device("dev/console", 0o600, 5, 1)?;
    w.char_device("dev/null", 0o666, 1, 3)?;
    w.file("init", 0o755, guest_init.len() as u64, &mut &guest_init[..])?;
    // The disk form's mount modules (parents first: the kernel's unpacker makes none).
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _) in extra {
        let mut cur = path.as_str();
        while let Some(i) = cur.rfind('/') {
            cur = &cur[..i];
            dirs.insert(cur.to_string());
        }
    }
    for d in &dirs {
        w.directory(d, 0o755)?;
    }
    for (path, bytes) in extra {
        w.file(path, 0o644, bytes.len() as u64, &mut &bytes[..])?;
    }
    let mut bytes = w.finish()?;
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    Ok(bytes)
}

/// Writes to two writers at once.
struct Tee<A, B> {
    a: A,
    b: B,
}

impl<A: Write, B: Write> Write for Tee<A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.a.write_all(buf)?;
        self.b.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.a.flush()?;
        self.b.flush()
    }
}

impl Tee<BufWriter<HashingFile>, BufWriter<HashingFile>> {
    fn into_inner(self) -> Result<(HashingFile, HashingFile), InitrdError> {
        let a = self
            .a
            .into_inner()
            .map_err(|e| io_err("writing the GPU layer")(e.into_error()))?;
        let b = self
            .b
            .into_inner()
            .map_err(|e| io_err("writing the combined layer")(e.into_error()))?;
        Ok((a, b))
    }
}

/// A file being written, hashed and measured as it goes, its writeback started every
/// [`WRITEBACK_STEP`] bytes so that its final fsync waits for little.
struct HashingFile {
    file: File,
    path: PathBuf,
    hasher: Sha256,
    len: u64,
    /// Bytes whose writeback has been started.
    written_back: u64,
}

const WRITEBACK_STEP: u64 = 8 << 20;

impl HashingFile {
    fn create(path: &Path) -> Result<Self, InitrdError> {
        let file = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(HashingFile {
            file,
            path: path.to_path_buf(),
            hasher: Sha256::new(),
            len: 0,
            written_back: 0,
        })
    }

    fn finish(self, name: PathBuf) -> Result<LayerFile, InitrdError> {
        self.file
            .sync_all()
            .map_err(io_err(format!("syncing {}", self.path.display())))?;
        Ok(LayerFile {
            path: name,
            size: self.len,
            sha256: hex::encode(self.hasher.finalize()),
        })
    }
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        if self.len - self.written_back >= WRITEBACK_STEP {
            // Only a head start: a failure shows at the fsync in `finish`.
            let _ = fsutil::start_writeback(
                &self.file,
                self.written_back,
                self.len - self.written_back,
            );
            self.written_back = self.len;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_layer_is_deterministic_and_carries_no_gpu_bytes() {
        let a = base_layer(b"#!init", &[]).unwrap();
        assert_eq!(a, base_layer(b"#!init", &[]).unwrap());
        assert_eq!(a.len() % 4, 0);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("init") && text.contains("dev/console"));
        assert!(!text.contains("gpu"), "base layer must not mention /gpu");
    }

    #[test]
    fn extra_base_files_come_after_every_parent_directory() {
        let extra = [("gpu-disk/a/m.ko".to_string(), b"ko".to_vec())];
        let bytes = base_layer(b"#!init", &extra).unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let names: Vec<String> = crate::archive::cpio::read_initrd(file.path())
            .unwrap()
            .into_iter()
            .flat_map(|l| l.entries)
            .map(|e| e.path)
            .collect();
        let at = |n: &str| {
            names
                .iter()
                .position(|x| x == n)
                .unwrap_or_else(|| panic!("{n}: {names:?}"))
        };
        assert!(at("gpu-disk") < at("gpu-disk/a") && at("gpu-disk/a") < at("gpu-disk/a/m.ko"));
        assert!(
            !names.iter().any(|n| n == "lib"),
            "never an entry for /lib (usrmerge)"
        );
    }
}
