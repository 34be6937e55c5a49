//! Heap held per connection over loopback TCP: established connections
//! gone idle, and server-side handshakes stalled by their initiator (SPEC.md
//! section 9: implementations bound the memory held per connection; the
//! project targets at most 16 KiB per idle connection).
//!
//! dhat's global allocator counts every Rust heap allocation of this binary
//! (hence a single test in this file); the figures are bytes in use,
//! deterministic for a given build. C allocations (aws-lc's AEAD and key
//! contexts) are not seen by it. Counted once with glibc's `mallinfo2`
//! instead (all malloc'd bytes, C and chunk headers included; not part of
//! this test, which would need `unsafe`): accepted TCP 324 B, idle end
//! 2180 B, handshake stalled before the preamble 1858 B, after message 1
//! 4998 B per connection: aws-lc adds about 1.2 KiB to an established end
//! and 2.3 KiB to a handshake past message 1.

use std::future::{poll_fn, Future};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use capnp_noise::stream::{self, Handshaking, NoiseStream, StreamConfig};
use capnp_noise::wire::{payload, Handshake, HandshakeConfig};
use capnp_noise::{AnyVat, Identity, PeerContext, Pinned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Connections per measurement.
const N: usize = 200;

/// Rust heap bytes in use now.
fn live() -> i64 {
    dhat::HeapStats::get().curr_bytes as i64
}

/// Lets the runtime turn a few times: tokio frees the registrations of
/// dropped sockets on a later turn of its I/O driver, which must not land
/// in the next measurement.
async fn settle() {
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Long enough that no handshake times out while it is measured.
fn config() -> StreamConfig {
    StreamConfig::default().with_handshake_timeout(Some(Duration::from_secs(60)))
}

/// `len` bytes from `a` to `b`, read concurrently in 16 KiB reads.
async fn one_way(a: &mut NoiseStream<TcpStream>, b: &mut NoiseStream<TcpStream>, len: usize) {
    let data = vec![0x5au8; len];
    let w = async {
        a.write_all(&data).await.unwrap();
        a.flush().await.unwrap();
    };
    let r = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut got = 0;
        while got < len {
            got += b.read(&mut buf).await.unwrap();
        }
    };
    tokio::join!(w, r);
}

/// An established pair that exchanged a small message and 64 KiB each way,
/// then went idle: a read is pending on both ends (as on an idle RPC
/// connection), which releases the buffers that grew.
async fn idle_pair(
    listener: &TcpListener,
    server: &Identity,
    client: &Identity,
) -> (NoiseStream<TcpStream>, NoiseStream<TcpStream>) {
    let addr = listener.local_addr().unwrap();
    let (c, s) = tokio::join!(
        async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            stream::connect(tcp, client, Arc::new(Pinned(server.vat_id())), config()).await
        },
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            stream::accept(tcp, server, Arc::new(Pinned(client.vat_id())), config()).await
        },
    );
    let (mut c, mut s) = (c.unwrap(), s.unwrap());
    let mut ping = [7u8; 100];
    c.write_all(&ping).await.unwrap();
    c.flush().await.unwrap();
    s.read_exact(&mut ping).await.unwrap();
    one_way(&mut c, &mut s, 64 * 1024).await;
    one_way(&mut s, &mut c, 64 * 1024).await;
    for end in [&mut c, &mut s] {
        let mut byte = [0u8; 1];
        let read = futures::poll!(std::pin::pin!(end.read(&mut byte)));
        assert!(read.is_pending(), "an idle end had something to read");
    }
    (c, s)
}

/// An attacker: connects (std, blocking: no Rust heap), sends `first` and
/// then nothing.
fn attacker(addr: SocketAddr, first: &[u8]) -> std::net::TcpStream {
    let mut a = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    a.write_all(first).unwrap();
    a.set_nonblocking(true).unwrap();
    a
}

/// `N` accepted TCP connections with nothing else: the baseline.
async fn accepted_tcp(listener: &TcpListener) -> i64 {
    let addr = listener.local_addr().unwrap();
    let mut attackers = Vec::with_capacity(N);
    settle().await;
    let before = live();
    let mut held = Vec::with_capacity(N);
    for _ in 0..N {
        // One at a time: the listen backlog may be as short as 128.
        attackers.push(attacker(addr, &[]));
        held.push(listener.accept().await.unwrap().0);
    }
    (live() - before) / N as i64
}

/// Accepts a connection from each of `N` attackers, which send their
/// `flights` (empty, or a preamble and message 1) and then nothing, and
/// starts a responder's handshake on each, polling them (the timeout, the
/// read) until every attacker has received `reply_len` bytes. Returns the
/// heap bytes held per connection.
async fn stalled_handshakes(
    listener: &TcpListener,
    server: &Identity,
    flights: &[Vec<u8>],
    reply_len: usize,
) -> i64 {
    let addr = listener.local_addr().unwrap();
    let mut attackers = Vec::with_capacity(flights.len());
    let mut reply = vec![0u8; 8192];
    settle().await;
    let before = live();
    let mut held: Vec<Handshaking<TcpStream>> = Vec::with_capacity(flights.len());
    for flight in flights {
        attackers.push(attacker(addr, flight));
        let (tcp, _) = listener.accept().await.unwrap();
        held.push(stream::accept(tcp, server, Arc::new(AnyVat), config()));
    }
    let waiting = async {
        loop {
            poll_fn(|cx| {
                for hs in held.iter_mut() {
                    if let Poll::Ready(r) = Pin::new(hs).poll(cx) {
                        panic!("a stalled handshake ended: {r:?}");
                    }
                }
                Poll::Ready(())
            })
            .await;
            let answered = attackers
                .iter_mut()
                .filter(|a| a.peek(&mut reply).unwrap_or(0) >= reply_len)
                .count();
            if answered == attackers.len() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the handshakes progressed");
    let per = (live() - before) / flights.len() as i64;
    drop(held);
    // What the server sent, if anything, was exactly message 2.
    for a in attackers.iter_mut() {
        a.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        a.read_to_end(&mut got).unwrap_or_default();
        assert!(got.len() <= reply_len, "{} bytes", got.len());
    }
    per
}

/// Rust heap per connection, measured on one build (x86-64 Linux, tokio
/// 1.54, test profile; 200 connections each, the same figures on every
/// run). Each figure includes the socket's tokio registration and the
/// value itself (a `NoiseStream` or `Handshaking` future, as a server's
/// task would hold it):
///
/// | state | measured | bound |
/// |---|---:|---:|
/// | accepted TCP socket alone (baseline, not asserted) | 296 B | - |
/// | idle established connection end (after 64 KiB each way) | 1016 B | 1270 B |
/// | (a) handshake stalled before the preamble | 1104 B | 1380 B |
/// | (b) handshake stalled after message 1 (server waits for message 3) | 2891 B | 3615 B |
///
/// Each bound is 25 % above the figure measured, and all are far under the
/// project's 16 KiB per idle connection. In (a), 672 B are the
/// `Handshaking` future's own size; the Noise state (about 1 KiB, boxed)
/// exists only from message 1 on. Before the Noise state was boxed and
/// built only at message 1, (a) was 1768 B (the future alone 1336 B).
/// The idle end grew by 96 B with the `openssl-chacha` feature (a key
/// copy and a context slot per direction; OpenSSL's context itself is C
/// heap, made only for frames of 4 KiB or more).
#[test]
fn heap_per_idle_connection_and_per_stalled_handshake() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _profiler = dhat::Profiler::builder().testing().build();
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (server, client) = (Identity::generate(), Identity::generate());
        // Warm up: one-time allocations (the runtime's, the thread's spare
        // buffers) happen before any measurement.
        let warm = idle_pair(&listener, &server, &client).await;
        drop(warm);

        let tcp = accepted_tcp(&listener).await;

        settle().await;
        let before = live();
        let mut pairs = Vec::with_capacity(N);
        for _ in 0..N {
            pairs.push(idle_pair(&listener, &server, &client).await);
        }
        let idle = (live() - before) / (2 * N) as i64;
        drop(pairs);

        // (a) Connected, nothing sent.
        let silent = stalled_handshakes(&listener, &server, &vec![Vec::new(); N], 0).await;

        // (b) A genuine preamble and message 1, then nothing.
        let flights: Vec<Vec<u8>> = (0..N)
            .map(|_| {
                let initiator = Handshake::initiator(
                    &client,
                    Arc::new(AnyVat),
                    PeerContext::initiator(None, None),
                    HandshakeConfig::default(),
                )
                .unwrap();
                initiator.pending_output().to_vec()
            })
            .collect();
        // Message 2: e, encrypted s and tag, the server's payload and tag.
        let signature = server.sign(&payload::binding_message(server.noise_static_public()));
        let msg2_len = 2 + 32 + 48 + payload::encode(&server.vat_id(), &signature).len() + 16;
        let after_msg1 = stalled_handshakes(&listener, &server, &flights, msg2_len).await;
        drop(flights);

        eprintln!(
            "Rust heap per connection ({N} each): accepted TCP {tcp} B, idle end {idle} B, \
             handshake stalled before the preamble {silent} B, after message 1 {after_msg1} B; \
             a Handshaking future is {} B inline, a NoiseStream {} B",
            std::mem::size_of::<Handshaking<TcpStream>>(),
            std::mem::size_of::<NoiseStream<TcpStream>>()
        );
        assert!(tcp > 0 && idle > tcp && silent > tcp && after_msg1 > silent);
        assert!(idle <= 1270, "idle end: {idle} B");
        assert!(silent <= 1380, "stalled before the preamble: {silent} B");
        assert!(
            after_msg1 <= 3615,
            "stalled after message 1: {after_msg1} B"
        );
    });
}
