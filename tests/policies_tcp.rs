//! Each trust policy over real loopback TCP connections, both directions:
//! a server with an allow-list file edited while it runs, a client with
//! trust on first use keyed by the address it dialed, pinning, closures.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::wire::transport::EOF_BEFORE_RESPONDER_SPOKE;
use capnp_noise::{
    AllowList, AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, Refusal, Tofu, VatId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the server made of one connection, as its own accept saw it.
#[derive(Debug)]
enum Seen {
    /// Accepted this peer.
    Accepted(VatId),
    /// The accept failed (a refusal is `Error::PeerRefused`).
    Failed(Error),
    /// The connection's task panicked (the policy runs in it): never to be
    /// taken for a refusal, although the client sees the same end.
    Panicked(String),
}

/// A server that accepts with `policy`, and for each accepted peer writes
/// the peer's VatId back and closes. Returns its address and what it made
/// of each connection, in order.
async fn server(
    identity: Identity,
    policy: Arc<dyn PeerPolicy>,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = listener.accept().await.unwrap();
            let identity = identity.clone();
            let policy = policy.clone();
            let connection = tokio::spawn(async move {
                let config = StreamConfig::default().with_remote_addr(remote);
                match stream::accept(tcp, &identity, policy, config).await {
                    Ok(mut s) => {
                        let _ = s.write_all(s.peer_vat_id().to_string().as_bytes()).await;
                        let _ = s.shutdown().await;
                        Seen::Accepted(s.peer_vat_id())
                    }
                    Err(e) => Seen::Failed(e),
                }
            });
            // Sequential: the tests make one connection at a time.
            let _ = tx.send(match connection.await {
                Ok(seen) => seen,
                Err(e) => Seen::Panicked(e.to_string()),
            });
        }
    });
    (addr, seen)
}

/// The server's verdict on the next connection; a panic there fails the test.
async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Result<VatId, Error> {
    let next = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the server saw no connection within 10 s")
        .expect("the server stopped");
    match next {
        Seen::Accepted(vat) => Ok(vat),
        Seen::Failed(e) => Err(e),
        Seen::Panicked(e) => panic!("the server's connection task panicked: {e}"),
    }
}

/// The server refused `client` with a reason containing `why`: its accept
/// says so, and the client saw the end a refusing responder makes (the
/// stream ends right after the handshake, before the responder sent
/// anything), not another error.
async fn refused_by_server(
    client_saw: Result<(VatId, String), Error>,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    client: &VatId,
    why: &str,
) {
    let e = client_saw.expect_err("the client was served");
    assert_eq!(e.io_kind(), io::ErrorKind::UnexpectedEof, "{e}");
    assert!(e.to_string().contains(EOF_BEFORE_RESPONDER_SPOKE), "{e}");
    match next_seen(seen).await {
        Err(Error::PeerRefused { vat_id, reason }) => {
            assert_eq!(vat_id, *client);
            assert!(reason.contains(why), "{reason}");
        }
        other => panic!("the server should have refused {client}: {other:?}"),
    }
}

/// Connects with `policy`; on success returns the server's VatId and what
/// the server says our VatId is.
async fn client(
    identity: &Identity,
    policy: Arc<dyn PeerPolicy>,
    addr: std::net::SocketAddr,
    dialed: &str,
) -> Result<(VatId, String), Error> {
    let tcp = TcpStream::connect(addr).await?;
    let config = StreamConfig::default().with_dialed(dialed);
    let mut s = stream::connect(tcp, identity, policy, config).await?;
    let mut seen = String::new();
    s.read_to_string(&mut seen).await?;
    Ok((s.peer_vat_id(), seen))
}

#[tokio::test]
async fn allow_list_file_is_reloaded_while_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("allowed");
    let (alice, bob) = (Identity::generate(), Identity::generate());
    std::fs::write(&path, format!("{}  alice's laptop\n", alice.vat_id())).unwrap();
    let list = AllowList::load(&path).unwrap();
    let (addr, mut verdicts) = server(Identity::generate(), Arc::new(list)).await;

    // Each time: the listed vat is served, the other refused.
    let mut served_and_refused = async |listed: &Identity, unlisted: &Identity| {
        let (_, seen) = client(listed, Arc::new(AnyVat), addr, "a").await.unwrap();
        assert_eq!(seen, listed.vat_id().to_string());
        assert_eq!(next_seen(&mut verdicts).await.unwrap(), listed.vat_id());
        let refused = client(unlisted, Arc::new(AnyVat), addr, "a").await;
        let why = "not in the allow-list";
        refused_by_server(refused, &mut verdicts, &unlisted.vat_id(), why).await;
    };
    served_and_refused(&alice, &bob).await;
    // Add bob, remove alice: no restart.
    std::fs::write(&path, format!("# team\n{}\n", bob.vat_id())).unwrap();
    served_and_refused(&bob, &alice).await;
}

#[tokio::test]
async fn tofu_records_then_refuses_a_changed_key() {
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known_vats");
    let me = Identity::generate();
    let first = Identity::generate();
    let first_vat = first.vat_id();
    let (addr1, _verdicts1) = server(first, Arc::new(AnyVat)).await;
    let tofu: Arc<dyn PeerPolicy> = Arc::new(Tofu::new(&known));
    let dialed = "cloud.example:4000";

    let (vat, _) = client(&me, tofu.clone(), addr1, dialed).await.unwrap();
    assert_eq!(vat, first_vat);
    let recorded = std::fs::read_to_string(&known).unwrap();
    assert!(recorded.contains(dialed) && recorded.contains(&first_vat.to_string()));
    // Same key again: accepted.
    client(&me, tofu.clone(), addr1, dialed).await.unwrap();

    // Another vat now answers at the same dialed address: refused, and told how to accept it.
    let second = Identity::generate();
    let second_vat = second.vat_id();
    let (addr2, _verdicts2) = server(second, Arc::new(AnyVat)).await;
    match client(&me, tofu.clone(), addr2, dialed).await.unwrap_err() {
        Error::PeerRefused { vat_id, reason } => {
            assert_eq!(vat_id, second_vat);
            assert!(reason.contains(&first_vat.to_string()), "{reason}");
            assert!(reason.contains("known-vats forget"), "{reason}");
        }
        e => panic!("{e}"),
    }
    // A different dialed address is a different record.
    client(&me, tofu, addr2, "other.example:4000")
        .await
        .unwrap();
}

#[tokio::test]
async fn pinned_and_closure_policies_on_both_sides() {
    let (srv, cli, stranger) = (
        Identity::generate(),
        Identity::generate(),
        Identity::generate(),
    );
    let srv_vat = srv.vat_id();
    let cli_vat = cli.vat_id();
    let only_cli = move |p: &VatId, ctx: &PeerContext| {
        assert!(!ctx.local_is_initiator);
        assert!(ctx.remote_addr.is_some());
        if *p == cli_vat {
            Ok(())
        } else {
            Err(Refusal::new("not on the guest list"))
        }
    };
    let (addr, mut verdicts) = server(srv, Arc::new(only_cli)).await;
    let (vat, seen) = client(&cli, Arc::new(Pinned(srv_vat)), addr, "x")
        .await
        .unwrap();
    assert_eq!((vat, seen), (srv_vat, cli_vat.to_string()));
    assert_eq!(next_seen(&mut verdicts).await.unwrap(), cli_vat);
    // Client pinned to someone else: refused before it reveals itself (the
    // server's handshake ends before message 3, not in its policy).
    let e = client(&cli, Arc::new(Pinned(stranger.vat_id())), addr, "x")
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::PeerRefused { vat_id, .. } if vat_id == srv_vat),
        "{e}"
    );
    let e = next_seen(&mut verdicts).await.unwrap_err();
    assert!(
        matches!(e, Error::UnexpectedEof { during } if during.starts_with("before handshake message 3")),
        "{e}"
    );
    // The server's closure refuses the stranger (and its assertions on the
    // context held: a panic there would fail next_seen).
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        client(&stranger, Arc::new(AnyVat), addr, "x"),
    )
    .await
    .unwrap();
    refused_by_server(
        refused,
        &mut verdicts,
        &stranger.vat_id(),
        "not on the guest list",
    )
    .await;
}
