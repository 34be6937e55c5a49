//! Targets for the pure parsers of peer and user bytes: the frame decoder,
//! the preamble, the handshake payload and the VatId text form.

use capnp::message::Builder;

use super::support::{initiator_identity, responder_identity, CHEAP_CRYPTO};
use super::Seed;
use capnp_noise::schema::noise_capnp::handshake_payload;
use capnp_noise::vat_id::VAT_ID_TEXT_LEN;
use capnp_noise::wire::frame::{self, FrameBounds};
use capnp_noise::wire::{
    payload as hs_payload, preamble as pre, LENGTH_PREFIX_LEN, MAX_MESSAGE_LEN,
};
use capnp_noise::wire::{Suite, MAX_HANDSHAKE_PAYLOAD_LEN};
use capnp_noise::{Error, ProtocolError, VatId};

/// `frame`: [`frame::split_frame`] with bounds from the input.
///
/// Input: min (u16 BE), max (u16 BE), then the received bytes. Checks the
/// decision against the announced length, that the body is the bytes after
/// the prefix, and that a decision taken on a prefix of the bytes stands
/// when more arrive.
pub fn frame(data: &[u8]) {
    let [a, b, c, d, buf @ ..] = data else {
        return;
    };
    let bounds = FrameBounds {
        min: usize::from(u16::from_be_bytes([*a, *b])),
        max: usize::from(u16::from_be_bytes([*c, *d])),
        what: "a fuzzed frame",
    };
    let (lo, hi) = (bounds.min.max(1), bounds.max.min(MAX_MESSAGE_LEN));
    let result = frame::split_frame(buf, bounds);
    match (frame::peek_len(buf), &result) {
        (None, Ok(None)) => assert!(buf.len() < LENGTH_PREFIX_LEN),
        (Some(len), Err(Error::Protocol(ProtocolError::FrameTooShort { len: l, min, .. }))) => {
            assert!(*l == len && *min == lo && len < lo, "{result:?}");
        }
        (Some(len), Err(Error::Protocol(ProtocolError::FrameTooLong { len: l, max, .. }))) => {
            assert!(
                *l == len && *max == hi && len > hi && len >= lo,
                "{result:?}"
            );
        }
        (Some(len), Ok(None)) => {
            assert!((lo..=hi).contains(&len) && buf.len() < LENGTH_PREFIX_LEN + len);
        }
        (Some(len), Ok(Some((body, used)))) => {
            assert!((lo..=hi).contains(&len));
            assert_eq!(*used, LENGTH_PREFIX_LEN + len);
            assert_eq!(*body, &buf[LENGTH_PREFIX_LEN..*used]);
            let mut prefix = Vec::new();
            frame::put_len(&mut prefix, len);
            assert_eq!(prefix, buf[..LENGTH_PREFIX_LEN]);
        }
        (peek, r) => panic!("split_frame gave {r:?} for a prefix announcing {peek:?}"),
    }
    for cut in [0, 1, 2, buf.len().saturating_sub(1)] {
        if cut <= buf.len() {
            match frame::split_frame(&buf[..cut], bounds) {
                Ok(None) => {}
                early => assert_eq!(format!("{early:?}"), format!("{result:?}"), "cut {cut}"),
            }
        }
    }
}

/// `preamble`: [`pre::parse`] with the accepted suites from the input.
///
/// Input: a bit mask of accepted suites (bit i: `Suite::ALL[i]`), then the
/// received bytes. Checks that an accepted preamble is byte for byte the
/// encoding of an accepted suite with the pattern it names, that "need more" is only said while the
/// preamble can still be incomplete, and that every decision taken on a
/// prefix stands when more bytes arrive.
pub fn preamble(data: &[u8]) {
    let [mask, buf @ ..] = data else {
        return;
    };
    let accepted: Vec<Suite> = Suite::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| mask >> i & 1 == 1)
        .map(|(_, s)| *s)
        .collect();
    let result = pre::parse(buf, &accepted);
    let fixed = pre::MAGIC.len() + 2;
    match &result {
        Ok(Some(p)) => {
            assert!(accepted.contains(&p.suite));
            // The preamble names its pattern too (XX, or IK: SPEC.md 14).
            assert_eq!(buf[..p.len], pre::encode_for(p.suite, p.pattern)[..]);
        }
        Ok(None) => {
            assert!(pre::MAGIC.starts_with(&buf[..buf.len().min(pre::MAGIC.len())]));
            assert!(buf.len() < fixed || buf.len() < fixed + usize::from(buf[fixed - 1]));
        }
        Err(e) => assert!(matches!(e, Error::Protocol(_)), "{e:?}"),
    }
    for cut in 0..buf.len().min(pre::MAX_PREAMBLE_LEN + 1) {
        match pre::parse(&buf[..cut], &accepted) {
            Ok(None) => {}
            early => assert_eq!(format!("{early:?}"), format!("{result:?}"), "cut {cut}"),
        }
    }
}

/// `payload`: [`hs_payload::decode`] of a peer's handshake payload.
///
/// Checks that whatever decodes re-encodes to the same claim, and that a
/// decoded signature binds a static key only for the identity that made it.
pub fn payload(data: &[u8]) {
    let Ok((vat, sig)) = hs_payload::decode(data) else {
        return;
    };
    assert!(data.len() <= MAX_HANDSHAKE_PAYLOAD_LEN);
    let again = hs_payload::decode(&hs_payload::encode(&vat, &sig)).expect("re-encoded payload");
    assert!(again == (vat, sig), "the payload does not round trip");
    // With cheap crypto the fuzzer can sign for any vat.
    for id in [initiator_identity(), responder_identity()]
        .iter()
        .filter(|_| !CHEAP_CRYPTO)
    {
        if hs_payload::verify_binding(&vat, &sig, id.noise_static_public()).is_ok() {
            assert_eq!(
                vat,
                id.vat_id(),
                "a binding verified for a vat that never signed it"
            );
        }
    }
}

/// `vat_id`: the VatId text form, and the key bytes behind it.
///
/// Checks that only the canonical text parses (so one vat has one text),
/// that errors stay short whatever the input, and that every valid key's
/// text parses back to it.
pub fn vat_id(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        match text.parse::<VatId>() {
            Ok(id) => {
                assert_eq!(id.to_string(), text, "a non-canonical text parsed");
                assert!(text.starts_with(&id.fingerprint()));
            }
            Err(e) => {
                assert!(matches!(e, Error::Key(_)), "{e:?}");
                assert!(e.to_string().len() < 2048, "the error grows with the input");
            }
        }
    }
    if let Some(key) = data.first_chunk::<32>() {
        if let Ok(id) = VatId::from_bytes(key) {
            let text = id.to_string();
            assert_eq!(text.len(), VAT_ID_TEXT_LEN);
            assert_eq!(text.parse::<VatId>().expect("a VatId's text parses"), id);
        }
    }
}

/// Seeds of the parser targets, from real encodings.
pub(super) fn seeds() -> Vec<Seed> {
    let mut v = Vec::new();
    let framed = |bounds: [u16; 2], len: u16, body: usize| {
        let mut b = [
            bounds[0].to_be_bytes(),
            bounds[1].to_be_bytes(),
            len.to_be_bytes(),
        ]
        .concat();
        b.resize(b.len() + body, 0xa5);
        b
    };
    v.push(Seed::new(
        "frame",
        "transport-frame",
        framed([17, 65535], 20, 20),
    ));
    v.push(Seed::new(
        "frame",
        "handshake-msg1",
        framed([32, 32], 32, 32),
    ));
    v.push(Seed::new("frame", "zero-length", framed([17, 65535], 0, 0)));
    v.push(Seed::new("frame", "too-long", framed([32, 32], 33, 33)));
    v.push(Seed::new(
        "frame",
        "incomplete",
        framed([17, 65535], 100, 3),
    ));

    for (s, name) in Suite::ALL.iter().zip(["chachapoly", "aesgcm"]) {
        v.push(Seed::new(
            "preamble",
            name,
            [&[0b11][..], &pre::encode(*s)].concat(),
        ));
    }
    let aes_only = [&[0b10][..], &pre::encode(Suite::ChaChaPolyBlake2s)].concat();
    v.push(Seed::new("preamble", "suite-not-accepted", aes_only));
    v.push(Seed::new(
        "preamble",
        "http",
        b"\x03GET / HTTP/1.1\r\n".to_vec(),
    ));
    let mut version2 = [&[0b11][..], &pre::encode(Suite::ChaChaPolyBlake2s)].concat();
    version2[1 + pre::MAGIC.len()] = 2;
    v.push(Seed::new("preamble", "version-2", version2));
    let mut truncated = [&[0b11][..], &pre::encode(Suite::AesGcmSha256)].concat();
    truncated.truncate(20);
    v.push(Seed::new("preamble", "truncated", truncated));

    for (id, name) in [
        (initiator_identity(), "initiator"),
        (responder_identity(), "responder"),
    ] {
        v.push(Seed::new(
            "payload",
            name,
            id.handshake_payload_for_tests().to_vec(),
        ));
    }
    let mut empty = Builder::new_default();
    empty.init_root::<handshake_payload::Builder>();
    let empty = capnp::serialize::write_message_to_words(&empty);
    v.push(Seed::new("payload", "empty-root", empty));

    let id = initiator_identity().vat_id();
    v.push(Seed::new("vat_id", "text", id.to_string().into_bytes()));
    v.push(Seed::new(
        "vat_id",
        "fingerprint",
        id.fingerprint().into_bytes(),
    ));
    v.push(Seed::new(
        "vat_id",
        "upper-case",
        id.to_string().to_uppercase().into_bytes(),
    ));
    v.push(Seed::new("vat_id", "key-bytes", id.as_bytes().to_vec()));
    v
}
