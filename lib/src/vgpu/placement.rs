//! Where vGPUs go: the parent with the least framebuffer in use (ties: the requested NUMA node,
//! then the lowest address), as hypeman does; or packed onto the most-loaded parent that fits.

use serde::Serialize;

use super::{Catalogue, Framework, VgpuError};
use crate::pci::PciAddress;

/// What to place (`--vgpu PROFILE [--count N] [--numa N] [--pack]` on the CLI).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PlaceRequest {
    /// vGPUs of this profile (`NVIDIA L40S-4Q` or `L40S-4Q`) instead of devices.
    #[cfg_attr(feature = "cli", arg(
        id = "vgpu", long = "vgpu", value_name = "PROFILE", required = false,
        conflicts_with_all = ["devices", "gpus", "mdev_type"]
    ))]
    pub profile: String,
    /// With --vgpu: how many.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "N", default_value_t = 1, requires = "vgpu")
    )]
    pub count: u32,
    /// With --vgpu: prefer this NUMA node on ties.
    #[cfg_attr(feature = "cli", arg(long, value_name = "N", requires = "vgpu"))]
    pub numa: Option<u32>,
    /// With --vgpu: fill the most-loaded parent that still fits instead of the least loaded.
    #[cfg_attr(feature = "cli", arg(long, requires = "vgpu"))]
    pub pack: bool,
}

/// The choice: one parent per instance, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The profile's full name.
    pub profile: String,
    /// Its framework.
    pub framework: Framework,
    /// Its type ID.
    pub type_id: String,
    /// Its framebuffer.
    pub framebuffer_mib: u64,
    /// The parent of each instance.
    pub parents: Vec<PciAddress>,
}

/// Place `req.count` instances of a profile from the catalogue (which already skips quarantined
/// parents). Changes nothing on the host.
pub fn place(cat: &Catalogue, req: &PlaceRequest) -> Result<Placement, VgpuError> {
    let p = cat.find(&req.profile)?;
    if req.count == 0 {
        return Err(VgpuError::ZeroCount {
            profile: p.name.clone(),
        });
    }
    let mut left: Vec<(PciAddress, Option<u32>, u32, u64)> = p
        .parents
        .iter()
        .map(|x| (x.address, x.numa_node, x.available, x.used_framebuffer_mib))
        .collect();
    let mut parents = Vec::new();
    for _ in 0..req.count {
        let best = left.iter_mut().filter(|c| c.2 > 0).min_by_key(|c| {
            let used = if req.pack { u64::MAX - c.3 } else { c.3 };
            (used, req.numa.is_some() && c.1 != req.numa, c.0)
        });
        let Some(c) = best else {
            return Err(VgpuError::NotEnough {
                profile: p.name.clone(),
                wanted: req.count,
                available: p.available,
            });
        };
        c.2 -= 1;
        c.3 += p.framebuffer_mib;
        parents.push(c.0);
    }
    Ok(Placement {
        profile: p.name.clone(),
        framework: p.framework,
        type_id: p.type_id.clone(),
        framebuffer_mib: p.framebuffer_mib,
        parents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vgpu::{ParentAvailability, Profile};

    fn cat() -> Catalogue {
        let parent = |a: &str, numa, available, used| ParentAvailability {
            address: a.parse().unwrap(),
            numa_node: Some(numa),
            available,
            used_framebuffer_mib: used,
        };
        Catalogue {
            profiles: vec![Profile {
                name: "NVIDIA L40S-4Q".into(),
                framework: Framework::VendorVfio,
                type_id: "1150".into(),
                framebuffer_mib: 4096,
                available: 9,
                parents: vec![
                    parent("0000:41:00.0", 0, 3, 8192),
                    parent("0000:61:00.0", 0, 3, 0),
                    parent("0000:a1:00.0", 1, 3, 0),
                ],
            }],
        }
    }

    fn req(count: u32, numa: Option<u32>, pack: bool) -> PlaceRequest {
        PlaceRequest {
            profile: "L40S-4Q".into(),
            count,
            numa,
            pack,
        }
    }

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn least_used_first_ties_by_numa_then_address() {
        let p = place(&cat(), &req(1, None, false)).unwrap();
        assert_eq!(p.parents, [a("0000:61:00.0")]);
        let p = place(&cat(), &req(1, Some(1), false)).unwrap();
        assert_eq!(p.parents, [a("0000:a1:00.0")]);
        // Spread: each instance goes where least is used after the previous one.
        let p = place(&cat(), &req(3, None, false)).unwrap();
        assert_eq!(
            p.parents,
            [a("0000:61:00.0"), a("0000:a1:00.0"), a("0000:61:00.0")]
        );
    }

    #[test]
    fn pack_fills_the_most_loaded_gpu_then_the_next() {
        let p = place(&cat(), &req(4, None, true)).unwrap();
        assert_eq!(&p.parents[..3], [a("0000:41:00.0"); 3]);
        assert_eq!(p.parents[3], a("0000:61:00.0"));
    }

    #[test]
    fn too_many_or_unknown_profiles_are_refused_with_what_exists() {
        let e = place(&cat(), &req(10, None, false)).unwrap_err();
        assert!(
            matches!(
                e,
                VgpuError::NotEnough {
                    wanted: 10,
                    available: 9,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            place(&cat(), &req(0, None, false)),
            Err(VgpuError::ZeroCount { .. })
        ));
        let mut r = req(1, None, false);
        r.profile = "L40S-5Q".into();
        let e = place(&cat(), &r).unwrap_err().to_string();
        assert!(e.contains("L40S-5Q") && e.contains("NVIDIA L40S-4Q"), "{e}");
    }
}
