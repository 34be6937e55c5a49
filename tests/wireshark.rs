//! The Wireshark dissector (`contrib/wireshark/capnp-noise.lua`) under
//! tshark, on captures of real sessions:
//!
//! * a loopback capture by `tcpdump` of two live sessions (both suites) of
//!   this library's `stream::connect` / `stream::accept`;
//! * a synthetic capture (`capnp_noise_test::pcap`) of real session bytes,
//!   cut into TCP segments at chosen points: several messages in one
//!   segment, messages split over segments (inside the length prefix too),
//!   a maximal frame over many segments; plus the failures SPEC.md names
//!   (a foreign preamble, bad versions, name lengths and name bytes, lengths
//!   outside SPEC 4's bounds, early bytes, a silent close, a refused
//!   responder, a truncation);
//! * a synthetic capture of random connections (random framing, bytes,
//!   segmentation and ends), where nothing may fail in Lua and a second
//!   pass (`tshark -2`, as the GUI revisits packets) must show what the
//!   first showed.
//!
//! Each test knows what its sessions sent (the SPEC sizes: message 1 is 32
//! bytes, message 2 `96 + payload`, message 3 `64 + payload`, a frame
//! `17 + body`; the bytes the library wrote are checked against them) and
//! asserts that tshark names every message, in order, with its exact
//! length, and numbers each direction's frames 1, 2, 3...
//!
//! Needs `tshark` (and for the loopback test `tcpdump`, run as root): the
//! tests fail under CI (`.ci/run` installs both) and skip loudly elsewhere.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_noise::policy::{AnyVat, PeerContext};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::wire::{Handshake, HandshakeConfig, Session, Suite};
use capnp_noise::Identity;
use capnp_noise_test::fixtures::transfer;
use capnp_noise_test::pcap::Capture;
use capnp_noise_test::peers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DISSECTOR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/contrib/wireshark/capnp-noise.lua"
);

/// SPEC 5.3: the canonical handshake payload is 136 bytes (16 words and
/// the 8-byte segment table).
const PAYLOAD: usize = 136;
/// SPEC 6: message sizes; SPEC 7.1: a frame is its body, a type byte and a tag.
const MSG1: usize = 32;
const MSG2: usize = 32 + (32 + 16) + (PAYLOAD + 16);
const MSG3: usize = (32 + 16) + (PAYLOAD + 16);
fn frame_len(body: usize) -> usize {
    body + 1 + 16
}

fn tshark_usable() -> bool {
    peers::usable("tshark", peers::runs("tshark", &["--version"]))
}

/// What tshark said about one TCP stream: per message, "ROLE WHAT LEN"
/// ("I Preamble Noise_XX_...", "R Handshake msg 2 232", "I Transport frame
/// 65535", "I Unread bytes"), the frame numbers per role, and every expert
/// message and Info column of the stream.
#[derive(Debug, Default)]
struct Seen {
    pdus: Vec<String>,
    frame_numbers: BTreeMap<char, Vec<u32>>,
    experts: Vec<String>,
    info: Vec<String>,
    /// How each side's byte stream ended, in order.
    ends: Vec<String>,
}

impl Seen {
    fn expert(&self, needle: &str) -> bool {
        self.experts.iter().any(|e| e.contains(needle))
    }
}

const FIELDS: &[&str] = &[
    "tcp.stream",
    "capnp_noise.role",
    "capnp_noise.pdu",
    "capnp_noise.preamble.name",
    "capnp_noise.handshake.len",
    "capnp_noise.frame.len",
    "capnp_noise.frame.number",
    "_ws.expert.message",
    "_ws.col.Info",
    "capnp_noise.end",
];

/// Runs tshark with the dissector over `file` with `options`, printing
/// `fields` per packet (tab-separated, every occurrence, joined by `|`).
/// Fails on a Lua error, which tshark reports on stderr, not by its status.
fn tshark(file: &Path, options: &[&str], fields: &[&str]) -> String {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(file)
        .arg("-X")
        .arg(format!("lua_script:{DISSECTOR}"))
        .args(options)
        .args(["-T", "fields", "-E", "separator=/t", "-E", "occurrence=a"])
        .args(["-E", "aggregator=|"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("tshark runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tshark failed: {stderr}");
    assert!(
        !stderr.contains("Lua") && !stderr.contains("lua"),
        "tshark reported a Lua error: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs tshark with the dissector over `file` and groups what it printed
/// by TCP stream.
fn dissect(file: &Path, options: &[&str]) -> BTreeMap<u32, Seen> {
    let out = tshark(file, options, FIELDS);
    let mut streams: BTreeMap<u32, Seen> = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            cols.len(),
            FIELDS.len(),
            "a line of tshark's output: {line:?}"
        );
        let list = |i: usize| -> Vec<&str> {
            if cols[i].is_empty() {
                Vec::new()
            } else {
                cols[i].split('|').collect()
            }
        };
        let Ok(stream) = cols[0].parse::<u32>() else {
            continue;
        };
        let seen = streams.entry(stream).or_default();
        // A Lua error while dissecting becomes an expert info.
        assert!(
            !cols[7].contains("Lua Error"),
            "the dissector failed: {line}"
        );
        seen.experts.extend(list(7).iter().map(|s| s.to_string()));
        seen.info.push(cols[8].to_owned());
        seen.ends.extend(list(9).iter().map(|s| s.to_string()));
        let (roles, kinds) = (list(1), list(2));
        let (mut names, mut hs_lens, mut fr_lens) = (
            list(3).into_iter(),
            list(4).into_iter(),
            list(5).into_iter(),
        );
        // Each message has a sender and a kind; the names and lengths of
        // those that have one come in the same order in their own lists.
        let initial = |role: &str| if role == "initiator" { 'I' } else { 'R' };
        for (role, kind) in roles.iter().zip(&kinds) {
            let r = initial(role);
            let what = match *kind {
                "Preamble" => format!("Preamble {}", names.next().unwrap_or("invalid")),
                k if k.starts_with("Handshake msg") => {
                    format!("{k} {}", hs_lens.next().expect("a handshake length"))
                }
                "Transport frame" => format!("{kind} {}", fr_lens.next().expect("a frame length")),
                k => k.to_owned(),
            };
            seen.pdus.push(format!("{r} {what}"));
        }
        if let Some(role) = roles.first() {
            seen.frame_numbers.entry(initial(role)).or_default().extend(
                list(6)
                    .iter()
                    .map(|n| n.parse::<u32>().expect("a frame number")),
            );
        }
    }
    streams
}

/// The values tshark shows for `fields` (one line per packet that
/// `filter` selects, every occurrence, separated by `|`), in order.
fn values(file: &Path, options: &[&str], filter: &str, fields: &[&str]) -> Vec<Vec<String>> {
    let options = [options, &["-Y", filter]].concat();
    let out = tshark(file, &options, fields);
    let mut columns = vec![Vec::new(); fields.len()];
    for line in out.lines() {
        for (column, value) in columns.iter_mut().zip(line.split('\t')) {
            column.extend(
                value
                    .split('|')
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    columns
}

/// The expected messages of a session: "I Preamble NAME", the handshake
/// messages with SPEC's sizes, then each side's frames.
fn expected(suite: Suite, i_frames: &[usize], r_frames: &[usize]) -> Vec<String> {
    let mut v = vec![
        format!("I Preamble {}", suite.noise_name()),
        format!("I Handshake msg 1 {MSG1}"),
        format!("R Handshake msg 2 {MSG2}"),
        format!("I Handshake msg 3 {MSG3}"),
    ];
    v.extend(i_frames.iter().map(|l| format!("I Transport frame {l}")));
    v.extend(r_frames.iter().map(|l| format!("R Transport frame {l}")));
    v
}

/// Sorts a stream's messages by role, keeping each role's order (the
/// order between the two directions depends on the capture).
fn by_role(pdus: &[String]) -> Vec<String> {
    let mut v: Vec<String> = pdus
        .iter()
        .filter(|p| p.starts_with('I'))
        .cloned()
        .collect();
    v.extend(pdus.iter().filter(|p| p.starts_with('R')).cloned());
    v
}

fn numbered(n: usize) -> Vec<u32> {
    (1..=n as u32).collect()
}

// ----- a real session's bytes, in memory -----

/// What a session wrote, piece by piece: each piece is exactly the wire
/// bytes of one message (or a frame), checked against SPEC's sizes.
struct Transcript {
    suite: Suite,
    /// The preamble and message 1 (one write, as the library sends them).
    first: Vec<u8>,
    msg2: Vec<u8>,
    msg3: Vec<u8>,
    i_frames: Vec<Vec<u8>>,
    r_frames: Vec<Vec<u8>>,
}

#[derive(Clone, Copy)]
enum Op {
    Data(usize),
    Keepalive,
    Rekey,
    Close,
}

impl Op {
    fn frame_len(self) -> usize {
        match self {
            Op::Data(n) => frame_len(n),
            Op::Keepalive | Op::Rekey | Op::Close => frame_len(0),
        }
    }
}

/// Runs `ops` on `from`, one frame each, delivering each to `to` (which
/// must read it: the session is real). Returns each frame's wire bytes.
fn frames(from: &mut Session, to: &mut Session, ops: &[Op]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (k, op) in ops.iter().enumerate() {
        let data = vec![k as u8; if let Op::Data(n) = op { *n } else { 0 }];
        match op {
            Op::Data(_) => {
                assert_eq!(from.write(&data).unwrap(), data.len());
                from.flush().unwrap();
            }
            Op::Keepalive => from.keepalive().unwrap(),
            Op::Rekey => from.rekey().unwrap(),
            Op::Close => from.close().unwrap(),
        }
        let wire = from.pending_output().to_vec();
        assert_eq!(wire.len(), 2 + op.frame_len(), "one frame per operation");
        let (got, closed) = transfer(from, to, usize::MAX).unwrap();
        assert_eq!(got, data);
        assert_eq!(closed, matches!(op, Op::Close));
        out.push(wire);
    }
    out
}

fn transcript(suite: Suite, i_ops: &[Op], r_ops: &[Op]) -> Transcript {
    let config = HandshakeConfig::with_suite(suite);
    let mut i = Handshake::initiator(
        &Identity::generate(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        config.clone(),
    )
    .unwrap();
    let mut r = Handshake::responder(
        &Identity::generate(),
        Arc::new(AnyVat),
        PeerContext::responder(None),
        config,
    )
    .unwrap();
    let take = |hs: &mut Handshake| {
        let out = hs.pending_output().to_vec();
        hs.consume_output(out.len());
        out
    };
    let first = take(&mut i);
    assert_eq!(first.len(), 13 + suite.noise_name().len() + 2 + MSG1);
    assert_eq!(r.feed(&first).unwrap(), first.len());
    let msg2 = take(&mut r);
    assert_eq!(msg2.len(), 2 + MSG2);
    assert_eq!(i.feed(&msg2).unwrap(), msg2.len());
    let msg3 = take(&mut i);
    assert_eq!(msg3.len(), 2 + MSG3);
    assert_eq!(r.feed(&msg3).unwrap(), msg3.len());
    let (mut i, mut r) = (i.into_session().unwrap(), r.into_session().unwrap());
    let i_frames = frames(&mut i, &mut r, i_ops);
    let r_frames = frames(&mut r, &mut i, r_ops);
    Transcript {
        suite,
        first,
        msg2,
        msg3,
        i_frames,
        r_frames,
    }
}

fn lens(ops: &[Op]) -> Vec<usize> {
    ops.iter().map(|op| op.frame_len()).collect()
}

fn preamble(version: u8, name: &[u8]) -> Vec<u8> {
    let mut p = b"capnp-noise".to_vec();
    p.push(version);
    p.push(name.len() as u8);
    p.extend_from_slice(name);
    p
}

// ----- the synthetic capture -----

const PORT: u16 = 4000;
const HEURISTIC_PORT: u16 = 4999;

#[test]
fn tshark_names_every_message_of_a_synthetic_capture() {
    if !tshark_usable() {
        return;
    }
    let mut cap = Capture::new();
    let mut want: Vec<(Vec<String>, Vec<&str>)> = Vec::new();

    // 0: a full session, cut at awkward points.
    let i_ops = [
        Op::Data(1),
        Op::Keepalive,
        Op::Data(65518),
        Op::Data(300),
        Op::Rekey,
        Op::Data(10),
        Op::Close,
    ];
    let r_ops = [Op::Data(65518), Op::Keepalive, Op::Data(4000), Op::Close];
    let t = transcript(Suite::ChaChaPolyBlake2s, &i_ops, &r_ops);
    let c = cap.connect(40000, PORT);
    // The preamble and message 1 in one segment.
    cap.send(c, true, &t.first);
    // Message 2 split inside its length prefix, then in its body.
    cap.send_cut(c, false, &t.msg2, &[1, 100]);
    // Message 3, frames 1 and 2 and 10 bytes of frame 3 in one segment;
    // frame 3 (65535 bytes) over three segments; the last of them also
    // holds frame 4 and the first byte of frame 5's length prefix.
    let mut rest = t.msg3.clone();
    for f in &t.i_frames {
        rest.extend_from_slice(f);
    }
    let head = t.msg3.len() + t.i_frames[0].len() + t.i_frames[1].len() + 10;
    let tail = t.i_frames[2].len() - 10 - 30000 + t.i_frames[3].len() + 1;
    cap.send_cut(c, true, &rest, &[head, 30000, tail]);
    // The responder's frames in MSS-sized segments.
    let r_all: Vec<u8> = t.r_frames.concat();
    let mss: Vec<usize> = vec![1448; r_all.len() / 1448];
    cap.send_cut(c, false, &r_all, &mss);
    cap.fin(c, true);
    cap.fin(c, false);
    want.push((expected(t.suite, &lens(&i_ops), &lens(&r_ops)), vec![]));

    // 1: the optional suite, on a port only the heuristic finds.
    let (i_ops, r_ops) = ([Op::Data(5), Op::Close], [Op::Data(7), Op::Close]);
    let t = transcript(Suite::AesGcmSha256, &i_ops, &r_ops);
    let c = cap.connect(40001, HEURISTIC_PORT);
    cap.send(c, true, &t.first);
    cap.send(c, false, &t.msg2);
    cap.send(c, true, &[t.msg3.clone(), t.i_frames.concat()].concat());
    cap.send(c, false, &t.r_frames.concat());
    cap.fin(c, true);
    cap.fin(c, false);
    want.push((expected(t.suite, &lens(&i_ops), &lens(&r_ops)), vec![]));

    // 2: not capnp-noise at all; the responder closes without a word.
    let c = cap.connect(40002, PORT);
    cap.send(c, true, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    cap.fin(c, false);
    cap.fin(c, true);
    want.push((
        vec!["I Preamble invalid".into(), "I Unread bytes".into()],
        vec![
            "byte 0 differs from the magic",
            "without answering an invalid preamble",
        ],
    ));

    // 3-6: preambles a responder refuses, and one it may not know. A
    // responder judges each byte as it comes: the version is refused when
    // it arrives, alone in its segment, before any name_len. (The name is
    // shown up to the byte that fails.)
    let c = cap.connect(40003, PORT);
    cap.send_cut(c, true, b"capnp-noise\x02", &[11]);
    cap.rst(c, false);
    want.push((
        vec!["I Preamble invalid".into()],
        vec!["Version 2", "without answering an invalid preamble"],
    ));
    let bad = [
        (preamble(1, b""), "invalid", "name_len 0 is outside 1 to 64"),
        (preamble(1, b"Noise XX"), "Noise ", "Name byte 5 (0x20)"),
    ];
    for (k, (p, shown, msg)) in bad.iter().enumerate() {
        let c = cap.connect(40004 + k as u16, PORT);
        cap.send(c, true, &[p.clone(), vec![0, 32], vec![7; 32]].concat());
        cap.rst(c, false);
        want.push((
            vec![format!("I Preamble {shown}"), "I Unread bytes".into()],
            vec![msg, "without answering an invalid preamble"],
        ));
    }
    let c = cap.connect(40006, PORT);
    let other = b"Noise_XX_448_ChaChaPoly_BLAKE2b";
    cap.send(
        c,
        true,
        &[preamble(1, other), vec![0, 32], vec![7; 32]].concat(),
    );
    cap.fin(c, false);
    want.push((
        vec![
            format!("I Preamble {}", std::str::from_utf8(other).unwrap()),
            format!("I Handshake msg 1 {MSG1}"),
        ],
        vec!["is not in SPEC 3", "Silent close"],
    ));

    // 7: message 1 one byte too long (the length alone decides).
    let t = transcript(Suite::ChaChaPolyBlake2s, &[], &[]);
    let name = Suite::ChaChaPolyBlake2s.noise_name();
    let c = cap.connect(40007, PORT);
    let mut first = preamble(1, name.as_bytes());
    first.extend_from_slice(&[0, 33]);
    first.extend_from_slice(&[9; 33]);
    cap.send(c, true, &first);
    cap.rst(c, false);
    want.push((
        vec![
            format!("I Preamble {name}"),
            "I Handshake msg 1 33".into(),
            "I Unread bytes".into(),
        ],
        vec![
            "length 33, SPEC 4 allows exactly 32",
            "without answering a malformed",
        ],
    ));

    // 8: a frame of 5 bytes from the initiator, a zero length from the
    // responder, after a real handshake and one good frame.
    let t8 = transcript(Suite::ChaChaPolyBlake2s, &[Op::Data(3)], &[]);
    let c = cap.connect(40008, PORT);
    cap.send(c, true, &t8.first);
    cap.send(c, false, &[t8.msg2.clone(), vec![0, 0, 1, 2]].concat());
    cap.send(
        c,
        true,
        &[
            t8.msg3.clone(),
            t8.i_frames[0].clone(),
            vec![0, 5, 1, 2, 3, 4, 5],
            t8.i_frames[0].clone(),
        ]
        .concat(),
    );
    cap.fin(c, true);
    cap.fin(c, false);
    want.push((
        vec![
            format!("I Preamble {name}"),
            format!("I Handshake msg 1 {MSG1}"),
            format!("I Handshake msg 3 {MSG3}"),
            format!("I Transport frame {}", frame_len(3)),
            "I Transport frame 5".into(),
            "I Unread bytes".into(),
            format!("R Handshake msg 2 {MSG2}"),
            "R Transport frame 0".into(),
            "R Unread bytes".into(),
        ],
        vec![
            "Transport frame: length 5, SPEC 4 allows 17 to 65535",
            "Transport frame: length 0, SPEC 4 allows 17 to 65535",
        ],
    ));

    // 9: message 2 longer than 96 + 4096 bytes.
    let c = cap.connect(40009, PORT);
    cap.send(c, true, &t.first);
    cap.send(c, false, &[vec![0x10, 0x61], vec![1; 40]].concat());
    cap.fin(c, true);
    want.push((
        vec![
            format!("I Preamble {name}"),
            format!("I Handshake msg 1 {MSG1}"),
            "R Handshake msg 2 4193".into(),
            "R Unread bytes".into(),
        ],
        vec!["length 4193, SPEC 4 allows 96 to 4192"],
    ));

    // 10: a silent close (the responder does not take the optional suite).
    let t10 = transcript(Suite::AesGcmSha256, &[], &[]);
    let c = cap.connect(40010, PORT);
    cap.send(c, true, &t10.first);
    cap.fin(c, false);
    cap.fin(c, true);
    want.push((
        vec![
            format!("I Preamble {}", Suite::AesGcmSha256.noise_name()),
            format!("I Handshake msg 1 {MSG1}"),
        ],
        vec!["Silent close (FIN)"],
    ));

    // 11: the initiator refuses the responder: no message 3. (Its preamble
    // and message 1 come in pieces: inside the magic, after the version,
    // inside the name.)
    let c = cap.connect(40011, PORT);
    cap.send_cut(c, true, &t.first, &[5, 7, 20]);
    cap.send(c, false, &t.msg2);
    cap.fin(c, true);
    cap.fin(c, false);
    want.push((
        expected(t.suite, &[], &[])[..3].to_vec(),
        vec!["after message 2 without sending message 3"],
    ));

    // 12: a truncation in the middle of a maximal frame.
    let t12 = transcript(Suite::ChaChaPolyBlake2s, &[Op::Data(65518)], &[]);
    let c = cap.connect(40012, PORT);
    cap.send(c, true, &t12.first);
    cap.send(c, false, &t12.msg2);
    cap.send(
        c,
        true,
        &[t12.msg3.clone(), t12.i_frames[0][..100].to_vec()].concat(),
    );
    cap.fin(c, true);
    want.push((
        expected(t12.suite, &[], &[]),
        vec!["initiator's stream ended (FIN) in the middle of Transport frame"],
    ));

    // 13: early bytes (sent before message 2), then a silent close.
    let c = cap.connect(40013, PORT);
    cap.send(
        c,
        true,
        &[t.first.clone(), vec![0, MSG3 as u8], vec![3; MSG3]].concat(),
    );
    cap.rst(c, false);
    want.push((
        vec![
            format!("I Preamble {name}"),
            format!("I Handshake msg 1 {MSG1}"),
            format!("I Handshake msg 3 {MSG3}"),
        ],
        vec!["Early bytes", "Silent close (RST)"],
    ));

    // 14: a responder that speaks before message 1 is complete.
    let c = cap.connect(40014, PORT);
    cap.send(c, true, &preamble(1, name.as_bytes()));
    cap.send(c, false, &t.msg2);
    cap.fin(c, true);
    cap.fin(c, false);
    want.push((
        vec![
            format!("I Preamble {name}"),
            format!("R Handshake msg 2 {MSG2}"),
        ],
        vec!["The responder sent this before the initiator's preamble and message 1 were complete"],
    ));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("synthetic.pcap");
    std::fs::write(&file, cap.bytes()).unwrap();
    if let Some(keep) = std::env::var_os("CAPNP_NOISE_KEEP_PCAP") {
        std::fs::copy(&file, keep).unwrap();
    }

    let port_pref = format!("capnp_noise.port:{PORT}");
    let seen = dissect(&file, &["-o", &port_pref]);
    assert_eq!(
        seen.len(),
        want.len(),
        "one TCP stream per connection: {seen:#?}"
    );
    for (k, (pdus, experts)) in want.iter().enumerate() {
        let s = &seen[&(k as u32)];
        assert_eq!(by_role(&s.pdus), by_role(pdus), "stream {k}: {s:#?}");
        for e in experts {
            assert!(
                s.expert(e),
                "stream {k}: no expert info {e:?} in {:#?}",
                s.experts
            );
        }
    }
    // Each direction's frames are numbered 1, 2, 3... in stream 0.
    let s0 = &seen[&0];
    assert_eq!(s0.frame_numbers[&'I'], numbered(7));
    assert_eq!(s0.frame_numbers[&'R'], numbered(4));
    assert_eq!(
        s0.ends,
        [
            "The initiator ended its byte stream (FIN) after 7 transport frame(s)",
            "The responder ended its byte stream (FIN) after 4 transport frame(s)"
        ]
    );
    // The Info column names the messages of a packet, in order.
    assert!(
        s0.info
            .iter()
            .any(|i| i == &format!("Preamble ({name}), Handshake msg 1 (32 bytes)")),
        "{:#?}",
        s0.info
    );
    assert!(
        s0.info
            .iter()
            .any(|i| i == "Transport frame #3 (65535 bytes), Transport frame #4 (317 bytes)"),
        "{:#?}",
        s0.info
    );
    // Nothing in a good session is flagged but its ends.
    for k in [0u32, 1] {
        let flagged: Vec<&String> = seen[&k]
            .experts
            .iter()
            .filter(|e| e.contains("capnp") || e.contains("SPEC"))
            .collect();
        assert!(flagged.is_empty(), "stream {k}: {flagged:#?}");
    }

    // The parts of the messages: the payload length that message 2's and
    // 3's sizes imply (SPEC 5.3's canonical 136 bytes), the suites' status,
    // and per frame of the initiator in stream 0 its body length (what the
    // session wrote; 0 for the keepalive, the REKEY and the CLOSE) and its
    // implicit nonce.
    let got = values(
        &file,
        &["-o", &port_pref],
        "tcp.stream == 0 && capnp_noise",
        &[
            "capnp_noise.handshake.payload_len",
            "capnp_noise.suite.status",
        ],
    );
    assert_eq!(got[0], [PAYLOAD.to_string(), PAYLOAD.to_string()]);
    assert_eq!(got[1], ["mandatory"]);
    let got = values(&file, &[], "tcp.stream == 1", &["capnp_noise.suite.status"]);
    assert_eq!(got[0], ["optional"]);
    let got = values(
        &file,
        &["-o", &port_pref],
        "tcp.stream == 0 && capnp_noise.role == \"initiator\"",
        &["capnp_noise.frame.body_len", "capnp_noise.frame.nonce"],
    );
    let bodies = ["1", "0", "65518", "300", "0", "10", "0"];
    assert_eq!(got[0], bodies);
    assert_eq!(got[1], ["0", "1", "2", "3", "4", "5", "6"]);

    // "Decode As" instead of the preference names the same messages, and
    // so does a second pass (tshark -2, as the GUI revisits packets: it
    // replays what the first pass found).
    let decode_as = format!("tcp.port=={PORT},capnp_noise");
    let again = dissect(&file, &["-d", &decode_as]);
    assert_eq!(by_role(&again[&0].pdus), by_role(&want[0].0));
    let two_pass = dissect(&file, &["-2", "-o", &port_pref]);
    for (k, (pdus, _)) in want.iter().enumerate() {
        assert_eq!(
            by_role(&two_pass[&(k as u32)].pdus),
            by_role(pdus),
            "stream {k}, tshark -2"
        );
    }
    assert_eq!(two_pass[&0].frame_numbers, s0.frame_numbers);
    // Without TCP reassembly, a message split over segments is flagged,
    // and that direction is no longer followed.
    let unassembled = dissect(
        &file,
        &["-o", &port_pref, "-o", "tcp.desegment_tcp_streams:FALSE"],
    );
    let s0 = &unassembled[&0];
    assert!(s0.expert("enable TCP reassembly"), "{s0:#?}");
    assert!(s0.expert("Not dissected: TCP reassembly is off"), "{s0:#?}");
    assert_eq!(s0.pdus[..2], want[0].0[..2]);
}

/// A small deterministic generator (xorshift) for the random streams.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Cut points for `len` bytes: 1 to 5 segments.
    fn cuts(&mut self, len: usize) -> Vec<usize> {
        (0..self.below(5)).map(|_| self.below(len.max(1))).collect()
    }
}

/// A length-prefixed message of random bytes whose length is usually
/// within `lo..=hi`, sometimes anything.
fn random_message(rng: &mut Rng, lo: usize, hi: usize) -> Vec<u8> {
    let len = if rng.below(4) == 0 {
        rng.below(65536)
    } else {
        lo + rng.below(hi - lo + 1)
    };
    let body = rng.below(len + 1).min(len.min(3000));
    let mut m = (len as u16).to_be_bytes().to_vec();
    let n = if rng.below(3) == 0 { body } else { len };
    m.extend(rng.bytes(n));
    m
}

/// Random connections (mostly well-formed framing, random bytes, random
/// segmentation and ends): the dissector never fails in Lua, starts every
/// stream with the initiator's preamble, numbers each direction's frames
/// 1, 2, 3..., and shows the same in two-pass tshark (as the GUI replays
/// the first pass when a packet is clicked).
#[test]
fn tshark_dissects_random_streams_without_failing() {
    if !tshark_usable() {
        return;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut cap = Capture::new();
    let streams = 60;
    for k in 0..streams {
        let c = cap.connect(41000 + k as u16, PORT);
        let mut up = match rng.below(6) {
            0 => {
                let n = rng.below(40);
                rng.bytes(n)
            }
            1 => {
                let (version, n) = (rng.below(3) as u8, rng.below(70));
                preamble(version, &rng.bytes(n))
            }
            _ => preamble(1, Suite::ALL[rng.below(2)].noise_name().as_bytes()),
        };
        up.extend(random_message(&mut rng, MSG1, MSG1));
        let mut down = random_message(&mut rng, 96, 96 + 4096);
        let mut up2 = random_message(&mut rng, 64, 64 + 4096);
        for _ in 0..rng.below(6) {
            up2.extend(random_message(&mut rng, 17, 2000));
            down.extend(random_message(&mut rng, 17, 2000));
        }
        let cuts = rng.cuts(up.len());
        cap.send_cut(c, true, &up, &cuts);
        if rng.below(5) > 0 {
            let cuts = rng.cuts(down.len());
            cap.send_cut(c, false, &down, &cuts);
            let cuts = rng.cuts(up2.len());
            cap.send_cut(c, true, &up2, &cuts);
        }
        match rng.below(3) {
            0 => cap.rst(c, false),
            1 => cap.fin(c, true),
            _ => {
                cap.fin(c, false);
                cap.fin(c, true);
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("random.pcap");
    std::fs::write(&file, cap.bytes()).unwrap();
    if let Some(keep) = std::env::var_os("CAPNP_NOISE_KEEP_PCAP") {
        std::fs::copy(&file, keep).unwrap();
    }
    let port_pref = format!("capnp_noise.port:{PORT}");
    // dissect() fails on any Lua error.
    let one = dissect(&file, &["-o", &port_pref]);
    let two = dissect(&file, &["-2", "-o", &port_pref]);
    assert_eq!(one.len(), streams);
    for (k, s) in &one {
        assert!(s.pdus[0].starts_with("I Preamble"), "stream {k}: {s:#?}");
        for numbers in s.frame_numbers.values() {
            assert_eq!(*numbers, numbered(numbers.len()), "stream {k}: {s:#?}");
        }
        // The second pass replays the first.
        assert_eq!(two[k].pdus, s.pdus, "stream {k}, tshark -2");
        assert_eq!(
            two[k].frame_numbers, s.frame_numbers,
            "stream {k}, tshark -2"
        );
    }
}

// ----- a live loopback session, captured by tcpdump -----

struct Tcpdump {
    child: std::process::Child,
    /// Its stderr, line by line, from a thread that reads it to the end.
    said: std::sync::mpsc::Receiver<String>,
}

/// How long tcpdump may take to start and to stop.
const TCPDUMP_WAIT: Duration = Duration::from_secs(20);

impl Tcpdump {
    /// Starts capturing `tcp port PORT` on the loopback interface into
    /// `file`, and waits until tcpdump says it listens.
    fn start(file: &Path, port: u16) -> Result<Tcpdump, String> {
        let mut child = Command::new("tcpdump")
            // A 64 MiB kernel buffer: the machine may be busy, and a
            // dropped packet would make a gap in the streams.
            .args(["-i", "lo", "-U", "--immediate-mode", "-B", "65536"])
            .args(["-s", "0", "-w"])
            .arg(file)
            .arg(format!("tcp port {port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("tcpdump: {e}"))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, said) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let tcpdump = Tcpdump { child, said };
        let deadline = Instant::now() + TCPDUMP_WAIT;
        let mut before = Vec::new();
        while let Ok(line) = tcpdump
            .said
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if line.contains("listening on") {
                return Ok(tcpdump);
            }
            before.push(line);
        }
        Err(format!("tcpdump did not start listening: {before:?}"))
    }

    /// Stops it and checks that the kernel dropped no packet.
    fn stop(self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + TCPDUMP_WAIT;
        let mut said = Vec::new();
        // Its stderr ends when it exits.
        while let Ok(line) = self
            .said
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            said.push(line);
        }
        let dropped = said.iter().find(|l| l.contains("dropped by kernel"));
        assert!(
            dropped.is_some_and(|l| l.starts_with("0 ")),
            "tcpdump lost packets or did not report: {said:?}"
        );
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `file` holds `fins` TCP FINs or RSTs: the sessions' last
/// packets that matter have been written out.
fn wait_for_fins(file: &Path, fins: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("tshark")
            .arg("-r")
            .arg(file)
            .args(["-Y", "tcp.flags.fin == 1 || tcp.flags.reset == 1"])
            .args(["-T", "fields", "-e", "frame.number"])
            .output()
            .expect("tshark runs");
        let n = String::from_utf8_lossy(&out.stdout).lines().count();
        if n >= fins {
            return;
        }
        if Instant::now() > deadline {
            let all = Command::new("tshark")
                .arg("-r")
                .arg(file)
                .output()
                .expect("tshark runs");
            panic!(
                "the capture has {n} of {fins} FINs and RSTs after 30 s:\n{}",
                String::from_utf8_lossy(&all.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The messages written per direction by the live sessions: the initiator
/// writes and flushes each of these, then queues a keepalive and closes.
const UP: &[usize] = &[1, 100, 65518, 70000];
/// The responder, after reading to the initiator's close.
const DOWN: &[usize] = &[5, 65518];

/// What the live session writes, as frame lengths: a flushed write of at
/// most 65518 bytes is one frame, a longer one a maximal frame and the rest.
fn live_frames(writes: &[usize], keepalive: bool) -> Vec<usize> {
    let mut v = Vec::new();
    for &n in writes {
        let mut left = n;
        while left > 65518 {
            v.push(frame_len(65518));
            left -= 65518;
        }
        v.push(frame_len(left));
    }
    if keepalive {
        v.push(frame_len(0));
    }
    v.push(frame_len(0)); // CLOSE
    v
}

async fn live_session(listener: &tokio::net::TcpListener, suite: Suite) {
    let addr = listener.local_addr().unwrap();
    let config = StreamConfig::default().with_handshake(HandshakeConfig::with_suite(suite));
    let client = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut c = stream::connect(tcp, &Identity::generate(), Arc::new(AnyVat), config.clone())
            .await
            .map_err(std::io::Error::from)?;
        for &n in UP {
            c.write_all(&vec![0x5a; n]).await?;
            c.flush().await?;
        }
        c.queue_keepalive()?;
        c.shutdown().await?;
        let mut down = Vec::new();
        c.read_to_end(&mut down).await?;
        assert_eq!(down.len(), DOWN.iter().sum::<usize>());
        Ok::<_, std::io::Error>(())
    };
    let server = async {
        let (tcp, _) = listener.accept().await?;
        let mut s = stream::accept(tcp, &Identity::generate(), Arc::new(AnyVat), config.clone())
            .await
            .map_err(std::io::Error::from)?;
        let mut up = Vec::new();
        s.read_to_end(&mut up).await?;
        assert_eq!(up.len(), UP.iter().sum::<usize>());
        for &n in DOWN {
            s.write_all(&vec![0xa5; n]).await?;
            s.flush().await?;
        }
        s.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let (c, s) = tokio::join!(client, server);
    c.expect("the initiator's side");
    s.expect("the responder's side");
}

#[test]
fn tshark_names_every_message_of_a_tcpdump_capture() {
    if !tshark_usable() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let file: PathBuf = dir.path().join("loopback.pcap");
    let tcpdump = Tcpdump::start(&file, port);
    let Some(tcpdump) = tcpdump.map_or_else(
        |why| {
            peers::usable("tcpdump (capturing on lo, as root)", Err(why));
            None
        },
        Some,
    ) else {
        return;
    };
    for suite in [Suite::ChaChaPolyBlake2s, Suite::AesGcmSha256] {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), live_session(&listener, suite))
                .await
                .expect("the session ends within 60 s")
        });
    }
    wait_for_fins(&file, 4);
    tcpdump.stop();
    if let Some(keep) = std::env::var_os("CAPNP_NOISE_KEEP_PCAP") {
        std::fs::copy(&file, keep).unwrap();
    }

    let seen = dissect(&file, &["-o", &format!("capnp_noise.port:{port}")]);
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let up = live_frames(UP, true);
    let down = live_frames(DOWN, false);
    for (k, suite) in [Suite::ChaChaPolyBlake2s, Suite::AesGcmSha256]
        .into_iter()
        .enumerate()
    {
        let s = &seen[&(k as u32)];
        assert_eq!(
            by_role(&s.pdus),
            by_role(&expected(suite, &up, &down)),
            "stream {k}: {s:#?}"
        );
        assert_eq!(s.frame_numbers[&'I'], numbered(up.len()));
        assert_eq!(s.frame_numbers[&'R'], numbered(down.len()));
        assert!(
            s.info
                .iter()
                .any(|i| i.contains("Transport frame #3 (65535 bytes)")),
            "{:#?}",
            s.info
        );
        let ended = |role: &str, n: usize| {
            format!("The {role} ended its byte stream (FIN) after {n} transport frame(s)")
        };
        assert_eq!(
            s.ends,
            [ended("initiator", up.len()), ended("responder", down.len())],
            "stream {k}"
        );
    }
}
