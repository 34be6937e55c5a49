//! Adversarial tests over real loopback TCP (SPEC.md section 9, threat
//! model): an attacker who controls the network can read, drop, delay,
//! reorder, replay, modify and inject bytes, and open connections at will.
//!
//! * Man in the middle: with its own keys, with the victims' payloads over
//!   its own static keys, and with bit flips in message 2. Both victims fail
//!   their handshakes and no application byte reaches either.
//! * Replay of a recorded session, whole or in two flights: message 3 does
//!   not decrypt under the responder's fresh ephemeral key.
//! * Damage after the handshake, by a frame-aware relay (seeded, 48 cases):
//!   the reader gets a prefix of the data and then an error, never a clean
//!   end and never a byte after the damaged frame.
//! * Hostile framing and stalling against `rpc::serve`: each ends in
//!   bounded time and frees its slot (one connection at a time, and a
//!   legitimate client is served after each); a handshake written one byte
//!   per write succeeds.
//!
//! Every wait is bounded by `tokio::time::timeout`, so a hang fails a test
//! instead of stalling CI.

use capnp_noise_test::office;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use capnp_noise::rpc::{self, ClientConfig, ServerConfig};
use capnp_noise::stream::{self, NoiseStream, StreamConfig};
use capnp_noise::wire::{payload, Handshake, HandshakeConfig};
use capnp_noise::{AllowList, AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, VatId};
use capnp_noise_test::fixtures::initiator_first_flight;
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_noise_test::support::{bounded, whoami, Tap};
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, LocalSet};
use tokio_util::compat::TokioAsyncReadCompatExt;

// ---------------------------------------------------------------------------
// Helpers shared by the tests.

/// How long one step of a test may take ([`bounded`]).
const STEP: Duration = Duration::from_secs(10);

/// A small seeded generator (xorshift64): the same cases on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// Handshakes in these tests: bounded, so a stuck peer cannot hang a test.
fn config() -> StreamConfig {
    StreamConfig::default().with_handshake_timeout(Some(Duration::from_secs(5)))
}

/// Reads until the end or an error; returns what was read and how it ended.
async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Reads one whole frame (2-byte big-endian length and body, SPEC.md
/// section 4), prefix included; `None` if the stream ends before it starts.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut frame = vec![0u8; 2];
    match r.read_exact(&mut frame[..1]).await {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    };
    r.read_exact(&mut frame[1..]).await?;
    let len = u16::from_be_bytes([frame[0], frame[1]]) as usize;
    frame.resize(2 + len, 0);
    r.read_exact(&mut frame[2..]).await?;
    Ok(Some(frame))
}

/// Reads the initiator's cleartext preamble (SPEC.md section 2): magic,
/// version, name length, name.
async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut p = vec![0u8; 13];
    r.read_exact(&mut p).await?;
    let name_len = p[12] as usize;
    p.resize(13 + name_len, 0);
    r.read_exact(&mut p[13..]).await?;
    Ok(p)
}

/// Copies until `from` ends or fails, then shuts `to` down (passing the
/// half-close on); errors only stop the copy.
async fn copy_then_shutdown(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

/// The handshake payload `identity` sends (its VatId and its signature
/// over its own Noise static key): what any initiator receives in message
/// 2, and any accepted responder in message 3. Not secret.
fn payload_of(identity: &Identity) -> Arc<[u8]> {
    let signature = identity.sign(&payload::binding_message(identity.noise_static_public()));
    payload::encode(&identity.vat_id(), &signature).into()
}

/// Drives a sans-IO handshake over `tcp` until it finishes or fails.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: &mut S,
    hs: &mut Handshake,
) -> Result<(), Error> {
    let mut buf = [0u8; 4096];
    loop {
        let out = hs.pending_output().to_vec();
        if !out.is_empty() {
            tcp.write_all(&out).await?;
            hs.consume_output(out.len());
        }
        if hs.is_finished() {
            return Ok(());
        }
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(hs.feed_eof().expect("an unfinished handshake reports EOF"));
        }
        hs.feed(&buf[..n])?;
    }
}

/// What a stream server's application saw of one connection.
#[derive(Debug)]
enum Seen {
    /// The handshake failed: the application never got a stream.
    Failed(Error),
    /// A stream from `peer`; the application read `bytes`, then `end`.
    Accepted {
        peer: VatId,
        bytes: Vec<u8>,
        end: io::Result<()>,
    },
}

/// A `stream::accept` server: reads each accepted stream to its end,
/// answers "N bytes" and closes. Every connection is reported on the channel.
async fn stream_server(
    identity: Identity,
    policy: Arc<dyn PeerPolicy>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (identity, policy, tx) = (identity.clone(), policy.clone(), tx.clone());
            tokio::spawn(async move {
                let seen = match stream::accept(tcp, &identity, policy, config()).await {
                    Err(e) => Seen::Failed(e),
                    Ok(mut s) => {
                        let (bytes, end) = read_all(&mut s).await;
                        if end.is_ok() {
                            let answer = format!("{} bytes", bytes.len());
                            let _ = s.write_all(answer.as_bytes()).await;
                            let _ = s.shutdown().await;
                        }
                        Seen::Accepted {
                            peer: s.peer_vat_id(),
                            bytes,
                            end,
                        }
                    }
                };
                let _ = tx.send(seen);
            });
        }
    });
    (addr, rx)
}

/// The next connection the server's application saw.
async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    bounded("the server's report", STEP, rx.recv())
        .await
        .expect("the server runs")
}

/// Asserts that the server saw no further connection.
async fn assert_no_more(rx: &mut mpsc::UnboundedReceiver<Seen>) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Ok(seen) = rx.try_recv() {
        panic!("unexpected connection at the server: {seen:?}");
    }
}

/// A client that, if its handshake succeeds, sends a secret and reads the answer.
async fn victim_client(
    addr: SocketAddr,
    me: &Identity,
    server: VatId,
) -> Result<(Vec<u8>, io::Result<()>), Error> {
    let tcp = TcpStream::connect(addr).await?;
    let mut s = stream::connect(tcp, me, Arc::new(Pinned(server)), config()).await?;
    s.write_all(b"the victim's secret").await?;
    s.shutdown().await?;
    Ok(read_all(&mut s).await)
}

// ---------------------------------------------------------------------------
// 1. Man in the middle.

/// What a man in the middle got out of one intercepted connection.
#[derive(Debug)]
struct MitmReport {
    /// Its handshake with the client, as a responder.
    toward_client: Result<(), Error>,
    /// Bytes it received from the client in all.
    from_client: usize,
    /// Its handshake with the server, as an initiator.
    toward_server: Result<(), Error>,
    /// What it could read from the server afterwards (plaintext if its
    /// handshake had been accepted, raw bytes for the raw variant).
    from_server: (Vec<u8>, io::Result<()>),
}

/// A man in the middle with its own identity, intercepting one
/// connection: it terminates the client's handshake as a responder and
/// opens its own to `server` as an initiator (accepting anyone on both
/// sides), and relays plaintext between the two if both succeed.
async fn terminating_mitm(
    mitm: Identity,
    server: SocketAddr,
) -> (SocketAddr, JoinHandle<MitmReport>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (client_tcp, _) = listener.accept().await.unwrap();
        let (client_tcp, from_client) = Tap::new(client_tcp);
        let server_tcp = TcpStream::connect(server).await.unwrap();
        let (c, s) = tokio::join!(
            stream::accept(client_tcp, &mitm, Arc::new(AnyVat), config()),
            stream::connect(server_tcp, &mitm, Arc::new(AnyVat), config()),
        );
        let from_client = move || from_client.load(Ordering::Relaxed);
        match (c, s) {
            (Ok(mut c), Ok(mut s)) => {
                // Both sides fooled: relay (never reached in these tests).
                let relayed = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                MitmReport {
                    toward_client: Ok(()),
                    from_client: from_client(),
                    toward_server: Ok(()),
                    from_server: (Vec::new(), relayed.map(drop)),
                }
            }
            (c, Ok(mut s)) => MitmReport {
                toward_client: c.map(drop),
                from_client: from_client(),
                toward_server: Ok(()),
                from_server: read_all(&mut s).await,
            },
            (c, Err(e)) => MitmReport {
                toward_client: c.map(drop),
                from_client: from_client(),
                toward_server: Err(e),
                from_server: (Vec::new(), Ok(())),
            },
        }
    });
    (addr, task)
}

#[tokio::test]
async fn man_in_the_middle_with_its_own_identity_is_refused_by_both_victims() {
    let (server_id, client_id, mitm_id) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let (server_vat, mitm_vat) = (server_id.vat_id(), mitm_id.vat_id());
    let allow = AllowList::from_vat_ids([client_id.vat_id()]);
    let (server, mut seen) = stream_server(server_id, Arc::new(allow)).await;
    let (mitm, report) = terminating_mitm(mitm_id, server).await;

    // The client pins the server: it sees the MITM's VatId in message 2 and
    // stops there, before revealing itself.
    let e = bounded("client", STEP, victim_client(mitm, &client_id, server_vat))
        .await
        .expect_err("the client accepted a man in the middle");
    assert!(
        matches!(&e, Error::PeerRefused { vat_id, .. } if *vat_id == mitm_vat),
        "{e}"
    );
    // The server allows only the client: it refuses the MITM after message 3.
    match next_seen(&mut seen).await {
        Seen::Failed(Error::PeerRefused { vat_id, .. }) => assert_eq!(vat_id, mitm_vat),
        other => panic!("the server should refuse the MITM: {other:?}"),
    }
    assert_no_more(&mut seen).await;

    let report = bounded("the MITM", STEP, report).await.unwrap();
    // The client hung up on it without message 3 (the only message that
    // carries the client's identity): the MITM's handshake saw the end of
    // the stream while it waited for message 3, and not one byte of it
    // came: all it ever received is the preamble and message 1.
    let e = report
        .toward_client
        .expect_err("the client completed a handshake with the MITM");
    assert!(
        matches!(e, Error::UnexpectedEof { during } if during.starts_with("before handshake message 3")),
        "{e}"
    );
    assert_eq!(
        report.from_client,
        initiator_first_flight().len(),
        "the MITM received more than the preamble and message 1 from the client"
    );
    // Its own handshake to the server completed on its side (XX
    // authenticates the initiator last), but the server then hung up: not
    // one plaintext byte came out of it.
    report
        .toward_server
        .expect("an initiator finishes when it sends message 3");
    let (bytes, end) = report.from_server;
    assert!(
        bytes.is_empty(),
        "the MITM read {} bytes from the server",
        bytes.len()
    );
    let e = end.expect_err("the server's refusal is never a clean end");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

/// A raw man in the middle with its own Noise static keys that presents
/// each victim's own payload (VatId and signature) to the other: the
/// server's to the client in message 2, the client's to the server in
/// message 3.
async fn payload_swapping_mitm(
    mitm: Identity,
    server: SocketAddr,
    server_payload: Arc<[u8]>,
    client_payload: Arc<[u8]>,
) -> (SocketAddr, JoinHandle<MitmReport>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (client_tcp, _) = listener.accept().await.unwrap();
        let (mut client_tcp, from_client) = Tap::new(client_tcp);
        let mut server_tcp = TcpStream::connect(server).await.unwrap();
        let mut toward_client = Handshake::responder(
            &mitm,
            Arc::new(AnyVat),
            PeerContext::responder(None),
            HandshakeConfig::default(),
        )
        .unwrap();
        toward_client.replace_payload_for_tests(server_payload);
        let mut toward_server = Handshake::initiator(
            &mitm,
            Arc::new(AnyVat),
            PeerContext::initiator(None, None),
            HandshakeConfig::default(),
        )
        .unwrap();
        toward_server.replace_payload_for_tests(client_payload);
        let (c, s) = tokio::join!(
            drive(&mut client_tcp, &mut toward_client),
            drive(&mut server_tcp, &mut toward_server),
        );
        // Whatever the server sends after message 3, raw.
        let from_server = read_all(&mut server_tcp).await;
        MitmReport {
            toward_client: c,
            from_client: from_client.load(Ordering::Relaxed),
            toward_server: s,
            from_server,
        }
    });
    (addr, task)
}

#[tokio::test]
async fn man_in_the_middle_replaying_the_victims_signatures_over_its_own_keys_fails() {
    let (server_id, client_id, mitm_id) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let server_vat = server_id.vat_id();
    let (server_payload, client_payload) = (payload_of(&server_id), payload_of(&client_id));
    let allow = AllowList::from_vat_ids([client_id.vat_id()]);
    let (server, mut seen) = stream_server(server_id, Arc::new(allow)).await;
    let (mitm, report) =
        payload_swapping_mitm(mitm_id, server, server_payload, client_payload).await;

    // The client sees the server's VatId and genuine signature, but over a
    // static key the signature does not cover: an invalid proof, not a
    // refusal (SPEC.md 5.4), and no message 3.
    let e = bounded("client", STEP, victim_client(mitm, &client_id, server_vat))
        .await
        .expect_err("the client accepted a forged identity proof");
    assert!(matches!(e, Error::BadIdentityProof(_)), "{e}");
    // The server sees the client's VatId and signature over the MITM's static key.
    match next_seen(&mut seen).await {
        Seen::Failed(e) => assert!(matches!(e, Error::BadIdentityProof(_)), "{e}"),
        other => panic!("the server should reject the forged proof: {other:?}"),
    }
    assert_no_more(&mut seen).await;

    let report = bounded("the MITM", STEP, report).await.unwrap();
    let e = report
        .toward_client
        .expect_err("the client finished with the MITM");
    assert!(
        matches!(e, Error::UnexpectedEof { .. } | Error::Io(_)),
        "{e}"
    );
    report
        .toward_server
        .expect("an initiator finishes when it sends message 3");
    // After message 3 the server sent nothing at all, and hung up.
    assert!(
        report.from_server.0.is_empty(),
        "{:?}",
        report.from_server.0
    );
}

/// A relay that forwards everything but flips one bit of message 2's body
/// at `offset` (clamped to its last byte).
async fn msg2_flipping_relay(server: SocketAddr, offset: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client_tcp, _) = listener.accept().await.unwrap();
        let server_tcp = TcpStream::connect(server).await.unwrap();
        let (cr, cw) = client_tcp.into_split();
        let (mut sr, mut cw) = (server_tcp.into_split(), cw);
        tokio::spawn(copy_then_shutdown(cr, sr.1));
        if let Ok(Some(mut msg2)) = read_frame(&mut sr.0).await {
            let at = offset.saturating_add(2).min(msg2.len() - 1);
            msg2[at] ^= 0x04;
            let _ = cw.write_all(&msg2).await;
        }
        copy_then_shutdown(sr.0, cw).await;
    });
    addr
}

#[tokio::test]
async fn bit_flips_in_message_2_fail_the_handshake_on_both_sides() {
    let (server_id, client_id) = (Identity::generate(), Identity::generate());
    let server_vat = server_id.vat_id();
    let (server, mut seen) = stream_server(server_id, Arc::new(AnyVat)).await;
    // Message 2's body: e (0..32), encrypted s (32..64) and its tag
    // (64..80), then the encrypted payload and its tag.
    for (offset, region) in [
        (0, "the ephemeral key"),
        (31, "the ephemeral key's last byte"),
        (40, "the encrypted static key"),
        (79, "the static key's tag"),
        (100, "the encrypted payload"),
        (usize::MAX, "the payload's tag"),
    ] {
        let relay = msg2_flipping_relay(server, offset).await;
        let e = bounded(region, STEP, victim_client(relay, &client_id, server_vat))
            .await
            .expect_err(region);
        assert!(
            matches!(e, Error::Decrypt { during } if during == "handshake message 2"),
            "{region}: {e}"
        );
        // The server never gets message 3; its application never gets a stream.
        match next_seen(&mut seen).await {
            Seen::Failed(e) => {
                assert!(
                    matches!(e, Error::UnexpectedEof { .. } | Error::Io(_)),
                    "{region}: {e}"
                )
            }
            other => panic!("{region}: {other:?}"),
        }
    }
    assert_no_more(&mut seen).await;
}

// ---------------------------------------------------------------------------
// 2. Replay.

/// A relay for one connection that records both directions; the handle
/// gives (client to server, server to client) once both have ended.
async fn recording_relay(server: SocketAddr) -> (SocketAddr, JoinHandle<(Vec<u8>, Vec<u8>)>) {
    async fn record(mut from: OwnedReadHalf, mut to: OwnedWriteHalf) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            seen.extend_from_slice(&buf[..n]);
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
        seen
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (client_tcp, _) = listener.accept().await.unwrap();
        let server_tcp = TcpStream::connect(server).await.unwrap();
        let ((cr, cw), (sr, sw)) = (client_tcp.into_split(), server_tcp.into_split());
        tokio::join!(record(cr, sw), record(sr, cw))
    });
    (addr, task)
}

/// Reads what the server sends an attacker until it hangs up.
async fn until_hangup(tcp: &mut TcpStream) -> Vec<u8> {
    bounded("the server hanging up", STEP, read_all(tcp))
        .await
        .0
}

#[tokio::test]
async fn a_recorded_session_replayed_to_the_server_fails_at_message_3() {
    let (server_id, client_id) = (Identity::generate(), Identity::generate());
    let server_vat = server_id.vat_id();
    let allow = AllowList::from_vat_ids([client_id.vat_id()]);
    let (server, mut seen) = stream_server(server_id, Arc::new(allow)).await;

    // A genuine session through a recording relay: handshake, data, close.
    let (relay, recording) = recording_relay(server).await;
    let data = pattern(30_000, 7);
    let tcp = TcpStream::connect(relay).await.unwrap();
    let mut s = stream::connect(tcp, &client_id, Arc::new(Pinned(server_vat)), config())
        .await
        .unwrap();
    for chunk in data.chunks(7000) {
        s.write_all(chunk).await.unwrap();
        s.flush().await.unwrap();
    }
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    bounded("the answer", STEP, s.read_to_string(&mut answer))
        .await
        .unwrap();
    assert_eq!(answer, "30000 bytes");
    match next_seen(&mut seen).await {
        Seen::Accepted { peer, bytes, end } => {
            assert_eq!(peer, client_id.vat_id());
            assert!(bytes == data && end.is_ok());
        }
        other => panic!("the genuine session failed: {other:?}"),
    }
    drop(s);
    let (sent, received) = bounded("the recording", STEP, recording).await.unwrap();
    let pre_len = 13 + sent[12] as usize;
    assert_eq!(&sent[..11], b"capnp-noise");
    let first_flight = pre_len + 2 + 32;
    let recorded_msg2_len = 2 + u16::from_be_bytes([received[0], received[1]]) as usize;
    assert!(sent.len() > first_flight + data.len(), "{}", sent.len());

    // Replay everything at once on a fresh connection: the server answers
    // the old message 1 with a fresh message 2, then cannot decrypt the old
    // message 3, and hangs up having sent nothing else.
    let mut tcp = TcpStream::connect(server).await.unwrap();
    tcp.write_all(&sent).await.unwrap();
    let got = until_hangup(&mut tcp).await;
    // (A reset may discard what was in flight, hence "at most".)
    if got.len() >= 2 {
        let msg2_len = 2 + u16::from_be_bytes([got[0], got[1]]) as usize;
        assert!(
            got.len() <= msg2_len,
            "{} bytes after message 2",
            got.len() - msg2_len
        );
    }
    match next_seen(&mut seen).await {
        Seen::Failed(e) => assert!(
            matches!(e, Error::Decrypt { during } if during == "handshake message 3"),
            "{e}"
        ),
        other => panic!("the replay was accepted: {other:?}"),
    }

    // Replay the first flight, wait for the server's message 2 as a real
    // initiator would, then replay the rest.
    let mut tcp = TcpStream::connect(server).await.unwrap();
    tcp.write_all(&sent[..first_flight]).await.unwrap();
    let msg2 = bounded("message 2", STEP, read_frame(&mut tcp))
        .await
        .unwrap()
        .expect("the server answers message 1");
    assert_eq!(msg2.len(), recorded_msg2_len);
    assert_ne!(
        msg2,
        received[..recorded_msg2_len],
        "the server reused its ephemeral key"
    );
    tcp.write_all(&sent[first_flight..]).await.unwrap();
    assert!(until_hangup(&mut tcp).await.is_empty());
    match next_seen(&mut seen).await {
        Seen::Failed(e) => assert!(
            matches!(e, Error::Decrypt { during } if during == "handshake message 3"),
            "{e}"
        ),
        other => panic!("the replay was accepted: {other:?}"),
    }
    assert_no_more(&mut seen).await;
}

// ---------------------------------------------------------------------------
// 3. Damage after the handshake.

/// What the frame-aware relay does to one transport frame.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Damage {
    /// Flip one bit of the frame's body.
    FlipBody,
    /// Flip one bit of the frame's length prefix.
    FlipLength,
    /// Forward only part of the frame, then end the connection.
    Truncate,
    /// Forward the frame twice.
    Duplicate,
    /// Do not forward the frame.
    Drop,
    /// Forward the next frame before this one.
    Swap,
}

const DAMAGES: [Damage; 6] = [
    Damage::FlipBody,
    Damage::FlipLength,
    Damage::Truncate,
    Damage::Duplicate,
    Damage::Drop,
    Damage::Swap,
];

/// Where the damage landed, as the relay saw it.
#[derive(Debug, Default)]
struct Applied {
    /// Application bytes in the transport frames before the damaged one
    /// (a frame carries its length - 17 bytes: type byte and tag).
    data_before: usize,
    /// Application bytes in the damaged frame.
    frame_data: usize,
}

/// Relays `from` to `to` frame by frame: the preamble (if `preamble`),
/// `handshake` handshake frames and transport frames up to number `at`
/// pass unchanged; frame `at` gets `damage`; the rest passes raw. Returns
/// `None` if the stream ended before frame `at`.
async fn damaging_relay(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    preamble: bool,
    handshake: usize,
    damage: Damage,
    at: usize,
    mut rng: Rng,
) -> Option<Applied> {
    if preamble {
        to.write_all(&read_preamble(&mut from).await.ok()?)
            .await
            .ok()?;
    }
    for _ in 0..handshake {
        to.write_all(&read_frame(&mut from).await.ok()??)
            .await
            .ok()?;
    }
    let mut applied = Applied::default();
    for _ in 0..at {
        let frame = read_frame(&mut from).await.ok()??;
        applied.data_before += frame.len() - 2 - 17;
        to.write_all(&frame).await.ok()?;
    }
    let mut frame = read_frame(&mut from).await.ok()??;
    applied.frame_data = frame.len() - 2 - 17;
    let _ = match damage {
        Damage::FlipBody => {
            let i = 2 + rng.below(frame.len() - 2);
            frame[i] ^= 1 << rng.below(8);
            to.write_all(&frame).await
        }
        Damage::FlipLength => {
            let bit = rng.below(16);
            frame[bit / 8] ^= 1 << (bit % 8);
            to.write_all(&frame).await
        }
        Damage::Truncate => {
            let cut = rng.below(frame.len());
            let _ = to.write_all(&frame[..cut]).await;
            let _ = to.shutdown().await;
            return Some(applied);
        }
        Damage::Duplicate => {
            let _ = to.write_all(&frame).await;
            to.write_all(&frame).await
        }
        Damage::Drop => Ok(()),
        Damage::Swap => {
            let next = read_frame(&mut from).await.ok()??;
            let _ = to.write_all(&next).await;
            to.write_all(&frame).await
        }
    };
    copy_then_shutdown(from, to).await;
    Some(applied)
}

/// One damage case: a client and a server through the relay; one of them
/// writes `writes` (flushed one by one, one frame each) and closes, the
/// other reads until it fails. Checks what the reader got; returns who
/// wrote and the reader's error.
async fn damage_case(
    case: usize,
    rng: &mut Rng,
    ids: &(Identity, Identity),
) -> (bool, io::ErrorKind) {
    let damage = DAMAGES[case % DAMAGES.len()];
    let client_writes = rng.below(2) == 0;
    let writes: Vec<usize> = (0..2 + rng.below(7))
        .map(|_| 1 + rng.below(20_000))
        .collect();
    let m = writes.len(); // data frames; frame m is the CLOSE
    let at = match damage {
        // The damaged frame is a data frame (a duplicated CLOSE would come
        // after the authenticated end: nothing to detect).
        Damage::Duplicate | Damage::Swap => rng.below(m),
        _ => rng.below(m + 1),
    };
    let data = pattern(writes.iter().sum(), case as u64);
    let what = format!(
        "case {case}: {damage:?} at transport frame {at} of {m} data frames and a CLOSE, {} writing",
        if client_writes { "client" } else { "server" }
    );

    let server_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = server_listener.local_addr().unwrap();
    let relay_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay_listener.local_addr().unwrap();
    let relay_rng = Rng::new(rng.next());
    let relay = tokio::spawn(async move {
        let (c, _) = relay_listener.accept().await.unwrap();
        let s = TcpStream::connect(server_addr).await.unwrap();
        let ((cr, cw), (sr, sw)) = (c.into_split(), s.into_split());
        if client_writes {
            tokio::spawn(copy_then_shutdown(sr, cw));
            damaging_relay(cr, sw, true, 2, damage, at, relay_rng).await
        } else {
            tokio::spawn(copy_then_shutdown(cr, sw));
            damaging_relay(sr, cw, false, 1, damage, at, relay_rng).await
        }
    });

    let (server_id, client_id) = ids;
    let (c, s) = tokio::join!(
        async {
            let tcp = TcpStream::connect(relay_addr).await.unwrap();
            let pin = Arc::new(Pinned(server_id.vat_id()));
            stream::connect(tcp, client_id, pin, config())
                .await
                .unwrap()
        },
        async {
            let (tcp, _) = server_listener.accept().await.unwrap();
            let pin = Arc::new(Pinned(client_id.vat_id()));
            stream::accept(tcp, server_id, pin, config()).await.unwrap()
        },
    );
    let (writer, reader) = if client_writes { (c, s) } else { (s, c) };
    let write = async move {
        let mut writer = writer;
        let mut pos = 0;
        for &n in &writes {
            // The reader may have hung up already: write errors are expected.
            if writer.write_all(&data[pos..pos + n]).await.is_err() || writer.flush().await.is_err()
            {
                return (writer, data);
            }
            pos += n;
        }
        let _ = writer.shutdown().await;
        (writer, data)
    };
    let read = async move {
        let mut reader = reader;
        let (got, end) = read_all(&mut reader).await;
        let again = reader.read(&mut [0u8; 64]).await;
        (got, end, again) // the reader hangs up here
    };
    let ((_writer, data), (got, end, again), applied) =
        bounded(&what, STEP, async { tokio::join!(write, read, relay) }).await;
    let applied = applied
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: the stream ended before the damaged frame"));

    let e = end.expect_err(&format!("{what}: a clean end of stream"));
    let again = again.expect_err(&format!("{what}: the error did not stick"));
    assert_eq!(again.kind(), e.kind(), "{what}");
    assert!(
        got[..] == data[..got.len()],
        "{what}: the bytes delivered are not a prefix of the data sent"
    );
    // Everything before the damaged frame arrives, and nothing after its
    // data: a duplicate is detected after the original was delivered.
    let expected = match damage {
        Damage::Duplicate => applied.data_before + applied.frame_data,
        _ => applied.data_before,
    };
    assert_eq!(got.len(), expected, "{what}: {applied:?}");
    let eof = io::ErrorKind::UnexpectedEof;
    let bad = io::ErrorKind::InvalidData;
    let kinds: &[io::ErrorKind] = match damage {
        Damage::Truncate => &[eof],
        Damage::Drop if at == m => &[eof],
        // A longer length waits for bytes that may never come.
        Damage::FlipLength => &[bad, eof],
        _ => &[bad],
    };
    assert!(kinds.contains(&e.kind()), "{what}: {e:?}");
    (client_writes, e.kind())
}

#[tokio::test]
async fn damaged_frames_give_a_prefix_then_an_error_never_a_clean_end() {
    let ids = (Identity::generate(), Identity::generate());
    let mut rng = Rng::new(0x5eed_0006);
    let mut outcomes = Vec::new();
    for case in 0..48 {
        outcomes.push(damage_case(case, &mut rng, &ids).await);
    }
    // Both directions were damaged, and both kinds of error were seen.
    let count =
        |f: &dyn Fn(&(bool, io::ErrorKind)) -> bool| outcomes.iter().filter(|o| f(o)).count();
    let by_client = count(&|o| o.0);
    let truncations = count(&|o| o.1 == io::ErrorKind::UnexpectedEof);
    eprintln!(
        "48 cases: {by_client} with the client writing, {truncations} reported as truncation"
    );
    assert!((12..=36).contains(&by_client), "{by_client}");
    assert!((8..48).contains(&truncations), "{truncations}");
}

// ---------------------------------------------------------------------------
// 4. Hostile framing and stalling against rpc::serve.

/// An `rpc::serve` server with `handshake_timeout`, one connection and one
/// handshake at a time, serving the demo `Office` to anyone.
async fn one_at_a_time_server(handshake_timeout: Duration) -> (SocketAddr, VatId) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let id = Identity::generate();
    let vat = id.vat_id();
    let mut options = ServerConfig::default();
    options.handshake_timeout = handshake_timeout;
    options.max_connections = 1;
    options.max_handshakes = 1;
    tokio::task::spawn_local(rpc::serve(
        listener,
        id,
        Arc::new(AnyVat),
        options,
        office::Office::bootstrap,
    ));
    (addr, vat)
}

/// A legitimate client is served: the server's only connection slot is free.
async fn served(addr: SocketAddr, server: VatId, after: &str) {
    let me = Identity::generate();
    let mut options = ClientConfig::default();
    options.timeout = Duration::from_secs(5);
    let call = async {
        let (office, conn): (office_capnp::Client, _) =
            rpc::connect(addr, &me, Arc::new(Pinned(server)), options)
                .await
                .unwrap_or_else(|e| panic!("not served after {after}: {e}"));
        let seen = whoami(&office).await.unwrap();
        conn.disconnect().await.unwrap();
        seen
    };
    let seen = bounded(&format!("a client after {after}"), STEP, call).await;
    assert_eq!(seen, me.vat_id().to_string(), "after {after}");
}

/// A genuine initiator's first flight (preamble, then message 1).
fn first_flight() -> (Handshake, Vec<u8>) {
    let hs = Handshake::initiator(
        &Identity::generate(),
        Arc::new(AnyVat),
        PeerContext::initiator(None, None),
        HandshakeConfig::default(),
    )
    .unwrap();
    let out = hs.pending_output().to_vec();
    (hs, out)
}

/// Sends a well-formed preamble and then `bad` where message 1 should be,
/// or (if `at_msg3`) a genuine message 1 and then `bad` where message 3
/// should be. Returns what the server sent before it hung up.
async fn hostile_framing(addr: SocketAddr, at_msg3: bool, bad: &[u8]) -> Vec<u8> {
    let (_, flight) = first_flight();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let pre_len = 13 + flight[12] as usize;
    let mut received = Vec::new();
    if at_msg3 {
        tcp.write_all(&flight).await.unwrap();
        let msg2 = bounded("message 2", STEP, read_frame(&mut tcp))
            .await
            .unwrap();
        received = msg2.expect("the server answers message 1");
    } else {
        tcp.write_all(&flight[..pre_len]).await.unwrap();
    }
    // The server may hang up while this is still being written.
    let _ = tcp.write_all(bad).await;
    received.extend(until_hangup(&mut tcp).await);
    received
}

/// A stream that writes one byte per write, each after a 1 ms pause (with
/// TCP_NODELAY: one segment per byte), and counts its writes.
struct Trickle {
    tcp: TcpStream,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    writes: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(pause) = self.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            self.pause = None;
        }
        let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &buf[..buf.len().min(1)]))?;
        self.writes += 1;
        self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(1))));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A client whose handshake and calls go out one byte per write: it must
/// be served like any other.
async fn trickling_client(addr: SocketAddr, server: VatId) {
    let me = Identity::generate();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let trickle = Trickle {
        tcp,
        pause: None,
        writes: 0,
    };
    let s: NoiseStream<Trickle> = bounded(
        "a handshake written byte by byte",
        STEP,
        stream::connect(trickle, &me, Arc::new(Pinned(server)), config()),
    )
    .await
    .unwrap();
    // Preamble (46), message 1 (34) and message 3 (over 100): one write each byte.
    assert!(s.get_ref().writes > 180, "{} writes", s.get_ref().writes);
    let (reader, writer) = futures::AsyncReadExt::split(s.compat());
    let network = twoparty::VatNetwork::new(reader, writer, Side::Client, Default::default());
    let mut rpc_system = RpcSystem::new(Box::new(network), None);
    let office: office_capnp::Client = rpc_system.bootstrap(Side::Server);
    let disconnector = rpc_system.get_disconnector();
    tokio::task::spawn_local(rpc_system);
    let seen = bounded("a call written byte by byte", STEP, whoami(&office))
        .await
        .unwrap();
    assert_eq!(seen, me.vat_id().to_string());
    drop(office);
    bounded("disconnecting", STEP, disconnector).await.unwrap();
}

#[tokio::test]
async fn hostile_framing_is_refused_at_once_and_frees_the_only_slot() {
    LocalSet::new()
        .run_until(async {
            // A long handshake timeout: these must end long before it.
            let (addr, vat) = one_at_a_time_server(Duration::from_secs(60)).await;
            served(addr, vat, "start").await;
            let junk = [0x5a; 64];
            let cases: [(&str, bool, Vec<u8>); 4] = [
                (
                    "an oversized message 1",
                    false,
                    [&[0xff, 0xff][..], &junk].concat(),
                ),
                (
                    "a zero-length message 1",
                    false,
                    [&[0, 0][..], &junk].concat(),
                ),
                (
                    "an oversized message 3",
                    true,
                    [&[0xff, 0xff][..], &junk].concat(),
                ),
                (
                    "a zero-length message 3",
                    true,
                    [&[0, 0][..], &junk].concat(),
                ),
            ];
            for (what, at_msg3, bad) in cases {
                let got = bounded(what, STEP, hostile_framing(addr, at_msg3, &bad)).await;
                if at_msg3 {
                    // Message 2 and nothing more: no error frame exists.
                    let msg2_len = 2 + u16::from_be_bytes([got[0], got[1]]) as usize;
                    assert_eq!(got.len(), msg2_len, "{what}");
                } else {
                    // Not even message 2.
                    assert!(got.is_empty(), "{what}: the server sent {got:?}");
                }
                served(addr, vat, what).await;
            }
            // Frames split over as many reads as possible: accepted.
            trickling_client(addr, vat).await;
            served(addr, vat, "the trickling client").await;
        })
        .await;
}

#[tokio::test]
async fn stalled_and_trickling_handshakes_end_at_the_timeout_and_free_the_only_slot() {
    LocalSet::new()
        .run_until(async {
            let timeout = Duration::from_secs(2);
            let (addr, vat) = one_at_a_time_server(timeout).await;
            let (_, flight) = first_flight();
            let pre_len = 13 + flight[12] as usize;

            // The preamble, then silence.
            let started = Instant::now();
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&flight[..pre_len]).await.unwrap();
            let got = bounded("a stalled handshake", Duration::from_secs(6), read_all(&mut tcp)).await.0;
            let waited = started.elapsed();
            assert!(got.is_empty(), "{got:?}");
            assert!(waited >= timeout, "closed after {waited:?}, before its time");
            drop(tcp);
            served(addr, vat, "a stalled handshake").await;

            // A slowloris: the genuine first flight, one byte a second. Each
            // byte comes well within the timeout; the whole handshake does not.
            let started = Instant::now();
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let mut sent = 0;
            let mut buf = [0u8; 256];
            let mut received = 0;
            let hung_up = async {
                loop {
                    tokio::select! {
                        r = tcp.read(&mut buf) => match r {
                            Ok(0) | Err(_) => return,
                            Ok(n) => received += n,
                        },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            if sent < flight.len() && tcp.write_all(&flight[sent..=sent]).await.is_ok() {
                                sent += 1;
                            }
                        }
                    }
                }
            };
            bounded("a slowloris", Duration::from_secs(6), hung_up).await;
            let waited = started.elapsed();
            assert_eq!(received, 0);
            assert!(waited >= timeout, "closed after {waited:?}, before its time");
            assert!((1..flight.len()).contains(&sent), "{sent} bytes trickled");
            drop(tcp);
            served(addr, vat, "a slowloris").await;
        })
        .await;
}
