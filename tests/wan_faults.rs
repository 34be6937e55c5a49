//! Faults survived, nothing lost (issue 20 item 5), for capnp-noise's own
//! API across the simulated WAN of [`capnp_noise_test::wan::Bed`]:
//!
//! * a 5 s partition in the middle of a transfer and of a call stream,
//!   with the default keepalive (survived) and a short one (an error);
//! * a NAT that forgets idle flows: TCP keepalive keeps the flow, or finds
//!   it dead, and `rpc::connect`, a sturdy ref (`rpc::connect_sturdy`) and
//!   the `Network`'s one connection per pair recover;
//! * seeded bursts of loss and reordering during a stream transfer and RPC
//!   calls;
//! * a server restart while clients hold capabilities: `rpc::serve` behind
//!   a sturdy ref, and a `Network` vat.
//!
//! Each prints its table (RELIABILITY.md has them) and asserts that
//! nothing was lost without an error: every byte arrives in order or the
//! stream ends with an error, every call is answered with its own data or
//! fails, none hangs past its bound. (A 5 s partition in a transfer and in
//! a call stream, for all four ways, is in
//! `crates/capnp-noise-tunnel/tests/wan.rs`.)
//!
//! Short profile (`cargo test`, in `.ci/run`): a few runs. Long profile:
//! `CAPNP_NOISE_WAN_PROFILE=long cargo test -p capnp-noise --test wan_faults -- --nocapture --test-threads 1`
//! (more runs and seeds; `WAN_RUNS=N` sets the runs of each fault).
//!
//! These need root, iproute2, nftables and `/dev/net/tun`; elsewhere they
//! are skipped loudly (and fail under `CI=true`).

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capnp_noise::network::NetworkConfig;
use capnp_noise::rpc::{self, ClientConfig, ServerConfig};
use capnp_noise::sturdy::{Address, ObjectId, Restorer, SturdyRef};
use capnp_noise::{AnyVat, Identity, PeerPolicy, Pinned};
use capnp_noise_test::office::{office_vat, Office};
use capnp_noise_test::schema::demo_capnp::office;
use capnp_noise_test::support::whoami;
use capnp_noise_test::wan::faults::{beds_usable, call_for, one_bed, runs, Tally, TABLE_HEAD};
use capnp_noise_test::wan::{Bed, PacketFaults, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MS: Duration = Duration::from_millis(1);

/// A server in the cloud namespace. Stopping it (or dropping the handle)
/// drops its runtime: every socket closes without the authenticated CLOSE,
/// as when its process dies.
struct Cloud {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Cloud {
    /// `rpc::serve` on `port`: an `Office` per connection, or (with
    /// `object`) a `Restorer` holding an `Office` under that object id.
    fn rpc(
        bed: &Bed,
        port: u16,
        id: Identity,
        config: ServerConfig,
        object: Option<ObjectId>,
    ) -> Cloud {
        let (ready, listening) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = bed.run_async_in(Side::Cloud, move || async move {
            let listener = tokio::net::TcpListener::bind((Bed::CLOUD, port))
                .await
                .expect("bind");
            ready.send(()).expect("the test waits");
            let policy: Arc<dyn PeerPolicy> = Arc::new(AnyVat);
            match object {
                None => tokio::select! {
                    _ = stopped => {}
                    () = rpc::serve(listener, id, policy, config, Office::bootstrap) => {}
                },
                Some(object) => {
                    let objects = Rc::new(RefCell::new(Restorer::new()));
                    let office: office::Client = capnp_rpc::new_client(Office {
                        caller: id.vat_id(),
                    });
                    objects.borrow_mut().insert(&object, office.client);
                    let bootstrap = move |_: &rpc::PeerInfo| rpc::restorer_client(objects.clone());
                    tokio::select! {
                        _ = stopped => {}
                        () = rpc::serve(listener, id, policy, config, bootstrap) => {}
                    }
                }
            }
        });
        listening.recv().expect("the cloud server started");
        Cloud {
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// A `Network` vat serving `Office`s on `port`.
    fn vat(bed: &Bed, port: u16, id: Identity, config: NetworkConfig) -> Cloud {
        let (ready, listening) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = bed.run_async_in(Side::Cloud, move || async move {
            let _net = office_vat(id, &format!("{}:{port}", Bed::CLOUD), config).await;
            ready.send(()).expect("the test waits");
            let _ = stopped.await;
        });
        listening.recv().expect("the cloud vat started");
        Cloud {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn addr(port: u16) -> Address {
    format!("{}:{port}", Bed::CLOUD)
        .parse()
        .expect("an address")
}

/// What a call on a held capability did across a fault, and what getting
/// a new capability then took.
#[derive(Debug)]
struct Probe {
    /// Answered (in this long) or failed (the error, and after how long).
    held: Result<Duration, (String, Duration)>,
    /// Neither answered nor failed within the bound: lost without an error.
    hung: bool,
    /// From the failed call's end to the first answer through a new
    /// capability (`reconnect`, retried every 100 ms).
    recovered: Option<Duration>,
}

impl Probe {
    /// Adds this probe to `t`: the held call, and the call that recovered.
    fn tally(&self, t: &mut Tally) {
        t.runs += 1;
        t.attempted += 1;
        match &self.held {
            Ok(_) => t.delivered += 1,
            Err((e, _)) => t.errors.push(e.clone()),
        }
        if self.hung {
            t.lost_silently += 1;
        }
        if let Some(r) = self.recovered {
            t.attempted += 1;
            t.delivered += 1;
            t.recover.push(r);
        }
    }
}

/// Calls `held` (waiting at most `bound`); if that does not answer, gets a
/// new capability with `reconnect` and calls it, every 100 ms for at most
/// 20 s.
async fn probe<F, Fut>(held: &office::Client, bound: Duration, reconnect: F) -> Probe
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<office::Client, String>>,
{
    let start = Instant::now();
    let (held, hung) = match tokio::time::timeout(bound, whoami(held)).await {
        Ok(Ok(_)) => {
            return Probe {
                held: Ok(start.elapsed()),
                hung: false,
                recovered: None,
            }
        }
        Ok(Err(e)) => (Err((e.to_string(), start.elapsed())), false),
        Err(_) => (
            Err((format!("no answer, no error in {bound:?}"), bound)),
            true,
        ),
    };
    Probe {
        held,
        hung,
        recovered: recover(Instant::now(), reconnect).await,
    }
}

/// Gets a new capability with `reconnect` and calls it, every 100 ms,
/// until a call is answered: the time from `since` to that answer (`None`
/// if none came within 20 s of `since`).
async fn recover<F, Fut>(since: Instant, reconnect: F) -> Option<Duration>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<office::Client, String>>,
{
    while since.elapsed() < Duration::from_secs(20) {
        let attempt = async {
            let office = reconnect().await.ok()?;
            whoami(&office).await.ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return Some(since.elapsed());
        }
        tokio::time::sleep(100 * MS).await;
    }
    None
}

/// The link of the transfer tests (50 ms RTT, 20 Mbit/s, as the tunnel's
/// WAN tests) and the cloud server's identity.
fn link_with_server() -> (Bed, Identity) {
    let bed = Bed::builder()
        .rtt(50 * MS)
        .rate_kbit(20_000)
        .build()
        .expect("a bed");
    (bed, Identity::generate())
}

fn print_table(title: &str, rows: &[String]) {
    eprintln!("\n{title}\n{TABLE_HEAD}");
    for r in rows {
        eprintln!("{r}");
    }
}

// ----- a NAT that forgets idle flows -----

/// The router forgets a TCP flow idle for 2 s and then drops its packets
/// (a NAT that lost the mapping). Three capabilities are held from the
/// office: one over `rpc::connect`, one restored from a sturdy ref
/// (`rpc::connect_sturdy`), one from the `Network` (its one connection to
/// the cloud vat, whose address it learned from a sturdy ref); after 4 s
/// of silence each is called.
///
/// * Keepalive 1 s (below the NAT's 2 s): TCP's probes keep the flow; every
///   call on the old capabilities is answered, and the network still has
///   one connection to the cloud vat. The same with keepalive on the cloud
///   side only (`ServerConfig`, the cloud vat's `NetworkConfig`): the
///   accepting side's probes keep the flow as well.
/// * Keepalive 3 s (above it): the flow is forgotten before the first
///   probe; the probes go unanswered and every call fails with an error
///   (within about twice the keepalive), none waits without one; a new
///   capability then answers: reconnecting, restoring the sturdy ref again,
///   and `Network::connect`, which dials a new connection on its own.
///
/// (Keepalive off, both ways: the calls neither answer nor fail; see
/// RELIABILITY.md and `the_network_behind_a_nat_...` in the tunnel's WAN
/// tests.)
#[test]
fn behind_a_nat_keepalive_keeps_idle_connections_or_finds_them_dead_and_all_recover() {
    if !beds_usable() {
        return;
    }
    let _one = one_bed();
    let bed = Bed::builder().rtt(50 * MS).build().expect("a bed");
    bed.drop_idle_flows_after(Some(Duration::from_secs(2)));
    let server = Identity::generate();
    let vat_id = Identity::generate();
    let (server_vat, cloud_vat) = (server.vat_id(), vat_id.vat_id());
    let object = ObjectId::random();
    let idle = Duration::from_secs(4);
    let bound = Duration::from_secs(15);
    let n = runs(1, 3);
    let mut rows = vec![];
    let s = |secs| Some(Duration::from_secs(secs));
    for (keepalive, server_keepalive, kept) in
        [(s(1), s(1), true), (None, s(1), true), (s(3), s(3), false)]
    {
        let mut tallies: [Tally; 3] = Default::default();
        let mut failed_in = vec![];
        for _ in 0..n {
            let server_config = ServerConfig::default().with_keepalive(server_keepalive);
            let cloud_config = NetworkConfig::default().with_keepalive(server_keepalive);
            let net_config = NetworkConfig::default().with_keepalive(keepalive);
            let _office_server =
                Cloud::rpc(&bed, 7810, server.clone(), server_config.clone(), None);
            let _restorer = Cloud::rpc(
                &bed,
                7811,
                server.clone(),
                server_config,
                Some(object.clone()),
            );
            let _vat = Cloud::vat(&bed, 7812, vat_id.clone(), cloud_config);
            let sturdy =
                SturdyRef::new(server_vat, vec![addr(7811)], object.clone()).expect("a ref");
            let vat_ref =
                SturdyRef::new(cloud_vat, vec![addr(7812)], ObjectId::random()).expect("a ref");
            let probes = bed
                .run_async_in(Side::Office, move || async move {
                    let me = Identity::generate();
                    let client = ClientConfig::default().with_keepalive(keepalive);
                    let rpc_addr = SocketAddr::from((Bed::CLOUD, 7810));
                    let pinned: Arc<dyn PeerPolicy> = Arc::new(Pinned(server_vat));
                    let connect = || async {
                        rpc::connect::<_, office::Client>(
                            rpc_addr,
                            &me,
                            pinned.clone(),
                            client.clone(),
                        )
                        .await
                        .map(|(o, _)| o)
                        .map_err(|e| e.to_string())
                    };
                    let restore = || async {
                        rpc::connect_sturdy::<office::Client>(&sturdy, &me, client.clone())
                            .await
                            .map(|(o, _)| o)
                            .map_err(|e| e.to_string())
                    };
                    let net = office_vat(
                        Identity::generate(),
                        &format!("{}:0", Bed::OFFICE),
                        net_config,
                    )
                    .await;
                    net.learn_sturdy_ref(&vat_ref);
                    let dial = || async {
                        net.connect::<office::Client>(&cloud_vat)
                            .await
                            .map_err(|e| e.to_string())
                    };
                    let held = [
                        connect().await.expect("rpc::connect"),
                        restore().await.expect("connect_sturdy"),
                        dial().await.expect("Network::connect"),
                    ];
                    for h in &held {
                        whoami(h).await.expect("a first call");
                    }
                    tokio::time::sleep(idle).await;
                    let (a, b, c) = futures::join!(
                        probe(&held[0], bound, connect),
                        probe(&held[1], bound, restore),
                        probe(&held[2], bound, dial),
                    );
                    let open = net.open_connections_with(&cloud_vat);
                    net.shutdown().await;
                    ([a, b, c], open)
                })
                .join()
                .expect("the office thread");
            let ([a, b, c], open) = probes;
            for (t, p) in tallies.iter_mut().zip([&a, &b, &c]) {
                p.tally(t);
                if let Err((_, after)) = &p.held {
                    failed_in.push(*after);
                }
                assert!(!p.hung, "keepalive {keepalive:?}: a call hung: {p:?}");
                if kept {
                    assert!(
                        p.held.is_ok(),
                        "keepalive {keepalive:?} did not keep the flow: {p:?}"
                    );
                } else {
                    assert!(
                        p.held.is_err(),
                        "answered after the NAT forgot the flow: {p:?}"
                    );
                    assert!(p.recovered.is_some(), "no recovery: {p:?}");
                }
            }
            if kept {
                assert_eq!(open, 1, "the network's one connection to the cloud vat");
            }
        }
        let what = if kept { "kept" } else { "found dead" };
        if let (Some(min), Some(max)) = (failed_in.iter().min(), failed_in.iter().max()) {
            eprintln!(
                "keepalive {keepalive:?}: the calls on the old capabilities failed {:.1}-{:.1} s after they were made",
                min.as_secs_f64(),
                max.as_secs_f64()
            );
        }
        for (t, way) in
            tallies
                .iter()
                .zip(["rpc::connect", "sturdy ref (connect_sturdy)", "Network"])
        {
            rows.push(t.row(
                &format!(
                    "NAT forgets after 2 s, idle 4 s, keepalive office {keepalive:?} / cloud {server_keepalive:?} ({what}), {way}"
                ),
                "calls",
            ));
        }
    }
    print_table(
        &format!("a NAT forgetting idle flows, 50 ms RTT, {n} run(s); time to recover: from the failed call to an answer on a new capability"),
        &rows,
    );
}

// ----- a 5 s partition -----

/// A 5 s partition (everything dropped, silently) starting at a seeded
/// moment (0.3-1.5 s in) while a 4 MiB `stream::connect` transfer at
/// 20 Mbit/s and a stream of echo calls over `rpc::connect` run, 50 ms
/// RTT. What each layer reports:
///
/// * default keepalive (30 s; a connection fails only after ~60 s with
///   data unacknowledged): nothing; TCP retransmits, every byte and every
///   call arrives once the link heals. "Time to recover": from the heal to
///   the next answer (calls), the longest stall at the sink (transfer).
/// * keepalive 1 s (data unacknowledged for 4 s fails the connection):
///   the transfer and the calls end with an error ("Connection timed
///   out"), at both ends; the sink sees an error, never a clean end.
///
/// Either way: nothing lost without an error, no truncation that looks
/// like a clean end.
#[test]
fn a_5_s_partition_mid_transfer_and_mid_call_stream_delivers_all_or_fails_with_an_error() {
    if !beds_usable() {
        return;
    }
    let _one = one_bed();
    let (bed, server) = link_with_server();
    let server_vat = server.vat_id();
    let bytes: u64 = 4 << 20;
    let partition = Duration::from_secs(5);
    let seeds: Vec<u64> = (1..=runs(1, 5) as u64).collect();
    let mut rows = vec![];
    for (keepalive, survives) in [(None, true), (Some(Duration::from_secs(1)), false)] {
        // None here: the default, DEFAULT_KEEPALIVE.
        let keepalive_or_default = keepalive.or(Some(rpc::DEFAULT_KEEPALIVE));
        let _rpc = Cloud::rpc(
            &bed,
            7840,
            server.clone(),
            ServerConfig::default().with_keepalive(keepalive_or_default),
            None,
        );
        let (_sink, results) = Sink::start(&bed, 7841, server.clone(), keepalive_or_default);
        let (mut bytes_t, mut calls_t) = (Tally::default(), Tally::default());
        for &seed in &seeds {
            let offset = Duration::from_millis(300 + seed.wrapping_mul(7919) % 1200);
            let (started_tx, started) = std::sync::mpsc::channel();
            let office = bed.run_async_in(Side::Office, move || async move {
                let me = Identity::generate();
                let pinned: Arc<dyn PeerPolicy> = Arc::new(Pinned(server_vat));
                let client = ClientConfig::default().with_keepalive(keepalive_or_default);
                let (office, _conn): (office::Client, _) =
                    rpc::connect(SocketAddr::from((Bed::CLOUD, 7840)), &me, pinned, client)
                        .await
                        .expect("rpc::connect");
                started_tx.send(()).expect("the test waits");
                let transfer =
                    send_pattern(&me, server_vat, 7841, seed, bytes, keepalive_or_default);
                let calls = call_for(&office, Duration::from_secs(9), Duration::from_secs(40));
                futures::join!(transfer, calls)
            });
            started.recv().expect("connected");
            std::thread::sleep(offset);
            bed.partition(true);
            std::thread::sleep(partition);
            bed.partition(false);
            let healed = Instant::now();
            let (sent, calls) = office.join().expect("the office thread");
            let received = results
                .recv_timeout(Duration::from_secs(90))
                .expect("the sink's result");
            tally_transfer(&mut bytes_t, bytes, &sent, &received);
            calls_t.runs += 1;
            calls_t.add_calls(&calls);
            if let Some(after) = calls.answers.iter().find(|&&a| a > healed) {
                calls_t.recover.push(*after - healed);
            }
            assert_eq!(
                bytes_t.lost_silently, 0,
                "seed {seed}: {bytes_t:?} {received:?}"
            );
            assert_eq!(calls_t.lost_silently, 0, "seed {seed}: {calls:?}");
            if survives {
                assert!(
                    bytes_t.errors.is_empty() && calls_t.errors.is_empty(),
                    "seed {seed}, default keepalive: {bytes_t:?} {calls_t:?}"
                );
            } else {
                assert!(
                    received.1.is_some() && sent.is_err() && calls.error.is_some(),
                    "seed {seed}, keepalive 1 s: the 5 s partition did not fail the connections: \
                     {received:?} {sent:?} {calls:?}"
                );
            }
        }
        let what = match keepalive {
            None => "default keepalive 30 s".to_string(),
            Some(k) => format!("keepalive {k:?}"),
        };
        rows.push(bytes_t.row(
            &format!("partition 5 s, {what}, stream::connect 4 MiB at 20 Mbit/s (recover: longest stall)"),
            "B",
        ));
        rows.push(calls_t.row(
            &format!("partition 5 s, {what}, rpc::connect echo calls for 9 s (recover: heal to next answer)"),
            "calls",
        ));
    }
    print_table(
        &format!("a 5 s partition 0.3-1.5 s in, 50 ms RTT, seeds {seeds:?}"),
        &rows,
    );
}

// ----- bursts of loss and reordering -----

/// The seeded byte pattern of a transfer.
fn pattern(seed: u64, i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9).wrapping_add(seed) >> 3) as u8
}

/// A byte sink in the cloud: `stream::accept` on `port` (TCP keepalive
/// `keepalive`); it reads each connection's seed (8 bytes), then checks
/// every byte against the seeded pattern, to the authenticated end or an
/// error. It reports each connection's outcome (the bytes that matched, in
/// order, up to a clean end; or the error that ended it) and the longest
/// wait between two reads, and tells the sender its count.
struct Sink;

/// What the sink saw of one connection: the bytes that matched the
/// pattern, in order; the error that ended it (`None`: the authenticated
/// end); its longest stall.
type SinkResult = (u64, Option<String>, Duration);

impl Sink {
    fn start(
        bed: &Bed,
        port: u16,
        id: Identity,
        keepalive: Option<Duration>,
    ) -> (Cloud, std::sync::mpsc::Receiver<SinkResult>) {
        let (ready, listening) = std::sync::mpsc::channel();
        let (results_tx, results) = std::sync::mpsc::channel::<SinkResult>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = bed.run_async_in(Side::Cloud, move || async move {
            let listener = tokio::net::TcpListener::bind((Bed::CLOUD, port))
                .await
                .expect("bind");
            ready.send(()).expect("the test waits");
            let serve = async {
                loop {
                    let (tcp, _) = listener.accept().await.expect("accept");
                    rpc::set_keepalive(&tcp, keepalive).expect("keepalive");
                    let config = capnp_noise::stream::StreamConfig::default();
                    let mut s = capnp_noise::stream::accept(tcp, &id, Arc::new(AnyVat), config)
                        .await
                        .expect("handshake");
                    let mut seed = [0u8; 8];
                    s.read_exact(&mut seed).await.expect("the seed");
                    let seed = u64::from_be_bytes(seed);
                    let mut good = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut last = Instant::now();
                    let mut stall = Duration::ZERO;
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break None,
                            Ok(n) => {
                                stall = stall.max(last.elapsed());
                                last = Instant::now();
                                for &b in &buf[..n] {
                                    if b != pattern(seed, good) {
                                        break;
                                    }
                                    good += 1;
                                }
                            }
                            Err(e) => break Some(e.to_string()),
                        }
                    };
                    if end.is_none() {
                        let _ = s.write_all(&good.to_be_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                    results_tx.send((good, end, stall)).expect("the test waits");
                }
            };
            tokio::select! {
                _ = stopped => {}
                () = serve => {}
            }
        });
        listening.recv().expect("the sink started");
        let cloud = Cloud {
            stop: Some(stop),
            thread: Some(thread),
        };
        (cloud, results)
    }
}

/// Sends `bytes` of the seeded pattern to the sink on `port` over
/// `stream::connect` (TCP keepalive `keepalive`), ends with the
/// authenticated CLOSE, and returns the count the sink answers.
async fn send_pattern(
    me: &Identity,
    server: capnp_noise::VatId,
    port: u16,
    seed: u64,
    bytes: u64,
    keepalive: Option<Duration>,
) -> Result<u64, String> {
    let e = |e: std::io::Error| e.to_string();
    let tcp = tokio::net::TcpStream::connect((Bed::CLOUD, port))
        .await
        .map_err(e)?;
    rpc::set_keepalive(&tcp, keepalive).map_err(e)?;
    let config = capnp_noise::stream::StreamConfig::default();
    let mut s = capnp_noise::stream::connect(tcp, me, Arc::new(Pinned(server)), config)
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&seed.to_be_bytes()).await.map_err(e)?;
    let chunk = 64 * 1024;
    let mut i = 0;
    while i < bytes {
        let block: Vec<u8> = (i..(i + chunk).min(bytes))
            .map(|j| pattern(seed, j))
            .collect();
        s.write_all(&block).await.map_err(e)?;
        i += block.len() as u64;
    }
    s.shutdown().await.map_err(e)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.map_err(e)?;
    Ok(u64::from_be_bytes(count))
}

/// Adds a transfer to `t`: `sent` as the sender saw it, `received` as the
/// sink did. Lost without an error: bytes missing after a clean end on
/// both sides (a truncation that looks like an end).
fn tally_transfer(t: &mut Tally, bytes: u64, sent: &Result<u64, String>, received: &SinkResult) {
    let (good, end, stall) = received;
    t.runs += 1;
    t.attempted += bytes;
    t.delivered += good;
    match (end, sent) {
        (None, Ok(count)) => {
            assert_eq!(good, count, "the sink's count and what it told");
            // A clean end with fewer bytes: a truncation that looks like an
            // end (or data other than sent).
            t.lost_silently += bytes - good.min(&bytes);
            t.recover.push(*stall);
        }
        (None, Err(e)) => {
            // The sink saw a clean end: it must have everything.
            t.lost_silently += bytes - good.min(&bytes);
            t.errors.push(e.clone());
        }
        (Some(e), _) => t.errors.push(e.clone()),
    }
}

/// Seeded bursts of loss and reordering (PacketFaults: 1 in 50 packets
/// overtaken by the next 3, 1 in 200 starting a burst of 12 lost packets,
/// both directions) during a 2 MiB `stream::connect` transfer and 3 s of
/// RPC echo calls, at 50 ms RTT and 20 Mbit/s: every byte arrives, in
/// order and as sent (the sink checks each against the seeded pattern), and
/// the sink sees the authenticated end; every call is answered with its own
/// data. "Time to recover": the longest the sink waited between two reads.
#[test]
fn loss_and_reordering_bursts_lose_nothing() {
    if !beds_usable() {
        return;
    }
    let _one = one_bed();
    let (bed, server) = link_with_server();
    let server_vat = server.vat_id();
    let bytes: u64 = 2 << 20;
    let seeds: Vec<u64> = (1..=runs(2, 10) as u64).collect();
    let _rpc = Cloud::rpc(&bed, 7820, server.clone(), ServerConfig::default(), None);
    let (_sink, results) = Sink::start(&bed, 7821, server.clone(), None);
    let (mut bytes_t, mut calls_t) = (Tally::default(), Tally::default());
    for &seed in &seeds {
        bed.set_packet_faults(PacketFaults {
            reorder_per_mille: 20,
            reorder_depth: 3,
            burst_per_mille: 5,
            burst_len: 12,
            seed,
        });
        let before = bed.delayer_stats();
        let (sent, calls) = bed
            .run_async_in(Side::Office, move || async move {
                let me = Identity::generate();
                let pinned: Arc<dyn PeerPolicy> = Arc::new(Pinned(server_vat));
                let transfer = send_pattern(&me, server_vat, 7821, seed, bytes, None);
                let calls = async {
                    let (office, _conn): (office::Client, _) = rpc::connect(
                        SocketAddr::from((Bed::CLOUD, 7820)),
                        &me,
                        pinned.clone(),
                        ClientConfig::default(),
                    )
                    .await
                    .expect("rpc::connect");
                    call_for(&office, Duration::from_secs(3), Duration::from_secs(30)).await
                };
                futures::join!(transfer, calls)
            })
            .join()
            .expect("the office thread");
        let received = results
            .recv_timeout(Duration::from_secs(60))
            .expect("the sink's result");
        let after = bed.delayer_stats();
        // The faults were played (the test cannot pass on a clean link).
        assert!(
            after.reordered > before.reordered && after.burst_dropped > before.burst_dropped,
            "seed {seed}: no fault played: {before:?} -> {after:?}"
        );
        eprintln!(
            "seed {seed}: {} packets held back, {} lost in bursts",
            after.reordered - before.reordered,
            after.burst_dropped - before.burst_dropped
        );
        tally_transfer(&mut bytes_t, bytes, &sent, &received);
        calls_t.runs += 1;
        calls_t.add_calls(&calls);
        assert_eq!(bytes_t.lost_silently, 0, "seed {seed}: {bytes_t:?}");
        assert_eq!(calls_t.lost_silently, 0, "seed {seed}: {calls:?}");
        assert!(
            bytes_t.errors.is_empty() && calls_t.errors.is_empty(),
            "seed {seed}: errors (TCP should repair these bursts): {bytes_t:?} {calls_t:?}"
        );
    }
    bed.set_packet_faults(PacketFaults::default());
    print_table(
        &format!("bursts of loss (1/200 packets start 12 lost) and reordering (1/50 overtaken by 3), 50 ms RTT, 20 Mbit/s, seeds {seeds:?}"),
        &[
            bytes_t.row("loss + reordering bursts, stream::connect 2 MiB (recover: longest stall)", "B"),
            calls_t.row("loss + reordering bursts, rpc::connect echo calls for 3 s", "calls"),
        ],
    );
}

// ----- a server restart while clients hold capabilities -----

/// The cloud stops (its sockets close without the authenticated CLOSE, as
/// when its process dies) while the office holds capabilities, and starts
/// again 1 s later, same identity and address: an `rpc::serve` whose
/// `Restorer` registers the same object id again, and a `Network` vat. The
/// office calls its held capabilities every 50 ms: each call fails with an
/// error (never hangs), within about a round trip of the stop; the office
/// then restores the sturdy ref again (`connect_sturdy`), and asks its
/// network for the vat again (`Network::connect`, which dials a new
/// connection), every 100 ms, until a call is answered. "Time to recover":
/// from the restart to that answer.
#[test]
fn a_server_restart_fails_held_capabilities_and_sturdy_refs_and_the_network_recover() {
    if !beds_usable() {
        return;
    }
    let _one = one_bed();
    let bed = Bed::builder().rtt(50 * MS).build().expect("a bed");
    let server = Identity::generate();
    let vat_id = Identity::generate();
    let (server_vat, cloud_vat) = (server.vat_id(), vat_id.vat_id());
    let object = ObjectId::random();
    let n = runs(1, 5);
    let (mut sturdy_t, mut net_t) = (Tally::default(), Tally::default());
    let mut failed_after = vec![];
    for _ in 0..n {
        let start = || {
            (
                Cloud::rpc(
                    &bed,
                    7830,
                    server.clone(),
                    ServerConfig::default(),
                    Some(object.clone()),
                ),
                Cloud::vat(&bed, 7831, vat_id.clone(), NetworkConfig::default()),
            )
        };
        let cloud = start();
        let sturdy = SturdyRef::new(server_vat, vec![addr(7830)], object.clone()).expect("a ref");
        let vat_ref =
            SturdyRef::new(cloud_vat, vec![addr(7831)], ObjectId::random()).expect("a ref");
        let (held_tx, held) = std::sync::mpsc::channel();
        let (restarted_tx, restarted) = tokio::sync::oneshot::channel::<Instant>();
        let office = bed.run_async_in(Side::Office, move || async move {
            let me = Identity::generate();
            let net = office_vat(
                Identity::generate(),
                &format!("{}:0", Bed::OFFICE),
                NetworkConfig::default(),
            )
            .await;
            net.learn_sturdy_ref(&vat_ref);
            let restore = || async {
                rpc::connect_sturdy::<office::Client>(&sturdy, &me, ClientConfig::default())
                    .await
                    .map(|(o, _)| o)
                    .map_err(|e| e.to_string())
            };
            let dial = || async {
                net.connect::<office::Client>(&cloud_vat)
                    .await
                    .map_err(|e| e.to_string())
            };
            let held = [
                restore().await.expect("restore"),
                dial().await.expect("connect"),
            ];
            for h in &held {
                whoami(h).await.expect("a first call");
            }
            held_tx.send(()).expect("the test waits");
            // Each held capability, called every 50 ms until a call fails.
            let until_failure =
                |cap: office::Client| async move {
                    loop {
                        tokio::time::sleep(50 * MS).await;
                        match tokio::time::timeout(Duration::from_secs(10), whoami(&cap)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => break Ok((Instant::now(), e.to_string())),
                            Err(_) => break Err(
                                "a call on a held capability neither failed nor answered in 10 s"
                                    .to_string(),
                            ),
                        }
                    }
                };
            let [a, b] = held;
            let (fa, fb) = futures::join!(until_failure(a), until_failure(b));
            let restarted_at = restarted.await.expect("restarted");
            let ra = recover(restarted_at, restore).await;
            let rb = recover(restarted_at, dial).await;
            net.shutdown().await;
            (fa, fb, ra, rb)
        });
        held.recv().expect("connected");
        std::thread::sleep(500 * MS);
        let stopped_at = Instant::now();
        drop(cloud);
        std::thread::sleep(Duration::from_secs(1));
        let _cloud = start();
        let _ = restarted_tx.send(Instant::now());
        let (fa, fb, ra, rb) = office.join().expect("the office thread");
        for (t, failed, recovered) in [(&mut sturdy_t, fa, ra), (&mut net_t, fb, rb)] {
            t.runs += 1;
            t.attempted += 2;
            match failed {
                Ok((at, e)) => {
                    failed_after.push(at.saturating_duration_since(stopped_at));
                    t.errors.push(e);
                }
                Err(hang) => {
                    t.lost_silently += 1;
                    t.errors.push(hang);
                }
            }
            if let Some(r) = recovered {
                t.delivered += 1;
                t.recover.push(r);
            }
            assert_eq!(t.lost_silently, 0, "{t:?}");
            assert!(recovered.is_some(), "no recovery within 20 s: {t:?}");
        }
    }
    let max_fail = failed_after.iter().max().copied().unwrap_or_default();
    print_table(
        &format!("a server restart (down 1 s) while the office holds capabilities, 50 ms RTT, {n} run(s); held calls failed {:.0}-{:.0} ms after the stop; time to recover: from the restart to an answer on a new capability", failed_after.iter().min().copied().unwrap_or_default().as_secs_f64() * 1e3, max_fail.as_secs_f64() * 1e3),
        &[
            sturdy_t.row("server restart, rpc::serve, sturdy ref restored (connect_sturdy)", "calls"),
            net_t.row("server restart, Network vat, Network::connect again", "calls"),
        ],
    );
    assert!(
        max_fail < Duration::from_secs(2),
        "a held capability failed only {max_fail:?} after the stop"
    );
}
