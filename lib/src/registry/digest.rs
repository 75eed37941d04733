//! The sha256 digest type used by the registry, the fetcher and the cache.

use std::fmt;
use std::str::FromStr;

use crate::outcome::{Classify, Outcome};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// A sha256 digest. Displays as 64 lowercase hex characters; parses only that form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

/// Why a string is not a sha256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not exactly 64 characters long.
    #[error("a sha256 digest is 64 hex characters, this one has {0}")]
    Length(usize),
    /// A character outside `0-9a-f`.
    #[error("a sha256 digest uses only lowercase hex (0-9, a-f); found {0:?}")]
    Character(char),
}

impl Classify for DigestError {
    fn outcome(&self) -> Outcome {
        match self {
            DigestError::Length(_) | DigestError::Character(_) => Outcome::Failed,
        }
    }
}

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(Sha256::digest(bytes).into())
    }

    /// The lowercase hex form (the same as `Display`).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<sha2::digest::Output<Sha256>> for Sha256Digest {
    fn from(out: sha2::digest::Output<Sha256>) -> Self {
        Sha256Digest(out.into())
    }
}

impl From<[u8; 32]> for Sha256Digest {
    fn from(bytes: [u8; 32]) -> Self {
        Sha256Digest(bytes)
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(c) = s.chars().find(|c| !matches!(c, '0'..='9' | 'a'..='f')) {
            return Err(DigestError::Character(c));
        }
        if s.len() != 64 {
            return Err(DigestError::Length(s.len()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| DigestError::Length(s.len()))?;
        Ok(Sha256Digest(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_64_lowercase_hex() {
        let hex = "27c12a3eaa71f4819b8511cf1840c506591c25c6cc5d1de7eda548d07ffe01bd";
        let d: Sha256Digest = hex.parse().unwrap();
        assert_eq!(d.to_string(), hex);
        assert_eq!(
            hex.to_uppercase().parse::<Sha256Digest>(),
            Err(DigestError::Character('C'))
        );
        assert_eq!(
            hex[..63].parse::<Sha256Digest>(),
            Err(DigestError::Length(63))
        );
        assert_eq!(
            format!("{hex}0").parse::<Sha256Digest>(),
            Err(DigestError::Length(65))
        );
        assert!(matches!(
            "z".repeat(64).parse::<Sha256Digest>(),
            Err(DigestError::Character('z'))
        ));
    }

    #[test]
    fn digest_of_empty_input_is_the_known_constant() {
        assert_eq!(
            Sha256Digest::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
