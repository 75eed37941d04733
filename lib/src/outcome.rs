//! `outcome`: what kind of failure an error (or a report) is, decided once for every front end.
//!
//! A script needs to tell "a safety rule said no, nothing changed" from "an artifact failed
//! verification, a reviewer must look" from "something broke on the way". The CLI maps these to
//! exit codes, a control plane to API statuses. This module is vocabulary only: each error type
//! answers [`Classify`] right below its definition, with a `match` over its variants, so a new
//! variant does not compile until it is classified and a wrapper asks what it wraps. Some
//! answers come back as a report rather than an error (a plan with refusals, a doctor's failed
//! check): each report type answers [`ReportOutcome`] next to its definition.

use std::error::Error;
use std::fmt::Display;

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

/// Any error with the outcome and remedy its library error gave when it was raised, so a front
/// end that only reports it (its chain is the message) walks or downcasts nothing.
#[derive(Debug)]
pub struct Classified {
    error: Box<dyn Error + Send + Sync>,
    outcome: Outcome,
    remedy: Option<Remedy>,
}

/// Every library error converts with `?`, classified by its own [`Classify`] answer.
impl<E: Error + Classify + Send + Sync + 'static> From<E> for Classified {
    fn from(err: E) -> Classified {
        let (outcome, remedy) = (err.outcome(), err.remedy());
        let error = Box::new(err);
        Classified {
            error,
            outcome,
            remedy,
        }
    }
}

impl Classified {
    /// An error the front end itself found (output that could not be written): nothing the
    /// library classifies, so a failure on the way.
    pub fn failed(error: impl Into<Box<dyn Error + Send + Sync>>) -> Classified {
        let error = error.into();
        Classified {
            error,
            outcome: Outcome::Failed,
            remedy: None,
        }
    }

    /// A failure the front end itself words.
    pub fn message(message: impl Display) -> Classified {
        Classified::failed(message.to_string())
    }

    /// The same failure judged otherwise (a report's verdict turned into the error).
    pub fn with_outcome(self, outcome: Outcome) -> Classified {
        Classified { outcome, ..self }
    }

    /// The same failure with the front end's own words in front (a flag to pass).
    pub fn context(self, context: impl Display) -> Classified {
        let (context, source) = (context.to_string(), self.error);
        let error = Box::new(Context { context, source });
        Classified { error, ..self }
    }

    /// The kind of failure.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The caller setting that fixes it, if one does.
    pub fn remedy(&self) -> Option<&Remedy> {
        self.remedy.as_ref()
    }
}

/// The error and each of its causes, joined by `: `.
impl Display for Classified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        let mut cause = self.error.source();
        while let Some(err) = cause {
            write!(f, ": {err}")?;
            cause = err.source();
        }
        Ok(())
    }
}

/// Words put in front of an error, which stays its cause.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
struct Context {
    context: String,
    #[source]
    source: Box<dyn Error + Send + Sync>,
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

    /// The chain prints outermost first, joined by `: `; a judgement and context keep the rest.
    #[test]
    fn classified_prints_its_chain_and_keeps_its_outcome() {
        let failure = Classified::message("disk full")
            .with_outcome(Outcome::Refused)
            .context("pass --cache-dir");
        assert_eq!(failure.to_string(), "pass --cache-dir: disk full");
        assert_eq!(failure.outcome(), Outcome::Refused);
        assert!(failure.remedy().is_none());
    }
}
