//! Handshake admission: how many unauthenticated peers a responder spends
//! Diffie-Hellman work on at once (SPEC.md section 8, "Admission").
//!
//! A responder does no public-key work for a connection until its preamble
//! and a well-formed message 1 have arrived (those cost the peer as little
//! as they cost us). Message 1 is where the costly part starts: answering it
//! takes three X25519 operations, and message 3 a fourth and an Ed25519
//! signature check. [`HandshakeSlots`] bounds that work before it is spent:
//!
//! * **in total**: at most `max_total` handshakes past message 1 at once;
//! * **per source address**: at most `max_per_source` of them from one IPv4
//!   address or one IPv6 /64 prefix, so a single host flooding the server
//!   cannot take the slots that other hosts' legitimate clients need.
//!
//! A connection whose message 1 arrives when its source's share or all slots
//! are taken waits, first for its source's share, then for a slot, in order
//! of arrival and within its handshake timeout. While it waits it costs a
//! socket and a few hundred bytes: nothing more is read from it and nothing
//! is computed. A slot is held until the handshake ends (finished, failed or
//! timed out); from admission on, the handshake gets one whole handshake
//! timeout ([`stream::accept`](crate::stream::accept) restarts it).
//!
//! A handshake that ends **without** completing (the peer hung up, sent
//! garbage, was refused, or timed out) keeps its slot and its source's
//! share for a further *failure hold* (default [`DEFAULT_FAILURE_HOLD`],
//! one second). Without it, a peer that sends message 1 and hangs up at
//! once frees its slot at once, and can make the server answer message 1
//! (three X25519 operations) as fast as it opens TCP connections, without
//! computing anything itself if it replays one recorded message 1. With it:
//!
//! * in total, the server spends at most `3 × max_total` X25519 operations
//!   per failure hold on handshakes that fail (with the defaults, 64 slots
//!   and 1 s: 192 per second, a few milliseconds of one core);
//! * one source, at most `3 × max_per_source` per failure hold (48 per
//!   second with the defaults), whatever its connection rate;
//! * peers that stall after message 1 cost at most three operations per
//!   slot per handshake timeout plus hold.
//!
//! Handshakes that complete give their slot back at once, and a peer that
//! completes handshakes pays as many X25519 operations of its own (four per
//! handshake) as it makes the server spend: there is no amplification to
//! exploit.
//!
//! Servers in this crate ([`rpc::serve`](crate::rpc::serve), the
//! [`network`](crate::network), the tunnel) create one `HandshakeSlots` per
//! listener from their options; a custom server passes one to
//! [`stream::accept`](crate::stream::accept) through
//! [`StreamConfig::handshake_slots`](crate::stream::StreamConfig::handshake_slots).
//!
//! ```
//! use capnp_noise::admission::HandshakeSlots;
//! use std::net::{IpAddr, Ipv4Addr};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let slots = HandshakeSlots::new(64, 2);
//! let office: IpAddr = Ipv4Addr::new(192, 0, 2, 7).into();
//! let a = slots.acquire(Some(office)).await;
//! let b = slots.acquire(Some(office)).await;
//! // A third handshake from the same address waits for one of them to end.
//! let third = slots.acquire(Some(office));
//! let waited = tokio::time::timeout(std::time::Duration::from_millis(20), third).await;
//! assert!(waited.is_err());
//! a.release_now(); // its handshake completed (a failed one keeps the slot a while)
//! let c = slots.acquire(Some(office)).await;
//! assert_eq!(slots.stats().in_progress, 2);
//! # drop((b, c)); }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default limit of handshakes past message 1 at once, per listener.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default limit of handshakes past message 1 at once from one source
/// address (IPv4 address or IPv6 /64).
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 16;
/// Default time a handshake that failed after admission keeps its slot
/// (see the [module documentation](self)).
pub const DEFAULT_FAILURE_HOLD: Duration = Duration::from_secs(1);
/// Default limit of connections from one source address (IPv4 address or
/// IPv6 /64) that have not yet authenticated: accepted, handshaking or
/// waiting for a slot.
pub const DEFAULT_MAX_UNAUTHENTICATED_PER_SOURCE: usize = 64;
/// Default time a responder gives a new connection to deliver its preamble
/// and message 1 (see [`StreamConfig::first_message_timeout`](crate::stream::StreamConfig::first_message_timeout)).
pub const DEFAULT_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(3);

/// The unit a per-source limit counts: an IPv4 address, or the /64 prefix of
/// an IPv6 address (one host usually owns a whole /64). IPv4-mapped IPv6
/// addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl Source {
    fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => Source::V4(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&a.octets()[..8]);
                    Source::V6Prefix(prefix)
                }
            },
        }
    }
}

struct Inner {
    total: Arc<Semaphore>,
    max_total: usize,
    max_per_source: usize,
    failure_hold: Duration,
    /// Each source with handshakes holding or waiting for a slot: its share
    /// (`max_per_source` permits) and how many handshakes use it. Entries
    /// go when their last user does, so the map holds at most one entry
    /// per connection.
    sources: Mutex<HashMap<Source, (Arc<Semaphore>, usize)>>,
    admitted: AtomicU64,
    waited: AtomicU64,
    held_after_failure: AtomicU64,
}

impl Inner {
    fn release(&self, source: Source) {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, users)) = sources.get_mut(&source) {
            *users -= 1;
            if *users == 0 {
                sources.remove(&source);
            }
        }
    }
}

/// Limits on handshakes in progress past message 1, in total and per source
/// address, shared by all connections of one listener. Cheap to clone (the
/// clones share the limits).
#[derive(Clone)]
pub struct HandshakeSlots {
    inner: Arc<Inner>,
}

impl fmt::Debug for HandshakeSlots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeSlots")
            .field("max_total", &self.inner.max_total)
            .field("max_per_source", &self.inner.max_per_source)
            .field("failure_hold", &self.inner.failure_hold)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for HandshakeSlots {
    /// [`DEFAULT_MAX_HANDSHAKES`] in total, [`DEFAULT_MAX_HANDSHAKES_PER_SOURCE`] per source,
    /// [`DEFAULT_FAILURE_HOLD`].
    fn default() -> Self {
        HandshakeSlots::new(DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_SOURCE)
    }
}

/// What a [`HandshakeSlots`] has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct AdmissionStats {
    /// Handshakes holding a slot now.
    pub in_progress: usize,
    /// Handshakes given a slot since the limits were created.
    pub admitted: u64,
    /// Of those, how many had to wait for their source's share or a slot.
    pub waited: u64,
    /// Of those, how many ended without completing and kept their slot for
    /// the failure hold.
    pub held_after_failure: u64,
}

impl HandshakeSlots {
    /// Limits of `max_total` handshakes at once, at most `max_per_source` of
    /// them from one source address, and the [`DEFAULT_FAILURE_HOLD`]. Zeros
    /// count as one.
    pub fn new(max_total: usize, max_per_source: usize) -> Self {
        HandshakeSlots::with_failure_hold(max_total, max_per_source, DEFAULT_FAILURE_HOLD)
    }

    /// Like [`new`](Self::new), with a handshake that fails after admission
    /// keeping its slot for `failure_hold` (zero: it gives it back at once,
    /// which leaves the rate of failing handshakes unbounded).
    pub fn with_failure_hold(
        max_total: usize,
        max_per_source: usize,
        failure_hold: Duration,
    ) -> Self {
        let max_total = max_total.max(1);
        HandshakeSlots {
            inner: Arc::new(Inner {
                total: Arc::new(Semaphore::new(max_total)),
                max_total,
                max_per_source: max_per_source.max(1),
                failure_hold,
                sources: Mutex::new(HashMap::new()),
                admitted: AtomicU64::new(0),
                waited: AtomicU64::new(0),
                held_after_failure: AtomicU64::new(0),
            }),
        }
    }

    /// The limit in total.
    pub fn max_total(&self) -> usize {
        self.inner.max_total
    }

    /// The limit per source address.
    pub fn max_per_source(&self) -> usize {
        self.inner.max_per_source
    }

    /// How long a handshake that fails after admission keeps its slot.
    pub fn failure_hold(&self) -> Duration {
        self.inner.failure_hold
    }

    /// Counts so far.
    pub fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            in_progress: self.inner.max_total - self.inner.total.available_permits(),
            admitted: self.inner.admitted.load(Ordering::Relaxed),
            waited: self.inner.waited.load(Ordering::Relaxed),
            held_after_failure: self.inner.held_after_failure.load(Ordering::Relaxed),
        }
    }

    /// Takes a slot for a handshake from `source` (`None` when the peer's
    /// address is unknown: only the total limit applies). Waits, in order of
    /// arrival, while the source's share or all slots are taken; the caller
    /// bounds the wait (in [`stream::accept`](crate::stream::accept) the
    /// handshake timeout covers it). Dropping the future while it waits
    /// gives back its place. The slot is given back at once when the
    /// returned [`SlotPermit`] is [released](SlotPermit::release_now), and
    /// after the failure hold when it is dropped without.
    pub async fn acquire(&self, source: Option<IpAddr>) -> SlotPermit {
        let mut waited = false;
        let share = match source.map(Source::of) {
            Some(source) => {
                let (semaphore, user) = self.join(source);
                let permit = match semaphore.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        waited = true;
                        semaphore.acquire_owned().await.expect("never closed")
                    }
                };
                Some((permit, user))
            }
            None => None,
        };
        let permit = match self.inner.total.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                waited = true;
                let total = self.inner.total.clone();
                total.acquire_owned().await.expect("never closed")
            }
        };
        self.inner.admitted.fetch_add(1, Ordering::Relaxed);
        if waited {
            self.inner.waited.fetch_add(1, Ordering::Relaxed);
        }
        SlotPermit {
            held: Some(Held {
                _permit: permit,
                _share: share,
            }),
            inner: self.inner.clone(),
        }
    }

    /// Registers one more user of `source`'s share.
    fn join(&self, source: Source) -> (Arc<Semaphore>, SourceUser) {
        let mut sources = self
            .inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (semaphore, users) = sources
            .entry(source)
            .or_insert_with(|| (Arc::new(Semaphore::new(self.inner.max_per_source)), 0));
        *users += 1;
        (
            semaphore.clone(),
            SourceUser {
                inner: self.inner.clone(),
                source,
            },
        )
    }
}

/// One handshake's use of its source's entry, given back on drop (also when
/// a waiting acquire is cancelled).
struct SourceUser {
    inner: Arc<Inner>,
    source: Source,
}

impl Drop for SourceUser {
    fn drop(&mut self) {
        self.inner.release(self.source);
    }
}

/// A handshake's slot, from [`HandshakeSlots::acquire`].
///
/// [`release_now`](Self::release_now) it when the handshake has completed
/// (or ended before any public-key work was spent on it): the slot is free
/// again at once. Dropped without, it counts as a failed handshake: a task
/// on the current tokio runtime keeps the slot for the failure hold
/// (outside a runtime, or with a zero hold, it is given back at once).
#[must_use = "dropping the permit counts as a failed handshake (the slot is held for the failure hold); call release_now() when it completed"]
pub struct SlotPermit {
    held: Option<Held>,
    inner: Arc<Inner>,
}

struct Held {
    _permit: OwnedSemaphorePermit,
    // Dropped after the permit of the share, which the entry owns.
    _share: Option<(OwnedSemaphorePermit, SourceUser)>,
}

impl SlotPermit {
    /// Gives the slot back now, without the failure hold: for a handshake
    /// that completed, or that ended before the server spent any public-key
    /// work on it.
    pub fn release_now(mut self) {
        self.held = None;
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        let hold = self.inner.failure_hold;
        if hold.is_zero() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.inner
                .held_after_failure
                .fetch_add(1, Ordering::Relaxed);
            runtime.spawn(async move {
                tokio::time::sleep(hold).await;
                drop(held);
            });
        }
    }
}

impl fmt::Debug for SlotPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotPermit").finish_non_exhaustive()
    }
}

/// A cap on the connections one source address (IPv4 address, IPv6 /64) has
/// open and not yet authenticated, counted from `accept` to the end of the
/// handshake. [`HandshakeSlots`] bounds the work of handshakes past message
/// 1; this bounds the sockets and connection permits that silent or slow
/// connections from one host can hold before that, so that one host cannot
/// take a listener's whole `max_connections`. Cheap to clone (clones share
/// the counts); the table holds one entry per source with connections
/// counted, so at most one per connection.
///
/// A server calls [`try_acquire`](Self::try_acquire) with the peer's
/// address right after `accept`, closes the connection at once on `None`,
/// and keeps the guard until the handshake has ended.
///
/// ```
/// use capnp_noise::admission::UnauthenticatedLimit;
/// use std::net::{IpAddr, Ipv4Addr};
///
/// let limit = UnauthenticatedLimit::new(2);
/// let host: IpAddr = Ipv4Addr::new(192, 0, 2, 7).into();
/// let a = limit.try_acquire(host).unwrap();
/// let _b = limit.try_acquire(host).unwrap();
/// assert!(limit.try_acquire(host).is_none()); // a third one is closed at once
/// drop(a); // its handshake ended
/// assert!(limit.try_acquire(host).is_some());
/// ```
#[derive(Clone, Debug)]
pub struct UnauthenticatedLimit {
    max_per_source: usize,
    counts: Arc<Mutex<HashMap<Source, usize>>>,
}

/// One connection counted by an [`UnauthenticatedLimit`]: dropping it (when
/// the handshake ends) gives its source's place back.
#[must_use = "dropping the guard at once frees the place: keep it until the handshake ends"]
#[derive(Debug)]
pub struct UnauthenticatedGuard {
    source: Source,
    counts: Arc<Mutex<HashMap<Source, usize>>>,
}

impl UnauthenticatedLimit {
    /// At most `max_per_source` unauthenticated connections per source (zero
    /// counts as one).
    pub fn new(max_per_source: usize) -> Self {
        UnauthenticatedLimit {
            max_per_source: max_per_source.max(1),
            counts: Arc::default(),
        }
    }

    /// The limit per source.
    pub fn max_per_source(&self) -> usize {
        self.max_per_source
    }

    /// Counts a new connection from `addr`, or `None` if its source already
    /// has `max_per_source` connections not yet authenticated.
    pub fn try_acquire(&self, addr: IpAddr) -> Option<UnauthenticatedGuard> {
        let source = Source::of(addr);
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return None;
        }
        *n += 1;
        Some(UnauthenticatedGuard {
            source,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for UnauthenticatedGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn v4(last: u8) -> Option<IpAddr> {
        Some(Ipv4Addr::new(10, 0, 0, last).into())
    }

    /// True if `acquire` for `source` has to wait.
    async fn must_wait(slots: &HandshakeSlots, source: Option<IpAddr>) -> bool {
        tokio::time::timeout(Duration::from_millis(30), slots.acquire(source))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_source_over_its_share_waits_while_others_pass() {
        let slots = HandshakeSlots::new(10, 2);
        let a = slots.acquire(v4(1)).await;
        let _b = slots.acquire(v4(1)).await;
        assert!(must_wait(&slots, v4(1)).await);
        // Another source is not affected.
        let _c = slots.acquire(v4(2)).await;
        // The waiter that gave up left no trace: once a slot of source 1 is
        // free, source 1 gets it at once.
        a.release_now();
        let _d = slots.acquire(v4(1)).await;
        let s = slots.stats();
        assert_eq!((s.in_progress, s.admitted, s.waited), (3, 4, 0));
        assert_eq!(slots.inner.sources.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn total_limit_waits_in_order_and_entries_go_with_their_users() {
        let slots = HandshakeSlots::new(1, 1);
        let held = slots.acquire(v4(1)).await;
        assert!(must_wait(&slots, v4(2)).await);
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.acquire(v4(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        held.release_now();
        let second = waiter.await.unwrap();
        let s = slots.stats();
        assert_eq!((s.in_progress, s.admitted, s.waited), (1, 2, 1));
        second.release_now();
        assert_eq!(slots.stats().in_progress, 0);
        assert!(slots.inner.sources.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_handshake_keeps_its_slot_for_the_hold_a_completed_one_does_not() {
        let hold = Duration::from_secs(1);
        let slots = HandshakeSlots::with_failure_hold(2, 1, hold);
        assert_eq!(slots.failure_hold(), hold);
        // Completed: source 1's share and the slot are free at once.
        slots.acquire(v4(1)).await.release_now();
        let s = slots.stats();
        assert_eq!((s.in_progress, s.held_after_failure), (0, 0));
        // Failed (dropped): both stay taken for the hold.
        drop(slots.acquire(v4(1)).await);
        assert_eq!(slots.stats().held_after_failure, 1);
        let failed_at = tokio::time::Instant::now();
        assert_eq!(slots.stats().in_progress, 1);
        assert!(must_wait(&slots, v4(1)).await, "source 1's share is held");
        let _other = slots.acquire(v4(2)).await;
        assert!(must_wait(&slots, v4(3)).await, "the total is held");
        // Source 1's next handshake gets its share when the hold ends.
        let next = slots.acquire(v4(1)).await;
        assert_eq!(failed_at.elapsed(), hold);
        assert_eq!(slots.stats().in_progress, 2);
        next.release_now();
        assert_eq!(slots.stats().in_progress, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_hold_gives_a_failed_slot_back_at_once() {
        let slots = HandshakeSlots::with_failure_hold(1, 1, Duration::ZERO);
        drop(slots.acquire(v4(1)).await);
        let s = slots.stats();
        assert_eq!((s.in_progress, s.held_after_failure), (0, 0));
        assert!(!must_wait(&slots, v4(1)).await);
        assert!(slots.inner.sources.lock().unwrap().is_empty());
    }

    #[test]
    fn outside_a_runtime_a_dropped_permit_is_given_back_at_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let slots = HandshakeSlots::new(1, 1);
        let permit = runtime.block_on(slots.acquire(v4(1)));
        assert_eq!(slots.stats().in_progress, 1);
        drop(permit); // no runtime entered on this thread now
        assert_eq!(slots.stats().in_progress, 0);
        assert!(slots.inner.sources.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn ipv6_counts_per_64_prefix_and_mapped_v4_as_v4() {
        let slots = HandshakeSlots::new(10, 1);
        let a: IpAddr = "2001:db8:1:2::1".parse::<Ipv6Addr>().unwrap().into();
        let same_prefix: IpAddr = "2001:db8:1:2:ffff::9".parse::<Ipv6Addr>().unwrap().into();
        let other_prefix: IpAddr = "2001:db8:1:3::1".parse::<Ipv6Addr>().unwrap().into();
        let _x = slots.acquire(Some(a)).await;
        assert!(must_wait(&slots, Some(same_prefix)).await);
        let _y = slots.acquire(Some(other_prefix)).await;
        let _z = slots.acquire(v4(1)).await;
        let mapped: IpAddr = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().into();
        assert!(must_wait(&slots, Some(mapped)).await);
        // Unknown sources only count towards the total.
        let _u1 = slots.acquire(None).await;
        let _u2 = slots.acquire(None).await;
        assert_eq!(slots.stats().in_progress, 5);
    }
}
