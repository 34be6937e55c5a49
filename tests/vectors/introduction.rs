//! Introduction test vectors (SPEC.md 12.10), `tests/vectors/introduction.json`.
//!
//! Fixed seeds for the four vats (introducer Bob, provider Carol, recipient
//! Alice, and Dave, to whom Alice forwards it), a fixed nonce, expiry and
//! address list give: `C` (the canonical `Introduction`), the message the
//! introducer signs and its signature, the forwarding link (`D_0`, the
//! signed message, the signature, `D_1`), and the encoded
//! `ThirdPartyToContact` (as Bob sends it, and as forwarded),
//! `ThirdPartyCompletion` (as Dave presents it) and `ThirdPartyToAwait`.
//!
//! The test rebuilds all of it from the seeds and requires the committed
//! bytes; it recomputes the digests with aws-lc's SHA-256 and checks every
//! signature with aws-lc's Ed25519 (another implementation than the
//! ed25519-dalek the crate signs with; Ed25519 signatures are
//! deterministic, so aws-lc must also produce the very same bytes); and it
//! decodes the committed messages and verifies them as Alice, Dave and
//! Carol would. `CAPNP_NOISE_REGEN=1` rewrites the file.

use std::time::{Duration, UNIX_EPOCH};

use aws_lc_rs::digest::{digest, SHA256};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use capnp_noise::intro::{Introduction, ThirdPartyToAwait, FORWARD_CONTEXT, INTRODUCTION_CONTEXT};
use capnp_noise::{Error, Identity, IntroductionError};
use serde_json::{json, Value};

const NAME: &str = "introduction.json";

/// (role, Ed25519 seed byte)
const VATS: [(&str, u8); 4] = [
    ("introducer", 0x0b),
    ("provider", 0x0c),
    ("recipient", 0x0a),
    ("forwarded_to", 0x0d),
];
const EXPIRES_AT: u64 = 2_000_000_000; // 2033-05-18T03:33:20Z
const ADDRESSES: [&str; 3] = ["127.0.0.1:4000", "[::1]:4000", "carol.example:4000"];

fn nonce() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn identity(role: &str) -> Identity {
    let (_, seed) = VATS.iter().find(|(r, _)| *r == role).unwrap();
    Identity::from_seed(&[*seed; 32])
}

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    digest(&SHA256, &parts.concat()).as_ref().to_vec()
}

/// What Bob makes, and what Alice makes of it by forwarding it to Dave.
fn build() -> (Introduction, Introduction) {
    let intro = Introduction::new(
        &identity("introducer"),
        identity("provider").vat_id(),
        ADDRESSES.iter().map(|a| a.parse().unwrap()).collect(),
        identity("recipient").vat_id(),
        nonce(),
        UNIX_EPOCH + Duration::from_secs(EXPIRES_AT),
    )
    .unwrap();
    let forwarded = intro
        .forward(&identity("recipient"), identity("forwarded_to").vat_id())
        .unwrap();
    (intro, forwarded)
}

fn generate() -> Value {
    let (intro, forwarded) = build();
    let signed = intro.signed_message();
    let canonical = &signed[INTRODUCTION_CONTEXT.len()..];
    let link = &forwarded.forwards()[0];
    let d0 = sha256(&[INTRODUCTION_CONTEXT, canonical, intro.signature()]);
    let forward_msg = [FORWARD_CONTEXT, &d0, link.to().as_bytes()].concat();
    let d1 = sha256(&[&d0, link.to().as_bytes(), link.signature()]);
    let vats: serde_json::Map<String, Value> = VATS
        .iter()
        .map(|(role, seed)| {
            let id = identity(role);
            let vat = json!({
                "ed25519_seed": hex::encode([*seed; 32]),
                "ed25519_public": hex::encode(id.vat_id().as_bytes()),
                "vat_id": id.vat_id().to_string(),
            });
            (role.to_string(), vat)
        })
        .collect();
    json!({
        "protocol": "capnp-noise/1.1",
        "note": "SPEC.md 12.4. All byte strings are hex; Ed25519 signatures are deterministic (RFC 8032). 'canonical' is C, the canonical encoding of the Introduction struct, which an implementation must reproduce exactly; 'signed_message' is what is signed. The encoded messages (standard stream framing, unpacked) are this implementation's layout: other layouts are as valid, so decode them rather than reproduce them. The forwarding link is signed by the recipient; the completion is presented by forwarded_to.",
        "vats": vats,
        "introduction": {
            "provider_addresses": ADDRESSES,
            "nonce": hex::encode(nonce()),
            "expires_at": EXPIRES_AT,
            "canonical": hex::encode(canonical),
            "signed_message": hex::encode(&signed),
            "signature": hex::encode(intro.signature()),
        },
        "forward": {
            "signer": "recipient",
            "to": "forwarded_to",
            "d0": hex::encode(&d0),
            "signed_message": hex::encode(&forward_msg),
            "signature": hex::encode(link.signature()),
            "d1": hex::encode(&d1),
        },
        "messages": {
            "third_party_to_contact": hex::encode(intro.encode()),
            "third_party_to_contact_forwarded": hex::encode(forwarded.encode()),
            "third_party_completion": hex::encode(forwarded.encode_completion()),
            "third_party_to_await": hex::encode(intro.to_await().encode()),
        },
    })
}

fn load() -> Value {
    super::load_committed(NAME)
}

fn bytes(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

#[test]
fn introduction_vectors_are_reproduced_byte_for_byte() {
    super::regenerate_or_compare(NAME, &generate(), "the introduction format changed");
}

/// The committed digests and signatures, checked with aws-lc alone: SHA-256
/// for `D_0` and `D_1`, Ed25519 from each seed for the public keys and the
/// (deterministic) signatures, and Ed25519 verification.
#[test]
fn introduction_vectors_check_out_with_another_ed25519() {
    let v = load();
    let vat = |role: &str| &v["vats"][role];
    let key_pair = |role: &str| {
        Ed25519KeyPair::from_seed_unchecked(&bytes(&vat(role)["ed25519_seed"])).unwrap()
    };
    for (role, _) in VATS {
        assert_eq!(
            key_pair(role).public_key().as_ref(),
            bytes(&vat(role)["ed25519_public"])
        );
    }
    let sign_check = |role: &str, message: &[u8], signature: &[u8]| {
        assert_eq!(
            key_pair(role).sign(message).as_ref(),
            signature,
            "{role}'s signature"
        );
        UnparsedPublicKey::new(&ED25519, bytes(&vat(role)["ed25519_public"]))
            .verify(message, signature)
            .unwrap();
        let mut altered = message.to_vec();
        altered[message.len() - 1] ^= 1;
        assert!(
            UnparsedPublicKey::new(&ED25519, bytes(&vat(role)["ed25519_public"]))
                .verify(&altered, signature)
                .is_err()
        );
    };
    let i = &v["introduction"];
    let canonical = bytes(&i["canonical"]);
    let signed = bytes(&i["signed_message"]);
    assert_eq!(signed, [INTRODUCTION_CONTEXT, &canonical].concat());
    assert_eq!(&signed[..28], b"capnp-noise/v1 introduction:");
    let signature = bytes(&i["signature"]);
    sign_check("introducer", &signed, &signature);

    let f = &v["forward"];
    let d0 = sha256(&[&signed, &signature]);
    assert_eq!(d0, bytes(&f["d0"]));
    let to = bytes(&vat("forwarded_to")["ed25519_public"]);
    let forward_msg = bytes(&f["signed_message"]);
    assert_eq!(
        forward_msg,
        [&b"capnp-noise/v1 forward:"[..], &d0, &to].concat()
    );
    let link_signature = bytes(&f["signature"]);
    sign_check("recipient", &forward_msg, &link_signature);
    assert_eq!(sha256(&[&d0, &to, &link_signature]), bytes(&f["d1"]));
}

/// The committed messages decode to what the vector says, and verify as
/// their holders and the provider must check them.
#[test]
fn introduction_vector_messages_decode_and_verify() {
    let v = load();
    let m = &v["messages"];
    let vat_id = |role: &str| identity(role).vat_id();
    let before_expiry = UNIX_EPOCH + Duration::from_secs(EXPIRES_AT - 60);
    let at_expiry = UNIX_EPOCH + Duration::from_secs(EXPIRES_AT);

    let contact = Introduction::decode(&bytes(&m["third_party_to_contact"])).unwrap();
    assert_eq!(contact.provider(), &vat_id("provider"));
    assert_eq!(contact.introducer(), &vat_id("introducer"));
    assert_eq!(contact.recipient(), &vat_id("recipient"));
    assert_eq!(contact.holder(), &vat_id("recipient"));
    assert_eq!(contact.nonce(), &nonce());
    assert_eq!(contact.expires_at_unix(), EXPIRES_AT);
    let addresses: Vec<String> = contact
        .provider_addresses()
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(addresses, ADDRESSES);
    assert_eq!(
        contact.signed_message(),
        bytes(&v["introduction"]["signed_message"])
    );
    assert_eq!(
        contact.signature()[..],
        bytes(&v["introduction"]["signature"])
    );
    assert!(contact.forwards().is_empty());
    contact.verify(&vat_id("recipient"), before_expiry).unwrap();
    expect(
        contact.verify(&vat_id("forwarded_to"), before_expiry),
        IntroductionError::WrongRecipient,
    );
    expect(
        contact.verify(&vat_id("recipient"), at_expiry),
        IntroductionError::Expired,
    );

    let forwarded = Introduction::decode(&bytes(&m["third_party_to_contact_forwarded"])).unwrap();
    assert_eq!(forwarded.holder(), &vat_id("forwarded_to"));
    assert_eq!(
        forwarded.forwards()[0].signature()[..],
        bytes(&v["forward"]["signature"])
    );
    forwarded
        .verify(&vat_id("forwarded_to"), before_expiry)
        .unwrap();
    expect(
        forwarded.verify(&vat_id("recipient"), before_expiry),
        IntroductionError::WrongRecipient,
    );

    let completion = Introduction::decode_completion(&bytes(&m["third_party_completion"])).unwrap();
    assert_eq!(completion, forwarded);
    completion
        .verify(&vat_id("forwarded_to"), before_expiry)
        .unwrap();

    let to_await = ThirdPartyToAwait::decode(&bytes(&m["third_party_to_await"])).unwrap();
    assert_eq!(to_await.recipient(), &vat_id("recipient"));
    assert_eq!(to_await.nonce(), &nonce());
    assert_eq!(to_await.expires_at(), at_expiry);

    // One altered byte of C breaks the introducer's signature.
    let mut altered = bytes(&m["third_party_to_contact"]);
    let canonical = bytes(&v["introduction"]["canonical"]);
    let nonce_at = find(&altered, &nonce());
    altered[nonce_at] ^= 1;
    assert!(find(&canonical, &nonce()) > 0);
    let altered = Introduction::decode(&altered).unwrap();
    expect(
        altered.verify(&vat_id("recipient"), before_expiry),
        IntroductionError::BadSignature("the introducer's signature"),
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("present")
}

fn expect<T: std::fmt::Debug>(result: Result<T, Error>, want: IntroductionError) {
    match result {
        Err(Error::Introduction(e)) if e == want => {}
        other => panic!("expected {want:?}, got {other:?}"),
    }
}
