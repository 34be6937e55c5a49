//! A key log for protocol research: the secrets of each handshake written
//! out so that a capture of the session can be decrypted afterwards, like
//! TLS's `SSLKEYLOGFILE` (SPEC.md, appendix A, gives the format).
//!
//! **Anyone who holds a key log line can read that session**: the identity
//! payloads of its handshake and every transport frame, both ways, for its
//! whole life. A key log exists for debugging and research on your own
//! sessions, never in production.
//!
//! The key log is **off by default**. An application turns it on for the
//! handshakes of one configuration with
//! [`HandshakeConfig::with_key_log`](crate::wire::HandshakeConfig::with_key_log)
//! (which every `*Config` that makes connections carries: `StreamConfig`,
//! `ClientConfig`, `ServerConfig`, `NetworkConfig`), giving it a sink: a
//! [`KeyLogFile`], or any [`KeyLog`] of its own. The library never turns it
//! on by itself: the environment variable [`KEYLOG_ENV`]
//! (`CAPNP_NOISE_KEYLOG`) is read only by the `capnp-noise` command and this
//! crate's examples, which warn loudly when it is set.
//!
//! ```
//! use std::sync::Arc;
//! use capnp_noise::keylog::KeyLogFile;
//! use capnp_noise::wire::HandshakeConfig;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("keys.log");
//! // Research only: whoever reads this file can decrypt these sessions.
//! let log = KeyLogFile::create(&path)?;
//! let config = HandshakeConfig::default().with_key_log(Some(Arc::new(log)));
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! # What is logged
//!
//! One line per secret, each keyed by the initiator's ephemeral public key
//! (message 1, which travels in clear, so a capture holds it too):
//!
//! ```text
//! HANDSHAKE_KEY_EE <initiator ephemeral, hex> <key, hex>
//! ```
//!
//! The five labels are [`LABELS`]: the three Noise cipher keys of the
//! handshake (after `ee`, `es` and `se`) and the two transport keys of
//! `Split()`. The handshake hash `h`, which the handshake's AEADs take as
//! associated data, is not logged: it is computed from public data (the
//! protocol name, the preamble and the handshake messages as sent). Rekeys
//! are not logged either: REKEY is Noise's deterministic `Rekey()` of the
//! current key (SPEC.md 7.3), which a decoder applies itself.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroizing;

/// The environment variable that the `capnp-noise` command and this
/// crate's examples read to turn the key log on (a file to append to).
/// The library itself never reads it.
pub const KEYLOG_ENV: &str = "CAPNP_NOISE_KEYLOG";

/// The key after `ee`: decrypts the responder's static key in message 2.
pub const HANDSHAKE_KEY_EE: &str = "HANDSHAKE_KEY_EE";
/// The key after `es`: decrypts message 2's payload (nonce 0) and the
/// initiator's static key in message 3 (nonce 1).
pub const HANDSHAKE_KEY_ES: &str = "HANDSHAKE_KEY_ES";
/// The key after `se`: decrypts message 3's payload.
pub const HANDSHAKE_KEY_SE: &str = "HANDSHAKE_KEY_SE";
/// The first key of `Split()`: the initiator's frames to the responder,
/// before any REKEY.
pub const INITIATOR_TRAFFIC_KEY: &str = "INITIATOR_TRAFFIC_KEY";
/// The second key of `Split()`: the responder's frames to the initiator,
/// before any REKEY.
pub const RESPONDER_TRAFFIC_KEY: &str = "RESPONDER_TRAFFIC_KEY";

/// Every label of a key log line, in the order a handshake logs them.
pub const LABELS: [&str; 5] = [
    HANDSHAKE_KEY_EE,
    HANDSHAKE_KEY_ES,
    HANDSHAKE_KEY_SE,
    INITIATOR_TRAFFIC_KEY,
    RESPONDER_TRAFFIC_KEY,
];

/// The longest key log line [`parse_line`] accepts (label, two 64-digit hex
/// fields, separators), so a decoder reading a hostile file stays bounded.
pub const MAX_LINE_LEN: usize = 256;

/// Where a handshake writes its secrets (see the [module docs](self)).
///
/// Both roles log, the same lines: an initiator and a responder of one
/// session produce identical key logs. Implementations must not block for
/// long: `log` is called in the middle of a handshake.
///
/// ```
/// use std::sync::Mutex;
/// use capnp_noise::keylog::KeyLog;
///
/// /// Keeps the lines in memory (a test's sink).
/// #[derive(Debug, Default)]
/// struct Lines(Mutex<Vec<String>>);
///
/// impl KeyLog for Lines {
///     fn log(&self, label: &str, initiator_ephemeral: &[u8; 32], secret: &[u8]) {
///         let line = capnp_noise::keylog::format_line(label, initiator_ephemeral, secret);
///         self.0.lock().unwrap().push(line);
///     }
/// }
/// ```
pub trait KeyLog: fmt::Debug + Send + Sync {
    /// Records one secret: `label` is one of [`LABELS`],
    /// `initiator_ephemeral` the initiator's ephemeral public key (message
    /// 1), `secret` the 32-byte key.
    fn log(&self, label: &str, initiator_ephemeral: &[u8; 32], secret: &[u8]);
}

/// One key log line, without its newline: `LABEL <hex> <hex>`.
pub fn format_line(label: &str, initiator_ephemeral: &[u8; 32], secret: &[u8]) -> String {
    let hex = data_encoding::HEXLOWER;
    format!(
        "{label} {} {}",
        hex.encode(initiator_ephemeral),
        hex.encode(secret)
    )
}

/// A [`KeyLog`] that appends lines to a file, created readable and
/// writable by its owner only (mode 0600 on Unix).
///
/// Each line goes out in one `write` on a file opened for appending, so
/// several processes can share one file. A failed write is reported once
/// through `tracing` (the handshake goes on).
#[derive(Debug)]
pub struct KeyLogFile {
    file: Mutex<File>,
    failed: std::sync::atomic::AtomicBool,
}

impl KeyLogFile {
    /// Opens `path` for appending, creating it (mode 0600 on Unix) if it
    /// does not exist. An existing file keeps its mode. Logs a warning
    /// (`tracing`) that the key log is on.
    ///
    /// # Errors
    /// The error of opening the file.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let mut options = OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(path)?;
        tracing::warn!(
            path = %path.display(),
            "the Noise key log is ON: whoever reads this file can decrypt the sessions it records"
        );
        Ok(KeyLogFile {
            file: Mutex::new(file),
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

impl KeyLog for KeyLogFile {
    fn log(&self, label: &str, initiator_ephemeral: &[u8; 32], secret: &[u8]) {
        let mut line = Zeroizing::new(format_line(label, initiator_ephemeral, secret));
        line.push('\n');
        let result = match self.file.lock() {
            Ok(mut f) => f.write_all(line.as_bytes()),
            Err(_) => Err(io::Error::other("the key log's lock was poisoned")),
        };
        if let Err(e) = result {
            if !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot write to the Noise key log");
            }
        }
    }
}

/// One parsed key log line.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyLogLine {
    /// One of [`LABELS`].
    pub label: &'static str,
    /// The initiator's ephemeral public key: which session the line is for.
    pub initiator_ephemeral: [u8; 32],
    /// The key.
    pub secret: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for KeyLogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyLogLine")
            .field("label", &self.label)
            .field(
                "initiator_ephemeral",
                &data_encoding::HEXLOWER.encode(&self.initiator_ephemeral),
            )
            .finish_non_exhaustive()
    }
}

/// Why a key log line did not parse. Its `Display` names the field, never
/// the line's content (which may hold a key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLogParseError(&'static str);

impl fmt::Display for KeyLogParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for KeyLogParseError {}

/// Parses one line of a key log (with or without its line ending).
/// Returns `Ok(None)` for a blank line or a comment (`#` first).
///
/// # Errors
/// A line longer than [`MAX_LINE_LEN`], an unknown label, a field that is
/// not 64 hex digits, or a wrong number of fields.
///
/// ```
/// use capnp_noise::keylog::{parse_line, HANDSHAKE_KEY_EE};
///
/// let line = format!("{HANDSHAKE_KEY_EE} {} {}", "ab".repeat(32), "01".repeat(32));
/// let parsed = parse_line(&line).unwrap().unwrap();
/// assert_eq!(parsed.label, HANDSHAKE_KEY_EE);
/// assert_eq!(parsed.initiator_ephemeral, [0xab; 32]);
/// assert!(parse_line("# a comment").unwrap().is_none());
/// assert!(parse_line("HANDSHAKE_KEY_EE 00").is_err());
/// ```
pub fn parse_line(line: &str) -> Result<Option<KeyLogLine>, KeyLogParseError> {
    if line.len() > MAX_LINE_LEN {
        return Err(KeyLogParseError("key log line too long"));
    }
    let line = line.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut fields = line.split_ascii_whitespace();
    let label = fields.next().unwrap_or_default();
    let label = LABELS
        .iter()
        .find(|l| **l == label)
        .ok_or(KeyLogParseError("key log line: unknown label"))?;
    let initiator_ephemeral = hex32(
        fields.next(),
        "key log line: bad initiator ephemeral key (want 64 hex digits)",
    )?;
    let secret = hex32(
        fields.next(),
        "key log line: bad secret (want 64 hex digits)",
    )?;
    if fields.next().is_some() {
        return Err(KeyLogParseError("key log line: more than three fields"));
    }
    Ok(Some(KeyLogLine {
        label,
        initiator_ephemeral: *initiator_ephemeral,
        secret,
    }))
}

fn hex32(field: Option<&str>, what: &'static str) -> Result<Zeroizing<[u8; 32]>, KeyLogParseError> {
    let field = field.ok_or(KeyLogParseError(what))?;
    if field.len() != 64 {
        return Err(KeyLogParseError(what));
    }
    let bytes = Zeroizing::new(
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(field.as_bytes())
            .map_err(|_| KeyLogParseError(what))?,
    );
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&bytes);
    Ok(out)
}

/// The cipher keys a handshake's Noise state was given, in order (the
/// handshake's `MixKey`s: after `ee`, `es`, `se`).
pub(crate) type KeyRecorder = Arc<Mutex<Vec<Zeroizing<[u8; 32]>>>>;

/// A resolver that hands out the ciphers of `inner`, each recording the
/// keys it is set to. Used only when a key log is configured.
pub(crate) fn recording(inner: BoxedCryptoResolver, keys: KeyRecorder) -> BoxedCryptoResolver {
    Box::new(Recording { inner, keys })
}

struct Recording {
    inner: BoxedCryptoResolver,
    keys: KeyRecorder,
}

impl CryptoResolver for Recording {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        self.inner.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        self.inner.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        self.inner.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        let inner = self.inner.resolve_cipher(choice)?;
        Some(Box::new(RecordingCipher {
            inner,
            keys: self.keys.clone(),
        }))
    }
}

struct RecordingCipher {
    inner: Box<dyn Cipher>,
    keys: KeyRecorder,
}

impl Cipher for RecordingCipher {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn set(&mut self, key: &[u8; 32]) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.push(Zeroizing::new(*key));
        }
        self.inner.set(key);
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        self.inner.encrypt(nonce, authtext, plaintext, out)
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        self.inner.decrypt(nonce, authtext, ciphertext, out)
    }

    fn rekey(&mut self) {
        self.inner.rekey();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_bad_lines_name_the_field() {
        let line = format_line(INITIATOR_TRAFFIC_KEY, &[7; 32], &[9; 32]);
        let parsed = parse_line(&(line.clone() + "\n")).unwrap().unwrap();
        assert_eq!(parsed.label, INITIATOR_TRAFFIC_KEY);
        assert_eq!(parsed.initiator_ephemeral, [7; 32]);
        assert_eq!(*parsed.secret, [9; 32]);
        assert_eq!(parse_line("").unwrap(), None);
        let secretish = format!("NOPE {} {}", "07".repeat(32), "09".repeat(32));
        let e = parse_line(&secretish).unwrap_err().to_string();
        assert!(e.contains("unknown label") && !e.contains("0909"), "{e}");
        let short = format!("{HANDSHAKE_KEY_SE} {} 0909", "07".repeat(32));
        assert!(parse_line(&short)
            .unwrap_err()
            .to_string()
            .contains("bad secret"));
        assert!(parse_line(&format!("{line} extra")).is_err());
        assert!(parse_line(&"x".repeat(MAX_LINE_LEN + 1)).is_err());
        // Hex digits in either case.
        assert!(parse_line(&line.to_uppercase()).unwrap().is_some());
    }
}
