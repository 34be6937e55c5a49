//! [`Identity`]: a vat's secret key, and the Noise static key it vouches for.
//!
//! An identity owns two keys (SPEC.md, "Identity binding"):
//!
//! * the long-term **Ed25519 signing key**, whose public half is the
//!   [`VatId`]; it is what key files store;
//! * a **Noise static key** (X25519), generated when the identity is created
//!   or loaded and never stored. The Ed25519 key signs it once, and the
//!   encoded handshake payload is kept, so no handshake pays for a signature.

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
    /// The Noise static key is random.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self::from_signing_key(SigningKey::from_bytes(seed))
    }

    /// Builds an identity from an Ed25519 signing key. The Noise static key is random.
    pub fn from_signing_key(signing: SigningKey) -> Self {
        let mut static_secret = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(static_secret.as_mut());
        Self::with_static_secret(signing, static_secret)
    }

    /// Builds an identity whose Noise static key is given rather than random.
    ///
    /// Use it for reproducible test vectors; a random static key (the other
    /// constructors) is the right choice everywhere else.
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
    fn same_seed_same_vat_fresh_static_key() {
        let a = Identity::from_seed(&[1; 32]);
        let b = Identity::from_seed(&[1; 32]);
        assert_eq!(a.vat_id(), b.vat_id());
        assert_ne!(a.noise_static_public(), b.noise_static_public());
    }
}
