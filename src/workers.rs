//! [`Workers`]: threads that each run a current-thread tokio runtime with
//! its own [`LocalSet`](tokio::task::LocalSet), and take jobs from one
//! dispatcher, each to the worker with the fewest live jobs.
//!
//! The worker threads of [`rpc::Server`](crate::rpc::Server), and of the
//! `capnp-noise tunnel` (its connections run on them): a server that
//! accepts on one thread and runs each connection, from its handshake to
//! its end, on one worker. The design (why one dispatcher rather than
//! every worker accepting, how a failed worker is skipped) is documented
//! on [`rpc::Server`](crate::rpc::Server#design).
//!
//! A job is a `Send` closure that the worker calls to make the job's
//! future, which need not be `Send`: a socket accepted elsewhere travels
//! as a `std` socket and is registered with the worker's runtime by the
//! future (`TcpStream::from_std`), so that its readiness wakes that worker
//! and no other thread.
//!
//! ```
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use capnp_noise::workers::Workers;
//!
//! let workers = Workers::start(2, "example")?;
//! let done = Arc::new(AtomicUsize::new(0));
//! for _ in 0..4 {
//!     let done = done.clone();
//!     // The closure travels to a worker; the future is made there.
//!     assert!(workers.spawn(move || async move {
//!         tokio::task::yield_now().await;
//!         done.fetch_add(1, Ordering::Relaxed);
//!     }));
//! }
//! workers.close(); // no more jobs: each worker ends once its jobs have
//! workers.join();
//! assert_eq!(done.load(Ordering::Relaxed), 4);
//! # Ok::<(), std::io::Error>(())
//! ```

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

/// A job's future, made on its worker.
type LocalJob = Pin<Box<dyn Future<Output = ()>>>;

/// What the dispatcher sends a worker.
enum Message {
    /// Run this job.
    Run(Box<dyn FnOnce() -> LocalJob + Send>),
    /// Test hook: fail as a bug would.
    #[cfg(feature = "__test-hooks")]
    Fail,
}

/// The dispatcher's view of one worker.
struct WorkerHandle {
    tx: mpsc::UnboundedSender<Message>,
    /// Its live jobs, counted up by the dispatcher and down by the worker.
    load: Arc<AtomicUsize>,
    failed: AtomicBool,
}

impl WorkerHandle {
    /// False once the worker has been found gone, or its thread has ended
    /// (its queue is closed).
    fn alive(&self) -> bool {
        !self.failed.load(Ordering::Relaxed) && !self.tx.is_closed()
    }
}

/// N worker threads, each a current-thread tokio runtime with a
/// [`LocalSet`](tokio::task::LocalSet); see the [module docs](self).
///
/// Shared by reference (put it in an `Arc` to share it between threads):
/// [`spawn`](Self::spawn), [`close`](Self::close) and [`join`](Self::join)
/// take `&self`.
pub struct Workers {
    workers: Vec<WorkerHandle>,
    /// Where the search for the least loaded worker starts (ties rotate).
    next: AtomicUsize,
    /// Cancelled by [`close`](Self::close).
    closing: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("load", &self.load())
            .finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts `n` worker threads (0: [`std::thread::available_parallelism`]),
    /// named `{name}-worker-{index}`.
    ///
    /// # Errors
    /// If a thread or its runtime cannot be created (then the ones started
    /// end at once).
    pub fn start(n: usize, name: &str) -> io::Result<Workers> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let closing = CancellationToken::new();
        // Until the pool is returned, a failure stops what was started.
        let guard = closing.clone().drop_guard();
        let mut threads = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for index in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let load = Arc::new(AtomicUsize::new(0));
            let runtime = runtime()?;
            let worker = Worker {
                rx,
                load: load.clone(),
                closing: closing.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-worker-{index}"))
                    .spawn(move || worker.run(runtime))?,
            );
            workers.push(WorkerHandle {
                tx,
                load,
                failed: AtomicBool::new(false),
            });
        }
        let _ = guard.disarm();
        Ok(Workers {
            workers,
            next: AtomicUsize::new(0),
            closing,
            threads: Mutex::new(threads),
        })
    }

    /// How many worker threads it started.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Never: a pool has at least one worker (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Live jobs per worker (counted from [`spawn`](Self::spawn) to the end
    /// of the job's future), in worker order; a worker that has failed
    /// shows `None`.
    pub fn load(&self) -> Vec<Option<usize>> {
        self.workers
            .iter()
            .map(|w| w.alive().then(|| w.load.load(Ordering::Relaxed)))
            .collect()
    }

    /// Hands `job` to the worker with the fewest live jobs (ties rotate),
    /// which calls it and runs the future it returns on its `LocalSet`. A
    /// worker found gone is marked failed (logged at `error`) and the next
    /// one tried. False (and `job` dropped uncalled) if every worker has
    /// ended, or the pool is [closed](Self::close).
    pub fn spawn<F, Fut>(&self, job: F) -> bool
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        if self.closing.is_cancelled() {
            return false;
        }
        let mut message = Message::Run(Box::new(move || Box::pin(job()) as LocalJob));
        loop {
            let n = self.workers.len();
            let start = self.next.load(Ordering::Relaxed);
            let Some(i) = (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| self.workers[i].alive())
                .min_by_key(|&i| self.workers[i].load.load(Ordering::Relaxed))
            else {
                return false;
            };
            self.next.store((i + 1) % n, Ordering::Relaxed);
            let worker = &self.workers[i];
            worker.load.fetch_add(1, Ordering::Relaxed);
            match worker.tx.send(message) {
                Ok(()) => return true,
                Err(mpsc::error::SendError(m)) => {
                    worker.load.fetch_sub(1, Ordering::Relaxed);
                    if self.closing.is_cancelled() {
                        // Closed meanwhile: the queue was closed, not failed.
                        return false;
                    }
                    worker.failed.store(true, Ordering::Relaxed);
                    error!(
                        worker = i,
                        "a worker thread has ended: its share of new jobs goes to the others"
                    );
                    message = m;
                }
            }
        }
    }

    /// Takes no more jobs ([`spawn`](Self::spawn) returns false from now
    /// on); the jobs already handed to a worker still run, and each worker
    /// thread ends once its jobs have ended. Returns at once; a job that
    /// should end now must be told so by its own means (a cancellation
    /// token).
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Waits until every worker thread has ended (after
    /// [`close`](Self::close)); a thread that panicked is logged. Blocks
    /// the calling thread: from async code, call it in
    /// `tokio::task::spawn_blocking`.
    pub fn join(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in threads {
            let name = thread.thread().name().unwrap_or("?").to_string();
            if thread.join().is_err() {
                error!(thread = %name, "a worker thread had failed (panicked)");
            }
        }
    }

    #[doc(hidden)]
    /// Test hook of the private `__test-hooks` feature: makes worker
    /// `index` fail (its thread panics) as a bug in it would.
    #[cfg(feature = "__test-hooks")]
    pub fn fail_worker_for_test(&self, index: usize) {
        let _ = self.workers[index].tx.send(Message::Fail);
    }
}

impl Drop for Workers {
    /// Closes the pool (see [`close`](Self::close)) without waiting for its
    /// threads.
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

/// A current-thread runtime with the I/O and time drivers.
pub(crate) fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// One worker thread: its queue of jobs.
struct Worker {
    rx: mpsc::UnboundedReceiver<Message>,
    load: Arc<AtomicUsize>,
    closing: CancellationToken,
}

/// Counts a job off its worker's load when it ends, however.
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Worker {
    fn run(mut self, runtime: tokio::runtime::Runtime) {
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let tasks = TaskTracker::new();
            let mut closed = false;
            loop {
                if !closed && self.closing.is_cancelled() {
                    // No more jobs; those already queued still arrive.
                    self.rx.close();
                    closed = true;
                }
                let message = if closed {
                    self.rx.recv().await
                } else {
                    tokio::select! {
                        m = self.rx.recv() => m,
                        () = self.closing.cancelled() => continue,
                    }
                };
                match message {
                    Some(Message::Run(job)) => {
                        let live = Live(self.load.clone());
                        let job = job();
                        tasks.spawn_local(async move {
                            let _live = live;
                            job.await;
                        });
                    }
                    #[cfg(feature = "__test-hooks")]
                    Some(Message::Fail) => panic!("worker failed (test hook)"),
                    None => break,
                }
            }
            tasks.close();
            tasks.wait().await;
        });
    }
}
