//! While the workload runs, PID 1 watches the kernel log and prints one `GPU-XID {json}` line
//! per NVIDIA fault, so the host sees faults that happen after setup (the console is the one
//! channel every VMM gives it). Classification is the guest contract's
//! ([`gpu_passthrough_guest_contract::xid`]), the same the host's `health scan` uses.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::Path;

use gpu_passthrough_guest_contract::xid::Classifier;

/// Read kernel-log records from `log` until it ends (a regular file) or fails, writing a
/// `GPU-XID` line to `out` for each fault. `/dev/kmsg` returns one record per read and blocks
/// when there is none, so on the real log this runs for the life of the guest.
pub fn watch(mut log: impl Read, mut out: impl Write) {
    let mut classifier = Classifier::new();
    let mut buf = vec![0u8; 8192];
    let mut partial = String::new();
    loop {
        let n = match log.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            // EPIPE: records were overwritten before we read them; the next read continues.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        partial.push_str(&String::from_utf8_lossy(&buf[..n]));
        while let Some(end) = partial.find('\n') {
            let line: String = partial.drain(..=end).collect();
            // Continuation lines (" SUBSYSTEM=...") carry metadata, not messages.
            if line.starts_with(' ') {
                continue;
            }
            let msg = line.split_once(';').map_or(line.as_str(), |(_, m)| m);
            if let Some(fault) = classifier.feed(msg.trim_end()) {
                // One write per line, so other console output does not split it.
                let _ = out.write_all(format!("{}\n", fault.line()).as_bytes());
                let _ = out.flush();
            }
        }
    }
}

/// Open the kernel log at `path` positioned at its end, so that the watch sees what is logged
/// from now on (open it before the setup to also report faults of the setup itself).
pub fn open(path: &Path) -> Option<File> {
    let mut f = File::open(path).ok()?;
    f.seek(SeekFrom::End(0)).ok()?;
    Some(f)
}

/// Watch `log` on a thread of its own, printing to stdout. It ends with the guest.
pub fn spawn(log: File) {
    let _ = std::thread::Builder::new()
        .name("gpu-xid".into())
        .spawn(move || watch(log, std::io::stdout()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpu_passthrough_guest_contract::xid::{Fault, FaultKind};

    #[test]
    fn prints_one_gpu_xid_line_per_fault_in_kmsg_records() {
        let records = "6,100,5000,-;NVRM: loading NVIDIA UNIX Open Kernel Module\n\
                       3,101,9000,-;NVRM: Xid (PCI:0000:00:05): 79, pid=4, GPU has fallen off the bus.\n \
                       SUBSYSTEM=pci\n\
                       3,102,9100,-;NVRM: Xid (PCI:0000:00:05): 13, pid=4, Graphics Exception\n\
                       4,103,9200,-;nvidia 0000:00:05.0: Unable to change power state from D3cold to D0, device inaccessible\n";
        let mut out = Vec::new();
        watch(records.as_bytes(), &mut out);
        let text = String::from_utf8(out).unwrap();
        let faults: Vec<Fault> = text.lines().map(|l| Fault::from_line(l).unwrap()).collect();
        assert_eq!(faults.len(), 3, "{text}");
        assert!(text.lines().all(|l| l.starts_with("GPU-XID {")));
        assert_eq!(faults[0].xid, Some(79));
        assert_eq!(faults[0].address.as_deref(), Some("0000:00:05.0"));
        assert_eq!(faults[1].xid, Some(13));
        assert_eq!(faults[2].kind, FaultKind::PowerState);
    }

    #[test]
    fn a_record_split_across_reads_is_still_one_line() {
        /// Returns at most 7 bytes per read, as a pipe might.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.len().min(7).min(buf.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let rec = b"3,1,1,-;NVRM: Xid (PCI:0000:00:05): 48, pid=1, DBE (double bit error)\n";
        let mut out = Vec::new();
        watch(Trickle(rec), &mut out);
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
    }

    #[test]
    fn open_skips_what_is_already_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(
            &path,
            "3,1,1,-;NVRM: Xid (PCI:0000:00:05): 79, pid=1, old\n",
        )
        .unwrap();
        let log = open(&path).unwrap();
        let mut out = Vec::new();
        watch(log, &mut out);
        assert!(out.is_empty());
    }
}
