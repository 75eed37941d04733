//! What wakes the plugin between its slow safety-net polls: the kernel's uevents for PCI, VFIO
//! and IOMMU devices (a driver bound or unbound, a device or group added or removed), and
//! inotify on the VFIO device directory (a group's node or a cdev appearing or vanishing) and
//! on the kubelet's plugin directory (a restarting kubelet removes every socket and makes a new
//! `kubelet.sock`). Each only says "look again": the scan that follows reads sysfs, the journal
//! and the devices directory as the poll does, so a lost or spurious event costs at most a poll
//! period or one scan.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use inotify::{Inotify, WatchMask};
use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recvfrom, setsockopt,
    socket, sockopt,
};
use tokio::io::unix::AsyncFd;
use tokio_stream::StreamExt;

/// The kernel's uevent multicast group (udev's own re-broadcasts are on group 2).
const KERNEL_GROUP: u32 = 1;
/// Room for a burst of uevents (a hot-plugged switch's devices) before the kernel drops some.
const RECEIVE_BUFFER: usize = 1 << 20;
/// Subsystems whose uevents can change a served device's health.
const SUBSYSTEMS: [&str; 5] = ["pci", "vfio", "vfio-dev", "iommu", "mdev"];

/// Whether a kernel uevent (`ACTION@DEVPATH\0KEY=VALUE\0...`) is about a subsystem whose
/// devices the plugin serves.
pub fn relevant_uevent(message: &[u8]) -> bool {
    message
        .split(|b| *b == 0)
        .skip(1)
        .filter_map(|field| field.strip_prefix(b"SUBSYSTEM="))
        .any(|s| SUBSYSTEMS.iter().any(|want| want.as_bytes() == s))
}

/// Where an event that woke a scan came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// A kernel uevent (bind, unbind, add, remove of a PCI, VFIO, IOMMU or mdev device).
    Uevent,
    /// An entry changed in `/dev/vfio`, `/dev/vfio/devices`, `/dev` or the plugin directory.
    Inotify,
}

impl EventSource {
    /// Its name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Uevent => "uevent",
            EventSource::Inotify => "inotify",
        }
    }
}

/// What is told of each relevant event.
pub(crate) type OnEvent = Arc<dyn Fn(EventSource) + Send + Sync>;

/// Start watching; `on_event` is called for each relevant event. A source that cannot be
/// opened (no netlink in this network namespace, no inotify) is reported and left to the poll.
pub(crate) fn spawn(dev_dir: &Path, plugin_dir: &Path, on_event: OnEvent) -> Watchers {
    let mut tasks = Vec::new();
    match uevent_socket() {
        Ok(fd) => tasks.push(tokio::spawn(uevents(fd, on_event.clone()))),
        Err(e) => tracing::warn!(
            "no kernel uevents ({e}); driver changes are seen at the next poll (run the plugin in \
             the host's network namespace: hostNetwork: true)"
        ),
    }
    match watch_dirs(dev_dir, plugin_dir) {
        Ok(w) => tasks.push(tokio::spawn(inotify_events(w, on_event))),
        Err(e) => tracing::warn!(
            "cannot watch {} and {} ({e}); VFIO node changes are seen at the next poll",
            dev_dir.display(),
            plugin_dir.display()
        ),
    }
    Watchers(tasks)
}

/// The running watchers; dropping them stops them.
pub(crate) struct Watchers(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

fn uevent_socket() -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    // A smaller buffer than asked for only means more "look again" on overflow.
    let _ = setsockopt(&fd, sockopt::RcvBuf, &RECEIVE_BUFFER);
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
    Ok(fd)
}

/// The socket registered with the runtime, to be woken when a uevent arrives.
#[allow(unsafe_code)]
fn readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that stays open, always the same one, until the
    // `AsyncFd` that owns it drops it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

async fn uevents(fd: OwnedFd, on_event: OnEvent) {
    let fd = match readable(fd) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("no kernel uevents: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(mut ready) = fd.readable().await else {
            return;
        };
        match ready
            .try_io(|fd| recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf).map_err(io::Error::from))
        {
            // Only the kernel (port 0) speaks for devices; anything else is ignored.
            Ok(Ok((n, from))) => {
                if from.is_some_and(|a| a.pid() == 0) && relevant_uevent(&buf[..n]) {
                    on_event(EventSource::Uevent);
                }
            }
            // Overflow: events were lost, so look again.
            Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                on_event(EventSource::Uevent)
            }
            Ok(Err(e)) => {
                tracing::warn!("kernel uevents: {e}; driver changes are seen at the next poll");
                return;
            }
            Err(_would_block) => {}
        }
    }
}

struct Watched {
    inotify: Inotify,
    dev_dir: PathBuf,
}

/// Changes of entries in a directory.
fn entry_changes() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ATTRIB
}

fn watch_dirs(dev_dir: &Path, plugin_dir: &Path) -> io::Result<Watched> {
    let inotify = Inotify::init()?;
    inotify.watches().add(plugin_dir, entry_changes())?;
    // The devices directory itself, for `vfio` (and `iommu`) appearing when a module loads.
    inotify
        .watches()
        .add(dev_dir, WatchMask::CREATE | WatchMask::DELETE)?;
    let w = Watched {
        inotify,
        dev_dir: dev_dir.to_owned(),
    };
    w.watch_vfio();
    Ok(w)
}

impl Watched {
    /// Watch `vfio/` and `vfio/devices/` where they exist (again after they were made).
    fn watch_vfio(&self) {
        for dir in [self.dev_dir.join("vfio"), self.dev_dir.join("vfio/devices")] {
            if dir.is_dir() {
                let _ = self.inotify.watches().add(&dir, entry_changes());
            }
        }
    }
}

async fn inotify_events(w: Watched, on_event: OnEvent) {
    let watches = w.inotify.watches();
    let mut stream = match w.inotify.into_event_stream(vec![0u8; 16 * 1024]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch the VFIO directory: {e}");
            return;
        }
    };
    let rewatch = |name: Option<&OsStr>| {
        if name.is_some_and(|n| n == "vfio" || n == "devices") {
            for dir in [w.dev_dir.join("vfio"), w.dev_dir.join("vfio/devices")] {
                if dir.is_dir() {
                    let _ = watches.clone().add(&dir, entry_changes());
                }
            }
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(e) => {
                rewatch(e.name.as_deref());
                on_event(EventSource::Inotify);
            }
            Err(e) => {
                tracing::warn!(
                    "watching the VFIO directory: {e}; changes are seen at the next poll"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uevents_of_served_subsystems_are_relevant() {
        let unbind = b"unbind@/devices/pci0000:00/0000:00:03.0\0ACTION=unbind\0DEVPATH=/devices/pci0000:00/0000:00:03.0\0SUBSYSTEM=pci\0DRIVER=vfio-pci\0SEQNUM=1\0";
        assert!(relevant_uevent(unbind));
        let group = b"remove@/devices/virtual/vfio/12\0ACTION=remove\0SUBSYSTEM=vfio\0";
        assert!(relevant_uevent(group));
        let tty = b"add@/devices/virtual/tty/ptmx\0ACTION=add\0SUBSYSTEM=tty\0";
        assert!(!relevant_uevent(tty));
        // The header line is not a field, whatever it says.
        assert!(!relevant_uevent(b"SUBSYSTEM=pci\0ACTION=add\0"));
        assert!(!relevant_uevent(b"add@/x\0SUBSYSTEM=pcie\0"));
    }
}
