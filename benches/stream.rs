//! Criterion benchmarks of [`NoiseStream`] on tokio: bulk transfer and a
//! small-message round trip, per suite, over an in-memory pipe
//! (`tokio::io::duplex`) and over loopback TCP, both ends on one
//! current-thread runtime. For the side-by-side comparison with TLS and
//! plain TCP see `benches/compare.rs`.
//!
//! `cargo bench --bench stream`

use std::sync::Arc;
use std::time::{Duration, Instant};

use capnp_noise::stream::{self, NoiseStream, StreamConfig};
use capnp_noise::wire::{HandshakeConfig, Suite};
use capnp_noise::{Identity, Pinned};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

const BULK: usize = 1 << 20;
const WRITE: usize = 64 * 1024;
const SMALL: usize = 64;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A connected pair (client, server) over `a` and `b`.
async fn pair<S>(a: S, b: S, suite: Suite) -> (NoiseStream<S>, NoiseStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (ci, si) = (Identity::generate(), Identity::generate());
    let config = StreamConfig::default().with_handshake(HandshakeConfig::with_suite(suite));
    let (c, s) = tokio::join!(
        stream::connect(a, &ci, Arc::new(Pinned(si.vat_id())), config.clone()),
        stream::accept(b, &si, Arc::new(Pinned(ci.vat_id())), config)
    );
    (c.unwrap(), s.unwrap())
}

async fn tcp_pair(
    suite: Suite,
) -> (
    NoiseStream<tokio::net::TcpStream>,
    NoiseStream<tokio::net::TcpStream>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (a, b) = (a.unwrap(), b.unwrap().0);
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    pair(a, b, suite).await
}

/// `BULK` bytes from `c` to `s` in 64 KiB writes, read with `sink` (64 KiB,
/// or `CAPNP_NOISE_BENCH_READ` bytes: a reader's buffer smaller than a frame
/// makes the session decrypt in place, then copy out).
async fn bulk<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut NoiseStream<S>,
    s: &mut NoiseStream<S>,
    data: &[u8],
    sink: &mut [u8],
) {
    let w = async {
        for chunk in data.chunks(WRITE) {
            c.write_all(chunk).await.unwrap();
        }
        c.flush().await.unwrap();
    };
    let r = async {
        let mut got = 0;
        while got < data.len() {
            got += s.read(sink).await.unwrap();
        }
    };
    tokio::join!(w, r);
}

/// One `SMALL`-byte message each way.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut NoiseStream<S>,
    s: &mut NoiseStream<S>,
    msg: &mut [u8; SMALL],
) {
    c.write_all(msg).await.unwrap();
    c.flush().await.unwrap();
    s.read_exact(msg).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    c.read_exact(msg).await.unwrap();
}

fn timed<S, F>(
    rt: &Runtime,
    pair: &mut (NoiseStream<S>, NoiseStream<S>),
    iters: u64,
    mut f: F,
) -> Duration
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: AsyncFnMut(&mut NoiseStream<S>, &mut NoiseStream<S>),
{
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            f(&mut pair.0, &mut pair.1).await;
        }
        start.elapsed()
    })
}

fn streams(c: &mut Criterion) {
    let rt = runtime();
    let data = vec![0x5au8; BULK];
    let read = std::env::var("CAPNP_NOISE_BENCH_READ")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(WRITE);
    let mut sink = vec![0u8; read];
    let mut g = c.benchmark_group("stream_bulk_1MiB");
    g.throughput(Throughput::Bytes(BULK as u64));
    for suite in Suite::ALL {
        let mut duplex = rt.block_on(async {
            let (a, b) = tokio::io::duplex(256 * 1024);
            pair(a, b, suite).await
        });
        g.bench_function(BenchmarkId::new("duplex", suite), |b| {
            b.iter_custom(|iters| {
                timed(&rt, &mut duplex, iters, async |c, s| {
                    bulk(c, s, &data, &mut sink).await
                })
            })
        });
        let mut tcp = rt.block_on(tcp_pair(suite));
        g.bench_function(BenchmarkId::new("loopback_tcp", suite), |b| {
            b.iter_custom(|iters| {
                timed(&rt, &mut tcp, iters, async |c, s| {
                    bulk(c, s, &data, &mut sink).await
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("stream_round_trip_64B");
    for suite in Suite::ALL {
        let mut msg = [7u8; SMALL];
        let mut duplex = rt.block_on(async {
            let (a, b) = tokio::io::duplex(64 * 1024);
            pair(a, b, suite).await
        });
        g.bench_function(BenchmarkId::new("duplex", suite), |b| {
            b.iter_custom(|iters| {
                timed(&rt, &mut duplex, iters, async |c, s| {
                    round_trip(c, s, &mut msg).await
                })
            })
        });
        let mut tcp = rt.block_on(tcp_pair(suite));
        g.bench_function(BenchmarkId::new("loopback_tcp", suite), |b| {
            b.iter_custom(|iters| {
                timed(&rt, &mut tcp, iters, async |c, s| {
                    round_trip(c, s, &mut msg).await
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, streams);
criterion_main!(benches);
