//! The layers `initrd build --json` made: their paths (read as the library's [`Layers`]) and
//! what GNU `cpio -t` lists in them. Listing goes through the system's decompressors and cpio,
//! not our archive reader, so it is an independent view of what was packed.

use crate::checks::Checks;
use anyhow::{Context, bail};
use gpu_passthrough::initrd::Layers;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// The base, GPU and combined layer paths of a build's `--json` output.
pub fn paths(build_json: &Path) -> anyhow::Result<[String; 3]> {
    let text = std::fs::read_to_string(build_json)
        .with_context(|| format!("reading {}", build_json.display()))?;
    let layers: Layers = serde_json::from_str(&text)
        .with_context(|| format!("{} is not initrd build's output", build_json.display()))?;
    Ok([layers.base, layers.gpu, layers.combined].map(|l| l.path.display().to_string()))
}

/// The disk image's path of a build's `--json` output (forms `disk` and `both`).
pub fn disk_path(build_json: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(build_json)
        .with_context(|| format!("reading {}", build_json.display()))?;
    let layers: Layers = serde_json::from_str(&text)
        .with_context(|| format!("{} is not initrd build's output", build_json.display()))?;
    match layers.disk {
        Some(d) => Ok(d.path.display().to_string()),
        None => bail!(
            "{} has no disk image: build with --form disk or both",
            build_json.display()
        ),
    }
}

/// The `GPU_DISK_VERITY=` word of a build with `--verity`.
pub fn verity_word(build_json: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(build_json)
        .with_context(|| format!("reading {}", build_json.display()))?;
    let layers: Layers = serde_json::from_str(&text)
        .with_context(|| format!("{} is not initrd build's output", build_json.display()))?;
    match layers.verity {
        Some(v) => Ok(v.kernel_word()),
        None => bail!(
            "{} has no verity record: build with --form disk --verity",
            build_json.display()
        ),
    }
}

/// The system tool that decompresses a layer starting with these bytes; `None`: a plain cpio.
fn decompressor(head: &[u8]) -> Option<&'static [&'static str]> {
    const TOOLS: [(&[u8], &[&str]); 4] = [
        (b"\x28\xb5\x2f\xfd", &["zstd", "-dc"]),
        (b"\x1f\x8b", &["gzip", "-dc"]),
        (b"\x02\x21\x4c\x18", &["lz4", "-dc"]),
        (b"\xfd7zXZ\x00", &["xz", "-dc"]),
    ];
    TOOLS
        .iter()
        .find(|(magic, _)| head.starts_with(magic))
        .map(|(_, tool)| *tool)
}

/// The entry names GNU `cpio -t` lists in one (possibly compressed) layer.
pub fn entries(layer: &Path) -> anyhow::Result<Vec<String>> {
    let mut head = [0u8; 6];
    let n = std::fs::File::open(layer)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("reading {}", layer.display()))?;
    let file = std::fs::File::open(layer)?;
    let mut cpio = Command::new("cpio");
    cpio.args(["-t", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut decomp = None;
    if let Some([tool, args @ ..]) = decompressor(&head[..n]) {
        let mut child = Command::new(tool)
            .args(args)
            .stdin(file)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {tool}"))?;
        cpio.stdin(child.stdout.take().context("decompressor stdout")?);
        decomp = Some((tool, child));
    } else {
        cpio.stdin(file);
    }
    let out = cpio.output().context("running cpio")?;
    if let Some((tool, mut child)) = decomp {
        let status = child.wait()?;
        if !status.success() {
            bail!("{tool} -dc {} failed: {status}", layer.display());
        }
    }
    if !out.status.success() {
        bail!(
            "cpio -t of {} failed: {}",
            layer.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("./").to_owned())
        .collect())
}

/// Run A: the GPU layer holds the manifest and `nvidia.ko`.
pub fn gpu_layer(layer: &Path, compression: &str) -> Checks {
    let mut c = Checks::default();
    let listed = entries(layer);
    let why = || match &listed {
        Ok(e) => format!("{} entries, none matching", e.len()),
        Err(e) => format!("{e:#}"),
    };
    let has =
        |pred: &dyn Fn(&str) -> bool| listed.as_ref().is_ok_and(|e| e.iter().any(|n| pred(n)));
    c.check(
        format!("cpio -t lists gpu/manifest.json in the {compression} GPU layer"),
        has(&|n| n == "gpu/manifest.json"),
        why,
    );
    c.check(
        format!("cpio -t lists nvidia.ko in the {compression} GPU layer"),
        has(&|n| n.starts_with("gpu/") && n.ends_with("/nvidia.ko")),
        why,
    );
    c
}

/// Run B: the base layer carries no GPU bytes.
pub fn base_layer(layer: &Path) -> Checks {
    let mut c = Checks::default();
    let listed = entries(layer);
    let gpu: Vec<&String> = listed
        .as_ref()
        .map(|e| {
            e.iter()
                .filter(|n| *n == "gpu" || n.starts_with("gpu/"))
                .collect()
        })
        .unwrap_or_default();
    c.check(
        "base layer has no /gpu entries",
        listed.as_ref().is_ok_and(|e| !e.is_empty()) && gpu.is_empty(),
        || match &listed {
            Ok(_) => format!("gpu entries: {gpu:?}"),
            Err(e) => format!("{e:#}"),
        },
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_pick_the_decompressor() {
        assert_eq!(
            decompressor(b"\x28\xb5\x2f\xfd\0\0"),
            Some(&["zstd", "-dc"][..])
        );
        assert_eq!(decompressor(b"\x1f\x8b\x08"), Some(&["gzip", "-dc"][..]));
        assert_eq!(decompressor(b"070701"), None);
    }

    #[test]
    fn a_plain_cpio_is_listed_by_gnu_cpio() {
        if Command::new("cpio").arg("--version").output().is_err() {
            panic!("GNU cpio must be installed: apt-get install cpio");
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("gpu/modules")).unwrap();
        std::fs::write(tree.join("gpu/manifest.json"), "{}").unwrap();
        std::fs::write(tree.join("gpu/modules/nvidia.ko"), "ko").unwrap();
        let layer = dir.path().join("gpu.cpio");
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd {} && find . -mindepth 1 | cpio -o -H newc --quiet > {}",
                tree.display(),
                layer.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let c = gpu_layer(&layer, "none");
        assert_eq!(c.failed(), 0, "{:#?}", c.lines());
        // The same archive as a base layer: it has GPU entries, so the base check fails.
        assert_eq!(base_layer(&layer).failed(), 1);
        assert_eq!(gpu_layer(&dir.path().join("absent"), "none").failed(), 2);
    }
}
