//! Module signatures read by `gpu_passthrough::modsig` against kmod's real `modinfo`: the Debian
//! kernel's own signed modules, and a fixture module signed here by the kernel's `sign-file`
//! (from the `linux-kbuild-6.1` .deb of the build inputs) with throwaway keys. Then a release's
//! signer checked by inspection, `versions add` and `verify --deep` on modules signed that way.
//!
//! `modinfo` (kmod, built with libcrypto as Debian's is), `openssl` and `dpkg-deb` are required:
//! a missing one fails the test with what to install.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gpu_passthrough::archive::tar::{Limits, extract_tar};
use gpu_passthrough::fetch::NoProgress;
use gpu_passthrough::inspect::{Problem, SigningRule, check_signatures};
use gpu_passthrough::modsig::{self, ModuleSignature};
use gpu_passthrough::registry::{Arch, ArtifactKind, ModuleFlavor, Registry, Signer};
use gpu_passthrough::versions::deep::{self, CacheStatus};
use gpu_passthrough::versions::{self, AddRequest, VersionsError};
use gpu_passthrough_tests::fixtures;
use gpu_passthrough_tests::http::Mirror;

const KBUILD_DEB: &str = "build-inputs/linux-kbuild-6.1_6.1.192-3_amd64.deb";
const KVER: &str = "6.1.0-56-amd64";

/// Run a tool, failing the test with the package to install when it is not there.
fn run(program: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): install the {package} package (apt-get install {package})")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What kmod's `modinfo` prints for one field (`-F`), trimmed; empty when absent.
fn modinfo_field(module: &Path, field: &str) -> String {
    run("modinfo", "kmod", &["-F", field, module.to_str().unwrap()])
        .trim()
        .to_string()
}

/// Our reading of `module` must be what `modinfo` prints.
fn assert_same_as_modinfo(module: &Path) -> Option<ModuleSignature> {
    let ours = modsig::from_path(module).unwrap_or_else(|e| panic!("{}: {e}", module.display()));
    let signer = modinfo_field(module, "signer");
    let key = modinfo_field(module, "sig_key");
    let hash = modinfo_field(module, "sig_hashalgo");
    match &ours {
        Some(sig) => {
            assert_eq!(
                sig.signer.as_deref(),
                Some(signer.as_str()),
                "{}",
                module.display()
            );
            assert_eq!(sig.key_id_hex(), key, "{}", module.display());
            assert_eq!(sig.hash_algo, hash, "{}", module.display());
        }
        None => assert_eq!(
            (signer.as_str(), key.as_str(), hash.as_str()),
            ("", "", ""),
            "{}: modinfo sees a signature we do not",
            module.display()
        ),
    }
    ours
}

struct Scratch {
    dir: PathBuf,
    sign_file: PathBuf,
}

/// The fixture modules and `sign-file`, unpacked once for this test binary.
fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = fixtures::process_scratch(env!("CARGO_TARGET_TMPDIR"), "modsig");
        extract_tar(
            &fixtures::path(fixtures::KERNEL_MODULES),
            &dir.join("kernel"),
            &Limits::default(),
        )
        .unwrap();
        extract_tar(
            &fixtures::path(fixtures::NVIDIA_MODULES),
            &dir.join("nvidia"),
            &Limits::default(),
        )
        .unwrap();
        let kbuild = dir.join("kbuild");
        run(
            "dpkg-deb",
            "dpkg",
            &[
                "-x",
                fixtures::path(KBUILD_DEB).to_str().unwrap(),
                kbuild.to_str().unwrap(),
            ],
        );
        let sign_file = kbuild.join("usr/lib/linux-kbuild-6.1/scripts/sign-file");
        assert!(sign_file.is_file(), "{} has no sign-file", KBUILD_DEB);
        Scratch { dir, sign_file }
    })
}

/// A throwaway self-signed key and certificate; `serial` as `openssl req -set_serial` takes it.
fn throwaway_key(dir: &Path, name: &str, subject: &str, serial: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    run(
        "openssl",
        "openssl",
        &[
            "req",
            "-new",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            subject,
            "-set_serial",
            serial,
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    (key, cert)
}

/// A copy of the (unsigned) fixture `nvidia-peermem.ko`, signed by `sign-file` with `hash`.
fn signed_peermem(name: &str, hash: &str, key: &Path, cert: &Path) -> PathBuf {
    let s = scratch();
    let module = s.dir.join(format!("{name}.ko"));
    std::fs::copy(
        s.dir.join(format!(
            "nvidia/lib/modules/{KVER}/kernel/drivers/gpu/nvidia-peermem.ko"
        )),
        &module,
    )
    .unwrap();
    let out = Command::new(&s.sign_file)
        .args([hash])
        .args([key, cert, &module])
        .output()
        .expect("run sign-file (needs libssl3)");
    assert!(
        out.status.success(),
        "sign-file failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    module
}

#[test]
fn every_debian_signed_kernel_module_reads_as_modinfo_shows_it() {
    let root = scratch().dir.join(format!("kernel/lib/modules/{KVER}"));
    let mut modules = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "ko") {
                modules.push(path);
            }
        }
    }
    assert!(modules.len() >= 40, "{} modules", modules.len());
    for module in &modules {
        let sig = assert_same_as_modinfo(module)
            .unwrap_or_else(|| panic!("{} is signed by Debian", module.display()));
        assert_eq!(
            sig.signer.as_deref(),
            Some("Build time autogenerated kernel key")
        );
    }
}

/// A real Debian-signed module cut at every length, from either end, and with every byte of its
/// signature flipped: an error or a reading, never a panic, and never another signer.
#[test]
fn a_real_signature_cut_or_flipped_anywhere_is_an_error_or_unsigned() {
    let module = scratch().dir.join(format!(
        "kernel/lib/modules/{KVER}/kernel/crypto/crc32c_generic.ko"
    ));
    let whole = std::fs::read(&module).unwrap();
    let parsed = modsig::parse(&whole)
        .unwrap()
        .expect("Debian signs its modules");
    assert_eq!(
        parsed.key_id_hex(),
        "66:F5:4E:15:66:A0:43:CC:30:30:42:0E:18:1C:F8:50:FB:9F:42:AC",
        "modinfo's sig_key for this module"
    );
    assert_eq!(
        parsed.issuer.as_deref(),
        Some("CN=Build time autogenerated kernel key")
    );
    for cut in 0..whole.len() {
        // Cutting from the end loses the marker (unsigned); from the front, the DER or the
        // length's room goes.
        assert_eq!(modsig::parse(&whole[..cut]).unwrap(), None, "cut to {cut}");
        if let Ok(Some(other)) = modsig::parse(&whole[cut..]) {
            assert_eq!(other, parsed, "front cut {cut}");
        }
    }
    // The signature is the tail before the 12-byte trailer and the 28-byte marker.
    let sig_len = u32::from_be_bytes(
        whole[whole.len() - 32..whole.len() - 28]
            .try_into()
            .unwrap(),
    );
    let start = whole.len() - 40 - sig_len as usize;
    for at in start..whole.len() - 40 {
        let mut flipped = whole.clone();
        flipped[at] ^= 0xff;
        let _ = modsig::parse(&flipped);
    }
}

#[test]
fn the_unsigned_nvidia_modules_have_no_signature() {
    let gpu = scratch()
        .dir
        .join(format!("nvidia/lib/modules/{KVER}/kernel/drivers/gpu"));
    for name in ["nvidia", "nvidia-uvm", "nvidia-peermem"] {
        assert_eq!(
            assert_same_as_modinfo(&gpu.join(format!("{name}.ko"))),
            None
        );
    }
}

#[test]
fn a_module_signed_by_sign_file_names_our_key() {
    let dir = &scratch().dir;
    // The common name is not the first attribute, and the serial's top bit is set, so its DER
    // integer carries a leading zero byte that `sig_key` leaves out.
    let (key, cert) = throwaway_key(
        dir,
        "ours",
        "/O=gpu-passthrough tests/CN=gpu-passthrough throwaway key/",
        "0x80A1B2C3D4E5F60718293A4B5C6D7E8F90A1B2C3",
    );
    let module = signed_peermem("peermem-sha256", "sha256", &key, &cert);
    let sig = assert_same_as_modinfo(&module).expect("signed");
    assert_eq!(sig.signer.as_deref(), Some("gpu-passthrough throwaway key"));
    assert_eq!(
        sig.key_id_hex(),
        "80:A1:B2:C3:D4:E5:F6:07:18:29:3A:4B:5C:6D:7E:8F:90:A1:B2:C3"
    );
    assert_eq!(sig.hash_algo, "sha256");
    assert_eq!(
        sig.issuer.as_deref(),
        Some("CN=gpu-passthrough throwaway key,O=gpu-passthrough tests")
    );
    // The signature is appended: the module's own metadata is unchanged.
    let info = gpu_passthrough::modinfo::ModInfo::from_path(&module).unwrap();
    assert_eq!(info.version(), Some(fixtures::DRIVER_VERSION));

    // The same module compressed as distributions ship it reads the same (kmod reads .ko.xz).
    let xz = dir.join("peermem-sha256.ko.xz");
    std::fs::write(
        &xz,
        liblzma::encode_all(&std::fs::read(&module).unwrap()[..], 1).unwrap(),
    )
    .unwrap();
    assert_eq!(assert_same_as_modinfo(&xz), Some(sig));
}

#[test]
fn other_digests_and_a_name_without_common_name_read_as_modinfo_shows_them() {
    let dir = &scratch().dir;
    // No common name: kmod (and so we) show the name's last attribute.
    let (key, cert) = throwaway_key(dir, "no-cn", "/C=DE/O=No Common Name Org/", "7");
    let module = signed_peermem("peermem-sha512", "sha512", &key, &cert);
    let sig = assert_same_as_modinfo(&module).expect("signed");
    assert_eq!(sig.signer.as_deref(), Some("No Common Name Org"));
    assert_eq!(sig.key_id_hex(), "07");
    assert_eq!(sig.hash_algo, "sha512");

    let module = signed_peermem("peermem-sha384", "sha384", &key, &cert);
    assert_eq!(
        assert_same_as_modinfo(&module).map(|s| s.hash_algo),
        Some("sha384".to_string())
    );
}

#[test]
fn a_signature_cut_short_is_an_error_naming_the_file() {
    let dir = &scratch().dir;
    let (key, cert) = throwaway_key(dir, "cut", "/CN=cut/", "11");
    let module = signed_peermem("peermem-cut", "sha256", &key, &cert);
    let mut bytes = std::fs::read(&module).unwrap();
    // Drop 40 bytes of the DER just before the 12-byte trailer and the marker.
    let tail = bytes.split_off(bytes.len() - 12 - modsig::SIGNATURE_MARKER.len());
    bytes.truncate(bytes.len() - 40);
    bytes.extend_from_slice(&tail);
    let cut = dir.join("peermem-cut-short.ko");
    std::fs::write(&cut, &bytes).unwrap();
    let err = modsig::from_path(&cut).unwrap_err();
    assert!(
        matches!(err, modsig::ModsigError::BadSignedData { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("peermem-cut-short.ko"), "{err}");
}

/// The fixture NVIDIA modules tarball with every `.ko` signed by `key`/`cert`, written to `out`.
fn signed_nvidia_tarball(out: &Path, key: &Path, cert: &Path) {
    let s = scratch();
    let work = tempfile::tempdir_in(&s.dir).unwrap();
    fixtures::repack_modules(
        &fixtures::path(fixtures::NVIDIA_MODULES),
        out,
        |path, data| {
            let ko = work.path().join("m.ko");
            std::fs::write(&ko, data).unwrap();
            let status = Command::new(&s.sign_file)
                .arg("sha256")
                .args([key, cert, &ko])
                .status()
                .expect("run sign-file");
            assert!(status.success(), "sign-file on {path}");
            (path.to_string(), std::fs::read(&ko).unwrap())
        },
    );
}

/// A throwaway key, the fixture modules signed by it (tarball and unpacked), and the signer a
/// release would record for it.
struct SignedRelease {
    tarball: PathBuf,
    tree: PathBuf,
    signer: Signer,
}

fn signed_release() -> &'static SignedRelease {
    static SIGNED: OnceLock<SignedRelease> = OnceLock::new();
    SIGNED.get_or_init(|| {
        let dir = &scratch().dir;
        let (key, cert) = throwaway_key(dir, "release", "/CN=release signing key/", "0x1F2E3D");
        let tarball = dir.join("nvidia-signed.tar.gz");
        signed_nvidia_tarball(&tarball, &key, &cert);
        let tree = dir.join("nvidia-signed");
        extract_tar(&tarball, &tree, &Limits::default()).unwrap();
        SignedRelease {
            tarball,
            tree,
            signer: Signer {
                subject: "release signing key".into(),
                key_id: "1F:2E:3D".into(),
            },
        }
    })
}

#[test]
fn inspection_wants_every_nvidia_module_signed_by_the_release_signer() {
    let signed = signed_release();
    let rule = |signer, module_sig_force| SigningRule {
        signer,
        module_sig_force,
    };
    assert_eq!(
        check_signatures(rule(Some(&signed.signer), false), &signed.tree),
        []
    );
    assert_eq!(
        check_signatures(rule(Some(&signed.signer), true), &signed.tree),
        []
    );
    // Another key id: each module is named with what it is signed by.
    let other = Signer {
        key_id: "1F:2E:3E".into(),
        ..signed.signer.clone()
    };
    let problems = check_signatures(rule(Some(&other), false), &signed.tree);
    assert_eq!(problems.len(), 5, "{problems:?}");
    assert!(problems.iter().all(
        |p| matches!(p, Problem::WrongSigner { found_key_id, .. } if found_key_id == "1F:2E:3D")
    ));
    assert!(
        problems[0]
            .to_string()
            .contains("is signed by \"release signing key\" (key 1F:2E:3D)")
    );
    // The unsigned fixture modules against a signer.
    let unsigned = scratch().dir.join("nvidia");
    let problems = check_signatures(rule(Some(&signed.signer), false), &unsigned);
    assert_eq!(problems.len(), 5, "{problems:?}");
    assert!(
        problems
            .iter()
            .all(|p| matches!(p, Problem::UnsignedModule { .. }))
    );
    // A kernel that refuses unsigned modules and no signer: refused once, and each module.
    let problems = check_signatures(rule(None, true), &unsigned);
    assert_eq!(problems[0], Problem::ForcedSignaturesWithoutSigner);
    assert_eq!(
        problems
            .iter()
            .filter(|p| matches!(p, Problem::UnsignedUnderForce { .. }))
            .count(),
        5
    );
    // No signer and no force: nothing is read, nothing refused.
    assert_eq!(check_signatures(rule(None, false), &unsigned), []);
}

fn add_request(file: PathBuf, mirror: &Mirror, signer: Option<Signer>, force: bool) -> AddRequest {
    AddRequest {
        file,
        release: "signed".into(),
        kernel_version: KVER.into(),
        driver_version: Some(fixtures::DRIVER_VERSION.into()),
        flavor: Some(ModuleFlavor::Open),
        gsp: true,
        arch: Arch::X86_64,
        artifacts: BTreeMap::from([
            (
                ArtifactKind::NvidiaModules,
                vec![mirror.url("/modules.tar.gz")],
            ),
            (
                ArtifactKind::NvidiaFirmware,
                vec![mirror.url("/firmware.tar.gz")],
            ),
        ]),
        default: false,
        replace: true,
        max_download_bytes: None,
        signer,
        module_sig_force: force,
    }
}

#[test]
fn versions_add_checks_and_records_the_signer_and_verify_deep_checks_the_unpacked_tree() {
    let signed = signed_release();
    let mirror = Mirror::files([
        ("/modules.tar.gz", std::fs::read(&signed.tarball).unwrap()),
        (
            "/firmware.tar.gz",
            std::fs::read(fixtures::path(fixtures::NVIDIA_FIRMWARE)).unwrap(),
        ),
    ]);
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let fetcher = versions::fetcher(&cache).unwrap();
    let file = work.path().join("registry.toml");

    let wrong = Signer {
        subject: "someone else".into(),
        ..signed.signer.clone()
    };
    let err = versions::add(
        &fetcher,
        &add_request(file.clone(), &mirror, Some(wrong), false),
        &NoProgress,
    )
    .unwrap_err();
    let message = gpu_passthrough::error_chain(&err);
    assert!(
        matches!(err, VersionsError::Refused(_))
            && message.contains("nvidia.ko")
            && message.contains("\"someone else\""),
        "{message}"
    );
    assert!(!file.exists(), "a refused add writes nothing");
    let err = versions::add(
        &fetcher,
        &add_request(file.clone(), &mirror, None, true),
        &NoProgress,
    )
    .unwrap_err();
    let message = gpu_passthrough::error_chain(&err);
    assert!(message.contains("names no signer"), "{message}");

    let report = versions::add(
        &fetcher,
        &add_request(file.clone(), &mirror, Some(signed.signer.clone()), true),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.release.signer.as_ref(), Some(&signed.signer));
    let registry = Registry::read(&file).unwrap();
    let release = registry.release("signed").unwrap();
    assert_eq!(release.signer.as_ref(), Some(&signed.signer));
    assert!(release.module_sig_force);

    // verify --deep: nothing unpacked yet, then the signed tree, then a tree whose modules lost
    // their signature.
    let rows = deep::verify_signatures(&cache, [release]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, CacheStatus::Unrecorded, "{:?}", rows[0]);
    let digest = release
        .artifact(Arch::X86_64, ArtifactKind::NvidiaModules)
        .and_then(|a| a.sha256)
        .unwrap();
    let unpacked = cache.join("unpacked").join(digest.to_hex());
    std::fs::create_dir_all(cache.join("unpacked")).unwrap();
    extract_tar(&signed.tarball, &unpacked, &Limits::default()).unwrap();
    let rows = deep::verify_signatures(&cache, [release]);
    assert_eq!(rows[0].status, CacheStatus::Ok, "{:?}", rows[0]);
    let nvidia = unpacked.join(format!("lib/modules/{KVER}/kernel/drivers/gpu/nvidia.ko"));
    std::fs::copy(
        scratch().dir.join(format!(
            "nvidia/lib/modules/{KVER}/kernel/drivers/gpu/nvidia.ko"
        )),
        &nvidia,
    )
    .unwrap();
    let rows = deep::verify_signatures(&cache, [release]);
    assert_eq!(rows[0].status, CacheStatus::Mismatch, "{:?}", rows[0]);
    let detail = rows[0].detail.as_deref().unwrap();
    assert!(
        detail.contains("nvidia.ko") && detail.contains("carries no signature"),
        "{detail}"
    );
}
