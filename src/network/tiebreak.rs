//! One connection per pair of vats: dialing a peer, and the crossed-dial
//! tie-break of SPEC.md §12.3 (the pair keeps the connection initiated by
//! the vat with the lower VatId; see the [module docs](super)).

use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{FutureExt, LocalBoxFuture, Shared};
use tracing::debug;

use crate::error::{Error, Result};
use crate::policy::Pinned;
use crate::rpc::{self};
use crate::sturdy::{Address, MAX_ADDRESSES};
use crate::vat_id::VatId;

use super::connections::{Conn, ConnPermit, Inner, Status};

/// How long the lower vat keeps a connection that lost the tie-break, in case
/// the higher vat does not close it after being told.
const LOSER_GRACE: Duration = Duration::from_secs(5);
/// Dials one [`Network::connect`] starts at most before giving up.
const MAX_DIALS_PER_CONNECT: usize = 2;
/// The reason `Vat.hello` fails with on a connection that lost the tie-break.
/// How the reason of a crossed dial begins (SPEC.md §12.3).
const CROSSED_PREFIX: &str = "crossed dial:";
pub(crate) const CROSSED: &str =
    "crossed dial: the vat with the lower VatId keeps the connection it initiated";

/// Whether `e`, the failure of `Vat.hello`, says that the connection lost
/// the tie-break: SPEC.md §12.3 gives the reason as "crossed dial: ...",
/// which capnp-rpc prefixes with "remote exception: ".
fn is_crossed(e: &capnp::Error) -> bool {
    let reason = e
        .extra
        .strip_prefix("remote exception: ")
        .unwrap_or(&e.extra);
    e.kind == capnp::ErrorKind::Failed && reason.starts_with(CROSSED_PREFIX)
}

pub(super) type DialFuture = Shared<LocalBoxFuture<'static, Result<Dialed>>>;

#[derive(Clone, Copy, Debug)]
pub(super) enum Dialed {
    /// Our connection became the pair's connection.
    Installed,
    /// The peer (the lower VatId) keeps the connection it initiated.
    Crossed,
}

impl Inner {
    /// The pair's connection to `vat`, opening it if needed.
    pub(super) async fn live(self: &Rc<Self>, vat: &VatId) -> Result<Rc<Conn>> {
        self.live_via(vat, &[]).await
    }

    /// The pair's connection to `vat`, opening it if needed at the
    /// addresses known for it and then at `hints` (an introduction's
    /// addresses, used for this connection only: one that works is kept).
    pub(super) async fn live_via(
        self: &Rc<Self>,
        vat: &VatId,
        hints: &[Address],
    ) -> Result<Rc<Conn>> {
        if *vat == self.vat_id {
            return Err(Error::Misuse(
                "a vat does not connect to itself: use its capabilities directly",
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
                    return Err(Error::ShutDown);
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
                        return Err(last_error.unwrap_or(Error::NoAgreedConnection { vat: *vat }));
                    }
                    None => {
                        dials += 1;
                        let dial = dial(self.clone(), *vat, hints.to_vec())
                            .boxed_local()
                            .shared();
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
                        last_error = Some(Error::NoAgreedConnection { vat: *vat });
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
async fn dial(inner: Rc<Inner>, vat: VatId, hints: Vec<Address>) -> Result<Dialed> {
    let result = dial_addresses(&inner, vat, &hints).await;
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

async fn dial_addresses(inner: &Rc<Inner>, vat: VatId, hints: &[Address]) -> Result<Dialed> {
    let mut addresses = inner.state.borrow_mut().book.get(&vat);
    for hint in hints.iter().take(MAX_ADDRESSES) {
        if !addresses.contains(hint) {
            addresses.push(hint.clone());
        }
    }
    if addresses.is_empty() {
        return Err(Error::NoAddress { vat });
    }
    let permit = inner
        .permits
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::ConnectionLimit {
            max: inner.options.max_connections,
        })?;
    let mut last = None;
    for address in addresses {
        let dialed = rpc::dial(
            address.to_string(),
            &inner.identity,
            Arc::new(Pinned(vat)),
            inner.options.handshake.clone(),
            inner.options.connect_timeout,
            None, // no resumption in the network: see its module docs
            inner.options.keepalive,
        )
        .await;
        match dialed {
            Ok((stream, info)) => {
                if inner.state.borrow().shut_down {
                    return Err(Error::ShutDown);
                }
                // Pinned to `vat`: the address is proven to lead there.
                inner.state.borrow_mut().book.confirm(vat, &address);
                let conn = inner.establish(stream, info, true, ConnPermit::outgoing(permit));
                return settle_outgoing(inner, conn).await;
            }
            Err(e) => {
                debug!(peer = %vat.fingerprint(), %address, error = %e, "dial failed");
                inner.state.borrow_mut().book.failed(&vat, &address);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(Error::NoAddress { vat }))
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
        Ok(Err(e)) if is_crossed(&e) => {
            debug!(peer = %conn.info.vat_id.fingerprint(), "crossed dial: using the peer's connection");
            inner.close(&conn);
            Ok(Dialed::Crossed)
        }
        Ok(Err(e)) => {
            inner.close(&conn);
            Err(Error::ClosedByPeer {
                vat: conn.info.vat_id,
                source: e,
            })
        }
        Err(_) => {
            inner.close(&conn);
            Err(Error::HandshakeTimeout(inner.options.connect_timeout))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_tie_break_is_recognised_by_its_reason_not_by_any_text() {
        // As capnp-rpc delivers the `hello` refusal of SPEC.md §12.3.
        let remote = |kind, reason: &str| capnp::Error {
            kind,
            extra: format!("remote exception: {reason}"),
        };
        assert!(is_crossed(&remote(capnp::ErrorKind::Failed, CROSSED)));
        assert!(is_crossed(&capnp::Error::failed(CROSSED.into())));
        assert!(is_crossed(&remote(
            capnp::ErrorKind::Failed,
            "crossed dial: another implementation's words"
        )));
        // A refusal that merely quotes the reason, or another kind, is not one.
        let quoting = format!("this connection is not the vats' connection: {CROSSED}");
        assert!(!is_crossed(&remote(capnp::ErrorKind::Failed, &quoting)));
        assert!(!is_crossed(&remote(
            capnp::ErrorKind::Disconnected,
            CROSSED
        )));
    }
}
