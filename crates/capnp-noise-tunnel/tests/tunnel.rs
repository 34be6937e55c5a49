//! `capnp-noise tunnel` as real processes on loopback: plain TCP through a
//! tunnel pair (many connections, large transfers, half-close), refusals
//! on both sides, an unreachable target, shutdown on SIGTERM, a
//! configuration file with two services, misconfigurations, Cap'n Proto
//! peers written with pycapnp talking across the tunnel (to each other, and
//! to a native capnp-noise RPC server), and a session captured by tcpdump
//! and decoded with the key log that `CAPNP_NOISE_KEYLOG` made the tunnel
//! write.
//!
//! Every tunnel is a child process of the built binary, listening on port 0;
//! the tests read the bound addresses from its stdout and its logs from its
//! stderr. Children are killed when dropped, and every wait is bounded.
//!
//! Tests with real software no one here wrote need it on PATH: `socat`
//! (Debian) as a NAT that drops idle flows and to reach Unix sockets,
//! `tcpdump` (Debian, run as root) to capture loopback traffic,
//! `tinyproxy`, systemd's `systemd-analyze` and `systemd-socket-activate`,
//! `python3` with `pycapnp` (2.2.4), `proxy-protocol` (0.11.3) and
//! `prometheus-client` (0.26.0). Without it they are skipped (printed past
//! libtest's capture, and counted on the binary's last line), except when
//! the `CI` environment variable is `true` or `1`: then they fail.

use capnp_noise_test::office;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use capnp_noise::rpc::{self, PeerInfo, ServerConfig};
use capnp_noise::{Identity, Pinned, VatId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(30);
/// "Promptly": how soon a refused or failed connection must be closed.
const PROMPTLY: Duration = Duration::from_secs(5);

// ----- tunnel processes -----

/// A running `capnp-noise tunnel` process.
struct Tunnel {
    child: Child,
    vat_id: VatId,
    addrs: HashMap<String, SocketAddr>,
    /// The metrics endpoint (with `--metrics`).
    metrics: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    /// Says when all of the child's stderr is in `stderr` (the pipe ended).
    stderr_done: mpsc::Receiver<()>,
}

impl Tunnel {
    /// Starts `capnp-noise tunnel ARGS` and waits until it prints the
    /// addresses of `services` services.
    fn start(args: &[&str], services: usize) -> Tunnel {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capnp-noise"));
        cmd.arg("tunnel").args(args);
        Tunnel::spawn(cmd, services)
    }

    /// Runs `cmd` (which runs `capnp-noise tunnel ...`) as [`start`] does.
    fn spawn(mut cmd: Command, services: usize) -> Tunnel {
        let args = format!("{cmd:?}");
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start capnp-noise");
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_done = collect(child.stderr.take().unwrap(), stderr.clone());
        let lines = lines(child.stdout.take().unwrap());
        let mut tunnel = Tunnel {
            child,
            vat_id: Identity::generate().vat_id(),
            addrs: HashMap::new(),
            metrics: None,
            stderr,
            stderr_done,
        };
        let deadline = Instant::now() + WAIT;
        let mut vat_id = None;
        let mut listening = 0;
        while listening < services {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = lines.recv_timeout(left) else {
                panic!(
                    "tunnel {args:?} did not start: {:?}\nstderr:\n{}",
                    tunnel.child.try_wait(),
                    tunnel.log()
                );
            };
            if let Some(v) = line.strip_prefix("vat_id=") {
                vat_id = Some(v.parse().expect("a VatId"));
            } else if let Some(a) = line.strip_prefix("metrics addr=") {
                tunnel.metrics = Some(a.parse().expect("an address"));
            } else if let Some(rest) = line.strip_prefix("listening ") {
                let field = |key: &str| {
                    rest.split(' ')
                        .find_map(|kv| kv.strip_prefix(key))
                        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                        .to_string()
                };
                // A unix: address is not a SocketAddr: its path is known.
                if let Ok(addr) = field("addr=").parse() {
                    tunnel.addrs.insert(field("service="), addr);
                }
                listening += 1;
            }
        }
        tunnel.vat_id = vat_id.expect("the VatId is printed before the addresses");
        tunnel
    }

    fn addr(&self, service: &str) -> SocketAddr {
        self.addrs[service]
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until the log has a line containing every one of `needles`;
    /// returns that line.
    fn wait_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}; log:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The log is complete only once the collecting thread has
                // read the pipe to its end: a check of the log right after
                // the exit could otherwise miss its last lines.
                let _ = self.stderr_done.recv_timeout(WAIT);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {within:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Appends what `from` yields to `into` until its end, on a thread; the
/// receiver gets `()` (or sees the thread gone) once all of it is in.
fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> mpsc::Receiver<()> {
    let (done, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            into.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let _ = done.send(());
    });
    rx
}

fn lines(from: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs `capnp-noise ARGS` to its end; returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_capnp-noise"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let stderr_done = collect(child.stderr.take().unwrap(), stderr.clone());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("capnp-noise {args:?} did not exit");
        }
        thread::sleep(Duration::from_millis(20));
    };
    // All of stderr is in once the reader thread has seen its end.
    let _ = stderr_done.recv_timeout(WAIT);
    let text = stderr.lock().unwrap().clone();
    (status.code(), text)
}

// ----- keys and tunnel pairs -----

/// A temporary directory with key files.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Creates key file `name` and returns its path and VatId.
    fn key(&self, name: &str) -> (String, VatId) {
        let path = self.dir.path().join(name);
        let id = Identity::generate();
        id.save(&path, false).unwrap();
        (path.to_str().unwrap().to_string(), id.vat_id())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A tunnel server in front of `target` and a tunnel client pinned to it.
struct Pair {
    server: Tunnel,
    client: Tunnel,
    _keys: Keys,
}

/// `tunnel server` in front of `target`, with `trust` options.
fn server_tunnel(key: &str, target: impl std::fmt::Display, trust: &[&str]) -> Tunnel {
    let target = target.to_string();
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--connect", &target];
    args.extend_from_slice(&["--identity", key]);
    args.extend_from_slice(trust);
    Tunnel::start(&args, 1)
}

/// `tunnel client` to `server`, pinned to `peer`, with `extra` options.
fn client_tunnel(key: &str, server: SocketAddr, peer: &str, extra: &[&str]) -> Tunnel {
    let server = server.to_string();
    let mut args = vec!["client", "--listen", "127.0.0.1:0", "--connect", &server];
    args.extend_from_slice(&["--identity", key, "--peer", peer]);
    args.extend_from_slice(extra);
    Tunnel::start(&args, 1)
}

impl Pair {
    fn start(target: SocketAddr, server_extra: &[&str], client_extra: &[&str]) -> Pair {
        let keys = Keys::new();
        let (server_key, _) = keys.key("server.key");
        let (client_key, client_vat) = keys.key("client.key");
        let client_vat = client_vat.to_string();
        let mut trust = vec!["--allow-vat", &client_vat];
        trust.extend_from_slice(server_extra);
        let server = server_tunnel(&server_key, target, &trust);
        Pair::client_of(server, keys, &client_key, client_extra)
    }

    fn client_of(server: Tunnel, keys: Keys, client_key: &str, extra: &[&str]) -> Pair {
        let peer = server.vat_id.to_string();
        let client = client_tunnel(client_key, server.addr("server"), &peer, extra);
        Pair {
            server,
            client,
            _keys: keys,
        }
    }

    fn local(&self) -> SocketAddr {
        self.client.addr("client")
    }
}

// ----- plain TCP services -----

/// A TCP server on 127.0.0.1 running `handle` for every connection.
async fn tcp_server<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_on(listener, handle));
    addr
}

async fn serve_on<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(handle(s));
    }
}

/// Echoes everything; closes its writing side when the reading side ends.
async fn echo<S: AsyncRead + tokio::io::AsyncWrite>(s: S) {
    let (mut r, mut w) = tokio::io::split(s);
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// Echoes everything in upper case.
async fn upper(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut buf).await {
        buf[..n].make_ascii_uppercase();
        if s.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = s.shutdown().await;
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {WAIT:?}"))
}

/// Sends `data` and shuts the writing side, while reading everything that
/// comes back until the end.
async fn send_and_read_back(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(data).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let (_, read) = bounded("sending and reading back", async {
        tokio::join!(send, rd.read_to_end(&mut got))
    })
    .await;
    read.unwrap();
    got
}

/// Sends `data` and reads exactly as many bytes back, concurrently (the
/// connection stays open both ways).
async fn echo_exactly(s: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let (mut rd, mut wr) = s.split();
    let mut got = vec![0u8; data.len()];
    let (sent, read) = tokio::join!(wr.write_all(data), rd.read_exact(&mut got));
    sent.unwrap();
    read.unwrap();
    got
}

/// Sends `msg`, reads as many bytes back.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    got
}

/// Asserts that `s` is closed (end-of-stream or reset) within [`PROMPTLY`],
/// without any data. Returns true for a reset.
async fn closed_promptly(s: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(PROMPTLY, s.read(&mut buf)).await {
        Err(_) => panic!("the connection was still open after {PROMPTLY:?}"),
        Ok(Ok(0)) => false,
        Ok(Ok(n)) => panic!("unexpected {n} bytes"),
        Ok(Err(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
            true
        }
    }
}

/// Connects to `addr`, sends `payload`, and expects the tunnel to reset the
/// connection (a refusal or failure is never a clean end). The reset may
/// come at any step: the tunnel dials on as soon as it accepts, so on a
/// loaded machine it can refuse and reset before this side has seen its
/// own connect complete (seen in CI: `connect` failed with ECONNRESET).
async fn sent_then_reset(addr: SocketAddr, payload: &[u8]) {
    let reset = |e: &std::io::Error| {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        assert!(matches!(e.kind(), ConnectionReset | BrokenPipe), "{e}");
    };
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return reset(&e),
    };
    if let Err(e) = s.write_all(payload).await {
        return reset(&e);
    }
    assert!(
        closed_promptly(&mut s).await,
        "a refusal is not a clean end: expected a reset"
    );
}

// ----- through a tunnel pair -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_connections_echo_through_a_pair() {
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &[], &[]);
    let local = pair.local();
    let clients = (0..50u8).map(|i| {
        tokio::spawn(async move {
            let mut s = TcpStream::connect(local).await.unwrap();
            s.set_nodelay(true).unwrap();
            for round in 0..5u8 {
                let msg = pattern(100 + usize::from(i) * 37 + usize::from(round), i ^ round);
                assert_eq!(round_trip(&mut s, &msg).await, msg, "connection {i}");
            }
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        })
    });
    bounded("50 connections", async {
        for c in clients.collect::<Vec<_>>() {
            c.await.unwrap();
        }
    })
    .await;
    // Every one of them ended cleanly, on both tunnel ends.
    let client_fp = pair.client.vat_id.fingerprint();
    for (tunnel, peer) in [
        (&pair.client, pair.server.vat_id.fingerprint()),
        (&pair.server, client_fp),
    ] {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = tunnel.log();
            let ended: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("connection ended"))
                .collect();
            if ended.len() == 50 {
                for l in ended {
                    assert!(l.contains("end=closed") && l.contains(&peer), "{l}");
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} connection ends logged:\n{log}",
                ended.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The voluntary context switches of each of `pid`'s threads named
/// `tunnel-worker-N`, by N (Linux `/proc`).
#[cfg(target_os = "linux")]
fn worker_wakeups(pid: u32) -> std::collections::BTreeMap<usize, u64> {
    let mut found = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let Some(index) = comm.trim().strip_prefix("tunnel-worker-") else {
            continue;
        };
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches in /proc/PID/task/TID/status");
        found.insert(index.parse().expect("a worker index"), switches);
    }
    found
}

/// `--workers N` runs the connections on N threads (each a single-threaded
/// runtime), given out by load so that every worker carries some; an idle
/// worker sleeps (it has no timer). `--workers 0` starts none and forwards
/// on the multi-threaded runtime. Fails if the option starts no threads,
/// or connections all land on one worker.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_spread_over_the_worker_threads_or_none_with_workers_0() {
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &["--workers", "3"], &["--workers", "3"]);
    let (client_pid, server_pid) = (pair.client.child.id(), pair.server.child.id());
    // A thread takes its name itself, once it runs: wait (boundedly) until
    // all three workers of each end carry theirs.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let before = [worker_wakeups(client_pid), worker_wakeups(server_pid)];
        if before.iter().all(|b| b.len() == 3) || Instant::now() > deadline {
            break before;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for b in &before {
        assert_eq!(
            b.keys().copied().collect::<Vec<_>>(),
            vec![0, 1, 2],
            "{b:?}"
        );
    }
    let mut held = Vec::new();
    for i in 0..6u8 {
        let mut s = TcpStream::connect(pair.local()).await.unwrap();
        s.set_nodelay(true).unwrap();
        assert_eq!(round_trip(&mut s, &[i; 10]).await, [i; 10]);
        held.push(s);
    }
    bounded("round trips on 6 connections", async {
        for _ in 0..20 {
            for (i, s) in held.iter_mut().enumerate() {
                let msg = pattern(64, i as u8);
                assert_eq!(round_trip(s, &msg).await, msg);
            }
        }
    })
    .await;
    for (pid, before) in [client_pid, server_pid].into_iter().zip(before) {
        let after = worker_wakeups(pid);
        for (worker, was) in before {
            let woke = after[&worker] - was;
            // Two connections each, 21 round trips on each: a wake-up
            // per message at least.
            assert!(
                woke >= 40,
                "worker {worker} of {pid} woke {woke} times: {after:?}"
            );
        }
    }
    drop(held);

    let single = Pair::start(target, &["--workers", "0"], &["--workers", "0"]);
    for pid in [single.client.child.id(), single.server.child.id()] {
        assert!(worker_wakeups(pid).is_empty());
    }
    let mut s = TcpStream::connect(single.local()).await.unwrap();
    assert_eq!(
        round_trip(&mut s, b"on the runtime").await,
        b"on the runtime"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfers_arrive_byte_for_byte_both_ways() {
    const LEN: usize = 32 << 20;
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &[], &[]);
    let s = TcpStream::connect(pair.local()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let up = pattern(LEN, 9);
    let sent = up.clone();
    let writer = tokio::spawn(async move {
        // Uneven writes, to cross frame boundaries everywhere.
        for chunk in sent.chunks(100_003) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut down = Vec::with_capacity(LEN);
    bounded("64 MiB through the pair", r.read_to_end(&mut down))
        .await
        .unwrap();
    writer.await.unwrap();
    assert_eq!(down.len(), LEN);
    assert!(down == up, "the echo differs from what was sent");
    let line = pair.client.wait_log(&["connection ended", "end=closed"]);
    assert!(line.contains(&format!("to_peer={LEN}")), "{line}");
    assert!(line.contains(&format!("from_peer={LEN}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_a_client_that_shuts_its_write_side_gets_the_whole_reply() {
    // The target reads the whole request, then answers at length and closes.
    let target = tcp_server(|mut s: TcpStream| async move {
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        let reply = pattern(4 << 20, req.len() as u8);
        s.write_all(&reply).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let pair = Pair::start(target, &[], &[]);
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    s.write_all(&[7u8; 77]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = Vec::new();
    bounded("the reply", s.read_to_end(&mut reply))
        .await
        .unwrap();
    assert!(reply == pattern(4 << 20, 77), "{} bytes", reply.len());
    pair.server.wait_log(&[
        "connection ended",
        "to_peer=4194304",
        "from_peer=77",
        "end=closed",
    ]);
}

// ----- refusals -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refuses_a_server_that_is_not_pinned_without_revealing_itself() {
    let target = tcp_server(echo).await;
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (client_key, client_vat) = keys.key("client.key");
    let server = server_tunnel(
        &server_key,
        target,
        &["--allow-vat", &client_vat.to_string()],
    );
    let someone_else = Identity::generate().vat_id().to_string();
    let client = client_tunnel(&client_key, server.addr("server"), &someone_else, &[]);
    sent_then_reset(client.addr("client"), b"secret").await;
    let line = client.wait_log(&["refused the server"]);
    assert!(line.contains(&server.vat_id.fingerprint()), "{line}");
    assert!(
        line.contains(&someone_else),
        "the reason names the pinned VatId: {line}"
    );
    // The server only saw a handshake end before message 3: it never learnt
    // who the client is.
    server.wait_log(&["handshake with a client failed"]);
    let server_log = server.log();
    assert!(
        !server_log.contains(&client_vat.fingerprint()),
        "{server_log}"
    );
    assert!(!server_log.contains("connection ended"), "{server_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refuses_an_unlisted_client_and_says_who_and_why() {
    // The target records every connection it gets and what arrives on it.
    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let record = received.clone();
    let target = tcp_server(move |mut s: TcpStream| {
        let record = record.clone();
        async move {
            let at = {
                let mut r = record.lock().unwrap();
                r.push(Vec::new());
                r.len() - 1
            };
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                record.lock().unwrap()[at].extend_from_slice(&buf[..n]);
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = s.shutdown().await;
        }
    })
    .await;
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (client_key, client_vat) = keys.key("client.key");
    let allow = keys.path("clients.allow");
    std::fs::write(
        &allow,
        format!("{} a friend\n", Identity::generate().vat_id()),
    )
    .unwrap();
    let server = server_tunnel(&server_key, target, &["--allow", allow.to_str().unwrap()]);
    let pair = Pair::client_of(server, keys, &client_key, &[]);
    sent_then_reset(pair.local(), b"hello?").await;
    let line = pair.server.wait_log(&["refused a client"]);
    assert!(line.contains(&client_vat.fingerprint()), "who: {line}");
    assert!(line.contains("not in the allow-list"), "why: {line}");
    assert!(line.contains(allow.to_str().unwrap()), "which list: {line}");
    let line = pair.client.wait_log(&["connection ended"]);
    assert!(line.contains("end=\"error "), "{line}");
    // The target is dialed only for an authenticated client: it never saw
    // this one (not a connection, let alone a byte).
    assert!(
        received.lock().unwrap().is_empty(),
        "the target got a connection from a refused client: {:?}",
        received.lock().unwrap()
    );

    // Added to the list, the same client gets through, without a restart.
    std::fs::write(&allow, format!("{client_vat}\n")).unwrap();
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(bounded("echo", round_trip(&mut s, b"now?")).await, b"now?");
    assert_eq!(*received.lock().unwrap(), [b"now?".to_vec()]);
}

// ----- an unreachable target -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_closes_the_connection_and_the_tunnel_carries_on() {
    // A port nobody listens on (until later).
    let parked = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = parked.local_addr().unwrap();
    drop(parked);
    let pair = Pair::start(target, &[], &[]);
    sent_then_reset(pair.local(), b"anyone?").await;
    let line = pair.server.wait_log(&["cannot reach the target"]);
    assert!(line.contains(&target.to_string()), "{line}");

    // The target comes back: the same tunnel processes serve it.
    let listener = TcpListener::bind(target)
        .await
        .expect("rebind the target port");
    tokio::spawn(serve_on(listener, echo));
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(bounded("echo", round_trip(&mut s, b"back")).await, b"back");
}

// ----- limits -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &[], &["--max-connections", "1"]);
    let mut first = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(round_trip(&mut first, b"one").await, b"one");
    // The second waits in the backlog while the first is open...
    let mut second = TcpStream::connect(pair.local()).await.unwrap();
    second.write_all(b"two").await.unwrap();
    let mut got = [0u8; 3];
    let early = tokio::time::timeout(Duration::from_millis(500), second.read_exact(&mut got)).await;
    assert!(early.is_err(), "served beyond max_connections");
    pair.client
        .wait_log(&["connection limit reached", "limit=1"]);
    // ...and is served once it ends.
    drop(first);
    bounded("the second connection", second.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got, b"two");
}

/// Issue 15, item 3, for the tunnel server: stalled handshakes from one
/// source address cannot take every connection place. Eight sockets from
/// 127.0.0.2 each send a well-formed message 1 and stall (each would hold a
/// place for the 30 s handshake timeout) against `--max-connections 8`;
/// with `--max-unauthenticated-per-source 4` the last four are closed at
/// accept, and a client from 127.0.0.1 is served at once. (With a cap of 8
/// or more, all eight are answered and the client waits 30 s: the bound
/// below fails; checked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_from_one_source_leave_places_for_others() {
    let target = tcp_server(echo).await;
    let pair = Pair::start(
        target,
        &[
            "--max-connections",
            "8",
            "--handshake-timeout",
            "30",
            "--max-unauthenticated-per-source",
            "4",
        ],
        &[],
    );
    let server = pair.server.addr("server");
    let flight = capnp_noise_test::fixtures::initiator_first_flight();
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = socket.connect(server).await.unwrap();
        s.write_all(&flight).await.unwrap();
        attackers.push(s);
    }
    // Each attacker is either answered (message 2: it holds a place) or
    // closed at accept: wait for one or the other, so that all eight have
    // been judged before the honest client comes.
    let mut answered = 0;
    for s in &mut attackers {
        let mut byte = [0u8; 1];
        match bounded("the server's answer to an attacker", s.read(&mut byte)).await {
            Ok(n) if n > 0 => answered += 1,
            _ => {}
        }
    }
    assert_eq!(answered, 4, "{}", pair.server.log());
    // The log says why (read as the lines arrive: the child's stderr is
    // collected by another thread).
    pair.server
        .wait_log(&["too many connections not yet authenticated"]);
    let mut honest = TcpStream::connect(pair.local()).await.unwrap();
    let served =
        tokio::time::timeout(Duration::from_secs(10), round_trip(&mut honest, b"honest")).await;
    assert_eq!(
        served.expect("the honest client was not served within 10 s"),
        b"honest"
    );
    drop(attackers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_hold_no_more_than_the_handshake_slots() {
    let target = tcp_server(echo).await;
    let pair = Pair::start(
        target,
        &["--max-handshakes", "1", "--handshake-timeout", "3"],
        &[],
    );
    // A peer that connects and says nothing costs nothing and holds no
    // slot: a real client gets through beside it.
    let silent = TcpStream::connect(pair.server.addr("server"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut beside = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(round_trip(&mut beside, b"beside").await, b"beside");
    drop(beside);
    // (Gone before the stalled peer comes: its end is logged without
    // "within 3s", which below marks the stalled peer's timeout.)
    drop(silent);
    // A peer that sends a well-formed message 1 and stalls holds the only
    // slot for the handshake timeout (3 s), and as its handshake failed,
    // for the failure hold (1 s) after. Every server timer of that starts
    // after `stalled_at`, so nobody can be served before
    // stalled_at + 3 s + 1 s: a bound that load cannot break.
    let stalled_at = Instant::now();
    let mut stalled = TcpStream::connect(pair.server.addr("server"))
        .await
        .unwrap();
    stalled
        .write_all(&capnp_noise_test::fixtures::initiator_first_flight())
        .await
        .unwrap();
    // Its handshake timed out (an event, not a sleep)...
    pair.server
        .wait_log(&["handshake with a client failed", "within 3s"]);
    // ...and a real client arriving now, in the failure hold, waits for
    // the slot. (It may wait up to its own 3 s for it: the hold is 1 s, so
    // there are 2 s to spare, and more if this side runs late.)
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut got = [0u8; 1];
    bounded("echo", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"x");
    let served_after = stalled_at.elapsed();
    assert!(
        served_after >= Duration::from_secs(3) + capnp_noise::admission::DEFAULT_FAILURE_HOLD,
        "served {served_after:?} after the stalled peer: a second handshake ran before its slot was free"
    );
    drop(stalled);
}

// ----- shutdown -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_and_lets_an_open_transfer_finish() {
    let target = tcp_server(echo).await;
    let mut pair = Pair::start(target, &[], &["--shutdown-grace", "20"]);
    let local = pair.local();
    let mut s = TcpStream::connect(local).await.unwrap();
    assert_eq!(round_trip(&mut s, b"first").await, b"first");

    pair.client.signal("TERM");
    pair.client
        .wait_log(&["shutting down", "1 open connection"]);
    // No longer accepting...
    assert!(
        TcpStream::connect(local).await.is_err(),
        "still accepting after SIGTERM"
    );
    // ...but the open connection carries on: a transfer that takes a while.
    let mut sent = Vec::new();
    for i in 0..10u8 {
        let chunk = pattern(50_000, i);
        assert!(round_trip(&mut s, &chunk).await == chunk);
        sent.extend_from_slice(&chunk);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(pair.client.is_running());
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded("the end", s.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    let status = pair.client.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", pair.client.log());
    let log = pair.client.log();
    assert!(log.contains("end=closed"), "{log}");
    assert!(log.contains("stopped open=1 aborted=0"), "{log}");
    // The server end is unaffected.
    assert!(pair.server.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_aborts_what_outlasts_the_grace_period_and_exits_0() {
    let target = tcp_server(echo).await;
    let mut pair = Pair::start(target, &["--shutdown-grace", "1"], &[]);
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(round_trip(&mut s, b"idle now").await, b"idle now");
    pair.server.wait_log(&["connected"]);
    let signalled = Instant::now();
    pair.server.signal("TERM");
    let status = pair.server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", pair.server.log());
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "left before the grace period"
    );
    let log = pair.server.log();
    assert!(log.contains("aborting 1 connection"), "{log}");
    assert!(log.contains("end=aborted"), "{log}");
    // The aborted connection is cut for the application, not ended cleanly.
    assert!(closed_promptly(&mut s).await, "expected a reset");
}

// ----- keepalive and idle timeout, through socat as an idle-dropping NAT -----

/// True if `program ARGS` runs; otherwise the test is skipped loudly, or
/// fails under CI (see `capnp_noise_test::peers`).
fn available(program: &str, args: &[&str], install: &str) -> bool {
    capnp_noise_test::peers::usable(
        &format!("{program} ({install})"),
        capnp_noise_test::peers::runs(program, args),
    )
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `socat -T SECS` relaying 127.0.0.1:PORT to `to`, one child per
/// connection: it drops a flow when nothing went either way for SECS, as
/// an office NAT or a cloud load balancer does.
fn idle_dropping_relay(to: SocketAddr, secs: u32) -> (Killed, SocketAddr) {
    let addr = unused_addr();
    let child = Command::new("socat")
        .arg(format!("-T{secs}"))
        .arg(format!(
            "TCP-LISTEN:{},bind=127.0.0.1,reuseaddr,fork",
            addr.port()
        ))
        .arg(format!("TCP:{to}"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start socat");
    let relay = Killed(child);
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "socat did not listen on {addr}");
        thread::sleep(Duration::from_millis(20));
    }
    (relay, addr)
}

/// A loopback address nothing listens on (just now).
fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Whether a round trip of `msg` still works on `s` within [`PROMPTLY`].
async fn still_round_trips(s: &mut TcpStream, msg: &[u8]) -> bool {
    let attempt = async {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok::<_, std::io::Error>(got == msg)
    };
    matches!(tokio::time::timeout(PROMPTLY, attempt).await, Ok(Ok(true)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_carry_an_idle_connection_through_socat_dropping_idle_flows() {
    if !available("socat", &["-V"], "apt-get install socat") {
        return;
    }
    let target = tcp_server(echo).await;
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (client_key, client_vat) = keys.key("client.key");
    let server = server_tunnel(
        &server_key,
        target,
        &["--allow-vat", &client_vat.to_string()],
    );
    let (_nat, nat) = idle_dropping_relay(server.addr("server"), 3);
    let peer = server.vat_id.to_string();
    let without = client_tunnel(&client_key, nat, &peer, &[]);
    let with = client_tunnel(&client_key, nat, &peer, &["--keepalive", "1"]);
    let mut plain = TcpStream::connect(without.addr("client")).await.unwrap();
    let mut kept = TcpStream::connect(with.addr("client")).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut plain, b"hi")).await,
        b"hi"
    );
    assert_eq!(
        bounded("a round trip", round_trip(&mut kept, b"hi")).await,
        b"hi"
    );
    // Idle for 10 s: socat drops the flow without keepalives after 3 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(
        still_round_trips(&mut kept, b"after 10 s").await,
        "the connection with keepalives did not survive; log:\n{}",
        with.log()
    );
    assert!(
        !still_round_trips(&mut plain, b"after 10 s").await,
        "socat did not drop the idle flow: the test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_ends_a_silent_connection_and_says_why() {
    let target = tcp_server(echo).await;
    // Keepalives (every second) do not count as traffic.
    let pair = Pair::start(target, &[], &["--idle-timeout", "2", "--keepalive", "1"]);
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"hi")).await,
        b"hi"
    );
    let silent = Instant::now();
    let mut buf = [0u8; 8];
    let ended = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf)).await;
    let took = silent.elapsed();
    assert!(
        matches!(ended, Ok(Ok(0) | Err(_))),
        "still open after {took:?}: {ended:?}"
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "ended after {took:?}"
    );
    let line = pair
        .client
        .wait_log(&["connection ended", "idle: no data either way for 2.000 s"]);
    assert!(line.contains("service=client"), "{line}");
}

// ----- Unix domain sockets, with socat -----

/// A user created for a test (as root), deleted when dropped.
#[cfg(unix)]
struct TestUser(String);

#[cfg(unix)]
impl TestUser {
    fn create() -> TestUser {
        let name = format!("cnt{}", std::process::id());
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status()
            .expect("run useradd");
        assert!(status.success(), "useradd {name} failed");
        TestUser(name)
    }

    /// Runs `socat` as this user; returns whether it succeeded, and its
    /// output and errors.
    fn socat(&self, args: &[&str], input: &[u8]) -> (bool, String) {
        run_socat(
            Command::new("runuser").args(["-u", &self.0, "--", "socat"]),
            args,
            input,
        )
    }
}

#[cfg(unix)]
impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

/// Runs `socat ARGS` (through `cmd`) with `input` on its stdin; returns
/// whether it succeeded, and its stdout then stderr.
fn run_socat(cmd: &mut Command, args: &[&str], input: &[u8]) -> (bool, String) {
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run socat");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_sockets_at_both_ends_and_the_listening_socket_keeps_other_users_out() {
    use std::os::unix::fs::PermissionsExt;
    if !available("socat", &["-V"], "apt-get install socat") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Anyone may reach the directory: only the socket's mode decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The target: an echo server on a Unix socket.
    let target = dir.path().join("target.sock");
    let listener = tokio::net::UnixListener::bind(&target).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(echo(s));
        }
    });
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (client_key, client_vat) = keys.key("client.key");
    let target = format!("unix:{}", target.display());
    let server = server_tunnel(
        &server_key,
        &target,
        &["--allow-vat", &client_vat.to_string()],
    );
    let peer = server.vat_id.to_string();
    let server_addr = server.addr("server").to_string();
    let client = |sock: &Path, extra: &[&str]| {
        let listen = format!("unix:{}", sock.display());
        let mut args = vec![
            "client",
            "--listen",
            &listen,
            "--connect",
            &server_addr,
            "--identity",
            &client_key,
            "--peer",
            &peer,
        ];
        args.extend_from_slice(extra);
        Tunnel::start(&args, 1)
    };
    let private = dir.path().join("private.sock");
    let shared = dir.path().join("shared.sock");
    let _private_tunnel = client(&private, &[]);
    let _shared_tunnel = client(&shared, &["--listen-mode", "666"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&private), mode(&shared)), (0o600, 0o666));

    let connect = |sock: &Path| format!("UNIX-CONNECT:{}", sock.display());
    let input = b"through two unix sockets\n";
    let (ok, out) = tokio::task::spawn_blocking({
        let to = connect(&private);
        move || {
            run_socat(
                &mut Command::new("socat"),
                &["-t5", "-T20", "-", &to],
                input,
            )
        }
    })
    .await
    .unwrap();
    assert!(ok && out == String::from_utf8_lossy(input), "socat: {out}");

    if !nix_is_root() {
        // Not a missing peer: skipped (loudly, past libtest's capture) even
        // under CI.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED the other-user part of the unix socket test: it needs root (to useradd a user)\n",
        );
        return;
    }
    let (private, shared) = (connect(&private), connect(&shared));
    let (refused, shared_ok) = tokio::task::spawn_blocking(move || {
        let user = TestUser::create();
        (
            user.socat(&["-t5", "-T20", "-", &private], input),
            user.socat(&["-t5", "-T20", "-", &shared], input),
        )
    })
    .await
    .unwrap();
    assert!(
        !refused.0 && refused.1.contains("Permission denied"),
        "another user reached the 0600 socket: {}",
        refused.1
    );
    // The control: the same user through the 0666 socket.
    assert!(
        shared_ok.0 && shared_ok.1 == String::from_utf8_lossy(input),
        "{}",
        shared_ok.1
    );
}

/// Whether this process runs as root (`id -u` prints 0).
#[cfg(unix)]
fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

// ----- SIGHUP: key rotation without a flag day -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_server_key_without_dropping_a_transfer() {
    let target = tcp_server(echo).await;
    let keys = Keys::new();
    let (server_key, old) = keys.key("server.key");
    let (_, new) = keys.key("new.key");
    let (both_key, both_vat) = keys.key("both.key");
    let (old_only_key, old_only_vat) = keys.key("old-only.key");
    let server = server_tunnel(
        &server_key,
        target,
        &[
            "--allow-vat",
            &both_vat.to_string(),
            "--allow-vat",
            &old_only_vat.to_string(),
        ],
    );
    let at = server.addr("server");
    let (old_text, new_text) = (old.to_string(), new.to_string());
    // Pins the old and the new key, as during a rotation; and the old only.
    let both = client_tunnel(&both_key, at, &old_text, &["--peer", &new_text]);
    let old_only = client_tunnel(&old_only_key, at, &old_text, &[]);
    let mut s = TcpStream::connect(old_only.addr("client")).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"before")).await,
        b"before"
    );
    drop(s);

    // A 100 MB transfer on one connection, in the middle of which (after
    // the first 50 MB came back, before the rest is sent: by events, not by
    // timing) the key is replaced and SIGHUP sent.
    let mut long = TcpStream::connect(both.addr("client")).await.unwrap();
    let data = pattern(100 << 20, 17);
    let (first, rest) = data.split_at(50 << 20);
    assert!(
        bounded("the first 50 MB", echo_exactly(&mut long, first)).await == first,
        "the first half did not come back intact"
    );
    std::fs::copy(keys.path("new.key"), &server_key).unwrap();
    server.signal("HUP");
    server.wait_log(&["SIGHUP: reloaded", &format!("vat_id={new_text}")]);
    assert!(
        send_and_read_back(&mut long, rest).await == rest,
        "the transfer did not arrive intact after the reload"
    );
    assert!(
        !server.log().contains("end=\"error"),
        "a connection failed:\n{}",
        server.log()
    );

    // New handshakes prove the new key: the client pinning both connects,
    // the one pinning the old key only is refused.
    let mut s = TcpStream::connect(both.addr("client")).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"after")).await,
        b"after"
    );
    both.wait_log(&["connected", &format!("peer={}", new.fingerprint())]);
    sent_then_reset(old_only.addr("client"), b"after").await;
    old_only.wait_log(&["refused the server"]);

    // A malformed key: the running one stays, and the log says why.
    std::fs::write(&server_key, b"-----BEGIN PRIVATE KEY-----\nnot a key\n").unwrap();
    server.signal("HUP");
    let line = server.wait_log(&["SIGHUP: reload failed"]);
    assert!(line.contains(&server_key), "{line}");
    assert!(line.contains("running settings stay"), "{line}");
    let mut s = TcpStream::connect(both.addr("client")).await.unwrap();
    // The server still runs, with the new key.
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"still")).await,
        b"still"
    );
}

// ----- systemd: notify, socket activation, the unit file -----

#[cfg(unix)]
#[test]
fn notify_socket_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let manager = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    manager.set_read_timeout(Some(WAIT)).unwrap();
    let keys = Keys::new();
    let (key, vat) = keys.key("k.key");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capnp-noise"));
    cmd.args([
        "tunnel",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--connect",
        "127.0.0.1:9",
    ])
    .args(["--identity", &key, "--allow-vat", &vat.to_string()])
    .env("NOTIFY_SOCKET", &path)
    .env("WATCHDOG_USEC", "400000");
    let mut tunnel = Tunnel::spawn(cmd, 1);
    let next = || {
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    // READY=1 comes once the service listens (its address is printed).
    let first = next();
    assert_eq!(first, "READY=1");
    // Then WATCHDOG=1 every 200 ms (half of 400 ms).
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "three watchdog pings in {took:?}"
    );
    tunnel.signal("TERM");
    let stopping = (0..20).map(|_| next()).find(|m| m != "WATCHDOG=1");
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
    assert!(tunnel.wait_exit(WAIT).success());
}

/// Connects once to `addr` as soon as something listens there (from
/// another thread, within [`WAIT`]), then hangs up.
#[cfg(unix)]
fn knock_once(addr: &str) {
    let addr = addr.to_string();
    thread::spawn(move || {
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(&addr).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    });
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_socket_activate_the_inherited_socket_serves() {
    if !available(
        "systemd-socket-activate",
        &["--version"],
        "apt-get install systemd",
    ) {
        return;
    }
    let target = tcp_server(echo).await;
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (client_key, client_vat) = keys.key("client.key");
    let addr = unused_addr().to_string();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &addr,
        "--fdname=web",
        env!("CARGO_BIN_EXE_capnp-noise"),
    ])
    .args(["tunnel", "server", "--listen", "systemd:web"])
    .args(["--connect", &target.to_string(), "--identity", &server_key])
    .args(["--allow-vat", &client_vat.to_string()]);
    // systemd-socket-activate starts the program at the first connection:
    // knock once (the tunnel sees a handshake that ends at once).
    knock_once(&addr);
    let server = Tunnel::spawn(cmd, 1);
    assert_eq!(
        server.addr("server").to_string(),
        addr,
        "the inherited socket"
    );
    let peer = server.vat_id.to_string();
    let client = client_tunnel(&client_key, server.addr("server"), &peer, &[]);
    let mut s = TcpStream::connect(client.addr("client")).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"activated")).await,
        b"activated"
    );
    // A name systemd did not pass is an error that lists the names passed.
    let mut cmd = Command::new("systemd-socket-activate");
    let other = unused_addr().to_string();
    cmd.args([
        "-l",
        &other,
        "--fdname=web",
        env!("CARGO_BIN_EXE_capnp-noise"),
    ])
    .args([
        "tunnel",
        "server",
        "--listen",
        "systemd:db",
        "--connect",
        "127.0.0.1:9",
    ])
    .args([
        "--identity",
        &server_key,
        "--allow-vat",
        &client_vat.to_string(),
    ]);
    knock_once(&other);
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("no listening socket named \"db\"") && err.contains("\"web\""),
        "{err}"
    );
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify_and_scores_well() {
    if !available("systemd-analyze", &["--version"], "apt-get install systemd") {
        return;
    }
    let unit = repo("contrib/systemd/capnp-noise-tunnel@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    // verify checks that ExecStart's program exists: the one just built.
    let dir = tempfile::tempdir().unwrap();
    let instance = dir.path().join("capnp-noise-tunnel@test.service");
    std::fs::write(
        &instance,
        text.replace("/usr/bin/capnp-noise", env!("CARGO_BIN_EXE_capnp-noise")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "verify: {said}"
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&instance)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let level: f64 = said
        .lines()
        .find_map(|l| l.split("Overall exposure level for ").nth(1))
        .and_then(|rest| rest.split(": ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{said}"));
    assert!(level <= 2.0, "exposure level {level}:\n{said}");
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="));
}

// ----- egress through an office proxy: tinyproxy -----

/// `tinyproxy` (Debian) on a free loopback port, allowing CONNECT to
/// `connect_port` only (others get 403).
fn tinyproxy(dir: &Path, connect_port: u16) -> (Killed, SocketAddr) {
    let addr = unused_addr();
    let conf = dir.join(format!("tinyproxy-{}.conf", addr.port()));
    std::fs::write(
        &conf,
        format!(
            "Port {}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\nConnectPort {connect_port}\n\
             MaxClients 20\nLogLevel Info\n",
            addr.port()
        ),
    )
    .unwrap();
    let child = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tinyproxy");
    let proxy = Killed(child);
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "tinyproxy did not listen on {addr}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    (proxy, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_tinyproxy_the_server_is_reached_and_still_authenticated() {
    if !available("tinyproxy", &["-v"], "apt-get install tinyproxy") {
        return;
    }
    let target = tcp_server(echo).await;
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (impostor_key, _) = keys.key("impostor.key");
    let (client_key, client_vat) = keys.key("client.key");
    let allow = ["--allow-vat".to_string(), client_vat.to_string()];
    let allow = [allow[0].as_str(), allow[1].as_str()];
    let server = server_tunnel(&server_key, target, &allow);
    let impostor = server_tunnel(&impostor_key, target, &allow);
    let (server_addr, impostor_addr) = (server.addr("server"), impostor.addr("server"));
    let peer = server.vat_id.to_string();
    // One proxy lets CONNECT reach the server, the other only the impostor.
    let (_to_server, via_server) = tinyproxy(keys.dir.path(), server_addr.port());
    let (_to_impostor, via_impostor) = tinyproxy(keys.dir.path(), impostor_addr.port());
    let through = |proxy: SocketAddr, to: SocketAddr| {
        client_tunnel(
            &client_key,
            to,
            &peer,
            &["--via", &format!("http://{proxy}")],
        )
    };

    let client = through(via_server, server_addr);
    let mut s = TcpStream::connect(client.addr("client")).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"via tinyproxy")).await,
        b"via tinyproxy"
    );
    // Reaching the impostor through a proxy changes nothing: refused.
    let fooled = through(via_impostor, impostor_addr);
    sent_then_reset(fooled.addr("client"), b"secret").await;
    fooled.wait_log(&["refused the server"]);
    assert!(!impostor.log().contains("connected"), "{}", impostor.log());
    // A proxy that refuses (403): the local connection is reset and the
    // log says why.
    let denied = through(via_impostor, server_addr);
    sent_then_reset(denied.addr("client"), b"secret").await;
    let line = denied.wait_log(&["cannot reach the server"]);
    assert!(
        line.contains("403") && line.contains(&via_impostor.to_string()),
        "{line}"
    );
}

// ----- metrics (read by PyPI's prometheus-client) and status -----

/// `GET PATH` over HTTP/1.0 from `addr`: the whole answer.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    bounded("an HTTP answer", s.read_to_string(&mut answer))
        .await
        .unwrap();
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_bytes_and_refusals_as_prometheus_client_reads_them() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/metrics_check.py");
    let check = [script.to_str().unwrap(), "--check"];
    if !available("python3", &check, "pip install prometheus-client==0.26.0") {
        return;
    }
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &["--metrics", "127.0.0.1:0"], &[]);
    let metrics = pair.server.metrics.expect("the metrics address is printed");
    let mut sent = 0;
    for i in 0..5 {
        let mut s = TcpStream::connect(pair.local()).await.unwrap();
        let data = pattern(40_000 * (i + 1), i as u8);
        assert!(send_and_read_back(&mut s, &data).await == data);
        sent += data.len();
    }
    // One client the server does not allow.
    let strangers = Keys::new();
    let (stranger_key, _) = strangers.key("stranger.key");
    let peer = pair.server.vat_id.to_string();
    let stranger = client_tunnel(&stranger_key, pair.server.addr("server"), &peer, &[]);
    sent_then_reset(stranger.addr("client"), b"hello?").await;
    pair.server.wait_log(&["refused a client"]);
    let deadline = Instant::now() + WAIT;
    while pair.server.log().matches("connection ended").count() < 5 {
        assert!(Instant::now() < deadline, "{}", pair.server.log());
        thread::sleep(Duration::from_millis(20));
    }
    let url = format!("http://{metrics}/metrics");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .arg(url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sample = |name: &str, labels: &str| -> u64 {
        let prefix = format!("SAMPLE capnp_noise_tunnel_{name} {labels} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {name} {labels} in\n{text}"))
            .parse()
            .unwrap()
    };
    let s = "service=server";
    assert_eq!(sample("connections_total", s), 5);
    assert_eq!(sample("connections_accepted_total", s), 6);
    assert_eq!(sample("refused_total", s), 1);
    assert_eq!(sample("connections_open", s), 0);
    assert_eq!(
        sample("bytes_total", &format!("direction=from_peer,{s}")),
        sent as u64
    );
    assert_eq!(
        sample("bytes_total", &format!("direction=to_peer,{s}")),
        sent as u64
    );
    assert_eq!(sample("unreachable_total", s), 0);
    for reason in ["no_slot", "timeout", "closed", "invalid", "other"] {
        let labels = format!("reason={reason},{s}");
        assert_eq!(sample("handshakes_failed_total", &labels), 0, "{reason}");
    }

    let status = http_get(metrics, "/status").await;
    assert!(status.starts_with("HTTP/1.0 200 OK\r\n"), "{status}");
    assert!(status.ends_with("server ok\n"), "{status}");
    assert!(http_get(metrics, "/nothing")
        .await
        .starts_with("HTTP/1.0 404"));
    // A server whose target is down.
    let down = unused_addr();
    let keys = Keys::new();
    let (key, vat) = keys.key("k.key");
    let lonely = server_tunnel(
        &key,
        down,
        &["--allow-vat", &vat.to_string(), "--metrics", "127.0.0.1:0"],
    );
    let status = http_get(lonely.metrics.unwrap(), "/status").await;
    assert!(status.starts_with("HTTP/1.0 503 "), "{status}");
    assert!(status.contains("server unreachable: "), "{status}");
}

// ----- suite choice and JSON logs -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suite_choice_holds_at_both_ends_and_json_logs_carry_timestamps() {
    let target = tcp_server(echo).await;
    let chacha = ["--suite", "chachapoly"];
    let mut server_args = chacha.to_vec();
    server_args.extend(["--log-format", "json"]);
    let pair = Pair::start(target, &server_args, &chacha);
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(
        bounded("a round trip", round_trip(&mut s, b"hi")).await,
        b"hi"
    );
    let suite = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
    pair.client
        .wait_log(&["connected", &format!("suite=\"{suite}\"")]);
    let line = pair.server.wait_log(&[
        "\"message\":\"connected\"",
        &format!("\"suite\":\"{suite}\""),
    ]);
    // {"timestamp":"2026-12-07T02:40:00.123456Z","level":"INFO",...}
    let stamp = line
        .strip_prefix("{\"timestamp\":\"")
        .unwrap_or_else(|| panic!("no timestamp first: {line}"));
    let date = stamp.as_bytes();
    assert!(
        date.len() > 20
            && date[..19].iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                _ => c.is_ascii_digit(),
            }),
        "not an RFC 3339 timestamp: {line}"
    );
    assert!(line.contains("\"service\":\"server\""), "{line}");
    // Every line is one JSON object (checked by Python's parser).
    if available("python3", &["-c", "import json"], "apt-get install python3") {
        let log = pair.server.log();
        let mut check = Command::new("python3")
            .args([
                "-c",
                "import json, sys\nfor l in sys.stdin: assert isinstance(json.loads(l), dict), l",
            ])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut check.stdin.take().unwrap(), log.as_bytes()).unwrap();
        assert!(check.wait().unwrap().success(), "not JSON lines:\n{log}");
    }

    // A client proposing AES-GCM is refused by the ChaCha-only server.
    let key = pair._keys.path("client.key");
    let peer = pair.server.vat_id.to_string();
    let aes = client_tunnel(
        key.to_str().unwrap(),
        pair.server.addr("server"),
        &peer,
        &["--suite", "aesgcm"],
    );
    sent_then_reset(aes.addr("client"), b"hi").await;
    aes.wait_log(&["handshake with the server failed"]);
}

/// A client tunnel on `suite = "auto"` proposes AES-GCM (on a CPU with AES
/// instructions); a ChaCha-only server closes without answering; the
/// client retries once with the mandatory suite (SPEC.md 2), logs it, and
/// the connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_client_retries_with_the_mandatory_suite_after_a_silent_close() {
    use capnp_noise::wire::Suite;
    if Suite::preferred() != Suite::AesGcmSha256 {
        // Then `auto` proposes ChaCha20-Poly1305 itself: nothing to retry.
        eprintln!(
            "SKIPPED: this CPU has no AES instructions, so `auto` proposes the mandatory suite"
        );
        return;
    }
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &["--suite", "chachapoly"], &[]);
    let mut s = TcpStream::connect(pair.local()).await.unwrap();
    assert_eq!(
        bounded("a round trip after the retry", round_trip(&mut s, b"hi")).await,
        b"hi"
    );
    pair.client.wait_log(&[
        "the server closed without answering Noise_XX_25519_AESGCM_SHA256",
        "retrying once with the mandatory suite Noise_XX_25519_ChaChaPoly_BLAKE2s",
    ]);
    pair.client
        .wait_log(&["connected", "suite=\"Noise_XX_25519_ChaChaPoly_BLAKE2s\""]);
}

// ----- PROXY protocol, parsed by PyPI's proxy-protocol -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_tells_a_python_backend_the_callers_address_and_vat_id() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/proxy_backend.py");
    let check = [script.to_str().unwrap(), "--check"];
    if !available("python3", &check, "pip install proxy-protocol==0.11.3") {
        return;
    }
    for version in ["v2", "v1"] {
        let backend = PyPeer::run(&script, &[]);
        let line = backend.line();
        let port: u16 = line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let pair = Pair::start(target, &["--proxy-protocol", version], &[]);
        let mut s = TcpStream::connect(pair.local()).await.unwrap();
        let payload = pattern(300_000, 11);
        let echoed = send_and_read_back(&mut s, &payload).await;
        assert!(
            echoed == payload,
            "{version}: the payload came back altered"
        );
        let report = tokio::task::spawn_blocking(move || backend.line())
            .await
            .unwrap();
        // The server tunnel's view of the client tunnel: its log line.
        let connected = pair.server.wait_log(&["connected", "addr="]);
        let client_addr = connected
            .split(' ')
            .find_map(|kv| kv.strip_prefix("addr="))
            .unwrap();
        let vat = match version {
            "v2" => pair.client.vat_id.to_string(),
            _ => "-".to_string(),
        };
        assert_eq!(
            report,
            format!(
                "CONN source={client_addr} dest={} vat={vat} len={}",
                pair.server.addr("server"),
                payload.len()
            ),
            "{version}"
        );
    }
}

// ----- configuration file -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_with_two_services_on_each_end() {
    let echo_target = tcp_server(echo).await;
    let upper_target = tcp_server(upper).await;
    let keys = Keys::new();
    let (_, server_vat) = keys.key("server.key");
    let (_, client_vat) = keys.key("client.key");
    std::fs::write(keys.path("clients.allow"), format!("{client_vat}\n")).unwrap();
    // Relative paths: relative to the file's directory.
    let server_conf = keys.path("server.toml");
    std::fs::write(
        &server_conf,
        format!(
            r#"
identity = "server.key"
max_handshakes = 8

[service.echo]
mode = "server"
listen = "127.0.0.1:0"
connect = "{echo_target}"
allow = "clients.allow"

[service.upper]
mode = "server"
listen = "127.0.0.1:0"
connect = "{upper_target}"
allow_vat = ["{client_vat}"]
max_connections = 4
"#
        ),
    )
    .unwrap();
    let server = Tunnel::start(&["--config", server_conf.to_str().unwrap()], 2);
    assert_eq!(server.vat_id, server_vat);
    let client_conf = keys.path("client.toml");
    std::fs::write(
        &client_conf,
        format!(
            r#"
identity = "client.key"

[service.to-echo]
mode = "client"
listen = "127.0.0.1:0"
connect = "{}"
peer = "{server_vat}"

[service.to-upper]
mode = "client"
listen = "127.0.0.1:0"
connect = "{}"
known_vats = "known_vats"
"#,
            server.addr("echo"),
            server.addr("upper")
        ),
    )
    .unwrap();
    let client = Tunnel::start(&["--config", client_conf.to_str().unwrap()], 2);
    let mut e = TcpStream::connect(client.addr("to-echo")).await.unwrap();
    let mut u = TcpStream::connect(client.addr("to-upper")).await.unwrap();
    assert_eq!(
        bounded("echo", round_trip(&mut e, b"Hello")).await,
        b"Hello"
    );
    assert_eq!(
        bounded("upper", round_trip(&mut u, b"Hello")).await,
        b"HELLO"
    );
    // Trust on first use recorded the server for that address.
    let known = std::fs::read_to_string(keys.path("known_vats")).unwrap();
    assert!(
        known.contains(&format!("{} {server_vat}", server.addr("upper"))),
        "{known}"
    );
    server.wait_log(&["service=echo", "connected"]);
    server.wait_log(&["service=upper", "connected"]);
}

// ----- misconfigurations -----

#[test]
fn misconfigurations_exit_with_the_documented_code_and_a_readable_message() {
    let keys = Keys::new();
    let (key, _) = keys.key("k.key");
    let vat = Identity::generate().vat_id().to_string();
    let client = |extra: &[&str]| {
        let mut args = vec![
            "tunnel",
            "client",
            "--listen",
            "127.0.0.1:0",
            "--connect",
            "127.0.0.1:9",
        ];
        args.extend_from_slice(extra);
        run_to_exit(&args)
    };
    let expect = |what: &str, (code, stderr): (Option<i32>, String), want: &[&str]| {
        assert_eq!(code, Some(2), "{what}: {stderr}");
        for t in want {
            assert!(stderr.contains(t), "{what}: no {t:?} in {stderr}");
        }
    };
    expect(
        "bad VatId",
        client(&["--identity", &key, "--peer", "vat1notakey"]),
        &["--peer: this is not a VatId"],
    );
    expect(
        "missing key",
        client(&["--identity", "/nonexistent/k.key", "--peer", &vat]),
        &["key file /nonexistent/k.key does not exist"],
    );
    expect(
        "missing allow-list",
        run_to_exit(&[
            "tunnel",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--connect",
            "127.0.0.1:9",
            "--identity",
            &key,
            "--allow",
            "/nonexistent/allow",
        ]),
        &["/nonexistent/allow does not exist"],
    );
    expect("no trust", client(&["--identity", &key]), &["--peer"]);
    expect(
        "nothing to run",
        run_to_exit(&["tunnel"]),
        &["--config FILE"],
    );

    // Port in use: exit 3.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_to_exit(&[
        "tunnel",
        "client",
        "--listen",
        &addr,
        "--connect",
        "127.0.0.1:9",
        "--identity",
        &key,
        "--peer",
        &vat,
    ]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!("service client: cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");

    // A configuration file with an unknown key, and one with a bad VatId.
    let conf = keys.path("t.toml");
    std::fs::write(&conf, "identity = \"k.key\"\n[service.s]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\nconnect = \"h:1\"\npeer = \"vat1x\"\nretries = 3\n").unwrap();
    let (code, stderr) = run_to_exit(&["tunnel", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("t.toml: line 7, column 1: service.s.retries: unknown key"),
        "{stderr}"
    );
    std::fs::write(&conf, "identity = \"k.key\"\n[service.s]\nmode = \"client\"\nlisten = \"127.0.0.1:0\"\nconnect = \"h:1\"\npeer = \"vat1x\"\n").unwrap();
    let (code, stderr) = run_to_exit(&["tunnel", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("t.toml: line 6, column 8: service.s.peer: this is not a VatId"),
        "{stderr}"
    );
    assert!(!stderr.contains("vat1x"), "{stderr}");
}

// ----- pycapnp peers across the tunnel -----

/// A path relative to the workspace root (the Python peers live with the
/// library, the demo schema in the test crate).
fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// True if pycapnp can run. Otherwise a failure under CI, elsewhere a skip
/// that is printed and counted (`capnp_noise_test::peers`).
fn pycapnp_available() -> bool {
    static CHECK: OnceLock<Result<String, String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        let out = Command::new("python3")
            .arg(repo("tests/peers/office_peer.py"))
            .arg("--check")
            .output()
            .map_err(|e| format!("python3: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && text.starts_with("VERSIONS") {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    });
    capnp_noise_test::peers::usable(
        "python3 with pycapnp (pip install pycapnp==2.2.4)",
        check.as_ref().map(drop),
    )
}

/// A pycapnp process (`office_peer.py MODE ...`), killed when dropped.
struct PyPeer {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl PyPeer {
    /// `office_peer.py ARGS` with the demo schema.
    fn start(args: &[&str]) -> PyPeer {
        let schema = repo("crates/capnp-noise-test/schema/demo.capnp");
        let mut all = args.to_vec();
        all.extend(["--schema", schema.to_str().unwrap()]);
        PyPeer::run(&repo("tests/peers/office_peer.py"), &all)
    }

    /// `python3 SCRIPT ARGS`.
    fn run(script: &Path, args: &[&str]) -> PyPeer {
        let mut child = Command::new("python3")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let stderr = Arc::new(Mutex::new(String::new()));
        let _ = collect(child.stderr.take().unwrap(), stderr.clone());
        let stdout = lines(child.stdout.take().unwrap());
        PyPeer {
            child,
            stdout,
            stderr,
        }
    }

    fn line(&self) -> String {
        self.stdout.recv_timeout(WAIT).unwrap_or_else(|_| {
            panic!(
                "pycapnp peer said nothing; stderr:\n{}",
                self.stderr.lock().unwrap()
            )
        })
    }
}

impl Drop for PyPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the pycapnp client against `port`; returns its "OK ..." line.
fn pycapnp_client(port: u16) -> String {
    let client = PyPeer::start(&["client", "--port", &port.to_string()]);
    let line = client.line();
    assert!(
        line.starts_with("OK "),
        "{line}; stderr:\n{}",
        client.stderr.lock().unwrap()
    );
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pycapnp_client_and_server_call_each_other_across_a_tunnel_pair() {
    if !pycapnp_available() {
        return;
    }
    let server = PyPeer::start(&["server"]);
    let line = server.line();
    let port: u16 = line
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let pair = Pair::start(SocketAddr::from(([127, 0, 0, 1], port)), &[], &[]);
    let ok = tokio::task::spawn_blocking(move || pycapnp_client(pair.local().port()))
        .await
        .unwrap();
    assert_eq!(
        ok,
        "OK whoami=pycapnp echoed=1049577 notified=5 delivered=5"
    );
}

#[test]
fn pycapnp_client_reaches_a_native_capnp_noise_server_through_a_tunnel_client() {
    if !pycapnp_available() {
        return;
    }
    // The native server: capnp_noise::rpc::serve with the demo Office,
    // allowing only the tunnel client's VatId.
    let keys = Keys::new();
    let (client_key, client_vat) = keys.key("client.key");
    let server_id = Identity::generate();
    let (addr_tx, addr_rx) = mpsc::channel();
    let id = server_id.clone();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            rpc::serve(
                listener,
                id,
                Arc::new(Pinned(client_vat)),
                ServerConfig::default(),
                |peer: &PeerInfo| office::Office::bootstrap(peer),
            )
            .await;
        });
    });
    let server_addr = addr_rx.recv_timeout(WAIT).unwrap();
    let server_vat = server_id.vat_id().to_string();
    let client = client_tunnel(&client_key, server_addr, &server_vat, &[]);
    let ok = pycapnp_client(client.addr("client").port());
    // The native server authenticated the tunnel client's VatId.
    assert_eq!(
        ok,
        format!("OK whoami={client_vat} echoed=1049577 notified=5 delivered=5")
    );
}

// ----- a key log from the environment, a tcpdump capture, and decode -----

/// `tcpdump -i lo -w FILE port PORT`, started and ready (it said it is
/// listening); stopped with SIGTERM, which flushes the file.
struct Tcpdump {
    file: PathBuf,
    child: Killed,
    stderr: Arc<Mutex<String>>,
}

impl Tcpdump {
    fn start(file: &Path, port: u16) -> Tcpdump {
        let mut child = Command::new("tcpdump")
            // -Z root: write the file as root (tcpdump drops to its own
            // user first otherwise, who cannot write in a private tempdir).
            // --immediate-mode: packets go to the file as they come, not
            // in blocks that a SIGTERM would leave unwritten.
            .args(["-i", "lo", "--immediate-mode", "-U", "-Z", "root", "-w"])
            .arg(file)
            .args(["port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(child.stderr.take().unwrap(), stderr.clone());
        let tcpdump = Tcpdump {
            file: file.to_path_buf(),
            child: Killed(child),
            stderr,
        };
        let deadline = Instant::now() + WAIT;
        while !tcpdump.stderr.lock().unwrap().contains("listening on") {
            assert!(
                Instant::now() < deadline,
                "tcpdump did not start: {}",
                tcpdump.stderr.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(20));
        }
        tcpdump
    }

    /// Stops it and waits for it to exit (the capture is then complete);
    /// returns what it said.
    fn stop(mut self) -> String {
        // Until the file has stopped growing for a while.
        let deadline = Instant::now() + WAIT;
        let size = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        let mut last = (size(&self.file), Instant::now());
        while last.1.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            let now = size(&self.file);
            if now != last.0 {
                last = (now, Instant::now());
            }
        }
        let pid = self.child.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + WAIT;
        while self.child.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tcpdump did not stop");
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(50));
        let said = self.stderr.lock().unwrap().clone();
        said
    }
}

/// The whole researcher's path: a tunnel client started with
/// CAPNP_NOISE_KEYLOG warns and writes its keys to a file it creates 0600;
/// tcpdump captures the tunnel's traffic on loopback; `capnp-noise decode`
/// shows both tunnels' VatIds with valid signatures and the very bytes the
/// application sent and got back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_captured_by_tcpdump_decodes_with_the_key_log_the_cli_wrote() {
    if !available("tcpdump", &["--version"], "apt-get install tcpdump") {
        return;
    }
    let target = tcp_server(echo).await;
    let keys = Keys::new();
    let (server_key, _) = keys.key("server.key");
    let (client_key, client_vat) = keys.key("client.key");
    let server = server_tunnel(
        &server_key,
        target,
        &["--allow-vat", &client_vat.to_string()],
    );
    let server_addr = server.addr("server");
    let key_log = keys.path("keys.log");
    let capture = keys.path("session.pcap");
    let tcpdump = Tcpdump::start(&capture, server_addr.port());

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_capnp-noise"));
    cmd.env("CAPNP_NOISE_KEYLOG", &key_log).args([
        "tunnel",
        "client",
        "--listen",
        "127.0.0.1:0",
        "--connect",
        &server_addr.to_string(),
        "--identity",
        &client_key,
        "--peer",
        &server.vat_id.to_string(),
    ]);
    let client = Tunnel::spawn(cmd, 1);
    // Waited for: stderr is collected by another thread.
    client.wait_log(&["WARNING: CAPNP_NOISE_KEYLOG is set"]);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "key log mode {mode:o}");
    }

    let mut s = TcpStream::connect(client.addr("client")).await.unwrap();
    let mut sent = Vec::new();
    for round in 0..3u8 {
        let msg = pattern(300 + usize::from(round), round);
        assert_eq!(round_trip(&mut s, &msg).await, msg);
        sent.extend_from_slice(&msg);
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded("the end", s.read_to_end(&mut rest)).await.unwrap();
    client.wait_log(&["connection ended"]);
    server.wait_log(&["connection ended"]);
    let said = tcpdump.stop();

    let lines = std::fs::read_to_string(&key_log).unwrap();
    assert_eq!(lines.lines().count(), 5, "{lines}");
    let out = Command::new(env!("CARGO_BIN_EXE_capnp-noise"))
        .args(["decode", "--keylog"])
        .arg(&key_log)
        .arg(&capture)
        .args(["--port", &server_addr.port().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        format!("-> 127.0.0.1:{}", server_addr.port()),
        "-> handshake message 1: 32 bytes".into(),
        "<- handshake message 2".into(),
        "-> handshake message 3".into(),
        format!("responder VatId {}, signature valid", server.vat_id),
        format!("initiator VatId {client_vat}, signature valid"),
        ": CLOSE".into(),
    ] {
        assert!(
            text.contains(&needle),
            "no {needle:?} in:\n{text}\ntcpdump said: {said}"
        );
    }
    // The DATA both ways is what the application sent (and the echo).
    for arrow in ["->", "<-"] {
        let mut data = Vec::new();
        for line in text.lines().map(str::trim_start) {
            if line.starts_with(arrow) && line.contains(": DATA ") {
                data.extend(hex::decode(line.rsplit(": ").next().unwrap()).unwrap());
            }
        }
        assert_eq!(data, sent, "{arrow} DATA in:\n{text}");
    }
}

// ----- resumption (Noise IK, SPEC.md 14) -----

/// The `connected` lines of `tunnel`'s log, once there are `n`.
fn connected_lines(tunnel: &Tunnel, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = tunnel.log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains(" connected"))
            .map(str::to_string)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} connected lines:\n{log}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` connections through `local`, each sending 3000 bytes (its first
/// bytes, early data where it resumes) and reading them back from the echo
/// target, then a second message, then a clean end.
async fn echo_connections(local: SocketAddr, n: u8) {
    for i in 0..n {
        let mut s = TcpStream::connect(local).await.unwrap();
        s.set_nodelay(true).unwrap();
        let first = pattern(3000, i);
        assert_eq!(
            bounded("the first bytes", round_trip(&mut s, &first)).await,
            first
        );
        let more = pattern(100_000, i ^ 0x55);
        assert_eq!(
            send_and_read_back(&mut s, &more).await,
            more,
            "connection {i}"
        );
    }
}

/// `resumption` and `early_data` on both ends: the first connection runs
/// XX (and the client records the server); the next ones resume with IK,
/// the plain client's first bytes in IK message 1, taken by the server as
/// early data; every byte arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_client_tunnel_sends_the_first_bytes_in_ik_message_1() {
    let target = tcp_server(echo).await;
    let flags = ["--resumption", "--early-data"];
    let pair = Pair::start(target, &flags, &flags);
    echo_connections(pair.local(), 3).await;
    // Each end's log names the handshake that ran: XX first, then IK.
    for lines in [
        connected_lines(&pair.client, 3),
        connected_lines(&pair.server, 3),
    ] {
        let l = &lines[0];
        assert!(
            l.contains("resumed=false") && l.contains("Noise_XX_"),
            "{l}"
        );
        for l in &lines[1..] {
            assert!(
                l.contains("resumed=true")
                    && l.contains("early_data=Accepted")
                    && l.contains("Noise_IK_"),
                "{l}"
            );
        }
    }
}

/// A resuming client whose server does not answer IK (no `resumption`
/// there): the fallback, every byte still arrives, the early data sent
/// again after the handshake; the record is forgotten (the fallback proved
/// the same key), so the next connection runs XX and records it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resuming_client_tunnel_falls_back_to_a_server_without_resumption() {
    let target = tcp_server(echo).await;
    let pair = Pair::start(target, &[], &["--resumption", "--early-data"]);
    echo_connections(pair.local(), 3).await;
    let client = connected_lines(&pair.client, 3);
    assert!(client[0].contains("resumed=false") && client[0].contains("early_data=NotSent"));
    assert!(client[1].contains("resumed=false") && client[1].contains("early_data=FellBack"));
    assert!(client[2].contains("resumed=false") && client[2].contains("early_data=NotSent"));
}
