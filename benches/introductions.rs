//! Round-trip time of Alice's calls to an object hosted by Carol: over the
//! direct connection an introduction gives her, and proxied through Bob
//! (plain capnp-rpc, level 1: Bob passes Alice the capability itself, and
//! every call goes Alice -> Bob -> Carol and back).
//!
//! `cargo bench --bench introductions`
//!
//! The three vats run on loopback in one thread (one `LocalSet`), so the
//! figures include every vat's processing on one core: they compare one hop
//! with two, not machines. Calls are made one at a time (`echo` of 16 bytes).

use capnp_noise_test::office;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp_noise::network::Network;
use capnp_noise::rpc::PeerInfo;
use capnp_noise::Identity;
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use office::Office;
use tokio::task::LocalSet;

const WARMUP: usize = 300;
const CALLS: usize = 3000;

type Error = Box<dyn std::error::Error>;

async fn vat(
    bootstrap: impl Fn(&PeerInfo) -> office_capnp::Client + 'static,
) -> Result<Network, Error> {
    // The benchmark measures the path, not whom the Office answers as: an
    // introduced Office is handed over as it is (an application would
    // build the redeemer its own in on_redeem).
    Ok(Network::builder(Identity::generate())
        .listen("127.0.0.1:0".parse()?)
        .bootstrap(bootstrap)
        .hand_off_as_is()
        .start()
        .await?)
}

/// Round-trip times of `n` sequential `echo` calls.
async fn times(office: &office_capnp::Client, n: usize) -> Result<Vec<Duration>, Error> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let mut req = office.echo_request();
        req.get().set_data(&[7u8; 16]);
        let reply = req.send().promise.await?;
        assert_eq!(reply.get()?.get_data()?.len(), 16);
        out.push(start.elapsed());
    }
    Ok(out)
}

fn summary(mut t: Vec<Duration>) -> (Duration, Duration) {
    t.sort();
    (t[t.len() / 2], t[t.len() * 9 / 10])
}

async fn bench() -> Result<(), Error> {
    let carol = vat(|peer: &PeerInfo| {
        capnp_rpc::new_client(Office {
            caller: peer.vat_id,
        })
    })
    .await?;
    // Bob's bootstrap for Alice is Carol's office itself, which capnp-rpc
    // proxies: Alice's calls on it go through Bob.
    let held: Rc<RefCell<Option<office_capnp::Client>>> = Rc::default();
    let for_alice = held.clone();
    let bob = vat(move |_: &PeerInfo| {
        for_alice
            .borrow()
            .clone()
            .expect("Bob holds Carol's office")
    })
    .await?;
    let alice = vat(|peer: &PeerInfo| {
        capnp_rpc::new_client(Office {
            caller: peer.vat_id,
        })
    })
    .await?;

    bob.add_addresses(carol.vat_id(), carol.advertised_addresses());
    let at_carol: office_capnp::Client = bob.connect(&carol.vat_id()).await?;
    *held.borrow_mut() = Some(at_carol.clone());

    alice.add_addresses(bob.vat_id(), bob.advertised_addresses());
    let proxied: office_capnp::Client = alice.connect(&bob.vat_id()).await?;
    let intro = bob
        .introduce(&at_carol, &carol.vat_id(), &alice.vat_id())
        .await?;
    let direct: office_capnp::Client = alice.redeem(&intro).await?;

    // Warm up both paths, then alternate halves so that drift hits both.
    times(&direct, WARMUP).await?;
    times(&proxied, WARMUP).await?;
    let (mut d, mut p) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        d.extend(times(&direct, CALLS / 2).await?);
        p.extend(times(&proxied, CALLS / 2).await?);
    }
    let (d50, d90) = summary(d);
    let (p50, p90) = summary(p);
    println!("introductions: {CALLS} sequential echo calls (16 bytes) from Alice to Carol's object, loopback, one thread");
    println!("  direct (after the introduction): median {d50:>9.1?}  p90 {d90:>9.1?}");
    println!("  proxied through Bob (level 1):   median {p50:>9.1?}  p90 {p90:>9.1?}");
    println!(
        "  proxied / direct (median): {:.2}",
        p50.as_secs_f64() / d50.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(LocalSet::new().run_until(bench()))
}
