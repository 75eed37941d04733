//! The kernel's build tree, from the unpacked kernel-headers archives: where it is (the paths the
//! sandbox shows it at), which kernel it is for, and what its `.config` says about the compiler
//! and module signing.

use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::outcome::{Classify, Outcome};

/// How deep below an archive's root a build tree is looked for (`usr/src/linux-headers-K`).
const SEARCH_DEPTH: usize = 4;

/// The kernel's build tree as the sandbox shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildTree {
    /// The build (output) tree, NVIDIA's `SYSOUT`: it has `.config` and `Module.symvers`.
    pub sysout: PathBuf,
    /// The source tree, NVIDIA's `SYSSRC` (Debian's `-common` tree; else the build tree).
    pub syssrc: PathBuf,
    /// The kernel release (`UTS_RELEASE`), what `uname -r` says on that kernel.
    pub release: String,
    /// What the `.config` says.
    pub config: KernelConfig,
}

/// The `.config` settings a module build depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// `CONFIG_CC_VERSION_TEXT`: the compiler that built the kernel.
    pub cc_version_text: Option<String>,
    /// `CONFIG_MODULE_SIG=y`.
    pub module_sig: bool,
    /// `CONFIG_MODULE_SIG_FORCE=y`: unsigned modules are refused.
    pub module_sig_force: bool,
    /// `CONFIG_MODULE_SIG_HASH` (`sha256`).
    pub module_sig_hash: Option<String>,
}

impl KernelConfig {
    /// Parse a kernel `.config`.
    pub fn parse(text: &str) -> KernelConfig {
        let mut c = KernelConfig::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let unquoted = || value.trim().trim_matches('"').to_string();
            match key.trim() {
                "CONFIG_CC_VERSION_TEXT" => c.cc_version_text = Some(unquoted()),
                "CONFIG_MODULE_SIG" => c.module_sig = value.trim() == "y",
                "CONFIG_MODULE_SIG_FORCE" => c.module_sig_force = value.trim() == "y",
                "CONFIG_MODULE_SIG_HASH" => c.module_sig_hash = Some(unquoted()),
                _ => {}
            }
        }
        c
    }
}

/// Why the headers cannot make a build tree.
#[derive(Debug, thiserror::Error)]
pub enum HeadersError {
    /// No archive holds a build tree.
    #[error(
        "no kernel-headers archive holds a kernel build tree (a directory with .config and \
         include/generated/utsrelease.h); pass the kernel's headers (Debian: \
         linux-headers-KVER, linux-headers-KVER-common and linux-kbuild-X)"
    )]
    NoBuildTree,
    /// Several archives hold one.
    #[error(
        "the kernel-headers archives hold several build trees ({0}); pass the headers of one kernel"
    )]
    SeveralBuildTrees(String),
    /// The headers are another kernel's.
    #[error(
        "the kernel-headers are for kernel {found}, not --kernel-version {wanted}; pass the \
         headers of {wanted} (Debian: linux-headers-{wanted})"
    )]
    WrongKernel {
        /// The headers' release.
        found: String,
        /// The release asked for.
        wanted: String,
    },
    /// The build tree needs a path none of the archives has.
    #[error(
        "the build tree {tree} needs {needed}, which no kernel-headers archive holds; add the \
         archive that has it{hint}"
    )]
    Incomplete {
        /// The build tree.
        tree: PathBuf,
        /// The missing path.
        needed: PathBuf,
        /// Which package it likely is.
        hint: String,
    },
    /// A file of the tree could not be read.
    #[error("cannot read {path} of the kernel-headers")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Headers that do not make the asked kernel's build tree are refused before compiling.
impl Classify for HeadersError {
    fn outcome(&self) -> Outcome {
        match self {
            HeadersError::NoBuildTree
            | HeadersError::SeveralBuildTrees(_)
            | HeadersError::WrongKernel { .. }
            | HeadersError::Incomplete { .. } => Outcome::Refused,
            HeadersError::Read { .. } => Outcome::Failed,
        }
    }
}

/// Find the build tree among `roots` (each an unpacked archive whose paths are absolute paths),
/// check it is `kernel_version`'s and that everything it refers to is there.
pub fn locate(roots: &[PathBuf], kernel_version: &str) -> Result<BuildTree, HeadersError> {
    let mut found = Vec::new();
    for root in roots {
        find_trees(root, Path::new(""), 0, &mut found);
    }
    let (root, rel) = match found.as_slice() {
        [] => return Err(HeadersError::NoBuildTree),
        [one] => one.clone(),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|(_, r)| format!("/{}", r.display()))
                .collect();
            return Err(HeadersError::SeveralBuildTrees(names.join(", ")));
        }
    };
    let dir = root.join(&rel);
    let read = |path: PathBuf| {
        fs::read_to_string(&path).map_err(|source| HeadersError::Read { path, source })
    };
    let uts = read(dir.join("include/generated/utsrelease.h"))?;
    let release = uts
        .split('"')
        .nth(1)
        .map(str::to_string)
        .unwrap_or_default();
    if release != kernel_version {
        return Err(HeadersError::WrongKernel {
            found: release,
            wanted: kernel_version.to_string(),
        });
    }
    let config = KernelConfig::parse(&read(dir.join(".config"))?);
    let sysout = Path::new("/").join(&rel);
    // Debian's build tree's Makefile is one line, `include /usr/src/linux-headers-K-common/Makefile`:
    // that tree is the kernel source NVIDIA's Makefile wants as SYSSRC.
    let makefile = fs::read_to_string(dir.join("Makefile")).unwrap_or_default();
    let syssrc = makefile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("include "))
        .map(|p| Path::new(p.trim()))
        .find(|p| p.is_absolute() && p.ends_with("Makefile"))
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| sysout.clone());
    let tree = BuildTree {
        sysout,
        syssrc,
        release,
        config,
    };
    check_complete(roots, &root, &rel, &tree)?;
    Ok(tree)
}

/// Everything the build tree points at must come from the archives: the source tree and the
/// targets of its `scripts`/`tools` links (Debian's linux-kbuild).
fn check_complete(
    roots: &[PathBuf],
    root: &Path,
    rel: &Path,
    tree: &BuildTree,
) -> Result<(), HeadersError> {
    let in_some_root = |inside: &Path| {
        let rel = inside.strip_prefix("/").unwrap_or(inside);
        roots.iter().any(|r| r.join(rel).exists())
    };
    if !in_some_root(&tree.syssrc.join("Makefile")) {
        return Err(HeadersError::Incomplete {
            tree: tree.sysout.clone(),
            needed: tree.syssrc.clone(),
            hint: format!(
                " (Debian: {})",
                tree.syssrc
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
        });
    }
    for link in ["scripts", "tools"] {
        let Ok(target) = fs::read_link(root.join(rel).join(link)) else {
            continue;
        };
        let inside = lexical_join(&tree.sysout, &target);
        if !in_some_root(&inside) {
            let package = inside
                .components()
                .find_map(|c| match c {
                    Component::Normal(n) if n.to_string_lossy().starts_with("linux-kbuild") => {
                        Some(n.to_string_lossy().into_owned())
                    }
                    _ => None,
                })
                .map(|p| format!(" (Debian: {p})"))
                .unwrap_or_default();
            return Err(HeadersError::Incomplete {
                tree: tree.sysout.clone(),
                needed: inside,
                hint: package,
            });
        }
    }
    Ok(())
}

/// `base` joined with a relative `target`, `..` resolved lexically.
fn lexical_join(base: &Path, target: &Path) -> PathBuf {
    let mut out = base.to_path_buf();
    for c in target.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir => out = PathBuf::from("/"),
            _ => {}
        }
    }
    out
}

fn find_trees(root: &Path, rel: &Path, depth: usize, found: &mut Vec<(PathBuf, PathBuf)>) {
    let dir = root.join(rel);
    if dir.join(".config").is_file() && dir.join("include/generated/utsrelease.h").is_file() {
        found.push((root.to_path_buf(), rel.to_path_buf()));
        return;
    }
    if depth >= SEARCH_DEPTH {
        return;
    }
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    let mut names: Vec<_> = entries.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    for entry in names {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_trees(root, &rel.join(entry.file_name()), depth + 1, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_settings_a_build_needs_are_read() {
        let c = KernelConfig::parse(
            "CONFIG_CC_VERSION_TEXT=\"gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0\"\n\
             CONFIG_MODULE_SIG=y\n# CONFIG_MODULE_SIG_FORCE is not set\n\
             CONFIG_MODULE_SIG_HASH=\"sha256\"\n",
        );
        assert_eq!(
            c.cc_version_text.as_deref(),
            Some("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0")
        );
        assert!(c.module_sig && !c.module_sig_force);
        assert_eq!(c.module_sig_hash.as_deref(), Some("sha256"));
        assert!(KernelConfig::parse("CONFIG_MODULE_SIG_FORCE=y\n").module_sig_force);
    }

    #[test]
    fn links_resolve_lexically() {
        assert_eq!(
            lexical_join(
                Path::new("/usr/src/linux-headers-6.1.0-56-amd64"),
                Path::new("../../lib/linux-kbuild-6.1/scripts")
            ),
            Path::new("/usr/lib/linux-kbuild-6.1/scripts")
        );
    }
}
