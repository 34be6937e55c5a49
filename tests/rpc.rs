#[path = "../examples/office_to_cloud/office.rs"]
mod office;

use std::sync::Arc;

use capnp_noise::rpc::{self, ClientOptions, ServerOptions};
use capnp_noise::schema::demo_capnp::office as office_capnp;
use capnp_noise::{AnyVat, Identity, Pinned};
use tokio::net::TcpListener;
use tokio::task::LocalSet;

#[tokio::test]
async fn whoami() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .try_init();
    LocalSet::new()
        .run_until(async {
            let server = Identity::generate();
            let client = Identity::generate();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::task::spawn_local(rpc::serve(
                listener,
                server.clone(),
                Arc::new(AnyVat),
                ServerOptions::default(),
                office::Office::bootstrap,
            ));
            let (office, conn): (office_capnp::Client, _) = rpc::connect(
                addr,
                &client,
                Arc::new(Pinned(server.vat_id())),
                ClientOptions::default(),
            )
            .await
            .unwrap();
            let reply = office.whoami_request().send().promise.await.unwrap();
            assert_eq!(
                reply.get().unwrap().get_vat_id().unwrap().to_str().unwrap(),
                client.vat_id().to_string()
            );
            conn.disconnect().await.unwrap();
        })
        .await;
}
