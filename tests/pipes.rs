//! Noise Pipes (SPEC.md 14): `IK` resumption with an `XX` fallback, on the
//! deterministic in-memory pair. Also counts the flights from connect to the
//! first answer for each kind of handshake.

use std::sync::Arc;

use capnp_noise::policy::{AnyVat, PeerContext, PeerPolicy, Pinned};
use capnp_noise::wire::resumption::{ResumptionCache, REPLY_FALLBACK, REPLY_IK};
use capnp_noise::wire::{
    EarlyData, EarlyDataOutcome, Handshake, HandshakeConfig, KnownResponder, Pattern, ReadOutcome,
    ResumptionConfig, Session, Suite, EOF_BEFORE_MESSAGE_2,
};
use capnp_noise::{Error, Identity, ProtocolError};
use capnp_noise_test::fixtures::{drive, initiator_identity, responder_identity};

fn cfg() -> HandshakeConfig {
    HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s)
}

fn initiator_xx(policy: Arc<dyn PeerPolicy>) -> Handshake {
    Handshake::initiator(
        &initiator_identity(),
        policy,
        PeerContext::initiator(None, None),
        cfg(),
    )
    .unwrap()
}

fn initiator_ik(known: &KnownResponder, early: Option<&[u8]>) -> Handshake {
    Handshake::initiator_resuming(
        &initiator_identity(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        cfg(),
        known,
        early.map(EarlyData::replayable_not_forward_secret),
    )
    .unwrap()
}

fn responder(id: &Identity, resumption: ResumptionConfig) -> Handshake {
    responder_with(id, resumption, Arc::new(AnyVat))
}

fn responder_with(
    id: &Identity,
    resumption: ResumptionConfig,
    policy: Arc<dyn PeerPolicy>,
) -> Handshake {
    let mut r = Handshake::responder(id, policy, PeerContext::responder(None), cfg()).unwrap();
    r.set_resumption(resumption);
    r
}

/// `IK` accepted, early data refused.
fn ik_ok() -> ResumptionConfig {
    ResumptionConfig::default().with_accept_ik(true)
}

fn early_ok() -> ResumptionConfig {
    ik_ok().with_accept_early_data(true)
}

/// A full XX handshake with `server`, and what the initiator learned.
fn learn(server: &Identity) -> KnownResponder {
    let mut i = initiator_xx(Arc::new(AnyVat));
    let mut r = responder(server, ik_ok());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    let known = i
        .learned_responder()
        .expect("a finished XX initiator learned");
    assert_eq!(known.vat_id(), server.vat_id());
    assert_eq!(known.suite(), Suite::ChaChaPolyBlake2s);
    // The responder learns nothing (it is not an initiator).
    assert!(r.learned_responder().is_none());
    known
}

/// Everything `s` has to read now.
fn read_all(s: &mut Session) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => got.extend_from_slice(&buf[..n]),
            _ => return got,
        }
    }
}

fn send(from: &mut Session, to: &mut Session) {
    let out = from.pending_output().to_vec();
    from.consume_output(out.len());
    assert_eq!(to.feed(&out), out.len());
}

fn sessions(i: Handshake, r: Handshake) -> (Session, Session) {
    (i.into_session().unwrap(), r.into_session().unwrap())
}

#[test]
fn ik_resumes_in_two_messages_and_checks_both_identities() {
    let server = responder_identity();
    let known = learn(&server);
    let mut i = initiator_ik(&known, None);
    let mut r = responder(&server, ik_ok());
    drive(&mut i, &mut r, 7).unwrap();
    assert_eq!((i.pattern(), r.pattern()), (Pattern::IK, Pattern::IK));
    assert!(!i.fell_back() && !r.fell_back());
    assert_eq!(i.peer_vat_id(), Some(server.vat_id()));
    assert_eq!(r.peer_vat_id(), Some(initiator_identity().vat_id()));
    assert_eq!(i.early_data_outcome(), EarlyDataOutcome::NotSent);
    assert_eq!(i.learned_responder(), Some(known));
    let (mut si, mut sr) = sessions(i, r);
    assert_eq!(si.handshake_hash(), sr.handshake_hash());
    // No third message: the initiator has nothing left to send.
    assert!(si.pending_output().is_empty());
    si.write(b"ping").unwrap();
    si.flush().unwrap();
    send(&mut si, &mut sr);
    assert_eq!(read_all(&mut sr), b"ping");
    sr.write(b"pong").unwrap();
    sr.flush().unwrap();
    send(&mut sr, &mut si);
    assert_eq!(read_all(&mut si), b"pong");
}

#[test]
fn accepted_early_data_is_delivered_exactly_once_before_later_data() {
    let server = responder_identity();
    let known = learn(&server);
    let mut i = initiator_ik(&known, Some(b"first call"));
    let mut r = responder(&server, early_ok());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert_eq!(i.early_data_outcome(), EarlyDataOutcome::Accepted);
    assert_eq!(r.early_data_outcome(), EarlyDataOutcome::Accepted);
    let (mut si, mut sr) = sessions(i, r);
    // Accepted: nothing is sent again.
    assert!(si.pending_output().is_empty());
    si.write(b", then more").unwrap();
    si.flush().unwrap();
    send(&mut si, &mut sr);
    assert_eq!(read_all(&mut sr), b"first call, then more");
}

#[test]
fn refused_early_data_is_sent_again_and_delivered_exactly_once() {
    let server = responder_identity();
    let known = learn(&server);
    let mut i = initiator_ik(&known, Some(b"first call"));
    // Early data is refused unless accepted explicitly.
    let mut r = responder(&server, ik_ok());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert_eq!(i.early_data_outcome(), EarlyDataOutcome::Refused);
    assert_eq!(r.early_data_outcome(), EarlyDataOutcome::Refused);
    let (mut si, mut sr) = sessions(i, r);
    // The responder holds nothing of it...
    assert_eq!(read_all(&mut sr), b"");
    // ...and the initiator's session sends it as its first DATA frame.
    assert!(!si.pending_output().is_empty());
    si.write(b", then more").unwrap();
    si.flush().unwrap();
    send(&mut si, &mut sr);
    assert_eq!(read_all(&mut sr), b"first call, then more");
}

#[test]
fn a_changed_server_key_falls_back_to_xx_resends_early_data_and_updates_the_cache() {
    let server = responder_identity();
    let cache = ResumptionCache::new(8);
    cache.insert(learn(&server));
    // The server restarts: same identity, new Noise static key.
    let restarted = Identity::from_seed_and_static_key(&[0x02; 32], &[0x23; 32]);
    assert_eq!(restarted.vat_id(), server.vat_id());
    let old = cache.get(&server.vat_id()).unwrap();
    let mut i = initiator_ik(&old, Some(b"first call"));
    let mut r = responder(&restarted, early_ok());
    drive(&mut i, &mut r, 5).unwrap();
    assert!(i.fell_back() && r.fell_back());
    assert_eq!(i.early_data_outcome(), EarlyDataOutcome::FellBack);
    let learned = i.learned_responder().unwrap();
    assert_ne!(learned.static_key(), old.static_key());
    cache.insert(learned.clone());
    assert_eq!(cache.get(&server.vat_id()), Some(learned.clone()));
    let (mut si, mut sr) = sessions(i, r);
    assert_eq!(si.handshake_hash(), sr.handshake_hash());
    assert_eq!(sr.peer_vat_id(), initiator_identity().vat_id());
    send(&mut si, &mut sr);
    assert_eq!(read_all(&mut sr), b"first call");
    // The next connection resumes with the new key, without a fallback.
    let mut i = initiator_ik(&learned, None);
    let mut r = responder(&restarted, ik_ok());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert!(!i.fell_back());
}

#[test]
fn a_responder_that_refuses_ik_answers_with_the_fallback() {
    let server = responder_identity();
    let known = learn(&server);
    let mut i = initiator_ik(&known, Some(b"call"));
    // The default: IK is answered with the fallback.
    let mut r = responder(
        &server,
        ResumptionConfig::default().with_accept_early_data(true),
    );
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert!(i.fell_back() && r.fell_back());
    let (mut si, mut sr) = sessions(i, r);
    send(&mut si, &mut sr);
    assert_eq!(read_all(&mut sr), b"call");
}

#[test]
fn a_silent_close_after_ik_message_1_is_reported_as_one() {
    // A responder of revision 1.1 does not know the IK protocol name and
    // closes without a word (SPEC.md 2); the initiator may then retry with XX.
    let known = learn(&responder_identity());
    let mut i = initiator_ik(&known, Some(b"call"));
    let e = i.feed_eof().unwrap();
    assert!(matches!(e, Error::UnexpectedEof { during } if during == EOF_BEFORE_MESSAGE_2));
}

#[test]
fn the_initiator_refuses_a_forged_or_wrong_answer() {
    let server = responder_identity();
    let known = learn(&server);
    let answer = |early: Option<&[u8]>| {
        let mut i = initiator_ik(&known, early);
        let mut r = responder(&server, ik_ok());
        let first = i.pending_output().to_vec();
        i.consume_output(first.len());
        r.feed(&first).unwrap();
        let reply = r.pending_output().to_vec();
        (i, reply)
    };
    // An altered byte in IK message 2: authentication failure.
    let (mut i, mut reply) = answer(None);
    assert_eq!(reply[2], REPLY_IK);
    let last = reply.len() - 1;
    reply[last] ^= 1;
    assert!(matches!(i.feed(&reply), Err(Error::Decrypt { .. })));
    // An unknown kind byte: a protocol violation.
    let (mut i, mut reply) = answer(None);
    reply[2] = 7;
    assert!(matches!(
        i.feed(&reply),
        Err(Error::Protocol(ProtocolError::UnknownReplyKind(7)))
    ));
    // The kind switched to the fallback: it fails authentication (or is too
    // short for an XX message 2): refused either way, never accepted.
    let (mut i, mut reply) = answer(None);
    reply[2] = REPLY_FALLBACK;
    assert!(i.feed(&reply).is_err());
    assert!(i.learned_responder().is_none());
    // A length outside the bounds is refused before the body arrives.
    let (mut i, _) = answer(None);
    assert!(matches!(
        i.feed(&[0x00, 0x05]),
        Err(Error::Protocol(ProtocolError::FrameTooShort { .. }))
    ));
    let (mut i, _) = answer(None);
    assert!(matches!(
        i.feed(&[0xff, 0xff]),
        Err(Error::Protocol(ProtocolError::FrameTooLong { .. }))
    ));
}

#[test]
fn an_altered_ik_message_1_falls_back_and_the_fallback_fails() {
    // The fallback's prologue holds IK message 1 as each side saw it, so an
    // attacker who alters message 1 to force a fallback makes it fail: the
    // initiator never replaces its record on the attacker's say-so.
    let server = responder_identity();
    let known = learn(&server);
    let mut i = initiator_ik(&known, Some(b"call"));
    let mut r = responder(&server, early_ok());
    let mut first = i.pending_output().to_vec();
    i.consume_output(first.len());
    let last = first.len() - 1;
    first[last] ^= 0x80;
    r.feed(&first).unwrap();
    assert!(r.fell_back());
    let reply = r.pending_output().to_vec();
    assert_eq!(reply[2], REPLY_FALLBACK);
    assert!(matches!(i.feed(&reply), Err(Error::Decrypt { .. })));
    assert!(i.learned_responder().is_none());
}

#[test]
fn the_responder_checks_the_initiator_of_ik_message_1() {
    let server = responder_identity();
    let known = learn(&server);
    // An identity payload whose signature does not bind this initiator's
    // static key: an invalid identity proof, and no message 2.
    let mut i = initiator_ik(&known, None);
    let other = Identity::generate();
    i.replace_payload_for_tests(other.handshake_payload_for_tests().clone());
    let mut r = responder(&server, ik_ok());
    let first = i.pending_output().to_vec();
    assert!(matches!(r.feed(&first), Err(Error::BadIdentityProof(_))));
    assert!(r.pending_output().is_empty());
    // A payload that is no HandshakePayload: a protocol violation.
    let mut i = initiator_ik(&known, None);
    i.replace_payload_for_tests(Arc::from(&b"not a capnp message"[..]));
    let mut r = responder(&server, ik_ok());
    let first = i.pending_output().to_vec();
    assert!(matches!(
        r.feed(&first),
        Err(Error::Protocol(ProtocolError::BadPayload(_)))
    ));
    // A policy that refuses the initiator: refused, no message 2.
    let i = initiator_ik(&known, Some(b"call"));
    let mut r = responder_with(
        &server,
        early_ok(),
        Arc::new(Pinned(Identity::generate().vat_id())),
    );
    let first = i.pending_output().to_vec();
    assert!(matches!(r.feed(&first), Err(Error::PeerRefused { .. })));
    assert!(r.pending_output().is_empty());
    // A low-order ephemeral key: a protocol violation.
    let i = initiator_ik(&known, None);
    let mut first = i.pending_output().to_vec();
    // After the preamble (13 + 33 bytes) and the length prefix.
    let at = 13 + 33 + 2;
    first[at..at + 32].fill(0);
    let mut r = responder(&server, ik_ok());
    let e = r.feed(&first).unwrap_err();
    assert!(
        matches!(e, Error::Protocol(ProtocolError::LowOrderKey(_))),
        "{e}"
    );
    // IK message 1 lengths outside 98..=4096 are refused at the prefix.
    let pre_len = 13 + 33;
    for len in [97u16, 4097] {
        let mut r = responder(&server, ik_ok());
        let mut bytes = first[..pre_len].to_vec();
        bytes.extend_from_slice(&len.to_be_bytes());
        assert!(matches!(r.feed(&bytes), Err(Error::Protocol(_))), "{len}");
    }
}

#[test]
fn the_initiator_refuses_a_responder_its_policy_no_longer_accepts() {
    let server = responder_identity();
    let known = learn(&server);
    let mut i = Handshake::initiator_resuming(
        &initiator_identity(),
        Arc::new(Pinned(Identity::generate().vat_id())),
        PeerContext::initiator(None, None),
        cfg(),
        &known,
        None,
    )
    .unwrap();
    let mut r = responder(&server, ik_ok());
    let e = drive(&mut i, &mut r, usize::MAX).unwrap_err();
    assert!(matches!(e, Error::PeerRefused { .. }), "{e}");
    assert!(i.learned_responder().is_none());
}

#[test]
fn early_data_too_large_for_message_1_is_a_configuration_error() {
    let known = learn(&responder_identity());
    let room = 4096 - 98 - initiator_identity().handshake_payload_for_tests().len();
    let make = |n: usize| {
        Handshake::initiator_resuming(
            &initiator_identity(),
            Arc::new(AnyVat),
            PeerContext::initiator(None, None),
            cfg(),
            &known,
            Some(EarlyData::replayable_not_forward_secret(vec![7u8; n])),
        )
    };
    let i = make(room).unwrap();
    assert_eq!(i.pending_output().len(), 13 + 33 + 2 + 4096);
    assert!(matches!(make(room + 1), Err(Error::Config(_))));
}

/// SPEC.md 14.5 states it: a recorded first flight replayed to the same
/// responder is accepted again, early data included. The replayer cannot go
/// further (it cannot read message 2 nor send a valid frame).
#[test]
fn a_replayed_first_flight_delivers_its_early_data_again() {
    let server = responder_identity();
    let known = learn(&server);
    let i = initiator_ik(&known, Some(b"idempotent call"));
    let recorded = i.pending_output().to_vec();
    for _ in 0..2 {
        let mut r = responder(&server, early_ok());
        r.feed(&recorded).unwrap();
        assert!(r.is_finished());
        let mut sr = r.into_session().unwrap();
        assert_eq!(read_all(&mut sr), b"idempotent call");
    }
}

// ----- round trips -----

/// Drives a client and a server until the client has read the server's
/// first answer, counting flights: each flight is everything one side can
/// send before it must wait for the other. The client sends `call` as soon
/// as it may (as early data when `early`), the server answers `answer` as
/// soon as it has read `call`.
fn flights_to_first_answer(mut i: Handshake, mut r: Handshake, early: bool) -> usize {
    let call = b"call";
    let answer = b"answer";
    let (mut si, mut sr): (Option<Session>, Option<Session>) = (None, None);
    let mut flights = 0;
    let mut server_got = Vec::new();
    let mut answered = false;
    let mut client_sent_call = early;
    let mut client_got = Vec::new();
    for _ in 0..10 {
        // Client's flight.
        let mut wire = Vec::new();
        if let Some(s) = si.as_mut() {
            if !client_sent_call {
                s.write(call).unwrap();
                s.flush().unwrap();
                client_sent_call = true;
            }
            wire.extend_from_slice(s.pending_output());
            let n = wire.len();
            s.consume_output(n);
        } else {
            wire.extend_from_slice(i.pending_output());
            let n = wire.len();
            i.consume_output(n);
            if i.is_finished() {
                let mut s = std::mem::replace(&mut i, dummy()).into_session().unwrap();
                if !client_sent_call {
                    s.write(call).unwrap();
                    s.flush().unwrap();
                    client_sent_call = true;
                }
                wire.extend_from_slice(s.pending_output());
                let n = s.pending_output().len();
                s.consume_output(n);
                si = Some(s);
            }
        }
        if !wire.is_empty() {
            flights += 1;
        }
        // Server receives and answers.
        let mut out = Vec::new();
        match sr.as_mut() {
            Some(s) => assert_eq!(s.feed(&wire), wire.len()),
            None => {
                let taken = r.feed(&wire).unwrap();
                out.extend_from_slice(r.pending_output());
                let n = out.len();
                r.consume_output(n);
                if r.is_finished() {
                    let mut s = std::mem::replace(&mut r, dummy()).into_session().unwrap();
                    assert_eq!(s.feed(&wire[taken..]), wire.len() - taken);
                    sr = Some(s);
                }
            }
        }
        if let Some(s) = sr.as_mut() {
            server_got.extend(read_all(s));
            if !answered && server_got == call {
                s.write(answer).unwrap();
                s.flush().unwrap();
                answered = true;
            }
            out.extend_from_slice(s.pending_output());
            let n = s.pending_output().len();
            s.consume_output(n);
        }
        if !out.is_empty() {
            flights += 1;
        }
        // Client receives.
        match si.as_mut() {
            Some(s) => assert_eq!(s.feed(&out), out.len()),
            None => {
                let taken = i.feed(&out).unwrap();
                if i.is_finished() {
                    let mut s = std::mem::replace(&mut i, dummy()).into_session().unwrap();
                    assert_eq!(s.feed(&out[taken..]), out.len() - taken);
                    // Early data sent again, if any, is in its pending
                    // output, for the next flight.
                    si = Some(s);
                }
            }
        }
        if let Some(s) = si.as_mut() {
            client_got.extend(read_all(s));
            if client_got == answer {
                assert_eq!(server_got, call, "the call arrived exactly once");
                return flights;
            }
        }
    }
    panic!("no answer after 10 round trips");
}

fn dummy() -> Handshake {
    Handshake::responder(
        &initiator_identity(),
        Arc::new(AnyVat),
        PeerContext::responder(None),
        cfg(),
    )
    .unwrap()
}

/// From connect to the first answer, after the TCP handshake: XX takes 2
/// round trips (the call rides with message 3), IK without early data or
/// with refused early data 2, the fallback 2, IK with accepted early data 1.
#[test]
fn round_trips_to_the_first_answer() {
    let server = responder_identity();
    let known = learn(&server);
    let restarted = Identity::from_seed_and_static_key(&[0x02; 32], &[0x23; 32]);
    let cases: Vec<(&str, Handshake, Handshake, bool, usize)> = vec![
        (
            "XX",
            initiator_xx(Arc::new(AnyVat)),
            responder(&server, early_ok()),
            false,
            4,
        ),
        (
            "IK",
            initiator_ik(&known, None),
            responder(&server, early_ok()),
            false,
            4,
        ),
        (
            "IK + early data, accepted",
            initiator_ik(&known, Some(b"call")),
            responder(&server, early_ok()),
            true,
            2,
        ),
        (
            "IK + early data, refused",
            initiator_ik(&known, Some(b"call")),
            responder(&server, ik_ok()),
            true,
            4,
        ),
        (
            "IK + early data, XX fallback",
            initiator_ik(&known, Some(b"call")),
            responder(&restarted, early_ok()),
            true,
            4,
        ),
    ];
    for (name, i, r, early, want) in cases {
        let flights = flights_to_first_answer(i, r, early);
        println!(
            "{name}: {flights} flights = {} round trips to the first answer",
            flights as f64 / 2.0
        );
        assert_eq!(flights, want, "{name}");
    }
}

/// A vat that holds the recorded static key but proves another VatId (its
/// own binding of that key) is refused: the record names the VatId.
#[test]
fn a_responder_with_the_recorded_key_but_another_vat_id_is_refused() {
    let server = responder_identity();
    let known = learn(&server);
    let impostor = Identity::from_seed_and_static_key(&[0x09; 32], &[0x22; 32]);
    assert_ne!(impostor.vat_id(), server.vat_id());
    let mut i = initiator_ik(&known, Some(b"call"));
    let mut r = responder(&impostor, early_ok());
    let e = drive(&mut i, &mut r, usize::MAX).unwrap_err();
    assert!(
        matches!(&e, Error::PeerRefused { vat_id, .. } if *vat_id == impostor.vat_id()),
        "{e}"
    );
    assert!(i.learned_responder().is_none());
}

/// SPEC.md 14.3: bytes an initiator sends after IK message 1, before the
/// answer, follow the answer: transport frames after IK message 2, XX
/// message 3 after the fallback. They cannot authenticate.
#[test]
fn bytes_after_ik_message_1_fail_after_the_answer() {
    let server = responder_identity();
    let known = learn(&server);
    let mut junk = vec![0x00, 0x40];
    junk.extend_from_slice(&[0xaa; 0x40]);
    // IK accepted: the junk is a transport frame that does not decrypt.
    let i = initiator_ik(&known, Some(b"call"));
    let mut r = responder(&server, early_ok());
    r.feed(&[i.pending_output(), &junk[..]].concat()).unwrap();
    assert!(r.is_finished());
    let mut s = r.into_session().unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap(),
        ReadOutcome::Data(4),
        "early data first"
    );
    assert!(matches!(s.read(&mut buf), Err(Error::Decrypt { .. })));
    // Fallback: the junk is read as XX message 3.
    let i = initiator_ik(&known, None);
    let mut r = responder(&server, ResumptionConfig::default());
    let e = r
        .feed(&[i.pending_output(), &junk[..]].concat())
        .unwrap_err();
    assert!(matches!(e, Error::Decrypt { .. }), "{e}");
    assert!(r.fell_back());
}

/// X25519 scalar multiplications per side (a load-independent count, by
/// capnp-noise's resolver): what SPEC.md 14.7 states for the responder.
/// Returns (initiator total, responder answering message 1, responder total).
fn x25519_work(make_i: impl FnOnce() -> Handshake, mut r: Handshake) -> (u64, u64, u64) {
    use capnp_noise_test::fixtures::x25519_operations_on_this_thread as ops;
    let (mut ci, mut cr) = (0, 0);
    let t = ops();
    let mut i = make_i();
    ci += ops() - t;
    let mut answered = None;
    while !(i.is_finished() && r.is_finished()) {
        let to_r = i.pending_output().to_vec();
        i.consume_output(to_r.len());
        let t = ops();
        r.feed(&to_r).unwrap();
        cr += ops() - t;
        answered.get_or_insert(cr);
        let to_i = r.pending_output().to_vec();
        r.consume_output(to_i.len());
        let t = ops();
        i.feed(&to_i).unwrap();
        ci += ops() - t;
    }
    (ci, answered.unwrap(), cr)
}

#[test]
fn x25519_operations_per_handshake() {
    let server = responder_identity();
    let known = learn(&server);
    let restarted = Identity::from_seed_and_static_key(&[0x02; 32], &[0x23; 32]);
    let xx = x25519_work(
        || initiator_xx(Arc::new(AnyVat)),
        responder(&server, ik_ok()),
    );
    let ik = x25519_work(
        || initiator_ik(&known, Some(b"call")),
        responder(&server, early_ok()),
    );
    let fallback = x25519_work(
        || initiator_ik(&known, Some(b"call")),
        responder(&restarted, early_ok()),
    );
    let refused_ik = x25519_work(
        || initiator_ik(&known, None),
        responder(&server, ResumptionConfig::default()),
    );
    println!("(initiator, responder at message 1, responder total): XX {xx:?}, IK {ik:?}, fallback {fallback:?}, IK off {refused_ik:?}");
    assert_eq!(xx, (4, 3, 4));
    assert_eq!(ik, (5, 5, 5));
    assert_eq!(fallback, (7, 4, 5));
    // IK off: no Diffie-Hellman is spent on IK message 1 at all.
    assert_eq!(refused_ik, (7, 3, 4));
}

/// A key log that counts its lines.
#[derive(Debug, Default)]
struct CountingLog(std::sync::Mutex<usize>);

impl capnp_noise::keylog::KeyLog for CountingLog {
    fn log(&self, _label: &str, _initiator_ephemeral: &[u8; 32], _secret: &[u8]) {
        *self.0.lock().unwrap() += 1;
    }
}

#[test]
fn the_key_log_covers_xx_and_logs_nothing_of_ik_or_its_fallback() {
    let server = responder_identity();
    let known = learn(&server);
    let log = Arc::new(CountingLog::default());
    let with_log = || cfg().with_key_log(Some(log.clone()));
    let responder_logging = |resumption: ResumptionConfig| {
        let mut r = Handshake::responder(
            &server,
            Arc::new(AnyVat),
            PeerContext::responder(None),
            with_log(),
        )
        .unwrap();
        r.set_resumption(resumption);
        r
    };
    let resuming = || {
        Handshake::initiator_resuming(
            &initiator_identity(),
            Arc::new(AnyVat),
            PeerContext::initiator(None, None),
            with_log(),
            &known,
            None,
        )
        .unwrap()
    };
    let lines = || std::mem::take(&mut *log.0.lock().unwrap());

    // XX: three handshake keys and two traffic keys, from each end.
    let mut i = Handshake::initiator(
        &initiator_identity(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        with_log(),
    )
    .unwrap();
    let mut r = responder_logging(ik_ok());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    let _ = sessions(i, r);
    assert_eq!(lines(), 10);

    // IK, completed: nothing.
    let mut i = resuming();
    let mut r = responder_logging(ik_ok());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert!(!i.fell_back());
    let _ = sessions(i, r);
    assert_eq!(lines(), 0);

    // IK that falls back (this responder refuses IK): nothing either.
    let mut i = resuming();
    let mut r = responder_logging(ResumptionConfig::default());
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert!(i.fell_back());
    let _ = sessions(i, r);
    assert_eq!(lines(), 0);
}
