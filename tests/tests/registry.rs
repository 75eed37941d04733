//! The registry: the embedded default, every validation error, merging, editing files in place,
//! and property tests of the parser.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use gpu_passthrough::registry::{
    Arch, Artifact, ArtifactKind, ArtifactPin, ModuleFlavor, Registry, RegistryError, Release,
    Sha256Digest, pin_artifacts, write_release,
};
use proptest::prelude::*;

const SHA: &str = "27c12a3eaa71f4819b8511cf1840c506591c25c6cc5d1de7eda548d07ffe01bd";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = r#"# my releases
[releases."mine"]
kernel_version = "6.1.0-56-amd64"
driver_version = "535.261.03"
module_flavor = "open"

# the kernel
[[releases."mine".artifacts.x86_64]]
kind = "kernel"
url = "https://example.com/vmlinuz"
sha256 = "27c12a3eaa71f4819b8511cf1840c506591c25c6cc5d1de7eda548d07ffe01bd"
size = 123

[[releases."mine".artifacts.x86_64]]
kind = "nvidia-modules"
urls = ["https://a.example.com/m.tar.gz", "http://b.example.com/m.tar.gz"]
"#;

#[test]
fn embedded_registry_holds_hypemans_releases_unpinned() {
    let reg = Registry::embedded().unwrap();
    let names: Vec<_> = reg.releases().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "ch-6.12.8-kernel-1-202511182",
            "ch-6.12.8-kernel-1.1-20251211",
            "ch-6.12.8-kernel-1.2-20251213"
        ]
    );
    let default = reg.resolve(None).unwrap();
    assert_eq!(default.name, "ch-6.12.8-kernel-1.2-20251213");
    assert!(default.default);
    assert_eq!(default.driver_version.as_deref(), Some("570.86.16"));
    assert_eq!(default.module_flavor, Some(ModuleFlavor::Open));
    assert_eq!(default.source, "embedded");
    for kind in [
        ArtifactKind::Kernel,
        ArtifactKind::NvidiaModules,
        ArtifactKind::NvidiaDriverLibs,
    ] {
        let a = default.artifact(Arch::X86_64, kind).unwrap();
        assert!(a.urls[0].starts_with("https://github.com/kernel/linux/releases/download/"));
    }
    assert!(
        default
            .artifact(Arch::Aarch64, ArtifactKind::NvidiaModules)
            .is_none()
    );
    for r in reg.releases() {
        assert!(
            r.artifact(Arch::Aarch64, ArtifactKind::Kernel).is_some(),
            "{}",
            r.name
        );
        // Never invent a digest: every embedded artifact is unpinned.
        assert!(
            r.artifacts
                .values()
                .flatten()
                .all(|a| a.sha256.is_none() && a.size.is_none())
        );
    }
    for old in [
        "ch-6.12.8-kernel-1-202511182",
        "ch-6.12.8-kernel-1.1-20251211",
    ] {
        let r = reg.release(old).unwrap();
        assert_eq!(r.driver_version, None);
        assert_eq!(r.artifacts[&Arch::X86_64].len(), 1);
    }
}

#[test]
fn a_good_file_parses_into_the_documented_fields() {
    let reg = Registry::parse(GOOD, "good.toml").unwrap();
    let r = reg.release("mine").unwrap();
    assert_eq!(r.kernel_version, "6.1.0-56-amd64");
    assert_eq!(r.source, "good.toml");
    let k = r.artifact(Arch::X86_64, ArtifactKind::Kernel).unwrap();
    assert_eq!(k.sha256, Some(SHA.parse().unwrap()));
    assert_eq!(k.size, Some(123));
    let m = r
        .artifact(Arch::X86_64, ArtifactKind::NvidiaModules)
        .unwrap();
    assert_eq!(m.urls.len(), 2);
    assert!(!m.is_pinned());
    assert_eq!(reg.default_name(), None);
}

/// Each case: (what, registry text, field the error must name).
const INVALID: &[(&str, &str, &str)] = &[
    (
        "unknown release key",
        "[releases.r]\nkernel_version = \"6.1\"\ncolour = \"red\"\n",
        "colour",
    ),
    (
        "unknown artifact key",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://x/k\"\nmd5 = \"x\"\n",
        "artifacts.x86_64[0].md5",
    ),
    (
        "missing kernel_version",
        "[releases.r]\ndriver_version = \"1\"\n",
        "kernel_version",
    ),
    (
        "empty kernel_version",
        "[releases.r]\nkernel_version = \"  \"\n",
        "kernel_version",
    ),
    (
        "missing kind",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nurl = \"https://x/k\"\n",
        "artifacts.x86_64[0].kind",
    ),
    (
        "missing url",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\n",
        "artifacts.x86_64[0].url",
    ),
    (
        "malformed sha256",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://x/k\"\nsha256 = \"abc\"\n",
        "artifacts.x86_64[0].sha256",
    ),
    (
        "same kind twice for one arch",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://x/k\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://y/k\"\n",
        "artifacts.x86_64[1].kind",
    ),
    (
        "ftp URL",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"ftp://x/k\"\n",
        "artifacts.x86_64[0].url",
    ),
    (
        "driver artifacts without driver_version",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"nvidia-modules\"\nurl = \"https://x/m\"\n",
        "driver_version",
    ),
    (
        "unknown kind",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"initrd\"\nurl = \"https://x/k\"\n",
        "artifacts.x86_64[0].kind",
    ),
    (
        "unknown arch",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.riscv64]]\nkind = \"kernel\"\nurl = \"https://x/k\"\n",
        "artifacts.riscv64",
    ),
    (
        "bad flavor",
        "[releases.r]\nkernel_version = \"6.1\"\nmodule_flavor = \"closed\"\n",
        "module_flavor",
    ),
    (
        "negative size",
        "[releases.r]\nkernel_version = \"6.1\"\n[[releases.r.artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"https://x/k\"\nsize = -1\n",
        "artifacts.x86_64[0].size",
    ),
];

#[test]
fn each_validation_error_names_file_release_and_field() {
    let dir = tempfile::tempdir().unwrap();
    for (what, text, field) in INVALID {
        let file = write(dir.path(), "bad.toml", text);
        let err = Registry::load(std::slice::from_ref(&file)).unwrap_err();
        match &err {
            RegistryError::Invalid {
                file: f,
                release,
                field: got,
                ..
            }
            | RegistryError::BadDigest {
                file: f,
                release,
                field: got,
                ..
            } => {
                assert_eq!(f, &file.display().to_string(), "{what}");
                assert_eq!(release, "r", "{what}");
                assert_eq!(got, field, "{what}");
            }
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("bad.toml") && msg.contains("`r`") && msg.contains(field),
            "{what}: {msg}"
        );
    }
}

#[test]
fn unknown_top_level_key_is_an_error() {
    let err = Registry::parse("[release.r]\nkernel_version = \"x\"\n", "f.toml").unwrap_err();
    assert!(
        matches!(&err, RegistryError::Invalid { field, .. } if field == "release"),
        "{err:?}"
    );
}

#[test]
fn duplicate_release_names_both_lines() {
    let text =
        "[releases.\"r\"]\nkernel_version = \"6.1\"\n\n[releases.r]\nkernel_version = \"6.2\"\n";
    let err = Registry::parse(text, "dup.toml").unwrap_err();
    match err {
        RegistryError::DuplicateRelease {
            file,
            release,
            first_line,
            second_line,
        } => {
            assert_eq!((file.as_str(), release.as_str()), ("dup.toml", "r"));
            assert_eq!((first_line, second_line), (1, 4));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_defaults_in_one_file_are_an_error() {
    let text = "[releases.a]\nkernel_version = \"1\"\ndefault = true\n[releases.b]\nkernel_version = \"2\"\ndefault = true\n";
    let err = Registry::parse(text, "two.toml").unwrap_err();
    assert!(
        matches!(&err, RegistryError::TwoDefaults { file, first, second } if file == "two.toml" && first == "a" && second == "b"),
        "{err:?}"
    );
}

#[test]
fn syntax_errors_name_the_file() {
    let err = Registry::parse("[releases.r\n", "broken.toml").unwrap_err();
    assert!(matches!(err, RegistryError::Syntax { .. }));
    assert!(err.to_string().contains("broken.toml"));
}

#[test]
fn later_files_add_and_replace_releases_and_move_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let first = write(dir.path(), "first.toml", GOOD);
    let second = write(
        dir.path(),
        "second.toml",
        "[releases.\"ch-6.12.8-kernel-1-202511182\"]\nkernel_version = \"6.12.8-replaced\"\n\n[releases.extra]\nkernel_version = \"7.0\"\ndefault = true\n",
    );
    let reg = Registry::load(&[first.clone(), second.clone()]).unwrap();
    assert_eq!(
        reg.release("mine").unwrap().source,
        first.display().to_string()
    );
    let replaced = reg.release("ch-6.12.8-kernel-1-202511182").unwrap();
    assert_eq!(replaced.kernel_version, "6.12.8-replaced");
    assert_eq!(replaced.source, second.display().to_string());
    assert!(replaced.artifacts.is_empty(), "a release is replaced whole");
    assert_eq!(reg.resolve(None).unwrap().name, "extra");
    assert_eq!(reg.releases().filter(|r| r.default).count(), 1);
    assert_eq!(
        reg.release("ch-6.12.8-kernel-1.1-20251211").unwrap().source,
        "embedded"
    );
}

#[test]
fn unknown_release_lists_the_known_ones() {
    let reg = Registry::embedded().unwrap();
    let err = reg.resolve(Some("nope")).unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("ch-6.12.8-kernel-1.1-20251211"),
        "{err}"
    );
    let none = Registry::parse(GOOD, "g.toml").unwrap();
    let err = none.resolve(None).unwrap_err();
    assert!(matches!(err, RegistryError::NoDefault { .. }));
    assert!(err.to_string().contains("mine"));
}

fn sample_release(name: &str) -> Release {
    let mut artifacts = BTreeMap::new();
    artifacts.insert(
        Arch::X86_64,
        vec![Artifact {
            kind: ArtifactKind::Kernel,
            urls: vec!["https://example.com/k".into()],
            sha256: Some(Sha256Digest::of(b"k")),
            size: Some(1),
        }],
    );
    Release {
        name: name.into(),
        kernel_version: "6.1.0-56-amd64".into(),
        driver_version: None,
        module_flavor: None,
        gsp: true,
        vgpu: None,
        signer: None,
        module_sig_force: false,
        build: None,
        default: false,
        artifacts,
        source: String::new(),
    }
}

#[test]
fn write_release_keeps_comments_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "reg.toml", GOOD);
    write_release(&file, &sample_release("new"), false).unwrap();
    let text = fs::read_to_string(&file).unwrap();
    assert!(
        text.starts_with(GOOD),
        "the existing text is kept byte for byte:\n{text}"
    );
    let reg = Registry::read(&file).unwrap();
    let mut expected = sample_release("new");
    expected.source = file.display().to_string();
    assert_eq!(reg.release("new").unwrap(), &expected);

    let err = write_release(&file, &sample_release("mine"), false).unwrap_err();
    assert!(matches!(err, RegistryError::Exists { .. }));
    assert!(err.to_string().contains("--replace"));
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        text,
        "a refused write changes nothing"
    );

    let mut default = sample_release("mine");
    default.default = true;
    write_release(&file, &default, true).unwrap();
    let reg = Registry::read(&file).unwrap();
    assert_eq!(reg.default_name(), Some("mine"));
    assert!(fs::read_to_string(&file).unwrap().contains("# my releases"));

    let created = dir.path().join("fresh.toml");
    write_release(&created, &sample_release("x"), false).unwrap();
    assert!(Registry::read(&created).unwrap().release("x").is_ok());
}

#[test]
fn pins_are_written_in_place_or_copy_an_embedded_release() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "reg.toml", GOOD);
    let reg = Registry::load(std::slice::from_ref(&file)).unwrap();
    let digest = Sha256Digest::of(b"modules");
    let pin = ArtifactPin {
        arch: Arch::X86_64,
        kind: ArtifactKind::NvidiaModules,
        sha256: digest,
        size: 7,
    };
    pin_artifacts(
        &file,
        reg.release("mine").unwrap(),
        std::slice::from_ref(&pin),
    )
    .unwrap();
    let text = fs::read_to_string(&file).unwrap();
    assert!(text.contains("# the kernel") && text.contains("# my releases"));
    let again = Registry::read(&file).unwrap();
    let m = again
        .release("mine")
        .unwrap()
        .artifact(Arch::X86_64, ArtifactKind::NvidiaModules)
        .unwrap();
    assert_eq!((m.sha256, m.size), (Some(digest), Some(7)));

    let embedded = reg.release("ch-6.12.8-kernel-1.2-20251213").unwrap();
    pin_artifacts(&file, embedded, &[pin]).unwrap();
    let merged = Registry::load(std::slice::from_ref(&file)).unwrap();
    let copied = merged.release("ch-6.12.8-kernel-1.2-20251213").unwrap();
    assert_eq!(copied.source, file.display().to_string());
    let m = copied
        .artifact(Arch::X86_64, ArtifactKind::NvidiaModules)
        .unwrap();
    assert_eq!(m.sha256, Some(digest));
    assert!(copied.default, "it stays the default it was");
    assert!(
        copied
            .artifact(Arch::X86_64, ArtifactKind::Kernel)
            .unwrap()
            .sha256
            .is_none()
    );
}

fn arb_release() -> impl Strategy<Value = Release> {
    let artifact = (
        0usize..5,
        proptest::collection::vec("[a-z0-9]{1,8}", 1..3),
        proptest::option::of(any::<[u8; 32]>()),
        proptest::option::of(0u64..i64::MAX as u64),
    )
        .prop_map(|(k, paths, sha, size)| Artifact {
            kind: ArtifactKind::ALL[k],
            urls: paths
                .into_iter()
                .map(|p| format!("https://m.example/{p}"))
                .collect(),
            // A pinned digest always comes with its size (the parser requires it).
            size: if sha.is_some() {
                size.or(Some(0))
            } else {
                size
            },
            sha256: sha.map(Sha256Digest),
        });
    (
        "[a-zA-Z0-9][a-zA-Z0-9._ -]{0,20}",
        "[0-9][0-9a-z.+-]{0,15}",
        proptest::option::of("[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}"),
        proptest::option::of(prop_oneof![
            Just(ModuleFlavor::Open),
            Just(ModuleFlavor::Proprietary)
        ]),
        proptest::collection::vec(artifact.clone(), 0..5),
        proptest::collection::vec(artifact, 0..3),
    )
        .prop_map(|(name, kernel, driver, flavor, x86, arm)| {
            let dedup = |list: Vec<Artifact>| {
                let mut out: Vec<Artifact> = Vec::new();
                for a in list {
                    if !out.iter().any(|b| b.kind == a.kind) {
                        out.push(a);
                    }
                }
                out
            };
            let mut artifacts = BTreeMap::new();
            for (arch, list) in [(Arch::X86_64, dedup(x86)), (Arch::Aarch64, dedup(arm))] {
                if !list.is_empty() {
                    artifacts.insert(arch, list);
                }
            }
            let needs_driver = artifacts
                .values()
                .flatten()
                .any(|a| a.kind != ArtifactKind::Kernel);
            Release {
                name,
                kernel_version: kernel,
                driver_version: driver.or_else(|| needs_driver.then(|| "1.2.3".to_string())),
                module_flavor: flavor,
                gsp: true,
                vgpu: None,
                signer: None,
                module_sig_force: false,
                build: None,
                default: false,
                artifacts,
                source: "round-trip".into(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn parser_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = Registry::parse(&text, "fuzz.toml");
    }

    #[test]
    fn parser_never_panics_on_toml_shaped_text(
        lines in proptest::collection::vec(prop_oneof![
            Just("[releases.r]".to_string()),
            Just("[[releases.r.artifacts.x86_64]]".to_string()),
            "[a-z_]{1,15} = \"[ -~]{0,20}\"",
            "[a-z_]{1,15} = -?[0-9]{1,20}",
            "[a-z_]{1,15} = (true|false)",
            "\\[releases\\.\"[ -~]{0,10}\"\\]",
            "\\PC{0,30}",
        ], 0..20)
    ) {
        let _ = Registry::parse(&lines.join("\n"), "fuzz.toml");
    }

    #[test]
    fn a_valid_registry_round_trips(releases in proptest::collection::vec(arb_release(), 1..4), default in any::<prop::sample::Index>()) {
        let mut reg = Registry::default();
        let mut by_name = BTreeMap::new();
        for r in releases {
            by_name.insert(r.name.clone(), r);
        }
        let chosen = default.index(by_name.len());
        for (i, r) in by_name.values_mut().enumerate() {
            r.default = i == chosen;
        }
        // Write each release through the file writer, read it back, and merge: covers both
        // serializers (write_release and to_toml).
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.toml");
        for r in by_name.values() {
            write_release(&file, r, false).unwrap();
        }
        reg.merge(Registry::parse(&fs::read_to_string(&file).unwrap(), "round-trip").unwrap());
        let text = reg.to_toml();
        let back = Registry::parse(&text, "round-trip").unwrap();
        let got: Vec<_> = back.releases().cloned().collect();
        let want: Vec<_> = by_name.into_values().collect();
        prop_assert_eq!(got, want);
    }
}

/// `gsp = false` is for proprietary releases only, and survives a write and a re-read.
#[test]
fn gsp_false_needs_the_proprietary_flavor_and_round_trips() {
    let release = |flavor: &str| {
        format!(
            "[releases.\"p\"]\nkernel_version = \"6.1.0-56-amd64\"\ndriver_version = \"535.309.01\"\n\
             module_flavor = \"{flavor}\"\ngsp = false\n"
        )
    };
    let err = Registry::parse(&release("open"), "r.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("gsp") && err.contains("proprietary"), "{err}");
    let reg = Registry::parse(&release("proprietary"), "r.toml").unwrap();
    let p = reg.release("p").unwrap();
    assert!(!p.gsp);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.toml");
    gpu_passthrough::registry::write_release(&file, p, false).unwrap();
    let again = Registry::read(&file).unwrap();
    assert!(!again.release("p").unwrap().gsp);
    let default = Registry::parse(
        "[releases.\"o\"]\nkernel_version = \"6.1.0-56-amd64\"\n",
        "r.toml",
    )
    .unwrap();
    assert!(default.release("o").unwrap().gsp, "GSP is the default");
}

#[test]
fn a_request_without_a_release_reads_no_registry_file() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "this is [not toml").unwrap();
    let files = [broken];
    assert!(Registry::for_request(&files, None).is_ok());
    let err = Registry::for_request(&files, Some("any")).unwrap_err();
    assert!(err.to_string().contains("broken.toml"), "{err}");
}
