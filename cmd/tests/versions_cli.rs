//! `gpu-passthrough versions ...` as a user runs it, against the loopback mirror.
//!
//! The binary: a non-bin crate cannot use `CARGO_BIN_EXE_*`, so [`cli`] runs
//! `cargo build -p gpu-passthrough-cli` once per test process (a no-op when it is up to date)
//! and runs `<target>/debug/gpu-passthrough`, the target dir being found from this test
//! executable's path (`<target>/debug/deps/<test>`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpu_passthrough::fetch::{FetchOptions, Fetcher, NoProgress};
use gpu_passthrough::registry::{Arch, ArtifactKind, Registry, Sha256Digest};
use gpu_passthrough_tests::fixtures;
use gpu_passthrough_tests::http::Mirror;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gpu-passthrough"))
}

/// A `gpu-passthrough` command with a private cache and no registry from the environment.
fn cli(cache: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_remove("GPU_PASSTHROUGH_REGISTRY")
        .env_remove("GPU_PASSTHROUGH_LOG")
        .arg("--cache-dir")
        .arg(cache);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run gpu-passthrough")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

fn store(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(cache.join("artifacts/sha256"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const FIXTURE_ARTIFACTS: [(&str, &str); 5] = [
    ("kernel", fixtures::KERNEL),
    ("kernel-modules", fixtures::KERNEL_MODULES),
    ("nvidia-modules", fixtures::NVIDIA_MODULES),
    ("nvidia-firmware", fixtures::NVIDIA_FIRMWARE),
    ("nvidia-driver-libs", fixtures::NVIDIA_DRIVER_LIBS),
];

#[test]
fn add_over_the_real_fixtures_pins_sha256sums_and_fetches_into_a_fresh_cache() {
    let mirror = Mirror::dir(&fixtures::dir());
    let work = tempfile::tempdir().unwrap();
    let registry = work.path().join("registry.toml");
    let cache = work.path().join("cache");
    let mut cmd = cli(&cache);
    cmd.args(["--json", "versions", "add", "test-6.1"])
        .args(["--kernel-version", fixtures::KERNEL_VERSION])
        .args(["--driver-version", fixtures::DRIVER_VERSION])
        .args(["--flavor", "open", "--arch", "x86_64"])
        .arg("--registry")
        .arg(&registry);
    for (kind, rel) in FIXTURE_ARTIFACTS {
        cmd.arg("--artifact")
            .arg(format!("{kind}={}", mirror.url(&format!("/{rel}"))));
    }
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", text(&out));
    let report = json(&out);
    let modules = report["inspected"]["modules"].as_array().unwrap();
    assert!(modules.iter().any(|m| m == "nvidia"), "{report}");
    assert_eq!(report["inspected"]["firmware"].as_array().unwrap().len(), 2);

    let sums = fixtures::sha256sums();
    let reg = Registry::load(std::slice::from_ref(&registry)).unwrap();
    let release = reg.release("test-6.1").unwrap();
    assert_eq!(release.source, registry.display().to_string());
    assert_eq!(release.kernel_version, fixtures::KERNEL_VERSION);
    assert_eq!(
        release.driver_version.as_deref(),
        Some(fixtures::DRIVER_VERSION)
    );
    for (kind, rel) in FIXTURE_ARTIFACTS {
        let a = release
            .artifact(Arch::X86_64, kind.parse::<ArtifactKind>().unwrap())
            .unwrap();
        assert_eq!(a.sha256.unwrap().to_hex(), sums[rel], "{kind}");
        assert_eq!(
            a.size,
            Some(fs::metadata(fixtures::path(rel)).unwrap().len())
        );
    }

    // The pinned entry builds into a fresh cache: every artifact fetched and verified.
    let fresh = work.path().join("fresh-cache");
    let fetcher = Fetcher::new(&fresh, FetchOptions::default()).unwrap();
    for a in &release.artifacts[&Arch::X86_64] {
        let got = fetcher
            .fetch(release, Arch::X86_64, a, &NoProgress)
            .unwrap();
        assert_eq!(Some(got.sha256), a.sha256);
        assert!(got.path.starts_with(&fresh));
    }
    let mut expected: Vec<String> = FIXTURE_ARTIFACTS
        .iter()
        .map(|(_, rel)| sums[*rel].clone())
        .collect();
    expected.sort();
    assert_eq!(store(&fresh), expected);

    // And `versions verify` agrees with the pins.
    let out = run(cli(&cache)
        .args(["versions", "verify", "test-6.1", "--cached", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));
}

/// A registry file with a comment and a pinned kernel-only release served by `mirror`.
fn kernel_only_registry(dir: &Path, mirror: &Mirror, body: &[u8]) -> PathBuf {
    let file = dir.join("registry.toml");
    fs::write(
        &file,
        format!(
            "# reviewed by hand\n[releases.\"k1\"]\nkernel_version = \"6.1.0-56-amd64\"\n\n\
             [[releases.\"k1\".artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"{}\"\n\
             sha256 = \"{}\"\nsize = {}\n",
            mirror.url("/vmlinuz"),
            Sha256Digest::of(body),
            body.len()
        ),
    )
    .unwrap();
    file
}

#[test]
fn verify_names_a_tampered_artifact_and_changes_nothing() {
    let body = b"pretend kernel image ".repeat(5000);
    let mirror = Mirror::files([("/vmlinuz", body.clone())]);
    let work = tempfile::tempdir().unwrap();
    let registry = kernel_only_registry(work.path(), &mirror, &body);
    let cache = work.path().join("cache");

    let out = run(cli(&cache)
        .args(["versions", "verify", "k1", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));

    let mut tampered = body.clone();
    tampered[777] ^= 0x20;
    mirror.serve_instead("/vmlinuz", tampered.clone());
    let before = fs::read(&registry).unwrap();
    let fresh = work.path().join("fresh");
    let out = run(cli(&fresh)
        .args(["--json", "versions", "verify", "k1", "--registry"])
        .arg(&registry));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let report = json(&out);
    let row = &report["artifacts"][0];
    assert_eq!(row["status"], "mismatch");
    assert_eq!(row["kind"], "kernel");
    assert_eq!(row["actual_sha256"], Sha256Digest::of(&tampered).to_hex());
    assert_eq!(row["url"], mirror.url("/vmlinuz"));
    let out = run(cli(&fresh)
        .args(["versions", "verify", "k1", "--registry"])
        .arg(&registry));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("k1 x86_64 kernel (mismatch)"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::read(&registry).unwrap(),
        before,
        "the registry is untouched"
    );
    assert!(
        !store(&fresh).contains(&Sha256Digest::of(&body).to_hex()),
        "nothing is stored under the pinned digest"
    );
}

#[test]
fn verify_cached_rehashes_the_cache() {
    let body = b"kernel bytes".repeat(1000);
    let mirror = Mirror::files([("/vmlinuz", body.clone())]);
    let work = tempfile::tempdir().unwrap();
    let registry = kernel_only_registry(work.path(), &mirror, &body);
    let cache = work.path().join("cache");
    let out = run(cli(&cache)
        .args(["versions", "verify", "k1", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));
    let cached = cache
        .join("artifacts/sha256")
        .join(Sha256Digest::of(&body).to_hex());
    let mut bytes = fs::read(&cached).unwrap();
    bytes[0] ^= 1;
    fs::write(&cached, bytes).unwrap();
    let out = run(cli(&cache)
        .args(["versions", "verify", "k1", "--cached", "--registry"])
        .arg(&registry));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert_eq!(mirror.hits("/vmlinuz"), 1, "--cached does not download");
}

#[test]
fn verify_deep_reports_a_tampered_unpacked_tree_with_exit_3() {
    // An unpacked tree is trusted by its presence (and its record); --deep compares it with
    // what its cached archive, re-hashed, unpacks to.
    let body = b"kernel bytes".repeat(1000);
    let mirror = Mirror::files([("/vmlinuz", body.clone())]);
    let work = tempfile::tempdir().unwrap();
    let registry = kernel_only_registry(work.path(), &mirror, &body);
    let cache = work.path().join("cache");
    let out = run(cli(&cache)
        .args(["versions", "verify", "k1", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));
    // A cached archive and its tree, unpacked by GNU tar, with the record unpacking writes.
    let archive = fixtures::tar_gz(&[("lib/nvidia.ko", b"module"), ("lib/fw/gsp.bin", b"fw")]);
    let hex = Sha256Digest::of(&archive).to_hex();
    let cached = cache.join("artifacts/sha256").join(&hex);
    fs::write(&cached, &archive).unwrap();
    let tree = cache.join("unpacked").join(&hex);
    fs::create_dir_all(&tree).unwrap();
    let tar = Command::new("tar")
        .arg("xzf")
        .arg(&cached)
        .arg("-C")
        .arg(&tree)
        .status()
        .unwrap();
    assert!(tar.success());
    fs::write(tree.with_extension("tree.json"), "{}").unwrap();
    let deep = || {
        run(cli(&cache)
            .args([
                "versions",
                "verify",
                "k1",
                "--cached",
                "--deep",
                "--registry",
            ])
            .arg(&registry))
    };
    let out = deep();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("OK"), "{}", text(&out));

    fs::write(tree.join("lib/nvidia.ko"), b"modulE").unwrap();
    fs::write(tree.join("lib/planted"), b"not from the archive").unwrap();
    let out = deep();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("lib/nvidia.ko changed")
            && text(&out).contains("lib/planted was added"),
        "{}",
        text(&out)
    );
    // Without --deep the cache's artifacts alone are checked, and they are intact.
    let out = run(cli(&cache)
        .args(["versions", "verify", "k1", "--cached", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));
    // With its archive gone the tree cannot be checked, and says so rather than passing.
    fs::remove_file(&cached).unwrap();
    let out = deep();
    assert!(text(&out).contains("no longer cached"), "{}", text(&out));
    assert!(!text(&out).contains(" OK"), "{}", text(&out));
}

#[test]
fn add_refuses_a_tampered_archive_and_leaves_registry_and_cache_alone() {
    let rel = fixtures::NVIDIA_MODULES;
    let mut bytes = fs::read(fixtures::path(rel)).unwrap();
    // Early in the deflate stream, so decompression itself fails. (A flip deep inside is only
    // caught by the gzip CRC at the end of the stream.)
    bytes[64] ^= 0xff;
    let mirror = Mirror::files([("/m.tar.gz", bytes)]);
    let work = tempfile::tempdir().unwrap();
    let registry = work.path().join("registry.toml");
    fs::write(&registry, "# my registry\n").unwrap();
    let cache = work.path().join("cache");
    let out = run(cli(&cache)
        .args([
            "versions",
            "add",
            "bad",
            "--kernel-version",
            fixtures::KERNEL_VERSION,
        ])
        .args([
            "--driver-version",
            fixtures::DRIVER_VERSION,
            "--arch",
            "x86_64",
        ])
        .arg("--artifact")
        .arg(format!("nvidia-modules={}", mirror.url("/m.tar.gz")))
        .arg("--registry")
        .arg(&registry));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nvidia-modules") && stderr.contains("/m.tar.gz"),
        "{}",
        text(&out)
    );
    assert_eq!(fs::read_to_string(&registry).unwrap(), "# my registry\n");
    assert!(!store(&cache).contains(&fixtures::sha256sums()[rel]));
}

fn add_modules_only(kernel: &str, driver: &str) -> Output {
    add_modules_only_with(kernel, driver, &[])
}

fn add_modules_only_with(kernel: &str, driver: &str, extra: &[&str]) -> Output {
    let mirror = Mirror::dir(&fixtures::dir());
    let work = tempfile::tempdir().unwrap();
    let registry = work.path().join("registry.toml");
    let out = run(cli(&work.path().join("cache"))
        .args([
            "versions",
            "add",
            "other",
            "--kernel-version",
            kernel,
            "--driver-version",
            driver,
        ])
        .args(["--arch", "x86_64", "--artifact"])
        .arg(format!(
            "nvidia-modules={}",
            mirror.url(&format!("/{}", fixtures::NVIDIA_MODULES))
        ))
        .args(extra)
        .arg("--registry")
        .arg(&registry));
    assert!(
        !registry.exists(),
        "a refused add writes no registry: {}",
        text(&out)
    );
    out
}

#[test]
fn add_refuses_modules_of_another_driver_version_naming_the_ko() {
    let out = add_modules_only(fixtures::KERNEL_VERSION, "535.261.04");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nvidia.ko") && stderr.contains("535.261.04"),
        "{}",
        text(&out)
    );
    assert!(
        !stderr.contains("/tmp/"),
        "paths are shown relative to the artifact: {stderr}"
    );
}

#[test]
fn add_with_a_signer_refuses_unsigned_modules_naming_the_ko_and_the_signer() {
    let out = add_modules_only_with(
        fixtures::KERNEL_VERSION,
        fixtures::DRIVER_VERSION,
        &["--signer", "release key", "--signer-key-id", "1F:2E:3D"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nvidia.ko")
            && stderr.contains("carries no signature")
            && stderr.contains("\"release key\" (key 1F:2E:3D)"),
        "{}",
        text(&out)
    );
}

#[test]
fn add_refuses_modules_of_another_kernel_naming_the_ko() {
    let out = add_modules_only("6.1.0-99-amd64", fixtures::DRIVER_VERSION);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nvidia.ko") && stderr.contains("6.1.0-99-amd64"),
        "{}",
        text(&out)
    );
}

#[test]
fn unpinned_release_is_refused_with_the_pin_hint() {
    let cache = tempfile::tempdir().unwrap();
    let out = run(cli(cache.path()).args(["versions", "verify", "ch-6.12.8-kernel-1.2-20251213"]));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gpu-passthrough versions pin"),
        "{}",
        text(&out)
    );
    let out = run(cli(cache.path()).args([
        "versions",
        "verify",
        "ch-6.12.8-kernel-1.2-20251213",
        "--allow-unpinned",
    ]));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn pin_fills_in_digests_keeping_comments_then_verify_passes() {
    let body = b"another kernel".repeat(3000);
    let mirror = Mirror::files([("/vmlinuz", body.clone())]);
    let work = tempfile::tempdir().unwrap();
    let registry = work.path().join("registry.toml");
    let original = format!(
        "# team registry\n[releases.\"k2\"]\nkernel_version = \"6.1.0-56-amd64\"\n\n\
         # from the build farm\n[[releases.\"k2\".artifacts.x86_64]]\nkind = \"kernel\"\nurl = \"{}\"\n",
        mirror.url("/vmlinuz")
    );
    fs::write(&registry, &original).unwrap();
    let cache = work.path().join("cache");

    let out = run(cli(&cache)
        .args(["--json", "versions", "show", "k2", "--registry"])
        .arg(&registry));
    let shown = json(&out);
    assert_eq!(shown["source"], registry.display().to_string());
    assert!(shown["artifacts"]["x86_64"][0]["sha256"].is_null());

    let out = run(cli(&cache)
        .args(["versions", "pin", "k2", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));
    let written = fs::read_to_string(&registry).unwrap();
    assert!(
        written.contains("# team registry") && written.contains("# from the build farm"),
        "{written}"
    );
    let reg = Registry::read(&registry).unwrap();
    let a = reg
        .release("k2")
        .unwrap()
        .artifact(Arch::X86_64, ArtifactKind::Kernel)
        .unwrap();
    assert_eq!(a.sha256, Some(Sha256Digest::of(&body)));
    assert_eq!(a.size, Some(body.len() as u64));

    let out = run(cli(&cache)
        .args(["versions", "verify", "k2", "--registry"])
        .arg(&registry));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn list_marks_unpinned_and_shows_sources() {
    let cache = tempfile::tempdir().unwrap();
    let out = run(cli(cache.path()).args(["--json", "versions", "list"]));
    assert!(out.status.success(), "{}", text(&out));
    let v = json(&out);
    let releases = v["releases"].as_array().unwrap();
    assert_eq!(releases.len(), 3);
    assert!(
        releases
            .iter()
            .all(|r| r["unpinned"].as_u64().unwrap() > 0 && r["source"] == "embedded")
    );
    let out = run(cli(cache.path()).args(["versions", "list"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("UNPINNED") && stdout.contains("* ch-6.12.8-kernel-1.2-20251213"),
        "{stdout}"
    );
}

#[test]
fn a_bad_registry_file_is_reported_with_file_release_and_field() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("bad.toml");
    fs::write(&file, "[releases.r]\nkernel_version = \"\"\n").unwrap();
    let out = run(cli(work.path())
        .args(["versions", "list", "--registry"])
        .arg(&file));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("`r`") && stderr.contains("kernel_version"),
        "{stderr}"
    );
}

#[test]
fn add_refuses_to_overwrite_without_replace() {
    let body = b"k".repeat(100);
    let mirror = Mirror::files([("/vmlinuz", body.clone())]);
    let work = tempfile::tempdir().unwrap();
    let registry = kernel_only_registry(work.path(), &mirror, &body);
    let before = fs::read(&registry).unwrap();
    let add = |replace: bool| {
        let mut cmd = cli(&work.path().join("cache"));
        cmd.args([
            "versions",
            "add",
            "k1",
            "--kernel-version",
            "6.2",
            "--arch",
            "x86_64",
        ])
        .arg("--artifact")
        .arg(format!("kernel={}", mirror.url("/vmlinuz")))
        .arg("--registry")
        .arg(&registry);
        if replace {
            cmd.arg("--replace");
        }
        run(&mut cmd)
    };
    let out = add(false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--replace"));
    assert_eq!(fs::read(&registry).unwrap(), before);
    assert_eq!(mirror.hits("/vmlinuz"), 0, "refused before downloading");
    let out = add(true);
    assert!(out.status.success(), "{}", text(&out));
    let reg = Registry::read(&registry).unwrap();
    assert_eq!(reg.release("k1").unwrap().kernel_version, "6.2");
    assert!(
        fs::read_to_string(&registry)
            .unwrap()
            .starts_with("# reviewed by hand\n")
    );
}

/// `versions diff` over the two real releases: the upgrade 535.261.03 (open, GSP) to 535.309.01
/// (proprietary, no GSP) as a reviewer reads it.
#[test]
fn diff_of_the_two_real_releases_shows_the_upgrade() {
    let work = tempfile::tempdir().unwrap();
    let (da, db) = (work.path().join("a"), work.path().join("b"));
    fs::create_dir_all(&da).unwrap();
    fs::create_dir_all(&db).unwrap();
    let a = fixtures::write_registry(
        &da,
        "r261",
        fixtures::KERNEL_VERSION,
        &fixtures::gpu_artifacts(),
        true,
    );
    let header = format!(
        "kernel_version = \"{}\"\ndriver_version = \"{}\"\nmodule_flavor = \"proprietary\"\ngsp = false\n",
        fixtures::KERNEL_VERSION,
        fixtures::PROPRIETARY_DRIVER_VERSION
    );
    let b = fixtures::write_registry_with(
        &db,
        "r309",
        &header,
        &fixtures::proprietary_artifacts(),
        true,
    );
    let cache = work.path().join("cache");
    let out = run(cli(&cache)
        .arg("--registry")
        .arg(&a)
        .arg("--registry")
        .arg(&b)
        .args(["--json", "versions", "diff", "r261", "r309"]));
    assert!(out.status.success(), "{}", text(&out));
    let d = json(&out);
    assert_eq!(d["driver_version"]["from"], "535.261.03");
    assert_eq!(d["driver_version"]["to"], "535.309.01");
    assert_eq!(d["module_flavor"]["to"], "proprietary");
    assert_eq!(d["gsp"]["from"], true);
    assert_eq!(d["gsp"]["to"], false);
    assert!(d["kernel_version"].is_null(), "same kernel");
    assert_eq!(d["firmware"]["removed"].as_array().unwrap().len(), 2);
    let changed = d["libraries"]["changed"].as_array().unwrap();
    let cuda = changed
        .iter()
        .find(|c| c["soname"] == "libcuda.so.1")
        .unwrap();
    assert_eq!(cuda["from"], "libcuda.so.535.261.03");
    assert_eq!(cuda["to"], "libcuda.so.535.309.01");
    let added: Vec<&str> = d["libraries"]["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(added.contains(&"libnvcuvid.so.535.309.01"), "{added:?}");
    assert!(
        added.contains(&"libnvidia-encode.so.535.309.01"),
        "{added:?}"
    );
    let params = d["module_params"].as_array().unwrap();
    assert!(
        params
            .iter()
            .any(|p| p["module"] == "nvidia" && p["to"] == "NVreg_EnableGpuFirmware=0"),
        "{params:?}"
    );
    assert!(
        d["gpus_gained"].as_array().unwrap().is_empty(),
        "identical GPU lists"
    );
    let human = run(cli(&cache)
        .arg("--registry")
        .arg(&a)
        .arg("--registry")
        .arg(&b)
        .args(["versions", "diff", "r261", "r309"]));
    let shown = String::from_utf8_lossy(&human.stdout);
    assert!(
        shown.contains("~ library libcuda.so.1: libcuda.so.535.261.03 -> libcuda.so.535.309.01"),
        "{shown}"
    );
}
