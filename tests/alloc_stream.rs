//! The tokio stream allocates nothing per frame once warmed up, although it
//! releases its large buffers whenever it goes quiet (they go to the
//! thread's spares and come back), and idle connections hold only small
//! buffers.
//!
//! What "nothing per frame" covers: over 5 rounds of the workload (about
//! 740 frames each way, no rekey: the default interval is 65536 frames),
//! the allocation calls on this thread, from Rust or C, are zero: dhat's
//! count of Rust blocks, and a count of every `malloc`, `calloc` and `realloc`
//! (`capnp_noise_test::count_heap_calls!`), which also sees aws-lc's
//! `OPENSSL_malloc` (an AEAD context rebuilt per frame would show there,
//! not in dhat). glibc's bytes in use (`mallinfo2`) do not grow. Rekeys,
//! which build new aws-lc keys, are covered by `alloc_steady_state.rs`.
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

capnp_noise_test::count_heap_calls!();

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

/// Reads into `large` (64 KiB) and `small` (1000 bytes) buffers of the
/// caller's, so that the workload itself allocates nothing.
async fn workload(a: &mut Stream, b: &mut Stream, data: &[u8], large: &mut [u8], small: &mut [u8]) {
    one_way(a, b, data, 64 * 1024, large).await;
    one_way(b, a, data, 64 * 1024, small).await;
    one_way(a, b, data, 8 * 1024, small).await;
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
            let (mut large, mut small) = (vec![0u8; 64 * 1024], vec![0u8; 1000]);
            // Warm up: buffers grow to their working size, spares fill.
            for _ in 0..2 {
                workload(&mut a, &mut b, &data, &mut large, &mut small).await;
            }
            let before = dhat::HeapStats::get();
            let (calls, bytes) = (heap_calls::on_this_thread(), heap_calls::in_use());
            for _ in 0..5 {
                workload(&mut a, &mut b, &data, &mut large, &mut small).await;
            }
            let after = dhat::HeapStats::get();
            let calls = heap_calls::on_this_thread() - calls;
            let grown = heap_calls::in_use() as i64 - bytes as i64;
            // 5 rounds of 3 MiB in frames of up to 64 KiB, and 500 messages.
            let allocations = after.total_blocks - before.total_blocks;
            let frames = 5 * (3 * 16 + 100);
            // Not one allocation, Rust's or C's: none per frame.
            assert_eq!(
                (allocations, calls),
                (0, 0),
                "{suite}: (Rust blocks, allocation calls with C) for about {frames} frames"
            );
            assert_eq!(grown, 0, "{suite}: the heap grew by {grown} bytes");
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
