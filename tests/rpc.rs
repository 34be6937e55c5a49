//! Cap'n Proto RPC over capnp-noise on real loopback TCP: calls, pipelining,
//! large messages, capabilities both ways, many clients, refusals, and
//! misbehaving clients.

use capnp_noise_test::office;

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capnp::capability::Rc as CapRc;
use capnp::message::ReaderOptions;
use capnp_noise::rpc::{self, ClientConfig, PeerInfo, ServerConfig};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::{AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, Refusal, VatId};
use capnp_noise_test::schema::demo_capnp::{callback, office as office_capnp};
use capnp_noise_test::support::{local, whoami};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running server: its address and identity, and the VatIds its
/// bootstrap factory was called with.
struct TestServer {
    addr: SocketAddr,
    id: Identity,
    seen: Rc<RefCell<Vec<VatId>>>,
}

async fn start(policy: Arc<dyn PeerPolicy>, options: ServerConfig) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let id = Identity::generate();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let record = seen.clone();
    tokio::task::spawn_local(rpc::serve(
        listener,
        id.clone(),
        policy,
        options,
        move |peer: &PeerInfo| {
            record.borrow_mut().push(peer.vat_id);
            office::Office::bootstrap(peer)
        },
    ));
    TestServer { addr, id, seen }
}

async fn client_of(
    server: &TestServer,
    me: &Identity,
    options: ClientConfig,
) -> Result<(office_capnp::Client, rpc::Connection), Error> {
    rpc::connect(
        server.addr,
        me,
        Arc::new(Pinned(server.id.vat_id())),
        options,
    )
    .await
}

/// A server accepting any vat, and one client connected to it.
async fn server_and_client(
    server_options: ServerConfig,
    client_options: ClientConfig,
) -> (TestServer, Identity, office_capnp::Client, rpc::Connection) {
    let server = start(Arc::new(AnyVat), server_options).await;
    let me = Identity::generate();
    let (office, conn) = client_of(&server, &me, client_options).await.unwrap();
    (server, me, office, conn)
}

async fn echo(office: &office_capnp::Client, data: &[u8]) -> Result<Vec<u8>, capnp::Error> {
    let mut req = office.echo_request();
    req.get().set_data(data);
    let reply = req.send().promise.await?;
    Ok(reply.get()?.get_data()?.to_vec())
}

/// Sends `subscribe(callback, count)` with a [`Collect`] callback.
fn subscribe(
    office: &office_capnp::Client,
    count: u32,
) -> (
    Rc<RefCell<Vec<String>>>,
    capnp::capability::RemotePromise<office_capnp::subscribe_results::Owned>,
) {
    let notes = Rc::new(RefCell::new(Vec::new()));
    let mut req = office.subscribe_request();
    req.get()
        .set_callback(capnp_rpc::new_client::<callback::Client, _>(Collect(
            notes.clone(),
        )));
    req.get().set_count(count);
    (notes, req.send())
}

/// A client-side callback that records what the server sends it.
struct Collect(Rc<RefCell<Vec<String>>>);

impl callback::Server for Collect {
    async fn notify(
        self: CapRc<Self>,
        params: callback::NotifyParams,
        _: callback::NotifyResults,
    ) -> Result<(), capnp::Error> {
        let msg = params.get()?.get_msg()?.to_string()?;
        self.0.borrow_mut().push(msg);
        Ok(())
    }
}

#[tokio::test]
async fn calls_callbacks_and_capabilities_both_ways() {
    local(async {
        let (server, me, office, conn) =
            server_and_client(ServerConfig::default(), ClientConfig::default()).await;
        assert_eq!(
            conn.peer().expect("connected without resuming").vat_id,
            server.id.vat_id()
        );
        assert_eq!(
            conn.peer().expect("connected without resuming").remote_addr,
            server.addr
        );

        // The service knows who calls.
        assert_eq!(whoami(&office).await.unwrap(), me.vat_id().to_string());
        assert_eq!(*server.seen.borrow(), vec![me.vat_id()]);
        assert_eq!(echo(&office, b"abc").await.unwrap(), b"abc");

        // A capability to the server (the callback), one back (the subscription).
        let (notes, pending) = subscribe(&office, 3);
        let reply = pending.promise.await.unwrap();
        assert_eq!(
            notes.borrow().len(),
            3,
            "the server called back before answering"
        );
        assert!(notes.borrow()[2].contains(&me.vat_id().fingerprint()));
        let sub = reply.get().unwrap().get_subscription().unwrap();
        let r = sub.delivered_request().send().promise.await.unwrap();
        let r = r.get().unwrap();
        assert_eq!(r.get_count(), 3);
        assert_eq!(
            r.get_subscriber().unwrap().to_str().unwrap(),
            me.vat_id().to_string()
        );

        conn.disconnect().await.unwrap();
        // After disconnecting, calls fail instead of hanging.
        assert!(whoami(&office).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn hundreds_of_pipelined_calls_in_flight() {
    local(async {
        let (_, _, office, conn) =
            server_and_client(ServerConfig::default(), ClientConfig::default()).await;
        // 500 calls sent before any answer is awaited.
        let calls: Vec<_> = (0..500u32)
            .map(|i| {
                let mut req = office.echo_request();
                req.get().set_data(&i.to_le_bytes());
                req.send().promise
            })
            .collect();
        let replies = futures::future::join_all(calls).await;
        for (i, reply) in replies.into_iter().enumerate() {
            let reply = reply.unwrap();
            assert_eq!(
                reply.get().unwrap().get_data().unwrap(),
                (i as u32).to_le_bytes()
            );
        }
        // Promise pipelining: call the subscription before subscribe answered.
        let (notes, pending) = subscribe(&office, 2);
        let delivered = pending
            .pipeline
            .get_subscription()
            .delivered_request()
            .send()
            .promise;
        let r = delivered.await.unwrap();
        assert_eq!(r.get().unwrap().get_count(), 2);
        assert_eq!(notes.borrow().len(), 2);
        assert!(pending.promise.await.is_ok());
        conn.disconnect().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sixteen_mib_round_trip() {
    local(async {
        // 16 MiB of Data is 2 Mi words; the limit below is sized for it on
        // both ends (capnp's default, 8 Mi words, would also do).
        let limit = ReaderOptions {
            traversal_limit_in_words: Some(3 << 20),
            ..ReaderOptions::new()
        };
        let mut server_options = ServerConfig::default();
        server_options.reader_options = limit;
        let mut client_options = ClientConfig::default();
        client_options.reader_options = limit;
        let (_, me, office, conn) = server_and_client(server_options, client_options).await;
        let big: Vec<u8> = (0..16u32 << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
        let back = echo(&office, &big).await.unwrap();
        assert!(back == big, "16 MiB came back altered");
        conn.disconnect().await.unwrap();

        // A server whose limit is lower refuses the message, and keeps serving.
        let mut small = ServerConfig::default();
        small.reader_options.traversal_limit_in_words = Some(1 << 17); // 1 MiB
        let server = start(Arc::new(AnyVat), small).await;
        let (office, _conn) = client_of(&server, &me, ClientConfig::default())
            .await
            .unwrap();
        // The server's reader refuses it by its size and says so (a remote
        // exception naming the limit), not any failure.
        let e = echo(&office, &big[..4 << 20]).await.unwrap_err();
        assert_eq!(e.kind, capnp::ErrorKind::Failed, "{e}");
        assert!(
            e.extra.starts_with("remote exception: Message has")
                && e.extra.contains("words, which is too large"),
            "{e}"
        );
        let (office, conn) = client_of(&server, &me, ClientConfig::default())
            .await
            .unwrap();
        assert_eq!(echo(&office, &big[..1000]).await.unwrap(), &big[..1000]);
        conn.disconnect().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_hundred_concurrent_clients_each_seen_as_itself() {
    local(async {
        // All from 127.0.0.1: more at once than one source may have
        // handshaking by default.
        let mut options = ServerConfig::default();
        options.max_unauthenticated_per_source = 100;
        let server = start(Arc::new(AnyVat), options).await;
        let clients: Vec<Identity> = (0..100).map(|_| Identity::generate()).collect();
        let results = futures::future::join_all(clients.iter().map(|me| {
            let server = &server;
            async move {
                let (office, conn) = client_of(server, me, ClientConfig::default()).await?;
                let seen = whoami(&office)
                    .await
                    .map_err(|e| Error::Config(e.to_string()))?;
                conn.disconnect().await?;
                Ok::<_, Error>(seen)
            }
        }))
        .await;
        for (me, seen) in clients.iter().zip(results) {
            assert_eq!(seen.unwrap(), me.vat_id().to_string());
        }
        let distinct: HashSet<VatId> = server.seen.borrow().iter().copied().collect();
        assert_eq!(distinct.len(), 100);
    })
    .await;
}

/// Collects the `tracing` output of the current thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits (at most 5 s) until the logs contain `needle`.
    async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..500 {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no {needle:?} in the logs:\n{}", self.text());
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::Write::write(&mut *self.0.lock().unwrap(), buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn client_pinned_to_another_vat_is_refused_and_server_never_learns_who() {
    let logs = Logs::default();
    let _guard = logs.capture();
    local(async {
        let server = start(Arc::new(AnyVat), ServerConfig::default()).await;
        let me = Identity::generate();
        let expected = Identity::generate().vat_id();
        let result = rpc::connect::<_, office_capnp::Client>(
            server.addr,
            &me,
            Arc::new(Pinned(expected)),
            ClientConfig::default(),
        )
        .await;
        match &result.err().expect("an impostor was accepted") {
            Error::PeerRefused { vat_id, reason } => {
                assert_eq!(*vat_id, server.id.vat_id());
                assert!(reason.contains(&expected.to_string()), "{reason}");
            }
            e => panic!("unexpected error {e}"),
        }
        let text = logs.wait_for("handshake failed").await;
        assert!(text.contains("refused server"), "{text}");
        // The server only saw a handshake end early: no VatId, no bootstrap.
        assert!(server.seen.borrow().is_empty());
        assert!(!text.contains(&me.vat_id().fingerprint()), "{text}");
    })
    .await;
}

#[tokio::test]
async fn server_allow_list_refuses_others_with_clear_errors_on_both_sides() {
    let logs = Logs::default();
    let _guard = logs.capture();
    local(async {
        let allowed = Identity::generate();
        let stranger = Identity::generate();
        let list: HashSet<VatId> = [allowed.vat_id()].into();
        let policy = move |peer: &VatId, _: &PeerContext| {
            if list.contains(peer) {
                Ok(())
            } else {
                Err(Refusal::new("not on the allow list"))
            }
        };
        let server = start(Arc::new(policy), ServerConfig::default()).await;

        let (office, conn) = client_of(&server, &allowed, ClientConfig::default())
            .await
            .unwrap();
        assert_eq!(whoami(&office).await.unwrap(), allowed.vat_id().to_string());
        conn.disconnect().await.unwrap();

        // The stranger's handshake completes (XX authenticates the initiator
        // last), then the server hangs up: its first call says why that may be.
        let (office, _conn) = client_of(&server, &stranger, ClientConfig::default())
            .await
            .unwrap();
        let err = whoami(&office).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("may have refused this vat's identity"),
            "{err}"
        );

        let text = logs.wait_for("not on the allow list").await;
        let line = text
            .lines()
            .find(|l| l.contains("not on the allow list"))
            .unwrap();
        assert!(line.contains("refused"), "{line}");
        assert!(line.contains(&stranger.vat_id().fingerprint()), "{line}");
        assert_eq!(*server.seen.borrow(), vec![allowed.vat_id()]);
    })
    .await;
}

/// Runs a client on its own thread and runtime, makes a call that takes
/// long, and drops the runtime mid-call: the TCP connection is cut without
/// an authenticated close, as when a process dies.
async fn client_dies_mid_call(server: SocketAddr, pin: VatId) {
    let thread = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The call, the capability and the connection outlive the LocalSet
        // that ran the connection: nothing gets to say goodbye.
        let leftovers = rt.block_on(local(async move {
            let me = Identity::generate();
            let (office, conn): (office_capnp::Client, _) =
                rpc::connect(server, &me, Arc::new(Pinned(pin)), ClientConfig::default())
                    .await
                    .unwrap();
            let mut req = office.sleep_request();
            req.get().set_millis(60_000);
            let call = req.send().promise;
            tokio::time::sleep(Duration::from_millis(50)).await;
            (call, office, conn)
        }));
        drop(rt);
        drop(leftovers);
    });
    thread.await.unwrap();
}

#[tokio::test]
async fn misbehaving_clients_do_not_disturb_the_others() {
    let logs = Logs::default();
    let _guard = logs.capture();
    local(async {
        let mut options = ServerConfig::default();
        options.handshake_timeout = Duration::from_millis(500);
        let server = start(Arc::new(AnyVat), options).await;
        let good = Identity::generate();
        let (office, conn) = client_of(&server, &good, ClientConfig::default())
            .await
            .unwrap();
        let check = |step: &'static str| {
            let office = office.clone();
            let good = good.vat_id();
            async move {
                assert_eq!(
                    whoami(&office).await.expect(step),
                    good.to_string(),
                    "{step}"
                );
            }
        };
        check("before").await;

        // A call in flight on the good connection throughout.
        let mut req = office.sleep_request();
        req.get().set_millis(300);
        let long_call = req.send().promise;

        // Stalls its handshake: connects and says nothing.
        let _stalled = TcpStream::connect(server.addr).await.unwrap();
        // Stalls after the handshake, half-way through a frame.
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut half = stream::connect(
            tcp,
            &Identity::generate(),
            Arc::new(AnyVat),
            StreamConfig::default(),
        )
        .await
        .unwrap();
        half.get_mut().write_all(&[0x01, 0x00, 0xaa]).await.unwrap();
        check("with stalled peers").await;

        // Sends garbage.
        let mut garbage = TcpStream::connect(server.addr).await.unwrap();
        garbage.write_all(&[0xff; 300]).await.unwrap();
        // Fails its handshake (pins another server).
        let refused = rpc::connect::<_, office_capnp::Client>(
            server.addr,
            &Identity::generate(),
            Arc::new(Pinned(Identity::generate().vat_id())),
            ClientConfig::default(),
        )
        .await;
        assert!(matches!(refused, Err(Error::PeerRefused { .. })));
        check("after garbage and a failed handshake").await;

        // Dies in the middle of a call.
        client_dies_mid_call(server.addr, server.id.vat_id()).await;
        check("after a client died mid-call").await;

        long_call.await.expect("the call in flight completed");
        // New clients are still welcome.
        let other = Identity::generate();
        let (office2, conn2) = client_of(&server, &other, ClientConfig::default())
            .await
            .unwrap();
        assert_eq!(whoami(&office2).await.unwrap(), other.vat_id().to_string());
        conn2.disconnect().await.unwrap();

        // The server said what happened to each.
        let text = logs.wait_for("did not complete within").await;
        assert!(text.contains("capnp-noise preamble"), "{text}");
        assert!(text.contains("connection failed"), "{text}");
        check("at the end").await;
        conn.disconnect().await.unwrap();
    })
    .await;
}

/// A client that must be served: connects as `me` (waiting as long as the
/// default 10 s allow), checks that the server sees it as itself, and
/// returns the connection and when it was served.
async fn served(
    addr: SocketAddr,
    server: VatId,
    me: Identity,
) -> (office_capnp::Client, rpc::Connection, Instant) {
    let (office, conn) = rpc::connect(addr, &me, Arc::new(Pinned(server)), ClientConfig::default())
        .await
        .expect("served");
    assert_eq!(whoami(&office).await.unwrap(), me.vat_id().to_string());
    (office, conn, Instant::now())
}

#[tokio::test]
async fn connection_and_handshake_limits_hold_and_release() {
    local(async {
        // Every wait below ends by an event of the test (a peer hangs up, a
        // connection ends), never by a timeout: the server's admission wait
        // and handshake timeout (3 s) and the clients' (10 s) are far
        // longer than any of them needs. What proves that a client waited
        // is when it was served: never before the event that freed it, a
        // bound no load can break.
        let hold = Duration::from_millis(600);
        let mut options = ServerConfig::default();
        options.max_connections = 2;
        options.max_handshakes = 1;
        options.handshake_timeout = Duration::from_secs(3);
        options.handshake_failure_hold = hold;
        let server = start(Arc::new(AnyVat), options).await;
        let (addr, vat) = (server.addr, server.id.vat_id());
        // A silent peer costs the server nothing and holds no handshake
        // slot: a client gets through beside it, while the server still
        // waits for the silent one's preamble (accepted first: the
        // backlog is in order; closed only at its 3 s timeout).
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let (_office, beside, _) = served(addr, vat, Identity::generate()).await;
        let mut byte = [0u8; 1];
        assert!(
            futures::poll!(std::pin::pin!(silent.read(&mut byte))).is_pending(),
            "the silent peer's connection ended before a client got beside it"
        );
        beside.disconnect().await.unwrap();
        drop(silent);
        // A peer that sent a well-formed message 1 holds the only handshake
        // slot once the server answers it (message 2)...
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(&capnp_noise_test::fixtures::initiator_first_flight())
            .await
            .unwrap();
        let answered = stalled.read(&mut [0u8; 256]).await.unwrap();
        assert!(answered > 0, "no message 2 for the stalled peer");
        // ...so the next client waits: not served while it stalls...
        let waiting = tokio::task::spawn_local(served(addr, vat, Identity::generate()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "served while the only handshake slot was taken"
        );
        // ...nor when it hangs up (its failed handshake keeps the slot for
        // the failure hold), but then.
        let hung_up = Instant::now();
        drop(stalled);
        let (office_a, conn_a, at) = waiting.await.unwrap();
        assert!(
            at >= hung_up + hold,
            "served {:?} after the stalled peer hung up, within the failure hold ({hold:?})",
            at - hung_up
        );
        let (_office_b, conn_b, _) = served(addr, vat, Identity::generate()).await;
        // Two connections are the limit: a third is not served...
        let third = tokio::task::spawn_local(served(addr, vat, Identity::generate()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!third.is_finished(), "served beyond max_connections");
        // ...until one ends.
        drop(office_a);
        let ended = Instant::now();
        conn_a.disconnect().await.unwrap();
        let (_office_c, conn_c, at) = third.await.unwrap();
        assert!(at >= ended, "served before a connection ended");
        conn_b.disconnect().await.unwrap();
        conn_c.disconnect().await.unwrap();
    })
    .await;
}

/// SPEC.md 2 and 3: a server that accepts only the mandatory suite closes
/// silently on a client that proposes AES-GCM. A client that also accepts
/// the mandatory suite retries once with it, and says so; one that accepts
/// only AES-GCM reports the silent close (an EOF or a reset alike), and the
/// server saw exactly one attempt from each.
#[tokio::test]
async fn a_client_falls_back_to_the_mandatory_suite_once_and_reports_it() {
    use capnp_noise::wire::{HandshakeConfig, Suite, EOF_BEFORE_MESSAGE_2};
    local(async {
        let mut server_options = ServerConfig::default();
        server_options.handshake = HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s);
        let server = start(Arc::new(AnyVat), server_options).await;
        let me = Identity::generate();

        let mut preferring_aes = ClientConfig::default();
        preferring_aes.handshake = HandshakeConfig::default()
            .with_suites(vec![Suite::AesGcmSha256, Suite::ChaChaPolyBlake2s]);
        let (office, conn) = client_of(&server, &me, preferring_aes).await.unwrap();
        assert_eq!(
            conn.peer().expect("connected without resuming").suite,
            Suite::ChaChaPolyBlake2s
        );
        assert_eq!(
            conn.peer()
                .expect("connected without resuming")
                .unanswered_suite,
            Some(Suite::AesGcmSha256)
        );
        whoami(&office).await.unwrap();
        conn.disconnect().await.unwrap();

        let mut aes_only = ClientConfig::default();
        aes_only.handshake = HandshakeConfig::with_suite(Suite::AesGcmSha256);
        let err = client_of(&server, &me, aes_only).await.err().unwrap();
        assert!(
            matches!(&err, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2),
            "{err:?}"
        );

        // A client that proposes the mandatory suite first gets it at once.
        let mut preferring_chacha = ClientConfig::default();
        preferring_chacha.handshake = HandshakeConfig::default()
            .with_suites(vec![Suite::ChaChaPolyBlake2s, Suite::AesGcmSha256]);
        let (office, conn) = client_of(&server, &me, preferring_chacha).await.unwrap();
        assert_eq!(
            conn.peer()
                .expect("connected without resuming")
                .unanswered_suite,
            None
        );
        whoami(&office).await.unwrap();
        conn.disconnect().await.unwrap();
        assert_eq!(server.seen.borrow().len(), 2, "two handshakes completed");
    })
    .await;
}
