//! `capnp-noise tunnel`: a key-pinned replacement for stunnel in front of
//! any TCP service. (The services themselves follow once the tokio stream
//! is on this branch.)

pub mod config;
pub mod forward;
