//! Criterion benchmarks of Cap'n Proto RPC over capnp-noise on loopback
//! TCP: echo calls one at a time, 64 in flight, and 64 KiB payloads with 64
//! in flight, per suite. The server runs on its own thread (a
//! current-thread runtime and a `LocalSet`, as capnp-rpc wants). For the
//! side-by-side comparison with capnp-rpc over plain TCP and over TLS see
//! `benches/compare.rs`.
//!
//! `cargo bench --bench rpc`

use capnp_noise_test::office;

use std::sync::Arc;
use std::time::Instant;

use capnp_noise::rpc::{self, ClientConfig, ServerConfig};
use capnp_noise::wire::{HandshakeConfig, Suite};
use capnp_noise::{Identity, Pinned};
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::task::LocalSet;

const IN_FLIGHT: usize = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Starts a server thread for `suite`; returns its address and identity.
fn server(suite: Suite, client: &Identity) -> (std::net::SocketAddr, Identity) {
    let id = Identity::generate();
    let (tx, rx) = std::sync::mpsc::channel();
    let (server_id, allowed) = (id.clone(), Pinned(client.vat_id()));
    std::thread::spawn(move || {
        let rt = runtime();
        LocalSet::new().block_on(&rt, async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let mut options = ServerConfig::default();
            options.handshake = HandshakeConfig::with_suite(suite);
            rpc::serve(
                listener,
                server_id,
                Arc::new(allowed),
                options,
                office::Office::bootstrap,
            )
            .await;
        });
    });
    (rx.recv().unwrap(), id)
}

async fn call(office: &office_capnp::Client, data: &[u8]) {
    let mut req = office.echo_request();
    req.get().set_data(data);
    let reply = req.send().promise.await.unwrap();
    assert_eq!(reply.get().unwrap().get_data().unwrap().len(), data.len());
}

async fn calls(office: &office_capnp::Client, data: &[u8], n: u64, in_flight: usize) {
    let mut pending = FuturesUnordered::new();
    let mut started = 0;
    while started < n || !pending.is_empty() {
        while started < n && pending.len() < in_flight {
            pending.push(call(office, data));
            started += 1;
        }
        pending.next().await;
    }
}

fn rpc_calls(c: &mut Criterion) {
    let rt = runtime();
    let local = LocalSet::new();
    let me = Identity::generate();
    for (name, size, in_flight) in [
        ("rpc_sequential_16B", 16, 1),
        ("rpc_64_in_flight_16B", 16, IN_FLIGHT),
        ("rpc_64_in_flight_64KiB", 64 * 1024, IN_FLIGHT),
    ] {
        let mut g = c.benchmark_group(name);
        if size > 16 {
            g.throughput(Throughput::Bytes(size as u64));
        } else {
            g.throughput(Throughput::Elements(1));
        }
        let data = vec![0xa5u8; size];
        for suite in Suite::ALL {
            let (addr, server_id) = server(suite, &me);
            let office: office_capnp::Client = local.block_on(&rt, async {
                let mut options = ClientConfig::default();
                options.handshake = HandshakeConfig::with_suite(suite);
                let (office, connection) =
                    rpc::connect(addr, &me, Arc::new(Pinned(server_id.vat_id())), options)
                        .await
                        .unwrap();
                std::mem::forget(connection); // lives as long as the benchmark
                office
            });
            g.bench_function(BenchmarkId::from_parameter(suite), |b| {
                b.iter_custom(|iters| {
                    local.block_on(&rt, async {
                        let start = Instant::now();
                        calls(&office, &data, iters, in_flight).await;
                        start.elapsed()
                    })
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, rpc_calls);
criterion_main!(benches);
