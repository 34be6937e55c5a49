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
//! Most programs use [`rpc`] (a server and its clients) or [`network`]
//! (vats that call each other), with the identity layer; [`stream`] and
//! [`wire`] are for other transports, custom servers and other
//! implementations of SPEC.md.
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
//! * [`network`]: many vats, each a [`network::Network`] that keeps one
//!   connection per pair of vats and makes introductions ([`intro`]:
//!   three-party handoff, so that a capability passed on is then called
//!   directly at its host).
//! * The vat-identity layer: [`VatId`] and its text form, [`Identity`] and
//!   key files ([`keyfile`]: PKCS#8 PEM, OpenSSH), trust policies
//!   ([`policy`]: [`Pinned`], [`AllowList`], [`Tofu`], [`AnyVat`], closures),
//!   sturdy refs ([`sturdy`]), and signed introductions ([`intro`]).
//!
//! ## Getting started
//!
//! capnp-noise carries the Cap'n Proto RPC of any schema. Besides this
//! crate you need `capnp` and `capnp-rpc` (the same versions as this crate
//! uses), tokio, and `capnpc` to compile your schema in `build.rs` (it runs
//! the `capnp` compiler: Debian's `capnproto` package):
//!
//! ```toml
//! [dependencies]
//! capnp-noise = "0.1"
//! capnp = "0.27"
//! capnp-rpc = "0.27"
//! tokio = { version = "1", features = ["rt", "macros", "net", "time"] }
//!
//! [build-dependencies]
//! capnpc = "0.27"
//! ```
//!
//! The schema of the examples below, `schema/office.capnp`, compiled by
//! `build.rs` and included at the root of your crate:
//!
//! ```text
//! @0xa1969fc693c842b3;  # make your own with `capnp id`
//! interface Office {
//!   whoami @0 () -> (vatId :Text);
//! }
//! ```
//!
//! ```ignore
//! // build.rs
//! fn main() {
//!     capnpc::CompilerCommand::new()
//!         .src_prefix("schema")
//!         .file("schema/office.capnp")
//!         .run()
//!         .expect("compiling schema/office.capnp");
//! }
//!
//! // src/main.rs (or lib.rs)
//! mod office_capnp {
//!     include!(concat!(env!("OUT_DIR"), "/office_capnp.rs"));
//! }
//! ```
//!
//! Each vat needs an [`Identity`]: [`Identity::generate`] for a throwaway
//! one, [`Identity::load`] and [`Identity::save`] for one that lasts (PEM
//! files, see [`keyfile`]). Its [`VatId`] is its public name: print it
//! (`vat1…`) and give it to the vats that will connect to it, which parse it
//! with `str::parse` and pin it ([`Pinned`]).
//!
//! Settings ([`rpc::ServerConfig`], [`rpc::ClientConfig`],
//! [`network::NetworkConfig`], [`stream::StreamConfig`],
//! [`wire::HandshakeConfig`], [`intro::HandoffConfig`]) all start from
//! `Default` and change with `with_*` setters, for example
//! `ServerConfig::default().with_max_connections(256)`.
//!
//! ## Example: a server and a client
//!
//! A server that tells each caller who it is, and a client pinned to the
//! server's VatId, over a real loopback socket:
//!
//! ```
//! use std::sync::Arc;
//! use capnp_noise::rpc::{self, ClientConfig, PeerInfo, ServerConfig};
//! use capnp_noise::{AnyVat, Identity, Pinned, VatId};
//! # use capnp_noise_test::schema::demo_capnp as office_capnp;
//! use office_capnp::office;
//!
//! /// The service: one instance per connection, knowing who calls.
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
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // capnp-rpc is single-threaded: run it on a LocalSet.
//!     tokio::task::LocalSet::new().run_until(async {
//!         let (server, client) = (Identity::generate(), Identity::generate());
//!         let server_vat = server.vat_id();
//!         let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//!         let addr = listener.local_addr()?;
//!         tokio::task::spawn_local(rpc::serve(
//!             listener, server, Arc::new(AnyVat), ServerConfig::default(),
//!             |peer: &PeerInfo| -> office::Client {
//!                 capnp_rpc::new_client(Office { caller: peer.vat_id })
//!             },
//!         ));
//!         let (office, connection): (office::Client, _) = rpc::connect(
//!             addr, &client, Arc::new(Pinned(server_vat)), ClientConfig::default(),
//!         ).await?;
//!         let reply = office.whoami_request().send().promise.await?;
//!         let seen = reply.get()?.get_vat_id()?.to_str()?.to_string();
//!         assert_eq!(seen, client.vat_id().to_string());
//!         connection.disconnect().await?;
//!         Ok(())
//!     }).await
//! }
//! ```
//!
//! ## Example: a network of vats
//!
//! When every vat may call every other, a [`network::Network`] per vat
//! replaces `serve` and `connect`: it listens, dials peers by VatId (one
//! connection per pair), and hands capabilities from one peer to another
//! ([`network::Network::introduce`]). Its module documentation starts with
//! a complete example.
//!
//! ## Errors
//!
//! Every operation returns [`Error`], whose variants say who was at fault
//! and can be matched ([`Error::PeerRefused`], [`Error::NoAddress`],
//! [`Error::ShutDown`], ...); it converts to and from [`std::io::Error`].
//! See [`error`].
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
// The real crypto the cheap fuzzing stand-ins replace goes unused there (src/fuzz_crypto.rs).
#![cfg_attr(
    all(fuzzing, capnp_noise_fuzz_cheap_crypto),
    allow(dead_code, unused_imports)
)]

/// Writes the `with_*` setters of a settings type: one per listed field,
/// each taking the field's value, documented as setting it.
macro_rules! setters {
    ($ty:ident { $($setter:ident => $field:ident: $t:ty),* $(,)? }) => {
        impl $ty {
            $(
                #[doc = concat!("Sets [`", stringify!($field), "`](Self::", stringify!($field), ").")]
                #[must_use]
                pub fn $setter(mut self, $field: $t) -> Self {
                    self.$field = $field;
                    self
                }
            )*
        }
    };
}

pub mod admission;
pub mod error;
/// FUZZING BUILDS ONLY: cheap, insecure stand-ins for X25519, the AEAD and
/// Ed25519, compiled only with both `--cfg fuzzing` and
/// `--cfg capnp_noise_fuzz_cheap_crypto` (and, unused, in the unit tests,
/// which forge inputs with them). See the module and fuzz/README.md.
#[cfg(any(test, all(fuzzing, capnp_noise_fuzz_cheap_crypto)))]
pub(crate) mod fuzz_crypto;
pub mod identity;
pub mod intro;
pub mod keyfile;
pub mod keylog;
pub mod network;
pub mod policy;
pub mod rpc;
pub mod stream;
pub mod sturdy;
pub mod vat_id;
pub mod wire;
pub mod workers;

/// Code generated by capnpc from `schema/` (committed; see `scripts/regen-schema`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod schema {
    #[rustfmt::skip]
    pub mod noise_capnp;
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
