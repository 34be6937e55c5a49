//! `capnp-noise decode` on captures the tests make themselves: pcap files
//! written from sessions recorded in memory (with gaps, truncations and
//! wrong keys put in on purpose), raw streams, and a real loopback session
//! captured by tcpdump.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use capnp_noise::wire::{HandshakeConfig, Suite};
use capnp_noise_test::capture::{pcap, pcapng, record_session, Flow, KeyLogLines, Recorded};

fn decode(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_capnp-noise"))
        .arg("decode")
        .args(args)
        .output()
        .expect("capnp-noise runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "decode failed: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn flow(client_port: u16, rec: &Recorded, drop_i2r_segment: Option<usize>) -> Flow<'_> {
    Flow {
        client_port,
        server_port: 7000,
        i2r: &rec.i2r,
        r2i: &rec.r2i,
        drop_i2r_segment,
    }
}

/// The decoder's output, one part per connection.
fn connections(out: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for line in out.lines() {
        if line.starts_with("connection ") {
            parts.push(String::new());
        }
        if let Some(part) = parts.last_mut() {
            part.push_str(line);
            part.push('\n');
        }
    }
    parts
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A session whose responder logs its keys: the recording and the lines.
fn logged_session(suite: Suite) -> (Recorded, Vec<String>) {
    let log = Arc::new(KeyLogLines::default());
    let rec = record_session(
        suite,
        HandshakeConfig::default(),
        HandshakeConfig::default().with_key_log(Some(log.clone())),
    );
    (rec, log.lines())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_string()
}

/// The DATA bytes the decoder printed for one direction (`->` or `<-`) of
/// the connection that starts at `from` in the output.
fn data_bytes(output: &str, arrow: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for line in output.lines() {
        let line = line.trim_start();
        if line.starts_with(arrow) && line.contains(": DATA ") {
            let hex = line.rsplit(": ").next().unwrap();
            bytes.extend(hex::decode(hex).unwrap_or_else(|_| panic!("hex in {line}")));
        }
    }
    bytes
}

/// Checks a fully decoded connection in `out`: every handshake message,
/// both VatIds with valid signatures, the handshake hash, the DATA the
/// session sent both ways, rekeys and the CLOSEs.
fn assert_decoded(out: &str, rec: &Recorded, suite: Suite) {
    for needle in [
        format!(
            "-> preamble: 47 bytes, version 1, suite {}",
            suite.noise_name()
        )
        .replace("47", &(13 + suite.noise_name().len()).to_string()),
        "-> handshake message 1: 32 bytes, initiator ephemeral key".into(),
        "<- handshake message 2: 232 bytes".into(),
        "-> handshake message 3: 200 bytes".into(),
        format!(
            "responder VatId {}, signature valid",
            rec.responder.vat_id()
        ),
        format!(
            "initiator VatId {}, signature valid",
            rec.initiator.vat_id()
        ),
        format!("handshake hash {}", hex(&rec.handshake_hash)),
        "-> frame 0 (key 0, #0 under it): DATA 100 bytes".into(),
        ": REKEY (key 1 from the next frame)".into(),
        "CLOSE".into(),
    ] {
        assert!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    assert_eq!(data_bytes(out, "->"), rec.sent_i2r, "initiator's DATA");
    assert_eq!(data_bytes(out, "<-"), rec.sent_r2i, "responder's DATA");
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("<-") && l.contains("REKEY")));
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("->") && l.contains("CLOSE")));
    assert!(out
        .lines()
        .any(|l| l.trim_start().starts_with("<-") && l.contains("CLOSE")));
}

/// A capture written from a recorded session, decoded with the key log:
/// both suites, pcap and pcapng, segments of several sizes (frames split
/// across segments).
#[test]
fn capture_with_key_log_shows_identities_and_data() {
    let dir = tempfile::tempdir().unwrap();
    type Writer = fn(&[Flow<'_>], usize) -> Vec<u8>;
    let cases: [(Suite, usize, Writer); 3] = [
        (Suite::ChaChaPolyBlake2s, 1460, pcap),
        (Suite::AesGcmSha256, 7, pcap),
        (Suite::AesGcmSha256, 500, pcapng),
    ];
    for (suite, segment, writer) in cases {
        let (rec, lines) = logged_session(suite);
        let capture = writer(&[flow(40000, &rec, None)], segment);
        let cap = write(dir.path(), "s.pcap", &capture);
        let keys = write(dir.path(), "keys.log", (lines.join("\n") + "\n").as_bytes());
        let out = decode(&["--keylog", &keys, &cap]);
        assert!(
            out.contains("connection 10.0.0.1:40000 -> 10.0.0.2:7000"),
            "{out}"
        );
        assert_decoded(&out, &rec, suite);
    }
}

/// Without a key log: what is in clear, and no identity.
#[test]
fn capture_without_key_log_shows_what_is_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, _) = logged_session(Suite::MANDATORY);
    let cap = write(
        dir.path(),
        "s.pcap",
        &pcap(&[flow(40001, &rec, None)], 1000),
    );
    let out = decode(&[&cap]);
    assert!(out.contains("-> handshake message 3: 200 bytes"), "{out}");
    assert!(out.contains("-> frame 0: 117 bytes (encrypted)"), "{out}");
    assert!(!out.contains("VatId") && !out.contains("DATA"), "{out}");
    // A key log for other sessions: the same, and it says so.
    let (_, other) = logged_session(Suite::MANDATORY);
    let keys = write(dir.path(), "other.log", other.join("\n").as_bytes());
    let with_other = decode(&["--keylog", &keys, &cap]);
    assert!(
        with_other.contains("(the key log has no line for this connection: frames stay encrypted)"),
        "{with_other}"
    );
    assert!(with_other.contains("-> frame 0: 117 bytes (encrypted)"));
}

/// Raw streams, one file per direction, decode like a capture.
#[test]
fn raw_streams_decode() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, lines) = logged_session(Suite::MANDATORY);
    let i = write(dir.path(), "i2r.bin", &rec.i2r);
    let r = write(dir.path(), "r2i.bin", &rec.r2i);
    let keys = write(dir.path(), "keys.log", lines.join("\n").as_bytes());
    let out = decode(&["--keylog", &keys, "--initiator", &i, "--responder", &r]);
    assert_decoded(&out, &rec, Suite::MANDATORY);
}

/// Three connections: the first with a wrong handshake key, the second
/// with a wrong traffic key and a gap in its initiator's stream, the third
/// intact. Each problem is named, and the next connection decodes.
#[test]
fn wrong_keys_and_gaps_are_reported_and_decoding_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (a, mut la) = logged_session(Suite::MANDATORY);
    let (b, mut lb) = logged_session(Suite::MANDATORY);
    let (c, lc) = logged_session(Suite::MANDATORY);
    // Corrupt one key of a line: its last hex digit.
    let corrupt = |lines: &mut Vec<String>, label: &str| {
        let line = lines.iter_mut().find(|l| l.starts_with(label)).unwrap();
        let last = if line.ends_with('0') { '1' } else { '0' };
        line.pop();
        line.push(last);
    };
    corrupt(&mut la, "HANDSHAKE_KEY_EE");
    corrupt(&mut lb, "INITIATOR_TRAFFIC_KEY");
    let keys: Vec<String> = [la, lb, lc.clone()].concat();
    let keys = write(dir.path(), "keys.log", keys.join("\n").as_bytes());

    let flows = [
        flow(40010, &a, None),
        flow(40011, &b, None),
        flow(40012, &c, None),
    ];
    let cap = write(dir.path(), "s.pcap", &pcap(&flows, 200));
    let out = decode(&["--keylog", &keys, &cap]);
    let parts = connections(&out);
    assert_eq!(parts.len(), 3, "{out}");
    assert!(
        parts[0].contains("wrong key: HANDSHAKE_KEY_EE from the key log does not decrypt the responder's static key"),
        "{}",
        parts[0]
    );
    assert!(!parts[0].contains("VatId") && parts[0].contains("(encrypted)"));
    assert!(
        parts[1].contains("wrong key: does not decrypt under INITIATOR_TRAFFIC_KEY"),
        "{}",
        parts[1]
    );
    // The responder's direction of the same connection still decodes.
    assert_eq!(data_bytes(&parts[1], "<-"), b.sent_r2i);
    assert_decoded(&parts[2], &c, Suite::MANDATORY);

    // A gap: the initiator's 4th segment (in its transport frames) is missing.
    let flows = [flow(40020, &a, Some(3)), flow(40021, &c, None)];
    let cap = write(dir.path(), "gap.pcap", &pcap(&flows, 200));
    let keys_c = write(dir.path(), "c.log", lc.join("\n").as_bytes());
    let out = decode(&["--keylog", &keys_c, &cap]);
    let parts = connections(&out);
    assert_eq!(parts.len(), 2, "{out}");
    assert!(
        parts[0].contains(
            "gap in the TCP stream: 200 byte(s) after stream byte 600 are missing from the capture"
        ),
        "{}",
        parts[0]
    );
    assert_decoded(&parts[1], &c, Suite::MANDATORY);
}

/// A capture cut in the middle of a record: what precedes is decoded,
/// the truncation is named, and the cut connection is reported as cut.
#[test]
fn truncated_capture_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (a, la) = logged_session(Suite::MANDATORY);
    let (b, lb) = logged_session(Suite::MANDATORY);
    let flows = [flow(40030, &a, None), flow(40031, &b, None)];
    let mut capture = pcap(&flows, 300);
    capture.truncate(capture.len() - 150);
    let cap = write(dir.path(), "cut.pcap", &capture);
    let keys = write(
        dir.path(),
        "keys.log",
        [la, lb].concat().join("\n").as_bytes(),
    );
    let out = decode(&["--keylog", &keys, &cap]);
    assert!(
        out.contains("capture: the capture is truncated: it ends in the middle of a packet record"),
        "{out}"
    );
    let parts = connections(&out);
    assert_eq!(parts.len(), 2, "{out}");
    assert_decoded(&parts[0], &a, Suite::MANDATORY);
    // The second connection's responder stream lost its end: no CLOSE, a
    // truncated frame or a clean cut between frames.
    assert!(parts[1].contains(&format!("initiator VatId {}", b.initiator.vat_id())));
    assert!(!parts[1]
        .lines()
        .any(|l| l.trim_start().starts_with("<-") && l.contains("CLOSE")));

    // Not a capture at all: a clear error, exit status 1.
    let junk = write(dir.path(), "junk", b"this is not a capture file");
    let out = Command::new(env!("CARGO_BIN_EXE_capnp-noise"))
        .args(["decode", &junk])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a pcap or pcapng capture"));
}

/// The decoder's memory bounds hold on a capture that would exceed them:
/// a stream longer than the per-stream limit, out-of-order segments
/// beyond the limit (a gap early in a long stream), more connections than
/// followed, and a total budget shared by all.
#[test]
fn memory_limits_stop_a_stream_and_say_so() {
    use capnp_noise_tunnel::decode::capture::{read_capture, Limits};
    let (rec, _) = logged_session(Suite::MANDATORY);
    let capture = pcap(&[flow(40040, &rec, None), flow(40041, &rec, Some(0))], 10);
    let limits = Limits {
        per_stream: 100,
        total: 1 << 20,
        connections: 1,
        out_of_order: 4,
    };
    let got = read_capture(&capture[..], &[], limits).unwrap();
    assert_eq!(got.connections.len(), 1);
    assert!(got
        .notes
        .iter()
        .any(|n| n.contains("more than 1 connections")));
    let c = &got.connections[0];
    assert_eq!(c.initiator.bytes.len(), 100);
    assert!(c
        .initiator
        .problem
        .as_deref()
        .unwrap()
        .contains("memory limit"));

    let limits = Limits {
        connections: 2,
        per_stream: 1 << 20,
        ..limits
    };
    let got = read_capture(&capture[..], &[], limits).unwrap();
    let c = &got.connections[1];
    assert!(c.initiator.bytes.is_empty());
    let problem = c.initiator.problem.as_deref().unwrap();
    assert!(
        problem.contains("too many out-of-order segments"),
        "{problem}"
    );

    // The total budget: the first connection takes it all.
    let limits = Limits {
        total: 150,
        ..limits
    };
    let got = read_capture(&capture[..], &[], limits).unwrap();
    let kept: usize = got
        .connections
        .iter()
        .map(|c| c.initiator.bytes.len() + c.responder.bytes.len())
        .sum();
    assert!(kept <= 150, "{kept} bytes kept");
}
