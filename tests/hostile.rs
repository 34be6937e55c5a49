//! Hostile vats against a provider, on real loopback connections (issue 15):
//! each test runs one attack at full speed from an authenticated vat and
//! checks that honest vats are still served, and that what the attacker
//! can hold stays within its own share.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use capnp_noise::intro::{random_nonce, Introduction};
use capnp_noise::network::{Network, NetworkConfig};
use capnp_noise::rpc::PeerInfo;
use capnp_noise::{Error, Identity, IntroductionError};
use capnp_noise_test::hostile::RawVat;
use capnp_noise_test::schema::demo_capnp::office;
use capnp_noise_test::support::{bounded, local, whoami};

/// Generous: these tests run on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// A vat serving each peer an `Office` bound to the peer's VatId, and each
/// redeemer of one its own.
async fn vat_with(identity: Identity, options: NetworkConfig) -> Network {
    capnp_noise_test::office::office_vat(identity, "127.0.0.1:0", options).await
}

async fn vat(options: NetworkConfig) -> Network {
    vat_with(Identity::generate(), options).await
}

/// Tells `a` where `b` listens.
fn meet(a: &Network, b: &Network) {
    a.add_addresses(b.vat_id(), b.advertised_addresses());
}

/// An introduction of something at `provider` to `recipient`, signed by
/// `introducer` and never provided.
fn unannounced(introducer: &Identity, provider: &Network, recipient: &Network) -> Introduction {
    Introduction::new(
        introducer,
        provider.vat_id(),
        provider.advertised_addresses().to_vec(),
        recipient.vat_id(),
        random_nonce(),
        SystemTime::now() + Duration::from_secs(300),
    )
    .unwrap()
}

fn refusal<T>(r: Result<T, Error>) -> IntroductionError {
    match r {
        Ok(_) => panic!("expected a refusal"),
        Err(Error::Introduction(e)) => e,
        Err(other) => panic!("expected an introduction refusal, got {other:?}"),
    }
}

/// Polls `f` until it holds (bounded by [`PATIENCE`]).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    bounded(what, PATIENCE, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
}

/// Withdrawals of nonces Carol never saw used to fill her handoff table for
/// every introducer (each was kept for an hour, checked only against the
/// table's total): now they are charged to the withdrawing vat's own share.
#[tokio::test(flavor = "current_thread")]
async fn withdrawals_of_unknown_nonces_do_not_fill_the_table_for_others() {
    local(async {
        let mut options = NetworkConfig::default();
        options.handoff.max_entries = 64;
        options.handoff.max_entries_per_introducer = 16;
        let carol = vat(options).await;
        let (mallory, bob, alice) = (
            vat(Default::default()).await,
            vat(Default::default()).await,
            vat(Default::default()).await,
        );
        meet(&mallory, &carol);
        for _ in 0..200 {
            mallory
                .withdraw(&carol.vat_id(), &random_nonce())
                .await
                .unwrap();
        }

        meet(&bob, &carol);
        let at_carol: office::Client = bob.connect(&carol.vat_id()).await.unwrap();
        let intro = bob
            .introduce(&at_carol, &carol.vat_id(), &alice.vat_id())
            .await
            .expect("Bob's provide is not refused for Mallory's withdrawals");
        let office: office::Client = alice.redeem(&intro).await.unwrap();
        assert_eq!(whoami(&office).await.unwrap(), alice.vat_id().to_string());
        // Mallory's 16, Bob's redemption record.
        assert_eq!(carol.handoff_counts().0, 17, "Mallory's own share, no more");
    })
    .await;
}

/// Self-signed introductions that are never provided used to fill the
/// waiting-redeem pool (any vat can be an introducer and a redeemer): one
/// introducer's introductions now wait at most `max_waiters_per_introducer`
/// at once, so an honest early redeem still finds room.
#[tokio::test(flavor = "current_thread")]
async fn one_introducer_cannot_fill_the_waiting_redeems() {
    local(async {
        let mut options = NetworkConfig::default();
        options.handoff.max_waiters = 12;
        options.handoff.max_waiters_per_redeemer = 4;
        options.handoff.max_waiters_per_introducer = 8;
        let carol = vat(options).await;
        // Mallory signs as one introducer and redeems as three vats.
        let mallory = Identity::generate();
        let refused = Rc::new(Cell::new(0));
        let mut redeemers = Vec::new();
        for _ in 0..3 {
            let redeemer = vat(Default::default()).await;
            for _ in 0..4 {
                let intro = unannounced(&mallory, &carol, &redeemer);
                let (redeemer, refused) = (redeemer.clone(), refused.clone());
                tokio::task::spawn_local(async move {
                    let r = redeemer.redeem::<office::Client>(&intro).await;
                    if let Err(Error::Introduction(IntroductionError::Limit(_))) = r {
                        refused.set(refused.get() + 1);
                    }
                });
            }
            redeemers.push(redeemer);
        }
        eventually("Mallory's 12 redeems are answered or waiting", || {
            carol.handoff_counts().1 + refused.get() == 12
        })
        .await;
        assert_eq!(carol.handoff_counts().1, 8, "one introducer's share");

        // Alice's redeem arrives before Bob's request, and waits for it.
        let bob_key = Identity::generate();
        let (bob, alice) = (
            vat_with(bob_key.clone(), Default::default()).await,
            vat(Default::default()).await,
        );
        meet(&bob, &carol);
        let at_carol: office::Client = bob.connect(&carol.vat_id()).await.unwrap();
        let intro = unannounced(&bob_key, &carol, &alice);
        let early = {
            let (alice, intro) = (alice.clone(), intro.clone());
            tokio::task::spawn_local(async move { alice.redeem::<office::Client>(&intro).await })
        };
        eventually("Alice's redeem waits, or fails", || {
            carol.handoff_counts().1 == 9 || early.is_finished()
        })
        .await;
        bob.provide(&at_carol, &carol.vat_id(), &intro.to_await())
            .await
            .unwrap();
        let office = bounded("Alice's redeem", PATIENCE, early)
            .await
            .unwrap()
            .expect("Alice's early redeem found room to wait");
        assert_eq!(whoami(&office).await.unwrap(), alice.vat_id().to_string());
        carol.shutdown().await;
    })
    .await;
}

/// A redeem that waited for a request that never came used to leave no
/// record, so the same introduction could be presented again every
/// `max_wait`, forever: now it is refused at once until it expires.
#[tokio::test(flavor = "current_thread")]
async fn a_timed_out_introduction_does_not_wait_again() {
    local(async {
        let mut options = NetworkConfig::default();
        options.handoff.max_wait = Duration::from_millis(500);
        let carol = vat(options).await;
        let alice = vat(Default::default()).await;
        let intro = unannounced(&Identity::generate(), &carol, &alice);
        let first = alice.redeem::<office::Client>(&intro).await;
        assert_eq!(refusal(first), IntroductionError::Timeout);

        let again = {
            let (alice, intro) = (alice.clone(), intro.clone());
            tokio::task::spawn_local(async move { alice.redeem::<office::Client>(&intro).await })
        };
        let mut waited = false;
        while !again.is_finished() {
            waited |= carol.handoff_counts().1 > 0;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(refusal(again.await.unwrap()), IntroductionError::Timeout);
        assert!(!waited, "the second presentation was kept waiting");
    })
    .await;
}

/// A policy that counts how often it is asked, and accepts.
#[derive(Default)]
struct Counting(std::sync::atomic::AtomicUsize);

impl capnp_noise::PeerPolicy for Counting {
    fn check(
        &self,
        _: &capnp_noise::VatId,
        _: &capnp_noise::PeerContext,
    ) -> Result<(), capnp_noise::policy::Refusal> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Both ends of a loopback handshake of `identity` with itself (a man in
/// the middle reflecting a vat's dial back to its own listener), with
/// `config`; and how often their policies were asked.
async fn reflect(
    identity: &Identity,
    config: capnp_noise::wire::HandshakeConfig,
) -> (
    Result<capnp_noise::VatId, Error>,
    Result<capnp_noise::VatId, Error>,
    usize,
) {
    use capnp_noise::stream::{self, StreamConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let policy = std::sync::Arc::new(Counting::default());
    let config = StreamConfig::default().with_handshake(config);
    let server = {
        let (identity, policy, config) = (identity.clone(), policy.clone(), config.clone());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            stream::accept(tcp, &identity, policy, config)
                .await
                .map(|s| s.peer_vat_id())
        })
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let client = stream::connect(tcp, identity, policy.clone(), config)
        .await
        .map(|s| s.peer_vat_id());
    let client_vat = client.clone();
    // The refusing initiator hangs up; drop its stream before waiting.
    let server = bounded("the responder", PATIENCE, server).await.unwrap();
    let asked = policy.0.load(std::sync::atomic::Ordering::Relaxed);
    (client_vat, server, asked)
}

/// A handshake whose peer proves this side's own VatId is refused by
/// default, at both ends, before the policy is asked (a TOFU policy would
/// otherwise record the vat's own key); an explicit opt-in allows it.
#[tokio::test(flavor = "current_thread")]
async fn a_reflected_handshake_is_refused_before_the_policy_sees_it() {
    let me = Identity::generate();
    let (client, server, asked) = reflect(&me, Default::default()).await;
    match client {
        Err(Error::PeerRefused { vat_id, reason }) => {
            assert_eq!(vat_id, me.vat_id());
            assert!(reason.contains("reflected"), "{reason}");
        }
        other => panic!("the initiator accepted itself: {other:?}"),
    }
    assert!(
        server.is_err(),
        "the responder accepted a reflected handshake"
    );
    assert_eq!(asked, 0, "the policy was asked about the vat itself");

    let allowed = capnp_noise::wire::HandshakeConfig::default().with_allow_self(true);
    let (client, server, asked) = reflect(&me, allowed).await;
    assert_eq!(client.unwrap(), me.vat_id());
    assert_eq!(server.unwrap(), me.vat_id());
    assert_eq!(asked, 2);
}

/// A receive buffer in which frames were decrypted in place (the reader's
/// buffer was smaller than a frame) goes back to the thread's pool of
/// spares when the stream goes idle, and the next session to grow a buffer,
/// possibly another peer's, takes it: it must not hold this one's plaintext.
#[tokio::test(flavor = "current_thread")]
async fn released_receive_buffers_hold_no_plaintext() {
    use capnp_noise::stream::{self, StreamConfig};
    use capnp_noise::AnyVat;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SECRET: &[u8] = b"another peer's plaintext, ";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (server_id, client_id) = (Identity::generate(), Identity::generate());
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        stream::accept(
            tcp,
            &server_id,
            std::sync::Arc::new(AnyVat),
            StreamConfig::default(),
        )
        .await
        .unwrap()
    };
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream::connect(
            tcp,
            &client_id,
            std::sync::Arc::new(AnyVat),
            StreamConfig::default(),
        )
        .await
        .unwrap()
    };
    let (mut reader, mut writer) = tokio::join!(accept, connect);
    let secret: Vec<u8> = SECRET.iter().copied().cycle().take(60_000).collect();
    let send = async {
        writer.write_all(&secret).await.unwrap();
        writer.flush().await.unwrap();
    };
    let receive = async {
        let mut got = Vec::new();
        let mut small = [0u8; 512];
        while got.len() < secret.len() {
            let n = reader.read(&mut small).await.unwrap();
            got.extend_from_slice(&small[..n]);
        }
        got
    };
    let ((), got) = tokio::join!(send, receive);
    assert_eq!(got, secret);
    reader.shrink_buffers();
    writer.shrink_buffers();
    assert!(
        !capnp_noise::wire::spare_buffers_hold(SECRET),
        "a spare buffer holds the plaintext of a released session"
    );
}

/// A provider that refuses every redeem with a reason written to forge log
/// lines and recolour a terminal.
struct LyingProvider;

/// The reason [`LyingProvider`] gives: a fake log line, a terminal escape,
/// a direction override, and 500 more characters.
fn lying_reason() -> String {
    format!(
        "no\n2026-12-07T02:00:00Z INFO capnp_noise: introduction redeemed\x1b[2J\u{202e}{}",
        "x".repeat(500)
    )
}

impl capnp_noise::schema::network_capnp::vat::Server for LyingProvider {
    async fn hello(
        self: capnp::capability::Rc<Self>,
        _: capnp_noise::schema::network_capnp::vat::HelloParams,
        _: capnp_noise::schema::network_capnp::vat::HelloResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }

    async fn accept(
        self: capnp::capability::Rc<Self>,
        _: capnp_noise::schema::network_capnp::vat::AcceptParams,
        mut results: capnp_noise::schema::network_capnp::vat::AcceptResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        r.set_error(capnp_noise::schema::network_capnp::HandoffError::Malformed);
        r.set_reason(lying_reason());
        Ok(())
    }
}

/// A provider's refusal reason is the peer's text: what reaches the
/// redeemer's error (and so its logs) is shortened and has its control
/// characters escaped.
#[tokio::test(flavor = "current_thread")]
async fn a_providers_reason_cannot_forge_log_lines() {
    local(async {
        let provider = Identity::generate();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::task::spawn_local(capnp_noise::rpc::serve(
            listener,
            provider.clone(),
            std::sync::Arc::new(capnp_noise::AnyVat),
            Default::default(),
            |_: &PeerInfo| {
                capnp_rpc::new_client::<capnp_noise::schema::network_capnp::vat::Client, _>(
                    LyingProvider,
                )
            },
        ));
        let alice = vat(Default::default()).await;
        let intro = Introduction::new(
            &Identity::generate(),
            provider.vat_id(),
            vec![addr.to_string().parse().unwrap()],
            alice.vat_id(),
            random_nonce(),
            SystemTime::now() + Duration::from_secs(300),
        )
        .unwrap();
        let e = alice.redeem::<office::Client>(&intro).await;
        let IntroductionError::Malformed(reason) = refusal(e) else {
            panic!("expected the provider's Malformed");
        };
        assert!(reason.starts_with("no\\n2026"), "{reason}");
        assert!(!reason.chars().any(|c| c.is_control()), "{reason:?}");
        assert!(!reason.contains('\u{202e}'), "{reason:?}");
        assert!(reason.contains("\\u{1b}[2J"), "{reason:?}");
        assert!(reason.ends_with("..."), "{reason:?}");
        assert!(
            reason.chars().count() < 250,
            "{} characters",
            reason.chars().count()
        );
    })
    .await;
}

/// Carol, listening with `max_connections = 32` (4 of them kept for her own
/// dials) and the given limits on unauthenticated connections; her
/// handshake timeout is long (30 s), so that only the limits under test
/// can free what an attacker holds.
async fn crowded_carol(per_source: usize, first_message: Duration, reserved: usize) -> Network {
    let mut o = NetworkConfig::default();
    o.max_connections = 32;
    o.reserved_for_dials = reserved;
    o.max_unauthenticated_per_source = per_source;
    o.first_message_timeout = first_message;
    o.handshake_timeout = Duration::from_secs(30);
    vat(o).await
}

/// `n` TCP connections to `to` that never send a byte, each from its own
/// loopback address 127.0.0.`first + i` (or all from 127.0.0.`first`).
async fn silent_sockets(
    to: std::net::SocketAddr,
    n: usize,
    first: u8,
    one_source: bool,
) -> Vec<tokio::net::TcpStream> {
    let mut sockets = Vec::new();
    for i in 0..n {
        let last = if one_source { first } else { first + i as u8 };
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))
            .unwrap();
        sockets.push(socket.connect(to).await.unwrap());
    }
    sockets
}

/// Connects `alice` to `carol` and checks who answers.
async fn reaches(alice: &Network, carol: &Network) {
    meet(alice, carol);
    let office: office::Client =
        bounded("Alice's connect", PATIENCE, alice.connect(&carol.vat_id()))
            .await
            .expect("an honest vat connects during the flood");
    assert_eq!(whoami(&office).await.unwrap(), alice.vat_id().to_string());
}

/// 96 silent sockets from one address used to hold every connection permit
/// of a vat for the whole handshake timeout: now one source holds at most
/// `max_unauthenticated_per_source` of them, and the rest are closed as
/// soon as they are accepted.
#[tokio::test(flavor = "current_thread")]
async fn one_address_cannot_hold_every_connection() {
    local(async {
        let carol = crowded_carol(8, Duration::from_secs(30), 4).await;
        let addr = carol.local_addr().unwrap();
        let _flood = silent_sockets(addr, 96, 2, true).await;
        reaches(&vat(Default::default()).await, &carol).await;
    })
    .await;
}

/// Silent sockets from many addresses are closed after the first-message
/// deadline, not the (here 30 s) handshake timeout.
#[tokio::test(flavor = "current_thread")]
async fn silent_connections_are_closed_at_the_first_message_deadline() {
    local(async {
        let carol = crowded_carol(64, Duration::from_millis(500), 4).await;
        let addr = carol.local_addr().unwrap();
        let _flood = silent_sockets(addr, 28, 2, false).await;
        reaches(&vat(Default::default()).await, &carol).await;
    })
    .await;
}

/// Incoming connections that hold every place open to them do not keep the
/// vat from dialing out: `reserved_for_dials` places are its own.
#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_incoming_connections_leaves_room_for_dials() {
    local(async {
        let carol = crowded_carol(64, Duration::from_secs(30), 4).await;
        let addr = carol.local_addr().unwrap();
        let _flood = silent_sockets(addr, 40, 2, false).await;
        let dave = vat(Default::default()).await;
        // Let Carol accept all she may: her 28 incoming places are taken.
        tokio::time::sleep(Duration::from_millis(200)).await;
        reaches(&carol, &dave).await;
    })
    .await;
}

/// A VatId higher than `than`'s.
fn higher_than(than: &Network) -> Identity {
    loop {
        let id = Identity::generate();
        if id.vat_id() > than.vat_id() {
            return id;
        }
    }
}

/// An authenticated vat that opens connections and never sends `hello`
/// used to hold a permit per connection for twice the connect timeout:
/// now such connections beyond `max_unsettled_per_vat` are closed at once.
#[tokio::test(flavor = "current_thread")]
async fn connections_that_never_say_hello_are_capped_per_vat() {
    local(async {
        let carol = crowded_carol(64, Duration::from_secs(30), 4).await;
        let mallory = higher_than(&carol);
        let mut held = Vec::new();
        for _ in 0..28 {
            held.push(RawVat::connect(&mallory, carol.vat_id(), carol.local_addr().unwrap()).await);
        }
        // Alice's connect (10 s) must not wait for Mallory's to be closed
        // for want of hello (20 s).
        reaches(&vat(Default::default()).await, &carol).await;
        assert!(carol.open_connections_with(&mallory.vat_id()) <= 2);
    })
    .await;
}

/// `n` loopback addresses where nothing listens (connections are refused).
async fn dead_addresses(n: usize) -> Vec<capnp_noise::sturdy::Address> {
    let mut dead = Vec::new();
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        dead.push(l.local_addr().unwrap().to_string().parse().unwrap());
    }
    dead
}

/// Any vat can sign an introduction naming any provider: Mallory's hints for
/// Dave used to fill Alice's 16 address slots for Dave, so that the genuine
/// address of a later introduction was dropped and every connect to Dave
/// tried Mallory's addresses. Now hints serve their own redeem only, and
/// one is kept only once a connection pinned to Dave succeeded through it.
#[tokio::test(flavor = "current_thread")]
async fn an_introducers_address_hints_do_not_poison_the_address_book() {
    local(async {
        let (alice, dave) = (vat(Default::default()).await, vat(Default::default()).await);
        let mallory = Identity::generate();
        let poisoned = Introduction::new(
            &mallory,
            dave.vat_id(),
            dead_addresses(16).await,
            alice.vat_id(),
            random_nonce(),
            SystemTime::now() + Duration::from_secs(300),
        )
        .unwrap();
        let r = bounded(
            "the poisoned redeem",
            PATIENCE,
            alice.redeem::<office::Client>(&poisoned),
        )
        .await;
        assert!(r.is_err(), "nothing answers at Mallory's addresses");
        assert!(
            alice.addresses(&dave.vat_id()).is_empty(),
            "hints that failed are not kept"
        );

        // Bob genuinely introduces his Office at Dave to Alice.
        let bob = vat(Default::default()).await;
        meet(&bob, &dave);
        let at_dave: office::Client = bob.connect(&dave.vat_id()).await.unwrap();
        let intro = bob
            .introduce(&at_dave, &dave.vat_id(), &alice.vat_id())
            .await
            .unwrap();
        let office: office::Client = bounded("the genuine redeem", PATIENCE, alice.redeem(&intro))
            .await
            .expect("the genuine address is tried");
        assert_eq!(whoami(&office).await.unwrap(), alice.vat_id().to_string());
        assert_eq!(
            alice.addresses(&dave.vat_id()),
            dave.advertised_addresses(),
            "learned once it worked"
        );
    })
    .await;
}

/// The per-peer bootstrap object captures its caller's VatId, as the docs
/// recommend: introduced as it is, it would answer Alice as Bob, even
/// after Bob is gone. A provider without a hook that builds each redeemer
/// its own now hands off nothing.
#[tokio::test(flavor = "current_thread")]
async fn an_object_bound_to_its_caller_is_not_handed_to_another() {
    local(async {
        let carol = Network::builder(Identity::generate())
            .listen("127.0.0.1:0".parse().unwrap())
            .bootstrap(|peer: &PeerInfo| {
                capnp_rpc::new_client::<office::Client, _>(capnp_noise_test::office::Office {
                    caller: peer.vat_id,
                })
            })
            .start()
            .await
            .unwrap();
        let (alice, bob) = (vat(Default::default()).await, vat(Default::default()).await);
        meet(&bob, &carol);
        let at_carol: office::Client = bob.connect(&carol.vat_id()).await.unwrap();
        assert_eq!(whoami(&at_carol).await.unwrap(), bob.vat_id().to_string());
        let introduced = bob
            .introduce(&at_carol, &carol.vat_id(), &alice.vat_id())
            .await;
        match introduced {
            Err(Error::Introduction(IntroductionError::NotHosted)) => {}
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(intro) => {
                let office: office::Client = alice.redeem(&intro).await.unwrap();
                panic!(
                    "Alice got Bob's Office: it answers her as {}",
                    whoami(&office).await.unwrap()
                );
            }
        }
        assert_eq!(carol.handoff_counts(), (0, 0));
    })
    .await;
}
