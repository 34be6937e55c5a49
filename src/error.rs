//! The crate's one error type.
//!
//! Every fallible operation in capnp-noise returns [`Error`]. Its variants say
//! *who* was at fault and what a caller can do about it:
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

    /// A configuration or local-key problem; not caused by the peer.
    #[error("configuration error: {0}")]
    Config(String),

    /// A key file, VatId text, sturdy ref or other local input could not be used.
    #[error("{0}")]
    Key(String),

    /// An I/O error of the underlying transport (adapters only).
    #[error("I/O error: {0}")]
    Io(#[source] Arc<io::Error>),
}

/// The ways a peer's bytes can violate the wire protocol (SPEC.md).
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
    /// A handshake payload could not be decoded.
    #[error("malformed handshake payload: {0}")]
    BadPayload(String),
    /// A decrypted transport frame has a type byte this version does not define.
    #[error("unknown transport frame type 0x{0:02x}")]
    UnknownFrameType(u8),
    /// A CLOSE or REKEY frame carried a body.
    #[error("a {0} frame must have an empty body")]
    NonEmptyControlFrame(&'static str),
    /// Bytes arrived after the peer's authenticated close.
    #[error("data arrived after the peer's authenticated close")]
    DataAfterClose,
}

impl Error {
    /// Maps a snow error met while processing peer bytes.
    pub(crate) fn from_snow(e: snow::Error, during: &'static str) -> Self {
        match e {
            snow::Error::Decrypt => Error::Decrypt { during },
            snow::Error::State(snow::error::StateProblem::Exhausted) => Error::NonceExhausted,
            snow::Error::Dh => Error::Protocol(ProtocolError::BadPayload(format!(
                "Diffie-Hellman with the peer's key failed in {during}"
            ))),
            other => Error::Config(format!("Noise error in {during}: {other}")),
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
            Error::Config(_) | Error::Key(_) => io::ErrorKind::InvalidInput,
            Error::Io(e) => e.kind(),
            Error::Protocol(_) | Error::Decrypt { .. } | Error::NonceExhausted => {
                io::ErrorKind::InvalidData
            }
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
