//! The rules that refuse a planned device: on a host driver a process uses, the boot display,
//! owned by another, quarantined or suspect, a group member that cannot move, an NVSwitch taken
//! without its whole board, a GPU the release's driver does not support.

use super::guard::describe;
use super::holders::Holder;
use super::journal::JournalState;
use super::plan::{Plan, PlanRole, PlannedDevice, Refusal, RefusalReason};
use super::{AttachError, Host, PlanRequest};
use crate::owner::Owner;
use crate::pci::ids::SupportedGpus;
use crate::pci::{DeviceKind, PciAddress, PciDevice};
use crate::quarantine::Standing;
use crate::registry::ModuleFlavor;

impl Host {
    pub(super) fn refusals_for(
        &self,
        state: &JournalState,
        req: &PlanRequest,
        gpus: Option<&SupportedGpus>,
        p: &PlannedDevice,
        d: &PciDevice,
        plan: &mut Plan,
    ) {
        let addr = p.address;
        let mut refuse = |reason, message: String, owner: Option<Owner>| {
            plan.refusals.push(Refusal {
                device: Some(addr),
                reason,
                message,
                owner,
            })
        };
        if let Some(t) = state
            .transactions
            .iter()
            .find(|t| t.devices.iter().any(|d| d.device == addr))
        {
            refuse(
                RefusalReason::AttachedToOwner,
                format!(
                    "{addr} is in a transaction for owner {} that did not finish (pid {}): if that process is gone, reconcile",
                    t.owner, t.pid
                ),
                Some(t.owner.clone()),
            );
        } else if let Some(owner) = state.owner_of(addr) {
            let whose = if req.owner.as_ref() == Some(owner) {
                " (this owner already holds it)"
            } else {
                ""
            };
            refuse(
                RefusalReason::AttachedToOwner,
                format!("{addr} is attached to owner {owner}{whose}: detach owner {owner} first"),
                Some(owner.clone()),
            );
        }
        if p.passed
            && let Some((reason, message)) = self.quarantine_refusal(addr)
        {
            refuse(reason, message, None);
        }
        if self.sysfs.iommu_enabled() && d.iommu_group.is_none() {
            refuse(
                RefusalReason::NoIommuGroup,
                format!(
                    "{addr} has no IOMMU group: check that the IOMMU covers this device (dmesg | grep -i iommu)"
                ),
                None,
            );
        }
        if d.kind == DeviceKind::Bridge {
            refuse(
                RefusalReason::Bridge,
                format!(
                    "{addr} is a PCI bridge: bridges stay with the host; name the devices behind it instead"
                ),
                None,
            );
        }
        if d.kind == DeviceKind::NvSwitch {
            self.nvswitch_refusal(req, p, &mut refuse);
        }
        if d.boot_vga && !req.allow_boot_vga {
            refuse(
                RefusalReason::BootVga,
                format!(
                    "{addr} is the boot display (boot_vga=1): the host console would go dark; allow moving the boot display only if the host has another display or runs headless"
                ),
                None,
            );
        }
        // Any group member on a host driver that is not a function of the requested device's
        // own slot (those are `Companion`) would leave the host: chipset USB, SMBus, an LPC
        // bridge, a disk, a NIC. Only naming it moves it.
        if p.role == PlanRole::GroupMember
            && let Some(driver) = &d.driver
            && !crate::pci::variant::is_vfio_driver(self.sysfs.root(), driver)
            && driver != "pci-stub"
        {
            refuse(
                RefusalReason::HostDeviceInUse,
                format!(
                    "{addr} (class {:06x} on {driver}) shares IOMMU group {} with {}: moving it would take it from the host; name it explicitly to move it too, or put the GPU in a slot with its own group (ACS)",
                    d.class,
                    d.iommu_group.unwrap_or_default(),
                    p.of
                ),
                None,
            );
        }
        if let Some(n) = d.sriov_num_vfs.filter(|n| *n > 0) {
            refuse(
                RefusalReason::SriovEnabled,
                format!(
                    "{addr} is an SR-IOV physical function with {n} virtual functions enabled: moving it would remove them from the host and from whatever uses them; attach a virtual function instead, or disable them first (write 0 to {}/sriov_numvfs)",
                    self.sysfs.device_dir(addr).display()
                ),
                None,
            );
        }
        let in_use = |held: Result<Vec<Holder>, AttachError>| match held {
            Ok(h) if h.is_empty() => None,
            Ok(h) => Some(describe(&h)),
            Err(e) => Some(e.to_string()),
        };
        if p.adopt
            && let Some(who) = in_use(self.held_by(&self.vfio_nodes(addr, d.iommu_group)))
        {
            refuse(
                RefusalReason::HeldOpen,
                format!(
                    "{addr} is on {} with no owner here, and in use: {who}; a VM outside this tool has it: stop that VM first",
                    d.driver.as_deref().unwrap_or("vfio-pci")
                ),
                None,
            );
        }
        if d.driver.as_deref() == Some("nvidia")
            && let Some(who) = in_use(self.gpu_clients(addr, false))
        {
            refuse(
                RefusalReason::HeldOpen,
                format!(
                    "{addr} is in use on the host: {who}; close those programs first (unbinding a GPU in use blocks in the kernel)"
                ),
                None,
            );
        }
        if req.flavor == Some(ModuleFlavor::Open) && d.is_nvidia_gpu() {
            match gpus {
                None => refuse(
                    RefusalReason::OpenSupportUnknown,
                    format!(
                        "cannot tell whether the open modules support {addr} ({:04x}): pass the driver's supported-gpus.json",
                        d.device_id
                    ),
                    None,
                ),
                Some(g) if !g.supports_open(d.device_id) => refuse(
                    RefusalReason::NeedsProprietaryModules,
                    format!(
                        "{addr} ({:04x}{}) needs the proprietary modules: the driver's supported-gpus.json does not list `kernelopen` for it; use a release with the proprietary flavor",
                        d.device_id,
                        g.name(d.device_id)
                            .map(|n| format!(", {n}"))
                            .unwrap_or_default()
                    ),
                    None,
                ),
                Some(_) => {}
            }
        }
    }

    /// An NVSwitch moves only when the request names its whole baseboard (every GPU and
    /// NVSwitch of it): alone it is useless to a VM and takes the fabric from the host's GPUs.
    /// In shared-NVSwitch mode it never moves: the host's fabric manager drives it.
    fn nvswitch_refusal(
        &self,
        req: &PlanRequest,
        p: &PlannedDevice,
        refuse: &mut impl FnMut(RefusalReason, String, Option<Owner>),
    ) {
        let addr = p.address;
        if self.shared_nvswitch() {
            refuse(
                RefusalReason::NvSwitch,
                format!(
                    "{addr} is an NVSwitch and this host runs shared-NVSwitch mode: NVSwitches stay on nvidia for the host's fabric manager; ask for GPUs only, which go to the VM in a fabric partition"
                ),
                None,
            );
            return;
        }
        let board = match self.sysfs.baseboard_of(addr) {
            Ok(Some(b)) => b,
            Ok(None) | Err(_) => {
                refuse(
                    RefusalReason::NvSwitch,
                    format!(
                        "{addr} is an NVSwitch whose baseboard cannot be told from sysfs: it stays with the host"
                    ),
                    None,
                );
                return;
            }
        };
        let missing: Vec<String> = board
            .members()
            .into_iter()
            .filter(|m| !req.devices.contains(m))
            .map(|m| m.to_string())
            .collect();
        if p.role != PlanRole::Requested {
            refuse(
                RefusalReason::NvSwitch,
                format!(
                    "{addr} is an NVSwitch of baseboard {} in IOMMU group {} with {}: it moves only with its whole baseboard; request the baseboard, or put the device in a slot with its own group",
                    board.id,
                    p.iommu_group.map_or("-".to_owned(), |g| g.to_string()),
                    p.of
                ),
                None,
            );
        } else if !missing.is_empty() || board.gpus.is_empty() {
            refuse(
                RefusalReason::NvSwitch,
                format!(
                    "{addr} is an NVSwitch of baseboard {}: it moves only with the whole baseboard; missing: {}",
                    board.id,
                    if board.gpus.is_empty() {
                        "its GPUs cannot be told from sysfs (several boards in one PCI domain)"
                            .to_owned()
                    } else {
                        missing.join(" ")
                    }
                ),
                None,
            );
        }
    }

    /// The quarantine refusal for `addr`, if any (health that cannot be told refuses too).
    pub(super) fn quarantine_refusal(&self, addr: PciAddress) -> Option<(RefusalReason, String)> {
        match self.quarantine.standing(addr) {
            Standing::InService => None,
            Standing::Quarantined(why) => Some((RefusalReason::Quarantined, why)),
            Standing::Unknown(why) => Some((RefusalReason::HealthUnknown, why)),
        }
    }
}
