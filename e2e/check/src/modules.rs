//! Two provisioning tools over kernel modules: the load order of named modules (run C's guest
//! `insmod`s them without modprobe) and the doctored "built for another kernel" copy (run A').

use anyhow::{Context, bail, ensure};
use gpu_passthrough::modinfo::ModInfo;
use gpu_passthrough_guest_contract::normalize_module_name;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `.ko` files needed to load `wanted` from `tree`, dependencies first (from each module's
/// `depends=`: the fixture tar carries no `modules.dep`).
pub fn load_order(tree: &Path, wanted: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = BTreeMap::new();
    collect_modules(tree, &mut files)?;
    let mut order = Vec::new();
    let mut state: BTreeMap<String, bool> = BTreeMap::new(); // false: visiting, true: done
    fn visit(
        name: &str,
        chain: &mut Vec<String>,
        files: &BTreeMap<String, PathBuf>,
        state: &mut BTreeMap<String, bool>,
        order: &mut Vec<PathBuf>,
        tree: &Path,
    ) -> anyhow::Result<()> {
        let name = normalize_module_name(name);
        match state.get(&name) {
            Some(true) => return Ok(()),
            Some(false) => bail!("dependency cycle: {} -> {name}", chain.join(" -> ")),
            None => {}
        }
        let Some(file) = files.get(&name) else {
            let by = if chain.is_empty() {
                "command line".into()
            } else {
                chain.join(" -> ")
            };
            bail!(
                "module {name} (needed by {by}) is not in {}; add it to the kernel-modules artifact",
                tree.display()
            );
        };
        state.insert(name.clone(), false);
        let info =
            ModInfo::from_path(file).with_context(|| format!("reading {}", file.display()))?;
        chain.push(name.clone());
        for dep in info.depends() {
            visit(&dep, chain, files, state, order, tree)?;
        }
        chain.pop();
        state.insert(name, true);
        order.push(file.clone());
        Ok(())
    }
    for w in wanted {
        visit(w, &mut Vec::new(), &files, &mut state, &mut order, tree)?;
    }
    Ok(order)
}

fn collect_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_modules(&path, files)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_suffix(".ko"))
        {
            files.insert(normalize_module_name(stem), path.clone());
        }
    }
    Ok(())
}

const SIG_MARKER: &[u8] = b"~Module signature appended~\n";

/// Make a module look built for kernel `new` instead of `old`, with same-length byte edits so no
/// ELF offset moves:
/// - the release in `vermagic=` (what our builder checks against the registry's kernel_version);
/// - unless `release_only`, the CRC of `module_layout` in `__versions` (what a modversions
///   kernel really checks: it ignores vermagic's release and compares symbol CRCs), so the module
///   is truly incompatible.
///
/// An appended signature is dropped: after the edit it would be invalid, and the kernel rejects a
/// bad signature even where it accepts unsigned modules.
pub fn doctor(data: &[u8], old: &str, new: &str, release_only: bool) -> anyhow::Result<Vec<u8>> {
    ensure!(old.len() == new.len(), "releases must have the same length");
    let mut data = strip_signature(data)?.to_vec();
    let magic = format!("vermagic={old} ");
    let hits: Vec<usize> = find_all(&data, magic.as_bytes());
    ensure!(
        hits.len() == 1,
        "expected one '{magic}', found {}",
        hits.len()
    );
    data[hits[0]..hits[0] + magic.len()].copy_from_slice(format!("vermagic={new} ").as_bytes());
    if release_only {
        return Ok(data);
    }
    // __versions entries are {unsigned long crc; char name[56]}: the name follows its CRC.
    let at = find_all(&data, b"module_layout\0")
        .first()
        .copied()
        .filter(|&at| at >= 8)
        .context("no module_layout entry in __versions")?;
    let crc = u64::from_le_bytes(data[at - 8..at].try_into()?);
    data[at - 8..at].copy_from_slice(&(crc ^ 0xFFFF_FFFF).to_le_bytes());
    Ok(data)
}

/// Drop an appended signature: content | signature | struct module_signature (12 bytes,
/// big-endian signature length last) | marker.
fn strip_signature(data: &[u8]) -> anyhow::Result<&[u8]> {
    let Some(info_end) = data
        .len()
        .checked_sub(SIG_MARKER.len())
        .filter(|_| data.ends_with(SIG_MARKER))
    else {
        return Ok(data);
    };
    ensure!(info_end >= 12, "truncated module signature");
    let sig_len = u32::from_be_bytes(data[info_end - 4..info_end].try_into()?) as usize;
    let end = info_end
        .checked_sub(12 + sig_len)
        .context("module signature longer than the module")?;
    Ok(&data[..end])
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// [`doctor`] a file in place.
pub fn doctor_file(path: &Path, old: &str, new: &str, release_only: bool) -> anyhow::Result<()> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let data = doctor(&data, old, new, release_only).with_context(|| path.display().to_string())?;
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(signed: bool) -> Vec<u8> {
        let mut m = b"\x7fELF....vermagic=6.1.0-56-amd64 SMP mod_unload\0".to_vec();
        m.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        m.extend_from_slice(b"module_layout\0rest");
        if signed {
            m.extend_from_slice(b"SIGNATURE");
            m.extend_from_slice(&[0; 8]);
            m.extend_from_slice(&9u32.to_be_bytes());
            m.extend_from_slice(SIG_MARKER);
        }
        m
    }

    #[test]
    fn doctoring_changes_release_and_crc_in_place_and_drops_the_signature() {
        let plain = module(false);
        let out = doctor(&module(true), "6.1.0-56-amd64", "6.1.0-99-amd64", false).unwrap();
        assert_eq!(out.len(), plain.len());
        assert_eq!(find_all(&out, b"vermagic=6.1.0-99-amd64 ").len(), 1);
        let at = find_all(&out, b"module_layout\0")[0];
        let crc = u64::from_le_bytes(out[at - 8..at].try_into().unwrap());
        assert_eq!(crc, 0x1122_3344_5566_7788 ^ 0xFFFF_FFFF);
        let release_only = doctor(&plain, "6.1.0-56-amd64", "6.1.0-99-amd64", true).unwrap();
        assert_eq!(release_only[at - 8..at], plain[at - 8..at]);
    }

    #[test]
    fn doctoring_refuses_what_it_cannot_do_exactly() {
        assert!(doctor(&module(false), "6.1.0-56-amd64", "6.1.0-9-amd64", false).is_err());
        assert!(doctor(&module(false), "5.10.0-1-amd64", "5.10.0-2-amd64", false).is_err());
        let no_layout = b"vermagic=6.1.0-56-amd64 SMP".to_vec();
        assert!(doctor(&no_layout, "6.1.0-56-amd64", "6.1.0-99-amd64", false).is_err());
    }

    #[test]
    fn a_module_missing_from_the_tree_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_order(dir.path(), &["vfio-pci".into()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("module vfio_pci (needed by command line)"),
            "{err}"
        );
    }
}
