//! NVIDIA fault classification: kernel-log lines → one [`Fault`] each, with the host action
//! NVIDIA's Xid catalogue asks for.
//!
//! Pure (no I/O) so that the host library (`health scan`, `health ingest`) and the static guest
//! init (its `GPU-XID {json}` lines) share one classifier. Formats handled, as the driver prints
//! them:
//! - `NVRM: Xid (PCI:0000:02:00): 79, pid=..., GPU has fallen off the bus.` — the PCI part has
//!   no function number (function 0 is meant); older drivers print `Xid (0000:02:00)`.
//! - `NVRM: GPU 0000:01:00.0: RmInitAdapter failed! (0x22:0x56:667)`.
//! - `nvidia 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible`
//!   (the PCI core, not NVRM).
//! - The multi-line `NVRM: The NVIDIA GPU 0000:b3:00.0` … `NVRM: fallen off the bus and is not
//!   responding to commands.` (needs the [`Classifier`]'s memory of the previous line).
//!
//! Anything else, including the follow-up lines the driver prints after a fault
//! (`rm_init_adapter failed, device minor number 0`), yields nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Prefix of the guest init's console line for a fault seen while the workload runs.
pub const XID_PREFIX: &str = "GPU-XID ";

/// What kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// An Xid line (see [`Fault::xid`]).
    Xid,
    /// The driver could not initialise the GPU (`RmInitAdapter failed`).
    InitFailed,
    /// The device could not leave a low-power state (`D3cold to D0`).
    PowerState,
    /// The GPU no longer answers on PCIe (the multi-line message without an Xid).
    FallenOffBus,
    /// GSP firmware RPC timeout (Xid 119).
    GspTimeout,
    /// GSP firmware error (Xid 120).
    GspError,
    /// Host side: the device failed its check after detach (config space, driver).
    VerifyFailed,
    /// Host side: the reset the host asked the kernel for failed.
    ResetFailed,
}

/// What the host must do about a fault, after NVIDIA's Xid catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// An application fault: the host needs to do nothing.
    None,
    /// Not in the catalogue this classifier knows: look at it, do not act automatically.
    Investigate,
    /// Let running work finish, then reset the GPU (e.g. a row remap pending).
    DrainAndReset,
    /// The GPU is unusable until it is reset.
    ResetGpu,
    /// A GPU reset is not enough: reboot the host.
    RebootHost,
}

impl Action {
    /// Whether the fault needs the host to act: such a fault counts towards quarantine.
    pub fn needs_host(self) -> bool {
        matches!(
            self,
            Action::DrainAndReset | Action::ResetGpu | Action::RebootHost
        )
    }
}

/// One NVIDIA fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// PCI address `DDDD:BB:DD.F` (lowercase) as the log names it, when it names one.
    pub address: Option<String>,
    /// What kind.
    pub kind: FaultKind,
    /// The Xid number, for Xid lines.
    pub xid: Option<u32>,
    /// The driver's words (after the Xid number, or the whole message).
    pub message: String,
    /// What the host must do.
    pub action: Action,
}

impl Fault {
    /// The guest init's console line: `GPU-XID {json}`.
    pub fn line(&self) -> String {
        // Plain strings and numbers: serializing cannot fail; keep a parseable line anyway.
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        format!("{XID_PREFIX}{json}")
    }

    /// Parse a `GPU-XID {json}` line (anywhere in the line, e.g. after a timestamp).
    pub fn from_line(line: &str) -> Option<Fault> {
        let at = line.find(XID_PREFIX)?;
        serde_json::from_str(line[at + XID_PREFIX.len()..].trim()).ok()
    }
}

/// The snake_case word serde writes for a unit variant.
fn word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&word(self))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&word(self))
    }
}

/// One line for people: `ADDRESS  KIND [XID]  action ACTION  MESSAGE`.
impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  {}",
            self.address.as_deref().unwrap_or("-"),
            self.kind
        )?;
        if let Some(x) = self.xid {
            write!(f, " {x}")?;
        }
        write!(f, "  action {}  {}", self.action, self.message)
    }
}

/// The host action for an Xid, after NVIDIA's catalogue ("Resolution Bucket (Immediate
/// Action)", docs.nvidia.com/deploy/xid-errors).
pub fn xid_action(xid: u32) -> Action {
    match xid {
        // Application faults: graphics/SM exception, MMU fault, push buffer, channel
        // verification, preemptive cleanup, graphics class error, context switch timeout.
        13 | 31 | 32 | 43 | 45 | 68 | 69 | 109 => Action::None,
        // Contained ECC error / row remap pending: the app restarts, the GPU resets when drained.
        63 | 92 | 94 => Action::DrainAndReset,
        // GPU stopped, double-bit ECC, micro-controller halt, row remap failure, NVLink, fallen
        // off the bus, uncontained ECC, GSP timeout/error, C2C, unrecovered ECC.
        46 | 48 | 61 | 62 | 64 | 74 | 79 | 95 | 119 | 120 | 121 | 140 => Action::ResetGpu,
        _ => Action::Investigate,
    }
}

/// A line classifier that remembers the one previous line (for multi-line messages).
#[derive(Debug, Clone, Default)]
pub struct Classifier {
    /// `NVRM: The NVIDIA GPU ADDR` seen on the previous lines: the address of a fallen-off GPU.
    pending_gpu: Option<String>,
}

impl Classifier {
    /// A classifier with no memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Classify one log line (a timestamp or syslog prefix before `NVRM:` is fine).
    pub fn feed(&mut self, line: &str) -> Option<Fault> {
        if let Some(msg) = nvrm_message(line) {
            if let Some(rest) = msg.strip_prefix("The NVIDIA GPU ") {
                self.pending_gpu = full_address(rest.split_whitespace().next()?);
                return None;
            }
            if msg.starts_with("fallen off the bus") {
                return Some(Fault {
                    address: self.pending_gpu.take(),
                    kind: FaultKind::FallenOffBus,
                    xid: None,
                    message: msg.trim_end_matches('.').to_owned(),
                    action: Action::ResetGpu,
                });
            }
            if msg.starts_with("(PCI ID:") || msg.starts_with("installed in this system") {
                return None; // middle lines of the same message
            }
            self.pending_gpu = None;
            return classify_nvrm(msg);
        }
        self.pending_gpu = None;
        classify_power_state(line)
    }
}

/// Classify one line on its own (no multi-line messages).
pub fn classify_line(line: &str) -> Option<Fault> {
    Classifier::new().feed(line)
}

/// Every fault in a log, in order (see [`Scanner`]).
pub fn scan(text: &str) -> Vec<Fault> {
    let mut s = Scanner::default();
    for line in text.lines() {
        s.push(line);
    }
    s.finish()
}

/// Scans a log line by line. `GPU-XID` lines of the guest init count too; one that repeats a
/// kernel line just before it (the console shows both) is not counted twice.
#[derive(Debug, Clone, Default)]
pub struct Scanner {
    classifier: Classifier,
    out: Vec<Fault>,
    /// Raw kernel faults not yet matched by a GPU-XID line (the guest prints it after the kernel).
    unmatched: Vec<usize>,
}

impl Scanner {
    /// Feed one line.
    pub fn push(&mut self, line: &str) {
        if let Some(f) = Fault::from_line(line) {
            if let Some(pos) = self.unmatched.iter().position(|&i| self.out[i] == f) {
                self.unmatched.remove(pos);
            } else {
                self.out.push(f);
            }
            return;
        }
        if let Some(f) = self.classifier.feed(line) {
            self.unmatched.push(self.out.len());
            self.out.push(f);
        }
    }

    /// The faults found, in order.
    pub fn finish(self) -> Vec<Fault> {
        self.out
    }
}

/// The message after `NVRM: `, if the line is the NVIDIA driver's.
fn nvrm_message(line: &str) -> Option<&str> {
    let at = line.find("NVRM: ")?;
    Some(line[at + "NVRM: ".len()..].trim())
}

fn classify_nvrm(msg: &str) -> Option<Fault> {
    if let Some(rest) = msg.strip_prefix("Xid ") {
        return classify_xid(rest);
    }
    // `GPU 0000:01:00.0: RmInitAdapter failed! (0x22:0x56:667)`; the driver also prints a bare
    // `RmInitAdapter failed!` on some versions.
    if let Some(at) = msg.find("RmInitAdapter failed") {
        let address = msg
            .strip_prefix("GPU ")
            .and_then(|r| r.split(": ").next())
            .and_then(full_address);
        return Some(Fault {
            address,
            kind: FaultKind::InitFailed,
            xid: None,
            message: msg[at..].to_owned(),
            action: Action::ResetGpu,
        });
    }
    None
}

/// `(PCI:0000:02:00): 79, pid=..., GPU has fallen off the bus.`
fn classify_xid(rest: &str) -> Option<Fault> {
    let inner = rest.strip_prefix('(')?;
    let (addr, after) = inner.split_once("): ")?;
    let addr = addr.strip_prefix("PCI:").unwrap_or(addr);
    let address = full_address(addr)?;
    let (number, message) = match after.split_once(',') {
        Some((n, m)) => (n, m.trim()),
        None => (after, ""),
    };
    let xid: u32 = number.trim().parse().ok()?;
    let kind = match xid {
        119 => FaultKind::GspTimeout,
        120 => FaultKind::GspError,
        _ => FaultKind::Xid,
    };
    let action = if xid == 154 {
        recovery_action(message)
    } else {
        xid_action(xid)
    };
    Some(Fault {
        address: Some(address),
        kind,
        xid: Some(xid),
        message: message.trim_end_matches('.').to_owned(),
        action,
    })
}

/// Xid 154 names the recovery the driver wants: `... changed from 0x0 (None) to 0x2 (Node
/// Reboot Required)`.
fn recovery_action(message: &str) -> Action {
    let wanted = message.rsplit(" to ").next().unwrap_or(message);
    if wanted.contains("Reboot") {
        Action::RebootHost
    } else if wanted.contains("Drain") {
        Action::DrainAndReset
    } else if wanted.contains("Reset") {
        Action::ResetGpu
    } else if wanted.contains("None") {
        Action::None
    } else {
        Action::Investigate
    }
}

/// `nvidia 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible`
fn classify_power_state(line: &str) -> Option<Fault> {
    let at = line.find("Unable to change power state from D3cold")?;
    let address = line[..at]
        .trim_end()
        .strip_suffix(':')
        .and_then(|p| p.split_whitespace().last())
        .and_then(full_address);
    Some(Fault {
        address,
        kind: FaultKind::PowerState,
        xid: None,
        message: line[at..].trim().to_owned(),
        action: Action::ResetGpu,
    })
}

/// `DDDD:BB:DD[.F]` or `BB:DD.F` → `dddd:bb:dd.f`; anything else → `None`.
fn full_address(s: &str) -> Option<String> {
    let s = s.trim_end_matches([':', ',']);
    let (slot, function) = match s.rsplit_once('.') {
        Some((slot, f)) => (slot, f),
        None => (s, "0"),
    };
    let parts: Vec<&str> = slot.split(':').collect();
    let (domain, bus, device) = match parts[..] {
        [d, b, dev] => (d, b, dev),
        [b, dev] if s.contains('.') => ("0000", b, dev),
        _ => return None,
    };
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let fnum = function.parse::<u8>().ok().filter(|f| *f < 8)?;
    let dnum = u8::from_str_radix(device, 16).ok().filter(|d| *d < 0x20)?;
    (hex(domain, 4) && hex(bus, 2) && hex(device, 2)).then(|| {
        format!(
            "{}:{}:{dnum:02x}.{fnum}",
            domain.to_ascii_lowercase(),
            bus.to_ascii_lowercase()
        )
    })
}

#[cfg(test)]
mod tests {
    //! Real message formats, each with where it was seen. Lines are as printed (timestamps and
    //! syslog prefixes kept where the source had them).
    use super::*;

    fn one(line: &str) -> Fault {
        classify_line(line).unwrap_or_else(|| panic!("no fault in {line:?}"))
    }

    #[test]
    fn xid_79_fallen_off_the_bus_needs_a_reset() {
        // NVIDIA/NVSentinel issue #155 (comment quoting the Xid form).
        let f = one("NVRM: Xid (PCI:0000:44:00): 79, GPU has fallen off the bus.");
        assert_eq!(f.address.as_deref(), Some("0000:44:00.0"));
        assert_eq!(
            (f.kind, f.xid, f.action),
            (FaultKind::Xid, Some(79), Action::ResetGpu)
        );
        assert_eq!(f.message, "GPU has fallen off the bus");
        // The form in the issue text, with pid=.
        let f =
            one("[ 1843.3] NVRM: Xid (PCI:0000:02:00): 79, pid=1234, GPU has fallen off the bus.");
        assert_eq!(f.address.as_deref(), Some("0000:02:00.0"));
        assert_eq!(f.message, "pid=1234, GPU has fallen off the bus");
    }

    #[test]
    fn application_faults_need_nothing_of_the_host() {
        // NVIDIA/open-gpu-kernel-modules issue #1030 (Xid 31 with pid and name).
        let f = one(
            "[  365.969681] NVRM: Xid (PCI:0000:01:00): 31, pid=13705, name=UnrealEditor, channel 0x0000000c, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC2 GPCCLIENT_PROP_0 faulted @ 0x0_00000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ",
        );
        assert_eq!((f.xid, f.action), (Some(31), Action::None));
        // doitsujin/dxvk issue #1027 (older driver: no pid, no name).
        let f = one(
            "[31609.615230] NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception: Class 0x0 Subchannel 0x0 Mismatch",
        );
        assert_eq!((f.xid, f.action), (Some(13), Action::None));
        // leptonai/gpud PR #46 (pid='<unknown>').
        let f = one(
            "[Fri Aug 30 11:43:09 2024] NVRM: Xid (PCI:0000:cb:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on (GPC 7, TPC 7, SM 0): Illegal Instruction Parameter",
        );
        assert_eq!(f.address.as_deref(), Some("0000:cb:00.0"));
        assert_eq!(f.action, Action::None);
        // NVIDIA/open-gpu-kernel-modules issue #1150 (Xid 45 caused by an NVLink Xid).
        let f = one(
            "kernel: NVRM: Xid (PCI:0000:dc:00): 45, pid=1818990, name=python3, Ch 00000001 caused by previous Xid 149",
        );
        assert_eq!((f.xid, f.action), (Some(45), Action::None));
        assert_eq!(xid_action(43), Action::None);
    }

    #[test]
    fn memory_errors_need_a_reset_or_a_drain() {
        // stas00/ml-engineering compute/accelerator/nvidia/debug.md (Xid 63).
        let f = one(
            "NVRM: Xid (PCI:0000:10:1c): 63, pid=1896, Row Remapper: New row marked for remapping, reset gpu to activate.",
        );
        assert_eq!(f.address.as_deref(), Some("0000:10:1c.0"));
        assert_eq!(f.action, Action::DrainAndReset);
        // leptonai/gpud PR #1174 (Xid 94).
        let f = one("NVRM: Xid (PCI:0000:9b:00): 94, pid=1234, name=python3, Contained ECC error");
        assert_eq!(f.action, Action::DrainAndReset);
        // A Go test table quoting an Xid 95 line (found by the code search).
        let f = one(
            "NVRM: Xid (PCI:0000:01:00): 95, pid=7062, Uncontained: LTC TAG (0x2,0x0). RST: Yes, D-RST: No",
        );
        assert_eq!(f.action, Action::ResetGpu);
        for xid in [48, 64] {
            assert_eq!(xid_action(xid), Action::ResetGpu, "xid {xid}");
        }
    }

    #[test]
    fn gsp_rpc_timeouts_are_their_own_kind() {
        // NVIDIA/NVSentinel e2e tests (injected into /dev/kmsg) and GPU Operator troubleshooting.
        let f = one(
            "kernel: [16450076.435595] NVRM: Xid (PCI:0002:00:00): 119, pid=1582259, name=nvc:[driver], Timeout after 6s of waiting for RPC response from GPU1 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20802a02 0x8).",
        );
        assert_eq!(f.address.as_deref(), Some("0002:00:00.0"));
        assert_eq!(
            (f.kind, f.xid, f.action),
            (FaultKind::GspTimeout, Some(119), Action::ResetGpu)
        );
        let f = one(
            "[ 3947.590120] NVRM: Xid (PCI:0000:61:00): 119, pid=123417, name=nv-hostengine, Timeout after 6s of waiting for RPC response from GPU0 GSP! Expected function 10 (FREE) (0xc0000005 0x0).",
        );
        assert_eq!(f.kind, FaultKind::GspTimeout);
        let f = one("NVRM: Xid (PCI:0000:61:00): 120, pid=1, GSP task exception");
        assert_eq!((f.kind, f.action), (FaultKind::GspError, Action::ResetGpu));
    }

    #[test]
    fn init_failures_and_power_state_name_the_device() {
        // bryansteiner/gpu-passthrough-tutorial issue #39 (dmesg after a failed passthrough).
        let f = one("[   87.473074] NVRM: GPU 0000:01:00.0: RmInitAdapter failed! (0x22:0x56:667)");
        assert_eq!(f.address.as_deref(), Some("0000:01:00.0"));
        assert_eq!(
            (f.kind, f.action),
            (FaultKind::InitFailed, Action::ResetGpu)
        );
        assert_eq!(f.message, "RmInitAdapter failed! (0x22:0x56:667)");
        let f = one(
            "[   87.412759] nvidia 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible",
        );
        assert_eq!(f.address.as_deref(), Some("0000:01:00.0"));
        assert_eq!(f.kind, FaultKind::PowerState);
        // NVIDIA/open-gpu-kernel-modules issue #789 (GSP firmware could not start).
        let f =
            one("[  903.610907] NVRM: GPU 0000:98:00.0: RmInitAdapter failed! (0x62:0x65:1792)");
        assert_eq!(f.address.as_deref(), Some("0000:98:00.0"));
    }

    #[test]
    fn multi_line_fallen_off_the_bus_keeps_the_address() {
        // NVIDIA/NVSentinel issue #155 (newer drivers, no Xid line).
        let text = "[ 1843.308145] NVRM: The NVIDIA GPU 0000:b3:00.0\n               NVRM: (PCI ID: 10de:26b5) installed in this system has\n               NVRM: fallen off the bus and is not responding to commands.\n[ 1843.439662] NVRM: The NVIDIA probe routine failed for 1 device(s).\n";
        let faults = scan(text);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].address.as_deref(), Some("0000:b3:00.0"));
        assert_eq!(faults[0].kind, FaultKind::FallenOffBus);
    }

    #[test]
    fn lines_that_are_not_faults_yield_nothing() {
        for line in [
            // follow-up lines of a fault (same sources as above)
            "[   87.473112] NVRM: GPU 0000:01:00.0: rm_init_adapter failed, device minor number 0",
            "[   21.238209] NVRM: RmInitAdapter: osInitNvMapping failed, bailing out of RmInitAdapter",
            "[   21.238204] NVRM: osInitNvMapping: *** Cannot attach gpu",
            // ordinary driver chatter
            "[    2.329368] NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  595.71.05  Release Build  (root@)",
            "[  365.969676] NVRM: GPU at PCI:0000:01:00: GPU-4e391288-897c-ba5d-6944-dfbea55ebcfa",
            "[  365.969680] NVRM: GPU Board Serial Number: 0",
            "NVRM: No NVIDIA GPU found.",
            "[   26.485239] nvidia 0000:01:00.0: not ready 8191ms after resume; waiting",
            "[    2.819204] pci 0000:01:00.0: [10de:2204] type 00 class 0x030000 PCIe Legacy Endpoint",
            // the other direction is not a fault
            "vfio-pci 0000:01:00.0: Unable to change power state from D0 to D3hot",
            // Xid mentioned outside the driver, and malformed Xid lines
            "grep Xid /var/log/syslog: 79 matches",
            "NVRM: Xid (PCI:0000:zz:00): 79, bad bus",
            "NVRM: Xid (PCI:0000:01:00): seventy-nine, GPU has fallen off the bus.",
            "NVRM: Xid",
            "",
        ] {
            assert_eq!(classify_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn xid_154_follows_the_recovery_the_driver_names() {
        let f = one(
            "NVRM: Xid (PCI:0000:01:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)",
        );
        assert_eq!(f.action, Action::RebootHost);
        let f = one(
            "NVRM: Xid (PCI:0000:01:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
        );
        assert_eq!(f.action, Action::ResetGpu);
    }

    #[test]
    fn guest_lines_round_trip_and_are_not_counted_twice() {
        let raw = "[  12.1] NVRM: Xid (PCI:0000:00:05): 79, pid=1, GPU has fallen off the bus.";
        let f = one(raw);
        let line = f.line();
        assert!(line.starts_with("GPU-XID {"), "{line}");
        assert_eq!(Fault::from_line(&format!("12.30 {line}")), Some(f.clone()));
        // The console shows the kernel's line, then the guest init's: one fault.
        assert_eq!(scan(&format!("{raw}\n{line}\n")), vec![f.clone()]);
        // A GPU-XID line alone (kernel line not on the console at this log level) counts.
        assert_eq!(scan(&format!("{line}\n")), vec![f]);
    }

    #[test]
    fn addresses_normalise_or_are_refused() {
        assert_eq!(full_address("0000:0A:00").as_deref(), Some("0000:0a:00.0"));
        assert_eq!(
            full_address("0000:01:00.1").as_deref(),
            Some("0000:01:00.1")
        );
        assert_eq!(full_address("01:00.0").as_deref(), Some("0000:01:00.0"));
        assert_eq!(full_address("0000:01:20.0"), None);
        assert_eq!(full_address("0000:01:00.9"), None);
        assert_eq!(full_address("01:00"), None);
    }
}
