//! # capnp-noise
//!
//! An authenticated, encrypted transport for Cap'n Proto RPC, built on the
//! Noise Protocol Framework (`Noise_XX_25519_{AESGCM_SHA256,ChaChaPoly_BLAKE2s}`),
//! that knows **which vat** is on the other end.
//!
//! Cap'n Proto RPC ships no secure transport; people put stunnel, an SSH
//! tunnel or a VPN in front of it and manage certificates. capnp-noise puts
//! the crypto inside the RPC stack instead: both ends prove a long-term
//! identity, a [`VatId`] (an Ed25519 public key), and the server learns the
//! authenticated VatId of every caller. Knowing vat identities at the
//! transport is also what makes introductions between more than two vats
//! possible ([`intro`]).
//!
//! ## Layers
//!
//! * [`wire`]: the protocol of SPEC.md as a **sans-IO core**. A
//!   [`wire::Handshake`] (initiator or responder) takes the peer's bytes and
//!   produces bytes to send; once finished it turns into a
//!   [`wire::Session`] by consuming itself. No sockets, no clock, no
//!   threads; errors are sticky. Fuzz targets and the deterministic
//!   in-memory pair of the tests drive the same code as the sockets do.
//! * [`stream`]: a thin tokio adapter. [`stream::connect`] and
//!   [`stream::accept`] run the handshake (with a timeout) over any
//!   `AsyncRead + AsyncWrite` and give a [`stream::NoiseStream`]: tokio
//!   `AsyncRead`/`AsyncWrite` with `BufWriter` semantics, end of stream only
//!   after the peer's authenticated close.
//! * [`admission`]: how many unauthenticated peers a responder spends
//!   Diffie-Hellman work on at once, in total and per source address.
//! * [`rpc`]: capnp-rpc glue in the style of capnp-rpc's own examples.
//!   [`rpc::serve`] builds each connection's bootstrap capability from the
//!   peer's VatId; [`rpc::connect`] requires the server's VatId.
//! * The vat-identity layer: [`VatId`] and its text form, [`Identity`] and
//!   key files ([`keyfile`]: PKCS#8 PEM, OpenSSH), trust policies
//!   ([`policy`]: [`Pinned`], [`AllowList`], [`Tofu`], [`AnyVat`], closures),
//!   sturdy refs ([`sturdy`]), and signed introductions ([`intro`]).
//!
//! ## Example
//!
//! A server that tells each caller who it is, and a client pinned to the
//! server's VatId, over a real loopback socket:
//!
//! ```
//! use std::sync::Arc;
//! use capnp_noise::rpc::{self, ClientOptions, PeerInfo, ServerOptions};
//! use capnp_noise::schema::demo_capnp::office;
//! use capnp_noise::{AnyVat, Identity, Pinned, VatId};
//!
//! struct Office { caller: VatId }
//!
//! impl office::Server for Office {
//!     async fn whoami(
//!         self: capnp::capability::Rc<Self>,
//!         _: office::WhoamiParams,
//!         mut results: office::WhoamiResults,
//!     ) -> Result<(), capnp::Error> {
//!         results.get().set_vat_id(self.caller.to_string());
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! tokio::task::LocalSet::new().run_until(async {
//!     let (server, client) = (Identity::generate(), Identity::generate());
//!     let server_vat = server.vat_id();
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//!     let addr = listener.local_addr().unwrap();
//!     tokio::task::spawn_local(rpc::serve(
//!         listener, server, Arc::new(AnyVat), ServerOptions::default(),
//!         |peer: &PeerInfo| -> office::Client { capnp_rpc::new_client(Office { caller: peer.vat_id }) },
//!     ));
//!     let (office, connection): (office::Client, _) = rpc::connect(
//!         addr, &client, Arc::new(Pinned(server_vat)), ClientOptions::default(),
//!     ).await.unwrap();
//!     let reply = office.whoami_request().send().promise.await.unwrap();
//!     let seen = reply.get().unwrap().get_vat_id().unwrap().to_str().unwrap().to_string();
//!     assert_eq!(seen, client.vat_id().to_string());
//!     connection.disconnect().await.unwrap();
//! }).await;
//! # }
//! ```
//!
//! ## Design notes
//!
//! * SPEC.md is normative; `tests/vectors/` hold the exact bytes of full
//!   sessions for both suites and the tests reproduce them.
//! * Peer bytes are hostile: every length is checked before it is buffered,
//!   every buffer is bounded (one maximal frame per direction), every wait
//!   has a timeout in the adapters, and every parser of peer bytes has a fuzz
//!   target (`fuzz/`) whose corpus `cargo test` replays.
//! * The crypto: snow runs the handshake, with X25519, AES-GCM,
//!   ChaCha20-Poly1305 and SHA-256 from aws-lc-rs; the transport seals frames
//!   in place, with no allocation per frame.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod admission;
pub mod error;
pub mod identity;
pub mod intro;
pub mod keyfile;
pub mod network;
pub mod policy;
pub mod rpc;
pub mod stream;
pub mod sturdy;
pub mod tunnel;
pub mod vat_id;
pub mod wire;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fuzzing;

/// Code generated by capnpc from `schema/` (committed; see `scripts/regen-schema`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod schema {
    #[rustfmt::skip]
    pub mod noise_capnp;
    #[rustfmt::skip]
    pub mod demo_capnp;
    #[rustfmt::skip]
    pub mod network_capnp;
}

/// The README's code blocks, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use error::{Error, IntroductionError, ProtocolError, Result};
pub use identity::Identity;
pub use policy::{AllowList, AnyVat, PeerContext, PeerPolicy, Pinned, Refusal, Tofu};
pub use vat_id::VatId;
