//! `NoiseStream` against awkward in-memory streams (as tokio-rustls tests
//! do: 1-byte reads and writes, `Pending` at every point, short writes, EOF
//! mid-frame) and over real loopback TCP.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use capnp_noise::stream::{self, NoiseStream, StreamConfig};
use capnp_noise::wire::transport::MAX_WIRE_FRAME;
use capnp_noise::{AnyVat, Error, Identity, Pinned};
use capnp_noise_test::fixtures::{initiator_first_flight, initiator_identity, responder_identity};
use capnp_noise_test::support::Tap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An inner stream that misbehaves as much as a stream may: it returns
/// `Pending` (after waking the task) at pseudo-random points of every
/// operation, and reads and writes at most `max_io` bytes at a time.
struct Awkward<S> {
    inner: S,
    rng: u64,
    max_io: usize,
    pending_one_in: u64,
    flushes: usize,
}

impl<S> Awkward<S> {
    fn new(inner: S, seed: u64, max_io: usize, pending_one_in: u64) -> Self {
        Awkward {
            inner,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            max_io,
            pending_one_in,
            flushes: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn pending(&mut self, cx: &mut Context<'_>) -> bool {
        if self.pending_one_in > 0 && self.next().is_multiple_of(self.pending_one_in) {
            cx.waker().wake_by_ref();
            true
        } else {
            false
        }
    }

    fn size(&mut self, len: usize) -> usize {
        let n = 1 + (self.next() as usize % self.max_io);
        n.min(len)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Awkward<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending(cx) {
            return Poll::Pending;
        }
        let n = self.size(buf.remaining());
        let mut small = ReadBuf::new(buf.initialize_unfilled_to(n));
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
        let got = small.filled().len();
        buf.advance(got);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Awkward<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending(cx) {
            return Poll::Pending;
        }
        let n = self.size(buf.len());
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending(cx) {
            return Poll::Pending;
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn quick() -> StreamConfig {
    StreamConfig::default().with_handshake_timeout(Some(Duration::from_secs(10)))
}

/// Runs both handshakes at once over `a` (initiator) and `b` (responder).
async fn pair<A, B>(a: A, b: B) -> (NoiseStream<A>, NoiseStream<B>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (c, s) = tokio::join!(
        stream::connect(a, &initiator_identity(), Arc::new(AnyVat), quick()),
        stream::accept(b, &responder_identity(), Arc::new(AnyVat), quick()),
    );
    let (c, s) = (
        c.expect("initiator handshake"),
        s.expect("responder handshake"),
    );
    assert_eq!(c.peer_vat_id(), responder_identity().vat_id());
    assert_eq!(s.peer_vat_id(), initiator_identity().vat_id());
    assert_eq!(c.handshake_hash(), s.handshake_hash());
    assert_eq!(c.suite(), s.suite());
    (c, s)
}

/// The client uploads `up` and closes its direction; the server reads to
/// the (authenticated) end, then answers with `down` and closes. Both
/// directions are checked byte for byte; half-close is exercised on the way.
async fn exchange<A, B>(mut c: NoiseStream<A>, mut s: NoiseStream<B>, up: &[u8], down: &[u8])
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let client = async {
        c.write_all(up).await?;
        c.shutdown().await?;
        let mut got = Vec::new();
        c.read_to_end(&mut got).await?;
        Ok::<_, io::Error>(got)
    };
    let server = async {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await?;
        s.write_all(down).await?;
        s.shutdown().await?;
        Ok::<_, io::Error>(got)
    };
    let (got_down, got_up) = tokio::join!(client, server);
    let (got_down, got_up) = (got_down.expect("client side"), got_up.expect("server side"));
    assert!(
        got_up == up,
        "upload differs ({} of {} bytes)",
        got_up.len(),
        up.len()
    );
    assert!(
        got_down == down,
        "download differs ({} of {} bytes)",
        got_down.len(),
        down.len()
    );
}

#[tokio::test]
async fn one_byte_io_with_pending_everywhere() {
    let (a, b) = tokio::io::duplex(64);
    let (c, s) = pair(Awkward::new(a, 1, 1, 2), Awkward::new(b, 2, 1, 3)).await;
    // More than one maximal frame each way.
    exchange(c, s, &pattern(70_000, 3), &pattern(66_000, 4)).await;
}

#[tokio::test]
async fn short_io_and_pending_at_many_seeds() {
    for seed in 0..12u64 {
        let (a, b) = tokio::io::duplex(1 + (seed as usize * 997) % 8192);
        let max_io = [1, 7, 100, 4096, 70_000][seed as usize % 5];
        let (c, s) = pair(
            Awkward::new(a, seed, max_io, 2 + seed % 4),
            Awkward::new(b, seed + 100, max_io, 2 + seed % 3),
        )
        .await;
        let up = pattern((seed as usize * 13_331) % 150_000, seed);
        let down = pattern((seed as usize * 7_919) % 100_000, seed + 1);
        exchange(c, s, &up, &down).await;
    }
}

#[tokio::test]
async fn flush_writes_everything_and_flushes_the_inner_stream() {
    // The initiator's inner stream buffers 1 MiB: nothing reaches the peer
    // unless the adapter flushes it (handshake included).
    let (a, b) = tokio::io::duplex(1 << 20);
    let (mut c, mut s) = pair(tokio::io::BufWriter::with_capacity(1 << 20, a), b).await;
    let wait = Duration::from_secs(5);
    for msg in [&b"small"[..], &pattern(65_518, 5), &pattern(200_000, 6)] {
        c.write_all(msg).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(c.session().buffered_plaintext(), 0);
        assert!(!c.session().wants_write());
        let mut got = vec![0; msg.len()];
        tokio::time::timeout(wait, s.read_exact(&mut got))
            .await
            .expect("flush left data behind")
            .unwrap();
        assert!(got == msg);
    }
    // Writes alone are buffered, like a BufWriter: nothing is sealed yet.
    c.write_all(b"buffered").await.unwrap();
    assert_eq!(c.session().buffered_plaintext(), 8);
}

#[tokio::test]
async fn flush_reaches_the_inner_stream_through_pending() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut c, mut s) = pair(Awkward::new(a, 9, 5, 2), b).await;
    let before = c.get_ref().flushes;
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    assert!(
        c.get_ref().flushes > before,
        "poll_flush did not flush the inner stream"
    );
    let mut got = [0; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
}

/// An inner stream that reports end-of-stream after `eof_after` more bytes.
struct CutAfter {
    inner: DuplexStream,
    eof_after: Option<usize>,
}

impl AsyncRead for CutAfter {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(left) = self.eof_after else {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        };
        let n = left.min(buf.remaining());
        if n == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut small = ReadBuf::new(buf.initialize_unfilled_to(n));
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
        let got = small.filled().len();
        buf.advance(got);
        self.eof_after = Some(left - got);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for CutAfter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn assert_unexpected_eof(e: &io::Error, during: &str) {
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    let msg = e.to_string();
    assert!(msg.contains("without an authenticated close"), "{msg}");
    assert!(msg.contains(during), "{msg}");
}

#[tokio::test]
async fn eof_mid_frame_and_between_frames_are_errors() {
    // Frame of 100 bytes: 2 + 100 + 1 + 16 = 119 bytes on the wire.
    for (cut, during) in [
        (1, "middle of a frame"),
        (60, "middle of a frame"),
        (119, "between frames"),
    ] {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (mut c, mut s) = pair(
            a,
            CutAfter {
                inner: b,
                eof_after: None,
            },
        )
        .await;
        s.get_mut().eof_after = Some(cut);
        c.write_all(&[7; 100]).await.unwrap();
        c.flush().await.unwrap();
        let mut got = Vec::new();
        let e = s.read_to_end(&mut got).await.unwrap_err();
        assert_unexpected_eof(&e, during);
        assert_eq!(got.len(), if cut == 119 { 100 } else { 0 });
        // The error sticks.
        let e = s.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}

async fn tcp_pair() -> (NoiseStream<TcpStream>, NoiseStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
    pair(a.unwrap(), b.unwrap().0).await
}

#[tokio::test]
async fn large_transfer_both_ways_over_tcp() {
    let (c, s) = tcp_pair().await;
    let up = pattern(6 << 20, 11);
    let down = pattern(3 << 20, 12);
    // Both directions at once, odd write sizes.
    let (mut cr, mut cw) = tokio::io::split(c);
    let (mut sr, mut sw) = tokio::io::split(s);
    let up2 = up.clone();
    let down2 = down.clone();
    let client_send = async {
        for chunk in up2.chunks(100_003) {
            cw.write_all(chunk).await?;
        }
        cw.shutdown().await
    };
    let server_send = async {
        for chunk in down2.chunks(9_999) {
            sw.write_all(chunk).await?;
        }
        sw.shutdown().await
    };
    let mut got_up = Vec::new();
    let mut got_down = Vec::new();
    let (a, b, c, d) = tokio::join!(
        client_send,
        server_send,
        sr.read_to_end(&mut got_up),
        cr.read_to_end(&mut got_down)
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    d.unwrap();
    assert!(got_up == up, "upload differs");
    assert!(got_down == down, "download differs");
}

#[tokio::test]
async fn half_close_both_ways_over_tcp() {
    let (mut c, mut s) = tcp_pair().await;
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    // Writing after our own close is refused...
    let e = c.write_all(b"more").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    // ...the peer sees a clean end after the data...
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request");
    assert!(s.session().peer_closed());
    // ...and can still answer, which we can still read.
    s.write_all(b"response").await.unwrap();
    s.flush().await.unwrap();
    let mut got = [0; 8];
    c.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"response");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // End of stream is sticky and clean.
    assert_eq!(c.read(&mut [0; 4]).await.unwrap(), 0);
}

#[tokio::test]
async fn cut_tcp_connection_is_unexpected_eof_not_end_of_stream() {
    let (mut c, mut s) = tcp_pair().await;
    c.write_all(b"partial").await.unwrap();
    c.flush().await.unwrap();
    drop(c); // no authenticated close
    let mut got = [0; 7];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"partial");
    let e = s.read(&mut [0; 16]).await.unwrap_err();
    assert_unexpected_eof(&e, "between frames");
    // The io::Error converts back into the crate's error.
    assert!(matches!(Error::from(e), Error::UnexpectedEof { .. }));
}

#[tokio::test]
async fn initiator_cut_right_after_handshake_suggests_refusal() {
    let (mut c, s) = tcp_pair().await;
    drop(s);
    let e = c.read(&mut [0; 16]).await.unwrap_err();
    assert_unexpected_eof(&e, "may have refused this vat's identity");
}

#[tokio::test]
async fn handshake_times_out_on_a_stalled_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let t = Duration::from_millis(200);
    let config = StreamConfig::default().with_handshake_timeout(Some(t));
    // A responder that accepts the TCP connection and never answers.
    let (tcp, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let _silent = accepted.unwrap();
    let started = tokio::time::Instant::now();
    let e = stream::connect(
        tcp.unwrap(),
        &Identity::generate(),
        Arc::new(AnyVat),
        config.clone(),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::HandshakeTimeout(d) if d == t), "{e}");
    assert!(started.elapsed() >= t);
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::TimedOut);
    // An initiator that sends only half its preamble.
    let (tcp, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let mut tcp = tcp.unwrap();
    tcp.write_all(b"capnp-").await.unwrap();
    let e = stream::accept(
        accepted.unwrap().0,
        &Identity::generate(),
        Arc::new(AnyVat),
        config,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::HandshakeTimeout(_)), "{e}");
}

/// The failure hold's two sides (SPEC.md 8.1): a peer that sends message 1
/// and hangs up before the responder answers costs no public-key work and
/// no slot; one that hangs up after message 2 keeps its slot for the hold;
/// a completed handshake gives its slot back at once.
#[tokio::test]
async fn admitted_handshakes_that_fail_keep_their_slot_for_the_failure_hold() {
    use capnp_noise::admission::HandshakeSlots;
    use capnp_noise_test::fixtures::{initiator_first_flight, x25519_operations_on_this_thread};
    let hold = Duration::from_millis(300);
    let slots = HandshakeSlots::with_failure_hold(1, 1, hold);
    let config = quick().with_handshake_slots(slots.clone());
    let id = responder_identity();
    let flight = initiator_first_flight(); // (its ephemeral key counts here)
    let before = x25519_operations_on_this_thread();

    // Message 1, then gone before the responder looked at it.
    let (mut client, server) = tokio::io::duplex(1 << 16);
    client.write_all(&flight).await.unwrap();
    drop(client);
    let e = stream::accept(server, &id, Arc::new(AnyVat), config.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::UnexpectedEof { during } if during.contains("waited for admission")),
        "{e}"
    );
    assert_eq!(
        x25519_operations_on_this_thread(),
        before,
        "no public-key work"
    );
    let s = slots.stats();
    assert_eq!((s.admitted, s.in_progress, s.held_after_failure), (1, 0, 0));

    // Message 1, then gone once message 2 arrived.
    let (mut client, server) = tokio::io::duplex(1 << 16);
    let accepting = tokio::spawn(stream::accept(
        server,
        &id,
        Arc::new(AnyVat),
        config.clone(),
    ));
    client.write_all(&flight).await.unwrap();
    let mut msg2 = [0u8; 1];
    client.read_exact(&mut msg2).await.unwrap();
    drop(client);
    let e = accepting.await.unwrap().unwrap_err();
    let failed_at = tokio::time::Instant::now();
    assert!(
        matches!(e, Error::UnexpectedEof { during } if during.contains("message 3")),
        "{e}"
    );
    assert_eq!(
        x25519_operations_on_this_thread() - before,
        3,
        "message 2's work"
    );
    let s = slots.stats();
    assert_eq!((s.admitted, s.in_progress, s.held_after_failure), (2, 1, 1));
    // The slot comes back when the hold ends, not before.
    while slots.stats().in_progress != 0 {
        assert!(failed_at.elapsed() < 10 * hold, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(failed_at.elapsed() + Duration::from_millis(20) >= hold);

    // A completed handshake gives its slot back at once.
    let (a, b) = tokio::io::duplex(1 << 16);
    let (c, s) = tokio::join!(
        stream::connect(a, &initiator_identity(), Arc::new(AnyVat), quick()),
        stream::accept(b, &id, Arc::new(AnyVat), config),
    );
    let (_c, _s) = (c.unwrap(), s.unwrap());
    let s = slots.stats();
    assert_eq!((s.admitted, s.in_progress, s.held_after_failure), (3, 0, 1));
}

#[tokio::test]
async fn refusals_on_either_side() {
    // The initiator pins someone else: it stops after message 2, and the
    // responder never learns who called.
    // (The responder's end counts the bytes it received: the preamble and
    // message 1, then the end of the stream, and not one byte of message 3,
    // the only message that carries the initiator's identity.)
    let (a, b) = tokio::io::duplex(1 << 16);
    let (b, received) = Tap::new(b);
    let someone = Identity::generate().vat_id();
    let (c, s) = tokio::join!(
        stream::connect(a, &initiator_identity(), Arc::new(Pinned(someone)), quick()),
        stream::accept(b, &responder_identity(), Arc::new(AnyVat), quick()),
    );
    assert!(
        matches!(c.unwrap_err(), Error::PeerRefused { vat_id, .. } if vat_id == responder_identity().vat_id())
    );
    let e = s.unwrap_err();
    assert!(
        matches!(e, Error::UnexpectedEof { during } if during.starts_with("before handshake message 3")),
        "{e}"
    );
    assert_eq!(
        received.load(Ordering::Relaxed),
        initiator_first_flight().len(),
        "the responder received more than the preamble and message 1"
    );
    // The responder refuses: its accept fails with the reason, the
    // initiator's first read says it may have been refused.
    let (a, b) = tokio::io::duplex(1 << 16);
    let (c, s) = tokio::join!(
        stream::connect(a, &initiator_identity(), Arc::new(AnyVat), quick()),
        stream::accept(b, &responder_identity(), Arc::new(Pinned(someone)), quick()),
    );
    assert!(matches!(s.unwrap_err(), Error::PeerRefused { .. }));
    let e = c.unwrap().read(&mut [0; 8]).await.unwrap_err();
    assert_unexpected_eof(&e, "may have refused");
}

#[tokio::test]
async fn garbage_instead_of_a_handshake_is_refused() {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let e = stream::accept(b, &responder_identity(), Arc::new(AnyVat), quick())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidData);
}

#[tokio::test]
async fn memory_held_idle_and_busy() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (mut c, mut s) = pair(a, b).await;
    let fresh = (c.session().buffer_capacity(), s.session().buffer_capacity());
    // A small exchange, as an idle RPC connection would do.
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut four = [0; 4];
    s.read_exact(&mut four).await.unwrap();
    let idle = (c.session().buffer_capacity(), s.session().buffer_capacity());
    // Busy: large writes and small reads.
    let big = pattern(1 << 20, 8);
    let reader = async {
        let mut got = vec![0; big.len()];
        for chunk in got.chunks_mut(1000) {
            s.read_exact(chunk).await.unwrap();
        }
        got
    };
    let writer = async {
        c.write_all(&big).await.unwrap();
        c.flush().await.unwrap();
    };
    let (got, ()) = tokio::join!(reader, writer);
    assert!(got == big);
    let busy = (c.session().buffer_capacity(), s.session().buffer_capacity());
    c.shrink_buffers();
    s.shrink_buffers();
    let shrunk = (c.session().buffer_capacity(), s.session().buffer_capacity());
    eprintln!(
        "buffer bytes (initiator, responder): fresh {fresh:?}, idle {idle:?}, \
         after 1 MiB {busy:?}, shrunk {shrunk:?}"
    );
    assert!(fresh.0 < 1024 && fresh.1 < 1024, "{fresh:?}");
    // Idle after small messages: the 4 KiB receive buffer and small send buffers.
    assert!(idle.0 <= 8192 && idle.1 <= 8192, "{idle:?}");
    // Busy one way: the sender's frame being built (one frame) and sealed
    // frames (BULK_FRAMES), plus its small receive buffer; the receiver's
    // receive buffer (BULK_FRAMES frames and one decrypted in place) and
    // its small send buffer.
    let frame = MAX_WIRE_FRAME + 64;
    let bulk = capnp_noise::wire::BULK_FRAMES * MAX_WIRE_FRAME + 2048;
    assert!(
        busy.0 <= frame + bulk + 4096 && busy.1 <= bulk + frame + 4096,
        "{busy:?}"
    );
    assert_eq!(shrunk, (0, 0));
    // Shrunk buffers grow again on demand.
    c.write_all(b"again").await.unwrap();
    c.flush().await.unwrap();
    let mut five = [0; 5];
    s.read_exact(&mut five).await.unwrap();
    assert_eq!(&five, b"again");
}

#[tokio::test]
async fn works_as_a_futures_io_stream_through_compat() {
    use futures::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (a, b) = tokio::io::duplex(1 << 16);
    let (c, s) = pair(a, b).await;
    let (mut c, mut s) = (c.compat(), s.compat());
    c.write_all(b"via futures-io").await.unwrap();
    c.close().await.unwrap(); // poll_close is poll_shutdown: the authenticated CLOSE
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"via futures-io");
}

#[tokio::test]
async fn one_read_takes_every_whole_frame_already_received() {
    use capnp_noise::wire::MAX_DATA_PER_FRAME;
    let (a, b) = tokio::io::duplex(1 << 20);
    let (mut c, mut s) = pair(a, b).await;
    // Three frames' worth, sealed and sent before the reader looks.
    let data = pattern(3 * MAX_DATA_PER_FRAME, 4);
    c.write_all(&data).await.unwrap();
    c.flush().await.unwrap();
    // Let everything arrive, then one read with room for four frames.
    tokio::task::yield_now().await;
    let mut buf = vec![0u8; 4 * MAX_DATA_PER_FRAME];
    let mut got = 0;
    let mut reads = 0;
    while got < data.len() {
        got += s.read(&mut buf[got..]).await.unwrap();
        reads += 1;
    }
    assert!(buf[..got] == data[..]);
    // The receive buffer takes up to BULK_FRAMES frames per read of the
    // inner stream, and one read of the stream hands them all over: at most
    // two reads (the first frame may arrive alone), not one per frame.
    assert!(reads <= 2, "{reads} reads for three frames");
}
