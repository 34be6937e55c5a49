//! Test vectors (SPEC.md, "Test vectors"): the exact bytes of a full session
//! per suite, with deterministic keys and ephemerals.
//!
//! `tests/vectors/<suite>.json` is committed. This test rebuilds every
//! session from the keys alone and requires the same bytes, then replays the
//! committed wire bytes into fresh receivers and requires the recorded
//! plaintexts. `CAPNP_NOISE_REGEN=1 cargo test --test vectors` rewrites the
//! files (only after a deliberate wire-format change, with SPEC.md).

use std::path::PathBuf;
use std::sync::Arc;

use capnp_noise::policy::AnyVat;
use capnp_noise::wire::{
    payload, preamble, HandshakeConfig, ReadOutcome, Session, SessionConfig, Suite,
};
use capnp_noise_test::fixtures::{self, deterministic_handshakes};
use serde_json::{json, Value};

/// The committed vector file `tests/vectors/<name>`.
fn committed_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name)
}

/// Reads a committed vector file.
fn load_committed(name: &str) -> Value {
    let path = committed_path(name);
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// With `CAPNP_NOISE_REGEN` set, writes `fresh` as the vector file `name`;
/// otherwise requires the committed file to equal it (`changed` says what
/// a difference means).
fn regenerate_or_compare(name: &str, fresh: &Value, changed: &str) {
    let path = committed_path(name);
    if std::env::var_os("CAPNP_NOISE_REGEN").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(fresh).unwrap() + "\n").unwrap();
        return;
    }
    assert_eq!(
        &load_committed(name),
        fresh,
        "{} differs from what the code produces: {changed}",
        path.display()
    );
}

#[path = "vectors/introduction.rs"]
mod introduction;
#[path = "vectors/pipes.rs"]
mod pipes;
#[path = "vectors/vat_id_rejected.rs"]
mod vat_id_rejected;

fn vector_name(suite: Suite) -> String {
    format!("{}.json", suite.noise_name())
}

fn party(id: &capnp_noise::Identity, seed: u8, stat: u8, eph: [u8; 32]) -> Value {
    json!({
        "ed25519_seed": hex::encode([seed; 32]),
        "ed25519_public": hex::encode(id.vat_id().as_bytes()),
        "vat_id": id.vat_id().to_string(),
        "static_private": hex::encode([stat; 32]),
        "static_public": hex::encode(id.noise_static_public()),
        "ephemeral_private": hex::encode(eph),
        "handshake_payload": hex::encode(payload::encode(
            &id.vat_id(),
            &id.sign(&payload::binding_message(id.noise_static_public()))
        )),
    })
}

/// The transport part of the script: (sender is initiator, action, body).
const SCRIPT: &[(bool, &str, &[u8])] = &[
    (true, "DATA", b"hello, responder"),
    (false, "DATA", b"hello, initiator"),
    (true, "DATA", b""),
    (true, "REKEY", b""),
    (true, "DATA", b"after the initiator's rekey"),
    (false, "REKEY", b""),
    (false, "DATA", b"after the responder's rekey"),
    (false, "CLOSE", b""),
    (true, "DATA", b"half-closed: the initiator still sends"),
    (true, "CLOSE", b""),
];

fn take(s: &mut Session) -> Vec<u8> {
    let out = s.pending_output().to_vec();
    s.consume_output(out.len());
    out
}

fn generate(suite: Suite) -> Value {
    let config = HandshakeConfig {
        suites: vec![suite],
        session: SessionConfig::default(),
        allow_self: false,
        key_log: None,
    };
    let (mut i, mut r) =
        deterministic_handshakes(suite, config, Arc::new(AnyVat), Arc::new(AnyVat)).unwrap();
    let mut messages = Vec::new();
    let first = i.pending_output().to_vec();
    i.consume_output(first.len());
    let pre = preamble::encode(suite);
    assert_eq!(&first[..pre.len()], &pre[..]);
    messages.push(json!({"from": "initiator", "kind": "preamble", "wire": hex::encode(&pre)}));
    messages.push(json!({"from": "initiator", "kind": "handshake message 1", "wire": hex::encode(&first[pre.len()..])}));
    r.feed(&first).unwrap();
    let m2 = r.pending_output().to_vec();
    r.consume_output(m2.len());
    messages.push(
        json!({"from": "responder", "kind": "handshake message 2", "wire": hex::encode(&m2)}),
    );
    i.feed(&m2).unwrap();
    let m3 = i.pending_output().to_vec();
    i.consume_output(m3.len());
    messages.push(
        json!({"from": "initiator", "kind": "handshake message 3", "wire": hex::encode(&m3)}),
    );
    r.feed(&m3).unwrap();
    let (mut i, mut r) = (i.into_session().unwrap(), r.into_session().unwrap());
    let hash = hex::encode(i.handshake_hash());
    assert_eq!(i.handshake_hash(), r.handshake_hash());
    for (from_i, kind, body) in SCRIPT {
        let s = if *from_i { &mut i } else { &mut r };
        match *kind {
            "DATA" => {
                // Empty DATA frames are legal; seal one explicitly.
                if body.is_empty() {
                    let w = s.seal_raw_for_tests(&[0]).unwrap();
                    messages.push(json!({"from": if *from_i {"initiator"} else {"responder"}, "kind": "DATA", "body": "", "wire": hex::encode(w)}));
                    continue;
                }
                s.write(body).unwrap();
                s.flush().unwrap();
            }
            "REKEY" => s.rekey().unwrap(),
            "CLOSE" => s.close().unwrap(),
            _ => unreachable!(),
        }
        messages.push(json!({
            "from": if *from_i {"initiator"} else {"responder"},
            "kind": kind,
            "body": hex::encode(body),
            "wire": hex::encode(take(s)),
        }));
    }
    json!({
        "protocol": "capnp-noise/1",
        "noise_protocol_name": suite.noise_name(),
        "note": "All byte strings are hex. 'wire' is exactly what goes on the byte stream, length prefixes included. Ed25519 signatures are deterministic (RFC 8032).",
        "prologue": hex::encode(&pre),
        "initiator": party(&fixtures::initiator_identity(), 0x01, 0x11, fixtures::INITIATOR_EPHEMERAL),
        "responder": party(&fixtures::responder_identity(), 0x02, 0x22, fixtures::RESPONDER_EPHEMERAL),
        "handshake_hash": hash,
        "messages": messages,
    })
}

#[test]
fn vectors_are_reproduced_byte_for_byte() {
    for suite in Suite::ALL {
        regenerate_or_compare(
            &vector_name(suite),
            &generate(suite),
            "the wire format changed",
        );
    }
}

/// Replays the committed wire bytes into fresh deterministic receivers and
/// checks every recorded body arrives, in order, then a clean close.
#[test]
fn committed_wire_bytes_decode_to_recorded_plaintext() {
    for suite in Suite::ALL {
        let v = load_committed(&vector_name(suite));
        let config = HandshakeConfig {
            suites: vec![suite],
            session: SessionConfig::default(),
            allow_self: false,
            key_log: None,
        };
        let (mut i, mut r) =
            deterministic_handshakes(suite, config, Arc::new(AnyVat), Arc::new(AnyVat)).unwrap();
        let msgs = v["messages"].as_array().unwrap();
        let bytes = |m: &Value| hex::decode(m["wire"].as_str().unwrap()).unwrap();
        // Handshake: the responder reads preamble + msg1 + msg3; the initiator msg2.
        r.feed(&[bytes(&msgs[0]), bytes(&msgs[1])].concat())
            .unwrap();
        i.feed(&bytes(&msgs[2])).unwrap();
        r.feed(&bytes(&msgs[3])).unwrap();
        let (mut i, mut r) = (i.into_session().unwrap(), r.into_session().unwrap());
        assert_eq!(hex::encode(r.handshake_hash()), v["handshake_hash"]);
        let mut buf = vec![0u8; 1 << 16];
        for m in &msgs[4..] {
            let to = if m["from"] == "initiator" {
                &mut r
            } else {
                &mut i
            };
            to.feed(&bytes(m));
            let body = hex::decode(m["body"].as_str().unwrap()).unwrap();
            let mut got = Vec::new();
            let mut closed = false;
            loop {
                match to.read(&mut buf).unwrap() {
                    ReadOutcome::Data(n) => got.extend_from_slice(&buf[..n]),
                    ReadOutcome::Closed => {
                        closed = true;
                        break;
                    }
                    ReadOutcome::NeedInput => break,
                }
            }
            assert_eq!(got, body, "{m}");
            assert_eq!(closed, m["kind"] == "CLOSE", "{m}");
        }
    }
}
