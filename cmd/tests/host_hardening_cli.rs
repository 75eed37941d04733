//! The host guards as the CLI shows them: `devices` on a host without candidates, and a
//! detach refused while a real process (this test) holds the device's VFIO node.

mod common;

use common::{json, run};
use gpu_passthrough_tests::sysfs::{self, FakeDevice, FakeHost};

#[test]
fn devices_on_a_host_without_candidates_says_so_in_text_and_json() {
    let h = FakeHost::new(true);
    h.add(
        FakeDevice::new("0000:00:17.0", 0x8086, 0x7ae2, 0x010601)
            .driver("ahci")
            .group(5),
    )
    .add(
        FakeDevice::new("0000:03:00.0", 0x8086, 0x1533, 0x020000)
            .driver("igb")
            .group(6),
    );
    let text = run(&h, &["devices"]);
    assert_eq!(text.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("no passthrough candidates among the 2 PCI devices looked at"),
        "{stdout}"
    );
    let out = run(&h, &["--json", "devices"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json(&out);
    assert_eq!(v["scanned"], 2);
    assert_eq!(v["devices"], serde_json::json!([]));
    assert!(
        v["note"]
            .as_str()
            .unwrap()
            .contains("no passthrough candidates"),
        "{v}"
    );
    let all = json(&run(&h, &["--json", "devices", "--all"]));
    assert_eq!(all["devices"].as_array().unwrap().len(), 2);
    assert!(all.get("note").is_none(), "{all}");
}

#[test]
fn detach_is_refused_while_this_process_holds_the_vfio_node() {
    let h = sysfs::workstation();
    let out = run(&h, &["--json", "attach", "0000:01:00.0", "--owner", "vm-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The simulated node is a plain file: holding it open makes this test the "VMM".
    let node = std::fs::File::open(h.dev.join("vfio/12")).unwrap();
    let out = run(&h, &["--json", "detach", "--owner", "vm-1"]);
    assert_eq!(out.status.code(), Some(4), "a refusal");
    let err = json(&out)["error"].as_str().unwrap().to_owned();
    let me = format!("pid {} (", std::process::id());
    assert!(err.contains(&me) && err.contains("vfio/12"), "{err}");
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    let out = run(&h, &["reconcile", "--gone", "vm-1"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("kept vm-1: 0000:01:00.") && text.contains(&me),
        "{text}"
    );
    drop(node);
    let out = run(&h, &["detach", "--owner", "vm-1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("nvidia"));
}
