//! Which VFIO driver each planned device goes to, and loading it before anything moves.
//!
//! Planning only reads: the choice ([`crate::pci::variant`]) comes from the running kernel's
//! `modules.alias` (through [`crate::kernel::Kernel::modules_alias`]), or the caller's
//! `--vfio-driver` for the devices it names. Attach then loads each variant module the plan
//! names and finds the name its driver registered in sysfs, before the journal records
//! anything: a module that does not load, or a name that is not a VFIO driver once loaded, is
//! refused with nothing moved. Plain vfio-pci is never loaded here (as before variant drivers:
//! a host without it fails at `drivers_probe` with its fix).

use super::plan::{PlanRole, PlannedDevice};
use super::{AttachError, Host, PlanRequest};
use crate::pci::variant::{
    DriverSource, VFIO_PCI, VfioDriver, is_vfio_driver, loaded_driver, registered_driver,
    variant_module,
};

impl Host {
    /// The running kernel's `modules.alias`; unreadable counts as none (plain vfio-pci), with
    /// a warning, since the kernel cannot load a variant by alias either then.
    pub(super) fn modules_alias(&self) -> String {
        self.kernel.modules_alias().unwrap_or_else(|e| {
            tracing::warn!("modules.alias unreadable ({e}): every device goes to vfio-pci");
            String::new()
        })
    }

    /// The VFIO driver `p` goes to: as it is when adopted; the caller's `--vfio-driver` for a
    /// requested device; else the variant `modules.alias` names for its `modalias`; else
    /// vfio-pci. Companions and group members never take the override: a driver named for a
    /// GPU need not drive its audio function or a NIC in its group.
    pub(super) fn choose_vfio(
        &self,
        aliases: &str,
        req: &PlanRequest,
        p: &PlannedDevice,
    ) -> VfioDriver {
        let root = self.sysfs.root();
        if p.adopt
            && let Some(d) = &p.driver
        {
            return VfioDriver {
                module: std::fs::read_link(self.sysfs.driver_dir(d).join("module"))
                    .ok()
                    .and_then(|t| t.file_name()?.to_str().map(str::to_owned))
                    .unwrap_or_else(|| d.replace('-', "_")),
                driver: Some(d.clone()),
                source: DriverSource::Adopted,
            };
        }
        if p.role == PlanRole::Requested
            && let Some(name) = &req.vfio_driver
        {
            return VfioDriver {
                module: name.clone(),
                driver: loaded_driver(root, name),
                source: DriverSource::Override,
            };
        }
        let alias = self.sysfs.modalias(p.address).unwrap_or_default();
        match variant_module(aliases, &alias) {
            Some(module) => VfioDriver {
                driver: registered_driver(root, &module),
                module,
                source: DriverSource::ModulesAlias,
            },
            None => VfioDriver::vfio_pci(),
        }
    }

    /// The registered name of `p`'s planned VFIO driver, its module loaded first when no
    /// driver of that name is registered yet; refused (nothing moved) when it does not load
    /// or is not a VFIO driver.
    pub(super) fn load_vfio(&self, p: &PlannedDevice) -> Result<String, AttachError> {
        let v = &p.vfio;
        match (v.source, &v.driver) {
            (DriverSource::Default, _) => return Ok(VFIO_PCI.into()),
            // On it already, with no writes: nothing to load.
            (DriverSource::Adopted, Some(d)) => return Ok(d.clone()),
            _ => {}
        }
        let root = self.sysfs.root();
        let refused = |why: String| AttachError::VfioDriver {
            device: p.address,
            name: v.module.clone(),
            why,
        };
        if !crate::pci::valid_driver_name(&v.module) {
            return Err(refused("that is not a module or driver name".into()));
        }
        let driver = match loaded_driver(root, &v.module) {
            Some(d) => d,
            None => {
                self.kernel
                    .load_module(&v.module)
                    .map_err(|e| refused(format!("it does not load ({e})")))?;
                loaded_driver(root, &v.module).ok_or_else(|| {
                    refused(format!(
                        "it loaded but registered no driver under {}",
                        root.join("bus/pci/drivers").display()
                    ))
                })?
            }
        };
        if !is_vfio_driver(root, &driver) {
            return Err(refused(format!(
                "{driver} is not a VFIO driver (vfio-pci, or a variant built on vfio_pci_core)"
            )));
        }
        Ok(driver)
    }
}
