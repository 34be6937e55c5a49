//! A hostile vat against a provider's heap (issue 15, item 1): a
//! `Vat.accept` of about 32 KB whose `Introduction` has 3000 pointer fields
//! all pointing at one 8 KiB blob would cost about 24 MiB per copy once the
//! sharing is undone (the canonical copy the signature is checked over).
//! The provider must refuse it as malformed from its size alone, before
//! copying, canonicalising or hashing anything.
//!
//! dhat's global allocator counts every Rust heap allocation of this binary
//! (both vats run in it), hence a single test in this file.

use std::time::Duration;

use capnp_noise::network::Network;
use capnp_noise::schema::network_capnp::HandoffError;
use capnp_noise::Identity;
use capnp_noise_test::hostile::RawVat;
use capnp_noise_test::support::{bounded, local};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Attack calls in flight at once, of each kind.
const CALLS: usize = 8;
/// Pointer fields of the crafted `Introduction`: the 3000 (24 MiB
/// once expanded, which the network's reader limit of 1 Mi words already
/// refuses) and 1000 (8 MB, under that limit: only the size check of the
/// contact stands in the way).
const POINTERS: [u16; 2] = [3000, 1000];
/// The shared blob's size.
const BLOB: u32 = 8192;
/// The most the provider's peak Rust heap may rise during the attack: the
/// messages themselves (16 x 32 KiB, read and buffered) and the RPC
/// bookkeeping, with room to spare; one expanded copy alone is 24 MiB.
const PEAK_BOUND: u64 = 4 << 20;

#[tokio::test(flavor = "current_thread")]
async fn a_completion_that_expands_through_shared_pointers_is_refused_before_any_copy() {
    let _profiler = dhat::Profiler::builder().testing().build();
    local(async {
        let carol = Network::builder(Identity::generate())
            .listen("127.0.0.1:0".parse().unwrap())
            .start()
            .await
            .unwrap();
        let mallory = Identity::generate();
        let mut raw = RawVat::connect(&mallory, carol.vat_id(), carol.local_addr().unwrap()).await;
        raw.hello().await;

        let before = dhat::HeapStats::get();
        let mut questions = Vec::new();
        for pointers in POINTERS {
            for _ in 0..CALLS {
                let (q, sent) = raw.accept_shared_blob(pointers, BLOB).await;
                assert!(sent < 33 * 1024, "the attack message has {sent} bytes");
                questions.push((q, pointers));
            }
        }
        for (q, pointers) in questions {
            let answer = bounded(
                "the provider's answer",
                Duration::from_secs(60),
                raw.accept_answer(q),
            )
            .await;
            assert_eq!(answer.error, HandoffError::Malformed, "{answer:?}");
            let why = if pointers == 3000 {
                "Read limit"
            } else {
                "words"
            };
            assert!(answer.reason.contains(why), "{pointers}: {}", answer.reason);
        }
        let after = dhat::HeapStats::get();
        let rise = (after.max_bytes as u64).saturating_sub(before.curr_bytes as u64);
        eprintln!(
            "{} attack calls: peak heap {} B above the {} B in use before",
            2 * CALLS,
            rise,
            before.curr_bytes
        );
        assert!(
            rise < PEAK_BOUND,
            "the provider's peak heap rose by {rise} bytes (bound {PEAK_BOUND})"
        );
        carol.shutdown().await;
    })
    .await;
}
