//! Target for the decoders of introductions (`capnp_noise::intro`): the bytes a
//! recipient gets from an introducer, a provider gets from a recipient, and
//! a provider gets from an introducer.

use std::time::{Duration, UNIX_EPOCH};

use super::support::{initiator_identity, responder_identity, CHEAP_CRYPTO};
use super::Seed;
use capnp_noise::intro::{Introduction, ThirdPartyToAwait, MAX_ENCODED_LEN};
use capnp_noise::{Error, Identity, IntroductionError};

/// `introduction`: the same bytes through [`Introduction::decode`],
/// [`Introduction::decode_completion`] and [`ThirdPartyToAwait::decode`].
///
/// Checks that whatever decodes re-encodes to a value that decodes equal
/// (including the canonical bytes the signature covers, unknown fields and
/// all), that [`Introduction::verify`] accepts nothing the fuzzer could
/// have forged (see [`verdict_oracle`]), that a decoder refuses more than
/// [`MAX_ENCODED_LEN`] bytes, and that errors stay short.
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
                verdict_oracle(&intro);
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

/// The oracle for [`Introduction::verify`] on a decoded introduction,
/// presented by its holder halfway to its expiry. The fuzzer cannot sign:
/// the only introducer whose signature it can hold is the seeds' (`bob`,
/// the initiator's test identity), so a success for anyone else is a
/// forgery accepted. A success must also depend on who presents it (a
/// stranger is the wrong recipient) and when (at the expiry it is expired).
fn verdict_oracle(intro: &Introduction) {
    let holder = *intro.holder();
    let at = UNIX_EPOCH + Duration::from_secs(intro.expires_at_unix() / 2);
    if intro.verify(&holder, at).is_err() {
        return;
    }
    // With cheap crypto the fuzzer can sign for any vat.
    assert!(
        CHEAP_CRYPTO || *intro.introducer() == initiator_identity().vat_id(),
        "verified an introduction that no known key signed"
    );
    let stranger = Identity::from_seed(&[0xee; 32]).vat_id();
    assert_ne!(stranger, holder, "the seeds never hand to 0xee..");
    assert!(
        matches!(
            intro.verify(&stranger, at),
            Err(Error::Introduction(IntroductionError::WrongRecipient))
        ),
        "verified for a vat that does not hold it"
    );
    assert!(
        matches!(
            intro.verify(&holder, intro.expires_at()),
            Err(Error::Introduction(IntroductionError::Expired))
        ),
        "verified at its expiry"
    );
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
