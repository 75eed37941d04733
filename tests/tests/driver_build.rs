//! `versions build` end to end with a tiny out-of-tree module this test writes (laid out like
//! NVIDIA's source: `Kbuild` with `NV_VERSION_STRING`, `nvidia/nv-frontend.c` with the license),
//! built against the real 6.1.0-56 headers packages through the same sandbox as the NVIDIA build,
//! the inputs served over loopback. Each bad input of the issue has its test.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gpu_passthrough::driver_build::sandbox::SandboxLimits;
use gpu_passthrough::driver_build::{DriverBuildError, SigningKey};
use gpu_passthrough::fetch::{FetchOptions, Fetcher, NoProgress};
use gpu_passthrough::outcome::{Classify, Outcome, ReportOutcome};
use gpu_passthrough::registry::{ArtifactKind, ModuleFlavor, Registry};
use gpu_passthrough::versions::build::{
    self, BuildError, BuildInputs, BuildReport, BuildRequest, RebuildRequest,
};
use gpu_passthrough_tests::fixtures::{self, DRIVER_VERSION, KERNEL_VERSION};
use gpu_passthrough_tests::http::Mirror;

const HEADERS: [&str; 3] = [
    "linux-headers-6.1.0-56-amd64_6.1.192-2_amd64.deb",
    "linux-headers-6.1.0-56-common_6.1.192-2_all.deb",
    "linux-kbuild-6.1_6.1.192-3_amd64.deb",
];

/// The same Make invocation NVIDIA's Makefile makes, from the variables the builder passes.
const KBUILD: &str =
    "\t$(MAKE) -C $(SYSSRC) KBUILD_OUTPUT=$(SYSOUT) M=$(CURDIR) CC=$(CC) modules\n";

/// A tiny module source: `before` runs before Kbuild in the `modules` target.
struct Tiny<'a> {
    version: &'a str,
    /// What `MODULE_VERSION` says (the Kbuild's version unless a test lies).
    module_version: &'a str,
    license: &'a str,
    before: &'a str,
    code: &'a str,
}

impl Default for Tiny<'_> {
    fn default() -> Self {
        Tiny {
            version: DRIVER_VERSION,
            module_version: "NV_VERSION_STRING",
            license: "Dual MIT/GPL",
            before: "",
            code: "static int __init nv_init(void) { return 0; }",
        }
    }
}

impl Tiny<'_> {
    /// The source as a `.tar.gz` in `dir`, named `name`.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let mut tar = tar::Builder::new(Vec::new());
        let mut file = |path: &str, text: String| {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).unwrap();
            h.set_size(text.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append(&h, text.as_bytes()).unwrap();
        };
        file(
            "kernel-open/Kbuild",
            format!(
                "ccflags-y += -DNV_VERSION_STRING=\\\"{}\\\"\nobj-m += nvidia.o\nnvidia-y := nvidia/nv-frontend.o\n",
                self.version
            ),
        );
        file(
            "kernel-open/Makefile",
            format!("modules:\n{}{KBUILD}", self.before),
        );
        file(
            "kernel-open/nvidia/nv-frontend.c",
            format!(
                "#include <linux/module.h>\n#include <linux/init.h>\n\
                 MODULE_LICENSE(\"{}\");\nMODULE_VERSION({});\n{}\n\
                 static void __exit nv_exit(void) {{}}\nmodule_init(nv_init);\nmodule_exit(nv_exit);\n",
                self.license, self.module_version, self.code
            ),
        );
        let bytes = tar.into_inner().unwrap();
        let path = dir.join(name);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        fs::write(&path, gz.finish().unwrap()).unwrap();
        path
    }
}

/// Test scaffolding: a scratch dir served over loopback, the fixtures' headers served too.
struct Setup {
    dir: tempfile::TempDir,
    served: Mirror,
    headers: Mirror,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("www")).unwrap();
        Setup {
            served: Mirror::dir(&dir.path().join("www")),
            headers: Mirror::dir(&fixtures::path("build-inputs")),
            dir,
        }
    }

    fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    fn source(&self, tiny: &Tiny, name: &str) -> String {
        tiny.write(&self.www(), name);
        self.served.url(&format!("/{name}"))
    }

    fn request(&self, source: String) -> BuildRequest {
        BuildRequest {
            file: self.dir.path().join("registry.toml"),
            release: "tiny".into(),
            kernel_version: KERNEL_VERSION.into(),
            driver_version: DRIVER_VERSION.into(),
            flavor: ModuleFlavor::Open,
            arch: gpu_passthrough::registry::Arch::X86_64,
            inputs: BuildInputs {
                source: vec![source],
                headers: HEADERS
                    .iter()
                    .map(|h| self.headers.url(&format!("/{h}")))
                    .collect(),
                patches: Vec::new(),
                others: Default::default(),
            },
            signing: None,
            base_url: None,
            out_dir: Some(self.dir.path().join("out")),
            default: false,
            replace: false,
            gsp: true,
            max_download_bytes: None,
            limits: SandboxLimits {
                wall: Duration::from_secs(600),
                memory_bytes: 4 << 30,
            },
            jobs: Some(2),
        }
    }

    fn cache(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn build(&self, req: &BuildRequest, cache: &str) -> Result<BuildReport, BuildError> {
        let cache = self.cache(cache);
        let fetcher = Fetcher::new(&cache, FetchOptions::default()).unwrap();
        build::build(&fetcher, &cache, req, &NoProgress, &|_| {})
    }
}

fn refused_before_compiling(err: &BuildError) {
    assert_eq!(err.outcome(), Outcome::Refused, "{err}");
}

#[test]
fn a_tiny_module_builds_in_the_sandbox_is_pinned_cached_and_reproducible() {
    let s = Setup::new();
    let req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    let first = s.build(&req, "cache-a").unwrap();
    assert!(!first.cache_hit);
    assert_eq!(first.modules.len(), 1);
    assert_eq!(first.modules[0].name, "nvidia.ko");
    assert_eq!(
        first.file_name,
        "nvidia-open-modules-535.261.03-6.1.0-56-amd64-x86_64.tar.gz"
    );
    let published = first.published.clone().unwrap();
    assert!(published.is_file());

    // The registry entry: pinned, with every input and the provenance.
    let registry = Registry::read(&req.file).unwrap();
    let release = registry.release("tiny").unwrap();
    let built = release.build.as_ref().unwrap();
    assert!(built.compiler.starts_with("gcc-12"), "{}", built.compiler);
    assert!(built.sandbox.contains("bubblewrap"), "{}", built.sandbox);
    assert!(built.builder.starts_with("gpu-passthrough "));
    let artifacts = &release.artifacts[&gpu_passthrough::registry::Arch::X86_64];
    let kinds: Vec<ArtifactKind> = artifacts.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            ArtifactKind::NvidiaModules,
            ArtifactKind::NvidiaKernelSource,
            ArtifactKind::KernelHeaders,
            ArtifactKind::KernelHeaders,
            ArtifactKind::KernelHeaders
        ]
    );
    assert!(artifacts.iter().all(|a| a.is_pinned()));
    assert_eq!(
        artifacts[0].urls,
        [format!("file://{}", published.display())]
    );
    assert_eq!(artifacts[0].sha256.unwrap().to_hex(), first.sha256);

    // The same inputs again: a cache hit, no compile, the same artifact.
    let again = s
        .build(
            &BuildRequest {
                replace: true,
                ..req.clone()
            },
            "cache-a",
        )
        .unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.sha256, first.sha256);

    // A fresh cache: compiled again, byte-identical.
    let fresh = s
        .build(
            &BuildRequest {
                replace: true,
                ..req.clone()
            },
            "cache-b",
        )
        .unwrap();
    assert!(!fresh.cache_hit);
    assert_eq!(
        fresh.sha256, first.sha256,
        "two builds must give the same bytes"
    );

    // And the rebuild check agrees.
    let cache = s.cache("cache-c");
    let fetcher = Fetcher::new(&cache, FetchOptions::default()).unwrap();
    let registry = Registry::read(&req.file).unwrap();
    let rebuild = RebuildRequest {
        release: "tiny".into(),
        arch: gpu_passthrough::registry::Arch::X86_64,
        signing: None,
    };
    let report =
        build::verify_rebuild(&fetcher, &cache, &registry, &rebuild, &NoProgress, &|_| {}).unwrap();
    assert!(report.matches(), "{report}");
    assert_eq!(report.outcome(), None);
}

#[test]
fn a_rebuild_that_differs_names_the_module() {
    let s = Setup::new();
    let req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    s.build(&req, "cache-a").unwrap();
    // The source changes behind the pin's back: serve other bytes under a fresh pin.
    let other = Tiny {
        code: "static int __init nv_init(void) { return 1 - 1; } static int unused;",
        ..Tiny::default()
    };
    let changed = s.source(&other, "tiny-changed.tar.gz");
    let mut text = fs::read_to_string(&req.file).unwrap();
    let old_source = s.served.url("/tiny.tar.gz");
    let registry = Registry::read(&req.file).unwrap();
    let release = registry.release("tiny").unwrap();
    let arts = &release.artifacts[&gpu_passthrough::registry::Arch::X86_64];
    let src = arts
        .iter()
        .find(|a| a.kind == ArtifactKind::NvidiaKernelSource)
        .unwrap();
    let bytes = fs::read(s.www().join("tiny-changed.tar.gz")).unwrap();
    let digest = gpu_passthrough::registry::Sha256Digest::of(&bytes);
    text = text
        .replace(&old_source, &changed)
        .replace(&src.sha256.unwrap().to_hex(), &digest.to_hex())
        .replace(
            &format!("size = {}", src.size.unwrap()),
            &format!("size = {}", bytes.len()),
        );
    fs::write(&req.file, text).unwrap();
    let cache = s.cache("cache-b");
    let fetcher = Fetcher::new(&cache, FetchOptions::default()).unwrap();
    let registry = Registry::read(&req.file).unwrap();
    let rebuild = RebuildRequest {
        release: "tiny".into(),
        arch: gpu_passthrough::registry::Arch::X86_64,
        signing: None,
    };
    let report =
        build::verify_rebuild(&fetcher, &cache, &registry, &rebuild, &NoProgress, &|_| {}).unwrap();
    assert!(!report.matches());
    assert_eq!(report.differing, ["nvidia.ko"]);
    assert_eq!(report.outcome(), Some(Outcome::VerificationFailed));
    assert!(report.to_string().contains("nvidia.ko"), "{report}");
}

#[test]
fn modules_the_inspection_rejects_are_not_published() {
    let s = Setup::new();
    let lying = Tiny {
        module_version: "\"1.2.3\"",
        ..Tiny::default()
    };
    let req = s.request(s.source(&lying, "lying.tar.gz"));
    let err = s.build(&req, "cache").unwrap_err();
    assert!(matches!(err, BuildError::Refused(_)), "{err}");
    assert_eq!(err.outcome(), Outcome::VerificationFailed);
    let chain = gpu_passthrough::error_chain(&err);
    assert!(chain.contains("1.2.3"), "{chain}");
    assert!(!req.file.exists(), "no registry entry");
    assert!(!s.dir.path().join("out").exists(), "nothing in --out");
    let records = fs::read_dir(s.cache("cache").join("builds"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(
        records, 0,
        "no cache record: the same inputs again build again"
    );
}

#[test]
fn headers_of_another_kernel_are_refused() {
    let s = Setup::new();
    let req = BuildRequest {
        kernel_version: "6.1.0-99-amd64".into(),
        ..s.request(s.source(&Tiny::default(), "tiny.tar.gz"))
    };
    let err = s.build(&req, "cache").unwrap_err();
    refused_before_compiling(&err);
    let text = err.to_string();
    assert!(
        text.contains("6.1.0-56-amd64") && text.contains("6.1.0-99-amd64"),
        "{text}"
    );
    assert!(!req.file.exists(), "nothing is written");
}

#[test]
fn a_source_of_another_driver_version_or_flavor_is_refused() {
    let s = Setup::new();
    let other = Tiny {
        version: "535.309.01",
        ..Tiny::default()
    };
    let err = s
        .build(&s.request(s.source(&other, "v.tar.gz")), "cache")
        .unwrap_err();
    refused_before_compiling(&err);
    assert!(err.to_string().contains("535.309.01"), "{err}");

    let proprietary = Tiny {
        license: "NVIDIA",
        ..Tiny::default()
    };
    let err = s
        .build(&s.request(s.source(&proprietary, "p.tar.gz")), "cache")
        .unwrap_err();
    refused_before_compiling(&err);
    assert!(err.to_string().contains("proprietary"), "{err}");
}

#[test]
fn a_proprietary_source_builds_as_the_proprietary_flavor() {
    let s = Setup::new();
    let proprietary = Tiny {
        license: "NVIDIA",
        ..Tiny::default()
    };
    let req = BuildRequest {
        flavor: ModuleFlavor::Proprietary,
        ..s.request(s.source(&proprietary, "p.tar.gz"))
    };
    let report = s.build(&req, "cache").unwrap();
    assert_eq!(
        report.file_name,
        "nvidia-modules-535.261.03-6.1.0-56-amd64-x86_64.tar.gz"
    );
    assert_eq!(
        report.release.module_flavor,
        Some(ModuleFlavor::Proprietary)
    );
}

#[test]
fn a_patch_that_does_not_apply_is_refused_naming_file_and_hunk() {
    let s = Setup::new();
    fs::write(
        s.www().join("bad.patch"),
        "--- a/nvidia/nv-frontend.c\n+++ b/nvidia/nv-frontend.c\n@@ -1,2 +1,2 @@\n-#include <linux/nothere.h>\n+#include <linux/other.h>\n #include <linux/init.h>\n",
    )
    .unwrap();
    let mut req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    req.inputs.patches = vec![s.served.url("/bad.patch")];
    let err = s.build(&req, "cache").unwrap_err();
    refused_before_compiling(&err);
    let text = err.to_string();
    assert!(text.contains("bad.patch"), "{text}");
    assert!(
        text.contains("nvidia/nv-frontend.c") && text.contains("Hunk #1 FAILED"),
        "{text}"
    );
}

#[test]
fn a_compile_failure_names_the_file_the_errors_and_the_log() {
    let s = Setup::new();
    // A patch that applies and breaks the build.
    fs::write(
        s.www().join("break.patch"),
        "--- a/nvidia/nv-frontend.c\n+++ b/nvidia/nv-frontend.c\n@@ -1,2 +1,3 @@\n #include <linux/module.h>\n+int broken(void) { return undeclared_thing; }\n #include <linux/init.h>\n",
    )
    .unwrap();
    let mut req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    req.inputs.patches = vec![s.served.url("/break.patch")];
    let err = s.build(&req, "cache").unwrap_err();
    let BuildError::Driver(driver) = &err else {
        panic!("expected a compile failure, got {err}");
    };
    let DriverBuildError::Compile { file, errors, log } = &**driver else {
        panic!("expected a compile failure, got {err}");
    };
    assert!(file.ends_with("nvidia/nv-frontend.c"), "{file}");
    assert!(errors.contains("undeclared_thing"), "{errors}");
    assert!(log.is_file(), "the full log is kept at {}", log.display());
    assert!(
        err.to_string().contains("source-patch"),
        "the fix is named: {err}"
    );
    assert!(
        !req.file.exists() && !s.dir.path().join("out").exists(),
        "nothing published"
    );
}

#[test]
fn the_build_cannot_reach_the_network() {
    let s = Setup::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!("\tbash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}'\n");
    let tiny = Tiny {
        before: &probe,
        ..Tiny::default()
    };
    let err = s
        .build(&s.request(s.source(&tiny, "net.tar.gz")), "cache")
        .unwrap_err();
    let BuildError::Driver(driver) = &err else {
        panic!("expected the build to fail inside the sandbox, got {err}");
    };
    let DriverBuildError::Compile { log, .. } = &**driver else {
        panic!("expected the build to fail inside the sandbox, got {err}");
    };
    let text = fs::read_to_string(log).unwrap();
    assert!(text.contains("Connection refused"), "{text}");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing reached the host's listener"
    );
}

#[test]
fn writes_outside_the_build_tree_do_not_reach_the_host() {
    let s = Setup::new();
    let mark = format!("escape-{}", std::process::id());
    let host_dir = s.dir.path().display().to_string();
    let targets = [
        format!("/usr/{mark}"),
        format!("/{mark}"),
        format!("/tmp/{mark}"),
        format!("{host_dir}/{mark}"),
        format!("/usr/src/linux-headers-6.1.0-56-amd64/{mark}"),
    ];
    let before = format!("\t-touch {}\n", targets.join(" "));
    let tiny = Tiny {
        before: &before,
        ..Tiny::default()
    };
    let report = s
        .build(&s.request(s.source(&tiny, "w.tar.gz")), "cache")
        .unwrap();
    assert_eq!(report.modules.len(), 1, "the build itself went on");
    for t in &targets {
        assert!(!Path::new(t).exists(), "{t} appeared on the host");
    }
}

#[test]
fn a_build_past_its_time_limit_is_killed_with_everything_it_started() {
    let s = Setup::new();
    let tiny = Tiny {
        before: "\tsleep 31.4159 & sleep 31.4159\n",
        ..Tiny::default()
    };
    let mut req = s.request(s.source(&tiny, "slow.tar.gz"));
    req.limits.wall = Duration::from_secs(3);
    let err = s.build(&req, "cache").unwrap_err();
    assert!(err.to_string().contains("time limit of 3 s"), "{err}");
    assert!(
        !req.file.exists() && !s.dir.path().join("out").exists(),
        "nothing published"
    );
    std::thread::sleep(Duration::from_millis(300));
    let stray: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("31.4159"))
        .collect();
    assert!(stray.is_empty(), "stray processes: {stray:?}");
}

/// A headers tarball with only what the early checks read.
fn fake_headers(dir: &Path, config: &str) -> PathBuf {
    let mut tar = tar::Builder::new(Vec::new());
    let tree = "usr/src/linux-headers-6.1.0-56-amd64";
    for (path, text) in [
        (format!("{tree}/.config"), config.to_string()),
        (
            format!("{tree}/include/generated/utsrelease.h"),
            format!("#define UTS_RELEASE \"{KERNEL_VERSION}\"\n"),
        ),
        (format!("{tree}/Makefile"), "# a build tree\n".into()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_path(&path).unwrap();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append(&h, text.as_bytes()).unwrap();
    }
    let path = dir.join("fake-headers.tar");
    fs::write(&path, tar.into_inner().unwrap()).unwrap();
    path
}

#[test]
fn a_compiler_of_another_major_version_is_refused_naming_both_and_the_package() {
    let s = Setup::new();
    fake_headers(
        &s.www(),
        "CONFIG_CC_VERSION_TEXT=\"gcc-11 (Debian 11.3.0-12) 11.3.0\"\n",
    );
    let mut req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    req.inputs.headers = vec![s.served.url("/fake-headers.tar")];
    let err = s.build(&req, "cache").unwrap_err();
    refused_before_compiling(&err);
    let text = err.to_string();
    assert!(text.contains("gcc-11 (Debian 11.3.0-12) 11.3.0"), "{text}");
    assert!(text.contains("gcc-11") && text.contains("12."), "{text}");
}

#[test]
fn a_kernel_that_loads_signed_modules_only_gets_no_unsigned_build() {
    let s = Setup::new();
    fake_headers(
        &s.www(),
        "CONFIG_CC_VERSION_TEXT=\"gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0\"\n\
         CONFIG_MODULE_SIG=y\nCONFIG_MODULE_SIG_FORCE=y\nCONFIG_MODULE_SIG_HASH=\"sha256\"\n",
    );
    let mut req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    req.inputs.headers = vec![s.served.url("/fake-headers.tar")];
    let err = s.build(&req, "cache").unwrap_err();
    refused_before_compiling(&err);
    assert!(err.to_string().contains("CONFIG_MODULE_SIG_FORCE"), "{err}");
    assert!(err.to_string().contains("--sign-key"), "{err}");
}

/// A source archive with one hostile entry besides the tiny source.
fn hostile_source(dir: &Path, name: &str, path: &[u8], link: Option<&[u8]>) {
    fs::write(dir.join(name), fixtures::raw_tar(path, link)).unwrap();
}

#[test]
fn a_source_archive_with_escaping_paths_or_links_is_refused() {
    let s = Setup::new();
    hostile_source(&s.www(), "up.tar", b"kernel-open/../../evil", None);
    hostile_source(
        &s.www(),
        "link.tar",
        b"kernel-open/nvidia",
        Some(b"../../../etc"),
    );
    for (name, needle) in [("up.tar", ".."), ("link.tar", "leaves the archive root")] {
        let err = s
            .build(&s.request(s.served.url(&format!("/{name}"))), "cache")
            .unwrap_err();
        assert_eq!(err.outcome(), Outcome::VerificationFailed, "{err}");
        let chain = gpu_passthrough::error_chain(&err);
        assert!(
            chain.contains("nvidia-kernel-source") && chain.contains(needle),
            "{chain}"
        );
    }
}

#[test]
fn signed_modules_carry_the_signature_and_the_release_names_the_signer() {
    if Command::new("openssl").arg("version").output().is_err() {
        panic!("openssl is needed to make a signing key (Debian package openssl)");
    }
    let s = Setup::new();
    let key = s.dir.path().join("signing_key.pem");
    let cert = s.dir.path().join("signing_cert.pem");
    let made = Command::new("openssl")
        .args([
            "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        ])
        .args([
            "-subj",
            "/CN=gpu-passthrough test signing key",
            "-set_serial",
            "0x1fa0030b",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut req = s.request(s.source(&Tiny::default(), "tiny.tar.gz"));
    req.signing = Some(SigningKey {
        key: key.clone(),
        cert: cert.clone(),
    });
    let report = s.build(&req, "cache").unwrap();
    assert!(
        report.file_name.ends_with("-signed.tar.gz"),
        "{}",
        report.file_name
    );
    let signer = report.release.signer.clone().unwrap();
    assert_eq!(signer.subject, "gpu-passthrough test signing key");
    assert_eq!(signer.key_id, "1F:A0:03:0B");
    let registry = Registry::read(&req.file).unwrap();
    assert_eq!(
        registry.release("tiny").unwrap().signer,
        Some(signer.clone())
    );

    // The module's last bytes are the signature, as the kernel expects.
    let unpacked = s.dir.path().join("unpacked");
    gpu_passthrough::archive::tar::extract_tar(
        report.published.as_ref().unwrap(),
        &unpacked,
        &Default::default(),
    )
    .unwrap();
    let ko = unpacked.join("lib/modules/6.1.0-56-amd64/kernel/drivers/gpu/nvidia.ko");
    let bytes = fs::read(&ko).unwrap();
    assert!(bytes.ends_with(b"~Module signature appended~\n"));

    // Rebuilt without the key, the modules match the pinned ones minus their signatures; with
    // it, byte for byte (sign-file signs without a timestamp).
    for signing in [None, req.signing.clone()] {
        let cache = s.cache(if signing.is_some() {
            "rebuild-key"
        } else {
            "rebuild"
        });
        let fetcher = Fetcher::new(&cache, FetchOptions::default()).unwrap();
        let rebuild = RebuildRequest {
            release: "tiny".into(),
            arch: gpu_passthrough::registry::Arch::X86_64,
            signing: signing.clone(),
        };
        let again =
            build::verify_rebuild(&fetcher, &cache, &registry, &rebuild, &NoProgress, &|_| {})
                .unwrap();
        assert!(again.matches(), "{again}");
        assert_eq!(again.without_signatures, signing.is_none());
        if signing.is_some() {
            assert_eq!(again.actual_sha256, report.sha256);
        }
    }
    // kmod agrees on who signed it, when it is installed.
    if let Ok(out) = Command::new("modinfo").arg(&ko).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("signer:         {}", signer.subject)),
            "{text}"
        );
        assert!(text.contains(&signer.key_id), "{text}");
    }
}

#[test]
fn the_sandbox_shows_input_trees_at_their_absolute_paths_merged_with_the_host() {
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    use gpu_passthrough::driver_build::sandbox::Sandbox;
    let dir = tempfile::tempdir().unwrap();
    // The sandbox may run as nobody: it must be able to reach the trees.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let new = format!("zz-gpu-passthrough-{}", std::process::id());
    let tree = |name: &str, files: &[&str]| {
        let root = dir.path().join(name);
        for f in files {
            let path = root.join(f);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, name).unwrap();
        }
        root
    };
    // Two archives sharing a directory the host lacks, one below a host directory, one through
    // the host's `/lib` link (merged /usr).
    let a = tree(
        "a",
        &[
            &format!("usr/{new}/a/file"),
            "usr/src/linux-headers-x/file",
            &format!("usr/share/doc/{new}-a/file"),
        ],
    );
    let b = tree(
        "b",
        &[
            &format!("usr/{new}/b/file"),
            &format!("usr/share/doc/{new}-b/file"),
        ],
    );
    let c = tree("c", &[&format!("lib/{new}/file")]);
    let work = dir.path().join("work");
    fs::create_dir(&work).unwrap();
    // As root the sandbox runs as nobody, who must own its scratch directory (elsewhere this
    // fails and the caller owns it).
    let _ = std::os::unix::fs::chown(&work, Some(65534), Some(65534));
    let mut sandbox = Sandbox::new(
        &work,
        vec![("PATH".into(), "/usr/bin:/bin".into())],
        Default::default(),
    );
    for root in [&a, &b, &c] {
        sandbox.add_tree(root).unwrap();
    }
    let script = format!(
        "cat /usr/{new}/a/file /usr/{new}/b/file /usr/src/linux-headers-x/file /lib/{new}/file \
         /usr/share/doc/{new}-a/file /usr/share/doc/{new}-b/file && test -x /usr/bin/sh && ! touch /usr/{new}/a/new 2>/dev/null && touch /build/ok"
    );
    let log = dir.path().join("log");
    let argv = ["sh".to_string(), "-c".into(), script];
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = sandbox.run(&argv, Path::new("/build"), &log, deadline);
    let output = fs::read_to_string(&log).unwrap_or_default();
    result.unwrap_or_else(|e| panic!("{e}: {output}"));
    assert_eq!(output, "abacab");
    assert!(
        work.join("ok").exists(),
        "the scratch directory is writable"
    );
}
