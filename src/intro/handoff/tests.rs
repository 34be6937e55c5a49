use super::*;
use crate::intro::tests::{
    alice, bob, carol, dave, intro, intro_with, introduce, mallory, t0, LIFETIME,
};
use crate::intro::NONCE_LEN;
use crate::Identity;

fn table() -> HandoffTable<&'static str> {
    HandoffTable::new(carol().vat_id(), HandoffConfig::default())
}

fn err<R: fmt::Debug>(r: Result<R>) -> IntroductionError {
    match r {
        Err(Error::Introduction(e)) => e,
        other => panic!("expected an introduction error, got {other:?}"),
    }
}

fn ready<T>(r: Result<Redeem<T>>) -> T {
    match r {
        Ok(Redeem::Ready(t)) => t,
        Ok(Redeem::Pending(p)) => panic!("pending until {:?}", p.deadline()),
        Err(e) => panic!("{e}"),
    }
}

fn pending<T>(r: Result<Redeem<T>>) -> PendingRedeem<T> {
    match r {
        Ok(Redeem::Pending(p)) => p,
        Ok(Redeem::Ready(_)) => panic!("ready"),
        Err(e) => panic!("{e}"),
    }
}

/// Bob asks Carol to set `cap` aside for Alice (the default introduction).
fn expect(t: &mut HandoffTable<&'static str>, cap: &'static str) -> Result<()> {
    t.expect(&bob().vat_id(), &intro().to_await(), cap, t0())
}

#[test]
fn expect_then_redeem_once() {
    let mut t = table();
    expect(&mut t, "cap").unwrap();
    assert_eq!((t.entries(), t.waiting()), (1, 0));
    assert_eq!(ready(t.redeem(&alice().vat_id(), &intro(), t0())), "cap");
    // Single use: the same introduction again, and the same nonce again.
    let later = t0() + Duration::from_secs(1);
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), later)),
        IntroductionError::Replayed
    );
    assert_eq!(err(expect(&mut t, "again")), IntroductionError::Replayed);
    assert_eq!(t.entries(), 1, "a tombstone remains");
}

#[test]
fn mallory_with_an_intercepted_introduction_is_refused() {
    let mut t = table();
    expect(&mut t, "cap").unwrap();
    // Mallory holds Alice's introduction but authenticates as Mallory.
    assert_eq!(
        err(t.redeem(&mallory().vat_id(), &intro(), t0())),
        IntroductionError::WrongRecipient
    );
    // Her attempt did not consume or block it.
    assert_eq!(ready(t.redeem(&alice().vat_id(), &intro(), t0())), "cap");
}

#[test]
fn only_the_introducer_who_asked_can_introduce() {
    let mut t = table();
    expect(&mut t, "bob's cap").unwrap();
    // Mallory signs her own introduction of "Bob's" nonce to herself: it
    // names Mallory as introducer, so it is looked up under Mallory's
    // requests, never Bob's, and waits for a request Mallory never made.
    let own = Introduction::new(
        &mallory(),
        carol().vat_id(),
        vec![],
        mallory().vat_id(),
        *intro().nonce(),
        t0() + LIFETIME,
    )
    .unwrap();
    let mut p = pending(t.redeem(&mallory().vat_id(), &own, t0()));
    t.expire(p.deadline());
    assert_eq!(err(p.try_take().unwrap()), IntroductionError::Timeout);
    // Claiming to be Bob without Bob's key fails the signature.
    let mut forged_message = capnp::message::Builder::new_default();
    {
        let mut c = forged_message
            .init_root::<crate::schema::network_capnp::third_party_to_contact::Builder>();
        own.write_to(c.reborrow()).unwrap();
        c.get_introduction()
            .unwrap()
            .init_introducer()
            .set_ed25519(bob().vat_id().as_bytes());
    }
    let forged =
        Introduction::decode(&capnp::serialize::write_message_to_words(&forged_message)).unwrap();
    assert!(matches!(
        err(t.redeem(&mallory().vat_id(), &forged, t0())),
        IntroductionError::BadSignature(_)
    ));
    // Bob's capability is still there for Alice.
    assert_eq!(
        ready(t.redeem(&alice().vat_id(), &intro(), t0())),
        "bob's cap"
    );
}

#[test]
fn the_request_and_the_introduction_must_name_the_same_recipient() {
    let mut t = table();
    let for_dave =
        ThirdPartyToAwait::new(dave().vat_id(), *intro().nonce(), t0() + LIFETIME).unwrap();
    t.expect(&bob().vat_id(), &for_dave, "cap", t0()).unwrap();
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::WrongRecipient
    );
    // The same disagreement when the redeem came first.
    let mut t = table();
    let mut p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    t.expect(&bob().vat_id(), &for_dave, "cap", t0()).unwrap();
    assert_eq!(
        err(p.try_take().unwrap()),
        IntroductionError::WrongRecipient
    );
    assert_eq!((t.entries(), t.waiting()), (1, 0));
}

#[test]
fn other_providers_introductions_are_refused() {
    let mut t = HandoffTable::<()>::new(dave().vat_id(), HandoffConfig::default());
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::WrongProvider
    );
}

#[test]
fn expired_introductions_and_requests_are_refused() {
    let mut t = table();
    expect(&mut t, "cap").unwrap();
    let end = t0() + LIFETIME;
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), end)),
        IntroductionError::Expired
    );
    assert_eq!(
        err(t.expect(
            &bob().vat_id(),
            &intro_with([2; NONCE_LEN]).to_await(),
            "c",
            end
        )),
        IntroductionError::Expired
    );
    // A request that expires before the introduction does.
    let short = ThirdPartyToAwait::new(
        alice().vat_id(),
        [3; NONCE_LEN],
        t0() + Duration::from_secs(10),
    )
    .unwrap();
    t.expect(&bob().vat_id(), &short, "short", t0()).unwrap();
    assert_eq!(
        err(t.redeem(
            &alice().vat_id(),
            &intro_with([3; NONCE_LEN]),
            t0() + Duration::from_secs(10)
        )),
        IntroductionError::Expired
    );
    // Entries further away than max_lifetime are refused.
    let far = ThirdPartyToAwait::new(
        alice().vat_id(),
        [4; NONCE_LEN],
        t0() + t.limits().max_lifetime + Duration::from_secs(1),
    )
    .unwrap();
    assert!(matches!(
        err(t.expect(&bob().vat_id(), &far, "far", t0())),
        IntroductionError::Limit(_)
    ));
}

#[test]
fn redeem_before_expect_completes_when_the_request_arrives() {
    let mut t = table();
    let mut p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    assert_eq!(p.deadline(), t0() + t.limits().max_wait);
    assert!(p.try_take().is_none());
    assert_eq!((t.entries(), t.waiting()), (0, 1));
    // A second redeem while the first waits is a replay.
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::Replayed
    );
    let later = t0() + Duration::from_secs(5);
    t.expect(&bob().vat_id(), &intro().to_await(), "cap", later)
        .unwrap();
    assert_eq!(p.try_take().unwrap().unwrap(), "cap");
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), later)),
        IntroductionError::Replayed
    );
    assert_eq!((t.entries(), t.waiting()), (1, 0));
}

#[test]
fn pending_redeem_is_a_future() {
    let mut t = table();
    let p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    expect(&mut t, "cap").unwrap();
    assert_eq!(futures::executor::block_on(p).unwrap(), "cap");

    // Dropping the table fails the waiters with Unknown.
    let mut t = table();
    let p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    drop(t);
    assert_eq!(
        err(futures::executor::block_on(p)),
        IntroductionError::Unknown
    );
}

#[test]
fn no_request_times_out_at_the_deadline() {
    let mut t = table();
    let mut p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    let deadline = p.deadline();
    assert_eq!(t.next_deadline(), Some(deadline));
    assert_eq!(t.expire(deadline - Duration::from_millis(1)), 0);
    assert!(p.try_take().is_none());
    assert_eq!(t.expire(deadline), 1);
    let e = err(p.try_take().unwrap());
    assert_eq!(e, IntroductionError::Timeout);
    assert!(Error::from(e.clone())
        .to_string()
        .contains("did not reach the provider"));
    assert_eq!(Error::from(e).io_kind(), std::io::ErrorKind::TimedOut);
    // The timed-out wait is remembered until the introduction expires: the
    // same introduction is refused at once instead of waiting again.
    assert_eq!(t.timed_out(), 1);
    assert_eq!(t.next_deadline(), Some(intro().expires_at()));
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), deadline)),
        IntroductionError::Timeout
    );
    assert_eq!(t.waiting(), 0);
    // A late request is still accepted, and a new redeem gets it.
    expect(&mut t, "cap").unwrap();
    assert_eq!(
        ready(t.redeem(&alice().vat_id(), &intro(), deadline)),
        "cap"
    );
}

#[test]
fn the_wait_ends_no_later_than_the_introduction() {
    let mut t = table();
    let short = introduce(&bob(), &alice(), 5, t0() + Duration::from_secs(3));
    let p = pending(t.redeem(&alice().vat_id(), &short, t0()));
    assert_eq!(p.deadline(), t0() + Duration::from_secs(3));
}

#[test]
fn a_dropped_waiter_leaves_the_capability_for_a_retry() {
    let mut t = table();
    drop(pending(t.redeem(&alice().vat_id(), &intro(), t0())));
    // Alice's connection closed and she retries: not a replay.
    let p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    drop(p);
    expect(&mut t, "cap").unwrap();
    assert_eq!((t.entries(), t.waiting()), (1, 0));
    assert_eq!(ready(t.redeem(&alice().vat_id(), &intro(), t0())), "cap");
    // expire() forgets abandoned waiters.
    let mut t = table();
    drop(pending(t.redeem(&alice().vat_id(), &intro(), t0())));
    assert_eq!(t.expire(t0()), 1);
    assert_eq!(t.waiting(), 0);
}

#[test]
fn revoked_handoffs_are_refused() {
    let mut t = table();
    expect(&mut t, "cap").unwrap();
    assert_eq!(
        t.revoke(&bob().vat_id(), intro().nonce(), t0()),
        Some("cap")
    );
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::Revoked
    );
    assert_eq!(err(expect(&mut t, "again")), IntroductionError::Revoked);

    // Revoking while a redeem waits fails it.
    let mut t = table();
    let mut p = pending(t.redeem(&alice().vat_id(), &intro(), t0()));
    assert_eq!(t.revoke(&bob().vat_id(), intro().nonce(), t0()), None);
    assert_eq!(err(p.try_take().unwrap()), IntroductionError::Revoked);

    // Revoking first makes a later redeem fail at once, not wait.
    let mut t = table();
    assert_eq!(t.revoke(&bob().vat_id(), intro().nonce(), t0()), None);
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::Revoked
    );

    // The provider revokes the object behind some entries.
    let mut t = table();
    expect(&mut t, "doomed").unwrap();
    t.expect(
        &bob().vat_id(),
        &intro_with([2; NONCE_LEN]).to_await(),
        "kept",
        t0(),
    )
    .unwrap();
    assert_eq!(t.revoke_matching(|c| *c == "doomed"), 1);
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::Revoked
    );
    assert_eq!(
        ready(t.redeem(&alice().vat_id(), &intro_with([2; NONCE_LEN]), t0())),
        "kept"
    );
    // A redeemed handoff is not affected.
    assert_eq!(t.revoke(&bob().vat_id(), &[2; NONCE_LEN], t0()), None);
}

#[test]
fn forwarded_introductions_are_redeemed_by_the_last_holder_only() {
    let mut t = table();
    expect(&mut t, "cap").unwrap();
    let to_dave = intro().forward(&alice(), dave().vat_id()).unwrap();
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &to_dave, t0())),
        IntroductionError::WrongRecipient
    );
    assert_eq!(
        err(t.redeem(&mallory().vat_id(), &to_dave, t0())),
        IntroductionError::WrongRecipient
    );
    assert_eq!(ready(t.redeem(&dave().vat_id(), &to_dave, t0())), "cap");
    // Alice forwarded it: her own copy is spent too.
    assert_eq!(
        err(t.redeem(&alice().vat_id(), &intro(), t0())),
        IntroductionError::Replayed
    );
}

#[test]
fn expire_drops_entries_and_tombstones() {
    let mut t = table();
    let short = ThirdPartyToAwait::new(
        alice().vat_id(),
        [6; NONCE_LEN],
        t0() + Duration::from_secs(60),
    )
    .unwrap();
    t.expect(&bob().vat_id(), &short, "short", t0()).unwrap();
    expect(&mut t, "cap").unwrap();
    ready(t.redeem(&alice().vat_id(), &intro(), t0()));
    assert_eq!(t.entries(), 2);
    assert_eq!(t.next_deadline(), Some(t0() + Duration::from_secs(60)));
    assert_eq!(t.expire(t0() + Duration::from_secs(60)), 1);
    // The tombstone lasts as long as the introduction could be presented.
    assert_eq!(t.next_deadline(), Some(t0() + LIFETIME));
    assert_eq!(t.expire(t0() + LIFETIME), 1);
    assert_eq!(t.entries(), 0);
}

#[test]
fn limits_are_enforced() {
    let limits = HandoffConfig {
        max_entries: 3,
        max_entries_per_introducer: 2,
        max_waiters: 2,
        max_waiters_per_redeemer: 1,
        ..HandoffConfig::default()
    };
    let mut t: HandoffTable<u32> = HandoffTable::new(carol().vat_id(), limits);
    let wait = |n: u8| intro_with([n; NONCE_LEN]).to_await();
    t.expect(&bob().vat_id(), &wait(1), 1, t0()).unwrap();
    t.expect(&bob().vat_id(), &wait(2), 2, t0()).unwrap();
    let e = err(t.expect(&bob().vat_id(), &wait(3), 3, t0()));
    assert!(e.to_string().contains("one introducer"), "{e}");
    t.expect(&dave().vat_id(), &wait(3), 3, t0()).unwrap();
    let e = err(t.expect(&mallory().vat_id(), &wait(4), 4, t0()));
    assert!(e.to_string().contains("at most 3"), "{e}");
    assert_eq!(Error::from(e).io_kind(), std::io::ErrorKind::ResourceBusy);

    // Waiters: one per redeemer, two in all.
    let _a = pending(t.redeem(&alice().vat_id(), &intro_with([10; NONCE_LEN]), t0()));
    let e = err(t.redeem(&alice().vat_id(), &intro_with([11; NONCE_LEN]), t0()));
    assert!(e.to_string().contains("of one vat"), "{e}");
    let for_dave = |n: u8| introduce(&bob(), &dave(), n, t0() + LIFETIME);
    let _d = pending(t.redeem(&dave().vat_id(), &for_dave(12), t0()));
    let someone = Identity::from_seed(&[0x50; 32]);
    let e = err(t.redeem(
        &someone.vat_id(),
        &introduce(&bob(), &someone, 13, t0() + LIFETIME),
        t0(),
    ));
    assert!(e.to_string().contains("at most 2 redeems"), "{e}");
    assert_eq!((t.entries(), t.waiting()), (3, 2));
}

#[test]
fn one_introducer_cannot_fill_the_waiters() {
    let limits = HandoffConfig {
        max_waiters: 8,
        max_waiters_per_introducer: 2,
        ..HandoffConfig::default()
    };
    let mut t: HandoffTable<u32> = HandoffTable::new(carol().vat_id(), limits);
    let by = |introducer: &Identity, n: u8| introduce(introducer, &alice(), n, t0() + LIFETIME);
    let _w1 = pending(t.redeem(&alice().vat_id(), &by(&mallory(), 1), t0()));
    let _w2 = pending(t.redeem(&alice().vat_id(), &by(&mallory(), 2), t0()));
    let e = err(t.redeem(&alice().vat_id(), &by(&mallory(), 3), t0()));
    assert!(e.to_string().contains("one introducer's"), "{e}");
    // Bob's early redeem still waits.
    let _w3 = pending(t.redeem(&alice().vat_id(), &by(&bob(), 4), t0()));
    assert_eq!(t.waiting(), 3);
}

#[test]
fn withdrawals_of_unknown_nonces_are_charged_to_their_introducer() {
    let limits = HandoffConfig {
        max_entries: 8,
        max_entries_per_introducer: 2,
        ..HandoffConfig::default()
    };
    let mut t: HandoffTable<u32> = HandoffTable::new(carol().vat_id(), limits);
    for n in 0..100u8 {
        assert_eq!(t.revoke(&mallory().vat_id(), &[n; NONCE_LEN], t0()), None);
    }
    assert_eq!(t.entries(), 2);
    // Bob's requests are unaffected.
    let wait = |n: u8| intro_with([n; NONCE_LEN]).to_await();
    t.expect(&bob().vat_id(), &wait(1), 1, t0()).unwrap();
    t.expect(&bob().vat_id(), &wait(2), 2, t0()).unwrap();
}

#[test]
fn debug_does_not_require_debug_capabilities() {
    struct Opaque;
    let mut t = HandoffTable::new(carol().vat_id(), HandoffConfig::default());
    t.expect(&bob().vat_id(), &intro().to_await(), Opaque, t0())
        .unwrap();
    assert!(format!("{t:?}").contains("entries: 1"));
    let r = t.redeem(&alice().vat_id(), &intro(), t0()).unwrap();
    assert_eq!(format!("{r:?}"), "Ready(..)");
}
