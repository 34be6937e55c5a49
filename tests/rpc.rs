//! Cap'n Proto RPC over capnp-noise on real loopback TCP: calls, pipelining,
//! large messages, capabilities both ways, many clients, refusals, and
//! misbehaving clients.

use capnp_noise_test::office;

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capnp::capability::Rc as CapRc;
use capnp::message::ReaderOptions;
use capnp_noise::rpc::{self, ClientOptions, PeerInfo, ServerOptions};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::{AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, Refusal, VatId};
use capnp_noise_test::schema::demo_capnp::{callback, office as office_capnp};
use capnp_noise_test::support::{local, whoami};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// A running server: its address and identity, and the VatIds its
/// bootstrap factory was called with.
struct TestServer {
    addr: SocketAddr,
    id: Identity,
    seen: Rc<RefCell<Vec<VatId>>>,
}

async fn start(policy: Arc<dyn PeerPolicy>, options: ServerOptions) -> TestServer {
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
    options: ClientOptions,
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
    server_options: ServerOptions,
    client_options: ClientOptions,
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
            server_and_client(ServerOptions::default(), ClientOptions::default()).await;
        assert_eq!(conn.peer().vat_id, server.id.vat_id());
        assert_eq!(conn.peer().remote_addr, server.addr);

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
            server_and_client(ServerOptions::default(), ClientOptions::default()).await;
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
        let mut server_options = ServerOptions::default();
        server_options.reader_options = limit;
        let mut client_options = ClientOptions::default();
        client_options.reader_options = limit;
        let (_, me, office, conn) = server_and_client(server_options, client_options).await;
        let big: Vec<u8> = (0..16u32 << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
        let back = echo(&office, &big).await.unwrap();
        assert!(back == big, "16 MiB came back altered");
        conn.disconnect().await.unwrap();

        // A server whose limit is lower refuses the message, and keeps serving.
        let mut small = ServerOptions::default();
        small.reader_options.traversal_limit_in_words = Some(1 << 17); // 1 MiB
        let server = start(Arc::new(AnyVat), small).await;
        let (office, _conn) = client_of(&server, &me, ClientOptions::default())
            .await
            .unwrap();
        assert!(echo(&office, &big[..4 << 20]).await.is_err());
        let (office, conn) = client_of(&server, &me, ClientOptions::default())
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
        let mut options = ServerOptions::default();
        options.max_unauthenticated_per_source = 100;
        let server = start(Arc::new(AnyVat), options).await;
        let clients: Vec<Identity> = (0..100).map(|_| Identity::generate()).collect();
        let results = futures::future::join_all(clients.iter().map(|me| {
            let server = &server;
            async move {
                let (office, conn) = client_of(server, me, ClientOptions::default()).await?;
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
        let server = start(Arc::new(AnyVat), ServerOptions::default()).await;
        let me = Identity::generate();
        let expected = Identity::generate().vat_id();
        let result = rpc::connect::<_, office_capnp::Client>(
            server.addr,
            &me,
            Arc::new(Pinned(expected)),
            ClientOptions::default(),
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
        let server = start(Arc::new(policy), ServerOptions::default()).await;

        let (office, conn) = client_of(&server, &allowed, ClientOptions::default())
            .await
            .unwrap();
        assert_eq!(whoami(&office).await.unwrap(), allowed.vat_id().to_string());
        conn.disconnect().await.unwrap();

        // The stranger's handshake completes (XX authenticates the initiator
        // last), then the server hangs up: its first call says why that may be.
        let (office, _conn) = client_of(&server, &stranger, ClientOptions::default())
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
                rpc::connect(server, &me, Arc::new(Pinned(pin)), ClientOptions::default())
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
        let mut options = ServerOptions::default();
        options.handshake_timeout = Duration::from_millis(500);
        let server = start(Arc::new(AnyVat), options).await;
        let good = Identity::generate();
        let (office, conn) = client_of(&server, &good, ClientOptions::default())
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
            ClientOptions::default(),
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
        let (office2, conn2) = client_of(&server, &other, ClientOptions::default())
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

#[tokio::test]
async fn connection_and_handshake_limits_hold_and_release() {
    local(async {
        let mut options = ServerOptions::default();
        options.max_connections = 2;
        options.max_handshakes = 1;
        options.handshake_timeout = Duration::from_millis(400);
        options.handshake_failure_hold = Duration::from_millis(600);
        let server = start(Arc::new(AnyVat), options).await;
        let quick = || {
            let mut o = ClientOptions::default();
            o.timeout = Duration::from_millis(250);
            o
        };
        // A silent peer costs the server nothing and holds no handshake
        // slot: a client gets through beside it.
        let silent = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let beside = Identity::generate();
        let (office_s, conn_s) = client_of(&server, &beside, quick()).await.unwrap();
        assert_eq!(
            whoami(&office_s).await.unwrap(),
            beside.vat_id().to_string()
        );
        conn_s.disconnect().await.unwrap();
        drop(silent);
        // A peer that sent a well-formed message 1 and stalls holds the only
        // handshake slot: the next client waits.
        let mut stalled = TcpStream::connect(server.addr).await.unwrap();
        stalled
            .write_all(&capnp_noise_test::fixtures::initiator_first_flight())
            .await
            .unwrap();
        let stalled_at = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waited = client_of(&server, &Identity::generate(), quick()).await;
        assert!(matches!(waited, Err(Error::HandshakeTimeout(_))));
        // The stalled handshake timed out (400 ms), and as it failed, it
        // keeps the slot for the failure hold (600 ms more): clients still
        // wait...
        tokio::time::sleep_until(stalled_at + Duration::from_millis(550)).await;
        drop(stalled);
        let held = client_of(&server, &Identity::generate(), quick()).await;
        assert!(matches!(held, Err(Error::HandshakeTimeout(_))));
        // ...and get through once it ended.
        tokio::time::sleep_until(stalled_at + Duration::from_millis(1300)).await;
        let a = Identity::generate();
        let (office_a, conn_a) = client_of(&server, &a, quick()).await.unwrap();
        assert_eq!(whoami(&office_a).await.unwrap(), a.vat_id().to_string());
        let b = Identity::generate();
        let (office_b, conn_b) = client_of(&server, &b, quick()).await.unwrap();
        assert_eq!(whoami(&office_b).await.unwrap(), b.vat_id().to_string());
        // Two connections are the limit: a third is not served...
        let c = Identity::generate();
        let refused = client_of(&server, &c, quick()).await;
        assert!(matches!(refused, Err(Error::HandshakeTimeout(_))));
        // ...until one ends. (The refused attempt's connection waited in
        // the listen backlog and is taken up first; if it is admitted while
        // its client is still giving up, its handshake fails after message 2
        // and keeps the only handshake slot for the failure hold.)
        conn_a.disconnect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (office_c, conn_c) = client_of(&server, &c, quick()).await.unwrap();
        assert_eq!(whoami(&office_c).await.unwrap(), c.vat_id().to_string());
        conn_b.disconnect().await.unwrap();
        conn_c.disconnect().await.unwrap();
    })
    .await;
}
