//! `outcome`: what kind of failure an error is, decided once for every front end.
//!
//! A script needs to tell "a safety rule said no, nothing changed" from "an artifact failed
//! verification, a reviewer must look" from "something broke on the way". The CLI maps these to
//! exit codes, a control plane to API statuses; the rule of which error is which lives here, next
//! to the errors, so the two never disagree.

use std::error::Error;

use crate::attach::{AttachError, OwnerError};
use crate::fetch::FetchError;
use crate::initrd::InitrdError;
use crate::pci::AddressError;
use crate::provision::ProvisionError;
use crate::versions::VersionsError;

/// The kind of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A safety rule or the request itself was refused; nothing was changed.
    Refused,
    /// An artifact failed verification (a digest, a size cap, an inspection).
    VerificationFailed,
    /// Anything else: I/O, network, a kernel that said no on the way.
    Failed,
}

/// The outcome of the first error in `err`'s chain that the library classifies.
pub fn outcome(err: &(dyn Error + 'static)) -> Outcome {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(o) = of(e) {
            return o;
        }
        cause = e.source();
    }
    Outcome::Failed
}

fn of(e: &(dyn Error + 'static)) -> Option<Outcome> {
    // `#[error(transparent)]` wrappers hide the wrapped error from the chain: look inside.
    if let Some(p) = e.downcast_ref::<ProvisionError>() {
        return match p {
            ProvisionError::Attach(a) => Some(attach(a)),
            ProvisionError::Layers { source, .. } => Some(initrd(source)),
            ProvisionError::NotVgpuGuest { .. } | ProvisionError::VgpuManagerMismatch { .. } => {
                Some(Outcome::Refused)
            }
            _ => None,
        };
    }
    if let Some(a) = e.downcast_ref::<AttachError>() {
        return Some(attach(a));
    }
    if let Some(i) = e.downcast_ref::<InitrdError>() {
        return Some(initrd(i));
    }
    if let Some(v) = e.downcast_ref::<VersionsError>() {
        return Some(if v.is_verification_failure() {
            Outcome::VerificationFailed
        } else if v.is_refusal() {
            Outcome::Refused
        } else {
            Outcome::Failed
        });
    }
    if let Some(f) = e.downcast_ref::<FetchError>() {
        return Some(fetch(f));
    }
    // A malformed address or owner is the request refused before anything was looked at.
    if e.downcast_ref::<AddressError>().is_some() || e.downcast_ref::<OwnerError>().is_some() {
        return Some(Outcome::Refused);
    }
    None
}

fn attach(a: &AttachError) -> Outcome {
    if a.is_refusal() {
        Outcome::Refused
    } else {
        Outcome::Failed
    }
}

fn initrd(i: &InitrdError) -> Outcome {
    if i.is_verification_failure() {
        Outcome::VerificationFailed
    } else if i.is_refusal() {
        Outcome::Refused
    } else {
        Outcome::Failed
    }
}

fn fetch(f: &FetchError) -> Outcome {
    match f {
        FetchError::DigestMismatch { .. } | FetchError::SizeCap { .. } => {
            Outcome::VerificationFailed
        }
        FetchError::Unpinned { .. } => Outcome::Refused,
        _ => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller's wrapper, as a front end adds context.
    #[derive(Debug, thiserror::Error)]
    #[error("attach")]
    struct Context(#[source] AttachError);

    #[test]
    fn a_refusal_stays_a_refusal_under_context() {
        let err = Context(AttachError::NothingRequested);
        assert_eq!(outcome(&err), Outcome::Refused);
        let corrupt = crate::attach::JournalError::Corrupt {
            path: "journal.json".into(),
            detail: "truncated".into(),
        };
        let err = Context(AttachError::Journal(corrupt));
        assert_eq!(outcome(&err), Outcome::Failed);
    }

    #[test]
    fn a_provisioning_failure_is_classified_by_what_is_inside() {
        let err = ProvisionError::Attach(AttachError::NothingRequested);
        assert_eq!(outcome(&err), Outcome::Refused);
        let io = std::io::Error::other("disk full");
        let err = ProvisionError::Layers {
            release: "r".into(),
            source: InitrdError::Io {
                context: "writing".into(),
                source: io,
            },
        };
        assert_eq!(outcome(&err), Outcome::Failed);
    }

    #[test]
    fn a_bad_address_is_refused_and_unknown_errors_failed() {
        let bad = "zz:zz".parse::<crate::pci::PciAddress>().unwrap_err();
        assert_eq!(outcome(&bad), Outcome::Refused);
        assert_eq!(outcome(&std::io::Error::other("x")), Outcome::Failed);
    }
}
