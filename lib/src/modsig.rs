//! `modsig`: the signature a kernel module carries at its end, read the way kmod's `modinfo`
//! shows it (`signer:`, `sig_key:`, `sig_hashalgo:`).
//!
//! A signed module is laid out as the kernel's `scripts/sign-file` writes it:
//!
//! ```text
//! [ module ELF ][ PKCS#7 SignedData, DER ][ struct module_signature, 12 bytes ][ "~Module signature appended~\n" ]
//! ```
//!
//! `struct module_signature` is `algo, hash, id_type, signer_len, key_id_len, pad[3]` (one byte
//! each) and `sig_len` (big-endian u32). For PKCS#7 (`id_type` 2, the only form the kernel has
//! accepted since 4.3) every field but `id_type` and `sig_len` is zero, and who signed is inside
//! the SignedData: its first SignerInfo names the certificate by issuer and serial number. kmod
//! prints the issuer's common name as `signer`, the serial number's bytes as `sig_key`, and the
//! digest algorithm's name as `sig_hashalgo`; [`ModuleSignature`] holds the same three.
//!
//! Everything is bounded by the file: the trailer's length must fit in what precedes it and is
//! capped at [`MAX_SIGNATURE_BYTES`], and the SignedData is decoded by RustCrypto's `cms`/`der`
//! from exactly that slice, so a lying length or a truncated file is an error, never a read past
//! the end.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cms::cert::x509::der::asn1::ObjectIdentifier;
use cms::cert::x509::der::{self, Decode};
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier};

use crate::archive::decompress::Compression;
use crate::outcome::{Classify, Outcome};

/// The marker `sign-file` appends after the signature.
pub const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// Size of `struct module_signature`.
const TRAILER_LEN: usize = 12;

/// `id_type` of a PKCS#7 signature (`PKEY_ID_PKCS7`).
const ID_TYPE_PKCS7: u8 = 2;

/// Largest signature accepted. `sign-file` writes no certificates into the SignedData, so a real
/// one is a few hundred bytes (an RSA-4096 signature is 512); a larger length is taken for a lie.
pub const MAX_SIGNATURE_BYTES: u32 = 64 * 1024;

/// `id-signedData` (RFC 5652).
const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
/// `id-at-commonName`.
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// Why a module's signature could not be read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModsigError {
    /// The file could not be opened, read or decompressed.
    #[error("cannot read kernel module {file}; check the file, or fetch the artifact again")]
    Io {
        /// The module file.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The marker is there but `struct module_signature` before it is not a PKCS#7 trailer the
    /// kernel would accept, or its length does not fit in the file.
    #[error(
        "kernel module {file} ends with the signature marker but its signature trailer is broken ({reason}); sign the module again with the kernel's scripts/sign-file, or strip the signature"
    )]
    BadTrailer {
        /// The module file.
        file: PathBuf,
        /// What is wrong with the trailer.
        reason: String,
    },
    /// The signature bytes are not a DER PKCS#7 `ContentInfo` holding a `SignedData`.
    #[error(
        "the signature appended to kernel module {file} is not a PKCS#7 SignedData; sign the module again with the kernel's scripts/sign-file"
    )]
    BadSignedData {
        /// The module file.
        file: PathBuf,
        /// What the DER decoder said.
        #[source]
        source: der::Error,
    },
    /// The PKCS#7 `ContentInfo` holds another content type.
    #[error(
        "the signature appended to kernel module {file} is PKCS#7 content of type {content_type}, not SignedData; sign the module again with the kernel's scripts/sign-file"
    )]
    NotSignedData {
        /// The module file.
        file: PathBuf,
        /// The content type's object identifier.
        content_type: String,
    },
    /// The SignedData has no SignerInfo.
    #[error(
        "the signature appended to kernel module {file} names no signer; sign the module again with the kernel's scripts/sign-file"
    )]
    NoSigner {
        /// The module file.
        file: PathBuf,
    },
}

/// A signature that cannot be read is the module failing verification.
impl Classify for ModsigError {
    fn outcome(&self) -> Outcome {
        match self {
            ModsigError::Io { .. } => Outcome::Failed,
            ModsigError::BadTrailer { .. }
            | ModsigError::BadSignedData { .. }
            | ModsigError::NotSignedData { .. }
            | ModsigError::NoSigner { .. } => Outcome::VerificationFailed,
        }
    }
}

/// Who signed a module, as kmod's `modinfo` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSignature {
    /// `signer:`: the common name of the signing certificate's issuer (for the self-signed
    /// certificates module signing uses, its subject), or, as kmod does when the name has no
    /// common name, its last attribute's value. `None` when the SignerInfo names the certificate
    /// by subject key identifier (kmod then prints no signature at all; the kernel accepts it).
    pub signer: Option<String>,
    /// The issuer's whole name (RFC 4514, e.g. `CN=Build time autogenerated kernel key`); `None`
    /// as for `signer`.
    pub issuer: Option<String>,
    /// `sig_key:` as bytes: the certificate's serial number without leading zero bytes (what
    /// OpenSSL's `BN_bn2bin` gives kmod), or the subject key identifier.
    pub key_id: Vec<u8>,
    /// `sig_hashalgo:`: OpenSSL's name of the digest algorithm (`sha256`, ...), or its dotted
    /// object identifier when it has none.
    pub hash_algo: String,
}

impl ModuleSignature {
    /// `sig_key:` as `modinfo` prints it: uppercase hex bytes joined by `:`.
    pub fn key_id_hex(&self) -> String {
        colon_hex(&self.key_id)
    }
}

/// Bytes as uppercase hex pairs joined by `:` (`66:F5:4E`), the form `modinfo` and `openssl x509
/// -serial` users compare.
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The signature of a plain (decompressed) module's bytes; `Ok(None)` when it carries none.
pub fn parse(module: &[u8]) -> Result<Option<ModuleSignature>, ModsigError> {
    parse_named(module, Path::new("<bytes>"))
}

/// The signature of a `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz` (the kernel signs a module before it
/// is compressed, so a compressed one is decompressed first); `Ok(None)` when it carries none.
/// A plain module is read from its end only.
pub fn from_path(path: &Path) -> Result<Option<ModuleSignature>, ModsigError> {
    let io_error = |source| ModsigError::Io {
        file: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut magic = [0u8; 6];
    let got = read_up_to(&mut file, &mut magic).map_err(io_error)?;
    if Compression::detect(&magic[..got]) != Compression::None {
        let bytes = crate::modinfo::decompressed_module(path).map_err(io_error)?;
        return parse_named(&bytes, path);
    }
    let size = file.seek(SeekFrom::End(0)).map_err(io_error)?;
    let tail_len =
        size.min((SIGNATURE_MARKER.len() + TRAILER_LEN) as u64 + u64::from(MAX_SIGNATURE_BYTES));
    file.seek(SeekFrom::Start(size - tail_len))
        .map_err(io_error)?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.take(tail_len)
        .read_to_end(&mut tail)
        .map_err(io_error)?;
    parse_named(&tail, path)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The trailer checks are the kernel's own (`mod_check_sig`): a PKCS#7 trailer with every other
/// field zero and a length that fits.
fn parse_named(bytes: &[u8], file: &Path) -> Result<Option<ModuleSignature>, ModsigError> {
    let Some(body) = bytes.strip_suffix(SIGNATURE_MARKER) else {
        return Ok(None);
    };
    let bad_trailer = |reason: String| ModsigError::BadTrailer {
        file: file.to_path_buf(),
        reason,
    };
    let Some(trailer_at) = body.len().checked_sub(TRAILER_LEN) else {
        return Err(bad_trailer(format!(
            "only {} bytes precede the marker, fewer than the {TRAILER_LEN}-byte trailer",
            body.len()
        )));
    };
    let trailer = &body[trailer_at..];
    let (algo, hash, id_type, signer_len, key_id_len) =
        (trailer[0], trailer[1], trailer[2], trailer[3], trailer[4]);
    let sig_len = u32::from_be_bytes([trailer[8], trailer[9], trailer[10], trailer[11]]);
    if id_type != ID_TYPE_PKCS7 {
        return Err(bad_trailer(format!(
            "id_type {id_type}, not PKCS#7 ({ID_TYPE_PKCS7}), the only form the kernel accepts"
        )));
    }
    if algo != 0 || hash != 0 || signer_len != 0 || key_id_len != 0 {
        return Err(bad_trailer(format!(
            "a PKCS#7 trailer must have algo, hash, signer_len and key_id_len zero, not {algo}, {hash}, {signer_len}, {key_id_len}"
        )));
    }
    if sig_len == 0 || sig_len > MAX_SIGNATURE_BYTES {
        return Err(bad_trailer(format!(
            "signature length {sig_len} is outside 1..={MAX_SIGNATURE_BYTES}"
        )));
    }
    let Some(sig_at) = trailer_at.checked_sub(sig_len as usize) else {
        return Err(bad_trailer(format!(
            "signature length {sig_len} exceeds the {trailer_at} bytes before the trailer"
        )));
    };
    signed_data(&body[sig_at..trailer_at], file).map(Some)
}

fn signed_data(der_bytes: &[u8], file: &Path) -> Result<ModuleSignature, ModsigError> {
    let bad = |source| ModsigError::BadSignedData {
        file: file.to_path_buf(),
        source,
    };
    let info = ContentInfo::from_der(der_bytes).map_err(bad)?;
    if info.content_type != SIGNED_DATA {
        return Err(ModsigError::NotSignedData {
            file: file.to_path_buf(),
            content_type: info.content_type.to_string(),
        });
    }
    let signed: SignedData = info.content.decode_as().map_err(bad)?;
    // kmod and the kernel both read the first SignerInfo only.
    let Some(signer_info) = signed.signer_infos.0.iter().next() else {
        return Err(ModsigError::NoSigner {
            file: file.to_path_buf(),
        });
    };
    let hash_algo = hash_name(&signer_info.digest_alg.oid);
    let (signer, issuer, key_id) = match &signer_info.sid {
        SignerIdentifier::IssuerAndSerialNumber(id) => {
            let serial = id.serial_number.as_bytes();
            let first = serial.iter().position(|&b| b != 0).unwrap_or(serial.len());
            (
                common_name(&id.issuer),
                Some(id.issuer.to_string()),
                serial[first..].to_vec(),
            )
        }
        SignerIdentifier::SubjectKeyIdentifier(ski) => (None, None, ski.0.as_bytes().to_vec()),
    };
    Ok(ModuleSignature {
        signer,
        issuer,
        key_id,
        hash_algo,
    })
}

/// kmod's `x509_name_to_str`: the first common name, else the last attribute's value; the
/// string's raw bytes.
fn common_name(name: &cms::cert::x509::name::Name) -> Option<String> {
    let attributes: Vec<_> = name.0.iter().flat_map(|rdn| rdn.0.iter()).collect();
    let chosen = attributes
        .iter()
        .find(|a| a.oid == COMMON_NAME)
        .or(attributes.last())?;
    Some(String::from_utf8_lossy(chosen.value.value()).into_owned())
}

/// OpenSSL's long name of a digest (what kmod prints), else the dotted identifier.
fn hash_name(oid: &ObjectIdentifier) -> String {
    const NAMES: &[(&str, &str)] = &[
        ("1.2.840.113549.2.4", "md4"),
        ("1.2.840.113549.2.5", "md5"),
        ("1.3.14.3.2.26", "sha1"),
        ("1.3.36.3.2.1", "ripemd160"),
        ("2.16.840.1.101.3.4.2.1", "sha256"),
        ("2.16.840.1.101.3.4.2.2", "sha384"),
        ("2.16.840.1.101.3.4.2.3", "sha512"),
        ("2.16.840.1.101.3.4.2.4", "sha224"),
        ("2.16.840.1.101.3.4.2.7", "sha3-224"),
        ("2.16.840.1.101.3.4.2.8", "sha3-256"),
        ("2.16.840.1.101.3.4.2.9", "sha3-384"),
        ("2.16.840.1.101.3.4.2.10", "sha3-512"),
        ("1.2.156.10197.1.401", "sm3"),
    ];
    let dotted = oid.to_string();
    NAMES
        .iter()
        .find(|(id, _)| *id == dotted)
        .map_or(dotted, |(_, name)| (*name).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module body, a signature blob and a PKCS#7 trailer with `sig_len` as given.
    fn signed(body: &[u8], sig: &[u8], sig_len: u32) -> Vec<u8> {
        let mut out = body.to_vec();
        out.extend_from_slice(sig);
        out.extend_from_slice(&[0, 0, ID_TYPE_PKCS7, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&sig_len.to_be_bytes());
        out.extend_from_slice(SIGNATURE_MARKER);
        out
    }

    #[test]
    fn no_marker_is_unsigned() {
        assert_eq!(parse(b"\x7fELF plain module").unwrap(), None);
        assert_eq!(parse(b"").unwrap(), None);
        // The marker somewhere else than at the very end does not count.
        let mut bytes = SIGNATURE_MARKER.to_vec();
        bytes.push(0);
        assert_eq!(parse(&bytes).unwrap(), None);
    }

    #[test]
    fn marker_without_room_for_the_trailer_is_refused() {
        for pad in 0..TRAILER_LEN {
            let mut bytes = vec![0u8; pad];
            bytes.extend_from_slice(SIGNATURE_MARKER);
            let err = parse(&bytes).unwrap_err();
            assert!(
                matches!(&err, ModsigError::BadTrailer { reason, .. } if reason.contains("precede the marker")),
                "{pad}: {err}"
            );
        }
    }

    #[test]
    fn lying_lengths_are_refused_without_reading_past_the_start() {
        // 8 bytes precede the trailer: a length of 9 or more lies.
        let body = b"\x7fELF";
        for sig_len in [
            0,
            9,
            100,
            MAX_SIGNATURE_BYTES,
            MAX_SIGNATURE_BYTES + 1,
            u32::MAX,
        ] {
            let err = parse(&signed(body, b"abcd", sig_len)).unwrap_err();
            assert!(
                matches!(err, ModsigError::BadTrailer { .. }),
                "{sig_len}: {err}"
            );
        }
    }

    #[test]
    fn trailers_the_kernel_refuses_are_refused() {
        let mut bytes = signed(b"x", b"sig", 3);
        let trailer = bytes.len() - SIGNATURE_MARKER.len() - TRAILER_LEN;
        for (field, value) in [(0, 1u8), (1, 4), (2, 1), (3, 5), (4, 20)] {
            let mut doctored = bytes.clone();
            doctored[trailer + field] = value;
            let err = parse(&doctored).unwrap_err();
            assert!(
                matches!(&err, ModsigError::BadTrailer { .. }),
                "field {field}: {err}"
            );
        }
        bytes[trailer + 2] = ID_TYPE_PKCS7;
        assert!(matches!(
            parse(&bytes).unwrap_err(),
            ModsigError::BadSignedData { .. }
        ));
    }

    #[test]
    fn garbage_and_truncated_der_are_bad_signed_data() {
        // A SEQUENCE claiming 0x7fff bytes it does not have, an empty SEQUENCE, random bytes.
        for sig in [
            &[0x30, 0x82, 0x7f, 0xff, 0x06][..],
            &[0x30, 0x00],
            b"not DER at all",
        ] {
            let err = parse(&signed(b"body", sig, sig.len() as u32)).unwrap_err();
            assert!(matches!(err, ModsigError::BadSignedData { .. }), "{err}");
        }
    }

    #[test]
    fn another_content_type_is_named() {
        // ContentInfo { id-data, [0] OCTET STRING "" }
        let sig = [
            0x30, 0x0f, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01, 0xa0,
            0x02, 0x04, 0x00,
        ];
        let err = parse(&signed(b"body", &sig, sig.len() as u32)).unwrap_err();
        assert!(
            matches!(&err, ModsigError::NotSignedData { content_type, .. } if content_type == "1.2.840.113549.1.7.1"),
            "{err}"
        );
    }

    #[test]
    fn colon_hex_is_uppercase_pairs() {
        assert_eq!(colon_hex(&[0x0a, 0xff, 0x00]), "0A:FF:00");
        assert_eq!(colon_hex(&[]), "");
    }
}
