//! [`LazyStream`]: a resuming initiator that starts its handshake at the
//! first write, so that the first bytes the application writes (for RPC:
//! the bootstrap request and the first call) can travel with `IK` message 1
//! (SPEC.md 14).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::{early_data_room, resuming, Handshaking, NoiseStream, StreamConfig};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::policy::PeerPolicy;
use crate::vat_id::VatId;
use crate::wire::{EarlyData, EarlyDataChoice, ResumptionCache};

/// The most tasks a [`LazyStream`] wakes when its handshake ends (the tasks
/// that polled it while another drove the handshake: a reader and a writer
/// of a split stream, and one asking for [`LazyStream::poll_established`]).
const MAX_WAITERS: usize = 4;

/// Starts a connection as the initiator over `io` with the vat `server`,
/// **lazily**: nothing is sent until the first write (or flush, read,
/// shutdown), so that the first bytes written can go with the handshake's
/// first message.
///
/// When the handshake starts, it is [`connect_resuming`](super::connect_resuming)'s:
/// `IK` if `cache` holds a record of `server` (SPEC.md 14), else `XX`, and
/// what it learns is recorded in `cache`. The bytes written before it
/// started (at most the room in `IK` message 1, 3862 bytes with the
/// canonical identity payload: a write beyond that starts the handshake,
/// and the rest of it waits for the handshake to end, so nothing is
/// buffered without bound) go
///
/// * in `IK` message 1, as early data, only if `early` is
///   [`EarlyDataChoice::ReplayableNotForwardSecret`] (read its warning:
///   they can be replayed and are not forward secret) and the server is
///   known; if the server refuses them or falls back to `XX` (its static
///   key changed), they are sent again after the handshake, exactly once;
/// * otherwise as the first transport frame, right after the answer to
///   `IK` message 1 (or with `XX` message 3).
///
/// The handshake starts at the first of: a write that fills the room, a
/// flush, a shutdown, a read after bytes were written, or a read that has
/// waited [`StreamConfig::lazy_start_wait`] (default 50 ms) without any
/// write (for protocols where the server speaks first; there the lazy
/// stream saves nothing). [`StreamConfig::handshake_timeout`] runs from the
/// start of the handshake.
///
/// Errors of the handshake come out of the read, write or flush that drove
/// it, as [`io::Error`]s wrapping [`Error`], and stay (sticky). A responder
/// of revision 1.1 closes silently on `IK`: the record is forgotten, and a
/// new connection runs `XX` (SPEC.md 14.6).
///
/// ```no_run
/// # async fn f(tcp: tokio::net::TcpStream, me: capnp_noise::Identity, server: capnp_noise::VatId) -> std::io::Result<()> {
/// use std::sync::Arc;
/// use capnp_noise::stream::{self, StreamConfig};
/// use capnp_noise::wire::{EarlyDataChoice, ResumptionCache};
/// use capnp_noise::Pinned;
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
///
/// let cache = Arc::new(ResumptionCache::default()); // kept across connections
/// let mut s = stream::connect_lazy(
///     tcp,
///     &me,
///     Arc::new(Pinned(server)),
///     StreamConfig::default(),
///     cache.clone(),
///     &server,
///     EarlyDataChoice::Never, // the request goes right after IK message 2
/// );
/// s.write_all(b"GET /status\n").await?; // nothing sent yet
/// s.flush().await?; // the handshake, then the request
/// let mut answer = String::new();
/// s.read_to_string(&mut answer).await?;
/// # Ok(()) }
/// ```
pub fn connect_lazy<S>(
    io: S,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    config: StreamConfig,
    cache: Arc<ResumptionCache>,
    server: &VatId,
    early: EarlyDataChoice,
) -> LazyStream<S> {
    LazyStream {
        state: State::Idle(Box::new(Idle {
            io,
            room: early_data_room(identity),
            identity: identity.clone(),
            policy,
            config,
            cache,
            server: *server,
            early,
            pending: Vec::new(),
            wait: None,
        })),
        waiters: Vec::new(),
        defer_flush: false,
    }
}

/// A connection whose handshake starts at its first write: see
/// [`connect_lazy`]. Reads, writes, flushes and shutdowns drive the
/// handshake, then pass to the [`NoiseStream`] it opened, with the same
/// behaviour (flush after each message; end of stream only after the
/// peer's authenticated CLOSE).
pub struct LazyStream<S> {
    state: State<S>,
    /// Tasks that polled while another drove the handshake, woken when it
    /// ends (at most [`MAX_WAITERS`]).
    waiters: Vec<Waker>,
    /// For the capnp-rpc glue (see [`set_defer_flush`](Self::set_defer_flush)).
    defer_flush: bool,
}

// Open is the state a stream spends its life in: it stays inline (no
// pointer to follow per read and write), and the others are small or boxed.
#[allow(clippy::large_enum_variant)]
enum State<S> {
    Idle(Box<Idle<S>>),
    /// Boxed: a handshake in progress is more than twice an open stream.
    Handshaking(Box<Handshaking<S>>),
    Open(NoiseStream<S>),
    Failed(Error),
}

/// Everything the handshake needs, until it starts.
struct Idle<S> {
    io: S,
    identity: Identity,
    policy: Arc<dyn PeerPolicy>,
    config: StreamConfig,
    cache: Arc<ResumptionCache>,
    server: VatId,
    early: EarlyDataChoice,
    /// Bytes written before the handshake, at most `room`.
    pending: Vec<u8>,
    room: usize,
    /// A read's wait for a first write.
    wait: Option<Pin<Box<Sleep>>>,
}

impl<S> fmt::Debug for LazyStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Idle(i) => format!("idle, {} bytes written", i.pending.len()),
            State::Handshaking(_) => "handshaking".into(),
            State::Open(s) => format!("{s:?}"),
            State::Failed(e) => format!("failed: {e}"),
        };
        f.debug_struct("LazyStream")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<S> From<NoiseStream<S>> for LazyStream<S> {
    /// A stream whose handshake is already done.
    fn from(stream: NoiseStream<S>) -> Self {
        LazyStream {
            state: State::Open(stream),
            waiters: Vec::new(),
            defer_flush: false,
        }
    }
}

impl<S> LazyStream<S> {
    /// The stream, once the handshake has completed.
    pub fn established(&self) -> Option<&NoiseStream<S>> {
        match &self.state {
            State::Open(s) => Some(s),
            _ => None,
        }
    }

    /// Whether the handshake has started (or ended).
    pub fn started(&self) -> bool {
        !matches!(self.state, State::Idle(_))
    }

    /// The handshake's error, if it failed.
    pub fn error(&self) -> Option<&Error> {
        match &self.state {
            State::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// For the capnp-rpc glue only: a flush before the handshake started
    /// does not start it, but wakes the task, whose next read starts it.
    /// capnp-rpc flushes after every message, and by the time it runs the
    /// application has usually queued its first call behind the bootstrap
    /// request: this lets both go in `IK` message 1 (or the first frame).
    /// Only sound where the same task always polls the read side, as an
    /// `RpcSystem` does.
    pub(crate) fn set_defer_flush(&mut self, defer: bool) {
        self.defer_flush = defer;
    }

    fn wait_here(&mut self, cx: &Context<'_>) {
        if self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            return;
        }
        if self.waiters.len() >= MAX_WAITERS {
            self.waiters.remove(0);
        }
        self.waiters.push(cx.waker().clone());
    }

    fn wake_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> LazyStream<S> {
    /// Starts the handshake (if it has not started) with the bytes written
    /// so far.
    fn start(&mut self) {
        if !matches!(self.state, State::Idle(_)) {
            return;
        }
        let placeholder = State::Failed(Error::Internal("a lazy stream's handshake did not start"));
        let State::Idle(idle) = std::mem::replace(&mut self.state, placeholder) else {
            return;
        };
        let Idle {
            io,
            identity,
            policy,
            config,
            cache,
            server,
            early,
            pending,
            ..
        } = *idle;
        // The container zeroizes the bytes it is given when dropped; they
        // are early data only if `early` allows and the server is known.
        let first =
            (!pending.is_empty()).then(|| EarlyData::replayable_not_forward_secret(pending));
        let early_ok = early == EarlyDataChoice::ReplayableNotForwardSecret;
        self.state = State::Handshaking(Box::new(resuming(
            io, &identity, policy, config, cache, &server, first, early_ok,
        )));
        self.wake_waiters();
    }

    /// Starts the handshake if needed and drives it until the stream is
    /// open (or failed).
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.start();
        if let State::Handshaking(h) = &mut self.state {
            let done = match Pin::new(&mut **h).poll(cx) {
                Poll::Pending => {
                    self.wait_here(cx);
                    return Poll::Pending;
                }
                Poll::Ready(Ok(stream)) => State::Open(stream),
                Poll::Ready(Err(e)) => State::Failed(e),
            };
            self.state = done;
            self.wake_waiters();
        }
        match &self.state {
            State::Failed(e) => Poll::Ready(Err(e.clone().into())),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// The open stream, once [`poll_open`](Self::poll_open) returned `Ok`.
    fn open(&mut self) -> io::Result<Pin<&mut NoiseStream<S>>> {
        match &mut self.state {
            State::Open(s) => Ok(Pin::new(s)),
            _ => Err(io::Error::other(Error::Internal(
                "a lazy stream was used before it was open",
            ))),
        }
    }

    /// Drives the handshake (starting it if it has not started) until the
    /// stream is open. Resolves at once on a stream that is open.
    ///
    /// # Errors
    /// The handshake's error ([`connect_resuming`](super::connect_resuming)).
    pub fn poll_established(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        ready!(self.poll_open(cx)).map_err(|_| match &self.state {
            State::Failed(e) => e.clone(),
            _ => Error::Internal("a lazy stream failed without an error"),
        })?;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for LazyStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Idle(idle) = &mut this.state {
            if idle.pending.is_empty() {
                // Nothing written yet: give a first write a moment to come.
                let t = idle.config.lazy_start_wait;
                let wait = idle
                    .wait
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
                if wait.as_mut().poll(cx).is_pending() {
                    this.wait_here(cx);
                    return Poll::Pending;
                }
            }
        }
        ready!(this.poll_open(cx))?;
        this.open()?.poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LazyStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Idle(idle) = &mut this.state {
            let n = buf.len().min(idle.room - idle.pending.len());
            if idle.pending.capacity() == 0 && n > 0 {
                // Once, at its final size: no reallocation leaves a copy of
                // the bytes behind (they are zeroized when sent).
                idle.pending.reserve_exact(idle.room);
            }
            idle.pending.extend_from_slice(&buf[..n]);
            if idle.pending.len() == idle.room {
                this.start();
            } else {
                // A read waiting for this write starts the handshake now.
                this.wake_waiters();
            }
            if n > 0 || buf.is_empty() {
                return Poll::Ready(Ok(n));
            }
        }
        ready!(this.poll_open(cx))?;
        this.open()?.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Idle(idle) = &this.state {
            if this.defer_flush && !idle.pending.is_empty() {
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
        }
        ready!(this.poll_open(cx))?;
        this.open()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_open(cx))?;
        this.open()?.poll_shutdown(cx)
    }
}
