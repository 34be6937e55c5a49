//! A network of many vats: one [`Network`] per vat, with one authenticated
//! connection per pair of vats, and introductions (three-party handoff)
//! between them.
//!
//! [`crate::rpc`] connects one client to one server. A [`Network`] is a vat
//! among many: it owns its [`Identity`], a listener, an address book (VatId
//! to addresses, learned from configuration, sturdy refs and introductions)
//! and a table of live connections keyed by the peer's authenticated
//! [`VatId`], each with its own capnp-rpc `RpcSystem` (one per connection,
//! as capnp-rpc requires). [`Network::connect`] returns a peer's bootstrap
//! capability, reusing the live connection or opening one.
//!
//! # One connection per pair
//!
//! When two vats dial each other at the same time ("crossed dials",
//! OCapN's crossed hellos), both connections complete. The rule (SPEC.md
//! §12.3): **the pair keeps the connection initiated by the vat with the
//! lower VatId** (bytewise). A connection the lower vat initiated is used at
//! once. One the higher vat initiated is handed to callers on either side
//! only after the lower vat, asked with `Vat.hello`, has made it the pair's
//! connection; the lower vat refuses it while a connection of its own to
//! that vat is being dialed or still answers. So a connection reaches a
//! caller only once the tie-break is decided, and no call is ever made on a
//! connection that loses: none can be lost. Every `Vat` method but `hello`
//! is refused on a connection that is not the pair's connection.
//!
//! A dropped connection is forgotten and reopened by the next
//! [`Network::connect`]; capabilities obtained over it are broken (as with
//! any capnp-rpc disconnect). With [`NetworkOptions::idle_timeout`], a
//! connection that moves no bytes for that long is closed.
//!
//! # Introductions
//!
//! capnp-rpc is level 1: a capability passed on is proxied by the vat that
//! passed it. A network adds introductions on top (see [`crate::intro`] for
//! the messages and SPEC.md §12 for the protocol): Bob, holding a capability
//! hosted by Carol, calls [`Network::introduce`] and gives Alice the signed
//! [`Introduction`]; Alice calls [`Network::redeem`], which connects straight
//! to Carol (authenticated as Alice, Carol pinned) and returns the
//! capability. Alice's calls then go to Carol directly and keep working
//! after Bob has gone.
//!
//! Every connection's bootstrap capability is a `Vat` (`schema/network.capnp`)
//! carrying the handoff calls; the application's own bootstrap capability,
//! built per peer by the factory given to [`NetworkBuilder::bootstrap`], is
//! returned by `Vat.bootstrap`, which [`Network::connect`] calls for you.
//!
//! ```no_run
//! use capnp_noise::network::Network;
//! use capnp_noise::rpc::PeerInfo;
//! use capnp_noise::Identity;
//!
//! # async fn demo(carol: capnp_noise::VatId, alice: capnp_noise::VatId) -> capnp_noise::Result<()> {
//! // Inside a tokio LocalSet (capnp-rpc is single-threaded).
//! let bob = Network::builder(Identity::generate())
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .bootstrap(|peer: &PeerInfo| -> capnp::capability::Client {
//!         capnp_rpc::new_broken_cap(capnp::Error::failed(format!("nothing for {}", peer.vat_id)))
//!     })
//!     .start()
//!     .await?;
//! bob.add_addresses(carol, &["127.0.0.1:4000".parse()?]);
//! let at_carol: capnp::capability::Client = bob.connect(&carol).await?;
//! let introduction = bob.introduce(&at_carol, &carol, &alice).await?;
//! // ... give `introduction.encode()` to Alice, who calls `network.redeem(&intro)`.
//! # Ok(()) }
//! ```
//!
//! # Limits
//!
//! Connections in all ([`NetworkOptions::max_connections`]), handshakes at
//! once, known vats ([`NetworkOptions::max_known_vats`], 16 addresses each),
//! the provider's handoff table ([`NetworkOptions::handoff`]), and every wait:
//! dials and `hello` ([`NetworkOptions::connect_timeout`]), redeems
//! ([`NetworkOptions::redeem_timeout`]) and the provider's wait for the
//! introducer ([`HandoffLimits::max_wait`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use capnp::capability::FromClientHook;
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{CapabilityServerSet, Disconnector};
use futures::future::{FutureExt, LocalBoxFuture, Shared};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::error::{Error, IntroductionError, Result};
use crate::identity::Identity;
use crate::intro::{
    random_nonce, HandoffLimits, HandoffTable, Introduction, Nonce, ThirdPartyToAwait,
};
use crate::policy::{AnyVat, PeerPolicy, Pinned};
use crate::rpc::{self, Acceptor, PeerInfo};
use crate::schema::network_capnp::vat;
use crate::stream::{NoiseStream, DEFAULT_HANDSHAKE_TIMEOUT};
use crate::sturdy::{Address, SturdyRef, MAX_ADDRESSES};
use crate::vat_id::VatId;
use crate::wire::HandshakeConfig;

mod book;
mod service;

use book::AddressBook;
use service::VatRoot;

/// How long the end of a connection may take (the authenticated CLOSE).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the lower vat keeps a connection that lost the tie-break, in case
/// the higher vat does not close it after being told.
const LOSER_GRACE: Duration = Duration::from_secs(5);
/// Dials one [`Network::connect`] starts at most before giving up.
const MAX_DIALS_PER_CONNECT: usize = 2;
/// The reason `Vat.hello` fails with on a connection that lost the tie-break.
pub(crate) const CROSSED: &str =
    "crossed dial: the vat with the lower VatId keeps the connection it initiated";

/// Settings of a [`Network`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NetworkOptions {
    /// Suites accepted, in this vat's order of preference, and session
    /// settings. Incoming connections may use any of them; outgoing ones
    /// propose the first, and retry once with the mandatory suite when a
    /// vat closes without answering it and the list holds the mandatory
    /// suite (as [`rpc::connect`] does: see
    /// [`HandshakeConfig::fallback_after`];
    /// [`ConnectionInfo::peer`]'s `unanswered_suite` then names the suite
    /// that was not answered). Default: every suite, the fastest on this
    /// machine first.
    pub handshake: HandshakeConfig,
    /// The longest one outgoing TCP connect may take, and then the handshake;
    /// also bounds `Vat.hello` and `provide`. Default 10 s.
    pub connect_timeout: Duration,
    /// The longest an incoming handshake may take. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub handshake_timeout: Duration,
    /// Incoming handshakes past message 1 at once (see
    /// [`crate::admission`]). Default 64.
    pub max_handshakes: usize,
    /// Of those, at most this many from one source address (IPv4 address,
    /// IPv6 /64); more wait, unanswered, for one of theirs to end. Default 16.
    pub max_handshakes_per_source: usize,
    /// How long an incoming handshake that fails after message 1 keeps its
    /// slot (see [`crate::admission`]). Default 1 s.
    pub handshake_failure_hold: Duration,
    /// Connections open at once, in both directions. At the limit incoming
    /// connections wait and dials fail. Default 1024.
    pub max_connections: usize,
    /// Close a connection after it moved no bytes for about this long (between
    /// once and 1.5 times it). Capabilities obtained over it break, as with
    /// any disconnect; a call waiting that long without traffic fails too.
    /// Default `None`: connections stay until a side closes them.
    pub idle_timeout: Option<Duration>,
    /// Limits on incoming messages.
    pub reader_options: ReaderOptions,
    /// The addresses this vat tells others (in introductions of its
    /// capabilities). Empty (the default): the listener's local address.
    pub advertised_addresses: Vec<Address>,
    /// The most vats in the address book. Default 4096.
    pub max_known_vats: usize,
    /// The provider's handoff table: entries, waiting redeems, how long a
    /// redeem waits for the introducer's request (`max_wait`, default 30 s).
    pub handoff: HandoffLimits,
    /// How long introductions made by [`Network::introduce`] are valid.
    /// Default 5 minutes.
    pub introduction_lifetime: Duration,
    /// The longest [`Network::redeem`] waits for the provider's answer
    /// (which may itself wait for the introducer's request). Default 60 s.
    pub redeem_timeout: Duration,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            handshake: HandshakeConfig::default(),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: crate::admission::DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: crate::admission::DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
            handshake_failure_hold: crate::admission::DEFAULT_FAILURE_HOLD,
            max_connections: 1024,
            idle_timeout: None,
            reader_options: ReaderOptions::new(),
            advertised_addresses: Vec::new(),
            max_known_vats: 4096,
            handoff: HandoffLimits::default(),
            introduction_lifetime: Duration::from_secs(300),
            redeem_timeout: Duration::from_secs(60),
        }
    }
}

type BootstrapFn = Box<dyn Fn(&PeerInfo) -> capnp::capability::Client>;
type RedeemFn = Box<dyn Fn(&Redeemed, capnp::capability::Client) -> capnp::capability::Client>;

/// What a provider knows about an introduction being redeemed: given to the
/// hook of [`NetworkBuilder::on_redeem`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Redeemed {
    /// The vat that asked to set the capability aside and signed the introduction.
    pub introducer: VatId,
    /// The authenticated vat redeeming it (the introduction's final holder).
    pub redeemer: VatId,
    /// The handoff's nonce.
    pub nonce: Nonce,
}

/// One live connection, as [`Network::connections`] reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The peer: its authenticated VatId, address, handshake hash, suite.
    pub peer: PeerInfo,
    /// True if this vat initiated the connection.
    pub initiated_locally: bool,
}

/// Builds a [`Network`]: see [`Network::builder`].
#[must_use = "call start() to run the network"]
pub struct NetworkBuilder {
    identity: Identity,
    listen: Option<SocketAddr>,
    policy: Arc<dyn PeerPolicy>,
    options: NetworkOptions,
    bootstrap: Option<BootstrapFn>,
    on_redeem: Option<RedeemFn>,
}

impl fmt::Debug for NetworkBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkBuilder")
            .field("vat_id", &self.identity.vat_id())
            .field("listen", &self.listen)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl NetworkBuilder {
    /// Listens for other vats on `addr` (for example `127.0.0.1:0`). Without
    /// it the vat only dials out.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Who may connect to this vat (default [`AnyVat`]). Outgoing
    /// connections are always pinned to the VatId dialed.
    pub fn policy(mut self, policy: Arc<dyn PeerPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the [`NetworkOptions`].
    pub fn options(mut self, options: NetworkOptions) -> Self {
        self.options = options;
        self
    }

    /// The application's bootstrap capability for each peer, built once per
    /// connection from the peer's authenticated [`PeerInfo`] (when the peer
    /// first asks for it). Without it, peers get a broken capability.
    pub fn bootstrap<F, C>(mut self, factory: F) -> Self
    where
        F: Fn(&PeerInfo) -> C + 'static,
        C: FromClientHook,
    {
        self.bootstrap = Some(Box::new(move |peer| {
            capnp::capability::Client::new(factory(peer).into_client_hook())
        }));
        self
    }

    /// Called when this vat, as provider, hands out a capability to the
    /// redeemer of an introduction: returns what the redeemer gets (by
    /// default the capability the introducer set aside). capnp-rpc tells a
    /// server nothing about who calls; this is where a provider learns the
    /// redeemer's authenticated VatId, for example to give it a facet of
    /// its own (find the object with a [`CapabilityServerSet`]).
    pub fn on_redeem<F>(mut self, hook: F) -> Self
    where
        F: Fn(&Redeemed, capnp::capability::Client) -> capnp::capability::Client + 'static,
    {
        self.on_redeem = Some(Box::new(hook));
        self
    }

    /// Binds the listener (if any) and starts accepting connections on the
    /// current `LocalSet`.
    ///
    /// # Errors
    /// [`Error::Io`] if the listener cannot be bound; [`Error::Config`] if
    /// more than [`MAX_ADDRESSES`] addresses are advertised.
    ///
    /// # Panics
    /// If not run inside a [`tokio::task::LocalSet`].
    pub async fn start(self) -> Result<Network> {
        let listener = match self.listen {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let local = match &listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let mut advertised = self.options.advertised_addresses.clone();
        if advertised.is_empty() {
            if let Some(local) = local {
                advertised.push(local.to_string().parse()?);
            }
        }
        if advertised.len() > MAX_ADDRESSES {
            return Err(Error::Config(format!(
                "at most {MAX_ADDRESSES} addresses can be advertised"
            )));
        }
        let vat_id = self.identity.vat_id();
        let options = self.options;
        let inner = Rc::new(Inner {
            vat_id,
            acceptor: Acceptor {
                identity: self.identity.clone(),
                policy: self.policy,
                slots: crate::admission::HandshakeSlots::with_failure_hold(
                    options.max_handshakes,
                    options.max_handshakes_per_source,
                    options.handshake_failure_hold,
                ),
                handshake: options.handshake.clone(),
                timeout: options.handshake_timeout,
            },
            identity: self.identity,
            permits: Arc::new(Semaphore::new(options.max_connections.max(1))),
            advertised,
            local,
            bootstrap: self.bootstrap.unwrap_or_else(|| {
                Box::new(|_: &PeerInfo| {
                    capnp_rpc::new_broken_cap(capnp::Error::failed(
                        "this vat offers no bootstrap capability".into(),
                    ))
                })
            }),
            on_redeem: self.on_redeem,
            state: RefCell::new(State {
                shut_down: false,
                peers: HashMap::new(),
                open: HashMap::new(),
                book: AddressBook::new(options.max_known_vats),
                handoffs: HandoffTable::new(vat_id, options.handoff.clone()),
                next_id: 0,
            }),
            changed: Notify::new(),
            roots: RefCell::new(CapabilityServerSet::new()),
            listener: RefCell::new(None),
            options,
        });
        if let Some(listener) = listener {
            let task = tokio::task::spawn_local(accept_loop(Rc::downgrade(&inner), listener));
            *inner.listener.borrow_mut() = Some(task);
        }
        info!(vat = %vat_id.fingerprint(), addr = ?local, "network started");
        Ok(Network { inner })
    }
}

/// One vat of a network: see the [module docs](self).
///
/// A cheap handle (clones share the vat). Single-threaded, like capnp-rpc:
/// use it inside one [`tokio::task::LocalSet`]. Call [`Network::shutdown`]
/// to close it; dropping every handle stops listening but leaves
/// established connections to their peers (as [`crate::rpc::Connection`] does).
#[derive(Clone)]
pub struct Network {
    inner: Rc<Inner>,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Network")
            .field("vat_id", &self.inner.vat_id)
            .field("local_addr", &self.inner.local)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    /// The last handle is gone: stop listening. Established connections run
    /// on until their peers close them (see [`Network::shutdown`]).
    fn drop(&mut self) {
        if let Some(task) = self.listener.get_mut().take() {
            task.abort();
        }
    }
}

pub(crate) struct Inner {
    identity: Identity,
    vat_id: VatId,
    acceptor: Acceptor,
    options: NetworkOptions,
    permits: Arc<Semaphore>,
    advertised: Vec<Address>,
    local: Option<SocketAddr>,
    bootstrap: BootstrapFn,
    on_redeem: Option<RedeemFn>,
    state: RefCell<State>,
    /// Woken whenever a connection is installed or ends, or a dial ends.
    changed: Notify,
    /// Our `Vat` objects, so that `provide` can refuse to hand one off.
    roots: RefCell<CapabilityServerSet<VatRoot, vat::Client>>,
    listener: RefCell<Option<JoinHandle<()>>>,
}

struct State {
    shut_down: bool,
    peers: HashMap<VatId, PeerSlot>,
    /// Every open connection, live or not (undecided, lost, closing).
    open: HashMap<u64, Rc<Conn>>,
    book: AddressBook,
    handoffs: HandoffTable<capnp::capability::Client>,
    next_id: u64,
}

type DialFuture = Shared<LocalBoxFuture<'static, Result<Dialed>>>;

#[derive(Default)]
struct PeerSlot {
    /// The pair's one connection, handed to callers.
    live: Option<Rc<Conn>>,
    /// Our dial in progress to this vat, shared by every caller waiting for it.
    dial: Option<DialFuture>,
}

#[derive(Clone, Copy, Debug)]
enum Dialed {
    /// Our connection became the pair's connection.
    Installed,
    /// The peer (the lower VatId) keeps the connection it initiated.
    Crossed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// Established, waiting for the tie-break (only connections initiated by
    /// the higher VatId).
    Candidate,
    /// The pair's connection.
    Live,
    /// Lost the tie-break or was replaced; closing.
    Lost,
    /// Its `RpcSystem` has ended.
    Closed,
}

pub(crate) struct Conn {
    id: u64,
    info: PeerInfo,
    we_initiated: bool,
    /// The peer's `Vat`.
    root: vat::Client,
    /// The peer's application bootstrap (`root.bootstrap()`), asked once.
    app: RefCell<Option<capnp::capability::Client>>,
    status: Cell<Status>,
    disconnector: RefCell<Option<Disconnector<Side>>>,
    activity: Rc<Cell<u64>>,
}

impl Conn {
    fn app(&self) -> capnp::capability::Client {
        self.app
            .borrow_mut()
            .get_or_insert_with(|| {
                capnp::capability::Client::new(
                    self.root
                        .bootstrap_request()
                        .send()
                        .pipeline
                        .get_cap()
                        .as_cap(),
                )
            })
            .clone()
    }
}

fn io_error(kind: std::io::ErrorKind, msg: String) -> Error {
    Error::Io(Arc::new(std::io::Error::new(kind, msg)))
}

fn shut_down_error() -> Error {
    io_error(
        std::io::ErrorKind::NotConnected,
        "the network has been shut down".into(),
    )
}

impl Inner {
    fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.state.borrow().open.get(&id).cloned()
    }

    /// Sets up the `RpcSystem` of a new authenticated connection, with our
    /// `Vat` as its bootstrap, and runs it on the `LocalSet`.
    fn establish(
        self: &Rc<Self>,
        stream: NoiseStream<TcpStream>,
        info: PeerInfo,
        we_initiated: bool,
        permit: OwnedSemaphorePermit,
    ) -> Rc<Conn> {
        let id = {
            let mut st = self.state.borrow_mut();
            st.next_id += 1;
            st.next_id
        };
        let root = VatRoot::new(Rc::downgrade(self), info.clone(), id);
        let ours: vat::Client = self.roots.borrow_mut().new_client(root);
        let (local, remote) = if we_initiated {
            (Side::Client, Side::Server)
        } else {
            (Side::Server, Side::Client)
        };
        let (mut rpc_system, shared) = rpc::rpc_system(
            stream,
            local,
            Some(ours.client),
            self.options.reader_options,
        );
        let root: vat::Client = rpc_system.bootstrap(remote);
        let conn = Rc::new(Conn {
            id,
            info,
            we_initiated,
            root,
            app: RefCell::new(None),
            status: Cell::new(Status::Candidate),
            disconnector: RefCell::new(Some(rpc_system.get_disconnector())),
            activity: shared.activity(),
        });
        self.state.borrow_mut().open.insert(id, conn.clone());
        debug!(peer = %conn.info.vat_id.fingerprint(), id, we_initiated, "connection established");
        let weak = Rc::downgrade(self);
        let ended = conn.clone();
        tokio::task::spawn_local(async move {
            let result = rpc::run(rpc_system, shared).await;
            if let Some(inner) = weak.upgrade() {
                inner.ended(&ended, result);
            }
            drop(permit);
        });
        if let Some(idle) = self.options.idle_timeout {
            tokio::task::spawn_local(watch_idle(Rc::downgrade(self), Rc::downgrade(&conn), idle));
        }
        conn
    }

    /// Makes `conn` the pair's connection, closing the one it replaces.
    fn install(&self, conn: &Rc<Conn>) {
        if conn.status.get() != Status::Candidate {
            return;
        }
        let old = {
            let mut st = self.state.borrow_mut();
            let slot = st.peers.entry(conn.info.vat_id).or_default();
            slot.live.replace(conn.clone())
        };
        conn.status.set(Status::Live);
        info!(
            peer = %conn.info.vat_id.fingerprint(),
            id = conn.id,
            initiated_locally = conn.we_initiated,
            "connection is live"
        );
        if let Some(old) = old {
            if old.id != conn.id {
                debug!(peer = %old.info.vat_id.fingerprint(), id = old.id, "replaced");
                self.close(&old);
            }
        }
        self.changed.notify_waiters();
    }

    /// Starts closing `conn` (sends the authenticated CLOSE); it leaves the
    /// tables when its `RpcSystem` ends.
    fn close(&self, conn: &Conn) {
        if conn.status.get() != Status::Closed {
            conn.status.set(Status::Lost);
        }
        if let Some(d) = conn.disconnector.borrow_mut().take() {
            tokio::task::spawn_local(async move {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, d).await;
            });
        }
        let mut st = self.state.borrow_mut();
        if let Some(slot) = st.peers.get_mut(&conn.info.vat_id) {
            if slot.live.as_ref().is_some_and(|l| l.id == conn.id) {
                slot.live = None;
            }
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// The connection's `RpcSystem` has ended.
    fn ended(&self, conn: &Conn, result: std::result::Result<(), capnp::Error>) {
        conn.status.set(Status::Closed);
        {
            let mut st = self.state.borrow_mut();
            st.open.remove(&conn.id);
            let vat = conn.info.vat_id;
            if let Some(slot) = st.peers.get_mut(&vat) {
                if slot.live.as_ref().is_some_and(|l| l.id == conn.id) {
                    slot.live = None;
                }
                if slot.live.is_none() && slot.dial.is_none() {
                    st.peers.remove(&vat);
                }
            }
        }
        self.roots.borrow_mut().gc();
        match result {
            Ok(()) => info!(peer = %conn.info.vat_id.fingerprint(), id = conn.id, "disconnected"),
            Err(e) => {
                info!(peer = %conn.info.vat_id.fingerprint(), id = conn.id, error = %e, "connection failed")
            }
        }
        self.changed.notify_waiters();
    }

    /// The pair's connection to `vat`, opening it if needed.
    async fn live(self: &Rc<Self>, vat: &VatId) -> Result<Rc<Conn>> {
        if *vat == self.vat_id {
            return Err(Error::Config(
                "a vat does not connect to itself: use its capabilities directly".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + 2 * self.options.connect_timeout;
        let mut dials = 0;
        let mut last_error = None;
        loop {
            let mut notified = pin!(self.changed.notified());
            notified.as_mut().enable();
            let dial = {
                let mut st = self.state.borrow_mut();
                if st.shut_down {
                    return Err(shut_down_error());
                }
                let slot = st.peers.entry(*vat).or_default();
                if let Some(live) = &slot.live {
                    return Ok(live.clone());
                }
                match &slot.dial {
                    Some(dial) => dial.clone(),
                    None if dials >= MAX_DIALS_PER_CONNECT => {
                        if slot.live.is_none() && slot.dial.is_none() {
                            st.peers.remove(vat);
                        }
                        return Err(last_error.unwrap_or_else(|| {
                            io_error(
                                std::io::ErrorKind::TimedOut,
                                format!("no connection to {vat} could be agreed on"),
                            )
                        }));
                    }
                    None => {
                        dials += 1;
                        let dial = dial(self.clone(), *vat).boxed_local().shared();
                        slot.dial = Some(dial.clone());
                        dial
                    }
                }
            };
            match dial.await {
                Ok(Dialed::Installed) => {}
                Ok(Dialed::Crossed) => {
                    // The peer's own connection is on its way: wait for it.
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        last_error = Some(io_error(
                            std::io::ErrorKind::TimedOut,
                            format!("{vat} kept its own connection, which did not arrive in time"),
                        ));
                    }
                }
                Err(e) => {
                    let arrived = self
                        .state
                        .borrow()
                        .peers
                        .get(vat)
                        .is_some_and(|s| s.live.is_some());
                    if !arrived {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Decides the tie-break for `conn`, a connection the peer (the higher
    /// VatId) initiated: called by the peer's `Vat.hello`.
    pub(crate) async fn decide(self: &Rc<Self>, conn: &Rc<Conn>) -> Result<(), capnp::Error> {
        let crossed = || Err(capnp::Error::failed(CROSSED.into()));
        loop {
            match conn.status.get() {
                Status::Live => return Ok(()),
                Status::Lost | Status::Closed => return crossed(),
                Status::Candidate if conn.we_initiated || self.vat_id > conn.info.vat_id => {
                    // Only the lower vat decides, on connections it received.
                    return crossed();
                }
                Status::Candidate => {}
            }
            let (dial, live) = {
                let st = self.state.borrow();
                if st.shut_down {
                    return Err(capnp::Error::disconnected("shutting down".into()));
                }
                match st.peers.get(&conn.info.vat_id) {
                    Some(slot) => (slot.dial.clone(), slot.live.clone()),
                    None => (None, None),
                }
            };
            if let Some(dial) = dial {
                let _ = dial.await;
                continue;
            }
            match live {
                Some(live) if live.we_initiated => {
                    // Our own connection exists: a crossed dial (the peer will
                    // get ours), or one the peer has lost track of. Ask it.
                    let probe = live.root.hello_request().send().promise;
                    let alive = matches!(
                        tokio::time::timeout(self.options.connect_timeout, probe).await,
                        Ok(Ok(_))
                    );
                    if conn.status.get() != Status::Candidate {
                        continue;
                    }
                    if alive && live.status.get() == Status::Live {
                        conn.status.set(Status::Lost);
                        let weak = Rc::downgrade(self);
                        let loser = conn.clone();
                        tokio::task::spawn_local(async move {
                            tokio::time::sleep(LOSER_GRACE).await;
                            if let Some(inner) = weak.upgrade() {
                                inner.close(&loser);
                            }
                        });
                        return crossed();
                    }
                    if live.status.get() == Status::Live {
                        self.close(&live);
                    }
                    self.install(conn);
                }
                _ => self.install(conn),
            }
        }
    }
}

/// One outgoing dial to `vat`, shared by every caller waiting for it.
async fn dial(inner: Rc<Inner>, vat: VatId) -> Result<Dialed> {
    let result = dial_addresses(&inner, vat).await;
    {
        let mut st = inner.state.borrow_mut();
        if let Some(slot) = st.peers.get_mut(&vat) {
            slot.dial = None;
            if slot.live.is_none() {
                st.peers.remove(&vat);
            }
        }
    }
    inner.changed.notify_waiters();
    result
}

async fn dial_addresses(inner: &Rc<Inner>, vat: VatId) -> Result<Dialed> {
    let addresses = inner.state.borrow_mut().book.get(&vat);
    if addresses.is_empty() {
        return Err(Error::Config(format!("no address is known for {vat}")));
    }
    let permit = inner.permits.clone().try_acquire_owned().map_err(|_| {
        io_error(
            std::io::ErrorKind::ResourceBusy,
            format!(
                "the network already has {} connections open",
                inner.options.max_connections
            ),
        )
    })?;
    let mut last = None;
    for address in addresses {
        let dialed = rpc::dial(
            address.to_string(),
            &inner.identity,
            Arc::new(Pinned(vat)),
            inner.options.handshake.clone(),
            inner.options.connect_timeout,
        )
        .await;
        match dialed {
            Ok((stream, info)) => {
                if inner.state.borrow().shut_down {
                    return Err(shut_down_error());
                }
                let conn = inner.establish(stream, info, true, permit);
                return settle_outgoing(inner, conn).await;
            }
            Err(e) => {
                debug!(peer = %vat.fingerprint(), %address, error = %e, "dial failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Config(format!("no address is known for {vat}"))))
}

/// Decides whether our new outgoing connection is the pair's connection.
async fn settle_outgoing(inner: &Rc<Inner>, conn: Rc<Conn>) -> Result<Dialed> {
    if inner.vat_id < conn.info.vat_id {
        // Ours is the lower VatId: the connection we initiate always wins.
        inner.install(&conn);
        return Ok(Dialed::Installed);
    }
    let hello = conn.root.hello_request().send().promise;
    let answer = tokio::time::timeout(inner.options.connect_timeout, hello).await;
    match answer {
        Ok(Ok(_)) if conn.status.get() == Status::Candidate => {
            inner.install(&conn);
            Ok(Dialed::Installed)
        }
        Ok(Ok(_)) => Ok(Dialed::Crossed),
        Ok(Err(e)) if e.to_string().contains(CROSSED) => {
            debug!(peer = %conn.info.vat_id.fingerprint(), "crossed dial: using the peer's connection");
            inner.close(&conn);
            Ok(Dialed::Crossed)
        }
        Ok(Err(e)) => {
            inner.close(&conn);
            Err(io_error(
                std::io::ErrorKind::ConnectionAborted,
                format!(
                    "{} closed the connection (it may have refused this vat's identity): {e}",
                    conn.info.vat_id
                ),
            ))
        }
        Err(_) => {
            inner.close(&conn);
            Err(Error::HandshakeTimeout(inner.options.connect_timeout))
        }
    }
}

async fn accept_loop(weak: Weak<Inner>, listener: TcpListener) {
    loop {
        let Some(permits) = weak.upgrade().map(|i| i.permits.clone()) else {
            return;
        };
        let Some((permit, tcp, addr)) = rpc::accept_within(&permits, &listener).await else {
            return;
        };
        let weak = weak.clone();
        tokio::task::spawn_local(async move {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let Some((stream, info)) = inner.acceptor.handshake(tcp, addr).await else {
                return;
            };
            if info.vat_id == inner.vat_id || inner.state.borrow().shut_down {
                return;
            }
            let conn = inner.establish(stream, info, false, permit);
            if conn.info.vat_id < inner.vat_id {
                // Initiated by the lower VatId: the pair's connection at once.
                inner.install(&conn);
                return;
            }
            // Otherwise the peer asks with Vat.hello (Inner::decide); one
            // that does not ask in time does not keep the connection.
            let limit = 2 * inner.options.connect_timeout;
            drop(inner);
            tokio::time::sleep(limit).await;
            if let Some(inner) = weak.upgrade() {
                if conn.status.get() == Status::Candidate {
                    debug!(peer = %conn.info.vat_id.fingerprint(), "no hello in time");
                    inner.close(&conn);
                }
            }
        });
    }
}

async fn watch_idle(inner: Weak<Inner>, conn: Weak<Conn>, idle: Duration) {
    let tick = (idle / 2).max(Duration::from_millis(5));
    let mut last = None;
    let mut quiet = 0;
    loop {
        tokio::time::sleep(tick).await;
        let (Some(inner), Some(conn)) = (inner.upgrade(), conn.upgrade()) else {
            return;
        };
        if conn.status.get() == Status::Closed {
            return;
        }
        let moved = conn.activity.get();
        if last == Some(moved) {
            quiet += 1;
        } else {
            quiet = 0;
            last = Some(moved);
        }
        if quiet >= 2 {
            info!(peer = %conn.info.vat_id.fingerprint(), id = conn.id, "closing idle connection");
            inner.close(&conn);
            return;
        }
    }
}

fn rpc_failure(what: &str, e: capnp::Error) -> Error {
    io_error(
        std::io::ErrorKind::Other,
        format!("Cap'n Proto RPC ({what}): {e}"),
    )
}

impl Network {
    /// Starts building the network of the vat `identity`.
    pub fn builder(identity: Identity) -> NetworkBuilder {
        NetworkBuilder {
            identity,
            listen: None,
            policy: Arc::new(AnyVat),
            options: NetworkOptions::default(),
            bootstrap: None,
            on_redeem: None,
        }
    }

    /// This vat's VatId.
    pub fn vat_id(&self) -> VatId {
        self.inner.vat_id
    }

    /// The listener's local address, if the network listens.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local
    }

    /// The addresses this vat tells others.
    pub fn advertised_addresses(&self) -> &[Address] {
        &self.inner.advertised
    }

    /// The settings in force.
    pub fn options(&self) -> &NetworkOptions {
        &self.inner.options
    }

    /// Adds addresses where `vat` can be reached to the address book (after
    /// those already known; at most 16 per vat).
    pub fn add_addresses(&self, vat: VatId, addresses: &[Address]) {
        self.inner.state.borrow_mut().book.learn(vat, addresses);
    }

    /// Adds a sturdy ref's vat and addresses to the address book.
    pub fn learn_sturdy_ref(&self, sturdy_ref: &SturdyRef) {
        self.add_addresses(*sturdy_ref.vat_id(), sturdy_ref.addresses());
    }

    /// The addresses known for `vat`, in the order they are tried.
    pub fn addresses(&self, vat: &VatId) -> Vec<Address> {
        self.inner.state.borrow_mut().book.get(vat)
    }

    /// Forgets the addresses of `vat`.
    pub fn forget(&self, vat: &VatId) {
        self.inner.state.borrow_mut().book.forget(vat);
    }

    /// The application bootstrap capability of `vat` (built by its factory
    /// for this vat), over the pair's live connection, opened if needed:
    /// dialed at the known addresses in order, the peer pinned to `vat`. The
    /// returned client is pipelined: calls on it may be sent at once.
    ///
    /// # Errors
    /// [`Error::Config`] if no address is known or `vat` is this vat;
    /// the errors of the dials ([`Error::PeerRefused`] for a peer that is
    /// not `vat`, [`Error::HandshakeTimeout`], [`Error::Io`]); [`Error::Io`]
    /// if the network is shut down or at its connection limit.
    pub async fn connect<C: FromClientHook>(&self, vat: &VatId) -> Result<C> {
        let conn = self.inner.live(vat).await?;
        Ok(C::new(conn.app().hook))
    }

    /// The peer's `Vat`, the network service of the pair's connection
    /// (`schema/network.capnp`), opened if needed. For tests and for
    /// protocols beyond this module's; [`Network::connect`] is what
    /// applications want.
    ///
    /// # Errors
    /// As [`Network::connect`].
    pub async fn root(&self, vat: &VatId) -> Result<vat::Client> {
        Ok(self.inner.live(vat).await?.root.clone())
    }

    /// The live connections: one per peer.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let st = self.inner.state.borrow();
        let mut v: Vec<ConnectionInfo> = st
            .peers
            .values()
            .filter_map(|s| s.live.as_ref())
            .map(|c| ConnectionInfo {
                peer: c.info.clone(),
                initiated_locally: c.we_initiated,
            })
            .collect();
        v.sort_by_key(|c| c.peer.vat_id);
        v
    }

    /// Connections open with `vat`, counting those still deciding the
    /// tie-break or closing: 1 once a pair has settled.
    pub fn open_connections_with(&self, vat: &VatId) -> usize {
        let st = self.inner.state.borrow();
        st.open
            .values()
            .filter(|c| c.info.vat_id == *vat && c.status.get() != Status::Closed)
            .count()
    }

    /// Closes the connection with `vat`, if any (the next
    /// [`Network::connect`] opens a new one). Returns whether there was one.
    pub fn disconnect(&self, vat: &VatId) -> bool {
        let live = self
            .inner
            .state
            .borrow()
            .peers
            .get(vat)
            .and_then(|s| s.live.clone());
        match live {
            Some(conn) => {
                self.inner.close(&conn);
                true
            }
            None => false,
        }
    }

    /// How many capabilities this vat, as provider, holds set aside for
    /// introduced vats (with records of spent and withdrawn handoffs), and
    /// how many redeems wait for their introducer's request.
    pub fn handoff_counts(&self) -> (usize, usize) {
        let st = self.inner.state.borrow();
        (st.handoffs.entries(), st.handoffs.waiting())
    }

    /// Stops listening, fails waiting redeems, and closes every connection
    /// (each with its authenticated CLOSE, within a few seconds). Later
    /// calls fail.
    pub async fn shutdown(&self) {
        let conns: Vec<Rc<Conn>> = {
            let mut st = self.inner.state.borrow_mut();
            st.shut_down = true;
            st.peers.clear();
            st.handoffs = HandoffTable::new(self.inner.vat_id, self.inner.options.handoff.clone());
            st.open.values().cloned().collect()
        };
        if let Some(task) = self.inner.listener.borrow_mut().take() {
            task.abort();
        }
        let closing = conns.iter().filter_map(|c| {
            c.status.set(Status::Lost);
            c.disconnector.borrow_mut().take()
        });
        let closing: Vec<_> = closing
            .map(|d| tokio::time::timeout(CLOSE_TIMEOUT, d))
            .collect();
        futures::future::join_all(closing).await;
        self.inner.changed.notify_waiters();
        info!(vat = %self.inner.vat_id.fingerprint(), "network shut down");
    }

    /// Bob's side of an introduction, step 1 alone: asks `provider` to set
    /// `cap` aside for `request`'s recipient, over this vat's connection to
    /// it. `cap` must be a capability `provider` hosts, obtained over that
    /// connection. Returns the addresses the provider advertises.
    /// [`Network::introduce`] does this and signs the introduction.
    ///
    /// # Errors
    /// [`Error::Introduction`] with the provider's refusal
    /// ([`IntroductionError::NotHosted`] for a capability it does not host
    /// itself, `Expired`, `Replayed`, `Limit`, ...); the errors of
    /// [`Network::connect`]; [`Error::Io`] if the call fails.
    pub async fn provide<C: FromClientHook>(
        &self,
        cap: &C,
        provider: &VatId,
        request: &ThirdPartyToAwait,
    ) -> Result<Vec<Address>> {
        let root = self.root(provider).await?;
        let mut call = root.provide_request();
        {
            let mut p = call.get();
            request.write_to(p.reborrow().init_await());
            p.init_cap()
                .set_as_capability(cap.as_client_hook().add_ref());
        }
        let timeout = self.inner.options.connect_timeout;
        let reply = tokio::time::timeout(timeout, call.send().promise)
            .await
            .map_err(|_| Error::Introduction(IntroductionError::Timeout))?
            .map_err(|e| rpc_failure("provide", e))?;
        let reply = reply.get().map_err(|e| rpc_failure("provide", e))?;
        service::check(reply.get_error(), reply.get_reason())?;
        let addresses = crate::sturdy::read_addresses(reply.get_addresses()).map_err(|e| {
            Error::Introduction(IntroductionError::Malformed(format!(
                "the provider's addresses: {e}"
            )))
        })?;
        Ok(addresses)
    }

    /// Bob's side of an introduction: sets `cap` (hosted by `provider`)
    /// aside at the provider for `recipient`, then signs and returns the
    /// [`Introduction`] to give to `recipient` (for example
    /// `introduction.encode()` as a parameter of an ordinary call). It is
    /// valid for [`NetworkOptions::introduction_lifetime`], names the
    /// addresses the provider advertises and those this vat knows, and can
    /// be redeemed once, by `recipient` only.
    ///
    /// # Errors
    /// The errors of [`Network::provide`]; [`Error::Config`] if `recipient`
    /// or `provider` is this vat.
    pub async fn introduce<C: FromClientHook>(
        &self,
        cap: &C,
        provider: &VatId,
        recipient: &VatId,
    ) -> Result<Introduction> {
        if *recipient == self.inner.vat_id || *provider == self.inner.vat_id {
            return Err(Error::Config(
                "introductions are between this vat's peers: pass the capability directly".into(),
            ));
        }
        let expires_at = SystemTime::now() + self.inner.options.introduction_lifetime;
        let request = ThirdPartyToAwait::new(*recipient, random_nonce(), expires_at)?;
        let mut addresses = self.provide(cap, provider, &request).await?;
        for known in self.addresses(provider) {
            if addresses.len() < MAX_ADDRESSES && !addresses.contains(&known) {
                addresses.push(known);
            }
        }
        addresses.truncate(MAX_ADDRESSES);
        Introduction::new(
            &self.inner.identity,
            *provider,
            addresses,
            *recipient,
            *request.nonce(),
            expires_at,
        )
    }

    /// Withdraws a handoff this vat asked `provider` for: a later (or waiting)
    /// redeem fails with [`IntroductionError::Revoked`]. A capability already
    /// redeemed is not affected.
    ///
    /// # Errors
    /// The errors of [`Network::connect`]; [`Error::Io`] if the call fails.
    pub async fn withdraw(&self, provider: &VatId, nonce: &Nonce) -> Result<()> {
        let root = self.root(provider).await?;
        let mut call = root.withdraw_request();
        call.get().set_nonce(nonce);
        tokio::time::timeout(self.inner.options.connect_timeout, call.send().promise)
            .await
            .map_err(|_| Error::Introduction(IntroductionError::Timeout))?
            .map_err(|e| rpc_failure("withdraw", e))?;
        Ok(())
    }

    /// Alice's side of an introduction: checks it (the introducer's
    /// signature, the expiry, that it is for this vat), connects straight to
    /// its provider (at the addresses known or named in the introduction,
    /// pinned to the provider's VatId), presents it, and returns the
    /// capability. Calls on it go to the provider directly.
    ///
    /// # Errors
    /// [`Error::Introduction`]: the local check's refusal, or the
    /// provider's (`Replayed`, `Revoked`, `Timeout` when the introducer's
    /// request never came or the provider restarted, ...), or `Timeout`
    /// after [`NetworkOptions::redeem_timeout`]; the errors of
    /// [`Network::connect`]; [`Error::Io`] if the call fails.
    pub async fn redeem<C: FromClientHook>(&self, introduction: &Introduction) -> Result<C> {
        introduction.verify(&self.inner.vat_id, SystemTime::now())?;
        let provider = *introduction.provider();
        if provider == self.inner.vat_id {
            return Err(Error::Config(
                "this vat is the introduction's provider: nothing to redeem elsewhere".into(),
            ));
        }
        self.add_addresses(provider, introduction.provider_addresses());
        let mut retried = false;
        let reply = loop {
            let conn = self.inner.live(&provider).await?;
            let mut call = conn.root.accept_request();
            introduction
                .write_to(call.get().init_completion().init_contact())
                .map_err(|e| rpc_failure("accept", e))?;
            let reply =
                tokio::time::timeout(self.inner.options.redeem_timeout, call.send().promise)
                    .await
                    .map_err(|_| Error::Introduction(IntroductionError::Timeout))?;
            match reply {
                // A connection that ended before we noticed (the provider
                // restarted): forget it and present the introduction once
                // more over a new one. Safe: the provider allows one use.
                Err(e) if e.kind == capnp::ErrorKind::Disconnected && !retried => {
                    retried = true;
                    self.inner.close(&conn);
                }
                other => break other.map_err(|e| rpc_failure("accept", e))?,
            }
        };
        let reply = reply.get().map_err(|e| rpc_failure("accept", e))?;
        service::check(reply.get_error(), reply.get_reason())?;
        let cap: capnp::capability::Client = reply
            .get_cap()
            .get_as_capability()
            .map_err(|e| rpc_failure("accept", e))?;
        Ok(C::new(cap.hook))
    }
}
