//! 100 `attach` processes racing for one device: exactly one owner, an intact journal.

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::cli_binary;
use gpu_passthrough_tests::sysfs::{self};

#[test]
fn one_hundred_concurrent_attaches_yield_exactly_one_owner() {
    let h = sysfs::workstation();
    let bin = cli_binary();
    let start = Instant::now();
    let children: Vec<_> = (0..100)
        .map(|i| {
            Command::new(bin)
                .args(h.cli_args())
                .args([
                    "--json",
                    "attach",
                    "0000:01:00.0",
                    "--owner",
                    &format!("vm-{i}"),
                ])
                .args(["--dev-dir", h.dev.to_str().unwrap()])
                .env_remove("GPU_PASSTHROUGH_FAILPOINT")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn attach")
        })
        .collect();
    let mut winners = Vec::new();
    let mut refused = 0;
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        match out.status.code() {
            Some(0) => winners.push(format!("vm-{i}")),
            Some(4) => {
                let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let msg = body["error"].as_str().unwrap();
                assert!(msg.contains("is attached to owner vm-"), "{msg}");
                refused += 1;
            }
            other => panic!(
                "vm-{i}: exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    eprintln!("100 attaches in {:?}", start.elapsed());
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(refused, 99);
    let j = h.journal().expect("journal parses");
    assert!(j["transactions"].as_array().unwrap().is_empty());
    let atts = j["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 1);
    assert_eq!(atts[0]["owner"], winners[0].as_str());
    assert_eq!(atts[0]["devices"].as_array().unwrap().len(), 2);
    assert_eq!(h.driver("0000:01:00.0").as_deref(), Some("vfio-pci"));
    // No temp file left behind by any writer.
    let leftovers: Vec<_> = std::fs::read_dir(&h.state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty());
}
