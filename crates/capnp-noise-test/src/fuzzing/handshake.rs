//! Targets for the two handshake roles fed arbitrary peer bytes: the
//! deterministic responder from the first byte on, and the deterministic
//! initiator after its first message. A finished handshake goes on into its
//! session, which reads whatever follows.

use std::sync::Arc;

use super::support::{at_least, new_initiator, new_responder, suite, End, Plan, CHEAP_CRYPTO};
use super::support::{end_of_stream, feed_and_read, initiator_identity, responder_identity};
use super::Seed;
use crate::fixtures;
use capnp_noise::policy::AnyVat;
use capnp_noise::policy::PeerContext;
use capnp_noise::wire::{preamble, Handshake, HandshakeConfig, Session, SessionConfig, Suite};
use capnp_noise::wire::{EarlyData, EarlyDataOutcome, KnownResponder, Pattern, ResumptionConfig};
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
    // An IK initiator whose early data was not taken sends it again.
    let resends = matches!(
        hs.early_data_outcome(),
        EarlyDataOutcome::Refused | EarlyDataOutcome::FellBack
    ) && hs.role() == capnp_noise::wire::Role::Initiator;
    let mut session: Session = hs.into_session().expect("a finished handshake");
    assert_eq!(session.peer_vat_id(), peer);
    assert_eq!(!session.pending_output().is_empty(), resends);
    let mut out = vec![0; at_least(plan.out_len, stream.len() - fed)];
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

/// Runs `stream` once as the input's `plan` says (its chunking and, for a
/// responder, admission), and checks a finished handshake authenticated
/// `only_peer`, the one vat whose keys exist. Unless that run already was
/// the reference one, runs it again the reference way ([`Plan::whole`]: in
/// one piece, no admission); the results must be equal. `make(admission)`
/// makes the handshake, requiring admission if asked.
///
/// So every input is checked against chunking, and against admission when
/// its plan asks for it, in at most two runs. (The target used to run every
/// input four times: chunked, whole, and chunked again with and without
/// admission. Which of those an input exercises is now the input's choice,
/// so coverage guidance reaches every combination, at half the cost.)
fn compare_with_reference(
    make: &dyn Fn(bool) -> Handshake,
    stream: &[u8],
    plan: Plan,
    check: &dyn Fn(&Handshake, &[u8]),
    only_peer: VatId,
) {
    let got = run(make(plan.admission), stream, plan, check);
    if let Outcome::Finished(peer) = &got.outcome {
        // With cheap crypto the fuzzer can sign for any vat.
        assert!(
            CHEAP_CRYPTO || *peer == only_peer,
            "authenticated a vat whose keys nobody has"
        );
    }
    let reference = plan.whole();
    if plan != reference {
        let want = run(make(false), stream, reference, check);
        if plan.admission {
            assert_eq!(got, want, "chunking or admission changed the result");
        } else {
            assert_eq!(got, want, "chunking changed the result");
        }
    }
}

/// A responder target's checks: [`compare_with_reference`] with a
/// responder that [requires admission](Handshake::require_admission) when
/// the plan says so.
fn responder_checks(
    make: &dyn Fn() -> Handshake,
    stream: &[u8],
    plan: Plan,
    check: &dyn Fn(&Handshake, &[u8]),
) {
    let make = |admission| {
        let mut hs = make();
        if admission {
            hs.require_admission();
        }
        hs
    };
    compare_with_reference(&make, stream, plan, check, initiator_identity().vat_id());
}

/// An initiator target's checks: [`compare_with_reference`] (admission is
/// the responder's; an initiator input's admission bit is ignored).
fn initiator_checks(
    make: &dyn Fn() -> Handshake,
    stream: &[u8],
    plan: Plan,
    check: &dyn Fn(&Handshake, &[u8]),
) {
    let plan = Plan {
        admission: false,
        ..plan
    };
    compare_with_reference(
        &|_| make(),
        stream,
        plan,
        check,
        responder_identity().vat_id(),
    );
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
        key_log: None,
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
/// responder that [requires admission](Handshake::require_admission) (the
/// plan's admission bit; see [`compare_with_reference`]).
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
        // An IK preamble gets the XX fallback (IK is off by default): XX
        // message 2 after a kind byte.
        let want = msg2_len + usize::from(hs.pattern() == Pattern::IK);
        assert!(
            out.is_empty() || out.len() == want,
            "responder sent {} bytes",
            out.len()
        );
        assert!(!hs.is_finished() || out.len() == want);
    };
    responder_checks(&make, stream, plan, &check);
}

/// `responder_ik`: the deterministic responder with `IK` accepted (SPEC.md
/// 14) fed arbitrary bytes from the first one on.
///
/// Input: a [`Plan`] header (flag: accept early data), then the bytes "from
/// the initiator". Checks that the responder sends nothing, or exactly one
/// answer of the right size (XX message 2 to an XX preamble; to an IK
/// preamble, IK message 2 or the fallback's message 2 after their kind
/// byte), that it only ever authenticates the one initiator whose keys
/// exist, and that the result (output, error, plaintext with early data,
/// end) is the same whatever the chunking and with admission (the plan's
/// admission bit; see [`compare_with_reference`]).
pub fn responder_ik(data: &[u8]) {
    let Some((plan, stream)) = Plan::parse(data) else {
        return;
    };
    let make = || {
        let mut hs = new_responder(responder_config(false));
        hs.set_resumption(
            ResumptionConfig::default()
                .with_accept_ik(true)
                .with_accept_early_data(plan.flag),
        );
        hs
    };
    let payload = responder_identity().handshake_payload_for_tests().len();
    let xx_msg2 = LENGTH_PREFIX_LEN + DH_LEN + (DH_LEN + TAG_LEN) + payload + TAG_LEN;
    let ik_msg2 = LENGTH_PREFIX_LEN + 1 + DH_LEN + 1 + payload + TAG_LEN;
    let check = |hs: &Handshake, out: &[u8]| {
        let ok = match (hs.pattern(), hs.fell_back()) {
            (Pattern::XX, _) => out.is_empty() || out.len() == xx_msg2,
            (_, true) => out.len() == xx_msg2 + 1 && out[2] == 0x01,
            (_, false) => out.is_empty() || (out.len() == ik_msg2 && out[2] == 0x00),
        };
        assert!(ok, "responder sent {} bytes", out.len());
        assert!(!hs.is_finished() || !out.is_empty());
    };
    responder_checks(&make, stream, plan, &check);
}

/// `initiator_ik`: the deterministic `IK` initiator (SPEC.md 14) fed
/// arbitrary responder bytes.
///
/// Input: a [`Plan`] header (flag: send early data), then the bytes "from
/// the responder". Checks that after its first flight the initiator sends
/// nothing but, after a fallback that authenticated the one responder whose
/// keys exist, XX message 3 (which reveals its identity); that it
/// authenticates no one else; and that the result is the same whatever the
/// chunking.
pub fn initiator_ik(data: &[u8]) {
    let Some((plan, stream)) = Plan::parse(data) else {
        return;
    };
    let known = known_responder_once();
    let make = || new_ik_initiator(known, if plan.flag { b"first call" } else { b"" });
    let first_len = make().pending_output().len();
    let msg3_len = LENGTH_PREFIX_LEN
        + (DH_LEN + TAG_LEN)
        + initiator_identity().handshake_payload_for_tests().len()
        + TAG_LEN;
    let check = |hs: &Handshake, out: &[u8]| {
        let want = if hs.is_finished() && hs.fell_back() {
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
    initiator_checks(&make, stream, plan, &check);
}

fn known_responder_once() -> &'static KnownResponder {
    static KNOWN: std::sync::OnceLock<KnownResponder> = std::sync::OnceLock::new();
    KNOWN.get_or_init(known_responder)
}

fn new_ik_initiator(known: &KnownResponder, early: &[u8]) -> Handshake {
    Handshake::initiator_resuming_with_fixed_ephemeral(
        initiator_identity(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s),
        known,
        (!early.is_empty()).then(|| EarlyData::replayable_not_forward_secret(early)),
        fixtures::INITIATOR_EPHEMERAL,
    )
    .expect("IK initiator")
}

fn known_responder() -> KnownResponder {
    fixtures::known_responder(Suite::ChaChaPolyBlake2s)
}

/// Both directions of a deterministic `IK` connection to a responder that
/// accepts `IK` and `early_data`: (to the responder: the handshake, then
/// "after" and a CLOSE; to the initiator: its answer, then "reply" and a
/// CLOSE).
fn ik_transcript(known: &KnownResponder, early: &[u8], early_data: bool) -> (Vec<u8>, Vec<u8>) {
    let mut i = new_ik_initiator(known, early);
    let mut r = new_responder(responder_config(false));
    r.set_resumption(
        ResumptionConfig::default()
            .with_accept_ik(true)
            .with_accept_early_data(early_data),
    );
    let mut to_responder = Vec::new();
    let mut to_initiator = Vec::new();
    for _ in 0..4 {
        let out = i.pending_output().to_vec();
        i.consume_output(out.len());
        r.feed(&out).expect("responder");
        to_responder.extend(out);
        let back = r.pending_output().to_vec();
        r.consume_output(back.len());
        if !back.is_empty() {
            i.feed(&back).expect("initiator");
        }
        to_initiator.extend(back);
    }
    let mut s = i.into_session().expect("finished");
    s.write(b"after").expect("write");
    s.close().expect("close");
    to_responder.extend_from_slice(s.pending_output());
    let mut s = r.into_session().expect("finished");
    s.write(b"reply").expect("write");
    s.close().expect("close");
    to_initiator.extend_from_slice(s.pending_output());
    (to_responder, to_initiator)
}

fn ik_to_responder(known: &KnownResponder, early: &[u8]) -> Vec<u8> {
    ik_transcript(known, early, true).0
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
    initiator_checks(&make, stream, plan, &check);
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
            format!("admission-jitter-{name}"),
            with(
                Plan::with_admission(Plan::header(3, 5, true, false, 1)),
                &t.to_responder,
            ),
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
    let known = known_responder();
    let stale = known.clone().with_static_key_for_tests([0x55; 32]);
    let with = |h: [u8; 2], bytes: &[u8]| [&h[..], bytes].concat();
    for (name, known, early, header) in [
        ("ik", &known, &b""[..], Plan::header(0, 0, true, false, 2)),
        (
            "ik-early",
            &known,
            b"first call",
            Plan::header(0, 0, true, true, 2),
        ),
        (
            "ik-early-refused-bytewise",
            &known,
            b"first call",
            Plan::header(1, 0, true, false, 0),
        ),
        (
            "ik-early-admission",
            &known,
            b"first call",
            Plan::with_admission(Plan::header(0, 0, true, true, 2)),
        ),
        (
            "fallback-early",
            &stale,
            b"first call",
            Plan::header(3, 5, true, true, 1),
        ),
    ] {
        v.push(Seed::new(
            "responder_ik",
            name,
            with(header, &ik_to_responder(known, early)),
        ));
    }
    // An XX connection to a responder that accepts IK is XX as before.
    v.push(Seed::new(
        "responder_ik",
        "xx",
        with(
            Plan::header(0, 0, true, false, 2),
            &transcript(Suite::ChaChaPolyBlake2s).to_responder,
        ),
    ));
    for (name, known, early, accept, header) in [
        (
            "ik",
            &known,
            &b""[..],
            true,
            Plan::header(0, 0, true, false, 2),
        ),
        (
            "ik-early",
            &known,
            b"first call",
            true,
            Plan::header(0, 0, true, true, 2),
        ),
        (
            "ik-early-refused",
            &known,
            b"first call",
            false,
            Plan::header(4, 3, true, true, 1),
        ),
        (
            "fallback-bytewise",
            &stale,
            b"",
            true,
            Plan::header(1, 0, true, false, 0),
        ),
        (
            "fallback-early",
            &stale,
            b"first call",
            true,
            Plan::header(0, 0, true, true, 2),
        ),
    ] {
        v.push(Seed::new(
            "initiator_ik",
            name,
            with(header, &ik_transcript(known, early, accept).1),
        ));
    }
    // The old target meets IK: the fallback.
    v.push(Seed::new(
        "responder",
        "ik-fallback",
        with(
            Plan::header(0, 0, true, false, 2),
            &ik_to_responder(&stale, b"call"),
        ),
    ));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The IK seeds get through the handshake (IK, or the fallback) into the
    /// session, early data first: the target starts deep.
    #[test]
    fn ik_transcripts_reach_the_session_with_their_early_data() {
        let known = known_responder();
        let stale = known.clone().with_static_key_for_tests([0x55; 32]);
        for (known, fell_back) in [(&known, false), (&stale, true)] {
            let stream = ik_to_responder(known, b"first call");
            let (plan, _) = Plan::parse(&Plan::header(1, 7, true, true, 0)).unwrap();
            let mut r = new_responder(responder_config(false));
            r.set_resumption(
                ResumptionConfig::default()
                    .with_accept_ik(true)
                    .with_accept_early_data(true),
            );
            let got = run(r, &stream, plan, &|_, _| {});
            assert_eq!(
                got.outcome,
                Outcome::Finished(initiator_identity().vat_id()),
                "fell back: {fell_back}"
            );
            assert_eq!(got.plaintext, b"first callafter");
            assert_eq!(got.output[2], u8::from(fell_back));
            // And the initiator's side of the same connection.
            let (_, to_initiator) = ik_transcript(known, b"first call", false);
            let i = new_ik_initiator(known, b"first call");
            let got = run(i, &to_initiator, plan, &|_, _| {});
            assert_eq!(
                got.outcome,
                Outcome::Finished(responder_identity().vat_id())
            );
            assert_eq!(got.plaintext, b"reply");
        }
    }

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
