//! Targets for `capnp-noise decode`'s inputs: the key log line parser
//! ([`keylog_line`]) and the decoder over a capture or raw streams with a
//! key log ([`decode`]).
//!
//! `decode`'s input is `key log length (u16 BE) || key log || mode ||
//! rest`: mode bit 0 clear, `rest` is a capture file; set, `rest` is two
//! raw streams, the initiator's first, split where the next two bytes
//! (u16 BE) say. Seeds hold a recorded session with fixed keys and its
//! key log, so mutations reach the decryption of payloads and frames.
//! Besides "no panic" it checks that the output stays proportional to the
//! input (bounded work and memory on a hostile capture).

use std::sync::Arc;

use super::Seed;
use crate::capture::{pcap, record, Flow, KeyLogLines};
use crate::fixtures::{deterministic_handshakes, initiator_identity, responder_identity};
use capnp_noise::keylog::{format_line, parse_line, MAX_LINE_LEN};
use capnp_noise::policy::AnyVat;
use capnp_noise::wire::{HandshakeConfig, SessionConfig, Suite};
use capnp_noise_tunnel::decode::capture::{read_capture, Limits};
use capnp_noise_tunnel::decode::{decode_connection, Connection, KeyTable};

/// One key log line: a line that parses formats back to itself (lowercase
/// hex); an error is a short fixed phrase, never the line.
pub fn keylog_line(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_line(text) {
        Ok(None) => {}
        Ok(Some(line)) => {
            let again = format_line(line.label, &line.initiator_ephemeral, &line.secret[..]);
            let back = parse_line(&again)
                .expect("a formatted line parses")
                .expect("not a comment");
            assert_eq!(back, line);
            assert!(text.len() <= MAX_LINE_LEN);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(e.starts_with("key log line") && e.len() < 80, "{e}");
        }
    }
}

/// Limits small enough that a fuzz input reaches them.
const LIMITS: Limits = Limits {
    per_stream: 1 << 16,
    total: 1 << 18,
    connections: 16,
    out_of_order: 8,
};

/// The decoder over a capture or two raw streams, with a key log.
pub fn decode(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (log, rest) = rest.split_at(len);
    let (table, _) = KeyTable::parse(&String::from_utf8_lossy(log));
    let Some((&mode, rest)) = rest.split_first() else {
        return;
    };
    let connections = if mode & 1 == 0 {
        read_capture(rest, &[], LIMITS)
            .map(|c| c.connections)
            .unwrap_or_default()
    } else {
        let Some((at, rest)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let at = usize::from(u16::from_be_bytes(*at)).min(rest.len());
        let (i, r) = rest.split_at(at);
        vec![Connection::from_streams(
            "fuzz".into(),
            i.to_vec(),
            r.to_vec(),
        )]
    };
    for conn in &connections {
        let mut out = String::new();
        decode_connection(conn, Some(&table), &mut out);
        assert!(
            out.len() <= 16 * data.len() + 4096,
            "{} bytes of output for {} of input",
            out.len(),
            data.len()
        );
    }
}

/// Inputs of [`decode`] and [`keylog_line`]: a recorded session with fixed
/// keys as a capture and as raw streams, with its key log.
pub(super) fn seeds() -> Vec<Seed> {
    let log = Arc::new(KeyLogLines::default());
    let config = HandshakeConfig::default()
        .with_key_log(Some(log.clone()))
        .with_session(SessionConfig::default().with_rekey_interval(2));
    let (i, r) = deterministic_handshakes(
        Suite::ChaChaPolyBlake2s,
        config,
        Arc::new(AnyVat),
        Arc::new(AnyVat),
    )
    .expect("handshakes");
    let rec = record(i, r, initiator_identity(), responder_identity());
    let lines = log.lines();
    let mut seeds: Vec<Seed> = lines
        .iter()
        .take(5)
        .enumerate()
        .map(|(n, l)| Seed::new("keylog_line", format!("line-{n}"), l.clone().into_bytes()))
        .collect();
    seeds.push(Seed::new("keylog_line", "comment", b"# comment\n".to_vec()));
    let keylog = lines[..5].join("\n").into_bytes();
    let with_log = |mode: u8, rest: &[u8]| {
        let mut v = (keylog.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(&keylog);
        v.push(mode);
        v.extend_from_slice(rest);
        v
    };
    let flow = Flow {
        client_port: 40000,
        server_port: 7000,
        i2r: &rec.i2r,
        r2i: &rec.r2i,
        drop_i2r_segment: None,
    };
    let capture = pcap(&[flow], 500);
    seeds.push(Seed::new("decode", "pcap-session", with_log(0, &capture)));
    let gap = pcap(
        &[Flow {
            drop_i2r_segment: Some(1),
            ..flow
        }],
        300,
    );
    seeds.push(Seed::new("decode", "pcap-gap", with_log(0, &gap)));
    let mut raw = (rec.i2r.len() as u16).to_be_bytes().to_vec();
    raw.extend_from_slice(&rec.i2r);
    raw.extend_from_slice(&rec.r2i);
    seeds.push(Seed::new("decode", "raw-session", with_log(1, &raw)));
    seeds
}
