//! [`NoiseStream`]: the encrypted, authenticated byte stream on tokio.
//!
//! A thin poll adapter over the sans-IO core: [`connect`] and [`accept`]
//! return a [`Handshaking`] future that drives a [`Handshake`] over any
//! `tokio::io::AsyncRead + AsyncWrite` (a `TcpStream`, a `UnixStream`, a
//! `tokio::io::duplex` pipe...) and resolves to a [`NoiseStream`], which
//! implements tokio's `AsyncRead` and `AsyncWrite` over the established
//! [`Session`]. All protocol logic lives in [`crate::wire`]; this module only
//! moves bytes between the session's buffers and the inner stream.
//!
//! ```no_run
//! use std::sync::Arc;
//! use capnp_noise::stream::{self, StreamConfig};
//! use capnp_noise::{Identity, Pinned, VatId};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # async fn demo(server: VatId) -> Result<(), Box<dyn std::error::Error>> {
//! let me = Identity::generate();
//! let tcp = tokio::net::TcpStream::connect("127.0.0.1:4000").await?;
//! let config = StreamConfig::default().with_dialed("127.0.0.1:4000");
//! // Fails with Error::PeerRefused, before revealing `me`, unless the server is `server`.
//! let mut s = stream::connect(tcp, &me, Arc::new(Pinned(server)), config).await?;
//! assert_eq!(s.peer_vat_id(), server);
//! s.write_all(b"hello").await?;
//! s.flush().await?; // writes are buffered until a frame is full or this flush
//! s.shutdown().await?; // the authenticated CLOSE: the peer's read returns end-of-stream
//! let mut answer = Vec::new();
//! s.read_to_end(&mut answer).await?; // half-close: reading still works
//! # Ok(()) }
//! ```
//!
//! # Handing the stream to capnp-rpc
//!
//! capnp-rpc takes `futures::io` streams; `tokio_util::compat` converts
//! (this is what [`crate::rpc`] does, which also sends the authenticated
//! CLOSE when the `RpcSystem` ends, something capnp-rpc never asks for):
//!
//! ```no_run
//! use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
//! use tokio_util::compat::TokioAsyncReadCompatExt;
//! # async fn demo(stream: capnp_noise::stream::NoiseStream<tokio::net::TcpStream>) {
//! let (reader, writer) = futures::AsyncReadExt::split(stream.compat());
//! let network = twoparty::VatNetwork::new(reader, writer, Side::Client, Default::default());
//! let mut rpc_system = RpcSystem::new(Box::new(network), None);
//! let bootstrap: capnp::capability::Client = rpc_system.bootstrap(Side::Server);
//! tokio::task::spawn_local(rpc_system);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::admission::{HandshakeSlots, SlotPermit};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::policy::{PeerContext, PeerPolicy};
use crate::vat_id::VatId;
use crate::wire::{
    EarlyData, EarlyDataOutcome, Handshake, HandshakeConfig, Pattern, ReadOutcome, ResumptionCache,
    ResumptionConfig, Role, Session, Suite, EOF_BEFORE_MESSAGE_2, HANDSHAKE_HASH_LEN,
    MAX_DATA_PER_FRAME,
};

mod lazy;
pub use lazy::{connect_lazy, LazyStream};

/// The default limit on how long a handshake may take: 10 seconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many bytes the handshake reads from the inner stream at a time. Well
/// below one maximal transport frame, so whatever the peer sent after its
/// last handshake message always fits in the session.
const HANDSHAKE_READ_CHUNK: usize = 4096;

/// Settings of one [`connect`] or [`accept`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StreamConfig {
    /// Suites and session settings.
    pub handshake: HandshakeConfig,
    /// The longest the handshake may take, or `None` for no limit (only for
    /// trusted peers: a peer that stalls would hold the connection forever).
    /// Default [`DEFAULT_HANDSHAKE_TIMEOUT`]. Needs a tokio runtime with
    /// the time driver enabled.
    pub handshake_timeout: Option<Duration>,
    /// The address the initiator dialed, as the user wrote it; passed to the
    /// [`PeerPolicy`] in [`PeerContext::dialed`].
    pub dialed: Option<String>,
    /// For [`accept`]: the listener's limits on handshakes in progress. With
    /// them, the responder reads the preamble and message 1 at no
    /// public-key cost, then takes a slot (from
    /// [`remote_addr`](Self::remote_addr)'s share) before computing message
    /// 2, and holds it until the handshake ends; one that fails keeps it for
    /// the slots' failure hold, unless the peer had already hung up when it
    /// was admitted (then nothing is computed and the slot is free at once).
    /// The
    /// [`handshake_timeout`](Self::handshake_timeout) bounds the time until
    /// admission (reading message 1 and waiting for a slot) and then, from
    /// admission on, the rest of the handshake: a slot serves a stalled peer
    /// for at most one timeout. `None` (the default): no limit.
    pub handshake_slots: Option<HandshakeSlots>,
    /// The peer's socket address, if known; passed to the policy in
    /// [`PeerContext::remote_addr`].
    pub remote_addr: Option<SocketAddr>,
    /// For [`accept`]: the longest the initiator may take, from the first
    /// poll, to deliver its preamble and message 1 (a few dozen bytes it
    /// sends at once), separately from and usually much shorter than
    /// [`handshake_timeout`](Self::handshake_timeout): a connection that
    /// says nothing holds its socket and connection permit only this long.
    /// The time spent waiting for a handshake slot after message 1 does not
    /// count. `None` (the default): only the handshake timeout applies.
    /// Servers in this crate use
    /// [`DEFAULT_FIRST_MESSAGE_TIMEOUT`](crate::admission::DEFAULT_FIRST_MESSAGE_TIMEOUT).
    pub first_message_timeout: Option<Duration>,
    /// For [`accept`]: whether to answer `IK` and take early data
    /// (SPEC.md 14). Default: neither; an `IK` initiator gets the `XX`
    /// fallback. See [`ResumptionConfig`] before turning them on: early
    /// data is replayable, and an `IK` handshake completes before the
    /// initiator has proven it is live. With
    /// [`handshake_slots`](Self::handshake_slots), the returned stream then
    /// keeps the slot until the initiator's first frame authenticates,
    /// and gives it up for the failure hold if the stream fails or the
    /// handshake timeout passes first, which it sees only while it is
    /// read: read it.
    pub resumption: ResumptionConfig,
    /// For [`connect_lazy`]: how long a read waits for a first write before
    /// the handshake starts without one. Default
    /// [`DEFAULT_LAZY_START_WAIT`], 50 ms.
    pub lazy_start_wait: Duration,
}

/// The default of [`StreamConfig::lazy_start_wait`]: 50 ms.
pub const DEFAULT_LAZY_START_WAIT: Duration = Duration::from_millis(50);

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            handshake: HandshakeConfig::default(),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            dialed: None,
            remote_addr: None,
            handshake_slots: None,
            first_message_timeout: None,
            resumption: ResumptionConfig::default(),
            lazy_start_wait: DEFAULT_LAZY_START_WAIT,
        }
    }
}

impl StreamConfig {
    /// Sets [`handshake`](Self::handshake).
    pub fn with_handshake(mut self, handshake: HandshakeConfig) -> Self {
        self.handshake = handshake;
        self
    }

    /// Sets [`handshake_timeout`](Self::handshake_timeout).
    pub fn with_handshake_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Sets [`dialed`](Self::dialed).
    pub fn with_dialed(mut self, dialed: impl Into<String>) -> Self {
        self.dialed = Some(dialed.into());
        self
    }

    /// Sets [`remote_addr`](Self::remote_addr).
    pub fn with_remote_addr(mut self, addr: SocketAddr) -> Self {
        self.remote_addr = Some(addr);
        self
    }

    /// Sets [`first_message_timeout`](Self::first_message_timeout).
    pub fn with_first_message_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.first_message_timeout = timeout;
        self
    }

    /// Sets [`resumption`](Self::resumption).
    pub fn with_resumption(mut self, resumption: ResumptionConfig) -> Self {
        self.resumption = resumption;
        self
    }

    /// Sets [`lazy_start_wait`](Self::lazy_start_wait).
    pub fn with_lazy_start_wait(mut self, wait: Duration) -> Self {
        self.lazy_start_wait = wait;
        self
    }

    /// Sets [`handshake_slots`](Self::handshake_slots).
    pub fn with_handshake_slots(mut self, slots: HandshakeSlots) -> Self {
        self.handshake_slots = Some(slots);
        self
    }
}

/// Starts the handshake as the initiator over `io`.
///
/// The returned future sends the preamble and message 1, checks the
/// responder's proven VatId against `policy` and, only if it is accepted,
/// sends message 3 (which reveals `identity`). It resolves once message 3 is
/// written and flushed.
///
/// # Errors
/// The future fails with [`Error::PeerRefused`] when `policy` refuses the
/// responder, [`Error::HandshakeTimeout`], [`Error::UnexpectedEof`] when the
/// responder hangs up (an EOF or a reset alike), [`Error::Io`], or any
/// protocol error of [`Handshake::feed`]. A responder that does not accept
/// the proposed suite hangs up without a word: the error's `during` is then
/// [`EOF_BEFORE_MESSAGE_2`], and
/// [`HandshakeConfig::fallback_after`] says whether to try once more, on a
/// new connection, with the mandatory suite (SPEC.md 2; this function has
/// one stream and cannot). A responder that refuses *this* side's VatId can
/// only hang up after the handshake: see [`NoiseStream`]'s reading.
pub fn connect<S>(
    io: S,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    config: StreamConfig,
) -> Handshaking<S> {
    let ctx = PeerContext::initiator(config.dialed, config.remote_addr);
    let hs = Handshake::initiator(identity, policy, ctx, config.handshake);
    Handshaking::new(io, hs, config.handshake_timeout, None)
}

/// Starts a handshake as the initiator over `io` with the vat `server`,
/// resuming (SPEC.md 14: Noise `IK`) if `cache` holds a record of it, and
/// recording what the handshake learned in `cache` when it succeeds (after
/// `XX`, and after `IK`'s fallback, which replaces a stale record).
///
/// `early`, if given, are the first bytes of the stream. With a record
/// they travel in `IK` message 1, and the responder's answer to them can
/// arrive one round trip sooner; otherwise, or if the responder refuses
/// them or falls back, they are sent as the first transport data after the
/// handshake. Either way the responder reads them exactly once per
/// completed handshake; but a first flight that carried them can be
/// **replayed** by anyone who recorded it, and is **not forward secret**
/// against the responder's static key ([`EarlyData`]): send only
/// idempotent requests there.
///
/// A responder of revision 1.1, or one that does not accept the suite,
/// closes without a word after `IK` message 1: the error is then
/// [`Error::UnexpectedEof`] with [`EOF_BEFORE_MESSAGE_2`], the record is
/// forgotten, and calling this again on a new connection runs `XX`
/// (SPEC.md 14.6).
///
/// # Errors
/// As [`connect`]; and [`Error::Config`] if `early` does not fit `IK`
/// message 1 (at most 3862 bytes with the canonical identity payload).
///
/// ```no_run
/// # async fn f(tcp: tokio::net::TcpStream, me: capnp_noise::Identity, server: capnp_noise::VatId) -> capnp_noise::Result<()> {
/// use std::sync::Arc;
/// use capnp_noise::stream::{self, StreamConfig};
/// use capnp_noise::wire::{EarlyData, ResumptionCache};
/// use capnp_noise::Pinned;
///
/// let cache = Arc::new(ResumptionCache::default()); // shared by the application's connections
/// let stream = stream::connect_resuming(
///     tcp,
///     &me,
///     Arc::new(Pinned(server)),
///     StreamConfig::default(),
///     cache.clone(),
///     &server,
///     Some(EarlyData::replayable_not_forward_secret(&b"GET /status"[..])),
/// )
/// .await?;
/// # Ok(()) }
/// ```
pub fn connect_resuming<S>(
    io: S,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    config: StreamConfig,
    cache: Arc<ResumptionCache>,
    server: &VatId,
    early: Option<EarlyData>,
) -> Handshaking<S> {
    resuming(io, identity, policy, config, cache, server, early, true)
}

/// The most bytes an initiator with `identity` can send as early data:
/// `4096 - 98 -` its identity payload's length (SPEC.md 14.3), 3862 with
/// the canonical payload. The same whether or not the server is known, so
/// that whether a call may go early never depends on the cache.
pub fn early_data_room(identity: &Identity) -> usize {
    crate::wire::resumption::MAX_IK_MESSAGE_1_LEN
        - crate::wire::resumption::IK_MESSAGE_1_OVERHEAD
        - identity.handshake_payload().len()
}

/// [`connect_resuming`], and [`connect_lazy`] once it starts: `first` are
/// the first bytes of the stream, sent in `IK` message 1 only if `early_ok`
/// and the cache holds a record of `server`, else as the first transport
/// data after the handshake.
#[allow(clippy::too_many_arguments)]
fn resuming<S>(
    io: S,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    config: StreamConfig,
    cache: Arc<ResumptionCache>,
    server: &VatId,
    first: Option<EarlyData>,
    early_ok: bool,
) -> Handshaking<S> {
    let ctx = PeerContext::initiator(config.dialed, config.remote_addr);
    let room = early_data_room(identity);
    if let Some(e) = first.as_ref().filter(|e| e.as_bytes().len() > room) {
        let e = Error::Config(format!(
            "early data of {} bytes does not fit IK message 1 (at most {room} bytes with this identity)",
            e.as_bytes().len()
        ));
        return Handshaking::new(io, Err(e), None, None);
    }
    // A record of a suite this config no longer accepts is not used.
    let known = cache
        .get(server)
        .filter(|k| config.handshake.suites.contains(&k.suite()));
    let tried = known.as_ref().map(|k| *k.static_key());
    let (hs, after) = match known {
        Some(known) if early_ok => (
            Handshake::initiator_resuming(identity, policy, ctx, config.handshake, &known, first),
            None,
        ),
        Some(known) => (
            Handshake::initiator_resuming(identity, policy, ctx, config.handshake, &known, None),
            first,
        ),
        None => (
            Handshake::initiator(identity, policy, ctx, config.handshake),
            first,
        ),
    };
    let mut handshaking = Handshaking::new(io, hs, config.handshake_timeout, None);
    handshaking.resumption = Some(Box::new(Resumption {
        cache,
        server: *server,
        after,
        tried,
    }));
    handshaking
}

/// Starts the handshake as the responder over `io`.
///
/// The returned future waits for the initiator's preamble and message 1,
/// answers with message 2, and checks the initiator's proven VatId (message
/// 3) against `policy`.
///
/// # Errors
/// The future fails with [`Error::PeerRefused`] when `policy` refuses the
/// initiator (drop the stream: the initiator then sees the connection end
/// without an authenticated close), [`Error::HandshakeTimeout`],
/// [`Error::UnexpectedEof`] when the initiator hangs up (as it does when it
/// refuses this side's VatId: it never reveals its own),
/// [`Error::Protocol`] for anything but a capnp-noise initiator,
/// [`Error::Io`].
pub fn accept<S>(
    io: S,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    config: StreamConfig,
) -> Handshaking<S> {
    let ctx = PeerContext::responder(config.remote_addr);
    let admission = config.handshake_slots.map(|slots| Admission {
        slots,
        source: config.remote_addr.map(|a| a.ip()),
        waiting: None,
        permit: None,
    });
    let hs = Handshake::responder(identity, policy, ctx, config.handshake).map(|mut hs| {
        if admission.is_some() {
            hs.require_admission();
        }
        hs.set_resumption(config.resumption);
        hs
    });
    let mut handshaking = Handshaking::new(io, hs, config.handshake_timeout, admission);
    handshaking.first_message = config.first_message_timeout.map(|t| (t, None));
    handshaking
}

/// A handshake in progress: a future that resolves to the [`NoiseStream`]
/// (see [`connect`] and [`accept`]).
///
/// The timeout starts when the future is first polled. Dropping the future
/// abandons the handshake and drops the inner stream.
#[must_use = "a handshake does nothing unless awaited"]
pub struct Handshaking<S> {
    mid: Option<MidHandshake<S>>,
    error: Option<Error>,
    timeout: Option<Duration>,
    deadline: Option<Pin<Box<Sleep>>>,
    /// A responder's deadline for the preamble and message 1, until they
    /// have arrived.
    first_message: Option<(Duration, Option<Pin<Box<Sleep>>>)>,
    /// [`connect_resuming`]'s cache, and its early data when it goes after
    /// an `XX` handshake.
    /// Boxed: only resuming initiators have one, and a responder's
    /// handshake stalled before the preamble should stay small
    /// (`tests/handshake_memory.rs`).
    resumption: Option<Box<Resumption>>,
    /// The finished stream while it sends what its session already holds
    /// (early data sent again after the handshake, SPEC.md 14.5), so that
    /// it is on its way before the caller only reads.
    /// Boxed: a `NoiseStream` is large, and a future waiting for a
    /// handshake should stay small.
    draining: Option<Box<NoiseStream<S>>>,
}

struct Resumption {
    cache: Arc<ResumptionCache>,
    server: VatId,
    after: Option<EarlyData>,
    /// The static key of the record an `IK` attempt was encrypted to.
    tried: Option<[u8; 32]>,
}

struct MidHandshake<S> {
    io: S,
    hs: Handshake,
    unflushed: bool,
    admission: Option<Admission>,
    just_admitted: bool,
    /// Bytes read after message 1 while awaiting admission.
    held: Vec<u8>,
}

type SlotFuture = Pin<Box<dyn Future<Output = SlotPermit> + Send>>;

/// A responder's admission: the slot it waits for, then holds until the
/// handshake ends (and for the failure hold after, unless it completed).
struct Admission {
    slots: HandshakeSlots,
    source: Option<std::net::IpAddr>,
    waiting: Option<SlotFuture>,
    permit: Option<SlotPermit>,
}

impl Admission {
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.permit.is_some() {
            return Poll::Ready(());
        }
        let waiting = self.waiting.get_or_insert_with(|| {
            let slots = self.slots.clone();
            let source = self.source;
            Box::pin(async move { slots.acquire(source).await })
        });
        let permit = ready!(waiting.as_mut().poll(cx));
        self.waiting = None;
        self.permit = Some(permit);
        Poll::Ready(())
    }
}

impl<S> Handshaking<S> {
    fn new(
        io: S,
        hs: Result<Handshake>,
        timeout: Option<Duration>,
        admission: Option<Admission>,
    ) -> Self {
        let (mid, error) = match hs {
            Ok(hs) => (
                Some(MidHandshake {
                    io,
                    hs,
                    unflushed: false,
                    admission,
                    just_admitted: false,
                    held: Vec::new(),
                }),
                None,
            ),
            Err(e) => (None, Some(e)),
        };
        Handshaking {
            mid,
            error,
            timeout,
            deadline: None,
            first_message: None,
            resumption: None,
            draining: None,
        }
    }

    /// The inner stream, while the handshake is in progress.
    pub fn get_ref(&self) -> Option<&S> {
        self.mid.as_ref().map(|m| &m.io)
    }
}

impl<S> fmt::Debug for Handshaking<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshaking")
            .field("handshake", &self.mid.as_ref().map(|m| &m.hs))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for Handshaking<S> {
    type Output = Result<NoiseStream<S>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        if this.draining.is_some() {
            return this.poll_draining(cx);
        }
        if let Some(t) = this.timeout {
            let deadline = this
                .deadline
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(t)));
            if deadline.as_mut().poll(cx).is_ready() && this.mid.is_some() {
                this.mid = None;
                return Poll::Ready(Err(Error::HandshakeTimeout(t)));
            }
        }
        if let Some((t, sleep)) = this.first_message.as_mut() {
            if this.mid.as_ref().is_some_and(|m| m.hs.received_message_1()) {
                this.first_message = None;
            } else if this.mid.is_some() {
                let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(*t)));
                if sleep.as_mut().poll(cx).is_ready() {
                    this.mid = None;
                    return Poll::Ready(Err(Error::HandshakeTimeout(*t)));
                }
            }
        }
        let Some(mid) = this.mid.as_mut() else {
            return Poll::Ready(Err(Error::Misuse(
                "a handshake future was polled after it completed",
            )));
        };
        let poll = mid.poll_handshake(cx);
        if std::mem::take(&mut mid.just_admitted) {
            // Admitted: the rest of the handshake gets a whole timeout, so
            // a slot serves one stalled peer for that long, not a chain of
            // peers admitted moments before their deadlines.
            if let (Some(t), Some(deadline)) = (this.timeout, this.deadline.as_mut()) {
                deadline.as_mut().reset(tokio::time::Instant::now() + t);
                let _ = deadline.as_mut().poll(cx); // registers the new deadline
            }
        }
        let result = ready!(poll);
        let mid = this.mid.take().expect("checked above");
        let resumption = this.resumption.take();
        if let (Err(e), Some(r)) = (&result, &resumption) {
            // A responder that closes silently on IK (revision 1.1) would
            // do so every time: the next connection runs XX (SPEC.md 14.6).
            let silent =
                matches!(e, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2);
            if silent && mid.hs.pattern() == Pattern::IK {
                r.cache.forget(&r.server);
            }
        }
        let timeout = this.timeout;
        let stream = result.and_then(|()| {
            let facts = HandshakeFacts {
                pattern: mid.hs.pattern(),
                fell_back: mid.hs.fell_back(),
                early_data: mid.hs.early_data_outcome(),
            };
            let ik = mid.hs.role() == Role::Responder && facts.resumed();
            let learned = mid.hs.learned_responder();
            let mut session = mid.hs.into_session()?;
            if let Some(r) = resumption {
                match learned {
                    // A fallback that authenticated the very key the record
                    // held: the responder does not answer IK (SPEC.md 14.6),
                    // so the next connection runs XX rather than IK again.
                    Some(known) if facts.fell_back && r.tried == Some(*known.static_key()) => {
                        r.cache.forget(&r.server);
                    }
                    Some(known) => r.cache.insert(known),
                    None => {}
                }
                if let Some(early) = r.after {
                    session.write(early.as_bytes())?;
                    session.flush()?;
                }
            }
            // Completed: the slot is free at once (a failed handshake's
            // permit, dropped instead, keeps it for the failure hold). After
            // IK the initiator has not yet proven it is live (a replayed
            // message 1 completes too): the slot is held until its first
            // frame authenticates (SPEC.md 14.7).
            let mut unconfirmed = None;
            if let Some(permit) = mid.admission.and_then(|a| a.permit) {
                if ik {
                    let deadline = timeout.map(|t| (t, Box::pin(tokio::time::sleep(t))));
                    unconfirmed = Some(Box::new(Unconfirmed { permit, deadline }));
                } else {
                    permit.release_now();
                }
            }
            Ok(NoiseStream {
                session,
                io: mid.io,
                io_shut_down: false,
                unconfirmed,
                facts,
            })
        })?;
        if !stream.session.wants_write() {
            return Poll::Ready(Ok(stream));
        }
        this.draining = Some(Box::new(stream));
        this.poll_draining(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Handshaking<S> {
    fn poll_draining(&mut self, cx: &mut Context<'_>) -> Poll<Result<NoiseStream<S>>> {
        let stream = self.draining.as_mut().expect("draining");
        ready!(Pin::new(&mut **stream).poll_flush(cx))?;
        Poll::Ready(Ok(*self.draining.take().expect("draining")))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> MidHandshake<S> {
    /// Sends what the handshake has to say, then waits for the peer, until
    /// the handshake has finished and its last message is flushed.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        loop {
            while !self.hs.pending_output().is_empty() {
                let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.hs.pending_output()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                self.hs.consume_output(n);
                self.unflushed = true;
            }
            if self.unflushed {
                ready!(Pin::new(&mut self.io).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.hs.is_finished() {
                return Poll::Ready(Ok(()));
            }
            if self.hs.awaits_admission() {
                ready!(self.poll_admission(cx))?;
                self.hs.admit()?;
                self.just_admitted = self.admission.is_some();
                let held = std::mem::take(&mut self.held);
                self.feed_all(&held)?;
                continue;
            }
            let mut chunk = [0u8; HANDSHAKE_READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                // SPEC.md 2: before message 2 an initiator treats a reset
                // like any other end of the stream (a responder that
                // refuses the preamble may reset rather than close).
                Err(e) if self.hs.role() == Role::Initiator && ends_the_stream(&e) => {}
                r => r?,
            }
            let got = buf.filled();
            if got.is_empty() {
                // The handshake names the step and the likely cause.
                let e = self.hs.feed_eof().unwrap_or(Error::UnexpectedEof {
                    during: "during the handshake",
                });
                return Poll::Ready(Err(e));
            }
            self.feed_all(got)?;
        }
    }

    /// With handshake slots: waits for a slot, then checks, before any
    /// public-key work, that the peer is still there. A connection that
    /// waited (in the listen backlog or for a slot) may have been given up
    /// by its client, and a peer that sends message 1 and hangs up at once
    /// costs nothing this way: the slot is given back at once, without the
    /// failure hold. Bytes the check reads are held for after admission.
    fn poll_admission(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(admission) = self.admission.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        ready!(admission.poll_slot(cx));
        if !self.held.is_empty() {
            return Poll::Ready(Ok(())); // it sent more: it is there
        }
        let mut probe = [0u8; HANDSHAKE_READ_CHUNK];
        let mut buf = ReadBuf::new(&mut probe);
        let ended = match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
            Poll::Pending => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                self.held = buf.filled().to_vec();
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(())) => self.hs.feed_eof().unwrap_or(Error::UnexpectedEof {
                during: "while its message 1 waited for admission",
            }),
            Poll::Ready(Err(e)) => e.into(),
        };
        if let Some(permit) = admission.permit.take() {
            permit.release_now();
        }
        Poll::Ready(Err(ended))
    }

    /// Feeds `bytes` to the handshake. It takes everything (after its last
    /// message it keeps up to one maximal frame for the session, more than
    /// one chunk) except what follows message 1 while it awaits admission:
    /// that is held (at most one chunk) and fed after admission.
    fn feed_all(&mut self, bytes: &[u8]) -> Result<()> {
        let taken = self.hs.feed(bytes)?;
        if taken == bytes.len() {
            Ok(())
        } else if self.hs.awaits_admission() && self.held.is_empty() {
            self.held = bytes[taken..].to_vec();
            Ok(())
        } else {
            Err(Error::Internal(
                "the handshake left received bytes unconsumed",
            ))
        }
    }
}

/// Whether a read error means that the peer ended the byte stream.
fn ends_the_stream(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// An established capnp-noise connection over the inner stream `S`.
///
/// Obtained from [`connect`] or [`accept`]; the peer's VatId is
/// authenticated and was accepted by the local policy.
///
/// # Writing
/// Writes behave like a `BufWriter`: small writes are gathered into frames of
/// up to 65518 plaintext bytes, and a frame goes on the wire when it is full,
/// on [`flush`](tokio::io::AsyncWriteExt::flush) or on
/// [`shutdown`](tokio::io::AsyncWriteExt::shutdown). **Flush after each
/// message** whose answer you wait for. `poll_flush` seals everything
/// buffered, writes all of it to the inner stream and then flushes the inner
/// stream; it returns `Ready` only when all of that is done. `poll_write`
/// returns `Pending` only when it could accept no byte at all (the inner
/// stream is not taking the previous frame): backpressure, never an
/// unbounded queue.
///
/// `poll_shutdown` seals what is buffered and an authenticated CLOSE, writes
/// them out, and shuts down the inner stream's writing side. Reading keeps
/// working afterwards (half-close), and so does writing after the peer's
/// CLOSE.
///
/// # Reading
/// Ciphertext is read straight into the session's receive buffer (as many
/// frames per read as fit) and decrypted straight into the caller's buffer
/// when it can hold a whole frame (otherwise in place, then copied out). A
/// read returns
/// end-of-stream (`Ok(())` with nothing filled) **only after the peer's
/// authenticated CLOSE**. If the inner stream ends before it, the read fails
/// with an [`io::Error`] of kind [`io::ErrorKind::UnexpectedEof`] wrapping
/// [`Error::UnexpectedEof`] ("connection closed by the peer without an
/// authenticated close..."): a cut or truncated connection is never mistaken
/// for a clean end. A peer that fails authentication or breaks the protocol
/// gives [`io::ErrorKind::InvalidData`]. Session errors are sticky.
///
/// # Copies
/// A write of [`DIRECT_WRITE`](crate::wire::DIRECT_WRITE) bytes or more
/// (16 KiB) is encrypted from the caller's buffer straight into frames on
/// their way out, up to [`BULK_FRAMES`](crate::wire::BULK_FRAMES) frames
/// per write to the inner stream: no copy, whatever the size of the write.
/// Smaller writes are copied once into the frame being built. A read into
/// a buffer that holds a whole frame takes every whole frame already
/// received while it has room for another, each decrypted straight into it.
///
/// # Memory
/// Per connection, besides the inner stream and the Noise cipher states
/// (about 0.6 KiB with the C heap's AEAD contexts), the session holds three
/// buffers, each allocated on demand;
/// [`Session::buffer_capacity`] reports the total:
///
/// | buffer | allocated | size |
/// |---|---|---|
/// | ciphertext received | on the first read | 4 KiB, growing to one frame (66 KiB) while a large frame arrives, to 4 frames (262 KiB) while large frames keep arriving |
/// | frame being built | on the first small write | grows with the data, up to one frame |
/// | sealed frames to send | on the first write | one frame, a short frame and control frames; 4 frames (262 KiB) under large writes |
///
/// **Idle connections shrink by themselves**: when a read finds nothing to
/// read, and after a flush that wrote everything, the buffers that grew
/// beyond 4 KiB are released ([`Session::shrink_large_buffers`]). They go to
/// a small pool of spares kept by the thread (at most four), which growing
/// buffers take from first, so a busy stream reuses the same memory instead
/// of allocating per frame. An idle connection thus holds at most its small
/// buffers (4 KiB to receive, small messages' worth to send), and after
/// [`shrink_buffers`](Self::shrink_buffers) nothing. Measured with 1000
/// idle connections (`cargo bench --bench compare`, memory section): under
/// 2 KiB per connection end, C heap included, after 256 KiB each way. A
/// connection busy in both directions holds up to three large buffers,
/// about 600 KiB (about 200 KiB before [`BULK_FRAMES`](crate::wire::BULK_FRAMES):
/// the system calls per MiB this saves are in BENCHMARKS.md, "Tunnel").
pub struct NoiseStream<S> {
    io: S,
    session: Session,
    io_shut_down: bool,
    /// A responder's handshake slot after an `IK` handshake, held until the
    /// initiator's first frame authenticates (SPEC.md 14.7), at most until
    /// the deadline.
    unconfirmed: Option<Box<Unconfirmed>>,
    facts: HandshakeFacts,
}

/// What kind of handshake opened a [`NoiseStream`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HandshakeFacts {
    pattern: Pattern,
    fell_back: bool,
    early_data: EarlyDataOutcome,
}

impl HandshakeFacts {
    /// `IK` that completed as `IK` (SPEC.md 14.3), not through the fallback.
    fn resumed(&self) -> bool {
        self.pattern == Pattern::IK && !self.fell_back
    }
}

struct Unconfirmed {
    permit: SlotPermit,
    deadline: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl<S> fmt::Debug for NoiseStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoiseStream")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl<S> NoiseStream<S> {
    /// The peer's authenticated VatId.
    pub fn peer_vat_id(&self) -> VatId {
        self.session.peer_vat_id()
    }

    /// The Noise handshake hash, identical on both ends and unique to this
    /// connection (for channel binding).
    pub fn handshake_hash(&self) -> &[u8; HANDSHAKE_HASH_LEN] {
        self.session.handshake_hash()
    }

    /// The cipher suite in use.
    pub fn suite(&self) -> Suite {
        self.session.suite()
    }

    /// Whether this side initiated the connection.
    pub fn role(&self) -> Role {
        self.session.role()
    }

    /// The sans-IO session (read-only: state, errors, buffer sizes).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Whether the connection was resumed: an `IK` handshake (SPEC.md 14)
    /// that completed as `IK`, one round trip for the handshake with no
    /// third message. `false` after `XX` and after `IK`'s `XX` fallback
    /// (see [`fell_back`](Self::fell_back)).
    pub fn resumed(&self) -> bool {
        self.facts.resumed()
    }

    /// Whether an `IK` attempt ended in the `XX` fallback (SPEC.md 14.4):
    /// the responder's static key had changed, or it does not answer `IK`.
    pub fn fell_back(&self) -> bool {
        self.facts.fell_back
    }

    /// What became of the initiator's early data (SPEC.md 14.5); on the
    /// responder's side, [`EarlyDataOutcome::Accepted`] if it delivered
    /// early data to this stream.
    pub fn early_data_outcome(&self) -> EarlyDataOutcome {
        self.facts.early_data
    }

    /// Queues an authenticated keepalive (an empty DATA frame, see
    /// [`Session::keepalive`]) after anything written so far; the next
    /// `poll_flush` (or write) sends it. The peer reads nothing from it.
    ///
    /// # Errors
    /// After `poll_shutdown`, or when the session has failed.
    pub fn queue_keepalive(&mut self) -> io::Result<()> {
        self.session.keepalive().map_err(io::Error::from)
    }

    /// Releases the memory of empty buffers (see the table above); call it
    /// when the connection goes idle. They are allocated again when needed.
    pub fn shrink_buffers(&mut self) {
        self.session.shrink_buffers();
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The inner stream, mutably. Reading or writing it directly corrupts
    /// the session; use it for socket options.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> NoiseStream<S> {
    /// Reads from the inner stream into the session's receive buffer.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let space = self.session.recv_buffer();
        if space.is_empty() {
            // The session only reports NeedInput without a whole frame
            // buffered, and then it always has room.
            return Poll::Ready(Err(io::Error::other(
                "capnp-noise: receive buffer full without a complete frame",
            )));
        }
        let mut buf = ReadBuf::new(space);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        match buf.filled().len() {
            0 => self.session.feed_eof(),
            n => self.session.commit_recv(n),
        }
        Poll::Ready(Ok(()))
    }

    /// After an `IK` handshake, a responder's slot: given back once the
    /// initiator's first frame authenticated; dropped (kept for the failure
    /// hold) if the stream failed or the deadline passed first, which is
    /// returned.
    fn confirm(&mut self, failed: bool, cx: &mut Context<'_>) -> Option<Duration> {
        let u = self.unconfirmed.as_mut()?;
        if self.session.received_a_frame() {
            self.unconfirmed.take()?.permit.release_now();
            return None;
        }
        if failed {
            self.unconfirmed = None;
            return None;
        }
        let (t, sleep) = u.deadline.as_mut()?;
        let t = *t;
        if sleep.as_mut().poll(cx).is_ready() {
            self.unconfirmed = None;
            return Some(t);
        }
        None
    }

    /// Writes every sealed frame to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.wants_write() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.session.pending_output()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.session.consume_output(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for NoiseStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let read = this.session.read(buf.initialize_unfilled());
            if let Some(timed_out) = this.confirm(read.is_err(), cx) {
                return Poll::Ready(Err(Error::HandshakeTimeout(timed_out).into()));
            }
            match read {
                Ok(ReadOutcome::Data(n)) => {
                    buf.advance(n);
                    // Whole frames already received go into the same read
                    // while any frame surely fits (so each is decrypted
                    // straight into `buf`): the caller then writes them on
                    // with one call. An error is sticky: the next read
                    // reports it.
                    while buf.remaining() >= MAX_DATA_PER_FRAME {
                        match this.session.read(buf.initialize_unfilled()) {
                            Ok(ReadOutcome::Data(n)) => buf.advance(n),
                            _ => break,
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(ReadOutcome::Closed) => return Poll::Ready(Ok(())),
                Ok(ReadOutcome::NeedInput) if buf.remaining() == 0 => return Poll::Ready(Ok(())),
                Ok(ReadOutcome::NeedInput) => match this.poll_fill(cx) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        // Quiet: nothing to read, so large buffers can go
                        // (to the thread's spares: the next frame reuses them).
                        if this.session.buffered_ciphertext() == 0 {
                            this.session.shrink_large_buffers();
                        }
                        return Poll::Pending;
                    }
                },
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for NoiseStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut pos = 0;
        loop {
            match this.session.write(&buf[pos..]) {
                Ok(n) => pos += n,
                // Sticky: the next call reports it.
                Err(_) if pos > 0 => return Poll::Ready(Ok(pos)),
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            // Put sealed frames on the wire while the inner stream takes
            // them; stop (keeping what was accepted) when it does not.
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) if pos == buf.len() => return Poll::Ready(Ok(pos)),
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) | Poll::Pending if pos > 0 => return Poll::Ready(Ok(pos)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Drain before sealing more, so at most one frame waits at a time.
        ready!(this.poll_drain(cx))?;
        if this.session.buffered_plaintext() > 0 {
            this.session.flush()?;
            ready!(this.poll_drain(cx))?;
        }
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        // Everything written: large send buffers can go.
        this.session.shrink_large_buffers();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.session.local_closed() {
            ready!(this.poll_drain(cx))?;
            this.session.close()?;
        }
        ready!(this.poll_drain(cx))?;
        if !this.io_shut_down {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.io_shut_down = true;
        }
        Poll::Ready(Ok(()))
    }
}
