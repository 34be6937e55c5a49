//! Scaling of the multi-worker RPC server (`rpc::Server`): handshakes per
//! second and RPC calls per second with many clients, 1 worker against 2
//! workers (or any list), in one run, interleaved.
//!
//! ```sh
//! cargo bench --bench workers                     # 5 rounds of 3 s per figure, 8 clients
//! cargo bench --bench workers -- --rounds 7 --seconds 5 --clients 16 --workers 1,2
//! ```
//!
//! The server runs in this process (its accept thread and workers); the
//! clients run in a child process (this binary again, in client mode), each
//! client on a thread of its own with its own runtime, so that they share
//! none of the server's threads. Workloads, each for `--seconds`:
//!
//! * **handshakes**: every client, in a loop: connect (Noise XX, the
//!   preferred suite), one `whoami` call, disconnect. Connections/s.
//! * **calls**: every client connects once, then keeps 8 `echo` calls of 64
//!   bytes in flight. Calls/s.
//!
//! Each round runs every worker count once, in an order that rotates from
//! round to round; the ratios to the first worker count are taken within
//! each round, then their median and range are printed, with the date, the
//! load average before and after, and the command. Timings on a loaded
//! machine are not figures: run it on a quiet one.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_noise::rpc::{self, ClientConfig, Server, ServerConfig};
use capnp_noise::{AnyVat, Identity, Pinned, VatId};
use capnp_noise_test::office::Office;
use capnp_noise_test::schema::demo_capnp::office;
use futures::stream::{FuturesUnordered, StreamExt};

const IN_FLIGHT: usize = 8;
const CLIENT_ENV: &str = "CAPNP_NOISE_WORKERS_BENCH_CLIENT";

struct Options {
    rounds: usize,
    seconds: f64,
    clients: usize,
    workers: Vec<usize>,
}

fn options() -> Options {
    let mut o = Options {
        rounds: 5,
        seconds: 3.0,
        clients: 8,
        workers: vec![1, 2],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => o.rounds = value().parse().expect("--rounds N"),
            "--seconds" => o.seconds = value().parse().expect("--seconds S"),
            "--clients" => o.clients = value().parse().expect("--clients N"),
            "--workers" => {
                o.workers = value()
                    .split(',')
                    .map(|w| w.parse().expect("--workers 1,2"))
                    .collect()
            }
            // cargo bench passes --bench; filters are not used.
            _ => {}
        }
    }
    o
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

// ----- the client process -----

/// One client thread: how many handshakes (or calls) it completed in
/// `seconds`.
fn client_thread(mode: &str, addr: std::net::SocketAddr, server: VatId, seconds: f64) -> u64 {
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime(), async move {
        let me = Identity::generate();
        let connect = || async {
            rpc::connect::<_, office::Client>(
                addr,
                &me,
                Arc::new(Pinned(server)),
                ClientConfig::default(),
            )
            .await
            .expect("connect")
        };
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let mut done = 0u64;
        match mode {
            "handshakes" => {
                while Instant::now() < deadline {
                    let (office, connection) = connect().await;
                    office
                        .whoami_request()
                        .send()
                        .promise
                        .await
                        .expect("whoami");
                    connection.disconnect().await.expect("disconnect");
                    done += 1;
                }
            }
            _ => {
                let (office, connection) = connect().await;
                let call = || {
                    let mut req = office.echo_request();
                    req.get().set_data(&[0x5a; 64]);
                    req.send().promise
                };
                let mut flying: FuturesUnordered<_> = (0..IN_FLIGHT).map(|_| call()).collect();
                while let Some(reply) = flying.next().await {
                    reply.expect("echo");
                    done += 1;
                    if Instant::now() < deadline {
                        flying.push(call());
                    }
                }
                connection.disconnect().await.expect("disconnect");
            }
        }
        done
    })
}

fn client_main(spec: &str) {
    // mode addr vat clients seconds
    let f: Vec<&str> = spec.split(' ').collect();
    let (mode, addr, vat) = (
        f[0].to_string(),
        f[1].parse().unwrap(),
        f[2].parse().unwrap(),
    );
    let (clients, seconds): (usize, f64) = (f[3].parse().unwrap(), f[4].parse().unwrap());
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let mode = mode.clone();
            std::thread::spawn(move || client_thread(&mode, addr, vat, seconds))
        })
        .collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    println!(
        "{total} {} {}",
        start.elapsed().as_secs_f64(),
        cpu_seconds()
    );
}

/// User plus system CPU time of this process so far, in seconds, from
/// `/proc/self/stat` (fields 14 and 15, in clock ticks of 1/100 s: the
/// value of `CLK_TCK` on Linux, which has not changed in decades).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    // `after` starts at field 3, so field 14 is f[11].
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// One measurement: completions per second, and the CPU the server process
/// and the client process used, in cores (CPU seconds per second).
#[derive(Clone, Copy)]
struct Sample {
    rate: f64,
    server_cores: f64,
    client_cores: f64,
}

// ----- the server side -----

/// Completions per second of `mode` against a server with `workers`.
fn measure(mode: &str, workers: usize, o: &Options) -> Sample {
    let id = Identity::generate();
    let server = Server::builder(id.clone(), Office::bootstrap)
        .policy(Arc::new(AnyVat))
        .config(ServerConfig::default())
        .workers(workers)
        .serve(std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let spec = format!(
        "{mode} {} {} {} {}",
        server.local_addr(),
        id.vat_id(),
        o.clients,
        o.seconds
    );
    let server_cpu = cpu_seconds();
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CLIENT_ENV, spec)
        .stderr(Stdio::inherit())
        .output()
        .expect("client process");
    assert!(out.status.success(), "the client process failed");
    // The server's CPU is read before shutdown: closing the connections is
    // not part of the measured work. It includes the process's start of the
    // client and the server's setup, a few milliseconds against seconds.
    let server_cpu = cpu_seconds() - server_cpu;
    server.shutdown();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    let mut next = || -> f64 { f.next().unwrap().parse().unwrap() };
    let (total, secs, client_cpu) = (next(), next(), next());
    Sample {
        rate: total / secs,
        server_cores: server_cpu / secs,
        client_cores: client_cpu / secs,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Ok(spec) = std::env::var(CLIENT_ENV) {
        return client_main(&spec);
    }
    let o = options();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("date: {date}; load average before: {}", load_average());
    println!(
        "command: cargo bench --bench workers -- {}",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "cores: {}; {} clients (a child process, a thread each); {} s per figure; {} rounds, interleaved",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        o.clients,
        o.seconds,
        o.rounds
    );
    let modes = ["handshakes", "calls"];
    // rates[mode][worker index][round]
    let mut rates = vec![vec![Vec::new(); o.workers.len()]; modes.len()];
    for round in 0..o.rounds {
        for k in 0..o.workers.len() {
            let i = (k + round) % o.workers.len();
            for (m, mode) in modes.iter().enumerate() {
                let r = measure(mode, o.workers[i], &o);
                eprintln!(
                    "round {}: {} workers: {:.0} {mode}/s, server {:.2} cores, clients {:.2} cores",
                    round + 1,
                    o.workers[i],
                    r.rate,
                    r.server_cores,
                    r.client_cores
                );
                rates[m][i].push(r);
            }
        }
    }
    println!();
    println!(
        "| workload | workers | median /s | vs {} worker(s) | server cores | client cores | per server core-second | per core-second vs {} worker(s) |",
        o.workers[0], o.workers[0]
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (m, mode) in modes.iter().enumerate() {
        for (i, w) in o.workers.iter().enumerate() {
            let of = |f: fn(&Sample) -> f64| -> Vec<f64> { rates[m][i].iter().map(f).collect() };
            let per_core = |s: &Sample| s.rate / s.server_cores;
            let ratio = |f: fn(&Sample) -> f64| -> String {
                let ratios: Vec<f64> = rates[m][i]
                    .iter()
                    .zip(&rates[m][0])
                    .map(|(a, b)| f(a) / f(b))
                    .collect();
                let (lo, hi) = ratios
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
                format!("{:.2} [{lo:.2}..{hi:.2}]", median(ratios))
            };
            println!(
                "| {mode} | {w} | {:.0} | {} | {:.2} | {:.2} | {:.0} | {} |",
                median(of(|s| s.rate)),
                ratio(|s| s.rate),
                median(of(|s| s.server_cores)),
                median(of(|s| s.client_cores)),
                median(of(per_core)),
                ratio(per_core),
            );
        }
    }
    println!();
    println!(
        "Ratios are the median [min..max] of same-round ratios. \"server cores\" is the server \
         process's CPU time over the run's wall time; on a machine whose cores the clients share, \
         a second worker only gets what the clients leave, so the rate's ratio is bounded by the \
         cores the server gets, while \"per server core-second\" shows whether a worker does \
         less per CPU second when there are more of them (locks, cache lines, wakeups)."
    );
    println!();
    println!("load average after: {}", load_average());
}
