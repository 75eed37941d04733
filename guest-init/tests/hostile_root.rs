//! The GPU setup against a hostile workload root: symlinks meant to lead our writes, mounts and
//! nodes out of the root, a dangling soname link, and an `ldconfig` that reports its privileges.
//! Like tests/setup.rs: run as root, each test in a private mount namespace.

mod common;

use common::{FakeKernel, Guest, RootKind};
use gpu_passthrough_init::setup;
use gpu_passthrough_guest_contract::report::{LdconfigStatus, Report};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(guest: &Guest) -> Report {
    setup::run(&guest.context(), &FakeKernel::new(guest))
}

/// A directory beside the root (outside it) holding a file the workload must not reach.
fn outside(guest: &Guest) -> PathBuf {
    let dir = guest.tmp.path().join("outside");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    dir
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn links_out_of_the_root_never_lead_a_write_or_a_node_outside_it() {
    let guest = Guest::new(RootKind::Debian, 1);
    let out = outside(&guest);
    let r = &guest.root;
    // Our ld.so.conf.d entry pre-placed as a link to a caller's file.
    std::fs::create_dir_all(r.join("etc/ld.so.conf.d")).unwrap();
    symlink(
        out.join("passwd"),
        r.join("etc/ld.so.conf.d/000-nvidia.conf"),
    )
    .unwrap();
    // ld.so.conf a dangling link to a new file outside.
    std::fs::remove_file(r.join("etc/ld.so.conf")).unwrap();
    symlink(out.join("ld.so.conf"), r.join("etc/ld.so.conf")).unwrap();
    // The CDI directory, the programs directory and /dev lead outside.
    std::fs::create_dir_all(out.join("cdi")).unwrap();
    symlink(out.join("cdi"), r.join("etc/cdi")).unwrap();
    std::fs::create_dir_all(r.join("usr/local")).unwrap();
    std::fs::create_dir_all(out.join("bin")).unwrap();
    symlink(out.join("bin"), r.join("usr/local/bin")).unwrap();
    std::fs::remove_dir(r.join("dev")).unwrap();
    std::fs::create_dir_all(out.join("dev")).unwrap();
    symlink(out.join("dev"), r.join("dev")).unwrap();

    let report = run(&guest);

    assert_eq!(
        std::fs::read(out.join("passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n",
        "the caller's file was written through the workload's link"
    );
    assert_eq!(
        entries(&out),
        ["bin", "cdi", "dev", "passwd"],
        "nothing new outside"
    );
    for d in ["bin", "cdi", "dev"] {
        assert!(
            entries(&out.join(d)).is_empty(),
            "{d} outside the root got {:?}",
            entries(&out.join(d))
        );
    }
    // Our own entry replaced the link inside the root instead of following it.
    let conf = r.join("etc/ld.so.conf.d/000-nvidia.conf");
    assert!(std::fs::symlink_metadata(&conf).unwrap().is_file());
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        "/usr/lib/gpu-passthrough/lib\n"
    );
    // The guest's own /dev still got its nodes; the root's /dev is reported.
    assert!(guest.dev.join("nvidia0").exists());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("/dev in the workload root is not a plain directory")),
        "{:?}",
        report.problems
    );
    // The libraries still went in.
    assert_eq!(report.libraries.injected.len(), 2, "{}", report.line());
}

#[test]
fn a_soname_link_through_a_link_out_of_the_root_is_not_mounted_over() {
    let guest = Guest::new(RootKind::Debian, 1);
    let out = outside(&guest);
    std::fs::write(out.join("libcuda.so.1"), b"host library").unwrap();
    let r = &guest.root;
    // /escape -> the outside dir (absolute host path); libcuda.so.1 -> /escape/libcuda.so.1.
    symlink(&out, r.join("escape")).unwrap();
    symlink(
        "/escape/libcuda.so.1",
        r.join("usr/lib/x86_64-linux-gnu/libcuda.so.1"),
    )
    .unwrap();

    let report = run(&guest);

    assert_eq!(
        std::fs::read(out.join("libcuda.so.1")).unwrap(),
        b"host library",
        "the driver's library was mounted over a file outside the root"
    );
    assert!(
        guest.mounts().iter().all(|m| !m.starts_with(&out)),
        "{:?}",
        guest.mounts()
    );
    assert!(report.libraries.shadowed.is_empty());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("/usr/lib/x86_64-linux-gnu/libcuda.so.1")),
        "{:?}",
        report.problems
    );
}

#[test]
fn a_layer_mount_point_that_links_out_of_the_root_gets_no_mount() {
    let guest = Guest::new(RootKind::Debian, 1);
    let out = outside(&guest);
    std::fs::create_dir_all(out.join("mnt")).unwrap();
    symlink(out.join("mnt"), guest.root.join("usr/lib/gpu-passthrough")).unwrap();

    let report = run(&guest);

    assert!(
        guest.mounts().iter().all(|m| !m.starts_with(&out)),
        "{:?}",
        guest.mounts()
    );
    assert!(entries(&out.join("mnt")).is_empty());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("/usr/lib/gpu-passthrough")),
        "{:?}",
        report.problems
    );
}

#[test]
fn a_dangling_soname_link_is_reported_and_the_rest_still_happens() {
    let guest = Guest::new(RootKind::Debian, 1);
    let libdir = guest.root.join("usr/lib/x86_64-linux-gnu");
    symlink("libcuda.so.470.57.02", libdir.join("libcuda.so.1")).unwrap();

    let report = run(&guest);

    let problem = report
        .problems
        .iter()
        .find(|p| p.contains("/usr/lib/x86_64-linux-gnu/libcuda.so.1"))
        .unwrap_or_else(|| panic!("no problem names the dangling link: {}", report.line()));
    assert!(problem.contains("libcuda.so.1"), "{problem}");
    // The other library, ld.so.conf.d and ldconfig all happened.
    assert_eq!(
        report.libraries.injected,
        ["/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"]
    );
    assert_eq!(
        std::fs::read_link(libdir.join("libnvidia-ml.so.1")).unwrap(),
        Path::new("/usr/lib/gpu-passthrough/lib/libnvidia-ml.so.535.261.03")
    );
    assert_eq!(
        std::fs::read_to_string(guest.root.join("etc/ld.so.conf.d/000-nvidia.conf")).unwrap(),
        "/usr/lib/gpu-passthrough/lib\n"
    );
    assert_eq!(report.libraries.ldconfig, LdconfigStatus::Ok);
    assert!(report.cdi.is_some());
    // The loader still finds the driver's libcuda through the cache.
    let cache = guest.in_root("/sbin/ldconfig", &["-p"]);
    assert!(
        cache
            .lines()
            .any(|l| l.contains("libcuda.so.1 ") && l.contains("=> /usr/lib/gpu-passthrough/")),
        "{cache}"
    );
}

/// A static "ldconfig" that writes down the privileges it was started with.
const PROBE: &str = r#"
#include <linux/capability.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0) return 1;
    int bounding = 0;
    for (int c = 0; c < 64; c++) if (prctl(PR_CAPBSET_READ, c, 0, 0, 0) == 1) bounding++;
    FILE *f = fopen("/ldconfig-probe", "w");
    if (!f) return 1;
    fprintf(f, "effective=%x,%x permitted=%x,%x inheritable=%x,%x bounding=%d no_new_privs=%d\n",
        d[0].effective, d[1].effective, d[0].permitted, d[1].permitted,
        d[0].inheritable, d[1].inheritable, bounding, prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
    return fclose(f) != 0;
}
"#;

#[test]
fn the_roots_ldconfig_runs_chrooted_without_any_privilege() {
    let guest = Guest::new(RootKind::Debian, 1);
    let src = guest.tmp.path().join("probe.c");
    std::fs::write(&src, PROBE).unwrap();
    let ldconfig = guest.root.join("usr/sbin/ldconfig");
    std::fs::remove_file(&ldconfig).unwrap();
    let out = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&ldconfig)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc: {out:?}");

    let report = run(&guest);

    assert_eq!(
        report.libraries.ldconfig,
        LdconfigStatus::Ok,
        "{}",
        report.line()
    );
    let probe = std::fs::read_to_string(guest.root.join("ldconfig-probe"))
        .expect("the probe ran chrooted in the root");
    assert_eq!(
        probe.trim(),
        "effective=0,0 permitted=0,0 inheritable=0,0 bounding=0 no_new_privs=1"
    );
}
