//! The connection table: every open connection of a vat, the pair's one
//! live connection per peer, and each connection's `RpcSystem` from
//! establishment to its end (accepting, idle timeout, closing). Which
//! connection a pair keeps is decided in [`super::tiebreak`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{CapabilityServerSet, Disconnector};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::identity::Identity;
use crate::intro::HandoffTable;
use crate::rpc::{self, Acceptor, PeerInfo};
use crate::schema::network_capnp::vat;
use crate::stream::NoiseStream;
use crate::sturdy::Address;
use crate::vat_id::VatId;

use super::book::AddressBook;
use super::builder::{BootstrapFn, RedeemFn};
use super::service::VatRoot;
use super::tiebreak::DialFuture;
use super::NetworkConfig;

/// How long the end of a connection may take (the authenticated CLOSE).
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub(super) identity: Identity,
    pub(super) vat_id: VatId,
    pub(super) acceptor: Acceptor,
    pub(super) options: NetworkConfig,
    /// Connections open, in both directions (`max_connections`).
    pub(super) permits: Arc<Semaphore>,
    /// Incoming connections open: `max_connections` less the part reserved
    /// for dials. An incoming connection holds one of these and one of
    /// `permits`; a dial holds one of `permits` only.
    pub(super) inbound: Arc<Semaphore>,
    pub(super) advertised: Vec<Address>,
    pub(super) local: Option<SocketAddr>,
    pub(super) bootstrap: BootstrapFn,
    pub(super) on_redeem: Option<RedeemFn>,
    pub(super) state: RefCell<State>,
    /// Woken whenever a connection is installed or ends, or a dial ends.
    pub(super) changed: Notify,
    /// Our `Vat` objects, so that `provide` can refuse to hand one off.
    pub(super) roots: RefCell<CapabilityServerSet<VatRoot, vat::Client>>,
    pub(super) listener: RefCell<Option<JoinHandle<()>>>,
}

pub(super) struct State {
    pub(super) shut_down: bool,
    pub(super) peers: HashMap<VatId, PeerSlot>,
    /// Every open connection, live or not (undecided, lost, closing).
    pub(super) open: HashMap<u64, Rc<Conn>>,
    pub(super) book: AddressBook,
    pub(super) handoffs: HandoffTable<capnp::capability::Client>,
    pub(super) next_id: u64,
}

#[derive(Default)]
pub(super) struct PeerSlot {
    /// The pair's one connection, handed to callers.
    pub(super) live: Option<Rc<Conn>>,
    /// Our dial in progress to this vat, shared by every caller waiting for it.
    pub(super) dial: Option<DialFuture>,
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
    pub(super) id: u64,
    pub(super) info: PeerInfo,
    pub(super) we_initiated: bool,
    /// The peer's `Vat`.
    pub(super) root: vat::Client,
    /// The peer's application bootstrap (`root.bootstrap()`), asked once.
    pub(super) app: RefCell<Option<capnp::capability::Client>>,
    pub(super) status: Cell<Status>,
    pub(super) disconnector: RefCell<Option<Disconnector<Side>>>,
    pub(super) activity: Rc<Cell<u64>>,
}

impl Conn {
    pub(super) fn app(&self) -> capnp::capability::Client {
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

impl Inner {
    pub(super) fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.state.borrow().open.get(&id).cloned()
    }

    /// Sets up the `RpcSystem` of a new authenticated connection, with our
    /// `Vat` as its bootstrap, and runs it on the `LocalSet`.
    pub(super) fn establish(
        self: &Rc<Self>,
        stream: NoiseStream<TcpStream>,
        info: PeerInfo,
        we_initiated: bool,
        permit: ConnPermit,
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
    pub(super) fn install(&self, conn: &Rc<Conn>) {
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
    pub(super) fn close(&self, conn: &Conn) {
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
    pub(super) fn ended(&self, conn: &Conn, result: std::result::Result<(), capnp::Error>) {
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
}

/// What a connection holds while it is open: one of `max_connections`, and
/// for an incoming one, one of the places not reserved for dials.
pub(super) struct ConnPermit {
    _total: OwnedSemaphorePermit,
    _inbound: Option<OwnedSemaphorePermit>,
}

impl ConnPermit {
    /// The permit of a dial.
    pub(super) fn outgoing(total: OwnedSemaphorePermit) -> Self {
        ConnPermit {
            _total: total,
            _inbound: None,
        }
    }
}

impl Inner {
    /// Whether `vat` already has `max_unsettled_per_vat` incoming
    /// connections waiting for its `hello`.
    fn too_many_unsettled(&self, vat: &VatId) -> bool {
        let st = self.state.borrow();
        let unsettled = st
            .open
            .values()
            .filter(|c| {
                c.info.vat_id == *vat && !c.we_initiated && c.status.get() == Status::Candidate
            })
            .count();
        unsettled >= self.options.max_unsettled_per_vat.max(1)
    }
}

pub(super) async fn accept_loop(weak: Weak<Inner>, listener: TcpListener) {
    loop {
        let Some((inbound, total)) = weak
            .upgrade()
            .map(|i| (i.inbound.clone(), i.permits.clone()))
        else {
            return;
        };
        let Some((inbound, tcp, addr)) = rpc::accept_within(&inbound, &listener).await else {
            return;
        };
        let Ok(total) = total.acquire_owned().await else {
            return;
        };
        let permit = ConnPermit {
            _total: total,
            _inbound: Some(inbound),
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
            if info.vat_id > inner.vat_id && inner.too_many_unsettled(&info.vat_id) {
                debug!(
                    peer = %info.vat_id.fingerprint(),
                    %addr,
                    "closed: this vat already has connections waiting for its hello"
                );
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

pub(super) async fn watch_idle(inner: Weak<Inner>, conn: Weak<Conn>, idle: Duration) {
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
