//! VatIds every parser refuses (SPEC.md 5.2 and 10.1), from
//! `tests/vectors/vat_id_rejected.json`.
//!
//! Each entry is 32 bytes that some Ed25519 library might take for a public
//! key, with its text form (a correct check, so only the key is wrong) and
//! why it is no VatId: `non-canonical` (it decodes, but re-encoding the point
//! gives other bytes: `y >= p`, or `x = 0` with the sign bit set),
//! `small-order`, or `not-a-point`. The replay offers every entry to every
//! place a VatId is parsed (bytes, text, allow-list and known-vats lines, a
//! sturdy ref as text and as a struct, a handshake payload alone and inside a
//! real handshake, each VatId field of an introduction, its completion and
//! a `ThirdPartyToAwait`) and requires a refusal of that place's error
//! class; the file's `accepted` controls go through the same places and must
//! pass. `CAPNP_NOISE_REGEN=1` rewrites the file from the curve's
//! arithmetic (curve25519-dalek, a dev-dependency used only for that).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use capnp::message::Builder;
use capnp::serialize;
use capnp_noise::intro::{Introduction, ThirdPartyToAwait};
use capnp_noise::policy::{AllowList, AnyVat, Tofu};
use capnp_noise::schema::noise_capnp::sturdy_ref;
use capnp_noise::sturdy::SturdyRef;
use capnp_noise::wire::{payload, HandshakeConfig, Suite};
use capnp_noise::{Error, Identity, IntroductionError, ProtocolError, VatId};
use capnp_noise_test::fixtures::{self, deterministic_handshakes};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const NAME: &str = "vat_id_rejected.json";

/// p = 2^255 - 19, little-endian.
const P: [u8; 32] = {
    let mut p = [0xff; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    p
};

/// The text form of any 32 bytes, with a correct check (SPEC.md 10.1).
fn text_of(key: &[u8; 32]) -> String {
    let digest = Sha256::new()
        .chain_update(b"capnp-noise vat-id check")
        .chain_update(key)
        .finalize();
    let mut raw = key.to_vec();
    raw.extend_from_slice(&digest[..2]);
    format!(
        "vat1{}",
        data_encoding_lower(&raw) // 55 characters
    )
}

/// RFC 4648 base32, lower case, no padding.
fn data_encoding_lower(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &b in bytes {
        acc = acc << 8 | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[(acc >> bits) as usize & 31] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[(acc << (5 - bits)) as usize & 31] as char);
    }
    out
}

/// The encoded `y` (sign bit cleared) as a little-endian number, compared with p.
fn y_at_least_p(key: &[u8; 32]) -> bool {
    let mut y = *key;
    y[31] &= 0x7f;
    y.iter().rev().cmp(P.iter().rev()) != std::cmp::Ordering::Less
}

fn generate() -> Value {
    use curve25519_dalek::constants::EIGHT_TORSION;
    use curve25519_dalek::edwards::CompressedEdwardsY;
    let mut rejected = Vec::new();
    let mut entry = |key: [u8; 32], why: &str, note: String| {
        rejected.push(json!({
            "ed25519": hex::encode(key),
            "text": text_of(&key),
            "why": why,
            "note": note,
        }));
    };
    let decodes = |key: &[u8; 32]| CompressedEdwardsY(*key).decompress();
    // Every y from p to 2^255 - 1, with either sign bit.
    for k in 0u8..19 {
        for sign in [0u8, 0x80] {
            let mut key = P;
            key[0] += k;
            key[31] |= sign;
            let sign_text = if sign == 0 { "clear" } else { "set" };
            match decodes(&key) {
                Some(point) => {
                    let order = if point.is_small_order() {
                        "small order"
                    } else {
                        "large order"
                    };
                    entry(
                        key,
                        "non-canonical",
                        format!("y = p + {k}, sign bit {sign_text}: a point of {order} whose canonical encoding has y = {k}"),
                    );
                }
                None => entry(
                    key,
                    "not-a-point",
                    format!("y = p + {k}, sign bit {sign_text}: no point has this y"),
                ),
            }
        }
    }
    // x = 0 with the sign bit set: y = 1 and y = p - 1.
    let mut one = [0u8; 32];
    one[0] = 1;
    let mut minus_one = P;
    minus_one[0] -= 1;
    for (y, name) in [
        (one, "1 (the neutral point)"),
        (minus_one, "p - 1 (order 2)"),
    ] {
        let mut key = y;
        key[31] |= 0x80;
        entry(
            key,
            "non-canonical",
            format!("y = {name}, where x = 0, with the sign bit set"),
        );
    }
    // The eight points of small order, canonically encoded.
    for (i, point) in EIGHT_TORSION.iter().enumerate() {
        entry(
            point.compress().to_bytes(),
            "small-order",
            format!("a point of order {}", [1, 8, 4, 8, 2, 8, 4, 8][i]),
        );
    }
    // The smallest y with no point (sign bit clear).
    let mut key = [0u8; 32];
    while {
        key[0] += 1;
        decodes(&key).is_some()
    } {}
    entry(
        key,
        "not-a-point",
        format!("y = {}: no point has this y", key[0]),
    );
    let control = |id: Identity| json!({"ed25519": hex::encode(id.vat_id().as_bytes()), "text": id.vat_id().to_string()});
    json!({
        "protocol": "capnp-noise/1.1",
        "note": "32-byte Ed25519 public keys that are no VatId (SPEC.md 5.2): every parser of a VatId (bytes, text form, handshake payload, sturdy ref, introduction, trust file) must refuse each of them. 'text' is its text form with a correct check (SPEC.md 10.1). 'why': non-canonical (decoding then re-encoding the point gives other bytes), small-order, or not-a-point. 'accepted' are valid VatIds, refused nowhere (the test vectors' two vats).",
        "rejected": rejected,
        "accepted": [control(fixtures::initiator_identity()), control(fixtures::responder_identity())],
    })
}

#[test]
fn rejected_vat_ids_are_reproduced() {
    super::regenerate_or_compare(
        NAME,
        &generate(),
        "it no longer follows the curve's arithmetic",
    );
}

fn load() -> Value {
    super::load_committed(NAME)
}

fn key_of(entry: &Value) -> [u8; 32] {
    hex::decode(entry["ed25519"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

/// Replaces the one occurrence of `from` in `bytes` with `to`.
fn substitute(bytes: &[u8], from: &[u8; 32], to: &[u8; 32]) -> Vec<u8> {
    let at: Vec<usize> = (0..=bytes.len() - 32)
        .filter(|&i| &bytes[i..i + 32] == from)
        .collect();
    assert_eq!(at.len(), 1, "the key occurs once in the encoding");
    let mut out = bytes.to_vec();
    out[at[0]..at[0] + 32].copy_from_slice(to);
    out
}

/// Where VatIds are parsed, each returning the error it gave for `key`
/// (given as bytes and as `text`), or `Ok` if it accepted it.
struct Places {
    /// A known key in each encoded message below, replaced by the key under test.
    stand_in: [u8; 32],
    payload: Vec<u8>,
    sturdy: Vec<u8>,
    contacts: Vec<(&'static str, Vec<u8>)>,
    completion: Vec<u8>,
    to_await: Vec<u8>,
}

impl Places {
    fn new() -> Self {
        let stand_in_id = Identity::from_seed(&[0x5a; 32]);
        let stand_in = *stand_in_id.vat_id().as_bytes();
        let vat = |seed: u8| Identity::from_seed(&[seed; 32]).vat_id();
        let expiry = UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        let addresses = vec!["127.0.0.1:4000".parse().unwrap()];
        let intro = |introducer: &Identity, provider, recipient| {
            Introduction::new(
                introducer,
                provider,
                addresses.clone(),
                recipient,
                [7; 32],
                expiry,
            )
            .unwrap()
        };
        let alice = Identity::from_seed(&[0x0a; 32]);
        let bob = Identity::from_seed(&[0x0b; 32]);
        let as_provider = intro(&bob, stand_in_id.vat_id(), alice.vat_id());
        let contacts = vec![
            ("provider", as_provider.encode()),
            (
                "introducer",
                intro(&stand_in_id, vat(0x0c), alice.vat_id()).encode(),
            ),
            (
                "recipient",
                intro(&bob, vat(0x0c), stand_in_id.vat_id()).encode(),
            ),
            (
                "forward.to",
                intro(&bob, vat(0x0c), alice.vat_id())
                    .forward(&alice, stand_in_id.vat_id())
                    .unwrap()
                    .encode(),
            ),
        ];
        let mut sturdy = Builder::new_default();
        SturdyRef::new(
            stand_in_id.vat_id(),
            addresses.clone(),
            capnp_noise::sturdy::ObjectId::from_bytes(&[9; 32]).unwrap(),
        )
        .unwrap()
        .write_to(sturdy.init_root::<sturdy_ref::Builder>());
        Places {
            stand_in,
            payload: payload::encode(&stand_in_id.vat_id(), &[1; 64]),
            sturdy: serialize::write_message_to_words(&sturdy),
            completion: as_provider.encode_completion(),
            to_await: ThirdPartyToAwait::new(stand_in_id.vat_id(), [7; 32], expiry)
                .unwrap()
                .encode(),
            contacts,
        }
    }

    /// Every place's verdict on `key`, named.
    fn verdicts(&self, key: &[u8; 32], text: &str) -> Vec<(String, Result<(), Error>)> {
        let file = Path::new("trust-file");
        let sub = |bytes: &[u8]| substitute(bytes, &self.stand_in, key);
        let mut v: Vec<(String, Result<(), Error>)> = vec![
            ("VatId::from_bytes".into(), VatId::from_bytes(key).map(drop)),
            ("text form".into(), text.parse::<VatId>().map(drop)),
            (
                "allow-list line".into(),
                AllowList::parse(&format!("{text} a comment\n"), file).map(drop),
            ),
            (
                "known-vats line".into(),
                Tofu::parse(&format!("127.0.0.1:4000 {text}\n"), file).map(drop),
            ),
            (
                "sturdy ref text".into(),
                format!(
                    "capnp-noise://{text}@127.0.0.1:4000/{}",
                    "a".repeat(52) // 32 bytes of object id
                )
                .parse::<SturdyRef>()
                .map(drop),
            ),
            ("SturdyRef struct".into(), read_sturdy(&sub(&self.sturdy))),
            (
                "handshake payload".into(),
                payload::decode(&sub(&self.payload)).map(drop),
            ),
            ("in a handshake".into(), in_a_handshake(key)),
            (
                "ThirdPartyCompletion".into(),
                Introduction::decode_completion(&sub(&self.completion)).map(drop),
            ),
            (
                "ThirdPartyToAwait.recipient".into(),
                ThirdPartyToAwait::decode(&sub(&self.to_await)).map(drop),
            ),
        ];
        for (field, bytes) in &self.contacts {
            v.push((
                format!("ThirdPartyToContact {field}"),
                Introduction::decode(&sub(bytes)).map(drop),
            ));
        }
        v
    }
}

fn read_sturdy(bytes: &[u8]) -> Result<(), Error> {
    let message =
        serialize::read_message_from_flat_slice(&mut &bytes[..], Default::default()).unwrap();
    SturdyRef::read_from(message.get_root().unwrap()).map(drop)
}

/// A real handshake in which the responder's payload claims `key`, with the
/// responder's genuine signature over its static key: decoding, not the
/// signature, must refuse it (as a malformed payload, SPEC.md 5.4).
fn in_a_handshake(key: &[u8; 32]) -> Result<(), Error> {
    let suite = Suite::ChaChaPolyBlake2s;
    let (mut i, mut r) = deterministic_handshakes(
        suite,
        HandshakeConfig::with_suite(suite),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    let genuine = fixtures::responder_identity();
    let genuine_key = *genuine.vat_id().as_bytes();
    r.replace_payload_for_tests(
        substitute(genuine.handshake_payload_for_tests(), &genuine_key, key).into(),
    );
    fixtures::drive(&mut i, &mut r, usize::MAX)
}

/// The error class each place must give: SPEC.md 5.4 and 8.
fn class_ok(place: &str, e: &Error) -> bool {
    match e {
        Error::Protocol(ProtocolError::BadPayload(_)) => {
            place.contains("payload") || place.contains("handshake")
        }
        Error::Introduction(IntroductionError::Malformed(_)) => place.starts_with("ThirdParty"),
        Error::Key(_) => !place.contains("handshake") && !place.starts_with("ThirdParty"),
        _ => false,
    }
}

#[test]
fn every_parser_refuses_every_rejected_vat_id() {
    let v = load();
    let places = Places::new();
    let rejected = v["rejected"].as_array().unwrap();
    assert!(rejected.len() >= 20);
    for entry in rejected {
        let key = key_of(entry);
        let why = entry["why"].as_str().unwrap();
        // The file's labels agree with plain arithmetic where they can.
        if why == "non-canonical" {
            assert!(y_at_least_p(&key) || key[31] & 0x80 != 0, "{entry}");
        }
        let text = entry["text"].as_str().unwrap();
        assert_eq!(text, text_of(&key), "{entry}");
        for (place, verdict) in places.verdicts(&key, text) {
            let e = verdict.expect_err(&format!("{place} accepted {entry}"));
            assert!(
                class_ok(&place, &e),
                "{place}: wrong class for {entry}: {e:?}"
            );
            let msg = e.to_string();
            let want = match why {
                "non-canonical" => "canonical",
                "small-order" => "small-order",
                _ => "not a valid",
            };
            assert!(msg.contains(want), "{place}: {entry}: {msg}");
        }
    }
}

#[test]
fn every_parser_accepts_the_controls() {
    let v = load();
    let places = Places::new();
    for entry in v["accepted"].as_array().unwrap() {
        let key = key_of(entry);
        assert_eq!(entry["text"].as_str().unwrap(), text_of(&key));
        for (place, verdict) in places.verdicts(&key, entry["text"].as_str().unwrap()) {
            // The handshake only completes for the genuine responder's key.
            if place == "in a handshake"
                && key != *fixtures::responder_identity().vat_id().as_bytes()
            {
                assert!(
                    matches!(verdict, Err(Error::BadIdentityProof(_))),
                    "{place}: {verdict:?}"
                );
                continue;
            }
            verdict.unwrap_or_else(|e| panic!("{place} refused {entry}: {e}"));
        }
    }
}
