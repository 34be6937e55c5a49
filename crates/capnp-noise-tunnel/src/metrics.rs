//! Counters of each service, and the optional local HTTP endpoint that
//! shows them: `/metrics` in the Prometheus text format (version 0.0.4),
//! `/status` (200, or 503 when a service's `connect` address cannot be
//! reached).
//!
//! Counters are atomics updated when a connection starts and ends, never
//! per frame: bytes are added when a connection ends. The endpoint answers
//! one request at a time, reads at most [`MAX_REQUEST`] bytes of it within
//! [`REQUEST_TIMEOUT`], and closes the connection after the answer. It has
//! no authentication: listen on a loopback address.

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use capnp_noise::admission::HandshakeSlots;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::socket::Plain;

/// The longest request read.
pub(crate) const MAX_REQUEST: usize = 8 * 1024;
/// How long a request may take to arrive.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `/status` waits for each service's `connect` address.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a handshake failed, as `/metrics` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No handshake slot within the handshake timeout.
    NoSlot,
    /// The handshake timed out.
    Timeout,
    /// The peer closed the connection during the handshake.
    Closed,
    /// The peer's identity proof or its bytes were invalid.
    Invalid,
    /// Anything else (an I/O error).
    Other,
}

impl Failure {
    const ALL: [Failure; 5] = [
        Failure::NoSlot,
        Failure::Timeout,
        Failure::Closed,
        Failure::Invalid,
        Failure::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Failure::NoSlot => "no_slot",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::Invalid => "invalid",
            Failure::Other => "other",
        }
    }

    /// The reason of a library error, by its `io::ErrorKind`.
    pub(crate) fn of(e: &capnp_noise::Error) -> Failure {
        match io::Error::from(e.clone()).kind() {
            io::ErrorKind::TimedOut => Failure::Timeout,
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Closed,
            io::ErrorKind::InvalidData | io::ErrorKind::PermissionDenied => Failure::Invalid,
            _ => Failure::Other,
        }
    }
}

/// One service's counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Connections accepted.
    pub(crate) accepted: AtomicU64,
    /// Connections open now (accepted, not ended).
    pub(crate) open: AtomicU64,
    /// Connections that reached forwarding.
    pub(crate) forwarded: AtomicU64,
    /// Plaintext bytes sent to the remote tunnel end, of ended connections.
    pub(crate) bytes_to_peer: AtomicU64,
    /// Plaintext bytes received from it, of ended connections.
    pub(crate) bytes_from_peer: AtomicU64,
    /// Handshakes failed, by [`Failure`].
    failed: [AtomicU64; 5],
    /// Peers refused by the service's policy.
    pub(crate) refused: AtomicU64,
    /// Connections closed because `connect` could not be reached.
    pub(crate) unreachable: AtomicU64,
    /// Client mode: handshakes that waited for a handshake slot.
    pub(crate) slot_waits: AtomicU64,
    /// Connections ended by the idle timeout.
    pub(crate) idle_timeouts: AtomicU64,
}

impl Counters {
    pub(crate) fn failed(&self, why: Failure) {
        self.failed[why as usize].fetch_add(1, Relaxed);
    }
}

/// What the endpoint shows of one service.
#[derive(Debug, Clone)]
pub(crate) struct Shown {
    pub(crate) name: String,
    pub(crate) connect: String,
    pub(crate) counters: Arc<Counters>,
    /// Server mode: the admission slots (their waits count).
    pub(crate) slots: Option<HandshakeSlots>,
}

/// A metric's name, type, help, and its counter.
type Counter = fn(&Counters) -> &AtomicU64;

/// `/metrics`: the Prometheus text format.
pub(crate) fn render(services: &[Shown]) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: &dyn Fn(&Shown, &mut String)| {
        let _ = writeln!(out, "# HELP capnp_noise_tunnel_{name} {help}");
        let _ = writeln!(out, "# TYPE capnp_noise_tunnel_{name} {kind}");
        for s in services {
            value(s, &mut out);
        }
    };
    /// The metrics with one sample per service.
    const SIMPLE: [(&str, &str, &str, Counter); 6] = [
        (
            "connections_open",
            "gauge",
            "Connections open now (handshaking or forwarding).",
            |c| &c.open,
        ),
        (
            "connections_accepted_total",
            "counter",
            "Connections accepted.",
            |c| &c.accepted,
        ),
        (
            "connections_total",
            "counter",
            "Connections that reached forwarding (authenticated, both sides connected).",
            |c| &c.forwarded,
        ),
        (
            "refused_total",
            "counter",
            "Peers refused by the service's policy (allow-list, pinned or known VatId).",
            |c| &c.refused,
        ),
        (
            "unreachable_total",
            "counter",
            "Connections closed because the connect address could not be reached.",
            |c| &c.unreachable,
        ),
        (
            "idle_timeouts_total",
            "counter",
            "Connections closed by the idle timeout.",
            |c| &c.idle_timeouts,
        ),
    ];
    for (name, kind, help, get) in SIMPLE {
        metric(name, kind, help, &|s, out| {
            let _ = writeln!(
                out,
                "capnp_noise_tunnel_{name}{{service=\"{}\"}} {}",
                s.name,
                get(&s.counters).load(Relaxed)
            );
        });
    }
    metric(
        "bytes_total",
        "counter",
        "Plaintext bytes to and from the remote tunnel end, counted when a connection ends.",
        &|s, out| {
            for (direction, n) in [
                ("to_peer", &s.counters.bytes_to_peer),
                ("from_peer", &s.counters.bytes_from_peer),
            ] {
                let _ = writeln!(
                    out,
                    "capnp_noise_tunnel_bytes_total{{service=\"{}\",direction=\"{direction}\"}} {}",
                    s.name,
                    n.load(Relaxed)
                );
            }
        },
    );
    metric(
        "handshakes_failed_total",
        "counter",
        "Handshakes that failed, by reason.",
        &|s, out| {
            for why in Failure::ALL {
                let _ = writeln!(
                    out,
                    "capnp_noise_tunnel_handshakes_failed_total{{service=\"{}\",reason=\"{}\"}} {}",
                    s.name,
                    why.label(),
                    s.counters.failed[why as usize].load(Relaxed)
                );
            }
        },
    );
    metric(
        "admission_waits_total",
        "counter",
        "Handshakes that waited for a handshake slot.",
        &|s, out| {
            let waited = s.counters.slot_waits.load(Relaxed)
                + s.slots.as_ref().map_or(0, |slots| slots.stats().waited);
            let _ = writeln!(
                out,
                "capnp_noise_tunnel_admission_waits_total{{service=\"{}\"}} {waited}",
                s.name
            );
        },
    );
    out
}

/// `/status`: each service's `connect` address, tried now (all at once).
async fn status(services: &[Shown]) -> (bool, String) {
    let mut probes = tokio::task::JoinSet::new();
    for (i, s) in services.iter().enumerate() {
        let (name, connect) = (s.name.clone(), s.connect.clone());
        probes.spawn(async move {
            let line = match tokio::time::timeout(PROBE_TIMEOUT, Plain::connect(&connect)).await {
                Ok(Ok(_)) => Ok(format!("{name} ok\n")),
                Ok(Err(e)) => Err(format!("{name} unreachable: {e}\n")),
                Err(_) => Err(format!(
                    "{name} unreachable: no answer within {PROBE_TIMEOUT:?}\n"
                )),
            };
            (i, line)
        });
    }
    let mut lines = probes.join_all().await;
    lines.sort_by_key(|(i, _)| *i);
    let all_ok = lines.iter().all(|(_, l)| l.is_ok());
    let body = lines
        .into_iter()
        .map(|(_, l)| l.unwrap_or_else(|e| e))
        .collect();
    (all_ok, body)
}

/// Serves the endpoint on `listener` until `stop`.
pub(crate) async fn serve(listener: TcpListener, services: Vec<Shown>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((s, _)) => {
                tokio::select! {
                    () = answer(s, &services) => {}
                    () = stop.cancelled() => return,
                }
            }
            Err(e) => {
                warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request and answers it.
async fn answer(mut s: TcpStream, services: &[Shown]) {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => len += n,
            }
        }
        true
    })
    .await;
    if !matches!(read, Ok(true)) {
        return;
    }
    let line = buf[..len].split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, path) = (words.next(), words.next());
    let (code, kind, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(services),
        ),
        (Some(b"GET"), Some(b"/status")) => match status(services).await {
            (true, body) => ("200 OK", "text/plain; charset=utf-8", body),
            (false, body) => ("503 Service Unavailable", "text/plain; charset=utf-8", body),
        },
        (Some(b"GET"), _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let head = format!(
        "HTTP/1.0 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        s.shutdown().await
    })
    .await;
}

/// Logs where the endpoint listens.
pub(crate) fn announce(addr: std::net::SocketAddr) {
    info!(%addr, "metrics and status endpoint listening (/metrics, /status)");
}
