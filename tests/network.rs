//! Networks of vats on real loopback connections: introductions between
//! three and four vats (Alice, Bob, Carol, Mallory), their refusals and
//! races, crossed dials, reconnects and idle connections.

use capnp_noise_test::office;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use capnp_noise::intro::{random_nonce, Introduction, ThirdPartyToAwait};
use capnp_noise::network::{Network, NetworkConfig};
use capnp_noise::schema::network_capnp::{third_party_to_contact, HandoffError};
use capnp_noise::{Error, Identity, IntroductionError, Pinned, VatId};
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_noise_test::support::{local, whoami};
use office::Office;

/// A vat that serves each peer an `Office` bound to the peer's VatId and,
/// as a provider, gives the redeemer of an introduced `Office` its own.
async fn vat_with(identity: Identity, listen: &str, options: NetworkConfig) -> Network {
    office::office_vat(identity, listen, options).await
}

async fn vat(options: NetworkConfig) -> Network {
    vat_with(Identity::generate(), "127.0.0.1:0", options).await
}

/// Tells `a` where `b` listens.
fn meet(a: &Network, b: &Network) {
    a.add_addresses(b.vat_id(), b.advertised_addresses());
}

fn short_wait(millis: u64) -> NetworkConfig {
    let mut o = NetworkConfig::default();
    o.handoff.max_wait = Duration::from_millis(millis);
    o
}

/// `unwrap_err` for results whose value (a capability) has no `Debug`.
trait Fails {
    fn fails(self) -> Error;
}

impl<T> Fails for Result<T, Error> {
    fn fails(self) -> Error {
        match self {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }
}

fn refusal(e: Error) -> IntroductionError {
    match e {
        Error::Introduction(e) => e,
        other => panic!("expected an introduction refusal, got {other:?}"),
    }
}

/// Alice, Bob (connected to Carol, holding Carol's Office for him) and Carol.
struct Three {
    alice: Network,
    bob: Network,
    carol: Network,
    at_carol: office_capnp::Client,
}

async fn three(carol_options: NetworkConfig) -> Three {
    let (alice, bob) = (vat(Default::default()).await, vat(Default::default()).await);
    let carol = vat(carol_options).await;
    meet(&bob, &carol);
    let at_carol: office_capnp::Client = bob.connect(&carol.vat_id()).await.unwrap();
    assert_eq!(whoami(&at_carol).await.unwrap(), bob.vat_id().to_string());
    Three {
        alice,
        bob,
        carol,
        at_carol,
    }
}

impl Three {
    /// Bob introduces his Office at Carol to Alice.
    async fn bob_introduces_carol_to_alice(&self) -> Introduction {
        let carol = self.carol.vat_id();
        let alice = self.alice.vat_id();
        self.bob
            .introduce(&self.at_carol, &carol, &alice)
            .await
            .unwrap()
    }

    /// An introduction of something at Carol to Alice, signed by `introducer`
    /// without asking Carol to expect it.
    fn unannounced(&self, introducer: &Identity, expires_at: SystemTime) -> Introduction {
        let addresses = self.carol.advertised_addresses().to_vec();
        let (carol, alice) = (self.carol.vat_id(), self.alice.vat_id());
        Introduction::new(
            introducer,
            carol,
            addresses,
            alice,
            random_nonce(),
            expires_at,
        )
        .unwrap()
    }
}

/// Presents `intro` to Carol over `from`'s connection with the
/// raw `Vat.accept` call, skipping the redeemer's own checks, and returns
/// Carol's answer code.
async fn raw_accept(from: &Network, carol: &VatId, intro: &Introduction) -> HandoffError {
    from.add_addresses(*carol, intro.provider_addresses());
    let root = from.root(carol).await.unwrap();
    let mut call = root.accept_request();
    intro
        .write_to(call.get().init_completion().init_contact())
        .unwrap();
    let reply = call.send().promise.await.unwrap();
    reply.get().unwrap().get_error().unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn introduced_calls_go_straight_to_carol_and_outlive_bob() {
    local(async {
        let t = three(Default::default()).await;
        let intro = t.bob_introduces_carol_to_alice().await;
        // Bob hands Alice the bytes (here in memory; any channel will do).
        let received = Introduction::decode(&intro.encode()).unwrap();
        assert_eq!(received.introducer(), &t.bob.vat_id());
        assert_eq!(
            received.provider_addresses(),
            t.carol.advertised_addresses()
        );

        let office: office_capnp::Client = t.alice.redeem(&received).await.unwrap();
        // Carol gave Alice's authenticated VatId its own Office.
        assert_eq!(whoami(&office).await.unwrap(), t.alice.vat_id().to_string());
        // Alice talks to Carol directly: her only connection is to Carol,
        // and Carol has connections with Alice and Bob.
        let peers: Vec<VatId> = t
            .alice
            .connections()
            .iter()
            .map(|c| c.peer.vat_id)
            .collect();
        assert_eq!(peers, vec![t.carol.vat_id()]);
        let mut carols = vec![t.alice.vat_id(), t.bob.vat_id()];
        carols.sort();
        let seen: Vec<VatId> = t
            .carol
            .connections()
            .iter()
            .map(|c| c.peer.vat_id)
            .collect();
        assert_eq!(seen, carols);

        t.bob.shutdown().await;
        assert!(
            whoami(&t.at_carol).await.is_err(),
            "Bob's own capability died with him"
        );
        for _ in 0..3 {
            assert_eq!(whoami(&office).await.unwrap(), t.alice.vat_id().to_string());
        }
        let echoed = {
            let mut req = office.echo_request();
            req.get().set_data(b"still here");
            req.send().promise.await.unwrap()
        };
        assert_eq!(echoed.get().unwrap().get_data().unwrap(), b"still here");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn mallory_cannot_use_an_intercepted_or_replayed_introduction() {
    local(async {
        let t = three(Default::default()).await;
        let mallory = vat(Default::default()).await;
        meet(&mallory, &t.carol);
        let intro = t.bob_introduces_carol_to_alice().await;
        let stolen = Introduction::decode(&intro.encode()).unwrap();

        // Mallory's own network refuses to present it, and Carol refuses it
        // when Mallory presents it anyway.
        let e = mallory
            .redeem::<office_capnp::Client>(&stolen)
            .await
            .fails();
        assert_eq!(refusal(e), IntroductionError::WrongRecipient);
        assert_eq!(
            raw_accept(&mallory, &t.carol.vat_id(), &stolen).await,
            HandoffError::WrongRecipient
        );

        // Mallory's attempts did not use it up: Alice redeems it, once.
        let office: office_capnp::Client = t.alice.redeem(&intro).await.unwrap();
        assert_eq!(whoami(&office).await.unwrap(), t.alice.vat_id().to_string());
        let e = t.alice.redeem::<office_capnp::Client>(&intro).await.fails();
        assert_eq!(refusal(e), IntroductionError::Replayed);
        assert_eq!(
            raw_accept(&mallory, &t.carol.vat_id(), &stolen).await,
            HandoffError::WrongRecipient
        );
    })
    .await;
}

/// `intro`'s encoding with its signed expiry moved by one second.
fn tampered(intro: &Introduction) -> Introduction {
    let bytes = intro.encode();
    let reader = capnp::serialize::read_message(&mut &bytes[..], Default::default()).unwrap();
    let mut message = capnp::message::Builder::new_default();
    message
        .set_root(reader.get_root::<third_party_to_contact::Reader>().unwrap())
        .unwrap();
    let mut signed = message
        .get_root::<third_party_to_contact::Builder>()
        .unwrap()
        .get_introduction()
        .unwrap();
    signed.set_expires_at(signed.reborrow_as_reader().get_expires_at() + 1);
    Introduction::decode(&capnp::serialize::write_message_to_words(&message)).unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn tampered_wrongly_signed_and_expired_introductions_are_refused() {
    local(async {
        let t = three(Default::default()).await;
        let mallory = Identity::generate();
        let carol = t.carol.vat_id();
        let intro = t.bob_introduces_carol_to_alice().await;

        // Refused by Alice's own network, and by Carol when presented anyway.
        let refused = |intro: Introduction| {
            let (alice, carol) = (t.alice.clone(), carol);
            async move {
                let local = refusal(alice.redeem::<office_capnp::Client>(&intro).await.fails());
                (local, raw_accept(&alice, &carol, &intro).await)
            }
        };
        let (local, remote) = refused(tampered(&intro)).await;
        assert!(matches!(local, IntroductionError::BadSignature(_)));
        assert_eq!(remote, HandoffError::BadSignature);

        // Bob's introduction with Mallory's signature over the same bytes.
        let forged = {
            let mut bytes = intro.encode();
            let genuine = intro.signature();
            let fake = mallory.sign(&intro.signed_message());
            let at = bytes
                .windows(64)
                .position(|w| w == genuine)
                .expect("the signature is in the encoding");
            bytes[at..at + 64].copy_from_slice(&fake);
            Introduction::decode(&bytes).unwrap()
        };
        let (local, remote) = refused(forged).await;
        assert!(matches!(local, IntroductionError::BadSignature(_)));
        assert_eq!(remote, HandoffError::BadSignature);

        // Expired a minute ago: Carol refuses the request, and the introduction.
        let a_minute_ago = SystemTime::now() - Duration::from_secs(60);
        let request = ThirdPartyToAwait::new(t.alice.vat_id(), random_nonce(), a_minute_ago);
        let e = t.bob.provide(&t.at_carol, &carol, &request.unwrap()).await;
        assert_eq!(refusal(e.fails()), IntroductionError::Expired);
        let expired = t.unannounced(&Identity::generate(), a_minute_ago);
        assert_eq!(
            refused(expired).await,
            (IntroductionError::Expired, HandoffError::Expired)
        );

        // None of this touched the genuine introduction.
        let office: office_capnp::Client = t.alice.redeem(&intro).await.unwrap();
        assert_eq!(whoami(&office).await.unwrap(), t.alice.vat_id().to_string());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_redeem_that_arrives_before_the_request_waits_for_it() {
    local(async {
        let t = three(Default::default()).await;
        let bob_key = Identity::generate();
        // A Bob whose key we hold, so that we can sign before providing.
        let bob = vat_with(bob_key.clone(), "127.0.0.1:0", Default::default()).await;
        meet(&bob, &t.carol);
        let at_carol: office_capnp::Client = bob.connect(&t.carol.vat_id()).await.unwrap();
        let intro = t.unannounced(&bob_key, SystemTime::now() + Duration::from_secs(60));

        let alice = t.alice.clone();
        let early = intro.clone();
        let redeem =
            tokio::task::spawn_local(
                async move { alice.redeem::<office_capnp::Client>(&early).await },
            );
        // Wait until Carol holds Alice's redeem, then let Bob's request in.
        for _ in 0..500 {
            if t.carol.handoff_counts().1 == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            t.carol.handoff_counts().1,
            1,
            "Alice's redeem is waiting at Carol"
        );
        bob.provide(&at_carol, &t.carol.vat_id(), &intro.to_await())
            .await
            .unwrap();
        let office = redeem.await.unwrap().unwrap();
        assert_eq!(whoami(&office).await.unwrap(), t.alice.vat_id().to_string());
        assert_eq!(t.carol.handoff_counts().1, 0);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_that_never_comes_times_out_clearly() {
    local(async {
        let t = three(short_wait(300)).await;
        let in_a_minute = SystemTime::now() + Duration::from_secs(60);
        let never_sent = t.unannounced(&Identity::generate(), in_a_minute);
        let e = t
            .alice
            .redeem::<office_capnp::Client>(&never_sent)
            .await
            .fails();
        assert!(
            e.to_string().contains("did not reach the provider in time"),
            "{e}"
        );
        assert_eq!(refusal(e), IntroductionError::Timeout);
        assert_eq!(t.carol.handoff_counts().1, 0, "the waiter is gone");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn withdrawn_introductions_and_restarted_providers_are_clear_errors() {
    local(async {
        let carol_key = Identity::generate();
        let carol = vat_with(carol_key.clone(), "127.0.0.1:0", short_wait(300)).await;
        let (alice, bob) = (vat(Default::default()).await, vat(Default::default()).await);
        meet(&bob, &carol);
        let at_carol: office_capnp::Client = bob.connect(&carol.vat_id()).await.unwrap();

        let withdrawn = bob
            .introduce(&at_carol, &carol.vat_id(), &alice.vat_id())
            .await
            .unwrap();
        bob.withdraw(&carol.vat_id(), withdrawn.nonce())
            .await
            .unwrap();
        let e = alice
            .redeem::<office_capnp::Client>(&withdrawn)
            .await
            .fails();
        assert_eq!(refusal(e), IntroductionError::Revoked);

        // Carol restarts (same key, same address) and forgets the handoff.
        let intro = bob
            .introduce(&at_carol, &carol.vat_id(), &alice.vat_id())
            .await
            .unwrap();
        let addr = carol.local_addr().unwrap().to_string();
        carol.shutdown().await;
        let carol = vat_with(carol_key, &addr, short_wait(300)).await;
        let e = alice.redeem::<office_capnp::Client>(&intro).await.fails();
        assert_eq!(refusal(e), IntroductionError::Timeout);
        assert_eq!(alice.connections()[0].peer.vat_id, carol.vat_id());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_provider_hands_off_only_what_it_hosts() {
    local(async {
        let t = three(Default::default()).await;
        let carol = t.carol.vat_id();
        let request = |n| {
            ThirdPartyToAwait::new(
                t.alice.vat_id(),
                n,
                SystemTime::now() + Duration::from_secs(60),
            )
            .unwrap()
        };
        // Bob's own object: Carol would relay it.
        let bobs: office_capnp::Client = capnp_rpc::new_client(Office {
            caller: t.bob.vat_id(),
        });
        let e = t
            .bob
            .provide(&bobs, &carol, &request(random_nonce()))
            .await
            .fails();
        assert_eq!(refusal(e), IntroductionError::NotHosted);
        // Carol's network service for Bob: it speaks for Bob's connection.
        let root = t.bob.root(&carol).await.unwrap();
        let e = t
            .bob
            .provide(&root, &carol, &request(random_nonce()))
            .await
            .fails();
        assert_eq!(refusal(e), IntroductionError::NotHosted);
        // A nonce used once cannot be provided again.
        let nonce = random_nonce();
        t.bob
            .provide(&t.at_carol, &carol, &request(nonce))
            .await
            .unwrap();
        let e = t
            .bob
            .provide(&t.at_carol, &carol, &request(nonce))
            .await
            .fails();
        assert_eq!(refusal(e), IntroductionError::Replayed);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_introduction_says_why_once() {
    local(async {
        let mut options = NetworkConfig::default();
        options.handoff.max_entries_per_introducer = 1;
        let t = three(options).await;
        let (carol, alice) = (t.carol.vat_id(), t.alice.vat_id());
        t.bob.introduce(&t.at_carol, &carol, &alice).await.unwrap();
        let e = t.bob.introduce(&t.at_carol, &carol, &alice).await.fails();
        let text = e.to_string();
        assert_eq!(text.matches("introduction refused").count(), 1, "{text}");
        assert_eq!(text.matches("limit reached").count(), 1, "{text}");
        assert!(text.contains("from one introducer"), "which limit: {text}");
        assert!(matches!(refusal(e), IntroductionError::Limit(_)));
    })
    .await;
}

/// Polls `f` every 5 ms for up to 5 s.
async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f()
}

#[tokio::test(flavor = "current_thread")]
async fn crossed_dials_end_with_one_connection_and_no_failed_call() {
    local(async {
        for round in 0..40 {
            let (a, b) = (vat(Default::default()).await, vat(Default::default()).await);
            meet(&a, &b);
            meet(&b, &a);
            // Exactly at once in most rounds; in some, one side starts a
            // little later, while the other's connection is half set up.
            let stagger = Duration::from_micros([0, 0, 200, 1000, 3000][round % 5]);
            let call = |from: Network, to: VatId, delay: Duration| async move {
                // No sleep at all for "at once": even a zero sleep may wait
                // for the next timer tick, long enough on loopback for the
                // first vat's connection to be accepted before the second
                // vat dials (then there is no crossing to decide).
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let office: office_capnp::Client = from.connect(&to).await?;
                // Calls made at once, while the pair may still be deciding.
                let (x, y) = futures::join!(whoami(&office), whoami(&office));
                Ok::<_, Box<dyn std::error::Error>>((x?, y?))
            };
            let (ab, ba) = futures::join!(
                call(a.clone(), b.vat_id(), Duration::ZERO),
                call(b.clone(), a.vat_id(), stagger)
            );
            let (ab, ba) = (ab.unwrap(), ba.unwrap());
            assert_eq!(
                ab,
                (a.vat_id().to_string(), a.vat_id().to_string()),
                "round {round}"
            );
            assert_eq!(
                ba,
                (b.vat_id().to_string(), b.vat_id().to_string()),
                "round {round}"
            );
            // Both sides use the same, single connection.
            let (ca, cb) = (a.connections(), b.connections());
            assert_eq!((ca.len(), cb.len()), (1, 1), "round {round}");
            assert_eq!(
                ca[0].peer.handshake_hash, cb[0].peer.handshake_hash,
                "round {round}"
            );
            assert_ne!(ca[0].initiated_locally, cb[0].initiated_locally);
            if stagger.is_zero() {
                // Both dialed at once, so the lower VatId's connection is kept.
                let lower = if a.vat_id() < b.vat_id() {
                    &ca[0]
                } else {
                    &cb[0]
                };
                assert!(lower.initiated_locally, "round {round}");
            }
            assert!(
                eventually(|| a.open_connections_with(&b.vat_id()) == 1
                    && b.open_connections_with(&a.vat_id()) == 1)
                .await,
                "round {round}: the losing connection is closed"
            );
            a.shutdown().await;
            b.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_dropped_connection_is_reopened_when_next_needed() {
    local(async {
        let (a, b) = (vat(Default::default()).await, vat(Default::default()).await);
        meet(&a, &b);
        let first: office_capnp::Client = a.connect(&b.vat_id()).await.unwrap();
        assert_eq!(whoami(&first).await.unwrap(), a.vat_id().to_string());
        let before = a.connections()[0].peer.handshake_hash;

        assert!(b.disconnect(&a.vat_id()));
        assert!(eventually(|| a.connections().is_empty()).await);
        assert!(
            whoami(&first).await.is_err(),
            "capabilities of the old connection break"
        );

        let again: office_capnp::Client = a.connect(&b.vat_id()).await.unwrap();
        assert_eq!(whoami(&again).await.unwrap(), a.vat_id().to_string());
        assert_ne!(a.connections()[0].peer.handshake_hash, before);
        // And the other way round, over the same connection.
        let back: office_capnp::Client = b.connect(&a.vat_id()).await.unwrap();
        assert_eq!(whoami(&back).await.unwrap(), b.vat_id().to_string());
        assert_eq!(a.connections().len(), 1);
        assert_eq!(b.connections().len(), 1);
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn idle_connections_are_closed_and_reopened() {
    local(async {
        let mut options = NetworkConfig::default();
        options.idle_timeout = Some(Duration::from_millis(100));
        let (a, b) = (vat(options).await, vat(Default::default()).await);
        meet(&a, &b);
        let office: office_capnp::Client = a.connect(&b.vat_id()).await.unwrap();
        assert_eq!(whoami(&office).await.unwrap(), a.vat_id().to_string());
        assert!(eventually(|| a.connections().is_empty() && b.connections().is_empty()).await);
        let office: office_capnp::Client = a.connect(&b.vat_id()).await.unwrap();
        assert_eq!(whoami(&office).await.unwrap(), a.vat_id().to_string());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_vat_that_refuses_the_dialer_is_a_clear_error() {
    local(async {
        // The dialer must have the higher VatId: it then waits for the
        // peer's answer to `hello` before handing the connection out.
        let (x, y) = (Identity::generate(), Identity::generate());
        let (high, low) = if x.vat_id() > y.vat_id() {
            (x, y)
        } else {
            (y, x)
        };
        let someone_else = Identity::generate().vat_id();
        let refuser = Network::builder(low)
            .listen("127.0.0.1:0".parse().unwrap())
            .policy(Arc::new(Pinned(someone_else)))
            .start()
            .await
            .unwrap();
        let dialer = vat_with(high, "127.0.0.1:0", Default::default()).await;
        meet(&dialer, &refuser);
        let e = dialer
            .connect::<office_capnp::Client>(&refuser.vat_id())
            .await
            .fails();
        assert!(
            matches!(&e, Error::ClosedByPeer { vat, .. } if *vat == refuser.vat_id()),
            "{e:?}"
        );
        assert!(e.to_string().contains("may have refused this vat"), "{e}");
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn connect_errors_are_clear() {
    local(async {
        let (a, b) = (vat(Default::default()).await, vat(Default::default()).await);
        let e = a.connect::<office_capnp::Client>(&b.vat_id()).await.fails();
        assert!(
            matches!(e, Error::NoAddress { vat } if vat == b.vat_id()),
            "{e:?}"
        );
        assert!(e.to_string().contains("no address is known"), "{e}");
        // An address where another vat answers: refused before revealing `a`.
        let c = vat(Default::default()).await;
        a.add_addresses(b.vat_id(), c.advertised_addresses());
        let e = a.connect::<office_capnp::Client>(&b.vat_id()).await.fails();
        assert!(matches!(e, Error::PeerRefused { .. }), "{e:?}");
        let e = a.connect::<office_capnp::Client>(&a.vat_id()).await.fails();
        assert!(matches!(e, Error::Misuse(_)), "{e:?}");
        // At its connection limit, a vat dials no more.
        let mut one = NetworkConfig::default();
        one.max_connections = 1;
        let d = vat(one).await;
        meet(&d, &b);
        meet(&d, &c);
        let _office: office_capnp::Client = d.connect(&b.vat_id()).await.unwrap();
        let e = d.connect::<office_capnp::Client>(&c.vat_id()).await.fails();
        assert!(matches!(e, Error::ConnectionLimit { max: 1 }), "{e:?}");
        a.shutdown().await;
        let e = a.connect::<office_capnp::Client>(&b.vat_id()).await.fails();
        assert!(matches!(e, Error::ShutDown), "{e:?}");
        assert_eq!(
            std::io::Error::from(e).kind(),
            std::io::ErrorKind::NotConnected
        );
    })
    .await;
}

/// SPEC.md 2: a vat whose suites prefer AES-GCM reaches a vat that accepts
/// only the mandatory suite, by the one retry, and its connection says
/// which suite went unanswered; the other end sees a plain connection.
#[tokio::test]
async fn a_vat_falls_back_to_the_mandatory_suite_of_a_vat_that_takes_only_it() {
    use capnp_noise::wire::{HandshakeConfig, Suite};
    local(async {
        let mut prefers_aes = NetworkConfig::default();
        prefers_aes.handshake = HandshakeConfig::default()
            .with_suites(vec![Suite::AesGcmSha256, Suite::ChaChaPolyBlake2s]);
        let mut chacha_only = NetworkConfig::default();
        chacha_only.handshake = HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s);
        let (a, b) = (vat(prefers_aes).await, vat(chacha_only).await);
        meet(&a, &b);
        let office: office_capnp::Client = a.connect(&b.vat_id()).await.unwrap();
        assert_eq!(whoami(&office).await.unwrap(), a.vat_id().to_string());
        let [conn] = &a.connections()[..] else {
            panic!("one connection: {:?}", a.connections())
        };
        assert_eq!(conn.peer.suite, Suite::ChaChaPolyBlake2s);
        assert_eq!(conn.peer.unanswered_suite, Some(Suite::AesGcmSha256));
        let [theirs] = &b.connections()[..] else {
            panic!("one connection: {:?}", b.connections())
        };
        assert_eq!(theirs.peer.unanswered_suite, None);
        a.shutdown().await;
        b.shutdown().await;
    })
    .await;
}
