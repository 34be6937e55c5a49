//! The transport allocates nothing per frame once warmed up, and an idle
//! session's buffers shrink to nothing (issue: performance targets).
//!
//! Allocation counts are deterministic, so this is a test, not a timing.
//! dhat's global allocator counts every heap allocation in this binary,
//! which is why this file holds a single test.

use capnp_noise::wire::{HandshakeConfig, ReadOutcome, Session, Suite};
use capnp_noise_test::fixtures::session_pair;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

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

#[test]
fn no_allocation_per_frame_and_idle_buffers_shrink() {
    let _profiler = dhat::Profiler::builder().testing().build();
    for suite in Suite::ALL {
        let mut config = HandshakeConfig::with_suite(suite);
        config.session.rekey_interval = 100; // rekeys happen inside the measured window
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
        let before = dhat::HeapStats::get();
        let mut moved = 0;
        for _ in 0..50 {
            for &n in &sizes {
                moved += pump(&mut a, &mut b, &data[..n], &mut large);
                moved += pump(&mut b, &mut a, &data[..n], &mut small);
            }
        }
        let after = dhat::HeapStats::get();
        let frames = moved / 65518 + 50 * sizes.len() * 2;
        assert_eq!(
            after.total_blocks - before.total_blocks,
            0,
            "{suite}: {} allocations while moving {moved} bytes in about {frames} frames",
            after.total_blocks - before.total_blocks
        );
        // Idle: buffers are released, well under 16 KiB per session.
        a.shrink_buffers();
        b.shrink_buffers();
        assert_eq!(a.buffer_capacity() + b.buffer_capacity(), 0);
        // And they grow back on demand.
        assert_eq!(pump(&mut a, &mut b, &data[..5000], &mut large), 5000);
    }
}
