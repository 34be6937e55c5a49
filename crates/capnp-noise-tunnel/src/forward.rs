//! Copying bytes between two streams, both directions at once.
//!
//! [`forward`] is `tokio::io::copy_bidirectional_with_sizes` (with its
//! buffers kept by the thread between connections) and the bookkeeping a
//! tunnel needs around it:
//!
//! * **Half-close.** When one stream's read ends, the other stream's
//!   writing side is shut down (for a [`NoiseStream`] that sends the
//!   authenticated CLOSE; for TCP a FIN), and the other direction keeps
//!   going until its read ends too.
//! * **Backpressure.** Each direction owns one buffer of [`BUFFER_SIZE`]
//!   bytes and reads again only when the buffer has been written: a slow
//!   reader on one end slows the writer on the other end, and nothing
//!   queues up in between.
//! * **Flushing.** A direction flushes its writer whenever its reader has
//!   nothing more right now (the read would block), so buffered writers
//!   such as [`NoiseStream`] seal a frame as soon as a burst of input
//!   ends: interactive traffic is not delayed, and bulk traffic still fills
//!   whole frames.
//! * **Accounting.** Bytes are counted per direction, and when a stream
//!   fails, which stream and which operation failed is recorded, so the
//!   end of every connection can be logged and explained.
//! * **Idle timeout.** Given one, forwarding ends ([`End::Idle`]) once no
//!   byte has moved either way for that long (checked four times per
//!   timeout, so it ends at most a quarter of it late).
//! * **Keepalive.** [`WithKeepalive`] wraps the capnp-noise stream so that
//!   an idle sending direction still puts an authenticated (empty) frame
//!   on the wire at each interval.
//!
//! The function is generic over `AsyncRead + AsyncWrite`: the tests drive
//! it over `tokio::io::duplex` pipes.
//!
//! [`NoiseStream`]: capnp_noise::stream::NoiseStream

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use capnp_noise::stream::NoiseStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// The buffer size of each direction: [`BULK_FRAMES`] maximal capnp-noise
/// frames' worth of plaintext (about 256 KiB), so that one read from the
/// plain socket is sealed into several whole frames that leave in one write
/// (see [`Session::write`](capnp_noise::wire::Session::write)), and one read
/// of the noise stream hands over several frames' plaintext that the plain
/// socket takes in one write.
///
/// [`BULK_FRAMES`]: capnp_noise::wire::BULK_FRAMES
pub const BUFFER_SIZE: usize =
    capnp_noise::wire::BULK_FRAMES * capnp_noise::wire::MAX_DATA_PER_FRAME;

/// One of the two streams given to [`forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The first stream (`a`).
    A,
    /// The second stream (`b`).
    B,
}

/// An operation on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reading from it.
    Read,
    /// Writing to it (including flushing).
    Write,
    /// Shutting down its writing side after the other stream's read ended.
    Shutdown,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "reading",
            Op::Write => "writing",
            Op::Shutdown => "closing",
        })
    }
}

/// How a forwarding ended.
#[derive(Debug)]
pub enum End {
    /// Both directions ended: each stream's read reached its end and the
    /// other stream's writing side was shut down.
    Closed,
    /// An operation on one stream failed; the other direction was abandoned.
    Failed {
        /// The stream that failed.
        stream: Stream,
        /// What was being done to it.
        op: Op,
        /// The error.
        error: io::Error,
    },
    /// The `cancel` future of [`forward`] completed first.
    Cancelled,
    /// No byte moved either way for the idle timeout given to [`forward`].
    Idle(Duration),
}

/// What [`forward`] did.
#[derive(Debug)]
pub struct Forwarded {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
    /// How it ended.
    pub end: End,
}

/// Copies `a` to `b` and `b` to `a` concurrently until both directions have
/// ended, one stream fails, no byte moved for `idle_timeout`, or `cancel`
/// completes (see the [module docs](self) for half-close, backpressure and
/// flushing).
///
/// Never fails itself: the outcome, with the bytes moved so far, is in the
/// returned [`Forwarded`]. The streams are borrowed, so the caller can
/// still act on them afterwards (for example reset a TCP connection whose
/// other end failed, rather than close it cleanly).
pub async fn forward<A, B, C>(
    a: &mut A,
    b: &mut B,
    idle_timeout: Option<Duration>,
    cancel: C,
) -> Forwarded
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    C: Future<Output = ()>,
{
    // Bytes written to a, and to b: atomics, so the idle watch can read
    // them while the copy holds the streams.
    let written = [AtomicU64::new(0), AtomicU64::new(0)];
    let mut ta = Tracked::new(a, &written[0]);
    let mut tb = Tracked::new(b, &written[1]);
    let idle = async {
        match idle_timeout {
            Some(timeout) => idle_for(timeout, &written).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = copy_both_ways(&mut ta, &mut tb) => Ok(r),
        () = cancel => Err(End::Cancelled),
        () = idle => Err(End::Idle(idle_timeout.unwrap_or_default())),
    };
    let end = match result {
        Err(end) => end,
        Ok(Ok(())) => End::Closed,
        Ok(Err(error)) => {
            // Blame the stream that saw the error; if both did (one error
            // can cause another), the one whose error this is.
            let (stream, op) = match (ta.failure, tb.failure) {
                (Some((op, _)), None) => (Stream::A, op),
                (None, Some((op, _))) => (Stream::B, op),
                (Some((op_a, kind_a)), Some((op_b, _))) => {
                    if kind_a == error.kind() {
                        (Stream::A, op_a)
                    } else {
                        (Stream::B, op_b)
                    }
                }
                // copy_bidirectional's own errors (a writer accepting zero
                // bytes) come from writing.
                (None, None) => (Stream::B, Op::Write),
            };
            End::Failed { stream, op, error }
        }
    };
    Forwarded {
        a_to_b: written[1].load(Relaxed),
        b_to_a: written[0].load(Relaxed),
        end,
    }
}

/// How many forwarding buffers a thread keeps for its next connections.
const SPARE_BUFFERS: usize = 8;

std::thread_local! {
    /// Forwarding buffers of ended connections, zeroed, for the next ones.
    static SPARES: std::cell::RefCell<Vec<Box<[u8]>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A forwarding buffer of [`BUFFER_SIZE`] bytes, taken from the thread's
/// spares if it has one. Dropped, it is zeroed as far as it was used (no
/// connection's plaintext outlives it) and kept as a spare (up to
/// [`SPARE_BUFFERS`]), or freed.
///
/// Why: allocated and freed per connection, as `copy_bidirectional` does,
/// the two 256 KiB buffers made glibc give the worker's heap top back to
/// the kernel at every connection's end (`madvise`) and fault the pages in
/// again at the next one: a connection and its first round trip took about
/// 15 % longer through a runtime per core (BENCHMARKS.md, "Tunnel").
struct Lent {
    buf: Box<[u8]>,
    /// How far it was written.
    used: usize,
}

impl Lent {
    fn take() -> Lent {
        let spare = SPARES.with(|s| s.borrow_mut().pop());
        Lent {
            buf: spare.unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice()),
            used: 0,
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf[..self.used].fill(0);
        // During the thread's teardown the spares are gone: just free it.
        let _ = SPARES.try_with(|s| {
            let mut spares = s.borrow_mut();
            if spares.len() < SPARE_BUFFERS {
                spares.push(buf);
            }
        });
    }
}

/// One direction of [`copy_both_ways`]: `tokio::io::copy`'s loop, then the
/// writer's shutdown.
struct Direction {
    buf: Lent,
    /// `buf[pos..cap]` is read and not yet written.
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Direction {
    fn new() -> Direction {
        Direction {
            buf: Lent::take(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    /// Copies from `r` to `w` until `r` ends, flushing `w` whenever `r` has
    /// nothing more right now; then flushes and shuts `w` down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        while !self.done {
            if self.pos == self.cap && !self.read_done {
                (self.pos, self.cap) = (0, 0);
                let mut read = ReadBuf::new(&mut self.buf.buf);
                match Pin::new(&mut *r).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        self.cap = read.filled().len();
                        self.read_done = self.cap == 0;
                        self.buf.used = self.buf.used.max(self.cap);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.need_flush {
                            std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.pos < self.cap {
                let n = std::task::ready!(
                    Pin::new(&mut *w).poll_write(cx, &self.buf.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the writer accepted no byte",
                    )));
                }
                self.pos += n;
                self.need_flush = true;
            }
            if self.read_done {
                if self.need_flush {
                    std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.need_flush = false;
                }
                std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `tokio::io::copy_bidirectional_with_sizes(a, b, BUFFER_SIZE,
/// BUFFER_SIZE)`, with the buffers [`Lent`] by the thread: both directions
/// at once, each shutting its writer down when its reader ends; the first
/// error of either ends both.
async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::new(), Direction::new());
    std::future::poll_fn(|cx| {
        let there = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let back = b_to_a.poll(cx, &mut *b, &mut *a)?;
        match (there, back) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Completes once the sum of `counters` has not changed for `timeout`,
/// looking four times per timeout.
async fn idle_for(timeout: Duration, counters: &[AtomicU64; 2]) {
    let total = || counters[0].load(Relaxed) + counters[1].load(Relaxed);
    let period = (timeout / 4).max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (mut seen, mut since) = (total(), Instant::now());
    loop {
        let now = ticks.tick().await;
        let moved = total();
        if moved != seen {
            (seen, since) = (moved, now);
        } else if now.duration_since(since) >= timeout {
            return;
        }
    }
}

/// A stream that can send something its peer reads as nothing.
pub trait Keepalive {
    /// Queues a keepalive after what was written so far; the next flush
    /// sends it.
    ///
    /// # Errors
    /// When the stream has failed or its writing side is shut down.
    fn send_keepalive(&mut self) -> io::Result<()>;
}

impl<S: AsyncRead + AsyncWrite + Unpin> Keepalive for NoiseStream<S> {
    fn send_keepalive(&mut self) -> io::Result<()> {
        self.queue_keepalive()
    }
}

/// A stream that sends a keepalive in each interval in which nothing else
/// was written to it (if given an interval; otherwise it only passes calls
/// through).
///
/// The interval is watched while the stream's reading side waits (which is
/// when [`forward`] polls it), so the per-write cost is one flag; a failed
/// keepalive is reported as a failed read. No keepalive is sent once the
/// writing side is shut down.
pub struct WithKeepalive<S> {
    inner: S,
    every: Option<Interval>,
    wrote: bool,
    flushing: bool,
    shut_down: bool,
}

impl<S> WithKeepalive<S> {
    /// Wraps `inner`; `every` `None`: no keepalives.
    pub fn new(inner: S, every: Option<Duration>) -> Self {
        let every = every.map(|period| {
            let mut i = tokio::time::interval_at(Instant::now() + period, period);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        WithKeepalive {
            inner,
            every,
            wrote: false,
            flushing: false,
            shut_down: false,
        }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: Keepalive + AsyncWrite + Unpin> WithKeepalive<S> {
    /// Sends a keepalive if an interval passed without a write; finishes
    /// flushing one. Pending registers the timer (or the flush).
    fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(every) = self.every.as_mut() else {
            return Ok(());
        };
        if self.shut_down {
            return Ok(());
        }
        while every.poll_tick(cx).is_ready() {
            if !std::mem::take(&mut self.wrote) && !self.flushing {
                self.inner.send_keepalive()?;
                self.flushing = true;
            }
        }
        if self.flushing {
            if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_flush(cx) {
                self.flushing = false;
                r?;
            }
        }
        Ok(())
    }
}

impl<S: Keepalive + AsyncRead + AsyncWrite + Unpin> AsyncRead for WithKeepalive<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if poll.is_pending() {
            if let Err(e) = this.poll_keepalive(cx) {
                return Poll::Ready(Err(io::Error::new(
                    e.kind(),
                    format!("sending a keepalive: {e}"),
                )));
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WithKeepalive<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.wrote = true;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut_down = true;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A stream that counts the bytes written to it and remembers its first
/// failure.
struct Tracked<'a, S: ?Sized> {
    inner: &'a mut S,
    written: &'a AtomicU64,
    failure: Option<(Op, io::ErrorKind)>,
}

impl<'a, S: ?Sized> Tracked<'a, S> {
    fn new(inner: &'a mut S, written: &'a AtomicU64) -> Self {
        Tracked {
            inner,
            written,
            failure: None,
        }
    }

    fn note<T>(&mut self, op: Op, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &poll {
            self.failure.get_or_insert((op, e.kind()));
        }
        poll
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Tracked<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        this.note(Op::Read, poll)
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Tracked<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            // One writer: a load and a store, no locked instruction.
            this.written
                .store(this.written.load(Relaxed) + n as u64, Relaxed);
        }
        this.note(Op::Write, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_flush(cx);
        this.note(Op::Write, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.inner).poll_shutdown(cx);
        this.note(Op::Shutdown, poll)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, BufWriter, DuplexStream};

    /// Two pipes with `forward` running between their inner ends; returns
    /// the outer ends and the forwarding task.
    fn pipes<A, B>(
        wrap_a: impl FnOnce(DuplexStream) -> A,
        wrap_b: impl FnOnce(DuplexStream) -> B,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<Forwarded>,
        tokio::sync::oneshot::Sender<()>,
    )
    where
        A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (outer_a, inner_a) = duplex(16 * 1024);
        let (outer_b, inner_b) = duplex(16 * 1024);
        let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
        let (mut a, mut b) = (wrap_a(inner_a), wrap_b(inner_b));
        let task = tokio::spawn(async move {
            forward(&mut a, &mut b, None, async {
                // Dropping the sender without sending does not cancel.
                if cancel_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
            .await
        });
        (outer_a, outer_b, task, cancel_tx)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[tokio::test]
    async fn copies_both_ways_at_once_and_counts() {
        let (a, b, task, _cancel) = pipes(|s| s, |s| s);
        let up = pattern(3 << 20, 1);
        let down = pattern(2 << 20, 7);
        /// Sends `data` and closes, while reading everything that comes back.
        async fn talk(s: DuplexStream, data: &[u8]) -> Vec<u8> {
            let (mut rd, mut wr) = tokio::io::split(s);
            let send = async {
                wr.write_all(data).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, r) = tokio::join!(send, rd.read_to_end(&mut got));
            r.unwrap();
            got
        }
        let (got_down, got_up) = tokio::join!(talk(a, &up), talk(b, &down));
        assert!(got_up == up, "a to b corrupted");
        assert!(got_down == down, "b to a corrupted");
        let done = task.await.unwrap();
        assert!(matches!(done.end, End::Closed), "{:?}", done.end);
        assert_eq!(done.a_to_b, up.len() as u64);
        assert_eq!(done.b_to_a, down.len() as u64);
    }

    /// The thread's spare forwarding buffers: (how many, all zero).
    fn spares() -> (usize, bool) {
        SPARES.with(|s| {
            let s = s.borrow();
            let zero = s
                .iter()
                .all(|b| b.len() == BUFFER_SIZE && b.iter().all(|&x| x == 0));
            (s.len(), zero)
        })
    }

    /// A connection's two buffers go back to its thread, zeroed (nothing
    /// of its plaintext stays), and the next connection takes them instead
    /// of allocating. Fails if the buffers are not kept, or kept unzeroed.
    #[tokio::test]
    async fn buffers_are_zeroed_and_kept_for_the_next_connection() {
        SPARES.with(|s| s.borrow_mut().clear());
        // On this thread (a current-thread runtime runs spawned tasks here).
        for round in 0..2u8 {
            let (mut a, mut b, task, _cancel) = pipes(|s| s, |s| s);
            if round == 1 {
                // Running: the two spares of round 0 are lent out.
                a.write_all(b"x").await.unwrap();
                let mut x = [0u8; 1];
                b.read_exact(&mut x).await.unwrap();
                assert_eq!(spares().0, 0, "the next connection allocated anew");
            }
            a.write_all(b"secret one way").await.unwrap();
            b.write_all(b"and the other").await.unwrap();
            a.shutdown().await.unwrap();
            b.shutdown().await.unwrap();
            let (mut x, mut y) = (Vec::new(), Vec::new());
            a.read_to_end(&mut x).await.unwrap();
            b.read_to_end(&mut y).await.unwrap();
            assert!(matches!(task.await.unwrap().end, End::Closed));
            assert_eq!(spares(), (2, true), "round {round}");
        }
    }

    #[tokio::test]
    async fn half_close_propagates_and_the_other_direction_continues() {
        let (mut a, mut b, task, _cancel) = pipes(|s| s, |s| s);
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();
        // b sees the request and then the end of it...
        let mut req = Vec::new();
        b.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        // ...and can still answer, at length, after that.
        let reply = pattern(1 << 20, 3);
        let answer = async {
            b.write_all(&reply).await.unwrap();
            b.flush().await.unwrap();
            tokio::task::yield_now().await;
            assert!(
                !task.is_finished(),
                "forwarding ended with one direction open"
            );
            b.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, r) = tokio::join!(answer, a.read_to_end(&mut got));
        r.unwrap();
        assert!(got == reply);
        let done = task.await.unwrap();
        assert!(matches!(done.end, End::Closed));
        assert_eq!((done.a_to_b, done.b_to_a), (7, reply.len() as u64));
    }

    #[tokio::test]
    async fn a_buffered_writer_is_flushed_when_input_pauses() {
        // b is wrapped in a writer that sends nothing until flushed (as a
        // NoiseStream): a small message must still get through at once.
        let (mut a, mut b, task, _cancel) = pipes(|s| s, |s| BufWriter::with_capacity(1 << 20, s));
        for round in 0..3u8 {
            a.write_all(&[round; 5]).await.unwrap();
            let mut got = [0u8; 5];
            tokio::time::timeout(Duration::from_secs(10), b.read_exact(&mut got))
                .await
                .expect("a paused input was not flushed through")
                .unwrap();
            assert_eq!(got, [round; 5]);
        }
        drop((a, b));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_reader_that_stops_stops_the_writer() {
        // Nobody reads b: what a can write is bounded by the two pipes and
        // one forwarding buffer, whatever it tries to send.
        let (mut a, b, task, cancel) = pipes(|s| s, |s| s);
        let data = pattern(16 << 20, 5);
        let mut sent = 0usize;
        let res = tokio::time::timeout(Duration::from_millis(300), async {
            for chunk in data.chunks(4096) {
                a.write_all(chunk).await.unwrap();
                sent += chunk.len();
            }
        })
        .await;
        assert!(res.is_err(), "16 MiB went into a stream nobody reads");
        assert!(
            sent <= 2 * 16 * 1024 + BUFFER_SIZE + 4096,
            "{sent} bytes buffered"
        );
        cancel.send(()).unwrap();
        let done = task.await.unwrap();
        assert!(matches!(done.end, End::Cancelled));
        assert!(done.a_to_b <= 16 * 1024);
        drop(b);
    }

    /// A stream that fails at the first read with ConnectionReset.
    struct Resets;

    impl AsyncRead for Resets {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Resets {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failure_names_the_stream_and_the_operation() {
        let (a, _b, task, _cancel) = pipes(|s| s, |_| Resets);
        let done = task.await.unwrap();
        match done.end {
            End::Failed { stream, op, error } => {
                assert_eq!((stream, op), (Stream::B, Op::Read));
                assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        drop(a);

        let (_a, b, task, _cancel) = pipes(|_| Resets, |s| s);
        let done = task.await.unwrap();
        assert!(matches!(
            done.end,
            End::Failed {
                stream: Stream::A,
                op: Op::Read,
                ..
            }
        ));
        drop(b);
    }

    #[tokio::test]
    async fn cancel_ends_it_with_the_counts_so_far() {
        let (mut a, mut b, task, cancel) = pipes(|s| s, |s| s);
        a.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        cancel.send(()).unwrap();
        let done = task.await.unwrap();
        assert!(matches!(done.end, End::Cancelled));
        assert_eq!((done.a_to_b, done.b_to_a), (5, 0));
    }

    #[tokio::test]
    async fn an_idle_timeout_ends_a_silent_forwarding_and_data_postpones_it() {
        let (mut a, mut b) = (duplex(1024), duplex(1024));
        let timeout = Duration::from_millis(300);
        let task = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let done = forward(&mut a.1, &mut b.1, Some(timeout), std::future::pending()).await;
            (done, started.elapsed())
        });
        // Data every 100 ms for 600 ms: twice the timeout, and not idle.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.0.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            b.0.read_exact(&mut got).await.unwrap();
        }
        assert!(!task.is_finished(), "ended while data moved");
        let (done, took) = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("an idle forwarding did not end")
            .unwrap();
        assert!(
            matches!(done.end, End::Idle(t) if t == timeout),
            "{:?}",
            done.end
        );
        assert_eq!((done.a_to_b, done.b_to_a), (6, 0));
        // The last byte at about 600 ms, then at most a quarter late.
        assert!(took >= Duration::from_millis(850), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    /// A pipe end that counts the keepalives asked of it.
    struct Counting(DuplexStream, Arc<AtomicUsize>);

    impl Keepalive for Counting {
        fn send_keepalive(&mut self) -> io::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    impl AsyncRead for Counting {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn keepalives_go_out_only_in_intervals_without_writes() {
        let count = Arc::new(AtomicUsize::new(0));
        let (mut a, b) = (duplex(1024), duplex(1024));
        let (mut b_outer, b_inner) = b;
        let mut noise = WithKeepalive::new(
            Counting(b_inner, count.clone()),
            Some(Duration::from_millis(100)),
        );
        let task = tokio::spawn(async move {
            forward(&mut a.1, &mut noise, None, std::future::pending()).await
        });
        let sent = || count.load(std::sync::atomic::Ordering::SeqCst);
        // Idle for 550 ms: one keepalive per 100 ms interval.
        tokio::time::sleep(Duration::from_millis(550)).await;
        let idle = sent();
        assert!(
            (4..=6).contains(&idle),
            "{idle} keepalives in 5.5 intervals"
        );
        // Writing every 20 ms for 500 ms: none.
        for _ in 0..25 {
            a.0.write_all(b"y").await.unwrap();
            let mut got = [0u8; 1];
            b_outer.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            sent() <= idle + 1,
            "{} keepalives while writing",
            sent() - idle
        );
        // Once this side shut its writing down, none either.
        a.0.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b_outer.read_to_end(&mut rest).await.unwrap();
        let closed = sent();
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(sent(), closed, "keepalives after the shutdown");
        drop(b_outer);
        task.await.unwrap();
    }
}
