//! The provider's side of an introduction: [`HandoffTable`].
//!
//! Carol keeps one table. Two events drive it, in either order:
//!
//! * **expect**: the introducer (Bob), over his authenticated connection,
//!   asks Carol to set a capability aside ([`HandoffTable::expect`]);
//! * **redeem**: the holder (Alice), over *her* authenticated connection,
//!   presents the introduction ([`HandoffTable::redeem`]).
//!
//! Each handoff is one slot, keyed by (introducer, nonce), in one of four states:
//!
//! ```text
//!   (none) --expect--> Provided --redeem--> Spent (tombstone until expiry)
//!   (none) --redeem--> Waiting  --expect--> Spent (the waiter gets the capability)
//!   Provided / Waiting --revoke--> Revoked (tombstone until expiry)
//!   (none) --revoke--> Revoked, charged to the introducer's own share
//!   Waiting --its deadline--> TimedOut (the redeemer gets Timeout; a record
//!                             until the introduction expires)
//!   TimedOut --redeem--> TimedOut (refused at once: Timeout)
//!   TimedOut --expect--> Provided (a late request still counts)
//!   any other --expire(now) past its deadline--> (none)
//! ```
//!
//! Tombstones make a second redeem fail at once as [`Replayed`] (or
//! [`Revoked`]) for as long as the introduction could still be valid, capped
//! by [`HandoffConfig::max_lifetime`].
//!
//! The table is sans-IO: it never reads the clock (every call takes `now`)
//! and never sleeps. A redeem that arrives before the expect returns
//! [`Redeem::Pending`], a future that completes when the matching expect
//! arrives, or fails when [`HandoffTable::expire`] passes its deadline; the
//! driver calls `expire(now)` when [`HandoffTable::next_deadline`] comes.
//!
//! The clock is wall-clock time ([`SystemTime`]) because introductions carry
//! absolute expiries that several machines compare; keep vat clocks roughly
//! synchronised and lifetimes well above their skew.
//!
//! [`Replayed`]: IntroductionError::Replayed
//! [`Revoked`]: IntroductionError::Revoked

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::channel::oneshot;

use super::{Introduction, Nonce, ThirdPartyToAwait};
use crate::error::{Error, IntroductionError, Result};
use crate::vat_id::VatId;

/// Bounds on a [`HandoffTable`]: every operation that would exceed one is refused
/// with [`IntroductionError::Limit`]. A network's are
/// [`NetworkConfig::handoff`](crate::network::NetworkConfig::handoff).
/// Start from [`Default`] and change what you need with the `with_*` setters:
///
/// ```
/// use std::time::Duration;
/// use capnp_noise::intro::HandoffConfig;
///
/// let limits = HandoffConfig::default()
///     .with_max_entries_per_introducer(16)
///     .with_max_wait(Duration::from_secs(5));
/// assert_eq!(limits.max_entries_per_introducer, 16);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoffConfig {
    /// The most provided entries and tombstones, in all.
    pub max_entries: usize,
    /// The most provided entries and tombstones made by one introducer, so
    /// that one vat cannot fill the table for the others.
    pub max_entries_per_introducer: usize,
    /// The most redeems waiting for their introducer's request, in all.
    pub max_waiters: usize,
    /// The most waiting redeems of one authenticated redeemer.
    pub max_waiters_per_redeemer: usize,
    /// The most waiting redeems of introductions signed by one introducer
    /// (any vat can sign introductions, so that one introducer cannot fill
    /// the waiters for the others).
    pub max_waiters_per_introducer: usize,
    /// The most records of redeems that timed out, kept until their
    /// introduction expires (at most [`max_lifetime`](Self::max_lifetime)) so
    /// that the same introduction is refused at once instead of waiting
    /// again. Beyond this many, a timed-out redeem leaves no record.
    pub max_timed_out: usize,
    /// How long a redeem waits for the introducer's request (less if the
    /// introduction expires sooner).
    pub max_wait: Duration,
    /// The longest an introducer may ask the provider to hold an entry
    /// (`ThirdPartyToAwait.expiresAt` at most this far from `now`); also
    /// caps how long tombstones are kept.
    pub max_lifetime: Duration,
}

setters!(HandoffConfig {
    with_max_entries => max_entries: usize,
    with_max_entries_per_introducer => max_entries_per_introducer: usize,
    with_max_waiters => max_waiters: usize,
    with_max_waiters_per_redeemer => max_waiters_per_redeemer: usize,
    with_max_waiters_per_introducer => max_waiters_per_introducer: usize,
    with_max_timed_out => max_timed_out: usize,
    with_max_wait => max_wait: Duration,
    with_max_lifetime => max_lifetime: Duration,
});

impl Default for HandoffConfig {
    /// 4096 entries (256 per introducer), 1024 waiters (16 per redeemer, 64
    /// per introducer), 30 seconds of waiting, 4096 records of timed-out
    /// waits, entries held at most one hour.
    fn default() -> Self {
        HandoffConfig {
            max_entries: 4096,
            max_entries_per_introducer: 256,
            max_waiters: 1024,
            max_waiters_per_redeemer: 16,
            max_waiters_per_introducer: 64,
            max_timed_out: 4096,
            max_wait: Duration::from_secs(30),
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

/// The outcome of a successful [`HandoffTable::redeem`].
pub enum Redeem<T> {
    /// The capability, handed out now (and never again for this introduction).
    Ready(T),
    /// The introducer's request has not arrived yet: await this (or poll
    /// [`PendingRedeem::try_take`]) for the capability or the error.
    Pending(PendingRedeem<T>),
}

impl<T> fmt::Debug for Redeem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Redeem::Ready(_) => f.write_str("Ready(..)"),
            Redeem::Pending(p) => f.debug_tuple("Pending").field(p).finish(),
        }
    }
}

/// A redeem waiting for the introducer's request. Resolves to the capability
/// when the matching [`HandoffTable::expect`] arrives, or to an error:
/// [`IntroductionError::Timeout`] when [`HandoffTable::expire`] passes the
/// deadline, [`IntroductionError::Revoked`], [`IntroductionError::WrongRecipient`]
/// if the introducer's request names another recipient, or
/// [`IntroductionError::Unknown`] if the table is dropped.
///
/// Dropping it withdraws the redeem: a later expect keeps the capability for
/// the next redeem.
pub struct PendingRedeem<T> {
    rx: oneshot::Receiver<Result<T>>,
    deadline: SystemTime,
}

impl<T> PendingRedeem<T> {
    /// When the wait ends with [`IntroductionError::Timeout`] (if
    /// [`HandoffTable::expire`] is called then).
    pub fn deadline(&self) -> SystemTime {
        self.deadline
    }

    /// The outcome, if it is known yet (without blocking). The outcome is
    /// handed out once: after it was taken, this returns
    /// `Some(Err(IntroductionError::Unknown))`.
    pub fn try_take(&mut self) -> Option<Result<T>> {
        match self.rx.try_recv() {
            Ok(outcome) => outcome,
            Err(oneshot::Canceled) => Some(Err(IntroductionError::Unknown.into())),
        }
    }
}

impl<T> Future for PendingRedeem<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        Pin::new(&mut self.get_mut().rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(IntroductionError::Unknown.into())))
    }
}

impl<T> fmt::Debug for PendingRedeem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingRedeem")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

type Key = (VatId, Nonce);

enum Slot<T> {
    /// The introducer's request arrived; nobody redeemed yet.
    Provided {
        recipient: VatId,
        cap: T,
        until: SystemTime,
    },
    /// A verified redeem arrived first and waits for the request.
    Waiting {
        /// The authenticated redeemer (the introduction's final holder).
        redeemer: VatId,
        /// The recipient named in the (signed) introduction.
        recipient: VatId,
        /// When a tombstone for this handoff may go.
        tombstone_until: SystemTime,
        deadline: SystemTime,
        tx: oneshot::Sender<Result<T>>,
    },
    /// Redeemed: any further use is a replay.
    Spent { until: SystemTime },
    /// Withdrawn by the introducer or revoked by the provider.
    Revoked { until: SystemTime },
    /// A redeem waited for the introducer's request until its deadline:
    /// the same introduction is refused at once until it expires.
    TimedOut { until: SystemTime },
}

impl<T> Slot<T> {
    fn deadline(&self) -> SystemTime {
        match self {
            Slot::Provided { until, .. }
            | Slot::Spent { until }
            | Slot::Revoked { until }
            | Slot::TimedOut { until } => *until,
            Slot::Waiting { deadline, .. } => *deadline,
        }
    }

    fn is_waiting(&self) -> bool {
        matches!(self, Slot::Waiting { .. })
    }

    /// An entry or tombstone, counted against [`HandoffConfig::max_entries`].
    fn is_entry(&self) -> bool {
        !matches!(self, Slot::Waiting { .. } | Slot::TimedOut { .. })
    }
}

fn refuse<R>(e: IntroductionError) -> Result<R> {
    Err(Error::Introduction(e))
}

fn limit<R>(what: String) -> Result<R> {
    refuse(IntroductionError::Limit(what))
}

/// The provider's table of capabilities set aside for introduced vats.
///
/// `T` is whatever the provider hands out (a capnp-rpc client, an object
/// id, ...): the table only stores and moves it. Every entry is single use,
/// expires, can be revoked, and is bounded by [`HandoffConfig`].
pub struct HandoffTable<T> {
    own: VatId,
    limits: HandoffConfig,
    slots: HashMap<Key, Slot<T>>,
}

impl<T> fmt::Debug for HandoffTable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandoffTable")
            .field("own", &self.own.fingerprint())
            .field("entries", &self.entries())
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl<T> HandoffTable<T> {
    /// An empty table for the provider vat `own` (introductions naming
    /// another provider are refused).
    pub fn new(own: VatId, limits: HandoffConfig) -> Self {
        HandoffTable {
            own,
            limits,
            slots: HashMap::new(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &HandoffConfig {
        &self.limits
    }

    /// How many provided entries and tombstones the table holds.
    pub fn entries(&self) -> usize {
        self.slots.values().filter(|s| s.is_entry()).count()
    }

    /// How many records of timed-out redeems the table holds.
    pub fn timed_out(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::TimedOut { .. }))
            .count()
    }

    /// Whether `introducer` may add one more entry or tombstone.
    ///
    /// # Errors
    /// [`IntroductionError::Limit`] naming the limit that is reached.
    fn room_for_entry(&self, introducer: &VatId) -> Result<()> {
        if self.entries() >= self.limits.max_entries {
            return limit(format!(
                "the provider holds at most {} introductions",
                self.limits.max_entries
            ));
        }
        let by_introducer = self
            .slots
            .iter()
            .filter(|((i, _), s)| i == introducer && s.is_entry())
            .count();
        if by_introducer >= self.limits.max_entries_per_introducer {
            return limit(format!(
                "the provider holds at most {} introductions from one introducer",
                self.limits.max_entries_per_introducer
            ));
        }
        Ok(())
    }

    /// Ends the wait in `slot` (removed from the table at `key`): the
    /// redeemer gets [`IntroductionError::Timeout`], and a record stays until
    /// the introduction expires if there is room for one.
    fn end_wait(&mut self, key: Key, slot: Slot<T>, now: SystemTime) {
        if let Slot::Waiting {
            tx,
            tombstone_until,
            ..
        } = slot
        {
            let abandoned = tx.is_canceled();
            let _ = tx.send(refuse(IntroductionError::Timeout));
            if !abandoned && tombstone_until > now && self.timed_out() < self.limits.max_timed_out {
                self.slots.insert(
                    key,
                    Slot::TimedOut {
                        until: tombstone_until,
                    },
                );
            }
        }
    }

    /// How many redeems are waiting for their introducer's request.
    pub fn waiting(&self) -> usize {
        self.slots.values().filter(|s| s.is_waiting()).count()
    }

    /// The earliest time at which [`HandoffTable::expire`] has something to
    /// do (a waiter's deadline or an entry's expiry), if any.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        self.slots.values().map(Slot::deadline).min()
    }

    /// Drops the slot at `key` if its deadline has passed, failing a waiter
    /// with [`IntroductionError::Timeout`]. Returns whether it was dropped.
    fn sweep(&mut self, key: &Key, now: SystemTime) -> bool {
        if self.slots.get(key).is_some_and(|s| s.deadline() <= now) {
            if let Some(slot) = self.slots.remove(key) {
                self.end_wait(*key, slot, now);
            }
            return true;
        }
        false
    }

    /// The introducer's request (rpc.capnp's `Provide`): set `cap` aside for
    /// `request.recipient()` under (`introducer`, `request.nonce()`) until
    /// `request.expires_at()`.
    ///
    /// `introducer` MUST be the authenticated VatId of the connection the
    /// request came over, never a value from the message. If a redeem is
    /// already waiting for this handoff, it gets `cap` now.
    ///
    /// # Errors
    /// * [`IntroductionError::Expired`] if the request has already expired;
    /// * [`IntroductionError::Limit`] if it expires further than
    ///   [`HandoffConfig::max_lifetime`] from `now`, or the table (or this
    ///   introducer's share of it) is full;
    /// * [`IntroductionError::Replayed`] if this introducer already used the nonce;
    /// * [`IntroductionError::Revoked`] if the handoff was withdrawn.
    pub fn expect(
        &mut self,
        introducer: &VatId,
        request: &ThirdPartyToAwait,
        cap: T,
        now: SystemTime,
    ) -> Result<()> {
        let until = request.expires_at();
        if until <= now {
            return refuse(IntroductionError::Expired);
        }
        if until > now + self.limits.max_lifetime {
            return limit(format!(
                "the provider holds introductions for at most {:?}",
                self.limits.max_lifetime
            ));
        }
        let key = (*introducer, *request.nonce());
        self.sweep(&key, now);
        match self.slots.get(&key) {
            Some(Slot::Provided { .. } | Slot::Spent { .. }) => {
                return refuse(IntroductionError::Replayed)
            }
            Some(Slot::Revoked { .. }) => return refuse(IntroductionError::Revoked),
            Some(Slot::Waiting { .. } | Slot::TimedOut { .. }) | None => {}
        }
        self.room_for_entry(introducer)?;
        let recipient = *request.recipient();
        let next = match self.slots.remove(&key) {
            Some(Slot::Waiting {
                recipient: signed_for,
                tombstone_until,
                tx,
                ..
            }) if signed_for == recipient => match tx.send(Ok(cap)) {
                Ok(()) => Slot::Spent {
                    until: until.max(tombstone_until),
                },
                // The redeemer gave up in the meantime: keep the capability.
                Err(Ok(cap)) => Slot::Provided {
                    recipient,
                    cap,
                    until,
                },
                Err(Err(e)) => return Err(e),
            },
            Some(Slot::Waiting { tx, .. }) => {
                // The introducer signed one recipient and asked for another:
                // the waiting vat gets nothing; the request stands for the
                // recipient it names.
                let _ = tx.send(refuse(IntroductionError::WrongRecipient));
                Slot::Provided {
                    recipient,
                    cap,
                    until,
                }
            }
            _ => Slot::Provided {
                recipient,
                cap,
                until,
            },
        };
        self.slots.insert(key, next);
        Ok(())
    }

    /// A holder presents an introduction (rpc.capnp's `Accept` with a
    /// `ThirdPartyCompletion`) over its own connection.
    ///
    /// `caller` MUST be the authenticated VatId of that connection. The
    /// introduction must verify ([`Introduction::verify`]: signatures,
    /// expiry, `caller` is its final holder), name this provider, and match
    /// the request its introducer made (same introducer, nonce and
    /// recipient), which must not be used, revoked or expired.
    ///
    /// # Errors
    /// * the errors of [`Introduction::verify`] (BadSignature, Expired,
    ///   WrongRecipient for a caller that is not the holder, Limit);
    /// * [`IntroductionError::WrongProvider`] if it names another provider;
    /// * [`IntroductionError::WrongRecipient`] if the introducer's request
    ///   names another recipient;
    /// * [`IntroductionError::Expired`] if the request has expired;
    /// * [`IntroductionError::Replayed`] if it was already redeemed, or
    ///   another redeem of it is waiting;
    /// * [`IntroductionError::Revoked`] if it was withdrawn or revoked;
    /// * [`IntroductionError::Limit`] if it would have to wait and too many
    ///   redeems (or too many of this caller's) are waiting already.
    pub fn redeem(
        &mut self,
        caller: &VatId,
        introduction: &Introduction,
        now: SystemTime,
    ) -> Result<Redeem<T>> {
        introduction.verify(caller, now)?;
        if *introduction.provider() != self.own {
            return refuse(IntroductionError::WrongProvider);
        }
        let key = (*introduction.introducer(), *introduction.nonce());
        let tombstone_until = introduction
            .expires_at()
            .min(now + self.limits.max_lifetime);
        if let Some(Slot::Provided { until, .. }) = self.slots.get(&key) {
            if *until <= now {
                self.slots.remove(&key);
                return refuse(IntroductionError::Expired);
            }
        }
        self.sweep(&key, now);
        match self.slots.remove(&key) {
            Some(Slot::Provided {
                recipient,
                cap,
                until,
            }) => {
                if recipient != *introduction.recipient() {
                    self.slots.insert(
                        key,
                        Slot::Provided {
                            recipient,
                            cap,
                            until,
                        },
                    );
                    return refuse(IntroductionError::WrongRecipient);
                }
                self.slots.insert(
                    key,
                    Slot::Spent {
                        until: until.max(tombstone_until),
                    },
                );
                return Ok(Redeem::Ready(cap));
            }
            // The earlier redeemer gave up (its connection closed): replace it.
            Some(Slot::Waiting { tx, .. }) if tx.is_canceled() => {}
            Some(slot @ Slot::Waiting { .. }) | Some(slot @ Slot::Spent { .. }) => {
                self.slots.insert(key, slot);
                return refuse(IntroductionError::Replayed);
            }
            Some(slot @ Slot::Revoked { .. }) => {
                self.slots.insert(key, slot);
                return refuse(IntroductionError::Revoked);
            }
            // It waited once already and its introducer never asked: it
            // is refused at once, not kept waiting again.
            Some(slot @ Slot::TimedOut { .. }) => {
                self.slots.insert(key, slot);
                return refuse(IntroductionError::Timeout);
            }
            None => {}
        }
        if self.waiting() >= self.limits.max_waiters {
            return limit(format!(
                "at most {} redeems may wait for their introducer",
                self.limits.max_waiters
            ));
        }
        let by_caller = self
            .slots
            .values()
            .filter(|s| matches!(s, Slot::Waiting { redeemer, .. } if redeemer == caller))
            .count();
        if by_caller >= self.limits.max_waiters_per_redeemer {
            return limit(format!(
                "at most {} redeems of one vat may wait for their introducers",
                self.limits.max_waiters_per_redeemer
            ));
        }
        let by_introducer = self
            .slots
            .iter()
            .filter(|((i, _), s)| *i == key.0 && s.is_waiting())
            .count();
        if by_introducer >= self.limits.max_waiters_per_introducer {
            return limit(format!(
                "at most {} redeems of one introducer's introductions may wait for it",
                self.limits.max_waiters_per_introducer
            ));
        }
        let deadline = (now + self.limits.max_wait).min(introduction.expires_at());
        let (tx, rx) = oneshot::channel();
        self.slots.insert(
            key,
            Slot::Waiting {
                redeemer: *caller,
                recipient: *introduction.recipient(),
                tombstone_until,
                deadline,
                tx,
            },
        );
        Ok(Redeem::Pending(PendingRedeem { rx, deadline }))
    }

    /// Withdraws the handoff (`introducer`, `nonce`): the introducer cancels
    /// it (rpc.capnp: `Finish` on the `Provide`), or the provider revokes it.
    /// A later redeem fails with [`IntroductionError::Revoked`], and so does
    /// a redeem waiting now. Returns the capability if it was still set aside.
    /// An already redeemed handoff is not affected (revoke the object itself).
    pub fn revoke(&mut self, introducer: &VatId, nonce: &Nonce, now: SystemTime) -> Option<T> {
        let key = (*introducer, *nonce);
        self.sweep(&key, now);
        let tombstone = |until| Slot::Revoked { until };
        match self.slots.remove(&key) {
            Some(Slot::Provided { cap, until, .. }) => {
                self.slots.insert(key, tombstone(until));
                Some(cap)
            }
            Some(Slot::Waiting {
                tx,
                tombstone_until,
                ..
            }) => {
                let _ = tx.send(refuse(IntroductionError::Revoked));
                self.slots.insert(key, tombstone(tombstone_until));
                None
            }
            Some(slot) => {
                self.slots.insert(key, slot);
                None
            }
            None => {
                // Remember the withdrawal if the introducer's own share has
                // room, so that a redeem arriving later fails at once
                // instead of waiting. Charged to that share: withdrawals of
                // nonces never provided cannot fill the table for others.
                if self.room_for_entry(introducer).is_ok() {
                    self.slots
                        .insert(key, tombstone(now + self.limits.max_lifetime));
                }
                None
            }
        }
    }

    /// Revokes every capability set aside (not yet redeemed) for which
    /// `revoked` returns true, e.g. when the provider revokes the object
    /// behind it. Returns how many entries were revoked.
    pub fn revoke_matching(&mut self, mut revoked: impl FnMut(&T) -> bool) -> usize {
        let mut n = 0;
        for slot in self.slots.values_mut() {
            if let Slot::Provided { cap, until, .. } = slot {
                if revoked(cap) {
                    *slot = Slot::Revoked { until: *until };
                    n += 1;
                }
            }
        }
        n
    }

    /// Drops every entry and tombstone whose time has come, and fails every
    /// waiting redeem whose deadline has come with
    /// [`IntroductionError::Timeout`]; also forgets redeems whose waiter was
    /// dropped. Returns how many slots were removed. Call it at
    /// [`HandoffTable::next_deadline`].
    pub fn expire(&mut self, now: SystemTime) -> usize {
        let due: Vec<Key> = self
            .slots
            .iter()
            .filter(|(_, slot)| match slot {
                Slot::Waiting { tx, deadline, .. } => *deadline <= now || tx.is_canceled(),
                other => other.deadline() <= now,
            })
            .map(|(key, _)| *key)
            .collect();
        for key in &due {
            if let Some(slot) = self.slots.remove(key) {
                self.end_wait(*key, slot, now);
            }
        }
        due.len()
    }
}

#[cfg(test)]
mod tests;
