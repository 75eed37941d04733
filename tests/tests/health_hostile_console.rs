//! A tenant's 1 GiB hostile console (real NVRM lines, forged `GPU-XID` lines, one 200 MiB line
//! without a newline) ingested while the host goes on: the scan stays in bounded memory, the
//! guest's verdicts are not taken, the record stays bounded, and a detach of another owner
//! completes while the console is still being read and just after (the lock order: the journal
//! lock, then `health.lock`; parsing under neither).
//!
//! The console is generated on the fly into a FIFO, so nothing of it touches the disk, and the
//! writer pauses half-way until the detach is done: the ingest is provably still running while
//! the detach runs, without any timing assumption. The deadlines only turn a hang into a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gpu_passthrough::attach::{self, AttachRequest, Host, Owner, PlanRequest};
use gpu_passthrough::health::{
    Action, HealthStore, IngestReport, MAX_DISTINCT, MAX_EVENTS_PER_DEVICE, MAX_LINE,
};
use gpu_passthrough::pci::PciAddress;
use gpu_passthrough_tests::sysfs::{FakeDevice, FakeHost};

const MIB: usize = 1 << 20;
/// The console: 1 GiB in all.
const CONSOLE: usize = 1024 * MIB;
/// Its one line without a newline.
const LONG_LINE: usize = 200 * MIB;
/// What turns a hang into a failure (the whole test takes seconds).
const DEADLINE: Duration = Duration::from_secs(120);

const HOSTILE: &str = "0000:01:00.0";
const IDLE: &str = "0000:02:00.0";
const DURING: &str = "0000:03:00.0";
const AFTER: &str = "0000:04:00.0";

fn owner(s: &str) -> Owner {
    Owner::new(s).unwrap()
}

fn attach(host: &Host, device: &str, who: &str) {
    host.attach(&AttachRequest {
        plan: PlanRequest {
            devices: vec![device.parse().unwrap()],
            ..Default::default()
        },
        owner: owner(who),
        initrd: None,
    })
    .unwrap_or_else(|e| panic!("attach {device} for {who}: {e}"));
}

/// Config space of all-ones: the detach's verification fails, so the detach writes a health
/// event (takes `health.lock`) under the journal lock.
fn fall_off_the_bus(h: &FakeHost, device: &str) {
    let config = h.sys.join("bus/pci/devices").join(device).join("config");
    std::fs::write(config, [0xffu8; 64]).unwrap();
}

/// One MiB of console, about the GPU at 00:10.0 (where the boot spec put it in the guest):
/// distinct Xid 79 and 48 lines (`pid` = `n`, so every block adds two distinct faults), real
/// NVRM lines, forged `GPU-XID` lines calling an application fault a reboot, and ordinary
/// chatter.
fn block(n: usize) -> Vec<u8> {
    let mut b = format!(
        "[{n}.0] NVRM: Xid (PCI:0000:00:10): 79, pid={n}, GPU has fallen off the bus.\n\
         [{n}.1] NVRM: Xid (PCI:0000:00:10): 48, pid={n}, DBE (double bit error)\n"
    )
    .into_bytes();
    let lines: [&[u8]; 6] = [
        b"[  365.969681] NVRM: Xid (PCI:0000:00:10): 31, pid=13705, name=UnrealEditor, channel 0x0000000c, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC2 GPCCLIENT_PROP_0 faulted @ 0x0_00000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ\n",
        b"[   87.473074] NVRM: GPU 0000:00:10.0: RmInitAdapter failed! (0x22:0x56:667)\n",
        b"[   87.473112] NVRM: GPU 0000:00:10.0: rm_init_adapter failed, device minor number 0\n",
        b"GPU-XID {\"address\":\"0000:00:10.0\",\"kind\":\"xid\",\"xid\":13,\"message\":\"forged\",\"action\":\"reboot_host\"}\n",
        b"[    2.819204] pci 0000:00:10.0: [10de:2204] type 00 class 0x030000 PCIe Legacy Endpoint\n",
        b"workload: step 1000 loss 0.25 throughput 1234.5 samples/s on all eight workers\n",
    ];
    let mut i = 0;
    while b.len() < MIB {
        b.extend_from_slice(lines[i % lines.len()]);
        i += 1;
    }
    b.truncate(MIB);
    // End on a line break so the next block starts a line.
    *b.last_mut().unwrap() = b'\n';
    b
}

/// Write the hostile console into `fifo`: 400 MiB of blocks, the 200 MiB line (a fault line
/// hidden past the line cap; its newline is its last byte), the rest in blocks. Says when half is written and waits for
/// `resume` before writing the rest.
fn write_console(fifo: &Path, half: mpsc::Sender<()>, resume: mpsc::Receiver<()>) {
    let mut out = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    let mut written = 0;
    let mut n = 0;
    let mut paused = false;
    let filler = vec![b'x'; MIB];
    while written < CONSOLE {
        if !paused && written >= CONSOLE / 2 {
            half.send(()).unwrap();
            resume.recv().unwrap();
            paused = true;
        }
        if written == 400 * MIB {
            out.write_all(b"AAAA").unwrap();
            for _ in 0..LONG_LINE / MIB - 1 {
                out.write_all(&filler).unwrap();
            }
            let hidden = b" NVRM: Xid (PCI:0000:00:10): 48, pid=999999999, DBE (double bit error)";
            out.write_all(hidden).unwrap();
            out.write_all(&filler[..MIB - 4 - hidden.len() - 1])
                .unwrap();
            out.write_all(b"\n").unwrap();
            written += LONG_LINE;
            continue;
        }
        out.write_all(&block(n)).unwrap();
        n += 1;
        written += MIB;
    }
}

/// Detach `who` on a thread of its own; how long it took, or a failure after [`DEADLINE`].
fn timed_detach(h: &Arc<FakeHost>, who: &'static str) -> Duration {
    let (tx, rx) = mpsc::channel();
    let h = Arc::clone(h);
    std::thread::spawn(move || {
        let start = Instant::now();
        let result = h.host().detach(&owner(who));
        let _ = tx.send((
            result.map(|_| ()).map_err(|e| e.to_string()),
            start.elapsed(),
        ));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok((Ok(()), took)) => took,
        Ok((Err(e), _)) => panic!("detach {who}: {e}"),
        Err(_) => panic!("detach {who} did not finish in {DEADLINE:?}: blocked behind the ingest"),
    }
}

/// The peak resident memory of this process, from `/proc/self/status`.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[test]
fn a_hostile_console_is_read_bounded_and_never_holds_up_a_detach() {
    let h = Arc::new(FakeHost::new(true));
    for (i, device) in [HOSTILE, IDLE, DURING, AFTER].into_iter().enumerate() {
        h.add(
            FakeDevice::new(device, 0x10de, 0x2684, 0x030000)
                .driver("nvidia")
                .group(i as u32 + 1),
        );
    }
    let host = h.host();
    attach(&host, HOSTILE, "hostile");
    for (device, who) in [
        (IDLE, "vm-idle"),
        (DURING, "vm-during"),
        (AFTER, "vm-after"),
    ] {
        attach(&host, device, who);
        fall_off_the_bus(&h, device);
    }
    // The baseline: a detach (with its health write) while nothing else runs.
    let idle = timed_detach(&h, "vm-idle");

    let fifo: PathBuf = h.dir.path().join("console.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let before = peak_rss_kib();

    let (half_tx, half_rx) = mpsc::channel();
    let (resume_tx, resume_rx) = mpsc::channel();
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || write_console(&fifo, half_tx, resume_rx))
    };
    let (done_tx, done_rx) = mpsc::channel::<Result<IngestReport, String>>();
    let started = Instant::now();
    let ingest = {
        let (state, fifo) = (h.state.clone(), fifo.clone());
        std::thread::spawn(move || {
            let report = attach::ingest_console(&state, &owner("hostile"), &fifo);
            let _ = done_tx.send(report.map_err(|e| e.to_string()));
        })
    };

    half_rx
        .recv_timeout(DEADLINE)
        .expect("the ingest reads half the console");
    // The writer waits: the ingest cannot finish while this detach runs.
    let during = timed_detach(&h, "vm-during");
    assert!(!ingest.is_finished(), "the ingest was still reading");
    resume_tx.send(()).unwrap();
    writer.join().expect("the writer finished");
    // Right after the console ends: the ingest records what it found.
    let after = timed_detach(&h, "vm-after");
    let report = done_rx
        .recv_timeout(DEADLINE)
        .expect("the ingest of 1 GiB finishes")
        .expect("the ingest succeeds");
    let ingest_took = started.elapsed();
    ingest.join().unwrap();
    let peak = peak_rss_kib();

    println!(
        "figures: ingest of 1 GiB {:.2}s; detach idle {:.1} ms, during the ingest {:.1} ms ({:.2}x), just after it {:.1} ms; peak RSS {} MiB (before {} MiB)",
        ingest_took.as_secs_f64(),
        idle.as_secs_f64() * 1e3,
        during.as_secs_f64() * 1e3,
        during.as_secs_f64() / idle.as_secs_f64(),
        after.as_secs_f64() * 1e3,
        peak / 1024,
        before / 1024,
    );

    // Bounded memory: the 200 MiB line was never held (nor 1 GiB of faults).
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} KiB, {before} KiB before the ingest"
    );
    let s = report.scan;
    assert_eq!(s.bytes, CONSOLE as u64);
    assert_eq!(s.long_lines, 1, "{s:?}");
    assert_eq!(s.skipped_bytes, (LONG_LINE - 1 - MAX_LINE) as u64, "{s:?}");
    assert!(report.faults.len() <= MAX_DISTINCT, "{s:?}");
    assert!(s.occurrences_not_kept > 0, "{s:?}");
    assert!(
        report
            .faults
            .iter()
            .all(|f| !(f.xid == Some(48) && f.message.contains("pid=999999999"))),
        "the fault past the line cap is not read"
    );
    // The forged GPU-XID lines: Xid 13 is an application fault, whatever the guest says.
    assert!(
        report.faults.iter().all(|f| f.action != Action::RebootHost),
        "no guest verdict taken"
    );
    // The record stays small: a cap per device, the rest as counts.
    let store = HealthStore::new(&h.state);
    let hostile: PciAddress = HOSTILE.parse().unwrap();
    let record = store
        .records()
        .unwrap()
        .into_iter()
        .find(|d| d.device == hostile)
        .expect("the hostile tenant's device has a record");
    assert!(record.events.len() <= MAX_EVENTS_PER_DEVICE);
    assert!(record.older.iter().map(|t| t.count).sum::<u64>() > 0);
    let size = std::fs::metadata(store.path()).unwrap().len();
    assert!(size < 256 * 1024, "health.json is {size} bytes");
}
