//! Planning: which devices must move, what is refused (the rules are `refusals.rs`), and the
//! exact sysfs writes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::journal::JournalState;
use super::{AttachError, Host, PlanRequest, load_supported};
use crate::fabric::Partitions;
use crate::outcome::{Outcome, ReportOutcome};
use crate::owner::Owner;
use crate::pci::ids::SupportedGpus;
use crate::pci::variant::VfioDriver;
use crate::pci::{DeviceKind, PciAddress, PciDevice};
use crate::remedy::Remedy;
use crate::vmm::mmio::MmioWindow;
use crate::vmm::mmio::host_phys_bits;
use crate::vmm::topology::{self, PlaceInput, Placement};

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
    /// Already on a VFIO driver with no owner: adopted without writes.
    pub adopt: bool,
    /// The VFIO driver it goes to (a variant from the kernel's `modules.alias`, the caller's,
    /// or vfio-pci). Plans of earlier releases read as vfio-pci.
    #[serde(default = "VfioDriver::vfio_pci")]
    pub vfio: VfioDriver,
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
    /// NVLink in the guest was asked for without every GPU and NVSwitch of the baseboard.
    PartialBaseboard,
    /// A baseboard was asked for through a device on none, or NVLink for a GPU on none.
    NoBaseboard,
    /// Shared-NVSwitch mode: no free fabric partition fits, the GPUs span partitions, the
    /// partition is active already, or the fabric manager cannot be asked.
    FabricPartition,
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

/// The fabric partition an attach activates before its first bind (shared-NVSwitch mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPartition {
    /// The fabric manager's partition ID.
    pub id: u32,
    /// Its GPUs (every one of them goes to the VM).
    pub gpus: Vec<PciAddress>,
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
    /// Where the devices handed over will sit in the VM (guest bus and slot, NUMA node,
    /// switch), as the boot spec will place them ([`crate::vmm::topology`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Placement>,
    /// Shared-NVSwitch mode: the fabric partition activated for these GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PlannedPartition>,
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
        self.plan_with(&state, req, gpus.as_ref(), &Partitions::new())
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
            if self.plan_devices(state, &single, gpus)?.refusals.is_empty() {
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

    /// The plan for `req`: its baseboard and fabric partition (`nvlink.rs`) turned into
    /// devices, then [`Host::plan_devices`], then the NVLink rules.
    pub(super) fn plan_with(
        &self,
        state: &JournalState,
        req: &PlanRequest,
        gpus: Option<&SupportedGpus>,
        partitions: &Partitions,
    ) -> Result<Plan, AttachError> {
        let mut req = req.clone();
        let mut refusals = self.expand_baseboard(&mut req)?;
        let partition =
            self.place_on_partition(state, &mut req, gpus, partitions, &mut refusals)?;
        let mut plan = self.plan_devices(state, &req, gpus)?;
        plan.refusals.splice(0..0, refusals);
        plan.partition = partition;
        self.nvlink_refusals(&req, &mut plan)?;
        Ok(plan)
    }

    /// The plan for the devices `req` names (and `--gpus N` picks), with every refusal.
    pub(super) fn plan_devices(
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
            placement: Vec::new(),
            partition: None,
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
                    adopt: self.sysfs.on_vfio(dev.address) && state.owner_of(dev.address).is_none(),
                    vfio: VfioDriver::vfio_pci(),
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
        if !plan.devices.is_empty() {
            let aliases = self.modules_alias();
            for i in 0..plan.devices.len() {
                plan.devices[i].vfio = self.choose_vfio(&aliases, req, &plan.devices[i]);
            }
        }
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
                    format!("{parent} is bound to VFIO for owner {owner}: detach it first"),
                );
            }
        }
        let expanded = self.place(&devs, &mut plan);
        self.size_mmio(&devs, expanded, &mut plan);
        let mut groups: Vec<u32> = plan.devices.iter().filter_map(|p| p.iommu_group).collect();
        groups.sort_unstable();
        groups.dedup();
        plan.iommu_groups = groups;
        plan.writes = self.writes_for(&plan);
        Ok(plan)
    }

    /// The placement the boot spec will give the passed devices (in its order: as bound,
    /// GPUs first); whether they sit behind expander bridges.
    fn place(&self, devs: &BTreeMap<PciAddress, PciDevice>, plan: &mut Plan) -> bool {
        let mut inputs: Vec<PlaceInput> = plan
            .devices
            .iter()
            .filter(|p| p.passed && p.iommu_group.is_some())
            .filter_map(|p| devs.get(&p.address))
            .map(|d| PlaceInput {
                host: Some(d.address),
                numa_node: d.numa_node,
                host_switch: self.sysfs.upstream_switch_address(d.address),
                gpu: d.kind == DeviceKind::Display,
                nic: d.kind == DeviceKind::Network,
            })
            .collect();
        inputs.sort_by_key(|i| !i.gpu);
        let t = topology::place(&inputs, &crate::vmm::GUEST_SLOTS);
        let expanded = t.expanded();
        plan.placement = t.placements.into_iter().flatten().collect();
        expanded
    }

    /// The window for the passed devices' 64-bit prefetchable BARs (each device's share
    /// rounded up to its largest BAR when each sits behind a root port of its own), refused
    /// when the host CPU cannot address it (a guest cannot have more physical address bits
    /// than its host).
    fn size_mmio(&self, devs: &BTreeMap<PciAddress, PciDevice>, expanded: bool, plan: &mut Plan) {
        let bars = plan
            .devices
            .iter()
            .filter(|p| p.passed)
            .filter_map(|p| devs.get(&p.address))
            .map(|d| {
                d.bars
                    .iter()
                    .filter(|b| b.is_64bit && b.prefetchable)
                    .map(|b| b.size)
                    .collect::<Vec<u64>>()
            });
        plan.mmio = if expanded {
            MmioWindow::for_ports(bars)
        } else {
            MmioWindow::for_bars(bars.flatten())
        };
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

    fn writes_for(&self, plan: &Plan) -> Vec<SysfsWrite> {
        let mut out = Vec::new();
        for p in plan.devices.iter().filter(|p| !p.adopt) {
            let a = p.address.to_string();
            out.push(SysfsWrite {
                path: self.sysfs.device_dir(p.address).join("driver_override"),
                value: p.vfio.driver.clone().unwrap_or_else(|| {
                    format!("<the driver {} registers once loaded>", p.vfio.module)
                }),
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
