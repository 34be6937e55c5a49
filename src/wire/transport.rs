//! The established session: encrypted DATA, CLOSE and REKEY frames
//! (SPEC.md, "Transport").
//!
//! Every transport frame is `len: u16 || AEAD(body || type)`: the type byte
//! is the *last* byte of the plaintext, so a receiver can decrypt straight
//! into the application's buffer and find the type at the end.
//!
//! | type | name  | body                          |
//! |------|-------|-------------------------------|
//! | 0x00 | DATA  | application bytes (may be empty) |
//! | 0x01 | CLOSE | empty: the sender will send nothing more |
//! | 0x02 | REKEY | empty: the sender's next frame uses the next key |
//!
//! Sending: [`Session::write`] buffers application bytes (coalescing small
//! writes, like a `BufWriter`) and seals full frames; [`Session::flush`]
//! seals what is buffered; [`Session::close`] seals a CLOSE frame. The
//! ciphertext to put on the wire is [`Session::pending_output`].
//!
//! Receiving: put wire bytes in with [`Session::feed`] (or read them directly
//! into [`Session::recv_buffer`]), then take plaintext out with
//! [`Session::read`]. When the byte stream ends, tell the session with
//! [`Session::feed_eof`]: that is a clean end only after the peer's CLOSE.

use std::fmt;

use zeroize::Zeroizing;

use super::cipherstate::CipherState;

use super::frame::{self, FrameBounds};
use super::handshake::Role;
use super::preamble::Suite;
use super::{HANDSHAKE_HASH_LEN, LENGTH_PREFIX_LEN, MAX_DATA_PER_FRAME, MAX_MESSAGE_LEN, TAG_LEN};
use crate::error::{Error, ProtocolError};
use crate::vat_id::VatId;

/// Frame type byte: application data.
pub const FRAME_DATA: u8 = 0x00;
/// Frame type byte: authenticated close of the sender's direction.
pub const FRAME_CLOSE: u8 = 0x01;
/// Frame type byte: the sender rekeys its direction after this frame.
pub const FRAME_REKEY: u8 = 0x02;

/// The smallest transport frame: a type byte and a tag.
pub const MIN_TRANSPORT_FRAME: usize = 1 + TAG_LEN;
/// The largest frame on the wire, prefix included.
pub const MAX_WIRE_FRAME: usize = LENGTH_PREFIX_LEN + MAX_MESSAGE_LEN;
/// Default: a sender rekeys after this many frames under one key.
pub const DEFAULT_REKEY_INTERVAL: u64 = 1 << 16;

/// `during` of the [`Error::UnexpectedEof`] an initiator reports when the
/// stream ends before the responder sent a single transport frame: the way a
/// responder whose policy refused the initiator's VatId ends the connection.
pub const EOF_BEFORE_RESPONDER_SPOKE: &str =
    "right after the handshake, before the responder sent anything (the responder may have refused this vat's identity)";

const CONTROL_WIRE_LEN: usize = LENGTH_PREFIX_LEN + MIN_TRANSPORT_FRAME;
const TRANSPORT_BOUNDS: FrameBounds = FrameBounds {
    min: MIN_TRANSPORT_FRAME,
    max: MAX_MESSAGE_LEN,
    what: "a transport frame",
};

/// Transport settings.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Frames sent under one key before the sender sends REKEY and moves to
    /// the next key (Noise section 11.3). At least 1.
    pub rekey_interval: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            rekey_interval: DEFAULT_REKEY_INTERVAL,
        }
    }
}

/// What the handshake established.
#[derive(Debug, Clone)]
pub(crate) struct Established {
    pub(crate) role: Role,
    pub(crate) suite: Suite,
    pub(crate) peer: VatId,
    pub(crate) handshake_hash: [u8; HANDSHAKE_HASH_LEN],
}

/// What [`Session::read`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many plaintext bytes were written to the buffer (at least one).
    Data(usize),
    /// The peer closed its direction with an authenticated CLOSE: a clean end of stream.
    Closed,
    /// No complete frame is buffered: feed more bytes from the peer.
    NeedInput,
}

/// Sealed frames waiting to be written out: `bytes[start..]`.
#[derive(Default)]
struct Outgoing {
    bytes: Vec<u8>,
    start: usize,
}

impl Outgoing {
    fn data(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
    fn is_empty(&self) -> bool {
        self.start == self.bytes.len()
    }
    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.bytes.len());
        if self.start == self.bytes.len() {
            self.bytes.clear();
            self.start = 0;
        }
    }
}

/// An established, encrypted session: the sans-IO transport.
///
/// Memory: the frame being built (up to 64 KiB), the sealed frames not yet
/// written (one frame plus control frames), the receive buffer (4 KiB,
/// growing to the frame being received, at most 64 KiB) and, only when the
/// reader's buffers are smaller than a frame, one decrypted frame. Each
/// buffer grows on demand; [`shrink_buffers`](Self::shrink_buffers)
/// releases the idle ones.
pub struct Session {
    tx_cipher: CipherState,
    rx_cipher: CipherState,
    info: Established,
    config: SessionConfig,
    // Receiving.
    rx: RxBuf,
    eof: bool,
    rx_plain: Vec<u8>,
    rx_plain_pos: usize,
    rx_plain_end: usize,
    frames_received: bool,
    peer_closed: bool,
    // Sending: `open` is the frame being built (a 2-byte length slot, then
    // plaintext); it is sealed in place and swapped into `sealed`.
    open: Vec<u8>,
    sealed: Outgoing,
    frames_this_key: u64,
    local_closed: bool,
    error: Option<Error>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.info.role)
            .field("suite", &self.info.suite)
            .field("peer", &self.info.peer)
            .field("peer_closed", &self.peer_closed)
            .field("local_closed", &self.local_closed)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(
        (send_key, recv_key): (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>),
        info: Established,
        mut config: SessionConfig,
        pending_output: Vec<u8>,
        surplus_input: Vec<u8>,
    ) -> Self {
        config.rekey_interval = config.rekey_interval.max(1);
        Session {
            tx_cipher: CipherState::new(info.suite, &send_key),
            rx_cipher: CipherState::new(info.suite, &recv_key),
            info,
            config,
            rx: RxBuf {
                end: surplus_input.len(),
                buf: surplus_input,
                start: 0,
            },
            eof: false,
            rx_plain: Vec::new(),
            rx_plain_pos: 0,
            rx_plain_end: 0,
            frames_received: false,
            peer_closed: false,
            open: Vec::new(),
            sealed: Outgoing {
                bytes: pending_output,
                start: 0,
            },
            frames_this_key: 0,
            local_closed: false,
            error: None,
        }
    }

    /// The peer's authenticated VatId.
    pub fn peer_vat_id(&self) -> VatId {
        self.info.peer
    }

    /// The Noise handshake hash: unique to this session and known to both
    /// sides, for channel binding.
    pub fn handshake_hash(&self) -> &[u8; HANDSHAKE_HASH_LEN] {
        &self.info.handshake_hash
    }

    /// The suite the session runs.
    pub fn suite(&self) -> Suite {
        self.info.suite
    }

    /// This side's role in the handshake.
    pub fn role(&self) -> Role {
        self.info.role
    }

    /// The error that ended this session, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// True once the peer's authenticated CLOSE has been read.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// True once this side has closed its sending direction.
    pub fn local_closed(&self) -> bool {
        self.local_closed
    }

    /// Bytes of memory the session's buffers hold (their capacities).
    pub fn buffer_capacity(&self) -> usize {
        self.rx.buf.capacity()
            + self.rx_plain.capacity()
            + self.open.capacity()
            + self.sealed.bytes.capacity()
    }

    /// Releases the memory of buffers that hold nothing: call it when the
    /// connection goes idle. Buffers grow again on demand.
    pub fn shrink_buffers(&mut self) {
        if self.rx.start == self.rx.end {
            self.rx.buf = Vec::new();
            self.rx.start = 0;
            self.rx.end = 0;
        }
        if self.rx_plain_pos == self.rx_plain_end {
            self.rx_plain = Vec::new();
            self.rx_plain_pos = 0;
            self.rx_plain_end = 0;
        }
        if self.open.is_empty() {
            self.open = Vec::new();
        }
        if self.sealed.is_empty() {
            self.sealed = Outgoing::default();
        }
    }

    fn check(&self) -> Result<(), Error> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: Error) -> Error {
        self.error = Some(e.clone());
        self.rx_plain_pos = self.rx_plain_end;
        e
    }

    // ----- sending -----

    /// Ciphertext waiting to be written to the peer.
    pub fn pending_output(&self) -> &[u8] {
        self.sealed.data()
    }

    /// Marks `n` bytes of [`pending_output`](Self::pending_output) as written.
    pub fn consume_output(&mut self, n: usize) {
        self.sealed.consume(n);
    }

    /// True when sealed frames are waiting in [`pending_output`](Self::pending_output).
    pub fn wants_write(&self) -> bool {
        !self.sealed.is_empty()
    }

    /// Plaintext bytes accepted by [`write`](Self::write) but not sealed yet.
    pub fn buffered_plaintext(&self) -> usize {
        self.open.len().saturating_sub(LENGTH_PREFIX_LEN)
    }

    /// Accepts application bytes for sending, like a `BufWriter`: they are
    /// buffered until a frame is full, [`flush`](Self::flush) or
    /// [`close`](Self::close). A full frame is sealed into
    /// [`pending_output`](Self::pending_output) when that is empty.
    ///
    /// Returns how many bytes were accepted; 0 (for a non-empty `data`) means
    /// the caller must first write out `pending_output`.
    ///
    /// # Errors
    /// [`Error::SendAfterClose`] after [`close`](Self::close); the session's
    /// sticky error if it has failed; [`Error::NonceExhausted`].
    pub fn write(&mut self, data: &[u8]) -> Result<usize, Error> {
        self.check()?;
        if self.local_closed {
            return Err(Error::SendAfterClose);
        }
        let mut taken = 0;
        while taken < data.len() {
            if self.buffered_plaintext() == MAX_DATA_PER_FRAME {
                if !self.sealed.is_empty() {
                    break;
                }
                self.seal_data()?;
            }
            if self.open.is_empty() {
                self.open.extend_from_slice(&[0, 0]);
            }
            let n = (MAX_DATA_PER_FRAME - self.buffered_plaintext()).min(data.len() - taken);
            self.reserve_open(n);
            self.open.extend_from_slice(&data[taken..taken + n]);
            taken += n;
        }
        if self.buffered_plaintext() == MAX_DATA_PER_FRAME && self.sealed.is_empty() {
            self.seal_data()?;
        }
        Ok(taken)
    }

    /// Seals buffered application bytes into a DATA frame, so that
    /// [`pending_output`](Self::pending_output) holds everything written so far.
    ///
    /// # Errors
    /// The session's sticky error; [`Error::NonceExhausted`].
    pub fn flush(&mut self) -> Result<(), Error> {
        self.check()?;
        if !self.open.is_empty() {
            self.seal_data()?;
        }
        Ok(())
    }

    /// Flushes, then seals an authenticated CLOSE: this side will send
    /// nothing more. Receiving continues. Closing twice is a no-op.
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    pub fn close(&mut self) -> Result<(), Error> {
        if self.local_closed {
            return self.check();
        }
        self.flush()?;
        self.seal_control(FRAME_CLOSE)?;
        self.local_closed = true;
        Ok(())
    }

    /// Flushes, then sends REKEY and moves this direction to the next key
    /// now, ahead of the schedule.
    ///
    /// # Errors
    /// As [`flush`](Self::flush); [`Error::SendAfterClose`] after close.
    pub fn rekey(&mut self) -> Result<(), Error> {
        self.check()?;
        if self.local_closed {
            return Err(Error::SendAfterClose);
        }
        self.flush()?;
        self.seal_rekey()
    }

    /// Seals an arbitrary plaintext (type byte included, so it may be empty,
    /// name an unknown type or give a control frame a body) as one frame
    /// under the current sending key and nonce, and returns the frame's wire
    /// bytes without queueing them. Tests of malformed frames and the
    /// `transport` fuzz target use it to get past the AEAD.
    ///
    /// # Errors
    /// [`Error::Config`] if the plaintext does not fit one frame (more than
    /// 65519 bytes), leaving the session untouched; the session's sticky
    /// error; [`Error::NonceExhausted`].
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn seal_raw_for_tests(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        self.check()?;
        if plaintext.len() + TAG_LEN > MAX_MESSAGE_LEN {
            return Err(Error::Config(format!(
                "a plaintext of {} bytes does not fit one frame",
                plaintext.len()
            )));
        }
        let mut frame = vec![0u8; LENGTH_PREFIX_LEN];
        frame.extend_from_slice(plaintext);
        self.seal_frame(&mut frame)?;
        Ok(frame)
    }

    /// Makes room for `n` more bytes in the open frame, growing it like a
    /// `Vec` does (doubling) but never beyond one sealed frame and two
    /// control frames: plain doubling would take a full frame (65537 bytes
    /// with its tag) to 128 KiB, in this buffer and in the output buffer it
    /// is swapped with.
    fn reserve_open(&mut self, n: usize) {
        const MAX_OPEN: usize = MAX_WIRE_FRAME + 2 * CONTROL_WIRE_LEN;
        let need = self.open.len() + n + 1 + TAG_LEN; // the type byte and the tag
        if need > self.open.capacity() {
            let want = need.max(2 * self.open.capacity()).min(MAX_OPEN);
            self.open.reserve_exact(want - self.open.len());
        }
    }

    /// Seals the open frame (with a DATA type byte) and queues it.
    fn seal_data(&mut self) -> Result<(), Error> {
        if self.open.is_empty() {
            self.open.extend_from_slice(&[0, 0]);
        }
        self.open.push(FRAME_DATA);
        let mut open = std::mem::take(&mut self.open);
        let sealed = self.seal_frame(&mut open);
        if sealed.is_ok() && self.sealed.is_empty() {
            // The common case: the frame becomes the output buffer, and the
            // old (empty) output buffer is reused for the next frame.
            std::mem::swap(&mut open, &mut self.sealed.bytes);
            self.sealed.start = 0;
        } else if sealed.is_ok() {
            self.sealed.bytes.extend_from_slice(&open);
        }
        open.clear();
        self.open = open;
        sealed?;
        if self.frames_this_key >= self.config.rekey_interval {
            self.seal_rekey()?;
        }
        Ok(())
    }

    fn seal_rekey(&mut self) -> Result<(), Error> {
        self.seal_control(FRAME_REKEY)?;
        self.tx_cipher.rekey();
        self.frames_this_key = 0;
        Ok(())
    }

    /// Seals a control frame (empty body) straight onto the output.
    fn seal_control(&mut self, ty: u8) -> Result<(), Error> {
        let mut frame = [0u8; CONTROL_WIRE_LEN];
        frame[..LENGTH_PREFIX_LEN].copy_from_slice(&(MIN_TRANSPORT_FRAME as u16).to_be_bytes());
        frame[LENGTH_PREFIX_LEN] = ty;
        match self
            .tx_cipher
            .seal_in_place(&mut frame[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + 1])
        {
            Ok(tag) => {
                frame[LENGTH_PREFIX_LEN + 1..].copy_from_slice(&tag);
                self.frames_this_key += 1;
                self.sealed.bytes.extend_from_slice(&frame);
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Seals `frame` in place: a 2-byte length slot, then the plaintext
    /// (type byte last); the tag is appended and the length written.
    fn seal_frame(&mut self, frame: &mut Vec<u8>) -> Result<(), Error> {
        match self
            .tx_cipher
            .seal_in_place(&mut frame[LENGTH_PREFIX_LEN..])
        {
            Ok(tag) => {
                frame.extend_from_slice(&tag);
                let len = u16::try_from(frame.len() - LENGTH_PREFIX_LEN)
                    .expect("frames are built to at most 65535 bytes");
                frame[..LENGTH_PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
                self.frames_this_key += 1;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    // ----- receiving -----

    /// Feeds ciphertext received from the peer. Returns how many bytes were
    /// taken: the session buffers at most one maximal frame beyond what
    /// [`read`](Self::read) has consumed, so call `read` and feed the rest.
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let mut taken = 0;
        while taken < input.len() {
            let space = self.recv_buffer();
            let n = space.len().min(input.len() - taken);
            if n == 0 {
                break;
            }
            space[..n].copy_from_slice(&input[taken..taken + n]);
            self.commit_recv(n);
            taken += n;
        }
        taken
    }

    /// Spare room at the end of the receive buffer, to read peer bytes into
    /// directly; then call [`commit_recv`](Self::commit_recv). Empty when a
    /// whole maximal frame is already buffered (call [`read`](Self::read)).
    ///
    /// The buffer starts at 4 KiB and grows to the size of the frame being
    /// received, at most one maximal frame (65537 bytes).
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        self.rx.make_room()
    }

    /// Marks `n` bytes of [`recv_buffer`](Self::recv_buffer) as filled.
    pub fn commit_recv(&mut self, n: usize) {
        self.rx.end = (self.rx.end + n).min(self.rx.buf.len());
    }

    /// Tells the session that the peer's byte stream has ended. After the
    /// peer's CLOSE that is the clean end; before it, [`read`](Self::read)
    /// reports [`Error::UnexpectedEof`] once the buffered frames are used up.
    pub fn feed_eof(&mut self) {
        self.eof = true;
    }

    /// Ciphertext bytes received but not yet decrypted.
    pub fn buffered_ciphertext(&self) -> usize {
        self.rx.end - self.rx.start
    }

    /// Decrypts received frames and copies plaintext into `out`.
    ///
    /// When `out` can hold a whole frame, the frame is decrypted straight
    /// into it, with no intermediate copy.
    ///
    /// # Errors
    /// [`Error::Decrypt`] for a frame that fails authentication (tampering,
    /// replay, reordering, loss); [`Error::Protocol`] for a bad length, an
    /// unknown type, a control frame with a body, or bytes after CLOSE;
    /// [`Error::UnexpectedEof`] when the stream ended (see
    /// [`feed_eof`](Self::feed_eof)) without the peer's CLOSE. Errors are
    /// sticky, and no plaintext is returned after one.
    pub fn read(&mut self, out: &mut [u8]) -> Result<ReadOutcome, Error> {
        loop {
            self.check()?;
            if self.rx_plain_pos < self.rx_plain_end {
                let n = out.len().min(self.rx_plain_end - self.rx_plain_pos);
                out[..n].copy_from_slice(&self.rx_plain[self.rx_plain_pos..self.rx_plain_pos + n]);
                self.rx_plain_pos += n;
                return Ok(ReadOutcome::Data(n));
            }
            if out.is_empty() {
                return Ok(ReadOutcome::NeedInput);
            }
            if self.peer_closed {
                if self.rx.start != self.rx.end {
                    return Err(self.fail(ProtocolError::DataAfterClose.into()));
                }
                return Ok(ReadOutcome::Closed);
            }
            let split =
                frame::split_frame(&self.rx.buf[self.rx.start..self.rx.end], TRANSPORT_BOUNDS);
            let (body, used) = match split {
                Err(e) => return Err(self.fail(e)),
                Ok(None) if self.eof => {
                    let during = if self.rx.start != self.rx.end {
                        "in the middle of a frame"
                    } else if self.info.role == Role::Initiator && !self.frames_received {
                        // After XX message 3 only the responder can still
                        // refuse, and it refuses by closing without a word.
                        EOF_BEFORE_RESPONDER_SPOKE
                    } else {
                        "between frames"
                    };
                    return Err(self.fail(Error::UnexpectedEof { during }));
                }
                Ok(None) => return Ok(ReadOutcome::NeedInput),
                Ok(Some(found)) => found,
            };
            let plain_len = body.len() - TAG_LEN;
            let direct = out.len() >= plain_len;
            let decrypted = if direct {
                self.rx_cipher.open_into(body, out)
            } else {
                if self.rx_plain.len() < plain_len {
                    self.rx_plain.resize(plain_len, 0);
                }
                self.rx_cipher.open_into(body, &mut self.rx_plain)
            };
            let n = match decrypted {
                Ok(n) => n,
                Err(e) => return Err(self.fail(e)),
            };
            self.rx.consume(used);
            self.frames_received = true;
            let plain = if direct {
                &out[..n]
            } else {
                &self.rx_plain[..n]
            };
            let (ty, body_len) = (plain[n - 1], n - 1);
            match ty {
                FRAME_DATA if direct => {
                    if body_len > 0 {
                        return Ok(ReadOutcome::Data(body_len));
                    }
                }
                FRAME_DATA => {
                    self.rx_plain_pos = 0;
                    self.rx_plain_end = body_len;
                }
                FRAME_CLOSE | FRAME_REKEY if body_len != 0 => {
                    let name = if ty == FRAME_CLOSE { "CLOSE" } else { "REKEY" };
                    return Err(self.fail(ProtocolError::NonEmptyControlFrame(name).into()));
                }
                FRAME_CLOSE => self.peer_closed = true,
                FRAME_REKEY => self.rx_cipher.rekey(),
                other => return Err(self.fail(ProtocolError::UnknownFrameType(other).into())),
            }
        }
    }
}

/// The receive buffer: wire bytes between `start` and `end` of `buf`.
#[derive(Default)]
struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// The receive buffer's size while no large frame is in flight.
const RX_BASE: usize = 4096;

impl RxBuf {
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    fn make_room(&mut self) -> &mut [u8] {
        let have = self.end - self.start;
        let need = match frame::peek_len(&self.buf[self.start..self.end]) {
            Some(len) => LENGTH_PREFIX_LEN + len,
            None => 0,
        }
        .max(RX_BASE);
        if self.buf.len() < need {
            self.buf.resize(need.min(MAX_WIRE_FRAME), 0);
        }
        if self.end == self.buf.len() && self.start > 0 || self.start + need > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = have;
        }
        &mut self.buf[self.end..]
    }
}
