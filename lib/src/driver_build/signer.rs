//! Who signs: a signing certificate read with `openssl x509`, in the form kmod's `modinfo` prints
//! for a module it signed (`signer:` the issuer's CN, `sig_key:` the serial as `AA:BB:...`:
//! `sign-file` names its key by issuer and serial number, so a CA-issued key's signatures name
//! the CA, not the certificate's own subject).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::outcome::{Classify, Outcome};
use crate::registry::Signer;
use crate::tools::{PROBE_LIMIT, RunError, Tool, ToolError, run_bounded};

/// The certificate reader, run as root: found only at a checked system path.
pub const OPENSSL: Tool = Tool {
    program: "openssl",
    package: "openssl",
};

/// Why the certificate cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// openssl is not installed where the system keeps programs, or could be replaced by
    /// someone other than root.
    #[error(transparent)]
    Openssl(#[from] ToolError),
    /// openssl could not be run.
    #[error("cannot run `openssl x509` on {cert} (install the Debian package `openssl`)")]
    Run {
        /// The certificate.
        cert: PathBuf,
        /// Why: not started, or past [`PROBE_LIMIT`].
        #[source]
        source: RunError,
    },
    /// The file is not a certificate openssl reads.
    #[error(
        "{cert} is not an X.509 certificate (PEM or DER) with an issuer CN and a serial: {detail}; \
         pass the certificate of the signing key as --sign-cert"
    )]
    NotACertificate {
        /// The certificate.
        cert: PathBuf,
        /// openssl's complaint or what was missing.
        detail: String,
    },
}

/// A file that is no certificate is refused; openssl failing is a failure on the way.
impl Classify for SignerError {
    fn outcome(&self) -> Outcome {
        match self {
            SignerError::Openssl(e) => e.outcome(),
            SignerError::Run { .. } => Outcome::Failed,
            SignerError::NotACertificate { .. } => Outcome::Refused,
        }
    }
}

/// The signer named by the certificate at `cert`.
pub fn signer(cert: &Path) -> Result<Signer, SignerError> {
    let openssl = OPENSSL.find()?;
    let mut last = String::new();
    for form in ["PEM", "DER"] {
        let out = run_bounded(
            Command::new(&openssl)
                .args([
                    "x509",
                    "-noout",
                    "-issuer",
                    "-serial",
                    "-nameopt",
                    "multiline,utf8,-esc_msb",
                ])
                .args(["-inform", form, "-in"])
                .arg(cert)
                .env("LC_ALL", "C"),
            PROBE_LIMIT,
        )
        .map_err(|source| SignerError::Run {
            cert: cert.to_path_buf(),
            source,
        })?;
        if !out.status.success() {
            last = String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        return parse(&text).ok_or_else(|| SignerError::NotACertificate {
            cert: cert.to_path_buf(),
            detail: "no commonName in its issuer".into(),
        });
    }
    Err(SignerError::NotACertificate {
        cert: cert.to_path_buf(),
        detail: last,
    })
}

/// openssl's `-issuer -serial -nameopt multiline` output → the signer.
fn parse(text: &str) -> Option<Signer> {
    let subject = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("commonName"))
        .and_then(|rest| rest.split_once('='))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())?;
    let serial = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("serial="))?;
    let mut hex = serial.trim().to_ascii_uppercase();
    if hex.len() % 2 == 1 {
        hex.insert(0, '0');
    }
    let bytes: Vec<&str> = (0..hex.len()).step_by(2).map(|i| &hex[i..i + 2]).collect();
    Some(Signer {
        subject,
        key_id: bytes.join(":"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_cn_and_serial_bytes_as_modinfo_prints_them() {
        let s = parse(
            "issuer=\n    organizationName          = Example\n    commonName                = Build key\nserial=1FA0030B\n",
        )
        .unwrap();
        assert_eq!(s.subject, "Build key");
        assert_eq!(s.key_id, "1F:A0:03:0B");
        assert_eq!(
            parse("issuer=\n    commonName = k\nserial=abc\n")
                .unwrap()
                .key_id,
            "0A:BC"
        );
        assert!(parse("issuer=\n    organizationName = x\nserial=01\n").is_none());
    }
}
