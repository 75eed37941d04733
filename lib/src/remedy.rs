//! `remedy`: which of the caller's settings fixes an error. Library messages say what is wrong in
//! the library's terms; a front end names its own knob for it (the CLI a flag, a control plane an
//! API field), found here by walking the error's chain once.

use std::error::Error;

use crate::attach::{AttachError, JournalError, RefusalReason};
use crate::fetch::FetchError;
use crate::health::HealthError;
use crate::initrd::InitrdError;
use crate::pci::PciError;
use crate::registry::RegistryError;

/// A setting of the caller's that fixes an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remedy {
    /// Point the sysfs root at a sysfs tree.
    SysfsRoot,
    /// Use a writable state dir.
    StateDir,
    /// Use a writable cache dir with space.
    CacheDir,
    /// Name an existing registry file.
    RegistryFile,
    /// Name devices or a number of GPUs.
    NameDevices,
    /// Allow moving the boot display.
    AllowBootVga,
    /// Pin this release's artifacts.
    PinRelease(String),
    /// Run reconcile once the cause is fixed.
    Reconcile,
    /// Give the path of the static guest init.
    GuestInit,
    /// Declare an owner gone whose liveness cannot be judged, so reconcile releases it.
    DeclareGone,
}

/// The remedy for the first error in `err`'s chain that has one.
pub fn remedy(err: &(dyn Error + 'static)) -> Option<Remedy> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(r) = of(e) {
            return Some(r);
        }
        cause = e.source();
    }
    None
}

fn of(e: &(dyn Error + 'static)) -> Option<Remedy> {
    // `#[error(transparent)]` wrappers hide the wrapped error from the chain: look inside.
    let fetch = e.downcast_ref::<FetchError>().or(match e.downcast_ref() {
        Some(InitrdError::Fetch(f)) => Some(f),
        _ => None,
    });
    if let Some(f) = fetch {
        return match f {
            FetchError::Unpinned { release, .. } => Some(Remedy::PinRelease(release.clone())),
            FetchError::Cache { .. } => Some(Remedy::CacheDir),
            _ => None,
        };
    }
    if let Some(InitrdError::NoGuestInit { .. } | InitrdError::GuestInit { .. }) = e.downcast_ref()
    {
        return Some(Remedy::GuestInit);
    }
    if let Some(RegistryError::Read { .. }) = e.downcast_ref() {
        return Some(Remedy::RegistryFile);
    }
    let attach = e.downcast_ref::<AttachError>();
    if matches!(e.downcast_ref(), Some(PciError::Read { .. }))
        || matches!(attach, Some(AttachError::Pci(PciError::Read { .. })))
    {
        return Some(Remedy::SysfsRoot);
    }
    if matches!(e.downcast_ref(), Some(JournalError::Io { .. }))
        || matches!(attach, Some(AttachError::Journal(JournalError::Io { .. })))
        || matches!(e.downcast_ref(), Some(HealthError::Io { .. }))
        || matches!(attach, Some(AttachError::Health(HealthError::Io { .. })))
    {
        return Some(Remedy::StateDir);
    }
    match attach? {
        AttachError::NothingRequested => Some(Remedy::NameDevices),
        AttachError::RollbackFailed { .. } => Some(Remedy::Reconcile),
        AttachError::Refused(refusals)
            if refusals.iter().any(|r| r.reason == RefusalReason::BootVga) =>
        {
            Some(Remedy::AllowBootVga)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remedy_is_found_below_a_wrapper() {
        let pci = PciError::Read {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(remedy(&AttachError::Pci(pci)), Some(Remedy::SysfsRoot));
        let unpinned = FetchError::Unpinned {
            release: "r1".into(),
            kind: crate::registry::ArtifactKind::Kernel,
            arch: crate::registry::Arch::X86_64,
        };
        assert_eq!(
            remedy(&InitrdError::Fetch(unpinned)),
            Some(Remedy::PinRelease("r1".into()))
        );
        assert_eq!(
            remedy(&AttachError::NotAttached(
                crate::attach::Owner::new("a").unwrap()
            )),
            None
        );
    }
}
