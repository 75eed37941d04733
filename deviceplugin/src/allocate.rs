//! Allocate: re-check each device's IOMMU group, move its journal records to the allocation,
//! and say which device nodes and environment the container gets.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use gpu_passthrough::attach::journal::{Attachment, DeviceRecord, LockedJournal, VgpuRecord};
use gpu_passthrough::attach::{Host, Owner};
use gpu_passthrough::pci::{DeviceKind, PciAddress};

use crate::inventory::{ALLOC_PREFIX, Problem, is_plugin_owner, problems};
use crate::naming::{Namer, ResourceKind, env_var};
use crate::{PluginError, Quarantine};

/// A device node for the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceNode {
    /// Where it is on the host.
    pub host_path: PathBuf,
    /// Where the container sees it.
    pub container_path: PathBuf,
}

/// What one container gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerAllocation {
    /// Environment variables (KubeVirt's `PCI_RESOURCE_<NAME>` or `MDEV_PCI_RESOURCE_<NAME>`).
    pub envs: BTreeMap<String, String>,
    /// Device nodes, in order, without duplicates.
    pub devices: Vec<DeviceNode>,
}

/// A recorded allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// The journal owner now holding the devices.
    pub owner: Owner,
    /// One answer per container request.
    pub containers: Vec<ContainerAllocation>,
}

/// Why an allocation is refused (nothing was recorded).
#[derive(Debug, thiserror::Error)]
pub enum AllocateError {
    /// The ID is not a PCI address this plugin serves.
    #[error("{0} is not a device this plugin serves")]
    UnknownDevice(String),
    /// A vGPU cannot be handed out.
    #[error(
        "vGPU {id} cannot be handed out: {problem}; the node needs attention (reconcile, or release and create it again)"
    )]
    UnfitVgpu {
        /// The vGPU's ID.
        id: String,
        /// What is wrong.
        problem: Problem,
    },
    /// Another owner holds the device.
    #[error(
        "{device} is held by owner {owner}, not by the device plugin; detach it on the node first"
    )]
    HeldByOther {
        /// The device.
        device: PciAddress,
        /// Its owner.
        owner: Owner,
    },
    /// The device belongs to another resource.
    #[error("{device} is a {actual} device, not {requested}")]
    WrongResource {
        /// The device.
        device: PciAddress,
        /// Its resource.
        actual: String,
        /// The resource asked for.
        requested: String,
    },
    /// A device or a member of its group no longer passes the checks.
    #[error(
        "{device} cannot be handed out: {member} is {problem}; the node needs attention (reconcile or re-prepare the GPU)"
    )]
    Unfit {
        /// The device asked for.
        device: PciAddress,
        /// The device or group member at fault.
        member: PciAddress,
        /// What is wrong.
        problem: Problem,
    },
    /// The host has iommufd but a function has no VFIO character device.
    #[error("{device} has no vfio-dev/vfioN entry although the host has /dev/iommu")]
    NoVfioCdev {
        /// The function.
        device: PciAddress,
    },
    /// The request names a device twice (in one container or across containers).
    #[error("{0} is asked for more than once in one Allocate; each device can be handed out once")]
    Duplicate(String),
    /// Reading sysfs or the journal failed.
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn new_owner() -> Owner {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Owner::new(&format!("{ALLOC_PREFIX}{ms}-{}-{seq}", std::process::id())).expect("valid owner")
}

fn node(host: &Host, rel: &str) -> DeviceNode {
    DeviceNode {
        host_path: host.dev_dir().join(rel),
        container_path: PathBuf::from("/dev").join(rel),
    }
}

fn push(list: &mut Vec<DeviceNode>, n: DeviceNode) {
    if !list.contains(&n) {
        list.push(n);
    }
}

/// A kubelet never asks for one device twice; a request that does is refused whole rather
/// than answered with a device listed for two containers.
fn refuse_duplicates(containers: &[Vec<String>]) -> Result<(), AllocateError> {
    let mut seen = std::collections::BTreeSet::new();
    for id in containers.iter().flatten() {
        if !seen.insert(id.as_str()) {
            return Err(AllocateError::Duplicate(id.clone()));
        }
    }
    Ok(())
}

/// Check and record an allocation of `containers` (device IDs per container) of `resource`,
/// all or nothing, under the journal lock.
pub fn allocate(
    host: &Host,
    namer: &Namer,
    quarantine: &dyn Quarantine,
    resource: &str,
    containers: &[Vec<String>],
) -> Result<Allocation, AllocateError> {
    refuse_duplicates(containers)?;
    let sysfs = host.sysfs();
    let mut j = host.journal().lock().map_err(PluginError::from)?;
    let is_vgpu_resource = j
        .state
        .attachments
        .iter()
        .filter(|a| is_plugin_owner(&a.owner))
        .flat_map(|a| a.vgpus.iter())
        .any(|v| crate::vgpu::resource_name(&v.profile) == resource);
    if is_vgpu_resource {
        return allocate_vgpus(host, j, quarantine, resource, containers);
    }
    let iommufd = host.dev_dir().join("iommu").exists();
    let mut moving: Vec<PciAddress> = Vec::new();
    let mut answers = Vec::new();
    for ids in containers {
        let mut answer = ContainerAllocation::default();
        let mut addrs = Vec::new();
        push(&mut answer.devices, node(host, "vfio/vfio"));
        if iommufd {
            push(&mut answer.devices, node(host, "iommu"));
        }
        for id in ids {
            let addr: PciAddress = id
                .parse()
                .map_err(|_| AllocateError::UnknownDevice(id.clone()))?;
            let rec = j
                .state
                .attachments
                .iter()
                .filter(|a| is_plugin_owner(&a.owner))
                .flat_map(|a| a.devices.iter())
                .find(|d| d.device == addr && d.passed)
                .cloned();
            let Some(rec) = rec else {
                return Err(match j.state.owner_of(addr) {
                    Some(o) => AllocateError::HeldByOther {
                        device: addr,
                        owner: o.clone(),
                    },
                    None => AllocateError::UnknownDevice(id.clone()),
                });
            };
            let dev = sysfs
                .device(addr)
                .map_err(|_| AllocateError::UnknownDevice(id.clone()))?;
            let (actual, _) = namer.resource_name(&dev);
            if actual != resource {
                return Err(AllocateError::WrongResource {
                    device: addr,
                    actual,
                    requested: resource.to_owned(),
                });
            }
            let unfit = |member, problem| AllocateError::Unfit {
                device: addr,
                member,
                problem,
            };
            if let Some(p) = problems(sysfs, host.dev_dir(), addr, rec.iommu_group, quarantine)
                .into_iter()
                .next()
            {
                return Err(unfit(addr, p));
            }
            // problems() reports a device without a group; a plugin serving the kubelet must
            // not panic should that ever change.
            let Some(group) = rec.iommu_group else {
                let now = sysfs.iommu_group(addr);
                return Err(unfit(
                    addr,
                    Problem::GroupChanged {
                        recorded: None,
                        now,
                    },
                ));
            };
            // Every journaled member of the group is still in it ...
            let held: Vec<DeviceRecord> = j
                .state
                .attachments
                .iter()
                .filter(|a| is_plugin_owner(&a.owner))
                .flat_map(|a| a.devices.iter())
                .filter(|d| d.iommu_group == Some(group) || d.device.same_slot(&addr))
                .cloned()
                .collect();
            for h in &held {
                let now = sysfs.iommu_group(h.device);
                if now != h.iommu_group {
                    return Err(unfit(
                        h.device,
                        Problem::GroupChanged {
                            recorded: h.iommu_group,
                            now,
                        },
                    ));
                }
            }
            // ... and every member of the group now is on vfio-pci (bridges stay on the host).
            let members = sysfs
                .group_members(group)
                .map_err(|e| PluginError::from(gpu_passthrough::attach::AttachError::from(e)))?;
            for m in &members {
                let d = sysfs.device(*m).map_err(|e| {
                    PluginError::from(gpu_passthrough::attach::AttachError::from(e))
                })?;
                if d.kind == DeviceKind::Bridge {
                    continue;
                }
                if !sysfs.on_vfio(*m) {
                    return Err(unfit(*m, Problem::NotOnVfio(d.driver)));
                }
                if iommufd {
                    let cdev =
                        vfio_cdev(sysfs, *m).ok_or(AllocateError::NoVfioCdev { device: *m })?;
                    push(
                        &mut answer.devices,
                        node(host, &format!("vfio/devices/{cdev}")),
                    );
                }
            }
            push(&mut answer.devices, node(host, &format!("vfio/{group}")));
            moving.extend(held.iter().map(|h| h.device));
            addrs.push(addr.to_string());
        }
        if !addrs.is_empty() {
            answer
                .envs
                .insert(env_var(ResourceKind::Pci, resource), addrs.join(","));
        }
        answers.push(answer);
    }
    // Record: the devices leave the pool (or an earlier allocation the kubelet has ended, since
    // it only hands out devices it considers free) for the new allocation's owner.
    moving.sort();
    moving.dedup();
    let owner = new_owner();
    record(&mut j, host, &owner, |att, new| {
        let (out, keep) = att
            .devices
            .drain(..)
            .partition(|d| moving.contains(&d.device));
        att.devices = keep;
        new.devices.extend(out);
    })?;
    tracing::info!("allocated {moving:?} of {resource} to {owner}");
    Ok(Allocation {
        owner,
        containers: answers,
    })
}

/// A function's VFIO character device (`vfio-dev/vfioN`), on hosts with iommufd.
fn vfio_cdev(sysfs: &gpu_passthrough::pci::Sysfs, device: PciAddress) -> Option<String> {
    std::fs::read_dir(sysfs.device_dir(device).join("vfio-dev"))
        .ok()?
        .find_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            (n.starts_with("vfio") && n[4..].parse::<u32>().is_ok()).then_some(n)
        })
}

/// Move what `take` picks out of each of the plugin's attachments into `owner`'s new one (the
/// kubelet hands out only what it considers free, so an ended allocation gives its share too),
/// drop the plugin attachments left empty, and save.
fn record(
    j: &mut LockedJournal,
    host: &Host,
    owner: &Owner,
    mut take: impl FnMut(&mut Attachment, &mut Attachment),
) -> Result<(), AllocateError> {
    let mut new = Attachment {
        owner: owner.clone(),
        owner_process: None,
        devices: Vec::new(),
        vgpus: Vec::new(),
        boot_id: host.boot_id(),
        fabric_partitions: Vec::new(),
    };
    for att in j
        .state
        .attachments
        .iter_mut()
        .filter(|a| is_plugin_owner(&a.owner))
    {
        take(att, &mut new);
    }
    if is_empty(&new) {
        // Nothing moved (no device asked for): nothing to record.
        return Ok(());
    }
    j.state
        .attachments
        .retain(|a| !(is_plugin_owner(&a.owner) && is_empty(a)));
    j.state.attachments.push(new);
    j.save().map_err(PluginError::from)?;
    Ok(())
}

fn is_empty(a: &Attachment) -> bool {
    a.devices.is_empty() && a.vgpus.is_empty()
}

/// Allocate vGPUs of `resource`: each ID names a verified vGPU of the plugin's pool (or of an
/// allocation the kubelet has ended), still fit; its record moves to the new allocation.
fn allocate_vgpus(
    host: &Host,
    mut j: LockedJournal,
    quarantine: &dyn Quarantine,
    resource: &str,
    containers: &[Vec<String>],
) -> Result<Allocation, AllocateError> {
    use crate::vgpu;
    let sysfs = host.sysfs();
    let iommufd = host.dev_dir().join("iommu").exists();
    let pool: Vec<VgpuRecord> = j
        .state
        .attachments
        .iter()
        .filter(|a| is_plugin_owner(&a.owner))
        .flat_map(|a| a.vgpus.iter().cloned())
        .collect();
    let mut moving: Vec<String> = Vec::new();
    let mut answers = Vec::new();
    for ids in containers {
        let mut answer = ContainerAllocation::default();
        push(&mut answer.devices, node(host, "vfio/vfio"));
        if iommufd {
            push(&mut answer.devices, node(host, "iommu"));
        }
        let mut kind = None;
        let mut given = Vec::new();
        for id in ids {
            let rec = pool
                .iter()
                .find(|v| vgpu::id(v).as_deref() == Some(id.as_str()))
                .ok_or_else(|| AllocateError::UnknownDevice(id.clone()))?;
            let actual = vgpu::resource_name(&rec.profile);
            if actual != resource {
                return Err(AllocateError::UnknownDevice(format!(
                    "{id} (a {actual} vGPU, not {resource})"
                )));
            }
            if let Some(problem) = vgpu::problems(sysfs, host.dev_dir(), rec, quarantine)
                .into_iter()
                .next()
            {
                return Err(AllocateError::UnfitVgpu {
                    id: id.clone(),
                    problem,
                });
            }
            let Some(group) = rec.iommu_group else {
                let problem = Problem::GroupChanged {
                    recorded: None,
                    now: None,
                };
                return Err(AllocateError::UnfitVgpu {
                    id: id.clone(),
                    problem,
                });
            };
            // A vendor-VFIO VF is a PCI function: on iommufd hosts the VMM opens its cdev.
            if let (true, Some(vf)) = (iommufd, rec.vf) {
                let cdev = vfio_cdev(sysfs, vf).ok_or(AllocateError::NoVfioCdev { device: vf })?;
                push(
                    &mut answer.devices,
                    node(host, &format!("vfio/devices/{cdev}")),
                );
            }
            push(&mut answer.devices, node(host, &format!("vfio/{group}")));
            kind = Some(vgpu::kind(rec.framework));
            given.push(id.clone());
            moving.push(id.clone());
        }
        if let Some(kind) = kind {
            answer.envs.insert(env_var(kind, resource), given.join(","));
        }
        answers.push(answer);
    }
    let owner = new_owner();
    record(&mut j, host, &owner, |att, new| {
        let (out, keep) = att
            .vgpus
            .drain(..)
            .partition(|v| vgpu::id(v).is_some_and(|id| moving.contains(&id)));
        att.vgpus = keep;
        new.vgpus.extend(out);
    })?;
    tracing::info!("allocated vGPUs {moving:?} of {resource} to {owner}");
    Ok(Allocation {
        owner,
        containers: answers,
    })
}
