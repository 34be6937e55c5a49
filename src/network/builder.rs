//! [`NetworkBuilder`]: from an [`Identity`] and settings to a running
//! [`Network`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use capnp::capability::FromClientHook;
use capnp_rpc::CapabilityServerSet;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tracing::info;

use crate::admission::UnauthenticatedLimit;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::intro::HandoffTable;
use crate::policy::PeerPolicy;
use crate::rpc::{Acceptor, PeerInfo};
use crate::sturdy::MAX_ADDRESSES;

use super::book::AddressBook;
use super::Redeemed;

use super::connections::{accept_loop, Inner, State};
use super::{Network, NetworkConfig};

pub(super) type BootstrapFn = Box<dyn Fn(&PeerInfo) -> capnp::capability::Client>;
pub(super) type RedeemFn =
    Box<dyn Fn(&Redeemed, capnp::capability::Client) -> capnp::capability::Client>;

/// Builds a [`Network`]: see [`Network::builder`].
#[must_use = "call start() to run the network"]
pub struct NetworkBuilder {
    pub(super) identity: Identity,
    pub(super) listen: Option<SocketAddr>,
    pub(super) policy: Arc<dyn PeerPolicy>,
    pub(super) options: NetworkConfig,
    pub(super) bootstrap: Option<BootstrapFn>,
    pub(super) on_redeem: Option<RedeemFn>,
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

    /// Who may connect to this vat (default [`AnyVat`](crate::policy::AnyVat)). Outgoing
    /// connections are always pinned to the VatId dialed.
    pub fn policy(mut self, policy: Arc<dyn PeerPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the [`NetworkConfig`].
    pub fn config(mut self, config: NetworkConfig) -> Self {
        self.options = config;
        self
    }

    /// The application's bootstrap capability for each peer, built once per
    /// connection from the peer's authenticated [`PeerInfo`] (when the peer
    /// first asks for it). Without it, peers get a broken capability.
    ///
    /// Capturing `peer.vat_id` in the object is how it knows who calls; such
    /// an object speaks for that peer, and must not reach anyone else as it
    /// is: introductions of it are refused unless
    /// [`on_redeem`](Self::on_redeem) builds each redeemer its own.
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
    /// redeemer of an introduction: returns what the redeemer gets, given
    /// the capability the introducer set aside. capnp-rpc tells a server
    /// nothing about who calls; this is where a provider learns the
    /// redeemer's authenticated VatId, to give it an object of its own
    /// (find the introduced object with a [`CapabilityServerSet`]).
    ///
    /// **Without this hook a provider hands off nothing**: `provide` is
    /// refused ([`IntroductionError::NotIntroducible`](crate::IntroductionError::NotIntroducible),
    /// `notHosted` on the wire). An object made for one peer, such as the
    /// per-peer bootstrap that captures the caller's VatId (see
    /// [`bootstrap`](Self::bootstrap)), would otherwise reach the redeemer
    /// as it is and answer it as the introducer, even after the introducer
    /// is gone. The hook must therefore build the redeemer's own object for
    /// every object that depends on who calls, and may return the
    /// capability as it is only for objects that do not (see
    /// [`hand_off_as_is`](Self::hand_off_as_is)).
    pub fn on_redeem<F>(mut self, hook: F) -> Self
    where
        F: Fn(&Redeemed, capnp::capability::Client) -> capnp::capability::Client + 'static,
    {
        self.on_redeem = Some(Box::new(hook));
        self
    }

    /// Hands every introduced capability to its redeemer as it is: the
    /// [`on_redeem`](Self::on_redeem) hook that returns its argument. Only
    /// for a vat none of whose objects depends on who calls it: an object
    /// bound to its caller (the per-peer bootstrap that captures the peer's
    /// VatId, anything made from it) would answer the redeemer as the vat
    /// that introduced it.
    pub fn hand_off_as_is(self) -> Self {
        self.on_redeem(|_, cap| cap)
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
                first_message_timeout: options.first_message_timeout,
                unauthenticated: UnauthenticatedLimit::new(options.max_unauthenticated_per_source),
                // No IK in the network (see its module docs): a resuming
                // initiator gets the XX fallback.
                resumption: crate::wire::ResumptionConfig::default(),
                keepalive: options.keepalive,
            },
            identity: self.identity,
            permits: Arc::new(Semaphore::new(options.max_connections.max(1))),
            inbound: Arc::new(Semaphore::new(
                options
                    .max_connections
                    .saturating_sub(options.reserved_for_dials.min(options.max_connections / 4))
                    .max(1),
            )),
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
