//! A Noise `CipherState` (Noise §5.1) for the transport phase, encrypting
//! and decrypting **in place**.
//!
//! The handshake runs in snow; when it ends, snow's `Split()` hands us the
//! two transport keys and the session encrypts with these cipher states
//! instead of snow's `TransportState`. The difference is the buffers:
//! snow's API copies the plaintext into a separate output buffer before
//! sealing, while here the application's bytes are copied once into the
//! frame being built and sealed where they lie (and received frames are
//! decrypted straight into the application's buffer). Everything else is
//! the Noise specification to the letter: the nonce encoding of each
//! cipher, `n` incremented per message, `2^64 - 1` reserved, and
//! `Rekey()` as `k = ENCRYPT(k, 2^64 - 1, "", zeros)[..32]` (Noise §4.2).

//!
//! With the `openssl-chacha` feature (on by default), ChaCha20-Poly1305
//! frames of [`FAST_CHACHA_MIN`] bytes or more go through OpenSSL's
//! ChaCha20-Poly1305 (AVX-512 code where the CPU has it: about 2.5 GB/s per
//! core here against aws-lc's 1.65), and smaller ones through aws-lc, whose
//! per-message cost is lower (about 0.2 us against 0.9 us). Both compute
//! the same AEAD, so the choice per frame is invisible on the wire.

use aws_lc_rs::aead::{self, Aad, Nonce};
#[cfg(not(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
use aws_lc_rs::aead::{LessSafeKey, UnboundKey};
// Fuzzing builds with cheap crypto only (see src/fuzz_crypto.rs).
#[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
use crate::fuzz_crypto::CheapKey as LessSafeKey;
use zeroize::Zeroizing;

use super::preamble::Suite;
use super::TAG_LEN;
use crate::error::Error;

/// Frames at least this long (ciphertext, tag excluded) use OpenSSL's
/// ChaCha20-Poly1305 with the `openssl-chacha` feature; below it aws-lc's
/// lower per-message cost wins (crossover measured at about 3.5 KiB).
#[cfg_attr(not(feature = "openssl-chacha"), allow(dead_code))]
pub(crate) const FAST_CHACHA_MIN: usize = 4096;

/// One direction's transport cipher: key and nonce counter.
pub(crate) struct CipherState {
    key: LessSafeKey,
    algorithm: &'static aead::Algorithm,
    big_endian_nonce: bool,
    n: u64,
    #[cfg(feature = "openssl-chacha")]
    fast: Option<fast::FastChaCha>,
}

impl CipherState {
    /// A cipher state for `suite` with the 32-byte key `k` and `n = 0`.
    pub(crate) fn new(suite: Suite, k: &[u8; 32]) -> Self {
        let (algorithm, big_endian_nonce) = match suite {
            Suite::ChaChaPolyBlake2s => (&aead::CHACHA20_POLY1305, false),
            Suite::AesGcmSha256 => (&aead::AES_256_GCM, true),
        };
        CipherState {
            key: Self::key(algorithm, k),
            algorithm,
            big_endian_nonce,
            n: 0,
            #[cfg(feature = "openssl-chacha")]
            // Never with the cheap stand-ins of a fuzzing build.
            fast: (suite == Suite::ChaChaPolyBlake2s && !cfg!(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))
                .then(|| fast::FastChaCha::new(k)),
        }
    }

    /// The OpenSSL cipher for a ChaChaPoly frame of `len` bytes, if it is
    /// the faster one for it.
    #[cfg(feature = "openssl-chacha")]
    fn fast_for(&mut self, len: usize) -> Option<&mut fast::FastChaCha> {
        self.fast.as_mut().filter(|_| len >= FAST_CHACHA_MIN)
    }

    fn nonce_bytes(&self, n: u64) -> [u8; 12] {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&if self.big_endian_nonce {
            n.to_be_bytes()
        } else {
            n.to_le_bytes()
        });
        bytes
    }

    fn key(algorithm: &'static aead::Algorithm, k: &[u8; 32]) -> LessSafeKey {
        #[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
        let key = {
            let _ = algorithm;
            LessSafeKey::new(k)
        };
        #[cfg(not(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
        let key =
            LessSafeKey::new(UnboundKey::new(algorithm, k).expect("a 32-byte key fits both AEADs"));
        key
    }

    fn nonce(&self, n: u64) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce_bytes(n))
    }

    /// The nonce to use next, refusing the reserved maximum.
    fn next_nonce(&mut self) -> Result<Nonce, Error> {
        if self.n == u64::MAX {
            return Err(Error::NonceExhausted);
        }
        let nonce = self.nonce(self.n);
        self.n += 1;
        Ok(nonce)
    }

    /// Encrypts `in_out` in place and returns the tag to append.
    pub(crate) fn seal_in_place(&mut self, in_out: &mut [u8]) -> Result<[u8; TAG_LEN], Error> {
        let nonce = self.next_nonce()?;
        #[cfg(feature = "openssl-chacha")]
        if let Some(fast) = self.fast_for(in_out.len()) {
            let mut tag = [0u8; TAG_LEN];
            fast.seal_in_place(nonce.as_ref(), in_out, &mut tag)?;
            return Ok(tag);
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), in_out)
            .map_err(|_| Error::Internal("the AEAD refused to seal"))?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Encrypts `plaintext || [last]` into `out`, which must be exactly
    /// `plaintext.len() + 1 + 16` bytes long (ciphertext, then the tag),
    /// reading `plaintext` where it lies: no copy before encryption.
    pub(crate) fn seal_out_of_place(
        &mut self,
        plaintext: &[u8],
        last: u8,
        out: &mut [u8],
    ) -> Result<(), Error> {
        if out.len() != plaintext.len() + 1 + TAG_LEN {
            return Err(Error::Internal("seal_out_of_place: wrong output length"));
        }
        let nonce = self.next_nonce()?;
        let (ct, last_and_tag) = out.split_at_mut(plaintext.len());
        #[cfg(feature = "openssl-chacha")]
        if let Some(fast) = self.fast_for(plaintext.len()) {
            let (last_ct, tag) = last_and_tag.split_at_mut(1);
            fast.seal_out_of_place(nonce.as_ref(), plaintext, ct, last, last_ct, tag)?;
            return Ok(());
        }
        self.key
            .seal_out_of_place_scatter(nonce, Aad::empty(), plaintext, ct, &[last], last_and_tag)
            .map_err(|_| Error::Internal("the AEAD refused to seal"))
    }

    /// Decrypts `in_out` (ciphertext then tag) in place and returns the
    /// plaintext length; the plaintext is `in_out[..len]`.
    pub(crate) fn open_in_place(&mut self, in_out: &mut [u8]) -> Result<usize, Error> {
        let decrypt = Error::Decrypt {
            during: "a transport frame",
        };
        let len = in_out.len().checked_sub(TAG_LEN).ok_or(decrypt.clone())?;
        if self.n == u64::MAX {
            return Err(Error::NonceExhausted);
        }
        #[cfg(feature = "openssl-chacha")]
        {
            let nonce = self.nonce_bytes(self.n);
            if let Some(fast) = self.fast_for(len) {
                let (ct, tag) = in_out.split_at_mut(len);
                fast.open_in_place(&nonce, ct, tag).map_err(|_| decrypt)?;
                self.n += 1;
                return Ok(len);
            }
        }
        // The nonce advances only when the frame authenticates.
        self.key
            .open_in_place(self.nonce(self.n), Aad::empty(), in_out)
            .map_err(|_| decrypt)?;
        self.n += 1;
        Ok(len)
    }

    /// Decrypts `ciphertext` (tag included) into `out`, which must hold
    /// `ciphertext.len() - 16` bytes. Returns the plaintext length.
    pub(crate) fn open_into(&mut self, ciphertext: &[u8], out: &mut [u8]) -> Result<usize, Error> {
        let decrypt = Error::Decrypt {
            during: "a transport frame",
        };
        let len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(decrypt.clone())?;
        let (ct, tag) = ciphertext.split_at(len);
        if self.n == u64::MAX {
            return Err(Error::NonceExhausted);
        }
        #[cfg(feature = "openssl-chacha")]
        {
            let nonce = self.nonce_bytes(self.n);
            if let Some(fast) = self.fast_for(len) {
                fast.open_into(&nonce, ct, tag, &mut out[..len])
                    .map_err(|_| decrypt)?;
                self.n += 1;
                return Ok(len);
            }
        }
        // The nonce advances only when the frame authenticates.
        self.key
            .open_separate_gather(self.nonce(self.n), Aad::empty(), ct, tag, &mut out[..len])
            .map_err(|_| decrypt)?;
        self.n += 1;
        Ok(len)
    }

    /// Noise `Rekey()`: the new key is the first 32 bytes of the encryption
    /// of 32 zero bytes under the reserved nonce. The counter is kept.
    pub(crate) fn rekey(&mut self) {
        // An identity "cipher" would make this Rekey() give the zero key.
        #[cfg(all(fuzzing, capnp_noise_fuzz_cheap_crypto))]
        {
            self.key = self.key.rekeyed();
        }
        #[cfg(not(all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
        {
            let mut k = Zeroizing::new([0u8; 32]);
            // Sealing with a valid key and a 32-byte buffer cannot fail.
            let _tag = self
                .key
                .seal_in_place_separate_tag(self.nonce(u64::MAX), Aad::empty(), &mut k[..])
                .expect("rekey encryption");
            self.key = Self::key(self.algorithm, &k);
            #[cfg(feature = "openssl-chacha")]
            if self.fast.is_some() {
                self.fast = Some(fast::FastChaCha::new(&k));
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn set_nonce_for_tests(&mut self, n: u64) {
        self.n = n;
    }
}

/// OpenSSL's ChaCha20-Poly1305 for large frames (`openssl-chacha`).
#[cfg(feature = "openssl-chacha")]
mod fast {
    use openssl::cipher::Cipher;
    use openssl::cipher_ctx::CipherCtx;
    use zeroize::Zeroizing;

    use super::TAG_LEN;
    use crate::error::Error;

    fn refused(_: openssl::error::ErrorStack) -> Error {
        Error::Internal("OpenSSL's ChaCha20-Poly1305 refused an operation")
    }

    /// One direction's OpenSSL context, keyed once and made on first use
    /// (for sealing or for opening: a direction does only one of them).
    pub(super) struct FastChaCha {
        key: Zeroizing<[u8; 32]>,
        ctx: Option<(CipherCtx, bool)>,
    }

    impl FastChaCha {
        pub(super) fn new(key: &[u8; 32]) -> Self {
            FastChaCha {
                key: Zeroizing::new(*key),
                ctx: None,
            }
        }

        /// The context, initialised with `nonce` for sealing (`seal`) or
        /// opening.
        fn start(&mut self, seal: bool, nonce: &[u8; 12]) -> Result<&mut CipherCtx, Error> {
            if !matches!(&self.ctx, Some((_, s)) if *s == seal) {
                let mut ctx = CipherCtx::new().map_err(refused)?;
                let cipher = Some(Cipher::chacha20_poly1305());
                if seal {
                    ctx.encrypt_init(cipher, Some(&self.key[..]), None)
                } else {
                    ctx.decrypt_init(cipher, Some(&self.key[..]), None)
                }
                .map_err(refused)?;
                self.ctx = Some((ctx, seal));
            }
            let (ctx, _) = self.ctx.as_mut().expect("set above");
            if seal {
                ctx.encrypt_init(None, None, Some(nonce))
            } else {
                ctx.decrypt_init(None, None, Some(nonce))
            }
            .map_err(refused)?;
            Ok(ctx)
        }

        /// Encrypts `in_out` in place and writes the tag.
        pub(super) fn seal_in_place(
            &mut self,
            nonce: &[u8; 12],
            in_out: &mut [u8],
            tag: &mut [u8; TAG_LEN],
        ) -> Result<(), Error> {
            let ctx = self.start(true, nonce)?;
            let len = in_out.len();
            ctx.cipher_update_inplace(in_out, len).map_err(refused)?;
            ctx.cipher_final(&mut []).map_err(refused)?;
            ctx.tag(tag).map_err(refused)
        }

        /// Encrypts `plaintext || [last]` into `ct || last_ct` and writes
        /// the tag into `tag`.
        pub(super) fn seal_out_of_place(
            &mut self,
            nonce: &[u8; 12],
            plaintext: &[u8],
            ct: &mut [u8],
            last: u8,
            last_ct: &mut [u8],
            tag: &mut [u8],
        ) -> Result<(), Error> {
            let ctx = self.start(true, nonce)?;
            ctx.cipher_update(plaintext, Some(ct)).map_err(refused)?;
            ctx.cipher_update(&[last], Some(last_ct)).map_err(refused)?;
            ctx.cipher_final(&mut []).map_err(refused)?;
            ctx.tag(tag).map_err(refused)
        }

        /// Decrypts `ct` in place if `tag` authenticates it; otherwise
        /// zeroes `ct` (no unauthenticated plaintext stays behind).
        pub(super) fn open_in_place(
            &mut self,
            nonce: &[u8; 12],
            ct: &mut [u8],
            tag: &[u8],
        ) -> Result<(), Error> {
            let result = self.start(false, nonce).and_then(|ctx| {
                ctx.set_tag(tag).map_err(refused)?;
                let len = ct.len();
                ctx.cipher_update_inplace(ct, len).map_err(refused)?;
                ctx.cipher_final(&mut []).map_err(refused).map(|_| ())
            });
            if result.is_err() {
                ct.fill(0);
            }
            result
        }

        /// Decrypts `ct` into `out` (same length) if `tag` authenticates
        /// it; otherwise zeroes `out`.
        pub(super) fn open_into(
            &mut self,
            nonce: &[u8; 12],
            ct: &[u8],
            tag: &[u8],
            out: &mut [u8],
        ) -> Result<(), Error> {
            let result = self.start(false, nonce).and_then(|ctx| {
                ctx.set_tag(tag).map_err(refused)?;
                ctx.cipher_update(ct, Some(out)).map_err(refused)?;
                ctx.cipher_final(&mut []).map_err(refused).map(|_| ())
            });
            if result.is_err() {
                out.fill(0);
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snow::resolvers::{CryptoResolver, DefaultResolver};

    /// Matches snow's reference cipher, rekey included, for both suites.
    #[test]
    fn agrees_with_snow_reference_cipher() {
        for (suite, choice) in [
            (
                Suite::ChaChaPolyBlake2s,
                snow::params::CipherChoice::ChaChaPoly,
            ),
            (Suite::AesGcmSha256, snow::params::CipherChoice::AESGCM),
        ] {
            let mut ours = CipherState::new(suite, &[9; 32]);
            let mut reference = DefaultResolver.resolve_cipher(&choice).unwrap();
            reference.set(&[9; 32]);
            for n in 0..3u64 {
                if n == 2 {
                    ours.rekey();
                    reference.rekey();
                }
                let mut buf = *b"some plaintext!";
                let tag = ours.seal_in_place(&mut buf).unwrap();
                let mut expect = [0u8; 64];
                let len = reference.encrypt(n, &[], b"some plaintext!", &mut expect);
                assert_eq!([&buf[..], &tag[..]].concat(), expect[..len]);
            }
        }
    }

    #[test]
    fn open_checks_and_advances_only_on_success() {
        let mut tx = CipherState::new(Suite::AesGcmSha256, &[1; 32]);
        let mut rx = CipherState::new(Suite::AesGcmSha256, &[1; 32]);
        let mut buf = *b"hello";
        let tag = tx.seal_in_place(&mut buf).unwrap();
        let mut frame = [&buf[..], &tag[..]].concat();
        let mut out = [0u8; 5];
        frame[0] ^= 1;
        assert!(matches!(
            rx.open_into(&frame, &mut out),
            Err(Error::Decrypt { .. })
        ));
        frame[0] ^= 1;
        assert_eq!(rx.open_into(&frame, &mut out).unwrap(), 5);
        assert_eq!(&out, b"hello");
        assert!(
            rx.open_into(&frame, &mut out).is_err(),
            "a replay fails: the nonce moved on"
        );
        assert!(rx.open_into(&frame[..10], &mut out).is_err());
    }

    /// The out-of-place seal and the in-place open agree with the in-place
    /// seal byte for byte, and leave the input alone.
    #[test]
    fn out_of_place_seal_and_in_place_open_match_in_place_seal() {
        for suite in Suite::ALL {
            let mut a = CipherState::new(suite, &[3; 32]);
            let mut b = CipherState::new(suite, &[3; 32]);
            let mut rx = CipherState::new(suite, &[3; 32]);
            for len in [0usize, 1, 15, 16, 17, 1000, 65518] {
                let plain: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
                let mut in_place = plain.clone();
                in_place.push(0x02);
                let tag = a.seal_in_place(&mut in_place).unwrap();
                in_place.extend_from_slice(&tag);
                let mut out = vec![0u8; len + 1 + TAG_LEN];
                b.seal_out_of_place(&plain, 0x02, &mut out).unwrap();
                assert_eq!(out, in_place, "{suite} {len}");
                assert_eq!(rx.open_in_place(&mut out).unwrap(), len + 1);
                assert_eq!(&out[..len], &plain[..]);
                assert_eq!(out[len], 0x02);
            }
            let mut wrong = vec![0u8; 5];
            assert!(b.seal_out_of_place(b"abc", 0, &mut wrong).is_err());
            let mut short = [0u8; 15];
            assert!(rx.open_in_place(&mut short).is_err());
        }
    }

    /// Frames on both sides of [`FAST_CHACHA_MIN`] (two implementations
    /// with the `openssl-chacha` feature) match snow's reference cipher,
    /// across a rekey; a tampered large frame fails, leaves no plaintext
    /// behind and does not advance the nonce.
    #[test]
    fn large_and_small_frames_agree_with_the_reference_and_reject_tampering() {
        let choice = snow::params::CipherChoice::ChaChaPoly;
        let mut tx = CipherState::new(Suite::ChaChaPolyBlake2s, &[5; 32]);
        let mut rx = CipherState::new(Suite::ChaChaPolyBlake2s, &[5; 32]);
        let mut reference = DefaultResolver.resolve_cipher(&choice).unwrap();
        reference.set(&[5; 32]);
        let sizes = [
            FAST_CHACHA_MIN - 1,
            FAST_CHACHA_MIN,
            65518,
            10,
            FAST_CHACHA_MIN + 1,
        ];
        for (n, len) in sizes.into_iter().enumerate() {
            if n == 3 {
                tx.rekey();
                rx.rekey();
                reference.rekey();
            }
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + n) as u8).collect();
            let mut expect = vec![0u8; len + TAG_LEN];
            reference.encrypt(n as u64, &[], &plain, &mut expect);
            let mut sealed = plain.clone();
            let tag = tx.seal_in_place(&mut sealed).unwrap();
            sealed.extend_from_slice(&tag);
            assert_eq!(sealed, expect, "seal of {len} bytes");
            // Tampered: fails, zeroes what it wrote, keeps the nonce.
            let mut bad = sealed.clone();
            bad[len / 2] ^= 0x40;
            let mut out = vec![0xAAu8; len];
            assert!(rx.open_into(&bad, &mut out).is_err());
            assert!(
                out.iter().all(|&b| b == 0 || b == 0xAA),
                "no plaintext of a forged frame of {len} bytes"
            );
            assert!(rx.open_in_place(&mut bad).is_err());
            if len >= FAST_CHACHA_MIN {
                assert!(bad[..len].iter().all(|&b| b == 0));
            }
            // Genuine: opens, with either method.
            if n % 2 == 0 {
                assert_eq!(rx.open_into(&sealed, &mut out).unwrap(), len);
                assert_eq!(out, plain);
            } else {
                assert_eq!(rx.open_in_place(&mut sealed).unwrap(), len);
                assert_eq!(&sealed[..len], &plain[..]);
            }
        }
    }

    #[test]
    fn reserved_nonce_is_never_used() {
        let mut tx = CipherState::new(Suite::ChaChaPolyBlake2s, &[1; 32]);
        tx.set_nonce_for_tests(u64::MAX - 1);
        assert!(tx.seal_in_place(&mut [0u8; 4]).is_ok());
        assert!(matches!(
            tx.seal_in_place(&mut [0u8; 4]),
            Err(Error::NonceExhausted)
        ));
    }
}
