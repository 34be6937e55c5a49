//! capnp-noise side by side with what users would pick instead: plain tokio
//! TCP, tokio-rustls (TLS 1.3) and capnp-rpc over plain TCP. Identical
//! workloads in one process run, interleaved across rounds (round 1 runs
//! every contender once, then round 2...), medians and same-round ratios.
//!
//! ```text
//! cargo bench --bench compare                       # everything, 5 rounds
//! cargo bench --bench compare -- --rounds 7 --only bulk,rpc   # the issue-16 figures, a few minutes
//! cargo bench --bench compare -- --only bulk --pin apart      # the two threads on two CPUs
//! ```
//!
//! Settings: command-line options after `--`, or environment variables
//! (an option wins; defaults in brackets):
//!
//! | option | variable | meaning |
//! |---|---|---|
//! | `--rounds N` | `CAPNP_NOISE_BENCH_ROUNDS` [5] | rounds; each runs every contender once |
//! | `--only LIST` | `CAPNP_NOISE_BENCH_ONLY` [all] | comma-separated: `bulk`, `handshake`, `rpc`, `memory` |
//! | `--bulk-mib N` | `CAPNP_NOISE_BENCH_BULK_MIB` [512] | bytes per bulk transfer, in MiB |
//! | `--handshakes N` | `CAPNP_NOISE_BENCH_HANDSHAKES` [1000] | handshakes per measurement |
//! | `--rpc-seq N` | `CAPNP_NOISE_BENCH_RPC_SEQ` [20000] | sequential calls per measurement |
//! | `--rpc-pipelined N` | `CAPNP_NOISE_BENCH_RPC_PIPELINED` [100000] | calls per measurement, 64 in flight |
//! | `--rpc-large N` | `CAPNP_NOISE_BENCH_RPC_LARGE` [10000] | 64 KiB calls per measurement, 64 in flight |
//! | `--connections N` | `CAPNP_NOISE_BENCH_CONNECTIONS` [1000] | idle connections in the memory section |
//! | `--contenders LIST` | `CAPNP_NOISE_BENCH_CONTENDERS` [all] | comma-separated name filters, e.g. `noise,plain` |
//! | `--pin MODE` | `CAPNP_NOISE_BENCH_PIN` [bulk: same, others: none] | `apart`: client and server threads pinned to two different CPUs; `same`: both on one CPU; `none`: the scheduler places them (see `Settings::pin_for`) |
//!
//! Every measurement runs the client and the server on two threads, each
//! with its own current-thread tokio runtime (plus a `LocalSet` for RPC),
//! over loopback TCP (127.0.0.1, port 0) with `TCP_NODELAY` on both ends.
//! Every contender gets the same work: bulk transfers are 64 KiB writes
//! read with a 64 KiB buffer.
//!
//! **The primary figure is CPU time per unit of work**: user plus system
//! time of the whole process (`getrusage(RUSAGE_SELF)`) across the
//! measurement, which on loopback includes the kernel's TCP work of both
//! ends (except what it defers to its `ksoftirqd` threads: at most 20 ms
//! during 3 x 512 MiB of any bulk contender here, under 2 %). Other load on the machine moves it much less than wall-clock
//! time (which is printed second), because it does not count the time a
//! thread waits for a CPU. Voluntary context switches per unit of work
//! (also from `getrusage`) show how often the two threads wait for each
//! other. Ratios are taken within a round and given as the median over
//! rounds with the range. The header gives the date, the load average and
//! the command; the last section is a summary against the targets.
//!
//! Contenders:
//! * TLS: rustls 0.23 with its default aws-lc-rs provider, TLS 1.3 only, key
//!   exchange X25519 only (rustls prefers X25519MLKEM768 by default; forced
//!   off so both sides do the same Diffie-Hellman), Ed25519 certificates
//!   from a test CA, no resumption (no tickets, no session cache). The
//!   default suite list negotiates TLS13_AES_256_GCM_SHA384; the ChaCha
//!   contender allows only TLS13_CHACHA20_POLY1305_SHA256.
//! * capnp-noise: Noise XX, both suites, VatIds verified by both sides. The
//!   server admits handshakes through default handshake slots, as
//!   `rpc::serve` does; the handshake section also runs one contender
//!   without them, to show what admission costs.

use capnp_noise_test::office;
use capnp_noise_test::support::twoparty_system;

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::Poll;
use std::thread;
use std::time::Instant;

use capnp_noise::admission::HandshakeSlots;
use capnp_noise::rpc::{self, ClientConfig, ServerConfig};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::wire::{HandshakeConfig, Suite};
use capnp_noise::{Identity, Pinned};
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_rpc::rpc_twoparty_capnp::Side;
use futures::stream::{FuturesUnordered, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------
// A counting allocator, switched on only in the memory and allocation
// sections so that it costs the timed sections nothing but one load.

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only statistics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------
// Settings and machine.

struct Settings {
    rounds: usize,
    only: Vec<String>,
    bulk_bytes: u64,
    handshakes: usize,
    rpc_seq: usize,
    rpc_pipelined: usize,
    rpc_large: usize,
    connections: usize,
    contenders: Vec<String>,
    /// `None`: each section's default (see [`Settings::pin_for`]).
    pin: Option<PinMode>,
}

/// Where the client and server threads run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PinMode {
    /// On two different CPUs (the first two this process may use).
    Apart,
    /// Both on the first CPU this process may use.
    Same,
    /// Wherever the scheduler puts them.
    None,
}

/// The value of setting `name`: the command-line option `--name VALUE`
/// (or `--name=VALUE`), else the environment variable `var`.
fn setting(name: &str, var: &str) -> Option<String> {
    let flag = format!("--{name}");
    let args: Vec<String> = std::env::args().collect();
    for (i, a) in args.iter().enumerate() {
        if *a == flag {
            let v = args
                .get(i + 1)
                .unwrap_or_else(|| panic!("{flag} needs a value"));
            return Some(v.clone());
        }
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            return Some(v.to_string());
        }
    }
    std::env::var(var).ok()
}

fn number(name: &str, var: &str, default: usize) -> usize {
    match setting(name, var) {
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("--{name} / {var} = {v:?} is not a number")),
        None => default,
    }
}

fn list(name: &str, var: &str) -> Vec<String> {
    setting(name, var)
        .map(|v| v.split(',').map(|s| s.trim().to_lowercase()).collect())
        .unwrap_or_default()
}

impl Settings {
    fn from_args_and_env() -> Self {
        let pin = match setting("pin", "CAPNP_NOISE_BENCH_PIN").as_deref() {
            None => None,
            Some("apart") => Some(PinMode::Apart),
            Some("same") => Some(PinMode::Same),
            Some("none") => Some(PinMode::None),
            Some(other) => panic!("--pin {other:?}: expected apart, same or none"),
        };
        Settings {
            rounds: number("rounds", "CAPNP_NOISE_BENCH_ROUNDS", 5).max(1),
            only: list("only", "CAPNP_NOISE_BENCH_ONLY"),
            bulk_bytes: (number("bulk-mib", "CAPNP_NOISE_BENCH_BULK_MIB", 512).max(1) as u64) << 20,
            handshakes: number("handshakes", "CAPNP_NOISE_BENCH_HANDSHAKES", 1000).max(1),
            rpc_seq: number("rpc-seq", "CAPNP_NOISE_BENCH_RPC_SEQ", 20_000).max(1),
            rpc_pipelined: number("rpc-pipelined", "CAPNP_NOISE_BENCH_RPC_PIPELINED", 100_000)
                .max(1),
            rpc_large: number("rpc-large", "CAPNP_NOISE_BENCH_RPC_LARGE", 10_000).max(1),
            connections: number("connections", "CAPNP_NOISE_BENCH_CONNECTIONS", 1000).max(1),
            contenders: list("contenders", "CAPNP_NOISE_BENCH_CONTENDERS"),
            pin,
        }
    }

    /// Where `section`'s threads run, which it also prints. Unless
    /// `--pin` says otherwise: bulk transfers with both threads on one CPU,
    /// the latency-bound sections (handshakes, RPC) where the scheduler
    /// puts them. Pinned apart, a reader faster than its writer (plain
    /// TCP's) drains every write and sleeps, 5 voluntary context switches
    /// per MiB, and its CPU per byte then measures the VM's wake-ups: on a
    /// machine at load 2-4 plain TCP used *more* CPU per byte than
    /// capnp-noise, spread 0.50..0.84 ns (on one CPU: 0.31..0.36). And every
    /// message of a ping-pong wakes a thread on the other vCPU: that
    /// tripled the CPU per sequential call for every contender alike (2.0
    /// switches per call against 1.1).
    fn pin_for(&self, section: &str) -> PinMode {
        let pin = self.pin.unwrap_or(if section == "bulk" {
            PinMode::Same
        } else {
            PinMode::None
        });
        *PIN.lock().unwrap() = pin;
        println!(
            "\n{section}: threads {}",
            match pin {
                PinMode::Apart => "pinned to two different CPUs",
                PinMode::Same => "pinned to the same CPU",
                PinMode::None => "not pinned",
            }
        );
        pin
    }

    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    /// The contenders whose names contain one of the filter's words.
    fn keep<'a, const N: usize>(&self, all: [&'a Contender; N]) -> Vec<&'a Contender> {
        all.into_iter()
            .filter(|c| {
                let name = c.name.to_lowercase();
                self.contenders.is_empty() || self.contenders.iter().any(|f| name.contains(f))
            })
            .collect()
    }
}

fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown".into());
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| if flags.contains(&f) { "yes" } else { "no" };
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("machine: {model}, {cores} cores, Linux {}", kernel.trim());
    println!(
        "cpu flags: aes={} pclmulqdq={} vaes={} vpclmulqdq={} avx2={} avx512f={}",
        has("aes"),
        has("pclmulqdq"),
        has("vaes"),
        has("vpclmulqdq"),
        has("avx2"),
        has("avx512f")
    );
    println!(
        "capnp-noise {} (preferred suite here: {}), rustls 0.23 + tokio-rustls 0.26 (aws-lc-rs), capnp-rpc 0.27",
        env!("CARGO_PKG_VERSION"),
        Suite::preferred()
    );
}

// ---------------------------------------------------------------------------
// Contenders.

#[derive(Clone)]
struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

/// (server, client) vats, one pair per connection.
type FreshVats = Arc<Mutex<Vec<(Identity, Identity)>>>;

#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a handful of values, made once
enum Transport {
    Tcp,
    Tls(Tls),
    Noise {
        suite: Suite,
        server: Identity,
        client: Identity,
        /// For "cold" handshakes: a fresh (server, client) pair of vats per
        /// connection, so no verified binding is ever cached.
        /// Refilled before each measurement, outside the clock.
        fresh: Option<FreshVats>,
        /// Servers admit handshakes through handshake slots, as
        /// `rpc::serve` does (the default); false: no slots.
        admission: bool,
    },
}

#[derive(Clone)]
struct Contender {
    name: String,
    transport: Transport,
}

fn tcp() -> Contender {
    Contender {
        name: "plain TCP".into(),
        transport: Transport::Tcp,
    }
}

fn noise(suite: Suite) -> Contender {
    let short = match suite {
        Suite::AesGcmSha256 => "AESGCM",
        _ => "ChaChaPoly",
    };
    Contender {
        name: format!("capnp-noise {short}"),
        transport: Transport::Noise {
            suite,
            server: Identity::generate(),
            client: Identity::generate(),
            fresh: None,
            admission: true,
        },
    }
}

/// Certificates for the TLS contenders: one Ed25519 CA, an Ed25519 server
/// certificate for "localhost" and an Ed25519 client certificate.
struct Pki {
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, Vec<u8>),
    client: (CertificateDer<'static>, Vec<u8>),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_ED25519};
    let ca_key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.der().clone(), key.serialize_der())
    };
    Pki {
        ca: ca.der().clone(),
        server: leaf("localhost"),
        client: leaf("client"),
    }
}

fn tls(pki: &Pki, chacha_only: bool, mutual: bool) -> Contender {
    use rustls::crypto::aws_lc_rs as provider;
    let mut p = provider::default_provider();
    p.kx_groups = vec![provider::kx_group::X25519];
    if chacha_only {
        p.cipher_suites = vec![provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    }
    let p = Arc::new(p);
    let key = |der: &Vec<u8>| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.clone()));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let roots = Arc::new(roots);

    let server = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap();
    let server = if mutual {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), p.clone())
                .build()
                .unwrap();
        server.with_client_cert_verifier(verifier)
    } else {
        server.with_no_client_auth()
    };
    let mut server = server
        .with_single_cert(vec![pki.server.0.clone()], key(&pki.server.1))
        .unwrap();
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

    let client = rustls::ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut client = if mutual {
        client
            .with_client_auth_cert(vec![pki.client.0.clone()], key(&pki.client.1))
            .unwrap()
    } else {
        client.with_no_client_auth()
    };
    client.resumption = rustls::client::Resumption::disabled();

    let suite = if chacha_only {
        "CHACHA20"
    } else {
        "AES-256-GCM"
    };
    let auth = if mutual { ", mutual" } else { "" };
    Contender {
        name: format!("tokio-rustls {suite}{auth}"),
        transport: Transport::Tls(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        }),
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

fn noise_config(suite: Suite) -> StreamConfig {
    StreamConfig::default().with_handshake(HandshakeConfig::with_suite(suite))
}

impl Contender {
    /// For capnp-noise: the suite, this side's vat and a policy pinned to
    /// the other side's, for the `i`-th connection.
    fn noise_side(&self, i: usize, server_side: bool) -> Option<(Suite, Identity, Arc<Pinned>)> {
        let Transport::Noise {
            suite,
            server,
            client,
            fresh,
            ..
        } = &self.transport
        else {
            return None;
        };
        let (server, client) = match fresh {
            Some(pairs) => pairs.lock().unwrap()[i].clone(),
            None => (server.clone(), client.clone()),
        };
        let (me, peer) = if server_side {
            (server, client)
        } else {
            (client, server)
        };
        Some((*suite, me, Arc::new(Pinned(peer.vat_id()))))
    }

    /// The `i`-th connection's server side, handshake done. capnp-noise
    /// servers admit handshakes as `rpc::serve` does (default handshake
    /// slots, per source address), so the figures include admission.
    async fn server_io(&self, tcp: TcpStream, i: usize) -> BoxIo {
        static SLOTS: std::sync::OnceLock<HandshakeSlots> = std::sync::OnceLock::new();
        tcp.set_nodelay(true).unwrap();
        if let Some((suite, me, policy)) = self.noise_side(i, true) {
            let mut config = noise_config(suite).with_remote_addr(tcp.peer_addr().unwrap());
            if let Transport::Noise {
                admission: true, ..
            } = &self.transport
            {
                config =
                    config.with_handshake_slots(SLOTS.get_or_init(HandshakeSlots::default).clone());
            }
            return Box::new(stream::accept(tcp, &me, policy, config).await.unwrap());
        }
        match &self.transport {
            Transport::Tls(t) => Box::new(
                tokio_rustls::TlsAcceptor::from(t.server.clone())
                    .accept(tcp)
                    .await
                    .unwrap(),
            ),
            _ => Box::new(tcp),
        }
    }

    /// The `i`-th connection's client side, handshake done.
    async fn client_io(&self, addr: SocketAddr, i: usize) -> BoxIo {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        if let Some((suite, me, policy)) = self.noise_side(i, false) {
            let config = noise_config(suite);
            return Box::new(stream::connect(tcp, &me, policy, config).await.unwrap());
        }
        match &self.transport {
            Transport::Tls(t) => Box::new(
                tokio_rustls::TlsConnector::from(t.client.clone())
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap(),
            ),
            _ => Box::new(tcp),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Where measurements put their threads (set per section, from the settings).
static PIN: Mutex<PinMode> = Mutex::new(PinMode::Same);

/// The CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let set = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Pins the calling thread as `PIN` says: the client (`server == false`)
/// to the first allowed CPU, the server to the second (`apart`) or the
/// first (`same`). With one CPU, or `none`, it stays where it is.
fn pin_this_thread(server: bool) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let cpus = allowed_cpus();
    let pin = *PIN.lock().unwrap();
    let cpu = match pin {
        PinMode::None => return,
        _ if cpus.len() < 2 => return,
        PinMode::Apart if server => cpus[1],
        PinMode::Apart | PinMode::Same => cpus[0],
    };
    let mut set = CpuSet::new();
    set.set(cpu).expect("a CPU number within the set");
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Undoes [`pin_this_thread`] for the calling thread (the client runs on
/// the main thread, which later sections use unpinned).
fn unpin_this_thread(cpus: &[usize]) {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).expect("a CPU number within the set");
    }
    sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Runs `server` on its own thread and runtime with a fresh loopback
/// listener, and `client` on this thread with another runtime, both pinned
/// as [`PIN`] says.
fn client_server<S, SF, C, CF, T>(server: S, client: C) -> T
where
    S: FnOnce(TcpListener) -> SF + Send + 'static,
    SF: Future<Output = ()>,
    C: FnOnce(SocketAddr) -> CF,
    CF: Future<Output = T>,
{
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        pin_this_thread(true);
        let rt = runtime();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            server(listener).await;
        });
    });
    let addr = rx.recv().unwrap();
    let cpus = allowed_cpus();
    pin_this_thread(false);
    let rt = runtime();
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, client(addr));
    handle.join().expect("server thread");
    unpin_this_thread(&cpus);
    out
}

/// The process's CPU time (user + system, every thread, `getrusage`) and
/// voluntary context switches so far.
fn usage() -> (f64, i64) {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    (
        secs(u.user_time()) + secs(u.system_time()),
        u.voluntary_context_switches() as i64,
    )
}

/// Wall-clock seconds, CPU seconds (the whole process: both threads, and
/// the kernel's loopback TCP work done on their behalf) and voluntary
/// context switches of one measurement.
#[derive(Clone, Copy)]
struct Took {
    secs: f64,
    cpu: f64,
    switches: f64,
}

/// A stopwatch for all three.
struct Clock {
    start: Instant,
    cpu_start: f64,
    switches_start: i64,
}

impl Clock {
    fn start() -> Self {
        let (cpu_start, switches_start) = usage();
        Clock {
            cpu_start,
            switches_start,
            start: Instant::now(),
        }
    }
    fn stop(self) -> Took {
        let secs = self.start.elapsed().as_secs_f64();
        let (cpu, switches) = usage();
        Took {
            secs,
            cpu: cpu - self.cpu_start,
            switches: (switches - self.switches_start) as f64,
        }
    }
}

async fn ping(io: &mut BoxIo) {
    io.write_all(b"?").await.unwrap();
    io.flush().await.unwrap();
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await.unwrap();
}

async fn pong(io: &mut BoxIo) {
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await.unwrap();
    io.write_all(&b).await.unwrap();
    io.flush().await.unwrap();
}

// ---------------------------------------------------------------------------
// Measurements. Each returns (seconds, work units).

const WRITE_SIZE: usize = 64 * 1024;

/// One connection, established before the clock starts; the client writes
/// `bytes` in 64 KiB writes, the server reads them with a 64 KiB buffer and
/// answers one byte at the end.
fn bulk(c: &Contender, bytes: u64) -> Took {
    let sc = c.clone();
    client_server(
        move |listener| async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = sc.server_io(tcp, 0).await;
            pong(&mut io).await;
            let mut buf = vec![0u8; WRITE_SIZE];
            let mut got = 0u64;
            while got < bytes {
                let n = io.read(&mut buf).await.unwrap();
                assert!(n > 0, "early end of stream");
                got += n as u64;
            }
            io.write_all(b"!").await.unwrap();
            io.flush().await.unwrap();
            let _ = io.read(&mut buf).await; // until the client is done
        },
        |addr| async move {
            let mut io = c.client_io(addr, 0).await;
            ping(&mut io).await;
            let data = vec![0x5au8; WRITE_SIZE];
            let clock = Clock::start();
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(WRITE_SIZE as u64) as usize;
                io.write_all(&data[..n]).await.unwrap();
                sent += n as u64;
            }
            io.flush().await.unwrap();
            let mut ack = [0u8; 1];
            io.read_exact(&mut ack).await.unwrap();
            let t = clock.stop();
            io.shutdown().await.unwrap();
            t
        },
    )
}

/// `n` connections one after the other: TCP connect, handshake, and a
/// one-byte ping-pong (so both sides have finished), then close.
fn handshakes(c: &Contender, n: usize) -> Took {
    let sc = c.clone();
    client_server(
        move |listener| async move {
            for i in 0..n {
                let (tcp, _) = listener.accept().await.unwrap();
                let mut io = sc.server_io(tcp, i).await;
                pong(&mut io).await;
            }
        },
        |addr| async move {
            let clock = Clock::start();
            for i in 0..n {
                let mut io = c.client_io(addr, i).await;
                ping(&mut io).await;
            }
            clock.stop()
        },
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Sequential,
    Pipelined,
    Large,
}

const IN_FLIGHT: usize = 64;
const LARGE: usize = 64 * 1024;

fn office_client() -> office_capnp::Client {
    capnp_rpc::new_client(office::Office {
        caller: Identity::from_seed(&[9; 32]).vat_id(),
    })
}

async fn call(office: &office_capnp::Client, data: &[u8]) {
    let mut req = office.echo_request();
    req.get().set_data(data);
    let reply = req.send().promise.await.unwrap();
    assert_eq!(reply.get().unwrap().get_data().unwrap().len(), data.len());
}

async fn calls(office: &office_capnp::Client, workload: Rpc, n: usize) {
    let data = vec![0xa5u8; if workload == Rpc::Large { LARGE } else { 16 }];
    if workload == Rpc::Sequential {
        for _ in 0..n {
            call(office, &data).await;
        }
        return;
    }
    let mut in_flight = FuturesUnordered::new();
    let mut started = 0;
    while started < n || !in_flight.is_empty() {
        while started < n && in_flight.len() < IN_FLIGHT {
            in_flight.push(call(office, &data));
            started += 1;
        }
        in_flight.next().await;
    }
}

/// One connection; `n` echo calls timed after a warm-up.
fn rpc_calls(c: &Contender, workload: Rpc, n: usize) -> Took {
    let sc = c.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    client_server(
        move |listener| async move {
            match &sc.transport {
                Transport::Noise {
                    suite,
                    server,
                    client,
                    ..
                } => {
                    let mut options = ServerConfig::default();
                    options.handshake = HandshakeConfig::with_suite(*suite);
                    let serve = rpc::serve(
                        listener,
                        server.clone(),
                        Arc::new(Pinned(client.vat_id())),
                        options,
                        |_: &rpc::PeerInfo| office_client(),
                    );
                    tokio::select! {
                        _ = serve => {}
                        _ = stop_rx => {}
                    }
                }
                _ => {
                    let (tcp, _) = listener.accept().await.unwrap();
                    tcp.set_nodelay(true).unwrap();
                    let system = match &sc.transport {
                        Transport::Tls(t) => {
                            let tls = tokio_rustls::TlsAcceptor::from(t.server.clone())
                                .accept(tcp)
                                .await
                                .unwrap();
                            twoparty_system(tls, Side::Server, Some(office_client().client))
                        }
                        _ => twoparty_system(tcp, Side::Server, Some(office_client().client)),
                    };
                    let _ = system.await;
                    drop(stop_rx);
                }
            }
        },
        |addr| async move {
            let (office, disconnect): (office_capnp::Client, Pin<Box<dyn Future<Output = ()>>>) =
                match &c.transport {
                    Transport::Noise {
                        suite,
                        server,
                        client,
                        ..
                    } => {
                        let mut options = ClientConfig::default();
                        options.handshake = HandshakeConfig::with_suite(*suite);
                        let (office, conn) =
                            rpc::connect(addr, client, Arc::new(Pinned(server.vat_id())), options)
                                .await
                                .unwrap();
                        (
                            office,
                            Box::pin(async move {
                                conn.disconnect().await.unwrap();
                            }),
                        )
                    }
                    t => {
                        let tcp = TcpStream::connect(addr).await.unwrap();
                        tcp.set_nodelay(true).unwrap();
                        let mut system = match t {
                            Transport::Tls(t) => {
                                let tls = tokio_rustls::TlsConnector::from(t.client.clone())
                                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                                    .await
                                    .unwrap();
                                twoparty_system(tls, Side::Client, None)
                            }
                            _ => twoparty_system(tcp, Side::Client, None),
                        };
                        let office: office_capnp::Client = system.bootstrap(Side::Server);
                        let disconnector = system.get_disconnector();
                        let task = tokio::task::spawn_local(system);
                        (
                            office,
                            Box::pin(async move {
                                disconnector.await.unwrap();
                                let _ = task.await;
                            }),
                        )
                    }
                };
            calls(&office, workload, (n / 20).clamp(10, 1000)).await; // warm-up
            let clock = Clock::start();
            calls(&office, workload, n).await;
            let t = clock.stop();
            drop(office);
            disconnect.await;
            let _ = stop_tx.send(());
            t
        },
    )
}

// ---------------------------------------------------------------------------
// Memory held by idle connections, and allocations in steady state.

/// Sends `data` from `a` to `b`, reading it concurrently.
async fn one_way(a: &mut BoxIo, b: &mut BoxIo, data: &[u8], sink: &mut [u8]) {
    let w = async {
        a.write_all(data).await.unwrap();
        a.flush().await.unwrap();
    };
    let r = async {
        let mut got = 0;
        while got < data.len() {
            got += b.read(sink).await.unwrap();
        }
    };
    tokio::join!(w, r);
}

/// Memory per idle connection end: `connections` pairs are set up in one
/// thread, each exchanges one small message and then (if `burst`) 256 KiB
/// each way, then every end polls a read that finds nothing (as an idle RPC
/// connection does). Returns (Rust heap bytes, all malloc'd bytes) per
/// connection end: the second also counts what C code (aws-lc) allocates.
fn idle_memory(c: &Contender, connections: usize, burst: bool) -> (f64, f64) {
    const BURST: usize = 256 * 1024;
    let rt = runtime();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut ends: Vec<BoxIo> = Vec::with_capacity(2 * connections);
        COUNTING.store(true, Ordering::SeqCst);
        let malloc_before = malloc_in_use();
        let before = LIVE_BYTES.load(Ordering::SeqCst);
        let bytes = vec![7u8; if burst { BURST } else { 0 }];
        let mut sink = vec![0u8; 64 * 1024];
        for i in 0..connections {
            let (server, client) = tokio::join!(
                async {
                    let (tcp, _) = listener.accept().await.unwrap();
                    c.server_io(tcp, i).await
                },
                c.client_io(addr, i)
            );
            let (mut s, mut cl) = (server, client);
            // A request and an answer, then a burst each way.
            let (_, _) = tokio::join!(ping(&mut cl), pong(&mut s));
            if burst {
                one_way(&mut cl, &mut s, &bytes, &mut sink).await;
                one_way(&mut s, &mut cl, &bytes, &mut sink).await;
            }
            // Idle: a read is pending on both ends.
            for io in [&mut s, &mut cl] {
                let mut b = [0u8; 1];
                poll_fn(|cx| {
                    let mut buf = ReadBuf::new(&mut b);
                    match Pin::new(&mut **io).poll_read(cx, &mut buf) {
                        Poll::Pending => Poll::Ready(()),
                        Poll::Ready(r) => panic!("unexpected read result {r:?}"),
                    }
                })
                .await;
            }
            ends.push(s);
            ends.push(cl);
        }
        drop(bytes);
        drop(sink);
        let held = LIVE_BYTES.load(Ordering::SeqCst) - before;
        let malloc = malloc_in_use() - malloc_before;
        COUNTING.store(false, Ordering::SeqCst);
        drop(ends);
        let per_end = (2 * connections) as f64;
        (held as f64 / per_end, malloc as f64 / per_end)
    })
}

/// Bytes in use in the C allocator (glibc `mallinfo2`: all arenas plus
/// mmapped blocks), which serves both Rust's heap and C code such as
/// aws-lc (the AEAD key contexts of TLS and capnp-noise alike live there).
fn malloc_in_use() -> i64 {
    capnp_noise_test::heap::in_use() as i64
}

/// Writes `n` times 64 KiB, the last byte of the last write a '.', then flushes.
async fn pass(io: &mut BoxIo, data: &mut [u8], n: u64) {
    for i in 0..n {
        data[WRITE_SIZE - 1] = if i + 1 == n { b'.' } else { b'x' };
        io.write_all(data).await.unwrap();
    }
    io.flush().await.unwrap();
}

/// Heap allocations per 64 KiB write during a bulk transfer (both ends,
/// after warm-up).
fn allocations_per_write(c: &Contender, bytes: u64) -> f64 {
    let sc = c.clone();
    let (writes, allocs) = client_server(
        move |listener| async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut io = sc.server_io(tcp, 0).await;
            let mut buf = vec![0u8; WRITE_SIZE];
            pong(&mut io).await;
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) if buf[n - 1] == b'.' => {
                        io.write_all(b"!").await.unwrap();
                        io.flush().await.unwrap();
                    }
                    Ok(_) => {}
                }
            }
        },
        |addr| async move {
            let mut io = c.client_io(addr, 0).await;
            ping(&mut io).await;
            let mut data = vec![0x5au8; WRITE_SIZE];
            let mut ack = [0u8; 1];
            pass(&mut io, &mut data, 64).await; // warm-up
            io.read_exact(&mut ack).await.unwrap();
            let n = bytes / WRITE_SIZE as u64;
            COUNTING.store(true, Ordering::SeqCst);
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            pass(&mut io, &mut data, n).await;
            io.read_exact(&mut ack).await.unwrap();
            let allocs = ALLOCATIONS.load(Ordering::SeqCst) - before;
            COUNTING.store(false, Ordering::SeqCst);
            io.shutdown().await.unwrap();
            (n, allocs)
        },
    );
    allocs as f64 / writes as f64
}

// ---------------------------------------------------------------------------
// Reporting.

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The median of `v` and its range.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    (median(&mut v.to_vec()), lo, hi)
}

/// Per contender and round: CPU time, rate and context switches per unit
/// of work, in contender order.
struct Table {
    title: String,
    /// The unit of the wall-clock rate, e.g. "bytes/s".
    unit: &'static str,
    /// The unit of CPU time per unit of work and its scale, e.g. ("ns/byte", 1e9).
    cpu_unit: (&'static str, f64),
    /// What context switches are counted per, and the scale, e.g. ("MiB", 2^20).
    per: (&'static str, f64),
    names: Vec<String>,
    /// Work per wall-clock second.
    rates: Vec<Vec<f64>>,
    /// CPU seconds (the whole process) per unit of work.
    cpu: Vec<Vec<f64>>,
    /// Voluntary context switches per unit of work.
    switches: Vec<Vec<f64>>,
}

/// A same-round comparison of two contenders: `cpu` = CPU per unit of `b`
/// / that of `a` (above 1: `a` needs less CPU), `wall` = rate of `a` /
/// rate of `b` (above 1: `a` is faster); each (median, min, max) over rounds.
struct Ratio {
    a: String,
    b: String,
    cpu: (f64, f64, f64),
    wall: (f64, f64, f64),
}

impl Table {
    fn new(
        title: impl Into<String>,
        unit: &'static str,
        cpu_unit: (&'static str, f64),
        per: (&'static str, f64),
        contenders: &[&Contender],
    ) -> Self {
        let n = contenders.len();
        Table {
            title: title.into(),
            unit,
            cpu_unit,
            per,
            names: contenders.iter().map(|c| c.name.clone()).collect(),
            rates: vec![Vec::new(); n],
            cpu: vec![Vec::new(); n],
            switches: vec![Vec::new(); n],
        }
    }

    /// Records contender `i`'s measurement of `work` units.
    fn add(&mut self, i: usize, work: f64, took: Took) {
        self.rates[i].push(work / took.secs);
        self.cpu[i].push(took.cpu / work);
        self.switches[i].push(took.switches / work);
    }

    /// The same-round ratios of `a` to `b`, if both ran.
    fn ratio(&self, a: &Contender, b: &Contender) -> Option<Ratio> {
        let find = |c: &Contender| self.names.iter().position(|n| *n == c.name);
        let (x, y) = (find(a)?, find(b)?);
        let paired = |v: &[Vec<f64>], p: usize, q: usize| {
            let r: Vec<f64> = v[p].iter().zip(&v[q]).map(|(p, q)| p / q).collect();
            spread(&r)
        };
        Some(Ratio {
            a: self.names[x].clone(),
            b: self.names[y].clone(),
            cpu: paired(&self.cpu, y, x),
            wall: paired(&self.rates, x, y),
        })
    }

    /// Prints CPU per unit of work (the primary figure), wall-clock rate and
    /// context switches (median, min, max over rounds), then the same-round
    /// ratios of each `(a, b)` in `ratios`.
    fn print(&self, ratios: &[(&Contender, &Contender)]) {
        let (cpu_unit, cpu_scale) = self.cpu_unit;
        let (per, per_scale) = self.per;
        println!("\n## {}", self.title);
        println!(
            "| contender | CPU {cpu_unit} (process) | min..max | {} | min..max | voluntary switches per {per} | rounds |",
            self.unit
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for i in 0..self.names.len() {
            let (c, clo, chi) = spread(&self.cpu[i]);
            let (r, rlo, rhi) = spread(&self.rates[i]);
            let (sw, _, _) = spread(&self.switches[i]);
            println!(
                "| {} | {:.3} | {:.3}..{:.3} | {} | {}..{} | {:.1} | {} |",
                self.names[i],
                c * cpu_scale,
                clo * cpu_scale,
                chi * cpu_scale,
                fmt_rate(r),
                fmt_rate(rlo),
                fmt_rate(rhi),
                sw * per_scale,
                self.rates[i].len()
            );
        }
        for (a, b) in ratios {
            if let Some(r) = self.ratio(a, b) {
                println!("{}", r.line());
            }
        }
    }
}

impl Ratio {
    fn line(&self) -> String {
        let (cm, clo, chi) = self.cpu;
        let (m, lo, hi) = self.wall;
        format!(
            "{} vs {}: CPU efficiency {cm:.2} x (same-round {clo:.2}..{chi:.2}); wall-clock rate {m:.2} x ({lo:.2}..{hi:.2})",
            self.a, self.b
        )
    }
}

/// The date and time (UTC), from `date`.
fn now_utc() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The 1, 5 and 15 minute load averages.
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The command that reproduces this run: the options and the settings'
/// environment variables.
fn command() -> String {
    let env: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CAPNP_NOISE_BENCH_"))
        .map(|(k, v)| format!("{k}={v} "))
        .collect();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let args = if args.is_empty() {
        String::new()
    } else {
        format!(" -- {}", args.join(" "))
    };
    format!("{}cargo bench --bench compare{args}", env.concat())
}

fn fmt_rate(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary too, without it, and then there is nothing to test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("compare: skipped (run it with `cargo bench --bench compare`)");
        return;
    }
    let s = Settings::from_args_and_env();
    println!("# cargo bench --bench compare");
    println!("date: {}", now_utc());
    println!("command: {}", command());
    println!("load average at the start: {}", load());
    print_machine();
    println!(
        "rounds: {}; interleaved: each round runs every contender once, in order",
        s.rounds,
    );
    println!(
        "CPU = user + system time of the process (getrusage), per unit of work. \
         \"A vs B\": CPU efficiency = B's CPU per unit / A's (above 1: A needs less CPU), \
         wall-clock rate = A's rate / B's; each the median of same-round ratios (range in brackets)"
    );
    // The lines of the closing summary.
    let mut summary: Vec<String> = Vec::new();
    let pki = pki();
    let tls_aes = tls(&pki, false, false);
    let tls_chacha = tls(&pki, true, false);
    let tls_mutual = tls(&pki, false, true);
    let noise_aes = noise(Suite::AesGcmSha256);
    let noise_chacha = noise(Suite::ChaChaPolyBlake2s);
    let plain = tcp();

    if s.wants("bulk") {
        s.pin_for("bulk");
        let contenders = s.keep([&plain, &tls_aes, &tls_chacha, &noise_aes, &noise_chacha]);
        let mut t = Table::new(
            format!(
                "Bulk throughput, loopback TCP, {} MiB per transfer in 64 KiB writes",
                s.bulk_bytes >> 20
            ),
            "bytes/s",
            ("ns/byte", 1e9),
            ("MiB", (1 << 20) as f64),
            &contenders,
        );
        let before = load();
        for round in 0..s.rounds {
            for (i, c) in contenders.iter().enumerate() {
                let took = bulk(c, s.bulk_bytes);
                t.add(i, s.bulk_bytes as f64, took);
            }
            eprintln!("bulk: round {} done", round + 1);
        }
        t.print(&[
            (&noise_aes, &tls_aes),
            (&noise_chacha, &tls_chacha),
            (&plain, &tls_aes),
            (&plain, &noise_aes),
            (&plain, &tls_chacha),
            (&plain, &noise_chacha),
        ]);
        println!("load average: {before} before, {} after", load());
        summary.push(format!(
            "bulk ({} MiB, {} rounds, load {before} before, {} after):",
            s.bulk_bytes >> 20,
            s.rounds,
            load()
        ));
        for (a, b) in [(&noise_aes, &tls_aes), (&noise_chacha, &tls_chacha)] {
            if let Some(r) = t.ratio(a, b) {
                summary.push(format!(
                    "  {}: target CPU efficiency >= 1.2: {}",
                    r.line(),
                    if r.cpu.0 >= 1.2 { "met" } else { "NOT met" }
                ));
            }
        }
        if let Some(p) = t.names.iter().position(|n| *n == plain.name) {
            let cpu: Vec<f64> = t.cpu.iter().map(|v| spread(v).0).collect();
            let rate: Vec<f64> = t.rates.iter().map(|v| spread(v).0).collect();
            let least_cpu = cpu.iter().all(|&c| c >= cpu[p]);
            let fastest = rate.iter().all(|&r| r <= rate[p]);
            summary.push(format!(
                "  plain TCP is the ceiling: least CPU per byte {}, fastest in wall clock {}",
                if least_cpu { "yes" } else { "NO" },
                if fastest { "yes" } else { "NO" }
            ));
        }
    }

    if s.wants("handshake") {
        s.pin_for("handshake");
        let mut noise_cold = noise(Suite::AesGcmSha256);
        noise_cold.name = "capnp-noise AESGCM, new vats every connection".into();
        let fresh = Arc::new(Mutex::new(Vec::new()));
        if let Transport::Noise { fresh: f, .. } = &mut noise_cold.transport {
            *f = Some(fresh.clone());
        }
        let mut noise_unadmitted = noise(Suite::AesGcmSha256);
        noise_unadmitted.name = "capnp-noise AESGCM, no handshake slots".into();
        if let Transport::Noise { admission, .. } = &mut noise_unadmitted.transport {
            *admission = false;
        }
        let contenders = s.keep([
            &tls_aes,
            &tls_mutual,
            &noise_aes,
            &noise_unadmitted,
            &noise_chacha,
            &noise_cold,
        ]);
        let mut t = Table::new(
            format!(
                "Full handshakes over loopback TCP, one connection at a time, {} per measurement",
                s.handshakes
            ),
            "handshakes/s",
            ("us/handshake", 1e6),
            ("handshake", 1.0),
            &contenders,
        );
        let before = load();
        for round in 0..s.rounds {
            // Fresh vats for the cold contender, made before the clock starts.
            *fresh.lock().unwrap() = (0..s.handshakes)
                .map(|_| (Identity::generate(), Identity::generate()))
                .collect();
            for (i, c) in contenders.iter().enumerate() {
                let took = handshakes(c, s.handshakes);
                t.add(i, s.handshakes as f64, took);
            }
            eprintln!("handshake: round {} done", round + 1);
        }
        t.print(&[
            (&noise_aes, &tls_aes),
            (&noise_chacha, &tls_aes),
            (&noise_cold, &tls_aes),
            (&noise_aes, &tls_mutual),
            (&noise_cold, &tls_mutual),
            (&noise_aes, &noise_unadmitted),
        ]);
        println!("load average: {before} before, {} after", load());
        if let Some(r) = t.ratio(&noise_aes, &tls_aes) {
            summary.push(format!(
                "handshakes ({} rounds, load {before} before, {} after): {}: target wall-clock >= 1.2 x: {}",
                s.rounds,
                load(),
                r.line(),
                if r.wall.0 >= 1.2 { "met" } else { "NOT met" }
            ));
        }
    }

    if s.wants("rpc") {
        s.pin_for("rpc");
        let contenders = s.keep([&plain, &tls_aes, &noise_aes, &noise_chacha]);
        let workloads = [
            (
                Rpc::Sequential,
                s.rpc_seq,
                "sequential calls (16-byte echo)",
                "calls/s",
            ),
            (
                Rpc::Pipelined,
                s.rpc_pipelined,
                "64 calls in flight (16-byte echo)",
                "calls/s",
            ),
            (
                Rpc::Large,
                s.rpc_large,
                "64 KiB echo, 64 calls in flight (payload bytes/s each way)",
                "bytes/s",
            ),
        ];
        let mut tables: Vec<Table> = workloads
            .iter()
            .map(|(w, n, what, unit)| {
                let (cpu_unit, per) = if *w == Rpc::Large {
                    (("ns/byte", 1e9), ("MiB", (1 << 20) as f64))
                } else {
                    (("us/call", 1e6), ("call", 1.0))
                };
                Table::new(
                    format!("Cap'n Proto RPC, {what}, {n} calls per measurement"),
                    unit,
                    cpu_unit,
                    per,
                    &contenders,
                )
            })
            .collect();
        let before = load();
        for round in 0..s.rounds {
            for ((w, n, _, _), table) in workloads.iter().zip(&mut tables) {
                for (i, c) in contenders.iter().enumerate() {
                    let took = rpc_calls(c, *w, *n);
                    let per_call = if *w == Rpc::Large { LARGE as f64 } else { 1.0 };
                    table.add(i, *n as f64 * per_call, took);
                }
            }
            eprintln!("rpc: round {} done", round + 1);
        }
        for t in &tables {
            t.print(&[
                (&noise_aes, &plain),
                (&noise_chacha, &plain),
                (&tls_aes, &plain),
            ]);
        }
        println!("load average: {before} before, {} after", load());
        summary.push(format!(
            "RPC ({} rounds, load {before} before, {} after), against capnp-rpc over plain TCP:",
            s.rounds,
            load()
        ));
        for (t, ((_, _, what, _), target)) in
            tables.iter().zip(workloads.iter().zip([0.95, 0.9, 0.8]))
        {
            for c in [&noise_aes, &noise_chacha] {
                if let Some(r) = t.ratio(c, &plain) {
                    summary.push(format!(
                        "  {what}: {}: target wall-clock >= {target}: {}",
                        r.line(),
                        if r.wall.0 >= target { "met" } else { "NOT met" }
                    ));
                }
            }
        }
    }

    if s.wants("memory") {
        s.pin_for("memory");
        let n = s.connections;
        println!(
            "\n## Memory per idle connection end ({n} connections; a read pending on every end)"
        );
        println!("| contender | after | Rust heap per end | more than plain TCP | all malloc'd (C too) per end | more than plain TCP |");
        println!("|---|---|---:|---:|---:|---:|");
        for (burst, after) in [
            (false, "one small message each way"),
            (true, "that, then 256 KiB each way"),
        ] {
            let (base, base_c) = idle_memory(&plain, n, burst);
            println!(
                "| {} | {after} | {base:.0} B | - | {base_c:.0} B | - |",
                plain.name,
            );
            for c in s.keep([&tls_aes, &noise_aes, &noise_chacha]) {
                let (m, all) = idle_memory(c, n, burst);
                println!(
                    "| {} | {after} | {m:.0} B | {:.1} KiB | {all:.0} B | {:.1} KiB |",
                    c.name,
                    (m - base) / 1024.0,
                    (all - base_c) / 1024.0
                );
            }
        }
        let bytes = s.bulk_bytes.min(256 << 20);
        println!(
            "\n## Heap allocations per 64 KiB write in a bulk transfer (both ends, after warm-up, {} MiB)",
            bytes >> 20
        );
        for c in s.keep([&plain, &tls_aes, &noise_aes, &noise_chacha]) {
            println!("{}: {:.3}", c.name, allocations_per_write(c, bytes));
        }
    }
    println!("\n## Summary (paste this)");
    println!("{}, {}", now_utc(), command());
    println!("load average at the end: {}", load());
    for line in &summary {
        println!("{line}");
    }
}
