//! `capnp-noise tunnel`: a key-pinned replacement for stunnel in front of
//! any TCP service.
//!
//! A tunnel process runs one or more named **services**. Each is one end of
//! a tunnel:
//!
//! * a **client** service listens for plain TCP (usually on 127.0.0.1) and
//!   carries each connection over its own capnp-noise connection to a
//!   server service, which must prove the pinned VatId (`peer`) or the one
//!   recorded for its address on first use (`known_vats`). A refused server
//!   never learns the client's VatId (it is only sent in handshake message
//!   3, after the check).
//! * a **server** service listens for capnp-noise, accepts only the vats of
//!   its allow-list file (`allow`, reloaded when it changes) and/or of
//!   `allow_vat`, and forwards each connection to the plain TCP `connect`
//!   address, only after the peer has authenticated.
//!
//! Applications keep speaking plain TCP (Cap'n Proto two-party RPC, or
//! anything else) to the client service's address; the server service
//! forwards to their unchanged server. A native capnp-noise RPC server
//! ([`capnp_noise::rpc::serve`]) speaks the same protocol as a server service, so
//! a client service can reach it directly.
//!
//! # Configuration file
//!
//! TOML, in the spirit of `stunnel.conf`: global settings, then one table
//! per service. Unknown keys are errors. Relative paths are relative to the
//! file's directory; durations are in seconds. The limits given at the top
//! are the defaults of every service, and each service may override them.
//! An error names the file, the line and column, the key and the problem
//! (`tunnel.toml: line 6, column 8: service.db.peer: this is not a VatId
//! ...`), and never quotes a value: a private key pasted into the wrong
//! place does not end up in a log ([`config::ConfigError`]).
//!
//! ```toml
//! identity = "tunnel.key"      # required: `capnp-noise keygen tunnel.key`
//! shutdown_grace = 30          # seconds open connections get after SIGTERM
//! log_format = "text"          # or "json": one object per line, with a timestamp
//! # metrics = "127.0.0.1:9100" # /metrics (Prometheus) and /status over HTTP
//! # workers = 4                # threads that run connections (default: one per core;
//! #                            # 0: one multi-threaded runtime, see Threads below)
//! max_connections = 1024       # per service, handshaking or forwarding
//! max_handshakes = 64          # per service, handshakes at once
//! max_handshakes_per_source = 16  # of those, from one address
//! max_unauthenticated_per_source = 64  # server: not yet authenticated, from one address
//! handshake_timeout = 10       # seconds
//! connect_timeout = 10         # seconds, for each outgoing TCP connect
//! keepalive = 0                # seconds between keepalives when idle (0: none)
//! idle_timeout = 0             # close after this long without data (0: never)
//!
//! [service.postgres]           # expose a local service to allowed vats
//! mode = "server"
//! listen = "0.0.0.0:5433"
//! connect = "127.0.0.1:5432"
//! allow = "postgres.allow"     # one VatId per line, reloaded on change
//! allow_vat = ["vat1..."]      # and/or inline (either one is enough)
//! # proxy_protocol = "v2"      # if the target reads a PROXY header (see below)
//! # resumption = true          # answer clients that resume (Noise IK, see below)
//!
//! [service.calendar]           # reach a remote service through a local port
//! mode = "client"
//! listen = "127.0.0.1:4000"    # or a Unix socket: "unix:/run/calendar.sock"
//! # listen_mode = 0o660        # its permissions (default 0o600)
//! connect = "calendar.example.com:4443"
//! peer = "vat1..."             # or a list (old and new key during a rotation),
//!                              # or: known_vats = "known_vats" (trust on first use)
//! suite = "auto"               # or "chachapoly" / "aesgcm": only that suite
//!                              # (auto retries once with chachapoly after a silent close)
//! # via = "http://proxy.office:3128"  # or socks5://...: reach the server through a proxy
//! # resumption = true          # later connections resume (IK) with the pinned server
//! # early_data = true          # REPLAYABLE: the first bytes ride in IK message 1 (see below)
//! max_connections = 50
//! keepalive = 25               # the office NAT forgets idle flows after a minute
//! ```
//!
//! The command line (`capnp-noise tunnel client|server ...`) describes one
//! service with the same settings as options; both end up in one
//! [`TunnelConfig`] (see [`config`]).
//!
//! # Connections
//!
//! Every connection is its own task and ends on its own:
//!
//! * **Limits.** At most `max_connections` connections per service are
//!   open (further ones wait in the listen backlog), and at most
//!   `max_handshakes` are handshaking past message 1 (at most
//!   `max_handshakes_per_source` from one address), each for at most
//!   `handshake_timeout`, and a handshake that fails keeps its slot one
//!   second more (the failure hold): unauthenticated peers can hold no
//!   more than that, and cause no Diffie-Hellman work beyond it, however
//!   fast they connect and hang up ([`capnp_noise::admission`]).
//!   Outgoing TCP connects take at most `connect_timeout`.
//! * **Threads.** One thread accepts (and serves the metrics and the
//!   signals); each accepted connection goes to the least loaded of
//!   `workers` threads (default: one per core), each a single-threaded
//!   tokio runtime ([`capnp_noise::workers::Workers`], the pool of
//!   [`capnp_noise::rpc::Server`]), and stays there from handshake to end,
//!   so its socket's readiness wakes that one thread. The limits, counters
//!   and settings above are shared by every worker. `workers = 0` runs
//!   every connection on one multi-threaded (work-stealing) runtime
//!   instead, where a connection's task may move between threads: on a
//!   2-core machine that made 1.2 to 2.9 times the context switches per
//!   MiB of bulk and 1.18 times the system calls, for the same bulk
//!   throughput, round trip and connection setup (a new connection through
//!   per-core workers costs two more system calls: its socket moves to
//!   its worker; BENCHMARKS.md, "Tunnel").
//! * **Forwarding** ([`forward`]) copies both directions at once through
//!   one 256 KiB buffer each (backpressure, no unbounded queue), flushes
//!   whenever input pauses, and propagates half-close: when one side's
//!   read ends, the other side's write is shut down (over capnp-noise, an
//!   authenticated CLOSE) while the other direction continues.
//! * **Memory** is bounded per connection: the two forwarding buffers
//!   ([`forward::BUFFER_SIZE`] each, 256 KiB; a thread keeps up to eight
//!   zeroed ones of ended connections for the next) and the capnp-noise session's
//!   buffers (at most about 600 KiB when busy both ways, see
//!   [`NoiseStream`](capnp_noise::stream::NoiseStream)), so
//!   `max_connections` bounds a service's memory. Measured: about 0.9 MiB
//!   resident per connection busy both ways, per tunnel end (so up to
//!   about 1 GiB at the default 1024 connections, all busy); idle ones
//!   shrink to a few KiB. The buffers are four frames' worth
//!   (`capnp_noise::wire::BULK_FRAMES`): two would halve the memory of a
//!   busy connection (0.8 instead of 1.8 MiB for both ends) and make 43 %
//!   more system calls per MiB of bulk (BENCHMARKS.md, "Tunnel").
//! * **Keepalive and idle timeout.** With `keepalive = N`, a service sends
//!   an authenticated empty frame (SPEC 7.1; the other end reads nothing)
//!   in each interval of N seconds in which it sent nothing else over
//!   capnp-noise, so NATs and load balancers that drop idle flows keep a
//!   long-lived, quiet Cap'n Proto connection. With `idle_timeout = N`, a
//!   connection over which no data went either way for N seconds
//!   (keepalives do not count) is ended like a failure (below), at most a
//!   quarter of N late, and logged with `end="idle: ..."`. Both are off by
//!   default; the per-frame cost is a flag and a counter.
//! * **Unix domain sockets.** A client service may listen on, and a
//!   server service connect to, a Unix socket (`unix:/PATH`; the
//!   capnp-noise side is TCP). The listening socket is created with mode
//!   `listen_mode` (0o600 by default: the tunnel's user only), already set
//!   when it appears under its name, so that other users of a shared
//!   machine cannot use the client's identity the way anyone can through
//!   127.0.0.1. A stale socket file is replaced; the file is removed at
//!   shutdown.
//! * **Resumption and early data** (SPEC.md 14). `resumption = true`
//!   (`--resumption`) on a client keeps, in memory, the pinned server it
//!   completed a handshake with and opens later connections with Noise
//!   `IK`; on a server it answers `IK` (otherwise a resuming client gets the
//!   `XX` fallback and forgets its record). On its own it saves no round
//!   trip. `early_data = true` (`--early-data`, both ends, only with
//!   `resumption`) sends what the plain client sends first (what comes
//!   within 50 ms, then until 5 ms pass without more, 100 ms and 3862
//!   bytes at most) inside `IK` message 1, and the server passes it to
//!   its target at once: the first answer comes a round trip sooner.
//!   **That first flight can be replayed** by anyone who recorded it: the
//!   server's target then receives those first bytes again, once per
//!   replay, and they are not forward secret. Turn it on only for a
//!   protocol whose first request is safe to run twice; it is off by
//!   default, an operator's explicit choice.
//! * **The caller's VatId to the backend.** With `proxy_protocol = "v2"`
//!   a server service sends its target a PROXY protocol version 2 header
//!   before the data: the client tunnel's address, and its authenticated
//!   VatId in TLV 0xE0 ([`proxy`]); `"v1"` sends the text header with the
//!   address only. For backends that read it (HAProxy, nginx, Go's and
//!   Python's PROXY libraries); off by default.
//! * **Egress through a proxy.** A client service with `via =
//!   "http://HOST:PORT"` reaches its server through an HTTP proxy (CONNECT),
//!   with `"socks5://HOST:PORT"` through a SOCKS5 one ([`egress`]; no proxy
//!   authentication). The server is still authenticated by the handshake;
//!   a proxy's refusal (a 403, say) resets the local connection and is
//!   logged with the proxy's answer.
//! * **Failures are not disguised as clean ends.** When one side fails
//!   (a TCP reset, a capnp-noise stream cut without its authenticated
//!   CLOSE), the plain TCP side is reset rather than closed, and the
//!   capnp-noise side is dropped without CLOSE, so the remote tunnel resets
//!   its plain side in turn. The same happens when the server or the target
//!   cannot be reached, or the server is refused.
//!
//! # Logs
//!
//! `tracing`, at `info` for connections and `warn` for refusals and
//! unreachable addresses; every line names the service. As text without
//! time by default (the service manager adds it), or with `log_format =
//! "json"` (`--log-format json`) one JSON object per line with an RFC 3339
//! `timestamp`, the level, the message and the fields. Each connection
//! ends with one line: `connection ended service=NAME peer=FINGERPRINT
//! addr=ADDR to_peer=BYTES from_peer=BYTES duration=SECONDS end=...`,
//! where `to_peer`/`from_peer` count plaintext bytes sent to and received
//! from the remote tunnel end, and `end` is `closed` (both directions
//! ended cleanly), `aborted` (cut at shutdown), `"idle: ..."` (the idle
//! timeout) or an error naming the side and the operation that failed.
//!
//! # Metrics and status
//!
//! With `metrics = "127.0.0.1:9100"` (`--metrics`), the tunnel serves a
//! local HTTP endpoint (no authentication: keep it on a loopback address):
//! `/metrics` in the Prometheus text format, per service: connections open
//! (`capnp_noise_tunnel_connections_open`), accepted and forwarded
//! (`..._connections_accepted_total`, `..._connections_total`), plaintext
//! bytes each way (`..._bytes_total{direction="to_peer"|"from_peer"}`,
//! added when a connection ends), handshakes failed by reason
//! (`..._handshakes_failed_total{reason="no_slot"|"timeout"|"closed"|"invalid"|"other"}`),
//! peers refused by the policy (`..._refused_total`), unreachable connect
//! addresses (`..._unreachable_total`), handshakes that waited for a slot
//! (`..._admission_waits_total`) and idle timeouts
//! (`..._idle_timeouts_total`); and `/status`: 200, or 503 when a
//! service's `connect` address does not accept a connection within 2 s
//! (a client service's server sees that probe as a handshake that ended at
//! once). Counters are atomics touched when connections start and end,
//! never per frame.
//!
//! # systemd
//!
//! Under `Type=notify` the CLI tells systemd `READY=1` once every service
//! listens, `STOPPING=1` when a shutdown begins, and `WATCHDOG=1` at half
//! of `WatchdogSec=` (`WATCHDOG_USEC`). `listen = "systemd:NAME"` takes the
//! listening socket systemd passes under that name (socket activation,
//! `FileDescriptorName=` in the `.socket` unit), TCP or Unix, which also
//! serves port 443 without root. `contrib/systemd/capnp-noise-tunnel@.service`
//! is a hardened unit (`systemd-analyze security` rates it 1.1, "OK").
//!
//! # Packaging and Windows
//!
//! The `.deb` (`cargo deb -p capnp-noise-tunnel`, see the README) installs
//! the binary, manual pages and bash, zsh and fish completions (written by
//! the binary itself from its clap definition, `capnp-noise package-files
//! DIR`, a hidden subcommand), the unit above and an example configuration.
//!
//! The crate and the binary build for Windows (`x86_64-pc-windows-gnu`,
//! cross-compiled with mingw-w64). There, `unix:` and `systemd:` addresses
//! are refused by [`TunnelSpec::check`] (the error names the key), the CLI
//! stops on Ctrl-C, Ctrl-Break, a closed console or a system shutdown
//! (Windows ends the process a few seconds after the last two, whatever the
//! grace period), there is no reload (no SIGHUP: restart instead), and key
//! files are not checked for permissions (see [`capnp_noise::keyfile`]).
//!
//! # Reload (SIGHUP)
//!
//! [`ReloadHandle::reload`] (the CLI calls it on SIGHUP, after reading the
//! configuration, the identity key and the allow-lists again) gives each
//! service's new connections the new identity, trust and per-connection
//! settings; open connections go on undisturbed with theirs. If reading
//! fails (a malformed key, say), the running settings stay and the log says
//! why. Listen addresses, added or removed services and connection limits
//! need a restart (the log lists what was not applied). A key rotation
//! without a flag day: clients pin both keys (`peer = ["vat1old...",
//! "vat1new..."]`), the server's key file is replaced and SIGHUP sent, then
//! clients drop the old key.
//!
//! # Shutdown
//!
//! [`ShutdownHandle::shutdown`] (the CLI calls it on SIGINT or SIGTERM)
//! stops accepting (the listening sockets are closed), lets open
//! connections finish for up to the grace period, then aborts those left;
//! [`ShutdownHandle::abort`] (a second signal) aborts them at once.
//!
//! # Embedding
//!
//! The CLI is a thin layer over this crate:
//!
//! ```no_run
//! use std::path::Path;
//! use capnp_noise_tunnel::{Tunnel, TunnelConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = TunnelConfig::load(Path::new("tunnel.toml"))?; // or TunnelSpec::check
//! let tunnel = Tunnel::new(config)?; // loads the key and the allow-lists
//! println!("my VatId: {}", tunnel.vat_id());
//! let bound = tunnel.bind().await?; // opens every listening socket
//! for l in bound.listening() {
//!     println!("{} listens on {}", l.name, l.addr);
//! }
//! let stop = bound.shutdown_handle();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     stop.shutdown();
//! });
//! let stopped = bound.run().await;
//! println!("{} connection(s) aborted at shutdown", stopped.aborted);
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod config;
pub mod decode;
pub mod egress;
pub mod forward;
mod metrics;
pub mod proxy;
mod service;
mod socket;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::{ConfigError, LimitsConfig, Mode, ServiceConfig, Trust, TunnelConfig, TunnelSpec};

use capnp_noise::identity::Identity;
use capnp_noise::policy::{AllowList, PeerPolicy, Pinned, Tofu};
use capnp_noise::vat_id::VatId;
use capnp_noise::workers::Workers;
use service::{Live, Service};
#[cfg(unix)]
pub use socket::take_systemd_sockets;
pub use socket::Bound;
use socket::Listener;

/// How long aborted connections get to log their end.
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// A tunnel whose identity and trust files are loaded, ready to
/// [`bind`](Self::bind).
pub struct Tunnel {
    identity: Arc<Identity>,
    shutdown_grace: Duration,
    metrics: Option<String>,
    workers: usize,
    services: Vec<(ServiceConfig, Arc<dyn PeerPolicy>)>,
}

impl Tunnel {
    /// Loads the identity key and the allow-list files of `config`.
    ///
    /// # Errors
    /// [`StartError::Identity`] or [`StartError::TrustFile`] when the key or
    /// an allow-list file is missing, unreadable or malformed.
    pub fn new(config: TunnelConfig) -> Result<Self, StartError> {
        let identity = Arc::new(Identity::load(&config.identity).map_err(StartError::Identity)?);
        let services = config
            .services
            .into_iter()
            .map(|svc| match policy(&svc.trust) {
                Ok(policy) => Ok((svc, policy)),
                Err(error) => Err(StartError::TrustFile {
                    service: svc.name,
                    error,
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tunnel {
            identity,
            shutdown_grace: config.shutdown_grace,
            metrics: config.metrics,
            workers: config.workers,
            services,
        })
    }

    /// Makes every service's handshakes write their secrets to `key_log`
    /// (research and debugging only: see `capnp_noise::keylog`). The
    /// `capnp-noise` command calls it when `CAPNP_NOISE_KEYLOG` is set.
    #[must_use]
    pub fn with_key_log(mut self, key_log: Option<Arc<dyn capnp_noise::keylog::KeyLog>>) -> Self {
        for (svc, _) in &mut self.services {
            svc.key_log = key_log.clone();
        }
        self
    }

    /// This tunnel's VatId: what the other ends pin or allow.
    pub fn vat_id(&self) -> VatId {
        self.identity.vat_id()
    }

    /// How many worker threads [`bind`](Self::bind) starts for the
    /// connections ([`TunnelConfig::workers`]); 0: none, connections run on
    /// the runtime that runs the tunnel, which should then be
    /// multi-threaded.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Opens every service's listening socket, and starts the worker
    /// threads ([`workers`](Self::workers)).
    ///
    /// # Errors
    /// [`StartError::Listen`] naming the service and the address when one
    /// cannot be bound (in use, not a local address, a privileged port, a
    /// host name that does not resolve); no socket stays open then.
    /// [`StartError::Workers`] when a worker thread cannot be started.
    pub async fn bind(mut self) -> Result<BoundTunnel, StartError> {
        let mut listeners = Vec::with_capacity(self.services.len());
        for (svc, _) in &self.services {
            let listen_error = |error| StartError::Listen {
                service: svc.name.clone(),
                addr: svc.listen.clone(),
                error,
            };
            let listener = Listener::bind(&svc.listen, svc.listen_mode)
                .await
                .map_err(listen_error)?;
            let addr = listener.bound().map_err(listen_error)?;
            listeners.push((listener, addr));
        }
        let metrics = match &self.metrics {
            None => None,
            Some(addr) => {
                let listen_error = |error| StartError::Listen {
                    service: "metrics".into(),
                    addr: addr.clone(),
                    error,
                };
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(listen_error)?;
                let bound = listener.local_addr().map_err(listen_error)?;
                Some((listener, bound))
            }
        };
        let services = self
            .services
            .drain(..)
            .map(|(config, policy)| {
                Arc::new(Service::new(Live {
                    config,
                    identity: self.identity.clone(),
                    policy,
                }))
            })
            .collect();
        let workers = match self.workers {
            0 => None,
            n => Some(Arc::new(
                Workers::start(n, "tunnel").map_err(StartError::Workers)?,
            )),
        };
        Ok(BoundTunnel {
            tunnel: self,
            services,
            listeners,
            metrics,
            workers,
            shutdown: ShutdownHandle::default(),
        })
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("vat_id", &self.vat_id())
            .field("shutdown_grace", &self.shutdown_grace)
            .field(
                "services",
                &self.services.iter().map(|(s, _)| s).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn policy(trust: &Trust) -> capnp_noise::Result<Arc<dyn PeerPolicy>> {
    Ok(match trust {
        Trust::PinnedServer(vats) => match vats[..] {
            [vat] => Arc::new(Pinned(vat)),
            _ => Arc::new(AllowList::from_vat_ids(vats.iter().copied())),
        },
        Trust::KnownVats(file) => Arc::new(Tofu::new(file)),
        Trust::AllowedClients { file, vat_ids } => {
            let fixed = AllowList::from_vat_ids(vat_ids.iter().copied());
            match file {
                None => Arc::new(fixed),
                Some(path) => {
                    let listed = AllowList::load(path)?;
                    Arc::new(move |vat: &VatId, ctx: &capnp_noise::PeerContext| {
                        fixed.check(vat, ctx).or_else(|_| listed.check(vat, ctx))
                    })
                }
            }
        }
    })
}

/// Why a tunnel could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The settings are invalid.
    Config(ConfigError),
    /// The identity key file is missing, unreadable or malformed.
    Identity(capnp_noise::Error),
    /// A service's allow-list file is missing, unreadable or malformed.
    TrustFile {
        /// The service.
        service: String,
        /// What went wrong (it names the file).
        error: capnp_noise::Error,
    },
    /// A service cannot listen on its address.
    Listen {
        /// The service.
        service: String,
        /// The address, as configured.
        addr: String,
        /// What went wrong.
        error: std::io::Error,
    },
    /// A worker thread (or its runtime) could not be started.
    Workers(std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Identity(e) => e.fmt(f),
            StartError::TrustFile { service, error } => write!(f, "service {service}: {error}"),
            StartError::Workers(e) => write!(f, "cannot start the worker threads: {e}"),
            StartError::Listen {
                service,
                addr,
                error,
            } => {
                let hint = match error.kind() {
                    std::io::ErrorKind::AddrInUse => {
                        " (another process is listening there: stop it or choose another port)"
                    }
                    std::io::ErrorKind::AddrNotAvailable => " (not an address of this machine)",
                    std::io::ErrorKind::PermissionDenied => " (ports below 1024 need privileges)",
                    _ => "",
                };
                write!(
                    f,
                    "service {service}: cannot listen on {addr}: {error}{hint}"
                )
            }
        }
    }
}

/// The inner errors are part of the message, so `source` is `None`.
impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// A service's listening socket, for startup messages.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Listening {
    /// The service's name.
    pub name: String,
    /// Client or server.
    pub mode: Mode,
    /// The bound address (with the actual port when the configuration said
    /// 0), or the Unix socket's path.
    pub addr: Bound,
    /// Where it connects to.
    pub connect: String,
}

/// A tunnel with its sockets bound, ready to [`run`](Self::run).
#[derive(Debug)]
pub struct BoundTunnel {
    tunnel: Tunnel,
    services: Vec<Arc<Service>>,
    listeners: Vec<(Listener, Bound)>,
    metrics: Option<(tokio::net::TcpListener, std::net::SocketAddr)>,
    workers: Option<Arc<Workers>>,
    shutdown: ShutdownHandle,
}

/// Stops a running tunnel. Cloneable; any clone works.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle {
    graceful: CancellationToken,
    abort: CancellationToken,
}

impl ShutdownHandle {
    /// Stops accepting connections and lets open ones finish within the
    /// grace period.
    pub fn shutdown(&self) {
        self.graceful.cancel();
    }

    /// Stops accepting connections and aborts open ones now.
    pub fn abort(&self) {
        self.graceful.cancel();
        self.abort.cancel();
    }
}

/// Applies new settings to a running tunnel (the CLI calls it on SIGHUP).
/// Cloneable; any clone works.
#[derive(Clone)]
pub struct ReloadHandle {
    services: Vec<Arc<Service>>,
}

impl std::fmt::Debug for ReloadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadHandle")
            .field("services", &self.services.len())
            .finish()
    }
}

/// What a [`ReloadHandle::reload`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Reloaded {
    /// The identity new connections prove.
    pub vat_id: VatId,
    /// The services whose new connections take the new settings.
    pub applied: Vec<String>,
    /// What was not applied and why (it needs a restart).
    pub not_applied: Vec<String>,
}

impl ReloadHandle {
    /// Gives the new connections of each running service `tunnel`'s
    /// identity, trust (pinned VatIds, allow-lists, known-vats file) and
    /// per-connection settings (connect address, timeouts, keepalive, idle
    /// timeout, PROXY protocol, suite); open connections keep theirs and go
    /// on undisturbed. Services are matched by name. What needs new sockets
    /// or semaphores is not applied and is listed in
    /// [`Reloaded::not_applied`]: a service added, removed or of another
    /// mode, a new listen address or mode, and new connection or handshake
    /// limits.
    pub fn reload(&self, mut tunnel: Tunnel) -> Reloaded {
        let mut done = Reloaded {
            vat_id: tunnel.vat_id(),
            applied: Vec::new(),
            not_applied: Vec::new(),
        };
        for service in &self.services {
            let old = service.config();
            let Some(at) = tunnel.services.iter().position(|(c, _)| c.name == old.name) else {
                done.not_applied.push(format!(
                    "service {}: no longer configured (it keeps running until a restart)",
                    old.name
                ));
                continue;
            };
            let (config, policy) = tunnel.services.remove(at);
            if config.mode() != old.mode() {
                done.not_applied.push(format!(
                    "service {}: changed mode (a restart applies it)",
                    old.name
                ));
                continue;
            }
            let (a, b) = (&config.limits, &old.limits);
            if config.listen != old.listen
                || config.listen_mode != old.listen_mode
                || (
                    a.max_connections,
                    a.max_handshakes,
                    a.max_handshakes_per_source,
                    a.max_unauthenticated_per_source,
                ) != (
                    b.max_connections,
                    b.max_handshakes,
                    b.max_handshakes_per_source,
                    b.max_unauthenticated_per_source,
                )
            {
                done.not_applied.push(format!(
                    "service {}: listen, listen_mode, max_connections, max_handshakes, \
                     max_handshakes_per_source and max_unauthenticated_per_source take \
                     effect at a restart",
                    old.name
                ));
            }
            done.applied.push(config.name.clone());
            service.reload(Live {
                config,
                identity: tunnel.identity.clone(),
                policy,
            });
        }
        for (config, _) in tunnel.services {
            done.not_applied.push(format!(
                "service {}: new (a restart starts it)",
                config.name
            ));
        }
        done
    }
}

/// How a tunnel stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stopped {
    /// Connections open when the shutdown began.
    pub open: usize,
    /// Of those, the ones aborted because they outlasted the grace period
    /// (or the shutdown was an abort).
    pub aborted: usize,
}

impl BoundTunnel {
    /// This tunnel's VatId (as it started: a reload may change it).
    pub fn vat_id(&self) -> VatId {
        self.tunnel.vat_id()
    }

    /// The services and their bound addresses, in configuration order.
    pub fn listening(&self) -> Vec<Listening> {
        self.services
            .iter()
            .zip(&self.listeners)
            .map(|(svc, (_, addr))| Listening {
                name: svc.name().to_string(),
                mode: svc.config().mode(),
                addr: addr.clone(),
                connect: svc.config().connect.clone(),
            })
            .collect()
    }

    /// A handle that reloads the running tunnel's settings.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            services: self.services.clone(),
        }
    }

    /// Where the metrics and status endpoint listens, if configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|(_, addr)| *addr)
    }

    /// A handle that stops [`run`](Self::run).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves every service until the [`ShutdownHandle`] says stop, then
    /// shuts down as described in the [module docs](self).
    pub async fn run(self) -> Stopped {
        let BoundTunnel {
            tunnel,
            services,
            listeners,
            metrics,
            workers,
            shutdown,
        } = self;
        let connections = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        let cut = CancellationToken::new();
        let mut accept_loops = Vec::with_capacity(listeners.len());
        let mut shown = Vec::with_capacity(listeners.len());
        for (service, (listener, addr)) in services.into_iter().zip(listeners) {
            info!(service = %service.name(), %addr, "listening");
            shown.push(service.shown());
            accept_loops.push(tokio::spawn(service.accept_loop(
                listener,
                workers.clone(),
                connections.clone(),
                stop_accepting.clone(),
                cut.clone(),
            )));
        }

        if let Some((listener, addr)) = metrics {
            metrics::announce(addr);
            tokio::spawn(metrics::serve(listener, shown, stop_accepting.clone()));
        }

        shutdown.graceful.cancelled().await;
        stop_accepting.cancel();
        for accept_loop in accept_loops {
            // Returns once its listener is closed.
            let _ = accept_loop.await;
        }
        connections.close();
        let open = connections.len();
        let grace = tunnel.shutdown_grace;
        if open > 0 && !shutdown.abort.is_cancelled() {
            info!("shutting down: no longer accepting; waiting up to {grace:?} for {open} open connection(s)");
        } else {
            info!("shutting down: no longer accepting");
        }
        let finished = tokio::select! {
            () = connections.wait() => true,
            () = tokio::time::sleep(grace) => false,
            () = shutdown.abort.cancelled() => false,
        };
        let mut aborted = 0;
        if !finished {
            aborted = connections.len();
            warn!("aborting {aborted} connection(s) still open");
            cut.cancel();
            let _ = tokio::time::timeout(ABORT_WAIT, connections.wait()).await;
        }
        if let Some(workers) = workers {
            // Their connections have ended (or were cut): the threads end.
            workers.close();
            let join = tokio::task::spawn_blocking(move || workers.join());
            let _ = tokio::time::timeout(ABORT_WAIT, join).await;
        }
        info!(open, aborted, "stopped");
        Stopped { open, aborted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnp_noise::PeerContext;

    #[test]
    fn a_server_allows_the_listed_and_the_inline_vats_and_nobody_else() {
        let (listed, inline, stranger) = (
            Identity::from_seed(&[1; 32]).vat_id(),
            Identity::from_seed(&[2; 32]).vat_id(),
            Identity::from_seed(&[3; 32]).vat_id(),
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), format!("{listed}\n")).unwrap();
        let both = policy(&Trust::AllowedClients {
            file: Some(file.path().to_path_buf()),
            vat_ids: vec![inline],
        })
        .unwrap();
        let ctx = PeerContext::responder(None);
        assert!(both.check(&listed, &ctx).is_ok());
        assert!(both.check(&inline, &ctx).is_ok());
        let refusal = both.check(&stranger, &ctx).unwrap_err().to_string();
        assert!(refusal.contains(&stranger.to_string()), "{refusal}");
        assert!(
            refusal.contains(&file.path().display().to_string()),
            "{refusal}"
        );

        let inline_only = policy(&Trust::AllowedClients {
            file: None,
            vat_ids: vec![inline],
        })
        .unwrap();
        assert!(inline_only.check(&inline, &ctx).is_ok());
        assert!(inline_only.check(&listed, &ctx).is_err());
    }

    #[test]
    fn a_missing_allow_list_is_reported_when_the_tunnel_is_built() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.key");
        Identity::generate().save(&key, false).unwrap();
        let text = format!(
            "identity = {key:?}\n[service.s]\nmode = \"server\"\nlisten = \"127.0.0.1:0\"\n\
             connect = \"127.0.0.1:1\"\nallow = \"missing.allow\"\n"
        );
        let conf = dir.path().join("t.toml");
        let config = TunnelSpec::from_toml(&text, &conf)
            .and_then(|s| s.check(config::Origin::File(&conf)))
            .unwrap();
        let e = Tunnel::new(config).unwrap_err().to_string();
        assert!(
            e.contains("service s:") && e.contains("missing.allow does not exist"),
            "{e}"
        );
    }
}
