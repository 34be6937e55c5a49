//! Criterion benchmarks of the sans-IO core: handshakes per suite, and
//! transport seal/open per suite and message size. No sockets.
//!
//! `cargo bench --bench core`

use std::sync::Arc;

use capnp_noise::policy::{AnyVat, PeerContext};
use capnp_noise::wire::{Handshake, HandshakeConfig, ReadOutcome, Suite};
use capnp_noise::Identity;
use capnp_noise_test::fixtures::{drive, session_pair};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn handshakes(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake_in_memory");
    let (a, b) = (Identity::generate(), Identity::generate());
    for suite in Suite::ALL {
        g.bench_function(BenchmarkId::from_parameter(suite), |bench| {
            bench.iter(|| {
                let cfg = HandshakeConfig::with_suite(suite);
                let mut i =
                    Handshake::initiator(&a, Arc::new(AnyVat), PeerContext::default(), cfg.clone())
                        .unwrap();
                let mut r = Handshake::responder(&b, Arc::new(AnyVat), PeerContext::default(), cfg)
                    .unwrap();
                drive(&mut i, &mut r, usize::MAX).unwrap();
                (i.into_session().unwrap(), r.into_session().unwrap())
            })
        });
    }
    g.finish();
}

fn transport(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport_seal_open");
    for suite in Suite::ALL {
        for size in [64usize, 1024, 16 * 1024, 65518] {
            g.throughput(Throughput::Bytes(size as u64));
            let (mut i, mut r) = session_pair(suite, HandshakeConfig::with_suite(suite)).unwrap();
            let data = vec![0xa5u8; size];
            let mut out = vec![0u8; 65536];
            g.bench_function(BenchmarkId::new(suite.to_string(), size), |bench| {
                bench.iter(|| {
                    i.write(&data).unwrap();
                    i.flush().unwrap();
                    let mut got = 0;
                    // Usually one frame; a REKEY frame follows every 65536th.
                    while i.wants_write() {
                        let n = r.feed(i.pending_output());
                        i.consume_output(n);
                        while let ReadOutcome::Data(k) = r.read(&mut out).unwrap() {
                            got += k;
                        }
                    }
                    assert_eq!(got, size);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, handshakes, transport);
criterion_main!(benches);
