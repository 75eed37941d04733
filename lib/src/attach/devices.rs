//! The `devices` listing: passthrough candidates (or every device), named, each with the verdict
//! a plan for it alone would give.

use serde::{Deserialize, Serialize};

use super::{AttachError, Host, PlanRequest, load_supported};
use crate::fabric::Partitions;
use crate::owner::Owner;
use crate::pci::ids::{PciIds, SupportedGpus};
use crate::pci::{DeviceKind, PciAddress, PciDevice};

/// A device as `devices` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The device.
    #[serde(flatten)]
    pub device: PciDevice,
    /// Other members of its IOMMU group.
    pub iommu_group_members: Vec<PciAddress>,
    /// Other functions of its slot.
    pub companions: Vec<PciAddress>,
    /// The owner holding it.
    pub owner: Option<Owner>,
    /// GPUs and NVSwitches: the NVLink baseboard it belongs to (see [`crate::pci::Baseboard`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseboard: Option<String>,
    /// NVIDIA GPUs: whether the open modules support it (when supported-gpus.json is known).
    pub open_modules_supported: Option<bool>,
    /// Ready to attach.
    pub ready: bool,
    /// Why not, when not ready.
    pub not_ready_because: Vec<String>,
}

/// What `devices` found: the rows, and how many PCI devices were looked at, so that an empty
/// list says why it is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceListing {
    /// PCI devices looked at.
    pub scanned: usize,
    /// Every device was listed, not only passthrough candidates.
    pub all: bool,
    /// The devices listed.
    pub devices: Vec<DeviceReport>,
    /// Why the list is empty, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Host {
    /// [`Host::devices`], with the number of PCI devices looked at and, when nothing is
    /// listed, a sentence saying so.
    pub fn listing(
        &self,
        all: bool,
        supported_gpus: Option<&std::path::Path>,
    ) -> Result<DeviceListing, AttachError> {
        let scanned = self.sysfs.addresses()?.len();
        let devices = self.devices(all, supported_gpus)?;
        let note = devices.is_empty().then(|| {
            if scanned == 0 {
                format!(
                    "no PCI devices in {}",
                    self.sysfs.root().join("bus/pci/devices").display()
                )
            } else {
                format!(
                    "no passthrough candidates among the {scanned} PCI devices looked at (none is a display controller, offers mdev types or is on vfio-pci); list every device to see them"
                )
            }
        });
        Ok(DeviceListing {
            scanned,
            all,
            devices,
            note,
        })
    }

    /// Name devices from `pci.ids` and the supported-gpus table.
    fn name(&self, d: &mut PciDevice, ids: &PciIds, gpus: Option<&SupportedGpus>) {
        d.vendor_name = ids.vendor(d.vendor_id).map(str::to_owned);
        d.device_name = gpus
            .filter(|_| d.vendor_id == crate::pci::ids::NVIDIA_VENDOR_ID)
            .and_then(|g| g.name(d.device_id))
            .or_else(|| ids.device(d.vendor_id, d.device_id))
            .map(str::to_owned);
    }

    /// Passthrough candidates (display controllers, NVSwitches, devices with mdev types and
    /// devices on vfio-pci), or every device with `all`, each with a verdict.
    pub fn devices(
        &self,
        all: bool,
        supported_gpus: Option<&std::path::Path>,
    ) -> Result<Vec<DeviceReport>, AttachError> {
        let gpus = load_supported(supported_gpus)?;
        let ids = PciIds::system();
        let state = self.journal.read()?;
        let mut out = Vec::new();
        let boards = self.sysfs.baseboards()?;
        let partitions = Partitions::new();
        for mut d in self.sysfs.devices()? {
            let candidate = d.kind == DeviceKind::Display
                || d.kind == DeviceKind::NvSwitch
                || !d.mdev_types.is_empty()
                || self.sysfs.on_vfio(d.address);
            if !all && !candidate {
                continue;
            }
            self.name(&mut d, &ids, gpus.as_ref());
            let members = d
                .iommu_group
                .map(|g| self.sysfs.group_members(g).unwrap_or_default())
                .unwrap_or_default()
                .into_iter()
                .filter(|a| *a != d.address)
                .collect();
            let companions = self
                .sysfs
                .addresses()?
                .into_iter()
                .filter(|a| *a != d.address && self.sysfs.same_slot(*a, d.address))
                .collect();
            let (ready, reasons) = if d.kind == DeviceKind::Bridge {
                (false, vec!["bridges stay with the host".to_owned()])
            } else {
                let req = PlanRequest {
                    devices: vec![d.address],
                    ..Default::default()
                };
                let plan = self.plan_with(&state, &req, None, &partitions)?;
                (
                    plan.refusals.is_empty(),
                    plan.refusals.into_iter().map(|r| r.message).collect(),
                )
            };
            out.push(DeviceReport {
                open_modules_supported: gpus
                    .as_ref()
                    .filter(|_| d.is_nvidia_gpu())
                    .map(|g| g.supports_open(d.device_id)),
                owner: state.owner_of(d.address).cloned(),
                baseboard: boards
                    .iter()
                    .find(|b| b.members().contains(&d.address))
                    .map(|b| b.id.clone()),
                iommu_group_members: members,
                companions,
                ready,
                not_ready_because: reasons,
                device: d,
            });
        }
        Ok(out)
    }
}
