//! [`VatId`]: a vat's long-term public identity, and its text forms.
//!
//! A VatId is an Ed25519 public key. Its canonical text form (SPEC.md,
//! "VatId text form") is designed to be read, pasted and compared by people:
//!
//! ```text
//! vat1 + base32(key || check)      e.g. vat1ab3x...q7 (59 characters)
//! ```
//!
//! * `vat1` names the kind (Ed25519, version 1);
//! * base32 is RFC 4648's alphabet in lower case without padding (letters and
//!   the digits 2-7 only, so a double click selects the whole id and no
//!   shell or URI quoting is ever needed);
//! * `check` is the first two bytes of `SHA-256("capnp-noise vat-id check" ||
//!   key)`, so a mistyped or truncated id is rejected instead of naming
//!   another vat.
//!
//! [`VatId::fingerprint`] is the short form for logs: the first 16 characters.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// The prefix of every VatId in text form.
pub const VAT_ID_PREFIX: &str = "vat1";
/// The length of a VatId's canonical text form, prefix included.
pub const VAT_ID_TEXT_LEN: usize = 59;
/// The length of [`VatId::fingerprint`].
pub const FINGERPRINT_LEN: usize = 16;
const CHECK_DOMAIN: &[u8] = b"capnp-noise vat-id check";

/// A vat's long-term identity: an Ed25519 public key.
///
/// Obtained from a handshake (the peer's authenticated identity), from an
/// [`Identity`](crate::Identity), or parsed from its text form:
///
/// ```
/// use capnp_noise::{Identity, VatId};
/// let id = Identity::generate().vat_id();
/// let text = id.to_string();
/// assert!(text.starts_with("vat1"));
/// assert_eq!(text.parse::<VatId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VatId([u8; 32]);

impl VatId {
    /// A VatId from bytes that already passed [`from_bytes`](Self::from_bytes)
    /// (the handshake's cache of verified identity bindings).
    pub(crate) fn from_verified_bytes(bytes: [u8; 32]) -> Self {
        VatId(bytes)
    }

    /// Builds a VatId from a 32-byte Ed25519 public key.
    ///
    /// The bytes must be the canonical encoding of a point (SPEC.md 5.2):
    /// they are decoded, the point is encoded again, and the two must be
    /// equal. That refuses an encoded `y` of `p = 2^255 - 19` or more, and
    /// `x = 0` with the sign bit set, both of which ed25519-dalek alone
    /// would accept. Every VatId parser (text form, handshake payload,
    /// sturdy refs, introductions, trust files) comes through here.
    ///
    /// # Errors
    /// [`Error::Key`] if the bytes are not a valid Ed25519 point, are not
    /// its canonical encoding, or are a weak (small-order) key that could
    /// never verify a strict signature.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, Error> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| Error::Key("not a valid Ed25519 public key".into()))?;
        if key.to_edwards().compress().as_bytes() != bytes {
            return Err(Error::Key(
                "not the canonical encoding of an Ed25519 point (y >= 2^255 - 19, or x = 0 with the sign bit set)"
                    .into(),
            ));
        }
        if key.is_weak() {
            return Err(Error::Key(
                "a weak (small-order) Ed25519 key cannot be a VatId".into(),
            ));
        }
        Ok(VatId(*bytes))
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The Ed25519 verifying key.
    pub fn verifying_key(&self) -> VerifyingKey {
        // Validated in `from_bytes`; every VatId is built through it.
        VerifyingKey::from_bytes(&self.0).expect("VatId holds a validated key")
    }

    /// Verifies a strict Ed25519 signature by this vat over `msg`.
    ///
    /// # Errors
    /// [`Error::BadIdentityProof`] if the signature does not verify.
    pub fn verify(&self, msg: &[u8], signature: &[u8; 64]) -> Result<(), Error> {
        // Fuzzing builds with cheap crypto only (see src/fuzz_crypto.rs).
        #[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
        let valid = crate::fuzz_crypto::verify(&self.0, msg, signature);
        #[cfg(not(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
        let valid = self
            .verifying_key()
            .verify_strict(msg, &Signature::from_bytes(signature))
            .is_ok();
        valid
            .then_some(())
            .ok_or(Error::BadIdentityProof("the signature does not verify"))
    }

    /// The short form for logs: the first 16 characters of the text form
    /// (60 bits of the key). Not an identity check: compare full VatIds.
    pub fn fingerprint(&self) -> String {
        let mut s = self.to_string();
        s.truncate(FINGERPRINT_LEN);
        s
    }

    /// Reads a `VatId` struct of `schema/noise.capnp`.
    ///
    /// # Errors
    /// A description of the problem (a wrong key length, an invalid key, a
    /// malformed message) for the caller to wrap in its own error.
    pub(crate) fn read_capnp(
        reader: capnp::Result<crate::schema::noise_capnp::vat_id::Reader<'_>>,
    ) -> Result<Self, String> {
        let key = reader
            .and_then(|v| v.get_ed25519())
            .map_err(|e| format!("bad vatId: {e}"))?;
        let key: &[u8; 32] = key
            .try_into()
            .map_err(|_| format!("vatId.ed25519 has {} bytes, not 32", key.len()))?;
        VatId::from_bytes(key).map_err(|e| e.to_string())
    }

    fn check(key: &[u8; 32]) -> [u8; 2] {
        let digest = Sha256::new()
            .chain_update(CHECK_DOMAIN)
            .chain_update(key)
            .finalize();
        [digest[0], digest[1]]
    }
}

impl fmt::Display for VatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = [0u8; 34];
        raw[..32].copy_from_slice(&self.0);
        raw[32..].copy_from_slice(&Self::check(&self.0));
        f.write_str(VAT_ID_PREFIX)?;
        f.write_str(
            &data_encoding::BASE32_NOPAD
                .encode(&raw)
                .to_ascii_lowercase(),
        )
    }
}

impl fmt::Debug for VatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VatId({self})")
    }
}

impl FromStr for VatId {
    type Err = Error;

    /// Parses the canonical text form.
    ///
    /// # Errors
    /// [`Error::Key`] naming the problem: wrong prefix, wrong length (a
    /// fingerprint is not a VatId), a character outside the alphabet (upper
    /// case included: the form is canonical), a failed check (a typo), or
    /// bytes that are not an Ed25519 key.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Key(format!("invalid VatId {:?}: {why}", shorten(s)));
        let Some(body) = s.strip_prefix(VAT_ID_PREFIX) else {
            return Err(bad(format!("it must start with {VAT_ID_PREFIX:?}")));
        };
        if s.len() == FINGERPRINT_LEN {
            return Err(bad(
                "this is a short fingerprint; a full VatId has 59 characters".into(),
            ));
        }
        if s.len() != VAT_ID_TEXT_LEN {
            return Err(bad(format!(
                "it has {} characters; a VatId has exactly {VAT_ID_TEXT_LEN}",
                s.chars().count()
            )));
        }
        if let Some((i, c)) = body
            .char_indices()
            .find(|(_, c)| !matches!(c, 'a'..='z' | '2'..='7'))
        {
            return Err(bad(format!(
                "character {c:?} at position {} is not one of a-z, 2-7",
                i + VAT_ID_PREFIX.len() + 1
            )));
        }
        let raw = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad("it is not canonical base32 (trailing bits set)".into()))?;
        let key: [u8; 32] = raw[..32].try_into().expect("34 bytes decoded");
        if raw[32..] != Self::check(&key) {
            return Err(bad(
                "its check characters do not match (a typo, or a truncated copy)".into(),
            ));
        }
        VatId::from_bytes(&key).map_err(|e| bad(e.to_string()))
    }
}

/// Keeps error messages short when someone pastes a whole file.
pub(crate) fn shorten(s: &str) -> String {
    if s.chars().count() > 80 {
        let mut t: String = s.chars().take(77).collect();
        t.push_str("...");
        t
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use proptest::prelude::*;

    #[test]
    fn text_form_has_documented_shape() {
        let id = Identity::from_seed(&[7; 32]).vat_id();
        let s = id.to_string();
        assert_eq!(s.len(), VAT_ID_TEXT_LEN);
        assert!(s.starts_with("vat1"));
        assert!(s[4..].chars().all(|c| matches!(c, 'a'..='z' | '2'..='7')));
        assert_eq!(id.fingerprint(), s[..16]);
    }

    #[test]
    fn rejects_malformed_text_with_named_reason() {
        let s = Identity::from_seed(&[9; 32]).vat_id().to_string();
        let cases: Vec<(String, &str)> = vec![
            (s.replacen("vat1", "vat2", 1), "must start"),
            (s[..40].to_string(), "59"),
            (s[..16].to_string(), "fingerprint"),
            (s.to_uppercase(), "must start"),
            (format!("vat1{}", s[4..].to_uppercase()), "not one of"),
            (format!("{}8", &s[..58]), "not one of"),
            (format!("{s}a"), "59"),
        ];
        for (input, want) in cases {
            let err = input.parse::<VatId>().unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    #[test]
    fn a_single_typo_is_caught() {
        let s = Identity::from_seed(&[3; 32]).vat_id().to_string();
        let mut caught = 0;
        for pos in 4..s.len() {
            for c in ['a', 'q', '7'] {
                let mut b = s.clone().into_bytes();
                if b[pos] == c as u8 {
                    continue;
                }
                b[pos] = c as u8;
                let t = String::from_utf8(b).unwrap();
                match t.parse::<VatId>() {
                    Ok(v) => panic!("typo at {pos} parsed as {v}"),
                    Err(_) => caught += 1,
                }
            }
        }
        assert!(caught > 100);
    }

    #[test]
    fn rejects_weak_keys() {
        // The identity point (a small-order point) encodes as 1 followed by zeros.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(VatId::from_bytes(&weak).is_err());
    }

    /// The 34 bytes of key and check are 272 bits and the 55 characters
    /// carry 275: the last character's 3 low bits are unused and must be
    /// zero (SPEC.md 10.1), each of them.
    #[test]
    fn each_unused_bit_of_the_last_character_is_refused() {
        let s = Identity::from_seed(&[4; 32]).vat_id().to_string();
        let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
        let last = s.as_bytes()[58];
        let value = alphabet.iter().position(|&c| c == last).unwrap();
        assert_eq!(
            value & 0b111,
            0,
            "{s}: unused bits set in the canonical form"
        );
        for bit in 0..3 {
            let c = alphabet[value | 1 << bit] as char;
            let t = format!("{}{c}", &s[..58]);
            let err = t.parse::<VatId>().unwrap_err().to_string();
            assert!(err.contains("trailing bits"), "bit {bit}: {err}");
        }
    }

    /// `y = p + 3` (the example of issue 14) decodes, to a point of large
    /// order, in ed25519-dalek; its canonical encoding is `y = 3`. Both the
    /// bytes and the text form are refused, and the canonical encoding of
    /// the same point is not (it is not small-order).
    #[test]
    fn refuses_a_non_canonical_encoding_of_a_valid_point() {
        let mut y_p3 = [0xff; 32];
        y_p3[0] = 0xf0;
        y_p3[31] = 0x7f;
        let point = VerifyingKey::from_bytes(&y_p3).expect("dalek decodes y >= p");
        assert!(!point.is_weak());
        let err = VatId::from_bytes(&y_p3).unwrap_err().to_string();
        assert!(err.contains("canonical"), "{err}");
        let canonical = point.to_edwards().compress().to_bytes();
        assert_eq!(canonical[0], 3);
        assert!(VatId::from_bytes(&canonical).is_ok());
        let text = text_of_raw(&y_p3);
        let err = text.parse::<VatId>().unwrap_err().to_string();
        assert!(err.contains("canonical"), "{err}");
    }

    /// `x = 0` with the sign bit set: the neutral point `y = 1` and the
    /// point of order 2, `y = p - 1`. RFC 8032 refuses these encodings;
    /// re-encoding (sign bit clear) refuses them too, before the
    /// small-order check.
    #[test]
    fn refuses_x_zero_with_the_sign_bit() {
        let mut one = [0u8; 32];
        one[0] = 1;
        let mut minus_one = [0xff; 32];
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        for key in [one, minus_one] {
            assert!(VatId::from_bytes(&key)
                .unwrap_err()
                .to_string()
                .contains("small-order"));
            let mut signed = key;
            signed[31] |= 0x80;
            let err = VatId::from_bytes(&signed).unwrap_err().to_string();
            assert!(err.contains("canonical"), "{err}");
        }
    }

    /// The text form of any 32 bytes, with a correct check: what a typo
    /// cannot produce, but a hand-made VatId can.
    pub(crate) fn text_of_raw(key: &[u8; 32]) -> String {
        let mut raw = [0u8; 34];
        raw[..32].copy_from_slice(key);
        raw[32..].copy_from_slice(&VatId::check(key));
        format!(
            "{VAT_ID_PREFIX}{}",
            data_encoding::BASE32_NOPAD
                .encode(&raw)
                .to_ascii_lowercase()
        )
    }

    proptest! {
        #[test]
        fn text_round_trips(seed in any::<[u8; 32]>()) {
            let id = Identity::from_seed(&seed).vat_id();
            prop_assert_eq!(id.to_string().parse::<VatId>().unwrap(), id);
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<VatId>();
        }
    }
}
