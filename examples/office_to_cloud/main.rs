//! `cargo run --release --example office_to_cloud`
//!
//! `office_to_cloud --serve [ADDRESS]` runs only the cloud (on
//! 127.0.0.1:0 by default) until it is stopped, for an office elsewhere: the
//! C++ demo, `examples/cpp`, calls it with `office_to_cloud ADDRESS VATID`.
//!
//! An office machine calls a cloud service with Cap'n Proto RPC over
//! capnp-noise, on loopback, with no setup: both identities are made in
//! memory, the office pins the cloud's VatId (no certificates, no CA), the
//! cloud sees which vat calls, a capability travels each way, and an
//! impostor with another key at the same address is refused before the
//! office reveals who it is. `RUST_LOG=capnp_noise=info` shows the glue's logs.
//! `CAPNP_NOISE_KEYLOG=FILE` makes both ends write their session keys to
//! FILE for `capnp-noise decode` (research only: see SPEC.md appendix A).

use capnp_noise_test::office;

use std::net::SocketAddr;
use std::sync::Arc;

use capnp::capability::Rc;
use capnp_noise::rpc::{self, ClientConfig, ServerConfig};
use capnp_noise::stream::{self, StreamConfig};
use capnp_noise::wire::HandshakeConfig;
use capnp_noise::{AnyVat, Identity, Pinned};
use capnp_noise_test::schema::demo_capnp::{callback, office as office_capnp};
use tokio::net::TcpListener;
use tokio::task::LocalSet;

/// The office's callback: a capability passed from client to server.
struct Printer;

impl callback::Server for Printer {
    async fn notify(
        self: Rc<Self>,
        params: callback::NotifyParams,
        _: callback::NotifyResults,
    ) -> Result<(), capnp::Error> {
        println!(
            "  office: the cloud called back: {}",
            params.get()?.get_msg()?.to_str()?
        );
        Ok(())
    }
}

fn rpc_err(e: capnp::Error) -> Box<dyn std::error::Error> {
    e.to_string().into()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => LocalSet::new().run_until(demo()).await,
        ["--serve"] => LocalSet::new().run_until(serve("127.0.0.1:0")).await,
        ["--serve", addr] => LocalSet::new().run_until(serve(addr)).await,
        _ => Err("usage: office_to_cloud [--serve [ADDRESS]]".into()),
    }
}

/// Only the cloud: serves the demo's Office to any vat until stopped.
async fn serve(addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    let cloud = Identity::generate();
    let listener = TcpListener::bind(addr).await?;
    println!(
        "cloud {} listening on {}",
        cloud.vat_id(),
        listener.local_addr()?
    );
    rpc::serve(
        listener,
        cloud,
        Arc::new(AnyVat),
        ServerConfig::default(),
        office::Office::bootstrap,
    )
    .await;
    Ok(())
}

async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let cloud = Identity::generate();
    let office = Identity::generate();
    // Off unless CAPNP_NOISE_KEYLOG is set (with a warning).
    let handshake =
        HandshakeConfig::default().with_key_log(capnp_noise_test::support::key_log_from_env());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("cloud  {} listening on {addr}", cloud.vat_id());
    println!("office {}", office.vat_id());

    // The cloud serves any vat that proves its key, and builds each
    // connection's Office from the caller's VatId.
    let server = tokio::task::spawn_local(rpc::serve(
        listener,
        cloud.clone(),
        Arc::new(AnyVat),
        ServerConfig::default().with_handshake(handshake.clone()),
        office::Office::bootstrap,
    ));

    // The office pins the cloud's VatId.
    println!("\n1. the office connects, pinning the cloud's VatId");
    let (client, conn): (office_capnp::Client, _) = rpc::connect(
        addr,
        &office,
        Arc::new(Pinned(cloud.vat_id())),
        ClientConfig::default().with_handshake(handshake.clone()),
    )
    .await?;
    println!(
        "  office: connected to {}",
        conn.peer()
            .expect("connected without resuming")
            .vat_id
            .fingerprint()
    );

    let reply = client
        .whoami_request()
        .send()
        .promise
        .await
        .map_err(rpc_err)?;
    let seen = reply
        .get()
        .map_err(rpc_err)?
        .get_vat_id()
        .map_err(rpc_err)?
        .to_str()?
        .to_string();
    println!("  office: whoami -> {seen}");
    println!(
        "  the cloud sees the office's own VatId: {}",
        seen == office.vat_id().to_string()
    );

    let mut req = client.echo_request();
    req.get().set_data(b"quarterly report");
    let reply = req.send().promise.await.map_err(rpc_err)?;
    let echoed = reply.get().map_err(rpc_err)?.get_data().map_err(rpc_err)?;
    println!("  office: echo -> {:?}", String::from_utf8_lossy(echoed));

    println!("\n2. capabilities both ways: a callback to the cloud, a subscription back");
    let mut req = client.subscribe_request();
    req.get()
        .set_callback(capnp_rpc::new_client::<callback::Client, _>(Printer));
    req.get().set_count(2);
    let reply = req.send().promise.await.map_err(rpc_err)?;
    let subscription = reply
        .get()
        .map_err(rpc_err)?
        .get_subscription()
        .map_err(rpc_err)?;
    let reply = subscription
        .delivered_request()
        .send()
        .promise
        .await
        .map_err(rpc_err)?;
    let r = reply.get().map_err(rpc_err)?;
    println!(
        "  office: the subscription capability says {} notifications went to {}",
        r.get_count(),
        VatText(r.get_subscriber().map_err(rpc_err)?.to_str()?)
    );
    conn.disconnect().await?;

    println!("\n3. an impostor with another key takes over {addr}");
    server.abort();
    let _ = server.await;
    let impostor = Identity::generate();
    let listener = TcpListener::bind(addr).await?;
    let fake = tokio::task::spawn_local(impostor_server(listener, impostor.clone()));
    let refused = rpc::connect::<_, office_capnp::Client>(
        addr,
        &office,
        Arc::new(Pinned(cloud.vat_id())),
        ClientConfig::default(),
    )
    .await;
    match refused {
        Err(e) => println!("  office: refused the impostor before revealing who it is:\n    {e}"),
        Ok(_) => return Err("the impostor was accepted".into()),
    }
    let learned = fake.await?;
    println!(
        "  impostor {}:\n    {learned}",
        impostor.vat_id().fingerprint()
    );
    Ok(())
}

/// Accepts one connection with a key that is not the cloud's, and reports
/// what it learned about the client.
async fn impostor_server(listener: TcpListener, me: Identity) -> String {
    let (tcp, remote): (_, SocketAddr) = match listener.accept().await {
        Ok(a) => a,
        Err(e) => return format!("accept failed: {e}"),
    };
    let config = StreamConfig::default().with_remote_addr(remote);
    match stream::accept(tcp, &me, Arc::new(AnyVat), config).await {
        Ok(s) => format!("learned the client's VatId {}", s.peer_vat_id()),
        Err(e) => format!("never learned who called ({e})"),
    }
}

/// Shortens a VatId for display.
struct VatText<'a>(&'a str);

impl std::fmt::Display for VatText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.get(..16).unwrap_or(self.0))
    }
}
