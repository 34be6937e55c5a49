use super::*;
use capnp::private::layout::{PointerBuilder, StructBuilder, StructSize};
use proptest::prelude::*;

use crate::schema::network_capnp::forward;

pub(super) fn alice() -> Identity {
    Identity::from_seed(&[0xa1; 32])
}
pub(super) fn bob() -> Identity {
    Identity::from_seed(&[0xb0; 32])
}
pub(super) fn carol() -> Identity {
    Identity::from_seed(&[0xca; 32])
}
pub(super) fn dave() -> Identity {
    Identity::from_seed(&[0xda; 32])
}
pub(super) fn mallory() -> Identity {
    Identity::from_seed(&[0x66; 32])
}

/// A fixed "now": 2023-11-14T22:13:20Z.
pub(super) fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

pub(super) const LIFETIME: Duration = Duration::from_secs(300);

/// Bob introduces Carol's capability to Alice under `nonce`, valid for [`LIFETIME`].
pub(super) fn intro_with(nonce: Nonce) -> Introduction {
    Introduction::new(
        &bob(),
        carol().vat_id(),
        vec![
            "127.0.0.1:4000".parse().unwrap(),
            "carol.example:4000".parse().unwrap(),
        ],
        alice().vat_id(),
        nonce,
        t0() + LIFETIME,
    )
    .unwrap()
}

/// `introducer` introduces Carol's capability to `recipient` (no addresses).
pub(super) fn introduce(
    introducer: &Identity,
    recipient: &Identity,
    nonce: u8,
    expires_at: SystemTime,
) -> Introduction {
    Introduction::new(
        introducer,
        carol().vat_id(),
        vec![],
        recipient.vat_id(),
        [nonce; NONCE_LEN],
        expires_at,
    )
    .unwrap()
}

pub(super) fn intro() -> Introduction {
    intro_with([7; NONCE_LEN])
}

fn err(r: Result<impl fmt::Debug>) -> IntroductionError {
    match r {
        Err(Error::Introduction(e)) => e,
        other => panic!("expected an introduction error, got {other:?}"),
    }
}

/// Re-encodes `intro` after `edit` changed its signed struct, keeping the
/// original signature and forwards.
fn resign_free_edit(intro: &Introduction, edit: impl FnOnce(introduction::Builder<'_>)) -> Vec<u8> {
    let mut message = Builder::new_default();
    {
        let mut contact = message.init_root::<third_party_to_contact::Builder>();
        intro.write_to(contact.reborrow()).unwrap();
        edit(contact.get_introduction().unwrap());
    }
    serialize::write_message_to_words(&message)
}

#[test]
fn round_trip_and_verify() {
    let i = intro();
    let bytes = i.encode();
    assert!(bytes.len() < 1024, "{}", bytes.len());
    let back = Introduction::decode(&bytes).unwrap();
    assert_eq!(back, i);
    assert_eq!(back.provider(), &carol().vat_id());
    assert_eq!(back.introducer(), &bob().vat_id());
    assert_eq!(back.recipient(), &alice().vat_id());
    assert_eq!(back.holder(), &alice().vat_id());
    assert_eq!(back.nonce(), &[7; NONCE_LEN]);
    assert_eq!(back.expires_at(), t0() + LIFETIME);
    assert_eq!(back.expires_at_unix(), 1_700_000_300);
    assert_eq!(back.provider_addresses().len(), 2);
    let v = back.verify(&alice().vat_id(), t0()).unwrap();
    assert_eq!(v.introduction(), &i);

    let completion = i.encode_completion();
    assert_ne!(completion, bytes);
    assert_eq!(Introduction::decode_completion(&completion).unwrap(), i);
    // The two roots are distinct types: neither decodes as the other.
    assert!(Introduction::decode(&completion).is_err());
    assert!(Introduction::decode_completion(&bytes).is_err());

    let wait = i.to_await();
    assert_eq!(wait.recipient(), &alice().vat_id());
    assert_eq!(wait.nonce(), i.nonce());
    assert_eq!(wait.expires_at(), i.expires_at());
    assert_eq!(ThirdPartyToAwait::decode(&wait.encode()).unwrap(), wait);
    assert_eq!(
        ThirdPartyToAwait::new(alice().vat_id(), [7; NONCE_LEN], t0() + LIFETIME).unwrap(),
        wait
    );
}

#[test]
fn the_signature_is_over_the_documented_bytes() {
    let i = intro();
    let signed = i.signed_message();
    assert!(signed.starts_with(b"capnp-noise/v1 introduction:"));
    // The canonical form is a single segment starting with the root pointer:
    // a struct pointer (low bits 00) with offset 0, 1 data word, 5 pointers.
    let canonical = &signed[INTRODUCTION_CONTEXT.len()..];
    assert_eq!(canonical.len() % 8, 0);
    assert_eq!(
        &canonical[..8],
        &[0, 0, 0, 0, 1, 0, 5, 0],
        "root pointer of the canonical Introduction"
    );
    // The expiry is the data word, right after the root pointer.
    assert_eq!(&canonical[8..16], &1_700_000_300u64.to_le_bytes());
    // It is capnp's own canonical form of the struct.
    let mut words = Word::allocate_zeroed_vec(canonical.len() / 8);
    Word::words_to_bytes_mut(&mut words).copy_from_slice(canonical);
    let mut m = Builder::new_default();
    m.set_root(
        capnp::message::Reader::new(
            SegmentArray::new(&[Word::words_to_bytes(&words)]),
            ReaderOptions::new(),
        )
        .get_root::<introduction::Reader>()
        .unwrap(),
    )
    .unwrap();
    let reader = m.into_reader();
    let canon_words = reader.canonicalize().unwrap();
    assert_eq!(Word::words_to_bytes(&canon_words), canonical);
    bob()
        .vat_id()
        .verify(&signed, i.signature())
        .expect("Ed25519 by the introducer over context || canonical");
}

#[test]
fn any_field_changed_breaks_the_signature() {
    let i = intro();
    type Edit = Box<dyn Fn(introduction::Builder<'_>)>;
    let edits: Vec<Edit> = vec![
        Box::new(|mut b| b.set_expires_at(1_700_000_301)),
        Box::new(|mut b| b.set_nonce(&[8; NONCE_LEN])),
        Box::new(|b| {
            b.init_recipient()
                .set_ed25519(mallory().vat_id().as_bytes())
        }),
        Box::new(|b| b.init_provider().set_ed25519(mallory().vat_id().as_bytes())),
        Box::new(|b| b.init_provider_addresses(1).set(0, "10.6.6.6:4000")),
    ];
    for edit in edits {
        let bytes = resign_free_edit(&i, edit);
        let forged = Introduction::decode(&bytes).unwrap();
        assert_ne!(forged, i);
        assert!(matches!(
            err(forged.verify(forged.holder(), t0())),
            IntroductionError::BadSignature(_)
        ));
    }
    // Claiming another introducer: the signature is not that vat's.
    let bytes = resign_free_edit(&i, |b| {
        b.init_introducer()
            .set_ed25519(mallory().vat_id().as_bytes())
    });
    let forged = Introduction::decode(&bytes).unwrap();
    assert_eq!(
        err(forged.verify(&alice().vat_id(), t0())),
        IntroductionError::BadSignature("the introducer's signature")
    );
}

#[test]
fn mallory_cannot_use_alices_introduction() {
    let i = intro();
    assert_eq!(
        err(i.verify(&mallory().vat_id(), t0())),
        IntroductionError::WrongRecipient
    );
    let text = err(i.verify(&mallory().vat_id(), t0())).to_string();
    assert!(
        !text.contains(&alice().vat_id().to_string()[..16]),
        "{text}"
    );
    // Nor the introducer, nor the provider.
    assert!(i.verify(&bob().vat_id(), t0()).is_err());
    assert!(i.verify(&carol().vat_id(), t0()).is_err());
}

#[test]
fn expiry_is_exclusive_and_rounded_down() {
    let i = intro();
    let end = t0() + LIFETIME;
    assert!(i
        .verify(&alice().vat_id(), end - Duration::from_millis(1))
        .is_ok());
    assert_eq!(
        err(i.verify(&alice().vat_id(), end)),
        IntroductionError::Expired
    );
    let late = introduce(&bob(), &alice(), 1, end + Duration::from_millis(999));
    assert_eq!(late.expires_at(), end);
    assert!(matches!(
        Introduction::new(
            &bob(),
            carol().vat_id(),
            vec![],
            alice().vat_id(),
            [1; NONCE_LEN],
            UNIX_EPOCH - Duration::from_secs(1)
        ),
        Err(Error::Misuse(_))
    ));
    assert!(ThirdPartyToAwait::new(
        alice().vat_id(),
        [1; NONCE_LEN],
        UNIX_EPOCH + Duration::from_secs(MAX_EXPIRES_AT + 1)
    )
    .is_err());
}

#[test]
fn forwarding_once() {
    let i = intro();
    let f = i.forward(&alice(), dave().vat_id()).unwrap();
    assert_eq!(f.holder(), &dave().vat_id());
    assert_eq!(f.recipient(), &alice().vat_id());
    assert_eq!(f.forwards().len(), 1);
    assert_eq!(f.forwards()[0].to(), &dave().vat_id());
    let back = Introduction::decode(&f.encode()).unwrap();
    assert_eq!(back, f);
    back.verify(&dave().vat_id(), t0()).unwrap();
    assert_eq!(
        err(back.verify(&alice().vat_id(), t0())),
        IntroductionError::WrongRecipient
    );
    // Only the holder may forward, and only once in version 1.
    assert!(matches!(
        i.forward(&mallory(), mallory().vat_id()),
        Err(Error::Misuse(_))
    ));
    assert!(matches!(
        err(f.forward(&dave(), mallory().vat_id())),
        IntroductionError::Limit(_)
    ));

    // A link signed by anyone but the holder, or moved to another
    // introduction, does not verify.
    let mut stolen = i.clone();
    stolen.forwards.push(Forward {
        to: mallory().vat_id(),
        signature: mallory().sign(&forward_message(
            &root_digest(&i.canonical, &i.signature),
            &mallory().vat_id(),
        )),
    });
    assert_eq!(
        err(stolen.verify(&mallory().vat_id(), t0())),
        IntroductionError::BadSignature("a forwarding link's signature")
    );
    let other = intro_with([9; NONCE_LEN]);
    let mut spliced = other.clone();
    spliced.forwards = f.forwards.clone();
    assert!(matches!(
        err(spliced.verify(&dave().vat_id(), t0())),
        IntroductionError::BadSignature(_)
    ));

    // Two links are refused when decoding.
    let mut message = Builder::new_default();
    {
        let mut contact = message.init_root::<third_party_to_contact::Builder>();
        i.write_to(contact.reborrow()).unwrap();
        let mut links = contact.init_forwards(2);
        for n in 0..2 {
            let mut l: forward::Builder<'_> = links.reborrow().get(n);
            l.reborrow()
                .init_to()
                .set_ed25519(dave().vat_id().as_bytes());
            l.set_signature(&[0; 64]);
        }
    }
    let two = serialize::write_message_to_words(&message);
    assert!(err(Introduction::decode(&two))
        .to_string()
        .contains("at most 1"));
}

#[test]
fn non_canonical_encodings_verify() {
    // The same content spread over many small segments.
    let i = intro();
    let mut message = Builder::new(
        HeapAllocator::new()
            .first_segment_words(1)
            .allocation_strategy(capnp::message::AllocationStrategy::FixedSize),
    );
    i.write_to(message.init_root()).unwrap();
    assert!(message.get_segments_for_output().len() > 3);
    let bytes = serialize::write_message_to_words(&message);
    assert_ne!(bytes, i.encode());
    let back = Introduction::decode(&bytes).unwrap();
    assert_eq!(back, i);
    back.verify(&alice().vat_id(), t0()).unwrap();
}

/// Builds an `Introduction` struct as a later version might: one more data
/// word and one more pointer than version 1 knows.
struct FutureIntroduction<'a>(StructBuilder<'a>);

impl<'a> capnp::traits::FromPointerBuilder<'a> for FutureIntroduction<'a> {
    fn init_pointer(builder: PointerBuilder<'a>, _length: u32) -> Self {
        FutureIntroduction(builder.init_struct(StructSize {
            data: 2,
            pointers: 6,
        }))
    }

    fn get_from_pointer(
        _builder: PointerBuilder<'a>,
        _default: Option<&'a [Word]>,
    ) -> capnp::Result<Self> {
        Err(capnp::Error::failed("not used".into()))
    }
}

/// The version-1 fields of the introduction the unknown-fields test uses.
fn fill_known_fields(mut b: introduction::Builder<'_>) {
    b.reborrow()
        .init_provider()
        .set_ed25519(carol().vat_id().as_bytes());
    b.reborrow()
        .init_introducer()
        .set_ed25519(bob().vat_id().as_bytes());
    b.reborrow()
        .init_recipient()
        .set_ed25519(alice().vat_id().as_bytes());
    b.set_nonce(&[3; NONCE_LEN]);
    b.set_expires_at(1_700_000_300);
}

#[test]
fn unknown_fields_are_signed_and_survive_reencoding() {
    let mut future = Builder::new_default();
    {
        let mut raw = future.init_root::<FutureIntroduction>().0;
        raw.set_data_field::<u64>(1, 0x00c0_ffee);
        raw.reborrow()
            .get_pointer_field(5)
            .set_data(b"a field of version 2");
        fill_known_fields(raw.into());
    }
    let reader = future.get_root_as_reader::<introduction::Reader>().unwrap();
    let canonical = canonical_bytes(reader).unwrap();
    let signature = bob().sign(&signing_message(&canonical));
    let mut message = Builder::new_default();
    {
        let mut contact = message.init_root::<third_party_to_contact::Builder>();
        contact.set_introduction(reader).unwrap();
        contact.set_signature(&signature);
    }
    let bytes = serialize::write_message_to_words(&message);

    let decoded = Introduction::decode(&bytes).unwrap();
    decoded.verify(&alice().vat_id(), t0()).unwrap();
    // The unknown fields are part of what was signed and are kept.
    assert_eq!(&decoded.canonical[..], &canonical[..]);
    let plain = introduce(&bob(), &alice(), 3, t0() + LIFETIME);
    assert_ne!(decoded.canonical, plain.canonical);
    // Re-encoded (as a holder forwarding it would), it still verifies.
    let again = Introduction::decode_completion(&decoded.encode_completion()).unwrap();
    assert_eq!(again, decoded);
    again.verify(&alice().vat_id(), t0()).unwrap();
    // Dropping the unknown fields (as a careless re-encoder would) breaks it.
    let mut flat = Builder::new_default();
    {
        let mut contact = flat.init_root::<third_party_to_contact::Builder>();
        contact.set_signature(decoded.signature());
        fill_known_fields(contact.init_introduction());
    }
    let flat = Introduction::decode(&serialize::write_message_to_words(&flat)).unwrap();
    assert!(matches!(
        err(flat.verify(&alice().vat_id(), t0())),
        IntroductionError::BadSignature(_)
    ));
}

#[test]
fn malformed_messages_name_the_problem() {
    let i = intro();
    let good = i.encode();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "not a Cap'n Proto message"),
        (good[..good.len() - 8].to_vec(), "not a Cap'n Proto message"),
        ([&good[..], &[0; 8]].concat(), "trailing"),
        (vec![0; MAX_ENCODED_LEN + 1], "limit"),
        (
            resign_free_edit(&i, |mut b| b.set_nonce(&[1; 31])),
            "nonce has 31 bytes",
        ),
        (
            resign_free_edit(&i, |b| b.init_recipient().set_ed25519(&[1; 32][..31])),
            "recipient",
        ),
        (
            resign_free_edit(&i, |b| b.init_provider_addresses(1).set(0, "no-port")),
            "needs a port",
        ),
        (
            resign_free_edit(&i, |b| {
                b.init_provider_addresses(MAX_ADDRESSES as u32 + 1);
            }),
            "the most is 16",
        ),
        (
            resign_free_edit(&i, |mut b| b.set_expires_at(u64::MAX)),
            "year 9999",
        ),
    ];
    for (bytes, want) in cases {
        let e = err(Introduction::decode(&bytes)).to_string();
        assert!(e.contains(want), "want {want:?}: {e}");
    }

    let mut message = Builder::new_default();
    {
        let mut contact = message.init_root::<third_party_to_contact::Builder>();
        i.write_to(contact.reborrow()).unwrap();
        contact.set_signature(&[0; 63]);
    }
    let e = err(Introduction::decode(&serialize::write_message_to_words(
        &message,
    )));
    assert!(e.to_string().contains("signature has 63 bytes"), "{e}");

    let mut message = Builder::new_default();
    message.init_root::<third_party_to_contact::Builder>();
    let e = err(Introduction::decode(&serialize::write_message_to_words(
        &message,
    )));
    assert!(e.to_string().contains("introduction is missing"), "{e}");

    let mut message = Builder::new_default();
    message.init_root::<third_party_completion::Builder>();
    let e = err(Introduction::decode_completion(
        &serialize::write_message_to_words(&message),
    ));
    assert!(e.to_string().contains("contact is missing"), "{e}");

    let mut message = Builder::new_default();
    message
        .init_root::<third_party_to_await::Builder>()
        .set_nonce(&[0; 32]);
    let e = err(ThirdPartyToAwait::decode(
        &serialize::write_message_to_words(&message),
    ));
    assert!(e.to_string().contains("recipient is missing"), "{e}");
}

#[test]
fn decode_accepts_unaligned_input() {
    let good = intro().encode();
    let mut shifted = vec![0u8];
    shifted.extend_from_slice(&good);
    assert_eq!(Introduction::decode(&shifted[1..]).unwrap(), intro());
}

#[test]
fn the_largest_introduction_fits_the_limit() {
    let host = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    let address: Address = format!("{host}:65535").parse().unwrap();
    let big = Introduction::new(
        &bob(),
        carol().vat_id(),
        vec![address; MAX_ADDRESSES],
        alice().vat_id(),
        [0xff; NONCE_LEN],
        UNIX_EPOCH + Duration::from_secs(MAX_EXPIRES_AT),
    )
    .unwrap()
    .forward(&alice(), dave().vat_id())
    .unwrap();
    let completion = big.encode_completion();
    assert!(completion.len() <= MAX_ENCODED_LEN, "{}", completion.len());
    let back = Introduction::decode_completion(&completion).unwrap();
    assert_eq!(back, big);
    back.verify(&dave().vat_id(), t0()).unwrap();
    assert!(Introduction::new(
        &bob(),
        carol().vat_id(),
        vec!["h:1".parse().unwrap(); MAX_ADDRESSES + 1],
        alice().vat_id(),
        [0; NONCE_LEN],
        t0()
    )
    .is_err());
}

#[test]
fn debug_is_short_and_nonces_are_random() {
    let dbg = format!("{:?}", intro());
    assert!(dbg.contains(&bob().vat_id().fingerprint()), "{dbg}");
    assert!(dbg.len() < 300, "{dbg}");
    assert_ne!(random_nonce(), random_nonce());
}

fn any_address() -> impl Strategy<Value = Address> {
    prop_oneof![
        ("[a-z][a-z0-9-]{0,10}(\\.[a-z0-9]{1,8}){0,2}", 1..=u16::MAX).prop_map(|(h, p)| format!(
            "{h}:{p}"
        )
        .parse()
        .unwrap()),
        (any::<[u8; 4]>(), 1..=u16::MAX)
            .prop_map(|(a, p)| { Address::new(crate::sturdy::Host::Ipv4(a.into()), p).unwrap() }),
        (any::<[u8; 16]>(), 1..=u16::MAX)
            .prop_map(|(a, p)| { Address::new(crate::sturdy::Host::Ipv6(a.into()), p).unwrap() }),
    ]
}

fn any_introduction() -> impl Strategy<Value = Introduction> {
    (
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        prop::collection::vec(any_address(), 0..=4),
        any::<[u8; 32]>(),
        0..=MAX_EXPIRES_AT,
        any::<bool>(),
    )
        .prop_map(|(b, c, a, addrs, nonce, exp, fwd)| {
            let alice = Identity::from_seed(&a);
            let i = Introduction::new(
                &Identity::from_seed(&b),
                Identity::from_seed(&c).vat_id(),
                addrs,
                alice.vat_id(),
                nonce,
                UNIX_EPOCH + Duration::from_secs(exp),
            )
            .unwrap();
            if fwd {
                i.forward(&alice, dave().vat_id()).unwrap()
            } else {
                i
            }
        })
}

proptest! {
    #[test]
    fn encodings_round_trip(i in any_introduction()) {
        let back = Introduction::decode(&i.encode()).unwrap();
        prop_assert_eq!(&back, &i);
        prop_assert_eq!(&Introduction::decode_completion(&i.encode_completion()).unwrap(), &i);
        prop_assert_eq!(ThirdPartyToAwait::decode(&i.to_await().encode()).unwrap(), i.to_await());
        let before = i.expires_at() - Duration::from_secs(1);
        prop_assume!(i.expires_at_unix() > 0);
        prop_assert!(back.verify(i.holder(), before).is_ok());
    }

    #[test]
    fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = Introduction::decode(&bytes);
        let _ = Introduction::decode_completion(&bytes);
        let _ = ThirdPartyToAwait::decode(&bytes);
    }

    /// Changing any byte of a valid encoding never yields a *different*
    /// introduction that verifies: it is malformed, or fails verification,
    /// or decodes to the very same introduction (a byte outside the content,
    /// such as padding).
    #[test]
    fn tampering_is_detected(pos in any::<prop::sample::Index>(), mask in 1..=255u8, fwd in any::<bool>()) {
        let i = if fwd { intro().forward(&alice(), dave().vat_id()).unwrap() } else { intro() };
        let mut bytes = i.encode();
        let pos = pos.index(bytes.len());
        bytes[pos] ^= mask;
        if let Ok(t) = Introduction::decode(&bytes) {
            if t.verify(i.holder(), t0()).is_ok() {
                prop_assert_eq!(t.provider(), i.provider());
                prop_assert_eq!(t.provider_addresses(), i.provider_addresses());
                prop_assert_eq!(t.introducer(), i.introducer());
                prop_assert_eq!(t.recipient(), i.recipient());
                prop_assert_eq!(t.nonce(), i.nonce());
                prop_assert_eq!(t.expires_at_unix(), i.expires_at_unix());
                prop_assert_eq!(t.forwards(), i.forwards());
            }
        }
    }

    /// Random bytes after a valid segment table never panic either.
    #[test]
    fn framed_garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..1024)) {
        let words = (body.len() / 8) as u32;
        let mut bytes = vec![0, 0, 0, 0];
        bytes.extend_from_slice(&words.to_le_bytes());
        bytes.extend_from_slice(&body[..words as usize * 8]);
        if let Ok(i) = Introduction::decode(&bytes) {
            let _ = i.verify(&alice().vat_id(), t0());
            let _ = i.encode();
        }
        let _ = Introduction::decode_completion(&bytes);
        let _ = ThirdPartyToAwait::decode(&bytes);
    }
}

/// Found by the `introduction` fuzz target: `providerAddresses` sent as an
/// empty list of structs with a pointer section reads as an empty
/// `List(Text)`, but its canonical form (what is signed and passed on) is a
/// list of data-only structs, which does not. Decoding used to accept it and
/// re-encoding then gave bytes that no vat could decode; the fields are now
/// read from the canonical copy, so it is refused at once.
#[test]
fn regression_canonical_empty_struct_list() {
    let mut message = Builder::new_default();
    {
        let mut raw = message.init_root::<FutureIntroduction>().0;
        raw.reborrow().get_pointer_field(1).init_struct_list(
            0,
            StructSize {
                data: 0,
                pointers: 1,
            },
        );
        fill_known_fields(raw.into());
    }
    let reader = message
        .get_root_as_reader::<introduction::Reader>()
        .unwrap();
    assert!(reader.get_provider_addresses().unwrap().is_empty());
    let mut contact = Builder::new_default();
    {
        let mut c = contact.init_root::<third_party_to_contact::Builder>();
        c.set_introduction(reader).unwrap();
        c.set_signature(&[0; 64]);
    }
    let bytes = serialize::write_message_to_words(&contact);
    assert!(err(Introduction::decode(&bytes))
        .to_string()
        .contains("providerAddresses"));
}
