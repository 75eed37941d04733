//! The text of `versions build`: each stage, the build's report, a rebuild's verdict.

use std::fmt::{self, Display, Formatter};

impl Display for crate::driver_build::Stage {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        use crate::driver_build::Stage;
        match self {
            Stage::Fetch { kind, url } => write!(f, "fetching {kind} {url}"),
            Stage::Check => f.write_str("unpacking and checking the inputs"),
            Stage::CacheHit => f.write_str("built before from the same inputs: no compile"),
            Stage::Patch { patch } => write!(f, "applying {patch}"),
            Stage::Compile { jobs } => write!(f, "compiling in the sandbox (make -j{jobs})"),
            Stage::Finish { sign: true } => f.write_str("stripping and signing the modules"),
            Stage::Finish { sign: false } => f.write_str("stripping the modules"),
            Stage::Inspect => f.write_str("packing and inspecting the modules"),
            Stage::Publish => f.write_str("publishing and writing the registry"),
        }
    }
}

impl Display for crate::versions::build::BuildReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.release)?;
        writeln!(
            f,
            "built {} ({} bytes, sha256 {}){} in {:.1} s",
            self.file_name,
            self.size,
            self.sha256,
            if self.cache_hit {
                " from the build cache"
            } else {
                ""
            },
            self.seconds
        )?;
        for m in &self.modules {
            writeln!(
                f,
                "  {:<20} {:>10} bytes  sha256:{}",
                m.name, m.size, m.sha256
            )?;
        }
        if let Some(p) = &self.published {
            writeln!(f, "published: {}", p.display())?;
        }
        writeln!(f, "logs: {}", self.logs.display())
    }
}

impl Display for crate::versions::build::RebuildReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let how = if self.without_signatures {
            " (modules compared without their signatures: no key given)"
        } else {
            ""
        };
        if self.matches() {
            writeln!(
                f,
                "release {} ({}): the rebuild gives the pinned modules{how}, sha256 {}",
                self.release, self.arch, self.actual_sha256
            )
        } else {
            writeln!(
                f,
                "release {} ({}): the rebuild DIFFERS{how}: pinned sha256 {}, rebuilt {}; \
                 differing: {} (logs: {})",
                self.release,
                self.arch,
                self.expected_sha256,
                self.actual_sha256,
                self.differing.join(", "),
                self.logs.display()
            )
        }
    }
}
