//! The registry's build fields: input kinds that repeat (header archives, patches in order),
//! the signer, `module_sig_force`, the build provenance; their validation, their round trip
//! through a file, pinning repeated kinds in order, and the provenance a diff shows.

use std::fs;

use gpu_passthrough::registry::{
    Arch, ArtifactKind, ArtifactPin, Registry, Sha256Digest, pin_artifacts, write_release,
};
use gpu_passthrough::versions::provenance;

const BUILT: &str = r#"
[releases."built"]
kernel_version = "6.1.0-56-amd64"
driver_version = "535.261.03"
module_flavor = "open"
signer = { subject = "Build key", key_id = "1F:A0:03:0B" }
module_sig_force = true

[releases."built".build]
builder = "gpu-passthrough 0.1.0"
compiler = "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
sandbox = "bubblewrap 0.8.0"
source_date_epoch = 0

[[releases."built".artifacts.x86_64]]
kind = "nvidia-modules"
url = "https://example.com/m.tar.gz"
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"
size = 10

[[releases."built".artifacts.x86_64]]
kind = "nvidia-kernel-source"
url = "https://example.com/src.deb"

[[releases."built".artifacts.x86_64]]
kind = "kernel-headers"
url = "https://example.com/h1.deb"

[[releases."built".artifacts.x86_64]]
kind = "kernel-headers"
url = "https://example.com/h2.deb"

[[releases."built".artifacts.x86_64]]
kind = "source-patch"
url = "https://example.com/a.patch"

[[releases."built".artifacts.x86_64]]
kind = "source-patch"
url = "https://example.com/b.patch"
"#;

#[test]
fn a_built_release_parses_and_round_trips_through_a_file() {
    let registry = Registry::parse(BUILT, "test").unwrap();
    let r = registry.release("built").unwrap();
    let signer = r.signer.as_ref().unwrap();
    assert_eq!(
        (signer.subject.as_str(), signer.key_id.as_str()),
        ("Build key", "1F:A0:03:0B")
    );
    assert!(r.module_sig_force);
    assert_eq!(
        r.build.as_ref().unwrap().compiler,
        "gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"
    );
    let patches: Vec<&str> = r.artifacts[&Arch::X86_64]
        .iter()
        .filter(|a| a.kind == ArtifactKind::SourcePatch)
        .map(|a| a.urls[0].as_str())
        .collect();
    assert_eq!(
        patches,
        ["https://example.com/a.patch", "https://example.com/b.patch"]
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    write_release(&file, r, false).unwrap();
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("signer = { subject = \"Build key\", key_id = \"1F:A0:03:0B\" }"),
        "{text}"
    );
    assert!(text.contains("module_sig_force = true"), "{text}");
    let again = Registry::read(&file).unwrap();
    let back = again.release("built").unwrap();
    assert_eq!(
        (&back.signer, back.module_sig_force, &back.build),
        (&r.signer, true, &r.build)
    );
    assert_eq!(back.artifacts, r.artifacts);
}

#[test]
fn the_build_fields_are_validated_naming_the_field() {
    let cases = [
        (
            BUILT.replace("module_sig_force = true", "module_sig_force = 1"),
            "module_sig_force",
        ),
        (
            BUILT.replace("key_id = \"1F:A0:03:0B\"", "key_id = \"1f:a0\""),
            "signer.key_id",
        ),
        (
            BUILT.replace("subject = \"Build key\", ", ""),
            "signer.subject",
        ),
        (
            BUILT.replace("source_date_epoch = 0", "source_date_epoch = -1"),
            "build.source_date_epoch",
        ),
        (BUILT.replace("compiler = ", "compilr = "), "build.compilr"),
        (
            BUILT.replace(
                "signer = { subject = \"Build key\", key_id = \"1F:A0:03:0B\" }\n",
                "",
            ),
            "signer",
        ),
        (
            BUILT.replacen(
                "kind = \"nvidia-kernel-source\"",
                "kind = \"nvidia-modules\"",
                1,
            ),
            "artifacts.x86_64[1].kind",
        ),
    ];
    for (text, field) in cases {
        let err = Registry::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(err.contains(&format!("field `{field}")), "{field}: {err}");
    }
}

#[test]
fn repeated_kinds_are_pinned_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    fs::write(&file, BUILT).unwrap();
    let registry = Registry::read(&file).unwrap();
    let release = registry.release("built").unwrap();
    let pin = |kind, n: u8| ArtifactPin {
        arch: Arch::X86_64,
        kind,
        sha256: Sha256Digest([n; 32]),
        size: u64::from(n),
    };
    pin_artifacts(
        &file,
        release,
        &[
            pin(ArtifactKind::SourcePatch, 1),
            pin(ArtifactKind::SourcePatch, 2),
        ],
    )
    .unwrap();
    let registry = Registry::read(&file).unwrap();
    let sizes: Vec<Option<u64>> = registry.release("built").unwrap().artifacts[&Arch::X86_64]
        .iter()
        .filter(|a| a.kind == ArtifactKind::SourcePatch)
        .map(|a| a.size)
        .collect();
    assert_eq!(sizes, [Some(1), Some(2)]);
}

#[test]
fn a_diff_names_each_provenance_field_that_changed() {
    let other = BUILT
        .replace("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0", "gcc-12 (Debian 12.2.0-14+deb12u2) 12.2.0")
        .replace("b.patch\"", "b.patch\"\nsha256 = \"2222222222222222222222222222222222222222222222222222222222222222\"\nsize = 3");
    let a = Registry::parse(BUILT, "a").unwrap();
    let b = Registry::parse(&other, "b").unwrap();
    let changes = provenance::changes(
        a.release("built").unwrap(),
        b.release("built").unwrap(),
        Arch::X86_64,
    );
    let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, ["compiler", "source-patch #2"]);
    assert_eq!(changes[1].from.as_deref(), Some("unpinned"));
}
