//! Planning: which devices must move, what is refused, and the exact sysfs writes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::guard::describe;
use super::holders::Holder;
use super::journal::JournalState;
use super::{AttachError, Host, PlanRequest, load_supported};
use crate::outcome::{Outcome, ReportOutcome};
use crate::owner::Owner;
use crate::pci::ids::SupportedGpus;
use crate::pci::{DeviceKind, PciAddress, PciDevice};
use crate::quarantine::Standing;
use crate::registry::ModuleFlavor;
use crate::remedy::Remedy;
use crate::vmm::MmioWindow;
use crate::vmm::mmio::host_phys_bits;

/// Why a device is in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanRole {
    /// Asked for.
    Requested,
    /// Another function of a requested device's slot (e.g. the GPU's HDMI audio).
    Companion,
    /// Another member of the IOMMU group: must leave its host driver for the group to be viable.
    GroupMember,
}

/// One device the attach would move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedDevice {
    /// The device.
    pub address: PciAddress,
    /// Why it moves.
    pub role: PlanRole,
    /// The requested device it comes with.
    pub of: PciAddress,
    /// Its IOMMU group.
    pub iommu_group: Option<u32>,
    /// Its driver now.
    pub driver: Option<String>,
    /// Its kind.
    pub kind: DeviceKind,
    /// Handed to the VM (requested and companions) rather than only held for viability.
    pub passed: bool,
    /// Already on vfio-pci with no owner: adopted without writes.
    pub adopt: bool,
}

/// Why something is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The IOMMU is off.
    IommuOff,
    /// The device does not exist.
    NoSuchDevice,
    /// The device has no IOMMU group.
    NoIommuGroup,
    /// The firmware's boot display.
    BootVga,
    /// A group member outside the requested device's slot is in use by a host driver.
    HostDeviceInUse,
    /// A process holds the device open (a VMM holding its VFIO node, a program on the GPU).
    HeldOpen,
    /// A physical function with SR-IOV virtual functions enabled.
    SriovEnabled,
    /// Attached to an owner already.
    AttachedToOwner,
    /// The release uses the open modules and the GPU is not supported by them.
    NeedsProprietaryModules,
    /// A no-GSP release for a GPU its supported-gpus.json says the proprietary modules drive
    /// only through GSP.
    NeedsGspFirmware,
    /// A proprietary release for a GPU its supported-gpus.json says only the open modules drive.
    NeedsOpenModules,
    /// The open flavor was asked for without the driver's supported-gpus.json.
    OpenSupportUnknown,
    /// The mdev type is not offered or has no free instance.
    MdevUnavailable,
    /// A bridge was asked for: bridges stay with the host.
    Bridge,
    /// The devices' 64-bit MMIO window needs more physical address bits than the host's CPU
    /// has (`/proc/cpuinfo` "address sizes"): the VM could not map their BARs.
    AddressBits,
    /// An NVSwitch would move without the rest of its baseboard (asked for alone, or only a
    /// member of a moving device's IOMMU group).
    NvSwitch,
    /// Quarantined by its health record (failure events from distinct owners).
    Quarantined,
    /// The health record cannot be read: nothing is handed out (fail closed).
    HealthUnknown,
    /// A vendor-VFIO vGPU function (a VF with `nvidia/current_vgpu_type`, or its PF): unbinding
    /// it breaks the driver's VFIO registration.
    VgpuFunction,
    /// This process does not see the host's processes (a container without `hostPID`):
    /// whoever holds a device would go unseen, so nothing is moved.
    Blind,
}

/// A refusal: the device, the reason, and a message with the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The device concerned, if any.
    pub device: Option<PciAddress>,
    /// The reason.
    pub reason: RefusalReason,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The owner holding the device, for [`RefusalReason::AttachedToOwner`].
    pub owner: Option<Owner>,
}

/// One sysfs write, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysfsWrite {
    /// The attribute.
    pub path: PathBuf,
    /// The value written.
    pub value: String,
}

/// What attach would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The requested devices (after `--gpus N` selection).
    pub requested: Vec<PciAddress>,
    /// Every device that moves, requested first.
    pub devices: Vec<PlannedDevice>,
    /// mdevs to create: (parent, type).
    pub mdevs: Vec<(PciAddress, String)>,
    /// IOMMU groups involved.
    pub iommu_groups: Vec<u32>,
    /// Refusals: attach does nothing if there is any.
    pub refusals: Vec<Refusal>,
    /// The sysfs writes attach would make, in order (rollback not shown).
    pub writes: Vec<SysfsWrite>,
    /// The 64-bit MMIO window the VM needs for the passed devices' BARs, and the guest address
    /// bits it takes (none without 64-bit prefetchable BARs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio: Option<MmioWindow>,
    /// The host CPU's physical address bits (`/proc/cpuinfo`), when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_phys_bits: Option<u8>,
}

/// A plan with refusals is refused; a boot display among them names its remedy.
impl ReportOutcome for Plan {
    fn outcome(&self) -> Option<Outcome> {
        (!self.refusals.is_empty()).then_some(Outcome::Refused)
    }

    fn remedy(&self) -> Option<Remedy> {
        self.refusals
            .iter()
            .any(|r| r.reason == RefusalReason::BootVga)
            .then_some(Remedy::AllowBootVga)
    }
}

impl Host {
    /// What attach would do, without doing it.
    pub fn plan(&self, req: &PlanRequest) -> Result<Plan, AttachError> {
        let state = self.journal.read()?;
        let gpus = load_supported(req.supported_gpus.as_deref())?;
        self.plan_with(&state, req, gpus.as_ref())
    }

    /// Free GPUs (display controllers, NVIDIA first) that could be attached alone, grouped so
    /// that `n` of them come from one NUMA node when possible.
    pub(super) fn pick_gpus(
        &self,
        state: &JournalState,
        n: usize,
        req: &PlanRequest,
        gpus: Option<&SupportedGpus>,
    ) -> Result<Vec<PciAddress>, AttachError> {
        let mut free: Vec<PciDevice> = Vec::new();
        for d in self.sysfs.devices()? {
            if d.kind != DeviceKind::Display || req.devices.contains(&d.address) {
                continue;
            }
            let single = PlanRequest {
                devices: vec![d.address],
                gpus: None,
                mdev_type: None,
                ..req.clone()
            };
            if self.plan_with(state, &single, gpus)?.refusals.is_empty() {
                free.push(d);
            }
        }
        free.sort_by_key(|d| (!d.is_nvidia_gpu(), d.address));
        let mut by_node: BTreeMap<Option<u32>, Vec<PciAddress>> = BTreeMap::new();
        for d in &free {
            by_node.entry(d.numa_node).or_default().push(d.address);
        }
        if let Some(list) = by_node.values().find(|l| l.len() >= n) {
            return Ok(list[..n].to_vec());
        }
        if free.len() < n {
            return Err(AttachError::NotEnoughGpus {
                wanted: n,
                free: free.len(),
            });
        }
        Ok(free.iter().take(n).map(|d| d.address).collect())
    }

    pub(super) fn plan_with(
        &self,
        state: &JournalState,
        req: &PlanRequest,
        gpus: Option<&SupportedGpus>,
    ) -> Result<Plan, AttachError> {
        let mut requested = req.devices.clone();
        if let Some(n) = req.gpus.filter(|n| *n > 0) {
            requested.extend(self.pick_gpus(state, n, req, gpus)?);
        }
        // `A B A` asks for A once: a second mdev or bind of it was never meant.
        let mut seen = std::collections::BTreeSet::new();
        requested.retain(|a| seen.insert(*a));
        let mut plan = Plan {
            requested: requested.clone(),
            devices: Vec::new(),
            mdevs: Vec::new(),
            iommu_groups: Vec::new(),
            refusals: Vec::new(),
            writes: Vec::new(),
            mmio: None,
            host_phys_bits: None,
        };
        let refuse = |plan: &mut Plan, device, reason, message: String| {
            plan.refusals.push(Refusal {
                device,
                reason,
                message,
                owner: None,
            })
        };
        if !self.sysfs.iommu_enabled() {
            refuse(
                &mut plan,
                None,
                RefusalReason::IommuOff,
                format!(
                    "the IOMMU is off ({} has no groups): enable it in the firmware (VT-d/AMD-Vi) and boot with intel_iommu=on iommu=pt (Intel) or amd_iommu=on iommu=pt (AMD)",
                    self.sysfs.root().join("kernel/iommu_groups").display()
                ),
            );
        }
        if let Err(blind) = self.sees_host_processes() {
            refuse(&mut plan, None, RefusalReason::Blind, blind.to_string());
        }
        let all = self.sysfs.addresses()?;
        let mut devs: BTreeMap<PciAddress, PciDevice> = BTreeMap::new();
        for &addr in &requested {
            let d = match self.sysfs.device(addr) {
                Ok(d) => d,
                Err(_) => {
                    refuse(
                        &mut plan,
                        Some(addr),
                        RefusalReason::NoSuchDevice,
                        format!("no PCI device {addr}: list the host's PCI devices"),
                    );
                    continue;
                }
            };
            if req.mdev_type.is_none()
                && let Some(message) = crate::vgpu::vgpu_role(&self.sysfs, addr)
            {
                refuse(&mut plan, Some(addr), RefusalReason::VgpuFunction, message);
                continue;
            }
            if let Some(t) = &req.mdev_type {
                match d.mdev_types.iter().find(|m| &m.id == t) {
                    Some(m) if m.available_instances > 0 => plan.mdevs.push((addr, t.clone())),
                    Some(_) => refuse(
                        &mut plan,
                        Some(addr),
                        RefusalReason::MdevUnavailable,
                        format!(
                            "{addr} has no free instance of mdev type {t}: detach an owner using it or pick another type"
                        ),
                    ),
                    None => refuse(
                        &mut plan,
                        Some(addr),
                        RefusalReason::MdevUnavailable,
                        format!("{addr} offers no mdev type `{t}`: list the device's mdev types"),
                    ),
                }
                continue;
            }
            let add = |plan: &mut Plan, dev: &PciDevice, role, of| {
                if plan.devices.iter().any(|p| p.address == dev.address) {
                    return;
                }
                plan.devices.push(PlannedDevice {
                    address: dev.address,
                    role,
                    of,
                    iommu_group: dev.iommu_group,
                    driver: dev.driver.clone(),
                    kind: dev.kind,
                    passed: role != PlanRole::GroupMember,
                    adopt: dev.driver.as_deref() == Some("vfio-pci")
                        && state.owner_of(dev.address).is_none(),
                });
            };
            add(&mut plan, &d, PlanRole::Requested, addr);
            let mut slot_mates = Vec::new();
            for other in all
                .iter()
                .filter(|a| **a != addr && self.sysfs.same_slot(**a, addr))
            {
                if let Ok(o) = self.sysfs.device(*other)
                    && o.kind != DeviceKind::Bridge
                {
                    add(&mut plan, &o, PlanRole::Companion, addr);
                    slot_mates.push(o);
                }
            }
            let mut groups: Vec<u32> = d.iommu_group.into_iter().collect();
            groups.extend(slot_mates.iter().filter_map(|o| o.iommu_group));
            for g in groups {
                for m in self.sysfs.group_members(g).unwrap_or_default() {
                    if let Ok(o) = self.sysfs.device(m)
                        && o.kind != DeviceKind::Bridge
                    {
                        let role = if requested.contains(&m) {
                            PlanRole::Requested
                        } else {
                            PlanRole::GroupMember
                        };
                        add(&mut plan, &o, role, addr);
                        devs.insert(m, o);
                    }
                }
            }
            for o in slot_mates {
                devs.insert(o.address, o);
            }
            devs.insert(addr, d);
        }
        // Requested devices first, then in address order within each role.
        plan.devices
            .sort_by_key(|p| (p.role != PlanRole::Requested, p.address));
        for p in plan.devices.clone() {
            let Some(d) = devs.get(&p.address) else {
                continue;
            };
            self.refusals_for(state, req, gpus, &p, d, &mut plan);
        }
        for (parent, _) in plan.mdevs.clone() {
            if let Some((reason, message)) = self.quarantine_refusal(parent) {
                refuse(&mut plan, Some(parent), reason, message);
            }
            if let Some(owner) = state.bound_to(parent) {
                refuse(
                    &mut plan,
                    Some(parent),
                    RefusalReason::AttachedToOwner,
                    format!("{parent} is bound to vfio-pci for owner {owner}: detach it first"),
                );
            }
        }
        self.size_mmio(&devs, &mut plan);
        let mut groups: Vec<u32> = plan.devices.iter().filter_map(|p| p.iommu_group).collect();
        groups.sort_unstable();
        groups.dedup();
        plan.iommu_groups = groups;
        plan.writes = self.writes_for(&plan);
        Ok(plan)
    }

    /// The window for the passed devices' 64-bit prefetchable BARs, refused when the host CPU
    /// cannot address it (a guest cannot have more physical address bits than its host).
    fn size_mmio(&self, devs: &BTreeMap<PciAddress, PciDevice>, plan: &mut Plan) {
        let bars = plan
            .devices
            .iter()
            .filter(|p| p.passed)
            .filter_map(|p| devs.get(&p.address))
            .flat_map(|d| d.bars.iter())
            .filter(|b| b.is_64bit && b.prefetchable)
            .map(|b| b.size);
        plan.mmio = MmioWindow::for_bars(bars);
        let cpuinfo = self.proc_root.join("cpuinfo");
        plan.host_phys_bits = std::fs::read_to_string(&cpuinfo)
            .ok()
            .and_then(|t| host_phys_bits(&t));
        if let (Some(w), Some(host)) = (plan.mmio, plan.host_phys_bits)
            && w.guest_phys_bits > host
        {
            plan.refusals.push(Refusal {
                device: None,
                reason: RefusalReason::AddressBits,
                message: format!(
                    "the devices' 64-bit BARs ({} GiB, largest {} GiB) need a {} GiB MMIO window, which takes {} physical address bits; this host's CPU has {host} ({}): the VM could not map them; pass fewer devices, or use a host whose CPU has more address bits",
                    w.bar_bytes >> 30,
                    w.largest_bar >> 30,
                    w.window_gib(),
                    w.guest_phys_bits,
                    cpuinfo.display()
                ),
                owner: None,
            });
        }
    }

    fn refusals_for(
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
            && driver != "vfio-pci"
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
                    "{addr} is on vfio-pci with no owner here, and in use: {who}; a VM outside this tool has it: stop that VM first"
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
    fn nvswitch_refusal(
        &self,
        req: &PlanRequest,
        p: &PlannedDevice,
        refuse: &mut impl FnMut(RefusalReason, String, Option<Owner>),
    ) {
        let addr = p.address;
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
    fn quarantine_refusal(&self, addr: PciAddress) -> Option<(RefusalReason, String)> {
        match self.quarantine.standing(addr) {
            Standing::InService => None,
            Standing::Quarantined(why) => Some((RefusalReason::Quarantined, why)),
            Standing::Unknown(why) => Some((RefusalReason::HealthUnknown, why)),
        }
    }

    fn writes_for(&self, plan: &Plan) -> Vec<SysfsWrite> {
        let mut out = Vec::new();
        for p in plan.devices.iter().filter(|p| !p.adopt) {
            let a = p.address.to_string();
            out.push(SysfsWrite {
                path: self.sysfs.device_dir(p.address).join("driver_override"),
                value: "vfio-pci".into(),
            });
            if let Some(d) = &p.driver {
                out.push(SysfsWrite {
                    path: self.sysfs.driver_dir(d).join("unbind"),
                    value: a.clone(),
                });
            }
            out.push(SysfsWrite {
                path: self.sysfs.drivers_probe(),
                value: a,
            });
        }
        for (parent, t) in &plan.mdevs {
            out.push(SysfsWrite {
                path: self
                    .sysfs
                    .device_dir(*parent)
                    .join("mdev_supported_types")
                    .join(t)
                    .join("create"),
                value: "<new uuid>".into(),
            });
        }
        out
    }
}
