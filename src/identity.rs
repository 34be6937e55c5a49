//! [`Identity`]: a vat's secret key, and the Noise static key it vouches for.
//!
//! An identity owns two keys (SPEC.md, "Identity binding"):
//!
//! * the long-term **Ed25519 signing key**, whose public half is the
//!   [`VatId`]; it is what key files store;
//! * a **Noise static key** (X25519), derived from the Ed25519 secret seed
//!   when the identity is created or loaded ([`STATIC_KEY_DERIVATION`]) and
//!   never stored. The Ed25519 key signs it once, and the encoded handshake
//!   payload is kept, so no handshake pays for a signature.
//!
//! Because the static key is a function of the seed, a vat that restarts
//! with the same key file has the same static key, and clients that
//! remember it (SPEC.md 14.1, [`ResumptionCache`](crate::wire::ResumptionCache))
//! resume with it instead of falling back. This gives nothing away that the
//! Ed25519 key did not already give: whoever holds the seed can sign any
//! static key as this vat's, so the static key adds no secret of its own
//! (SPEC.md 14.1).

use std::fmt;
use std::sync::Arc;

use ed25519_dalek::{Signer, SigningKey};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::vat_id::VatId;
use crate::wire::payload;
use crate::wire::resolver::StaticKeyPair;

/// A vat's secret identity.
///
/// `Debug` never prints secrets, and every secret is zeroized when the
/// identity is dropped. Cloning is cheap apart from copying the keys;
/// share one identity between connections with an [`Arc`].
///
/// ```
/// use capnp_noise::Identity;
/// let me = Identity::generate();
/// println!("my VatId is {}", me.vat_id());
/// assert!(!format!("{me:?}").contains("secret"));
/// ```
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    vat_id: VatId,
    /// The Noise static key pair, parsed once for every handshake (zeroized
    /// on drop).
    static_key: Arc<StaticKeyPair>,
    payload: Arc<[u8]>,
}

impl Identity {
    /// Generates a new random identity.
    pub fn generate() -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut());
        Self::from_seed(&seed)
    }

    /// Builds an identity from a 32-byte Ed25519 secret seed (RFC 8032).
    /// The Noise static key is derived from the seed
    /// ([`STATIC_KEY_DERIVATION`]): the same seed gives the same static key.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(seed))
    }

    /// Builds an identity from an Ed25519 signing key. The Noise static key
    /// is derived from the key's seed ([`STATIC_KEY_DERIVATION`]), so that
    /// loading the same key file twice gives the same static key and a
    /// restart does not invalidate the records clients keep (SPEC.md 14.1).
    pub fn from_signing_key(signing: SigningKey) -> Self {
        let static_secret = derive_static_secret(&signing.to_bytes());
        Self::with_static_secret(signing, static_secret)
    }

    /// Builds an identity whose Noise static key is given rather than
    /// derived from the seed.
    ///
    /// Use it for reproducible test vectors and for tests of a responder
    /// whose static key changed; the derived key (the other constructors)
    /// is the right choice everywhere else.
    pub fn from_seed_and_static_key(seed: &[u8; 32], static_secret: &[u8; 32]) -> Self {
        Self::with_static_secret(SigningKey::from_bytes(seed), Zeroizing::new(*static_secret))
    }

    fn with_static_secret(signing: SigningKey, static_secret: Zeroizing<[u8; 32]>) -> Self {
        let vat_id = VatId::from_bytes(signing.verifying_key().as_bytes())
            .expect("an Ed25519 key derived from a seed is never weak");
        let static_key = Arc::new(StaticKeyPair::new(&static_secret));
        let signature = sign(
            &signing,
            &vat_id,
            &payload::binding_message(static_key.public()),
        );
        let payload = payload::encode(&vat_id, &signature).into();
        Identity {
            signing,
            vat_id,
            static_key,
            payload,
        }
    }

    /// This vat's public identity.
    pub fn vat_id(&self) -> VatId {
        self.vat_id
    }

    /// The Ed25519 signing key (for key files and signed introductions).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// Signs `msg` with the identity's Ed25519 key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        sign(&self.signing, &self.vat_id, msg)
    }

    /// The X25519 public key this identity uses as its Noise static key.
    pub fn noise_static_public(&self) -> &[u8; 32] {
        self.static_key.public()
    }

    #[cfg(test)]
    fn noise_static_secret(&self) -> &[u8; 32] {
        self.static_key.secret()
    }

    pub(crate) fn noise_static_key(&self) -> &Arc<StaticKeyPair> {
        &self.static_key
    }

    /// The encoded handshake payload (VatId and signature over the static key).
    pub(crate) fn handshake_payload(&self) -> &Arc<[u8]> {
        &self.payload
    }

    /// [`handshake_payload`](Self::handshake_payload), for the fuzz targets'
    /// seeds. Test hook of the private `__test-hooks` feature.
    #[cfg(feature = "__test-hooks")]
    #[doc(hidden)]
    pub fn handshake_payload_for_tests(&self) -> &Arc<[u8]> {
        &self.payload
    }
}

/// How an identity's Noise static key is derived from its Ed25519 secret
/// seed (SPEC.md 14.1): HKDF-SHA256 (RFC 5869) with this salt, the 32-byte
/// seed as input key material, the info `X25519 static key`, and 32 bytes
/// of output, used as the X25519 private key (clamped by X25519, RFC 7748).
///
/// The label separates this use of the seed from every other: the Ed25519
/// key itself is SHA-512 of the seed (RFC 8032), never HKDF.
pub const STATIC_KEY_DERIVATION: &str = "capnp-noise 1 static key from identity seed";

/// The HKDF info of [`STATIC_KEY_DERIVATION`].
const STATIC_KEY_INFO: &[u8] = b"X25519 static key";

/// The Noise static private key of the identity whose Ed25519 seed is
/// `seed` ([`STATIC_KEY_DERIVATION`]).
fn derive_static_secret(seed: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
    let mut out = Zeroizing::new([0u8; 32]);
    Salt::new(HKDF_SHA256, STATIC_KEY_DERIVATION.as_bytes())
        .extract(seed)
        .expand(&[STATIC_KEY_INFO], HKDF_SHA256)
        .and_then(|okm| okm.fill(out.as_mut()))
        .expect("HKDF-SHA256 gives 32 bytes: one hash length");
    out
}

/// An Ed25519 signature by `signing` (whose public key is `vat_id`), or the
/// stand-in of a cheap fuzzing build (see src/fuzz_crypto.rs).
fn sign(signing: &SigningKey, vat_id: &VatId, msg: &[u8]) -> [u8; 64] {
    #[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
    let signature = {
        let _ = signing;
        crate::fuzz_crypto::sign(vat_id.as_bytes(), msg)
    };
    #[cfg(not(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
    let signature = {
        let _ = vat_id;
        signing.sign(msg).to_bytes()
    };
    signature
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("vat_id", &self.vat_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_secrets() {
        let id = Identity::from_seed(&[0x42; 32]);
        let dbg = format!("{id:?}");
        assert!(dbg.contains("vat1"));
        let seed_hex = hex::encode([0x42u8; 32]);
        assert!(!dbg.contains(&seed_hex));
        assert!(!dbg.contains("66, 66"));
        assert!(!dbg.contains(&hex::encode(id.noise_static_secret())));
    }

    #[test]
    fn payload_binds_vat_to_static_key() {
        let id = Identity::generate();
        let (vat, sig) = payload::decode(id.handshake_payload()).unwrap();
        assert_eq!(vat, id.vat_id());
        payload::verify_binding(&vat, &sig, id.noise_static_public()).unwrap();
        let other = Identity::generate();
        assert!(payload::verify_binding(&vat, &sig, other.noise_static_public()).is_err());
    }

    #[test]
    fn same_seed_same_static_key_other_seed_another() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[1; 32]);
        assert_eq!(a.vat_id(), b.vat_id());
        assert_eq!(a.noise_static_public(), b.noise_static_public());
        assert_eq!(a.noise_static_secret(), b.noise_static_secret());
        let c = Identity::from_seed(&[2; 32]);
        assert_ne!(a.noise_static_public(), c.noise_static_public());
        // The static key is neither the seed nor the Ed25519 key.
        assert_ne!(a.noise_static_secret(), &[1; 32]);
        assert_ne!(a.noise_static_public(), a.vat_id().as_bytes());
    }

    /// The derivation pinned, so that it cannot change by accident (every
    /// client's records of every server would fall back): HKDF-SHA256 by
    /// RFC 5869, computed here with HMAC from `sha2` rather than aws-lc-rs.
    #[test]
    fn the_static_key_derivation_is_hkdf_sha256_with_the_documented_label() {
        use sha2::{Digest, Sha256};
        fn hmac(key: &[u8], msg: &[&[u8]]) -> [u8; 32] {
            let mut k = [0u8; 64];
            k[..key.len()].copy_from_slice(key); // keys here are at most 64 bytes
            let (mut inner, mut outer) = (Sha256::new(), Sha256::new());
            inner.update(k.map(|b| b ^ 0x36));
            outer.update(k.map(|b| b ^ 0x5c));
            for m in msg {
                inner.update(m);
            }
            outer.update(inner.finalize());
            outer.finalize().into()
        }
        let seed = [0x42u8; 32];
        let prk = hmac(STATIC_KEY_DERIVATION.as_bytes(), &[&seed]);
        let okm = hmac(&prk, &[b"X25519 static key", &[1]]);
        assert_eq!(*derive_static_secret(&seed), okm);
        assert_eq!(Identity::from_seed(&seed).noise_static_secret(), &okm);
        // SPEC.md 14.1's vector (computed with Python's hmac and cryptography).
        assert_eq!(
            hex::encode(okm),
            "2752c453285ff215806f7e4df78c6c37e7259067c5124f5f3f4b583038fbcafa"
        );
        assert_eq!(
            hex::encode(Identity::from_seed(&seed).noise_static_public()),
            "0143d616027c7cd40ae2146f5cd5b0b73f7d69b76a9848a68f5f303e8d38fe70"
        );
    }
}
