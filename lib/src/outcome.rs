//! `outcome`: what kind of failure an error (or a report) is, decided once for every front end.
//!
//! A script needs to tell "a safety rule said no, nothing changed" from "an artifact failed
//! verification, a reviewer must look" from "something broke on the way". The CLI maps these to
//! exit codes, a control plane to API statuses; the rule of which error is which lives here, next
//! to the errors, so the two never disagree. Some answers come back as a report rather than an
//! error (a plan with refusals, a doctor's failed check): [`ReportOutcome`] judges those.

use std::error::Error;

use crate::attach::{
    AttachError, CheckStatus, DoctorReport, HealthCheck, OwnerError, Plan, ReconcileReport,
    RefusalReason,
};
use crate::fetch::FetchError;
use crate::initrd::InitrdError;
use crate::pci::AddressError;
use crate::provision::ProvisionError;
use crate::remedy::Remedy;
use crate::versions::{Verdict, VersionsError};

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
    /// The host is not ready for passthrough (a readiness check failed). Only a report says
    /// this ([`DoctorReport`]); no error is classified so.
    NotReady,
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
            ProvisionError::NotVgpuGuest { .. }
            | ProvisionError::VgpuManagerMismatch { .. }
            | ProvisionError::DiskWithoutRelease => Some(Outcome::Refused),
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
    if let Some(b) = e.downcast_ref::<crate::versions::build::BuildError>() {
        return Some(b.outcome());
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

/// What a report that came back `Ok` says about the request: a plan can hold refusals, a
/// reconcile can have failed on some devices, a reset's verification can have failed. A front
/// end turns it into its status the same way as an error's [`outcome`].
pub trait ReportOutcome {
    /// The kind of failure the report records; `None` when it records none.
    fn outcome(&self) -> Option<Outcome>;

    /// The caller setting that would change what the report refused or kept.
    fn remedy(&self) -> Option<Remedy> {
        None
    }
}

impl ReportOutcome for DoctorReport {
    fn outcome(&self) -> Option<Outcome> {
        (self.verdict == CheckStatus::Fail).then_some(Outcome::NotReady)
    }
}

impl ReportOutcome for Plan {
    fn outcome(&self) -> Option<Outcome> {
        (!self.refusals.is_empty()).then_some(Outcome::Refused)
    }

    fn remedy(&self) -> Option<Remedy> {
        self.refusals
            .iter()
            .any(|r| r.reason == RefusalReason::BootVga)
            .then_some(Remedy::AllowBootVga)
    }
}

impl ReportOutcome for ReconcileReport {
    fn outcome(&self) -> Option<Outcome> {
        (!self.errors.is_empty()).then_some(Outcome::Failed)
    }

    fn remedy(&self) -> Option<Remedy> {
        (!self.kept_unknown.is_empty()).then_some(Remedy::DeclareGone)
    }
}

/// A reset on demand: the device must verify afterwards.
impl ReportOutcome for HealthCheck {
    fn outcome(&self) -> Option<Outcome> {
        (!self.verify.ok).then_some(Outcome::VerificationFailed)
    }
}

/// `versions verify`: a mismatch is a reviewer's matter, an artifact that could not be checked a
/// failure on the way, an unpinned one refused.
impl ReportOutcome for Verdict {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Verdict::Ok => None,
            Verdict::Mismatch(_) => Some(Outcome::VerificationFailed),
            Verdict::Error(_) => Some(Outcome::Failed),
            Verdict::Unpinned(_) => Some(Outcome::Refused),
        }
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

    #[test]
    fn a_plan_with_a_boot_display_refusal_is_refused_and_names_the_remedy() {
        let mut plan = Plan {
            requested: Vec::new(),
            devices: Vec::new(),
            mdevs: Vec::new(),
            iommu_groups: Vec::new(),
            refusals: Vec::new(),
            writes: Vec::new(),
        };
        assert_eq!((plan.outcome(), plan.remedy()), (None, None));
        plan.refusals.push(crate::attach::Refusal {
            device: Some("0000:00:02.0".parse().unwrap()),
            reason: RefusalReason::BootVga,
            message: "boot display".into(),
            owner: None,
        });
        assert_eq!(plan.outcome(), Some(Outcome::Refused));
        assert_eq!(plan.remedy(), Some(Remedy::AllowBootVga));
    }

    #[test]
    fn a_reconcile_fails_on_errors_and_asks_for_owners_it_could_not_judge() {
        let mut report = ReconcileReport::default();
        assert_eq!((report.outcome(), report.remedy()), (None, None));
        report
            .kept_unknown
            .push(crate::attach::Owner::new("vm-1").unwrap());
        assert_eq!(report.outcome(), None, "keeping an owner is no failure");
        assert_eq!(report.remedy(), Some(Remedy::DeclareGone));
        report.errors.push("rollback of 0000:01:00.0 failed".into());
        assert_eq!(report.outcome(), Some(Outcome::Failed));
    }

    #[test]
    fn a_failed_doctor_check_is_not_ready_and_a_warning_is_fine() {
        let report = |verdict| DoctorReport {
            checks: Vec::new(),
            verdict,
        };
        assert_eq!(report(CheckStatus::Warn).outcome(), None);
        assert_eq!(report(CheckStatus::Fail).outcome(), Some(Outcome::NotReady));
    }

    #[test]
    fn a_reset_whose_device_does_not_verify_failed_verification() {
        let mut check = HealthCheck {
            reset: None,
            verify: crate::attach::Verification {
                device: "0000:01:00.0".parse().unwrap(),
                ok: true,
                vendor_id: Some(0x10de),
                device_id: Some(0x2684),
                driver: Some("nvidia".into()),
                problems: Vec::new(),
                ms: 1,
            },
            events: Vec::new(),
        };
        assert_eq!(check.outcome(), None);
        check.verify.ok = false;
        assert_eq!(check.outcome(), Some(Outcome::VerificationFailed));
    }

    #[test]
    fn each_verify_verdict_has_its_own_outcome() {
        assert_eq!(Verdict::Ok.outcome(), None);
        let bad = vec!["r x86_64 kernel (mismatch)".to_owned()];
        assert_eq!(
            Verdict::Mismatch(bad.clone()).outcome(),
            Some(Outcome::VerificationFailed)
        );
        assert_eq!(Verdict::Error(bad).outcome(), Some(Outcome::Failed));
        assert_eq!(Verdict::Unpinned(2).outcome(), Some(Outcome::Refused));
    }
}
