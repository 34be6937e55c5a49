//! The four ways from the office to the cloud that issue 20 compares, set up
//! on a [`Bed`]: plain TCP, capnp-noise (`rpc::connect`, `stream::connect`),
//! `capnp-noise tunnel` at both ends, and stunnel (TLS 1.3) at both ends.
//!
//! In the cloud: an `Office` capnp-rpc server over plain TCP (port
//! [`PLAIN_RPC`], also the backend of both tunnels), a capnp-noise
//! `rpc::serve` ([`NOISE_RPC`]), a byte sink over plain TCP ([`PLAIN_SINK`],
//! the tunnels' other backend) and over `stream::accept` ([`NOISE_SINK`]);
//! the server ends of the tunnel and of stunnel. In the office: the client
//! ends, listening on 127.0.0.1. A sink reads to end-of-stream, then answers
//! with the count (8 bytes, big-endian) and closes, so a transfer's time
//! covers every byte arriving, and a truncation shows as a short count.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_noise::rpc::{self, ClientConfig, ClientResumption, ServerConfig};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::wire::{EarlyDataChoice, ResumptionCache, ResumptionConfig};
use capnp_noise::{AnyVat, Identity, Pinned};
use capnp_rpc::rpc_twoparty_capnp::Side as RpcSide;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Bed, Side};
use crate::launch::{self, Children, StunnelEnd};
use crate::office::Office;
use crate::schema::demo_capnp::office;
use crate::support::twoparty_system;

/// Cloud: the plain capnp-rpc `Office` (and the tunnels' RPC backend).
pub const PLAIN_RPC: u16 = 7100;
/// Cloud: the capnp-noise `rpc::serve`.
pub const NOISE_RPC: u16 = 7102;
/// Cloud: a capnp-noise `rpc::serve` that accepts `IK` and early data
/// (SPEC.md 14), for the resumed ways.
pub const NOISE_RPC_IK: u16 = 7103;
/// Cloud: the plain byte sink (and the tunnels' bulk backend).
pub const PLAIN_SINK: u16 = 7200;
/// Cloud: the capnp-noise `stream::accept` byte sink.
pub const NOISE_SINK: u16 = 7202;

/// One way from the office to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// TCP, nothing else.
    Plain,
    /// capnp-noise in the application (`rpc::connect`, `stream::connect`).
    Noise,
    /// `capnp-noise tunnel` client in the office, server in the cloud.
    Tunnel,
    /// stunnel (TLS 1.3, mutual certificates) client and server.
    Stunnel,
    /// `rpc::connect` resuming with a server it knows (Noise `IK`, SPEC.md
    /// 14), the first calls right after `IK` message 2. RPC only.
    NoiseResumed,
    /// As [`NoiseResumed`](Self::NoiseResumed), the first calls as early
    /// data in `IK` message 1 (`EarlyDataChoice::ReplayableNotForwardSecret`;
    /// the server accepts early data). RPC only.
    NoiseEarly,
    /// A second tunnel pair with `--resumption --early-data` at both ends:
    /// the plain client's first bytes in `IK` message 1. RPC only.
    TunnelEarly,
}

impl Way {
    /// The four ways that carry both RPC and bulk, in table order.
    pub const ALL: [Way; 4] = [Way::Plain, Way::Noise, Way::Tunnel, Way::Stunnel];

    /// The ways compared for the first answer: [`ALL`](Self::ALL) and the
    /// two resumed ones, in table order.
    pub const FIRST_ANSWER: [Way; 7] = [
        Way::Plain,
        Way::Noise,
        Way::Tunnel,
        Way::Stunnel,
        Way::NoiseResumed,
        Way::NoiseEarly,
        Way::TunnelEarly,
    ];

    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Way::Plain => "plain TCP",
            Way::Noise => "capnp-noise",
            Way::Tunnel => "capnp-noise tunnel",
            Way::Stunnel => "stunnel (TLS 1.3)",
            Way::NoiseResumed => "capnp-noise resumed (IK)",
            Way::NoiseEarly => "capnp-noise resumed (IK + early data)",
            Way::TunnelEarly => "capnp-noise tunnel resumed (IK + early data)",
        }
    }

    /// For the resumed ways, whether the first calls go as early data.
    fn resumed(self) -> Option<EarlyDataChoice> {
        match self {
            Way::NoiseResumed => Some(EarlyDataChoice::Never),
            Way::NoiseEarly => Some(EarlyDataChoice::ReplayableNotForwardSecret),
            _ => None,
        }
    }

    /// Where the office connects for RPC (`false`) or bulk (`true`).
    fn addr(self, bulk: bool) -> SocketAddr {
        let local = Ipv4Addr::LOCALHOST;
        let (ip, port) = match (self, bulk) {
            (Way::Plain, false) => (Bed::CLOUD, PLAIN_RPC),
            (Way::Plain, true) => (Bed::CLOUD, PLAIN_SINK),
            (Way::Noise, false) => (Bed::CLOUD, NOISE_RPC),
            (Way::Noise, true) => (Bed::CLOUD, NOISE_SINK),
            (Way::Tunnel, false) => (local, 7600),
            (Way::Tunnel, true) => (local, 7601),
            (Way::Stunnel, false) => (local, 7700),
            (Way::Stunnel, true) => (local, 7701),
            // RPC only (bulk through them is not compared).
            (Way::NoiseResumed | Way::NoiseEarly, _) => (Bed::CLOUD, NOISE_RPC_IK),
            (Way::TunnelEarly, _) => (local, 7602),
        };
        SocketAddr::from((ip, port))
    }
}

/// The servers and tunnels of all four ways, running on a bed. Drop it
/// before the bed.
#[derive(Debug)]
pub struct Setup {
    server: Identity,
    client: Identity,
    /// The resumed ways' records (filled by their first call in `start`).
    resumption: Arc<ResumptionCache>,
    children: Children,
    cloud_stop: Option<tokio::sync::oneshot::Sender<()>>,
    cloud: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Starts everything on `bed`: `capnp_noise` is the path of the
    /// `capnp-noise` binary (`env!("CARGO_BIN_EXE_capnp-noise")` in the
    /// tunnel crate's tests and benches). `stunnel` and `openssl` must be
    /// on PATH. Returns once every way has answered a call.
    ///
    /// # Panics
    /// When something does not start.
    pub fn start(bed: &Bed, capnp_noise: &Path) -> Setup {
        Setup::start_with(bed, capnp_noise, &[])
    }

    /// [`start`](Self::start), with `tunnel_args` added to both tunnels'
    /// command lines (`["--keepalive", "1"]`).
    ///
    /// # Panics
    /// When something does not start.
    pub fn start_with(bed: &Bed, capnp_noise: &Path, tunnel_args: &[&str]) -> Setup {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let server = Identity::generate();
        let client = Identity::generate();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (cloud_stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let cloud_id = server.clone();
        let cloud = bed.run_async_in(Side::Cloud, move || async move {
            let plain_rpc = TcpListener::bind(("0.0.0.0", PLAIN_RPC)).await.unwrap();
            let noise_rpc = TcpListener::bind((Bed::CLOUD, NOISE_RPC)).await.unwrap();
            let noise_rpc_ik = TcpListener::bind((Bed::CLOUD, NOISE_RPC_IK)).await.unwrap();
            let ik = ResumptionConfig::default()
                .with_accept_ik(true)
                .with_accept_early_data(true);
            let plain_sink = TcpListener::bind(("0.0.0.0", PLAIN_SINK)).await.unwrap();
            let noise_sink = TcpListener::bind((Bed::CLOUD, NOISE_SINK)).await.unwrap();
            ready_tx.send(()).unwrap();
            tokio::select! {
                _ = stopped => {}
                () = serve_plain_rpc(plain_rpc) => {}
                () = rpc::serve(noise_rpc, cloud_id.clone(), Arc::new(AnyVat),
                    ServerConfig::default(), Office::bootstrap) => {}
                () = rpc::serve(noise_rpc_ik, cloud_id.clone(), Arc::new(AnyVat),
                    ServerConfig::default().with_resumption(ik), Office::bootstrap) => {}
                () = serve_sink(plain_sink, None) => {}
                () = serve_sink(noise_sink, Some(cloud_id)) => {}
            }
        });
        ready_rx.recv().expect("the cloud's servers started");
        let mut setup = Setup {
            server,
            client,
            resumption: Arc::new(ResumptionCache::default()),
            children: Children::default(),
            cloud_stop: Some(cloud_stop),
            cloud: Some(cloud),
            _dir: dir,
        };
        setup.start_tunnels(bed, capnp_noise, tunnel_args);
        setup.start_stunnels(bed);
        // Ready when a call goes through each way (a tunnel or stunnel
        // listens before its far end does). The resumed ways' first call
        // runs XX and records the server.
        for way in Way::FIRST_ANSWER {
            let deadline = Instant::now() + Duration::from_secs(30);
            while setup.try_first_answer(bed, way).is_err() {
                assert!(Instant::now() < deadline, "{} did not come up", way.name());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        setup
    }

    fn start_tunnels(&mut self, bed: &Bed, exe: &Path, extra: &[&str]) {
        let dir = self._dir.path();
        let (skey, ckey) = (dir.join("server.key"), dir.join("client.key"));
        self.server.save(&skey, false).expect("save the server key");
        self.client.save(&ckey, false).expect("save the client key");
        let client_vat = self.client.vat_id().to_string();
        let server_vat = self.server.vat_id().to_string();
        let early: &[&str] = &["--resumption", "--early-data"];
        for (listen, target, local, resume) in [
            (7300, PLAIN_RPC, 7600, &[][..]),
            (7301, PLAIN_SINK, 7601, &[][..]),
            (7302, PLAIN_RPC, 7602, early),
        ] {
            let listen = format!("{}:{listen}", Bed::CLOUD);
            let mut cmd = bed.command(Side::Cloud, exe);
            cmd.args(launch::tunnel_server_args(
                &listen,
                &format!("127.0.0.1:{target}"),
                &skey,
                &client_vat,
            ))
            .args(resume)
            .args(extra);
            self.spawn(cmd, "capnp-noise tunnel server");
            let mut cmd = bed.command(Side::Office, exe);
            cmd.args(launch::tunnel_client_args(
                &format!("127.0.0.1:{local}"),
                &listen,
                &ckey,
                &server_vat,
            ))
            .args(resume)
            .args(extra);
            self.spawn(cmd, "capnp-noise tunnel client");
        }
    }

    fn start_stunnels(&mut self, bed: &Bed) {
        let dir = self._dir.path().to_path_buf();
        launch::stunnel_certificates(&dir);
        let cloud = Bed::CLOUD;
        let server = launch::stunnel_config(
            &dir,
            StunnelEnd::Server,
            &[
                (
                    "rpc",
                    format!("{cloud}:7400"),
                    format!("127.0.0.1:{PLAIN_RPC}"),
                ),
                (
                    "bulk",
                    format!("{cloud}:7401"),
                    format!("127.0.0.1:{PLAIN_SINK}"),
                ),
            ],
        );
        let client = launch::stunnel_config(
            &dir,
            StunnelEnd::Client,
            &[
                ("rpc", "127.0.0.1:7700".into(), format!("{cloud}:7400")),
                ("bulk", "127.0.0.1:7701".into(), format!("{cloud}:7401")),
            ],
        );
        for (side, conf) in [(Side::Cloud, server), (Side::Office, client)] {
            let mut cmd = bed.command(side, "stunnel4");
            cmd.arg(&conf);
            self.spawn(cmd, "stunnel4");
        }
    }

    fn spawn(&mut self, mut cmd: std::process::Command, what: &str) {
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        self.children.push(child);
    }

    /// The server's identity (what a client pins).
    pub fn server_identity(&self) -> &Identity {
        &self.server
    }

    /// The client's identity (the tunnel server allows it).
    pub fn client_identity(&self) -> &Identity {
        &self.client
    }

    /// Time from starting to connect, in the office, to the reply of the
    /// first call (`whoami` on the bootstrap capability, pipelined as
    /// capnp-rpc does).
    ///
    /// # Errors
    /// Why no answer came.
    pub fn try_first_answer(&self, bed: &Bed, way: Way) -> Result<Duration, String> {
        self.with_office(bed, way, |office, start| async move {
            tokio::time::timeout(Duration::from_secs(10), crate::support::whoami(&office))
                .await
                .map_err(|_| "no answer within 10 s".to_string())?
                .map_err(|e| e.to_string())?;
            Ok(start.elapsed())
        })?
    }

    /// Connects from the office to the cloud's `Office` over `way` and runs
    /// `f(office, start)` on that connection (`start`: before connecting),
    /// in the office's namespace; then disconnects.
    ///
    /// # Errors
    /// Why the connection failed (within 10 s).
    pub fn with_office<F, Fut, T>(&self, bed: &Bed, way: Way, f: F) -> Result<T, String>
    where
        F: FnOnce(office::Client, Instant) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let addr = way.addr(false);
        let client = self.client.clone();
        let server = self.server.vat_id();
        let limit = Duration::from_secs(10);
        let resumption = way
            .resumed()
            .map(|early| ClientResumption::new(self.resumption.clone()).with_early_data(early));
        bed.run_async_in(Side::Office, move || async move {
            let start = Instant::now();
            if way == Way::Noise || resumption.is_some() {
                let config = ClientConfig::default()
                    .with_timeout(limit)
                    .with_resumption(resumption);
                let (office, conn): (office::Client, _) =
                    rpc::connect(addr, &client, Arc::new(Pinned(server)), config)
                        .await
                        .map_err(|e| e.to_string())?;
                let out = f(office, start).await;
                let _ = tokio::time::timeout(limit, conn.disconnect()).await;
                Ok(out)
            } else {
                let tcp = tokio::time::timeout(limit, TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("no TCP connection within {limit:?}"))?
                    .map_err(|e| e.to_string())?;
                tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                let mut system = twoparty_system(tcp, RpcSide::Client, None);
                let office: office::Client = system.bootstrap(RpcSide::Server);
                let disconnector = system.get_disconnector();
                let task = tokio::task::spawn_local(system);
                let out = f(office, start).await;
                let _ = tokio::time::timeout(limit, disconnector).await;
                task.abort();
                Ok(out)
            }
        })
        .join()
        .map_err(|_| "the office's thread panicked".to_string())?
    }

    /// Sends `bytes` from the office to the cloud's sink over `way` and
    /// reads the sink's count: the time from connecting to the count, and
    /// the count.
    ///
    /// # Errors
    /// Why the transfer failed.
    pub fn try_transfer(
        &self,
        bed: &Bed,
        way: Way,
        bytes: usize,
    ) -> Result<(Duration, u64), String> {
        let addr = way.addr(true);
        let client = self.client.clone();
        let server = self.server.vat_id();
        bed.run_async_in(Side::Office, move || async move {
            let start = Instant::now();
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            tcp.set_nodelay(true).map_err(|e| e.to_string())?;
            let count = if way == Way::Noise {
                let config = StreamConfig::default();
                let s = stream::connect(tcp, &client, Arc::new(Pinned(server)), config)
                    .await
                    .map_err(|e| e.to_string())?;
                send_and_count(s, bytes).await
            } else {
                send_and_count(tcp, bytes).await
            }
            .map_err(|e| e.to_string())?;
            Ok((start.elapsed(), count))
        })
        .join()
        .map_err(|_| "the office's thread panicked".to_string())?
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(stop) = self.cloud_stop.take() {
            let _ = stop.send(());
        }
        if let Some(cloud) = self.cloud.take() {
            let _ = cloud.join();
        }
    }
}

/// Writes `bytes` (a counting pattern), half-closes, reads the count.
async fn send_and_count<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    bytes: usize,
) -> std::io::Result<u64> {
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| i as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await?;
        left -= n;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await?;
    Ok(u64::from_be_bytes(count))
}

/// A sink: every connection is read to its end, then told the count.
async fn serve_sink(listener: TcpListener, noise: Option<Identity>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let noise = noise.clone();
        tokio::task::spawn_local(async move {
            let _ = tcp.set_nodelay(true);
            let _ = match noise {
                Some(id) => {
                    let config = StreamConfig::default();
                    match stream::accept(tcp, &id, Arc::new(AnyVat), config).await {
                        Ok(s) => count_and_answer(s).await,
                        Err(e) => Err(e.into()),
                    }
                }
                None => count_and_answer(tcp).await,
            };
        });
    }
}

async fn count_and_answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_be_bytes()).await?;
    s.shutdown().await
}

/// The demo `Office` over plain capnp-rpc two-party connections.
async fn serve_plain_rpc(listener: TcpListener) {
    let office: office::Client = capnp_rpc::new_client(Office {
        caller: Identity::from_seed(&[9; 32]).vat_id(),
    });
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let system = twoparty_system(tcp, RpcSide::Server, Some(office.clone().client));
        tokio::task::spawn_local(system);
    }
}

/// `runs` first answers over every way, interleaved (one of each way per
/// run), in [`Way::FIRST_ANSWER`]'s order.
///
/// # Panics
/// When a way does not answer.
pub fn first_answers(setup: &Setup, bed: &Bed, runs: usize) -> Vec<(Way, Vec<Duration>)> {
    let mut times: Vec<(Way, Vec<Duration>)> =
        Way::FIRST_ANSWER.iter().map(|&w| (w, vec![])).collect();
    for _ in 0..runs {
        for (way, t) in &mut times {
            let answer = setup.try_first_answer(bed, *way);
            t.push(answer.unwrap_or_else(|e| panic!("{}: {e}", way.name())));
        }
    }
    times
}

/// `runs` transfers of `bytes` over every way, interleaved, in Mbit/s of
/// payload (from connecting to the sink's count).
///
/// # Panics
/// When a transfer fails or arrives short.
pub fn throughputs(setup: &Setup, bed: &Bed, bytes: usize, runs: usize) -> Vec<(Way, Vec<f64>)> {
    let mut rates: Vec<(Way, Vec<f64>)> = Way::ALL.iter().map(|&w| (w, vec![])).collect();
    for _ in 0..runs {
        for (way, r) in &mut rates {
            let (t, n) = setup
                .try_transfer(bed, *way, bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", way.name()));
            assert_eq!(n, bytes as u64, "{}: a short transfer", way.name());
            r.push(bytes as f64 * 8.0 / t.as_secs_f64() / 1e6);
        }
    }
    rates
}

/// The throughputs of [`throughputs`] as a Markdown table: median, range,
/// and the median against plain TCP's (the first row).
///
/// # Panics
/// When a way has no figure.
pub fn throughput_table(rates: &[(Way, Vec<f64>)]) -> String {
    let mut table =
        String::from("| way | Mbit/s (median) | min-max | of plain TCP |\n|---|---|---|---|\n");
    let plain = median(&rates[0].1);
    for (way, r) in rates {
        let m = median(r);
        let (lo, hi) = r
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        table.push_str(&format!(
            "| {} | {m:.1} | {lo:.1}-{hi:.1} | {:.0} % |\n",
            way.name(),
            m / plain * 100.0
        ));
    }
    table
}

/// The median of `v` (the upper one of an even count).
///
/// # Panics
/// When `v` is empty.
pub fn median<T: PartialOrd + Copy>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    v[v.len() / 2]
}
