//! The human-readable form of the catalogue and of a placement.

use std::fmt::{self, Display, Formatter};

use super::{Catalogue, Framework, Placement};

impl Display for Framework {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framework::VendorVfio => "vendor-vfio",
            Framework::Mdev => "mdev",
        })
    }
}

impl Display for Catalogue {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.profiles.is_empty() {
            return writeln!(
                f,
                "no vGPU profiles: no GPU offers vendor-VFIO or mdev types (is the NVIDIA vGPU manager loaded, SR-IOV enabled?)"
            );
        }
        writeln!(
            f,
            "{:<20} {:<11} {:>10} {:>9} {:>9}  parents (available, framebuffer used)",
            "PROFILE", "FRAMEWORK", "TYPE", "FB MiB", "AVAILABLE"
        )?;
        for p in &self.profiles {
            let parents: Vec<String> = p
                .parents
                .iter()
                .map(|x| {
                    format!(
                        "{} ({}, {} MiB)",
                        x.address, x.available, x.used_framebuffer_mib
                    )
                })
                .collect();
            writeln!(
                f,
                "{:<20} {:<11} {:>10} {:>9} {:>9}  {}",
                p.name,
                p.framework,
                p.type_id,
                p.framebuffer_mib,
                p.available,
                parents.join(", ")
            )?;
        }
        Ok(())
    }
}

impl Display for Placement {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for parent in &self.parents {
            writeln!(
                f,
                "create {} ({}, type {}, {} MiB) on {parent}",
                self.profile, self.framework, self.type_id, self.framebuffer_mib
            )?;
        }
        Ok(())
    }
}
