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
//! # Example
//!
//! Three vats on loopback, each serving its peers an `Office` that knows
//! who calls (the schema and service of the [crate-level
//! example](crate#example-a-server-and-a-client)). Bob calls Carol, then
//! introduces Alice to his `Office` at Carol: Alice redeems it with Carol
//! directly, and Carol gives her an `Office` of her own.
//!
//! ```
//! use std::time::Duration;
//! use capnp_noise::network::{Introduction, Network, NetworkConfig, PeerInfo, Redeemed};
//! use capnp_noise::{Identity, VatId};
//! # use capnp_noise_test::schema::demo_capnp as office_capnp;
//! use office_capnp::office;
//!
//! struct Office { caller: VatId }
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
//! /// A vat listening on a loopback port that serves each peer an Office.
//! async fn vat() -> capnp_noise::Result<Network> {
//!     Network::builder(Identity::generate())
//!         .listen("127.0.0.1:0".parse().unwrap())
//!         .config(NetworkConfig::default().with_idle_timeout(Some(Duration::from_secs(300))))
//!         .bootstrap(|peer: &PeerInfo| -> office::Client {
//!             capnp_rpc::new_client(Office { caller: peer.vat_id })
//!         })
//!         // An Office answers as the vat it was made for, so an introduced
//!         // one is not handed on as it is: each redeemer gets its own. (This
//!         // vat hosts nothing else; without this hook it hands off nothing.)
//!         .on_redeem(|r: &Redeemed, _introduced| {
//!             capnp_rpc::new_client::<office::Client, _>(Office { caller: r.redeemer }).client
//!         })
//!         .start()
//!         .await
//! }
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // capnp-rpc is single-threaded: run the vats on a LocalSet.
//!     tokio::task::LocalSet::new().run_until(async {
//!         let (alice, bob, carol) = (vat().await?, vat().await?, vat().await?);
//!         // Bob learns where Carol listens, and calls her by her VatId.
//!         bob.add_addresses(carol.vat_id(), carol.advertised_addresses());
//!         let at_carol: office::Client = bob.connect(&carol.vat_id()).await?;
//!         let reply = at_carol.whoami_request().send().promise.await?;
//!         assert_eq!(reply.get()?.get_vat_id()?.to_str()?, bob.vat_id().to_string());
//!
//!         // Bob introduces Alice to his Office at Carol and sends her the
//!         // introduction (as bytes: in a call, a file, ...).
//!         let introduction = bob.introduce(&at_carol, &carol.vat_id(), &alice.vat_id()).await?;
//!         let bytes = introduction.encode();
//!         // Alice connects to Carol (the introduction says where) and
//!         // redeems it: Carol, who knows it is Alice, gives her an Office.
//!         let office: office::Client = alice.redeem(&Introduction::decode(&bytes)?).await?;
//!         let reply = office.whoami_request().send().promise.await?;
//!         assert_eq!(reply.get()?.get_vat_id()?.to_str()?, alice.vat_id().to_string());
//!         assert_eq!(alice.connections()[0].peer.vat_id, carol.vat_id());
//!
//!         for vat in [alice, bob, carol] {
//!             vat.shutdown().await;
//!         }
//!         Ok(())
//!     }).await
//! }
//! ```
//!
//! [`NetworkBuilder::on_redeem`] says what a redeemer gets (the
//! [`Redeemed`] names the introducer, the redeemer and the handoff); a vat
//! whose objects do not depend on who calls can hand them on as they are
//! with [`NetworkBuilder::hand_off_as_is`]. A vat that knows another only by an address
//! adds it with [`Network::add_addresses`] (an [`Address`] parses from
//! `"host:port"`, or converts from a `SocketAddr` with `try_from`); a
//! [`SturdyRef`] names both ([`Network::learn_sturdy_ref`]).
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
//! any capnp-rpc disconnect). With [`NetworkConfig::idle_timeout`], a
//! connection that moves no bytes for that long is closed.
//!
//! # No resumption (Noise `IK`) in the network
//!
//! A network's connections always run `XX`, and its listeners answer an
//! `IK` first flight with the `XX` fallback (SPEC.md 14; `rpc::connect`
//! with [`ClientConfig::resumption`](crate::rpc::ClientConfig::resumption)
//! does resume). That is a decision, not an omission:
//!
//! * Without early data, `IK` saves no round trip (SPEC.md 14.9: the first
//!   answer comes two round trips after the TCP handshake either way) and
//!   costs each side one X25519 operation more, and the initiator's VatId
//!   is then encrypted to a remembered key rather than revealed only to a
//!   responder it has just authenticated (14.8).
//! * With early data, what would ride in the first flight is not an
//!   application's call but the network's own first messages: the
//!   connection's registration (which needs the peer's proven identity and
//!   handshake hash before any RPC runs), `Vat.hello` for the tie-break and
//!   `Vat.bootstrap`, then redeems of introductions, which consume a
//!   handoff and must not run twice. A replayed first flight (14.5) would
//!   reach exactly these, and a vat cannot mark them idempotent.
//!
//! So resumption would cost more than it saves here; an application that
//! wants it for calls it knows to be idempotent uses `rpc::connect`.
//!
//! # Across a WAN: NATs, partitions, restarts
//!
//! Every connection has TCP keepalive ([`NetworkConfig::keepalive`],
//! default [`DEFAULT_KEEPALIVE`](crate::rpc::DEFAULT_KEEPALIVE), 30 s):
//! an idle connection keeps its mapping in NATs that forget idle flows
//! after longer than that, and a connection whose peer stopped answering
//! (the NAT forgot the flow anyway, the peer's host is gone) fails within
//! about twice the keepalive. The one connection per pair then recovers on
//! its own: the failed connection is forgotten, capabilities from it fail
//! with an error, and the next [`Network::connect`] (or sturdy ref, through
//! [`Network::learn_sturdy_ref`] and `connect`) dials a new one. Until the
//! keepalive has found it dead, a connection whose flow was lost still
//! looks open, and calls on it wait. Applications should therefore:
//!
//! * put a timeout on calls that must finish in bounded time;
//! * on an error (or a timeout), get the capability again with
//!   [`Network::connect`] or by restoring its sturdy ref (after a timeout,
//!   [`Network::disconnect`] first, so that a connection that may be dead
//!   is not handed out again), and retry only calls that are safe to
//!   repeat;
//! * after a peer vat restarted (same identity, same address): nothing
//!   more; its old connection fails within about a round trip (it ended
//!   without the authenticated CLOSE), and the next `connect` reaches the
//!   new process.
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
//! Carol hands off only what her application decides, per redeemer: an
//! object bound to its caller (the per-peer bootstrap captures the caller's
//! VatId) must not reach Alice as it is, or it would answer her as Bob. So
//! a provider without a [`NetworkBuilder::on_redeem`] hook, which builds
//! each redeemer its own object, refuses every `provide`
//! ([`NetworkBuilder::hand_off_as_is`] is that hook for vats whose objects
//! do not depend on who calls).
//!
//! Every connection's bootstrap capability is a `Vat` (`schema/network.capnp`)
//! carrying the handoff calls; the application's own bootstrap capability,
//! built per peer by the factory given to [`NetworkBuilder::bootstrap`], is
//! returned by `Vat.bootstrap`, which [`Network::connect`] calls for you.
//!
//! # Limits
//!
//! Connections in all ([`NetworkConfig::max_connections`], part of them
//! kept for dials: [`NetworkConfig::reserved_for_dials`]), unauthenticated
//! connections per source address and the time they have to speak
//! ([`NetworkConfig::max_unauthenticated_per_source`],
//! [`NetworkConfig::first_message_timeout`]), connections waiting for a
//! peer's `hello` ([`NetworkConfig::max_unsettled_per_vat`]), handshakes at
//! once, known vats ([`NetworkConfig::max_known_vats`], 16 addresses each),
//! the provider's handoff table ([`NetworkConfig::handoff`]), and every wait:
//! dials and `hello` ([`NetworkConfig::connect_timeout`]), redeems
//! ([`NetworkConfig::redeem_timeout`]) and the provider's wait for the
//! introducer ([`HandoffConfig::max_wait`]). Set them with the `with_*`
//! setters of [`NetworkConfig`] and [`HandoffConfig`].

use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use capnp::capability::FromClientHook;
use tracing::info;

use crate::error::Result;
use crate::identity::Identity;
use crate::intro::HandoffTable;
use crate::policy::AnyVat;
use crate::schema::network_capnp::vat;
use crate::vat_id::VatId;

mod book;
mod builder;
mod connections;
mod handoff;
mod options;
mod service;
mod tiebreak;

pub use builder::NetworkBuilder;
pub use handoff::Redeemed;
pub use options::NetworkConfig;

// What a network's user meets in its signatures, so that `use
// capnp_noise::network::*` is enough to write one.
pub use crate::intro::{HandoffConfig, Introduction, Nonce, ThirdPartyToAwait};
pub use crate::rpc::PeerInfo;
pub use crate::sturdy::{Address, SturdyRef};
pub use crate::wire::HandshakeConfig;

use connections::{Conn, Inner, Status, CLOSE_TIMEOUT};
use tiebreak::CROSSED;

/// One live connection, as [`Network::connections`] reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The peer: its authenticated VatId, address, handshake hash, suite.
    pub peer: PeerInfo,
    /// True if this vat initiated the connection.
    pub initiated_locally: bool,
}

/// One vat of a network: see the [module docs](self).
///
/// A cheap handle (clones share the vat). Single-threaded, like capnp-rpc:
/// use it inside one [`tokio::task::LocalSet`]. Unlike
/// [`rpc::Server`](crate::rpc::Server), a network does not spread its
/// connections over cores: its shared state and the capabilities that
/// cross between its connections are `!Send` (see
/// [`rpc::Server`](crate::rpc::Server#the-multi-vat-network-stays-on-one-thread)
/// for what spreading it would take). Call [`Network::shutdown`]
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

impl Network {
    /// Starts building the network of the vat `identity`.
    pub fn builder(identity: Identity) -> NetworkBuilder {
        NetworkBuilder {
            identity,
            listen: None,
            policy: Arc::new(AnyVat),
            options: NetworkConfig::default(),
            bootstrap: None,
            on_redeem: None,
        }
    }

    /// This vat's VatId.
    pub fn vat_id(&self) -> VatId {
        self.inner.vat_id
    }

    /// The listener's local address, if the network listens. To tell other
    /// vats where to reach this one, give them
    /// [`advertised_addresses`](Self::advertised_addresses) (by default this
    /// address), or convert it with [`Address::try_from`].
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.local
    }

    /// The addresses this vat tells others.
    pub fn advertised_addresses(&self) -> &[Address] {
        &self.inner.advertised
    }

    /// The settings in force.
    pub fn config(&self) -> &NetworkConfig {
        &self.inner.options
    }

    /// Adds configured addresses where `vat` can be reached to the address
    /// book: after the configured ones already known and before any learned
    /// from an introduction (which give way if the 16 places are full).
    /// Configured addresses are never forgotten for failing.
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
    /// [`Error::NoAddress`](crate::Error::NoAddress) if no address is
    /// known for `vat`; [`Error::Misuse`](crate::Error::Misuse) if `vat` is
    /// this vat; [`Error::ShutDown`](crate::Error::ShutDown);
    /// [`Error::ConnectionLimit`](crate::Error::ConnectionLimit); the errors
    /// of the dials ([`Error::PeerRefused`](crate::Error::PeerRefused) for a
    /// peer that is not `vat`,
    /// [`Error::HandshakeTimeout`](crate::Error::HandshakeTimeout),
    /// [`Error::Io`](crate::Error::Io)); after the dial,
    /// [`Error::ClosedByPeer`](crate::Error::ClosedByPeer) if the peer hangs
    /// up (it may refuse this vat) and
    /// [`Error::NoAgreedConnection`](crate::Error::NoAgreedConnection) if
    /// crossed dials do not settle in time.
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
}
