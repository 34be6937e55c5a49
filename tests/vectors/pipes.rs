//! Test vectors of resumption (SPEC.md 14): `IK` with early data accepted
//! and refused, and the `XX` fallback of a responder whose static key
//! changed, per suite, from the deterministic keys of the XX vectors.
//! `tests/vectors/Noise_IK_<suite>.json`.

use std::sync::Arc;

use capnp_noise::policy::{AnyVat, PeerContext};
use capnp_noise::wire::{
    preamble, EarlyData, Handshake, HandshakeConfig, Pattern, ReadOutcome, ResumptionConfig,
    Session, Suite,
};
use capnp_noise::Identity;
use capnp_noise_test::fixtures;
use serde_json::{json, Value};

use super::{load_committed, party, regenerate_or_compare};

const EARLY: &[u8] = b"first call: safe to repeat";
/// The responder's static key after its restart, in the fallback vector.
const RESTARTED_STATIC: u8 = 0x23;

fn name(suite: Suite) -> String {
    format!("{}.json", suite.noise_name_for(Pattern::IK))
}

fn initiator(suite: Suite) -> Handshake {
    Handshake::initiator_resuming_with_fixed_ephemeral(
        &fixtures::initiator_identity(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        HandshakeConfig::with_suite(suite),
        &fixtures::known_responder(suite),
        Some(EarlyData::replayable_not_forward_secret(EARLY)),
        fixtures::INITIATOR_EPHEMERAL,
    )
    .unwrap()
}

fn responder(suite: Suite, id: &Identity, early: bool) -> Handshake {
    let mut r = Handshake::responder_with_fixed_ephemeral(
        id,
        Arc::new(AnyVat),
        PeerContext::responder(None),
        HandshakeConfig::with_suite(suite),
        fixtures::RESPONDER_EPHEMERAL,
    )
    .unwrap();
    r.set_resumption(
        ResumptionConfig::default()
            .with_accept_ik(true)
            .with_accept_early_data(early),
    );
    r
}

fn restarted() -> Identity {
    Identity::from_seed_and_static_key(&[0x02; 32], &[RESTARTED_STATIC; 32])
}

fn out(hs: &mut Handshake) -> Vec<u8> {
    let v = hs.pending_output().to_vec();
    hs.consume_output(v.len());
    v
}

fn take(s: &mut Session) -> Vec<u8> {
    let v = s.pending_output().to_vec();
    s.consume_output(v.len());
    v
}

/// One connection: the first flight, the answer, the initiator's second
/// flight (XX message 3 and/or early data sent again, possibly empty), then
/// one DATA frame from the responder. Returns the messages and the hash.
fn connection(suite: Suite, r_id: &Identity, early: bool) -> (Vec<Value>, String) {
    let mut i = initiator(suite);
    let mut r = responder(suite, r_id, early);
    let first = out(&mut i);
    let pre = preamble::encode_for(suite, Pattern::IK);
    let mut m = vec![
        json!({"from": "initiator", "kind": "preamble", "wire": hex::encode(&pre)}),
        json!({"from": "initiator", "kind": "IK message 1", "wire": hex::encode(&first[pre.len()..])}),
    ];
    r.feed(&first).unwrap();
    let answer = out(&mut r);
    let kind = if r.fell_back() {
        "answer: fallback (kind 0x01, XX message 2)"
    } else {
        "answer: IK message 2 (kind 0x00)"
    };
    m.push(json!({"from": "responder", "kind": kind, "wire": hex::encode(&answer)}));
    i.feed(&answer).unwrap();
    let mut second = out(&mut i);
    let mut si = i.into_session().unwrap();
    second.extend(take(&mut si));
    if !second.is_empty() {
        m.push(json!({
            "from": "initiator",
            "kind": "second flight: XX message 3 if fallback, then the early data again as DATA if not accepted",
            "wire": hex::encode(&second),
        }));
        r.feed(&second).unwrap();
    }
    let mut sr = r.into_session().unwrap();
    assert_eq!(si.handshake_hash(), sr.handshake_hash());
    sr.write(b"answer").unwrap();
    sr.flush().unwrap();
    m.push(json!({"from": "responder", "kind": "DATA", "body": hex::encode(b"answer"), "wire": hex::encode(take(&mut sr))}));
    (m, hex::encode(si.handshake_hash()))
}

fn generate(suite: Suite) -> Value {
    let server = fixtures::responder_identity();
    let (accepted, accepted_hash) = connection(suite, &server, true);
    let (refused, refused_hash) = connection(suite, &server, false);
    let (fallback, fallback_hash) = connection(suite, &restarted(), true);
    json!({
        "protocol": "capnp-noise/1, revision 1.2, section 14",
        "noise_protocol_name": suite.noise_name_for(Pattern::IK),
        "note": "All byte strings are hex. 'wire' is exactly what goes on the byte stream, length prefixes included. The initiator knows the responder's static key from an earlier XX handshake (the XX vectors' responder). In 'fallback' the responder restarted with static key 23..23: the XX fallback's prologue is the IK preamble followed by IK message 1 (its Noise message, without its length prefix).",
        "initiator": party(&fixtures::initiator_identity(), 0x01, 0x11, fixtures::INITIATOR_EPHEMERAL),
        "responder": party(&server, 0x02, 0x22, fixtures::RESPONDER_EPHEMERAL),
        "responder_restarted": party(&restarted(), 0x02, RESTARTED_STATIC, fixtures::RESPONDER_EPHEMERAL),
        "early_data": hex::encode(EARLY),
        "early_data_accepted": {"handshake_hash": accepted_hash, "messages": accepted},
        "early_data_refused": {"handshake_hash": refused_hash, "messages": refused},
        "fallback": {"handshake_hash": fallback_hash, "messages": fallback},
    })
}

#[test]
fn pipes_vectors_are_reproduced_byte_for_byte() {
    for suite in Suite::ALL {
        regenerate_or_compare(&name(suite), &generate(suite), "the IK wire format changed");
    }
}

/// The committed bytes, fed to fresh responders: each reads the early
/// data exactly once, first, and authenticates the vectors' initiator.
#[test]
fn committed_pipes_vectors_deliver_the_early_data_once() {
    for suite in Suite::ALL {
        let v = load_committed(&name(suite));
        for (case, id, early) in [
            ("early_data_accepted", fixtures::responder_identity(), true),
            ("early_data_refused", fixtures::responder_identity(), false),
            ("fallback", restarted(), true),
        ] {
            let mut r = responder(suite, &id, early);
            for m in v[case]["messages"].as_array().unwrap() {
                if m["from"] == "initiator" {
                    r.feed(&hex::decode(m["wire"].as_str().unwrap()).unwrap())
                        .unwrap();
                }
            }
            assert_eq!(
                r.peer_vat_id(),
                Some(fixtures::initiator_identity().vat_id())
            );
            let mut s = r.into_session().unwrap();
            assert_eq!(hex::encode(s.handshake_hash()), v[case]["handshake_hash"]);
            let mut buf = vec![0u8; 256];
            let mut got = Vec::new();
            while let ReadOutcome::Data(n) = s.read(&mut buf).unwrap() {
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, EARLY, "{case}");
        }
    }
}
