//! [`Server`]: [`serve`](super::serve) on every core.
//!
//! The design is documented on [`Server`].

use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use capnp::capability::FromClientHook;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{accept_within, PeerInfo, ServerConfig, Serving};
use crate::admission::AdmissionStats;
use crate::identity::Identity;
use crate::policy::{AnyVat, PeerPolicy};
use crate::workers::{self, Workers};

/// A running multi-worker RPC server: [`serve`](super::serve) spread over
/// worker threads (see [Design](#design) below).
///
/// Built with [`Server::builder`]. The bootstrap factory must be
/// `Send + Sync`, as it is shared by the workers; each call happens on the
/// worker of the connection and returns that connection's capability,
/// which stays on that worker (it need not be `Send`). State the
/// connections share is the application's choice of a `Send` type: an
/// `Arc<Mutex<..>>` (or atomics, or a channel to a task that owns it)
/// captured by the factory and cloned into each capability.
///
/// ```no_run
/// use std::sync::{Arc, Mutex};
/// use capnp_noise::rpc::{PeerInfo, Server, ServerConfig};
/// use capnp_noise::{AnyVat, Identity, VatId};
/// # use capnp_noise_test::schema::demo_capnp::office;
///
/// /// One connection's capability: `!Send` is fine, it lives on one worker.
/// struct Office {
///     caller: VatId,
///     /// Shared by every connection on every worker: a `Send` choice.
///     visits: Arc<Mutex<u64>>,
/// }
///
/// impl office::Server for Office {
///     async fn whoami(
///         self: capnp::capability::Rc<Self>,
///         _: office::WhoamiParams,
///         mut results: office::WhoamiResults,
///     ) -> Result<(), capnp::Error> {
///         let visits = {
///             let mut v = self.visits.lock().unwrap();
///             *v += 1;
///             *v
///         };
///         results.get().set_vat_id(format!("{} (visit {visits})", self.caller));
///         Ok(())
///     }
/// }
///
/// # fn main() -> std::io::Result<()> {
/// let visits = Arc::new(Mutex::new(0u64));
/// let listener = std::net::TcpListener::bind("127.0.0.1:4000")?;
/// let server = Server::builder(Identity::generate(), move |peer: &PeerInfo| -> office::Client {
///     // Runs on the connection's worker thread.
///     capnp_rpc::new_client(Office { caller: peer.vat_id, visits: visits.clone() })
/// })
/// .policy(Arc::new(AnyVat))
/// .config(ServerConfig::default().with_max_connections(4096))
/// .workers(4) // default: std::thread::available_parallelism()
/// .serve(listener)?;
/// println!("serving on {} with {} workers", server.local_addr(), server.workers());
/// // ... until it is time to stop (e.g. from a signal handler, through
/// // server.shutdown_handle()):
/// server.shutdown(); // closes connections, joins every thread
/// # Ok(()) }
/// ```
///
/// Dropping a `Server` shuts it down without waiting for its threads.
///
/// # Design
///
/// * **One accept thread, N worker threads.** The accept thread owns the
///   listener and the connection limit ([`ServerConfig::max_connections`]);
///   each accepted socket goes, as a `std` socket with its connection
///   permit, over a channel to the worker with the fewest live connections
///   (ties rotate). Each worker is a current-thread tokio runtime with its
///   own [`LocalSet`](tokio::task::LocalSet), which runs the handshake, calls
///   the bootstrap factory and runs the connection's `RpcSystem`: nothing of
///   a connection ever moves between threads once it is on its worker, so
///   capabilities stay `!Send`, as capnp-rpc wants them. The worker
///   threads are a [`Workers`](crate::workers::Workers) pool, which the
///   `capnp-noise tunnel` runs its connections on too.
/// * **Why not every worker accepting on a shared listener:** every idle
///   worker would wake for every new connection (the thundering herd: with
///   16 workers, 15 useless wake-ups per accept, each a context switch),
///   and the kernel would give connections to whichever thread woke first,
///   not to the least loaded. One accept thread costs one channel hand-off
///   (a wake-up of the chosen worker) per connection, small beside the
///   handshake it precedes (four X25519 operations and an Ed25519 check).
///   `SO_REUSEPORT` (one listener per worker) would need the server to bind
///   the address itself, and spreads by a hash of the address, not by load.
/// * **Admission is global.** Every worker uses the same
///   [`HandshakeSlots`](crate::admission::HandshakeSlots) and
///   [`UnauthenticatedLimit`](crate::admission::UnauthenticatedLimit) (both
///   behind `Arc`s, their counts under a mutex and tokio semaphores), and the
///   connection permits come from one semaphore on the accept thread: N
///   workers admit no more than one `serve` with the same [`ServerConfig`].
/// * **Failures stay where they happen.** A bootstrap factory that panics
///   closes that one connection (logged at `error`); the worker goes on
///   serving its others. A worker thread that ends for any other reason is
///   skipped by the accept thread from then on (logged at `error`), and its
///   share of new connections goes to the others; only when every worker
///   has ended does the server stop accepting.
/// * **Shutdown** ([`Server::shutdown`], or [`ShutdownHandle::shutdown`]
///   then [`Server::join`]): the listener closes, connections still
///   handshaking are dropped, and established ones are disconnected as
///   [`Connection::disconnect`](super::Connection::disconnect) does (calls
///   in flight fail, the authenticated CLOSE is sent, within a few
///   seconds); then every thread ends and is joined.
///
/// # The multi-vat network stays on one thread
///
/// A [`Network`](crate::network::Network) is one `!Send` object: its table
/// of connections per peer, the tie-break of crossed dials, the address book
/// and the provider's handoff table are `Rc<RefCell<..>>` state that every
/// connection's `Vat` service reads and changes, and capabilities passed
/// between connections (an introduced capability hosted on one connection
/// and redeemed over another) are `!Send` capnp-rpc clients. Spreading it
/// would take: that shared state behind locks (`Arc<Mutex<..>>`, or owned
/// by one thread and reached by messages), and a cross-worker proxy for
/// every capability that crosses from one connection to another on a
/// different worker (capnp-rpc has no `Send` client), or the rule that all
/// connections of capabilities that meet share a worker. That is a bigger
/// design change than this server; a network that needs more than one core
/// can run several vats, one per thread.
pub struct Server {
    local_addr: SocketAddr,
    stop: CancellationToken,
    accept: Option<JoinHandle<()>>,
    workers: Arc<Workers>,
    serving_stats: Arc<dyn Fn() -> AdmissionStats + Send + Sync>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("workers", &self.workers.len())
            .field("load", &self.load())
            .finish_non_exhaustive()
    }
}

/// Settings of a [`Server`], from [`Server::builder`].
#[must_use = "a builder does nothing until serve() is called"]
pub struct ServerBuilder<F> {
    identity: Identity,
    bootstrap: F,
    policy: Arc<dyn PeerPolicy>,
    config: ServerConfig,
    workers: usize,
}

impl<F> std::fmt::Debug for ServerBuilder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("vat_id", &self.identity.vat_id())
            .field("config", &self.config)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// Stops a [`Server`] from anywhere (another thread, a signal handler's
/// task): cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts the shutdown: the listener closes and every worker
    /// disconnects its connections and ends. Returns at once;
    /// [`Server::join`] waits for the end.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

impl Server {
    /// Starts building a server of the vat `identity`, calling `bootstrap`
    /// for every authenticated connection on that connection's worker.
    /// Defaults: any vat may connect ([`AnyVat`]), [`ServerConfig::default`],
    /// one worker per available core.
    pub fn builder<F>(identity: Identity, bootstrap: F) -> ServerBuilder<F> {
        ServerBuilder {
            identity,
            bootstrap,
            policy: Arc::new(AnyVat),
            config: ServerConfig::default(),
            workers: 0,
        }
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many worker threads it started.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Live connections per worker (handshaking or established, counted
    /// from the hand-off to the worker), in worker order; a worker that has
    /// failed shows `None`.
    pub fn load(&self) -> Vec<Option<usize>> {
        self.workers.load()
    }

    /// The handshake admission's counts, across all workers (one set of
    /// limits for the whole server).
    pub fn admission(&self) -> AdmissionStats {
        (self.serving_stats)()
    }

    /// A handle that can stop the server from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// Shuts the server down (see [`ShutdownHandle::shutdown`]) and waits
    /// until every thread has ended. Blocks the calling thread: from async
    /// code, call it in `tokio::task::spawn_blocking`.
    pub fn shutdown(self) {
        self.stop.cancel();
        self.join();
    }

    /// Waits until the server has been shut down (through a
    /// [`ShutdownHandle`]) and every thread has ended. Blocks the calling
    /// thread.
    pub fn join(mut self) {
        if let Some(accept) = self.accept.take() {
            if accept.join().is_err() {
                error!("the accept thread had failed (panicked)");
            }
        }
        self.workers.join();
    }

    #[doc(hidden)]
    /// Test hook of the private `__test-hooks` feature: makes worker
    /// `index` fail (its thread panics) as a bug in it would.
    #[cfg(feature = "__test-hooks")]
    pub fn fail_worker_for_test(&self, index: usize) {
        self.workers.fail_worker_for_test(index);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl<F> ServerBuilder<F> {
    /// Who may connect (default [`AnyVat`]).
    pub fn policy(mut self, policy: Arc<dyn PeerPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Limits and settings; each limit is global, across all workers.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Worker threads (0, the default: [`std::thread::available_parallelism`]).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Starts the accept thread and the workers, serving on `listener`.
    ///
    /// # Errors
    /// If the listener cannot be made non-blocking, or a thread or its
    /// runtime cannot be created (then nothing is left running).
    pub fn serve<C>(self, listener: StdListener) -> io::Result<Server>
    where
        F: Fn(&PeerInfo) -> C + Send + Sync + 'static,
        C: FromClientHook,
    {
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let max_connections = self.config.max_connections.max(1);
        let connections = Arc::new(Semaphore::new(max_connections));
        let serving = Arc::new(Serving::new(
            self.identity,
            self.policy,
            self.config,
            self.bootstrap,
        ));
        let stop = CancellationToken::new();
        let workers = Arc::new(Workers::start(self.workers, "capnp-noise")?);
        let runtime = workers::runtime()?;
        let accept = {
            let (workers, stop) = (workers.clone(), stop.clone());
            let serving = serving.clone();
            move || {
                runtime.block_on(accept_loop(listener, connections, &workers, serving, &stop));
                // Connections end on `stop`; the workers once they have.
                workers.close();
            }
        };
        let accept = std::thread::Builder::new()
            .name("capnp-noise-accept".into())
            .spawn(accept)?;
        let stats = serving.clone();
        Ok(Server {
            local_addr,
            stop,
            accept: Some(accept),
            workers,
            serving_stats: Arc::new(move || stats.acceptor.slots.stats()),
        })
    }
}

async fn accept_loop<F, C>(
    listener: StdListener,
    connections: Arc<Semaphore>,
    workers: &Workers,
    serving: Arc<Serving<F>>,
    stop: &CancellationToken,
) where
    F: Fn(&PeerInfo) -> C + Send + Sync + 'static,
    C: FromClientHook,
{
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot listen: the server stops");
            stop.cancel();
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            a = accept_within(&connections, &listener) => a,
            () = stop.cancelled() => return,
        };
        let Some((permit, tcp, addr)) = accepted else {
            return;
        };
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                warn!(%addr, error = %e, "accepted socket unusable");
                continue;
            }
        };
        let (serving, stop_job) = (serving.clone(), stop.clone());
        let job = move || async move {
            match TcpStream::from_std(tcp) {
                Ok(tcp) => {
                    serving
                        .serve_connection(tcp, addr, stop_job.cancelled())
                        .await
                }
                Err(e) => warn!(%addr, error = %e, "accepted socket unusable"),
            }
            drop(permit);
        };
        if !workers.spawn(job) {
            error!("every worker thread has ended: the server stops accepting");
            stop.cancel();
            return;
        }
    }
}
