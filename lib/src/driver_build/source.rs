//! NVIDIA's kernel module source, from an unpacked source archive: which directory it is, its
//! driver version and its flavor, read from the files themselves.
//!
//! The directory has `Kbuild` and `nvidia/nv-frontend.c`: `kernel-open/` of the
//! open-gpu-kernel-modules tarball, `kernel/` or `kernel-open/` of an extracted `.run`,
//! `usr/src/nvidia-current[-open]-V/` of Debian's dkms packages. The version is the `Kbuild`'s
//! `NV_VERSION_STRING`; the flavor is `nvidia`'s `MODULE_LICENSE` (`Dual MIT/GPL`: open,
//! `NVIDIA`: proprietary), the same field `inspect` tells built modules apart by.

use std::fs;
use std::path::{Path, PathBuf};

use crate::outcome::{Classify, Outcome};
use crate::registry::ModuleFlavor;

/// How deep below the archive's root the source is looked for.
const SEARCH_DEPTH: usize = 5;

/// One module source tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSource {
    /// Its directory (host path).
    pub dir: PathBuf,
    /// The driver version it builds.
    pub version: String,
    /// Open or proprietary.
    pub flavor: ModuleFlavor,
}

/// Why the source cannot be built as asked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No directory looks like NVIDIA's module source.
    #[error(
        "the nvidia-kernel-source archive holds no NVIDIA kernel module source (a directory with \
         Kbuild and nvidia/nv-frontend.c); pass kernel-open/ of the open-gpu-kernel-modules \
         release, the kernel/ of an extracted .run, or Debian's nvidia-open-kernel-dkms / \
         nvidia-kernel-dkms"
    )]
    NotFound,
    /// Its files do not say its version or flavor.
    #[error("the module source {dir} does not say its {what}; pass an unmodified NVIDIA source")]
    Unreadable {
        /// The directory.
        dir: PathBuf,
        /// `driver version` or `flavor`.
        what: &'static str,
    },
    /// It is another driver version.
    #[error(
        "the nvidia-kernel-source is driver {found}, not --driver-version {wanted}; pass the \
         {wanted} source or --driver-version {found}"
    )]
    WrongVersion {
        /// The source's version.
        found: String,
        /// The version asked for.
        wanted: String,
    },
    /// It is the other flavor.
    #[error(
        "the nvidia-kernel-source is the {found} module source, not --flavor {wanted}; pass \
         --flavor {found} or the {wanted} source"
    )]
    WrongFlavor {
        /// The source's flavor.
        found: ModuleFlavor,
        /// The flavor asked for.
        wanted: ModuleFlavor,
    },
}

/// A source that is not the one asked for is refused before compiling.
impl Classify for SourceError {
    fn outcome(&self) -> Outcome {
        match self {
            SourceError::NotFound
            | SourceError::WrongVersion { .. }
            | SourceError::WrongFlavor { .. } => Outcome::Refused,
            SourceError::Unreadable { .. } => Outcome::Failed,
        }
    }
}

/// Find the module source of `flavor` under `root` and check it is `driver_version`'s.
pub fn locate(
    root: &Path,
    driver_version: &str,
    flavor: ModuleFlavor,
) -> Result<ModuleSource, SourceError> {
    let mut dirs = Vec::new();
    find_dirs(root, 0, &mut dirs);
    let mut sources = Vec::new();
    for dir in dirs {
        sources.push(read(&dir)?);
    }
    // A .run has both trees: the flavor asked for picks one.
    let Some(first) = sources.first().cloned() else {
        return Err(SourceError::NotFound);
    };
    let source =
        sources
            .into_iter()
            .find(|s| s.flavor == flavor)
            .ok_or(SourceError::WrongFlavor {
                found: first.flavor,
                wanted: flavor,
            })?;
    if source.version != driver_version {
        return Err(SourceError::WrongVersion {
            found: source.version,
            wanted: driver_version.to_string(),
        });
    }
    Ok(source)
}

fn read(dir: &Path) -> Result<ModuleSource, SourceError> {
    let unreadable = |what| SourceError::Unreadable {
        dir: dir.to_path_buf(),
        what,
    };
    let kbuild = fs::read_to_string(dir.join("Kbuild")).unwrap_or_default();
    let version = kbuild
        .lines()
        .find_map(|l| {
            let rest = &l[l.find("NV_VERSION_STRING=")? + "NV_VERSION_STRING=".len()..];
            let v: String = rest
                .trim_start_matches(['\\', '"'])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.')
                .collect();
            (!v.is_empty()).then_some(v)
        })
        .ok_or_else(|| unreadable("driver version (Kbuild's NV_VERSION_STRING)"))?;
    let frontend = fs::read_to_string(dir.join("nvidia/nv-frontend.c")).unwrap_or_default();
    let license = frontend
        .lines()
        .find_map(|l| l.trim().strip_prefix("MODULE_LICENSE(\""))
        .and_then(|rest| rest.split('"').next())
        .ok_or_else(|| unreadable("flavor (nvidia/nv-frontend.c's MODULE_LICENSE)"))?;
    let flavor = if license == crate::inspect::PROPRIETARY_LICENSE {
        ModuleFlavor::Proprietary
    } else {
        ModuleFlavor::Open
    };
    Ok(ModuleSource {
        dir: dir.to_path_buf(),
        version,
        flavor,
    })
}

fn find_dirs(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    if dir.join("Kbuild").is_file() && dir.join("nvidia/nv-frontend.c").is_file() {
        found.push(dir.to_path_buf());
        return;
    }
    if depth >= SEARCH_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        // Symlinked directories are not followed: the archive reader kept them inside the tree,
        // but a source is a real directory.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_dirs(&entry.path(), depth + 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, dir: &str, version: &str, license: &str) {
        let d = root.join(dir);
        fs::create_dir_all(d.join("nvidia")).unwrap();
        fs::write(
            d.join("Kbuild"),
            format!("ccflags-y += -DNV_VERSION_STRING=\\\"{version}\\\"\n"),
        )
        .unwrap();
        fs::write(
            d.join("nvidia/nv-frontend.c"),
            format!("MODULE_LICENSE(\"{license}\");\n"),
        )
        .unwrap();
    }

    #[test]
    fn a_run_with_both_trees_gives_the_flavor_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), "NVIDIA-Linux/kernel", "550.1", "NVIDIA");
        tree(
            dir.path(),
            "NVIDIA-Linux/kernel-open",
            "550.1",
            "Dual MIT/GPL",
        );
        let open = locate(dir.path(), "550.1", ModuleFlavor::Open).unwrap();
        assert!(open.dir.ends_with("kernel-open"));
        let closed = locate(dir.path(), "550.1", ModuleFlavor::Proprietary).unwrap();
        assert!(closed.dir.ends_with("kernel"));
        let err = locate(dir.path(), "535.1", ModuleFlavor::Open).unwrap_err();
        assert!(matches!(err, SourceError::WrongVersion { .. }), "{err}");
    }

    #[test]
    fn a_tree_that_does_not_say_its_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        tree(dir.path(), "src", "", "Dual MIT/GPL");
        let err = locate(dir.path(), "535.1", ModuleFlavor::Open).unwrap_err();
        assert!(err.to_string().contains("NV_VERSION_STRING"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            locate(empty.path(), "535.1", ModuleFlavor::Open),
            Err(SourceError::NotFound)
        ));
    }
}
