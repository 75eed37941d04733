//! A CDI (Container Device Interface) spec so a container engine in the guest can use
//! `nvidia.com/gpu=all`.

use crate::libraries::{GPU_MOUNT, mounted_path};
use gpu_passthrough_manifest::Manifest;
use gpu_passthrough_manifest::report::NodeReport;
use serde_json::{Value, json};
use std::path::Path;

/// The CDI spec version written.
pub const CDI_VERSION: &str = "0.6.0";
/// The spec's path inside the root.
pub const CDI_PATH: &str = "/etc/cdi/nvidia.json";

/// Why the spec could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// Writing into the root failed.
    #[error("cannot write {CDI_PATH} in the workload root: {0}: is the root writable?")]
    Io(#[from] std::io::Error),
}

/// The spec for `gpus` GPUs, the node names (relative to `/dev`) and the manifest's files.
pub fn spec(manifest: &Manifest, gpus: u32, node_names: &[String], lib_dir: &str) -> Value {
    let node = |name: &str| json!({ "path": format!("/dev/{name}") });
    let per_gpu: Vec<String> = (0..gpus).map(|i| format!("nvidia{i}")).collect();
    let mut devices: Vec<Value> = per_gpu
        .iter()
        .enumerate()
        .map(|(i, n)| json!({ "name": i.to_string(), "containerEdits": { "deviceNodes": [node(n)] } }))
        .collect();
    devices.push(json!({
        "name": "all",
        "containerEdits": { "deviceNodes": per_gpu.iter().map(|n| node(n)).collect::<Vec<_>>() }
    }));
    let common_nodes: Vec<Value> = node_names
        .iter()
        .filter(|n| !per_gpu.contains(n))
        .map(|n| node(n))
        .collect();
    let bind = |host: String, container: String| json!({ "hostPath": host, "containerPath": container, "options": ["ro", "nosuid", "nodev", "bind"] });
    let mut mounts = Vec::new();
    for lib in &manifest.libraries {
        let Ok(host) = mounted_path(&lib.path) else {
            continue;
        };
        let Some(real) = Path::new(&lib.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            continue;
        };
        mounts.push(bind(host.clone(), format!("{lib_dir}/{real}")));
        if let Some(soname) = &lib.soname {
            mounts.push(bind(host, format!("{lib_dir}/{soname}")));
        }
    }
    // gpu-init itself is for the guest's init, not for containers.
    for bin in manifest
        .binaries
        .iter()
        .filter(|b| !b.ends_with("/gpu-init"))
    {
        let Ok(host) = mounted_path(bin) else {
            continue;
        };
        if let Some(name) = Path::new(bin).file_name() {
            mounts.push(bind(host, format!("/usr/bin/{}", name.to_string_lossy())));
        }
    }
    json!({
        "cdiVersion": CDI_VERSION,
        "kind": "nvidia.com/gpu",
        "annotations": { "gpu-passthrough/driver-version": manifest.driver_version, "gpu-passthrough/layer": GPU_MOUNT },
        "devices": devices,
        "containerEdits": { "deviceNodes": common_nodes, "mounts": mounts },
    })
}

/// Write the spec into the root atomically. Returns [`CDI_PATH`].
pub fn write(
    root: &Path,
    manifest: &Manifest,
    gpus: u32,
    nodes: &[NodeReport],
    dev_dir: &Path,
    lib_dir: &str,
) -> Result<String, CdiError> {
    let names: Vec<String> = nodes
        .iter()
        .filter_map(|n| Path::new(&n.path).strip_prefix(dev_dir).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let text = serde_json::to_string_pretty(&spec(manifest, gpus, &names, lib_dir))
        .map_err(std::io::Error::other)?;
    let path = crate::context::in_root(root, CDI_PATH);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(CDI_PATH.to_string())
}
