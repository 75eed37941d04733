//! The workload-facing settings of the kernel command line, as the NVIDIA container toolkit names
//! them: `NVIDIA_DRIVER_CAPABILITIES` (what is injected), `NVIDIA_VISIBLE_DEVICES` (which GPUs the
//! workload gets), `CUDA_VISIBLE_DEVICES` (passed through for CUDA), and the guest init's own
//! `GPU_INIT_PERSISTENCED` and `GPU_INIT_LOCK_MODULES`.
//!
//! A bad value is never fatal and never silently ignored: it becomes a `problems` entry and the
//! documented default applies.

use gpu_passthrough_guest_contract::Manifest;
use gpu_passthrough_guest_contract::capability::{Capability, CapabilitySet};
use std::collections::{BTreeMap, BTreeSet};

/// `NVIDIA_DRIVER_CAPABILITIES`.
pub const DRIVER_CAPABILITIES: &str = "NVIDIA_DRIVER_CAPABILITIES";
/// `NVIDIA_VISIBLE_DEVICES`.
pub const VISIBLE_DEVICES: &str = "NVIDIA_VISIBLE_DEVICES";
/// `CUDA_VISIBLE_DEVICES`.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// Which GPUs the workload gets, by index (the order of PCI bus addresses, as `nvidia-smi`
/// numbers them).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Visible {
    /// Every GPU (`all`, or nothing set: the VM was given its GPUs to use them).
    #[default]
    All,
    /// No GPU (`none` or `void`): the driver's libraries but no `/dev/nvidiaN`.
    None,
    /// These indices.
    Indices(BTreeSet<u32>),
}

impl Visible {
    /// Whether the GPU at `index` is visible.
    pub fn includes(&self, index: usize) -> bool {
        match self {
            Visible::All => true,
            Visible::None => false,
            Visible::Indices(set) => u32::try_from(index).is_ok_and(|i| set.contains(&i)),
        }
    }
}

/// `/dev/nvidiaN` minors of the visible GPUs, from every GPU's `(bus address, minor)`.
pub fn visible_minors(visible: &Visible, gpus_by_bus: &[(String, u64)]) -> Vec<(usize, u64)> {
    gpus_by_bus
        .iter()
        .enumerate()
        .filter(|(i, _)| visible.includes(*i))
        .map(|(i, (_, minor))| (i, *minor))
        .collect()
}

/// What `GPU_INIT_PERSISTENCED` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistenced {
    /// Start it when the layer has it (unset or `1`).
    #[default]
    Default,
    /// Start it with UVM persistence (`uvm`).
    Uvm,
    /// Do not start it (`0`).
    Off,
}

/// The settings, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestEnv {
    /// Capabilities the workload asked for (default `compute,utility`).
    pub capabilities: CapabilitySet,
    /// The value as given, if any.
    pub capabilities_raw: Option<String>,
    /// GPUs the workload gets.
    pub visible: Visible,
    /// `NVIDIA_VISIBLE_DEVICES` as given.
    pub visible_raw: Option<String>,
    /// `CUDA_VISIBLE_DEVICES` as given (CUDA reads it; we only pass it on).
    pub cuda_visible: Option<String>,
    /// `GPU_INIT_PERSISTENCED`.
    pub persistenced: Persistenced,
    /// `GPU_INIT_LOCK_MODULES=1`.
    pub lock_modules: bool,
    /// One sentence per value that could not be used.
    pub problems: Vec<String>,
}

impl Default for GuestEnv {
    fn default() -> Self {
        GuestEnv::parse(|_| None)
    }
}

impl GuestEnv {
    /// Read the settings through `env` (the process environment in the guest).
    pub fn parse(env: impl Fn(&str) -> Option<String>) -> Self {
        let mut problems = Vec::new();
        let capabilities_raw = env(DRIVER_CAPABILITIES).filter(|v| !v.trim().is_empty());
        let capabilities = match &capabilities_raw {
            None => CapabilitySet::toolkit_default(),
            Some(v) => v.parse().unwrap_or_else(|e| {
                problems.push(format!(
                    "{DRIVER_CAPABILITIES}={v}: {e}; the default compute,utility was injected"
                ));
                CapabilitySet::toolkit_default()
            }),
        };
        let visible_raw = env(VISIBLE_DEVICES).filter(|v| !v.trim().is_empty());
        let visible = match visible_raw.as_deref().map(str::trim) {
            None | Some("all") => Visible::All,
            Some("none" | "void") => Visible::None,
            Some(list) => {
                let parsed: Result<BTreeSet<u32>, _> =
                    list.split(',').map(|w| w.trim().parse::<u32>()).collect();
                match parsed {
                    Ok(set) => Visible::Indices(set),
                    Err(_) => {
                        problems.push(format!(
                            "{VISIBLE_DEVICES}={list}: only GPU indices (0,1,...), all or none \
                             are understood here (no UUIDs); no GPU was made visible"
                        ));
                        Visible::None
                    }
                }
            }
        };
        let persistenced = match env("GPU_INIT_PERSISTENCED").as_deref() {
            None | Some("" | "1") => Persistenced::Default,
            Some("uvm") => Persistenced::Uvm,
            Some("0") => Persistenced::Off,
            Some(other) => {
                problems.push(format!(
                    "GPU_INIT_PERSISTENCED={other}: use uvm, 1 or 0; started as with 1"
                ));
                Persistenced::Default
            }
        };
        let lock_modules = match env("GPU_INIT_LOCK_MODULES").as_deref() {
            None | Some("" | "0") => false,
            Some("1") => true,
            Some(other) => {
                // Fail safe: someone asked for a lock, so lock.
                problems.push(format!(
                    "GPU_INIT_LOCK_MODULES={other}: use 1 or 0; modules were locked as with 1"
                ));
                true
            }
        };
        GuestEnv {
            capabilities,
            capabilities_raw,
            visible,
            visible_raw,
            cuda_visible: env(CUDA_VISIBLE_DEVICES),
            persistenced,
            lock_modules,
            problems,
        }
    }

    /// The variables the workload gets: the three toolkit variables, each as asked (the
    /// capabilities as actually injected when not asked).
    pub fn workload_env(&self, injected: &[Capability]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        out.insert(
            DRIVER_CAPABILITIES.to_string(),
            self.capabilities_raw.clone().unwrap_or_else(|| {
                injected
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        );
        out.insert(
            VISIBLE_DEVICES.to_string(),
            self.visible_raw.clone().unwrap_or_else(|| "all".into()),
        );
        if let Some(c) = &self.cuda_visible {
            out.insert(CUDA_VISIBLE_DEVICES.to_string(), c.clone());
        }
        out
    }
}

/// The manifest reduced to the asked capabilities: libraries and programs of other capabilities
/// are dropped; files in no capability, and every file of a layer that records none, stay.
/// Returns it, the capabilities injected, and a sentence per asked capability the layer lacks.
pub fn select(
    manifest: &Manifest,
    asked: &CapabilitySet,
) -> (Manifest, Vec<Capability>, Vec<String>) {
    if manifest.capabilities.is_empty() {
        return (manifest.clone(), Vec::new(), Vec::new());
    }
    let carried: BTreeSet<Capability> = manifest.capabilities.keys().copied().collect();
    let mut problems = Vec::new();
    let lacking: Vec<&str> = asked
        .0
        .iter()
        .filter(|c| !carried.contains(c))
        .map(|c| c.as_str())
        .collect();
    // `all` asks for whatever is there; only a named capability can be missing.
    if *asked != CapabilitySet::all() && !lacking.is_empty() {
        problems.push(format!(
            "{DRIVER_CAPABILITIES} asks for {} but the GPU layer carries only {}: rebuild the \
             layer with those capabilities (their libraries are not injected)",
            lacking.join(","),
            CapabilitySet(carried.clone())
        ));
    }
    let dropped: BTreeSet<&str> = manifest
        .capabilities
        .iter()
        .filter(|(c, _)| !asked.contains(**c))
        .flat_map(|(_, files)| files.iter().map(String::as_str))
        .collect();
    let mut out = manifest.clone();
    out.libraries.retain(|l| !dropped.contains(l.path.as_str()));
    out.binaries.retain(|b| !dropped.contains(b.as_str()));
    out.capabilities.retain(|c, _| asked.contains(*c));
    let injected = out.capabilities.keys().copied().collect();
    (out, injected, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> GuestEnv {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        GuestEnv::parse(|k| vars.get(k).cloned())
    }

    #[test]
    fn defaults_are_the_toolkits() {
        let e = parse(&[]);
        assert_eq!(e.capabilities, CapabilitySet::toolkit_default());
        assert_eq!(e.visible, Visible::All);
        assert_eq!(e.persistenced, Persistenced::Default);
        assert!(!e.lock_modules && e.problems.is_empty());
        let env = e.workload_env(&[Capability::Compute, Capability::Utility]);
        assert_eq!(env[DRIVER_CAPABILITIES], "compute,utility");
        assert_eq!(env[VISIBLE_DEVICES], "all");
        assert!(!env.contains_key(CUDA_VISIBLE_DEVICES));
    }

    #[test]
    fn indices_all_and_none_select_gpus_by_bus_order() {
        let gpus = vec![
            ("0000:00:05.0".to_string(), 3),
            ("0000:00:06.0".to_string(), 0),
            ("0000:00:07.0".to_string(), 7),
        ];
        let e = parse(&[(VISIBLE_DEVICES, "2,0"), (CUDA_VISIBLE_DEVICES, "1")]);
        assert_eq!(visible_minors(&e.visible, &gpus), [(0, 3), (2, 7)]);
        let env = e.workload_env(&[]);
        assert_eq!(env[VISIBLE_DEVICES], "2,0");
        assert_eq!(env[CUDA_VISIBLE_DEVICES], "1");
        assert!(visible_minors(&parse(&[(VISIBLE_DEVICES, "none")]).visible, &gpus).is_empty());
        assert_eq!(
            visible_minors(&parse(&[(VISIBLE_DEVICES, "all")]).visible, &gpus).len(),
            3
        );
    }

    #[test]
    fn bad_values_are_problems_and_fail_safe() {
        let e = parse(&[
            (VISIBLE_DEVICES, "GPU-1234"),
            (DRIVER_CAPABILITIES, "compute,vidoe"),
            ("GPU_INIT_LOCK_MODULES", "yes"),
            ("GPU_INIT_PERSISTENCED", "always"),
        ]);
        assert_eq!(
            e.visible,
            Visible::None,
            "an unreadable selection shows no GPU"
        );
        assert_eq!(e.capabilities, CapabilitySet::toolkit_default());
        assert!(e.lock_modules, "an unclear lock request locks");
        assert_eq!(e.problems.len(), 4, "{:?}", e.problems);
        assert!(e.problems.iter().any(|p| p.contains("vidoe")));
        assert!(e.problems.iter().any(|p| p.contains("GPU-1234")));
        assert_eq!(
            parse(&[("GPU_INIT_PERSISTENCED", "uvm")]).persistenced,
            Persistenced::Uvm
        );
    }
}
