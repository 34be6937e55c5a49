//! `cargo run --example introductions`
//!
//! Three vats on loopback: Carol hosts an `Office`, Bob holds one of Carol's
//! offices and introduces it to Alice. Alice redeems the introduction over
//! her own connection to Carol: Carol sees Alice's VatId, and Alice's calls
//! keep working after Bob has shut down. Mallory, replaying the stolen
//! introduction, is refused. `RUST_LOG=capnp_noise=info` shows the logs.

use capnp_noise_test::office;

use std::cell::RefCell;
use std::rc::Rc;

use capnp::capability::FromClientHook;
use capnp_noise::intro::Introduction;
use capnp_noise::network::{Network, Redeemed};
use capnp_noise::rpc::PeerInfo;
use capnp_noise::{Identity, VatId};
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_rpc::CapabilityServerSet;
use office::Office;
use tokio::task::LocalSet;

type Error = Box<dyn std::error::Error>;

/// A vat on 127.0.0.1 that serves each peer an `Office` bound to the peer's
/// VatId; as a provider, it gives the redeemer of an introduced `Office` an
/// `Office` of its own (capnp-rpc tells a server nothing about who calls:
/// the redeemer's VatId is known when the introduction is redeemed).
async fn start_vat() -> Result<Network, Error> {
    let offices: Rc<RefCell<CapabilityServerSet<Office, office_capnp::Client>>> = Rc::default();
    let (for_peers, for_redeemers) = (offices.clone(), offices);
    let network = Network::builder(Identity::generate())
        .listen("127.0.0.1:0".parse()?)
        .bootstrap(move |peer: &PeerInfo| {
            for_peers.borrow_mut().new_client(Office {
                caller: peer.vat_id,
            })
        })
        .on_redeem(move |r: &Redeemed, cap| {
            let office: office_capnp::Client = cap.clone().cast_to();
            if for_redeemers
                .borrow()
                .get_local_server_of_resolved(&office)
                .is_none()
            {
                return cap;
            }
            let caller = r.redeemer;
            for_redeemers
                .borrow_mut()
                .new_client(Office { caller })
                .client
        })
        .start()
        .await?;
    Ok(network)
}

async fn whoami(office: &office_capnp::Client) -> Result<String, Error> {
    let reply = office.whoami_request().send().promise.await?;
    let vat: VatId = reply.get()?.get_vat_id()?.to_str()?.parse()?;
    Ok(vat.fingerprint())
}

async fn demo() -> Result<(), Error> {
    let (alice, bob, carol) = (start_vat().await?, start_vat().await?, start_vat().await?);
    println!("alice   {}", alice.vat_id().fingerprint());
    println!("bob     {}", bob.vat_id().fingerprint());
    println!(
        "carol   {}  listening on {}",
        carol.vat_id().fingerprint(),
        carol.advertised_addresses()[0]
    );

    bob.add_addresses(carol.vat_id(), carol.advertised_addresses());
    let bobs_office: office_capnp::Client = bob.connect(&carol.vat_id()).await?;
    println!(
        "\n1. bob calls his office at carol; carol sees {}",
        whoami(&bobs_office).await?
    );

    let intro = bob
        .introduce(&bobs_office, &carol.vat_id(), &alice.vat_id())
        .await?;
    let bytes = intro.encode(); // what travels from Bob to Alice, by any channel
    println!(
        "2. bob introduces it to alice: {} signed bytes, for alice only, once",
        bytes.len()
    );

    let received = Introduction::decode(&bytes)?;
    let office: office_capnp::Client = alice.redeem(&received).await?;
    println!(
        "3. alice redeems it over her own connection; carol sees {}",
        whoami(&office).await?
    );

    bob.shutdown().await;
    println!("4. bob shuts down");
    let peers: Vec<String> = alice
        .connections()
        .iter()
        .map(|c| c.peer.vat_id.fingerprint())
        .collect();
    println!(
        "5. alice calls again: carol sees {}; alice's connections: {peers:?}",
        whoami(&office).await?
    );

    let mallory = start_vat().await?;
    let stolen = mallory.redeem::<office_capnp::Client>(&received).await;
    let again = alice.redeem::<office_capnp::Client>(&received).await;
    println!(
        "6. mallory presents the stolen introduction: {}",
        stolen.err().map_or("accepted?!".into(), |e| e.to_string())
    );
    println!(
        "   alice presents it a second time: {}",
        again.err().map_or("accepted?!".into(), |e| e.to_string())
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "off".into()),
        )
        .init();
    LocalSet::new().run_until(demo()).await
}
