//! Why a module build did not produce modules, and what each reason means.

use std::io;
use std::path::PathBuf;

use super::headers::HeadersError;
use super::sandbox::SandboxError;
use super::source::SourceError;
use super::toolchain::ToolchainError;
use crate::archive::ArchiveError;
use crate::outcome::{Classify, Outcome};

/// Why a module build did not produce modules.
#[derive(Debug, thiserror::Error)]
pub enum DriverBuildError {
    /// An input archive cannot be unpacked safely.
    #[error("the {what} archive cannot be unpacked")]
    Unpack {
        /// Which input (`kernel-headers #2`).
        what: String,
        /// Why.
        #[source]
        source: ArchiveError,
    },
    /// The headers do not make the kernel's build tree.
    #[error(transparent)]
    Headers(#[from] HeadersError),
    /// The source is not the one asked for.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A tool is missing or the compiler does not match the kernel's.
    #[error(transparent)]
    Toolchain(#[from] ToolchainError),
    /// The signing certificate cannot be read.
    #[error(transparent)]
    Signer(#[from] super::signer::SignerError),
    /// The kernel refuses unsigned modules and no key was given.
    #[error(
        "kernel {kernel} has CONFIG_MODULE_SIG_FORCE=y: it loads signed modules only; pass \
         --sign-key KEY --sign-cert CERT with a key the guest kernel trusts"
    )]
    UnsignedForced {
        /// The kernel.
        kernel: String,
    },
    /// Signing was asked for but the kernel does not say its hash.
    #[error(
        "kernel {kernel} has no CONFIG_MODULE_SIG_HASH (module signing is off in its .config); \
         build without --sign-key, or with that kernel's headers"
    )]
    NoSigHash {
        /// The kernel.
        kernel: String,
    },
    /// A patch does not apply.
    #[error(
        "the source patch {patch} does not apply to the {version} source: {detail}; fix or \
         rebase the patch (full output: {log})"
    )]
    Patch {
        /// The patch's name.
        patch: String,
        /// The source's driver version.
        version: String,
        /// patch's own words: the file and the hunk that failed.
        detail: String,
        /// The log.
        log: PathBuf,
    },
    /// The compiler failed.
    #[error(
        "the module build failed in {file}:\n{errors}\nfull log: {log}\nfix: add a source patch \
         for this kernel (--artifact source-patch=URL) or build another driver version"
    )]
    Compile {
        /// The source file that failed (or `make` when none is named).
        file: String,
        /// The first compiler error lines.
        errors: String,
        /// The full log.
        log: PathBuf,
    },
    /// The build ran but produced no module.
    #[error("the build produced no .ko module; see its log {log}")]
    NoModules {
        /// The log.
        log: PathBuf,
    },
    /// The sandbox failed or the build ran past a limit.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The scratch directory could not be prepared.
    #[error("cannot prepare the build's scratch directory {path}")]
    Scratch {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Classify for DriverBuildError {
    fn outcome(&self) -> Outcome {
        match self {
            // Refused before compiling: a wrong input, a missing tool, a kernel that wants
            // signed modules.
            DriverBuildError::Headers(e) => e.outcome(),
            DriverBuildError::Source(e) => e.outcome(),
            DriverBuildError::Toolchain(e) => e.outcome(),
            DriverBuildError::Signer(e) => e.outcome(),
            DriverBuildError::Sandbox(e) => e.outcome(),
            DriverBuildError::UnsignedForced { .. }
            | DriverBuildError::NoSigHash { .. }
            | DriverBuildError::Patch { .. } => Outcome::Refused,
            // An input archive failed the reader's safety rules.
            DriverBuildError::Unpack { .. } => Outcome::VerificationFailed,
            DriverBuildError::Compile { .. }
            | DriverBuildError::NoModules { .. }
            | DriverBuildError::Scratch { .. } => Outcome::Failed,
        }
    }
}
