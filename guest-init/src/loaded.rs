//! A module loader that never loads: for a guest or host whose driver is already up (another init
//! loaded it, or the check kit runs next to a live driver). A module counts as loaded when
//! `/sys/module/<name>` exists; any other module fails with `EPERM` instead of being loaded.

use crate::modules::{LoadError, ModuleLoader};
use nix::errno::Errno;
use std::path::{Path, PathBuf};

/// Reports modules present in `<sys_root>/module/` as already loaded; refuses the rest.
#[derive(Debug, Clone)]
pub struct AlreadyLoaded {
    /// sysfs mount, normally `/sys`.
    pub sys_root: PathBuf,
}

/// The kernel's name of a module file: `nvidia-uvm.ko.xz` → `nvidia_uvm`.
pub fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.split(".ko").next().filter(|s| !s.is_empty())?;
    Some(stem.replace('-', "_"))
}

impl ModuleLoader for AlreadyLoaded {
    fn load(&self, path: &Path, _params: &str) -> Result<(), LoadError> {
        match module_name(path) {
            // EEXIST is what finit_module says for a loaded module: reported `already_loaded`.
            Some(name) if self.sys_root.join("module").join(&name).is_dir() => {
                Err(LoadError::Kernel(Errno::EEXIST))
            }
            _ => Err(LoadError::Kernel(Errno::EPERM)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_modules_are_already_loaded_and_others_are_never_loaded() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("module/nvidia_uvm")).unwrap();
        let loader = AlreadyLoaded {
            sys_root: sys.path().to_path_buf(),
        };
        let err = loader
            .load(Path::new("/gpu/modules/nvidia-uvm.ko"), "")
            .unwrap_err();
        assert!(matches!(err, LoadError::Kernel(Errno::EEXIST)), "{err}");
        let err = loader
            .load(Path::new("/gpu/modules/nvidia-peermem.ko.xz"), "")
            .unwrap_err();
        assert!(matches!(err, LoadError::Kernel(Errno::EPERM)), "{err}");
        assert_eq!(
            module_name(Path::new("nvidia-modeset.ko.zst")).as_deref(),
            Some("nvidia_modeset")
        );
        assert_eq!(module_name(Path::new(".ko")), None);
    }
}
