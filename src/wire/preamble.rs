//! The initiator's cleartext preamble and the choice of cipher suite
//! (SPEC.md, "Negotiation").
//!
//! ```text
//! magic "capnp-noise" (11 bytes) || version: u8 = 1 || name_len: u8 || name[name_len]
//! ```
//!
//! `name` is the full Noise protocol name the initiator chose, e.g.
//! `Noise_XX_25519_ChaChaPoly_BLAKE2s`. The whole preamble, byte for byte,
//! is the Noise prologue of both sides, so a preamble altered in flight makes
//! the handshake fail.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ProtocolError};

/// The preamble's first bytes.
pub const MAGIC: &[u8; 11] = b"capnp-noise";
/// The protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// The longest protocol name a preamble may carry.
pub const MAX_NAME_LEN: usize = 64;
/// The longest preamble.
pub const MAX_PREAMBLE_LEN: usize = MAGIC.len() + 2 + MAX_NAME_LEN;

/// A Noise cipher suite of protocol version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Suite {
    /// `Noise_XX_25519_ChaChaPoly_BLAKE2s`: mandatory to implement; fast
    /// everywhere, constant time without hardware support.
    ChaChaPolyBlake2s,
    /// `Noise_XX_25519_AESGCM_SHA256`: optional; the fastest choice on
    /// machines with AES hardware (x86-64 AES-NI, ARMv8 crypto extensions).
    AesGcmSha256,
}

impl Suite {
    /// Every suite this implementation supports, mandatory one first.
    pub const ALL: [Suite; 2] = [Suite::ChaChaPolyBlake2s, Suite::AesGcmSha256];

    /// The suite every implementation supports as initiator and responder
    /// (SPEC.md 3), and the one an initiator retries with after a silent
    /// close (SPEC.md 2, [`HandshakeConfig::fallback_after`](super::HandshakeConfig::fallback_after)).
    pub const MANDATORY: Suite = Suite::ChaChaPolyBlake2s;

    /// The full Noise protocol name (of the `XX` handshake).
    pub fn noise_name(self) -> &'static str {
        self.noise_name_for(Pattern::XX)
    }

    /// The full Noise protocol name of `pattern` with this suite's
    /// primitives (SPEC.md 3 and 14).
    pub fn noise_name_for(self, pattern: Pattern) -> &'static str {
        match (pattern, self) {
            (Pattern::XX, Suite::ChaChaPolyBlake2s) => "Noise_XX_25519_ChaChaPoly_BLAKE2s",
            (Pattern::XX, Suite::AesGcmSha256) => "Noise_XX_25519_AESGCM_SHA256",
            (Pattern::IK, Suite::ChaChaPolyBlake2s) => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
            (Pattern::IK, Suite::AesGcmSha256) => "Noise_IK_25519_AESGCM_SHA256",
        }
    }

    pub(crate) fn params_for(self, pattern: Pattern) -> snow::params::NoiseParams {
        self.noise_name_for(pattern)
            .parse()
            .expect("suite names are valid Noise protocol names")
    }

    /// Looks a suite up by its full Noise protocol name.
    pub fn from_noise_name(name: &str) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.noise_name() == name)
    }

    /// The suite to prefer on this machine: AES-GCM where the CPU has AES
    /// instructions, ChaChaPoly otherwise.
    pub fn preferred() -> Suite {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
            {
                return Suite::AesGcmSha256;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes") {
                return Suite::AesGcmSha256;
            }
        }
        Suite::ChaChaPolyBlake2s
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noise_name())
    }
}

impl FromStr for Suite {
    type Err = Error;

    /// Accepts the full Noise name, or the short names `chachapoly` and `aesgcm`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "chachapoly" | "chacha" => return Ok(Suite::ChaChaPolyBlake2s),
            "aesgcm" | "aes" => return Ok(Suite::AesGcmSha256),
            _ => {}
        }
        Suite::from_noise_name(s).ok_or_else(|| {
            Error::Config(format!(
                "unknown suite {s:?}: use chachapoly, aesgcm, or a full name such as {}",
                Suite::ChaChaPolyBlake2s
            ))
        })
    }
}

/// The Noise handshake pattern a preamble names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Pattern {
    /// `XX` (SPEC.md 6): the full handshake, three messages.
    XX,
    /// `IK` (SPEC.md 14): resumption with a responder whose static key the
    /// initiator already knows, two messages, with an `XX` fallback.
    IK,
}

/// Encodes the preamble for `suite` (and the `XX` pattern).
pub fn encode(suite: Suite) -> Vec<u8> {
    encode_for(suite, Pattern::XX)
}

/// Encodes the preamble for `suite` and `pattern`.
pub fn encode_for(suite: Suite, pattern: Pattern) -> Vec<u8> {
    let name = suite.noise_name_for(pattern).as_bytes();
    let mut v = Vec::with_capacity(MAGIC.len() + 2 + name.len());
    v.extend_from_slice(MAGIC);
    v.push(VERSION);
    v.push(name.len() as u8);
    v.extend_from_slice(name);
    v
}

/// A preamble as the responder parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The suite the initiator chose.
    pub suite: Suite,
    /// The handshake pattern it chose.
    pub pattern: Pattern,
    /// How many bytes the preamble occupies (it is also the Noise prologue).
    pub len: usize,
}

/// Parses a preamble from the bytes received so far, accepting only `accepted` suites.
///
/// Returns `Ok(None)` while more bytes are needed. Each byte is checked as
/// soon as it arrives, so a peer speaking another protocol is refused early.
///
/// # Errors
/// [`ProtocolError::BadMagic`], [`ProtocolError::UnsupportedVersion`],
/// [`ProtocolError::BadPreamble`] (a zero, over-long or non-printable name)
/// and [`ProtocolError::UnsupportedSuite`] (a name that is not one of `accepted`).
pub fn parse(buf: &[u8], accepted: &[Suite]) -> Result<Option<Parsed>, Error> {
    let m = buf.len().min(MAGIC.len());
    if buf[..m] != MAGIC[..m] {
        return Err(ProtocolError::BadMagic.into());
    }
    let Some(&version) = buf.get(MAGIC.len()) else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(ProtocolError::UnsupportedVersion(version).into());
    }
    let Some(&name_len) = buf.get(MAGIC.len() + 1) else {
        return Ok(None);
    };
    let name_len = name_len as usize;
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(ProtocolError::BadPreamble("protocol name length must be 1 to 64").into());
    }
    let start = MAGIC.len() + 2;
    let avail = &buf[start..buf.len().min(start + name_len)];
    if !avail.iter().all(|b| b.is_ascii_graphic()) {
        return Err(ProtocolError::BadPreamble("protocol name is not printable ASCII").into());
    }
    if avail.len() < name_len {
        return Ok(None);
    }
    let name = std::str::from_utf8(avail).expect("checked ASCII");
    let found = [Pattern::XX, Pattern::IK]
        .into_iter()
        .flat_map(|p| Suite::ALL.into_iter().map(move |s| (p, s)))
        .find(|(p, s)| s.noise_name_for(*p) == name);
    match found {
        Some((pattern, suite)) if accepted.contains(&suite) => Ok(Some(Parsed {
            suite,
            pattern,
            len: start + name_len,
        })),
        _ => Err(ProtocolError::UnsupportedSuite(name.to_string()).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_suite_any_split() {
        for s in Suite::ALL {
            let p = encode(s);
            for cut in 0..p.len() {
                assert_eq!(parse(&p[..cut], &Suite::ALL).unwrap(), None);
            }
            assert_eq!(
                parse(&p, &Suite::ALL).unwrap(),
                Some(Parsed {
                    suite: s,
                    pattern: Pattern::XX,
                    len: p.len()
                })
            );
            let p = encode_for(s, Pattern::IK);
            assert_eq!(
                parse(&p, &Suite::ALL).unwrap(),
                Some(Parsed {
                    suite: s,
                    pattern: Pattern::IK,
                    len: p.len()
                })
            );
            // An IK preamble is accepted exactly when its suite is.
            let others: Vec<Suite> = Suite::ALL.into_iter().filter(|o| *o != s).collect();
            assert!(parse(&p, &others).is_err());
        }
    }

    #[test]
    fn refusals_are_named() {
        let p = encode(Suite::AesGcmSha256);
        let err = parse(&p, &[Suite::ChaChaPolyBlake2s]).unwrap_err();
        assert!(
            err.to_string().contains("Noise_XX_25519_AESGCM_SHA256"),
            "{err}"
        );
        assert!(matches!(
            parse(b"GET / HTTP/1.1", &Suite::ALL),
            Err(Error::Protocol(ProtocolError::BadMagic))
        ));
        let mut v = p.clone();
        v[11] = 2;
        assert!(matches!(
            parse(&v, &Suite::ALL),
            Err(Error::Protocol(ProtocolError::UnsupportedVersion(2)))
        ));
        let mut v = p.clone();
        v[12] = 0;
        assert!(parse(&v, &Suite::ALL).is_err());
        let mut v = p;
        v[14] = b'\n';
        assert!(parse(&v, &Suite::ALL).is_err());
    }
}
