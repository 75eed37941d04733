//! `gpu-passthrough versions build` and `versions verify --rebuild` as a user runs them: a tiny
//! module source (written here, packed with GNU tar) against the real 6.1.0-56 header packages
//! served on loopback; the exit codes of a success, a refusal and a rebuild.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpu_passthrough_tests::fixtures;
use gpu_passthrough_tests::http::Mirror;

const HEADERS: [&str; 3] = [
    "linux-headers-6.1.0-56-amd64_6.1.192-2_amd64.deb",
    "linux-headers-6.1.0-56-common_6.1.192-2_all.deb",
    "linux-kbuild-6.1_6.1.192-3_amd64.deb",
];

fn cli(cache: &Path, registry: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpu-passthrough"));
    cmd.env_remove("GPU_PASSTHROUGH_REGISTRY")
        .env_remove("GPU_PASSTHROUGH_LOG")
        .arg("--cache-dir")
        .arg(cache)
        .arg("--registry")
        .arg(registry);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The tiny source as `dir/tiny.tar.gz`.
fn tiny_source(dir: &Path) -> PathBuf {
    let src = dir.join("src/kernel-open");
    fs::create_dir_all(src.join("nvidia")).unwrap();
    fs::write(
        src.join("Kbuild"),
        "ccflags-y += -DNV_VERSION_STRING=\\\"535.261.03\\\"\nobj-m += nvidia.o\nnvidia-y := nvidia/nv-frontend.o\n",
    )
    .unwrap();
    fs::write(
        src.join("Makefile"),
        "modules:\n\t$(MAKE) -C $(SYSSRC) KBUILD_OUTPUT=$(SYSOUT) M=$(CURDIR) CC=$(CC) modules\n",
    )
    .unwrap();
    fs::write(
        src.join("nvidia/nv-frontend.c"),
        "#include <linux/module.h>\nMODULE_LICENSE(\"Dual MIT/GPL\");\nMODULE_VERSION(NV_VERSION_STRING);\n",
    )
    .unwrap();
    let archive = dir.join("tiny.tar.gz");
    let out = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.join("src"))
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    archive
}

#[test]
fn build_show_rebuild_and_a_refusal_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let source = tiny_source(dir.path());
    let headers = Mirror::dir(&fixtures::path("build-inputs"));
    let (cache, registry) = (dir.path().join("cache"), dir.path().join("registry.toml"));
    let build = |kernel: &str| {
        let mut cmd = cli(&cache, &registry);
        cmd.args([
            "--json",
            "versions",
            "build",
            "tiny",
            "--kernel-version",
            kernel,
        ])
        .args(["--driver-version", "535.261.03", "--flavor", "open"])
        .arg(format!(
            "--artifact=nvidia-kernel-source=file://{}",
            source.display()
        ))
        .args(["--base-url", "https://downloads.example.com/modules/"]);
        for h in HEADERS {
            cmd.arg(format!(
                "--artifact=kernel-headers={}",
                headers.url(&format!("/{h}"))
            ));
        }
        cmd.output().unwrap()
    };

    let wrong = build("6.1.0-99-amd64");
    assert_eq!(wrong.status.code(), Some(4), "a refusal: {}", text(&wrong));
    assert!(text(&wrong).contains("6.1.0-99-amd64"), "{}", text(&wrong));

    let out = build("6.1.0-56-amd64");
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["modules"][0]["name"], "nvidia.ko");
    assert_eq!(report["cache_hit"], false);
    let url = report["release"]["artifacts"]["x86_64"][0]["urls"][0]
        .as_str()
        .unwrap();
    assert_eq!(
        url,
        "https://downloads.example.com/modules/nvidia-open-modules-535.261.03-6.1.0-56-amd64-x86_64.tar.gz"
    );

    let show = cli(&cache, &registry)
        .args(["versions", "show", "tiny"])
        .output()
        .unwrap();
    let shown = text(&show);
    assert!(
        shown.contains("compiler:        gcc-12") && shown.contains("bubblewrap"),
        "{shown}"
    );

    let rebuild = cli(&cache, &registry)
        .args(["versions", "verify", "tiny", "--rebuild"])
        .output()
        .unwrap();
    assert!(rebuild.status.success(), "{}", text(&rebuild));
    assert!(
        text(&rebuild).contains("the rebuild gives the pinned modules"),
        "{}",
        text(&rebuild)
    );
}
