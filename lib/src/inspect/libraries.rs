//! The userspace driver libraries and programs: sonames, ELF machine, duplicate names.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use object::read::elf::FileHeader;

use super::{Expectations, InspectedLibrary, Problem, regular_files};

pub(super) fn inspect_driver_libs(
    expect: &Expectations,
    root: &Path,
    problems: &mut Vec<Problem>,
) -> (Vec<InspectedLibrary>, Vec<PathBuf>, Option<PathBuf>) {
    let mut libraries = Vec::new();
    let mut binaries = Vec::new();
    let version_suffix = format!(".so.{}", expect.driver_version);
    for file in regular_files(root, problems) {
        let Some(name) = file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let rel = file.strip_prefix(root).unwrap_or(&file);
        let in_bin = rel.parent().is_some_and(|p| p.ends_with("bin"));
        if name.starts_with("lib") && (name.ends_with(".so") || name.contains(".so.")) {
            let soname = match elf_facts(&file) {
                Ok((machine, soname)) => {
                    check_machine(expect, &file, machine, problems);
                    soname
                }
                Err(reason) => {
                    problems.push(Problem::Unreadable {
                        file: file.clone(),
                        reason,
                    });
                    None
                }
            };
            if !name.ends_with(&version_suffix) {
                problems.push(Problem::LibraryVersion {
                    file: file.clone(),
                    real_name: name.clone(),
                    expected: expect.driver_version.to_string(),
                });
            }
            libraries.push(InspectedLibrary {
                real_name: name,
                soname,
                source: file,
            });
        } else if in_bin && is_executable(&file) {
            // Scripts are fine; ELF executables must match the architecture.
            if let Ok((machine, _)) = elf_facts(&file) {
                check_machine(expect, &file, machine, problems);
            }
            binaries.push(file);
        }
    }
    check_library_names(&libraries, problems);
    let supported = root.join("usr/share/nvidia/supported-gpus.json");
    let supported_gpus = supported.is_file().then_some(supported);
    (libraries, binaries, supported_gpus)
}

/// Every library lands in one directory of the layer and is found by its soname: a soname must
/// be a plain file name (`../../etc/x` would be created outside it), and neither real names nor
/// sonames may repeat (one would silently replace the other).
fn check_library_names(libraries: &[InspectedLibrary], problems: &mut Vec<Problem>) {
    let mut names: BTreeMap<&str, &Path> = BTreeMap::new();
    let mut sonames: BTreeMap<&str, &Path> = BTreeMap::new();
    for lib in libraries {
        if let Some(first) = names.insert(&lib.real_name, &lib.source) {
            problems.push(Problem::DuplicateLibrary {
                name: lib.real_name.clone(),
                first: first.to_path_buf(),
                second: lib.source.clone(),
            });
        }
        let Some(soname) = lib.soname.as_deref() else {
            continue;
        };
        if soname.is_empty() || soname == "." || soname == ".." || soname.contains(['/', '\0']) {
            problems.push(Problem::BadSoname {
                file: lib.source.clone(),
                soname: soname.to_string(),
            });
            continue;
        }
        if let Some(first) = sonames.insert(soname, &lib.source) {
            problems.push(Problem::DuplicateLibrary {
                name: soname.to_string(),
                first: first.to_path_buf(),
                second: lib.source.clone(),
            });
        }
    }
}

fn check_machine(expect: &Expectations, file: &Path, machine: u16, problems: &mut Vec<Problem>) {
    let expected = expect.arch.elf_machine();
    if machine != expected {
        problems.push(Problem::WrongArch {
            file: file.to_path_buf(),
            machine,
            arch: expect.arch,
            expected,
        });
    }
}

fn is_executable(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The ELF machine and `DT_SONAME` of a file, reading only the parts needed.
pub(crate) fn elf_facts(path: &Path) -> Result<(u16, Option<String>), String> {
    let file = File::open(path).map_err(|e| format!("cannot read: {e}"))?;
    let cache = object::ReadCache::new(file);
    let data = &cache;
    let kind = object::FileKind::parse(data)
        .map_err(|e| format!("not an ELF file ({e}); check the artifact"))?;
    match kind {
        object::FileKind::Elf64 => {
            elf_facts_of::<object::elf::FileHeader64<object::Endianness>, _>(data)
        }
        object::FileKind::Elf32 => {
            elf_facts_of::<object::elf::FileHeader32<object::Endianness>, _>(data)
        }
        other => Err(format!(
            "not an ELF file (it is {other:?}); check the artifact"
        )),
    }
}

fn elf_facts_of<'d, Elf: FileHeader<Endian = object::Endianness>, R: object::ReadRef<'d>>(
    data: R,
) -> Result<(u16, Option<String>), String> {
    // Only the header, section table and dynamic section: parsing the whole object (symbol
    // tables included) costs over a second on the 86 MB libnvidia-nvvm.
    let header = Elf::parse(data).map_err(|e| format!("malformed ELF file ({e})"))?;
    let endian = header
        .endian()
        .map_err(|e| format!("malformed ELF file ({e})"))?;
    let machine = header.e_machine(endian).0;
    let table = header
        .sections(endian, data)
        .and_then(|s| s.dynamic_table(endian, data))
        .map_err(|e| format!("malformed ELF dynamic section ({e})"))?;
    let soname = table
        .iter()
        .find(|d| d.tag == object::elf::DT_SONAME)
        .and_then(|d| table.string(d).ok())
        .map(|s| String::from_utf8_lossy(s).into_owned());
    Ok((machine, soname))
}
