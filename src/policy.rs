//! Trust policies: who may be on the other end of a connection.
//!
//! A [`PeerPolicy`] is consulted once per handshake, after the peer has
//! *proved* its VatId and before any application data flows: by the
//! initiator after message 2 (so a refused responder never learns the
//! initiator's identity, which is only sent in message 3), and by the
//! responder after message 3.
//!
//! Policies here: [`Pinned`] (exactly one VatId), [`AnyVat`] (any
//! authenticated vat; the application decides later), and any closure
//! `Fn(&VatId, &PeerContext) -> Result<(), Refusal>`.

use std::fmt;
use std::net::SocketAddr;

use crate::vat_id::VatId;

/// Why a policy refused a peer. The text reaches logs and the local error,
/// never the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl Refusal {
    /// A refusal with the given reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal(reason.into())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a policy knows about a connection besides the peer's VatId.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PeerContext {
    /// The remote socket address, when the transport has one.
    pub remote_addr: Option<SocketAddr>,
    /// The address the local side dialed, as the user wrote it ("host:port"),
    /// when the local side is the initiator. Trust-on-first-use keys on it.
    pub dialed: Option<String>,
    /// True when the local side is the initiator.
    pub local_is_initiator: bool,
}

impl PeerContext {
    /// A context for the initiator side that dialed `dialed`.
    pub fn initiator(dialed: Option<String>, remote_addr: Option<SocketAddr>) -> Self {
        PeerContext {
            remote_addr,
            dialed,
            local_is_initiator: true,
        }
    }

    /// A context for the responder side.
    pub fn responder(remote_addr: Option<SocketAddr>) -> Self {
        PeerContext {
            remote_addr,
            dialed: None,
            local_is_initiator: false,
        }
    }
}

/// Decides whether an authenticated peer may continue.
pub trait PeerPolicy: Send + Sync {
    /// Accepts or refuses `peer`.
    ///
    /// # Errors
    /// A [`Refusal`] with a reason for the local log and error.
    fn check(&self, peer: &VatId, ctx: &PeerContext) -> Result<(), Refusal>;
}

impl<F> PeerPolicy for F
where
    F: Fn(&VatId, &PeerContext) -> Result<(), Refusal> + Send + Sync,
{
    fn check(&self, peer: &VatId, ctx: &PeerContext) -> Result<(), Refusal> {
        self(peer, ctx)
    }
}

/// Accepts any vat that proves its identity. For peer-to-peer use where the
/// application looks at the VatId itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyVat;

impl PeerPolicy for AnyVat {
    fn check(&self, _: &VatId, _: &PeerContext) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Accepts exactly one VatId.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pinned(pub VatId);

impl PeerPolicy for Pinned {
    fn check(&self, peer: &VatId, _: &PeerContext) -> Result<(), Refusal> {
        if *peer == self.0 {
            Ok(())
        } else {
            Err(Refusal(format!(
                "expected {}, but the peer is {peer}",
                self.0
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    #[test]
    fn pinned_and_closures() {
        let a = Identity::generate().vat_id();
        let b = Identity::generate().vat_id();
        let ctx = PeerContext::default();
        assert!(Pinned(a).check(&a, &ctx).is_ok());
        let r = Pinned(a).check(&b, &ctx).unwrap_err();
        assert!(r.0.contains(&a.to_string()) && r.0.contains(&b.to_string()));
        let only_b = move |p: &VatId, _: &PeerContext| {
            if *p == b {
                Ok(())
            } else {
                Err(Refusal::new("not b"))
            }
        };
        assert!(only_b.check(&b, &ctx).is_ok());
        assert_eq!(only_b.check(&a, &ctx).unwrap_err().0, "not b");
        assert!(AnyVat.check(&a, &ctx).is_ok());
    }
}
