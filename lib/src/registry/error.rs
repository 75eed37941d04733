//! What reading, validating, merging or editing a registry can fail on, and what each error
//! means.

use super::DigestError;
use crate::outcome::{Classify, Outcome};
use crate::remedy::Remedy;

/// Errors reading, validating, merging or editing registries.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file could not be read.
    #[error("cannot read registry {file} (check the registry file's path)")]
    Read {
        /// The registry file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("registry {file} is not valid TOML")]
    Syntax {
        /// The registry file.
        file: String,
        /// The parser's error, with line and column.
        #[source]
        source: toml::de::Error,
    },
    /// The file is valid TOML, but the editor that keeps its comments cannot parse it.
    #[error(
        "registry {file} is valid TOML but cannot be edited in place; write the change by hand"
    )]
    UnEditable {
        /// The registry file.
        file: String,
        /// The editing parser's error, with line and column.
        #[source]
        source: toml_edit::TomlError,
    },
    /// A field is missing, unknown or has a bad value.
    #[error("registry {file}: release `{release}`: field `{field}`: {problem}; {fix}")]
    Invalid {
        /// The registry file.
        file: String,
        /// The release (empty for top-level problems).
        release: String,
        /// The field, as a dotted path inside the release.
        field: String,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// A `sha256` field that is not a digest.
    #[error(
        "registry {file}: release `{release}`: field `{field}`: `{value}` is not a sha256 digest; \
         pin release {release} in {file} to fill it in, or remove it"
    )]
    BadDigest {
        /// The registry file.
        file: String,
        /// The release.
        release: String,
        /// The field, as a dotted path inside the release.
        field: String,
        /// The value found.
        value: String,
        /// What is wrong with it.
        #[source]
        source: DigestError,
    },
    /// One file defines the same release twice.
    #[error(
        "registry {file}: release `{release}` is defined twice (lines {first_line} and \
         {second_line}); keep one definition or rename the other"
    )]
    DuplicateRelease {
        /// The registry file.
        file: String,
        /// The release.
        release: String,
        /// Line of the first definition.
        first_line: usize,
        /// Line of the second definition.
        second_line: usize,
    },
    /// One file marks two releases as the default.
    #[error(
        "registry {file}: releases `{first}` and `{second}` both set `default = true`; \
         keep it on exactly one"
    )]
    TwoDefaults {
        /// The registry file.
        file: String,
        /// One default release.
        first: String,
        /// The other.
        second: String,
    },
    /// No release has that name.
    #[error("unknown release `{name}`; known releases: {}", known.join(", "))]
    UnknownRelease {
        /// The name asked for.
        name: String,
        /// Every release the merged registry knows.
        known: Vec<String>,
    },
    /// No release was named and none is marked default.
    #[error(
        "no release named and no release has `default = true`; name one of: {}",
        known.join(", ")
    )]
    NoDefault {
        /// Every release the merged registry knows.
        known: Vec<String>,
    },
    /// A release to be written already exists in the file.
    #[error(
        "registry {file} already has release `{release}`; pass --replace to overwrite it \
         or choose another name"
    )]
    Exists {
        /// The registry file.
        file: String,
        /// The release.
        release: String,
    },
    /// The registry file could not be written.
    #[error("cannot write registry {file} (check that its directory exists and is writable)")]
    Write {
        /// The registry file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl Classify for RegistryError {
    fn outcome(&self) -> Outcome {
        match self {
            RegistryError::Read { .. }
            | RegistryError::Syntax { .. }
            | RegistryError::UnEditable { .. }
            | RegistryError::Invalid { .. }
            | RegistryError::BadDigest { .. }
            | RegistryError::DuplicateRelease { .. }
            | RegistryError::TwoDefaults { .. }
            | RegistryError::UnknownRelease { .. }
            | RegistryError::NoDefault { .. }
            | RegistryError::Exists { .. }
            | RegistryError::Write { .. } => Outcome::Failed,
        }
    }

    fn remedy(&self) -> Option<Remedy> {
        match self {
            RegistryError::Read { .. } => Some(Remedy::RegistryFile),
            _ => None,
        }
    }
}
