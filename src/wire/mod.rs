//! The sans-IO core: the wire protocol of SPEC.md as state machines that take
//! bytes and return bytes.
//!
//! Nothing in this module touches a socket, a clock or a thread. The tokio
//! adapters ([`crate::stream`]) and the fuzz targets drive the same code.
//!
//! * [`frame`]: the 16-bit big-endian length prefix shared by every message.
//! * [`preamble`]: the initiator's cleartext preamble and suite negotiation.
//! * [`payload`]: the Cap'n Proto handshake payload and the identity binding.
//! * [`handshake`]: the Noise XX initiator and responder ([`Handshake`]).
//! * [`resumption`]: Noise Pipes, `IK` with an `XX` fallback, for an
//!   initiator that knows the responder ([`ResumptionCache`]).
//! * [`transport`]: the established session ([`Session`]): DATA, CLOSE and
//!   REKEY frames.
//!
//! A [`Handshake`] turns into a [`Session`] by consuming itself
//! ([`Handshake::into_session`]); a session never goes back.

pub(crate) mod cipherstate;
pub mod frame;
pub mod handshake;
pub mod payload;
pub mod preamble;
pub(crate) mod resolver;
pub mod resumption;
pub mod transport;

pub use handshake::{Handshake, HandshakeConfig, Role, EOF_BEFORE_MESSAGE_2};
pub use preamble::{Pattern, Suite};
pub use resumption::{
    EarlyData, EarlyDataChoice, EarlyDataOutcome, KnownResponder, ResumptionCache, ResumptionConfig,
};
pub use transport::{ReadOutcome, Session, SessionConfig, BULK_FRAMES, DIRECT_WRITE};

/// Length of the big-endian length prefix before every message.
pub const LENGTH_PREFIX_LEN: usize = 2;
/// The largest Noise message (and so the largest frame body): 65535 bytes.
pub const MAX_MESSAGE_LEN: usize = 65535;
/// Length of an AEAD authentication tag.
pub const TAG_LEN: usize = 16;
/// Length of an X25519 public key.
pub const DH_LEN: usize = 32;
/// The largest handshake payload (a Cap'n Proto message) either side accepts.
pub const MAX_HANDSHAKE_PAYLOAD_LEN: usize = 4096;
/// The largest application payload of one DATA frame: 65535 - 16 (tag) - 1 (type).
pub const MAX_DATA_PER_FRAME: usize = MAX_MESSAGE_LEN - TAG_LEN - 1;
/// Length of the handshake hash exposed for channel binding.
pub const HANDSHAKE_HASH_LEN: usize = 32;

/// How many X25519 scalar multiplications (key generation and
/// Diffie-Hellman) handshakes have run on the calling thread. Test hook of
/// the private `__test-hooks` feature; not part of the API.
#[cfg(feature = "__test-hooks")]
#[doc(hidden)]
pub fn x25519_operations_on_this_thread() -> u64 {
    resolver::x25519_operations_on_this_thread()
}

/// Whether a spare buffer kept by the calling thread (released by an idle
/// session, reused by the next) contains `needle`. Test hook of the private
/// `__test-hooks` feature; not part of the API.
#[cfg(feature = "__test-hooks")]
#[doc(hidden)]
pub fn spare_buffers_hold(needle: &[u8]) -> bool {
    transport::spare_buffers_hold(needle)
}
