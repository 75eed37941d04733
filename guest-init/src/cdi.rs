//! A CDI (Container Device Interface) spec so a container engine in the guest can use
//! `nvidia.com/gpu=all`.

use crate::inroot::RootDir;
use crate::libraries::{GPU_MOUNT, mounted_path};
use gpu_passthrough_guest_contract::Manifest;
use gpu_passthrough_guest_contract::report::NodeReport;
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
    #[error(
        "cannot write {CDI_PATH} in the workload root: {0}: is the root writable (and /etc/cdi a directory in it)?"
    )]
    Io(#[from] std::io::Error),
}

/// The spec for the visible GPUs (`(index, device minor)`: device `i` is `/dev/nvidia<minor>`,
/// the driver's minor, which need not be `i`), the node names (relative to `/dev`) and the
/// manifest's files.
pub fn spec(
    manifest: &Manifest,
    gpus: &[(usize, u64)],
    node_names: &[String],
    lib_dir: &str,
) -> Value {
    let node = |name: &str| json!({ "path": format!("/dev/{name}") });
    let per_gpu: Vec<String> = gpus.iter().map(|(_, m)| format!("nvidia{m}")).collect();
    let mut devices: Vec<Value> = gpus
        .iter()
        .zip(&per_gpu)
        .map(|((i, _), n)| json!({ "name": i.to_string(), "containerEdits": { "deviceNodes": [node(n)] } }))
        .collect();
    devices.push(json!({
        "name": "all",
        "containerEdits": { "deviceNodes": per_gpu.iter().map(|n| node(n)).collect::<Vec<_>>() }
    }));
    // Another GPU's node (hidden by NVIDIA_VISIBLE_DEVICES) is no control node either.
    let common_nodes: Vec<Value> = node_names
        .iter()
        .filter(|n| !is_gpu_node(n))
        .map(|n| node(n))
        .collect();
    let bind = |host: String, container: String| json!({ "hostPath": host, "containerPath": container, "options": ["ro", "nosuid", "nodev", "bind"] });
    let mut mounts = Vec::new();
    let mut links = Vec::new();
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
        mounts.push(bind(host, format!("{lib_dir}/{real}")));
        // As nvidia-ctk does: the soname and the `.so` development link are made by a hook, so
        // they exist whatever the image's layout.
        if let Some(soname) = &lib.soname {
            links.push(format!("{real}::{lib_dir}/{soname}"));
            if let Some(dev) = soname.find(".so").map(|i| &soname[..i + 3])
                && dev != soname
            {
                links.push(format!("{soname}::{lib_dir}/{dev}"));
            }
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
    let hook = |name: &str, flag: &str, values: &[String]| {
        let mut args = vec![crate::cdi_hook::HOOK_NAME.to_string(), name.to_string()];
        for v in values {
            args.push(flag.to_string());
            args.push(v.clone());
        }
        json!({ "hookName": "createContainer", "path": hook_program(manifest), "args": args,
                "env": ["NVIDIA_CTK_DEBUG=false"] })
    };
    let mut hooks = Vec::new();
    if !links.is_empty() {
        hooks.push(hook("create-symlinks", "--link", &links));
    }
    hooks.push(hook("update-ldcache", "--folder", &[lib_dir.to_string()]));
    json!({
        "cdiVersion": CDI_VERSION,
        "kind": "nvidia.com/gpu",
        "annotations": { "gpu-passthrough/driver-version": manifest.driver_version, "gpu-passthrough/layer": GPU_MOUNT },
        "devices": devices,
        "containerEdits": { "deviceNodes": common_nodes, "mounts": mounts, "hooks": hooks },
    })
}

/// `nvidiaN`: a GPU's own node.
fn is_gpu_node(name: &str) -> bool {
    name.strip_prefix("nvidia")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The program the hooks run, as the guest sees it: `gpu-init` in the mounted layer (which
/// implements them, see [`crate::cdi_hook`]).
fn hook_program(manifest: &Manifest) -> String {
    manifest
        .binaries
        .iter()
        .find(|b| b.ends_with("/gpu-init"))
        .and_then(|b| mounted_path(b).ok())
        .unwrap_or_else(|| format!("{GPU_MOUNT}/bin/gpu-init"))
}

/// Write the spec into the root atomically. Returns [`CDI_PATH`].
pub fn write(
    root: &RootDir,
    manifest: &Manifest,
    gpus: &[(usize, u64)],
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
    // Atomic and resolved inside the root: a workload link at or above the spec is not followed out.
    root.write_file(CDI_PATH, text.as_bytes())?;
    Ok(CDI_PATH.to_string())
}
