//! The text of the registry's reports: a release, add, pin, verify, the release table, a diff.

use std::fmt::{self, Display, Formatter};

use crate::registry::{ModuleFlavor, Release};
use crate::versions::{
    AddReport, PinReport, ReleaseSummary, VerifyReport, VerifyRow, VerifyStatus,
};

use super::or_dash;

impl Display for Release {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "release {}{}",
            self.name,
            if self.default { " (default)" } else { "" }
        )?;
        writeln!(f, "  source:          {}", self.source)?;
        writeln!(f, "  kernel_version:  {}", self.kernel_version)?;
        writeln!(
            f,
            "  driver_version:  {}",
            or_dash(self.driver_version.as_deref())
        )?;
        writeln!(
            f,
            "  module_flavor:   {}",
            self.module_flavor.map_or("-", ModuleFlavor::as_str)
        )?;
        if let Some(s) = &self.signer {
            writeln!(f, "  signer:          {} (key {})", s.subject, s.key_id)?;
        }
        if self.module_sig_force {
            writeln!(
                f,
                "  module_sig_force: the kernel loads signed modules only"
            )?;
        }
        if let Some(b) = &self.build {
            writeln!(f, "  built by:        {}", b.builder)?;
            writeln!(f, "  compiler:        {}", b.compiler)?;
            writeln!(f, "  sandbox:         {}", b.sandbox)?;
            writeln!(f, "  SOURCE_DATE_EPOCH: {}", b.source_date_epoch)?;
        }
        for (arch, list) in &self.artifacts {
            writeln!(f, "  {arch}:")?;
            for a in list {
                writeln!(f, "    {}", a.kind)?;
                match &a.sha256 {
                    Some(d) => writeln!(f, "      sha256: {d}")?,
                    None => writeln!(
                        f,
                        "      sha256: UNPINNED (pin release {} first)",
                        self.name
                    )?,
                }
                writeln!(f, "      size:   {}", or_dash(a.size))?;
                for url in &a.urls {
                    writeln!(f, "      url:    {url}")?;
                }
            }
        }
        Ok(())
    }
}

impl Display for AddReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.release)?;
        if let Some(i) = &self.inspected {
            writeln!(
                f,
                "inspected: {} modules ({}), {} firmware files, {} libraries",
                i.modules.len(),
                i.modules.join(", "),
                i.firmware.len(),
                i.libraries.len()
            )?;
        }
        writeln!(f, "written to {}", self.registry)
    }
}

impl Display for PinReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.pinned.is_empty() {
            return writeln!(
                f,
                "release {}: nothing to pin, every artifact has a digest",
                self.release
            );
        }
        for p in &self.pinned {
            writeln!(
                f,
                "pinned {} {} {} {} bytes",
                self.release, p.arch, p.kind, p.size
            )?;
            writeln!(f, "  sha256 {}", p.sha256)?;
        }
        writeln!(f, "written to {}", self.registry)
    }
}

impl Display for VerifyRow {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}: ", self.release, self.arch, self.kind)?;
        match self.status {
            VerifyStatus::Mismatch => writeln!(
                f,
                "MISMATCH from {}: expected sha256 {} ({} bytes), got {} ({} bytes)",
                self.url.as_deref().unwrap_or("the cache"),
                or_dash(self.expected_sha256.as_deref()),
                self.expected_size.map_or("?".into(), |s| s.to_string()),
                or_dash(self.actual_sha256.as_deref()),
                self.actual_size.map_or("?".into(), |s| s.to_string()),
            ),
            VerifyStatus::Unpinned => writeln!(f, "UNPINNED (no sha256 to check)"),
            VerifyStatus::Error => writeln!(f, "ERROR {}", self.error.as_deref().unwrap_or("")),
            status => writeln!(f, "{}", status.as_str()),
        }
    }
}

/// One line per artifact, then one per cache entry checked.
impl Display for VerifyReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for r in &self.artifacts {
            write!(f, "{r}")?;
        }
        for r in &self.cache {
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The `versions list` table.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseTable<'a>(pub &'a [ReleaseSummary]);

impl Display for ReleaseTable<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:<34} {:<16} {:<11} {:<11} {:<16} {:<11} SOURCE",
            "RELEASE", "KERNEL", "DRIVER", "FLAVOR", "ARCH", "PINS"
        )?;
        for r in self.0 {
            let pins = if r.unpinned == 0 {
                format!("{}/{}", r.artifacts, r.artifacts)
            } else {
                format!("UNPINNED {}/{}", r.artifacts - r.unpinned, r.artifacts)
            };
            let arches: Vec<&str> = r.arches.iter().map(|a| a.as_str()).collect();
            writeln!(
                f,
                "{} {:<34} {:<16} {:<11} {:<11} {:<16} {:<11} {}",
                if r.default { "*" } else { " " },
                r.name,
                r.kernel_version,
                or_dash(r.driver_version.as_deref()),
                r.module_flavor.map_or("-", ModuleFlavor::as_str),
                arches.join(","),
                pins,
                r.source
            )?;
        }
        Ok(())
    }
}

impl Display for crate::versions::ReleaseDiff {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        fn opt(v: &Option<String>) -> &str {
            v.as_deref().unwrap_or("-")
        }
        fn set(
            f: &mut Formatter<'_>,
            what: &str,
            d: &crate::versions::diff::SetDiff,
        ) -> fmt::Result {
            for a in &d.added {
                writeln!(f, "  + {what} {a}")?;
            }
            for r in &d.removed {
                writeln!(f, "  - {what} {r}")?;
            }
            Ok(())
        }
        writeln!(f, "{} -> {} ({})", self.from, self.to, self.arch)?;
        if let Some(c) = &self.kernel_version {
            writeln!(f, "  kernel   {} -> {}", c.from, c.to)?;
        }
        if let Some(c) = &self.driver_version {
            writeln!(f, "  driver   {} -> {}", opt(&c.from), opt(&c.to))?;
        }
        if let Some(c) = &self.module_flavor {
            writeln!(f, "  flavor   {} -> {}", opt(&c.from), opt(&c.to))?;
        }
        if let Some(c) = &self.gsp {
            writeln!(f, "  gsp      {} -> {}", c.from, c.to)?;
        }
        set(f, "module", &self.modules)?;
        for p in &self.module_params {
            writeln!(
                f,
                "  ~ module {} parameters `{}` -> `{}`",
                p.module, p.from, p.to
            )?;
        }
        set(f, "firmware", &self.firmware)?;
        for a in &self.libraries.added {
            writeln!(f, "  + library {a}")?;
        }
        for r in &self.libraries.removed {
            writeln!(f, "  - library {r}")?;
        }
        for c in &self.libraries.changed {
            writeln!(f, "  ~ library {}: {} -> {}", c.soname, c.from, c.to)?;
        }
        set(f, "program", &self.programs)?;
        for g in &self.gpus_gained {
            writeln!(f, "  + gpu {} {}", g.device_id, g.name)?;
        }
        for g in &self.gpus_lost {
            writeln!(f, "  - gpu {} {}", g.device_id, g.name)?;
        }
        if self.gpus_gained.is_empty() && self.gpus_lost.is_empty() {
            writeln!(f, "  supported GPUs: unchanged")?;
        }
        for c in &self.provenance {
            writeln!(
                f,
                "  ~ built with {} {} -> {}",
                c.field,
                opt(&c.from),
                opt(&c.to)
            )?;
        }
        Ok(())
    }
}
