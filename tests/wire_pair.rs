//! Protocol tests over the deterministic in-memory pair.

use std::sync::Arc;

use proptest::prelude::*;

use capnp_noise::policy::{AnyVat, PeerContext, Pinned};
use capnp_noise::wire::{Handshake, HandshakeConfig, ReadOutcome, Session, SessionConfig, Suite};
use capnp_noise::{Error, Identity, ProtocolError};
use capnp_noise_test::fixtures::{
    self as testing, deterministic_handshakes, drive, session_pair, transfer,
};

fn cfg() -> HandshakeConfig {
    HandshakeConfig::default()
}

#[test]
fn handshake_authenticates_both_sides_every_suite() {
    for suite in Suite::ALL {
        let (i, r) = session_pair(suite, cfg()).unwrap();
        assert_eq!(i.peer_vat_id(), testing::responder_identity().vat_id());
        assert_eq!(r.peer_vat_id(), testing::initiator_identity().vat_id());
        assert_eq!(i.handshake_hash(), r.handshake_hash());
        assert_eq!(i.suite(), suite);
        assert_eq!(r.suite(), suite);
    }
}

#[test]
fn data_both_ways_then_close_is_clean() {
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    assert_eq!(i.write(b"hello").unwrap(), 5);
    i.flush().unwrap();
    let (got, closed) = transfer(&mut i, &mut r, usize::MAX).unwrap();
    assert_eq!((got.as_slice(), closed), (&b"hello"[..], false));
    r.write(b"world").unwrap();
    r.close().unwrap();
    let (got, closed) = transfer(&mut r, &mut i, 3).unwrap();
    assert_eq!((got.as_slice(), closed), (&b"world"[..], true));
    // Half-close: the initiator can still send after the responder closed.
    i.write(b"more").unwrap();
    i.close().unwrap();
    let (got, closed) = transfer(&mut i, &mut r, 1).unwrap();
    assert_eq!((got.as_slice(), closed), (&b"more"[..], true));
    assert!(matches!(r.write(b"x"), Err(Error::SendAfterClose)));
}

#[test]
fn a_keepalive_is_an_empty_data_frame_that_delivers_nothing() {
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    i.write(b"before").unwrap();
    i.keepalive().unwrap();
    // The buffered bytes, then a frame of 2 + 1 + 16 bytes.
    let pending = i.pending_output().len();
    assert_eq!(pending, (2 + 6 + 1 + 16) + (2 + 1 + 16));
    i.keepalive().unwrap();
    i.write(b"after").unwrap();
    i.flush().unwrap();
    let (got, closed) = transfer(&mut i, &mut r, usize::MAX).unwrap();
    assert_eq!((got.as_slice(), closed), (&b"beforeafter"[..], false));
    assert!(r.error().is_none());
    i.close().unwrap();
    assert!(matches!(i.keepalive(), Err(Error::SendAfterClose)));
}

#[test]
fn truncation_is_not_a_clean_end() {
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    i.write(b"abc").unwrap();
    i.flush().unwrap();
    let wire = i.pending_output().to_vec();
    // Cut between frames.
    r.feed(&wire);
    r.feed_eof();
    let mut buf = [0u8; 64];
    assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Data(3));
    let err = r.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnexpectedEof {
                during: "between frames"
            }
        ),
        "{err}"
    );
    // Cut mid-frame.
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    i.write(b"abc").unwrap();
    i.close().unwrap();
    let wire = i.pending_output().to_vec();
    r.feed(&wire[..wire.len() - 1]);
    r.feed_eof();
    assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Data(3));
    let err = r.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnexpectedEof {
                during: "in the middle of a frame"
            }
        ),
        "{err}"
    );
    // And errors stick.
    assert!(matches!(r.read(&mut buf), Err(Error::UnexpectedEof { .. })));
}

#[test]
fn rekeys_keep_working_across_thousands_of_frames() {
    for suite in Suite::ALL {
        let mut c = cfg();
        c.session = SessionConfig { rekey_interval: 7 };
        let (mut i, mut r) = session_pair(suite, c).unwrap();
        let mut sent = Vec::new();
        for n in 0..3000u32 {
            let msg = n.to_le_bytes();
            i.write(&msg).unwrap();
            i.flush().unwrap();
            sent.extend_from_slice(&msg);
            if n % 500 == 0 {
                i.rekey().unwrap();
            }
        }
        i.close().unwrap();
        let (got, closed) = transfer(&mut i, &mut r, 10_000).unwrap();
        assert!(closed);
        assert_eq!(got, sent);
    }
}

#[test]
fn wrong_pinned_responder_never_gets_message_3() {
    let other = Identity::generate().vat_id();
    let (mut i, mut r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        cfg(),
        Arc::new(Pinned(other)),
        Arc::new(AnyVat),
    )
    .unwrap();
    let err = drive(&mut i, &mut r, usize::MAX).unwrap_err();
    match &err {
        Error::PeerRefused { vat_id, reason } => {
            assert_eq!(*vat_id, testing::responder_identity().vat_id());
            assert!(reason.contains(&other.to_string()));
        }
        e => panic!("unexpected {e}"),
    }
    // Message 3 was never produced: nothing is pending, and the responder
    // never learned who the initiator is.
    assert!(i.pending_output().is_empty());
    assert!(r.peer_vat_id().is_none());
    assert!(r.wants_read());
}

#[test]
fn responder_refusing_initiator_fails_distinctly() {
    let other = Identity::generate().vat_id();
    let (mut i, mut r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        cfg(),
        Arc::new(AnyVat),
        Arc::new(Pinned(other)),
    )
    .unwrap();
    let err = drive(&mut i, &mut r, usize::MAX).unwrap_err();
    assert!(matches!(err, Error::PeerRefused { .. }), "{err}");
    assert!(r.into_session().is_err());
}

#[test]
fn responder_refuses_suite_it_does_not_accept_without_answering() {
    let idi = Identity::generate();
    let idr = Identity::generate();
    let i = Handshake::initiator(
        &idi,
        Arc::new(AnyVat),
        PeerContext::default(),
        HandshakeConfig::with_suite(Suite::AesGcmSha256),
    )
    .unwrap();
    let mut r = Handshake::responder(
        &idr,
        Arc::new(AnyVat),
        PeerContext::default(),
        HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s),
    )
    .unwrap();
    let out = i.pending_output().to_vec();
    let err = r.feed(&out).unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::UnsupportedSuite(_))),
        "{err}"
    );
    assert!(r.pending_output().is_empty());
}

/// Replaces the responder's payload with one that claims another VatId but
/// cannot carry that VatId's signature over the real static key.
#[test]
fn identity_claim_without_valid_signature_fails() {
    use capnp_noise::wire::payload;
    // A payload claiming `victim`, signed by `mallory` over mallory's static key.
    let victim = Identity::generate();
    let mallory = Identity::generate();
    let sig = mallory.sign(&payload::binding_message(mallory.noise_static_public()));
    let forged = payload::encode(&victim.vat_id(), &sig);
    let mut i = Handshake::initiator(
        &Identity::generate(),
        Arc::new(AnyVat),
        PeerContext::default(),
        cfg(),
    )
    .unwrap();
    let mut r =
        Handshake::responder(&mallory, Arc::new(AnyVat), PeerContext::default(), cfg()).unwrap();
    r.replace_payload_for_tests(forged.into());
    let err = drive(&mut i, &mut r, usize::MAX).unwrap_err();
    assert!(matches!(err, Error::BadIdentityProof(_)), "{err}");
    assert!(
        i.pending_output().is_empty(),
        "no message 3 after a bad proof"
    );
}

fn full_handshake_wire(suite: Suite) -> (Vec<u8>, Vec<u8>) {
    // Returns (initiator->responder bytes, responder->initiator bytes).
    let (mut i, mut r) =
        deterministic_handshakes(suite, cfg(), Arc::new(AnyVat), Arc::new(AnyVat)).unwrap();
    let a = i.pending_output().to_vec();
    i.consume_output(a.len());
    r.feed(&a).unwrap();
    let b = r.pending_output().to_vec();
    r.consume_output(b.len());
    i.feed(&b).unwrap();
    let c = i.pending_output().to_vec();
    ([a, c].concat(), b)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any chunking of the byte streams gives the same plaintext.
    #[test]
    fn any_chunking_same_plaintext(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..12),
        hs_chunk in 1usize..200,
        chunk in 1usize..5000,
        aes in any::<bool>(),
    ) {
        let suite = if aes { Suite::AesGcmSha256 } else { Suite::ChaChaPolyBlake2s };
        let (mut i, mut r) = deterministic_handshakes(suite, cfg(), Arc::new(AnyVat), Arc::new(AnyVat)).unwrap();
        drive(&mut i, &mut r, hs_chunk).unwrap();
        let (mut i, mut r) = (i.into_session().unwrap(), r.into_session().unwrap());
        let mut sent = Vec::new();
        for m in &msgs {
            let mut off = 0;
            while off < m.len() {
                off += i.write(&m[off..]).unwrap();
                if off < m.len() {
                    let (got, _) = transfer(&mut i, &mut r, chunk).unwrap();
                    sent.extend_from_slice(&got);
                }
            }
            i.flush().unwrap();
        }
        i.close().unwrap();
        let (got, closed) = transfer(&mut i, &mut r, chunk).unwrap();
        sent.extend_from_slice(&got);
        prop_assert!(closed);
        prop_assert_eq!(sent, msgs.concat());
    }

    /// Any single byte flipped anywhere in the handshake makes it fail.
    #[test]
    fn flipped_handshake_byte_fails(pos in any::<prop::sample::Index>(), bit in 0u8..8, to_responder in any::<bool>()) {
        let (fwd, back) = full_handshake_wire(Suite::ChaChaPolyBlake2s);
        let (mut i, mut r) = deterministic_handshakes(Suite::ChaChaPolyBlake2s, cfg(), Arc::new(AnyVat), Arc::new(AnyVat)).unwrap();
        let mut fwd = fwd;
        let mut back = back;
        if to_responder {
            let p = pos.index(fwd.len());
            fwd[p] ^= 1 << bit;
        } else {
            let p = pos.index(back.len());
            back[p] ^= 1 << bit;
        }
        // Initiator output is deterministic, so replay the tampered streams.
        let first = i.pending_output().len();
        i.consume_output(first);
        let r_res = r.feed(&fwd[..first]);
        let i_res = i.feed(&back);
        let r_res2 = r_res.and_then(|_| r.feed(&fwd[first..]));
        // The side that received tampered bytes never completes: it fails,
        // or (when a length prefix grew) waits for bytes that never come.
        if to_responder {
            prop_assert!(!r.is_finished());
            prop_assert!(r_res2.is_err() || r.wants_read());
        } else {
            prop_assert!(!i.is_finished());
            prop_assert!(i_res.is_err() || i.wants_read());
            prop_assert!(i.pending_output().is_empty(), "no message 3 after a tampered message 2");
        }
    }

    /// Any damage to the transport byte stream (flip, drop, duplicate, swap
    /// of bytes or frames) makes the receiver fail, and no plaintext from
    /// the damaged point on is delivered.
    #[test]
    fn damaged_transport_fails_and_delivers_nothing_after(
        kind in 0u8..5,
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
        nframes in 2usize..8,
    ) {
        let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
        let mut frames: Vec<Vec<u8>> = Vec::new();
        for n in 0..nframes {
            i.write(&[n as u8; 100]).unwrap();
            i.flush().unwrap();
            frames.push(i.pending_output().to_vec());
            let l = frames.last().unwrap().len();
            i.consume_output(l);
        }
        i.close().unwrap();
        frames.push(i.pending_output().to_vec());
        let clean: Vec<u8> = frames.concat();
        let f = pos.index(frames.len());
        // The first frame index whose bytes are damaged.
        let mut wire;
        let first_bad;
        match kind {
            0 => { // flip a bit in frame f
                let mut fr = frames.clone();
                let p = pos.index(fr[f].len());
                fr[f][p] ^= 1 << bit;
                first_bad = f; wire = fr.concat();
            }
            1 => { // drop frame f
                let mut fr = frames.clone(); fr.remove(f); first_bad = f; wire = fr.concat();
            }
            2 => { // duplicate frame f
                let mut fr = frames.clone(); fr.insert(f, frames[f].clone()); first_bad = f + 1; wire = fr.concat();
            }
            3 => { // swap frame f with the next
                let g = (f + 1) % frames.len();
                let mut fr = frames.clone(); fr.swap(f, g); first_bad = f.min(g); wire = fr.concat();
            }
            _ => { // truncate anywhere
                let p = pos.index(clean.len());
                wire = clean[..p].to_vec();
                first_bad = frames.iter().scan(0, |acc, fr| { *acc += fr.len(); Some(*acc) }).position(|end| end > p).unwrap_or(frames.len());
            }
        }
        if wire == clean { wire.clear(); }
        let expected: Vec<u8> = (0..first_bad.min(nframes)).flat_map(|n| vec![n as u8; 100]).collect();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 500];
        let mut off = 0;
        let outcome = loop {
            match r.read(&mut buf) {
                Ok(ReadOutcome::Data(n)) => got.extend_from_slice(&buf[..n]),
                Ok(ReadOutcome::Closed) => break Ok(()),
                Ok(ReadOutcome::NeedInput) => {
                    if off == wire.len() { r.feed_eof(); continue; }
                    off += r.feed(&wire[off..]);
                }
                Err(e) => break Err(e),
            }
        };
        if kind == 2 && f == frames.len() - 1 {
            // A copy of the CLOSE after the CLOSE: the receiver stops
            // reading at the first (SPEC.md 7.2), so the stream is whole.
            prop_assert!(outcome.is_ok(), "{:?}", outcome);
            prop_assert_eq!(got, (0..nframes).flat_map(|n| vec![n as u8; 100]).collect::<Vec<u8>>());
        } else {
            prop_assert!(outcome.is_err(), "damage kind {} ended cleanly", kind);
            prop_assert!(got.len() <= expected.len());
            prop_assert_eq!(&got[..], &expected[..got.len()]);
        }
    }
}

#[test]
fn zero_and_short_transport_lengths_are_refused() {
    let (_, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    r.feed(&[0, 0]);
    let err = r.read(&mut [0u8; 10]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Protocol(ProtocolError::FrameTooShort { len: 0, .. })
        ),
        "{err}"
    );
}

#[test]
fn unknown_frame_type_and_control_body_are_refused() {
    // Build frames with a raw Noise transport so that they authenticate.
    for (ty, body, want) in [
        (7u8, &b""[..], "unknown transport frame type 0x07"),
        (1, &b"x"[..], "CLOSE frame must have an empty body"),
    ] {
        let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
        let mut plain = body.to_vec();
        plain.push(ty);
        let wire = i.seal_raw_for_tests(&plain).unwrap();
        r.feed(&wire);
        let err = r.read(&mut [0u8; 100]).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
}

#[test]
fn surplus_after_handshake_reaches_the_session() {
    // The initiator sends message 3 and a data frame in one write; the
    // responder must deliver the data.
    let (mut i, mut r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        cfg(),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    let a = i.pending_output().to_vec();
    i.consume_output(a.len());
    r.feed(&a).unwrap();
    let b = r.pending_output().to_vec();
    r.consume_output(b.len());
    i.feed(&b).unwrap();
    let mut i: Session = i.into_session().unwrap();
    i.write(b"early").unwrap();
    i.flush().unwrap();
    let all = i.pending_output().to_vec(); // msg3 + data frame
    assert_eq!(r.feed(&all).unwrap(), all.len());
    let mut r = r.into_session().unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Data(5));
    assert_eq!(&buf[..5], b"early");
}

#[test]
fn large_writes_are_split_into_frames_and_output_is_bounded() {
    let (mut i, mut r) = session_pair(Suite::AesGcmSha256, cfg()).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|x| (x * 7) as u8).collect();
    let mut got = Vec::new();
    let mut off = 0;
    while off < data.len() {
        off += i.write(&data[off..]).unwrap();
        // pending output never holds more than BULK_FRAMES data frames plus
        // a short frame and control frames
        assert!(
            i.pending_output().len()
                <= capnp_noise::wire::BULK_FRAMES * capnp_noise::wire::transport::MAX_WIRE_FRAME
                    + 2048
        );
        let (g, _) = transfer(&mut i, &mut r, 8192).unwrap();
        got.extend(g);
    }
    i.close().unwrap();
    let (g, closed) = transfer(&mut i, &mut r, 8192).unwrap();
    got.extend(g);
    assert!(closed);
    assert_eq!(got, data);
}

#[test]
fn initiator_eof_before_any_responder_frame_hints_at_refusal() {
    let mut buf = [0u8; 64];
    let mut eof_during = |s: &mut Session| {
        s.feed_eof();
        match s.read(&mut buf) {
            Err(Error::UnexpectedEof { during }) => during,
            other => panic!("expected UnexpectedEof, got {other:?}"),
        }
    };
    // The responder never sends a frame: the initiator's error says it may
    // have been refused.
    let (mut i, _r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    let during = eof_during(&mut i);
    assert_eq!(
        during,
        capnp_noise::wire::transport::EOF_BEFORE_RESPONDER_SPOKE
    );
    assert!(during.contains("may have refused"));
    // Once the responder has sent a frame, a cut is an ordinary truncation.
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    r.write(b"hi").unwrap();
    r.flush().unwrap();
    let (got, _) = transfer(&mut r, &mut i, usize::MAX).unwrap();
    assert_eq!(got, b"hi");
    assert_eq!(eof_during(&mut i), "between frames");
    // A responder never gets the hint: an initiator cannot refuse after message 3.
    let (_i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    assert_eq!(eof_during(&mut r), "between frames");
}

#[test]
fn buffer_capacity_is_bounded() {
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    let fresh = i.buffer_capacity();
    assert!(fresh < 1024, "a fresh session holds {fresh} bytes");
    let big = vec![7u8; 1 << 20];
    let mut sent = 0;
    let mut got = Vec::new();
    while sent < big.len() {
        sent += i.write(&big[sent..]).unwrap();
        let (chunk, _) = transfer(&mut i, &mut r, 1000).unwrap();
        got.extend_from_slice(&chunk);
    }
    i.flush().unwrap();
    got.extend_from_slice(&transfer(&mut i, &mut r, 1000).unwrap().0);
    assert_eq!(got.len(), big.len());
    // The sender holds the frame being built (one maximal frame) and the
    // sealed frames (BULK_FRAMES of them), the receiver its receive buffer
    // (BULK_FRAMES frames and one decrypted in place): each plus a short
    // frame and control frames (2 KiB), never the double that plain `Vec`
    // growth would reach.
    let frame = capnp_noise::wire::transport::MAX_WIRE_FRAME;
    let bulk = capnp_noise::wire::BULK_FRAMES * frame + 2048;
    assert!(
        i.buffer_capacity() <= frame + 2048 + bulk + 4096,
        "{}",
        i.buffer_capacity()
    );
    assert!(
        r.buffer_capacity() <= bulk + frame + 4096,
        "{}",
        r.buffer_capacity()
    );
}

#[test]
fn eof_during_handshake_names_the_step() {
    let (mut i, mut r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        cfg(),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    let e = i.feed_eof().unwrap();
    assert!(e.to_string().contains("before handshake message 2"), "{e}");
    assert!(
        matches!(i.feed(&[1]), Err(Error::UnexpectedEof { .. })),
        "sticky"
    );
    r.feed(&capnp_noise::wire::preamble::encode(Suite::ChaChaPolyBlake2s)[..5])
        .unwrap();
    let e = r.feed_eof().unwrap();
    assert!(e.to_string().contains("preamble"), "{e}");
    let (mut i, mut r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        cfg(),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    drive(&mut i, &mut r, usize::MAX).unwrap();
    assert!(i.feed_eof().is_none() && r.feed_eof().is_none());
}

#[test]
fn feed_takes_a_whole_large_frame_at_once() {
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    i.write(&[7u8; 20_000]).unwrap();
    i.flush().unwrap();
    let wire = i.pending_output().to_vec();
    assert_eq!(r.feed(&wire), wire.len());
    let mut buf = vec![0u8; 30_000];
    assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Data(20_000));
}

#[test]
fn seal_raw_refuses_oversize_plaintext_and_keeps_the_session() {
    // Found while building the `transport` fuzz target: an oversize
    // plaintext used to panic in put_len. Now it is refused up front, and
    // the session goes on with its nonce untouched.
    let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
    let max = capnp_noise::wire::MAX_MESSAGE_LEN - capnp_noise::wire::TAG_LEN;
    assert!(matches!(
        i.seal_raw_for_tests(&vec![0; max + 1]),
        Err(Error::Misuse(_))
    ));
    let mut plain = vec![7u8; max - 1];
    plain.push(0); // DATA
    let wire = i.seal_raw_for_tests(&plain).unwrap();
    assert_eq!(wire.len(), 2 + capnp_noise::wire::MAX_MESSAGE_LEN);
    let mut off = 0;
    while off < wire.len() {
        off += r.feed(&wire[off..]); // the receive buffer grows to the announced frame
    }
    let mut buf = vec![0u8; 70_000];
    assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Data(max - 1));
}

/// A responder that requires admission: the initiator's first flight
/// (preamble and message 1) costs it no X25519 operation and no output until
/// it is admitted; then exactly three to answer and one for message 3.
#[test]
fn admission_defers_all_public_key_work_until_admit() {
    let (mut i, mut r) = deterministic_handshakes(
        Suite::AesGcmSha256,
        cfg(),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    r.require_admission();
    let flight1 = i.pending_output().to_vec();
    i.consume_output(flight1.len());
    let before = testing::x25519_operations_on_this_thread();
    // Byte by byte: nothing happens before the last byte of message 1.
    for b in &flight1 {
        assert!(!r.awaits_admission());
        assert_eq!(r.feed(std::slice::from_ref(b)).unwrap(), 1);
    }
    assert!(r.awaits_admission());
    assert!(r.pending_output().is_empty());
    assert_eq!(testing::x25519_operations_on_this_thread(), before);
    r.admit().unwrap();
    assert!(!r.awaits_admission());
    assert_eq!(testing::x25519_operations_on_this_thread(), before + 3);
    let msg2 = r.pending_output().to_vec();
    r.consume_output(msg2.len());
    assert_eq!(i.feed(&msg2).unwrap(), msg2.len());
    let msg3 = i.pending_output().to_vec();
    i.consume_output(msg3.len());
    let at_msg3 = testing::x25519_operations_on_this_thread();
    r.feed(&msg3).unwrap();
    assert_eq!(testing::x25519_operations_on_this_thread(), at_msg3 + 1);
    assert!(r.is_finished() && i.is_finished());
    assert_eq!(
        r.peer_vat_id(),
        Some(testing::initiator_identity().vat_id())
    );
    // The admitted handshake produces working sessions.
    let (mut si, mut sr) = (i.into_session().unwrap(), r.into_session().unwrap());
    si.write(b"admitted").unwrap();
    si.flush().unwrap();
    let (got, _) = transfer(&mut si, &mut sr, usize::MAX).unwrap();
    assert_eq!(got, b"admitted");
}

/// Bytes after message 1 wait for admission: the outcome is the same as
/// without admission (here: the junk fails as message 3).
#[test]
fn bytes_after_message_1_wait_for_admission_with_the_same_outcome() {
    let pair = || {
        deterministic_handshakes(
            Suite::ChaChaPolyBlake2s,
            cfg(),
            Arc::new(AnyVat),
            Arc::new(AnyVat),
        )
        .unwrap()
    };
    let (i, mut plain) = pair();
    let flight = i.pending_output().to_vec();
    let mut wire = flight.clone();
    wire.extend_from_slice(&[0, 64]);
    wire.extend_from_slice(&[7u8; 64]);
    let without = plain.feed(&wire).unwrap_err();

    let (_, mut admitted) = pair();
    admitted.require_admission();
    let before = testing::x25519_operations_on_this_thread();
    assert_eq!(admitted.feed(&wire).unwrap(), flight.len());
    assert!(admitted.awaits_admission());
    assert_eq!(
        admitted.feed(&wire[flight.len()..]).unwrap(),
        0,
        "nothing more before admit"
    );
    assert_eq!(testing::x25519_operations_on_this_thread(), before);
    admitted.admit().unwrap();
    let with = admitted.feed(&wire[flight.len()..]).unwrap_err();
    assert_eq!(with.to_string(), without.to_string());
    assert!(matches!(with, Error::Decrypt { .. }), "{with}");
}

#[test]
fn admit_outside_admission_is_a_config_error_and_preamble_alone_costs_nothing() {
    let (i, mut r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        cfg(),
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .unwrap();
    assert!(matches!(r.admit(), Err(Error::Misuse(_))));
    // Without admission: a peer that stops after the preamble, or after a
    // partial message 1, has cost no X25519 work.
    let flight = i.pending_output().to_vec();
    let before = testing::x25519_operations_on_this_thread();
    r.feed(&flight[..flight.len() - 1]).unwrap();
    assert_eq!(testing::x25519_operations_on_this_thread(), before);
    let e = r.feed_eof().unwrap();
    assert!(e.to_string().contains("message 1"), "{e}");
}

/// A low-order X25519 key is a protocol violation, named as such, not a
/// malformed payload (SPEC.md 8.2): an all-zero ephemeral in message 1 at
/// the responder, and in message 2 at the initiator, which then sends no
/// message 3.
#[test]
fn low_order_ephemeral_keys_are_protocol_violations() {
    let suite = Suite::ChaChaPolyBlake2s;
    let (mut i, mut r) =
        deterministic_handshakes(suite, cfg(), Arc::new(AnyVat), Arc::new(AnyVat)).unwrap();
    let mut first = capnp_noise::wire::preamble::encode(suite);
    first.extend_from_slice(&[0, 32]);
    first.extend_from_slice(&[0; 32]);
    let mut msg2 = vec![0, 200];
    msg2.extend_from_slice(&[0; 200]);
    let n = i.pending_output().len();
    i.consume_output(n);
    for (side, input, during, next) in [
        (&mut r, first, "handshake message 1", "message 2"),
        (&mut i, msg2, "handshake message 2", "message 3"),
    ] {
        let e = side.feed(&input).unwrap_err();
        assert!(
            matches!(&e, Error::Protocol(ProtocolError::LowOrderKey(d)) if *d == during),
            "{e:?}"
        );
        assert!(e.to_string().contains("low-order"), "{e}");
        assert!(side.pending_output().is_empty(), "no {next}");
    }
}

/// SPEC.md 7.2: a receiver stops reading the peer's direction at its CLOSE.
/// What follows (here garbage, and a zero length that would be a protocol
/// error if it were parsed) is ignored, whether it arrives with the CLOSE
/// or after the receiver has seen it: the end is clean either way.
#[test]
fn bytes_after_close_are_ignored_however_they_arrive() {
    let after: Vec<u8> = [&[0u8, 20][..], &[7; 20], &[0, 0]].concat();
    for together in [true, false] {
        let (mut i, mut r) = session_pair(Suite::ChaChaPolyBlake2s, cfg()).unwrap();
        i.write(b"before").unwrap();
        i.close().unwrap();
        let mut wire = i.pending_output().to_vec();
        if together {
            wire.extend_from_slice(&after);
        }
        assert_eq!(r.feed(&wire), wire.len());
        let mut buf = [0u8; 64];
        assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Data(6));
        assert_eq!(
            r.read(&mut buf).unwrap(),
            ReadOutcome::Closed,
            "together: {together}"
        );
        assert_eq!(r.feed(&after), after.len(), "taken and dropped");
        r.feed_eof();
        assert_eq!(r.read(&mut buf).unwrap(), ReadOutcome::Closed);
        assert_eq!(r.buffered_ciphertext(), 0);
    }
}

/// SPEC.md 2: the retry with the mandatory suite is due exactly after a
/// silent close (the stream ended after message 1, before any byte of
/// message 2), when the suite proposed was another and the initiator
/// accepts the mandatory one; the retry proposes only the mandatory suite,
/// so it is never retried again.
#[test]
fn fallback_to_the_mandatory_suite_only_after_a_silent_close() {
    use capnp_noise::wire::EOF_BEFORE_MESSAGE_2;
    let (aes, chacha) = (Suite::AesGcmSha256, Suite::ChaChaPolyBlake2s);
    assert_eq!(Suite::MANDATORY, chacha);
    let eof_after_message_1 = |config: &HandshakeConfig, msg2_bytes: usize| {
        let (mut i, mut r) =
            deterministic_handshakes(config.suites[0], cfg(), Arc::new(AnyVat), Arc::new(AnyVat))
                .unwrap();
        let first = i.pending_output().to_vec();
        i.consume_output(first.len());
        r.feed(&first).unwrap();
        i.feed(&r.pending_output()[..msg2_bytes]).unwrap();
        i.feed_eof().unwrap()
    };
    let preferring_aes = HandshakeConfig::default().with_suites(vec![aes, chacha]);
    let silent = eof_after_message_1(&preferring_aes, 0);
    assert!(
        matches!(&silent, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2),
        "{silent}"
    );
    let retry = preferring_aes.fallback_after(&silent).expect("a retry");
    assert_eq!(retry.suites, vec![Suite::MANDATORY]);
    assert!(retry.fallback_after(&silent).is_none(), "only once");

    let no_retry = [
        // Only AES-GCM accepted: the initiator would not take the mandatory suite.
        (HandshakeConfig::with_suite(aes), silent.clone()),
        // The mandatory suite was already proposed.
        (
            HandshakeConfig::default().with_suites(vec![chacha, aes]),
            silent.clone(),
        ),
        // Part of message 2 came: the responder accepted the suite.
        (
            preferring_aes.clone(),
            eof_after_message_1(&preferring_aes, 1),
        ),
        // A timeout is not a close; nor is anything else.
        (
            preferring_aes.clone(),
            Error::HandshakeTimeout(std::time::Duration::from_secs(10)),
        ),
        (
            preferring_aes.clone(),
            Error::Decrypt {
                during: "handshake message 2",
            },
        ),
    ];
    for (config, error) in no_retry {
        assert!(
            config.fallback_after(&error).is_none(),
            "{:?} after {error}",
            config.suites
        );
    }
}

#[test]
fn a_large_write_is_sealed_without_a_copy_several_frames_at_once() {
    use capnp_noise::wire::{BULK_FRAMES, DIRECT_WRITE, MAX_DATA_PER_FRAME};
    let (mut i, mut r) = session_pair(Suite::AesGcmSha256, cfg()).unwrap();
    // 100 000 bytes (not a multiple of a frame): two frames of 50 000, both
    // sealed from the caller's buffer; nothing is left to copy into the
    // frame being built.
    let data: Vec<u8> = (0..100_000u32).map(|x| (x * 13) as u8).collect();
    assert_eq!(i.write(&data).unwrap(), data.len());
    assert_eq!(i.buffered_plaintext(), 0, "bytes were copied, not sealed");
    let frame_overhead = 2 + 1 + 16; // length, type byte, tag
    assert_eq!(i.pending_output().len(), data.len() + 2 * frame_overhead);
    // A write of many frames' worth is taken BULK_FRAMES frames at a time,
    // all sealed ahead for one write to the socket.
    let (got, _) = transfer(&mut i, &mut r, usize::MAX).unwrap();
    assert_eq!(got, data);
    let many = vec![9u8; 10 * MAX_DATA_PER_FRAME];
    let taken = i.write(&many).unwrap();
    assert_eq!(taken, BULK_FRAMES * MAX_DATA_PER_FRAME);
    assert_eq!(i.buffered_plaintext(), 0);
    assert_eq!(
        i.pending_output().len(),
        BULK_FRAMES * (MAX_DATA_PER_FRAME + frame_overhead)
    );
    // Below DIRECT_WRITE, bytes are gathered as before.
    let (_, _) = transfer(&mut i, &mut r, usize::MAX).unwrap();
    assert_eq!(
        i.write(&many[..DIRECT_WRITE - 1]).unwrap(),
        DIRECT_WRITE - 1
    );
    assert_eq!(i.buffered_plaintext(), DIRECT_WRITE - 1);
    assert!(i.pending_output().is_empty());
}
