//! Each trust policy over real loopback TCP connections, both directions:
//! a server with an allow-list file edited while it runs, a client with
//! trust on first use keyed by the address it dialed, pinning, closures.

use std::sync::Arc;
use std::time::Duration;

use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::{
    AllowList, AnyVat, Error, Identity, PeerContext, PeerPolicy, Pinned, Refusal, Tofu, VatId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server that accepts with `policy`, and for each accepted peer writes
/// the peer's VatId back and closes. Returns its address.
async fn server(identity: Identity, policy: Arc<dyn PeerPolicy>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = listener.accept().await.unwrap();
            let identity = identity.clone();
            let policy = policy.clone();
            tokio::spawn(async move {
                let config = StreamConfig::default().with_remote_addr(remote);
                if let Ok(mut s) = stream::accept(tcp, &identity, policy, config).await {
                    let _ = s.write_all(s.peer_vat_id().to_string().as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
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
    let addr = server(Identity::generate(), Arc::new(list)).await;

    let (_, seen) = client(&alice, Arc::new(AnyVat), addr, "a").await.unwrap();
    assert_eq!(seen, alice.vat_id().to_string());
    let refused = client(&bob, Arc::new(AnyVat), addr, "a").await.unwrap_err();
    assert!(
        matches!(refused, Error::Io(_) | Error::UnexpectedEof { .. }),
        "{refused}"
    );

    // Add bob, remove alice: no restart.
    std::fs::write(&path, format!("# team\n{}\n", bob.vat_id())).unwrap();
    let (_, seen) = client(&bob, Arc::new(AnyVat), addr, "a").await.unwrap();
    assert_eq!(seen, bob.vat_id().to_string());
    assert!(client(&alice, Arc::new(AnyVat), addr, "a").await.is_err());
}

#[tokio::test]
async fn tofu_records_then_refuses_a_changed_key() {
    let dir = tempfile::tempdir().unwrap();
    let known = dir.path().join("known_vats");
    let me = Identity::generate();
    let first = Identity::generate();
    let first_vat = first.vat_id();
    let addr1 = server(first, Arc::new(AnyVat)).await;
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
    let addr2 = server(second, Arc::new(AnyVat)).await;
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
    let addr = server(srv, Arc::new(only_cli)).await;
    let (vat, seen) = client(&cli, Arc::new(Pinned(srv_vat)), addr, "x")
        .await
        .unwrap();
    assert_eq!((vat, seen), (srv_vat, cli_vat.to_string()));
    // Client pinned to someone else: refused before it reveals itself.
    let e = client(&cli, Arc::new(Pinned(stranger.vat_id())), addr, "x")
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::PeerRefused { vat_id, .. } if vat_id == srv_vat),
        "{e}"
    );
    // The server's closure refuses the stranger: the stranger's stream ends without a close.
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        client(&stranger, Arc::new(AnyVat), addr, "x"),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        e.to_string().contains("may have refused")
            || matches!(e, Error::Io(_) | Error::UnexpectedEof { .. }),
        "{e}"
    );
}
