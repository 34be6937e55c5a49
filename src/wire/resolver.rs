//! The crypto behind snow: which implementation computes each primitive.
//!
//! snow asks a [`CryptoResolver`] for its DH, cipher, hash and RNG. Ours
//! takes the fastest audited implementation available for each (figures in
//! BENCHMARKS.md):
//!
//! * **X25519** from aws-lc-rs (AWS-LC, formally verified field arithmetic
//!   from fiat-crypto, with x86-64 assembly): several times faster than
//!   snow's default curve25519-dalek here, and the main cost of a handshake.
//! * **AES-256-GCM, ChaCha20-Poly1305, SHA-256** from aws-lc-rs (AES-NI,
//!   VAES/AVX-512 and AVX2 code paths).
//! * **BLAKE2s** and the RNG from snow's default resolver (the `blake2` crate
//!   and the OS RNG), which aws-lc does not provide.

use aws_lc_rs::{aead, agreement, digest};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{BoxedCryptoResolver, CryptoResolver, DefaultResolver, FallbackResolver};
use std::sync::Arc;

use snow::types::{Cipher, Dh, Hash, Random};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const TAG_LEN: usize = 16;

/// The resolver capnp-noise uses: aws-lc-rs first, snow's default resolver
/// for what aws-lc-rs lacks. It is told this side's static key pair: when snow sets that
/// private key, the key parsed once for the identity is used, instead of
/// parsing it again (which in aws-lc computes the public key: an X25519
/// base-point multiplication per handshake).
pub(crate) fn resolver_knowing(static_key: Option<Arc<StaticKeyPair>>) -> BoxedCryptoResolver {
    // Fuzzing builds with cheap crypto only (see src/fuzz_crypto.rs).
    #[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
    let resolver = {
        let _ = static_key;
        crate::fuzz_crypto::resolver()
    };
    #[cfg(not(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
    let resolver = Box::new(FallbackResolver::new(
        Box::new(AwsLcResolver { static_key }),
        Box::new(DefaultResolver),
    ));
    resolver
}

/// An identity's X25519 static key pair, parsed once when the identity is
/// created and shared by all its handshakes.
pub(crate) struct StaticKeyPair {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    key: agreement::PrivateKey,
}

impl StaticKeyPair {
    /// Parses `secret` (any 32 bytes: X25519 clamps) and computes its public key.
    pub(crate) fn new(secret: &[u8; 32]) -> Self {
        let key = agreement::PrivateKey::from_private_key(&agreement::X25519, secret)
            .expect("any 32 bytes are an X25519 private key");
        let mut public = [0u8; 32];
        public.copy_from_slice(
            key.compute_public_key()
                .expect("X25519 public key computation does not fail")
                .as_ref(),
        );
        // Fuzzing builds with cheap crypto only (see src/fuzz_crypto.rs).
        #[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
        let public = crate::fuzz_crypto::dh_public(secret);
        StaticKeyPair {
            secret: Zeroizing::new(*secret),
            public,
            key,
        }
    }

    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    pub(crate) fn public(&self) -> &[u8; 32] {
        &self.public
    }
}

#[cfg(any(test, feature = "__test-hooks"))]
thread_local! {
    static X25519_OPS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts one X25519 scalar multiplication on this thread (tests only).
#[inline]
fn count_x25519() {
    #[cfg(any(test, feature = "__test-hooks"))]
    X25519_OPS.with(|n| n.set(n.get() + 1));
}

/// How many X25519 scalar multiplications (key generation and
/// Diffie-Hellman) handshakes have run on this thread: how tests show that
/// admission bounds a flood's cost.
#[cfg(any(test, feature = "__test-hooks"))]
pub(crate) fn x25519_operations_on_this_thread() -> u64 {
    X25519_OPS.with(|n| n.get())
}

/// aws-lc-rs implementations of Noise primitives.
#[derive(Default, Clone)]
pub(crate) struct AwsLcResolver {
    static_key: Option<Arc<StaticKeyPair>>,
}

impl CryptoResolver for AwsLcResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(X25519 {
                known: self.static_key.clone(),
                ..X25519::default()
            })),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        match choice {
            HashChoice::SHA256 => Some(Box::new(Sha256::default())),
            _ => None,
        }
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::AESGCM => Some(Box::new(Aead::new(&aead::AES_256_GCM, true))),
            CipherChoice::ChaChaPoly => Some(Box::new(Aead::new(&aead::CHACHA20_POLY1305, false))),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// X25519 with aws-lc-rs. The private key is kept as bytes (zeroized on
/// drop) for `privkey()`, and parsed once per `set` unless it is the
/// identity's static key, parsed already.
#[derive(Default)]
struct X25519 {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    key: Option<ParsedKey>,
    known: Option<Arc<StaticKeyPair>>,
}

enum ParsedKey {
    Own(agreement::PrivateKey),
    Static(Arc<StaticKeyPair>),
}

impl ParsedKey {
    fn get(&self) -> &agreement::PrivateKey {
        match self {
            ParsedKey::Own(k) => k,
            ParsedKey::Static(pair) => &pair.key,
        }
    }
}

impl Dh for X25519 {
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
        // X25519 accepts any 32 bytes as a private key (it clamps).
        if let Some(pair) = &self.known {
            if bool::from(pair.secret[..].ct_eq(&self.secret[..])) {
                self.public = pair.public;
                self.key = Some(ParsedKey::Static(pair.clone()));
                return;
            }
        }
        let key = agreement::PrivateKey::from_private_key(&agreement::X25519, &self.secret[..])
            .expect("any 32 bytes are an X25519 private key");
        count_x25519();
        let public = key
            .compute_public_key()
            .expect("X25519 public key computation does not fail");
        self.public.copy_from_slice(public.as_ref());
        self.key = Some(ParsedKey::Own(key));
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut secret = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(&mut secret[..])?;
        self.set(&secret[..]);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.secret[..]
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Dh)?.get();
        // snow passes its whole key buffer (MAXDHLEN bytes): the key is the first 32.
        let pubkey = pubkey.get(..32).ok_or(snow::Error::Dh)?;
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, pubkey);
        count_x25519();
        // aws-lc rejects low-order peer keys (an all-zero shared secret).
        agreement::agree(key, peer, snow::Error::Dh, |shared| {
            out[..shared.len()].copy_from_slice(shared);
            Ok(())
        })
    }
}

/// An AEAD from aws-lc-rs, with Noise's nonce encoding: 32 zero bits then
/// the 64-bit counter, little-endian for ChaChaPoly, big-endian for AESGCM.
struct Aead {
    algorithm: &'static aead::Algorithm,
    big_endian_nonce: bool,
    key: aead::LessSafeKey,
}

impl Aead {
    fn new(algorithm: &'static aead::Algorithm, big_endian_nonce: bool) -> Self {
        Aead {
            algorithm,
            big_endian_nonce,
            key: aead::LessSafeKey::new(
                aead::UnboundKey::new(algorithm, &[0u8; 32]).expect("32-byte key"),
            ),
        }
    }

    fn nonce(&self, n: u64) -> aead::Nonce {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&if self.big_endian_nonce {
            n.to_be_bytes()
        } else {
            n.to_le_bytes()
        });
        aead::Nonce::assume_unique_for_key(bytes)
    }
}

impl Cipher for Aead {
    fn name(&self) -> &'static str {
        if self.big_endian_nonce {
            "AESGCM"
        } else {
            "ChaChaPoly"
        }
    }

    fn set(&mut self, key: &[u8; 32]) {
        self.key = aead::LessSafeKey::new(
            aead::UnboundKey::new(self.algorithm, key).expect("32-byte key"),
        );
    }

    fn encrypt(&self, nonce: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        out[..len].copy_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                self.nonce(nonce),
                aead::Aad::from(authtext),
                &mut out[..len],
            )
            .expect("sealing with a valid key and length does not fail");
        out[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
        len + TAG_LEN
    }

    fn decrypt(
        &self,
        nonce: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        if ciphertext.len() < TAG_LEN || out.len() < ciphertext.len() - TAG_LEN {
            return Err(snow::Error::Decrypt);
        }
        let (ct, tag) = ciphertext.split_at(ciphertext.len() - TAG_LEN);
        // Decrypt into `out` without a temporary, whatever its length.
        self.key
            .open_separate_gather(
                self.nonce(nonce),
                aead::Aad::from(authtext),
                ct,
                tag,
                &mut out[..ct.len()],
            )
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(ct.len())
    }
}

/// SHA-256 with aws-lc-rs.
struct Sha256 {
    context: digest::Context,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 {
            context: digest::Context::new(&digest::SHA256),
        }
    }
}

impl Hash for Sha256 {
    fn name(&self) -> &'static str {
        "SHA256"
    }

    fn block_len(&self) -> usize {
        64
    }

    fn hash_len(&self) -> usize {
        32
    }

    fn reset(&mut self) {
        self.context = digest::Context::new(&digest::SHA256);
    }

    fn input(&mut self, data: &[u8]) {
        self.context.update(data);
    }

    fn result(&mut self, out: &mut [u8]) {
        let digest = self.context.clone().finish();
        out[..32].copy_from_slice(digest.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity's parsed static key is used for its own private key
    /// only, and agrees with snow's reference X25519.
    #[test]
    fn known_static_key_skips_only_its_own_public_key() {
        let reference = DefaultResolver;
        let mut r = reference.resolve_dh(&DHChoice::Curve25519).unwrap();
        r.set(&[7; 32]);
        let mut public = [0u8; 32];
        public.copy_from_slice(r.pubkey());
        let pair = Arc::new(StaticKeyPair::new(&[7; 32]));
        assert_eq!(pair.public(), &public);
        let ours = AwsLcResolver {
            static_key: Some(pair),
        };
        let mut a = ours.resolve_dh(&DHChoice::Curve25519).unwrap();
        a.set(&[7; 32]);
        assert_eq!(a.pubkey(), &public[..]);
        let mut peer = reference.resolve_dh(&DHChoice::Curve25519).unwrap();
        peer.set(&[9; 32]);
        let (mut s1, mut s2) = ([0u8; 32], [0u8; 32]);
        a.dh(peer.pubkey(), &mut s1).unwrap();
        r.dh(peer.pubkey(), &mut s2).unwrap();
        assert_eq!(s1, s2);
        let mut other = ours.resolve_dh(&DHChoice::Curve25519).unwrap();
        other.set(&[8; 32]);
        let mut r8 = reference.resolve_dh(&DHChoice::Curve25519).unwrap();
        r8.set(&[8; 32]);
        assert_eq!(other.pubkey(), r8.pubkey());
    }

    /// Our primitives agree with snow's default (pure Rust) ones.
    #[test]
    fn agrees_with_snow_default_resolver() {
        let ours = AwsLcResolver::default();
        let reference = DefaultResolver;
        let mut a = ours.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut b = reference.resolve_dh(&DHChoice::Curve25519).unwrap();
        a.set(&[7; 32]);
        b.set(&[9; 32]);
        let mut bb = reference.resolve_dh(&DHChoice::Curve25519).unwrap();
        bb.set(&[7; 32]);
        assert_eq!(a.pubkey(), bb.pubkey());
        let (mut s1, mut s2) = ([0u8; 32], [0u8; 32]);
        a.dh(b.pubkey(), &mut s1).unwrap();
        b.dh(a.pubkey(), &mut s2).unwrap();
        assert_eq!(s1, s2);
        // A low-order point is refused.
        assert!(a.dh(&[0; 32], &mut s1).is_err());

        for choice in [CipherChoice::AESGCM, CipherChoice::ChaChaPoly] {
            let mut c1 = ours.resolve_cipher(&choice).unwrap();
            let mut c2 = reference.resolve_cipher(&choice).unwrap();
            c1.set(&[3; 32]);
            c2.set(&[3; 32]);
            let msg = b"attack at dawn";
            let (mut o1, mut o2) = ([0u8; 64], [0u8; 64]);
            let n1 = c1.encrypt(0x0102_0304_0506_0708, b"ad", msg, &mut o1);
            let n2 = c2.encrypt(0x0102_0304_0506_0708, b"ad", msg, &mut o2);
            assert_eq!(o1[..n1], o2[..n2]);
            let mut back = [0u8; 14];
            assert_eq!(
                c1.decrypt(0x0102_0304_0506_0708, b"ad", &o1[..n1], &mut back)
                    .unwrap(),
                14
            );
            assert_eq!(&back, msg);
            o1[0] ^= 1;
            assert!(c1
                .decrypt(0x0102_0304_0506_0708, b"ad", &o1[..n1], &mut back)
                .is_err());
            c1.rekey();
            c2.rekey();
            let n1 = c1.encrypt(1, b"", msg, &mut o1);
            let n2 = c2.encrypt(1, b"", msg, &mut o2);
            assert_eq!(o1[..n1], o2[..n2]);
        }
        let mut h1 = ours.resolve_hash(&HashChoice::SHA256).unwrap();
        let mut h2 = reference.resolve_hash(&HashChoice::SHA256).unwrap();
        h1.input(b"abc");
        h2.input(b"abc");
        let (mut d1, mut d2) = ([0u8; 32], [0u8; 32]);
        h1.result(&mut d1);
        h2.result(&mut d2);
        assert_eq!(d1, d2);
    }
}
