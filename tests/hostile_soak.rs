//! The hostile-vats soak (issue 15): three honest vats run
//! introduce/redeem/call cycles while hostile vats and unauthenticated
//! sockets run the attacks of `tests/hostile.rs` at full speed against the
//! provider, all on loopback. Ignored by default (it takes about
//! `SOAK_SECS` + 15 seconds); run it with
//!
//! ```sh
//! SOAK_SECS=60 cargo test -p capnp-noise --test hostile_soak -- --ignored --nocapture
//! ```
//!
//! (the test profile: this crate unoptimised, its dependencies, the crypto
//! and capnp included, at `opt-level = 2`; add `--release` for a fully
//! optimised run).
//!
//! Sized for a 2-core machine: three OS threads (the provider Carol; Alice
//! and Bob; every attacker), each a single-threaded runtime. It prints the
//! honest success rate, the latency of honest calls before and during the
//! attack, the provider thread's CPU time, the process's peak RSS (all
//! three threads), and fails if fewer than 99 % of the honest cycles
//! succeed during the attack or any thread panicked.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use capnp_noise::intro::{random_nonce, Introduction};
use capnp_noise::network::{Network, NetworkConfig};
use capnp_noise::{Identity, VatId};
use capnp_noise_test::fixtures::initiator_first_flight;
use capnp_noise_test::hostile::RawVat;
use capnp_noise_test::office::office_vat;
use capnp_noise_test::schema::demo_capnp::office;
use capnp_noise_test::support::{local, whoami};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

/// The attack's length, from `SOAK_SECS` (default 60).
fn attack_time() -> Duration {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// How long the honest vats run alone first.
const BASELINE: Duration = Duration::from_secs(10);
/// An honest cycle starts at most this often: 20 a second. Each leaves a
/// redemption record at Carol, charged to Bob's share (256) until the
/// introduction expires, so Bob's introductions live 10 s.
const PACE: Duration = Duration::from_millis(50);
const LIFETIME: Duration = Duration::from_secs(10);

/// User plus system CPU time of the calling thread, from
/// `/proc/thread-self/stat` (in clock ticks of 10 ms, as on Linux).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of the file; `after` starts at field 3.
    Duration::from_millis(10 * (ticks(11) + ticks(12)))
}

/// The process's peak resident set size, in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Carol, the provider, on a thread of her own: her address and VatId, a
/// probe that answers with her thread's CPU time, and the thread.
fn start_carol() -> (
    SocketAddr,
    VatId,
    mpsc::UnboundedSender<oneshot::Sender<Duration>>,
    std::thread::JoinHandle<()>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(local(async move {
            let carol = office_vat(Identity::generate(), "127.0.0.1:0", Default::default()).await;
            let (probe, mut probes) = mpsc::unbounded_channel::<oneshot::Sender<Duration>>();
            tx.send((carol.local_addr().unwrap(), carol.vat_id(), probe))
                .unwrap();
            while let Some(reply) = probes.recv().await {
                let _ = reply.send(thread_cpu());
            }
            carol.shutdown().await;
        }));
    });
    let (addr, vat, probe) = rx.recv().unwrap();
    (addr, vat, probe, thread)
}

async fn carol_cpu(probe: &mpsc::UnboundedSender<oneshot::Sender<Duration>>) -> Duration {
    let (tx, rx) = oneshot::channel();
    probe.send(tx).unwrap();
    rx.await.unwrap()
}

/// Counts of what each attack did, shared with the main thread.
#[derive(Default)]
struct Attacks {
    sockets: AtomicU64,
    first_flights: AtomicU64,
    shared_pointer_accepts: AtomicU64,
    withdrawals: AtomicU64,
    early_redeems: AtomicU64,
    silent_vats: AtomicU64,
}

/// Every attack at once, on a thread of its own, until `stop`.
fn start_attacks(
    addr: SocketAddr,
    carol: VatId,
    stop: Arc<AtomicBool>,
    counts: Arc<Attacks>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(local(async move {
            let running = {
                let stop = stop.clone();
                move || !stop.load(Ordering::Relaxed)
            };
            let mut tasks = Vec::new();
            // Unauthenticated: silent sockets and stalled first flights from
            // 50 loopback addresses, 200 held at a time.
            for stall in [false, true] {
                let (running, counts) = (running.clone(), counts.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let flight = initiator_first_flight();
                    let mut held = VecDeque::new();
                    let mut n = 0u8;
                    while running() {
                        n = n.wrapping_add(1);
                        let source = SocketAddr::from(([127, 0, 0, 2 + n % 50], 0));
                        let socket = tokio::net::TcpSocket::new_v4().unwrap();
                        let _ = socket.bind(source);
                        let Ok(Ok(mut tcp)) =
                            tokio::time::timeout(Duration::from_millis(200), socket.connect(addr))
                                .await
                        else {
                            continue;
                        };
                        if stall {
                            let _ = tcp.write_all(&flight).await;
                            counts.first_flights.fetch_add(1, Ordering::Relaxed);
                        } else {
                            counts.sockets.fetch_add(1, Ordering::Relaxed);
                        }
                        held.push_back(tcp);
                        if held.len() > 200 {
                            held.pop_front();
                        }
                        tokio::task::yield_now().await;
                    }
                }));
            }
            // Authenticated: accepts whose introduction expands through
            // shared pointers, answered one by one.
            {
                let (running, counts) = (running.clone(), counts.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let mut raw = RawVat::connect(&Identity::generate(), carol, addr).await;
                    raw.hello().await;
                    while running() {
                        let (q, _) = raw.accept_shared_blob(1000, 8192).await;
                        raw.accept_answer(q).await;
                        counts
                            .shared_pointer_accepts
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
            // Withdrawals of random nonces, and early redeems of
            // self-signed introductions from 8 redeemers.
            let mallory = Network::builder(Identity::generate())
                .start()
                .await
                .unwrap();
            mallory.add_addresses(carol, &[addr.to_string().parse().unwrap()]);
            {
                let (running, counts, mallory) = (running.clone(), counts.clone(), mallory.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    while running() {
                        if mallory.withdraw(&carol, &random_nonce()).await.is_ok() {
                            counts.withdrawals.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            let introducer = Identity::generate();
            for _ in 0..8 {
                let redeemer = Network::builder(Identity::generate())
                    .start()
                    .await
                    .unwrap();
                redeemer.add_addresses(carol, &[addr.to_string().parse().unwrap()]);
                for _ in 0..24 {
                    let (running, counts, redeemer, introducer) = (
                        running.clone(),
                        counts.clone(),
                        redeemer.clone(),
                        introducer.clone(),
                    );
                    tasks.push(tokio::task::spawn_local(async move {
                        while running() {
                            let intro = Introduction::new(
                                &introducer,
                                carol,
                                vec![addr.to_string().parse().unwrap()],
                                redeemer.vat_id(),
                                random_nonce(),
                                SystemTime::now() + Duration::from_secs(300),
                            )
                            .unwrap();
                            let _ = redeemer.redeem::<office::Client>(&intro).await;
                            counts.early_redeems.fetch_add(1, Ordering::Relaxed);
                        }
                    }));
                }
            }
            // Authenticated connections of a higher VatId that never say
            // hello, 50 held at a time.
            {
                let (running, counts) = (running.clone(), counts.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let silent = loop {
                        let id = Identity::generate();
                        if id.vat_id() > carol {
                            break id;
                        }
                    };
                    let mut held = VecDeque::new();
                    while running() {
                        let connect = RawVat::try_connect(&silent, carol, addr);
                        if let Ok(Some(raw)) =
                            tokio::time::timeout(Duration::from_secs(2), connect).await
                        {
                            held.push_back(raw);
                            counts.silent_vats.fetch_add(1, Ordering::Relaxed);
                        }
                        if held.len() > 50 {
                            held.pop_front();
                        }
                    }
                }));
            }
            while running() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            for t in tasks {
                t.abort();
            }
        }));
    })
}

/// One honest cycle: Bob introduces his Office at Carol to Alice, Alice
/// redeems it and calls it. Returns the call's latency.
async fn cycle(
    alice: &Network,
    bob: &Network,
    at_carol: &office::Client,
    carol: VatId,
) -> Result<Duration, String> {
    let intro = bob
        .introduce(at_carol, &carol, &alice.vat_id())
        .await
        .map_err(|e| format!("introduce: {e}"))?;
    let office: office::Client = alice
        .redeem(&intro)
        .await
        .map_err(|e| format!("redeem: {e}"))?;
    let start = Instant::now();
    let who = whoami(&office).await.map_err(|e| format!("call: {e}"))?;
    let took = start.elapsed();
    if who != alice.vat_id().to_string() {
        return Err(format!("the Office answered as {who}"));
    }
    Ok(took)
}

/// Honest cycles for `time`: latencies of the successful calls, failures.
async fn run_cycles(
    alice: &Network,
    bob: &Network,
    at_carol: &office::Client,
    carol: VatId,
    time: Duration,
) -> (Vec<Duration>, Vec<String>) {
    let end = Instant::now() + time;
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    while Instant::now() < end {
        let next = tokio::time::Instant::now() + PACE;
        match cycle(alice, bob, at_carol, carol).await {
            Ok(t) => ok.push(t),
            Err(e) => failed.push(e),
        }
        tokio::time::sleep_until(next).await;
    }
    (ok, failed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn describe(what: &str, mut calls: Vec<Duration>, failed: &[String]) -> f64 {
    calls.sort();
    let total = calls.len() + failed.len();
    let rate = calls.len() as f64 / total.max(1) as f64;
    println!(
        "{what}: {} cycles, {} succeeded ({:.2} %); call latency p50 {:?}, p99 {:?}, max {:?}",
        total,
        calls.len(),
        100.0 * rate,
        percentile(&calls, 0.5),
        percentile(&calls, 0.99),
        calls.last().copied().unwrap_or_default(),
    );
    for e in failed.iter().take(5) {
        println!("  failure: {e}");
    }
    rate
}

#[test]
#[ignore = "a soak of about a minute: see the file's documentation"]
fn honest_vats_are_served_while_hostile_vats_attack() {
    let attack = attack_time();
    let (addr, carol, probe, carol_thread) = start_carol();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Attacks::default());
    let attacker = rt.block_on(local(async {
        let options = NetworkConfig::default().with_introduction_lifetime(LIFETIME);
        let alice = office_vat(Identity::generate(), "127.0.0.1:0", options.clone()).await;
        let bob = office_vat(Identity::generate(), "127.0.0.1:0", options).await;
        bob.add_addresses(carol, &[addr.to_string().parse().unwrap()]);
        let at_carol: office::Client = bob.connect(&carol).await.unwrap();

        let cpu0 = carol_cpu(&probe).await;
        let (calls, failed) = run_cycles(&alice, &bob, &at_carol, carol, BASELINE).await;
        let cpu1 = carol_cpu(&probe).await;
        describe("before the attack", calls, &failed);
        println!(
            "  provider CPU {:?} in {:?}; process peak RSS {} KiB",
            cpu1 - cpu0,
            BASELINE,
            peak_rss_kib()
        );

        let attacker = start_attacks(addr, carol, stop.clone(), counts.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (calls, failed) = run_cycles(&alice, &bob, &at_carol, carol, attack).await;
        let cpu2 = carol_cpu(&probe).await;
        stop.store(true, Ordering::Relaxed);
        let rate = describe("during the attack", calls, &failed);
        println!(
            "  provider CPU {:?} in {:?}; process peak RSS {} KiB",
            cpu2 - cpu1,
            attack + Duration::from_secs(1),
            peak_rss_kib()
        );
        let c = &counts;
        println!(
            "  attacks: {} silent sockets, {} stalled first flights, {} shared-pointer accepts, \
             {} withdrawals, {} early redeems, {} connections without hello",
            c.sockets.load(Ordering::Relaxed),
            c.first_flights.load(Ordering::Relaxed),
            c.shared_pointer_accepts.load(Ordering::Relaxed),
            c.withdrawals.load(Ordering::Relaxed),
            c.early_redeems.load(Ordering::Relaxed),
            c.silent_vats.load(Ordering::Relaxed),
        );
        assert!(
            rate >= 0.99,
            "only {:.2} % of honest cycles succeeded",
            100.0 * rate
        );
        attacker
    }));
    drop(probe);
    attacker.join().expect("no attacker panicked");
    carol_thread.join().expect("the provider did not panic");
}
