//! `capnp-noise decode`: prints what a capture of capnp-noise connections
//! holds, and with a key log (SPEC.md appendix A) what they said.
//!
//! Input is either a capture file (pcap or pcapng, read by
//! [`capture::read_capture`]) or the two byte streams of one connection
//! ([`Connection::from_streams`]). Each [`Connection`] is then decoded by
//! [`decode_connection`], which reuses the library's own sans-IO parsers
//! (`wire::preamble::parse`, `wire::frame::split_frame`,
//! `wire::payload::decode`) and snow's reference AEADs and hashes for the
//! decryption.
//!
//! Bad input never stops the decoder: a connection that is not capnp-noise,
//! a stream with a gap, a truncated capture or a key log line that does not
//! decrypt gives a line saying so, and the next connection follows. Memory
//! is bounded: [`capture::Limits`] caps what a capture may make the decoder
//! keep, and everything else is proportional to one frame.

pub mod capture;

use std::collections::HashMap;
use std::fmt::Write as _;

use capnp_noise::keylog::{self, parse_line};
use capnp_noise::wire::frame::{split_frame, FrameBounds};
use capnp_noise::wire::{
    payload, preamble, Suite, DH_LEN, MAX_HANDSHAKE_PAYLOAD_LEN, MAX_MESSAGE_LEN, TAG_LEN,
};
use snow::params::{CipherChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Hash};
use zeroize::Zeroizing;

/// The largest key log file the decoder reads.
pub const MAX_KEY_LOG_LEN: usize = 64 << 20;

type Key = Zeroizing<[u8; 32]>;

/// The keys of one session, by label.
#[derive(Default)]
struct SessionKeys {
    ee: Option<Key>,
    es: Option<Key>,
    se: Option<Key>,
    i2r: Option<Key>,
    r2i: Option<Key>,
}

/// A key log read into memory: the keys of each session, by the
/// initiator's ephemeral public key.
#[derive(Default)]
pub struct KeyTable {
    sessions: HashMap<[u8; 32], SessionKeys>,
}

impl std::fmt::Debug for KeyTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyTable({} sessions)", self.sessions.len())
    }
}

impl KeyTable {
    /// Reads key log text. Lines that do not parse are skipped; each gives
    /// a note (its line number and what was wrong, never its content).
    pub fn parse(text: &str) -> (KeyTable, Vec<String>) {
        let mut table = KeyTable::default();
        let mut notes = Vec::new();
        for (n, line) in text.lines().enumerate() {
            match parse_line(line) {
                Ok(None) => {}
                Ok(Some(l)) => {
                    let keys = table.sessions.entry(l.initiator_ephemeral).or_default();
                    let slot = match l.label {
                        keylog::HANDSHAKE_KEY_EE => &mut keys.ee,
                        keylog::HANDSHAKE_KEY_ES => &mut keys.es,
                        keylog::HANDSHAKE_KEY_SE => &mut keys.se,
                        keylog::INITIATOR_TRAFFIC_KEY => &mut keys.i2r,
                        _ => &mut keys.r2i,
                    };
                    *slot = Some(l.secret);
                }
                Err(e) if notes.len() < 100 => notes.push(format!("key log line {}: {e}", n + 1)),
                Err(_) => {}
            }
        }
        (table, notes)
    }

    /// How many sessions the key log has lines for.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True when the key log has no line.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// One direction of a connection: the bytes in order, and what went wrong
/// after them (a gap, a truncation), if anything.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    /// The bytes, as far as they are contiguous.
    pub bytes: Vec<u8>,
    /// Why the stream stops where it does, if not at its real end.
    pub problem: Option<String>,
}

/// One TCP connection (or a pair of stream files).
#[derive(Debug, Default, Clone)]
pub struct Connection {
    /// How to name it: its addresses, `initiator -> responder`.
    pub name: String,
    /// The initiator's bytes (it sends the preamble).
    pub initiator: Stream,
    /// The responder's bytes.
    pub responder: Stream,
}

impl Connection {
    /// A connection from the two streams of its directions.
    pub fn from_streams(name: String, initiator: Vec<u8>, responder: Vec<u8>) -> Self {
        Connection {
            name,
            initiator: Stream {
                bytes: initiator,
                problem: None,
            },
            responder: Stream {
                bytes: responder,
                problem: None,
            },
        }
    }
}

/// The Noise primitives of a suite, from snow's default resolver (not
/// the library's aws-lc resolver: a second implementation).
struct Crypto {
    cipher: CipherChoice,
    hash: HashChoice,
}

impl Crypto {
    fn of(suite: Suite) -> Option<Crypto> {
        match suite {
            Suite::ChaChaPolyBlake2s => Some(Crypto {
                cipher: CipherChoice::ChaChaPoly,
                hash: HashChoice::Blake2s,
            }),
            Suite::AesGcmSha256 => Some(Crypto {
                cipher: CipherChoice::AESGCM,
                hash: HashChoice::SHA256,
            }),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    fn cipher(&self, key: &[u8; 32]) -> Box<dyn Cipher> {
        let mut c = DefaultResolver
            .resolve_cipher(&self.cipher)
            .expect("snow's default resolver has both ciphers");
        c.set(key);
        c
    }

    fn mix_hash(&self, h: &mut [u8; 32], data: &[u8]) {
        let mut hash = self.hash_fn();
        hash.input(&h[..]);
        hash.input(data);
        hash.result(&mut h[..]);
    }

    fn hash_fn(&self) -> Box<dyn Hash> {
        DefaultResolver
            .resolve_hash(&self.hash)
            .expect("snow's default resolver has both hashes")
    }

    /// Noise's InitializeSymmetric: the name padded to 32 bytes, or hashed.
    fn initial_h(&self, name: &[u8]) -> [u8; 32] {
        let mut h = [0u8; 32];
        if name.len() <= 32 {
            h[..name.len()].copy_from_slice(name);
        } else {
            let mut hash = self.hash_fn();
            hash.input(name);
            hash.result(&mut h);
        }
        h
    }

    fn open(&self, key: &[u8; 32], n: u64, ad: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0u8; ct.len()];
        let len = self.cipher(key).decrypt(n, ad, ct, &mut out).ok()?;
        out.truncate(len);
        Some(out)
    }
}

const MSG1: FrameBounds = FrameBounds {
    min: DH_LEN,
    max: DH_LEN,
    what: "handshake message 1",
};
const MSG2: FrameBounds = FrameBounds {
    min: 2 * DH_LEN + 2 * TAG_LEN,
    max: 2 * DH_LEN + 2 * TAG_LEN + MAX_HANDSHAKE_PAYLOAD_LEN,
    what: "handshake message 2",
};
const MSG3: FrameBounds = FrameBounds {
    min: DH_LEN + 2 * TAG_LEN,
    max: DH_LEN + 2 * TAG_LEN + MAX_HANDSHAKE_PAYLOAD_LEN,
    what: "handshake message 3",
};
const TRANSPORT: FrameBounds = FrameBounds {
    min: 1 + TAG_LEN,
    max: MAX_MESSAGE_LEN,
    what: "transport frame",
};

/// A cursor over one direction's bytes, taking frames with the library's
/// frame decoder.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    arrow: &'static str,
}

enum Next<'a> {
    Frame(&'a [u8]),
    /// The stream ends here (cleanly, or in the middle of a frame).
    End,
    /// A length outside the bounds: not capnp-noise, or corrupted.
    Bad(String),
}

impl<'a> Reader<'a> {
    fn next(&mut self, bounds: FrameBounds) -> Next<'a> {
        let rest = &self.bytes[self.pos..];
        match split_frame(rest, bounds) {
            Ok(Some((body, used))) => {
                self.pos += used;
                Next::Frame(body)
            }
            Ok(None) => Next::End,
            Err(e) => Next::Bad(e.to_string()),
        }
    }

    /// The next handshake message, or `None` after saying why there is none.
    fn handshake_message(
        &mut self,
        bounds: FrameBounds,
        stream: &Stream,
        out: &mut String,
    ) -> Option<&'a [u8]> {
        match self.next(bounds) {
            Next::Frame(m) => Some(m),
            Next::End => {
                // Only the initiator can refuse the peer without a word.
                let why = if bounds.what == MSG3.what {
                    " (the initiator may have refused the responder)"
                } else {
                    ""
                };
                let _ = writeln!(out, "  {} no complete {}{why}", self.arrow, bounds.what);
                self.end(stream, bounds.what, out);
                None
            }
            Next::Bad(e) => {
                let _ = writeln!(out, "  {} {e}", self.arrow);
                None
            }
        }
    }

    /// Describes how the stream ended, after the last whole frame.
    fn end(&self, stream: &Stream, what: &str, out: &mut String) {
        let left = self.bytes.len() - self.pos;
        if left > 0 {
            let _ = writeln!(
                out,
                "  {} truncated: the stream ends {left} byte(s) into {what}",
                self.arrow
            );
        }
        if let Some(problem) = &stream.problem {
            let _ = writeln!(out, "  {} {problem}", self.arrow);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Decodes one connection into `out`, as text: the addresses, the preamble
/// and suite, each handshake message with its length, and each transport
/// frame; with the session's key log lines in `keys`, also both identities
/// (VatId, whether the signature is valid), the handshake hash, and each
/// frame's type and content.
pub fn decode_connection(conn: &Connection, keys: Option<&KeyTable>, out: &mut String) {
    let _ = writeln!(out, "connection {}", conn.name);
    let mut i2r = Reader {
        bytes: &conn.initiator.bytes,
        pos: 0,
        arrow: "->",
    };
    let mut r2i = Reader {
        bytes: &conn.responder.bytes,
        pos: 0,
        arrow: "<-",
    };
    // The preamble.
    let parsed = match preamble::parse(i2r.bytes, &Suite::ALL) {
        Ok(Some(p)) => p,
        Ok(None) => {
            let _ = writeln!(
                out,
                "  -> no complete preamble ({} byte(s)): not capnp-noise, or truncated",
                i2r.bytes.len()
            );
            i2r.end(&conn.initiator, "the preamble", out);
            return;
        }
        Err(e) => {
            let _ = writeln!(out, "  -> not a capnp-noise connection: {e}");
            return;
        }
    };
    let suite = parsed.suite;
    let prologue = &i2r.bytes[..parsed.len];
    i2r.pos = parsed.len;
    let _ = writeln!(
        out,
        "  -> preamble: {} bytes, version {}, suite {}",
        parsed.len,
        preamble::VERSION,
        suite.noise_name()
    );
    let Some(crypto) = Crypto::of(suite) else {
        let _ = writeln!(out, "  suite not supported by the decoder");
        return;
    };

    // Message 1: the initiator's ephemeral key, the key log's index.
    let Some(msg1) = i2r.handshake_message(MSG1, &conn.initiator, out) else {
        return;
    };
    let _ = writeln!(
        out,
        "  -> handshake message 1: {} bytes, initiator ephemeral key {}",
        msg1.len(),
        hex(msg1)
    );
    let mut e = [0u8; 32];
    e.copy_from_slice(msg1);
    let session = match keys {
        None => None,
        Some(table) => {
            let found = table.sessions.get(&e);
            if found.is_none() {
                let _ = writeln!(
                    out,
                    "  (the key log has no line for this connection: frames stay encrypted)"
                );
            }
            found
        }
    };
    let mut h = crypto.initial_h(suite.noise_name().as_bytes());
    crypto.mix_hash(&mut h, prologue);
    crypto.mix_hash(&mut h, msg1);
    crypto.mix_hash(&mut h, &[]);
    // `keys_ok` turns false at the first key that does not decrypt.
    let mut keys_ok = session.is_some();

    // Message 2.
    let Some(msg2) = r2i.handshake_message(MSG2, &conn.responder, out) else {
        return;
    };
    let _ = writeln!(
        out,
        "  <- handshake message 2: {} bytes (responder ephemeral key {}, encrypted static key, payload of {} bytes)",
        msg2.len(),
        hex(&msg2[..DH_LEN]),
        msg2.len() - 2 * DH_LEN - 2 * TAG_LEN
    );
    crypto.mix_hash(&mut h, &msg2[..DH_LEN]);
    let (enc_s, enc_p) = msg2[DH_LEN..].split_at(DH_LEN + TAG_LEN);
    let mut es_key = None;
    if let Some(k) = session {
        keys_ok = identity(
            &crypto,
            &mut h,
            "responder",
            (k.ee.as_ref(), keylog::HANDSHAKE_KEY_EE, 0, enc_s),
            (k.es.as_ref(), keylog::HANDSHAKE_KEY_ES, 0, enc_p),
            out,
        );
        es_key = k.es.as_ref();
    } else {
        crypto.mix_hash(&mut h, enc_s);
        crypto.mix_hash(&mut h, enc_p);
    }

    // Message 3.
    let Some(msg3) = i2r.handshake_message(MSG3, &conn.initiator, out) else {
        return;
    };
    let _ = writeln!(
        out,
        "  -> handshake message 3: {} bytes (encrypted static key, payload of {} bytes)",
        msg3.len(),
        msg3.len() - DH_LEN - 2 * TAG_LEN
    );
    let (enc_s, enc_p) = msg3.split_at(DH_LEN + TAG_LEN);
    match session {
        Some(k) if keys_ok => {
            keys_ok = identity(
                &crypto,
                &mut h,
                "initiator",
                (es_key, keylog::HANDSHAKE_KEY_ES, 1, enc_s),
                (k.se.as_ref(), keylog::HANDSHAKE_KEY_SE, 0, enc_p),
                out,
            );
            if keys_ok {
                let _ = writeln!(out, "  handshake hash {}", hex(&h));
            }
        }
        _ => {}
    }

    // Transport, one direction after the other.
    let (ik, rk) = match session {
        Some(k) if keys_ok => (k.i2r.as_ref(), k.r2i.as_ref()),
        _ => (None, None),
    };
    transport(
        &crypto,
        &mut i2r,
        &conn.initiator,
        ik,
        keylog::INITIATOR_TRAFFIC_KEY,
        out,
    );
    transport(
        &crypto,
        &mut r2i,
        &conn.responder,
        rk,
        keylog::RESPONDER_TRAFFIC_KEY,
        out,
    );
}

/// One encrypted field of a handshake message: the key, its label, the
/// nonce, the ciphertext.
type Sealed<'a> = (Option<&'a Key>, &'static str, u64, &'a [u8]);

/// Decrypts a party's static key and payload, prints its VatId and whether
/// its signature binds it to that static key. False if a key is missing or
/// does not decrypt (a wrong key log line).
fn identity(
    crypto: &Crypto,
    h: &mut [u8; 32],
    who: &str,
    static_key: Sealed<'_>,
    payload_field: Sealed<'_>,
    out: &mut String,
) -> bool {
    let mut plain = Vec::new();
    for (key, label, n, ct) in [static_key, payload_field] {
        let Some(key) = key else {
            let _ = writeln!(out, "  (the key log has no {label} for this connection)");
            return false;
        };
        let Some(p) = crypto.open(key, n, &h[..], ct) else {
            let _ = writeln!(
                out,
                "  wrong key: {label} from the key log does not decrypt the {who}'s {} (a wrong or corrupted key log line, or a corrupted capture); nothing more of this connection is decrypted",
                if plain.is_empty() { "static key" } else { "payload" }
            );
            return false;
        };
        crypto.mix_hash(h, ct);
        plain.push(p);
    }
    let rs: [u8; 32] = plain[0].as_slice().try_into().unwrap_or([0; 32]);
    let _ = writeln!(out, "    {who} static key {}", hex(&rs));
    match payload::decode(&plain[1]) {
        Ok((vat_id, sig)) => {
            let valid = payload::verify_binding(&vat_id, &sig, &rs).is_ok();
            let _ = writeln!(
                out,
                "    {who} VatId {vat_id}, signature {}",
                if valid { "valid" } else { "INVALID" }
            );
        }
        Err(e) => {
            let _ = writeln!(out, "    {who} payload does not decode: {e}");
        }
    }
    true
}

/// Lists one direction's transport frames, decrypting them under `key`
/// (following REKEYs) when there is one.
fn transport(
    crypto: &Crypto,
    reader: &mut Reader<'_>,
    stream: &Stream,
    key: Option<&Key>,
    label: &str,
    out: &mut String,
) {
    let arrow = reader.arrow;
    let mut cipher = key.map(|k| crypto.cipher(k));
    let (mut n, mut key_index, mut under_key) = (0u64, 0u32, 0u64);
    loop {
        let frame = match reader.next(TRANSPORT) {
            Next::Frame(f) => f,
            Next::End => break,
            Next::Bad(e) => {
                let _ = writeln!(out, "  {arrow} {e}: the rest of this direction is not read");
                return;
            }
        };
        let Some(c) = cipher.as_mut() else {
            let _ = writeln!(
                out,
                "  {arrow} frame {n}: {} bytes (encrypted)",
                frame.len()
            );
            n += 1;
            continue;
        };
        let mut plain = vec![0u8; frame.len()];
        let Ok(len) = c.decrypt(n, &[], frame, &mut plain) else {
            let _ = writeln!(
                out,
                "  {arrow} frame {n}: {} bytes: wrong key: does not decrypt under {label} (key {key_index}, nonce {n}): a wrong key log line or a corrupted capture; the rest of this direction is listed encrypted",
                frame.len()
            );
            cipher = None;
            n += 1;
            continue;
        };
        let Some((&ty, body)) = plain[..len].split_last() else {
            continue;
        };
        let at = format!("frame {n} (key {key_index}, #{under_key} under it)");
        n += 1;
        under_key += 1;
        match ty {
            capnp_noise::wire::transport::FRAME_DATA => {
                let _ = writeln!(
                    out,
                    "  {arrow} {at}: DATA {} bytes{}",
                    body.len(),
                    describe(body)
                );
            }
            capnp_noise::wire::transport::FRAME_CLOSE => {
                let _ = writeln!(out, "  {arrow} {at}: CLOSE");
                let after = reader.bytes.len() - reader.pos;
                if after > 0 {
                    let _ = writeln!(out, "  {arrow} {after} byte(s) after CLOSE (ignored)");
                }
                reader.pos = reader.bytes.len();
                break;
            }
            capnp_noise::wire::transport::FRAME_REKEY => {
                c.rekey();
                key_index += 1;
                under_key = 0;
                let _ = writeln!(
                    out,
                    "  {arrow} {at}: REKEY (key {key_index} from the next frame)"
                );
            }
            t => {
                let _ = writeln!(
                    out,
                    "  {arrow} {at}: unknown frame type 0x{t:02x} ({} bytes)",
                    body.len()
                );
            }
        }
    }
    reader.end(stream, "a transport frame", out);
}

/// The content of a DATA frame: a summary of the Cap'n Proto messages it
/// holds when it is exactly a sequence of them, else its bytes in hex.
fn describe(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    match capnp_summary(body) {
        Some(summary) => format!(": {summary}"),
        None => format!(": {}", hex(body)),
    }
}

/// "Cap'n Proto message, 1 segment (3 words), rpc Message.bootstrap; ..."
fn capnp_summary(body: &[u8]) -> Option<String> {
    let options = capnp::message::ReaderOptions {
        traversal_limit_in_words: Some(1 << 16),
        nesting_limit: 64,
    };
    let mut rest = body;
    let mut parts = Vec::new();
    while !rest.is_empty() && parts.len() < 64 {
        let message = capnp::serialize::read_message_from_flat_slice(&mut rest, options).ok()?;
        let segments = message.into_segments();
        let sizes: Vec<String> = (0..capnp::message::ReaderSegments::len(&segments))
            .filter_map(|i| {
                capnp::message::ReaderSegments::get_segment(&segments, i as u32)
                    .map(|s| (s.len() / 8).to_string())
            })
            .collect();
        let message = capnp::message::Reader::new(segments, options);
        let which = rpc_which(&message).unwrap_or("not an rpc Message");
        parts.push(format!(
            "Cap'n Proto message, {} segment(s) ({} words), {which}",
            sizes.len(),
            sizes.join("+")
        ));
    }
    (rest.is_empty() && !parts.is_empty()).then(|| parts.join("; "))
}

fn rpc_which<S: capnp::message::ReaderSegments>(
    message: &capnp::message::Reader<S>,
) -> Option<&'static str> {
    use capnp_rpc::rpc_capnp::message::Which;
    let root: capnp_rpc::rpc_capnp::message::Reader<'_> = message.get_root().ok()?;
    Some(match root.which().ok()? {
        Which::Unimplemented(_) => "rpc Message.unimplemented",
        Which::Abort(_) => "rpc Message.abort",
        Which::Call(_) => "rpc Message.call",
        Which::Return(_) => "rpc Message.return",
        Which::Finish(_) => "rpc Message.finish",
        Which::Resolve(_) => "rpc Message.resolve",
        Which::Release(_) => "rpc Message.release",
        Which::Disembargo(_) => "rpc Message.disembargo",
        Which::ObsoleteSave(_) => "rpc Message.obsoleteSave",
        Which::Bootstrap(_) => "rpc Message.bootstrap",
        Which::ObsoleteDelete(_) => "rpc Message.obsoleteDelete",
        Which::Provide(_) => "rpc Message.provide",
        Which::Accept(_) => "rpc Message.accept",
        Which::Join(_) => "rpc Message.join",
        #[allow(unreachable_patterns)]
        _ => "rpc Message (another variant)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DATA that is a sequence of rpc messages is summarised; anything
    /// else (one byte more, random bytes) is not.
    #[test]
    fn capnp_messages_are_summarised_and_other_bytes_are_not() {
        let mut message = capnp::message::Builder::new_default();
        {
            let root: capnp_rpc::rpc_capnp::message::Builder<'_> = message.init_root();
            root.init_bootstrap().set_question_id(7);
        }
        let mut bytes = capnp::serialize::write_message_to_words(&message);
        let one = capnp_summary(&bytes).expect("a message");
        assert_eq!(
            one,
            "Cap'n Proto message, 1 segment(s) (5 words), rpc Message.bootstrap"
        );
        bytes.extend(bytes.clone());
        assert_eq!(capnp_summary(&bytes).unwrap(), format!("{one}; {one}"));
        bytes.push(0);
        assert!(capnp_summary(&bytes).is_none());
        assert!(describe(b"hello").ends_with("68656c6c6f"));
    }
}
