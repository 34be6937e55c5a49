//! The handshake payload (SPEC.md, "Handshake payload" and "Identity binding").
//!
//! Messages 2 and 3 of the XX handshake each carry, encrypted, one
//! Cap'n Proto message whose root is `HandshakePayload` (schema/noise.capnp):
//! the sender's VatId and an Ed25519 signature over
//! `"capnp-noise/v1 static-key:" || sender's X25519 static public key`.
//! Noise proves the sender holds that static key; the signature proves the
//! VatId's owner vouches for it. Together they authenticate the VatId.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp::serialize;
use sha2::{Digest, Sha256};

use super::MAX_HANDSHAKE_PAYLOAD_LEN;
use crate::error::{Error, ProtocolError};
use crate::schema::noise_capnp::handshake_payload;
use crate::vat_id::VatId;

/// The domain-separation prefix of the signed message.
pub const BINDING_CONTEXT: &[u8] = b"capnp-noise/v1 static-key:";

/// Reading limits for peer payloads: 4096 bytes are at most 512 words.
pub const READER_OPTIONS: ReaderOptions = ReaderOptions {
    traversal_limit_in_words: Some(MAX_HANDSHAKE_PAYLOAD_LEN / 8),
    nesting_limit: 8,
};

/// The message an identity signs to vouch for a Noise static key.
pub fn binding_message(static_public: &[u8; 32]) -> [u8; BINDING_CONTEXT.len() + 32] {
    let mut m = [0u8; BINDING_CONTEXT.len() + 32];
    m[..BINDING_CONTEXT.len()].copy_from_slice(BINDING_CONTEXT);
    m[BINDING_CONTEXT.len()..].copy_from_slice(static_public);
    m
}

/// Words of the canonical payload: the root pointer, the struct (2
/// pointers), the `VatId` struct (1 pointer), 32 and 64 bytes of data.
const CANONICAL_WORDS: u32 = 1 + 2 + 1 + 4 + 8;

/// Encodes a payload in its canonical form (SPEC.md 5.3): the standard
/// Cap'n Proto stream framing, unpacked, of one segment that holds the
/// canonical encoding of the struct (the Cap'n Proto specification's
/// canonicalization), as the test vectors have it. Receivers accept any
/// other valid encoding too ([`decode`]).
pub fn encode(vat_id: &VatId, signature: &[u8; 64]) -> Vec<u8> {
    let mut msg = Builder::new_default();
    {
        let mut root = msg.init_root::<handshake_payload::Builder>();
        root.reborrow().init_vat_id().set_ed25519(vat_id.as_bytes());
        root.set_static_key_signature(signature);
    }
    let built = msg
        .get_root_as_reader::<handshake_payload::Reader>()
        .expect("a message just built reads back");
    let mut canonical = Builder::new(HeapAllocator::new().first_segment_words(CANONICAL_WORDS));
    canonical
        .set_root_canonical(built)
        .expect("a payload canonicalizes into one segment of its size");
    serialize::write_message_to_words(&canonical)
}

/// Decodes a peer's payload into its claimed VatId and signature.
///
/// Any valid encoding within the limits is accepted, not only the
/// canonical one [`encode`] sends (SPEC.md 5.3): several segments, far
/// pointers, objects in any order, and unknown fields (later extensions:
/// larger struct sections) are fine; missing or wrongly sized fields are
/// errors.
///
/// # Errors
/// [`ProtocolError::BadPayload`] naming the problem: too long, not a Cap'n
/// Proto message, trailing bytes, a missing field, a wrong key or signature
/// length, or a key that is not an Ed25519 point.
pub fn decode(bytes: &[u8]) -> Result<(VatId, [u8; 64]), Error> {
    let (key, sig) = decode_unvalidated(bytes)?;
    Ok((vat_id_of(&key)?, sig))
}

fn bad(why: String) -> Error {
    Error::Protocol(ProtocolError::BadPayload(why))
}

fn vat_id_of(key: &[u8; 32]) -> Result<VatId, Error> {
    VatId::from_bytes(key).map_err(|e| bad(e.to_string()))
}

/// [`decode`], except that the key is not yet checked to be a valid
/// Ed25519 point.
fn decode_unvalidated(bytes: &[u8]) -> Result<([u8; 32], [u8; 64]), Error> {
    if bytes.len() > MAX_HANDSHAKE_PAYLOAD_LEN {
        return Err(bad(format!(
            "{} bytes exceed the {MAX_HANDSHAKE_PAYLOAD_LEN}-byte limit",
            bytes.len()
        )));
    }
    // Cap'n Proto reads words in place: a payload that does not start on an
    // 8-byte boundary (inside an IK message, SPEC.md 14.3) is copied first.
    let mut words;
    let mut slice = bytes;
    if !(bytes.as_ptr() as usize).is_multiple_of(8) {
        words = capnp::Word::allocate_zeroed_vec(bytes.len().div_ceil(8));
        let aligned = &mut capnp::Word::words_to_bytes_mut(&mut words)[..bytes.len()];
        aligned.copy_from_slice(bytes);
        slice = aligned;
    }
    let reader = serialize::read_message_from_flat_slice(&mut slice, READER_OPTIONS)
        .map_err(|e| bad(format!("not a Cap'n Proto message: {e}")))?;
    if !slice.is_empty() {
        return Err(bad("trailing bytes after the message".into()));
    }
    let root: handshake_payload::Reader = reader
        .get_root()
        .map_err(|e| bad(format!("bad root: {e}")))?;
    if !root.has_vat_id() {
        return Err(bad("vatId is missing".into()));
    }
    let key = root
        .get_vat_id()
        .and_then(|v| v.get_ed25519())
        .map_err(|e| bad(format!("bad vatId: {e}")))?;
    let key: [u8; 32] = key
        .try_into()
        .map_err(|_| bad(format!("vatId.ed25519 has {} bytes, not 32", key.len())))?;
    let sig = root
        .get_static_key_signature()
        .map_err(|e| bad(format!("bad staticKeySignature: {e}")))?;
    let sig: [u8; 64] = sig.try_into().map_err(|_| {
        bad(format!(
            "staticKeySignature has {} bytes, not 64",
            sig.len()
        ))
    })?;
    Ok((key, sig))
}

/// Checks that `vat_id` signed `static_public` with `signature`.
///
/// Successful verifications are remembered (a bounded set of digests of the
/// exact `(vat_id, static key, signature)` triples), because a peer that
/// reconnects presents the same triple every time: its signature is made
/// once per static key. Ed25519 verification is deterministic, so the cache
/// changes no outcome; it only saves the work. Failures are never cached.
///
/// # Errors
/// [`Error::BadIdentityProof`] if it did not.
pub fn verify_binding(
    vat_id: &VatId,
    signature: &[u8; 64],
    static_public: &[u8; 32],
) -> Result<(), Error> {
    let digest = binding_digest(vat_id.as_bytes(), static_public, signature);
    if is_verified(&digest) {
        return Ok(());
    }
    verify_and_remember(vat_id, signature, static_public, digest)
}

/// Decodes a peer's payload and authenticates its VatId against the Noise
/// static key the handshake proved: [`decode`] then [`verify_binding`],
/// except that a binding verified before skips the Ed25519 point checks
/// too (the key passed them when it was verified). Returns the VatId and
/// its signature.
///
/// # Errors
/// As [`decode`] and [`verify_binding`].
pub(crate) fn authenticate(
    bytes: &[u8],
    static_public: &[u8; 32],
) -> Result<(VatId, [u8; 64]), Error> {
    let (key, signature) = decode_unvalidated(bytes)?;
    let digest = binding_digest(&key, static_public, &signature);
    if is_verified(&digest) {
        return Ok((VatId::from_verified_bytes(key), signature));
    }
    let vat_id = vat_id_of(&key)?;
    verify_and_remember(&vat_id, &signature, static_public, digest)?;
    Ok((vat_id, signature))
}

fn binding_digest(key: &[u8; 32], static_public: &[u8; 32], signature: &[u8; 64]) -> [u8; 32] {
    Sha256::new()
        .chain_update(key)
        .chain_update(static_public)
        .chain_update(signature)
        .finalize()
        .into()
}

fn is_verified(digest: &[u8; 32]) -> bool {
    let cache = VERIFIED.get_or_init(|| Mutex::new(HashSet::new()));
    cache.lock().map(|c| c.contains(digest)).unwrap_or(false)
}

fn verify_and_remember(
    vat_id: &VatId,
    signature: &[u8; 64],
    static_public: &[u8; 32],
    digest: [u8; 32],
) -> Result<(), Error> {
    vat_id
        .verify(&binding_message(static_public), signature)
        .map_err(|_| {
            Error::BadIdentityProof("its signature does not bind its VatId to its Noise static key")
        })?;
    let cache = VERIFIED.get_or_init(|| Mutex::new(HashSet::new()));
    if let Ok(mut c) = cache.lock() {
        if c.len() >= VERIFIED_CACHE_ENTRIES {
            c.clear();
        }
        c.insert(digest);
    }
    Ok(())
}

/// How many verified bindings are remembered (32 bytes each).
const VERIFIED_CACHE_ENTRIES: usize = 4096;
static VERIFIED: OnceLock<Mutex<HashSet<[u8; 32]>>> = OnceLock::new();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn cached_verification_still_refuses_what_differs() {
        let id = Identity::generate();
        let sig = id.sign(&binding_message(id.noise_static_public()));
        for _ in 0..2 {
            verify_binding(&id.vat_id(), &sig, id.noise_static_public()).unwrap();
        }
        let mut other_static = *id.noise_static_public();
        other_static[0] ^= 1;
        assert!(verify_binding(&id.vat_id(), &sig, &other_static).is_err());
        let mut bad_sig = sig;
        bad_sig[10] ^= 1;
        assert!(verify_binding(&id.vat_id(), &bad_sig, id.noise_static_public()).is_err());
        let other = Identity::generate().vat_id();
        assert!(verify_binding(&other, &sig, id.noise_static_public()).is_err());
    }

    /// `authenticate` agrees with `decode` + `verify_binding`, cached or not.
    #[test]
    fn authenticate_matches_decode_then_verify() {
        let id = Identity::generate();
        let good = id.handshake_payload();
        for _ in 0..2 {
            assert_eq!(
                authenticate(good, id.noise_static_public()).unwrap().0,
                id.vat_id()
            );
        }
        let mut other_static = *id.noise_static_public();
        other_static[0] ^= 1;
        assert!(matches!(
            authenticate(good, &other_static),
            Err(Error::BadIdentityProof(_))
        ));
        // A key that is no VatId (here the small-order neutral point) fails
        // as in `decode`.
        let mut neutral = [0u8; 32];
        neutral[0] = 1;
        let weak = encode_raw(&neutral, &[1; 64]);
        let e = authenticate(&weak, id.noise_static_public()).unwrap_err();
        assert!(
            matches!(e, Error::Protocol(ProtocolError::BadPayload(_))),
            "{e}"
        );
        assert_eq!(e.to_string(), decode(&weak).unwrap_err().to_string());
    }

    /// SPEC.md 5.3: `encode` sends one segment holding exactly the
    /// canonical encoding, whatever order the builder wrote things in.
    #[test]
    fn encode_is_the_canonical_form() {
        let id = Identity::from_seed(&[5; 32]);
        let bytes = encode(&id.vat_id(), &[7; 64]);
        let mut slice = &bytes[..];
        let reader = serialize::read_message_from_flat_slice(&mut slice, READER_OPTIONS).unwrap();
        let canonical = reader.canonicalize().unwrap();
        let canonical = capnp::Word::words_to_bytes(&canonical);
        assert_eq!(&bytes[..4], &[0, 0, 0, 0], "one segment");
        assert_eq!(
            u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize * 8,
            canonical.len()
        );
        assert_eq!(&bytes[8..], canonical);
        assert_eq!(canonical.len(), CANONICAL_WORDS as usize * 8);
    }

    /// SPEC.md 5.3: a receiver accepts what is not canonical: the payload
    /// spread over many segments (far pointers), and a struct of a later
    /// version with a data word it does not know (here
    /// laid out by `ThirdPartyToAwait`, whose first two pointers are a
    /// `VatId` and a `Data`, as in `HandshakePayload`).
    #[test]
    fn decode_accepts_other_layouts_and_unknown_fields() {
        use crate::schema::network_capnp::third_party_to_await;
        use capnp::message::AllocationStrategy;
        let id = Identity::from_seed(&[5; 32]);
        let sig = [7u8; 64];
        let mut spread = Builder::new(
            HeapAllocator::new()
                .first_segment_words(1)
                .allocation_strategy(AllocationStrategy::FixedSize),
        );
        {
            let mut root = spread.init_root::<handshake_payload::Builder>();
            root.reborrow()
                .init_vat_id()
                .set_ed25519(id.vat_id().as_bytes());
            root.set_static_key_signature(&sig);
        }
        assert!(spread.get_segments_for_output().len() > 2);
        let spread = serialize::write_message_to_words(&spread);
        assert_ne!(spread, encode(&id.vat_id(), &sig));
        assert_eq!(decode(&spread).unwrap(), (id.vat_id(), sig));

        let mut later = Builder::new_default();
        {
            let mut root = later.init_root::<third_party_to_await::Builder>();
            root.reborrow()
                .init_recipient()
                .set_ed25519(id.vat_id().as_bytes());
            root.set_nonce(&sig);
            root.set_expires_at(u64::MAX);
        }
        let later = serialize::write_message_to_words(&later);
        assert_eq!(decode(&later).unwrap(), (id.vat_id(), sig));
    }

    fn encode_raw(key: &[u8; 32], sig: &[u8; 64]) -> Vec<u8> {
        let mut msg = Builder::new_default();
        {
            let mut root = msg.init_root::<handshake_payload::Builder>();
            root.reborrow().init_vat_id().set_ed25519(key);
            root.set_static_key_signature(sig);
        }
        serialize::write_message_to_words(&msg)
    }

    #[test]
    fn decode_rejects_wrong_sizes_and_garbage() {
        let id = Identity::from_seed(&[5; 32]);
        let good = encode(&id.vat_id(), &[1; 64]);
        assert!(decode(&good).is_ok());
        assert!(decode(&[]).is_err());
        assert!(decode(&good[..good.len() - 8]).is_err());
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert!(decode(&trailing)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        assert!(decode(&vec![0u8; MAX_HANDSHAKE_PAYLOAD_LEN + 1]).is_err());

        let mut msg = Builder::new_default();
        msg.init_root::<handshake_payload::Builder>()
            .init_vat_id()
            .set_ed25519(&[1; 31]);
        let short_key = serialize::write_message_to_words(&msg);
        assert!(decode(&short_key)
            .unwrap_err()
            .to_string()
            .contains("31 bytes"));

        let mut msg = Builder::new_default();
        msg.init_root::<handshake_payload::Builder>();
        let empty = serialize::write_message_to_words(&msg);
        assert!(decode(&empty).unwrap_err().to_string().contains("missing"));
    }
}
