//! `pair_ops`: a structured target. A sequence of operations (writes of
//! many sizes, flushes, closes, rekeys, and partial deliveries of the wire
//! in chunks) over an in-memory session pair, checking that each direction
//! delivers exactly what was written, in order, and ends as it should.

use arbitrary::{Arbitrary, Unstructured};

use super::support::{at_least, end_of_stream, feed_and_read, session_pair, suite, End};
use super::Seed;
use capnp_noise::wire::transport::{MAX_WIRE_FRAME, MIN_TRANSPORT_FRAME, SHORT_FRAME};
use capnp_noise::wire::{Session, SessionConfig};
use capnp_noise::wire::{BULK_FRAMES, DIRECT_WRITE};
use capnp_noise::wire::{LENGTH_PREFIX_LEN, MAX_DATA_PER_FRAME};
use capnp_noise::Error;

/// A whole `pair_ops` input.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub struct PairInput {
    /// Run AES-GCM instead of ChaChaPoly.
    pub aes: bool,
    /// Frames per key before an automatic rekey; 0 for the default.
    pub rekey_interval: u8,
    /// What happens, in order.
    pub ops: Vec<PairOp>,
}

/// One side of the pair; as an operand, the side that sends.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The initiator (sends to the responder).
    Initiator,
    /// The responder (sends to the initiator).
    Responder,
}

/// One operation on the pair.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairOp {
    /// `from` writes `len` bytes of its stream's pattern.
    Write {
        /// The writer.
        from: Side,
        /// How many bytes.
        len: u16,
    },
    /// `from` flushes.
    Flush(Side),
    /// `from` closes its sending direction.
    Close(Side),
    /// `from` rekeys its sending direction.
    Rekey(Side),
    /// Up to `bytes` (0: all) of `from`'s output reach the peer, fed in
    /// pieces of `chunk` (0: one piece) and read with a buffer of `read_len`
    /// bytes (at least 1).
    Deliver {
        /// The sender.
        from: Side,
        /// How much of its output to deliver.
        bytes: u16,
        /// The feeding chunk size.
        chunk: u16,
        /// The receiver's read buffer size.
        read_len: u16,
    },
}

impl PairInput {
    /// Decodes any bytes, as the fuzz target does.
    pub fn from_fuzz_input(data: &[u8]) -> Option<PairInput> {
        PairInput::arbitrary_take_rest(Unstructured::new(data)).ok()
    }

    /// The bytes that [`from_fuzz_input`](Self::from_fuzz_input) decodes
    /// back into `self` (arbitrary 1.x's format: fixed-size little-endian
    /// integers, a u32 scaled to the variant count for an enum, and a
    /// "one more" byte before every element of the trailing `Vec`).
    pub fn to_fuzz_input(&self) -> Vec<u8> {
        fn variant(v: &mut Vec<u8>, index: u64, count: u64) {
            let x = (index << 32).div_ceil(count);
            v.extend(u32::try_from(x).expect("index < count").to_le_bytes());
        }
        fn side(v: &mut Vec<u8>, s: Side) {
            variant(v, s as u64, 2);
        }
        let mut v = vec![u8::from(self.aes), self.rekey_interval];
        for op in &self.ops {
            v.push(1);
            match *op {
                PairOp::Write { from, len } => {
                    variant(&mut v, 0, 5);
                    side(&mut v, from);
                    v.extend(len.to_le_bytes());
                }
                PairOp::Flush(s) => {
                    variant(&mut v, 1, 5);
                    side(&mut v, s);
                }
                PairOp::Close(s) => {
                    variant(&mut v, 2, 5);
                    side(&mut v, s);
                }
                PairOp::Rekey(s) => {
                    variant(&mut v, 3, 5);
                    side(&mut v, s);
                }
                PairOp::Deliver {
                    from,
                    bytes,
                    chunk,
                    read_len,
                } => {
                    variant(&mut v, 4, 5);
                    side(&mut v, from);
                    for w in [bytes, chunk, read_len] {
                        v.extend(w.to_le_bytes());
                    }
                }
            }
        }
        v
    }
}

/// Bytes written per direction before writes are skipped (keeps runs fast).
const SENT_CAP: usize = 1 << 20;

/// One direction's bookkeeping.
#[derive(Default)]
struct Direction {
    sent: Vec<u8>,
    got: Vec<u8>,
    closed: bool,
    end: Option<End>,
}

/// The byte at position `pos` of direction `dir`: distinct across nearby
/// positions, so a reordered, dropped or repeated frame shows.
fn pattern(dir: usize, pos: usize) -> u8 {
    ((pos as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (dir as u8)
}

/// Each direction's [`pattern`] for [`SENT_CAP`] bytes, made once: making
/// it byte by byte for every write (a traced loop) was most of an
/// execution that writes a lot.
fn patterns() -> &'static [Vec<u8>; 2] {
    static PATTERNS: std::sync::OnceLock<[Vec<u8>; 2]> = std::sync::OnceLock::new();
    PATTERNS.get_or_init(|| [0, 1].map(|dir| (0..SENT_CAP).map(|p| pattern(dir, p)).collect()))
}

/// `from`'s session and its peer's.
fn sender_and_receiver(sessions: &mut [Session; 2], from: Side) -> (&mut Session, &mut Session) {
    let [i, r] = sessions;
    match from {
        Side::Initiator => (i, r),
        Side::Responder => (r, i),
    }
}

/// Moves up to `budget` bytes of `tx`'s output to `rx` and reads them.
fn deliver(
    tx: &mut Session,
    rx: &mut Session,
    d: &mut Direction,
    budget: usize,
    chunk: usize,
    read_len: usize,
) {
    let n = tx.pending_output().len().min(budget);
    // At most about MAX_PIECES feeds and reads (see there). Fed from the
    // sender's buffer in place: a copy of up to four full frames per
    // delivery was a fresh allocation, and a third of an execution went to
    // its page faults.
    let mut out = vec![0; at_least(read_len, n)];
    let pieces = tx.pending_output()[..n].chunks(at_least(chunk, n));
    let end = feed_and_read(rx, pieces, &mut out, &mut d.got);
    tx.consume_output(n);
    check_direction(d, end);
}

fn check_direction(d: &mut Direction, end: End) {
    assert!(
        d.sent.starts_with(&d.got),
        "received bytes that were not sent, or out of order"
    );
    match &end {
        End::Failed(e) => panic!("an honest pair failed: {e}"),
        End::Closed => {
            assert!(d.closed, "CLOSE seen but never sent");
            assert_eq!(d.got.len(), d.sent.len(), "CLOSE seen before all data");
        }
        End::NeedInput => {}
    }
    d.end = Some(end);
}

/// `pair_ops`: operations over an in-memory session pair (see [`PairOp`]).
///
/// Checks: each direction delivers a prefix of what was written and, once
/// everything is flushed and delivered, exactly it; a close is seen after
/// all data and a missing one makes EOF an error; writes and rekeys after
/// close fail with `SendAfterClose`; a write accepts everything unless a
/// full frame is waiting to go out, and seals nothing while output waits.
pub fn pair_ops(data: &[u8]) {
    let Some(input) = PairInput::from_fuzz_input(data) else {
        return;
    };
    let suite = suite(input.aes);
    let mut config = SessionConfig::default();
    if input.rekey_interval > 0 {
        config.rekey_interval = input.rekey_interval.into();
    }
    let (i, r) = session_pair(suite, config);
    let mut sessions = [i, r];
    let mut dirs = [Direction::default(), Direction::default()];
    for op in &input.ops {
        match *op {
            PairOp::Write { from, len } => {
                let (s, d, k) = (
                    &mut sessions[from as usize],
                    &mut dirs[from as usize],
                    from as usize,
                );
                if d.sent.len() + usize::from(len) > SENT_CAP {
                    continue;
                }
                let bytes = &patterns()[k][d.sent.len()..d.sent.len() + usize::from(len)];
                let waiting = s.pending_output().len();
                match s.write(bytes) {
                    Err(Error::SendAfterClose) => assert!(d.closed),
                    Err(e) => panic!("write failed: {e}"),
                    Ok(n) => {
                        assert!(!d.closed, "a write after close succeeded");
                        assert!(n <= bytes.len());
                        d.sent.extend_from_slice(&bytes[..n]);
                        if n < bytes.len() {
                            // Stopped by a full frame being built, or by
                            // BULK_FRAMES sealed frames waiting.
                            assert!(s.wants_write());
                            assert!(
                                s.buffered_plaintext() == MAX_DATA_PER_FRAME
                                    || s.pending_output().len()
                                        > (BULK_FRAMES - 1) * MAX_WIRE_FRAME,
                                "a write stopped early with room left"
                            );
                        }
                        if waiting > 0 && bytes.len() < DIRECT_WRITE {
                            assert_eq!(
                                s.pending_output().len(),
                                waiting,
                                "a small write sealed while output waited"
                            );
                        } else {
                            // BULK_FRAMES frames (each perhaps followed by a
                            // REKEY), and a short one sealed before them
                            // (SHORT_FRAME) with its REKEY.
                            let control = LENGTH_PREFIX_LEN + MIN_TRANSPORT_FRAME;
                            let most = BULK_FRAMES * (MAX_WIRE_FRAME + control)
                                + LENGTH_PREFIX_LEN
                                + SHORT_FRAME
                                + MIN_TRANSPORT_FRAME
                                + control;
                            // (Output a flush left beyond that only stays.)
                            let now = s.pending_output().len();
                            assert!(now <= most || now == waiting, "{now} bytes of output");
                        }
                    }
                }
            }
            PairOp::Flush(side) => {
                let s = &mut sessions[side as usize];
                s.flush().expect("flush");
                assert_eq!(s.buffered_plaintext(), 0);
            }
            PairOp::Close(side) => {
                let s = &mut sessions[side as usize];
                s.close().expect("close");
                assert!(s.local_closed() && s.buffered_plaintext() == 0);
                dirs[side as usize].closed = true;
            }
            PairOp::Rekey(side) => match sessions[side as usize].rekey() {
                Err(Error::SendAfterClose) => assert!(dirs[side as usize].closed),
                other => {
                    other.expect("rekey");
                    assert!(!dirs[side as usize].closed, "a rekey after close succeeded");
                }
            },
            PairOp::Deliver {
                from,
                bytes,
                chunk,
                read_len,
            } => {
                let (tx, rx) = sender_and_receiver(&mut sessions, from);
                let budget = if bytes == 0 { usize::MAX } else { bytes.into() };
                let chunk = if chunk == 0 { usize::MAX } else { chunk.into() };
                deliver(
                    tx,
                    rx,
                    &mut dirs[from as usize],
                    budget,
                    chunk,
                    read_len.into(),
                );
            }
        }
    }
    // Flush and deliver everything: each direction must arrive whole...
    for from in [Side::Initiator, Side::Responder] {
        let (tx, rx) = sender_and_receiver(&mut sessions, from);
        let d = &mut dirs[from as usize];
        tx.flush().expect("final flush");
        deliver(tx, rx, d, usize::MAX, 4096, 4096);
        assert!(d.got == d.sent, "a direction lost or changed data");
    }
    // ...and end as its sender left it (an EOF error is fatal to the whole
    // session, so only now).
    for from in [Side::Initiator, Side::Responder] {
        let rx = &mut sessions[1 - from as usize];
        let d = &mut dirs[from as usize];
        let mut out = [0u8; 64];
        let end = end_of_stream(rx, &mut out, &mut d.got);
        if d.closed {
            assert_eq!(end, End::Closed);
        } else {
            let text = end.error_text().unwrap_or_default();
            assert!(
                text.contains("without an authenticated close"),
                "EOF without CLOSE gave {end:?}"
            );
        }
    }
}

pub(super) fn seeds() -> Vec<Seed> {
    use PairOp::*;
    use Side::*;
    let all = |from| Deliver {
        from,
        bytes: 0,
        chunk: 0,
        read_len: 4096,
    };
    let cases: Vec<(&str, PairInput)> = vec![
        (
            "hello-close",
            PairInput {
                aes: false,
                rekey_interval: 0,
                ops: vec![
                    Write {
                        from: Initiator,
                        len: 5,
                    },
                    Flush(Initiator),
                    all(Initiator),
                    Close(Initiator),
                ],
            },
        ),
        (
            "both-ways-half-close",
            PairInput {
                aes: true,
                rekey_interval: 0,
                ops: vec![
                    Write {
                        from: Initiator,
                        len: 100,
                    },
                    Write {
                        from: Responder,
                        len: 300,
                    },
                    Close(Responder),
                    all(Responder),
                    Write {
                        from: Initiator,
                        len: 7,
                    },
                    Flush(Initiator),
                    Deliver {
                        from: Initiator,
                        bytes: 50,
                        chunk: 3,
                        read_len: 1,
                    },
                    Close(Initiator),
                    Write {
                        from: Responder,
                        len: 1,
                    },
                ],
            },
        ),
        (
            "auto-rekey",
            PairInput {
                aes: false,
                rekey_interval: 2,
                ops: vec![
                    Write {
                        from: Initiator,
                        len: 10,
                    },
                    Flush(Initiator),
                    Write {
                        from: Initiator,
                        len: 10,
                    },
                    Flush(Initiator),
                    Write {
                        from: Initiator,
                        len: 10,
                    },
                    Flush(Initiator),
                    Rekey(Initiator),
                    Deliver {
                        from: Initiator,
                        bytes: 0,
                        chunk: 17,
                        read_len: 16,
                    },
                ],
            },
        ),
        (
            "large-writes",
            PairInput {
                aes: true,
                rekey_interval: 0,
                ops: vec![
                    Write {
                        from: Responder,
                        len: 65535,
                    },
                    Write {
                        from: Responder,
                        len: 65535,
                    },
                    Deliver {
                        from: Responder,
                        bytes: 40000,
                        chunk: 1000,
                        read_len: 65535,
                    },
                    Write {
                        from: Responder,
                        len: 65535,
                    },
                    Close(Responder),
                    Rekey(Responder),
                ],
            },
        ),
        (
            "no-close",
            PairInput {
                aes: false,
                rekey_interval: 1,
                ops: vec![
                    Write {
                        from: Responder,
                        len: 1,
                    },
                    Rekey(Responder),
                    Write {
                        from: Responder,
                        len: 2,
                    },
                ],
            },
        ),
    ];
    cases
        .into_iter()
        .map(|(name, input)| Seed::new("pair_ops", name, input.to_fuzz_input()))
        .collect()
}
