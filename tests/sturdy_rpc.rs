//! Sturdy refs over real connections: a vat serves a `Restorer`, a client
//! restores objects from the URI form, and wrong, revoked or misdirected
//! refs fail clearly.

use capnp_noise_test::office;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use capnp_noise::rpc::{self, restorer_client, ClientConfig, PeerInfo, ServerConfig};
use capnp_noise::sturdy::{Address, ObjectId, Restorer, SturdyRef};
use capnp_noise::{AnyVat, Error, Identity, VatId};
use capnp_noise_test::schema::demo_capnp::office as office_capnp;
use capnp_noise_test::support::{local, whoami};

type Objects = Rc<RefCell<Restorer<capnp::capability::Client>>>;

async fn start_vat(identity: Identity, objects: Objects) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::task::spawn_local(rpc::serve(
        listener,
        identity,
        Arc::new(AnyVat),
        ServerConfig::default(),
        move |_: &PeerInfo| restorer_client(objects.clone()),
    ));
    addr
}

fn address(addr: SocketAddr) -> Address {
    Address::try_from(addr).unwrap()
}

/// A vat on loopback hosting one object, an Office whose whoami reports
/// the hosting caller: its VatId, its objects, the object's id, its address.
async fn host_with_office() -> (VatId, Objects, ObjectId, SocketAddr) {
    let host = Identity::generate();
    let host_vat = host.vat_id();
    let objects: Objects = Rc::new(RefCell::new(Restorer::new()));
    let office: office_capnp::Client = capnp_rpc::new_client(office::Office { caller: host_vat });
    let id = objects.borrow_mut().add(office.client);
    let addr = start_vat(host, objects.clone()).await;
    (host_vat, objects, id, addr)
}

#[tokio::test(flavor = "current_thread")]
async fn restore_wrong_revoked_and_misdirected() {
    local(async {
        let (host_vat, objects, id, addr) = host_with_office().await;

        // Round trip through the text form, as a user would paste it.
        let text = SturdyRef::new(host_vat, vec![address(addr)], id.clone())
            .unwrap()
            .to_string();
        let sref: SturdyRef = text.parse().unwrap();
        let me = Identity::generate();
        let (cap, conn): (office_capnp::Client, _) =
            rpc::connect_sturdy(&sref, &me, ClientConfig::default())
                .await
                .unwrap();
        assert_eq!(whoami(&cap).await.unwrap(), host_vat.to_string());
        assert_eq!(
            conn.peer().expect("connected without resuming").vat_id,
            host_vat
        );

        // A wrong id and a revoked id fail alike, naming neither.
        let wrong = SturdyRef::new(host_vat, vec![address(addr)], ObjectId::random()).unwrap();
        let e1 = rpc::connect_sturdy::<office_capnp::Client>(&wrong, &me, ClientConfig::default())
            .await
            .err()
            .expect("must fail");
        objects.borrow_mut().revoke(&id);
        let e2 = rpc::connect_sturdy::<office_capnp::Client>(&sref, &me, ClientConfig::default())
            .await
            .err()
            .expect("must fail");
        for e in [&e1, &e2] {
            assert!(
                matches!(e, Error::Rpc { during, .. } if during.contains("restore")),
                "{e:?}"
            );
            assert!(e.to_string().contains("wrong or was revoked"), "{e}");
            assert!(!e.to_string().contains(&*id.to_text()), "{e}");
        }
        assert_eq!(
            e1.to_string().replace(&wrong.object_id().to_text()[..], ""),
            e2.to_string()
        );

        // The capability restored before revocation still works on its connection.
        assert_eq!(whoami(&cap).await.unwrap(), host_vat.to_string());
        conn.disconnect().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn addresses_are_hints_but_the_vat_is_checked() {
    local(async {
        let (host_vat, _, id, good) = host_with_office().await;
        // Another vat with the same object id registered: it must never be used.
        let impostor_objects: Objects = Rc::new(RefCell::new(Restorer::new()));
        let decoy: office_capnp::Client = capnp_rpc::new_client(office::Office {
            caller: Identity::generate().vat_id(),
        });
        impostor_objects.borrow_mut().insert(&id, decoy.client);
        let impostor = start_vat(Identity::generate(), impostor_objects).await;
        // A dead address: bind and drop a listener.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let me = Identity::generate();

        // Dead and impostor addresses first: skipped, the real vat is reached.
        let sref = SturdyRef::new(
            host_vat,
            vec![address(dead), address(impostor), address(good)],
            id.clone(),
        )
        .unwrap();
        let (cap, conn): (office_capnp::Client, _) =
            rpc::connect_sturdy(&sref, &me, ClientConfig::default())
                .await
                .unwrap();
        assert_eq!(whoami(&cap).await.unwrap(), host_vat.to_string());
        conn.disconnect().await.unwrap();

        // Only the impostor: refused, with the reason naming the expected vat.
        let only_impostor = SturdyRef::new(host_vat, vec![address(impostor)], id).unwrap();
        let e = rpc::connect_sturdy::<office_capnp::Client>(
            &only_impostor,
            &me,
            ClientConfig::default(),
        )
        .await
        .err()
        .expect("must fail");
        match e {
            Error::PeerRefused { reason, .. } => {
                assert!(reason.contains(&host_vat.to_string()))
            }
            other => panic!("{other}"),
        }
    })
    .await;
}
