//! NVLink: a whole baseboard taken as one request, NVLink in the guest refused for a partial
//! board, and shared-NVSwitch mode (the fabric manager on the host): the free partition of
//! exactly N GPUs, activated before the first bind and deactivated once its GPUs are back.
//!
//! Full passthrough (no fabric manager here): `--baseboard` adds every GPU and NVSwitch of the
//! board (`pci::baseboard`'s rule) to the request; `--nvlink` refuses a request that holds a
//! board's GPUs or NVSwitches without all of them, naming the missing ones.
//! Shared-NVSwitch mode: NVSwitches never move; `--gpus N` takes a free partition of exactly
//! N GPUs (every GPU of it passable: not quarantined, not attached), preferring one on a
//! single NUMA node, then the node with the most unattached GPUs, then the lowest ID; named
//! GPUs must be exactly one partition's, or they are refused as spanning partitions.

use std::collections::{BTreeMap, BTreeSet};

use super::journal::{JournalState, LockedJournal, PartitionRecord};
use super::plan::{Plan, PlannedPartition, Refusal, RefusalReason};
use super::{Aftermath, AttachError, Host, PlanRequest};
use crate::fabric::{Partition, Partitions};
use crate::failpoint::Failpoint;
use crate::pci::ids::SupportedGpus;
use crate::pci::{DeviceKind, PciAddress};

fn refusal(device: Option<PciAddress>, reason: RefusalReason, message: String) -> Refusal {
    Refusal {
        device,
        reason,
        message,
        owner: None,
    }
}

fn joined(addrs: &[PciAddress]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Host {
    /// Whether the host runs shared-NVSwitch mode (a fabric manager is configured).
    pub fn shared_nvswitch(&self) -> bool {
        self.fabric.is_some()
    }

    /// `req.fabric.baseboard` turned into its members (only its GPUs in shared-NVSwitch
    /// mode); a device on no board is refused.
    pub(super) fn expand_baseboard(
        &self,
        req: &mut PlanRequest,
    ) -> Result<Vec<Refusal>, AttachError> {
        let Some(member) = req.fabric.baseboard else {
            return Ok(Vec::new());
        };
        let board = match self.sysfs.baseboard_of(member)? {
            Some(b) if !b.gpus.is_empty() => b,
            Some(b) => {
                return Ok(vec![refusal(
                    Some(member),
                    RefusalReason::NoBaseboard,
                    format!(
                        "the GPUs of baseboard {} cannot be told from sysfs (several boards share its PCI domain): name its GPUs and NVSwitches instead",
                        b.id
                    ),
                )]);
            }
            None => {
                return Ok(vec![refusal(
                    Some(member),
                    RefusalReason::NoBaseboard,
                    format!(
                        "{member} is on no NVLink baseboard (no NVSwitch in its PCI domain): name the devices instead of a baseboard"
                    ),
                )]);
            }
        };
        let mut members = board.gpus.clone();
        if !self.shared_nvswitch() {
            members.extend(board.nvswitches.iter().copied());
        }
        for m in members {
            if !req.devices.contains(&m) {
                req.devices.push(m);
            }
        }
        Ok(Vec::new())
    }

    /// NVLink in the guest (full passthrough): every board the request touches comes whole.
    pub(super) fn nvlink_refusals(
        &self,
        req: &PlanRequest,
        plan: &mut Plan,
    ) -> Result<(), AttachError> {
        if !req.fabric.nvlink || self.shared_nvswitch() {
            // Shared-NVSwitch mode: the partition is what gives the guest NVLink.
            return Ok(());
        }
        let boards = self.sysfs.baseboards()?;
        let asked = &plan.requested;
        for &a in asked {
            let is_gpu = self.sysfs.device(a).is_ok_and(|d| d.is_nvidia_gpu());
            if is_gpu && !boards.iter().any(|b| b.gpus.contains(&a)) {
                plan.refusals.push(refusal(
                    Some(a),
                    RefusalReason::NoBaseboard,
                    format!(
                        "NVLink in the guest was asked for, and {a} is on no NVLink baseboard this host can tell (no NVSwitch in its PCI domain): ask without NVLink"
                    ),
                ));
            }
        }
        for b in boards
            .iter()
            .filter(|b| b.members().iter().any(|m| asked.contains(m)))
        {
            let missing: Vec<PciAddress> = b
                .members()
                .into_iter()
                .filter(|m| !asked.contains(m))
                .collect();
            if !missing.is_empty() {
                plan.refusals.push(refusal(
                    None,
                    RefusalReason::PartialBaseboard,
                    format!(
                        "NVLink in the guest needs the whole baseboard {}: missing {}; ask for the baseboard (every GPU and NVSwitch of it in one transaction: --baseboard {})",
                        b.id,
                        joined(&missing),
                        b.members()[0]
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Shared-NVSwitch mode: the partition the request takes, its GPUs added to the request
    /// (`--gpus N` becomes the chosen partition's GPUs); what cannot be placed is refused.
    pub(super) fn place_on_partition(
        &self,
        state: &JournalState,
        req: &mut PlanRequest,
        gpus: Option<&SupportedGpus>,
        partitions: &Partitions,
        refusals: &mut Vec<Refusal>,
    ) -> Result<Option<PlannedPartition>, AttachError> {
        let Some(fm) = &self.fabric else {
            return Ok(None);
        };
        let refuse = |refusals: &mut Vec<Refusal>, device, message| {
            refusals.push(refusal(device, RefusalReason::FabricPartition, message));
            Ok(None)
        };
        let wanted = req.gpus.take().filter(|n| *n > 0);
        let mut asked: Vec<PciAddress> = req
            .devices
            .iter()
            .copied()
            .filter(|a| self.sysfs.device(*a).is_ok_and(|d| d.is_nvidia_gpu()))
            .collect();
        asked.sort();
        asked.dedup();
        if wanted.is_none() && asked.is_empty() {
            // No GPU asked for (a NIC alone, say): no partition, and no need to ask.
            return Ok(None);
        }
        let partitions = match partitions.get_or_init(|| fm.partitions()) {
            Ok(p) => p,
            Err(e) => {
                return refuse(
                    refusals,
                    None,
                    format!(
                        "shared-NVSwitch mode: the fabric manager's partitions cannot be read ({}): nothing moves until it answers",
                        crate::error_chain(e)
                    ),
                );
            }
        };
        if wanted.is_some() && !asked.is_empty() {
            return refuse(
                refusals,
                asked.first().copied(),
                format!(
                    "shared-NVSwitch mode: GPUs {} are named and a number of GPUs is asked for too; GPUs go to a VM as one fabric partition: name exactly one partition's GPUs, or ask for a number",
                    joined(&asked)
                ),
            );
        }
        let chosen = if let Some(n) = wanted {
            match self.pick_partition(state, n, req, gpus, partitions)? {
                Ok(p) => p,
                Err(message) => return refuse(refusals, None, message),
            }
        } else {
            match partitions.iter().find(|p| p.gpus == asked) {
                Some(p) => p.clone(),
                None => {
                    let holding: Vec<String> = partitions
                        .iter()
                        .filter(|p| p.gpus.iter().any(|g| asked.contains(g)))
                        .map(|p| format!("{} ({})", p.id, joined(&p.gpus)))
                        .collect();
                    return refuse(
                        refusals,
                        asked.first().copied(),
                        format!(
                            "GPUs {} span fabric partitions: no partition is exactly them (partitions holding them: {}); ask for exactly one partition's GPUs, or for a number of GPUs and a free partition of that size is chosen",
                            joined(&asked),
                            if holding.is_empty() {
                                "none".to_owned()
                            } else {
                                holding.join(", ")
                            }
                        ),
                    );
                }
            }
        };
        if chosen.active {
            return refuse(
                refusals,
                None,
                format!(
                    "fabric partition {} ({}) is active already: another VM has it, or it was activated outside this tool; detach that VM, or deactivate it (fmpm -d {})",
                    chosen.id,
                    joined(&chosen.gpus),
                    chosen.id
                ),
            );
        }
        for g in &chosen.gpus {
            if !req.devices.contains(g) {
                req.devices.push(*g);
            }
        }
        Ok(Some(PlannedPartition {
            id: chosen.id,
            gpus: chosen.gpus,
        }))
    }

    /// The free partition of exactly `n` GPUs, or the refusal naming the sizes there are.
    fn pick_partition(
        &self,
        state: &JournalState,
        n: usize,
        req: &PlanRequest,
        gpus: Option<&SupportedGpus>,
        partitions: &[Partition],
    ) -> Result<Result<Partition, String>, AttachError> {
        let mut fitting = Vec::new();
        for p in partitions.iter().filter(|p| p.gpus.len() == n && !p.active) {
            let mut free = true;
            for g in &p.gpus {
                let single = PlanRequest {
                    devices: vec![*g],
                    gpus: None,
                    mdev_type: None,
                    fabric: Default::default(),
                    ..req.clone()
                };
                if !self.plan_devices(state, &single, gpus)?.refusals.is_empty() {
                    free = false;
                    break;
                }
            }
            if free {
                fitting.push(p.clone());
            }
        }
        if fitting.is_empty() {
            let sizes = |active_too: bool| {
                let s: BTreeSet<usize> = partitions
                    .iter()
                    .filter(|p| active_too || !p.active)
                    .map(|p| p.gpus.len())
                    .collect();
                s.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Ok(Err(format!(
                "no free fabric partition of {n} GPUs: this host's partitions have {} GPUs (inactive now: {}); ask for one of those sizes, or detach a VM to free one",
                sizes(true),
                sizes(false)
            )));
        }
        // The least-loaded NUMA node: the one with the most GPUs nobody holds.
        let devices = self.sysfs.devices()?;
        let node_of = |a: &PciAddress| {
            devices
                .iter()
                .find(|d| d.address == *a)
                .and_then(|d| d.numa_node)
        };
        let mut unheld: BTreeMap<Option<u32>, usize> = BTreeMap::new();
        for d in devices.iter().filter(|d| d.kind == DeviceKind::Display) {
            if state.owner_of(d.address).is_none() {
                *unheld.entry(d.numa_node).or_default() += 1;
            }
        }
        fitting.sort_by_key(|p| {
            let nodes: BTreeSet<Option<u32>> = p.gpus.iter().map(node_of).collect();
            let load = nodes
                .iter()
                .map(|n| unheld.get(n).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            (nodes.len() > 1, std::cmp::Reverse(load), p.id)
        });
        Ok(Ok(fitting.remove(0)))
    }

    /// Whether the VM gets GPUs of an NVLink board whose links cannot train there: a board's
    /// GPUs without its NVSwitches (full passthrough), or a one-GPU fabric partition. Their
    /// guest driver then runs with NVLink off (`NVreg_NvLinkDisable=1`), as NVIDIA's fabric
    /// manager guide asks of single-GPU VMs on NVSwitch systems.
    pub(super) fn nvlink_unusable(&self, plan: &Plan) -> Result<bool, AttachError> {
        if let Some(p) = &plan.partition {
            return Ok(p.gpus.len() == 1);
        }
        let passed: Vec<PciAddress> = plan
            .devices
            .iter()
            .filter(|d| d.passed)
            .map(|d| d.address)
            .collect();
        Ok(self.sysfs.baseboards()?.iter().any(|b| {
            b.gpus.iter().any(|g| passed.contains(g))
                && !b.nvswitches.iter().any(|s| passed.contains(s))
        }))
    }

    /// Activate transaction `t`'s partition: recorded first (the transaction holds it), marked
    /// activated once the fabric manager says so.
    pub(super) fn activate_partition(
        &self,
        j: &mut LockedJournal,
        t: usize,
    ) -> Result<(), AttachError> {
        let Some(p) = j.state.transactions[t].fabric_partition.clone() else {
            return Ok(());
        };
        let fm = self
            .fabric
            .as_ref()
            .ok_or(AttachError::NoFabricManager { partition: p.id })?;
        fm.activate(p.id).map_err(|source| AttachError::Fabric {
            partition: p.id,
            source,
            aftermath: Aftermath::KeptInJournal,
        })?;
        if let Some(rec) = &mut j.state.transactions[t].fabric_partition {
            rec.activated = true;
        }
        j.save()?;
        Failpoint::AfterPartitionActivate.hit();
        Ok(())
    }

    /// Deactivate a recorded partition if the fabric manager shows it active (a crash may have
    /// come before or after the activation: what it shows decides, so this is safe to repeat).
    pub(super) fn deactivate_partition(&self, rec: &PartitionRecord) -> Result<(), AttachError> {
        let Some(fm) = &self.fabric else {
            return Err(AttachError::NoFabricManager { partition: rec.id });
        };
        let fabric_error = |source| AttachError::Fabric {
            partition: rec.id,
            source,
            aftermath: Aftermath::KeptInJournal,
        };
        let active = fm
            .partitions()
            .map_err(fabric_error)?
            .iter()
            .any(|p| p.id == rec.id && p.active);
        if active {
            fm.deactivate(rec.id).map_err(fabric_error)?;
        }
        Ok(())
    }
}
