//! Host readiness checks.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{AttachError, Host};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// Passthrough will not work until fixed.
    Fail,
}

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Stable name (`iommu`, `vfio_pci`, `kvm`, …).
    pub name: String,
    /// Outcome.
    pub status: CheckStatus,
    /// What was found.
    pub detail: String,
    /// How to fix it (empty when OK).
    pub fix: String,
}

/// The doctor's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoctorReport {
    /// Every check, host checks first, then one `gpu <addr>` per GPU.
    pub checks: Vec<Check>,
    /// The worst status.
    pub verdict: CheckStatus,
}

/// A failed check: the host is not ready; a warning is fine.
impl ReportOutcome for DoctorReport {
    fn outcome(&self) -> Option<Outcome> {
        (self.verdict == CheckStatus::Fail).then_some(Outcome::NotReady)
    }
}

fn check(name: &str, status: CheckStatus, detail: String, fix: &str) -> Check {
    Check {
        name: name.into(),
        status,
        detail,
        fix: if status == CheckStatus::Ok {
            String::new()
        } else {
            fix.into()
        },
    }
}

use crate::outcome::{Outcome, ReportOutcome};
use CheckStatus::{Fail, Ok as Good, Warn};

impl Host {
    /// Check the host's readiness for passthrough.
    pub fn doctor(&self, supported_gpus: Option<&Path>) -> Result<DoctorReport, AttachError> {
        let root = self.sysfs.root();
        let mut checks = Vec::new();
        let cmdline = fs::read_to_string(self.proc_root.join("cmdline")).unwrap_or_default();
        let groups = self.sysfs.iommu_group_count();
        checks.push(if groups > 0 {
            check("iommu", Good, format!("{groups} IOMMU groups"), "")
        } else {
            check(
                "iommu",
                Fail,
                format!("no IOMMU groups under {}; kernel command line: {}", root.join("kernel/iommu_groups").display(), cmdline.trim()),
                "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on iommu=pt (Intel) or amd_iommu=on iommu=pt (AMD)",
            )
        });
        let unsafe_irq = fs::read_to_string(
            root.join("module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"),
        )
        .is_ok_and(|s| s.trim() == "Y");
        let interrupts = fs::read_to_string(self.proc_root.join("interrupts")).unwrap_or_default();
        checks.push(if unsafe_irq {
            check("interrupt_remapping", Warn, "vfio_iommu_type1 allow_unsafe_interrupts=Y".into(), "enable interrupt remapping (x2APIC/IR in the firmware) and drop allow_unsafe_interrupts")
        } else if interrupts.contains("IR-") {
            check("interrupt_remapping", Good, "interrupts are remapped (IR- entries in /proc/interrupts)".into(), "")
        } else {
            check("interrupt_remapping", Warn, "no remapped interrupts seen in /proc/interrupts".into(), "enable interrupt remapping in the firmware (and intremap=on for an emulated IOMMU); vfio refuses MSI without it unless allow_unsafe_interrupts=1")
        });
        for (name, module, driver) in [
            ("vfio_pci", "vfio_pci", Some("vfio-pci")),
            ("vfio_iommu_type1", "vfio_iommu_type1", None),
        ] {
            let loaded = root.join("module").join(module).exists()
                || driver.is_some_and(|d| self.sysfs.driver_dir(d).is_dir());
            checks.push(if loaded {
                check(name, Good, format!("{module} loaded"), "")
            } else {
                check(
                    name,
                    Fail,
                    format!("{module} not loaded"),
                    &format!("modprobe {module}"),
                )
            });
        }
        let container = self.dev_dir.join("vfio/vfio");
        checks.push(
            match fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&container)
            {
                Ok(_) => check(
                    "vfio_container",
                    Good,
                    format!("{} opens", container.display()),
                    "",
                ),
                Err(e) => check(
                    "vfio_container",
                    Fail,
                    format!("{}: {e}", container.display()),
                    "modprobe vfio-pci vfio_iommu_type1 and run as root",
                ),
            },
        );
        checks.push(self.kvm_check());
        checks.push(match self.sees_host_processes() {
            Ok(()) => check(
                "host_processes",
                Good,
                format!(
                    "{} is the host's PID namespace",
                    self.proc_root.join("self/ns/pid").display()
                ),
                "",
            ),
            // attach, detach, reset and reconcile refuse: a holder would go unseen.
            Err(blind) => check("host_processes", Fail, blind.to_string(), crate::pidns::FIX),
        });
        let huge = fs::read_dir(root.join("kernel/mm/hugepages"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| fs::read_to_string(e.path().join("nr_hugepages")).ok())
                    .filter_map(|s| s.trim().parse::<u64>().ok())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        checks.push(if huge > 0 {
            check("hugepages", Good, format!("{huge} huge pages reserved"), "")
        } else {
            check("hugepages", Warn, "no huge pages reserved".into(), "optional: reserve huge pages for guest memory (vm.nr_hugepages or hugepagesz=1G hugepages=N) to cut IOMMU mapping cost")
        });
        checks.push(if persistenced_running(&self.proc_root) {
            check("nvidia_persistenced", Warn, "nvidia-persistenced is running".into(), "attach turns persistence off only for the GPUs it takes (nvidia-smi -i ADDR -pm 0); it never stops the daemon")
        } else {
            check("nvidia_persistenced", Good, "not running".into(), "")
        });
        for d in self.devices(false, supported_gpus)? {
            if d.device.kind != crate::pci::DeviceKind::Display {
                continue;
            }
            let name = format!("gpu {}", d.device.address);
            let label = d.device.device_name.clone().unwrap_or_else(|| {
                format!("{:04x}:{:04x}", d.device.vendor_id, d.device.device_id)
            });
            checks.push(if d.ready {
                check(
                    &name,
                    Good,
                    format!(
                        "{label}: ready (group {})",
                        d.device.iommu_group.unwrap_or_default()
                    ),
                    "",
                )
            } else if d.owner.is_some() {
                check(
                    &name,
                    Good,
                    format!(
                        "{label}: attached to {}",
                        d.owner.as_ref().map(|o| o.as_str()).unwrap_or_default()
                    ),
                    "",
                )
            } else {
                check(
                    &name,
                    Warn,
                    format!("{label}: not passable"),
                    &d.not_ready_because.join("; "),
                )
            });
        }
        let verdict = checks.iter().map(|c| c.status).max().unwrap_or(Good);
        Ok(DoctorReport { checks, verdict })
    }

    fn kvm_check(&self) -> Check {
        let path = self.dev_dir.join("kvm");
        if !path.exists() {
            return check(
                "kvm",
                Fail,
                format!("{} is missing", path.display()),
                "enable virtualisation in the firmware and modprobe kvm_intel (or kvm_amd)",
            );
        }
        let cpu_virt = fs::read_to_string(self.proc_root.join("cpuinfo"))
            .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
            .unwrap_or(false);
        let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return check("kvm", Fail, "bad path".into(), "");
        };
        let kvm = match kvm_ioctls::Kvm::new_with_path(&cpath) {
            Ok(k) => k,
            Err(e) => {
                return check(
                    "kvm",
                    Fail,
                    format!("{}: {e}", path.display()),
                    "run as root (or join the kvm group) and modprobe kvm_intel/kvm_amd",
                );
            }
        };
        let api = kvm.get_api_version();
        let vm = match kvm.create_vm() {
            Ok(vm) => vm,
            Err(e) => {
                return check(
                    "kvm",
                    Fail,
                    format!("KVM API {api}, creating a VM failed: {e}"),
                    "check dmesg for kvm errors",
                );
            }
        };
        let mut dev = kvm_bindings::kvm_create_device {
            type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let vfio_dev = vm.create_device(&mut dev);
        let hw = if cpu_virt {
            "hardware virtualisation (vmx/svm)"
        } else {
            "no vmx/svm in /proc/cpuinfo: a software or nested KVM, guests may not run"
        };
        match vfio_dev {
            Ok(_) if cpu_virt => check(
                "kvm",
                Good,
                format!("KVM API {api}, VM and KVM-VFIO device created; {hw}"),
                "",
            ),
            Ok(_) => check(
                "kvm",
                Warn,
                format!("KVM API {api}, VM and KVM-VFIO device created; {hw}"),
                "run on a host with VT-x/AMD-V enabled",
            ),
            Err(e) => check(
                "kvm",
                Fail,
                format!("KVM API {api}, VM created, KVM-VFIO device failed: {e}; {hw}"),
                "build the kernel with CONFIG_KVM_VFIO",
            ),
        }
    }
}

fn persistenced_running(proc_root: &Path) -> bool {
    fs::read_dir(proc_root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                })
                .any(|e| {
                    fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim().starts_with("nvidia-persiste"))
                })
        })
        .unwrap_or(false)
}
