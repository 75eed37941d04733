//! Reading the kernel log (`/dev/kmsg`) without blocking, to explain module load failures.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// A cursor on the kernel log that only returns records written after it was opened.
#[derive(Debug)]
pub struct KernelLog {
    file: Option<File>,
}

impl KernelLog {
    /// Open `path` (normally `/dev/kmsg`) non-blocking and skip what is already there.
    /// A missing or unreadable log gives a cursor that reads nothing: the log only adds detail.
    pub fn open(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .ok()
            .and_then(|mut f| f.seek(SeekFrom::End(0)).ok().map(|_| f));
        Self { file }
    }

    /// Messages written since the last call, one per record, without the `prio,seq,ts;` header.
    pub fn read_new(&mut self) -> Vec<String> {
        let Some(file) = self.file.as_mut() else {
            return Vec::new();
        };
        let mut raw = Vec::new();
        // /dev/kmsg returns one record per read; a regular file (tests) returns chunks.
        let mut buf = vec![0u8; 8192];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // EPIPE: records were overwritten before we read them; the next read continues.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break, // EAGAIN: nothing more for now.
            }
        }
        String::from_utf8_lossy(&raw)
            .lines()
            // Continuation lines (" SUBSYSTEM=...") carry metadata, not messages.
            .filter(|l| !l.starts_with(' ') && !l.is_empty())
            .map(|l| match l.split_once(';') {
                Some((_, msg)) => msg.to_string(),
                None => l.to_string(),
            })
            .collect()
    }
}

/// The firmware file a kernel log line says failed to load, if it is such a line.
///
/// Matches `Direct firmware load for X failed with error -2` and `firmware: failed to load X (-2)`.
pub fn failed_firmware(line: &str) -> Option<String> {
    if let Some(rest) = line.split("Direct firmware load for ").nth(1) {
        return rest.split(" failed").next().map(str::to_string);
    }
    if let Some(rest) = line.split("firmware: failed to load ").nth(1) {
        return rest.split_whitespace().next().map(str::to_string);
    }
    None
}

/// The kernel's reason for refusing a module's signature, if `line` is that record:
/// `Loading of unsigned module is rejected`, `Loading of module with unavailable key is
/// rejected` or `Loading of module with unsupported crypto is rejected` (the kernel prints it,
/// and fails the load with EKEYREJECTED, only where signatures are enforced).
pub fn signature_rejection(line: &str) -> Option<&str> {
    let rest = line.split("Loading of ").nth(1)?;
    let reason = rest.strip_suffix(" is rejected")?;
    (!reason.is_empty()).then_some(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernels_reason_for_a_rejected_signature() {
        // The records of Linux 6.1 (kernel/module/signing.c), as read from /dev/kmsg.
        assert_eq!(
            signature_rejection("Loading of unsigned module is rejected"),
            Some("unsigned module")
        );
        assert_eq!(
            signature_rejection("Loading of module with unavailable key is rejected"),
            Some("module with unavailable key")
        );
        assert_eq!(
            signature_rejection("module: Loading of module with unsupported crypto is rejected"),
            Some("module with unsupported crypto")
        );
        assert_eq!(
            signature_rejection(
                "nvidia: module verification failed: signature and/or required key missing - tainting kernel"
            ),
            None
        );
        assert_eq!(signature_rejection("Loading of  is rejected"), None);
        assert_eq!(signature_rejection("Loading of unsigned module"), None);
    }

    #[test]
    fn finds_firmware_names_in_both_kernel_messages() {
        assert_eq!(
            failed_firmware(
                "nvidia 0000:00:05.0: Direct firmware load for nvidia/535.261.03/gsp_ga10x.bin failed with error -2"
            )
            .as_deref(),
            Some("nvidia/535.261.03/gsp_ga10x.bin")
        );
        assert_eq!(
            failed_firmware(
                "nvidia 0000:00:05.0: firmware: failed to load nvidia/x/gsp_tu10x.bin (-2)"
            )
            .as_deref(),
            Some("nvidia/x/gsp_tu10x.bin")
        );
        assert_eq!(failed_firmware("NVRM: No NVIDIA GPU found."), None);
    }

    #[test]
    fn reads_only_records_written_after_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "6,1,10,-;old line\n").unwrap();
        let mut log = KernelLog::open(&path);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"3,2,20,-;NVRM: new line\n SUBSYSTEM=pci\n").unwrap();
        assert_eq!(log.read_new(), vec!["NVRM: new line".to_string()]);
        assert!(log.read_new().is_empty());
    }
}
