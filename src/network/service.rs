//! `Vat`: the network service at each end of every connection, and the
//! mapping between [`IntroductionError`] and the wire's `HandoffError`.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::{Duration, SystemTime};

use capnp::capability::FromClientHook;

use super::{Conn, Inner, Redeemed, Status, CROSSED};
use crate::error::{Error, IntroductionError, Result};
use crate::intro::{Introduction, Redeem, ThirdPartyToAwait, NONCE_LEN};
use crate::rpc::PeerInfo;
use crate::schema::network_capnp::{vat, HandoffError};
use crate::sturdy::write_addresses;

/// Our `Vat` on one connection, bound to the peer's authenticated VatId.
pub(crate) struct VatRoot {
    net: Weak<Inner>,
    peer: PeerInfo,
    conn_id: u64,
    /// The application's bootstrap for this peer, built on first request.
    app: RefCell<Option<capnp::capability::Client>>,
}

impl VatRoot {
    pub(crate) fn new(net: Weak<Inner>, peer: PeerInfo, conn_id: u64) -> Self {
        VatRoot {
            net,
            peer,
            conn_id,
            app: RefCell::new(None),
        }
    }

    fn net(&self) -> Result<Rc<Inner>, capnp::Error> {
        self.net
            .upgrade()
            .ok_or_else(|| capnp::Error::disconnected("the network has shut down".into()))
    }

    fn conn(&self, net: &Inner) -> Result<Rc<Conn>, capnp::Error> {
        net.conn(self.conn_id)
            .ok_or_else(|| capnp::Error::disconnected("the connection has ended".into()))
    }

    /// The network, if this connection is the pair's connection: no call but
    /// `hello` is served on any other.
    fn live(&self) -> Result<Rc<Inner>, capnp::Error> {
        let net = self.net()?;
        if self.conn(&net)?.status.get() != Status::Live {
            return Err(capnp::Error::failed(format!(
                "this connection is not the vats' connection: {CROSSED}"
            )));
        }
        Ok(net)
    }
}

/// The wire code of an introduction refusal.
fn code(e: &Error) -> HandoffError {
    match e {
        Error::Introduction(e) => match e {
            IntroductionError::Malformed(_) => HandoffError::Malformed,
            IntroductionError::BadSignature(_) => HandoffError::BadSignature,
            IntroductionError::Expired => HandoffError::Expired,
            IntroductionError::WrongRecipient => HandoffError::WrongRecipient,
            IntroductionError::WrongProvider => HandoffError::WrongProvider,
            IntroductionError::Replayed => HandoffError::Replayed,
            IntroductionError::Revoked => HandoffError::Revoked,
            IntroductionError::Timeout => HandoffError::Timeout,
            IntroductionError::Unknown => HandoffError::Unknown,
            IntroductionError::Limit(_) => HandoffError::Limit,
            IntroductionError::NotHosted | IntroductionError::NotIntroducible => {
                HandoffError::NotHosted
            }
        },
        Error::Config(_) | Error::Key(_) | Error::Misuse(_) => HandoffError::Malformed,
        _ => HandoffError::Unknown,
    }
}

/// The most characters of a peer's `reason` kept (before escaping).
pub(crate) const MAX_REASON_CHARS: usize = 200;

/// A peer's free text, made safe to log and display: at most
/// [`MAX_REASON_CHARS`] characters (a longer text ends in "..."), with
/// control characters (newlines, terminal escapes) and Unicode direction
/// overrides escaped, so that it cannot forge log lines or reorder what a
/// reader sees.
pub(crate) fn printable(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    for c in chars.by_ref().take(MAX_REASON_CHARS) {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if chars.next().is_some() {
        out.push_str("...");
    }
    out
}

/// The `reason` sent with a refusal's code: the refusal's own words, without
/// the "introduction refused: limit reached: " that the code already says
/// and that the receiver's [`check`] puts back in front.
fn reason(e: &Error) -> String {
    match e {
        Error::Introduction(IntroductionError::Malformed(why) | IntroductionError::Limit(why)) => {
            why.clone()
        }
        Error::Introduction(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// The local error for the provider's answer `error` with its `reason`
/// (the peer's text, made [`printable`]).
///
/// # Errors
/// The refusal, if `error` is not `none`.
pub(crate) fn check(
    error: std::result::Result<HandoffError, capnp::NotInSchema>,
    reason: capnp::Result<capnp::text::Reader<'_>>,
) -> Result<()> {
    let reason = match reason {
        Ok(r) => printable(r.to_str().unwrap_or("<not UTF-8>")),
        Err(_) => String::new(),
    };
    let e = match error {
        Ok(HandoffError::None) => return Ok(()),
        Ok(HandoffError::Malformed) => IntroductionError::Malformed(reason),
        Ok(HandoffError::BadSignature) => {
            IntroductionError::BadSignature(if reason.contains("forwarding") {
                "a forwarding link's signature"
            } else {
                "the introducer's signature"
            })
        }
        Ok(HandoffError::Expired) => IntroductionError::Expired,
        Ok(HandoffError::WrongRecipient) => IntroductionError::WrongRecipient,
        Ok(HandoffError::WrongProvider) => IntroductionError::WrongProvider,
        Ok(HandoffError::Replayed) => IntroductionError::Replayed,
        Ok(HandoffError::Revoked) => IntroductionError::Revoked,
        Ok(HandoffError::Timeout) => IntroductionError::Timeout,
        Ok(HandoffError::Unknown) => IntroductionError::Unknown,
        Ok(HandoffError::Limit) => IntroductionError::Limit(reason),
        Ok(HandoffError::NotHosted) => IntroductionError::NotHosted,
        Err(capnp::NotInSchema(n)) => {
            IntroductionError::Malformed(format!("unknown handoff error code {n}: {reason}"))
        }
    };
    Err(Error::Introduction(e))
}

/// Whether `cap` (fully resolved) is hosted by this vat itself and may be
/// handed off: not a capability imported over any connection (capnp-rpc
/// gives those the connection's non-zero brand: "If this capability is
/// associated with an rpc connection, then this method returns an
/// identifier for that connection"), not an unresolved promise, and not one
/// of our `Vat` objects (which speak for a connection's peer).
fn hosted(net: &Inner, cap: &capnp::capability::Client) -> bool {
    let hook = &cap.hook;
    if hook.get_brand() != 0 || hook.when_more_resolved().is_some() {
        return false;
    }
    let as_root = vat::Client::new(hook.add_ref());
    net.roots
        .borrow()
        .get_local_server_of_resolved(&as_root)
        .is_none()
}

impl vat::Server for VatRoot {
    async fn hello(
        self: Rc<Self>,
        _: vat::HelloParams,
        _: vat::HelloResults,
    ) -> Result<(), capnp::Error> {
        let net = self.net()?;
        let conn = self.conn(&net)?;
        net.decide(&conn).await
    }

    async fn bootstrap(
        self: Rc<Self>,
        _: vat::BootstrapParams,
        mut results: vat::BootstrapResults,
    ) -> Result<(), capnp::Error> {
        let net = self.live()?;
        let app = self
            .app
            .borrow_mut()
            .get_or_insert_with(|| (net.bootstrap)(&self.peer))
            .clone();
        results.get().init_cap().set_as_capability(app.hook);
        Ok(())
    }

    async fn provide(
        self: Rc<Self>,
        params: vat::ProvideParams,
        mut results: vat::ProvideResults,
    ) -> Result<(), capnp::Error> {
        let net = self.live()?;
        let params = params.get()?;
        let outcome = async {
            let request = params
                .get_await()
                .map_err(|e| IntroductionError::Malformed(format!("await: {e}")).into())
                .and_then(ThirdPartyToAwait::read_from)?;
            let cap: capnp::capability::Client = params
                .get_cap()
                .get_as_capability()
                .map_err(|_| IntroductionError::NotHosted)?;
            // A promise must settle first; bounded, like every wait here.
            let resolved = tokio::time::timeout(
                net.options.connect_timeout,
                capnp::capability::get_resolved_cap(cap),
            )
            .await
            .map_err(|_| IntroductionError::NotHosted)?;
            if !hosted(&net, &resolved) {
                return Err(IntroductionError::NotHosted.into());
            }
            // Objects are commonly bound to the peer they were made for (the
            // per-peer bootstrap captures its VatId): handed to a redeemer as
            // they are, they would answer it as the introducer. Only a
            // provider whose application builds each redeemer's object hands
            // anything off.
            if net.on_redeem.is_none() {
                return Err(IntroductionError::NotIntroducible.into());
            }
            let now = SystemTime::now();
            let mut st = net.state.borrow_mut();
            st.handoffs.expire(now);
            st.handoffs
                .expect(&self.peer.vat_id, &request, resolved, now)
        }
        .await;
        let mut r = results.get();
        match outcome {
            Ok(()) => {
                write_addresses(
                    r.init_addresses(net.advertised.len() as u32),
                    &net.advertised,
                );
            }
            Err(e) => {
                tracing::info!(introducer = %self.peer.vat_id.fingerprint(), error = %e, "provide refused");
                r.set_error(code(&e));
                r.set_reason(reason(&e));
            }
        }
        Ok(())
    }

    async fn accept(
        self: Rc<Self>,
        params: vat::AcceptParams,
        mut results: vat::AcceptResults,
    ) -> Result<(), capnp::Error> {
        let net = self.live()?;
        let params = params.get()?;
        let redeemer = self.peer.vat_id;
        let outcome: Result<(Introduction, capnp::capability::Client)> = async {
            let contact = params
                .get_completion()
                .and_then(|c| c.get_contact())
                .map_err(|e| IntroductionError::Malformed(format!("completion: {e}")))?;
            let introduction = Introduction::read_from(contact)?;
            let now = SystemTime::now();
            let redeemed = {
                let mut st = net.state.borrow_mut();
                st.handoffs.expire(now);
                st.handoffs.redeem(&redeemer, &introduction, now)?
            };
            let cap = match redeemed {
                Redeem::Ready(cap) => cap,
                Redeem::Pending(mut pending) => {
                    let wait = pending
                        .deadline()
                        .duration_since(now)
                        .unwrap_or(Duration::ZERO);
                    match tokio::time::timeout(wait, &mut pending).await {
                        Ok(outcome) => outcome?,
                        Err(_) => {
                            net.state.borrow_mut().handoffs.expire(SystemTime::now());
                            pending
                                .try_take()
                                .unwrap_or(Err(IntroductionError::Timeout.into()))?
                        }
                    }
                }
            };
            Ok((introduction, cap))
        }
        .await;
        let mut r = results.get();
        match outcome {
            Ok((introduction, cap)) => {
                let cap = match &net.on_redeem {
                    Some(hook) => hook(
                        &Redeemed {
                            introducer: *introduction.introducer(),
                            redeemer,
                            nonce: *introduction.nonce(),
                        },
                        cap,
                    ),
                    None => cap,
                };
                tracing::info!(
                    introducer = %introduction.introducer().fingerprint(),
                    redeemer = %redeemer.fingerprint(),
                    "introduction redeemed"
                );
                r.init_cap().set_as_capability(cap.hook);
            }
            Err(e) => {
                tracing::info!(redeemer = %redeemer.fingerprint(), error = %e, "redeem refused");
                r.set_error(code(&e));
                r.set_reason(reason(&e));
            }
        }
        Ok(())
    }

    async fn withdraw(
        self: Rc<Self>,
        params: vat::WithdrawParams,
        _: vat::WithdrawResults,
    ) -> Result<(), capnp::Error> {
        let net = self.live()?;
        let nonce: [u8; NONCE_LEN] = params
            .get()?
            .get_nonce()?
            .try_into()
            .map_err(|_| capnp::Error::failed(format!("a nonce has {NONCE_LEN} bytes")))?;
        let _ =
            net.state
                .borrow_mut()
                .handoffs
                .revoke(&self.peer.vat_id, &nonce, SystemTime::now());
        Ok(())
    }
}
