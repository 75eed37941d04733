//! Registry TOML → validated releases. Walks the TOML tree by hand (rather than serde derive)
//! so that every error can name the release and the exact field.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::duplicates::check_duplicate_headers;
use super::{
    Arch, Artifact, ArtifactKind, BuildProvenance, ModuleFlavor, RegistryError, Release,
    Sha256Digest, Signer,
};

const RELEASE_KEYS: &[&str] = &[
    "kernel_version",
    "driver_version",
    "module_flavor",
    "gsp",
    "vgpu_guest",
    "vgpu_manager_branches",
    "default",
    "signer",
    "module_sig_force",
    "build",
    "artifacts",
];
const SIGNER_KEYS: &[&str] = &["subject", "key_id"];
const BUILD_KEYS: &[&str] = &["builder", "compiler", "sandbox", "source_date_epoch"];
const ARTIFACT_KEYS: &[&str] = &["kind", "url", "urls", "sha256", "size"];
const URL_SCHEMES: &[&str] = &["https://", "http://", "file://"];

struct Ctx<'a> {
    file: &'a str,
    release: &'a str,
}

impl Ctx<'_> {
    fn invalid(
        &self,
        field: &str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> RegistryError {
        RegistryError::Invalid {
            file: self.file.to_string(),
            release: self.release.to_string(),
            field: field.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    fn string(&self, field: &str, value: &Value) -> Result<String, RegistryError> {
        match value {
            Value::String(s) => Ok(s.clone()),
            other => Err(self.invalid(
                field,
                format!("expected a string, found {}", other.type_str()),
                "quote the value",
            )),
        }
    }
}

/// Parse and validate registry text. `file` names the source in errors and in each release.
pub(super) fn parse(text: &str, file: &str) -> Result<Vec<Release>, RegistryError> {
    check_duplicate_headers(text, file)?;
    let table: Table = text
        .parse()
        .map_err(|source: toml::de::Error| RegistryError::Syntax {
            file: file.to_string(),
            source,
        })?;
    let top = Ctx { file, release: "" };
    let mut releases_value = None;
    for (key, value) in &table {
        if key == "releases" {
            releases_value = Some(value);
        } else {
            return Err(top.invalid(
                key,
                "unknown top-level key",
                "put releases under [releases.\"NAME\"]; the only top-level table is `releases`",
            ));
        }
    }
    let releases_table = match releases_value {
        None => return Ok(Vec::new()),
        Some(Value::Table(t)) => t,
        Some(other) => {
            return Err(top.invalid(
                "releases",
                format!("expected a table, found {}", other.type_str()),
                "write each release as [releases.\"NAME\"]",
            ));
        }
    };
    let mut out = Vec::new();
    let mut default: Option<String> = None;
    for (name, value) in releases_table {
        let release = parse_release(file, name, value)?;
        if release.default {
            if let Some(first) = &default {
                return Err(RegistryError::TwoDefaults {
                    file: file.to_string(),
                    first: first.clone(),
                    second: name.clone(),
                });
            }
            default = Some(name.clone());
        }
        out.push(release);
    }
    Ok(out)
}

fn parse_release(file: &str, name: &str, value: &Value) -> Result<Release, RegistryError> {
    let ctx = Ctx {
        file,
        release: name,
    };
    if name.trim().is_empty() {
        return Err(ctx.invalid("", "the release name is empty", "give the release a name"));
    }
    let Value::Table(table) = value else {
        return Err(ctx.invalid(
            "",
            format!("expected a table, found {}", value.type_str()),
            "write the release as [releases.\"NAME\"] with its fields below it",
        ));
    };
    for key in table.keys() {
        if !RELEASE_KEYS.contains(&key.as_str()) {
            return Err(ctx.invalid(
                key,
                "unknown key",
                format!("remove it; release keys are {}", RELEASE_KEYS.join(", ")),
            ));
        }
    }
    let kernel_version = match table.get("kernel_version") {
        None => {
            return Err(ctx.invalid(
                "kernel_version",
                "missing",
                "add kernel_version = \"<the guest's uname -r>\"",
            ));
        }
        Some(v) => ctx.string("kernel_version", v)?,
    };
    if let Some(problem) = super::version_string_problem(&kernel_version) {
        return Err(ctx.invalid(
            "kernel_version",
            problem,
            "set it to the guest kernel's `uname -r`, e.g. \"6.1.0-56-amd64\"",
        ));
    }
    let driver_version = match table.get("driver_version") {
        None => None,
        Some(v) => {
            let s = ctx.string("driver_version", v)?;
            if let Some(problem) = super::version_string_problem(&s) {
                return Err(ctx.invalid(
                    "driver_version",
                    problem,
                    "set the NVIDIA driver version, e.g. \"535.261.03\", or remove the key",
                ));
            }
            Some(s)
        }
    };
    let module_flavor = match table.get("module_flavor") {
        None => None,
        Some(v) => {
            let s = ctx.string("module_flavor", v)?;
            Some(
                s.parse::<ModuleFlavor>()
                    .map_err(|e| ctx.invalid("module_flavor", e, "fix the value"))?,
            )
        }
    };
    let gsp = match table.get("gsp") {
        None => true,
        Some(Value::Boolean(b)) => *b,
        Some(other) => {
            return Err(ctx.invalid(
                "gsp",
                format!("expected true or false, found {}", other.type_str()),
                "write gsp = false for a proprietary release without GSP firmware, or remove it",
            ));
        }
    };
    if !gsp && module_flavor != Some(ModuleFlavor::Proprietary) {
        return Err(ctx.invalid(
            "gsp",
            "false, but only the proprietary modules can run without GSP firmware",
            "set module_flavor = \"proprietary\", or remove gsp = false and add the firmware",
        ));
    }
    let vgpu = parse_vgpu(&ctx, table)?;
    let default = match table.get("default") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(other) => {
            return Err(ctx.invalid(
                "default",
                format!("expected true or false, found {}", other.type_str()),
                "write default = true or remove it",
            ));
        }
    };
    let mut artifacts = BTreeMap::new();
    match table.get("artifacts") {
        None => {}
        Some(Value::Table(per_arch)) => {
            for (arch_name, list) in per_arch {
                let field = format!("artifacts.{arch_name}");
                let arch: Arch = arch_name.parse().map_err(|e: String| {
                    ctx.invalid(&field, e, "use [[releases.\"NAME\".artifacts.x86_64]]")
                })?;
                let Value::Array(items) = list else {
                    return Err(ctx.invalid(
                        &field,
                        format!("expected an array of tables, found {}", list.type_str()),
                        format!(
                            "write each artifact as [[releases.\"{name}\".artifacts.{arch_name}]]"
                        ),
                    ));
                };
                let mut parsed: Vec<Artifact> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let field = format!("artifacts.{arch_name}[{i}]");
                    let artifact = parse_artifact(&ctx, &field, item)?;
                    if !artifact.kind.allows_several()
                        && parsed.iter().any(|a| a.kind == artifact.kind)
                    {
                        return Err(ctx.invalid(
                            &format!("{field}.kind"),
                            format!("artifact kind `{}` appears twice for {arch}", artifact.kind),
                            "keep one entry per kind and architecture; list mirrors in `urls`",
                        ));
                    }
                    parsed.push(artifact);
                }
                artifacts.insert(arch, parsed);
            }
        }
        Some(other) => {
            return Err(ctx.invalid(
                "artifacts",
                format!("expected a table, found {}", other.type_str()),
                "write artifacts as [[releases.\"NAME\".artifacts.x86_64]]",
            ));
        }
    }
    let has_driver_artifact = artifacts.values().flatten().any(|a| {
        matches!(
            a.kind,
            ArtifactKind::NvidiaModules
                | ArtifactKind::NvidiaFirmware
                | ArtifactKind::NvidiaDriverLibs
                | ArtifactKind::NvidiaKernelSource
        )
    });
    if has_driver_artifact && driver_version.is_none() {
        return Err(ctx.invalid(
            "driver_version",
            "missing, but the release has NVIDIA artifacts",
            "add driver_version = \"<the NVIDIA driver version>\" (module checks compare against it)",
        ));
    }
    let signer = parse_signer(&ctx, table)?;
    let module_sig_force = match table.get("module_sig_force") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(other) => {
            return Err(ctx.invalid(
                "module_sig_force",
                format!("expected true or false, found {}", other.type_str()),
                "write module_sig_force = true for a kernel with CONFIG_MODULE_SIG_FORCE=y, or remove it",
            ));
        }
    };
    if module_sig_force && signer.is_none() && has_driver_artifact {
        return Err(ctx.invalid(
            "signer",
            "missing, but module_sig_force = true: the guest kernel refuses unsigned modules",
            "build the modules again with a signing key (versions build --sign-key --sign-cert)",
        ));
    }
    let build = parse_build(&ctx, table)?;
    Ok(Release {
        name: name.to_string(),
        kernel_version,
        driver_version,
        module_flavor,
        gsp,
        vgpu,
        default,
        signer,
        module_sig_force,
        build,
        artifacts,
        source: file.to_string(),
    })
}

/// The string fields of an inline table with exactly `keys`, each required and non-empty.
fn string_table(
    ctx: &Ctx<'_>,
    field: &str,
    value: &Value,
    keys: &[&str],
    example: &str,
) -> Result<BTreeMap<String, Value>, RegistryError> {
    let Value::Table(t) = value else {
        return Err(ctx.invalid(
            field,
            format!("expected a table, found {}", value.type_str()),
            format!("write {field} = {example}"),
        ));
    };
    for key in t.keys() {
        if !keys.contains(&key.as_str()) {
            return Err(ctx.invalid(
                &format!("{field}.{key}"),
                "unknown key",
                format!("remove it; {field} keys are {}", keys.join(", ")),
            ));
        }
    }
    for key in keys {
        if !t.contains_key(*key) {
            return Err(ctx.invalid(
                &format!("{field}.{key}"),
                "missing",
                format!("write {field} = {example}"),
            ));
        }
    }
    Ok(t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

fn parse_signer(ctx: &Ctx<'_>, table: &Table) -> Result<Option<Signer>, RegistryError> {
    let Some(value) = table.get("signer") else {
        return Ok(None);
    };
    let example = "{ subject = \"<certificate CN>\", key_id = \"<serial, AA:BB:...>\" }";
    let t = string_table(ctx, "signer", value, SIGNER_KEYS, example)?;
    let subject = ctx.string("signer.subject", &t["subject"])?;
    let key_id = ctx.string("signer.key_id", &t["key_id"])?;
    if subject.trim().is_empty() {
        return Err(ctx.invalid(
            "signer.subject",
            "is empty",
            "write the certificate's subject CN",
        ));
    }
    let hex_pair = |p: &str| {
        p.len() == 2
            && p.bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    };
    if key_id.is_empty() || !key_id.split(':').all(hex_pair) {
        return Err(ctx.invalid(
            "signer.key_id",
            format!("`{key_id}` is not uppercase hex bytes joined by `:`"),
            "write the certificate's serial as modinfo prints sig_key, e.g. \"1F:A0:03\"",
        ));
    }
    Ok(Some(Signer { subject, key_id }))
}

fn parse_build(ctx: &Ctx<'_>, table: &Table) -> Result<Option<BuildProvenance>, RegistryError> {
    let Some(value) = table.get("build") else {
        return Ok(None);
    };
    let example = "{ builder = \"...\", compiler = \"...\", sandbox = \"...\", source_date_epoch = N } (versions build writes it)";
    let t = string_table(ctx, "build", value, BUILD_KEYS, example)?;
    let source_date_epoch = match &t["source_date_epoch"] {
        Value::Integer(n) if *n >= 0 => *n as u64,
        other => {
            return Err(ctx.invalid(
                "build.source_date_epoch",
                format!("expected seconds since 1970 (a non-negative integer), found {other}"),
                "write the SOURCE_DATE_EPOCH the build ran with",
            ));
        }
    };
    Ok(Some(BuildProvenance {
        builder: ctx.string("build.builder", &t["builder"])?,
        compiler: ctx.string("build.compiler", &t["compiler"])?,
        sandbox: ctx.string("build.sandbox", &t["sandbox"])?,
        source_date_epoch,
    }))
}

fn parse_vgpu(ctx: &Ctx<'_>, table: &Table) -> Result<Option<super::VgpuGuest>, RegistryError> {
    let guest = match table.get("vgpu_guest") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(other) => {
            return Err(ctx.invalid(
                "vgpu_guest",
                format!("expected true or false, found {}", other.type_str()),
                "write vgpu_guest = true for a release with NVIDIA's vGPU guest driver, or remove it",
            ));
        }
    };
    let branches = match table.get("vgpu_manager_branches") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) => {
                    Ok(s.clone())
                }
                _ => Err(ctx.invalid(
                    "vgpu_manager_branches",
                    format!("`{v}` is not a driver branch"),
                    "list the host manager branches as strings of digits, e.g. [\"550\", \"570\"]",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ctx.invalid(
                "vgpu_manager_branches",
                format!("expected an array of strings, found {}", other.type_str()),
                "write vgpu_manager_branches = [\"550\"]",
            ));
        }
    };
    match (guest, branches.is_empty()) {
        (true, true) => Err(ctx.invalid(
            "vgpu_manager_branches",
            "missing, but vgpu_guest = true",
            "add the host vGPU manager branches the guest driver works with, e.g. vgpu_manager_branches = [\"550\"]",
        )),
        (false, false) => Err(ctx.invalid(
            "vgpu_manager_branches",
            "set, but vgpu_guest is not true",
            "add vgpu_guest = true, or remove vgpu_manager_branches",
        )),
        (true, false) => Ok(Some(super::VgpuGuest {
            manager_branches: branches,
        })),
        (false, true) => Ok(None),
    }
}

fn parse_artifact(ctx: &Ctx<'_>, field: &str, item: &Value) -> Result<Artifact, RegistryError> {
    let Value::Table(t) = item else {
        return Err(ctx.invalid(
            field,
            format!("expected a table, found {}", item.type_str()),
            "write the artifact as a [[...artifacts.ARCH]] table",
        ));
    };
    for key in t.keys() {
        if !ARTIFACT_KEYS.contains(&key.as_str()) {
            return Err(ctx.invalid(
                &format!("{field}.{key}"),
                "unknown key",
                format!("remove it; artifact keys are {}", ARTIFACT_KEYS.join(", ")),
            ));
        }
    }
    let kind_field = format!("{field}.kind");
    let kind = match t.get("kind") {
        None => {
            return Err(ctx.invalid(
                &kind_field,
                "missing",
                "add kind = \"kernel\" (or kernel-modules, nvidia-modules, nvidia-firmware, nvidia-driver-libs, nvidia-kernel-source, kernel-headers, source-patch)",
            ));
        }
        Some(v) => ctx
            .string(&kind_field, v)?
            .parse::<ArtifactKind>()
            .map_err(|e| ctx.invalid(&kind_field, e, "fix the kind"))?,
    };
    let mut urls = Vec::new();
    match (t.get("url"), t.get("urls")) {
        (Some(_), Some(_)) => {
            return Err(ctx.invalid(
                &format!("{field}.urls"),
                "both `url` and `urls` are set",
                "use `url` for one location or `urls` for a list of mirrors, not both",
            ));
        }
        (None, None) => {
            return Err(ctx.invalid(
                &format!("{field}.url"),
                "missing",
                "add url = \"https://...\" (or urls = [mirrors])",
            ));
        }
        (Some(v), None) => urls.push(ctx.string(&format!("{field}.url"), v)?),
        (None, Some(Value::Array(list))) => {
            for (i, v) in list.iter().enumerate() {
                urls.push(ctx.string(&format!("{field}.urls[{i}]"), v)?);
            }
            if urls.is_empty() {
                return Err(ctx.invalid(
                    &format!("{field}.urls"),
                    "is empty",
                    "list at least one URL",
                ));
            }
        }
        (None, Some(other)) => {
            return Err(ctx.invalid(
                &format!("{field}.urls"),
                format!("expected an array of strings, found {}", other.type_str()),
                "write urls = [\"https://...\", ...]",
            ));
        }
    }
    for url in &urls {
        if !URL_SCHEMES.iter().any(|s| url.starts_with(s)) || url.contains(char::is_whitespace) {
            return Err(ctx.invalid(
                &format!("{field}.url"),
                format!("`{url}` is not an https, http or file URL"),
                "use an https://, http:// or file:// URL",
            ));
        }
    }
    let sha256 = match t.get("sha256") {
        None => None,
        Some(v) => {
            let sha_field = format!("{field}.sha256");
            let s = ctx.string(&sha_field, v)?;
            Some(
                s.parse::<Sha256Digest>()
                    .map_err(|source| RegistryError::BadDigest {
                        file: ctx.file.to_string(),
                        release: ctx.release.to_string(),
                        field: sha_field,
                        value: s.to_string(),
                        source,
                    })?,
            )
        }
    };
    let size = match t.get("size") {
        None => None,
        Some(Value::Integer(n)) if *n >= 0 => Some(*n as u64),
        Some(other) => {
            return Err(ctx.invalid(
                &format!("{field}.size"),
                format!("expected a byte count (a non-negative integer), found {other}"),
                "write the size in bytes, or remove it",
            ));
        }
    };
    if sha256.is_some() && size.is_none() {
        // The size bounds the download before the digest can be checked at its end.
        return Err(ctx.invalid(
            &format!("{field}.size"),
            "missing: a pinned `sha256` needs its `size`",
            format!(
                "add size = <bytes>, or pin release {} in {} again to fill it in",
                ctx.release, ctx.file
            ),
        ));
    }
    Ok(Artifact {
        kind,
        urls,
        sha256,
        size,
    })
}
