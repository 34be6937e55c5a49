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

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use zeroize::Zeroizing;

use super::preamble::Suite;
use super::TAG_LEN;
use crate::error::Error;

/// One direction's transport cipher: key and nonce counter.
pub(crate) struct CipherState {
    key: LessSafeKey,
    algorithm: &'static aead::Algorithm,
    big_endian_nonce: bool,
    n: u64,
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
        }
    }

    fn key(algorithm: &'static aead::Algorithm, k: &[u8; 32]) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(algorithm, k).expect("a 32-byte key fits both AEADs"))
    }

    fn nonce(&self, n: u64) -> Nonce {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&if self.big_endian_nonce {
            n.to_be_bytes()
        } else {
            n.to_le_bytes()
        });
        Nonce::assume_unique_for_key(bytes)
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
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), in_out)
            .map_err(|_| Error::Config("the AEAD refused to seal".into()))?;
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
            return Err(Error::Config(
                "seal_out_of_place: wrong output length".into(),
            ));
        }
        let nonce = self.next_nonce()?;
        let (ct, last_and_tag) = out.split_at_mut(plaintext.len());
        self.key
            .seal_out_of_place_scatter(nonce, Aad::empty(), plaintext, ct, &[last], last_and_tag)
            .map_err(|_| Error::Config("the AEAD refused to seal".into()))
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
        let mut k = Zeroizing::new([0u8; 32]);
        // Sealing with a valid key and a 32-byte buffer cannot fail.
        let _tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(u64::MAX), Aad::empty(), &mut k[..])
            .expect("rekey encryption");
        self.key = Self::key(self.algorithm, &k);
    }

    #[cfg(test)]
    pub(crate) fn set_nonce_for_tests(&mut self, n: u64) {
        self.n = n;
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
