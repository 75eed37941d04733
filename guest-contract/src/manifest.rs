//! `/gpu/manifest.json`: what the builder tells the guest init. The builder writes it into the GPU
//! layer; `gpu-init` reads it in the guest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::capability::Capability;

/// The schema version this crate reads and writes. Bumped on any incompatible change.
pub const SCHEMA: u32 = 1;

/// Where the manifest sits in the guest.
pub const MANIFEST_PATH: &str = "/gpu/manifest.json";

/// Where the layer keeps firmware in the guest. Not `/lib/firmware`: the GPU layer emits nothing
/// outside `/gpu`, so appending it to a usrmerge initrd (`lib -> usr/lib`) cannot replace that
/// symlink with a directory. The guest init points the kernel's `firmware_class.path` here.
pub const FIRMWARE_DIR: &str = "/gpu/firmware";

/// Everything the guest init needs to know to make the GPU usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`SCHEMA`] at the time of writing.
    pub schema: u32,
    /// Registry release the layer was built from, e.g. `ch-6.12.8-kernel-1.2-20251213`.
    pub release: String,
    /// Architecture, `x86_64` or `aarch64`.
    pub arch: String,
    /// The guest kernel's `uname -r` the modules were built for (their vermagic's first word).
    pub kernel_version: String,
    /// NVIDIA driver version, e.g. `535.261.03`.
    pub driver_version: String,
    /// `open` or `proprietary`.
    pub module_flavor: String,
    /// Modules in load order (dependencies first).
    pub modules: Vec<Module>,
    /// Firmware files, as absolute guest paths (under [`FIRMWARE_DIR`]).
    pub firmware: Vec<String>,
    /// Userspace driver libraries to make visible in the workload root.
    pub libraries: Vec<Library>,
    /// Programs to put on the workload's `PATH` (absolute guest paths under `/gpu/bin/`).
    pub binaries: Vec<String>,
    /// Mode and group of the `/dev/nvidia*` nodes.
    pub device_nodes: DeviceNodes,
    /// Digests of the artifacts the layer was built from.
    pub inputs: Vec<Input>,
    /// The driver capabilities the layer carries, each with the guest paths of its libraries
    /// and programs. A file listed under none (one the builder's table does not classify) is
    /// not subject to selection. Empty for a layer that records none.
    #[serde(default)]
    pub capabilities: BTreeMap<Capability, Vec<String>>,
}

/// One kernel module to load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Module {
    /// Module name as the kernel knows it (underscores), e.g. `nvidia_uvm`.
    pub name: String,
    /// Absolute guest path of the `.ko`, e.g. `/gpu/modules/nvidia-uvm.ko`.
    pub path: String,
    /// Parameters passed to `finit_module`, e.g. `modeset=1`; empty for none.
    pub params: String,
    /// Names of the modules it depends on (each earlier in the list, or built into the kernel).
    pub depends: Vec<String>,
    /// The module's full vermagic string, for error messages on a kernel mismatch.
    pub vermagic: String,
    /// True for the NVIDIA driver's own modules, false for kernel modules they depend on.
    pub nvidia: bool,
}

/// One userspace library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Library {
    /// Absolute guest path of the real file, e.g. `/gpu/lib/libcuda.so.535.261.03`.
    pub path: String,
    /// Its `DT_SONAME`, e.g. `libcuda.so.1`, when it has one.
    pub soname: Option<String>,
}

/// Mode and group of the device nodes the guest init creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceNodes {
    /// Permission bits, e.g. `0o660` (serialized as a number).
    pub mode: u32,
    /// Owning group id.
    pub gid: u32,
}

/// One input artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Registry artifact kind, e.g. `nvidia-modules`.
    pub kind: String,
    /// Lowercase hex sha256 of the artifact file.
    pub sha256: String,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not the fields this schema has.
    #[error("malformed GPU manifest")]
    Malformed(#[source] serde_json::Error),
    /// Written for another schema version.
    #[error(
        "GPU manifest schema {found} is not the {SCHEMA} this gpu-init reads: rebuild the initrd \
         with a matching gpu-passthrough"
    )]
    Schema {
        /// The manifest's `schema`.
        found: u32,
    },
}

impl Manifest {
    /// Parse a manifest, refusing one written for another schema version.
    ///
    /// The version is read first, so a manifest of another schema is named as such rather than
    /// as missing or unknown fields.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        struct Version {
            schema: u32,
        }
        let version: Version = serde_json::from_str(text).map_err(ManifestError::Malformed)?;
        if version.schema != SCHEMA {
            return Err(ManifestError::Schema {
                found: version.schema,
            });
        }
        serde_json::from_str(text).map_err(ManifestError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            schema: SCHEMA,
            release: "r".into(),
            arch: "x86_64".into(),
            kernel_version: "6.1.0-56-amd64".into(),
            driver_version: "535.261.03".into(),
            module_flavor: "open".into(),
            modules: vec![Module {
                name: "nvidia_uvm".into(),
                path: "/gpu/modules/nvidia-uvm.ko".into(),
                params: String::new(),
                depends: vec!["nvidia".into()],
                vermagic: "6.1.0-56-amd64 SMP ".into(),
                nvidia: true,
            }],
            firmware: vec!["/gpu/firmware/nvidia/535.261.03/gsp_ga10x.bin".into()],
            libraries: vec![Library {
                path: "/gpu/lib/libcuda.so.535.261.03".into(),
                soname: Some("libcuda.so.1".into()),
            }],
            binaries: vec!["/gpu/bin/nvidia-smi".into()],
            device_nodes: DeviceNodes {
                mode: 0o660,
                gid: 0,
            },
            inputs: vec![Input {
                kind: "nvidia-modules".into(),
                sha256: "00".into(),
            }],
            capabilities: BTreeMap::from([(
                Capability::Compute,
                vec!["/gpu/lib/libcuda.so.535.261.03".into()],
            )]),
        }
    }

    #[test]
    fn a_manifest_round_trips() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert_eq!(Manifest::from_json(&text).unwrap(), sample());
    }

    #[test]
    fn capabilities_are_written_by_their_toolkit_names() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert!(
            text.contains(r#""capabilities":{"compute":["/gpu/lib/libcuda.so.535.261.03"]}"#),
            "{text}"
        );
        // A layer that records no capabilities still reads.
        let old = text.replace(
            r#","capabilities":{"compute":["/gpu/lib/libcuda.so.535.261.03"]}"#,
            "",
        );
        assert!(Manifest::from_json(&old).unwrap().capabilities.is_empty());
    }

    #[test]
    fn another_schema_is_named_before_its_fields_are_judged() {
        let err = Manifest::from_json(r#"{"schema": 99, "renamed": 1}"#).unwrap_err();
        assert!(
            matches!(err, ManifestError::Schema { found: 99 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("schema 99"), "{err}");
    }

    #[test]
    fn unknown_and_missing_fields_are_malformed() {
        let text = serde_json::to_string(&sample()).unwrap();
        let extra = text.replacen('{', r#"{"surprise":1,"#, 1);
        assert!(matches!(
            Manifest::from_json(&extra),
            Err(ManifestError::Malformed(_))
        ));
        assert!(matches!(
            Manifest::from_json(r#"{"schema": 1}"#),
            Err(ManifestError::Malformed(_))
        ));
    }
}
