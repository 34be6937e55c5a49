//! The tokio stream allocates nothing per frame once warmed up, although it
//! releases its large buffers whenever it goes quiet (they go to the
//! thread's spares and come back), and idle connections hold only small
//! buffers.
//!
//! Allocation counts are deterministic, so this is a test, not a timing.
//! dhat's global allocator counts every heap allocation in this binary,
//! which is why this file holds a single test.

use std::sync::Arc;

use capnp_noise::stream::{self, NoiseStream, StreamConfig};
use capnp_noise::wire::{HandshakeConfig, Suite};
use capnp_noise::{Identity, Pinned};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

type Stream = NoiseStream<DuplexStream>;

/// `data` from `a` to `b` in `write`-byte writes and one flush, read with
/// `out`-sized reads; the two run concurrently, so the reader often finds
/// nothing to read (and releases its large buffers).
async fn one_way(a: &mut Stream, b: &mut Stream, data: &[u8], write: usize, out: &mut [u8]) {
    let w = async {
        for chunk in data.chunks(write) {
            a.write_all(chunk).await.unwrap();
        }
        a.flush().await.unwrap();
    };
    let r = async {
        let mut got = 0;
        while got < data.len() {
            let n = b.read(out).await.unwrap();
            assert!(n > 0);
            got += n;
        }
    };
    tokio::join!(w, r);
}

/// Small request/response messages, flushed one by one (an RPC pattern).
async fn messages(a: &mut Stream, b: &mut Stream, n: usize) {
    let mut msg = [3u8; 200];
    for _ in 0..n {
        a.write_all(&msg[..8]).await.unwrap();
        a.write_all(&msg[8..]).await.unwrap();
        a.flush().await.unwrap();
        b.read_exact(&mut msg).await.unwrap();
        b.write_all(&msg).await.unwrap();
        b.flush().await.unwrap();
        a.read_exact(&mut msg).await.unwrap();
    }
}

async fn workload(a: &mut Stream, b: &mut Stream, data: &[u8]) {
    let mut large = vec![0u8; 64 * 1024];
    let mut small = vec![0u8; 1000];
    one_way(a, b, data, 64 * 1024, &mut large).await;
    one_way(b, a, data, 64 * 1024, &mut small).await;
    one_way(a, b, data, 8 * 1024, &mut small).await;
    messages(a, b, 50).await;
}

#[test]
fn stream_allocates_nothing_per_frame_and_idle_connections_stay_small() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _profiler = dhat::Profiler::builder().testing().build();
    for suite in Suite::ALL {
        rt.block_on(async {
            let (x, y) = tokio::io::duplex(256 * 1024);
            let (ci, si) = (Identity::generate(), Identity::generate());
            let config = StreamConfig::default()
                .with_handshake(HandshakeConfig::with_suite(suite))
                .with_handshake_timeout(None);
            let (a, b) = tokio::join!(
                stream::connect(x, &ci, Arc::new(Pinned(si.vat_id())), config.clone()),
                stream::accept(y, &si, Arc::new(Pinned(ci.vat_id())), config)
            );
            let (mut a, mut b) = (a.unwrap(), b.unwrap());
            let data = vec![0x5au8; 1 << 20];
            // Warm up: buffers grow to their working size, spares fill.
            for _ in 0..2 {
                workload(&mut a, &mut b, &data).await;
            }
            let before = dhat::HeapStats::get();
            for _ in 0..5 {
                workload(&mut a, &mut b, &data).await;
            }
            let after = dhat::HeapStats::get();
            // 5 rounds of 3 MiB in frames of up to 64 KiB, and 500 messages.
            let allocations = after.total_blocks - before.total_blocks;
            let (workload_allocs, frames) = (allocations, 5 * (3 * 16 + 100));
            // The workload's own buffers (two Vecs per round) are the only
            // allocations: none per frame.
            assert_eq!(
                workload_allocs,
                5 * 2,
                "{suite}: {allocations} allocations for about {frames} frames"
            );
            // Idle after all that (a read finds nothing): only small
            // buffers are held.
            for s in [&mut a, &mut b] {
                let mut byte = [0u8; 1];
                let pending = futures::poll!(std::pin::pin!(s.read(&mut byte)));
                assert!(pending.is_pending());
                let held = s.session().buffer_capacity();
                assert!(held <= 3 * 4096, "{suite}: an idle end holds {held} bytes");
            }
        });
    }
}
