//! Key files: saving and loading an [`Identity`].
//!
//! The on-disk format is the one the rest of the ecosystem already speaks:
//!
//! * **PKCS#8 PEM** (`-----BEGIN PRIVATE KEY-----`, RFC 8410 for Ed25519) is
//!   what [`Identity::save`] writes. `openssl pkey -in key.pem -noout -text`
//!   reads it, and keys made by `openssl genpkey -algorithm ed25519` load.
//! * **OpenSSH private keys** (`-----BEGIN OPENSSH PRIVATE KEY-----`) of type
//!   Ed25519, as made by `ssh-keygen -t ed25519 -N ''`, load too, so a key a
//!   person already manages can be a vat's identity. The VatId is then the
//!   very key in the matching `.pub` file.
//!
//!   **A key that an ssh-agent holds is a key anyone who can use that agent
//!   can sign with.** The agent signs whatever bytes it is asked to, raw
//!   Ed25519 for an `ssh-ed25519` key, and capnp-noise's identity binding
//!   (SPEC.md 5.2) and introductions (SPEC.md 12.4.1) are plain Ed25519
//!   signatures under the vat's key. So every process that can reach the
//!   agent's socket (`SSH_AUTH_SOCK`), and every host the agent is
//!   forwarded to (`ssh -A`), can bind its own Noise key to the VatId,
//!   that is, be the vat to any peer, and sign introductions as it. Reusing
//!   an SSH key as a vat identity makes the vat exactly as trustworthy as
//!   the least trusted place that agent reaches; give vats keys of their
//!   own (`capnp-noise keygen`) unless that is what you mean.
//!
//! Only the long-term Ed25519 key is stored. The Noise static key is
//! derived from it each time an identity is loaded
//! ([`STATIC_KEY_DERIVATION`](crate::identity::STATIC_KEY_DERIVATION),
//! SPEC.md 14.1): the same file gives the same static key, so clients that
//! resume with it keep resuming across restarts.
//!
//! Saving is atomic: the key is written to a temporary file in the same
//! directory, created with mode 0600, flushed to disk, and then moved into
//! place; a crash leaves either the old file or the new one, never half a
//! key. Saving refuses to replace an existing file unless asked to.
//!
//! Loading refuses, with an [`Error::Key`] that names the file and the
//! problem: a missing or unreadable file, an encrypted key (capnp-noise has
//! no passphrase prompt; decrypt a copy first), a key of another algorithm
//! (RSA, ECDSA, ...), a public key where a private one was expected, and
//! corrupt data. A key file that group or others may access loads, with a
//! warning logged through `tracing` (see [`permission_problem`]).
//!
//! **On Windows** there are no Unix modes: a saved key gets the access
//! rules (ACL) its directory passes on to new files, and loading checks no
//! permissions ([`permission_problem`] is always `None`). Keep keys in a
//! directory only their user can read, such as the user's profile
//! (`%USERPROFILE%`), not in a shared or world-readable folder (`C:\`,
//! `C:\ProgramData`, a network share). Saving is atomic there too.
//!
//! ```
//! use capnp_noise::Identity;
//! # fn main() -> capnp_noise::Result<()> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("vat.key");
//! let me = Identity::generate();
//! me.save(&path, false)?;
//! assert_eq!(Identity::load(&path)?.vat_id(), me.vat_id());
//! // A second save would replace the key: refused unless `overwrite` is true.
//! assert!(Identity::generate().save(&path, false).is_err());
//! # Ok(()) }
//! ```

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{self, DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::identity::Identity;

/// The key file the command-line tool uses when none is given:
/// `capnp-noise.key` in the current directory.
pub const DEFAULT_KEY_FILE: &str = "capnp-noise.key";

/// The largest key file read. Real ones are a few hundred bytes; the limit
/// keeps a mistaken path (a disk image, `/dev/zero`) from filling memory.
pub const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// The PKCS#8 algorithm identifiers worth naming in an error message.
const KNOWN_ALGORITHMS: &[(&str, &str)] = &[
    ("1.2.840.113549.1.1.1", "RSA"),
    ("1.2.840.113549.1.1.10", "RSA-PSS"),
    ("1.2.840.10045.2.1", "ECDSA (EC)"),
    ("1.2.840.10040.4.1", "DSA"),
    ("1.3.101.110", "X25519"),
    ("1.3.101.111", "X448"),
    ("1.3.101.113", "Ed448"),
];

impl Identity {
    /// Loads an identity from a key file: PKCS#8 PEM or OpenSSH, Ed25519.
    ///
    /// Logs a warning (`tracing::warn!`) if group or others may access the
    /// file. The Noise static key is derived from the key
    /// ([`STATIC_KEY_DERIVATION`](crate::identity::STATIC_KEY_DERIVATION)).
    ///
    /// # Errors
    /// [`Error::Key`] naming the file and the problem: it is missing or
    /// unreadable, too large, encrypted, of another algorithm, a public
    /// key, or corrupt.
    pub fn load(path: impl AsRef<Path>) -> Result<Identity> {
        let path = path.as_ref();
        let bytes = read_limited(path, MAX_KEY_FILE_LEN, "key file")?;
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            key_error(
                path,
                "is not a text key file (PKCS#8 PEM or OpenSSH private key); \
                 binary DER keys are not supported",
            )
        })?;
        let identity = Identity::from_pem_or_openssh(text, path)?;
        if let Ok(Some(problem)) = permission_problem(path) {
            tracing::warn!("{problem}");
        }
        Ok(identity)
    }

    /// Parses the contents of a key file. `path_for_errors` only names the
    /// source in error messages.
    ///
    /// # Errors
    /// As [`load`](Self::load), apart from reading the file.
    pub fn from_pem_or_openssh(text: &str, path_for_errors: impl AsRef<Path>) -> Result<Identity> {
        let path = path_for_errors.as_ref();
        let Some((label, block)) = first_pem_block(text) else {
            let what = if text.trim_start().starts_with("ssh-") {
                "holds an OpenSSH public key, not a private key (was the .pub file given?)"
            } else if text.trim().is_empty() {
                "is empty"
            } else {
                "is not a PEM or OpenSSH private key file"
            };
            return Err(key_error(path, what));
        };
        let signing = match label {
            "PRIVATE KEY" => from_pkcs8(block, path)?,
            "OPENSSH PRIVATE KEY" => from_openssh(block, path)?,
            "ENCRYPTED PRIVATE KEY" => {
                return Err(key_error(
                    path,
                    "is encrypted with a passphrase (PKCS#8 ENCRYPTED PRIVATE KEY); \
                     capnp-noise cannot prompt for passphrases: decrypt a copy with \
                     `openssl pkey -in FILE -out PLAIN.pem` and keep that one mode 0600",
                ))
            }
            "RSA PRIVATE KEY" | "EC PRIVATE KEY" | "DSA PRIVATE KEY" => {
                return Err(other_algorithm(
                    path,
                    label.trim_end_matches(" PRIVATE KEY"),
                ));
            }
            "PUBLIC KEY" => return Err(key_error(path, "holds a public key, not a private key")),
            other if is_plain_label(other) => {
                return Err(key_error(
                    path,
                    &format!("holds a PEM {other:?} block, not a private key"),
                ))
            }
            // Not echoed: a damaged header can run into the key material.
            _ => return Err(key_error(path, "has a malformed PEM header line")),
        };
        Ok(Identity::from_signing_key(signing))
    }

    /// The identity's Ed25519 key as a PKCS#8 PEM document (RFC 8410,
    /// `-----BEGIN PRIVATE KEY-----`), the format [`save`](Self::save) writes.
    pub fn to_pkcs8_pem(&self) -> Zeroizing<String> {
        // Version 1 (RFC 5208) without the optional public key: the form
        // OpenSSL writes, and the only one OpenSSL 3.0 reads.
        let bytes = pkcs8::KeypairBytes {
            secret_key: self.signing_key().to_bytes(),
            public_key: None,
        };
        bytes
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encoding a 32-byte Ed25519 key as PKCS#8 cannot fail")
    }

    /// Saves the identity's Ed25519 key to `path` as PKCS#8 PEM, atomically
    /// and readable by the owner only (mode 0600; on Windows, the access
    /// rules the directory passes on: see the [module docs](crate::keyfile)).
    ///
    /// # Errors
    /// [`Error::Key`] if `path` exists and `overwrite` is false, or if the
    /// file cannot be written (the message names the file and the cause).
    pub fn save(&self, path: impl AsRef<Path>, overwrite: bool) -> Result<()> {
        write_atomic(
            path.as_ref(),
            self.to_pkcs8_pem().as_bytes(),
            overwrite,
            "key file",
        )
    }
}

/// Reports whether group or others may access the key file at `path`
/// (any of the mode bits 0o077, as OpenSSH checks). Returns the warning
/// text that [`Identity::load`] logs, or `None` if the file is private.
/// Always `None` on platforms without Unix permissions (Windows: see the
/// [module documentation](self) for where to keep keys there).
///
/// # Errors
/// [`Error::Key`] if the file's metadata cannot be read.
pub fn permission_problem(path: impl AsRef<Path>) -> Result<Option<String>> {
    let path = path.as_ref();
    let meta = fs::metadata(path).map_err(|e| io_error(path, "key file", &e))?;
    Ok(mode_problem(path, &meta))
}

#[cfg(unix)]
fn mode_problem(path: &Path, meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file {} is accessible by group or others (mode {mode:04o}); \
             anyone who can read it can impersonate this vat: run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn mode_problem(_: &Path, _: &fs::Metadata) -> Option<String> {
    None
}

/// Finds the first PEM block: its label and the text from `-----BEGIN` to
/// the end of the matching `-----END ...-----` line (or the end of the
/// text, so a truncated file reaches the decoder and is reported as
/// corrupt). Text around the block (comments) is ignored.
fn first_pem_block(text: &str) -> Option<(&str, &str)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let label = &rest[..rest.find("-----")?];
    let end_marker = format!("-----END {label}-----");
    let block = match text[start..].find(&end_marker) {
        Some(end) => &text[start..start + end + end_marker.len()],
        None => &text[start..],
    };
    Some((label, block))
}

/// Whether a PEM label is short and made of the characters real labels
/// use (RFC 7468: "PRIVATE KEY", "X509 CRL"...), so an error may show it.
fn is_plain_label(label: &str) -> bool {
    label.len() <= 40
        && label
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b' ')
}

fn from_pkcs8(pem: &str, path: &Path) -> Result<SigningKey> {
    let corrupt = |e: &dyn std::fmt::Display| key_error(path, &format!("is corrupt: {e}"));
    let (_, der) = pkcs8::SecretDocument::from_pem(pem).map_err(|e| corrupt(&e))?;
    let info = pkcs8::PrivateKeyInfo::try_from(der.as_bytes()).map_err(|e| corrupt(&e))?;
    let oid = info.algorithm.oid;
    if oid != pkcs8::ALGORITHM_OID {
        let oid = oid.to_string();
        let name = KNOWN_ALGORITHMS
            .iter()
            .find(|(o, _)| *o == oid)
            .map_or(format!("algorithm {oid}"), |(_, n)| (*n).to_string());
        return Err(other_algorithm(path, &name));
    }
    SigningKey::from_pkcs8_der(der.as_bytes()).map_err(|e| corrupt(&e))
}

fn from_openssh(pem: &str, path: &Path) -> Result<SigningKey> {
    let key = ssh_key::PrivateKey::from_openssh(pem).map_err(|e| match e {
        ssh_key::Error::AlgorithmUnknown | ssh_key::Error::AlgorithmUnsupported { .. } => {
            other_algorithm(path, "an OpenSSH key type this tool does not know")
        }
        e => key_error(path, &format!("is a corrupt OpenSSH private key: {e}")),
    })?;
    let alg = key.algorithm();
    if alg != ssh_key::Algorithm::Ed25519 {
        return Err(other_algorithm(path, &format!("OpenSSH {}", alg.as_str())));
    }
    if key.is_encrypted() {
        return Err(key_error(
            path,
            "is an encrypted OpenSSH key; capnp-noise cannot prompt for passphrases: \
             remove the passphrase from a copy with `ssh-keygen -p -N '' -f COPY`",
        ));
    }
    let Some(pair) = key.key_data().ed25519() else {
        return Err(key_error(path, "is a corrupt OpenSSH Ed25519 key"));
    };
    let seed = Zeroizing::new(pair.private.to_bytes());
    let signing = SigningKey::from_bytes(&seed);
    if signing.verifying_key().as_bytes() != pair.public.as_ref() {
        return Err(key_error(
            path,
            "is corrupt: its OpenSSH private and public keys do not match",
        ));
    }
    Ok(signing)
}

fn other_algorithm(path: &Path, algorithm: &str) -> Error {
    key_error(
        path,
        &format!(
            "holds a key of another algorithm ({algorithm}); capnp-noise identities are \
             Ed25519 keys (`capnp-noise keygen`, `openssl genpkey -algorithm ed25519` or \
             `ssh-keygen -t ed25519` make one)"
        ),
    )
}

fn key_error(path: &Path, problem: &str) -> Error {
    Error::Key(format!("key file {} {problem}", path.display()))
}

/// An [`Error::Key`] for an I/O failure on `path`, saying what the file is.
pub(crate) fn io_error(path: &Path, what: &str, e: &io::Error) -> Error {
    let cause = match e.kind() {
        io::ErrorKind::NotFound => "does not exist".to_string(),
        io::ErrorKind::PermissionDenied => "cannot be accessed: permission denied".to_string(),
        _ => format!("cannot be used: {e}"),
    };
    Error::Key(format!("{what} {} {cause}", path.display()))
}

/// Reads a whole local file of at most `max` bytes into a buffer that is
/// zeroized when dropped.
///
/// # Errors
/// [`Error::Key`] naming `what` and the path if the file cannot be read or
/// is larger than `max`.
pub fn read_limited(path: &Path, max: u64, what: &str) -> Result<Zeroizing<Vec<u8>>> {
    read_limited_if_exists(path, max, what)?
        .ok_or_else(|| io_error(path, what, &io::ErrorKind::NotFound.into()))
}

/// [`read_limited`], but an absent file is `Ok(None)`. The absence is
/// decided by the one `open` call, so a file that another process creates
/// meanwhile is either read whole or reported absent, never an error.
///
/// # Errors
/// As [`read_limited`], except for an absent file.
pub(crate) fn read_limited_if_exists(
    path: &Path,
    max: u64,
    what: &str,
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path, what, &e)),
    };
    // Room for the whole file up front, so the buffer is not reallocated
    // (which would leave unzeroized copies of a key behind).
    let expected = file.metadata().map_or(0, |m| m.len()).min(max) as usize;
    let mut bytes = Zeroizing::new(Vec::with_capacity(expected + 1));
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, what, &e))?;
    if bytes.len() as u64 > max {
        return Err(Error::Key(format!(
            "{what} {} is larger than {max} bytes; is it the right file?",
            path.display()
        )));
    }
    Ok(Some(bytes))
}

/// Writes `contents` to `path` atomically: a temporary file in the same
/// directory (mode 0600), flushed to disk, then moved into place, and the
/// directory flushed. With `overwrite` false, an existing `path` is never
/// replaced, even by a racing writer.
///
/// # Errors
/// [`Error::Key`] naming `what` and the path.
pub(crate) fn write_atomic(
    path: &Path,
    contents: &[u8],
    overwrite: bool,
    what: &str,
) -> Result<()> {
    let fail = |e: &io::Error| Error::Key(format!("cannot write {what} {}: {e}", path.display()));
    let exists = || {
        Error::Key(format!(
            "{what} {} already exists; refusing to overwrite it (use --force to replace it)",
            path.display()
        ))
    };
    if !overwrite && fs::symlink_metadata(path).is_ok() {
        return Err(exists());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(
        ".{}.",
        path.file_name()
            .map_or("tmp".into(), |n| n.to_string_lossy())
    );
    // tempfile creates the file with mode 0600 and removes it if we fail
    // before it is persisted.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| fail(&e))?;
    tmp.write_all(contents).map_err(|e| fail(&e))?;
    tmp.as_file().sync_all().map_err(|e| fail(&e))?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    if let Err(e) = persisted {
        return Err(if e.error.kind() == io::ErrorKind::AlreadyExists {
            exists()
        } else {
            fail(&e.error)
        });
    }
    // Make the rename itself durable. Not every platform can open a
    // directory; the file is in place either way.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_labels() {
        let id = Identity::from_seed(&[7; 32]);
        let pem = id.to_pkcs8_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let back = Identity::from_pem_or_openssh(&format!("comment\n{}\n", *pem), "x").unwrap();
        assert_eq!(back.vat_id(), id.vat_id());

        let cases = [
            ("", "is empty"),
            ("hello", "not a PEM"),
            ("ssh-ed25519 AAAAC3Nza x@y", ".pub"),
            (
                "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n",
                "public key",
            ),
            ("-----BEGIN CERTIFICATE-----\n", "CERTIFICATE"),
            (
                "-----BEGIN RSA PRIVATE KEY-----\n",
                "another algorithm (RSA)",
            ),
            ("-----BEGIN ENCRYPTED PRIVATE KEY-----\n", "encrypted"),
            (
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "corrupt",
            ),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
                "corrupt",
            ),
        ];
        for (text, want) in cases {
            let err = Identity::from_pem_or_openssh(text, "k.pem")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("k.pem") && err.contains(want),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn a_damaged_pem_header_is_not_echoed() {
        // Found by the key_file fuzz target: the "label" ran to the next
        // "-----", through the key, and came back whole in the error.
        let pem = Identity::generate().to_pkcs8_pem();
        let secret_line = pem.lines().nth(1).unwrap();
        let damaged = pem.replacen("KEY-----", "KEY---", 1);
        let err = Identity::from_pem_or_openssh(&damaged, "k.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("malformed PEM header"), "{err}");
        assert!(!err.contains(secret_line), "{err}");
        let long = format!("-----BEGIN {}-----\n", "A".repeat(5000));
        let err = Identity::from_pem_or_openssh(&long, "k.pem").unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn crlf_line_endings_load() {
        let id = Identity::generate();
        let crlf = id.to_pkcs8_pem().replace('\n', "\r\n");
        let back = Identity::from_pem_or_openssh(&crlf, "k").unwrap();
        assert_eq!(back.vat_id(), id.vat_id());
    }

    /// SPEC.md 14.1: a restart with the same key file keeps the static key
    /// (clients' resumption records stay valid); another key file gives
    /// another static key.
    #[test]
    fn two_loads_of_one_key_file_give_one_static_key() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (dir.path().join("one.pem"), dir.path().join("two.pem"));
        Identity::generate().save(&one, false).unwrap();
        Identity::generate().save(&two, false).unwrap();
        let (a, b) = (Identity::load(&one).unwrap(), Identity::load(&one).unwrap());
        assert_eq!(a.noise_static_public(), b.noise_static_public());
        assert_eq!(a.handshake_payload(), b.handshake_payload());
        let c = Identity::load(&two).unwrap();
        assert_ne!(a.noise_static_public(), c.noise_static_public());
    }

    #[test]
    fn truncated_pem_is_corrupt() {
        let pem = Identity::generate().to_pkcs8_pem();
        let cut = &pem[..pem.len() - 30];
        let err = Identity::from_pem_or_openssh(cut, "k")
            .unwrap_err()
            .to_string();
        assert!(err.contains("corrupt"), "{err}");
    }

    #[test]
    fn names_other_pkcs8_algorithms() {
        // An X25519 PKCS#8 key (RFC 8410 example), same shape as Ed25519 with OID 1.3.101.110.
        let x25519 = "-----BEGIN PRIVATE KEY-----\n\
                      MC4CAQAwBQYDK2VuBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
                      -----END PRIVATE KEY-----\n";
        let err = Identity::from_pem_or_openssh(x25519, "x.pem")
            .unwrap_err()
            .to_string();
        assert!(err.contains("another algorithm (X25519)"), "{err}");
    }
}
