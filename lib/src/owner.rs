//! Who holds devices: the [`Owner`] every journal record, health event and report names.
//!
//! Vocabulary shared by `attach`, `health` and `vgpu` (and the device plugin), so none of them
//! has to import another for it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::outcome::{Classify, Outcome};

/// Who holds attached devices: a validated string (it ends up in journal records).
///
/// 1–128 characters from `A–Z a–z 0–9 . _ - : @`, not `.` or `..`, no `/`. The CLI's liveness
/// check understands `pid:N`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(String);

/// Why a string is not a valid owner.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid owner `{0}`: use 1-128 characters from A-Z a-z 0-9 . _ - : @ (e.g. `vm-42` or `pid:1234`)"
)]
pub struct OwnerError(pub String);

/// A malformed owner is the request refused before anything was looked at.
impl Classify for OwnerError {
    fn outcome(&self) -> Outcome {
        Outcome::Refused
    }
}

impl Owner {
    /// Validate an owner string.
    pub fn new(s: &str) -> Result<Owner, OwnerError> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s != "."
            && !s.contains("..")
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@'));
        if ok {
            Ok(Owner(s.to_owned()))
        } else {
            Err(OwnerError(
                s.chars().take(40).flat_map(char::escape_default).collect(),
            ))
        }
    }

    /// The owner string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The process ID of a `pid:N` owner.
    pub fn pid(&self) -> Option<u32> {
        self.0.strip_prefix("pid:")?.parse().ok()
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Owner {
    type Err = OwnerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Owner::new(s)
    }
}

impl Serialize for Owner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Owner::new(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}
