//! The multi-worker RPC server (`rpc::Server`) on real loopback sockets:
//! connections spread over workers and stay there, admission limits are
//! global across workers, shutdown ends every worker, and a panicking
//! bootstrap factory or a failed worker leaves the rest serving.
//!
//! Clients run on the test's own runtime and `LocalSet`; the server's
//! workers are threads of their own.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capnp::capability::Rc as CapRc;
use capnp_noise::rpc::{self, ClientConfig, PeerInfo, Server, ServerConfig};
use capnp_noise::{Error, Identity, Pinned};
use capnp_noise_test::fixtures as testing;
use capnp_noise_test::schema::demo_capnp::office;
use capnp_noise_test::support::{bounded, local, whoami};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);

/// An `Office` whose `whoami` answers "<thread the factory ran on> <thread
/// the call runs on>".
struct ThreadOffice {
    built_on: String,
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

impl office::Server for ThreadOffice {
    async fn whoami(
        self: CapRc<Self>,
        _: office::WhoamiParams,
        mut results: office::WhoamiResults,
    ) -> Result<(), capnp::Error> {
        results
            .get()
            .set_vat_id(format!("{} {}", self.built_on, thread_name()));
        Ok(())
    }
}

fn thread_office(_: &PeerInfo) -> office::Client {
    capnp_rpc::new_client(ThreadOffice {
        built_on: thread_name(),
    })
}

struct Running {
    server: Server,
    id: Identity,
}

impl Running {
    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    async fn client(
        &self,
        options: ClientConfig,
    ) -> Result<(office::Client, rpc::Connection), Error> {
        rpc::connect(
            self.addr(),
            &Identity::generate(),
            Arc::new(Pinned(self.id.vat_id())),
            options,
        )
        .await
    }

    /// Shuts down on a blocking thread, within `LIMIT`.
    async fn shutdown(self) {
        bounded(
            "shutdown",
            LIMIT,
            tokio::task::spawn_blocking(move || self.server.shutdown()),
        )
        .await
        .unwrap();
    }
}

fn start<F>(workers: usize, config: ServerConfig, factory: F) -> Running
where
    F: Fn(&PeerInfo) -> office::Client + Send + Sync + 'static,
{
    let id = Identity::generate();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = Server::builder(id.clone(), factory)
        .config(config)
        .workers(workers)
        .serve(listener)
        .unwrap();
    assert_eq!(server.workers(), workers);
    Running { server, id }
}

/// (factory thread, call thread) of `office`.
async fn threads_of(office: &office::Client) -> (String, String) {
    let answer = whoami(office).await.unwrap();
    let (a, b) = answer.split_once(' ').unwrap();
    (a.to_string(), b.to_string())
}

#[tokio::test(flavor = "current_thread")]
async fn connections_spread_over_workers_and_each_stays_on_its_worker() {
    local(async {
        let running = start(2, ServerConfig::default(), thread_office);
        let mut clients = Vec::new();
        let mut seen = HashSet::new();
        for _ in 0..4 {
            let (office, conn) = bounded("connect", LIMIT, running.client(ClientConfig::default()))
                .await
                .unwrap();
            let (built_on, called_on) = threads_of(&office).await;
            assert_eq!(built_on, called_on, "a capability moved between threads");
            assert!(built_on.starts_with("capnp-noise-worker-"), "{built_on}");
            seen.insert(built_on);
            clients.push((office, conn));
        }
        assert_eq!(seen.len(), 2, "served by {seen:?}");
        // Least loaded: two connections each.
        assert_eq!(running.server.load(), vec![Some(2), Some(2)]);
        // Later calls stay on the capability's worker.
        for (office, _) in &clients {
            let (built_on, called_on) = threads_of(office).await;
            assert_eq!(built_on, called_on);
        }
        for (_, conn) in clients {
            conn.disconnect().await.unwrap();
        }
        running.shutdown().await;
    })
    .await;
}

/// Reads until `tcp` is closed by the server (EOF or reset); false if it is
/// still open after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Whether something (message 2) arrives on `tcp` within `within`.
async fn answered_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut buf)).await,
        Ok(Ok(1..))
    )
}

#[tokio::test(flavor = "current_thread")]
async fn the_unauthenticated_share_of_a_source_is_global_across_workers() {
    // One silent connection from 127.0.0.1 is its whole share: of two,
    // which the dispatcher gives to the two workers, one is closed at once.
    // Were the share counted per worker, both would stay open for the
    // first-message timeout (30 s).
    let config = ServerConfig::default()
        .with_max_unauthenticated_per_source(1)
        .with_first_message_timeout(Duration::from_secs(30));
    let running = start(2, config, thread_office);
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(running.addr()).await.unwrap());
    }
    // They go to different workers (the first is open, and so counted in
    // its worker's load, when the second is handed over), and whichever was
    // counted second is closed at once; the other stays open.
    let mut closed = 0;
    for tcp in &mut silent {
        closed += usize::from(closed_within(tcp, Duration::from_secs(3)).await);
    }
    assert_eq!(
        closed, 1,
        "{closed} of two silent connections from one source closed (share: 1)"
    );
    drop(silent);
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn handshake_slots_are_global_across_workers() {
    // One handshake slot for the whole server: of two peers that send
    // message 1 and stall, on two workers, only one is answered; the other
    // waits for the slot. Per-worker slots would answer both.
    let config = ServerConfig::default()
        .with_max_handshakes(1)
        .with_max_handshakes_per_source(16)
        .with_handshake_timeout(Duration::from_secs(10));
    let running = start(2, config, thread_office);
    let flight = testing::initiator_first_flight();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(running.addr()).await.unwrap();
        tcp.write_all(&flight).await.unwrap();
        stalled.push(tcp);
    }
    let mut answered = 0;
    for tcp in &mut stalled {
        answered += usize::from(answered_within(tcp, Duration::from_secs(2)).await);
    }
    assert_eq!(answered, 1, "message 1 answered on {answered} connections");
    let stats = running.server.admission();
    assert_eq!((stats.in_progress, stats.admitted), (1, 1), "{stats:?}");
    assert_eq!(running.server.load(), vec![Some(1), Some(1)]);
    drop(stalled);
    running.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_connection_limit_is_global_across_workers() {
    local(async {
        let config = ServerConfig::default().with_max_connections(1);
        let running = start(2, config, thread_office);
        let (office, conn) = running.client(ClientConfig::default()).await.unwrap();
        threads_of(&office).await;
        // The second waits in the backlog, unanswered, although a worker
        // is idle.
        let short = ClientConfig::default().with_timeout(Duration::from_millis(700));
        let refused = running.client(short).await;
        assert!(
            matches!(refused, Err(Error::HandshakeTimeout(_))),
            "{:?}",
            refused.map(|_| ())
        );
        conn.disconnect().await.unwrap();
        let (office, conn) = bounded(
            "connect after",
            LIMIT,
            running.client(ClientConfig::default()),
        )
        .await
        .unwrap();
        threads_of(&office).await;
        conn.disconnect().await.unwrap();
        running.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_disconnects_every_connection_and_joins_every_worker() {
    local(async {
        let running = start(3, ServerConfig::default(), thread_office);
        let addr = running.addr();
        let mut clients = Vec::new();
        for _ in 0..6 {
            let (office, conn) = running.client(ClientConfig::default()).await.unwrap();
            threads_of(&office).await;
            clients.push((office, conn));
        }
        assert_eq!(running.server.load(), vec![Some(2), Some(2), Some(2)]);
        // shutdown() returns only once every thread has been joined.
        running.shutdown().await;
        for (office, conn) in clients {
            assert!(
                bounded("a call after shutdown", LIMIT, whoami(&office))
                    .await
                    .is_err(),
                "a connection survived the shutdown"
            );
            let _ = conn.disconnect().await;
        }
        // Nobody listens any more.
        assert!(TcpStream::connect(addr).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_panicking_factory_closes_only_its_connection() {
    local(async {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let running = start(2, ServerConfig::default(), move |peer: &PeerInfo| {
            if counted.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("the factory fails for the second connection");
            }
            thread_office(peer)
        });
        let mut clients = Vec::new();
        let mut threads = Vec::new();
        for i in 0..5 {
            let (office, conn) = running.client(ClientConfig::default()).await.unwrap();
            let answer = bounded("a call", LIMIT, whoami(&office)).await;
            if i == 1 {
                assert!(
                    answer.is_err(),
                    "the panicking factory's connection answered"
                );
                // Its worker has counted it off (the client may see the
                // close a moment before).
                bounded("the closed connection counted off", LIMIT, async {
                    while running.server.load() != vec![Some(1), Some(0)] {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
                continue;
            }
            threads.push(answer.unwrap().split_once(' ').unwrap().0.to_string());
            clients.push((office, conn));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        // The worker of the panic took the next connection (it was the
        // least loaded) and served it.
        assert_ne!(threads[0], threads[1], "{threads:?}");
        assert_eq!(
            threads.iter().collect::<HashSet<_>>().len(),
            2,
            "{threads:?}"
        );
        assert_eq!(running.server.load(), vec![Some(2), Some(2)]);
        for (_, conn) in clients {
            conn.disconnect().await.unwrap();
        }
        running.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_failed_worker_is_skipped_and_the_others_serve() {
    local(async {
        let running = start(2, ServerConfig::default(), thread_office);
        running.server.fail_worker_for_test(0);
        bounded("the worker's end is seen", LIMIT, async {
            while running.server.load()[0].is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (office, conn) = bounded("connect", LIMIT, running.client(ClientConfig::default()))
                .await
                .unwrap();
            let (built_on, _) = threads_of(&office).await;
            assert_eq!(built_on, "capnp-noise-worker-1");
            clients.push((office, conn));
        }
        assert_eq!(running.server.load(), vec![None, Some(3)]);
        for (_, conn) in clients {
            conn.disconnect().await.unwrap();
        }
        // Shutdown still ends (and joins the failed thread).
        running.shutdown().await;
    })
    .await;
}
