//! # FUZZING BUILD ONLY: CHEAP, DELIBERATELY INSECURE STAND-INS FOR THE CRYPTO
//!
//! **Nothing here is cryptography. Anyone can forge every key agreement,
//! every AEAD tag and every signature these functions make.** They exist so
//! that a fuzzer gets past X25519, the AEAD and Ed25519 cheaply and reaches
//! the state machine behind them, as OpenSSL's
//! `FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION` and rustls's fuzzing builds do.
//!
//! The library uses them only when it is compiled with **both**
//! `--cfg fuzzing` (which cargo-fuzz passes) **and**
//! `--cfg capnp_noise_fuzz_cheap_crypto` (which `fuzz/run-all cheap` adds
//! through `RUSTFLAGS`; see fuzz/README.md). Either one alone changes
//! nothing. A normal build does not compile this module at all; the
//! library's own unit tests compile it (unused by the crypto) only to forge
//! inputs with it and check that the real build refuses them
//! (the tests `forged_by_the_fuzzing_rules_is_refused::*` below, and
//! `tests/fuzz_mode.rs` checks that [`MARKER`] is absent from a normal build).
//!
//! What each stand-in keeps of the real primitive, so that the state
//! machine's paths stay reachable and honest fuzz-mode peers agree:
//!
//! * **DH**: the public key is `secret XOR 0x5c..`; the shared secret is
//!   `public(a) XOR B`, so `DH(a, B) == DH(b, A)`. The low-order points that
//!   X25519 refuses (the list libsodium blocks, top bit ignored) are refused.
//! * **AEAD**: the "ciphertext" is the plaintext itself (so the fuzzer sees
//!   and writes plaintext directly); the 16-byte tag is a keyed checksum
//!   over key, nonce, associated data and ciphertext, compared as two
//!   64-bit words (which libFuzzer's comparison tracing can solve). A
//!   flipped byte, a wrong key, nonce or associated data fails
//!   authentication exactly as with the real AEAD. `Rekey()` derives a new
//!   key by the same checksum (the Noise definition would give the all-zero
//!   key every time with an identity cipher).
//! * **Signature**: the signature of `msg` by a VatId is the checksum of
//!   (public key, message) spread over 64 bytes; verification accepts
//!   exactly that, so a signature for another key or message fails.
//! * Hashes (SHA-256, BLAKE2s, HKDF) stay real: they are not the cost
//!   (fuzz/RESULTS.md, round 3).

// The unit tests compile the module only to forge inputs with it.
#![cfg_attr(test, allow(dead_code))]

use aws_lc_rs::aead::{Aad, Nonce};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// A string that exists in a binary exactly when these stand-ins are
/// compiled into it and used (the cipher's name below).
pub(crate) const MARKER: &str = "capnp-noise FUZZING BUILD: cheap insecure crypto";

const TAG_LEN: usize = 16;
const PUBLIC_MASK: u8 = 0x5c;

/// X25519's low-order points (libsodium's block list; bit 255 is ignored).
const LOW_ORDER: [[u8; 32]; 7] = [
    [0; 32],
    {
        let mut p = [0; 32];
        p[0] = 1;
        p
    },
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    p_plus(-1),
    p_plus(0),
    p_plus(1),
];

/// `2^255 - 19 + d` little-endian, for `d` in -1..=1.
const fn p_plus(d: i8) -> [u8; 32] {
    let mut p = [0xff; 32];
    p[0] = (0xed_i16 + d as i16) as u8;
    p[31] = 0x7f;
    p
}

/// One step of the checksum: cheap, but every input bit reaches every output bit.
fn mix(state: u64, word: u64) -> u64 {
    let x = (state ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// Keyed checksums over `parts`, each prefixed by its length (so moving
/// bytes from one part to the next changes them), one per seed, computed
/// in one pass (a tag, a signature and a rekeyed key are several checksums
/// of the same bytes; a pass per seed made the tag a sixth of a `transport`
/// execution). Each lane is independent of the others.
fn checksums<const N: usize>(seeds: [u64; N], parts: &[&[u8]]) -> [u64; N] {
    let mut h = seeds.map(|seed| mix(seed, 0x6361_706e_702d_6e6f));
    let step = |h: &mut [u64; N], word: u64| {
        for lane in h.iter_mut() {
            *lane = mix(*lane, word);
        }
    };
    for part in parts {
        step(&mut h, part.len() as u64);
        let mut chunks = part.chunks_exact(8);
        for c in &mut chunks {
            step(&mut h, u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        step(&mut h, u64::from_le_bytes(last));
    }
    h.map(|lane| mix(lane, 0))
}

/// The little-endian bytes of `words`.
fn spread<const N: usize, const B: usize>(words: [u64; N]) -> [u8; B] {
    let mut out = [0u8; B];
    for (c, w) in out.chunks_exact_mut(8).zip(words) {
        c.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// The stand-in DH public key of a 32-byte secret.
pub(crate) fn dh_public(secret: &[u8; 32]) -> [u8; 32] {
    secret.map(|b| b ^ PUBLIC_MASK)
}

/// The stand-in DH: `None` for a low-order peer key, as X25519 refuses it.
pub(crate) fn dh(secret: &[u8; 32], peer: &[u8; 32]) -> Option<[u8; 32]> {
    let mut masked = *peer;
    masked[31] &= 0x7f;
    if LOW_ORDER.contains(&masked) {
        return None;
    }
    let mine = dh_public(secret);
    Some(std::array::from_fn(|i| mine[i] ^ peer[i]))
}

/// The stand-in AEAD tag of `ciphertext` (which is the plaintext).
pub(crate) fn tag(key: &[u8; 32], nonce: &[u8], ad: &[u8], ciphertext: &[u8]) -> [u8; TAG_LEN] {
    spread(checksums([1, 2], &[&key[..], nonce, ad, ciphertext]))
}

/// Whether `got` is the stand-in tag, compared as two words so that
/// libFuzzer's comparison tracing learns the expected value.
pub(crate) fn tag_matches(key: &[u8; 32], nonce: &[u8], ad: &[u8], ct: &[u8], got: &[u8]) -> bool {
    let want = tag(key, nonce, ad, ct);
    got.len() == TAG_LEN && words(&want) == words(got)
}

fn words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// The key after a stand-in `Rekey()`.
pub(crate) fn rekeyed(key: &[u8; 32]) -> [u8; 32] {
    spread(checksums([16, 17, 18, 19], &[&key[..], b"rekey"]))
}

/// The stand-in signature of `msg` by the Ed25519 public key `public`.
pub(crate) fn sign(public: &[u8; 32], msg: &[u8]) -> [u8; 64] {
    spread(checksums(
        [32, 33, 34, 35, 36, 37, 38, 39],
        &[&public[..], msg],
    ))
}

/// Whether `signature` is the stand-in signature of `msg` by `public`.
pub(crate) fn verify(public: &[u8; 32], msg: &[u8], signature: &[u8; 64]) -> bool {
    words(&sign(public, msg)) == words(signature)
}

/// The resolver of a cheap build: stand-in DH and AEAD, real hashes and RNG.
pub(crate) fn resolver() -> BoxedCryptoResolver {
    Box::new(FallbackResolver::new(
        Box::new(CheapResolver),
        Box::new(DefaultResolver),
    ))
}

struct CheapResolver;

impl CryptoResolver for CheapResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(CheapDh::default())),
            _ => None,
        }
    }

    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::AESGCM => Some(Box::new(CheapCipher::new(true))),
            CipherChoice::ChaChaPoly => Some(Box::new(CheapCipher::new(false))),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

#[derive(Default)]
struct CheapDh {
    secret: [u8; 32],
    public: [u8; 32],
}

impl Dh for CheapDh {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        self.secret.copy_from_slice(&privkey[..32]);
        self.public = dh_public(&self.secret);
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut secret = [0u8; 32];
        rng.try_fill_bytes(&mut secret)?;
        self.set(&secret);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.secret
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let peer: &[u8; 32] = pubkey
            .get(..32)
            .and_then(|p| p.try_into().ok())
            .ok_or(snow::Error::Dh)?;
        let shared = dh(&self.secret, peer).ok_or(snow::Error::Dh)?;
        out[..32].copy_from_slice(&shared);
        Ok(())
    }
}

/// The stand-in AEAD under snow's `Cipher`, with Noise's nonce encodings.
struct CheapCipher {
    big_endian_nonce: bool,
    key: [u8; 32],
}

impl CheapCipher {
    fn new(big_endian_nonce: bool) -> Self {
        CheapCipher {
            big_endian_nonce,
            key: [0; 32],
        }
    }

    fn nonce(&self, n: u64) -> [u8; 12] {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&if self.big_endian_nonce {
            n.to_be_bytes()
        } else {
            n.to_le_bytes()
        });
        bytes
    }
}

impl Cipher for CheapCipher {
    fn name(&self) -> &'static str {
        // Never on the wire (snow names the protocol from its parameters):
        // it names the build in a debugger, and makes MARKER findable.
        MARKER
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key = *key;
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        out[..len].copy_from_slice(plaintext);
        out[len..len + TAG_LEN].copy_from_slice(&tag(
            &self.key,
            &self.nonce(nonce),
            authtext,
            plaintext,
        ));
        len + TAG_LEN
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .filter(|&len| out.len() >= len)
            .ok_or(snow::Error::Decrypt)?;
        let (ct, t) = ciphertext.split_at(len);
        if !tag_matches(&self.key, &self.nonce(nonce), authtext, ct, t) {
            return Err(snow::Error::Decrypt);
        }
        out[..len].copy_from_slice(ct);
        Ok(len)
    }

    fn rekey(&mut self) {
        self.key = rekeyed(&self.key);
    }
}

/// The stand-in AEAD key of the transport's cipher states, with the calls
/// of aws-lc-rs's `LessSafeKey` that `wire::cipherstate` makes.
pub(crate) struct CheapKey([u8; 32]);

impl CheapKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        CheapKey(*key)
    }

    pub(crate) fn rekeyed(&self) -> Self {
        CheapKey(rekeyed(&self.0))
    }

    pub(crate) fn seal_in_place_separate_tag<A: AsRef<[u8]>>(
        &self,
        nonce: Nonce,
        aad: Aad<A>,
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], ()> {
        Ok(tag(&self.0, nonce.as_ref(), aad.as_ref(), in_out))
    }

    /// Seals `plaintext || extra_in` into `ct || extra_out_and_tag`.
    pub(crate) fn seal_out_of_place_scatter<A: AsRef<[u8]>>(
        &self,
        nonce: Nonce,
        aad: Aad<A>,
        plaintext: &[u8],
        ct: &mut [u8],
        extra_in: &[u8],
        extra_out_and_tag: &mut [u8],
    ) -> Result<(), ()> {
        if ct.len() != plaintext.len() || extra_out_and_tag.len() != extra_in.len() + TAG_LEN {
            return Err(());
        }
        ct.copy_from_slice(plaintext);
        let (extra_out, t) = extra_out_and_tag.split_at_mut(extra_in.len());
        extra_out.copy_from_slice(extra_in);
        let whole = [plaintext, extra_in].concat();
        t.copy_from_slice(&tag(&self.0, nonce.as_ref(), aad.as_ref(), &whole));
        Ok(())
    }

    pub(crate) fn open_in_place<'a, A: AsRef<[u8]>>(
        &self,
        nonce: Nonce,
        aad: Aad<A>,
        in_out: &'a mut [u8],
    ) -> Result<&'a mut [u8], ()> {
        let len = in_out.len().checked_sub(TAG_LEN).ok_or(())?;
        let (ct, t) = in_out.split_at_mut(len);
        if !tag_matches(&self.0, nonce.as_ref(), aad.as_ref(), ct, t) {
            return Err(());
        }
        Ok(ct)
    }

    pub(crate) fn open_separate_gather<A: AsRef<[u8]>>(
        &self,
        nonce: Nonce,
        aad: Aad<A>,
        ct: &[u8],
        t: &[u8],
        out: &mut [u8],
    ) -> Result<(), ()> {
        if out.len() != ct.len() || !tag_matches(&self.0, nonce.as_ref(), aad.as_ref(), ct, t) {
            return Err(());
        }
        out.copy_from_slice(ct);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dh_is_symmetric_and_refuses_low_order_keys() {
        let (a, b) = ([7u8; 32], [9u8; 32]);
        assert_eq!(dh(&a, &dh_public(&b)), dh(&b, &dh_public(&a)));
        for p in LOW_ORDER {
            assert_eq!(dh(&a, &p), None);
            let mut high = p;
            high[31] |= 0x80;
            assert_eq!(dh(&a, &high), None);
        }
    }

    #[test]
    fn checksum_lanes_are_independent() {
        let parts: [&[u8]; 3] = [b"key", b"a longer part of 19", b""];
        let both = checksums([1, 2], &parts);
        assert_eq!(both, [checksums([1], &parts)[0], checksums([2], &parts)[0]]);
        assert_ne!(both[0], both[1]);
        assert_ne!(
            checksums([1], &[b"ab", b"c"]),
            checksums([1], &[b"a", b"bc"])
        );
    }

    #[test]
    fn tags_and_signatures_depend_on_every_input() {
        let t = tag(&[1; 32], b"n", b"ad", b"ct");
        assert!(tag_matches(&[1; 32], b"n", b"ad", b"ct", &t));
        assert!(!tag_matches(&[2; 32], b"n", b"ad", b"ct", &t));
        assert!(!tag_matches(&[1; 32], b"m", b"ad", b"ct", &t));
        assert!(!tag_matches(&[1; 32], b"n", b"a", b"dct", &t));
        assert!(!tag_matches(&[1; 32], b"n", b"ad", b"cu", &t));
        let s = sign(&[3; 32], b"msg");
        assert!(verify(&[3; 32], b"msg", &s));
        assert!(!verify(&[4; 32], b"msg", &s));
        assert!(!verify(&[3; 32], b"msh", &s));
        assert_ne!(rekeyed(&[0; 32]), [0; 32]);
        assert_ne!(rekeyed(&rekeyed(&[0; 32])), rekeyed(&[0; 32]));
    }

    /// What a normal build (real crypto) does with input forged by the
    /// rules above: what a fuzzer finds in a cheap build, or what anyone
    /// could write if those rules ever leaked into a normal build.
    mod forged_by_the_fuzzing_rules_is_refused {
        use std::sync::Arc;

        use super::super::*;
        use crate::policy::{AnyVat, PeerContext};
        use crate::wire::cipherstate::CipherState;
        use crate::wire::resolver::{resolver_knowing, StaticKeyPair};
        use crate::wire::{payload, Handshake, HandshakeConfig, Suite};
        use crate::{Error, Identity};

        /// A handshake whose initiator carries a signature made the cheap
        /// way (everything else real): the responder refuses the identity.
        #[test]
        fn a_cheap_signature() {
            let alice = Identity::from_seed_and_static_key(&[1; 32], &[2; 32]);
            let binding = payload::binding_message(alice.noise_static_public());
            let forged = sign(alice.vat_id().as_bytes(), &binding);
            assert!(verify(alice.vat_id().as_bytes(), &binding, &forged));
            assert_ne!(
                alice.sign(&binding),
                forged,
                "a normal build signs for real"
            );
            assert!(!verify(
                alice.vat_id().as_bytes(),
                &binding,
                &alice.sign(&binding)
            ));
            assert!(matches!(
                alice.vat_id().verify(&binding, &forged),
                Err(Error::BadIdentityProof(_))
            ));

            let bob = Identity::from_seed(&[3; 32]);
            let config = HandshakeConfig::with_suite(Suite::AesGcmSha256);
            let mut i = Handshake::initiator(
                &alice,
                Arc::new(AnyVat),
                PeerContext::initiator(None, None),
                config.clone(),
            )
            .unwrap();
            i.replace_payload_for_tests(payload::encode(&alice.vat_id(), &forged).into());
            let mut r =
                Handshake::responder(&bob, Arc::new(AnyVat), PeerContext::responder(None), config)
                    .unwrap();
            let mut refusal = None;
            for _ in 0..4 {
                let out = i.pending_output().to_vec();
                i.consume_output(out.len());
                if let Err(e) = r.feed(&out) {
                    refusal = Some(e);
                    break;
                }
                let back = r.pending_output().to_vec();
                r.consume_output(back.len());
                i.feed(&back).expect("the initiator takes message 2");
            }
            assert!(
                matches!(refusal, Some(Error::BadIdentityProof(_))),
                "{refusal:?}"
            );
            assert!(!r.is_finished() && r.peer_vat_id().is_none());
        }

        /// A transport frame and a handshake ciphertext whose tag is the
        /// cheap checksum under the right key and nonce: refused, and the
        /// transport's nonce does not advance (the honest frame still opens).
        #[test]
        fn a_cheap_tag() {
            let k = [9u8; 32];
            for suite in [Suite::AesGcmSha256, Suite::ChaChaPolyBlake2s] {
                let (mut sender, mut receiver) =
                    (CipherState::new(suite, &k), CipherState::new(suite, &k));
                let nonce = |n: u64| {
                    let mut b = [0u8; 12];
                    b[4..].copy_from_slice(&match suite {
                        Suite::AesGcmSha256 => n.to_be_bytes(),
                        Suite::ChaChaPolyBlake2s => n.to_le_bytes(),
                    });
                    b
                };
                let plain = b"forged frame".to_vec();
                let forged = [&plain[..], &tag(&k, &nonce(0), b"", &plain)].concat();
                let mut in_out = forged.clone();
                let refused = receiver.open_in_place(&mut in_out);
                assert!(
                    matches!(
                        refused,
                        Err(Error::Decrypt {
                            during: "a transport frame"
                        })
                    ),
                    "{refused:?}"
                );
                let mut out = vec![0; plain.len()];
                assert!(matches!(
                    receiver.open_into(&forged, &mut out),
                    Err(Error::Decrypt { .. })
                ));
                let mut honest = plain.clone();
                let t = sender.seal_in_place(&mut honest).unwrap();
                honest.extend_from_slice(&t);
                assert_eq!(receiver.open_into(&honest, &mut out).unwrap(), plain.len());
                assert_eq!(out, plain);

                let choice = match suite {
                    Suite::AesGcmSha256 => CipherChoice::AESGCM,
                    Suite::ChaChaPolyBlake2s => CipherChoice::ChaChaPoly,
                };
                let mut cipher = resolver_knowing(None).resolve_cipher(&choice).unwrap();
                cipher.set(&k);
                let forged = [&plain[..], &tag(&k, &nonce(5), b"h", &plain)].concat();
                let mut out = [0u8; 64];
                assert!(matches!(
                    cipher.decrypt(5, b"h", &forged, &mut out),
                    Err(snow::Error::Decrypt)
                ));
            }
        }

        /// Keys of the cheap DH are not X25519's: a message built with
        /// them derives other keys than a normal build does, so its first
        /// ciphertext fails (the test above).
        #[test]
        fn a_cheap_key_agreement() {
            let (a, b) = ([7u8; 32], [8u8; 32]);
            let real_a = StaticKeyPair::new(&a);
            assert_ne!(real_a.public(), &dh_public(&a));
            let mut dh_a = resolver_knowing(None)
                .resolve_dh(&DHChoice::Curve25519)
                .unwrap();
            dh_a.set(&a);
            assert_eq!(dh_a.pubkey(), real_a.public());
            let mut shared = [0u8; 32];
            dh_a.dh(&dh_public(&b), &mut shared).unwrap();
            assert_ne!(Some(shared), dh(&a, &dh_public(&b)));
        }
    }
}
