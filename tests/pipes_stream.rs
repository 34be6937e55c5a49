//! Noise Pipes (SPEC.md 14) through the tokio adapter: `stream::connect_resuming`
//! with a `ResumptionCache`, and `stream::accept` with `StreamConfig::resumption`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use capnp_noise::policy::{AnyVat, Pinned};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::wire::{
    EarlyData, EarlyDataChoice, EarlyDataOutcome, ResumptionCache, ResumptionConfig,
    EOF_BEFORE_MESSAGE_2,
};
use capnp_noise::{Error, Identity, VatId};

/// The client (Ed25519 seed 01..01) resuming with `server` over `io`,
/// pinned to it, sending `early` as early data.
fn client_connect(
    io: tokio::io::DuplexStream,
    cache: &Arc<ResumptionCache>,
    server: VatId,
    early: &[u8],
) -> stream::Handshaking<tokio::io::DuplexStream> {
    stream::connect_resuming(
        io,
        &Identity::from_seed(&[0x01; 32]),
        Arc::new(Pinned(server)),
        StreamConfig::default(),
        cache.clone(),
        &server,
        Some(EarlyData::replayable_not_forward_secret(early)),
    )
}

fn server_identity(static_key: u8) -> Identity {
    Identity::from_seed_and_static_key(&[0x02; 32], &[static_key; 32])
}

/// One connection: the client resumes if it can, sending `early`; the
/// server reads `early.len()` bytes and answers "answer". Returns what the
/// server read and whether the client's handshake was IK without fallback.
async fn connection(
    cache: &Arc<ResumptionCache>,
    server: &Identity,
    resumption: ResumptionConfig,
    early: &[u8],
) -> Vec<u8> {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_id = server.vat_id();
    let config = StreamConfig::default().with_resumption(resumption);
    let server = server.clone();
    let n = early.len();
    let srv = tokio::spawn(async move {
        let mut s = stream::accept(b, &server, Arc::new(AnyVat), config)
            .await
            .unwrap();
        let mut got = vec![0u8; n];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(b"answer").await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let mut c = client_connect(a, cache, server_id, early).await.unwrap();
    // The client only reads: the early data must be on its way already.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
        .await
        .expect("the server answers: it got the early data")
        .unwrap();
    assert_eq!(answer, b"answer");
    srv.await.unwrap()
}

fn ik_and_early() -> ResumptionConfig {
    ResumptionConfig::default()
        .with_accept_ik(true)
        .with_accept_early_data(true)
}

#[tokio::test]
async fn the_cache_fills_then_resumes_then_follows_a_key_change() {
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    let id = server.vat_id();
    // No record: XX, early data after the handshake; the record is kept.
    assert_eq!(
        connection(&cache, &server, ik_and_early(), b"call 1").await,
        b"call 1"
    );
    let first = cache.get(&id).expect("recorded after XX");
    // With the record: IK with early data.
    assert_eq!(
        connection(&cache, &server, ik_and_early(), b"call 2").await,
        b"call 2"
    );
    assert_eq!(cache.get(&id), Some(first.clone()));
    // Early data refused: sent again after the handshake.
    let refuse = ResumptionConfig::default().with_accept_ik(true);
    assert_eq!(
        connection(&cache, &server, refuse, b"call 3").await,
        b"call 3"
    );
    // IK off at the server (the default): the fallback, which authenticates
    // the very key of the record: the server does not answer IK, so the
    // record is forgotten and the next connection runs XX (SPEC.md 14.6).
    assert_eq!(
        connection(&cache, &server, ResumptionConfig::default(), b"call 4").await,
        b"call 4"
    );
    assert!(
        cache.get(&id).is_none(),
        "forgotten after a same-key fallback"
    );
    assert_eq!(
        connection(&cache, &server, ik_and_early(), b"call 4b").await,
        b"call 4b"
    );
    assert_eq!(cache.get(&id), Some(first.clone()), "recorded again by XX");
    // The server restarts with a new static key: fallback, record replaced.
    let restarted = server_identity(0x23);
    assert_eq!(
        connection(&cache, &restarted, ik_and_early(), b"call 5").await,
        b"call 5"
    );
    let second = cache.get(&id).expect("still recorded");
    assert_ne!(second.static_key(), first.static_key());
    assert_eq!(cache.len(), 1);
}

/// A cache that knows the server (after one connection), and the client's
/// end of a stream to a revision 1.1 responder: it reads the preamble, does
/// not know the IK name, and closes without a word (the task ends then).
async fn known_server_now_of_revision_1_1() -> (
    Arc<ResumptionCache>,
    VatId,
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<()>,
) {
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    let id: VatId = server.vat_id();
    connection(&cache, &server, ik_and_early(), b"x").await;
    assert!(cache.get(&id).is_some());
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let old = tokio::spawn(async move {
        let mut head = [0u8; 13];
        b.read_exact(&mut head).await.unwrap();
        drop(b);
    });
    (cache, id, a, old)
}

#[tokio::test]
async fn a_silent_close_after_ik_message_1_forgets_the_record() {
    let (cache, id, a, old) = known_server_now_of_revision_1_1().await;
    let e = client_connect(a, &cache, id, b"x").await.unwrap_err();
    old.await.unwrap();
    assert!(
        matches!(e, Error::UnexpectedEof { during } if during == EOF_BEFORE_MESSAGE_2),
        "{e}"
    );
    assert!(cache.get(&id).is_none(), "the next connection runs XX");
}

#[tokio::test]
async fn early_data_too_large_is_refused_whether_or_not_the_server_is_known() {
    let cache = Arc::new(ResumptionCache::new(4));
    let (a, _b) = tokio::io::duplex(64);
    let id = server_identity(0x22).vat_id();
    let e = stream::connect_resuming(
        a,
        &Identity::from_seed(&[0x01; 32]),
        Arc::new(AnyVat),
        StreamConfig::default(),
        cache,
        &id,
        Some(EarlyData::replayable_not_forward_secret(vec![0u8; 5000])),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
}

/// Relays bytes between `a` and `b`, counting flights: a flight starts each
/// time bytes move in the other direction than the last bytes did.
async fn counting_relay(
    a: tokio::io::DuplexStream,
    b: tokio::io::DuplexStream,
    flights: Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::Ordering;
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut last: Option<bool> = None;
    let (mut x, mut y) = ([0u8; 8192], [0u8; 8192]);
    loop {
        let (to_b, n) = tokio::select! {
            r = ar.read(&mut x) => (true, r.unwrap_or(0)),
            r = br.read(&mut y) => (false, r.unwrap_or(0)),
        };
        if n == 0 {
            return;
        }
        if last != Some(to_b) {
            flights.fetch_add(1, Ordering::SeqCst);
            last = Some(to_b);
        }
        let ok = if to_b {
            bw.write_all(&x[..n]).await
        } else {
            aw.write_all(&y[..n]).await
        };
        if ok.is_err() {
            return;
        }
    }
}

/// How the client of [`flights_through_the_adapter`] connects.
#[derive(Clone, Copy)]
enum Client {
    /// `stream::connect_resuming`, "call" as early data where it can.
    Resuming,
    /// `stream::connect_lazy`: first a read shorter than its lazy start wait
    /// (nothing may be sent), then "call" written and flushed.
    Lazy(EarlyDataChoice),
}

/// Flights through the tokio adapter (no extra flush or wait costs a round
/// trip): the client sends "call", the server answers "answer" as soon as
/// it has read it. Returns the flights before the client's first write (0
/// but for a lazy client that sent too soon) and to the first answer.
async fn flights_through_the_adapter(
    cache: &Arc<ResumptionCache>,
    server: &Identity,
    resumption: ResumptionConfig,
    client: Client,
) -> (usize, usize) {
    use std::sync::atomic::Ordering;
    let (c, relay_c) = tokio::io::duplex(64 * 1024);
    let (relay_s, s) = tokio::io::duplex(64 * 1024);
    let flights = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let relay = tokio::spawn(counting_relay(relay_c, relay_s, flights.clone()));
    let server_id = server.vat_id();
    let server = server.clone();
    let config = StreamConfig::default().with_resumption(resumption);
    let srv = tokio::spawn(async move {
        let mut s = stream::accept(s, &server, Arc::new(AnyVat), config)
            .await
            .unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"call");
        s.write_all(b"answer").await.unwrap();
        s.flush().await.unwrap();
        s
    });
    let mut answer = [0u8; 6];
    let (before, mut c): (usize, Box<dyn AsyncStream>) = match client {
        Client::Resuming => (
            0,
            Box::new(client_connect(c, cache, server_id, b"call").await.unwrap()),
        ),
        Client::Lazy(early) => {
            let mut c = lazy_client(c, cache, server_id, early);
            let short = Duration::from_millis(10);
            let read = tokio::time::timeout(short, c.read_exact(&mut answer)).await;
            assert!(read.is_err(), "nothing to read before the first write");
            tokio::time::sleep(Duration::from_millis(5)).await;
            let before = flights.load(Ordering::SeqCst);
            c.write_all(b"call").await.unwrap();
            c.flush().await.unwrap();
            (before, Box::new(c))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(&answer, b"answer");
    let n = flights.load(Ordering::SeqCst);
    drop(c);
    drop(srv.await.unwrap());
    relay.abort();
    (before, n)
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

#[tokio::test]
async fn flights_to_the_first_answer_through_the_adapter() {
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    let flights = |server, resumption| {
        let cache = cache.clone();
        async move {
            flights_through_the_adapter(&cache, server, resumption, Client::Resuming)
                .await
                .1
        }
    };
    let xx = flights(&server, ik_and_early()).await;
    let ik_early = flights(&server, ik_and_early()).await;
    let refuse = ResumptionConfig::default().with_accept_ik(true);
    let ik_refused = flights(&server, refuse).await;
    let fallback = flights(&server_identity(0x23), ik_and_early()).await;
    println!("flights to the first answer: XX {xx}, IK + early data {ik_early}, refused {ik_refused}, fallback {fallback}");
    assert_eq!((xx, ik_early, ik_refused, fallback), (4, 2, 4, 4));
}

/// SPEC.md 14.7: after IK, a server keeps the handshake slot until the
/// client's first frame authenticates, at most for the handshake timeout,
/// then for the failure hold: a replayed first flight (which completes IK at
/// the server) holds the slot like a stalled XX handshake, not for nothing.
#[tokio::test(start_paused = true)]
async fn a_replayed_ik_first_flight_holds_the_handshake_slot_until_its_deadline() {
    use capnp_noise::admission::HandshakeSlots;
    use capnp_noise::wire::{payload, KnownResponder, Suite};
    use tokio::time::Instant;
    const TIMEOUT: Duration = Duration::from_secs(2);
    const HOLD: Duration = Duration::from_secs(1);
    let server = server_identity(0x22);
    let id = server.vat_id();
    let sig = server.sign(&payload::binding_message(server.noise_static_public()));
    let known =
        KnownResponder::new(id, *server.noise_static_public(), sig, Suite::MANDATORY).unwrap();
    let cache = Arc::new(ResumptionCache::new(4));
    cache.insert(known);
    let slots = HandshakeSlots::with_failure_hold(1, 1, HOLD);
    let config = StreamConfig::default()
        .with_resumption(ik_and_early())
        .with_handshake_slots(slots);
    // The server: accepts connections one after the other; each stream is
    // read (as servers do) in its own task. Reports when each handshake
    // completed.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    // The replayed handshake's timeout is TIMEOUT; the honest clients'
    // accepts get longer, so that they can wait for the slot.
    let accept_one = |io: tokio::io::DuplexStream, timeout: Duration| {
        let server = server.clone();
        let config = config.clone().with_handshake_timeout(Some(timeout));
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let mut s = stream::accept(io, &server, Arc::new(AnyVat), config)
                .await
                .unwrap();
            done_tx.send(Instant::now()).unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
            let _ = s.read(&mut buf).await;
        })
    };
    // A first flight recorded from an honest client, replayed by someone
    // who then says nothing more.
    let (rec_a, mut rec_b) = tokio::io::duplex(64 * 1024);
    let recorder = tokio::spawn(async move {
        let mut flight = vec![0u8; 4096];
        let n = rec_b.read(&mut flight).await.unwrap();
        flight.truncate(n);
        flight
    });
    let _never = tokio::spawn(client_connect(rec_a, &cache, id, b"call"));
    let flight = recorder.await.unwrap();
    let start = Instant::now();
    let (mut replayer, srv) = tokio::io::duplex(64 * 1024);
    replayer.write_all(&flight).await.unwrap();
    let replayed = accept_one(srv, TIMEOUT);
    let at_replay = done_rx.recv().await.unwrap();
    assert_eq!(at_replay - start, Duration::ZERO, "the replay completes IK");
    // An honest client now waits for the slot: the timeout, then the hold.
    let (c, srv) = tokio::io::duplex(64 * 1024);
    let honest = accept_one(srv, 10 * TIMEOUT);
    let mut c = client_connect(c, &cache, id, b"call").await.unwrap();
    let at_honest = done_rx.recv().await.unwrap();
    assert!(
        at_honest - start >= TIMEOUT + HOLD,
        "the slot was free after {:?}",
        at_honest - start
    );
    // An honest IK client gives the slot back with its first frame.
    c.write_all(b"more").await.unwrap();
    c.flush().await.unwrap();
    let (c2, srv) = tokio::io::duplex(64 * 1024);
    let third = accept_one(srv, 10 * TIMEOUT);
    let before = Instant::now();
    let _c2 = client_connect(c2, &cache, id, b"call").await.unwrap();
    let at_third = done_rx.recv().await.unwrap();
    assert!(at_third - before < HOLD, "{:?}", at_third - before);
    drop((replayer, c));
    for t in [replayed, honest, third] {
        t.abort();
    }
}

/// A record of a suite the client no longer accepts is not used: XX runs,
/// and the record is replaced by one of the suite used.
#[tokio::test]
async fn a_record_of_a_suite_no_longer_accepted_is_not_used() {
    use capnp_noise::wire::{payload, HandshakeConfig, KnownResponder, Suite};
    let server = server_identity(0x22);
    let id = server.vat_id();
    let sig = server.sign(&payload::binding_message(server.noise_static_public()));
    let cache = Arc::new(ResumptionCache::new(4));
    cache.insert(
        KnownResponder::new(id, *server.noise_static_public(), sig, Suite::AesGcmSha256).unwrap(),
    );
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = tokio::spawn(async move {
        let config = StreamConfig::default().with_resumption(ik_and_early());
        stream::accept(b, &server, Arc::new(AnyVat), config)
            .await
            .map(|s| s.suite())
    });
    let chacha = StreamConfig::default()
        .with_handshake(HandshakeConfig::with_suite(Suite::ChaChaPolyBlake2s));
    let c = stream::connect_resuming(
        a,
        &Identity::from_seed(&[0x01; 32]),
        Arc::new(Pinned(id)),
        chacha,
        cache.clone(),
        &id,
        None,
    )
    .await
    .unwrap();
    assert_eq!(c.suite(), Suite::ChaChaPolyBlake2s);
    assert_eq!(srv.await.unwrap().unwrap(), Suite::ChaChaPolyBlake2s);
    assert_eq!(cache.get(&id).unwrap().suite(), Suite::ChaChaPolyBlake2s);
}

// ----- stream::connect_lazy: the handshake starts at the first write -----

fn lazy_client<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: S,
    cache: &Arc<ResumptionCache>,
    server: VatId,
    early: EarlyDataChoice,
) -> stream::LazyStream<S> {
    stream::connect_lazy(
        io,
        &Identity::from_seed(&[0x01; 32]),
        Arc::new(Pinned(server)),
        StreamConfig::default(),
        cache.clone(),
        &server,
        early,
    )
}

/// A server that reads everything the client sends until its CLOSE, then
/// answers with the number of bytes read, and returns them with whether its
/// side saw IK and what became of early data.
fn reading_server(
    io: tokio::io::DuplexStream,
    server: &Identity,
    resumption: ResumptionConfig,
) -> tokio::task::JoinHandle<(Vec<u8>, bool, EarlyDataOutcome)> {
    let server = server.clone();
    let config = StreamConfig::default().with_resumption(resumption);
    tokio::spawn(async move {
        let mut s = stream::accept(io, &server, Arc::new(AnyVat), config)
            .await
            .unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(got.len().to_string().as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        (got, s.resumed(), s.early_data_outcome())
    })
}

/// Writes `chunks` (flushing after the first), closes, and returns the
/// server's view and the client's stream facts.
async fn lazy_transfer(
    cache: &Arc<ResumptionCache>,
    server: &Identity,
    resumption: ResumptionConfig,
    early: EarlyDataChoice,
    chunks: &[&[u8]],
) -> (Vec<u8>, bool, EarlyDataOutcome, bool, bool) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = reading_server(b, server, resumption);
    let mut c = lazy_client(a, cache, server.vat_id(), early);
    for (i, chunk) in chunks.iter().enumerate() {
        c.write_all(chunk).await.unwrap();
        if i == 0 {
            c.flush().await.unwrap();
        }
    }
    c.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let (got, server_resumed, outcome) = srv.await.unwrap();
    assert_eq!(answer, got.len().to_string());
    let open = c.established().expect("open");
    (
        got,
        server_resumed,
        outcome,
        open.resumed(),
        open.fell_back(),
    )
}

/// `got` is `want`, byte for byte (without printing kilobytes on failure).
fn same_bytes(got: &[u8], want: &[u8]) {
    let first_difference = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got == want,
        "the server read {} bytes, {} were written; first difference at {first_difference:?}",
        got.len(),
        want.len()
    );
}

/// Every byte written reaches the server exactly once, whatever becomes of
/// the early data: accepted, refused (sent again after IK message 2), or
/// lost in a fallback to XX (sent again after XX message 3), and when the
/// first writes exceed the room of IK message 1 (the rest waits for the
/// handshake).
#[tokio::test]
async fn a_lazy_stream_delivers_every_byte_once_through_refusal_and_fallback() {
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    let early = EarlyDataChoice::ReplayableNotForwardSecret;
    let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let expect = |chunks: &[&[u8]]| chunks.concat();
    let chunks: &[&[u8]] = &[b"first call", b" second call"];
    // No record yet: XX, the first bytes after message 3.
    let (got, resumed, outcome, c_resumed, _) =
        lazy_transfer(&cache, &server, ik_and_early(), early, chunks).await;
    same_bytes(&got, &expect(chunks));
    assert!(!resumed && !c_resumed);
    assert_eq!(outcome, EarlyDataOutcome::NotSent);
    // IK, early data accepted.
    let (got, resumed, outcome, c_resumed, _) =
        lazy_transfer(&cache, &server, ik_and_early(), early, chunks).await;
    same_bytes(&got, &expect(chunks));
    assert!(resumed && c_resumed);
    assert_eq!(outcome, EarlyDataOutcome::Accepted);
    // IK, early data refused: sent again after message 2, once.
    let refuse = ResumptionConfig::default().with_accept_ik(true);
    let (got, resumed, outcome, _, _) = lazy_transfer(&cache, &server, refuse, early, chunks).await;
    same_bytes(&got, &expect(chunks));
    assert!(resumed);
    assert_eq!(outcome, EarlyDataOutcome::Refused);
    // More than IK message 1 holds, accepted: the rest follows the handshake.
    let big_chunks: &[&[u8]] = &[&big, b"tail"];
    let (got, _, outcome, _, _) =
        lazy_transfer(&cache, &server, ik_and_early(), early, big_chunks).await;
    same_bytes(&got, &expect(big_chunks));
    assert_eq!(outcome, EarlyDataOutcome::Accepted);
    // The server's static key changed: fallback, the early data sent again
    // after XX message 3, once.
    let restarted = server_identity(0x23);
    let (got, resumed, _, c_resumed, fell_back) =
        lazy_transfer(&cache, &restarted, ik_and_early(), early, chunks).await;
    same_bytes(&got, &expect(chunks));
    assert!(!resumed && !c_resumed && fell_back);
    // Early data not allowed by the client: IK, bytes as the first frame.
    let (got, resumed, outcome, c_resumed, _) = lazy_transfer(
        &cache,
        &restarted,
        ik_and_early(),
        EarlyDataChoice::Never,
        big_chunks,
    )
    .await;
    same_bytes(&got, &expect(big_chunks));
    assert!(resumed && c_resumed);
    assert_eq!(outcome, EarlyDataOutcome::NotSent);
}

/// Flights from the first write to the first answer through a lazy stream:
/// nothing moves before the first write; then IK with early data takes 2
/// flights (one round trip) and IK without it 4, like XX.
#[tokio::test]
async fn a_lazy_stream_sends_nothing_before_its_first_write_and_saves_a_round_trip() {
    async fn flights(
        cache: &Arc<ResumptionCache>,
        server: &Identity,
        early: EarlyDataChoice,
    ) -> (usize, usize) {
        flights_through_the_adapter(cache, server, ik_and_early(), Client::Lazy(early)).await
    }
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    let early = EarlyDataChoice::ReplayableNotForwardSecret;
    let xx = flights(&cache, &server, early).await;
    let ik_early = flights(&cache, &server, early).await;
    let ik = flights(&cache, &server, EarlyDataChoice::Never).await;
    println!("lazy stream, (flights before the first write, to the first answer): XX {xx:?}, IK + early data {ik_early:?}, IK {ik:?}");
    assert_eq!((xx, ik_early, ik), ((0, 4), (0, 2), (0, 4)));
}

/// A client that only reads (the server speaks first) starts its handshake
/// after `lazy_start_wait`, without early data.
#[tokio::test]
async fn a_lazy_stream_that_only_reads_starts_after_its_wait() {
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    for _ in 0..2 {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = {
            let server = server.clone();
            let config = StreamConfig::default().with_resumption(ik_and_early());
            tokio::spawn(async move {
                let mut s = stream::accept(b, &server, Arc::new(AnyVat), config)
                    .await
                    .unwrap();
                s.write_all(b"hello").await.unwrap();
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                rest
            })
        };
        let mut c = stream::connect_lazy(
            a,
            &Identity::from_seed(&[0x01; 32]),
            Arc::new(Pinned(server.vat_id())),
            StreamConfig::default().with_lazy_start_wait(Duration::from_millis(20)),
            cache.clone(),
            &server.vat_id(),
            EarlyDataChoice::ReplayableNotForwardSecret,
        );
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got))
            .await
            .expect("the handshake started after the wait")
            .unwrap();
        assert_eq!(got, b"hello");
        c.shutdown().await.unwrap();
        assert!(srv.await.unwrap().is_empty());
    }
    assert!(cache.get(&server.vat_id()).is_some());
}

/// A lazy stream's handshake error comes out of the write or flush that
/// drove it, and stays (sticky); a silent close after IK message 1 (a
/// revision 1.1 server) forgets the record, as with `connect_resuming`.
#[tokio::test]
async fn a_lazy_stream_reports_its_handshake_error_and_keeps_it() {
    let (cache, id, a, old) = known_server_now_of_revision_1_1().await;
    let mut c = lazy_client(a, &cache, id, EarlyDataChoice::ReplayableNotForwardSecret);
    c.write_all(b"call").await.unwrap(); // buffered: nothing sent yet
    assert!(!c.started());
    let e = c.flush().await.unwrap_err();
    old.await.unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert!(
        matches!(c.error(), Some(Error::UnexpectedEof { during }) if *during == EOF_BEFORE_MESSAGE_2),
        "{:?}",
        c.error()
    );
    assert_eq!(
        c.write(b"more").await.unwrap_err().kind(),
        e.kind(),
        "sticky"
    );
    assert!(cache.get(&id).is_none(), "the next connection runs XX");
}

/// Before its handshake a lazy stream holds at most the room of IK message
/// 1 (3862 bytes with the canonical identity payload): a larger write is
/// taken only up to it (and starts the handshake); the rest waits.
#[tokio::test]
async fn a_lazy_stream_buffers_at_most_the_room_of_ik_message_1() {
    let cache = Arc::new(ResumptionCache::new(4));
    let server = server_identity(0x22);
    let (a, b) = tokio::io::duplex(64 * 1024);
    let srv = reading_server(b, &server, ik_and_early());
    let mut c = lazy_client(a, &cache, server.vat_id(), EarlyDataChoice::Never);
    let room = stream::early_data_room(&Identity::from_seed(&[0x01; 32]));
    assert_eq!(room, 3862);
    let big = vec![7u8; 10_000];
    assert_eq!(c.write(&big[..room - 1]).await.unwrap(), room - 1);
    assert!(!c.started(), "below the room: nothing sent yet");
    assert_eq!(c.write(&big).await.unwrap(), 1, "only up to the room");
    assert!(c.started(), "the room is full: the handshake started");
    c.write_all(&big[room..]).await.unwrap();
    c.shutdown().await.unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    let (got, _, _) = srv.await.unwrap();
    same_bytes(&got, &big);
}
