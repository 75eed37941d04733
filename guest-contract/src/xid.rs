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

use std::collections::{HashMap, VecDeque};
use std::fmt;

use memchr::memmem;
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
        // The message is the guest's text: no control character reaches a terminal.
        write!(
            f,
            "  action {}  {}",
            self.action,
            crate::printable::escape_control(&self.message)
        )
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
                    message: bounded(msg.trim_end_matches('.')),
                    action: Action::ResetGpu,
                });
            }
            // Older drivers: `GPU at 0000:01:00.0 has fallen off the bus.`
            if let Some(rest) = msg.strip_prefix("GPU at ")
                && let Some((addr, words)) = rest.split_once(' ')
                && words.starts_with("has fallen off the bus")
            {
                self.pending_gpu = None;
                return Some(Fault {
                    address: full_address(addr),
                    kind: FaultKind::FallenOffBus,
                    xid: None,
                    message: bounded(words.trim_end_matches('.')),
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

/// Every distinct fault in a log, in the order first seen (see [`Scanner`]).
pub fn scan(text: &str) -> Vec<Fault> {
    let mut s = Scanner::default();
    s.feed(text.as_bytes());
    s.finish().faults.into_iter().map(|f| f.fault).collect()
}

/// Bytes of a line the scanner looks at; the rest of a longer line is counted, never kept.
pub const MAX_LINE: usize = 4096;
/// Bytes of a fault's message kept (the driver's own messages are far shorter).
pub const MAX_MESSAGE: usize = 512;
/// Distinct faults one scan keeps; occurrences of further distinct faults are only counted.
pub const MAX_DISTINCT: usize = 1024;
/// Kernel faults a `GPU-XID` line may repeat: the guest init prints its line right after the
/// kernel's, so only the last few are remembered.
const RECENT_KERNEL_FAULTS: usize = 16;
/// What makes a line worth classifying: every fault line contains one of these.
const MARKERS: [&str; 3] = ["NVRM", XID_PREFIX, "power state"];

/// What a scan read, in counts only, so that a hostile console costs no memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanStats {
    /// Bytes read.
    pub bytes: u64,
    /// Lines read (a last line without a newline included).
    pub lines: u64,
    /// Lines longer than [`MAX_LINE`]: only their first [`MAX_LINE`] bytes were looked at.
    pub long_lines: u64,
    /// The bytes of those lines past [`MAX_LINE`], skipped unread by the classifier.
    pub skipped_bytes: u64,
    /// Fault occurrences (a `GPU-XID` line repeating the kernel's line just before is not
    /// counted again).
    pub occurrences: u64,
    /// Occurrences of distinct faults beyond [`MAX_DISTINCT`], counted but not kept.
    pub occurrences_not_kept: u64,
    /// `GPU-XID` lines the host did not take: unparseable, or claiming a host-side kind.
    pub guest_lines_refused: u64,
    /// Marker lines stamped with a wall-clock time outside the lifetime the scan was given
    /// ([`Scanner::within`]): not classified.
    #[serde(default)]
    pub outside_lifetime: u64,
}

/// One distinct fault and how often the log had it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenFault {
    /// The fault.
    #[serde(flatten)]
    pub fault: Fault,
    /// How many times.
    pub count: u64,
}

/// `COUNTx  FAULT`.
impl fmt::Display for SeenFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x  {}", self.count, self.fault)
    }
}

/// What a [`Scanner`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanReport {
    /// Distinct faults, in the order first seen, at most [`MAX_DISTINCT`].
    pub faults: Vec<SeenFault>,
    /// What was read.
    pub stats: ScanStats,
}

/// A summary line, then one line per distinct fault.
impl fmt::Display for ScanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(
            f,
            "{} fault lines ({} distinct, {} beyond the cap of {MAX_DISTINCT} not kept) in {} lines, {} bytes; {} lines over {MAX_LINE} bytes ({} bytes skipped); {} GPU-XID lines refused",
            s.occurrences,
            self.faults.len(),
            s.occurrences_not_kept,
            s.lines,
            s.bytes,
            s.long_lines,
            s.skipped_bytes,
            s.guest_lines_refused
        )?;
        self.faults.iter().try_for_each(|x| writeln!(f, "{x}"))
    }
}

/// Scans a log as it streams in, in memory bounded by [`MAX_LINE`] and [`MAX_DISTINCT`] and in
/// time linear in its size: only lines containing a marker (`NVRM`, `GPU-XID `, `power state`)
/// are classified, found by one forward search per marker over each chunk.
///
/// `GPU-XID` lines of the guest init count, read by the host's rules ([`host_view`]: the
/// guest's `action` is never taken); one that repeats a kernel line just before it (the console
/// shows both) is not counted twice.
#[derive(Debug, Clone)]
pub struct Scanner {
    classifier: Classifier,
    faults: Vec<SeenFault>,
    index: HashMap<Fault, usize>,
    /// Kernel faults not yet repeated by a `GPU-XID` line, newest last.
    recent_kernel: VecDeque<usize>,
    stats: ScanStats,
    /// The first [`MAX_LINE`] bytes of a line that began in an earlier chunk.
    carry: Vec<u8>,
    /// The length of that line so far (0: no line carried).
    carry_len: u64,
    /// The number of the last line given to the classifier (for multi-line messages).
    last_classified: Option<u64>,
    finders: [memmem::Finder<'static>; 3],
    /// What a line's text came to (`None`: no fault, or a refused `GPU-XID` line).
    memo: HashMap<Box<str>, Option<Seen>>,
    /// Unix seconds from and until which lines count (see [`Scanner::within`]).
    lifetime: Option<(u64, Option<u64>)>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            classifier: Classifier::new(),
            faults: Vec::new(),
            index: HashMap::new(),
            recent_kernel: VecDeque::new(),
            stats: ScanStats::default(),
            carry: Vec::new(),
            carry_len: 0,
            last_classified: None,
            finders: MARKERS.map(memmem::Finder::new),
            memo: HashMap::new(),
            lifetime: None,
        }
    }
}

impl Scanner {
    /// A scanner that skips lines stamped with a wall-clock time (RFC 3339 at the line's start,
    /// as `dmesg --time-format iso` or `journalctl -o short-iso` print it) before `since` or
    /// after `until` (Unix seconds): a fault outside an attachment's lifetime is not about it.
    /// Lines stamped only with the guest kernel's uptime cannot be placed and count.
    pub fn within(since: u64, until: Option<u64>) -> Scanner {
        Scanner {
            lifetime: Some((since, until)),
            ..Scanner::default()
        }
    }

    /// Feed the next bytes of the log (any chunking; lines may span chunks).
    pub fn feed(&mut self, chunk: &[u8]) {
        self.stats.bytes += chunk.len() as u64;
        // The next occurrence of each marker at or after the current line's start; each only
        // moves forward, so the chunk is searched once per marker.
        let mut next = [0usize; 3];
        self.advance(chunk, &mut next, 0);
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', chunk) {
            let piece = &chunk[start..end];
            if self.carry_len > 0 || !self.carry.is_empty() {
                self.extend_carry(piece);
                self.end_carried_line();
            } else {
                self.stats.lines += 1;
                self.note_length(piece.len() as u64);
                if next.iter().any(|&p| p < end) {
                    let kept = &piece[..piece.len().min(MAX_LINE)];
                    self.line(kept);
                }
            }
            start = end + 1;
            self.advance(chunk, &mut next, start);
        }
        if start < chunk.len() {
            self.extend_carry(&chunk[start..]);
        }
    }

    /// The faults found.
    pub fn finish(mut self) -> ScanReport {
        if self.carry_len > 0 {
            self.end_carried_line();
        }
        ScanReport {
            faults: self.faults,
            stats: self.stats,
        }
    }

    fn advance(&self, chunk: &[u8], next: &mut [usize; 3], from: usize) {
        for (i, p) in next.iter_mut().enumerate() {
            if from == 0 || *p < from {
                *p = self.finders[i]
                    .find(&chunk[from.min(chunk.len())..])
                    .map_or(usize::MAX, |at| at + from);
            }
        }
    }

    fn extend_carry(&mut self, piece: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.carry.len());
        self.carry
            .extend_from_slice(&piece[..piece.len().min(room)]);
        self.carry_len += piece.len() as u64;
    }

    fn end_carried_line(&mut self) {
        self.stats.lines += 1;
        self.note_length(self.carry_len);
        let carried = std::mem::take(&mut self.carry);
        if MARKERS
            .iter()
            .any(|m| memmem::find(&carried, m.as_bytes()).is_some())
        {
            self.line(&carried);
        }
        self.carry = carried;
        self.carry.clear();
        self.carry_len = 0;
    }

    fn note_length(&mut self, len: u64) {
        if len > MAX_LINE as u64 {
            self.stats.long_lines += 1;
            self.stats.skipped_bytes += len - MAX_LINE as u64;
        }
    }

    /// Classify line number `stats.lines` (its first [`MAX_LINE`] bytes).
    fn line(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\r');
        let number = self.stats.lines;
        if let (Some((since, until)), Some(at)) = (self.lifetime, wall_time(text))
            && (at < since || until.is_some_and(|u| at > u))
        {
            self.stats.outside_lifetime += 1;
            return;
        }
        if let Some(at) = text.find(XID_PREFIX) {
            // Only the JSON after the prefix matters: a repeated line is read once.
            let key = &text[at..];
            let seen = match self.memo.get(key) {
                Some(&seen) => seen,
                None => {
                    let seen = Fault::from_line(key)
                        .as_ref()
                        .and_then(host_view)
                        .map(|f| self.intern(f));
                    self.remember(key, seen);
                    seen
                }
            };
            match seen {
                None => self.stats.guest_lines_refused += 1,
                Some(seen) => {
                    let repeat = match seen {
                        Seen::Kept(i) => self.recent_kernel.iter().position(|&k| k == i),
                        Seen::NotKept => None,
                    };
                    match repeat {
                        Some(pos) => {
                            self.recent_kernel.remove(pos);
                        }
                        None => self.occur(seen),
                    }
                }
            }
            return;
        }
        // A multi-line message is consecutive lines: anything between forgets it.
        if self.last_classified.is_none_or(|n| n + 1 != number) {
            self.classifier = Classifier::new();
        }
        self.last_classified = Some(number);
        // An Xid or `GPU DDDD:...` line of the driver depends on its message alone and ends any
        // multi-line message: a repeated one is read once.
        let stateless = nvrm_message(text).filter(|m| {
            m.starts_with("Xid ") || (m.starts_with("GPU ") && !m.starts_with("GPU at "))
        });
        let seen = match stateless.map(|m| (m, self.memo.get(m).copied())) {
            Some((_, Some(seen))) => {
                self.classifier = Classifier::new();
                seen
            }
            Some((m, None)) => {
                let seen = self.classifier.feed(text).map(|f| self.intern(f));
                self.remember(m, seen);
                seen
            }
            None => self.classifier.feed(text).map(|f| self.intern(f)),
        };
        if let Some(seen) = seen {
            self.occur(seen);
            if let Seen::Kept(i) = seen {
                if self.recent_kernel.len() == RECENT_KERNEL_FAULTS {
                    self.recent_kernel.pop_front();
                }
                self.recent_kernel.push_back(i);
            }
        }
    }

    /// Remember what a line's `key` came to, if the key is short; the memory is bounded.
    fn remember(&mut self, key: &str, seen: Option<Seen>) {
        if key.len() > MEMO_KEY {
            return;
        }
        if self.memo.len() >= MEMO_ENTRIES {
            self.memo.clear();
        }
        self.memo.insert(key.into(), seen);
    }

    /// The distinct fault `f` is, kept if there is room.
    fn intern(&mut self, f: Fault) -> Seen {
        if let Some(&i) = self.index.get(&f) {
            return Seen::Kept(i);
        }
        if self.faults.len() >= MAX_DISTINCT {
            return Seen::NotKept;
        }
        let i = self.faults.len();
        self.index.insert(f.clone(), i);
        self.faults.push(SeenFault { fault: f, count: 0 });
        Seen::Kept(i)
    }

    /// Count one occurrence.
    fn occur(&mut self, seen: Seen) {
        self.stats.occurrences += 1;
        match seen {
            Seen::Kept(i) => self.faults[i].count += 1,
            Seen::NotKept => self.stats.occurrences_not_kept += 1,
        }
    }
}

/// The Unix time (seconds) of an RFC 3339 stamp at the start of `line`
/// (`2026-12-07T13:42:10[.,fraction](Z|+hh:mm|+hhmm)`), if it has one.
pub fn wall_time(line: &str) -> Option<u64> {
    let b = line.trim_start().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0i64, |a, c| a * 10 + i64::from(c - b'0')))
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-')
        && sep(7, b'-')
        && (sep(10, b'T') || sep(10, b' '))
        && sep(13, b':')
        && sep(16, b':'))
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if matches!(b.get(i), Some(b'.' | b',')) {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        sign @ (b'+' | b'-') => {
            let oh = num(i + 1..i + 3)?;
            let om = if sep(i + 3, b':') {
                num(i + 4..i + 6)?
            } else {
                num(i + 3..i + 5)?
            };
            let o = oh * 3600 + om * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec - offset).ok()
}

/// A distinct fault of a scan: its index among those kept, or beyond the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Kept(usize),
    NotKept,
}

/// Lines remembered by their text (so a repeated line is classified once), and the longest
/// text remembered: together at most 1 MiB.
const MEMO_ENTRIES: usize = 4096;
const MEMO_KEY: usize = 256;

/// The host's reading of a guest init's `GPU-XID` fault: what the guest chose (its `action`,
/// and its `kind` where the text says otherwise) is not taken; the kernel's line is rebuilt
/// from the reported address, number and message and classified by the host's own rules, as if
/// the host had read it. `None` for what the host would not have classified so, and for the
/// host-side kinds (a guest cannot report the host's verification).
pub fn host_view(guest: &Fault) -> Option<Fault> {
    let address = match guest.address.as_deref() {
        Some(a) => Some(full_address(a)?),
        None => None,
    };
    let message = bounded(&guest.message);
    match guest.kind {
        FaultKind::Xid | FaultKind::GspTimeout | FaultKind::GspError => {
            classify_xid(&format!("(PCI:{}): {}, {message}", address?, guest.xid?))
        }
        FaultKind::InitFailed => classify_nvrm(&match &address {
            Some(a) => format!("GPU {a}: {message}"),
            None => message,
        })
        .filter(|f| f.kind == FaultKind::InitFailed),
        FaultKind::PowerState => {
            classify_power_state(&format!("pci {}: {message}", address.as_deref()?))
        }
        FaultKind::FallenOffBus => {
            let fallen = message.contains("fallen off the bus");
            fallen.then_some(Fault {
                address,
                kind: FaultKind::FallenOffBus,
                xid: None,
                message,
                action: Action::ResetGpu,
            })
        }
        FaultKind::VerifyFailed | FaultKind::ResetFailed => None,
    }
}

/// At most [`MAX_MESSAGE`] bytes of `s`, cut at a character boundary.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_MESSAGE);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
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
            message: bounded(&msg[at..]),
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
        message: bounded(message.trim_end_matches('.')),
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

/// The PCI core's words for a device that cannot leave a low-power state, one per wording of
/// the kernels in service (all from `drivers/pci/pci.c`; the prefix is the driver holding the
/// device: `nvidia`, `vfio-pci`, `pci` when none):
const POWER_STATE_FAILURES: [&str; 3] = [
    // v6.0 and later, `pci_power_up()`:
    // "Unable to change power state from %s to D0, device inaccessible".
    "Unable to change power state from D3",
    // v4.x to v5.19, `pci_raw_set_power_state()`:
    // "can't change power state from %s to %s (config space inaccessible)".
    "can't change power state from D3",
    // Before v5.19, `pci_raw_set_power_state()` when the device stays put after the write:
    // "Refused to change power state, currently in D%d".
    "Refused to change power state, currently in D3",
];

/// `nvidia 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible`
/// and the other wordings of [`POWER_STATE_FAILURES`].
fn classify_power_state(line: &str) -> Option<Fault> {
    let at = POWER_STATE_FAILURES
        .iter()
        .find_map(|words| line.find(words))?;
    let address = line[..at]
        .trim_end()
        .strip_suffix(':')
        .and_then(|p| p.split_whitespace().last())
        .and_then(full_address);
    Some(Fault {
        address,
        kind: FaultKind::PowerState,
        xid: None,
        message: bounded(line[at..].trim()),
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
    fn every_wording_of_the_power_state_failure_is_classified() {
        // Each wording of drivers/pci/pci.c that kernels in service print, with each driver
        // prefix, from real logs:
        for (line, address) in [
            // v6.0+ pci_power_up(), prefix `nvidia`: bryansteiner/gpu-passthrough-tutorial
            // issue #39.
            (
                "[   87.412759] nvidia 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible",
                "0000:01:00.0",
            ),
            // v6.0+ pci_power_up(), prefix `vfio-pci`: kata-containers/kata-containers issue
            // #11708 (host dmesg after cold-plugging a GPU repeatedly).
            (
                "[586739.359281] vfio-pci 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible",
                "0000:01:00.0",
            ),
            // v6.0+ from D3hot: clearlinux/distribution issue #3291 (journalctl, prefix
            // `pcieport`).
            (
                "Mar 26 12:24:25 DadsGram kernel: pcieport 0000:03:02.0: Unable to change power state from D3hot to D0, device inaccessible",
                "0000:03:02.0",
            ),
            // v4.x-v5.19 pci_raw_set_power_state(), prefix `pci` (no driver bound): a
            // linux-pci list report of a dock unplugged in s2idle (the mail wrapped the line).
            (
                "[  316.876997] pci 0000:01:00.0: can't change power state from D3cold to D0 (config space inaccessible)",
                "0000:01:00.0",
            ),
            // The same wording with prefix `pcieport`: a linux-pci list report (lockdep
            // warning on a Thunderbolt dock unplug, 5.16-rc2).
            (
                "[   28.583995] pcieport 0000:09:04.0: can't change power state from D3cold to D0 (config space inaccessible)",
                "0000:09:04.0",
            ),
            // Before v5.19 pci_raw_set_power_state(), prefix `nvidia`: a Kubuntu forum thread
            // ("bumblebee stopped working after upgrade to Saucy", kernel 3.11 kern.log).
            (
                "Nov 28 05:14:09 knubuntu kernel: [  478.451301] nvidia 0000:01:00.0: Refused to change power state, currently in D3",
                "0000:01:00.0",
            ),
        ] {
            let f = one(line);
            assert_eq!(f.kind, FaultKind::PowerState, "{line}");
            assert_eq!(f.action, Action::ResetGpu, "{line}");
            assert_eq!(f.address.as_deref(), Some(address), "{line}");
        }
        // Going into a low-power state is not the fault (vfio-pci idling a device), in either
        // wording.
        for line in [
            "[ 210.762732] vfio-pci 0000:01:00.0: can't change power state from D0 to D3hot (config space inaccessible)",
            "nvidia 0000:01:00.0: power state changed by ACPI to D0",
        ] {
            assert_eq!(classify_line(line), None, "{line}");
        }
    }

    #[test]
    fn older_drivers_one_line_fallen_off_the_bus_is_classified() {
        // The Kubuntu forum thread above (driver 304.88).
        let f = one(
            "Nov 28 05:12:36 knubuntu kernel: [  384.708185] NVRM: GPU at 0000:01:00.0 has fallen off the bus.",
        );
        assert_eq!(f.kind, FaultKind::FallenOffBus);
        assert_eq!(f.address.as_deref(), Some("0000:01:00.0"));
    }

    #[test]
    fn the_guests_action_is_never_taken() {
        // An application fault the guest calls a reboot: the host reads Xid 13 as what it is.
        let forged = r#"GPU-XID {"address":"0000:00:05.0","kind":"xid","xid":13,"message":"Graphics Exception","action":"reboot_host"}"#;
        let faults = scan(forged);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(faults[0].action, Action::None);
        // And the other way round: Xid 79 called harmless still needs a reset.
        let quiet = r#"GPU-XID {"address":"0000:00:05.0","kind":"xid","xid":79,"message":"GPU has fallen off the bus","action":"none"}"#;
        assert_eq!(scan(quiet)[0].action, Action::ResetGpu);
        // A kind that says otherwise than its number is the number's.
        let f: Fault = serde_json::from_str(
            r#"{"address":"0000:00:05.0","kind":"xid","xid":119,"message":"Timeout","action":"none"}"#,
        )
        .unwrap();
        assert_eq!(host_view(&f).unwrap().kind, FaultKind::GspTimeout);
        // Host-side kinds and malformed addresses are refused.
        let mut report = Scanner::default();
        report.feed(br#"GPU-XID {"address":"0000:00:05.0","kind":"verify_failed","xid":null,"message":"x","action":"reset_gpu"}
GPU-XID {"address":"nonsense","kind":"xid","xid":79,"message":"x","action":"reset_gpu"}
GPU-XID {"kind":
"#);
        let report = report.finish();
        assert!(report.faults.is_empty(), "{report:?}");
        assert_eq!(report.stats.guest_lines_refused, 3);
    }

    #[test]
    fn a_faults_message_is_printed_escaped() {
        let f = Fault::from_line(
            r#"GPU-XID {"address":"0000:00:05.0","kind":"xid","xid":79,"message":"\u001b]0;owned\u0007\u001b[2J","action":"reset_gpu"}"#,
        )
        .unwrap();
        let shown = host_view(&f).unwrap().to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("\\x1b]0;owned\\x07\\x1b[2J"), "{shown}");
    }

    #[test]
    fn a_long_line_is_counted_not_kept() {
        let mut s = Scanner::default();
        // 10 MiB without a newline, fed in pieces, with a fault line past the cap.
        let filler = vec![b'A'; 1 << 20];
        for _ in 0..10 {
            s.feed(&filler);
        }
        let hidden = b" NVRM: Xid (PCI:0000:01:00): 79, pid=1, GPU has fallen off the bus.";
        s.feed(hidden);
        assert!(s.carry.len() <= MAX_LINE, "the carried line is capped");
        s.feed(b"\nNVRM: Xid (PCI:0000:01:00): 48, pid=1, DBE\n");
        let report = s.finish();
        assert_eq!(report.stats.lines, 2);
        assert_eq!(report.stats.long_lines, 1);
        let long = 10 * (1u64 << 20) + hidden.len() as u64;
        assert_eq!(report.stats.skipped_bytes, long - MAX_LINE as u64);
        let xids: Vec<_> = report.faults.iter().map(|f| f.fault.xid).collect();
        assert_eq!(xids, [Some(48)], "the Xid past the cap is not read");
    }

    #[test]
    fn lines_split_anywhere_across_chunks_are_read_once() {
        let text = "boot\n[ 1.0] NVRM: Xid (PCI:0000:02:00): 79, pid=1, GPU has fallen off the bus.\nx\n[ 2.0] nvidia 0000:02:00.0: Unable to change power state from D3cold to D0, device inaccessible\n";
        let whole = scan(text);
        assert_eq!(whole.len(), 2);
        for size in 1..text.len() {
            let mut s = Scanner::default();
            text.as_bytes().chunks(size).for_each(|c| s.feed(c));
            let report = s.finish();
            let faults: Vec<Fault> = report.faults.into_iter().map(|f| f.fault).collect();
            assert_eq!(faults, whole, "chunks of {size}");
            assert_eq!(report.stats.lines, 4, "chunks of {size}");
        }
    }

    #[test]
    fn distinct_faults_are_capped_and_repeats_counted() {
        let mut text = String::new();
        for pid in 0..(MAX_DISTINCT + 10) {
            text.push_str(&format!(
                "NVRM: Xid (PCI:0000:01:00): 79, pid={pid}, GPU has fallen off the bus.\n"
            ));
        }
        text.push_str("NVRM: Xid (PCI:0000:01:00): 79, pid=0, GPU has fallen off the bus.\n");
        let mut s = Scanner::default();
        s.feed(text.as_bytes());
        let report = s.finish();
        assert_eq!(report.faults.len(), MAX_DISTINCT);
        assert_eq!(report.faults[0].count, 2);
        assert_eq!(report.stats.occurrences, MAX_DISTINCT as u64 + 11);
        assert_eq!(report.stats.occurrences_not_kept, 10);
        // A GPU-XID line repeating an old kernel fault (not among the recent ones) counts.
        let f = one("NVRM: Xid (PCI:0000:01:00): 79, pid=0, GPU has fallen off the bus.");
        let mut s = Scanner::default();
        s.feed(format!("{}\n{}\n", f.line(), f.line()).as_bytes());
        assert_eq!(s.finish().faults[0].count, 2);
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

    #[test]
    fn wall_clock_stamps_parse_in_each_iso_form() {
        // 2026-12-07T13:42:10Z is 1796650930 (Python's calendar.timegm).
        for stamp in [
            "2026-12-07T13:42:10Z",
            "2026-12-07T13:42:10.5Z",
            "2026-12-07T14:42:10,123456+01:00",
            "2026-12-07T08:42:10-0500",
            "  2026-12-07 13:42:10+00:00",
        ] {
            assert_eq!(
                wall_time(&format!("{stamp} kernel: x")),
                Some(1_796_650_930),
                "{stamp}"
            );
        }
        assert_eq!(wall_time("2024-03-01T00:59:59+02:00"), Some(1_709_247_599));
        for none in [
            "[  42.000000] NVRM: Xid",
            "2026-12-07T13:42:10",
            "2026-13-07T13:42:10Z",
            "x",
        ] {
            assert_eq!(wall_time(none), None, "{none}");
        }
    }

    #[test]
    fn lines_stamped_outside_the_lifetime_are_skipped_and_counted() {
        let xid = "NVRM: Xid (PCI:0000:01:00): 79, pid=0, GPU has fallen off the bus.";
        let mut s = Scanner::within(1_796_650_930, Some(1_796_650_990));
        s.feed(
            format!(
                "2026-12-07T13:42:09Z {xid}\n2026-12-07T13:42:10Z {xid}\n[ 9.0] {xid}\n2026-12-07T13:43:11Z {xid}\n"
            )
            .as_bytes(),
        );
        let r = s.finish();
        assert_eq!(r.stats.outside_lifetime, 2, "{:?}", r.stats);
        assert_eq!(r.faults[0].count, 2);
    }
}
