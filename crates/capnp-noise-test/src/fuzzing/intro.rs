//! Target for the decoders of introductions (`capnp_noise::intro`): the bytes a
//! recipient gets from an introducer, a provider gets from a recipient, and
//! a provider gets from an introducer.

use std::time::{Duration, UNIX_EPOCH};

use super::support::{initiator_identity, responder_identity};
use super::Seed;
use capnp_noise::intro::{Introduction, ThirdPartyToAwait, MAX_ENCODED_LEN};
use capnp_noise::Identity;

/// `introduction`: the same bytes through [`Introduction::decode`],
/// [`Introduction::decode_completion`] and [`ThirdPartyToAwait::decode`].
///
/// Checks that whatever decodes re-encodes to a value that decodes equal
/// (including the canonical bytes the signature covers, unknown fields and
/// all), that the verdict of [`Introduction::verify`] survives that round
/// trip, that a decoder refuses more than [`MAX_ENCODED_LEN`] bytes, and
/// that errors stay short.
pub fn introduction(data: &[u8]) {
    let decoded = [
        Introduction::decode(data),
        Introduction::decode_completion(data),
    ];
    for result in decoded {
        match result {
            Ok(intro) => {
                assert!(data.len() <= MAX_ENCODED_LEN);
                let again = Introduction::decode(&intro.encode()).expect("re-encoded contact");
                assert_eq!(again, intro);
                let again = Introduction::decode_completion(&intro.encode_completion())
                    .expect("re-encoded completion");
                assert_eq!(again, intro);
                let holder = *intro.holder();
                let at = UNIX_EPOCH + Duration::from_secs(intro.expires_at_unix() / 2);
                assert_eq!(
                    intro.verify(&holder, at).is_ok(),
                    again.verify(&holder, at).is_ok()
                );
                let request = intro.to_await();
                assert_eq!(
                    ThirdPartyToAwait::decode(&request.encode()).ok(),
                    Some(request)
                );
            }
            Err(e) => assert!(e.to_string().len() < 512, "{e}"),
        }
    }
    match ThirdPartyToAwait::decode(data) {
        Ok(request) => {
            assert!(data.len() <= MAX_ENCODED_LEN);
            assert_eq!(
                ThirdPartyToAwait::decode(&request.encode()).ok(),
                Some(request)
            );
        }
        Err(e) => assert!(e.to_string().len() < 512, "{e}"),
    }
}

pub(super) fn seeds() -> Vec<Seed> {
    let (bob, alice) = (initiator_identity(), responder_identity());
    let carol = Identity::from_seed(&[0xca; 32]);
    let intro = Introduction::new(
        bob,
        carol.vat_id(),
        vec![
            "127.0.0.1:4000".parse().expect("address"),
            "[::1]:4000".parse().expect("address"),
        ],
        alice.vat_id(),
        [0x5a; 32],
        UNIX_EPOCH + Duration::from_secs(4_000_000_000),
    )
    .expect("introduction");
    let forwarded = intro
        .forward(alice, carol.vat_id())
        .expect("forwarding link");
    vec![
        Seed::new("introduction", "contact", intro.encode()),
        Seed::new("introduction", "contact-forwarded", forwarded.encode()),
        Seed::new("introduction", "completion", intro.encode_completion()),
        Seed::new("introduction", "await", intro.to_await().encode()),
    ]
}
