//! `initrd build` with a capability selection over the real proprietary 535.309.01 driver: the
//! video libraries go into the layer only when `video` is asked for (or nothing is), the manifest
//! records what the layer carries, and the selection is part of the cache key.

use std::path::Path;

use gpu_passthrough::archive::compress::LayerCompression;
use gpu_passthrough::capabilities::{Capability, CapabilitySet};
use gpu_passthrough::fetch::{FetchOptions, Fetcher, NoProgress};
use gpu_passthrough::initrd::{BuildOptions, InitrdBuilder, InitrdError, Layers};
use gpu_passthrough::registry::{Arch, Registry};
use gpu_passthrough_tests::fixtures;

const RELEASE: &str = "fx-535.309.01";

fn registry(dir: &Path) -> Registry {
    let header = format!(
        "kernel_version = \"{}\"\ndriver_version = \"{}\"\nmodule_flavor = \"proprietary\"\ngsp = false\n",
        fixtures::KERNEL_VERSION,
        fixtures::PROPRIETARY_DRIVER_VERSION
    );
    let path = fixtures::write_registry_with(
        dir,
        RELEASE,
        &header,
        &fixtures::proprietary_artifacts(),
        true,
    );
    Registry::load(&[path]).unwrap()
}

fn build(dir: &Path, registry: &Registry, caps: Option<&str>) -> Result<Layers, InitrdError> {
    let cache = dir.join("cache");
    let fetcher = Fetcher::new(&cache, FetchOptions::default()).unwrap();
    let builder = InitrdBuilder::new(&cache, &fetcher);
    let mut options = BuildOptions::new(Arch::X86_64, fixtures::guest_init_stand_in(dir));
    options.compression = LayerCompression::None;
    options.capabilities = caps.map(|c| c.parse::<CapabilitySet>().unwrap());
    builder.ensure(registry.release(RELEASE).unwrap(), &options, &NoProgress)
}

fn has_lib(layers: &Layers, stem: &str) -> bool {
    layers
        .manifest
        .libraries
        .iter()
        .any(|l| l.path.starts_with(&format!("/gpu/lib/{stem}.so")))
}

#[test]
fn video_libraries_are_packed_only_with_video() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());

    // Default: every capability the artifact has, recorded per file.
    let all = build(dir.path(), &registry, None).unwrap();
    let carried: Vec<Capability> = all.manifest.capabilities.keys().copied().collect();
    assert_eq!(
        carried,
        [Capability::Compute, Capability::Utility, Capability::Video]
    );
    assert!(has_lib(&all, "libnvcuvid") && has_lib(&all, "libnvidia-encode"));
    assert!(
        all.manifest.capabilities[&Capability::Video]
            .contains(&"/gpu/lib/libnvcuvid.so.535.309.01".to_string())
    );
    assert!(
        all.manifest.capabilities[&Capability::Utility]
            .contains(&"/gpu/bin/nvidia-smi".to_string())
    );

    // compute,utility: no video library in the layer or the manifest, a different cache entry.
    let cu = build(dir.path(), &registry, Some("compute,utility")).unwrap();
    assert_ne!(cu.key, all.key, "the selection is part of the cache key");
    assert!(!cu.reused);
    assert!(has_lib(&cu, "libcuda") && has_lib(&cu, "libnvidia-ml"));
    assert!(!has_lib(&cu, "libnvcuvid") && !has_lib(&cu, "libnvidia-encode"));
    assert!(!cu.manifest.capabilities.contains_key(&Capability::Video));
    let entries = gpu_passthrough::archive::cpio::read_initrd(&cu.gpu.path).unwrap();
    let names: Vec<String> = entries
        .iter()
        .flat_map(|l| l.entries.iter().map(|e| e.path.clone()))
        .collect();
    assert!(!names.iter().any(|n| n.contains("libnvcuvid")), "{names:?}");
    assert!(names.iter().any(|n| n.contains("libcuda.so.535.309.01")));

    // video alone: the video libraries and nothing of compute.
    let video = build(dir.path(), &registry, Some("video")).unwrap();
    assert!(has_lib(&video, "libnvcuvid") && !has_lib(&video, "libcuda"));
    assert!(
        video.manifest.binaries.is_empty(),
        "{:?}",
        video.manifest.binaries
    );

    // `all` is the default's layer, byte for byte.
    let all_again = build(dir.path(), &registry, Some("all")).unwrap();
    assert_eq!(all_again.gpu.sha256, all.gpu.sha256);
}

#[test]
fn a_capability_the_driver_lacks_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path());
    let err = build(dir.path(), &registry, Some("compute,graphics")).unwrap_err();
    assert!(
        matches!(
            err,
            InitrdError::CapabilityNotCarried {
                capability: Capability::Graphics,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("graphics") && msg.contains("compute,utility,video"),
        "{msg}"
    );
    assert!(
        !dir.path()
            .join("cache/layers")
            .read_dir()
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("tmp-"))
    );
}
