//! Cap'n Proto RPC over capnp-noise: [`serve`] and [`connect`].
//!
//! The glue is capnp-rpc's own two-party network
//! ([`capnp_rpc::twoparty::VatNetwork`]) running over a [`NoiseStream`]
//! instead of a plain socket, one `RpcSystem` per connection, driven on the
//! current [`tokio::task::LocalSet`] (capnp-rpc's types are `!Send`), as in
//! capnp-rpc's examples. What capnp-noise adds is *who*: each connection's
//! bootstrap capability is built from the peer's authenticated [`VatId`].
//!
//! # Knowing who calls
//!
//! [`serve`] calls a bootstrap factory once per authenticated connection,
//! with a [`PeerInfo`]. Capture the VatId in the server object, and every
//! method then knows which vat is calling, with no "login" call and nothing
//! the caller could forge. The factory can also decide what to expose: a
//! different capability per caller, or a restricted one. Such an object
//! speaks for its caller: do not hand it to anyone else (a network refuses
//! to introduce it unless its `on_redeem` hook builds each redeemer its
//! own: see [`crate::network`]).
//!
//! ```no_run
//! use capnp_noise::rpc::{self, PeerInfo, ServerConfig};
//! # use capnp_noise_test::schema::demo_capnp as office_capnp;
//! use office_capnp::office; // your schema, compiled by capnpc (see the crate docs)
//! use capnp_noise::{AnyVat, Identity, VatId};
//! use std::sync::Arc;
//!
//! struct Office {
//!     caller: VatId, // authenticated by the handshake
//! }
//!
//! impl office::Server for Office {
//!     async fn whoami(
//!         self: capnp::capability::Rc<Self>,
//!         _: office::WhoamiParams,
//!         mut results: office::WhoamiResults,
//!     ) -> Result<(), capnp::Error> {
//!         results.get().set_vat_id(self.caller.to_string());
//!         Ok(())
//!     }
//! }
//!
//! # async fn demo() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:4000").await?;
//! let server = Identity::generate();
//! tokio::task::LocalSet::new()
//!     .run_until(rpc::serve(
//!         listener,
//!         server,
//!         Arc::new(AnyVat), // or Pinned, an allow list, any closure
//!         ServerConfig::default(),
//!         |peer: &PeerInfo| -> office::Client {
//!             capnp_rpc::new_client(Office { caller: peer.vat_id })
//!         },
//!     ))
//!     .await;
//! # Ok(()) }
//! ```
//!
//! And the client, which requires the server's VatId (given to it out of
//! band: the server prints `server.vat_id()`, the client parses that
//! `vat1…` text with `str::parse`):
//!
//! ```no_run
//! use capnp_noise::rpc::{self, ClientConfig};
//! # use capnp_noise_test::schema::demo_capnp as office_capnp;
//! use office_capnp::office; // your schema, compiled by capnpc (see the crate docs)
//! use capnp_noise::{Identity, Pinned, VatId};
//! use std::sync::Arc;
//!
//! # async fn demo(server: VatId) -> capnp_noise::Result<()> {
//! let me = Identity::generate();
//! // Inside a LocalSet: the RpcSystem is spawned on it.
//! let (office, connection): (office::Client, _) =
//!     rpc::connect("127.0.0.1:4000", &me, Arc::new(Pinned(server)), ClientConfig::default())
//!         .await?;
//! let reply = office.whoami_request().send().promise.await.unwrap();
//! assert_eq!(reply.get().unwrap().get_vat_id().unwrap().to_str().unwrap(), me.vat_id().to_string());
//! connection.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! # Every core
//!
//! [`serve`] runs every connection, handshakes included, on the one thread
//! of the caller's `LocalSet`. [`Server`] spreads them over worker threads
//! (default: one per core), each a current-thread runtime with its own
//! `LocalSet`: the handshake, the bootstrap factory and the `RpcSystem` of a
//! connection run on the worker it was handed to, so the capability stays
//! `!Send`; the factory is `Send + Sync`, and state shared by connections is
//! the application's `Send` choice (an `Arc<Mutex<..>>` cloned into each
//! capability: see [`Server`] for an example). All limits below are global
//! across workers. The multi-vat [`Network`](crate::network::Network)
//! stays on one thread (see [`Server`] for why, and what spreading it
//! would take).
//!
//! # Limits
//!
//! * A connection costs no public-key work until its preamble and a
//!   well-formed message 1 arrived; then it needs a handshake slot
//!   ([`ServerConfig::max_handshakes`] in total,
//!   [`ServerConfig::max_handshakes_per_source`] per source address: see
//!   [`crate::admission`]), and every handshake must finish within
//!   [`ServerConfig::handshake_timeout`], so unauthenticated peers cannot
//!   hold much; connections are limited too
//!   ([`ServerConfig::max_connections`]): at the limit the server stops
//!   accepting until one ends (new clients wait in the kernel's backlog).
//!   So that one host cannot hold them all with connections that say
//!   nothing, a source address has at most
//!   [`ServerConfig::max_unauthenticated_per_source`] connections not yet
//!   authenticated (more are closed at once), and each must deliver its
//!   message 1 within [`ServerConfig::first_message_timeout`].
//! * Incoming messages are bounded by [`capnp::message::ReaderOptions`]
//!   (default traversal limit 8 Mi words = 64 MiB per message); set
//!   `reader_options` on both ends to the largest message you expect.
//! * An authenticated peer that stops sending holds its connection until it
//!   disconnects: there is no idle timeout at this layer. A peer that
//!   *vanished* (host gone, NAT forgot the flow) is found by TCP keepalive
//!   ([`ServerConfig::keepalive`], on by default) within about a minute.
//!
//! # Across a WAN: NATs, partitions, restarts
//!
//! What a WAN does to a connection reaches it through TCP; RELIABILITY.md
//! has the measurements. What the API does, and what applications should
//! do:
//!
//! * **Idle connections and NATs.** [`ClientConfig::keepalive`] and
//!   [`ServerConfig::keepalive`] (default [`DEFAULT_KEEPALIVE`], 30 s) turn
//!   on TCP keepalive, which keeps a NAT's mapping of an idle connection
//!   and fails a connection whose peer stopped answering within about
//!   twice the keepalive. Set it below the shortest NAT or firewall idle
//!   timeout on the path; `None` turns it off (then a NAT that forgets the
//!   flow leaves calls waiting, without an error, for about 15 minutes).
//! * **Put a timeout on calls** that must finish in bounded time: a
//!   partition makes a call wait, without an error, for as long as TCP
//!   retransmits (up to twice the keepalive with data in flight).
//! * **After an error, reconnect and get the capabilities anew.** A
//!   capability is bound to its connection: when the connection fails (the
//!   server restarted, the keepalive found the peer gone), every capability
//!   from it fails with an error and stays broken. Call [`connect`] again
//!   (or [`connect_sturdy`] to restore a sturdy ref: its object id outlives
//!   connections and server restarts if the server registers it again
//!   under the same id) and retry only calls that are safe to repeat (a
//!   call that failed may or may not have run). A server restart is seen
//!   within about a round trip (the old connection ends without the
//!   authenticated CLOSE, reported as a possible truncation, never as a
//!   clean end); the new connection answers after its handshake.

use std::cell::{Cell, OnceCell, RefCell};
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use capnp::capability::FromClientHook;
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, Disconnector, RpcSystem};
use tokio::io::{AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use crate::admission::{
    HandshakeSlots, UnauthenticatedLimit, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::policy::PeerPolicy;
use crate::stream::{self, LazyStream, NoiseStream, StreamConfig, DEFAULT_HANDSHAKE_TIMEOUT};
use crate::vat_id::VatId;
use crate::wire::{
    EarlyDataChoice, EarlyDataOutcome, HandshakeConfig, ResumptionCache, ResumptionConfig, Suite,
    HANDSHAKE_HASH_LEN,
};

/// How long the end of a connection may take to send its authenticated
/// CLOSE to a peer that does not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

mod workers;
pub use workers::{Server, ServerBuilder, ShutdownHandle};

/// Who is on the other end of an RPC connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The peer's VatId, proven in the handshake and accepted by the policy.
    pub vat_id: VatId,
    /// The peer's socket address (informative only: not authenticated).
    pub remote_addr: SocketAddr,
    /// The connection's handshake hash, for channel binding.
    pub handshake_hash: [u8; HANDSHAKE_HASH_LEN],
    /// The cipher suite in use.
    pub suite: Suite,
    /// For a connection this vat initiated: the suite it proposed first,
    /// if the responder closed without answering it and this connection is
    /// the retry with the mandatory suite (SPEC.md 2;
    /// [`HandshakeConfig::fallback_after`]). A sign that the responder does
    /// not accept the preferred suite. `None` otherwise.
    pub unanswered_suite: Option<Suite>,
    /// Whether the connection was resumed: a Noise `IK` handshake that
    /// completed as `IK` (SPEC.md 14; see [`ClientConfig::resumption`] and
    /// [`ServerConfig::resumption`]). `false` after `XX` and after `IK`'s
    /// fallback to `XX`.
    pub resumed: bool,
    /// What became of early data (SPEC.md 14.5): on a client, of the bytes
    /// it sent in `IK` message 1; on a server, `Accepted` if it delivered
    /// early data to this connection.
    pub early_data: EarlyDataOutcome,
}

impl PeerInfo {
    pub(crate) fn of(stream: &NoiseStream<TcpStream>, remote_addr: SocketAddr) -> Self {
        PeerInfo {
            vat_id: stream.peer_vat_id(),
            remote_addr,
            handshake_hash: *stream.handshake_hash(),
            suite: stream.suite(),
            unanswered_suite: None,
            resumed: stream.resumed(),
            early_data: stream.early_data_outcome(),
        }
    }
}

/// Settings of [`serve`]: start from [`Default`] and change what you need
/// with the `with_*` setters (the struct is `#[non_exhaustive]`).
///
/// ```
/// use std::time::Duration;
/// use capnp_noise::rpc::ServerConfig;
///
/// let options = ServerConfig::default()
///     .with_max_connections(256)
///     .with_handshake_timeout(Duration::from_secs(5));
/// assert_eq!(options.max_connections, 256);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Suites accepted and session settings.
    pub handshake: HandshakeConfig,
    /// The longest a handshake may take, and the longest a new connection
    /// waits for a handshake slot. Default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Handshakes past message 1 at once (each costs four X25519
    /// operations and a signature check). Default
    /// [`DEFAULT_MAX_HANDSHAKES`], 64.
    pub max_handshakes: usize,
    /// Of those, at most this many from one source address (IPv4 address,
    /// IPv6 /64); more wait, unanswered, for one of theirs to end. Default
    /// [`DEFAULT_MAX_HANDSHAKES_PER_SOURCE`], 16.
    pub max_handshakes_per_source: usize,
    /// How long a handshake that fails after message 1 keeps its slot and
    /// its source's share, which bounds how fast peers that send message 1
    /// and hang up make the server answer it (see
    /// [`admission`](crate::admission)). Default
    /// [`DEFAULT_FAILURE_HOLD`](crate::admission::DEFAULT_FAILURE_HOLD), 1 s.
    pub handshake_failure_hold: Duration,
    /// Connections open at once, handshaking or established. Default 1024.
    pub max_connections: usize,
    /// Connections from one source address (IPv4 address, IPv6 /64) open
    /// and not yet authenticated; more are closed as soon as they are
    /// accepted, so that one host cannot hold `max_connections` (see
    /// [`UnauthenticatedLimit`]).
    /// Default
    /// [`DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE`](crate::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE), 64.
    pub max_unauthenticated_per_source: usize,
    /// How long a new connection has to deliver its preamble and message 1
    /// (see [`StreamConfig::first_message_timeout`]). Default
    /// [`DEFAULT_FIRST_MESSAGE_TIMEOUT`](crate::admission::DEFAULT_FIRST_MESSAGE_TIMEOUT), 3 s.
    pub first_message_timeout: Duration,
    /// Limits on incoming messages (traversal limit, nesting).
    pub reader_options: ReaderOptions,
    /// Whether to answer clients that resume with Noise `IK`, and to take
    /// their early data (SPEC.md 14). Default: neither (a resuming client
    /// gets the `XX` fallback, at `XX`'s cost). Accepting `IK` lets a
    /// client's first call leave one message sooner; accepting early data
    /// lets it arrive with the client's first flight, one round trip sooner,
    /// but **that first flight (the bootstrap request and the first calls)
    /// can be replayed** by anyone who recorded it, and the server runs it
    /// again for each replay: turn `accept_early_data` on only if every
    /// call a client may make first is safe to run twice. See
    /// [`ResumptionConfig`].
    pub resumption: ResumptionConfig,
    /// TCP keepalive on every accepted connection (see [`DEFAULT_KEEPALIVE`]
    /// for what it does and why 30 s); `None`: the system's settings (on
    /// Linux: none, and a dead peer holds its connection until it would
    /// have acknowledged data, about 15 minutes). Default
    /// [`DEFAULT_KEEPALIVE`].
    pub keepalive: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake: HandshakeConfig::default(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_failure_hold: crate::admission::DEFAULT_FAILURE_HOLD,
            max_connections: 1024,
            max_unauthenticated_per_source:
                crate::admission::DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE,
            first_message_timeout: crate::admission::DEFAULT_FIRST_MESSAGE_TIMEOUT,
            reader_options: ReaderOptions::new(),
            resumption: ResumptionConfig::default(),
            keepalive: Some(DEFAULT_KEEPALIVE),
        }
    }
}

/// Settings of [`connect`] and [`connect_sturdy`]: start from [`Default`]
/// and change what you need with the `with_*` setters (the struct is
/// `#[non_exhaustive]`).
///
/// ```
/// use std::time::Duration;
/// use capnp_noise::rpc::ClientConfig;
/// use capnp_noise::wire::{HandshakeConfig, Suite};
///
/// let options = ClientConfig::default()
///     .with_timeout(Duration::from_secs(3))
///     .with_handshake(HandshakeConfig::with_suite(Suite::AesGcmSha256));
/// assert_eq!(options.timeout, Duration::from_secs(3));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The suites this client accepts, in its order of preference, and
    /// session settings. It proposes the first suite; if the server closes
    /// without answering it, [`connect`] retries once, on a new connection,
    /// with the mandatory suite when the list holds it (see
    /// [`HandshakeConfig::fallback_after`]). Default: every suite, the
    /// fastest on this machine first. `HandshakeConfig::with_suite(s)`
    /// proposes only `s`, without retry.
    pub handshake: HandshakeConfig,
    /// The longest the TCP connect may take, and then again the handshake;
    /// the retry with the mandatory suite, if one is made, gets the same
    /// again. Default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub timeout: Duration,
    /// Limits on incoming messages (traversal limit, nesting).
    pub reader_options: ReaderOptions,
    /// Resumption (SPEC.md 14): `None` (the default) runs Noise `XX` every
    /// time. With a [`ClientResumption`], [`connect`] records each server
    /// it completes a handshake with in the resumption cache (keyed by the
    /// VatId its policy pins: [`PeerPolicy::pinned_vat`]), and a later
    /// connect to a server it knows opens the connection with Noise `IK`,
    /// **lazily**: `connect` returns as soon as TCP is connected, and the
    /// handshake starts with the first RPC message, so that the first calls
    /// go with `IK` message 1 (as early data, if allowed) or right after its
    /// answer.
    pub resumption: Option<ClientResumption>,
    /// TCP keepalive on the connection (see [`DEFAULT_KEEPALIVE`] for what
    /// it does and why 30 s); `None`: the system's settings (on Linux:
    /// none, and behind a NAT that forgot the flow a call waits, without an
    /// error, about 15 minutes). Default [`DEFAULT_KEEPALIVE`].
    pub keepalive: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            handshake: HandshakeConfig::default(),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            reader_options: ReaderOptions::new(),
            resumption: None,
            keepalive: Some(DEFAULT_KEEPALIVE),
        }
    }
}

/// [`ClientConfig::resumption`]: the resumption cache, shared by the
/// application's connections (keep it across connections: it is what makes
/// the next one resume), and whether the first calls may travel as early
/// data.
///
/// ```
/// use std::sync::Arc;
/// use capnp_noise::rpc::{ClientConfig, ClientResumption};
/// use capnp_noise::wire::{EarlyDataChoice, ResumptionCache};
///
/// let cache = Arc::new(ResumptionCache::default());
/// let options = ClientConfig::default().with_resumption(Some(
///     ClientResumption::new(cache.clone())
///         // Only if every first call is safe to run twice (see EarlyDataChoice).
///         .with_early_data(EarlyDataChoice::ReplayableNotForwardSecret),
/// ));
/// assert!(options.resumption.is_some());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientResumption {
    /// The servers this application has completed a handshake with.
    pub cache: Arc<ResumptionCache>,
    /// Whether the bytes of the first RPC messages (the bootstrap request
    /// and the calls the application makes before the handshake starts, up
    /// to 3862 bytes) travel in `IK` message 1. Default
    /// [`EarlyDataChoice::Never`]: they go right after its answer. With
    /// [`EarlyDataChoice::ReplayableNotForwardSecret`] the first answer can
    /// come one round trip sooner, but those calls can be **replayed** to
    /// the server and are not forward secret (SPEC.md 14.5); the server
    /// must also accept early data ([`ServerConfig::resumption`]).
    pub early_data: EarlyDataChoice,
}

impl ClientResumption {
    /// Resumption with `cache`, without early data.
    pub fn new(cache: Arc<ResumptionCache>) -> Self {
        ClientResumption {
            cache,
            early_data: EarlyDataChoice::Never,
        }
    }

    /// Sets [`early_data`](Self::early_data).
    pub fn with_early_data(mut self, early_data: EarlyDataChoice) -> Self {
        self.early_data = early_data;
        self
    }
}

setters!(ServerConfig {
    with_handshake => handshake: HandshakeConfig,
    with_handshake_timeout => handshake_timeout: Duration,
    with_max_handshakes => max_handshakes: usize,
    with_max_handshakes_per_source => max_handshakes_per_source: usize,
    with_handshake_failure_hold => handshake_failure_hold: Duration,
    with_max_connections => max_connections: usize,
    with_max_unauthenticated_per_source => max_unauthenticated_per_source: usize,
    with_first_message_timeout => first_message_timeout: Duration,
    with_reader_options => reader_options: ReaderOptions,
    with_resumption => resumption: ResumptionConfig,
    with_keepalive => keepalive: Option<Duration>,
});

setters!(ClientConfig {
    with_handshake => handshake: HandshakeConfig,
    with_timeout => timeout: Duration,
    with_reader_options => reader_options: ReaderOptions,
    with_resumption => resumption: Option<ClientResumption>,
    with_keepalive => keepalive: Option<Duration>,
});

/// Accepts connections on `listener` forever, serving each authenticated
/// peer its own bootstrap capability.
///
/// For every connection: run the handshake as `identity` (taking a
/// handshake slot once message 1 is in) with `policy` deciding who may connect, then call
/// `bootstrap(&peer)` and run an `RpcSystem` with that capability on the
/// current `LocalSet` until the peer disconnects; then send the
/// authenticated CLOSE. Each connection is its own task: a peer that
/// stalls, sends garbage, fails its handshake or disconnects mid-call
/// affects only its own connection. Logs (`tracing`, target
/// `capnp_noise::rpc`): `info` who connected (VatId fingerprint and
/// address) and disconnected, `warn` who was refused and why, `info`
/// failed handshakes.
///
/// Runs until the returned future is dropped; connections already
/// established keep running on the `LocalSet` until they end.
///
/// # Panics
/// If not run inside a [`tokio::task::LocalSet`] (as capnp-rpc requires).
pub async fn serve<F, C>(
    listener: TcpListener,
    identity: Identity,
    policy: Arc<dyn PeerPolicy>,
    options: ServerConfig,
    bootstrap: F,
) where
    F: Fn(&PeerInfo) -> C + 'static,
    C: FromClientHook,
{
    let connections = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let server = Rc::new(Serving::new(identity, policy, options, bootstrap));
    loop {
        let Some((permit, tcp, addr)) = accept_within(&connections, &listener).await else {
            return; // never closed
        };
        let server = server.clone();
        tokio::task::spawn_local(async move {
            server
                .serve_connection(tcp, addr, std::future::pending())
                .await;
            drop(permit);
        });
    }
}

/// Waits for a connection slot of `connections`, then accepts one
/// connection (retrying after errors such as running out of file
/// descriptors, without spinning). `None` only if the semaphore is closed.
pub(crate) async fn accept_within(
    connections: &Arc<Semaphore>,
    listener: &TcpListener,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    if connections.available_permits() == 0 {
        warn!("connection limit reached: new connections wait until one ends");
    }
    let permit = connections.clone().acquire_owned().await.ok()?;
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => return Some((permit, tcp, addr)),
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What serves each connection of [`serve`] (on its `LocalSet`) and of a
/// [`Server`] (shared by its workers).
pub(crate) struct Serving<F> {
    pub(crate) acceptor: Acceptor,
    reader_options: ReaderOptions,
    bootstrap: F,
}

impl<F> Serving<F> {
    pub(crate) fn new(
        identity: Identity,
        policy: Arc<dyn PeerPolicy>,
        options: ServerConfig,
        bootstrap: F,
    ) -> Self {
        Serving {
            acceptor: Acceptor {
                identity,
                policy,
                slots: HandshakeSlots::with_failure_hold(
                    options.max_handshakes,
                    options.max_handshakes_per_source,
                    options.handshake_failure_hold,
                ),
                handshake: options.handshake,
                timeout: options.handshake_timeout,
                first_message_timeout: options.first_message_timeout,
                unauthenticated: UnauthenticatedLimit::new(options.max_unauthenticated_per_source),
                resumption: options.resumption,
                keepalive: options.keepalive,
            },
            reader_options: options.reader_options,
            bootstrap,
        }
    }
}

/// The responder's side of a connection before RPC starts: a bounded number
/// of handshakes at once, each within a time limit. Shared by [`serve`] and
/// the multi-vat network (`crate::network`).
pub(crate) struct Acceptor {
    pub(crate) identity: Identity,
    pub(crate) policy: Arc<dyn PeerPolicy>,
    pub(crate) slots: HandshakeSlots,
    pub(crate) handshake: HandshakeConfig,
    pub(crate) timeout: Duration,
    pub(crate) first_message_timeout: Duration,
    pub(crate) unauthenticated: UnauthenticatedLimit,
    pub(crate) resumption: ResumptionConfig,
    /// TCP keepalive of accepted connections (see [`set_keepalive`]).
    pub(crate) keepalive: Option<Duration>,
}

impl Acceptor {
    /// Runs the responder's handshake on `tcp`, within the timeouts, the
    /// handshake slots and its source's share of unauthenticated
    /// connections. Logs and returns `None` when it fails, the peer is
    /// refused, its source has too many connections handshaking, or no slot
    /// is free in time.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Option<(NoiseStream<TcpStream>, PeerInfo)> {
        let Some(_unauthenticated) = self.unauthenticated.try_acquire(addr.ip()) else {
            debug!(
                %addr,
                limit = self.unauthenticated.max_per_source(),
                "closed: its source has too many connections not yet authenticated"
            );
            return None;
        };
        let _ = tcp.set_nodelay(true);
        if let Err(e) = set_keepalive(&tcp, self.keepalive) {
            debug!(%addr, error = %e, "TCP keepalive not set");
        }
        let config = StreamConfig::default()
            .with_handshake(self.handshake.clone())
            .with_handshake_timeout(Some(self.timeout))
            .with_first_message_timeout(Some(self.first_message_timeout))
            .with_remote_addr(addr)
            .with_handshake_slots(self.slots.clone())
            .with_resumption(self.resumption);
        match stream::accept(tcp, &self.identity, self.policy.clone(), config).await {
            Ok(stream) => {
                let peer = PeerInfo::of(&stream, addr);
                Some((stream, peer))
            }
            Err(Error::PeerRefused { vat_id, reason }) => {
                warn!(peer = %vat_id.fingerprint(), %addr, %reason, "refused");
                None
            }
            Err(e) => {
                info!(%addr, error = %e, "handshake failed");
                None
            }
        }
    }
}

impl<F, C> Serving<F>
where
    F: Fn(&PeerInfo) -> C,
    C: FromClientHook,
{
    /// One connection, from accept to its end: handshake, bootstrap
    /// factory, `RpcSystem`, authenticated CLOSE. When `stop` completes, a
    /// handshake in progress is dropped and an established connection is
    /// disconnected (calls in flight fail, CLOSE is sent, within bounds).
    /// A factory that panics closes this connection only.
    pub(crate) async fn serve_connection(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut stop = std::pin::pin!(stop);
        let handshake = tokio::select! {
            h = self.acceptor.handshake(tcp, addr) => h,
            () = &mut stop => return,
        };
        let Some((stream, peer)) = handshake else {
            return;
        };
        let fingerprint = peer.vat_id.fingerprint();
        info!(peer = %fingerprint, %addr, suite = peer.suite.noise_name(), "connected");
        let made =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.bootstrap)(&peer)));
        let Ok(made) = made else {
            error!(peer = %fingerprint, %addr, "the bootstrap factory panicked: connection closed");
            return;
        };
        let bootstrap = capnp::capability::Client::new(made.into_client_hook());
        let (rpc_system, shared) =
            rpc_system(stream, Side::Server, Some(bootstrap), self.reader_options);
        let disconnector = rpc_system.get_disconnector();
        let mut served = std::pin::pin!(run(rpc_system, shared));
        let result = tokio::select! {
            r = &mut served => r,
            () = &mut stop => {
                // As Connection::disconnect; run() bounds the CLOSE, this
                // bounds the rest.
                let ending = async {
                    let (_, r) = futures::join!(disconnector, served.as_mut());
                    r
                };
                match tokio::time::timeout(2 * CLOSE_TIMEOUT, ending).await {
                    Ok(r) => r,
                    Err(_) => Err(capnp::Error::failed("not closed in time at shutdown".into())),
                }
            }
        };
        match result {
            Ok(()) => info!(peer = %fingerprint, %addr, "disconnected"),
            Err(e) => info!(peer = %fingerprint, %addr, error = %e, "connection failed"),
        }
    }
}

/// Connects to a server at `addr`, authenticates it with `policy` (usually
/// [`Pinned`](crate::Pinned) to the server's VatId), and returns its
/// bootstrap capability with the connection's [`Connection`] handle.
///
/// The `RpcSystem` runs on the current `LocalSet` until
/// [`Connection::disconnect`] or until the server goes away. `connect`
/// returns when the handshake is done. A server whose policy refuses this
/// vat can only hang up after the handshake (Noise XX authenticates the
/// initiator last), so that refusal surfaces at the first call, as an error
/// saying the server "may have refused this vat's identity".
///
/// If the server closes without answering the suite proposed, and
/// [`ClientConfig::handshake`] allows it, `connect` tries once more with
/// the mandatory suite (to the same socket address, within a new
/// timeout), logs a warning naming the suite that was not answered, and
/// says so in [`PeerInfo::unanswered_suite`].
///
/// # Resuming
/// With [`ClientConfig::resumption`] and a policy that pins the server's
/// VatId ([`PeerPolicy::pinned_vat`]), `connect` records the server after
/// the handshake; if the cache already holds a record of it, `connect`
/// instead returns **as soon as TCP is connected**, and the handshake
/// (Noise `IK`, SPEC.md 14) starts with the first RPC message: the
/// bootstrap request and the calls made before the connection's task first
/// runs travel with `IK` message 1 (as early data, if
/// [`ClientResumption::early_data`] allows it and the server accepts it)
/// or right after its answer. Then [`Connection::peer`] is `None` until the
/// handshake completes ([`Connection::established`] waits for it), and a
/// handshake error (a refused server, a timeout...) fails the first calls
/// and ends the connection rather than being returned here. A server whose
/// static key changed answers with the `XX` fallback (the calls go after
/// it, nothing is lost, the record is replaced); a server that closes
/// silently on `IK` (revision 1.1) makes the record forgotten, so that the
/// next `connect` runs `XX`.
///
/// # Errors
/// [`Error::PeerRefused`] if `policy` refuses the server (this vat's
/// identity was not revealed to it); [`Error::HandshakeTimeout`] if the TCP connect or the
/// handshake takes longer than [`ClientConfig::timeout`]; [`Error::Io`];
/// [`Error::UnexpectedEof`] with [`EOF_BEFORE_MESSAGE_2`](crate::wire::EOF_BEFORE_MESSAGE_2) if the server
/// closed without answering (after the retry, if one was made); protocol
/// errors of the handshake.
///
/// # Panics
/// If not run inside a [`tokio::task::LocalSet`] (as capnp-rpc requires).
pub async fn connect<A, C>(
    addr: A,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    options: ClientConfig,
) -> Result<(C, Connection)>
where
    A: ToSocketAddrs + fmt::Display,
    C: FromClientHook,
{
    let dialed = addr.to_string();
    let resume = options
        .resumption
        .as_ref()
        .and_then(|r| Some((r, policy.pinned_vat()?)));
    let (stream, peer) = match resume {
        Some((r, server)) if r.cache.get(&server).is_some() => {
            let tcp = tcp_connect(addr, options.timeout, options.keepalive).await?;
            let remote_addr = tcp.peer_addr()?;
            let config = StreamConfig::default()
                .with_handshake(options.handshake)
                .with_handshake_timeout(Some(options.timeout))
                .with_dialed(dialed.clone())
                .with_remote_addr(remote_addr);
            let mut lazy = stream::connect_lazy(
                tcp,
                identity,
                policy,
                config,
                r.cache.clone(),
                &server,
                r.early_data,
            );
            lazy.set_defer_flush(true);
            (lazy, PeerSlot::Pending(remote_addr))
        }
        _ => {
            let cache = resume.map(|(r, server)| (r.cache.clone(), server));
            let (stream, peer) = dial(
                addr,
                identity,
                policy,
                options.handshake,
                options.timeout,
                cache,
                options.keepalive,
            )
            .await?;
            (stream.into(), PeerSlot::Known(peer))
        }
    };
    let (mut rpc_system, shared) = rpc_system(stream, Side::Client, None, options.reader_options);
    let bootstrap: capnp::capability::Client = rpc_system.bootstrap(Side::Server);
    let disconnector = rpc_system.get_disconnector();
    let task = tokio::task::spawn_local(run(rpc_system, shared.clone()));
    let (peer, remote_addr) = match peer {
        PeerSlot::Known(peer) => {
            info!(peer = %peer.vat_id.fingerprint(), addr = %dialed, "connected to server");
            let addr = peer.remote_addr;
            (OnceCell::from(peer), addr)
        }
        PeerSlot::Pending(addr) => {
            info!(addr = %dialed, "connected to server (resuming: the handshake goes with the first call)");
            (OnceCell::new(), addr)
        }
    };
    Ok((
        C::new(bootstrap.hook),
        Connection {
            peer,
            remote_addr,
            shared,
            disconnector,
            task,
        },
    ))
}

/// What [`connect`] knows of the server when it returns.
enum PeerSlot {
    /// The handshake is done.
    Known(PeerInfo),
    /// A resuming connection: the handshake starts with the first call.
    Pending(SocketAddr),
}

/// The initiator's side of a connection before RPC starts: TCP connect and
/// handshake, each within `timeout`, the responder checked by `policy`;
/// once more with the mandatory suite if the responder closed without
/// answering and `handshake` allows it (SPEC.md 2). With `resumption` (a
/// cache and the VatId `policy` pins), the handshake is recorded there
/// (and is `IK` if a record is already there). TCP keepalive every
/// `keepalive` (see [`set_keepalive`]). Shared by [`connect`] and the
/// multi-vat network (`crate::network`).
pub(crate) async fn dial<A>(
    addr: A,
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    handshake: HandshakeConfig,
    timeout: Duration,
    resumption: Option<(Arc<ResumptionCache>, VatId)>,
    keepalive: Option<Duration>,
) -> Result<(NoiseStream<TcpStream>, PeerInfo)>
where
    A: ToSocketAddrs + fmt::Display,
{
    let dialed = addr.to_string();
    let tcp = tcp_connect(addr, timeout, keepalive).await?;
    let remote_addr = tcp.peer_addr()?;
    let attempt = |tcp, handshake| {
        let config = StreamConfig::default()
            .with_handshake(handshake)
            .with_handshake_timeout(Some(timeout))
            .with_dialed(dialed.clone())
            .with_remote_addr(remote_addr);
        match &resumption {
            Some((cache, server)) => stream::connect_resuming(
                tcp,
                identity,
                policy.clone(),
                config,
                cache.clone(),
                server,
                None,
            ),
            None => stream::connect(tcp, identity, policy.clone(), config),
        }
    };
    let mut result = attempt(tcp, handshake.clone()).await;
    let mut unanswered_suite = None;
    if let Some(retry) = result
        .as_ref()
        .err()
        .and_then(|e| handshake.fallback_after(e))
    {
        let proposed = handshake.suites[0];
        warn!(
            addr = %dialed,
            "the server closed without answering {proposed}; retrying once with the mandatory suite {}",
            Suite::MANDATORY
        );
        unanswered_suite = Some(proposed);
        result = match tcp_connect(remote_addr, timeout, keepalive).await {
            Ok(tcp) => attempt(tcp, retry).await,
            Err(e) => Err(e),
        };
    }
    match result {
        Ok(stream) => {
            let mut peer = PeerInfo::of(&stream, remote_addr);
            peer.unanswered_suite = unanswered_suite;
            Ok((stream, peer))
        }
        Err(e) => {
            match &e {
                Error::PeerRefused { vat_id, reason } => {
                    warn!(peer = %vat_id.fingerprint(), addr = %dialed, %reason, "refused server");
                }
                e => info!(addr = %dialed, error = %e, "handshake with server failed"),
            }
            Err(e)
        }
    }
}

/// A TCP connection to `addr` within `timeout`, with `TCP_NODELAY` and
/// TCP keepalive every `keepalive`.
async fn tcp_connect(
    addr: impl ToSocketAddrs,
    timeout: Duration,
    keepalive: Option<Duration>,
) -> Result<TcpStream> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::HandshakeTimeout(timeout))??;
    tcp.set_nodelay(true)?;
    set_keepalive(&tcp, keepalive)?;
    Ok(tcp)
}

/// The default keepalive of [`ClientConfig`], [`ServerConfig`] and
/// [`NetworkConfig`](crate::network::NetworkConfig): 30 s.
///
/// With a keepalive of `k`, the kernel sends a TCP keepalive probe after
/// `k` without any packet from the peer, and again every `k / 3` while
/// none is answered; after 3 unanswered probes, or once data sent stays
/// unacknowledged for `2 k` (`TCP_USER_TIMEOUT`, Linux), the connection
/// fails with an error ("Connection timed out"): calls in flight fail,
/// capabilities from it break, and the multi-vat network dials a new
/// connection the next time it is asked for the peer. So:
///
/// * **A NAT keeps the flow.** A probe is a packet of the flow: NATs and
///   stateful firewalls that forget idle TCP flows keep it as long as their
///   idle timeout is longer than `k`. Typical idle timeouts of established
///   TCP flows: AWS NAT gateway and NLB 350 s, Azure load balancer and
///   SNAT 4 minutes, Google Cloud NAT 20 minutes, home routers and
///   carrier-grade NATs from 5 minutes to hours (RFC 5382 asks for at
///   least 2 h 4 min; many are shorter; UDP mappings are often only 30 s
///   to 2 minutes, RFC 4787). 30 s is below all of these.
/// * **A dead connection is found.** A peer that vanished (its host lost
///   power, a NAT forgot the flow anyway, a partition that does not heal)
///   is detected within about `2 k` (60 s by default) of the last packet
///   from it, instead of TCP's 15 minutes of retransmissions
///   (`tcp_retries2`) or never (an idle connection without keepalive).
/// * **The cost**: a 40-byte probe and its acknowledgement per `k` on an
///   idle connection; nothing on a busy one. A partition longer than `2 k`
///   while data is in flight now fails the connection rather than waiting.
///   So does a peer that stops reading for `2 k` while data waits for it
///   (Linux 5.11 and later apply `TCP_USER_TIMEOUT` to a window that stays
///   closed): capnp-rpc reads all the time, so that peer is stuck or
///   hostile, and is cut as gRPC's keepalive cuts it.
///
/// The probes are TCP's own, not authenticated by capnp-noise: they tell
/// the kernel that the peer's TCP is alive, nothing more. (The
/// authenticated keepalive of SPEC.md 7.1, an empty DATA frame, is what
/// the tunnel's `keepalive` sends.) The kernel counts in whole seconds: a
/// keepalive is rounded down to whole seconds, at least 1 s.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);

/// Unanswered keepalive probes before the connection fails.
const KEEPALIVE_PROBES: u32 = 3;

/// Turns on TCP keepalive on `tcp` with the probes and timeouts
/// [`DEFAULT_KEEPALIVE`] describes for `every` (`None`: leaves the
/// system's settings). [`connect`], [`serve`], [`Server`] and the
/// [`Network`](crate::network::Network) do this themselves; call it on a
/// socket you give [`stream::connect`] or [`stream::accept`].
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use capnp_noise::rpc::{set_keepalive, DEFAULT_KEEPALIVE};
/// let tcp = tokio::net::TcpStream::connect("127.0.0.1:4000").await?;
/// set_keepalive(&tcp, Some(DEFAULT_KEEPALIVE))?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// The system call's error.
pub fn set_keepalive(tcp: &TcpStream, every: Option<Duration>) -> io::Result<()> {
    let Some(every) = every else {
        return Ok(());
    };
    let every = Duration::from_secs(every.as_secs().max(1));
    let probe = Duration::from_secs((every.as_secs() / u64::from(KEEPALIVE_PROBES)).max(1));
    let socket = socket2::SockRef::from(tcp);
    let params = socket2::TcpKeepalive::new().with_time(every);
    // Where the system has no per-socket interval or count (OpenBSD,
    // Solaris...), its own apply.
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "windows"
    ))]
    let params = params.with_interval(probe);
    #[cfg(target_os = "linux")]
    let params = params.with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&params)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(every + probe * KEEPALIVE_PROBES))?;
    Ok(())
}

/// A client connection made by [`connect`].
///
/// Dropping it leaves the connection running until the server goes away or
/// every capability from it is dropped; [`disconnect`](Self::disconnect)
/// ends it cleanly.
#[must_use = "dropping the handle does not disconnect; call disconnect()"]
pub struct Connection {
    /// Known once the handshake completed (at once unless resuming).
    peer: OnceCell<PeerInfo>,
    remote_addr: SocketAddr,
    shared: Shared,
    disconnector: Disconnector<Side>,
    task: JoinHandle<Result<(), capnp::Error>>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer.get())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// The server: its authenticated VatId, address, handshake hash, suite,
    /// whether the connection was resumed. `None` only on a resuming
    /// connection whose handshake has not completed yet (see [`connect`]:
    /// it starts with the first call); [`established`](Self::established)
    /// waits for it.
    pub fn peer(&self) -> Option<&PeerInfo> {
        if self.peer.get().is_none() {
            let stream = self.shared.stream.borrow();
            if let Some(open) = stream.established() {
                let _ = self.peer.set(PeerInfo::of(open, self.remote_addr));
            }
        }
        self.peer.get()
    }

    /// The server, once the handshake has completed; on a resuming
    /// connection whose handshake has not started, starts it (with
    /// whatever calls were made so far).
    ///
    /// # Errors
    /// The handshake's error (the same the connection's calls fail with).
    pub async fn established(&self) -> Result<&PeerInfo> {
        poll_fn(|cx| self.shared.stream.borrow_mut().poll_established(cx)).await?;
        Ok(self
            .peer()
            .expect("an established stream gives the peer's information"))
    }

    /// Ends the connection: calls in flight fail, the authenticated CLOSE is
    /// sent, and the `RpcSystem` task finishes.
    ///
    /// # Errors
    /// The connection's error, if it had failed before.
    pub async fn disconnect(self) -> Result<()> {
        self.disconnector.await.map_err(capnp_error)?;
        match self.task.await {
            Ok(result) => result.map_err(capnp_error),
            Err(e) => Err(Error::Io(Arc::new(io::Error::other(e)))),
        }
    }
}

fn capnp_error(e: capnp::Error) -> Error {
    Error::Rpc {
        during: "connection",
        source: e,
    }
}

/// Builds the `RpcSystem` of one connection over `stream`.
pub(crate) fn rpc_system(
    stream: impl Into<LazyStream<TcpStream>>,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    reader_options: ReaderOptions,
) -> (RpcSystem<Side>, Shared) {
    let shared = Shared {
        stream: Rc::new(RefCell::new(stream.into())),
        activity: Rc::new(Cell::new(0)),
    };
    let network = twoparty::VatNetwork::new(shared.clone(), shared.clone(), side, reader_options);
    (RpcSystem::new(Box::new(network), bootstrap), shared)
}

/// Runs the `RpcSystem` to its end, then sends the authenticated CLOSE:
/// capnp-rpc never closes its output stream, and without CLOSE the peer
/// could not tell a clean end from a cut connection.
pub(crate) async fn run(rpc_system: RpcSystem<Side>, stream: Shared) -> Result<(), capnp::Error> {
    let result = rpc_system.await;
    let close = poll_fn(|cx| Pin::new(&mut *stream.stream.borrow_mut()).poll_shutdown(cx));
    match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "no authenticated close sent"),
        Err(_) => debug!("the peer did not take the authenticated close in time"),
    }
    result
}

/// The stream, shared by the two-party network's reader and writer (both
/// polled from the connection's one task) and by [`run`], which closes it.
///
/// `activity` counts the bytes moved in either direction: the network
/// (`crate::network`) closes a connection whose count stops changing.
#[derive(Clone)]
pub(crate) struct Shared {
    /// Open from the start, but for a resuming client's connection, whose
    /// handshake starts with its first message.
    stream: Rc<RefCell<LazyStream<TcpStream>>>,
    activity: Rc<Cell<u64>>,
}

impl Shared {
    /// The counter of bytes read and written, shared with every clone.
    pub(crate) fn activity(&self) -> Rc<Cell<u64>> {
        self.activity.clone()
    }

    fn moved(&self, n: usize) {
        self.activity
            .set(self.activity.get().wrapping_add(n as u64));
    }
}

impl futures::AsyncRead for Shared {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut buf = ReadBuf::new(buf);
        let mut stream = self.stream.borrow_mut();
        std::task::ready!(tokio::io::AsyncRead::poll_read(
            Pin::new(&mut *stream),
            cx,
            &mut buf
        ))?;
        self.moved(buf.filled().len());
        Poll::Ready(Ok(buf.filled().len()))
    }
}

impl futures::AsyncWrite for Shared {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, buf))?;
        self.moved(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_shutdown(cx)
    }
}

// ----- sturdy refs -----

/// Serves sturdy refs: a `Restorer` capability (schema/noise.capnp) over a
/// shared [`sturdy::Restorer`](crate::sturdy::Restorer) of capabilities.
///
/// Make it (part of) the bootstrap capability of [`serve`]; add and revoke
/// objects through the shared map while the server runs. A wrong and a
/// revoked object id fail alike, with an error that names neither.
///
/// ```
/// use std::{cell::RefCell, rc::Rc};
/// use capnp_noise::rpc::restorer_client;
/// use capnp_noise::sturdy::Restorer;
/// let objects = Rc::new(RefCell::new(Restorer::<capnp::capability::Client>::new()));
/// let bootstrap = restorer_client(objects.clone());
/// # drop(bootstrap);
/// ```
pub fn restorer_client(
    objects: Rc<RefCell<crate::sturdy::Restorer<capnp::capability::Client>>>,
) -> restorer::Client {
    capnp_rpc::new_client(RestorerServer { objects })
}

use crate::schema::noise_capnp::restorer;

struct RestorerServer {
    objects: Rc<RefCell<crate::sturdy::Restorer<capnp::capability::Client>>>,
}

impl restorer::Server for RestorerServer {
    async fn restore(
        self: capnp::capability::Rc<Self>,
        params: restorer::RestoreParams,
        mut results: restorer::RestoreResults,
    ) -> std::result::Result<(), capnp::Error> {
        let id = params.get()?.get_object_id()?;
        let cap = self
            .objects
            .borrow()
            .restore(id)
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .clone();
        results.get().init_cap().set_as_capability(cap.hook);
        Ok(())
    }
}

/// Connects to the vat a sturdy ref names and restores its object.
///
/// The addresses of the ref are tried in order; a connection counts only if
/// the peer proves the ref's VatId (it is pinned), wherever it was reached.
/// The vat's bootstrap capability must be a `Restorer` (see
/// [`restorer_client`]). Returns the restored capability and the
/// connection that carries it.
///
/// # Errors
/// The last address's error if none led to the named vat
/// ([`Error::PeerRefused`] when another vat answered there, I/O errors,
/// timeouts); [`Error::Rpc`] if the vat refused the object id (wrong or
/// revoked: the message is the same for both).
pub async fn connect_sturdy<C: FromClientHook>(
    sturdy_ref: &crate::sturdy::SturdyRef,
    identity: &Identity,
    options: ClientConfig,
) -> Result<(C, Connection)> {
    let policy: Arc<dyn PeerPolicy> = Arc::new(crate::policy::Pinned(*sturdy_ref.vat_id()));
    let mut last = None;
    for address in sturdy_ref.addresses() {
        let (restorer, connection): (restorer::Client, Connection) = match connect(
            address.to_string(),
            identity,
            policy.clone(),
            options.clone(),
        )
        .await
        {
            Ok(connected) => connected,
            Err(e) => {
                info!(addr = %address, error = %e, "sturdy ref address failed; trying the next");
                last = Some(e);
                continue;
            }
        };
        let mut request = restorer.restore_request();
        request
            .get()
            .set_object_id(sturdy_ref.object_id().as_bytes());
        let restored = async {
            let response = request.send().promise.await?;
            response.get()?.get_cap().get_as_capability::<C>()
        }
        .await;
        return match restored {
            Ok(cap) => Ok((cap, connection)),
            Err(e) => {
                // The connection is useless without the object.
                let _ = connection.disconnect().await;
                Err(Error::Rpc {
                    during: "call Restorer.restore",
                    source: e,
                })
            }
        };
    }
    Err(last.unwrap_or(Error::NoAddress {
        vat: *sturdy_ref.vat_id(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probes and timeouts `DEFAULT_KEEPALIVE` documents reach the
    /// socket: a probe after `k` idle, then every `k / 3`, 3 of them, and
    /// data unacknowledged for `2 k` fails the connection; `None` leaves
    /// the socket as it was (no keepalive).
    #[tokio::test]
    async fn keepalive_sets_the_documented_probes_and_user_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = tcp_connect(addr, Duration::from_secs(5), Some(DEFAULT_KEEPALIVE))
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(30)
        );
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                socket.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(10)
            );
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
            assert_eq!(
                socket.tcp_user_timeout().unwrap(),
                Some(Duration::from_secs(60))
            );
        }
        // Below a second: one second, the kernel's unit.
        let tcp = tcp_connect(
            addr,
            Duration::from_secs(5),
            Some(Duration::from_millis(300)),
        )
        .await
        .unwrap();
        let socket = socket2::SockRef::from(&tcp);
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(1));
        #[cfg(target_os = "linux")]
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(4))
        );
        let tcp = tcp_connect(addr, Duration::from_secs(5), None)
            .await
            .unwrap();
        assert!(!socket2::SockRef::from(&tcp).keepalive().unwrap());
    }

    /// As `DEFAULT_KEEPALIVE` says: with a keepalive of 1 s, a peer that
    /// accepts but never reads fails the connection once data has waited
    /// about 4 s (`TCP_USER_TIMEOUT` on a closed window, Linux 5.11+),
    /// with "timed out"; without keepalive the same writer just waits.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn keepalive_cuts_a_peer_that_stops_reading() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Both at once: with keepalive, and the control without.
        let write_to_a_peer_that_never_reads = |keepalive| async move {
            let mut tcp = tcp_connect(addr, Duration::from_secs(5), keepalive)
                .await
                .unwrap();
            let block = vec![0u8; 64 * 1024];
            tokio::time::timeout(Duration::from_secs(8), async {
                loop {
                    tcp.write_all(&block).await?;
                }
                #[allow(unreachable_code)]
                Ok::<(), io::Error>(())
            })
            .await
        };
        let start = std::time::Instant::now();
        let (with, without, _peers) = futures::join!(
            write_to_a_peer_that_never_reads(Some(Duration::from_secs(1))),
            write_to_a_peer_that_never_reads(None),
            async {
                (
                    listener.accept().await.unwrap(),
                    listener.accept().await.unwrap(),
                )
            },
        );
        let e = with.expect("the write failed in time").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(without.is_err(), "without keepalive the writer waits");
        assert!(start.elapsed() >= Duration::from_secs(8));
    }
}
