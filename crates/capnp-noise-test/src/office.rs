//! The demo `Office` service (`schema/demo.capnp` of this crate): it knows which vat calls
//! because the VatId the handshake proved is captured when the connection's
//! bootstrap capability is built. Shared by the examples, tests and benches.

use std::time::Duration;

use crate::schema::demo_capnp::{callback, office, subscription};
use capnp::capability::Rc;
use capnp_noise::rpc::PeerInfo;
use capnp_noise::VatId;

/// One connection's `Office`: `caller` is the peer's authenticated VatId.
pub struct Office {
    /// The caller's authenticated VatId.
    pub caller: VatId,
}

impl Office {
    /// The bootstrap factory to give `rpc::serve`.
    pub fn bootstrap(peer: &PeerInfo) -> office::Client {
        capnp_rpc::new_client(Office {
            caller: peer.vat_id,
        })
    }
}

impl office::Server for Office {
    async fn whoami(
        self: Rc<Self>,
        _: office::WhoamiParams,
        mut results: office::WhoamiResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_vat_id(self.caller.to_string());
        Ok(())
    }

    async fn echo(
        self: Rc<Self>,
        params: office::EchoParams,
        mut results: office::EchoResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_data(params.get()?.get_data()?);
        Ok(())
    }

    async fn subscribe(
        self: Rc<Self>,
        params: office::SubscribeParams,
        mut results: office::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let callback: callback::Client = params.get_callback()?;
        let count = params.get_count();
        let mut delivered = 0;
        for i in 1..=count {
            let mut req = callback.notify_request();
            req.get().set_msg(format!(
                "notification {i}/{count} for {}",
                self.caller.fingerprint()
            ));
            req.send().promise.await?;
            delivered = i;
        }
        results
            .get()
            .set_subscription(capnp_rpc::new_client(Subscription {
                delivered,
                subscriber: self.caller,
            }));
        Ok(())
    }

    async fn sleep(
        self: Rc<Self>,
        params: office::SleepParams,
        _: office::SleepResults,
    ) -> Result<(), capnp::Error> {
        let millis = params.get()?.get_millis();
        tokio::time::sleep(Duration::from_millis(millis.into())).await;
        Ok(())
    }
}

/// The capability `subscribe` returns: passed from server to client.
struct Subscription {
    delivered: u32,
    subscriber: VatId,
}

impl subscription::Server for Subscription {
    async fn delivered(
        self: Rc<Self>,
        _: subscription::DeliveredParams,
        mut results: subscription::DeliveredResults,
    ) -> Result<(), capnp::Error> {
        let mut r = results.get();
        r.set_count(self.delivered);
        r.set_subscriber(self.subscriber.to_string());
        Ok(())
    }
}

/// A vat of a network on `listen` that serves each peer an [`Office`] bound
/// to the peer's VatId and, as a provider, gives the redeemer of an
/// introduced `Office` of its own an `Office` bound to the redeemer (other
/// capabilities are handed over as they are).
///
/// # Panics
/// If the network cannot start (it must run inside a `LocalSet`).
pub async fn office_vat(
    identity: capnp_noise::Identity,
    listen: &str,
    options: capnp_noise::network::NetworkConfig,
) -> capnp_noise::network::Network {
    type Offices =
        std::rc::Rc<std::cell::RefCell<capnp_rpc::CapabilityServerSet<Office, office::Client>>>;
    let offices: Offices = Default::default();
    let (for_peers, for_redeemers) = (offices.clone(), offices);
    capnp_noise::network::Network::builder(identity)
        .listen(listen.parse().expect("a socket address"))
        .config(options)
        .bootstrap(move |peer: &PeerInfo| {
            for_peers.borrow_mut().new_client(Office {
                caller: peer.vat_id,
            })
        })
        .on_redeem(move |r: &capnp_noise::network::Redeemed, cap| {
            let office: office::Client = capnp::capability::FromClientHook::cast_to(cap.clone());
            let ours = for_redeemers
                .borrow()
                .get_local_server_of_resolved(&office)
                .is_some();
            if ours {
                for_redeemers
                    .borrow_mut()
                    .new_client(Office { caller: r.redeemer })
                    .client
            } else {
                cap
            }
        })
        .start()
        .await
        .expect("the network starts")
}
