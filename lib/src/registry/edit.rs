//! Writing releases and pins into a registry file with `toml_edit`, keeping the file's comments
//! and formatting. Every write is validated first and lands atomically (temp file + rename), so a
//! refused edit leaves the file byte-identical.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

use super::{Arch, ArtifactKind, RegistryError, Release, Sha256Digest, parse};

/// A digest and size to record for one artifact of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactPin {
    /// The artifact's architecture.
    pub arch: Arch,
    /// The artifact's kind.
    pub kind: ArtifactKind,
    /// Its digest.
    pub sha256: Sha256Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// Write `release` into the registry `file` (created if missing). Refuses to overwrite an
/// existing release of that name unless `replace`. When `release.default` is set, the other
/// releases of the file lose their `default` key.
pub fn write_release(file: &Path, release: &Release, replace: bool) -> Result<(), RegistryError> {
    let name = file.display().to_string();
    let mut doc = read_doc(file)?;
    let exists = doc
        .get("releases")
        .and_then(Item::as_table_like)
        .is_some_and(|t| t.contains_key(&release.name));
    if exists && !replace {
        return Err(RegistryError::Exists {
            file: name,
            release: release.name.clone(),
        });
    }
    if release.default {
        clear_defaults(&mut doc);
    }
    insert_release(&mut doc, release);
    save(file, &doc)
}

/// Record digests and sizes for artifacts of `release` in `file`. A release defined in `file` is
/// edited in place; one defined elsewhere (e.g. the embedded default) is copied into `file` with
/// the pins applied, overriding the original.
pub fn pin_artifacts(
    file: &Path,
    release: &Release,
    pins: &[ArtifactPin],
) -> Result<(), RegistryError> {
    let mut doc = read_doc(file)?;
    let in_file = doc
        .get("releases")
        .and_then(|r| r.get(&release.name))
        .is_some();
    if !in_file {
        let mut pinned = release.clone();
        for pin in pins {
            if let Some(list) = pinned.artifacts.get_mut(&pin.arch) {
                // Kinds listed several times (patches, header archives) take their pins in
                // order, one per unpinned entry.
                if let Some(a) = list.iter_mut().find(|a| {
                    a.kind == pin.kind && (a.sha256.is_none() || !a.kind.allows_several())
                }) {
                    a.sha256 = Some(pin.sha256);
                    a.size = Some(pin.size);
                }
            }
        }
        // The copy must not steal the default from the file's own default release.
        pinned.default = false;
        insert_release(&mut doc, &pinned);
        return save(file, &doc);
    }
    for pin in pins {
        let Some(list) =
            doc["releases"][&release.name]["artifacts"][pin.arch.as_str()].as_array_of_tables_mut()
        else {
            continue;
        };
        let target = list.iter_mut().find(|table| {
            table.get("kind").and_then(Item::as_str) == Some(pin.kind.as_str())
                && (!pin.kind.allows_several() || !table.contains_key("sha256"))
        });
        if let Some(table) = target {
            table["sha256"] = value(pin.sha256.to_hex());
            table["size"] = value(size_value(pin.size));
        }
    }
    save(file, &doc)
}

/// Add (or replace) `release` in `doc` in the documented shape.
pub(super) fn insert_release(doc: &mut DocumentMut, release: &Release) {
    if !doc.contains_key("releases") {
        let mut releases = Table::new();
        releases.set_implicit(true);
        doc.insert("releases", Item::Table(releases));
    }
    let mut table = release_table(release);
    // A replaced release keeps its place in the file and the comment above its header.
    if let Some(old) = doc["releases"].get(&release.name).and_then(Item::as_table) {
        *table.decor_mut() = old.decor().clone();
        table.set_position(old.position());
    }
    doc["releases"][&release.name] = Item::Table(table);
}

fn release_table(release: &Release) -> Table {
    let mut t = Table::new();
    t["kernel_version"] = value(release.kernel_version.as_str());
    if let Some(d) = &release.driver_version {
        t["driver_version"] = value(d.as_str());
    }
    if let Some(f) = release.module_flavor {
        t["module_flavor"] = value(f.as_str());
    }
    if !release.gsp {
        t["gsp"] = value(false);
    }
    if let Some(v) = &release.vgpu {
        t["vgpu_guest"] = value(true);
        t["vgpu_manager_branches"] = value(toml_edit::Array::from_iter(
            v.manager_branches.iter().map(String::as_str),
        ));
    }
    if release.default {
        t["default"] = value(true);
    }
    if let Some(signer) = &release.signer {
        let mut inline = toml_edit::InlineTable::new();
        inline.insert("subject", signer.subject.as_str().into());
        inline.insert("key_id", signer.key_id.as_str().into());
        t["signer"] = value(inline);
    }
    if release.module_sig_force {
        t["module_sig_force"] = value(true);
    }
    if let Some(build) = &release.build {
        let mut bt = Table::new();
        bt["builder"] = value(build.builder.as_str());
        bt["compiler"] = value(build.compiler.as_str());
        bt["sandbox"] = value(build.sandbox.as_str());
        bt["source_date_epoch"] = value(size_value(build.source_date_epoch));
        t.insert("build", Item::Table(bt));
    }
    let mut per_arch = Table::new();
    per_arch.set_implicit(true);
    for (arch, list) in &release.artifacts {
        let mut tables = ArrayOfTables::new();
        for a in list {
            let mut at = Table::new();
            at["kind"] = value(a.kind.as_str());
            match a.urls.as_slice() {
                [one] => at["url"] = value(one.as_str()),
                many => at["urls"] = value(many.iter().map(String::as_str).collect::<Array>()),
            }
            if let Some(d) = &a.sha256 {
                at["sha256"] = value(d.to_hex());
            }
            if let Some(s) = a.size {
                at["size"] = value(size_value(s));
            }
            tables.push(at);
        }
        per_arch.insert(arch.as_str(), Item::ArrayOfTables(tables));
    }
    if !per_arch.is_empty() {
        t.insert("artifacts", Item::Table(per_arch));
    }
    t
}

fn size_value(size: u64) -> i64 {
    // TOML integers are i64; no real artifact comes near 8 EiB.
    i64::try_from(size).unwrap_or(i64::MAX)
}

fn clear_defaults(doc: &mut DocumentMut) {
    if let Some(releases) = doc.get_mut("releases").and_then(Item::as_table_like_mut) {
        for (_, release) in releases.iter_mut() {
            if let Some(t) = release.as_table_like_mut() {
                t.remove("default");
            }
        }
    }
}

fn read_doc(file: &Path) -> Result<DocumentMut, RegistryError> {
    let name = file.display().to_string();
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(RegistryError::Read { file: name, source }),
    };
    // Validate the file as it is first, so an edit never builds on a broken file.
    parse::parse(&text, &name)?;
    text.parse::<DocumentMut>()
        .map_err(|source| RegistryError::UnEditable { file: name, source })
}

fn save(file: &Path, doc: &DocumentMut) -> Result<(), RegistryError> {
    let name = file.display().to_string();
    let text = doc.to_string();
    parse::parse(&text, &name)?;
    let write_err = |source| RegistryError::Write {
        file: name.clone(),
        source,
    };
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(write_err)?;
    // Temp files are 0600; a registry is meant to be readable like any config file.
    let permissions = match std::fs::metadata(file) {
        Ok(meta) => meta.permissions(),
        Err(_) => std::fs::Permissions::from_mode(0o644),
    };
    tmp.as_file()
        .set_permissions(permissions)
        .map_err(write_err)?;
    tmp.write_all(text.as_bytes()).map_err(write_err)?;
    tmp.as_file().sync_all().map_err(write_err)?;
    tmp.persist(file).map_err(|e| write_err(e.error))?;
    Ok(())
}
