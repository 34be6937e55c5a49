//! One service: its accept loop, and each connection from accept to the
//! log line that ends it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::config::{Mode, ServiceConfig, Trust};
use super::egress;
use super::forward::{self, End, Forwarded, WithKeepalive};
use super::metrics::{self, Counters, Shown};
use super::proxy::ProxyProtocol;
use super::socket::{Listener, Plain, Remote};
use capnp_noise::admission::{HandshakeSlots, UnauthenticatedLimit, DEFAULT_FIRST_MESSAGE_TIMEOUT};
use capnp_noise::error::Error;
use capnp_noise::identity::Identity;
use capnp_noise::policy::PeerPolicy;
use capnp_noise::stream::{self, NoiseStream, StreamConfig};
use capnp_noise::vat_id::VatId;
use capnp_noise::wire::{
    EarlyData, HandshakeConfig, Pattern, ResumptionCache, ResumptionConfig, Suite,
    EOF_BEFORE_MESSAGE_2,
};
use capnp_noise::workers::Workers;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::AsyncWriteExt;

/// The most servers a client service keeps resumption records of (it
/// resumes only with its `peer` list: the old and new key of a rotation).
const RESUMPTION_RECORDS: usize = 16;

/// How long a client service with `early_data` waits for its plain
/// client's first bytes before it starts the handshake without them (a
/// protocol where the server speaks first waits this long once).
const FIRST_BYTES_WAIT: Duration = stream::DEFAULT_LAZY_START_WAIT;

/// After the first bytes, how long a client service with `early_data`
/// waits for more before it starts the handshake (what it takes for the
/// next write of a request sent in several, on the same machine); every
/// such connection pays it once.
const FIRST_BYTES_GAP: Duration = Duration::from_millis(5);

/// How long the accept loop pauses after an accept error (out of file
/// descriptors and the like), so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(super) struct Service {
    /// The configuration it started with: its name, listen address and
    /// the limits its semaphores were made with.
    config: ServiceConfig,
    mode: Mode,
    /// What new connections use: replaced by a reload.
    live: RwLock<Arc<Live>>,
    connections: Arc<Semaphore>,
    /// Client mode: outgoing handshakes at once.
    handshakes: Semaphore,
    /// Server mode: admission of incoming handshakes past message 1.
    slots: HandshakeSlots,
    /// Server mode: connections not yet authenticated, per source address.
    unauthenticated: UnauthenticatedLimit,
    /// Client mode: the servers this service completed a handshake with,
    /// for `resumption` (SPEC.md 14); in memory, for the process's life
    /// (a restarted client's first connection runs XX again).
    resumption: Arc<ResumptionCache>,
    /// What the metrics endpoint shows.
    counters: Arc<Counters>,
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The settings a connection takes when it is accepted; a reload replaces
/// them for the connections that follow.
pub(super) struct Live {
    pub(super) config: ServiceConfig,
    pub(super) identity: Arc<Identity>,
    pub(super) policy: Arc<dyn PeerPolicy>,
}

/// One connection: its service, and the settings it was accepted with.
/// Dereferences to the service (its limits and counters).
struct Connection {
    service: Arc<Service>,
    config: ServiceConfig,
    identity: Arc<Identity>,
    policy: Arc<dyn PeerPolicy>,
}

impl std::ops::Deref for Connection {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

/// Counts a connection open until dropped.
struct Open<'a>(&'a Counters);

impl<'a> Open<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.accepted.fetch_add(1, Relaxed);
        counters.open.fetch_add(1, Relaxed);
        Open(counters)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// Why a connection never got to forwarding. Logged, then the accepted
/// TCP connection is reset.
enum SetupFailure {
    NoHandshakeSlot(Duration),
    Unreachable {
        what: &'static str,
        addr: String,
        error: io::Error,
    },
    Handshake(Error),
    Refused {
        vat_id: VatId,
        reason: String,
    },
    Aborted,
}

impl Service {
    pub(super) fn new(live: Live) -> Self {
        let config = live.config.clone();
        Service {
            mode: config.mode(),
            live: RwLock::new(Arc::new(live)),
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            handshakes: Semaphore::new(config.limits.max_handshakes),
            slots: HandshakeSlots::new(
                config.limits.max_handshakes,
                config.limits.max_handshakes_per_source,
            ),
            unauthenticated: UnauthenticatedLimit::new(
                config.limits.max_unauthenticated_per_source,
            ),
            // A client resumes with its pinned servers: a few records.
            resumption: Arc::new(ResumptionCache::new(RESUMPTION_RECORDS)),
            config,
            counters: Arc::default(),
        }
    }

    /// The service's name.
    pub(super) fn name(&self) -> &str {
        &self.config.name
    }

    /// The configuration it started with.
    pub(super) fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// New connections take `live` (open ones keep theirs).
    pub(super) fn reload(&self, live: Live) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(live);
    }

    /// What the metrics endpoint shows of this service.
    pub(super) fn shown(&self) -> Shown {
        Shown {
            name: self.config.name.clone(),
            connect: self.config.connect.clone(),
            counters: self.counters.clone(),
            slots: (self.mode == Mode::Server).then(|| self.slots.clone()),
        }
    }

    /// Accepts connections until `stop`, each tracked by `tasks` and run
    /// on the least loaded of `workers` (or, without workers, spawned on
    /// this runtime); `cut` aborts them. Closes the listener when it
    /// returns.
    pub(super) async fn accept_loop(
        self: Arc<Self>,
        listener: Listener,
        workers: Option<Arc<Workers>>,
        tasks: TaskTracker,
        stop: CancellationToken,
        cut: CancellationToken,
    ) {
        let name = &self.config.name;
        let mut at_limit = false;
        loop {
            if self.connections.available_permits() == 0 {
                if !at_limit {
                    warn!(
                        service = %name,
                        limit = self.config.limits.max_connections,
                        "connection limit reached: new connections wait until one ends"
                    );
                }
                at_limit = true;
            } else {
                at_limit = false;
            }
            let permit = tokio::select! {
                p = self.connections.clone().acquire_owned() => p,
                () = stop.cancelled() => return,
            };
            let Ok(permit) = permit else { return };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            match accepted {
                Ok((plain, from)) => {
                    let Some(workers) = &workers else {
                        tasks.spawn(self.clone().connection(plain, from, permit, cut.clone()));
                        continue;
                    };
                    let moving = match plain.into_moving() {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(service = %name, %from, error = %e, "accepted socket unusable");
                            continue;
                        }
                    };
                    let (service, cut) = (self.clone(), cut.clone());
                    // Tracked from now: a shutdown counts it even while queued.
                    let connection = tasks.track_future(async move {
                        match moving.arrive() {
                            Ok(plain) => service.connection(plain, from, permit, cut).await,
                            Err(e) => warn!(
                                service = %service.name(), %from, error = %e,
                                "accepted socket unusable"
                            ),
                        }
                    });
                    if !workers.spawn(move || connection) {
                        warn!(service = %name, "every worker thread has ended: not accepting");
                        return;
                    }
                }
                Err(e) => {
                    warn!(service = %name, error = %e, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        accepted: Plain,
        addr: Remote,
        permit: OwnedSemaphorePermit,
        cut: CancellationToken,
    ) {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner()).clone();
        let connection = Connection {
            service: self,
            config: live.config.clone(),
            identity: live.identity.clone(),
            policy: live.policy.clone(),
        };
        connection.run(accepted, addr, permit, cut).await;
    }
}

impl Connection {
    async fn run(
        &self,
        accepted: Plain,
        addr: Remote,
        _permit: OwnedSemaphorePermit,
        cut: CancellationToken,
    ) {
        let started = Instant::now();
        let _open = Open::new(&self.counters);
        let setup = match self.mode {
            Mode::Client => {
                let mut accepted = accepted;
                let noise = tokio::select! {
                    r = self.dial_server(&mut accepted) => r,
                    r = aborted(&cut) => r,
                };
                match noise {
                    Ok(noise) => Ok((accepted, noise)),
                    Err(failure) => {
                        // Not a clean end for the client: reset.
                        accepted.reset_on_close();
                        Err(failure)
                    }
                }
            }
            Mode::Server => {
                // A server listens on TCP (the configuration's check).
                #[allow(irrefutable_let_patterns)]
                let (Plain::Tcp(accepted), Remote::Tcp(from)) = (accepted, addr) else {
                    return warn!(service = %self.config.name, "a server accepted a non-TCP connection");
                };
                // The target is dialed only for an authenticated client. If
                // it cannot be reached, the client's stream is dropped
                // without CLOSE: its tunnel resets its own client.
                // Silent or slow sockets from one address cannot hold every
                // connection place: past its share, a source's connection
                // is closed at once (and each must send message 1 within
                // DEFAULT_FIRST_MESSAGE_TIMEOUT).
                let Some(unauthenticated) = self.unauthenticated.try_acquire(from.ip()) else {
                    return warn!(
                        service = %self.config.name,
                        %from,
                        limit = self.unauthenticated.max_per_source(),
                        "closed: its source has too many connections not yet authenticated"
                    );
                };
                let pair = async {
                    let noise = self.handshake_client(accepted, from).await?;
                    drop(unauthenticated);
                    let connect = Plain::connect(&self.config.connect);
                    let mut target = self.dial("the target", connect).await?;
                    if let Some(version) = self.config.proxy_protocol {
                        self.send_proxy_header(version, &mut target, &noise, from)
                            .await?;
                    }
                    Ok((target, noise))
                };
                tokio::select! {
                    r = pair => r,
                    r = aborted(&cut) => r,
                }
            }
        };
        let (mut plain, noise) = match setup {
            Ok(pair) => pair,
            Err(failure) => return self.log_setup_failure(addr, failure),
        };
        self.counters.forwarded.fetch_add(1, Relaxed);
        let peer = noise.peer_vat_id().fingerprint();
        let (resumed, early_data) = (noise.resumed(), noise.early_data_outcome());
        // The protocol that ran: IK when resumed, else XX (a fallback is XX
        // continued, SPEC.md 14.6).
        let pattern = if resumed { Pattern::IK } else { Pattern::XX };
        let suite = noise.suite().noise_name_for(pattern);
        info!(service = %self.config.name, %peer, %addr, suite, resumed, ?early_data, "connected");
        let limits = &self.config.limits;
        let mut noise = WithKeepalive::new(noise, limits.keepalive);
        let done =
            forward::forward(&mut plain, &mut noise, limits.idle_timeout, cut.cancelled()).await;
        if !matches!(done.end, End::Closed) {
            // Tell the plain side this was not a clean end; the noise side
            // is dropped without CLOSE, which tells the remote tunnel.
            plain.reset_on_close();
        }
        self.log_end(&peer, addr, &done, started.elapsed());
    }

    /// Client mode: connects to the server and authenticates it. If the
    /// server closes without answering a suite other than the mandatory
    /// one, and this service accepts the mandatory suite (`suite =
    /// "auto"`), tries once more with it on a new connection, as
    /// `capnp_noise::rpc::connect` does (SPEC.md 2,
    /// [`HandshakeConfig::fallback_after`]), and logs that it did.
    ///
    /// With `resumption`, resumes (Noise `IK`) with a pinned server it
    /// knows; with `early_data` too, first reads what the plain client
    /// sends at once (within [`FIRST_BYTES_WAIT`], at most what `IK`
    /// message 1 holds) and sends it as early data (or, without a record,
    /// right after the handshake). A silent close of an `IK` attempt
    /// (a server of revision 1.1) is retried once with `XX` (SPEC.md 14.6),
    /// the first bytes sent again.
    async fn dial_server(
        &self,
        accepted: &mut Plain,
    ) -> Result<NoiseStream<TcpStream>, SetupFailure> {
        let _slot = self.handshake_slot().await?;
        let handshake = self.handshake_config();
        let first = match self.resume_with() {
            Some(_) if self.config.early_data => Some(self.first_bytes(accepted).await?),
            _ => None,
        };
        let resuming = self
            .resume_with()
            .is_some_and(|vat| self.resumption.get(&vat).is_some());
        let first_try = self
            .handshake_server(handshake.clone(), first.as_deref())
            .await;
        let retry = match &first_try {
            Err(SetupFailure::Handshake(e)) => handshake.fallback_after(e).or_else(|| {
                let silent =
                    matches!(e, Error::UnexpectedEof { during } if *during == EOF_BEFORE_MESSAGE_2);
                (resuming && silent).then(|| handshake.clone())
            }),
            _ => None,
        };
        let Some(retry) = retry else { return first_try };
        warn!(
            service = %self.config.name,
            server = %self.config.connect,
            resuming,
            "the server closed without answering {}; retrying once with {}",
            if resuming { "IK".to_string() } else { handshake.suites[0].to_string() },
            if resuming { "XX".to_string() } else { format!("the mandatory suite {}", Suite::MANDATORY) },
        );
        self.handshake_server(retry, first.as_deref()).await
    }

    /// With `resumption`: the pinned server to resume with, the first of
    /// `peer` with a record (else the first, whose record the handshake
    /// makes).
    fn resume_with(&self) -> Option<VatId> {
        if !self.config.resumption {
            return None;
        }
        let Trust::PinnedServer(peers) = &self.config.trust else {
            return None;
        };
        peers
            .iter()
            .find(|vat| self.resumption.get(vat).is_some())
            .or(peers.first())
            .copied()
    }

    /// What the plain client sends first: what arrives within
    /// [`FIRST_BYTES_WAIT`], and then whatever follows it with gaps of at
    /// most [`FIRST_BYTES_GAP`] (a client writes a request in a few
    /// writes: capnp-rpc a bootstrap request, then a call), up to the room
    /// in `IK` message 1 and for at most twice [`FIRST_BYTES_WAIT`] in all
    /// (a client that trickles bytes does not hold the handshake back).
    /// Empty if nothing came.
    async fn first_bytes(&self, accepted: &mut Plain) -> Result<Vec<u8>, SetupFailure> {
        use tokio::io::AsyncReadExt;
        let room = stream::early_data_room(&self.identity);
        let mut first = vec![0u8; room];
        let mut got = 0;
        let until = tokio::time::Instant::now() + 2 * FIRST_BYTES_WAIT;
        let mut wait = FIRST_BYTES_WAIT;
        while got < room {
            let deadline = until.min(tokio::time::Instant::now() + wait);
            match tokio::time::timeout_at(deadline, accepted.read(&mut first[got..])).await {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => got += n,
                Ok(Err(_)) => return Err(SetupFailure::Aborted),
            }
            wait = FIRST_BYTES_GAP;
        }
        first.truncate(got);
        Ok(first)
    }

    /// Client mode: one TCP connection to the server (through `via` if
    /// set), and the handshake with `handshake`: resuming with
    /// [`resume_with`](Self::resume_with) if `resumption` is on, `first`
    /// (the plain client's first bytes, when `early_data` is on) as early
    /// data.
    async fn handshake_server(
        &self,
        handshake: HandshakeConfig,
        first: Option<&[u8]>,
    ) -> Result<NoiseStream<TcpStream>, SetupFailure> {
        let tcp = match &self.config.via {
            None => {
                self.dial("the server", TcpStream::connect(&self.config.connect))
                    .await?
            }
            Some(via) => {
                self.dial("the server", egress::connect(via, &self.config.connect))
                    .await?
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut config = StreamConfig::default()
            .with_handshake(handshake)
            .with_dialed(self.config.connect.clone())
            .with_handshake_timeout(Some(self.config.limits.handshake_timeout));
        // Through a proxy, the peer address is the proxy's.
        if let (Ok(remote), None) = (tcp.peer_addr(), &self.config.via) {
            config = config.with_remote_addr(remote);
        }
        let policy = self.policy.clone();
        match self.resume_with() {
            Some(server) => {
                let early = first
                    .filter(|b| !b.is_empty())
                    .map(|b| EarlyData::replayable_not_forward_secret(b.to_vec()));
                let cache = self.resumption.clone();
                stream::connect_resuming(tcp, &self.identity, policy, config, cache, &server, early)
                    .await
            }
            None => stream::connect(tcp, &self.identity, policy, config).await,
        }
        .map_err(SetupFailure::from)
    }

    /// Server mode: authenticates the client.
    async fn handshake_client(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> Result<NoiseStream<TcpStream>, SetupFailure> {
        let timeout = self.config.limits.handshake_timeout;
        let resumption = ResumptionConfig::default()
            .with_accept_ik(self.config.resumption)
            .with_accept_early_data(self.config.resumption && self.config.early_data);
        let config = self
            .stream_config()
            .with_resumption(resumption)
            .with_handshake_timeout(Some(timeout))
            .with_first_message_timeout(Some(DEFAULT_FIRST_MESSAGE_TIMEOUT))
            .with_remote_addr(addr)
            .with_handshake_slots(self.slots.clone());
        stream::accept(tcp, &self.identity, self.policy.clone(), config)
            .await
            .map_err(SetupFailure::from)
    }

    /// The stream settings of this service's suite choice.
    fn stream_config(&self) -> StreamConfig {
        StreamConfig::default().with_handshake(self.handshake_config())
    }

    /// The handshake settings of this service's suite choice (one suite, or
    /// every suite with this machine's preferred first), with its key log.
    fn handshake_config(&self) -> HandshakeConfig {
        let handshake = match self.config.suite {
            Some(suite) => HandshakeConfig::with_suite(suite),
            None => HandshakeConfig::default(),
        };
        handshake.with_key_log(self.config.key_log.clone())
    }

    async fn handshake_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, SetupFailure> {
        let timeout = self.config.limits.handshake_timeout;
        if self.handshakes.available_permits() == 0 {
            self.counters.slot_waits.fetch_add(1, Relaxed);
        }
        match tokio::time::timeout(timeout, self.handshakes.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(SetupFailure::NoHandshakeSlot(timeout)),
        }
    }

    /// Server mode: sends the target the PROXY protocol header of the
    /// client at `addr`, before anything else.
    async fn send_proxy_header(
        &self,
        version: ProxyProtocol,
        target: &mut Plain,
        noise: &NoiseStream<TcpStream>,
        addr: SocketAddr,
    ) -> Result<(), SetupFailure> {
        let unreachable = |error| SetupFailure::Unreachable {
            what: "the target",
            addr: self.config.connect.clone(),
            error,
        };
        let local = noise.get_ref().local_addr().map_err(unreachable)?;
        let header = version.header(addr, local, &noise.peer_vat_id());
        target.write_all(&header).await.map_err(unreachable)
    }

    /// Runs `connect` (to `connect`, which is `what`) within the connect
    /// timeout.
    async fn dial<T>(
        &self,
        what: &'static str,
        connect: impl std::future::Future<Output = io::Result<T>>,
    ) -> Result<T, SetupFailure> {
        let timeout = self.config.limits.connect_timeout;
        let unreachable = |error| SetupFailure::Unreachable {
            what,
            addr: self.config.connect.clone(),
            error,
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| {
                unreachable(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                ))
            })?
            .map_err(unreachable)
    }

    fn log_setup_failure(&self, addr: Remote, failure: SetupFailure) {
        let service = &self.config.name;
        let c = &self.counters;
        match &failure {
            SetupFailure::NoHandshakeSlot(_) => c.failed(metrics::Failure::NoSlot),
            SetupFailure::Unreachable { .. } => {
                c.unreachable.fetch_add(1, Relaxed);
            }
            SetupFailure::Handshake(e) => c.failed(metrics::Failure::of(e)),
            SetupFailure::Refused { .. } => {
                c.refused.fetch_add(1, Relaxed);
            }
            SetupFailure::Aborted => {}
        }
        match failure {
            SetupFailure::NoHandshakeSlot(t) => warn!(
                %service, %addr,
                "dropped: no handshake slot free within {t:?} (max_handshakes = {})",
                self.config.limits.max_handshakes
            ),
            SetupFailure::Unreachable {
                what,
                addr: to,
                error,
            } => warn!(
                %service, %addr, error = %error,
                "closing the connection: cannot reach {what} at {to}"
            ),
            SetupFailure::Refused { vat_id, reason } => match self.mode {
                Mode::Client => warn!(
                    %service, peer = %vat_id.fingerprint(), %addr,
                    server = %self.config.connect, %reason, "refused the server"
                ),
                Mode::Server => warn!(
                    %service, peer = %vat_id.fingerprint(), %addr, %reason,
                    "refused a client"
                ),
            },
            // A server sees port scanners and refused clients here: not
            // worth a warning. A client's user wants to know.
            SetupFailure::Handshake(e) => match self.mode {
                Mode::Client => warn!(
                    %service, %addr, server = %self.config.connect, error = %e,
                    "handshake with the server failed"
                ),
                Mode::Server => {
                    info!(%service, %addr, error = %e, "handshake with a client failed")
                }
            },
            SetupFailure::Aborted => {
                info!(%service, %addr, "aborted at shutdown before forwarding")
            }
        }
    }

    fn log_end(&self, peer: &str, addr: Remote, done: &Forwarded, elapsed: Duration) {
        let c = &self.counters;
        c.bytes_to_peer.fetch_add(done.a_to_b, Relaxed);
        c.bytes_from_peer.fetch_add(done.b_to_a, Relaxed);
        if let End::Idle(_) = done.end {
            c.idle_timeouts.fetch_add(1, Relaxed);
        }
        // forward() was given (plain, noise): a = plain, b = noise.
        let end = EndText {
            end: &done.end,
            plain: match self.mode {
                Mode::Client => "the client",
                Mode::Server => "the target",
            },
        };
        info!(
            service = %self.config.name,
            %peer,
            %addr,
            to_peer = done.a_to_b,
            from_peer = done.b_to_a,
            duration = format_args!("{:.3}", elapsed.as_secs_f64()),
            end = %end,
            "connection ended"
        );
    }
}

/// Completes, with [`SetupFailure::Aborted`], when `cut` is cancelled.
async fn aborted<T>(cut: &CancellationToken) -> Result<T, SetupFailure> {
    cut.cancelled().await;
    Err(SetupFailure::Aborted)
}

impl From<Error> for SetupFailure {
    fn from(e: Error) -> Self {
        match e {
            Error::PeerRefused { vat_id, reason } => SetupFailure::Refused { vat_id, reason },
            other => SetupFailure::Handshake(other),
        }
    }
}

/// How a forwarding ended, in words: `closed`, `aborted`, or
/// `"error writing to the target: ..."`.
struct EndText<'a> {
    end: &'a End,
    plain: &'static str,
}

impl fmt::Display for EndText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end {
            End::Closed => f.write_str("closed"),
            End::Cancelled => f.write_str("aborted"),
            End::Idle(t) => write!(
                f,
                "\"idle: no data either way for {:.3} s (idle_timeout)\"",
                t.as_secs_f64()
            ),
            End::Failed { stream, op, error } => {
                let side = match stream {
                    forward::Stream::A => self.plain,
                    forward::Stream::B => "the peer",
                };
                let prep = match op {
                    forward::Op::Read => "from",
                    forward::Op::Write | forward::Op::Shutdown => "to",
                };
                write!(f, "\"error {op} {prep} {side}: {error}\"")
            }
        }
    }
}
