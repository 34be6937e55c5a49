//! Noise Pipes (SPEC.md 14) through `rpc::connect` and `rpc::serve`: a client
//! with `ClientConfig::resumption` resumes with servers it knows, its first
//! calls going with `IK` message 1; restarts with the same key file keep
//! resuming; a changed key or a server without `IK` falls back and the calls
//! still succeed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capnp_noise::rpc::{self, ClientConfig, ClientResumption, PeerInfo, ServerConfig};
use capnp_noise::wire::{EarlyDataChoice, EarlyDataOutcome, ResumptionCache, ResumptionConfig};
use capnp_noise::{AnyVat, Identity, Pinned, VatId};
use capnp_noise_test::office;
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_noise_test::support::{bounded, local, whoami};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(20);

/// `rpc::serve` of the office as `id`, until the handle is aborted.
async fn serve(id: Identity, resumption: ResumptionConfig) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::task::spawn_local(rpc::serve(
        listener,
        id,
        Arc::new(AnyVat),
        ServerConfig::default().with_resumption(resumption),
        office::Office::bootstrap,
    ));
    (addr, server)
}

fn ik_and_early() -> ResumptionConfig {
    ResumptionConfig::default()
        .with_accept_ik(true)
        .with_accept_early_data(true)
}

/// Connects with resumption, makes one call, and returns what the
/// connection says of the server, and whether `connect` returned before
/// the handshake (a lazy, resuming connection).
async fn call(
    addr: SocketAddr,
    server: VatId,
    cache: &Arc<ResumptionCache>,
    early: EarlyDataChoice,
) -> (PeerInfo, bool) {
    let me = Identity::from_seed(&[0x11; 32]);
    let options = ClientConfig::default().with_resumption(Some(
        ClientResumption::new(cache.clone()).with_early_data(early),
    ));
    let (office, conn): (office_capnp::Client, _) = bounded(
        "connect",
        LIMIT,
        rpc::connect(addr, &me, Arc::new(Pinned(server)), options),
    )
    .await
    .unwrap();
    let lazy = conn.peer().is_none();
    let who = bounded("the first call", LIMIT, whoami(&office))
        .await
        .unwrap();
    assert_eq!(who, me.vat_id().to_string());
    let peer = conn.established().await.unwrap().clone();
    assert_eq!(peer.vat_id, server);
    bounded("disconnect", LIMIT, conn.disconnect())
        .await
        .unwrap();
    (peer, lazy)
}

#[tokio::test]
async fn a_second_connect_to_the_same_server_resumes_with_ik() {
    local(async {
        let id = Identity::generate();
        let (addr, server) = serve(id.clone(), ik_and_early()).await;
        let cache = Arc::new(ResumptionCache::new(8));
        let never = EarlyDataChoice::Never;
        // First: XX, returned after the handshake, the server recorded.
        let (first, lazy) = call(addr, id.vat_id(), &cache, never).await;
        assert!(!first.resumed && !lazy);
        assert!(cache.get(&id.vat_id()).is_some());
        // Second: IK, lazily; the first call right after IK message 2.
        let (second, lazy) = call(addr, id.vat_id(), &cache, never).await;
        assert!(second.resumed && lazy);
        assert_eq!(second.early_data, EarlyDataOutcome::NotSent);
        // Third, early data allowed: the calls ride in IK message 1.
        let early = EarlyDataChoice::ReplayableNotForwardSecret;
        let (third, _) = call(addr, id.vat_id(), &cache, early).await;
        assert!(third.resumed);
        assert_eq!(third.early_data, EarlyDataOutcome::Accepted);
        // Without ClientConfig::resumption: XX, whatever the cache holds.
        let me = Identity::generate();
        let (office, conn): (office_capnp::Client, _) = rpc::connect(
            addr,
            &me,
            Arc::new(Pinned(id.vat_id())),
            ClientConfig::default(),
        )
        .await
        .unwrap();
        whoami(&office).await.unwrap();
        assert!(!conn.peer().expect("not lazy").resumed);
        conn.disconnect().await.unwrap();
        server.abort();
    })
    .await;
}

/// SPEC.md 14.1: the static key is derived from the key file, so a server
/// restarted from the same file is resumed with, not fallen back from.
#[tokio::test]
async fn a_server_restarted_from_the_same_key_file_is_still_resumed() {
    local(async {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("server.pem");
        Identity::generate().save(&key, false).unwrap();
        let cache = Arc::new(ResumptionCache::new(8));
        let early = EarlyDataChoice::ReplayableNotForwardSecret;
        let (addr, before) = serve(Identity::load(&key).unwrap(), ik_and_early()).await;
        let vat = Identity::load(&key).unwrap().vat_id();
        let (first, _) = call(addr, vat, &cache, early).await;
        assert!(!first.resumed);
        before.abort();
        // The restart: a new process would load the file again.
        let (addr, after) = serve(Identity::load(&key).unwrap(), ik_and_early()).await;
        let (second, lazy) = call(addr, vat, &cache, early).await;
        assert!(lazy);
        assert!(
            second.resumed,
            "fell back: the restarted server has another static key"
        );
        assert_eq!(second.early_data, EarlyDataOutcome::Accepted);
        after.abort();
    })
    .await;
}

/// A server whose static key changed (same VatId) answers IK with the XX
/// fallback: the call still succeeds, the early data is sent again after
/// the handshake, and the record follows the new key.
#[tokio::test]
async fn a_server_with_a_changed_key_falls_back_and_the_call_succeeds() {
    local(async {
        let seed = [0x42; 32];
        let old = Identity::from_seed_and_static_key(&seed, &[0x01; 32]);
        let new = Identity::from_seed_and_static_key(&seed, &[0x02; 32]);
        let cache = Arc::new(ResumptionCache::new(8));
        let early = EarlyDataChoice::ReplayableNotForwardSecret;
        let (addr, server) = serve(old.clone(), ik_and_early()).await;
        call(addr, old.vat_id(), &cache, early).await;
        server.abort();
        let (addr, server) = serve(new.clone(), ik_and_early()).await;
        let (peer, lazy) = call(addr, new.vat_id(), &cache, early).await;
        assert!(lazy && !peer.resumed);
        assert_eq!(peer.early_data, EarlyDataOutcome::FellBack);
        let record = cache.get(&new.vat_id()).expect("recorded by the fallback");
        assert_eq!(record.static_key(), new.noise_static_public());
        // And the next connection resumes with the new key.
        let (peer, _) = call(addr, new.vat_id(), &cache, early).await;
        assert!(peer.resumed);
        server.abort();
    })
    .await;
}

/// A server with IK off (the default) answers with the fallback; the call
/// succeeds, and the client forgets the record (the fallback authenticated
/// the very key it held: the server does not answer IK), so its next
/// connection runs XX again.
#[tokio::test]
async fn a_server_with_ik_off_makes_the_client_fall_back_and_forget_the_record() {
    local(async {
        let id = Identity::generate();
        let (addr, server) = serve(id.clone(), ResumptionConfig::default()).await;
        let cache = Arc::new(ResumptionCache::new(8));
        let early = EarlyDataChoice::ReplayableNotForwardSecret;
        let (first, _) = call(addr, id.vat_id(), &cache, early).await;
        assert!(!first.resumed);
        assert!(cache.get(&id.vat_id()).is_some());
        let (second, lazy) = call(addr, id.vat_id(), &cache, early).await;
        assert!(lazy && !second.resumed);
        assert_eq!(second.early_data, EarlyDataOutcome::FellBack);
        assert!(cache.get(&id.vat_id()).is_none(), "the record is forgotten");
        let (third, lazy) = call(addr, id.vat_id(), &cache, early).await;
        assert!(!lazy && !third.resumed, "XX again");
        server.abort();
    })
    .await;
}

/// On a resuming connection the handshake runs after `connect` returned:
/// its error (here: the address now leads to another vat, which the pinned
/// policy refuses after the fallback) fails the first call, and
/// `Connection::established` returns it.
#[tokio::test]
async fn a_resumed_connection_reports_its_handshake_error_at_the_first_call() {
    local(async {
        let id = Identity::generate();
        let (addr, server) = serve(id.clone(), ik_and_early()).await;
        let cache = Arc::new(ResumptionCache::new(8));
        let early = EarlyDataChoice::ReplayableNotForwardSecret;
        call(addr, id.vat_id(), &cache, early).await;
        server.abort();
        // Records are kept by VatId: the client resumes with `id` wherever
        // it dials, here an address where another vat answers.
        let (addr, other) = serve(Identity::generate(), ik_and_early()).await;
        let me = Identity::from_seed(&[0x11; 32]);
        let options = ClientConfig::default().with_resumption(Some(
            ClientResumption::new(cache.clone()).with_early_data(early),
        ));
        let (office, conn): (office_capnp::Client, _) =
            rpc::connect(addr, &me, Arc::new(Pinned(id.vat_id())), options)
                .await
                .expect("connect returns before the handshake");
        let e = bounded("the first call", LIMIT, whoami(&office))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let e = conn.established().await.unwrap_err();
        assert!(matches!(e, capnp_noise::Error::PeerRefused { .. }), "{e}");
        let _ = conn.disconnect().await;
        other.abort();
    })
    .await;
}
