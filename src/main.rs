//! The `capnp-noise` command-line tool (subcommands arrive with the identity
//! layer and the tunnel).
#![forbid(unsafe_code)]

fn main() {
    println!("capnp-noise {}", env!("CARGO_PKG_VERSION"));
}
