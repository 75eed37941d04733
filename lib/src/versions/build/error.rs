//! What can go wrong in a build or a rebuild, and what each error means.

use std::io;
use std::path::PathBuf;

use crate::archive::ArchiveError;
use crate::driver_build::DriverBuildError;
use crate::fetch::FetchError;
use crate::outcome::{Classify, Outcome};
use crate::registry::{Arch, RegistryError};
use crate::remedy::Remedy;

/// Errors of [`build`] and [`verify_rebuild`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The registry could not be read or written (boxed: its messages are large).
    #[error(transparent)]
    Registry(Box<RegistryError>),
    /// A kernel or driver version string that cannot be a version (it becomes a path).
    #[error("the {field} {problem}")]
    BadVersion {
        /// `kernel version` or `driver version`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Modules for another architecture were asked for.
    #[error(
        "modules for {arch} cannot be built on this machine (no cross-compiling); build on an \
         {arch} machine"
    )]
    OtherArch {
        /// The architecture asked for.
        arch: Arch,
    },
    /// The base URL is not a URL artifacts can have.
    #[error("the base URL `{0}` is not an https, http or file URL")]
    BadBaseUrl(String),
    /// An expected signer or `module_sig_force` was given: a build takes both from what it
    /// does (the signing certificate, the kernel headers' config), never from the caller.
    #[error(
        "a build records its signer from the signing certificate and module_sig_force from the \
         kernel headers: drop the signer and module_sig_force (--signer/--signer-key-id/\
         --module-sig-force) and pass a signing key and certificate (--sign-key/--sign-cert) to \
         sign the modules"
    )]
    SignerGiven,
    /// No module source among the inputs.
    #[error("an nvidia-kernel-source input is required: the module source to build")]
    NoSource,
    /// A release to rebuild was not made by `versions build`.
    #[error(
        "release `{release}` cannot be rebuilt: {what}; only releases made by `versions build` can"
    )]
    NotBuilt {
        /// The release.
        release: String,
        /// What it lacks.
        what: String,
    },
    /// The signing key or certificate cannot be read.
    #[error("cannot read the signing file {path}; pass a readable key and certificate")]
    SigningFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An input could not be downloaded or did not verify.
    #[error("the {what} input")]
    Fetch {
        /// Which input (`kernel-headers #2`).
        what: String,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// The modules could not be built (boxed: its messages are large).
    #[error(transparent)]
    Driver(Box<DriverBuildError>),
    /// The built modules failed the inspection `versions add` runs: nothing was published.
    #[error("the built modules were refused, nothing published")]
    Refused(#[source] crate::inspect::InspectError),
    /// An artifact could not be unpacked for inspection or comparison.
    #[error("cannot unpack {what}")]
    Unpack {
        /// Which artifact.
        what: String,
        /// Why.
        #[source]
        source: Box<ArchiveError>,
    },
    /// A file of the build could not be written (cache record, artifact, `--out`).
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl From<DriverBuildError> for BuildError {
    fn from(e: DriverBuildError) -> Self {
        BuildError::Driver(Box::new(e))
    }
}

impl From<RegistryError> for BuildError {
    fn from(e: RegistryError) -> Self {
        BuildError::Registry(Box::new(e))
    }
}

impl Classify for BuildError {
    fn outcome(&self) -> Outcome {
        match self {
            BuildError::Registry(e) => e.outcome(),
            BuildError::Driver(e) => e.outcome(),
            BuildError::Fetch { source, .. } => source.outcome(),
            BuildError::BadVersion { .. }
            | BuildError::OtherArch { .. }
            | BuildError::BadBaseUrl(_)
            | BuildError::SignerGiven
            | BuildError::NoSource
            | BuildError::NotBuilt { .. } => Outcome::Refused,
            // What was built or downloaded is not what the release says: a reviewer's matter.
            BuildError::Refused(_) | BuildError::Unpack { .. } => Outcome::VerificationFailed,
            BuildError::SigningFile { .. } | BuildError::Write { .. } => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            BuildError::Registry(e) => e.remedy(),
            BuildError::Driver(e) => e.remedy(),
            BuildError::Fetch { source, .. } => source.remedy(),
            BuildError::BadVersion { .. }
            | BuildError::OtherArch { .. }
            | BuildError::BadBaseUrl(_)
            | BuildError::SignerGiven
            | BuildError::NoSource
            | BuildError::NotBuilt { .. }
            | BuildError::Refused(_)
            | BuildError::Unpack { .. }
            | BuildError::SigningFile { .. }
            | BuildError::Write { .. } => None,
        }
    }
}
