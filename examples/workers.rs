//! `cargo run --example workers [WORKERS] [CLIENTS]`
//!
//! An RPC server on every core: `rpc::Server` with WORKERS worker threads
//! (default: one per core) serves CLIENTS clients (default 8), each on a
//! thread of its own. Every connection gets its own `Office` capability,
//! built on the worker that took the connection (it is `!Send` and stays
//! there); what the connections share, a visit counter, is an
//! `Arc<Mutex<..>>` the factory clones into each one. Each client prints
//! which worker served it. `RUST_LOG=capnp_noise=info` shows the logs.

use std::sync::{Arc, Mutex};

use capnp::capability::Rc;
use capnp_noise::rpc::{self, ClientConfig, PeerInfo, Server, ServerConfig};
use capnp_noise::{AnyVat, Identity, Pinned, VatId};
use capnp_noise_test::schema::demo_capnp::office;

/// One connection's capability.
struct Office {
    caller: VatId,
    /// The worker thread it was built on.
    worker: String,
    /// Shared by every connection on every worker.
    visits: Arc<Mutex<u64>>,
}

impl office::Server for Office {
    async fn whoami(
        self: Rc<Self>,
        _: office::WhoamiParams,
        mut results: office::WhoamiResults,
    ) -> Result<(), capnp::Error> {
        let visit = {
            let mut visits = self.visits.lock().unwrap_or_else(|e| e.into_inner());
            *visits += 1;
            *visits
        };
        results.get().set_vat_id(format!(
            "{} served by {}, visit {visit}",
            self.caller.fingerprint(),
            self.worker
        ));
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let workers: usize = args.next().map_or(Ok(0), |a| a.parse())?;
    let clients: usize = args.next().map_or(Ok(8), |a| a.parse())?;

    let server_id = Identity::generate();
    let visits = Arc::new(Mutex::new(0u64));
    let server = Server::builder(
        server_id.clone(),
        move |peer: &PeerInfo| -> office::Client {
            capnp_rpc::new_client(Office {
                caller: peer.vat_id,
                worker: std::thread::current().name().unwrap_or("?").to_string(),
                visits: visits.clone(),
            })
        },
    )
    .policy(Arc::new(AnyVat))
    .config(ServerConfig::default())
    .workers(workers)
    .serve(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    println!(
        "server {} on {} with {} workers",
        server_id.vat_id().fingerprint(),
        server.local_addr(),
        server.workers()
    );

    let addr = server.local_addr();
    let server_vat = server_id.vat_id();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || -> Result<String, String> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let me = Identity::generate();
                    let (office, connection): (office::Client, _) = rpc::connect(
                        addr,
                        &me,
                        Arc::new(Pinned(server_vat)),
                        ClientConfig::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    let reply = office
                        .whoami_request()
                        .send()
                        .promise
                        .await
                        .map_err(|e| e.to_string())?;
                    let text = reply
                        .get()
                        .and_then(|r| r.get_vat_id())
                        .map_err(|e| e.to_string())?
                        .to_string()
                        .map_err(|e| e.to_string())?;
                    connection.disconnect().await.map_err(|e| e.to_string())?;
                    Ok(text)
                })
            })
        })
        .collect();
    for thread in threads {
        match thread.join() {
            Ok(Ok(line)) => println!("{line}"),
            Ok(Err(e)) => println!("client failed: {e}"),
            Err(_) => println!("client thread panicked"),
        }
    }
    server.shutdown();
    println!("server shut down: every worker joined");
    Ok(())
}
