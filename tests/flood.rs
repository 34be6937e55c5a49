//! A handshake flood against `rpc::serve` on real loopback sockets: hundreds
//! of unauthenticated connections from one address (silent, garbage, and
//! well-formed message 1 then nothing), while legitimate clients from
//! another address call the server.
//!
//! What it shows (SPEC.md section 8, "Admission"; `capnp_noise::admission`):
//! * silent and garbage connections cost the server no X25519 operation;
//! * peers that stall after message 1 cost exactly three each, and only as
//!   many of them as the per-source limit admits at once, each admission
//!   holding its slot for one handshake timeout;
//! * legitimate clients from another address are served during the flood,
//!   each costing the server exactly four X25519 operations;
//! * every flood connection is closed by the server within bounded time, and
//!   the server serves new clients afterwards;
//! * peers that send message 1, wait for message 2 and hang up, as fast as
//!   they can, make the server answer no more than the per-source limit
//!   per failure hold (without the hold: one answer per connection).
//!
//! The server runs on its own thread (its own runtime and `LocalSet`), so
//! the thread-local X25519 counter (`testing::x25519_operations_on_this_thread`)
//! counts the server's work only.

use capnp_noise_test::office;

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_noise::rpc::{self, PeerInfo, ServerConfig};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::{AnyVat, Error, Identity, Pinned, VatId};
use capnp_noise_test::fixtures as testing;
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::LocalSet;
use tokio_util::compat::TokioAsyncReadCompatExt;

const PER_SOURCE: usize = 4;
const TOTAL: usize = 8;
/// The server's handshake timeout: how long the flood's admitted
/// handshakes hold their slots, and the time the legitimate clients have to
/// be served meanwhile.
const TIMEOUT: Duration = Duration::from_secs(4);
/// A legitimate client's own timeouts: it waits as long as it takes (a
/// client giving up is not what these tests are about).
const PATIENCE: Duration = Duration::from_secs(10);
/// The failure hold (the default).
const HOLD: Duration = capnp_noise::admission::DEFAULT_FAILURE_HOLD;
/// X25519 operations a responder spends answering message 1.
const ANSWER_MSG1: u64 = 3;
/// X25519 operations a responder spends on a whole handshake.
const FULL_HANDSHAKE: u64 = 4;

struct Server {
    addr: SocketAddr,
    vat_id: VatId,
    probe: mpsc::UnboundedSender<oneshot::Sender<u64>>,
}

impl Server {
    /// Starts `rpc::serve` on a thread of its own, with the failure hold
    /// `hold`.
    fn start(hold: Duration) -> Server {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            LocalSet::new().block_on(&rt, async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let id = Identity::generate();
                let (probe, mut probes) = mpsc::unbounded_channel::<oneshot::Sender<u64>>();
                tx.send((listener.local_addr().unwrap(), id.vat_id(), probe))
                    .unwrap();
                let mut options = ServerConfig::default();
                options.max_handshakes = TOTAL;
                options.max_handshakes_per_source = PER_SOURCE;
                options.handshake_timeout = TIMEOUT;
                options.handshake_failure_hold = hold;
                // The handshake slots alone: the cap on a source's
                // unauthenticated connections would close most of the
                // flood at accept (tests/hostile.rs tests it).
                options.max_unauthenticated_per_source = 1000;
                tokio::task::spawn_local(rpc::serve(
                    listener,
                    id,
                    Arc::new(AnyVat),
                    options,
                    |peer: &PeerInfo| office::Office::bootstrap(peer),
                ));
                // Answers probes until the test drops its sender.
                while let Some(reply) = probes.recv().await {
                    let _ = reply.send(testing::x25519_operations_on_this_thread());
                }
            });
        });
        let (addr, vat_id, probe) = rx.recv().unwrap();
        Server {
            addr,
            vat_id,
            probe,
        }
    }

    /// X25519 operations the server's thread has run so far.
    async fn x25519_ops(&self) -> u64 {
        let (tx, rx) = oneshot::channel();
        self.probe.send(tx).unwrap();
        rx.await.unwrap()
    }

    /// Waits (up to `within`) until the server's count reaches `want`, and
    /// returns the count then.
    async fn ops_reaching(&self, want: u64, within: Duration) -> u64 {
        let end = Instant::now() + within;
        loop {
            let n = self.x25519_ops().await;
            if n >= want || Instant::now() > end {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A legitimate client from `source`: handshake pinned to the server, one
/// `whoami` call, disconnect. Returns the name the server saw.
async fn legit_call(server: &Server, source: &str) -> Result<String, Error> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().unwrap())?;
    let tcp = socket.connect(server.addr).await?;
    let me = Identity::generate();
    let config = StreamConfig::default().with_handshake_timeout(Some(PATIENCE));
    let stream = stream::connect(tcp, &me, Arc::new(Pinned(server.vat_id)), config).await?;
    let (reader, writer) = futures::AsyncReadExt::split(stream.compat());
    let network = twoparty::VatNetwork::new(reader, writer, Side::Client, Default::default());
    let mut rpc_system = RpcSystem::new(Box::new(network), None);
    let office: office_capnp::Client = rpc_system.bootstrap(Side::Server);
    let disconnector = rpc_system.get_disconnector();
    tokio::task::spawn_local(rpc_system);
    let call = async {
        let reply = office.whoami_request().send().promise.await?;
        Ok::<_, capnp::Error>(reply.get()?.get_vat_id()?.to_string()?)
    };
    let name = tokio::time::timeout(PATIENCE, call)
        .await
        .map_err(|_| std::io::Error::other("whoami took too long"))?
        .map_err(std::io::Error::other)?;
    let _ = disconnector.await;
    assert_eq!(name, me.vat_id().to_string());
    Ok(name)
}

/// How many of `conns` the server answered (message 2 arrived) and has not
/// closed: the admitted handshakes that still hold their slots. Reads what
/// has arrived, without waiting.
async fn answered_and_open(conns: &mut [TcpStream]) -> usize {
    let mut buf = [0u8; 1024];
    let mut holding = 0;
    for tcp in conns {
        let mut answered = false;
        loop {
            match futures::poll!(std::pin::pin!(tcp.read(&mut buf))) {
                std::task::Poll::Ready(Ok(1..)) => answered = true,
                std::task::Poll::Ready(_) => break,
                std::task::Poll::Pending => {
                    holding += usize::from(answered);
                    break;
                }
            }
        }
    }
    holding
}

/// Reads until the server closes `tcp` (EOF or reset); false if it is still
/// open at `deadline`.
async fn closed_by(tcp: &mut TcpStream, deadline: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Nothing is expected but message 2 for the admitted ones.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_handshake_flood_is_bounded_and_legitimate_clients_are_served() {
    LocalSet::new()
        .run_until(async {
            let server = Server::start(HOLD);
            assert_eq!(server.x25519_ops().await, 0);

            // The flood, all from 127.0.0.1: 100 silent connections, 50 that
            // send garbage, 150 that send a well-formed message 1 and stall.
            let flight = testing::initiator_first_flight();
            let mut rng = rand::rngs::StdRng::seed_from_u64(6);
            let mut flood = Vec::new();
            for i in 0..300 {
                let mut tcp = TcpStream::connect(server.addr).await.unwrap();
                if (100..150).contains(&i) {
                    let mut junk = vec![0u8; 1 + (rng.next_u32() % 300) as usize];
                    rng.fill_bytes(&mut junk);
                    tcp.write_all(&junk).await.unwrap();
                } else if i >= 150 {
                    tcp.write_all(&flight).await.unwrap();
                }
                flood.push(tcp);
            }
            let flooded_at = tokio::time::Instant::now();

            // Only PER_SOURCE of the stalled handshakes are answered: three
            // X25519 operations each, none for the other 296 connections.
            let admitted = ANSWER_MSG1 * PER_SOURCE as u64;
            assert_eq!(
                server.ops_reaching(admitted, TIMEOUT / 4).await,
                admitted,
                "the flood's first wave"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                server.x25519_ops().await,
                admitted,
                "no more while they hold their slots"
            );

            // Legitimate clients from another address are served meanwhile:
            // when the last is done, the flood's admitted handshakes still
            // hold their slots (the server has not closed them: it does at
            // their timeout), an event rather than a clock reading, with a
            // whole handshake timeout (4 s) for the eight.
            for _ in 0..8 {
                legit_call(&server, "127.0.0.2")
                    .await
                    .expect("served during the flood");
            }
            assert_eq!(
                server.x25519_ops().await,
                admitted + 8 * FULL_HANDSHAKE,
                "the flood cost nothing more while the clients were served"
            );
            assert_eq!(
                answered_and_open(&mut flood[150..]).await,
                PER_SOURCE,
                "the clients were served while the flood held its slots"
            );

            // Every flood connection is closed by the server: the waiting
            // ones when their timeout ends, the admitted ones one timeout
            // after admission (so at most two waves of admissions).
            let deadline = flooded_at + 2 * TIMEOUT + Duration::from_secs(2);
            for (i, tcp) in flood.iter_mut().enumerate() {
                assert!(
                    closed_by(tcp, deadline).await,
                    "flood connection {i} still open"
                );
            }
            let after_flood = server.x25519_ops().await;
            let flood_cost = after_flood - 8 * FULL_HANDSHAKE;
            assert!(
                flood_cost <= 2 * admitted,
                "300 flood connections cost {flood_cost} X25519 operations"
            );
            assert_eq!(flood_cost % ANSWER_MSG1, 0, "only message-1 answers");

            // Resources are free again (after the failure hold of the
            // handshakes that timed out): a client from the flooding address
            // itself is served.
            tokio::time::sleep(HOLD).await;
            legit_call(&server, "127.0.0.1")
                .await
                .expect("served after the flood");
            assert_eq!(server.x25519_ops().await, after_flood + FULL_HANDSHAKE);
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn hang_ups_after_message_2_are_bounded_by_the_failure_hold() {
    LocalSet::new()
        .run_until(async {
            let server = Server::start(HOLD);
            let flight = Rc::new(testing::initiator_first_flight());
            let answered = Rc::new(Cell::new(0u64));
            let attempts = Rc::new(Cell::new(0u64));
            // 16 attackers on 127.0.0.1, each as fast as it can for 2.5 s:
            // connect, send message 1, wait up to 100 ms for message 2, hang up.
            let started = Instant::now();
            let attack = Duration::from_millis(2500);
            let attackers: Vec<_> = (0..16)
                .map(|_| {
                    let (flight, answered, attempts) =
                        (flight.clone(), answered.clone(), attempts.clone());
                    let addr = server.addr;
                    tokio::task::spawn_local(async move {
                        while started.elapsed() < attack {
                            attempts.set(attempts.get() + 1);
                            let mut tcp = TcpStream::connect(addr).await.unwrap();
                            tcp.write_all(&flight).await.unwrap();
                            let mut byte = [0u8; 1];
                            let wait = Duration::from_millis(100);
                            if let Ok(Ok(1)) = tokio::time::timeout(wait, tcp.read(&mut byte)).await
                            {
                                answered.set(answered.get() + 1);
                            }
                        }
                    })
                })
                .collect();
            // Another address is served meanwhile.
            tokio::time::sleep(Duration::from_millis(500)).await;
            legit_call(&server, "127.0.0.2")
                .await
                .expect("served during the attack");
            for a in attackers {
                a.await.unwrap();
            }
            let elapsed = started.elapsed();
            let spent = server.x25519_ops().await - FULL_HANDSHAKE;
            // Each slot of the source's share answers at most once per hold
            // (plus the first round).
            let rounds = (elapsed.as_secs_f64() / HOLD.as_secs_f64()).ceil() as u64 + 1;
            let bound = ANSWER_MSG1 * PER_SOURCE as u64 * rounds;
            let (answered, attempts) = (answered.get(), attempts.get());
            println!(
                "{attempts} hang-ups, {answered} answered, {spent} X25519 operations in {elapsed:?} (bound {bound})"
            );
            assert!(
                answered >= PER_SOURCE as u64,
                "the attack was answered at first ({answered} of {attempts})"
            );
            assert!(
                attempts * ANSWER_MSG1 > 2 * bound,
                "the attack was fast enough to matter ({attempts} attempts)"
            );
            assert!(
                spent <= bound,
                "{attempts} hang-ups ({answered} answered) in {elapsed:?} cost {spent} X25519 operations (bound {bound})"
            );
            assert_eq!(spent % ANSWER_MSG1, 0, "only message-1 answers");
        })
        .await;
}
