//! Small helpers the integration tests share.

use std::future::Future;
use std::time::Duration;

use crate::schema::demo_capnp::office;

/// Runs `f` on a fresh `LocalSet` (capnp-rpc is `!Send`).
pub async fn local<F: Future>(f: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(f).await
}

/// `f`, or a test failure naming `what` if it takes longer than `limit`.
///
/// # Panics
/// When `f` does not finish within `limit`.
pub async fn bounded<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no result within {limit:?}"),
    }
}

/// Asks `office` who the caller is: the VatId the server saw, in text form.
///
/// # Errors
/// The call's error.
pub async fn whoami(office: &office::Client) -> Result<String, capnp::Error> {
    let reply = office.whoami_request().send().promise.await?;
    Ok(reply.get()?.get_vat_id()?.to_string()?)
}

/// A byte stream that counts what was read from it: shows, for example,
/// that a responder's handshake never received one byte of message 3.
#[derive(Debug)]
pub struct Tap<T> {
    inner: T,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<T> Tap<T> {
    /// `inner`, and the count of bytes read from it so far (shared, so it
    /// can be read after the tap was moved into a handshake and dropped).
    pub fn new(inner: T) -> (Tap<T>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let read = std::sync::Arc::default();
        (
            Tap {
                inner,
                read: std::sync::Arc::clone(&read),
            },
            read,
        )
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tap<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// For the examples: the key log `CAPNP_NOISE_KEYLOG` names, if set
/// (appended to, created 0600), with a warning on stderr. Research only;
/// the library never reads the variable, the examples and the
/// `capnp-noise` command do.
///
/// # Panics
/// If the file cannot be opened.
pub fn key_log_from_env() -> Option<std::sync::Arc<dyn capnp_noise::keylog::KeyLog>> {
    use capnp_noise::keylog::{KeyLogFile, KEYLOG_ENV};
    let path = std::env::var_os(KEYLOG_ENV).filter(|p| !p.is_empty())?;
    let file = KeyLogFile::create(&path).expect("open the key log");
    eprintln!(
        "WARNING: {KEYLOG_ENV} is set: the Noise session keys are written to {}; \
         whoever reads that file can decrypt these sessions. For research and debugging only.",
        path.to_string_lossy()
    );
    Some(std::sync::Arc::new(file))
}

/// Plain capnp-rpc's two-party network over a byte stream (TCP, or TLS
/// for the comparisons), buffered as capnp-rpc's own examples do
/// (`BufReader`/`BufWriter`): the baseline that capnp-noise is compared
/// with in `wan::compare` and `benches/compare.rs`.
pub fn twoparty_system<S>(
    io: S,
    side: capnp_rpc::rpc_twoparty_capnp::Side,
    bootstrap: Option<capnp::capability::Client>,
) -> capnp_rpc::RpcSystem<capnp_rpc::rpc_twoparty_capnp::Side>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    use tokio_util::compat::TokioAsyncReadCompatExt;
    let (r, w) = futures::AsyncReadExt::split(io.compat());
    let network = capnp_rpc::twoparty::VatNetwork::new(
        futures::io::BufReader::new(r),
        futures::io::BufWriter::new(w),
        side,
        Default::default(),
    );
    capnp_rpc::RpcSystem::new(Box::new(network), bootstrap)
}
