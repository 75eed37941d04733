//! `outcome`: what kind of failure an error (or a report) is, decided once for every front end.
//!
//! A script needs to tell "a safety rule said no, nothing changed" from "an artifact failed
//! verification, a reviewer must look" from "something broke on the way". The CLI maps these to
//! exit codes, a control plane to API statuses. This module is vocabulary only: each error type
//! answers [`Classify`] right below its definition, with a `match` over its variants, so a new
//! variant does not compile until it is classified and a wrapper asks what it wraps. Some
//! answers come back as a report rather than an error (a plan with refusals, a doctor's failed
//! check): each report type answers [`ReportOutcome`] next to its definition.

use crate::remedy::Remedy;

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
    /// this (a doctor's); no error is classified so.
    NotReady,
}

/// What an error means for the caller: every error type of the library answers it.
pub trait Classify {
    /// The kind of failure.
    fn outcome(&self) -> Outcome;

    /// The caller setting that fixes it, if one does.
    fn remedy(&self) -> Option<Remedy> {
        None
    }
}

/// What a report that came back `Ok` says about the request: a plan can hold refusals, a
/// reconcile can have failed on some devices, a reset's verification can have failed. A front
/// end turns it into its status the same way as an error's [`Classify::outcome`].
pub trait ReportOutcome {
    /// The kind of failure the report records; `None` when it records none.
    fn outcome(&self) -> Option<Outcome>;

    /// The caller setting that would change what the report refused or kept.
    fn remedy(&self) -> Option<Remedy> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error type that names no remedy gets none by default.
    #[derive(Debug)]
    struct Busy;

    impl Classify for Busy {
        fn outcome(&self) -> Outcome {
            Outcome::Failed
        }
    }

    #[test]
    fn outcomes_have_stable_names_and_no_remedy_is_the_default() {
        let names = [
            Outcome::Refused,
            Outcome::VerificationFailed,
            Outcome::Failed,
            Outcome::NotReady,
        ]
        .map(|o| serde_json::to_string(&o).unwrap());
        assert_eq!(
            names,
            [
                "\"refused\"",
                "\"verification_failed\"",
                "\"failed\"",
                "\"not_ready\""
            ]
        );
        assert_eq!((Busy.outcome(), Busy.remedy()), (Outcome::Failed, None));
    }
}
