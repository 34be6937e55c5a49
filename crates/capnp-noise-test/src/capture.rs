//! Recorded sessions and the captures made of them: the bytes each way of
//! a real in-memory session (key log tests, decoder tests, fuzz seeds), and
//! a pcap file written from byte streams (the decoder's tests and seeds).

use std::sync::{Arc, Mutex};

use capnp_noise::keylog::{self, KeyLog};
use capnp_noise::policy::{AnyVat, PeerContext};
use capnp_noise::wire::{Handshake, HandshakeConfig, ReadOutcome, Session, SessionConfig, Suite};
use capnp_noise::Identity;

/// A key log kept in memory, one formatted line per entry.
#[derive(Debug, Default)]
pub struct KeyLogLines(pub Mutex<Vec<String>>);

impl KeyLog for KeyLogLines {
    fn log(&self, label: &str, initiator_ephemeral: &[u8; 32], secret: &[u8]) {
        let line = keylog::format_line(label, initiator_ephemeral, secret);
        self.0.lock().expect("not poisoned").push(line);
    }
}

impl KeyLogLines {
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().expect("not poisoned").clone()
    }
}

/// A session recorded in memory: the bytes each way, and what the test knows.
pub struct Recorded {
    /// Everything the initiator sent (preamble, messages 1 and 3, frames).
    pub i2r: Vec<u8>,
    /// Everything the responder sent.
    pub r2i: Vec<u8>,
    /// The initiator's identity.
    pub initiator: Identity,
    /// The responder's identity.
    pub responder: Identity,
    /// The handshake hash both ends reported.
    pub handshake_hash: [u8; 32],
    /// The application bytes the initiator sent.
    pub sent_i2r: Vec<u8>,
    /// The application bytes the responder sent.
    pub sent_r2i: Vec<u8>,
}

fn pump(from: &mut Handshake, to: &mut Handshake, wire: &mut Vec<u8>) -> bool {
    let out = from.pending_output().to_vec();
    if out.is_empty() || !to.wants_read() {
        return false;
    }
    let n = to.feed(&out).expect("handshake step");
    wire.extend_from_slice(&out[..n]);
    from.consume_output(n);
    n > 0
}

fn pump_session(from: &mut Session, to: &mut Session, wire: &mut Vec<u8>) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 70_000];
    loop {
        while let ReadOutcome::Data(n) = to.read(&mut buf).expect("read") {
            got.extend_from_slice(&buf[..n]);
        }
        let out = from.pending_output().to_vec();
        if out.is_empty() {
            return got;
        }
        let n = to.feed(&out);
        wire.extend_from_slice(&out[..n]);
        from.consume_output(n);
    }
}

/// Runs a session in memory between two fresh identities, each end with
/// its config (restricted to `suite`): a handshake, five rounds of data
/// both ways with a rekey every 2 frames (and one asked for), then CLOSE
/// both ways. Panics if anything fails or a byte is lost.
pub fn record_session(
    suite: Suite,
    i_config: HandshakeConfig,
    r_config: HandshakeConfig,
) -> Recorded {
    let initiator = Identity::generate();
    let responder = Identity::generate();
    let session = SessionConfig::default().with_rekey_interval(2);
    let i = Handshake::initiator(
        &initiator,
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        i_config
            .with_suites(vec![suite])
            .with_session(session.clone()),
    )
    .expect("initiator");
    let r = Handshake::responder(
        &responder,
        Arc::new(AnyVat),
        PeerContext::responder(None),
        r_config.with_suites(vec![suite]).with_session(session),
    )
    .expect("responder");
    record(i, r, initiator, responder)
}

/// Runs the handshakes `i` and `r` (of `initiator` and `responder`) and
/// the session of [`record_session`] in memory; with handshakes of fixed
/// ephemerals (`fixtures::deterministic_handshakes`) every byte is
/// reproducible.
pub fn record(
    mut i: Handshake,
    mut r: Handshake,
    initiator: Identity,
    responder: Identity,
) -> Recorded {
    let (mut i2r, mut r2i) = (Vec::new(), Vec::new());
    while pump(&mut i, &mut r, &mut i2r) | pump(&mut r, &mut i, &mut r2i) {}
    assert!(i.is_finished() && r.is_finished());
    let (mut i, mut r) = (
        i.into_session().expect("session"),
        r.into_session().expect("session"),
    );
    assert_eq!(i.handshake_hash(), r.handshake_hash());
    let handshake_hash = *i.handshake_hash();
    let (mut sent_i2r, mut sent_r2i) = (Vec::new(), Vec::new());
    let (mut got_i2r, mut got_r2i) = (Vec::new(), Vec::new());
    for round in 0u8..5 {
        let a = vec![round; 100 + usize::from(round)];
        let b = format!("reply {round}").into_bytes();
        assert_eq!(i.write(&a).expect("write"), a.len());
        assert_eq!(r.write(&b).expect("write"), b.len());
        i.flush().expect("flush");
        r.flush().expect("flush");
        if round == 2 {
            i.rekey().expect("rekey");
        }
        sent_i2r.extend_from_slice(&a);
        sent_r2i.extend_from_slice(&b);
        got_i2r.extend(pump_session(&mut i, &mut r, &mut i2r));
        got_r2i.extend(pump_session(&mut r, &mut i, &mut r2i));
    }
    i.close().expect("close");
    r.close().expect("close");
    pump_session(&mut i, &mut r, &mut i2r);
    pump_session(&mut r, &mut i, &mut r2i);
    assert_eq!(got_i2r, sent_i2r);
    assert_eq!(got_r2i, sent_r2i);
    Recorded {
        i2r,
        r2i,
        initiator,
        responder,
        handshake_hash,
        sent_i2r,
        sent_r2i,
    }
}

/// One TCP connection to write into a capture.
#[derive(Debug, Clone, Copy)]
pub struct Flow<'a> {
    /// The initiator's port (address [`crate::pcap::CLIENT_ADDR`]).
    pub client_port: u16,
    /// The responder's port (address [`crate::pcap::SERVER_ADDR`]).
    pub server_port: u16,
    /// The initiator's bytes.
    pub i2r: &'a [u8],
    /// The responder's bytes.
    pub r2i: &'a [u8],
    /// Leave this segment (by index) of the initiator's bytes out: a gap.
    pub drop_i2r_segment: Option<usize>,
}

/// A pcap file of `flows`, one after the other (written by
/// [`crate::pcap::Capture`]): each a three-way handshake, the initiator's
/// bytes in `segment`-byte segments, the responder's, then a FIN each way.
pub fn pcap(flows: &[Flow<'_>], segment: usize) -> Vec<u8> {
    let mut cap = crate::pcap::Capture::new();
    for f in flows {
        let c = cap.connect(f.client_port, f.server_port);
        for (from_client, bytes, drop) in [(true, f.i2r, f.drop_i2r_segment), (false, f.r2i, None)]
        {
            for (n, chunk) in bytes.chunks(segment.max(1)).enumerate() {
                if Some(n) == drop {
                    cap.skip(c, from_client, chunk.len());
                } else {
                    cap.send(c, from_client, chunk);
                }
            }
        }
        cap.fin(c, true);
        cap.fin(c, false);
    }
    cap.bytes().to_vec()
}

fn u32s(out: &mut Vec<u8>, fields: &[u32]) {
    for f in fields {
        out.extend_from_slice(&f.to_le_bytes());
    }
}

/// The same packets as [`pcap`], as a pcapng file: a section header, one
/// Ethernet interface, one enhanced packet block per packet.
pub fn pcapng(flows: &[Flow<'_>], segment: usize) -> Vec<u8> {
    let classic = pcap(flows, segment);
    let mut out = Vec::new();
    // Section header: type, length, byte-order magic, version 1.0,
    // section length unknown (-1), length.
    u32s(
        &mut out,
        &[0x0A0D_0D0A, 28, 0x1A2B_3C4D, 1, u32::MAX, u32::MAX, 28],
    );
    // Interface: type, length, link type 1 + reserved, snap length, length.
    u32s(&mut out, &[1, 20, 1, 262_144, 20]);
    // The classic file: a 24-byte header, then per packet 16 bytes
    // (seconds, microseconds, captured and original lengths) and the packet.
    let mut rest = &classic[24..];
    while rest.len() >= 16 {
        let field = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
        let (secs, micros, len) = (field(0), field(4), field(8) as usize);
        let packet = &rest[16..16 + len];
        let stamp = u64::from(secs) * 1_000_000 + u64::from(micros);
        let padded = len.div_ceil(4) * 4;
        let block = (32 + padded) as u32;
        // Type, length, interface 0, timestamp (high, low), lengths.
        u32s(
            &mut out,
            &[
                6,
                block,
                0,
                (stamp >> 32) as u32,
                stamp as u32,
                len as u32,
                len as u32,
            ],
        );
        out.extend_from_slice(packet);
        out.resize(out.len() + padded - len, 0);
        u32s(&mut out, &[block]);
        rest = &rest[16 + len..];
    }
    out
}
