//! Targets for the two handshake roles fed arbitrary peer bytes: the
//! deterministic responder from the first byte on, and the deterministic
//! initiator after its first message. A finished handshake goes on into its
//! session, which reads whatever follows.

use std::sync::Arc;

use super::support::{end_of_stream, feed_and_read, initiator_identity, responder_identity};
use super::support::{new_initiator, new_responder, suite, End, Plan, CHEAP_CRYPTO};
use super::Seed;
use crate::fixtures;
use capnp_noise::policy::AnyVat;
use capnp_noise::wire::{preamble, Handshake, HandshakeConfig, Session, SessionConfig, Suite};
use capnp_noise::wire::{DH_LEN, LENGTH_PREFIX_LEN, TAG_LEN};
use capnp_noise::VatId;

/// How a handshake ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// It wants more bytes.
    Pending,
    /// It failed with this error text.
    Failed(String),
    /// It authenticated this peer.
    Finished(VatId),
}

/// Everything observable about one run, compared between chunkings.
#[derive(Debug, PartialEq)]
struct Run {
    output: Vec<u8>,
    outcome: Outcome,
    plaintext: Vec<u8>,
    end: Option<End>,
}

/// Feeds `stream` to `hs` as `plan` says, calling `check` with the handshake
/// and all its output so far after every step; then runs the session.
fn run(mut hs: Handshake, stream: &[u8], plan: Plan, check: &dyn Fn(&Handshake, &[u8])) -> Run {
    let mut output = Vec::new();
    let take_output = |hs: &mut Handshake, output: &mut Vec<u8>| {
        let n = hs.pending_output().len();
        output.extend_from_slice(hs.pending_output());
        hs.consume_output(n);
    };
    take_output(&mut hs, &mut output);
    check(&hs, &output);
    let mut fed = 0;
    for piece in plan.pieces(stream) {
        let mut result = hs.feed(piece);
        if let Ok(taken) = result {
            if hs.awaits_admission() {
                // A responder that requires admission stops after message 1
                // and has sent nothing; admitted, it takes the rest.
                assert!(hs.pending_output().is_empty() && output.is_empty());
                result = hs
                    .admit()
                    .and_then(|()| hs.feed(&piece[taken..]))
                    .map(|n| taken + n);
            }
        }
        take_output(&mut hs, &mut output);
        check(&hs, &output);
        match result {
            Ok(taken) => {
                assert!(taken <= piece.len());
                fed += taken;
                if hs.is_finished() {
                    break;
                }
                assert_eq!(
                    taken,
                    piece.len(),
                    "an unfinished handshake takes all it is given"
                );
            }
            Err(e) => {
                let again = hs.feed(b"\0").expect_err("handshake errors are sticky");
                assert_eq!(again.to_string(), e.to_string());
                assert!(!hs.is_finished() && !hs.wants_read() && hs.peer_vat_id().is_none());
                assert!(hs.pending_output().is_empty());
                assert!(hs.into_session().is_err());
                return Run {
                    output,
                    outcome: Outcome::Failed(e.to_string()),
                    plaintext: Vec::new(),
                    end: None,
                };
            }
        }
    }
    if !hs.is_finished() {
        assert!(hs.wants_read() && hs.peer_vat_id().is_none());
        assert!(hs.into_session().is_err());
        return Run {
            output,
            outcome: Outcome::Pending,
            plaintext: Vec::new(),
            end: None,
        };
    }
    let peer = hs
        .peer_vat_id()
        .expect("a finished handshake knows its peer");
    let mut session: Session = hs.into_session().expect("a finished handshake");
    assert_eq!(session.peer_vat_id(), peer);
    assert!(session.pending_output().is_empty());
    let mut out = vec![0; plan.out_len];
    let mut plaintext = Vec::new();
    let mut end = feed_and_read(
        &mut session,
        plan.pieces(&stream[fed..]),
        &mut out,
        &mut plaintext,
    );
    if plan.eof && !matches!(end, End::Failed(_)) {
        end = end_of_stream(&mut session, &mut out, &mut plaintext);
    }
    Run {
        output,
        outcome: Outcome::Finished(peer),
        plaintext,
        end: Some(end),
    }
}

/// Runs `stream` chunked as `plan` says and in one piece: the results must
/// be equal, and a finished handshake must have authenticated `only_peer`,
/// the one vat whose keys exist.
fn compare_chunkings(
    make: impl Fn() -> Handshake,
    stream: &[u8],
    plan: Plan,
    check: &dyn Fn(&Handshake, &[u8]),
    only_peer: VatId,
) {
    let chunked = run(make(), stream, plan, check);
    if let Outcome::Finished(peer) = chunked.outcome {
        // With cheap crypto the fuzzer can sign for any vat.
        assert!(
            CHEAP_CRYPTO || peer == only_peer,
            "authenticated a vat whose keys nobody has"
        );
    }
    let whole = run(make(), stream, plan.whole(), check);
    assert_eq!(chunked, whole, "chunking changed the result");
}

fn responder_config(chachapoly_only: bool) -> HandshakeConfig {
    HandshakeConfig {
        suites: if chachapoly_only {
            vec![Suite::ChaChaPolyBlake2s]
        } else {
            Suite::ALL.to_vec()
        },
        session: SessionConfig::default(),
        allow_self: false,
    }
}

/// `responder`: the deterministic responder fed arbitrary bytes from the
/// first one on.
///
/// Input: a [`Plan`] header (flag: accept only ChaChaPoly), then the bytes
/// "from the initiator". Checks that the responder sends nothing but one
/// well-sized message 2, that it can only ever authenticate the one
/// initiator whose keys exist, and that the result (output, error,
/// plaintext, end) is the same whatever the chunking, and the same for a
/// responder that [requires admission](Handshake::require_admission).
pub fn responder(data: &[u8]) {
    let Some((plan, stream)) = Plan::parse(data) else {
        return;
    };
    let make = || new_responder(responder_config(plan.flag));
    let msg2_len = LENGTH_PREFIX_LEN
        + DH_LEN
        + (DH_LEN + TAG_LEN)
        + responder_identity().handshake_payload_for_tests().len()
        + TAG_LEN;
    let check = |hs: &Handshake, out: &[u8]| {
        assert!(
            out.is_empty() || out.len() == msg2_len,
            "responder sent {} bytes",
            out.len()
        );
        assert!(!hs.is_finished() || out.len() == msg2_len);
    };
    compare_chunkings(make, stream, plan, &check, initiator_identity().vat_id());
    let admitted = || {
        let mut hs = make();
        hs.require_admission();
        hs
    };
    assert_eq!(
        run(admitted(), stream, plan, &check),
        run(make(), stream, plan, &check),
        "admission changed the result"
    );
}

/// `initiator`: the deterministic initiator fed arbitrary responder bytes.
///
/// Input: a [`Plan`] header (flag: propose AES-GCM), then the bytes "from
/// the responder". Checks that message 3 (which reveals the initiator's
/// identity) is sent only once the one responder whose keys exist has been
/// authenticated, and that the result is the same whatever the chunking.
pub fn initiator(data: &[u8]) {
    let Some((plan, stream)) = Plan::parse(data) else {
        return;
    };
    let suite = suite(plan.flag);
    let make = || new_initiator(HandshakeConfig::with_suite(suite));
    let first_len = preamble::encode(suite).len() + LENGTH_PREFIX_LEN + DH_LEN;
    let msg3_len = LENGTH_PREFIX_LEN
        + (DH_LEN + TAG_LEN)
        + initiator_identity().handshake_payload_for_tests().len()
        + TAG_LEN;
    let check = |hs: &Handshake, out: &[u8]| {
        let want = if hs.is_finished() {
            first_len + msg3_len
        } else {
            first_len
        };
        assert_eq!(
            out.len(),
            want,
            "message 3 without an authenticated responder"
        );
    };
    compare_chunkings(make, stream, plan, &check, responder_identity().vat_id());
}

/// The two byte streams of a real deterministic connection: the handshake,
/// then data, a rekey and a close from each side.
pub(super) struct Transcript {
    /// Initiator to responder: preamble, message 1, message 3, frames.
    pub(super) to_responder: Vec<u8>,
    /// Responder to initiator: message 2, frames.
    pub(super) to_initiator: Vec<u8>,
    /// How many bytes of `to_responder` are the handshake.
    pub(super) handshake_to_responder: usize,
}

pub(super) fn transcript(suite: Suite) -> Transcript {
    let (mut i, mut r) = fixtures::deterministic_handshakes(
        suite,
        responder_config(false),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .expect("deterministic handshakes");
    fn take(hs: &mut Handshake) -> Vec<u8> {
        let v = hs.pending_output().to_vec();
        hs.consume_output(v.len());
        v
    }
    let mut to_responder = take(&mut i);
    r.feed(&to_responder).expect("message 1");
    let mut to_initiator = take(&mut r);
    i.feed(&to_initiator).expect("message 2");
    let msg3 = take(&mut i);
    r.feed(&msg3).expect("message 3");
    to_responder.extend(msg3);
    let handshake_to_responder = to_responder.len();
    let mut i = i.into_session().expect("initiator session");
    let mut r = r.into_session().expect("responder session");
    i.write(b"hello from the initiator").expect("write");
    i.rekey().expect("rekey");
    i.write(b"after a rekey").expect("write");
    i.close().expect("close");
    to_responder.extend_from_slice(i.pending_output());
    r.write(b"hello from the responder").expect("write");
    r.close().expect("close");
    to_initiator.extend_from_slice(r.pending_output());
    Transcript {
        to_responder,
        to_initiator,
        handshake_to_responder,
    }
}

pub(super) fn seeds() -> Vec<Seed> {
    let mut v = Vec::new();
    for (suite, name) in Suite::ALL.iter().zip(["chachapoly", "aesgcm"]) {
        let t = transcript(*suite);
        let aes = *suite == Suite::AesGcmSha256;
        let with = |h: [u8; 2], bytes: &[u8]| [&h[..], bytes].concat();
        v.push(Seed::new(
            "responder",
            format!("full-{name}"),
            with(Plan::header(0, 0, true, false, 2), &t.to_responder),
        ));
        v.push(Seed::new(
            "responder",
            format!("bytewise-{name}"),
            with(Plan::header(1, 0, true, false, 0), &t.to_responder),
        ));
        v.push(Seed::new(
            "responder",
            format!("handshake-only-jitter-{name}"),
            with(
                Plan::header(5, 9, false, false, 3),
                &t.to_responder[..t.handshake_to_responder],
            ),
        ));
        v.push(Seed::new(
            "initiator",
            format!("full-{name}"),
            with(Plan::header(0, 0, true, aes, 2), &t.to_initiator),
        ));
        v.push(Seed::new(
            "initiator",
            format!("jitter-small-reads-{name}"),
            with(Plan::header(4, 3, true, aes, 1), &t.to_initiator),
        ));
    }
    let t = transcript(Suite::AesGcmSha256);
    v.push(Seed::new(
        "responder",
        "aesgcm-not-accepted",
        [&Plan::header(0, 0, false, true, 2)[..], &t.to_responder].concat(),
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full-transcript seeds get through the handshake into the
    /// session, whatever the chunking: the targets start deep.
    #[test]
    fn transcripts_reach_the_session() {
        for suite in Suite::ALL {
            let t = transcript(suite);
            for header in [
                Plan::header(0, 0, true, false, 2),
                Plan::header(1, 7, true, false, 0),
            ] {
                let (plan, _) = Plan::parse(&header).unwrap();
                let r = run(
                    new_responder(responder_config(false)),
                    &t.to_responder,
                    plan,
                    &|_, _| {},
                );
                assert_eq!(r.outcome, Outcome::Finished(initiator_identity().vat_id()));
                assert_eq!(r.plaintext, b"hello from the initiatorafter a rekey");
                assert_eq!(r.end, Some(End::Closed));
                let i = run(
                    new_initiator(HandshakeConfig::with_suite(suite)),
                    &t.to_initiator,
                    plan,
                    &|_, _| {},
                );
                assert_eq!(i.outcome, Outcome::Finished(responder_identity().vat_id()));
                assert_eq!(i.plaintext, b"hello from the responder");
                assert_eq!(i.end, Some(End::Closed));
            }
        }
    }
}
