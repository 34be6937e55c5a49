//! Compares `capnp-noise tunnel` with stunnel, with a pair of plain relays
//! (no crypto: the copy limit of any pair of user-space tunnel ends) and
//! with no tunnel at all.
//!
//! Run it with `benches/tunnel_compare.sh` (which builds the release binary
//! and this example first). For each setup, the same workloads go through
//! the same in-process TCP target:
//!
//! * **direct**: the client connects to the target;
//! * **relay**: client -> relay -> relay -> target, each relay a process
//!   running this example in `--relay` mode: tokio's
//!   `copy_bidirectional_with_sizes` with 256 KiB buffers on a
//!   multi-threaded runtime (as the tunnel's), TCP_NODELAY on every socket;
//! * **socat**: the same with two `socat -b262144 ... nodelay` relays (when
//!   socat is on PATH);
//! * **capnp-noise**: client -> `capnp-noise tunnel client` -> `capnp-noise
//!   tunnel server` -> target, each end pinning the other's VatId;
//! * **capnp-noise-mt** (only with `--only`): the same with `--workers 0`
//!   (every connection on one multi-threaded runtime instead of a
//!   single-threaded runtime per core);
//! * **baseline** (with `--baseline PATH`): the same with another
//!   `capnp-noise` binary, for before/after figures in one run;
//! * **stunnel**: client -> stunnel (client mode) -> stunnel (server mode) ->
//!   target, TLS 1.3, each end pinning the other's self-signed ECDSA P-256
//!   certificate (`verifyPeer`), TCP_NODELAY on every socket, as the
//!   capnp-noise tunnel does.
//!
//! Workloads (sizes can be changed with options, see `--help`):
//!
//! * **bulk**: one connection sends 1 GiB, the target counts it and answers
//!   with the count after the client's half-close; throughput in MiB/s.
//! * **round trips**: one connection, 10 000 sequential exchanges of a
//!   64-byte message that the target echoes; latency per round trip.
//! * **connect**: 200 sequential new connections, each with one 64-byte
//!   round trip (the handshakes: Noise XX, or TLS 1.3 with certificates).
//!
//! Rounds are interleaved: every setup runs each workload once per round,
//! in an order that rotates from round to round, so that a change of load
//! during the run affects every setup alike. Each figure is the median of
//! the rounds (`--runs`), and the ratios between setups are taken within
//! each round, then their median and range are shown. The output starts
//! with the date, the load average (before and after) and the command.
//!
//! `--count` measures, instead of times, what does not depend on the load:
//! the system calls of the two tunnel-end processes (`strace -f -c`) and
//! their context switches (`/proc/PID/task/*/status`, without strace), per
//! MiB of bulk and per 64-byte round trip, one setup at a time.
//!
//! Tunnel processes are children of this one and are killed when it ends.
//! The tunnel and stunnel pairs are configured by `capnp_noise_test::launch`,
//! as in the WAN comparison (`capnp_noise_test::wan::compare`).

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capnp_noise_test::launch::{self, Children as Procs, StunnelEnd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "\
usage: tunnel_bench --capnp-noise PATH [--stunnel PATH] [--baseline PATH] [--bytes N] [--rounds N]
                    [--connects N] [--runs N] [--only LIST] [--count]
  --capnp-noise PATH  the release binary (benches/tunnel_compare.sh passes it)
  --stunnel PATH      stunnel (default: stunnel4 on PATH)
  --bytes N           bulk transfer size (default 1073741824)
  --rounds N          round trips (default 10000)
  --connects N        new connections (default 200)
  --runs N            interleaved rounds; medians are shown (default 3)
  --only LIST         setups, comma-separated, of: direct,relay,socat,capnp-noise,
                      capnp-noise-mt,baseline,stunnel (default: direct,relay,socat,
                      capnp-noise,stunnel; socat only if on PATH; baseline with --baseline)
  --baseline PATH     another capnp-noise binary (an older build, another
                      BULK_FRAMES), run as the setup baseline
  --count             count system calls (strace -f -c) and context switches
                      per MiB and per round trip instead of timing
  --memory N          instead: the resident memory of the two tunnel ends
                      with N connections busy both ways at once (each
                      echoing max(bytes / N, 16 MiB)), per connection
       tunnel_bench --relay --connect ADDR
                      (internal) one plain relay: prints addr=..., forwards to ADDR";

const SETUPS: [&str; 7] = [
    "direct",
    "relay",
    "socat",
    "capnp-noise",
    "capnp-noise-mt",
    "baseline",
    "stunnel",
];

struct Options {
    capnp_noise: PathBuf,
    stunnel: String,
    baseline: Option<PathBuf>,
    bytes: u64,
    rounds: usize,
    connects: usize,
    runs: usize,
    only: Vec<String>,
    count: bool,
    memory: usize,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        capnp_noise: PathBuf::new(),
        stunnel: "stunnel4".into(),
        baseline: None,
        bytes: 1 << 30,
        rounds: 10_000,
        connects: 200,
        runs: 3,
        only: Vec::new(),
        count: false,
        memory: 0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--capnp-noise" => o.capnp_noise = value()?.into(),
            "--stunnel" => o.stunnel = value()?,
            "--baseline" => o.baseline = Some(value()?.into()),
            "--bytes" => o.bytes = num(value()?)?,
            "--rounds" => o.rounds = num(value()?)? as usize,
            "--connects" => o.connects = num(value()?)? as usize,
            "--runs" => o.runs = num(value()?)?.max(1) as usize,
            "--only" => {
                o.only = value()?.split(',').map(str::to_string).collect();
                if let Some(bad) = o.only.iter().find(|s| !SETUPS.contains(&s.as_str())) {
                    return Err(format!("--only: unknown setup {bad}"));
                }
            }
            "--count" => o.count = true,
            "--memory" => o.memory = num(value()?)?.max(1) as usize,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.capnp_noise.as_os_str().is_empty() {
        return Err("--capnp-noise is required".into());
    }
    Ok(o)
}

// ----- the target -----

/// The target: the first byte of a connection chooses the workload.
/// b'B': count everything until the client's half-close, answer the count.
/// b'E': echo.
async fn target() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let mut kind = [0u8; 1];
                if s.read_exact(&mut kind).await.is_err() {
                    return;
                }
                match kind[0] {
                    b'B' => {
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut n = 0u64;
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) => break,
                                Ok(k) => n += k as u64,
                                Err(_) => return,
                            }
                        }
                        let _ = s.write_all(&n.to_be_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                    _ => {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                }
            });
        }
    });
    addr
}

// ----- workloads -----

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

/// Seconds to push `bytes` through and get the count back.
async fn bulk(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = connect(addr).await;
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    s.write_all(b"B").await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(u64::from_be_bytes(count), bytes, "bytes lost in transit");
    secs
}

const MSG: usize = 64;

/// Microseconds per round trip, sorted.
async fn round_trips(addr: SocketAddr, rounds: usize) -> Vec<f64> {
    let mut s = connect(addr).await;
    s.write_all(b"E").await.unwrap();
    let msg = [0x42u8; MSG];
    let mut back = [0u8; MSG];
    // Warm up (first frames, lazily grown buffers).
    for _ in 0..100 {
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
    }
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg).await.unwrap();
        s.read_exact(&mut back).await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    assert_eq!(back, msg);
    times.sort_by(f64::total_cmp);
    times
}

/// Milliseconds per new connection with one round trip, sorted.
async fn connects(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(n);
    let msg = [0x17u8; MSG];
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(addr).await;
        s.write_all(b"E").await.unwrap();
        s.write_all(&msg).await.unwrap();
        let mut back = [0u8; MSG];
        s.read_exact(&mut back).await.unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default, Clone, Copy)]
struct Figures {
    mib_s: f64,
    rtt_mean: f64,
    rtt_p50: f64,
    rtt_p99: f64,
    connect_p50: f64,
}

/// One round of the three workloads through `addr`.
async fn one_round(name: &str, addr: SocketAddr, o: &Options, run: usize) -> Figures {
    let secs = bulk(addr, o.bytes).await;
    let rt = round_trips(addr, o.rounds).await;
    let c = connects(addr, o.connects).await;
    let f = Figures {
        mib_s: o.bytes as f64 / (1 << 20) as f64 / secs,
        rtt_mean: rt.iter().sum::<f64>() / rt.len() as f64,
        rtt_p50: percentile(&rt, 0.5),
        rtt_p99: percentile(&rt, 0.99),
        connect_p50: percentile(&c, 0.5),
    };
    eprintln!(
        "{name}: round {run}: {:.0} MiB/s, round trip p50 {:.1} us, connect {:.2} ms",
        f.mib_s, f.rtt_p50, f.connect_p50
    );
    f
}

fn medians(rounds: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(rounds.iter().map(f).collect());
    Figures {
        mib_s: m(|f| f.mib_s),
        rtt_mean: m(|f| f.rtt_mean),
        rtt_p50: m(|f| f.rtt_p50),
        rtt_p99: m(|f| f.rtt_p99),
        connect_p50: m(|f| f.connect_p50),
    }
}

// ----- the setups -----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `capnp-noise tunnel ARGS` into `procs`; returns its listening
/// address and VatId.
fn capnp_noise(procs: &mut Procs, bin: &Path, args: &[OsString]) -> (SocketAddr, String) {
    let child = command(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start capnp-noise");
    procs.push(child);
    let stdout = procs.0.last_mut().and_then(|c| c.stdout.take()).unwrap();
    let mut vat = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(v) = line.strip_prefix("vat_id=") {
            vat = v.to_string();
        }
        if let Some(addr) = line.split(' ').find_map(|kv| kv.strip_prefix("addr=")) {
            return (addr.parse().unwrap(), vat);
        }
    }
    panic!("capnp-noise {args:?} exited before listening");
}

/// A `capnp-noise tunnel` pair of `bin` in front of `target`, each end
/// started with `extra` options too.
fn capnp_noise_pair(
    bin: &Path,
    dir: &Path,
    target: SocketAddr,
    extra: &[&str],
) -> (Procs, SocketAddr) {
    let key = |name: &str| {
        let path = dir.join(name);
        // A setup started again (--count) makes new keys.
        let _ = std::fs::remove_file(&path);
        let out = Command::new(bin)
            .args(["keygen", "-o"])
            .arg(&path)
            .output()
            .expect("keygen");
        assert!(out.status.success());
        let vat = String::from_utf8(out.stdout).unwrap().trim().to_string();
        (path, vat)
    };
    let (server_key, _) = key("server.key");
    let (client_key, client_vat) = key("client.key");
    let with_extra = |mut args: Vec<OsString>| {
        args.extend(extra.iter().map(OsString::from));
        args
    };
    let mut procs = Procs::default();
    let server_args =
        launch::tunnel_server_args("127.0.0.1:0", &target.to_string(), &server_key, &client_vat);
    let (server_addr, server_vat) = capnp_noise(&mut procs, bin, &with_extra(server_args));
    let client_args = launch::tunnel_client_args(
        "127.0.0.1:0",
        &server_addr.to_string(),
        &client_key,
        &server_vat,
    );
    let (local, _) = capnp_noise(&mut procs, bin, &with_extra(client_args));
    (procs, local)
}

/// `--relay` mode: one plain relay on a multi-threaded runtime (as the
/// tunnel's): copies both ways with 256 KiB buffers, TCP_NODELAY on both
/// sockets, no crypto.
fn relay_main(to: SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("addr={}", listener.local_addr().expect("addr"));
        while let Ok((mut a, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                let Ok(mut b) = TcpStream::connect(to).await else {
                    return;
                };
                let _ = b.set_nodelay(true);
                let _ =
                    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 256 << 10, 256 << 10)
                        .await;
            });
        }
    });
}

/// Starts this example in `--relay` mode towards `to`.
fn relay(procs: &mut Procs, to: SocketAddr) -> SocketAddr {
    let me = std::env::current_exe().expect("current_exe");
    let mut child = command(me)
        .args(["--relay", "--connect", &to.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a relay");
    let stdout = child.stdout.take().unwrap();
    procs.push(child);
    for line in BufReader::new(stdout).lines() {
        if let Some(addr) = line.unwrap().strip_prefix("addr=") {
            return addr.parse().unwrap();
        }
    }
    panic!("a relay exited before listening");
}

fn relay_pair(target: SocketAddr) -> (Procs, SocketAddr) {
    let mut procs = Procs::default();
    let server_end = relay(&mut procs, target);
    let client_end = relay(&mut procs, server_end);
    (procs, client_end)
}

/// Waits until a round trip goes through `local`.
async fn ready(what: &str, local: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = TcpStream::connect(local).await.ok()?;
            s.write_all(b"Eping").await.ok()?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.ok()?;
            Some(())
        })
        .await;
        if let Ok(Some(())) = attempt {
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two `socat -b262144 ... nodelay` relays (a process forked per
/// connection), as the relay pair.
async fn socat_pair(target: SocketAddr) -> (Procs, SocketAddr) {
    let (server_port, client_port) = (free_port(), free_port());
    let spawn = |port: u16, to: String| {
        command("socat")
            .arg("-b262144")
            .arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"
            ))
            .arg(format!("TCP:{to},nodelay"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("socat (apt-get install socat)")
    };
    let procs = Procs(vec![
        spawn(server_port, target.to_string()),
        spawn(client_port, format!("127.0.0.1:{server_port}")),
    ]);
    let local = SocketAddr::from(([127, 0, 0, 1], client_port));
    ready("socat", local).await;
    (procs, local)
}

async fn stunnel_pair(stunnel: &str, dir: &Path, target: SocketAddr) -> (Procs, SocketAddr) {
    launch::stunnel_certificates(dir);
    let (server_port, client_port) = (free_port(), free_port());
    let server_conf = launch::stunnel_config(
        dir,
        StunnelEnd::Server,
        &[(
            "server",
            format!("127.0.0.1:{server_port}"),
            target.to_string(),
        )],
    );
    let client_conf = launch::stunnel_config(
        dir,
        StunnelEnd::Client,
        &[(
            "client",
            format!("127.0.0.1:{client_port}"),
            format!("127.0.0.1:{server_port}"),
        )],
    );
    let spawn = |conf: &Path| {
        command(stunnel)
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{stunnel}: {e} (apt-get install stunnel4)"))
    };
    let procs = Procs(vec![spawn(&server_conf), spawn(&client_conf)]);
    eprintln!(
        "stunnel: negotiated {}",
        tls_probe(dir, SocketAddr::from(([127, 0, 0, 1], server_port)))
    );
    let local = SocketAddr::from(([127, 0, 0, 1], client_port));
    // Ready when a round trip goes through both.
    ready("stunnel", local).await;
    (procs, local)
}

/// What the stunnel server negotiates with an OpenSSL client holding the
/// client certificate (as the stunnel client does).
fn tls_probe(dir: &Path, server: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("openssl")
            .args(["s_client", "-brief", "-connect", &server.to_string()])
            .arg("-cert")
            .arg(dir.join("client.cert.pem"))
            .arg("-key")
            .arg(dir.join("client.key.pem"))
            .arg("-CAfile")
            .arg(dir.join("server.cert.pem"))
            .stdin(Stdio::null())
            .output()
            .expect("openssl s_client");
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        let found: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("Protocol version") || l.starts_with("Ciphersuite"))
            .collect();
        if !found.is_empty() {
            return found.join(", ");
        }
        if Instant::now() > deadline {
            return format!("(unknown: {})", text.trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ----- main -----

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let stunnel = Command::new("stunnel4")
        .arg("-version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .filter(|l| l.starts_with("stunnel") || l.starts_with("Compiled"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {kernel}; {stunnel}")
}

// ----- counting (--count) -----

/// When set, tunnel-end processes start under `strace -f -c -o DIR/N`.
static STRACE: std::sync::Mutex<Option<(PathBuf, usize)>> = std::sync::Mutex::new(None);

/// `program`, under strace when counting system calls.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut strace = STRACE.lock().unwrap();
    match strace.as_mut() {
        None => Command::new(program),
        Some((dir, n)) => {
            *n += 1;
            let mut c = Command::new("strace");
            c.args(["-f", "-c", "-o"])
                .arg(dir.join(n.to_string()))
                .arg(program);
            c
        }
    }
}

/// Context switches (voluntary, involuntary) of every thread of `pids`.
fn context_switches(pids: &[u32]) -> (u64, u64) {
    let mut total = (0, 0);
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            for line in status.lines() {
                let value = |l: &str| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                };
                if line.starts_with("voluntary_ctxt_switches") {
                    total.0 += value(line).unwrap_or(0);
                } else if line.starts_with("nonvoluntary_ctxt_switches") {
                    total.1 += value(line).unwrap_or(0);
                }
            }
        }
    }
    total
}

/// Stops strace-wrapped `procs` (SIGTERM to the traced processes: strace
/// then writes its summary and exits) and sums the summaries in `dir`:
/// calls per system call.
fn strace_totals(procs: &mut Procs, dir: &Path) -> Vec<(String, u64)> {
    for c in &mut procs.0 {
        let pid = c.id();
        let traced =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in traced.split_whitespace() {
            let _ = Command::new("kill").arg("-TERM").arg(child).status();
        }
    }
    for c in &mut procs.0 {
        let _ = c.wait();
    }
    let mut calls = std::collections::BTreeMap::<String, u64>::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() && cols[cols.len() - 1] != "total"
            {
                if let Ok(n) = cols[3].parse::<u64>() {
                    *calls.entry(cols[cols.len() - 1].to_string()).or_default() += n;
                }
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
    let mut v: Vec<(String, u64)> = calls.into_iter().collect();
    v.sort_by_key(|c| std::cmp::Reverse(c.1));
    v
}

/// `--count`: per setup and workload, context switches (a run without
/// strace) and system calls (a run under strace) of the two tunnel ends.
async fn count(o: &Options, setups: &[&str], dir: &Path, target: SocketAddr) {
    let counts = dir.join("strace");
    std::fs::create_dir_all(&counts).unwrap();
    println!("| setup | workload | unit | syscalls / unit | of which (top 5) | context switches / unit (voluntary + involuntary) |");
    println!("|---|---|---|---:|---|---:|");
    for &name in setups.iter().filter(|&&s| s != "direct") {
        for workload in ["bulk", "rtt"] {
            let (units, unit) = match workload {
                "bulk" => (o.bytes as f64 / (1 << 20) as f64, "MiB"),
                _ => ((o.rounds + 100) as f64, "64-byte round trip"),
            };
            let run = |addr| async move {
                connects(addr, 5).await;
                match workload {
                    "bulk" => drop(bulk(addr, o.bytes).await),
                    _ => drop(round_trips(addr, o.rounds).await),
                }
            };
            // Context switches, without strace.
            let (procs, addr) = start(name, o, dir, target).await;
            let pids: Vec<u32> = procs.0.iter().map(Child::id).collect();
            let before = context_switches(&pids);
            run(addr).await;
            let after = context_switches(&pids);
            drop(procs);
            let switches = if name == "socat" {
                "n/a (a process per connection)".to_string()
            } else {
                format!(
                    "{:.2} ({:.2} + {:.2})",
                    (after.0 + after.1 - before.0 - before.1) as f64 / units,
                    (after.0 - before.0) as f64 / units,
                    (after.1 - before.1) as f64 / units
                )
            };
            // System calls, under strace.
            *STRACE.lock().unwrap() = Some((counts.clone(), 0));
            let (mut procs, addr) = start(name, o, dir, target).await;
            *STRACE.lock().unwrap() = None;
            run(addr).await;
            let calls = strace_totals(&mut procs, &counts);
            drop(procs);
            let total: u64 = calls.iter().map(|c| c.1).sum();
            let top: Vec<String> = calls
                .iter()
                .take(5)
                .map(|(n, c)| format!("{n} {:.2}", *c as f64 / units))
                .collect();
            println!(
                "| {name} | {workload} | {unit} | {:.2} | {} | {switches} |",
                total as f64 / units,
                top.join(", ")
            );
        }
    }
    println!();
    println!(
        "(both tunnel-end processes, start-up and 5 warm-up connections included; \
         per round trip: {} rounds + 100 warm-up)",
        o.rounds
    );
}

/// Resident memory (VmRSS, KiB) of `pids`, summed.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Echoes `bytes` through `addr`, writing and reading at once.
async fn echo_both_ways(addr: SocketAddr, bytes: u64) {
    let s = connect(addr).await;
    let (mut r, mut w) = s.into_split();
    let writer = async move {
        w.write_all(b"E").await.unwrap();
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            w.write_all(&buf[..n]).await.unwrap();
            left -= n as u64;
        }
        w
    };
    let reader = async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < bytes {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "the echo ended early");
            got += n as u64;
        }
    };
    let (_w, ()) = tokio::join!(writer, reader);
}

/// `--memory N`: per setup, the resident memory of its processes idle
/// (after 5 connections), and at its peak (sampled every 10 ms) while N
/// connections echo at once; the difference per connection.
async fn memory(o: &Options, setups: &[&str], dir: &Path, target: SocketAddr) {
    let n = o.memory;
    let each = (o.bytes / n as u64).max(16 << 20);
    println!(
        "memory: {n} connections at once, each echoing {} MiB (both directions busy)",
        each >> 20
    );
    println!();
    println!("| setup | RSS idle, KiB (both ends) | RSS peak with {n} busy, KiB | per busy connection, KiB (both ends) | MiB/s each way, all connections |");
    println!("|---|---:|---:|---:|---:|");
    // socat forks a process per connection, which these pids do not cover.
    for &name in setups.iter().filter(|&&s| s != "direct" && s != "socat") {
        let (procs, addr) = start(name, o, dir, target).await;
        connects(addr, 5).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pids = procs.pids();
        let idle = rss_kib(&pids);
        let started = Instant::now();
        let transfers = (0..n).map(|_| tokio::spawn(echo_both_ways(addr, each)));
        let transfers: Vec<_> = transfers.collect();
        let mut peak = idle;
        let mut all = Box::pin(async {
            for t in transfers {
                t.await.unwrap();
            }
        });
        loop {
            tokio::select! {
                () = &mut all => break,
                () = tokio::time::sleep(Duration::from_millis(10)) => {
                    peak = peak.max(rss_kib(&pids));
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        drop(procs);
        println!(
            "| {name} | {idle} | {peak} | {:.0} | {:.0} |",
            (peak - idle) as f64 / n as f64,
            (each * n as u64) as f64 / (1 << 20) as f64 / secs
        );
    }
}

/// Starts setup `name` in front of `target`: its processes and the address
/// a client connects to.
async fn start(name: &str, o: &Options, dir: &Path, target: SocketAddr) -> (Procs, SocketAddr) {
    match name {
        "direct" => (Procs::default(), target),
        "relay" => relay_pair(target),
        "socat" => socat_pair(target).await,
        "capnp-noise" => capnp_noise_pair(&o.capnp_noise, dir, target, &[]),
        "capnp-noise-mt" => capnp_noise_pair(&o.capnp_noise, dir, target, &["--workers", "0"]),
        "baseline" => {
            let bin = o.baseline.as_deref().expect("--baseline PATH");
            capnp_noise_pair(bin, dir, target, &[])
        }
        "stunnel" => stunnel_pair(&o.stunnel, dir, target).await,
        other => unreachable!("setup {other}"),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--relay") {
        let to = args
            .iter()
            .position(|a| a == "--connect")
            .and_then(|i| args.get(i + 1))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                eprintln!("{USAGE}");
                std::process::exit(2)
            });
        return relay_main(to);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench());
}

async fn bench() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("tunnel_bench: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    let have_socat = Command::new("socat").arg("-V").output().is_ok();
    let setups: Vec<&str> = SETUPS
        .iter()
        .copied()
        .filter(|s| {
            if o.only.is_empty() {
                match *s {
                    "socat" => have_socat,
                    "capnp-noise-mt" => false,
                    "baseline" => o.baseline.is_some(),
                    _ => true,
                }
            } else {
                o.only.iter().any(|x| x == s)
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let target = target().await;
    let command_line: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "date: {}; load average before: {}",
        utc_now(),
        load_average()
    );
    println!("command: tunnel_bench {}", command_line.join(" "));
    println!("machine: {}", machine());
    eprintln!(
        "capnp-noise: negotiating {} (the initiator's preferred suite on this CPU)",
        capnp_noise::wire::Suite::preferred().noise_name()
    );
    if o.memory > 0 {
        memory(&o, &setups, dir.path(), target).await;
        println!("load average after: {}", load_average());
        return;
    }
    if o.count {
        println!(
            "counts: bulk {} MiB one way; {} round trips of {MSG} bytes",
            o.bytes >> 20,
            o.rounds
        );
        println!();
        count(&o, &setups, dir.path(), target).await;
        println!("load average after: {}", load_average());
        return;
    }
    println!(
        "workloads: bulk {} MiB one way; {} round trips of {MSG} bytes; {} new connections with one round trip; {} interleaved rounds, medians shown",
        o.bytes >> 20,
        o.rounds,
        o.connects,
        o.runs
    );
    let mut running = Vec::new();
    for &name in &setups {
        let (procs, addr) = start(name, &o, dir.path(), target).await;
        eprintln!("{name}: warming up");
        connects(addr, 5).await;
        running.push((name, procs, addr));
    }
    let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); setups.len()];
    for run in 1..=o.runs {
        // The order rotates, so no setup always runs first or last.
        for k in 0..setups.len() {
            let i = (k + run - 1) % setups.len();
            let (name, _, addr) = &running[i];
            rounds[i].push(one_round(name, *addr, &o, run).await);
        }
    }
    drop(running);
    let load_after = load_average();
    let figures: Vec<Figures> = rounds.iter().map(|r| medians(r)).collect();
    let of = |name: &str| setups.iter().position(|s| *s == name);
    let base = of("direct").map(|i| figures[i]);

    println!();
    println!(
        "| setup | bulk MiB/s | vs direct | round trip mean µs | p50 µs | p99 µs | connect + 1 round trip, p50 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, f) in setups.iter().zip(&figures) {
        let vs = base.map_or("".into(), |b| format!("{:.2}", f.mib_s / b.mib_s));
        println!(
            "| {name} | {:.0} | {vs} | {:.1} | {:.1} | {:.1} | {:.2} |",
            f.mib_s, f.rtt_mean, f.rtt_p50, f.rtt_p99, f.connect_p50
        );
    }
    // Ratios within each round, then their median and range.
    println!();
    println!(
        "Same-round ratios (median of {} rounds, [min..max]):",
        o.runs
    );
    println!();
    println!("| capnp-noise vs | bulk throughput | round trip p50 (lower is better) | connect p50 (lower is better) |");
    println!("|---|---:|---:|---:|");
    if let Some(noise) = of("capnp-noise") {
        for other in [
            "relay",
            "socat",
            "stunnel",
            "capnp-noise-mt",
            "baseline",
            "direct",
        ] {
            let Some(j) = of(other) else { continue };
            let ratio = |f: fn(&Figures) -> f64| {
                let v: Vec<f64> = rounds[noise]
                    .iter()
                    .zip(&rounds[j])
                    .map(|(a, b)| f(a) / f(b))
                    .collect();
                let (lo, hi) = v
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
                format!("{:.2} [{lo:.2}..{hi:.2}]", median(v))
            };
            println!(
                "| {other} | {} | {} | {} |",
                ratio(|f| f.mib_s),
                ratio(|f| f.rtt_p50),
                ratio(|f| f.connect_p50)
            );
        }
    }
    println!();
    println!("load average after: {load_after}");
}
