//! Which VFIO driver a device binds to: the VFIO variant driver the running kernel's
//! `modules.alias` offers for it (e.g. `nvgrace_gpu_vfio_pci` for Grace GPUs, `mlx5_vfio_pci`
//! for ConnectX VFs), chosen the way libvirt chooses (`virPCIDeviceFindBestVFIOVariant`): of
//! the `alias vfio_pci:…` lines whose pattern matches the device's `modalias`, the one with the
//! fewest wildcards; none matching means plain `vfio-pci`.
//!
//! A module's name is not the name its driver registers under `bus/pci/drivers` (the module
//! `nvgrace_gpu_vfio_pci` registers `nvgrace-gpu-vfio-pci`): [`registered_driver`] finds the
//! registered name once the module is loaded.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The plain VFIO driver, when no variant matches.
pub const VFIO_PCI: &str = "vfio-pci";

/// The plain VFIO driver's module.
pub const VFIO_PCI_MODULE: &str = "vfio_pci";

/// Why a device goes to the VFIO driver it is planned on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverSource {
    /// No `vfio_pci:` alias matches the device: plain vfio-pci.
    Default,
    /// The running kernel's `modules.alias` names a variant driver for it.
    ModulesAlias,
    /// The caller named the driver (`--vfio-driver`).
    Override,
    /// It is on this VFIO driver already, with no owner: adopted as it is.
    Adopted,
}

/// The VFIO driver a device is planned on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioDriver {
    /// The module that provides it (`vfio_pci`, or a variant such as `nvgrace_gpu_vfio_pci`);
    /// for an override, the name as given.
    pub module: String,
    /// The name it registers under `bus/pci/drivers` (`nvgrace-gpu-vfio-pci`): `None` while
    /// the module is not loaded (attach loads it, then finds the name).
    pub driver: Option<String>,
    /// Why this one.
    pub source: DriverSource,
}

impl VfioDriver {
    /// Plain vfio-pci.
    pub fn vfio_pci() -> VfioDriver {
        VfioDriver {
            module: VFIO_PCI_MODULE.into(),
            driver: Some(VFIO_PCI.into()),
            source: DriverSource::Default,
        }
    }
}

/// The name `module` (or a driver name given for it) registered under `bus/pci/drivers`: the
/// driver whose `module` link names it ([`registered_driver`], with `-` and `_` alike as
/// modprobe takes them), or else a driver directory of exactly the given name or the module
/// name with `_` as `-` (vfio-pci's own). `None`: not loaded.
pub fn loaded_driver(sysfs_root: &Path, name: &str) -> Option<String> {
    let module = name.replace('-', "_");
    registered_driver(sysfs_root, &module).or_else(|| {
        [name.to_owned(), module.replace('_', "-")]
            .into_iter()
            .find(|d| {
                crate::pci::valid_driver_name(d)
                    && sysfs_root.join("bus/pci/drivers").join(d).is_dir()
            })
    })
}

/// Whether the driver registered as `driver` is a VFIO PCI driver: vfio-pci itself, or one
/// whose module is built on `vfio_pci_core` (`<sysfs>/module/vfio_pci_core/holders/<module>`,
/// as every variant driver is). A host driver (`nvidia`, `mlx5_core`) never is.
pub fn is_vfio_driver(sysfs_root: &Path, driver: &str) -> bool {
    if driver == VFIO_PCI {
        return true;
    }
    let Ok(target) = std::fs::read_link(
        sysfs_root
            .join("bus/pci/drivers")
            .join(driver)
            .join("module"),
    ) else {
        return false;
    };
    target.file_name().is_some_and(|m| {
        sysfs_root
            .join("module/vfio_pci_core/holders")
            .join(m)
            .exists()
    })
}

/// The module `modules.alias` names for `modalias` (a device's `pci:v…d…sv…sd…bc…sc…i…`), if
/// any `vfio_pci:` alias matches it; of several, the one with the fewest wildcards (ties:
/// the first in the file, as libvirt keeps the first).
pub fn variant_module(modules_alias: &str, modalias: &str) -> Option<String> {
    let device = modalias.trim().strip_prefix("pci:")?;
    let mut best: Option<(usize, &str)> = None;
    for line in modules_alias.lines() {
        let mut words = line.split_whitespace();
        let (Some("alias"), Some(pattern), Some(module)) =
            (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(pattern) = pattern.strip_prefix("vfio_pci:") else {
            continue;
        };
        if !glob_match(pattern.as_bytes(), device.as_bytes()) {
            continue;
        }
        let wildcards = pattern.bytes().filter(|b| *b == b'*').count();
        if best.is_none_or(|(w, _)| wildcards < w) {
            best = Some((wildcards, module));
        }
    }
    best.map(|(_, m)| m.to_owned())
}

/// The name the driver of `module` registered under `<sysfs>/bus/pci/drivers` (its `module`
/// link points at `<sysfs>/module/<module>`); `None` while the module is not loaded.
pub fn registered_driver(sysfs_root: &Path, module: &str) -> Option<String> {
    let drivers = std::fs::read_dir(sysfs_root.join("bus/pci/drivers")).ok()?;
    drivers.filter_map(|e| e.ok()).find_map(|e| {
        let target = std::fs::read_link(e.path().join("module")).ok()?;
        (target.file_name()? == module)
            .then(|| e.file_name().to_str().map(str::to_owned))
            .flatten()
    })
}

/// `fnmatch` for the patterns `modules.alias` holds: `*` any run, `?` one byte, the rest
/// literal (case-sensitive: the kernel writes hex digits in upper case on both sides).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines in the kernel's own format (`depmod` writes them from the modules' ID tables).
    const ALIAS: &str = "\
alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia
alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000010DEd00002345sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v000015B3d*sv*sd*bc*sc*i* some_vendor_wide_vfio_pci
alias vfio_pci:v*d*sv*sd*bc*sc*i* catch_all_vfio_pci
";

    #[test]
    fn the_matching_alias_with_fewest_wildcards_wins() {
        let gh200 = "pci:v000010DEd00002342sv000010DEsd000016EBbc03sc02i00";
        assert_eq!(
            variant_module(ALIAS, gh200).as_deref(),
            Some("nvgrace_gpu_vfio_pci")
        );
        let cx7_vf = "pci:v000015B3d0000101Esv000015B3sd00000000bc02sc00i00";
        assert_eq!(
            variant_module(ALIAS, cx7_vf).as_deref(),
            Some("mlx5_vfio_pci")
        );
        let h100 = "pci:v000010DEd00002330sv000010DEsd000016C1bc03sc02i00";
        assert_eq!(
            variant_module(ALIAS, h100).as_deref(),
            Some("catch_all_vfio_pci")
        );
        let without_catch_all: String = ALIAS
            .lines()
            .filter(|l| !l.contains("catch_all"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(variant_module(&without_catch_all, h100), None);
        assert_eq!(variant_module(ALIAS, "not a modalias"), None);
    }

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match(b"v*d*", b"v10d20"));
        assert!(glob_match(b"a?c", b"abc"));
        assert!(!glob_match(b"a?c", b"ac"));
        assert!(!glob_match(b"v0001d*", b"v0002d3"));
        assert!(glob_match(b"*", b""));
    }

    #[test]
    fn the_registered_name_is_found_through_the_module_link() {
        let dir = tempfile::tempdir().unwrap();
        let module = dir.path().join("module/nvgrace_gpu_vfio_pci");
        let driver = dir.path().join("bus/pci/drivers/nvgrace-gpu-vfio-pci");
        std::fs::create_dir_all(&module).unwrap();
        std::fs::create_dir_all(&driver).unwrap();
        std::os::unix::fs::symlink(&module, driver.join("module")).unwrap();
        assert_eq!(
            registered_driver(dir.path(), "nvgrace_gpu_vfio_pci").as_deref(),
            Some("nvgrace-gpu-vfio-pci")
        );
        assert_eq!(registered_driver(dir.path(), "mlx5_vfio_pci"), None);
        assert_eq!(
            loaded_driver(dir.path(), "nvgrace-gpu-vfio-pci").as_deref(),
            Some("nvgrace-gpu-vfio-pci")
        );
        assert!(
            !is_vfio_driver(dir.path(), "nvgrace-gpu-vfio-pci"),
            "not on vfio_pci_core"
        );
        let holders = dir.path().join("module/vfio_pci_core/holders");
        std::fs::create_dir_all(&holders).unwrap();
        std::os::unix::fs::symlink(&module, holders.join("nvgrace_gpu_vfio_pci")).unwrap();
        assert!(is_vfio_driver(dir.path(), "nvgrace-gpu-vfio-pci"));
        assert!(is_vfio_driver(dir.path(), VFIO_PCI));
    }
}
