//! The crate's one error type.
//!
//! Every fallible operation in capnp-noise returns [`Error`]. Its variants say
//! *who* was at fault and what a caller can do about it. The first five are
//! the error classes of SPEC.md 8.2, which says which failure belongs to
//! which:
//!
//! * [`Error::Protocol`]: the peer sent bytes that break SPEC.md (a bad
//!   preamble, a length below the minimum, an unknown frame type, ...). The
//!   connection is unusable.
//! * [`Error::Decrypt`]: a handshake message or transport frame failed its
//!   authentication tag: the bytes were altered in flight, replayed, reordered,
//!   or encrypted under other keys (a man in the middle).
//! * [`Error::BadIdentityProof`]: the peer's handshake payload does not prove
//!   ownership of the VatId it claims.
//! * [`Error::PeerRefused`]: the peer authenticated correctly but the local
//!   trust policy does not accept its VatId.
//! * [`Error::UnexpectedEof`]: the byte stream ended without the peer's
//!   authenticated close: truncation, never a clean end.
//! * [`Error::Introduction`]: an introduction (three-party handoff) was
//!   malformed, forged, expired, replayed, presented by the wrong vat,
//!   revoked, or never requested; see [`IntroductionError`].
//! * The state of a [`Network`](crate::network::Network):
//!   [`Error::ShutDown`], [`Error::NoAddress`], [`Error::ConnectionLimit`],
//!   [`Error::NoAgreedConnection`] (crossed dials that did not settle), and
//!   [`Error::ClosedByPeer`] (a peer hung up at the first call, which is how
//!   a peer refusing this vat answers).
//! * The caller's side: [`Error::Config`] (an invalid setting),
//!   [`Error::Key`] (a key file, VatId, sturdy ref or policy file that
//!   cannot be used), [`Error::Misuse`] (an API called in a way it does not
//!   allow: a bug to fix, not a condition to handle).
//! * [`Error::Io`] and [`Error::Rpc`] wrap the underlying transport's and
//!   Cap'n Proto's errors (as [`source`](std::error::Error::source)).
//!   [`Error::Noise`] and [`Error::Internal`] are not expected in practice.
//!
//! `Error` converts into [`std::io::Error`] with the kind of
//! [`Error::io_kind`] (for `AsyncRead`/`AsyncWrite` users) and back without
//! nesting.
//!
//! Errors never contain secret material: not keys, not plaintext.

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::vat_id::VatId;

/// What went wrong in capnp-noise.
///
/// Errors of the sans-IO core are *sticky*: once a handshake or session has
/// failed, every later call on it returns a clone of the same error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer sent something that violates the wire protocol.
    #[error("protocol violation by the peer: {0}")]
    Protocol(#[from] ProtocolError),

    /// An AEAD tag did not verify: data was modified, replayed, reordered, or
    /// encrypted with keys other than this session's (for example by a man in
    /// the middle).
    #[error("authentication failed while decrypting {during}: the data was altered in transit or came from someone without this session's keys")]
    Decrypt {
        /// Which message failed ("handshake message 2", "a transport frame", ...).
        during: &'static str,
    },

    /// The peer's identity proof (the signature binding its VatId to its
    /// Noise static key) is malformed or does not verify.
    #[error("the peer's identity proof is invalid: {0}")]
    BadIdentityProof(&'static str),

    /// The peer proved its identity, but the local trust policy refused it.
    #[error("peer {vat_id} was refused: {reason}")]
    PeerRefused {
        /// The authenticated identity of the refused peer.
        vat_id: VatId,
        /// Why the policy refused it.
        reason: String,
    },

    /// The underlying byte stream ended before the protocol allowed it to:
    /// the connection was cut (or truncated by an attacker). Never a clean end.
    #[error("connection closed by the peer without an authenticated close, {during}: the stream may have been truncated")]
    UnexpectedEof {
        /// What was expected when the stream ended.
        during: &'static str,
    },

    /// The handshake did not complete within the configured time.
    #[error("the handshake did not complete within {0:?}")]
    HandshakeTimeout(std::time::Duration),

    /// The local side tried to send after it had closed its sending direction.
    #[error("the sending direction of this session is already closed")]
    SendAfterClose,

    /// The 64-bit nonce of one direction is used up. Unreachable in practice
    /// (2^64 frames); the session must be replaced by a new handshake.
    #[error("the session's nonce space is exhausted; reconnect")]
    NonceExhausted,

    /// A setting given to the library is invalid (no Noise suite, an
    /// unknown suite name, more advertised addresses than an introduction
    /// can carry, ...); not caused by the peer.
    #[error("configuration error: {0}")]
    Config(String),

    /// A key file, VatId text, sturdy ref, policy file or other local input
    /// could not be used. The text names the input and what is wrong with it.
    #[error("{0}")]
    Key(String),

    /// The library was called in a way or at a time it does not allow: a
    /// bug in the caller (`admit()` on a handshake not waiting for
    /// admission, a vat connecting to itself, forwarding an introduction one
    /// does not hold, ...). The text says which rule was broken.
    #[error("misuse of the capnp-noise API: {0}")]
    Misuse(&'static str),

    /// An I/O error of the underlying transport (adapters only).
    #[error("I/O error: {0}")]
    Io(#[source] Arc<io::Error>),

    /// A Cap'n Proto call made on the caller's behalf by this crate (such
    /// as restoring a sturdy ref, or an introduction's `provide` and
    /// `accept`) failed at the remote vat or on the way, a connection's
    /// `RpcSystem` ended with an error, or a message this crate builds could
    /// not be encoded. The capnp error is the
    /// [`source`](std::error::Error::source).
    #[error("Cap'n Proto {during} failed: {source}")]
    Rpc {
        /// What this crate was doing ("call Restorer.restore", "call
        /// Vat.provide", "connection", ...).
        during: &'static str,
        /// The error capnp-rpc reported.
        #[source]
        source: capnp::Error,
    },

    /// A [`Restorer`](crate::sturdy::Restorer) knows no object with the id
    /// presented: it is wrong, was revoked, or has the wrong size (the same
    /// error for all three).
    #[error("no object has this id (it is wrong or was revoked)")]
    UnknownObject,

    /// The [`Network`](crate::network::Network) has been shut down.
    #[error("the network has been shut down")]
    ShutDown,

    /// No address is known for the vat to connect to (add some with
    /// [`Network::add_addresses`](crate::network::Network::add_addresses)),
    /// or a sturdy ref names none.
    #[error("no address is known for {vat}")]
    NoAddress {
        /// The vat that could not be dialed.
        vat: VatId,
    },

    /// The network already has its maximum of connections open
    /// ([`NetworkConfig::max_connections`](crate::network::NetworkConfig::max_connections)),
    /// so no new one is dialed.
    #[error("the network already has {max} connections open")]
    ConnectionLimit {
        /// The limit in force.
        max: usize,
    },

    /// Two vats dialed each other at once and no connection was agreed on
    /// in time (SPEC.md §12.3): the peer kept its own connection, which
    /// did not arrive, or every dial lost the tie-break.
    #[error("no connection to {vat} could be agreed on: it kept its own connection, which did not arrive in time")]
    NoAgreedConnection {
        /// The peer.
        vat: VatId,
    },

    /// The peer closed a connection this vat had just opened, at its first
    /// call: a peer whose policy refuses this vat can only do that (Noise XX
    /// authenticates the initiator last).
    #[error("{vat} closed the connection (it may have refused this vat's identity): {source}")]
    ClosedByPeer {
        /// The peer.
        vat: VatId,
        /// The error the first call failed with.
        #[source]
        source: capnp::Error,
    },

    /// The Noise implementation (snow) failed on local state, not on the
    /// peer's bytes (those are [`Error::Decrypt`] or [`Error::Protocol`]).
    /// Not expected in practice. snow's error is the
    /// [`source`](std::error::Error::source).
    #[error("Noise error while {during}: {source}")]
    Noise {
        /// What was being done ("building the Noise state", "handshake message 2", ...).
        during: &'static str,
        /// snow's error.
        #[source]
        source: Arc<snow::Error>,
    },

    /// The catch-all for failures that should not happen: a cryptographic
    /// library refusing to encrypt, an internal invariant broken. Not caused
    /// by the peer or the caller; if you see one, please report it.
    #[error("internal error: {0}")]
    Internal(&'static str),

    /// An introduction (three-party handoff, `crate::intro`) was refused or failed.
    #[error("introduction refused: {0}")]
    Introduction(#[from] IntroductionError),
}

/// Why an introduction (`crate::intro`) was refused or failed.
///
/// The variants a provider reports to a redeeming vat say what is wrong with
/// the *request*; none reveals who the introduction was really for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntroductionError {
    /// The bytes are not a well-formed introduction (a missing field, a wrong
    /// key, nonce or signature length, a bad address, too many forwards, too long).
    #[error("malformed introduction: {0}")]
    Malformed(String),
    /// A signature (the introducer's, or a forwarding link's) does not verify:
    /// the introduction was altered or forged.
    #[error("{0} does not verify: the introduction was altered or forged")]
    BadSignature(&'static str),
    /// The introduction, or the provider's entry for it, has expired.
    #[error("the introduction has expired")]
    Expired,
    /// The authenticated vat presenting the introduction is not the vat it
    /// was made for (or, for a provider, the introducer named another recipient).
    #[error("the introduction was not made for this vat")]
    WrongRecipient,
    /// The introduction names another vat as the provider.
    #[error("the introduction is for another provider vat")]
    WrongProvider,
    /// The introduction was already redeemed (or is being redeemed right now),
    /// or the introducer reused a nonce: one use only.
    #[error("the introduction was already used")]
    Replayed,
    /// The introducer withdrew the handoff, or the provider revoked the capability.
    #[error("the introduced capability was revoked")]
    Revoked,
    /// The introducer's request to set the capability aside did not reach the
    /// provider before the deadline: it was never sent, it expired, or the
    /// provider restarted and lost it.
    #[error("the introducer's request did not reach the provider in time (never sent, expired, or lost when the provider restarted)")]
    Timeout,
    /// The provider no longer knows the pending handoff (its table was dropped:
    /// the provider is shutting down or restarted).
    #[error("the provider no longer knows this handoff (it shut down or restarted)")]
    Unknown,
    /// A configured bound was reached (entries, waiters, lifetime, forwards).
    #[error("limit reached: {0}")]
    Limit(String),
    /// The provider was asked to set aside a capability that it does not
    /// host itself (one it imports from another vat, or its network service):
    /// it would become a relay, so it refuses.
    #[error(
        "the capability is not hosted by the provider vat itself, so it cannot be introduced there"
    )]
    NotHosted,
    /// The provider hands off no capability without a hook that builds what
    /// each redeemer gets (`NetworkBuilder::on_redeem`): an object bound to
    /// the vat that introduced it would otherwise answer the redeemer as
    /// that vat. On the wire this is `notHosted`.
    #[error(
        "the provider hands off no capability: it has no on_redeem hook to build each redeemer its own"
    )]
    NotIntroducible,
}

/// The ways a peer's bytes can violate the wire protocol: the class
/// "protocol violation" of SPEC.md 8.2, one variant per failure listed there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first bytes are not the capnp-noise preamble magic.
    #[error("the connection does not start with the capnp-noise preamble (wrong protocol?)")]
    BadMagic,
    /// The preamble names a protocol version this implementation does not speak.
    #[error("unsupported protocol version {0} (this implementation speaks version 1)")]
    UnsupportedVersion(u8),
    /// The preamble names a Noise protocol this side does not accept.
    #[error("the initiator chose Noise protocol {0:?}, which this responder does not accept")]
    UnsupportedSuite(String),
    /// The preamble's protocol-name length is zero or too long, or the name is not ASCII.
    #[error("malformed preamble: {0}")]
    BadPreamble(&'static str),
    /// A frame length is below the minimum for its place in the protocol.
    #[error("frame of {len} bytes is too short for {what} (minimum {min})")]
    FrameTooShort {
        /// The length announced by the prefix.
        len: usize,
        /// The smallest acceptable length here.
        min: usize,
        /// Which message was expected.
        what: &'static str,
    },
    /// A frame length is above the maximum for its place in the protocol.
    #[error("frame of {len} bytes is too long for {what} (maximum {max})")]
    FrameTooLong {
        /// The length announced by the prefix.
        len: usize,
        /// The largest acceptable length here.
        max: usize,
        /// Which message was expected.
        what: &'static str,
    },
    /// A handshake payload could not be decoded (SPEC.md 5.3): not one
    /// Cap'n Proto message within the limits, a missing field, a wrong
    /// length, or a VatId that is not one (SPEC.md 5.2.1: not a point,
    /// non-canonical, small-order). Decoding comes before the signature
    /// check, so such a payload is never an invalid identity proof.
    #[error("malformed handshake payload: {0}")]
    BadPayload(String),
    /// A Diffie-Hellman with one of the peer's X25519 keys in a handshake
    /// message gave all zeros: the key is a low-order point (SPEC.md 6).
    #[error("the peer's X25519 key in {0} is a low-order point (its Diffie-Hellman result is all zeros)")]
    LowOrderKey(&'static str),
    /// A decrypted transport frame has a type byte this version does not define.
    #[error("unknown transport frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A CLOSE or REKEY frame carried a body.
    #[error("a {0} frame must have an empty body")]
    NonEmptyControlFrame(&'static str),
    /// The responder's answer to an `IK` message 1 starts with a kind byte
    /// other than `0x00` (`IK` message 2) or `0x01` (the `XX` fallback),
    /// SPEC.md 14.
    #[error("the answer to IK handshake message 1 has unknown kind 0x{0:02x}")]
    UnknownReplyKind(u8),
}

impl Error {
    /// Maps a snow error met while processing peer bytes.
    pub(crate) fn from_snow(e: snow::Error, during: &'static str) -> Self {
        match e {
            snow::Error::Decrypt => Error::Decrypt { during },
            snow::Error::State(snow::error::StateProblem::Exhausted) => Error::NonceExhausted,
            snow::Error::Dh => Error::Protocol(ProtocolError::LowOrderKey(during)),
            other => Error::Noise {
                during,
                source: Arc::new(other),
            },
        }
    }

    /// The `io::ErrorKind` that best describes this error.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::UnexpectedEof { .. } => io::ErrorKind::UnexpectedEof,
            Error::HandshakeTimeout(_) => io::ErrorKind::TimedOut,
            Error::PeerRefused { .. } | Error::BadIdentityProof(_) => {
                io::ErrorKind::PermissionDenied
            }
            Error::SendAfterClose => io::ErrorKind::BrokenPipe,
            Error::Config(_) | Error::Key(_) | Error::Misuse(_) => io::ErrorKind::InvalidInput,
            Error::Io(e) => e.kind(),
            Error::Rpc { source, .. } => match source.kind {
                capnp::ErrorKind::Disconnected => io::ErrorKind::ConnectionAborted,
                capnp::ErrorKind::Overloaded => io::ErrorKind::ResourceBusy,
                capnp::ErrorKind::Unimplemented => io::ErrorKind::Unsupported,
                _ => io::ErrorKind::Other,
            },
            Error::UnknownObject | Error::NoAddress { .. } => io::ErrorKind::NotFound,
            Error::ShutDown => io::ErrorKind::NotConnected,
            Error::ConnectionLimit { .. } => io::ErrorKind::ResourceBusy,
            Error::NoAgreedConnection { .. } => io::ErrorKind::TimedOut,
            Error::ClosedByPeer { .. } => io::ErrorKind::ConnectionAborted,
            Error::Noise { .. } | Error::Internal(_) => io::ErrorKind::Other,
            Error::Protocol(_) | Error::Decrypt { .. } | Error::NonceExhausted => {
                io::ErrorKind::InvalidData
            }
            Error::Introduction(e) => match e {
                IntroductionError::Malformed(_) => io::ErrorKind::InvalidData,
                IntroductionError::Timeout => io::ErrorKind::TimedOut,
                IntroductionError::Unknown => io::ErrorKind::NotFound,
                IntroductionError::Limit(_) => io::ErrorKind::ResourceBusy,
                _ => io::ErrorKind::PermissionDenied,
            },
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        // An io::Error that wraps one of ours is unwrapped, so it is not nested.
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let kind = e.kind();
            match e.into_inner().map(|b| b.downcast::<Error>()) {
                Some(Ok(ours)) => return *ours,
                Some(Err(other)) => return Error::Io(Arc::new(io::Error::new(kind, other))),
                None => return Error::Io(Arc::new(io::Error::from(kind))),
            }
        }
        Error::Io(Arc::new(e))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(inner) => match Arc::try_unwrap(inner) {
                Ok(io) => io,
                Err(shared) => io::Error::new(shared.kind(), SharedIo(shared)),
            },
            other => io::Error::new(other.io_kind(), other),
        }
    }
}

/// An `io::Error` that several owners share (sticky errors are cloned).
#[derive(Debug)]
struct SharedIo(Arc<io::Error>);

impl fmt::Display for SharedIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedIo {}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn snow_and_capnp_errors_stay_sources() {
        let e = Error::from_snow(snow::Error::Input, "building the Noise state");
        assert!(matches!(e, Error::Noise { during, .. } if during == "building the Noise state"));
        let source = e.source().expect("snow's error is the source");
        assert!(
            source.downcast_ref::<Arc<snow::Error>>().is_some(),
            "{source:?}"
        );

        let e = Error::Rpc {
            during: "call Vat.provide",
            source: capnp::Error::disconnected("gone".into()),
        };
        let source = e.source().expect("capnp's error is the source");
        let capnp = source
            .downcast_ref::<capnp::Error>()
            .expect("a capnp::Error");
        assert_eq!(capnp.kind, capnp::ErrorKind::Disconnected);
        assert_eq!(e.io_kind(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn network_states_have_io_kinds_and_survive_a_round_trip_through_io() {
        let vat = crate::identity::Identity::generate().vat_id();
        let cases = [
            (Error::NoAddress { vat }, io::ErrorKind::NotFound),
            (Error::NoAgreedConnection { vat }, io::ErrorKind::TimedOut),
            (Error::ShutDown, io::ErrorKind::NotConnected),
            (
                Error::ConnectionLimit { max: 3 },
                io::ErrorKind::ResourceBusy,
            ),
            (Error::Misuse("a rule"), io::ErrorKind::InvalidInput),
            (Error::UnknownObject, io::ErrorKind::NotFound),
            (Error::Internal("an invariant"), io::ErrorKind::Other),
        ];
        for (e, kind) in cases {
            let text = e.to_string();
            let io = io::Error::from(e);
            assert_eq!(io.kind(), kind, "{text}");
            let back = Error::from(io);
            assert_eq!(back.to_string(), text, "not nested");
        }
    }
}
