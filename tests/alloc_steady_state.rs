//! The transport allocates nothing per frame once warmed up, C included,
//! and an idle session's buffers shrink to nothing (issue: performance
//! targets).
//!
//! What "nothing" covers, per measured window:
//! * frames (rekeys off): zero allocation calls on this thread, from Rust
//!   or C: dhat's count of Rust blocks, and a count of every `malloc`,
//!   `calloc` and `realloc` (`capnp_noise_test::count_heap_calls!`), which
//!   sees aws-lc's `OPENSSL_malloc` that dhat cannot; and glibc's bytes in
//!   use (`mallinfo2`) unchanged;
//! * frames with a rekey every 100 frames: still zero Rust blocks, and no
//!   C heap growth;
//! * explicit rekeys: each builds new aws-lc keys, so a rekey may allocate
//!   (C only), but every rekey exactly as much as the first one, whatever
//!   the frames between them, and without growing the heap.
//!
//! Allocation counts are deterministic, so this is a test, not a timing.
//! dhat's global allocator counts every heap allocation in this binary,
//! which is why this file holds a single test.

use capnp_noise::wire::{HandshakeConfig, ReadOutcome, Session, Suite};
use capnp_noise_test::fixtures::session_pair;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

capnp_noise_test::count_heap_calls!();

fn pump(tx: &mut Session, rx: &mut Session, data: &[u8], out: &mut [u8]) -> usize {
    let mut sent = 0;
    let mut got = 0;
    while sent < data.len() {
        sent += tx.write(&data[sent..]).unwrap();
        if sent == data.len() {
            tx.flush().unwrap();
        }
        while tx.wants_write() {
            let n = rx.feed(tx.pending_output());
            tx.consume_output(n);
            while let ReadOutcome::Data(k) = rx.read(out).unwrap() {
                got += k;
            }
        }
    }
    got
}

/// Allocations while `f` runs: Rust blocks (dhat), every allocation call
/// on this thread (Rust or C), and the change of glibc's bytes in use.
fn allocations<R>(f: impl FnOnce() -> R) -> (u64, u64, i64, R) {
    let (rust, calls, bytes) = (
        dhat::HeapStats::get().total_blocks,
        heap_calls::on_this_thread(),
        heap_calls::in_use(),
    );
    let out = f();
    (
        dhat::HeapStats::get().total_blocks - rust,
        heap_calls::on_this_thread() - calls,
        heap_calls::in_use() as i64 - bytes as i64,
        out,
    )
}

#[test]
fn no_allocation_per_frame_and_idle_buffers_shrink() {
    let _profiler = dhat::Profiler::builder().testing().build();
    for suite in Suite::ALL {
        for rekey_interval in [u64::MAX, 100] {
            let mut config = HandshakeConfig::with_suite(suite);
            config.session.rekey_interval = rekey_interval;
            let (mut a, mut b) = session_pair(suite, config).unwrap();
            // Mixed sizes: tiny messages, partial frames, and frames larger than the reader's buffer.
            let sizes = [1usize, 100, 4000, 65518, 70_000, 200_000];
            let data = vec![0x5au8; 200_000];
            let mut small = vec![0u8; 1000];
            let mut large = vec![0u8; 70_000];
            // Warm up: buffers grow to their working size. Twice, because the
            // two send buffers swap roles (a long frame becomes the output
            // buffer without a copy), so each meets the largest need once.
            for _ in 0..2 {
                for &n in &sizes {
                    assert_eq!(pump(&mut a, &mut b, &data[..n], &mut large), n);
                    assert_eq!(pump(&mut b, &mut a, &data[..n], &mut small), n);
                }
            }
            let (rust, calls, bytes, moved) = allocations(|| {
                let mut moved = 0;
                for _ in 0..50 {
                    for &n in &sizes {
                        moved += pump(&mut a, &mut b, &data[..n], &mut large);
                        moved += pump(&mut b, &mut a, &data[..n], &mut small);
                    }
                }
                moved
            });
            let frames = moved / 65518 + 50 * sizes.len() * 2;
            let what = format!("{suite}, rekey every {rekey_interval} frames: about {frames} frames, {moved} bytes");
            assert_eq!(rust, 0, "{what}: {rust} Rust allocations");
            assert_eq!(bytes, 0, "{what}: the heap grew by {bytes} bytes");
            // Explicit rekeys, a message after each (so that the receiver
            // rekeys too): each costs what the first one did.
            let mut rekey_and_send = || {
                allocations(|| {
                    a.rekey().unwrap();
                    assert_eq!(pump(&mut a, &mut b, &data[..4000], &mut large), 4000);
                })
            };
            let (_, first, _, ()) = rekey_and_send();
            assert!(
                (1..=8).contains(&first),
                "{suite}: one rekey (both ends) took {first} allocation calls"
            );
            if rekey_interval == u64::MAX {
                assert_eq!(calls, 0, "{what}: {calls} allocation calls (C included)");
            } else {
                // At most one rekey per 100 frames of each direction (about
                // 14 here, 2 calls each as measured): whole rekeys, nothing
                // per frame.
                let rekeys = frames as u64 / 100 + 2;
                assert!(
                    calls % first == 0 && calls <= rekeys * first,
                    "{what}: {calls} allocation calls, more than {rekeys} rekeys of {first}"
                );
            }
            for i in 0..20 {
                let (rust, calls, bytes, ()) = rekey_and_send();
                assert_eq!(
                    (rust, calls, bytes),
                    (0, first, 0),
                    "{suite}: rekey {i}: Rust blocks, allocation calls, heap growth"
                );
            }
            // Idle: buffers are released, well under 16 KiB per session.
            a.shrink_buffers();
            b.shrink_buffers();
            assert_eq!(a.buffer_capacity() + b.buffer_capacity(), 0);
            // And they grow back on demand.
            assert_eq!(pump(&mut a, &mut b, &data[..5000], &mut large), 5000);
        }
    }
}
