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
//! writes, like a `BufWriter`) and seals full frames (a whole frame's worth
//! of a large write without copying it first); [`Session::flush`]
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

/// Transport settings (part of a
/// [`HandshakeConfig`](super::HandshakeConfig)): start from [`Default`] and
/// change what you need with the `with_*` setters.
///
/// ```
/// use capnp_noise::wire::SessionConfig;
///
/// let session = SessionConfig::default().with_rekey_interval(1000);
/// assert_eq!(session.rekey_interval, 1000);
/// ```
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

setters!(SessionConfig {
    with_rekey_interval => rekey_interval: u64,
});

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

/// Sealed frames waiting to be written out: `buf[start..end]`. `buf.len()`
/// is how much of it has been initialised, so that a frame sealed straight
/// into it never pays for zero-filling.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Outgoing {
    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    /// `n` bytes of room after the sealed frames, to seal into; then `commit`.
    fn space(&mut self, n: usize) -> &mut [u8] {
        let want = self.end + n;
        if self.buf.capacity() < want {
            // Sealed frames are ciphertext: nothing to scrub. Beyond one
            // frame, straight to the size of BULK_FRAMES (grown once).
            let want = if want > spare::LARGE {
                want.max(BULK_FRAMES * MAX_WIRE_FRAME + 2048)
            } else {
                want
            };
            spare::grow(&mut self.buf, want, self.end, 0);
        }
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.end..want]
    }
    fn commit(&mut self, n: usize) {
        self.end += n;
    }
    fn append(&mut self, bytes: &[u8]) {
        self.space(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }
}

/// An established, encrypted session: the sans-IO transport.
///
/// Memory: the frame being built from small writes (up to 64 KiB), the
/// sealed frames not yet written (up to [`BULK_FRAMES`] frames, about
/// 256 KiB, plus a short frame and control frames), and the receive buffer
/// (4 KiB, growing to the frame being received, and while large frames
/// arrive to [`BULK_FRAMES`] of them, at most about 320 KiB), in which
/// frames too large for the reader's buffer are decrypted in place. Each buffer grows on demand;
/// [`shrink_large_buffers`](Self::shrink_large_buffers) releases the large
/// idle ones (into a small per-thread pool that the next growth takes from,
/// so a busy stream does not allocate per frame) and
/// [`shrink_buffers`](Self::shrink_buffers) all idle ones.
pub struct Session {
    tx_cipher: CipherState,
    rx_cipher: CipherState,
    info: Established,
    config: SessionConfig,
    // Receiving.
    rx: RxBuf,
    eof: bool,
    frames_received: bool,
    peer_closed: bool,
    // Sending: `open` is the frame being built from small writes (a 2-byte
    // length slot, then plaintext); it is sealed in place and swapped into
    // (or, when short, copied onto) `sealed`. A write of a whole frame's
    // worth is sealed from the caller's buffer straight into `sealed`.
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
                ..RxBuf::default()
            },
            eof: false,
            frames_received: false,
            peer_closed: false,
            open: Vec::new(),
            sealed: Outgoing {
                end: pending_output.len(),
                buf: pending_output,
                start: 0,
            },
            frames_this_key: 0,
            local_closed: false,
            error: None,
        }
    }

    /// Makes `plaintext` (early data a responder took, SPEC.md 14.5) the
    /// first bytes [`read`](Self::read) delivers, before any frame.
    pub(crate) fn prepend_plaintext(&mut self, plaintext: &[u8]) {
        if plaintext.is_empty() {
            return;
        }
        let mut buf = Vec::with_capacity(plaintext.len() + self.rx.end - self.rx.start);
        buf.extend_from_slice(plaintext);
        buf.extend_from_slice(self.rx.ciphertext());
        self.rx = RxBuf {
            start: plaintext.len(),
            end: buf.len(),
            plain_pos: 0,
            plain_end: plaintext.len(),
            // Zeroed before the buffer is pooled, like plaintext decrypted in place.
            dirty: plaintext.len(),
            buf,
        };
    }

    /// True once a frame from the peer has authenticated: for a responder
    /// of `IK`, the initiator's proof that it is live (SPEC.md 14.7).
    pub(crate) fn received_a_frame(&self) -> bool {
        self.frames_received
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
        self.rx.buf.capacity() + self.open.capacity() + self.sealed.buf.capacity()
    }

    /// Releases the memory of buffers that hold nothing: call it when the
    /// connection goes idle. Buffers grow again on demand.
    pub fn shrink_buffers(&mut self) {
        self.release_idle(0);
    }

    /// Releases the empty buffers that grew beyond 4 KiB (to receive or
    /// send a large frame), keeping the small ones: cheap enough to call
    /// whenever the connection goes quiet, which [`NoiseStream`] does when
    /// a read finds nothing to read and after a flush that wrote everything.
    ///
    /// Released buffers go to a small pool of spares kept by the current
    /// thread (a few frames' worth at most), and growing buffers take from it
    /// first: a stream that goes quiet between frames, as a fast reader does,
    /// keeps reusing the same memory instead of allocating per frame, while
    /// a thousand idle connections hold only their small buffers.
    ///
    /// [`NoiseStream`]: crate::stream::NoiseStream
    pub fn shrink_large_buffers(&mut self) {
        self.release_idle(spare::KEEP);
    }

    /// Releases each empty buffer whose capacity exceeds `keep`.
    fn release_idle(&mut self, keep: usize) {
        if self.rx.is_empty() && self.rx.buf.capacity() > keep {
            // The spare may serve another session next: the plaintext of
            // frames decrypted in place goes first.
            let mut buf = std::mem::take(&mut self.rx.buf);
            spare::scrub(&mut buf, self.rx.dirty);
            spare::give(buf);
            self.rx = RxBuf::default();
        }
        if self.open.is_empty() && self.open.capacity() > keep {
            spare::give(std::mem::take(&mut self.open));
        }
        if self.sealed.is_empty() && self.sealed.buf.capacity() > keep {
            spare::give(std::mem::take(&mut self.sealed.buf));
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
        self.rx.plain_pos = self.rx.plain_end;
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
    /// A large write ([`DIRECT_WRITE`] bytes or more) is encrypted straight
    /// from `data` into `pending_output`, without being copied first, in
    /// frames of equal size (each at most 65518 bytes), while fewer than
    /// [`BULK_FRAMES`] frames wait there; up to [`SHORT_FRAME`] bytes
    /// buffered before it are sealed just ahead of it as a short frame of
    /// their own.
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
            let rest = &data[taken..];
            let buffered = self.buffered_plaintext();
            if rest.len() >= DIRECT_WRITE && buffered <= SHORT_FRAME {
                // A large write: seal it from `data` where it lies, in
                // frames of equal size (so no short tail is left to copy),
                // while the output holds fewer than BULK_FRAMES frames, so
                // that one write to the socket takes several. A few bytes
                // already buffered go first, as a short frame.
                let frames = rest.len().div_ceil(MAX_DATA_PER_FRAME);
                let size = rest.len().div_ceil(frames);
                let wire = LENGTH_PREFIX_LEN + size + 1 + TAG_LEN;
                if self.sealed.len() + wire > BULK_FRAMES * MAX_WIRE_FRAME {
                    // Output waits: the caller writes it out first.
                    break;
                }
                if !self.open.is_empty() {
                    self.seal_data()?;
                }
                self.seal_direct(&rest[..size])?;
                taken += size;
                continue;
            }
            if buffered == MAX_DATA_PER_FRAME {
                if !self.sealed.is_empty() {
                    break;
                }
                self.seal_data()?;
            }
            if self.open.is_empty() {
                self.reserve_open(LENGTH_PREFIX_LEN);
                self.open.extend_from_slice(&[0, 0]);
            }
            let n = (MAX_DATA_PER_FRAME - self.buffered_plaintext()).min(rest.len());
            self.reserve_open(n);
            self.open.extend_from_slice(&rest[..n]);
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

    /// Flushes, then seals an empty DATA frame (SPEC 7: valid, delivers
    /// nothing): an authenticated keepalive, so that NATs and load
    /// balancers that drop idle flows see traffic on an idle connection.
    /// The peer reads nothing from it.
    ///
    /// # Errors
    /// [`Error::SendAfterClose`] after [`close`](Self::close); as
    /// [`flush`](Self::flush).
    pub fn keepalive(&mut self) -> Result<(), Error> {
        self.check()?;
        if self.local_closed {
            return Err(Error::SendAfterClose);
        }
        if !self.open.is_empty() {
            self.seal_data()?;
        }
        self.seal_data()
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

    /// A connected pair of sessions, the initiator's and the responder's,
    /// as a finished handshake between the vats `initiator` and `responder`
    /// with traffic keys `keys` (initiator to responder, then back) would
    /// give them, but without a handshake (so without its X25519 and
    /// signatures). The `transport` and `pair_ops` fuzz targets start every
    /// input from one: they fuzz the session, and the handshake, the same
    /// for every input, was most of their cost. Test hook of the private
    /// `__test-hooks` feature; not part of the API.
    #[cfg(feature = "__test-hooks")]
    #[doc(hidden)]
    pub fn pair_without_handshake_for_tests(
        suite: Suite,
        keys: ([u8; 32], [u8; 32]),
        (initiator, responder): (VatId, VatId),
        config: SessionConfig,
    ) -> (Session, Session) {
        let (k1, k2) = (Zeroizing::new(keys.0), Zeroizing::new(keys.1));
        let end = |role, peer, keys| {
            let info = Established {
                role,
                suite,
                peer,
                handshake_hash: [0; HANDSHAKE_HASH_LEN],
            };
            Session::new(keys, info, config.clone(), Vec::new(), Vec::new())
        };
        (
            end(Role::Initiator, responder, (k1.clone(), k2.clone())),
            end(Role::Responder, initiator, (k2, k1)),
        )
    }

    /// Seals an arbitrary plaintext (type byte included, so it may be empty,
    /// name an unknown type or give a control frame a body) as one frame
    /// under the current sending key and nonce, and returns the frame's wire
    /// bytes without queueing them. Tests of malformed frames and the
    /// `transport` fuzz target use it to get past the AEAD.
    ///
    /// # Errors
    /// [`Error::Misuse`] if the plaintext does not fit one frame (more than
    /// 65519 bytes), leaving the session untouched; the session's sticky
    /// error; [`Error::NonceExhausted`].
    #[cfg(any(test, feature = "__test-hooks"))]
    #[doc(hidden)]
    pub fn seal_raw_for_tests(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        self.check()?;
        if plaintext.len() + TAG_LEN > MAX_MESSAGE_LEN {
            return Err(Error::Misuse("the plaintext does not fit one frame"));
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
    /// is swapped with. Large buffers come from the thread's spares first.
    fn reserve_open(&mut self, n: usize) {
        const MAX_OPEN: usize = MAX_WIRE_FRAME + 2 * CONTROL_WIRE_LEN;
        let need = self.open.len() + n + 1 + TAG_LEN; // the type byte and the tag
        if need > self.open.capacity() {
            let want = need.max(2 * self.open.capacity()).clamp(256, MAX_OPEN);
            let len = self.open.len();
            // The old buffer holds the `len` bytes not yet sealed: plaintext.
            spare::grow(&mut self.open, want, len, len);
            self.open.truncate(len); // a spare may come longer
        }
    }

    /// Seals the open frame (with a DATA type byte) and queues it.
    fn seal_data(&mut self) -> Result<(), Error> {
        if self.open.is_empty() {
            self.reserve_open(LENGTH_PREFIX_LEN);
            self.open.extend_from_slice(&[0, 0]);
        }
        self.open.push(FRAME_DATA);
        let mut open = std::mem::take(&mut self.open);
        let sealed = self.seal_frame(&mut open);
        if sealed.is_ok() && self.sealed.is_empty() && open.len() > SHORT_FRAME {
            // A long frame becomes the output buffer, and the old (empty)
            // output buffer is reused for the next frame: no copy.
            self.sealed.end = open.len();
            self.sealed.start = 0;
            std::mem::swap(&mut open, &mut self.sealed.buf);
        } else if sealed.is_ok() {
            self.sealed.append(&open);
        }
        open.clear();
        self.open = open;
        sealed?;
        self.after_frame()
    }

    /// Seals `plain` (a whole frame's worth of application bytes, read where
    /// it lies) as a DATA frame straight onto the output.
    fn seal_direct(&mut self, plain: &[u8]) -> Result<(), Error> {
        let body = plain.len() + 1 + TAG_LEN;
        let len = u16::try_from(body).expect("at most one frame's worth");
        let out = self.sealed.space(LENGTH_PREFIX_LEN + body);
        out[..LENGTH_PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
        match self
            .tx_cipher
            .seal_out_of_place(plain, FRAME_DATA, &mut out[LENGTH_PREFIX_LEN..])
        {
            Ok(()) => self.sealed.commit(LENGTH_PREFIX_LEN + body),
            Err(e) => return Err(self.fail(e)),
        }
        self.frames_this_key += 1;
        self.after_frame()
    }

    /// Rekeys when the interval is reached, right after a data frame.
    fn after_frame(&mut self) -> Result<(), Error> {
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
                self.sealed.append(&frame);
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
    /// [`read`](Self::read) has consumed ([`BULK_FRAMES`] while large frames
    /// arrive), so call `read` and feed the rest.
    /// After the peer's CLOSE has been read, everything is taken and
    /// dropped unread (SPEC.md 7.2).
    pub fn feed(&mut self, input: &[u8]) -> usize {
        if self.peer_closed {
            return input.len();
        }
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
    /// received; while frames larger than [`DIRECT_WRITE`] arrive, to
    /// [`BULK_FRAMES`] maximal frames, so that one read takes several; plus
    /// the unread part of a frame decrypted in place if `read` has not
    /// taken it all.
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
    /// unknown type, or a control frame with a body;
    /// [`Error::UnexpectedEof`] when the stream ended (see
    /// [`feed_eof`](Self::feed_eof)) without the peer's CLOSE. Errors are
    /// sticky, and no plaintext is returned after one.
    pub fn read(&mut self, out: &mut [u8]) -> Result<ReadOutcome, Error> {
        loop {
            self.check()?;
            if let Some(n) = self.rx.take_plain(out) {
                return Ok(ReadOutcome::Data(n));
            }
            if out.is_empty() {
                return Ok(ReadOutcome::NeedInput);
            }
            if self.peer_closed {
                // The peer's direction ends at its CLOSE (SPEC.md 7.2):
                // whatever follows is never decrypted nor looked at, so
                // the outcome does not depend on whether it arrived with
                // the CLOSE or later.
                self.rx.discard_ciphertext();
                return Ok(ReadOutcome::Closed);
            }
            let split = frame::split_frame(self.rx.ciphertext(), TRANSPORT_BOUNDS);
            let (body_len, used) = match split {
                Err(e) => return Err(self.fail(e)),
                Ok(None) if self.eof => {
                    let during = if !self.rx.is_empty() {
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
                Ok(Some((body, used))) => (body.len(), used),
            };
            let body_start = self.rx.start + LENGTH_PREFIX_LEN;
            let body = body_start..body_start + body_len;
            // Straight into `out` when the frame fits; otherwise in place.
            let direct = out.len() >= body_len - TAG_LEN;
            let decrypted = if direct {
                self.rx_cipher.open_into(&self.rx.buf[body.clone()], out)
            } else {
                self.rx.dirty = self.rx.dirty.max(body.end);
                self.rx_cipher.open_in_place(&mut self.rx.buf[body.clone()])
            };
            let n = match decrypted {
                Ok(n) => n,
                Err(e) => return Err(self.fail(e)),
            };
            self.frames_received = true;
            let ty = if direct {
                out[n - 1]
            } else {
                self.rx.buf[body.start + n - 1]
            };
            let body_len = n - 1;
            self.rx.start += used;
            match ty {
                FRAME_DATA if direct => {
                    self.rx.settle();
                    if body_len > 0 {
                        return Ok(ReadOutcome::Data(body_len));
                    }
                }
                FRAME_DATA => {
                    self.rx.plain_pos = body.start;
                    self.rx.plain_end = body.start + body_len;
                    self.rx.settle();
                }
                FRAME_CLOSE | FRAME_REKEY if body_len != 0 => {
                    let name = if ty == FRAME_CLOSE { "CLOSE" } else { "REKEY" };
                    return Err(self.fail(ProtocolError::NonEmptyControlFrame(name).into()));
                }
                FRAME_CLOSE => {
                    self.rx.settle();
                    self.peer_closed = true;
                }
                FRAME_REKEY => {
                    self.rx.settle();
                    self.rx_cipher.rekey();
                }
                other => return Err(self.fail(ProtocolError::UnknownFrameType(other).into())),
            }
        }
    }
}

/// The receive buffer: wire bytes between `start` and `end` of `buf`, and
/// before them, between `plain_pos` and `plain_end`, the unread plaintext
/// of a frame decrypted in place. `buf.len()` is how much has been
/// initialised (the buffer is never zero-filled twice).
#[derive(Default)]
struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain_pos: usize,
    plain_end: usize,
    /// Every byte decrypted in place lies before this: what is zeroed
    /// before the buffer becomes a spare that another session may use.
    dirty: usize,
}

/// The receive buffer's size while no large frame is in flight.
const RX_BASE: usize = 4096;

/// A few buffered bytes (at most this many) are sealed as a short frame of
/// their own rather than topped up by copying from a write that brings a
/// large write, which is then sealed without a copy. So after a write,
/// [`Session::pending_output`] holds at most [`BULK_FRAMES`] DATA frames,
/// one such short one, and control frames.
pub const SHORT_FRAME: usize = 1024;

/// A write of at least this many bytes is sealed straight from the
/// caller's buffer, in frames of equal size (each at most a maximal frame),
/// rather than copied into the frame being built: a forwarding loop that
/// reads whatever the socket has then encrypts each byte once, with no
/// copy, whatever the size of its reads.
pub const DIRECT_WRITE: usize = 16 * 1024;

/// Large writes are sealed ahead while fewer than this many maximal frames
/// wait in [`Session::pending_output`], so that one write to the socket
/// (one system call) carries up to this many frames, and the sending
/// buffer of a busy session holds at most this many frames (about 256 KiB).
pub const BULK_FRAMES: usize = 4;

impl RxBuf {
    /// Nothing buffered: no ciphertext, no unread plaintext.
    fn is_empty(&self) -> bool {
        self.start == self.end && self.plain_pos == self.plain_end
    }

    fn ciphertext(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops the ciphertext not yet read (what follows the peer's CLOSE).
    fn discard_ciphertext(&mut self) {
        self.start = self.end;
        self.settle();
    }

    /// Copies unread plaintext into `out`, if there is any.
    fn take_plain(&mut self, out: &mut [u8]) -> Option<usize> {
        if self.plain_pos == self.plain_end {
            return None;
        }
        let n = out.len().min(self.plain_end - self.plain_pos);
        out[..n].copy_from_slice(&self.buf[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        self.settle();
        Some(n)
    }

    /// Starts again at the front once everything has been used.
    fn settle(&mut self) {
        if self.is_empty() {
            *self = RxBuf {
                buf: std::mem::take(&mut self.buf),
                dirty: self.dirty,
                ..RxBuf::default()
            };
        }
    }

    fn make_room(&mut self) -> &mut [u8] {
        let live = if self.plain_pos < self.plain_end {
            self.plain_pos
        } else {
            self.start
        };
        let frame = match frame::peek_len(&self.buf[self.start..self.end]) {
            // While large frames arrive, room for BULK_FRAMES of them, so
            // that one read from the socket takes several.
            Some(len) if LENGTH_PREFIX_LEN + len > DIRECT_WRITE => BULK_FRAMES * MAX_WIRE_FRAME,
            Some(len) => LENGTH_PREFIX_LEN + len,
            None => 0,
        }
        .max(RX_BASE);
        // Unread plaintext stays where it is, ahead of the next frame.
        let need = self.start - live + frame;
        if self.buf.len() < need {
            let want = need.min(BULK_FRAMES * MAX_WIRE_FRAME + MAX_MESSAGE_LEN);
            if self.buf.capacity() < want {
                spare::grow(&mut self.buf, want, self.end, self.dirty);
            }
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
        }
        if self.end == self.buf.len() && live > 0 || live + need > self.buf.len() {
            self.buf.copy_within(live..self.end, 0);
            self.start -= live;
            self.end -= live;
            if self.plain_pos < self.plain_end {
                self.plain_pos -= live;
                self.plain_end -= live;
            }
        }
        &mut self.buf[self.end..]
    }
}

/// See [`crate::wire::spare_buffers_hold`].
#[cfg(feature = "__test-hooks")]
pub(crate) fn spare_buffers_hold(needle: &[u8]) -> bool {
    spare::holds(needle)
}

/// Spare large buffers, kept per thread and bounded, so that buffers
/// released when a stream goes quiet are reused by the next frame instead of
/// being allocated again.
///
/// A buffer that held plaintext (a receive buffer's frames decrypted in
/// place, a sending buffer's bytes not yet sealed) has that part zeroed
/// before it becomes a spare, since the next session to take it may be
/// another peer's: zeroing only what held plaintext costs nothing for
/// frames decrypted straight into the reader's buffer. The rest of a
/// spare's old bytes are ciphertext, which are only ever overwritten, or
/// handed to this session's inner stream as room to read into (as any
/// reused read buffer is). Keys never live in these buffers.
mod spare {
    use std::cell::RefCell;

    /// Buffers of at most this capacity are small: kept by idle sessions,
    /// never pooled.
    pub(super) const KEEP: usize = 4096;
    /// The capacity of a large buffer: one maximal frame, a short frame
    /// and control frames (a busy sending buffer grows, once, to
    /// BULK_FRAMES of them; spares of either size serve any role).
    pub(super) const LARGE: usize = super::MAX_WIRE_FRAME + 2048;
    /// How many spares a thread keeps: enough for a busy stream's three
    /// large buffers and one more.
    const SPARES: usize = 4;

    thread_local! {
        static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// Zeroes the first `len` bytes of `buf` (those that held plaintext).
    pub(super) fn scrub(buf: &mut [u8], len: usize) {
        let len = len.min(buf.len());
        zeroize::Zeroize::zeroize(&mut buf[..len]);
    }

    /// Whether a spare of this thread holds `needle` (a test of scrubbing).
    #[cfg(feature = "__test-hooks")]
    pub(crate) fn holds(needle: &[u8]) -> bool {
        SPARE.with(|s| {
            s.borrow()
                .iter()
                .any(|b| b.windows(needle.len()).any(|w| w == needle))
        })
    }

    /// Keeps `buf` as a spare if it is large and the pool has room.
    pub(super) fn give(buf: Vec<u8>) {
        if buf.capacity() <= KEEP {
            return;
        }
        let _ = SPARE.try_with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if s.len() < SPARES {
                    s.push(buf);
                }
            }
        });
    }

    /// Grows `buf` to a capacity of at least `want`, keeping its first
    /// `keep` bytes: from a spare when one is large enough, otherwise by
    /// allocating exactly `want`. If the old buffer becomes a spare, its
    /// first `scrub` bytes (plaintext) are zeroed first. Its length becomes at least `keep` and may
    /// be more (a spare keeps its initialised length); callers that use the
    /// length as their fill level truncate.
    pub(super) fn grow(buf: &mut Vec<u8>, want: usize, keep: usize, scrub: usize) {
        // Large buffers come in one size, so that any of them serves any
        // role (receiving, building, sending) and spares always fit.
        let want = if want > KEEP { want.max(LARGE) } else { want };
        let spare = SPARE
            .try_with(|s| {
                let mut s = s.try_borrow_mut().ok()?;
                let i = s.iter().position(|b| b.capacity() >= want)?;
                Some(s.swap_remove(i))
            })
            .ok()
            .flatten();
        match spare {
            Some(mut new) => {
                // The spare's initialised bytes stay (never read before
                // being overwritten); only the kept prefix is copied.
                if new.len() < keep {
                    new.resize(keep, 0);
                }
                new[..keep].copy_from_slice(&buf[..keep]);
                let mut old = std::mem::replace(buf, new);
                self::scrub(&mut old, scrub);
                give(old);
            }
            None => {
                let len = buf.len();
                buf.reserve_exact(want - len.min(want));
            }
        }
    }
}
