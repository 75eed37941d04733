//! `provision`: a GPU VM from a registry release, with the rules the CLI follows, for a control
//! plane to call the same way.
//!
//! The rule this module exists for: **the release's layers are ensured before any device
//! moves.** A release that cannot be fetched, verified or built fails the request while every
//! device is still on its host driver, so a broken release never strands a GPU on vfio-pci.
//! Then the GPU is checked against the very driver the guest will load (its own
//! `supported-gpus.json`, kept beside the layers), with the release's module flavor.

mod layers;
mod locations;

pub use layers::{
    Freshness, LayerRequest, default_build_options, host_arch, layers, release_layers,
};
pub use locations::Locations;

use std::path::{Path, PathBuf};

use crate::attach::{
    AttachError, AttachRequest, Host, Owner, Plan, PlanRequest, VgpuAttachRequest,
};
use crate::fetch::Progress;
use crate::initrd::{InitrdError, LayerForm, Layers};
use crate::outcome::{Classify, Outcome};
use crate::registry::{Registry, RegistryError, Release};
use crate::remedy::Remedy;
use crate::vmm::{BootSpec, DiskIsolation, DiskRequest, GpuDisk};

/// Errors of provisioning: which step failed, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The release is not in the registry, or the registry is unreadable.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The release's layers could not be ensured; no device was touched.
    #[error("the layers of release `{release}` could not be ensured; no device was moved")]
    Layers {
        /// The release.
        release: String,
        /// Why.
        #[source]
        source: InitrdError,
    },
    /// The host step failed (see [`AttachError`]).
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A vGPU VM asked for a release without NVIDIA's vGPU guest driver; nothing was changed.
    #[error(
        "release `{release}` has no vGPU guest driver (vgpu_guest is not set): a vGPU needs NVIDIA's vGPU (GRID) guest driver; pick a release with vgpu_guest = true"
    )]
    NotVgpuGuest {
        /// The release.
        release: String,
    },
    /// The host's vGPU manager is not a branch the release's guest driver works with.
    #[error(
        "release `{release}` works with vGPU manager branches {}, but this host's vGPU manager is {}; pick a release for that branch or update the host", .branches.join(", "), .host.as_deref().unwrap_or("not loaded (no module/nvidia/version in sysfs)")
    )]
    VgpuManagerMismatch {
        /// The release.
        release: String,
        /// Its branches.
        branches: Vec<String>,
        /// The host manager's version (the loaded `nvidia` module's).
        host: Option<String>,
    },
    /// A disk payload was asked for without a release whose layers the provisioner builds
    /// (none named, or the caller's own initrd); nothing was changed.
    #[error(
        "a GPU disk is built from a release's layers: name the release and no initrd of your own, or drop the disk"
    )]
    DiskWithoutRelease,
    /// A private copy of the disk was asked for without a disk; nothing was changed.
    #[error(
        "a private copy of the GPU disk needs a disk: name how to attach it (pmem or /dev/vdX), or drop the private copy"
    )]
    PrivateCopyWithoutDisk,
    /// The VM's private copy of the disk image could not be made; no device was moved.
    #[error(
        "the private copy of the GPU disk could not be made in {dir}; no device was moved: give an existing VM directory, writable, with room for the image"
    )]
    PrivateCopy {
        /// The VM's directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// This machine's architecture has no guest artifacts.
    #[error("this machine's architecture ({0}) is not supported; name the guest architecture")]
    UnsupportedArch(&'static str),
    /// A release's layers could not be built (no device is involved).
    #[error(transparent)]
    Initrd(#[from] InitrdError),
}

impl Classify for ProvisionError {
    fn outcome(&self) -> Outcome {
        match self {
            ProvisionError::Registry(e) => e.outcome(),
            ProvisionError::Layers { source, .. } => source.outcome(),
            ProvisionError::Attach(e) => e.outcome(),
            ProvisionError::NotVgpuGuest { .. }
            | ProvisionError::VgpuManagerMismatch { .. }
            | ProvisionError::DiskWithoutRelease
            | ProvisionError::PrivateCopyWithoutDisk => Outcome::Refused,
            ProvisionError::PrivateCopy { .. } => Outcome::Failed,
            ProvisionError::UnsupportedArch(_) => Outcome::Failed,
            ProvisionError::Initrd(e) => e.outcome(),
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            ProvisionError::Registry(e) => e.remedy(),
            ProvisionError::Layers { source, .. } => source.remedy(),
            ProvisionError::Attach(e) => e.remedy(),
            ProvisionError::NotVgpuGuest { .. }
            | ProvisionError::VgpuManagerMismatch { .. }
            | ProvisionError::DiskWithoutRelease
            | ProvisionError::PrivateCopyWithoutDisk
            | ProvisionError::PrivateCopy { .. }
            | ProvisionError::UnsupportedArch(_) => None,
            ProvisionError::Initrd(e) => e.remedy(),
        }
    }
}

impl ProvisionError {
    /// The initrd error behind a failed layer step, if that is what failed.
    pub fn initrd(&self) -> Option<&InitrdError> {
        match self {
            ProvisionError::Layers { source, .. } | ProvisionError::Initrd(source) => Some(source),
            _ => None,
        }
    }
}

/// A GPU VM to attach devices for.
#[derive(Debug, Clone)]
pub struct GpuVmRequest {
    /// The devices (addresses, or a GPU count). A `flavor` or `supported_gpus` set here wins
    /// over the release's.
    pub plan: PlanRequest,
    /// Who holds the devices.
    pub owner: Owner,
    /// The registry release the VM boots.
    pub release: Option<String>,
    /// An initrd the caller built itself: used as is, and the release's layers are not built.
    pub initrd: Option<PathBuf>,
    /// Deliver the release's GPU payload as a read-only disk attached as asked instead of the
    /// initramfs layer: the layers are built in the disk form, the VM boots the base layer and
    /// [`BootSpec::disk`] is the image, shared or this VM's private copy. Needs `release` and no
    /// `initrd` (else refused). [`DiskRequest::default`]: no disk.
    pub disk: DiskRequest,
}

/// A vGPU VM: vGPUs of one profile and the release it boots.
#[derive(Debug, Clone)]
pub struct VgpuVmRequest {
    /// The profile, count and placement preferences.
    pub place: crate::vgpu::PlaceRequest,
    /// Who holds the vGPUs.
    pub owner: Owner,
    /// The registry release the VM boots: it must carry the vGPU guest driver for this host's
    /// vGPU manager branch.
    pub release: Option<String>,
    /// An initrd the caller built itself: used as is, and the release's layers are not built.
    pub initrd: Option<PathBuf>,
    /// The GPU payload as a read-only disk (see [`GpuVmRequest::disk`]).
    pub disk: DiskRequest,
}

/// What a VM gets: whole devices bound to vfio-pci, or vGPUs of one profile.
#[derive(Debug, Clone)]
pub enum VmDevices {
    /// Devices by address or a GPU count (the [`GpuVmRequest::plan`] of the VM).
    Gpus(PlanRequest),
    /// vGPUs of one profile (the [`VgpuVmRequest::place`] of the VM).
    Vgpus(crate::vgpu::PlaceRequest),
}

/// A VM to attach, whichever devices it gets: the owner, release and initrd mean what they
/// mean in [`GpuVmRequest`] and [`VgpuVmRequest`].
#[derive(Debug, Clone)]
pub struct VmRequest {
    /// What the VM gets.
    pub devices: VmDevices,
    /// Who holds them.
    pub owner: Owner,
    /// The registry release the VM boots.
    pub release: Option<String>,
    /// An initrd the caller built itself: used as is, and the release's layers are not built.
    pub initrd: Option<PathBuf>,
    /// The GPU payload as a read-only disk (see [`GpuVmRequest::disk`]).
    pub disk: DiskRequest,
}

/// The host's vGPU manager version: the loaded `nvidia` module's (`module/nvidia/version` in
/// sysfs).
pub fn vgpu_manager_version(sysfs_root: &Path) -> Option<String> {
    std::fs::read_to_string(sysfs_root.join("module/nvidia/version"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Plans and attaches GPU VMs on one host from one registry and cache.
pub struct Provisioner<'a> {
    host: &'a Host,
    registry: &'a Registry,
    cache_dir: PathBuf,
    guest_init: Option<PathBuf>,
}

impl<'a> Provisioner<'a> {
    /// Provisioning on `host` with releases from `registry`, layers cached in `cache_dir`.
    pub fn new(host: &'a Host, registry: &'a Registry, cache_dir: impl Into<PathBuf>) -> Self {
        Provisioner {
            host,
            registry,
            cache_dir: cache_dir.into(),
            guest_init: None,
        }
    }

    /// Use this static guest init for the layers (default: the installed one).
    pub fn with_guest_init(mut self, guest_init: impl Into<PathBuf>) -> Self {
        self.guest_init = Some(guest_init.into());
        self
    }

    /// The plan for `request`, without building or moving anything: the release, if named,
    /// supplies the module flavor unless the request sets one.
    pub fn plan(
        &self,
        request: &PlanRequest,
        release: Option<&str>,
    ) -> Result<Plan, ProvisionError> {
        let mut request = request.clone();
        let Some(name) = release else {
            return Ok(self.host.plan(&request)?);
        };
        let release = self.registry.release(name)?;
        request.flavor = request.flavor.or(release.module_flavor);
        let mut plan = self.host.plan(&request)?;
        plan.refusals
            .extend(self.driver_fit(release, &request, &plan)?);
        Ok(plan)
    }

    /// The release's proprietary modules against the planned GPUs (see
    /// [`crate::attach::driver_fit`]); nothing to say without the driver's GPU list.
    fn driver_fit(
        &self,
        release: &Release,
        request: &PlanRequest,
        plan: &Plan,
    ) -> Result<Vec<crate::attach::Refusal>, ProvisionError> {
        let Some(path) = &request.supported_gpus else {
            return Ok(Vec::new());
        };
        let gpus = crate::pci::ids::SupportedGpus::load(path).map_err(AttachError::from)?;
        let devices: Vec<crate::pci::PciDevice> = plan
            .devices
            .iter()
            .filter(|p| p.passed)
            .filter_map(|p| self.host.sysfs().device(p.address).ok())
            .collect();
        Ok(crate::attach::driver_fit::proprietary_refusals(
            release, &gpus, &devices,
        ))
    }

    /// Attach a VM whichever devices it gets: [`Provisioner::attach`] for whole devices,
    /// [`Provisioner::attach_vgpu`] for vGPUs.
    pub fn attach_vm(
        &self,
        request: VmRequest,
        progress: &dyn Progress,
    ) -> Result<BootSpec, ProvisionError> {
        let VmRequest {
            devices,
            owner,
            release,
            initrd,
            disk,
        } = request;
        match devices {
            VmDevices::Gpus(plan) => {
                let request = GpuVmRequest {
                    plan,
                    owner,
                    release,
                    initrd,
                    disk,
                };
                self.attach(&request, progress)
            }
            VmDevices::Vgpus(place) => {
                let request = VgpuVmRequest {
                    place,
                    owner,
                    release,
                    initrd,
                    disk,
                };
                self.attach_vgpu(&request, progress)
            }
        }
    }

    /// Check the release's vGPU guest driver against the host's manager, ensure its layers,
    /// then create the vGPUs: a wrong release or a layer that cannot be built creates nothing.
    pub fn attach_vgpu(
        &self,
        request: &VgpuVmRequest,
        progress: &dyn Progress,
    ) -> Result<BootSpec, ProvisionError> {
        disk_needs_release(&request.disk, &request.release, &request.initrd)?;
        let mut initrd = request.initrd.clone();
        let mut disk = None;
        if let Some(name) = &request.release {
            let release = self.registry.release(name)?;
            let Some(guest) = &release.vgpu else {
                return Err(ProvisionError::NotVgpuGuest {
                    release: name.clone(),
                });
            };
            let host = vgpu_manager_version(self.host.sysfs().root());
            if !host.as_deref().is_some_and(|v| guest.supports(v)) {
                return Err(ProvisionError::VgpuManagerMismatch {
                    release: name.clone(),
                    branches: guest.manager_branches.clone(),
                    host,
                });
            }
            // Refuse an impossible placement before building anything.
            self.host.plan_vgpu(&request.place)?;
            if initrd.is_none() {
                let layers = self.layers(name, release, request.disk.is_some(), progress)?;
                disk = disk_of(&layers, &request.disk);
                initrd = Some(layers.combined.path);
            }
        }
        let disk = private_copy(disk, &request.disk)?;
        let spec = self
            .host
            .attach_vgpu(&VgpuAttachRequest {
                place: request.place.clone(),
                owner: request.owner.clone(),
                initrd,
            })
            .inspect_err(|_| discard_private_copy(&disk))?;
        Ok(with_disk(spec, disk))
    }

    /// The release's layers, in the disk form when the VM takes its payload as a disk.
    fn layers(
        &self,
        name: &str,
        release: &Release,
        disk: bool,
        progress: &dyn Progress,
    ) -> Result<Layers, ProvisionError> {
        let layers_failed = |source| ProvisionError::Layers {
            release: name.to_owned(),
            source,
        };
        let mut options = default_build_options(host_arch()?, self.guest_init.as_deref())
            .map_err(layers_failed)?;
        if disk {
            options.form = LayerForm::Disk;
        }
        release_layers(
            &self.cache_dir,
            release,
            &options,
            Freshness::Ensure,
            progress,
        )
        .map_err(layers_failed)
    }

    /// Ensure the release's layers, then attach: the boot spec names the release's combined
    /// layer, and the GPUs were checked against that release's driver.
    pub fn attach(
        &self,
        request: &GpuVmRequest,
        progress: &dyn Progress,
    ) -> Result<BootSpec, ProvisionError> {
        disk_needs_release(&request.disk, &request.release, &request.initrd)?;
        let mut plan = request.plan.clone();
        let mut initrd = request.initrd.clone();
        let mut disk = None;
        if let Some(name) = &request.release {
            let release = self.registry.release(name)?;
            plan.flavor = plan.flavor.or(release.module_flavor);
            if initrd.is_none() {
                let layers = self.layers(name, release, request.disk.is_some(), progress)?;
                disk = disk_of(&layers, &request.disk);
                initrd = Some(layers.combined.path);
                plan.supported_gpus = plan.supported_gpus.or(layers.supported_gpus);
            }
            // Refused before a device moves, like every plan refusal.
            if release.module_flavor == Some(crate::registry::ModuleFlavor::Proprietary) {
                let planned = self.host.plan(&plan)?;
                let refusals = self.driver_fit(release, &plan, &planned)?;
                if !refusals.is_empty() {
                    return Err(AttachError::Refused(refusals).into());
                }
            }
        }
        let disk = private_copy(disk, &request.disk)?;
        let spec = self
            .host
            .attach(&AttachRequest {
                plan,
                owner: request.owner.clone(),
                initrd,
            })
            .inspect_err(|_| discard_private_copy(&disk))?;
        Ok(with_disk(spec, disk))
    }
}

/// A disk payload comes from the release's layers: refuse one the provisioner would not build.
fn disk_needs_release(
    disk: &DiskRequest,
    release: &Option<String>,
    initrd: &Option<PathBuf>,
) -> Result<(), ProvisionError> {
    if disk.private_dir.is_some() && disk.attach.is_none() {
        return Err(ProvisionError::PrivateCopyWithoutDisk);
    }
    match disk.attach {
        Some(_) if release.is_none() || initrd.is_some() => Err(ProvisionError::DiskWithoutRelease),
        _ => Ok(()),
    }
}

/// The shared image of layers built in the disk form, attached as asked.
fn disk_of(layers: &Layers, request: &DiskRequest) -> Option<GpuDisk> {
    let image = layers.disk.as_ref()?;
    Some(GpuDisk {
        image: image.path.clone(),
        size: image.size,
        attach: request.attach.clone()?,
        verity: layers.verity.clone(),
        isolation: DiskIsolation::Shared,
    })
}

/// The disk on the VM's private copy when one is asked for, made after every refusal and
/// before any device moves: a failed copy leaves every device where it was.
fn private_copy(
    disk: Option<GpuDisk>,
    request: &DiskRequest,
) -> Result<Option<GpuDisk>, ProvisionError> {
    match (disk, &request.private_dir) {
        (Some(disk), Some(dir)) => {
            disk.into_private_copy(dir)
                .map(Some)
                .map_err(|source| ProvisionError::PrivateCopy {
                    dir: dir.clone(),
                    source,
                })
        }
        (disk, _) => Ok(disk),
    }
}

/// A failed attach leaves no private copy behind: the VM it was made for never ran.
fn discard_private_copy(disk: &Option<GpuDisk>) {
    if let Some(disk) = disk
        .as_ref()
        .filter(|d| d.isolation == DiskIsolation::Private)
    {
        let _ = std::fs::remove_file(&disk.image);
    }
}

fn with_disk(spec: BootSpec, disk: Option<GpuDisk>) -> BootSpec {
    match disk {
        Some(disk) => spec.with_disk(disk),
        None => spec,
    }
}
