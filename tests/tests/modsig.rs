//! Module signatures read by `gpu_passthrough::modsig` against kmod's real `modinfo`: the Debian
//! kernel's own signed modules, and a fixture module signed here by the kernel's `sign-file`
//! (from the `linux-kbuild-6.1` .deb of the build inputs) with throwaway keys.
//!
//! `modinfo` (kmod, built with libcrypto as Debian's is), `openssl` and `dpkg-deb` are required:
//! a missing one fails the test with what to install.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gpu_passthrough::archive::tar::{Limits, extract_tar};
use gpu_passthrough::modsig::{self, ModuleSignature};
use gpu_passthrough_tests::fixtures;

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
