//! Resumption with a responder the initiator already knows: Noise Pipes
//! (SPEC.md 14), `IK` with an `XX` fallback.
//!
//! An initiator that completed a handshake with a responder holds that
//! responder's Noise static key and the signature that binds it to the
//! responder's VatId: a [`KnownResponder`], which a [`ResumptionCache`]
//! keeps, keyed by VatId. The next connection to that VatId can then start
//! with [`Handshake::initiator_resuming`](super::Handshake::initiator_resuming):
//! an `IK` message 1 encrypted to that static key, which may carry the
//! first bytes of the stream ([`EarlyData`]), so that a first call is
//! answered one round trip after the connection opened instead of two.
//!
//! ```text
//! initiator                                             responder
//!   preamble(IK) || len || IK msg1 (e, es, s, ss;   ->
//!      identity || early data)
//!                                                   <-  len || 0x00 || IK msg2 (e, ee, se; status || identity)
//!                                                       (or, when it cannot decrypt msg1:
//!                                                   <-  len || 0x01 || XX msg2 ... then XX msg3 as in XX)
//! ```
//!
//! **Early data is replayable and not forward secret** (SPEC.md 14.5):
//! anyone who recorded message 1 can send it again and the responder
//! delivers its early data again, and whoever later obtains the responder's
//! static key can decrypt it. Send in it only what is safe to run twice
//! (idempotent calls). Responders answer `IK` only if
//! [`ResumptionConfig::accept_ik`] is set, and refuse early data unless
//! [`ResumptionConfig::accept_early_data`] is set; refused early data is
//! sent again, by this side, as the first transport data, so the byte
//! stream is the same either way.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use zeroize::Zeroizing;

use super::payload;
use super::preamble::Suite;
use super::{DH_LEN, MAX_HANDSHAKE_PAYLOAD_LEN, TAG_LEN};
use crate::error::Error;
use crate::vat_id::VatId;

/// The largest `IK` message 1 (the Noise message, without its length
/// prefix): 4096 bytes (SPEC.md 14.3), so that a message 1 waiting for
/// admission holds as little as `XX`'s early bytes do.
pub const MAX_IK_MESSAGE_1_LEN: usize = 4096;
/// The fixed part of `IK` message 1: `e` (32), encrypted `s` (32 + 16), the
/// identity length (2) and the payload's tag (16).
pub const IK_MESSAGE_1_OVERHEAD: usize = DH_LEN + DH_LEN + TAG_LEN + 2 + TAG_LEN;
/// The smallest `IK` message 2 (without the kind byte): `e`, the early-data
/// status byte and the payload's tag. (The identity payload it carries is
/// judged by SPEC.md 5.3 once decrypted.)
pub const IK_MESSAGE_2_MIN: usize = DH_LEN + 1 + TAG_LEN;
/// The largest `IK` message 2 (without the kind byte).
pub const IK_MESSAGE_2_MAX: usize = IK_MESSAGE_2_MIN + MAX_HANDSHAKE_PAYLOAD_LEN;

/// The kind byte before the responder's answer to an `IK` message 1: an
/// `IK` message 2.
pub const REPLY_IK: u8 = 0x00;
/// The kind byte before the responder's answer to an `IK` message 1: an
/// `XX` message 2 of the fallback handshake.
pub const REPLY_FALLBACK: u8 = 0x01;

/// Early-data status in `IK` message 2: message 1 carried none.
pub(crate) const EARLY_NONE: u8 = 0x00;
/// Early-data status: taken into the stream, delivered to the application.
pub(crate) const EARLY_ACCEPTED: u8 = 0x01;
/// Early-data status: discarded unread; the initiator sends it again.
pub(crate) const EARLY_REFUSED: u8 = 0x02;

/// What an initiator remembers of a responder it completed a handshake
/// with: its VatId, its Noise static key, the signature by which the VatId
/// binds that key (SPEC.md 5.2), and the suite it answered.
///
/// It can only be made from a binding that verifies: by a finished
/// handshake ([`Handshake::learned_responder`](super::Handshake::learned_responder))
/// or by [`KnownResponder::new`], which checks the signature. Holding one
/// does not make the responder trusted: an `IK` handshake verifies the
/// responder's signature and asks the policy again.
#[derive(Clone, PartialEq, Eq)]
pub struct KnownResponder {
    vat_id: VatId,
    static_key: [u8; 32],
    signature: [u8; 64],
    suite: Suite,
}

impl fmt::Debug for KnownResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KnownResponder")
            .field("vat_id", &self.vat_id)
            .field("suite", &self.suite)
            .finish_non_exhaustive()
    }
}

impl KnownResponder {
    /// A responder's record, from a binding kept elsewhere (for example a
    /// file an application persists across restarts).
    ///
    /// # Errors
    /// [`Error::BadIdentityProof`] if `signature` is not `vat_id`'s binding
    /// of `static_key` (SPEC.md 5.2).
    pub fn new(
        vat_id: VatId,
        static_key: [u8; 32],
        signature: [u8; 64],
        suite: Suite,
    ) -> Result<Self, Error> {
        payload::verify_binding(&vat_id, &signature, &static_key)?;
        Ok(Self::verified(vat_id, static_key, signature, suite))
    }

    /// A record whose binding was just verified.
    pub(crate) fn verified(
        vat_id: VatId,
        static_key: [u8; 32],
        signature: [u8; 64],
        suite: Suite,
    ) -> Self {
        KnownResponder {
            vat_id,
            static_key,
            signature,
            suite,
        }
    }

    /// The responder's VatId.
    pub fn vat_id(&self) -> VatId {
        self.vat_id
    }

    /// The responder's Noise static public key.
    pub fn static_key(&self) -> &[u8; 32] {
        &self.static_key
    }

    /// The responder's signature binding [`static_key`](Self::static_key)
    /// to its VatId.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The suite the responder answered.
    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// The same record with another static key, for tests of a responder
    /// whose key changed or of a forged cache entry (no check).
    #[cfg(any(test, feature = "__test-hooks"))]
    #[doc(hidden)]
    pub fn with_static_key_for_tests(mut self, static_key: [u8; 32]) -> Self {
        self.static_key = static_key;
        self
    }
}

/// Bytes an initiator sends in `IK` message 1, before the handshake ends:
/// the first bytes of its stream (typically a first RPC call).
///
/// **Replayable and not forward secret** (SPEC.md 14.5): an attacker who
/// recorded message 1 can send it again, and the responder delivers these
/// bytes to its application again, once per replay; and whoever obtains the
/// responder's Noise static key later can decrypt them. Put in it only
/// requests whose repetition is harmless (idempotent reads), never one that
/// moves money, deletes or creates. The constructor's name says so, so that
/// this choice is visible where it is made.
pub struct EarlyData(Zeroizing<Vec<u8>>);

impl fmt::Debug for EarlyData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EarlyData({} bytes)", self.0.len())
    }
}

impl EarlyData {
    /// Early data: bytes that an attacker may make the responder receive
    /// more than once, and that lose their secrecy if the responder's static
    /// key is ever compromised. At most `4096 - 98 -` the identity
    /// payload's length (3862 bytes with the canonical payload), checked by
    /// [`Handshake::initiator_resuming`](super::Handshake::initiator_resuming).
    pub fn replayable_not_forward_secret(bytes: impl Into<Vec<u8>>) -> Self {
        EarlyData(Zeroizing::new(bytes.into()))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Whether a stream that handshakes at its first write
/// ([`stream::connect_lazy`](crate::stream::connect_lazy), `rpc::connect`
/// with resumption) may send the bytes written before the handshake as
/// early data, in `IK` message 1.
///
/// **[`ReplayableNotForwardSecret`](Self::ReplayableNotForwardSecret) is
/// a security decision** (SPEC.md 14.5): whatever the application writes
/// first (for RPC: the bootstrap request and the first calls) can be
/// replayed to the server by anyone who recorded the first flight, as often
/// as they like, and is readable by whoever later obtains the server's
/// static key (which this crate derives from the server's identity key).
/// Choose it only when every first call the application makes is safe to
/// run twice. The server must also accept early data
/// ([`ResumptionConfig::accept_early_data`]); if it refuses, the bytes are
/// sent again after the handshake and nothing is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EarlyDataChoice {
    /// The default: the first bytes go as the first transport frame, right
    /// after the answer to `IK` message 1 (forward secret, not replayable).
    #[default]
    Never,
    /// The first bytes (up to the room in `IK` message 1: 3862 bytes with
    /// the canonical identity payload) travel in `IK` message 1: replayable
    /// and not forward secret.
    ReplayableNotForwardSecret,
}

/// What became of an initiator's early data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EarlyDataOutcome {
    /// No early data was sent (an `XX` handshake, or `IK` without it).
    NotSent,
    /// The responder took it into the stream in message 1's flight.
    Accepted,
    /// The responder refused it unread; it was sent again as the first
    /// transport data (a round trip later).
    Refused,
    /// The responder could not decrypt message 1 and fell back to `XX`; the
    /// early data was sent again after `XX` message 3.
    FellBack,
}

/// A responder's settings for `IK` (SPEC.md 14).
///
/// Default: neither. An `IK` message 1 is then answered with the `XX`
/// fallback, which costs the initiator what `XX` costs and the responder
/// what `XX` costs, with the failure hold of admission intact.
///
/// * Accepting `IK` costs nothing in security over `XX` (both signatures
///   are checked, the session is forward secret), but an `IK` handshake
///   completes at the responder before the initiator has proven it is
///   live, so a replayed message 1 costs the responder five X25519
///   operations and an Ed25519 verification without counting as a failed
///   handshake (SPEC.md 14.7). `stream::accept` with handshake slots holds
///   the slot until the initiator's first frame authenticates, as long as
///   the application reads the stream.
/// * Early data is replayable by anyone who recorded it (SPEC.md 14.5), so
///   whether it may run is the responder application's call, to be made
///   knowing what its first calls do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumptionConfig {
    /// Try to decrypt `IK` message 1. If `false`, every `IK` message 1 is
    /// answered with the `XX` fallback (as if this side's static key had
    /// changed): the initiator pays what `XX` costs, and nothing more.
    pub accept_ik: bool,
    /// Deliver early data to the application. If `false` it is discarded
    /// unread, `IK` message 2 says so, and the initiator sends it again
    /// after the handshake.
    pub accept_early_data: bool,
}

setters!(ResumptionConfig {
    with_accept_ik => accept_ik: bool,
    with_accept_early_data => accept_early_data: bool,
});

/// An initiator's memory of responders, keyed by VatId: at most
/// `capacity` entries, the least recently used forgotten first. Shared by
/// the connections of one application (it locks internally).
///
/// Record what a finished handshake learned with [`insert`](Self::insert)
/// (after `XX`, after a fallback: the responder's new key replaces the old
/// one) and [`forget`](Self::forget) a responder after a failed `IK`
/// attempt other than a fallback (SPEC.md 14.6).
///
/// ```
/// use capnp_noise::wire::resumption::ResumptionCache;
/// use capnp_noise::Identity;
///
/// let cache = ResumptionCache::new(2);
/// let server = Identity::generate();
/// assert!(cache.get(&server.vat_id()).is_none());
/// assert_eq!(cache.capacity(), 2);
/// ```
pub struct ResumptionCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<VatId, (KnownResponder, u64)>,
    clock: u64,
}

impl fmt::Debug for ResumptionCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResumptionCache")
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl Default for ResumptionCache {
    /// 1024 responders.
    fn default() -> Self {
        Self::new(1024)
    }
}

impl ResumptionCache {
    /// A cache of at most `capacity` responders (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        ResumptionCache {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most responders kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many responders are kept now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True if no responder is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The record of the responder `vat_id`, if kept (it becomes the most
    /// recently used).
    pub fn get(&self, vat_id: &VatId) -> Option<KnownResponder> {
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        inner.entries.get_mut(vat_id).map(|(known, used)| {
            *used = now;
            known.clone()
        })
    }

    /// Keeps `known`, replacing any record of the same VatId; when full,
    /// the least recently used other record is forgotten.
    pub fn insert(&self, known: KnownResponder) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let now = inner.clock;
        if !inner.entries.contains_key(&known.vat_id) && inner.entries.len() >= self.capacity {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(known.vat_id, (known, now));
    }

    /// Forgets the responder `vat_id`.
    pub fn forget(&self, vat_id: &VatId) {
        self.lock().entries.remove(vat_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn known(id: &Identity) -> KnownResponder {
        let sig: [u8; 64] = {
            let (_, sig) = payload::decode(id.handshake_payload()).unwrap();
            sig
        };
        KnownResponder::new(
            id.vat_id(),
            *id.noise_static_key().public(),
            sig,
            Suite::MANDATORY,
        )
        .unwrap()
    }

    #[test]
    fn a_record_needs_a_binding_that_verifies() {
        let a = Identity::generate();
        let b = Identity::generate();
        let k = known(&a);
        // B's VatId over A's static key with A's signature: refused.
        assert!(matches!(
            KnownResponder::new(b.vat_id(), k.static_key, k.signature, Suite::MANDATORY),
            Err(Error::BadIdentityProof(_))
        ));
        let mut other_key = k.static_key;
        other_key[0] ^= 1;
        assert!(KnownResponder::new(a.vat_id(), other_key, k.signature, Suite::MANDATORY).is_err());
    }

    #[test]
    fn the_cache_is_bounded_and_forgets_the_least_recently_used() {
        let ids: Vec<Identity> = (0..4).map(|_| Identity::generate()).collect();
        let cache = ResumptionCache::new(3);
        for id in &ids[..3] {
            cache.insert(known(id));
        }
        // Use the first: the second is now the least recently used.
        assert!(cache.get(&ids[0].vat_id()).is_some());
        cache.insert(known(&ids[3]));
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&ids[1].vat_id()).is_none());
        for i in [0, 2, 3] {
            assert!(cache.get(&ids[i].vat_id()).is_some(), "{i}");
        }
        // Replacing a record does not evict another.
        cache.insert(known(&ids[0]));
        assert_eq!(cache.len(), 3);
        cache.forget(&ids[0].vat_id());
        assert_eq!(cache.len(), 2);
        let none = ResumptionCache::new(0);
        none.insert(known(&ids[0]));
        assert!(none.is_empty());
    }
}
