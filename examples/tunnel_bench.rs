//! Compares `capnp-noise tunnel` with stunnel and with no tunnel at all.
//!
//! Run it with `benches/tunnel_compare.sh` (which builds the release binary
//! and this example first). For each setup, the same workloads go through
//! the same in-process TCP target:
//!
//! * **direct**: the client connects to the target;
//! * **capnp-noise**: client -> `capnp-noise tunnel client` -> `capnp-noise
//!   tunnel server` -> target, each end pinning the other's VatId;
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
//! Each figure is the median of several runs (`--runs`). Tunnel processes
//! are children of this one and are killed when it ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USAGE: &str = "\
usage: tunnel_bench --capnp-noise PATH [--stunnel PATH] [--bytes N] [--rounds N]
                    [--connects N] [--runs N]
  --capnp-noise PATH  the release binary (benches/tunnel_compare.sh passes it)
  --stunnel PATH      stunnel (default: stunnel4 on PATH)
  --bytes N           bulk transfer size (default 1073741824)
  --rounds N          round trips (default 10000)
  --connects N        new connections (default 200)
  --runs N            runs per figure; the median is shown (default 3)";

struct Options {
    capnp_noise: PathBuf,
    stunnel: String,
    bytes: u64,
    rounds: usize,
    connects: usize,
    runs: usize,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        capnp_noise: PathBuf::new(),
        stunnel: "stunnel4".into(),
        bytes: 1 << 30,
        rounds: 10_000,
        connects: 200,
        runs: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--capnp-noise" => o.capnp_noise = value()?.into(),
            "--stunnel" => o.stunnel = value()?,
            "--bytes" => o.bytes = num(value()?)?,
            "--rounds" => o.rounds = num(value()?)? as usize,
            "--connects" => o.connects = num(value()?)? as usize,
            "--runs" => o.runs = num(value()?)?.max(1) as usize,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.capnp_noise.as_os_str().is_empty() {
        return Err("--capnp-noise is required".into());
    }
    Ok(o)
}

/// Children killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

#[derive(Default)]
struct Figures {
    mib_s: f64,
    rtt_mean: f64,
    rtt_p50: f64,
    rtt_p99: f64,
    connect_p50: f64,
}

async fn measure(name: &str, addr: SocketAddr, o: &Options) -> Figures {
    eprintln!("{name}: warming up");
    connects(addr, 5).await;
    let mut mib_s = Vec::new();
    let mut means = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut conn = Vec::new();
    for run in 1..=o.runs {
        let secs = bulk(addr, o.bytes).await;
        mib_s.push(o.bytes as f64 / (1 << 20) as f64 / secs);
        let rt = round_trips(addr, o.rounds).await;
        means.push(rt.iter().sum::<f64>() / rt.len() as f64);
        p50s.push(percentile(&rt, 0.5));
        p99s.push(percentile(&rt, 0.99));
        let c = connects(addr, o.connects).await;
        conn.push(percentile(&c, 0.5));
        eprintln!(
            "{name}: run {run}: {:.0} MiB/s, round trip mean {:.1} us, connect {:.2} ms",
            mib_s[run - 1],
            means[run - 1],
            conn[run - 1]
        );
    }
    Figures {
        mib_s: median(mib_s),
        rtt_mean: median(means),
        rtt_p50: median(p50s),
        rtt_p99: median(p99s),
        connect_p50: median(conn),
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
fn capnp_noise(procs: &mut Procs, bin: &Path, args: &[&str]) -> (SocketAddr, String) {
    let child = Command::new(bin)
        .arg("tunnel")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start capnp-noise");
    procs.0.push(child);
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
    panic!("capnp-noise tunnel {args:?} exited before listening");
}

fn capnp_noise_pair(bin: &Path, dir: &Path, target: SocketAddr) -> (Procs, SocketAddr) {
    let key = |name: &str| {
        let path = dir.join(name);
        let out = Command::new(bin)
            .args(["keygen", "-o"])
            .arg(&path)
            .output()
            .expect("keygen");
        assert!(out.status.success());
        let vat = String::from_utf8(out.stdout).unwrap().trim().to_string();
        (path.to_str().unwrap().to_string(), vat)
    };
    let (server_key, _) = key("server.key");
    let (client_key, client_vat) = key("client.key");
    let target = target.to_string();
    let mut procs = Procs(Vec::new());
    let (server_addr, server_vat) = capnp_noise(
        &mut procs,
        bin,
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--connect",
            &target,
            "--identity",
            &server_key,
            "--allow-vat",
            &client_vat,
        ],
    );
    let server_addr = server_addr.to_string();
    let (local, _) = capnp_noise(
        &mut procs,
        bin,
        &[
            "client",
            "--listen",
            "127.0.0.1:0",
            "--connect",
            &server_addr,
            "--identity",
            &client_key,
            "--peer",
            &server_vat,
        ],
    );
    (procs, local)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn stunnel_pair(stunnel: &str, dir: &Path, target: SocketAddr) -> (Procs, SocketAddr) {
    for name in ["server", "client"] {
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(dir.join(format!("{name}.key.pem")))
            .arg("-out")
            .arg(dir.join(format!("{name}.cert.pem"))));
    }
    let (server_port, client_port) = (free_port(), free_port());
    let common = |name: &str, peer: &str| {
        format!(
            "foreground = yes\npid =\ndebug = 3\n\
             socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n\
             cert = {d}/{name}.cert.pem\nkey = {d}/{name}.key.pem\n\
             CAfile = {d}/{peer}.cert.pem\nverifyPeer = yes\n\
             sslVersionMin = TLSv1.3\n",
            d = dir.display()
        )
    };
    let server_conf = dir.join("stunnel-server.conf");
    std::fs::write(
        &server_conf,
        format!(
            "{}[server]\naccept = 127.0.0.1:{server_port}\nconnect = {target}\n",
            common("server", "client")
        ),
    )
    .unwrap();
    let client_conf = dir.join("stunnel-client.conf");
    std::fs::write(
        &client_conf,
        format!(
            "{}[client]\nclient = yes\naccept = 127.0.0.1:{client_port}\nconnect = 127.0.0.1:{server_port}\n",
            common("client", "server")
        ),
    )
    .unwrap();
    let spawn = |conf: &Path| {
        Command::new(stunnel)
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
            break;
        }
        assert!(Instant::now() < deadline, "stunnel did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

#[tokio::main(flavor = "current_thread")]
async fn main() {
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
    let dir = tempfile::tempdir().unwrap();
    let target = target().await;
    println!("machine: {}", machine());
    println!(
        "workloads: bulk {} MiB one way; {} round trips of {MSG} bytes; {} new connections with one round trip; median of {} runs",
        o.bytes >> 20,
        o.rounds,
        o.connects,
        o.runs
    );

    let direct = measure("direct", target, &o).await;
    let (noise_procs, noise_addr) = capnp_noise_pair(&o.capnp_noise, dir.path(), target);
    eprintln!(
        "capnp-noise: negotiated {} (the initiator's preferred suite on this CPU)",
        capnp_noise::wire::Suite::preferred().noise_name()
    );
    let noise = measure("capnp-noise", noise_addr, &o).await;
    drop(noise_procs);
    let (stunnel_procs, stunnel_addr) = stunnel_pair(&o.stunnel, dir.path(), target).await;
    let stunnel = measure("stunnel", stunnel_addr, &o).await;
    drop(stunnel_procs);

    println!();
    println!(
        "| setup | bulk MiB/s | vs direct | round trip mean µs | p50 µs | p99 µs | vs direct (mean) | connect + 1 round trip, p50 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, f) in [
        ("direct", &direct),
        ("capnp-noise tunnel", &noise),
        ("stunnel (TLS 1.3)", &stunnel),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
            f.mib_s,
            f.mib_s / direct.mib_s,
            f.rtt_mean,
            f.rtt_p50,
            f.rtt_p99,
            f.rtt_mean / direct.rtt_mean,
            f.connect_p50
        );
    }
    println!();
    println!(
        "capnp-noise vs stunnel: throughput x{:.2}, round-trip latency x{:.2} (lower is better), connect x{:.2}",
        noise.mib_s / stunnel.mib_s,
        noise.rtt_mean / stunnel.rtt_mean,
        noise.connect_p50 / stunnel.connect_p50
    );
}
