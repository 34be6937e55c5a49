//! What the targets share: how an input chooses its chunking, and a
//! receiving loop that checks the session's reading contract.

use std::sync::{Arc, OnceLock};

use crate::fixtures as testing;
use crate::fixtures::{INITIATOR_EPHEMERAL, RESPONDER_EPHEMERAL};
use capnp_noise::policy::{AnyVat, PeerContext};
use capnp_noise::wire::transport::MAX_WIRE_FRAME;
use capnp_noise::wire::{Handshake, HandshakeConfig, ReadOutcome, Session, SessionConfig, Suite};
use capnp_noise::{Error, Identity};

/// Whether this is a fuzzing build with capnp-noise's cheap crypto stand-ins
/// (`--cfg fuzzing --cfg capnp_noise_fuzz_cheap_crypto`, see
/// fuzz/README.md). There anyone can sign for any vat and compute any AEAD
/// tag, so the checks that "only a vat whose keys exist can authenticate"
/// do not apply; every other check does.
pub const CHEAP_CRYPTO: bool = cfg!(all(fuzzing, capnp_noise_fuzz_cheap_crypto));

/// Chunk sizes a [`Plan`] picks from: all at once, byte by byte, awkward
/// small sizes, and sizes around typical frame lengths (raised for long
/// streams, see `MAX_PIECES`).
const CHUNKS: [usize; 8] = [usize::MAX, 1, 2, 3, 7, 33, 500, 4096];
/// Read-buffer sizes: one byte, one minimal frame, a typical read, and more
/// than any frame (so frames decrypt straight into the caller's buffer).
const OUT_LENS: [usize; 4] = [1, 17, 1000, 70_000];

/// How a target feeds a byte stream, decoded from the input's first two bytes.
///
/// Byte 0: bits 0-2 pick the chunk size, bits 3-7 seed pseudo-random chunk
/// sizes (0: every chunk has the picked size). Byte 1: bit 0 ends the stream
/// with EOF, bit 1 is the target's own flag, bits 2-3 pick the read-buffer
/// size, bit 4 makes a responder target's responder require admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The chunk size, or the bound of the pseudo-random sizes.
    pub chunk: usize,
    /// Seed of pseudo-random chunk sizes; 0 for fixed chunks.
    pub jitter: u8,
    /// Whether the stream ends with EOF after the last byte.
    pub eof: bool,
    /// A target-specific choice (the suite, or which suites are accepted).
    pub flag: bool,
    /// The size of the buffer plaintext is read into.
    pub out_len: usize,
    /// Whether the responder [requires admission](capnp_noise::wire::Handshake::require_admission)
    /// (the responder targets; the others ignore it).
    pub admission: bool,
}

impl Plan {
    /// Splits `data` into its plan and the rest; `None` if it is too short.
    pub fn parse(data: &[u8]) -> Option<(Plan, &[u8])> {
        let [h0, h1, rest @ ..] = data else {
            return None;
        };
        let plan = Plan {
            chunk: CHUNKS[usize::from(h0 & 7)],
            jitter: h0 >> 3,
            eof: h1 & 1 != 0,
            flag: h1 & 2 != 0,
            out_len: OUT_LENS[usize::from((h1 >> 2) & 3)],
            admission: h1 & 0x10 != 0,
        };
        Some((plan, rest))
    }

    /// The header bytes that [`parse`](Self::parse) reads back as these
    /// choices (indices into the chunk and read-buffer tables).
    pub fn header(chunk_index: u8, jitter: u8, eof: bool, flag: bool, out_index: u8) -> [u8; 2] {
        [
            (chunk_index & 7) | (jitter << 3),
            u8::from(eof) | u8::from(flag) << 1 | (out_index & 3) << 2,
        ]
    }

    /// The reference way to run the same input: everything in one piece,
    /// without admission (what else the plan says stays).
    pub fn whole(self) -> Plan {
        Plan {
            chunk: usize::MAX,
            jitter: 0,
            admission: false,
            ..self
        }
    }

    /// The header byte 1 of [`header`](Self::header) with the admission bit set.
    pub fn with_admission(header: [u8; 2]) -> [u8; 2] {
        [header[0], header[1] | 0x10]
    }

    /// Cuts `data` into the plan's pieces: about 256 at most (beyond that
    /// the chunk size grows with `data`: byte-wise feeding of long streams
    /// covers nothing short ones do not, and was most of a target's time).
    pub fn pieces<'a>(&self, data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut rest = data;
        let chunk = at_least(self.chunk, data.len());
        let mut x = u32::from(self.jitter).wrapping_mul(0x9E37_79B9) | 1;
        while !rest.is_empty() {
            let n = if self.jitter == 0 {
                chunk
            } else {
                // xorshift32: sizes in 1..=2*chunk (bounded for the "whole" size).
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                1 + (x as usize) % (chunk.min(8192) * 2)
            };
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
        pieces
    }
}

/// How many pieces (and reads) a target cuts one byte stream into, at most
/// about: beyond it, chunks and read buffers grow with the stream.
///
/// Feeding a 256 KiB wire byte by byte and reading it a byte at a time was
/// most of the `transport` target's time (half a million `feed` and `read`
/// calls for one input) and covers nothing that a short stream fed byte by
/// byte does not: every split of a frame (inside its length prefix, its
/// body, its tag) is reached by short inputs, and long streams keep input-chosen
/// awkward chunk sizes, only larger ones.
pub(super) const MAX_PIECES: usize = 256;

/// `size` (a chunk or read-buffer size), or larger so that `len` bytes take
/// at most about [`MAX_PIECES`] pieces of it.
pub(super) fn at_least(size: usize, len: usize) -> usize {
    size.max(len.div_ceil(MAX_PIECES)).max(1)
}

/// Where a receiving session stands after the bytes it was given.
#[derive(Debug, Clone)]
pub(super) enum End {
    /// It read everything and waits for more.
    NeedInput,
    /// It read the peer's authenticated CLOSE and nothing after it.
    Closed,
    /// It failed (errors are sticky, so this is final).
    Failed(Error),
}

impl PartialEq for End {
    fn eq(&self, other: &End) -> bool {
        match (self, other) {
            (End::NeedInput, End::NeedInput) | (End::Closed, End::Closed) => true,
            (End::Failed(a), End::Failed(b)) => a.to_string() == b.to_string(),
            _ => false,
        }
    }
}

impl End {
    /// The error's text, if it failed.
    pub(super) fn error_text(&self) -> Option<String> {
        match self {
            End::Failed(e) => Some(e.to_string()),
            _ => None,
        }
    }
}

/// Feeds `pieces` into `rx`, reading after every feed with a buffer of
/// `out.len()` bytes and appending the plaintext to `got`.
///
/// Checks the reading contract on the way: `feed` never takes more than it
/// is given, a session that takes no bytes makes progress by reading,
/// buffered ciphertext stays within one maximal frame, and errors are sticky.
pub(super) fn feed_and_read<'a>(
    rx: &mut Session,
    pieces: impl IntoIterator<Item = &'a [u8]>,
    out: &mut [u8],
    got: &mut Vec<u8>,
) -> End {
    let mut end = drain(rx, out, got);
    for piece in pieces {
        let mut rest = piece;
        while !rest.is_empty() {
            if matches!(end, End::Failed(_)) {
                return end;
            }
            let n = rx.feed(rest);
            assert!(n <= rest.len(), "feed took more than it was given");
            rest = &rest[n..];
            let buffered = rx.buffered_ciphertext();
            end = drain(rx, out, got);
            assert!(
                n > 0 || matches!(end, End::Failed(_)) || rx.buffered_ciphertext() < buffered,
                "the session takes no bytes and reads none: stalled"
            );
        }
    }
    end
}

/// Tells `rx` that the stream ended, and reads what that produces.
pub(super) fn end_of_stream(rx: &mut Session, out: &mut [u8], got: &mut Vec<u8>) -> End {
    rx.feed_eof();
    drain(rx, out, got)
}

/// Reads until the session needs input, closes or fails.
fn drain(rx: &mut Session, out: &mut [u8], got: &mut Vec<u8>) -> End {
    assert!(!out.is_empty());
    loop {
        match rx.read(out) {
            Ok(ReadOutcome::Data(n)) => {
                assert!(
                    n >= 1 && n <= out.len(),
                    "Data({n}) for a {} byte buffer",
                    out.len()
                );
                got.extend_from_slice(&out[..n]);
            }
            Ok(ReadOutcome::Closed) => {
                assert!(rx.peer_closed());
                return End::Closed;
            }
            Ok(ReadOutcome::NeedInput) => {
                assert!(rx.buffered_ciphertext() <= MAX_WIRE_FRAME);
                return End::NeedInput;
            }
            Err(e) => {
                let again = rx.read(out).expect_err("session errors are sticky");
                assert_eq!(again.to_string(), e.to_string(), "sticky error changed");
                assert!(rx.error().is_some());
                return End::Failed(e);
            }
        }
    }
}

/// The deterministic initiator identity of [`testing`], built once.
pub(super) fn initiator_identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(testing::initiator_identity)
}

/// The deterministic responder identity of [`testing`], built once.
pub(super) fn responder_identity() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(testing::responder_identity)
}

/// The suite a target's flag picks: AES-GCM if set, else ChaChaPoly.
pub(super) fn suite(aes: bool) -> Suite {
    if aes {
        Suite::AesGcmSha256
    } else {
        Suite::ChaChaPolyBlake2s
    }
}

/// The deterministic responder of [`testing`], accepting any vat.
pub(super) fn new_responder(config: HandshakeConfig) -> Handshake {
    Handshake::responder_with_fixed_ephemeral(
        responder_identity(),
        Arc::new(AnyVat),
        PeerContext::responder(None),
        config,
        RESPONDER_EPHEMERAL,
    )
    .expect("responder config")
}

/// The deterministic initiator of [`testing`], accepting any vat.
pub(super) fn new_initiator(config: HandshakeConfig) -> Handshake {
    Handshake::initiator_with_fixed_ephemeral(
        initiator_identity(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        config,
        INITIATOR_EPHEMERAL,
    )
    .expect("initiator config")
}

/// A connected session pair (initiator's, responder's) of the
/// deterministic vats over `suite`, without a handshake: fixed traffic keys
/// ([`Session::pair_without_handshake_for_tests`]). The session targets fuzz
/// the session; a real deterministic handshake per input (the same every
/// time: eight X25519 operations and two signature checks with real crypto)
/// was most of their cost and added no coverage. That a finished handshake
/// hands over a working session is what the handshake targets check: their
/// seeds go on into the session (`handshake::tests::transcripts_reach_the_session`).
pub(super) fn session_pair(suite: Suite, config: SessionConfig) -> (Session, Session) {
    Session::pair_without_handshake_for_tests(
        suite,
        SESSION_KEYS,
        (initiator_identity().vat_id(), responder_identity().vat_id()),
        config,
    )
}

/// The traffic keys of [`session_pair`] (initiator to responder, back).
const SESSION_KEYS: ([u8; 32], [u8; 32]) = ([0x17; 32], [0x71; 32]);

/// The secret-bearing parts of a text that may hold a pasted key file: the
/// first 16 characters of every run of 16 or more base64 characters on the
/// lines after a PEM header line (a whole line `-----BEGIN LABEL-----`, the
/// label in upper case letters, digits and spaces), up to its `-----END`
/// line. PKCS#8 and OpenSSH private keys are both such blocks.
pub(super) fn pem_body_runs(text: &str) -> Vec<&str> {
    let is_header = |line: &str| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
            .is_some_and(|label| {
                !label.trim().is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ')
            })
    };
    let mut runs = Vec::new();
    let mut in_body = false;
    for line in text.lines().map(str::trim) {
        if is_header(line) {
            in_body = true;
        } else if line.starts_with("-----END") {
            in_body = false;
        } else if in_body {
            runs.extend(
                line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/'))
                    .filter(|run| run.len() >= 16)
                    .map(|run| &run[..16]),
            );
        }
    }
    runs
}

/// The oracle for secrets in errors: `msg`, an error about `text`, repeats
/// no part of a key block's body ([`pem_body_runs`]). (A run that also
/// occurs elsewhere in the text may be quoted from there.)
///
/// # Panics
/// When it does.
pub(super) fn assert_no_key_material(text: &str, msg: &str) {
    for run in pem_body_runs(text) {
        assert!(
            !msg.contains(run) || text.matches(run).count() > 1,
            "the error repeats a key file's body ({run:?}): {msg:.300}"
        );
    }
}
