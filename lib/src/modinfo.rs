//! `modinfo`: kernel module metadata from a `.ko`'s ELF `.modinfo` section.
//!
//! The section is a sequence of NUL-terminated `key=value` strings; keys repeat (`firmware=`,
//! `alias=`, `parm=`), values are kept byte for byte (including `vermagic`'s trailing space).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use object::ReadRef;
use object::read::elf::{FileHeader, SectionHeader};

use crate::archive::ArchiveError;
use crate::archive::decompress::{Compression, decompressing_reader_named};
use crate::outcome::{Classify, Outcome};

/// Largest decompressed module accepted (the biggest real module, `nvidia.ko` with debug info,
/// is under 200 MB).
const MAX_MODULE_BYTES: u64 = 1 << 30;

/// Why a module's metadata could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModinfoError {
    /// The file could not be opened, read or decompressed.
    #[error(
        "cannot read kernel module {file}: {source}; check the file, or fetch the artifact again"
    )]
    Io {
        /// The module file.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A compressed module could not be decompressed.
    #[error("cannot decompress kernel module {file}; fetch the artifact again")]
    Decompress {
        /// The module file.
        file: PathBuf,
        /// The decompressor's error.
        #[source]
        source: ArchiveError,
    },
    /// The (decompressed) bytes are not an ELF object.
    #[error(
        "{file} is not a kernel module (ELF object); check that the artifact holds built .ko files"
    )]
    NotElf {
        /// The module file.
        file: PathBuf,
        /// What the ELF parser said.
        #[source]
        source: object::read::Error,
    },
    /// The bytes are an object file of another format.
    #[error(
        "{file} is a {format:?} object, not a kernel module (ELF); check that the artifact holds built .ko files"
    )]
    OtherFormat {
        /// The module file.
        file: PathBuf,
        /// The format found.
        format: object::FileKind,
    },
    /// The `.modinfo` section is there but its bytes cannot be read.
    #[error("{file}: the .modinfo section cannot be read; check that the file is a whole module")]
    ModinfoUnreadable {
        /// The module file.
        file: PathBuf,
        /// What the ELF parser said.
        #[source]
        source: object::read::Error,
    },
    /// The ELF object has no `.modinfo` section.
    #[error(
        "{file} has no .modinfo section, so it is not a loadable kernel module; rebuild it with the kernel's build system (make modules)"
    )]
    NoModinfo {
        /// The module file.
        file: PathBuf,
    },
    /// The decompressed module exceeds the size cap.
    #[error("kernel module {file} decompresses to more than {limit} bytes; check the artifact")]
    TooLarge {
        /// The module file.
        file: PathBuf,
        /// The cap in bytes.
        limit: u64,
    },
}

impl Classify for ModinfoError {
    fn outcome(&self) -> Outcome {
        match self {
            ModinfoError::Io { .. }
            | ModinfoError::Decompress { .. }
            | ModinfoError::NotElf { .. }
            | ModinfoError::OtherFormat { .. }
            | ModinfoError::ModinfoUnreadable { .. }
            | ModinfoError::NoModinfo { .. }
            | ModinfoError::TooLarge { .. } => Outcome::Failed,
        }
    }
}

/// A module's bytes as the kernel's `finit_module` without flags wants them: decompressed
/// (`.ko.xz`, `.ko.zst`, `.ko.gz`, recognised by magic bytes), at most 1 GiB.
pub(crate) fn decompressed_module(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let (_, reader) =
        decompressing_reader_named(BufReader::new(file), path).map_err(std::io::Error::other)?;
    let mut bytes = Vec::new();
    reader.take(MAX_MODULE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_MODULE_BYTES {
        return Err(std::io::Error::other(format!(
            "the decompressed module exceeds {MAX_MODULE_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

/// A kernel module's `.modinfo` entries and ELF machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModInfo {
    entries: Vec<(String, String)>,
    machine: u16,
}

impl ModInfo {
    /// Parse a plain (uncompressed) ELF `.ko`.
    pub fn parse(elf_bytes: &[u8]) -> Result<ModInfo, ModinfoError> {
        parse_elf(elf_bytes, Path::new("<bytes>"))
    }

    /// Read a `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz` (compression recognised by magic bytes).
    /// Plain modules are read piecewise, so only the headers and `.modinfo` are loaded.
    pub fn from_path(path: &Path) -> Result<ModInfo, ModinfoError> {
        let io_error = |source| ModinfoError::Io {
            file: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        let mut magic = [0u8; 6];
        let got = read_prefix(&file, &mut magic).map_err(io_error)?;
        match Compression::detect(&magic[..got]) {
            Compression::None => {
                let cache = object::ReadCache::new(file);
                parse_elf(&cache, path)
            }
            _ => {
                let file = File::open(path).map_err(io_error)?;
                let (_, reader) =
                    decompressing_reader_named(BufReader::new(file), path).map_err(|source| {
                        ModinfoError::Decompress {
                            file: path.to_path_buf(),
                            source,
                        }
                    })?;
                let mut bytes = Vec::new();
                reader
                    .take(MAX_MODULE_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(io_error)?;
                if bytes.len() as u64 > MAX_MODULE_BYTES {
                    return Err(ModinfoError::TooLarge {
                        file: path.to_path_buf(),
                        limit: MAX_MODULE_BYTES,
                    });
                }
                parse_elf(&bytes[..], path)
            }
        }
    }

    /// Parse the raw contents of a `.modinfo` section (for tests and tools that extracted it).
    pub fn from_section(section: &[u8], elf_machine: u16) -> ModInfo {
        let entries = section
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                let text = String::from_utf8_lossy(s);
                let (key, value) = text.split_once('=')?;
                Some((key.to_string(), value.to_string()))
            })
            .collect();
        ModInfo {
            entries,
            machine: elf_machine,
        }
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in section order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every `(key, value)` pair, in section order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `name=`: the module name as the kernel knows it (underscores, e.g. `nvidia_uvm`).
    pub fn name(&self) -> Option<&str> {
        self.get("name")
    }

    /// `version=`: the module's own version (the driver version for NVIDIA modules).
    pub fn version(&self) -> Option<&str> {
        self.get("version")
    }

    /// `vermagic=`, the full string with its trailing space.
    pub fn vermagic(&self) -> Option<&str> {
        self.get("vermagic")
    }

    /// The kernel release the module was built for: the first word of `vermagic`.
    pub fn vermagic_release(&self) -> Option<&str> {
        self.vermagic()?.split_whitespace().next()
    }

    /// `depends=` split on commas, empty entries dropped, names as written (dashes or
    /// underscores).
    pub fn depends(&self) -> Vec<String> {
        self.all("depends")
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Every `firmware=` path, relative to the firmware directory (`/lib/firmware`).
    pub fn firmware(&self) -> Vec<String> {
        self.all("firmware").iter().map(|s| s.to_string()).collect()
    }

    /// The ELF `e_machine` (62 for x86_64, 183 for aarch64).
    pub fn elf_machine(&self) -> u16 {
        self.machine
    }
}

/// The one module-name rule, shared with the guest init (see the guest-contract crate).
pub use gpu_passthrough_guest_contract::normalize_module_name;

fn read_prefix(mut file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

fn parse_elf<'d, R: ReadRef<'d>>(data: R, file: &Path) -> Result<ModInfo, ModinfoError> {
    let not_elf = |source| ModinfoError::NotElf {
        file: file.to_path_buf(),
        source,
    };
    let kind = object::FileKind::parse(data).map_err(not_elf)?;
    let (section, machine) = match kind {
        object::FileKind::Elf32 => {
            modinfo_section::<object::elf::FileHeader32<object::Endianness>, R>(data, file)?
        }
        object::FileKind::Elf64 => {
            modinfo_section::<object::elf::FileHeader64<object::Endianness>, R>(data, file)?
        }
        format => {
            return Err(ModinfoError::OtherFormat {
                file: file.to_path_buf(),
                format,
            });
        }
    };
    Ok(ModInfo::from_section(section, machine))
}

/// The `.modinfo` bytes and the ELF machine. Reads only the header and the section table:
/// parsing the whole object (symbol tables included) costs seconds on an 11 MB `nvidia.ko`.
fn modinfo_section<'d, Elf: FileHeader<Endian = object::Endianness>, R: ReadRef<'d>>(
    data: R,
    file: &Path,
) -> Result<(&'d [u8], u16), ModinfoError> {
    let not_elf = |source| ModinfoError::NotElf {
        file: file.to_path_buf(),
        source,
    };
    let header = Elf::parse(data).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    let machine = header.e_machine(endian).0;
    let sections = header.sections(endian, data).map_err(not_elf)?;
    let (_, section) = sections
        .section_by_name(endian, b".modinfo")
        .ok_or_else(|| ModinfoError::NoModinfo {
            file: file.to_path_buf(),
        })?;
    let bytes = section
        .data(endian, data)
        .map_err(|source| ModinfoError::ModinfoUnreadable {
            file: file.to_path_buf(),
            source,
        })?;
    Ok((bytes, machine))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_parsing_keeps_repeats_order_and_trailing_space() {
        let section = b"license=GPL\0firmware=a.bin\0\0\0firmware=b.bin\0depends=drm,,nvidia-modeset\0vermagic=6.1.0-56-amd64 SMP preempt \0junk\0parm=x:long text = with equals\0";
        let info = ModInfo::from_section(section, 62);
        assert_eq!(info.firmware(), vec!["a.bin", "b.bin"]);
        assert_eq!(info.depends(), vec!["drm", "nvidia-modeset"]);
        assert_eq!(info.vermagic(), Some("6.1.0-56-amd64 SMP preempt "));
        assert_eq!(info.vermagic_release(), Some("6.1.0-56-amd64"));
        assert_eq!(info.get("parm"), Some("x:long text = with equals"));
        assert_eq!(info.name(), None);
        assert_eq!(info.elf_machine(), 62);
    }

    #[test]
    fn garbage_is_not_elf() {
        assert!(matches!(
            ModInfo::parse(b"definitely not an ELF file"),
            Err(ModinfoError::NotElf { .. })
        ));
    }
}
